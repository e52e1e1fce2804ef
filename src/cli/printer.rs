//! All terminal output of the CLI goes through the [`Printer`].
//!
//! stdout is data (tables, graphs, JSON Lines); stderr is talk (progress, notes, warnings,
//! errors). One place decides quiet/normal/verbose, colour (`NO_COLOR`, TTY) and whether
//! progress bars are drawn (`BANGER_NO_PROGRESS`, TTY, `--json`, `--quiet`).
//!
//! `--json` output is JSON Lines on stdout, one object per line, always with the envelope
//! `{"type": "<name>", "data": <payload>}` (see `docs/cli.md` for every type).

use std::io::{IsTerminal, Write};

use serde_json::{Value, json};

use banger::env;

/// How chatty stderr is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// Where the CLI writes, and how.
#[derive(Debug, Clone)]
pub struct Printer {
    pub verbosity: Verbosity,
    pub json: bool,
    /// Colour on stdout (data) and stderr (talk) separately: one may be piped.
    pub color_stdout: bool,
    pub color_stderr: bool,
    /// Draw progress bars on stderr (read by the engine's renderers).
    #[allow(dead_code)]
    pub progress: bool,
    /// The last error printed, kept for `--json`'s closing `error` record.
    last_error: std::sync::Arc<std::sync::Mutex<Option<ReportedError>>>,
}

/// An error as `--json`'s closing record gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedError {
    pub message: String,
    /// The chain of causes under the message, outermost first.
    pub causes: Vec<String>,
}

/// Writing to stdout failed because the reader went away (`banger cache ls | head`).
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct BrokenPipe;

impl Printer {
    pub fn new(verbosity: Verbosity, json: bool) -> Printer {
        let no_color = env::no_color();
        let stderr_tty = std::io::stderr().is_terminal();
        Printer {
            verbosity,
            json,
            color_stdout: !no_color && !json && std::io::stdout().is_terminal(),
            color_stderr: !no_color && stderr_tty,
            progress: stderr_tty && !json && verbosity != Verbosity::Quiet && !env::no_progress(),
            last_error: Default::default(),
        }
    }

    /// Writes data to stdout. A closed pipe is reported as [`BrokenPipe`] so `main` can exit
    /// quietly.
    pub fn data(&self, text: &str) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        let result = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush());
        match result {
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Err(BrokenPipe.into()),
            other => Ok(other?),
        }
    }

    /// Writes one JSON Lines record `{"type": kind, "data": data}` to stdout.
    pub fn record(&self, kind: &str, data: Value) -> anyhow::Result<()> {
        let mut line = json!({"type": kind, "data": data}).to_string();
        line.push('\n');
        self.data(&line)
    }

    /// A note on stderr, hidden by `--quiet` (and by `--json`, which keeps stderr for errors).
    pub fn info(&self, text: &str) {
        if self.verbosity >= Verbosity::Normal && !self.json {
            eprintln!("{text}");
        }
    }

    /// A note shown only with `-v`: on stderr, or with `--json` as a `{detail}` record of
    /// `kind`.
    pub fn detail(&self, kind: &str, text: &str) {
        if self.verbosity < Verbosity::Verbose {
            return;
        }
        if self.json {
            let _ = self.record(kind, json!({ "detail": text }));
        } else {
            eprintln!("{text}");
        }
    }

    pub fn warn(&self, text: &str) {
        if self.verbosity >= Verbosity::Normal {
            eprintln!("{} {text}", self.paint_stderr("warning:", "\x1b[1;33m"));
        }
    }

    /// An error on stderr; never hidden.
    pub fn error(&self, text: &str) {
        self.error_with_causes(text, Vec::new());
    }

    /// An error on stderr as `text` (which already reads its causes), with the causes kept
    /// apart for `--json`'s closing record.
    pub fn error_with_causes(&self, text: &str, causes: Vec<String>) {
        eprintln!("{} {text}", self.paint_stderr("error:", "\x1b[1;31m"));
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(ReportedError {
                message: text.to_owned(),
                causes,
            });
        }
    }

    /// With `--json`, ends a failed command's output with one record
    /// `{"type": "error", "data": {message, causes, exit_code}}` for the last error printed;
    /// nothing when no error was (a guest command's own exit status is not banger's error).
    pub fn close_with_error_record(&self, exit_code: u8) {
        if !self.json || exit_code == 0 {
            return;
        }
        let Some(error) = self.last_error.lock().ok().and_then(|last| last.clone()) else {
            return;
        };
        let _ = self.record(
            "error",
            json!({
                "message": error.message,
                "causes": error.causes,
                "exit_code": exit_code,
            }),
        );
    }

    fn paint_stderr(&self, text: &str, code: &str) -> String {
        if self.color_stderr {
            format!("{code}{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// `1.2 GiB`, `512 B`: sizes for people (binary units, one decimal).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `850 ms`, `12.3 s`, `2 min 05 s`.
pub fn human_duration(duration: std::time::Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 {
        format!("{millis} ms")
    } else if millis < 60_000 {
        format!("{:.1} s", duration.as_secs_f64())
    } else {
        let secs = duration.as_secs();
        format!("{} min {:02} s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(
            human_duration(std::time::Duration::from_millis(850)),
            "850 ms"
        );
        assert_eq!(
            human_duration(std::time::Duration::from_millis(12_340)),
            "12.3 s"
        );
        assert_eq!(
            human_duration(std::time::Duration::from_secs(125)),
            "2 min 05 s"
        );
    }
}
