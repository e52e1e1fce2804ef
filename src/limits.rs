//! Caps on what banger reads from peers it does not control (a client of the daemon, QEMU's
//! monitor, a guest's console), so that no input makes it allocate without bound. Each cap
//! is named in the error that enforces it.
//!
//! A foundation module: it imports nothing of banger's.

use std::io::Read;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// The longest daemon request line (a request is a few hundred bytes of JSON).
pub const DAEMON_REQUEST_LINE: usize = 1 << 20;

/// The longest QMP line (QEMU's replies to banger's commands are small).
pub const QMP_LINE: usize = 1 << 20;

/// How much of the end of a console log is read to show its last lines.
pub const CONSOLE_TAIL_BYTES: u64 = 64 << 10;

/// The largest tar extension entry (a GNU long name or link, a pax header) read from a layer
/// or bundle: the tar reader keeps each one whole in memory.
pub const TAR_EXTENSION_BYTES: u64 = 1 << 20;

/// A tar stream, passed through unchanged, that fails with `InvalidData` at a GNU long-name
/// (`L`, `K`) or pax (`x`, `g`) entry larger than `max` bytes, before the tar reader
/// buffers it. It follows the stream's 512-byte blocks: each header gives the size of the
/// data blocks that follow it.
#[derive(Debug)]
pub struct TarExtensionCap<R> {
    inner: R,
    max: u64,
    /// Bytes of the current header block read so far.
    header: Vec<u8>,
    /// Bytes of entry data (padded to whole blocks) still to pass before the next header.
    data_left: u64,
}

impl<R> TarExtensionCap<R> {
    pub fn new(inner: R, max: u64) -> TarExtensionCap<R> {
        TarExtensionCap {
            inner,
            max,
            header: Vec::with_capacity(512),
            data_left: 0,
        }
    }

    /// Follows the block structure through `bytes`, just read.
    fn follow(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.data_left > 0 {
                let skip = self.data_left.min(bytes.len() as u64);
                self.data_left -= skip;
                bytes = &bytes[skip as usize..];
                continue;
            }
            let take = (512 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.header.len() == 512 {
                let kind = self.header[156];
                // A size the tar reader cannot parse is its error to report.
                let size = tar_size(&self.header[124..136]).unwrap_or(0);
                if matches!(kind, b'L' | b'K' | b'x' | b'g') && size > self.max {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "a tar extension entry (type `{}`) of {size} bytes, more than the \
                             {}-byte limit",
                            char::from(kind),
                            self.max
                        ),
                    ));
                }
                self.data_left = size.div_ceil(512).saturating_mul(512);
                self.header.clear();
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for TarExtensionCap<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.follow(&buf[..read])?;
        Ok(read)
    }
}

/// A tar header's size field: octal digits (space or NUL padded), or base-256 when the first
/// byte's high bit is set.
fn tar_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut size: u64 = u64::from(field[0] & 0x7f);
        for &byte in &field[1..] {
            size = size.checked_mul(256)?.checked_add(u64::from(byte))?;
        }
        return Some(size);
    }
    let text = std::str::from_utf8(field).ok()?;
    let digits = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

/// Reads one line (with its `\n`, if any) into `line`, replacing what it held. Returns the
/// bytes read, 0 at the end of input. A line longer than `max` bytes is an `InvalidData`
/// error naming the cap, and nothing of it is kept.
pub async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    line.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(line.len());
        }
        let (take, complete) = match available.iter().position(|&byte| byte == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (available.len(), false),
        };
        if line.len() + take > max {
            line.clear();
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a line longer than the {max}-byte limit"),
            ));
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if complete {
            return Ok(line.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, Vec<u8>)], long_name: usize) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            let name = if long_name > 0 {
                format!("{}/{name}", "d".repeat(long_name))
            } else {
                (*name).to_owned()
            };
            builder.append_data(&mut header, name, &data[..]).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn read_through(tar: &[u8], max: u64, chunk: usize) -> std::io::Result<Vec<u8>> {
        // Reads in `chunk`-byte pieces, so headers straddle reads.
        let mut capped = TarExtensionCap::new(tar, max);
        let mut out = Vec::new();
        let mut buf = vec![0; chunk];
        loop {
            let read = capped.read(&mut buf)?;
            if read == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..read]);
        }
    }

    #[test]
    fn tar_streams_pass_unchanged_and_oversized_extensions_are_refused() {
        let entries = [
            ("a", vec![7u8; 1000]),
            ("b", Vec::new()),
            ("c", vec![1; 513]),
        ];
        // A 300-byte name takes a GNU long-name entry of 300+ bytes.
        let tar = tar_of(&entries, 300);
        for chunk in [1, 7, 512, 4096] {
            assert_eq!(
                read_through(&tar, 1024, chunk).unwrap(),
                tar,
                "chunk {chunk}"
            );
            let error = read_through(&tar, 100, chunk).unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
            assert!(error.to_string().contains("type `L`"), "{error}");
            assert!(error.to_string().contains("100-byte limit"), "{error}");
        }
        // Ordinary data larger than the cap is not an extension.
        let plain = tar_of(&[("big", vec![0; 10_000])], 0);
        assert_eq!(read_through(&plain, 100, 333).unwrap(), plain);
    }

    #[test]
    fn tar_sizes_parse_in_octal_and_base_256() {
        assert_eq!(tar_size(b"00000001750\0"), Some(1000));
        assert_eq!(tar_size(b"     1750 \0\0"), Some(1000));
        assert_eq!(
            tar_size(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0]),
            Some(4096)
        );
        assert_eq!(tar_size(b"\0\0\0\0\0\0\0\0\0\0\0\0"), Some(0));
        assert_eq!(tar_size(b"99999999999\0"), None);
    }

    #[tokio::test]
    async fn lines_are_read_whole_and_an_endless_one_is_refused() {
        let input = b"first\nsecond without end".to_vec();
        let mut reader = tokio::io::BufReader::with_capacity(4, &input[..]);
        let mut line = Vec::new();
        assert_eq!(
            read_line_capped(&mut reader, 16, &mut line).await.unwrap(),
            6
        );
        assert_eq!(line, b"first\n");
        let error = read_line_capped(&mut reader, 16, &mut line)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("16-byte limit"), "{error}");
        assert!(line.is_empty());
        let mut reader = tokio::io::BufReader::new(&b"last"[..]);
        assert_eq!(
            read_line_capped(&mut reader, 16, &mut line).await.unwrap(),
            4
        );
        assert_eq!(
            read_line_capped(&mut reader, 16, &mut line).await.unwrap(),
            0
        );
    }
}
