//! The serial transport: one byte stream (a virtio-serial port) carrying many channels.
//!
//! Every frame names its channel in the header. The multiplexer turns each channel into an
//! ordinary connection, so the request code never knows it is on a serial line:
//!
//! 1. A frame for a channel the multiplexer has not seen opens it: a socket pair, one end
//!    served by [`handle_connection`] in its own thread like any accepted socket, the other
//!    end read by a forwarder thread.
//! 2. The multiplexer writes each client frame into its channel's socket; the forwarder
//!    copies each frame the connection writes back onto the serial stream with the channel's
//!    number, one whole frame per write under a lock.
//! 3. `Close` from the host ends a channel (its command, if any, is killed as on a dropped
//!    socket); when the connection ends on its own, the forwarder sends `Close` to the host.
//! 4. When the host side goes away (the port reads end of file), every channel is closed and
//!    the multiplexer waits for the next host, starting again from a clean frame boundary.
//!
//! Weakness: a channel whose connection stops reading (its command ignores stdin) blocks the
//! multiplexer's writes and so every other channel: head-of-line blocking, acceptable for a
//! fallback transport.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::protocol::{FrameHeader, FrameType, HEADER_LEN, encode_frame};
use crate::serve::{Agent, handle_connection};
use crate::wire::FrameReader;

/// Where the multiplexed stream comes from.
#[derive(Debug)]
pub enum SerialSource {
    /// A virtio-serial port device; the host connects and disconnects behind it.
    Device(PathBuf),
    /// Tests: a unix socket standing in for the VMM's chardev socket; each accepted
    /// connection is one host session.
    Listener(UnixListener),
}

/// The port the host side names `banger.0`: `/dev/virtio-ports/banger.0` when udev made the
/// link, else the `/dev/vportNpM` whose sysfs name is `banger.0`.
pub fn find_serial_port() -> Option<PathBuf> {
    let linked = Path::new("/dev/virtio-ports/banger.0");
    if linked.exists() {
        return Some(linked.to_owned());
    }
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    entries.flatten().find_map(|entry| {
        let name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (name.trim() == "banger.0").then(|| Path::new("/dev").join(entry.file_name()))
    })
}

/// Serves host sessions from `source`, one after another, forever.
pub fn serve_serial(agent: Arc<Agent>, source: SerialSource) -> io::Result<()> {
    match source {
        SerialSource::Listener(listener) => loop {
            let (stream, _) = listener.accept()?;
            serve_session(&agent, File::from(OwnedFd::from(stream)));
        },
        SerialSource::Device(path) => {
            let port = OpenOptions::new().read(true).write(true).open(&path)?;
            loop {
                wait_for_host(&port);
                serve_session(&agent, port.try_clone()?);
            }
        }
    }
}

/// Sleeps until the port has data. While no host is connected a virtio-serial port polls
/// as hung up and reads end of file, so this naps instead of spinning.
fn wait_for_host(port: &File) {
    loop {
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(port),
            PollFlags::POLLIN,
        )];
        let readable = poll(&mut fds, PollTimeout::from(1000u16)).is_ok()
            && fds[0]
                .revents()
                .is_some_and(|events| events.contains(PollFlags::POLLIN));
        if readable {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One host session: demultiplexes frames into channels until the stream ends.
fn serve_session(agent: &Arc<Agent>, stream: File) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let output = Arc::new(Mutex::new(write_half));
    let mut reader = FrameReader::new(stream);
    let mut channels: HashMap<u32, UnixStream> = HashMap::new();
    // Ends at end of stream (host gone) or on a header that breaks framing: either way the
    // channels of this session are dropped, which ends their connections.
    while let Ok(Some(frame)) = reader.next_frame() {
        let id = frame.header.channel;
        if frame.header.frame_type() == Some(FrameType::Close) {
            if let Some(channel) = channels.remove(&id) {
                let _ = channel.shutdown(std::net::Shutdown::Both);
            }
            continue;
        }
        let channel = match channels.entry(id) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                match open_channel(agent, id, &output) {
                    Ok(channel) => entry.insert(channel),
                    Err(_) => continue,
                }
            }
        };
        let mut bytes = frame.header.encode().to_vec();
        bytes.extend_from_slice(&frame.payload);
        if channel.write_all(&bytes).is_err() {
            // The connection ended (its forwarder has sent Close): forget it.
            channels.remove(&id);
        }
    }
    for channel in channels.into_values() {
        let _ = channel.shutdown(std::net::Shutdown::Both);
    }
}

/// Starts a connection for channel `id` and the forwarder that copies its frames out.
fn open_channel(agent: &Arc<Agent>, id: u32, output: &Arc<Mutex<File>>) -> io::Result<UnixStream> {
    let (inner, outer) = UnixStream::pair()?;
    let forward_from = outer.try_clone()?;
    let connection_agent = Arc::clone(agent);
    std::thread::Builder::new()
        .name("serial-channel".into())
        .spawn(move || handle_connection(connection_agent, File::from(OwnedFd::from(inner))))?;
    let output = Arc::clone(output);
    std::thread::Builder::new()
        .name("serial-forward".into())
        .spawn(move || forward(id, forward_from, &output))?;
    Ok(outer)
}

/// Copies a connection's frames to the serial stream as channel `id`, then sends `Close`.
fn forward(id: u32, from: UnixStream, output: &Mutex<File>) {
    let mut reader = FrameReader::new(File::from(OwnedFd::from(from)));
    let write = |bytes: &[u8]| {
        let mut output = output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        output.write_all(bytes)
    };
    while let Ok(Some(frame)) = reader.next_frame() {
        let header = FrameHeader {
            channel: id,
            ..frame.header
        };
        let mut bytes = Vec::with_capacity(HEADER_LEN + frame.payload.len());
        bytes.extend_from_slice(&header.encode());
        bytes.extend_from_slice(&frame.payload);
        if write(&bytes).is_err() {
            return;
        }
    }
    let _ = write(&encode_frame(FrameType::Close, id, b""));
}
