//! Serving the protocol: listeners, and the request loop of one connection.
//!
//! Every transport ends up as a connected byte stream handed to [`handle_connection`] in a
//! thread of its own: an accepted AF_VSOCK or unix socket, or one end of a socket pair that
//! the serial multiplexer (`mux.rs`) feeds. A connection serves requests one after another
//! until the client closes it; concurrency comes from opening more connections.
//!
//! Error handling: a request that fails gets an `Error` frame and the connection carries on.
//! A frame that breaks the stream's framing (oversized header) or a request that cannot be
//! finished in step (a stray frame in the middle of a `PutFile`) gets an `Error` and the
//! connection is closed.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept4, bind, listen, socket,
};
use serde::Serialize;

use crate::protocol::{self, ErrorKind, FrameType, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Ready};
use crate::reaper::Reaper;
use crate::wire::{Frame, FrameReader, FrameWriter, ReadError};

/// VMADDR_CID_ANY: accept connections addressed to any of this guest's CIDs.
const VMADDR_CID_ANY: u32 = u32::MAX;

/// What every connection shares.
#[derive(Debug)]
pub struct Agent {
    pub reaper: Arc<Reaper>,
    /// The `Ready` answer, fixed when the agent started listening.
    pub ready: Ready,
}

/// The connection is unusable: its stream failed or the client broke the framing.
#[derive(Debug)]
pub struct Disconnected;

/// One client connection: its frame reader, its writer, and the agent.
#[derive(Debug)]
pub struct Connection {
    pub reader: FrameReader,
    writer: FrameWriter,
    pub reaper: Arc<Reaper>,
    agent: Arc<Agent>,
    /// The protocol version settled by the last `Hello`; the oldest one until then, so a
    /// client that never says `Hello` is served as version 1 always was.
    pub protocol: u32,
}

impl Connection {
    pub fn send_json<T: Serialize>(
        &mut self,
        kind: FrameType,
        message: &T,
    ) -> Result<(), Disconnected> {
        self.writer
            .send_json(kind, message)
            .map_err(|_| Disconnected)
    }

    pub fn send_bytes(&mut self, kind: FrameType, payload: &[u8]) -> Result<(), Disconnected> {
        self.writer
            .send_bytes(kind, payload)
            .map_err(|_| Disconnected)
    }

    /// Ends the current request with an `Error`; the connection stays usable.
    pub fn refuse(
        &mut self,
        kind: ErrorKind,
        message: impl Into<String>,
    ) -> Result<(), Disconnected> {
        self.writer
            .send_error(kind, message)
            .map_err(|_| Disconnected)
    }

    /// The stream cannot be used any more; tells the client why when that is still possible.
    pub fn fail(&mut self, error: ReadError) -> Disconnected {
        if let ReadError::Header(header) = &error {
            let _ = self
                .writer
                .send_error(ErrorKind::BadRequest, header.to_string());
        }
        Disconnected
    }

    /// Answers `Hello` with `Ready`, or an `Error` for a version this agent cannot speak.
    pub fn hello(&mut self, frame: &Frame) -> Result<(), Disconnected> {
        let hello: protocol::Hello = match protocol::decode_json(&frame.payload) {
            Ok(hello) => hello,
            Err(error) => return self.refuse(ErrorKind::BadRequest, format!("bad Hello: {error}")),
        };
        if hello.version < MIN_PROTOCOL_VERSION {
            return self.refuse(
                ErrorKind::UnsupportedVersion,
                format!(
                    "protocol version {} is too old: this agent speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
                    hello.version
                ),
            );
        }
        let mut ready = self.agent.ready.clone();
        ready.protocol = hello.version.min(PROTOCOL_VERSION);
        self.protocol = ready.protocol;
        self.send_json(FrameType::Ready, &ready)
    }
}

/// Serves requests on `stream` until the client closes it or breaks the protocol.
pub fn handle_connection(agent: Arc<Agent>, stream: File) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut connection = Connection {
        reader: FrameReader::new(stream),
        writer: FrameWriter::new(write_half),
        reaper: Arc::clone(&agent.reaper),
        agent,
        protocol: MIN_PROTOCOL_VERSION,
    };
    loop {
        let frame = match connection.reader.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(error) => {
                connection.fail(error);
                return;
            }
        };
        // Answers go to the channel the request came on (always 0 on sockets).
        connection.writer.channel = frame.header.channel;
        if serve_request(&mut connection, frame).is_err() {
            return;
        }
    }
}

