//! Shared helpers for integration tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger::engine::{BoxFuture, Executor, StepContext, StepError};
use banger::key::Params;
use banger::plan::{Plan, ResourceClass, StepNode};

/// Counts executions per step id and the peak number running at once.
#[derive(Debug, Default)]
pub struct Counters {
    pub runs: Mutex<HashMap<String, usize>>,
    pub current: AtomicUsize,
    pub peak: AtomicUsize,
}

impl Counters {
    pub fn runs_of(&self, step: &str) -> usize {
        self.runs.lock().unwrap().get(step).copied().unwrap_or(0)
    }

    pub fn total_runs(&self) -> usize {
        self.runs.lock().unwrap().values().sum()
    }

    fn enter(&self, step: &str) {
        *self
            .runs
            .lock()
            .unwrap()
            .entry(step.to_owned())
            .or_default() += 1;
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.current.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Test step kind `test.write`: writes output `out` = param `content` followed by every input's
/// `out`, after sleeping `sleep_ms`; fails when param `fail` is set.
#[derive(Debug, Clone)]
pub struct WriteExecutor {
    pub counters: Arc<Counters>,
}

impl Executor for WriteExecutor {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            self.counters.enter(&ctx.step_id);
            let result = async {
                if let Some(ms) = ctx.params.get_int("sleep_ms") {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if let Some(message) = ctx.params.get_str("fail") {
                    return Err(StepError::new(message.to_owned()));
                }
                let mut bytes = ctx
                    .params
                    .get_str("content")
                    .unwrap_or("")
                    .as_bytes()
                    .to_vec();
                for input in ctx.inputs() {
                    let path = ctx.input_file(&input.name, "out")?;
                    bytes.extend(
                        std::fs::read(path).map_err(|e| StepError::with_source("read", e))?,
                    );
                }
                let out = ctx.output("out")?;
                std::fs::write(out, bytes).map_err(|e| StepError::with_source("write", e))?;
                Ok(())
            }
            .await;
            self.counters.leave();
            result
        })
    }
}

pub fn write_step(id: &str, content: &str) -> StepNode {
    StepNode::new(
        id,
        "test.write",
        1,
        Params::new().with("content", content),
        ResourceClass::Cpu,
    )
}

/// A chain `a → b → c` of write steps.
pub fn chain(contents: [&str; 3]) -> Plan {
    let mut plan = Plan::new();
    let a = plan.add_step(write_step("a", contents[0])).unwrap();
    let b = plan.add_step(write_step("b", contents[1])).unwrap();
    let c = plan.add_step(write_step("c", contents[2])).unwrap();
    plan.add_input(b, "in", a);
    plan.add_input(c, "in", b);
    plan
}

/// Reads a step's `out` from a run report through the store.
pub fn read_output(
    store: &banger::store::Store,
    report: &banger::engine::RunReport,
    step: &str,
) -> Vec<u8> {
    let output = &report.outputs[step].outputs["out"];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    store.materialize(output, &path).unwrap();
    std::fs::read(path).unwrap()
}
