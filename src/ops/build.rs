//! `banger build`: a Bangerfile's images, built, checked against the lock and recorded.
//!
//! Lifecycle of [`build`]:
//! 1. Refuse what cannot be done before anything is written: `--update` with `--locked`, a
//!    `--rebuild` that names no step.
//! 2. Pin what the lock does not pin yet (OCI references, resolved by the registry; with
//!    `--frozen` none is asked and an unpinned reference is an error) and give the lock its
//!    `SOURCE_DATE_EPOCH`. A lock that must change is written, or, with `--locked`, an error
//!    naming it.
//! 3. Plan the images (plus a `bundle.write` step with `--bundle`) and run the plan.
//! 4. Compare what each recipe installed with the lock: record it, or with `--locked` refuse
//!    other versions (nothing is recorded then).
//! 5. Record each image as `PROJECT/IMAGE` (a GC root), and copy the stored bundle out.
//!
//! [`step_log`] is `banger build --log STEP`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::engine::{Reporter, RunOptions};
use crate::error::{Classify, ErrorClass};
use crate::lock::{Lock, LockError};
use crate::ops::images::{self, BuiltImage, ImageError};
use crate::ops::project::{self, Project, ProjectError};
use crate::plan::kinds::BundleWriteParams;
use crate::plan::{PlanError, lower};
use crate::state::{ImageRecord, State, StateError};
use crate::steps::Services;
use crate::steps::bundle_steps::BUNDLE_OUTPUT;
use crate::store::{OutputRef, Store, StoreError, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("--update moves the pins in Bangerfile.lock, which --locked and --frozen forbid")]
    UpdateWhileLocked,
    #[error("--{flag} {query}")]
    UnknownStep {
        flag: &'static str,
        query: String,
        #[source]
        source: PlanError,
    },
    #[error(
        "{lock} pins no digest for {references}; --frozen does not resolve tags: run `banger \
         build` without it to pin them",
        lock = .lock.display()
    )]
    Unpinned { lock: PathBuf, references: String },
    #[error(
        "{lock} needs updating ({changes}), which --locked forbids; run `banger build` \
         without it",
        lock = .lock.display()
    )]
    LockWouldChange { lock: PathBuf, changes: String },
    #[error(
        "{lock} needs updating: {differences}; --locked forbids it (nothing was recorded: run \
         `banger build` without --locked to accept these versions)",
        lock = .lock.display()
    )]
    RecipeVersions { lock: PathBuf, differences: String },
    #[error("{step} has not run yet: nothing is stored")]
    NothingStored { step: String },
    #[error(
        "{step} keeps no log: only `run` provisioning steps do, once they have run as they are \
         defined now"
    )]
    NoLog { step: String },
    #[error("cannot read the step log {}", path.display())]
    ReadLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} produced no {output}")]
    MissingOutput { step: String, output: &'static str },
    #[error("cannot write the bundle {}", path.display())]
    WriteBundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Project(#[from] ProjectError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl Classify for BuildError {
    fn class(&self) -> ErrorClass {
        match self {
            BuildError::UpdateWhileLocked
            | BuildError::UnknownStep { .. }
            | BuildError::Unpinned { .. }
            | BuildError::LockWouldChange { .. }
            | BuildError::RecipeVersions { .. }
            | BuildError::NothingStored { .. }
            | BuildError::NoLog { .. } => ErrorClass::User,
            BuildError::ReadLog { .. }
            | BuildError::WriteBundle { .. }
            | BuildError::MissingOutput { .. } => ErrorClass::Environment,
            BuildError::Project(error) => error.class(),
            BuildError::Image(error) => error.class(),
            BuildError::Lock(error) => error.class(),
            BuildError::Plan(error) => error.class(),
            BuildError::Store(error) => error.class(),
            BuildError::State(error) => error.class(),
        }
    }
}

/// What `banger build` was asked.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    /// Move every pin to what its tag points at now.
    pub update: bool,
    /// Fail instead of changing the lock.
    pub locked: bool,
    /// `locked`, and never ask a registry what a tag points at.
    pub frozen: bool,
    /// Steps to run again even if stored (ids or suffixes, as `banger graph` shows them).
    pub rebuild: Vec<String>,
    /// Also write the sandbox image's bundle here.
    pub bundle: Option<PathBuf>,
}

/// Where a build works.
#[derive(Debug)]
pub struct BuildEnv<'a> {
    pub store: &'a Store,
    pub state: &'a State,
    pub services: &'a Services,
}

/// What a build made.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// References pinned by this build, with their digests.
    pub pinned: Vec<(String, String)>,
    pub built: Vec<BuiltImage>,
    pub bundle: Option<WrittenBundle>,
}

/// A bundle copied out of the store.
#[derive(Debug, Clone)]
pub struct WrittenBundle {
    pub path: PathBuf,
    pub params: BundleWriteParams,
    pub distro: String,
    pub sha256: String,
    pub size: u64,
}

