//! Block writes to the image file: appends are gathered into one large buffer and written with
//! one `pwrite` per few MiB; writes elsewhere (into freed ranges, metadata) go straight out.
//! The image is created empty, so blocks never written read as zeros (holes).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::alloc::Run;
use super::layout::{BLOCK_SIZE, BLOCK_SIZE_U64};

/// Size of the append buffer: large enough that write syscalls cost nothing next to copying.
const BUFFER_BYTES: usize = 8 << 20;

#[derive(Debug)]
pub(crate) struct BlockWriter {
    file: File,
    buffer: Vec<u8>,
    /// Block number of `buffer[0]`.
    buffer_start: u64,
}

impl BlockWriter {
    pub fn new(file: File) -> BlockWriter {
        BlockWriter {
            file,
            buffer: Vec::with_capacity(BUFFER_BYTES),
            buffer_start: 0,
        }
    }

    fn buffer_end(&self) -> u64 {
        self.buffer_start + (self.buffer.len() / BLOCK_SIZE) as u64
    }

    /// Writes whole blocks starting at block `block`.
    pub fn write(&mut self, block: u64, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(data.len() % BLOCK_SIZE, 0);
        let blocks = (data.len() / BLOCK_SIZE) as u64;
        let end = block + blocks;
        if self.buffer.is_empty() {
            self.buffer_start = block;
        }
        let (buffer_start, buffer_end) = (self.buffer_start, self.buffer_end());
        if end <= buffer_start || block > buffer_end {
            // Disjoint from the buffer. A forward jump starts a new buffer (the pattern of the
            // metadata region); anything else, or anything large, goes straight out.
            if block > buffer_end && data.len() < BUFFER_BYTES / 2 {
                self.flush()?;
                self.buffer_start = block;
                self.buffer.extend_from_slice(data);
                return Ok(());
            }
            return self.write_direct(block, data);
        }
        let mut data = data;
        let mut block = block;
        if block < buffer_start {
            let before = ((buffer_start - block) as usize) * BLOCK_SIZE;
            self.write_direct(block, &data[..before])?;
            data = &data[before..];
            block = buffer_start;
        }
        // Overwrite the part already buffered, then append the rest.
        let offset = ((block - buffer_start) as usize) * BLOCK_SIZE;
        let overlap = (self.buffer.len() - offset).min(data.len());
        self.buffer[offset..offset + overlap].copy_from_slice(&data[..overlap]);
        let rest = &data[overlap..];
        if rest.is_empty() {
            return Ok(());
        }
        let rest_block = buffer_end;
        if self.buffer.len() + rest.len() <= BUFFER_BYTES {
            self.buffer.extend_from_slice(rest);
            return Ok(());
        }
        self.flush()?;
        if rest.len() >= BUFFER_BYTES / 2 {
            self.write_direct(rest_block, rest)
        } else {
            self.buffer_start = rest_block;
            self.buffer.extend_from_slice(rest);
            Ok(())
        }
    }

    fn write_direct(&mut self, block: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, block * BLOCK_SIZE_U64)
    }

    /// Drops buffered blocks from `block` on (they were freed before reaching the disk).
    pub fn discard_from(&mut self, block: u64) {
        if block >= self.buffer_start && block < self.buffer_end() {
            self.buffer
                .truncate(((block - self.buffer_start) as usize) * BLOCK_SIZE);
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            self.file
                .write_all_at(&self.buffer, self.buffer_start * BLOCK_SIZE_U64)?;
            self.buffer.clear();
        }
        Ok(())
    }

    /// Makes `run` read as zeros and take no space: punches a hole, or writes zeros where the
    /// host file system cannot punch.
    pub fn zero(&mut self, run: Run) -> io::Result<()> {
        self.flush()?;
        let offset = (run.start * BLOCK_SIZE_U64) as i64;
        let len = (run.len * BLOCK_SIZE_U64) as i64;
        let punched = nix::fcntl::fallocate(
            &self.file,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
        if punched.is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; BUFFER_BYTES.min((run.len * BLOCK_SIZE_U64) as usize)];
        let mut block = run.start;
        while block < run.end() {
            let count = ((run.end() - block) as usize).min(zeros.len() / BLOCK_SIZE);
            self.write_direct(block, &zeros[..count * BLOCK_SIZE])?;
            block += count as u64;
        }
        Ok(())
    }

    pub fn set_len(&mut self, bytes: u64) -> io::Result<()> {
        self.flush()?;
        self.file.set_len(bytes)
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_of(byte: u8, blocks: usize) -> Vec<u8> {
        vec![byte; blocks * BLOCK_SIZE]
    }

    #[test]
    fn appends_overwrites_and_scattered_writes_land_in_place() {
        let file = tempfile::tempfile().unwrap();
        let mut writer = BlockWriter::new(file.try_clone().unwrap());
        writer.write(2, &block_of(1, 3)).unwrap(); // blocks 2..5
        writer.write(5, &block_of(2, 2)).unwrap(); // append: 5..7
        writer.write(4, &block_of(3, 2)).unwrap(); // overlap 4..6
        writer.write(0, &block_of(4, 1)).unwrap(); // before the buffer
        writer.write(20, &block_of(5, 1)).unwrap(); // forward jump
        writer.discard_from(21);
        writer.set_len(24 * BLOCK_SIZE_U64).unwrap();
        let mut bytes = vec![0u8; 24 * BLOCK_SIZE];
        file.read_exact_at(&mut bytes, 0).unwrap();
        let firsts: Vec<u8> = bytes.chunks(BLOCK_SIZE).map(|b| b[0]).collect();
        assert_eq!(&firsts[..8], &[4, 0, 1, 1, 3, 3, 2, 0]);
        assert_eq!(firsts[20], 5);
        writer.zero(Run { start: 2, len: 2 }).unwrap();
        file.read_exact_at(&mut bytes, 0).unwrap();
        assert_eq!(
            bytes[2 * BLOCK_SIZE..4 * BLOCK_SIZE],
            vec![0; 2 * BLOCK_SIZE][..]
        );
    }
}
