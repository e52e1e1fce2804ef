//! `banger image push NAME REF` and `banger build --push REF`: an image as an ordinary OCI
//! image whose layers are the steps that made it, and the way back in `image pull`.
//!
//! An image banger built is `rootfs.build` over a stack of layers: the base's (OCI layers, a
//! recipe's tar), one per provisioning step, then banger's agent. Its ext4 is a deterministic
//! function of those layers' bytes and the step's params, so a registry needs only the
//! layers: [`push_image`] uploads each layer blob as it is stored (a blob the repository has
//! is not sent again, so a push after editing the last step sends that layer and the
//! config), an OCI config whose label [`IMAGE_LABEL`] carries what rebuilding needs (the
//! `rootfs.build` params and version, the ext4's sha256, the kernel and distro), and the
//! manifest. [`banger_image`] reads that label back on pull, and [`plan_pull`] plans the
//! layer fetches and the same `rootfs.build` without adding an agent layer: the pulled
//! image is byte for byte the pushed one when the ext4 writer is the same version (checked
//! by [`check_pulled`]).
//!
//! The image is also an ordinary OCI image (`diff_ids`, `linux/amd64`): other tools can pull
//! and unpack it.
//!
//! Known weaknesses: images whose base is an ext4 (a catalog bundle) cannot be pushed yet;
//! blobs are mounted only from repositories the caller names (the remote step cache's), not
//! from where the base image was pulled.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use petgraph::graph::NodeIndex;
use serde::{Deserialize, Serialize};

use crate::key::Params;
use crate::lock::PinnedReference;
use crate::oci::{
    Compression, ImageReference, OciError, RegistryClient, media_types, registry_digest,
    sha256_digest,
};
use crate::plan::kinds::{OciFetchLayerParams, RootfsBuildParams, StepParams};
use crate::plan::{Plan, PlanError, StepNode, lower};
use crate::state::{ImageRecord, State, StateError};
use crate::store::{KeyKind, Lookup, OutputRef, StepRecord, Store, StoreError};

/// The config label of an image banger pushed: JSON of [`ImageLabel`].
pub const IMAGE_LABEL: &str = "dev.banger.image.v1";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no image named `{name}` (banger image list shows the recorded ones)")]
    UnknownImage { name: String },
    #[error("no kernel named `{name}` (banger kernel list shows the recorded ones)")]
    UnknownKernel { name: String },
    #[error("{reference} is not a kernel banger pushed: {reason}")]
    NotAKernel { reference: String, reason: String },
    #[error("image `{name}` cannot be pushed: {reason}")]
    NotPushable { name: String, reason: String },
    #[error(
        "the steps that built image `{name}` are no longer stored ({what}); build or pull it \
         again, then push"
    )]
    Evicted { name: String, what: String },
    #[error("`{reference}` needs a tag to push to (e.g. `{reference}:1.0`), not a digest")]
    NeedsTag { reference: String },
    #[error(
        "{reference} was pushed by banger, but its `{IMAGE_LABEL}` label is not readable: \
         {reason}"
    )]
    BadLabel { reference: String, reason: String },
    #[error(
        "pulling {reference} gave an image with sha256 {actual}, not the {expected} it was \
         pushed with; nothing was recorded"
    )]
    NotReproduced {
        reference: String,
        expected: String,
        actual: String,
    },
    #[error("cannot read layer {path} of the store")]
    ReadLayer {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Oci(Box<OciError>),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

impl From<OciError> for PublishError {
    fn from(error: OciError) -> PublishError {
        PublishError::Oci(Box::new(error))
    }
}

impl crate::error::Classify for PublishError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            PublishError::Oci(error) => error.class(),
            PublishError::State(error) => error.class(),
            PublishError::Store(error) => error.class(),
            PublishError::Plan(error) => error.class(),
            PublishError::ReadLayer { .. } => ErrorClass::Environment,
            PublishError::NotReproduced { .. } => ErrorClass::Failed,
            _ => ErrorClass::User,
        }
    }
}

