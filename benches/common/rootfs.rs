//! Root file system inputs the benchmarks share (`common::rootfs`):
//! a Debian tar built once with mmdebstrap (or a synthetic one), and the reference pipeline
//! banger's image writer is measured against (`tar -xp`, `mkfs.ext4 -d`, a `debugfs` pass
//! for owners and modes: the old tool's way).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub type BenchResult<T> = Result<T, String>;

pub fn run(command: &mut Command) -> BenchResult<String> {
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
pub fn debugfs_commands(tar: &Path, out: &Path) -> BenchResult<usize> {
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

/// The reference pipeline on `tar` (gzip-compressed or not: GNU tar decompresses what it
/// reads), into an image of `image_bytes`, with the `debugfs` commands of
/// [`debugfs_commands`]; the work stays in `work` until the caller removes it.
pub fn run_reference(
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

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

pub fn rootfs_tar(bench_dir: &Path) -> BenchResult<PathBuf> {
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
pub fn synthetic_tar(bench_dir: &Path) -> BenchResult<PathBuf> {
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
