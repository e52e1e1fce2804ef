//! [`Ext4Builder`]: the entry-by-entry half of the writer (create, insert, remove, lookup).
//! `finish` lives in [`super::finish`].

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::alloc::{BlockAllocator, LimitReached, Run};
use super::inode::{self, Extent, push_extent};
use super::layout::{BLOCK_SIZE, BLOCK_SIZE_U64, MAX_BLOCKS};
use super::tree::{Directory, MAX_LINKS, Node, NodeId, NodeKind, ROOT, ResolveError, Tree};
use super::writer::BlockWriter;
use super::xattr::{self, Xattr};
use super::{BuildOptions, EntryInfo, EntryKind, EntryType, Ext4Error, Metadata};

/// Bytes read from an entry at a time: one reusable buffer for the whole build.
const READ_CHUNK: usize = 1 << 20;
/// Longest symlink target (`PATH_MAX` − 1; one block holds it).
const MAX_SYMLINK: usize = 4095;
/// Targets shorter than this live in the inode itself (fast symlinks).
const FAST_SYMLINK_MAX: usize = 59;

/// Builds an ext4 image; see the [module documentation](super) for the lifecycle.
#[derive(Debug)]
pub struct Ext4Builder {
    pub(super) image: PathBuf,
    pub(super) options: BuildOptions,
    pub(super) writer: BlockWriter,
    pub(super) alloc: BlockAllocator,
    pub(super) tree: Tree,
    read_buffer: Vec<u8>,
    /// Cleared by `finish` once the image is complete; until then, drop removes the file.
    pub(super) remove_on_drop: bool,
}

impl Ext4Builder {
    /// Creates (or truncates) `image` and starts an empty file system: the root directory
    /// (mode 0755, owned by root) and `lost+found` (0700), both stamped with
    /// [`BuildOptions::timestamp`].
    pub fn create(image: &Path, options: BuildOptions) -> Result<Ext4Builder, Ext4Error> {
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(image)
            .map_err(|source| Ext4Error::ImageCreate {
                path: image.to_owned(),
                source,
            })?;
        let stamp = (options.timestamp, 0);
        let directory = |perm| Node {
            kind: NodeKind::Directory(Directory::new(ROOT)),
            uid: 0,
            gid: 0,
            perm,
            mtime: stamp,
            xattrs: Vec::new(),
            links: 1,
        };
        let mut tree = Tree::new(directory(0o755));
        let mut lost_found = directory(0o700);
        lost_found.links = 0;
        if let NodeKind::Directory(dir) = &mut lost_found.kind {
            dir.min_blocks = 4;
        }
        let lost_found = tree.add(lost_found);
        tree.link(ROOT, b"lost+found", lost_found);
        let limit = options.max_bytes.map(|bytes| bytes / BLOCK_SIZE_U64);
        Ok(Ext4Builder {
            image: image.to_owned(),
            options,
            writer: BlockWriter::new(file),
            alloc: BlockAllocator::new(limit),
            tree,
            read_buffer: Vec::new(),
            remove_on_drop: true,
        })
    }

    /// Adds `path` (relative, `/`-separated; `""` or `"."` is the root, which may only be
    /// given as a directory). Its parent must exist. Over an existing entry: a directory on a
    /// directory takes the new metadata and keeps its children; anything else replaces the
    /// old entry (whose inode goes when it has no other name).
    pub fn insert(
        &mut self,
        path: &Path,
        kind: EntryKind<'_>,
        meta: &Metadata,
    ) -> Result<(), Ext4Error> {
        let components = split_path(path)?;
        let Some((name, parents)) = components.split_last() else {
            return match kind {
                EntryKind::Directory => {
                    let xattrs = prepare_xattrs(path, meta)?;
                    apply_metadata(self.tree.node_mut(ROOT), meta, xattrs);
                    Ok(())
                }
                _ => Err(Ext4Error::InvalidPath {
                    path: path.to_owned(),
                    reason: "the root can only be a directory",
                }),
            };
        };
        let parent = self
            .tree
            .resolve_dir(parents)
            .map_err(|error| resolve_error(path, &components, error, true))?;
        let existing = self.tree.child(parent, name);
        let new_kind = match kind {
            EntryKind::HardLink { target } => {
                return self.insert_hard_link(path, parent, name, existing, target);
            }
            EntryKind::Directory => {
                let xattrs = prepare_xattrs(path, meta)?;
                if let Some(id) = existing
                    && self.tree.node(id).kind.as_directory().is_some()
                {
                    apply_metadata(self.tree.node_mut(id), meta, xattrs);
                    return Ok(());
                }
                let mut node = new_node(NodeKind::Directory(Directory::new(parent)), meta);
                node.xattrs = xattrs;
                return self.replace(parent, name, existing, node);
            }
            EntryKind::File { size, data } => {
                let xattrs = prepare_xattrs(path, meta)?;
                let extents = self.write_data(path, size, data)?;
                let mut node = new_node(
                    NodeKind::File {
                        size,
                        data: extents,
                    },
                    meta,
                );
                node.xattrs = xattrs;
                return self.replace(parent, name, existing, node);
            }
            EntryKind::Symlink { target } => {
                if target.is_empty() || target.len() > MAX_SYMLINK || target.contains(&0) {
                    return Err(Ext4Error::SymlinkTarget {
                        path: path.to_owned(),
                        len: target.len(),
                    });
                }
                let xattrs = prepare_xattrs(path, meta)?;
                let data = if target.len() <= FAST_SYMLINK_MAX {
                    Vec::new()
                } else {
                    let size = target.len() as u64;
                    self.write_data(path, size, &mut &target[..])?
                };
                let mut node = new_node(
                    NodeKind::Symlink {
                        target: target.into(),
                        data,
                    },
                    meta,
                );
                node.xattrs = xattrs;
                return self.replace(parent, name, existing, node);
            }
            EntryKind::CharDevice { major, minor } => {
                check_device(path, major, minor)?;
                NodeKind::CharDevice { major, minor }
            }
            EntryKind::BlockDevice { major, minor } => {
                check_device(path, major, minor)?;
                NodeKind::BlockDevice { major, minor }
            }
            EntryKind::Fifo => NodeKind::Fifo,
            EntryKind::Socket => NodeKind::Socket,
        };
        let xattrs = prepare_xattrs(path, meta)?;
        let mut node = new_node(new_kind, meta);
        node.xattrs = xattrs;
        self.replace(parent, name, existing, node)
    }

