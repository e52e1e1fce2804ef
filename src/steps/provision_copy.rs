//! `provision.copy`: a project file or directory copied into an image, root-owned.
//!
//! Input: `rootfs` (the image so far). Params: `src` (the project path and its content
//! digest), `dest` (absolute guest path), `mode` (octal, optional; else the host file's).
//! Hint: `project_dir`. Output: `rootfs.ext4`.
//!
//! 1. Re-fingerprint the source: if it changed since the plan was keyed, fail rather than store
//!    content the key does not describe.
//! 2. Copy the input image sparsely (holes stay holes; stored inputs are read-only).
//! 3. One `debugfs -w -f SCRIPT` run: create missing parent directories, remove what is at
//!    the destination, write files, make directories and symlinks, set owner root and modes.
//!    debugfs exits 0 even when a command fails, so its stderr is read for errors.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::key::ParamValue;

#[derive(Debug, Clone, Copy, Default)]
pub struct ProvisionCopy;

impl Executor for ProvisionCopy {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let (relative, digest) = match ctx.params.get("src") {
                Some(ParamValue::Digest { path, digest }) => (PathBuf::from(path), digest.clone()),
                _ => {
                    return Err(StepError::new(format!(
                        "step {} has no fingerprinted `src`",
                        ctx.step_id
                    )));
                }
            };
            let dest = ctx
                .params
                .get_str("dest")
                .ok_or_else(|| StepError::new("copy step without `dest`"))?
                .to_owned();
            let mode = match ctx.params.get_str("mode") {
                Some(text) => Some(u32::from_str_radix(text, 8).map_err(|_| {
                    StepError::new(format!("copy step mode `{text}` is not octal"))
                })?),
                None => None,
            };
            let project_dir = ctx
                .hints
                .get("project_dir")
                .map(PathBuf::from)
                .ok_or_else(|| StepError::new("copy step does not know the project directory"))?;
            let source = project_dir.join(&relative);
            let input = ctx.input_file("rootfs", crate::images::ROOTFS_OUTPUT)?;
            let output = ctx.output(crate::images::ROOTFS_OUTPUT)?;
            let script = ctx.work_dir()?.join("debugfs.cmd");
            tokio::task::spawn_blocking(move || {
                let current = crate::sources::fingerprint_path(&source).map_err(|error| {
                    StepError::with_source("cannot read the copy source", error)
                })?;
                if current != digest {
                    return Err(StepError::new(format!(
                        "{} changed after the plan was made; run the command again",
                        source.display()
                    )));
                }
                sparse_copy(&input, &output)?;
                let mut commands = String::new();
                write_commands(&mut commands, &source, &dest, mode)?;
                std::fs::write(&script, &commands).map_err(|error| {
                    StepError::with_source(format!("cannot write {}", script.display()), error)
                })?;
                run_debugfs(&output, &script)
            })
            .await
            .map_err(|error| StepError::new(format!("the copy step panicked: {error}")))?
        })
    }
}

/// Copies `from` to `to`, leaving holes where `from` has them.
fn sparse_copy(from: &Path, to: &Path) -> Result<(), StepError> {
    use nix::unistd::{Whence, lseek};
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;
    let error = |what: &str, path: &Path, source: std::io::Error| {
        StepError::with_source(format!("cannot {what} {}", path.display()), source)
    };
    let mut input = std::fs::File::open(from).map_err(|e| error("read", from, e))?;
    let length = input.metadata().map_err(|e| error("read", from, e))?.len();
    let mut output = std::fs::File::create(to).map_err(|e| error("write", to, e))?;
    output.set_len(length).map_err(|e| error("write", to, e))?;
    output
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|e| error("write", to, e))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut position: i64 = 0;
    while (position as u64) < length {
        let data = match lseek(input.as_fd(), position, Whence::SeekData) {
            Ok(offset) => offset,
            // No data after `position`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(errno) => return Err(error("read", from, errno.into())),
        };
        let hole = lseek(input.as_fd(), data, Whence::SeekHole)
            .map_err(|errno| error("read", from, errno.into()))?;
        input
            .seek(SeekFrom::Start(data as u64))
            .map_err(|e| error("read", from, e))?;
        output
            .seek(SeekFrom::Start(data as u64))
            .map_err(|e| error("write", to, e))?;
        let mut remaining = (hole - data) as u64;
        while remaining > 0 {
            let chunk = remaining.min(buffer.len() as u64) as usize;
            input
                .read_exact(&mut buffer[..chunk])
                .map_err(|e| error("read", from, e))?;
            output
                .write_all(&buffer[..chunk])
                .map_err(|e| error("write", to, e))?;
            remaining -= chunk as u64;
        }
        position = hole;
    }
    Ok(())
}

