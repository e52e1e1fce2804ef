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

    pub fn warn(&self, text: &str) {
        if self.verbosity >= Verbosity::Normal {
            eprintln!("{} {text}", self.paint_stderr("warning:", "\x1b[1;33m"));
        }
    }

    /// An error on stderr; never hidden.
    pub fn error(&self, text: &str) {
        eprintln!("{} {text}", self.paint_stderr("error:", "\x1b[1;31m"));
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
