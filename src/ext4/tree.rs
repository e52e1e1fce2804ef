//! The namespace being built, in memory: an arena of nodes (one per future inode) and
//! directories mapping names to nodes. No I/O; data blocks are only referenced by extent.
//!
//! Link counting: a non-directory's `links` is the number of names it has (hard links share
//! one node); a directory has exactly one name and counts its subdirectories, which gives its
//! on-disk link count. A node whose last name goes is dropped and its blocks handed back.

use std::collections::BTreeMap;

use super::inode::Extent;
use super::xattr::Xattr;

pub(crate) type NodeId = u32;
pub(crate) const ROOT: NodeId = 0;

/// Most names a non-directory inode may have (`EXT4_LINK_MAX`).
pub(crate) const MAX_LINKS: u32 = 65000;

#[derive(Debug)]
pub(crate) struct Node {
    pub kind: NodeKind,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits, including setuid, setgid and sticky.
    pub perm: u16,
    pub mtime: (i64, u32),
    /// Sorted into on-disk order ([`super::xattr::normalize`]).
    pub xattrs: Vec<Xattr>,
    /// Names of this node (always 1 for directories).
    pub links: u32,
}

#[derive(Debug)]
pub(crate) enum NodeKind {
    Directory(Directory),
    File {
        size: u64,
        data: Vec<Extent>,
    },
    /// `data` is empty for a fast symlink (target stored in the inode), one block otherwise.
    Symlink {
        target: Box<[u8]>,
        data: Vec<Extent>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

impl NodeKind {
    pub fn data(&self) -> &[Extent] {
        match self {
            NodeKind::File { data, .. } | NodeKind::Symlink { data, .. } => data,
            _ => &[],
        }
    }

    pub fn as_directory(&self) -> Option<&Directory> {
        match self {
            NodeKind::Directory(dir) => Some(dir),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Directory {
    pub parent: NodeId,
    pub entries: BTreeMap<Box<[u8]>, NodeId>,
    pub subdirs: u32,
    /// Blocks the directory occupies at least (4 for `lost+found`).
    pub min_blocks: u64,
}

impl Directory {
    pub fn new(parent: NodeId) -> Directory {
        Directory {
            parent,
            entries: BTreeMap::new(),
            subdirs: 0,
            min_blocks: 1,
        }
    }
}

/// Why a path did not resolve to a directory: how many leading components were fine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResolveError {
    Missing { resolved: usize },
    NotADirectory { resolved: usize },
}

#[derive(Debug)]
pub(crate) struct Tree {
    slots: Vec<Option<Node>>,
    free_slots: Vec<NodeId>,
    live: usize,
}

impl Tree {
    pub fn new(root: Node) -> Tree {
        Tree {
            slots: vec![Some(root)],
            free_slots: Vec::new(),
            live: 1,
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        self.slots[id as usize].as_ref().expect("live node")
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.slots[id as usize].as_mut().expect("live node")
    }

    fn dir_mut(&mut self, id: NodeId) -> &mut Directory {
        match &mut self.node_mut(id).kind {
            NodeKind::Directory(dir) => dir,
            _ => unreachable!("node {id} is a directory"),
        }
    }

    /// Number of live nodes, the root included.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Slot count: node ids are below this.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Live node ids in slot order (the root first).
    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.is_some())
            .map(|(id, _)| id as NodeId)
    }

    /// Stores a node with no name yet (`links` 0); [`Tree::link`] names it.
    pub fn add(&mut self, node: Node) -> NodeId {
        self.live += 1;
        match self.free_slots.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(node);
                id
            }
            None => {
                self.slots.push(Some(node));
                (self.slots.len() - 1) as NodeId
            }
        }
    }

    pub fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.node(dir)
            .kind
            .as_directory()?
            .entries
            .get(name)
            .copied()
    }

    /// Follows `components` from the root without following symlinks.
    pub fn lookup(&self, components: &[&[u8]]) -> Option<NodeId> {
        let mut id = ROOT;
        for name in components {
            id = self.child(id, name)?;
        }
        Some(id)
    }

    /// Resolves `components` to a directory.
    pub fn resolve_dir(&self, components: &[&[u8]]) -> Result<NodeId, ResolveError> {
        let mut id = ROOT;
        for (resolved, name) in components.iter().enumerate() {
            let dir = self
                .node(id)
                .kind
                .as_directory()
                .ok_or(ResolveError::NotADirectory { resolved })?;
            id = *dir
                .entries
                .get(*name)
                .ok_or(ResolveError::Missing { resolved })?;
        }
        if self.node(id).kind.as_directory().is_none() {
            return Err(ResolveError::NotADirectory {
                resolved: components.len(),
            });
        }
        Ok(id)
    }

