//! `banger-agent session …`: long-lived commands in the guest, for `banger vm session`.
//!
//! The host reaches the guest only through Exec, and an Exec's process group dies with its
//! client. A session outlives both: `session start` launches a detached supervisor
//! (`supervisor.rs`) that runs the command, feeds it stdin from a FIFO, keeps its output in
//! a capped log and records how it ended, all in one directory per session (`store.rs`).
//! Every other subcommand is a short Exec that reads or signals that directory
//! (`output.rs` for logs and input). No protocol change: the host runs these like
//! `ports --json` and parses stdout.
//!
//! Lifecycle of a session:
//!
//! 1. `start` claims the name (under a lock on the root), creates the directory and FIFO,
//!    and launches the supervisor, which detaches (`setsid`, stdio to `/dev/null`), starts
//!    the command and reports back; a command that cannot start fails `start` (exit 5).
//! 2. While the command runs the session is `running`; `logs`, `send`, `attach`, `stop`,
//!    `kill` act on it. The host ending an `attach` (ending its Exec) leaves it running.
//! 3. When the command ends, the supervisor writes `exit.json` (`exited` with a code, or
//!    `killed` with a signal) and exits. A session whose supervisor vanished without doing
//!    so (guest reboot, SIGKILL) is `lost`.
//! 4. `start` with the name of a finished or lost session replaces it; generated names
//!    (`s1`, `s2`, …) never do.
//!
//! Exit codes, from [`Failure::exit_code`]:
//!
//! | code | meaning                                                                    |
//! |------|----------------------------------------------------------------------------|
//! | 0    | done                                                                       |
//! | 1    | failed (I/O, the session directory, a session that did not stop)          |
//! | 2    | bad usage, including an invalid session name                               |
//! | 3    | no such session (`no session NAME` on stderr)                              |
//! | 4    | the session's state forbids it: `start` with the name of a running session; `send` or `kill` to one that is not running |
//! | 5    | `start`: the command could not be started (program not found or not executable, bad working directory) |
//!
//! Sessions live in `/run/banger/sessions` (`/tmp/banger-sessions` if the guest has no
//! `/run`), or in `$BANGER_AGENT_SESSION_DIR`; `$BANGER_AGENT_SESSION_LOG_CAP` sets the log
//! cap in bytes (default 4 MiB per file, two files).
//!
//! Weaknesses: everything is polled from files (following output, waiting in `stop`), at
//! [`output`]'s interval; commands get no terminal; a command that ignores its stdin FIFO
//! blocks `send` once the FIFO's buffer is full.

mod output;
mod store;
mod supervisor;

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use self::store::{SessionRecord, SessionState, Status, Store};
use self::supervisor::StartRequest;

/// How long `stop` waits after SIGTERM unless `--timeout` says otherwise.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits for the end after SIGKILL before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often `stop` looks for the end.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Lines of recent output `attach` prints before following.
const ATTACH_TAIL: usize = 50;

fn usage() -> String {
    format!(
        "usage: banger-agent session start [--name NAME] [-e KEY=VALUE]... [-w DIR] [--json] [--] CMD [ARG]...
       banger-agent session list [--json]
       banger-agent session show NAME [--json]
       banger-agent session logs NAME [-f|--follow] [--tail N]
       banger-agent session attach NAME     (recent output, then follow; stdin goes to the session)
       banger-agent session send NAME       (copies stdin into the session's stdin)
       banger-agent session stop NAME [--timeout SECS] [--json]   (SIGTERM, SIGKILL after SECS, default {})
       banger-agent session kill NAME [--signal N|NAME]           (default KILL)

Session names match [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}; without --name, start picks s1, s2, ...
Sessions live in {} ({} without /run), or in ${}.
Exit codes: 0 ok, 1 failed, 2 bad usage, 3 no such session, 4 the session's state forbids it
(start: name of a running session; send, kill: not running), 5 the command could not start.",
        DEFAULT_STOP_TIMEOUT.as_secs(),
        store::DEFAULT_ROOT,
        store::FALLBACK_ROOT,
        store::ROOT_ENV,
    )
}

/// Why a subcommand failed; decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad arguments, an invalid name, an unusable setting.
    Usage(String),
    /// No session of this name.
    NoSession(String),
    /// The session exists, but its state forbids the request.
    WrongState(String),
    /// `start`: the command could not be started.
    CannotStart(String),
    /// Anything else.
    Failed(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Failed(_) => 1,
            Failure::Usage(_) => 2,
            Failure::NoSession(_) => 3,
            Failure::WrongState(_) => 4,
            Failure::CannotStart(_) => 5,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NoSession(name) => write!(formatter, "no session {name}"),
            Failure::Usage(message)
            | Failure::WrongState(message)
            | Failure::CannotStart(message)
            | Failure::Failed(message) => formatter.write_str(message),
        }
    }
}