/// What rebuilding a pushed image needs, as its config's [`IMAGE_LABEL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLabel {
    /// The `rootfs.build` step's params and kind version.
    pub rootfs_params: Params,
    pub rootfs_version: u32,
    /// The ext4 it made: integrity (`sha256-…`) and size.
    pub rootfs_integrity: String,
    pub rootfs_size: u64,
    pub kernel: Option<String>,
    pub distro: Option<String>,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOutcome {
    /// The reference pushed to, with the manifest's digest.
    pub reference: String,
    pub manifest_digest: String,
    pub layers: usize,
    /// Blobs (layers and config) sent, and their bytes.
    pub uploaded_blobs: usize,
    pub uploaded_bytes: u64,
    /// Bytes of layers the repository had already (or got by mount).
    pub reused_bytes: u64,
    /// Layers linked from another repository of the registry instead of uploaded.
    pub mounted_blobs: usize,
}

impl PushOutcome {
    /// Counts one blob of `size` bytes: uploaded when `sent`, else already there.
    fn count(&mut self, sent: bool, size: u64) {
        if sent {
            self.uploaded_blobs += 1;
            self.uploaded_bytes += size;
        } else {
            self.reused_bytes += size;
        }
    }
}

/// One layer of a recorded image, in the store.
struct StoredLayer {
    output: OutputRef,
    path: PathBuf,
    digest: String,
    compression: Compression,
}

/// Pushes the recorded image `name` to `reference` (a tag). A layer the target repository
/// lacks is first mounted from the repositories of `mount_from` on the same registry (the
/// remote step cache's, say), then uploaded if no mount worked. `progress(what, done,
/// total)` follows each upload.
pub async fn push_image(
    store: &Store,
    state_dir: &std::path::Path,
    registry: &RegistryClient,
    name: &str,
    reference: &str,
    mount_from: &[String],
    progress: &(dyn Fn(&str, u64, u64) + Send + Sync),
) -> Result<PushOutcome, PublishError> {
    let target = push_target(reference)?;
    let record =
        State::open(state_dir)?
            .image(name)?
            .ok_or_else(|| PublishError::UnknownImage {
                name: name.to_owned(),
            })?;
    // Held for the whole push: `cache gc` takes nothing while layers are read in place.
    let _lease = store.lease_async().await?;
    let (rootfs, layers) = stored_layers(store, &record)?;
    let label = ImageLabel {
        rootfs_params: rootfs.params.clone(),
        rootfs_version: rootfs.version,
        rootfs_integrity: record.rootfs_integrity.clone(),
        rootfs_size: record.rootfs_size,
        kernel: record.kernel_ref.clone(),
        distro: record.distro.clone(),
    };
    let mut diff_ids = Vec::new();
    for layer in &layers {
        diff_ids.push(diff_id(layer).await?);
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Labels": {
                IMAGE_LABEL: serde_json::to_string(&label).expect("a label serializes"),
            },
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("a config serializes");
    let config_digest = sha256_digest(&config);

    let mut outcome = PushOutcome {
        reference: String::new(),
        manifest_digest: String::new(),
        layers: layers.len(),
        uploaded_blobs: 0,
        uploaded_bytes: 0,
        reused_bytes: 0,
        mounted_blobs: 0,
    };
    let sources: Vec<ImageReference> = mount_from
        .iter()
        .filter_map(|repository| ImageReference::parse(repository).ok())
        .collect();
    let count = layers.len();
    for (index, layer) in layers.iter().enumerate() {
        let what = format!("layer {}/{count}", index + 1);
        let report = |done: u64, total: u64| progress(&what, done, total);
        if !sources.is_empty() && !registry.blob_exists(&target, &layer.digest).await? {
            for source in &sources {
                if registry.mount_blob(&target, source, &layer.digest).await? {
                    outcome.mounted_blobs += 1;
                    break;
                }
            }
        }
        let sent = registry
            .push_blob_file(
                &target,
                &layer.path,
                &layer.digest,
                layer.output.size,
                &report,
            )
            .await?;
        outcome.count(sent, layer.output.size);
    }
    if registry
        .push_blob_bytes(&target, &config, &config_digest)
        .await?
    {
        outcome.count(true, config.len() as u64);
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_types::OCI_MANIFEST,
        "config": {
            "mediaType": media_types::OCI_CONFIG,
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layers.iter().map(|layer| serde_json::json!({
            "mediaType": match layer.compression {
                Compression::None => media_types::OCI_LAYER_TAR,
                Compression::Gzip => media_types::OCI_LAYER_GZIP,
                Compression::Zstd => media_types::OCI_LAYER_ZSTD,
            },
            "digest": layer.digest,
            "size": layer.output.size,
        })).collect::<Vec<_>>(),
        "annotations": {
            "org.opencontainers.image.title": record.name,
            "dev.banger.image.rootfs": registry_digest(&record.rootfs_integrity),
        },
    }))
    .expect("a manifest serializes");
    let digest = registry
        .push_manifest(&target, &manifest, media_types::OCI_MANIFEST)
        .await?;
    outcome.reference = format!("{}@{digest}", target.name());
    outcome.manifest_digest = digest;
    Ok(outcome)
}

