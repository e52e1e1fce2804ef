//! [`Ext4Builder::finish`]: numbering, planning, sizing, and writing the metadata region.
//!
//! 1. Scrub: freed ranges and blocks past the cursor that once held data become holes, so
//!    free space and never-written metadata read as zeros.
//! 2. Number inodes densely in node order (root 2, journal 8, others from 11).
//! 3. Plan content-sized metadata: directory blocks per directory, shared attribute blocks.
//! 4. Fit: pick the block count (fixed, or grown until content × headroom fits) and lay the
//!    metadata region out after the data, rewinding and retrying while the size changes.
//! 5. Write in block order: block bitmaps, inode bitmaps, inode tables (extent-tree blocks as
//!    they come), directory blocks, attribute blocks, the journal superblock; then descriptor
//!    tables and superblock copies; then the file length, then fsync.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::alloc::{BlockAllocator, Checkpoint, LimitReached, Run};
use super::builder::Ext4Builder;
use super::checksum::crc32c;
use super::dir::{self, DirEntry, DirFormat, DirLayout};
use super::inode::{
    self, Extent, FLAG_EXTENTS, FLAG_INDEX, InodeFields, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO,
    S_IFLNK, S_IFREG, S_IFSOCK, build_extent_tree, push_extent, tree_blocks_needed,
};
use super::layout::{
    self, BLOCK_SIZE, BLOCK_SIZE_U64, BLOCKS_PER_GROUP, DESCRIPTOR_SIZE, DESCRIPTORS_PER_BLOCK,
    FIRST_INODE, Geometry, GeometryError, INODE_SIZE, INODE_SLACK, INODES_PER_BLOCK, JOURNAL_INODE,
    ROOT_INODE,
};
use super::superblock::{self, BG_INODE_ZEROED, GroupDescriptor, JournalRecord, SuperblockFields};
use super::tree::{MAX_LINKS, NodeId, NodeKind, ROOT, Tree};
use super::writer::BlockWriter;
use super::xattr::{self, MAX_BLOCK_REFCOUNT};
use super::{Ext4Error, Ext4Summary, Sizing};

/// Sizes are rounded up to whole MiB (and so every group has at least 256 blocks).
const SIZE_ROUNDING: u64 = 256;
/// JBD2's smallest journal.
const MIN_JOURNAL_BLOCKS: u64 = 1024;
/// Inode headroom in percent for fixed-size images (auto-sized ones use their own).
const FIXED_INODE_HEADROOM: u64 = 10;
/// Inodes serialized per write.
const INODES_PER_WRITE: u64 = 4096;
const NO_XATTR_BLOCK: u32 = u32::MAX;

impl Ext4Builder {
    /// Completes the image at the size `sizing` asks for and fsyncs it. On error the image
    /// is removed.
    pub fn finish(mut self, sizing: Sizing) -> Result<Ext4Summary, Ext4Error> {
        let summary = self.finish_image(sizing)?;
        self.remove_on_drop = false;
        Ok(summary)
    }