/// Output to stdout failed. A reader that went away (`| head`, the host ending the Exec)
/// is not worth a message.
fn output_failure(error: io::Error) -> Option<Failure> {
    (error.kind() != io::ErrorKind::BrokenPipe)
        .then(|| Failure::Failed(format!("writing output: {error}")))
}

/// `banger-agent session ARGUMENTS…`.
pub fn command(arguments: &[String]) -> ExitCode {
    match run(arguments) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("banger-agent: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

fn run(arguments: &[String]) -> Result<(), Failure> {
    let Some((subcommand, rest)) = arguments.split_first() else {
        return Err(Failure::Usage(format!(
            "session needs a subcommand\n{}",
            usage()
        )));
    };
    // Help only among the options: `start -- grep --help` is a command.
    let options_end = rest
        .iter()
        .position(|argument| argument == "--")
        .unwrap_or(rest.len());
    let wants_help = matches!(subcommand.as_str(), "-h" | "--help" | "help")
        || rest[..options_end]
            .iter()
            .any(|argument| argument == "-h" || argument == "--help");
    if wants_help {
        println!("{}", usage());
        return Ok(());
    }
    match subcommand.as_str() {
        "start" => start(rest),
        "list" => list(rest),
        "show" => show(rest),
        "logs" => logs(rest),
        "attach" => attach(rest),
        "send" => send(rest),
        "stop" => stop(rest),
        "kill" => kill(rest),
        // Launched by `start`; not for hands.
        "supervise" => match rest {
            [dir] => supervisor::supervise(std::path::Path::new(dir)),
            _ => Err(Failure::Usage(
                "session supervise takes one directory".into(),
            )),
        },
        other => Err(Failure::Usage(format!(
            "unknown session subcommand `{other}`\n{}",
            usage()
        ))),
    }
}

/// The arguments of every subcommand but `start`: a session name and options.
#[derive(Debug, Default)]
struct Parsed {
    subcommand: String,
    name: Option<String>,
    json: bool,
    follow: bool,
    tail: Option<usize>,
    timeout: Option<Duration>,
    signal: Option<Signal>,
}

/// Parses `NAME` and the flags in `allowed` for `subcommand`.
fn parse(subcommand: &str, arguments: &[String], allowed: &[&str]) -> Result<Parsed, Failure> {
    let usage_error = |message: String| Failure::Usage(format!("session {subcommand}: {message}"));
    let mut parsed = Parsed {
        subcommand: subcommand.to_owned(),
        ..Parsed::default()
    };
    let mut arguments = arguments.iter();
    while let Some(argument) = arguments.next() {
        let flag = argument.as_str();
        let is_flag = flag.starts_with('-') && flag.len() > 1;
        if is_flag && !allowed.contains(&flag) {
            return Err(usage_error(format!("unknown option `{flag}`")));
        }
        let mut value = || {
            arguments
                .next()
                .cloned()
                .ok_or_else(|| usage_error(format!("{flag} needs a value")))
        };
        match flag {
            "--json" => parsed.json = true,
            "-f" | "--follow" => parsed.follow = true,
            "--tail" => {
                let text = value()?;
                parsed.tail = Some(text.parse().map_err(|_| {
                    usage_error(format!("--tail {text}: expected a number of lines"))
                })?);
            }
            "--timeout" => {
                let text = value()?;
                let timeout = text
                    .parse()
                    .ok()
                    .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
                    .ok_or_else(|| {
                        usage_error(format!("--timeout {text}: expected a number of seconds"))
                    })?;
                parsed.timeout = Some(timeout);
            }
            "--signal" => {
                let text = value()?;
                parsed.signal = Some(parse_signal(&text).map_err(usage_error)?);
            }
            _ if parsed.name.is_none() => parsed.name = Some(argument.clone()),
            _ => return Err(usage_error(format!("unexpected argument `{argument}`"))),
        }
    }
    Ok(parsed)
}

impl Parsed {
    /// The named session; a usage error without a name.
    fn session(&self) -> Result<store::Session, Failure> {
        let name = self.name.as_deref().ok_or_else(|| {
            Failure::Usage(format!("session {}: needs a session name", self.subcommand))
        })?;
        Store::locate().load(name)
    }
}

/// A signal by number (`15`) or name (`TERM`, `SIGTERM`, `term`).
fn parse_signal(text: &str) -> Result<Signal, String> {
    let parsed = match text.parse::<i32>() {
        Ok(number) => Signal::try_from(number).ok(),
        Err(_) => {
            let upper = text.to_ascii_uppercase();
            let name = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            Signal::from_str(&name).ok()
        }
    };
    parsed.ok_or_else(|| format!("--signal {text}: not a signal number or name"))
}

fn start(arguments: &[String]) -> Result<(), Failure> {
    let usage_error = |message: String| Failure::Usage(format!("session start: {message}"));
    let mut name = None;
    let mut env = Vec::new();
    let mut cwd = None;
    let mut json = false;
    let mut argv = Vec::new();
    let mut arguments = arguments.iter();
    while let Some(argument) = arguments.next() {
        let flag = argument.as_str();
        let mut value = || {
            arguments
                .next()
                .cloned()
                .ok_or_else(|| usage_error(format!("{flag} needs a value")))
        };
        match flag {
            "--name" => name = Some(value()?),
            "-e" | "--env" => {
                let assignment = value()?;
                match assignment.split_once('=') {
                    Some((key, val)) if !key.is_empty() => env.push((key.into(), val.into())),
                    _ => {
                        return Err(usage_error(format!(
                            "{flag} {assignment}: expected KEY=VALUE"
                        )));
                    }
                }
            }
            "-w" | "--cwd" => cwd = Some(value()?),
            "--json" => json = true,
            "--" => {
                argv.extend(arguments.by_ref().cloned());
                break;
            }
            _ if flag.starts_with('-') => {
                return Err(usage_error(format!(
                    "unknown option `{flag}` (put the command after `--`)"
                )));
            }
            _ => {
                argv.push(argument.clone());
                argv.extend(arguments.by_ref().cloned());
                break;
            }
        }
    }
    if argv.is_empty() {
        return Err(usage_error(
            "needs a command: start [OPTIONS] -- CMD [ARG]...".into(),
        ));
    }
    let record = supervisor::start(StartRequest {
        name,
        env,
        cwd,
        argv,
    })?;
    let text = if json { to_json(&record)? } else { record.name };
    print_line(&text)
}

fn list(arguments: &[String]) -> Result<(), Failure> {
    let parsed = parse("list", arguments, &["--json"])?;
    if let Some(name) = parsed.name {
        return Err(Failure::Usage(format!(
            "session list: unexpected argument `{name}`"
        )));
    }
    let records: Vec<SessionRecord> = Store::locate()
        .sessions()?
        .iter()
        .map(|session| session.record())
        .collect();
    if parsed.json {
        return print_line(&to_json(&records)?);
    }
    let rows: Vec<[String; 5]> = records
        .iter()
        .map(|record| {
            [
                record.name.clone(),
                describe_state(record),
                record.pid.to_string(),
                format_unix_ms(record.started_unix_ms),
                shell_words(&record.argv),
            ]
        })
        .collect();
    let header = ["NAME", "STATE", "PID", "STARTED", "COMMAND"].map(String::from);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter().zip(row) {
            text.push_str(&format!("{cell:<width$}  "));
        }
        text.push_str(&row[4]);
        text.push('\n');
    }
    print_text(&text)
}

fn show(arguments: &[String]) -> Result<(), Failure> {
    let parsed = parse("show", arguments, &["--json"])?;
    let session = parsed.session()?;
    print_record(&session.record(), parsed.json)
}

fn print_record(record: &SessionRecord, json: bool) -> Result<(), Failure> {
    if json {
        return print_line(&to_json(record)?);
    }
    let mut text = format!(
        "name: {}\nstate: {}\npid: {}\nstarted: {}\n",
        record.name,
        describe_state(record),
        record.pid,
        format_unix_ms(record.started_unix_ms)
    );
    if let Some(ended) = record.ended_unix_ms {
        text.push_str(&format!("ended: {}\n", format_unix_ms(ended)));
    }
    text.push_str(&format!(
        "cwd: {}\ncommand: {}\n",
        record.cwd,
        shell_words(&record.argv)
    ));
    print_text(&text)
}

fn logs(arguments: &[String]) -> Result<(), Failure> {
    let parsed = parse("logs", arguments, &["-f", "--follow", "--tail"])?;
    let session = parsed.session()?;
    let mut out = io::stdout().lock();
    let shown = output::print_log(&session, parsed.tail, &mut out).and_then(|current| {
        if parsed.follow {
            output::follow(&session, current, &mut out)
        } else {
            Ok(())
        }
    });
    shown.or_else(|error| output_failure(error).map_or(Ok(()), Err))
}

fn attach(arguments: &[String]) -> Result<(), Failure> {
    let parsed = parse("attach", arguments, &[])?;
    let session = parsed.session()?;
    let mut out = io::stdout().lock();
    let current = match output::print_log(&session, Some(ATTACH_TAIL), &mut out) {
        Ok(current) => current,
        Err(error) => return output_failure(error).map_or(Ok(()), Err),
    };
    // A session that has ended takes no input; its output is all there is to show.
    if let Ok(mut fifo) = output::open_input(&session) {
        // Not joined: the process ends when following ends, wherever this thread is. When
        // stdin ends first, following goes on without it.
        std::thread::spawn(move || {
            let _ = output::forward(io::stdin().lock(), &mut fifo);
        });
    }
    output::follow(&session, current, &mut out)
        .or_else(|error| output_failure(error).map_or(Ok(()), Err))
}

fn send(arguments: &[String]) -> Result<(), Failure> {
    let parsed = parse("send", arguments, &[])?;
    let session = parsed.session()?;
    let mut fifo = output::open_input(&session)?;
    match output::forward(io::stdin().lock(), &mut fifo) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => {
            Err(Failure::WrongState(format!(
                "session {} ended before all input was delivered",
                session.name()
            )))
        }
        Err(error) => Err(Failure::Failed(format!(
            "sending to session {}: {error}",
            session.name()
        ))),
    }
}

