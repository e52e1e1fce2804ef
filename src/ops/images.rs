//! Named images: pinning references, building images through the engine, and recording them.
//!
//! Lifecycle of `banger build` / `banger image pull`:
//! 1. [`pin_references`] resolves every OCI reference the lock does not pin yet (all of them
//!    with `update`) to its linux/amd64 manifest, so the plan can key one fetch per layer by
//!    digest. A moved tag changes nothing until the user asks to update.
//! 2. [`build`] lowers the images alone (each image's last step a target) and runs the plan;
//!    everything cached means nothing runs.
//! 3. [`register`] records the result in the state database and pins it as a GC root
//!    (`image:<name>`), so `banger cache gc` never evicts a registered image.
//!
//! [`pull`] is the whole of `banger image pull` for the CLI and the daemon alike: a catalog
//! name or an OCI reference in ([`ImagePullRequest`]), a recorded image out. It is
//! [`prepare_pull`] (classify, check the kernel, pin, plan) then [`build_and_record`] (run,
//! record, pin as a root); `import-tar` and `register` use the second half with plans of their
//! own. Its future is `Send`: the state database (a SQLite connection, not `Sync`) is opened
//! only in synchronous stretches, never held across an await.

use std::collections::BTreeMap;
use std::path::Path;

use petgraph::graph::NodeIndex;

use crate::catalog::{Catalogs, ImageEntry, Prefer};
use crate::engine::{Engine, EngineError, Reporter, RunOptions, RunReport};
use crate::key::Key;
use crate::lock::Lock;
use crate::oci::{ImageReference, OciError, RegistryClient};
use crate::plan::kinds::{ParamError, RecipeParams, StepParams};
use crate::plan::{Plan, PlanError, lower};
use crate::spec::{ByteSize, ImageSource, ImageSpec};
use crate::state::{ImageRecord, State, StateError};
use crate::steps::Services;
use crate::store::{OutputRef, Store, StoreError, now_ms};

pub use crate::steps::ROOTFS_OUTPUT;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "`{query}` is neither an image in the catalog ({}) nor a valid OCI reference",
        .catalog.join(", ")
    )]
    UnknownImage {
        query: String,
        catalog: Vec<String>,
        #[source]
        source: Box<OciError>,
    },
    #[error(transparent)]
    Oci(Box<OciError>),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("image {image} was built but its last step has no `{ROOTFS_OUTPUT}` output")]
    NoRootfs { image: String },
    #[error(
        "unknown kernel `{name}`: it is neither recorded nor in the kernel catalog; record a \
         kernel of your own with `banger kernel import {name} --from DIR`, or use one banger \
         knows ({}) — catalog kernels are fetched with `banger kernel pull NAME`",
        .known.join(", ")
    )]
    UnknownKernel { name: String, known: Vec<String> },
    #[error("the kernel catalog is empty; pass --kernel")]
    NoDefaultKernel,
    #[error("the plan of image {image} built no image")]
    NothingBuilt { image: String },
    #[error("step {step} of the plan")]
    UnreadableParams {
        step: String,
        #[source]
        source: ParamError,
    },
    #[error("{} is not a file", path.display())]
    NotAFile { path: std::path::PathBuf },
    #[error(transparent)]
    Publish(Box<crate::ops::publish::PublishError>),
    #[error("{} is not an ext4 image (no ext2/3/4 superblock magic)", path.display())]
    NotExt4 { path: std::path::PathBuf },
    #[error("cannot read {}", path.display())]
    ReadFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] crate::sources::SourceError),
    #[error("cannot read the stored output {path}")]
    ReadOutput {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {image} has no kernel; register it again with --kernel")]
    NoKernel { image: String },
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
}

impl From<OciError> for ImageError {
    fn from(error: OciError) -> ImageError {
        ImageError::Oci(Box::new(error))
    }
}

