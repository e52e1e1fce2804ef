//! `banger up`: the project's sandbox, as `docker compose up` runs a service.
//!
//! Lifecycle of [`up`]:
//! 1. Build the Bangerfile's images as `banger build` does ([`super::build::build`]: pins,
//!    `--locked`, recipes against the lock), which records `PROJECT/IMAGE`.
//! 2. Run the project's whole plan on an engine that has the sandbox's executors: the image
//!    steps are all stored by then, so only the never-cached `vm/*` steps run:
//!    - `vm.boot` asks the VM host (the daemon, through [`VmHost`]) for the project's VM
//!      running the sandbox image ([`crate::ops::vms::Vms::up`]: made, reused, started, or
//!      recreated around its `/root` work disk);
//!    - `vm.file-sync` copies the `[[file_sync]]` host files (and the config's) in through the
//!      agent, a missing one a warning;
//!    - `vm.workspace` imports the workspace ([`super::workspace`]) as a tar stream the
//!      guest's `tar` extracts, only what changed since the last import (the manifest of the
//!      last import is kept in the guest, under `/var/lib/banger/`, so it goes with the disk
//!      that holds the files);
//!    - `vm.up-command` runs `[up].run` in the workspace through the agent, its stdio wired to
//!      [`UpIo`], and keeps its exit status (a failing command is the outcome, not a failed
//!      step).
//! 3. With `--rm`, the VM is deleted whatever happened.
//!
//! [`export_workspace`] is `banger workspace export`: the guest's work since the last import,
//! as a patch against the import's git baseline ([`super::workspace::git_baseline`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::{BoxFuture, Executor, OutputStream, ProgressHandle, Reporter, RunOptions};
use crate::engine::{StepContext, StepError};
use crate::error::{Classify, ErrorClass};
use crate::guest::{ExecRequest, GuestChannel, GuestEndpoint, PutFileRequest};
use crate::ops::build::{BuildEnv, BuildError, BuildRequest};
use crate::ops::project::Project;
use crate::ops::vms::{CreateVm, UpAction, UpReport, UpVm, VmInfo};
use crate::ops::workspace::{self, Manifest};
use crate::plan::kinds::{
    StepParams, VmBootParams, VmFileSyncParams, VmUpCommandParams, VmWorkspaceParams,
};
use crate::spec::FileSyncSpec;

/// How long `up` waits for the guest's agent unless told otherwise.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error(transparent)]
    Project(#[from] crate::ops::project::ProjectError),
    #[error("the VM host refused: {message}")]
    Host { class: ErrorClass, message: String },
}

impl Classify for UpError {
    fn class(&self) -> ErrorClass {
        match self {
            UpError::Build(error) => error.class(),
            UpError::Engine(error) => error.class(),
            UpError::Plan(error) => error.class(),
            UpError::Project(error) => error.class(),
            UpError::Host { class, .. } => *class,
        }
    }
}

/// Why the VM host said no, with the class of its error.
#[derive(Debug, Clone)]
pub struct HostError {
    pub class: ErrorClass,
    pub message: String,
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HostError {}

/// Who owns VMs: the daemon, reached by the CLI (a trait, so `ops` does not import the
/// daemon's client). `notes` receives what the host says it does.
pub trait VmHost: Send + Sync {
    fn up<'a>(
        &'a self,
        request: UpVm,
        notes: &'a (dyn Fn(String) + Send + Sync),
    ) -> BoxFuture<'a, Result<UpReport, HostError>>;
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HostError>>;
}

/// Where the up command's input and output go.
pub trait UpIo: Send + Sync {
    /// `None`: the command reads nothing (its stdin is `/dev/null`).
    fn stdin(&self) -> Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>;
    fn stdout(&self) -> Box<dyn tokio::io::AsyncWrite + Unpin + Send>;
    fn stderr(&self) -> Box<dyn tokio::io::AsyncWrite + Unpin + Send>;
}

