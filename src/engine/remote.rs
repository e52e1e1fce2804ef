//! A remote step cache: outputs of steps built on other machines, by definition key.
//!
//! The engine knows a remote only through [`RemoteCache`] (the OCI registry implementation is
//! `crate::remote`). Its part of a run:
//! 1. Pre-pass: a shared step ([`RemoteCache::shares`]) that misses locally and may trust its
//!    definition key is looked up remotely. A hit is not walked further: like a local hit, its
//!    inputs are not needed.
//! 2. The hits are downloaded, a few at a time, each output verified by digest and size while
//!    it streams into the step's scratch directory, then published and recorded as if the
//!    step had run here. A hit that fails (a lying or broken remote) is reported once and
//!    walked like a miss: the step runs locally. Nothing unverified enters the store.
//! 3. After a successful run with a `cache_to` remote, every shared step of the plan that is
//!    stored here (the run needed it or not) and that the remote lacks is uploaded: outputs the remote already has (by digest) are not sent again,
//!    and the record goes last, so a reader never finds a record without its outputs.
//!
//! A remote that cannot be reached, refuses credentials or fails its requests is reported once
//! and then left alone for the rest of the run ([`RemoteScope::Remote`]); the run goes on
//! locally. Steps downstream of a never-cached step (volatile) are never looked up or pushed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use petgraph::graph::NodeIndex;
use tokio::sync::mpsc;

use super::{BoxFuture, Event, ProgressUnit, Reporter, error_chain};
use crate::key::{Key, definition_key, output_digest};
use crate::plan::{CachePolicy, Plan, StepNode};
use crate::store::{KeyKind, Lookup, StepRecord, Store};

/// Downloads from a remote at once.
const PARALLEL_FETCHES: usize = 4;

/// How much a remote failure puts out of use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteScope {
    /// The remote as a whole (unreachable, unauthorized, failing): stop asking it this run.
    Remote,
    /// This step's entry only (wrong bytes, wrong size, a record that does not fit).
    Step,
}

/// A failure of the remote cache; never fails a run.
#[derive(Debug, Clone)]
pub struct RemoteError {
    pub scope: RemoteScope,
    /// The whole error chain, rendered.
    pub message: String,
}

impl RemoteError {
    pub fn remote(error: &(dyn std::error::Error + 'static)) -> RemoteError {
        RemoteError {
            scope: RemoteScope::Remote,
            message: error_chain(error),
        }
    }

    pub fn step(message: impl Into<String>) -> RemoteError {
        RemoteError {
            scope: RemoteScope::Step,
            message: message.into(),
        }
    }
}

/// What uploading one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushedStep {
    /// Bytes of outputs sent.
    pub uploaded_bytes: u64,
    /// Bytes of outputs the remote already had (by digest), not sent again.
    pub reused_bytes: u64,
}

/// Progress of one transfer: bytes done, bytes in all.
pub type TransferProgress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

/// A store of step records and outputs on another machine.
pub trait RemoteCache: Send + Sync + std::fmt::Debug {
    /// Where it is, for messages (`127.0.0.1:5000/team/cache`).
    fn describe(&self) -> String;

    /// Whether steps of `kind` are shared: costly to make and worth moving.
    fn shares(&self, kind: &str) -> bool;

    /// The record of `step` under its definition key `key`, if the remote has one that fits
    /// the step (same kind, version and params).
    fn lookup<'a>(
        &'a self,
        step: &'a StepNode,
        key: &'a Key,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, RemoteError>>;

    /// Downloads output `output` of `record` to `destination`, verified by digest and size;
    /// on failure nothing is left at `destination`.
    fn fetch<'a>(
        &'a self,
        record: &'a StepRecord,
        output: &'a str,
        destination: &'a Path,
        progress: TransferProgress<'a>,
    ) -> BoxFuture<'a, Result<(), RemoteError>>;

    /// Whether the remote has a record under definition key `key`.
    fn contains<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<bool, RemoteError>>;

    /// Uploads `record` and its output files (`(name, path)`), outputs first.
    fn push<'a>(
        &'a self,
        record: &'a StepRecord,
        files: &'a [(String, PathBuf)],
        progress: TransferProgress<'a>,
    ) -> BoxFuture<'a, Result<PushedStep, RemoteError>>;
}

/// The remote as one run uses it: put out of use after its first remote-wide failure, which
/// is reported once.
pub(super) struct RemoteUse<'a> {
    cache: Arc<dyn RemoteCache>,
    reporter: &'a dyn Reporter,
    disabled: bool,
}

