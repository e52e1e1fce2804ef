//! `banger vm session start|list|show|logs|attach|send|stop|kill`: long-lived commands in a
//! running VM, kept by its agent; the work is `ops::sessions`'.

use std::io::IsTerminal;

use clap::{Args, Subcommand};
use serde_json::json;

use banger::guest::GuestError;
use banger::guest::protocol::{SessionRecord, SessionState};
use banger::ops::graph::format_time_ms;
use banger::ops::sessions::{self, SessionError, StartSession};

use super::Context;
use super::exit::ExitStatus;
use super::vm::{GuestCommandArgs, Session, agent_channel, running_agent};

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Start CMD as a session: it runs on when this command, the daemon or SSH are gone.
    #[command(
        long_about = "Start CMD in the running VM NAME as a session: a process the guest's \
agent keeps running after this command returns, when the daemon restarts and when SSH \
disconnects, with its output (stdout and stderr together) kept in the guest in a log capped at \
two 4 MiB files, and its stdin fed by `vm session send` and `attach`. Prints the session's \
name (given with --name, else s1, s2, ...).

Examples:
  banger vm session start box --name web -- python3 -m http.server 8000
  banger vm session logs -f box web"
    )]
    Start(StartArgs),
    /// List a VM's sessions: running, exited, killed or lost.
    #[command(visible_alias = "ls")]
    List {
        #[arg(add = super::complete::vm_names())]
        name: String,
    },
    /// Show one session.
    Show(SessionArgs),
    /// Print a session's kept output; -f follows it until the session ends.
    Logs {
        #[command(flatten)]
        session: SessionArgs,
        /// Keep printing new output until the session ends (Ctrl-C stops following only).
        #[arg(short, long)]
        follow: bool,
        /// Start with the last N lines.
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<usize>,
    },
    /// Follow a session's output and send it what you type; Ctrl-C detaches.
    #[command(
        long_about = "Print a session's recent output, then its new output as it comes, while \
this command's standard input goes to the session's stdin (line by line on a terminal). Ends \
when the session ends; Ctrl-C detaches and leaves the session running."
    )]
    Attach(SessionArgs),
    /// Send this command's standard input to a session's stdin.
    Send {
        #[command(flatten)]
        session: SessionArgs,
        /// Send TEXT and a newline instead of reading standard input.
        #[arg(long, value_name = "TEXT")]
        line: Option<String>,
    },
    /// Stop a session: SIGTERM to its processes, SIGKILL after -t seconds.
    Stop {
        #[command(flatten)]
        session: SessionArgs,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(
            short = 't',
            long = "time",
            value_name = "SECONDS",
            default_value_t = 10
        )]
        time: u64,
    },
    /// Send a signal to a session's processes (KILL unless -s).
    Kill {
        #[command(flatten)]
        session: SessionArgs,
        /// The signal: a name (`TERM`, `SIGHUP`) or a number.
        #[arg(short, long, value_name = "SIGNAL")]
        signal: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The running VM.
    #[arg(add = super::complete::vm_names())]
    name: String,
    /// The session's name (letters, digits, `_.-`; default s1, s2, ...).
    #[arg(long = "name", id = "session_name", value_name = "SESSION")]
    session: Option<String>,
    #[command(flatten)]
    guest: GuestCommandArgs,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SessionArgs {
    /// The running VM.
    #[arg(add = super::complete::vm_names())]
    name: String,
    /// The session.
    #[arg(add = super::complete::session_names())]
    session: String,
}

pub(super) fn run(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    daemon: &mut Session,
    command: &SessionCommand,
) -> anyhow::Result<ExitStatus> {
    let vm_name = match command {
        SessionCommand::Start(args) => &args.name,
        SessionCommand::List { name } => name,
        SessionCommand::Show(args)
        | SessionCommand::Attach(args)
        | SessionCommand::Logs { session: args, .. }
        | SessionCommand::Send { session: args, .. }
        | SessionCommand::Stop { session: args, .. }
        | SessionCommand::Kill { session: args, .. } => &args.name,
    };
    let endpoint = match running_agent(context, runtime, daemon, vm_name)? {
        Ok((_, endpoint)) => endpoint,
        Err(status) => return Ok(status),
    };
    let printer = &context.printer;
    let outcome = runtime.block_on(async {
        let mut channel = agent_channel(&endpoint, vm_name).await?;
        let work = async {
            match command {
                SessionCommand::Start(args) => {
                    let request = StartSession {
                        name: args.session.clone(),
                        env: args.guest.env.clone(),
                        cwd: args.guest.workdir.clone(),
                        argv: args.command.clone(),
                    };
                    let record = sessions::start(&mut channel, &request).await?;
                    Ok(Done::Records(vec![record], RecordView::Name))
                }
                SessionCommand::List { .. } => {
                    let records = sessions::list(&mut channel).await?;
                    Ok(Done::Records(records, RecordView::Table))
                }
                SessionCommand::Show(args) => {
                    let record = sessions::show(&mut channel, &args.session).await?;
                    Ok(Done::Records(vec![record], RecordView::Detail))
                }
                SessionCommand::Stop { session, time } => {
                    let record = sessions::stop(&mut channel, &session.session, *time).await?;
                    Ok(Done::Records(vec![record], RecordView::State))
                }
                SessionCommand::Kill { session, signal } => {
                    sessions::kill(&mut channel, &session.session, signal.as_deref()).await?;
                    Ok(Done::Quiet)
                }
                SessionCommand::Logs {
                    session,
                    follow,
                    tail,
                } => {
                    sessions::logs(
                        &mut channel,
                        &session.session,
                        *follow,
                        *tail,
                        tokio::io::stdout(),
                    )
                    .await?;
                    Ok(Done::Quiet)
                }
                SessionCommand::Attach(args) => {
                    sessions::attach(
                        &mut channel,
                        &args.session,
                        tokio::io::stdin(),
                        tokio::io::stdout(),
                    )
                    .await?;
                    Ok(Done::Quiet)
                }
                SessionCommand::Send { session, line } => {
                    match line {
                        Some(text) => {
                            let bytes = format!("{text}\n").into_bytes();
                            sessions::send(&mut channel, &session.session, &bytes[..]).await?
                        }
                        None => {
                            if std::io::stdin().is_terminal() {
                                printer.info(
                                    "reading what to send from the terminal; end with Ctrl-D",
                                );
                            }
                            sessions::send(&mut channel, &session.session, tokio::io::stdin())
                                .await?
                        }
                    }
                    Ok(Done::Quiet)
                }
            }
        };
        tokio::select! {
            done = work => done,
            _ = tokio::signal::ctrl_c() => Ok::<_, SessionError>(Done::Interrupted),
        }
        .map_err(|error| explain(error, vm_name))
    });
    match outcome? {
        Done::Quiet => Ok(ExitStatus::Success),
        Done::Interrupted => match command {
            // Leaving is what Ctrl-C means to an attach or a follow; the session runs on.
            SessionCommand::Attach(args) | SessionCommand::Logs { session: args, .. } => {
                printer.info(&format!(
                    "detached; session `{}` keeps running in VM `{vm_name}`",
                    args.session
                ));
                Ok(ExitStatus::Success)
            }
            _ => Ok(ExitStatus::Interrupted),
        },
        Done::Records(records, view) => {
            print_records(context, vm_name, &records, view)?;
            Ok(ExitStatus::Success)
        }
    }
}

enum Done {
    Records(Vec<SessionRecord>, RecordView),
    Quiet,
    Interrupted,
}

#[derive(Clone, Copy)]
enum RecordView {
    /// Its name only (`start`).
    Name,
    Table,
    Detail,
    /// Name and how it ended (`stop`).
    State,
}

/// The agent's answer with the VM named, and an image whose agent predates sessions told how
/// to get one that has them.
fn explain(error: SessionError, vm_name: &str) -> anyhow::Error {
    if let SessionError::Guest(GuestError::AgentTooOld { .. }) = error {
        return anyhow::Error::new(error).context(format!(
            "the guest agent in VM `{vm_name}` predates sessions; `banger image pull IMAGE` \
             brings the current agent into its image, and VMs created from it afterwards have \
             them"
        ));
    }
    anyhow::Error::new(error).context(format!("in VM `{vm_name}`"))
}

fn state(record: &SessionRecord) -> String {
    match record.state {
        SessionState::Running => "running".into(),
        SessionState::Exited => format!("exited {}", record.exit_code.unwrap_or_default()),
        SessionState::Killed => format!("killed by signal {}", record.signal.unwrap_or_default()),
        SessionState::Lost => "lost".into(),
    }
}

fn record_json(record: &SessionRecord) -> serde_json::Value {
    serde_json::to_value(record).unwrap_or_else(|_| json!({"name": record.name}))
}

fn print_records(
    context: &Context,
    vm_name: &str,
    records: &[SessionRecord],
    view: RecordView,
) -> anyhow::Result<()> {
    let printer = &context.printer;
    if printer.json {
        for record in records {
            let mut value = record_json(record);
            value["vm"] = json!(vm_name);
            printer.record("session", value)?;
        }
        return Ok(());
    }
    match view {
        RecordView::Name => {
            for record in records {
                printer.data(&format!("{}\n", record.name))?;
            }
        }
        RecordView::State => {
            for record in records {
                printer.data(&format!("{}  {}\n", record.name, state(record)))?;
            }
        }
        RecordView::Table if records.is_empty() => {
            printer.info(&format!(
                "no sessions in VM `{vm_name}`; `banger vm session start {vm_name} -- CMD` \
                 starts one"
            ));
        }
        RecordView::Table => {
            let rows: Vec<[String; 5]> = records
                .iter()
                .map(|record| {
                    [
                        record.name.clone(),
                        state(record),
                        record.pid.to_string(),
                        format_time_ms(record.started_unix_ms),
                        record.argv.join(" "),
                    ]
                })
                .collect();
            printer.data(&super::table(
                &["NAME", "STATE", "PID", "STARTED", "COMMAND"],
                &rows,
            ))?;
        }
        RecordView::Detail => {
            for record in records {
                let mut text = format!(
                    "name:     {}\nstate:    {}\npid:      {}\ncommand:  {}\ncwd:      {}\nstarted:  {}\n",
                    record.name,
                    state(record),
                    record.pid,
                    record.argv.join(" "),
                    record.cwd,
                    format_time_ms(record.started_unix_ms),
                );
                if let Some(ended) = record.ended_unix_ms {
                    text.push_str(&format!("ended:    {}\n", format_time_ms(ended)));
                }
                printer.data(&text)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[test]
    fn start_takes_a_session_name_and_a_command() {
        let cli = super::super::Cli::try_parse_from([
            "banger", "vm", "session", "start", "box", "--name", "web", "-e", "A=1", "--", "sleep",
            "9",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        super::super::Cli::command().debug_assert();
    }
}
