//! Applying tar layers, in order, to an ext4 image: the whole `rootfs.build` step.
//!
//! Lifecycle of [`build_rootfs`]:
//! 1. Create the image with [`Ext4Builder`] (deterministic options: same layers, same bytes).
//! 2. For each layer: detect its compression by magic bytes (gzip, zstd or plain tar), then
//!    stream its entries. Each entry name is normalized and refused if it escapes
//!    ([`super::path`]); whiteouts delete from lower layers, opaque markers clear a directory of
//!    what lower layers put there; other entries are inserted where their parent really is
//!    (following symlinks inside the image), creating missing parents as root 0755.
//!    Ownership, modes (setuid/setgid/sticky), nanosecond mtimes (PAX), xattrs and ACLs
//!    (`SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`) come from the headers.
//! 3. Drop `/.dockerenv` and `/run/.containerenv` (systemd would think it runs in a
//!    container) and per-instance identity ([`super::identity`]). banger's guest assets are
//!    not written here: they come as a layer of their own ([`super::layer_tar`]).
//! 4. Finish: size = content × headroom with a floor, or fixed.
//!
//! Nothing is ever written on the host but the image file, whatever a layer says; on any error
//! the builder removes the partial image.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::ext4::{
    BuildOptions, EntryKind, EntryType, Ext4Builder, Ext4Error, Ext4Summary, Metadata, Sizing,
    is_supported_xattr_name,
};
use crate::oci::{decompressed_ahead, sniff_compression};

use super::path::{
    EntryMeaning, ImageTree, PathError, TreeNode, meaning, normalize_entry,
    resolve_hardlink_target, resolve_parents,
};

