//! VM creation and a whole `vm run --rm -- true`, through the real `banger` binary and its
//! daemon, against baselines measured in the same run.
//!
//! 1. **Create (no boot)**: `banger vm create --name X --image IMG --memory 512M` through an
//!    already-running daemon, for a 1 GiB and a 16 GiB image (blank ext4 files registered
//!    with `banger image register`); median of 5 each, every VM deleted after (not timed).
//!    Baselines: copying the stored image once per VM, reading and writing every byte (the
//!    store holds it fully allocated), and a sparse-aware `cp` of the blank file it was made
//!    from. Target: ≤ 100 ms for both sizes (a VM shares its image: no copy, so the size
//!    should not matter).
//! 2. **`banger vm run --rm --memory 1G --vcpu 1 -- true` on a warm store** (the
//!    `debian-bookworm` image and `debian-cloud-amd64` kernel already built): CLI start →
//!    create → boot → agent → SSH key → `true` → delete → exit; median of 3. Baseline: the
//!    same vmlinux, initramfs and rootfs booted by the library alone (`BootedVm`: no daemon,
//!    no per-VM disks, a tmpfs overlay, no network), same vCPUs and memory: QEMU start →
//!    agent ready → `true` → QEMU stopped. The two alternate, so drift hits both. Target:
//!    banger adds ≤ 1 s. The banger line also shows when the daemon's notes arrived
//!    (created, booting, up) in the median run.
//!
//! Options (after `--`): `--breakdown` adds library boots that put back the daemon's
//! differences one at a time (the VM's own disks; QEMU's user-mode network with the SSH
//! forward and `ip=`; both plus installing banger's SSH key through the agent), to show
//! where the added time goes; `--only create|run|warm` runs one part.
//!
//! 3. **Warm start**: `vm run --rm -- true` restored from a memory snapshot against
//!    `vm run --rm --cold -- true` booted, alternating, median of 3, after one run that saves
//!    the snapshot if it is missing; prints both, the ratio, and the snapshots' size on disk.
//!    Targets: warm ≤ 2 s and ≤ 25 % of cold. (Part 2 uses `--cold`: it measures banger's
//!    own overhead on a boot.)
//!
//! Everything happens in a HOME kept under `target/bench-vm-home` (the images and kernel stay
//! for the next run; on its first run its store is seeded by copying the one of
//! `target/bench-boot-home` when that exists, so nothing is rebuilt), with a daemon of its
//! own (a runtime directory under `/tmp`: unix socket paths are short). Every VM the bench
//! made is deleted and the daemon stopped at the end, also when it fails. The 16 GiB image
//! costs 16 GiB of disk in that store (the import writes every byte), and the full-copy
//! baseline another 16 GiB while it runs. Needs QEMU and vhost-device-vsock, plus what
//! `scripts/bench-boot` needs to build the image and kernel when no store can be seeded.
//! Run: `cargo bench --bench vm` (or `scripts/bench-vm`).

#[allow(dead_code)] // the helpers are shared by several benches; this one uses a few
mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use banger::vm::accel::{self, HostFacts};
use banger::vm::boot::{AgentTransport, BootSpec, BootedVm};

use common::{json_record, materialize, median, ms, secs};

const CREATE_RUNS: usize = 5;
const COPY_RUNS: usize = 3;
const RUN_RUNS: usize = 3;
const CREATE_TARGET: Duration = Duration::from_millis(100);
const RUN_TARGET_ADDED: Duration = Duration::from_secs(1);
const KERNEL: &str = "debian-cloud-amd64";
const IMAGE: &str = "debian-bookworm";
/// The images of the create benchmark: name and size.
const SIZED_IMAGES: [(&str, u64); 2] = [("bench-vm-1g", 1 << 30), ("bench-vm-16g", 16 << 30)];

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// A command's run: wall time, and each stderr line with when it arrived.
#[derive(Debug)]
struct Timed {
    wall: Duration,
    success: bool,
    stdout: String,
    stderr: Vec<(Duration, String)>,
}

