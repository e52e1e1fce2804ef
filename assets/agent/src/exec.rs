//! `Exec`: runs one command and streams it, in the connection's own thread.
//!
//! 1. The program is resolved against the effective `PATH` here (so a missing program is an
//!    `Error`, not exit code 127, and std can use `posix_spawn` for piped commands), the
//!    working directory is checked, and the command starts in its own process group through
//!    the [`Reaper`].
//! 2. With `tty` (protocol version 2, see [`pty`]) the command instead gets a new
//!    pseudo-terminal as stdin, stdout, stderr and controlling terminal, in a session of its
//!    own (std forks for that, running `pre_exec`). The loop below then treats the master
//!    like the pipes: it is read as stdout, written as stdin, and `Resize` sets its size.
//! 3. One `poll` loop then moves bytes: client frames (`Stdin`, `StdinEof`, `Signal`,
//!    `Resize`), the command's stdout and stderr (non-blocking pipes or the master, one frame
//!    per read), pending stdin into the command, and the reaper's exit pipe. No thread per
//!    command, no shell unless asked.
//! 4. Once the command has exited, whatever its pipes or its terminal still hold is sent,
//!    then `Exit`. Output written later by background processes that kept them open is not
//!    waited for (like `docker exec`).
//! 5. If the client disconnects, the whole process group gets SIGKILL.
//!
//! Weakness: writes to the client block; a client that stops reading stalls the command once
//! the pipes fill, which is the backpressure we want. Client frames are not read while more
//! than [`STDIN_BACKLOG`] bytes of stdin wait for the command, so a `Signal` sent behind a
//! large stdin backlog waits until the command reads. On a terminal, the SIGKILL and `Signal`
//! reach the command's own process group only: of the jobs an interactive shell moved to
//! groups of their own, the kernel hangs up the foreground one when the command (the session
//! leader) exits, and background ones keep running, as after closing a terminal window.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::protocol::{self, DATA_CHUNK, ErrorKind, Exit, FrameType, TTY_PROTOCOL_VERSION};
use crate::serve::{Connection, Disconnected};
use crate::wire::{self, Frame, ReadError};

mod pty;

/// `PATH` for commands whose request has none and that do not inherit the agent's (with
/// `clear_env`, or when the agent has none: as PID 1 it starts with the kernel's bare
/// environment).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Stdin bytes buffered for the command before client frames stop being read.
const STDIN_BACKLOG: usize = 256 * 1024;

/// A request that cannot start, with the error to send.
struct Refusal(ErrorKind, String);

/// A command ready to spawn.
struct Prepared {
    command: Command,
    /// With `tty`: the agent's side of the command's pseudo-terminal.
    terminal: Option<Terminal>,
}

/// The agent's handles on a `tty` command's pseudo-terminal master, one per use.
struct Terminal {
    /// Kept for `Resize` until the request ends.
    master: OwnedFd,
    /// Read for the command's output.
    output: File,
    /// Written with `Stdin`; only when the request has `stdin`.
    input: Option<File>,
}

