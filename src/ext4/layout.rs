//! Fixed geometry of the images this writer makes, and the pure arithmetic on it: where the
//! superblock copies and descriptor blocks sit, how many groups and inodes a size gets, how big
//! the journal is. No I/O.

/// Block size. Always 4 KiB: faster than 1 KiB for mke2fs and for the guest, and the page size.
pub(crate) const BLOCK_SIZE: usize = 4096;
pub(crate) const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// `s_log_block_size`: block size is `1024 << 2`.
pub(crate) const LOG_BLOCK_SIZE: u32 = 2;
/// One block bitmap block covers 8 × 4096 blocks.
pub(crate) const BLOCKS_PER_GROUP: u64 = 8 * BLOCK_SIZE_U64;
pub(crate) const INODE_SIZE: usize = 256;
pub(crate) const INODES_PER_BLOCK: u32 = (BLOCK_SIZE / INODE_SIZE) as u32;
/// One inode bitmap block covers at most this many inodes.
pub(crate) const MAX_INODES_PER_GROUP: u32 = 8 * BLOCK_SIZE as u32;
/// 32-byte descriptors (no `64bit` feature): 2^32 blocks (16 TiB) is plenty for a VM image.
pub(crate) const DESCRIPTOR_SIZE: usize = 32;
pub(crate) const DESCRIPTORS_PER_BLOCK: u64 = (BLOCK_SIZE / DESCRIPTOR_SIZE) as u64;
/// Largest block number a 32-bit descriptor or extent can name, plus one.
pub(crate) const MAX_BLOCKS: u64 = 1 << 32;
/// Longest initialized extent.
pub(crate) const MAX_EXTENT_LEN: u64 = 32768;

pub(crate) const ROOT_INODE: u32 = 2;
pub(crate) const JOURNAL_INODE: u32 = 8;
/// First inode number not reserved by ext4 (`s_first_ino`).
pub(crate) const FIRST_INODE: u32 = 11;

/// mke2fs's default `inode_ratio`: one inode per 16 KiB of file system.
pub(crate) const BYTES_PER_INODE: u64 = 16384;
/// Inodes left free beyond the entries written, on top of the percentage headroom.
pub(crate) const INODE_SLACK: u64 = 256;
/// `s_log_groups_per_flex`: an allocator hint for the guest kernel (mke2fs uses 16 groups).
pub(crate) const LOG_GROUPS_PER_FLEX: u8 = 4;

/// True when `group` holds a superblock copy (`sparse_super`: groups 0, 1 and powers of 3, 5, 7).
pub(crate) fn group_has_superblock(group: u64) -> bool {
    group <= 1 || is_power_of(group, 3) || is_power_of(group, 5) || is_power_of(group, 7)
}

fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n.is_multiple_of(base) {
        n /= base;
    }
    n == 1
}

/// Number of blocks at the start of `group` taken by a superblock copy and descriptor blocks.
///
/// The answer depends on the group number alone, never on the final size, which is what lets
/// data be written before the size is known:
/// - groups below 128 (the first descriptor block's worth) keep the classic layout: where there
///   is a superblock copy, one descriptor block follows it;
/// - from group 128 on the file system uses `meta_bg` (set only when it has more than 128
///   groups): descriptor block `m` lives in groups `128m`, `128m + 1` and `128m + 127`, after
///   the superblock copy when there is one, and superblock copies carry no other descriptors.
pub(crate) fn reserved_at_group_start(group: u64) -> u64 {
    let superblock = u64::from(group_has_superblock(group));
    if group < DESCRIPTORS_PER_BLOCK {
        superblock * 2
    } else {
        let descriptor = u64::from(matches!(
            group % DESCRIPTORS_PER_BLOCK,
            0 | 1 | 127 // first, second and last group of a meta group
        ));
        superblock + descriptor
    }
}

/// Where the descriptor block of meta group `meta_group` (≥ 1) and its two copies live.
pub(crate) fn meta_bg_descriptor_locations(meta_group: u64) -> [u64; 3] {
    let first = meta_group * DESCRIPTORS_PER_BLOCK;
    [first, first + 1, first + DESCRIPTORS_PER_BLOCK - 1]
        .map(|group| group * BLOCKS_PER_GROUP + u64::from(group_has_superblock(group)))
}

/// Journal size in blocks for a file system of `blocks` blocks: the same table as mke2fs
/// (`ext2fs_default_journal_size`), so the guest sees the journal it would have had.
pub(crate) fn default_journal_blocks(blocks: u64) -> u64 {
    match blocks {
        0..2048 => 0,
        2048..32768 => 1024,
        32768..262_144 => 4096,
        262_144..524_288 => 8192,
        524_288..4_194_304 => 16384,
        4_194_304..8_388_608 => 32768,
        8_388_608..16_777_216 => 65536,
        16_777_216..33_554_432 => 131_072,
        _ => 262_144,
    }
}

