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

/// `banger daemon run` in the sandbox, killed if it is still running after 30 s (a daemon that
/// accepted the directory would serve forever).
fn daemon_run_refused(sandbox: &Sandbox) -> crate::support::Output {
    let mut child = sandbox
        .context
        .command(&["daemon", "run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon accepted the runtime directory and served it");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    crate::support::Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn as_root() -> bool {
    crate::support::capable(
        "root, to plant a directory owned by another user",
        nix::unistd::geteuid().is_root(),
    )
}

#[test]
fn a_runtime_directory_planted_by_another_user_is_refused_and_nothing_is_written_through_it() {
    if !as_root() {
        return;
    }
    let sandbox = Sandbox::new();
    let run_dir = sandbox.run_dir();
    std::fs::create_dir_all(&run_dir).unwrap();
    // The attacker's lock "file": a link to a file of the victim's, which a daemon opening it
    // would truncate to write its pid.
    let victim = sandbox.context.root.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, run_dir.join("daemon.lock")).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(65534), Some(65534)).unwrap();
    let output = daemon_run_refused(&sandbox);
    assert_eq!(output.code, Some(2), "an environment error: {output}");
    assert!(
        output.stderr.contains("belongs to uid 65534, not to uid 0"),
        "{output}"
    );
    assert!(output.stderr.contains("BANGER_RUNTIME_DIR"), "{output}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(!run_dir.join("banger.sock").exists());
}

#[test]
fn a_runtime_directory_others_can_write_is_refused() {
    let sandbox = Sandbox::new();
    let run_dir = sandbox.run_dir();
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let output = daemon_run_refused(&sandbox);
    assert_eq!(output.code, Some(2), "an environment error: {output}");
    assert!(
        output
            .stderr
            .contains("is writable by other users (mode 777)"),
        "{output}"
    );
    let entries: Vec<_> = std::fs::read_dir(&run_dir).unwrap().collect();
    assert!(entries.is_empty(), "written in it: {entries:?}");
}

#[test]
fn a_daemon_socket_served_by_another_user_is_never_spoken_to() {
    if !as_root() {
        return;
    }
    let python = std::path::Path::new("/usr/bin/python3");
    if !crate::support::capable(
        "/usr/bin/python3, to serve a socket as nobody",
        python.exists(),
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    // Traversable by nobody down to the socket's directory, which nobody owns.
    std::fs::set_permissions(
        sandbox.context.root.path(),
        std::fs::Permissions::from_mode(0o711),
    )
    .unwrap();
    let run_dir = sandbox.run_dir();
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::set_permissions(
        run_dir.parent().unwrap(),
        std::fs::Permissions::from_mode(0o711),
    )
    .unwrap();
    std::os::unix::fs::chown(&run_dir, Some(65534), Some(65534)).unwrap();
    let socket = run_dir.join("banger.sock");
    // Serves one connection and prints what the client sent (nothing, if it checked first).
    let server = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.bind(sys.argv[1])\n\
                  s.listen(1)\n\
                  print('ready', flush=True)\n\
                  c, _ = s.accept()\n\
                  c.settimeout(10)\n\
                  data = b''\n\
                  while True:\n\
                  \x20   chunk = c.recv(4096)\n\
                  \x20   if not chunk: break\n\
                  \x20   data += chunk\n\
                  print(repr(data), flush=True)\n";
    let mut child = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(python)
        .args(["-c", server])
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    let output = sandbox
        .context
        .command(&["daemon", "status"])
        .env("BANGER_RUNTIME_DIR", &run_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "an environment error: {stderr}"
    );
    assert!(
        stderr.contains("runs as uid 65534, not as uid 0"),
        "{stderr}"
    );
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(
        line, "b''\n",
        "the client sent something to a foreign daemon"
    );
    child.wait().unwrap();
}

#[test]
fn the_daemon_reads_a_url_catalog_without_panicking() {
    use crate::registry::{FakeRegistry, Reply};
    let sandbox = Sandbox::new();
    let catalog = br#"{"version": 1, "images": [{"name": "served-image", "distro": "debian",
        "arch": "x86_64", "kernel_ref": "debian-cloud-amd64", "prefer": "bundle",
        "bundle": {"url": "http://127.0.0.1:9/none.tar.zst", "sha256": "00", "size": 1}}]}"#
        .to_vec();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(FakeRegistry::start(move |path, _| match path {
        "/images.json" => Reply::ok("application/json", catalog.clone()),
        _ => Reply::status(404),
    }));
    let config = sandbox.context.config_file();
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        format!(
            "[catalogs]\nimages = \"http://{}/images.json\"\n",
            server.address
        ),
    )
    .unwrap();
    // Not in the catalog and not an OCI reference: the error lists the served catalog, so the
    // daemon fetched and read it.
    let output = sandbox
        .context
        .run(&["vm", "create", "--image", "Not/An!Image", "--name", "x"]);
    assert_eq!(output.code, Some(1), "{output}");
    assert!(output.stderr.contains("(served-image)"), "{output}");
    assert_eq!(server.count("/images.json"), 1);
    // And it is still there to answer.
    assert_eq!(sandbox.status()["pid"], sandbox.daemon_pid().unwrap());
}

#[test]
fn an_endless_request_line_is_refused_with_the_limit_and_the_daemon_stays_up() {
    use std::io::{BufRead, Write};
    let sandbox = Sandbox::new();
    let pid = sandbox.status()["pid"].clone();
    let mut stream =
        std::os::unix::net::UnixStream::connect(sandbox.run_dir().join("banger.sock")).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    // 2 MiB and no newline: past the cap, the daemon answers without reading the rest.
    let chunk = vec![b'a'; 64 << 10];
    for _ in 0..32 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut answer)
        .unwrap();
    assert!(answer.contains("1048576-byte limit"), "{answer}");
    assert!(
        answer.contains("bad_request") || answer.contains("BadRequest"),
        "{answer}"
    );
    assert_eq!(sandbox.status()["pid"], pid, "the daemon went away");
}

#[test]
fn the_daemon_logs_each_request_and_daemon_logs_prints_them() {
    let sandbox = Sandbox::new();
    let pid = sandbox.status()["pid"].as_i64().unwrap();
    let missing = sandbox.context.run(&["vm", "show", "no-such-vm"]);
    assert_eq!(missing.code, Some(1), "{missing}");
    let logs = sandbox.context.run(&["daemon", "logs"]);
    assert_eq!(logs.code, Some(0), "{logs}");
    let lines: Vec<&str> = logs.stdout.lines().collect();
    assert!(
        lines.iter().any(|line| line.contains("request=\"vm_show\"")
            && line.contains("vm=\"no-such-vm\"")
            && line.contains("request failed")),
        "{logs}"
    );
    assert!(
        lines.iter().any(|line| line.contains("INFO")),
        "info lines by default: {logs}"
    );
    // --tail: only the last line, the failed request.
    let tail = sandbox.context.run(&["daemon", "logs", "-n", "1"]);
    assert_eq!(tail.stdout.lines().count(), 1, "{tail}");
    assert!(tail.stdout.contains("request failed"), "{tail}");
    // The daemon that wrote them is the one still running.
    assert_eq!(sandbox.status()["pid"].as_i64().unwrap(), pid);
}
