//! `banger ssh-config install|uninstall`: `ssh NAME.vm` (and scp, rsync, editors' remote SSH)
//! for every banger VM, through the user's own OpenSSH.
//!
//! banger writes its own file, `CONFIG/banger/ssh_config`, with one `Host *.vm` block whose
//! `ProxyCommand` is `banger vm proxy %h %p`, and adds a marked `Include` of it at the top of
//! `~/.ssh/config` (at the top, since an `Include` after a `Host` line would be conditional on
//! that block). Every path is absolute: ssh expands `~` from the passwd entry, not `$HOME`.
//! Installing twice changes nothing; uninstalling removes exactly the two lines installing
//! added, so the file is byte-identical to what it was. A copy of the user's file is kept
//! beside it before the first change.
//!
//! Host keys: each VM makes its own at its first boot, and ssh pins them on first contact
//! (`accept-new`) in a file per VM name, `STATE/ssh/known_hosts.vm/NAME.vm`, which banger
//! removes when the VM is deleted or recreated (see [`known_hosts_file`]).

use std::io::Write;
use std::path::{Path, PathBuf};

/// The comment line that marks banger's `Include` in `~/.ssh/config`.
pub const MARKER: &str =
    "# Added by `banger ssh-config install` (`banger ssh-config uninstall` removes it):";

#[derive(Debug, thiserror::Error)]
pub enum SshConfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} holds banger's marker line without the `Include` line after it; remove the marker \
         line (or restore {}) and run the command again",
        path.display(),
        backup.display()
    )]
    Damaged { path: PathBuf, backup: PathBuf },
    #[error("`{host}` is not a banger VM name: SSH names of VMs are NAME.vm")]
    NotAVmHost { host: String },
}

impl crate::error::Classify for SshConfigError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            SshConfigError::Damaged { .. } | SshConfigError::NotAVmHost { .. } => {
                crate::error::ErrorClass::User
            }
            _ => crate::error::ErrorClass::Environment,
        }
    }
}

/// Where everything lives, all absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfigPaths {
    /// The user's `~/.ssh/config`.
    pub user_config: PathBuf,
    /// banger's own file, included by the user's.
    pub banger_config: PathBuf,
    /// The banger binary `ProxyCommand` runs.
    pub banger: PathBuf,
    /// banger's SSH key.
    pub identity: PathBuf,
    /// The directory of per-VM known_hosts files.
    pub known_hosts_dir: PathBuf,
}

impl SshConfigPaths {
    /// The paths for the user whose home is `home`, with banger's config file next to
    /// `config_file` and its state in `state_dir`.
    pub fn new(home: &Path, config_file: &Path, state_dir: &Path, banger: &Path) -> Self {
        let config_dir = config_file.parent().unwrap_or(Path::new("/"));
        SshConfigPaths {
            user_config: home.join(".ssh").join("config"),
            banger_config: config_dir.join("ssh_config"),
            banger: banger.to_owned(),
            identity: crate::ssh::SshIdentity::in_state_dir(state_dir).private_key,
            known_hosts_dir: known_hosts_dir(state_dir),
        }
    }

    /// The backup of the user's file made before banger first changes it.
    pub fn backup(&self) -> PathBuf {
        let mut name = self.user_config.as_os_str().to_owned();
        name.push(".banger-backup");
        PathBuf::from(name)
    }

    fn include_line(&self) -> String {
        format!("Include {}", quote(&self.banger_config))
    }
}

/// The directory of the known_hosts files of `NAME.vm` names.
pub fn known_hosts_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh").join("known_hosts.vm")
}

/// The known_hosts file `ssh NAME.vm` pins VM `name`'s host key in; removed with the VM (and
/// when it is made again, since a new VM has new keys).
pub fn known_hosts_file(state_dir: &Path, name: &str) -> PathBuf {
    known_hosts_dir(state_dir).join(format!("{name}.vm"))
}

/// A path as one ssh_config word (quoted when it holds a space).
fn quote(path: &Path) -> String {
    let text = path.display().to_string();
    if text.contains(char::is_whitespace) {
        format!("\"{text}\"")
    } else {
        text
    }
}

