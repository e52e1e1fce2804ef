//! The engine: runs a plan's steps in dependency order, memoized in the store.
//!
//! Lifecycle of [`Engine::run`]:
//! 1. Pre-pass: key the whole plan (definition keys), and mark *volatile* every step that is
//!    never cached or reads, directly or not, from one that is: a definition key built on a
//!    mutable input cannot be trusted, so volatile steps are looked up by content key only.
//!    Steps named in [`RunOptions::rebuild`] are *forced*, and what is downstream of them is
//!    looked up by content key only too.
//! 2. Walk back from the targets: a step that can trust its definition key and finds it in
//!    the store is done, and its inputs are not needed at all (a final image can hit without
//!    fetching its layers). Every other step reached is needed; every needed kind must have an
//!    executor before anything runs.
//! 3. Drain (`drain::DrainState`): queue the needed steps ([`queue::ReadyQueue`]) and loop.
//!    The loop owns all scheduling state and is the only caller of the [`Reporter`]; it
//!    spawns a job task for each ready step, highest priority first, then waits for one
//!    message from the jobs or for cancellation, and ends when no job is left. Each job
//!    (`job.rs`) (a) computes its content key from its inputs' output digests and reuses a
//!    stored result if there is one (early cutoff), (b) joins an identical step already
//!    executing in this engine, for any run (in-flight dedupe), or else takes the store's
//!    lock of the step ([`crate::store::Store::lock_step`]: another process building it makes
//!    this one wait, then find it stored) and (c) waits for permits
//!    of its resource class, in the order the loop spawned the jobs, (d) runs its executor in
//!    a scratch directory holding those permits, (e) publishes outputs, then the record.
//!    Permits are held only in (d) and (e): a content hit or a wait on another run's step
//!    holds none, and a run whose permits are all taken by another run simply awaits them.
//! 4. On the first failure nothing new starts (unless `keep_going`): jobs still waiting for
//!    permits or another run's step give up, running steps finish; everything downstream is
//!    reported skipped, and so is every step that never started; the error is reported once,
//!    as an event, and [`EngineError::StepsFailed`] tells the caller it has already been
//!    shown. A failed step's permits go back only once the loop has stopped the run, so no
//!    step of that run can take them and start.
//! 5. Cancellation (Ctrl-C) interrupts running steps; their scratch directories are removed and
//!    nothing is recorded, so no partial output is ever visible. Waiting jobs give up.
//!
//! Known weaknesses: a process waiting on another's step lock gives up its place in line
//! (its turn) and takes its permits when it gets the lock, after later jobs. A step's permits are taken first come, first served per class across
//! runs (tokio's fair semaphore): a heavy step at the head of the line holds back lighter ones
//! behind it until enough permits are free, which avoids starving it but may leave permits
//! idle meanwhile. A job task that panics sends no result, and its run then never ends.

mod drain;
mod job;
pub mod queue;
pub mod remote;
pub mod report;
mod resources;

pub use remote::{PushedStep, RemoteCache, RemoteError, RemoteScope, TransferProgress};
pub use report::{
    Event, HitKind, NullReporter, OutputStream, ProgressUnit, RecordingReporter, Reporter,
};
pub use resources::ResourceLimits;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use petgraph::graph::NodeIndex;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use crate::key::{Key, Params};
use crate::plan::{CachePolicy, Plan, PlanError};
use crate::store::{KeyKind, Lookup, OutputRef, StepRecord, Store, StoreError};
use drain::DrainState;
use resources::Resources;

