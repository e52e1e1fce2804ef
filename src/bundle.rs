//! Bundles: the `.tar.zst` distribution format of images and kernels.
//!
//! A bundle is a zstd-compressed tar whose first entry is `manifest.json` ([`BundleManifest`]);
//! every other entry is a regular file the manifest lists with its sha256 and size. An image
//! bundle holds `rootfs.ext4`; a kernel bundle holds `vmlinux`, optionally `initrd` and a
//! `modules/…` tree. The format, for people building bundles by hand, is `docs/bundles.md`.
//!
//! Writing ([`write_bundle`]), one read of each input:
//! 1. Check the manifest fields and the file list against the kind's layout; stat each input.
//! 2. Reserve room at the start of a temp file beside the output for the manifest entry. Its
//!    length is known before any digest is: a sha256 is always 64 hex digits, and the sizes come
//!    from the stat.
//! 3. Stream every input, sorted by bundle path, as a tar entry into a multithreaded zstd frame
//!    written after the reserved room, hashing each input on the way.
//! 4. Write the manifest, now with its digests, into the reserved room as an uncompressed
//!    (raw-block) zstd frame, whose length is exact. zstd frames concatenate, so the file
//!    decompresses to one tar with the manifest first.
//! 5. Hash the finished bundle (for catalog entries), and rename it into place.
//!
//! Headers have fixed owners, modes and times, zstd's multithreaded output does not depend on
//! the number of workers, and entries are sorted, so the same inputs give the same bytes.
//!
//! Unpacking ([`unpack_bundle`]):
//! 1. Read the first entry, which must be the manifest, and validate it.
//! 2. Stream each further entry into a hidden staging directory inside the output directory,
//!    refusing anything the manifest does not list, any entry twice, any path that is absolute
//!    or has `..`, and links, devices and FIFOs; hash (on a second thread, overlapping the
//!    decompression) and count as it is written, so a wrong byte or size is caught before the
//!    next entry starts. All-zero 4 KiB blocks become holes, so a mostly-empty ext4 image
//!    stays sparse on disk.
//! 3. Require every listed file, and nothing but zeros after the tar's end (which also makes
//!    the zstd decoder check the last frame is complete).
//! 4. Rename the top-level entries out of staging. On any failure, cancellation or panic, a
//!    guard removes the staging directory, anything already renamed, and the output directory
//!    if this call created it.
//!
//! Both directions are blocking (run them with `spawn_blocking`), check a cancellation token
//! between 1 MiB chunks, and report progress in bytes of file data.
//!
//! Known weaknesses:
//! - The manifest frame is stored uncompressed: a kernel with thousands of modules carries a
//!   few hundred KiB of hex digests that would compress to about half.
//! - Holes in inputs are not read (`SEEK_DATA`) but still hashed and compressed as zeros:
//!   the tar inside has no sparse entries.
//! - The tar reader holds GNU long names and PAX headers in memory; a hostile bundle could make
//!   them large. Bundles come from sha256-pinned catalog entries or the user's own builds.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::sparse::SparseReadError;
use tokio_util::sync::CancellationToken;

/// The manifest `format` this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The first entry of every bundle.
pub const MANIFEST_NAME: &str = "manifest.json";
/// The one file of an image bundle.
pub const ROOTFS_NAME: &str = "rootfs.ext4";
/// The kernel of a kernel bundle (an ELF vmlinux).
pub const VMLINUX_NAME: &str = "vmlinux";
/// A kernel bundle's optional initramfs.
pub const INITRD_NAME: &str = "initrd";
/// A kernel bundle's optional module tree, as `modules/<path>`.
pub const MODULES_DIR: &str = "modules";

/// A manifest larger than this is not a manifest; refuse it rather than hold it in memory.
const MAX_MANIFEST_SIZE: u64 = 16 * 1024 * 1024;
/// Unit of reads, writes, hashing, progress and cancellation checks.
const CHUNK_SIZE: usize = 1024 * 1024;
/// Holes are made at this granularity (the ext4 and page size).
const SPARSE_BLOCK: usize = 4096;
/// zstd level of bundle data. Measured on a 1 GiB ext4 image holding 200 MiB of binaries
/// (docs/decisions.md): level 1 is 15% larger, level 9 14% smaller at 2.3 times the time.
const ZSTD_LEVEL: i32 = 3;
/// Most zstd workers used; more adds memory for little on the machines banger targets.
const MAX_ZSTD_WORKERS: u32 = 8;
/// Bundles may use windows up to zstd's largest (`--long=31`); the decoder only allocates what
/// a frame asks for.
const ZSTD_WINDOW_LOG_MAX: u32 = 31;
const TAR_BLOCK: u64 = 512;

/// Errors of writing, reading and unpacking bundles. Each names the bundle, and the entry or
/// input file where there is one.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot write bundle {}: {reason}", out.display())]
    InvalidInput { out: PathBuf, reason: String },

    #[error("cannot read {} to pack it into bundle {}", path.display(), out.display())]
    ReadInput {
        out: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{} changed while it was packed into bundle {} ({detail}); nothing was written, try \
         again once nothing modifies it",
        path.display(),
        out.display()
    )]
    InputChanged {
        out: PathBuf,
        path: PathBuf,
        detail: String,
    },

    #[error("cannot write bundle {}", out.display())]
    WriteBundle {
        out: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot read bundle {}{}; the file is damaged or incomplete (fetch or build \
         it again)",
        bundle.display(),
        entry_suffix(entry)
    )]
    ReadBundle {
        bundle: PathBuf,
        entry: Option<String>,
        #[source]
        source: io::Error,
    },

    #[error("{} is not a banger bundle: {reason}", bundle.display())]
    NotABundle { bundle: PathBuf, reason: String },

    #[error("the manifest of bundle {} is not valid: {reason}", bundle.display())]
    InvalidManifest { bundle: PathBuf, reason: String },

    #[error("bundle {}: entry `{entry}` is refused: {reason}; nothing was unpacked", bundle.display())]
    EntryRefused {
        bundle: PathBuf,
        entry: String,
        reason: String,
    },

    #[error(
        "bundle {}: entry `{entry}` does not match the manifest: {reason}; nothing was unpacked \
         (the bundle is damaged or was altered)",
        bundle.display()
    )]
    EntryMismatch {
        bundle: PathBuf,
        entry: String,
        reason: String,
    },

    #[error(
        "bundle {}: the manifest lists `{entry}`, but the bundle has no such entry; nothing was \
         unpacked",
        bundle.display()
    )]
    EntryMissing { bundle: PathBuf, entry: String },

    #[error("cannot unpack bundle {} into {}: {reason}", bundle.display(), out_dir.display())]
    UnpackTarget {
        bundle: PathBuf,
        out_dir: PathBuf,
        reason: String,
    },

    #[error(
        "cannot write entry `{entry}` of bundle {} to {}",
        bundle.display(),
        path.display()
    )]
    WriteEntry {
        bundle: PathBuf,
        entry: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot list the kernel directory {}: {reason}", dir.display())]
    KernelLayout { dir: PathBuf, reason: String },

    #[error("work on bundle {} was cancelled; nothing was kept", bundle.display())]
    Cancelled { bundle: PathBuf },
}