/// The text of banger's own ssh_config.
pub fn banger_config_text(paths: &SshConfigPaths) -> String {
    format!(
        "# Written by `banger ssh-config install`: `ssh NAME.vm` reaches banger's VM NAME.\n\
         # Rewritten by every install; `banger ssh-config uninstall` removes it.\n\
         Host *.vm\n\
         \x20   User root\n\
         \x20   ProxyCommand {banger} vm proxy %h %p\n\
         \x20   IdentityFile {identity}\n\
         \x20   IdentitiesOnly yes\n\
         \x20   IdentityAgent none\n\
         \x20   UserKnownHostsFile {known_hosts}/%h\n\
         \x20   StrictHostKeyChecking accept-new\n\
         \x20   HashKnownHosts no\n\
         \x20   LogLevel ERROR\n",
        banger = quote(&paths.banger),
        identity = quote(&paths.identity),
        known_hosts = paths.known_hosts_dir.display(),
    )
}

/// `text` with banger's two lines at the top, or `None` when they are already there.
pub fn with_include(text: &str, include_line: &str) -> Option<String> {
    if has_include(text, include_line) {
        return None;
    }
    Some(format!("{MARKER}\n{include_line}\n{text}"))
}

fn has_include(text: &str, include_line: &str) -> bool {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .windows(2)
        .any(|pair| pair[0] == MARKER && pair[1] == include_line)
}

/// What taking banger's lines out of a file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The file's text without them.
    Removed(String),
    /// They are not there.
    Absent,
    /// The marker line is there without its `Include`: someone edited the file.
    Damaged,
}

/// `text` without banger's two lines, exactly as installing added them.
pub fn without_include(text: &str, include_line: &str) -> Removal {
    let block = format!("{MARKER}\n{include_line}\n");
    if let Some(at) = text.find(&block) {
        let mut rest = String::with_capacity(text.len() - block.len());
        rest.push_str(&text[..at]);
        rest.push_str(&text[at + block.len()..]);
        return Removal::Removed(rest);
    }
    if text.lines().any(|line| line == MARKER) {
        return Removal::Damaged;
    }
    Removal::Absent
}

/// What installing did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Whether `~/.ssh/config` was changed (false: the `Include` was already there).
    pub changed_user_config: bool,
    /// The backup of the user's file, when one was made.
    pub backup: Option<PathBuf>,
}

/// Writes banger's ssh_config and makes `~/.ssh/config` include it.
pub fn install(paths: &SshConfigPaths) -> Result<Installed, SshConfigError> {
    write_atomically(&paths.banger_config, &banger_config_text(paths), 0o644)?;
    create_private_dir(&paths.known_hosts_dir)?;
    let existing = match std::fs::read_to_string(&paths.user_config) {
        Ok(text) => Some(text),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(SshConfigError::Read {
                path: paths.user_config.clone(),
                source,
            });
        }
    };
    let text = existing.clone().unwrap_or_default();
    let include = paths.include_line();
    if text.lines().any(|line| line == MARKER) && !has_include(&text, &include) {
        return Err(SshConfigError::Damaged {
            path: paths.user_config.clone(),
            backup: paths.backup(),
        });
    }
    let Some(updated) = with_include(&text, &include) else {
        return Ok(Installed {
            changed_user_config: false,
            backup: None,
        });
    };
    let backup = match &existing {
        Some(original) => {
            write_atomically(&paths.backup(), original, 0o600)?;
            Some(paths.backup())
        }
        None => None,
    };
    if let Some(dir) = paths.user_config.parent() {
        create_private_dir(dir)?;
    }
    write_atomically(&paths.user_config, &updated, 0o600)?;
    Ok(Installed {
        changed_user_config: true,
        backup,
    })
}

/// Removes banger's lines from `~/.ssh/config` and banger's ssh_config; whether anything was
/// there to remove.
pub fn uninstall(paths: &SshConfigPaths) -> Result<bool, SshConfigError> {
    let mut removed = false;
    match std::fs::read_to_string(&paths.user_config) {
        Ok(text) => match without_include(&text, &paths.include_line()) {
            Removal::Removed(rest) => {
                write_atomically(&paths.user_config, &rest, 0o600)?;
                removed = true;
            }
            Removal::Absent => {}
            Removal::Damaged => {
                return Err(SshConfigError::Damaged {
                    path: paths.user_config.clone(),
                    backup: paths.backup(),
                });
            }
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SshConfigError::Read {
                path: paths.user_config.clone(),
                source,
            });
        }
    }
    match std::fs::remove_file(&paths.banger_config) {
        Ok(()) => removed = true,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SshConfigError::Write {
                path: paths.banger_config.clone(),
                source,
            });
        }
    }
    Ok(removed)
}

