//! Per-VM disks, without copying the image.
//!
//! A VM boots its image read-only and shared (one `rootfs.ext4` in the store for every VM),
//! plus two disks of its own:
//! - the **writable layer** (`/dev/vdb`, `banger.overlay=/dev/vdb`): the upper directory of
//!   the overlayfs the agent's init assembles over the image, so every change to the root
//!   lands here;
//! - the **work disk** (`/dev/vdc`, `banger.work=/dev/vdc`): mounted on `/root`, kept when
//!   the writable layer is reset.
//!
//! Both are blank ext4 file systems written by banger's own ext4 writer, which writes only
//! the blocks that are not zero: a 16 GiB disk costs the same few metadata blocks as a 1 GiB
//! one (sparse files; the guest's writes allocate). The guest init never formats disks.

use std::path::{Path, PathBuf};

use crate::ext4::{BuildOptions, Ext4Builder, Ext4Error, Sizing};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot create a {bytes}-byte disk at {}", path.display())]
    Create {
        path: PathBuf,
        bytes: u64,
        #[source]
        source: Ext4Error,
    },
    #[error("a VM disk must be at least {min} bytes, not {bytes}")]
    TooSmall { bytes: u64, min: u64 },
    #[error("cannot create the disk {}: it exists, and a VM's disks are never overwritten", path.display())]
    Exists { path: PathBuf },
    #[error(
        "cannot grow the disk {}: `{program}` is missing (install e2fsprogs)", path.display()
    )]
    ToolMissing {
        path: PathBuf,
        program: &'static str,
    },
    #[error("`{argv}` failed ({status}): {stderr}")]
    Tool {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("cannot grow the disk {}", path.display())]
    Grow {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot copy the disk {} to {}", from.display(), to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the disk {}", path.display())]
    Reserve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The smallest disk banger creates: room for the journal and some files.
pub const MIN_DISK_BYTES: u64 = 64 << 20;

/// Writes a blank ext4 file system of `bytes` at `path` (replacing it), labelled `label`.
/// `seed` makes the UUID (use the VM's id: each VM's disks differ, re-creating is repeatable).
pub fn create_blank_ext4(
    path: &Path,
    bytes: u64,
    label: &str,
    seed: &[u8],
) -> Result<(), StorageError> {
    write_blank(path, bytes, label, seed, true)
}

/// A builder VM's writable layer ([`create_blank_ext4`] without a journal): once the guest
/// has synced, everything it wrote is in its final place, so the host can read the disk
/// without replaying a journal.
pub fn create_layer_disk(path: &Path, bytes: u64, seed: &[u8]) -> Result<(), StorageError> {
    write_blank(path, bytes, "banger-layer", seed, false)
}

fn write_blank(
    path: &Path,
    bytes: u64,
    label: &str,
    seed: &[u8],
    journal: bool,
) -> Result<(), StorageError> {
    if bytes < MIN_DISK_BYTES {
        return Err(StorageError::TooSmall {
            bytes,
            min: MIN_DISK_BYTES,
        });
    }
    let mut options = BuildOptions::with_seed(seed);
    options.label = label.as_bytes().iter().copied().take(16).collect();
    options.timestamp = 0;
    options.journal = journal;
    let create_error = |source| StorageError::Create {
        path: path.to_owned(),
        bytes,
        source,
    };
    let builder = Ext4Builder::create(path, options).map_err(create_error)?;
    builder.finish(Sizing::Fixed(bytes)).map_err(create_error)?;
    Ok(())
}

/// Grows the ext4 disk at `path` to `bytes`, file system included, offline: `e2fsck -f -p`
/// first (a VM that was killed may leave a journal to replay, and `resize2fs` wants a
/// checked file system), then the file is extended (sparse) and `resize2fs` fills it.
/// Returns whether anything changed: a disk already that large is left alone, so an
/// interrupted grow of several disks can simply be run again. Never shrinks.
pub fn grow_ext4(path: &Path, bytes: u64) -> Result<bool, StorageError> {
    let grow_error = |source| StorageError::Grow {
        path: path.to_owned(),
        source,
    };
    let current = std::fs::metadata(path).map_err(grow_error)?.len();
    if bytes <= current {
        return Ok(false);
    }
    // e2fsck: 0 clean, 1 errors fixed; anything else needs a person.
    run_e2fsprogs(path, "e2fsck", &["-f", "-p"], &[0, 1])?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|file| file.set_len(bytes))
        .map_err(grow_error)?;
    run_e2fsprogs(path, "resize2fs", &[], &[0])?;
    Ok(true)
}

