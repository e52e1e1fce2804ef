//! The ready queue: which steps may start now.
//!
//! Kept apart from petgraph and from the async loop so it can be unit-tested on its own:
//! 1. [`ReadyQueue::add`] every node with its dependencies (dependencies outside the queue are
//!    treated as already satisfied).
//! 2. [`ReadyQueue::freeze`] computes priorities (how many steps transitively wait on a node;
//!    the longest chains start first) and rejects cycles.
//! 3. [`ReadyQueue::dequeue`] hands out ready nodes, highest priority first, ties in insertion
//!    order (so runs are deterministic).
//! 4. [`ReadyQueue::finish`] releases dependants; [`ReadyQueue::skip_dependants`] removes
//!    everything downstream of a failure.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::Hash;

#[derive(Debug)]
pub struct ReadyQueue<N> {
    order: Vec<N>,
    remaining: HashMap<N, usize>,
    dependants: HashMap<N, Vec<N>>,
    priority: HashMap<N, usize>,
    ready: BinaryHeap<(usize, Reverse<usize>)>,
    position: HashMap<N, usize>,
    frozen: bool,
}

/// A dependency cycle among queued nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleError<N>(pub Vec<N>);

impl<N: Copy + Eq + Hash + std::fmt::Debug> Default for ReadyQueue<N> {
    fn default() -> Self {
        ReadyQueue::new()
    }
}

impl<N: Copy + Eq + Hash + std::fmt::Debug> ReadyQueue<N> {
    pub fn new() -> ReadyQueue<N> {
        ReadyQueue {
            order: Vec::new(),
            remaining: HashMap::new(),
            dependants: HashMap::new(),
            priority: HashMap::new(),
            ready: BinaryHeap::new(),
            position: HashMap::new(),
            frozen: false,
        }
    }

    /// Queues `node` behind `deps`. Call for every node before [`freeze`](Self::freeze).
    pub fn add(&mut self, node: N, deps: impl IntoIterator<Item = N>) {
        assert!(!self.frozen, "ReadyQueue::add after freeze");
        self.position.insert(node, self.order.len());
        self.order.push(node);
        let mut unique: Vec<N> = Vec::new();
        for dep in deps {
            if !unique.contains(&dep) {
                unique.push(dep);
            }
        }
        self.remaining.insert(node, unique.len());
        for dep in unique {
            self.dependants.entry(dep).or_default().push(node);
        }
    }

    /// Fixes the node set, computes priorities and makes dependency-free nodes ready.
    pub fn freeze(&mut self) -> Result<(), CycleError<N>> {
        self.frozen = true;
        // Dependencies that were never added are outside the queue: already satisfied.
        let outside: Vec<N> = self
            .dependants
            .keys()
            .filter(|dep| !self.position.contains_key(dep))
            .copied()
            .collect();
        for dep in outside {
            for node in self.dependants.remove(&dep).unwrap_or_default() {
                if let Some(count) = self.remaining.get_mut(&node) {
                    *count -= 1;
                }
            }
        }
        // Kahn's algorithm gives a topological order, or leaves the cycle members behind.
        let mut counts = self.remaining.clone();
        let mut stack: Vec<N> = self
            .order
            .iter()
            .filter(|node| counts[*node] == 0)
            .copied()
            .collect();
        let mut topological = Vec::with_capacity(self.order.len());
        while let Some(node) = stack.pop() {
            topological.push(node);
            for dependant in self.dependants.get(&node).into_iter().flatten() {
                let count = counts.get_mut(dependant).expect("dependant is queued");
                *count -= 1;
                if *count == 0 {
                    stack.push(*dependant);
                }
            }
        }
        if topological.len() != self.order.len() {
            let done: HashSet<N> = topological.into_iter().collect();
            let cycle = self
                .order
                .iter()
                .filter(|node| !done.contains(node))
                .copied()
                .collect();
            return Err(CycleError(cycle));
        }
        for node in topological.iter().rev() {
            let below: usize = self
                .dependants
                .get(node)
                .into_iter()
                .flatten()
                .map(|dependant| self.priority[dependant] + 1)
                .max()
                .unwrap_or(0);
            self.priority.insert(*node, below);
        }
        for node in &self.order {
            if self.remaining[node] == 0 {
                self.ready
                    .push((self.priority[node], Reverse(self.position[node])));
            }
        }
        Ok(())
    }