    fn insert_hard_link(
        &mut self,
        path: &Path,
        parent: NodeId,
        name: &[u8],
        existing: Option<NodeId>,
        target: PathBuf,
    ) -> Result<(), Ext4Error> {
        let link_error = |reason| Ext4Error::HardLinkTarget {
            path: path.to_owned(),
            target: target.clone(),
            reason,
        };
        let target_components = split_path(&target)?;
        let target_id = self
            .tree
            .lookup(&target_components)
            .ok_or_else(|| link_error("the target does not exist"))?;
        if self.tree.node(target_id).kind.as_directory().is_some() {
            return Err(link_error("the target is a directory"));
        }
        if existing == Some(target_id) {
            return Ok(()); // already this inode
        }
        if self.tree.node(target_id).links >= MAX_LINKS {
            return Err(Ext4Error::TooManyLinks {
                path: path.to_owned(),
            });
        }
        // Count the new name first, so replacing `existing` cannot drop the target.
        self.tree.node_mut(target_id).links += 1;
        self.remove_child(parent, name);
        self.tree.node_mut(target_id).links -= 1;
        self.tree.link(parent, name, target_id);
        Ok(())
    }

    /// Puts a new node at `parent/name`, dropping what was there.
    fn replace(
        &mut self,
        parent: NodeId,
        name: &[u8],
        existing: Option<NodeId>,
        node: Node,
    ) -> Result<(), Ext4Error> {
        if existing.is_some() {
            self.remove_child(parent, name);
        }
        let id = self.tree.add(node);
        self.tree.link(parent, name, id);
        Ok(())
    }

    fn remove_child(&mut self, parent: NodeId, name: &[u8]) -> bool {
        let alloc = &mut self.alloc;
        let removed = self.tree.unlink(parent, name, &mut |extents| {
            release_extents(alloc, extents);
        });
        // Everything at or past the cursor is free: never let buffered bytes of freed blocks
        // reach the disk.
        self.writer.discard_from(self.alloc.cursor());
        removed
    }

    /// Removes `path` and everything below it (an OCI whiteout). Returns whether something
    /// was there; a missing path or a missing parent is not an error.
    pub fn remove(&mut self, path: &Path) -> Result<bool, Ext4Error> {
        let components = split_path(path)?;
        let Some((name, parents)) = components.split_last() else {
            return Err(Ext4Error::InvalidPath {
                path: path.to_owned(),
                reason: "the root cannot be removed",
            });
        };
        match self.tree.resolve_dir(parents) {
            Ok(parent) => Ok(self.remove_child(parent, name)),
            Err(_) => Ok(false),
        }
    }

    /// Removes every entry below the directory `path`, keeping the directory itself (an OCI
    /// opaque whiteout).
    pub fn clear_directory(&mut self, path: &Path) -> Result<(), Ext4Error> {
        let components = split_path(path)?;
        let dir = self
            .tree
            .resolve_dir(&components)
            .map_err(|error| resolve_error(path, &components, error, false))?;
        let alloc = &mut self.alloc;
        self.tree
            .clear(dir, &mut |extents| release_extents(alloc, extents));
        self.writer.discard_from(self.alloc.cursor());
        Ok(())
    }

