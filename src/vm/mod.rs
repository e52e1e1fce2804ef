//! Virtual machines: accelerator choice, the QEMU microvm backend and its control protocol,
//! the Firecracker backend (API client, process, jailer), vsock through
//! `vhost-device-vsock`, and throwaway boots that reach the guest agent. (The backend trait,
//! per-VM storage and the lifecycle arrive with the VM issue.)

pub mod accel;
pub mod backend;
pub mod boot;
pub mod firecracker;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod shape;
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

/// Waits until `child` creates `socket`, or exits (its piped stderr is collected), or
/// `timeout` passes.
pub(crate) async fn wait_for_socket(
    child: &mut tokio::process::Child,
    socket: &Path,
    timeout: Duration,
) -> Result<(), StartupFailure> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(StartupFailure::Wait)? {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = pipe.read_to_string(&mut stderr).await;
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