    /// The ready node with the highest priority, if any.
    pub fn dequeue(&mut self) -> Option<N> {
        self.ready
            .pop()
            .map(|(_, Reverse(position))| self.order[position])
    }

    /// Marks `node` done; returns dependants that became ready (they are also queued).
    pub fn finish(&mut self, node: N) -> Vec<N> {
        let mut released = Vec::new();
        for dependant in self.dependants.get(&node).cloned().unwrap_or_default() {
            let Some(count) = self.remaining.get_mut(&dependant) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                self.ready.push((
                    self.priority[&dependant],
                    Reverse(self.position[&dependant]),
                ));
                released.push(dependant);
            }
        }
        released
    }

    /// Removes every node downstream of `node` (they can never run) and returns them in
    /// queue order.
    pub fn skip_dependants(&mut self, node: N) -> Vec<N> {
        let mut skipped = HashSet::new();
        let mut stack = vec![node];
        while let Some(current) = stack.pop() {
            for dependant in self.dependants.get(&current).into_iter().flatten() {
                if self.remaining.remove(dependant).is_some() {
                    skipped.insert(*dependant);
                    stack.push(*dependant);
                }
            }
        }
        self.order
            .iter()
            .filter(|node| skipped.contains(node))
            .copied()
            .collect()
    }

    /// Nodes that have neither been dequeued-and-finished nor skipped: what a stopped run
    /// never started.
    pub fn never_started(&self, started: &HashSet<N>) -> Vec<N> {
        self.order
            .iter()
            .filter(|node| self.remaining.contains_key(node) && !started.contains(node))
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first_and_long_chains_are_preferred() {
        let mut queue = ReadyQueue::new();
        queue.add(1, []);
        queue.add(2, [1]);
        queue.add(3, [2]);
        queue.add(4, []);
        queue.freeze().unwrap();
        // 1 heads a chain of three, 4 stands alone: 1 goes first.
        assert_eq!(queue.dequeue(), Some(1));
        assert_eq!(queue.dequeue(), Some(4));
        assert_eq!(queue.dequeue(), None);
        assert_eq!(queue.finish(1), [2]);
        assert_eq!(queue.dequeue(), Some(2));
        assert_eq!(queue.finish(2), [3]);
        assert_eq!(queue.dequeue(), Some(3));
    }

    #[test]
    fn a_node_waits_for_all_its_dependencies() {
        let mut queue = ReadyQueue::new();
        queue.add('a', []);
        queue.add('b', []);
        queue.add('c', ['a', 'b', 'a']);
        queue.freeze().unwrap();
        queue.dequeue();
        queue.dequeue();
        assert!(queue.finish('a').is_empty());
        assert_eq!(queue.finish('b'), ['c']);
    }

    #[test]
    fn dependencies_outside_the_queue_are_satisfied() {
        let mut queue = ReadyQueue::new();
        queue.add(2, [1]);
        queue.freeze().unwrap();
        assert_eq!(queue.dequeue(), Some(2));
    }

    #[test]
    fn cycles_are_reported_with_their_members() {
        let mut queue = ReadyQueue::new();
        queue.add(1, []);
        queue.add(2, [3]);
        queue.add(3, [2]);
        assert_eq!(queue.freeze(), Err(CycleError(vec![2, 3])));
    }

    #[test]
    fn skipping_removes_everything_downstream() {
        let mut queue = ReadyQueue::new();
        queue.add(1, []);
        queue.add(2, [1]);
        queue.add(3, [2]);
        queue.add(4, []);
        queue.freeze().unwrap();
        assert_eq!(queue.skip_dependants(1), [2, 3]);
        assert!(queue.finish(1).is_empty());
    }
}