fn stop(arguments: &[String]) -> Result<(), Failure> {
    let parsed = parse("stop", arguments, &["--timeout", "--json"])?;
    let session = parsed.session()?;
    let timeout = parsed.timeout.unwrap_or(DEFAULT_STOP_TIMEOUT);
    // A lost session's command may have outlived its supervisor; it is stopped the same
    // way, and the session stays lost (nobody is left to record the end).
    let still_going = || match session.status() {
        Status::Running => true,
        Status::Lost => session.command_alive(),
        Status::Ended(_) => false,
    };
    if still_going() {
        signal_group(&session.meta, Signal::SIGTERM)?;
        if !wait_until(timeout, || !still_going()) {
            signal_group(&session.meta, Signal::SIGKILL)?;
            wait_until(KILL_WAIT, || !still_going());
        }
    }
    let record = session.record();
    print_record(&record, parsed.json)?;
    if still_going() {
        return Err(Failure::Failed(format!(
            "session {} did not end within {} s of SIGKILL",
            session.name(),
            KILL_WAIT.as_secs()
        )));
    }
    Ok(())
}

fn kill(arguments: &[String]) -> Result<(), Failure> {
    let parsed = parse("kill", arguments, &["--signal"])?;
    let session = parsed.session()?;
    let signal = parsed.signal.unwrap_or(Signal::SIGKILL);
    let reachable = match session.status() {
        Status::Running => true,
        Status::Lost => session.command_alive(),
        Status::Ended(_) => false,
    };
    if !reachable {
        return Err(Failure::WrongState(format!(
            "session {} is not running ({})",
            session.name(),
            describe_state(&session.record())
        )));
    }
    signal_group(&session.meta, signal)
}