/// What `banger up` was asked.
#[derive(Debug, Clone, Default)]
pub struct UpRequest {
    /// `--locked`, `--frozen`, `--update`.
    pub build: BuildRequest,
    /// Delete the VM afterwards, whatever happened.
    pub rm: bool,
    /// Recreate the VM, work disk included.
    pub fresh: bool,
    /// A VM `up` makes boots from scratch instead of starting from a memory snapshot.
    pub cold: bool,
    /// Do not run `[up].run`.
    pub no_run: bool,
    /// How long to wait for the guest's agent.
    pub boot_timeout: Option<Duration>,
    /// Host files to sync besides the Bangerfile's (the config's `[[file_sync]]`).
    pub extra_file_sync: Vec<FileSyncSpec>,
}

/// What `banger up` did.
#[derive(Debug, Clone, Serialize)]
pub struct UpOutcome {
    pub vm: VmInfo,
    pub action: UpAction,
    /// The up command's exit code (128 + n for a signal); `None` when none ran.
    pub exit_code: Option<i32>,
    /// Definition key of the sandbox image.
    pub image_key: String,
    /// Bytes of file data the workspace import sent.
    pub workspace_bytes: u64,
    pub durations: Durations,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Durations {
    pub build_ms: u64,
    pub boot_ms: u64,
    pub file_sync_ms: u64,
    pub workspace_ms: u64,
    pub run_ms: u64,
    pub total_ms: u64,
}

/// What the sandbox steps of one `up` share.
#[derive(Debug, Default)]
struct Shared {
    report: Option<UpReport>,
    exit_code: Option<i32>,
    workspace_bytes: u64,
    durations: Durations,
}

/// Brings the project's sandbox up (the lifecycle in the module note).
#[allow(clippy::too_many_arguments)]
pub async fn up(
    env: &BuildEnv<'_>,
    project: Project,
    request: &UpRequest,
    host: Arc<dyn VmHost>,
    io: Arc<dyn UpIo>,
    reporter: &dyn Reporter,
    notes: &(dyn Fn(String) + Sync),
    options: RunOptions,
) -> Result<UpOutcome, UpError> {
    let started = Instant::now();
    let outcome = super::build::build(
        env,
        project.clone(),
        &request.build,
        reporter,
        notes,
        options.clone(),
    )
    .await?;
    let build_ms = started.elapsed().as_millis() as u64;
    // The build may have written the lock: plan with what it holds now.
    let mut project = project;
    project.lock = crate::lock::Lock::load(&project.lock_path())
        .map_err(crate::ops::project::ProjectError::Lock)?;
    let plan = project.plan()?;
    let sandbox = &project.spec.sandbox_image;
    let image_name = format!("{}/{sandbox}", project.spec.name);
    let image_key = outcome
        .built
        .iter()
        .find(|built| &built.name == sandbox)
        .map(|built| built.step_key.to_hex())
        .unwrap_or_default();
    let kernel = project
        .spec
        .image(sandbox)
        .map(|image| image.kernel.clone());
    let shared = Arc::new(Mutex::new(Shared::default()));
    let boot_timeout = request.boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT);
    let engine = crate::steps::with_executors(
        crate::engine::Engine::builder(env.store.clone()),
        env.services,
    )
    .executor(
        crate::steps::VM_BOOT.name,
        VmBoot {
            host: Arc::clone(&host),
            name: project.spec.name.clone(),
            image: image_name,
            kernel,
            fresh: request.fresh,
            cold: request.cold,
            timeout: boot_timeout,
            shared: Arc::clone(&shared),
        },
    )
    .executor(
        crate::steps::VM_FILE_SYNC.name,
        FileSync {
            extra: request.extra_file_sync.clone(),
            shared: Arc::clone(&shared),
        },
    )
    .executor(
        crate::steps::VM_WORKSPACE.name,
        Workspace {
            project_dir: project.spec.project_dir.clone(),
            shared: Arc::clone(&shared),
        },
    )
    .executor(
        crate::steps::VM_UP_COMMAND.name,
        UpCommand {
            io,
            skip: request.no_run,
            workspace: project
                .spec
                .workspace
                .as_ref()
                .map(|workspace| workspace.guest.clone()),
            shared: Arc::clone(&shared),
        },
    )
    .build();
    let project_id = crate::ops::project::project_id(&project.spec);
    let ran = engine.run(&plan, &project_id, reporter, options).await;
    let shared = std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner()));
    let removal = match (&shared.report, request.rm) {
        (Some(report), true) => Some(host.delete(&report.vm.name).await),
        _ => None,
    };
    ran?;
    if let Some(Err(error)) = removal {
        notes(format!("warning: could not delete the VM: {error}"));
    }
    let report = shared.report.ok_or_else(|| UpError::Host {
        class: ErrorClass::Environment,
        message: "the sandbox VM was never made".into(),
    })?;
    let mut durations = shared.durations;
    durations.build_ms = build_ms;
    durations.total_ms = started.elapsed().as_millis() as u64;
    Ok(UpOutcome {
        vm: report.vm,
        action: report.action,
        exit_code: shared.exit_code,
        image_key,
        workspace_bytes: shared.workspace_bytes,
        durations,
    })
}

