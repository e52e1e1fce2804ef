//! Shell completion: `banger completion SHELL` prints the script to source, and the script
//! calls banger back (`COMPLETE=SHELL banger -- WORDS…`, clap_complete's dynamic engine),
//! which answers with subcommands, flags and the names that exist now: VMs, images and
//! kernels, read straight from the state database so that completing never starts or waits
//! for the daemon; and a running VM's sessions, asked of its agent directly (the VM's
//! scratch file names it) with a one-second limit.

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

/// How long completing session names may take: the guest is asked, and a shell must not
/// hang on a slow one.
const SESSION_QUERY_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Completes a `vm session` subcommand's session argument with the sessions of the VM named
/// before it on the command line.
pub fn session_names() -> ArgValueCompleter {
    ArgValueCompleter::new(|current: &OsStr| {
        let (Some(current), Some(vm)) = (current.to_str(), vm_of_session_command()) else {
            return Vec::new();
        };
        let Ok(paths) = Paths::from_env() else {
            return Vec::new();
        };
        let Some(launched) = banger::ops::vms::launched_read_only(&paths, &vm) else {
            return Vec::new();
        };
        let endpoint = launched.agent.endpoint();
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return Vec::new();
        };
        let sessions = runtime.block_on(async {
            let deadline = std::time::Instant::now() + SESSION_QUERY_LIMIT;
            tokio::time::timeout(SESSION_QUERY_LIMIT, async {
                let mut channel = endpoint.connect(deadline).await.ok()?;
                channel.hello().await.ok()?;
                banger::ops::sessions::list(&mut channel).await.ok()
            })
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
        });
        runtime.shutdown_background();
        sessions
            .into_iter()
            .filter(|session| session.name.starts_with(current))
            .map(|session| CompletionCandidate::new(session.name))
            .collect()
    })
}

/// The VM a `vm session SUBCOMMAND VM SESSION` being completed names: the words of the
/// command line come after `--` in a completion request.
fn vm_of_session_command() -> Option<String> {
    let words: Vec<String> = std::env::args().skip_while(|word| word != "--").collect();
    vm_in_session_words(&words)
}

fn vm_in_session_words(words: &[String]) -> Option<String> {
    let at = words
        .windows(2)
        .position(|pair| pair[0] == "vm" && pair[1] == "session")?;
    // After `vm session SUBCOMMAND`, the first word that is not a flag.
    words[at + 3..]
        .iter()
        .find(|word| !word.starts_with('-'))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_vm_of_a_session_command_is_the_word_after_its_subcommand() {
        assert_eq!(
            vm_in_session_words(&words("-- banger vm session logs -f box s")),
            Some("box".into())
        );
        assert_eq!(
            vm_in_session_words(&words("-- banger --json vm session attach box")),
            Some("box".into())
        );
        assert_eq!(
            vm_in_session_words(&words("-- banger vm session logs")),
            None
        );
        assert_eq!(vm_in_session_words(&words("-- banger vm ssh box")), None);
    }
}
