//! Where banger keeps things on the host.
//!
//! Resolved once at start-up from `BANGER_*` overrides, then the XDG base directories, then
//! `$HOME` defaults (see [`crate::env`]). Nothing is created here; each owner creates its own
//! directory when it first writes, so read-only commands (`banger graph`) leave no trace.
//!
//! | what            | override             | default                                   |
//! |-----------------|----------------------|-------------------------------------------|
//! | cache (store)   | `BANGER_CACHE_DIR`   | `$XDG_CACHE_HOME/banger`, `~/.cache/banger` |
//! | state           | `BANGER_STATE_DIR`   | `$XDG_STATE_HOME/banger`, `~/.local/state/banger` |
//! | config file     | `BANGER_CONFIG`      | `$XDG_CONFIG_HOME/banger/config.toml`, `~/.config/banger/config.toml` |
//! | runtime         | `BANGER_RUNTIME_DIR` | `$XDG_RUNTIME_DIR/banger`; root: `/run/banger`; others: `/tmp/banger-<uid>` |
//!
//! The runtime directory holds the daemon's socket and lock and each running VM's sockets and
//! pid records, so whoever controls it controls what banger signals and talks to. Its owners
//! call [`ensure_runtime_dir`] before using it, which refuses one that another user could
//! have planted (in `/tmp`, anyone can create `banger-<uid>` first).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::env;

#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error(
        "cannot find a home directory: set HOME, or set {} and {}",
        env::BANGER_CACHE_DIR,
        env::BANGER_STATE_DIR
    )]
    NoHome,
}

/// The memory snapshots' directory under the cache directory ([`Paths::snapshots_dir`]).
pub const SNAPSHOTS_DIR: &str = "snapshots-v1";

/// The directories and files of one banger installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub cache_dir: PathBuf,
    pub state_dir: PathBuf,
    pub config_file: PathBuf,
    pub runtime_dir: PathBuf,
}

impl Paths {
    /// Resolves every path from the environment.
    pub fn from_env() -> Result<Paths, PathsError> {
        Paths::resolve(&|name| env::var_path(name), nix::unistd::getuid().as_raw())
    }

    /// Resolves every path through `var` (a stand-in for the environment in tests).
    pub fn resolve(var: &dyn Fn(&str) -> Option<PathBuf>, uid: u32) -> Result<Paths, PathsError> {
        let home = var(crate::env::HOME);
        let under_home = |relative: &str| home.as_ref().map(|home| home.join(relative));
        let xdg = |name: &str, fallback: &str| {
            var(name)
                .filter(|path| path.is_absolute())
                .or_else(|| under_home(fallback))
        };
        let cache_dir = match var(env::BANGER_CACHE_DIR) {
            Some(dir) => dir,
            None => xdg(crate::env::XDG_CACHE_HOME, ".cache")
                .ok_or(PathsError::NoHome)?
                .join("banger"),
        };
        let state_dir = match var(env::BANGER_STATE_DIR) {
            Some(dir) => dir,
            None => xdg(crate::env::XDG_STATE_HOME, ".local/state")
                .ok_or(PathsError::NoHome)?
                .join("banger"),
        };
        let config_file = match var(env::BANGER_CONFIG) {
            Some(file) => file,
            None => xdg(crate::env::XDG_CONFIG_HOME, ".config")
                .ok_or(PathsError::NoHome)?
                .join("banger")
                .join("config.toml"),
        };
        let runtime_dir = match var(env::BANGER_RUNTIME_DIR) {
            Some(dir) => dir,
            None => match var(crate::env::XDG_RUNTIME_DIR).filter(|path| path.is_absolute()) {
                Some(dir) => dir.join("banger"),
                // Never a name in /tmp for root: another user could create it first.
                None if uid == 0 => PathBuf::from("/run/banger"),
                None => PathBuf::from(format!("/tmp/banger-{uid}")),
            },
        };
        Ok(Paths {
            cache_dir,
            state_dir,
            config_file,
            runtime_dir,
        })
    }

    /// The step store.
    pub fn store_dir(&self) -> PathBuf {
        self.cache_dir.join("store")
    }

    /// Memory snapshots of booted guests (`vm::snapshot::Snapshots`).
    pub fn snapshots_dir(&self) -> PathBuf {
        self.cache_dir.join(SNAPSHOTS_DIR)
    }

    /// The daemon's socket (used from the daemon issue on).
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("banger.sock")
    }
}

/// Why the runtime directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("cannot create the runtime directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the runtime directory {path} is a symbolic link; banger refuses it, since another user \
         may have planted it: remove it, or set {} to a directory of your own",
        env::BANGER_RUNTIME_DIR
    )]
    Symlink { path: PathBuf },
    #[error("the runtime directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "the runtime directory {path} belongs to uid {owner}, not to uid {uid} that runs banger; \
         banger refuses it, since another user may have planted it: remove it, or set {} to a \
         directory of your own",
        env::BANGER_RUNTIME_DIR
    )]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "the runtime directory {path} is writable by other users (mode {mode:o}); banger refuses \
         it, since they may have put files in it: remove it, and banger makes a private one"
    )]
    Writable { path: PathBuf, mode: u32 },
}

