//! The engine against a real store, with test-only step kinds.

use std::sync::Arc;
use std::time::Duration;

use banger::engine::{
    Engine, EngineError, Event, HitKind, NullReporter, RecordingReporter, ResourceLimits,
    RunOptions,
};
use banger::key::Params;
use banger::plan::{Plan, ResourceClass, StepNode};
use banger::store::{KeyKind, Lookup, Store};

use crate::support::{Counters, WriteExecutor, chain, read_output, write_step};

fn engine(dir: &std::path::Path, counters: &Arc<Counters>, limits: ResourceLimits) -> Engine {
    Engine::builder(Store::open(dir).unwrap())
        .limits(limits)
        .executor(
            "test.write",
            WriteExecutor {
                counters: Arc::clone(counters),
            },
        )
        .build()
}

fn run_blocking(
    engine: &Engine,
    plan: &Plan,
    options: RunOptions,
) -> Result<banger::engine::RunReport, EngineError> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(engine.run(plan, "test", &NullReporter, options))
}

#[test]
fn a_second_run_executes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(4));
    let plan = chain(["a", "b", "c"]);

    let first = run_blocking(&engine, &plan, RunOptions::default()).unwrap();
    assert_eq!(first.ran.len(), 3);
    assert_eq!(read_output(engine.store(), &first, "c"), b"cba");

    let second = run_blocking(&engine, &plan, RunOptions::default()).unwrap();
    assert_eq!(counters.total_runs(), 3, "the second run executed a step");
    assert!(second.ran.is_empty());
    // Only the target is consulted: its definition key hits, so its inputs are not needed.
    assert_eq!(second.cached, [("c".to_owned(), HitKind::Definition)]);
    assert_eq!(read_output(engine.store(), &second, "c"), b"cba");
}

#[test]
fn identical_bytes_from_a_rerun_input_cut_off_its_dependants() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(4));
    run_blocking(&engine, &chain(["a", "b", "c"]), RunOptions::default()).unwrap();

    // A new parameter changes `a`'s key (so it re-runs) but not the bytes it writes.
    let mut plan = Plan::new();
    let a = plan
        .add_step(StepNode::new(
            "a",
            "test.write",
            1,
            Params::new()
                .with("content", "a")
                .with("comment", "reworded"),
            ResourceClass::Cpu,
        ))
        .unwrap();
    let b = plan.add_step(write_step("b", "b")).unwrap();
    let c = plan.add_step(write_step("c", "c")).unwrap();
    plan.add_input(b, "in", a);
    plan.add_input(c, "in", b);

    let report = run_blocking(&engine, &plan, RunOptions::default()).unwrap();
    assert_eq!(report.ran, ["a"]);
    assert_eq!(counters.runs_of("a"), 2);
    assert_eq!(
        counters.runs_of("b"),
        1,
        "b re-ran although its input bytes were identical"
    );
    assert_eq!(counters.runs_of("c"), 1);
    assert_eq!(
        report.cached,
        [
            ("b".to_owned(), HitKind::Content),
            ("c".to_owned(), HitKind::Content)
        ]
    );

    // The cutoff recorded the new definition keys: a third run hits straight away.
    let third = run_blocking(&engine, &plan, RunOptions::default()).unwrap();
    assert!(third.ran.is_empty());
    assert_eq!(counters.runs_of("a"), 2);
}

#[test]
fn changing_a_step_reruns_it_and_everything_after_it_only() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(4));
    run_blocking(&engine, &chain(["a", "b", "c"]), RunOptions::default()).unwrap();
    let report = run_blocking(&engine, &chain(["a", "B", "c"]), RunOptions::default()).unwrap();
    assert_eq!(report.ran, ["b", "c"]);
    assert_eq!(counters.runs_of("a"), 1);
    assert_eq!(read_output(engine.store(), &report, "c"), b"cBa");
}

