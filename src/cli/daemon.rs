//! `banger daemon run|status|stop`.

use clap::Subcommand;
use serde_json::json;

use banger::daemon::client::{DaemonClient, Launcher, stop};
use banger::daemon::protocol::{Request, Response};
use banger::daemon::server;
use banger::ops::graph::format_time_ms;

use super::Context;
use super::exit::ExitStatus;

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Run the daemon in the foreground (commands that need it start it by themselves).
    Run,
    /// Show the running daemon, starting it if none runs.
    Status,
    /// Stop the daemon (running VMs keep running).
    Stop,
}

/// How the CLI starts a daemon: this very binary, its stderr in the state directory's logs.
pub fn launcher(context: &mut Context) -> anyhow::Result<Launcher> {
    Ok(Launcher {
        executable: std::env::current_exe()?,
        log: context.paths()?.state_dir.join("logs/daemon.log"),
    })
}

pub fn run(context: &mut Context, command: &DaemonCommand) -> anyhow::Result<ExitStatus> {
    let paths = context.paths()?.clone();
    let socket = paths.socket();
    let runtime = super::runtime()?;
    match command {
        DaemonCommand::Run => {
            runtime.block_on(server::run(&paths))?;
            Ok(ExitStatus::Success)
        }
        DaemonCommand::Status => {
            let launcher = launcher(context)?;
            let status = runtime.block_on(async {
                let mut client = DaemonClient::connect_or_start(&socket, &launcher).await?;
                client.request(&Request::Status).await
            })?;
            let Response::Status(status) = status else {
                anyhow::bail!("unexpected answer from the daemon: {status:?}");
            };
            let printer = &context.printer;
            if printer.json {
                printer.record("daemon", json!(status))?;
            } else {
                printer.data(&format!(
                    "pid:         {}\nversion:     {} (protocol {})\nsocket:      {}\nstarted:     {}\nconnections: {}\n",
                    status.pid,
                    status.version,
                    status.protocol,
                    status.socket,
                    format_time_ms(status.started_ms),
                    status.connections,
                ))?;
            }
            Ok(ExitStatus::Success)
        }
        DaemonCommand::Stop => {
            let stopped = runtime.block_on(stop(&socket))?;
            let printer = &context.printer;
            match stopped {
                Some(pid) => printer.info(&format!("stopped the daemon (pid {pid})")),
                None => printer.info("no daemon was running"),
            }
            if printer.json {
                printer.record("daemon_stopped", json!({"pid": stopped}))?;
            }
            Ok(ExitStatus::Success)
        }
    }
}
