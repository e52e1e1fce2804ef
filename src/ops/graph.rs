//! `banger graph`: a plan with each step's cache status, and why a step would run.
//!
//! Lifecycle:
//! 1. [`Inspection::new`] keys the plan, looks every cached step up by definition key, and walks
//!    back from the targets exactly as the engine does (stopping at hits), so the status shown
//!    is what `banger build`/`up` would do. Read-only: it never writes to the store.
//! 2. [`Inspection::explain`] compares one step with the project's last run
//!    ([`crate::store::LastRun`]) field by field and, for every input that changed, explains
//!    that input too, down to the root causes.
//! 3. `render_*` turn the result into text (a tree from the targets, like `cargo tree`), DOT or
//!    JSON. Rendering is pure, so snapshots test it.
//!
//! Statuses: **cached** (its definition key is stored: it will not run); **will run**;
//! **cutoff possible** (its own definition is unchanged since the last run and only inputs will
//! re-run: if they rebuild to identical bytes it will not run); **never cached** (boots, user
//! commands, unpinned tags: always run); **not needed** (only an input of a cached step: it is
//! not even looked at).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use petgraph::graph::NodeIndex;
use serde_json::{Value, json};

use crate::engine::volatile_steps;
use crate::key::{Key, ParamChange, ParamValue};
use crate::plan::{CachePolicy, Plan, PlanError};
use crate::store::{KeyKind, LastRun, Lookup, Miss, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What would happen to a step if the plan ran now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Cached,
    WillRun,
    CutoffPossible,
    NeverCached,
    NotNeeded,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::WillRun => "will run",
            Status::CutoffPossible => "cutoff possible",
            Status::NeverCached => "never cached",
            Status::NotNeeded => "not needed",
        }
    }

    /// Snake-case name for JSON.
    pub fn as_json(self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::WillRun => "will_run",
            Status::CutoffPossible => "cutoff_possible",
            Status::NeverCached => "never_cached",
            Status::NotNeeded => "not_needed",
        }
    }

    const ORDER: [Status; 5] = [
        Status::Cached,
        Status::WillRun,
        Status::CutoffPossible,
        Status::NeverCached,
        Status::NotNeeded,
    ];

    fn ansi(self) -> &'static str {
        match self {
            Status::Cached => "\x1b[32m",
            Status::WillRun => "\x1b[33m",
            Status::CutoffPossible => "\x1b[36m",
            Status::NeverCached => "\x1b[35m",
            Status::NotNeeded => "\x1b[2m",
        }
    }
}

/// One reason a step would run (or would not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Its definition key is stored.
    Cached,
    /// A step that consumes it is cached, so it is not needed.
    NotNeeded,
    /// The kind is never cached: it runs every time.
    NeverCached,
    /// It reads (directly or not) from a never-cached step, so it is looked up by content key
    /// once that step has run.
    ReadsVolatileInput {
        step: String,
    },
    /// This project never ran the step before (and no other run stored this definition).
    FirstRun,
    KindChanged {
        old: String,
        new: String,
    },
    VersionBumped {
        old: u32,
        new: u32,
    },
    ParamsChanged(Vec<ParamChange>),
    /// An input now comes from a different definition; `why` explains that input.
    InputChanged {
        name: String,
        step: String,
        why: Box<Explanation>,
    },
    InputAdded {
        name: String,
        step: String,
    },
    InputRemoved {
        name: String,
        step: String,
    },
    /// Unchanged since the last run, but the stored output is gone.
    OutputMissing {
        output: String,
    },
    /// Unchanged since the last run, but `banger cache gc` evicted it.
    Evicted {
        at_ms: u64,
    },
    /// Unchanged since the last run, yet not stored (the store was cleared, or the last run
    /// used another store).
    NotStored,
}

/// Why one step has its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub step: String,
    pub kind: String,
    pub key: Key,
    pub status: Status,
    pub reasons: Vec<Reason>,
}

