//! Plans: a DAG of steps, built with no I/O.
//!
//! A [`Plan`] is a petgraph graph whose nodes are [`StepNode`]s (kind, version, canonical params,
//! cache policy, resource class) and whose edges are named inputs (`rootfs`, `kernel`,
//! `layer[0]`). Edges point from an input to the step that consumes it.
//!
//! Lifecycle:
//! 1. [`lower::lower`] turns a validated [`crate::spec::Spec`] (plus the lock file's pinned
//!    digests) into a plan. Pure: no file, network or clock access.
//! 2. The caller fingerprints project files that steps read ([`crate::key::ParamValue::Source`])
//!    and calls [`Plan::resolve_sources`].
//! 3. [`Plan::definition_keys`] keys every node in topological order.
//! 4. [`crate::engine`] drains it; `ops::graph` renders it with cache status.
//!
//! Node ids are stable, human-readable paths (`image:sandbox/provision[1]`) used by
//! `banger graph --why` and by the store's "last run of this step" records.

pub mod kinds;
pub mod lower;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;

use crate::key::{Key, Params, definition_key};

/// Errors from building or ordering a plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("two steps have the id `{id}`")]
    DuplicateStep { id: String },
    #[error("step dependency cycle: {}", .cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
    #[error("no step matches `{query}`{}", suggestion(.candidates))]
    UnknownStep {
        query: String,
        candidates: Vec<String>,
    },
    #[error("`{query}` matches several steps: {}", .matches.join(", "))]
    AmbiguousStep { query: String, matches: Vec<String> },
}

fn suggestion(candidates: &[String]) -> String {
    if candidates.is_empty() {
        String::new()
    } else {
        format!("; steps are: {}", candidates.join(", "))
    }
}

/// Whether a step's outputs are memoized in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    /// Outputs are stored by key and reused.
    Cached,
    /// Always runs (booting a VM, running the user's command, resolving a mutable tag).
    Never,
}

/// The resource a step mostly consumes; the engine bounds concurrency per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceClass {
    Network,
    Disk,
    Cpu,
    Vm,
    Privileged,
}

impl ResourceClass {
    pub const ALL: [ResourceClass; 5] = [
        ResourceClass::Network,
        ResourceClass::Disk,
        ResourceClass::Cpu,
        ResourceClass::Vm,
        ResourceClass::Privileged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceClass::Network => "network",
            ResourceClass::Disk => "disk",
            ResourceClass::Cpu => "cpu",
            ResourceClass::Vm => "vm",
            ResourceClass::Privileged => "privileged",
        }
    }
}

impl fmt::Display for ResourceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepNode {
    /// Stable id within the plan, e.g. `image:sandbox/provision[1]`.
    pub id: String,
    /// Step kind, e.g. `provision.run`; selects the executor.
    pub kind: String,
    /// The kind's version; bumping it invalidates every key of that kind.
    pub version: u32,
    pub params: Params,
    pub cache: CachePolicy,
    pub resource: ResourceClass,
    /// Permits of `resource` the step holds while it runs.
    pub weight: u32,
    /// One line for humans (`run: apt-get install -y make`).
    pub summary: String,
    /// Facts the executor needs that do not change what the step produces, so they are not
    /// part of any key: where to download digest-pinned content from, say.
    pub hints: BTreeMap<String, String>,
}

impl StepNode {
    /// A cached step with weight 1.
    pub fn new(
        id: impl Into<String>,
        kind: impl Into<String>,
        version: u32,
        params: Params,
        resource: ResourceClass,
    ) -> StepNode {
        StepNode {
            id: id.into(),
            kind: kind.into(),
            version,
            params,
            cache: CachePolicy::Cached,
            resource,
            weight: 1,
            summary: String::new(),
            hints: BTreeMap::new(),
        }
    }

    /// Adds a hint (not keyed; see [`StepNode::hints`]).
    pub fn hint(mut self, name: &str, value: impl Into<String>) -> StepNode {
        self.hints.insert(name.to_owned(), value.into());
        self
    }

    pub fn never_cached(mut self) -> StepNode {
        self.cache = CachePolicy::Never;
        self
    }

