//! Virtual machines: accelerator choice, the QEMU microvm backend and its control protocol,
//! the Firecracker backend (API client, process, jailer), vsock through
//! `vhost-device-vsock`, the `VmmBackend` trait over both (`backend.rs`), per-VM disks
//! (`storage.rs`), memory snapshots and restores (`snapshot.rs`), processes that outlive the
//! daemon (`process.rs`), the serial agent's multiplexer run beside a VM (`agent_mux.rs`),
//! and throwaway boots that reach the guest agent (`boot.rs`: `kernel test`, builder VMs).
//! The lifecycle of named VMs (create, start, stop, delete) is the daemon's, on top of these.

pub mod accel;
pub mod agent_mux;
pub mod backend;
pub mod boot;
pub mod firecracker;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod shape;
pub mod snapshot;
pub mod storage;
pub mod vsock;

use std::path::Path;
use std::time::Duration;

/// Why a just-started helper process (QEMU, the vsock daemon) never became ready.
#[derive(Debug)]
pub(crate) enum StartupFailure {
    /// It exited first, with this status and stderr.
    Exited {
        status: String,
        stderr: String,
    },
    /// `socket` did not appear in time.
    TimedOut,
    Wait(std::io::Error),
}

/// Where a helper process's stderr goes: a pipe, read if it fails at start-up, or (for a
/// process meant to outlive this one) appended to a log, whose new part is read instead.
pub(crate) struct StderrTarget {
    log: Option<(std::path::PathBuf, u64)>,
}

impl StderrTarget {
    /// Opens `log` for appending (or plans a pipe when `None`); the `Stdio` goes to the child.
    pub(crate) fn open(log: Option<&Path>) -> std::io::Result<(std::process::Stdio, StderrTarget)> {
        let Some(path) = log else {
            return Ok((std::process::Stdio::piped(), StderrTarget { log: None }));
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| {
                std::io::Error::new(error.kind(), format!("{}: {error}", path.display()))
            })?;
        let start = file.metadata().map_or(0, |meta| meta.len());
        let target = StderrTarget {
            log: Some((path.to_owned(), start)),
        };
        Ok((std::process::Stdio::from(file), target))
    }
}

/// Waits until `child` creates `socket`, or exits (its stderr is collected from the pipe or
/// the log of `stderr`), or `timeout` passes.
pub(crate) async fn wait_for_socket(
    child: &mut tokio::process::Child,
    socket: &Path,
    timeout: Duration,
    stderr_target: &StderrTarget,
) -> Result<(), StartupFailure> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(StartupFailure::Wait)? {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = pipe.read_to_string(&mut stderr).await;
            }
            if let Some((log, start)) = &stderr_target.log {
                stderr = log_since(log, *start);
            }
            return Err(StartupFailure::Exited {
                status: status.to_string(),
                stderr,
            });
        }
        if socket.exists() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StartupFailure::TimedOut);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a log file gained since it was `from` bytes long (a process's stderr, for an error).
pub(crate) fn log_since(log: &Path, from: u64) -> String {
    std::fs::read(log)
        .map(|bytes| {
            let start = (from as usize).min(bytes.len());
            String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
        })
        .unwrap_or_default()
}
