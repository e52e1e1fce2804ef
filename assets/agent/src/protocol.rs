//! banger's guest protocol, version 2: the frame header and every message.
//!
//! This one file is the wire format for both sides: the agent compiles it as its `protocol`
//! module and the host includes it verbatim (`src/guest/mod.rs`, `#[path]`), so the two cannot
//! drift. It is pure: no I/O, no dependency beyond serde. The prose specification, with the
//! versioning rule and error handling, is `docs/agent.md`.
//!
//! A frame is a 9-byte header (payload length `u32`, channel `u32`, type `u8`, big-endian)
//! followed by the payload: a JSON object for control messages, raw bytes for `Stdin`,
//! `Stdout`, `Stderr` and `Data`, nothing for `StdinEof` and `Close`.
//!
//! Version 2 added, without changing anything version 1 peers send or read: `Exec.tty`
//! accepted (a pseudo-terminal), `Exec.window`, and the `Resize` frame. Which version a
//! connection speaks is settled by `Hello`/`Ready`; a version 1 connection still refuses
//! `tty`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks (the highest it accepts in `Hello`).
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The first protocol version with pseudo-terminals: `Exec.tty`, `Exec.window` and `Resize`.
pub const TTY_PROTOCOL_VERSION: u32 = 2;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 9;

/// The largest payload either side accepts. Larger frames are a protocol error.
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// The payload size senders use for byte streams: a pipe's capacity, so one read fills one
/// frame.
pub const DATA_CHUNK: usize = 64 * 1024;

/// What a frame carries. Client → agent types are below 0x80, agent → client types from 0x80;
/// `Data` and `Close` go both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// JSON [`Hello`]; answered by `Ready`.
    Hello = 0x01,
    /// JSON [`Exec`]; answered by a stream of `Stdout`/`Stderr` and one `Exit` (or `Error`).
    Exec = 0x02,
    /// JSON [`PutFile`], then `size` bytes of `Data`; answered by `Ok` (or `Error`).
    PutFile = 0x03,
    /// JSON [`GetFile`]; answered by `FileInfo`, `Data`… and `End` (or `Error`).
    GetFile = 0x04,
    /// Raw bytes for the running command's standard input.
    Stdin = 0x05,
    /// Empty: the running command's standard input is closed.
    StdinEof = 0x06,
    /// JSON [`Signal`] for the running command's process group.
    Signal = 0x07,
    /// JSON [`WindowSize`]: the running `tty` command's terminal changed size (version 2).
    Resize = 0x08,
    /// Raw file bytes (`PutFile` from the client, `GetFile` from the agent).
    Data = 0x10,
    /// Empty: the channel is finished (multiplexed serial transport only).
    Close = 0x11,
    /// JSON [`Ready`].
    Ready = 0x81,
    /// Raw bytes the command wrote to its standard output.
    Stdout = 0x82,
    /// Raw bytes the command wrote to its standard error.
    Stderr = 0x83,
    /// JSON [`Exit`]: the command ended.
    Exit = 0x84,
    /// JSON `{}`: the `PutFile` is complete.
    Ok = 0x85,
    /// JSON [`FileInfo`]: the file a `GetFile` is about to send.
    FileInfo = 0x86,
    /// JSON [`End`]: every byte of a `GetFile` was sent.
    End = 0x87,
    /// JSON [`ErrorReply`]: the request failed; it is over.
    Error = 0xFF,
}

impl FrameType {
    /// Every frame type, for lookups by byte.
    pub const ALL: [FrameType; 18] = [
        FrameType::Hello,
        FrameType::Exec,
        FrameType::PutFile,
        FrameType::GetFile,
        FrameType::Stdin,
        FrameType::StdinEof,
        FrameType::Signal,
        FrameType::Resize,
        FrameType::Data,
        FrameType::Close,
        FrameType::Ready,
        FrameType::Stdout,
        FrameType::Stderr,
        FrameType::Exit,
        FrameType::Ok,
        FrameType::FileInfo,
        FrameType::End,
        FrameType::Error,
    ];

    /// The type with this byte, if there is one.
    pub fn from_byte(byte: u8) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|kind| *kind as u8 == byte)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload bytes after the header.
    pub len: u32,
    /// 0 on socket transports; the multiplexed stream's channel on the serial transport.
    pub channel: u32,
    /// The type byte, kept raw so an unknown type can be reported by number.
    pub kind: u8,
}

/// Why a header is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// The payload is larger than [`MAX_PAYLOAD`].
    TooLarge { len: u32 },
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::TooLarge { len } => {
                write!(
                    f,
                    "frame payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
                )
            }
        }
    }
}

