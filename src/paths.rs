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
//! | runtime         | `BANGER_RUNTIME_DIR` | `$XDG_RUNTIME_DIR/banger`, `/tmp/banger-<uid>` |

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

    /// The daemon's socket (used from the daemon issue on).
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("banger.sock")
    }
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