impl Timed {
    /// When the first stderr line containing `needle` arrived.
    fn at(&self, needle: &str) -> Option<Duration> {
        self.stderr
            .iter()
            .find(|(_, line)| line.contains(needle))
            .map(|(at, _)| *at)
    }

    fn stderr_text(&self) -> String {
        self.stderr
            .iter()
            .map(|(at, line)| format!("  [{:>7.3} s] {line}\n", at.as_secs_f64()))
            .collect()
    }
}

/// The bench HOME with a daemon of its own. Dropping it (also while a panic unwinds)
/// deletes every VM the bench made and still exists, stops the daemon and removes the
/// scratch directory.
#[derive(Debug)]
struct Sandbox {
    home: PathBuf,
    /// Short, under `/tmp`: `run/` is `BANGER_RUNTIME_DIR` (the daemon's socket, the VMs'
    /// sockets), `base/` the baseline boots' sockets.
    scratch: PathBuf,
    /// VMs made and not known to be deleted.
    made: RefCell<BTreeSet<String>>,
}

impl Sandbox {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_banger"));
        command.args(args);
        for name in banger::env::ALL.iter().chain(banger::env::STANDARD) {
            command.env_remove(name);
        }
        command
            .env("HOME", &self.home)
            .env(banger::env::BANGER_RUNTIME_DIR, self.scratch.join("run"))
            .env(banger::env::BANGER_NO_PROGRESS, "1")
            .stdin(Stdio::null());
        command
    }

    fn try_banger(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run banger")
    }

    /// `banger ARGS`; panics with its output if it fails.
    fn banger(&self, args: &[&str]) -> String {
        let output = self.try_banger(args);
        assert!(
            output.status.success(),
            "banger {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `banger ARGS`, timed from spawn to exit, stderr lines stamped as they arrive.
    fn timed(&self, args: &[&str]) -> Timed {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run banger");
        let started = Instant::now();
        let mut stdout = child.stdout.take().unwrap();
        let drain = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let stderr: Vec<(Duration, String)> = BufReader::new(child.stderr.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .map(|line| (started.elapsed(), line))
            .collect();
        let status = child.wait().expect("wait for banger");
        let wall = started.elapsed();
        Timed {
            wall,
            success: status.success(),
            stdout: drain.join().unwrap_or_default(),
            stderr,
        }
    }

    /// A timed banger command that makes VM `name`; the VM is remembered for clean-up before
    /// it exists. Panics if the command fails.
    fn timed_vm(&self, name: &str, args: &[&str]) -> Timed {
        self.made.borrow_mut().insert(name.to_owned());
        let timed = self.timed(args);
        assert!(
            timed.success,
            "banger {args:?} failed:\n{}{}",
            timed.stdout,
            timed.stderr_text()
        );
        timed
    }

    fn delete_vm(&self, name: &str) {
        self.banger(&["vm", "rm", "-f", name]);
        self.made.borrow_mut().remove(name);
    }

    /// Forgets a VM that deleted itself (`vm run --rm`).
    fn forget_vm(&self, name: &str) {
        self.made.borrow_mut().remove(name);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for name in std::mem::take(&mut *self.made.borrow_mut()) {
            let output = self.try_banger(&["vm", "rm", "-f", &name]);
            if !output.status.success() {
                eprintln!(
                    "clean-up: `banger vm rm {name}` failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
        let output = self.try_banger(&["daemon", "stop"]);
        if !output.status.success() {
            eprintln!(
                "clean-up: `banger daemon stop` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// On the first run, copies the boot bench's store (its kernel and image steps are then
/// hits: `kernel pull` and `image pull` record them here without rebuilding).
fn seed_store(home: &Path) {
    let store = home.join(".cache/banger/store");
    let donor = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-boot-home/.cache/banger/store");
    if store.exists() || !donor.is_dir() {
        return;
    }
    eprintln!(
        "seeding {} with a copy of {}",
        store.display(),
        donor.display()
    );
    std::fs::create_dir_all(store.parent().unwrap()).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(&donor)
        .arg(&store)
        .status()
        .expect("run cp");
    if !status.success() {
        let _ = std::fs::remove_dir_all(&store);
        eprintln!("could not copy the store ({status}): building from scratch");
    }
}

/// Reads and writes every byte of `from` into a new `to` (no fsync: what a per-VM copy
/// costs before the page cache is flushed).
fn full_copy(from: &Path, to: &Path) -> Duration {
    let started = Instant::now();
    let mut input = std::fs::File::open(from).expect("open the image");
    let mut output = std::fs::File::create(to).expect("create the copy");
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = input.read(&mut buffer).expect("read the image");
        if read == 0 {
            break;
        }
        output.write_all(&buffer[..read]).expect("write the copy");
    }
    drop(output);
    let elapsed = started.elapsed();
    std::fs::remove_file(to).unwrap();
    elapsed
}

/// `cp --sparse=always`: holes stay holes.
fn sparse_copy(from: &Path, to: &Path) -> Duration {
    let started = Instant::now();
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg("--reflink=never")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    let elapsed = started.elapsed();
    assert!(status.success(), "cp failed: {status}");
    std::fs::remove_file(to).unwrap();
    elapsed
}

/// The stages of one library boot, from QEMU's start.
#[derive(Debug, Clone, Copy)]
struct BaselineRun {
    ready: Duration,
    command: Duration,
    total: Duration,
}

/// QEMU start → agent ready → (banger's SSH key installed, with `identity`) → `true` through
/// the agent → QEMU stopped.
fn baseline_run(spec: &BootSpec, identity: Option<&banger::ssh::SshIdentity>) -> BaselineRun {
    use banger::vm::boot::BootError;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let started = Instant::now();
        let mut vm = BootedVm::start(spec)
            .await
            .unwrap_or_else(|error| panic!("{}", banger::error::error_chain(&error)));
        let outcome = async {
            let (mut channel, _) = vm.wait_agent(started + Duration::from_secs(180)).await?;
            let ready = started.elapsed();
            if let Some(identity) = identity {
                banger::ssh::authorize_in_guest(&mut channel, identity)
                    .await
                    .unwrap_or_else(|error| panic!("{}", banger::error::error_chain(&error)));
            }
            let (status, _, _) = banger::vm::boot::run_captured(
                &mut channel,
                banger::guest::ExecRequest::argv(["true"]),
            )
            .await
            .map_err(|source| BootError::Command {
                serial_log: spec.serial_log.clone(),
                source,
            })?;
            assert_eq!(status, banger::guest::ExitStatus::Code(0), "`true` failed");
            Ok::<_, BootError>((ready, started.elapsed()))
        }
        .await;
        let stopped = vm.stop().await;
        let (ready, command) =
            outcome.unwrap_or_else(|error| panic!("{}", banger::error::error_chain(&error)));
        stopped.unwrap_or_else(|error| panic!("{}", banger::error::error_chain(&error)));
        BaselineRun {
            ready,
            command,
            total: started.elapsed(),
        }
    })
}

/// What a daemon boot adds to the baseline, one thing at a time (`--breakdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// The VM's own blank disks (`disk_bytes` each, as `vm create` makes them) instead of a
    /// tmpfs overlay.
    Disks(u64),
    /// QEMU's user-mode network with the SSH port forward, and `ip=` on the command line.
    Network,
    /// Both, and banger's SSH key installed through the agent: what the daemon's QEMU
    /// backend launches and waits for.
    Daemon(u64),
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::Disks(_) => f.write_str("+ per-VM disks"),
            Variant::Network => f.write_str("+ user-mode network"),
            Variant::Daemon(_) => f.write_str("+ disks + network + SSH key"),
        }
    }
}

/// One library boot of `variant` on `spec`: blank disks made before (untimed), a free port.
fn variant_run(
    spec: &BootSpec,
    variant: Variant,
    work: &Path,
    identity: &banger::ssh::SshIdentity,
) -> BaselineRun {
    let mut spec = spec.clone();
    let disk_bytes = match variant {
        Variant::Disks(bytes) | Variant::Daemon(bytes) => Some(bytes),
        Variant::Network => None,
    };
    let disks_dir = work.join("variant-disks");
    if let Some(bytes) = disk_bytes {
        std::fs::create_dir_all(&disks_dir).unwrap();
        spec.writable = banger::vm::boot::WritableLayer::VmDisks(
            banger::vm::storage::VmDisks::create(&disks_dir, "bench-variant", bytes, bytes)
                .expect("per-VM disks"),
        );
    }
    if !matches!(variant, Variant::Disks(_)) {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        spec.forwards = vec![banger::spec::PortForward::loopback_tcp(port, 22)];
    }
    let run = baseline_run(
        &spec,
        matches!(variant, Variant::Daemon(_)).then_some(identity),
    );
    let _ = std::fs::remove_dir_all(&disks_dir);
    run
}

/// A blank ext4 image of `bytes` (sparse), registered as `name` unless it already is.
/// Returns the blank file (kept: the sparse-copy baseline reads it) and the stored file.
fn sized_image(sandbox: &Sandbox, work: &Path, name: &str, bytes: u64) -> (PathBuf, PathBuf) {
    let images = sandbox.home.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let blank = images.join(format!("{name}.ext4"));
    if !blank.exists() {
        // Seeded by the name: the same bytes every time, so a re-registration is a store hit.
        banger::vm::storage::create_blank_ext4(&blank, bytes, "bench", name.as_bytes())
            .expect("blank ext4");
    }
    if !sandbox
        .try_banger(&["image", "show", name])
        .status
        .success()
    {
        eprintln!(
            "registering {name} ({} GiB; the store keeps every byte)",
            bytes >> 30
        );
        sandbox.banger(&[
            "image",
            "register",
            name,
            "--rootfs",
            blank.to_str().unwrap(),
            "--kernel",
            KERNEL,
        ]);
    }
    let record = json_record(&sandbox.banger(&["--json", "image", "show", name]), "image");
    assert_eq!(record["bytes"].as_u64(), Some(bytes), "{name}: {record}");
    let stored = work.join(format!("{name}.stored.ext4"));
    materialize(
        &sandbox.home,
        record["rootfs"].as_str().unwrap(),
        bytes,
        &stored,
    );
    (blank, stored)
}

/// Part 1: `vm create` for each sized image against copying the image. Returns whether the
/// target was met.
fn bench_create(sandbox: &Sandbox, work: &Path) -> bool {
    let images: Vec<(&str, u64, PathBuf, PathBuf)> = SIZED_IMAGES
        .iter()
        .map(|&(name, bytes)| {
            let (blank, stored) = sized_image(sandbox, work, name, bytes);
            (name, bytes, blank, stored)
        })
        .collect();
    let status = sandbox.banger(&["daemon", "status"]);
    let disk_note = {
        // One create, untimed, for the spec line (and a warm daemon, state and store).
        let timed = sandbox.timed_vm(
            "bench-create-warm",
            &[
                "vm",
                "create",
                "--name",
                "bench-create-warm",
                "--image",
                images[0].0,
                "--memory",
                "512M",
            ],
        );
        sandbox.delete_vm("bench-create-warm");
        timed
            .stderr
            .iter()
            .find_map(|(_, line)| line.split("spec: ").nth(1).map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned())
    };
    println!(
        "vm create (no boot) through a running daemon (pid {}), {disk_note}; median of \
         {CREATE_RUNS} creates, {COPY_RUNS} copies",
        json_status_pid(&status)
    );
    let mut met = true;
    let mut creates = Vec::new();
    let mut copies = Vec::new();
    for (name, bytes, blank, stored) in &images {
        let create = median(
            (0..CREATE_RUNS)
                .map(|run| {
                    let vm = format!("bench-create-{}g-{run}", bytes >> 30);
                    let timed = sandbox.timed_vm(
                        &vm,
                        &[
                            "vm", "create", "--name", &vm, "--image", name, "--memory", "512M",
                        ],
                    );
                    sandbox.delete_vm(&vm);
                    timed.wall
                })
                .collect(),
        );
        let copy_to = work.join("copy.ext4");
        let full = median(
            (0..COPY_RUNS)
                .map(|_| full_copy(stored, &copy_to))
                .collect(),
        );
        let sparse = median(
            (0..COPY_RUNS)
                .map(|_| sparse_copy(blank, &copy_to))
                .collect(),
        );
        let ok = create <= CREATE_TARGET;
        met &= ok;
        println!("  image {} GiB ({name}):", bytes >> 30);
        println!(
            "    vm create                         {:>10}  (target ≤ {}: {})",
            ms(create),
            ms(CREATE_TARGET),
            verdict(ok)
        );
        println!(
            "    baseline: full copy of the image  {:>10}  (create = {:.4}× copy)",
            ms(full),
            ratio(create, full)
        );
        println!(
            "    baseline: sparse cp of the blank  {:>10}  (create = {:.2}× sparse cp)",
            ms(sparse),
            ratio(create, sparse)
        );
        creates.push(create);
        copies.push(full);
    }
    println!(
        "  16 GiB / 1 GiB: create {:.2}×, full copy {:.2}×",
        ratio(creates[1], creates[0]),
        ratio(copies[1], copies[0])
    );
    println!(
        "  target ≤ {} for both sizes: {}",
        ms(CREATE_TARGET),
        verdict(met)
    );
    met
}

fn json_status_pid(status: &str) -> String {
    status
        .lines()
        .find_map(|line| line.strip_prefix("pid:"))
        .map(|pid| pid.trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

/// Part 2: `vm run --rm -- true` against a library boot of the same files; with
/// `breakdown`, library boots that add the daemon's differences one at a time. Returns
/// whether the target was met.
fn bench_run(sandbox: &Sandbox, work: &Path, short: &Path, breakdown: bool) -> bool {
    let kernel = json_record(
        &sandbox.banger(&["--json", "kernel", "show", KERNEL]),
        "kernel",
    );
    let image = json_record(
        &sandbox.banger(&["--json", "image", "show", IMAGE]),
        "image",
    );
    let file = |record: &serde_json::Value, integrity: &str, bytes: &str, name: &str| {
        let path = work.join(name);
        materialize(
            &sandbox.home,
            record[integrity].as_str().unwrap(),
            record[bytes].as_u64().unwrap(),
            &path,
        );
        path
    };
    let vmlinux = file(&kernel["vmlinux"], "integrity", "bytes", "vmlinux");
    let initrd = file(&kernel["initrd"], "integrity", "bytes", "initrd");
    let rootfs = file(&image, "rootfs", "bytes", "rootfs.ext4");
    let accel = accel::choose(&HostFacts::probe()).expect("accelerator");
    let vsock_daemon = banger::vm::vsock::find_binary();
    let transport = if vsock_daemon.is_some() {
        AgentTransport::Vsock
    } else {
        AgentTransport::Serial
    };
    let base_dir = short.join("base");
    std::fs::create_dir_all(&base_dir).unwrap();
    let spec = BootSpec {
        qemu_binary: "qemu-system-x86_64".into(),
        accel: accel.clone(),
        vcpus: 1,
        memory_mib: 1024,
        kernel: vmlinux,
        initrd: Some(initrd),
        rootfs,
        transport,
        vsock_daemon,
        extra_cmdline: Vec::new(),
        writable: banger::vm::boot::WritableLayer::Memory,
        forwards: Vec::new(),
        network: false,
        tap: None,
        dir: base_dir,
        serial_log: work.join("baseline-console.log"),
    };
    println!(
        "vm run --rm -- true on a warm store ({IMAGE}, kernel {} `{KERNEL}`, 1 vCPU, 1 GiB, \
         QEMU microvm, {accel}, agent over {transport}); median of {RUN_RUNS}, alternating",
        kernel["release"].as_str().unwrap_or("?")
    );
    let mut baselines = Vec::new();
    let mut runs = Vec::new();
    for run in 0..RUN_RUNS {
        baselines.push(baseline_run(&spec, None));
        let name = format!("bench-run-{run}");
        let timed = sandbox.timed_vm(
            &name,
            &[
                "vm", "run", "--rm", "--cold", "--name", &name, "--memory", "1G", "--vcpu", "1",
                "--", "true",
            ],
        );
        sandbox.forget_vm(&name);
        runs.push(timed);
    }
    let baseline = median(baselines.iter().map(|run| run.total).collect());
    let median_baseline = baselines
        .iter()
        .find(|run| run.total == baseline)
        .copied()
        .unwrap();
    let banger = median(runs.iter().map(|run| run.wall).collect());
    let median_run = runs.iter().find(|run| run.wall == banger).unwrap();
    println!(
        "  baseline: QEMU start → agent → `true` → stopped  {:>8}  (agent ready {}, `true` \
         done {}, QEMU stopped {}; all {})",
        secs(baseline),
        secs(median_baseline.ready),
        secs(median_baseline.command),
        secs(median_baseline.total),
        baselines
            .iter()
            .map(|run| secs(run.total))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let stage = |needle: &str| median_run.at(needle).map_or_else(|| "?".to_owned(), secs);
    let daemon_up = median_run
        .stderr
        .iter()
        .find_map(|(_, line)| {
            let rest = line.split(" is up (").nth(1)?;
            Some(rest.trim_end_matches(')').to_owned())
        })
        .unwrap_or_else(|| "?".to_owned());
    println!(
        "  banger vm run --rm --cold -- true                 {:>8}  (created {}, booting {}, \
         up {} (daemon: {daemon_up}), exit {}; all {})",
        secs(banger),
        stage("created VM"),
        stage("booting `"),
        stage(" is up ("),
        secs(median_run.wall),
        runs.iter()
            .map(|run| secs(run.wall))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let added = banger.saturating_sub(baseline);
    let ok = banger <= baseline + RUN_TARGET_ADDED;
    println!(
        "  banger − baseline: {}{}  (ratio {:.2}×); target ≤ {} added: {}",
        if banger < baseline { "−" } else { "+" },
        secs(if banger < baseline {
            baseline - banger
        } else {
            added
        }),
        ratio(banger, baseline),
        secs(RUN_TARGET_ADDED),
        verdict(ok)
    );
    if breakdown {
        let disk_bytes = median_run
            .stderr
            .iter()
            .find_map(|(_, line)| {
                let size = line.strip_suffix(" disk")?.rsplit(' ').next()?;
                banger::spec::ByteSize::parse(size).ok()
            })
            .map_or(8 << 30, |size| size.bytes());
        let identity = banger::ssh::SshIdentity::ensure(&sandbox.home.join(".local/state/banger"))
            .expect("banger's SSH key");
        println!(
            "  where the time goes: library boots adding the daemon's differences (median of \
             {RUN_RUNS}; Δ against the baseline):"
        );
        for variant in [
            Variant::Disks(disk_bytes),
            Variant::Network,
            Variant::Daemon(disk_bytes),
        ] {
            let runs: Vec<BaselineRun> = (0..RUN_RUNS)
                .map(|_| variant_run(&spec, variant, work, &identity))
                .collect();
            let total = median(runs.iter().map(|run| run.total).collect());
            let run = runs.iter().find(|run| run.total == total).unwrap();
            let delta = |a: Duration, b: Duration| {
                let (sign, by) = if a < b { ("−", b - a) } else { ("+", a - b) };
                format!("{sign}{}", secs(by))
            };
            println!(
                "    {:<30} {:>8} ({})  agent ready {} ({}), `true` done {}",
                variant.to_string(),
                secs(total),
                delta(total, baseline),
                secs(run.ready),
                delta(run.ready, median_baseline.ready),
                secs(run.command),
            );
        }
    }
    ok
}

/// Warm starts (`docs/snapshots.md`): `vm run --rm -- true` restored from a memory
/// snapshot against `vm run --rm --cold -- true` booted, alternating, after one run that
/// makes sure the snapshot exists. Targets: warm ≤ 2 s and ≤ 25 % of cold.
fn bench_warm(sandbox: &Sandbox) -> bool {
    let run = |name: &str, cold: bool| {
        let mut args = vec!["vm", "run", "--rm"];
        if cold {
            args.push("--cold");
        }
        args.extend_from_slice(&[
            "--name", name, "--memory", "1G", "--vcpu", "1", "--", "true",
        ]);
        let timed = sandbox.timed_vm(name, &args);
        sandbox.forget_vm(name);
        timed
    };
    let primed = run("bench-warm-prime", false);
    let saved = primed.at("saved the snapshot").is_some();
    println!(
        "warm start: vm run --rm -- true from a snapshot against --cold ({IMAGE}, 1 vCPU, 1 GiB); \
         median of {RUN_RUNS}, alternating; the first run {} ({})",
        if saved {
            "saved the snapshot"
        } else {
            "found it saved"
        },
        secs(primed.wall)
    );
    let mut colds = Vec::new();
    let mut warms = Vec::new();
    for index in 0..RUN_RUNS {
        colds.push(run(&format!("bench-cold-{index}"), true));
        let warm = run(&format!("bench-warm-{index}"), false);
        assert!(
            warm.at("from its snapshot").is_some() && warm.at("did not start").is_none(),
            "a warm run did not restore its snapshot:\n{}",
            warm.stderr_text()
        );
        warms.push(warm);
    }
    let all = |runs: &[Timed]| {
        runs.iter()
            .map(|run| secs(run.wall))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cold = median(colds.iter().map(|run| run.wall).collect());
    let warm = median(warms.iter().map(|run| run.wall).collect());
    let snapshots = sandbox
        .home
        .join(".cache/banger")
        .join(banger::paths::SNAPSHOTS_DIR);
    let on_disk: u64 = std::fs::read_dir(&snapshots)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().join("snapshot.json").exists())
        .flat_map(|entry| {
            std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|file| file.metadata().ok())
        .map(|meta| std::os::unix::fs::MetadataExt::blocks(&meta) * 512)
        .sum();
    println!(
        "  cold (boot)                     {:>8}  (all {})",
        secs(cold),
        all(&colds)
    );
    println!(
        "  warm (restored)                 {:>8}  (all {})",
        secs(warm),
        all(&warms)
    );
    let share = ratio(warm, cold);
    let ok = warm <= Duration::from_secs(2) && share <= 0.25;
    println!(
        "  warm / cold: {share:.2}× ({:.0} %); targets ≤ 2 s and ≤ 25 %: {}",
        share * 100.0,
        verdict(ok)
    );
    println!(
        "  snapshots on disk: {:.0} MiB (sparse: blocks in use)",
        on_disk as f64 / f64::from(1 << 20)
    );
    ok
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "--list") {
        return ExitCode::SUCCESS;
    }
    let breakdown = args.iter().any(|arg| arg == "--breakdown");
    let only = args
        .iter()
        .position(|arg| arg == "--only")
        .and_then(|at| args.get(at + 1))
        .map(String::as_str);
    let home = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-vm-home");
    std::fs::create_dir_all(&home).unwrap();
    let short = PathBuf::from(format!("/tmp/bench-vm-{}", std::process::id()));
    std::fs::create_dir_all(&short).unwrap();
    let sandbox = Sandbox {
        home: home.clone(),
        scratch: short.clone(),
        made: RefCell::new(BTreeSet::new()),
    };
    seed_store(&home);
    eprintln!(
        "building (or reusing) `{KERNEL}` and `{IMAGE}` in {}",
        home.display()
    );
    sandbox.banger(&["kernel", "pull", KERNEL]);
    sandbox.banger(&["image", "pull", IMAGE]);
    let work = tempfile::tempdir_in(&home).unwrap();
    let create_missed =
        matches!(only, None | Some("create")) && !bench_create(&sandbox, work.path());
    let run_missed =
        matches!(only, None | Some("run")) && !bench_run(&sandbox, work.path(), &short, breakdown);
    let warm_missed = matches!(only, None | Some("warm")) && !bench_warm(&sandbox);
    drop(sandbox);
    if !create_missed && !run_missed && !warm_missed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
