//! `PutFile` and `GetFile`.
//!
//! `PutFile` writes into a temporary file beside the target (created exclusively, mode 0600),
//! sets ownership and then mode (chown clears set-id bits, so mode comes last) and renames it
//! over the target: readers see the old file or the complete new one, never a partial one.
//! The data is not fsynced: a guest crash right after `Ok` can lose it.
//! When the file cannot be written, the agent answers `Error` at once and then discards the
//! announced `Data`, so the connection stays in step with the client.
//!
//! `GetFile` sends regular files only (a device or FIFO could stream forever), `FileInfo`
//! first, then `Data` frames until end of file, then `End` with the byte count.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Sends a regular file.
pub fn get(connection: &mut Connection, request: protocol::GetFile) -> Result<(), Disconnected> {
    let opened = File::open(&request.path).and_then(|file| {
        let meta = file.metadata()?;
        Ok((file, meta))
    });
    let (mut file, meta) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            return connection.refuse(
                error_kind(&error),
                format!("cannot open {}: {error}", request.path),
            );
        }
    };
    if !meta.is_file() {
        return connection.refuse(
            ErrorKind::BadRequest,
            format!("{} is not a regular file", request.path),
        );
    }
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
