//! What the engine tells its caller while it runs.
//!
//! Only the engine's scheduling loop calls the [`Reporter`]; running steps send their progress
//! to the loop over a channel. The CLI renders events as progress bars or JSON Lines; the daemon
//! streams them to clients. The engine itself never prints.
//!
//! [`Event`] is `Serialize + Deserialize` in one stable representation (see its doc), the one
//! `--json` prints, so an event can cross the daemon socket and be rendered on the other side
//! exactly as if the engine had run in the client.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::key::Key;

/// How a cached step was satisfied. Serialized as `"cached"`, `"cutoff"`, `"shared"` or
/// `"remote"` ([`HitKind::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HitKind {
    /// Its definition key was in the store.
    #[serde(rename = "cached")]
    Definition,
    /// Its inputs re-ran but produced identical bytes; the content key hit (early cutoff).
    #[serde(rename = "cutoff")]
    Content,
    /// Another run was executing the same step; this one waited for it.
    #[serde(rename = "shared")]
    Shared,
    /// Its definition key was in the remote cache: its outputs were downloaded.
    #[serde(rename = "remote")]
    Remote,
}

impl HitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HitKind::Definition => "cached",
            HitKind::Content => "cutoff",
            HitKind::Shared => "shared",
            HitKind::Remote => "remote",
        }
    }
}

/// Units of step progress. Serialized as `"bytes"` or `"items"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressUnit {
    Bytes,
    Items,
}

/// Which of a command's outputs a line came from. Serialized as `"stdout"` or `"stderr"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// One thing that happened in a run.
///
/// Serialized (serde) as `{"type": "<variant in snake_case>", "data": {<fields>}}`, the JSON
/// Lines envelope of `banger --json` (`docs/cli.md`), for example
/// `{"type": "step_finished", "data": {"step": "…", "kind": "…", "duration_ms": 1500,
/// "output_bytes": 4096}}`. Within `data`: keys are 64 hex digits, durations are whole
/// milliseconds in a field named `duration_ms` (sub-millisecond precision is dropped), a
/// missing `total` is `null`, [`HitKind`] and [`ProgressUnit`] are the strings their docs
/// name. Renaming a variant or field changes this wire format: the daemon protocol version
/// must then change too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
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
    /// A step's outputs (`bytes` in all) are being downloaded from the remote cache; progress
    /// follows as `step_progress`, and `step_cached` with hit `remote` ends it (or a
    /// `cache_warning`, and the step runs here). Comes before `run_started`.
    StepFetching {
        step: String,
        kind: String,
        bytes: u64,
    },
    /// A step's outputs (`bytes` in all) are being uploaded to the remote cache after the
    /// run; progress follows as `step_progress`, then `step_pushed` (or a `cache_warning`).
    StepPushing {
        step: String,
        kind: String,
        bytes: u64,
    },
    /// A step is in the remote cache: `uploaded_bytes` were sent, `reused_bytes` were there
    /// already.
    StepPushed {
        step: String,
        kind: String,
        uploaded_bytes: u64,
        reused_bytes: u64,
    },
    /// Uploading to the remote cache is over: `pushed` steps sent, `present` were there.
    PushFinished {
        remote: String,
        pushed: usize,
        present: usize,
        uploaded_bytes: u64,
    },
    StepProgress {
        step: String,
        done: u64,
        total: Option<u64>,
        unit: ProgressUnit,
    },
    /// A line a running step's command printed (a `run` provisioning step); the step's kept
    /// log has all of them.
    StepOutput {
        step: String,
        stream: OutputStream,
        line: String,
    },
    StepFinished {
        step: String,
        kind: String,
        #[serde(rename = "duration_ms", with = "millis")]
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
    /// `remote` of the `cached` steps came from the remote cache, `remote_bytes` in all.
    RunFinished {
        ran: usize,
        cached: usize,
        #[serde(default)]
        remote: usize,
        #[serde(default)]
        remote_bytes: u64,
        failed: usize,
        skipped: usize,
        #[serde(rename = "duration_ms", with = "millis")]
        duration: Duration,
    },
}

