//! Starting a session: the starter (`session start`, run through an Exec) and the detached
//! supervisor it launches (`session supervise DIR`, never typed by hand).
//!
//! 1. The starter checks everything it can up front (program in `PATH`, working directory),
//!    takes the root's lock, claims the name by creating the session directory with its
//!    `stdin` FIFO, and starts `/proc/self/exe session supervise DIR` with a [`Launch`] on
//!    its stdin and a pipe on its stdout.
//! 2. The supervisor first calls `setsid`: its own session and process group, no controlling
//!    terminal, so killing the Exec's process group or hanging up its terminal cannot reach
//!    it. (Re-executing the agent stands in for the classic double fork: the new process
//!    starts clean instead of as a fork of a Rust program, and it is the starter's child only
//!    until the starter exits moments later. It stays a session leader, which matters only
//!    if it opened a terminal, and it opens none; the command runs in a process group of its
//!    own inside that session and is not a leader.)
//! 3. It opens the FIFO read-write and keeps it so (the command never reads EOF when a writer
//!    leaves), starts the command with stdin from the FIFO and stdout+stderr into one pipe,
//!    writes `meta.json` and sends a [`Report`] on its stdout, then points its own stdio at
//!    `/dev/null`: from then on it shares nothing with the starter's Exec.
//! 4. The starter prints the session or, when the report is a failure (or missing), removes
//!    the directory and fails with the supervisor's message.
//! 5. The supervisor drains the pipe into the log ring ([`LogRing`]) until the command
//!    exits (a thread waits for it and wakes the `poll` loop through a pipe), drains what the
//!    pipe still holds, writes `exit.json` and exits. It waits for its own child only.
//!
//! Weaknesses: output written by the command's background children after the command
//! exited is not kept (like an Exec). A starter killed between launching and reading the
//! report leaves a session it never announced; it shows in `list` like any other.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::Failure;
use super::store::{
    self, EXIT_FILE, Ending, LOG_FILE, META_FILE, Meta, OLD_LOG_FILE, STDIN_FIFO, SessionRecord,
    Status, Store,
};
use crate::exec::{DEFAULT_PATH, resolve_program};

/// Bytes read from the command's output pipe at a time.
const READ_CHUNK: usize = 64 * 1024;

/// What `session start` asked for.
#[derive(Debug)]
pub struct StartRequest {
    pub name: Option<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub argv: Vec<String>,
}

/// What the starter hands the supervisor on its stdin.
#[derive(Debug, Serialize, Deserialize)]
struct Launch {
    name: String,
    /// `argv[0]` resolved against `PATH`.
    program: PathBuf,
    argv: Vec<String>,
    cwd: PathBuf,
    /// The `PATH` the program was found in; the command gets it.
    path: OsString,
    env: Vec<(String, String)>,
    log_cap: u64,
}

/// What the supervisor tells the starter, as one JSON line on its stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Report {
    Started(SessionRecord),
    /// The command could not be started.
    CannotStart(String),
    /// Something else went wrong (the session directory, `meta.json`).
    Failed(String),
}

/// `session start`: launches a supervisor for `request` and returns its session once the
/// command runs.
pub fn start(request: StartRequest) -> Result<SessionRecord, Failure> {
    let StartRequest {
        name,
        env,
        cwd,
        argv,
    } = request;
    if let Some(name) = &name {
        store::validate_name(name).map_err(Failure::Usage)?;
    }
    let cwd = working_directory(cwd.as_deref())?;
    let path = env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map(|(_, value)| OsString::from(value))
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| DEFAULT_PATH.into());
    let program = find_program(&argv[0], &cwd, &path)?;
    let log_cap = log_cap()?;

    let store = Store::locate();
    store.create_root()?;
    let _lock = store.lock()?;
    let name = match name {
        Some(name) => {
            make_room_for(&store, &name)?;
            name
        }
        None => free_name(&store)?,
    };
    let dir = store.session_dir(&name);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|error| Failure::Failed(format!("cannot create {}: {error}", dir.display())))?;
    let launch = Launch {
        name,
        program,
        argv,
        cwd,
        path,
        env,
        log_cap,
    };
    let outcome = nix::unistd::mkfifo(&dir.join(STDIN_FIFO), Mode::S_IRUSR | Mode::S_IWUSR)
        .map_err(|error| {
            Failure::Failed(format!(
                "cannot create {}: {error}",
                dir.join(STDIN_FIFO).display()
            ))
        })
        .and_then(|()| launch_supervisor(&dir, &launch));
    if outcome.is_err() {
        // Nothing runs: free the name again.
        let _ = fs::remove_dir_all(&dir);
    }
    outcome
}