impl crate::error::Classify for BundleError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            // What was given is wrong: the output path, or a bundle that is not one or was
            // altered.
            BundleError::InvalidInput { .. }
            | BundleError::NotABundle { .. }
            | BundleError::InvalidManifest { .. }
            | BundleError::EntryRefused { .. }
            | BundleError::EntryMismatch { .. }
            | BundleError::EntryMissing { .. } => ErrorClass::User,
            BundleError::Cancelled { .. } => ErrorClass::Interrupted,
            _ => ErrorClass::Environment,
        }
    }
}

fn entry_suffix(entry: &Option<String>) -> String {
    entry
        .as_ref()
        .map(|entry| format!(" at entry `{entry}`"))
        .unwrap_or_default()
}

/// What a bundle carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleKind {
    /// A root file system: exactly `rootfs.ext4`.
    Image,
    /// A kernel: `vmlinux`, optionally `initrd` and `modules/…`.
    Kernel,
}

impl std::fmt::Display for BundleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BundleKind::Image => "image",
            BundleKind::Kernel => "kernel",
        })
    }
}

/// The digest and size of one file in a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Lowercase hex sha256 of the file's bytes (64 digits, no `sha256:` prefix).
    pub sha256: String,
    pub size: u64,
}

/// `manifest.json`: what a bundle is and the digest of every file in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    /// Always [`FORMAT_VERSION`]; a reader refuses formats it does not know.
    pub format: u32,
    pub name: String,
    pub kind: BundleKind,
    /// The distribution an image was built from (`debian`); required for images, optional for
    /// kernels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distro: Option<String>,
    /// The guest architecture, as catalogs spell it (`x86_64`).
    pub arch: String,
    /// Images only: the catalog name of the kernel the image is meant to boot with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_ref: Option<String>,
    /// Every file in the bundle but the manifest, by bundle path (`/`-separated, relative).
    pub files: BTreeMap<String, FileDigest>,
}

impl BundleManifest {
    /// The manifest of an image bundle, before its files are known.
    pub fn image(name: &str, distro: &str, arch: &str, kernel_ref: &str) -> BundleManifest {
        BundleManifest {
            format: FORMAT_VERSION,
            name: name.to_owned(),
            kind: BundleKind::Image,
            distro: Some(distro.to_owned()),
            arch: arch.to_owned(),
            kernel_ref: Some(kernel_ref.to_owned()),
            files: BTreeMap::new(),
        }
    }

    /// The manifest of a kernel bundle, before its files are known.
    pub fn kernel(name: &str, arch: &str) -> BundleManifest {
        BundleManifest {
            format: FORMAT_VERSION,
            name: name.to_owned(),
            kind: BundleKind::Kernel,
            distro: None,
            arch: arch.to_owned(),
            kernel_ref: None,
            files: BTreeMap::new(),
        }
    }

    /// Parses and validates `manifest.json` bytes.
    pub fn from_json(bytes: &[u8]) -> Result<BundleManifest, String> {
        let manifest: BundleManifest =
            serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The canonical `manifest.json` bytes: pretty JSON, fields in declaration order, files
    /// sorted, a final newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        bytes.push(b'\n');
        bytes
    }

    /// Checks everything a reader relies on: the format version, the fields the kind needs,
    /// the file layout of the kind, and the form of every path and digest.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_fields()?;
        for (path, digest) in &self.files {
            validate_bundle_path(path).map_err(|reason| format!("file `{path}`: {reason}"))?;
            if !crate::store::is_sha256_hex(&digest.sha256) {
                return Err(format!(
                    "file `{path}`: sha256 `{}` is not 64 lowercase hex digits",
                    digest.sha256
                ));
            }
        }
        validate_layout(self.kind, self.files.keys().map(String::as_str))
    }

    /// The total size of the files.
    pub fn total_size(&self) -> u64 {
        self.files.values().map(|file| file.size).sum()
    }

    /// Every field but `files`.
    fn validate_fields(&self) -> Result<(), String> {
        if self.format != FORMAT_VERSION {
            return Err(format!(
                "format {} is not one this banger reads (it reads format {FORMAT_VERSION}); a \
                 newer banger may read it",
                self.format
            ));
        }
        let required = |field: &str, value: &str| {
            if value.trim().is_empty() || value.chars().any(char::is_control) {
                Err(format!("`{field}` must be a non-empty single line"))
            } else {
                Ok(())
            }
        };
        required("name", &self.name)?;
        required("arch", &self.arch)?;
        if let Some(distro) = &self.distro {
            required("distro", distro)?;
        }
        if let Some(kernel_ref) = &self.kernel_ref {
            required("kernel_ref", kernel_ref)?;
        }
        match self.kind {
            BundleKind::Image if self.distro.is_none() => {
                Err("an image bundle needs `distro`".to_owned())
            }
            BundleKind::Image if self.kernel_ref.is_none() => {
                Err("an image bundle needs `kernel_ref`".to_owned())
            }
            BundleKind::Kernel if self.kernel_ref.is_some() => {
                Err("a kernel bundle has no `kernel_ref`".to_owned())
            }
            _ => Ok(()),
        }
    }
}

/// Which files a bundle of `kind` may and must hold.
fn validate_layout<'a>(
    kind: BundleKind,
    paths: impl Iterator<Item = &'a str> + Clone,
) -> Result<(), String> {
    match kind {
        BundleKind::Image => {
            for path in paths.clone() {
                if path != ROOTFS_NAME {
                    return Err(format!(
                        "an image bundle holds only `{ROOTFS_NAME}`, not `{path}`"
                    ));
                }
            }
            if paths.count() == 0 {
                return Err(format!("an image bundle needs `{ROOTFS_NAME}`"));
            }
        }
        BundleKind::Kernel => {
            let mut has_vmlinux = false;
            for path in paths {
                match path {
                    VMLINUX_NAME => has_vmlinux = true,
                    INITRD_NAME => {}
                    _ if is_under_modules(path) => {}
                    _ => {
                        return Err(format!(
                            "a kernel bundle holds `{VMLINUX_NAME}`, `{INITRD_NAME}` and \
                             `{MODULES_DIR}/…`, not `{path}`"
                        ));
                    }
                }
            }
            if !has_vmlinux {
                return Err(format!("a kernel bundle needs `{VMLINUX_NAME}`"));
            }
        }
    }
    Ok(())
}

