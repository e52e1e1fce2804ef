//! Extended attributes: name prefixes to ext4 name indexes, placement in the inode's spare
//! bytes or in one external block, entry and block hashes, and serialization.
//!
//! Placement: attributes are kept sorted as the kernel's block lookup expects (name index,
//! name length, name); each is put in the inode while it fits, the rest in one block. Blocks
//! with identical content are shared between inodes (up to the kernel's refcount limit).

use super::acl;
use super::checksum::crc32c;
use super::layout::{BLOCK_SIZE, INODE_SIZE};

const MAGIC: u32 = 0xEA02_0000;
/// `i_extra_isize`: the fixed extra inode fields (times' high bits, crtime, checksum, ...).
pub(crate) const EXTRA_ISIZE: usize = 32;
/// Offset in the inode of the in-inode attribute area (its 4-byte magic comes first).
pub(crate) const IBODY_OFFSET: usize = 128 + EXTRA_ISIZE;
const IBODY_SIZE: usize = INODE_SIZE - IBODY_OFFSET;
/// Bytes of entries and values that fit in the inode: the area minus magic and terminator.
const IBODY_CAPACITY: usize = IBODY_SIZE - 8;
const BLOCK_HEADER: usize = 32;
/// Bytes of entries and values that fit in a block: the block minus header and terminator.
const BLOCK_CAPACITY: usize = BLOCK_SIZE - BLOCK_HEADER - 4;
const ENTRY_HEADER: usize = 16;
/// Most inodes one attribute block may serve (`EXT4_XATTR_REFCOUNT_MAX`).
pub(crate) const MAX_BLOCK_REFCOUNT: u32 = 1024;

const INDEX_USER: u8 = 1;
const INDEX_ACL_ACCESS: u8 = 2;
const INDEX_ACL_DEFAULT: u8 = 3;
const INDEX_TRUSTED: u8 = 4;
const INDEX_SECURITY: u8 = 6;

/// An attribute as stored: ext4 name index, the name without its prefix, the on-disk value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Xattr {
    pub index: u8,
    pub name: Box<[u8]>,
    pub value: Box<[u8]>,
}

impl Xattr {
    fn sort_key(&self) -> (u8, usize, &[u8]) {
        (self.index, self.name.len(), &self.name)
    }

    fn cost(&self) -> usize {
        entry_size(self.name.len()) + padded(self.value.len())
    }
}

fn entry_size(name_len: usize) -> usize {
    (ENTRY_HEADER + name_len).next_multiple_of(4)
}

fn padded(len: usize) -> usize {
    len.next_multiple_of(4)
}

/// Splits a full attribute name into ext4's name index and the stored suffix.
fn split_name(full: &[u8]) -> Option<(u8, &[u8])> {
    match full {
        b"system.posix_acl_access" => return Some((INDEX_ACL_ACCESS, b"")),
        b"system.posix_acl_default" => return Some((INDEX_ACL_DEFAULT, b"")),
        _ => {}
    }
    let prefixes: [(&[u8], u8); 3] = [
        (b"user.", INDEX_USER),
        (b"trusted.", INDEX_TRUSTED),
        (b"security.", INDEX_SECURITY),
    ];
    prefixes.iter().find_map(|&(prefix, index)| {
        full.strip_prefix(prefix)
            .filter(|suffix| !suffix.is_empty())
            .map(|suffix| (index, suffix))
    })
}

/// Whether ext4 can store an attribute of this full name (`user.*`, `trusted.*`,
/// `security.*`, and the two POSIX ACL names).
pub fn is_supported_xattr_name(full: &[u8]) -> bool {
    split_name(full).is_some()
}

