//! `daemon.log`: what the daemon did (requests, VM state changes, the processes it started
//! and how they ended), capped in size.
//!
//! The file is the daemon's stderr too (the launcher appends it there, so a panic lands in
//! it). Past [`LOG_CAP`] it is renamed to `daemon.log.1` (replacing the previous one) and a
//! new one begins, and the new file becomes stderr as well: at most twice the cap is kept.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The size past which `daemon.log` is rotated.
pub const LOG_CAP: u64 = 8 << 20;

/// Renames `path` to `path.1` when it holds more than `cap` bytes; a missing file is fine.
pub fn rotate_if_over(path: &Path, cap: u64) -> io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() > cap => {
            std::fs::rename(path, rotated(path))?;
            Ok(true)
        }
        Ok(_) => Ok(false),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Whether this process's stderr is the file at `path` (the launcher's doing).
pub fn stderr_is(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(file) = std::fs::metadata(path) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_fd())
        .is_ok_and(|stderr| (stderr.st_dev, stderr.st_ino) == (file.dev(), file.ino()))
}

/// `daemon.log.1` beside `daemon.log`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The daemon's log for `tracing`: appends to `path`, rotating it past `cap`.
#[derive(Debug, Clone)]
pub struct RotatingLog {
    inner: Arc<Mutex<Open>>,
}

#[derive(Debug)]
struct Open {
    path: PathBuf,
    cap: u64,
    file: File,
    written: u64,
    /// Whether the process's stderr follows the file across rotations (the daemon's does;
    /// tests' must not).
    redirect_stderr: bool,
}

impl RotatingLog {
    /// Opens (appends to) `path`, rotating it first if it is already past `cap`. With
    /// `redirect_stderr` (the launcher made stderr this very file), stderr moves to each new
    /// file a rotation begins.
    pub fn open(path: &Path, cap: u64, redirect_stderr: bool) -> io::Result<RotatingLog> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let rotated_now = rotate_if_over(path, cap)?;
        let file = append(path)?;
        let written = file.metadata()?.len();
        let open = Open {
            path: path.to_owned(),
            cap,
            file,
            written,
            redirect_stderr,
        };
        if redirect_stderr && rotated_now {
            nix::unistd::dup2_stderr(open.file.as_fd())?;
        }
        Ok(RotatingLog {
            inner: Arc::new(Mutex::new(open)),
        })
    }
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Open {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.written += bytes.len() as u64;
        if self.written > self.cap {
            std::fs::rename(&self.path, rotated(&self.path))?;
            self.file = append(&self.path)?;
            self.written = 0;
            if self.redirect_stderr {
                nix::unistd::dup2_stderr(self.file.as_fd())?;
            }
        }
        Ok(())
    }
}

/// One event's bytes, written whole when dropped so that lines from threads never mix.
#[derive(Debug)]
pub struct LogWriter {
    log: Arc<Mutex<Open>>,
    buffer: Vec<u8>,
}

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        if let Ok(mut open) = self.log.lock() {
            // Nowhere left to report a failing log to.
            let _ = open.write(&self.buffer);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RotatingLog {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter {
            log: Arc::clone(&self.inner),
            buffer: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    #[test]
    fn the_log_rotates_past_its_cap_and_keeps_the_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/daemon.log");
        let log = RotatingLog::open(&path, 100, false).unwrap();
        for line in 0..30 {
            let mut writer = log.make_writer();
            writeln!(writer, "line {line:02}").unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let previous = std::fs::read_to_string(rotated(&path)).unwrap();
        assert!(current.len() as u64 <= 100, "{current}");
        assert!(previous.len() as u64 <= 100 + 8, "{previous}");
        assert!(
            (previous.clone() + &current).ends_with("line 29\n"),
            "{previous}{current}"
        );
        // Whole lines only, and in order across the two files.
        let all: Vec<&str> = previous.lines().chain(current.lines()).collect();
        let numbers: Vec<u32> = all
            .iter()
            .map(|line| line.trim_start_matches("line ").parse().unwrap())
            .collect();
        assert!(
            numbers.windows(2).all(|pair| pair[1] == pair[0] + 1),
            "{all:?}"
        );
    }

    #[test]
    fn a_log_already_past_the_cap_is_rotated_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        std::fs::write(&path, vec![b'x'; 200]).unwrap();
        assert!(rotate_if_over(&path, 100).unwrap());
        assert!(!path.exists());
        assert_eq!(std::fs::metadata(rotated(&path)).unwrap().len(), 200);
        assert!(!rotate_if_over(&path, 100).unwrap());
    }
}