    fn finish_image(&mut self, sizing: Sizing) -> Result<Ext4Summary, Ext4Error> {
        let image = self.image.clone();
        let io_error = |source| Ext4Error::ImageFinish {
            path: image.clone(),
            source,
        };
        scrub(&mut self.writer, &self.alloc).map_err(io_error)?;
        self.alloc.set_limit(None);

        let uuid = self.options.uuid;
        let seeds = Seeds::new(&uuid, self.options.metadata_csum);
        let format = DirFormat {
            csum: self.options.metadata_csum,
            hash_seed: seeds.hash_words(),
        };
        let numbering = Numbering::new(&self.tree);
        let content = ContentPlan::new(&self.tree, &numbering, &format)?;
        let journal = self.options.journal;
        let layout = fit(
            &mut self.alloc,
            &self.tree,
            &numbering,
            &content,
            journal,
            sizing,
        )?;

        let mut writer = MetadataWriter {
            tree: &self.tree,
            alloc: &self.alloc,
            writer: &mut self.writer,
            image: &self.image,
            numbering: &numbering,
            content: &content,
            layout: &layout,
            format,
            uuid,
            fs_seed: seeds.csum,
            timestamp: self.options.timestamp,
        };
        let counts = writer.write_all()?;
        let free_blocks: u64 = counts
            .descriptors
            .iter()
            .map(|d| u64::from(d.free_blocks))
            .sum();
        let geometry = layout.geometry;
        let free_inodes = geometry.inodes() - numbering.used_inodes();
        let mut label = [0u8; 16];
        let label_len = self.options.label.len().min(16);
        label[..label_len].copy_from_slice(&self.options.label[..label_len]);
        let fields = SuperblockFields {
            geometry,
            free_blocks,
            free_inodes,
            reserved_blocks: geometry.blocks * u64::from(self.options.reserved_percent.min(50))
                / 100,
            uuid,
            hash_seed: seeds.hash_seed,
            label,
            timestamp: self.options.timestamp.clamp(0, i64::from(u32::MAX)) as u32,
            journal: counts.journal,
            csum: self.options.metadata_csum,
        };
        writer.write_descriptors_and_superblocks(&counts.descriptors, &fields)?;

        let image_bytes = match sizing {
            Sizing::Fixed(bytes) => bytes,
            Sizing::Auto { .. } => geometry.blocks * BLOCK_SIZE_U64,
        };
        self.writer.set_len(image_bytes).map_err(io_error)?;
        if self.options.sync {
            self.writer.sync().map_err(io_error)?;
        }
        let data_blocks = numbering
            .order
            .iter()
            .map(|&id| extent_blocks(self.tree.node(id).kind.data()))
            .sum();
        Ok(Ext4Summary {
            image_bytes,
            blocks: geometry.blocks,
            free_blocks,
            inodes: geometry.inodes(),
            free_inodes,
            journal_blocks: layout.journal.iter().map(|r| r.len).sum(),
            data_blocks,
        })
    }
}

/// Makes freed blocks and blocks past the cursor read as zeros.
fn scrub(writer: &mut BlockWriter, alloc: &BlockAllocator) -> std::io::Result<()> {
    writer.flush()?;
    for run in alloc.free_runs() {
        writer.zero(run)?;
    }
    if alloc.high_water() > alloc.cursor() {
        writer.zero(Run {
            start: alloc.cursor(),
            len: alloc.high_water() - alloc.cursor(),
        })?;
    }
    Ok(())
}

/// Seeds derived from the UUID.
struct Seeds {
    hash_seed: [u8; 16],
    csum: Option<u32>,
}

impl Seeds {
    fn new(uuid: &[u8; 16], csum: bool) -> Seeds {
        let digest = blake3::derive_key("banger ext4 directory hash seed v1", uuid);
        let mut hash_seed = [0u8; 16];
        hash_seed.copy_from_slice(&digest[..16]);
        Seeds {
            hash_seed,
            csum: csum.then(|| superblock::csum_seed(uuid)),
        }
    }

    fn hash_words(&self) -> [u32; 4] {
        let mut words = [0u32; 4];
        for (word, bytes) in words.iter_mut().zip(self.hash_seed.chunks_exact(4)) {
            *word = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        }
        words
    }
}

/// Inode numbers of the nodes.
struct Numbering {
    /// Per node slot; 0 for empty slots.
    inode_of: Vec<u32>,
    /// Nodes other than the root, in inode order from [`FIRST_INODE`].
    order: Vec<NodeId>,
}

impl Numbering {
    fn new(tree: &Tree) -> Numbering {
        let mut inode_of = vec![0u32; tree.capacity()];
        let mut order = Vec::with_capacity(tree.len());
        inode_of[ROOT as usize] = ROOT_INODE;
        for id in tree.ids().filter(|&id| id != ROOT) {
            inode_of[id as usize] = FIRST_INODE + order.len() as u32;
            order.push(id);
        }
        Numbering { inode_of, order }
    }

    /// Highest inode number in use (reserved inodes count as used).
    fn used_inodes(&self) -> u64 {
        u64::from(FIRST_INODE) - 1 + self.order.len() as u64
    }

    /// The node behind an inode number, if it is not a reserved inode.
    fn node_of(&self, inode: u32) -> Option<NodeId> {
        match inode {
            ROOT_INODE => Some(ROOT),
            n if n >= FIRST_INODE => self.order.get((n - FIRST_INODE) as usize).copied(),
            _ => None,
        }
    }
}

/// Content-sized metadata, independent of the final size.
struct ContentPlan {
    /// Directories in inode order (root first), with their block counts.
    dirs: Vec<(NodeId, u64)>,
    indexed: HashMap<NodeId, bool>,
    /// Per node slot: index into `xattr_blocks`, or [`NO_XATTR_BLOCK`].
    xattr_block_of: Vec<u32>,
    /// Shared attribute blocks: first node using it, number of users.
    xattr_blocks: Vec<(NodeId, u32)>,
}