    /// Names in the directory `path` (not following symlinks), sorted; `None` when `path` is
    /// not a directory. Lets a caller clear a directory selectively (an opaque whiteout that
    /// arrives after entries of its own layer).
    pub fn children(&self, path: &Path) -> Option<Vec<std::ffi::OsString>> {
        use std::os::unix::ffi::OsStrExt;
        let components = split_path(path).ok()?;
        let node = self.tree.node(self.tree.lookup(&components)?);
        let NodeKind::Directory(dir) = &node.kind else {
            return None;
        };
        Some(
            dir.entries
                .keys()
                .map(|name| std::ffi::OsStr::from_bytes(name).to_owned())
                .collect(),
        )
    }

    /// Describes the entry at `path` without following symlinks (in the path or at its end).
    pub fn lookup(&self, path: &Path) -> Option<EntryInfo> {
        let components = split_path(path).ok()?;
        let node = self.tree.node(self.tree.lookup(&components)?);
        let (kind, size, symlink_target, links) = match &node.kind {
            NodeKind::Directory(dir) => (EntryType::Directory, 0, None, 2 + dir.subdirs),
            NodeKind::File { size, .. } => (EntryType::File, *size, None, node.links),
            NodeKind::Symlink { target, .. } => (
                EntryType::Symlink,
                target.len() as u64,
                Some(target.to_vec()),
                node.links,
            ),
            NodeKind::CharDevice { .. } => (EntryType::CharDevice, 0, None, node.links),
            NodeKind::BlockDevice { .. } => (EntryType::BlockDevice, 0, None, node.links),
            NodeKind::Fifo => (EntryType::Fifo, 0, None, node.links),
            NodeKind::Socket => (EntryType::Socket, 0, None, node.links),
        };
        Some(EntryInfo {
            kind,
            mode: u32::from(node.perm),
            uid: node.uid,
            gid: node.gid,
            size,
            symlink_target,
            links,
        })
    }

    /// Streams `size` bytes from `data` into blocks; returns their extents. All-zero blocks
    /// become holes. On error every block taken is given back.
    fn write_data(
        &mut self,
        path: &Path,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<Vec<Extent>, Ext4Error> {
        let blocks = size.div_ceil(BLOCK_SIZE_U64);
        if blocks > MAX_BLOCKS {
            return Err(Ext4Error::FileTooLarge {
                path: path.to_owned(),
                size,
            });
        }
        if self.read_buffer.is_empty() {
            self.read_buffer = vec![0; READ_CHUNK];
        }
        let mut buffer = std::mem::take(&mut self.read_buffer);
        let mut extents = Vec::new();
        // A file that fits entirely in a freed range goes there, in one piece.
        let mut reuse = if blocks > 0 {
            self.alloc
                .take_free(blocks)
                .map(|start| Run { start, len: blocks })
        } else {
            None
        };
        let result = self.stream_blocks(path, size, data, &mut buffer, &mut reuse, &mut extents);
        self.read_buffer = buffer;
        if let Some(rest) = reuse {
            self.alloc.release(rest);
        }
        match result {
            Ok(()) => Ok(extents),
            Err(error) => {
                release_extents(&mut self.alloc, &extents);
                self.writer.discard_from(self.alloc.cursor());
                Err(error)
            }
        }
    }

    fn stream_blocks(
        &mut self,
        path: &Path,
        size: u64,
        data: &mut dyn Read,
        buffer: &mut [u8],
        reuse: &mut Option<Run>,
        extents: &mut Vec<Extent>,
    ) -> Result<(), Ext4Error> {
        let mut remaining = size;
        let mut logical = 0u64;
        while remaining > 0 {
            let want = remaining.min(buffer.len() as u64) as usize;
            let padded = want.next_multiple_of(BLOCK_SIZE);
            data.read_exact(&mut buffer[..want])
                .map_err(|source| Ext4Error::DataRead {
                    entry: path.to_owned(),
                    size,
                    source,
                })?;
            buffer[want..padded].fill(0);
            let chunk = &buffer[..padded];
            let block_count = padded / BLOCK_SIZE;
            let mut index = 0;
            while index < block_count {
                if is_zero(&chunk[index * BLOCK_SIZE..(index + 1) * BLOCK_SIZE]) {
                    index += 1;
                    continue;
                }
                let mut end = index + 1;
                while end < block_count
                    && !is_zero(&chunk[end * BLOCK_SIZE..(end + 1) * BLOCK_SIZE])
                {
                    end += 1;
                }
                // Blocks index..end are data: place them in as few runs as possible.
                while index < end {
                    let run = self.next_run(reuse, (end - index) as u64)?;
                    let bytes = &chunk[index * BLOCK_SIZE..(index + run.len as usize) * BLOCK_SIZE];
                    self.writer
                        .write(run.start, bytes)
                        .map_err(|source| Ext4Error::DataWrite {
                            path: self.image.clone(),
                            source,
                        })?;
                    push_extent(extents, logical + index as u64, run);
                    index += run.len as usize;
                }
            }
            logical += block_count as u64;
            remaining -= want as u64;
        }
        Ok(())
    }

    /// The next run for file data: from the reused range while it lasts, else appended.
    fn next_run(&mut self, reuse: &mut Option<Run>, max: u64) -> Result<Run, Ext4Error> {
        if let Some(range) = reuse {
            let run = Run {
                start: range.start,
                len: range.len.min(max),
            };
            range.start += run.len;
            range.len -= run.len;
            if range.len == 0 {
                *reuse = None;
            }
            self.alloc.mark_used(run);
            return Ok(run);
        }
        self.alloc
            .append(max)
            .map_err(|LimitReached { needed }| Ext4Error::TooSmall {
                needed: needed * BLOCK_SIZE_U64,
                requested: self.options.max_bytes.unwrap_or(0),
            })
    }
}

impl Drop for Ext4Builder {
    fn drop(&mut self) {
        if self.remove_on_drop {
            // Best effort: the caller already has the error that led here.
            let _ = std::fs::remove_file(&self.image);
        }
    }
}

fn release_extents(alloc: &mut BlockAllocator, extents: &[Extent]) {
    // Release from the end so ranges ending at the cursor move it back as far as possible.
    for extent in extents.iter().rev() {
        alloc.release(Run {
            start: extent.start,
            len: u64::from(extent.len),
        });
    }
}

fn is_zero(block: &[u8]) -> bool {
    block
        .chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

/// Splits a relative path into names; `.` components vanish, anything else odd is refused.
fn split_path(path: &Path) -> Result<Vec<&[u8]>, Ext4Error> {
    let invalid = |reason| Ext4Error::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    let mut names = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => {
                let name = name.as_bytes();
                if name.len() > 255 {
                    return Err(invalid("a name is longer than 255 bytes"));
                }
                if name.contains(&0) {
                    return Err(invalid("a name contains a NUL byte"));
                }
                names.push(name);
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid("paths must be relative to the image root"));
            }
            Component::ParentDir => return Err(invalid("paths must not contain `..`")),
        }
    }
    Ok(names)
}

