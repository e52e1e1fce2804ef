//! `banger daemon`: started on demand, one per user, a 0600 socket, nothing left after stop,
//! and a daemon killed with SIGKILL replaced by the next command.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::support::TestContext;

/// A sandbox whose daemon is stopped (or killed) when the test ends, whatever happens.
struct Sandbox {
    context: TestContext,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            context: TestContext::new(),
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.context.root.path().join("run/banger")
    }

    fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.run_dir().join("daemon.lock"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    fn status(&self) -> serde_json::Value {
        let output = self.context.run(&["--json", "daemon", "status"]);
        assert_eq!(output.code, Some(0), "{output}");
        let record: serde_json::Value = serde_json::from_str(output.stdout.trim()).unwrap();
        assert_eq!(record["type"], "daemon", "{output}");
        record["data"].clone()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.context.run(&["daemon", "stop"]);
        if let Some(pid) = self.daemon_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped by init) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn wait_gone(pid: i32) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while alive(pid) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

#[test]
fn the_daemon_starts_on_demand_and_stop_leaves_nothing() {
    let sandbox = Sandbox::new();
    let status = sandbox.status();
    let pid = status["pid"].as_u64().unwrap() as i32;
    assert!(alive(pid));
    assert_eq!(sandbox.daemon_pid(), Some(pid));
    let socket = sandbox.run_dir().join("banger.sock");
    assert_eq!(status["socket"], "[ROOT]/run/banger/banger.sock");
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode();
    assert_eq!(
        mode(&socket) & 0o777,
        0o600,
        "the socket is the user's alone"
    );
    assert_eq!(mode(&sandbox.run_dir()) & 0o777, 0o700);

    // The same daemon answers the next command.
    let again = sandbox.status();
    assert_eq!(again["pid"], status["pid"]);
    assert!(again["connections"].as_u64().unwrap() >= 2);

    let stop = sandbox.context.run(&["daemon", "stop"]);
    assert_eq!(stop.code, Some(0), "{stop}");
    assert!(stop.stderr.contains(&format!("pid {pid}")), "{stop}");
    assert!(wait_gone(pid), "the daemon is still running after stop");
    let left: Vec<_> = std::fs::read_dir(sandbox.run_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let again = sandbox.context.run(&["daemon", "stop"]);
    assert_eq!(again.code, Some(0), "{again}");
    assert!(again.stderr.contains("no daemon was running"), "{again}");
}

#[test]
fn a_daemon_killed_with_sigkill_is_replaced_by_the_next_command() {
    let sandbox = Sandbox::new();
    let first = sandbox.status()["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_gone(first));
    // Its socket and lock file are still there; the lock itself died with it.
    assert!(sandbox.run_dir().join("banger.sock").exists());
    let second = sandbox.status()["pid"].as_u64().unwrap() as i32;
    assert_ne!(second, first);
    assert!(alive(second));
}

#[test]
fn a_second_daemon_refuses_to_start_and_leaves_the_first_alone() {
    let sandbox = Sandbox::new();
    let pid = sandbox.status()["pid"].as_u64().unwrap();
    let second = sandbox.context.run(&["daemon", "run"]);
    assert_ne!(second.code, Some(0), "{second}");
    assert!(
        second
            .stderr
            .contains(&format!("already running (pid {pid})")),
        "{second}"
    );
    assert_eq!(sandbox.status()["pid"].as_u64().unwrap(), pid);
}

#[test]
fn concurrent_commands_share_one_daemon() {
    let sandbox = Sandbox::new();
    let children: Vec<_> = (0..4)
        .map(|_| {
            sandbox
                .context
                .command(&["--json", "daemon", "status"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut pids = Vec::new();
    for child in children {
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let record: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        pids.push(record["data"]["pid"].as_u64().unwrap());
    }
    pids.dedup();
    assert_eq!(pids.len(), 1, "more than one daemon: {pids:?}");
}

#[test]
fn a_daemon_that_cannot_start_says_why_and_leaves_nothing_running() {
    let sandbox = Sandbox::new();
    // A directory where the daemon's lock file goes: it cannot take the lock.
    std::fs::create_dir_all(sandbox.run_dir().join("daemon.lock")).unwrap();
    let output = sandbox.context.run(&["daemon", "status"]);
    assert_ne!(output.code, Some(0), "{output}");
    assert!(
        output.stderr.contains("the daemon did not start"),
        "{output}"
    );
    assert!(output.stderr.contains("logs/daemon.log"), "{output}");
    assert!(
        output.stderr.contains("daemon.lock"),
        "the daemon's own reason is shown: {output}"
    );
    assert!(!sandbox.run_dir().join("banger.sock").exists());
}