fn is_under_modules(path: &str) -> bool {
    path.strip_prefix(MODULES_DIR)
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|rest| !rest.is_empty())
}

/// A bundle path: relative, `/`-separated, no empty, `.` or `..` components, not the
/// manifest's name.
fn validate_bundle_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("the path is empty");
    }
    if path.starts_with('/') {
        return Err("the path is absolute");
    }
    if path.len() > 4096 {
        return Err("the path is longer than 4096 bytes");
    }
    if path.contains('\0') {
        return Err("the path contains a NUL byte");
    }
    for component in path.split('/') {
        match component {
            "" => return Err("the path has an empty component (`//` or a trailing `/`)"),
            "." => return Err("the path has a `.` component"),
            ".." => return Err("the path has a `..` component, which could leave the bundle"),
            _ => {}
        }
    }
    if path == MANIFEST_NAME {
        return Err("`manifest.json` is the manifest itself");
    }
    Ok(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

/// A bundle written by [`write_bundle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenBundle {
    /// The manifest as written, with every file's digest.
    pub manifest: BundleManifest,
    /// Lowercase hex sha256 of the bundle file, for a catalog entry.
    pub sha256: String,
    /// Size in bytes of the bundle file.
    pub size: u64,
}

/// Writes a bundle of `files` (bundle path, host path) to `out`.
///
/// `manifest` gives every field but `files`, which must be empty: the written manifest lists
/// exactly `files`, each hashed while it is packed, and is returned with the bundle's own
/// digest. Each input is read once, streamed, never held in memory. The bundle is written to a
/// temp file beside `out` and renamed into place only when complete (replacing an existing
/// `out`); an error or cancellation leaves nothing. `progress(done, total)` counts input bytes
/// packed.
pub fn write_bundle(
    manifest: &BundleManifest,
    files: &[(String, PathBuf)],
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
    cancel: &CancellationToken,
) -> Result<WrittenBundle, BundleError> {
    let invalid = |reason: String| BundleError::InvalidInput {
        out: out.to_owned(),
        reason,
    };
    let write_error = |source| BundleError::WriteBundle {
        out: out.to_owned(),
        source,
    };
    if !manifest.files.is_empty() {
        return Err(invalid(
            "the manifest's `files` must be empty: write_bundle fills it in from the files it \
             packs"
                .to_owned(),
        ));
    }
    manifest
        .validate_fields()
        .map_err(|reason| invalid(format!("the manifest is not valid: {reason}")))?;

    // Inputs sorted by bundle path, so the entry order does not depend on the caller's.
    let mut inputs: BTreeMap<&str, (&Path, u64)> = BTreeMap::new();
    for (bundle_path, host_path) in files {
        validate_bundle_path(bundle_path)
            .map_err(|reason| invalid(format!("bundle path `{bundle_path}`: {reason}")))?;
        let metadata = fs::metadata(host_path).map_err(|source| BundleError::ReadInput {
            out: out.to_owned(),
            path: host_path.clone(),
            source,
        })?;
        if !metadata.is_file() {
            return Err(invalid(format!(
                "{} (for `{bundle_path}`) is not a regular file",
                host_path.display()
            )));
        }
        if inputs
            .insert(bundle_path, (host_path, metadata.len()))
            .is_some()
        {
            return Err(invalid(format!(
                "bundle path `{bundle_path}` is given twice"
            )));
        }
    }
    validate_layout(manifest.kind, inputs.keys().copied())
        .map_err(|reason| invalid(format!("the files do not fit the kind: {reason}")))?;

    // The manifest with placeholder digests has the final manifest's exact length.
    let mut written = manifest.clone();
    for (bundle_path, (_, size)) in &inputs {
        written.files.insert(
            (*bundle_path).to_owned(),
            FileDigest {
                sha256: "0".repeat(64),
                size: *size,
            },
        );
    }
    let reserved = raw_frame_len(manifest_entry(&written).len());

    let directory = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let partial = tempfile::Builder::new()
        .prefix(".banger-bundle-")
        .suffix(".partial")
        .tempfile_in(directory)
        .map_err(write_error)?;
    let mut file = partial.as_file().try_clone().map_err(write_error)?;
    // The data frame starts after the room reserved for the manifest frame.
    io::Seek::seek(&mut file, io::SeekFrom::Start(reserved as u64)).map_err(write_error)?;
    let sink = BufWriter::with_capacity(CHUNK_SIZE, file);
    let mut encoder = data_encoder(sink, zstd_workers()).map_err(write_error)?;

    let total: u64 = inputs.values().map(|(_, size)| size).sum();
    let mut done = 0u64;
    progress(0, total);
    for (bundle_path, (host_path, size)) in &inputs {
        let read_error = |source| BundleError::ReadInput {
            out: out.to_owned(),
            path: host_path.to_path_buf(),
            source,
        };
        let changed = |detail: String| BundleError::InputChanged {
            out: out.to_owned(),
            path: host_path.to_path_buf(),
            detail,
        };
        let input = File::open(host_path).map_err(read_error)?;
        write_entry_header(&mut encoder, bundle_path, *size).map_err(write_error)?;
        let mut hasher = Sha256::new();
        let mut remaining = *size;
        // Holes are handed over as zeros without reading them (`sparse`): reading a hole
        // costs a zeroed page-cache page, most of the time of a mostly-empty image.
        let fed = crate::sparse::read_sparse(&input, |chunk| {
            if cancel.is_cancelled() {
                return Err(BundleError::Cancelled {
                    bundle: out.to_owned(),
                });
            }
            let chunk = chunk.bytes;
            if chunk.len() as u64 > remaining {
                return Err(changed(format!(
                    "it grew beyond the {size} bytes it had when packing began"
                )));
            }
            hasher.update(chunk);
            encoder.write_all(chunk).map_err(write_error)?;
            remaining -= chunk.len() as u64;
            done += chunk.len() as u64;
            progress(done, total);
            Ok(())
        });
        let shrank = || {
            changed(format!(
                "it shrank below the {size} bytes it had when packing began"
            ))
        };
        match fed {
            Ok(_) if remaining == 0 => {}
            Ok(_) => return Err(shrank()),
            Err(SparseReadError::Consumer(error)) => return Err(error),
            Err(SparseReadError::Read(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(shrank());
            }
            Err(SparseReadError::Read(error)) => return Err(read_error(error)),
        }
        write_padding(&mut encoder, *size).map_err(write_error)?;
        written
            .files
            .get_mut(*bundle_path)
            .expect("every input has a manifest entry")
            .sha256 = hex(&hasher.finalize());
    }
    // The end of the archive: two zero blocks.
    encoder
        .write_all(&[0u8; 2 * TAR_BLOCK as usize])
        .map_err(write_error)?;
    let sink = encoder.finish().map_err(write_error)?;
    let file = sink
        .into_inner()
        .map_err(|error| write_error(error.into_error()))?;

    let manifest_frame = raw_frame(&manifest_entry(&written));
    debug_assert_eq!(manifest_frame.len(), reserved);
    file.write_all_at(&manifest_frame, 0).map_err(write_error)?;
    drop(file);

    let (sha256, size) = hash_file(partial.path()).map_err(write_error)?;
    // Temp files are private; a bundle is for sharing.
    fs::set_permissions(partial.path(), fs::Permissions::from_mode(0o644)).map_err(write_error)?;
    partial
        .persist(out)
        .map_err(|error| write_error(error.error))?;
    Ok(WrittenBundle {
        manifest: written,
        sha256,
        size,
    })
}

fn zstd_workers() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(1))
        .unwrap_or(1)
        .clamp(1, MAX_ZSTD_WORKERS)
}

