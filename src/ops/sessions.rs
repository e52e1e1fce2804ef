//! `banger vm session`: long-lived commands in a guest that outlive the client that started
//! them and the daemon, tracked by the guest's agent (`banger-agent session …`, run through
//! `Exec`; `docs/agent.md`). The guest keeps each session's output in a capped log, its
//! stdin in a FIFO and how it ended; this side asks and streams.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::guest::protocol::SessionRecord;
use crate::guest::{ExitStatus, GuestChannel, GuestError};

/// Why a session request failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no session `{name}` in this VM (`banger vm session list NAME` shows them)")]
    NoSession { name: String },
    /// The session's state forbids it: a running session's name, input to one that ended.
    #[error("{message}")]
    State { message: String },
    /// The command could not be started (not found, not executable, bad directory).
    #[error("{message}")]
    StartFailed { message: String },
    #[error("{message}")]
    Usage { message: String },
    #[error("`banger-agent session {subcommand}` failed in the guest ({status}): {stderr}")]
    Agent {
        subcommand: &'static str,
        status: String,
        stderr: String,
    },
    #[error("cannot parse what `banger-agent session {subcommand}` printed: {message}")]
    Output {
        subcommand: &'static str,
        message: String,
    },
    #[error(transparent)]
    Guest(#[from] GuestError),
}

impl crate::error::Classify for SessionError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            SessionError::NoSession { .. }
            | SessionError::State { .. }
            | SessionError::Usage { .. }
            | SessionError::Guest(GuestError::AgentTooOld { .. }) => ErrorClass::User,
            SessionError::StartFailed { .. } => ErrorClass::Failed,
            _ => ErrorClass::Environment,
        }
    }
}

/// What `vm session start` asks for.
#[derive(Debug, Clone, Default)]
pub struct StartSession {
    /// The session's name; the agent picks `s1`, `s2`, … when absent.
    pub name: Option<String>,
    pub env: Vec<(String, String)>,
    /// Absolute working directory in the guest.
    pub cwd: Option<String>,
    pub argv: Vec<String>,
}

/// Starts a session and returns it, running.
pub async fn start(
    channel: &mut GuestChannel,
    request: &StartSession,
) -> Result<SessionRecord, SessionError> {
    let mut arguments = vec!["start".to_owned(), "--json".to_owned()];
    if let Some(name) = &request.name {
        arguments.extend(["--name".to_owned(), name.clone()]);
    }
    for (name, value) in &request.env {
        arguments.extend(["-e".to_owned(), format!("{name}={value}")]);
    }
    if let Some(cwd) = &request.cwd {
        arguments.extend(["-w".to_owned(), cwd.clone()]);
    }
    arguments.push("--".to_owned());
    arguments.extend(request.argv.iter().cloned());
    json(channel, "start", &arguments, request.name.as_deref()).await
}

/// Every session the guest knows, running or not.
pub async fn list(channel: &mut GuestChannel) -> Result<Vec<SessionRecord>, SessionError> {
    let arguments = ["list", "--json"].map(str::to_owned);
    json(channel, "list", &arguments, None).await
}

pub async fn show(channel: &mut GuestChannel, name: &str) -> Result<SessionRecord, SessionError> {
    let arguments = ["show", name, "--json"].map(str::to_owned);
    json(channel, "show", &arguments, Some(name)).await
}

/// SIGTERM to the session's process group, SIGKILL after `timeout_secs`; returns how it
/// ended.
pub async fn stop(
    channel: &mut GuestChannel,
    name: &str,
    timeout_secs: u64,
) -> Result<SessionRecord, SessionError> {
    let arguments = [
        "stop".to_owned(),
        name.to_owned(),
        "--timeout".to_owned(),
        timeout_secs.to_string(),
        "--json".to_owned(),
    ];
    json(channel, "stop", &arguments, Some(name)).await
}

