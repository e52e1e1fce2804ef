//! `banger ssh-config install|uninstall`: `ssh NAME.vm` through the user's own OpenSSH.

use anyhow::Context as _;
use serde_json::json;

use super::Context;
use super::exit::ExitStatus;
use banger::ops::ssh_config::{self, SshConfigPaths};

#[derive(Debug, clap::Subcommand)]
pub enum SshConfigCommand {
    /// Make `ssh NAME.vm` (and scp, rsync -e ssh, editors' remote SSH) reach banger's VMs.
    #[command(
        long_about = "Make `ssh NAME.vm` reach banger's VM NAME, as root with banger's \
key, for scp, rsync -e ssh and editors' remote-SSH extensions too. Writes \
~/.config/banger/ssh_config (a `Host *.vm` block whose ProxyCommand is `banger vm proxy %h %p`) \
and adds two lines at the top of ~/.ssh/config: a marker comment and an `Include` of that file. \
Nothing else in ~/.ssh/config changes, a copy of it is kept as ~/.ssh/config.banger-backup \
before the first change, and running it again changes nothing. Host keys are pinned on first \
contact in a file per VM, forgotten when the VM is deleted or made again."
    )]
    Install,
    /// Remove the two lines `install` added to ~/.ssh/config, and banger's ssh_config.
    Uninstall,
}

pub fn run(context: &mut Context, command: &SshConfigCommand) -> anyhow::Result<ExitStatus> {
    let home = banger::env::var_path(banger::env::HOME)
        .filter(|home| home.is_absolute())
        .context("HOME is not set to an absolute path: cannot find ~/.ssh/config")?;
    let banger = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .context("cannot find banger's own executable for the ProxyCommand")?;
    let config_file = context.paths()?.config_file.clone();
    let state_dir = context.paths()?.state_dir.clone();
    let paths = SshConfigPaths::new(&home, &config_file, &state_dir, &banger);
    let printer = context.printer.clone();
    match command {
        SshConfigCommand::Install => {
            // The key the config names must exist before ssh first reads it.
            banger::ssh::SshIdentity::ensure(&state_dir)?;
            let installed = ssh_config::install(&paths)?;
            printer.info(&format!("wrote {}", paths.banger_config.display()));
            if installed.changed_user_config {
                let backup = installed
                    .backup
                    .as_ref()
                    .map(|backup| format!(" (your file as it was: {})", backup.display()))
                    .unwrap_or_default();
                printer.info(&format!(
                    "added an Include of it at the top of {}{backup}",
                    paths.user_config.display()
                ));
            } else {
                printer.info(&format!(
                    "{} already includes it",
                    paths.user_config.display()
                ));
            }
            printer.info("`ssh NAME.vm` now reaches banger's VM NAME");
            if printer.json {
                printer.record(
                    "ssh_config",
                    json!({
                        "banger_config": paths.banger_config,
                        "user_config": paths.user_config,
                        "changed": installed.changed_user_config,
                        "backup": installed.backup,
                    }),
                )?;
            }
        }
        SshConfigCommand::Uninstall => {
            let removed = ssh_config::uninstall(&paths)?;
            printer.info(if removed {
                "removed banger's lines from ~/.ssh/config and its ssh_config"
            } else {
                "nothing to remove: banger's ssh_config is not installed"
            });
        }
    }
    Ok(ExitStatus::Success)
}
