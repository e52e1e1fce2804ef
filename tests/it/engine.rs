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
        "no executor for step kind `test.unknown` (step b); this build of banger cannot run it yet"
    );
    assert_eq!(counters.total_runs(), 0);
}
