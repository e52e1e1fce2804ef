//! A read-only ext4 reader: superblock, group descriptors, inodes, extent trees and
//! indirect block maps, directories, extended attributes, all from an image file through
//! positioned reads. Pure Rust, no mount, no `unsafe`, no mmap.
//!
//! # What it is for
//! Turning images back into trees: the upper directory of a builder VM's overlay disk
//! (written by banger's writer without a journal, then by a Linux guest), and base images from
//! bundles (banger's writer or any mke2fs). [`super::export`] walks it into a tar stream.
//!
//! # Lifecycle
//! 1. [`Ext4Reader::open`] reads the superblock, refuses what it cannot read faithfully
//!    (`inline_data`, `ea_inode`, `encrypt`, `casefold`, compression, `dirdata`, unknown
//!    incompatible features, a journal that needs recovery, a truncated file), and loads every
//!    group's inode-table location (32- or 64-byte descriptors, classic or `meta_bg` placement).
//! 2. Callers address inodes by number: [`Ext4Reader::lookup`] resolves a path from the root
//!    without following symlinks; [`Ext4Reader::inode`], [`Ext4Reader::read_dir`],
//!    [`Ext4Reader::xattrs`], [`Ext4Reader::symlink_target`] and [`Ext4Reader::open_file`] read
//!    one inode each. Nothing is kept per inode between calls: a direct-mapped cache of 256
//!    metadata blocks (inode tables, attribute blocks) makes the repeated reads of a walk cheap.
//! 3. File contents stream through [`FileReader`]: the block map is walked lazily, extent by
//!    extent, and data is read in runs of up to 1 MiB; holes and unwritten extents read as
//!    zeros without touching the disk.
//!
//! # Trust
//! Every number read from the image is bounded before use: block numbers against the file
//! system size, offsets and lengths against the structure holding them, extent trees by depth
//! (at most 5), key order and a visited set, indirect maps by the file size. Errors name the
//! image, the inode and the block or byte involved. Metadata checksums are verified for the
//! superblock and for inodes (`metadata_csum`); directory, extent and attribute block
//! checksums are not (their structure is still checked).
//!
//! # Known weaknesses
//! - Directories are read linearly; `lookup` costs one scan of each directory on the path
//!   (hash trees are skipped over, not used).
//! - A journal is never replayed: an image with `needs_recovery` is refused, and a journal-less
//!   image that was not cleanly unmounted is read as it is ([`Ext4Reader::cleanly_unmounted`]
//!   tells).
//! - Attributes with an unknown name index are skipped, as the kernel's `listxattr` does.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::acl;
use super::checksum::crc32c;

const SUPERBLOCK_OFFSET: u64 = 1024;
const SUPERBLOCK_SIZE: usize = 1024;
const MAGIC: u16 = 0xEF53;
const ROOT_INODE: u32 = 2;
/// The old fixed inode size, and the part of every inode that is always there.
const GOOD_OLD_INODE_SIZE: usize = 128;
const GOOD_OLD_FIRST_INODE: u32 = 11;

const COMPAT_SPARSE_SUPER2: u32 = 0x200;

const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;

const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// `s_state` bit: cleanly unmounted.
const STATE_VALID: u16 = 0x1;

/// Group descriptor flag: the group's inode table was never initialized.
const BG_INODE_UNINIT: u16 = 0x1;

const INODE_FLAG_ENCRYPT: u32 = 0x800;
const INODE_FLAG_HUGE_FILE: u32 = 0x4_0000;
const INODE_FLAG_EXTENTS: u32 = 0x8_0000;
const INODE_FLAG_EA_INODE: u32 = 0x20_0000;
const INODE_FLAG_INLINE_DATA: u32 = 0x1000_0000;

const S_IFMT: u16 = 0o170000;
const S_IFIFO: u16 = 0o010000;
const S_IFCHR: u16 = 0o020000;
const S_IFDIR: u16 = 0o040000;
const S_IFBLK: u16 = 0o060000;
const S_IFREG: u16 = 0o100000;
const S_IFLNK: u16 = 0o120000;
const S_IFSOCK: u16 = 0o140000;

const EXTENT_MAGIC: u16 = 0xF30A;
const EXTENT_ENTRY: usize = 12;
/// `EXT4_MAX_EXTENT_DEPTH`: 4 root entries × 340⁵ leaves is far beyond 2³² blocks.
const MAX_EXTENT_DEPTH: u16 = 5;
/// An extent length above this marks an unwritten (preallocated) extent.
const MAX_INIT_EXTENT_LEN: u16 = 32768;

const XATTR_MAGIC: u32 = 0xEA02_0000;
const XATTR_BLOCK_HEADER: usize = 32;
const XATTR_ENTRY_HEADER: usize = 16;

/// Longest symlink target Linux reads back (`PATH_MAX`).
const MAX_SYMLINK_LEN: u64 = 4096;
/// Largest run of file data read at once.
const READ_CHUNK: usize = 1 << 20;
/// Metadata blocks kept (direct-mapped by block number): 1 MiB of 4 KiB blocks.
const CACHE_SLOTS: usize = 256;

/// An inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeNo(pub u32);

impl InodeNo {
    /// The root directory.
    pub const ROOT: InodeNo = InodeNo(ROOT_INODE);
}

impl std::fmt::Display for InodeNo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The type of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl FileKind {
    fn from_mode(mode: u16) -> Option<FileKind> {
        Some(match mode & S_IFMT {
            S_IFREG => FileKind::Regular,
            S_IFDIR => FileKind::Directory,
            S_IFLNK => FileKind::Symlink,
            S_IFCHR => FileKind::CharDevice,
            S_IFBLK => FileKind::BlockDevice,
            S_IFIFO => FileKind::Fifo,
            S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }

    /// The `filetype` code of a directory entry (0 is "unknown").
    fn from_dirent_type(code: u8) -> Option<FileKind> {
        Some(match code {
            1 => FileKind::Regular,
            2 => FileKind::Directory,
            3 => FileKind::CharDevice,
            4 => FileKind::BlockDevice,
            5 => FileKind::Fifo,
            6 => FileKind::Socket,
            7 => FileKind::Symlink,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            FileKind::Regular => "regular file",
            FileKind::Directory => "directory",
            FileKind::Symlink => "symlink",
            FileKind::CharDevice => "character device",
            FileKind::BlockDevice => "block device",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
        }
    }
}

/// What [`Ext4Reader::inode`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InodeInfo {
    pub kind: FileKind,
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// Bytes of a file or symlink target; a directory's blocks; 0 for the others.
    pub size: u64,
    /// Seconds since the epoch (signed, with the ext4 epoch bits) and nanoseconds; the
    /// nanoseconds are 0 on inodes too small to store them.
    pub mtime: (i64, u32),
    /// Names of the inode; for a directory 2 + subdirectories (or 1 past 65000 of them).
    pub nlink: u32,
    /// `(major, minor)` of a character or block device.
    pub device: Option<(u32, u32)>,
}

/// Extended attributes as `(full name, value)` pairs, sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// One name in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: InodeNo,
    /// The type the entry records (`None` without the `filetype` feature). The inode is the
    /// authority.
    pub file_type: Option<FileKind>,
}

/// Errors of the reader. Each names the image and what was being read.
#[derive(Debug, thiserror::Error)]
pub enum Ext4ReadError {
    #[error("cannot open ext4 image {image}")]
    Open {
        image: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {len} bytes at byte {offset} of {image}")]
    ReadImage {
        image: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("{image} is not an ext2/3/4 file system: {reason}")]
    NotExt4 { image: PathBuf, reason: String },
    #[error("{image}: corrupt superblock: {reason}")]
    ReadSuperblock { image: PathBuf, reason: String },
    #[error("{image} uses the ext4 feature `{feature}`, which this reader does not support: {why}")]
    Unsupported {
        image: PathBuf,
        feature: String,
        why: &'static str,
    },
    #[error(
        "{image} was not cleanly unmounted: its journal holds changes that were never applied \
         (the `needs_recovery` flag is set), so its metadata may be stale or inconsistent; \
         replay the journal first (mount it once, or run `e2fsck -fy` on it)"
    )]
    NeedsRecovery { image: PathBuf },
    #[error(
        "{image} is truncated: the file system spans {fs_bytes} bytes, the file has {file_bytes}"
    )]
    Truncated {
        image: PathBuf,
        fs_bytes: u64,
        file_bytes: u64,
    },
    #[error("{image}: corrupt descriptor of block group {group}: {reason}")]
    ReadGroupDescriptor {
        image: PathBuf,
        group: u64,
        reason: String,
    },
    #[error("{image}: inode {ino}: {reason}")]
    ReadInode {
        image: PathBuf,
        ino: u32,
        reason: String,
    },
    #[error("{image}: inode {ino}: corrupt block map: {reason}")]
    MapBlocks {
        image: PathBuf,
        ino: u32,
        reason: String,
    },
    #[error(
        "{image}: directory inode {ino}, logical block {block}, byte {offset}: corrupt entry: {reason}"
    )]
    ReadDirectory {
        image: PathBuf,
        ino: u32,
        block: u64,
        offset: usize,
        reason: String,
    },
    #[error("{image}: inode {ino}: corrupt extended attributes: {reason}")]
    ReadXattrs {
        image: PathBuf,
        ino: u32,
        reason: String,
    },
    #[error("{image}: inode {ino} is a {actual}, not a {expected}")]
    WrongKind {
        image: PathBuf,
        ino: u32,
        expected: &'static str,
        actual: &'static str,
    },
    #[error("{image}: cannot look up {path:?}: {reason}")]
    Lookup {
        image: PathBuf,
        path: PathBuf,
        reason: &'static str,
    },
}

