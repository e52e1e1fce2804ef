//! The serial agent's multiplexer as a process of its own (`banger daemon serial-mux`).
//!
//! QEMU's chardev for the agent's virtio-serial port takes one connection at a time, so a VM
//! whose agent is on the serial transport could serve one `vm exec`, session or SSH key
//! install at a time. [`crate::guest::SerialMux`] holds that one connection and serves any
//! number of clients on a socket of its own. It runs as a helper process beside the VMM, like
//! `vhost-device-vsock`: the VM outlives the daemon, and its agent must stay reachable when
//! the daemon restarts (a multiplexer inside the daemon would drop the stream mid-frame when
//! the daemon dies). It exits by itself when the VMM goes away.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::process::ProcessHandle;

/// The socket clients of a VM's multiplexer connect to, in its run directory.
pub const SOCKET_NAME: &str = "agent-mux.sock";

/// How long the helper may take to listen.
const STARTUP_SECONDS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum AgentMuxError {
    #[error("cannot start the serial agent's multiplexer: {argv}")]
    Spawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the serial agent's multiplexer {argv} exited at start-up ({status}):\n{stderr}")]
    EarlyExit {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("the serial agent's multiplexer {argv} did not create {socket} within {seconds} s")]
    NoSocket {
        argv: String,
        socket: PathBuf,
        seconds: u64,
    },
    #[error("cannot wait for the serial agent's multiplexer")]
    Wait(#[source] std::io::Error),
    #[error("the serial agent's multiplexer {argv} left no process to follow")]
    NoPid { argv: String },
}

/// The argv that multiplexes `serial` (the VMM's chardev socket) on `listen` (pure).
pub fn argv(program: &Path, serial: &Path, listen: &Path) -> Vec<String> {
    vec![
        program.to_string_lossy().into_owned(),
        "daemon".to_owned(),
        "serial-mux".to_owned(),
        "--serial".to_owned(),
        serial.to_string_lossy().into_owned(),
        "--listen".to_owned(),
        listen.to_string_lossy().into_owned(),
    ]
}

/// Starts `program daemon serial-mux` (`program` is banger) on the chardev socket `serial`,
/// listening on [`SOCKET_NAME`] in `dir`, its stderr appended to `log`; returns once it
/// listens. It is not tied to this process: the returned handle finds it again.
pub async fn spawn(
    program: &Path,
    serial: &Path,
    dir: &Path,
    log: &Path,
) -> Result<(ProcessHandle, PathBuf), AgentMuxError> {
    let listen = dir.join(SOCKET_NAME);
    let argv = argv(program, serial, &listen);
    let printable = argv.join(" ");
    let (stderr, stderr_target) =
        super::StderrTarget::open(Some(log)).map_err(|source| AgentMuxError::Spawn {
            argv: format!("{printable} (its stderr log)"),
            source,
        })?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        // Its own group: a signal to the daemon's group must not reach it.
        .process_group(0);
    let mut child = command.spawn().map_err(|source| AgentMuxError::Spawn {
        argv: printable.clone(),
        source,
    })?;
    tracing::info!(program = %printable, pid = child.id(), "process started");
    let started = super::wait_for_socket(
        &mut child,
        &listen,
        Duration::from_secs(STARTUP_SECONDS),
        &stderr_target,
    )
    .await;
    let failure = match started {
        Ok(()) => match child.id().and_then(ProcessHandle::of) {
            Some(handle) => return Ok((handle, listen)),
            None => AgentMuxError::NoPid { argv: printable },
        },
        Err(super::StartupFailure::Exited { status, stderr }) => AgentMuxError::EarlyExit {
            argv: printable,
            status,
            stderr,
        },
        Err(super::StartupFailure::TimedOut) => AgentMuxError::NoSocket {
            argv: printable,
            socket: listen.clone(),
            seconds: STARTUP_SECONDS,
        },
        Err(super::StartupFailure::Wait(error)) => AgentMuxError::Wait(error),
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_file(&listen);
    Err(failure)
}
