//! Processes that outlive the daemon that started them (VMMs, `vhost-device-vsock`).
//!
//! A VM keeps running when the daemon stops or is killed, so the daemon cannot rely on child
//! handles: it records each process as a [`ProcessHandle`] (pid plus the kernel's start time
//! of that pid) in the VM's scratch file and finds it again after a restart. The start time
//! is what makes a recorded pid safe to signal: a pid reused by another program has another
//! start time, and is treated as gone.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// Makes a child started from `command` die (SIGKILL) when the thread that spawns it exits,
/// which for banger means when the process dies, however it dies: a throwaway VM (a builder,
/// a smoke test) must never outlive the command that started it, even one killed with
/// SIGKILL, which runs no cleanup. Spawn from async code: tokio's worker threads live as long
/// as the runtime, while its blocking-pool threads exit when idle, which would fire the
/// signal early.
pub fn die_with_parent(command: &mut tokio::process::Command) {
    let parent = nix::unistd::getpid();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2) and
    // getppid(2), which are async-signal-safe; it reads one copied pid and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The parent may have died before the signal was armed: then nobody would stop us.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("the parent exited during spawn"));
            }
            Ok(())
        });
    }
}

/// One process, identified beyond its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessHandle {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`: clock ticks after boot at which it started.
    pub start_ticks: u64,
}

/// What `/proc/PID/stat` says: the state letter and the start time.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the
    // last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); the start time is field 22.
    let start_ticks = fields.nth(18)?.parse().ok()?;
    Some((state, start_ticks))
}

impl ProcessHandle {
    /// The handle of a running process, `None` when `pid` does not exist.
    pub fn of(pid: u32) -> Option<ProcessHandle> {
        let (_, start_ticks) = stat(pid)?;
        Some(ProcessHandle { pid, start_ticks })
    }

    /// Whether this very process still runs (a zombie, or a reused pid, does not).
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some((state, ticks))
            if ticks == self.start_ticks && state != 'Z' && state != 'X')
    }

    /// Sends `signal` if the process still runs; whether it was sent.
    pub fn signal(&self, signal: Signal) -> bool {
        self.is_alive()
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal).is_ok()
    }

    /// Waits until the process is gone; whether it went within `timeout`.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.is_alive() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it is still there after `grace`; waits until it is gone.
    pub async fn terminate(&self, grace: Duration) -> bool {
        if self.signal(Signal::SIGTERM) && self.wait_gone(grace).await {
            return true;
        }
        self.kill().await
    }

    /// SIGKILL, and waits (briefly) until it is gone.
    pub async fn kill(&self) -> bool {
        self.signal(Signal::SIGKILL);
        self.wait_gone(Duration::from_secs(5)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_follows_one_process_and_not_its_pid() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let handle = ProcessHandle::of(child.id()).unwrap();
        assert!(handle.is_alive());
        let reused = ProcessHandle {
            start_ticks: handle.start_ticks + 1,
            ..handle
        };
        assert!(!reused.is_alive(), "another start time is another process");
        assert!(!reused.signal(Signal::SIGKILL));
        assert!(handle.is_alive(), "the real one was not signalled");
        assert!(handle.signal(Signal::SIGKILL));
        // Not reaped yet: a zombie counts as gone.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert!(runtime.block_on(handle.wait_gone(Duration::from_secs(5))));
        child.wait().unwrap();
        assert!(!handle.is_alive());
        assert!(ProcessHandle::of(u32::MAX).is_none());
    }

    #[test]
    fn stat_fields_are_read_past_odd_command_names() {
        let me = ProcessHandle::of(std::process::id()).unwrap();
        assert!(me.start_ticks > 0);
        assert!(me.is_alive());
    }
}