/// Validates and converts one attribute. The error says why it cannot be stored.
pub(crate) fn prepare(full_name: &[u8], value: &[u8]) -> Result<Xattr, String> {
    let (index, name) = split_name(full_name).ok_or_else(|| {
        "namespace not stored by ext4 (use user., trusted., security. or a POSIX ACL)".to_owned()
    })?;
    if name.len() > 255 {
        return Err("name longer than 255 bytes".to_owned());
    }
    let value = match index {
        INDEX_ACL_ACCESS | INDEX_ACL_DEFAULT => {
            acl::to_disk(value).map_err(|reason| format!("invalid POSIX ACL: {reason}"))?
        }
        _ => value.to_vec(),
    };
    let xattr = Xattr {
        index,
        name: name.into(),
        value: value.into(),
    };
    if xattr.cost() > BLOCK_CAPACITY {
        return Err(format!(
            "value of {} bytes does not fit in one block",
            xattr.value.len()
        ));
    }
    Ok(xattr)
}

/// Sorts attributes into on-disk order; a repeated name keeps its last value.
pub(crate) fn normalize(mut xattrs: Vec<Xattr>) -> Vec<Xattr> {
    // Stable sort keeps input order among equal names; keep the last of each run.
    xattrs.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    let mut out: Vec<Xattr> = Vec::with_capacity(xattrs.len());
    for xattr in xattrs {
        match out.last_mut() {
            Some(last) if last.sort_key() == xattr.sort_key() => *last = xattr,
            _ => out.push(xattr),
        }
    }
    out
}

/// Which attributes go in the inode and which in the block.
#[derive(Debug, Default)]
pub(crate) struct Placement<'a> {
    pub inline: Vec<&'a Xattr>,
    pub block: Vec<&'a Xattr>,
}

/// Places sorted attributes; `Err` when those left over do not fit in one block.
pub(crate) fn place(xattrs: &[Xattr]) -> Result<Placement<'_>, ()> {
    let mut placement = Placement::default();
    let mut inline_used = 0;
    let mut block_used = 0;
    for xattr in xattrs {
        let cost = xattr.cost();
        if inline_used + cost <= IBODY_CAPACITY {
            inline_used += cost;
            placement.inline.push(xattr);
        } else {
            block_used += cost;
            placement.block.push(xattr);
        }
    }
    if block_used > BLOCK_CAPACITY {
        return Err(());
    }
    Ok(placement)
}

/// Identity of a block's content, for sharing one block between inodes.
pub(crate) fn block_key(block: &[&Xattr]) -> Vec<u8> {
    let mut key = Vec::new();
    for xattr in block {
        key.push(xattr.index);
        key.extend_from_slice(&(xattr.name.len() as u32).to_le_bytes());
        key.extend_from_slice(&xattr.name);
        key.extend_from_slice(&(xattr.value.len() as u32).to_le_bytes());
        key.extend_from_slice(&xattr.value);
    }
    key
}

/// `ext4_xattr_hash_entry`: name bytes (unsigned) then the value as little-endian words.
fn entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut hash = 0u32;
    for &byte in name {
        hash = (hash << 5) ^ (hash >> 27) ^ u32::from(byte);
    }
    for chunk in value.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes(word);
    }
    hash
}

/// Writes entries from `entries_at` up and values from `values_end` down; value offsets are
/// counted from `offset_base`. Returns the entry hashes in order.
fn write_entries(
    area: &mut [u8],
    xattrs: &[&Xattr],
    entries_at: usize,
    values_end: usize,
    offset_base: usize,
) -> Vec<u32> {
    let mut entry = entries_at;
    let mut value_at = values_end;
    let mut hashes = Vec::with_capacity(xattrs.len());
    for xattr in xattrs {
        let value_offset = if xattr.value.is_empty() {
            0
        } else {
            value_at -= padded(xattr.value.len());
            area[value_at..value_at + xattr.value.len()].copy_from_slice(&xattr.value);
            value_at - offset_base
        };
        let hash = entry_hash(&xattr.name, &xattr.value);
        hashes.push(hash);
        let e = &mut area[entry..entry + entry_size(xattr.name.len())];
        e[0] = xattr.name.len() as u8;
        e[1] = xattr.index;
        e[2..4].copy_from_slice(&(value_offset as u16).to_le_bytes());
        // e_value_inum (4..8) stays 0: no ea_inode.
        e[8..12].copy_from_slice(&(xattr.value.len() as u32).to_le_bytes());
        e[12..16].copy_from_slice(&hash.to_le_bytes());
        e[ENTRY_HEADER..ENTRY_HEADER + xattr.name.len()].copy_from_slice(&xattr.name);
        entry += entry_size(xattr.name.len());
    }
    debug_assert!(entry + 4 <= value_at);
    hashes
}