/// The absolute working directory for the command: `cwd` (relative to ours) or ours.
fn working_directory(cwd: Option<&str>) -> Result<PathBuf, Failure> {
    let here = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let Some(cwd) = cwd else {
        return Ok(here);
    };
    let absolute = here.join(cwd);
    match fs::metadata(&absolute) {
        Ok(metadata) if metadata.is_dir() => Ok(absolute),
        Ok(_) => Err(Failure::CannotStart(format!(
            "working directory {cwd} is not a directory"
        ))),
        Err(error) => Err(Failure::CannotStart(format!(
            "working directory {cwd}: {error}"
        ))),
    }
}

/// `program` looked up in `path`, or made absolute against `cwd` when it has a slash (the
/// command starts in `cwd`, so that is what a relative path means to it).
fn find_program(program: &str, cwd: &Path, path: &OsString) -> Result<PathBuf, Failure> {
    let found = if program.contains('/') {
        Some(cwd.join(program))
    } else {
        resolve_program(program, path)
    };
    let Some(found) = found else {
        return Err(Failure::CannotStart(format!(
            "cannot start `{program}`: not found in PATH {}",
            path.to_string_lossy()
        )));
    };
    match fs::metadata(&found) {
        Ok(metadata) if metadata.is_file() && metadata.permissions().mode() & 0o111 != 0 => {
            Ok(found)
        }
        Ok(_) => Err(Failure::CannotStart(format!(
            "cannot start `{program}`: {} is not an executable file",
            found.display()
        ))),
        Err(error) => Err(Failure::CannotStart(format!(
            "cannot start `{program}`: {}: {error}",
            found.display()
        ))),
    }
}

fn log_cap() -> Result<u64, Failure> {
    match std::env::var(store::LOG_CAP_ENV) {
        Err(_) => Ok(store::DEFAULT_LOG_CAP),
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(cap) if cap > 0 => Ok(cap),
            _ => Err(Failure::Usage(format!(
                "{}={text}: expected a positive number of bytes",
                store::LOG_CAP_ENV
            ))),
        },
    }
}

/// Removes a finished (or lost, or half-started) session called `name` so the name can be
/// reused; refuses while something of it still runs. Call with the root's lock held.
fn make_room_for(store: &Store, name: &str) -> Result<(), Failure> {
    let dir = store.session_dir(name);
    if fs::symlink_metadata(&dir).is_err() {
        return Ok(());
    }
    match store.load(name) {
        Ok(session) => match session.status() {
            Status::Running => {
                return Err(Failure::WrongState(format!(
                    "session {name} is running (pid {}): stop it or choose another name",
                    session.meta.pid
                )));
            }
            Status::Lost if session.command_alive() => {
                return Err(Failure::WrongState(format!(
                    "session {name} is lost (its supervisor is gone) but its command still \
                     runs (pid {}): kill it first",
                    session.meta.pid
                )));
            }
            Status::Lost | Status::Ended(_) => {}
        },
        // Under the lock, a directory without meta.json is a start that died half-way.
        Err(Failure::NoSession(_)) => {}
        Err(other) => return Err(other),
    }
    fs::remove_dir_all(&dir).map_err(|error| {
        Failure::Failed(format!(
            "cannot remove the old session {}: {error}",
            dir.display()
        ))
    })
}

/// The first of `s1`, `s2`, … that names no directory at all, so a generated name never
/// replaces an old session's output.
fn free_name(store: &Store) -> Result<String, Failure> {
    let taken = store.names()?;
    let name = (1u64..)
        .map(|number| format!("s{number}"))
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or_else(|| unreachable!("the numbers do not run out"));
    Ok(name)
}