/// The report `vm.boot` wrote (`vm.json`), as a step downstream reads it.
fn boot_report(ctx: &StepContext) -> Result<UpReport, StepError> {
    let path = ctx.input_file("vm", VM_OUTPUT)?;
    let text = std::fs::read(&path)
        .map_err(|error| StepError::with_source("cannot read the VM's report", error))?;
    serde_json::from_slice(&text)
        .map_err(|error| StepError::with_source("the VM's report is not readable", error))
}

/// `vm.boot`'s output: the [`UpReport`] as JSON; the steps after it pass it on (each reads
/// its `vm` input, the step before it).
const VM_OUTPUT: &str = "vm.json";

/// Writes `report` as this step's `vm.json`.
fn pass_on(ctx: &StepContext, report: &UpReport) -> Result<(), StepError> {
    let json = serde_json::to_vec(report)
        .map_err(|error| StepError::with_source("cannot write the VM's report", error))?;
    std::fs::write(ctx.output(VM_OUTPUT)?, json)
        .map_err(|error| StepError::with_source("cannot write the VM's report", error))
}

/// A channel to the VM's agent.
async fn agent(vm: &VmInfo) -> Result<GuestChannel, StepError> {
    let endpoint: GuestEndpoint = vm
        .agent
        .as_ref()
        .ok_or_else(|| StepError::new(format!("VM `{}` reports no agent address", vm.name)))?
        .endpoint();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (channel, _) = endpoint.wait_ready(deadline).await.map_err(|error| {
        StepError::with_source(format!("cannot reach the agent of VM `{}`", vm.name), error)
    })?;
    Ok(channel)
}

struct VmBoot {
    host: Arc<dyn VmHost>,
    name: String,
    image: String,
    kernel: Option<String>,
    fresh: bool,
    cold: bool,
    timeout: Duration,
    shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for VmBoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBoot").field("name", &self.name).finish()
    }
}

