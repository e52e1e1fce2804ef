//! Directory blocks: linear blocks for directories that fit in one block, hashed b-trees
//! (`dir_index`, half-MD4 with the unsigned-char variant) for larger ones, so lookups in big
//! directories stay fast in the guest.
//!
//! Layout is planned from the names alone ([`DirLayout::plan`]), so the block count is known
//! before inode numbers are; the same plan then renders the blocks with inode numbers.

use super::checksum::crc32c;
use super::layout::BLOCK_SIZE;

/// Directory entry file types (`filetype` feature).
pub(crate) const FT_REG: u8 = 1;
pub(crate) const FT_DIR: u8 = 2;
pub(crate) const FT_CHR: u8 = 3;
pub(crate) const FT_BLK: u8 = 4;
pub(crate) const FT_FIFO: u8 = 5;
pub(crate) const FT_SOCK: u8 = 6;
pub(crate) const FT_SYMLINK: u8 = 7;

/// `dx_root_info.hash_version`: half-MD4. The superblock's unsigned-hash flag selects the
/// unsigned-char variant.
const HASH_HALF_MD4: u8 = 1;
/// Size of the fake dirent that ends a leaf block under `metadata_csum`.
const TAIL_SIZE: usize = 12;

/// What the file system's features ask of directory blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirFormat {
    pub csum: bool,
    pub hash_seed: [u32; 4],
}

impl DirFormat {
    /// Usable bytes of a leaf block.
    fn leaf_capacity(&self) -> usize {
        if self.csum {
            BLOCK_SIZE - TAIL_SIZE
        } else {
            BLOCK_SIZE
        }
    }

    fn root_limit(&self) -> usize {
        (BLOCK_SIZE - 32) / 8 - usize::from(self.csum)
    }

    fn node_limit(&self) -> usize {
        (BLOCK_SIZE - 8) / 8 - usize::from(self.csum)
    }
}

/// Bytes one entry takes (8-byte header, name, padded to 4).
fn entry_len(name_len: usize) -> usize {
    (8 + name_len).next_multiple_of(4)
}

/// One entry to write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirEntry<'a> {
    pub name: &'a [u8],
    pub inode: u32,
    pub file_type: u8,
}

/// Raised for a directory too large for the deepest tree allowed without `large_dir`
/// (root → one level of index nodes → leaves: about 40 million entries).
#[derive(Debug)]
pub(crate) struct DirectoryTooLarge;

/// The block structure of one directory.
#[derive(Debug)]
pub(crate) struct DirLayout {
    /// Entry order on disk (indexes into the caller's entries): by hash when indexed.
    order: Vec<u32>,
    /// Exclusive end (into `order`) of each leaf block.
    leaf_ends: Vec<u32>,
    /// For indexed directories, the lowest hash of each leaf; low bit set when the leaf
    /// continues a run of equal hashes from the previous one.
    leaf_hashes: Vec<u32>,
    indexed: bool,
    /// Index nodes between root and leaves (0 or 1 level).
    index_nodes: usize,
    /// Empty blocks appended to a linear directory (`lost+found` is made 4 blocks long, as by
    /// mke2fs, so e2fsck can reconnect files without allocating).
    padding_blocks: u64,
}