/// The encoder of the data frame. At least one worker always: zstd's multithreaded output
/// is the same for any number of workers, but differs from its single-threaded mode.
fn data_encoder<W: Write>(
    sink: W,
    workers: u32,
) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut encoder = zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL)?;
    encoder.multithread(workers.max(1))?;
    encoder.include_checksum(true)?;
    Ok(encoder)
}

/// A GNU tar header with fixed owner, mode and time, naming at most the first 100 bytes of
/// `path` (a longer path goes in a preceding long-name entry).
fn tar_header(path: &str, size: u64, entry_type: tar::EntryType) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    {
        let name = &mut header.as_gnu_mut().expect("a GNU header").name;
        let length = path.len().min(name.len());
        name[..length].copy_from_slice(&path.as_bytes()[..length]);
    }
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(entry_type);
    header.set_cksum();
    header
}

/// Writes the header(s) of a regular file entry: a GNU long-name entry first when the path
/// does not fit the 100-byte name field.
fn write_entry_header(out: &mut impl Write, path: &str, size: u64) -> io::Result<()> {
    if path.len() > 100 {
        let name_length = path.len() as u64 + 1;
        let long_name = tar_header("././@LongLink", name_length, tar::EntryType::GNULongName);
        out.write_all(long_name.as_bytes())?;
        out.write_all(path.as_bytes())?;
        out.write_all(&[0])?;
        write_padding(out, name_length)?;
    }
    out.write_all(tar_header(path, size, tar::EntryType::Regular).as_bytes())
}

/// Zeros up to the next 512-byte boundary after `size` bytes of data.
fn write_padding(out: &mut impl Write, size: u64) -> io::Result<()> {
    let remainder = size % TAR_BLOCK;
    if remainder == 0 {
        return Ok(());
    }
    out.write_all(&[0u8; TAR_BLOCK as usize][..(TAR_BLOCK - remainder) as usize])
}

/// The tar bytes of the manifest entry: header, JSON, padding.
fn manifest_entry(manifest: &BundleManifest) -> Vec<u8> {
    let json = manifest.to_json();
    let mut entry = Vec::with_capacity(json.len() + 2 * TAR_BLOCK as usize);
    write_entry_header(&mut entry, MANIFEST_NAME, json.len() as u64)
        .expect("writing to memory cannot fail");
    entry.extend_from_slice(&json);
    write_padding(&mut entry, json.len() as u64).expect("writing to memory cannot fail");
    entry
}

const ZSTD_MAGIC: u32 = 0xFD2F_B528;
const ZSTD_MAX_BLOCK: usize = 128 * 1024;

/// The length of [`raw_frame`] for `content_len` bytes.
fn raw_frame_len(content_len: usize) -> usize {
    let blocks = content_len.div_ceil(ZSTD_MAX_BLOCK).max(1);
    4 + 1 + 8 + 3 * blocks + content_len
}

/// A zstd frame (RFC 8878) holding `content` in raw, uncompressed blocks: its length depends
/// only on the content's length. Single segment with an 8-byte content size, so no window
/// descriptor; no checksum (the tar header checksum and the manifest's own validation cover
/// it).
fn raw_frame(content: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(raw_frame_len(content.len()));
    frame.extend_from_slice(&ZSTD_MAGIC.to_le_bytes());
    // Frame header descriptor: content-size flag 3 (8 bytes), single segment, no checksum, no
    // dictionary.
    frame.push(0b1110_0000);
    frame.extend_from_slice(&(content.len() as u64).to_le_bytes());
    let chunks: Vec<&[u8]> = if content.is_empty() {
        vec![&[]]
    } else {
        content.chunks(ZSTD_MAX_BLOCK).collect()
    };
    let last_index = chunks.len() - 1;
    for (index, chunk) in chunks.into_iter().enumerate() {
        // Block header: bit 0 last block, bits 1-2 type (0 = raw), bits 3-23 size.
        let header = ((chunk.len() as u32) << 3) | u32::from(index == last_index);
        frame.extend_from_slice(&header.to_le_bytes()[..3]);
        frame.extend_from_slice(chunk);
    }
    frame
}

fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK_SIZE];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

/// The distribution of the image `rootfs` (`ID` of its `/etc/os-release`, else
/// `/usr/lib/os-release`, read with banger's ext4 reader), or `unknown`.
pub fn image_distro(rootfs: &Path) -> String {
    let read = |path: &str| -> Option<String> {
        let reader = crate::ext4::reader::Ext4Reader::open(rootfs).ok()?;
        let mut current = std::path::PathBuf::from(path);
        // os-release is usually a symlink (`../usr/lib/os-release`); follow a few.
        for _ in 0..8 {
            let inode = reader.lookup(&current).ok()??;
            let info = reader.inode(inode).ok()?;
            if info.kind == crate::ext4::reader::FileKind::Symlink {
                let target = reader.symlink_target(inode).ok()?;
                let target = std::path::PathBuf::from(String::from_utf8_lossy(&target).as_ref());
                let joined = if target.is_absolute() {
                    target
                } else {
                    current.parent()?.join(target)
                };
                // Lexically: `/etc/../usr/lib/os-release` is `/usr/lib/os-release`.
                let mut normal = std::path::PathBuf::from("/");
                for component in joined.components() {
                    match component {
                        std::path::Component::ParentDir => {
                            normal.pop();
                        }
                        std::path::Component::Normal(name) => normal.push(name),
                        _ => {}
                    }
                }
                current = normal;
                continue;
            }
            let mut text = String::new();
            reader
                .open_file(inode)
                .ok()?
                .take(1 << 16)
                .read_to_string(&mut text)
                .ok()?;
            return Some(text);
        }
        None
    };
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|path| read(path).and_then(|text| os_release_id(&text)))
        .unwrap_or_else(|| "unknown".into())
}