impl ContentPlan {
    fn new(tree: &Tree, numbering: &Numbering, format: &DirFormat) -> Result<Self, Ext4Error> {
        let mut dirs = Vec::new();
        let mut indexed = HashMap::new();
        let mut xattr_block_of = vec![NO_XATTR_BLOCK; tree.capacity()];
        let mut xattr_blocks: Vec<(NodeId, u32)> = Vec::new();
        let mut shared: HashMap<Vec<u8>, u32> = HashMap::new();
        for id in std::iter::once(ROOT).chain(numbering.order.iter().copied()) {
            let node = tree.node(id);
            if let NodeKind::Directory(directory) = &node.kind {
                let names: Vec<&[u8]> = directory.entries.keys().map(|n| &n[..]).collect();
                let planned = DirLayout::plan(&names, format, directory.min_blocks)
                    .map_err(|_| directory_too_large(tree, id))?;
                dirs.push((id, planned.blocks()));
                indexed.insert(id, planned.indexed());
            }
            if node.xattrs.is_empty() {
                continue;
            }
            let placement = xattr::place(&node.xattrs).expect("checked at insert");
            if placement.block.is_empty() {
                continue;
            }
            let key = xattr::block_key(&placement.block);
            let index = match shared.get(&key) {
                Some(&index) if xattr_blocks[index as usize].1 < MAX_BLOCK_REFCOUNT => {
                    xattr_blocks[index as usize].1 += 1;
                    index
                }
                _ => {
                    let index = xattr_blocks.len() as u32;
                    xattr_blocks.push((id, 1));
                    shared.insert(key, index);
                    index
                }
            };
            xattr_block_of[id as usize] = index;
        }
        Ok(ContentPlan {
            dirs,
            indexed,
            xattr_block_of,
            xattr_blocks,
        })
    }
}

fn directory_too_large(tree: &Tree, id: NodeId) -> Ext4Error {
    Ext4Error::DirectoryTooLarge {
        path: PathBuf::from(OsStr::from_bytes(&tree.dir_path(id))),
    }
}

/// Where every piece of the metadata region goes.
struct MetaLayout {
    geometry: Geometry,
    block_bitmaps: Vec<u64>,
    inode_bitmaps: Vec<u64>,
    inode_tables: Vec<u64>,
    dir_runs: HashMap<NodeId, Vec<Run>>,
    xattr_blocks: Vec<u64>,
    journal: Vec<Run>,
    /// Extent-tree blocks of nodes with more than 4 extents.
    tree_blocks: HashMap<NodeId, Vec<u64>>,
    journal_tree: Vec<u64>,
    /// First block after the metadata region.
    end: u64,
}

fn runs_to_extents(runs: &[Run]) -> Vec<Extent> {
    let mut extents = Vec::new();
    let mut logical = 0;
    for &run in runs {
        push_extent(&mut extents, logical, run);
        logical += run.len;
    }
    extents
}

fn extent_blocks(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| u64::from(e.len)).sum()
}

fn flatten(runs: &[Run]) -> Vec<u64> {
    runs.iter().flat_map(|r| r.start..r.end()).collect()
}

/// Lays the metadata region out from the cursor for `geometry`.
fn allocate(
    alloc: &mut BlockAllocator,
    geometry: Geometry,
    tree: &Tree,
    numbering: &Numbering,
    content: &ContentPlan,
    journal_blocks: u64,
) -> Result<MetaLayout, LimitReached> {
    let groups = geometry.groups;
    let single = |alloc: &mut BlockAllocator| alloc.append(1).map(|run| run.start);
    let block_bitmaps = (0..groups)
        .map(|_| single(alloc))
        .collect::<Result<Vec<_>, _>>()?;
    let inode_bitmaps = (0..groups)
        .map(|_| single(alloc))
        .collect::<Result<Vec<_>, _>>()?;
    let table_blocks = geometry.inode_table_blocks();
    let inode_tables = (0..groups)
        .map(|_| alloc.append_contiguous(table_blocks).map(|run| run.start))
        .collect::<Result<Vec<_>, _>>()?;
    let mut dir_runs = HashMap::with_capacity(content.dirs.len());
    for &(id, blocks) in &content.dirs {
        dir_runs.insert(id, alloc.append_runs(blocks)?);
    }
    let xattr_blocks = (0..content.xattr_blocks.len())
        .map(|_| single(alloc))
        .collect::<Result<Vec<_>, _>>()?;
    let journal = alloc.append_runs(journal_blocks)?;
    let mut tree_blocks = HashMap::new();
    for &(id, _) in &content.dirs {
        let count = tree_blocks_needed(runs_to_extents(&dir_runs[&id]).len());
        if count > 0 {
            tree_blocks.insert(id, flatten(&alloc.append_runs(count)?));
        }
    }
    for &id in &numbering.order {
        let count = tree_blocks_needed(tree.node(id).kind.data().len());
        if count > 0 {
            tree_blocks.insert(id, flatten(&alloc.append_runs(count)?));
        }
    }
    let journal_tree =
        flatten(&alloc.append_runs(tree_blocks_needed(runs_to_extents(&journal).len()))?);
    Ok(MetaLayout {
        geometry,
        block_bitmaps,
        inode_bitmaps,
        inode_tables,
        dir_runs,
        xattr_blocks,
        journal,
        tree_blocks,
        journal_tree,
        end: alloc.cursor(),
    })
}

