//! The host side's multiplexer for the serial transport: many local connections over the one
//! virtio-serial stream of a guest.
//!
//! QEMU's chardev socket for the port `banger.0` takes one connection at a time, but the
//! stream carries channels (the agent's `mux.rs` serves each as a connection of its own).
//! [`SerialMux`] holds that one connection and listens on a unix socket of its own; each
//! connection to it is one channel and speaks exactly what [`GuestChannel::connect_serial`]
//! speaks, so any number of clients can use the guest at once:
//!
//! 1. A client's first frame names its channel (any number but 0). A channel that another
//!    live client holds is refused: the new connection is closed.
//! 2. Client frames are read whole (header and payload) before one writer puts each on the
//!    stream in a single write: a client that hangs up mid-frame cannot tear the stream.
//! 3. Agent frames go to the client that holds their channel; frames of a channel that no
//!    client holds (one that hung up) are dropped.
//! 4. A client that hangs up, or sends a frame for another channel, ends its channel: the
//!    multiplexer sends `Close` for it, and the agent kills its command as it would for a
//!    dropped socket.
//! 5. When the stream ends (the VM is gone), every client is disconnected and
//!    [`SerialMux::run`] returns; it removes its socket file in every case.
//!
//! Weakness: as on the agent's side, frames pass through bounded queues in order, so a client
//! that stops reading holds up the agent's frames for every channel (head-of-line blocking).
//!
//! [`GuestChannel::connect_serial`]: super::GuestChannel::connect_serial

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::GuestError;
use super::protocol::{FrameHeader, FrameType, HEADER_LEN, encode_frame};

/// Whole frames waiting for a writer, per queue. Frames are at most 1 MiB and usually 64 KiB.
const QUEUE_FRAMES: usize = 16;

/// Which client holds each channel: the queue of frames to write to it.
type Routes = Arc<Mutex<HashMap<u32, mpsc::Sender<Vec<u8>>>>>;

/// One guest's serial stream, shared by the clients of a unix socket.
#[derive(Debug)]
pub struct SerialMux {
    serial: UnixStream,
    serial_path: PathBuf,
    listener: UnixListener,
    listen_path: PathBuf,
}

impl SerialMux {
    /// Connects to the VMM's socket for the guest's serial port (`serial`) and listens on
    /// `listen`, replacing a socket file left there by an earlier multiplexer.
    pub async fn bind(serial: &Path, listen: &Path) -> Result<SerialMux, GuestError> {
        let stream = UnixStream::connect(serial)
            .await
            .map_err(|source| GuestError::Connect {
                path: serial.to_owned(),
                source,
            })?;
        match std::fs::remove_file(listen) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(GuestError::Listen {
                    path: listen.to_owned(),
                    source,
                });
            }
        }
        let listener = UnixListener::bind(listen).map_err(|source| GuestError::Listen {
            path: listen.to_owned(),
            source,
        })?;
        Ok(SerialMux {
            serial: stream,
            serial_path: serial.to_owned(),
            listener,
            listen_path: listen.to_owned(),
        })
    }

    /// The socket clients connect to.
    pub fn listen_path(&self) -> &Path {
        &self.listen_path
    }

    /// Serves clients until the serial stream ends (`Ok`), breaks (`Err`), or `stop` is
    /// cancelled (`Ok`). Every client is disconnected and the socket file removed on return.
    pub async fn run(self, stop: CancellationToken) -> Result<(), GuestError> {
        let SerialMux {
            serial,
            serial_path,
            listener,
            listen_path,
        } = self;
        let _socket_file = RemoveOnDrop(listen_path);
        let (serial_read, mut serial_write) = serial.into_split();
        let (to_stream, mut outgoing) = mpsc::channel::<Vec<u8>>(QUEUE_FRAMES);
        let routes: Routes = Arc::default();
        let mut clients = tokio::task::JoinSet::new();

        let writing = async {
            while let Some(frame) = outgoing.recv().await {
                serial_write
                    .write_all(&frame)
                    .await
                    .map_err(|source| GuestError::Send {
                        what: "a multiplexed frame",
                        source,
                    })?;
            }
            Ok::<(), GuestError>(())
        };
        let routing = route_agent_frames(serial_read, &serial_path, &routes);
        let accepting = async {
            loop {
                match listener.accept().await {
                    Ok((client, _)) => {
                        clients.spawn(serve_client(client, routes.clone(), to_stream.clone()));
                    }
                    // Out of descriptors and the like: the clients already in keep going.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
        };
        let outcome = tokio::select! {
            outcome = writing => outcome,
            outcome = routing => outcome,
            () = accepting => Ok(()),
            () = stop.cancelled() => Ok(()),
        };
        clients.abort_all();
        outcome
    }
}

/// Reads the agent's frames and hands each to the client holding its channel, until the
/// stream ends.
async fn route_agent_frames(
    serial_read: tokio::net::unix::OwnedReadHalf,
    serial_path: &Path,
    routes: &Routes,
) -> Result<(), GuestError> {
    let mut reader = BufReader::with_capacity(256 * 1024, serial_read);
    loop {
        let frame = match read_whole_frame(&mut reader).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(FrameError::Io(source)) => return Err(GuestError::Receive { source }),
            Err(FrameError::Header(message)) => {
                return Err(GuestError::Protocol {
                    during: "multiplexing",
                    message: format!("{} sent {message}", serial_path.display()),
                });
            }
        };
        let route = routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&frame.channel)
            .cloned();
        if let Some(route) = route {
            // A client that is gone has dropped its queue: nothing to deliver to.
            let _ = route.send(frame.bytes).await;
        }
    }
}

