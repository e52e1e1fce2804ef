//! Sparse files: where a file holds data, so that readers can skip its holes.
//!
//! Reading a hole is not free: the kernel allocates a zeroed page-cache page for each page of
//! it. On this project's reference host `cat` of a fresh 1 GiB hole took 0.19–1.13 s, so
//! hashing or copying a mostly-empty disk image by plain reads spends much of its time making
//! zeros.

use std::fs::File;
use std::io;

/// The `[start, end)` ranges of the first `size` bytes of `file` that hold data, in order
/// (`SEEK_DATA`/`SEEK_HOLE`). A file system without hole reporting answers with the whole
/// file as one range, which is correct, only slower.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let mut extents = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let start = match lseek(file, offset as i64, Whence::SeekData) {
            Ok(start) => start as u64,
            // No data after `offset`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(errno) => return Err(errno.into()),
        };
        if start >= size {
            break;
        }
        let end = (lseek(file, start as i64, Whence::SeekHole)? as u64).min(size);
        extents.push((start, end));
        offset = end;
    }
    Ok(extents)
}

const CHUNK: usize = 1 << 20;

/// A piece of a file handed over by [`read_sparse`].
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    /// Where in the file the bytes start.
    pub offset: u64,
    /// The file's bytes there: zeros when `hole`.
    pub bytes: &'a [u8],
    /// The bytes are a hole's: a copy can leave them unwritten and stay sparse.
    pub hole: bool,
}

/// Why [`read_sparse`] stopped.
#[derive(Debug)]
pub enum SparseReadError<E> {
    /// The file could not be read; `UnexpectedEof` when it shrank while it was read.
    Read(io::Error),
    /// The consumer refused a chunk.
    Consumer(E),
}

/// Feeds all of `file` to `consume` in order, in chunks of at most 1 MiB, reading only its
/// data: holes are passed as zeros from memory. The bytes seen are exactly those a plain read
/// would return. Stops at the first error `consume` returns. Returns the file's size.
pub fn read_sparse<E>(
    file: &File,
    mut consume: impl FnMut(Chunk<'_>) -> Result<(), E>,
) -> Result<u64, SparseReadError<E>> {
    use std::os::unix::fs::FileExt;
    let size = file.metadata().map_err(SparseReadError::Read)?.len();
    let extents = data_extents(file, size).map_err(SparseReadError::Read)?;
    let mut buffer = vec![0u8; CHUNK];
    let mut offset = 0u64;
    for (start, end) in extents {
        feed_zeros(offset, start, &mut consume)?;
        let mut at = start;
        while at < end {
            let want = (end - at).min(CHUNK as u64) as usize;
            let read = file
                .read_at(&mut buffer[..want], at)
                .map_err(SparseReadError::Read)?;
            if read == 0 {
                return Err(SparseReadError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file shrank to {at} bytes while it was read"),
                )));
            }
            consume(Chunk {
                offset: at,
                bytes: &buffer[..read],
                hole: false,
            })
            .map_err(SparseReadError::Consumer)?;
            at += read as u64;
        }
        offset = end;
    }
    feed_zeros(offset, size, &mut consume)?;
    Ok(size)
}

