//! The client ↔ daemon protocol: JSON Lines over the daemon's unix socket.
//!
//! Each connection starts with [`Request::Hello`] → [`Response::Hello`]; after that the
//! client sends one request per line and reads response lines until one that ends the
//! request ([`Response::is_final`]); progress events of long requests come before it as
//! [`Response::Event`]. A daemon of another protocol version answers `Hello` with
//! [`Response::Error`] of kind `version`, and the client restarts it (both come from the
//! same binary, so a mismatch means the binary was upgraded under a running daemon).

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to [`Request`] or [`Response`].
pub const PROTOCOL_VERSION: u32 = 1;

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
    /// The request was understood and failed.
    Failed,
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
