//! tar → ext4: banger's writer against the reference pipeline and the disk's write floor.
//!
//! `cargo bench --bench ext4` takes a root file system tar (`BANGER_BENCH_ROOTFS_TAR`, a path
//! or `synthetic`; else a
//! Debian bookworm minbase + systemd-sysv + openssh-server tar built once with mmdebstrap and
//! cached under `target/bench/`, else a synthetic ~300 MB / ~14k-entry tar) and prints, from
//! one run:
//! - the writer's tar → ext4 time, fsync included, run in a child process whose peak RSS
//!   (`VmHWM`) is reported; also without fsync, to show where the time goes;
//! - the reference pipeline's time: `tar -xpf` into a fresh directory, `mkfs.ext4 -F -b 4096
//!   -d`, then a `debugfs -w` pass setting uid, gid and mode of every entry (the old tool);
//! - a write floor: as many bytes as the image allocates, written sequentially in 8 MiB
//!   chunks to a file on the same file system, then fsynced;
//! - the ratios, and whether each target holds (≥ 3× faster than the reference, within 2× of
//!   the floor, peak RSS ≤ 256 MiB). Medians of 5 runs; the host is shared and noisy.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use banger::ext4::{Ext4Summary, Sizing};
use banger::rootfs::layers::{Layer, RootfsOptions, build_rootfs};

#[allow(dead_code)] // the helpers are shared by several benches
mod common;

use common::rootfs::{BenchResult, debugfs_commands, rootfs_tar, run, run_reference, target_dir};

const RUNS: usize = 5;
const CHILD_FLAG: &str = "--convert";
const RESULT_MARKER: &str = "BANGER_EXT4_BENCH";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let outcome = if args.get(1).map(String::as_str) == Some(CHILD_FLAG) {
        convert_child(&args[2..])
    } else {
        bench()
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ext4 bench: {error}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// The writer: tar entries → Ext4Builder calls

/// Converts `tar` to `image` through banger's own `rootfs.build` path (decompression sniffing,
/// path checks, whiteouts, the guest assets' layer): the child process's whole job.
fn convert(tar: &Path, image: &Path, sync: bool) -> BenchResult<Ext4Summary> {
    let agent = image.with_extension("agent.tar");
    banger::rootfs::layer_tar::write_agent_layer(&agent).map_err(|e| e.to_string())?;
    let layers = [
        Layer::tar(tar.display().to_string(), tar),
        Layer::tar("agent", &agent),
    ];
    let options = RootfsOptions {
        sizing: Sizing::Auto {
            headroom_percent: 20,
            min_bytes: 0,
        },
        strip_identity: true,
        seed: b"banger ext4 bench".to_vec(),
        cancel: None,
        sync,
    };
    build_rootfs(&layers, image, &options, &|_, _| {}).map_err(|e| banger::error::error_chain(&e))
}

/// Child mode: `--convert TAR IMAGE sync|no-sync`; prints elapsed time and peak RSS.
fn convert_child(args: &[String]) -> BenchResult<()> {
    let [tar, image, sync] = args else {
        return Err(format!("usage: {CHILD_FLAG} TAR IMAGE sync|no-sync"));
    };
    let start = Instant::now();
    let summary = convert(Path::new(tar), Path::new(image), sync == "sync")?;
    let elapsed = start.elapsed();
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let peak_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .ok_or("no VmHWM in /proc/self/status")?;
    println!(
        "{RESULT_MARKER} elapsed_ns={} peak_kib={peak_kib} image_bytes={} data_blocks={}",
        elapsed.as_nanos(),
        summary.image_bytes,
        summary.data_blocks
    );
    Ok(())
}

struct ChildResult {
    elapsed: Duration,
    peak_kib: u64,
    image_bytes: u64,
}

fn run_writer(tar: &Path, image: &Path, sync: bool) -> BenchResult<ChildResult> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut command = Command::new(exe);
    command
        .arg(CHILD_FLAG)
        .arg(tar)
        .arg(image)
        .arg(if sync { "sync" } else { "no-sync" });
    let stdout = run(&mut command)?;
    let line = stdout
        .lines()
        .find(|l| l.starts_with(RESULT_MARKER))
        .ok_or_else(|| format!("no result from the writer:\n{stdout}"))?;
    let value = |key: &str| -> BenchResult<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {key} in {line:?}"))
    };
    Ok(ChildResult {
        elapsed: Duration::from_nanos(value("elapsed_ns")?),
        peak_kib: value("peak_kib")?,
        image_bytes: value("image_bytes")?,
    })
}

// ---------------------------------------------------------------------------------------
// The reference pipeline and the floor

