//! A project: its Bangerfile, lock file and plan, loaded the same way by every command.
//!
//! 1. [`find_bangerfile`]: `./Bangerfile`, else the nearest one in a parent directory.
//! 2. [`load_plan`]: config defaults → [`crate::bangerfile::load`] → [`Lock::load`] →
//!    [`crate::plan::lower::lower`] → fingerprint the project files steps read → keyed plan.
//! 3. [`project_id`] scopes the store's last-run records to this Bangerfile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use petgraph::graph::NodeIndex;

use crate::bangerfile::{self, BangerfileError, Defaults, ParseContext};
use crate::catalog::Catalogs;
use crate::config::{Config, ConfigError};
use crate::error::{Classify, ErrorClass};
use crate::lock::{self, Lock, LockError};
use crate::plan::{Plan, PlanError, lower};
use crate::sources::{self, SourceError};
use crate::spec::{Spec, VmShape};

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error(
        "no {name} in {dir} or any parent directory; create one (see Bangerfile.example and \
         docs/bangerfile.md) or pass --file PATH",
        name = bangerfile::FILE_NAME,
        dir = .dir.display()
    )]
    NotFound { dir: PathBuf },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bangerfile(#[from] BangerfileError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// `dir/Bangerfile` (returned as the relative `Bangerfile`, so messages stay short), else the
/// nearest one in a parent directory (absolute), like cargo finds Cargo.toml.
pub fn find_bangerfile(dir: &Path) -> Result<PathBuf, ProjectError> {
    if dir.join(bangerfile::FILE_NAME).is_file() {
        return Ok(PathBuf::from(bangerfile::FILE_NAME));
    }
    dir.ancestors()
        .map(|ancestor| ancestor.join(bangerfile::FILE_NAME))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| ProjectError::NotFound {
            dir: dir.to_owned(),
        })
}

/// The defaults a Bangerfile may leave out, with the config's `[vm_defaults]` applied.
pub fn defaults(config: &Config) -> Defaults {
    let builtin = bangerfile::DEFAULT_VM;
    Defaults {
        vm: VmShape {
            vcpu: config.vm_defaults.vcpu.unwrap_or(builtin.vcpu),
            memory: config.vm_defaults.memory.unwrap_or(builtin.memory),
            disk: config.vm_defaults.disk.unwrap_or(builtin.disk),
            network: builtin.network,
        },
        ..Defaults::default()
    }
}

/// A parsed Bangerfile with its lock and the catalogs in force.
#[derive(Debug, Clone)]
pub struct Project {
    pub spec: Spec,
    pub lock: Lock,
    pub catalogs: Catalogs,
}

impl Project {
    /// Parses the Bangerfile and reads its lock file, with the embedded or configured-file
    /// catalogs (see [`Project::load_with`] for URL catalogs).
    pub fn load(file: &Path, config: &Config) -> Result<Project, ProjectError> {
        Project::load_with(file, config, config.catalogs()?)
    }

    /// Parses the Bangerfile and reads its lock file, with the given catalogs.
    pub fn load_with(
        file: &Path,
        config: &Config,
        catalogs: Catalogs,
    ) -> Result<Project, ProjectError> {
        let context = ParseContext::new(&catalogs).with_defaults(defaults(config));
        let spec = bangerfile::load(file, &context)?;
        let lock = Lock::load(&self_lock_path(&spec))?;
        Ok(Project {
            spec,
            lock,
            catalogs,
        })
    }

    /// Where the lock file lives: next to the Bangerfile.
    pub fn lock_path(&self) -> PathBuf {
        self_lock_path(&self.spec)
    }

    /// The whole `banger up` plan, keyed-ready (project files fingerprinted).
    pub fn plan(&self) -> Result<Plan, ProjectError> {
        let mut plan = lower::lower(&self.spec, &self.lock, &self.catalogs)?;
        self.fingerprint(&mut plan)?;
        Ok(plan)
    }

    /// The images alone (`banger build`): each image's last step is a target.
    pub fn plan_images(&self) -> Result<(Plan, BTreeMap<String, NodeIndex>), ProjectError> {
        let (mut plan, finals) = lower::lower_images(
            &self.spec.images,
            &self.spec.project_dir,
            &self.lock,
            &self.catalogs,
        )?;
        self.fingerprint(&mut plan)?;
        Ok((plan, finals))
    }

    fn fingerprint(&self, plan: &mut Plan) -> Result<(), ProjectError> {
        let fingerprints = sources::fingerprint(&self.spec.project_dir, &plan.sources())?;
        plan.resolve_sources(&fingerprints);
        Ok(())
    }
}

fn self_lock_path(spec: &Spec) -> PathBuf {
    spec.project_dir.join(lock::FILE_NAME)
}

/// Parses the Bangerfile, lowers it with its lock file, and replaces the project files its
/// steps read by their content digests, so the plan is ready to key.
pub fn load_plan(file: &Path, config: &Config) -> Result<(Spec, Plan), ProjectError> {
    let project = Project::load(file, config)?;
    let plan = project.plan()?;
    Ok((project.spec, plan))
}

/// Scopes last-run records: the Bangerfile's absolute path, so two checkouts of one project
/// keep separate histories.
pub fn project_id(spec: &Spec) -> String {
    spec.source_file.to_string_lossy().into_owned()
}

impl Classify for ProjectError {
    fn class(&self) -> ErrorClass {
        match self {
            ProjectError::Plan(error) => error.class(),
            ProjectError::NotFound { .. }
            | ProjectError::Config(_)
            | ProjectError::Bangerfile(_)
            | ProjectError::Lock(_)
            | ProjectError::Source(_) => ErrorClass::User,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_bangerfile_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        std::fs::create_dir_all(&nested).unwrap();
        std::fs::write(dir.path().join("a/Bangerfile"), "").unwrap();
        assert_eq!(
            find_bangerfile(&nested).unwrap(),
            dir.path().join("a/Bangerfile")
        );
        assert_eq!(
            find_bangerfile(&dir.path().join("a")).unwrap(),
            Path::new("Bangerfile")
        );
        let error = find_bangerfile(dir.path()).unwrap_err();
        assert!(
            error.to_string().starts_with("no Bangerfile in "),
            "{error}"
        );
    }
}
