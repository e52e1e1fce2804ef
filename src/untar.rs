//! Tar extraction confined to one directory, for archives banger does not trust: a kernel
//! package's `data.tar`, and what `vm cp` receives from a guest (whose `tar` may be anything).
//!
//! [`extract_into`] streams an archive into a directory that only this extraction writes to
//! (callers make a fresh temporary one and rename it into place afterwards, so a failure
//! leaves nothing behind):
//! 1. Each entry path is normalized (`./` dropped) and refused if absolute or containing `..`.
//! 2. Parent directories are created as needed; an existing symlink or non-directory on the
//!    way is refused, so nothing is ever written through a link, whatever its target.
//! 3. Every entry is created exclusively (`O_EXCL`, `mkdir`, `symlink`, `link`): an entry
//!    cannot replace or write through one that came before it.
//! 4. Symlink targets are kept as they are, or (with [`LinkTargets::Inside`]) refused when
//!    absolute or climbing out; hard links only to regular files extracted before them.
//! 5. Devices and FIFOs are refused or skipped, as the caller chooses.
//! 6. Modes keep the bits the caller's mask allows (never setuid/setgid from a guest);
//!    directories get theirs after everything inside them was written.

use std::ffi::OsStr;
use std::fs::{File, FileTimes};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Why an archive could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum UntarError {
    /// The stream broke off or is not a tar archive.
    #[error("cannot read the archive")]
    Read {
        #[source]
        source: io::Error,
    },
    /// An entry that would escape the directory or overwrite what came before it.
    #[error("entry {entry:?} is refused: {reason}")]
    Unsafe { entry: String, reason: String },
    #[error("cannot extract {entry:?} to {target}")]
    Write {
        entry: String,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What an extraction accepts and keeps.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub link_targets: LinkTargets,
    pub special_files: SpecialFiles,
    /// The permission bits kept from each entry's mode.
    pub mode_mask: u32,
    /// Bits every directory gets on top of its own (`0o700` keeps a tree removable).
    pub directory_mode_floor: u32,
    /// Restore modification times of files and directories.
    pub keep_times: bool,
}

/// Where symlinks may point. Neither rule lets a later entry write through one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkTargets {
    /// Anywhere: the link is data, as `cp -a` keeps it.
    Anywhere,
    /// Only relative targets that stay inside the directory.
    Inside,
}

/// What happens to devices, FIFOs and the like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialFiles {
    Refuse,
    /// Left out and counted in [`Summary::skipped`].
    Skip,
}

/// What an extraction wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    /// Special files left out under [`SpecialFiles::Skip`].
    pub skipped: u64,
    /// Bytes of regular file contents.
    pub bytes: u64,
}

/// A directory's mode and time, applied once everything inside it is written.
struct PendingDirectory {
    path: PathBuf,
    mode: u32,
    modified: Option<SystemTime>,
}

/// Extracts every entry of `archive` whose normalized path `select` accepts into `root`, a
/// directory only this extraction writes to.
pub fn extract_into<R: Read>(
    archive: &mut tar::Archive<R>,
    root: &Path,
    rules: &Rules,
    select: &dyn Fn(&Path) -> bool,
) -> Result<Summary, UntarError> {
    let read_error = |source| UntarError::Read { source };
    let mut summary = Summary::default();
    let mut directories = Vec::new();
    for entry in archive.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        let raw = entry.path_bytes().into_owned();
        let entry_name = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason: String| UntarError::Unsafe {
            entry: entry_name.clone(),
            reason,
        };
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            continue;
        }
        let relative = normalize(&raw).map_err(|reason| refuse(reason.into()))?;
        if relative.as_os_str().is_empty() || !select(&relative) {
            continue;
        }
        let target = root.join(&relative);
        let write_error = |source| UntarError::Write {
            entry: entry_name.clone(),
            target: target.clone(),
            source,
        };
        let twice_or = |error: io::Error| {
            if error.kind() == io::ErrorKind::AlreadyExists {
                refuse("the path appears twice in the archive".into())
            } else {
                write_error(error)
            }
        };
        prepare_parents(root, &relative).map_err(&refuse)?;
        let mode = entry.header().mode().map_err(read_error)? & rules.mode_mask;
        let modified = rules
            .keep_times
            .then(|| entry.header().mtime().ok())
            .flatten()
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        match kind {
            tar::EntryType::Directory => {
                match target.symlink_metadata() {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => return Err(refuse("a directory replaces another entry".into())),
                    Err(_) => {
                        std::fs::create_dir(&target).map_err(write_error)?;
                        summary.directories += 1;
                    }
                }
                // Owner rwx until the end, so the rest of the tree can be written into it.
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700))
                    .map_err(write_error)?;
                directories.push(PendingDirectory {
                    path: target.clone(),
                    mode: mode | rules.directory_mode_floor,
                    modified,
                });
            }
            kind if kind.is_file() || kind == tar::EntryType::GNUSparse => {
                let mut file = File::create_new(&target).map_err(twice_or)?;
                summary.bytes += io::copy(&mut entry, &mut file).map_err(write_error)?;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(write_error)?;
                if let Some(modified) = modified {
                    file.set_times(FileTimes::new().set_modified(modified))
                        .map_err(write_error)?;
                }
                summary.files += 1;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse("a symlink without a target".into()))?
                    .into_owned();
                if rules.link_targets == LinkTargets::Inside {
                    check_symlink_target(&relative, &link).map_err(&refuse)?;
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &target).map_err(twice_or)?;
                summary.symlinks += 1;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse("a hard link without a target".into()))?
                    .into_owned();
                let source = normalize(&link)
                    .map_err(|reason| refuse(format!("hard link target: {reason}")))?;
                let existing = root.join(&source);
                let is_extracted_file = no_symlink_above(root, &source)
                    && existing.symlink_metadata().is_ok_and(|meta| meta.is_file());
                if !is_extracted_file {
                    return Err(refuse(format!(
                        "a hard link to {source:?}, which is not a file extracted before it"
                    )));
                }
                std::fs::hard_link(&existing, &target).map_err(twice_or)?;
                summary.hard_links += 1;
            }
            _ if rules.special_files == SpecialFiles::Skip => summary.skipped += 1,
            other => {
                return Err(refuse(format!(
                    "entry type {other:?} (devices, FIFOs and the like) is not extracted"
                )));
            }
        }
    }
    // Deepest first, so a read-only directory is closed only after its children were done.
    directories.sort_by_key(|directory| std::cmp::Reverse(directory.path.components().count()));
    for directory in directories {
        let write_error = |source| UntarError::Write {
            entry: directory.path.display().to_string(),
            target: directory.path.clone(),
            source,
        };
        if let Some(modified) = directory.modified {
            File::open(&directory.path)
                .and_then(|handle| handle.set_times(FileTimes::new().set_modified(modified)))
                .map_err(write_error)?;
        }
        std::fs::set_permissions(
            &directory.path,
            std::fs::Permissions::from_mode(directory.mode),
        )
        .map_err(write_error)?;
    }
    Ok(summary)
}

