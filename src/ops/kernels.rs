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
    #[error(transparent)]
    RuntimeDir(#[from] crate::paths::RuntimeDirError),
    #[error(transparent)]
    Publish(Box<crate::ops::publish::PublishError>),
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
    #[error(
        "{} has no `vmlinux`; a kernel directory holds vmlinux (an ELF with the PVH note, or a \
         bzImage), and optionally initrd and modules/",
        dir.display()
    )]
    NoVmlinuxIn { dir: std::path::PathBuf },
    #[error("`{name}` is a catalog kernel's name; pick another name for your own kernel")]
    CatalogName { name: String },
    #[error("cannot read {}", dir.display())]
    ReadDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] crate::sources::SourceError),
    #[error(
        "image `{image}` is not in the store; fetch it with `banger image pull {image}`, or name \
         another with --image"
    )]
    NoImage { image: String },
    #[error(
        "kernel `{name}` has no initramfs, and banger's initramfs is what loads the virtio \
         modules and starts the agent; rebuild it with `banger kernel pull` or import it with an \
         initrd"
    )]
    NoInitramfs { name: String },
    #[error(transparent)]
    Accel(#[from] crate::vm::accel::AccelError),
    #[error("cannot prepare {}", path.display())]
    Prepare {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The boot itself could not be attempted (QEMU or the vsock daemon missing).
    #[error(transparent)]
    Boot(Box<crate::vm::boot::BootError>),
}

/// A kernel built (or found up to date), recorded and pinned.
#[derive(Debug, Clone)]
pub struct PulledKernel {
    pub record: KernelRecord,
    /// The engine's report: nothing in `ran` means the kernel was up to date.
    pub report: RunReport,
}

/// What `banger kernel test` boots.
#[derive(Debug, Clone)]
pub struct KernelTest {
    /// The recorded kernel.
    pub kernel: String,
    /// The recorded image it boots.
    pub image: String,
    /// `None`: vsock when `vhost-device-vsock` is installed, else virtio-serial.
    pub transport: Option<crate::vm::boot::AgentTransport>,
    pub memory_mib: u64,
    pub timeout: std::time::Duration,
    /// Appended to the kernel command line.
    pub append: Vec<String>,
}

/// What a `banger kernel test` saw.
#[derive(Debug)]
pub struct KernelTestOutcome {
    pub kernel: KernelRecord,
    pub image: crate::state::ImageRecord,
    pub accel: crate::vm::accel::Accel,
    /// The smoke test's report, or why the guest failed it (it did not come up, a command
    /// failed).
    pub result: Result<crate::vm::boot::SmokeReport, crate::vm::boot::BootError>,
    /// Whether the guest's `uname -r` is the kernel's recorded release (unknown counts).
    pub release_ok: bool,
    /// Whether `sh -c 'exit 7'` came back as 7.
    pub exit_ok: bool,
}

impl KernelTestOutcome {
    pub fn passed(&self) -> bool {
        self.result.is_ok() && self.release_ok && self.exit_ok
    }
}

/// Boots `test.kernel` on `test.image` under QEMU microvm (a tmpfs overlay, no network) and
/// checks the guest agent: readiness, `uname -r`, an exit code, round trips (see
/// [`crate::vm::boot::smoke_test`]). `notes` gets one line before the boot. A guest that
/// fails the test is an outcome, not an error; what keeps the test from running is.
pub async fn test(
    paths: &crate::paths::Paths,
    state: &State,
    store: &Store,
    test: &KernelTest,
    notes: &(dyn Fn(String) + Sync),
) -> Result<KernelTestOutcome, KernelError> {
    use crate::vm::boot::{AgentTransport, BootError, BootSpec, smoke_test};
    let kernel = state.require_kernel(&test.kernel)?;
    let image = state
        .image(&test.image)?
        .ok_or_else(|| KernelError::NoImage {
            image: test.image.clone(),
        })?;
    let Some(initrd) = &kernel.initrd else {
        return Err(KernelError::NoInitramfs { name: kernel.name });
    };
    let accel = crate::vm::accel::choose(&crate::vm::accel::HostFacts::probe())?;
    let vsock_daemon = crate::vm::vsock::find_binary();
    let transport = match (test.transport, &vsock_daemon) {
        (Some(transport), _) => transport,
        (None, Some(_)) => AgentTransport::Vsock,
        (None, None) => AgentTransport::Serial,
    };
    // Hard links into the store's own scratch: no bytes are copied, whatever the image size.
    let files = store.scratch()?;
    let link = |file: &StoredFile, name: &str| -> Result<std::path::PathBuf, KernelError> {
        let path = files.path().join(name);
        store.materialize(
            &crate::store::OutputRef {
                integrity: file.integrity.clone(),
                size: file.size,
            },
            &path,
        )?;
        Ok(path)
    };
    let vmlinux = link(&kernel.vmlinux, "vmlinux")?;
    let initrd = link(initrd, "initrd")?;
    let rootfs = link(
        &StoredFile {
            integrity: image.rootfs_integrity.clone(),
            size: image.rootfs_size,
        },
        "rootfs.ext4",
    )?;
    let prepare = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| KernelError::Prepare { path, source }
    };
    crate::paths::ensure_runtime_dir(&paths.runtime_dir)?;
    let sockets = tempfile::Builder::new()
        .prefix("kernel-test-")
        .tempdir_in(&paths.runtime_dir)
        .map_err(prepare(&paths.runtime_dir))?;
    let logs = paths.state_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(prepare(&logs))?;
    let spec = BootSpec {
        qemu_binary: crate::vm::qemu::binary(),
        accel: accel.clone(),
        vcpus: 1,
        memory_mib: test.memory_mib,
        kernel: vmlinux,
        initrd: Some(initrd),
        rootfs,
        transport,
        vsock_daemon,
        extra_cmdline: test.append.clone(),
        writable: crate::vm::boot::WritableLayer::Memory,
        forwards: Vec::new(),
        network: false,
        tap: None,
        dir: sockets.path().to_owned(),
        serial_log: logs.join(format!("kernel-test-{}.console.log", kernel.name)),
    };
    notes(format!(
        "booting {} ({}) on {} under QEMU microvm, {accel}, agent over {transport}",
        kernel.name,
        kernel.release.as_deref().unwrap_or("release unknown"),
        image.name
    ));
    let deadline = std::time::Instant::now() + test.timeout;
    let result = smoke_test(&spec, deadline).await;
    if let Err(
        error @ (BootError::Qemu(crate::vm::qemu::QemuError::NotInstalled { .. })
        | BootError::Vsock(crate::vm::vsock::VsockError::NotInstalled { .. })),
    ) = result
    {
        return Err(KernelError::Boot(Box::new(error)));
    }
    let (release_ok, exit_ok) = match &result {
        Ok(report) => (
            kernel
                .release
                .as_deref()
                .is_none_or(|release| release == report.uname_release),
            report.exit_seven == crate::guest::ExitStatus::Code(7),
        ),
        Err(_) => (false, false),
    };
    Ok(KernelTestOutcome {
        kernel,
        image,
        accel,
        result,
        release_ok,
        exit_ok,
    })
}