/// A plan's statuses against a store.
#[derive(Debug)]
pub struct Inspection<'p> {
    plan: &'p Plan,
    keys: Vec<Key>,
    statuses: Vec<Status>,
    /// Per node: the stored miss for cached steps that missed.
    misses: Vec<Option<Miss>>,
    volatile: Vec<bool>,
    last_runs: BTreeMap<String, LastRun>,
}

impl<'p> Inspection<'p> {
    /// Computes every step's status; `project` selects the last-run records.
    pub fn new(plan: &'p Plan, store: &Store, project: &str) -> Result<Self, InspectError> {
        let keys = plan.definition_keys()?;
        let volatile = volatile_steps(plan)?;
        let last_runs = store.last_runs(project)?;
        let count = plan.len();
        let mut hits = vec![false; count];
        let mut misses: Vec<Option<Miss>> = vec![None; count];
        for node in plan.node_indices() {
            let index = node.index();
            if plan.node(node).cache == CachePolicy::Never {
                continue;
            }
            match store.lookup(KeyKind::Definition, &keys[index])? {
                Lookup::Hit(_) if !volatile[index] => hits[index] = true,
                Lookup::Hit(_) => {}
                Lookup::Miss(miss) => misses[index] = Some(miss),
            }
        }
        let mut needed = vec![false; count];
        let mut stack = plan.targets();
        while let Some(node) = stack.pop() {
            if needed[node.index()] {
                continue;
            }
            needed[node.index()] = true;
            if !hits[node.index()] {
                stack.extend(plan.inputs(node).into_iter().map(|(_, input)| input));
            }
        }
        let mut inspection = Inspection {
            plan,
            keys,
            statuses: vec![Status::NotNeeded; count],
            misses,
            volatile,
            last_runs,
        };
        for node in plan.topological_order()? {
            let index = node.index();
            inspection.statuses[index] = if !needed[index] {
                Status::NotNeeded
            } else if hits[index] {
                Status::Cached
            } else if plan.node(node).cache == CachePolicy::Never {
                Status::NeverCached
            } else if inspection.cutoff_possible(node) {
                Status::CutoffPossible
            } else {
                Status::WillRun
            };
        }
        Ok(inspection)
    }

    pub fn plan(&self) -> &Plan {
        self.plan
    }

    pub fn status(&self, node: NodeIndex) -> Status {
        self.statuses[node.index()]
    }

    pub fn key(&self, node: NodeIndex) -> Key {
        self.keys[node.index()]
    }

    /// How many steps have each status.
    pub fn counts(&self) -> Vec<(Status, usize)> {
        Status::ORDER
            .iter()
            .map(|&status| {
                (
                    status,
                    self.statuses.iter().filter(|&&s| s == status).count(),
                )
            })
            .filter(|(_, count)| *count > 0)
            .collect()
    }

    /// A step misses only because inputs will re-run, and its own definition is unchanged.
    fn cutoff_possible(&self, node: NodeIndex) -> bool {
        let step = self.plan.node(node);
        let Some(last) = self.last_runs.get(&step.id) else {
            return false;
        };
        let inputs = self.plan.inputs(node);
        let own_definition_unchanged = last.kind == step.kind
            && last.version == step.version
            && last.params == step.params
            && last.inputs.len() == inputs.len()
            && last
                .inputs
                .iter()
                .zip(&inputs)
                .all(|(old, (name, _))| old.name == *name);
        own_definition_unchanged
            && inputs.iter().any(|(_, input)| {
                matches!(
                    self.statuses[input.index()],
                    Status::WillRun | Status::CutoffPossible | Status::NeverCached
                )
            })
    }

    /// Why `node` has its status, compared with the project's last run.
    pub fn explain(&self, node: NodeIndex) -> Explanation {
        let mut seen = HashSet::new();
        self.explain_inner(node, &mut seen)
    }

