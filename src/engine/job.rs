//! What one job task does to satisfy a step, away from the scheduling loop.
//!
//! A job never calls the [`Reporter`](super::Reporter): it sends [`Message`]s to the loop, and
//! its last message is [`Message::Finished`]. In order:
//! 1. Compute the content key from the inputs' output digests; a cached step whose content
//!    key is stored is done (early cutoff, [`HitKind::Content`]) without any permit.
//! 2. Join the engine's *flight* for that content key ([`Inner::flights`]): if another job (of
//!    this run or another) is executing the same step, wait for its result
//!    ([`HitKind::Shared`]), holding no permit. Otherwise lead the flight.
//! 3. The leader (and every never-cached step, which is not deduplicated) waits for its turn
//!    ([`Turn`]), takes its place in the FIFO line of its resource class, passes the turn on,
//!    and waits for its permits. It runs the executor with them and gives them back as soon
//!    as it returns — except after a real failure, when the permits travel to the loop with
//!    the result, so that no waiting job of a run that must stop can take them first.
//! 4. The leader lands its result in the flight for the waiters. An interrupted leader
//!    (cancelled, or stopped before it got its permits) lands nothing: dropping the flight
//!    wakes the waiters, and one of them leads a new flight.
//!
//! A job that is waiting (for its turn, permits or another job's result) gives up as soon as
//! the run stops ([`FailureKind::NotStarted`]); only a job that holds permits is interrupted
//! by cancellation itself.

use std::collections::{BTreeMap, HashMap};
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use petgraph::graph::NodeIndex;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{
    Failure, FailureKind, HitKind, Inner, Message, SharedResult, StepContext, StepInput,
    StepOutputs, error_chain, outputs_of,
};
use crate::key::{Key, content_key, output_digest};
use crate::plan::{CachePolicy, StepNode};
use crate::store::{KeyKind, Lookup, StepRecord, now_ms};

/// The engine's in-flight executions of cached steps, by content key. The leader holds the
/// sending side ([`Lead`]); the map holds a receiver for those who join.
pub(super) type Flights = Mutex<HashMap<Key, watch::Receiver<Option<SharedResult>>>>;

/// How a job ended: its result and, after a real failure, the permits it executed with.
pub(super) type JobResult = Result<(StepOutputs, Option<HitKind>, Duration), Failure>;

/// What a job task shares with its run's loop.
#[derive(Clone)]
pub(super) struct JobControl {
    pub sender: mpsc::UnboundedSender<Message>,
    /// Fires when the run is cancelled: executing steps are interrupted.
    pub cancel: CancellationToken,
    /// Fires when the run stops (a failure without `keep_going`, or cancellation): waiting
    /// jobs give up. A child of `cancel`.
    pub stop: CancellationToken,
}

/// A job's place in its run's line: the loop hands out turns in the ready queue's priority
/// order, and a job takes its place in a resource class's (FIFO) semaphore only after the
/// job spawned before it has taken its own or no longer needs one. Without this, jobs spawned
/// together would race to the semaphores and a lower-priority step could start first.
#[derive(Debug)]
pub(super) struct Turn {
    after: Option<oneshot::Receiver<()>>,
    next: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// A turn after the one `after` belongs to (none for the first), and the receiver the
    /// next turn waits on.
    pub fn after(after: Option<oneshot::Receiver<()>>) -> (Turn, oneshot::Receiver<()>) {
        let (next, next_waits) = oneshot::channel();
        (
            Turn {
                after,
                next: Some(next),
            },
            next_waits,
        )
    }

    /// Waits until the previous job has passed its turn (or ended).
    async fn wait(&mut self) {
        if let Some(after) = self.after.take() {
            let _ = after.await;
        }
    }

    /// Lets the next job go. Dropping the turn does too, so an early return never blocks the
    /// line.
    fn pass(&mut self) {
        if let Some(next) = self.next.take() {
            let _ = next.send(());
        }
    }
}

/// Leading a flight: removes it from [`Flights`] when dropped, whether or not a result
/// landed, so that a later job of the same step starts afresh.
struct Lead<'a> {
    flights: &'a Flights,
    content: Key,
    result: watch::Sender<Option<SharedResult>>,
}

