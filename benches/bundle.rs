//! Bundles: write and unpack of a 1 GiB, mostly empty ext4 image, against baselines from the
//! same run.
//!
//! `cargo bench --bench bundle` (or `scripts/bench-bundle`) builds a 1 GiB ext4 image holding
//! `BANGER_BENCH_BUNDLE_CONTENT_MB` (default 200) MiB of this host's own files from `/usr`
//! (real binaries and libraries, so compression is realistic), then prints medians of 3 runs:
//! - `write_bundle` and `unpack_bundle`: time, MB/s of image bytes, the bundle's size;
//! - baselines: one sha256 pass over the image (what hashing in a first pass, before writing,
//!   would add), and, when the `zstd` program is installed, `zstd -3 -T0` compressing and
//!   decompressing the bare image (tar and zstd by hand).
//!
//! The page cache is left warm (the host is shared), so this measures CPU, not the disk.
//! Needs about 3 GiB free under `target/`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use banger::bundle::{BundleManifest, unpack_bundle, write_bundle};
use banger::ext4::{BuildOptions, EntryKind, Ext4Builder, Metadata, Sizing};
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

type BenchResult<T> = Result<T, String>;

const IMAGE_SIZE: u64 = 1 << 30;
const RUNS: usize = 3;

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bundle bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> BenchResult<()> {
    let content_mb: u64 = std::env::var("BANGER_BENCH_BUNDLE_CONTENT_MB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(200);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/bundle");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
    let image = root.join("rootfs.ext4");
    let stored = build_image(&image, content_mb << 20)?;
    // Write the image back now, so its writeback does not land inside the timed runs.
    fs::File::open(&image)
        .and_then(|file| file.sync_all())
        .map_err(|e| format!("sync {}: {e}", image.display()))?;
    println!(
        "image: {} MiB ext4 holding {} MiB of files from /usr",
        IMAGE_SIZE >> 20,
        stored >> 20
    );

    let bundle = root.join("image.tar.zst");
    let files = [("rootfs.ext4".to_owned(), image.clone())];
    let manifest = BundleManifest::image("bench", "debian", "x86_64", "bench-kernel");
    let never = CancellationToken::new();
    let mut size = 0;
    let write = median(|| {
        let _ = fs::remove_file(&bundle);
        let started = Instant::now();
        let written = write_bundle(&manifest, &files, &bundle, &mut |_, _| {}, &never)
            .map_err(|e| e.to_string())?;
        size = written.size;
        Ok(started.elapsed())
    })?;
    let out = root.join("out");
    let unpack = median(|| {
        let _ = fs::remove_dir_all(&out);
        let started = Instant::now();
        unpack_bundle(&bundle, &out, &mut |_, _| {}, &never).map_err(|e| e.to_string())?;
        Ok(started.elapsed())
    })?;
    let hash = median(|| {
        let started = Instant::now();
        sha256_file(&image)?;
        Ok(started.elapsed())
    })?;

    let rate = |time: Duration| IMAGE_SIZE as f64 / 1e6 / time.as_secs_f64();
    println!(
        "write_bundle:  {:>7.0} ms  {:>6.0} MB/s  bundle {:.1} MiB",
        ms(write),
        rate(write),
        size as f64 / (1 << 20) as f64
    );
    println!(
        "unpack_bundle: {:>7.0} ms  {:>6.0} MB/s",
        ms(unpack),
        rate(unpack)
    );
    println!(
        "sha256 pass:   {:>7.0} ms  {:>6.0} MB/s  (a hash-first design would add this to every write)",
        ms(hash),
        rate(hash)
    );
    if Command::new("zstd").arg("-V").output().is_ok() {
        let compressed = root.join("bare.zst");
        let zstd_compress = median(|| {
            timed(
                Command::new("zstd")
                    .args(["-q", "-f", "-3", "-T0", "-o"])
                    .arg(&compressed)
                    .arg(&image),
            )
        })?;
        let zstd_decompress = median(|| {
            timed(
                Command::new("zstd")
                    .args(["-q", "-d", "-f", "-o", "/dev/null"])
                    .arg(&compressed),
            )
        })?;
        println!(
            "zstd -3 -T0:   {:>7.0} ms  {:>6.0} MB/s  {:.1} MiB; decompress {:.0} ms  (baseline)",
            ms(zstd_compress),
            rate(zstd_compress),
            fs::metadata(&compressed).map_err(|e| e.to_string())?.len() as f64 / (1 << 20) as f64,
            ms(zstd_decompress)
        );
        println!(
            "ratios: write/zstd {:.2}, unpack/zstd -d {:.2}",
            write.as_secs_f64() / zstd_compress.as_secs_f64(),
            unpack.as_secs_f64() / zstd_decompress.as_secs_f64()
        );
    }
    let _ = fs::remove_dir_all(&root);
    Ok(())
}