/// Runs one `Exec` request to its `Exit` (or `Error`).
pub fn run(connection: &mut Connection, request: protocol::Exec) -> Result<(), Disconnected> {
    let Prepared {
        mut command,
        terminal,
    } = match prepare(&request, connection.protocol) {
        Ok(prepared) => prepared,
        Err(Refusal(kind, message)) => return connection.refuse(kind, message),
    };
    let spawned = connection.reaper.spawn(&mut command);
    // `command` holds the agent's copies of a pty's slave: until they are closed, the master
    // cannot report the end of the command's output.
    drop(command);
    let (mut child, exit_pipe) = match spawned {
        Ok(started) => started,
        Err(error) => {
            let message = format!("cannot start {}: {error}", describe(&request));
            return connection.refuse(ErrorKind::Spawn, message);
        }
    };
    let process_group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let (stdin, stdout, stderr, terminal) = match terminal {
        Some(Terminal {
            master,
            output,
            input,
        }) => (input, Some(output), None, Some(master)),
        None => (
            child.stdin.take().map(OwnedFd::from).map(File::from),
            child.stdout.take().map(OwnedFd::from).map(File::from),
            child.stderr.take().map(OwnedFd::from).map(File::from),
            None,
        ),
    };
    let mut session = Session {
        stdin,
        stdout,
        stderr,
        terminal,
        exit_pipe,
        process_group,
        pending_stdin: Vec::new(),
        stdin_eof_requested: false,
        exit: None,
        buffer: vec![0; DATA_CHUNK],
    };
    for stream in [&session.stdin, &session.stdout, &session.stderr]
        .into_iter()
        .flatten()
    {
        // Blocking streams would stall the loop; failing to switch is not worth refusing
        // for. (A pty master's clones share one open file, so this sets all of them.)
        let _ = fcntl(stream, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
    }
    let outcome = session.drive(connection);
    if outcome.is_err() {
        session.kill();
    }
    outcome
}

/// Validates the request and builds the command, for a connection speaking `protocol`.
fn prepare(request: &protocol::Exec, protocol: u32) -> Result<Prepared, Refusal> {
    if request.tty && protocol < TTY_PROTOCOL_VERSION {
        return Err(Refusal(
            ErrorKind::Unsupported,
            format!(
                "tty is not supported by protocol version {protocol} (it needs {TTY_PROTOCOL_VERSION}; say so in Hello)"
            ),
        ));
    }
    let (program, arguments): (&str, Vec<&str>) = match (&request.argv, &request.shell) {
        (Some(argv), None) => match argv.split_first() {
            Some((program, rest)) => (program, rest.iter().map(String::as_str).collect()),
            None => return Err(Refusal(ErrorKind::BadRequest, "argv is empty".into())),
        },
        (None, Some(line)) => ("/bin/sh", vec!["-c", line.as_str()]),
        _ => {
            return Err(Refusal(
                ErrorKind::BadRequest,
                "exactly one of argv and shell must be given".into(),
            ));
        }
    };
    let search_path = command_path(request, std::env::var_os("PATH"));
    let resolved = resolve_program(program, &search_path).ok_or_else(|| {
        Refusal(
            ErrorKind::NotFound,
            format!(
                "cannot start `{program}`: not found in PATH {}",
                search_path.to_string_lossy()
            ),
        )
    })?;
    let mut command = Command::new(&resolved);
    command.arg0(program).args(arguments);
    if request.clear_env {
        command.env_clear();
    }
    // The service manager's, for the agent alone (`service::notify_ready`).
    command.env_remove(crate::service::NOTIFY_SOCKET);
    // The command sees the PATH its program was found in, and exports it to its children.
    command.env("PATH", &search_path);
    if request.tty {
        // The agent's own TERM (often `linux`, from the console) describes some other
        // terminal; the request's env overrides this default below.
        command.env("TERM", pty::DEFAULT_TERM);
    }
    command.envs(&request.env);
    if let Some(cwd) = &request.cwd {
        match std::fs::metadata(cwd) {
            Ok(meta) if meta.is_dir() => {
                command.current_dir(cwd);
            }
            Ok(_) => {
                return Err(Refusal(
                    ErrorKind::BadRequest,
                    format!("working directory {cwd} is not a directory"),
                ));
            }
            // BadRequest, not NotFound: the client tells "no such program" (a shell's 127)
            // from "cannot run it there" by the kind.
            Err(error) => {
                return Err(Refusal(
                    ErrorKind::BadRequest,
                    format!("working directory {cwd}: {error}"),
                ));
            }
        }
    }
    if request.tty {
        let terminal = open_terminal(request, &mut command).map_err(|error| {
            Refusal(
                wire::error_kind(&error),
                format!("cannot set up a pseudo-terminal: {error}"),
            )
        })?;
        return Ok(Prepared {
            command,
            terminal: Some(terminal),
        });
    }
    command
        .stdin(if request.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    Ok(Prepared {
        command,
        terminal: None,
    })
}

/// Opens a pseudo-terminal sized as the request asks and attaches `command` to it.
fn open_terminal(request: &protocol::Exec, command: &mut Command) -> io::Result<Terminal> {
    let pty = pty::Pty::open(request.window).map_err(io::Error::other)?;
    let master = pty.attach(command)?;
    let output = File::from(master.try_clone()?);
    let input = if request.stdin {
        Some(File::from(master.try_clone()?))
    } else {
        None
    };
    Ok(Terminal {
        master,
        output,
        input,
    })
}

/// The `PATH` a command gets: the request's, else the agent's (`agent_path`) unless
/// `clear_env`, else [`DEFAULT_PATH`].
fn command_path(request: &protocol::Exec, agent_path: Option<OsString>) -> OsString {
    if let Some(path) = request.env.get("PATH") {
        return path.into();
    }
    agent_path
        .filter(|_| !request.clear_env)
        .unwrap_or_else(|| DEFAULT_PATH.into())
}

/// `program` itself if it contains a slash, else the first executable file of that name in
/// `search_path`.
pub fn resolve_program(program: &str, search_path: impl AsRef<OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_executable = |path: &Path| {
        std::fs::metadata(path)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    if program.is_empty() {
        return None;
    }
    std::env::split_paths(search_path.as_ref())
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn describe(request: &protocol::Exec) -> String {
    match (&request.argv, &request.shell) {
        (Some(argv), _) => format!("{argv:?}"),
        (_, Some(line)) => format!("sh -c {line:?}"),
        _ => "the command".into(),
    }
}

/// One running command and the state of its streams. With a terminal, `stdin` and `stdout`
/// are clones of its master, and `stderr` is `None`.
struct Session {
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    /// The pseudo-terminal master of a `tty` command, for `Resize`.
    terminal: Option<OwnedFd>,
    exit_pipe: OwnedFd,
    process_group: Pid,
    pending_stdin: Vec<u8>,
    stdin_eof_requested: bool,
    exit: Option<Exit>,
    buffer: Vec<u8>,
}

/// Adds `fd` (if any) to the poll set; returns its index.
fn slot<'fd>(
    fds: &mut Vec<PollFd<'fd>>,
    fd: Option<std::os::fd::BorrowedFd<'fd>>,
    flags: PollFlags,
) -> Option<usize> {
    fd.map(|fd| {
        fds.push(PollFd::new(fd, flags));
        fds.len() - 1
    })
}

/// Which polled descriptors are ready.
struct Ready {
    client: bool,
    stdout: bool,
    stderr: bool,
    stdin: bool,
    exited: bool,
}

/// What a client frame means for the running command.
enum Step {
    Continue,
    /// A frame that is not legal during `Exec`: the command is killed and the request fails.
    Violation(String),
}

impl Session {
    fn drive(&mut self, connection: &mut Connection) -> Result<(), Disconnected> {
        loop {
            while self.pending_stdin.len() < STDIN_BACKLOG {
                match connection.reader.buffered_frame() {
                    Ok(Some(frame)) => {
                        if let Step::Violation(message) = self.client_frame(connection, frame)? {
                            self.kill();
                            return connection.refuse(ErrorKind::BadRequest, message);
                        }
                    }
                    Ok(None) => break,
                    Err(error) => return Err(connection.fail(error)),
                }
            }
            if let Some(exit) = self.exit {
                self.drain_output(connection)?;
                return connection.send_json(FrameType::Exit, &exit);
            }
            self.wait_and_move(connection)?;
        }
    }

    /// One `poll` over every live descriptor, then one step on each ready one.
    fn wait_and_move(&mut self, connection: &mut Connection) -> Result<(), Disconnected> {
        let want_client = self.pending_stdin.len() < STDIN_BACKLOG;
        let want_stdin = !self.pending_stdin.is_empty();
        let input = PollFlags::POLLIN;
        let polled = {
            let mut fds = Vec::with_capacity(5);
            let client = slot(&mut fds, want_client.then(|| connection.reader.fd()), input);
            let stdout = slot(&mut fds, self.stdout.as_ref().map(AsFd::as_fd), input);
            let stderr = slot(&mut fds, self.stderr.as_ref().map(AsFd::as_fd), input);
            let stdin = slot(
                &mut fds,
                self.stdin.as_ref().filter(|_| want_stdin).map(AsFd::as_fd),
                PollFlags::POLLOUT,
            );
            let exited = slot(&mut fds, Some(self.exit_pipe.as_fd()), input);
            poll(&mut fds, PollTimeout::NONE).map(|_| {
                let ready = |index: Option<usize>| {
                    index.is_some_and(|index| fds[index].any().unwrap_or(false))
                };
                Ready {
                    client: ready(client),
                    stdout: ready(stdout),
                    stderr: ready(stderr),
                    stdin: ready(stdin),
                    exited: ready(exited),
                }
            })
        };
        let ready = match polled {
            Ok(ready) => ready,
            Err(nix::errno::Errno::EINTR) => return Ok(()),
            Err(errno) => return Err(connection.fail(ReadError::Io(errno.into()))),
        };
        if ready.client {
            match connection.reader.fill() {
                Ok(true) => {}
                // The client is gone: nobody is left to see the output.
                Ok(false) => return Err(Disconnected),
                Err(error) => return Err(connection.fail(ReadError::Io(error))),
            }
        }
        if ready.stdout {
            self.pump(connection, FrameType::Stdout)?;
        }
        if ready.stderr {
            self.pump(connection, FrameType::Stderr)?;
        }
        if ready.stdin {
            self.feed_stdin();
        }
        if ready.exited {
            match crate::reaper::read_exit(&self.exit_pipe) {
                Ok(exit) => self.exit = Some(exit),
                Err(error) => return Err(connection.fail(ReadError::Io(error))),
            }
        }
        Ok(())
    }

    fn client_frame(
        &mut self,
        connection: &mut Connection,
        frame: Frame,
    ) -> Result<Step, Disconnected> {
        match frame.header.frame_type() {
            Some(FrameType::Stdin) => {
                if self.stdin.is_some() && !self.stdin_eof_requested {
                    self.pending_stdin.extend_from_slice(&frame.payload);
                }
                // Otherwise the command did not ask for stdin or closed it: drop the bytes.
            }
            Some(FrameType::StdinEof) => {
                if self.terminal.is_some() && self.stdin.is_some() && !self.stdin_eof_requested {
                    // A terminal's input cannot be closed without hanging the terminal up;
                    // its EOF character ends the command's read instead. Dropping `stdin`
                    // after it closes only that clone: the master stays open.
                    self.pending_stdin.push(pty::END_OF_FILE);
                }
                self.stdin_eof_requested = true;
                if self.pending_stdin.is_empty() {
                    self.stdin = None;
                }
            }
            Some(FrameType::Signal) => {
                let request: protocol::Signal = match protocol::decode_json(&frame.payload) {
                    Ok(request) => request,
                    Err(error) => return Ok(Step::Violation(format!("bad Signal: {error}"))),
                };
                let Ok(signal) = Signal::try_from(request.signal) else {
                    return Ok(Step::Violation(format!(
                        "unknown signal number {}",
                        request.signal
                    )));
                };
                // The group may be gone already; that is not an error.
                let _ = killpg(self.process_group, signal);
            }
            Some(FrameType::Resize) => {
                let window: protocol::WindowSize = match protocol::decode_json(&frame.payload) {
                    Ok(window) => window,
                    Err(error) => return Ok(Step::Violation(format!("bad Resize: {error}"))),
                };
                // A command without a terminal has no size to change: nothing to do. The
                // ioctl can only fail for a descriptor that is not a terminal.
                if let Some(master) = &self.terminal {
                    let _ = pty::set_window_size(master.as_fd(), window);
                }
            }
            Some(FrameType::Hello) => connection.hello(&frame)?,
            Some(other) => {
                return Ok(Step::Violation(format!(
                    "{other:?} is not allowed while a command runs"
                )));
            }
            None => {
                return Ok(Step::Violation(format!(
                    "unknown frame type {:#04x}",
                    frame.header.kind
                )));
            }
        }
        Ok(Step::Continue)
    }

    /// Reads what one pipe has and sends it as one frame; closes it at end of file.
    fn pump(&mut self, connection: &mut Connection, kind: FrameType) -> Result<(), Disconnected> {
        let pipe = match kind {
            FrameType::Stdout => &mut self.stdout,
            _ => &mut self.stderr,
        };
        let Some(file) = pipe else { return Ok(()) };
        match file.read(&mut self.buffer) {
            Ok(0) => *pipe = None,
            Ok(count) => connection.send_bytes(kind, &self.buffer[..count])?,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => *pipe = None,
        }
        Ok(())
    }

    /// After the command exited: sends what its pipes still hold, without waiting for more.
    fn drain_output(&mut self, connection: &mut Connection) -> Result<(), Disconnected> {
        for kind in [FrameType::Stdout, FrameType::Stderr] {
            loop {
                let pipe = match kind {
                    FrameType::Stdout => &mut self.stdout,
                    _ => &mut self.stderr,
                };
                let Some(file) = pipe else { break };
                match file.read(&mut self.buffer) {
                    Ok(0) | Err(_) => {
                        *pipe = None;
                        break;
                    }
                    Ok(count) => connection.send_bytes(kind, &self.buffer[..count])?,
                }
            }
        }
        Ok(())
    }

    fn feed_stdin(&mut self) {
        let Some(stdin) = &mut self.stdin else {
            self.pending_stdin.clear();
            return;
        };
        match stdin.write(&self.pending_stdin) {
            Ok(count) => {
                self.pending_stdin.drain(..count);
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                // The command closed its stdin (EPIPE): the rest has nowhere to go.
                self.stdin = None;
                self.pending_stdin.clear();
            }
        }
        if self.pending_stdin.is_empty() && self.stdin_eof_requested {
            self.stdin = None;
        }
    }

    fn kill(&self) {
        if self.exit.is_none() {
            let _ = killpg(self.process_group, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(clear_env: bool, path: Option<&str>) -> protocol::Exec {
        let mut request = protocol::Exec {
            argv: Some(vec!["true".into()]),
            clear_env,
            ..protocol::Exec::default()
        };
        if let Some(path) = path {
            request.env.insert("PATH".into(), path.into());
        }
        request
    }

    #[test]
    fn clear_env_without_a_path_in_env_gets_the_default_path() {
        let agent = Some(OsString::from("/agent/bin"));
        assert_eq!(command_path(&exec(true, None), agent), DEFAULT_PATH);
        assert_eq!(command_path(&exec(true, None), None), DEFAULT_PATH);
    }

    #[test]
    fn the_agents_path_is_inherited_unless_clear_env() {
        let agent = Some(OsString::from("/agent/bin"));
        assert_eq!(command_path(&exec(false, None), agent), "/agent/bin");
        assert_eq!(command_path(&exec(false, None), None), DEFAULT_PATH);
    }

    #[test]
    fn a_path_in_env_always_wins() {
        for clear_env in [false, true] {
            let agent = Some(OsString::from("/agent/bin"));
            assert_eq!(
                command_path(&exec(clear_env, Some("/mine")), agent),
                "/mine"
            );
        }
    }

    #[test]
    fn the_command_gets_the_path_its_program_was_found_in() {
        let prepared = prepare(&exec(true, None), protocol::PROTOCOL_VERSION)
            .unwrap_or_else(|_| panic!("refused"));
        let path = prepared
            .command
            .get_envs()
            .find(|(name, _)| *name == "PATH")
            .and_then(|(_, value)| value);
        assert_eq!(path, Some(OsStr::new(DEFAULT_PATH)));
    }
}
