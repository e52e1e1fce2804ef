//! Named kernels: built through the engine (recipe, bundle or import), recorded in the state
//! database, pinned as store GC roots (`kernel:<name>`).

use crate::engine::RunReport;
use crate::key::Key;
use crate::state::{KernelRecord, State, StateError, StoredFile};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel step {step} produced no `vmlinux`")]
    NoVmlinux { step: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The GC root name of a kernel.
pub fn root_name(kernel: &str) -> String {
    format!("kernel:{kernel}")
}

/// The record of a kernel from its staging step's outputs in `report`.
pub fn record_from_outputs(
    name: &str,
    source: &str,
    step_id: &str,
    step_key: Key,
    report: &RunReport,
    store: &Store,
    created_ms: u64,
) -> Result<KernelRecord, KernelError> {
    let outputs = report
        .outputs
        .get(step_id)
        .map(|outputs| &outputs.outputs)
        .ok_or_else(|| KernelError::NoVmlinux {
            step: step_id.to_owned(),
        })?;
    let file = |name: &str| {
        outputs.get(name).map(|output| StoredFile {
            integrity: output.integrity.clone(),
            size: output.size,
        })
    };
    let vmlinux = file("vmlinux").ok_or_else(|| KernelError::NoVmlinux {
        step: step_id.to_owned(),
    })?;
    let release = match outputs.get("release.txt") {
        Some(output) => {
            let dir = store.scratch()?;
            let path = dir.path().join("release.txt");
            store.materialize(output, &path)?;
            std::fs::read_to_string(&path)
                .ok()
                .map(|text| text.trim().to_owned())
        }
        None => None,
    };
    Ok(KernelRecord {
        name: name.to_owned(),
        source: source.to_owned(),
        release,
        vmlinux,
        initrd: file("initrd"),
        modules: file("modules.tar"),
        step_key,
        created_ms,
    })
}

/// Records a kernel (replacing one of the same name) and pins it.
pub fn register(state: &State, store: &Store, record: &KernelRecord) -> Result<(), KernelError> {
    state.put_kernel(record, true)?;
    store.set_root(&root_name(&record.name), &[record.step_key])?;
    Ok(())
}

/// Forgets a kernel and unpins it.
pub fn remove(state: &State, store: &Store, name: &str) -> Result<KernelRecord, KernelError> {
    let record = state.require_kernel(name)?;
    state.remove_kernel(name)?;
    store.set_root(&root_name(name), &[])?;
    Ok(record)
}