/// Starts the supervisor for `launch` in `dir` and waits for its report.
fn launch_supervisor(dir: &Path, launch: &Launch) -> Result<SessionRecord, Failure> {
    // /proc/self/exe works even if the agent's file was replaced since it started.
    let agent = if Path::new("/proc/self/exe").exists() {
        PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().map_err(|error| {
            Failure::Failed(format!("cannot find the agent's own executable: {error}"))
        })?
    };
    let mut supervisor = Command::new(&agent)
        .arg0("banger-agent")
        .arg("session")
        .arg("supervise")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|error| {
            Failure::Failed(format!(
                "cannot start the session supervisor ({} session supervise): {error}",
                agent.display()
            ))
        })?;
    let request = serde_json::to_vec(launch).map_err(|error| Failure::Failed(error.to_string()))?;
    if let Some(mut stdin) = supervisor.stdin.take() {
        // A supervisor that died early shows as a missing report below.
        let _ = stdin.write_all(&request);
    }
    let mut reply = String::new();
    if let Some(mut stdout) = supervisor.stdout.take() {
        let _ = stdout.read_to_string(&mut reply);
    }
    match serde_json::from_str::<Report>(reply.trim()) {
        Ok(Report::Started(record)) => Ok(record),
        Ok(Report::CannotStart(message)) => {
            let _ = supervisor.wait();
            Err(Failure::CannotStart(message))
        }
        Ok(Report::Failed(message)) => {
            let _ = supervisor.wait();
            Err(Failure::Failed(message))
        }
        Err(_) => {
            let status = supervisor.wait();
            Err(Failure::Failed(format!(
                "the session supervisor ended without reporting ({})",
                status.map_or_else(|error| error.to_string(), |status| status.to_string())
            )))
        }
    }
}

/// `session supervise DIR`: the detached supervisor. Returns once the command has ended
/// and its end is recorded.
pub fn supervise(dir: &Path) -> Result<(), Failure> {
    // Before anything else: from here on the Exec that ran `start` cannot kill us.
    nix::unistd::setsid()
        .map_err(|error| report_and_fail(Report::Failed(format!("setsid: {error}"))))?;
    // The command gets its own directory; ours must not keep the starter's busy (a mount
    // that could not be unmounted while the session runs).
    let _ = std::env::set_current_dir("/");
    let mut text = String::new();
    io::stdin()
        .read_to_string(&mut text)
        .map_err(|error| report_and_fail(Report::Failed(format!("reading the launch: {error}"))))?;
    let launch: Launch = serde_json::from_str(&text)
        .map_err(|error| report_and_fail(Report::Failed(format!("bad launch: {error}"))))?;
    let running = start_command(dir, &launch).map_err(report_and_fail)?;
    report(&Report::Started(store::record_for(
        &running.meta,
        Status::Running,
    )));
    detach_stdio();
    running.drain_until_exit(dir)
}

/// The command, started, with what the supervisor keeps of it.
struct RunningCommand {
    child: std::process::Child,
    meta: Meta,
    output: OwnedFd,
    log: LogRing,
    /// Held read-write for the command's whole life, so its stdin never reaches EOF.
    _fifo: File,
}