/// An archive path made relative and plain: `./boot/x` → `boot/x`. Absolute paths and `..`
/// are refused rather than "fixed", since an archive that carries them is not to be trusted.
pub fn normalize(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.contains(&0) {
        return Err("the path contains a NUL byte");
    }
    let path = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err("the path is absolute");
            }
            Component::ParentDir => return Err("the path contains `..`"),
        }
    }
    Ok(out)
}

/// Creates the directories above `relative` inside `root`, refusing to pass through a
/// symlink or a non-directory.
fn prepare_parents(root: &Path, relative: &Path) -> Result<(), String> {
    let mut at = root.to_path_buf();
    let Some(parent) = relative.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        at.push(part);
        match at.symlink_metadata() {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "it would be written through the symlink {:?}",
                    at.strip_prefix(root).unwrap_or(&at)
                ));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "{:?} above it is not a directory",
                    at.strip_prefix(root).unwrap_or(&at)
                ));
            }
            Err(_) => std::fs::create_dir(&at)
                .map_err(|error| format!("cannot create {at:?}: {error}"))?,
        }
    }
    Ok(())
}

/// Whether every directory above `relative` inside `root` exists and is a real directory.
fn no_symlink_above(root: &Path, relative: &Path) -> bool {
    let mut at = root.to_path_buf();
    relative.parent().is_none_or(|parent| {
        parent.components().all(|part| {
            at.push(part);
            at.symlink_metadata().is_ok_and(|meta| meta.is_dir())
        })
    })
}

