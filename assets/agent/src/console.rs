//! Console messages with time since boot, like the kernel's: `[   1.234] banger: …`.
//!
//! Serial output is slow under emulation, so progress lines are few and short, and `quiet`
//! (from the kernel command line) keeps only warnings and errors. Benchmarks read the
//! milestones from these timestamps.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

static QUIET: AtomicBool = AtomicBool::new(false);

pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether progress lines are dropped (so helpers the agent starts can be told the same).
pub fn is_quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Time since the kernel started (CLOCK_BOOTTIME, which counts suspended time too).
pub fn since_boot() -> Duration {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_default()
}

fn line(level: &str, message: &str) {
    let at = since_boot();
    // One write per line, so lines from different threads do not interleave.
    let text = format!(
        "[{:>5}.{:03}] banger: {level}{message}\n",
        at.as_secs(),
        at.subsec_millis()
    );
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// A progress line, dropped under `quiet`.
pub fn info(message: &str) {
    if !QUIET.load(Ordering::Relaxed) {
        line("", message);
    }
}

/// Something went wrong but boot goes on.
pub fn warn(message: &str) {
    line("warning: ", message);
}

/// Boot cannot go on.
pub fn error(message: &str) {
    line("error: ", message);
}