fn run_e2fsprogs(
    path: &Path,
    program: &'static str,
    flags: &[&str],
    success: &[i32],
) -> Result<(), StorageError> {
    let mut command = std::process::Command::new(program);
    command.args(flags).arg(path);
    let argv = std::iter::once(program.to_owned())
        .chain(flags.iter().map(|flag| (*flag).to_owned()))
        .chain(std::iter::once(path.display().to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let output = command.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            StorageError::ToolMissing {
                path: path.to_owned(),
                program,
            }
        } else {
            StorageError::Tool {
                argv: argv.clone(),
                status: "could not start".into(),
                stderr: source.to_string(),
            }
        }
    })?;
    match output.status.code() {
        Some(code) if success.contains(&code) => Ok(()),
        _ => Err(StorageError::Tool {
            argv,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        }),
    }
}

/// Copies the disk `from` to `to` (replacing it), data only: holes stay holes, so a 16 GiB
/// disk holding a few MiB costs a few MiB to copy. `to` is written beside itself and renamed
/// into place, so it is never left half-copied.
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), StorageError> {
    let copy_error = |path: &Path| {
        let path = path.to_owned();
        move |source| StorageError::Copy {
            from: from.to_owned(),
            to: path,
            source,
        }
    };
    let partial = to.with_extension("partial");
    let result = (|| {
        let source = std::fs::File::open(from)?;
        let size = source.metadata()?.len();
        let target = std::fs::File::create(&partial)?;
        for (start, end) in crate::sparse::data_extents(&source, size)? {
            copy_range(&source, &target, start, end - start)?;
        }
        target.set_len(size)?;
        target.sync_all()?;
        std::fs::rename(&partial, to)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result.map_err(copy_error(to))
}

/// `length` bytes at `offset` of `from` to the same offset of `to`. (`std::io::copy` between
/// two files is `copy_file_range` on Linux: the kernel may copy without the bytes passing
/// through here.)
fn copy_range(
    mut from: &std::fs::File,
    mut to: &std::fs::File,
    offset: u64,
    length: u64,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    from.seek(SeekFrom::Start(offset))?;
    to.seek(SeekFrom::Start(offset))?;
    let copied = std::io::copy(&mut from.take(length), &mut to)?;
    if copied < length {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the disk got shorter while it was copied",
        ));
    }
    Ok(())
}

/// A VM's own disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisks {
    /// The writable layer over the image (`/dev/vdb`).
    pub overlay: PathBuf,
    /// The work disk mounted on `/root` (`/dev/vdc`).
    pub work: PathBuf,
}

impl VmDisks {
    /// Where a VM whose files live in `dir` keeps its disks.
    pub fn in_dir(dir: &Path) -> VmDisks {
        VmDisks {
            overlay: dir.join("overlay.ext4"),
            work: dir.join("work.ext4"),
        }
    }

