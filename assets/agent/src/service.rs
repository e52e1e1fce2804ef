//! What the agent does as a systemd service (`banger-agent.service`), not as PID 1.
//!
//! The unit starts the agent early, before `systemd-tmpfiles-setup`, so that a guest can run
//! commands seconds sooner under emulation. Two things make that safe:
//! - `--empty-tmp`: the agent empties `/tmp` once per boot before it serves anything, which is
//!   what Debian's `D /tmp` line in `tmp.conf` did later in the boot (and raced the first
//!   command: a compile lost its temporary files). banger's image replaces that line with a
//!   plain `d /tmp`, so nothing empties `/tmp` after the agent has started serving.
//! - `Type=notify`: systemd learns the agent is ready only once its sockets listen and `/tmp` is
//!   empty, and `systemd-tmpfiles-setup` (which creates `/tmp/.X11-unix` and friends) is
//!   ordered after that.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

/// The directory `--empty-tmp` empties.
pub const TMP: &str = "/tmp";

/// Exists once this boot's `/tmp` has been emptied: `/run` is a fresh tmpfs at every boot, and
/// a restarted agent (a crash, an upgrade) must not empty `/tmp` under the user's commands.
pub const TMP_EMPTIED_MARKER: &str = "/run/banger-agent/tmp-emptied";

/// What [`empty_once_per_boot`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Emptied {
    /// Entries removed, and the ones that could not be (with why).
    Now { removed: usize, failed: Vec<String> },
    /// The marker says it was done earlier in this boot.
    Already,
}

/// Removes everything in `dir` unless `marker` exists, then creates `marker`. An entry that
/// is a mount point, or has one beneath it (per `mountinfo`, `/proc/self/mountinfo`'s text),
/// is left alone. Not `st_dev`: overlayfs, banger's usual root, reports a file's device as
/// its layer's, unlike its directories'.
pub fn empty_once_per_boot(dir: &Path, marker: &Path, mountinfo: &str) -> io::Result<Emptied> {
    if marker.exists() {
        return Ok(Emptied::Already);
    }
    let entries = std::fs::read_dir(dir)?;
    let mounted = entries_holding_mounts(mountinfo, dir);
    let mut removed = 0;
    let mut failed = Vec::new();
    for entry in entries {
        let entry = entry?;
        if mounted.contains(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        let outcome = std::fs::symlink_metadata(&path).and_then(|metadata| {
            if metadata.is_dir() {
                // Does not follow symbolic links.
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            Ok(true)
        });
        match outcome {
            Ok(true) => removed += 1,
            Ok(false) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => failed.push(format!("{}: {error}", path.display())),
        }
    }
    if let Some(parent) = marker.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(marker, b"")?;
    Ok(Emptied::Now { removed, failed })
}

/// The names of `dir`'s entries that are mount points or hold one, from mountinfo's fifth
/// field (the mount point, with space, tab, newline and backslash octal-escaped).
fn entries_holding_mounts(mountinfo: &str, dir: &Path) -> HashSet<OsString> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter_map(|field| {
            let mount_point = PathBuf::from(OsString::from_vec(unescape_octal(field)));
            let inside = mount_point.strip_prefix(dir).ok()?;
            inside
                .components()
                .next()
                .map(|first| first.as_os_str().to_owned())
        })
        .collect()
}

fn unescape_octal(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let octal = bytes.get(index + 1..index + 4).filter(|digits| {
            bytes[index] == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
        });
        match octal {
            Some(digits) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |value, digit| value.wrapping_mul(8) + (digit - b'0')),
                );
                index += 4;
            }
            None => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    out
}

/// The variable through which systemd names its notification socket. The agent's commands
/// do not inherit it: a program among them that notifies would be refused, with a warning,
/// since the unit only accepts the agent's own (`NotifyAccess=main`).
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells the service manager at `socket` (`$NOTIFY_SOCKET`: a path, or `@name` for the
/// abstract namespace) that the agent is ready.
pub fn notify_ready(socket: &str) -> io::Result<()> {
    let address = match socket.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(socket)?,
    };
    let datagram = UnixDatagram::unbound()?;
    datagram.send_to_addr(b"READY=1", &address)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "banger-agent-service-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tmp_is_emptied_once_per_boot_and_never_through_a_symbolic_link() {
        let root = scratch("empty");
        let tmp = root.join("tmp");
        let outside = root.join("outside");
        std::fs::create_dir_all(tmp.join("build/obj")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(tmp.join("build/obj/a.o"), b"x").unwrap();
        std::fs::write(tmp.join(".hidden"), b"x").unwrap();
        std::fs::write(outside.join("precious"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, tmp.join("link")).unwrap();
        let marker = root.join("run/banger-agent/tmp-emptied");

        let first = empty_once_per_boot(&tmp, &marker, "").unwrap();
        assert_eq!(
            first,
            Emptied::Now {
                removed: 3,
                failed: vec![]
            }
        );
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
        assert!(outside.join("precious").exists(), "followed the link");
        assert!(marker.exists());

        // A restarted agent leaves what the user's commands wrote since.
        std::fs::write(tmp.join("mine"), b"x").unwrap();
        assert_eq!(
            empty_once_per_boot(&tmp, &marker, "").unwrap(),
            Emptied::Already
        );
        assert!(tmp.join("mine").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn mount_points_in_tmp_and_what_holds_them_are_left_alone() {
        let root = scratch("mounts");
        let tmp = root.join("tmp");
        for name in ["mnt", "deep/er", "with space", "plain"] {
            std::fs::create_dir_all(tmp.join(name)).unwrap();
        }
        std::fs::write(tmp.join("mnt/inside"), b"x").unwrap();
        let tmp_text = tmp.to_str().unwrap();
        let mountinfo = format!(
            "22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw\n\
             30 22 0:30 / {tmp_text}/mnt rw shared:9 - tmpfs tmpfs rw\n\
             31 22 0:31 / {tmp_text}/deep/er rw shared:9 - tmpfs tmpfs rw\n\
             32 22 0:32 / {tmp_text}/with\\040space rw shared:9 - tmpfs tmpfs rw\n\
             33 22 0:33 / {tmp_text}x/elsewhere rw shared:9 - tmpfs tmpfs rw\n"
        );
        let marker = root.join("marker");
        assert_eq!(
            empty_once_per_boot(&tmp, &marker, &mountinfo).unwrap(),
            Emptied::Now {
                removed: 1,
                failed: vec![]
            }
        );
        let mut left: Vec<_> = std::fs::read_dir(&tmp)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["deep", "mnt", "with space"]);
        assert!(tmp.join("mnt/inside").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_tmp_is_an_error_and_leaves_no_marker() {
        let root = scratch("missing");
        let marker = root.join("marker");
        assert!(empty_once_per_boot(&root.join("nope"), &marker, "").is_err());
        assert!(!marker.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ready_reaches_the_notify_socket_by_path_and_by_abstract_name() {
        let root = scratch("notify");
        let path = root.join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_ready(path.to_str().unwrap()).unwrap();
        let mut buffer = [0u8; 64];
        let length = listener.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"READY=1");

        let name = format!("banger-agent-test-{}", std::process::id());
        let abstract_listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        notify_ready(&format!("@{name}")).unwrap();
        let length = abstract_listener.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"READY=1");

        assert!(notify_ready(root.join("absent").to_str().unwrap()).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
