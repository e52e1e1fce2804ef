//! The engine: runs a plan's steps in dependency order, memoized in the store.
//!
//! Lifecycle of [`Engine::run`]:
//! 1. Key the whole plan (definition keys), and mark *volatile* every step that is never cached
//!    or reads, directly or not, from one that is: a definition key built on a mutable input
//!    cannot be trusted, so volatile steps are looked up by content key only.
//! 2. Walk back from the targets: a non-volatile step whose definition key is in the store is
//!    done, and its inputs are not needed at all (a final image can hit without fetching its
//!    layers). Every other step reached is needed.
//! 3. Queue the needed steps ([`queue::ReadyQueue`]) and drain: one loop owns all scheduling
//!    state and is the only caller of the [`Reporter`]; each ready step runs as a task that
//!    (a) computes its content key from its inputs' output digests and reuses a stored result
//!    if there is one (early cutoff), (b) joins an identical step already running in this
//!    engine (in-flight dedupe), (c) waits for permits of its resource class, (d) runs its
//!    executor in a scratch directory, (e) publishes outputs, then the record.
//! 4. On the first failure nothing new starts (unless `keep_going`); running steps finish;
//!    everything downstream is reported skipped; the error is reported once, as an event, and
//!    [`EngineError::StepsFailed`] tells the caller it has already been shown.
//! 5. Cancellation (Ctrl-C) interrupts running steps; their scratch directories are removed and
//!    nothing is recorded, so no partial output is ever visible.
//!
//! Known weaknesses: dedupe is per engine (per process); two processes may build the same
//! step at once (both publish identical bytes, which is harmless). The daemon makes one engine
//! serve every client.

pub mod queue;
pub mod report;
mod resources;

pub use report::{
    Event, HitKind, NullReporter, OutputStream, ProgressUnit, RecordingReporter, Reporter,
};
pub use resources::ResourceLimits;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use petgraph::graph::NodeIndex;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use crate::key::{Key, Params, content_key, output_digest};
use crate::plan::{CachePolicy, Plan, PlanError, StepNode};
use crate::store::{
    KeyKind, LastRun, LastRunInput, Lookup, OutputRef, StepRecord, Store, StoreError, now_ms,
};
use queue::ReadyQueue;
use resources::Resources;

/// A boxed future, for object-safe async executors.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs one kind of step.
pub trait Executor: Send + Sync + 'static {
    /// Does the step's work, writing outputs to [`StepContext::output`]. Must stop promptly
    /// when [`StepContext::cancellation`] fires (dropping the future also stops it).
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>>;
}

/// Why a step failed, as its executor tells it.
#[derive(Debug)]
pub struct StepError {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StepError {
    pub fn new(message: impl Into<String>) -> StepError {
        StepError {
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StepError {
        StepError {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StepError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// Renders an error and its sources as `outer: inner: innermost`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// Errors that end a run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "this build of banger cannot run `{kind}` steps yet (needed by {step}); `banger graph` \
         shows the plan"
    )]
    MissingExecutor { kind: String, step: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Steps failed; each failure was already reported as a [`Event::StepFailed`].
    #[error("{failed} step(s) failed, first: {first}")]
    StepsFailed { failed: usize, first: String },
    #[error("the run was cancelled")]
    Cancelled,
}

impl EngineError {
    /// True when the details were already reported through events, so the caller should not
    /// print them again.
    pub fn already_reported(&self) -> bool {
        matches!(
            self,
            EngineError::StepsFailed { .. } | EngineError::Cancelled
        )
    }
}

/// Options for one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Keep starting independent steps after a failure.
    pub keep_going: bool,
    /// Fires to cancel the run (Ctrl-C).
    pub cancel: CancellationToken,
    /// Ids of steps to execute even if they are stored (`banger build --rebuild STEP`).
    /// What depends on them is looked up by content key only, so an identical result is
    /// cut off.
    pub rebuild: HashSet<String>,
}

/// The outputs of one finished step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutputs {
    pub outputs: BTreeMap<String, OutputRef>,
    pub output_digest: Key,
}

/// What a successful run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Steps whose executor ran, in completion order.
    pub ran: Vec<String>,
    /// Steps satisfied from the store (or by another run), and how.
    pub cached: Vec<(String, HitKind)>,
    /// Outputs of every step that finished, by step id.
    pub outputs: HashMap<String, StepOutputs>,
    pub duration: Duration,
}

/// One input as a running step sees it.
#[derive(Debug, Clone)]
pub struct StepInput {
    pub name: String,
    pub step_id: String,
    pub outputs: BTreeMap<String, OutputRef>,
}

/// Everything a running step may use. Scratch space is created on first use and removed when
/// the step ends, whatever the outcome.
#[derive(Debug)]
pub struct StepContext {
    pub step_id: String,
    pub kind: String,
    pub params: Params,
    /// Unkeyed facts from the plan (see [`crate::plan::StepNode::hints`]).
    pub hints: BTreeMap<String, String>,
    /// The step's definition key (names its kept log).
    pub definition_key: Key,
    inputs: Vec<StepInput>,
    store: Store,
    scratch: OnceLock<Result<tempfile::TempDir, String>>,
    cancel: CancellationToken,
    node: NodeIndex,
    events: mpsc::UnboundedSender<Message>,
}

impl StepContext {
    pub fn inputs(&self) -> &[StepInput] {
        &self.inputs
    }