impl DirLayout {
    pub fn plan(
        names: &[&[u8]],
        format: &DirFormat,
        min_blocks: u64,
    ) -> Result<DirLayout, DirectoryTooLarge> {
        let capacity = format.leaf_capacity();
        let dots = entry_len(1) + entry_len(2);
        let total: usize = names.iter().map(|n| entry_len(n.len())).sum();
        if dots + total <= capacity {
            let count = names.len() as u32;
            return Ok(DirLayout {
                order: (0..count).collect(),
                leaf_ends: vec![count],
                leaf_hashes: Vec::new(),
                indexed: false,
                index_nodes: 0,
                padding_blocks: min_blocks.saturating_sub(1),
            });
        }
        let hashes: Vec<(u32, u32)> = names
            .iter()
            .map(|n| dx_hash(n, &format.hash_seed))
            .collect();
        let mut order: Vec<u32> = (0..names.len() as u32).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            (hashes[a], names[a]).cmp(&(hashes[b], names[b]))
        });
        let mut leaf_ends = Vec::new();
        let mut leaf_hashes = Vec::new();
        let mut used = 0;
        let mut previous_hash: Option<u32> = None;
        for (position, &index) in order.iter().enumerate() {
            let len = entry_len(names[index as usize].len());
            let hash = hashes[index as usize].0;
            if used == 0 || used + len > capacity {
                if used != 0 {
                    leaf_ends.push(position as u32);
                }
                let continues = previous_hash == Some(hash);
                leaf_hashes.push(hash | u32::from(continues));
                used = 0;
            }
            used += len;
            previous_hash = Some(hash);
        }
        leaf_ends.push(order.len() as u32);
        let leaves = leaf_ends.len();
        let index_nodes = if leaves <= format.root_limit() {
            0
        } else {
            let nodes = leaves.div_ceil(format.node_limit());
            if nodes > format.root_limit() {
                return Err(DirectoryTooLarge);
            }
            nodes
        };
        Ok(DirLayout {
            order,
            leaf_ends,
            leaf_hashes,
            indexed: true,
            index_nodes,
            padding_blocks: 0,
        })
    }

    pub fn indexed(&self) -> bool {
        self.indexed
    }

    pub fn blocks(&self) -> u64 {
        let leaves = self.leaf_ends.len() as u64;
        if self.indexed {
            1 + self.index_nodes as u64 + leaves
        } else {
            leaves + self.padding_blocks
        }
    }

    /// Renders every block in logical order through `emit`. `entries` are in the order the
    /// names were given to [`DirLayout::plan`]. `inode_seed` turns on checksums.
    pub fn render(
        &self,
        entries: &[DirEntry<'_>],
        self_inode: u32,
        parent_inode: u32,
        format: &DirFormat,
        inode_seed: Option<u32>,
        mut emit: impl FnMut(&[u8]),
    ) {
        let mut block = vec![0u8; BLOCK_SIZE];
        let capacity = format.leaf_capacity();
        let mut start = 0usize;
        if self.indexed {
            self.render_index(
                &mut block,
                self_inode,
                parent_inode,
                format,
                inode_seed,
                &mut emit,
            );
        }
        for (leaf, &end) in self.leaf_ends.iter().enumerate() {
            block.fill(0);
            let mut at = 0;
            let mut last = None;
            if leaf == 0 && !self.indexed {
                at += put_entry(&mut block[at..], self_inode, b".", FT_DIR);
                last = Some(at);
                at += put_entry(&mut block[at..], parent_inode, b"..", FT_DIR);
            }
            for &index in &self.order[start..end as usize] {
                let entry = &entries[index as usize];
                last = Some(at);
                at += put_entry(&mut block[at..], entry.inode, entry.name, entry.file_type);
            }
            match last {
                Some(last) => set_rec_len(&mut block, last, capacity - last),
                None => set_rec_len(&mut block, 0, capacity), // an empty leaf
            }
            finish_leaf(&mut block, format, inode_seed);
            emit(&block);
            start = end as usize;
        }
        for _ in 0..self.padding_blocks {
            block.fill(0);
            set_rec_len(&mut block, 0, capacity);
            finish_leaf(&mut block, format, inode_seed);
            emit(&block);
        }
    }

    fn render_index(
        &self,
        block: &mut [u8],
        self_inode: u32,
        parent_inode: u32,
        format: &DirFormat,
        inode_seed: Option<u32>,
        emit: &mut impl FnMut(&[u8]),
    ) {
        let first_leaf = 1 + self.index_nodes as u32;
        let leaves: Vec<(u32, u32)> = self
            .leaf_hashes
            .iter()
            .enumerate()
            .map(|(i, &hash)| (hash, first_leaf + i as u32))
            .collect();
        let node_limit = format.node_limit();
        let root_entries: Vec<(u32, u32)> = if self.index_nodes == 0 {
            leaves.clone()
        } else {
            leaves
                .chunks(node_limit)
                .enumerate()
                .map(|(i, chunk)| (chunk[0].0, 1 + i as u32))
                .collect()
        };
        // Root: "." and ".." (the latter spanning the block), dx_root_info, entries.
        block.fill(0);
        put_entry(block, self_inode, b".", FT_DIR);
        put_entry(&mut block[12..], parent_inode, b"..", FT_DIR);
        set_rec_len(block, 12, BLOCK_SIZE - 12);
        block[28] = HASH_HALF_MD4;
        block[29] = 8; // info_length
        block[30] = u8::from(self.index_nodes > 0); // indirect_levels
        write_dx_entries(block, 32, format.root_limit(), &root_entries, inode_seed);
        emit(block);
        if self.index_nodes > 0 {
            for chunk in leaves.chunks(node_limit) {
                block.fill(0);
                set_rec_len(block, 0, BLOCK_SIZE); // fake empty dirent spanning the block
                write_dx_entries(block, 8, node_limit, chunk, inode_seed);
                emit(block);
            }
        }
    }
}

