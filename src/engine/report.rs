//! What the engine tells its caller while it runs.
//!
//! Only the engine's scheduling loop calls the [`Reporter`]; running steps send their progress
//! to the loop over a channel. The CLI renders events as progress bars or JSON Lines; the daemon
//! (later) streams them to clients. The engine itself never prints.

use std::time::Duration;

use crate::key::Key;

/// How a cached step was satisfied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitKind {
    /// Its definition key was in the store.
    Definition,
    /// Its inputs re-ran but produced identical bytes; the content key hit (early cutoff).
    Content,
    /// Another run was executing the same step; this one waited for it.
    Shared,
}

impl HitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HitKind::Definition => "cached",
            HitKind::Content => "cutoff",
            HitKind::Shared => "shared",
        }
    }
}

/// Units of step progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressUnit {
    Bytes,
    Items,
}

/// One thing that happened in a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The run's plan is checked: `to_run` steps will execute, `cached` are already done.
    RunStarted {
        steps: usize,
        cached: usize,
        to_run: usize,
    },
    /// A step was satisfied without running.
    StepCached {
        step: String,
        kind: String,
        key: Key,
        hit: HitKind,
    },
    StepStarted {
        step: String,
        kind: String,
        key: Key,
        summary: String,
    },
    StepProgress {
        step: String,
        done: u64,
        total: Option<u64>,
        unit: ProgressUnit,
    },
    StepFinished {
        step: String,
        kind: String,
        duration: Duration,
        output_bytes: u64,
    },
    /// A step failed; `error` is the whole error chain, rendered once.
    StepFailed {
        step: String,
        kind: String,
        error: String,
    },
    /// A step was not run because `because` (an input) failed or was cancelled.
    StepSkipped { step: String, because: String },
    /// A running step was interrupted.
    StepCancelled { step: String },
    /// A stored output could not be recorded; the step's result is still used.
    CacheWarning { step: String, warning: String },
    RunFinished {
        ran: usize,
        cached: usize,
        failed: usize,
        skipped: usize,
        duration: Duration,
    },
}

/// Receives engine events. Implementations must be cheap: they run on the scheduling loop.
pub trait Reporter: Send + Sync {
    fn report(&self, event: &Event);
}

/// Drops every event (tests, `--quiet` paths that need no output).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullReporter;

impl Reporter for NullReporter {
    fn report(&self, _event: &Event) {}
}

/// Collects events in memory (tests).
#[derive(Debug, Default)]
pub struct RecordingReporter {
    events: std::sync::Mutex<Vec<Event>>,
}

impl RecordingReporter {
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Reporter for RecordingReporter {
    fn report(&self, event: &Event) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event.clone());
        }
    }
}
