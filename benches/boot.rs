//! Boot to the guest agent, against a plain QEMU boot of the same kernel measured in the same
//! run.
//!
//! - baseline: QEMU `microvm` with the same accelerator, the default kernel's vmlinux and a
//!   tiny initramfs whose `/init` (a static busybox shell) prints a marker and powers off:
//!   QEMU start → the marker on the serial console.
//! - banger, Debian with systemd (the default image): QEMU start → agent ready (the initramfs
//!   loads modules, mounts the image under an overlay, hands over to systemd, which starts
//!   the agent) → first command's result; then the median round trip of a `true` command.
//! - banger, a busybox-only image (the agent stays PID 1).
//!
//! Every boot has the shape `vm run` gives on this host (its vCPUs: a quarter of the host's,
//! at least 2 where it has 2) and 1024 MiB.
//!
//! Targets: agent ready on the Debian image ≤ 10 s under TCG here (issue: kernels and the
//! guest agent) and ≤ 2.5× the plain boot (issue: speed, part 3); a command round trip
//! ≤ 100 ms once the boot is over (`systemctl is-system-running --wait`). The round trip
//! right after the first command is printed too, without a target: under TCG it shares the
//! vCPUs with the services systemd is still starting.
//!
//! The kernel and the images are built by the real `banger` binary in a HOME kept under
//! `target/bench-boot-home` (so a second run does not rebuild them). Needs QEMU, apt-get,
//! mmdebstrap, e2fsprogs, busybox-static and vhost-device-vsock.
//! Run: `cargo bench --bench boot` (or `scripts/bench-boot`).

#[allow(dead_code)] // the helpers are shared by several benches; this one uses a few
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use banger::vm::accel::{self, Accel, HostFacts};
use banger::vm::boot::{AgentTransport, BootSpec, SmokeReport, smoke_test};

use common::{json_record, materialize, median, ms, secs};

const RUNS: usize = 3;

/// `banger ARGS` in the bench HOME; panics with its output if it fails.
fn banger(home: &Path, args: &[&str]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_banger"));
    command.args(args);
    for name in banger::env::ALL.iter().chain(banger::env::STANDARD) {
        command.env_remove(name);
    }
    let output = command
        .env("HOME", home)
        .env("BANGER_NO_PROGRESS", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run banger");
    assert!(
        output.status.success(),
        "banger {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A root filesystem tar with only a static busybox (as the slow boot test builds it).
fn busybox_tar(busybox: &Path) -> Vec<u8> {
    let applets = Command::new(busybox)
        .arg("--list-full")
        .output()
        .expect("busybox --list-full");
    let mut builder = tar::Builder::new(Vec::new());
    let append = |builder: &mut tar::Builder<Vec<u8>>,
                  path: &str,
                  kind: tar::EntryType,
                  mode: u32,
                  link: Option<&str>,
                  data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        header.set_path(path).unwrap();
        if let Some(link) = link {
            header.set_link_name(link).unwrap();
        }
        header.set_cksum();
        builder.append(&header, data).unwrap();
    };
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "root",
    ] {
        append(
            &mut builder,
            dir,
            tar::EntryType::Directory,
            0o755,
            None,
            b"",
        );
    }
    append(
        &mut builder,
        "tmp",
        tar::EntryType::Directory,
        0o1777,
        None,
        b"",
    );
    let binary = std::fs::read(busybox).unwrap();
    append(
        &mut builder,
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        None,
        &binary,
    );
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        append(
            &mut builder,
            applet,
            tar::EntryType::Symlink,
            0o777,
            Some("/bin/busybox"),
            b"",
        );
    }
    builder.into_inner().unwrap()
}

/// The baseline initramfs: busybox as `/init` through a shell script that prints a marker.
fn baseline_initramfs(busybox: &Path, to: &Path) {
    let mut cpio = banger::kernel::cpio::CpioWriter::new(Vec::new());
    for dir in ["bin", "dev", "proc"] {
        cpio.directory(dir, 0o755).unwrap();
    }
    cpio.char_device("dev/console", 0o600, 5, 1).unwrap();
    cpio.file_bytes("bin/busybox", 0o755, &std::fs::read(busybox).unwrap())
        .unwrap();
    cpio.symlink("bin/sh", "busybox").unwrap();
    cpio.file_bytes(
        "init",
        0o755,
        b"#!/bin/sh\n/bin/busybox echo BASELINE-READY\n/bin/busybox poweroff -f\n",
    )
    .unwrap();
    std::fs::write(to, cpio.finish().unwrap()).unwrap();
}