/// Where a group's inodes are.
#[derive(Debug, Clone, Copy)]
struct GroupInfo {
    inode_table: u64,
    /// Inodes at the end of the table never used (0 when the file system does not track it).
    itable_unused: u32,
    inode_uninit: bool,
}

/// The superblock fields the reader uses.
#[derive(Debug, Clone)]
struct Geometry {
    block_size: u64,
    blocks: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    inodes_per_group: u32,
    inodes: u32,
    inode_size: usize,
    first_ino: u32,
    filetype: bool,
    huge_file: bool,
    largedir: bool,
    /// Descriptors say which inode-table parts are unused (`uninit_bg` or `metadata_csum`).
    tracks_unused: bool,
    /// `metadata_csum` seed, when inode checksums are to be verified.
    csum_seed: Option<u32>,
    clean: bool,
}

/// A metadata block kept in memory: its number and bytes.
type CachedBlock = (u64, Arc<[u8]>);

/// Read-only access to an ext4 image file. `Sync`: share one reader between threads.
pub struct Ext4Reader {
    file: File,
    path: PathBuf,
    geometry: Geometry,
    groups: Vec<GroupInfo>,
    /// Direct-mapped by block number: slot `block % CACHE_SLOTS`.
    cache: Mutex<Vec<Option<CachedBlock>>>,
}

impl std::fmt::Debug for Ext4Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ext4Reader")
            .field("path", &self.path)
            .field("geometry", &self.geometry)
            .field("groups", &self.groups.len())
            .finish()
    }
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// An inode as read from its table, with the fields every operation needs decoded.
struct Inode {
    ino: u32,
    /// The inode table block holding it, and where in that block it starts.
    block: Arc<[u8]>,
    at: usize,
    len: usize,
    kind: FileKind,
    mode: u16,
    flags: u32,
    size: u64,
    /// Bytes past the first 128 that hold fields (`i_extra_isize`), 0 on 128-byte inodes.
    extra_isize: usize,
    file_acl: u64,
}

impl Inode {
    fn bytes(&self) -> &[u8] {
        &self.block[self.at..self.at + self.len]
    }

    fn i_block(&self) -> &[u8] {
        &self.bytes()[0x28..0x64]
    }

    /// Whether the field at `offset` (of `size` bytes) lies within the extra fields.
    fn has_extra_field(&self, offset: usize, size: usize) -> bool {
        offset + size <= GOOD_OLD_INODE_SIZE + self.extra_isize
    }
}

/// Decodes an ext4 time: signed 32-bit seconds, then two epoch bits and nanoseconds in the
/// extra word when the inode has one.
fn decode_time(seconds: u32, extra: Option<u32>) -> (i64, u32) {
    let mut secs = i64::from(seconds as i32);
    let mut nanos = 0;
    if let Some(extra) = extra {
        secs += i64::from(extra & 3) << 32;
        nanos = (extra >> 2).min(999_999_999);
    }
    (secs, nanos)
}

/// A device number from `i_block`: the old 8:8 encoding in word 0 when it is non-zero, the
/// new 12:20 one in word 1 otherwise (the kernel's rule).
fn decode_device(i_block: &[u8]) -> (u32, u32) {
    let old = le32(i_block, 0);
    if old != 0 {
        ((old >> 8) & 0xff, old & 0xff)
    } else {
        let new = le32(i_block, 4);
        ((new & 0xfff00) >> 8, (new & 0xff) | ((new >> 12) & 0xfff00))
    }
}

fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n.is_multiple_of(base) {
        n /= base;
    }
    n == 1
}

impl Ext4Reader {
    /// Opens `image` (a file, or a block device) and reads its superblock and group
    /// descriptors.
    pub fn open(image: &Path) -> Result<Ext4Reader, Ext4ReadError> {
        let file = File::open(image).map_err(|source| Ext4ReadError::Open {
            image: image.to_owned(),
            source,
        })?;
        // Seeking to the end sizes block devices too (their metadata says 0).
        let file_bytes = io::Seek::seek(&mut &file, io::SeekFrom::End(0)).map_err(|source| {
            Ext4ReadError::Open {
                image: image.to_owned(),
                source,
            }
        })?;
        let mut reader = Ext4Reader {
            file,
            path: image.to_owned(),
            geometry: Geometry {
                block_size: 1024,
                blocks: 0,
                first_data_block: 0,
                blocks_per_group: 1,
                inodes_per_group: 1,
                inodes: 0,
                inode_size: GOOD_OLD_INODE_SIZE,
                first_ino: GOOD_OLD_FIRST_INODE,
                filetype: false,
                huge_file: false,
                largedir: false,
                tracks_unused: false,
                csum_seed: None,
                clean: false,
            },
            groups: Vec::new(),
            cache: Mutex::new(vec![None; CACHE_SLOTS]),
        };
        if file_bytes < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE as u64 {
            return Err(Ext4ReadError::NotExt4 {
                image: image.to_owned(),
                reason: format!("{file_bytes} bytes is too small to hold a superblock"),
            });
        }
        let mut superblock = vec![0u8; SUPERBLOCK_SIZE];
        reader.read_at(&mut superblock, SUPERBLOCK_OFFSET)?;
        let (geometry, layout) = reader.parse_superblock(&superblock, file_bytes)?;
        reader.geometry = geometry;
        reader.groups = reader.read_group_descriptors(&layout)?;
        Ok(reader)
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.geometry.block_size
    }

    /// Inodes the file system has (used or not): no walk can meet more distinct ones.
    pub fn inode_count(&self) -> u32 {
        self.geometry.inodes
    }

    /// Whether the superblock says the file system was cleanly unmounted. A journal-less file
    /// system written by a guest that was powered off after `sync` without unmounting reads
    /// fine but says false here; callers decide whether that matters.
    pub fn cleanly_unmounted(&self) -> bool {
        self.geometry.clean
    }

