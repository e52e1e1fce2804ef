//! The daemon: one process per user that owns the engine, the store and the VMs, so that
//! concurrent CLI invocations share work; the CLI is a thin client that starts it on demand.
//!
//! - `protocol.rs`: the JSON Lines request/response protocol (versioned).
//! - `server.rs`: start-up (runtime dir, exclusive lock, stale-socket cleanup, 0600 socket),
//!   serving, and shutdown that leaves no socket or lock behind.
//! - `client.rs`: connect, or start the daemon (`banger daemon run`, detached) and connect;
//!   replace a daemon that speaks another protocol version.
//!
//! The VM lifecycle itself (create, start, stop, kill, delete, list, finding running VMs
//! again after a restart) is `ops::vms`: the daemon serves it.

pub mod client;
pub mod log;
pub mod protocol;
pub mod server;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("a banger daemon is already running{} on {}", pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default(), socket.display())]
    AlreadyRunning { pid: Option<u32>, socket: PathBuf },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the daemon ({argv})")]
    Spawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the daemon did not start ({argv}: {status}); its log is {}{}",
        log.display(),
        if stderr.is_empty() { String::new() } else { format!(":\n{stderr}") }
    )]
    StartFailed {
        argv: String,
        status: String,
        log: PathBuf,
        stderr: String,
    },
    #[error("the daemon speaks another protocol version: {message}")]
    Version { message: String },
    #[error("lost the connection to the daemon")]
    Lost {
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected answer from the daemon during {during}: {response}")]
    Unexpected {
        during: &'static str,
        response: String,
    },
    #[error("cannot take over the VMs")]
    Vms {
        #[source]
        source: crate::ops::vms::VmError,
    },
    #[error("the daemon on {} did not stop in time", socket.display())]
    StopTimeout { socket: PathBuf },
    #[error(transparent)]
    RuntimeDir(#[from] crate::paths::RuntimeDirError),
    #[error(
        "the process serving {} runs as uid {peer}, not as uid {uid}: banger refuses to talk \
         to another user's daemon (remove the socket's directory, or set {})",
        socket.display(),
        crate::env::BANGER_RUNTIME_DIR
    )]
    ForeignDaemon {
        socket: PathBuf,
        peer: u32,
        uid: u32,
    },
}

impl DaemonError {
    /// Whether the daemon went away in the middle of being reached: the connection was reset
    /// or closed before it answered, as happens while a killed daemon is being torn down.
    pub fn is_a_dying_daemon(&self) -> bool {
        let dying = |source: &std::io::Error| {
            matches!(
                source.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        };
        match self {
            DaemonError::Io { source, .. } | DaemonError::Lost { source } => dying(source),
            _ => false,
        }
    }
}

/// Whether a peer of the daemon socket (the daemon, seen from a client; a client, seen from
/// the daemon) may be trusted: the same user, or root.
pub(crate) fn trusted_peer(peer_uid: u32) -> bool {
    peer_uid == nix::unistd::geteuid().as_raw() || peer_uid == 0
}
