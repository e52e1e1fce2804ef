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
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use std::os::unix::ffi::OsStrExt;

use banger::ext4::{Ext4Summary, Sizing};
use banger::rootfs::layers::{Layer, RootfsOptions, build_rootfs};

type BenchResult<T> = Result<T, String>;

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
fn run(command: &mut Command) -> BenchResult<String> {
    let argv = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| format!("cannot run {argv}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{argv} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The old tool's ownership pass: `sif` uid, gid and mode for every entry of the tar.
fn debugfs_commands(tar: &Path, out: &Path) -> BenchResult<usize> {
    let file = File::open(tar).map_err(|e| format!("open {}: {e}", tar.display()))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let mut commands = BufWriter::new(File::create(out).map_err(|e| e.to_string())?);
    let mut count = 0;
    let entries = archive.entries().map_err(|e| e.to_string())?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let header = entry.header();
        let type_bits = match header.entry_type() {
            tar::EntryType::Directory => 0o040000,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Link => 0o100000,
            tar::EntryType::Symlink => 0o120000,
            tar::EntryType::Char => 0o020000,
            tar::EntryType::Block => 0o060000,
            tar::EntryType::Fifo => 0o010000,
            _ => continue,
        };
        let raw = entry.path_bytes();
        let name = std::ffi::OsStr::from_bytes(&raw);
        let Ok(Some(relative)) = banger::rootfs::path::normalize_entry(Path::new(name)) else {
            continue;
        };
        let path = format!("/{}", relative.display());
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        let mode = type_bits | header.mode().unwrap_or(0) & 0o7777;
        writeln!(
            commands,
            "sif \"{path}\" uid {uid}\nsif \"{path}\" gid {gid}\nsif \"{path}\" mode 0{mode:o}"
        )
        .map_err(|e| e.to_string())?;
        count += 1;
    }
    commands.flush().map_err(|e| e.to_string())?;
    Ok(count)
}

fn run_reference(
    tar: &Path,
    work: &Path,
    run_index: usize,
    image_bytes: u64,
    commands: &Path,
) -> BenchResult<Duration> {
    let root = work.join(format!("reference-root-{run_index}"));
    let image = work.join(format!("reference-{run_index}.img"));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let start = Instant::now();
    run(Command::new("tar")
        .arg("-xpf")
        .arg(tar)
        .arg("-C")
        .arg(&root))?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&root)
        .arg(&image)
        .arg(format!("{}k", image_bytes / 1024)))?;
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(commands)
        .arg(&image))?;
    Ok(start.elapsed())
}

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
// Inputs

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn rootfs_tar(bench_dir: &Path) -> BenchResult<PathBuf> {
    match std::env::var_os("BANGER_BENCH_ROOTFS_TAR") {
        Some(path) if path == "synthetic" => return synthetic_tar(bench_dir),
        Some(path) => return Ok(PathBuf::from(path)),
        None => {}
    }
    let debian = bench_dir.join("debian-bookworm-minbase.tar");
    if debian.exists() {
        return Ok(debian);
    }
    let partial = bench_dir.join("debian-bookworm-minbase.partial.tar");
    eprintln!(
        "building {} with mmdebstrap (about a minute, once)…",
        debian.display()
    );
    let built = run(Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--include=systemd-sysv,openssh-server",
            "bookworm",
        ])
        .arg(&partial));
    match built {
        Ok(_) => {
            std::fs::rename(&partial, &debian).map_err(|e| e.to_string())?;
            Ok(debian)
        }
        Err(error) => {
            eprintln!("mmdebstrap failed, using a synthetic tar instead: {error}");
            let _ = std::fs::remove_file(&partial);
            synthetic_tar(bench_dir)
        }
    }
}

/// About 300 MB in about 14,000 entries: directories, many small files, a few large ones,
/// symlinks and hard links, with incompressible content.
fn synthetic_tar(bench_dir: &Path) -> BenchResult<PathBuf> {
    let path = bench_dir.join("synthetic-rootfs.tar");
    if path.exists() {
        return Ok(path);
    }
    let partial = bench_dir.join("synthetic-rootfs.partial.tar");
    let file = File::create(&partial).map_err(|e| e.to_string())?;
    let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header
    };
    let fail = |e: std::io::Error| e.to_string();
    for d in 0..1200 {
        let dir = format!("usr/share/pkg{:03}/d{d}/", d / 10);
        if d % 10 == 0 {
            let parent = format!("usr/share/pkg{:03}/", d / 10);
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            if d == 0 {
                for top in ["usr/", "usr/share/"] {
                    builder.append_data(&mut h, top, &[][..]).map_err(fail)?;
                }
            }
            builder.append_data(&mut h, parent, &[][..]).map_err(fail)?;
        }
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        builder.append_data(&mut h, &dir, &[][..]).map_err(fail)?;
        for f in 0..9 {
            let size = if (d * 9 + f) % 100 == 0 {
                2_000_000
            } else {
                1000 + (d * 37 + f * 911) % 12_000
            };
            let data = noise(size);
            let mut h = header(tar::EntryType::Regular, 0o644, size as u64);
            builder
                .append_data(&mut h, format!("{dir}file{f}"), &data[..])
                .map_err(fail)?;
        }
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        builder
            .append_link(&mut h, format!("{dir}link"), "file0")
            .map_err(fail)?;
        if d % 4 == 0 {
            let mut h = header(tar::EntryType::Link, 0o644, 0);
            builder
                .append_link(&mut h, format!("{dir}hard"), format!("{dir}file1"))
                .map_err(fail)?;
        }
    }
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(fail)?;
    std::fs::rename(&partial, &path).map_err(|e| e.to_string())?;
    Ok(path)
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
