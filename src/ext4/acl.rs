//! POSIX ACLs: the user-space xattr format (`system.posix_acl_*` as `getxattr` returns it and
//! tar carries it) converted to ext4's on-disk format ([`to_disk`], for the writer) and back
//! ([`from_disk`], for the reader).
//!
//! User space: a 4-byte header (version 2) and 8-byte entries `{tag u16, perm u16, id u32}`.
//! ext4: a 4-byte header (version 1); entries for `USER`/`GROUP` keep their id (8 bytes), the
//! others (`USER_OBJ`, `GROUP_OBJ`, `MASK`, `OTHER`) drop it (4 bytes). Little-endian both.

const USER_SPACE_VERSION: u32 = 2;
const DISK_VERSION: u32 = 1;

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// Converts a user-space ACL to ext4's format, checking it is one the kernel accepts: known
/// tags in canonical order, named ids ascending, one each of the owner, group and other
/// entries, and a mask when there are named entries. An ACL with no entries stays empty.
pub(crate) fn to_disk(value: &[u8]) -> Result<Vec<u8>, &'static str> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) {
        return Err("length is not a 4-byte header plus 8-byte entries");
    }
    let version = u32::from_le_bytes(value[..4].try_into().expect("4 bytes"));
    if version != USER_SPACE_VERSION {
        return Err("header version is not 2");
    }
    let mut out = Vec::with_capacity(value.len());
    out.extend_from_slice(&DISK_VERSION.to_le_bytes());
    let entries = &value[4..];
    if entries.is_empty() {
        return Ok(out);
    }
    let mut previous: Option<(u16, u32)> = None;
    let mut seen = 0u16;
    for entry in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let perm = u16::from_le_bytes([entry[2], entry[3]]);
        let id = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
        if perm & !0o7 != 0 {
            return Err("permission bits beyond rwx");
        }
        let named = match tag {
            USER | GROUP => true,
            USER_OBJ | GROUP_OBJ | MASK | OTHER => false,
            _ => return Err("unknown entry tag"),
        };
        if let Some((prev_tag, prev_id)) = previous {
            let in_order = tag > prev_tag || (tag == prev_tag && named && id > prev_id);
            if !in_order {
                return Err("entries out of canonical order or repeated");
            }
        }
        previous = Some((tag, id));
        seen |= tag;
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        if named {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    if seen & (USER_OBJ | GROUP_OBJ | OTHER) != USER_OBJ | GROUP_OBJ | OTHER {
        return Err("missing the owner, owning group or other entry");
    }
    if seen & (USER | GROUP) != 0 && seen & MASK == 0 {
        return Err("named entries without a mask entry");
    }
    Ok(out)
}

/// The id user space sees for entries that carry none (`ACL_UNDEFINED_ID`).
const UNDEFINED_ID: u32 = u32::MAX;