/// `reference` as a place to push to: a valid reference with a tag (`latest` when none is
/// written), not a digest.
pub fn push_target(reference: &str) -> Result<ImageReference, PublishError> {
    let target = ImageReference::parse(reference)?;
    if target.digest().is_some() {
        return Err(PublishError::NeedsTag {
            reference: reference.to_owned(),
        });
    }
    Ok(target)
}

/// The `rootfs.build` record of `image` and its layers in order, each readable in the store.
fn stored_layers(
    store: &Store,
    image: &ImageRecord,
) -> Result<(StepRecord, Vec<StoredLayer>), PublishError> {
    let evicted = |what: String| PublishError::Evicted {
        name: image.name.clone(),
        what,
    };
    let rootfs = match store.lookup(KeyKind::Definition, &image.step_key)? {
        Lookup::Hit(record) => *record,
        Lookup::Miss(_) => return Err(evicted("its rootfs step".to_owned())),
    };
    if rootfs.kind != crate::steps::ROOTFS_BUILD.name {
        return Err(PublishError::NotPushable {
            name: image.name.clone(),
            reason: format!(
                "it was not built from layers (its last step is `{}`); images from catalog \
                 bundles and registered ext4 files cannot be pushed yet",
                rootfs.kind
            ),
        });
    }
    let mut inputs = rootfs.inputs.clone();
    inputs.sort_by_key(|input| layer_index(&input.name));
    let mut layers = Vec::new();
    for input in &inputs {
        let step = match store.lookup(KeyKind::Definition, &input.definition_key)? {
            Lookup::Hit(record) => *record,
            Lookup::Miss(_) => return Err(evicted(format!("layer {}", input.step_id))),
        };
        let (file, output) = crate::steps::rootfs_build::layer_output(&step.outputs)
            .ok_or_else(|| evicted(format!("the layer of {}", input.step_id)))?;
        if file == crate::steps::ROOTFS_OUTPUT {
            return Err(PublishError::NotPushable {
                name: image.name.clone(),
                reason: format!(
                    "its base {} is an ext4 image (a catalog bundle), not layers; build it \
                     from an OCI image or a recipe to push it",
                    input.step_id
                ),
            });
        }
        let path = store.content_file(output)?;
        let mut head = [0u8; 4];
        let read = std::fs::File::open(&path)
            .and_then(|mut file| file.read(&mut head))
            .map_err(|source| PublishError::ReadLayer {
                path: path.clone(),
                source,
            })?;
        let digest =
            registry_digest(&output.integrity).ok_or_else(|| PublishError::NotPushable {
                name: image.name.clone(),
                reason: format!("layer {} is not stored under a sha256", input.step_id),
            })?;
        layers.push(StoredLayer {
            output: output.clone(),
            path,
            digest,
            compression: crate::oci::sniff_compression(&head[..read]),
        });
    }
    Ok((rootfs, layers))
}

/// `layer[7]` → 7, for ordering; other names last.
fn layer_index(name: &str) -> usize {
    name.strip_prefix("layer[")
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|index| index.parse().ok())
        .unwrap_or(usize::MAX)
}

