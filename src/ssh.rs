//! banger's SSH identity and the `ssh` command lines that reach a VM.
//!
//! One key pair per installation (`<state>/ssh/id_ed25519`, private key 0600 in a 0700
//! directory), made by the system's `ssh-keygen` the first time it is needed; its public key
//! is what banger installs in guests. Each VM gets its own `known_hosts` file, so a VM
//! re-created under an old name never trips a host-key warning in the user's own
//! `~/.ssh/known_hosts`, and nothing banger does touches that file.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(
        "`ssh-keygen` is not installed; install OpenSSH's client (`apt-get install \
         openssh-client`)"
    )]
    NoKeygen,
    #[error("{argv} failed ({status}): {stderr}")]
    Keygen {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("cannot prepare {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// banger's key pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshIdentity {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
}

impl SshIdentity {
    /// Where the key pair lives under the state directory.
    pub fn in_state_dir(state_dir: &Path) -> SshIdentity {
        let dir = state_dir.join("ssh");
        SshIdentity {
            private_key: dir.join("id_ed25519"),
            public_key: dir.join("id_ed25519.pub"),
        }
    }

    /// The key pair, generated if missing. Permissions are (re)set every time: ssh refuses
    /// a private key others can read.
    pub fn ensure(state_dir: &Path) -> Result<SshIdentity, SshError> {
        let identity = SshIdentity::in_state_dir(state_dir);
        let dir = identity
            .private_key
            .parent()
            .expect("the key lives in a directory")
            .to_owned();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SshError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        if !(identity.private_key.is_file() && identity.public_key.is_file()) {
            // A half-made pair (one file of two) is replaced whole; generate next to it and
            // rename, so an interrupted run never leaves a key without its other half.
            let staging = dir.join(format!(".id_ed25519.{}", std::process::id()));
            let staging_pub = PathBuf::from(format!("{}.pub", staging.display()));
            let _ = std::fs::remove_file(&staging);
            let _ = std::fs::remove_file(&staging_pub);
            if let Err(error) = keygen_ed25519(&staging, "banger") {
                let _ = std::fs::remove_file(&staging);
                let _ = std::fs::remove_file(&staging_pub);
                return Err(error);
            }
            std::fs::rename(&staging_pub, &identity.public_key)
                .map_err(io(&identity.public_key))?;
            std::fs::rename(&staging, &identity.private_key).map_err(io(&identity.private_key))?;
        }
        std::fs::set_permissions(
            &identity.private_key,
            std::fs::Permissions::from_mode(0o600),
        )
        .map_err(io(&identity.private_key))?;
        Ok(identity)
    }

    /// The public key line, for a guest's `authorized_keys`.
    pub fn public_key_line(&self) -> Result<String, SshError> {
        std::fs::read_to_string(&self.public_key)
            .map(|text| text.trim().to_owned())
            .map_err(|source| SshError::Io {
                path: self.public_key.clone(),
                source,
            })
    }
}

/// `ssh-keygen` making an ed25519 pair without a passphrase at `path` and `path.pub`.
fn keygen_ed25519(path: &Path, comment: &str) -> Result<(), SshError> {
    let argv = [
        "ssh-keygen".to_owned(),
        "-q".to_owned(),
        "-t".to_owned(),
        "ed25519".to_owned(),
        "-N".to_owned(),
        String::new(),
        "-C".to_owned(),
        comment.to_owned(),
        "-f".to_owned(),
        path.display().to_string(),
    ];
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                SshError::NoKeygen
            } else {
                SshError::Io {
                    path: path.to_owned(),
                    source: error,
                }
            }
        })?;
    if !output.status.success() {
        return Err(SshError::Keygen {
            argv: argv.join(" "),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// A new ed25519 host key for a guest, made here: `ssh-keygen` in a guest under TCG costs
/// about 0.4 s, on the host a few milliseconds. Returns (private key file, public key line).
pub fn new_host_key() -> Result<(String, String), SshError> {
    let dir = tempfile::tempdir().map_err(|source| SshError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let path = dir.path().join("ssh_host_ed25519_key");
    keygen_ed25519(&path, "")?;
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| SshError::Io {
            path: path.to_owned(),
            source,
        })
    };
    let private = read(&path)?;
    let public = read(&path.with_extension("pub"))?;
    Ok((private, public.trim().to_owned()))
}

/// Authorizes banger's key for root in a guest, through its agent: `/root/.ssh` made if
/// missing and `authorized_keys` (0600) replaced atomically.
pub async fn authorize_in_guest(
    channel: &mut crate::guest::GuestChannel,
    identity: &SshIdentity,
) -> Result<(), AuthorizeError> {
    use crate::guest::PutFileRequest;
    let line = identity.public_key_line()? + "\n";
    let request = PutFileRequest {
        path: "/root/.ssh/authorized_keys".into(),
        mode: 0o600,
        uid: 0,
        gid: 0,
        size: line.len() as u64,
        // The agent makes /root/.ssh (0755, root's: sshd's StrictModes accepts it); no
        // shell is spawned, which under TCG costs a good part of a second.
        create_parents: true,
    };
    channel.put_file(&request, line.as_bytes()).await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error(transparent)]
    Key(#[from] SshError),
    #[error("cannot install banger's SSH key in the guest")]
    Guest(#[from] crate::guest::GuestError),
}

/// Where and as whom to reach a VM's sshd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// This VM's own `known_hosts`.
    pub known_hosts: PathBuf,
}

/// The `ssh` argv for `target` with banger's identity: no prompts (new host keys are
/// accepted once and pinned in the VM's own file), only banger's key offered, and `command`
/// run instead of a shell when not empty. `batch` also forbids any interactive question,
/// for commands run on the user's behalf.
pub fn ssh_argv(
    identity: &SshIdentity,
    target: &SshTarget,
    command: &[String],
    batch: bool,
) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "ssh".into(),
        "-i".into(),
        identity.private_key.display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "IdentityAgent=none".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", target.known_hosts.display()),
        "-o".into(),
        "StrictHostKeyChecking=accept-new".into(),
        // The file is the VM's alone: hashing its one entry hides nothing.
        "-o".into(),
        "HashKnownHosts=no".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-p".into(),
        target.port.to_string(),
    ];
    if batch {
        argv.extend([
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ConnectTimeout=10".into(),
        ]);
    }
    argv.push(format!("{}@{}", target.user, target.host));
    if !command.is_empty() {
        argv.push("--".into());
        argv.extend(command.iter().cloned());
    }
    argv
}