/// The plan of `banger kernel import NAME --from DIR`: the directory brought into the store
/// (keyed by its content) → staged; with modules but no initrd, banger's initramfs is built
/// around them. Returns the plan, the step to record, and the source text.
pub fn import_plan(
    name: &str,
    from: &std::path::Path,
    catalogs: &crate::catalog::Catalogs,
) -> Result<(Plan, petgraph::graph::NodeIndex, String), KernelError> {
    use crate::plan::StepNode;
    use crate::plan::kinds::{KernelImportParams, NoParams, StepParams};
    use crate::steps;
    let dir = std::fs::canonicalize(from).map_err(|source| KernelError::ReadDir {
        dir: from.to_owned(),
        source,
    })?;
    if !dir.join("vmlinux").is_file() {
        return Err(KernelError::NoVmlinuxIn { dir });
    }
    if catalogs.kernel(name).is_some() {
        return Err(KernelError::CatalogName {
            name: name.to_owned(),
        });
    }
    let fingerprint = crate::sources::fingerprint_path(&dir)?;
    let mut plan = Plan::new();
    let import = plan.add_step(
        StepNode::new(
            format!("kernel:{name}/import"),
            steps::KERNEL_IMPORT.name,
            steps::KERNEL_IMPORT.version,
            KernelImportParams { fingerprint }.to_params(),
            steps::KERNEL_IMPORT.resource,
        )
        .hint("dir", dir.to_string_lossy())
        .summary(format!("{}", dir.display())),
    )?;
    let stage = plan.add_step(
        StepNode::new(
            format!("kernel:{name}/stage"),
            steps::KERNEL_STAGE.name,
            steps::KERNEL_STAGE.version,
            NoParams.to_params(),
            steps::KERNEL_STAGE.resource,
        )
        .summary("vmlinux + initrd + modules"),
    )?;
    plan.add_input(stage, "kernel", import);
    // Modules but no initrd: banger builds its own initramfs around them.
    if dir.join("modules").is_dir() && !dir.join("initrd").exists() {
        let initramfs = plan.add_step(
            StepNode::new(
                format!("kernel:{name}/initramfs"),
                steps::KERNEL_INITRAMFS.name,
                steps::KERNEL_INITRAMFS.version,
                crate::plan::lower::initramfs_params().to_params(),
                steps::KERNEL_INITRAMFS.resource,
            )
            .summary("banger's agent as /init + virtio, vsock and overlay modules"),
        )?;
        plan.add_input(initramfs, "kernel", import);
        plan.add_input(stage, "initramfs", initramfs);
    }
    plan.add_target(stage);
    Ok((plan, stage, format!("import:{}", dir.display())))
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

/// `banger kernel pull REF`: a kernel pushed with `banger kernel push`, downloaded (every
/// file verified) into a scratch directory of the store and imported from it as `kernel
/// import` does, under `name` (default: the name it was pushed with).
pub async fn pull_reference(
    env: &PullEnv<'_>,
    reference: &str,
    name: Option<&str>,
    reporter: &dyn Reporter,
    options: RunOptions,
) -> Result<PulledKernel, KernelError> {
    let scratch = env.store.scratch()?;
    let (label, digest) =
        crate::ops::publish::fetch_kernel(&env.services.registry, reference, scratch.path())
            .await
            .map_err(|error| KernelError::Publish(Box::new(error)))?;
    let name = name.unwrap_or(&label.name);
    let (plan, target, _) = import_plan(name, scratch.path(), env.catalogs)?;
    let source = format!("oci:{reference}@{digest}");
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
            KernelError::NotInCatalog { .. }
            | KernelError::NoVmlinuxIn { .. }
            | KernelError::CatalogName { .. }
            | KernelError::ReadDir { .. } => ErrorClass::User,
            KernelError::Source(error) => error.class(),
            KernelError::NoImage { .. } | KernelError::NoInitramfs { .. } => ErrorClass::User,
            KernelError::Accel(_)
            | KernelError::Prepare { .. }
            | KernelError::Boot(_)
            | KernelError::RuntimeDir(_) => ErrorClass::Environment,
            KernelError::Plan(error) => error.class(),
            KernelError::Publish(error) => error.class(),
            KernelError::Engine(error) => error.class(),
            KernelError::State(error) => error.class(),
            KernelError::NoVmlinux { .. } | KernelError::Store(_) => ErrorClass::Environment,
        }
    }
}