    pub fn summary(mut self, summary: impl Into<String>) -> StepNode {
        self.summary = summary.into();
        self
    }

    pub fn weight(mut self, weight: u32) -> StepNode {
        self.weight = weight;
        self
    }
}

/// A DAG of steps and the steps the caller wants built (`targets`).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    graph: DiGraph<StepNode, String>,
    by_id: HashMap<String, NodeIndex>,
    targets: Vec<NodeIndex>,
}

impl Plan {
    pub fn new() -> Plan {
        Plan::default()
    }

    pub fn add_step(&mut self, node: StepNode) -> Result<NodeIndex, PlanError> {
        if self.by_id.contains_key(&node.id) {
            return Err(PlanError::DuplicateStep { id: node.id });
        }
        let id = node.id.clone();
        let index = self.graph.add_node(node);
        self.by_id.insert(id, index);
        Ok(index)
    }

    /// Declares that `consumer` reads the outputs of `input` under `name`.
    pub fn add_input(&mut self, consumer: NodeIndex, name: impl Into<String>, input: NodeIndex) {
        self.graph.add_edge(input, consumer, name.into());
    }

    pub fn add_target(&mut self, node: NodeIndex) {
        if !self.targets.contains(&node) {
            self.targets.push(node);
        }
    }

    /// The steps the caller asked for; if none were named, every sink of the graph.
    pub fn targets(&self) -> Vec<NodeIndex> {
        if self.targets.is_empty() {
            self.graph
                .node_indices()
                .filter(|&node| {
                    self.graph
                        .neighbors_directed(node, Direction::Outgoing)
                        .next()
                        .is_none()
                })
                .collect()
        } else {
            self.targets.clone()
        }
    }

    pub fn node(&self, index: NodeIndex) -> &StepNode {
        &self.graph[index]
    }

    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    pub fn node_indices(&self) -> impl Iterator<Item = NodeIndex> + '_ {
        self.graph.node_indices()
    }

    pub fn graph(&self) -> &DiGraph<StepNode, String> {
        &self.graph
    }

    /// Named inputs of a node, in the order they were declared (this order feeds the key).
    pub fn inputs(&self, node: NodeIndex) -> Vec<(&str, NodeIndex)> {
        let mut edges: Vec<_> = self
            .graph
            .edges_directed(node, Direction::Incoming)
            .map(|edge| (edge.id(), edge.weight().as_str(), edge.source()))
            .collect();
        edges.sort_by_key(|(id, _, _)| *id);
        edges
            .into_iter()
            .map(|(_, name, source)| (name, source))
            .collect()
    }

    /// Steps that consume this node's outputs.
    pub fn dependants(&self, node: NodeIndex) -> Vec<NodeIndex> {
        let mut nodes: Vec<_> = self
            .graph
            .neighbors_directed(node, Direction::Outgoing)
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Finds a node by its full id, or by a suffix of it that matches exactly one node
    /// (`provision[1]` for `image:sandbox/provision[1]`).
    pub fn find(&self, query: &str) -> Result<NodeIndex, PlanError> {
        if let Some(&index) = self.by_id.get(query) {
            return Ok(index);
        }
        let mut matches: Vec<&String> = self
            .by_id
            .keys()
            .filter(|id| id.ends_with(query) && id[..id.len() - query.len()].ends_with(['/', ':']))
            .collect();
        matches.sort();
        match matches.as_slice() {
            [] => {
                let mut candidates: Vec<String> = self.by_id.keys().cloned().collect();
                candidates.sort();
                Err(PlanError::UnknownStep {
                    query: query.to_owned(),
                    candidates,
                })
            }
            [one] => Ok(self.by_id[*one]),
            many => Err(PlanError::AmbiguousStep {
                query: query.to_owned(),
                matches: many.iter().map(|id| (*id).clone()).collect(),
            }),
        }
    }

    /// Nodes in an order where every input comes before its consumers; a cycle is an error
    /// naming every step on it.
    pub fn topological_order(&self) -> Result<Vec<NodeIndex>, PlanError> {
        petgraph::algo::toposort(&self.graph, None).map_err(|cycle| {
            let members = petgraph::algo::tarjan_scc(&self.graph)
                .into_iter()
                .find(|component| component.contains(&cycle.node_id()))
                .unwrap_or_else(|| vec![cycle.node_id()]);
            let mut ids: Vec<String> = members
                .iter()
                .map(|&node| self.graph[node].id.clone())
                .collect();
            ids.sort();
            if let Some(first) = ids.first().cloned() {
                ids.push(first);
            }
            PlanError::Cycle { cycle: ids }
        })
    }

    /// Replaces project-file params by the digests in `fingerprints`.
    pub fn resolve_sources(&mut self, fingerprints: &HashMap<PathBuf, String>) {
        for node in self.graph.node_weights_mut() {
            node.params
                .resolve_sources(&|path| fingerprints.get(path).cloned());
        }
    }

    /// Project paths that some step reads and that must be fingerprinted before keying.
    pub fn sources(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self
            .graph
            .node_weights()
            .flat_map(|node| node.params.sources().cloned())
            .collect();
        paths.sort();
        paths.dedup();
        paths
    }

    /// The definition key of every node, indexed by `NodeIndex::index()`.
    pub fn definition_keys(&self) -> Result<Vec<Key>, PlanError> {
        let order = self.topological_order()?;
        let mut keys = vec![Key::from_bytes([0; 32]); self.graph.node_count()];
        for node in order {
            let step = &self.graph[node];
            let inputs: Vec<(&str, Key)> = self
                .inputs(node)
                .into_iter()
                .map(|(name, input)| (name, keys[input.index()]))
                .collect();
            keys[node.index()] = definition_key(&step.kind, step.version, &step.params, &inputs);
        }
        Ok(keys)
    }
}