/// The sha256 of a layer's uncompressed tar (the config's `diff_ids`): its digest for a
/// plain tar, else a pass over the decompressed stream.
async fn diff_id(layer: &StoredLayer) -> Result<String, PublishError> {
    if layer.compression == Compression::None {
        return Ok(layer.digest.clone());
    }
    let path = layer.path.clone();
    let compression = layer.compression;
    tokio::task::spawn_blocking(move || {
        use sha2::Digest as _;
        let read_error = |source| PublishError::ReadLayer {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(read_error)?;
        let mut reader = crate::oci::decompressed(compression, file).map_err(read_error)?;
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let read = reader.read(&mut buffer).map_err(read_error)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        Ok(format!("sha256:{hex}"))
    })
    .await
    .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
}

/// The label of a pinned image when banger pushed it; `None` for any other image.
pub async fn banger_image(
    registry: &RegistryClient,
    pin: &PinnedReference,
) -> Result<Option<ImageLabel>, PublishError> {
    #[derive(Deserialize)]
    struct Config {
        config: Option<Inner>,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(rename = "Labels")]
        labels: Option<BTreeMap<String, String>>,
    }
    let image = crate::oci::ResolvedImage::from_pinned(pin)?;
    let bytes = registry.fetch_config(&image).await?;
    let Ok(config) = serde_json::from_slice::<Config>(&bytes) else {
        return Ok(None);
    };
    let Some(text) = config
        .config
        .and_then(|inner| inner.labels)
        .and_then(|mut labels| labels.remove(IMAGE_LABEL))
    else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|error| PublishError::BadLabel {
            reference: pin.reference.clone(),
            reason: error.to_string(),
        })
}

/// The plan of a banger image's pull: one fetch per layer (keyed by digest, as any OCI
/// layer), then `rootfs.build` with the pushed params, and no agent layer (it is one of the
/// layers). Returns the plan and its last step.
pub fn plan_pull(
    name: &str,
    reference: &str,
    pin: &PinnedReference,
    label: &ImageLabel,
) -> Result<(Plan, NodeIndex), PublishError> {
    let params = RootfsBuildParams::from_params(&label.rootfs_params).map_err(|error| {
        PublishError::BadLabel {
            reference: reference.to_owned(),
            reason: error.to_string(),
        }
    })?;
    let mut plan = Plan::new();
    let prefix = format!("image:{name}");
    let mut layers = Vec::new();
    for (index, layer) in pin.layers.iter().enumerate() {
        let params = OciFetchLayerParams {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
            size: layer.size,
        };
        let info = &crate::steps::OCI_FETCH_LAYER;
        let node = StepNode::new(
            format!("{prefix}/layer[{index}]"),
            info.name,
            info.version,
            params.to_params(),
            info.resource,
        )
        .hint("reference", reference)
        .summary(format!("{} from {reference}", layer.digest));
        layers.push(plan.add_step(node)?);
    }
    let rootfs = lower::rootfs_build(
        &mut plan,
        &format!("{prefix}/rootfs"),
        &layers,
        params.size,
        "the pushed image",
    )?;
    plan.add_target(rootfs);
    Ok((plan, rootfs))
}

/// A pulled banger image must be the pushed one, byte for byte, when this banger's ext4
/// writer is the version that made it.
pub fn check_pulled(
    reference: &str,
    label: &ImageLabel,
    integrity: &str,
) -> Result<(), PublishError> {
    if label.rootfs_version == crate::steps::ROOTFS_BUILD.version
        && label.rootfs_integrity != integrity
    {
        return Err(PublishError::NotReproduced {
            reference: reference.to_owned(),
            expected: label.rootfs_integrity.clone(),
            actual: integrity.to_owned(),
        });
    }
    Ok(())
}

/// `artifactType` of a pushed kernel, and the media types of its config and files.
pub const KERNEL_ARTIFACT_TYPE: &str = "application/vnd.banger.kernel.v1";
const KERNEL_CONFIG_MEDIA_TYPE: &str = "application/vnd.banger.kernel.config.v1+json";
const KERNEL_FILE_MEDIA_TYPE: &str = "application/vnd.banger.kernel.file.v1";
const TITLE: &str = "org.opencontainers.image.title";
/// The files a kernel artifact may hold, by title.
const KERNEL_FILES: [&str; 3] = ["vmlinux", "initrd", "modules.tar"];

/// A pushed kernel's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelLabel {
    pub name: String,
    pub release: Option<String>,
}