    fn superblock_error(&self, reason: impl Into<String>) -> Ext4ReadError {
        Ext4ReadError::ReadSuperblock {
            image: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn parse_superblock(
        &self,
        sb: &[u8],
        file_bytes: u64,
    ) -> Result<(Geometry, DescriptorLayout), Ext4ReadError> {
        let magic = le16(sb, 0x38);
        if magic != MAGIC {
            return Err(Ext4ReadError::NotExt4 {
                image: self.path.clone(),
                reason: format!("magic {magic:#06x} at byte 1080, expected {MAGIC:#06x}"),
            });
        }
        let compat = le32(sb, 0x5C);
        let incompat = le32(sb, 0x60);
        let ro_compat = le32(sb, 0x64);
        if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            // The superblock checksum covers everything before it.
            let stored = le32(sb, 0x3FC);
            let computed = crc32c(!0, &sb[..0x3FC]);
            if stored != computed {
                return Err(self.superblock_error(format!(
                    "checksum {stored:#010x} does not match its content ({computed:#010x})"
                )));
            }
        }
        self.check_features(incompat)?;
        let log_block_size = le32(sb, 0x18);
        if log_block_size > 6 {
            return Err(self.superblock_error(format!(
                "block size 1024 << {log_block_size} is beyond 64 KiB"
            )));
        }
        let block_size = 1024u64 << log_block_size;
        let mut blocks = u64::from(le32(sb, 0x04));
        if incompat & INCOMPAT_64BIT != 0 {
            blocks |= u64::from(le32(sb, 0x150)) << 32;
        }
        let first_data_block = u64::from(le32(sb, 0x14));
        let blocks_per_group = u64::from(le32(sb, 0x20));
        let inodes_per_group = le32(sb, 0x28);
        let inodes = le32(sb, 0x00);
        let rev_level = le32(sb, 0x4C);
        let (inode_size, first_ino) = if rev_level == 0 {
            (GOOD_OLD_INODE_SIZE, GOOD_OLD_FIRST_INODE)
        } else {
            (usize::from(le16(sb, 0x58)), le32(sb, 0x54))
        };
        if first_data_block >= blocks {
            return Err(self.superblock_error(format!(
                "first data block {first_data_block} is not below the block count {blocks}"
            )));
        }
        let fs_bytes = blocks.checked_mul(block_size).ok_or_else(|| {
            self.superblock_error(format!("{blocks} blocks of {block_size} bytes overflow"))
        })?;
        if file_bytes < fs_bytes {
            return Err(Ext4ReadError::Truncated {
                image: self.path.clone(),
                fs_bytes,
                file_bytes,
            });
        }
        // Bitmaps are one block each; bigalloc groups count clusters, so allow its ratio.
        let log_cluster = le32(sb, 0x1C).saturating_sub(log_block_size).min(16);
        if blocks_per_group == 0 || blocks_per_group > (8 * block_size) << log_cluster {
            return Err(self.superblock_error(format!(
                "{blocks_per_group} blocks per group does not fit a {block_size}-byte bitmap"
            )));
        }
        if inodes_per_group == 0 || u64::from(inodes_per_group) > 8 * block_size {
            return Err(self.superblock_error(format!(
                "{inodes_per_group} inodes per group does not fit a {block_size}-byte bitmap"
            )));
        }
        if inode_size < GOOD_OLD_INODE_SIZE
            || !inode_size.is_power_of_two()
            || inode_size as u64 > block_size
        {
            return Err(self.superblock_error(format!(
                "inode size {inode_size} is not a power of two between 128 and the block size"
            )));
        }
        if first_ino < GOOD_OLD_FIRST_INODE || first_ino > inodes {
            return Err(self.superblock_error(format!(
                "first non-reserved inode {first_ino} is not between 11 and {inodes}"
            )));
        }
        let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
        if groups * u64::from(inodes_per_group) != u64::from(inodes) {
            return Err(self.superblock_error(format!(
                "{inodes} inodes is not {groups} groups × {inodes_per_group} inodes"
            )));
        }
        let descriptor_size = if incompat & INCOMPAT_64BIT != 0 {
            let size = u64::from(le16(sb, 0xFE));
            if !(64..=1024).contains(&size) || !size.is_power_of_two() || size > block_size {
                return Err(self.superblock_error(format!(
                    "64bit group descriptor size {size} is not a power of two from 64 to 1024"
                )));
            }
            size
        } else {
            32
        };
        let csum_seed = (ro_compat & RO_COMPAT_METADATA_CSUM != 0).then(|| {
            if incompat & INCOMPAT_CSUM_SEED != 0 {
                le32(sb, 0x270)
            } else {
                crc32c(!0, &sb[0x68..0x78])
            }
        });
        if incompat & INCOMPAT_RECOVER != 0 {
            return Err(Ext4ReadError::NeedsRecovery {
                image: self.path.clone(),
            });
        }
        let geometry = Geometry {
            block_size,
            blocks,
            first_data_block,
            blocks_per_group,
            inodes_per_group,
            inodes,
            inode_size,
            first_ino,
            filetype: incompat & INCOMPAT_FILETYPE != 0,
            huge_file: ro_compat & RO_COMPAT_HUGE_FILE != 0,
            largedir: incompat & INCOMPAT_LARGEDIR != 0,
            tracks_unused: ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0,
            csum_seed,
            clean: le16(sb, 0x3A) & STATE_VALID != 0,
        };
        let layout = DescriptorLayout {
            groups,
            descriptor_size,
            meta_bg: incompat & INCOMPAT_META_BG != 0,
            first_meta_bg: u64::from(le32(sb, 0x104)),
            sparse_super: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
            sparse_super2: (compat & COMPAT_SPARSE_SUPER2 != 0)
                .then(|| [u64::from(le32(sb, 0x24C)), u64::from(le32(sb, 0x250))]),
        };
        Ok((geometry, layout))
    }

    fn check_features(&self, incompat: u32) -> Result<(), Ext4ReadError> {
        let refused: [(u32, &str, &'static str); 7] = [
            (
                INCOMPAT_INLINE_DATA,
                "inline_data",
                "small files and directories would live inside their inodes",
            ),
            (
                INCOMPAT_EA_INODE,
                "ea_inode",
                "large attribute values would live in inodes of their own",
            ),
            (
                INCOMPAT_ENCRYPT,
                "encrypt",
                "encrypted names and contents cannot be read",
            ),
            (
                INCOMPAT_CASEFOLD,
                "casefold",
                "case-insensitive directories change how names compare",
            ),
            (INCOMPAT_COMPRESSION, "compression", "never part of ext4"),
            (
                INCOMPAT_DIRDATA,
                "dirdata",
                "directory entries would carry extra data",
            ),
            (
                INCOMPAT_JOURNAL_DEV,
                "journal_dev",
                "this is an external journal, not a file system",
            ),
        ];
        for (bit, feature, why) in refused {
            if incompat & bit != 0 {
                return Err(Ext4ReadError::Unsupported {
                    image: self.path.clone(),
                    feature: feature.to_owned(),
                    why,
                });
            }
        }
        let known = INCOMPAT_FILETYPE
            | INCOMPAT_RECOVER
            | INCOMPAT_META_BG
            | INCOMPAT_EXTENTS
            | INCOMPAT_64BIT
            | INCOMPAT_MMP
            | INCOMPAT_FLEX_BG
            | INCOMPAT_CSUM_SEED
            | INCOMPAT_LARGEDIR;
        let unknown = incompat & !known;
        if unknown != 0 {
            return Err(Ext4ReadError::Unsupported {
                image: self.path.clone(),
                feature: format!("incompatible feature bits {unknown:#x}"),
                why: "they are unknown, so the on-disk format cannot be trusted",
            });
        }
        Ok(())
    }

    /// Whether `group` starts with a superblock copy (and, outside `meta_bg`, descriptors).
    fn group_has_superblock(&self, layout: &DescriptorLayout, group: u64) -> bool {
        if group == 0 {
            return true;
        }
        if let Some(backups) = layout.sparse_super2 {
            return backups.contains(&group);
        }
        if group == 1 || !layout.sparse_super {
            return true;
        }
        group % 2 == 1 && (is_power_of(group, 3) || is_power_of(group, 5) || is_power_of(group, 7))
    }

    /// The block holding descriptor block `index` (the kernel's `descriptor_loc`).
    fn descriptor_block(&self, layout: &DescriptorLayout, index: u64) -> u64 {
        let g = &self.geometry;
        let superblock_block = 1024 / g.block_size; // block 1 with 1 KiB blocks, else 0
        if !layout.meta_bg || index < layout.first_meta_bg {
            return superblock_block + index + 1;
        }
        let group = index * (g.block_size / layout.descriptor_size);
        let mut skip = u64::from(self.group_has_superblock(layout, group));
        if g.block_size == 1024 && index == 0 && g.first_data_block == 0 {
            skip += 1;
        }
        g.first_data_block + group * g.blocks_per_group + skip
    }

    fn read_group_descriptors(
        &self,
        layout: &DescriptorLayout,
    ) -> Result<Vec<GroupInfo>, Ext4ReadError> {
        let g = &self.geometry;
        let per_block = g.block_size / layout.descriptor_size;
        let size = layout.descriptor_size as usize;
        let table_blocks =
            (u64::from(g.inodes_per_group) * g.inode_size as u64).div_ceil(g.block_size);
        let mut groups = Vec::with_capacity(layout.groups.min(1 << 20) as usize);
        let mut block = vec![0u8; g.block_size as usize];
        for index in 0..layout.groups.div_ceil(per_block) {
            let number = self.descriptor_block(layout, index);
            if number >= g.blocks {
                return Err(Ext4ReadError::ReadGroupDescriptor {
                    image: self.path.clone(),
                    group: index * per_block,
                    reason: format!(
                        "its descriptor block {number} is beyond the file system's {} blocks",
                        g.blocks
                    ),
                });
            }
            self.read_at(&mut block, number * g.block_size)?;
            let first = index * per_block;
            let count = per_block.min(layout.groups - first);
            for (i, raw) in block.chunks_exact(size).take(count as usize).enumerate() {
                let group = first + i as u64;
                let wide = size >= 64;
                let mut inode_table = u64::from(le32(raw, 0x08));
                let mut itable_unused = u32::from(le16(raw, 0x1C));
                if wide {
                    inode_table |= u64::from(le32(raw, 0x28)) << 32;
                    itable_unused |= u32::from(le16(raw, 0x32)) << 16;
                }
                let flags = le16(raw, 0x12);
                // The superblock is at or before `first_data_block`: no table starts there.
                if inode_table <= g.first_data_block
                    || inode_table
                        .checked_add(table_blocks)
                        .is_none_or(|end| end > g.blocks)
                {
                    return Err(Ext4ReadError::ReadGroupDescriptor {
                        image: self.path.clone(),
                        group,
                        reason: format!(
                            "its inode table (blocks {inode_table}..+{table_blocks}) lies outside \
                             the file system's {} blocks",
                            g.blocks
                        ),
                    });
                }
                groups.push(GroupInfo {
                    inode_table,
                    itable_unused: if g.tracks_unused { itable_unused } else { 0 },
                    inode_uninit: g.tracks_unused && flags & BG_INODE_UNINIT != 0,
                });
            }
        }
        Ok(groups)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Ext4ReadError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| Ext4ReadError::ReadImage {
                image: self.path.clone(),
                offset,
                len: buf.len(),
                source,
            })
    }

    /// One metadata block, through the cache.
    fn cached_block(&self, number: u64) -> Result<Arc<[u8]>, Ext4ReadError> {
        let slot = (number % CACHE_SLOTS as u64) as usize;
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((cached, data)) = &cache[slot]
                && *cached == number
            {
                return Ok(Arc::clone(data));
            }
        }
        let mut data = vec![0u8; self.geometry.block_size as usize];
        self.read_at(&mut data, number * self.geometry.block_size)?;
        let data: Arc<[u8]> = data.into();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache[slot] = Some((number, Arc::clone(&data)));
        Ok(data)
    }

