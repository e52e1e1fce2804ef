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

mod cache;
mod exit;
mod graph;
mod printer;
// The engine's first CLI caller is `banger build` (images issue); until then the renderers
// are exercised by their unit tests only.
#[allow(dead_code)]
mod reporters;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use banger::config::Config;
use banger::paths::Paths;
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
(environment or internal error), 130 interrupted. See docs/cli.md."
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
    /// More detail on stderr (cached steps, step starts).
    #[arg(short, long, global = true, conflicts_with = "quiet")]
    verbose: bool,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// Inspect and trim the step store (~/.cache/banger/store).
    #[command(subcommand)]
    Cache(cache::CacheCommand),
}

/// Lazily resolved environment of a command.
#[derive(Debug)]
pub struct Context {
    pub printer: Printer,
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

/// Runs the CLI and returns the process exit status. Only `main` exits.
pub fn run() -> ExitStatus {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return exit::clap_error(&error),
    };
    let verbosity = if cli.global.quiet {
        Verbosity::Quiet
    } else if cli.global.verbose {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    };
    let printer = Printer::new(verbosity, cli.global.json);
    let mut context = Context {
        printer: printer.clone(),
        paths: None,
        config: None,
    };
    let result = match cli.command {
        Command::Graph(args) => graph::run(&mut context, &args),
        Command::Cache(command) => cache::run(&mut context, &command),
    };
    match result {
        Ok(status) => status,
        Err(error) => exit::classify(&error, &printer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