    fn explain_inner(&self, node: NodeIndex, seen: &mut HashSet<NodeIndex>) -> Explanation {
        let step = self.plan.node(node);
        let status = self.status(node);
        let mut reasons = Vec::new();
        seen.insert(node);
        match status {
            Status::Cached => reasons.push(Reason::Cached),
            Status::NotNeeded => reasons.push(Reason::NotNeeded),
            Status::NeverCached => reasons.push(Reason::NeverCached),
            Status::WillRun | Status::CutoffPossible => {
                if self.volatile[node.index()]
                    && let Some(source) = self.volatile_source(node)
                {
                    reasons.push(Reason::ReadsVolatileInput { step: source });
                }
                match self.last_runs.get(&step.id) {
                    None => reasons.push(Reason::FirstRun),
                    Some(last) => self.compare(node, last, seen, &mut reasons),
                }
            }
        }
        Explanation {
            step: step.id.clone(),
            kind: step.kind.clone(),
            key: self.key(node),
            status,
            reasons,
        }
    }

    fn compare(
        &self,
        node: NodeIndex,
        last: &LastRun,
        seen: &mut HashSet<NodeIndex>,
        reasons: &mut Vec<Reason>,
    ) {
        let step = self.plan.node(node);
        if last.kind != step.kind {
            reasons.push(Reason::KindChanged {
                old: last.kind.clone(),
                new: step.kind.clone(),
            });
        }
        if last.version != step.version {
            reasons.push(Reason::VersionBumped {
                old: last.version,
                new: step.version,
            });
        }
        let changes = step.params.diff(&last.params);
        if !changes.is_empty() {
            reasons.push(Reason::ParamsChanged(changes));
        }
        let inputs = self.plan.inputs(node);
        for (name, input) in &inputs {
            let input_step = &self.plan.node(*input).id;
            match last.inputs.iter().find(|old| old.name == *name) {
                None => reasons.push(Reason::InputAdded {
                    name: (*name).to_owned(),
                    step: input_step.clone(),
                }),
                Some(old) if old.definition_key != self.key(*input) => {
                    let why = if seen.contains(input) {
                        // Already explained higher up (a shared input): don't repeat it.
                        Explanation {
                            step: input_step.clone(),
                            kind: self.plan.node(*input).kind.clone(),
                            key: self.key(*input),
                            status: self.status(*input),
                            reasons: Vec::new(),
                        }
                    } else {
                        self.explain_inner(*input, seen)
                    };
                    reasons.push(Reason::InputChanged {
                        name: (*name).to_owned(),
                        step: input_step.clone(),
                        why: Box::new(why),
                    });
                }
                Some(_) => {}
            }
        }
        for old in &last.inputs {
            if !inputs.iter().any(|(name, _)| *name == old.name) {
                reasons.push(Reason::InputRemoved {
                    name: old.name.clone(),
                    step: old.step_id.clone(),
                });
            }
        }
        if reasons.is_empty() {
            // Same definition as last time: the miss itself is the reason.
            reasons.push(match &self.misses[node.index()] {
                Some(Miss::OutputMissing { output, .. }) => Reason::OutputMissing {
                    output: output.clone(),
                },
                Some(Miss::Evicted { at_ms }) => Reason::Evicted { at_ms: *at_ms },
                Some(Miss::NoRecord) | None => Reason::NotStored,
            });
        }
    }

    /// The nearest never-cached step this one reads from.
    fn volatile_source(&self, node: NodeIndex) -> Option<String> {
        let mut stack = vec![node];
        let mut seen = HashSet::new();
        while let Some(current) = stack.pop() {
            for (_, input) in self.plan.inputs(current) {
                if !seen.insert(input) {
                    continue;
                }
                if self.plan.node(input).cache == CachePolicy::Never {
                    return Some(self.plan.node(input).id.clone());
                }
                stack.push(input);
            }
        }
        None
    }
}

/// Text styling for terminal output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

impl Style {
    fn status(self, status: Status, text: &str) -> String {
        if self.color {
            format!("{}{text}\x1b[0m", status.ansi())
        } else {
            text.to_owned()
        }
    }

