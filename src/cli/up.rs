//! `banger up`, `banger down`, `banger ssh`: the project's sandbox. The work is `ops::up`;
//! the VM itself is the daemon's (`DaemonHost` asks it).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use banger::daemon::client::DaemonClient;
use banger::daemon::protocol::{ErrorKind, Progress, Request, Response};
use banger::engine::BoxFuture;
use banger::error::ErrorClass;
use banger::ops::build::{BuildEnv, BuildRequest};
use banger::ops::project::{self, Project};
use banger::ops::up::{self, HostError, UpIo, UpRequest, VmHost};
use banger::ops::vms::{UpReport, UpVm};

use super::Context;
use super::exit::{ExitStatus, UsageError};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// The Bangerfile [default: ./Bangerfile, else the nearest one in a parent directory].
    #[arg(short, long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Delete the VM afterwards, whatever happened (CI); the exit code is the command's.
    #[arg(long)]
    rm: bool,
    /// Fail (exit 1) instead of changing Bangerfile.lock.
    #[arg(long)]
    locked: bool,
    /// Like --locked, and never ask a registry what a tag points at.
    #[arg(long)]
    frozen: bool,
    /// Recreate the VM from nothing, its /root work disk included.
    #[arg(long)]
    fresh: bool,
    /// Boot a VM that up makes from scratch, neither restoring nor saving a memory snapshot
    /// (without it, under QEMU with the `user` or `none` network, a new VM starts from a
    /// snapshot of the same image, kernel and shape, saved by the first such start).
    #[arg(long)]
    cold: bool,
    /// Bring the sandbox up but do not run [up].run.
    #[arg(long)]
    no_run: bool,
    /// Seconds to wait for the guest's agent [default: 300; at most a week].
    #[arg(long, value_name = "SECONDS", value_parser = super::vm::timeout_secs())]
    timeout: Option<u64>,
    #[command(flatten)]
    remote: super::build::RemoteCacheArgs,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// The Bangerfile [default: ./Bangerfile, else the nearest one in a parent directory].
    #[arg(short, long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Delete the VM (its disks too) instead of stopping it.
    #[arg(long)]
    rm: bool,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// The Bangerfile [default: ./Bangerfile, else the nearest one in a parent directory].
    #[arg(short, long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// A command to run instead of a shell.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum WorkspaceCommand {
    /// Write a patch of what changed in the guest's workspace since the import.
    #[command(
        long_about = "Write a binary-safe patch (`git apply` form) of what changed in \
the project VM's workspace since the last `banger up` imported it: edits, new and removed \
files, and what commits made in the guest changed. Apply it on the host with `git apply FILE` \
in the workspace. Needs the workspace to be a git repository's top directory and git in the \
guest; neither the host's nor the guest's index is touched."
    )]
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The Bangerfile [default: ./Bangerfile, else the nearest one in a parent directory].
    #[arg(short, long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Write the patch to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

fn load(context: &mut Context, file: Option<&PathBuf>) -> anyhow::Result<Project> {
    let file = match file {
        Some(file) => file.clone(),
        None => {
            let cwd = std::env::current_dir().context("cannot read the current directory")?;
            project::find_bangerfile(&cwd)?
        }
    };
    let config = context.config()?.clone();
    let catalogs = context.catalogs()?;
    Ok(Project::load_with(&file, &config, catalogs)?)
}

/// The daemon as the VM host of `ops::up`.
struct DaemonHost {
    client: tokio::sync::Mutex<DaemonClient>,
}

fn refusal(kind: ErrorKind, message: String) -> HostError {
    HostError {
        class: match kind {
            ErrorKind::Environment => ErrorClass::Environment,
            ErrorKind::Failed => ErrorClass::Failed,
            _ => ErrorClass::User,
        },
        message,
    }
}

