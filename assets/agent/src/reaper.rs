//! The one place that waits for child processes.
//!
//! As the guest's PID 1 the agent inherits every orphan, so it must reap with `waitpid(-1)`;
//! a per-command `wait` would race with that and lose exit statuses. So every process is
//! waited for here, and the commands the protocol started get their status delivered:
//!
//! 1. [`Reaper::start`] blocks SIGCHLD (and, as PID 1, the shutdown signals) in the calling
//!    thread, before any other thread exists, so every later thread inherits the mask and
//!    only the reaper thread receives them, through `sigwait`.
//! 2. [`Reaper::spawn`] starts a command while holding the registry lock and registers its pid
//!    with the write end of a pipe. For the spawn itself the thread's mask is emptied, since
//!    children inherit it and std does not reset it; a SIGCHLD swallowed in that window is
//!    made up for by raising one afterwards.
//! 3. On SIGCHLD the reaper finds exited children with `waitid(WNOWAIT)` (looking without
//!    reaping), takes the registry lock, and only then reaps: a pid being spawned is
//!    registered by the time the lock is free, and a child whose exec failed has already
//!    been reaped by std, so neither races. A registered child's status goes as 8 bytes on
//!    its pipe, which the exec loop polls like any other descriptor; orphans (PID 1
//!    inherits them) are just reaped.
//!
//! Weaknesses: statuses are encoded by hand on a pipe, which keeps the exec loop a single
//! `poll` with no thread per command. As PID 1, a SIGTERM arriving during the microseconds of
//! a spawn is lost (init ignores signals it has not blocked or handled).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use nix::libc;
use nix::sys::signal::{SigSet, Signal};

use crate::protocol::Exit;

/// Receives the signals that ask PID 1 to shut down.
pub type ShutdownHandler = Box<dyn Fn(Signal) + Send + 'static>;

/// Waits for every child and hands registered ones their status.
#[derive(Debug, Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, File>>,
}

impl Reaper {
    /// Blocks the signals the reaper handles and starts its thread. Call before starting any
    /// other thread. `on_shutdown`, for PID 1, receives SIGTERM, SIGINT (Ctrl-Alt-Del) and
    /// SIGPWR.
    pub fn start(on_shutdown: Option<ShutdownHandler>) -> io::Result<Arc<Reaper>> {
        let mut signals = SigSet::empty();
        signals.add(Signal::SIGCHLD);
        if on_shutdown.is_some() {
            signals.add(Signal::SIGTERM);
            signals.add(Signal::SIGINT);
            signals.add(Signal::SIGPWR);
        }
        signals.thread_block().map_err(io::Error::from)?;
        let reaper = Arc::new(Reaper::default());
        let thread_reaper = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || thread_reaper.run(signals, on_shutdown))?;
        Ok(reaper)
    }

    fn run(&self, signals: SigSet, on_shutdown: Option<ShutdownHandler>) {
        loop {
            match signals.wait() {
                Ok(Signal::SIGCHLD) => self.reap_all(),
                Ok(other) => {
                    if let Some(handler) = &on_shutdown {
                        handler(other);
                    }
                }
                Err(_) => continue,
            }
        }
    }

    fn reap_all(&self) {
        while let Some(pid) = peek_exited_child() {
            // Taken before reaping: a pid being spawned right now is registered by the time
            // this lock is ours, and a failed spawn has been reaped by std already.
            let mut waiters = self
                .waiters
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let Some(exit) = reap(pid) else { continue };
            if let Some(mut pipe) = waiters.remove(&pid) {
                // The reader may be gone (its client disconnected): nothing to tell then.
                let _ = pipe.write_all(&encode_exit(exit));
            }
        }
    }

    /// Starts `command` and registers it; the returned pipe becomes readable with its
    /// [`Exit`] (read it with [`read_exit`]).
    pub fn spawn(&self, command: &mut Command) -> io::Result<(Child, OwnedFd)> {
        let (read_end, write_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let mut waiters = self
            .waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The child inherits this thread's signal mask (std does not reset it), so unblock
        // the reaper's signals just for the spawn. A SIGCHLD that lands in this thread
        // meanwhile is discarded (its default action is to ignore it), so one is raised
        // again afterwards to make the reaper look at every child.
        let old_mask = SigSet::thread_get_mask().map_err(io::Error::from)?;
        SigSet::empty().thread_set_mask().map_err(io::Error::from)?;
        let spawned = command.spawn();
        old_mask.thread_set_mask().map_err(io::Error::from)?;
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGCHLD);
        let child = spawned?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        waiters.insert(pid, File::from(write_end));
        Ok((child, read_end))
    }
}

/// The pid of a child that has exited, left unreaped (`WNOWAIT`), if there is one.
///
/// Raw `waitid` because nix's wrapper fails on signals it has no name for (real-time ones),
/// and then the pid would be lost.
fn peek_exited_child() -> Option<i32> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
        #[allow(unsafe_code)]
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t that outlives the call.
        #[allow(unsafe_code)]
        let result = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if result != 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return None; // ECHILD: no children at all.
        }
        // SAFETY: waitid filled `info` for a SIGCHLD (or left it zeroed with WNOHANG), and
        // si_pid is valid for both.
        #[allow(unsafe_code)]
        let pid = unsafe { info.si_pid() };
        return (pid != 0).then_some(pid);
    }
}

/// Reaps `pid`, which has exited; `None` if someone else reaped it first.
fn reap(pid: i32) -> Option<Exit> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid, writable int that outlives the call.
        #[allow(unsafe_code)]
        let result = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if result == pid {
            break;
        }
        if result < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return None;
    }
    Some(if libc::WIFSIGNALED(status) {
        Exit {
            code: None,
            signal: Some(libc::WTERMSIG(status)),
        }
    } else {
        Exit {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
        }
    })
}

fn encode_exit(exit: Exit) -> [u8; 8] {
    let (kind, value) = match (exit.code, exit.signal) {
        (Some(code), _) => (0i32, code),
        (None, Some(signal)) => (1, signal),
        (None, None) => (0, 0),
    };
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&kind.to_ne_bytes());
    bytes[4..].copy_from_slice(&value.to_ne_bytes());
    bytes
}

/// Reads the status the reaper wrote to a command's pipe.
pub fn read_exit(pipe: &OwnedFd) -> io::Result<Exit> {
    let mut file = File::from(pipe.try_clone()?);
    let mut bytes = [0u8; 8];
    file.read_exact(&mut bytes)?;
    let kind = i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let value = i32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    Ok(if kind == 1 {
        Exit {
            code: None,
            signal: Some(value),
        }
    } else {
        Exit {
            code: Some(value),
            signal: None,
        }
    })
}
