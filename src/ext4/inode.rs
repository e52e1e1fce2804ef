//! The 256-byte inode and the extent tree it roots: field encoding (32-bit ids, times with
//! nanoseconds and epoch bits, device numbers), extent lists and tree blocks, checksums.

use super::alloc::Run;
use super::checksum::crc32c;
use super::layout::{BLOCK_SIZE, INODE_SIZE, MAX_EXTENT_LEN};
use super::xattr::{self, EXTRA_ISIZE, Xattr};

pub(crate) const S_IFIFO: u16 = 0o010000;
pub(crate) const S_IFCHR: u16 = 0o020000;
pub(crate) const S_IFDIR: u16 = 0o040000;
pub(crate) const S_IFBLK: u16 = 0o060000;
pub(crate) const S_IFREG: u16 = 0o100000;
pub(crate) const S_IFLNK: u16 = 0o120000;
pub(crate) const S_IFSOCK: u16 = 0o140000;

pub(crate) const FLAG_INDEX: u32 = 0x1000;
pub(crate) const FLAG_EXTENTS: u32 = 0x8_0000;

const EXTENT_MAGIC: u16 = 0xF30A;
const EXTENT_ENTRY: usize = 12;
/// Extent (or index) entries that fit in the inode's 60-byte `i_block`.
const ROOT_ENTRIES: usize = 4;
/// Entries that fit in one tree block: (4096 − 12-byte header) / 12, leaving 4 bytes for the
/// checksum tail.
const BLOCK_ENTRIES: usize = (BLOCK_SIZE - EXTENT_ENTRY) / EXTENT_ENTRY;

/// One extent: `len` blocks of a file from logical block `logical` at physical `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub logical: u32,
    pub start: u64,
    pub len: u32,
}

/// Appends a run mapped at `logical`, merging with the previous extent when contiguous.
pub(crate) fn push_extent(extents: &mut Vec<Extent>, logical: u64, run: Run) {
    let mut logical = logical;
    let mut run = run;
    if let Some(last) = extents.last_mut()
        && u64::from(last.logical) + u64::from(last.len) == logical
        && last.start + u64::from(last.len) == run.start
    {
        let room = MAX_EXTENT_LEN - u64::from(last.len);
        let take = room.min(run.len);
        last.len += take as u32;
        logical += take;
        run.start += take;
        run.len -= take;
    }
    while run.len > 0 {
        let len = run.len.min(MAX_EXTENT_LEN);
        extents.push(Extent {
            logical: logical as u32,
            start: run.start,
            len: len as u32,
        });
        logical += len;
        run.start += len;
        run.len -= len;
    }
}

/// Tree blocks (leaves and index nodes) needed to map `extents` extents.
pub(crate) fn tree_blocks_needed(extents: usize) -> u64 {
    let mut total = 0;
    let mut entries = extents;
    while entries > ROOT_ENTRIES {
        let nodes = entries.div_ceil(BLOCK_ENTRIES);
        total += nodes as u64;
        entries = nodes;
    }
    total
}

fn write_header(out: &mut [u8], entries: usize, max: usize, depth: u16) {
    out[0..2].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
    out[2..4].copy_from_slice(&(entries as u16).to_le_bytes());
    out[4..6].copy_from_slice(&(max as u16).to_le_bytes());
    out[6..8].copy_from_slice(&depth.to_le_bytes());
    // eh_generation (8..12) stays 0.
}

fn write_leaf_entry(out: &mut [u8], extent: &Extent) {
    out[0..4].copy_from_slice(&extent.logical.to_le_bytes());
    out[4..6].copy_from_slice(&(extent.len as u16).to_le_bytes());
    out[6..8].copy_from_slice(&((extent.start >> 32) as u16).to_le_bytes());
    out[8..12].copy_from_slice(&(extent.start as u32).to_le_bytes());
}

fn write_index_entry(out: &mut [u8], logical: u32, child: u64) {
    out[0..4].copy_from_slice(&logical.to_le_bytes());
    out[4..8].copy_from_slice(&(child as u32).to_le_bytes());
    out[8..10].copy_from_slice(&((child >> 32) as u16).to_le_bytes());
}