    fn dim(self, text: &str) -> String {
        if self.color {
            format!("\x1b[2m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// The plan as a tree from its targets, inputs below their consumers; a step shown before is
/// marked `(*)` instead of repeating its inputs. Columns: step, kind, short key, status,
/// summary. Ends with a count per status.
pub fn render_text(inspection: &Inspection<'_>, style: Style) -> String {
    struct Line {
        tree: String,
        node: NodeIndex,
        repeated: bool,
    }
    fn walk(
        inspection: &Inspection<'_>,
        node: NodeIndex,
        prefix: &str,
        branch: &str,
        printed: &mut HashSet<NodeIndex>,
        lines: &mut Vec<Line>,
    ) {
        let repeated = !printed.insert(node);
        let name = inspection.plan.node(node).id.clone();
        lines.push(Line {
            tree: format!("{prefix}{branch}{name}"),
            node,
            repeated,
        });
        if repeated {
            return;
        }
        let child_prefix = match branch {
            "" => prefix.to_owned(),
            "└── " => format!("{prefix}    "),
            _ => format!("{prefix}│   "),
        };
        let inputs = inspection.plan.inputs(node);
        for (index, (_, input)) in inputs.iter().enumerate() {
            let last = index + 1 == inputs.len();
            walk(
                inspection,
                *input,
                &child_prefix,
                if last { "└── " } else { "├── " },
                printed,
                lines,
            );
        }
    }

    let plan = inspection.plan;
    let mut lines = Vec::new();
    let mut printed = HashSet::new();
    for target in plan.targets() {
        walk(inspection, target, "", "", &mut printed, &mut lines);
    }
    let width = |text: &str| text.chars().count();
    let tree_width = lines
        .iter()
        .map(|line| width(&line.tree) + if line.repeated { 4 } else { 0 })
        .max()
        .unwrap_or(0);
    let kind_width = lines
        .iter()
        .map(|line| plan.node(line.node).kind.len())
        .max()
        .unwrap_or(0);
    let status_width = Status::ORDER
        .iter()
        .map(|status| status.as_str().len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for line in &lines {
        let step = plan.node(line.node);
        let status = inspection.status(line.node);
        let tree = if line.repeated {
            format!("{} (*)", line.tree)
        } else {
            line.tree.clone()
        };
        let padding = tree_width - width(&tree);
        let status_text = format!("{:<status_width$}", status.as_str());
        let mut text = format!(
            "{tree}{:padding$}  {:<kind_width$}  {}  {}",
            "",
            step.kind,
            style.dim(&inspection.key(line.node).short()),
            style.status(status, &status_text),
        );
        if !step.summary.is_empty() && !line.repeated {
            text.push_str("  ");
            text.push_str(&step.summary);
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    let counts: Vec<String> = inspection
        .counts()
        .into_iter()
        .map(|(status, count)| format!("{count} {}", status.as_str()))
        .collect();
    let _ = writeln!(out, "\n{} step(s): {}", plan.len(), counts.join(" · "));
    out
}

/// The plan in Graphviz DOT, edges from input to consumer labelled with the input name.
pub fn render_dot(inspection: &Inspection<'_>) -> String {
    fn quote(text: &str) -> String {
        let mut quoted = String::with_capacity(text.len() + 2);
        quoted.push('"');
        for c in text.chars() {
            match c {
                '"' => quoted.push_str("\\\""),
                '\\' => quoted.push_str("\\\\"),
                '\n' => quoted.push_str("\\n"),
                _ => quoted.push(c),
            }
        }
        quoted.push('"');
        quoted
    }
    let plan = inspection.plan;
    let mut out = String::from(
        "digraph banger {\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fontname=\"monospace\"];\n",
    );
    for node in plan.node_indices() {
        let step = plan.node(node);
        let status = inspection.status(node);
        let fill = match status {
            Status::Cached => "#d3f9d8",
            Status::WillRun => "#fff3bf",
            Status::CutoffPossible => "#d0ebff",
            Status::NeverCached => "#f3d9fa",
            Status::NotNeeded => "#f1f3f5",
        };
        let label = format!(
            "{}\n{} · {}\n{}",
            step.id,
            step.kind,
            inspection.key(node).short(),
            status.as_str()
        );
        let _ = writeln!(
            out,
            "  {} [label={}, fillcolor={}];",
            quote(&step.id),
            quote(&label),
            quote(fill)
        );
    }
    for node in plan.node_indices() {
        for (name, input) in plan.inputs(node) {
            let _ = writeln!(
                out,
                "  {} -> {} [label={}];",
                quote(&plan.node(input).id),
                quote(&plan.node(node).id),
                quote(name)
            );
        }
    }
    out.push_str("}\n");
    out
}

/// The plan as one JSON document: steps in topological order with key, status, params and
/// inputs, plus the targets.
pub fn render_json(inspection: &Inspection<'_>) -> Result<Value, InspectError> {
    let plan = inspection.plan;
    let steps: Vec<Value> = plan
        .topological_order()?
        .into_iter()
        .map(|node| {
            let step = plan.node(node);
            let params: serde_json::Map<String, Value> = step
                .params
                .iter()
                .map(|(name, value)| (name.to_owned(), param_json(value)))
                .collect();
            let inputs: Vec<Value> = plan
                .inputs(node)
                .into_iter()
                .map(|(name, input)| json!({"name": name, "step": plan.node(input).id}))
                .collect();
            json!({
                "id": step.id,
                "kind": step.kind,
                "version": step.version,
                "key": inspection.key(node).to_hex(),
                "status": inspection.status(node).as_json(),
                "cache": match step.cache { CachePolicy::Cached => "cached", CachePolicy::Never => "never" },
                "resource": step.resource.as_str(),
                "summary": step.summary,
                "params": params,
                "inputs": inputs,
            })
        })
        .collect();
    let targets: Vec<&str> = plan
        .targets()
        .into_iter()
        .map(|node| plan.node(node).id.as_str())
        .collect();
    Ok(json!({"steps": steps, "targets": targets}))
}

/// A parameter as plain JSON (strings, numbers, lists, objects); project files as
/// `{"path", "digest"}`.
pub fn param_json(value: &ParamValue) -> Value {
    match value {
        ParamValue::Str(text) => json!(text),
        ParamValue::Int(number) => json!(number),
        ParamValue::Bool(flag) => json!(flag),
        ParamValue::List(values) => Value::Array(values.iter().map(param_json).collect()),
        ParamValue::Map(map) => json!(map),
        ParamValue::Source(path) => json!({"path": path, "digest": null}),
        ParamValue::Digest { path, digest } => json!({"path": path, "digest": digest}),
    }
}

/// `--why` as indented text.
pub fn render_explanation(explanation: &Explanation, style: Style) -> String {
    let mut out = String::new();
    let verdict = match explanation.status {
        Status::Cached => "will not run",
        Status::NotNeeded => "will not run",
        Status::NeverCached | Status::WillRun => "will run",
        Status::CutoffPossible => "will run unless its inputs rebuild to identical bytes",
    };
    let _ = writeln!(
        out,
        "{} ({} {}): {}",
        explanation.step,
        explanation.kind,
        explanation.key.short(),
        style.status(explanation.status, verdict)
    );
    write_reasons(&mut out, &explanation.reasons, 1);
    out
}

fn write_reasons(out: &mut String, reasons: &[Reason], depth: usize) {
    let indent = "  ".repeat(depth);
    for reason in reasons {
        match reason {
            Reason::Cached => {
                let _ = writeln!(out, "{indent}- its definition key is in the store");
            }
            Reason::NotNeeded => {
                let _ = writeln!(
                    out,
                    "{indent}- every step that reads it is cached, so it is not needed"
                );
            }
            Reason::NeverCached => {
                let _ = writeln!(
                    out,
                    "{indent}- this kind of step is never cached: it runs every time"
                );
            }
            Reason::ReadsVolatileInput { step } => {
                let _ = writeln!(
                    out,
                    "{indent}- it reads from {step}, which is never cached: it is looked up by content once that has run"
                );
            }
            Reason::FirstRun => {
                let _ = writeln!(out, "{indent}- it has not run before in this project");
            }
            Reason::KindChanged { old, new } => {
                let _ = writeln!(out, "{indent}- kind changed: {old} → {new}");
            }
            Reason::VersionBumped { old, new } => {
                let _ = writeln!(
                    out,
                    "{indent}- step version bumped: {old} → {new} (this banger builds it differently)"
                );
            }
            Reason::ParamsChanged(changes) => {
                for change in changes {
                    let _ = writeln!(out, "{indent}- {change}");
                }
            }
            Reason::InputChanged { name, step, why } => {
                if why.reasons.is_empty() {
                    let _ = writeln!(
                        out,
                        "{indent}- input `{name}` ({step}) changed (explained above)"
                    );
                } else {
                    let _ = writeln!(
                        out,
                        "{indent}- input `{name}` ({step}) changed; it {}:",
                        why.status.as_str()
                    );
                    write_reasons(out, &why.reasons, depth + 1);
                }
            }
            Reason::InputAdded { name, step } => {
                let _ = writeln!(out, "{indent}- new input `{name}` ({step})");
            }
            Reason::InputRemoved { name, step } => {
                let _ = writeln!(out, "{indent}- input `{name}` ({step}) was removed");
            }
            Reason::OutputMissing { output } => {
                let _ = writeln!(
                    out,
                    "{indent}- unchanged since the last run, but its stored output `{output}` is missing"
                );
            }
            Reason::Evicted { at_ms } => {
                let _ = writeln!(
                    out,
                    "{indent}- unchanged since the last run, but `banger cache gc` evicted it ({})",
                    format_time_ms(*at_ms)
                );
            }
            Reason::NotStored => {
                let _ = writeln!(
                    out,
                    "{indent}- unchanged since the last run, but not in this store (was it cleared?)"
                );
            }
        }
    }
}

/// `--why` as JSON.
pub fn explanation_json(explanation: &Explanation) -> Value {
    let reasons: Vec<Value> = explanation.reasons.iter().map(reason_json).collect();
    json!({
        "step": explanation.step,
        "kind": explanation.kind,
        "key": explanation.key.to_hex(),
        "status": explanation.status.as_json(),
        "reasons": reasons,
    })
}

fn reason_json(reason: &Reason) -> Value {
    match reason {
        Reason::Cached => json!({"reason": "cached"}),
        Reason::NotNeeded => json!({"reason": "not_needed"}),
        Reason::NeverCached => json!({"reason": "never_cached"}),
        Reason::ReadsVolatileInput { step } => {
            json!({"reason": "reads_volatile_input", "step": step})
        }
        Reason::FirstRun => json!({"reason": "first_run"}),
        Reason::KindChanged { old, new } => {
            json!({"reason": "kind_changed", "old": old, "new": new})
        }
        Reason::VersionBumped { old, new } => {
            json!({"reason": "version_bumped", "old": old, "new": new})
        }
        Reason::ParamsChanged(changes) => {
            let changes: Vec<Value> = changes
                .iter()
                .map(|change| {
                    json!({
                        "param": change.name,
                        "old": change.old.as_ref().map(param_json),
                        "new": change.new.as_ref().map(param_json),
                    })
                })
                .collect();
            json!({"reason": "params_changed", "changes": changes})
        }
        Reason::InputChanged { name, step, why } => json!({
            "reason": "input_changed", "input": name, "step": step, "why": explanation_json(why)
        }),
        Reason::InputAdded { name, step } => {
            json!({"reason": "input_added", "input": name, "step": step})
        }
        Reason::InputRemoved { name, step } => {
            json!({"reason": "input_removed", "input": name, "step": step})
        }
        Reason::OutputMissing { output } => json!({"reason": "output_missing", "output": output}),
        Reason::Evicted { at_ms } => json!({"reason": "evicted", "at_ms": at_ms}),
        Reason::NotStored => json!({"reason": "not_stored"}),
    }
}

/// `2026-11-23 10:04:05 UTC` from Unix milliseconds.
pub fn format_time_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), to avoid a date crate for one format.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl crate::error::Classify for InspectError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            InspectError::Plan(error) => crate::error::Classify::class(error),
            InspectError::Store(_) => crate::error::ErrorClass::Environment,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_utc() {
        assert_eq!(format_time_ms(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time_ms(1_795_428_245_000), "2026-11-23 10:04:05 UTC");
    }
}
