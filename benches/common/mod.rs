//! Helpers the benchmarks share (each bench is its own crate: `mod common;`).

pub mod rootfs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// The bench HOME with a daemon of its own, stopped on drop.
#[derive(Debug)]
pub struct Sandbox {
    pub home: PathBuf,
    /// Short, under `/tmp`: the daemon's and the VMs' sockets.
    pub runtime: PathBuf,
}

impl Sandbox {
    pub fn command(&self, args: &[&str], dir: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_banger"));
        command.args(args).current_dir(dir);
        for name in banger::env::ALL.iter().chain(banger::env::STANDARD) {
            command.env_remove(name);
        }
        command
            .env("HOME", &self.home)
            .env(banger::env::BANGER_RUNTIME_DIR, &self.runtime)
            .env(banger::env::BANGER_NO_PROGRESS, "1")
            .stdin(Stdio::null());
        command
    }

    /// `banger ARGS` in `dir`; panics with its output if it fails.
    pub fn banger(&self, args: &[&str], dir: &Path) -> Output {
        let output = self.command(args, dir).output().expect("run banger");
        assert!(
            output.status.success(),
            "banger {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// `banger ARGS` in `dir`, timed from spawn to exit.
    pub fn timed(&self, args: &[&str], dir: &Path) -> (Duration, Output) {
        let started = Instant::now();
        let output = self.banger(args, dir);
        (started.elapsed(), output)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self
            .command(&["daemon", "stop"], &self.home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

/// On the first run, copies the store of the first of `donors` (other benches' HOMEs under
/// `target/`) that has one: its image and kernel steps are then hits.
pub fn seed_store(home: &Path, donors: &[&str]) {
    let store = home.join(".cache/banger/store");
    if store.exists() {
        return;
    }
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let Some(donor) = donors
        .iter()
        .map(|home| target.join(home).join(".cache/banger/store"))
        .find(|store| store.is_dir())
    else {
        return;
    };
    eprintln!(
        "seeding {} with a copy of {}",
        store.display(),
        donor.display()
    );
    std::fs::create_dir_all(store.parent().unwrap()).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(&donor)
        .arg(&store)
        .status()
        .expect("run cp");
    if !status.success() {
        let _ = std::fs::remove_dir_all(&store);
        eprintln!("could not copy the store ({status}): building from scratch");
    }
}
