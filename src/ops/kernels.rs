//! Named kernels: built through the engine (recipe, bundle or import), recorded in the state
//! database, pinned as store GC roots (`kernel:<name>`).
//!
//! [`pull`] is the whole of `banger kernel pull` for the CLI and the daemon alike: the catalog
//! entry's plan ([`lower_kernel`]), run by [`build_and_record`] (which `kernel import` uses with
//! a plan of its own), then recorded and pinned. It runs against the same
//! [`PullEnv`](crate::ops::images::PullEnv) as an image pull, and its future is `Send` for the same
//! reason: the state database is opened only after the last await.

use petgraph::graph::NodeIndex;

use crate::catalog::Prefer;
use crate::engine::{EngineError, Reporter, RunOptions, RunReport};
use crate::error::{Classify, ErrorClass};
use crate::key::Key;
use crate::ops::images::PullEnv;
use crate::plan::lower::lower_kernel;
use crate::plan::{Plan, PlanError};
use crate::state::{KernelRecord, State, StateError, StoredFile};
use crate::store::{Store, StoreError, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "`{name}` is not in the kernel catalog (it has: {}); a kernel of your own is added with \
         `banger kernel import NAME --from DIR`",
        .known.join(", ")
    )]
    NotInCatalog { name: String, known: Vec<String> },
    #[error("kernel step {step} produced no `vmlinux`")]
    NoVmlinux { step: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A kernel built (or found up to date), recorded and pinned.
#[derive(Debug, Clone)]
pub struct PulledKernel {
    pub record: KernelRecord,
    /// The engine's report: nothing in `ran` means the kernel was up to date.
    pub report: RunReport,
}

/// Fetches or builds the catalog kernel `name` and records it under that name. With `force`
/// its fetch runs again (a moved package version is picked up; the rest rebuilds only if the
/// bytes changed). Engine events go to `reporter`; `options` carries the cancellation token.
pub async fn pull(
    env: &PullEnv<'_>,
    name: &str,
    force: bool,
    reporter: &dyn Reporter,
    options: RunOptions,
) -> Result<PulledKernel, KernelError> {
    let catalogs = env.catalogs;
    let Some(entry) = catalogs.kernel(name) else {
        return Err(KernelError::NotInCatalog {
            name: name.to_owned(),
            known: catalogs
                .kernels
                .iter()
                .map(|entry| entry.name.clone())
                .collect(),
        });
    };
    let how = match (entry.prefer, &entry.bundle) {
        (Prefer::Bundle, Some(_)) => "bundle",
        _ if entry.recipe.is_none() => "bundle",
        _ => "recipe",
    };
    let source = format!("catalog:{} ({how})", entry.name);
    let (plan, target) = lower_kernel(name, catalogs, force.then(now_ms))?;
    build_and_record(env, name, &source, &plan, target, reporter, options).await
}

/// Runs a kernel plan (as project `kernel:NAME`) and records its staging step `target`'s
/// outputs as kernel `name` from `source`, replacing a kernel of that name.
pub async fn build_and_record(
    env: &PullEnv<'_>,
    name: &str,
    source: &str,
    plan: &Plan,
    target: NodeIndex,
    reporter: &dyn Reporter,
    options: RunOptions,
) -> Result<PulledKernel, KernelError> {
    let keys = plan.definition_keys()?;
    let project = format!("kernel:{name}");
    let report = env.engine.run(plan, &project, reporter, options).await?;
    let record = record_from_outputs(
        name,
        source,
        &plan.node(target).id,
        keys[target.index()],
        &report,
        env.store,
        now_ms(),
    )?;
    register(&State::open(env.state_dir)?, env.store, &record)?;
    Ok(PulledKernel { record, report })
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

impl Classify for KernelError {
    fn class(&self) -> ErrorClass {
        match self {
            KernelError::NotInCatalog { .. } => ErrorClass::User,
            KernelError::Plan(error) => error.class(),
            KernelError::Engine(error) => error.class(),
            KernelError::State(error) => error.class(),
            KernelError::NoVmlinux { .. } | KernelError::Store(_) => ErrorClass::Environment,
        }
    }
}
