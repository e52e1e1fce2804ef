//! ext4 → tar: banger's reader and exporter against GNU tar reading the same tree from the
//! host file system.
//!
//! `cargo bench --bench ext4_export` puts a directory (`BANGER_BENCH_EXPORT_SOURCE`, default
//! `/usr`) into an image with `mkfs.ext4 -b 4096 -d` (not timed), then prints medians of 3
//! runs of:
//! - `export_tar_to_file` of the whole image into a file beside it (synced, renamed);
//! - `tar --xattrs --numeric-owner -cf` of the source directory into a file on the same
//!   file system, then `sync` of that file (the baseline: the same tree, read by the kernel);
//!
//! - floors: the image file read sequentially (1 MiB reads), and as many bytes as the tar
//!   written sequentially (8 MiB writes) and synced;
//!
//! cold (page cache dropped before each run; needs root, else the runs are warm); then, with
//! the image cached, the export into a file and into `io::sink()` (the reader's own cost).
//! Work files go to `BANGER_BENCH_DIR` (default `target/bench/ext4-export`), removed
//! afterwards.

#[allow(dead_code)] // the helpers are shared by several benches; this one uses two
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use std::io::{Read, Write};

use banger::ext4::{ExportOptions, ExportSummary, Ext4Reader, export_tar, export_tar_to_file};
use common::rootfs::{BenchResult, run};
use common::{median, secs};

const RUNS: usize = 3;

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ext4 export bench: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Drops the page cache (root only); says whether it could.
fn drop_caches() -> bool {
    let _ = run(&mut Command::new("sync"));
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn export_once(image: &Path, out: &Path) -> BenchResult<(Duration, ExportSummary)> {
    let start = Instant::now();
    let summary = export_tar_to_file(image, Path::new(""), out, &ExportOptions::default())
        .map_err(|e| banger::error::error_chain(&e))?;
    let elapsed = start.elapsed();
    std::fs::remove_file(out).map_err(|e| e.to_string())?;
    Ok((elapsed, summary))
}

fn tar_once(source: &Path, out: &Path) -> BenchResult<Duration> {
    let start = Instant::now();
    run(Command::new("tar")
        .args(["--xattrs", "--numeric-owner", "-cf"])
        .arg(out)
        .arg("-C")
        .arg(source)
        .arg("."))?;
    run(Command::new("sync").arg(out))?;
    let elapsed = start.elapsed();
    std::fs::remove_file(out).map_err(|e| e.to_string())?;
    Ok(elapsed)
}

/// Reads `image` start to end in 1 MiB pieces; returns the time.
fn read_floor(image: &Path) -> BenchResult<Duration> {
    let start = Instant::now();
    let mut file = std::fs::File::open(image).map_err(|e| e.to_string())?;
    let mut buffer = vec![0u8; 1 << 20];
    while file.read(&mut buffer).map_err(|e| e.to_string())? > 0 {}
    Ok(start.elapsed())
}

/// Writes `bytes` bytes sequentially in 8 MiB pieces, then fsyncs; returns the time.
fn write_floor(out: &Path, bytes: u64) -> BenchResult<Duration> {
    let chunk = vec![0x5Au8; 8 << 20];
    let start = Instant::now();
    let mut file = std::fs::File::create(out).map_err(|e| e.to_string())?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
        left -= n as u64;
    }
    file.sync_all().map_err(|e| e.to_string())?;
    let elapsed = start.elapsed();
    std::fs::remove_file(out).map_err(|e| e.to_string())?;
    Ok(elapsed)
}