impl Executor for VmBoot {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let started = Instant::now();
            let params: VmBootParams = crate::steps::params(ctx)?;
            // Refused here too, not only by the VM host: before the daemon is asked anything.
            crate::vm::backend::check_network(params.shape.network).map_err(|error| {
                StepError::with_source(
                    format!("[vm] network = \"{}\"", params.shape.network),
                    error,
                )
            })?;
            let request = UpVm {
                create: CreateVm {
                    name: Some(self.name.clone()),
                    image: Some(self.image.clone()),
                    kernel: self.kernel.clone(),
                    backend: None,
                    vcpus: Some(params.shape.vcpu),
                    memory_mib: Some(params.shape.memory.bytes() >> 20),
                    disk_bytes: Some(params.shape.disk.bytes()),
                    network: Some(params.shape.network),
                    ports: params.ports.clone(),
                    start: true,
                    timeout_secs: Some(self.timeout.as_secs()),
                    remove_if_abandoned: false,
                    // Only a VM that `up` makes starts warm; one it reuses or recreates
                    // boots (a kept work disk is not the snapshot's).
                    warm_start: !self.cold,
                },
                fresh: self.fresh,
            };
            let progress = ctx.progress_handle();
            let notes = move |text: String| progress.output_line(OutputStream::Stderr, text);
            let report =
                self.host.up(request, &notes).await.map_err(|error| {
                    StepError::with_source("the sandbox VM did not come up", error)
                })?;
            ctx.progress_handle().output_line(
                OutputStream::Stderr,
                format!("VM `{}` {}", report.vm.name, report.action.as_str()),
            );
            pass_on(ctx, &report)?;
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.report = Some(report);
            shared.durations.boot_ms = started.elapsed().as_millis() as u64;
            Ok(())
        })
    }
}

#[derive(Debug)]
struct FileSync {
    extra: Vec<FileSyncSpec>,
    shared: Arc<Mutex<Shared>>,
}

impl Executor for FileSync {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let started = Instant::now();
            let params = VmFileSyncParams::from_params(&ctx.params).map_err(|error| {
                StepError::with_source("step vm/file-sync has unreadable parameters", error)
            })?;
            let report = boot_report(ctx)?;
            let mut channel = agent(&report.vm).await?;
            let progress = ctx.progress_handle();
            for entry in params.entries.iter().chain(&self.extra) {
                sync_entry(&mut channel, entry, &progress).await?;
            }
            pass_on(ctx, &report)?;
            self.shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .durations
                .file_sync_ms = started.elapsed().as_millis() as u64;
            Ok(())
        })
    }
}

/// `~/x` on the host.
fn expand_home(path: &str) -> PathBuf {
    match (
        path.strip_prefix("~/"),
        crate::env::var_path(crate::env::HOME),
    ) {
        (Some(rest), Some(home)) => home.join(rest),
        _ => PathBuf::from(path),
    }
}

/// Copies one host file (or directory, recursively) into the guest, root-owned; a missing
/// host file is a warning line.
async fn sync_entry(
    channel: &mut GuestChannel,
    entry: &FileSyncSpec,
    progress: &ProgressHandle,
) -> Result<(), StepError> {
    let host = expand_home(&entry.host);
    let metadata = match std::fs::metadata(&host) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            progress.warning(format!("{} does not exist; not synced", host.display()));
            return Ok(());
        }
        Err(error) => {
            return Err(StepError::with_source(
                format!("cannot read {}", host.display()),
                error,
            ));
        }
    };
    let mut pending = vec![(host, entry.guest.clone(), entry.mode, metadata)];
    while let Some((host, guest, mode, metadata)) = pending.pop() {
        use std::os::unix::fs::PermissionsExt;
        if metadata.is_dir() {
            let entries = std::fs::read_dir(&host).map_err(|error| {
                StepError::with_source(format!("cannot read {}", host.display()), error)
            })?;
            for child in entries.flatten() {
                let Ok(child_metadata) = std::fs::metadata(child.path()) else {
                    continue;
                };
                pending.push((
                    child.path(),
                    format!("{guest}/{}", child.file_name().to_string_lossy()),
                    None,
                    child_metadata,
                ));
            }
            continue;
        }
        if !metadata.is_file() {
            continue;
        }
        let file = tokio::fs::File::open(&host).await.map_err(|error| {
            StepError::with_source(format!("cannot read {}", host.display()), error)
        })?;
        let request = PutFileRequest {
            path: guest.clone(),
            mode: mode.unwrap_or(metadata.permissions().mode() & 0o7777),
            uid: 0,
            gid: 0,
            size: metadata.len(),
            create_parents: true,
        };
        channel.put_file(&request, file).await.map_err(|error| {
            StepError::with_source(
                format!("cannot copy {} to {guest} in the guest", host.display()),
                error,
            )
        })?;
        progress.output_line(
            OutputStream::Stderr,
            format!("synced {} -> {guest}", host.display()),
        );
    }
    Ok(())
}