fn journal_blocks_for(journal: bool, blocks: u64) -> u64 {
    if journal {
        layout::default_journal_blocks(blocks).max(MIN_JOURNAL_BLOCKS)
    } else {
        0
    }
}

fn min_inodes(used: u64, headroom_percent: u64) -> u64 {
    used + used * headroom_percent / 100 + INODE_SLACK
}

/// Picks the size and lays out the metadata region for it.
fn fit(
    alloc: &mut BlockAllocator,
    tree: &Tree,
    numbering: &Numbering,
    content: &ContentPlan,
    journal: bool,
    sizing: Sizing,
) -> Result<MetaLayout, Ext4Error> {
    let checkpoint = alloc.checkpoint();
    match sizing {
        Sizing::Fixed(bytes) => {
            let blocks = fixed_blocks(bytes);
            let inodes = min_inodes(numbering.used_inodes(), FIXED_INODE_HEADROOM);
            let attempt = Geometry::new(blocks, inodes).ok().and_then(|geometry| {
                let journal_blocks = journal_blocks_for(journal, blocks);
                allocate(alloc, geometry, tree, numbering, content, journal_blocks)
                    .ok()
                    .filter(|layout| layout.end <= blocks)
            });
            if let Some(layout) = attempt {
                return Ok(layout);
            }
            alloc.rewind(checkpoint);
            let needed = auto_fit(
                alloc,
                checkpoint,
                tree,
                numbering,
                content,
                journal,
                0,
                0,
                FIXED_INODE_HEADROOM,
            )?;
            Err(Ext4Error::TooSmall {
                needed: needed.geometry.blocks * BLOCK_SIZE_U64,
                requested: bytes,
            })
        }
        Sizing::Auto {
            headroom_percent,
            min_bytes,
        } => auto_fit(
            alloc,
            checkpoint,
            tree,
            numbering,
            content,
            journal,
            u64::from(headroom_percent),
            min_bytes,
            u64::from(headroom_percent),
        ),
    }
}

/// The block count of a fixed size: whole blocks, dropping a last group too small to be
/// useful (as mke2fs does).
fn fixed_blocks(bytes: u64) -> u64 {
    let blocks = bytes / BLOCK_SIZE_U64;
    let rest = blocks % BLOCKS_PER_GROUP;
    if blocks > BLOCKS_PER_GROUP && rest < SIZE_ROUNDING {
        blocks - rest
    } else {
        blocks
    }
}

