//! Shell completion: `banger completion SHELL` prints the script to source, and the script
//! calls banger back (`COMPLETE=SHELL banger -- WORDS…`, clap_complete's dynamic engine),
//! which answers with subcommands, flags and the names that exist now: VMs, images and
//! kernels, read straight from the state database so that completing never starts or waits
//! for the daemon.

use std::ffi::OsStr;

use clap::{Args, CommandFactory, ValueEnum};
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};
use clap_complete::env::{CompleteEnv, Shells};

use banger::paths::Paths;
use banger::state::{Named, names_read_only};

use super::{Context, ExitStatus};

/// The variable that turns a banger run into a completion request.
const COMPLETE_VAR: &str = "COMPLETE";

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell to print the completion script for.
    shell: Shell,
}

/// Answers a completion request and exits, when this run is one (before anything else runs).
pub fn answer_if_asked() {
    CompleteEnv::with_factory(super::Cli::command)
        .var(COMPLETE_VAR)
        .complete();
}

/// `banger completion SHELL`: the registration script, calling this very binary by its
/// absolute path (a completion must not depend on which `banger` PATH finds first).
pub fn run(context: &mut Context, args: &CompletionArgs) -> anyhow::Result<ExitStatus> {
    let name = match args.shell {
        Shell::Bash => "bash",
        Shell::Zsh => "zsh",
        Shell::Fish => "fish",
    };
    let shells = Shells::builtins();
    let shell = shells
        .completer(name)
        .expect("clap_complete has the built-in shells");
    let binary = std::env::current_exe()?;
    let mut script = Vec::new();
    shell.write_registration(
        COMPLETE_VAR,
        "banger",
        "banger",
        &binary.to_string_lossy(),
        &mut script,
    )?;
    context.printer.data(&String::from_utf8_lossy(&script))?;
    Ok(ExitStatus::Success)
}

fn candidates(kind: Named, current: &OsStr) -> Vec<CompletionCandidate> {
    let Some(current) = current.to_str() else {
        return Vec::new();
    };
    let Ok(paths) = Paths::from_env() else {
        return Vec::new();
    };
    names_read_only(&paths.state_dir, kind)
        .into_iter()
        .filter(|name| name.starts_with(current))
        .map(CompletionCandidate::new)
        .collect()
}

/// Completes an argument with the names of existing VMs.
pub fn vm_names() -> ArgValueCompleter {
    ArgValueCompleter::new(|current: &OsStr| candidates(Named::Vms, current))
}

/// Completes an argument with the names of stored images.
pub fn image_names() -> ArgValueCompleter {
    ArgValueCompleter::new(|current: &OsStr| candidates(Named::Images, current))
}

/// Completes an argument with the names of stored kernels.
pub fn kernel_names() -> ArgValueCompleter {
    ArgValueCompleter::new(|current: &OsStr| candidates(Named::Kernels, current))
}