#[derive(Debug)]
struct Workspace {
    project_dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
}

/// Where the guest keeps what banger knows of the imports into `guest`.
fn record_stem(guest: &str) -> String {
    format!(
        "/var/lib/banger/workspaces/{}",
        &blake3::hash(guest.as_bytes()).to_hex()[..16]
    )
}

/// The manifest of the last import into `guest`.
fn manifest_path(guest: &str) -> String {
    format!("{}.json", record_stem(guest))
}

/// The git objects of the last import's baseline that the imported repository lacks: an
/// alternate object directory for `banger workspace export`, outside the guest's `.git`.
fn baseline_objects_path(guest: &str) -> String {
    format!("{}.objects", record_stem(guest))
}

/// Replaces the guest's baseline objects for `guest` with `baseline`'s.
async fn send_baseline_objects(
    ctx: &StepContext,
    channel: &mut GuestChannel,
    baseline: &workspace::GitBaseline,
    guest: &str,
) -> Result<(), StepError> {
    let spool = ctx.work_dir()?.join("baseline-objects.tar");
    tokio::task::spawn_blocking({
        let (spool, objects) = (spool.clone(), baseline.objects.clone());
        move || -> std::io::Result<()> {
            let mut builder =
                tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(&spool)?));
            builder.append_dir_all(".", &objects)?;
            builder.into_inner()?.into_inner()?.sync_all()
        }
    })
    .await
    .map_err(|error| StepError::new(format!("packing the git baseline panicked: {error}")))?
    .map_err(|error| StepError::with_source("cannot pack the workspace's git baseline", error))?;
    let directory = baseline_objects_path(guest);
    run_checked(
        channel,
        ExecRequest::argv([
            "sh",
            "-c",
            "rm -rf \"$1\" && mkdir -p \"$1\"",
            "sh",
            &directory,
        ]),
        &[],
    )
    .await?;
    let tar = tokio::fs::File::open(&spool)
        .await
        .map_err(|error| StepError::with_source("cannot read the packed git baseline", error))?;
    let mut extract =
        ExecRequest::argv(["tar", "-x", "-f", "-", "-C", directory.as_str()]).with_stdin();
    extract.cwd = Some("/".to_owned());
    run_checked_stream(channel, extract, tar).await
}

