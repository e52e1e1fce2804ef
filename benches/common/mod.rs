//! Helpers the benchmarks share (each bench is its own crate: `mod common;`).

use std::path::Path;
use std::time::Duration;

pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

pub fn secs(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

pub fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

pub fn json_record(stdout: &str, kind: &str) -> serde_json::Value {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|record| record["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} record in {stdout}"))["data"]
        .clone()
}

/// Hard-links a stored file out of the bench HOME's store.
pub fn materialize(home: &Path, integrity: &str, size: u64, to: &Path) {
    let store = banger::store::Store::open(home.join(".cache/banger/store")).expect("store");
    let _ = std::fs::remove_file(to);
    store
        .materialize(
            &banger::store::OutputRef {
                integrity: integrity.to_owned(),
                size,
            },
            to,
        )
        .expect("materialize");
}
