//! `banger image pull` against Debian's real `docker-registry` on loopback, against baselines
//! from the same run:
//! 1. **A cold pull of a real root filesystem**: the Debian tar of the ext4 bench (built once
//!    with mmdebstrap, cached under `target/bench/`) gzipped as one layer and pushed. Each run
//!    pulls it into a fresh HOME (resolve, download and verify, write the ext4, store it).
//!    Baselines: `gzip -dc LAYER > /dev/null` (the serial part no pull can avoid; target: the
//!    pull ≤ 1.3× it) and the reference pipeline on the same layer (`tar -xpf` of the gzip,
//!    `mkfs.ext4 -d`, a `debugfs` ownership pass; target: the pull ≥ 4× faster). Also the
//!    pulls' peak RSS (the banger process's own, from `wait4` in a small helper process;
//!    target ≤ 256 MiB) and where a
//!    pull's time goes (its steps' durations). Medians of 3, the three kinds of run
//!    alternating.
//! 2. **A re-pull with everything cached** of a small three-layer image (target ≤ 200 ms and no
//!    step run), against starting the binary at all (`banger --version`) and the one registry
//!    round trip a re-pull must make (resolving the tag, by hand with a raw HTTP request).
//!
//! Run: `cargo bench --bench pull` (or `scripts/bench-images`); `--no-rootfs` skips part 1.
//! With `BANGER_BENCH_BASELINE_BINARY=PATH` (another build of banger, say the previous
//! commit's), part 1 also pulls with it each run and prints this build's time against it.

// The integration tests' registry harness, shared rather than copied (both files allow dead
// code themselves).
#[path = "../tests/it/support.rs"]
mod support;

#[path = "../tests/it/registry.rs"]
mod registry;

#[allow(dead_code)] // the helpers are shared by several benches
mod common;

use common::rootfs as rootfs_input;

use std::io::{Read, Write};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use registry::{Pusher, RealRegistry, push_image};

const RUNS: usize = 10;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// `banger ARGS` in `home`: its wall time, its output, and its own peak RSS in KiB.
fn banger(home: &std::path::Path, args: &[&str]) -> (Duration, std::process::Output, u64) {
    banger_from(
        std::path::Path::new(env!("CARGO_BIN_EXE_banger")),
        home,
        args,
    )
}

/// The bench re-runs itself with this flag to spawn banger from a small process: Linux
/// carries the spawning process's memory high-water mark into the child's `ru_maxrss`
/// across `exec`, so a child spawned by the bench itself (which held a 76 MB layer) would
/// report the bench's peak, not its own.
const MEASURE_FLAG: &str = "--measure-rss-of";
const RSS_MARKER: &str = "BANGER_BENCH_PEAK_KIB=";

/// Helper mode: runs `args[0]` with `args[1..]`, stdio inherited, and reports its peak RSS
/// (`wait4`) on stderr's last line; exits with its code.
// The child is reaped by `wait4`, which std does not know of.
#[allow(clippy::zombie_processes)]
fn measure_child(args: &[String]) -> ExitCode {
    let child = Command::new(&args[0])
        .args(&args[1..])
        .spawn()
        .expect("run the measured command");
    let mut status = 0;
    // SAFETY: wait4 reaps our own child and writes into the zeroed struct it is given.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::wait4(child.id() as i32, &mut status, 0, &mut usage);
        usage
    };
    eprintln!("{RSS_MARKER}{}", usage.ru_maxrss);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1
    };
    ExitCode::from(code as u8)
}

/// [`banger`] with another build of it (`BANGER_BENCH_BASELINE_BINARY`).
fn banger_from(
    binary: &std::path::Path,
    home: &std::path::Path,
    args: &[&str],
) -> (Duration, std::process::Output, u64) {
    let started = Instant::now();
    let output = Command::new(std::env::current_exe().expect("the bench's own path"))
        .arg(MEASURE_FLAG)
        .arg(binary)
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CACHE_HOME")
        .env_remove("XDG_STATE_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("BANGER_CACHE_DIR")
        .env_remove("BANGER_STATE_DIR")
        .output()
        .expect("run banger");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let peak_kib = stderr
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(RSS_MARKER))
        .and_then(|kib| kib.trim().parse().ok())
        .unwrap_or(0);
    (elapsed, output, peak_kib)
}