/// Pushes the recorded kernel `name` to `reference` as one OCI artifact: its `vmlinux`,
/// `initrd` and modules tar as titled blobs, and a small config. `progress(what, done,
/// total)` follows each upload.
pub async fn push_kernel(
    store: &Store,
    state_dir: &std::path::Path,
    registry: &RegistryClient,
    name: &str,
    reference: &str,
    progress: &(dyn Fn(&str, u64, u64) + Send + Sync),
) -> Result<PushOutcome, PublishError> {
    let target = push_target(reference)?;
    let record =
        State::open(state_dir)?
            .kernel(name)?
            .ok_or_else(|| PublishError::UnknownKernel {
                name: name.to_owned(),
            })?;
    let _lease = store.lease_async().await?;
    let files: Vec<(&str, &crate::state::StoredFile)> = [
        ("vmlinux", Some(&record.vmlinux)),
        ("initrd", record.initrd.as_ref()),
        ("modules.tar", record.modules.as_ref()),
    ]
    .into_iter()
    .filter_map(|(title, file)| file.map(|file| (title, file)))
    .collect();
    let mut outcome = PushOutcome {
        reference: String::new(),
        manifest_digest: String::new(),
        layers: files.len(),
        uploaded_blobs: 0,
        uploaded_bytes: 0,
        reused_bytes: 0,
        mounted_blobs: 0,
    };
    let mut layers = Vec::new();
    for (title, file) in &files {
        let output = OutputRef {
            integrity: file.integrity.clone(),
            size: file.size,
        };
        let path = store
            .content_file(&output)
            .map_err(|_| PublishError::Evicted {
                name: name.to_owned(),
                what: format!("its {title}"),
            })?;
        let digest = registry_digest(&file.integrity).ok_or_else(|| PublishError::NotPushable {
            name: name.to_owned(),
            reason: format!("its {title} is not stored under a sha256"),
        })?;
        let report = |done: u64, total: u64| progress(title, done, total);
        let sent = registry
            .push_blob_file(&target, &path, &digest, file.size, &report)
            .await?;
        outcome.count(sent, file.size);
        layers.push(serde_json::json!({
            "mediaType": KERNEL_FILE_MEDIA_TYPE,
            "digest": digest,
            "size": file.size,
            "annotations": {TITLE: title},
        }));
    }
    let config = serde_json::to_vec(&KernelLabel {
        name: record.name.clone(),
        release: record.release.clone(),
    })
    .expect("a label serializes");
    let config_digest = sha256_digest(&config);
    if registry
        .push_blob_bytes(&target, &config, &config_digest)
        .await?
    {
        outcome.count(true, config.len() as u64);
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_types::OCI_MANIFEST,
        "artifactType": KERNEL_ARTIFACT_TYPE,
        "config": {
            "mediaType": KERNEL_CONFIG_MEDIA_TYPE,
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layers,
    }))
    .expect("a manifest serializes");
    let digest = registry
        .push_manifest(&target, &manifest, media_types::OCI_MANIFEST)
        .await?;
    outcome.reference = format!("{}@{digest}", target.name());
    outcome.manifest_digest = digest;
    Ok(outcome)
}