/// A [`Duration`] as a whole number of milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One event of each kind, as `banger --json` prints them (keys sorted).
    const LINES: &[&str] = &[
        r#"{"data":{"cached":1,"steps":3,"to_run":2},"type":"run_started"}"#,
        r#"{"data":{"hit":"cutoff","key":"abababababababababababababababababababababababababababababababab","kind":"rootfs.build","step":"image:a/rootfs"},"type":"step_cached"}"#,
        r#"{"data":{"key":"abababababababababababababababababababababababababababababababab","kind":"oci.fetch-layer","step":"image:a/layer","summary":"sha256:…"},"type":"step_started"}"#,
        r#"{"data":{"done":10,"step":"image:a/layer","total":null,"unit":"bytes"},"type":"step_progress"}"#,
        r#"{"data":{"done":1,"step":"image:a/layer","total":2,"unit":"items"},"type":"step_progress"}"#,
        r#"{"data":{"duration_ms":1500,"kind":"oci.fetch-layer","output_bytes":4096,"step":"image:a/layer"},"type":"step_finished"}"#,
        r#"{"data":{"error":"boom: because","kind":"k","step":"s"},"type":"step_failed"}"#,
        r#"{"data":{"because":"s","step":"t"},"type":"step_skipped"}"#,
        r#"{"data":{"step":"u"},"type":"step_cancelled"}"#,
        r#"{"data":{"step":"","warning":"disk full"},"type":"cache_warning"}"#,
        r#"{"data":{"bytes":300,"kind":"provision.run","step":"image:a/provision[0]"},"type":"step_fetching"}"#,
        r#"{"data":{"bytes":300,"kind":"provision.run","step":"image:a/provision[0]"},"type":"step_pushing"}"#,
        r#"{"data":{"kind":"provision.run","reused_bytes":100,"step":"image:a/provision[0]","uploaded_bytes":200},"type":"step_pushed"}"#,
        r#"{"data":{"present":2,"pushed":1,"remote":"127.0.0.1:5000/team/cache","uploaded_bytes":200},"type":"push_finished"}"#,
        r#"{"data":{"cached":1,"duration_ms":1600,"failed":1,"ran":1,"remote":1,"remote_bytes":300,"skipped":1},"type":"run_finished"}"#,
    ];

    #[test]
    fn events_round_trip_through_their_json_lines() {
        for line in LINES {
            let event: Event = serde_json::from_str(line).expect(line);
            let value = serde_json::to_value(&event).expect("serializes");
            assert_eq!(value.to_string(), *line);
            let back: Event = serde_json::from_value(value).expect("deserializes");
            assert_eq!(back, event, "{line}");
        }
    }

    #[test]
    fn fields_map_to_their_wire_form() {
        let key = Key::from_bytes([0xab; 32]);
        let cached: Event = serde_json::from_str(LINES[1]).expect("deserializes");
        assert_eq!(
            cached,
            Event::StepCached {
                step: "image:a/rootfs".into(),
                kind: "rootfs.build".into(),
                key,
                hit: HitKind::Content,
            }
        );
        let finished: Event = serde_json::from_str(LINES[5]).expect("deserializes");
        assert!(matches!(
            finished,
            Event::StepFinished { duration, .. } if duration == Duration::from_millis(1500)
        ));
        // Written directly rather than through a `Value`, `type` comes first.
        let cancelled = Event::StepCancelled { step: "u".into() };
        assert_eq!(
            serde_json::to_string(&cancelled).expect("serializes"),
            r#"{"type":"step_cancelled","data":{"step":"u"}}"#
        );
        // Whole milliseconds only.
        let run = Event::RunFinished {
            ran: 0,
            cached: 0,
            remote: 0,
            remote_bytes: 0,
            failed: 0,
            skipped: 0,
            duration: Duration::from_micros(2_999),
        };
        assert_eq!(
            serde_json::to_value(&run).expect("serializes")["data"]["duration_ms"],
            2
        );
        for hit in [
            HitKind::Definition,
            HitKind::Content,
            HitKind::Shared,
            HitKind::Remote,
        ] {
            assert_eq!(
                serde_json::to_value(hit).expect("serializes"),
                serde_json::json!(hit.as_str())
            );
        }
    }
}