impl std::error::Error for HeaderError {}

impl FrameHeader {
    /// A header for a payload of `len` bytes.
    pub fn new(kind: FrameType, channel: u32, len: usize) -> FrameHeader {
        FrameHeader {
            len: u32::try_from(len).unwrap_or(u32::MAX),
            channel,
            kind: kind as u8,
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[..4].copy_from_slice(&self.len.to_be_bytes());
        bytes[4..8].copy_from_slice(&self.channel.to_be_bytes());
        bytes[8] = self.kind;
        bytes
    }

    /// Parses a header, refusing payloads over [`MAX_PAYLOAD`].
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, HeaderError> {
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let channel = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if len > MAX_PAYLOAD {
            return Err(HeaderError::TooLarge { len });
        }
        Ok(FrameHeader {
            len,
            channel,
            kind: bytes[8],
        })
    }

    /// The frame type, if the byte is a known one.
    pub fn frame_type(&self) -> Option<FrameType> {
        FrameType::from_byte(self.kind)
    }
}

/// One whole frame: header and payload in one buffer, ready to write with one call.
pub fn encode_frame(kind: FrameType, channel: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&FrameHeader::new(kind, channel, payload.len()).encode());
    frame.extend_from_slice(payload);
    frame
}

/// One whole frame with a JSON payload.
pub fn encode_json_frame<T: Serialize>(kind: FrameType, channel: u32, message: &T) -> Vec<u8> {
    // Serializing these plain structs into memory cannot fail: no maps with non-string keys,
    // no custom serializers.
    let payload = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    encode_frame(kind, channel, &payload)
}

/// Parses a JSON payload.
pub fn decode_json<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(payload)
}

/// Client → agent, first on a connection: the highest protocol version the client speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
}

/// Agent → client, the answer to `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// The agent's package version.
    pub agent_version: String,
    /// The protocol version both sides use from now on: the lower of the two.
    pub protocol: u32,
    /// `uname -r` of the guest.
    pub kernel_release: String,
    /// Milliseconds from kernel start (CLOCK_BOOTTIME) to the agent listening.
    pub boot_ms: u64,
    /// Whether the agent is the guest's PID 1 (an image without an init of its own).
    #[serde(default)]
    pub pid1: bool,
}

/// Client → agent: run a command. Exactly one of `argv` and `shell` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// Program and arguments, run directly (the program is looked up in `PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A command line for `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Variables set on top of the agent's environment (or instead of it with `clear_env`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Start from an empty environment (plus `PATH` if `env` has none).
    #[serde(default, skip_serializing_if = "is_false")]
    pub clear_env: bool,
    /// Working directory; the agent's (`/`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Run the command on a new pseudo-terminal: its stdin, stdout and stderr, and its
    /// controlling terminal, so all output arrives as `Stdout`. Version 2; a version 1
    /// connection refuses `true`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
    /// The terminal's size when the command starts (with `tty`; ignored without). Without
    /// it the terminal reports 0 rows and 0 columns, which programs read as "unknown".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSize>,
    /// Whether `Stdin` frames follow; without it the command reads `/dev/null`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdin: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// A terminal's size in character cells: `Exec.window`, and the payload of `Resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// Client → agent: a signal number for the running command's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub signal: i32,
}

/// Agent → client: how the command ended. Exactly one field is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The exit code, when the command exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal number, when a signal killed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// Client → agent: write a file; exactly `size` bytes of `Data` frames follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFile {
    /// Absolute path in the guest. Replaced atomically if it exists.
    pub path: String,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Create missing parent directories (mode 0755, owned by the agent's user).
    #[serde(default, skip_serializing_if = "is_false")]
    pub create_parents: bool,
}

/// Client → agent: read a regular file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetFile {
    /// Absolute path in the guest; symbolic links are followed.
    pub path: String,
}

/// Agent → client: the file a `GetFile` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The size when opened; the bytes sent may differ if the file changes meanwhile (`End`
    /// has the final count).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Agent → client: the file was sent completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// Bytes sent in `Data` frames.
    pub size: u64,
}

/// One listening socket, as `banger-agent ports --json` prints them (a JSON array on stdout;
/// the host runs it through `Exec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    /// `tcp` or `udp` (either address family).
    pub protocol: String,
    pub address: std::net::IpAddr,
    pub port: u16,
    /// Every process with the socket open (a forking server shares it), by pid; empty when
    /// none could be seen.
    pub processes: Vec<ListeningProcess>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListeningProcess {
    pub pid: u32,
    /// `/proc/PID/comm`: the name `ps` shows.
    pub name: String,
}

