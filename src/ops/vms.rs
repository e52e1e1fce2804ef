//! The VM lifecycle, as the daemon runs it: create, start, stop, kill, delete, list, and
//! finding running VMs again after a restart.
//!
//! Where a VM's things live:
//! - its record (name, image, kernel, backend, shape, network, whether it should run): the
//!   state database;
//! - its disks, console log, VMM log and `known_hosts`: `STATE/vms/NAME/`;
//! - hard links to its image, kernel and initramfs: `CACHE/vm-boot/ID/` (beside the store,
//!   so linking never copies, and the bytes stay while the VM exists even if the image is
//!   removed);
//! - while it runs: its sockets and scratch file `launched.json` (the [`Launched`] handles):
//!   `RUNTIME/vms/ID/` (a short path: unix sockets allow ~100 bytes).
//!
//! Every operation on one VM holds that VM's lock; producing an image or kernel holds a lock
//! per name, so two `vm run`s needing the same default image build it once.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::catalog::Catalogs;
use crate::config::Config;
use crate::engine::{Reporter, RunOptions};
use crate::paths::Paths;
use crate::spec::{NetworkMode, PortForward};
use crate::state::{State, StateError, StoredFile, VmRecord, VmState};
use crate::store::{OutputRef, Store};
use crate::vm::accel::{self, Accel};
use crate::vm::backend::{Backend, BackendError, BackendKind, Launched, MachineSpec, VmmBackend};
use crate::vm::shape::{HostResources, ShapeRequest, VmShape};
use crate::vm::storage::VmDisks;
use serde::{Deserialize, Serialize};

