//! Resource classes: weighted concurrency limits per kind of work.
//!
//! One global `-j` would either starve downloads (network-bound, cheap on CPU) or overload the
//! disk with parallel image writes. Each step names its class and a weight; it holds that many
//! permits of its class while it executes and publishes, and only then (see the engine's
//! lifecycle). Permits are guards released on drop, so a cancelled or panicking step gives its
//! permits back.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::plan::ResourceClass;

/// Permits per class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceLimits {
    limits: HashMap<ResourceClass, u32>,
}

impl ResourceLimits {
    /// Defaults for this host: downloads 8 at a time, disk writers 2, CPU work one per core,
    /// VMs as memory allows (three quarters of the host's, in
    /// [`crate::steps::VM_MEMORY_PERMIT_MIB`] units: a VM step weighs its memory), privileged
    /// operations one at a time.
    pub fn for_host() -> ResourceLimits {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
        let vm_permits = vm_permits(host_memory_mib().unwrap_or(4096));
        ResourceLimits::uniform(1)
            .with(ResourceClass::Network, 8)
            .with(ResourceClass::Disk, 2)
            .with(ResourceClass::Cpu, cpus)
            .with(ResourceClass::Vm, vm_permits)
            .with(ResourceClass::Privileged, 1)
    }

    /// The same limit for every class.
    pub fn uniform(limit: u32) -> ResourceLimits {
        ResourceLimits {
            limits: ResourceClass::ALL
                .iter()
                .map(|&class| (class, limit.max(1)))
                .collect(),
        }
    }

    pub fn with(mut self, class: ResourceClass, limit: u32) -> ResourceLimits {
        self.limits.insert(class, limit.max(1));
        self
    }

    pub fn limit(&self, class: ResourceClass) -> u32 {
        self.limits.get(&class).copied().unwrap_or(1)
    }
}

/// The `vm` class's permits on a host with `memory_mib`: three quarters of it, in
/// [`crate::steps::VM_MEMORY_PERMIT_MIB`] units.
fn vm_permits(memory_mib: u64) -> u32 {
    (memory_mib * 3 / 4 / u64::from(crate::steps::VM_MEMORY_PERMIT_MIB))
        .clamp(1, u64::from(u32::MAX)) as u32
}

/// `MemTotal` of `/proc/meminfo`, in MiB.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[derive(Debug)]
pub(super) struct Resources {
    limits: ResourceLimits,
    semaphores: HashMap<ResourceClass, Arc<Semaphore>>,
}

impl Resources {
    pub fn new(limits: ResourceLimits) -> Resources {
        let semaphores = ResourceClass::ALL
            .iter()
            .map(|&class| {
                (
                    class,
                    Arc::new(Semaphore::new(limits.limit(class) as usize)),
                )
            })
            .collect();
        Resources { limits, semaphores }
    }

    /// Waits for `weight` permits of `class`; a weight above the limit takes the whole class
    /// rather than waiting forever. Waiters are served first come, first served (tokio's
    /// semaphore is fair): a heavy waiter at the head of the line is not overtaken by lighter
    /// ones behind it, so it cannot starve.
    pub async fn acquire(&self, class: ResourceClass, weight: u32) -> OwnedSemaphorePermit {
        let weight = weight.clamp(1, self.limits.limit(class));
        Arc::clone(&self.semaphores[&class])
            .acquire_many_owned(weight)
            .await
            .expect("resource semaphores are never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::provision_run::builder_weight;
    use std::time::Duration;

    /// How many builder VMs (2 GiB each) hold their permits at once on a host with
    /// `memory_mib`.
    async fn concurrent_builders(memory_mib: u64) -> usize {
        let resources = Resources::new(
            ResourceLimits::uniform(1).with(ResourceClass::Vm, vm_permits(memory_mib)),
        );
        let mut held = Vec::new();
        for _ in 0..4 {
            match tokio::time::timeout(
                Duration::from_millis(50),
                resources.acquire(ResourceClass::Vm, builder_weight()),
            )
            .await
            {
                Ok(permit) => held.push(permit),
                Err(_) => break,
            }
        }
        held.len()
    }

    #[tokio::test]
    async fn builders_run_side_by_side_only_as_memory_allows() {
        // Three quarters of 4 GiB holds one 2 GiB builder; of 6 GiB, two; of 24 GiB, all four
        // asked for.
        assert_eq!(concurrent_builders(4096).await, 1);
        assert_eq!(concurrent_builders(6 * 1024).await, 2);
        assert_eq!(concurrent_builders(24 * 1024).await, 4);
        // A host smaller than one builder still runs one at a time, never none.
        assert_eq!(concurrent_builders(1024).await, 1);
    }
}
