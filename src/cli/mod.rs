//! The command line: argument parsing, output, exit codes. The only module (with `main`) that
//! uses `anyhow` and `indicatif`.
//!
//! Lifecycle of one invocation:
//! 1. clap parses the arguments ([`Cli`]); usage errors exit with [`ExitStatus::UserError`].
//! 2. The [`Printer`] is built from `--json`, `-v`/`-q`, `NO_COLOR`, `BANGER_NO_PROGRESS` and
//!    whether stdout/stderr are terminals.
//! 3. [`Context`] resolves paths and reads the config, lazily: `--help` and `cache du` on a
//!    fresh machine create nothing.
//! 4. The command runs and returns `anyhow::Result<ExitStatus>`; [`exit::classify`] maps errors
//!    to exit codes (documented in `docs/cli.md`), printing each error once.

mod build;
mod cache;
pub mod complete;
mod copy;
mod daemon;
mod doctor;
mod exit;
mod graph;
mod image;
mod kernel;
mod logging;
mod man;
mod network;
mod printer;
mod reporters;
mod session;
mod ssh_config;
mod terminal;
mod up;
mod vm;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use banger::config::Config;
use banger::engine::RunOptions;
use banger::paths::Paths;
use banger::state::State;
use banger::store::Store;

pub use exit::ExitStatus;
use printer::{Printer, Verbosity};

/// One-command microVM sandboxes, built from a content-addressed graph of cached steps.
#[derive(Debug, Parser)]
#[command(
    name = "banger",
    version,
    about,
    long_about = "banger builds microVM sandboxes from a Bangerfile. Every operation is a graph \
of steps (fetch, flatten, mkfs, provision, boot); each step's output is stored by a key over its \
definition and inputs, so nothing is done twice and a change re-runs only what it affects.",
    after_help = "Exit status: 0 success, 1 bad input or a failed step, 2 banger could not work \
(environment or internal error), 130 interrupted; `vm exec` and `vm run -- CMD` exit with the \
guest command's status, or 125 (banger failed), 126 (not executable), 127 (not found)."
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Print machine-readable JSON Lines on stdout ({"type": ..., "data": ...} per line).
    #[arg(long, global = true)]
    json: bool,
    /// More detail on stderr (cached steps, step starts, why a VM restores or boots);
    /// -v/-vv/-vvv also log banger's
    /// events at info/debug/trace (`BANGER_LOG` sets the filter itself).
    #[arg(short, long, global = true, conflicts_with = "quiet", action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run, create, stop and delete microVMs (`vm run` boots one and opens a shell).
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Show a Bangerfile's step graph with each step's cache status, or why a step would run.
    #[command(
        long_about = "Show a Bangerfile's step graph with each step's cache status.

Each step shows its kind, a short key and a status:
  cached           its output is stored under its definition key: it will not run
  will run         nothing stored matches it
  cutoff possible  unchanged since the last run except for inputs that will re-run; if those \
rebuild to identical bytes, it will not run either
  never cached     boots, user commands and unpinned tags run every time
  not needed       only feeds a cached step, so it is not even looked at