/// The default wait for a guest's agent: generous, because TCG boots are slow.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a guest gets to power off by itself on `vm stop`.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// The image a VM gets when none is named and the config names none.
pub const DEFAULT_IMAGE: &str = "debian-bookworm";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    RuntimeDir(#[from] crate::paths::RuntimeDirError),
    #[error(transparent)]
    BadName(#[from] crate::vm::shape::BadName),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("no accelerator to boot VMs with: {reason}")]
    NoAccelerator { reason: String },
    #[error(transparent)]
    Storage(#[from] crate::vm::storage::StorageError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Image(#[from] crate::ops::images::ImageError),
    #[error(transparent)]
    Kernel(#[from] crate::ops::kernels::KernelError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    RemoteCache(#[from] crate::remote::RemoteCacheError),
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{backend}` is not a backend: use `qemu` or `firecracker`")]
    UnknownBackend { backend: String },
    #[error(
        "kernel `{kernel}` is neither recorded nor in the kernel catalog; import it with \
         `banger kernel import {kernel} --from DIR` or name another with --kernel"
    )]
    UnknownKernel { kernel: String },
    #[error(
        "kernel `{kernel}` has no initramfs, and banger's initramfs is what mounts the VM's \
         disks and starts its agent; pull it again with `banger kernel pull` or import it \
         with an initrd"
    )]
    NoInitramfs { kernel: String },
    #[error("VM `{name}` is already running")]
    AlreadyRunning { name: String },
    #[error("VM `{name}` is not running; start it with `banger vm start {name}`")]
    NotRunning { name: String },
    #[error(
        "VM `{name}` did not come up: {reason}\nthe likely cause is in its console log: \
         `banger vm logs {name}`; its last lines:\n{tail}"
    )]
    GuestDidNotComeUp {
        name: String,
        reason: String,
        tail: String,
    },
    #[error("`{argv}` in the guest failed ({status}): {stderr}")]
    AgentCommand {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error(transparent)]
    Snapshot(#[from] crate::vm::snapshot::SnapshotError),
    #[error("cannot install banger's SSH key in VM `{name}`")]
    Authorize {
        name: String,
        #[source]
        source: crate::ssh::AuthorizeError,
    },
    #[error(transparent)]
    Ssh(#[from] crate::ssh::SshError),
    #[error(transparent)]
    Port(#[from] crate::net::ports::PortError),
    #[error(
        "published ports need a network, and `--network none` gives the VM none; use \
         `--network user` or drop the ports"
    )]
    PortsWithoutNetwork,
    #[error("{0}")]
    PortClash(String),
    #[error(transparent)]
    Network(#[from] crate::ops::network::NetworkError),
    #[error(
        "every address of the bridge subnet {subnet} is taken by a tap VM; delete one, or set \
         a wider `[network] subnet` in config.toml"
    )]
    AddressPoolFull { subnet: String },
    #[error("tap VMs still run on the bridge ({names}); stop them first (`banger vm stop NAME`)")]
    TapVmsRunning { names: String },
    #[error(
        "VM `{name}` is running; stop it first (`banger vm stop {name}`), or delete it anyway \
         with `banger vm rm -f {name}`"
    )]
    DeleteRunning { name: String },
    #[error(
        "VM `{name}` is running; its shape can change only while it is stopped (`banger vm \
         stop {name}`)"
    )]
    SetRunning { name: String },
    #[error(
        "VM `{name}`'s disks are {current} bytes; they can grow, not shrink (asked: {requested})"
    )]
    DiskShrink {
        name: String,
        current: u64,
        requested: u64,
    },
    #[error("{what} must be at least {min}, not {requested}")]
    ShapeTooSmall {
        what: &'static str,
        min: u64,
        requested: u64,
    },
}

impl crate::error::Classify for VmError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            VmError::State(StateError::NoSuchVm { .. } | StateError::VmExists { .. })
            | VmError::BadName(_)
            | VmError::UnknownBackend { .. }
            | VmError::UnknownKernel { .. }
            | VmError::NoInitramfs { .. }
            | VmError::AlreadyRunning { .. }
            | VmError::NotRunning { .. }
            | VmError::Port(_)
            | VmError::PortsWithoutNetwork
            | VmError::PortClash(_)
            | VmError::AddressPoolFull { .. }
            | VmError::TapVmsRunning { .. }
            | VmError::DeleteRunning { .. }
            | VmError::SetRunning { .. }
            | VmError::DiskShrink { .. }
            | VmError::ShapeTooSmall { .. }
            | VmError::Config(_)
            | VmError::RemoteCache(_) => ErrorClass::User,
            VmError::Network(error) => error.class(),
            VmError::Backend(
                BackendError::FirecrackerUnusable { .. }
                | BackendError::FirecrackerMissing
                | BackendError::TapNeedsRoot
                | BackendError::PortsNeedQemu,
            ) => ErrorClass::User,
            VmError::Backend(BackendError::Privileged(_)) | VmError::NoAccelerator { .. } => {
                ErrorClass::Environment
            }
            VmError::Image(error) => match error.class() {
                ErrorClass::User => ErrorClass::User,
                other => other,
            },
            _ => ErrorClass::Failed,
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let path = path.to_owned();
    move |source| VmError::Io { what, path, source }
}

/// Where a VM operation's progress goes: engine events of a build it needs, and notes
/// (`spec: …`, `booting …`). The daemon forwards both to its client.
pub trait VmProgress: Reporter {
    /// A line the user sees (unless `--quiet`).
    fn note(&self, text: String);
    /// A line the user sees with `-v`: why the daemon chose what it did.
    fn detail(&self, text: String);
}

/// `vm set`: a stopped VM's new shape; `None` fields keep what it has. Part of the daemon's
/// wire format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetVm {
    pub name: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// Both disks' size; they grow (file system included), never shrink.
    pub disk_bytes: Option<u64>,
}

/// The handles of running VM `name` as its scratch file has them, read without the daemon
/// (shell completion must not start or wait for it); `None` unless its VMM runs.
pub fn launched_read_only(paths: &Paths, name: &str) -> Option<Launched> {
    let id = crate::state::vm_id_read_only(&paths.state_dir, name)?;
    let path = paths.runtime_dir.join("vms").join(id).join("launched.json");
    let launched: Launched = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    launched.vmm.is_alive().then_some(launched)
}

/// The least memory `vm set` gives a VM: a Debian guest with systemd needs about this much.
pub const MIN_MEMORY_MIB: u64 = 128;

/// What `vm create` / `vm run` ask for; `None` fields take the defaults. Part of the daemon's
/// wire format ([`crate::daemon::protocol`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVm {
    pub name: Option<String>,
    pub image: Option<String>,
    pub kernel: Option<String>,
    /// `qemu` or `firecracker`; `None` picks the best one for this host.
    pub backend: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_bytes: Option<u64>,
    /// `user` or `none` (`tap` is refused); `None` is `user`.
    #[serde(default)]
    pub network: Option<NetworkMode>,
    /// Host ports forwarded to guest ports.
    #[serde(default)]
    pub ports: Vec<PortForward>,
    pub start: bool,
    /// How long to wait for the guest's agent (seconds).
    pub timeout_secs: Option<u64>,
    /// Delete the VM if the client is gone when it is ready (`vm run --rm` interrupted
    /// while the VM was being made).
    #[serde(default)]
    pub remove_if_abandoned: bool,
    /// Start from a memory snapshot of this image, kernel and shape, and save one if there is
    /// none (QEMU, `user` or `none` network: its agent is then on virtio-serial, multiplexed
    /// by a helper process).
    #[serde(default)]
    pub warm_start: bool,
}

/// What `banger up` asks of the daemon: this VM, booting this image, running. Part of the
/// daemon's wire format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpVm {
    /// Name, image, kernel and shape; `start` is implied.
    pub create: CreateVm,
    /// Recreate the VM even if its image is unchanged, and drop its work disk.
    #[serde(default)]
    pub fresh: bool,
}

/// What `up` did to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpAction {
    /// There was none: made and booted.
    Created,
    /// Running with the same image, shape and network: left alone.
    Reused,
    /// Stopped with the same image, shape and network: booted.
    Started,
    /// Its image, shape or network changed: made again around the work disk it had, and
    /// booted.
    Recreated,
    /// `--fresh`: made again from nothing, work disk included, and booted.
    Replaced,
}

impl UpAction {
    pub fn as_str(self) -> &'static str {
        match self {
            UpAction::Created => "created",
            UpAction::Reused => "reused",
            UpAction::Started => "started",
            UpAction::Recreated => "recreated",
            UpAction::Replaced => "replaced",
        }
    }
}

/// The daemon's answer to `up`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpReport {
    pub vm: VmInfo,
    pub action: UpAction,
}

/// One VM as the daemon reports it. Part of the daemon's wire format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub id: String,
    pub image: String,
    pub kernel: String,
    pub backend: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    /// `2 vcpu · 2048 MiB · 8G disk`.
    pub spec: String,
    /// `user`, or `none`: no network device, so no SSH (the agent still answers).
    pub network: NetworkMode,
    /// Published ports (host → guest).
    #[serde(default)]
    pub ports: Vec<PortForward>,
    /// A `tap` VM's address on banger's bridge (kept while the VM exists, stopped included).
    #[serde(default)]
    pub address: Option<String>,
    /// `running` or `stopped`.
    pub state: String,
    pub created_ms: u64,
    /// The VMM's pid, while running.
    pub pid: Option<u32>,
    /// Where its sshd is reached, while running with a network.
    pub ssh_host: Option<String>,
    pub ssh_port: Option<u16>,
    /// Where its agent is reached, while running.
    pub agent: Option<crate::vm::backend::AgentAddress>,
    /// This VM's own `known_hosts`.
    pub known_hosts: String,
    /// The guest's serial console.
    pub console_log: String,
    /// The VM's disks and logs.
    pub dir: String,
    /// Its sockets and scratch file, while running.
    pub run_dir: String,
}

/// The daemon's VMs.
pub struct Vms {
    paths: Paths,
    store: Store,
    engine: crate::engine::Engine,
    services: crate::steps::Services,
    accel: Result<Accel, String>,
    host: HostResources,
    /// Running VMs by name: the same facts as their scratch files.
    live: Mutex<HashMap<String, Launched>>,
    /// One lock per VM name, `image:NAME` and `kernel:NAME`.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The bridge of `tap` VMs.
    network: Arc<crate::ops::network::BridgeNetwork>,
    /// Held while the bridge network is made, changed or removed.
    network_lock: tokio::sync::Mutex<()>,
    /// Held while a VM's agent multiplexer is started again ([`Vms::with_agent_mux`]).
    mux_revival: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Vms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vms").field("paths", &self.paths).finish()
    }
}

impl Vms {
    /// Opens the store and state and finds the VMs that still run (see [`Vms::reconcile`]).
    pub async fn open(paths: Paths) -> Result<Vms, VmError> {
        // Reconciling reads pid records from it and signals what they name.
        crate::paths::ensure_runtime_dir(&paths.runtime_dir)?;
        let store = Store::open(paths.store_dir())?;
        let services = crate::steps::Services::from_env(&paths.state_dir)?;
        let engine = crate::steps::engine(&store, &services);
        let accel = accel::choose(&accel::HostFacts::probe())
            .map_err(|error| crate::error::error_chain(&error));
        let paths_runtime_dir = paths.runtime_dir.clone();
        let vms = Vms {
            paths,
            store,
            engine,
            services,
            accel,
            host: HostResources::probe(),
            live: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            network: Arc::new(crate::ops::network::BridgeNetwork::new(
                paths_runtime_dir.clone(),
            )),
            network_lock: tokio::sync::Mutex::new(()),
            mux_revival: tokio::sync::Mutex::new(()),
        };
        vms.reconcile().await?;
        vms.reconcile_network().await?;
        Ok(vms)
    }

    /// At start-up, after [`Vms::reconcile`]: addresses of VMs that are gone are freed, taps
    /// no running VM holds are the idle pool, the DNS server runs again if the bridge does.
    async fn reconcile_network(&self) -> Result<(), VmError> {
        let state = self.state()?;
        state.reconcile_addresses()?;
        self.network.set_names(state.addresses()?);
        let in_use: Vec<String> = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.values()
                .filter_map(|launched| launched.tap.clone())
                .collect()
        };
        let subnet = self.config()?.subnet;
        // A failure (the DNS port taken) must not keep the daemon from starting: the next
        // tap VM start runs the same steps and reports it, with its cause, to its client.
        let _ = self.network.reconcile(&in_use, subnet).await;
        Ok(())
    }

    /// At daemon stop: the DNS server stops (VMs and the bridge stay).
    pub fn shutdown(&self) {
        self.network.shutdown();
    }

    /// The published ports of running tap VMs (but `except`), each with its guest's address.
    fn published_on_bridge(
        &self,
        except: Option<&str>,
    ) -> Result<Vec<(PortForward, std::net::Ipv4Addr)>, VmError> {
        let running: Vec<String> = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.keys().cloned().collect()
        };
        let state = self.state()?;
        let mut published = Vec::new();
        for record in state.vms()? {
            if record.network != NetworkMode::Tap
                || record.ports.is_empty()
                || Some(record.name.as_str()) == except
                || !running.contains(&record.name)
            {
                continue;
            }
            if let Some(address) = state.address(&record.id)? {
                published.extend(record.ports.iter().map(|port| (*port, address)));
            }
        }
        Ok(published)
    }

    /// `banger network down`: the bridge, its taps, NAT and DNS removed; refused while a tap
    /// VM runs.
    pub async fn network_down(&self) -> Result<crate::privileged::bridge::NetworkStatus, VmError> {
        let _held = self.network_lock.lock().await;
        let mut running = Vec::new();
        for record in self.state()?.vms()? {
            if record.network == NetworkMode::Tap && self.running(&record).await?.is_some() {
                running.push(record.name);
            }
        }
        if !running.is_empty() {
            return Err(VmError::TapVmsRunning {
                names: running.join(", "),
            });
        }
        let before = self.network.status();
        self.network.down()?;
        Ok(before)
    }

    fn state(&self) -> Result<State, VmError> {
        Ok(State::open(&self.paths.state_dir)?)
    }

    fn lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(key.to_owned()).or_default())
    }

    fn accel(&self) -> Result<Accel, VmError> {
        self.accel
            .clone()
            .map_err(|reason| VmError::NoAccelerator { reason })
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.paths.state_dir.join("vms").join(name)
    }

    fn boot_dir(&self, id: &str) -> PathBuf {
        self.paths.cache_dir.join("vm-boot").join(id)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.paths.runtime_dir.join("vms").join(id)
    }

    fn scratch_file(&self, id: &str) -> PathBuf {
        self.run_dir(id).join("launched.json")
    }

    /// At start-up: every VM recorded as running whose VMM still runs (same pid, same start
    /// time, per its scratch file) is running again; the rest are stopped and what their run
    /// left (helpers, tap, sockets) is removed. Run directories that belong to no VM go too.
    async fn reconcile(&self) -> Result<(), VmError> {
        let records = self.state()?.vms()?;
        for record in &records {
            let launched = self.read_scratch(&record.id);
            match launched {
                Some(launched) if launched.vmm.is_alive() => {
                    self.live_insert(&record.name, launched);
                    if record.state != VmState::Running {
                        tracing::info!(vm = %record.name, "vm running (found at start-up)");
                        self.state()?.set_vm_state(&record.name, VmState::Running)?;
                    }
                }
                other => {
                    if let Some(launched) = other {
                        crate::vm::backend::release(&launched).await;
                    }
                    let _ = std::fs::remove_dir_all(self.run_dir(&record.id));
                    if record.state != VmState::Stopped {
                        tracing::info!(vm = %record.name, "vm stopped (its VMM is gone)");
                        self.state()?.set_vm_state(&record.name, VmState::Stopped)?;
                    }
                }
            }
        }
        let known: Vec<&str> = records.iter().map(|record| record.id.as_str()).collect();
        if let Ok(entries) = std::fs::read_dir(self.paths.runtime_dir.join("vms")) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if known.contains(&id.as_str()) {
                    continue;
                }
                if let Some(launched) = self.read_scratch(&id) {
                    launched.vmm.kill().await;
                    crate::vm::backend::release(&launched).await;
                }
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }

    fn read_scratch(&self, id: &str) -> Option<Launched> {
        let text = std::fs::read_to_string(self.scratch_file(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn write_scratch(&self, id: &str, launched: &Launched) -> Result<(), VmError> {
        let path = self.scratch_file(id);
        let temporary = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(launched).expect("handles serialize");
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&temporary)
            .map_err(io("cannot write", &temporary))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .map_err(io("cannot write", &temporary))?;
        std::fs::rename(&temporary, &path).map_err(io("cannot write", &path))
    }

    fn live_insert(&self, name: &str, launched: Launched) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.insert(name.to_owned(), launched);
    }

    fn live_remove(&self, name: &str) -> Option<Launched> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.remove(name)
    }

    /// The running VM's handles, if its VMM still runs; a VMM that went away by itself (a
    /// guest power-off, a crash) is noticed here and the VM recorded as stopped.
    async fn running(&self, record: &VmRecord) -> Result<Option<Launched>, VmError> {
        let launched = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.get(&record.name).cloned()
        };
        match launched {
            Some(launched) if launched.vmm.is_alive() => {
                Ok(Some(self.with_agent_mux(record, launched).await))
            }
            Some(launched) => {
                self.live_remove(&record.name);
                self.finish_run(record, &launched).await?;
                Ok(None)
            }
            None => {
                if record.state == VmState::Running {
                    tracing::info!(vm = %record.name, "vm stopped (its VMM is gone)");
                    self.state()?.set_vm_state(&record.name, VmState::Stopped)?;
                }
                Ok(None)
            }
        }
    }

    /// `launched`, with its serial agent's multiplexer started again if it is gone (see
    /// [`crate::vm::backend::revive_agent_mux`]); as it was if that fails, said in the log.
    async fn with_agent_mux(&self, record: &VmRecord, launched: Launched) -> Launched {
        if !crate::vm::backend::agent_mux_gone(&launched) {
            return launched;
        }
        // One revival at a time: a second multiplexer would find QEMU's connection taken.
        let _held = self.mux_revival.lock().await;
        let launched = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.get(&record.name).cloned().unwrap_or(launched)
        };
        let vmm_log = self.vm_dir(&record.name).join("vmm.log");
        match crate::vm::backend::revive_agent_mux(&launched, &vmm_log).await {
            Ok(None) => launched,
            Ok(Some(revived)) => {
                tracing::warn!(vm = %record.name, "the agent's multiplexer was gone: started again");
                if let Err(error) = self.write_scratch(&record.id, &revived) {
                    tracing::warn!(vm = %record.name, error = %crate::error::error_chain(&error),
                        "cannot record the new multiplexer");
                }
                self.live_insert(&record.name, revived.clone());
                revived
            }
            Err(error) => {
                tracing::warn!(vm = %record.name, error = %crate::error::error_chain(&error),
                    "the agent's multiplexer is gone and did not start again");
                launched
            }
        }
    }

    /// After the VMM is gone: helpers and tap go, the run directory goes, the VM is stopped
    /// (and its published ports leave the bridge's ruleset).
    async fn finish_run(&self, record: &VmRecord, launched: &Launched) -> Result<(), VmError> {
        crate::vm::backend::release(launched).await;
        let _ = std::fs::remove_dir_all(self.run_dir(&record.id));
        tracing::info!(vm = %record.name, vmm_pid = launched.vmm.pid, "vm stopped");
        self.state()?.set_vm_state(&record.name, VmState::Stopped)?;
        if record.network == NetworkMode::Tap && !record.ports.is_empty() {
            self.refresh_ruleset(&record.name).await?;
        }
        Ok(())
    }

    /// Rewrites the bridge's ruleset for the running tap VMs but `stopped`.
    async fn refresh_ruleset(&self, stopped: &str) -> Result<(), VmError> {
        let subnet = self.config()?.subnet;
        let _held = self.network_lock.lock().await;
        let published = self.published_on_bridge(Some(stopped))?;
        self.network.apply(subnet, &published)?;
        Ok(())
    }

    fn info(&self, record: &VmRecord, launched: Option<&Launched>) -> VmInfo {
        let dir = self.vm_dir(&record.name);
        VmInfo {
            name: record.name.clone(),
            id: record.id.clone(),
            image: record.image.clone(),
            kernel: record.kernel.clone(),
            backend: record.backend.clone(),
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            disk_bytes: record.disk_bytes,
            spec: VmShape {
                vcpus: record.vcpus,
                memory_mib: record.memory_mib,
                disk_bytes: record.disk_bytes,
            }
            .to_string(),
            network: record.network,
            ports: record.ports.clone(),
            address: (record.network == NetworkMode::Tap)
                .then(|| self.state().ok()?.address(&record.id).ok()?)
                .flatten()
                .map(|address| address.to_string()),
            state: if launched.is_some() {
                "running"
            } else {
                "stopped"
            }
            .to_owned(),
            created_ms: record.created_ms,
            pid: launched.map(|launched| launched.vmm.pid),
            ssh_host: launched.and_then(|launched| launched.ssh_host.clone()),
            ssh_port: launched.and_then(|launched| launched.ssh_port),
            agent: launched.map(|launched| launched.agent.clone()),
            known_hosts: dir.join("known_hosts").display().to_string(),
            console_log: dir.join("console.log").display().to_string(),
            dir: dir.display().to_string(),
            run_dir: self.run_dir(&record.id).display().to_string(),
        }
    }

    pub async fn list(&self) -> Result<Vec<VmInfo>, VmError> {
        let mut infos = Vec::new();
        for record in self.state()?.vms()? {
            // Listed without its lock: a VM deleted since (a `vm run --rm` finishing) is
            // simply no longer there, not an error of the whole list.
            let launched = match self.running(&record).await {
                Ok(launched) => launched,
                Err(VmError::State(StateError::NoSuchVm { .. })) => continue,
                Err(error) => return Err(error),
            };
            infos.push(self.info(&record, launched.as_ref()));
        }
        Ok(infos)
    }

    pub async fn show(&self, name: &str) -> Result<VmInfo, VmError> {
        let record = self.state()?.require_vm(name)?;
        let launched = self.running(&record).await?;
        Ok(self.info(&record, launched.as_ref()))
    }

    fn pull_env<'a>(&'a self, catalogs: &'a Catalogs) -> crate::ops::images::PullEnv<'a> {
        crate::ops::images::PullEnv {
            engine: &self.engine,
            services: &self.services,
            catalogs,
            store: &self.store,
            state_dir: &self.paths.state_dir,
        }
    }

    /// The image `name`, produced first if it is not recorded (a catalog name or an OCI
    /// reference).
    async fn ensure_image(
        &self,
        name: &str,
        events: &dyn VmProgress,
    ) -> Result<crate::state::ImageRecord, VmError> {
        let lock = self.lock(&format!("image:{name}"));
        let _held = lock.lock().await;
        if let Some(image) = self.state()?.image(name)? {
            return Ok(image);
        }
        events.note(format!("image `{name}` is not here yet: producing it"));
        let catalogs = self.catalogs(events)?;
        let env = self.pull_env(&catalogs);
        let request = crate::ops::images::ImagePullRequest {
            query: name.to_owned(),
            name: Some(name.to_owned()),
            kernel: None,
            size: None,
        };
        let options = self.run_options()?;
        let pulled = crate::ops::images::pull(&env, &request, events, options).await?;
        if let Some(resolved) = &pulled.resolved {
            events.note(resolved.clone());
        }
        Ok(pulled.record)
    }

    /// The kernel `name`, produced first from the kernel catalog if it is not recorded.
    async fn ensure_kernel(
        &self,
        name: &str,
        events: &dyn VmProgress,
    ) -> Result<crate::state::KernelRecord, VmError> {
        let lock = self.lock(&format!("kernel:{name}"));
        let _held = lock.lock().await;
        if let Some(kernel) = self.state()?.kernel(name)? {
            return Ok(kernel);
        }
        let catalogs = self.catalogs(events)?;
        if catalogs.kernel(name).is_none() {
            return Err(VmError::UnknownKernel {
                kernel: name.to_owned(),
            });
        }
        events.note(format!("kernel `{name}` is not here yet: producing it"));
        let env = self.pull_env(&catalogs);
        let options = self.run_options()?;
        let pulled = crate::ops::kernels::pull(&env, name, false, events, options).await?;
        Ok(pulled.record)
    }

    fn config(&self) -> Result<Config, VmError> {
        Ok(Config::load(&self.paths.config_file)?)
    }

    /// Options of the daemon's builds: the config's remote step cache, if any.
    fn run_options(&self) -> Result<RunOptions, VmError> {
        let mut options = RunOptions::default();
        crate::remote::run_caches(
            None,
            None,
            &self.config()?,
            self.services.registry.options(),
        )?
        .apply(&mut options);
        Ok(options)
    }

    fn catalogs(&self, events: &dyn VmProgress) -> Result<Catalogs, VmError> {
        let config = self.config()?;
        Ok(
            config.catalogs_with(Some(&self.paths.cache_dir), &|warning| {
                events.note(format!("warning: {warning}"))
            })?,
        )
    }

    /// Creates a VM (and, with `request.start`, boots it). On failure nothing of it is left.
    pub async fn create(
        &self,
        request: &CreateVm,
        events: &dyn VmProgress,
    ) -> Result<VmInfo, VmError> {
        let taken: Vec<String> = self
            .state()?
            .vms()?
            .into_iter()
            .map(|record| record.name)
            .collect();
        let name = match &request.name {
            Some(name) => {
                crate::vm::shape::validate_name(name)?;
                name.clone()
            }
            None => crate::vm::shape::generate_name(&taken, fastrand::u64(..)),
        };
        if taken.contains(&name) {
            return Err(StateError::VmExists { name }.into());
        }
        let network = request.network.unwrap_or(NetworkMode::User);
        crate::vm::backend::check_network(network)?;
        check_ports(network, &request.ports)?;
        let backend_kind = match &request.backend {
            None => None,
            Some(text) => {
                Some(
                    BackendKind::parse(text).ok_or_else(|| VmError::UnknownBackend {
                        backend: text.clone(),
                    })?,
                )
            }
        };
        let backend = Backend::choose(backend_kind, &self.accel()?)?;
        let image_name = request
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
        let image = self.ensure_image(&image_name, events).await?;
        let kernel_name = match (&request.kernel, &image.kernel_ref) {
            (Some(kernel), _) | (None, Some(kernel)) => kernel.clone(),
            (None, None) => self
                .catalogs(events)?
                .kernels
                .first()
                .map(|entry| entry.name.clone())
                .ok_or_else(|| VmError::UnknownKernel {
                    kernel: "(the catalog is empty)".to_owned(),
                })?,
        };
        let kernel = self.ensure_kernel(&kernel_name, events).await?;
        let Some(initrd) = kernel.initrd.clone() else {
            return Err(VmError::NoInitramfs {
                kernel: kernel.name,
            });
        };
        let shape = VmShape::resolve(
            &ShapeRequest {
                vcpus: request.vcpus,
                memory_mib: request.memory_mib,
                disk_bytes: request.disk_bytes,
            },
            &self.config()?.vm_defaults,
            &self.host,
        );
        let lock = self.lock(&name);
        let _held = lock.lock().await;
        // Checked again under the lock: another create of the same name may have passed the
        // first check while this one was resolving its image, and files of a VM that exists
        // must never be made (or removed on failure) here.
        if self.state()?.vm(&name)?.is_some() {
            return Err(StateError::VmExists { name }.into());
        }
        // No VM has this name, so whatever its directory holds was left by a create that
        // crashed.
        let _ = std::fs::remove_dir_all(self.vm_dir(&name));
        let id = new_id();
        let record = VmRecord {
            name: name.clone(),
            id: id.clone(),
            image: image.name.clone(),
            kernel: kernel.name.clone(),
            backend: backend.kind().as_str().to_owned(),
            vcpus: shape.vcpus,
            memory_mib: shape.memory_mib,
            disk_bytes: shape.disk_bytes,
            state: VmState::Stopped,
            created_ms: crate::store::now_ms(),
            rootfs_integrity: Some(image.rootfs_integrity.clone()),
            network,
            ports: request.ports.clone(),
        };
        events.note(format!(
            "spec: {shape} · network {network}{}",
            ports_note(&record.ports)
        ));
        let made = self.make_vm_files(&record, &image_file(&image), &kernel.vmlinux, &initrd);
        let made = made
            .and_then(|()| Ok(self.state()?.create_vm(&record)?))
            .and_then(|()| self.bridge_address(&record).map(drop));
        if let Err(error) = made {
            let _ = self.state().map(|state| {
                let _ = state.remove_vm(&record.name);
                let _ = state.free_address(&record.id);
            });
            self.remove_vm_files(&record);
            return Err(error);
        }
        tracing::info!(vm = %name, image = %image.name, kernel = %kernel.name, "vm created");
        events.note(format!(
            "created VM `{name}` ({} on {}, {} backend)",
            image.name,
            kernel.name,
            backend.kind()
        ));
        drop(_held);
        if request.start {
            return self
                .start_with(
                    &name,
                    timeout(request.timeout_secs),
                    events,
                    request.warm_start,
                )
                .await;
        }
        Ok(self.info(&record, None))
    }

    /// A tap VM's address on the bridge (allocated the first time: kept until the VM is
    /// deleted); `None` for other VMs. The DNS server learns it at once.
    fn bridge_address(&self, record: &VmRecord) -> Result<Option<std::net::Ipv4Addr>, VmError> {
        if record.network != NetworkMode::Tap {
            return Ok(None);
        }
        let subnet = self.config()?.subnet;
        let mut state = self.state()?;
        let address = state
            .allocate_address(&record.id, subnet.guest_addresses())?
            .ok_or_else(|| VmError::AddressPoolFull {
                subnet: subnet.to_string(),
            })?;
        self.network.set_names(state.addresses()?);
        Ok(Some(address))
    }

    /// Before a tap VM boots: the bridge network with this VM's published ports too, and a
    /// tap for it.
    async fn attach_to_bridge(
        &self,
        record: &VmRecord,
        address: std::net::Ipv4Addr,
    ) -> Result<crate::vm::boot::TapAttachment, VmError> {
        let subnet = self.config()?.subnet;
        let _held = self.network_lock.lock().await;
        let mut published = self.published_on_bridge(Some(&record.name))?;
        published.extend(record.ports.iter().map(|port| (*port, address)));
        self.network.up(subnet, &published).await?;
        let tap = self.network.take_tap()?;
        Ok(crate::vm::boot::TapAttachment {
            tap,
            mac: crate::vm::boot::TapAttachment::mac_for(&record.id),
            address,
            gateway: subnet.gateway(),
            netmask: subnet.netmask(),
            dns: subnet.gateway(),
        })
    }

    /// The VM's disks (blank and sparse: the same work for any size) and links to its boot
    /// files (hard links: no bytes copied).
    fn make_vm_files(
        &self,
        record: &VmRecord,
        rootfs: &StoredFile,
        vmlinux: &StoredFile,
        initrd: &StoredFile,
    ) -> Result<(), VmError> {
        let dir = self.vm_dir(&record.name);
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        // A new VM makes new host keys at its first boot.
        self.forget_host_keys(&record.name);
        VmDisks::create(&dir, &record.id, record.disk_bytes, record.disk_bytes)?;
        let boot = self.boot_dir(&record.id);
        std::fs::create_dir_all(&boot).map_err(io("cannot create", &boot))?;
        for (file, name) in [
            (rootfs, "rootfs.ext4"),
            (vmlinux, "vmlinux"),
            (initrd, "initrd"),
        ] {
            self.store.materialize(
                &OutputRef {
                    integrity: file.integrity.clone(),
                    size: file.size,
                },
                &boot.join(name),
            )?;
        }
        Ok(())
    }

    fn remove_vm_files(&self, record: &VmRecord) {
        self.forget_host_keys(&record.name);
        let _ = std::fs::remove_dir_all(self.vm_dir(&record.name));
        let _ = std::fs::remove_dir_all(self.boot_dir(&record.id));
        let _ = std::fs::remove_dir_all(self.run_dir(&record.id));
    }

    /// Forgets the SSH host keys pinned for VM `name` (its own `known_hosts`, and the one
    /// `ssh NAME.vm` uses): a VM made again has new ones.
    fn forget_host_keys(&self, name: &str) {
        let _ = std::fs::remove_file(self.vm_dir(name).join("known_hosts"));
        let _ = std::fs::remove_file(crate::ops::ssh_config::known_hosts_file(
            &self.paths.state_dir,
            name,
        ));
    }

    /// Boots a stopped VM and waits for its agent until `timeout`; installs banger's SSH key.
    /// A guest that does not come up is stopped again (its console log stays).
    pub async fn start(
        &self,
        name: &str,
        timeout: Duration,
        events: &dyn VmProgress,
    ) -> Result<VmInfo, VmError> {
        self.start_with(name, timeout, events, false).await
    }

    /// [`Vms::start`]; `warm` (a VM just made, its disks blank) restores a memory snapshot
    /// where one fits, and saves one where none does yet (`docs/snapshots.md`).
    async fn start_with(
        &self,
        name: &str,
        timeout: Duration,
        events: &dyn VmProgress,
        warm: bool,
    ) -> Result<VmInfo, VmError> {
        let lock = self.lock(name);
        let _held = lock.lock().await;
        let record = self.state()?.require_vm(name)?;
        if self.running(&record).await?.is_some() {
            return Err(VmError::AlreadyRunning {
                name: name.to_owned(),
            });
        }
        // Before anything starts: a taken port must not cost a boot.
        crate::net::ports::check_free(&record.ports)?;
        let kind = BackendKind::parse(&record.backend).unwrap_or(BackendKind::Qemu);
        let backend = Backend::choose(Some(kind), &self.accel()?)?;
        let run_dir = self.run_dir(&record.id);
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).map_err(io("cannot create", &run_dir))?;
        let dir = self.vm_dir(&record.name);
        let boot = self.boot_dir(&record.id);
        let tap = match self.bridge_address(&record)? {
            Some(address) => match self.attach_to_bridge(&record, address).await {
                Ok(tap) => Some(tap),
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&run_dir);
                    return Err(error);
                }
            },
            None => None,
        };
        let spec = MachineSpec {
            id: record.id.clone(),
            hostname: Some(record.name.clone()),
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            kernel: boot.join("vmlinux"),
            initrd: Some(boot.join("initrd")),
            rootfs: boot.join("rootfs.ext4"),
            disks: VmDisks::in_dir(&dir),
            run_dir: run_dir.clone(),
            console_log: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
            network: record.network,
            ssh_port: free_loopback_port().map_err(io("cannot pick a port for", &run_dir))?,
            ports: record.ports.clone(),
            tap: tap.clone(),
        };
        let plan = if warm {
            match self.warm_plan(&record, &backend, &boot) {
                Ok(plan) => {
                    if plan.saved.is_none() {
                        events.detail(format!(
                            "no snapshot fits `{name}` yet: {}",
                            plan.snapshots.why_none_fits(&plan.spec)
                        ));
                    }
                    Some(plan)
                }
                Err(reason) => {
                    events.detail(format!("`{name}` boots from scratch: {reason}"));
                    None
                }
            }
        } else {
            None
        };
        let backend = match &plan {
            Some(plan) => plan.backend.clone(),
            None => backend,
        };
        // A snapshot is saved when none was found, or when the one found did not restore.
        let mut save = plan.as_ref().is_some_and(|plan| plan.saved.is_none());
        if let Some(plan) = &plan
            && let Some(saved) = &plan.saved
        {
            events.note(format!("starting `{name}` from its snapshot"));
            events.detail(format!(
                "snapshot {} ({})",
                crate::vm::snapshot::short_key(&saved.key),
                saved.dir.display()
            ));
            let restored = match saved.disks.copy_to(&spec.disks) {
                Ok(()) => {
                    self.launch_and_wait(
                        &record,
                        &backend,
                        &spec,
                        tap.as_ref(),
                        Launch::Restore(saved),
                        timeout,
                        events,
                    )
                    .await
                }
                Err(error) => Err(error.into()),
            };
            match restored {
                Ok(info) => {
                    // Only what eviction goes by: a failure costs at worst an early eviction.
                    let _ = saved.mark_used();
                    return Ok(info);
                }
                Err(error) => {
                    events.note(format!(
                        "warning: `{name}` did not start from its snapshot ({}); booting it \
                         instead",
                        crate::error::error_chain(&error)
                    ));
                    plan.snapshots.remove(&saved.key);
                    save = true;
                    self.reset_disks(&record)?;
                    std::fs::create_dir_all(&run_dir).map_err(io("cannot create", &run_dir))?;
                }
            }
        }
        let launch = match &plan {
            Some(plan) if save => Launch::BootAndSave(plan),
            _ => Launch::Boot,
        };
        self.launch_and_wait(
            &record,
            &backend,
            &spec,
            tap.as_ref(),
            launch,
            timeout,
            events,
        )
        .await
    }

    /// Launches the machine of `spec`, records it, waits for its agent, and does what
    /// `launch` asks before banger's SSH key goes in. A guest that does not come up is
    /// stopped again (its console log stays), and its tap and run directory are removed.
    #[allow(clippy::too_many_arguments)]
    async fn launch_and_wait(
        &self,
        record: &VmRecord,
        backend: &Backend,
        spec: &MachineSpec,
        tap: Option<&crate::vm::boot::TapAttachment>,
        launch: Launch<'_>,
        timeout: Duration,
        events: &dyn VmProgress,
    ) -> Result<VmInfo, VmError> {
        let name = record.name.as_str();
        let run_dir = &spec.run_dir;
        let accel_note = match backend {
            Backend::Qemu(qemu) => format!("QEMU microvm, {}", qemu.accel),
            Backend::Firecracker(_) => "Firecracker, KVM".to_owned(),
        };
        let started = Instant::now();
        let launched = match (&launch, backend) {
            (Launch::Restore(saved), Backend::Qemu(qemu)) => {
                qemu.launch_restored(spec, &saved.state).await
            }
            (Launch::Restore(saved), Backend::Firecracker(firecracker)) => {
                firecracker
                    .launch_restored(spec, &saved.firecracker_files())
                    .await
            }
            _ => {
                events.note(format!("booting `{name}` ({accel_note})"));
                backend.launch(spec).await
            }
        };
        let launched = match launched {
            Ok(launched) => launched,
            Err(error) => {
                let _ = std::fs::remove_dir_all(run_dir);
                if let Some(tap) = tap {
                    let _ = crate::privileged::TapDevice::delete_by_name(&tap.tap);
                    let _ = self.refresh_ruleset(&record.name).await;
                }
                return Err(error.into());
            }
        };
        if tap.is_some() {
            // The next start takes a ready tap instead of making one.
            let network = Arc::clone(&self.network);
            tokio::task::spawn_blocking(move || network.replenish());
        }
        // From here the VM exists outside this process: record it before anything else can
        // fail, so a daemon killed now finds it again.
        let recorded = self
            .write_scratch(&record.id, &launched)
            .and_then(|()| Ok(self.state()?.set_vm_state(name, VmState::Running)?));
        if recorded.is_ok() {
            tracing::info!(vm = %name, vmm_pid = launched.vmm.pid, "vm running");
        }
        if let Err(error) = recorded {
            backend.halt(&launched, Duration::from_secs(1)).await;
            self.finish_run(record, &launched).await?;
            return Err(error);
        }
        self.live_insert(name, launched.clone());
        match self
            .wait_guest(record, &launched, tap, started, timeout, &launch, events)
            .await
        {
            Ok(()) => {
                events.note(format!(
                    "`{name}` is up ({:.1} s)",
                    started.elapsed().as_secs_f64()
                ));
                Ok(self.info(record, Some(&launched)))
            }
            Err(error) => {
                self.live_remove(name);
                backend.halt(&launched, Duration::from_secs(2)).await;
                self.finish_run(record, &launched).await?;
                Err(error)
            }
        }
    }

    /// How VM `record` (just made, about to start on `backend`) uses a memory snapshot, or
    /// why it cannot: an image recorded without its integrity, boot files that are not the
    /// kernel's stored ones, the VMM's version unknown, or a snapshots directory that cannot
    /// be opened.
    fn warm_plan(
        &self,
        record: &VmRecord,
        backend: &Backend,
        boot: &Path,
    ) -> Result<WarmPlan, String> {
        let (warm_backend, binary, accel) = match backend {
            Backend::Qemu(qemu) => (
                Backend::Qemu(qemu.for_snapshots()),
                Path::new(&qemu.binary),
                if qemu.accel.is_tcg() { "tcg" } else { "kvm" },
            ),
            Backend::Firecracker(firecracker) => {
                (backend.clone(), firecracker.binary.as_path(), "kvm")
            }
        };
        let vmm = crate::vm::snapshot::vmm_version(binary)
            .ok_or_else(|| format!("`{} --version` gave no version", binary.display()))?;
        // The boot files are hard links to the kernel's stored files (`make_vm_files`): the
        // store's integrity names their content without reading 50-150 MB on every start.
        let kernel = self
            .state()
            .map_err(|error| crate::error::error_chain(&error))?
            .kernel(&record.kernel)
            .map_err(|error| crate::error::error_chain(&error))?
            .ok_or_else(|| format!("its kernel `{}` is no longer recorded", record.kernel))?;
        let stored_integrity = |name: &str, file: Option<&StoredFile>| -> Result<String, String> {
            let linked = file.and_then(|file| {
                let output = OutputRef {
                    integrity: file.integrity.clone(),
                    size: file.size,
                };
                let stored = self.store.content_file(&output).ok()?;
                same_file(&stored, &boot.join(name)).then(|| file.integrity.clone())
            });
            linked.ok_or_else(|| {
                format!(
                    "its `{name}` is not kernel `{}`'s stored file any more",
                    record.kernel
                )
            })
        };
        let spec = crate::vm::snapshot::SnapshotSpec {
            format: crate::vm::snapshot::SNAPSHOT_FORMAT,
            banger: env!("CARGO_PKG_VERSION").to_owned(),
            vmm,
            accel: accel.to_owned(),
            tsc_khz: crate::vm::accel::host_tsc_khz(),
            rootfs: record.rootfs_integrity.clone().ok_or_else(|| {
                "its image was recorded without its integrity (re-pull or rebuild it)".to_owned()
            })?,
            vmlinux: stored_integrity("vmlinux", Some(&kernel.vmlinux))?,
            initrd: stored_integrity("initrd", kernel.initrd.as_ref())?,
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            disk_bytes: record.disk_bytes,
            network: record.network,
        };
        let snapshots = crate::vm::snapshot::Snapshots::open(self.paths.snapshots_dir())
            .map_err(|error| crate::error::error_chain(&error))?;
        let key = spec.key();
        Ok(WarmPlan {
            backend: warm_backend,
            saved: snapshots.find(&key),
            snapshots,
            key,
            spec,
        })
    }

    /// Makes a just-made VM's disks blank again (after a failed restore wrote them).
    fn reset_disks(&self, record: &VmRecord) -> Result<(), VmError> {
        let dir = self.vm_dir(&record.name);
        let disks = VmDisks::in_dir(&dir);
        let _ = std::fs::remove_file(&disks.overlay);
        let _ = std::fs::remove_file(&disks.work);
        VmDisks::create(&dir, &record.id, record.disk_bytes, record.disk_bytes)?;
        Ok(())
    }

    /// Saves a memory snapshot of the guest of `launched`, booted as `plan` says: waits
    /// until its boot has finished, pauses it, writes its memory and copies its disks, lets
    /// it run on. A failure to save is a warning: the VM itself is fine. Under Firecracker,
    /// which closes the guest's vsock connections when it saves, `channel` is replaced by a
    /// new connection; an agent that cannot be reached again is the error.
    async fn save_snapshot(
        &self,
        channel: &mut crate::guest::GuestChannel,
        record: &VmRecord,
        launched: &Launched,
        plan: &WarmPlan,
        events: &dyn VmProgress,
    ) -> Result<(), VmError> {
        let started = Instant::now();
        let name = &record.name;
        events.note(format!(
            "saving a snapshot of `{name}` once its boot has finished (later `vm run --rm` \
             of this image, kernel and shape start from it)"
        ));
        let result = async {
            run_agent_command(channel, &["settle", "--timeout", "120"], None).await?;
            let pending = plan.snapshots.begin(&plan.key)?;
            let files = pending.files();
            let control = &launched.control_socket;
            let saved: Result<(), VmError> = match launched.backend {
                BackendKind::Qemu => {
                    crate::vm::snapshot::save(control, &self.run_dir(&record.id), &files.state)
                        .await
                        .map(drop)
                        .map_err(VmError::from)
                }
                BackendKind::Firecracker => crate::vm::firecracker::snapshot::create_snapshot_at(
                    control,
                    &files.firecracker_files(),
                )
                .await
                .map_err(|error| BackendError::from(error).into()),
            };
            let disks = VmDisks::in_dir(&self.vm_dir(name));
            let copied = match &saved {
                Ok(()) => disks.copy_to(&files.disks).map_err(VmError::from),
                Err(_) => Ok(()),
            };
            let resumed: Result<(), VmError> = match launched.backend {
                BackendKind::Qemu => crate::vm::snapshot::resume(control)
                    .await
                    .map_err(VmError::from),
                BackendKind::Firecracker => crate::vm::firecracker::snapshot::resume_at(control)
                    .await
                    .map_err(|error| BackendError::from(error).into()),
            };
            saved?;
            copied?;
            resumed?;
            if launched.backend == BackendKind::Firecracker {
                // Firecracker writes every page of the guest; most were never touched.
                let memory = files.memory.clone();
                let punched = tokio::task::spawn_blocking(move || {
                    std::fs::File::options()
                        .read(true)
                        .write(true)
                        .open(&memory)
                        .and_then(|file| crate::sparse::punch_zero_blocks(&file))
                })
                .await;
                if let Ok(Err(error)) = punched {
                    events.detail(format!(
                        "the snapshot's memory file stays as large as the guest's memory: {error}"
                    ));
                }
            }
            Ok::<_, VmError>(pending.publish(&plan.spec)?)
        }
        .await;
        match result {
            Ok(saved) => {
                events.note(format!(
                    "saved the snapshot ({:.1} s, {} on disk)",
                    started.elapsed().as_secs_f64(),
                    mib(saved.disk_usage())
                ));
                self.evict_snapshots(&plan.snapshots, &saved.key, events);
            }
            Err(error) => events.note(format!(
                "warning: no snapshot of `{name}` was saved: {}",
                crate::error::error_chain(&error)
            )),
        }
        if launched.backend == BackendKind::Firecracker {
            let endpoint = launched.agent.endpoint();
            let reconnected = endpoint
                .wait_ready(Instant::now() + AGENT_RECONNECT_TIMEOUT)
                .await;
            *channel = match reconnected {
                Ok((fresh, _ready)) => fresh,
                Err(error) => {
                    return Err(VmError::GuestDidNotComeUp {
                        name: name.clone(),
                        reason: format!(
                            "its agent did not answer again over {endpoint} after the snapshot \
                             ({error})"
                        ),
                        tail: crate::vm::boot::console_tail(
                            &self.vm_dir(name).join("console.log"),
                            20,
                        ),
                    });
                }
            };
        }
        Ok(())
    }

    /// Keeps the snapshots within `[cache] snapshots_max_size` once `just_saved` joined them,
    /// removing the least recently used others. A failure is a warning.
    fn evict_snapshots(
        &self,
        snapshots: &crate::vm::snapshot::Snapshots,
        just_saved: &str,
        events: &dyn VmProgress,
    ) {
        let evicted = self
            .config()
            .map_err(|error| error.to_string())
            .and_then(|config| {
                let cap = config.cache_snapshots_max_size;
                snapshots
                    .evict_to_fit(cap.bytes(), just_saved)
                    .map(|removed| (cap, removed))
                    .map_err(|error| crate::error::error_chain(&error))
            });
        match evicted {
            Ok((_, removed)) if removed.is_empty() => {}
            Ok((cap, removed)) => events.note(format!(
                "removed {} least recently used snapshot(s), {}, to keep snapshots within \
                 {cap} (`[cache] snapshots_max_size`)",
                removed.len(),
                mib(removed.iter().map(|snapshot| snapshot.disk_usage).sum()),
            )),
            Err(error) => events.note(format!("warning: old snapshots were not removed: {error}")),
        }
    }

    /// Makes a guest restored from a snapshot a new instance (`banger-agent reidentify`):
    /// the host's time, fresh entropy, the VM's own MAC, machine id and SSH host keys, and on
    /// banger's bridge (`tap`) its own address.
    async fn reidentify(
        &self,
        channel: &mut crate::guest::GuestChannel,
        record: &VmRecord,
        tap: Option<&crate::vm::boot::TapAttachment>,
    ) -> Result<(), VmError> {
        let mut seed = [0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut seed))
            .map_err(io("cannot read", Path::new("/dev/urandom")))?;
        let (private, public) = tokio::task::spawn_blocking(crate::ssh::new_host_key)
            .await
            .map_err(|error| VmError::AgentCommand {
                argv: "ssh-keygen".to_owned(),
                status: "did not finish".to_owned(),
                stderr: error.to_string(),
            })??;
        let time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        let firecracker = BackendKind::parse(&record.backend) == Some(BackendKind::Firecracker);
        let mac = if firecracker {
            crate::vm::backend::guest_mac(&record.id).to_string()
        } else {
            crate::vm::boot::TapAttachment::mac_for(&record.id)
        };
        // The saved guest has the address of the VM it was saved from: on banger's bridge,
        // and on the point-to-point tap a Firecracker VM of the `user` network has.
        let own_address = match (tap, record.network) {
            (Some(tap), _) => Some((tap.guest_cmdline(), tap.address.to_string())),
            (None, NetworkMode::User) if firecracker => {
                let addresses = crate::privileged::tap_addresses(&record.id);
                Some((addresses.guest_cmdline("eth0"), addresses.guest.to_string()))
            }
            _ => None,
        };
        let mut request = serde_json::json!({
            "time_ns": time_ns,
            "seed": crate::bundle::hex(&seed),
            "mac": mac,
            "hostname": record.name,
            "host_keys": { "ed25519": { "private": private, "public": public } },
        });
        if let Some((word, _)) = &own_address {
            request["ip"] = serde_json::Value::from(word.strip_prefix("ip=").unwrap_or(word));
        }
        let stdout = run_agent_command(
            channel,
            &["reidentify"],
            Some(request.to_string().as_bytes()),
        )
        .await?;
        if let Some((_, address)) = &own_address {
            // An agent older than `ip` ignores it, and the VM would keep another's address.
            let said = format!("address {address}/");
            if !String::from_utf8_lossy(&stdout).contains(&said) {
                return Err(VmError::AgentCommand {
                    argv: format!("{} reidentify", crate::assets::AGENT_GUEST_PATH),
                    status: "exit 0".to_owned(),
                    stderr: format!(
                        "it did not move the guest to its own address {address} (an agent \
                         older than this banger: re-pull or rebuild the image)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Waits for the agent (or for the VMM to die), then authorizes banger's SSH key.
    #[allow(clippy::too_many_arguments)]
    async fn wait_guest(
        &self,
        record: &VmRecord,
        launched: &Launched,
        tap: Option<&crate::vm::boot::TapAttachment>,
        started: Instant,
        timeout: Duration,
        launch: &Launch<'_>,
        events: &dyn VmProgress,
    ) -> Result<(), VmError> {
        let endpoint = launched.agent.endpoint();
        let deadline = started + timeout;
        let console = self.vm_dir(&record.name).join("console.log");
        let did_not_come_up = |reason: String| VmError::GuestDidNotComeUp {
            name: record.name.clone(),
            reason,
            tail: crate::vm::boot::console_tail(&console, 20),
        };
        let ready = endpoint.wait_ready(deadline);
        tokio::pin!(ready);
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        let mut channel = loop {
            tokio::select! {
                result = &mut ready => match result {
                    Ok((channel, _ready)) => break channel,
                    Err(error) => {
                        // A stuck VMM and a guest that never got there look alike from the
                        // agent's side; the VMM and its log tell them apart.
                        let vmm_log = self.vm_dir(&record.name).join("vmm.log");
                        return Err(did_not_come_up(format!(
                            "its agent did not answer within {} s over {endpoint} ({error}); \
                             {}; the VMM's log ({}) ends:\n{}",
                            timeout.as_secs(),
                            crate::vm::backend::diagnose(launched).await,
                            vmm_log.display(),
                            crate::vm::boot::log_tail(&vmm_log, 5, "VMM log"),
                        )));
                    }
                },
                _ = poll.tick() => {
                    if !launched.vmm.is_alive() {
                        return Err(did_not_come_up(format!(
                            "its VMM ({}) exited before the agent answered (a kernel panic or \
                             a power-off in the guest)",
                            launched.backend
                        )));
                    }
                }
            }
        };
        match launch {
            Launch::Boot => {}
            Launch::BootAndSave(plan) => {
                self.save_snapshot(&mut channel, record, launched, plan, events)
                    .await?;
            }
            Launch::Restore(_) => {
                let agent_ready = started.elapsed();
                tokio::time::timeout_at(
                    deadline.into(),
                    self.reidentify(&mut channel, record, tap),
                )
                .await
                .map_err(|_| {
                    did_not_come_up("its agent did not make it a new instance in time".to_owned())
                })??;
                tracing::info!(
                    vm = %record.name,
                    agent_ready_ms = agent_ready.as_millis() as u64,
                    reidentified_ms = started.elapsed().as_millis() as u64,
                    "restored from a snapshot"
                );
            }
        }
        let identity = crate::ssh::SshIdentity::ensure(&self.paths.state_dir)?;
        // Under the VM's lock: a guest that said hello and went silent must not hold it.
        let authorize_deadline = deadline.max(Instant::now() + AUTHORIZE_TIMEOUT);
        match tokio::time::timeout_at(
            authorize_deadline.into(),
            crate::ssh::authorize_in_guest(&mut channel, &identity),
        )
        .await
        {
            Ok(authorized) => authorized.map_err(|source| VmError::Authorize {
                name: record.name.clone(),
                source,
            }),
            Err(_) => Err(did_not_come_up(format!(
                "its agent answered, then did not finish installing banger's SSH key within {} s",
                authorize_deadline
                    .saturating_duration_since(started)
                    .as_secs()
            ))),
        }
    }

    /// Powers the guest off through its agent, waits for the VMM to exit, forces it after a
    /// grace period.
    /// Powers the VM off through its agent, giving the guest `grace` (default
    /// [`POWEROFF_GRACE`]) before its VMM is stopped.
    pub async fn stop(
        &self,
        name: &str,
        grace: Option<Duration>,
        events: &dyn VmProgress,
    ) -> Result<VmInfo, VmError> {
        let lock = self.lock(name);
        let _held = lock.lock().await;
        let record = self.state()?.require_vm(name)?;
        let Some(launched) = self.running(&record).await? else {
            return Err(VmError::NotRunning {
                name: name.to_owned(),
            });
        };
        events.note(format!("stopping `{name}`"));
        self.power_off(&launched, grace.unwrap_or(POWEROFF_GRACE))
            .await;
        self.live_remove(name);
        self.finish_run(&record, &launched).await?;
        Ok(self.info(&record, None))
    }

    /// A guest that does not answer (no `Ready` within 5 s, or no answer to the power-off
    /// request) is halted at once instead of being given [`POWEROFF_GRACE`]: a hung or hostile
    /// guest must not hold the VM's lock for long.
    async fn power_off(&self, launched: &Launched, grace: Duration) {
        let endpoint = launched.agent.endpoint();
        let deadline = Instant::now() + Duration::from_secs(5);
        let answered = match endpoint.wait_ready(deadline).await {
            Ok((mut channel, ready)) => {
                crate::vm::boot::request_poweroff(&mut channel, ready.pid1).await
            }
            Err(_) => false,
        };
        if !answered || !launched.vmm.wait_gone(grace).await {
            let accel = self.accel().unwrap_or(Accel::Kvm);
            Backend::for_recorded(launched.backend, &accel)
                .halt(launched, Duration::from_secs(3))
                .await;
        }
    }

    /// Stops the VM if it runs (cleanly, as [`Vms::stop`]), then starts it.
    pub async fn restart(
        &self,
        name: &str,
        timeout: Duration,
        events: &dyn VmProgress,
    ) -> Result<VmInfo, VmError> {
        match self.stop(name, None, events).await {
            Ok(_) | Err(VmError::NotRunning { .. }) => self.start(name, timeout, events).await,
            Err(error) => Err(error),
        }
    }

    /// Changes a stopped VM's vCPUs, memory and disk size, used from its next start. Disks
    /// grow before the record changes, so an interrupted `set` is run again as it was.
    pub async fn set(&self, request: &SetVm, events: &dyn VmProgress) -> Result<VmInfo, VmError> {
        let name = &request.name;
        let lock = self.lock(name);
        let _held = lock.lock().await;
        let record = self.state()?.require_vm(name)?;
        if self.running(&record).await?.is_some() {
            return Err(VmError::SetRunning { name: name.clone() });
        }
        if let Some(vcpus) = request.vcpus
            && vcpus == 0
        {
            return Err(VmError::ShapeTooSmall {
                what: "--vcpu",
                min: 1,
                requested: 0,
            });
        }
        if let Some(memory_mib) = request.memory_mib
            && memory_mib < MIN_MEMORY_MIB
        {
            return Err(VmError::ShapeTooSmall {
                what: "--memory (MiB)",
                min: MIN_MEMORY_MIB,
                requested: memory_mib,
            });
        }
        let disk_bytes = request.disk_bytes.unwrap_or(record.disk_bytes);
        if disk_bytes < record.disk_bytes {
            return Err(VmError::DiskShrink {
                name: name.clone(),
                current: record.disk_bytes,
                requested: disk_bytes,
            });
        }
        let updated = VmRecord {
            vcpus: request.vcpus.unwrap_or(record.vcpus),
            memory_mib: request.memory_mib.unwrap_or(record.memory_mib),
            disk_bytes,
            ..record.clone()
        };
        let shape = |record: &VmRecord| VmShape {
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            disk_bytes: record.disk_bytes,
        };
        if disk_bytes > record.disk_bytes {
            events.note(format!(
                "growing the disks of `{name}` to {}",
                shape(&updated)
            ));
            let disks = VmDisks::in_dir(&self.vm_dir(name));
            tokio::task::spawn_blocking(move || {
                crate::vm::storage::grow_ext4(&disks.work, disk_bytes)?;
                crate::vm::storage::grow_ext4(&disks.overlay, disk_bytes)
            })
            .await
            .map_err(|error| VmError::Io {
                what: "growing the disks of",
                path: self.vm_dir(name),
                source: std::io::Error::other(error),
            })??;
        }
        self.state()?.update_vm(&updated)?;
        events.note(format!("spec: {} -> {}", shape(&record), shape(&updated)));
        Ok(self.info(&updated, None))
    }

    /// Stops the VMM at once.
    pub async fn kill(&self, name: &str) -> Result<VmInfo, VmError> {
        let lock = self.lock(name);
        let _held = lock.lock().await;
        let record = self.state()?.require_vm(name)?;
        let Some(launched) = self.running(&record).await? else {
            return Err(VmError::NotRunning {
                name: name.to_owned(),
            });
        };
        launched.vmm.kill().await;
        self.live_remove(name);
        self.finish_run(&record, &launched).await?;
        Ok(self.info(&record, None))
    }

    /// `banger up`'s VM, as `docker compose up` treats a service: made if missing; left
    /// running, or started, when its image (the rootfs it boots), shape and network are
    /// unchanged;
    /// otherwise stopped and made again around its `/root` work disk (compose keeps volumes),
    /// or from nothing with `fresh`; then booted. The image and kernel must be recorded.
    pub async fn up(&self, request: &UpVm, events: &dyn VmProgress) -> Result<UpReport, VmError> {
        let create = CreateVm {
            start: true,
            ..request.create.clone()
        };
        let Some(name) = create.name.clone() else {
            return Err(crate::vm::shape::BadName {
                name: String::new(),
            }
            .into());
        };
        crate::vm::shape::validate_name(&name)?;
        let network = create.network.unwrap_or(NetworkMode::User);
        crate::vm::backend::check_network(network)?;
        check_ports(network, &create.ports)?;
        let Some(record) = self.state()?.vm(&name)? else {
            let vm = self.create(&create, events).await?;
            return Ok(UpReport {
                vm,
                action: UpAction::Created,
            });
        };
        let image_name = create
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
        let image = self.ensure_image(&image_name, events).await?;
        let kernel_name = create
            .kernel
            .clone()
            .or_else(|| image.kernel_ref.clone())
            .unwrap_or_else(|| record.kernel.clone());
        let shape = VmShape::resolve(
            &ShapeRequest {
                vcpus: create.vcpus,
                memory_mib: create.memory_mib,
                disk_bytes: create.disk_bytes,
            },
            &self.config()?.vm_defaults,
            &self.host,
        );
        let changes = changes(
            &record,
            &image,
            &kernel_name,
            &shape,
            network,
            &create.ports,
        );
        let unchanged = !request.fresh && changes.is_empty();
        let timeout = timeout(create.timeout_secs);
        if unchanged {
            if let Some(launched) = self.running(&record).await? {
                return Ok(UpReport {
                    vm: self.info(&record, Some(&launched)),
                    action: UpAction::Reused,
                });
            }
            let vm = self.start(&name, timeout, events).await?;
            return Ok(UpReport {
                vm,
                action: UpAction::Started,
            });
        }
        let kernel = self.ensure_kernel(&kernel_name, events).await?;
        let Some(initrd) = kernel.initrd.clone() else {
            return Err(VmError::NoInitramfs {
                kernel: kernel.name,
            });
        };
        {
            let lock = self.lock(&name);
            let _held = lock.lock().await;
            let record = self.state()?.require_vm(&name)?;
            if let Some(launched) = self.running(&record).await? {
                events.note(format!("stopping `{name}` to recreate it"));
                self.power_off(&launched, POWEROFF_GRACE).await;
                self.live_remove(&name);
                self.finish_run(&record, &launched).await?;
            }
            let updated = VmRecord {
                image: image.name.clone(),
                kernel: kernel.name.clone(),
                vcpus: shape.vcpus,
                memory_mib: shape.memory_mib,
                disk_bytes: shape.disk_bytes,
                state: VmState::Stopped,
                rootfs_integrity: Some(image.rootfs_integrity.clone()),
                network,
                ports: create.ports.clone(),
                ..record.clone()
            };
            self.remake_vm_files(
                &updated,
                &image_file(&image),
                &kernel.vmlinux,
                &initrd,
                request.fresh,
            )?;
            self.state()?.update_vm(&updated)?;
            events.note(if request.fresh {
                format!("recreated `{name}` from nothing (--fresh: its work disk too)")
            } else {
                format!(
                    "recreated `{name}` ({}); its /root work disk is kept",
                    changes.join(", ")
                )
            });
        }
        let vm = self.start(&name, timeout, events).await?;
        Ok(UpReport {
            vm,
            action: if request.fresh {
                UpAction::Replaced
            } else {
                UpAction::Recreated
            },
        })
    }

    /// A stopped VM's files made again for `record`'s image: new boot links, a blank writable
    /// layer (the old one's changes were to the old image), and the work disk kept unless
    /// `fresh`.
    fn remake_vm_files(
        &self,
        record: &VmRecord,
        rootfs: &StoredFile,
        vmlinux: &StoredFile,
        initrd: &StoredFile,
        fresh: bool,
    ) -> Result<(), VmError> {
        let dir = self.vm_dir(&record.name);
        let disks = VmDisks::in_dir(&dir);
        // The new writable layer makes new host keys at its first boot.
        self.forget_host_keys(&record.name);
        crate::vm::storage::create_blank_ext4(
            &disks.overlay,
            record.disk_bytes,
            "banger-rw",
            format!("{}/overlay", record.id).as_bytes(),
        )?;
        if fresh || !disks.work.exists() {
            crate::vm::storage::create_blank_ext4(
                &disks.work,
                record.disk_bytes,
                "banger-work",
                format!("{}/work", record.id).as_bytes(),
            )?;
        }
        let boot = self.boot_dir(&record.id);
        let _ = std::fs::remove_dir_all(&boot);
        std::fs::create_dir_all(&boot).map_err(io("cannot create", &boot))?;
        for (file, name) in [
            (rootfs, "rootfs.ext4"),
            (vmlinux, "vmlinux"),
            (initrd, "initrd"),
        ] {
            self.store.materialize(
                &OutputRef {
                    integrity: file.integrity.clone(),
                    size: file.size,
                },
                &boot.join(name),
            )?;
        }
        Ok(())
    }

    /// Kills the VM if it runs and removes it: record, disks, logs, links, sockets.
    /// Removes the VM and everything it owns; a running one only with `force` (killed, with
    /// no guest shutdown, as `docker rm -f`).
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), VmError> {
        let lock = self.lock(name);
        let _held = lock.lock().await;
        let record = self.state()?.require_vm(name)?;
        if let Some(launched) = self.running(&record).await? {
            if !force {
                return Err(VmError::DeleteRunning {
                    name: name.to_owned(),
                });
            }
            launched.vmm.kill().await;
            self.live_remove(name);
            crate::vm::backend::release(&launched).await;
            if record.network == NetworkMode::Tap && !record.ports.is_empty() {
                self.refresh_ruleset(name).await?;
            }
        }
        let state = self.state()?;
        state.remove_vm(name)?;
        tracing::info!(vm = %name, "vm deleted");
        state.free_address(&record.id)?;
        self.network.set_names(state.addresses()?);
        self.remove_vm_files(&record);
        // The last tap VM takes the bridge network with it.
        let tap_vms_left = state
            .vms()?
            .iter()
            .any(|other| other.network == NetworkMode::Tap);
        if record.network == NetworkMode::Tap && !tap_vms_left {
            let _held = self.network_lock.lock().await;
            if crate::privileged::is_root() {
                self.network.down()?;
            }
        }
        Ok(())
    }
}

/// What differs between a recorded VM and what `up` asks for, one phrase per difference
/// (empty: the VM can be reused as it is). The image counts by its rootfs's bytes, so a
/// rebuilt image under the same name is a change.
fn changes(
    record: &VmRecord,
    image: &crate::state::ImageRecord,
    kernel: &str,
    shape: &VmShape,
    network: NetworkMode,
    ports: &[PortForward],
) -> Vec<String> {
    let mut changes = Vec::new();
    if record.image != image.name
        || record.rootfs_integrity.as_deref() != Some(image.rootfs_integrity.as_str())
    {
        changes.push(format!("new image {}", image.name));
    }
    if record.kernel != kernel {
        changes.push(format!("kernel {} -> {kernel}", record.kernel));
    }
    let recorded = VmShape {
        vcpus: record.vcpus,
        memory_mib: record.memory_mib,
        disk_bytes: record.disk_bytes,
    };
    if recorded != *shape {
        changes.push(format!("{recorded} -> {shape}"));
    }
    if record.network != network {
        changes.push(format!("network {} -> {network}", record.network));
    }
    if record.ports != ports {
        changes.push(format!(
            "ports [{}] -> [{}]",
            ports_list(&record.ports),
            ports_list(ports)
        ));
    }
    changes
}

/// Published ports a VM of `network` can have: some network, no host port twice.
fn check_ports(network: NetworkMode, ports: &[PortForward]) -> Result<(), VmError> {
    if ports.is_empty() {
        return Ok(());
    }
    if network == NetworkMode::None {
        return Err(VmError::PortsWithoutNetwork);
    }
    crate::spec::check_port_clashes(ports).map_err(VmError::PortClash)
}

fn ports_list(ports: &[PortForward]) -> String {
    ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// ` · ports 127.0.0.1:8080:80/tcp` for the `spec:` note, or nothing.
fn ports_note(ports: &[PortForward]) -> String {
    if ports.is_empty() {
        String::new()
    } else {
        format!(" · ports {}", ports_list(ports))
    }
}

/// How long a Firecracker guest's agent may take to answer again after a snapshot closed
/// its connection (it is running, and only has to accept).
const AGENT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The least time the SSH key install gets once the agent answered, whatever is left of the
/// boot timeout.
const AUTHORIZE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a start brings its guest up.
enum Launch<'a> {
    /// A boot from scratch.
    Boot,
    /// A boot from scratch, then a snapshot saved for later starts.
    BootAndSave(&'a WarmPlan),
    /// This snapshot restored (the VM's disks are copies of its disks).
    Restore(&'a crate::vm::snapshot::SavedSnapshot),
}

/// A start that may use memory snapshots ([`Vms::warm_plan`]).
struct WarmPlan {
    /// The VM's VMM as a saved or restored VM needs it (QEMU with the agent on
    /// virtio-serial).
    backend: Backend,
    snapshots: crate::vm::snapshot::Snapshots,
    spec: crate::vm::snapshot::SnapshotSpec,
    key: String,
    /// The snapshot to restore, if one is saved.
    saved: Option<crate::vm::snapshot::SavedSnapshot>,
}

/// Runs `banger-agent ARGS` in the guest (stdin from `input`); returns its stdout. A failure
/// carries its status and stderr.
async fn run_agent_command(
    channel: &mut crate::guest::GuestChannel,
    arguments: &[&str],
    input: Option<&[u8]>,
) -> Result<Vec<u8>, VmError> {
    let argv: Vec<&str> = std::iter::once(crate::assets::AGENT_GUEST_PATH)
        .chain(arguments.iter().copied())
        .collect();
    let mut request = crate::guest::ExecRequest::argv(argv.iter().copied());
    if input.is_some() {
        request = request.with_stdin();
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = channel
        .exec(
            &request,
            input.unwrap_or_default(),
            &mut stdout,
            &mut stderr,
        )
        .await
        .map_err(|source| VmError::AgentCommand {
            argv: argv.join(" "),
            status: "no answer".to_owned(),
            stderr: crate::error::error_chain(&source),
        })?;
    if status.success() {
        return Ok(stdout);
    }
    Err(VmError::AgentCommand {
        argv: argv.join(" "),
        status: status.to_string(),
        stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
    })
}

/// The requested agent wait, or the default.
pub fn timeout(seconds: Option<u64>) -> Duration {
    // Clamped: a request from any client must not overflow a deadline.
    seconds.map_or(DEFAULT_BOOT_TIMEOUT, |seconds| {
        Duration::from_secs(seconds.min(crate::spec::MAX_TIMEOUT_SECS))
    })
}

/// Whether `a` and `b` are one file (hard links of one inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn image_file(image: &crate::state::ImageRecord) -> StoredFile {
    StoredFile {
        integrity: image.rootfs_integrity.clone(),
        size: image.rootfs_size,
    }
}

/// 12 random lowercase letters and digits.
fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..12)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

/// A loopback port free right now (the OS picks it; QEMU binds it a moment later).
fn free_loopback_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// `118 MiB`: a snapshot's size in the notes of a start.
fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / f64::from(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VmRecord {
        VmRecord {
            name: "project".into(),
            id: "k3j9x2p0qa7m".into(),
            image: "project/sandbox".into(),
            kernel: "debian-cloud-amd64".into(),
            backend: "qemu".into(),
            vcpus: 2,
            memory_mib: 2048,
            disk_bytes: 8 << 30,
            state: VmState::Running,
            created_ms: 1,
            rootfs_integrity: Some("sha256-AAAA".into()),
            network: NetworkMode::User,
            ports: Vec::new(),
        }
    }

    fn image() -> crate::state::ImageRecord {
        crate::state::ImageRecord {
            name: "project/sandbox".into(),
            source: "bangerfile:/p/Bangerfile#sandbox".into(),
            distro: Some("debian".into()),
            arch: "x86_64".into(),
            kernel_ref: Some("debian-cloud-amd64".into()),
            rootfs_integrity: "sha256-AAAA".into(),
            rootfs_size: 1 << 30,
            step_key: crate::key::Key::from_bytes([7; 32]),
            created_ms: 1,
        }
    }

    const SHAPE: VmShape = VmShape {
        vcpus: 2,
        memory_mib: 2048,
        disk_bytes: 8 << 30,
    };

    #[test]
    fn up_reuses_a_vm_only_when_image_kernel_shape_and_network_are_the_same() {
        let kernel = "debian-cloud-amd64";
        assert!(changes(&record(), &image(), kernel, &SHAPE, NetworkMode::User, &[]).is_empty());
        assert_eq!(
            changes(&record(), &image(), kernel, &SHAPE, NetworkMode::None, &[]),
            ["network user -> none"]
        );
        let rebuilt = crate::state::ImageRecord {
            rootfs_integrity: "sha256-BBBB".into(),
            ..image()
        };
        assert_eq!(
            changes(&record(), &rebuilt, kernel, &SHAPE, NetworkMode::User, &[]),
            ["new image project/sandbox"]
        );
        let bigger = VmShape { vcpus: 4, ..SHAPE };
        assert_eq!(
            changes(
                &record(),
                &image(),
                "other",
                &bigger,
                NetworkMode::User,
                &[]
            ),
            [
                "kernel debian-cloud-amd64 -> other",
                "2 vcpu · 2048 MiB · 8G disk -> 4 vcpu · 2048 MiB · 8G disk"
            ]
        );
        let published = [PortForward::parse("8080:80").unwrap()];
        assert_eq!(
            changes(
                &record(),
                &image(),
                kernel,
                &SHAPE,
                NetworkMode::User,
                &published
            ),
            ["ports [] -> [127.0.0.1:8080:80/tcp]"]
        );
    }

    #[test]
    fn ports_need_a_network_and_distinct_host_ports() {
        let ports = |texts: &[&str]| -> Vec<PortForward> {
            texts
                .iter()
                .map(|text| PortForward::parse(text).unwrap())
                .collect()
        };
        assert!(check_ports(NetworkMode::User, &ports(&["8080:80", "8081:80"])).is_ok());
        assert!(check_ports(NetworkMode::None, &[]).is_ok());
        assert!(matches!(
            check_ports(NetworkMode::None, &ports(&["8080:80"])),
            Err(VmError::PortsWithoutNetwork)
        ));
        assert!(matches!(
            check_ports(NetworkMode::User, &ports(&["8080:80", "8080:81"])),
            Err(VmError::PortClash(_))
        ));
    }
}