/// Checks what can be checked before anything is written (step 1 of the module note).
pub fn check_request(project: &Project, request: &BuildRequest) -> Result<(), BuildError> {
    if (request.locked || request.frozen) && request.update {
        return Err(BuildError::UpdateWhileLocked);
    }
    // The pins below do not rename steps other than an unpinned image's layer fetches.
    let (plan, _) = project.plan_images()?;
    for query in &request.rebuild {
        plan.find(query).map_err(|source| BuildError::UnknownStep {
            flag: "rebuild",
            query: query.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Builds `project`'s images as `request` says (the lifecycle in the module note). `notes`
/// receives what is worth a line (`pinned REF to DIGEST`).
pub async fn build(
    env: &BuildEnv<'_>,
    mut project: Project,
    request: &BuildRequest,
    reporter: &dyn Reporter,
    notes: &(dyn Fn(String) + Sync),
    mut options: RunOptions,
) -> Result<BuildOutcome, BuildError> {
    check_request(&project, request)?;
    let locked = request.locked || request.frozen;

    // 2. Pins and the epoch.
    let before = project.lock.clone();
    let mut pinned = Vec::new();
    if request.frozen {
        let unpinned = images::unpinned_references(&project.spec.images, &project.lock);
        if !unpinned.is_empty() {
            return Err(BuildError::Unpinned {
                lock: project.lock_path(),
                references: unpinned.join(", "),
            });
        }
    } else {
        pinned = images::pin_references(
            &project.spec.images,
            &mut project.lock,
            &env.services.registry,
            request.update,
        )
        .await?;
        for (reference, digest) in &pinned {
            notes(format!("pinned {reference} to {digest}"));
        }
    }
    if project.lock.source_date_epoch.is_none() {
        project.lock.source_date_epoch = Some(crate::lock::DEFAULT_SOURCE_DATE_EPOCH);
    }
    if project.lock != before {
        if locked {
            return Err(BuildError::LockWouldChange {
                lock: project.lock_path(),
                changes: lock_changes(&before, &project.lock).join("; "),
            });
        }
        project.lock.save(&project.lock_path())?;
    }

    // 3. Plan and run.
    let (mut plan, finals) = project.plan_images()?;
    let bundle_step = match &request.bundle {
        Some(_) => {
            let sandbox = project
                .spec
                .image(&project.spec.sandbox_image)
                .expect("a validated spec has its sandbox image");
            let params = BundleWriteParams {
                name: format!("{}/{}", project.spec.name, project.spec.sandbox_image),
                arch: "x86_64".into(),
                kernel_ref: sandbox.kernel.clone(),
            };
            let step = lower::add_bundle(
                &mut plan,
                &project.spec.sandbox_image,
                finals[&project.spec.sandbox_image],
                &params,
            )?;
            plan.add_target(step);
            Some((step, params))
        }
        None => None,
    };
    for query in &request.rebuild {
        let node = plan.find(query).map_err(|source| BuildError::UnknownStep {
            flag: "rebuild",
            query: query.clone(),
            source,
        })?;
        options.rebuild.insert(plan.node(node).id.clone());
    }
    let engine = crate::steps::engine(env.store, env.services);
    let project_id = project::project_id(&project.spec);
    let (report, built) =
        images::build(&engine, &plan, &finals, &project_id, reporter, options).await?;

    // 4. What recipes installed, against the lock.
    let resolved = images::resolved_recipes(&plan, &report, env.store)?;
    let mut lock = project.lock.clone();
    let mut differences = Vec::new();
    for recipe in resolved {
        match lock.recipe(&recipe.recipe) {
            Some(old) if old.packages == recipe.packages => continue,
            Some(old) => differences.push(format!(
                "recipe `{}` installed other versions than the lock records ({})",
                recipe.recipe,
                package_changes(&old.packages, &recipe.packages)
            )),
            None => differences.push(format!(
                "recipe `{}` has no package versions recorded",
                recipe.recipe
            )),
        }
        lock.insert_recipe(recipe);
    }
    if !differences.is_empty() {
        if locked {
            return Err(BuildError::RecipeVersions {
                lock: project.lock_path(),
                differences: differences.join("; "),
            });
        }
        lock.save(&project.lock_path())?;
    }

    // 5. Record, and copy the bundle out.
    for image in &built {
        let spec = project
            .spec
            .image(&image.name)
            .expect("built images come from the spec");
        let record = ImageRecord {
            name: format!("{}/{}", project.spec.name, image.name),
            source: format!(
                "bangerfile:{}#{}",
                project.spec.source_file.display(),
                image.name
            ),
            distro: None,
            arch: "x86_64".into(),
            kernel_ref: Some(spec.kernel.clone()),
            rootfs_integrity: image.rootfs.integrity.clone(),
            rootfs_size: image.rootfs.size,
            step_key: image.step_key,
            created_ms: now_ms(),
        };
        images::register(env.state, env.store, &record, true)?;
    }
    let bundle = match (&request.bundle, bundle_step) {
        (Some(out), Some((step, params))) => {
            let id = &plan.node(step).id;
            let stored = report
                .outputs
                .get(id)
                .and_then(|outputs| outputs.outputs.get(BUNDLE_OUTPUT))
                .ok_or_else(|| BuildError::MissingOutput {
                    step: id.clone(),
                    output: BUNDLE_OUTPUT,
                })?;
            let sha256 = copy_out(env.store, stored, out)?;
            let distro = crate::bundle::read_manifest(out)
                .ok()
                .and_then(|manifest| manifest.distro)
                .unwrap_or_else(|| "unknown".into());
            Some(WrittenBundle {
                path: out.clone(),
                params,
                distro,
                sha256,
                size: stored.size,
            })
        }
        _ => None,
    };
    Ok(BuildOutcome {
        pinned,
        built,
        bundle,
    })
}

/// A step's kept log (`banger build --log STEP`).
#[derive(Debug, Clone)]
pub struct StepLog {
    pub step: String,
    pub path: PathBuf,
    pub text: Vec<u8>,
}

/// The kept log of the step `query` names in `project`'s images, as the step is defined now.
/// `store` is `None` when none exists yet.
pub fn step_log(
    project: &Project,
    store: Option<&Store>,
    query: &str,
) -> Result<StepLog, BuildError> {
    let (plan, _) = project.plan_images()?;
    let node = plan.find(query).map_err(|source| BuildError::UnknownStep {
        flag: "log",
        query: query.to_owned(),
        source,
    })?;
    let step = plan.node(node).id.clone();
    let key = plan.definition_keys()?[node.index()];
    let Some(store) = store else {
        return Err(BuildError::NothingStored { step });
    };
    let path = store.step_log_path(&key);
    match std::fs::read(&path) {
        Ok(text) => Ok(StepLog { step, path, text }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Err(BuildError::NoLog { step })
        }
        Err(source) => Err(BuildError::ReadLog { path, source }),
    }
}

/// Copies a stored bundle to `out` (through a temp file beside it, renamed into place:
/// never a half-written bundle); returns its sha256.
fn copy_out(store: &Store, bundle: &OutputRef, out: &Path) -> Result<String, BuildError> {
    let write_error = |source| BuildError::WriteBundle {
        path: out.to_owned(),
        source,
    };
    let dir = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let temp = tempfile::Builder::new()
        .prefix(".banger-bundle-")
        .tempfile_in(dir)
        .map_err(write_error)?;
    let linked = temp.path().with_extension("stored");
    store.materialize(bundle, &linked)?;
    let copied = std::fs::copy(&linked, temp.path());
    let _ = std::fs::remove_file(&linked);
    copied.map_err(write_error)?;
    std::fs::set_permissions(
        temp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .map_err(write_error)?;
    temp.persist(out)
        .map_err(|error| write_error(error.error))?;
    bundle
        .integrity
        .parse::<ssri::Integrity>()
        .map(|integrity| integrity.to_hex().1)
        .map_err(|error| write_error(std::io::Error::other(error.to_string())))
}

/// `a 1 → 2, b removed, c 3 added`, at most five of them.
fn package_changes(old: &[String], new: &[String]) -> String {
    let split = |entry: &String| {
        let (name, version) = entry.split_once('=').unwrap_or((entry, ""));
        (name.to_owned(), version.to_owned())
    };
    let old: BTreeMap<String, String> = old.iter().map(split).collect();
    let new: BTreeMap<String, String> = new.iter().map(split).collect();
    let mut changes = Vec::new();
    for (name, version) in &new {
        match old.get(name) {
            Some(before) if before != version => {
                changes.push(format!("{name} {before} → {version}"))
            }
            None => changes.push(format!("{name} {version} added")),
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|name| !new.contains_key(*name)) {
        changes.push(format!("{name} removed"));
    }
    let total = changes.len();
    changes.truncate(5);
    if total > 5 {
        changes.push(format!("and {} more", total - 5));
    }
    changes.join(", ")
}

/// What changed between two locks, for `--locked`'s error.
fn lock_changes(before: &Lock, after: &Lock) -> Vec<String> {
    let mut changes = Vec::new();
    if before.source_date_epoch != after.source_date_epoch {
        changes.push("no source_date_epoch yet".to_owned());
    }
    for pin in &after.oci {
        match before.pinned(&pin.reference) {
            None => changes.push(format!("{} is not pinned", pin.reference)),
            Some(old) if old != pin => changes.push(format!(
                "{} moved from {} to {}",
                pin.reference, old.manifest_digest, pin.manifest_digest
            )),
            Some(_) => {}
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_changes_name_what_moved_and_stop_after_five() {
        let old = ["a=1", "b=1", "c=1"].map(String::from);
        let new = ["a=2", "c=1", "d=1"].map(String::from);
        assert_eq!(package_changes(&old, &new), "a 1 → 2, d 1 added, b removed");
        let many_old: Vec<String> = (0..8).map(|n| format!("p{n}=1")).collect();
        let many_new: Vec<String> = (0..8).map(|n| format!("p{n}=2")).collect();
        let text = package_changes(&many_old, &many_new);
        assert!(text.ends_with("and 3 more"), "{text}");
    }
}