--why STEP explains, field by field, what changed since the project's last run: parameters \
(old → new), step version, inputs (explained in turn), or an output that is missing or was \
evicted. Nothing is built and the store is only read."
    )]
    Graph(graph::GraphArgs),
    /// Build the Bangerfile's images: pin OCI references, run what is not cached, record them.
    #[command(
        long_about = "Build the Bangerfile's images: pin OCI references in Bangerfile.lock, \
run every step that is not already stored, and record each image as PROJECT/IMAGE (see `banger \
image list`). Cached steps do not run; with everything cached nothing runs at all. Progress goes to \
stderr; the built images are listed on stdout."
    )]
    Build(build::BuildArgs),
    /// Build, boot or reuse the project's sandbox VM, and run its [up] command.
    #[command(
        long_about = "Bring the project's sandbox up, as `docker compose up` does a \
service: build the Bangerfile's images (what is not cached), then create the project's VM \
(named by [project].name) or reuse it when its image is unchanged (starting it if stopped), \
or recreate it when the image changed, keeping its /root work disk (--fresh drops it too). \
Then copy the [[file_sync]] host files in, import the workspace (only what changed since the \
last import; in git: tracked and untracked-not-ignored files as they are, and .git), and run \
[up].run in it; banger exits with its exit code. `banger up --rm --locked` is the CI entry \
point: the VM is deleted afterwards, and a lock that would change is an error."
    )]
    Up(up::UpArgs),
    /// Stop the project's VM (--rm: delete it).
    Down(up::DownArgs),
    /// Open a shell in the project's VM (or run `-- CMD`).
    Ssh(up::SshArgs),
    /// The project VM's workspace: export what changed in it as a patch.
    #[command(subcommand)]
    Workspace(up::WorkspaceCommand),
    /// Pull, import, list and remove images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Pull, import, list and remove kernels; boot-test one (`kernel test`).
    #[command(subcommand)]
    Kernel(kernel::KernelCommand),
    /// Make `ssh NAME.vm` reach banger's VMs through your own ssh (install or uninstall).
    #[command(subcommand)]
    SshConfig(ssh_config::SshConfigCommand),
    /// Print the shell completion script: bash, zsh or fish, with live names.
    #[command(
        long_about = "Print the completion script for SHELL. It completes subcommands and \
flags, and the names of the VMs, images and kernels that exist when you press Tab. Install it \
with, for bash: `banger completion bash > ~/.local/share/bash-completion/completions/banger`; \
zsh: `banger completion zsh > \"${fpath[1]}/_banger\"`; fish: `banger completion fish > \
~/.config/fish/completions/banger.fish`."
    )]
    Completion(complete::CompletionArgs),
    /// Write manual pages (banger.1 and one per command) into a directory.
    Man(man::ManArgs),
    /// banger's bridge for `--network tap` VMs: show it, or remove it (`down`).
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Report what this host can do: accelerator (KVM or TCG, and why), QEMU, vsock, tools.
    Doctor,
    /// Inspect and trim the step store (~/.cache/banger/store).
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// The background process that owns VMs (started on demand).
    #[command(
        subcommand,
        long_about = "The daemon is one background process per user that owns the VMs (and \
builds what a VM it makes needs), so VMs outlive the commands that start them. Commands that need it \
start it by themselves (`banger daemon run`, detached; its log is \
~/.local/state/banger/logs/daemon.log). It listens on $XDG_RUNTIME_DIR/banger/banger.sock \
(/run/banger for root, /tmp/banger-UID for others without XDG_RUNTIME_DIR), in a directory \
only your user may use: banger refuses one that another user owns or can write."
    )]
    Daemon(daemon::DaemonCommand),
}

/// Lazily resolved environment of a command.
#[derive(Debug)]
pub struct Context {
    pub printer: Printer,
    /// How many `-v`s: the daemon's log filter when `BANGER_LOG` is unset.
    pub verbose: u8,
    paths: Option<Paths>,
    config: Option<Config>,
}

impl Context {
    pub fn paths(&mut self) -> anyhow::Result<&Paths> {
        if self.paths.is_none() {
            self.paths = Some(Paths::from_env()?);
        }
        Ok(self.paths.as_ref().expect("just set"))
    }

    pub fn config(&mut self) -> anyhow::Result<&Config> {
        if self.config.is_none() {
            let file = self.paths()?.config_file.clone();
            self.config = Some(Config::load(&file)?);
        }
        Ok(self.config.as_ref().expect("just set"))
    }

    /// The catalogs in force (URL catalogs fetched, with the last good copy as fallback).
    pub fn catalogs(&mut self) -> anyhow::Result<banger::catalog::Catalogs> {
        let cache_dir = self.paths()?.cache_dir.clone();
        let config = self.config()?.clone();
        let printer = self.printer.clone();
        Ok(config.catalogs_with(Some(&cache_dir), &|warning| printer.warn(warning))?)
    }

    /// Opens (creating if needed) the step store.
    pub fn store(&mut self) -> anyhow::Result<Store> {
        let dir = self.paths()?.store_dir();
        Ok(Store::open(dir)?)
    }

    /// Opens (creating if needed) the state database.
    pub fn state(&mut self) -> anyhow::Result<State> {
        let dir = self.paths()?.state_dir.clone();
        Ok(State::open(&dir)?)
    }

    /// The store only if it already exists: read-only commands must not create it.
    pub fn existing_store(&mut self) -> anyhow::Result<Option<Store>> {
        let dir: PathBuf = self.paths()?.store_dir();
        if dir.exists() {
            Ok(Some(Store::open(dir)?))
        } else {
            Ok(None)
        }
    }
}