#[allow(clippy::too_many_arguments)]
fn auto_fit(
    alloc: &mut BlockAllocator,
    checkpoint: Checkpoint,
    tree: &Tree,
    numbering: &Numbering,
    content: &ContentPlan,
    journal: bool,
    headroom_percent: u64,
    min_bytes: u64,
    inode_headroom_percent: u64,
) -> Result<MetaLayout, Ext4Error> {
    let data_end = alloc.cursor();
    let data_used = alloc.used_below_cursor();
    let inodes = min_inodes(numbering.used_inodes(), inode_headroom_percent);
    let mut blocks = (min_bytes / BLOCK_SIZE_U64)
        .max(data_end + 1)
        .next_multiple_of(SIZE_ROUNDING);
    for _ in 0..100 {
        let geometry = match Geometry::new(blocks, inodes) {
            Ok(geometry) => geometry,
            Err(GeometryError::InodesPerGroup) => {
                // More inodes than the groups' bitmaps can hold: grow by whole groups.
                let groups = inodes.div_ceil(u64::from(layout::MAX_INODES_PER_GROUP));
                blocks = groups * BLOCKS_PER_GROUP;
                continue;
            }
            Err(GeometryError::Blocks) => {
                return Err(Ext4Error::TooLarge {
                    reason: "more than 2^32 blocks",
                });
            }
            Err(GeometryError::Inodes) => {
                return Err(Ext4Error::TooLarge {
                    reason: "more than 2^32 inodes",
                });
            }
        };
        alloc.rewind(checkpoint);
        let journal_blocks = journal_blocks_for(journal, blocks);
        let layout = allocate(alloc, geometry, tree, numbering, content, journal_blocks)
            .expect("no limit while planning");
        let end = layout.end;
        let reserved_beyond: u64 = (end.div_ceil(BLOCKS_PER_GROUP)..geometry.groups)
            .map(layout::reserved_at_group_start)
            .sum();
        let used = data_used + (end - data_end) + reserved_beyond;
        let wanted = (used + used * headroom_percent / 100)
            .max(end)
            .max(min_bytes / BLOCK_SIZE_U64)
            .next_multiple_of(SIZE_ROUNDING);
        if wanted <= blocks {
            return Ok(layout);
        }
        blocks = wanted;
    }
    Err(Ext4Error::TooLarge {
        reason: "the size computation did not settle",
    })
}

/// Totals gathered while writing, for descriptors and superblock.
struct Counts {
    descriptors: Vec<GroupDescriptor>,
    journal: Option<JournalRecord>,
}

/// Writes the metadata region; borrows the builder's parts.
struct MetadataWriter<'a> {
    tree: &'a Tree,
    alloc: &'a BlockAllocator,
    writer: &'a mut BlockWriter,
    image: &'a Path,
    numbering: &'a Numbering,
    content: &'a ContentPlan,
    layout: &'a MetaLayout,
    format: DirFormat,
    uuid: [u8; 16],
    fs_seed: Option<u32>,
    timestamp: i64,
}

