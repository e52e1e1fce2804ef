//! `--network tap`: banger's bridge, its address pool, NAT, `.vm` DNS and published ports.
//!
//! Every test that makes a bridge runs banger (and so its daemon, the bridge, the VMs and the
//! NAT) inside network namespaces it made itself, with `ip netns exec`, and removes them at
//! the end: nothing is sent to an address of the host's own namespace. "The outside" is a
//! second namespace behind a veth pair, serving HTTP.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::slow::{debian_world, have_qemu, home_like_the_world, records};
use crate::support::{Output, TestContext, capable, find_program, stop_daemon_and_vms};

/// Root, `ip` and `nft`: what making a bridge in a namespace takes.
fn can_make_bridges() -> bool {
    capable(
        "root, ip (iproute2) and nft (nftables), for network namespaces and a bridge",
        nix::unistd::geteuid().is_root()
            && find_program("ip").is_some()
            && find_program("nft").is_some(),
    )
}

/// A network namespace of the test's own, deleted (with everything in it) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(prefix: &str) -> Netns {
        let name = format!("{prefix}{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// `argv` run inside the namespace.
    fn command(&self, argv: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .args(argv)
            .stdin(Stdio::null());
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `banger ARGS` for `context`, run inside `netns`.
fn banger_in(context: &TestContext, netns: &Netns, args: &[&str]) -> Output {
    let template = context.command(args);
    let mut command = netns.command(&[env!("CARGO_BIN_EXE_banger")]);
    command.args(args).current_dir(context.project());
    for name in banger::env::ALL.iter().chain(banger::env::STANDARD) {
        command.env_remove(name);
    }
    for (key, value) in template.get_envs() {
        if let Some(value) = value {
            command.env(key, value);
        }
    }
    let output = command.output().unwrap();
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// [`banger_in`], which must succeed; on failure, panics with the output and the consoles.
fn banger_ok(context: &TestContext, netns: &Netns, args: &[&str]) -> Output {
    let output = banger_in(context, netns, args);
    assert_eq!(
        output.code,
        Some(0),
        "banger {}\n{output}\n{}",
        args.join(" "),
        consoles(context)
    );
    output
}

/// The tail of every VM's console log in `context`'s HOME.
fn consoles(context: &TestContext) -> String {
    let mut text = String::new();
    if let Ok(entries) = std::fs::read_dir(context.home().join(".local/state/banger/vms")) {
        for entry in entries.flatten() {
            let log = std::fs::read_to_string(entry.path().join("console.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            text.push_str(&format!(
                "--- console of {} (last lines)\n{}\n",
                entry.file_name().to_string_lossy(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    text
}

fn show(context: &TestContext, netns: &Netns, name: &str) -> serde_json::Value {
    let output = banger_ok(context, netns, &["--json", "vm", "show", name]);
    records(&output.stdout)[0]["data"].clone()
}

/// What `ip link` and `nft` show of banger in `netns`.
fn leftovers(netns: &Netns) -> Vec<String> {
    let links = netns
        .command(&["ip", "-o", "link", "show"])
        .output()
        .unwrap();
    let mut found: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|line| line.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or("").to_owned())
        .filter(|name| name == "banger0" || name.starts_with("bgtap"))
        .collect();
    let tables = netns.command(&["nft", "list", "tables"]).output().unwrap();
    if String::from_utf8_lossy(&tables.stdout).contains("inet banger") {
        found.push("table inet banger".to_owned());
    }
    found
}

/// Kills and reaps a child on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops the VMs and the daemon of a HOME whose daemon runs in a namespace (the unix
/// socket reaches it from anywhere).
struct StopAll<'a>(&'a TestContext);

impl Drop for StopAll<'_> {
    fn drop(&mut self) {
        stop_daemon_and_vms(&self.0.home(), &self.0.root.path().join("run"));
    }
}

/// Two tap VMs in a namespace: distinct addresses from the pool (kept across a daemon killed
/// with SIGKILL between the creates), the host's ssh reaches each by address, each resolves
/// and reaches the other as `NAME.vm`, a guest fetches a page from "the outside" through the
/// masquerade, a published port answers on the host's loopback through the DNAT, and `vm rm`
/// of both leaves no tap, bridge or nft table.
#[test]
fn slow_network_tap_vms_get_addresses_names_nat_and_ports_and_leave_nothing() {
    if !have_qemu() || !can_make_bridges() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = home_like_the_world(&world);
    let host = Netns::new("bgh");
    let outside = Netns::new("bgo");
    // The host's uplink to "the outside": 10.250.0.1 here, 10.250.0.2 there, the host's
    // default route through it. The outside has no route back to the bridge's subnet, so a
    // guest's packets reach it only masqueraded.
    ip(&[
        "-n",
        &host.name,
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &outside.name,
    ]);
    ip(&[
        "-n",
        &host.name,
        "addr",
        "add",
        "10.250.0.1/24",
        "dev",
        "uplink",
    ]);
    ip(&["-n", &host.name, "link", "set", "uplink", "up"]);
    ip(&[
        "-n",
        &outside.name,
        "addr",
        "add",
        "10.250.0.2/24",
        "dev",
        "eth0",
    ]);
    ip(&["-n", &outside.name, "link", "set", "eth0", "up"]);
    ip(&[
        "-n",
        &host.name,
        "route",
        "add",
        "default",
        "via",
        "10.250.0.2",
    ]);
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("index.html"), "served from the outside\n").unwrap();
    let server_log = site.path().join("server.log");
    let _server = Reaped(
        outside
            .command(&[
                "python3",
                "-m",
                "http.server",
                "8000",
                "--bind",
                "10.250.0.2",
                "--directory",
                site.path().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&server_log).unwrap())
            .spawn()
            .unwrap(),
    );

    let _stop = StopAll(&context);
    for args in [
        &["kernel", "pull", "debian-cloud-amd64"][..],
        &["image", "pull", "debian-bookworm"][..],
    ] {
        banger_ok(&context, &host, args);
    }
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "vm",
            "create",
            "--name",
            name,
            "--network",
            "tap",
            "--memory",
            "1G",
            "--vcpu",
            "1",
        ];
        args.extend_from_slice(extra);
        banger_ok(&context, &host, &args);
    };
    create("alpha", &["-p", "18080:8080"]);
    // A daemon killed with SIGKILL between the creates: the pool is in the state database.
    let lock = context.root.path().join("run/banger/daemon.lock");
    let pid: i32 = std::fs::read_to_string(&lock)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    create("beta", &[]);
    let alpha_address = show(&context, &host, "alpha")["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let beta_address = show(&context, &host, "beta")["address"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(alpha_address, beta_address);
    for address in [&alpha_address, &beta_address] {
        assert!(address.starts_with("10.213.0."), "{address}");
    }

    for name in ["alpha", "beta"] {
        banger_ok(&context, &host, &["vm", "start", name, "--timeout", "600"]);
    }
    assert_eq!(
        show(&context, &host, "alpha")["ssh_host"],
        alpha_address.as_str()
    );
    let listed = banger_ok(&context, &host, &["network", "show"]);
    assert!(
        listed.stdout.contains("banger0 10.213.0.1/24") && listed.stdout.contains("inet banger"),
        "{listed}"
    );

    // The host's ssh reaches each by its address (vm ssh dials ssh_host:22).
    for (name, address) in [("alpha", &alpha_address), ("beta", &beta_address)] {
        let own = banger_ok(
            &context,
            &host,
            &["vm", "ssh", name, "--", "ip -4 -o addr show dev eth0"],
        );
        assert!(own.stdout.contains(&format!("{address}/24")), "{own}");
    }
    // Names: each resolves the other through the bridge's DNS and reaches its sshd.
    for (name, other, address) in [
        ("alpha", "beta", &beta_address),
        ("beta", "alpha", &alpha_address),
    ] {
        let resolved = banger_ok(
            &context,
            &host,
            &["vm", "ssh", name, "--", &format!("getent hosts {other}.vm")],
        );
        assert!(resolved.stdout.starts_with(address.as_str()), "{resolved}");
        // The other's sshd may still be starting (its agent answers first): a minute.
        let banner = format!(
            "for try in $(seq 30); do timeout 5 bash -c 'exec 3<>/dev/tcp/{other}.vm/22; \
             head -c 7 <&3' && exit; sleep 2; done; exit 1"
        );
        let banner = banger_ok(&context, &host, &["vm", "ssh", name, "--", &banner]);
        assert!(banner.stdout.ends_with("SSH-2.0"), "{banner}");
    }
    // NAT: a page from the outside, which saw the host's uplink address, not the guest's.
    let page = banger_ok(
        &context,
        &host,
        &[
            "vm",
            "ssh",
            "alpha",
            "--",
            "timeout 20 bash -c 'exec 3<>/dev/tcp/10.250.0.2/8000; \
             printf \"GET /index.html HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'",
        ],
    );
    assert!(page.stdout.contains("served from the outside"), "{page}");
    let log = std::fs::read_to_string(&server_log).unwrap();
    assert!(log.contains("10.250.0.1"), "{log}");
    assert!(!log.contains("10.213.0."), "{log}");

    // The published port: 127.0.0.1:18080 on the host reaches alpha's 8080.
    let server = "perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => 8080, \
                  Listen => 5, ReuseAddr => 1) or die $!; while ($c = $s->accept) { <$c>; \
                  print $c \"HTTP/1.0 200 OK\\r\\n\\r\\nhello through the bridge\\n\"; close $c }'";
    let template = context.command(&["vm", "ssh", "alpha", "--", server]);
    let mut guest_server = host.command(&[
        env!("CARGO_BIN_EXE_banger"),
        "vm",
        "ssh",
        "alpha",
        "--",
        server,
    ]);
    for (key, value) in template.get_envs() {
        if let Some(value) = value {
            guest_server.env(key, value);
        }
    }
    let _guest_server = Reaped(
        guest_server
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fetched = host
            .command(&[
                "timeout",
                "10",
                "bash",
                "-c",
                "exec 3<>/dev/tcp/127.0.0.1/18080; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&fetched.stdout).into_owned();
        if text.contains("hello through the bridge") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "127.0.0.1:18080 did not reach alpha's 8080: {text:?} {}",
            String::from_utf8_lossy(&fetched.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    banger_ok(&context, &host, &["vm", "rm", "-f", "alpha", "beta"]);
    assert_eq!(leftovers(&host), Vec::<String>::new());
}

/// Without root, `--network tap` is refused with the way out, and nothing is made.
#[test]
fn network_tap_without_root_is_refused_and_creates_nothing() {
    let context = TestContext::new();
    let root = nix::unistd::geteuid().is_root();
    if root && !capable("setpriv (util-linux)", find_program("setpriv").is_some()) {
        return;
    }
    if root {
        // As root, banger runs as `nobody` in a sandbox that user owns.
        let status = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(context.root.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
    let banger = |args: &[&str]| -> std::process::Output {
        let template = context.command(args);
        let mut command = if root {
            let mut command = Command::new("setpriv");
            command.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
            command.arg(env!("CARGO_BIN_EXE_banger"));
            command
        } else {
            Command::new(env!("CARGO_BIN_EXE_banger"))
        };
        for name in banger::env::ALL.iter().chain(banger::env::STANDARD) {
            command.env_remove(name);
        }
        for (key, value) in template.get_envs() {
            if let Some(value) = value {
                command.env(key, value);
            }
        }
        command
            .args(args)
            .current_dir(context.root.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let output = banger(&["vm", "create", "--name", "tapper", "--network", "tap"]);
    let listed = banger(&["--json", "vm", "list"]);
    let _ = banger(&["daemon", "stop"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("only root can make") && stderr.contains("--network user"),
        "{stderr}"
    );
    assert!(listed.status.success(), "{listed:?}");
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "",
        "no VM was recorded"
    );
    assert!(
        !context
            .home()
            .join(".local/state/banger/vms/tapper")
            .exists()
    );
}

/// A tap VM restored from another tap VM's snapshot takes its own address: the host reaches
/// it there, its default route and resolver are the bridge's, and it reaches the other by name.
#[test]
fn slow_network_tap_vms_start_warm_at_addresses_of_their_own() {
    if !have_qemu() || !can_make_bridges() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = home_like_the_world(&world);
    let host = Netns::new("bgw");
    let _stop = StopAll(&context);
    for args in [
        &["kernel", "pull", "debian-cloud-amd64"][..],
        &["image", "pull", "debian-bookworm"][..],
    ] {
        banger_ok(&context, &host, args);
    }
    let start = |name: &str| {
        banger_ok(
            &context,
            &host,
            &[
                "-v",
                "vm",
                "create",
                "--start",
                "--timeout",
                "600",
                "--name",
                name,
                "--network",
                "tap",
                "--memory",
                "640M",
                "--vcpu",
                "1",
            ],
        )
    };
    let saver = start("saver");
    assert!(saver.stderr.contains("saved the snapshot"), "{saver}");
    let restored = start("restored");
    assert!(restored.stderr.contains("from its snapshot"), "{restored}");
    assert!(!restored.stderr.contains("booting `"), "{restored}");

    let address = |name: &str| {
        show(&context, &host, name)["address"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (saver_address, restored_address) = (address("saver"), address("restored"));
    assert_ne!(saver_address, restored_address);
    // `vm ssh` dials the VM's own address: this reaching it is the first check.
    let own = banger_ok(
        &context,
        &host,
        &[
            "vm",
            "ssh",
            "restored",
            "--",
            "ip -4 -o addr show dev eth0; ip -4 route show default; cat /etc/resolv.conf",
        ],
    );
    assert!(
        own.stdout.contains(&format!("{restored_address}/24")),
        "{own}"
    );
    assert!(
        !own.stdout.contains(&format!("{saver_address}/")),
        "the restored VM kept the saver's address: {own}"
    );
    assert!(own.stdout.contains("default via 10.213.0.1"), "{own}");
    assert!(own.stdout.contains("nameserver 10.213.0.1"), "{own}");
    // By name, through the bridge's DNS, to the saver's sshd.
    let banner = banger_ok(
        &context,
        &host,
        &[
            "vm",
            "ssh",
            "restored",
            "--",
            "getent hosts saver.vm; timeout 20 bash -c 'exec 3<>/dev/tcp/saver.vm/22; \
             head -c 7 <&3'",
        ],
    );
    assert!(banner.stdout.starts_with(&saver_address), "{banner}");
    assert!(banner.stdout.ends_with("SSH-2.0"), "{banner}");

    banger_ok(&context, &host, &["vm", "rm", "-f", "saver", "restored"]);
    assert_eq!(leftovers(&host), Vec::<String>::new());
}