#[test]
fn concurrent_runs_of_one_step_execute_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(8));
    let mut plan = Plan::new();
    plan.add_step(StepNode::new(
        "slow",
        "test.write",
        1,
        Params::new().with("content", "x").with("sleep_ms", 300u64),
        ResourceClass::Cpu,
    ))
    .unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let reports = runtime.block_on(async {
        let runs = (0..4).map(|_| {
            let engine = engine.clone();
            let plan = plan.clone();
            tokio::spawn(async move {
                engine
                    .run(&plan, "test", &NullReporter, RunOptions::default())
                    .await
            })
        });
        futures_join_all(runs.collect()).await
    });
    assert_eq!(counters.runs_of("slow"), 1, "in-flight dedupe failed");
    let shared = reports
        .iter()
        .filter(|report| report.cached == [("slow".to_owned(), HitKind::Shared)])
        .count();
    assert_eq!(shared, 3);
}

async fn futures_join_all(
    handles: Vec<tokio::task::JoinHandle<Result<banger::engine::RunReport, EngineError>>>,
) -> Vec<banger::engine::RunReport> {
    let mut reports = Vec::new();
    for handle in handles {
        reports.push(handle.await.unwrap().unwrap());
    }
    reports
}

#[test]
fn identical_steps_in_one_plan_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(8));
    let mut plan = Plan::new();
    for id in ["one", "two"] {
        let mut node = write_step(id, "same");
        node.params.insert("sleep_ms", 200u64);
        plan.add_step(node).unwrap();
    }
    let report = run_blocking(&engine, &plan, RunOptions::default()).unwrap();
    assert_eq!(counters.total_runs(), 1);
    assert_eq!(report.ran.len(), 1);
    assert_eq!(report.cached.len(), 1);
}

#[test]
fn resource_classes_bound_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let limits = ResourceLimits::uniform(8).with(ResourceClass::Disk, 2);
    let engine = engine(dir.path(), &counters, limits);
    let mut plan = Plan::new();
    for index in 0..8 {
        plan.add_step(StepNode::new(
            format!("disk[{index}]"),
            "test.write",
            1,
            Params::new()
                .with("content", format!("{index}"))
                .with("sleep_ms", 100u64),
            ResourceClass::Disk,
        ))
        .unwrap();
    }
    run_blocking(&engine, &plan, RunOptions::default()).unwrap();
    assert_eq!(counters.total_runs(), 8);
    assert_eq!(
        counters.peak.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "disk steps must run two at a time"
    );
}

#[test]
fn a_heavy_step_holds_several_permits() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(4));
    let mut plan = Plan::new();
    for index in 0..4 {
        plan.add_step(
            StepNode::new(
                format!("heavy[{index}]"),
                "test.write",
                1,
                Params::new()
                    .with("content", format!("{index}"))
                    .with("sleep_ms", 80u64),
                ResourceClass::Cpu,
            )
            .weight(3),
        )
        .unwrap();
    }
    run_blocking(&engine, &plan, RunOptions::default()).unwrap();
    assert_eq!(counters.peak.load(std::sync::atomic::Ordering::SeqCst), 1);
}

fn failing_plan() -> Plan {
    // `bad` fails; `after` needs it; `other` is independent and runs later (lower priority).
    // `bad` holds its permit for a moment, so with one permit `other` is certainly still
    // waiting when the failure arrives.
    let mut plan = Plan::new();
    let mut bad = write_step("bad", "x");
    bad.params.insert("fail", "disk on fire");
    bad.params.insert("sleep_ms", 100u64);
    let bad = plan.add_step(bad).unwrap();
    let after = plan.add_step(write_step("after", "y")).unwrap();
    plan.add_input(after, "in", bad);
    plan.add_step(write_step("other", "z")).unwrap();
    plan
}