    pub fn input(&self, name: &str) -> Result<&StepInput, StepError> {
        self.inputs
            .iter()
            .find(|input| input.name == name)
            .ok_or_else(|| StepError::new(format!("step {} has no input `{name}`", self.step_id)))
    }

    /// A read-only path to one output file of an input (a hard link into the store: never
    /// modify it in place, copy it first).
    pub fn input_file(&self, input: &str, file: &str) -> Result<PathBuf, StepError> {
        let found = self.input(input)?;
        let reference = found.outputs.get(file).ok_or_else(|| {
            StepError::new(format!(
                "input `{input}` of step {} has no output `{file}`",
                self.step_id
            ))
        })?;
        let dir = self.scratch_dir()?.join("in").join(input);
        let path = dir.join(file);
        if !path.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| {
                StepError::with_source(format!("cannot create {}", dir.display()), e)
            })?;
            self.store
                .materialize(reference, &path)
                .map_err(|e| StepError::with_source("cannot read an input from the store", e))?;
        }
        Ok(path)
    }

    /// Where to write the output called `name`. Every file written here is published when the
    /// step succeeds, and discarded when it does not.
    pub fn output(&self, name: &str) -> Result<PathBuf, StepError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(StepError::new(format!("invalid output name `{name}`")));
        }
        Ok(self.ensure_dir("out")?.join(name))
    }

    /// Private working space for the step, removed afterwards.
    pub fn work_dir(&self) -> Result<PathBuf, StepError> {
        self.ensure_dir("work")
    }

    /// The store, for executors that hand out already-stored files.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Fires when the run is cancelled.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Reports progress (bytes downloaded, entries written).
    pub fn progress(&self, done: u64, total: Option<u64>, unit: ProgressUnit) {
        let _ = self.events.send(Message::Progress {
            node: self.node,
            done,
            total,
            unit,
        });
    }

    /// Where this step keeps its log (the store's `logs-v1/`; the directory exists). The log
    /// outlives the step, successful or not, so an error can point to it.
    pub fn log_path(&self) -> Result<PathBuf, StepError> {
        let path = self.store.step_log_path(&self.definition_key);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StepError::with_source(format!("cannot create {}", dir.display()), e)
            })?;
        }
        Ok(path)
    }

    /// A progress reporter that can move into a blocking task (`spawn_blocking`), which cannot
    /// borrow the context.
    pub fn progress_handle(&self) -> ProgressHandle {
        ProgressHandle {
            node: self.node,
            events: self.events.clone(),
        }
    }

    fn scratch_dir(&self) -> Result<&Path, StepError> {
        match self
            .scratch
            .get_or_init(|| self.store.scratch().map_err(|e| e.to_string()))
        {
            Ok(dir) => Ok(dir.path()),
            Err(message) => Err(StepError::new(message.clone())),
        }
    }

    fn ensure_dir(&self, name: &str) -> Result<PathBuf, StepError> {
        let dir = self.scratch_dir()?.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| StepError::with_source(format!("cannot create {}", dir.display()), e))?;
        Ok(dir)
    }

    fn output_files(&self) -> Result<Vec<(String, PathBuf)>, StepError> {
        let Some(Ok(scratch)) = self.scratch.get() else {
            return Ok(Vec::new());
        };
        let dir = scratch.path().join("out");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => {
                return Err(StepError::with_source(
                    format!("cannot list outputs in {}", dir.display()),
                    error,
                ));
            }
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StepError::with_source("cannot list outputs", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                return Err(StepError::new(format!(
                    "output `{name}` of step {} is not a regular file",
                    self.step_id
                )));
            }
            files.push((name, entry.path()));
        }
        files.sort();
        Ok(files)
    }
}