fn serve_request(connection: &mut Connection, frame: Frame) -> Result<(), Disconnected> {
    let Some(kind) = frame.header.frame_type() else {
        return connection.refuse(
            ErrorKind::UnknownFrame,
            format!("unknown frame type {:#04x}", frame.header.kind),
        );
    };
    match kind {
        FrameType::Hello => connection.hello(&frame),
        FrameType::Exec => match protocol::decode_json(&frame.payload) {
            Ok(request) => crate::exec::run(connection, request),
            Err(error) => connection.refuse(ErrorKind::BadRequest, format!("bad Exec: {error}")),
        },
        FrameType::PutFile => match protocol::decode_json(&frame.payload) {
            Ok(request) => crate::files::put(connection, request),
            Err(error) => {
                // The Data frames that follow cannot be accounted for: close.
                let _ = connection.refuse(ErrorKind::BadRequest, format!("bad PutFile: {error}"));
                Err(Disconnected)
            }
        },
        FrameType::GetFile => match protocol::decode_json(&frame.payload) {
            Ok(request) => crate::files::get(connection, request),
            Err(error) => connection.refuse(ErrorKind::BadRequest, format!("bad GetFile: {error}")),
        },
        // Stream frames that raced with the end of an `Exec` (stdin sent while the command
        // exited, a signal for a command that is gone, a terminal resized meanwhile):
        // nothing to do.
        FrameType::Stdin | FrameType::StdinEof | FrameType::Signal | FrameType::Resize => Ok(()),
        other => connection.refuse(ErrorKind::BadRequest, format!("{other:?} is not a request")),
    }
}

/// Binds and listens on AF_VSOCK `port` for any CID.
pub fn listen_vsock(port: u32) -> io::Result<OwnedFd> {
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| annotate(errno, "cannot create a vsock socket (is vsock loaded?)"))?;
    bind(listener.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))
        .map_err(|errno| annotate(errno, &format!("cannot bind vsock port {port}")))?;
    listen(&listener, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
        .map_err(|errno| annotate(errno, &format!("cannot listen on vsock port {port}")))?;
    Ok(listener)
}

/// [`listen_vsock`], tried again every 25 ms until `wait` has passed: as a systemd service the
/// agent starts beside `systemd-modules-load`, which loads the vsock modules of a kernel whose
/// initrd is not banger's.
pub fn listen_vsock_waiting(port: u32, wait: Duration) -> io::Result<OwnedFd> {
    let started = Instant::now();
    loop {
        match listen_vsock(port) {
            Err(_) if started.elapsed() < wait => std::thread::sleep(Duration::from_millis(25)),
            outcome => return outcome,
        }
    }
}

/// Binds a unix socket at `path`, replacing a stale one.
pub fn listen_unix(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    UnixListener::bind(path).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot listen on {}: {error}", path.display()),
        )
    })
}

fn annotate(errno: nix::errno::Errno, what: &str) -> io::Error {
    io::Error::new(io::Error::from(errno).kind(), format!("{what}: {errno}"))
}

/// Accepts vsock connections forever, a thread each.
pub fn accept_vsock(agent: Arc<Agent>, listener: OwnedFd) -> io::Result<()> {
    loop {
        match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => spawn_connection(&agent, File::from(adopt(fd))),
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
            Err(errno) => return Err(annotate(errno, "vsock accept failed")),
        }
    }
}

/// Accepts unix connections forever, a thread each.
pub fn accept_unix(agent: Arc<Agent>, listener: UnixListener) -> io::Result<()> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => spawn_connection(&agent, File::from(OwnedFd::from(stream))),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
}

pub fn spawn_connection(agent: &Arc<Agent>, stream: File) {
    let agent = Arc::clone(agent);
    // A failed spawn drops the stream, which the client sees as a closed connection.
    let _ = std::thread::Builder::new()
        .name("connection".into())
        .spawn(move || handle_connection(agent, stream));
}

fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by accept4 and nothing else owns it. nix has no
    // OwnedFd-returning accept, and std cannot accept on a vsock socket.
    #[allow(unsafe_code)]
    unsafe {
        OwnedFd::from_raw_fd(fd)
    }
}
