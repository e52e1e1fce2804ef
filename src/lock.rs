//! `Bangerfile.lock`: mutable inputs pinned to digests.
//!
//! An OCI tag can move; a plan keyed by the tag would silently change meaning. The first build
//! resolves each reference and records its manifest digest and layers here; later plans read the
//! lock, so the same Bangerfile plans the same steps (one fetch per pinned layer) until the user
//! asks to update. Lowering reads a [`Lock`] as plain data; reading the file is the caller's I/O.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "Bangerfile.lock";

/// `SOURCE_DATE_EPOCH` of a project whose lock names none, and what `banger build` writes
/// into a new lock: one fixed value (2025-01-01 00:00 UTC), so recipe images built for any
/// project, or outside one, are the same steps and are built once. Times are clamped to it,
/// never raised: files older than it keep their own. A lock may set another.
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_735_689_600;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot read lock file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write lock file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lock file {path} is not valid; delete it to resolve references again")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// Pinned references of one project.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// `SOURCE_DATE_EPOCH` of the project's builds: recipes run with it and later
    /// modification times in provisioning layers are clamped to it, so two builds from one
    /// lock give identical images. Written by the first `banger build`
    /// ([`DEFAULT_SOURCE_DATE_EPOCH`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_date_epoch: Option<u64>,
    #[serde(default)]
    pub oci: Vec<PinnedReference>,
    /// The package versions each recipe installed when it was built.
    #[serde(default, rename = "recipe", skip_serializing_if = "Vec::is_empty")]
    pub recipes: Vec<LockedRecipe>,
}

/// What a distribution recipe resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedRecipe {
    /// The recipe: distribution, suite and requested packages (`debian bookworm: make, git`).
    pub recipe: String,
    /// `name=version` of every installed package, sorted.
    pub packages: Vec<String>,
}

/// One OCI reference pinned to its linux/amd64 manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedReference {
    /// The reference as written in the Bangerfile.
    pub reference: String,
    /// Digest of the linux/amd64 image manifest.
    pub manifest_digest: String,
    /// Digest and size of the image config blob; absent in entries written before banger
    /// recorded them, which then have to be resolved again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_size: Option<u64>,
    pub layers: Vec<PinnedLayer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedLayer {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

impl Lock {
    /// Reads the lock next to a Bangerfile; a missing file is an empty lock.
    pub fn load(path: &Path) -> Result<Lock, LockError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|source| LockError::Parse {
                path: path.to_owned(),
                source,
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Lock::default()),
            Err(source) => Err(LockError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the lock atomically (a reader sees the old file or the new one, never half).
    pub fn save(&self, path: &Path) -> Result<(), LockError> {
        let write_error = |source| LockError::Write {
            path: path.to_owned(),
            source,
        };
        let mut text = String::from(
            "# Written by `banger build`: OCI references pinned to the digests they resolved to,\n\
             # the SOURCE_DATE_EPOCH of builds, the package versions recipes installed.\n\
             # Commit it so every checkout builds the same image; `banger build --update` moves\n\
             # the pins to what the tags point at now, `--locked` refuses any change.\n\n",
        );
        text.push_str(
            &toml::to_string_pretty(self)
                .map_err(|error| write_error(std::io::Error::other(error.to_string())))?,
        );
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(write_error)?;
        std::io::Write::write_all(&mut temp, text.as_bytes()).map_err(write_error)?;
        temp.persist(path)
            .map_err(|error| write_error(error.error))?;
        Ok(())
    }

    /// The project's `SOURCE_DATE_EPOCH`.
    pub fn source_date_epoch(&self) -> u64 {
        self.source_date_epoch.unwrap_or(DEFAULT_SOURCE_DATE_EPOCH)
    }

    pub fn pinned(&self, reference: &str) -> Option<&PinnedReference> {
        self.oci.iter().find(|pin| pin.reference == reference)
    }

    pub fn recipe(&self, recipe: &str) -> Option<&LockedRecipe> {
        self.recipes.iter().find(|locked| locked.recipe == recipe)
    }

    /// Records what a recipe resolved to, replacing an earlier record of it.
    pub fn insert_recipe(&mut self, locked: LockedRecipe) {
        match self
            .recipes
            .iter_mut()
            .find(|old| old.recipe == locked.recipe)
        {
            Some(old) => *old = locked,
            None => self.recipes.push(locked),
        }
    }

    /// Records a pin, replacing any earlier one for the same reference.
    pub fn insert(&mut self, pin: PinnedReference) {
        match self
            .oci
            .iter_mut()
            .find(|old| old.reference == pin.reference)
        {
            Some(old) => *old = pin,
            None => self.oci.push(pin),
        }
    }
}

impl crate::error::Classify for LockError {
    /// A lock is the project's file: unreadable, unwritable or malformed, it is the user's
    /// to fix (or delete).
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::User
    }
}
