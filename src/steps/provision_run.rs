//! `provision.run`: a command run as root in a throwaway **builder VM**; what it changed in
//! the image is the step's output, as an OCI-style diff layer.
//!
//! Inputs: `rootfs` (the image so far, `rootfs.ext4`; attached read-only, never written),
//! `kernel` (`vmlinux` and banger's `initrd`). Params:
//! [`crate::plan::kinds::ProvisionRunParams`]. Hint: `timeout_secs`. Output: `layer.tar`.
//!
//! Lifecycle:
//! 1. Write a blank ext4 **without a journal** for the overlay's writable layer (sparse, in
//!    the step's scratch), so that once the guest has synced, everything it wrote is in
//!    place on the disk for the host to read.
//! 2. Boot QEMU `microvm` (`banger.builder`: the agent's init mounts the overlay with no
//!    metacopy, redirects or index, so the upper directory is a self-contained diff, and
//!    never runs first boot) with user-mode networking (the guest reaches what the host
//!    reaches). The agent stays PID 1 (like `docker build`'s `RUN`, no init), unless the
//!    entry says `init = "systemd"`. QEMU and its vsock helper die with this process
//!    however it ends ([`crate::vm::process::die_with_parent`]).
//! 3. Run `sh -c COMMAND` through the agent, in `/`, with `HOME=/root` and the entry's
//!    `env`. Every output line goes to the step's kept log ([`StepContext::log_path`]) and
//!    live to the reporter.
//! 4. Exit 0: power the guest off cleanly (the agent syncs), then read the layer disk's
//!    `upper/` with banger's ext4 reader into the layer: overlayfs whiteouts and opaque
//!    directories become OCI `.wh.` entries, entries are sorted, modification times clamped
//!    to the entry's `SOURCE_DATE_EPOCH`, and per-instance identity and what only the builder
//!    needed are left out ([`crate::rootfs::identity::RUN_LAYER_EXCLUDES`]).
//!    Anything else (a non-zero exit, the timeout, a guest that does not come up) fails the
//!    step with the exit code, the last lines and the log's path.
//!
//! Whatever happens, the VM is gone when the step ends: dropping the boot kills QEMU, and
//! the engine removes the scratch directory (disk included).

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::engine::{BoxFuture, Executor, OutputStream, ProgressHandle, StepContext, StepError};
use crate::guest::{ExecRequest, ExitStatus};
use crate::plan::kinds::ProvisionRunParams;
use crate::spec::BuilderInit;
use crate::vm::boot::{AgentTransport, BootSpec, BootedVm, WritableLayer};

/// Memory of a builder VM.
pub const BUILDER_MEMORY_MIB: u64 = 2048;
/// Size of a builder's writable layer (a sparse file: only what the command writes is
/// allocated). 16 GiB keeps the ext4 in its classic one-block descriptor layout.
pub const BUILDER_LAYER_BYTES: u64 = 16 << 30;
/// How long the guest may take to answer (TCG boots of Debian with systemd take seconds to
/// a minute on a loaded host).
pub const BUILDER_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a clean power-off may take before the step fails.
pub const BUILDER_POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of output an error shows.
pub const ERROR_TAIL_LINES: usize = 20;

/// The `vm` permits a builder holds ([`crate::steps::VM_MEMORY_PERMIT_MIB`] units).
pub fn builder_weight() -> u32 {
    (BUILDER_MEMORY_MIB / u64::from(super::VM_MEMORY_PERMIT_MIB)) as u32
}

/// The executor; how it reaches QEMU is found when a step runs.
#[derive(Debug, Clone, Default)]
pub struct ProvisionRun;

impl ProvisionRun {
    pub fn from_env() -> ProvisionRun {
        ProvisionRun
    }
}

impl Executor for ProvisionRun {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(run_step(ctx))
    }
}

