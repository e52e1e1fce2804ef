//! The reliability group: trials that would have found the hardening review's defects, with
//! real processes racing each other, killed at random points, short of disk space, or facing
//! a guest that stops answering.

use crate::registry::{Pusher, RealRegistry, push_layers};
use crate::rootfs::faithful_layer_blobs;
use crate::support::{
    FakeVm, StopDaemon, TestContext, capable, fake_ready_frame, have_e2fsprogs, read_agent_request,
};

/// Eight `banger build` processes of one Bangerfile, started together, build each step once in
/// all (the store's per-step locks) and all report the same image.
#[test]
fn reliability_eight_concurrent_builds_run_each_step_once_and_agree() {
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pusher = Pusher::new(&registry.address, None).await;
        push_layers(
            &pusher,
            "test/race",
            Some("v1"),
            "amd64",
            false,
            faithful_layer_blobs(),
        )
        .await;
    });
    let reference = format!("{}/test/race:v1", registry.address);
    let context = TestContext::new();
    let project = context.project();
    std::fs::write(project.join("motd"), "hello\n").unwrap();
    std::fs::write(
        project.join("Bangerfile"),
        format!(
            "[project]\nname = \"race\"\n\n[image]\nfrom = {{ oci = \"{reference}\" }}\n\
             size = \"256M\"\n\n[[image.provision]]\ncopy = \"motd\"\nto = \"/etc/motd\"\n"
        ),
    )
    .unwrap();
    // Pinned first, so that the eight differ in nothing but timing.
    let pinned = context.run(&["graph"]);
    assert_eq!(pinned.code, Some(0), "{pinned}");
    let children: Vec<_> = (0..8)
        .map(|_| {
            context
                .command(&["--json", "build"])
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
    let mut ran: Vec<String> = Vec::new();
    let mut images = std::collections::BTreeSet::new();
    for output in &outputs {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        for line in stdout.lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            match record["type"].as_str() {
                Some("step_finished") => {
                    ran.push(record["data"]["step"].as_str().unwrap().to_owned());
                }
                Some("image_built") => {
                    images.insert((
                        record["data"]["key"].as_str().unwrap().to_owned(),
                        record["data"]["rootfs"].as_str().unwrap().to_owned(),
                    ));
                }
                _ => {}
            }
        }
    }
    let mut unique = ran.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(ran.len(), unique.len(), "a step ran twice: {ran:?}");
    assert!(
        unique.iter().any(|step| step.ends_with("/rootfs")),
        "nothing was built: {ran:?}"
    );
    assert_eq!(images.len(), 1, "the builds disagree: {images:?}");
}