/// One raw `GET /v2/REPO/manifests/TAG`, the round trip a cached re-pull cannot avoid.
fn resolve_by_hand(address: &str, path: &str) -> Duration {
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response");
    assert!(response.starts_with(b"HTTP/1.1 200"), "registry said no");
    started.elapsed()
}

const ROOTFS_RUNS: usize = 3;

/// Part 1: a cold pull of a Debian root filesystem as one gzip layer.
fn rootfs_pull(registry: &RealRegistry) -> Result<(), String> {
    let bench_dir = rootfs_input::target_dir().join("bench");
    std::fs::create_dir_all(&bench_dir).map_err(|e| e.to_string())?;
    let tar = rootfs_input::rootfs_tar(&bench_dir)?;
    let layer = tar.with_extension("tar.gz");
    if !layer.exists() {
        eprintln!("compressing {} with gzip -6 (once)…", tar.display());
        let partial = layer.with_extension("partial");
        let out = std::fs::File::create(&partial).map_err(|e| e.to_string())?;
        let status = Command::new("gzip")
            .args(["-6", "-n", "-c"])
            .arg(&tar)
            .stdout(out)
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("gzip failed: {status}"));
        }
        std::fs::rename(&partial, &layer).map_err(|e| e.to_string())?;
    }
    let blob = std::fs::read(&layer).map_err(|e| e.to_string())?;
    let tar_bytes = std::fs::metadata(&tar).map_err(|e| e.to_string())?.len();
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let pusher = Pusher::new(&registry.address, None).await;
            registry::push_layers(
                &pusher,
                "bench/debian",
                Some("v1"),
                "amd64",
                false,
                vec![(
                    banger::oci::media_types::OCI_LAYER_GZIP.to_owned(),
                    blob.clone(),
                    Vec::new(),
                )],
            )
            .await;
        });
    drop(blob);
    let reference = format!("{}/bench/debian:v1", registry.address);
    let work = bench_dir.join("pull-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let commands = work.join("debugfs-commands.txt");
    rootfs_input::debugfs_commands(&tar, &commands)?;

    let (mut pulls, mut inflates, mut references) = (Vec::new(), Vec::new(), Vec::new());
    let mut image_bytes = 0;
    let mut breakdown = String::new();
    let mut peak_pull_kib = 0;
    let baseline = std::env::var_os("BANGER_BENCH_BASELINE_BINARY").map(std::path::PathBuf::from);
    let mut baseline_pulls = Vec::new();
    for run in 0..ROOTFS_RUNS {
        rootfs_input::run(&mut Command::new("sync"))?;
        let home = tempfile::tempdir_in(&work).map_err(|e| e.to_string())?;
        let (elapsed, output, peak_kib) =
            banger(home.path(), &["--json", "image", "pull", &reference]);
        peak_pull_kib = peak_pull_kib.max(peak_kib);
        if !output.status.success() {
            return Err(format!("the pull failed: {output:?}"));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        image_bytes = stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|record| record["type"] == "image")
            .and_then(|record| record["data"]["bytes"].as_u64())
            .ok_or("the pull printed no image record")?;
        pulls.push(elapsed);
        breakdown = stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|record| record["type"] == "step_finished")
            .map(|record| {
                format!(
                    "{} {:.2} s",
                    record["data"]["kind"].as_str().unwrap_or("?"),
                    record["data"]["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        drop(home);

        if let Some(baseline) = &baseline {
            rootfs_input::run(&mut Command::new("sync"))?;
            let home = tempfile::tempdir_in(&work).map_err(|e| e.to_string())?;
            let (elapsed, output, _) =
                banger_from(baseline, home.path(), &["image", "pull", &reference]);
            if !output.status.success() {
                return Err(format!("the baseline's pull failed: {output:?}"));
            }
            baseline_pulls.push(elapsed);
        }

        rootfs_input::run(&mut Command::new("sync"))?;
        let started = Instant::now();
        let status = Command::new("gzip")
            .arg("-dc")
            .arg(&layer)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("gzip -dc failed: {status}"));
        }
        inflates.push(started.elapsed());

        rootfs_input::run(&mut Command::new("sync"))?;
        references.push(rootfs_input::run_reference(
            &layer,
            &work,
            run,
            image_bytes,
            &commands,
        )?);
        let _ = std::fs::remove_dir_all(work.join(format!("reference-root-{run}")));
        let _ = std::fs::remove_file(work.join(format!("reference-{run}.img")));
    }
    let peak_mib = peak_pull_kib as f64 / 1024.0;
    let _ = std::fs::remove_dir_all(&work);
    let (pull, inflate, reference_time) = (median(pulls), median(inflates), median(references));
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "cold pull of a Debian root filesystem as one gzip layer ({:.0} MB gzip, {:.0} MB tar, \
         a {:.0} MiB image), median of {ROOTFS_RUNS}:",
        layer.metadata().map(|m| m.len()).unwrap_or(0) as f64 / 1e6,
        tar_bytes as f64 / 1e6,
        image_bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "  banger image pull {:.2} s ; gzip -dc alone {:.2} s ; pull / gzip -dc = {:.2}× \
         (target ≤ 1.3×: {})",
        pull.as_secs_f64(),
        inflate.as_secs_f64(),
        ms(pull) / ms(inflate),
        verdict(ms(pull) / ms(inflate) <= 1.3)
    );
    println!("  where a pull's time goes (its steps, last run): {breakdown}");
    if let Some(baseline) = &baseline {
        let other = median(baseline_pulls);
        println!(
            "  the baseline build {} pulled it in {:.2} s ; this build / baseline = {:.2}×",
            baseline.display(),
            other.as_secs_f64(),
            ms(pull) / ms(other)
        );
    }
    println!(
        "  reference pipeline (tar -xpf, mkfs.ext4 -d, debugfs) {:.2} s ; reference / pull = \
         {:.2}× (target ≥ 4×: {})",
        reference_time.as_secs_f64(),
        ms(reference_time) / ms(pull),
        verdict(ms(reference_time) / ms(pull) >= 4.0)
    );
    println!(
        "  peak RSS of a pull (the banger process) {peak_mib:.0} MiB (target ≤ 256 MiB: {})",
        verdict(peak_mib <= 256.0)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(MEASURE_FLAG) {
        return measure_child(&args[2..]);
    }
    if args.iter().any(|arg| arg == "--list") {
        println!("pull: benchmark");
        return ExitCode::SUCCESS;
    }
    let Some(registry) = RealRegistry::start(None) else {
        eprintln!("pull bench: docker-registry is not installed (apt-get install docker-registry)");
        return ExitCode::FAILURE;
    };
    if !std::env::args().any(|arg| arg == "--no-rootfs")
        && let Err(error) = rootfs_pull(&registry)
    {
        eprintln!("pull bench: {error}");
        return ExitCode::FAILURE;
    }
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let pusher = Pusher::new(&registry.address, None).await;
            push_image(&pusher, "bench/image", Some("v1"), "amd64", false).await;
        });
    let reference = format!("{}/bench/image:v1", registry.address);
    let home = tempfile::tempdir().expect("temp home");

    let (cold, output, _) = banger(home.path(), &["image", "pull", &reference]);
    assert!(output.status.success(), "{output:?}");

    let mut cached = Vec::new();
    for _ in 0..RUNS {
        let (elapsed, output, _) = banger(home.path(), &["--json", "image", "pull", &reference]);
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !stdout.contains("\"step_started\""),
            "a cached pull ran a step:\n{stdout}"
        );
        cached.push(elapsed);
    }
    let startup = median(
        (0..RUNS)
            .map(|_| banger(home.path(), &["--version"]).0)
            .collect(),
    );
    let round_trip = median(
        (0..RUNS)
            .map(|_| resolve_by_hand(&registry.address, "/v2/bench/image/manifests/v1"))
            .collect(),
    );
    let cached = median(cached);
    println!("banger image pull, 3 layers (gzip, zstd, plain) from a loopback registry");
    println!("cold pull:                    {:.0} ms", ms(cold));
    println!(
        "cached re-pull (median of {RUNS}): {:.0} ms (target ≤ 200 ms: {}); no step ran",
        ms(cached),
        if ms(cached) <= 200.0 { "ok" } else { "MISSED" }
    );
    println!(
        "  = {:.1}× starting banger at all ({:.1} ms), {:.0}× one raw manifest round trip ({:.2} ms)",
        ms(cached) / ms(startup),
        ms(startup),
        ms(cached) / ms(round_trip),
        ms(round_trip)
    );
    ExitCode::SUCCESS
}
