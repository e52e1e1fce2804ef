//! Session directories: where they live, what they hold, and how a session's state is read
//! back from them.
//!
//! One directory per session under the root ([`Store::locate`]):
//!
//! | file        | written by                      | holds                                   |
//! |-------------|---------------------------------|-----------------------------------------|
//! | `meta.json` | the supervisor, once CMD runs   | [`Meta`]: argv, cwd, pids, start times  |
//! | `exit.json` | the supervisor, once CMD ended  | [`Ending`]: exit code or signal, time   |
//! | `log`       | the supervisor                  | CMD's stdout and stderr, newest part    |
//! | `log.1`     | the supervisor (rotation)       | the part before `log`                   |
//! | `stdin`     | `start` (a FIFO)                | CMD's stdin                             |
//!
//! Both JSON files are written whole to a temporary name and renamed into place, so a reader
//! sees all of a file or none of it. A session's state follows from them: `exit.json` means it
//! ended; otherwise it runs while its supervisor does, and is lost once the supervisor is gone
//! (a guest reboot, a SIGKILL). "The supervisor" is the pid in `meta.json` *and* the start
//! time and boot id recorded with it, so a recycled pid is never mistaken for it.
//!
//! Weakness: without a readable `/proc` a process is identified by its pid alone.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::Failure;

/// Overrides the root of the session directories (tests use a temporary directory).
pub const ROOT_ENV: &str = "BANGER_AGENT_SESSION_DIR";
/// Overrides the log cap in bytes (tests use a small one to see rotation).
pub const LOG_CAP_ENV: &str = "BANGER_AGENT_SESSION_LOG_CAP";
/// The root in a guest: `/run` is a tmpfs, so sessions vanish with the processes they
/// describe when the guest reboots.
pub const DEFAULT_ROOT: &str = "/run/banger/sessions";
/// The root when the guest has no `/run` (minimal images booted with the agent as init).
/// `/tmp` may outlive a reboot; the sessions listed there then show as lost.
pub const FALLBACK_ROOT: &str = "/tmp/banger-sessions";
/// A session keeps at most this much output in `log`, and as much again in `log.1`.
pub const DEFAULT_LOG_CAP: u64 = 4 << 20;

pub const META_FILE: &str = "meta.json";
pub const EXIT_FILE: &str = "exit.json";
pub const LOG_FILE: &str = "log";
pub const OLD_LOG_FILE: &str = "log.1";
pub const STDIN_FIFO: &str = "stdin";
/// In the root: held by `start` while it picks a name and launches, so two starts never
/// claim one name.
const LOCK_FILE: &str = ".lock";

/// What the supervisor records once the command runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    pub argv: Vec<String>,
    pub cwd: String,
    /// The command's pid, which is also its process group.
    pub pid: i32,
    pub pid_start_ticks: Option<u64>,
    pub supervisor_pid: i32,
    pub supervisor_start_ticks: Option<u64>,
    /// `/proc/sys/kernel/random/boot_id` when the session started.
    pub boot_id: Option<String>,
    pub started_unix_ms: u64,
}

/// How the command ended; exactly one of `exit_code` and `signal` is set.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Ending {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_unix_ms: u64,
}

pub use crate::protocol::{SessionRecord, SessionState};

/// A session's state, read from its directory and `/proc`.
#[derive(Debug, Clone, Copy)]
pub enum Status {
    Running,
    Ended(Ending),
    Lost,
}