/// What the guest says of itself, as `banger-agent stats --json` prints it (one JSON object;
/// the host runs it through `Exec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Seconds since the guest's kernel started (`/proc/uptime`).
    pub uptime_secs: f64,
    /// The 1, 5 and 15 minute load averages (`/proc/loadavg`).
    pub load: [f64; 3],
    /// Processes that exist (`/proc/loadavg`'s fourth field, after the slash).
    pub processes: u64,
    pub memory_total_bytes: u64,
    /// What the kernel estimates it could give without swapping (`MemAvailable`).
    pub memory_available_bytes: u64,
    /// The root file system and `/root` (the work disk), as `df` shows them.
    pub filesystems: Vec<FilesystemUse>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesystemUse {
    pub mount: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
}

/// The class of an `Error`, for programs; the message is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The frame was malformed or not legal in this state.
    BadRequest,
    /// An unknown frame type.
    UnknownFrame,
    /// `Hello` asked for a version this agent does not speak.
    UnsupportedVersion,
    /// A feature this agent, or the connection's protocol version, does not have (`tty` on
    /// version 1).
    Unsupported,
    /// The path or program does not exist.
    NotFound,
    /// The agent lacks permission.
    PermissionDenied,
    /// The command could not be started.
    Spawn,
    /// Any other I/O failure.
    Io,
    /// A kind added by a later version.
    #[serde(other)]
    Other,
}

/// Agent → client: the request failed and is over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
}

/// A guest session as `banger-agent session list|show|start|stop --json` print it (the host
/// runs them through `Exec`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub name: String,
    pub argv: Vec<String>,
    pub cwd: String,
    pub pid: i32,
    pub started_unix_ms: u64,
    pub state: SessionState,
    /// Set when `state` is `exited`.
    pub exit_code: Option<i32>,
    /// Set when `state` is `killed`.
    pub signal: Option<i32>,
    /// Set when `state` is `exited` or `killed`.
    pub ended_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Running,
    Exited,
    Killed,
    /// The supervisor is gone without recording an end.
    Lost,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_big_endian() {
        let header = FrameHeader::new(FrameType::Stdout, 0x0102_0304, 0x10);
        let bytes = header.encode();
        assert_eq!(bytes, [0, 0, 0, 0x10, 1, 2, 3, 4, 0x82]);
        assert_eq!(FrameHeader::decode(&bytes).unwrap(), header);
        assert_eq!(header.frame_type(), Some(FrameType::Stdout));
    }

    #[test]
    fn oversized_payloads_are_refused() {
        let bytes = FrameHeader {
            len: MAX_PAYLOAD + 1,
            channel: 0,
            kind: FrameType::Data as u8,
        }
        .encode();
        assert_eq!(
            FrameHeader::decode(&bytes),
            Err(HeaderError::TooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
    }

    #[test]
    fn every_type_byte_is_distinct_and_found() {
        for kind in FrameType::ALL {
            assert_eq!(FrameType::from_byte(kind as u8), Some(kind));
        }
        assert_eq!(FrameType::from_byte(0x42), None);
    }

    #[test]
    fn exec_json_omits_defaults_and_accepts_unknown_fields() {
        let exec = Exec {
            argv: Some(vec!["true".into()]),
            ..Exec::default()
        };
        assert_eq!(
            serde_json::to_string(&exec).unwrap(),
            r#"{"argv":["true"]}"#
        );
        let parsed: Exec = decode_json(br#"{"shell":"exit 7","later_field":1}"#).unwrap();
        assert_eq!(parsed.shell.as_deref(), Some("exit 7"));
        assert!(!parsed.stdin);
    }

    #[test]
    fn exec_window_is_omitted_when_absent_and_round_trips_when_set() {
        let exec = Exec {
            shell: Some("stty size".into()),
            tty: true,
            window: Some(WindowSize { rows: 24, cols: 80 }),
            ..Exec::default()
        };
        let json = serde_json::to_string(&exec).unwrap();
        assert_eq!(
            json,
            r#"{"shell":"stty size","tty":true,"window":{"rows":24,"cols":80}}"#
        );
        assert_eq!(decode_json::<Exec>(json.as_bytes()).unwrap(), exec);
        // What a version 1 client sends still decodes, with no window.
        let old: Exec = decode_json(br#"{"argv":["true"]}"#).unwrap();
        assert_eq!(old.window, None);
        assert_eq!(FrameType::from_byte(0x08), Some(FrameType::Resize));
    }

    #[test]
    fn unknown_error_kinds_parse_as_other() {
        let reply: ErrorReply = decode_json(br#"{"kind":"quota","message":"x"}"#).unwrap();
        assert_eq!(reply.kind, ErrorKind::Other);
    }
}
