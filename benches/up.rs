//! `banger up`, through the real binary and a daemon of the bench's own, against baselines
//! measured in the same run.
//!
//! The project: the default image (no provisioning), `[vm] vcpu = 1, memory = "1G"`, and a
//! workspace of 1,000 files, 50 MiB in all (incompressible bytes). Its VM is brought up once
//! (not timed), then:
//!
//! 1. **A second `up --no-run` of the running, unchanged sandbox**: wall time, median of 5.
//!    Target ≤ 300 ms. Baseline: `banger graph` of the same project (load, plan, key; no
//!    engine, no daemon), printed as a ratio.
//! 2. **The first import** (the guest's copy and its record removed through ssh first, so
//!    `up` imports everything again): the `vm/workspace` time and bytes from the `up` record,
//!    median of 3. Baseline, alternating with it: `tar c . | banger vm ssh NAME -- tar x` of
//!    the same tree into a fresh directory, wall time. Target: import / ssh-tar ≤ 1×.
//! 3. **A re-import after one edited file** (a different 50 KiB file each round): time and
//!    bytes, median of 5, against the first import's. Target ≤ 10 % of both.
//!
//! Everything happens in a HOME kept under `target/bench-up-home` (seeded on the first run
//! from another bench's store when there is one), with the project in the temp directory,
//! outside any git work tree; the VM and the project are deleted and the daemon stopped at the
//! end, also when the bench fails. Needs QEMU, vhost-device-vsock, ssh and mmdebstrap (to
//! build the image and kernel when no store can be seeded). Run: `cargo bench --bench up`
//! (or `scripts/bench-up`).

// Not every helper is used here.
#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, json_record, median, ms, seed_store};

const NAME: &str = "bench-up";
const FILES: usize = 1000;
const FILE_BYTES: usize = 50 * 1024 * 1024 / FILES;
const UNCHANGED_RUNS: usize = 5;
const IMPORT_RUNS: usize = 3;
const EDIT_RUNS: usize = 5;
const UNCHANGED_TARGET: Duration = Duration::from_millis(300);

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn ratio(a: f64, b: f64) -> f64 {
    a / b
}

/// Deletes the bench's VM however the bench ends (before the sandbox stops the daemon).
struct DeleteVm<'a> {
    sandbox: &'a Sandbox,
    dir: PathBuf,
}

impl Drop for DeleteVm<'_> {
    fn drop(&mut self) {
        let _ = self
            .sandbox
            .command(&["down", "--rm"], &self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Incompressible bytes, the same every run (xorshift).
fn file_bytes(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(FILE_BYTES);
    while bytes.len() < FILE_BYTES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(FILE_BYTES);
    bytes
}

/// The project: a Bangerfile and 1,000 files in 10 directories.
fn project(root: &Path) -> PathBuf {
    let dir = root.join(NAME);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Bangerfile"),
        format!(
            "[project]\nname = \"{NAME}\"\n\n[vm]\nvcpu = 1\nmemory = \"1G\"\n\n\
             [workspace]\n\n[up]\nrun = \"true\"\n"
        ),
    )
    .unwrap();
    for index in 0..FILES {
        let sub = dir.join(format!("tree/d{}", index % 10));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            sub.join(format!("f{index:04}.bin")),
            file_bytes(index as u64),
        )
        .unwrap();
    }
    dir
}

/// `up --json --no-run`: its wall time, the import's time and bytes.
fn up(sandbox: &Sandbox, dir: &Path) -> (Duration, Duration, u64) {
    let (wall, output) = sandbox.timed(&["--json", "up", "--no-run"], dir);
    let record = json_record(&String::from_utf8_lossy(&output.stdout), "up");
    let workspace = Duration::from_millis(record["durations"]["workspace_ms"].as_u64().unwrap());
    (wall, workspace, record["workspace_bytes"].as_u64().unwrap())
}

/// `tar c` of the project into `vm ssh NAME -- tar x` in a fresh guest directory.
fn ssh_tar(sandbox: &Sandbox, dir: &Path) -> Duration {
    sandbox.banger(
        &[
            "vm",
            "ssh",
            NAME,
            "--",
            "rm -rf /root/baseline && mkdir /root/baseline",
        ],
        dir,
    );
    let started = Instant::now();
    let mut tar = Command::new("tar")
        .args(["-c", "-f", "-", "."])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tar");
    let status = sandbox
        .command(
            &[
                "vm",
                "ssh",
                NAME,
                "--",
                "tar",
                "-x",
                "-f",
                "-",
                "-C",
                "/root/baseline",
            ],
            dir,
        )
        .stdin(tar.stdout.take().unwrap())
        .status()
        .expect("run banger vm ssh");
    assert!(status.success(), "ssh tar: {status}");
    assert!(tar.wait().unwrap().success());
    started.elapsed()
}

