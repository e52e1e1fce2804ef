//! `banger-agent session …` end to end: the real binary, with its session directory in a
//! temporary directory per test ([`Sandbox`]). Every process a session starts is killed when
//! its sandbox drops, identified by the pid *and* start time its `meta.json` records.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_banger-agent");
/// Upper bound for any one agent invocation; generous for loaded CI machines.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for a condition the test waits for.
const WAIT_TIMEOUT: Duration = Duration::from_secs(15);

/// A session root of its own, and cleanup of everything started in it.
struct Sandbox {
    root: PathBuf,
    log_cap: Option<u64>,
}

#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Sandbox {
    fn new(test: &str) -> Sandbox {
        let root = std::env::temp_dir().join(format!(
            "banger-agent-session-test-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        Sandbox {
            root: root.join("sessions"),
            log_cap: None,
        }
    }

    fn with_log_cap(test: &str, cap: u64) -> Sandbox {
        let mut sandbox = Sandbox::new(test);
        sandbox.log_cap = Some(cap);
        sandbox
    }

    fn command(&self, arguments: &[&str]) -> Command {
        let mut command = Command::new(AGENT);
        command
            .arg("session")
            .args(arguments)
            .env("BANGER_AGENT_SESSION_DIR", &self.root)
            .env_remove("BANGER_AGENT_SESSION_LOG_CAP");
        if let Some(cap) = self.log_cap {
            command.env("BANGER_AGENT_SESSION_LOG_CAP", cap.to_string());
        }
        command
    }

    /// Runs `session ARGUMENTS…` with `stdin`; panics if it or its output pipes outlast
    /// [`RUN_TIMEOUT`].
    fn run(&self, arguments: &[&str], stdin: &[u8]) -> Outcome {
        run_with_timeout(self.command(arguments), stdin, RUN_TIMEOUT)
    }

    /// Runs `session ARGUMENTS…` and requires exit code 0.
    fn ok(&self, arguments: &[&str]) -> String {
        let outcome = self.run(arguments, b"");
        assert_eq!(outcome.code, Some(0), "session {arguments:?}: {outcome:?}");
        outcome.stdout
    }

    fn show(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["show", name, "--json"])).unwrap()
    }

    fn meta(&self, name: &str) -> Value {
        let text = std::fs::read_to_string(self.root.join(name).join("meta.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn logs(&self, name: &str) -> String {
        self.ok(&["logs", name])
    }

    fn wait_for_state(&self, name: &str, state: &str) -> Value {
        let mut last = Value::Null;
        let reached = wait_until(WAIT_TIMEOUT, || {
            last = self.show(name);
            last["state"] == state
        });
        assert!(reached, "session {name} never became {state}: {last}");
        last
    }

    fn wait_for_log(&self, name: &str, text: &str) {
        let mut last = String::new();
        let seen = wait_until(WAIT_TIMEOUT, || {
            last = self.logs(name);
            last.contains(text)
        });
        assert!(
            seen,
            "session {name} never logged {text:?}; its log: {last:?}"
        );
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path().join("meta.json")) else {
                continue;
            };
            let Ok(meta) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let identity = |pid: &str, ticks: &str| {
                let pid = meta[pid].as_i64().and_then(|pid| i32::try_from(pid).ok())?;
                alive_as(pid, meta[ticks].as_u64()).then_some(pid)
            };
            if let Some(command) = identity("pid", "pid_start_ticks") {
                let _ = killpg(Pid::from_raw(command), Signal::SIGKILL);
            }
            if let Some(supervisor) = identity("supervisor_pid", "supervisor_start_ticks") {
                let _ = kill(Pid::from_raw(supervisor), Signal::SIGKILL);
            }
        }
        if let Some(parent) = self.root.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

fn run_with_timeout(mut command: Command, stdin: &[u8], timeout: Duration) -> Outcome {
    let description = format!("{command:?}");
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut child_stdin = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    std::thread::spawn(move || {
        // Dropping it afterwards is the command's EOF.
        let _ = child_stdin.write_all(&input);
    });
    let (sender, receiver) = mpsc::channel();
    let pipes: [(usize, Box<dyn Read + Send>); 2] = [
        (0, Box::new(child.stdout.take().unwrap())),
        (1, Box::new(child.stderr.take().unwrap())),
    ];
    for (index, mut pipe) in pipes {
        let sender = sender.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = sender.send((index, bytes));
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{description} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut outputs = [String::new(), String::new()];
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let (index, bytes) = receiver.recv_timeout(left).unwrap_or_else(|_| {
            panic!("{description} exited, but something it started keeps its output open")
        });
        outputs[index] = String::from_utf8_lossy(&bytes).into_owned();
    }
    let [stdout, stderr] = outputs;
    Outcome {
        code: status.code(),
        stdout,
        stderr,
    }
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `(state, process group, start ticks)` from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(2)?.parse().ok()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// Whether `pid` runs (not a zombie) and, if `start_ticks` is known, is that process.
fn alive_as(pid: i32, start_ticks: Option<u64>) -> bool {
    stat(pid).is_some_and(|(state, _, ticks)| {
        state != 'Z' && state != 'X' && start_ticks.is_none_or(|expected| expected == ticks)
    })
}

fn pid_of(record: &Value) -> i32 {
    i32::try_from(record["pid"].as_i64().unwrap()).unwrap()
}

#[test]
fn start_returns_at_once_while_the_command_runs_and_reads_what_send_sends() {
    let sandbox = Sandbox::new("start");
    let started = Instant::now();
    // run() fails the test if `start` waits for the command (it sleeps 100 s) or leaves
    // something holding its stdout or stderr.
    let outcome = sandbox.run(
        &[
            "start",
            "--json",
            "--",
            "sh",
            "-c",
            "echo hello; read line; echo got:$line; sleep 100",
        ],
        b"",
    );
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "start took {:?}",
        started.elapsed()
    );
    let record: Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(record["name"], "s1");
    assert_eq!(record["state"], "running");
    assert_eq!(
        record["argv"],
        serde_json::json!([
            "sh",
            "-c",
            "echo hello; read line; echo got:$line; sleep 100"
        ])
    );
    let pid = pid_of(&record);
    assert!(
        alive_as(pid, None),
        "the command (pid {pid}) is not running"
    );

    sandbox.wait_for_log("s1", "hello");
    let sent = sandbox.run(&["send", "s1"], b"x\n");
    assert_eq!(sent.code, Some(0), "{sent:?}");
    sandbox.wait_for_log("s1", "got:x");
    assert_eq!(sandbox.logs("s1"), "hello\ngot:x\n");

    let list: Value = serde_json::from_str(&sandbox.ok(&["list", "--json"])).unwrap();
    let sessions = list.as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{list}");
    assert_eq!(sessions[0]["state"], "running");
    assert_eq!(pid_of(&sessions[0]), pid);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.starts_with(b"sh\0-c\0"), "{cmdline:?}");
    let text = sandbox.ok(&["list"]);
    assert!(
        text.lines().nth(1).is_some_and(|row| row.starts_with("s1")
            && row.contains("running")
            && row.contains(&pid.to_string())),
        "{text}"
    );
}

