//! `tracing` for this process: `BANGER_LOG` (else `RUST_LOG`) filters, `-v`/`-vv`/`-vvv` set
//! `banger=info`/`debug`/`trace` when neither is set. The CLI writes to stderr (nothing below
//! `warn` by default); `banger daemon run` writes to `daemon.log` instead.

use std::path::Path;

use tracing_subscriber::EnvFilter;

use banger::daemon::log::{LOG_CAP, RotatingLog};

/// The filter: the environment's, else the one `-v`s ask for, else `default`.
fn filter(verbose: u8, default: &str) -> EnvFilter {
    let from_environment = [banger::env::BANGER_LOG, banger::env::RUST_LOG]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()));
    let directives = match (from_environment, verbose) {
        (Some(directives), _) => directives,
        (None, 0) => default.to_owned(),
        (None, 1) => "warn,banger=info".to_owned(),
        (None, 2) => "warn,banger=debug".to_owned(),
        (None, _) => "warn,banger=trace".to_owned(),
    };
    EnvFilter::try_new(&directives).unwrap_or_else(|error| {
        eprintln!("banger: ignoring the log filter `{directives}`: {error}");
        EnvFilter::new(default)
    })
}

/// A command's events on stderr.
pub fn init_cli(verbose: u8, color: bool) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(verbose, "warn"))
        .with_writer(std::io::stderr)
        .with_ansi(color)
        .with_target(true)
        .without_time()
        .try_init();
}

/// The daemon's events in `path` (`daemon.log`), rotated past its cap; when stderr is that
/// file (a daemon the CLI started), stderr follows it across rotations.
pub fn init_daemon(verbose: u8, path: &Path) -> std::io::Result<()> {
    let follow = banger::daemon::log::stderr_is(path);
    let log = RotatingLog::open(path, LOG_CAP, follow)?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(verbose, "info"))
        .with_writer(log)
        .with_ansi(false)
        .try_init();
    Ok(())
}