    fn inode_error(&self, ino: u32, reason: impl Into<String>) -> Ext4ReadError {
        Ext4ReadError::ReadInode {
            image: self.path.clone(),
            ino,
            reason: reason.into(),
        }
    }

    fn load_inode(&self, ino: InodeNo) -> Result<Inode, Ext4ReadError> {
        let g = &self.geometry;
        let ino = ino.0;
        if ino == 0 || ino > g.inodes {
            return Err(self.inode_error(ino, format!("out of range 1..={}", g.inodes)));
        }
        if ino < g.first_ino && ino != ROOT_INODE {
            return Err(self.inode_error(
                ino,
                format!(
                    "reserved for the file system's own use (below {})",
                    g.first_ino
                ),
            ));
        }
        let group_index = u64::from((ino - 1) / g.inodes_per_group);
        let index = (ino - 1) % g.inodes_per_group;
        let group = self.groups[group_index as usize];
        if group.inode_uninit || index >= g.inodes_per_group.saturating_sub(group.itable_unused) {
            return Err(self.inode_error(
                ino,
                format!("in the never-used part of group {group_index}'s inode table"),
            ));
        }
        let offset = u64::from(index) * g.inode_size as u64;
        let block = self.cached_block(group.inode_table + offset / g.block_size)?;
        let at = (offset % g.block_size) as usize;
        let bytes = &block[at..at + g.inode_size];
        if let Some(seed) = g.csum_seed {
            self.verify_inode_checksum(ino, bytes, seed)?;
        }
        let mode = le16(bytes, 0x00);
        let links = le16(bytes, 0x1A);
        if mode == 0 || links == 0 {
            return Err(self.inode_error(
                ino,
                "not in use (deleted or never allocated): a directory entry points at a free inode",
            ));
        }
        let kind = FileKind::from_mode(mode)
            .ok_or_else(|| self.inode_error(ino, format!("unknown file type in mode {mode:#o}")))?;
        let flags = le32(bytes, 0x20);
        for (flag, what) in [
            (INODE_FLAG_INLINE_DATA, "inline data"),
            (INODE_FLAG_ENCRYPT, "encryption"),
            (INODE_FLAG_EA_INODE, "an attribute-value inode"),
        ] {
            if flags & flag != 0 {
                return Err(self.inode_error(ino, format!("uses {what}, which is not supported")));
            }
        }
        let extra_isize = if g.inode_size > GOOD_OLD_INODE_SIZE {
            let extra = usize::from(le16(bytes, 0x80));
            if GOOD_OLD_INODE_SIZE + extra > g.inode_size || extra % 4 != 0 {
                return Err(self.inode_error(
                    ino,
                    format!(
                        "i_extra_isize {extra} does not fit a {}-byte inode",
                        g.inode_size
                    ),
                ));
            }
            extra
        } else {
            0
        };
        // The high half is a size only for regular files (and directories under `largedir`):
        // it used to be the directory ACL, which old images may still hold.
        let mut size = u64::from(le32(bytes, 0x04));
        if kind == FileKind::Regular || (kind == FileKind::Directory && g.largedir) {
            size |= u64::from(le32(bytes, 0x6C)) << 32;
        }
        // The largest size 32-bit logical block numbers can address.
        let max_size = g.block_size << 32;
        if size > max_size {
            return Err(self.inode_error(
                ino,
                format!("size {size} is beyond what ext4 can address ({max_size})"),
            ));
        }
        let file_acl = u64::from(le32(bytes, 0x68)) | u64::from(le16(bytes, 0x76)) << 32;
        let len = g.inode_size;
        Ok(Inode {
            ino,
            block,
            at,
            len,
            kind,
            mode,
            flags,
            size,
            extra_isize,
            file_acl,
        })
    }

    /// `metadata_csum`: the inode's CRC32C, seeded with the inode number and generation,
    /// computed with its own checksum fields zeroed.
    fn verify_inode_checksum(
        &self,
        ino: u32,
        bytes: &[u8],
        seed: u32,
    ) -> Result<(), Ext4ReadError> {
        let mut copy = bytes.to_vec();
        let generation = le32(bytes, 0x64);
        let seed = crc32c(crc32c(seed, &ino.to_le_bytes()), &generation.to_le_bytes());
        let mut stored = u32::from(le16(bytes, 0x7C));
        copy[0x7C..0x7E].fill(0);
        let has_hi = bytes.len() > GOOD_OLD_INODE_SIZE
            && 0x84 <= GOOD_OLD_INODE_SIZE + usize::from(le16(bytes, 0x80));
        if has_hi {
            stored |= u32::from(le16(bytes, 0x82)) << 16;
            copy[0x82..0x84].fill(0);
        }
        let mut computed = crc32c(seed, &copy);
        if !has_hi {
            computed &= 0xFFFF;
        }
        if stored != computed {
            return Err(self.inode_error(
                ino,
                format!("checksum {stored:#x} does not match its content ({computed:#x})"),
            ));
        }
        Ok(())
    }

    /// Ownership, permissions, size, time, link count and device number of `ino`.
    pub fn inode(&self, ino: InodeNo) -> Result<InodeInfo, Ext4ReadError> {
        let inode = self.load_inode(ino)?;
        let bytes = inode.bytes();
        let uid = u32::from(le16(bytes, 0x02)) | u32::from(le16(bytes, 0x78)) << 16;
        let gid = u32::from(le16(bytes, 0x18)) | u32::from(le16(bytes, 0x7A)) << 16;
        let mtime_extra = inode.has_extra_field(0x88, 4).then(|| le32(bytes, 0x88));
        let device = matches!(inode.kind, FileKind::CharDevice | FileKind::BlockDevice)
            .then(|| decode_device(inode.i_block()));
        Ok(InodeInfo {
            kind: inode.kind,
            perm: inode.mode & 0o7777,
            uid,
            gid,
            size: match inode.kind {
                FileKind::Regular | FileKind::Directory | FileKind::Symlink => inode.size,
                _ => 0,
            },
            mtime: decode_time(le32(bytes, 0x10), mtime_extra),
            nlink: u32::from(le16(bytes, 0x1A)),
            device,
        })
    }

    fn expect_kind(&self, inode: &Inode, expected: FileKind) -> Result<(), Ext4ReadError> {
        if inode.kind == expected {
            Ok(())
        } else {
            Err(Ext4ReadError::WrongKind {
                image: self.path.clone(),
                ino: inode.ino,
                expected: expected.name(),
                actual: inode.kind.name(),
            })
        }
    }

    /// 512-byte sectors the inode owns (data, tree blocks, attribute block).
    fn sectors(&self, inode: &Inode) -> u64 {
        let bytes = inode.bytes();
        let mut blocks = u64::from(le32(bytes, 0x1C));
        if self.geometry.huge_file {
            blocks |= u64::from(le16(bytes, 0x74)) << 32;
            if inode.flags & INODE_FLAG_HUGE_FILE != 0 {
                return blocks * (self.geometry.block_size / 512);
            }
        }
        blocks
    }

    /// A symlink whose target is stored in `i_block`: the kernel's test, no data blocks
    /// (whatever the extents flag says).
    fn is_fast_symlink(&self, inode: &Inode) -> bool {
        let attribute_sectors = if inode.file_acl != 0 {
            self.geometry.block_size / 512
        } else {
            0
        };
        self.sectors(inode).saturating_sub(attribute_sectors) == 0
    }