/// `ID` of an `os-release` text.
fn os_release_id(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("ID="))
        .map(|id| id.trim().trim_matches('"').to_owned())
        .filter(|id| !id.is_empty())
}

/// The files of a kernel directory laid out as a kernel bundle wants it: `vmlinux`, and
/// `initrd` and every regular file under `modules/` when present, as (bundle path, host path)
/// pairs for [`write_bundle`]. Anything else in the directory, and any symlink or special file
/// under `modules/`, is an error rather than silently left out.
pub fn kernel_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, BundleError> {
    let layout_error = |reason: String| BundleError::KernelLayout {
        dir: dir.to_owned(),
        reason,
    };
    let entries = fs::read_dir(dir).map_err(|error| layout_error(error.to_string()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| layout_error(error.to_string()))?;
        let name = entry.file_name();
        let file_type = entry
            .file_type()
            .map_err(|error| layout_error(error.to_string()))?;
        match name.to_str() {
            Some(VMLINUX_NAME | INITRD_NAME) if file_type.is_file() => {
                files.push((name.to_string_lossy().into_owned(), entry.path()));
            }
            Some(MODULES_DIR) if file_type.is_dir() => {
                collect_tree(&entry.path(), MODULES_DIR, &mut files).map_err(layout_error)?;
            }
            _ => {
                return Err(layout_error(format!(
                    "`{}` is not part of a kernel layout (a regular `{VMLINUX_NAME}`, \
                     optionally a regular `{INITRD_NAME}` and a `{MODULES_DIR}` directory)",
                    name.to_string_lossy()
                )));
            }
        }
    }
    if !files.iter().any(|(path, _)| path == VMLINUX_NAME) {
        return Err(layout_error(format!("there is no `{VMLINUX_NAME}`")));
    }
    files.sort();
    Ok(files)
}

