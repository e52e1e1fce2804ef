//! `banger daemon run|status|stop`.

use anyhow::Context as _;
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
    /// Print the daemon's log: requests, VM state changes, the processes it started.
    #[command(
        long_about = "Print the daemon's log (`daemon.log` in banger's state directory's \
`logs/`): each request with its outcome and duration, each VM state change, and each process \
the daemon started (VMMs, vsock daemons) with its pid and how it ended. The log is rotated \
past 8 MiB (the previous one is daemon.log.1). `BANGER_LOG` (else `RUST_LOG`) sets the \
daemon's filter when it starts, e.g. `BANGER_LOG=banger=debug`; default `info`."
    )]
    Logs {
        /// Keep printing what the daemon writes, until Ctrl-C (across rotations).
        #[arg(short, long)]
        follow: bool,
        /// Start with the last N lines.
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<usize>,
    },
    /// Internal: multiplex a VM's serial agent stream (the daemon starts one beside each VM
    /// whose agent is on virtio-serial; it exits when the VM does).
    #[command(hide = true)]
    SerialMux {
        /// The VMM's socket for the guest agent's serial port.
        #[arg(long)]
        serial: std::path::PathBuf,
        /// The socket to serve clients on.
        #[arg(long)]
        listen: std::path::PathBuf,
    },
}

/// Where the daemon logs.
fn log_path(context: &mut Context) -> anyhow::Result<std::path::PathBuf> {
    Ok(context.paths()?.state_dir.join("logs/daemon.log"))
}

/// How the CLI starts a daemon: this very binary, its stderr in the state directory's logs.
pub fn launcher(context: &mut Context) -> anyhow::Result<Launcher> {
    Ok(Launcher {
        executable: std::env::current_exe()?,
        log: log_path(context)?,
    })
}

pub fn run(context: &mut Context, command: &DaemonCommand) -> anyhow::Result<ExitStatus> {
    if let DaemonCommand::SerialMux { serial, listen } = command {
        // Needs no paths or config: it may run long after they changed.
        super::runtime()?.block_on(serial_mux(serial, listen))?;
        return Ok(ExitStatus::Success);
    }
    let paths = context.paths()?.clone();
    let socket = paths.socket();
    let runtime = super::runtime()?;
    match command {
        DaemonCommand::Run => {
            let log = log_path(context)?;
            super::logging::init_daemon(context.verbose, &log)
                .with_context(|| format!("cannot open the daemon's log {}", log.display()))?;
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
        DaemonCommand::Logs { follow, tail } => {
            let log = log_path(context)?;
            if !*follow && !log.exists() {
                context
                    .printer
                    .info(&format!("no daemon log yet ({})", log.display()));
                return Ok(ExitStatus::Success);
            }
            super::vm::show_log_file(&log, *follow, *tail)
        }
        DaemonCommand::SerialMux { .. } => unreachable!("served above"),
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

/// Serves `listen` over the serial stream at `serial` until the VMM closes it, or SIGTERM or
/// SIGINT arrives (the daemon stopping the VM's helpers).
async fn serial_mux(serial: &std::path::Path, listen: &std::path::Path) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mux = banger::guest::SerialMux::bind(serial, listen).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let on_signal = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        on_signal.cancel();
    });
    mux.run(stop).await?;
    Ok(())
}