    /// Names `child` as `name` in `dir`, which must not have that name yet.
    pub fn link(&mut self, dir: NodeId, name: &[u8], child: NodeId) {
        let is_dir = matches!(self.node(child).kind, NodeKind::Directory(_));
        if let NodeKind::Directory(sub) = &mut self.node_mut(child).kind {
            sub.parent = dir;
        }
        self.node_mut(child).links += 1;
        let parent = self.dir_mut(dir);
        let previous = parent.entries.insert(name.into(), child);
        debug_assert!(previous.is_none());
        if is_dir {
            parent.subdirs += 1;
        }
    }

    /// Removes `name` from `dir`; a directory goes with everything below it. Blocks of
    /// dropped nodes go to `release`. False when there was no such name.
    pub fn unlink(&mut self, dir: NodeId, name: &[u8], release: &mut dyn FnMut(&[Extent])) -> bool {
        let Some(child) = self.dir_mut(dir).entries.remove(name) else {
            return false;
        };
        if matches!(self.node(child).kind, NodeKind::Directory(_)) {
            self.dir_mut(dir).subdirs -= 1;
        }
        self.drop_name(child, release);
        true
    }

    /// Removes every entry of `dir`, keeping the directory.
    pub fn clear(&mut self, dir: NodeId, release: &mut dyn FnMut(&[Extent])) {
        let entries = std::mem::take(&mut self.dir_mut(dir).entries);
        self.dir_mut(dir).subdirs = 0;
        for (_, child) in entries {
            self.drop_name(child, release);
        }
    }

    /// One name of `id` is gone; drop the node (and, for a directory, its whole subtree)
    /// when it was the last. Iterative, so deep trees cannot overflow the stack.
    fn drop_name(&mut self, id: NodeId, release: &mut dyn FnMut(&[Extent])) {
        let mut pending = vec![id];
        while let Some(id) = pending.pop() {
            let node = self.node_mut(id);
            node.links -= 1;
            if node.links > 0 {
                continue;
            }
            let node = self.slots[id as usize].take().expect("live node");
            self.live -= 1;
            self.free_slots.push(id);
            match node.kind {
                NodeKind::Directory(dir) => pending.extend(dir.entries.into_values()),
                kind => release(kind.data()),
            }
        }
    }

    /// The path of a directory, for error messages.
    pub fn dir_path(&self, mut id: NodeId) -> Vec<u8> {
        let mut names: Vec<&[u8]> = Vec::new();
        while id != ROOT {
            let Some(dir) = self.node(id).kind.as_directory() else {
                break;
            };
            let parent = dir.parent;
            let name = self
                .node(parent)
                .kind
                .as_directory()
                .and_then(|p| p.entries.iter().find(|(_, c)| **c == id))
                .map(|(name, _)| &name[..])
                .unwrap_or(b"?");
            names.push(name);
            id = parent;
        }
        names.reverse();
        names.join(&b'/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext4::alloc::Run;
    use crate::ext4::inode::push_extent;

    fn node(kind: NodeKind) -> Node {
        Node {
            kind,
            uid: 0,
            gid: 0,
            perm: 0o755,
            mtime: (0, 0),
            xattrs: Vec::new(),
            links: 0,
        }
    }

    fn file(start: u64) -> Node {
        let mut data = Vec::new();
        push_extent(&mut data, 0, Run { start, len: 1 });
        node(NodeKind::File { size: 1, data })
    }

    #[test]
    fn unlinking_a_directory_releases_its_subtree_but_not_other_links() {
        let mut tree = Tree::new(node(NodeKind::Directory(Directory::new(ROOT))));
        let dir = tree.add(node(NodeKind::Directory(Directory::new(ROOT))));
        tree.link(ROOT, b"d", dir);
        let inner = tree.add(file(100));
        tree.link(dir, b"f", inner);
        tree.link(ROOT, b"hard", inner);
        let lone = tree.add(file(200));
        tree.link(dir, b"g", lone);
        assert_eq!(tree.node(ROOT).kind.as_directory().unwrap().subdirs, 1);

        let mut released = Vec::new();
        assert!(tree.unlink(ROOT, b"d", &mut |e| released.extend_from_slice(e)));
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].start, 200);
        assert_eq!(tree.node(inner).links, 1);
        assert_eq!(tree.len(), 2);
        assert_eq!(tree.node(ROOT).kind.as_directory().unwrap().subdirs, 0);
        assert!(!tree.unlink(ROOT, b"d", &mut |_| {}));
    }

    #[test]
    fn resolve_reports_how_far_it_got() {
        let mut tree = Tree::new(node(NodeKind::Directory(Directory::new(ROOT))));
        let f = tree.add(file(1));
        tree.link(ROOT, b"f", f);
        assert_eq!(
            tree.resolve_dir(&[b"f", b"x"]),
            Err(ResolveError::NotADirectory { resolved: 1 })
        );
        assert_eq!(
            tree.resolve_dir(&[b"x"]),
            Err(ResolveError::Missing { resolved: 0 })
        );
        assert_eq!(tree.resolve_dir(&[]), Ok(ROOT));
    }
}