#[test]
fn the_first_failure_stops_new_work_and_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(1));
    let reporter = RecordingReporter::default();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let error = runtime
        .block_on(engine.run(&failing_plan(), "test", &reporter, RunOptions::default()))
        .unwrap_err();
    assert!(error.already_reported());
    assert_eq!(error.to_string(), "1 step(s) failed, first: bad");
    let events = reporter.events();
    let failed: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            Event::StepFailed { step, error, .. } => Some((step.as_str(), error.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(failed, [("bad", "disk on fire")]);
    let mut skipped: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            Event::StepSkipped { step, because } => Some((step.as_str(), because.as_str())),
            _ => None,
        })
        .collect();
    skipped.sort();
    assert_eq!(skipped, [("after", "bad"), ("other", "bad")]);
    assert_eq!(
        counters.runs_of("other"),
        0,
        "a new step started after the failure"
    );
    // Failures are never cached: the next run tries again.
    let _ = run_blocking(&engine, &failing_plan(), RunOptions::default());
    assert_eq!(counters.runs_of("bad"), 2);
}

#[test]
fn keep_going_runs_independent_steps() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(1));
    let options = RunOptions {
        keep_going: true,
        ..RunOptions::default()
    };
    let error = run_blocking(&engine, &failing_plan(), options).unwrap_err();
    assert!(matches!(error, EngineError::StepsFailed { failed: 1, .. }));
    assert_eq!(counters.runs_of("other"), 1);
    assert_eq!(counters.runs_of("after"), 0);
}

#[test]
fn cancelling_interrupts_running_steps_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(4));
    let mut plan = Plan::new();
    let mut slow = write_step("slow", "never");
    slow.params.insert("sleep_ms", 60_000u64);
    let slow = plan.add_step(slow).unwrap();
    let after = plan.add_step(write_step("after", "y")).unwrap();
    plan.add_input(after, "in", slow);

    let options = RunOptions::default();
    let cancel = options.cancel.clone();
    let reporter = RecordingReporter::default();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let started = std::time::Instant::now();
    let error = runtime.block_on(async {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel();
        });
        engine
            .run(&plan, "test", &reporter, options)
            .await
            .unwrap_err()
    });
    assert!(matches!(error, EngineError::Cancelled));
    assert!(started.elapsed() < Duration::from_secs(30));
    let events = reporter.events();
    assert!(events.contains(&Event::StepCancelled {
        step: "slow".into()
    }));
    assert!(events.contains(&Event::StepSkipped {
        step: "after".into(),
        because: "slow".into()
    }));
    let keys = plan.definition_keys().unwrap();
    assert!(matches!(
        engine
            .store()
            .lookup(KeyKind::Definition, &keys[slow.index()])
            .unwrap(),
        Lookup::Miss(_)
    ));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("scratch"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "scratch left behind: {leftovers:?}");
}

/// Waits for cancellation, then takes `cleanup_ms` to "clean up" (writes `marker`), as an
/// executor whose child removes its temporary files on SIGTERM does.
struct CleansUpOnCancel {
    marker: std::path::PathBuf,
    grace: Duration,
}

impl banger::engine::Executor for CleansUpOnCancel {
    fn cancel_grace(&self) -> Duration {
        self.grace
    }

    fn execute<'a>(
        &'a self,
        ctx: &'a banger::engine::StepContext,
    ) -> banger::engine::BoxFuture<'a, Result<(), banger::engine::StepError>> {
        Box::pin(async move {
            ctx.cancellation().cancelled().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::write(&self.marker, b"cleaned").unwrap();
            Err(banger::engine::StepError::new("cancelled"))
        })
    }
}

