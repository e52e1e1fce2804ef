//! Fingerprints of project files that steps read (`copy` provisioning, the workspace).
//!
//! A step that copies `scripts/setup.sh` must re-run when the file's bytes change, not when its
//! mtime does, so the plan's [`crate::key::ParamValue::Source`] params are replaced by a blake3
//! digest of the content before keying (plan lifecycle step 2).
//!
//! A file's digest covers its bytes and its executable bit; a directory's covers, for every
//! entry in name order, the relative name, the type, the mode and the content (symlinks: their
//! target, never followed). So renaming, adding, removing or chmod-ing anything re-keys it.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::key::KeyEncoder;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read project file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("project file {path} is not a regular file, directory or symlink")]
    UnsupportedType { path: PathBuf },
}

/// Digests (`blake3:<hex>`) of `paths`, which are relative to `project_dir`.
pub fn fingerprint(
    project_dir: &Path,
    paths: &[PathBuf],
) -> Result<HashMap<PathBuf, String>, SourceError> {
    paths
        .iter()
        .map(|relative| {
            let digest = fingerprint_path(&project_dir.join(relative))?;
            Ok((relative.clone(), digest))
        })
        .collect()
}

/// The digest of one file or directory tree.
pub fn fingerprint_path(path: &Path) -> Result<String, SourceError> {
    let mut encoder = KeyEncoder::new("banger/source/v1");
    encode_entry(&mut encoder, path, "")?;
    Ok(format!("blake3:{}", encoder.finish()))
}

/// `blake3:<hex>` of a file's bytes alone (no name, no mode): how `import.file` keys a host
/// file it brings into the store.
pub fn content_digest(path: &Path) -> Result<String, SourceError> {
    Ok(format!("blake3:{}", hash_file(path)?.to_hex()))
}

fn hash_file(path: &Path) -> Result<blake3::Hash, SourceError> {
    let mut file = std::fs::File::open(path).map_err(read_error(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(read_error(path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher.finalize())
}

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Read {
        path: path.to_owned(),
        source,
    }
}

fn encode_entry(encoder: &mut KeyEncoder, path: &Path, name: &str) -> Result<(), SourceError> {
    let metadata = std::fs::symlink_metadata(path).map_err(read_error(path))?;
    let file_type = metadata.file_type();
    encoder.str(name);
    if file_type.is_symlink() {
        let target = std::fs::read_link(path).map_err(read_error(path))?;
        encoder.tag(b'l');
        encoder.bytes(target.as_os_str().as_encoded_bytes());
    } else if file_type.is_file() {
        encoder.tag(b'f');
        encoder.u64(u64::from(metadata.permissions().mode() & 0o7777));
        encoder.bytes(hash_file(path)?.as_bytes());
    } else if file_type.is_dir() {
        encoder.tag(b'd');
        encoder.u64(u64::from(metadata.permissions().mode() & 0o7777));
        let mut names: Vec<String> = std::fs::read_dir(path)
            .map_err(read_error(path))?
            .map(|entry| {
                entry
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .map_err(read_error(path))
            })
            .collect::<Result<_, _>>()?;
        names.sort();
        encoder.u64(names.len() as u64);
        for child in names {
            let child_name = if name.is_empty() {
                child.clone()
            } else {
                format!("{name}/{child}")
            };
            encode_entry(encoder, &path.join(&child), &child_name)?;
        }
    } else {
        return Err(SourceError::UnsupportedType {
            path: path.to_owned(),
        });
    }
    Ok(())
}

impl crate::error::Classify for SourceError {
    /// A project file a step reads: missing or unreadable, the project's to fix.
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::User
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_and_mode_change_the_digest_but_mtime_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("setup.sh");
        std::fs::write(&file, "echo hi\n").unwrap();
        let first = fingerprint_path(&file).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(fingerprint_path(&file).unwrap(), first);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        let executable = fingerprint_path(&file).unwrap();
        assert_ne!(executable, first);
        std::fs::write(&file, "echo bye\n").unwrap();
        assert_ne!(fingerprint_path(&file).unwrap(), executable);
    }

    #[test]
    fn directories_cover_names_and_nested_content() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("sub/a"), "a").unwrap();
        let first = fingerprint_path(&tree).unwrap();
        std::fs::rename(tree.join("sub/a"), tree.join("sub/b")).unwrap();
        let renamed = fingerprint_path(&tree).unwrap();
        assert_ne!(first, renamed);
        std::os::unix::fs::symlink("b", tree.join("link")).unwrap();
        assert_ne!(fingerprint_path(&tree).unwrap(), renamed);
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let error = fingerprint(dir.path(), &[PathBuf::from("nope")]).unwrap_err();
        assert!(error.to_string().contains("nope"), "{error}");
    }
}