impl crate::error::Classify for ImageError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            ImageError::UnknownImage { .. }
            | ImageError::UnknownKernel { .. }
            | ImageError::NoDefaultKernel
            | ImageError::NotAFile { .. }
            | ImageError::NotExt4 { .. }
            | ImageError::NoKernel { .. }
            | ImageError::ReadFile { .. } => ErrorClass::User,
            ImageError::Bundle(error) => error.class(),
            ImageError::Source(error) => error.class(),
            ImageError::Oci(error) => error.class(),
            ImageError::Plan(error) => error.class(),
            ImageError::Engine(error) => error.class(),
            ImageError::State(error) => error.class(),
            ImageError::Publish(error) => error.class(),
            ImageError::Store(_)
            | ImageError::NoRootfs { .. }
            | ImageError::NothingBuilt { .. }
            | ImageError::UnreadableParams { .. }
            | ImageError::ReadOutput { .. } => ErrorClass::Environment,
        }
    }
}

impl ImageError {
    /// True when the details were already reported as engine events.
    pub fn already_reported(&self) -> bool {
        matches!(self, ImageError::Engine(error) if error.already_reported())
    }
}

/// The job of `banger image import-tar`: `import.file` of the spooled tar at `path` (keyed by
/// its `digest`) → the image with banger's agent.
pub fn import_tar_job(
    path: &Path,
    digest: &str,
    size: Option<ByteSize>,
    name: &str,
    kernel: String,
) -> Result<ImageJob, ImageError> {
    let mut plan = Plan::new();
    let import = plan.add_step(
        crate::plan::StepNode::new(
            "import/tar",
            crate::steps::IMPORT_FILE.name,
            crate::steps::IMPORT_FILE.version,
            crate::plan::kinds::ImportFileParams {
                digest: digest.to_owned(),
                name: "rootfs.tar".to_owned(),
            }
            .to_params(),
            crate::steps::IMPORT_FILE.resource,
        )
        .hint("path", path.to_string_lossy())
        .summary(format!("{} ({digest})", path.display())),
    )?;
    let build = lower::image_with_agent(
        &mut plan,
        "import/rootfs",
        &[import],
        size.map(ByteSize::bytes),
    )?;
    plan.add_target(build);
    Ok(ImageJob {
        name: name.to_owned(),
        source: format!("tar:{digest}"),
        distro: None,
        kernel,
        plan,
        finals: BTreeMap::from([("import".to_owned(), build)]),
        pushed: None,
    })
}

