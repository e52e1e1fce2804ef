//! The scheduling state of one run, owned by its loop (cargo's job queue, in small).
//!
//! [`Engine::run`](super::Engine::run) builds a [`DrainState`] after the pre-pass and turns a
//! few lines of loop around it: [`DrainState::spawn_ready`] starts a job task for every ready
//! step (unless the run stops), [`DrainState::handle`] takes one message from a job, and
//! [`DrainState::finish`] reports what never started and closes the run. The loop waits only
//! on the jobs' channel and the run's cancel token; waiting for permits happens in the jobs.
//! Only these methods call the [`Reporter`]; jobs send [`Message`]s.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use petgraph::graph::NodeIndex;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::job::{self, Job, JobControl, ResolvedInput, Turn};
use super::queue::ReadyQueue;
use super::{
    EngineError, Event, FailureKind, HitKind, Inner, Message, Prepass, Reporter, RunOptions,
    RunReport, StepOutputs, error_chain,
};
use crate::key::Key;
use crate::plan::{CachePolicy, Plan, PlanError};
use crate::store::{LastRun, LastRunInput};

pub(super) struct DrainState<'a> {
    inner: &'a Arc<Inner>,
    plan: &'a Plan,
    reporter: &'a dyn Reporter,
    keep_going: bool,
    /// The caller's token (Ctrl-C).
    run_cancel: CancellationToken,
    def_keys: Vec<Key>,
    volatile: Vec<bool>,
    forced: Vec<bool>,
    queue: ReadyQueue<NodeIndex>,
    /// Outputs of every step that is satisfied, by node.
    done: HashMap<NodeIndex, StepOutputs>,
    report: RunReport,
    tasks: JoinSet<()>,
    control: JobControl,
    /// The turn the next spawned job waits for (see [`Turn`]).
    last_turn: Option<oneshot::Receiver<()>>,
    /// Steps with a job that has not given up before starting: a job that ends
    /// [`FailureKind::NotStarted`] leaves this set, so the step is reported as never started.
    started: HashSet<NodeIndex>,
    running: usize,
    failures: Vec<String>,
    skipped: usize,
    stopping: bool,
    cancelled: bool,
}

impl<'a> DrainState<'a> {
    /// Reports the run's start and its definition-key hits, and queues the needed steps.
    pub fn new(
        inner: &'a Arc<Inner>,
        plan: &'a Plan,
        prepass: Prepass,
        reporter: &'a dyn Reporter,
        options: &RunOptions,
        sender: mpsc::UnboundedSender<Message>,
    ) -> Result<DrainState<'a>, EngineError> {
        let Prepass {
            def_keys,
            volatile,
            forced,
            needed,
            hits,
            remote_hits,
            done,
        } = prepass;
        let mut report = RunReport::default();
        reporter.report(&Event::RunStarted {
            steps: needed.len() + hits.len() + remote_hits.len(),
            cached: hits.len() + remote_hits.len(),
            to_run: needed.len(),
        });
        for &node in &hits {
            let step = plan.node(node);
            reporter.report(&Event::StepCached {
                step: step.id.clone(),
                kind: step.kind.clone(),
                key: def_keys[node.index()],
                hit: HitKind::Definition,
            });
            report.cached.push((step.id.clone(), HitKind::Definition));
        }
        for (node, bytes) in remote_hits {
            let step = plan.node(node);
            reporter.report(&Event::StepCached {
                step: step.id.clone(),
                kind: step.kind.clone(),
                key: def_keys[node.index()],
                hit: HitKind::Remote,
            });
            report.cached.push((step.id.clone(), HitKind::Remote));
            report.remote_bytes += bytes;
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

        let cancel = options.cancel.child_token();
        let stop = cancel.child_token();
        Ok(DrainState {
            inner,
            plan,
            reporter,
            keep_going: options.keep_going,
            run_cancel: options.cancel.clone(),
            def_keys,
            volatile,
            forced,
            queue,
            done,
            report,
            tasks: JoinSet::new(),
            control: JobControl {
                sender,
                cancel,
                stop,
            },
            last_turn: None,
            started: HashSet::new(),
            running: 0,
            failures: Vec::new(),
            skipped: 0,
            stopping: false,
            cancelled: false,
        })
    }