#[test]
fn a_cancelled_step_gets_its_executors_grace_to_clean_up_and_no_more() {
    for (grace, cleaned) in [(Duration::from_secs(5), true), (Duration::ZERO, false)] {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("cleaned");
        let engine = Engine::builder(Store::open(dir.path().join("store")).unwrap())
            .executor(
                "test.cleanup",
                CleansUpOnCancel {
                    marker: marker.clone(),
                    grace,
                },
            )
            .build();
        let mut plan = Plan::new();
        plan.add_step(StepNode::new(
            "child",
            "test.cleanup",
            1,
            Params::new(),
            ResourceClass::Cpu,
        ))
        .unwrap();
        let options = RunOptions::default();
        let cancel = options.cancel.clone();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let error = runtime.block_on(async {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                cancel.cancel();
            });
            engine
                .run(&plan, "test", &NullReporter, options)
                .await
                .unwrap_err()
        });
        assert!(matches!(error, EngineError::Cancelled), "{error}");
        // Checked as the run returns: the cleanup finished inside the run, or never started.
        assert_eq!(marker.exists(), cleaned, "grace {grace:?}");
    }
}

#[test]
fn cache_gc_refuses_while_a_build_runs_and_collects_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(4));
    let mut plan = Plan::new();
    let mut slow = write_step("slow", "kept");
    slow.params.insert("sleep_ms", 1_500u64);
    plan.add_step(slow).unwrap();
    let gc = |store: &Store| {
        store.gc(banger::store::GcOptions {
            max_size: 0,
            dry_run: false,
        })
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let report = runtime.block_on(async {
        let run = engine.run(&plan, "test", &NullReporter, RunOptions::default());
        let during = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let store = engine.store().clone();
            tokio::task::spawn_blocking(move || gc(&store))
                .await
                .unwrap()
        };
        let (report, during) = tokio::join!(run, during);
        let error = during.unwrap_err();
        assert!(
            matches!(error, banger::store::StoreError::Busy { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("run `banger cache gc` again"),
            "{error}"
        );
        report.unwrap()
    });
    assert_eq!(report.ran, ["slow"]);
    assert_eq!(read_output(engine.store(), &report, "slow"), b"kept");
    // No run now: GC goes ahead (a cap of 0 evicts the step).
    let collected = gc(engine.store()).unwrap();
    assert_eq!(collected.evicted, ["slow"]);
}

#[test]
fn a_missing_executor_is_reported_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(Counters::default());
    let engine = engine(dir.path(), &counters, ResourceLimits::uniform(4));
    let mut plan = Plan::new();
    let a = plan.add_step(write_step("a", "a")).unwrap();
    let b = plan
        .add_step(StepNode::new(
            "b",
            "test.unknown",
            1,
            Params::new(),
            ResourceClass::Cpu,
        ))
        .unwrap();
    plan.add_input(b, "in", a);
    let error = run_blocking(&engine, &plan, RunOptions::default()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "this build of banger cannot run `test.unknown` steps yet (needed by b); `banger graph` shows the plan"
    );
    assert_eq!(counters.total_runs(), 0);
}

/// Test step kind `test.slow-big`: writes `size_mb` MiB of deterministic bytes to output `out`,
/// one MiB every `chunk_ms`, so a kill can land while it writes, publishes or commits.
#[derive(Debug)]
struct SlowBigExecutor;

fn big_payload_chunk(index: u64) -> Vec<u8> {
    let mut chunk = vec![0u8; 1 << 20];
    let mut hasher = blake3::Hasher::new();
    hasher.update(&index.to_le_bytes());
    hasher.finalize_xof().fill(&mut chunk);
    chunk
}

impl banger::engine::Executor for SlowBigExecutor {
    fn execute<'a>(
        &'a self,
        ctx: &'a banger::engine::StepContext,
    ) -> banger::engine::BoxFuture<'a, Result<(), banger::engine::StepError>> {
        Box::pin(async move {
            use std::io::Write;
            let size_mb = ctx.params.get_int("size_mb").unwrap_or(1);
            let chunk_ms = ctx.params.get_int("chunk_ms").unwrap_or(0);
            let path = ctx.output("out")?;
            let mut file = std::fs::File::create(&path)
                .map_err(|e| banger::engine::StepError::with_source("create", e))?;
            for index in 0..size_mb {
                file.write_all(&big_payload_chunk(index))
                    .map_err(|e| banger::engine::StepError::with_source("write", e))?;
                tokio::time::sleep(Duration::from_millis(chunk_ms)).await;
            }
            Ok(())
        })
    }
}