    fn block_map<'r>(&'r self, inode: &Inode) -> Result<BlockMap<'r>, Ext4ReadError> {
        if inode.flags & INODE_FLAG_EXTENTS != 0 {
            ExtentWalker::new(self, inode.ino, inode.i_block()).map(BlockMap::Extents)
        } else {
            let mut pointers = [0u32; 15];
            for (i, pointer) in pointers.iter_mut().enumerate() {
                *pointer = le32(inode.i_block(), 4 * i);
            }
            let blocks = inode.size.div_ceil(self.geometry.block_size);
            Ok(BlockMap::Indirect(IndirectWalker::new(
                self, inode.ino, pointers, blocks,
            )))
        }
    }

    /// The target of symlink `ino`, as bytes.
    pub fn symlink_target(&self, ino: InodeNo) -> Result<Vec<u8>, Ext4ReadError> {
        let inode = self.load_inode(ino)?;
        self.expect_kind(&inode, FileKind::Symlink)?;
        if inode.size == 0 || inode.size > MAX_SYMLINK_LEN {
            return Err(self.inode_error(
                inode.ino,
                format!(
                    "symlink target of {} bytes (1 to 4096 expected)",
                    inode.size
                ),
            ));
        }
        let target = if self.is_fast_symlink(&inode) {
            if inode.size >= 60 {
                return Err(self.inode_error(
                    inode.ino,
                    format!("symlink of {} bytes has no data blocks", inode.size),
                ));
            }
            inode.i_block()[..inode.size as usize].to_vec()
        } else {
            let mut target = Vec::with_capacity(inode.size as usize);
            let mut reader = FileReader::new(self, &inode)?;
            io::Read::read_to_end(&mut reader, &mut target).map_err(|error| {
                error
                    .downcast::<Ext4ReadError>()
                    .unwrap_or_else(|error| self.inode_error(inode.ino, error.to_string()))
            })?;
            target
        };
        if target.contains(&0) {
            return Err(self.inode_error(inode.ino, "symlink target contains a NUL byte"));
        }
        Ok(target)
    }

    /// A streaming reader of regular file `ino`'s contents (holes read as zeros).
    pub fn open_file(&self, ino: InodeNo) -> Result<FileReader<'_>, Ext4ReadError> {
        let inode = self.load_inode(ino)?;
        self.expect_kind(&inode, FileKind::Regular)?;
        FileReader::new(self, &inode)
    }

    /// The entries of directory `ino` in on-disk order, without `.` and `..`.
    pub fn read_dir(&self, ino: InodeNo) -> Result<Vec<DirEntry>, Ext4ReadError> {
        let inode = self.load_inode(ino)?;
        self.expect_kind(&inode, FileKind::Directory)?;
        let g = &self.geometry;
        // A directory cannot hold more blocks than the file system has.
        if inode.size > g.blocks * g.block_size {
            return Err(self.inode_error(
                inode.ino,
                format!("directory size {} exceeds the file system", inode.size),
            ));
        }
        let block_size = g.block_size as usize;
        let blocks = inode.size / g.block_size;
        let mut map = self.block_map(&inode)?;
        let mut entries = Vec::new();
        let mut buffer = Vec::new();
        while let Some(mapping) = map.next()? {
            if mapping.logical >= blocks {
                break;
            }
            if mapping.unwritten {
                continue; // reads as zeros: no entries
            }
            let len = mapping.len.min(blocks - mapping.logical);
            // Read up to a chunk of contiguous blocks at once.
            let per_read = (READ_CHUNK / block_size) as u64;
            let mut done = 0;
            while done < len {
                let count = (len - done).min(per_read);
                buffer.resize(count as usize * block_size, 0);
                self.read_at(&mut buffer, (mapping.physical + done) * g.block_size)?;
                for (i, block) in buffer.chunks_exact(block_size).enumerate() {
                    let logical = mapping.logical + done + i as u64;
                    parse_dir_block(block, g.filetype, g.inodes, |entry| entries.push(entry))
                        .map_err(|(offset, reason)| Ext4ReadError::ReadDirectory {
                            image: self.path.clone(),
                            ino: inode.ino,
                            block: logical,
                            offset,
                            reason,
                        })?;
                }
                done += count;
            }
        }
        Ok(entries)
    }

    /// Resolves `path` (absolute or relative to the root) without following symlinks: `None`
    /// when a component is missing or a non-final component is not a directory.
    pub fn lookup(&self, path: &Path) -> Result<Option<InodeNo>, Ext4ReadError> {
        let mut current = InodeNo::ROOT;
        for component in path.components() {
            let name = match component {
                Component::RootDir | Component::CurDir => continue,
                Component::ParentDir => {
                    return Err(Ext4ReadError::Lookup {
                        image: self.path.clone(),
                        path: path.to_owned(),
                        reason: "`..` components are not resolved",
                    });
                }
                Component::Prefix(_) => {
                    return Err(Ext4ReadError::Lookup {
                        image: self.path.clone(),
                        path: path.to_owned(),
                        reason: "not a Unix path",
                    });
                }
                Component::Normal(name) => name,
            };
            if self.inode(current)?.kind != FileKind::Directory {
                return Ok(None);
            }
            let name = std::os::unix::ffi::OsStrExt::as_bytes(name);
            match self.read_dir(current)?.into_iter().find(|e| e.name == name) {
                Some(entry) => current = entry.ino,
                None => return Ok(None),
            }
        }
        Ok(Some(current))
    }

    fn xattr_error(&self, ino: u32, reason: impl Into<String>) -> Ext4ReadError {
        Ext4ReadError::ReadXattrs {
            image: self.path.clone(),
            ino,
            reason: reason.into(),
        }
    }

    /// Extended attributes of `ino` by full name (`user.x`, `security.capability`), sorted by
    /// name. POSIX ACLs come in the user-space format (`getxattr`'s, version 2).
    pub fn xattrs(&self, ino: InodeNo) -> Result<Xattrs, Ext4ReadError> {
        let inode = self.load_inode(ino)?;
        let mut raw: Vec<RawXattr> = Vec::new();
        let ibody = GOOD_OLD_INODE_SIZE + inode.extra_isize;
        let bytes = inode.bytes();
        if inode.extra_isize > 0 && ibody + 4 <= bytes.len() && le32(bytes, ibody) == XATTR_MAGIC {
            // In the inode, value offsets count from the first entry, right after the magic.
            parse_xattr_entries(&bytes[ibody..], 4, 4, &mut raw)
                .map_err(|reason| self.xattr_error(inode.ino, format!("in the inode: {reason}")))?;
        }
        if inode.file_acl != 0 {
            let number = inode.file_acl;
            let g = &self.geometry;
            if number < g.first_data_block || number >= g.blocks {
                return Err(self.xattr_error(
                    inode.ino,
                    format!(
                        "attribute block {number} is beyond the file system's {} blocks",
                        g.blocks
                    ),
                ));
            }
            let block = self.cached_block(number)?;
            let block_error = |reason: String| {
                self.xattr_error(inode.ino, format!("in block {number}: {reason}"))
            };
            if le32(&block, 0) != XATTR_MAGIC {
                return Err(block_error(format!("bad magic {:#010x}", le32(&block, 0))));
            }
            if le32(&block, 8) != 1 {
                return Err(block_error(format!(
                    "spans {} blocks, not 1",
                    le32(&block, 8)
                )));
            }
            parse_xattr_entries(&block, XATTR_BLOCK_HEADER, 0, &mut raw).map_err(block_error)?;
        }
        let mut named = Vec::with_capacity(raw.len());
        for attribute in raw {
            let prefix: &[u8] = match attribute.index {
                1 => b"user.",
                2 => b"system.posix_acl_access",
                3 => b"system.posix_acl_default",
                4 => b"trusted.",
                6 => b"security.",
                7 => b"system.",
                8 => b"system.richacl",
                _ => continue, // no handler: invisible to listxattr as well
            };
            let name = [prefix, &attribute.name].concat();
            let value = if matches!(attribute.index, 2 | 3) {
                acl::from_disk(&attribute.value).map_err(|reason| {
                    self.xattr_error(
                        inode.ino,
                        format!("{}: bad ACL: {reason}", String::from_utf8_lossy(&name)),
                    )
                })?
            } else {
                attribute.value
            };
            named.push((name, value));
        }
        // In-inode attributes come first and win over a block copy of the same name, as in
        // the kernel's lookup order; the sort is stable.
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named.dedup_by(|later, earlier| later.0 == earlier.0);
        Ok(named)
    }
}

/// Where group descriptors are, from the superblock.
#[derive(Debug)]
struct DescriptorLayout {
    groups: u64,
    descriptor_size: u64,
    meta_bg: bool,
    first_meta_bg: u64,
    sparse_super: bool,
    sparse_super2: Option<[u64; 2]>,
}

/// One attribute as stored: name index, name suffix, value.
struct RawXattr {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
}

