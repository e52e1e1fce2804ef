//! A session's output and input: printing its log (`logs`, `logs --tail N`), following it
//! (`logs -f`, `attach`), and writing into its stdin FIFO (`send`, `attach`).
//!
//! Following polls every [`FOLLOW_INTERVAL`]: read the open log to its end; when the path
//! `log` names another file than the one open, the supervisor rotated, so read the old one
//! to its end once more (its last bytes were written before the rename) and move to the
//! new one. The session's state is read *before* each catch-up, so once it shows the end,
//! that catch-up has everything (the supervisor writes `exit.json` after its last output).
//!
//! Weakness: a follower more than a whole cap behind (two rotations within one interval)
//! misses the output between.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::Failure;
use super::store::{LOG_FILE, OLD_LOG_FILE, STDIN_FIFO, Session};

/// How often a follower looks for new output and for the session's end.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes read at a time when looking for line starts from the end.
const TAIL_CHUNK: u64 = 64 * 1024;

/// Prints the session's output (`log.1` then `log`), or its last `tail` lines. Returns the
/// open `log`, at its end, for [`follow`].
pub fn print_log(
    session: &Session,
    tail: Option<usize>,
    out: &mut impl Write,
) -> io::Result<Option<File>> {
    let (old, current) = open_logs(&session.dir)?;
    let has_current = current.is_some();
    let mut files: Vec<File> = old.into_iter().chain(current).collect();
    let (first, offset) = match tail {
        Some(lines) => tail_start(&files, lines)?,
        None => (0, 0),
    };
    for (index, file) in files.iter_mut().enumerate().skip(first) {
        file.seek(SeekFrom::Start(if index == first { offset } else { 0 }))?;
        io::copy(file, out)?;
    }
    out.flush()?;
    Ok(if has_current { files.pop() } else { None })
}

/// Prints new output from `current` on, across rotations, until the session is no longer
/// running; then prints what is left and returns.
pub fn follow(
    session: &Session,
    mut current: Option<File>,
    out: &mut impl Write,
) -> io::Result<()> {
    loop {
        let running = session.is_running();
        catch_up(&session.dir, &mut current, out)?;
        out.flush()?;
        if !running {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

/// `log.1` and `log`, opened as one consistent pair: `log` first, and again if a rotation
/// turned it into the `log.1` opened after it.
fn open_logs(dir: &Path) -> io::Result<(Option<File>, Option<File>)> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let current = open_if_present(&dir.join(LOG_FILE))?;
        let old = open_if_present(&dir.join(OLD_LOG_FILE))?;
        let rotated_between = match (&old, &current) {
            (Some(old), Some(current)) => identity(old)? == identity(current)?,
            // Between the rename and the new file's creation.
            (Some(_), None) => true,
            _ => false,
        };
        if !rotated_between || attempts == 5 {
            return Ok((old, current));
        }
    }
}

fn open_if_present(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

fn identity(file: &File) -> io::Result<(u64, u64)> {
    let metadata = file.metadata()?;
    Ok((metadata.dev(), metadata.ino()))
}

/// Copies `current` to its end, moving on to a newer `log` for as long as there is one.
fn catch_up(dir: &Path, current: &mut Option<File>, out: &mut impl Write) -> io::Result<()> {
    let path = dir.join(LOG_FILE);
    loop {
        if let Some(file) = current {
            io::copy(file, out)?;
        }
        let on_disk = match fs::metadata(&path) {
            Ok(metadata) => (metadata.dev(), metadata.ino()),
            // Mid-rotation: the new log appears in a moment.
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error),
        };
        if let Some(file) = current {
            if identity(file)? == on_disk {
                return Ok(());
            }
            // Rotated since the copy above: what was written before the rename is complete
            // now.
            io::copy(file, out)?;
        }
        match File::open(&path) {
            Ok(file) => *current = Some(file),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error),
        }
    }
}

