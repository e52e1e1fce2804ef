//! The superblock, group descriptors and the journal's (JBD2) superblock.

use super::checksum::crc32c;
use super::inode::{put16, put32};
use super::layout::{
    BLOCKS_PER_GROUP, DESCRIPTOR_SIZE, FIRST_INODE, Geometry, INODE_SIZE, JOURNAL_INODE,
    LOG_BLOCK_SIZE, LOG_GROUPS_PER_FLEX,
};
use super::xattr::EXTRA_ISIZE;

const MAGIC: u16 = 0xEF53;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;

const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_FLEX_BG: u32 = 0x200;

const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// `s_default_mount_opts`: `user_xattr` and `acl`, as mke2fs.conf's defaults, so the guest
/// honours the POSIX ACLs stored here without mount options.
const DEFAULT_MOUNT_OPTS: u32 = 0x4 | 0x8;
/// `s_flags`: directory hashes use unsigned chars (stated, so every kernel agrees).
const FLAGS_UNSIGNED_HASH: u32 = 0x2;
const HASH_HALF_MD4: u8 = 1;
/// `s_jnl_backup_type`: `s_jnl_blocks` holds a copy of the journal inode's block map.
const JOURNAL_BACKUP_BLOCKS: u8 = 1;

/// Group descriptor flag: the inode table is zeroed (meaningful under `metadata_csum`).
pub(crate) const BG_INODE_ZEROED: u16 = 0x4;

/// The journal as the superblock records it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JournalRecord {
    pub i_block: [u8; 60],
    pub size: u64,
}

/// Everything the superblock records.
#[derive(Debug, Clone)]
pub(crate) struct SuperblockFields {
    pub geometry: Geometry,
    pub free_blocks: u64,
    pub free_inodes: u64,
    pub reserved_blocks: u64,
    pub uuid: [u8; 16],
    pub hash_seed: [u8; 16],
    pub label: [u8; 16],
    pub timestamp: u32,
    pub journal: Option<JournalRecord>,
    pub csum: bool,
}

/// The seed of every `metadata_csum` checksum: CRC32C of the UUID.
pub(crate) fn csum_seed(uuid: &[u8; 16]) -> u32 {
    crc32c(!0, uuid)
}

/// Serializes the superblock copy kept in `group` into `out` (1024 bytes).
pub(crate) fn encode_superblock(fields: &SuperblockFields, group: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), 1024);
    out.fill(0);
    let g = &fields.geometry;
    put32(out, 0x00, g.inodes() as u32);
    put32(out, 0x04, g.blocks as u32);
    put32(out, 0x08, fields.reserved_blocks as u32);
    put32(out, 0x0C, fields.free_blocks as u32);
    put32(out, 0x10, fields.free_inodes as u32);
    put32(out, 0x14, 0); // s_first_data_block: 0 with 4 KiB blocks
    put32(out, 0x18, LOG_BLOCK_SIZE);
    put32(out, 0x1C, LOG_BLOCK_SIZE); // cluster size = block size
    put32(out, 0x20, BLOCKS_PER_GROUP as u32);
    put32(out, 0x24, BLOCKS_PER_GROUP as u32);
    put32(out, 0x28, g.inodes_per_group);
    put32(out, 0x30, fields.timestamp); // s_wtime
    put16(out, 0x36, u16::MAX); // s_max_mnt_count: -1, no forced checks
    put16(out, 0x38, MAGIC);
    put16(out, 0x3A, 1); // s_state: clean
    put16(out, 0x3C, 1); // s_errors: continue
    put32(out, 0x40, fields.timestamp); // s_lastcheck
    put32(out, 0x4C, 1); // s_rev_level: dynamic
    put32(out, 0x54, FIRST_INODE);
    put16(out, 0x58, INODE_SIZE as u16);
    put16(out, 0x5A, group as u16);
    let mut compat = COMPAT_EXT_ATTR | COMPAT_DIR_INDEX;
    let mut incompat = INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG;
    let mut ro_compat = RO_COMPAT_SPARSE_SUPER
        | RO_COMPAT_LARGE_FILE
        | RO_COMPAT_HUGE_FILE
        | RO_COMPAT_DIR_NLINK
        | RO_COMPAT_EXTRA_ISIZE;
    if fields.journal.is_some() {
        compat |= COMPAT_HAS_JOURNAL;
    }
    if g.meta_bg() {
        incompat |= INCOMPAT_META_BG;
    }
    if fields.csum {
        ro_compat |= RO_COMPAT_METADATA_CSUM;
    }
    put32(out, 0x5C, compat);
    put32(out, 0x60, incompat);
    put32(out, 0x64, ro_compat);
    out[0x68..0x78].copy_from_slice(&fields.uuid);
    out[0x78..0x88].copy_from_slice(&fields.label);
    if let Some(journal) = &fields.journal {
        put32(out, 0xE0, JOURNAL_INODE);
        // s_jnl_blocks: i_block, then i_size_high, i_size.
        out[0x10C..0x148].copy_from_slice(&journal.i_block);
        put32(out, 0x148, (journal.size >> 32) as u32);
        put32(out, 0x14C, journal.size as u32);
        out[0xFD] = JOURNAL_BACKUP_BLOCKS;
    }
    out[0xEC..0xFC].copy_from_slice(&fields.hash_seed);
    out[0xFC] = HASH_HALF_MD4;
    put32(out, 0x100, DEFAULT_MOUNT_OPTS);
    put32(out, 0x104, u32::from(g.meta_bg())); // s_first_meta_bg
    put32(out, 0x108, fields.timestamp); // s_mkfs_time
    put32(out, 0x150, (g.blocks >> 32) as u32);
    put32(out, 0x154, (fields.reserved_blocks >> 32) as u32);
    put32(out, 0x158, (fields.free_blocks >> 32) as u32);
    put16(out, 0x15C, EXTRA_ISIZE as u16); // s_min_extra_isize
    put16(out, 0x15E, EXTRA_ISIZE as u16); // s_want_extra_isize
    put32(out, 0x160, FLAGS_UNSIGNED_HASH);
    out[0x174] = LOG_GROUPS_PER_FLEX;
    if fields.csum {
        out[0x175] = 1; // s_checksum_type: crc32c
        let crc = crc32c(!0, &out[..0x3FC]);
        put32(out, 0x3FC, crc);
    }
}