/// The hole `[from, to)` as chunks of zeros.
fn feed_zeros<E>(
    mut from: u64,
    to: u64,
    consume: &mut impl FnMut(Chunk<'_>) -> Result<(), E>,
) -> Result<(), SparseReadError<E>> {
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    while from < to {
        let take = (to - from).min(CHUNK as u64) as usize;
        consume(Chunk {
            offset: from,
            bytes: &ZEROS[..take],
            hole: true,
        })
        .map_err(SparseReadError::Consumer)?;
        from += take as u64;
    }
    Ok(())
}

/// The block size [`punch_zero_blocks`] frees by: the page and file system block size here.
const PUNCH_BLOCK: usize = 4096;

/// Frees the blocks of `file` (open for writing) that hold only zeros, leaving holes that read
/// as the same zeros: a VMM's memory dump writes every page of the guest, most of them never
/// touched. Returns the bytes freed. The contents read the same before and after.
pub fn punch_zero_blocks(file: &File) -> io::Result<u64> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let scanned = read_sparse(file, |chunk| {
        if chunk.hole {
            return Ok::<(), io::Error>(());
        }
        for (index, block) in chunk.bytes.chunks(PUNCH_BLOCK).enumerate() {
            // Only whole blocks: a file's partial last block stays as it is.
            if block.len() < PUNCH_BLOCK || block.iter().any(|byte| *byte != 0) {
                continue;
            }
            let start = chunk.offset + (index * PUNCH_BLOCK) as u64;
            match runs.last_mut() {
                Some((_, end)) if *end == start => *end += PUNCH_BLOCK as u64,
                _ => runs.push((start, start + PUNCH_BLOCK as u64)),
            }
        }
        Ok(())
    });
    match scanned {
        Ok(_) => {}
        Err(SparseReadError::Read(error) | SparseReadError::Consumer(error)) => {
            return Err(error);
        }
    }
    let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let mut freed = 0;
    for (start, end) in runs {
        fallocate(file, mode, start as i64, (end - start) as i64)?;
        freed += end - start;
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    /// A file with data, a hole, data, and a trailing hole; its plain contents beside it.
    fn holey_file(dir: &std::path::Path) -> (File, Vec<u8>) {
        let path = dir.join("holey");
        let mut file = File::create(&path).unwrap();
        file.write_all(&[7u8; 5000]).unwrap();
        file.write_all_at(&[9u8; 3000], 3 << 20).unwrap();
        file.set_len(5 << 20).unwrap();
        drop(file);
        let plain = std::fs::read(&path).unwrap();
        (File::open(&path).unwrap(), plain)
    }

    #[test]
    fn sparse_reading_sees_the_bytes_a_plain_read_sees() {
        let dir = tempfile::tempdir().unwrap();
        let (file, plain) = holey_file(dir.path());
        let mut seen = Vec::new();
        let mut holes = 0;
        let size = read_sparse(&file, |chunk| {
            assert_eq!(chunk.offset, seen.len() as u64, "chunks out of order");
            if chunk.hole {
                assert!(chunk.bytes.iter().all(|byte| *byte == 0));
                holes += chunk.bytes.len();
            }
            seen.extend_from_slice(chunk.bytes);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(size, plain.len() as u64);
        assert!(holes >= 2 << 20, "only {holes} bytes came as holes");
        assert_eq!(seen.len(), plain.len());
        assert!(seen == plain, "the sparse read differs from the plain read");
    }

    #[test]
    fn extents_cover_the_data_and_skip_the_big_hole() {
        let dir = tempfile::tempdir().unwrap();
        let (file, plain) = holey_file(dir.path());
        let extents = data_extents(&file, plain.len() as u64).unwrap();
        let covered: u64 = extents.iter().map(|(start, end)| end - start).sum();
        assert!(
            extents
                .iter()
                .any(|(start, end)| *start == 0 && *end >= 5000)
        );
        assert!(
            extents
                .iter()
                .any(|(start, end)| *start <= 3 << 20 && *end >= (3 << 20) + 3000)
        );
        // The file system may round to its blocks, but never reports the 3 MiB hole as data.
        assert!(covered < 1 << 20, "{extents:?}");
    }

    #[test]
    fn zero_blocks_are_freed_and_the_contents_read_the_same() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mut plain = vec![0u8; 64 * PUNCH_BLOCK + 100];
        plain[5] = 1;
        plain[10 * PUNCH_BLOCK + 7] = 2;
        // A zero block between two data blocks, and the unaligned tail with data.
        plain[12 * PUNCH_BLOCK] = 3;
        plain[64 * PUNCH_BLOCK + 50] = 4;
        std::fs::write(&path, &plain).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let before = file.metadata().unwrap().blocks() * 512;
        let freed = punch_zero_blocks(&file).unwrap();
        // Blocks 0, 10 and 12 and the tail hold data: 61 of the 64 whole blocks are zeros.
        assert_eq!(freed, 61 * PUNCH_BLOCK as u64);
        let after = file.metadata().unwrap().blocks() * 512;
        assert!(after + freed <= before, "{before} -> {after}");
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), plain);
        // Again: nothing more to free.
        let file = File::options().read(true).write(true).open(&path).unwrap();
        assert_eq!(punch_zero_blocks(&file).unwrap(), 0);
    }
}