/// Unmounts a tmpfs the test mounted, however the test ends.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        crate::support::run_ok(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(path),
        );
        Tmpfs(path.to_owned())
    }

    fn resize(&self, size: &str) {
        crate::support::run_ok(
            std::process::Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(&self.0),
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A store on a file system too small for the pull: a clear "no space" error naming the store,
/// nothing recorded, and the same store works once there is room.
#[test]
fn reliability_a_full_disk_fails_the_pull_clearly_and_the_store_recovers() {
    if !capable(
        "root, to mount a small tmpfs for the store",
        nix::unistd::geteuid().is_root(),
    ) {
        return;
    }
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    // One 40 MiB file that does not compress: the layer alone outgrows a 24 MiB store.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..40 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, "srv/blob", &data[..])
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let blob = crate::registry::gzip(&tar);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pusher = Pusher::new(&registry.address, None).await;
        push_layers(
            &pusher,
            "test/big",
            Some("v1"),
            "amd64",
            false,
            vec![(
                banger::oci::media_types::OCI_LAYER_GZIP.to_owned(),
                blob,
                tar,
            )],
        )
        .await;
    });
    let reference = format!("{}/test/big:v1", registry.address);
    let context = TestContext::new();
    let cache = context.root.path().join("small-cache");
    let tmpfs = Tmpfs::mount(&cache, "24m");
    let run = |args: &[&str]| {
        let output = context
            .command(args)
            .env("BANGER_CACHE_DIR", &cache)
            .output()
            .unwrap();
        crate::support::Output {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    };
    let full = run(&["image", "pull", &reference, "--name", "big"]);
    assert_ne!(full.code, Some(0), "{full}");
    assert!(full.stderr.contains("No space left on device"), "{full}");
    assert!(
        full.stderr.contains(&cache.display().to_string()),
        "the error names the store: {full}"
    );
    // Steps that finished before the disk filled (banger's agent layer) may be kept; the
    // layer download and the image build, which failed, are not.
    let listed = run(&["--json", "cache", "ls"]);
    assert_eq!(listed.code, Some(0), "{listed}");
    for line in listed.stdout.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        let kind = entry["data"]["kind"].as_str().unwrap();
        assert!(
            kind != "oci.fetch-layer" && kind != "rootfs.build",
            "a failed step was recorded: {listed}"
        );
    }
    let scratch: Vec<_> = std::fs::read_dir(cache.join("store/scratch"))
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    assert!(scratch.is_empty(), "partial files left: {scratch:?}");
    let images = run(&["--json", "image", "list"]);
    assert!(!images.stdout.contains("\"big\""), "{images}");

    tmpfs.resize("512m");
    let pulled = run(&["image", "pull", &reference, "--name", "big"]);
    assert_eq!(pulled.code, Some(0), "{pulled}");
    let listed = run(&["--json", "cache", "ls"]);
    assert!(!listed.stdout.trim().is_empty(), "{listed}");
}

/// Every output the store records reads back with its recorded digest and size.
fn assert_store_intact(store_dir: &std::path::Path) {
    let store = banger::store::Store::open(store_dir).unwrap();
    for (record, _) in store.records().unwrap() {
        for (name, output) in &record.outputs {
            let integrity: ssri::Integrity = output.integrity.parse().unwrap();
            // Verifies the bytes against the digest as it reads them.
            let bytes = cacache::read_hash_sync(store_dir, &integrity)
                .unwrap_or_else(|error| panic!("{} output {name}: {error}", record.step_id));
            assert_eq!(bytes.len() as u64, output.size, "{} {name}", record.step_id);
        }
    }
}

/// `banger image pull` killed with SIGKILL at 30 points spread over a cold pull (download,
/// image build, publish, record), from a seed it prints (`BANGER_CRASH_SEED` repeats a run):
/// after each kill the store holds only whole, correct outputs, and the next pull completes.
#[test]
fn reliability_a_pull_killed_anywhere_leaves_a_store_the_next_pull_completes() {
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let mut state: u64 = std::env::var("BANGER_CRASH_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or(0x005E_ED0F_BA5E);
    eprintln!("crash trial seed: {state} (set BANGER_CRASH_SEED to repeat it)");
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // 12 MiB that does not compress, so the download and the image build both take a while.
    let data: Vec<u8> = (0..12 << 20).map(|_| next() as u8).collect();
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, "srv/blob", &data[..])
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let blob = crate::registry::gzip(&tar);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pusher = Pusher::new(&registry.address, None).await;
        let layers = vec![(
            banger::oci::media_types::OCI_LAYER_GZIP.to_owned(),
            blob,
            tar,
        )];
        push_layers(&pusher, "test/crash", Some("v1"), "amd64", false, layers).await;
    });
    let reference = format!("{}/test/crash:v1", registry.address);
    let pull = ["image", "pull", reference.as_str(), "--name", "crash"];

    // How long a whole cold pull takes here: the kills are spread over it.
    let timing = TestContext::new();
    let started = std::time::Instant::now();
    let whole = timing.run(&pull);
    assert_eq!(whole.code, Some(0), "{whole}");
    let span = started.elapsed().as_millis() as u64;
    eprintln!("a cold pull takes {span} ms");

    for round in 0..30 {
        let context = TestContext::new();
        let delay = next() % (span + span / 10 + 1);
        let mut child = context
            .command(&pull)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        let store_dir = context.store_dir();
        if store_dir.exists() {
            assert_store_intact(&store_dir);
        }
        let listed = context.run(&["--json", "cache", "ls"]);
        assert_eq!(
            listed.code,
            Some(0),
            "round {round} (killed at {delay} ms): {listed}"
        );
        let again = context.run(&pull);
        assert_eq!(
            again.code,
            Some(0),
            "round {round} (killed at {delay} ms, {status}): {again}"
        );
        assert_store_intact(&store_dir);
        let scratch: Vec<_> = std::fs::read_dir(store_dir.join("scratch"))
            .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
            .unwrap_or_default();
        assert!(
            scratch.is_empty(),
            "round {round}: scratch left: {scratch:?}"
        );
    }
}