/// The VM name of an SSH host name `NAME.vm`.
pub fn vm_name_of_host(host: &str) -> Result<String, SshConfigError> {
    host.strip_suffix(".vm")
        .filter(|name| crate::vm::shape::validate_name(name).is_ok())
        .map(str::to_owned)
        .ok_or_else(|| SshConfigError::NotAVmHost {
            host: host.to_owned(),
        })
}

fn create_private_dir(dir: &Path) -> Result<(), SshConfigError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| SshConfigError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Replaces `path` with `text` through a temporary file beside it, keeping `path` a symlink's
/// target if it is one (dotfile managers link `~/.ssh/config`).
fn write_atomically(path: &Path, text: &str, mode: u32) -> Result<(), SshConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let write_error = |source| SshConfigError::Write {
        path: target.clone(),
        source,
    };
    let dir = target.parent().unwrap_or(Path::new("/"));
    create_private_dir(dir)?;
    // An existing file keeps its mode.
    let mode = std::fs::metadata(&target)
        .map(|metadata| metadata.permissions().mode() & 0o7777)
        .unwrap_or(mode);
    let mut temporary = tempfile::NamedTempFile::new_in(dir).map_err(write_error)?;
    temporary.write_all(text.as_bytes()).map_err(write_error)?;
    temporary.as_file().sync_all().map_err(write_error)?;
    std::fs::set_permissions(temporary.path(), std::fs::Permissions::from_mode(mode))
        .map_err(write_error)?;
    temporary
        .persist(&target)
        .map_err(|error| write_error(error.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INCLUDE: &str = "Include /home/me/.config/banger/ssh_config";

    #[test]
    fn the_include_goes_first_once_and_comes_out_byte_for_byte() {
        for original in [
            "",
            "Host work\n    User me\n",
            "Host work\n    User me",
            "\n\n# only a comment\n",
        ] {
            let installed = with_include(original, INCLUDE).unwrap();
            assert!(installed.starts_with(&format!("{MARKER}\n{INCLUDE}\n")));
            assert_eq!(with_include(&installed, INCLUDE), None, "installed twice");
            assert_eq!(
                without_include(&installed, INCLUDE),
                Removal::Removed(original.to_owned())
            );
            assert_eq!(without_include(original, INCLUDE), Removal::Absent);
        }
    }

    #[test]
    fn a_marker_without_its_include_is_refused() {
        let edited = format!("{MARKER}\nHost x\n");
        assert_eq!(without_include(&edited, INCLUDE), Removal::Damaged);
    }

    #[test]
    fn vm_host_names_end_in_dot_vm_and_hold_a_valid_name() {
        assert_eq!(vm_name_of_host("dev.vm").unwrap(), "dev");
        for bad in ["dev", "dev.vm.evil.com", ".vm", "-x.vm", "a b.vm"] {
            assert!(vm_name_of_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn install_and_uninstall_leave_the_users_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let paths = SshConfigPaths::new(
            &home,
            &home.join(".config/banger/config.toml"),
            &home.join(".local/state/banger"),
            Path::new("/usr/bin/banger"),
        );
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        let original = "Host work\n    User me\n";
        std::fs::write(&paths.user_config, original).unwrap();
        let first = install(&paths).unwrap();
        assert!(first.changed_user_config);
        assert_eq!(
            std::fs::read_to_string(paths.backup()).unwrap(),
            original,
            "the backup"
        );
        let second = install(&paths).unwrap();
        assert!(!second.changed_user_config);
        let config = std::fs::read_to_string(&paths.banger_config).unwrap();
        assert!(config.contains("ProxyCommand /usr/bin/banger vm proxy %h %p"));
        assert!(uninstall(&paths).unwrap());
        assert_eq!(
            std::fs::read_to_string(&paths.user_config).unwrap(),
            original
        );
        assert!(!paths.banger_config.exists());
        assert!(!uninstall(&paths).unwrap(), "nothing left to remove");
    }
}