impl Lead<'_> {
    fn land(&self, result: SharedResult) {
        self.result.send_replace(Some(result));
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        // Only a leader inserts or removes its key, so the entry is this flight's.
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        flights.remove(&self.content);
        // `self.result` drops after this: waiters without a result wake to an error and retry.
    }
}

enum Flight<'a> {
    Lead(Lead<'a>),
    Join(watch::Receiver<Option<SharedResult>>),
}

fn join_flight(flights: &Flights, content: Key) -> Flight<'_> {
    let mut map = flights.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(receiver) = map.get(&content) {
        return Flight::Join(receiver.clone());
    }
    let (result, receiver) = watch::channel(None);
    map.insert(content, receiver);
    Flight::Lead(Lead {
        flights,
        content,
        result,
    })
}

fn not_started() -> Failure {
    Failure {
        message: "not started".into(),
        kind: FailureKind::NotStarted,
    }
}

pub(super) struct ResolvedInput {
    pub name: String,
    pub step_id: String,
    pub definition_key: Key,
    pub outputs: StepOutputs,
}

pub(super) struct Job {
    pub node: NodeIndex,
    pub step: StepNode,
    pub definition_key: Key,
    pub volatile: bool,
    /// Executed even if stored (`--rebuild`).
    pub forced: bool,
    pub inputs: Vec<ResolvedInput>,
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

/// The body of a job task: satisfies the step, then tells the loop how.
pub(super) async fn run(inner: Arc<Inner>, job: Job, turn: Turn, control: JobControl) {
    let (result, permit) = run_job(&inner, &job, turn, &control).await;
    let _ = control.sender.send(Message::Finished {
        node: job.node,
        result,
        permit,
    });
}

/// Satisfies one step: content-key hit, a shared in-flight result, or a fresh execution.
async fn run_job(
    inner: &Inner,
    job: &Job,
    mut turn: Turn,
    control: &JobControl,
) -> (JobResult, Option<OwnedSemaphorePermit>) {
    let content = job.content_key();
    let cached = job.step.cache == CachePolicy::Cached;
    if cached
        && !job.forced
        && let Some(outputs) = content_hit(inner, job, content, &control.sender)
    {
        return (Ok((outputs, Some(HitKind::Content), Duration::ZERO)), None);
    }
    if !cached {
        let (result, duration, permit) =
            execute_with_permits(inner, job, content, &mut turn, control).await;
        return (result.map(|outputs| (outputs, None, duration)), permit);
    }
    loop {
        match join_flight(&inner.flights, content) {
            Flight::Join(mut flight) => {
                turn.pass();
                let landed = async {
                    flight
                        .wait_for(Option::is_some)
                        .await
                        .map(|result| result.clone())
                };
                // A result that has landed wins over a stop: a leader of this run lands its
                // failure before the loop hears of it and stops the run.
                tokio::select! {
                    biased;
                    landed = landed => match landed {
                        Ok(Some(shared)) => {
                            let result = shared
                                .map(|outputs| (outputs, Some(HitKind::Shared), Duration::ZERO));
                            return (result, None);
                        }
                        // The leader was interrupted: lead a new flight, or join one.
                        _ => continue,
                    },
                    () = control.stop.cancelled() => return (Err(not_started()), None),
                }
            }
            Flight::Lead(lead) => {
                // Across processes: wait while another one executes this step; it is then
                // stored, and `execute` finds it.
                let Some(step_lock) = lock_step(inner, content, &mut turn, &control.stop).await
                else {
                    return (Err(not_started()), None);
                };
                let step_lock = match step_lock {
                    Ok(lock) => Some(lock),
                    Err(error) => {
                        // Without the lock the step may be built twice; never wrong.
                        let _ = control.sender.send(Message::CacheWarning {
                            node: job.node,
                            warning: error_chain(&error),
                        });
                        None
                    }
                };
                // Another process may have built it while we waited for the lock.
                if !job.forced
                    && let Some(outputs) = content_hit(inner, job, content, &control.sender)
                {
                    drop(step_lock);
                    lead.land(Ok(outputs.clone()));
                    return (Ok((outputs, Some(HitKind::Content), Duration::ZERO)), None);
                }
                let (result, duration, permit) =
                    execute_with_permits(inner, job, content, &mut turn, control).await;
                drop(step_lock);
                // Only real outcomes are shared: an interruption of this run lands nothing, so
                // a waiter from another run executes the step itself.
                if !matches!(&result, Err(failure) if failure.kind != FailureKind::Failed) {
                    lead.land(result.clone());
                }
                drop(lead);
                return (result.map(|outputs| (outputs, None, duration)), permit);
            }
        }
    }
}

/// The store's lock of the step with content key `content`. Usually free: taken at once,
/// keeping the job's turn. Held by another process: the job gives its turn to the next one
/// (it is not ready to run), and waits on a blocking thread. `None` when the run stops first
/// (the thread then releases the lock it gets).
async fn lock_step(
    inner: &Inner,
    content: Key,
    turn: &mut Turn,
    stop: &CancellationToken,
) -> Option<Result<crate::store::StepLock, crate::store::StoreError>> {
    match inner.store.try_lock_step(&content) {
        Ok(Some(lock)) => return Some(Ok(lock)),
        Ok(None) => {}
        Err(error) => return Some(Err(error)),
    }
    tokio::select! {
        biased;
        () = stop.cancelled() => return None,
        () = turn.wait() => {}
    }
    turn.pass();
    let store = inner.store.clone();
    let locking = tokio::task::spawn_blocking(move || store.lock_step(&content));
    tokio::select! {
        biased;
        () = stop.cancelled() => None,
        locked = locking => Some(locked.unwrap_or_else(|error| {
            Err(crate::store::StoreError::LockStep {
                key: content.to_hex(),
                path: std::path::PathBuf::new(),
                source: std::io::Error::other(error.to_string()),
            })
        })),
    }
}

/// Waits for permits in turn, executes with them, and gives them back — or, after a real
/// failure, returns them so that the loop drops them once it has stopped the run.
async fn execute_with_permits(
    inner: &Inner,
    job: &Job,
    content: Key,
    turn: &mut Turn,
    control: &JobControl,
) -> (SharedResult, Duration, Option<OwnedSemaphorePermit>) {
    let Some(permit) = acquire(inner, &job.step, turn, &control.stop).await else {
        return (Err(not_started()), Duration::ZERO, None);
    };
    let started = Instant::now();
    let result = execute(inner, job, content, &control.sender, &control.cancel).await;
    let duration = started.elapsed();
    let failed = matches!(&result, Err(failure) if failure.kind == FailureKind::Failed);
    (result, duration, failed.then_some(permit))
}

/// The permits of the step's resource class, taken in turn; `None` when the run stops first.
async fn acquire(
    inner: &Inner,
    step: &StepNode,
    turn: &mut Turn,
    stop: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        () = stop.cancelled() => return None,
        () = turn.wait() => {}
    }
    let mut permits = pin!(inner.resources.acquire(step.resource, step.weight));
    // The first poll takes this job's place in the semaphore's FIFO line (or the permits).
    let first = poll_fn(|cx| Poll::Ready(permits.as_mut().poll(cx))).await;
    turn.pass();
    match first {
        Poll::Ready(permit) => Some(permit),
        Poll::Pending => tokio::select! {
            biased;
            () = stop.cancelled() => None,
            permit = permits => Some(permit),
        },
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
    inner: &Inner,
    job: &Job,
    content: Key,
    sender: &mpsc::UnboundedSender<Message>,
    cancel: &CancellationToken,
) -> SharedResult {
    let cancelled = || Failure {
        message: "cancelled".into(),
        kind: FailureKind::Cancelled,
    };
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
        vouched: Default::default(),
        cancel: cancel.clone(),
        node: job.node,
        events: sender.clone(),
    };
    let mut execution = std::pin::pin!(executor.execute(&ctx));
    let outcome = tokio::select! {
        outcome = &mut execution => outcome,
        () = cancel.cancelled() => {
            let grace = executor.cancel_grace();
            if !grace.is_zero() {
                // The executor sees the token too and is stopping its children.
                let _ = tokio::time::timeout(grace, execution).await;
            }
            return Err(cancelled());
        }
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
        let vouched = ctx.vouched_sha256(&name);
        let published = tokio::task::spawn_blocking(move || match vouched {
            Some(sha256_hex) => store.publish_hashed_file(&path, &sha256_hex),
            None => store.publish_file(&path),
        })
        .await
        .map_err(|error| Failure::failed(format!("publishing output `{name}` panicked: {error}")))?
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