impl Executor for Workspace {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let started = Instant::now();
            let params = VmWorkspaceParams::from_params(&ctx.params).map_err(|error| {
                StepError::with_source("step vm/workspace has unreadable parameters", error)
            })?;
            let report = boot_report(ctx)?;
            let host = self.project_dir.join(&params.host);
            let (mut manifest, baseline) = tokio::task::spawn_blocking({
                let host = host.clone();
                move || {
                    let manifest = workspace::collect(&host)?;
                    // Export needs it; the import does not: a failure is a warning.
                    let baseline = workspace::git_baseline(&host);
                    Ok::<_, workspace::WorkspaceError>((manifest, baseline))
                }
            })
            .await
            .map_err(|error| StepError::new(format!("listing the workspace panicked: {error}")))?
            .map_err(|error| StepError::with_source("cannot list the workspace", error))?;
            let baseline = baseline.unwrap_or_else(|error| {
                ctx.progress_handle().output_line(
                    OutputStream::Stderr,
                    format!(
                        "warning: `banger workspace export` will not work for this import: {}",
                        crate::error::error_chain(&error)
                    ),
                );
                None
            });
            let mut channel = agent(&report.vm).await?;
            let record = manifest_path(&params.guest);
            let mut previous_bytes = Vec::new();
            let previous = match channel.get_file(&record, &mut previous_bytes).await {
                Ok(_) => serde_json::from_slice::<Manifest>(&previous_bytes).unwrap_or_default(),
                Err(_) => Manifest::default(),
            };
            let changes = manifest.changes(&previous);
            let bytes = manifest.bytes_of(&changes.send);
            let progress = ctx.progress_handle();
            progress.output_line(
                OutputStream::Stderr,
                format!(
                    "workspace {} -> {}: {} of {} entries changed ({} bytes), {} removed",
                    host.display(),
                    params.guest,
                    changes.send.len(),
                    manifest.entries.len(),
                    bytes,
                    changes.remove.len()
                ),
            );
            let guest = params.guest.clone();
            run_checked(
                &mut channel,
                ExecRequest::argv(["mkdir", "-p", guest.as_str()]),
                &[],
            )
            .await?;
            if !changes.send.is_empty() {
                let work = ctx.work_dir()?;
                let spool = work.join("workspace.tar");
                tokio::task::spawn_blocking({
                    let (host, spool, manifest, send) = (
                        host.clone(),
                        spool.clone(),
                        manifest.clone(),
                        changes.send.clone(),
                    );
                    move || {
                        let file = std::fs::File::create(&spool)
                            .map_err(crate::ops::workspace::WorkspaceError::Write)?;
                        workspace::write_tar(&host, &manifest, &send, std::io::BufWriter::new(file))
                    }
                })
                .await
                .map_err(|error| {
                    StepError::new(format!("packing the workspace panicked: {error}"))
                })?
                .map_err(|error| StepError::with_source("cannot pack the workspace", error))?;
                let tar = tokio::fs::File::open(&spool).await.map_err(|error| {
                    StepError::with_source("cannot read the packed workspace", error)
                })?;
                let mut extract =
                    ExecRequest::argv(["tar", "-x", "-f", "-", "-C", guest.as_str()]).with_stdin();
                extract.cwd = Some("/".to_owned());
                run_checked_stream(&mut channel, extract, tar).await?;
            }
            for chunk in changes.remove.chunks(256) {
                let mut argv = vec!["rm".to_owned(), "-rf".to_owned(), "--".to_owned()];
                argv.extend(chunk.iter().map(|path| path.to_string_lossy().into_owned()));
                let mut remove = ExecRequest::argv(argv);
                remove.cwd = Some(guest.clone());
                run_checked(&mut channel, remove, &[]).await?;
            }
            if let Some(baseline) = &baseline {
                if previous.git_baseline.as_deref() != Some(baseline.tree.as_str()) {
                    send_baseline_objects(ctx, &mut channel, baseline, &params.guest).await?;
                }
                manifest.git_baseline = Some(baseline.tree.clone());
            }
            let json = serde_json::to_vec(&manifest)
                .map_err(|error| StepError::with_source("cannot record the import", error))?;
            let request = PutFileRequest {
                path: record,
                mode: 0o600,
                uid: 0,
                gid: 0,
                size: json.len() as u64,
                create_parents: true,
            };
            channel
                .put_file(&request, &json[..])
                .await
                .map_err(|error| StepError::with_source("cannot record the import", error))?;
            pass_on(ctx, &report)?;
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.workspace_bytes = bytes;
            shared.durations.workspace_ms = started.elapsed().as_millis() as u64;
            Ok(())
        })
    }
}

/// Runs `request` with `stdin`; fails with its stderr unless it exits 0.
async fn run_checked(
    channel: &mut GuestChannel,
    request: ExecRequest,
    stdin: &[u8],
) -> Result<(), StepError> {
    let mut request = request;
    if !stdin.is_empty() {
        request = request.with_stdin();
    }
    run_checked_stream(channel, request, stdin).await
}