/// One client connection: its channel's frames to the stream, the agent's frames back, and
/// `Close` for the channel when either side of the client ends.
async fn serve_client(client: UnixStream, routes: Routes, to_stream: mpsc::Sender<Vec<u8>>) {
    let (client_read, mut client_write) = client.into_split();
    let mut reader = BufReader::with_capacity(128 * 1024, client_read);
    let Ok(Some(first)) = read_whole_frame(&mut reader).await else {
        return;
    };
    let channel = first.channel;
    if channel == 0 {
        return;
    }
    let (to_client, mut incoming) = mpsc::channel::<Vec<u8>>(QUEUE_FRAMES);
    {
        let mut routes = routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if routes.contains_key(&channel) {
            return;
        }
        routes.insert(channel, to_client);
    }
    let pumping = async {
        if to_stream.send(first.bytes).await.is_err() {
            return;
        }
        while let Ok(Some(frame)) = read_whole_frame(&mut reader).await {
            if frame.channel != channel || to_stream.send(frame.bytes).await.is_err() {
                return;
            }
        }
    };
    let delivering = async {
        while let Some(frame) = incoming.recv().await {
            let closes = frame.get(8) == Some(&(FrameType::Close as u8));
            if client_write.write_all(&frame).await.is_err() || closes {
                return;
            }
        }
    };
    tokio::select! {
        () = pumping => {}
        () = delivering => {}
    }
    routes
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(&channel);
    let _ = to_stream
        .send(encode_frame(FrameType::Close, channel, b""))
        .await;
}

/// A frame as read: its channel, and its header and payload as one buffer.
struct WholeFrame {
    channel: u32,
    bytes: Vec<u8>,
}

enum FrameError {
    Io(std::io::Error),
    Header(String),
}

/// The next whole frame, or `None` at a clean end of stream (between frames).
async fn read_whole_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<WholeFrame>, FrameError> {
    let mut header_bytes = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let read = reader
            .read(&mut header_bytes[filled..])
            .await
            .map_err(FrameError::Io)?;
        if read == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
        filled += read;
    }
    let header = FrameHeader::decode(&header_bytes)
        .map_err(|error| FrameError::Header(error.to_string()))?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + header.len as usize);
    bytes.extend_from_slice(&header_bytes);
    bytes.resize(HEADER_LEN + header.len as usize, 0);
    reader
        .read_exact(&mut bytes[HEADER_LEN..])
        .await
        .map_err(FrameError::Io)?;
    Ok(Some(WholeFrame {
        channel: header.channel,
        bytes,
    }))
}

/// Removes the multiplexer's socket file when it stops, however it stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