/// Converts an ACL in ext4's format back to the user-space format, as the kernel's
/// `posix_acl_to_xattr` would show it: version 2, 8-byte entries, `ACL_UNDEFINED_ID` as the id
/// of the entries that store none. Only the layout is checked (known tags, whole entries):
/// semantic checks are the writer's business, and an image may come from any tool.
pub(crate) fn from_disk(value: &[u8]) -> Result<Vec<u8>, &'static str> {
    let Some((version, mut entries)) = value.split_first_chunk::<4>() else {
        return Err("shorter than the 4-byte header");
    };
    if u32::from_le_bytes(*version) != DISK_VERSION {
        return Err("header version is not 1");
    }
    let mut out = Vec::with_capacity(4 + value.len() * 2);
    out.extend_from_slice(&USER_SPACE_VERSION.to_le_bytes());
    while !entries.is_empty() {
        let Some((short, rest)) = entries.split_first_chunk::<4>() else {
            return Err("ends inside an entry");
        };
        let tag = u16::from_le_bytes([short[0], short[1]]);
        let id = match tag {
            USER | GROUP => {
                let Some((id, rest)) = rest.split_first_chunk::<4>() else {
                    return Err("ends inside a named entry");
                };
                entries = rest;
                u32::from_le_bytes(*id)
            }
            USER_OBJ | GROUP_OBJ | MASK | OTHER => {
                entries = rest;
                UNDEFINED_ID
            }
            _ => return Err("unknown entry tag"),
        };
        out.extend_from_slice(&short[..]);
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_space(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut out = 2u32.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    #[test]
    fn converts_short_and_named_entries() {
        let acl = user_space(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 5, 1000),
            (GROUP_OBJ, 5, u32::MAX),
            (GROUP, 4, 2000),
            (MASK, 5, u32::MAX),
            (OTHER, 0, u32::MAX),
        ]);
        let disk = to_disk(&acl).unwrap();
        let expected: Vec<u8> = [
            &1u32.to_le_bytes()[..],
            &[1, 0, 7, 0],
            &[2, 0, 5, 0],
            &1000u32.to_le_bytes(),
            &[4, 0, 5, 0],
            &[8, 0, 4, 0],
            &2000u32.to_le_bytes(),
            &[0x10, 0, 5, 0],
            &[0x20, 0, 0, 0],
        ]
        .concat();
        assert_eq!(disk, expected);
    }

    #[test]
    fn disk_format_converts_back_to_what_went_in() {
        let acl = user_space(&[
            (USER_OBJ, 7, UNDEFINED_ID),
            (USER, 5, 1000),
            (USER, 4, 70_000),
            (GROUP_OBJ, 5, UNDEFINED_ID),
            (GROUP, 4, 2000),
            (MASK, 5, UNDEFINED_ID),
            (OTHER, 1, UNDEFINED_ID),
        ]);
        assert_eq!(from_disk(&to_disk(&acl).unwrap()).unwrap(), acl);
        let minimal = user_space(&[
            (USER_OBJ, 6, UNDEFINED_ID),
            (GROUP_OBJ, 4, UNDEFINED_ID),
            (OTHER, 4, UNDEFINED_ID),
        ]);
        assert_eq!(from_disk(&to_disk(&minimal).unwrap()).unwrap(), minimal);
        let empty = user_space(&[]);
        assert_eq!(from_disk(&to_disk(&empty).unwrap()).unwrap(), empty);
    }

    #[test]
    fn malformed_disk_acls_are_errors() {
        assert!(from_disk(&[1, 0]).is_err());
        assert!(from_disk(&2u32.to_le_bytes()).is_err()); // user-space version
        let mut cut = to_disk(&user_space(&[
            (USER_OBJ, 7, 0),
            (USER, 5, 1),
            (GROUP_OBJ, 5, 0),
            (MASK, 5, 0),
            (OTHER, 0, 0),
        ]))
        .unwrap();
        cut.truncate(4 + 4 + 6); // inside the named entry's id
        assert!(from_disk(&cut).is_err());
        let unknown: Vec<u8> = [&1u32.to_le_bytes()[..], &[0x40, 0, 7, 0]].concat();
        assert!(from_disk(&unknown).is_err());
    }

    #[test]
    fn rejects_malformed_acls() {
        assert!(to_disk(&[2, 0, 0]).is_err());
        assert!(to_disk(&user_space(&[(USER_OBJ, 7, 0)])).is_err()); // no group/other
        let unordered = user_space(&[(GROUP_OBJ, 5, 0), (USER_OBJ, 7, 0), (OTHER, 0, 0)]);
        assert!(to_disk(&unordered).is_err());
        let no_mask = user_space(&[
            (USER_OBJ, 7, 0),
            (USER, 5, 1),
            (GROUP_OBJ, 5, 0),
            (OTHER, 0, 0),
        ]);
        assert!(to_disk(&no_mask).is_err());
        let mut v1 = user_space(&[]);
        v1[0] = 1;
        assert!(to_disk(&v1).is_err());
        assert_eq!(to_disk(&user_space(&[])).unwrap(), 1u32.to_le_bytes());
    }
}