    /// Creates both disks, blank: the writable layer as large as the VM's disk size, the
    /// work disk `work_bytes`. A disk that exists already is an error, and is left alone; on
    /// any failure, neither disk this call made is left behind.
    pub fn create(
        dir: &Path,
        vm_id: &str,
        disk_bytes: u64,
        work_bytes: u64,
    ) -> Result<VmDisks, StorageError> {
        let disks = VmDisks::in_dir(dir);
        // Claimed with O_EXCL first, so that nothing here ever truncates another VM's disk.
        let claim = |path: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map(drop)
                .map_err(|source| {
                    if source.kind() == std::io::ErrorKind::AlreadyExists {
                        StorageError::Exists {
                            path: path.to_owned(),
                        }
                    } else {
                        StorageError::Reserve {
                            path: path.to_owned(),
                            source,
                        }
                    }
                })
        };
        claim(&disks.overlay)?;
        if let Err(error) = claim(&disks.work) {
            let _ = std::fs::remove_file(&disks.overlay);
            return Err(error);
        }
        let made = create_blank_ext4(
            &disks.overlay,
            disk_bytes,
            "banger-rw",
            format!("{vm_id}/overlay").as_bytes(),
        )
        .and_then(|()| {
            create_blank_ext4(
                &disks.work,
                work_bytes,
                "banger-work",
                format!("{vm_id}/work").as_bytes(),
            )
        });
        if let Err(error) = made {
            let _ = std::fs::remove_file(&disks.overlay);
            let _ = std::fs::remove_file(&disks.work);
            return Err(error);
        }
        Ok(disks)
    }

    /// Copies both disks to `to`'s paths, sparse ([`copy_sparse`]).
    pub fn copy_to(&self, to: &VmDisks) -> Result<(), StorageError> {
        copy_sparse(&self.overlay, &to.overlay)?;
        copy_sparse(&self.work, &to.work)
    }

    /// The kernel command-line words that make the agent's init use these disks, attached
    /// after the image as the second and third virtio-blk devices.
    pub fn cmdline() -> [&'static str; 2] {
        ["banger.overlay=/dev/vdb", "banger.work=/dev/vdc"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copies_keep_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from.ext4");
        let to = dir.path().join("to.ext4");
        create_blank_ext4(&from, 1 << 30, "copy", b"seed").unwrap();
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(&from).unwrap();
            file.write_all_at(&[7u8; 4096], 700 << 20).unwrap();
        }
        std::fs::write(&to, b"old contents").unwrap();
        copy_sparse(&from, &to).unwrap();
        assert!(std::fs::read(&from).unwrap() == std::fs::read(&to).unwrap());
        let (from_meta, to_meta) = (from.metadata().unwrap(), to.metadata().unwrap());
        assert_eq!(to_meta.len(), 1 << 30);
        assert!(
            to_meta.blocks() <= from_meta.blocks(),
            "the copy allocates {} blocks, the original {}",
            to_meta.blocks(),
            from_meta.blocks()
        );
        assert!(!dir.path().join("to.partial").exists());
        let error = copy_sparse(&dir.path().join("missing"), &to).unwrap_err();
        assert!(
            error.to_string().starts_with("cannot copy the disk"),
            "{error}"
        );
        assert!(std::fs::read(&from).unwrap() == std::fs::read(&to).unwrap());
    }

    #[test]
    fn blank_disks_are_sparse_whatever_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let small = VmDisks::create(dir.path(), "vm-a", 1 << 30, 256 << 20).unwrap();
        let small_used = std::fs::metadata(&small.overlay).unwrap().blocks() * 512;
        let big_dir = dir.path().join("big");
        std::fs::create_dir(&big_dir).unwrap();
        let big = VmDisks::create(&big_dir, "vm-b", 16 << 30, 256 << 20).unwrap();
        let big_meta = std::fs::metadata(&big.overlay).unwrap();
        assert_eq!(big_meta.len(), 16 << 30);
        // A 16× larger disk must not allocate 16× the blocks: only per-group metadata grows.
        let big_used = big_meta.blocks() * 512;
        assert!(
            big_used < 64 << 20,
            "a blank 16 GiB disk allocates {big_used} bytes (1 GiB: {small_used})"
        );
    }

    #[test]
    fn a_disk_grows_with_its_file_system_and_keeps_its_files() {
        if std::process::Command::new("resize2fs")
            .arg("-V")
            .output()
            .is_err()
        {
            eprintln!("skipped: resize2fs (e2fsprogs) is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let disks = VmDisks::create(dir.path(), "vm", 256 << 20, 256 << 20).unwrap();
        let write = std::process::Command::new("debugfs")
            .args(["-w", "-R", "mkdir kept"])
            .arg(&disks.work)
            .output()
            .unwrap();
        assert!(write.status.success(), "{write:?}");
        assert!(grow_ext4(&disks.work, 1 << 30).unwrap());
        assert_eq!(std::fs::metadata(&disks.work).unwrap().len(), 1 << 30);
        let dump = std::process::Command::new("dumpe2fs")
            .arg("-h")
            .arg(&disks.work)
            .output()
            .unwrap();
        let header = String::from_utf8_lossy(&dump.stdout);
        let field = |name: &str| -> u64 {
            header
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(field("Block count:") * field("Block size:"), 1 << 30);
        let check = std::process::Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&disks.work)
            .output()
            .unwrap();
        assert!(check.status.success(), "{check:?}");
        let listed = std::process::Command::new("debugfs")
            .args(["-R", "ls -l /"])
            .arg(&disks.work)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&listed.stdout).contains("kept"));
        // The same size again changes nothing; smaller is never done.
        assert!(!grow_ext4(&disks.work, 1 << 30).unwrap());
        assert!(!grow_ext4(&disks.work, 512 << 20).unwrap());
        assert_eq!(std::fs::metadata(&disks.work).unwrap().len(), 1 << 30);
    }

    #[test]
    fn tiny_disks_are_refused_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let error = VmDisks::create(dir.path(), "vm", 1 << 20, 256 << 20).unwrap_err();
        assert!(matches!(error, StorageError::TooSmall { .. }), "{error}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn existing_disks_are_never_overwritten_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let disks = VmDisks::in_dir(dir.path());
        std::fs::write(&disks.work, b"another VM's work").unwrap();
        let error = VmDisks::create(dir.path(), "vm", 64 << 20, 64 << 20).unwrap_err();
        assert!(matches!(error, StorageError::Exists { .. }), "{error}");
        assert_eq!(std::fs::read(&disks.work).unwrap(), b"another VM's work");
        assert!(
            !disks.overlay.exists(),
            "the claimed overlay was left behind"
        );
        std::fs::remove_file(&disks.work).unwrap();
        std::fs::write(&disks.overlay, b"another VM's overlay").unwrap();
        assert!(matches!(
            VmDisks::create(dir.path(), "vm", 64 << 20, 64 << 20),
            Err(StorageError::Exists { .. })
        ));
        assert_eq!(
            std::fs::read(&disks.overlay).unwrap(),
            b"another VM's overlay"
        );
        assert!(!disks.work.exists());
    }
}