/// Creates the runtime directory `dir` (mode 0700) if it is missing, and checks that it is a
/// real directory owned by the effective uid that no one else can write. One that is only
/// readable by others (made by an older banger with the default umask) is made private.
pub fn ensure_runtime_dir(dir: &Path) -> Result<(), RuntimeDirError> {
    let create_error = |source| RuntimeDirError::Create {
        path: dir.to_owned(),
        source,
    };
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(create_error)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(create_error(error)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(create_error)?;
    let path = dir.to_owned();
    if meta.file_type().is_symlink() {
        return Err(RuntimeDirError::Symlink { path });
    }
    if !meta.is_dir() {
        return Err(RuntimeDirError::NotADirectory { path });
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(RuntimeDirError::NotOwned {
            path,
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(RuntimeDirError::Writable { path, mode });
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(create_error)?;
    }
    Ok(())
}

/// Shortens `path` for display: `~/x` when under `home`.
pub fn display_path(path: &Path, home: Option<&Path>) -> String {
    match home.and_then(|home| path.strip_prefix(home).ok()) {
        Some(rest) if !rest.as_os_str().is_empty() => format!("~/{}", rest.display()),
        _ => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(vars: &[(&str, &str)]) -> Result<Paths, PathsError> {
        let vars: HashMap<String, PathBuf> = vars
            .iter()
            .map(|(name, value)| ((*name).to_owned(), PathBuf::from(value)))
            .collect();
        Paths::resolve(&|name| vars.get(name).cloned(), 1000)
    }

    #[test]
    fn defaults_follow_home() {
        let paths = resolve(&[("HOME", "/home/u")]).unwrap();
        assert_eq!(paths.cache_dir, Path::new("/home/u/.cache/banger"));
        assert_eq!(paths.state_dir, Path::new("/home/u/.local/state/banger"));
        assert_eq!(
            paths.config_file,
            Path::new("/home/u/.config/banger/config.toml")
        );
        assert_eq!(paths.runtime_dir, Path::new("/tmp/banger-1000"));
    }

    #[test]
    fn xdg_variables_win_over_home_and_relative_ones_are_ignored() {
        let paths = resolve(&[
            ("HOME", "/home/u"),
            ("XDG_CACHE_HOME", "/xdg/cache"),
            ("XDG_STATE_HOME", "relative/state"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ])
        .unwrap();
        assert_eq!(paths.cache_dir, Path::new("/xdg/cache/banger"));
        assert_eq!(paths.state_dir, Path::new("/home/u/.local/state/banger"));
        assert_eq!(paths.runtime_dir, Path::new("/run/user/1000/banger"));
    }

    #[test]
    fn banger_overrides_win_over_everything() {
        let paths = resolve(&[
            ("HOME", "/home/u"),
            ("XDG_CACHE_HOME", "/xdg/cache"),
            ("BANGER_CACHE_DIR", "/c"),
            ("BANGER_STATE_DIR", "/s"),
            ("BANGER_CONFIG", "/etc/b.toml"),
            ("BANGER_RUNTIME_DIR", "/r"),
        ])
        .unwrap();
        assert_eq!(
            paths,
            Paths {
                cache_dir: "/c".into(),
                state_dir: "/s".into(),
                config_file: "/etc/b.toml".into(),
                runtime_dir: "/r".into(),
            }
        );
    }

    #[test]
    fn root_never_falls_back_to_tmp() {
        let vars: HashMap<String, PathBuf> = [("HOME".to_owned(), PathBuf::from("/root"))].into();
        let paths = Paths::resolve(&|name| vars.get(name).cloned(), 0).unwrap();
        assert_eq!(paths.runtime_dir, Path::new("/run/banger"));
    }

    #[test]
    fn a_runtime_dir_is_made_private_and_a_planted_one_is_refused() {
        let root = tempfile::tempdir().unwrap();
        // Missing: made, mode 0700, parents too.
        let fresh = root.path().join("a/b/banger");
        ensure_runtime_dir(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        ensure_runtime_dir(&fresh).unwrap();
        // Readable by others (an older banger's umask): tightened.
        let readable = root.path().join("readable");
        std::fs::create_dir(&readable).unwrap();
        std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_runtime_dir(&readable).unwrap();
        assert_eq!(std::fs::metadata(&readable).unwrap().mode() & 0o7777, 0o700);
        // Writable by others: refused, left as it is.
        let writable = root.path().join("writable");
        std::fs::create_dir(&writable).unwrap();
        std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = ensure_runtime_dir(&writable).unwrap_err();
        assert!(
            matches!(error, RuntimeDirError::Writable { mode: 0o777, .. }),
            "{error}"
        );
        assert!(error.to_string().contains(&writable.display().to_string()));
        // A symlink, even to a private directory of ours: refused.
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(matches!(
            ensure_runtime_dir(&link),
            Err(RuntimeDirError::Symlink { .. })
        ));
        // A file: refused.
        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            ensure_runtime_dir(&file),
            Err(RuntimeDirError::NotADirectory { .. })
        ));
    }

    #[test]
    fn a_runtime_dir_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let planted = root.path().join("banger-0");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&planted)
            .unwrap();
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
        let error = ensure_runtime_dir(&planted).unwrap_err();
        assert!(
            matches!(
                error,
                RuntimeDirError::NotOwned {
                    owner: 65534,
                    uid: 0,
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("BANGER_RUNTIME_DIR"), "{error}");
    }

    #[test]
    fn no_home_is_a_clear_error() {
        let error = resolve(&[]).unwrap_err();
        assert!(error.to_string().contains("set HOME"), "{error}");
    }

    #[test]
    fn display_path_abbreviates_home() {
        let home = Path::new("/home/u");
        assert_eq!(
            display_path(Path::new("/home/u/.cache/banger"), Some(home)),
            "~/.cache/banger"
        );
        assert_eq!(display_path(Path::new("/tmp/x"), Some(home)), "/tmp/x");
    }
}
