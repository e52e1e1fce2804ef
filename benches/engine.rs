//! Engine and store benchmarks. Run: `cargo bench --bench engine` (or `scripts/bench-engine`).
//!
//! Each figure is printed next to a baseline measured in the same invocation, as a ratio, so
//! a noisy shared machine moves both together:
//! 1. plan + key + cache check of a 10,000-step graph, everything cached (target ≤ 1 s);
//!    baseline: the raw cacache index lookups of the same keys.
//! 2. scheduling overhead per executed no-op step (target ≤ 100 µs); baseline: spawning a
//!    tokio task per step and collecting its message over a channel, with no engine.
//! 3. a cache hit for one 1 GiB output (target: no copy of the bytes); baseline: copying the
//!    file once.
//!
//! `BANGER_BENCH_STEPS` changes the graph size (default 10000), `BANGER_BENCH_HIT_MIB` the
//! size of the big output (default 1024).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use banger::engine::{
    BoxFuture, Engine, Executor, NullReporter, ResourceLimits, RunOptions, StepContext, StepError,
};
use banger::key::Params;
use banger::plan::{Plan, ResourceClass, StepNode};
use banger::store::Store;

/// Writes a tiny output derived from its params (`bench.write`), or a `mib`-MiB one.
#[derive(Debug)]
struct WriteStep;

impl Executor for WriteStep {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let path = ctx.output("out")?;
            let mut file = std::fs::File::create(&path)
                .map_err(|e| StepError::with_source("create output", e))?;
            match ctx.params.get_int("mib") {
                Some(mib) => {
                    let mut chunk = vec![0u8; 1 << 20];
                    for index in 0..mib {
                        // Distinct bytes per MiB, so nothing can be deduplicated or sparse.
                        chunk[..8].copy_from_slice(&index.to_le_bytes());
                        chunk[4096..4104].copy_from_slice(&index.to_le_bytes());
                        file.write_all(&chunk)
                            .map_err(|e| StepError::with_source("write output", e))?;
                    }
                }
                None => file
                    .write_all(format!("{:?}", ctx.params).as_bytes())
                    .map_err(|e| StepError::with_source("write output", e))?,
            }
            Ok(())
        })
    }
}

/// Does nothing (`bench.noop`, never cached).
#[derive(Debug)]
struct NoopStep;

impl Executor for NoopStep {
    fn execute<'a>(&'a self, _ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async { Ok(()) })
    }
}

fn engine(store: &Path) -> Engine {
    Engine::builder(Store::open(store).expect("open store"))
        .limits(ResourceLimits::uniform(64))
        .executor("bench.write", WriteStep)
        .executor("bench.noop", NoopStep)
        .build()
}

/// `steps` steps in layers of 100; each step reads two steps of the layer before, like a wide
/// build graph. Every step is a target, so every one is looked up.
fn layered_plan(steps: usize, kind: &str, never_cached: bool) -> Plan {
    let width = 100.min(steps);
    let mut plan = Plan::new();
    let mut previous = Vec::new();
    let mut layer = Vec::new();
    for index in 0..steps {
        let mut node = StepNode::new(
            format!("step[{index}]"),
            kind,
            1,
            Params::new()
                .with("index", index as u64)
                .with("command", format!("build part {index}")),
            ResourceClass::Cpu,
        );
        if never_cached {
            node = node.never_cached();
        }
        let node = plan.add_step(node).expect("unique ids");
        if !previous.is_empty() {
            let position = index % width;
            plan.add_input(node, "left", previous[position]);
            plan.add_input(node, "right", previous[(position + 1) % previous.len()]);
        }
        plan.add_target(node);
        layer.push(node);
        if layer.len() == width {
            previous = std::mem::take(&mut layer);
        }
    }
    plan
}

fn run(
    runtime: &tokio::runtime::Runtime,
    engine: &Engine,
    plan: &Plan,
) -> banger::engine::RunReport {
    runtime
        .block_on(engine.run(plan, "bench", &NullReporter, RunOptions::default()))
        .expect("the benchmark plan runs")
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn bench_cached_graph(runtime: &tokio::runtime::Runtime, dir: &Path, steps: usize) {
    let store_dir = dir.join("graph-store");
    let engine = engine(&store_dir);
    let populate = Instant::now();
    let report = run(runtime, &engine, &layered_plan(steps, "bench.write", false));
    assert_eq!(report.ran.len(), steps);
    println!(
        "setup: populated {steps} steps in {:.1} s",
        populate.elapsed().as_secs_f64()
    );

    let mut totals = Vec::new();
    let mut plans = Vec::new();
    let mut keys_only = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let plan = layered_plan(steps, "bench.write", false);
        plans.push(started.elapsed());
        let keyed = Instant::now();
        let keys = plan.definition_keys().expect("acyclic");
        keys_only.push(keyed.elapsed());
        assert_eq!(keys.len(), steps);
        let report = run(runtime, &engine, &plan);
        totals.push(started.elapsed());
        assert!(report.ran.is_empty(), "everything must be cached");
        assert_eq!(report.cached.len(), steps);
    }
    let total = median(totals);

    // Baseline: the index lookups alone, straight through cacache.
    let keys = layered_plan(steps, "bench.write", false)
        .definition_keys()
        .expect("acyclic");
    let mut baselines = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        for key in &keys {
            let entry = format!("{}/def/{}", banger::store::NAMESPACE, key.to_hex());
            let found = cacache::index::find(&store_dir, &entry).expect("index readable");
            assert!(found.is_some());
        }
        baselines.push(started.elapsed());
    }
    let baseline = median(baselines);
    println!(
        "plan + cache check, {steps} steps, all cached: {:.0} ms (plan {:.0} ms, keys {:.0} ms; target ≤ 1000 ms) = {:.2}× raw cacache index lookups ({:.0} ms)",
        ms(total),
        ms(median(plans)),
        ms(median(keys_only)),
        ms(total) / ms(baseline),
        ms(baseline),
    );
}