/// The job of `banger image register`: the ext4 image at `rootfs` brought into the store as
/// it is (checked to be a file with the ext2/3/4 magic), keyed by its content.
pub fn register_job(
    rootfs: &Path,
    name: &str,
    kernel: String,
    distro: Option<String>,
) -> Result<ImageJob, ImageError> {
    use std::io::{Read, Seek, SeekFrom};
    let read_error = |source| ImageError::ReadFile {
        path: rootfs.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(rootfs).map_err(read_error)?;
    if !metadata.is_file() {
        return Err(ImageError::NotAFile {
            path: rootfs.to_owned(),
        });
    }
    let mut magic = [0u8; 2];
    let mut file = std::fs::File::open(rootfs).map_err(read_error)?;
    file.seek(SeekFrom::Start(1024 + 56)).map_err(read_error)?;
    if file.read_exact(&mut magic).is_err() || magic != [0x53, 0xef] {
        return Err(ImageError::NotExt4 {
            path: rootfs.to_owned(),
        });
    }
    let digest = crate::sources::content_digest(rootfs)?;
    let absolute = std::fs::canonicalize(rootfs).map_err(read_error)?;
    let mut plan = Plan::new();
    let import = plan.add_step(
        crate::plan::StepNode::new(
            "import/rootfs",
            crate::steps::IMPORT_FILE.name,
            crate::steps::IMPORT_FILE.version,
            crate::plan::kinds::ImportFileParams {
                digest,
                name: ROOTFS_OUTPUT.to_owned(),
            }
            .to_params(),
            crate::steps::IMPORT_FILE.resource,
        )
        .hint("path", absolute.to_string_lossy())
        .summary(format!("{}", absolute.display())),
    )?;
    plan.add_target(import);
    Ok(ImageJob {
        name: name.to_owned(),
        source: format!("file:{}", absolute.display()),
        distro,
        kernel,
        plan,
        finals: BTreeMap::from([("import".to_owned(), import)]),
        pushed: None,
    })
}

/// What `banger image pull NAME` means.
#[derive(Debug, Clone)]
pub enum PullSource {
    Catalog(ImageEntry),
    Oci(ImageReference),
}

/// A catalog name wins; anything else must parse as an OCI reference.
pub fn classify_pull(query: &str, catalogs: &Catalogs) -> Result<PullSource, ImageError> {
    if let Some(entry) = catalogs.image(query) {
        return Ok(PullSource::Catalog(entry.clone()));
    }
    ImageReference::parse(query)
        .map(PullSource::Oci)
        .map_err(|source| ImageError::UnknownImage {
            query: query.to_owned(),
            catalog: catalogs
                .images
                .iter()
                .map(|entry| entry.name.clone())
                .collect(),
            source: Box::new(source),
        })
}

/// Resolves the OCI references of `images` that `lock` does not pin (every one with
/// `update`) and records the pins. Returns `(reference, manifest digest)` of each resolved.
pub async fn pin_references(
    images: &[ImageSpec],
    lock: &mut Lock,
    client: &RegistryClient,
    update: bool,
) -> Result<Vec<(String, String)>, ImageError> {
    let mut resolved = Vec::new();
    for image in images {
        let ImageSource::Oci { reference } = &image.from else {
            continue;
        };
        if !update && lock.pinned(reference).is_some() {
            continue;
        }
        if resolved.iter().any(|(done, _)| done == reference) {
            continue;
        }
        let parsed = ImageReference::parse(reference)?;
        let image = client.resolve(&parsed).await?;
        lock.insert(image.pin(reference));
        resolved.push((reference.clone(), image.manifest_digest.clone()));
    }
    Ok(resolved)
}

/// What every recipe step of `plan` installed, from this run's outputs or, for steps the run
/// did not need (a stored image hit first), from the store. A recipe whose record is gone
/// (evicted) is left out: there is nothing to compare.
pub fn resolved_recipes(
    plan: &Plan,
    report: &RunReport,
    store: &crate::store::Store,
) -> Result<Vec<crate::lock::LockedRecipe>, ImageError> {
    let keys = plan.definition_keys()?;
    let mut resolved = Vec::new();
    for node in plan.node_indices() {
        let step = plan.node(node);
        if step.kind != crate::steps::RECIPE_MMDEBSTRAP.name {
            continue;
        }
        let outputs = match report.outputs.get(&step.id) {
            Some(outputs) => outputs.outputs.clone(),
            None => match store.lookup(crate::store::KeyKind::Definition, &keys[node.index()])? {
                crate::store::Lookup::Hit(record) => record.outputs,
                crate::store::Lookup::Miss(_) => continue,
            },
        };
        let Some(list) = outputs.get(crate::steps::mmdebstrap::PACKAGES_OUTPUT) else {
            continue;
        };
        let scratch = store.scratch()?;
        let path = scratch
            .path()
            .join(crate::steps::mmdebstrap::PACKAGES_OUTPUT);
        store.materialize(list, &path)?;
        let text = std::fs::read_to_string(&path).map_err(|source| ImageError::ReadOutput {
            path: path.clone(),
            source,
        })?;
        let recipe = RecipeParams::from_params(&step.params).map_err(|source| {
            ImageError::UnreadableParams {
                step: step.id.clone(),
                source,
            }
        })?;
        let locked = crate::lock::LockedRecipe {
            recipe: recipe.label(),
            packages: text.lines().map(str::to_owned).collect(),
        };
        if !resolved.contains(&locked) {
            resolved.push(locked);
        }
    }
    Ok(resolved)
}

/// The OCI references of `images` that `lock` does not pin.
pub fn unpinned_references(images: &[ImageSpec], lock: &Lock) -> Vec<String> {
    let mut unpinned: Vec<String> = images
        .iter()
        .filter_map(|image| match &image.from {
            ImageSource::Oci { reference } if lock.pinned(reference).is_none() => {
                Some(reference.clone())
            }
            _ => None,
        })
        .collect();
    unpinned.dedup();
    unpinned
}

/// One built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub name: String,
    /// Definition key of the image's last step.
    pub step_key: Key,
    pub rootfs: OutputRef,
}

