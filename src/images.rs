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

use std::collections::BTreeMap;

use crate::catalog::{Catalogs, ImageEntry};
use crate::engine::{Engine, EngineError, Reporter, RunOptions, RunReport};
use crate::key::Key;
use crate::lock::Lock;
use crate::oci::{ImageReference, OciError, RegistryClient};
use crate::plan::{Plan, PlanError, lower};
use crate::spec::{ImageSource, ImageSpec};
use crate::state::{ImageRecord, State, StateError};
use crate::store::{OutputRef, Store, StoreError};

/// The output every image step ends with.
pub const ROOTFS_OUTPUT: &str = "rootfs.ext4";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "`{query}` is neither an image in the catalog ({}) nor a valid OCI reference: {source}",
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
}

impl From<OciError> for ImageError {
    fn from(error: OciError) -> ImageError {
        ImageError::Oci(Box::new(error))
    }
}

impl ImageError {
    /// True when the details were already reported as engine events.
    pub fn already_reported(&self) -> bool {
        matches!(self, ImageError::Engine(error) if error.already_reported())
    }
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