/// Reports a step's progress from anywhere (see [`StepContext::progress_handle`]).
#[derive(Clone)]
pub struct ProgressHandle {
    node: NodeIndex,
    events: mpsc::UnboundedSender<Message>,
}

impl std::fmt::Debug for ProgressHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressHandle")
            .field("node", &self.node)
            .finish()
    }
}

impl ProgressHandle {
    pub fn report(&self, done: u64, total: Option<u64>, unit: ProgressUnit) {
        let _ = self.events.send(Message::Progress {
            node: self.node,
            done,
            total,
            unit,
        });
    }

    /// A handle whose reports are collected, and the function that drains them as
    /// `(stream, line)` output lines (unit tests of executors' reporting).
    #[cfg(test)]
    pub(crate) fn collecting() -> (ProgressHandle, impl FnMut() -> Vec<(OutputStream, String)>) {
        let (events, mut receiver) = mpsc::unbounded_channel();
        let handle = ProgressHandle {
            node: NodeIndex::new(0),
            events,
        };
        let drain = move || {
            let mut lines = Vec::new();
            while let Ok(message) = receiver.try_recv() {
                if let Message::Output { stream, line, .. } = message {
                    lines.push((stream, line));
                }
            }
            lines
        };
        (handle, drain)
    }

    /// One line a step's command printed (without its line ending), shown live.
    pub fn output_line(&self, stream: OutputStream, line: String) {
        let _ = self.events.send(Message::Output {
            node: self.node,
            stream,
            line,
        });
    }
}

/// A step failure as every waiter sees it.
#[derive(Debug, Clone)]
struct Failure {
    message: String,
    kind: FailureKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// The executor (or publishing its outputs) failed.
    Failed,
    /// The run was cancelled while the step ran or waited.
    Cancelled,
    /// The run stopped after another failure before this step got its permits.
    NotStarted,
}

impl Failure {
    fn failed(message: String) -> Failure {
        Failure {
            message,
            kind: FailureKind::Failed,
        }
    }
}

type SharedResult = Result<StepOutputs, Failure>;

enum Message {
    Started {
        node: NodeIndex,
        key: Key,
    },
    Progress {
        node: NodeIndex,
        done: u64,
        total: Option<u64>,
        unit: ProgressUnit,
    },
    Output {
        node: NodeIndex,
        stream: OutputStream,
        line: String,
    },
    CacheWarning {
        node: NodeIndex,
        warning: String,
    },
    Finished {
        node: NodeIndex,
        result: Result<(StepOutputs, Option<HitKind>, Duration), Failure>,
    },
}

struct Inner {
    store: Store,
    executors: HashMap<String, Arc<dyn Executor>>,
    resources: Resources,
    in_flight: Mutex<HashMap<Key, Arc<OnceCell<SharedResult>>>>,
}

/// Runs plans. Cheap to clone; clones share the store, limits and in-flight work.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kinds: Vec<_> = self.inner.executors.keys().collect();
        kinds.sort();
        f.debug_struct("Engine")
            .field("store", &self.inner.store)
            .field("executors", &kinds)
            .finish()
    }
}