/// A guest whose agent answers `Hello` and then never again must not wedge VM management:
/// `vm stop` halts it soon after the power-off request goes unanswered (not after the grace a
/// well guest gets to power off), and `vm kill` and `vm rm` do not talk to it at all. The VMs
/// are `sleep` processes with fake agents, adopted by the daemon from their scratch records.
#[test]
fn reliability_a_guest_gone_silent_cannot_wedge_stop_kill_or_rm() {
    use std::time::{Duration, Instant};

    let context = TestContext::new();
    let _daemon = StopDaemon(&context);
    let mut guests = Vec::new();
    for (index, name) in ["stopped", "killed", "removed"].into_iter().enumerate() {
        // A network, so the VMs are `running` in `vm list` as any other (nothing serves SSH).
        let vm = FakeVm::adopt(&context, name, index, Some("127.0.0.1:9".parse().unwrap()));
        let execs = SilentAgent::serve(&vm.agent_socket());
        guests.push((name, vm, execs));
    }

    let listed = context.run(&["vm", "list"]);
    assert_eq!(listed.code, Some(0), "{listed}");
    assert_eq!(
        listed.stdout.matches("running").count(),
        3,
        "the daemon adopts the three: {listed}"
    );
    for ((name, mut vm, execs), (command, limit)) in guests.into_iter().zip([
        ("stop", Duration::from_secs(25)),
        ("kill", Duration::from_secs(10)),
        ("rm", Duration::from_secs(10)),
    ]) {
        let started = Instant::now();
        let output = if command == "rm" {
            context.run(&["vm", command, "-f", name])
        } else {
            context.run(&["vm", command, name])
        };
        let took = started.elapsed();
        assert_eq!(output.code, Some(0), "vm {command} {name}: {output}");
        assert!(
            took < limit,
            "vm {command} on a silent guest took {took:.1?} (limit {limit:?}): {output}"
        );
        assert!(
            vm.vmm.try_wait().unwrap().is_some(),
            "vm {command} left the VMM running"
        );
        if command == "stop" {
            assert!(
                execs.load(std::sync::atomic::Ordering::SeqCst) > 0,
                "stop never asked the guest to power off: the test did not test silence"
            );
        }
    }
    let listed = context.run(&["vm", "list"]);
    assert!(
        listed.stdout.contains("stopped") && !listed.stdout.contains("removed"),
        "{listed}"
    );
}

/// An agent that answers `Hello` with `Ready` and reads everything after it without a word;
/// counts the requests it swallowed.
struct SilentAgent;

impl SilentAgent {
    fn serve(path: &std::path::Path) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        use banger::guest::protocol::FrameType;
        use std::io::Write;
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let swallowed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&swallowed);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let counter = std::sync::Arc::clone(&counter);
                std::thread::spawn(move || {
                    loop {
                        let Some(header) = read_agent_request(&mut stream) else {
                            return;
                        };
                        if header.kind == FrameType::Hello as u8 {
                            let frame = fake_ready_frame(header.channel, "silent");
                            if stream.write_all(&frame).is_err() {
                                return;
                            }
                        } else {
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        swallowed
    }
}