/// Sends `signal` (a number or a name such as `TERM`; KILL when absent) to the session's
/// process group.
pub async fn kill(
    channel: &mut GuestChannel,
    name: &str,
    signal: Option<&str>,
) -> Result<(), SessionError> {
    let mut arguments = vec!["kill".to_owned(), name.to_owned()];
    if let Some(signal) = signal {
        arguments.extend(["--signal".to_owned(), signal.to_owned()]);
    }
    streamed(
        channel,
        "kill",
        &arguments,
        Some(name),
        None::<&[u8]>,
        tokio::io::sink(),
    )
    .await
}

/// Writes the session's kept output to `output` (the last `tail` lines only, if given);
/// with `follow`, goes on until the session ends.
pub async fn logs<O: AsyncWrite + Unpin>(
    channel: &mut GuestChannel,
    name: &str,
    follow: bool,
    tail: Option<usize>,
    output: O,
) -> Result<(), SessionError> {
    let mut arguments = vec!["logs".to_owned(), name.to_owned()];
    if follow {
        arguments.push("--follow".to_owned());
    }
    if let Some(lines) = tail {
        arguments.extend(["--tail".to_owned(), lines.to_string()]);
    }
    streamed(
        channel,
        "logs",
        &arguments,
        Some(name),
        None::<&[u8]>,
        output,
    )
    .await
}

/// Recent output, then new output as it comes, while `input` goes to the session's stdin;
/// ends when the session ends. Dropping the future leaves the session running.
pub async fn attach<I, O>(
    channel: &mut GuestChannel,
    name: &str,
    input: I,
    output: O,
) -> Result<(), SessionError>
where
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
{
    let arguments = ["attach", name].map(str::to_owned);
    streamed(
        channel,
        "attach",
        &arguments,
        Some(name),
        Some(input),
        output,
    )
    .await
}

/// Copies `input` to the session's stdin until it ends.
pub async fn send<I: AsyncRead + Unpin>(
    channel: &mut GuestChannel,
    name: &str,
    input: I,
) -> Result<(), SessionError> {
    let arguments = ["send", name].map(str::to_owned);
    streamed(
        channel,
        "send",
        &arguments,
        Some(name),
        Some(input),
        tokio::io::sink(),
    )
    .await
}

async fn json<T: serde::de::DeserializeOwned>(
    channel: &mut GuestChannel,
    subcommand: &'static str,
    arguments: &[String],
    name: Option<&str>,
) -> Result<T, SessionError> {
    let mut stdout = Vec::new();
    streamed(
        channel,
        subcommand,
        arguments,
        name,
        None::<&[u8]>,
        &mut stdout,
    )
    .await?;
    serde_json::from_slice(&stdout).map_err(|error| SessionError::Output {
        subcommand,
        message: error.to_string(),
    })
}

/// Runs `banger-agent session ARGUMENTS...` and turns its exit codes (documented in the
/// agent's `session.rs`) into [`SessionError`]s.
async fn streamed<I, O>(
    channel: &mut GuestChannel,
    subcommand: &'static str,
    arguments: &[String],
    name: Option<&str>,
    input: Option<I>,
    output: O,
) -> Result<(), SessionError>
where
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
{
    let (status, stderr) = channel
        .agent_command("session", arguments, input, output)
        .await?;
    let message = || crate::error::printable(stderr.trim_start_matches("banger-agent: "));
    match status {
        ExitStatus::Code(0) => Ok(()),
        ExitStatus::Code(2) => Err(SessionError::Usage { message: message() }),
        ExitStatus::Code(3) => Err(SessionError::NoSession {
            name: name.unwrap_or_default().to_owned(),
        }),
        ExitStatus::Code(4) => Err(SessionError::State { message: message() }),
        ExitStatus::Code(5) => Err(SessionError::StartFailed { message: message() }),
        other => Err(SessionError::Agent {
            subcommand,
            status: other.to_string(),
            stderr: message(),
        }),
    }
}