/// The shape of a finished file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub blocks: u64,
    pub groups: u64,
    pub inodes_per_group: u32,
}

impl Geometry {
    /// Lays out `blocks` blocks with room for at least `min_inodes` inodes, or says why not.
    pub fn new(blocks: u64, min_inodes: u64) -> Result<Geometry, GeometryError> {
        if blocks >= MAX_BLOCKS {
            return Err(GeometryError::Blocks);
        }
        let groups = blocks.div_ceil(BLOCKS_PER_GROUP).max(1);
        let by_ratio = blocks * BLOCK_SIZE_U64 / BYTES_PER_INODE;
        let inodes = by_ratio.max(min_inodes).max(u64::from(FIRST_INODE));
        let per_group = inodes
            .div_ceil(groups)
            .next_multiple_of(u64::from(INODES_PER_BLOCK));
        if per_group > u64::from(MAX_INODES_PER_GROUP) {
            // Fewer inodes per group than asked would not hold the entries; cap at the
            // bitmap's reach when the ratio alone asked for more, fail when entries need more.
            if min_inodes.div_ceil(groups) > u64::from(MAX_INODES_PER_GROUP) {
                return Err(GeometryError::InodesPerGroup);
            }
        }
        let per_group = per_group.min(u64::from(MAX_INODES_PER_GROUP));
        if per_group * groups > u64::from(u32::MAX) {
            return Err(GeometryError::Inodes);
        }
        Ok(Geometry {
            blocks,
            groups,
            inodes_per_group: per_group as u32,
        })
    }

    pub fn inodes(&self) -> u64 {
        u64::from(self.inodes_per_group) * self.groups
    }

    pub fn inode_table_blocks(&self) -> u64 {
        u64::from(self.inodes_per_group / INODES_PER_BLOCK)
    }

    /// `meta_bg` is needed once the descriptors outgrow one block.
    pub fn meta_bg(&self) -> bool {
        self.groups > DESCRIPTORS_PER_BLOCK
    }

    /// Blocks in `group` (the last group may be short).
    pub fn blocks_in_group(&self, group: u64) -> u64 {
        (self.blocks - group * BLOCKS_PER_GROUP).min(BLOCKS_PER_GROUP)
    }
}

/// Why a size cannot be laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GeometryError {
    /// More blocks than 32-bit block numbers reach.
    Blocks,
    /// More inodes than 32-bit inode numbers reach.
    Inodes,
    /// The entries need more inodes per group than an inode bitmap block covers.
    InodesPerGroup,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let with: Vec<u64> = (0..130).filter(|&g| group_has_superblock(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
    }

    #[test]
    fn reserved_blocks_depend_on_group_only() {
        assert_eq!(reserved_at_group_start(0), 2);
        assert_eq!(reserved_at_group_start(1), 2);
        assert_eq!(reserved_at_group_start(2), 0);
        assert_eq!(reserved_at_group_start(127), 0);
        assert_eq!(reserved_at_group_start(128), 1); // meta group 1's descriptor block
        assert_eq!(reserved_at_group_start(129), 1);
        assert_eq!(reserved_at_group_start(243), 1); // 3^5: superblock copy only
        assert_eq!(reserved_at_group_start(255), 1);
        assert_eq!(reserved_at_group_start(343), 1); // 7^3
        assert_eq!(reserved_at_group_start(625), 1); // 5^4, 625 % 128 = 113
        assert_eq!(
            meta_bg_descriptor_locations(1),
            [
                128 * BLOCKS_PER_GROUP,
                129 * BLOCKS_PER_GROUP,
                255 * BLOCKS_PER_GROUP
            ]
        );
    }

    #[test]
    fn journal_sizes_follow_mke2fs() {
        assert_eq!(default_journal_blocks(131_072), 4096); // 512 MiB → 16 MiB
        assert_eq!(default_journal_blocks(262_144), 8192); // 1 GiB → 32 MiB
        assert_eq!(default_journal_blocks(1 << 22), 32768); // 16 GiB → 128 MiB
    }

    #[test]
    fn geometry_uses_ratio_and_floor() {
        let g = Geometry::new(131_072, 0).unwrap();
        assert_eq!(g.groups, 4);
        assert_eq!(g.inodes_per_group, 8192); // as mke2fs for 512 MiB
        let g = Geometry::new(1000, 10_000).unwrap();
        assert_eq!(g.groups, 1);
        assert_eq!(g.inodes_per_group, 10_000u32.next_multiple_of(16));
        assert_eq!(
            Geometry::new(1000, 40_000),
            Err(GeometryError::InodesPerGroup)
        );
    }
}