/// The directory holding every session directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The root from [`ROOT_ENV`], else [`DEFAULT_ROOT`], else [`FALLBACK_ROOT`] when there
    /// is no `/run`. Creates nothing.
    pub fn locate() -> Store {
        let root = match std::env::var_os(ROOT_ENV).filter(|value| !value.is_empty()) {
            Some(root) => PathBuf::from(root),
            None if Path::new("/run").is_dir() => PathBuf::from(DEFAULT_ROOT),
            None => PathBuf::from(FALLBACK_ROOT),
        };
        Store { root }
    }

    /// Creates the root (mode 0700) if needed and checks it is a directory of ours, not a
    /// symlink someone else planted (the fallback lives in world-writable `/tmp`).
    pub fn create_root(&self) -> Result<(), Failure> {
        let root = &self.root;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|error| {
                Failure::Failed(format!(
                    "cannot create the session directory {} (set {ROOT_ENV} to use another): \
                     {error}",
                    root.display()
                ))
            })?;
        let metadata = fs::symlink_metadata(root)
            .map_err(|error| Failure::Failed(format!("{}: {error}", root.display())))?;
        if !metadata.is_dir() {
            return Err(Failure::Failed(format!(
                "session directory {} is not a directory",
                root.display()
            )));
        }
        let euid = nix::unistd::geteuid().as_raw();
        if metadata.uid() != euid {
            return Err(Failure::Failed(format!(
                "session directory {} belongs to uid {}, not to this user (uid {euid})",
                root.display(),
                metadata.uid()
            )));
        }
        Ok(())
    }

    /// Takes the root's lock, held until the returned guard drops.
    pub fn lock(&self) -> Result<Flock<File>, Failure> {
        let path = self.root.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| Failure::Failed(format!("cannot open {}: {error}", path.display())))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, error)| {
            Failure::Failed(format!("cannot lock {}: {error}", path.display()))
        })
    }

    pub fn session_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The names of every directory under the root that looks like a session (including
    /// ones still starting), unsorted. No root means no sessions.
    pub fn names(&self) -> Result<Vec<String>, Failure> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => {
                return Err(Failure::Failed(format!(
                    "cannot list {}: {error}",
                    self.root.display()
                )));
            }
        };
        let mut names = Vec::new();
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if validate_name(&name).is_ok() && entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Every session that has started, oldest first.
    pub fn sessions(&self) -> Result<Vec<Session>, Failure> {
        let mut sessions = Vec::new();
        for name in self.names()? {
            match self.load(&name) {
                Ok(session) => sessions.push(session),
                // Still starting (or a start that died before its command ran): not a
                // session yet.
                Err(Failure::NoSession(_)) => {}
                Err(other) => return Err(other),
            }
        }
        sessions.sort_by(|a, b| {
            (a.meta.started_unix_ms, &a.meta.name).cmp(&(b.meta.started_unix_ms, &b.meta.name))
        });
        Ok(sessions)
    }

    /// The session called `name`; [`Failure::NoSession`] when there is none, and
    /// [`Failure::Usage`] for a name no session could have.
    pub fn load(&self, name: &str) -> Result<Session, Failure> {
        validate_name(name).map_err(Failure::Usage)?;
        let dir = self.session_dir(name);
        let path = dir.join(META_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(Failure::NoSession(name.to_owned()));
            }
            Err(error) => {
                return Err(Failure::Failed(format!(
                    "cannot read {}: {error}",
                    path.display()
                )));
            }
        };
        let meta: Meta = serde_json::from_str(&text)
            .map_err(|error| Failure::Failed(format!("{}: {error}", path.display())))?;
        Ok(Session { dir, meta })
    }
}

/// A session that has started.
#[derive(Debug, Clone)]
pub struct Session {
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Session {
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// The session's state now.
    pub fn status(&self) -> Status {
        if let Some(ending) = self.ending() {
            return Status::Ended(ending);
        }
        let meta = &self.meta;
        if process_is(
            meta.supervisor_pid,
            meta.supervisor_start_ticks,
            meta.boot_id.as_deref(),
        ) {
            return Status::Running;
        }
        // The supervisor may have recorded the end and exited since the first look.
        match self.ending() {
            Some(ending) => Status::Ended(ending),
            None => Status::Lost,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.status(), Status::Running)
    }

    /// Whether the command itself (not its supervisor) is still alive: true for a running
    /// session, and for a lost one whose command outlived its supervisor.
    pub fn command_alive(&self) -> bool {
        let meta = &self.meta;
        process_is(meta.pid, meta.pid_start_ticks, meta.boot_id.as_deref())
    }

    fn ending(&self) -> Option<Ending> {
        let text = fs::read_to_string(self.dir.join(EXIT_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn record(&self) -> SessionRecord {
        record_for(&self.meta, self.status())
    }
}

/// The record of a session in state `status`.
pub fn record_for(meta: &Meta, status: Status) -> SessionRecord {
    let (state, exit_code, signal, ended_unix_ms) = match status {
        Status::Running => (SessionState::Running, None, None, None),
        Status::Lost => (SessionState::Lost, None, None, None),
        Status::Ended(ending) => (
            if ending.signal.is_some() {
                SessionState::Killed
            } else {
                SessionState::Exited
            },
            ending.exit_code,
            ending.signal,
            Some(ending.ended_unix_ms),
        ),
    };
    SessionRecord {
        name: meta.name.clone(),
        argv: meta.argv.clone(),
        cwd: meta.cwd.clone(),
        pid: meta.pid,
        started_unix_ms: meta.started_unix_ms,
        state,
        exit_code,
        signal,
        ended_unix_ms,
    }
}

/// Checks a session name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`. The message names the input.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut characters = name.chars();
    let valid = name.len() <= 64
        && characters
            .next()
            .is_some_and(|first| first.is_ascii_alphanumeric())
        && characters.all(|rest| rest.is_ascii_alphanumeric() || "_.-".contains(rest));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid session name `{name}`: use 1 to 64 letters, digits, `_`, `.` or `-`, \
             starting with a letter or digit"
        ))
    }
}