async fn run_checked_stream(
    channel: &mut GuestChannel,
    request: ExecRequest,
    stdin: impl tokio::io::AsyncRead + Unpin,
) -> Result<(), StepError> {
    let mut stderr = Vec::new();
    let status = channel
        .exec(&request, stdin, tokio::io::sink(), &mut stderr)
        .await
        .map_err(|error| StepError::with_source("the guest agent failed", error))?;
    if status != crate::guest::ExitStatus::Code(0) {
        let argv = request
            .argv
            .clone()
            .unwrap_or_default()
            .into_iter()
            .take(4)
            .collect::<Vec<_>>()
            .join(" ");
        return Err(StepError::new(format!(
            "`{argv}` in the guest failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        )));
    }
    Ok(())
}

struct UpCommand {
    io: Arc<dyn UpIo>,
    skip: bool,
    workspace: Option<String>,
    shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for UpCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpCommand")
            .field("skip", &self.skip)
            .finish()
    }
}

impl Executor for UpCommand {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            if self.skip {
                return Ok(());
            }
            let started = Instant::now();
            let params = VmUpCommandParams::from_params(&ctx.params).map_err(|error| {
                StepError::with_source("step vm/up has unreadable parameters", error)
            })?;
            let report = boot_report(ctx)?;
            let mut channel = agent(&report.vm).await?;
            let mut request = ExecRequest::shell(params.run.clone())
                .with_env("HOME", "/root")
                .with_env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                );
            request.cwd = Some(self.workspace.clone().unwrap_or_else(|| "/root".into()));
            let stdin = self.io.stdin();
            let status = match stdin {
                Some(stdin) => {
                    request = request.with_stdin();
                    channel
                        .exec(&request, stdin, self.io.stdout(), self.io.stderr())
                        .await
                }
                None => {
                    channel
                        .exec(
                            &request,
                            tokio::io::empty(),
                            self.io.stdout(),
                            self.io.stderr(),
                        )
                        .await
                }
            }
            .map_err(|error| {
                StepError::with_source(format!("running `{}` in the sandbox", params.run), error)
            })?;
            let code = match status {
                crate::guest::ExitStatus::Code(code) => code,
                crate::guest::ExitStatus::Signal(signal) => 128 + signal,
            };
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.exit_code = Some(code);
            shared.durations.run_ms = started.elapsed().as_millis() as u64;
            Ok(())
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("VM `{vm}` reports no agent address")]
    NoAgent { vm: String },
    #[error("cannot reach the agent of VM `{vm}`")]
    Agent {
        vm: String,
        #[source]
        source: crate::guest::GuestError,
    },
    #[error("nothing was imported into {guest} in VM `{vm}` yet: run `banger up` first")]
    NeverImported { vm: String, guest: String },
    #[error(
        "the import into {guest} has no git baseline: workspace export needs the workspace to \
         be a git repository's top directory (and the import to be made by this banger)"
    )]
    NoBaseline { guest: String },
    #[error(
        "git is not installed in VM `{vm}`: workspace export runs git in the guest (add it to \
         the image, e.g. a provision step `apt-get install -y git`)"
    )]
    NoGit { vm: String },
    #[error("computing the patch in VM `{vm}` failed ({status}): {stderr}")]
    Guest {
        vm: String,
        status: String,
        stderr: String,
    },
    #[error("cannot write the patch")]
    Write(#[source] std::io::Error),
}

impl Classify for ExportError {
    fn class(&self) -> ErrorClass {
        match self {
            ExportError::NeverImported { .. }
            | ExportError::NoBaseline { .. }
            | ExportError::NoGit { .. } => ErrorClass::User,
            _ => ErrorClass::Environment,
        }
    }
}

/// The exit code the export script gives when the guest has no git.
const EXPORT_NO_GIT: i32 = 64;