fn bench() -> BenchResult<()> {
    let source = PathBuf::from(
        std::env::var_os("BANGER_BENCH_EXPORT_SOURCE").unwrap_or_else(|| "/usr".into()),
    );
    let work = std::env::var_os("BANGER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/ext4-export"));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let image = work.join("source.ext4");
    let out = work.join("export.tar");
    let baseline = work.join("baseline.tar");

    let du = run(Command::new("du").args(["-sxb"]).arg(&source))?;
    let source_bytes: u64 = du
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or("cannot parse du")?;
    let image_bytes = (source_bytes * 3 / 2 + (256 << 20)).next_multiple_of(1 << 20);
    eprintln!(
        "making a {} MiB image of {} with mkfs.ext4 -d …",
        image_bytes >> 20,
        source.display()
    );
    let _ = std::fs::remove_file(&image);
    run(Command::new("truncate")
        .arg("-s")
        .arg(image_bytes.to_string())
        .arg(&image))?;
    let start = Instant::now();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&source)
        .arg(&image))?;
    eprintln!("  mkfs.ext4 -d took {}", secs(start.elapsed()));

    let cold = drop_caches();
    let mut export_cold = Vec::new();
    let mut tar_cold = Vec::new();
    let mut read_cold = Vec::new();
    let mut write_cold = Vec::new();
    let mut summary = ExportSummary::default();
    let mut tar_bytes = 0;
    for _ in 0..RUNS {
        drop_caches();
        let (elapsed, s) = export_once(&image, &out)?;
        export_cold.push(elapsed);
        summary = s;
        drop_caches();
        tar_cold.push(tar_once(&source, &baseline)?);
        drop_caches();
        read_cold.push(read_floor(&image)?);
        if tar_bytes == 0 {
            export_tar_to_file(&image, Path::new(""), &out, &ExportOptions::default())
                .map_err(|e| banger::error::error_chain(&e))?;
            tar_bytes = std::fs::metadata(&out).map_err(|e| e.to_string())?.len();
            std::fs::remove_file(&out).map_err(|e| e.to_string())?;
        }
        drop_caches();
        write_cold.push(write_floor(&out, tar_bytes)?);
    }
    // Warm: the image in the page cache, the output still written and synced.
    export_once(&image, &out)?;
    let mut export_warm = Vec::new();
    for _ in 0..RUNS {
        export_warm.push(export_once(&image, &out)?.0);
    }
    let allocated = std::os::unix::fs::MetadataExt::blocks(
        &std::fs::metadata(&image).map_err(|e| e.to_string())?,
    ) * 512;
    let reader = Ext4Reader::open(&image).map_err(|e| e.to_string())?;
    let mut export_sink = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        export_tar(
            &reader,
            Path::new(""),
            std::io::sink(),
            &ExportOptions::default(),
        )
        .map_err(|e| banger::error::error_chain(&e))?;
        export_sink.push(start.elapsed());
    }
    drop(reader);
    let _ = std::fs::remove_file(&image);

    let megabytes = summary.bytes as f64 / 1e6;
    let export_cold = median(export_cold);
    let tar_cold = median(tar_cold);
    let export_warm = median(export_warm);
    let rate = |d: Duration| megabytes / d.as_secs_f64();
    println!(
        "source: {} ({} entries, {megabytes:.0} MB of file data, {} hard links)",
        source.display(),
        summary.entries,
        summary.hard_links
    );
    let label = if cold {
        "cold cache"
    } else {
        "warm cache (not root: caches not dropped)"
    };
    println!(
        "export_tar_to_file, {label}: {} ({:.0} MB/s)",
        secs(export_cold),
        rate(export_cold)
    );
    println!(
        "tar -cf of the directory, {label}: {} ({:.0} MB/s)",
        secs(tar_cold),
        rate(tar_cold)
    );
    println!(
        "export / tar: {:.2}×",
        export_cold.as_secs_f64() / tar_cold.as_secs_f64()
    );
    let read_cold = median(read_cold);
    let write_cold = median(write_cold);
    println!(
        "floors, {label}: read the image ({} MB, {} MB allocated) {}, write and sync {} MB {} \
         (sum {})",
        image_bytes / 1_000_000,
        allocated / 1_000_000,
        secs(read_cold),
        tar_bytes / 1_000_000,
        secs(write_cold),
        secs(read_cold + write_cold)
    );
    println!(
        "export / (read + write floors): {:.2}×",
        export_cold.as_secs_f64() / (read_cold + write_cold).as_secs_f64()
    );
    println!(
        "export_tar_to_file, image cached: {} ({:.0} MB/s)",
        secs(export_warm),
        rate(export_warm)
    );
    let export_sink = median(export_sink);
    println!(
        "export_tar into io::sink, image cached: {} ({:.0} MB/s)",
        secs(export_sink),
        rate(export_sink)
    );
    Ok(())
}
