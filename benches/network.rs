//! VM networking costs, through the real `banger` binary and a daemon of the bench's own,
//! inside a network namespace the bench makes (and deletes): the bridge, taps and NAT never
//! touch the host's own namespace.
//!
//! 1. **Create**: `banger vm create --network tap` against `--network user` (no boot),
//!    alternating, median of 5 each, every VM deleted after (not timed). Target: both
//!    ≤ 100 ms. And what the network adds before the VMM starts: from `vm start` to the
//!    daemon's `booting` note, `tap` (bridge up, a tap from the pool, the ruleset) against
//!    `user` (a free port), median of 3 boots each, alternating.
//! 2. **`ssh NAME.vm true`** (the system's ssh, `banger ssh-config install`'s config, the
//!    `banger vm proxy` ProxyCommand) against `ssh -p PORT root@127.0.0.1 true` to the same
//!    user-mode VM's forwarded port with the same key, alternating, median of 7 each after
//!    one warm-up of each. Target: ≤ 1.2×.
//!
//! Needs root, `ip`, `nft`, QEMU and the ssh client. The HOME is `target/bench-network-home`
//! (its store seeded from `target/bench-vm-home` or `target/bench-boot-home` on the first run,
//! so the Debian image and kernel are not rebuilt). Run: `cargo bench --bench network` (or
//! `scripts/bench-network`).

#[allow(dead_code)] // the helpers are shared by several benches; this one uses a few
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::{median, ms, seed_store};

const CREATE_RUNS: usize = 5;
const START_RUNS: usize = 3;
const SSH_RUNS: usize = 7;
const CREATE_TARGET: Duration = Duration::from_millis(100);
const SSH_TARGET_RATIO: f64 = 1.2;

/// The namespace, the HOME and the daemon; on drop every VM is deleted, the daemon stopped
/// and the namespace removed.
struct Bench {
    netns: String,
    home: PathBuf,
    runtime: PathBuf,
}

