//! Pseudo-terminals for `Exec { tty: true }`: the system calls, so `exec.rs` only moves bytes.
//!
//! 1. [`Pty::open`] creates a master/slave pair, both close-on-exec from the start (another
//!    connection's thread may be spawning at the same moment, and a slave leaked into its
//!    command would keep ours from ever seeing end of output), with the window size already
//!    set, so the command reads the right size from its first instruction.
//! 2. [`Pty::attach`] makes the slave the command's stdin, stdout and stderr, and, in the
//!    child between `fork` and `exec`, starts a new session whose controlling terminal it is.
//!    The command's pid is then also its process group, so `killpg` reaches it as with pipes.
//! 3. The master stays with the agent: output is read from it, input written to it, and
//!    [`set_window_size`] resizes it (the kernel sends SIGWINCH to the foreground process
//!    group).
//!
//! Once every slave descriptor is closed, reading the master gives the output still buffered
//! and then EIO, Linux's end of file for a pty.
//!
//! `unsafe` is confined to this module: two `ioctl`s nix has no wrapper for (TIOCSWINSZ,
//! TIOCSCTTY) and `pre_exec`, each with its own `SAFETY` note.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::fcntl::OFlag;
use nix::libc;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::stat::Mode;

use crate::protocol::WindowSize;

/// `TERM` for a command on a pseudo-terminal whose request sets none: what the terminals the
/// host runs in (and `docker exec -t`'s users) nearly always are.
pub const DEFAULT_TERM: &str = "xterm-256color";

/// What a tty's line discipline reads as end of file (VEOF, ^D, in its default settings).
/// Written once for `StdinEof`, as `docker exec -t` effectively does: the master stays open
/// because closing it would hang the terminal up.
pub const END_OF_FILE: u8 = 0x04;

/// A new pseudo-terminal pair, before the command starts.
#[derive(Debug)]
pub struct Pty {
    pub master: OwnedFd,
    slave: OwnedFd,
}

/// Why a pseudo-terminal could not be set up, with the step that failed.
#[derive(Debug)]
pub struct PtyError {
    pub step: &'static str,
    pub error: io::Error,
}

impl std::fmt::Display for PtyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot {}: {}", self.step, self.error)
    }
}

impl std::error::Error for PtyError {}

fn failed(step: &'static str) -> impl Fn(nix::errno::Errno) -> PtyError {
    move |errno| PtyError {
        step,
        error: errno.into(),
    }
}

impl Pty {
    /// Opens a pair through `/dev/ptmx` and sets its window size when one is given.
    pub fn open(window: Option<WindowSize>) -> Result<Pty, PtyError> {
        let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let master = posix_openpt(flags).map_err(failed("open /dev/ptmx (is devpts mounted?)"))?;
        grantpt(&master).map_err(failed("grant the pseudo-terminal"))?;
        unlockpt(&master).map_err(failed("unlock the pseudo-terminal"))?;
        let slave_path = ptsname_r(&master).map_err(failed("name the pseudo-terminal"))?;
        let slave = nix::fcntl::open(slave_path.as_str(), flags, Mode::empty())
            .map_err(failed("open the pseudo-terminal's slave"))?;
        let pty = Pty {
            master: OwnedFd::from(master),
            slave,
        };
        if let Some(window) = window {
            set_window_size(pty.master.as_fd(), window).map_err(|error| PtyError {
                step: "set the window size",
                error,
            })?;
        }
        Ok(pty)
    }

    /// Connects `command` to the slave and gives it a session of its own with the slave as
    /// controlling terminal; returns the master. The slave copies live in `command`: drop it
    /// once the child has started, or the master never reports end of output.
    pub fn attach(self, command: &mut Command) -> io::Result<OwnedFd> {
        command
            .stdin(Stdio::from(self.slave.try_clone()?))
            .stdout(Stdio::from(self.slave.try_clone()?))
            .stderr(Stdio::from(self.slave));
        // SAFETY: the closure runs in the forked child before `exec`, where only
        // async-signal-safe calls are allowed: it makes two system calls (setsid, ioctl),
        // allocates nothing and takes no locks. It must not be combined with
        // `process_group`: a process group leader cannot call setsid (EPERM), and the new
        // session is a new process group anyway.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(become_session_leader_of_stdin);
        }
        Ok(self.master)
    }
}

/// In the child: a new session, with stdin (by now the slave) as its controlling terminal.
fn become_session_leader_of_stdin() -> io::Result<()> {
    nix::unistd::setsid()?;
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal a terminal that is some
    // other session's) and touches no memory of ours; fd 0 is open (std has just duplicated
    // the slave onto it).
    #[allow(unsafe_code)]
    let result = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the terminal's size; the kernel sends SIGWINCH to its foreground process group when
/// the size changes.
pub fn set_window_size(terminal: BorrowedFd<'_>, window: WindowSize) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: window.rows,
        ws_col: window.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `terminal` is an open descriptor for the duration of the call, and TIOCSWINSZ
    // only reads the `winsize` behind the pointer, which lives until the call returns.
    #[allow(unsafe_code)]
    let result = unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_pty_has_the_requested_window_size_and_both_ends_are_close_on_exec() {
        let pty = Pty::open(Some(WindowSize {
            rows: 33,
            cols: 101,
        }))
        .unwrap();
        let size = nix::sys::termios::tcgetattr(&pty.slave).map(|_| ());
        assert!(size.is_ok(), "the slave is a terminal: {size:?}");
        let mut read_back = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: the slave is open and TIOCGWINSZ writes one winsize into `read_back`.
        #[allow(unsafe_code)]
        let result =
            unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut read_back) };
        assert_eq!(result, 0);
        assert_eq!((read_back.ws_row, read_back.ws_col), (33, 101));
        for fd in [&pty.master, &pty.slave] {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
    }
}