impl MetadataWriter<'_> {
    fn write(&mut self, block: u64, bytes: &[u8]) -> Result<(), Ext4Error> {
        self.writer
            .write(block, bytes)
            .map_err(|source| Ext4Error::DataWrite {
                path: self.image.to_owned(),
                source,
            })
    }

    /// Writes everything but descriptors and superblocks, in block order.
    fn write_all(&mut self) -> Result<Counts, Ext4Error> {
        let mut descriptors = self.write_bitmaps()?;
        let journal = self.write_inode_tables(&mut descriptors)?;
        self.write_directories()?;
        self.write_xattr_blocks()?;
        if let Some(first) = self.layout.journal.first() {
            let blocks: u64 = self.layout.journal.iter().map(|r| r.len).sum();
            let mut block = vec![0u8; BLOCK_SIZE];
            superblock::encode_journal_superblock(blocks as u32, &self.uuid, &mut block);
            self.write(first.start, &block)?;
        }
        Ok(Counts {
            descriptors,
            journal,
        })
    }

    fn write_bitmaps(&mut self) -> Result<Vec<GroupDescriptor>, Ext4Error> {
        let geometry = self.layout.geometry;
        let per_group = u64::from(geometry.inodes_per_group);
        let used_inodes = self.numbering.used_inodes();
        let flags = if self.fs_seed.is_some() {
            BG_INODE_ZEROED
        } else {
            0
        };
        let mut descriptors = Vec::with_capacity(geometry.groups as usize);
        let mut bitmap = vec![0u8; BLOCK_SIZE];
        for group in 0..geometry.groups {
            self.alloc
                .used()
                .copy_bytes(group * BLOCKS_PER_GROUP, &mut bitmap);
            set_bits(&mut bitmap, 0, layout::reserved_at_group_start(group));
            let in_group = geometry.blocks_in_group(group);
            set_bits(&mut bitmap, in_group, BLOCKS_PER_GROUP - in_group);
            let used = count_bits(&bitmap);
            let index = group as usize;
            descriptors.push(GroupDescriptor {
                block_bitmap: self.layout.block_bitmaps[index],
                inode_bitmap: self.layout.inode_bitmaps[index],
                inode_table: self.layout.inode_tables[index],
                free_blocks: (BLOCKS_PER_GROUP - used) as u32,
                flags,
                block_bitmap_csum: self.fs_seed.map_or(0, |seed| crc32c(seed, &bitmap)),
                ..GroupDescriptor::default()
            });
            self.write(self.layout.block_bitmaps[index], &bitmap)?;
        }
        for group in 0..geometry.groups {
            let used = used_inodes.saturating_sub(group * per_group).min(per_group);
            bitmap.fill(0);
            set_bits(&mut bitmap, 0, used);
            set_bits(&mut bitmap, per_group, BLOCKS_PER_GROUP - per_group);
            let descriptor = &mut descriptors[group as usize];
            descriptor.free_inodes = (per_group - used) as u32;
            descriptor.itable_unused = (per_group - used) as u32;
            descriptor.inode_bitmap_csum = self
                .fs_seed
                .map_or(0, |seed| crc32c(seed, &bitmap[..(per_group / 8) as usize]));
            self.write(self.layout.inode_bitmaps[group as usize], &bitmap)?;
        }
        for &(id, _) in &self.content.dirs {
            let inode = u64::from(self.numbering.inode_of[id as usize]);
            descriptors[((inode - 1) / per_group) as usize].used_dirs += 1;
        }
        Ok(descriptors)
    }

    fn write_inode_tables(
        &mut self,
        descriptors: &mut [GroupDescriptor],
    ) -> Result<Option<JournalRecord>, Ext4Error> {
        let geometry = self.layout.geometry;
        let per_group = u64::from(geometry.inodes_per_group);
        let used_inodes = self.numbering.used_inodes();
        let mut buffer = vec![0u8; INODES_PER_WRITE as usize * INODE_SIZE];
        let mut journal = None;
        for (group, descriptor) in descriptors.iter().enumerate() {
            let first = group as u64 * per_group + 1;
            let last = used_inodes.min(first + per_group - 1);
            let mut number = first;
            while number <= last {
                let count = INODES_PER_WRITE.min(last - number + 1);
                for i in 0..count {
                    let at = i as usize * INODE_SIZE;
                    let out = &mut buffer[at..at + INODE_SIZE];
                    journal = self.encode((number + i) as u32, out)?.or(journal);
                }
                let bytes = (count as usize * INODE_SIZE).next_multiple_of(BLOCK_SIZE);
                buffer[count as usize * INODE_SIZE..bytes].fill(0);
                let block = descriptor.inode_table + (number - first) / u64::from(INODES_PER_BLOCK);
                self.write(block, &buffer[..bytes])?;
                number += count;
            }
        }
        Ok(journal)
    }

    /// Encodes inode `number` into `out`; returns the journal record for inode 8.
    fn encode(&mut self, number: u32, out: &mut [u8]) -> Result<Option<JournalRecord>, Ext4Error> {
        if number == JOURNAL_INODE && !self.layout.journal.is_empty() {
            return self.encode_journal(out).map(Some);
        }
        match self.numbering.node_of(number) {
            Some(id) => self.encode_node(id, number, out)?,
            None => inode::encode_reserved_inode(number, self.fs_seed, out),
        }
        Ok(None)
    }

    fn encode_journal(&mut self, out: &mut [u8]) -> Result<JournalRecord, Ext4Error> {
        let extents = runs_to_extents(&self.layout.journal);
        let tree_blocks = self.layout.journal_tree.clone();
        let i_block = self.extent_root(&extents, &tree_blocks, JOURNAL_INODE)?;
        let blocks = extent_blocks(&extents);
        let size = blocks * BLOCK_SIZE_U64;
        let fields = InodeFields {
            mode: S_IFREG | 0o600,
            uid: 0,
            gid: 0,
            size,
            time: (self.timestamp, 0),
            links: 1,
            blocks: blocks + tree_blocks.len() as u64,
            flags: FLAG_EXTENTS,
            i_block,
            xattr_block: 0,
            inline_xattrs: &[],
        };
        inode::encode_inode(&fields, JOURNAL_INODE, self.fs_seed, out);
        Ok(JournalRecord { i_block, size })
    }

    fn encode_node(&mut self, id: NodeId, number: u32, out: &mut [u8]) -> Result<(), Ext4Error> {
        let tree = self.tree;
        let layout = self.layout;
        let node = tree.node(id);
        let no_tree = Vec::new();
        let tree_blocks = layout.tree_blocks.get(&id).unwrap_or(&no_tree);
        let mut i_block = [0u8; 60];
        let (kind_mode, size, links, flags, blocks) = match &node.kind {
            NodeKind::Directory(dir) => {
                let extents = runs_to_extents(&layout.dir_runs[&id]);
                i_block = self.extent_root(&extents, tree_blocks, number)?;
                let blocks = extent_blocks(&extents);
                let counted = 2 + dir.subdirs;
                // dir_nlink: a directory with too many subdirectories says 1.
                let links = if counted > MAX_LINKS { 1 } else { counted };
                let index = if self.content.indexed[&id] {
                    FLAG_INDEX
                } else {
                    0
                };
                let size = blocks * BLOCK_SIZE_U64;
                (S_IFDIR, size, links, FLAG_EXTENTS | index, blocks)
            }
            NodeKind::File { size, data } => {
                i_block = self.extent_root(data, tree_blocks, number)?;
                (
                    S_IFREG,
                    *size,
                    node.links,
                    FLAG_EXTENTS,
                    extent_blocks(data),
                )
            }
            NodeKind::Symlink { target, data } if data.is_empty() => {
                i_block[..target.len()].copy_from_slice(target);
                (S_IFLNK, target.len() as u64, node.links, 0, 0)
            }
            NodeKind::Symlink { target, data } => {
                i_block = self.extent_root(data, tree_blocks, number)?;
                let size = target.len() as u64;
                (S_IFLNK, size, node.links, FLAG_EXTENTS, extent_blocks(data))
            }
            NodeKind::CharDevice { major, minor } => {
                i_block = inode::device_block(*major, *minor).expect("checked at insert");
                (S_IFCHR, 0, node.links, 0, 0)
            }
            NodeKind::BlockDevice { major, minor } => {
                i_block = inode::device_block(*major, *minor).expect("checked at insert");
                (S_IFBLK, 0, node.links, 0, 0)
            }
            NodeKind::Fifo => (S_IFIFO, 0, node.links, 0, 0),
            NodeKind::Socket => (S_IFSOCK, 0, node.links, 0, 0),
        };
        let xattr_index = self.content.xattr_block_of[id as usize];
        let xattr_block = if xattr_index == NO_XATTR_BLOCK {
            0
        } else {
            layout.xattr_blocks[xattr_index as usize]
        };
        let placement = xattr::place(&node.xattrs).expect("checked at insert");
        let fields = InodeFields {
            mode: kind_mode | node.perm,
            uid: node.uid,
            gid: node.gid,
            size,
            time: node.mtime,
            links: links as u16,
            blocks: blocks + tree_blocks.len() as u64 + u64::from(xattr_block != 0),
            flags,
            i_block,
            xattr_block,
            inline_xattrs: &placement.inline,
        };
        inode::encode_inode(&fields, number, self.fs_seed, out);
        Ok(())
    }

    /// The `i_block` extent root for `extents`, writing tree blocks when there are more than
    /// the inode holds.
    fn extent_root(
        &mut self,
        extents: &[Extent],
        tree_blocks: &[u64],
        number: u32,
    ) -> Result<[u8; 60], Ext4Error> {
        let seed = self.fs_seed.map(|seed| inode::inode_seed(seed, number));
        let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        let root = build_extent_tree(extents, tree_blocks, seed, |block, bytes| {
            blocks.push((block, bytes.to_vec()));
        });
        for (block, bytes) in blocks {
            self.write(block, &bytes)?;
        }
        Ok(root)
    }

    fn write_directories(&mut self) -> Result<(), Ext4Error> {
        let tree = self.tree;
        let layout = self.layout;
        let numbering = self.numbering;
        let format = self.format;
        for &(id, _) in &self.content.dirs {
            let dir = tree.node(id).kind.as_directory().expect("a directory");
            let names: Vec<&[u8]> = dir.entries.keys().map(|n| &n[..]).collect();
            let entries: Vec<DirEntry<'_>> = dir
                .entries
                .iter()
                .map(|(name, &child)| DirEntry {
                    name,
                    inode: numbering.inode_of[child as usize],
                    file_type: file_type(&tree.node(child).kind),
                })
                .collect();
            let planned = DirLayout::plan(&names, &format, dir.min_blocks).expect("planned before");
            let number = numbering.inode_of[id as usize];
            let parent = numbering.inode_of[dir.parent as usize];
            let seed = self.fs_seed.map(|seed| inode::inode_seed(seed, number));
            let mut physical = layout.dir_runs[&id].iter().flat_map(|r| r.start..r.end());
            let mut result = Ok(());
            planned.render(&entries, number, parent, &format, seed, |block| {
                let at = physical.next().expect("a block per directory block");
                if result.is_ok() {
                    result = self.write(at, block);
                }
            });
            result?;
        }
        Ok(())
    }

    fn write_xattr_blocks(&mut self) -> Result<(), Ext4Error> {
        let tree = self.tree;
        let mut block = vec![0u8; BLOCK_SIZE];
        for (index, &(first, refcount)) in self.content.xattr_blocks.iter().enumerate() {
            let placement = xattr::place(&tree.node(first).xattrs).expect("checked at insert");
            let at = self.layout.xattr_blocks[index];
            xattr::write_block(&mut block, &placement.block, refcount, at, self.fs_seed);
            self.write(at, &block)?;
        }
        Ok(())
    }

    /// Descriptor tables (primary, copies, `meta_bg` blocks) and every superblock copy.
    fn write_descriptors_and_superblocks(
        &mut self,
        descriptors: &[GroupDescriptor],
        fields: &SuperblockFields,
    ) -> Result<(), Ext4Error> {
        let groups = self.layout.geometry.groups;
        let table_blocks = groups.div_ceil(DESCRIPTORS_PER_BLOCK) as usize;
        let mut table = vec![0u8; table_blocks * BLOCK_SIZE];
        for (group, descriptor) in descriptors.iter().enumerate() {
            let at = group * DESCRIPTOR_SIZE;
            superblock::encode_descriptor(
                descriptor,
                group as u64,
                self.fs_seed,
                &mut table[at..at + DESCRIPTOR_SIZE],
            );
        }
        // The first table block: after every superblock copy of the first 128 groups.
        for group in 0..groups.min(DESCRIPTORS_PER_BLOCK) {
            if layout::group_has_superblock(group) {
                self.write(group * BLOCKS_PER_GROUP + 1, &table[..BLOCK_SIZE])?;
            }
        }
        // meta_bg: table block m in groups 128m, 128m + 1, 128m + 127.
        for meta_group in 1..table_blocks as u64 {
            let bytes = &table[meta_group as usize * BLOCK_SIZE..][..BLOCK_SIZE];
            let first_group = meta_group * DESCRIPTORS_PER_BLOCK;
            let copies = [
                first_group,
                first_group + 1,
                first_group + DESCRIPTORS_PER_BLOCK - 1,
            ];
            for (group, at) in copies
                .into_iter()
                .zip(layout::meta_bg_descriptor_locations(meta_group))
            {
                if group < groups {
                    self.write(at, bytes)?;
                }
            }
        }
        let mut block = vec![0u8; BLOCK_SIZE];
        for group in 0..groups {
            if !layout::group_has_superblock(group) {
                continue;
            }
            block.fill(0);
            // The primary sits 1024 bytes in (after the boot sector area); copies at offset 0.
            let at = if group == 0 { 1024 } else { 0 };
            superblock::encode_superblock(fields, group, &mut block[at..at + 1024]);
            self.write(group * BLOCKS_PER_GROUP, &block)?;
        }
        Ok(())
    }
}