/// QEMU start → `BASELINE-READY` on the serial console.
fn baseline_boot(accel: &Accel, vcpus: u32, vmlinux: &Path, initrd: &Path, dir: &Path) -> Duration {
    let log = dir.join("baseline.log");
    let _ = std::fs::remove_file(&log);
    let spec = banger::vm::qemu::QemuSpec {
        binary: "qemu-system-x86_64".into(),
        accel: accel.clone(),
        vcpus,
        memory_mib: 1024,
        kernel: vmlinux.to_owned(),
        initrd: Some(initrd.to_owned()),
        // What banger's boots use, minus the root disk: the same kernel settings.
        cmdline: match (accel.is_tcg(), accel::host_tsc_khz()) {
            (true, Some(khz)) => format!("console=ttyS0 panic=-1 quiet tsc_early_khz={khz}"),
            _ => "console=ttyS0 panic=-1 quiet".to_owned(),
        },
        disks: Vec::new(),
        net: None,
        vhost_vsock: None,
        agent_serial: None,
        serial_log: log.clone(),
        qmp_socket: dir.join("baseline-qmp.sock"),
        incoming: None,
        stderr_log: None,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let started = Instant::now();
        let qemu = banger::vm::qemu::QemuProcess::spawn(&spec)
            .await
            .expect("start QEMU");
        let deadline = started + Duration::from_secs(120);
        let ready = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("BASELINE-READY") {
                break started.elapsed();
            }
            assert!(Instant::now() < deadline, "baseline never printed:\n{text}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        qemu.stop(Duration::from_secs(2)).await.expect("stop QEMU");
        let _ = std::fs::remove_file(&spec.qmp_socket);
        ready
    })
}

fn smoke(spec: &BootSpec) -> SmokeReport {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(smoke_test(spec, Instant::now() + Duration::from_secs(180)))
        .unwrap_or_else(|error| panic!("{}", banger::error::error_chain(&error)))
}