/// Where the last `lines` lines of `files` (read as one stream) begin: the index of a file
/// and an offset in it. A final line without a newline counts as a line.
fn tail_start(files: &[File], lines: usize) -> io::Result<(usize, u64)> {
    if lines == 0 {
        return Ok((files.len(), 0));
    }
    let mut remaining = lines;
    // The stream's last byte ends the last line rather than starting one after it.
    let mut at_stream_end = true;
    let mut buffer = Vec::new();
    for (index, file) in files.iter().enumerate().rev() {
        let mut end = file.metadata()?.len();
        while end > 0 {
            let start = end.saturating_sub(TAIL_CHUNK);
            buffer.resize(usize::try_from(end - start).unwrap_or(usize::MAX), 0);
            file.read_exact_at(&mut buffer, start)?;
            for (position, byte) in buffer.iter().enumerate().rev() {
                if *byte == b'\n' && !at_stream_end {
                    remaining -= 1;
                    if remaining == 0 {
                        return Ok((index, start + position as u64 + 1));
                    }
                }
                at_stream_end = false;
            }
            end = start;
        }
    }
    Ok((0, 0))
}

/// The session's stdin FIFO, open for blocking writes; refused unless the session runs.
pub fn open_input(session: &Session) -> Result<File, Failure> {
    let not_running = || {
        Failure::WrongState(format!(
            "session {} is not running ({})",
            session.name(),
            super::describe_state(&session.record())
        ))
    };
    if !session.is_running() {
        return Err(not_running());
    }
    let path = session.dir.join(STDIN_FIFO);
    // Non-blocking, so a FIFO without a reader (the supervisor just ended) fails with
    // ENXIO instead of waiting forever.
    let fifo = match OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(fifo) => fifo,
        Err(error) if error.raw_os_error() == Some(nix::libc::ENXIO) => {
            return Err(not_running());
        }
        Err(error) => {
            return Err(Failure::Failed(format!(
                "cannot open {}: {error}",
                path.display()
            )));
        }
    };
    fcntl(&fifo, FcntlArg::F_SETFL(OFlag::empty()))
        .map_err(|error| Failure::Failed(format!("{}: {error}", path.display())))?;
    Ok(fifo)
}

/// Copies `input` into the session's FIFO until `input` ends. An error of kind
/// `BrokenPipe` means the session ended first.
pub fn forward(mut input: impl Read, fifo: &mut File) -> io::Result<u64> {
    io::copy(&mut input, fifo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(contents: &[&[u8]]) -> (std::path::PathBuf, Vec<File>) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "banger-agent-tail-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        let files = contents
            .iter()
            .enumerate()
            .map(|(index, bytes)| {
                let path = dir.join(index.to_string());
                fs::write(&path, bytes).unwrap();
                File::open(path).unwrap()
            })
            .collect();
        (dir, files)
    }

    fn tail(contents: &[&[u8]], lines: usize) -> Vec<u8> {
        let (dir, mut files) = files(contents);
        let (first, offset) = tail_start(&files, lines).unwrap();
        let mut out = Vec::new();
        for (index, file) in files.iter_mut().enumerate().skip(first) {
            file.seek(SeekFrom::Start(if index == first { offset } else { 0 }))
                .unwrap();
            file.read_to_end(&mut out).unwrap();
        }
        fs::remove_dir_all(dir).unwrap();
        out
    }

    #[test]
    fn tail_counts_lines_across_both_files() {
        assert_eq!(tail(&[b"a\nb\n", b"c\nd\n"], 1), b"d\n");
        assert_eq!(tail(&[b"a\nb\n", b"c\nd\n"], 3), b"b\nc\nd\n");
        assert_eq!(tail(&[b"a\nb", b"c\nd"], 2), b"bc\nd");
        assert_eq!(tail(&[b"a\nb\n", b"c\nd\n"], 10), b"a\nb\nc\nd\n");
        assert_eq!(tail(&[b"a\n", b""], 1), b"a\n");
        assert_eq!(tail(&[b"a\nb\n"], 0), b"");
    }
}