/// Parses attribute entries of `area` from `entries_at` until the 4 zero bytes that end the
/// list; value offsets count from `value_base`.
fn parse_xattr_entries(
    area: &[u8],
    entries_at: usize,
    value_base: usize,
    out: &mut Vec<RawXattr>,
) -> Result<(), String> {
    let mut at = entries_at;
    loop {
        if at + 4 > area.len() {
            return Err(format!("entry list runs past the end at byte {at}"));
        }
        if le32(area, at) == 0 {
            return Ok(());
        }
        if at + XATTR_ENTRY_HEADER > area.len() {
            return Err(format!("entry at byte {at} runs past the end"));
        }
        let name_len = usize::from(area[at]);
        let index = area[at + 1];
        let value_offset = usize::from(le16(area, at + 2));
        let value_inode = le32(area, at + 4);
        let value_size = le32(area, at + 8) as usize;
        let name_end = at + XATTR_ENTRY_HEADER + name_len;
        if name_end > area.len() {
            return Err(format!("name of the entry at byte {at} runs past the end"));
        }
        if value_inode != 0 {
            return Err(format!(
                "entry at byte {at} keeps its value in inode {value_inode} (ea_inode)"
            ));
        }
        let value = if value_size == 0 {
            Vec::new()
        } else {
            let start = value_base + value_offset;
            let end = start
                .checked_add(value_size)
                .filter(|&end| end <= area.len());
            match end {
                Some(end) => area[start..end].to_vec(),
                None => {
                    return Err(format!(
                        "value of the entry at byte {at} ({value_size} bytes at {start}) runs \
                         past the end"
                    ));
                }
            }
        };
        out.push(RawXattr {
            index,
            name: area[at + XATTR_ENTRY_HEADER..name_end].to_vec(),
            value,
        });
        at = name_end.next_multiple_of(4);
    }
}

/// A directory entry's record length, with the encoding of 64 KiB blocks.
fn decode_rec_len(raw: u16, block_size: usize) -> usize {
    if block_size < 65536 {
        usize::from(raw)
    } else if raw == u16::MAX || raw == 0 {
        65536
    } else {
        usize::from(raw & 0xFFFC) | usize::from(raw & 3) << 16
    }
}

/// Parses one directory block, handing every live entry but `.` and `..` to `push`. Entries
/// with inode 0 are skipped: deleted entries, the `metadata_csum` tail, and the fake entries
/// that hide hash-tree index data. Errors carry the byte offset and what is wrong.
fn parse_dir_block(
    block: &[u8],
    filetype: bool,
    inodes: u32,
    mut push: impl FnMut(DirEntry),
) -> Result<(), (usize, String)> {
    let mut at = 0;
    while at < block.len() {
        if at + 8 > block.len() {
            return Err((at, "entry header runs past the end of the block".into()));
        }
        let ino = le32(block, at);
        let rec_len = decode_rec_len(le16(block, at + 4), block.len());
        let name_len = usize::from(block[at + 6]);
        if rec_len < 12 || !rec_len.is_multiple_of(4) {
            return Err((
                at,
                format!("record length {rec_len} is not a multiple of 4 of at least 12"),
            ));
        }
        if at + rec_len > block.len() {
            return Err((
                at,
                format!("record length {rec_len} runs past the end of the block"),
            ));
        }
        if ino != 0 {
            if name_len == 0 || 8 + name_len > rec_len {
                return Err((
                    at,
                    format!("name length {name_len} does not fit its record of {rec_len} bytes"),
                ));
            }
            if ino > inodes {
                return Err((at, format!("inode {ino} is beyond the {inodes} inodes")));
            }
            let name = &block[at + 8..at + 8 + name_len];
            if name.contains(&b'/') || name.contains(&0) {
                return Err((at, "name contains `/` or a NUL byte".into()));
            }
            if name != b"." && name != b".." {
                push(DirEntry {
                    name: name.to_vec(),
                    ino: InodeNo(ino),
                    file_type: if filetype {
                        FileKind::from_dirent_type(block[at + 7])
                    } else {
                        None
                    },
                });
            }
        }
        at += rec_len;
    }
    Ok(())
}

/// A run of a file's blocks: `len` blocks from logical `logical` at physical `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    logical: u64,
    physical: u64,
    len: u64,
    /// Allocated but never written: reads as zeros.
    unwritten: bool,
}

/// The mapped runs of an inode in logical order, whichever format maps them.
enum BlockMap<'r> {
    Extents(ExtentWalker<'r>),
    Indirect(IndirectWalker<'r>),
}

impl BlockMap<'_> {
    fn next(&mut self) -> Result<Option<Mapping>, Ext4ReadError> {
        match self {
            BlockMap::Extents(walker) => walker.next(),
            BlockMap::Indirect(walker) => walker.next(),
        }
    }
}

/// Validates an extent tree node's header (`node` is the 60-byte root or a whole block):
/// magic, entry count within the declared maximum and the room the node has, depth at most 5
/// and as the parent says, no empty index node. Returns the entry count and depth.
fn check_extent_header(node: &[u8], expected_depth: Option<u16>) -> Result<(usize, u16), String> {
    let magic = le16(node, 0);
    if magic != EXTENT_MAGIC {
        return Err(format!("bad extent header magic {magic:#06x}"));
    }
    let entries = usize::from(le16(node, 2));
    let max = usize::from(le16(node, 4));
    let depth = le16(node, 6);
    let room = (node.len() - EXTENT_ENTRY) / EXTENT_ENTRY;
    if max == 0 || max > room || entries > max {
        return Err(format!(
            "extent header says {entries} of {max} entries, the node has room for {room}"
        ));
    }
    if depth > MAX_EXTENT_DEPTH {
        return Err(format!("extent tree depth {depth} is beyond 5"));
    }
    if let Some(expected) = expected_depth
        && depth != expected
    {
        return Err(format!("depth {depth} where its parent says {expected}"));
    }
    if entries == 0 && depth > 0 {
        return Err("an index node without entries".to_owned());
    }
    Ok((entries, depth))
}

/// A node of the extent tree being walked.
struct ExtentNode {
    /// The node: header then entries (the 60-byte root, or a whole block).
    data: Vec<u8>,
    depth: u16,
    entries: usize,
    next: usize,
    /// Logical blocks this node may map: from its index entry to the next one.
    low: u64,
    high: u64,
}

/// A depth-first walk of an extent tree, checking as it goes that extents come in strictly
/// increasing, non-overlapping order and that every block lies inside the file system.
struct ExtentWalker<'r> {
    reader: &'r Ext4Reader,
    ino: u32,
    stack: Vec<ExtentNode>,
    /// Every later extent must start here or beyond.
    next_logical: u64,
    visited: HashSet<u64>,
}

impl<'r> ExtentWalker<'r> {
    fn new(
        reader: &'r Ext4Reader,
        ino: u32,
        root: &[u8],
    ) -> Result<ExtentWalker<'r>, Ext4ReadError> {
        let mut walker = ExtentWalker {
            reader,
            ino,
            stack: Vec::new(),
            next_logical: 0,
            visited: HashSet::new(),
        };
        let (entries, depth) = check_extent_header(root, None)
            .map_err(|reason| walker.error(format!("the inode's extent root: {reason}")))?;
        walker.stack.push(ExtentNode {
            data: root.to_vec(),
            depth,
            entries,
            next: 0,
            low: 0,
            high: 1 << 32,
        });
        Ok(walker)
    }

    fn error(&self, reason: String) -> Ext4ReadError {
        Ext4ReadError::MapBlocks {
            image: self.reader.path.clone(),
            ino: self.ino,
            reason,
        }
    }

    fn check_blocks(&self, start: u64, len: u64, what: &str) -> Result<(), Ext4ReadError> {
        let g = &self.reader.geometry;
        if start < g.first_data_block || start + len > g.blocks {
            return Err(self.error(format!(
                "{what} at blocks {start}..{} is outside the file system's {} blocks",
                start + len,
                g.blocks
            )));
        }
        Ok(())
    }

    fn next(&mut self) -> Result<Option<Mapping>, Ext4ReadError> {
        loop {
            let Some(node) = self.stack.last_mut() else {
                return Ok(None);
            };
            if node.next >= node.entries {
                self.stack.pop();
                continue;
            }
            let i = node.next;
            node.next += 1;
            let at = EXTENT_ENTRY * (i + 1);
            let entry = &node.data[at..at + EXTENT_ENTRY];
            let logical = u64::from(le32(entry, 0));
            let (low, high, depth) = (node.low, node.high, node.depth);
            if depth == 0 {
                let raw_len = le16(entry, 4);
                let physical = u64::from(le16(entry, 6)) << 32 | u64::from(le32(entry, 8));
                let (len, unwritten) = if raw_len > MAX_INIT_EXTENT_LEN {
                    (u64::from(raw_len - MAX_INIT_EXTENT_LEN), true)
                } else {
                    (u64::from(raw_len), false)
                };
                if len == 0 {
                    return Err(self.error(format!("extent at logical block {logical} is empty")));
                }
                if logical < self.next_logical || logical < low || logical + len > high {
                    return Err(self.error(format!(
                        "extent at logical blocks {logical}..{} overlaps another or lies \
                         outside its index range {low}..{high}",
                        logical + len
                    )));
                }
                self.check_blocks(physical, len, &format!("extent at logical block {logical}"))?;
                self.next_logical = logical + len;
                return Ok(Some(Mapping {
                    logical,
                    physical,
                    len,
                    unwritten,
                }));
            }
            let child = u64::from(le16(entry, 8)) << 32 | u64::from(le32(entry, 4));
            let next_key = if i + 1 < node.entries {
                u64::from(le32(&node.data, at + EXTENT_ENTRY))
            } else {
                high
            };
            if logical < low
                || logical < self.next_logical
                || next_key <= logical
                || next_key > high
            {
                return Err(self.error(format!(
                    "index entry for logical block {logical} is out of order (next key \
                     {next_key}, node range {low}..{high})"
                )));
            }
            self.check_blocks(child, 1, "extent tree block")?;
            if !self.visited.insert(child) {
                return Err(self.error(format!(
                    "extent tree block {child} is referenced twice (a loop)"
                )));
            }
            let g = &self.reader.geometry;
            let mut data = vec![0u8; g.block_size as usize];
            self.reader.read_at(&mut data, child * g.block_size)?;
            let (entries, child_depth) = check_extent_header(&data, Some(depth - 1))
                .map_err(|reason| self.error(format!("extent tree block {child}: {reason}")))?;
            self.stack.push(ExtentNode {
                data,
                depth: child_depth,
                entries,
                next: 0,
                low: logical,
                high: next_key,
            });
        }
    }
}

