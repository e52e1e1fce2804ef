//! Layers banger writes itself: banger's guest assets and the files a `copy` provision
//! entry puts into an image. Both are plain, uncompressed tars read by
//! [`super::layers::build_rootfs`] like any OCI layer.
//!
//! Deterministic: the same inputs give the same bytes (entries in a fixed order, numeric
//! owners without names, one given modification time, no access or change times), so a
//! rebuilt layer is cut off by its content key. Entries carry no parent directories: a
//! missing parent is created root-owned 0755 when the layer is applied, and an existing one
//! keeps its owner and mode.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::assets::{AssetKind, GUEST_ASSETS};

#[derive(Debug, thiserror::Error)]
pub enum LayerTarError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a file, directory or symbolic link; only those can be copied")]
    UnsupportedType { path: PathBuf },
    #[error("cannot write the layer {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes tar entries with fixed metadata.
struct DeterministicTar<W: Write> {
    builder: tar::Builder<W>,
    mtime: u64,
}

impl<W: Write> DeterministicTar<W> {
    fn new(out: W, mtime: u64) -> DeterministicTar<W> {
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Deterministic);
        DeterministicTar { builder, mtime }
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(self.mtime);
        header.set_size(size);
        header
    }

    fn file(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        data: impl std::io::Read,
    ) -> std::io::Result<()> {
        let mut header = self.header(tar::EntryType::Regular, mode, size);
        self.builder.append_data(&mut header, path, data)
    }

    fn dir(&mut self, path: &str, mode: u32) -> std::io::Result<()> {
        let mut header = self.header(tar::EntryType::Directory, mode, 0);
        self.builder
            .append_data(&mut header, path, std::io::empty())
    }

    fn symlink(&mut self, path: &str, target: &Path) -> std::io::Result<()> {
        let mut header = self.header(tar::EntryType::Symlink, 0o777, 0);
        self.builder.append_link(&mut header, path, target)
    }

    fn finish(self) -> std::io::Result<W> {
        self.builder.into_inner()
    }
}

/// A guest path as a tar entry name: relative, no trailing slash.
fn entry_name(guest_path: &str) -> &str {
    guest_path.trim_start_matches('/').trim_end_matches('/')
}

/// Writes banger's guest assets ([`GUEST_ASSETS`]) as a layer to `out`: root-owned files
/// and symlinks, in the order listed, with modification time 0.
pub fn write_agent_layer(out: &Path) -> Result<(), LayerTarError> {
    let write_error = |source| LayerTarError::Write {
        path: out.to_owned(),
        source,
    };
    let file = std::fs::File::create(out).map_err(write_error)?;
    let mut tar = DeterministicTar::new(std::io::BufWriter::new(file), 0);
    for asset in GUEST_ASSETS {
        let name = entry_name(asset.guest_path);
        match asset.kind {
            AssetKind::File { mode, contents } => {
                tar.file(name, mode, contents.len() as u64, contents)
            }
            AssetKind::Symlink { target } => tar.symlink(name, Path::new(target)),
        }
        .map_err(write_error)?;
    }
    tar.finish()
        .and_then(|mut writer| writer.flush())
        .map_err(write_error)
}

/// Writes the project file or directory `source` as a layer to `out`, placed at the guest
/// path `dest`, root-owned, every entry with modification time `mtime`. `mode` replaces the
/// mode of `source` itself (not of what a directory holds). Symbolic links are copied as
/// links.
pub fn write_copy_layer(
    source: &Path,
    dest: &str,
    mode: Option<u32>,
    mtime: u64,
    out: &Path,
) -> Result<(), LayerTarError> {
    let write_error = |source| LayerTarError::Write {
        path: out.to_owned(),
        source,
    };
    let file = std::fs::File::create(out).map_err(write_error)?;
    let mut tar = DeterministicTar::new(std::io::BufWriter::new(file), mtime);
    copy_entry(&mut tar, source, entry_name(dest), mode, out)?;
    tar.finish()
        .and_then(|mut writer| writer.flush())
        .map_err(write_error)
}