/// Fills the in-inode area (`inode[IBODY_OFFSET..]`). Nothing is written when there is nothing
/// to store, which leaves the area zero as mke2fs does.
pub(crate) fn write_ibody(inode: &mut [u8], inline: &[&Xattr]) {
    if inline.is_empty() {
        return;
    }
    let area = &mut inode[IBODY_OFFSET..INODE_SIZE];
    area[..4].copy_from_slice(&MAGIC.to_le_bytes());
    // In the inode, value offsets count from the first entry, just after the magic.
    write_entries(area, inline, 4, IBODY_SIZE, 4);
}

/// Renders an attribute block. `csum_seed` is the file system's checksum seed when
/// `metadata_csum` is on.
pub(crate) fn write_block(
    out: &mut [u8],
    xattrs: &[&Xattr],
    refcount: u32,
    block_number: u64,
    csum_seed: Option<u32>,
) {
    out.fill(0);
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&refcount.to_le_bytes());
    out[8..12].copy_from_slice(&1u32.to_le_bytes()); // h_blocks
    let hashes = write_entries(out, xattrs, BLOCK_HEADER, BLOCK_SIZE, 0);
    let mut block_hash = 0u32;
    for hash in hashes {
        if hash == 0 {
            block_hash = 0;
            break;
        }
        block_hash = (block_hash << 16) ^ (block_hash >> 16) ^ hash;
    }
    out[12..16].copy_from_slice(&block_hash.to_le_bytes());
    if let Some(seed) = csum_seed {
        let crc = crc32c(seed, &block_number.to_le_bytes());
        let crc = crc32c(crc, out);
        out[16..20].copy_from_slice(&crc.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_indexes() {
        assert_eq!(split_name(b"user.foo"), Some((1, &b"foo"[..])));
        assert_eq!(
            split_name(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
        assert_eq!(split_name(b"system.posix_acl_default"), Some((3, &b""[..])));
        assert_eq!(split_name(b"user."), None);
        assert_eq!(split_name(b"system.nfs4_acl"), None);
        assert!(prepare(b"trusted.overlay.opaque", b"y").is_ok());
    }

    #[test]
    fn small_attributes_stay_in_the_inode_and_large_go_to_the_block() {
        let caps = prepare(b"security.capability", &[1; 20]).unwrap();
        let big = prepare(b"user.big", &[2; 200]).unwrap();
        let xattrs = normalize(vec![big.clone(), caps.clone()]);
        let placement = place(&xattrs).unwrap();
        assert_eq!(placement.inline, [&caps]);
        assert_eq!(placement.block, [&big]);
        let too_big: Vec<Xattr> = (0..3)
            .map(|i| prepare(format!("user.{i}").as_bytes(), &[0; 1500]).unwrap())
            .collect();
        assert!(place(&normalize(too_big)).is_err());
    }

    #[test]
    fn repeated_names_keep_the_last_value() {
        let a = prepare(b"user.a", b"1").unwrap();
        let a2 = prepare(b"user.a", b"2").unwrap();
        assert_eq!(normalize(vec![a, a2.clone()]), [a2]);
    }

    #[test]
    fn ibody_layout() {
        let x = prepare(b"user.k", b"value").unwrap();
        let mut inode = [0u8; INODE_SIZE];
        write_ibody(&mut inode, &[&x]);
        let area = &inode[IBODY_OFFSET..];
        assert_eq!(&area[..4], &MAGIC.to_le_bytes());
        assert_eq!(area[4], 1); // name length
        assert_eq!(area[5], 1); // user
        let offset = u16::from_le_bytes([area[6], area[7]]) as usize;
        assert_eq!(&area[4 + offset..4 + offset + 5], b"value");
        assert_eq!(&area[4 + 20..4 + 24], &[0; 4]); // terminator after the one entry
    }
}