/// Turns a failed parent resolution into the error naming the offending path prefix.
fn resolve_error(
    path: &Path,
    components: &[&[u8]],
    error: ResolveError,
    for_parent: bool,
) -> Ext4Error {
    let prefix = |len: usize| -> PathBuf {
        let joined = components[..len].join(&b'/');
        PathBuf::from(std::ffi::OsStr::from_bytes(&joined))
    };
    match error {
        ResolveError::Missing { .. } if for_parent => Ext4Error::ParentMissing {
            path: path.to_owned(),
        },
        ResolveError::Missing { .. } => Ext4Error::NotFound {
            path: path.to_owned(),
        },
        ResolveError::NotADirectory { resolved } => Ext4Error::NotADirectory {
            path: prefix(resolved),
        },
    }
}

fn check_device(path: &Path, major: u32, minor: u32) -> Result<(), Ext4Error> {
    match inode::device_block(major, minor) {
        Some(_) => Ok(()),
        None => Err(Ext4Error::DeviceNumber {
            path: path.to_owned(),
            major,
            minor,
        }),
    }
}

fn prepare_xattrs(path: &Path, meta: &Metadata) -> Result<Vec<Xattr>, Ext4Error> {
    let mut prepared = Vec::with_capacity(meta.xattrs.len());
    for (name, value) in &meta.xattrs {
        let xattr = xattr::prepare(name, value).map_err(|reason| Ext4Error::Xattr {
            path: path.to_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            reason,
        })?;
        prepared.push(xattr);
    }
    let prepared = xattr::normalize(prepared);
    if xattr::place(&prepared).is_err() {
        return Err(Ext4Error::XattrsTooLarge {
            path: path.to_owned(),
        });
    }
    Ok(prepared)
}

fn new_node(kind: NodeKind, meta: &Metadata) -> Node {
    Node {
        kind,
        uid: meta.uid,
        gid: meta.gid,
        perm: (meta.mode & 0o7777) as u16,
        mtime: meta.mtime,
        xattrs: Vec::new(),
        links: 0,
    }
}

fn apply_metadata(node: &mut Node, meta: &Metadata, xattrs: Vec<Xattr>) {
    node.uid = meta.uid;
    node.gid = meta.gid;
    node.perm = (meta.mode & 0o7777) as u16;
    node.mtime = meta.mtime;
    node.xattrs = xattrs;
}