    /// True when no job is left: the run is over.
    pub fn is_idle(&self) -> bool {
        self.running == 0
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// Starts a job for every ready step, highest priority first, unless the run stops. Jobs
    /// wait for their permits themselves, in this order (see [`Turn`]).
    pub fn spawn_ready(&mut self) {
        if self.stopping {
            return;
        }
        while let Some(node) = self.queue.dequeue() {
            let step = self.plan.node(node);
            let inputs = self
                .plan
                .inputs(node)
                .into_iter()
                .map(|(name, input)| ResolvedInput {
                    name: name.to_owned(),
                    step_id: self.plan.node(input).id.clone(),
                    definition_key: self.def_keys[input.index()],
                    outputs: self.done[&input].clone(),
                })
                .collect();
            let job = Job {
                node,
                step: step.clone(),
                definition_key: self.def_keys[node.index()],
                volatile: self.volatile[node.index()],
                forced: self.forced[node.index()],
                inputs,
            };
            let (turn, next) = Turn::after(self.last_turn.take());
            self.last_turn = Some(next);
            self.started.insert(node);
            self.running += 1;
            self.tasks.spawn(job::run(
                Arc::clone(self.inner),
                job,
                turn,
                self.control.clone(),
            ));
        }
    }

    /// The caller cancelled the run: interrupt executing steps, stop waiting ones.
    pub fn cancel(&mut self) {
        self.cancelled = true;
        self.stop();
        self.control.cancel.cancel();
    }

    /// Starts nothing new; jobs still waiting (for their turn, permits or another run's
    /// result) give up.
    fn stop(&mut self) {
        self.stopping = true;
        self.control.stop.cancel();
    }

    pub fn handle(&mut self, message: Message) {
        let plan = self.plan;
        match message {
            Message::Started { node, key } => {
                let step = plan.node(node);
                self.reporter.report(&Event::StepStarted {
                    step: step.id.clone(),
                    kind: step.kind.clone(),
                    key,
                    summary: step.summary.clone(),
                });
            }
            Message::Progress {
                node,
                done,
                total,
                unit,
            } => self.reporter.report(&Event::StepProgress {
                step: plan.node(node).id.clone(),
                done,
                total,
                unit,
            }),
            Message::Output { node, stream, line } => self.reporter.report(&Event::StepOutput {
                step: plan.node(node).id.clone(),
                stream,
                line,
            }),
            Message::CacheWarning { node, warning } => self.reporter.report(&Event::CacheWarning {
                step: plan.node(node).id.clone(),
                warning,
            }),
            Message::Finished {
                node,
                result,
                permit,
            } => {
                self.running -= 1;
                let step = plan.node(node);
                match result {
                    Ok((outputs, Some(hit), _)) => {
                        self.reporter.report(&Event::StepCached {
                            step: step.id.clone(),
                            kind: step.kind.clone(),
                            key: self.def_keys[node.index()],
                            hit,
                        });
                        self.report.cached.push((step.id.clone(), hit));
                        self.done.insert(node, outputs);
                        self.queue.finish(node);
                    }
                    Ok((outputs, None, duration)) => {
                        self.reporter.report(&Event::StepFinished {
                            step: step.id.clone(),
                            kind: step.kind.clone(),
                            duration,
                            output_bytes: outputs.outputs.values().map(|o| o.size).sum(),
                        });
                        self.report.ran.push(step.id.clone());
                        self.done.insert(node, outputs);
                        self.queue.finish(node);
                    }
                    // It gave up waiting because the run stopped: reported with everything
                    // else that never started, in `finish`.
                    Err(failure) if failure.kind == FailureKind::NotStarted => {
                        self.started.remove(&node);
                    }
                    Err(failure) if failure.kind == FailureKind::Cancelled => {
                        self.cancelled = true;
                        self.stop();
                        self.reporter.report(&Event::StepCancelled {
                            step: step.id.clone(),
                        });
                        self.skip_dependants(node);
                    }
                    Err(failure) => {
                        self.reporter.report(&Event::StepFailed {
                            step: step.id.clone(),
                            kind: step.kind.clone(),
                            error: failure.message,
                        });
                        self.failures.push(step.id.clone());
                        if !self.keep_going {
                            self.stop();
                        }
                        self.skip_dependants(node);
                    }
                }
                // A failed step's permits come back only now that the run has stopped, so no
                // waiting job of this run can take them and start.
                drop(permit);
            }
        }
    }

    fn skip_dependants(&mut self, node: NodeIndex) {
        let because = &self.plan.node(node).id;
        for skipped in self.queue.skip_dependants(node) {
            self.skipped += 1;
            self.reporter.report(&Event::StepSkipped {
                step: self.plan.node(skipped).id.clone(),
                because: because.clone(),
            });
        }
    }

    /// Reports what never started, records the run's bookkeeping, and ends the run.
    pub async fn finish(
        mut self,
        project: &str,
        started: Instant,
    ) -> Result<RunReport, EngineError> {
        while self.tasks.join_next().await.is_some() {}
        self.cancelled |= self.run_cancel.is_cancelled();
        let plan = self.plan;
        let def_keys = &self.def_keys;
        let store = &self.inner.store;

        let reason = self
            .failures
            .first()
            .cloned()
            .unwrap_or_else(|| "cancellation".to_owned());
        let mut never_started = self.queue.never_started(&self.started);
        never_started.sort();
        for node in never_started {
            self.skipped += 1;
            self.reporter.report(&Event::StepSkipped {
                step: plan.node(node).id.clone(),
                because: reason.clone(),
            });
        }

        // Bookkeeping for GC order and `graph --why`; failures here only cost a warning.
        let used: Vec<Key> = self
            .done
            .keys()
            .filter(|node| plan.node(**node).cache == CachePolicy::Cached)
            .map(|node| def_keys[node.index()])
            .collect();
        if let Err(error) = store.touch(&used) {
            self.reporter.report(&Event::CacheWarning {
                step: String::new(),
                warning: error_chain(&error),
            });
        }
        let last_runs: Vec<(String, LastRun)> = self
            .done
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
            self.reporter.report(&Event::CacheWarning {
                step: String::new(),
                warning: error_chain(&error),
            });
        }

        let mut report = self.report;
        report.duration = started.elapsed();
        self.reporter.report(&Event::RunFinished {
            ran: report.ran.len(),
            cached: report.cached.len(),
            remote: report
                .cached
                .iter()
                .filter(|(_, hit)| *hit == HitKind::Remote)
                .count(),
            remote_bytes: report.remote_bytes,
            failed: self.failures.len(),
            skipped: self.skipped,
            duration: report.duration,
        });
        if self.cancelled {
            return Err(EngineError::Cancelled);
        }
        if let Some(first) = self.failures.first() {
            return Err(EngineError::StepsFailed {
                failed: self.failures.len(),
                first: first.clone(),
            });
        }
        report.outputs = self
            .done
            .into_iter()
            .map(|(node, outputs)| (plan.node(node).id.clone(), outputs))
            .collect();
        Ok(report)
    }
}