/// Collects executors, then builds an [`Engine`].
pub struct EngineBuilder {
    store: Store,
    limits: ResourceLimits,
    executors: HashMap<String, Arc<dyn Executor>>,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    pub fn executor(mut self, kind: &str, executor: impl Executor) -> EngineBuilder {
        self.executors.insert(kind.to_owned(), Arc::new(executor));
        self
    }

    pub fn limits(mut self, limits: ResourceLimits) -> EngineBuilder {
        self.limits = limits;
        self
    }

    pub fn build(self) -> Engine {
        Engine {
            inner: Arc::new(Inner {
                store: self.store,
                executors: self.executors,
                resources: Resources::new(self.limits),
                in_flight: Mutex::new(HashMap::new()),
            }),
        }
    }
}

/// Which steps are volatile: never cached, or downstream of one that is.
pub fn volatile_steps(plan: &Plan) -> Result<Vec<bool>, PlanError> {
    let mut volatile = vec![false; plan.len()];
    for node in plan.topological_order()? {
        volatile[node.index()] = plan.node(node).cache == CachePolicy::Never
            || plan
                .inputs(node)
                .iter()
                .any(|(_, input)| volatile[input.index()]);
    }
    Ok(volatile)
}

impl Engine {
    pub fn builder(store: Store) -> EngineBuilder {
        EngineBuilder {
            store,
            limits: ResourceLimits::for_host(),
            executors: HashMap::new(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Runs the plan's targets. `project` scopes the "last run" records `banger graph --why`
    /// compares against.
    pub async fn run(
        &self,
        plan: &Plan,
        project: &str,
        reporter: &dyn Reporter,
        options: RunOptions,
    ) -> Result<RunReport, EngineError> {
        let started = Instant::now();
        let store = &self.inner.store;
        let def_keys = plan.definition_keys()?;
        let volatile = volatile_steps(plan)?;
        let forced: Vec<bool> = (0..plan.len())
            .map(|index| {
                options
                    .rebuild
                    .contains(&plan.node(NodeIndex::new(index)).id)
            })
            .collect();
        // A step downstream of a forced one cannot trust its definition key either: its
        // input is about to be made again.
        let mut rekeyed = forced.clone();
        for node in plan.topological_order()? {
            if plan
                .inputs(node)
                .iter()
                .any(|(_, input)| rekeyed[input.index()])
            {
                rekeyed[node.index()] = true;
            }
        }

        // Walk back from the targets; stop at definition-key hits.
        let mut done: HashMap<NodeIndex, StepOutputs> = HashMap::new();
        let mut report = RunReport::default();
        let mut needed: Vec<NodeIndex> = Vec::new();
        let mut visited: HashSet<NodeIndex> = HashSet::new();
        let mut prepass_hits: Vec<NodeIndex> = Vec::new();
        let mut stack = plan.targets();
        stack.reverse();
        while let Some(node) = stack.pop() {
            if !visited.insert(node) {
                continue;
            }
            let step = plan.node(node);
            if step.cache == CachePolicy::Cached
                && !volatile[node.index()]
                && !rekeyed[node.index()]
                && let Lookup::Hit(record) =
                    store.lookup(KeyKind::Definition, &def_keys[node.index()])?
            {
                done.insert(node, outputs_of(&record));
                prepass_hits.push(node);
                continue;
            }
            needed.push(node);
            let mut inputs: Vec<NodeIndex> =
                plan.inputs(node).into_iter().map(|(_, i)| i).collect();
            inputs.reverse();
            stack.extend(inputs);
        }
        needed.sort();
        prepass_hits.sort();
        for &node in &needed {
            let step = plan.node(node);
            if !self.inner.executors.contains_key(&step.kind) {
                return Err(EngineError::MissingExecutor {
                    kind: step.kind.clone(),
                    step: step.id.clone(),
                });
            }
        }

        reporter.report(&Event::RunStarted {
            steps: needed.len() + prepass_hits.len(),
            cached: prepass_hits.len(),
            to_run: needed.len(),
        });
        for &node in &prepass_hits {
            let step = plan.node(node);
            reporter.report(&Event::StepCached {
                step: step.id.clone(),
                kind: step.kind.clone(),
                key: def_keys[node.index()],
                hit: HitKind::Definition,
            });
            report.cached.push((step.id.clone(), HitKind::Definition));
        }

        let needed_set: HashSet<NodeIndex> = needed.iter().copied().collect();
        let mut queue = ReadyQueue::new();
        for &node in &needed {
            queue.add(
                node,
                plan.inputs(node)
                    .into_iter()
                    .map(|(_, input)| input)
                    .filter(|input| needed_set.contains(input)),
            );
        }
        queue.freeze().map_err(|cycle| PlanError::Cycle {
            cycle: cycle.0.iter().map(|&n| plan.node(n).id.clone()).collect(),
        })?;

        let (sender, mut receiver) = mpsc::unbounded_channel::<Message>();
        let cancel = options.cancel.child_token();
        let mut tasks = tokio::task::JoinSet::new();
        let mut running: usize = 0;
        let mut started_nodes: HashSet<NodeIndex> = HashSet::new();
        let mut failures: Vec<String> = Vec::new();
        let mut skipped: usize = 0;
        let mut stopping = false;
        let mut cancelled = false;
        let mut waiting: Vec<NodeIndex> = Vec::new();

        loop {
            if !stopping {
                while let Some(node) = queue.dequeue() {
                    waiting.push(node);
                }
                // Highest priority first (the queue's order); a step starts only when its
                // permits are free, so a stop after a failure leaves the rest unstarted.
                let mut still_waiting = Vec::new();
                for node in waiting.drain(..) {
                    let step = plan.node(node);
                    let Some(permit) = self.inner.resources.try_acquire(step.resource, step.weight)
                    else {
                        still_waiting.push(node);
                        continue;
                    };
                    let inputs = plan
                        .inputs(node)
                        .into_iter()
                        .map(|(name, input)| ResolvedInput {
                            name: name.to_owned(),
                            step_id: plan.node(input).id.clone(),
                            definition_key: def_keys[input.index()],
                            outputs: done[&input].clone(),
                        })
                        .collect();
                    let job = Job {
                        node,
                        step: step.clone(),
                        definition_key: def_keys[node.index()],
                        volatile: volatile[node.index()],
                        forced: forced[node.index()],
                        inputs,
                    };
                    started_nodes.insert(node);
                    running += 1;
                    let inner = Arc::clone(&self.inner);
                    let sender = sender.clone();
                    let cancel = cancel.clone();
                    tasks.spawn(async move {
                        let result = run_job(&inner, &job, permit, &sender, &cancel).await;
                        let _ = sender.send(Message::Finished {
                            node: job.node,
                            result,
                        });
                    });
                }
                waiting = still_waiting;
            }
            // A stopped run starts nothing new: steps still waiting for permits are reported
            // skipped below.
            if running == 0 && (waiting.is_empty() || stopping) {
                break;
            }
            if running == 0 {
                // Permits are held by another run on this engine: look again shortly.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => continue,
                    () = options.cancel.cancelled() => {
                        cancelled = true;
                        stopping = true;
                        continue;
                    }
                }
            }
            let message = tokio::select! {
                message = receiver.recv() => message,
                () = options.cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    stopping = true;
                    cancel.cancel();
                    continue;
                }
            };
            let Some(message) = message else { break };
            match message {
                Message::Started { node, key } => {
                    let step = plan.node(node);
                    reporter.report(&Event::StepStarted {
                        step: step.id.clone(),
                        kind: step.kind.clone(),
                        key,
                        summary: step.summary.clone(),
                    });
                }
                Message::Progress {
                    node,
                    done: amount,
                    total,
                    unit,
                } => reporter.report(&Event::StepProgress {
                    step: plan.node(node).id.clone(),
                    done: amount,
                    total,
                    unit,
                }),
                Message::Output { node, stream, line } => reporter.report(&Event::StepOutput {
                    step: plan.node(node).id.clone(),
                    stream,
                    line,
                }),
                Message::CacheWarning { node, warning } => reporter.report(&Event::CacheWarning {
                    step: plan.node(node).id.clone(),
                    warning,
                }),
                Message::Finished { node, result } => {
                    running -= 1;
                    let step = plan.node(node);
                    match result {
                        Ok((outputs, hit, duration)) => {
                            match hit {
                                Some(hit) => {
                                    reporter.report(&Event::StepCached {
                                        step: step.id.clone(),
                                        kind: step.kind.clone(),
                                        key: def_keys[node.index()],
                                        hit,
                                    });
                                    report.cached.push((step.id.clone(), hit));
                                }
                                None => {
                                    reporter.report(&Event::StepFinished {
                                        step: step.id.clone(),
                                        kind: step.kind.clone(),
                                        duration,
                                        output_bytes: outputs
                                            .outputs
                                            .values()
                                            .map(|o| o.size)
                                            .sum(),
                                    });
                                    report.ran.push(step.id.clone());
                                }
                            }
                            done.insert(node, outputs);
                            queue.finish(node);
                        }
                        Err(failure) if failure.kind == FailureKind::NotStarted => {
                            skipped += 1;
                            reporter.report(&Event::StepSkipped {
                                step: step.id.clone(),
                                because: failures.first().cloned().unwrap_or_default(),
                            });
                            for skipped_node in queue.skip_dependants(node) {
                                skipped += 1;
                                reporter.report(&Event::StepSkipped {
                                    step: plan.node(skipped_node).id.clone(),
                                    because: step.id.clone(),
                                });
                            }
                        }
                        Err(failure) if failure.kind == FailureKind::Cancelled => {
                            cancelled = true;
                            stopping = true;
                            reporter.report(&Event::StepCancelled {
                                step: step.id.clone(),
                            });
                            for skipped_node in queue.skip_dependants(node) {
                                skipped += 1;
                                reporter.report(&Event::StepSkipped {
                                    step: plan.node(skipped_node).id.clone(),
                                    because: step.id.clone(),
                                });
                            }
                        }
                        Err(failure) => {
                            reporter.report(&Event::StepFailed {
                                step: step.id.clone(),
                                kind: step.kind.clone(),
                                error: failure.message,
                            });
                            failures.push(step.id.clone());
                            if !options.keep_going {
                                stopping = true;
                            }
                            for skipped_node in queue.skip_dependants(node) {
                                skipped += 1;
                                reporter.report(&Event::StepSkipped {
                                    step: plan.node(skipped_node).id.clone(),
                                    because: step.id.clone(),
                                });
                            }
                        }
                    }
                }
            }
        }
        while tasks.join_next().await.is_some() {}
        cancelled |= options.cancel.is_cancelled();

        let reason = failures
            .first()
            .cloned()
            .unwrap_or_else(|| "cancellation".to_owned());
        let mut never_started = queue.never_started(&started_nodes);
        never_started.extend(waiting.iter().copied());
        never_started.sort();
        never_started.dedup();
        for node in never_started {
            skipped += 1;
            reporter.report(&Event::StepSkipped {
                step: plan.node(node).id.clone(),
                because: reason.clone(),
            });
        }

        // Bookkeeping for GC order and `graph --why`; failures here only cost a warning.
        let used: Vec<Key> = done
            .keys()
            .filter(|node| plan.node(**node).cache == CachePolicy::Cached)
            .map(|node| def_keys[node.index()])
            .collect();
        if let Err(error) = store.touch(&used) {
            reporter.report(&Event::CacheWarning {
                step: String::new(),
                warning: error_chain(&error),
            });
        }
        let last_runs: Vec<(String, LastRun)> = done
            .keys()
            .filter(|node| plan.node(**node).cache == CachePolicy::Cached)
            .map(|&node| {
                let step = plan.node(node);
                let inputs = plan
                    .inputs(node)
                    .into_iter()
                    .map(|(name, input)| LastRunInput {
                        name: name.to_owned(),
                        step_id: plan.node(input).id.clone(),
                        definition_key: def_keys[input.index()],
                    })
                    .collect();
                let run = LastRun {
                    definition_key: def_keys[node.index()],
                    kind: step.kind.clone(),
                    version: step.version,
                    params: step.params.clone(),
                    inputs,
                };
                (step.id.clone(), run)
            })
            .collect();
        if let Err(error) = store.update_last_runs(project, last_runs) {
            reporter.report(&Event::CacheWarning {
                step: String::new(),
                warning: error_chain(&error),
            });
        }

        report.duration = started.elapsed();
        reporter.report(&Event::RunFinished {
            ran: report.ran.len(),
            cached: report.cached.len(),
            failed: failures.len(),
            skipped,
            duration: report.duration,
        });
        if cancelled {
            return Err(EngineError::Cancelled);
        }
        if let Some(first) = failures.first() {
            return Err(EngineError::StepsFailed {
                failed: failures.len(),
                first: first.clone(),
            });
        }
        report.outputs = done
            .into_iter()
            .map(|(node, outputs)| (plan.node(node).id.clone(), outputs))
            .collect();
        Ok(report)
    }
}

fn outputs_of(record: &StepRecord) -> StepOutputs {
    StepOutputs {
        outputs: record.outputs.clone(),
        output_digest: record.output_digest,
    }
}

struct ResolvedInput {
    name: String,
    step_id: String,
    definition_key: Key,
    outputs: StepOutputs,
}

struct Job {
    node: NodeIndex,
    step: StepNode,
    definition_key: Key,
    volatile: bool,
    /// Executed even if stored (`--rebuild`).
    forced: bool,
    inputs: Vec<ResolvedInput>,
}

impl Job {
    fn content_key(&self) -> Key {
        let inputs: Vec<(&str, Key)> = self
            .inputs
            .iter()
            .map(|input| (input.name.as_str(), input.outputs.output_digest))
            .collect();
        content_key(
            &self.step.kind,
            self.step.version,
            &self.step.params,
            &inputs,
        )
    }
}

/// Satisfies one step: content-key hit, a shared in-flight result, or a fresh execution.
async fn run_job(
    inner: &Arc<Inner>,
    job: &Job,
    permit: OwnedSemaphorePermit,
    sender: &mpsc::UnboundedSender<Message>,
    cancel: &CancellationToken,
) -> Result<(StepOutputs, Option<HitKind>, Duration), Failure> {
    let content = job.content_key();
    let cached = job.step.cache == CachePolicy::Cached;
    if cached
        && !job.forced
        && let Some(outputs) = content_hit(inner, job, content, sender)
    {
        return Ok((outputs, Some(HitKind::Content), Duration::ZERO));
    }
    if !cached {
        let started = Instant::now();
        return execute(inner, job, content, permit, sender, cancel)
            .await
            .map(|outputs| (outputs, None, started.elapsed()));
    }
    let cell = {
        let mut in_flight = inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(in_flight.entry(content).or_default())
    };
    let ran_here = AtomicBool::new(false);
    let started = Instant::now();
    // Only real failures are shared with other waiters; an interruption of this run leaves the
    // cell empty so a waiter from another run executes the step itself.
    let result = cell
        .get_or_try_init(|| async {
            ran_here.store(true, Ordering::SeqCst);
            match execute(inner, job, content, permit, sender, cancel).await {
                Err(failure) if failure.kind != FailureKind::Failed => Err(failure),
                other => Ok(other),
            }
        })
        .await
        .cloned()
        .and_then(|shared| shared);
    {
        let mut in_flight = inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if in_flight
            .get(&content)
            .is_some_and(|current| Arc::ptr_eq(current, &cell))
        {
            in_flight.remove(&content);
        }
    }
    let outputs = result?;
    if ran_here.load(Ordering::SeqCst) {
        Ok((outputs, None, started.elapsed()))
    } else {
        Ok((outputs, Some(HitKind::Shared), Duration::ZERO))
    }
}

fn content_hit(
    inner: &Inner,
    job: &Job,
    content: Key,
    sender: &mpsc::UnboundedSender<Message>,
) -> Option<StepOutputs> {
    match inner.store.lookup(KeyKind::Content, &content) {
        Ok(Lookup::Hit(record)) => {
            if !job.volatile
                && let Err(error) = inner.store.alias(&record, &job.definition_key)
            {
                let _ = sender.send(Message::CacheWarning {
                    node: job.node,
                    warning: error_chain(&error),
                });
            }
            Some(outputs_of(&record))
        }
        Ok(Lookup::Miss(_)) => None,
        Err(error) => {
            let _ = sender.send(Message::CacheWarning {
                node: job.node,
                warning: error_chain(&error),
            });
            None
        }
    }
}

async fn execute(
    inner: &Arc<Inner>,
    job: &Job,
    content: Key,
    permit: OwnedSemaphorePermit,
    sender: &mpsc::UnboundedSender<Message>,
    cancel: &CancellationToken,
) -> SharedResult {
    let cancelled = || Failure {
        message: "cancelled".into(),
        kind: FailureKind::Cancelled,
    };
    let _permit = permit;
    let cached = job.step.cache == CachePolicy::Cached;
    // Another process may have finished this step while we waited for a permit.
    if cached
        && !job.forced
        && let Some(outputs) = content_hit(inner, job, content, sender)
    {
        return Ok(outputs);
    }
    let executor = Arc::clone(&inner.executors[&job.step.kind]);
    let _ = sender.send(Message::Started {
        node: job.node,
        key: job.definition_key,
    });
    let started_ms = now_ms();
    let started = Instant::now();
    let ctx = StepContext {
        step_id: job.step.id.clone(),
        kind: job.step.kind.clone(),
        params: job.step.params.clone(),
        hints: job.step.hints.clone(),
        definition_key: job.definition_key,
        inputs: job
            .inputs
            .iter()
            .map(|input| StepInput {
                name: input.name.clone(),
                step_id: input.step_id.clone(),
                outputs: input.outputs.outputs.clone(),
            })
            .collect(),
        store: inner.store.clone(),
        scratch: OnceLock::new(),
        cancel: cancel.clone(),
        node: job.node,
        events: sender.clone(),
    };
    let outcome = tokio::select! {
        outcome = executor.execute(&ctx) => outcome,
        () = cancel.cancelled() => return Err(cancelled()),
    };
    if let Err(error) = outcome {
        return Err(Failure::failed(error_chain(&error)));
    }
    let files = ctx
        .output_files()
        .map_err(|error| Failure::failed(error_chain(&error)))?;
    let mut outputs = BTreeMap::new();
    for (name, path) in files {
        let store = inner.store.clone();
        let published = tokio::task::spawn_blocking(move || store.publish_file(&path))
            .await
            .map_err(|error| {
                Failure::failed(format!("publishing output `{name}` panicked: {error}"))
            })?
            .map_err(|error| Failure::failed(error_chain(&error)))?;
        outputs.insert(name, published);
    }
    let digest = output_digest(
        outputs
            .iter()
            .map(|(name, output)| (name.as_str(), output.integrity.as_str(), output.size)),
    );
    if cached {
        let record = StepRecord {
            step_id: job.step.id.clone(),
            kind: job.step.kind.clone(),
            version: job.step.version,
            params: job.step.params.clone(),
            inputs: job
                .inputs
                .iter()
                .map(|input| crate::store::RecordedInput {
                    name: input.name.clone(),
                    step_id: input.step_id.clone(),
                    definition_key: input.definition_key,
                    output_digest: input.outputs.output_digest,
                })
                .collect(),
            outputs: outputs.clone(),
            definition_key: job.definition_key,
            content_key: content,
            output_digest: digest,
            created_ms: started_ms,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        // A failed cache write costs a future rebuild, not this run.
        let commit = if job.volatile {
            inner.store.commit_content_only(&record)
        } else {
            inner.store.commit(&record)
        };
        if let Err(error) = commit {
            let _ = sender.send(Message::CacheWarning {
                node: job.node,
                warning: error_chain(&error),
            });
        }
    }
    Ok(StepOutputs {
        outputs,
        output_digest: digest,
    })
}

impl crate::error::Classify for EngineError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            EngineError::Plan(error) => error.class(),
            EngineError::MissingExecutor { .. } | EngineError::Store(_) => ErrorClass::Environment,
            EngineError::StepsFailed { .. } => ErrorClass::Failed,
            EngineError::Cancelled => ErrorClass::Interrupted,
        }
    }
}