/// Builds the extent tree for `extents` using `tree_blocks` (exactly
/// [`tree_blocks_needed`] of them) for its nodes; hands each node block to `emit` and
/// returns the root for `i_block`. `inode_seed` turns on tree block checksums.
pub(crate) fn build_extent_tree(
    extents: &[Extent],
    tree_blocks: &[u64],
    inode_seed: Option<u32>,
    mut emit: impl FnMut(u64, &[u8]),
) -> [u8; 60] {
    debug_assert_eq!(tree_blocks.len() as u64, tree_blocks_needed(extents.len()));
    let mut root = [0u8; 60];
    if extents.len() <= ROOT_ENTRIES {
        write_header(&mut root, extents.len(), ROOT_ENTRIES, 0);
        for (i, extent) in extents.iter().enumerate() {
            let at = EXTENT_ENTRY * (i + 1);
            write_leaf_entry(&mut root[at..at + EXTENT_ENTRY], extent);
        }
        return root;
    }
    let mut next_block = tree_blocks.iter().copied();
    let mut block = vec![0u8; BLOCK_SIZE];
    let mut finish_block = |block: &mut [u8], number: u64| {
        if let Some(seed) = inode_seed {
            let tail = EXTENT_ENTRY + EXTENT_ENTRY * BLOCK_ENTRIES;
            let crc = crc32c(seed, &block[..tail]);
            block[tail..tail + 4].copy_from_slice(&crc.to_le_bytes());
        }
        emit(number, block);
    };
    // Leaves, then index levels until the root can hold what is left.
    let mut level: Vec<(u32, u64)> = Vec::new();
    for chunk in extents.chunks(BLOCK_ENTRIES) {
        block.fill(0);
        write_header(&mut block, chunk.len(), BLOCK_ENTRIES, 0);
        for (i, extent) in chunk.iter().enumerate() {
            let at = EXTENT_ENTRY * (i + 1);
            write_leaf_entry(&mut block[at..at + EXTENT_ENTRY], extent);
        }
        let number = next_block.next().expect("tree blocks counted");
        finish_block(&mut block, number);
        level.push((chunk[0].logical, number));
    }
    let mut depth = 1u16;
    while level.len() > ROOT_ENTRIES {
        let mut upper = Vec::new();
        for chunk in level.chunks(BLOCK_ENTRIES) {
            block.fill(0);
            write_header(&mut block, chunk.len(), BLOCK_ENTRIES, depth);
            for (i, &(logical, child)) in chunk.iter().enumerate() {
                let at = EXTENT_ENTRY * (i + 1);
                write_index_entry(&mut block[at..at + EXTENT_ENTRY], logical, child);
            }
            let number = next_block.next().expect("tree blocks counted");
            finish_block(&mut block, number);
            upper.push((chunk[0].0, number));
        }
        level = upper;
        depth += 1;
    }
    write_header(&mut root, level.len(), ROOT_ENTRIES, depth);
    for (i, &(logical, child)) in level.iter().enumerate() {
        let at = EXTENT_ENTRY * (i + 1);
        write_index_entry(&mut root[at..at + EXTENT_ENTRY], logical, child);
    }
    root
}

/// Encodes a time as ext4 does: the low 32 bits of the seconds, and an extra word holding two
/// epoch bits (seconds beyond the signed 32-bit range, up to year 2446) and the nanoseconds.
pub(crate) fn encode_time(secs: i64, nanos: u32) -> (u32, u32) {
    const MIN: i64 = i32::MIN as i64;
    const MAX: i64 = i32::MAX as i64 + (3 << 32);
    let secs = secs.clamp(MIN, MAX);
    let nanos = nanos.min(999_999_999);
    let epoch = ((secs - i64::from(secs as i32)) >> 32) as u32 & 3;
    (secs as u32, epoch | (nanos << 2))
}

/// `i_block` of a device node: the old 16-bit encoding when both numbers fit in a byte (as the
/// kernel writes it), the new 32-bit one otherwise. `None` beyond 12-bit major, 20-bit minor.
pub(crate) fn device_block(major: u32, minor: u32) -> Option<[u8; 60]> {
    let mut block = [0u8; 60];
    if major < 256 && minor < 256 {
        block[0..4].copy_from_slice(&((major << 8) | minor).to_le_bytes());
    } else if major < (1 << 12) && minor < (1 << 20) {
        let encoded = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        block[4..8].copy_from_slice(&encoded.to_le_bytes());
    } else {
        return None;
    }
    Some(block)
}

/// Everything that goes into one on-disk inode.
#[derive(Debug)]
pub(crate) struct InodeFields<'a> {
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub time: (i64, u32),
    pub links: u16,
    /// Blocks in use (data, tree, attribute block), in file system blocks.
    pub blocks: u64,
    pub flags: u32,
    pub i_block: [u8; 60],
    pub xattr_block: u64,
    pub inline_xattrs: &'a [&'a Xattr],
}

/// The per-inode checksum seed: fs seed, inode number, generation (always 0 here).
pub(crate) fn inode_seed(fs_seed: u32, inode_number: u32) -> u32 {
    let seed = crc32c(fs_seed, &inode_number.to_le_bytes());
    crc32c(seed, &0u32.to_le_bytes())
}