const CRASH_STORE_VAR: &str = "BANGER_IT_CRASH_STORE";
const CRASH_SIZE_MB: u64 = 48;

fn crash_plan() -> Plan {
    let mut plan = Plan::new();
    let big = plan
        .add_step(StepNode::new(
            "big",
            "test.slow-big",
            1,
            Params::new()
                .with("size_mb", CRASH_SIZE_MB)
                .with("chunk_ms", 8u64),
            ResourceClass::Disk,
        ))
        .unwrap();
    let after = plan.add_step(write_step("after", "done")).unwrap();
    plan.add_input(after, "big", big);
    plan
}

fn crash_engine(store: &std::path::Path, counters: &Arc<Counters>) -> Engine {
    Engine::builder(Store::open(store).unwrap())
        .limits(ResourceLimits::uniform(2))
        .executor("test.slow-big", SlowBigExecutor)
        .executor(
            "test.write",
            WriteExecutor {
                counters: Arc::clone(counters),
            },
        )
        .build()
}

/// Not a test on its own: the child process of
/// [`a_run_killed_mid_step_leaves_no_partial_output_and_reruns`], which re-executes this test
/// binary with `BANGER_IT_CRASH_STORE` set. Without it, it returns at once.
#[test]
fn crash_child_process_entry_point() {
    let Some(store) = std::env::var_os(CRASH_STORE_VAR) else {
        return;
    };
    let counters = Arc::new(Counters::default());
    let engine = crash_engine(std::path::Path::new(&store), &counters);
    run_blocking(&engine, &crash_plan(), RunOptions::default()).unwrap();
}

/// Checks what a reader of the store may see: nothing, or the whole, correct output.
fn assert_no_partial_output(store_dir: &std::path::Path) -> bool {
    let store = Store::open(store_dir).unwrap();
    let keys = crash_plan().definition_keys().unwrap();
    match store.lookup(KeyKind::Definition, &keys[0]).unwrap() {
        Lookup::Hit(record) => {
            let output = &record.outputs["out"];
            assert_eq!(
                output.size,
                CRASH_SIZE_MB << 20,
                "a partial output was recorded"
            );
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out");
            store.materialize(output, &path).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            for (index, chunk) in bytes.chunks(1 << 20).enumerate() {
                assert!(
                    chunk == big_payload_chunk(index as u64).as_slice(),
                    "stored output differs at MiB {index}"
                );
            }
            true
        }
        Lookup::Miss(_) => false,
    }
}