fn copy_entry<W: Write>(
    tar: &mut DeterministicTar<W>,
    source: &Path,
    name: &str,
    mode: Option<u32>,
    out: &Path,
) -> Result<(), LayerTarError> {
    let read_error = |error| LayerTarError::Read {
        path: source.to_owned(),
        source: error,
    };
    let write_error = |error| LayerTarError::Write {
        path: out.to_owned(),
        source: error,
    };
    let metadata = std::fs::symlink_metadata(source).map_err(read_error)?;
    let file_type = metadata.file_type();
    let mode = mode.unwrap_or(metadata.permissions().mode() & 0o7777);
    if file_type.is_symlink() {
        let target = std::fs::read_link(source).map_err(read_error)?;
        return tar.symlink(name, &target).map_err(write_error);
    }
    if file_type.is_dir() {
        tar.dir(name, mode).map_err(write_error)?;
        let mut children: Vec<std::ffi::OsString> = std::fs::read_dir(source)
            .map_err(read_error)?
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read_error)?;
        children.sort();
        for child in children {
            let child_name = format!("{name}/{}", child.to_string_lossy());
            copy_entry(tar, &source.join(&child), &child_name, None, out)?;
        }
        return Ok(());
    }
    if !file_type.is_file() {
        return Err(LayerTarError::UnsupportedType {
            path: source.to_owned(),
        });
    }
    let file = std::fs::File::open(source).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    // A file that changes size while it is read fails the write (the tar crate checks).
    tar.file(name, mode, size, file).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(path: &Path) -> Vec<(String, tar::EntryType, u32, u64, u64, Vec<u8>)> {
        let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let header = entry.header().clone();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
                (
                    entry.path().unwrap().to_string_lossy().into_owned(),
                    header.entry_type(),
                    header.mode().unwrap(),
                    header.uid().unwrap(),
                    header.mtime().unwrap(),
                    data,
                )
            })
            .collect()
    }

    #[test]
    fn a_copied_directory_is_root_owned_sorted_and_timed_by_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("conf");
        std::fs::create_dir(&source).unwrap();
        std::fs::write(source.join("b.txt"), "bee").unwrap();
        std::fs::write(source.join("a.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(source.join("a.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("b.txt", source.join("c")).unwrap();
        let out = dir.path().join("layer.tar");
        write_copy_layer(&source, "/etc/app/", Some(0o700), 1_700_000_000, &out).unwrap();
        let found = entries(&out);
        let names: Vec<&str> = found.iter().map(|entry| entry.0.as_str()).collect();
        assert_eq!(
            names,
            ["etc/app", "etc/app/a.sh", "etc/app/b.txt", "etc/app/c"]
        );
        assert_eq!(found[0].1, tar::EntryType::Directory);
        assert_eq!(found[0].2, 0o700, "the given mode applies to the top entry");
        assert_eq!(found[1].2, 0o755, "children keep their host modes");
        assert_eq!(found[2].5, b"bee");
        assert_eq!(found[3].1, tar::EntryType::Symlink);
        assert!(
            found
                .iter()
                .all(|entry| entry.3 == 0 && entry.4 == 1_700_000_000)
        );

        // Same inputs, same bytes, whatever the host's times.
        let again = dir.path().join("again.tar");
        std::fs::File::options()
            .write(true)
            .open(source.join("b.txt"))
            .unwrap()
            .set_modified(std::time::SystemTime::now())
            .unwrap();
        write_copy_layer(&source, "/etc/app", Some(0o700), 1_700_000_000, &again).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    }

    #[test]
    fn the_agent_layer_holds_every_asset() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("agent.tar");
        write_agent_layer(&out).unwrap();
        let found = entries(&out);
        assert_eq!(found.len(), GUEST_ASSETS.len());
        let agent = found
            .iter()
            .find(|entry| entry.0 == "usr/local/bin/banger-agent")
            .expect("the agent binary");
        assert_eq!(agent.5, crate::assets::AGENT_BINARY);
        assert_eq!(agent.2, 0o755);
    }

    #[test]
    fn sockets_cannot_be_copied() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let error =
            write_copy_layer(&socket, "/x", None, 0, &dir.path().join("l.tar")).unwrap_err();
        assert!(matches!(error, LayerTarError::UnsupportedType { .. }));
    }
}