/// Computes the patch in the guest: the work tree (tracked files and untracked ones that are
/// not ignored, as `collect` imports them) is written as a tree through a throwaway index and
/// a throwaway object directory, with the repository's objects and the import's baseline
/// objects as alternates, then diffed against the baseline tree. Nothing of the guest's
/// repository is written. Configuration that would change the patch's form (prefixes,
/// colour, external diff drivers, renames) is overridden so `git apply` takes it.
const EXPORT_SCRIPT: &str = r#"set -eu
ws=$1 base=$2 alt=$3
command -v git >/dev/null 2>&1 || exit 64
cd "$ws"
g() { git -c safe.directory='*' -c core.quotepath=false "$@"; }
objects=$(g rev-parse --git-path objects)
index=$(g rev-parse --git-path index)
case $objects in /*) ;; *) objects=$ws/$objects ;; esac
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/objects"
if [ -f "$index" ]; then cp "$index" "$scratch/index"; fi
export GIT_OPTIONAL_LOCKS=0 GIT_INDEX_FILE="$scratch/index" GIT_OBJECT_DIRECTORY="$scratch/objects"
export GIT_ALTERNATE_OBJECT_DIRECTORIES="$objects:$alt"
g add --all -- . >&2
tree=$(g write-tree)
g -c diff.noprefix=false -c diff.mnemonicPrefix=false -c diff.relative=false \
  diff --binary --full-index --no-color --no-ext-diff --no-textconv --no-renames \
  "$base" "$tree" --
"#;

/// `banger workspace export`: writes to `out` a binary patch (`git apply` form, paths from
/// the repository's top) of what changed in the guest's workspace `guest` since the last
/// import: edits, new and removed files, and what commits made in the guest changed.
pub async fn export_workspace(
    vm: &VmInfo,
    guest: &str,
    out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
) -> Result<(), ExportError> {
    let endpoint: GuestEndpoint = vm
        .agent
        .as_ref()
        .ok_or_else(|| ExportError::NoAgent {
            vm: vm.name.clone(),
        })?
        .endpoint();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut channel, _) =
        endpoint
            .wait_ready(deadline)
            .await
            .map_err(|source| ExportError::Agent {
                vm: vm.name.clone(),
                source,
            })?;
    let mut record = Vec::new();
    if channel
        .get_file(&manifest_path(guest), &mut record)
        .await
        .is_err()
    {
        return Err(ExportError::NeverImported {
            vm: vm.name.clone(),
            guest: guest.to_owned(),
        });
    }
    let manifest: Manifest = serde_json::from_slice(&record).unwrap_or_default();
    let base = manifest
        .git_baseline
        .ok_or_else(|| ExportError::NoBaseline {
            guest: guest.to_owned(),
        })?;
    let objects = baseline_objects_path(guest);
    let mut request = ExecRequest::argv(["sh", "-c", EXPORT_SCRIPT, "sh", guest, &base, &objects])
        .with_env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .with_env("HOME", "/root");
    request.cwd = Some("/".to_owned());
    let mut stderr = Vec::new();
    let status = channel
        .exec(&request, tokio::io::empty(), &mut *out, &mut stderr)
        .await
        .map_err(|source| ExportError::Agent {
            vm: vm.name.clone(),
            source,
        })?;
    match status {
        crate::guest::ExitStatus::Code(0) => {}
        crate::guest::ExitStatus::Code(EXPORT_NO_GIT) => {
            return Err(ExportError::NoGit {
                vm: vm.name.clone(),
            });
        }
        other => {
            return Err(ExportError::Guest {
                vm: vm.name.clone(),
                status: other.to_string(),
                stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
            });
        }
    }
    tokio::io::AsyncWriteExt::flush(out)
        .await
        .map_err(ExportError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_records_are_per_guest_path() {
        assert_ne!(manifest_path("/root/project"), manifest_path("/srv/app"));
        assert!(manifest_path("/root/project").starts_with("/var/lib/banger/workspaces/"));
    }

    #[test]
    fn home_paths_expand_on_the_host() {
        let expanded = expand_home("~/.gitconfig");
        assert!(expanded.ends_with(".gitconfig"));
        assert_eq!(expand_home("/etc/x"), PathBuf::from("/etc/x"));
    }
}