/// Serializes `fields` into `out` (256 bytes, overwritten entirely).
pub(crate) fn encode_inode(
    fields: &InodeFields<'_>,
    inode_number: u32,
    fs_seed: Option<u32>,
    out: &mut [u8],
) {
    debug_assert_eq!(out.len(), INODE_SIZE);
    out.fill(0);
    let (time, time_extra) = encode_time(fields.time.0, fields.time.1);
    // i_blocks counts 512-byte sectors: 48 bits without the huge_file per-inode flag.
    let sectors = fields.blocks * (BLOCK_SIZE as u64 / 512);
    debug_assert!(sectors < 1 << 48);
    put16(out, 0x00, fields.mode);
    put16(out, 0x02, fields.uid as u16);
    put32(out, 0x04, fields.size as u32);
    put32(out, 0x08, time); // atime
    put32(out, 0x0C, time); // ctime
    put32(out, 0x10, time); // mtime
    put16(out, 0x18, fields.gid as u16);
    put16(out, 0x1A, fields.links);
    put32(out, 0x1C, sectors as u32);
    put32(out, 0x20, fields.flags);
    out[0x28..0x64].copy_from_slice(&fields.i_block);
    put32(out, 0x68, fields.xattr_block as u32);
    put32(out, 0x6C, (fields.size >> 32) as u32);
    put16(out, 0x74, (sectors >> 32) as u16);
    put16(out, 0x76, (fields.xattr_block >> 32) as u16);
    put16(out, 0x78, (fields.uid >> 16) as u16);
    put16(out, 0x7A, (fields.gid >> 16) as u16);
    put16(out, 0x80, EXTRA_ISIZE as u16);
    put32(out, 0x84, time_extra); // ctime
    put32(out, 0x88, time_extra); // mtime
    put32(out, 0x8C, time_extra); // atime
    put32(out, 0x90, time); // crtime
    put32(out, 0x94, time_extra);
    xattr::write_ibody(out, fields.inline_xattrs);
    if let Some(seed) = fs_seed {
        set_inode_checksum(out, inode_number, seed);
    }
}

/// An unused reserved inode as mke2fs leaves it: zero but for the extra-field size.
pub(crate) fn encode_reserved_inode(inode_number: u32, fs_seed: Option<u32>, out: &mut [u8]) {
    out.fill(0);
    put16(out, 0x80, EXTRA_ISIZE as u16);
    if let Some(seed) = fs_seed {
        set_inode_checksum(out, inode_number, seed);
    }
}

fn set_inode_checksum(out: &mut [u8], inode_number: u32, fs_seed: u32) {
    // Both checksum halves are zero while summing.
    let crc = crc32c(inode_seed(fs_seed, inode_number), out);
    put16(out, 0x7C, crc as u16);
    put16(out, 0x82, (crc >> 16) as u16);
}

pub(crate) fn put16(out: &mut [u8], at: usize, value: u16) {
    out[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn put32(out: &mut [u8], at: usize, value: u32) {
    out[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_and_split_at_max_length() {
        let mut extents = Vec::new();
        push_extent(
            &mut extents,
            0,
            Run {
                start: 100,
                len: 10,
            },
        );
        push_extent(&mut extents, 10, Run { start: 110, len: 5 });
        assert_eq!(
            extents,
            [Extent {
                logical: 0,
                start: 100,
                len: 15
            }]
        );
        push_extent(&mut extents, 20, Run { start: 115, len: 1 }); // a hole before it
        assert_eq!(extents.len(), 2);
        let mut long = Vec::new();
        push_extent(
            &mut long,
            0,
            Run {
                start: 0,
                len: 70_000,
            },
        );
        assert_eq!(
            long.iter().map(|e| e.len).collect::<Vec<_>>(),
            [32768, 32768, 4464]
        );
    }

    #[test]
    fn tree_sizes() {
        assert_eq!(tree_blocks_needed(4), 0);
        assert_eq!(tree_blocks_needed(5), 1);
        assert_eq!(tree_blocks_needed(340 * 4), 4);
        assert_eq!(tree_blocks_needed(340 * 4 + 1), 5 + 1);
    }

    #[test]
    fn deep_tree_points_at_its_blocks() {
        let extents: Vec<Extent> = (0..2000)
            .map(|i| Extent {
                logical: i * 2,
                start: 10_000 + u64::from(i) * 2,
                len: 1,
            })
            .collect();
        let blocks: Vec<u64> = (0..tree_blocks_needed(extents.len()))
            .map(|b| 500 + b)
            .collect();
        let mut emitted = Vec::new();
        let root = build_extent_tree(&extents, &blocks, None, |n, bytes| {
            emitted.push((n, bytes.to_vec()))
        });
        assert_eq!(emitted.len(), 7); // 6 leaves + 1 index block
        assert_eq!(u16::from_le_bytes([root[6], root[7]]), 2); // depth
        assert_eq!(u16::from_le_bytes([root[2], root[3]]), 1); // one index entry
        let index_block = &emitted[6].1;
        assert_eq!(u16::from_le_bytes([index_block[2], index_block[3]]), 6);
    }

    #[test]
    fn times_and_devices() {
        assert_eq!(encode_time(0, 5), (0, 5 << 2));
        assert_eq!(encode_time(-1, 0), (u32::MAX, 0));
        assert_eq!(encode_time(1 << 31, 0), (1 << 31, 1)); // 2038: epoch bit 1
        assert_eq!(device_block(1, 3).unwrap()[..4], [3, 1, 0, 0]);
        let big = device_block(259, 0x12345).unwrap();
        let word = u32::from_le_bytes(big[4..8].try_into().unwrap());
        assert_eq!(word, 0x45 | (259 << 8) | (0x12300 << 12));
        assert!(device_block(4096, 0).is_none());
    }
}
