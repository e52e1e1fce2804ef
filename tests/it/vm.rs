//! The VM lifecycle end to end, through the real `banger` binary and its daemon, booting the
//! real default image and kernel under QEMU (TCG on hosts without working KVM). Part of the
//! slow group (`slow_vm_*`): each boot takes seconds to a minute. On failure, the VM's serial
//! console is dumped.

use std::path::PathBuf;
use std::time::Duration;

use crate::slow::{debian_world, debian_world_alone, have_qemu, records};
use crate::support::{Output, StopDaemon, TestContext, capable, find_program};

fn can_boot() -> bool {
    have_qemu()
        && capable(
            "ssh and ssh-keygen (Debian package `openssh-client`)",
            find_program("ssh").is_some() && find_program("ssh-keygen").is_some(),
        )
}

/// A VM's directory of disks and logs in `context`'s HOME.
fn vm_dir(context: &TestContext, name: &str) -> PathBuf {
    context.home().join(".local/state/banger/vms").join(name)
}

/// The VM's console log, for failure messages.
fn console(context: &TestContext, name: &str) -> String {
    let log = vm_dir(context, name).join("console.log");
    let console = match std::fs::read_to_string(&log) {
        Ok(text) => format!("--- console of {name}\n{text}"),
        Err(error) => format!("--- no console log of {name} ({error})"),
    };
    // The daemon's side of what happened to the VM: its last lines about it.
    let daemon =
        std::fs::read_to_string(context.home().join(".local/state/banger/logs/daemon.log"))
            .unwrap_or_default();
    let about: Vec<&str> = daemon.lines().filter(|line| line.contains(name)).collect();
    let tail = &about[about.len().saturating_sub(30)..];
    format!(
        "{console}\n--- the daemon's log about {name}\n{}",
        tail.join("\n")
    )
}

/// `banger ARGS`, which must succeed; on failure, panics with the output and the console.
fn vm_ok(context: &TestContext, name: &str, args: &[&str]) -> Output {
    let output = context.run(args);
    assert_eq!(
        output.code,
        Some(0),
        "banger {}\n{output}\n{}",
        args.join(" "),
        console(context, name)
    );
    output
}

/// The `vm` record of `vm show NAME`.
fn show(context: &TestContext, name: &str) -> serde_json::Value {
    let output = vm_ok(context, name, &["--json", "vm", "show", name]);
    records(&output.stdout)[0]["data"].clone()
}