#[test]
fn killing_the_starters_process_group_leaves_the_session_running() {
    let sandbox = Sandbox::new("pgroup");
    // The starter runs inside a shell that outlives it, in a process group of its own,
    // as under an Exec; the group still has a member when it is killed.
    let mut starter = Command::new("sh");
    starter
        .arg("-c")
        .arg(r#""$0" session start --name survivor -- sleep 100 && sleep 100"#)
        .arg(AGENT)
        .env("BANGER_AGENT_SESSION_DIR", &sandbox.root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    let mut starter = starter.spawn().unwrap();
    let group = Pid::from_raw(i32::try_from(starter.id()).unwrap());
    let started = wait_until(WAIT_TIMEOUT, || {
        sandbox.root.join("survivor/meta.json").exists()
            && sandbox.show("survivor")["state"] == "running"
    });
    assert!(started, "the session never started");
    killpg(group, Signal::SIGKILL).unwrap();
    starter.wait().unwrap();

    std::thread::sleep(Duration::from_millis(300));
    let record = sandbox.show("survivor");
    assert_eq!(record["state"], "running", "{record}");
    let pid = pid_of(&record);
    assert!(
        alive_as(pid, None),
        "the command (pid {pid}) died with the starter"
    );
    let supervisor = sandbox.meta("survivor")["supervisor_pid"].as_i64().unwrap();
    let (_, supervisor_group, _) = stat(i32::try_from(supervisor).unwrap()).unwrap();
    assert_ne!(supervisor_group, group.as_raw());
}

#[test]
fn stop_ends_a_session_with_sigterm_and_its_state_says_so() {
    let sandbox = Sandbox::new("stop");
    assert_eq!(
        sandbox.ok(&["start", "--name", "web", "--", "sleep", "100"]),
        "web\n"
    );
    let pid = pid_of(&sandbox.show("web"));
    let stopped: Value = serde_json::from_str(&sandbox.ok(&["stop", "web", "--json"])).unwrap();
    assert_eq!(stopped["state"], "killed", "{stopped}");
    assert_eq!(stopped["signal"], 15);
    assert_eq!(stopped["exit_code"], Value::Null);
    assert!(stopped["ended_unix_ms"].as_u64().is_some());
    assert!(!alive_as(pid, None), "pid {pid} survived stop");
    let list: Value = serde_json::from_str(&sandbox.ok(&["list", "--json"])).unwrap();
    assert_eq!(list[0]["state"], "killed");
    assert!(
        sandbox
            .ok(&["show", "web"])
            .contains("state: killed by signal 15 (SIGTERM)")
    );
}

#[test]
fn stop_sends_sigkill_when_sigterm_is_ignored() {
    let sandbox = Sandbox::new("stop-kill");
    sandbox.ok(&[
        "start",
        "--name",
        "stubborn",
        "--",
        "sh",
        "-c",
        "trap '' TERM; echo trapped; while :; do sleep 0.1; done",
    ]);
    sandbox.wait_for_log("stubborn", "trapped");
    let stopped: Value =
        serde_json::from_str(&sandbox.ok(&["stop", "stubborn", "--timeout", "0.5", "--json"]))
            .unwrap();
    assert_eq!(stopped["state"], "killed", "{stopped}");
    assert_eq!(stopped["signal"], 9);
}

#[test]
fn kill_sends_the_named_signal_to_the_command() {
    let sandbox = Sandbox::new("kill");
    sandbox.ok(&["start", "--name", "k", "--", "sleep", "100"]);
    sandbox.ok(&["kill", "k", "--signal", "USR1"]);
    let record = sandbox.wait_for_state("k", "killed");
    assert_eq!(record["signal"], 10, "{record}");
    let again = sandbox.run(&["kill", "k"], b"");
    assert_eq!(again.code, Some(4), "{again:?}");
    assert!(again.stderr.contains("not running"), "{again:?}");
}

#[test]
fn logs_follow_returns_once_the_session_ends() {
    let sandbox = Sandbox::new("follow");
    sandbox.ok(&[
        "start",
        "--name",
        "f",
        "--",
        "sh",
        "-c",
        "echo one; sleep 1; echo two; exit 3",
    ]);
    let followed = sandbox.run(&["logs", "f", "-f"], b"");
    assert_eq!(followed.code, Some(0), "{followed:?}");
    // "two" comes a second after start returned: only a follower sees it.
    assert_eq!(followed.stdout, "one\ntwo\n");
    let record = sandbox.show("f");
    assert_eq!(record["state"], "exited");
    assert_eq!(record["exit_code"], 3);
}

#[test]
fn logs_follow_keeps_up_across_rotations() {
    let sandbox = Sandbox::with_log_cap("follow-rotation", 1000);
    sandbox.ok(&[
        "start",
        "--name",
        "chatty",
        "--",
        "sh",
        "-c",
        "i=1; while [ $i -le 300 ]; do echo line-$i; i=$((i+1)); sleep 0.01; done",
    ]);
    let followed = sandbox.run(&["logs", "chatty", "--follow"], b"");
    assert_eq!(followed.code, Some(0), "{followed:?}");
    let expected: String = (1..=300).map(|line| format!("line-{line}\n")).collect();
    assert!(
        expected.len() > 2000,
        "the output must rotate at least twice"
    );
    assert_eq!(followed.stdout, expected);
}

#[test]
fn log_rotation_keeps_the_newest_output_under_the_cap() {
    let sandbox = Sandbox::with_log_cap("rotation", 1000);
    sandbox.ok(&[
        "start",
        "--name",
        "many",
        "--",
        "sh",
        "-c",
        "i=1; while [ $i -le 2000 ]; do echo $i; i=$((i+1)); done",
    ]);
    sandbox.wait_for_state("many", "exited");
    let dir = sandbox.root.join("many");
    let size = |file: &str| std::fs::metadata(dir.join(file)).unwrap().len();
    assert!(size("log") <= 1000, "log is {} bytes", size("log"));
    assert_eq!(size("log.1"), 1000);

    let everything: String = (1..=2000).map(|line| format!("{line}\n")).collect();
    let kept = sandbox.logs("many");
    assert_eq!(kept.len() as u64, size("log.1") + size("log"));
    assert!(
        everything.ends_with(&kept),
        "not the newest output: {kept:?}"
    );
    assert_eq!(
        sandbox.ok(&["logs", "many", "--tail", "3"]),
        "1998\n1999\n2000\n"
    );
}

#[test]
fn a_command_that_cannot_start_fails_start_with_code_5() {
    let sandbox = Sandbox::new("cannot-start");
    let missing = sandbox.run(&["start", "--", "no-such-program-for-banger"], b"");
    assert_eq!(missing.code, Some(5), "{missing:?}");
    assert!(
        missing
            .stderr
            .contains("`no-such-program-for-banger`: not found"),
        "{missing:?}"
    );
    let bad_cwd = sandbox.run(&["start", "-w", "/no/such/dir", "--", "true"], b"");
    assert_eq!(bad_cwd.code, Some(5), "{bad_cwd:?}");
    assert!(bad_cwd.stderr.contains("/no/such/dir"), "{bad_cwd:?}");
    let not_executable = sandbox.run(&["start", "--", "/etc/hostname"], b"");
    assert_eq!(not_executable.code, Some(5), "{not_executable:?}");
    // Nothing was left behind under the names tried.
    assert_eq!(sandbox.ok(&["list", "--json"]).trim(), "[]");
}

#[test]
fn environment_and_working_directory_reach_the_command() {
    let sandbox = Sandbox::new("env");
    sandbox.ok(&[
        "start",
        "--name",
        "where",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd",
    ]);
    sandbox.wait_for_state("where", "exited");
    assert_eq!(sandbox.logs("where"), "hi there\n/tmp\n");
    assert_eq!(sandbox.show("where")["cwd"], "/tmp");
}

#[test]
fn invalid_names_and_names_of_running_sessions_are_refused() {
    let sandbox = Sandbox::new("names");
    let too_long = "a".repeat(65);
    for bad in ["-x", ".hidden", "a/b", "..", "a b", too_long.as_str()] {
        let outcome = sandbox.run(&["start", "--name", bad, "--", "true"], b"");
        assert_eq!(outcome.code, Some(2), "{bad}: {outcome:?}");
        assert!(
            outcome.stderr.contains("invalid session name"),
            "{outcome:?}"
        );
    }
    assert_eq!(
        sandbox.ok(&["start", "--name", "web", "--", "sleep", "100"]),
        "web\n"
    );
    let duplicate = sandbox.run(&["start", "--name", "web", "--", "true"], b"");
    assert_eq!(duplicate.code, Some(4), "{duplicate:?}");
    assert!(
        duplicate.stderr.contains("session web is running"),
        "{duplicate:?}"
    );

    // Once it has ended, the name is free again and the new session replaces the old.
    sandbox.ok(&["stop", "web"]);
    sandbox.ok(&["start", "--name", "web", "--", "sh", "-c", "echo second"]);
    sandbox.wait_for_state("web", "exited");
    assert_eq!(sandbox.logs("web"), "second\n");

    // Generated names skip every name in use.
    assert_eq!(sandbox.ok(&["start", "true"]), "s1\n");
    assert_eq!(sandbox.ok(&["start", "true"]), "s2\n");
}

#[test]
fn a_supervisor_killed_with_sigkill_leaves_a_lost_session() {
    let sandbox = Sandbox::new("lost");
    sandbox.ok(&["start", "--name", "orphan", "--", "sleep", "100"]);
    let meta = sandbox.meta("orphan");
    let supervisor = i32::try_from(meta["supervisor_pid"].as_i64().unwrap()).unwrap();
    assert!(alive_as(
        supervisor,
        meta["supervisor_start_ticks"].as_u64()
    ));
    kill(Pid::from_raw(supervisor), Signal::SIGKILL).unwrap();
    let record = sandbox.wait_for_state("orphan", "lost");
    assert_eq!(record["exit_code"], Value::Null);

    // Its command outlived the supervisor: the name stays taken until it is gone, and
    // `kill` still reaches it.
    let pid = pid_of(&record);
    assert!(alive_as(pid, None));
    let reuse = sandbox.run(&["start", "--name", "orphan", "--", "true"], b"");
    assert_eq!(reuse.code, Some(4), "{reuse:?}");
    sandbox.ok(&["kill", "orphan"]);
    assert!(
        wait_until(WAIT_TIMEOUT, || !alive_as(pid, None)),
        "pid {pid} survived kill"
    );
    assert_eq!(sandbox.show("orphan")["state"], "lost");
}

#[test]
fn attach_shows_output_forwards_stdin_and_ends_with_the_session() {
    let sandbox = Sandbox::new("attach");
    sandbox.ok(&[
        "start",
        "--name",
        "talk",
        "--",
        "sh",
        "-c",
        "echo ready; read answer; echo got:$answer; sleep 1; echo later; exit 7",
    ]);
    sandbox.wait_for_log("talk", "ready");
    // Its stdin ends right after "hi": attach keeps following to the end ("later").
    let attached = sandbox.run(&["attach", "talk"], b"hi\n");
    assert_eq!(attached.code, Some(0), "{attached:?}");
    assert_eq!(attached.stdout, "ready\ngot:hi\nlater\n");
    let record = sandbox.show("talk");
    assert_eq!(record["state"], "exited");
    assert_eq!(record["exit_code"], 7);
}

#[test]
fn send_to_a_session_that_has_ended_is_refused() {
    let sandbox = Sandbox::new("send-ended");
    sandbox.ok(&["start", "--name", "done", "--", "true"]);
    sandbox.wait_for_state("done", "exited");
    let sent = sandbox.run(&["send", "done"], b"late\n");
    assert_eq!(sent.code, Some(4), "{sent:?}");
    assert!(
        sent.stderr
            .contains("session done is not running (exited 0)"),
        "{sent:?}"
    );
}

#[test]
fn unknown_sessions_and_bad_usage_have_their_own_exit_codes() {
    let sandbox = Sandbox::new("codes");
    for subcommand in ["show", "logs", "attach", "send", "stop", "kill"] {
        let outcome = sandbox.run(&[subcommand, "nope"], b"");
        assert_eq!(outcome.code, Some(3), "{subcommand}: {outcome:?}");
        assert_eq!(outcome.stderr, "banger-agent: no session nope\n");
    }
    for usage in [
        vec!["frobnicate"],
        vec!["logs"],
        vec!["logs", "a", "--tail", "many"],
        vec!["kill", "a", "--signal", "NOPE"],
        vec!["start"],
        vec!["start", "-e", "NOEQUALS", "--", "true"],
        vec!["list", "extra"],
    ] {
        let outcome = sandbox.run(&usage, b"");
        assert_eq!(outcome.code, Some(2), "{usage:?}: {outcome:?}");
    }
    let help = sandbox.run(&["--help"], b"");
    assert_eq!(help.code, Some(0));
    assert!(help.stdout.contains("3 no such session"), "{help:?}");
}

#[test]
fn help_after_the_separator_belongs_to_the_command() {
    let sandbox = Sandbox::new("help-separator");
    sandbox.ok(&[
        "start",
        "--name",
        "h",
        "--",
        "sh",
        "-c",
        "echo \"$0\"",
        "--help",
    ]);
    sandbox.wait_for_state("h", "exited");
    assert_eq!(sandbox.logs("h"), "--help\n");
}

#[test]
fn the_session_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new("private");
    sandbox.ok(&["start", "--name", "p", "--", "true"]);
    for dir in [sandbox.root.clone(), sandbox.root.join("p")] {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
    }
    assert!(Path::new(&sandbox.root.join("p/stdin")).exists());
}