/// Quotes a path for debugfs's command parser.
fn quote(path: &str) -> Result<String, StepError> {
    if path.contains('"') || path.contains('\n') {
        return Err(StepError::new(format!(
            "cannot copy `{path}`: debugfs cannot name paths with quotes or newlines"
        )));
    }
    Ok(format!("\"{path}\""))
}

fn write_commands(
    out: &mut String,
    source: &Path,
    dest: &str,
    mode: Option<u32>,
) -> Result<(), StepError> {
    let dest = dest.trim_end_matches('/');
    // Parents of the destination: `mkdir` of an existing directory fails harmlessly.
    let mut parent = String::new();
    let components: Vec<&str> = dest.split('/').filter(|part| !part.is_empty()).collect();
    for part in &components[..components.len().saturating_sub(1)] {
        parent.push('/');
        parent.push_str(part);
        let _ = writeln!(out, "mkdir {}", quote(&parent)?);
    }
    // Whatever is at the destination goes (a file, or an empty directory).
    let _ = writeln!(out, "rm {}", quote(dest)?);
    let _ = writeln!(out, "rmdir {}", quote(dest)?);
    copy_entry(out, source, dest, mode)
}

fn copy_entry(
    out: &mut String,
    source: &Path,
    dest: &str,
    mode: Option<u32>,
) -> Result<(), StepError> {
    let metadata = std::fs::symlink_metadata(source).map_err(|error| {
        StepError::with_source(format!("cannot read {}", source.display()), error)
    })?;
    let file_type = metadata.file_type();
    let host_mode = metadata.permissions().mode() & 0o7777;
    let quoted_dest = quote(dest)?;
    if file_type.is_symlink() {
        let target = std::fs::read_link(source).map_err(|error| {
            StepError::with_source(format!("cannot read {}", source.display()), error)
        })?;
        let _ = writeln!(
            out,
            "symlink {quoted_dest} {}",
            quote(&target.to_string_lossy())?
        );
        let _ = writeln!(out, "sif {quoted_dest} uid 0\nsif {quoted_dest} gid 0");
        return Ok(());
    }
    if file_type.is_dir() {
        let _ = writeln!(out, "mkdir {quoted_dest}");
        let type_bits = 0o040000;
        let _ = writeln!(
            out,
            "sif {quoted_dest} mode 0{:o}\nsif {quoted_dest} uid 0\nsif {quoted_dest} gid 0",
            type_bits | mode.unwrap_or(host_mode)
        );
        let mut names: Vec<_> = std::fs::read_dir(source)
            .map_err(|error| {
                StepError::with_source(format!("cannot read {}", source.display()), error)
            })?
            .filter_map(Result::ok)
            .map(|entry| entry.file_name())
            .collect();
        names.sort();
        for name in names {
            let child = format!("{dest}/{}", name.to_string_lossy());
            copy_entry(out, &source.join(&name), &child, None)?;
        }
        return Ok(());
    }
    if !file_type.is_file() {
        return Err(StepError::new(format!(
            "{} is not a file, directory or symlink",
            source.display()
        )));
    }
    let _ = writeln!(
        out,
        "write {} {quoted_dest}",
        quote(&source.to_string_lossy())?
    );
    let _ = writeln!(
        out,
        "sif {quoted_dest} mode 0{:o}\nsif {quoted_dest} uid 0\nsif {quoted_dest} gid 0",
        0o100000 | mode.unwrap_or(host_mode)
    );
    Ok(())
}

/// Runs the script; fails on any error line other than the harmless ones we provoke.
fn run_debugfs(image: &Path, script: &Path) -> Result<(), StepError> {
    let argv = format!("debugfs -w -f {} {}", script.display(), image.display());
    let output = std::process::Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(script)
        .arg(image)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                StepError::new(
                    "debugfs is not installed; install e2fsprogs (`apt-get install e2fsprogs`)",
                )
            } else {
                StepError::with_source(format!("cannot run {argv}"), error)
            }
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.starts_with("debugfs "))
        .filter(|line| !line.trim().is_empty())
        // Expected: parents that exist, and a destination that was not there.
        .filter(|line| !line.contains("Ext2 directory already exists"))
        .filter(|line| !line.contains("File not found by ext2_lookup"))
        .filter(|line| !line.starts_with("rmdir: "))
        .filter(|line| !line.starts_with("rm: "))
        .collect();
    if !output.status.success() || !errors.is_empty() {
        let hint = if stderr.contains("Could not allocate block") {
            "\nthe image is full: give it a fixed `size` in the Bangerfile"
        } else {
            ""
        };
        return Err(StepError::new(format!(
            "{argv} failed ({}):\n{}{hint}",
            output.status,
            errors.join("\n")
        )));
    }
    Ok(())
}