impl<'a> RemoteUse<'a> {
    pub fn new(cache: Arc<dyn RemoteCache>, reporter: &'a dyn Reporter) -> RemoteUse<'a> {
        RemoteUse {
            cache,
            reporter,
            disabled: false,
        }
    }

    pub fn usable_for(&self, kind: &str) -> bool {
        !self.disabled && self.cache.shares(kind)
    }

    /// Reports a download's `error` for `step`; a remote-wide one puts the remote out of use.
    pub fn failed(&mut self, step: &str, error: RemoteError) {
        self.warn(
            step,
            error,
            "so this run goes on without it",
            "the remote cache's entry for this step was refused, so it runs here",
        );
    }

    /// Reports an upload's `error` for `step`; a remote-wide one ends the uploads.
    fn push_failed(&mut self, step: &str, error: RemoteError) {
        self.warn(
            step,
            error,
            "so nothing more is uploaded (the build itself succeeded)",
            "this step could not be uploaded to the remote cache",
        );
    }

    fn warn(&mut self, step: &str, error: RemoteError, remote_wide: &str, this_step: &str) {
        if self.disabled {
            return;
        }
        let warning = match error.scope {
            RemoteScope::Remote => {
                self.disabled = true;
                format!(
                    "the remote cache {} is not usable, {remote_wide}: {}",
                    self.cache.describe(),
                    error.message
                )
            }
            RemoteScope::Step => format!("{this_step}: {}", error.message),
        };
        self.reporter.report(&Event::CacheWarning {
            step: step.to_owned(),
            warning,
        });
    }

    /// Looks `step` up remotely; a failure is reported and is a miss.
    pub async fn lookup(&mut self, step: &StepNode, key: &Key) -> Option<StepRecord> {
        match self.cache.lookup(step, key).await {
            Ok(Some(record)) => match check_record(step, key, &record) {
                Ok(()) => Some(record),
                Err(error) => {
                    self.failed(&step.id, error);
                    None
                }
            },
            Ok(None) => None,
            Err(error) => {
                self.failed(&step.id, error);
                None
            }
        }
    }

    /// Downloads, verifies and records every hit in `hits`, a few at a time. Returns the hits
    /// that are now stored, and those that failed (already reported).
    pub async fn fetch_all(
        &mut self,
        store: &Store,
        plan: &Plan,
        hits: Vec<(NodeIndex, StepRecord)>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(Vec<(NodeIndex, StepRecord)>, Vec<NodeIndex>), super::EngineError> {
        let (progress_sender, mut progress) = mpsc::unbounded_channel::<(NodeIndex, u64, u64)>();
        let mut pending = hits.into_iter();
        let mut running = FuturesUnordered::new();
        let mut stored = Vec::new();
        let mut failed = Vec::new();
        let reporter = self.reporter;
        let cache = Arc::clone(&self.cache);
        let start = |node: NodeIndex, record: StepRecord, running: &mut FuturesUnordered<_>| {
            let step = plan.node(node);
            reporter.report(&Event::StepFetching {
                step: step.id.clone(),
                kind: step.kind.clone(),
                bytes: record.total_size(),
            });
            let cache = Arc::clone(&cache);
            let store = store.clone();
            let sender = progress_sender.clone();
            let step_id = step.id.clone();
            running.push(async move {
                let report = move |done: u64, total: u64| {
                    let _ = sender.send((node, done, total));
                };
                let result = fetch_step(&*cache, &store, &step_id, record, &report).await;
                (node, result)
            });
        };
        for _ in 0..PARALLEL_FETCHES {
            if let Some((node, record)) = pending.next() {
                start(node, record, &mut running);
            }
        }
        while !running.is_empty() {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(super::EngineError::Cancelled),
                Some((node, done, total)) = progress.recv() => {
                    self.reporter.report(&Event::StepProgress {
                        step: plan.node(node).id.clone(),
                        done,
                        total: Some(total),
                        unit: ProgressUnit::Bytes,
                    });
                }
                Some((node, result)) = running.next() => {
                    match result {
                        Ok(record) => stored.push((node, record)),
                        Err(error) => {
                            self.failed(&plan.node(node).id, error);
                            failed.push(node);
                        }
                    }
                    if let Some((node, record)) = pending.next() {
                        start(node, record, &mut running);
                    }
                }
            }
        }
        Ok((stored, failed))
    }

    /// Uploads every shared, trustworthy step of the plan that is stored here and the remote
    /// lacks (step 3 of the module note). Failures are reported, never returned.
    pub async fn push_run(
        &mut self,
        store: &Store,
        plan: &Plan,
        def_keys: &[Key],
        volatile: &[bool],
        cancel: &tokio_util::sync::CancellationToken,
    ) {
        let mut pushed = 0usize;
        let mut present = 0usize;
        let mut uploaded_bytes = 0u64;
        for node in plan.topological_order().unwrap_or_default() {
            let step = plan.node(node);
            if self.disabled || cancel.is_cancelled() {
                break;
            }
            // Every shared step of the plan that is stored here, whether or not this run
            // needed it: a build whose image was already stored still exports its steps.
            if step.cache != CachePolicy::Cached
                || volatile[node.index()]
                || !self.cache.shares(&step.kind)
            {
                continue;
            }
            let key = &def_keys[node.index()];
            let record = match store.lookup(KeyKind::Definition, key) {
                Ok(Lookup::Hit(record)) => *record,
                // Not stored here (not needed by this run, or evicted): nothing to push.
                Ok(Lookup::Miss(_)) => continue,
                Err(error) => {
                    self.push_failed(&step.id, RemoteError::step(error_chain(&error)));
                    continue;
                }
            };
            match self.cache.contains(key).await {
                Ok(true) => {
                    present += 1;
                    continue;
                }
                Ok(false) => {}
                Err(error) => {
                    self.push_failed(&step.id, error);
                    continue;
                }
            }
            let mut files = Vec::new();
            let mut missing = None;
            for (name, output) in &record.outputs {
                match store.content_file(output) {
                    Ok(path) => files.push((name.clone(), path)),
                    Err(error) => missing = Some(error_chain(&error)),
                }
            }
            if let Some(error) = missing {
                self.push_failed(&step.id, RemoteError::step(error));
                continue;
            }
            let mut stored_record = record.clone();
            stored_record.step_id = step.id.clone();
            self.reporter.report(&Event::StepPushing {
                step: step.id.clone(),
                kind: step.kind.clone(),
                bytes: record.total_size(),
            });
            let reporter = self.reporter;
            let step_id = step.id.clone();
            let progress = move |done: u64, total: u64| {
                reporter.report(&Event::StepProgress {
                    step: step_id.clone(),
                    done,
                    total: Some(total),
                    unit: ProgressUnit::Bytes,
                });
            };
            let result = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                result = self.cache.push(&stored_record, &files, &progress) => result,
            };
            match result {
                Ok(done) => {
                    pushed += 1;
                    uploaded_bytes += done.uploaded_bytes;
                    self.reporter.report(&Event::StepPushed {
                        step: step.id.clone(),
                        kind: step.kind.clone(),
                        uploaded_bytes: done.uploaded_bytes,
                        reused_bytes: done.reused_bytes,
                    });
                }
                Err(error) => self.push_failed(&step.id, error),
            }
        }
        self.reporter.report(&Event::PushFinished {
            remote: self.cache.describe(),
            pushed,
            present,
            uploaded_bytes,
        });
    }
}

