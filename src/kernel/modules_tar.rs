//! A kernel's modules tree as one file: the store keeps flat files, so `lib/modules/<release>`
//! travels as a deterministic tar (sorted names, owner root, mtime 0), and is unpacked again
//! where a boot needs it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModulesTarError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither a file, a directory nor a symlink")]
    Unsupported { path: PathBuf },
}

/// Packs `dir` (its contents, relative names) into the tar `out`.
pub fn pack(dir: &Path, out: &Path) -> Result<(), ModulesTarError> {
    let write_error = |source| ModulesTarError::Write {
        path: out.to_owned(),
        source,
    };
    let file = std::fs::File::create(out).map_err(write_error)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    append_sorted(&mut builder, dir, Path::new(""))?;
    builder
        .into_inner()
        .and_then(|mut writer| std::io::Write::flush(&mut writer))
        .map_err(write_error)
}

fn append_sorted<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    relative: &Path,
) -> Result<(), ModulesTarError> {
    let dir = root.join(relative);
    let read_error = |source| ModulesTarError::Read {
        path: dir.clone(),
        source,
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(read_error)?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<Result<_, _>>()
        .map_err(read_error)?;
    names.sort();
    for name in names {
        let child = relative.join(&name);
        let path = root.join(&child);
        let metadata =
            std::fs::symlink_metadata(&path).map_err(|source| ModulesTarError::Read {
                path: path.clone(),
                source,
            })?;
        let append_error = |source| ModulesTarError::Write {
            path: path.clone(),
            source,
        };
        if metadata.is_dir() {
            builder.append_dir(&child, &path).map_err(append_error)?;
            append_sorted(builder, root, &child)?;
        } else if metadata.is_file() || metadata.file_type().is_symlink() {
            builder
                .append_path_with_name(&path, &child)
                .map_err(append_error)?;
        } else {
            return Err(ModulesTarError::Unsupported { path });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_tree_packs_to_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("kernel/drivers")).unwrap();
        std::fs::write(tree.join("kernel/drivers/virtio.ko"), b"ko").unwrap();
        std::fs::write(tree.join("modules.order"), b"virtio\n").unwrap();
        pack(&tree, &dir.path().join("a.tar")).unwrap();
        std::fs::File::options()
            .write(true)
            .open(tree.join("modules.order"))
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(99))
            .unwrap();
        pack(&tree, &dir.path().join("b.tar")).unwrap();
        let a = std::fs::read(dir.path().join("a.tar")).unwrap();
        assert_eq!(a, std::fs::read(dir.path().join("b.tar")).unwrap());
        let names: Vec<String> = tar::Archive::new(a.as_slice())
            .entries()
            .unwrap()
            .map(|entry| entry.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "kernel",
                "kernel/drivers",
                "kernel/drivers/virtio.ko",
                "modules.order"
            ]
        );
    }
}
