//! Frames on a blocking byte stream: a reader that keeps its own buffer (so a poll loop can
//! ask whether a whole frame is already buffered before it sleeps) and a writer that sends
//! each frame with one `write_all`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};

use serde::Serialize;

use crate::protocol::{
    ErrorKind, ErrorReply, FrameHeader, FrameType, HEADER_LEN, HeaderError, encode_frame,
    encode_json_frame,
};

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

/// Why no frame could be read.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    /// The header announces an oversized payload: the stream cannot be trusted any more.
    Header(HeaderError),
    /// The stream ended in the middle of a frame.
    Truncated,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(error) => write!(f, "read failed: {error}"),
            ReadError::Header(error) => error.fmt(f),
            ReadError::Truncated => f.write_str("the stream ended inside a frame"),
        }
    }
}

/// Reads frames from a stream through a buffer it owns.
#[derive(Debug)]
pub struct FrameReader {
    stream: File,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
}

const READ_BUFFER: usize = 128 * 1024;

impl FrameReader {
    pub fn new(stream: File) -> FrameReader {
        FrameReader {
            stream,
            buffer: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
        }
    }

    /// The stream, for polling.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// A whole frame from the buffer, without touching the stream.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        let available = self.end - self.start;
        if available < HEADER_LEN {
            return Ok(None);
        }
        let mut header_bytes = [0u8; HEADER_LEN];
        header_bytes.copy_from_slice(&self.buffer[self.start..self.start + HEADER_LEN]);
        let header = FrameHeader::decode(&header_bytes).map_err(ReadError::Header)?;
        let total = HEADER_LEN + header.len as usize;
        if available < total {
            if self.buffer.len() < total {
                self.buffer.resize(total, 0);
            }
            return Ok(None);
        }
        let payload = self.buffer[self.start + HEADER_LEN..self.start + total].to_vec();
        self.start += total;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(Frame { header, payload }))
    }

    /// One `read` from the stream into the buffer (blocking). `false` at end of stream.
    pub fn fill(&mut self) -> io::Result<bool> {
        if self.end == self.buffer.len() {
            // Full: slide the partial frame to the front (buffered_frame grew the buffer to
            // fit a whole frame, so this always frees room).
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match self.stream.read(&mut self.buffer[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(count) => {
                    self.end += count;
                    return Ok(true);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// The next frame, blocking; `None` when the stream ends cleanly between frames.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.buffered_frame()? {
                return Ok(Some(frame));
            }
            if !self.fill().map_err(ReadError::Io)? {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated)
                };
            }
        }
    }
}

/// Writes frames to a stream, stamped with the channel of the request being answered.
#[derive(Debug)]
pub struct FrameWriter {
    stream: File,
    pub channel: u32,
}

impl FrameWriter {
    pub fn new(stream: File) -> FrameWriter {
        FrameWriter { stream, channel: 0 }
    }

    pub fn send_bytes(&mut self, kind: FrameType, payload: &[u8]) -> io::Result<()> {
        self.stream
            .write_all(&encode_frame(kind, self.channel, payload))
    }

    pub fn send_json<T: Serialize>(&mut self, kind: FrameType, message: &T) -> io::Result<()> {
        self.stream
            .write_all(&encode_json_frame(kind, self.channel, message))
    }

    pub fn send_error(&mut self, kind: ErrorKind, message: impl Into<String>) -> io::Result<()> {
        self.send_json(
            FrameType::Error,
            &ErrorReply {
                kind,
                message: message.into(),
            },
        )
    }
}

/// The protocol's error class for an I/O error.
pub fn error_kind(error: &io::Error) -> ErrorKind {
    match error.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        _ => ErrorKind::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (FrameReader, File) {
        let (left, right) = UnixStream::pair().unwrap();
        (
            FrameReader::new(File::from(std::os::fd::OwnedFd::from(left))),
            File::from(std::os::fd::OwnedFd::from(right)),
        )
    }

    #[test]
    fn frames_split_across_reads_and_batched_in_one_are_both_found() {
        let (mut reader, mut peer) = pair();
        let first = encode_frame(FrameType::Stdin, 3, b"hello");
        let second = encode_frame(FrameType::StdinEof, 3, b"");
        peer.write_all(&first[..4]).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut rest = first[4..].to_vec();
            rest.extend_from_slice(&second);
            peer.write_all(&rest).unwrap();
        });
        let frame = reader.next_frame().unwrap().unwrap();
        assert_eq!(frame.header.channel, 3);
        assert_eq!(frame.payload, b"hello");
        writer.join().unwrap();
        let frame = reader.next_frame().unwrap().unwrap();
        assert_eq!(frame.header.frame_type(), Some(FrameType::StdinEof));
        assert!(reader.next_frame().unwrap().is_none());
    }

    #[test]
    fn frames_larger_than_the_buffer_are_read_whole() {
        let (mut reader, mut peer) = pair();
        let payload: Vec<u8> = (0..crate::protocol::MAX_PAYLOAD).map(|i| i as u8).collect();
        let frame = encode_frame(FrameType::Data, 0, &payload);
        let writer = std::thread::spawn(move || peer.write_all(&frame).unwrap());
        let received = reader.next_frame().unwrap().unwrap();
        writer.join().unwrap();
        assert_eq!(received.payload, payload);
    }

    #[test]
    fn a_stream_cut_inside_a_frame_is_reported() {
        let (mut reader, mut peer) = pair();
        peer.write_all(&encode_frame(FrameType::Stdin, 0, b"abc")[..10])
            .unwrap();
        drop(peer);
        assert!(matches!(reader.next_frame(), Err(ReadError::Truncated)));
    }
}