/// Errors of the rootfs build, each naming the layer and, where there is one, the entry.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot open layer {layer} ({path})")]
    LayerOpen {
        layer: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read layer {layer} (is the blob truncated or corrupt?)")]
    LayerRead {
        layer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: refusing entry")]
    UnsafeEntry {
        layer: String,
        #[source]
        source: PathError,
    },
    #[error("layer {layer}: entry `{entry}` has an unsupported type ({kind})")]
    UnsupportedEntry {
        layer: String,
        entry: String,
        kind: String,
    },
    #[error("layer {layer}: entry `{entry}`")]
    Entry {
        layer: String,
        entry: String,
        #[source]
        source: Ext4Error,
    },
    #[error("cannot create the image")]
    Create(#[source] Ext4Error),
    #[error("cannot write banger's guest file {path} into the image")]
    Asset {
        path: String,
        #[source]
        source: Ext4Error,
    },
    #[error("cannot finish the image")]
    Finish(#[source] Ext4Error),
    #[error("the build was cancelled")]
    Cancelled,
}

/// One layer to apply.
#[derive(Debug, Clone)]
pub struct Layer {
    /// How errors name it: the blob digest, or the recipe's name.
    pub name: String,
    pub path: PathBuf,
    pub format: LayerFormat,
}

impl Layer {
    /// A layer held as a tar stream.
    pub fn tar(name: impl Into<String>, path: impl Into<PathBuf>) -> Layer {
        Layer {
            name: name.into(),
            path: path.into(),
            format: LayerFormat::Tar,
        }
    }
}

/// What a layer's file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    /// A tar stream, plain, gzip or zstd (judged by magic bytes).
    Tar,
    /// An ext4 image, applied as a layer holding its whole tree (only as the first layer:
    /// an ext4 image has no whiteouts).
    Ext4,
}

/// How to build the image.
#[derive(Debug, Clone)]
pub struct RootfsOptions {
    pub sizing: Sizing,
    /// Remove SSH host keys and the like, empty the machine id ([`super::identity`]).
    pub strip_identity: bool,
    /// Seeds the file system UUID and hash seed, so the same inputs give the same bytes.
    pub seed: Vec<u8>,
    /// Checked between entries: a cancelled build stops and removes its image.
    pub cancel: Option<tokio_util::sync::CancellationToken>,
    /// fsync the image before returning. Off for `rootfs.build`, whose output the store
    /// keeps unsynced like every other (see `store`); benchmarks measure both.
    pub sync: bool,
}

/// Counts input bytes, for progress.
struct Counting<R: Read> {
    inner: R,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.count
            .fetch_add(read as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(read)
    }
}

/// Opens a layer blob as a decompressed tar stream, its compression judged by magic bytes.
pub fn open_layer(
    layer: &Layer,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<Box<dyn Read + Send>, RootfsError> {
    let open_error = |source| RootfsError::LayerOpen {
        layer: layer.name.clone(),
        path: layer.path.clone(),
        source,
    };
    if layer.format == LayerFormat::Ext4 {
        return ext4_layer_stream(layer, counter);
    }
    let mut file = File::open(&layer.path).map_err(open_error)?;
    let mut head = [0u8; 4];
    let read = file.read(&mut head).map_err(open_error)?;
    let file = File::open(&layer.path).map_err(open_error)?;
    let counted = BufReader::with_capacity(
        1 << 20,
        Counting {
            inner: file,
            count: counter,
        },
    );
    decompressed_ahead(sniff_compression(&head[..read]), counted).map_err(|source| {
        RootfsError::LayerRead {
            layer: layer.name.clone(),
            source,
        }
    })
}

/// The tree of an ext4 image as a tar stream: a thread exports it with banger's ext4 reader
/// into a pipe that the build reads, so no tar is ever written to disk. An export error
/// surfaces as a read error of the layer (the pipe closes early).
fn ext4_layer_stream(
    layer: &Layer,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<Box<dyn Read + Send>, RootfsError> {
    let open_error = |source| RootfsError::LayerOpen {
        layer: layer.name.clone(),
        path: layer.path.clone(),
        source,
    };
    let reader = crate::ext4::reader::Ext4Reader::open(&layer.path)
        .map_err(|error| open_error(std::io::Error::other(error)))?;
    let (pipe_reader, pipe_writer) = std::io::pipe().map_err(open_error)?;
    let failure = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let failed = std::sync::Arc::clone(&failure);
    std::thread::Builder::new()
        .name("ext4-layer".into())
        .spawn(move || {
            let options = crate::ext4::export::ExportOptions::default();
            if let Err(error) =
                crate::ext4::export::export_tar(&reader, Path::new(""), pipe_writer, &options)
                && let Ok(mut slot) = failed.lock()
            {
                *slot = Some(crate::error::error_chain(&error));
            }
        })
        .map_err(open_error)?;
    Ok(Box::new(ExportedStream {
        inner: pipe_reader,
        failure,
        count: counter,
    }))
}

/// The read end of an ext4 export: counts bytes for progress and turns an early end into the
/// export's own error.
struct ExportedStream {
    inner: std::io::PipeReader,
    failure: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Read for ExportedStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        if read == 0
            && let Ok(slot) = self.failure.lock()
            && let Some(message) = slot.as_ref()
        {
            return Err(std::io::Error::other(message.clone()));
        }
        self.count
            .fetch_add(read as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(read)
    }
}

/// Adapts the builder to path resolution.
struct BuilderTree<'a>(&'a Ext4Builder);

impl ImageTree for BuilderTree<'_> {
    fn node(&self, path: &Path) -> Option<TreeNode> {
        let info = self.0.lookup(path)?;
        Some(match info.kind {
            EntryType::Directory => TreeNode::Directory,
            EntryType::Symlink => TreeNode::Symlink {
                target: PathBuf::from(OsStr::from_bytes(
                    info.symlink_target.as_deref().unwrap_or_default(),
                )),
            },
            _ => TreeNode::Other,
        })
    }
}

/// Applies `layers` in order into a new ext4 image at `image`. `progress` receives the
/// compressed bytes read so far and their total.
pub fn build_rootfs(
    layers: &[Layer],
    image: &Path,
    options: &RootfsOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<Ext4Summary, RootfsError> {
    let build_options = BuildOptions {
        sync: options.sync,
        ..BuildOptions::with_seed(&options.seed)
    };
    let mut builder = Ext4Builder::create(image, build_options).map_err(RootfsError::Create)?;
    let total: u64 = layers
        .iter()
        .filter_map(|layer| std::fs::metadata(&layer.path).ok())
        .map(|metadata| metadata.len())
        .sum();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cancelled = || {
        options
            .cancel
            .as_ref()
            .is_some_and(|token| token.is_cancelled())
    };
    for layer in layers {
        apply_layer(
            &mut builder,
            layer,
            counter.clone(),
            &|done| progress(done, total),
            &cancelled,
        )?;
    }
    for path in [".dockerenv", "run/.containerenv"] {
        builder
            .remove(Path::new(path))
            .map_err(|source| RootfsError::Entry {
                layer: "(cleanup)".into(),
                entry: path.into(),
                source,
            })?;
    }
    if options.strip_identity {
        super::identity::strip(&mut builder).map_err(|source| RootfsError::Entry {
            layer: "(identity)".into(),
            entry: "per-instance identity files".into(),
            source,
        })?;
    }
    builder.finish(options.sizing).map_err(RootfsError::Finish)
}

fn apply_layer(
    builder: &mut Ext4Builder,
    layer: &Layer,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    progress: &dyn Fn(u64),
    cancelled: &dyn Fn() -> bool,
) -> Result<(), RootfsError> {
    let read_error = |source| RootfsError::LayerRead {
        layer: layer.name.clone(),
        source,
    };
    let stream = open_layer(layer, counter.clone())?;
    let mut archive = tar::Archive::new(crate::limits::TarExtensionCap::new(
        stream,
        crate::limits::TAR_EXTENSION_BYTES,
    ));
    // Entries this layer wrote: an opaque marker only clears what lower layers put there.
    let mut added: HashSet<PathBuf> = HashSet::new();
    let mut last_report = 0u64;
    for entry in archive.entries().map_err(read_error)? {
        if cancelled() {
            return Err(RootfsError::Cancelled);
        }
        let mut entry = entry.map_err(read_error)?;
        let raw_name = entry.path_bytes().into_owned();
        let unsafe_entry = |source| RootfsError::UnsafeEntry {
            layer: layer.name.clone(),
            source,
        };
        let Some(path) =
            normalize_entry(Path::new(OsStr::from_bytes(&raw_name))).map_err(unsafe_entry)?
        else {
            // `./`: the root directory's own metadata.
            if entry.header().entry_type().is_dir() {
                let meta = metadata(&mut entry, layer)?;
                builder
                    .insert(Path::new(""), EntryKind::Directory, &meta)
                    .map_err(|source| RootfsError::Entry {
                        layer: layer.name.clone(),
                        entry: "./".into(),
                        source,
                    })?;
            }
            continue;
        };
        let entry_name = path.to_string_lossy().into_owned();
        let entry_error = |source| RootfsError::Entry {
            layer: layer.name.clone(),
            entry: entry_name.clone(),
            source,
        };
        match meaning(&path) {
            EntryMeaning::Ignored => {}
            EntryMeaning::Whiteout { target } => {
                let target =
                    resolve_parents(&BuilderTree(builder), &target).map_err(unsafe_entry)?;
                builder.remove(&target).map_err(entry_error)?;
            }
            EntryMeaning::Opaque { dir } => {
                let dir = if dir.as_os_str().is_empty() {
                    dir
                } else {
                    resolve_parents(&BuilderTree(builder), &dir).map_err(unsafe_entry)?
                };
                clear_lower(builder, &dir, &added).map_err(entry_error)?;
            }
            EntryMeaning::Regular => {
                let target = resolve_parents(&BuilderTree(builder), &path).map_err(unsafe_entry)?;
                if let Some(parent) = target.parent() {
                    ensure_dirs(builder, parent).map_err(entry_error)?;
                }
                insert_entry(builder, layer, &mut entry, &path, &target)?;
                added.insert(target);
            }
        }
        let done = counter.load(std::sync::atomic::Ordering::Relaxed);
        if done - last_report >= 8 << 20 {
            last_report = done;
            progress(done);
        }
    }
    progress(counter.load(std::sync::atomic::Ordering::Relaxed));
    Ok(())
}

/// Removes the children of `dir` that this layer did not add.
fn clear_lower(
    builder: &mut Ext4Builder,
    dir: &Path,
    added: &HashSet<PathBuf>,
) -> Result<(), Ext4Error> {
    let Some(children) = builder.children(dir) else {
        return Ok(());
    };
    let keeps_some = added
        .iter()
        .any(|path| path.starts_with(dir) && path != dir);
    if !keeps_some {
        return builder.clear_directory(dir);
    }
    for child in children {
        let path = dir.join(&child);
        let own = added.iter().any(|added| added.starts_with(&path));
        if !own {
            builder.remove(&path)?;
        } else if builder
            .lookup(&path)
            .is_some_and(|info| info.kind == EntryType::Directory)
        {
            clear_lower(builder, &path, added)?;
        }
    }
    Ok(())
}

/// Creates missing directories of `dir` as root 0755 (tars may omit parents).
fn ensure_dirs(builder: &mut Ext4Builder, dir: &Path) -> Result<(), Ext4Error> {
    let mut current = PathBuf::new();
    for component in dir.components() {
        current.push(component);
        if builder.lookup(&current).is_none() {
            builder.insert(
                &current,
                EntryKind::Directory,
                &Metadata {
                    mode: 0o755,
                    ..Metadata::default()
                },
            )?;
        }
    }
    Ok(())
}

fn insert_entry<R: Read>(
    builder: &mut Ext4Builder,
    layer: &Layer,
    entry: &mut tar::Entry<'_, R>,
    path: &Path,
    target: &Path,
) -> Result<(), RootfsError> {
    let entry_name = path.to_string_lossy().into_owned();
    let entry_error = |source| RootfsError::Entry {
        layer: layer.name.clone(),
        entry: entry_name.clone(),
        source,
    };
    let meta = metadata(entry, layer)?;
    let header = entry.header().clone();
    let kind = header.entry_type();
    let device = |what: &str| -> Result<(u32, u32), RootfsError> {
        let major = header.device_major().ok().flatten();
        let minor = header.device_minor().ok().flatten();
        match (major, minor) {
            (Some(major), Some(minor)) => Ok((major, minor)),
            _ => Err(RootfsError::UnsupportedEntry {
                layer: layer.name.clone(),
                entry: entry_name.clone(),
                kind: format!("{what} without device numbers"),
            }),
        }
    };
    use tar::EntryType as T;
    match kind {
        T::Directory => builder
            .insert(target, EntryKind::Directory, &meta)
            .map_err(entry_error),
        T::Regular | T::Continuous | T::GNUSparse => {
            let size = entry.size();
            builder
                .insert(target, EntryKind::File { size, data: entry }, &meta)
                .map_err(entry_error)
        }
        T::Symlink => {
            let link = entry
                .link_name_bytes()
                .map(|name| name.into_owned())
                .unwrap_or_default();
            builder
                .insert(target, EntryKind::Symlink { target: link }, &meta)
                .map_err(entry_error)
        }
        T::Link => {
            let link = entry
                .link_name_bytes()
                .map(|name| name.into_owned())
                .unwrap_or_default();
            let link_target = resolve_hardlink_target(
                &BuilderTree(builder),
                path,
                Path::new(OsStr::from_bytes(&link)),
            )
            .map_err(|source| RootfsError::UnsafeEntry {
                layer: layer.name.clone(),
                source,
            })?;
            builder
                .insert(
                    target,
                    EntryKind::HardLink {
                        target: link_target,
                    },
                    &meta,
                )
                .map_err(entry_error)
        }
        T::Char => {
            let (major, minor) = device("character device")?;
            builder
                .insert(target, EntryKind::CharDevice { major, minor }, &meta)
                .map_err(entry_error)
        }
        T::Block => {
            let (major, minor) = device("block device")?;
            builder
                .insert(target, EntryKind::BlockDevice { major, minor }, &meta)
                .map_err(entry_error)
        }
        T::Fifo => builder
            .insert(target, EntryKind::Fifo, &meta)
            .map_err(entry_error),
        other => Err(RootfsError::UnsupportedEntry {
            layer: layer.name.clone(),
            entry: entry_name.clone(),
            kind: format!("{other:?}"),
        }),
    }
}

/// Ownership, mode, mtime and xattrs of an entry, PAX records taking precedence.
fn metadata<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    layer: &Layer,
) -> Result<Metadata, RootfsError> {
    let header = entry.header();
    let mut meta = Metadata {
        uid: header.uid().unwrap_or(0) as u32,
        gid: header.gid().unwrap_or(0) as u32,
        mode: header.mode().unwrap_or(0o644) & 0o7777,
        mtime: (header.mtime().unwrap_or(0) as i64, 0),
        xattrs: Vec::new(),
    };
    let extensions = entry
        .pax_extensions()
        .map_err(|source| RootfsError::LayerRead {
            layer: layer.name.clone(),
            source,
        })?;
    let Some(extensions) = extensions else {
        return Ok(meta);
    };
    let mut xattrs: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for extension in extensions {
        let Ok(extension) = extension else { continue };
        let key = extension.key_bytes();
        let value = extension.value_bytes();
        if key == b"uid" {
            if let Some(uid) = parse_decimal(value) {
                meta.uid = uid as u32;
            }
        } else if key == b"gid" {
            if let Some(gid) = parse_decimal(value) {
                meta.gid = gid as u32;
            }
        } else if key == b"mtime" {
            if let Some(mtime) = parse_pax_time(value) {
                meta.mtime = mtime;
            }
        } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            xattrs.insert(name.to_vec(), value.to_vec());
        } else if let Some(name) = key.strip_prefix(b"LIBARCHIVE.xattr.")
            && let (Some(name), Some(value)) = (percent_decode(name), base64_decode(value))
        {
            xattrs.insert(name, value);
        }
    }
    meta.xattrs = xattrs
        .into_iter()
        .filter(|(name, _)| is_supported_xattr_name(name))
        .collect();
    Ok(meta)
}

fn parse_decimal(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// A PAX time, `seconds[.fraction]`, possibly negative.
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (seconds, fraction) = text.split_once('.').unwrap_or((text, ""));
    let seconds: i64 = seconds.parse().ok()?;
    let mut nanos: u32 = 0;
    for (index, digit) in fraction.chars().take(9).enumerate() {
        nanos += digit.to_digit(10)? * 10u32.pow(8 - index as u32);
    }
    Some(if negative {
        if nanos == 0 {
            (-seconds, 0)
        } else {
            (-seconds - 1, 1_000_000_000 - nanos)
        }
    } else {
        (seconds, nanos)
    })
}

fn percent_decode(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut index = 0;
    while index < input.len() {
        if input[index] == b'%' {
            let hex = std::str::from_utf8(input.get(index + 1..index + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(input[index]);
            index += 1;
        }
    }
    Some(out)
}

fn base64_decode(input: &[u8]) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let clean: Vec<u8> = input
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut bits = 0u32;
        for (index, c) in chunk.iter().enumerate() {
            bits |= value(*c)? << (18 - 6 * index);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_keep_nanoseconds_and_signs() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }

    #[test]
    fn libarchive_xattr_names_and_values_decode() {
        assert_eq!(percent_decode(b"user.a%3Db"), Some(b"user.a=b".to_vec()));
        assert_eq!(base64_decode(b"aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64_decode(b"AAEC"), Some(vec![0, 1, 2]));
    }
}