/// Sends `signal` to the command's process group (its pid). A group already gone is fine:
/// the command ended meanwhile.
fn signal_group(meta: &store::Meta, signal: Signal) -> Result<(), Failure> {
    if meta.pid <= 1 {
        return Err(Failure::Failed(format!(
            "session {} records pid {}, which is no command's",
            meta.name, meta.pid
        )));
    }
    match killpg(Pid::from_raw(meta.pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(error) => Err(Failure::Failed(format!(
            "cannot send {signal} to session {} (process group {}): {error}",
            meta.name, meta.pid
        ))),
    }
}

/// Polls `done` until it holds or `timeout` passes; whether it held.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(STOP_POLL);
    }
}

/// `running`, `exited 0`, `killed by signal 15 (SIGTERM)`, `lost`.
pub fn describe_state(record: &SessionRecord) -> String {
    match record.state {
        SessionState::Running => "running".into(),
        SessionState::Lost => "lost".into(),
        SessionState::Exited => format!("exited {}", record.exit_code.unwrap_or_default()),
        SessionState::Killed => {
            let number = record.signal.unwrap_or_default();
            match Signal::try_from(number) {
                Ok(signal) => format!("killed by signal {number} ({})", signal.as_str()),
                Err(_) => format!("killed by signal {number}"),
            }
        }
    }
}