/// Writes a `dx_countlimit` + entries array at `at`; entry 0's hash slot holds limit/count.
fn write_dx_entries(
    block: &mut [u8],
    at: usize,
    limit: usize,
    entries: &[(u32, u32)],
    inode_seed: Option<u32>,
) {
    debug_assert!(!entries.is_empty() && entries.len() <= limit);
    block[at..at + 2].copy_from_slice(&(limit as u16).to_le_bytes());
    block[at + 2..at + 4].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    for (i, &(hash, child)) in entries.iter().enumerate() {
        let slot = at + 8 * i;
        if i > 0 {
            block[slot..slot + 4].copy_from_slice(&hash.to_le_bytes());
        }
        block[slot + 4..slot + 8].copy_from_slice(&child.to_le_bytes());
    }
    if let Some(seed) = inode_seed {
        // dx_tail {reserved, checksum} sits right after `limit` entries.
        let tail = at + 8 * limit;
        let crc = crc32c(seed, &block[..at + 8 * entries.len()]);
        let crc = crc32c(crc, &block[tail..tail + 4]);
        let crc = crc32c(crc, &[0; 4]);
        block[tail + 4..tail + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Writes one dirent with its minimal record length; returns that length.
fn put_entry(out: &mut [u8], inode: u32, name: &[u8], file_type: u8) -> usize {
    let len = entry_len(name.len());
    out[0..4].copy_from_slice(&inode.to_le_bytes());
    out[4..6].copy_from_slice(&(len as u16).to_le_bytes());
    out[6] = name.len() as u8;
    out[7] = file_type;
    out[8..8 + name.len()].copy_from_slice(name);
    len
}

fn set_rec_len(block: &mut [u8], at: usize, len: usize) {
    block[at + 4..at + 6].copy_from_slice(&(len as u16).to_le_bytes());
}

fn finish_leaf(block: &mut [u8], format: &DirFormat, inode_seed: Option<u32>) {
    if !format.csum {
        return;
    }
    let tail = BLOCK_SIZE - TAIL_SIZE;
    block[tail..].fill(0);
    block[tail + 4..tail + 6].copy_from_slice(&(TAIL_SIZE as u16).to_le_bytes());
    block[tail + 7] = 0xDE; // det_reserved_ft marks the checksum tail
    if let Some(seed) = inode_seed {
        let crc = crc32c(seed, &block[..tail]);
        block[tail + 8..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The ext4 directory hash (half-MD4, unsigned chars): `(major, minor)`.
pub(crate) fn dx_hash(name: &[u8], seed: &[u32; 4]) -> (u32, u32) {
    let mut state = if seed.iter().all(|&w| w == 0) {
        [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476]
    } else {
        *seed
    };
    let mut rest = name;
    while !rest.is_empty() {
        let words = hash_words(rest);
        half_md4(&mut state, &words);
        rest = &rest[rest.len().min(32)..];
    }
    let mut major = state[1] & !1;
    if major == 0x7fff_ffff << 1 {
        major = (0x7fff_ffff - 1) << 1; // the end-of-directory marker is reserved
    }
    (major, state[2])
}

/// Packs up to 32 bytes of `rest` into 8 words, big-endian within a word, padded with a value
/// derived from the remaining length (`str2hashbuf`, unsigned variant).
fn hash_words(rest: &[u8]) -> [u32; 8] {
    let remaining = rest.len() as u32;
    let mut pad = remaining | (remaining << 8);
    pad |= pad << 16;
    let mut words = [pad; 8];
    let take = rest.len().min(32);
    let mut value = pad;
    for (i, &byte) in rest[..take].iter().enumerate() {
        value = u32::from(byte).wrapping_add(value << 8);
        if i % 4 == 3 {
            words[i / 4] = value;
            value = pad;
        }
    }
    if take < 32 {
        words[take / 4] = value;
    }
    words
}

fn half_md4(state: &mut [u32; 4], input: &[u32; 8]) {
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    // Per round: the constant, then (input word, rotation) for each of the 8 steps.
    const ROUNDS: [(u32, [(usize, u32); 8]); 3] = [
        (
            0,
            [
                (0, 3),
                (1, 7),
                (2, 11),
                (3, 19),
                (4, 3),
                (5, 7),
                (6, 11),
                (7, 19),
            ],
        ),
        (
            K2,
            [
                (1, 3),
                (3, 5),
                (5, 9),
                (7, 13),
                (0, 3),
                (2, 5),
                (4, 9),
                (6, 13),
            ],
        ),
        (
            K3,
            [
                (3, 3),
                (7, 9),
                (2, 11),
                (6, 15),
                (1, 3),
                (5, 9),
                (0, 11),
                (4, 15),
            ],
        ),
    ];
    let mut v = *state;
    for (round, (k, steps)) in ROUNDS.iter().enumerate() {
        for (step, &(word, shift)) in steps.iter().enumerate() {
            // The register updated cycles a, d, c, b; the mix takes the other three in order.
            let [t, x, y, z] = match step % 4 {
                0 => [0, 1, 2, 3],
                1 => [3, 0, 1, 2],
                2 => [2, 3, 0, 1],
                _ => [1, 2, 3, 0],
            };
            let (x, y, z) = (v[x], v[y], v[z]);
            let mixed = match round {
                0 => z ^ (x & (y ^ z)),
                1 => (x & y).wrapping_add((x ^ y) & z),
                _ => x ^ y ^ z,
            };
            v[t] = v[t]
                .wrapping_add(mixed)
                .wrapping_add(input[word].wrapping_add(*k))
                .rotate_left(shift);
        }
    }
    for (word, value) in state.iter_mut().zip(v) {
        *word = word.wrapping_add(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_CSUM: DirFormat = DirFormat {
        csum: false,
        hash_seed: [1, 2, 3, 4],
    };

    #[test]
    fn small_directories_are_linear() {
        let names: Vec<&[u8]> = vec![b"a", b"bb"];
        let layout = DirLayout::plan(&names, &NO_CSUM, 4).unwrap();
        assert!(!layout.indexed());
        assert_eq!(layout.blocks(), 4);
        let entries = [
            DirEntry {
                name: b"a",
                inode: 12,
                file_type: FT_REG,
            },
            DirEntry {
                name: b"bb",
                inode: 13,
                file_type: FT_DIR,
            },
        ];
        let mut blocks = Vec::new();
        layout.render(&entries, 11, 2, &NO_CSUM, None, |b| blocks.push(b.to_vec()));
        assert_eq!(blocks.len(), 4);
        let b = &blocks[0];
        assert_eq!(&b[0..4], &11u32.to_le_bytes());
        assert_eq!(&b[12..16], &2u32.to_le_bytes());
        assert_eq!(&b[24..28], &12u32.to_le_bytes());
        assert_eq!(u16::from_le_bytes([b[40], b[41]]) as usize, BLOCK_SIZE - 36); // last spans
        assert_eq!(
            u16::from_le_bytes([blocks[3][4], blocks[3][5]]) as usize,
            BLOCK_SIZE
        );
    }

    #[test]
    fn large_directories_are_indexed_in_hash_order() {
        let owned: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("file-{i:05}").into_bytes())
            .collect();
        let names: Vec<&[u8]> = owned.iter().map(|n| n.as_slice()).collect();
        let layout = DirLayout::plan(&names, &NO_CSUM, 0).unwrap();
        assert!(layout.indexed());
        let hashes: Vec<u32> = layout
            .order
            .iter()
            .map(|&i| dx_hash(names[i as usize], &NO_CSUM.hash_seed).0)
            .collect();
        assert!(hashes.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(layout.blocks(), 1 + layout.leaf_ends.len() as u64);
    }

    #[test]
    fn hash_words_pad_like_the_kernel() {
        // "abc": three bytes accumulate into the first word, the rest is padding.
        let pad = 0x0303_0303u32;
        let first = ((((pad << 8) + 0x61) << 8) + 0x62).wrapping_shl(8) + 0x63;
        assert_eq!(
            hash_words(b"abc"),
            [first, pad, pad, pad, pad, pad, pad, pad]
        );
    }
}
