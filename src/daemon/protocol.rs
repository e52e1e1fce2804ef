//! The client ↔ daemon protocol: JSON Lines over the daemon's unix socket.
//!
//! Each connection starts with [`Request::Hello`] → [`Response::Hello`]; after that the
//! client sends one request per line and reads response lines until one that ends the
//! request ([`Response::is_final`]); progress events of long requests come before it as
//! [`Response::Event`]. A daemon of another protocol version answers `Hello` with
//! [`Response::Error`] of kind `version`, and the client restarts it (both come from the
//! same binary, so a mismatch means the binary was upgraded under a running daemon).

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to [`Request`] or [`Response`] (2: the VM requests;
/// 3: `VmUp`; 4: a VM's network, which an older daemon would ignore and boot with one;
/// 7: `VmSet`; 8: remote-cache events and `run_finished`'s `remote` counts).
pub const PROTOCOL_VERSION: u32 = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Request {
    Hello {
        protocol: u32,
        client_version: String,
    },
    /// What the daemon is and holds.
    Status,
    /// Finish and exit: the socket and lock go, running VMs are left running.
    Stop,
    /// Create a VM (producing a missing image or kernel first); with `start`, boot it and
    /// wait for its agent. Answered by [`Response::Vm`].
    VmCreate(CreateVm),
    /// Boot a stopped VM and wait for its agent.
    VmStart {
        name: String,
        timeout_secs: Option<u64>,
    },
    /// Power the guest off through its agent, then stop the VMM (forced after a grace).
    VmStop {
        name: String,
        /// Seconds the guest gets to power off before its VMM is stopped (default 30).
        #[serde(default)]
        timeout_secs: Option<u64>,
    },
    /// Stop, then start.
    VmRestart {
        name: String,
        timeout_secs: Option<u64>,
    },
    /// A stopped VM's vCPUs, memory or disk size (grown). Answered by [`Response::Vm`].
    VmSet(SetVm),
    /// Stop the VMM at once (no guest shutdown).
    VmKill {
        name: String,
    },
    /// Remove it and everything it owns; a running VM only with `force` (it is killed
    /// first). Answered by [`Response::Deleted`].
    VmDelete {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// `banger up`'s VM: made, reused, started or recreated around its work disk, and
    /// running. Answered by [`Response::VmUp`].
    VmUp(UpVm),
    /// Every VM. Answered by [`Response::Vms`].
    VmList,
    VmShow {
        name: String,
    },
    /// Remove banger's bridge network (bridge, taps, NAT, DNS); refused while a tap VM runs.
    /// Answered by [`Response::NetworkDown`].
    NetworkDown,
}

pub use crate::ops::vms::{CreateVm, SetVm, UpReport, UpVm, VmInfo};

impl Request {
    /// The request's name and the VM it is about, if any, for the daemon's log.
    pub fn describe(&self) -> (&'static str, &str) {
        match self {
            Request::Hello { .. } => ("hello", ""),
            Request::Status => ("status", ""),
            Request::Stop => ("stop", ""),
            Request::VmCreate(create) => ("vm_create", create.name.as_deref().unwrap_or("")),
            Request::VmStart { name, .. } => ("vm_start", name),
            Request::VmStop { name, .. } => ("vm_stop", name),
            Request::VmRestart { name, .. } => ("vm_restart", name),
            Request::VmSet(set) => ("vm_set", &set.name),
            Request::VmKill { name } => ("vm_kill", name),
            Request::VmDelete { name, .. } => ("vm_delete", name),
            Request::VmUp(up) => ("vm_up", up.create.name.as_deref().unwrap_or("")),
            Request::VmList => ("vm_list", ""),
            Request::VmShow { name } => ("vm_show", name),
            Request::NetworkDown => ("network_down", ""),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol: u32,
        daemon_version: String,
        pid: u32,
    },
    Status(DaemonStatus),
    Stopping,
    Vm(Box<VmInfo>),
    VmUp(Box<UpReport>),
    Vms(Vec<VmInfo>),
    Deleted {
        name: String,
    },
    /// What `NetworkDown` found and removed.
    NetworkDown {
        /// The bridge's address, if there was a bridge.
        bridge: Option<String>,
        taps: Vec<String>,
        nft_table: bool,
    },
    /// A progress event of the request being served (engine events, boot progress).
    Event(serde_json::Value),
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Response {
    /// Whether this line ends the current request.
    pub fn is_final(&self) -> bool {
        !matches!(self, Response::Event(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was malformed or not understood.
    BadRequest,
    /// Client and daemon speak different protocol versions.
    Version,
    /// The request names something that does not exist or cannot be (a VM name taken, an
    /// image not in any catalog, a VM not running): the user's to fix.
    Invalid,
    /// The request was understood and failed (a build step, a guest that never came up).
    Failed,
    /// The host cannot do it (a missing program, no permission): banger could not work.
    Environment,
}

impl ErrorKind {
    /// The kind of an error of the given class.
    pub fn of(class: crate::error::ErrorClass) -> ErrorKind {
        match class {
            crate::error::ErrorClass::User => ErrorKind::Invalid,
            crate::error::ErrorClass::Failed | crate::error::ErrorClass::Interrupted => {
                ErrorKind::Failed
            }
            crate::error::ErrorClass::Environment => ErrorKind::Environment,
        }
    }
}

/// A progress event of a long request, as [`Response::Event`] carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum Progress {
    /// An engine event of a build the request needed.
    Engine(crate::engine::Event),
    /// A line about what the daemon is doing (`spec: …`, `booting …`).
    Note(String),
    /// Why it does so, shown with `-v` (`no snapshot fits … yet: …`). Older clients ignore
    /// it, like any kind they do not know.
    Detail(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub protocol: u32,
    pub socket: String,
    /// Milliseconds since the epoch at start-up.
    pub started_ms: u64,
    /// Connections served since start-up, this one included.
    pub connections: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json_lines() {
        let hello = Request::Hello {
            protocol: 1,
            client_version: "0.1.0".into(),
        };
        let line = serde_json::to_string(&hello).unwrap();
        assert_eq!(
            line,
            r#"{"type":"hello","data":{"protocol":1,"client_version":"0.1.0"}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), hello);
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"type":"status"}"#
        );
        let error = Response::Error {
            kind: ErrorKind::Version,
            message: "x".into(),
        };
        assert!(error.is_final());
        assert!(!Response::Event(serde_json::json!({})).is_final());
    }
}