fn start_command(dir: &Path, launch: &Launch) -> Result<RunningCommand, Report> {
    let fifo_path = dir.join(STDIN_FIFO);
    let open_fifo = |options: &mut OpenOptions| {
        options.open(&fifo_path).map_err(|error| {
            Report::Failed(format!("cannot open {}: {error}", fifo_path.display()))
        })
    };
    // Read-write first: opening only for reading would wait for a writer.
    let fifo = open_fifo(OpenOptions::new().read(true).write(true))?;
    let command_stdin = open_fifo(OpenOptions::new().read(true))?;
    let (output, output_writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|error| Report::Failed(format!("pipe: {error}")))?;
    let output_for_stderr = output_writer
        .try_clone()
        .map_err(|error| Report::Failed(format!("pipe: {error}")))?;
    // Before the command starts, so `log` exists by the time `start` returns.
    let log = LogRing::create(dir, launch.log_cap).map_err(|error| {
        Report::Failed(format!(
            "cannot create {}: {error}",
            dir.join(LOG_FILE).display()
        ))
    })?;
    let started_unix_ms = store::now_unix_ms();
    let child = {
        let mut command = Command::new(&launch.program);
        command
            .arg0(&launch.argv[0])
            .args(&launch.argv[1..])
            .env_remove(crate::service::NOTIFY_SOCKET)
            .env("PATH", &launch.path)
            .envs(launch.env.iter().map(|(key, value)| (key, value)))
            .current_dir(&launch.cwd)
            // Its own group, so `stop` and `kill` reach its children and never us.
            .process_group(0)
            .stdin(Stdio::from(command_stdin))
            .stdout(Stdio::from(output_writer))
            .stderr(Stdio::from(output_for_stderr));
        // The command drops with this block, closing our copies of the pipe's write end.
        command.spawn().map_err(|error| {
            Report::CannotStart(format!(
                "cannot start `{}` in {}: {error}",
                launch.argv[0],
                launch.cwd.display()
            ))
        })?
    };
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let own = store::process_stat(std::process::id().try_into().unwrap_or(i32::MAX));
    let meta = Meta {
        name: launch.name.clone(),
        argv: launch.argv.clone(),
        cwd: launch.cwd.to_string_lossy().into_owned(),
        pid,
        // Unreaped until our waiter runs, so readable even if the command already exited.
        pid_start_ticks: store::process_stat(pid).map(|stat| stat.start_ticks),
        supervisor_pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        supervisor_start_ticks: own.map(|stat| stat.start_ticks),
        boot_id: store::boot_id(),
        started_unix_ms,
    };
    let written = serde_json::to_vec_pretty(&meta)
        .map_err(io::Error::other)
        .and_then(|bytes| store::write_atomically(&dir.join(META_FILE), &bytes));
    if let Err(error) = written {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let mut child = child;
        let _ = child.wait();
        return Err(Report::Failed(format!(
            "cannot write {}: {error}",
            dir.join(META_FILE).display()
        )));
    }
    Ok(RunningCommand {
        child,
        meta,
        output,
        log,
        _fifo: fifo,
    })
}

