//! vsock for QEMU without `/dev/vhost-vsock`: the `vhost-device-vsock` daemon.
//!
//! QEMU's in-kernel `vhost-vsock-device` needs `/dev/vhost-vsock`, which hosts like this one
//! lack. `vhost-device-vsock` is a vhost-user backend instead: QEMU connects to its `socket`
//! (and shares guest memory with it through a memfd), and host programs reach guest ports
//! through its `uds-path` with Firecracker's hybrid vsock handshake (`CONNECT <port>\n` →
//! `OK <n>\n`), so one client serves both VMMs. One daemon serves one VM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The guest's vsock context id; each daemon serves one guest, so it never has to differ.
pub const GUEST_CID: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(
        "`vhost-device-vsock` is not installed (looked for `{binary}`); install it with \
         `cargo install --locked vhost-device-vsock`, point {var} at it, or use the serial \
         transport"
    , var = crate::env::BANGER_VHOST_DEVICE_VSOCK)]
    NotInstalled { binary: String },
    #[error("cannot start {argv}")]
    Spawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{argv} exited at start-up ({status}):\n{stderr}")]
    EarlyExit {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("{argv} did not create {socket} within {seconds} s")]
    NoSocket {
        argv: String,
        socket: PathBuf,
        seconds: u64,
    },
    #[error("cannot wait for vhost-device-vsock")]
    Wait(#[source] std::io::Error),
}

/// The daemon's binary: `$BANGER_VHOST_DEVICE_VSOCK`, else `vhost-device-vsock` on `PATH`
/// or in cargo's install directory (where `cargo install` puts it).
pub fn find_binary() -> Option<PathBuf> {
    if let Some(path) = crate::env::var_path(crate::env::BANGER_VHOST_DEVICE_VSOCK) {
        return Some(path);
    }
    crate::env::find_program("vhost-device-vsock").or_else(|| {
        let cargo_home = crate::env::var_path(crate::env::CARGO_HOME)
            .or_else(|| crate::env::var_path(crate::env::HOME).map(|home| home.join(".cargo")))?;
        let candidate = cargo_home.join("bin/vhost-device-vsock");
        candidate.is_file().then_some(candidate)
    })
}

/// A running `vhost-device-vsock`; killed when dropped, unless detached.
#[derive(Debug)]
pub struct VhostVsock {
    child: tokio::process::Child,
    vhost_socket: PathBuf,
    uds_path: PathBuf,
    detached: bool,
}

impl VhostVsock {
    /// Starts the daemon with its sockets in `dir` and waits until QEMU can connect. With
    /// `stderr_log`, its stderr is appended there (so it may outlive this process: see
    /// [`VhostVsock::detach`]); without, it is captured for errors.
    pub async fn spawn(
        binary: &Path,
        dir: &Path,
        stderr_log: Option<&Path>,
    ) -> Result<VhostVsock, VsockError> {
        let vhost_socket = dir.join("vhost-vsock.sock");
        let uds_path = dir.join("vsock.sock");
        let argv = [
            binary.to_string_lossy().into_owned(),
            "--guest-cid".to_owned(),
            GUEST_CID.to_string(),
            "--socket".to_owned(),
            vhost_socket.to_string_lossy().into_owned(),
            "--uds-path".to_owned(),
            uds_path.to_string_lossy().into_owned(),
        ];
        let printable = argv.join(" ");
        let (stderr, stderr_target) =
            super::StderrTarget::open(stderr_log).map_err(|source| VsockError::Spawn {
                argv: format!("{printable} (its stderr log)"),
                source,
            })?;
        // Not `kill_on_drop`: `Drop` kills it unless it was detached.
        let mut command = tokio::process::Command::new(binary);
        command
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        if stderr_log.is_none() {
            // Not meant to outlive this process: it goes with it, however it ends.
            super::process::die_with_parent(&mut command);
        }
        let mut child = command.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                VsockError::NotInstalled {
                    binary: binary.to_string_lossy().into_owned(),
                }
            } else {
                VsockError::Spawn {
                    argv: printable.clone(),
                    source,
                }
            }
        })?;
        tracing::info!(program = %binary.display(), pid = child.id(), "process started");
        let seconds = 10;
        match super::wait_for_socket(
            &mut child,
            &vhost_socket,
            Duration::from_secs(seconds),
            &stderr_target,
        )
        .await
        {
            Ok(()) => {}
            Err(super::StartupFailure::Exited { status, stderr }) => {
                return Err(VsockError::EarlyExit {
                    argv: printable,
                    status,
                    stderr,
                });
            }
            Err(super::StartupFailure::TimedOut) => {
                return Err(VsockError::NoSocket {
                    argv: printable,
                    socket: vhost_socket,
                    seconds,
                });
            }
            Err(super::StartupFailure::Wait(error)) => return Err(VsockError::Wait(error)),
        }
        Ok(VhostVsock {
            child,
            vhost_socket,
            uds_path,
            detached: false,
        })
    }

    /// Lets the daemon run on without this handle (spawned with a stderr log); the returned
    /// handle finds it again.
    pub fn detach(mut self) -> Option<super::process::ProcessHandle> {
        self.detached = true;
        self.child.id().and_then(super::process::ProcessHandle::of)
    }

    /// The vhost-user socket QEMU connects to.
    pub fn vhost_socket(&self) -> &Path {
        &self.vhost_socket
    }

    /// The hybrid vsock socket host programs connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Stops the daemon (it exits by itself when QEMU disconnects, but not always at once).
    pub async fn stop(mut self) -> Result<(), VsockError> {
        let _ = self.child.start_kill();
        self.child.wait().await.map_err(VsockError::Wait)?;
        let _ = std::fs::remove_file(&self.vhost_socket);
        let _ = std::fs::remove_file(&self.uds_path);
        Ok(())
    }
}

impl Drop for VhostVsock {
    fn drop(&mut self) {
        if !self.detached {
            let _ = self.child.start_kill();
        }
    }
}
