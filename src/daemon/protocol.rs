//! The client ↔ daemon protocol: JSON Lines over the daemon's unix socket.
//!
//! Each connection starts with [`Request::Hello`] → [`Response::Hello`]; after that the
//! client sends one request per line and reads response lines until one that ends the
//! request ([`Response::is_final`]); progress events of long requests come before it as
//! [`Response::Event`]. A daemon of another protocol version answers `Hello` with
//! [`Response::Error`] of kind `version`, and the client restarts it (both come from the
//! same binary, so a mismatch means the binary was upgraded under a running daemon).

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to [`Request`] or [`Response`] (2: the VM requests).
pub const PROTOCOL_VERSION: u32 = 2;

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
    },
    /// Stop, then start.
    VmRestart {
        name: String,
        timeout_secs: Option<u64>,
    },
    /// Stop the VMM at once (no guest shutdown).
    VmKill {
        name: String,
    },
    /// Kill it if it runs, then remove it and everything it owns. Answered by
    /// [`Response::Deleted`].
    VmDelete {
        name: String,
    },
    /// Every VM. Answered by [`Response::Vms`].
    VmList,
    VmShow {
        name: String,
    },
}

/// What `vm create` / `vm run` ask for; `None` fields take the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVm {
    pub name: Option<String>,
    pub image: Option<String>,
    pub kernel: Option<String>,
    /// `qemu` or `firecracker`; `None` picks the best one for this host.
    pub backend: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_bytes: Option<u64>,
    pub start: bool,
    /// How long to wait for the guest's agent (seconds).
    pub timeout_secs: Option<u64>,
    /// Delete the VM if the client is gone when it is ready (`vm run --rm` interrupted
    /// while the VM was being made).
    #[serde(default)]
    pub remove_if_abandoned: bool,
}

/// One VM as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub id: String,
    pub image: String,
    pub kernel: String,
    pub backend: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    /// `2 vcpu · 2048 MiB · 8G disk`.
    pub spec: String,
    /// `running` or `stopped`.
    pub state: String,
    pub created_ms: u64,
    /// The VMM's pid, while running.
    pub pid: Option<u32>,
    /// Where its sshd is reached, while running.
    pub ssh_host: Option<String>,
    pub ssh_port: Option<u16>,
    /// Where its agent is reached, while running.
    pub agent: Option<crate::vm::backend::AgentAddress>,
    /// This VM's own `known_hosts`.
    pub known_hosts: String,
    /// The guest's serial console.
    pub console_log: String,
    /// The VM's disks and logs.
    pub dir: String,
    /// Its sockets and scratch file, while running.
    pub run_dir: String,
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
    Vms(Vec<VmInfo>),
    Deleted {
        name: String,
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

/// A progress event of a long request, as [`Response::Event`] carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum Progress {
    /// An engine event of a build the request needed.
    Engine(crate::engine::Event),
    /// A line about what the daemon is doing (`spec: …`, `booting …`).
    Note(String),
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