fn main() -> ExitCode {
    if std::env::args().any(|arg| arg == "--list") {
        println!("up: benchmark");
        return ExitCode::SUCCESS;
    }
    let home = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-up-home");
    std::fs::create_dir_all(&home).unwrap();
    seed_store(
        &home,
        &["bench-provision-home", "bench-boot-home", "bench-vm-home"],
    );
    let runtime = std::env::temp_dir().join(format!("banger-bench-up-{}", std::process::id()));
    std::fs::create_dir_all(&runtime).unwrap();
    let sandbox = Sandbox {
        home: home.clone(),
        runtime,
    };
    // Outside any git work tree (the bench HOME is inside banger's own, where `target/` is
    // ignored and so would be the whole workspace): every file is imported.
    let projects = std::env::temp_dir().join("banger-bench-up-projects");
    let dir = project(&projects);
    let _delete = DeleteVm {
        sandbox: &sandbox,
        dir: dir.clone(),
    };

    eprintln!("preparing: the default kernel and image (built unless stored), the VM");
    let (_, _, first_bytes) = up(&sandbox, &dir);
    eprintln!("  up: the first import sent {first_bytes} bytes");
    assert!(
        first_bytes >= (FILES * FILE_BYTES) as u64,
        "the first import sent {first_bytes} bytes, less than the tree's {}",
        FILES * FILE_BYTES
    );

    // 1. An unchanged, running sandbox.
    let mut unchanged = Vec::new();
    let mut graphs = Vec::new();
    for _ in 0..UNCHANGED_RUNS {
        let (wall, _, bytes) = up(&sandbox, &dir);
        assert_eq!(bytes, 0, "an unchanged up imported {bytes} bytes");
        unchanged.push(wall);
        graphs.push(sandbox.timed(&["graph"], &dir).0);
    }
    let (unchanged, graph) = (median(unchanged), median(graphs));
    let unchanged_ok = unchanged <= UNCHANGED_TARGET;
    println!(
        "`up --no-run`, running and unchanged: {} median of {UNCHANGED_RUNS} (target ≤ {}: {}); \
         baseline `banger graph` {} ; up / graph = {:.2}×",
        ms(unchanged),
        ms(UNCHANGED_TARGET),
        verdict(unchanged_ok),
        ms(graph),
        ratio(unchanged.as_secs_f64(), graph.as_secs_f64())
    );

    // 2. The first import against ssh + tar.
    let mut imports = Vec::new();
    let mut import_bytes = 0;
    let mut tars = Vec::new();
    for _ in 0..IMPORT_RUNS {
        sandbox.banger(
            &[
                "vm",
                "ssh",
                NAME,
                "--",
                "rm -rf /root/project /var/lib/banger/workspaces",
            ],
            &dir,
        );
        let (_, import, bytes) = up(&sandbox, &dir);
        imports.push(import);
        import_bytes = bytes;
        tars.push(ssh_tar(&sandbox, &dir));
    }
    let (import, tar) = (median(imports), median(tars));
    let import_ratio = ratio(import.as_secs_f64(), tar.as_secs_f64());
    let import_ok = import_ratio <= 1.0;
    println!(
        "first import of {FILES} files, {:.1} MiB: {} median of {IMPORT_RUNS}; baseline \
         `tar c | banger vm ssh {NAME} -- tar x` {} ; import / ssh-tar = {import_ratio:.2}× \
         (target ≤ 1.00×: {})",
        import_bytes as f64 / f64::from(1 << 20),
        ms(import),
        ms(tar),
        verdict(import_ok)
    );

    // 3. One edited file.
    let mut edits = Vec::new();
    let mut edit_bytes = Vec::new();
    for round in 0..EDIT_RUNS {
        let index = 100 * round + 7;
        std::fs::write(
            dir.join(format!("tree/d{}/f{index:04}.bin", index % 10)),
            file_bytes(1_000_000 + round as u64),
        )
        .unwrap();
        let (_, edit, bytes) = up(&sandbox, &dir);
        edits.push(edit);
        edit_bytes.push(bytes);
    }
    let edit = median(edits);
    let bytes = *edit_bytes.iter().max().unwrap();
    let time_share = ratio(edit.as_secs_f64(), import.as_secs_f64());
    let byte_share = ratio(bytes as f64, import_bytes as f64);
    let edit_ok = time_share <= 0.10 && byte_share <= 0.10;
    println!(
        "re-import after one edited file: {} median of {EDIT_RUNS}, {bytes} bytes at most; \
         against the first import: time {:.1} %, bytes {:.2} % (target ≤ 10 % of both: {})",
        ms(edit),
        time_share * 100.0,
        byte_share * 100.0,
        verdict(edit_ok)
    );
    if unchanged_ok && import_ok && edit_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