fn bench_scheduling(runtime: &tokio::runtime::Runtime, dir: &Path, steps: usize) {
    let engine = engine(&dir.join("noop-store"));
    let plan = layered_plan(steps, "bench.noop", true);
    run(runtime, &engine, &plan); // warm-up
    let mut samples = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let report = run(runtime, &engine, &plan);
        samples.push(started.elapsed());
        assert_eq!(report.ran.len(), steps);
    }
    let per_step = median(samples).as_secs_f64() * 1e6 / steps as f64;

    // Baseline: the bare mechanism the engine builds on, one task and one message per step.
    let mut baselines = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        runtime.block_on(async {
            let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
            for index in 0..steps {
                let sender = sender.clone();
                tokio::spawn(async move {
                    let _ = sender.send(index);
                });
            }
            drop(sender);
            let mut received = 0;
            while receiver.recv().await.is_some() {
                received += 1;
            }
            assert_eq!(received, steps);
        });
        baselines.push(started.elapsed());
    }
    let baseline_per_step = median(baselines).as_secs_f64() * 1e6 / steps as f64;
    println!(
        "scheduling overhead per executed no-op step ({steps} steps, 2 inputs each): {per_step:.1} µs (target ≤ 100 µs) = {:.1}× a bare tokio task + channel message ({baseline_per_step:.2} µs)",
        per_step / baseline_per_step,
    );
}

fn bench_big_hit(runtime: &tokio::runtime::Runtime, dir: &Path, mib: u64) {
    let store_dir = dir.join("big-store");
    let engine = engine(&store_dir);
    let mut plan = Plan::new();
    plan.add_step(StepNode::new(
        "big",
        "bench.write",
        1,
        Params::new().with("mib", mib),
        ResourceClass::Disk,
    ))
    .expect("one step");
    let started = Instant::now();
    let first = run(runtime, &engine, &plan);
    println!(
        "setup: built and stored a {mib} MiB output in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let output = first.outputs["big"].outputs["out"].clone();

    let mut samples = Vec::new();
    let mut linked = Vec::new();
    for round in 0..5 {
        let target = dir.join(format!("hit-{round}"));
        let started = Instant::now();
        let report = run(runtime, &engine, &plan);
        engine
            .store()
            .materialize(&report.outputs["big"].outputs["out"], &target)
            .expect("materialize");
        samples.push(started.elapsed());
        assert!(report.ran.is_empty());
        linked.push(std::fs::metadata(&target).expect("stat").nlink());
    }
    let hit = median(samples);

    // Baseline: one copy of the same bytes.
    let source = dir.join("hit-0");
    let copy_target = dir.join("copy");
    let started = Instant::now();
    std::fs::copy(&source, &copy_target).expect("copy");
    let file = std::fs::File::open(&copy_target).expect("open copy");
    file.sync_all().expect("sync copy");
    let copy = started.elapsed();
    let same_inode = std::fs::metadata(&source).expect("stat").ino()
        == std::fs::metadata(dir.join("hit-1")).expect("stat").ino();
    println!(
        "cache hit of one {mib} MiB output (run + materialize): {:.2} ms = {:.5}× copying it once ({:.0} ms); bytes copied on a hit: {} (hard links: {}, shared inode: {same_inode})",
        ms(hit),
        ms(hit) / ms(copy),
        ms(copy),
        if same_inode && linked.iter().all(|&n| n >= 2) {
            0
        } else {
            output.size
        },
        linked.iter().max().copied().unwrap_or(0),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let steps = env_usize("BANGER_BENCH_STEPS", 10_000);
    let mib = env_usize("BANGER_BENCH_HIT_MIB", 1024) as u64;
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let dir = tempfile::Builder::new()
        .prefix("banger-bench-")
        .tempdir_in(std::env::var_os("BANGER_BENCH_DIR").unwrap_or_else(|| "target".into()))
        .expect("temp dir");
    println!(
        "banger engine benchmarks (medians of 5, temp dir {})",
        dir.path().display()
    );
    bench_cached_graph(&runtime, dir.path(), steps);
    bench_scheduling(&runtime, dir.path(), steps);
    bench_big_hit(&runtime, dir.path(), mib);
}