fn file_type(kind: &NodeKind) -> u8 {
    match kind {
        NodeKind::Directory(_) => dir::FT_DIR,
        NodeKind::File { .. } => dir::FT_REG,
        NodeKind::Symlink { .. } => dir::FT_SYMLINK,
        NodeKind::CharDevice { .. } => dir::FT_CHR,
        NodeKind::BlockDevice { .. } => dir::FT_BLK,
        NodeKind::Fifo => dir::FT_FIFO,
        NodeKind::Socket => dir::FT_SOCK,
    }
}

/// Sets `len` bits from bit `start` (bitmap order: least significant bit first).
fn set_bits(bitmap: &mut [u8], start: u64, len: u64) {
    let end = start + len;
    let mut bit = start;
    while bit < end && !bit.is_multiple_of(8) {
        bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
        bit += 1;
    }
    let whole_end = end - end % 8;
    if bit < whole_end {
        bitmap[(bit / 8) as usize..(whole_end / 8) as usize].fill(0xff);
        bit = whole_end;
    }
    while bit < end {
        bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
        bit += 1;
    }
}

fn count_bits(bitmap: &[u8]) -> u64 {
    bitmap
        .chunks_exact(8)
        .map(|c| u64::from(u64::from_le_bytes(c.try_into().expect("8 bytes")).count_ones()))
        .sum()
}