impl Bench {
    /// `argv` inside the namespace, with the bench HOME's environment.
    fn command(&self, argv: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns]).args(argv);
        for name in banger::env::ALL.iter().chain(banger::env::STANDARD) {
            command.env_remove(name);
        }
        command
            .env("HOME", &self.home)
            .env(banger::env::BANGER_RUNTIME_DIR, &self.runtime)
            .env(banger::env::BANGER_NO_PROGRESS, "1")
            .stdin(Stdio::null());
        command
    }

    fn banger(&self, args: &[&str]) -> String {
        let mut argv = vec![env!("CARGO_BIN_EXE_banger")];
        argv.extend_from_slice(args);
        let output = self.command(&argv).output().expect("run banger");
        assert!(
            output.status.success(),
            "banger {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `banger ARGS` timed to exit, and to the first stderr line containing `note`.
    fn timed(&self, args: &[&str], note: &str) -> (Duration, Option<Duration>) {
        use std::io::BufRead;
        let mut argv = vec![env!("CARGO_BIN_EXE_banger")];
        argv.extend_from_slice(args);
        let started = Instant::now();
        let mut child = self
            .command(&argv)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run banger");
        let mut at = None;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(child.stderr.take().unwrap())
            .lines()
            .map_while(Result::ok)
        {
            if at.is_none() && line.contains(note) {
                at = Some(started.elapsed());
            }
            lines.push(line);
        }
        let status = child.wait().expect("wait for banger");
        assert!(
            status.success(),
            "banger {args:?} failed:\n{}",
            lines.join("\n")
        );
        (started.elapsed(), at)
    }

    /// `argv` inside the namespace, timed; must succeed.
    fn timed_program(&self, argv: &[&str]) -> Duration {
        let started = Instant::now();
        let output = self.command(argv).output().expect("run");
        let elapsed = started.elapsed();
        assert!(
            output.status.success(),
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        elapsed
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Ok(output) = self
            .command(&[env!("CARGO_BIN_EXE_banger"), "--json", "vm", "list"])
            .output()
        {
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                if let Ok(record) = serde_json::from_str::<serde_json::Value>(line)
                    && let Some(name) = record["data"]["name"].as_str()
                {
                    let _ = self
                        .command(&[env!("CARGO_BIN_EXE_banger"), "vm", "rm", "-f", name])
                        .output();
                }
            }
        }
        let _ = self
            .command(&[env!("CARGO_BIN_EXE_banger"), "daemon", "stop"])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

/// Pulls the kernel and the image into `home`'s store from the host's namespace: building
/// them fetches Debian packages, and the bench's namespace has no way out. Its own runtime
/// directory, so that a daemon started here is never the one the namespace's commands reach.
fn fetch_outside_the_namespace(home: &Path) {
    let runtime = PathBuf::from(format!("/tmp/bgbench-fetch-{}", std::process::id()));
    let banger = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_banger"));
        for name in banger::env::ALL.iter().chain(banger::env::STANDARD) {
            command.env_remove(name);
        }
        command
            .args(args)
            .env("HOME", home)
            .env(banger::env::BANGER_RUNTIME_DIR, &runtime)
            .env(banger::env::BANGER_NO_PROGRESS, "1")
            .stdin(Stdio::null())
            .output()
            .expect("run banger")
    };
    for args in [
        &["kernel", "pull", "debian-cloud-amd64"][..],
        &["image", "pull", "debian-bookworm"][..],
    ] {
        let output = banger(args);
        if !output.status.success() {
            banger(&["daemon", "stop"]);
            panic!(
                "banger {args:?} failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    banger(&["daemon", "stop"]);
    let _ = std::fs::remove_dir_all(&runtime);
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn main() -> ExitCode {
    if std::env::args().any(|arg| arg == "--list") {
        return ExitCode::SUCCESS;
    }
    if !nix::unistd::geteuid().is_root()
        || banger::env::find_program("ip").is_none()
        || banger::env::find_program("nft").is_none()
        || banger::env::find_program("ssh").is_none()
    {
        eprintln!("bench-network needs root, ip (iproute2), nft (nftables) and ssh");
        return ExitCode::FAILURE;
    }
    let home = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-network-home");
    std::fs::create_dir_all(&home).unwrap();
    seed_store(
        &home,
        &["bench-vm-home", "bench-boot-home", "bench-up-home"],
    );
    let netns = format!("bgbench{}", std::process::id());
    let status = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .expect("run ip");
    assert!(status.success(), "ip netns add {netns} failed");
    let bench = Bench {
        netns: netns.clone(),
        home: home.clone(),
        runtime: PathBuf::from(format!("/tmp/bgbench-{}", std::process::id())),
    };
    let lo = bench
        .command(&["ip", "link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(lo.success());
    eprintln!("kernel and image (built once, then store hits)");
    fetch_outside_the_namespace(&home);

    let mut met = true;
    met &= bench_create(&bench);
    met &= bench_ssh(&bench, &home);
    if met {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Part 1: create (no boot) and the pre-boot network setup, tap against user.
fn bench_create(bench: &Bench) -> bool {
    let create = |name: &str, network: &str| {
        bench
            .timed(
                &[
                    "vm",
                    "create",
                    "--name",
                    name,
                    "--network",
                    network,
                    "--memory",
                    "1G",
                    "--vcpu",
                    "1",
                ],
                "created VM",
            )
            .0
    };
    // Warm: the daemon, the state database, the bridge (a tap VM's first start makes it).
    create("warm", "tap");
    bench.banger(&["vm", "start", "warm", "--timeout", "600"]);
    bench.banger(&["vm", "rm", "-f", "warm"]);
    let (mut tap, mut user) = (Vec::new(), Vec::new());
    for run in 0..CREATE_RUNS {
        for (network, samples) in [("tap", &mut tap), ("user", &mut user)] {
            let name = format!("c-{network}-{run}");
            samples.push(create(&name, network));
            bench.banger(&["vm", "rm", "-f", &name]);
        }
    }
    let (tap, user) = (median(tap), median(user));
    let create_met = tap <= CREATE_TARGET && user <= CREATE_TARGET;
    println!(
        "vm create (no boot), median of {CREATE_RUNS}: tap {} · user {} · tap/user {:.2}× \
         (target: both ≤ {}: {})",
        ms(tap),
        ms(user),
        ratio(tap, user),
        ms(CREATE_TARGET),
        verdict(create_met)
    );

    // A second tap VM keeps the bridge up between the starts measured.
    create("keeper", "tap");
    bench.banger(&["vm", "start", "keeper", "--timeout", "600"]);
    let (mut tap, mut user) = (Vec::new(), Vec::new());
    for run in 0..START_RUNS {
        for (network, samples) in [("tap", &mut tap), ("user", &mut user)] {
            let name = format!("s-{network}-{run}");
            create(&name, network);
            let (_, booting) = bench.timed(&["vm", "start", &name, "--timeout", "600"], "booting");
            samples.push(booting.expect("a `booting` note"));
            bench.banger(&["vm", "rm", "-f", &name]);
        }
    }
    bench.banger(&["vm", "rm", "-f", "keeper"]);
    let (tap, user) = (median(tap), median(user));
    println!(
        "vm start until the VMM launches, median of {START_RUNS}: tap {} · user {} · tap adds \
         {} (the bridge's ruleset and a pooled tap)",
        ms(tap),
        ms(user),
        ms(tap.saturating_sub(user))
    );
    create_met
}

/// Part 2: `ssh NAME.vm true` against `ssh -p PORT root@127.0.0.1 true`.
fn bench_ssh(bench: &Bench, home: &Path) -> bool {
    bench.banger(&[
        "vm", "create", "--name", "sshbench", "--memory", "1G", "--vcpu", "1",
    ]);
    bench.banger(&["vm", "start", "sshbench", "--timeout", "600"]);
    bench.banger(&["ssh-config", "install"]);
    let shown = bench.banger(&["--json", "vm", "show", "sshbench"]);
    let record = common::json_record(&shown, "vm");
    let port = record["ssh_port"]
        .as_u64()
        .expect("an SSH port")
        .to_string();
    let known_hosts = record["known_hosts"].as_str().unwrap().to_owned();
    let key = home.join(".local/state/banger/ssh/id_ed25519");
    let key = key.to_str().unwrap();
    let config = home.join(".ssh/config");
    let config = config.to_str().unwrap();
    let by_name = [
        "ssh",
        "-F",
        config,
        "-o",
        "BatchMode=yes",
        "sshbench.vm",
        "true",
    ];
    let by_port_known_hosts = format!("UserKnownHostsFile={known_hosts}");
    let by_port = [
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        &by_port_known_hosts,
        "-o",
        "IdentitiesOnly=yes",
        "-i",
        key,
        "-p",
        &port,
        "root@127.0.0.1",
        "true",
    ];
    // Warm-up: host keys pinned, the daemon's socket and the guest's sshd warm.
    bench.timed_program(&by_name);
    bench.timed_program(&by_port);
    let (mut named, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..SSH_RUNS {
        named.push(bench.timed_program(&by_name));
        direct.push(bench.timed_program(&by_port));
    }
    bench.banger(&["ssh-config", "uninstall"]);
    bench.banger(&["vm", "rm", "-f", "sshbench"]);
    let (named, direct) = (median(named), median(direct));
    let factor = ratio(named, direct);
    let met = factor <= SSH_TARGET_RATIO;
    println!(
        "ssh NAME.vm true {} · ssh -p PORT root@127.0.0.1 true {} · {factor:.3}× (target \
         ≤ {SSH_TARGET_RATIO}×: {}), median of {SSH_RUNS}",
        ms(named),
        ms(direct),
        verdict(met)
    );
    met
}