fn main() -> ExitCode {
    if std::env::args().any(|arg| arg == "--list") {
        return ExitCode::SUCCESS;
    }
    let busybox = Path::new("/bin/busybox");
    let Some(vsock_daemon) = banger::vm::vsock::find_binary() else {
        eprintln!("vhost-device-vsock is not installed: cargo install --locked vhost-device-vsock");
        return ExitCode::FAILURE;
    };
    if !busybox.exists() {
        eprintln!("/bin/busybox is missing: apt-get install busybox-static");
        return ExitCode::FAILURE;
    }
    let home = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-boot-home");
    std::fs::create_dir_all(&home).unwrap();
    eprintln!(
        "building (or reusing) the default kernel and images in {}",
        home.display()
    );
    let kernel = json_record(
        &banger(&home, &["--json", "kernel", "pull", "debian-cloud-amd64"]),
        "kernel",
    );
    banger(&home, &["image", "pull", "debian-bookworm"]);
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("busybox.tar");
    std::fs::write(&tar, busybox_tar(busybox)).unwrap();
    banger(
        &home,
        &[
            "image",
            "import-tar",
            tar.to_str().unwrap(),
            "--name",
            "bench-busybox",
        ],
    );
    let debian = json_record(
        &banger(&home, &["--json", "image", "show", "debian-bookworm"]),
        "image",
    );
    let small = json_record(
        &banger(&home, &["--json", "image", "show", "bench-busybox"]),
        "image",
    );
    let file = |record: &serde_json::Value, name: &str| {
        let path = work.path().join(name);
        materialize(
            &home,
            record["integrity"].as_str().unwrap(),
            record["bytes"].as_u64().unwrap(),
            &path,
        );
        path
    };
    let vmlinux = file(&kernel["vmlinux"], "vmlinux");
    let initrd = file(&kernel["initrd"], "initrd");
    let image_file = |record: &serde_json::Value, name: &str| {
        let path = work.path().join(name);
        materialize(
            &home,
            record["rootfs"].as_str().unwrap(),
            record["bytes"].as_u64().unwrap(),
            &path,
        );
        path
    };
    let debian_rootfs = image_file(&debian, "debian.ext4");
    let busybox_rootfs = image_file(&small, "busybox.ext4");
    let baseline_initrd = work.path().join("baseline.cpio");
    baseline_initramfs(busybox, &baseline_initrd);

    let accel = accel::choose(&HostFacts::probe()).expect("accelerator");
    println!(
        "boot benchmark: kernel {} under QEMU microvm, {accel}; median of {RUNS} runs",
        kernel["release"].as_str().unwrap_or("?")
    );
    let vcpus = banger::vm::shape::VmShape::resolve(
        &banger::vm::shape::ShapeRequest::default(),
        &banger::config::VmDefaults::default(),
        &banger::vm::shape::HostResources::probe(),
    )
    .vcpus;
    println!("  every boot: {vcpus} vCPUs, 1024 MiB");
    let spec = |rootfs: &Path, transport: AgentTransport| BootSpec {
        qemu_binary: "qemu-system-x86_64".into(),
        accel: accel.clone(),
        vcpus,
        memory_mib: 1024,
        kernel: vmlinux.clone(),
        initrd: Some(initrd.clone()),
        rootfs: rootfs.to_owned(),
        transport,
        vsock_daemon: Some(vsock_daemon.clone()),
        extra_cmdline: Vec::new(),
        writable: banger::vm::boot::WritableLayer::Memory,
        forwards: Vec::new(),
        network: false,
        tap: None,
        dir: work.path().to_owned(),
        serial_log: work.path().join("console.log"),
    };

    let baseline = median(
        (0..RUNS)
            .map(|_| baseline_boot(&accel, vcpus, &vmlinux, &baseline_initrd, work.path()))
            .collect(),
    );
    println!(
        "  baseline: plain QEMU boot to an /init that prints   {}",
        secs(baseline)
    );

    let mut met = true;
    for (label, rootfs, transport, ready_target) in [
        (
            "Debian + systemd, vsock",
            &debian_rootfs,
            AgentTransport::Vsock,
            Some(Duration::from_secs(10)),
        ),
        (
            "busybox only (agent is PID 1), vsock",
            &busybox_rootfs,
            AgentTransport::Vsock,
            None,
        ),
        (
            "busybox only (agent is PID 1), virtio-serial",
            &busybox_rootfs,
            AgentTransport::Serial,
            None,
        ),
    ] {
        let reports: Vec<SmokeReport> =
            (0..RUNS).map(|_| smoke(&spec(rootfs, transport))).collect();
        let ready = median(reports.iter().map(|report| report.agent_ready).collect());
        let first = median(reports.iter().map(|report| report.first_command).collect());
        let round_trip = median(reports.iter().map(|report| report.round_trip).collect());
        let ratio = ready.as_secs_f64() / baseline.as_secs_f64();
        println!("  {label}:");
        print!(
            "    agent ready     {:>9}  ({ratio:.2}× baseline",
            secs(ready)
        );
        match ready_target {
            Some(target) => {
                let ok = ready <= target;
                met &= ok;
                println!(
                    ", target ≤ {}: {})",
                    secs(target),
                    if ok { "met" } else { "MISSED" }
                );
            }
            None => println!(")"),
        }
        if ready_target.is_some() {
            let ok = ratio <= 2.5;
            met &= ok;
            println!(
                "    agent ready / baseline {ratio:.2}× (target ≤ 2.50×: {})",
                if ok { "met" } else { "MISSED" }
            );
        }
        println!(
            "    first command   {:>9}  ({:.2}× baseline)",
            secs(first),
            first.as_secs_f64() / baseline.as_secs_f64()
        );
        println!(
            "    round trip      {:>9}  (median of {} `true`s right after the first command, \
             while the guest may still be starting services)",
            ms(round_trip),
            banger::vm::boot::SMOKE_ROUND_TRIPS,
        );
        let settled: Vec<Duration> = reports
            .iter()
            .filter_map(|report| report.round_trip_settled)
            .collect();
        if settled.len() == reports.len() {
            let settled = median(settled);
            let ok = settled <= Duration::from_millis(100);
            met &= ok;
            println!(
                "    settled         {:>9}  (the same once the boot is over, as systemd says \
                 where it runs, target ≤ 100 ms: {})",
                ms(settled),
                if ok { "met" } else { "MISSED" }
            );
        } else {
            met = false;
            println!("    settled         (the guest could not settle: no figure, MISSED)");
        }
    }
    if met {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