/// A boxed future, for object-safe async executors.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs one kind of step.
pub trait Executor: Send + Sync + 'static {
    /// Does the step's work, writing outputs to [`StepContext::output`]. Must stop promptly
    /// when [`StepContext::cancellation`] fires (dropping the future also stops it).
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>>;

    /// How long the engine keeps polling a cancelled `execute` before dropping it: for
    /// executors whose children clean up outside the process when asked to stop (mmdebstrap
    /// unmounts and removes its temporary directory on SIGTERM; dropped, its child would be
    /// killed outright). Zero, the default, drops the future as soon as the run is cancelled.
    fn cancel_grace(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
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

pub use crate::error::error_chain;

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
    /// A remote cache to download shared steps from instead of running them (`--cache-from`).
    pub cache_from: Option<Arc<dyn RemoteCache>>,
    /// A remote cache to upload the run's shared steps to once it succeeded (`--cache-to`).
    pub cache_to: Option<Arc<dyn RemoteCache>>,
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
    /// Bytes downloaded from the remote cache.
    pub remote_bytes: u64,
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
    /// Outputs whose sha256 the executor computed over exactly the bytes it wrote
    /// ([`StepContext::vouch_sha256`]), by output name: published without being read again.
    vouched: std::sync::Mutex<BTreeMap<String, String>>,
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

    /// Tells the engine the sha256 (lowercase hex) of output `name`, computed while the
    /// executor wrote it (a download checked against its digest): publishing then trusts it
    /// instead of reading the file a second time. Vouch only for a hash of the very bytes
    /// in the file; a wrong one would store the file under another file's name.
    pub fn vouch_sha256(&self, name: &str, sha256_hex: &str) {
        self.vouched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(name.to_owned(), sha256_hex.to_owned());
    }

    fn vouched_sha256(&self, name: &str) -> Option<String> {
        self.vouched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(name)
            .cloned()
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

    /// Something about the step that does not fail it, shown whatever the verbosity (as a
    /// `warning STEP: ...` line), unlike a command's output.
    pub fn warning(&self, warning: String) {
        let _ = self.events.send(Message::CacheWarning {
            node: self.node,
            warning,
        });
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
    /// The run was cancelled while the step ran.
    Cancelled,
    /// The run stopped (after a failure, or cancelled) while the step waited for its turn,
    /// its permits or another job's result.
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
    /// A job's last message. `permit` is set after a real failure: the loop drops it once it
    /// has stopped the run.
    Finished {
        node: NodeIndex,
        result: job::JobResult,
        permit: Option<OwnedSemaphorePermit>,
    },
}

struct Inner {
    store: Store,
    executors: HashMap<String, Arc<dyn Executor>>,
    resources: Resources,
    /// Executions of cached steps in progress, by content key (in-flight dedupe).
    flights: job::Flights,
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
                flights: Mutex::new(HashMap::new()),
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
        // Held until the run returns: `cache gc` must not sweep what it publishes.
        let _lease = self.inner.store.lease_async().await?;
        let prepass = self.prepass(plan, reporter, &options).await?;
        let def_keys = prepass.def_keys.clone();
        let volatile = prepass.volatile.clone();
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let mut drain = DrainState::new(&self.inner, plan, prepass, reporter, &options, sender)?;
        loop {
            drain.spawn_ready();
            if drain.is_idle() {
                break;
            }
            tokio::select! {
                message = receiver.recv() => match message {
                    Some(message) => drain.handle(message),
                    None => break,
                },
                () = options.cancel.cancelled(), if !drain.is_cancelled() => drain.cancel(),
            }
        }
        let report = drain.finish(project, started).await?;
        if let Some(cache) = &options.cache_to {
            remote::RemoteUse::new(Arc::clone(cache), reporter)
                .push_run(
                    &self.inner.store,
                    plan,
                    &def_keys,
                    &volatile,
                    &options.cancel,
                )
                .await;
        }
        Ok(report)
    }

    /// Lifecycle steps 1 and 2: keys and marks for every step, then the walk back from the
    /// targets that stops at definition-key hits, with the remote cache's part (`remote.rs`):
    /// shared steps that miss locally are looked up remotely, and the hits downloaded, before
    /// anything runs.
    async fn prepass(
        &self,
        plan: &Plan,
        reporter: &dyn Reporter,
        options: &RunOptions,
    ) -> Result<Prepass, EngineError> {
        let rebuild = &options.rebuild;
        let store = &self.inner.store;
        let def_keys = plan.definition_keys()?;
        let volatile = volatile_steps(plan)?;
        let forced: Vec<bool> = (0..plan.len())
            .map(|index| rebuild.contains(&plan.node(NodeIndex::new(index)).id))
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
        let mut needed: Vec<NodeIndex> = Vec::new();
        let mut visited: HashSet<NodeIndex> = HashSet::new();
        let mut hits: Vec<NodeIndex> = Vec::new();
        let mut remote_hits: Vec<(NodeIndex, u64)> = Vec::new();
        let mut remote = options
            .cache_from
            .as_ref()
            .map(|cache| remote::RemoteUse::new(Arc::clone(cache), reporter));
        // Steps whose remote entry failed: they run here.
        let mut not_remote: HashSet<NodeIndex> = HashSet::new();
        let mut stack = plan.targets();
        stack.reverse();
        loop {
            let mut found_remotely: Vec<(NodeIndex, StepRecord)> = Vec::new();
            while let Some(node) = stack.pop() {
                if !visited.insert(node) {
                    continue;
                }
                let step = plan.node(node);
                let trusted = step.cache == CachePolicy::Cached
                    && !volatile[node.index()]
                    && !rekeyed[node.index()];
                if trusted {
                    let key = &def_keys[node.index()];
                    if let Lookup::Hit(record) = store.lookup(KeyKind::Definition, key)? {
                        done.insert(node, outputs_of(&record));
                        hits.push(node);
                        continue;
                    }
                    if let Some(remote) = remote.as_mut()
                        && remote.usable_for(&step.kind)
                        && !not_remote.contains(&node)
                        && let Some(record) = remote.lookup(step, key).await
                    {
                        found_remotely.push((node, record));
                        continue;
                    }
                }
                needed.push(node);
                let mut inputs: Vec<NodeIndex> =
                    plan.inputs(node).into_iter().map(|(_, i)| i).collect();
                inputs.reverse();
                stack.extend(inputs);
            }
            let Some(remote) = remote.as_mut() else {
                break;
            };
            if found_remotely.is_empty() {
                break;
            }
            let (stored, failed) = remote
                .fetch_all(store, plan, found_remotely, &options.cancel)
                .await?;
            for (node, record) in stored {
                done.insert(node, outputs_of(&record));
                remote_hits.push((node, record.total_size()));
            }
            // A failed download: walk the step as a miss, so it runs here.
            for node in failed {
                not_remote.insert(node);
                visited.remove(&node);
                stack.push(node);
            }
            if stack.is_empty() {
                break;
            }
        }
        needed.sort();
        hits.sort();
        for &node in &needed {
            let step = plan.node(node);
            if !self.inner.executors.contains_key(&step.kind) {
                return Err(EngineError::MissingExecutor {
                    kind: step.kind.clone(),
                    step: step.id.clone(),
                });
            }
        }
        remote_hits.sort();
        Ok(Prepass {
            def_keys,
            volatile,
            forced,
            needed,
            hits,
            remote_hits,
            done,
        })
    }
}

/// What the pre-pass found, for [`DrainState`].
struct Prepass {
    def_keys: Vec<Key>,
    volatile: Vec<bool>,
    /// Executed even if stored (`--rebuild`).
    forced: Vec<bool>,
    /// Steps to satisfy, in node order.
    needed: Vec<NodeIndex>,
    /// Steps whose definition key hit, in node order; their outputs are in `done`.
    hits: Vec<NodeIndex>,
    /// Steps downloaded from the remote cache, with their outputs' size.
    remote_hits: Vec<(NodeIndex, u64)>,
    done: HashMap<NodeIndex, StepOutputs>,
}

fn outputs_of(record: &StepRecord) -> StepOutputs {
    StepOutputs {
        outputs: record.outputs.clone(),
        output_digest: record.output_digest,
    }
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