/// The plan that builds `images` (in dependency order) and the final step of each.
pub fn plan_images(
    images: &[ImageSpec],
    lock: &Lock,
    catalogs: &Catalogs,
) -> Result<(Plan, BTreeMap<String, petgraph::graph::NodeIndex>), ImageError> {
    Ok(lower::lower_images(
        images,
        std::path::Path::new("."),
        lock,
        catalogs,
    )?)
}

/// Runs a plan from [`plan_images`] and returns each image's result.
pub async fn build(
    engine: &Engine,
    plan: &Plan,
    finals: &BTreeMap<String, petgraph::graph::NodeIndex>,
    project: &str,
    reporter: &dyn Reporter,
    options: RunOptions,
) -> Result<(RunReport, Vec<BuiltImage>), ImageError> {
    let keys = plan.definition_keys()?;
    let report = engine.run(plan, project, reporter, options).await?;
    let mut built = Vec::new();
    for (name, node) in finals {
        let step = plan.node(*node);
        let rootfs = report
            .outputs
            .get(&step.id)
            .and_then(|outputs| outputs.outputs.get(ROOTFS_OUTPUT))
            .cloned()
            .ok_or_else(|| ImageError::NoRootfs {
                image: name.clone(),
            })?;
        built.push(BuiltImage {
            name: name.clone(),
            step_key: keys[node.index()],
            rootfs,
        });
    }
    Ok((report, built))
}

/// The GC root name of an image.
pub fn root_name(image: &str) -> String {
    format!("image:{image}")
}

/// Checks that `kernel` names a kernel banger can provide.
pub fn check_kernel(
    kernel: &str,
    catalogs: &Catalogs,
    recorded: &[String],
) -> Result<(), ImageError> {
    if catalogs.kernel(kernel).is_some() || recorded.iter().any(|name| name == kernel) {
        return Ok(());
    }
    let mut known: Vec<String> = catalogs
        .kernels
        .iter()
        .map(|entry| entry.name.clone())
        .chain(recorded.iter().cloned())
        .collect();
    known.sort();
    known.dedup();
    Err(ImageError::UnknownKernel {
        name: kernel.to_owned(),
        known,
    })
}

/// Records an image and pins its step as a GC root. With `replace`, an image of the same name
/// is overwritten (its old root goes with it).
pub fn register(
    state: &State,
    store: &Store,
    record: &ImageRecord,
    replace: bool,
) -> Result<(), ImageError> {
    state.put_image(record, replace)?;
    store.set_root(&root_name(&record.name), &[record.step_key])?;
    Ok(())
}

/// Forgets an image and unpins it; its bytes go at the next `banger cache gc` unless another
/// image or step still uses them.
pub fn remove(state: &State, store: &Store, name: &str) -> Result<ImageRecord, ImageError> {
    let record = state.require_image(name)?;
    state.remove_image(name)?;
    store.set_root(&root_name(name), &[])?;
    Ok(record)
}

