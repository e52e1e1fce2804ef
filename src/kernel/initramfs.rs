//! banger's initramfs: a tiny cpio whose `/init` is banger's static guest agent, with the
//! kernel modules it must load before it can see its disk, network and vsock.
//!
//! Layout (all owned by root, mtimes 0, so the same inputs give the same bytes):
//!
//! ```text
//! /dev/            0755, with /dev/console (char 5,1, 0600) for the kernel's first stdout
//! /proc/ /sys/     0755, mount points
//! /newroot/        0755, where init mounts the root disk before switching to it
//! /init            0755, the given binary
//! /etc/banger/modules.load
//! /lib/modules/<release>/kernel/…/*.ko   plain (uncompressed) modules
//! ```
//!
//! `etc/banger/modules.load` lists the modules in load order, one per line, each a path
//! relative to `/lib/modules/<release>/` (`kernel/drivers/virtio/virtio.ko`), `\n`-terminated,
//! no comments: init reads it line by line and calls `finit_module` on each (the format is
//! the agent's, `assets/agent/src/modules.rs`).
//! Dependencies come first (see [`super::modules`]).
//!
//! Modules are written uncompressed whatever the package shipped, and the whole archive is
//! optionally gzip-compressed (the kernel's initramfs decompressors all include gzip).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::cpio::{CpioError, CpioWriter};
use super::modules::{ModulesError, ResolvedModule};

/// Where the module load list lives in the initramfs.
pub const MODULES_LOAD_PATH: &str = "etc/banger/modules.load";

/// Errors from building an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read the init binary {path}")]
    ReadInit {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel release {release:?} cannot name a directory in the initramfs")]
    BadRelease { release: String },
    #[error("module {name}: its path {path:?} cannot go in the initramfs")]
    BadModulePath { name: String, path: PathBuf },
    #[error("initramfs")]
    Module {
        #[source]
        source: ModulesError,
    },
    #[error("initramfs")]
    Cpio {
        #[source]
        source: CpioError,
    },
    #[error("cannot write initramfs {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<CpioError> for InitramfsError {
    fn from(source: CpioError) -> InitramfsError {
        InitramfsError::Cpio { source }
    }
}

/// The binary to run as `/init`.
#[derive(Debug, Clone, Copy)]
pub enum InitBinary<'a> {
    Path(&'a Path),
    Bytes(&'a [u8]),
}

/// Whether the archive is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitramfsCompression {
    None,
    Gzip,
}

/// What goes into the initramfs.
#[derive(Debug, Clone, Copy)]
pub struct InitramfsContents<'a> {
    pub init: InitBinary<'a>,
    /// The kernel release the modules belong to (`uname -r` in the guest).
    pub kernel_release: &'a str,
    /// Modules in load order (from [`super::modules::ModuleTree::resolve`]).
    pub modules: &'a [ResolvedModule],
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsSummary {
    /// Every entry's name, in archive order.
    pub entries: Vec<String>,
    /// The lines of `etc/banger/modules.load`.
    pub module_load_list: Vec<String>,
    /// Size of the cpio before compression.
    pub uncompressed_size: u64,
}

/// Counts bytes passing through to `W`.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A cpio writer that adds each parent directory once, before the first entry below it.
struct Tree<W: Write> {
    cpio: CpioWriter<W>,
    directories: BTreeSet<String>,
    entries: Vec<String>,
}

impl<W: Write> Tree<W> {
    fn parents(&mut self, name: &str) -> Result<(), CpioError> {
        let mut at = 0;
        while let Some(slash) = name[at..].find('/') {
            let parent = &name[..at + slash];
            if self.directories.insert(parent.to_owned()) {
                self.cpio.directory(parent, 0o755)?;
                self.entries.push(parent.to_owned());
            }
            at += slash + 1;
        }
        Ok(())
    }

    fn directory(&mut self, name: &str) -> Result<(), CpioError> {
        self.parents(name)?;
        if self.directories.insert(name.to_owned()) {
            self.cpio.directory(name, 0o755)?;
            self.entries.push(name.to_owned());
        }
        Ok(())
    }

