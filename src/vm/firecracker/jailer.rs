//! Firecracker under its jailer: a chroot per VM, privileges dropped to a uid/gid, optionally
//! a network namespace.
//!
//! The jailer builds `<chroot_base_dir>/<firecracker's file name>/<id>/root`, copies the
//! Firecracker binary in, makes `/dev/kvm`, `/dev/net/tun` and `/dev/userfaultfd` there,
//! pivots into it, drops to `uid:gid` and execs Firecracker, which then sees only the jail.
//! So every path Firecracker is given must exist inside the jail, which banger arranges
//! before the jailer starts:
//! 1. A jail directory left by a dead run is removed (the jailer refuses to `mknod` over its
//!    old device nodes); one whose API socket still answers belongs to a live VM and is an
//!    error.
//! 2. The kernel, initrd, drives and log file are **hard-linked** into the jail root under
//!    fixed names (`/vmlinux`, `/initrd`, `/drive<N>`, `/firecracker.log`): no copy, so
//!    creating a jailed VM costs the same for any image size. This needs the jail on the same
//!    filesystem as the files; across filesystems staging fails and says so.
//! 3. Writable drives and the log file (per-VM files) are `chown`ed to `uid:gid`, which
//!    changes the original file too (it is the same inode). Read-only files keep their owner:
//!    they must be readable by `uid:gid` (the store's files are world-readable).
//! 4. The API socket and the vsock socket are created by Firecracker inside the jail
//!    (`/api.sock`, `/vsock.sock`); their host paths are under the jail root
//!    ([`super::FirecrackerProcess::api_socket`], [`super::FirecrackerProcess::vsock_uds_path`]);
//!    the spec's own socket paths are not used.
//! 5. At stop the whole jail directory goes.
//!
//! Not offered, on purpose: `--daemonize` and `--new-pid-ns` (both put Firecracker outside
//! banger's child process, which is what banger waits on and kills), cgroups (their
//! directories would need cleaning up too; later), and a network namespace's creation
//! (`netns` names an existing one).

use std::path::{Path, PathBuf};

use super::{FirecrackerError, FirecrackerSpec, Logger};

/// How to jail Firecracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerSpec {
    /// The `jailer` binary.
    pub binary: PathBuf,
    /// Firecracker runs as this user and group.
    pub uid: u32,
    pub gid: u32,
    /// The jailer's `--chroot-base-dir` (its default is `/srv/jailer`).
    pub chroot_base_dir: PathBuf,
    /// An existing network namespace to join (`/var/run/netns/NAME`).
    pub netns: Option<PathBuf>,
}

/// The API socket, as Firecracker sees it inside the jail.
pub const API_SOCKET: &str = "/api.sock";
/// The vsock socket, as Firecracker sees it inside the jail.
pub const VSOCK_SOCKET: &str = "/vsock.sock";
const KERNEL: &str = "/vmlinux";
const INITRD: &str = "/initrd";
const LOG: &str = "/firecracker.log";

impl JailerSpec {
    /// `<chroot_base_dir>/<firecracker's file name>/<id>`: everything the jailer creates for
    /// one VM.
    pub fn jail_dir(&self, firecracker: &Path, id: &str) -> PathBuf {
        let exec_name = firecracker
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".to_owned());
        self.chroot_base_dir.join(exec_name).join(id)
    }

    /// The jail's root: `/` for Firecracker.
    pub fn jail_root(&self, firecracker: &Path, id: &str) -> PathBuf {
        self.jail_dir(firecracker, id).join("root")
    }

    /// `jailer … -- --api-sock /api.sock`.
    pub fn argv(&self, firecracker: &Path, id: &str) -> Vec<String> {
        let mut argv = vec![
            self.binary.to_string_lossy().into_owned(),
            "--id".to_owned(),
            id.to_owned(),
            "--exec-file".to_owned(),
            firecracker.to_string_lossy().into_owned(),
            "--uid".to_owned(),
            self.uid.to_string(),
            "--gid".to_owned(),
            self.gid.to_string(),
            "--chroot-base-dir".to_owned(),
            self.chroot_base_dir.to_string_lossy().into_owned(),
        ];
        if let Some(netns) = &self.netns {
            argv.push("--netns".to_owned());
            argv.push(netns.to_string_lossy().into_owned());
        }
        argv.extend([
            "--".to_owned(),
            "--api-sock".to_owned(),
            API_SOCKET.to_owned(),
        ]);
        argv
    }
}

/// The jailer's rule for `--id` (1 to 64 letters, digits and `-`), checked before banger
/// uses the id in a path it may remove.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
}

/// A file to hard-link into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Link {
    pub from: PathBuf,
    /// Absolute path inside the jail.
    pub inside: String,
    /// Per-VM and written by Firecracker: `chown`ed to the jail's user.
    pub owned: bool,
}

/// The spec as Firecracker sees it from inside the jail, and the links that make it true.
/// Pure.
pub(super) fn inside_view(spec: &FirecrackerSpec) -> (FirecrackerSpec, Vec<Link>) {
    let mut view = spec.clone();
    let mut links = Vec::new();
    let mut link = |from: &Path, inside: String, owned: bool| {
        let path = PathBuf::from(&inside);
        links.push(Link {
            from: from.to_path_buf(),
            inside,
            owned,
        });
        path
    };
    view.jailer = None;
    view.api_socket = PathBuf::from(API_SOCKET);
    view.kernel = link(&spec.kernel, KERNEL.to_owned(), false);
    view.initrd = spec
        .initrd
        .as_ref()
        .map(|initrd| link(initrd, INITRD.to_owned(), false));
    for (index, drive) in view.drives.iter_mut().enumerate() {
        drive.path = link(&drive.path, format!("/drive{index}"), !drive.is_read_only);
    }
    if let Some(logger) = &mut view.logger {
        *logger = Logger {
            path: link(&logger.path, LOG.to_owned(), true),
            level: logger.level,
        };
    }
    if let Some(vsock) = &mut view.vsock {
        vsock.uds_path = PathBuf::from(VSOCK_SOCKET);
    }
    (view, links)
}

/// Hard-links every file into `root` (created here), `chown`ing the per-VM ones.
pub(super) fn stage(
    links: &[Link],
    root: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), FirecrackerError> {
    std::fs::create_dir_all(root).map_err(|source| FirecrackerError::Prepare {
        what: "create the jail",
        path: root.to_path_buf(),
        source,
    })?;
    for link in links {
        let to = root.join(link.inside.trim_start_matches('/'));
        std::fs::hard_link(&link.from, &to).map_err(|source| FirecrackerError::Stage {
            from: link.from.clone(),
            to: to.clone(),
            source,
        })?;
        if link.owned {
            crate::privileged::hand_over(&to, uid, gid).map_err(|source| {
                FirecrackerError::Prepare {
                    what: "hand to the jail's user",
                    path: link.from.clone(),
                    source,
                }
            })?;
        }
    }
    Ok(())
}