/// What pulling (or building and recording) an image runs against. Holds no open [`State`]:
/// see the module doc.
#[derive(Debug, Clone, Copy)]
pub struct PullEnv<'a> {
    /// An engine over `store` with every executor ([`crate::steps::engine`]).
    pub engine: &'a Engine,
    /// The registry client pins references with; the same the engine's executors use.
    pub services: &'a Services,
    pub catalogs: &'a Catalogs,
    pub store: &'a Store,
    /// Where the state database is (opened when needed).
    pub state_dir: &'a Path,
}

/// `banger image pull QUERY [--name] [--kernel] [--size]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePullRequest {
    /// A catalog name or an OCI reference.
    pub query: String,
    /// Record it under this name [default: the catalog name, or the reference as given].
    pub name: Option<String>,
    /// The kernel it boots with [default: the catalog entry's, else the default kernel].
    pub kernel: Option<String>,
    /// A fixed ext4 size instead of content × headroom.
    pub size: Option<ByteSize>,
}

/// A pulled image, recorded and pinned.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub record: ImageRecord,
    /// The engine's report: nothing in `ran` means the image was up to date.
    pub report: RunReport,
    /// `REF resolved to DIGEST` for an OCI reference; `None` for a catalog image.
    pub resolved: Option<String>,
}

/// What a pull or import builds and how its result is recorded.
#[derive(Debug, Clone)]
pub struct ImageJob {
    /// The name it is recorded under.
    pub name: String,
    /// Where it came from, for `image list` (`catalog:NAME (bundle)`, `oci:REF@DIGEST`, …).
    pub source: String,
    pub distro: Option<String>,
    /// The kernel it boots with (checked to exist).
    pub kernel: String,
    pub plan: Plan,
    /// The image's last step; the first entry is the image recorded.
    pub finals: BTreeMap<String, NodeIndex>,
    /// A banger image pulled from a registry: its reference and label, which the built
    /// image must match ([`crate::ops::publish::check_pulled`]).
    pub pushed: Option<(String, crate::ops::publish::ImageLabel)>,
}

/// A pull resolved and planned, not yet run.
#[derive(Debug, Clone)]
pub struct PreparedPull {
    pub job: ImageJob,
    /// `REF resolved to DIGEST` for an OCI reference; `None` for a catalog image.
    pub resolved: Option<String>,
}

/// Pulls an image: [`prepare_pull`], then [`build_and_record`]. Engine events go to
/// `reporter`; `options` carries the cancellation token.
pub async fn pull(
    env: &PullEnv<'_>,
    request: &ImagePullRequest,
    reporter: &dyn Reporter,
    options: RunOptions,
) -> Result<PulledImage, ImageError> {
    let PreparedPull { job, resolved } = prepare_pull(env, request).await?;
    let (record, report) = build_and_record(env, &job, reporter, options).await?;
    Ok(PulledImage {
        record,
        report,
        resolved,
    })
}