async fn run_step(ctx: &StepContext) -> Result<(), StepError> {
    let params: ProvisionRunParams = super::params(ctx)?;
    let timeout = ctx
        .hints
        .get("timeout_secs")
        .and_then(|seconds| seconds.parse().ok())
        .map_or(crate::spec::DEFAULT_RUN_TIMEOUT, Duration::from_secs);
    let rootfs = ctx.input_file("rootfs", crate::steps::ROOTFS_OUTPUT)?;
    let kernel = ctx.input_file("kernel", "vmlinux")?;
    let initrd = match ctx.input("kernel")?.outputs.contains_key("initrd") {
        true => ctx.input_file("kernel", "initrd")?,
        false => {
            return Err(StepError::new(
                "the image's kernel has no initrd: `run` steps boot banger's initramfs, so use \
                 a catalog kernel or import one with its initrd",
            ));
        }
    };
    let work = ctx.work_dir()?;
    let layer_disk = work.join("layer.ext4");
    let seed = format!("builder/{}", ctx.definition_key.to_hex());
    crate::vm::storage::create_layer_disk(&layer_disk, BUILDER_LAYER_BYTES, seed.as_bytes())
        .map_err(|error| StepError::with_source("cannot create the builder's layer disk", error))?;

    let log_path = ctx.log_path()?;
    let log = OutputLog::create(&log_path, ctx.progress_handle())?;
    log.note(&format!("$ {}", params.command));

    // Unix socket paths are short (108 bytes): the VM's sockets go in a short temp dir.
    let sockets = tempfile::Builder::new()
        .prefix("banger-build-")
        .tempdir()
        .map_err(|error| StepError::with_source("cannot create a socket directory", error))?;
    let accel = crate::vm::accel::choose(&crate::vm::accel::HostFacts::probe())
        .map_err(|error| StepError::with_source("cannot boot a builder VM", error))?;
    let vsock_daemon = crate::vm::vsock::find_binary();
    let spec = BootSpec {
        qemu_binary: crate::vm::qemu::binary(),
        accel,
        vcpus: std::thread::available_parallelism().map_or(1, |n| n.get().min(2)) as u32,
        memory_mib: BUILDER_MEMORY_MIB,
        kernel,
        initrd: Some(initrd),
        rootfs,
        transport: if vsock_daemon.is_some() {
            AgentTransport::Vsock
        } else {
            AgentTransport::Serial
        },
        vsock_daemon,
        extra_cmdline: builder_cmdline(params.init),
        writable: WritableLayer::Disk(layer_disk.clone()),
        forwards: Vec::new(),
        network: true,
        tap: None,
        dir: sockets.path().to_owned(),
        serial_log: work.join("console.log"),
    };
    log.note(&format!(
        "booting a builder VM ({}, {} MiB, init: {})",
        if spec.accel.is_tcg() {
            "QEMU TCG"
        } else {
            "QEMU KVM"
        },
        spec.memory_mib,
        params.init.as_str()
    ));
    let started = Instant::now();
    let mut vm = BootedVm::start(&spec)
        .await
        .map_err(|error| StepError::with_source("cannot start the builder VM", error))?;
    let (mut channel, ready) = vm
        .wait_agent(Instant::now() + BUILDER_BOOT_TIMEOUT)
        .await
        .map_err(|error| StepError::with_source("the builder VM did not come up", error))?;
    log.note(&format!(
        "builder VM ready in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    if params.init == BuilderInit::Systemd {
        wait_for_systemd(&mut channel, &log, started).await?;
    }

    let mut request = ExecRequest::shell(params.command.clone())
        .with_env("HOME", "/root")
        .with_env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    for (name, value) in &params.env {
        request = request.with_env(name.clone(), value.clone());
    }
    request.cwd = Some("/".to_owned());
    let stdout = log.sink(OutputStream::Stdout);
    let stderr = log.sink(OutputStream::Stderr);
    let status = match tokio::time::timeout(
        timeout,
        channel.exec(&request, &[][..], stdout, stderr),
    )
    .await
    {
        Ok(Ok(status)) => status,
        Ok(Err(error)) => {
            log.flush();
            return Err(StepError::with_source(
                format!(
                    "the builder VM's agent failed while running the command (console log: {})",
                    vm.serial_log().display()
                ),
                error,
            ));
        }
        Err(_) => {
            log.flush();
            return Err(StepError::new(format!(
                "`{}` did not finish within {}; its last lines:\n{}\nthe whole log: {}",
                params.command,
                humanize(timeout),
                log.tail(),
                log_path.display()
            )));
        }
    };
    log.flush();
    if status != ExitStatus::Code(0) {
        return Err(StepError::new(format!(
            "`{}` failed ({status}); its last lines:\n{}\nthe whole log: {}",
            params.command,
            log.tail(),
            log_path.display()
        )));
    }

    // A clean power-off: the agent (or systemd) syncs every file system, so the layer disk,
    // which has no journal, is complete on the host once QEMU has exited.
    let graceful = vm
        .power_off(&mut channel, ready.pid1, BUILDER_POWEROFF_TIMEOUT)
        .await
        .map_err(|error| StepError::with_source("cannot stop the builder VM", error))?;
    if !graceful {
        return Err(StepError::new(format!(
            "the builder VM did not power off within {}, so its changes may be incomplete; \
             the console log is {}",
            humanize(BUILDER_POWEROFF_TIMEOUT),
            spec.serial_log.display()
        )));
    }
    drop(sockets);
    let out = ctx.output(super::agent_layer::LAYER_OUTPUT)?;
    let epoch = params.source_date_epoch;
    tokio::task::spawn_blocking(move || export_run_layer(&layer_disk, &out, epoch))
        .await
        .map_err(|error| StepError::new(format!("reading the builder's layer panicked: {error}")))?
}

/// The kernel command-line words of a builder VM.
fn builder_cmdline(init: BuilderInit) -> Vec<String> {
    let mut words = vec!["banger.builder=1".to_owned()];
    match init {
        BuilderInit::Agent => words.push("banger.init=agent".to_owned()),
        BuilderInit::Systemd => words.extend(
            [
                "banger.init=image",
                // Nobody logs in on a builder's console, and the serial getty waits 90 s for
                // a device unit that never comes under microvm: measured, the whole boot.
                "systemd.mask=serial-getty@ttyS0.service",
                "systemd.mask=getty.target",
            ]
            .map(str::to_owned),
        ),
    }
    words
}

/// Waits until the builder's systemd has started its units (`running`, or `degraded` when
/// one failed): the agent answers before systemd even runs, and a step that asked for
/// systemd wants its services up.
async fn wait_for_systemd(
    channel: &mut crate::guest::GuestChannel,
    log: &OutputLog,
    started: Instant,
) -> Result<(), StepError> {
    let wait = ExecRequest::argv([
        "sh",
        "-c",
        "until [ -S /run/systemd/private ]; do sleep 0.1; done; systemctl is-system-running --wait",
    ]);
    let (_, stdout, _) = tokio::time::timeout(
        BUILDER_BOOT_TIMEOUT,
        crate::vm::boot::run_captured(channel, wait),
    )
    .await
    .map_err(|_| StepError::new("the builder VM's systemd did not finish starting"))?
    .map_err(|error| StepError::with_source("cannot wait for the builder's systemd", error))?;
    log.note(&format!(
        "systemd {} after {:.1}s",
        String::from_utf8_lossy(&stdout).trim(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The builder's changes (`upper/` of its layer disk) as a layer at `out`.
fn export_run_layer(disk: &Path, out: &Path, epoch: u64) -> Result<(), StepError> {
    use crate::ext4::export::{ExcludeRule, ExportOptions, export_tar_to_file};
    use crate::rootfs::identity::{RUN_LAYER_EXCLUDES, RunExclude};
    let options = ExportOptions {
        clamp_mtime: Some(i64::try_from(epoch).unwrap_or(i64::MAX)),
        overlay_upper: true,
        exclude: RUN_LAYER_EXCLUDES
            .iter()
            .map(|rule| match rule {
                RunExclude::Path(path) => ExcludeRule::Path(PathBuf::from(path)),
                RunExclude::Contents(path) => ExcludeRule::Contents(PathBuf::from(path)),
            })
            .collect(),
    };
    export_tar_to_file(disk, Path::new("upper"), out, &options)
        .map(|_summary| ())
        .map_err(|error| StepError::with_source("cannot read the builder's changes", error))
}

fn humanize(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if seconds >= 3600 && seconds.is_multiple_of(3600) {
        format!("{}h", seconds / 3600)
    } else if seconds >= 60 && seconds.is_multiple_of(60) {
        format!("{}m", seconds / 60)
    } else {
        format!("{seconds}s")
    }
}

/// A step's output: every byte to its kept log, complete lines live to the reporter, the
/// last [`ERROR_TAIL_LINES`] lines kept for an error.
#[derive(Clone)]
struct OutputLog {
    inner: Arc<Mutex<LogState>>,
}

struct LogState {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    progress: ProgressHandle,
    tail: VecDeque<String>,
    /// A line not yet ended, per stream.
    partial: [Vec<u8>; 2],
    /// The stream's last byte was a carriage return.
    carriage_return: [bool; 2],
    write_failed: bool,
}

impl OutputLog {
    fn create(path: &Path, progress: ProgressHandle) -> Result<OutputLog, StepError> {
        let file = std::fs::File::create(path).map_err(|error| {
            StepError::with_source(
                format!("cannot write the step log {}", path.display()),
                error,
            )
        })?;
        Ok(OutputLog {
            inner: Arc::new(Mutex::new(LogState {
                file: std::io::BufWriter::new(file),
                path: path.to_owned(),
                progress,
                tail: VecDeque::with_capacity(ERROR_TAIL_LINES),
                partial: [Vec::new(), Vec::new()],
                carriage_return: [false, false],
                write_failed: false,
            })),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.inner.lock().unwrap_or_else(|error| error.into_inner())
    }

    /// A line of banger's own (`banger: …` in the log and on the bar).
    fn note(&self, text: &str) {
        let mut state = self.lock();
        let line = format!("banger: {text}");
        state.write(format!("{line}\n").as_bytes());
        state.progress.output_line(OutputStream::Stderr, line);
    }

    fn sink(&self, stream: OutputStream) -> OutputSink {
        OutputSink {
            log: self.clone(),
            stream,
        }
    }

    /// Ends unterminated lines and flushes the file.
    fn flush(&self) {
        let mut state = self.lock();
        for stream in [OutputStream::Stdout, OutputStream::Stderr] {
            let index = stream_index(stream);
            if !state.partial[index].is_empty() {
                let rest = std::mem::take(&mut state.partial[index]);
                state.write(b"\n");
                state.line(stream, &rest);
            }
        }
        if state.file.flush().is_err() {
            state.write_failed = true;
        }
    }

    fn tail(&self) -> String {
        let state = self.lock();
        if state.tail.is_empty() {
            return "  (no output)".to_owned();
        }
        let mut text = state
            .tail
            .iter()
            .map(|line| format!("  | {line}"))
            .collect::<Vec<_>>()
            .join("\n");
        if state.write_failed {
            text.push_str(&format!(
                "\n(writing the log {} failed; it is incomplete)",
                state.path.display()
            ));
        }
        text
    }
}

fn stream_index(stream: OutputStream) -> usize {
    match stream {
        OutputStream::Stdout => 0,
        OutputStream::Stderr => 1,
    }
}

impl LogState {
    fn write(&mut self, bytes: &[u8]) {
        if self.file.write_all(bytes).is_err() {
            self.write_failed = true;
        }
    }

    fn line(&mut self, stream: OutputStream, bytes: &[u8]) {
        // The log file keeps the bytes; what reaches the terminal is defused.
        let text = crate::error::printable(&String::from_utf8_lossy(bytes));
        if self.tail.len() == ERROR_TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(text.clone());
        self.progress.output_line(stream, text);
    }

    /// Takes a chunk of one stream: all of it into the log; complete lines to the reporter.
    /// A carriage return not followed by a newline starts the line over (a progress counter
    /// redrawing itself), so only what the line finally says is shown.
    fn take(&mut self, stream: OutputStream, bytes: &[u8]) {
        self.write(bytes);
        let index = stream_index(stream);
        for &byte in bytes {
            if std::mem::take(&mut self.carriage_return[index]) && byte != b'\n' {
                self.partial[index].clear();
            }
            match byte {
                b'\n' => {
                    let line = std::mem::take(&mut self.partial[index]);
                    self.line(stream, &line);
                }
                b'\r' => self.carriage_return[index] = true,
                _ => self.partial[index].push(byte),
            }
            // A command printing without line breaks must not grow this forever.
            if self.partial[index].len() > 64 * 1024 {
                let long = std::mem::take(&mut self.partial[index]);
                self.line(stream, &long);
            }
        }
    }
}

/// One stream of a command's output, into an [`OutputLog`].
struct OutputSink {
    log: OutputLog,
    stream: OutputStream,
}

impl tokio::io::AsyncWrite for OutputSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // In memory and a buffered file: cheap enough to do inline.
        self.log.lock().take(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn output_is_kept_whole_and_shown_by_line_with_progress_redraws_collapsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("step.log");
        let (progress, mut drain) = ProgressHandle::collecting();
        let log = OutputLog::create(&path, progress).unwrap();
        log.note("booting");
        let mut stdout = log.sink(OutputStream::Stdout);
        let mut stderr = log.sink(OutputStream::Stderr);
        stdout.write_all(b"one\ntw").await.unwrap();
        stderr.write_all(b"warn\r\n").await.unwrap();
        stdout.write_all(b"o\n5%\r10%\r").await.unwrap();
        stdout.write_all(b"done\nno newline").await.unwrap();
        log.flush();
        let lines = drain();
        assert_eq!(
            lines,
            [
                (OutputStream::Stderr, "banger: booting".to_owned()),
                (OutputStream::Stdout, "one".to_owned()),
                (OutputStream::Stderr, "warn".to_owned()),
                (OutputStream::Stdout, "two".to_owned()),
                (OutputStream::Stdout, "done".to_owned()),
                (OutputStream::Stdout, "no newline".to_owned()),
            ]
        );
        let kept = std::fs::read_to_string(&path).unwrap();
        assert!(
            kept.contains("5%\r10%\rdone\n"),
            "the log keeps every byte: {kept:?}"
        );
        // banger's own notes are not the command's output.
        assert_eq!(
            log.tail(),
            "  | one\n  | warn\n  | two\n  | done\n  | no newline"
        );
    }

    #[test]
    fn the_error_tail_keeps_the_last_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let (progress, _drain) = ProgressHandle::collecting();
        let log = OutputLog::create(&dir.path().join("step.log"), progress).unwrap();
        for index in 0..50 {
            log.lock()
                .take(OutputStream::Stdout, format!("line {index}\n").as_bytes());
        }
        let tail = log.tail();
        assert_eq!(tail.lines().count(), ERROR_TAIL_LINES);
        assert!(
            tail.starts_with("  | line 30") && tail.ends_with("line 49"),
            "{tail}"
        );
    }

    #[test]
    fn durations_read_as_written() {
        assert_eq!(humanize(Duration::from_secs(3600)), "1h");
        assert_eq!(humanize(Duration::from_secs(1800)), "30m");
        assert_eq!(humanize(Duration::from_secs(95)), "95s");
    }
}