#[test]
fn a_run_killed_mid_step_leaves_no_partial_output_and_reruns() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let exe = std::env::current_exe().unwrap();
    let mut recorded_before_rerun = false;
    // Kills spread over the step's write (~0.4 s), publish and commit phases.
    for delay_ms in [150u64, 300, 420, 480, 540, 600, 700, 900] {
        let mut child = std::process::Command::new(&exe)
            .args([
                "engine::crash_child_process_entry_point",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_STORE_VAR, &store_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        let recorded = assert_no_partial_output(&store_dir);
        eprintln!("killed after {delay_ms} ms: output recorded: {recorded}");
        recorded_before_rerun |= recorded;
        // Opening the store removed the dead run's scratch directory.
        let leftovers: Vec<_> = std::fs::read_dir(store_dir.join("scratch"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "scratch left behind: {leftovers:?}");
        if recorded_before_rerun {
            break;
        }
    }
    // A re-run completes, whatever state the kills left.
    let counters = Arc::new(Counters::default());
    let engine = crash_engine(&store_dir, &counters);
    let report = run_blocking(&engine, &crash_plan(), RunOptions::default()).unwrap();
    assert!(assert_no_partial_output(&store_dir));
    assert_eq!(
        read_output(engine.store(), &report, "after").len(),
        4 + (CRASH_SIZE_MB << 20) as usize
    );
    let again = run_blocking(&engine, &crash_plan(), RunOptions::default()).unwrap();
    assert!(
        again.ran.is_empty(),
        "a completed run must be cached: {:?}",
        again.ran
    );
}

/// Permits are held only while a step executes: not while it finds a content hit, waits for
/// another run's identical step, or waits for permits another run holds.
mod permits {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use banger::engine::{
        BoxFuture, Engine, Event, Executor, HitKind, NullReporter, RecordingReporter, Reporter,
        ResourceLimits, RunOptions, RunReport, StepContext, StepError,
    };
    use banger::key::Params;
    use banger::plan::{Plan, ResourceClass, StepNode};
    use banger::store::Store;
    use tokio::sync::{Notify, Semaphore};

    use crate::support::{Counters, WriteExecutor};

    /// One gate: `started` is signalled when its step starts executing; the step then waits
    /// until the test opens the gate.
    #[derive(Debug)]
    struct Gate {
        started: Notify,
        open: Semaphore,
    }

    #[derive(Debug, Clone, Default)]
    struct Gates(Arc<Mutex<HashMap<String, Arc<Gate>>>>);

    impl Gates {
        fn get(&self, name: &str) -> Arc<Gate> {
            let mut gates = self.0.lock().unwrap();
            Arc::clone(gates.entry(name.to_owned()).or_insert_with(|| {
                Arc::new(Gate {
                    started: Notify::new(),
                    open: Semaphore::new(0),
                })
            }))
        }

        /// Returns once the step of gate `name` is executing (or has).
        async fn started(&self, name: &str) {
            self.get(name).started.notified().await;
        }

        fn open(&self, name: &str) {
            self.get(name).open.add_permits(1);
        }
    }

    /// Test step kind `test.gate`: writes param `content` to output `out` once the test opens
    /// the gate named by param `gate`.
    #[derive(Debug)]
    struct GateExecutor {
        gates: Gates,
        counters: Arc<Counters>,
    }

    impl Executor for GateExecutor {
        fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
            Box::pin(async move {
                self.counters.enter(&ctx.step_id);
                let gate = self.gates.get(ctx.params.get_str("gate").unwrap_or(""));
                gate.started.notify_one();
                let _open = gate.open.acquire().await;
                self.counters.leave();
                let content = ctx.params.get_str("content").unwrap_or("");
                std::fs::write(ctx.output("out")?, content)
                    .map_err(|e| StepError::with_source("write", e))
            })
        }
    }

    fn engine(
        dir: &std::path::Path,
        gates: &Gates,
        counters: &Arc<Counters>,
        limits: ResourceLimits,
    ) -> Engine {
        Engine::builder(Store::open(dir).unwrap())
            .limits(limits)
            .executor(
                "test.gate",
                GateExecutor {
                    gates: gates.clone(),
                    counters: Arc::clone(counters),
                },
            )
            .executor(
                "test.write",
                WriteExecutor {
                    counters: Arc::clone(counters),
                },
            )
            .build()
    }

    fn gate_step(id: &str, gate: &str, class: ResourceClass) -> StepNode {
        StepNode::new(
            id,
            "test.gate",
            1,
            Params::new().with("content", id).with("gate", gate),
            class,
        )
    }

    fn plan_of(steps: impl IntoIterator<Item = StepNode>) -> Plan {
        let mut plan = Plan::new();
        for step in steps {
            plan.add_step(step).unwrap();
        }
        plan
    }

    /// Runs `plan` in a task of its own.
    fn spawn_run(
        engine: &Engine,
        plan: Plan,
        reporter: Arc<dyn Reporter>,
        options: RunOptions,
    ) -> tokio::task::JoinHandle<Result<RunReport, banger::engine::EngineError>> {
        let engine = engine.clone();
        tokio::spawn(async move { engine.run(&plan, "test", &*reporter, options).await })
    }

    /// Fails the test instead of hanging it when the engine gets stuck (not a timing check).
    async fn unstuck<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), future)
            .await
            .expect("the engine is stuck")
    }

    #[test]
    fn a_step_waiting_on_another_runs_identical_step_holds_no_permit() {
        let dir = tempfile::tempdir().unwrap();
        let (gates, counters) = (Gates::default(), Arc::new(Counters::default()));
        // Two CPU permits: the first run's `shared` holds one while it executes.
        let engine = engine(dir.path(), &gates, &counters, ResourceLimits::uniform(2));
        let shared = gate_step("shared", "shared", ResourceClass::Cpu);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let first = spawn_run(
                &engine,
                plan_of([shared.clone()]),
                Arc::new(NullReporter),
                RunOptions::default(),
            );
            unstuck(gates.started("shared")).await;
            // `shared` comes first in the second run; it waits on the first run's execution.
            // `other` gets the last permit only if that wait holds none.
            let second = spawn_run(
                &engine,
                plan_of([shared, gate_step("other", "other", ResourceClass::Cpu)]),
                Arc::new(NullReporter),
                RunOptions::default(),
            );
            unstuck(gates.started("other")).await;
            assert!(!first.is_finished(), "`shared` is still executing");
            assert_eq!(counters.runs_of("shared"), 1);

            gates.open("other");
            gates.open("shared");
            let first = unstuck(first).await.unwrap().unwrap();
            let second = unstuck(second).await.unwrap().unwrap();
            assert_eq!(first.ran, ["shared"]);
            assert_eq!(second.ran, ["other"]);
            assert_eq!(second.cached, [("shared".to_owned(), HitKind::Shared)]);
            assert_eq!(counters.runs_of("shared"), 1, "in-flight dedupe failed");
        });
    }

    #[test]
    fn a_content_hit_takes_no_permit() {
        let dir = tempfile::tempdir().unwrap();
        let (gates, counters) = (Gates::default(), Arc::new(Counters::default()));
        let engine = engine(dir.path(), &gates, &counters, ResourceLimits::uniform(1));
        // `a` (network) → `b` (disk). Rebuilding `a` gives the same bytes, so `b` is looked up
        // by content key and hits.
        let mut plan = Plan::new();
        let a = plan
            .add_step(StepNode::new(
                "a",
                "test.write",
                1,
                Params::new().with("content", "a"),
                ResourceClass::Network,
            ))
            .unwrap();
        let b = plan
            .add_step(StepNode::new(
                "b",
                "test.write",
                1,
                Params::new().with("content", "b"),
                ResourceClass::Disk,
            ))
            .unwrap();
        plan.add_input(b, "in", a);
        let rebuild_a = RunOptions {
            rebuild: ["a".to_owned()].into(),
            ..RunOptions::default()
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            unstuck(engine.run(&plan, "test", &NullReporter, RunOptions::default()))
                .await
                .unwrap();
            // Another run holds the only disk permit until the end.
            let holder = spawn_run(
                &engine,
                plan_of([gate_step("hold", "hold", ResourceClass::Disk)]),
                Arc::new(NullReporter),
                RunOptions::default(),
            );
            unstuck(gates.started("hold")).await;

            let report = unstuck(engine.run(&plan, "test", &NullReporter, rebuild_a))
                .await
                .unwrap();
            assert_eq!(report.ran, ["a"]);
            assert_eq!(report.cached, [("b".to_owned(), HitKind::Content)]);
            assert_eq!(counters.runs_of("b"), 1);
            assert!(!holder.is_finished(), "the disk permit was held throughout");

            gates.open("hold");
            unstuck(holder).await.unwrap().unwrap();
        });
    }

    /// Records events and wakes a waiter on each one.
    #[derive(Debug, Default)]
    struct SignallingReporter {
        recorded: RecordingReporter,
        reported: Notify,
    }

    impl Reporter for SignallingReporter {
        fn report(&self, event: &Event) {
            self.recorded.report(event);
            self.reported.notify_one();
        }
    }

    impl SignallingReporter {
        async fn until(&self, seen: impl Fn(&Event) -> bool) {
            while !self.recorded.events().iter().any(&seen) {
                self.reported.notified().await;
            }
        }
    }

    #[test]
    fn a_run_waiting_for_another_runs_permits_goes_on_when_they_are_freed() {
        let dir = tempfile::tempdir().unwrap();
        let (gates, counters) = (Gates::default(), Arc::new(Counters::default()));
        let engine = engine(dir.path(), &gates, &counters, ResourceLimits::uniform(1));
        // No timers on this runtime: anything that sleeps or polls on a timer panics.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let first = spawn_run(
                &engine,
                plan_of([gate_step("hold", "hold", ResourceClass::Cpu)]),
                Arc::new(NullReporter),
                RunOptions::default(),
            );
            gates.started("hold").await;

            // `queued` needs the CPU permit `hold` has. `witness` (network) takes its place in
            // line after `queued`, so once it runs, `queued` is waiting for that permit.
            let reporter = Arc::new(SignallingReporter::default());
            let mut queued = crate::support::write_step("queued", "q");
            queued.resource = ResourceClass::Cpu;
            let second = spawn_run(
                &engine,
                plan_of([
                    queued,
                    gate_step("witness", "witness", ResourceClass::Network),
                ]),
                Arc::clone(&reporter) as Arc<dyn Reporter>,
                RunOptions::default(),
            );
            gates.started("witness").await;
            gates.open("witness");
            // The second run has nothing executing now, only `queued` waiting.
            reporter
                .until(
                    |event| matches!(event, Event::StepFinished { step, .. } if step == "witness"),
                )
                .await;
            assert_eq!(counters.runs_of("queued"), 0);

            gates.open("hold");
            first.await.unwrap().unwrap();
            let report = second.await.unwrap().unwrap();
            assert_eq!(report.ran, ["witness", "queued"]);
            let started: Vec<String> = reporter
                .recorded
                .events()
                .into_iter()
                .filter_map(|event| match event {
                    Event::StepStarted { step, .. } => Some(step),
                    _ => None,
                })
                .collect();
            assert_eq!(started, ["witness", "queued"]);
        });
    }

    /// Two engines on one store behave like two processes: no shared flights, only the
    /// store's step lock. The second waits on it, then finds the step stored.
    #[test]
    fn two_engines_on_one_store_build_a_step_once() {
        let dir = tempfile::tempdir().unwrap();
        let (gates, counters) = (Gates::default(), Arc::new(Counters::default()));
        let one = engine(dir.path(), &gates, &counters, ResourceLimits::uniform(2));
        let two = engine(dir.path(), &gates, &counters, ResourceLimits::uniform(2));
        let shared = gate_step("shared", "shared", ResourceClass::Cpu);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let first = spawn_run(
                &one,
                plan_of([shared.clone()]),
                Arc::new(NullReporter),
                RunOptions::default(),
            );
            unstuck(gates.started("shared")).await;
            // The second engine's `shared` waits for the store's lock, holding no permit:
            // its `other` still runs.
            let second = spawn_run(
                &two,
                plan_of([shared, gate_step("other", "other", ResourceClass::Cpu)]),
                Arc::new(NullReporter),
                RunOptions::default(),
            );
            unstuck(gates.started("other")).await;
            gates.open("other");
            gates.open("shared");
            let first = unstuck(first).await.unwrap().unwrap();
            let second = unstuck(second).await.unwrap().unwrap();
            assert_eq!(first.ran, ["shared"]);
            assert_eq!(second.ran, ["other"]);
            assert_eq!(second.cached, [("shared".to_owned(), HitKind::Content)]);
            assert_eq!(
                counters.runs_of("shared"),
                1,
                "two engines built one step twice"
            );
        });
    }
}