impl VmHost for DaemonHost {
    fn up<'a>(
        &'a self,
        request: UpVm,
        notes: &'a (dyn Fn(String) + Send + Sync),
    ) -> BoxFuture<'a, Result<UpReport, HostError>> {
        Box::pin(async move {
            let mut client = self.client.lock().await;
            let response = client
                .request_with_events(&Request::VmUp(request), |event| {
                    if let Ok(Progress::Note(text)) = serde_json::from_value(event) {
                        notes(text);
                    }
                })
                .await
                .map_err(|error| refusal(ErrorKind::Environment, error.to_string()))?;
            match response {
                Response::VmUp(report) => Ok(*report),
                Response::Error { kind, message } => Err(refusal(kind, message)),
                other => Err(refusal(
                    ErrorKind::Environment,
                    format!("unexpected answer from the daemon: {other:?}"),
                )),
            }
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HostError>> {
        Box::pin(async move {
            let mut client = self.client.lock().await;
            let response = client
                .request(&Request::VmDelete {
                    name: name.to_owned(),
                    force: true,
                })
                .await
                .map_err(|error| refusal(ErrorKind::Environment, error.to_string()))?;
            match response {
                Response::Deleted { .. } => Ok(()),
                Response::Error { kind, message } => Err(refusal(kind, message)),
                other => Err(refusal(
                    ErrorKind::Environment,
                    format!("unexpected answer from the daemon: {other:?}"),
                )),
            }
        })
    }
}

/// The up command's stdio: banger's own; stdin forwarded only when it is not a terminal
/// (a terminal's input is the user's, for banger, until the command has a pseudo-terminal).
struct ProcessIo {
    json: bool,
}

impl UpIo for ProcessIo {
    fn stdin(&self) -> Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>> {
        (!std::io::stdin().is_terminal()).then(|| Box::new(tokio::io::stdin()) as _)
    }

    fn stdout(&self) -> Box<dyn tokio::io::AsyncWrite + Unpin + Send> {
        // With --json, stdout is JSON Lines: the command's output goes to stderr.
        if self.json {
            Box::new(tokio::io::stderr())
        } else {
            Box::new(tokio::io::stdout())
        }
    }

    fn stderr(&self) -> Box<dyn tokio::io::AsyncWrite + Unpin + Send> {
        Box::new(tokio::io::stderr())
    }
}

pub fn up(context: &mut Context, args: &UpArgs) -> anyhow::Result<ExitStatus> {
    let project = load(context, args.file.as_ref())?;
    let request = UpRequest {
        build: BuildRequest {
            locked: args.locked,
            frozen: args.frozen,
            ..BuildRequest::default()
        },
        rm: args.rm,
        fresh: args.fresh,
        cold: args.cold,
        no_run: args.no_run,
        boot_timeout: args.timeout.map(std::time::Duration::from_secs),
        extra_file_sync: context.config()?.file_sync.clone(),
    };
    banger::ops::build::check_request(&project, &request.build)?;
    let runtime = super::runtime()?;
    let services = banger::steps::Services::from_env(&context.paths()?.state_dir.clone())?;
    let store = context.store()?;
    let state = context.state()?;
    let socket = context.paths()?.socket();
    let launcher = super::daemon::launcher(context)?;
    let client = runtime.block_on(DaemonClient::connect_or_start(&socket, &launcher))?;
    let host = Arc::new(DaemonHost {
        client: tokio::sync::Mutex::new(client),
    });
    let env = BuildEnv {
        store: &store,
        state: &state,
        services: &services,
    };
    let printer = context.printer.clone();
    let reporter = super::reporters::for_printer(&printer);
    let notes = |text: String| printer.info(&text);
    let io = Arc::new(ProcessIo { json: printer.json });
    let caches = args.remote.caches(context.config()?, &services)?;
    let outcome = super::run_cancellable(&runtime, false, |mut options| {
        caches.apply(&mut options);
        up::up(
            &env,
            project,
            &request,
            host,
            io,
            reporter.as_ref(),
            &notes,
            options,
        )
    })?;
    if printer.json {
        printer.record(
            "up",
            json!({
                "exit_code": outcome.exit_code,
                "vm": outcome.vm.name,
                "action": outcome.action.as_str(),
                "image_key": outcome.image_key,
                "workspace_bytes": outcome.workspace_bytes,
                "durations": outcome.durations,
            }),
        )?;
    }
    Ok(match outcome.exit_code {
        None | Some(0) => ExitStatus::Success,
        Some(code) => ExitStatus::Code(u8::try_from(code).unwrap_or(1)),
    })
}

pub fn down(context: &mut Context, args: &DownArgs) -> anyhow::Result<ExitStatus> {
    let project = load(context, args.file.as_ref())?;
    let name = project.spec.name.clone();
    let runtime = super::runtime()?;
    let mut session = super::vm::Session::connect(context, &runtime)?;
    let request = if args.rm {
        Request::VmDelete {
            name: name.clone(),
            force: true,
        }
    } else {
        Request::VmStop {
            name: name.clone(),
            timeout_secs: None,
        }
    };
    match session.call(context, &runtime, &request)? {
        Ok(Response::Deleted { .. }) => {
            context.printer.info(&format!("deleted VM `{name}`"));
            Ok(ExitStatus::Success)
        }
        Ok(Response::Vm(_)) => {
            context.printer.info(&format!("stopped VM `{name}`"));
            Ok(ExitStatus::Success)
        }
        Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
        Err(refused) => Ok(super::vm::refused(context, &refused)),
    }
}

pub fn ssh(context: &mut Context, args: &SshArgs) -> anyhow::Result<ExitStatus> {
    let project = load(context, args.file.as_ref())?;
    let runtime = super::runtime()?;
    let mut session = super::vm::Session::connect(context, &runtime)?;
    super::vm::ssh(
        context,
        &runtime,
        &mut session,
        &project.spec.name,
        &args.command,
    )
}

pub fn workspace(context: &mut Context, command: &WorkspaceCommand) -> anyhow::Result<ExitStatus> {
    match command {
        WorkspaceCommand::Export(args) => export(context, args),
    }
}

fn export(context: &mut Context, args: &ExportArgs) -> anyhow::Result<ExitStatus> {
    let project = load(context, args.file.as_ref())?;
    let Some(workspace) = project.spec.workspace.clone() else {
        return Err(UsageError(format!(
            "{} has no [workspace]: there is nothing to export",
            project.spec.source_file.display()
        ))
        .into());
    };
    let name = project.spec.name.clone();
    let runtime = super::runtime()?;
    let mut session = super::vm::Session::connect(context, &runtime)?;
    let vm = match super::vm::show_vm(context, &runtime, &mut session, &name)? {
        Ok(vm) => vm,
        Err(refused) => return Ok(super::vm::refused(context, &refused)),
    };
    if vm.state != "running" {
        return Err(UsageError(format!(
            "VM `{name}` is {}: `banger up --no-run` starts it",
            vm.state
        ))
        .into());
    }
    match &args.output {
        None => {
            let mut stdout = tokio::io::stdout();
            runtime.block_on(up::export_workspace(&vm, &workspace.guest, &mut stdout))?;
        }
        Some(path) => {
            let parent = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
                _ => PathBuf::from("."),
            };
            // The patch appears whole or not at all.
            let temp = tempfile::NamedTempFile::new_in(&parent)
                .with_context(|| format!("cannot write in {}", parent.display()))?;
            let file = tokio::fs::File::from_std(temp.reopen()?);
            let mut writer = tokio::io::BufWriter::new(file);
            runtime.block_on(up::export_workspace(&vm, &workspace.guest, &mut writer))?;
            let size = temp.as_file().metadata()?.len();
            temp.persist(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            if size == 0 {
                context.printer.info(&format!(
                    "no changes in {} since the import; wrote an empty {}",
                    workspace.guest,
                    path.display()
                ));
            } else {
                context.printer.info(&format!(
                    "wrote {} ({size} bytes); apply it in the workspace with `git apply {}`",
                    path.display(),
                    path.display()
                ));
            }
        }
    }
    Ok(ExitStatus::Success)
}
