use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::protocol::{ErrorKind, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Why talking to a guest's agent failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the VMM socket {} refused vsock port {port}: {reply:?}", path.display())]
    VsockRefused {
        path: PathBuf,
        port: u32,
        reply: String,
    },
    #[error("the guest agent at {endpoint} was not ready after {waited:.1?} (last: {last})")]
    NotReady {
        endpoint: String,
        waited: Duration,
        last: String,
    },
    #[error("cannot send {what} to the guest agent")]
    Send {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot receive from the guest agent")]
    Receive {
        #[source]
        source: io::Error,
    },
    #[error("the guest agent closed the connection during {during}")]
    Closed { during: &'static str },
    #[error("guest protocol violation during {during}: {message}")]
    Protocol {
        during: &'static str,
        message: String,
    },
    #[error("the guest agent refused {request}: {message}")]
    Remote {
        request: &'static str,
        kind: ErrorKind,
        message: String,
    },
    #[error(
        "the guest agent speaks protocol {agent}; this banger speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
    )]
    UnsupportedVersion { agent: u32 },
    #[error("cannot read the {what} to send to the guest")]
    LocalRead {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the guest's {what} on the host")]
    LocalWrite {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "the guest's agent speaks protocol {agent}, which has no pseudo-terminals (-t): its \
         image predates this banger; `banger image pull IMAGE` brings the current agent into \
         it, for VMs created afterwards"
    )]
    TtyUnsupported { agent: u32 },
    #[error("the guest's agent has no `{command}` command: its image predates this banger")]
    AgentTooOld { command: &'static str },
    #[error("`{argv}` failed in the guest ({status}): {stderr}")]
    AgentCommand {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("the guest channel is unusable: an earlier request on it was cancelled or broke off")]
    Poisoned,
}