/// The first half of [`pull`]: a catalog name or OCI reference ([`classify_pull`]), its
/// kernel checked, an OCI reference pinned to its manifest digest (the one network call), and
/// the plan that builds it. Nothing runs and nothing is recorded.
pub async fn prepare_pull(
    env: &PullEnv<'_>,
    request: &ImagePullRequest,
) -> Result<PreparedPull, ImageError> {
    let catalogs = env.catalogs;
    match classify_pull(&request.query, catalogs)? {
        PullSource::Catalog(entry) => {
            let kernel = request
                .kernel
                .clone()
                .unwrap_or_else(|| entry.kernel_ref.clone());
            check_kernel(&kernel, catalogs, &recorded_kernels(env.state_dir)?)?;
            let spec = ImageSpec {
                name: entry.name.clone(),
                from: ImageSource::Catalog {
                    name: entry.name.clone(),
                },
                size: request.size,
                kernel: kernel.clone(),
                provision: Vec::new(),
            };
            let (plan, finals) = plan_images(&[spec], &Lock::default(), catalogs)?;
            let how = match (entry.prefer, &entry.bundle) {
                (Prefer::Bundle, Some(_)) => "bundle",
                _ => "recipe",
            };
            let job = ImageJob {
                name: request.name.clone().unwrap_or_else(|| entry.name.clone()),
                source: format!("catalog:{} ({how})", entry.name),
                distro: Some(entry.distro.clone()),
                kernel,
                plan,
                finals,
                pushed: None,
            };
            Ok(PreparedPull {
                job,
                resolved: None,
            })
        }
        PullSource::Oci(reference) => {
            let kernel = default_kernel(catalogs, request.kernel.as_deref(), env.state_dir)?;
            let spec = ImageSpec {
                name: request.query.clone(),
                from: ImageSource::Oci {
                    reference: request.query.clone(),
                },
                size: request.size,
                kernel: kernel.clone(),
                provision: Vec::new(),
            };
            let mut lock = Lock::default();
            let pinned = pin_references(
                std::slice::from_ref(&spec),
                &mut lock,
                &env.services.registry,
                true,
            )
            .await?;
            let digest = pinned
                .first()
                .map(|(_, digest)| digest.clone())
                .unwrap_or_default();
            let name = request
                .name
                .clone()
                .unwrap_or_else(|| request.query.clone());
            let pin = lock
                .pinned(&request.query)
                .expect("the reference was just pinned");
            let pushed = crate::ops::publish::banger_image(&env.services.registry, pin)
                .await
                .map_err(|error| ImageError::Publish(Box::new(error)))?;
            if let Some(label) = pushed {
                // An image banger pushed: its own layers and ext4 params, its own kernel
                // when this host has it.
                let kernel = match (&request.kernel, &label.kernel) {
                    (None, Some(pushed_kernel))
                        if check_kernel(
                            pushed_kernel,
                            catalogs,
                            &recorded_kernels(env.state_dir)?,
                        )
                        .is_ok() =>
                    {
                        pushed_kernel.clone()
                    }
                    _ => kernel,
                };
                let (plan, rootfs) =
                    crate::ops::publish::plan_pull(&name, &request.query, pin, &label)
                        .map_err(|error| ImageError::Publish(Box::new(error)))?;
                let job = ImageJob {
                    name: name.clone(),
                    source: format!("oci:{reference}@{digest} (pushed by banger)"),
                    distro: label.distro.clone(),
                    kernel,
                    plan,
                    finals: BTreeMap::from([(name, rootfs)]),
                    pushed: Some((request.query.clone(), label)),
                };
                return Ok(PreparedPull {
                    job,
                    resolved: Some(format!(
                        "{reference} resolved to {digest}, an image pushed by banger"
                    )),
                });
            }
            let (plan, finals) = plan_images(&[spec], &lock, catalogs)?;
            let job = ImageJob {
                name,
                source: format!("oci:{reference}@{digest}"),
                distro: None,
                kernel,
                plan,
                finals,
                pushed: None,
            };
            Ok(PreparedPull {
                job,
                resolved: Some(format!("{reference} resolved to {digest}")),
            })
        }
    }
}

/// Runs `job`'s plan (as project `image:NAME`) and records the image it built under
/// `job.name`, replacing an image of that name, pinned as a GC root.
pub async fn build_and_record(
    env: &PullEnv<'_>,
    job: &ImageJob,
    reporter: &dyn Reporter,
    options: RunOptions,
) -> Result<(ImageRecord, RunReport), ImageError> {
    let project = format!("image:{}", job.name);
    let (report, built) = build(
        env.engine,
        &job.plan,
        &job.finals,
        &project,
        reporter,
        options,
    )
    .await?;
    let image = built
        .into_iter()
        .next()
        .ok_or_else(|| ImageError::NothingBuilt {
            image: job.name.clone(),
        })?;
    if let Some((reference, label)) = &job.pushed {
        crate::ops::publish::check_pulled(reference, label, &image.rootfs.integrity)
            .map_err(|error| ImageError::Publish(Box::new(error)))?;
    }
    let record = ImageRecord {
        name: job.name.clone(),
        source: job.source.clone(),
        distro: job.distro.clone(),
        arch: "x86_64".into(),
        kernel_ref: Some(job.kernel.clone()),
        rootfs_integrity: image.rootfs.integrity,
        rootfs_size: image.rootfs.size,
        step_key: image.step_key,
        created_ms: now_ms(),
    };
    register(&State::open(env.state_dir)?, env.store, &record, true)?;
    Ok((record, report))
}

