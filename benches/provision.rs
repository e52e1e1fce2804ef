//! `run` provisioning, through the real `banger` binary, against baselines measured in the
//! same run.
//!
//! 1. **A `run = "true"` step** (the `debian-bookworm` image and `debian-cloud-amd64` kernel
//!    already built): the step's own wall time as the engine reports it (`step_finished`:
//!    builder VM boot with the agent as PID 1 → `true` → clean power-off → the diff read
//!    into a layer), the command changed each time so the step really runs. Baseline:
//!    `banger vm run --rm --memory 2G -- true` on the same image (create → boot with systemd
//!    → agent → `true` → delete). The two alternate, so drift hits both; median of 3 each.
//!    Target: the step costs less than the `vm run`. The same step with `init = "systemd"`
//!    is measured beside them (item 4 of the issue: how much the PID-1 builder saves).
//! 2. **A cached rebuild of a 5-step Bangerfile** (two `run`, two `copy`, one more `run`):
//!    built once (not timed), then `banger build` with everything stored, median of 5.
//!    Baseline: `banger graph` of the same project in the same run (loading, planning and
//!    keying without the engine). Target: ≤ 200 ms.
//! 3. **An unchanged `banger build --bundle OUT`** of that project (the bundle step stored):
//!    median of 5. Baseline: `cp` of the bundle file. Target: ≤ 200 ms.
//!
//! Everything happens in a HOME kept under `target/bench-provision-home` (its store is
//! seeded on the first run from `target/bench-boot-home` or `target/bench-vm-home` when one
//! exists), with a daemon of its own that is stopped at the end, also when the bench fails.
//! Needs QEMU, vhost-device-vsock, mmdebstrap and apt (to build the image and kernel when no
//! store can be seeded). Run: `cargo bench --bench provision` (or `scripts/bench-provision`).

// Not every helper is used here.
#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use common::{Sandbox, median, ms, secs, seed_store};

const STEP_RUNS: usize = 3;
const REBUILD_RUNS: usize = 5;
const REBUILD_TARGET: Duration = Duration::from_millis(200);

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// The wall time the engine reported for `step` in a `--json` run's output.
fn step_duration(stdout: &[u8], step: &str) -> Duration {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["type"] == "step_finished" && event["data"]["step"] == step)
        .and_then(|event| event["data"]["duration_ms"].as_u64())
        .map(Duration::from_millis)
        .unwrap_or_else(|| panic!("{step} did not run:\n{}", String::from_utf8_lossy(stdout)))
}

fn project(root: &Path, name: &str, bangerfile: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Bangerfile"), bangerfile).unwrap();
    dir
}