fn collect_tree(
    dir: &Path,
    prefix: &str,
    files: &mut Vec<(String, PathBuf)>,
) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|error| format!("{}: {error}", dir.display()))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| format!("{} is not a UTF-8 name", path.display()))?;
        let bundle_path = format!("{prefix}/{name}");
        let file_type = entry
            .file_type()
            .map_err(|error| format!("{}: {error}", path.display()))?;
        if file_type.is_dir() {
            collect_tree(&path, &bundle_path, files)?;
        } else if file_type.is_file() {
            files.push((bundle_path, path));
        } else {
            return Err(format!(
                "{} is a symlink or special file; bundles hold only regular files",
                path.display()
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reading

/// A bundle's tar stream: zstd-decoded, with extension entries capped.
type BundleStream =
    crate::limits::TarExtensionCap<zstd::stream::read::Decoder<'static, io::BufReader<File>>>;

type BundleEntries<'a> = tar::Entries<'a, BundleStream>;

fn open_archive(bundle: &Path) -> Result<tar::Archive<BundleStream>, BundleError> {
    let read_error = |source| BundleError::ReadBundle {
        bundle: bundle.to_owned(),
        entry: None,
        source,
    };
    let file = File::open(bundle).map_err(read_error)?;
    let mut decoder =
        zstd::stream::read::Decoder::with_buffer(io::BufReader::with_capacity(CHUNK_SIZE, file))
            .map_err(read_error)?;
    decoder
        .window_log_max(ZSTD_WINDOW_LOG_MAX)
        .map_err(read_error)?;
    Ok(tar::Archive::new(crate::limits::TarExtensionCap::new(
        decoder,
        crate::limits::TAR_EXTENSION_BYTES,
    )))
}

/// Reads and validates only the manifest of `bundle` (its first entry); cheap whatever the
/// bundle's size.
pub fn read_manifest(bundle: &Path) -> Result<BundleManifest, BundleError> {
    let mut archive = open_archive(bundle)?;
    let mut entries = archive
        .entries()
        .map_err(|source| BundleError::ReadBundle {
            bundle: bundle.to_owned(),
            entry: None,
            source,
        })?;
    read_manifest_entry(bundle, &mut entries)
}

fn read_manifest_entry(
    bundle: &Path,
    entries: &mut BundleEntries<'_>,
) -> Result<BundleManifest, BundleError> {
    let not_a_bundle = |reason: String| BundleError::NotABundle {
        bundle: bundle.to_owned(),
        reason,
    };
    let read_error = |source| BundleError::ReadBundle {
        bundle: bundle.to_owned(),
        entry: Some(MANIFEST_NAME.to_owned()),
        source,
    };
    let Some(entry) = entries.next() else {
        return Err(not_a_bundle("it is an empty archive".to_owned()));
    };
    let mut entry = entry.map_err(|source| BundleError::ReadBundle {
        bundle: bundle.to_owned(),
        entry: None,
        source,
    })?;
    let name = normalize_entry_name(&entry.path_bytes());
    if name.as_deref() != Some(MANIFEST_NAME) || !is_regular(entry.header().entry_type()) {
        return Err(not_a_bundle(format!(
            "its first entry is `{}`, not the regular file `{MANIFEST_NAME}`",
            String::from_utf8_lossy(&entry.path_bytes())
        )));
    }
    if entry.size() > MAX_MANIFEST_SIZE {
        return Err(not_a_bundle(format!(
            "its `{MANIFEST_NAME}` has {} bytes, more than a manifest can need",
            entry.size()
        )));
    }
    let mut json = Vec::new();
    (&mut entry)
        .take(MAX_MANIFEST_SIZE)
        .read_to_end(&mut json)
        .map_err(read_error)?;
    BundleManifest::from_json(&json).map_err(|reason| BundleError::InvalidManifest {
        bundle: bundle.to_owned(),
        reason,
    })
}

fn is_regular(entry_type: tar::EntryType) -> bool {
    matches!(
        entry_type,
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse
    )
}

/// An entry's name as a bundle path: UTF-8, one leading `./` and a trailing `/` (directories)
/// dropped. `None` for a name that is not UTF-8.
fn normalize_entry_name(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let text = text.strip_prefix("./").unwrap_or(text);
    let text = text.strip_suffix('/').unwrap_or(text);
    Some(text.to_owned())
}

/// Unpacks `bundle` into `out_dir` (created if missing; its parent must exist) and returns its
/// manifest.
///
/// Every file is checked against the manifest while it streams; anything the manifest does not
/// list, any path leaving the directory, links, devices, duplicates and missing files are
/// errors. Top-level names the bundle would create must not exist in `out_dir`. On any error or
/// cancellation, everything this call wrote is removed. `progress(done, total)` counts file
/// bytes written.
pub fn unpack_bundle(
    bundle: &Path,
    out_dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
    cancel: &CancellationToken,
) -> Result<BundleManifest, BundleError> {
    let read_error = |source| BundleError::ReadBundle {
        bundle: bundle.to_owned(),
        entry: None,
        source,
    };
    let mut archive = open_archive(bundle)?;
    let mut entries = archive.entries().map_err(read_error)?;
    let manifest = read_manifest_entry(bundle, &mut entries)?;
    let target = UnpackTarget::prepare(bundle, out_dir, &manifest)?;
    let total = manifest.total_size();
    let mut done = 0u64;
    progress(0, total);
    // Decompressing and hashing each take about half the time of an unpack; a second
    // thread hashes while this one decompresses and writes.
    let seen = std::thread::scope(|scope| {
        let mut hasher = ParallelHasher::spawn(scope);
        unpack_entries(
            bundle,
            entries,
            &manifest,
            &target,
            &mut hasher,
            cancel,
            &mut |written| {
                done += written;
                progress(done, total);
            },
        )
    })?;
    if let Some(missing) = manifest.files.keys().find(|path| !seen.contains(*path)) {
        return Err(BundleError::EntryMissing {
            bundle: bundle.to_owned(),
            entry: missing.clone(),
        });
    }
    // Reading to the end makes the decoder check that the last frame is complete (and its
    // checksum); only the archive's zero padding may follow its end.
    let mut rest = archive.into_inner();
    let mut buffer = vec![0u8; CHUNK_SIZE];
    loop {
        let read = rest.read(&mut buffer).map_err(read_error)?;
        if read == 0 {
            break;
        }
        if !is_zero(&buffer[..read]) {
            return Err(BundleError::NotABundle {
                bundle: bundle.to_owned(),
                reason: "it has data after the end of its archive".to_owned(),
            });
        }
    }
    target.commit()?;
    Ok(manifest)
}

/// Unpacks every entry after the manifest into `target`; returns the files seen.
fn unpack_entries(
    bundle: &Path,
    entries: BundleEntries<'_>,
    manifest: &BundleManifest,
    target: &UnpackTarget<'_>,
    hasher: &mut ParallelHasher,
    cancel: &CancellationToken,
    progress: &mut dyn FnMut(u64),
) -> Result<BTreeSet<String>, BundleError> {
    let read_error = |source| BundleError::ReadBundle {
        bundle: bundle.to_owned(),
        entry: None,
        source,
    };
    let refused = |entry: &[u8], reason: &str| BundleError::EntryRefused {
        bundle: bundle.to_owned(),
        entry: String::from_utf8_lossy(entry).into_owned(),
        reason: reason.to_owned(),
    };
    let directories = implied_directories(manifest);
    let mut seen = BTreeSet::new();
    for entry in entries {
        let mut entry = entry.map_err(read_error)?;
        let raw_name = entry.path_bytes().into_owned();
        let Some(name) = normalize_entry_name(&raw_name) else {
            return Err(refused(&raw_name, "its name is not UTF-8"));
        };
        let entry_type = entry.header().entry_type();
        if entry_type.is_dir() {
            // Directories come from the files' paths; a hand-made tar may list them too.
            if name.is_empty() || directories.contains(name.as_str()) {
                continue;
            }
            return Err(refused(
                &raw_name,
                "it is a directory that holds no file the manifest lists",
            ));
        }
        if entry_type.is_symlink() || entry_type.is_hard_link() {
            return Err(refused(&raw_name, "links are not allowed in bundles"));
        }
        if entry_type.is_character_special()
            || entry_type.is_block_special()
            || entry_type.is_fifo()
        {
            return Err(refused(
                &raw_name,
                "devices and FIFOs are not allowed in bundles",
            ));
        }
        if !is_regular(entry_type) {
            return Err(refused(
                &raw_name,
                "bundles hold only regular files (and the directories they imply)",
            ));
        }
        validate_bundle_path(&name).map_err(|reason| refused(&raw_name, reason))?;
        let Some(expected) = manifest.files.get(&name) else {
            return Err(refused(&raw_name, "the manifest does not list it"));
        };
        if !seen.insert(name.clone()) {
            return Err(refused(&raw_name, "it appears twice"));
        }
        target.write_file(&name, &mut entry, expected, hasher, cancel, progress)?;
    }
    Ok(seen)
}

/// Every proper ancestor directory of the manifest's files.
fn implied_directories(manifest: &BundleManifest) -> BTreeSet<&str> {
    let mut directories = BTreeSet::new();
    for path in manifest.files.keys() {
        let mut rest = path.as_str();
        while let Some((parent, _)) = rest.rsplit_once('/') {
            directories.insert(parent);
            rest = parent;
        }
    }
    directories
}

fn top_level_names(manifest: &BundleManifest) -> BTreeSet<&str> {
    manifest
        .files
        .keys()
        .map(|path| path.split('/').next().unwrap_or(path))
        .collect()
}

fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(16);
    words.all(|word| u128::from_ne_bytes(word.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|byte| *byte == 0)
}

/// Where an unpack writes: a staging directory inside the output directory, renamed out of
/// it at the end. Dropped without [`UnpackTarget::commit`], it removes everything it made.
struct UnpackTarget<'a> {
    bundle: &'a Path,
    out_dir: PathBuf,
    top_level: Vec<String>,
    staging: Option<tempfile::TempDir>,
    created_out_dir: bool,
    moved: Vec<PathBuf>,
    committed: bool,
}

impl<'a> UnpackTarget<'a> {
    fn prepare(
        bundle: &'a Path,
        out_dir: &Path,
        manifest: &BundleManifest,
    ) -> Result<UnpackTarget<'a>, BundleError> {
        let target_error = |reason: String| BundleError::UnpackTarget {
            bundle: bundle.to_owned(),
            out_dir: out_dir.to_owned(),
            reason,
        };
        let mut target = UnpackTarget {
            bundle,
            out_dir: out_dir.to_owned(),
            top_level: top_level_names(manifest)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            staging: None,
            created_out_dir: false,
            moved: Vec::new(),
            committed: false,
        };
        match fs::symlink_metadata(out_dir) {
            Ok(metadata) if metadata.is_dir() => {}
            Ok(_) => return Err(target_error("it exists and is not a directory".to_owned())),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(out_dir).map_err(|error| target_error(error.to_string()))?;
                target.created_out_dir = true;
            }
            Err(error) => return Err(target_error(error.to_string())),
        }
        target.check_free()?;
        target.staging = Some(
            tempfile::Builder::new()
                .prefix(".banger-unpack-")
                .tempdir_in(out_dir)
                .map_err(|error| {
                    target_error(format!("cannot create a staging directory: {error}"))
                })?,
        );
        Ok(target)
    }

    /// Refuses to replace anything already in the output directory.
    fn check_free(&self) -> Result<(), BundleError> {
        for name in &self.top_level {
            let path = self.out_dir.join(name);
            if fs::symlink_metadata(&path).is_ok() {
                return Err(BundleError::UnpackTarget {
                    bundle: self.bundle.to_owned(),
                    out_dir: self.out_dir.clone(),
                    reason: format!(
                        "{} already exists; unpack into an empty directory",
                        path.display()
                    ),
                });
            }
        }
        Ok(())
    }

    fn staging(&self) -> &Path {
        self.staging
            .as_ref()
            .expect("the staging directory lives until commit or drop")
            .path()
    }

    /// Streams one entry into staging, verifying its size and sha256 on the way.
    fn write_file(
        &self,
        name: &str,
        data: &mut impl Read,
        expected: &FileDigest,
        hasher: &mut ParallelHasher,
        cancel: &CancellationToken,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BundleError> {
        let path = self.staging().join(name);
        let write_error = |source| BundleError::WriteEntry {
            bundle: self.bundle.to_owned(),
            entry: name.to_owned(),
            path: path.clone(),
            source,
        };
        let mismatch = |reason: String| BundleError::EntryMismatch {
            bundle: self.bundle.to_owned(),
            entry: name.to_owned(),
            reason,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(write_error)?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(write_error)?;
        let mut offset = 0u64;
        loop {
            if cancel.is_cancelled() {
                return Err(BundleError::Cancelled {
                    bundle: self.bundle.to_owned(),
                });
            }
            let mut buffer = hasher.buffer();
            let read = read_full(data, &mut buffer).map_err(|source| BundleError::ReadBundle {
                bundle: self.bundle.to_owned(),
                entry: Some(name.to_owned()),
                source,
            })?;
            if read == 0 {
                hasher.give_back(buffer);
                break;
            }
            if offset + read as u64 > expected.size {
                return Err(mismatch(format!(
                    "it is larger than the {} bytes the manifest lists",
                    expected.size
                )));
            }
            write_sparse(&file, offset, &buffer[..read]).map_err(write_error)?;
            hasher.hash(buffer, read);
            offset += read as u64;
            progress(read as u64);
        }
        if offset != expected.size {
            return Err(mismatch(format!(
                "it has {offset} bytes, the manifest lists {}",
                expected.size
            )));
        }
        // Trailing zero blocks were skipped, not written.
        file.set_len(offset).map_err(write_error)?;
        let actual = hasher.finish();
        if actual != expected.sha256 {
            return Err(mismatch(format!(
                "its sha256 is {actual}, the manifest lists {}",
                expected.sha256
            )));
        }
        Ok(())
    }

    /// Moves the unpacked tree into the output directory.
    fn commit(mut self) -> Result<(), BundleError> {
        self.check_free()?;
        for name in self.top_level.clone() {
            let from = self.staging().join(&name);
            let to = self.out_dir.join(&name);
            fs::rename(&from, &to).map_err(|error| BundleError::UnpackTarget {
                bundle: self.bundle.to_owned(),
                out_dir: self.out_dir.clone(),
                reason: format!("cannot move {} into place: {error}", to.display()),
            })?;
            self.moved.push(to);
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for UnpackTarget<'_> {
    fn drop(&mut self) {
        // The staging directory goes either way (it is empty after a commit).
        drop(self.staging.take());
        if self.committed {
            return;
        }
        for path in &self.moved {
            let _ = match fs::symlink_metadata(path) {
                Ok(metadata) if metadata.is_dir() => fs::remove_dir_all(path),
                _ => fs::remove_file(path),
            };
        }
        if self.created_out_dir {
            let _ = fs::remove_dir(&self.out_dir);
        }
    }
}

/// Buffers in flight between an unpack and its hashing thread.
const HASH_BUFFERS: usize = 3;

/// A sha256 on its own thread, fed whole buffers: the caller fills one while the thread
/// hashes another. One per unpack, reset after each file.
struct ParallelHasher {
    jobs: mpsc::SyncSender<HashJob>,
    digests: mpsc::Receiver<String>,
    returned: mpsc::Receiver<Vec<u8>>,
    spare: Vec<Vec<u8>>,
}

enum HashJob {
    /// Hash the first `usize` bytes, then hand the buffer back.
    Chunk(Vec<u8>, usize),
    /// Send the digest of everything since the last `Finish`, and start over.
    Finish,
}

impl ParallelHasher {
    /// Starts the hashing thread in `scope`; it ends when the hasher is dropped.
    fn spawn<'scope>(scope: &'scope std::thread::Scope<'scope, '_>) -> ParallelHasher {
        let (jobs, job_queue) = mpsc::sync_channel(HASH_BUFFERS - 1);
        let (digest_sender, digests) = mpsc::sync_channel(1);
        // Room for every buffer, so handing one back never blocks.
        let (returner, returned) = mpsc::sync_channel(HASH_BUFFERS);
        scope.spawn(move || {
            let mut hasher = Sha256::new();
            for job in job_queue {
                let sent = match job {
                    HashJob::Chunk(buffer, length) => {
                        hasher.update(&buffer[..length]);
                        returner.send(buffer).is_ok()
                    }
                    HashJob::Finish => digest_sender.send(hex(&hasher.finalize_reset())).is_ok(),
                };
                if !sent {
                    return;
                }
            }
        });
        ParallelHasher {
            jobs,
            digests,
            returned,
            spare: (0..HASH_BUFFERS).map(|_| vec![0u8; CHUNK_SIZE]).collect(),
        }
    }

    /// A buffer to fill: a spare one, else the next the thread is done with.
    fn buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_else(|| {
            self.returned
                .recv()
                .expect("the hashing thread hands back every buffer while it runs")
        })
    }

    fn give_back(&mut self, buffer: Vec<u8>) {
        self.spare.push(buffer);
    }

    fn hash(&mut self, buffer: Vec<u8>, length: usize) {
        self.jobs
            .send(HashJob::Chunk(buffer, length))
            .expect("the hashing thread runs until the hasher is dropped");
    }

    /// The hex digest of everything hashed since the last call.
    fn finish(&mut self) -> String {
        self.jobs
            .send(HashJob::Finish)
            .expect("the hashing thread runs until the hasher is dropped");
        self.digests
            .recv()
            .expect("the hashing thread answers every Finish")
    }
}

/// Reads until `buffer` is full or the input ends, so that every buffer but the last starts
/// at a multiple of its length in the file (which keeps holes block-aligned).
fn read_full(input: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match input.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Writes `data` at `offset`, skipping all-zero blocks so they stay holes.
fn write_sparse(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut run_start: Option<usize> = None;
    for (index, block) in data.chunks(SPARSE_BLOCK).enumerate() {
        let start = index * SPARSE_BLOCK;
        match (is_zero(block), run_start) {
            (false, None) => run_start = Some(start),
            (true, Some(run)) => {
                file.write_all_at(&data[run..start], offset + run as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(run) = run_start {
        file.write_all_at(&data[run..], offset + run as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_with(kind: BundleKind, paths: &[&str]) -> BundleManifest {
        let mut manifest = match kind {
            BundleKind::Image => BundleManifest::image("test", "debian", "x86_64", "k"),
            BundleKind::Kernel => BundleManifest::kernel("test", "x86_64"),
        };
        for path in paths {
            manifest.files.insert(
                (*path).to_owned(),
                FileDigest {
                    sha256: "a".repeat(64),
                    size: 1,
                },
            );
        }
        manifest
    }

    #[test]
    fn errors_can_become_step_error_sources() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}
        assert_error::<BundleError>();
    }

    #[test]
    fn manifests_round_trip_and_refuse_unknown_fields() {
        let manifest = manifest_with(BundleKind::Image, &["rootfs.ext4"]);
        let json = manifest.to_json();
        assert_eq!(BundleManifest::from_json(&json).unwrap(), manifest);
        let text = String::from_utf8(json).unwrap();
        let extra = text.replacen("\"format\"", "\"colour\": 1,\n  \"format\"", 1);
        let error = BundleManifest::from_json(extra.as_bytes()).unwrap_err();
        assert!(error.contains("colour"), "{error}");
        let newer = text.replacen("\"format\": 1", "\"format\": 2", 1);
        let error = BundleManifest::from_json(newer.as_bytes()).unwrap_err();
        assert!(error.contains("format 2"), "{error}");
    }

    #[test]
    fn layouts_are_checked_per_kind() {
        let ok = |kind, paths: &[&str]| manifest_with(kind, paths).validate();
        assert!(ok(BundleKind::Image, &["rootfs.ext4"]).is_ok());
        assert!(ok(BundleKind::Image, &[]).is_err());
        assert!(ok(BundleKind::Image, &["rootfs.ext4", "vmlinux"]).is_err());
        assert!(ok(BundleKind::Kernel, &["vmlinux"]).is_ok());
        assert!(
            ok(
                BundleKind::Kernel,
                &["vmlinux", "initrd", "modules/6.1/kernel/virtio.ko"]
            )
            .is_ok()
        );
        assert!(ok(BundleKind::Kernel, &["initrd"]).is_err());
        assert!(ok(BundleKind::Kernel, &["vmlinux", "modules"]).is_err());
        assert!(ok(BundleKind::Kernel, &["vmlinux", "modulesx/a"]).is_err());
        assert!(ok(BundleKind::Kernel, &["vmlinux", "modules/../etc/passwd"]).is_err());
        let mut image_without_kernel = manifest_with(BundleKind::Image, &["rootfs.ext4"]);
        image_without_kernel.kernel_ref = None;
        assert!(image_without_kernel.validate().is_err());
        let mut bad_digest = manifest_with(BundleKind::Kernel, &["vmlinux"]);
        bad_digest.files.get_mut("vmlinux").unwrap().sha256 = "A".repeat(64);
        assert!(bad_digest.validate().is_err());
    }

    #[test]
    fn bundle_paths_stay_inside() {
        for bad in [
            "",
            "/etc/passwd",
            "a//b",
            "a/",
            "./a",
            "a/./b",
            "../a",
            "a/../../b",
        ] {
            assert!(validate_bundle_path(bad).is_err(), "{bad:?}");
        }
        for good in ["vmlinux", "modules/6.1/a.ko", "modules/..hidden", "a b"] {
            assert!(validate_bundle_path(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn raw_frames_decode_and_have_the_predicted_length() {
        for length in [
            0,
            1,
            511,
            ZSTD_MAX_BLOCK,
            ZSTD_MAX_BLOCK + 1,
            3 * ZSTD_MAX_BLOCK + 7,
        ] {
            let content: Vec<u8> = (0..length).map(|i| (i * 7 % 251) as u8).collect();
            let frame = raw_frame(&content);
            assert_eq!(frame.len(), raw_frame_len(length), "{length}");
            assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), content);
        }
    }

    #[test]
    fn a_raw_frame_followed_by_a_compressed_one_decodes_as_one_stream() {
        let mut bytes = raw_frame(b"first ");
        bytes.extend(zstd::stream::encode_all(&b"second"[..], 3).unwrap());
        assert_eq!(
            zstd::stream::decode_all(&bytes[..]).unwrap(),
            b"first second"
        );
    }

    #[test]
    fn multithreaded_output_does_not_depend_on_the_worker_count() {
        // Enough data for several zstd jobs.
        let data: Vec<u8> = (0..24 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 & 0x0f)
            .collect();
        let compress = |workers| {
            let mut encoder = data_encoder(Vec::new(), workers).unwrap();
            encoder.write_all(&data).unwrap();
            encoder.finish().unwrap()
        };
        let one = compress(1);
        assert_eq!(compress(2), one);
        assert_eq!(compress(4), one);
        assert_eq!(zstd::stream::decode_all(&one[..]).unwrap(), data);
    }

    #[test]
    fn long_paths_use_gnu_long_names_that_tar_reads_back() {
        let long = format!("modules/{}/x.ko", "d".repeat(120));
        let mut archive = Vec::new();
        write_entry_header(&mut archive, &long, 3).unwrap();
        archive.extend_from_slice(b"abc");
        write_padding(&mut archive, 3).unwrap();
        archive.extend_from_slice(&[0u8; 1024]);
        let mut reader = tar::Archive::new(&archive[..]);
        let mut entries = reader.entries().unwrap();
        let mut entry = entries.next().unwrap().unwrap();
        assert_eq!(&*entry.path_bytes(), long.as_bytes());
        let mut data = String::new();
        entry.read_to_string(&mut data).unwrap();
        assert_eq!(data, "abc");
        assert!(entries.next().is_none());
    }

    #[test]
    fn sparse_writes_leave_zero_blocks_as_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = File::create(&path).unwrap();
        let mut data = vec![0u8; 64 * SPARSE_BLOCK];
        data[5 * SPARSE_BLOCK + 3] = 1;
        data[6 * SPARSE_BLOCK] = 2;
        data[40 * SPARSE_BLOCK + SPARSE_BLOCK - 1] = 3;
        write_sparse(&file, 0, &data).unwrap();
        file.set_len(data.len() as u64).unwrap();
        assert_eq!(fs::read(&path).unwrap(), data);
        // Three blocks of data, in 512-byte units; file systems may allocate a little more.
        let allocated = fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated < 16 * SPARSE_BLOCK as u64,
            "{allocated} bytes allocated"
        );
    }
}