/// Downloads the kernel artifact at `reference` into `dir` as `kernel import` reads it
/// (`vmlinux`, `initrd`, `modules/`), every file verified by sha256 and size, the modules
/// tar unpacked under `untar`'s confinement. Returns its label and the manifest's digest.
pub async fn fetch_kernel(
    registry: &RegistryClient,
    reference: &str,
    dir: &std::path::Path,
) -> Result<(KernelLabel, String), PublishError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Manifest {
        config: Descriptor,
        layers: Vec<Descriptor>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Descriptor {
        media_type: String,
        digest: String,
        size: u64,
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    let source = ImageReference::parse(reference)?;
    let not_a_kernel = |reason: String| PublishError::NotAKernel {
        reference: reference.to_owned(),
        reason,
    };
    let (body, digest) = registry
        .fetch_manifest_bytes(&source)
        .await?
        .ok_or_else(|| OciError::ManifestNotFound {
            reference: source.to_string(),
        })?;
    let manifest: Manifest = serde_json::from_slice(&body)
        .map_err(|error| not_a_kernel(format!("its manifest is not readable: {error}")))?;
    if manifest.config.media_type != KERNEL_CONFIG_MEDIA_TYPE {
        return Err(not_a_kernel(format!(
            "its config is `{}`, not a banger kernel's",
            manifest.config.media_type
        )));
    }
    let config = registry
        .fetch_blob_bytes(
            &source,
            &manifest.config.digest,
            manifest.config.size,
            64 << 10,
        )
        .await?;
    let label: KernelLabel = serde_json::from_slice(&config)
        .map_err(|error| not_a_kernel(format!("its config is not readable: {error}")))?;
    let mut seen = Vec::new();
    for layer in &manifest.layers {
        let title = layer
            .annotations
            .get(TITLE)
            .map(String::as_str)
            .unwrap_or("");
        if layer.media_type != KERNEL_FILE_MEDIA_TYPE
            || !KERNEL_FILES.contains(&title)
            || seen.contains(&title)
        {
            return Err(not_a_kernel(format!(
                "it holds a file banger does not know or twice (`{title}`)"
            )));
        }
        seen.push(title);
        registry
            .fetch_blob_to_file(
                &source,
                &layer.digest,
                layer.size,
                &dir.join(title),
                |_, _| {},
            )
            .await?;
    }
    if !seen.contains(&"vmlinux") {
        return Err(not_a_kernel("it has no vmlinux".to_owned()));
    }
    if seen.contains(&"modules.tar") {
        let tar = dir.join("modules.tar");
        let modules = dir.join("modules");
        let unpack = |tar: &std::path::Path| -> Result<(), String> {
            std::fs::create_dir(&modules).map_err(|error| error.to_string())?;
            let file = std::fs::File::open(tar).map_err(|error| error.to_string())?;
            crate::untar::extract_into(
                &mut tar::Archive::new(std::io::BufReader::new(file)),
                &modules,
                &crate::untar::Rules {
                    link_targets: crate::untar::LinkTargets::Inside,
                    special_files: crate::untar::SpecialFiles::Refuse,
                    mode_mask: 0o755,
                    directory_mode_floor: 0o700,
                    keep_times: false,
                },
                &|_| true,
            )
            .map(|_| ())
            .map_err(|error| crate::error::error_chain(&error))
        };
        unpack(&tar).map_err(|reason| not_a_kernel(format!("its modules tar: {reason}")))?;
        std::fs::remove_file(&tar).map_err(|source| PublishError::ReadLayer {
            path: tar.clone(),
            source,
        })?;
    }
    Ok((label, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_ordered_by_their_index() {
        let mut names = vec!["layer[10]", "layer[2]", "layer[0]", "other"];
        names.sort_by_key(|name| layer_index(name));
        assert_eq!(names, ["layer[0]", "layer[2]", "layer[10]", "other"]);
    }

    #[test]
    fn a_pull_plan_is_the_layers_and_the_pushed_rootfs_step_without_an_agent() {
        let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let pin = PinnedReference {
            reference: "127.0.0.1:5000/team/app:1".into(),
            manifest_digest: digest('m'),
            config_digest: Some(digest('c')),
            config_size: Some(10),
            layers: vec![
                crate::lock::PinnedLayer {
                    digest: digest('1'),
                    media_type: media_types::OCI_LAYER_TAR.into(),
                    size: 10,
                },
                crate::lock::PinnedLayer {
                    digest: digest('2'),
                    media_type: media_types::OCI_LAYER_GZIP.into(),
                    size: 20,
                },
            ],
        };
        let label = ImageLabel {
            rootfs_params: RootfsBuildParams {
                size: crate::plan::kinds::RootfsSize::Fixed(1 << 30),
            }
            .to_params(),
            rootfs_version: crate::steps::ROOTFS_BUILD.version,
            rootfs_integrity: "sha256-x".into(),
            rootfs_size: 1 << 30,
            kernel: None,
            distro: None,
        };
        let (plan, rootfs) = plan_pull("app", &pin.reference, &pin, &label).unwrap();
        assert_eq!(plan.len(), 3);
        assert_eq!(plan.node(rootfs).params, label.rootfs_params);
        let kinds: Vec<&str> = plan
            .inputs(rootfs)
            .into_iter()
            .map(|(_, input)| plan.node(input).kind.as_str())
            .collect();
        assert_eq!(kinds, ["oci.fetch-layer", "oci.fetch-layer"]);
        let error = check_pulled("r", &label, "sha256-y")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("sha256-y") && error.contains("sha256-x"),
            "{error}"
        );
        check_pulled("r", &label, "sha256-x").unwrap();
    }
}