impl RunningCommand {
    /// Copies the command's output into the log until the command exits, then records how
    /// it ended.
    fn drain_until_exit(self, dir: &Path) -> Result<(), Failure> {
        let RunningCommand {
            mut child,
            output,
            mut log,
            _fifo,
            ..
        } = self;
        let (wake_reader, wake_writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|error| Failure::Failed(format!("pipe: {error}")))?;
        let (status_sender, status_receiver) = mpsc::channel::<io::Result<ExitStatus>>();
        std::thread::spawn(move || {
            let _ = status_sender.send(child.wait());
            // Dropping the write end wakes the poll below.
            drop(wake_writer);
        });
        let mut output = Some(File::from(output));
        let mut buffer = vec![0u8; READ_CHUNK];
        loop {
            let mut descriptors = vec![PollFd::new(wake_reader.as_fd(), PollFlags::POLLIN)];
            if let Some(file) = &output {
                descriptors.push(PollFd::new(file.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut descriptors, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(error) => return Err(Failure::Failed(format!("poll: {error}"))),
            }
            let exited = descriptors[0].any().unwrap_or(true);
            let output_ready = descriptors
                .get(1)
                .is_some_and(|fd| fd.any().unwrap_or(true));
            drop(descriptors);
            if output_ready && let Some(file) = &mut output {
                match file.read(&mut buffer) {
                    // Every writer closed; the command may still run (it closed stdout).
                    Ok(0) => output = None,
                    Ok(count) => log.write(&buffer[..count]),
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => output = None,
                }
            }
            if exited {
                break;
            }
        }
        // What the command wrote just before exiting; children of it that keep the pipe
        // open must not hold us, so no blocking reads now.
        if let Some(file) = &mut output {
            let _ = fcntl(&*file, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
            while let Ok(count) = file.read(&mut buffer) {
                if count == 0 {
                    break;
                }
                log.write(&buffer[..count]);
            }
        }
        let status = status_receiver
            .recv()
            .map_err(|_| Failure::Failed("the waiter thread vanished".into()))?
            .map_err(|error| Failure::Failed(format!("waiting for the command: {error}")))?;
        let ending = Ending {
            exit_code: status.code(),
            signal: status.signal(),
            ended_unix_ms: store::now_unix_ms(),
        };
        let bytes = serde_json::to_vec_pretty(&ending)
            .map_err(|error| Failure::Failed(error.to_string()))?;
        store::write_atomically(&dir.join(EXIT_FILE), &bytes).map_err(|error| {
            Failure::Failed(format!(
                "cannot write {}: {error}",
                dir.join(EXIT_FILE).display()
            ))
        })
    }
}

/// Sends `report` to the starter; it may be gone, which changes nothing for us.
fn report(report: &Report) {
    if let Ok(line) = serde_json::to_string(report) {
        let mut stdout = io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }
}

/// Reports a failure to start and turns it into the supervisor's own (unseen) failure.
fn report_and_fail(failure: Report) -> Failure {
    let message = match &failure {
        Report::CannotStart(message) | Report::Failed(message) => message.clone(),
        Report::Started(_) => String::new(),
    };
    report(&failure);
    Failure::Failed(message)
}

/// Points stdin, stdout and stderr at `/dev/null`: the starter reads our stdout until EOF,
/// and the Exec behind it must not be held open by us.
fn detach_stdio() {
    if let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

/// The session's log: `log` holds at most `cap` bytes; when full it becomes `log.1`
/// (replacing the previous one) and a new `log` starts. So the newest output is always
/// kept, and at most twice the cap is on disk.
#[derive(Debug)]
pub struct LogRing {
    dir: PathBuf,
    cap: u64,
    file: File,
    size: u64,
}

impl LogRing {
    pub fn create(dir: &Path, cap: u64) -> io::Result<LogRing> {
        Ok(LogRing {
            dir: dir.to_owned(),
            cap,
            file: open_new_log(&dir.join(LOG_FILE))?,
            size: 0,
        })
    }

    /// Appends `bytes`, rotating as often as needed. A failed write drops that output
    /// rather than stopping the supervisor: the command must keep running.
    pub fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.size >= self.cap && self.rotate().is_err() {
                return;
            }
            let room = usize::try_from(self.cap - self.size).unwrap_or(usize::MAX);
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            if self.file.write_all(now).is_err() {
                return;
            }
            self.size += now.len() as u64;
            bytes = later;
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        let current = self.dir.join(LOG_FILE);
        fs::rename(&current, self.dir.join(OLD_LOG_FILE))?;
        self.file = open_new_log(&current)?;
        self.size = 0;
        Ok(())
    }
}

fn open_new_log(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "banger-agent-log-ring-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_ring_keeps_the_newest_output_within_the_cap() {
        let dir = scratch("cap");
        let mut ring = LogRing::create(&dir, 10).unwrap();
        ring.write(b"0123456789abcdefghij");
        ring.write(b"KLM");
        assert_eq!(fs::read(dir.join(LOG_FILE)).unwrap(), b"KLM");
        assert_eq!(fs::read(dir.join(OLD_LOG_FILE)).unwrap(), b"abcdefghij");
        ring.write(b"nopqrstuvwxyz");
        assert_eq!(fs::read(dir.join(OLD_LOG_FILE)).unwrap(), b"KLMnopqrst");
        assert_eq!(fs::read(dir.join(LOG_FILE)).unwrap(), b"uvwxyz");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_program_with_a_slash_is_taken_relative_to_the_working_directory() {
        let found = find_program("./sh", Path::new("/bin"), &OsString::new()).unwrap();
        assert_eq!(found, PathBuf::from("/bin/./sh"));
        let missing = find_program("no-such-program-here", Path::new("/"), &"/bin".into());
        assert!(
            matches!(&missing, Err(Failure::CannotStart(message))
                if message.contains("`no-such-program-here`") && message.contains("/bin")),
            "{missing:?}"
        );
    }
}