impl crate::error::Classify for PlanError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            PlanError::UnknownStep { .. }
            | PlanError::AmbiguousStep { .. }
            | PlanError::Cycle { .. } => crate::error::ErrorClass::User,
            // A plan banger made wrong.
            PlanError::DuplicateStep { .. } => crate::error::ErrorClass::Environment,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str) -> StepNode {
        StepNode::new(
            id,
            "test",
            1,
            Params::new().with("id", id),
            ResourceClass::Cpu,
        )
    }

    #[test]
    fn a_cycle_names_every_member() {
        let mut plan = Plan::new();
        let a = plan.add_step(step("a")).unwrap();
        let b = plan.add_step(step("b")).unwrap();
        let c = plan.add_step(step("c")).unwrap();
        plan.add_input(b, "in", a);
        plan.add_input(c, "in", b);
        plan.add_input(a, "in", c);
        assert_eq!(
            plan.topological_order().unwrap_err().to_string(),
            "step dependency cycle: a -> b -> c -> a"
        );
    }

    #[test]
    fn find_accepts_unique_suffixes() {
        let mut plan = Plan::new();
        plan.add_step(step("image:sandbox/provision[0]")).unwrap();
        plan.add_step(step("image:base/provision[0]")).unwrap();
        plan.add_step(step("vm/boot")).unwrap();
        assert!(plan.find("boot").is_ok());
        assert!(matches!(
            plan.find("provision[0]"),
            Err(PlanError::AmbiguousStep { .. })
        ));
        assert!(plan.find("sandbox/provision[0]").is_ok());
        assert!(matches!(
            plan.find("oot"),
            Err(PlanError::UnknownStep { .. })
        ));
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let mut plan = Plan::new();
        plan.add_step(step("a")).unwrap();
        assert_eq!(
            plan.add_step(step("a")),
            Err(PlanError::DuplicateStep { id: "a".into() })
        );
    }

    #[test]
    fn keys_follow_inputs() {
        let mut plan = Plan::new();
        let a = plan.add_step(step("a")).unwrap();
        let b = plan.add_step(step("b")).unwrap();
        plan.add_input(b, "in", a);
        let before = plan.definition_keys().unwrap();
        plan.graph[a].params.insert("extra", "x");
        let after = plan.definition_keys().unwrap();
        assert_ne!(before[a.index()], after[a.index()]);
        assert_ne!(before[b.index()], after[b.index()]);
    }
}