/// The kernel an image boots with: `chosen`, else the kernel catalog's first; either way one
/// that is in the catalog or recorded.
pub fn default_kernel(
    catalogs: &Catalogs,
    chosen: Option<&str>,
    state_dir: &Path,
) -> Result<String, ImageError> {
    let kernel = match chosen {
        Some(kernel) => kernel.to_owned(),
        None => catalogs
            .kernels
            .first()
            .map(|entry| entry.name.clone())
            .ok_or(ImageError::NoDefaultKernel)?,
    };
    check_kernel(&kernel, catalogs, &recorded_kernels(state_dir)?)?;
    Ok(kernel)
}

/// The names of the kernels recorded in the state database (imported or pulled).
fn recorded_kernels(state_dir: &Path) -> Result<Vec<String>, ImageError> {
    Ok(State::open(state_dir)?
        .kernels()?
        .into_iter()
        .map(|kernel| kernel.name)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon runs pulls in `tokio::spawn`: their futures must be `Send`. Checked at
    /// compile time; never called.
    #[allow(dead_code)]
    fn pull_futures_are_send(env: &PullEnv<'_>, request: &ImagePullRequest, job: &ImageJob) {
        fn send<T: Send>(_: &T) {}
        let reporter = crate::engine::NullReporter;
        send(&pull(env, request, &reporter, RunOptions::default()));
        send(&prepare_pull(env, request));
        send(&build_and_record(
            env,
            job,
            &reporter,
            RunOptions::default(),
        ));
        send(&crate::ops::kernels::pull(
            env,
            "k",
            false,
            &reporter,
            RunOptions::default(),
        ));
    }
}

/// What [`export_bundle`] wrote: the bundle's digest and size, and the distro and kernel its
/// manifest names (for a catalog entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedBundle {
    pub distro: String,
    pub kernel: String,
    pub sha256: String,
    pub size: u64,
}

/// Writes the recorded image `record` as a golden bundle at `out` (a `.tar.zst` of its
/// `rootfs.ext4` and a manifest); `distro` overrides what the record or the image's
/// `/etc/os-release` says.
pub fn export_bundle(
    store: &Store,
    record: &crate::state::ImageRecord,
    out: &std::path::Path,
    distro: Option<&str>,
) -> Result<ExportedBundle, ImageError> {
    let kernel = record
        .kernel_ref
        .clone()
        .ok_or_else(|| ImageError::NoKernel {
            image: record.name.clone(),
        })?;
    let staging = store.scratch()?;
    let rootfs = staging.path().join("rootfs.ext4");
    store.materialize(
        &crate::store::OutputRef {
            integrity: record.rootfs_integrity.clone(),
            size: record.rootfs_size,
        },
        &rootfs,
    )?;
    let distro = match (distro, record.distro.as_deref()) {
        (Some(distro), _) | (None, Some(distro)) => distro.to_owned(),
        (None, None) => crate::bundle::image_distro(&rootfs),
    };
    let manifest =
        crate::bundle::BundleManifest::image(&record.name, &distro, &record.arch, &kernel);
    let written = crate::bundle::write_bundle(
        &manifest,
        &[("rootfs.ext4".to_owned(), rootfs)],
        out,
        &mut |_, _| {},
        &tokio_util::sync::CancellationToken::new(),
    )?;
    Ok(ExportedBundle {
        distro,
        kernel,
        sha256: written.sha256,
        size: written.size,
    })
}