fn main() -> ExitCode {
    if std::env::args().any(|arg| arg == "--list") {
        println!("provision: benchmark");
        return ExitCode::SUCCESS;
    }
    let home = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-provision-home");
    std::fs::create_dir_all(&home).unwrap();
    seed_store(&home, &["bench-boot-home", "bench-vm-home"]);
    let runtime = std::env::temp_dir().join(format!("banger-bench-prov-{}", std::process::id()));
    std::fs::create_dir_all(&runtime).unwrap();
    let sandbox = Sandbox {
        home: home.clone(),
        runtime,
    };
    let projects = home.join("projects");
    std::fs::create_dir_all(&projects).unwrap();

    eprintln!("preparing: the default kernel and image (built unless stored)");
    sandbox.banger(&["kernel", "pull", "debian-cloud-amd64"], &home);
    sandbox.banger(&["image", "pull", "debian-bookworm"], &home);

    // 1. A `run = "true"` step against `vm run --rm -- true`.
    let nonce = std::process::id();
    let mut steps = Vec::new();
    let mut systemd_steps = Vec::new();
    let mut runs = Vec::new();
    for round in 0..STEP_RUNS {
        for (init, samples) in [("agent", &mut steps), ("systemd", &mut systemd_steps)] {
            // A new command each time: the step has a new key and runs.
            let dir = project(
                &projects,
                &format!("true-{init}"),
                &format!(
                    "[project]\nname = \"bench-true\"\n\n[[image.provision]]\n\
                     run = \"true # {nonce} {round}\"\ninit = \"{init}\"\n"
                ),
            );
            let (_, output) = sandbox.timed(&["--json", "build"], &dir);
            samples.push(step_duration(&output.stdout, "image:sandbox/provision[0]"));
        }
        let (wall, _) = sandbox.timed(
            &[
                "vm",
                "run",
                "--rm",
                "--image",
                "debian-bookworm",
                "--memory",
                "2G",
                "--",
                "true",
            ],
            &home,
        );
        runs.push(wall);
    }
    let (step, systemd_step, run) = (median(steps), median(systemd_steps), median(runs));
    let step_ok = step < run;
    println!(
        "run = \"true\" step (builder, agent as PID 1): {} median of {STEP_RUNS}",
        secs(step)
    );
    println!(
        "  the same step with init = \"systemd\":       {} ({:.2}× the agent builder)",
        secs(systemd_step),
        ratio(systemd_step, step)
    );
    println!(
        "  baseline `vm run --rm -- true`:              {} ; step / vm run = {:.2}× \
         (target < 1.00×: {})",
        secs(run),
        ratio(step, run),
        verdict(step_ok)
    );

    // 2. A cached rebuild of a five-step Bangerfile.
    let dir = project(
        &projects,
        "five",
        "[project]\nname = \"bench-five\"\n\n\
         [[image.provision]]\nrun = \"echo one > /etc/one\"\n\n\
         [[image.provision]]\ncopy = \"a.txt\"\nto = \"/etc/a.txt\"\n\n\
         [[image.provision]]\nrun = \"echo two > /etc/two\"\n\n\
         [[image.provision]]\ncopy = \"conf\"\nto = \"/etc/conf\"\n\n\
         [[image.provision]]\nrun = \"cat /etc/one /etc/two > /etc/both\"\n",
    );
    std::fs::write(dir.join("a.txt"), "a\n").unwrap();
    std::fs::create_dir_all(dir.join("conf")).unwrap();
    std::fs::write(dir.join("conf/settings"), "x = 1\n").unwrap();
    sandbox.banger(&["build"], &dir);
    let mut rebuilds = Vec::new();
    let mut graphs = Vec::new();
    for _ in 0..REBUILD_RUNS {
        let (wall, output) = sandbox.timed(&["--json", "build"], &dir);
        assert!(
            !String::from_utf8_lossy(&output.stdout).contains("\"step_finished\""),
            "a cached rebuild ran a step"
        );
        rebuilds.push(wall);
        graphs.push(sandbox.timed(&["graph"], &dir).0);
    }
    let (rebuild, graph) = (median(rebuilds), median(graphs));
    println!(
        "cached rebuild of 5 provision steps: {} median of {REBUILD_RUNS} (target ≤ {}: {}); \
         baseline `banger graph` of it {} ; rebuild / graph = {:.2}×",
        ms(rebuild),
        ms(REBUILD_TARGET),
        verdict(rebuild <= REBUILD_TARGET),
        ms(graph),
        ratio(rebuild, graph)
    );
    // 3. The golden bundle of the same project, rebuilt with nothing changed: the stored
    // bundle is copied out. Baseline: `cp` of the bundle file, the floor of writing it.
    let out = dir.join("golden.tar.zst");
    let out_arg = out.to_string_lossy().into_owned();
    sandbox.banger(&["build", "--bundle", &out_arg], &dir);
    let first_sum = std::fs::read(&out).map(|bytes| bytes.len()).unwrap_or(0);
    let mut bundles = Vec::new();
    let mut copies = Vec::new();
    for _ in 0..REBUILD_RUNS {
        let (wall, output) = sandbox.timed(&["--json", "build", "--bundle", &out_arg], &dir);
        assert!(
            !String::from_utf8_lossy(&output.stdout).contains("\"step_finished\""),
            "an unchanged bundle rebuild ran a step"
        );
        bundles.push(wall);
        let copy = dir.join("copy.tar.zst");
        let started = Instant::now();
        let status = Command::new("cp").arg(&out).arg(&copy).status().unwrap();
        assert!(status.success());
        copies.push(started.elapsed());
        let _ = std::fs::remove_file(&copy);
    }
    let (bundle, copy) = (median(bundles), median(copies));
    let bundle_ok = bundle <= REBUILD_TARGET;
    println!(
        "unchanged `build --bundle` ({:.1} MiB bundle): {} median of {REBUILD_RUNS} (target ≤ {}: \
         {}); baseline `cp` of the bundle {} ; build / cp = {:.2}×",
        first_sum as f64 / f64::from(1 << 20),
        ms(bundle),
        ms(REBUILD_TARGET),
        verdict(bundle_ok),
        ms(copy),
        ratio(bundle, copy)
    );
    if step_ok && rebuild <= REBUILD_TARGET && bundle_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