/// One group's descriptor.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GroupDescriptor {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub free_blocks: u32,
    pub free_inodes: u32,
    pub used_dirs: u32,
    pub flags: u16,
    pub itable_unused: u32,
    pub block_bitmap_csum: u32,
    pub inode_bitmap_csum: u32,
}

/// Serializes descriptor `group` into `out` (32 bytes).
pub(crate) fn encode_descriptor(
    desc: &GroupDescriptor,
    group: u64,
    fs_seed: Option<u32>,
    out: &mut [u8],
) {
    debug_assert_eq!(out.len(), DESCRIPTOR_SIZE);
    out.fill(0);
    put32(out, 0x00, desc.block_bitmap as u32);
    put32(out, 0x04, desc.inode_bitmap as u32);
    put32(out, 0x08, desc.inode_table as u32);
    put16(out, 0x0C, desc.free_blocks as u16);
    put16(out, 0x0E, desc.free_inodes as u16);
    put16(out, 0x10, desc.used_dirs as u16);
    put16(out, 0x12, desc.flags);
    if let Some(seed) = fs_seed {
        // 32-byte descriptors keep only the low halves of the bitmap checksums.
        put16(out, 0x18, desc.block_bitmap_csum as u16);
        put16(out, 0x1A, desc.inode_bitmap_csum as u16);
        put16(out, 0x1C, desc.itable_unused as u16);
        let crc = crc32c(seed, &(group as u32).to_le_bytes());
        let crc = crc32c(crc, out);
        put16(out, 0x1E, crc as u16);
    }
}

/// Serializes a clean, empty JBD2 (v2) superblock for a journal of `blocks` blocks into `out`
/// (one block). Big-endian, like all of JBD2. `s_start = 0` says there is nothing to replay,
/// so the rest of the journal may hold anything (here: holes).
pub(crate) fn encode_journal_superblock(blocks: u32, uuid: &[u8; 16], out: &mut [u8]) {
    out.fill(0);
    let mut put = |at: usize, value: u32| out[at..at + 4].copy_from_slice(&value.to_be_bytes());
    put(0x00, 0xC03B_3998); // h_magic
    put(0x04, 4); // h_blocktype: superblock v2
    put(0x0C, super::layout::BLOCK_SIZE as u32);
    put(0x10, blocks); // s_maxlen
    put(0x14, 1); // s_first
    put(0x18, 1); // s_sequence
    put(0x40, 1); // s_nr_users
    out[0x30..0x40].copy_from_slice(uuid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_checksum_covers_group_number() {
        let desc = GroupDescriptor {
            block_bitmap: 3,
            ..GroupDescriptor::default()
        };
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        encode_descriptor(&desc, 0, Some(7), &mut a);
        encode_descriptor(&desc, 1, Some(7), &mut b);
        assert_eq!(a[..0x1E], b[..0x1E]);
        assert_ne!(a[0x1E..], b[0x1E..]);
    }
}