/// A walk of the classic block map: 12 direct pointers, then single, double and triple
/// indirect blocks. Stops at the file's last block; a zero pointer is a hole (a whole subtree
/// of holes is skipped at once); contiguous blocks merge into one mapping.
struct IndirectWalker<'r> {
    reader: &'r Ext4Reader,
    ino: u32,
    pointers: [u32; 15],
    /// Next logical block to look at, and the end (the file's block count).
    logical: u64,
    end: u64,
    /// The last indirect block read at each level of the current path.
    loaded: [Option<(u64, Vec<u32>)>; 3],
}

/// Where a logical block is: mapped, or in a hole that goes on to `until`.
enum Lookup {
    Mapped(u64),
    Hole { until: u64 },
}

impl<'r> IndirectWalker<'r> {
    fn new(reader: &'r Ext4Reader, ino: u32, pointers: [u32; 15], end: u64) -> IndirectWalker<'r> {
        IndirectWalker {
            reader,
            ino,
            pointers,
            logical: 0,
            end,
            loaded: [None, None, None],
        }
    }

    fn error(&self, reason: String) -> Ext4ReadError {
        Ext4ReadError::MapBlocks {
            image: self.reader.path.clone(),
            ino: self.ino,
            reason,
        }
    }

    fn check_pointer(&self, block: u64, logical: u64) -> Result<(), Ext4ReadError> {
        let g = &self.reader.geometry;
        if block < g.first_data_block || block >= g.blocks {
            return Err(self.error(format!(
                "block pointer {block} (for logical block {logical}) is outside the file \
                 system's {} blocks",
                g.blocks
            )));
        }
        Ok(())
    }

    /// The pointers of indirect block `block`, kept for the next lookups at `level`.
    fn indirect(
        &mut self,
        level: usize,
        block: u64,
        logical: u64,
    ) -> Result<&[u32], Ext4ReadError> {
        self.check_pointer(block, logical)?;
        let cached = matches!(&self.loaded[level], Some((number, _)) if *number == block);
        if !cached {
            let g = &self.reader.geometry;
            let mut data = vec![0u8; g.block_size as usize];
            self.reader.read_at(&mut data, block * g.block_size)?;
            let pointers = data.chunks_exact(4).map(|c| le32(c, 0)).collect();
            self.loaded[level] = Some((block, pointers));
        }
        Ok(&self.loaded[level].as_ref().expect("just loaded").1)
    }

    fn lookup(&mut self, logical: u64) -> Result<Lookup, Ext4ReadError> {
        let per_block = self.reader.geometry.block_size / 4;
        if logical < 12 {
            return Ok(match self.pointers[logical as usize] {
                0 => Lookup::Hole { until: logical + 1 },
                block => Lookup::Mapped(u64::from(block)),
            });
        }
        // The subtree holding `logical`: its root pointer, first block and depth.
        let mut first = 12;
        let mut span = per_block;
        let mut root = None;
        for (depth, &pointer) in self.pointers[12..].iter().enumerate() {
            if logical < first + span {
                root = Some((pointer, depth));
                break;
            }
            first += span;
            span *= per_block;
        }
        let Some((pointer, depth)) = root else {
            return Err(self.error(format!(
                "logical block {logical} is beyond what a block map can address"
            )));
        };
        let mut block = u64::from(pointer);
        let mut offset = logical - first;
        for level in 0..=depth {
            if block == 0 {
                // A hole to the end of this subtree.
                return Ok(Lookup::Hole {
                    until: logical - offset + span,
                });
            }
            span /= per_block;
            let slot = (offset / span) as usize;
            offset %= span;
            block = u64::from(self.indirect(level, block, logical)?[slot]);
        }
        Ok(match block {
            0 => Lookup::Hole { until: logical + 1 },
            block => Lookup::Mapped(block),
        })
    }

    fn next(&mut self) -> Result<Option<Mapping>, Ext4ReadError> {
        let mut run: Option<Mapping> = None;
        while self.logical < self.end {
            match self.lookup(self.logical)? {
                Lookup::Hole { until } => {
                    if run.is_some() {
                        break;
                    }
                    self.logical = until.max(self.logical + 1);
                }
                Lookup::Mapped(physical) => {
                    self.check_pointer(physical, self.logical)?;
                    match &mut run {
                        Some(mapping) if mapping.physical + mapping.len == physical => {
                            mapping.len += 1;
                        }
                        Some(_) => break,
                        None => {
                            run = Some(Mapping {
                                logical: self.logical,
                                physical,
                                len: 1,
                                unwritten: false,
                            })
                        }
                    }
                    self.logical += 1;
                }
            }
        }
        Ok(run)
    }
}

/// The contents of a regular file (or slow symlink), streamed: one mapping at a time, data
/// read in runs of up to 1 MiB into a buffer sized for the file, holes as zeros. Read errors
/// are [`io::Error`]s wrapping an [`Ext4ReadError`]: `io::Error::downcast` recovers it.
pub struct FileReader<'r> {
    reader: &'r Ext4Reader,
    size: u64,
    /// Position of the next byte handed out; the buffer holds bytes from here.
    pos: u64,
    map: BlockMap<'r>,
    /// The mapping at or after `pos`, if any remains.
    current: Option<Mapping>,
    exhausted: bool,
    buffer: Vec<u8>,
    buffered: std::ops::Range<usize>,
}

impl std::fmt::Debug for FileReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileReader")
            .field("size", &self.size)
            .field("pos", &self.pos)
            .finish()
    }
}

impl<'r> FileReader<'r> {
    fn new(reader: &'r Ext4Reader, inode: &Inode) -> Result<FileReader<'r>, Ext4ReadError> {
        Ok(FileReader {
            reader,
            size: inode.size,
            pos: 0,
            map: reader.block_map(inode)?,
            current: None,
            exhausted: false,
            buffer: Vec::new(),
            buffered: 0..0,
        })
    }

    /// Bytes the file holds.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills the start of `out` with the file's bytes from `self.pos`, from one mapping or one
    /// hole; returns how many. Does not advance.
    fn fill(&mut self, out: &mut [u8]) -> Result<usize, Ext4ReadError> {
        let block_size = self.reader.geometry.block_size;
        let block = self.pos / block_size;
        while !self.exhausted && self.current.is_none_or(|m| m.logical + m.len <= block) {
            self.current = self.map.next()?;
            self.exhausted = self.current.is_none();
        }
        let want = (self.size - self.pos).min(out.len() as u64);
        let n = match self.current {
            Some(m) if m.logical <= block => {
                let end = (m.logical + m.len) * block_size;
                let n = want.min(end - self.pos) as usize;
                if m.unwritten {
                    out[..n].fill(0);
                } else {
                    let offset = m.physical * block_size + (self.pos - m.logical * block_size);
                    self.reader.read_at(&mut out[..n], offset)?;
                }
                n
            }
            Some(m) => {
                let n = want.min(m.logical * block_size - self.pos) as usize;
                out[..n].fill(0);
                n
            }
            None => {
                let n = want as usize;
                out[..n].fill(0);
                n
            }
        };
        Ok(n)
    }
}

impl io::Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.buffered.is_empty() {
            if self.pos >= self.size || out.is_empty() {
                return Ok(0);
            }
            if out.len() >= READ_CHUNK {
                let n = self.fill(out).map_err(io::Error::other)?;
                self.pos += n as u64;
                return Ok(n);
            }
            if self.buffer.is_empty() {
                let len = (self.size - self.pos).min(READ_CHUNK as u64) as usize;
                self.buffer = vec![0; len];
            }
            let mut buffer = std::mem::take(&mut self.buffer);
            let filled = self.fill(&mut buffer);
            self.buffer = buffer;
            self.buffered = 0..filled.map_err(io::Error::other)?;
        }
        let n = self.buffered.len().min(out.len());
        let start = self.buffered.start;
        out[..n].copy_from_slice(&self.buffer[start..start + n]);
        self.buffered.start += n;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirent(out: &mut Vec<u8>, ino: u32, name: &[u8], file_type: u8, rec_len: usize) {
        out.extend_from_slice(&ino.to_le_bytes());
        out.extend_from_slice(&(rec_len as u16).to_le_bytes());
        out.push(name.len() as u8);
        out.push(file_type);
        out.extend_from_slice(name);
        out.resize(out.len() + rec_len - 8 - name.len(), 0);
    }

