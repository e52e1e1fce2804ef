//! `PutFile` and `GetFile`.
//!
//! `PutFile` writes into a temporary file beside the target (created exclusively, mode 0600),
//! sets ownership and then mode (chown clears set-id bits, so mode comes last) and renames it
//! over the target: readers see the old file or the complete new one, never a partial one.
//! The data is not fsynced: a guest crash right after `Ok` can lose it.
//! When the file cannot be written, the agent answers `Error` at once and then discards the
//! announced `Data`, so the connection stays in step with the client.
//!
//! `GetFile` sends regular files only (a device or FIFO could stream forever, and opening a
//! FIFO blocks until it has a writer), `FileInfo` first, then `Data` frames until end of
//! file, then `End` with the byte count. The type is checked with `stat` before opening, so
//! nothing else is opened; the open itself is non-blocking and its `fstat` must show the
//! same regular file, so a path swapped for a FIFO in between is refused too, not waited on.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::unistd::{Gid, Uid, fchown};

use crate::protocol::{self, DATA_CHUNK, End, ErrorKind, FileInfo, FrameType};
use crate::serve::{Connection, Disconnected};
use crate::wire::error_kind;

/// Makes temporary names unique within this agent process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Receives a `PutFile`'s data and installs the file.
pub fn put(connection: &mut Connection, request: protocol::PutFile) -> Result<(), Disconnected> {
    let mut target = match Target::create(&request) {
        Ok(target) => Some(target),
        Err((kind, message)) => {
            connection.refuse(kind, message)?;
            None
        }
    };
    let mut received: u64 = 0;
    while received < request.size {
        let frame = match connection.reader.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(Disconnected),
            Err(error) => return Err(connection.fail(error)),
        };
        if frame.header.frame_type() != Some(FrameType::Data) {
            return stray(connection, target.is_some(), "a frame other than Data");
        }
        received += frame.payload.len() as u64;
        if received > request.size {
            return stray(
                connection,
                target.is_some(),
                "more Data than the announced size",
            );
        }
        if let Some(open) = &mut target
            && let Err(error) = open.file.write_all(&frame.payload)
        {
            let message = format!("cannot write {}: {error}", request.path);
            target = None;
            connection.refuse(error_kind(&error), message)?;
        }
    }
    match target {
        Some(open) => match open.install(&request) {
            Ok(()) => connection.send_json(FrameType::Ok, &serde_json::json!({})),
            Err(error) => connection.refuse(
                error_kind(&error),
                format!("cannot install {}: {error}", request.path),
            ),
        },
        // The Error was sent when writing failed.
        None => Ok(()),
    }
}

/// A client that breaks a `PutFile` in the middle: the stream is out of step, so close it.
fn stray(connection: &mut Connection, still_open: bool, what: &str) -> Result<(), Disconnected> {
    if still_open {
        let _ = connection.refuse(
            ErrorKind::BadRequest,
            format!("{what} arrived during a PutFile"),
        );
    }
    Err(Disconnected)
}

/// The temporary file being written; removed unless installed.
struct Target {
    file: File,
    temp: PathBuf,
    installed: bool,
}

