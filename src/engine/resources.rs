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
        let memory_mib = host_memory_mib().unwrap_or(4096);
        let vm_permits = (memory_mib * 3 / 4 / u64::from(crate::steps::VM_MEMORY_PERMIT_MIB))
            .clamp(1, u64::from(u32::MAX)) as u32;
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