/// Refuses a symlink at `relative` whose target is absolute or climbs out of the root.
fn check_symlink_target(relative: &Path, target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("a symlink with an empty target".into());
    }
    if target.starts_with(b"/") {
        return Err(format!(
            "a symlink to the absolute path {:?}, which would point outside",
            String::from_utf8_lossy(target)
        ));
    }
    // Depth of the directory holding the link, then walk the target lexically; extraction
    // never writes below a symlink, so lexical resolution matches the tree on disk.
    let mut depth = relative.components().count() as i64 - 1;
    for part in Path::new(OsStr::from_bytes(target)).components() {
        match part {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(format!(
                "a symlink to {:?}, which climbs out of the directory",
                String::from_utf8_lossy(target)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// One raw tar entry: the header is written by hand so that hostile names (`..`, absolute)
    /// get into the archive exactly as given.
    enum Raw<'a> {
        File(&'a str, u32, &'a [u8]),
        Dir(&'a str, u32),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        Fifo(&'a str),
    }

    fn archive(entries: &[Raw<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for entry in entries {
            let mut header = tar::Header::new_old();
            let (name, kind, mode, body, link): (&str, _, u32, &[u8], Option<&str>) = match entry {
                Raw::File(name, mode, body) => (name, tar::EntryType::Regular, *mode, body, None),
                Raw::Dir(name, mode) => (name, tar::EntryType::Directory, *mode, &[], None),
                Raw::Symlink(name, target) => {
                    (name, tar::EntryType::Symlink, 0o777, &[], Some(*target))
                }
                Raw::HardLink(name, target) => {
                    (name, tar::EntryType::Link, 0o644, &[], Some(*target))
                }
                Raw::Fifo(name) => (name, tar::EntryType::Fifo, 0o644, &[], None),
            };
            let bytes = header.as_old_mut();
            bytes.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(link) = link {
                bytes.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_size(body.len() as u64);
            header.set_mtime(1_700_000_000);
            header.set_cksum();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(body);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    const COPY: Rules = Rules {
        link_targets: LinkTargets::Anywhere,
        special_files: SpecialFiles::Skip,
        mode_mask: 0o1777,
        directory_mode_floor: 0,
        keep_times: true,
    };

    fn extract(bytes: &[u8], rules: &Rules) -> (tempfile::TempDir, Result<Summary, UntarError>) {
        let root = tempfile::tempdir().unwrap();
        let result = extract_into(&mut tar::Archive::new(bytes), root.path(), rules, &|_| true);
        (root, result)
    }

    #[test]
    fn a_tree_keeps_modes_times_and_links() {
        let (root, result) = extract(
            &archive(&[
                Raw::Dir("tree/", 0o555),
                Raw::File("tree/run.sh", 0o4755, b"#!/bin/sh\n"),
                Raw::File("tree/sub/data", 0o600, b"secret"),
                Raw::Symlink("tree/etc", "/etc"),
                Raw::HardLink("tree/again", "tree/sub/data"),
                Raw::Fifo("tree/pipe"),
            ]),
            &COPY,
        );
        let summary = result.unwrap();
        assert_eq!(
            summary,
            Summary {
                files: 2,
                directories: 1,
                symlinks: 1,
                hard_links: 1,
                skipped: 1,
                bytes: 16,
            }
        );
        let tree = root.path().join("tree");
        let mode = |path: &Path| path.symlink_metadata().unwrap().mode() & 0o7777;
        // The read-only directory got its children, then its mode; setuid was dropped.
        assert_eq!(mode(&tree), 0o555);
        assert_eq!(mode(&tree.join("run.sh")), 0o755);
        assert_eq!(mode(&tree.join("sub/data")), 0o600);
        assert_eq!(
            std::fs::read_link(tree.join("etc")).unwrap(),
            Path::new("/etc")
        );
        assert_eq!(std::fs::read(tree.join("again")).unwrap(), b"secret");
        assert!(!tree.join("pipe").exists());
        let modified = tree.join("run.sh").metadata().unwrap().mtime();
        assert_eq!(modified, 1_700_000_000);
        assert_eq!(tree.metadata().unwrap().mtime(), 1_700_000_000);
        std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn hostile_entries_are_refused_without_writing_outside() {
        let outside = tempfile::tempdir().unwrap();
        let escape = outside.path().join("escaped");
        let escape_text = escape.to_str().unwrap();
        let outside_text = outside.path().to_str().unwrap();
        let cases: Vec<(&str, Vec<Raw<'_>>)> = vec![
            ("`..`", vec![Raw::File("../escaped", 0o644, b"x")]),
            ("absolute", vec![Raw::File(escape_text, 0o644, b"x")]),
            (
                "through a symlink",
                vec![
                    Raw::Symlink("out", outside_text),
                    Raw::File("out/escaped", 0o644, b"x"),
                ],
            ),
            (
                "onto a symlink",
                vec![
                    Raw::Symlink("link", escape_text),
                    Raw::File("link", 0o644, b"x"),
                ],
            ),
            (
                "hard link outside",
                vec![Raw::HardLink("passwd", "../../../../etc/passwd")],
            ),
        ];
        for (what, entries) in cases {
            let (_root, result) = extract(&archive(&entries), &COPY);
            let error = result.expect_err(what);
            assert!(
                matches!(error, UntarError::Unsafe { .. }),
                "{what}: {error}"
            );
            assert!(!escape.exists(), "{what} wrote outside");
        }
    }

    #[test]
    fn inside_rules_refuse_escaping_symlinks_and_special_files() {
        let inside = Rules {
            link_targets: LinkTargets::Inside,
            special_files: SpecialFiles::Refuse,
            mode_mask: 0o777,
            directory_mode_floor: 0o700,
            keep_times: false,
        };
        for entries in [
            vec![Raw::Symlink("a/b", "../../x")],
            vec![Raw::Symlink("a", "/etc")],
            vec![Raw::Fifo("pipe")],
        ] {
            let (_root, result) = extract(&archive(&entries), &inside);
            assert!(matches!(result, Err(UntarError::Unsafe { .. })));
        }
        let (root, result) = extract(&archive(&[Raw::Symlink("a/b", "../c")]), &inside);
        result.unwrap();
        assert!(root.path().join("a/b").symlink_metadata().is_ok());
    }

    #[test]
    fn a_truncated_stream_is_a_read_error() {
        let mut bytes = archive(&[Raw::File("big", 0o644, &[7u8; 4096])]);
        bytes.truncate(1024);
        let (_root, result) = extract(&bytes, &COPY);
        assert!(
            matches!(
                result,
                Err(UntarError::Read { .. } | UntarError::Write { .. })
            ),
            "{result:?}"
        );
    }
}