impl Target {
    fn create(request: &protocol::PutFile) -> Result<Target, (ErrorKind, String)> {
        let path = Path::new(&request.path);
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err((
                ErrorKind::BadRequest,
                format!("{} names no file", request.path),
            ));
        };
        if !path.is_absolute() {
            return Err((
                ErrorKind::BadRequest,
                format!("{} is not an absolute path", request.path),
            ));
        }
        if request.mode & !0o7777 != 0 {
            return Err((
                ErrorKind::BadRequest,
                format!("mode {:o} has bits beyond 07777", request.mode),
            ));
        }
        if request.create_parents {
            std::fs::create_dir_all(parent).map_err(|error| {
                (
                    error_kind(&error),
                    format!("cannot create {}: {error}", parent.display()),
                )
            })?;
        }
        let temp = parent.join(format!(
            ".{}.banger-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|error| {
                (
                    error_kind(&error),
                    format!("cannot create {}: {error}", request.path),
                )
            })?;
        Ok(Target {
            file,
            temp,
            installed: false,
        })
    }

    fn install(mut self, request: &protocol::PutFile) -> io::Result<()> {
        let meta = self.file.metadata()?;
        if meta.uid() != request.uid || meta.gid() != request.gid {
            fchown(
                &self.file,
                Some(Uid::from_raw(request.uid)),
                Some(Gid::from_raw(request.gid)),
            )?;
        }
        self.file
            .set_permissions(std::fs::Permissions::from_mode(request.mode))?;
        std::fs::rename(&self.temp, &request.path)?;
        self.installed = true;
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if !self.installed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Opens `path` (following symbolic links) if it is a regular file, without ever blocking
/// in `open` or opening anything else; returns the file and its metadata.
fn open_regular(path: &str) -> Result<(File, std::fs::Metadata), (ErrorKind, String)> {
    let cannot_open =
        |error: io::Error| (error_kind(&error), format!("cannot open {path}: {error}"));
    let not_regular = || {
        (
            ErrorKind::BadRequest,
            format!("{path} is not a regular file"),
        )
    };
    let before = std::fs::metadata(path).map_err(cannot_open)?;
    if !before.is_file() {
        return Err(not_regular());
    }
    // O_NONBLOCK: if the path became a FIFO since the `stat`, `open` returns at once.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
        .map_err(cannot_open)?;
    let meta = file.metadata().map_err(cannot_open)?;
    if !meta.is_file() || (meta.dev(), meta.ino()) != (before.dev(), before.ino()) {
        return Err(not_regular());
    }
    // Reads of a regular file never block anyway; clear the flag so they behave as usual.
    fcntl(&file, FcntlArg::F_SETFL(OFlag::empty())).map_err(|errno| cannot_open(errno.into()))?;
    Ok((file, meta))
}

/// Sends a regular file.
pub fn get(connection: &mut Connection, request: protocol::GetFile) -> Result<(), Disconnected> {
    let (mut file, meta) = match open_regular(&request.path) {
        Ok(opened) => opened,
        Err((kind, message)) => return connection.refuse(kind, message),
    };
    connection.send_json(
        FrameType::FileInfo,
        &FileInfo {
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        },
    )?;
    let mut buffer = vec![0u8; DATA_CHUNK];
    let mut sent: u64 = 0;
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => {
                connection.send_bytes(FrameType::Data, &buffer[..count])?;
                sent += count as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                return connection.refuse(
                    error_kind(&error),
                    format!("cannot read {}: {error}", request.path),
                );
            }
        }
    }
    connection.send_json(FrameType::End, &End { size: sent })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A fresh directory under the system's temporary directory; removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "banger-agent-{name}-{}-{}",
                std::process::id(),
                TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `open_regular` in a thread, so a regression that blocks fails instead of hanging.
    fn open_with_timeout(path: &Path) -> Result<(File, std::fs::Metadata), (ErrorKind, String)> {
        let path = path.to_str().unwrap().to_owned();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // The receiver is gone only if it timed out, and then the test failed already.
            let _ = sender.send(open_regular(&path));
        });
        receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("open_regular blocked")
    }

    #[test]
    fn fifos_and_directories_are_refused_without_blocking() {
        let dir = TempDir::new("fifo");
        let fifo = dir.0.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let refused = open_with_timeout(&fifo).map(|_| ()).unwrap_err();
        assert_eq!(refused.0, ErrorKind::BadRequest, "{}", refused.1);
        let refused = open_with_timeout(&dir.0).map(|_| ()).unwrap_err();
        assert_eq!(refused.0, ErrorKind::BadRequest, "{}", refused.1);
        let missing = open_with_timeout(&dir.0.join("missing"))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(missing.0, ErrorKind::NotFound, "{}", missing.1);
    }

    #[test]
    fn regular_files_open_through_symlinks_in_blocking_mode() {
        let dir = TempDir::new("regular");
        let target = dir.0.join("file");
        std::fs::write(&target, b"content").unwrap();
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let (mut file, meta) = open_with_timeout(&link).unwrap();
        assert_eq!(meta.len(), 7);
        let flags = fcntl(&file, FcntlArg::F_GETFL).unwrap();
        assert_eq!(
            OFlag::from_bits_truncate(flags) & OFlag::O_NONBLOCK,
            OFlag::empty()
        );
        let mut content = String::new();
        file.read_to_string(&mut content).unwrap();
        assert_eq!(content, "content");
    }
}