/// Writes `bytes` to `path` through a temporary file renamed over it, so readers never see
/// a partial file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    fs::write(&temporary, bytes)?;
    fs::rename(&temporary, path)
}

pub fn now_unix_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

pub fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|text| text.trim().to_owned())
}

/// What `/proc/PID/stat` says about a process: its state letter and start time (clock
/// ticks after boot).
#[derive(Debug, Clone, Copy)]
pub struct ProcessStat {
    pub state: char,
    pub start_ticks: u64,
}

pub fn process_stat(pid: i32) -> Option<ProcessStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted from its last `)`: state is field 3, the start time field 22.
pub fn parse_stat(text: &str) -> Option<ProcessStat> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    Some(ProcessStat {
        state: fields.first()?.chars().next()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Whether `pid` is alive (not a zombie) and is the process recorded with `start_ticks` in
/// the boot `boot_id`.
pub fn process_is(pid: i32, start_ticks: Option<u64>, recorded_boot: Option<&str>) -> bool {
    if pid <= 1 {
        return false;
    }
    if let (Some(recorded), Some(current)) = (recorded_boot, boot_id())
        && recorded != current
    {
        return false;
    }
    match process_stat(pid) {
        Some(stat) => {
            !matches!(stat.state, 'Z' | 'X')
                && start_ticks.is_none_or(|ticks| ticks == stat.start_ticks)
        }
        // No /proc to tell by: the pid alone has to do.
        None if !Path::new("/proc/self/stat").exists() => {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_pattern() {
        for good in ["s1", "a", "web.server_2-x", &"a".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "a/b",
            "..",
            "a b",
            "é",
            &"a".repeat(65),
        ] {
            let error = validate_name(bad).unwrap_err();
            assert!(error.contains(&format!("`{bad}`")), "{error}");
        }
    }

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    98765 1000 10 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.start_ticks, 98765);
        assert!(parse_stat("42 (truncated").is_none());
    }

    #[test]
    fn a_process_is_known_by_pid_and_start_time() {
        let own = i32::try_from(std::process::id()).unwrap();
        let ticks = process_stat(own).unwrap().start_ticks;
        assert!(process_is(own, Some(ticks), boot_id().as_deref()));
        assert!(process_is(own, None, None));
        // The same pid with another start time is a recycled pid.
        assert!(!process_is(own, Some(ticks + 1), None));
        assert!(!process_is(own, None, Some("another-boot")));
        assert!(!process_is(1, None, None));
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while process_stat(pid).is_some_and(|stat| stat.state != 'Z') {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} never exited"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!process_is(pid, None, None));
        child.wait().unwrap();
    }

    #[test]
    fn records_tell_exit_from_signal() {
        let meta = Meta {
            name: "s1".into(),
            argv: vec!["true".into()],
            cwd: "/".into(),
            pid: 10,
            pid_start_ticks: None,
            supervisor_pid: 9,
            supervisor_start_ticks: None,
            boot_id: None,
            started_unix_ms: 1,
        };
        let exited = record_for(
            &meta,
            Status::Ended(Ending {
                exit_code: Some(3),
                signal: None,
                ended_unix_ms: 2,
            }),
        );
        assert_eq!(exited.state, SessionState::Exited);
        assert_eq!(exited.exit_code, Some(3));
        let killed = record_for(
            &meta,
            Status::Ended(Ending {
                exit_code: None,
                signal: Some(15),
                ended_unix_ms: 2,
            }),
        );
        assert_eq!(killed.state, SessionState::Killed);
        assert_eq!(
            serde_json::to_value(&killed).unwrap()["state"],
            serde_json::json!("killed")
        );
        assert_eq!(record_for(&meta, Status::Lost).state, SessionState::Lost);
    }
}