/// Runs a command; errors carry argv, status and stderr.
/// Writes `bytes` to a new file in 8 MiB chunks and fsyncs. The file stays until the end of
/// the bench (freeing it could slow the next measurement).
fn write_floor(work: &Path, run_index: usize, bytes: u64) -> BenchResult<Duration> {
    let path = work.join(format!("floor-{run_index}.bin"));
    let chunk = vec![0x5Au8; 8 << 20];
    let start = Instant::now();
    let mut file = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
        left -= n as u64;
    }
    file.sync_all().map_err(|e| e.to_string())?;
    Ok(start.elapsed())
}

fn read_through(path: &Path) -> BenchResult<(u64, Duration)> {
    let start = Instant::now();
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buffer = vec![0u8; 8 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buffer).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((total, start.elapsed()))
}

// ---------------------------------------------------------------------------------------

/// Writes back every dirty page on the host, so a run does not pay for the previous one.
fn flush_host() -> BenchResult<()> {
    run(&mut Command::new("sync")).map(drop)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn bench() -> BenchResult<()> {
    let bench_dir = target_dir().join("bench");
    let work = bench_dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let tar = rootfs_tar(&bench_dir)?;
    let (tar_bytes, tar_read) = read_through(&tar)?; // also warms the page cache
    let commands = work.join("debugfs-commands.txt");
    let entries = debugfs_commands(&tar, &commands)?;
    println!(
        "input: {} ({:.0} MB, {entries} entries); cached read {} ({:.1} GB/s)",
        tar.display(),
        tar_bytes as f64 / 1e6,
        secs(tar_read),
        tar_bytes as f64 / tar_read.as_secs_f64() / 1e9
    );

    // Every run writes a new file, as a real build does: truncating a previous image would
    // time the host freeing its page cache and blocks, not the writer. Writer and floor runs
    // alternate, each after a `sync`, so each pair sees the same host conditions; ratios are
    // taken per pair.
    let mut synced = Vec::new();
    let mut unsynced = Vec::new();
    let mut floors = Vec::new();
    let mut floor_ratios = Vec::new();
    let mut peak_kib = 0;
    let mut image_bytes = 0;
    let mut allocated = 0;
    for run_index in 0..RUNS {
        flush_host()?;
        let image = work.join(format!("writer-{run_index}.img"));
        let result = run_writer(&tar, &image, true)?;
        synced.push(result.elapsed);
        peak_kib = peak_kib.max(result.peak_kib);
        image_bytes = result.image_bytes;
        allocated = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&image)
                .map_err(|e| e.to_string())?
                .blocks()
                * 512
        };
        flush_host()?;
        let floor = write_floor(&work, run_index, allocated)?;
        floors.push(floor);
        floor_ratios.push(result.elapsed.as_secs_f64() / floor.as_secs_f64());
        flush_host()?;
        let result = run_writer(&tar, &work.join(format!("unsynced-{run_index}.img")), false)?;
        unsynced.push(result.elapsed);
        peak_kib = peak_kib.max(result.peak_kib);
    }
    let writer = median(synced);
    let writer_unsynced = median(unsynced);
    let floor = median(floors);

    let mut reference = Vec::new();
    for run_index in 0..RUNS {
        flush_host()?;
        reference.push(run_reference(
            &tar,
            &work,
            run_index,
            image_bytes,
            &commands,
        )?);
    }
    let reference = median(reference);

    let speedup = reference.as_secs_f64() / writer.as_secs_f64();
    floor_ratios.sort_by(f64::total_cmp);
    let to_floor = floor_ratios[floor_ratios.len() / 2];
    let peak_mib = peak_kib as f64 / 1024.0;
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    println!(
        "image: {:.0} MB, {:.0} MB allocated",
        image_bytes as f64 / 1e6,
        allocated as f64 / 1e6
    );
    println!("writer, tar → ext4 incl. fsync  {}", secs(writer));
    println!("writer, without fsync           {}", secs(writer_unsynced));
    println!(
        "reference (tar -xpf + mkfs.ext4 -d + debugfs pass) {}",
        secs(reference)
    );
    println!(
        "write floor ({:.0} MB + fsync)  {}",
        allocated as f64 / 1e6,
        secs(floor)
    );
    println!(
        "speed-up over reference: {speedup:.1}×  (target ≥ 3×: {})",
        verdict(speedup >= 3.0)
    );
    let unsynced_speedup = reference.as_secs_f64() / writer_unsynced.as_secs_f64();
    println!("  without fsync, as the reference runs: {unsynced_speedup:.1}×");
    println!(
        "writer / floor:          {to_floor:.2}×  (median of per-pair ratios; target ≤ 2×: {})",
        verdict(to_floor <= 2.0)
    );
    println!(
        "writer peak RSS:         {peak_mib:.0} MiB (target ≤ 256 MiB: {})",
        verdict(peak_mib <= 256.0)
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