    fn file(&mut self, name: &str, mode: u32, bytes: &[u8]) -> Result<(), CpioError> {
        self.parents(name)?;
        self.cpio.file_bytes(name, mode, bytes)?;
        self.entries.push(name.to_owned());
        Ok(())
    }
}

/// A relative path with `/` separators and only normal components, as a cpio name.
fn cpio_path(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            std::path::Component::Normal(part) => parts.push(part.to_str()?),
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Writes the initramfs for `contents` to `out`.
pub fn write_initramfs<W: Write>(
    contents: &InitramfsContents,
    compression: InitramfsCompression,
    out: W,
) -> Result<InitramfsSummary, InitramfsError> {
    let release = contents.kernel_release;
    if release.is_empty() || release.contains('/') || release == "." || release == ".." {
        return Err(InitramfsError::BadRelease {
            release: release.to_owned(),
        });
    }
    let init = match contents.init {
        InitBinary::Bytes(bytes) => bytes.to_vec(),
        InitBinary::Path(path) => {
            std::fs::read(path).map_err(|source| InitramfsError::ReadInit {
                path: path.to_owned(),
                source,
            })?
        }
    };
    let write_error = |source| InitramfsError::Cpio {
        source: CpioError::Write {
            name: "(compressed stream)".into(),
            source,
        },
    };
    match compression {
        InitramfsCompression::None => {
            let (summary, _) = write_tree(contents, &init, out)?;
            Ok(summary)
        }
        InitramfsCompression::Gzip => {
            // GzEncoder writes mtime 0 and no file name: deterministic.
            let encoder = flate2::write::GzEncoder::new(out, flate2::Compression::best());
            let (summary, encoder) = write_tree(contents, &init, encoder)?;
            encoder.finish().map_err(write_error)?;
            Ok(summary)
        }
    }
}

fn write_tree<W: Write>(
    contents: &InitramfsContents,
    init: &[u8],
    out: W,
) -> Result<(InitramfsSummary, W), InitramfsError> {
    let mut tree = Tree {
        cpio: CpioWriter::new(Counting {
            inner: out,
            count: 0,
        }),
        directories: BTreeSet::new(),
        entries: Vec::new(),
    };
    tree.directory("dev")?;
    tree.cpio.char_device("dev/console", 0o600, 5, 1)?;
    tree.entries.push("dev/console".into());
    for mount_point in ["proc", "sys", "newroot"] {
        tree.directory(mount_point)?;
    }
    tree.file("init", 0o755, init)?;

    let modules_dir = format!("lib/modules/{}", contents.kernel_release);
    tree.directory(&modules_dir)?;
    let mut load_list = Vec::new();
    for module in contents.modules {
        let relative =
            cpio_path(&module.load_path).ok_or_else(|| InitramfsError::BadModulePath {
                name: module.name.clone(),
                path: module.load_path.clone(),
            })?;
        let name = format!("{modules_dir}/{relative}");
        let plain = module
            .read_plain()
            .map_err(|source| InitramfsError::Module { source })?;
        tree.file(&name, 0o644, &plain)?;
        load_list.push(relative);
    }
    let mut list = load_list.join("\n");
    if !list.is_empty() {
        list.push('\n');
    }
    tree.file(MODULES_LOAD_PATH, 0o644, list.as_bytes())?;
    let entries = tree.entries;
    let counting = tree.cpio.finish()?;
    Ok((
        InitramfsSummary {
            entries,
            module_load_list: load_list,
            uncompressed_size: counting.count,
        },
        counting.inner,
    ))
}

/// Builds the initramfs at `output`, through a temp file beside it renamed into place.
pub fn build_initramfs(
    contents: &InitramfsContents,
    compression: InitramfsCompression,
    output: &Path,
) -> Result<InitramfsSummary, InitramfsError> {
    let write_error = |source| InitramfsError::Write {
        path: output.to_owned(),
        source,
    };
    let dir = output
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = tempfile::Builder::new()
        .prefix(".initramfs.partial-")
        .tempfile_in(dir)
        .map_err(write_error)?;
    let file: &File = temp.as_file();
    let mut buffered = io::BufWriter::new(file);
    let summary = write_initramfs(contents, compression, &mut buffered)?;
    buffered.flush().map_err(write_error)?;
    drop(buffered);
    temp.persist(output)
        .map_err(|error| write_error(error.error))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::compression::Compression;

    fn module(dir: &Path, name: &str, path: &str, bytes: &[u8]) -> ResolvedModule {
        let source = dir.join(name);
        std::fs::write(&source, bytes).unwrap();
        ResolvedModule {
            name: name.into(),
            source,
            compression: Compression::None,
            load_path: path.into(),
            depends: Vec::new(),
        }
    }

    #[test]
    fn lays_out_init_devices_modules_and_the_load_list() {
        let dir = tempfile::tempdir().unwrap();
        let modules = [
            module(
                dir.path(),
                "virtio_ring",
                "kernel/drivers/virtio/virtio_ring.ko",
                b"ring",
            ),
            module(
                dir.path(),
                "virtio",
                "kernel/drivers/virtio/virtio.ko",
                b"virtio",
            ),
            module(
                dir.path(),
                "vsock",
                "kernel/net/vmw_vsock/vsock.ko",
                b"vsock",
            ),
        ];
        let contents = InitramfsContents {
            init: InitBinary::Bytes(b"\x7fELF agent"),
            kernel_release: "6.1.0-1-cloud-amd64",
            modules: &modules,
        };
        let mut bytes = Vec::new();
        let summary = write_initramfs(&contents, InitramfsCompression::None, &mut bytes).unwrap();
        assert_eq!(
            summary.entries,
            [
                "dev",
                "dev/console",
                "proc",
                "sys",
                "newroot",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1.0-1-cloud-amd64",
                "lib/modules/6.1.0-1-cloud-amd64/kernel",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/drivers",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/virtio",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/virtio/virtio.ko",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/net",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/net/vmw_vsock",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/net/vmw_vsock/vsock.ko",
                "etc",
                "etc/banger",
                "etc/banger/modules.load",
            ]
        );
        assert_eq!(
            summary.module_load_list,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/net/vmw_vsock/vsock.ko",
            ]
        );
        assert_eq!(summary.uncompressed_size, bytes.len() as u64);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains(
            "kernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio.ko\nkernel/net/vmw_vsock/vsock.ko\n"
        ));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0"));

        // Deterministic, and gzip holds the same cpio.
        let mut again = Vec::new();
        write_initramfs(&contents, InitramfsCompression::None, &mut again).unwrap();
        assert!(again == bytes);
        let mut gzip = Vec::new();
        write_initramfs(&contents, InitramfsCompression::Gzip, &mut gzip).unwrap();
        let (compression, unzipped) = crate::kernel::compression::decompress_all(&gzip).unwrap();
        assert_eq!(compression, Compression::Gzip);
        assert!(unzipped == bytes);
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("agent");
        let contents = InitramfsContents {
            init: InitBinary::Path(&missing),
            kernel_release: "6.1",
            modules: &[],
        };
        let error = write_initramfs(&contents, InitramfsCompression::None, Vec::new()).unwrap_err();
        assert!(error.to_string().contains("agent"), "{error}");
        let contents = InitramfsContents {
            init: InitBinary::Bytes(b""),
            kernel_release: "../x",
            modules: &[],
        };
        assert!(matches!(
            write_initramfs(&contents, InitramfsCompression::None, Vec::new()),
            Err(InitramfsError::BadRelease { .. })
        ));
        let modules = [module(dir.path(), "evil", "../../etc/passwd", b"")];
        let contents = InitramfsContents {
            init: InitBinary::Bytes(b""),
            kernel_release: "6.1",
            modules: &modules,
        };
        let error = write_initramfs(&contents, InitramfsCompression::None, Vec::new()).unwrap_err();
        assert!(
            matches!(error, InitramfsError::BadModulePath { .. }),
            "{error}"
        );
    }

    #[test]
    fn build_leaves_only_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("initrd.img");
        let contents = InitramfsContents {
            init: InitBinary::Bytes(b"init"),
            kernel_release: "6.1",
            modules: &[],
        };
        build_initramfs(&contents, InitramfsCompression::Gzip, &output).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(std::fs::read(&output).unwrap().starts_with(&[0x1f, 0x8b]));
    }
}