/// The remote command line for `ssh`, which joins its arguments with spaces for the remote
/// shell: one argument is a shell line and goes as it is (`vm ssh NAME -- 'ls | wc -l'`);
/// several are an argv, each quoted so that it arrives as one word
/// (`vm ssh NAME -- sh -c 'exit 7'`).
pub fn remote_command(argv: &[String]) -> Vec<String> {
    if argv.len() <= 1 {
        return argv.to_vec();
    }
    vec![
        argv.iter()
            .map(|word| shell_quote(word))
            .collect::<Vec<_>>()
            .join(" "),
    ]
}

/// `word` as one POSIX shell word.
pub(crate) fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&byte));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_key_pair_is_made_once_and_kept_private() {
        if crate::env::find_program("ssh-keygen").is_none() {
            eprintln!("skipped: ssh-keygen is unavailable");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let identity = SshIdentity::ensure(state.path()).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().mode() & 0o777;
        assert_eq!(mode(&identity.private_key), 0o600);
        assert_eq!(mode(identity.private_key.parent().unwrap()), 0o700);
        let line = identity.public_key_line().unwrap();
        assert!(
            line.starts_with("ssh-ed25519 ") && line.ends_with(" banger"),
            "{line}"
        );
        let private = std::fs::read(&identity.private_key).unwrap();
        // Loosened permissions are put back; the pair itself is kept.
        std::fs::set_permissions(
            &identity.private_key,
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let again = SshIdentity::ensure(state.path()).unwrap();
        assert_eq!(std::fs::read(&again.private_key).unwrap(), private);
        assert_eq!(mode(&again.private_key), 0o600);
        // Half a pair is replaced whole.
        std::fs::remove_file(&again.public_key).unwrap();
        let remade = SshIdentity::ensure(state.path()).unwrap();
        assert_ne!(std::fs::read(&remade.private_key).unwrap(), private);
        assert!(remade.public_key.is_file());
        let leftovers: Vec<_> = std::fs::read_dir(remade.private_key.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    }

    #[test]
    fn ssh_command_lines_never_prompt_and_use_the_vms_known_hosts() {
        let identity = SshIdentity::in_state_dir(Path::new("/state"));
        let target = SshTarget {
            host: "127.0.0.1".into(),
            port: 40022,
            user: "root".into(),
            known_hosts: "/state/vms/dev/known_hosts".into(),
        };
        assert_eq!(
            ssh_argv(&identity, &target, &["uname".into(), "-r".into()], true).join(" "),
            "ssh -i /state/ssh/id_ed25519 -o IdentitiesOnly=yes -o IdentityAgent=none \
             -o UserKnownHostsFile=/state/vms/dev/known_hosts \
             -o StrictHostKeyChecking=accept-new -o HashKnownHosts=no -o LogLevel=ERROR -p 40022 \
             -o BatchMode=yes -o ConnectTimeout=10 root@127.0.0.1 -- uname -r"
        );
        let interactive = ssh_argv(&identity, &target, &[], false);
        assert_eq!(interactive.last().unwrap(), "root@127.0.0.1");
        assert!(!interactive.iter().any(|arg| arg == "BatchMode=yes"));
    }

    #[test]
    fn several_words_arrive_as_an_argv_and_one_as_a_shell_line() {
        let words = |items: &[&str]| {
            items
                .iter()
                .map(|item| (*item).to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            remote_command(&words(&["ls | wc -l"])),
            words(&["ls | wc -l"])
        );
        assert_eq!(
            remote_command(&words(&["sh", "-c", "echo it's > /root/x"])),
            words(&["sh -c 'echo it'\\''s > /root/x'"])
        );
        assert_eq!(
            remote_command(&words(&["uname", "-r"])),
            words(&["uname -r"])
        );
        assert_eq!(
            remote_command(&words(&["printf", ""])),
            words(&["printf ''"])
        );
        assert!(remote_command(&[]).is_empty());
    }
}