    fn parse(block: &[u8]) -> Result<Vec<DirEntry>, (usize, String)> {
        let mut entries = Vec::new();
        parse_dir_block(block, true, 1000, |e| entries.push(e)).map(|()| entries)
    }

    #[test]
    fn dirents_skip_dots_deleted_entries_and_the_checksum_tail() {
        let mut block = Vec::new();
        dirent(&mut block, 2, b".", 2, 12);
        dirent(&mut block, 2, b"..", 2, 12);
        dirent(&mut block, 0, b"gone", 1, 16); // deleted
        dirent(&mut block, 12, b"file", 1, 16);
        dirent(&mut block, 13, b"sub", 2, 1024 - 56 - 12);
        // metadata_csum tail: inode 0, rec_len 12, name_len 0, type 0xDE, crc.
        dirent(&mut block, 0, b"", 0xDE, 12);
        assert_eq!(block.len(), 1024);
        let entries = parse(&block).unwrap();
        assert_eq!(
            entries,
            [
                DirEntry {
                    name: b"file".to_vec(),
                    ino: InodeNo(12),
                    file_type: Some(FileKind::Regular)
                },
                DirEntry {
                    name: b"sub".to_vec(),
                    ino: InodeNo(13),
                    file_type: Some(FileKind::Directory)
                },
            ]
        );
    }

    #[test]
    fn corrupt_dirents_are_errors_with_their_offset() {
        let mut overrun = Vec::new();
        dirent(&mut overrun, 12, b"a", 1, 12);
        dirent(&mut overrun, 13, b"b", 1, 1012);
        overrun[12 + 4..12 + 6].copy_from_slice(&2000u16.to_le_bytes());
        let (offset, reason) = parse(&overrun).unwrap_err();
        assert_eq!(offset, 12);
        assert!(reason.contains("past the end"), "{reason}");

        let mut zero = vec![0u8; 1024];
        zero[0] = 12; // inode 12, rec_len 0: would loop forever if accepted
        assert!(parse(&zero).is_err());

        let mut long_name = Vec::new();
        dirent(&mut long_name, 12, b"abcd", 1, 16);
        dirent(&mut long_name, 13, b"next", 1, 1024 - 16);
        assert_eq!(parse(&long_name).unwrap().len(), 2);
        long_name[6] = 9; // a name running into the next record
        let (offset, reason) = parse(&long_name).unwrap_err();
        assert_eq!(offset, 0);
        assert!(reason.contains("name length 9"), "{reason}");

        let mut slash = Vec::new();
        dirent(&mut slash, 12, b"a/b", 1, 1024);
        assert!(parse(&slash).is_err());

        let mut beyond = Vec::new();
        dirent(&mut beyond, 5000, b"x", 1, 1024);
        assert!(parse(&beyond).is_err());
    }

    #[test]
    fn extent_headers_are_checked_against_their_node() {
        let header = |entries: u16, max: u16, depth: u16| {
            let mut node = vec![0u8; 60];
            node[0..2].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
            node[2..4].copy_from_slice(&entries.to_le_bytes());
            node[4..6].copy_from_slice(&max.to_le_bytes());
            node[6..8].copy_from_slice(&depth.to_le_bytes());
            node
        };
        assert_eq!(check_extent_header(&header(3, 4, 0), None), Ok((3, 0)));
        assert_eq!(check_extent_header(&header(0, 4, 0), None), Ok((0, 0))); // empty file
        assert_eq!(check_extent_header(&header(1, 4, 2), Some(2)), Ok((1, 2)));
        let refused = [
            (header(5, 4, 0), None),    // more entries than the maximum
            (header(5, 5, 0), None),    // a maximum beyond the 4 slots of the root
            (header(0, 0, 0), None),    // no room at all
            (header(1, 4, 6), None),    // deeper than ext4 allows
            (header(1, 4, 1), Some(0)), // not what the parent says
            (header(0, 4, 1), None),    // an index node without entries
        ];
        for (node, depth) in refused {
            assert!(
                check_extent_header(&node, depth).is_err(),
                "{:?}",
                &node[..8]
            );
        }
        let mut bad_magic = header(1, 4, 0);
        bad_magic[0] ^= 1;
        assert!(
            check_extent_header(&bad_magic, None)
                .unwrap_err()
                .contains("magic")
        );
        let mut block = vec![0u8; 4096];
        block[..8].copy_from_slice(&header(340, 340, 0)[..8]);
        assert_eq!(check_extent_header(&block, Some(0)), Ok((340, 0)));
        block[4..6].copy_from_slice(&341u16.to_le_bytes());
        assert!(check_extent_header(&block, Some(0)).is_err());
    }

    #[test]
    fn readers_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Ext4Reader>();
        fn sendable<T: Send>() {}
        sendable::<FileReader<'static>>();
    }

    #[test]
    fn rec_len_of_64k_blocks() {
        assert_eq!(decode_rec_len(12, 4096), 12);
        assert_eq!(decode_rec_len(0, 65536), 65536);
        assert_eq!(decode_rec_len(u16::MAX, 65536), 65536);
        assert_eq!(decode_rec_len(0xFFFC | 1, 65536), 0xFFFC | 1 << 16);
        // A whole 64 KiB block as e2fsprogs writes an emptied one: one entry, rec_len 65535.
        let mut block = vec![0u8; 65536];
        block[4..6].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(parse(&block), Ok(Vec::new()));
        // And one live entry spanning it.
        block[0..4].copy_from_slice(&12u32.to_le_bytes());
        block[6] = 1;
        block[8] = b'x';
        assert_eq!(parse(&block).unwrap().len(), 1);
    }

    #[test]
    fn times_devices_and_xattr_entries() {
        assert_eq!(decode_time(u32::MAX, None), (-1, 0));
        assert_eq!(decode_time(0x8000_0000, Some(1)), (1 << 31, 0));
        assert_eq!(decode_time(5, Some(7 << 2)), (5, 7));
        let mut old = [0u8; 60];
        old[0..4].copy_from_slice(&((1u32 << 8) | 3).to_le_bytes());
        assert_eq!(decode_device(&old), (1, 3));
        let mut new = [0u8; 60];
        let encoded: u32 = 0x45 | (259 << 8) | (0x12300 << 12);
        new[4..8].copy_from_slice(&encoded.to_le_bytes());
        assert_eq!(decode_device(&new), (259, 0x12345));

        // One entry `user.k` = "value" in a block-like area, then the terminator.
        let mut area = vec![0u8; 128];
        area[32] = 1;
        area[33] = 1;
        area[34..36].copy_from_slice(&100u16.to_le_bytes());
        area[40..44].copy_from_slice(&5u32.to_le_bytes());
        area[48] = b'k';
        area[100..105].copy_from_slice(b"value");
        let mut out = Vec::new();
        parse_xattr_entries(&area, 32, 0, &mut out).unwrap();
        assert_eq!(
            (out[0].index, &out[0].name[..], &out[0].value[..]),
            (1, &b"k"[..], &b"value"[..])
        );
        area[40..44].copy_from_slice(&50u32.to_le_bytes()); // value past the end
        assert!(parse_xattr_entries(&area, 32, 0, &mut Vec::new()).is_err());
        let mut unterminated = vec![0xAAu8; 40];
        unterminated[..4].fill(1);
        assert!(parse_xattr_entries(&unterminated, 0, 0, &mut Vec::new()).is_err());
    }
}