fn ms(time: Duration) -> f64 {
    time.as_secs_f64() * 1e3
}

fn median(mut run: impl FnMut() -> BenchResult<Duration>) -> BenchResult<Duration> {
    let mut times = (0..RUNS).map(|_| run()).collect::<BenchResult<Vec<_>>>()?;
    times.sort();
    Ok(times[RUNS / 2])
}

fn timed(command: &mut Command) -> BenchResult<Duration> {
    let started = Instant::now();
    let status = command
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if !status.success() {
        return Err(format!("{command:?} failed: {status}"));
    }
    Ok(started.elapsed())
}

fn sha256_file(path: &Path) -> BenchResult<()> {
    let mut file = fs::File::open(path).map_err(|e| e.to_string())?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(|e| e.to_string())?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    std::hint::black_box(hasher.finalize());
    Ok(())
}

/// Regular files under `/usr/lib` and `/usr/bin`, in path order, up to `budget` bytes.
fn host_files(budget: u64) -> Vec<(PathBuf, u64)> {
    fn walk(dir: &Path, budget: u64, total: &mut u64, out: &mut Vec<(PathBuf, u64)>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if *total >= budget {
                return;
            }
            let Ok(metadata) = fs::symlink_metadata(&path) else {
                continue;
            };
            if metadata.is_dir() {
                walk(&path, budget, total, out);
            } else if metadata.is_file() && fs::File::open(&path).is_ok() {
                *total += metadata.len();
                out.push((path, metadata.len()));
            }
        }
    }
    let mut out = Vec::new();
    let mut total = 0;
    for dir in ["/usr/bin", "/usr/lib"] {
        walk(Path::new(dir), budget, &mut total, &mut out);
    }
    out
}

/// Builds the image; returns the bytes of file content stored.
fn build_image(image: &Path, budget: u64) -> BenchResult<u64> {
    let mut options = BuildOptions::with_seed(b"banger bundle bench");
    options.sync = false;
    let mut builder = Ext4Builder::create(image, options).map_err(|e| e.to_string())?;
    let directory = Metadata {
        mode: 0o755,
        ..Metadata::default()
    };
    let file_meta = Metadata {
        mode: 0o644,
        ..Metadata::default()
    };
    let mut made = std::collections::BTreeSet::new();
    let mut stored = 0;
    for (path, size) in host_files(budget) {
        let relative = path.strip_prefix("/").expect("absolute").to_owned();
        for ancestor in relative
            .ancestors()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if !ancestor.as_os_str().is_empty() && made.insert(ancestor.to_owned()) {
                builder
                    .insert(ancestor, EntryKind::Directory, &directory)
                    .map_err(|e| e.to_string())?;
            }
        }
        let mut data = fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        builder
            .insert(
                &relative,
                EntryKind::File {
                    size,
                    data: &mut data,
                },
                &file_meta,
            )
            .map_err(|e| e.to_string())?;
        stored += size;
    }
    builder
        .finish(Sizing::Fixed(IMAGE_SIZE))
        .map_err(|e| e.to_string())?;
    Ok(stored)
}