/// A remote record must describe this very step: its definition key recomputed from the
/// record's own kind, version, params and inputs, and an output digest that matches its
/// outputs. What it claims about bytes is checked while they stream.
fn check_record(step: &StepNode, key: &Key, record: &StepRecord) -> Result<(), RemoteError> {
    if record.kind != step.kind || record.version != step.version || record.params != step.params {
        return Err(RemoteError::step(format!(
            "its record describes a `{}` step (version {}) with other parameters",
            record.kind, record.version
        )));
    }
    let inputs: Vec<(&str, Key)> = record
        .inputs
        .iter()
        .map(|input| (input.name.as_str(), input.definition_key))
        .collect();
    let recomputed = definition_key(&record.kind, record.version, &record.params, &inputs);
    if recomputed != *key || record.definition_key != *key {
        return Err(RemoteError::step(format!(
            "its record is filed under definition key {} but describes {}",
            key.short(),
            recomputed.short()
        )));
    }
    let digest = output_digest(
        record
            .outputs
            .iter()
            .map(|(name, output)| (name.as_str(), output.integrity.as_str(), output.size)),
    );
    if digest != record.output_digest {
        return Err(RemoteError::step(
            "its record's output digest does not match the outputs it lists",
        ));
    }
    Ok(())
}

/// Downloads every output of `record` into a scratch directory, publishes each (the store
/// hashes it again: what it stores is what was verified), and records the step.
async fn fetch_step(
    cache: &dyn RemoteCache,
    store: &Store,
    step_id: &str,
    record: StepRecord,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<StepRecord, RemoteError> {
    let scratch = store
        .scratch()
        .map_err(|error| RemoteError::step(error_chain(&error)))?;
    let total = record.total_size();
    let mut before = 0u64;
    let mut files = Vec::new();
    for name in record.outputs.keys() {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(RemoteError::step(format!(
                "its record names an invalid output `{name}`"
            )));
        }
        let path = scratch.path().join(name);
        let offset = before;
        let one = move |done: u64, _: u64| progress(offset + done, total);
        cache.fetch(&record, name, &path, &one).await?;
        before += record.outputs[name].size;
        files.push((name.clone(), path));
    }
    for (name, path) in files {
        let store = store.clone();
        let published = tokio::task::spawn_blocking(move || store.publish_file(&path))
            .await
            .map_err(|error| RemoteError::step(format!("publishing panicked: {error}")))?
            .map_err(|error| RemoteError::step(error_chain(&error)))?;
        if published != record.outputs[&name] {
            return Err(RemoteError::step(format!(
                "output `{name}` was stored as {} ({} bytes), not the {} ({} bytes) its record \
                 names",
                published.integrity,
                published.size,
                record.outputs[&name].integrity,
                record.outputs[&name].size
            )));
        }
    }
    let mut local = record;
    local.step_id = step_id.to_owned();
    store
        .commit(&local)
        .map_err(|error| RemoteError::step(error_chain(&error)))?;
    Ok(local)
}