/// A guest server on port 8080 (perl: Debian's base has it, python3 it has not) answers on
/// the host's `host_port`.
fn assert_published_port_reaches_the_guest(context: &TestContext, name: &str, host_port: u16) {
    use std::io::{Read, Write};
    let server = "perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => 8080, \
                  Listen => 5, ReuseAddr => 1) or die $!; while ($c = $s->accept) { <$c>; \
                  print $c \"HTTP/1.0 200 OK\\r\\n\\r\\nhello from the guest\\n\"; close $c }'";
    let mut guest = context
        .command(&["vm", "ssh", name, "--", server])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let attempt =
            std::net::TcpStream::connect(("127.0.0.1", host_port)).and_then(|mut stream| {
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut answer = String::new();
                stream.read_to_string(&mut answer)?;
                Ok(answer)
            });
        match attempt {
            // QEMU accepts at once and closes when nothing listens in the guest yet.
            Ok(answer) if answer.contains("200 OK") => break answer,
            _ if std::time::Instant::now() > deadline => {
                let _ = guest.kill();
                panic!(
                    "nothing answered on 127.0.0.1:{host_port}\n{}",
                    console(context, name)
                );
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    // While the server runs, `vm ports` names it (and sshd) and where it is published.
    let ports = context.run(&["--json", "vm", "ports", name]);
    let _ = guest.kill();
    let _ = guest.wait();
    assert!(answer.ends_with("hello from the guest\n"), "{answer:?}");
    assert_eq!(ports.code, Some(0), "{ports}");
    let listeners: Vec<serde_json::Value> = records(&ports.stdout)
        .into_iter()
        .map(|record| record["data"].clone())
        .collect();
    let listener = |port: u16| {
        listeners
            .iter()
            .find(|listener| listener["protocol"] == "tcp" && listener["port"] == port)
            .unwrap_or_else(|| panic!("no TCP listener on {port}: {ports}"))
    };
    let web = listener(8080);
    assert!(
        web["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|process| process["name"] == "perl"),
        "{ports}"
    );
    assert_eq!(
        web["published"],
        serde_json::json!([format!("127.0.0.1:{host_port}")]),
        "{ports}"
    );
    let ssh = listener(22);
    assert!(
        ssh["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|process| process["name"] == "sshd"),
        "{ports}"
    );
    assert_eq!(ssh["published"], serde_json::json!([]), "{ports}");
}

/// Deletes the VM whatever happens to the test.
struct Cleanup<'a> {
    context: &'a TestContext,
    name: &'a str,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.context.run(&["vm", "rm", "-f", self.name]);
    }
}

/// A path from redacted output (`[ROOT]/…`) as it really is.
fn real_path(context: &TestContext, value: &serde_json::Value) -> PathBuf {
    let text = value.as_str().expect("a path");
    PathBuf::from(text.replace("[ROOT]", &context.root.path().to_string_lossy()))
}

fn process_exists(pid: u64) -> bool {
    // A zombie waiting for its parent to reap it is gone too.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

/// Nothing of a deleted VM is left: no process, no run directory (sockets, scratch file), no
/// disks, no row.
fn assert_nothing_left(context: &TestContext, name: &str, shown: &serde_json::Value) {
    let pid = shown["pid"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_exists(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!process_exists(pid), "the VMM (pid {pid}) was left running");
    for key in ["run_dir", "dir"] {
        let path = real_path(context, &shown[key]);
        assert!(
            path.is_absolute() && !path.exists(),
            "{} was left behind",
            path.display()
        );
    }
    let list = vm_ok(context, name, &["--json", "vm", "list"]);
    assert!(
        records(&list.stdout)
            .iter()
            .all(|record| record["data"]["name"] != name),
        "{list}"
    );
}

#[test]
fn slow_vm_run_rm_on_a_fresh_home_builds_image_and_kernel_once_for_two_runs() {
    if !can_boot()
        || !capable("mmdebstrap", find_program("mmdebstrap").is_some())
        || !capable("apt-get", find_program("apt-get").is_some())
    {
        return;
    }
    let context = TestContext::new();
    let _daemon = StopDaemon(&context);
    let run = |name: &str| {
        let mut command = context.command(&[
            "--json", "vm", "run", "--rm", "--name", name, "--memory", "1G", "--vcpu", "1", "--",
            "uname", "-r",
        ]);
        command.stdout(std::process::Stdio::piped());
        command.stderr(std::process::Stdio::piped());
        command.spawn().unwrap()
    };
    // Both start on an empty store: one daemon, one build of each.
    let first = run("fresh-one");
    let second = run("fresh-two");
    let outputs: Vec<Output> = [first, second]
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().unwrap();
            Output {
                code: output.status.code(),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        })
        .collect();
    let kernels = context.run(&["--json", "kernel", "list"]);
    let kernels = records(&kernels.stdout);
    assert_eq!(kernels.len(), 1, "{kernels:?}");
    let release = kernels[0]["data"]["release"].as_str().unwrap().to_owned();
    let mut started: Vec<String> = Vec::new();
    for (output, name) in outputs.iter().zip(["fresh-one", "fresh-two"]) {
        assert_eq!(
            output.code,
            Some(0),
            "{output}\n{}",
            console(&context, name)
        );
        let lines: Vec<&str> = output.stdout.lines().collect();
        assert!(
            lines.contains(&release.as_str()),
            "the guest's `uname -r` ({release}) is not in:\n{output}"
        );
        assert!(
            output.stdout.contains("spec: 1 vcpu · 1024 MiB · 8G disk"),
            "{output}"
        );
        for line in lines {
            if let Ok(event) = serde_json::from_str::<serde_json::Value>(line)
                && event["type"] == "step_started"
            {
                started.push(event["data"]["kind"].as_str().unwrap_or("").to_owned());
            }
        }
    }
    // Every step of the image and the kernel ran once between the two runs.
    let mut kinds = started.clone();
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds.len(), started.len(), "a step ran twice: {started:?}");
    assert!(
        started.iter().any(|kind| kind == "recipe.mmdebstrap"),
        "{started:?}"
    );
    assert!(
        started.iter().any(|kind| kind.starts_with("kernel.")),
        "{started:?}"
    );
    let images = records(&context.run(&["--json", "image", "list"]).stdout);
    assert_eq!(images.len(), 1, "{images:?}");
    // --rm: nothing listed, nothing on disk.
    let list = context.run(&["--json", "vm", "list"]);
    assert_eq!(list.code, Some(0), "{list}");
    assert!(list.stdout.trim().is_empty(), "{list}");
    for name in ["fresh-one", "fresh-two"] {
        assert!(!vm_dir(&context, name).exists());
    }
}

#[test]
fn slow_vm_exit_codes_come_back_and_a_guest_that_fails_to_boot_is_kept_for_logs() {
    if !can_boot() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let name = "exit-seven";
    let _cleanup = Cleanup { context, name };
    let output = context.run(&[
        "vm",
        "run",
        "--name",
        name,
        "--memory",
        "1G",
        "--vcpu",
        "1",
        "-e",
        "A=1",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $A; pwd; exit 7",
    ]);
    assert_eq!(output.code, Some(7), "{output}\n{}", console(context, name));
    assert_eq!(output.stdout, "1\n/tmp\n", "{output}");
    assert!(
        output.stderr.contains("spec: 1 vcpu · 1024 MiB"),
        "{output}"
    );

    // `vm exec` in the running VM: the command's own code, 127 for a program the guest does
    // not have, 126 for one it cannot execute, 125 when banger cannot run it at all.
    let exec = |args: &[&str]| {
        let mut argv = vec!["vm", "exec"];
        argv.extend_from_slice(args);
        context.run(&argv)
    };
    let output = exec(&[
        "-e",
        "A=1",
        "-w",
        "/tmp",
        name,
        "--",
        "sh",
        "-c",
        "echo $A; pwd",
    ]);
    assert_eq!(
        (output.code, output.stdout.as_str()),
        (Some(0), "1\n/tmp\n"),
        "{output}"
    );
    let output = exec(&[name, "--", "sh", "-c", "echo out; echo err >&2; exit 2"]);
    assert_eq!(output.code, Some(2), "{output}");
    assert_eq!(
        (output.stdout.as_str(), output.stderr.as_str()),
        ("out\n", "err\n")
    );
    let output = exec(&[name, "--", "no-such-program"]);
    assert_eq!(output.code, Some(127), "{output}");
    assert!(output.stderr.contains("no-such-program"), "{output}");
    let output = exec(&[name, "--", "/etc/hostname"]);
    assert_eq!(output.code, Some(126), "{output}");
    let output = exec(&["-w", "/no/such/dir", name, "--", "true"]);
    assert_eq!(output.code, Some(126), "{output}");
    assert!(output.stderr.contains("/no/such/dir"), "{output}");
    let output = exec(&["no-such-vm", "--", "true"]);
    assert_eq!(output.code, Some(125), "{output}");
    assert!(
        output.stderr.contains("no VM named `no-such-vm`"),
        "{output}"
    );
    // Standard input reaches the command with -i only.
    for (flag, expected) in [(Some("-i"), "piped in\n"), (None, "")] {
        use std::io::Write;
        let mut argv = vec!["vm", "exec"];
        argv.extend(flag);
        argv.extend([name, "--", "cat"]);
        let mut child = context
            .command(&argv)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // Without -i nothing reads it: the write may meet a closed pipe, which is the point.
        let _ = stdin.write_all(b"piped in\n");
        drop(stdin);
        let output = child.wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{flag:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            expected,
            "{flag:?}"
        );
    }
    // `vm stats`: the VMM's figures from the host, the guest's through its agent.
    let stats = context.run(&["--json", "vm", "stats", name]);
    assert_eq!(stats.code, Some(0), "{stats}");
    let stats = records(&stats.stdout)[0]["data"].clone();
    assert!(
        stats["vmm"]["rss_bytes"].as_u64().unwrap() > 16 << 20,
        "{stats}"
    );
    assert!(
        stats["vmm"]["cpu_seconds"].as_f64().unwrap() > 0.0,
        "{stats}"
    );
    let disks = stats["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{stats}");
    assert!(
        disks
            .iter()
            .all(|disk| disk["allocated_bytes"].as_u64() <= disk["size_bytes"].as_u64()),
        "{stats}"
    );
    let guest = &stats["guest"];
    let memory = guest["memory_total_bytes"].as_u64().unwrap();
    assert!(
        (768 << 20..=1 << 30).contains(&memory),
        "a 1 GiB guest reports {memory} bytes: {stats}"
    );
    assert!(guest["processes"].as_u64().unwrap() > 1, "{stats}");
    let mounts: Vec<&str> = guest["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|filesystem| filesystem["mount"].as_str().unwrap())
        .collect();
    assert_eq!(mounts, ["/", "/root"], "{stats}");

    check_vm_cp(context, name);
    check_exec_tty(context, name);

    // A running VM is deleted only with -f; `stop -t 0` gives the guest no time.
    let refused = context.run(&["vm", "rm", name]);
    assert_eq!(refused.code, Some(1), "{refused}");
    assert!(
        refused
            .stderr
            .contains(&format!("VM `{name}` is running; stop it first")),
        "{refused}"
    );
    assert_eq!(show(context, name)["state"], "running");
    let started = std::time::Instant::now();
    vm_ok(context, name, &["vm", "stop", "-t", "0", name]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(show(context, name)["state"], "stopped");
    let not_running = context.run(&["vm", "stats", name]);
    assert_eq!(not_running.code, Some(1), "{not_running}");
    assert!(
        not_running.stderr.contains("is not running"),
        "{not_running}"
    );
    vm_ok(context, name, &["vm", "rm", name]);
    assert!(!vm_dir(context, name).exists(), "vm rm left the VM's files");

    // A guest given one second cannot come up (a TCG boot takes several): the error names
    // the VM and `vm logs`, the VM is kept, stopped, with its console log.
    let output = context.run(&["vm", "create", "--name", "timeout-vm", "--memory", "1G"]);
    let _cleanup_timeout = Cleanup {
        context,
        name: "timeout-vm",
    };
    assert_eq!(output.code, Some(0), "{output}");
    let output = context.run(&["vm", "start", "timeout-vm", "--timeout", "1"]);
    assert_eq!(output.code, Some(1), "{output}");
    assert!(
        output.stderr.contains("VM `timeout-vm` did not come up"),
        "{output}"
    );
    assert!(
        output.stderr.contains("banger vm logs timeout-vm"),
        "{output}"
    );
    let shown = show(context, "timeout-vm");
    assert_eq!(shown["state"], "stopped", "{shown}");
    assert!(!real_path(context, &shown["run_dir"]).exists());
    assert!(
        real_path(context, &shown["console_log"]).exists(),
        "the console log is kept"
    );
    vm_ok(context, "timeout-vm", &["vm", "logs", "timeout-vm"]);
}

#[test]
fn slow_vm_create_stop_start_keeps_root_and_delete_leaves_nothing() {
    if !can_boot() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let name = "lifecycle";
    let _cleanup = Cleanup { context, name };
    let host_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let publish = format!("{host_port}:8080");
    let created = vm_ok(
        context,
        name,
        &[
            "vm", "create", "--name", name, "--memory", "1G", "--vcpu", "1", "--disk", "2G", "-p",
            &publish,
        ],
    );
    assert!(
        created.stderr.contains("spec: 1 vcpu · 1024 MiB · 2G disk"),
        "{created}"
    );
    assert_eq!(show(context, name)["state"], "stopped");
    assert_eq!(
        show(context, name)["ports"],
        serde_json::json!([format!("127.0.0.1:{host_port}:8080/tcp")])
    );

    // A host port another program holds stops the start before anything boots.
    let holder = std::net::TcpListener::bind(("127.0.0.1", host_port)).unwrap();
    let refused = context.run(&["vm", "start", name]);
    assert_eq!(refused.code, Some(1), "{refused}");
    assert!(
        refused
            .stderr
            .contains(&format!("host port 127.0.0.1:{host_port}/tcp")),
        "{refused}"
    );
    assert_eq!(show(context, name)["state"], "stopped");
    drop(holder);

    vm_ok(context, name, &["vm", "start", name]);
    // The agent runs commands before systemd-tmpfiles-setup: what the first command writes
    // in /tmp must outlive the rest of the boot (a Debian `D /tmp` would empty it).
    let first = vm_ok(
        context,
        name,
        &[
            "vm",
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "echo mine > /tmp/first && systemctl start systemd-tmpfiles-setup.service \
             && cat /tmp/first && test -d /tmp/.X11-unix && echo tmpfiles-ran",
        ],
    );
    assert_eq!(first.stdout, "mine\ntmpfiles-ran\n", "{first}");
    assert_published_port_reaches_the_guest(context, name, host_port);
    vm_ok(
        context,
        name,
        &[
            "vm",
            "ssh",
            name,
            "--",
            "sh",
            "-c",
            "echo kept across boots > /root/kept; echo stale > /tmp/stale",
        ],
    );
    let stopped = vm_ok(context, name, &["vm", "stop", name]);
    assert!(stopped.stdout.contains("stopped"), "{stopped}");
    assert_eq!(show(context, name)["state"], "stopped");
    let not_running = context.run(&["vm", "ports", name]);
    assert_eq!(not_running.code, Some(1), "{not_running}");
    assert!(
        not_running.stderr.contains("is not running"),
        "{not_running}"
    );
    // `vm set` on the stopped VM: more of everything, the disks grown with their files.
    let shrink = context.run(&["vm", "set", name, "--disk", "1G"]);
    assert_eq!(shrink.code, Some(1), "{shrink}");
    assert!(shrink.stderr.contains("can grow, not shrink"), "{shrink}");
    let set = vm_ok(
        context,
        name,
        &[
            "vm", "set", name, "--vcpu", "2", "--memory", "1536M", "--disk", "3G",
        ],
    );
    assert!(
        set.stderr
            .contains("spec: 1 vcpu · 1024 MiB · 2G disk -> 2 vcpu · 1536 MiB · 3G disk"),
        "{set}"
    );
    vm_ok(context, name, &["vm", "start", name]);
    let refused = context.run(&["vm", "set", name, "--vcpu", "1"]);
    assert_eq!(refused.code, Some(1), "{refused}");
    assert!(refused.stderr.contains("is running"), "{refused}");
    let shape = vm_ok(
        context,
        name,
        &[
            "vm",
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "nproc; grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2; \
             df -B1 --output=size /root | tail -1",
        ],
    );
    let figures: Vec<u64> = shape
        .stdout
        .split_whitespace()
        .map(|word| word.parse().unwrap())
        .collect();
    assert_eq!(figures[0], 2, "{shape}");
    assert!((1_300_000..=1_572_864).contains(&figures[1]), "{shape}");
    assert!(
        (2_900 << 20..=3 << 30).contains(&figures[2]),
        "/root after growing to 3G: {shape}"
    );
    let read = vm_ok(
        context,
        name,
        &["vm", "ssh", name, "--", "cat", "/root/kept"],
    );
    assert_eq!(read.stdout.trim(), "kept across boots", "{read}");
    // /tmp is emptied at every boot, by the agent rather than systemd-tmpfiles.
    let tmp = vm_ok(
        context,
        name,
        &[
            "vm",
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "ls -A /tmp | grep -x -e stale -e first; \
             cat /etc/tmpfiles.d/tmp.conf | grep -v '^#'; test -e /run/banger-agent/tmp-emptied \
             && echo marker",
        ],
    );
    assert_eq!(tmp.stdout, "d /tmp 1777 root root -\nmarker\n", "{tmp}");
    let shown = show(context, name);
    assert_eq!(shown["state"], "running");
    let dir = real_path(context, &shown["run_dir"]);
    assert!(
        dir.join("launched.json").exists(),
        "the scratch file is where it should be"
    );
    vm_ok(context, name, &["vm", "delete", "-f", name]);
    assert_nothing_left(context, name, &shown);
}

#[test]
fn slow_vm_and_its_sessions_survive_a_daemon_killed_with_sigkill_and_delete_still_cleans_up() {
    if !can_boot() {
        return;
    }
    let Some(world) = debian_world_alone() else {
        return;
    };
    let context = &world.context;
    let name = "outlives-daemon";
    let _cleanup = Cleanup { context, name };
    vm_ok(
        context,
        name,
        &["vm", "create", "--name", name, "--memory", "1G"],
    );
    vm_ok(context, name, &["vm", "start", name]);
    let before = show(context, name);
    // A session, and a client attached to it that dies: the session runs on.
    let started = vm_ok(
        context,
        name,
        &[
            "vm",
            "session",
            "start",
            name,
            "--name",
            "echoer",
            "--",
            "sh",
            "-c",
            "echo hello; while read line; do echo \"got:$line\"; done",
        ],
    );
    assert_eq!(started.stdout, "echoer\n", "{started}");
    let mut attached = context
        .command(&["vm", "session", "attach", name, "echoer"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    attached.kill().unwrap();
    attached.wait().unwrap();
    let status = vm_ok(context, name, &["--json", "daemon", "status"]);
    let daemon = records(&status.stdout)[0]["data"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The next command starts a new daemon, which finds the VM running.
    let after = show(context, name);
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["pid"], before["pid"], "the same VMM");
    let status = vm_ok(context, name, &["--json", "daemon", "status"]);
    assert_ne!(
        records(&status.stdout)[0]["data"]["pid"].as_i64().unwrap(),
        daemon
    );
    let answer = vm_ok(
        context,
        name,
        &["vm", "ssh", name, "--", "echo", "still", "here"],
    );
    assert_eq!(answer.stdout.trim(), "still here", "{answer}");
    check_sessions_after_the_daemon_died(context, name);
    vm_ok(context, name, &["vm", "delete", "-f", name]);
    assert_nothing_left(context, name, &after);
}

#[test]
fn slow_vm_concurrent_creates_of_one_name_make_one_vm_and_touch_no_disk_twice() {
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let name = "race";
    let _cleanup = Cleanup { context, name };
    let children: Vec<_> = (0..4)
        .map(|_| {
            context
                .command(&["vm", "create", "--name", name, "--disk", "1G"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|child| child.wait_with_output().unwrap())
        .collect();
    let won: Vec<_> = outputs
        .iter()
        .filter(|output| output.status.success())
        .collect();
    let describe = || {
        outputs
            .iter()
            .map(|output| {
                format!(
                    "exit {:?}: {}",
                    output.status.code(),
                    String::from_utf8_lossy(&output.stderr)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(won.len(), 1, "{}", describe());
    for output in outputs.iter().filter(|output| !output.status.success()) {
        assert_eq!(output.status.code(), Some(1), "{}", describe());
        assert!(
            String::from_utf8_lossy(&output.stderr)
                .contains(&format!("a VM named `{name}` already exists")),
            "{}",
            describe()
        );
    }
    // The winner's disks are whole: written once, by it.
    let shown = show(context, name);
    assert_eq!(shown["state"], "stopped");
    for disk in ["overlay.ext4", "work.ext4"] {
        let path = vm_dir(context, name).join(disk);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30, "{disk}");
        crate::support::assert_fsck_clean(&path);
    }
    let list = context.run(&["--json", "vm", "list"]);
    assert_eq!(
        list.stdout.matches(&format!("\"{name}\"")).count(),
        1,
        "{list}"
    );
}

#[test]
fn vm_commands_refuse_bad_input_with_exit_1_and_build_nothing() {
    let context = TestContext::new();
    let _daemon = StopDaemon(&context);
    let list = context.run(&["vm", "list"]);
    assert_eq!(list.code, Some(0), "{list}");
    assert!(list.stderr.contains("no VMs"), "{list}");
    for (args, expected) in [
        (&["vm", "show", "nosuch"][..], "no VM named `nosuch`"),
        (&["vm", "rm", "nosuch"][..], "no VM named `nosuch`"),
        (&["vm", "start", "nosuch"][..], "no VM named `nosuch`"),
        (
            &["vm", "create", "--name", "Not_A_Name"][..],
            "`Not_A_Name` is not a valid VM name",
        ),
        (
            &["vm", "ssh", "nosuch", "--", "true"][..],
            "no VM named `nosuch`",
        ),
        (&["vm", "ports", "nosuch"][..], "no VM named `nosuch`"),
        (
            &["vm", "run", "--network", "none"][..],
            "`vm run --network none` needs a command",
        ),
        (
            &["vm", "start", "nosuch", "--timeout", "0"][..],
            "0 is not in 1..=604800",
        ),
    ] {
        let output = context.run(args);
        assert_eq!(output.code, Some(1), "banger {}\n{output}", args.join(" "));
        assert!(
            output.stderr.contains(expected),
            "banger {}\n{output}",
            args.join(" ")
        );
    }
    // Commands that run a guest command keep 1..124 for it: their own failures are 125.
    for (args, expected) in [
        (
            &[
                "vm",
                "run",
                "--timeout",
                "18446744073709551615",
                "--",
                "true",
            ][..],
            "18446744073709551615 is not in 1..=604800",
        ),
        (
            &["vm", "exec", "nosuch", "--", "true"][..],
            "no VM named `nosuch`",
        ),
        (
            &["vm", "exec", "-e", "1X=2", "nosuch", "--", "true"][..],
            "`1X` is not an environment variable name",
        ),
        (
            &["vm", "exec", "-w", "tmp", "nosuch", "--", "true"][..],
            "`tmp` is not an absolute path",
        ),
        (
            &["vm", "run", "--name", "Not_A_Name", "--", "true"][..],
            "`Not_A_Name` is not a valid VM name",
        ),
    ] {
        let output = context.run(args);
        assert_eq!(
            output.code,
            Some(125),
            "banger {}\n{output}",
            args.join(" ")
        );
        assert!(
            output.stderr.contains(expected),
            "banger {}\n{output}",
            args.join(" ")
        );
    }
    // With --json, a failure ends with an `error` record: message, causes and exit code.
    for (args, code, expected) in [
        (
            &["--json", "vm", "show", "nosuch"][..],
            1,
            "no VM named `nosuch`",
        ),
        (
            &["--json", "vm", "exec", "--bogus", "x", "--", "true"][..],
            125,
            "unexpected argument '--bogus'",
        ),
    ] {
        let output = context.run(args);
        assert_eq!(output.code, Some(code), "{output}");
        let last = records(&output.stdout).pop().expect("an error record");
        assert_eq!(last["type"], "error", "{output}");
        assert_eq!(last["data"]["exit_code"], code, "{output}");
        assert!(
            last["data"]["message"].as_str().unwrap().contains(expected),
            "{output}"
        );
        assert!(last["data"]["causes"].is_array(), "{output}");
    }
    let prune = context.run(&["vm", "prune"]);
    assert_eq!(prune.code, Some(0), "{prune}");
    assert!(prune.stderr.contains("no stopped VMs"), "{prune}");
    // Refusals come before any build: the store holds no step.
    let steps = context.run(&["--json", "cache", "ls"]);
    assert!(steps.stdout.trim().is_empty(), "{steps}");
}

#[test]
fn slow_vm_network_none_boots_with_only_lo_and_ssh_is_refused_clearly() {
    if !can_boot() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let name = "sealed";
    let _cleanup = Cleanup { context, name };
    let created = vm_ok(
        context,
        name,
        &[
            "vm",
            "create",
            "--name",
            name,
            "--memory",
            "1G",
            "--vcpu",
            "1",
            "--network",
            "none",
        ],
    );
    assert!(created.stderr.contains("· network none"), "{created}");
    let shown = show(context, name);
    assert_eq!(shown["network"], "none", "{shown}");
    vm_ok(context, name, &["vm", "start", name]);
    let shown = show(context, name);
    assert_eq!(shown["state"], "running", "{shown}");
    assert!(
        shown["ssh_host"].is_null() && shown["ssh_port"].is_null(),
        "{shown}"
    );
    let text = vm_ok(context, name, &["vm", "show", name]);
    assert!(text.stdout.contains("network:  none"), "{text}");
    // No network device reaches QEMU, and the kernel sees none: only loopback.
    let argv = std::fs::read_to_string(format!("/proc/{}/cmdline", shown["pid"].as_u64().unwrap()))
        .unwrap()
        .replace('\0', " ");
    assert!(
        !argv.contains("-netdev") && !argv.contains("virtio-net"),
        "{argv}"
    );
    assert!(!argv.contains(" ip="), "no address for the guest: {argv}");

    // The agent needs no network: through it, the guest lists its interfaces.
    let agent = shown["agent"]
        .to_string()
        .replace("[ROOT]", &context.root.path().to_string_lossy());
    let agent: banger::vm::backend::AgentAddress = serde_json::from_str(&agent).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (status, stdout) = runtime.block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let (mut channel, _) = agent.endpoint().wait_ready(deadline).await.unwrap();
        let mut stdout = Vec::new();
        let status = channel
            .exec(
                &banger::guest::ExecRequest::argv(["ls", "/sys/class/net"]),
                tokio::io::empty(),
                &mut stdout,
                tokio::io::sink(),
            )
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&stdout).into_owned())
    });
    assert_eq!(status, banger::guest::ExitStatus::Code(0));
    let interfaces: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(interfaces, ["lo"], "{stdout}\n{}", console(context, name));

    for args in [
        &["vm", "ssh", name, "--", "true"][..],
        &["vm", "ssh", name][..],
    ] {
        let started = std::time::Instant::now();
        let output = context.run(args);
        assert_eq!(output.code, Some(1), "banger {}\n{output}", args.join(" "));
        assert!(
            output.stderr.contains(
                "VM `sealed` has no network (network mode `none`), so SSH cannot reach it"
            ),
            "{output}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "refused at once, not after a wait for sshd: {:?}",
            started.elapsed()
        );
    }
    vm_ok(context, name, &["vm", "delete", "-f", name]);
    assert_nothing_left(context, name, &shown);
}

#[test]
fn slow_vm_run_rm_interrupted_while_the_vm_boots_leaves_no_vm() {
    if !can_boot() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let name = "abandoned";
    let _cleanup = Cleanup { context, name };
    let mut command = context.command(&[
        "vm", "run", "--rm", "--name", name, "--memory", "1G", "--vcpu", "1", "--", "true",
    ]);
    command.stderr(std::process::Stdio::piped());
    let child = command.spawn().unwrap();
    // Interrupted once the VM exists and boots (a TCG boot takes several seconds).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !vm_dir(context, name).join("console.log").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM never started booting"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(130),
        "Ctrl-C during the boot: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The daemon finishes the boot, finds nobody to answer, and deletes the VM.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let list = vm_ok(context, name, &["--json", "vm", "list"]);
        if records(&list.stdout)
            .iter()
            .all(|record| record["data"]["name"] != name)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned VM was never deleted:\n{list}\n{}",
            console(context, name)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!vm_dir(context, name).exists());
}

/// `ssh NAME.vm` with the system's ssh, through `banger ssh-config install` in the sandbox
/// HOME (ssh is pointed at that HOME's config with `-F`: it reads the passwd entry's home, not
/// `$HOME`); uninstalling leaves the file as it was, and deleting the VM forgets its key.
#[test]
fn slow_vm_ssh_name_vm_reaches_the_vm_through_ssh_config() {
    if !can_boot() || !capable("ssh", find_program("ssh").is_some()) {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let name = "named";
    let _cleanup = Cleanup { context, name };
    let user_config = context.home().join(".ssh/config");
    std::fs::create_dir_all(user_config.parent().unwrap()).unwrap();
    let original = b"# the user's own\nHost *\n    ServerAliveInterval 60\n";
    std::fs::write(&user_config, original).unwrap();
    vm_ok(context, name, &["ssh-config", "install"]);
    vm_ok(
        context,
        name,
        &["vm", "create", "--name", name, "--memory", "1G"],
    );
    // Generous: under TCG beside the other slow tests a boot has taken over 180 s.
    vm_ok(context, name, &["vm", "start", name, "--timeout", "600"]);
    let ssh = |args: &[&str]| {
        let mut command = std::process::Command::new("ssh");
        for variable in banger::env::ALL.iter().chain(banger::env::STANDARD) {
            command.env_remove(variable);
        }
        let output = command
            .arg("-F")
            .arg(&user_config)
            .args(["-o", "BatchMode=yes"])
            .args(args)
            .env("HOME", context.home())
            .env("XDG_RUNTIME_DIR", context.root.path().join("run"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let release = ssh(&["named.vm", "--", "uname", "-r"]);
    assert_eq!(
        release.0,
        Some(0),
        "{release:?}\n{}",
        console(context, name)
    );
    assert!(release.1.trim().ends_with("-cloud-amd64"), "{release:?}");
    // The key pinned on first contact is checked on the next.
    let known_hosts = context
        .home()
        .join(".local/state/banger/ssh/known_hosts.vm/named.vm");
    let pinned = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(pinned.starts_with("named.vm "), "{pinned}");
    let again = ssh(&["named.vm", "--", "echo", "again"]);
    assert_eq!((again.0, again.1.trim()), (Some(0), "again"), "{again:?}");

    vm_ok(context, name, &["ssh-config", "uninstall"]);
    assert_eq!(std::fs::read(&user_config).unwrap(), original);
    vm_ok(context, name, &["vm", "delete", "-f", name]);
    assert!(!known_hosts.exists(), "the deleted VM's key is forgotten");
}

/// A stopped VM whose published host port another program holds is refused by `vm start`
/// before anything boots, naming the port; `vm list` and `vm show` show the ports.
#[test]
fn vm_start_refuses_a_taken_host_port_before_booting() {
    use banger::state::{State, VmRecord, VmState};
    let context = TestContext::new();
    let _daemon = StopDaemon(&context);
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let state_dir = context.home().join(".local/state/banger");
    std::fs::create_dir_all(&state_dir).unwrap();
    let id = "portvm000001";
    State::open(&state_dir)
        .unwrap()
        .create_vm(&VmRecord {
            name: "web".into(),
            id: id.into(),
            image: "debian-bookworm".into(),
            kernel: "debian-cloud-amd64".into(),
            backend: "qemu".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_bytes: 1 << 30,
            state: VmState::Stopped,
            created_ms: 0,
            rootfs_integrity: None,
            network: banger::spec::NetworkMode::User,
            ports: vec![
                banger::spec::PortForward::parse(&format!("{port}:80")).unwrap(),
                banger::spec::PortForward::parse("0.0.0.0:5353:53/udp").unwrap(),
            ],
        })
        .unwrap();

    let refused = context.run(&["vm", "start", "web"]);
    assert_eq!(refused.code, Some(1), "{refused}");
    assert!(
        refused.stderr.contains(&format!(
            "host port 127.0.0.1:{port}/tcp (published as `127.0.0.1:{port}:80/tcp`) is already \
             in use"
        )),
        "{refused}"
    );
    assert!(
        !context.root.path().join("run/banger/vms").join(id).exists(),
        "nothing of a launch was made"
    );
    let list = vm_ok(&context, "web", &["vm", "list"]);
    assert!(
        list.stdout.contains("PORTS")
            && list
                .stdout
                .contains(&format!("127.0.0.1:{port}->80/tcp, 0.0.0.0:5353->53/udp")),
        "{list}"
    );
    let shown = vm_ok(&context, "web", &["vm", "show", "web"]);
    assert!(
        shown
            .stdout
            .contains(&format!("ports:    127.0.0.1:{port}->80/tcp")),
        "{shown}"
    );
    drop(holder);
}

/// `vm logs --tail N` prints the last N lines; on a terminal (a pty from `script`) a guest's
/// escape sequences are shown escaped, piped they pass as they are. `vm ps` and `vm inspect`
/// are `vm ls` and `vm show`.
#[test]
fn vm_logs_tails_and_never_lets_the_guest_drive_the_terminal() {
    let context = TestContext::new();
    let _daemon = StopDaemon(&context);
    let _vm = crate::support::FakeVm::adopt(&context, "chatty", 0, None);
    let log = "booting\r\n\u{1b}]0;owned\u{7}title\r\nline two\r\nline three\r\n";
    std::fs::create_dir_all(vm_dir(&context, "chatty")).unwrap();
    std::fs::write(vm_dir(&context, "chatty").join("console.log"), log).unwrap();

    let piped = vm_ok(&context, "chatty", &["vm", "logs", "chatty"]);
    assert_eq!(piped.stdout, log, "piped: the bytes as they are");
    let tail = vm_ok(&context, "chatty", &["vm", "logs", "chatty", "--tail", "2"]);
    assert_eq!(tail.stdout, "line two\r\nline three\r\n");
    let none = vm_ok(&context, "chatty", &["vm", "logs", "chatty", "-n", "0"]);
    assert_eq!(none.stdout, "");

    if !capable(
        "script (util-linux), for a pty",
        find_program("script").is_some(),
    ) {
        return;
    }
    let banger = env!("CARGO_BIN_EXE_banger");
    let mut script = std::process::Command::new("script");
    for variable in banger::env::ALL.iter().chain(banger::env::STANDARD) {
        script.env_remove(variable);
    }
    let output = script
        .args(["-qec", &format!("{banger} vm logs chatty"), "/dev/null"])
        .env("HOME", context.home())
        .env("XDG_RUNTIME_DIR", context.root.path().join("run"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{shown}");
    assert!(shown.contains("\\u{1b}]0;owned\\u{7}title"), "{shown:?}");
    assert!(
        !shown.contains('\u{1b}'),
        "an escape reached the terminal: {shown:?}"
    );

    for (alias, expected) in [("ps", "chatty"), ("inspect", "chatty")] {
        let args: Vec<&str> = if alias == "ps" {
            vec!["vm", "ps"]
        } else {
            vec!["vm", "inspect", "chatty"]
        };
        let output = vm_ok(&context, "chatty", &args);
        assert!(output.stdout.contains(expected), "vm {alias}: {output}");
    }
}

/// `vm cp` with the guest's own tar: a tree into the guest and back with modes and links, a
/// tar stream to stdout, and a hostile stream from the guest refused with nothing written.
fn check_vm_cp(context: &TestContext, name: &str) {
    let host = tempfile::tempdir().unwrap();
    let tree = crate::copy::make_tree(host.path());
    let into = context.run(&[
        "vm",
        "cp",
        tree.to_str().unwrap(),
        &format!("{name}:/root/"),
    ]);
    assert_eq!(into.code, Some(0), "{into}");
    assert!(into.stderr.contains("copied 3 files"), "{into}");
    let listed = context.run(&[
        "vm",
        "exec",
        name,
        "--",
        "sh",
        "-c",
        "stat -c '%a %U %n' /root/tree/run.sh /root/tree/sub/data.txt; readlink /root/tree/link",
    ]);
    assert_eq!(
        listed.stdout,
        "755 root /root/tree/run.sh\n640 root /root/tree/sub/data.txt\nsub/data.txt\n",
        "{listed}"
    );

    let back = host.path().join("back");
    let out = context.run(&[
        "vm",
        "cp",
        &format!("{name}:/root/tree"),
        back.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(0), "{out}");
    crate::copy::assert_same_tree(&back);

    // `-` as the destination: the raw tar stream on stdout.
    let streamed = context
        .command(&["vm", "cp", &format!("{name}:/root/tree/sub"), "-"])
        .output()
        .unwrap();
    assert_eq!(streamed.status.code(), Some(0));
    let mut archive = tar::Archive::new(&streamed.stdout[..]);
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|entry| entry.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(
        names.iter().any(|entry| entry.ends_with("sub/data.txt")),
        "{names:?}"
    );

    // A guest whose `tar` sends an entry through a symlink out of the destination.
    let hostile = host.path().join("hostile.tar");
    let bytes = crate::copy::tar_writing_through_a_symlink(&host.path().join("outside"));
    std::fs::write(&hostile, bytes).unwrap();
    std::fs::create_dir(host.path().join("outside")).unwrap();
    let put = context.run(&[
        "vm",
        "cp",
        hostile.to_str().unwrap(),
        &format!("{name}:/root/hostile.tar"),
    ]);
    assert_eq!(put.code, Some(0), "{put}");
    let rigged = context.run(&[
        "vm", "exec", name, "--", "sh", "-c",
        "printf '#!/bin/sh\\nexec cat /root/hostile.tar\\n' > /usr/local/bin/tar && chmod 755 /usr/local/bin/tar",
    ]);
    assert_eq!(rigged.code, Some(0), "{rigged}");
    let destination = host.path().join("loot-copy");
    let refused = context.run(&[
        "vm",
        "cp",
        &format!("{name}:/root/loot"),
        destination.to_str().unwrap(),
    ]);
    let restored = context.run(&["vm", "exec", name, "--", "rm", "/usr/local/bin/tar"]);
    assert_eq!(restored.code, Some(0), "{restored}");
    assert_eq!(refused.code, Some(1), "{refused}");
    assert!(refused.stderr.contains("symlink"), "{refused}");
    assert!(!host.path().join("outside/pwned").exists());
    assert!(!destination.exists());
}

/// The session `echoer` started before the daemon was killed: still listed and running, its
/// output kept; `send` and `attach` reach it; `stop` ends it.
fn check_sessions_after_the_daemon_died(context: &TestContext, name: &str) {
    use std::io::{BufRead, Write};
    let listed = vm_ok(context, name, &["--json", "vm", "session", "list", name]);
    let sessions = records(&listed.stdout);
    assert_eq!(sessions.len(), 1, "{listed}");
    assert_eq!(sessions[0]["data"]["name"], "echoer", "{listed}");
    assert_eq!(sessions[0]["data"]["state"], "running", "{listed}");
    // Tab after `vm session logs NAME` offers the VM's sessions, asked of its agent.
    let offered =
        crate::support::bash_complete(context, &["banger", "vm", "session", "logs", name, "ec"]);
    assert_eq!(offered, ["echoer"], "{offered:?}");
    let logs = |context: &TestContext| {
        vm_ok(context, name, &["vm", "session", "logs", name, "echoer"]).stdout
    };
    assert_eq!(logs(context), "hello\n");

    vm_ok(
        context,
        name,
        &["vm", "session", "send", name, "echoer", "--line", "ping"],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !logs(context).contains("got:ping") {
        assert!(
            std::time::Instant::now() < deadline,
            "`send` never reached the session: {}",
            logs(context)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // `attach`: what is typed reaches the session, its answer comes back; Ctrl-C detaches.
    let mut attached = context
        .command(&["vm", "session", "attach", name, "echoer"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = attached.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    attached
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"pong\n")
        .unwrap();
    let mut seen = Vec::new();
    while !seen.iter().any(|line: &String| line == "got:pong") {
        match received.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => seen.push(line),
            Err(error) => panic!("attach never showed got:pong ({error}); saw {seen:?}"),
        }
    }
    assert!(
        seen.contains(&"hello".to_owned()),
        "the recent output first: {seen:?}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(attached.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let detached = attached.wait_with_output().unwrap();
    assert_eq!(detached.status.code(), Some(0), "{detached:?}");
    assert!(
        String::from_utf8_lossy(&detached.stderr).contains("keeps running"),
        "{detached:?}"
    );

    let stopped = vm_ok(context, name, &["vm", "session", "stop", name, "echoer"]);
    assert_eq!(stopped.stdout, "echoer  killed by signal 15\n", "{stopped}");
    let shown = vm_ok(
        context,
        name,
        &["--json", "vm", "session", "show", name, "echoer"],
    );
    assert_eq!(
        records(&shown.stdout)[0]["data"]["state"],
        "killed",
        "{shown}"
    );

    let unknown = context.run(&["vm", "session", "logs", name, "nosuch"]);
    assert_eq!(unknown.code, Some(1), "{unknown}");
    assert!(unknown.stderr.contains("no session `nosuch`"), "{unknown}");
    let missing = context.run(&["vm", "session", "start", name, "--", "no-such-program"]);
    assert_eq!(missing.code, Some(1), "{missing}");
    assert!(missing.stderr.contains("no-such-program"), "{missing}");
}

/// `vm exec -it` with banger's stdin and stdout on a pseudo-terminal this test made: the guest
/// command has a terminal of that size, and a resize reaches it.
fn check_exec_tty(context: &TestContext, name: &str) {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let size = |rows, cols| nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size(24, 80)), None).unwrap();
    // Only the copies made for banger's stdin and stdout may reach it: a master it inherited
    // would keep the terminal open after it exits.
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
    }
    let mut child = context
        .command(&[
            "vm",
            "exec",
            "-it",
            name,
            "--",
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo on-a-tty; stty size; \
             trap 'stty size; exit 3' WINCH; echo ready; while :; do sleep 0.1; done",
        ])
        .stdin(std::process::Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(std::process::Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(pty.slave);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut master = std::fs::File::from(pty.master);
    let master_fd = master.as_raw_fd();
    let reader = {
        let seen = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            // EIO once banger, the last holder of the terminal's other end, is gone.
            while let Ok(count @ 1..) = master.read(&mut buffer) {
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..count]));
            }
        })
    };
    let wait_for = |text: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !seen.lock().unwrap().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {text:?} from `vm exec -it`: {:?}",
                seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("ready");
    let resized = size(30, 100);
    #[allow(unsafe_code)]
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from a live one; the master's descriptor is
    // open (the reader thread owns the file and is still reading).
    let answer = unsafe { libc::ioctl(master_fd, libc::TIOCSWINSZ, &resized) };
    assert_eq!(answer, 0);
    // The terminal's session is the test's, not banger's, so the kernel signals nobody:
    // tell banger as a terminal emulator's resize would.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGWINCH,
    )
    .unwrap();
    wait_for("30 100");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("`vm exec -it` did not exit after its command did");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(status.code(), Some(3), "{seen:?}");
    assert!(seen.contains("on-a-tty\r\n24 80\r\n"), "{seen:?}");
}

/// What a guest says about its identity, one `KEY VALUE` line each.
const IDENTITY_SCRIPT: &str = "echo machine-id $(cat /etc/machine-id); \
     echo host-key $(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2); \
     echo mac $(cat /sys/class/net/eth0/address); \
     echo random $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
     echo time $(date +%s); \
     echo hostname $(cat /proc/sys/kernel/hostname) $(cat /etc/hostname) \
     $(getent hosts $(cat /proc/sys/kernel/hostname) | cut -d' ' -f1)";

/// The `KEY VALUE` lines of [`IDENTITY_SCRIPT`]'s output.
fn identity(output: &Output) -> std::collections::BTreeMap<String, String> {
    output
        .stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(key, _)| {
            [
                "machine-id",
                "host-key",
                "mac",
                "random",
                "time",
                "hostname",
            ]
            .contains(key)
        })
        .map(|(key, value)| (key.to_owned(), value.trim().to_owned()))
        .collect()
}

#[test]
fn slow_vm_run_rm_saves_a_snapshot_once_and_restores_new_instances_from_it() {
    if !can_boot() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    // A shape no other test boots, so that this test's first run is the one that saves.
    let run = |name: &str| {
        // `-v`: the daemon says why it restores or boots.
        let mut args = vec![
            "-v", "vm", "run", "--rm", "--name", name, "--memory", "704M", "--vcpu", "1",
        ];
        args.extend_from_slice(&["--", "sh", "-c", IDENTITY_SCRIPT]);
        let output = context.run(&args);
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(output.code, Some(0), "{output}\n{}", console(context, name));
        let identity = identity(&output);
        assert_eq!(identity.len(), 6, "{output}");
        // Named after the VM, booted or restored from another VM's snapshot, and the name
        // resolves without DNS.
        assert_eq!(
            identity["hostname"],
            format!("{name} {name} 127.0.1.1"),
            "{output}"
        );
        let guest_now: u64 = identity["time"].parse().unwrap();
        assert!(
            guest_now.abs_diff(host_now) <= 5,
            "the guest's clock says {guest_now}, the host's {host_now}\n{output}"
        );
        (output, identity)
    };
    let snapshots = context.snapshots_dir();
    let saved_dirs = || -> Vec<PathBuf> {
        std::fs::read_dir(&snapshots)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.path())
                    .filter(|path| path.join("snapshot.json").exists())
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = saved_dirs();

    let (first, _) = run("warm-first");
    assert!(
        first.stderr.contains("saving a snapshot of `warm-first`"),
        "{first}"
    );
    assert!(first.stderr.contains("saved the snapshot"), "{first}");
    assert!(
        first.stderr.contains("no snapshot fits `warm-first` yet: "),
        "{first}"
    );
    let mut made: Vec<PathBuf> = saved_dirs()
        .into_iter()
        .filter(|dir| !before.contains(dir))
        .collect();
    assert_eq!(made.len(), 1, "one new snapshot: {made:?}\n{first}");
    let snapshot = made.remove(0);

    let (second, second_id) = run("warm-second");
    let (third, third_id) = run("warm-third");
    let key = snapshot.file_name().unwrap().to_string_lossy().into_owned();
    for output in [&second, &third] {
        assert!(output.stderr.contains("from its snapshot"), "{output}");
        assert!(
            output
                .stderr
                .contains(&format!("snapshot {} (", &key[..12])),
            "{output}"
        );
        assert!(
            !output.stderr.contains("booting `"),
            "restored, not booted: {output}"
        );
        assert!(!output.stderr.contains("saving a snapshot"), "{output}");
    }
    // Two copies of one saved guest are two instances.
    for key in ["machine-id", "host-key", "mac", "random"] {
        assert_ne!(
            second_id[key], third_id[key],
            "`{key}` is the same in two VMs restored from one snapshot\n{second}\n{third}"
        );
    }

    // `--cold` boots and leaves the snapshot alone.
    // (Its first boot may still be making host keys when the agent answers: `true` only.)
    let cold = context.run(&[
        "vm",
        "run",
        "--rm",
        "--cold",
        "--name",
        "warm-cold",
        "--memory",
        "704M",
        "--vcpu",
        "1",
        "--",
        "true",
    ]);
    assert_eq!(
        cold.code,
        Some(0),
        "{cold}\n{}",
        console(context, "warm-cold")
    );
    assert!(cold.stderr.contains("booting `warm-cold`"), "{cold}");
    assert!(!cold.stderr.contains("snapshot"), "{cold}");

    // A snapshot that does not restore is said, deleted, and replaced by a boot that saves
    // a new one; the run itself succeeds.
    let state = snapshot.join("state");
    let length = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(length / 2)
        .unwrap();
    let (recovered, _) = run("warm-recovered");
    assert!(
        recovered.stderr.contains("did not start from its snapshot"),
        "{recovered}"
    );
    assert!(
        recovered.stderr.contains("saved the snapshot"),
        "{recovered}"
    );
    let replaced = std::fs::metadata(&state).unwrap().len();
    assert!(
        replaced > length * 3 / 4,
        "the broken snapshot ({} bytes) was not replaced by a whole one ({replaced} bytes, \
         {length} before)",
        length / 2
    );
    let (after, _) = run("warm-after");
    assert!(after.stderr.contains("from its snapshot"), "{after}");
    assert!(!after.stderr.contains("did not start"), "{after}");
}

/// The serial multiplexers (`banger daemon serial-mux`) running for VMs of `context`.
fn serial_muxes(context: &TestContext) -> Vec<u32> {
    let root = context.root.path().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("serial-mux") && cmdline.contains(&root)
        })
        .collect()
}

#[test]
fn slow_a_kept_vm_restores_serves_exec_and_ssh_at_once_and_boots_cold_after_a_stop() {
    if !can_boot() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    // A shape no other test boots: the first run saves the snapshot the second restores.
    let run = |name: &str| {
        vm_ok(
            context,
            name,
            &[
                "-v", "vm", "run", "--name", name, "--memory", "672M", "--vcpu", "1", "--", "true",
            ],
        )
    };
    let first = run("kept-first");
    assert!(first.stderr.contains("saved the snapshot"), "{first}");
    vm_ok(context, "kept-first", &["vm", "delete", "-f", "kept-first"]);

    // `vm create --start` restores it too.
    let name = "kept-warm";
    let restored = vm_ok(
        context,
        name,
        &[
            "-v", "vm", "create", "--start", "--name", name, "--memory", "672M", "--vcpu", "1",
        ],
    );
    assert!(restored.stdout.contains("running"), "{restored}");
    assert!(restored.stderr.contains("from its snapshot"), "{restored}");
    assert!(!restored.stderr.contains("booting `"), "{restored}");
    assert_eq!(show(context, name)["state"], "running");
    assert_eq!(serial_muxes(context).len(), 1, "one multiplexer for one VM");

    // A command holds the agent; another command and an SSH session run meanwhile.
    let mut holder = context
        .command(&[
            "vm",
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "touch /tmp/holding; sleep 60; echo held",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let check = context.run(&["vm", "exec", name, "--", "test", "-e", "/tmp/holding"]);
        if check.code == Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first command never started: {check}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let exec = vm_ok(
        context,
        name,
        &[
            "vm",
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "echo second > /root/mark; cat /root/mark",
        ],
    );
    assert_eq!(exec.stdout, "second\n", "{exec}");
    let ssh = vm_ok(
        context,
        name,
        &["vm", "ssh", name, "--", "cat", "/root/mark"],
    );
    assert_eq!(ssh.stdout, "second\n", "{ssh}");
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the holding command ended before the others ran"
    );
    let _ = holder.kill();
    let _ = holder.wait();

    // A multiplexer killed by hand (`pkill banger` would) is started again by the next
    // request, and the agent answers through the new one.
    let killed = serial_muxes(context);
    for pid in &killed {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while serial_muxes(context).iter().any(|pid| killed.contains(pid)) {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGKILL did not end it"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let back = vm_ok(
        context,
        name,
        &["vm", "exec", name, "--", "cat", "/root/mark"],
    );
    assert_eq!(back.stdout, "second\n", "{back}");
    let revived = serial_muxes(context);
    assert_eq!(revived.len(), 1, "{revived:?}");
    assert!(!killed.contains(&revived[0]));

    // Stopped, its multiplexer goes with it; started again, it boots and kept its disk.
    vm_ok(context, name, &["vm", "stop", name]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !serial_muxes(context).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the multiplexer outlived its VM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = vm_ok(context, name, &["-v", "vm", "start", name]);
    assert!(started.stderr.contains("booting `"), "{started}");
    assert!(!started.stderr.contains("snapshot"), "{started}");
    let mark = vm_ok(
        context,
        name,
        &["vm", "exec", name, "--", "cat", "/root/mark"],
    );
    assert_eq!(mark.stdout, "second\n", "{mark}");
    vm_ok(context, name, &["vm", "delete", "-f", name]);
}

/// What a boot that timed out says of its VMM: a QEMU that answers on QMP reports its state,
/// a stopped one (as a QEMU whose main loop hangs on a device) is called stuck, and a dead
/// helper is named. A real QEMU, held before its first instruction (`-S`).
#[tokio::test]
async fn a_guest_that_never_answered_is_diagnosed_by_its_vmms_own_state() {
    use banger::vm::backend::{AgentAddress, BackendKind, Launched, diagnose};
    use banger::vm::process::ProcessHandle;
    use nix::sys::signal::Signal;

    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let mut qemu = tokio::process::Command::new(banger::vm::qemu::binary())
        .args([
            "-M",
            "microvm",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = qemu.id().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !qmp.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A process that has exited: the helper that is gone.
    let mut helper = std::process::Command::new("true").spawn().unwrap();
    let helper_pid = helper.id();
    let helper_handle = ProcessHandle {
        pid: helper_pid,
        start_ticks: 1,
    };
    helper.wait().unwrap();
    let launched = Launched {
        backend: BackendKind::Qemu,
        vmm: ProcessHandle::of(pid).unwrap(),
        helpers: vec![helper_handle],
        control_socket: qmp.clone(),
        agent: AgentAddress::Serial {
            path: dir.path().join("agent.sock"),
        },
        ssh_host: None,
        ssh_port: None,
        tap: None,
    };
    let said = diagnose(&launched).await;
    assert!(
        said.contains("QEMU reports the guest `prelaunch`"),
        "{said}"
    );
    assert!(
        said.contains(&format!("its helper process {helper_pid} is gone")),
        "{said}"
    );
    assert!(launched.vmm.signal(Signal::SIGSTOP));
    let said = diagnose(&launched).await;
    assert!(launched.vmm.signal(Signal::SIGCONT));
    assert!(
        said.contains("QEMU did not answer on its control socket within 1 s"),
        "{said}"
    );
    let gone = Launched {
        control_socket: dir.path().join("missing.sock"),
        helpers: Vec::new(),
        ..launched
    };
    let said = diagnose(&gone).await;
    assert!(said.starts_with("QEMU's control socket: "), "{said}");
    qemu.kill().await.unwrap();
}