/// `argv` as a shell would need it typed.
fn shell_words(argv: &[String]) -> String {
    let quote = |word: &String| {
        let plain = !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c));
        if plain {
            word.clone()
        } else {
            format!("'{}'", word.replace('\'', r"'\''"))
        }
    };
    argv.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// `2023-11-14T22:13:20Z`.
fn format_unix_ms(unix_ms: u64) -> String {
    let seconds = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn to_json(value: &impl serde::Serialize) -> Result<String, Failure> {
    serde_json::to_string(value).map_err(|error| Failure::Failed(error.to_string()))
}

fn print_line(text: &str) -> Result<(), Failure> {
    print_text(&format!("{text}\n"))
}

fn print_text(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .or_else(|error| output_failure(error).map_or(Ok(()), Err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| word.to_string()).collect()
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix_ms(1_700_000_000_123), "2023-11-14T22:13:20Z");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn signals_by_number_or_name() {
        assert_eq!(parse_signal("15"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("term"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGUSR1"), Ok(Signal::SIGUSR1));
        assert!(parse_signal("NOPE").unwrap_err().contains("NOPE"));
        assert!(parse_signal("0").is_err());
    }

    #[test]
    fn options_and_name_in_any_order() {
        let parsed = parse(
            "logs",
            &strings(&["--tail", "5", "web", "-f"]),
            &["-f", "--tail"],
        )
        .unwrap();
        assert_eq!(parsed.name.as_deref(), Some("web"));
        assert_eq!(parsed.tail, Some(5));
        assert!(parsed.follow);
        let unknown = parse("logs", &strings(&["web", "--json"]), &["-f"]).unwrap_err();
        assert_eq!(unknown.exit_code(), 2);
        assert!(unknown.to_string().contains("--json"), "{unknown}");
        let nameless = parse("show", &[], &["--json"])
            .unwrap()
            .session()
            .unwrap_err();
        assert_eq!(nameless.exit_code(), 2);
    }

    #[test]
    fn commands_are_quoted_for_a_shell() {
        assert_eq!(
            shell_words(&strings(&["sh", "-c", "echo it's", ""])),
            r"sh -c 'echo it'\''s' ''"
        );
    }
}