/// Left-aligned columns under a header, two spaces apart; a column of sizes (`SIZE`) is
/// right-aligned.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|title| title.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row = header.map(str::to_owned);
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (index, cell) in row.iter().enumerate() {
            let pad = widths[index] - cell.chars().count();
            if index > 0 {
                line.push_str("  ");
            }
            if header[index] == "SIZE" {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The async runtime commands that build run on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// An engine over a store with every executor this build has (the daemon's too).
pub use banger::steps::engine;

/// Runs `work` with Ctrl-C and SIGTERM wired to its cancellation: the first one cancels
/// running steps (their scratch is removed, builder VMs are stopped, nothing is recorded)
/// and the command exits with 130.
pub fn run_cancellable<F, T, E>(
    runtime: &tokio::runtime::Runtime,
    keep_going: bool,
    work: impl FnOnce(RunOptions) -> F,
) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    let options = RunOptions {
        keep_going,
        ..RunOptions::default()
    };
    let cancel = options.cancel.clone();
    runtime.block_on(async {
        let watcher = tokio::spawn(async move {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let terminated = async {
                match terminate.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                interrupted = tokio::signal::ctrl_c() => if interrupted.is_ok() {
                    cancel.cancel();
                },
                _ = terminated => cancel.cancel(),
            }
        });
        let result = work(options).await;
        watcher.abort();
        result
    })
}

/// Runs the CLI and returns the process exit status. Only `main` exits.
pub fn run() -> ExitStatus {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let status = exit::clap_error(&error);
            let arguments: Vec<String> = std::env::args().skip(1).collect();
            let status = match status {
                ExitStatus::UserError if vm::runs_a_guest_command(&arguments) => {
                    ExitStatus::Code(vm::BANGER_FAILED)
                }
                other => other,
            };
            if status != ExitStatus::Success && arguments.iter().any(|word| word == "--json") {
                let printer = Printer::new(Verbosity::Normal, true);
                let rendered = error.to_string();
                let message = rendered.lines().next().unwrap_or_default();
                let _ = printer.record(
                    "error",
                    serde_json::json!({
                        "message": message.trim_start_matches("error: "),
                        "causes": [],
                        "exit_code": status.code(),
                    }),
                );
            }
            return status;
        }
    };
    let verbosity = if cli.global.quiet {
        Verbosity::Quiet
    } else if cli.global.verbose > 0 {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    };
    let printer = Printer::new(verbosity, cli.global.json);
    if !matches!(cli.command, Command::Daemon(daemon::DaemonCommand::Run)) {
        logging::init_cli(cli.global.verbose, printer.color_stderr);
    }
    let mut context = Context {
        printer: printer.clone(),
        verbose: cli.global.verbose,
        paths: None,
        config: None,
    };
    let result = match cli.command {
        Command::Graph(args) => graph::run(&mut context, &args),
        Command::Cache(command) => cache::run(&mut context, &command),
        Command::Build(args) => build::run(&mut context, &args),
        Command::Up(args) => up::up(&mut context, &args),
        Command::Down(args) => up::down(&mut context, &args),
        Command::Ssh(args) => up::ssh(&mut context, &args),
        Command::Workspace(command) => up::workspace(&mut context, &command),
        Command::Image(command) => image::run(&mut context, &command),
        Command::Doctor => doctor::run(&mut context),
        Command::SshConfig(command) => ssh_config::run(&mut context, &command),
        Command::Network(command) => network::run(&mut context, &command),
        Command::Kernel(command) => kernel::run(&mut context, &command),
        Command::Daemon(command) => daemon::run(&mut context, &command),
        Command::Vm(command) => vm::run(&mut context, &command),
        Command::Completion(args) => complete::run(&mut context, &args),
        Command::Man(args) => man::run(&mut context, &args),
    };
    let status = match result {
        Ok(status) => status,
        Err(error) => exit::classify(&error, &printer),
    };
    printer.close_with_error_record(status.code());
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_vm_layer_s_multiplexer_argv_is_a_hidden_daemon_command() {
        let argv = banger::vm::agent_mux::argv(
            std::path::Path::new("/usr/bin/banger"),
            std::path::Path::new("/run/vm/agent.sock"),
            std::path::Path::new("/run/vm/agent-mux.sock"),
        );
        let cli = Cli::try_parse_from(&argv).unwrap();
        assert!(matches!(
            cli.command,
            Command::Daemon(daemon::DaemonCommand::SerialMux { ref serial, ref listen })
                if serial.ends_with("agent.sock") && listen.ends_with("agent-mux.sock")
        ));
        let help = Cli::command()
            .find_subcommand_mut("daemon")
            .unwrap()
            .render_help()
            .to_string();
        assert!(
            help.contains("logs") && !help.contains("serial-mux"),
            "{help}"
        );
    }
}
