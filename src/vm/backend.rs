//! The VMM backends behind one trait: QEMU `microvm` (KVM or TCG) and Firecracker (KVM only).
//!
//! A backend launches a machine and hands back a [`Launched`]: plain, serializable facts
//! (process handles, sockets, addresses) rather than live child handles, because a VM
//! outlives the daemon that started it. The daemon writes it to the VM's scratch file and
//! reads it back after a restart; [`VmmBackend::halt`] works from it alone.
//!
//! What differs per backend: how the machine is described (QEMU argv vs Firecracker API
//! requests), how the agent is reached (a `vhost-device-vsock` daemon or virtio-serial for
//! QEMU, Firecracker's own hybrid vsock), the network (QEMU user-mode networking with SSH
//! forwarded to a loopback port; a tap made by [`crate::privileged`] for Firecracker), and
//! how the VMM is told to quit (QMP `quit`; `SendCtrlAltDel`).
//!
//! A machine with [`NetworkMode::None`] gets no network device at all from either backend
//! (and no tap): the agent's vsock or serial channel is its only way in, and its [`Launched`]
//! has no SSH address.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::accel::Accel;
use super::boot::{AgentTransport, BootError, BootSpec, BootedVm};
use super::firecracker::{
    ApiClient, ApiRequest, Drive, FirecrackerError, FirecrackerProcess, FirecrackerSpec, LogLevel,
    Logger, NetworkInterface, SnapshotFiles, Vsock,
};
use super::process::ProcessHandle;
use super::storage::VmDisks;
use crate::guest::GuestEndpoint;
use crate::privileged::{self, PrivilegedError, TapDevice};
use crate::spec::NetworkMode;

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Qemu,
    Firecracker,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Firecracker => "firecracker",
        }
    }

    pub fn parse(text: &str) -> Option<BackendKind> {
        match text {
            "qemu" => Some(BackendKind::Qemu),
            "firecracker" => Some(BackendKind::Firecracker),
            _ => None,
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Boot(Box<BootError>),
    #[error(transparent)]
    Firecracker(#[from] FirecrackerError),
    #[error(transparent)]
    Privileged(#[from] PrivilegedError),
    #[error(transparent)]
    AgentMux(#[from] super::agent_mux::AgentMuxError),
    #[error(
        "the Firecracker backend cannot boot guests on this host: {reason}; use the QEMU \
         backend (`--backend qemu`, the default here)"
    )]
    FirecrackerUnusable { reason: String },
    #[error(
        "the Firecracker backend needs the `firecracker` binary on PATH; install it, or use \
         the QEMU backend (`--backend qemu`)"
    )]
    FirecrackerMissing,
    #[error("the VMM of this VM left no process to follow (pid unknown right after start)")]
    NoPid,
    #[error(
        "`--network tap` puts the VM on banger's bridge, which only root can make; run banger \
         as root, or use `--network user` (rootless, with `-p` for ports and `banger \
         ssh-config install` for `ssh NAME.vm`)"
    )]
    TapNeedsRoot,
    #[error("a `tap` VM was launched without a tap on the bridge (a bug in banger)")]
    TapMissing,
    #[error(
        "published ports (`-p`, `[vm] ports`) are QEMU user-mode forwards so far; under \
         Firecracker they need banger's NAT on its bridge, which is not built yet: use \
         `--backend qemu`"
    )]
    PortsNeedQemu,
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Refuses a network mode this process cannot give a VM (`tap` without root); called before
/// anything is made, so a refused VM leaves nothing behind.
pub fn check_network(mode: NetworkMode) -> Result<(), BackendError> {
    match mode {
        NetworkMode::User | NetworkMode::None => Ok(()),
        NetworkMode::Tap if privileged::is_root() => Ok(()),
        NetworkMode::Tap => Err(BackendError::TapNeedsRoot),
    }
}

impl From<BootError> for BackendError {
    fn from(error: BootError) -> BackendError {
        BackendError::Boot(Box::new(error))
    }
}

/// One VM's machine, as every backend needs it.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// The VM's fixed random id (names its tap, its Firecracker `--id`).
    pub id: String,
    /// The guest's hostname (`banger.hostname=`, set by the agent): the VM's name. `None`
    /// leaves the image's.
    pub hostname: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The shared, read-only image.
    pub rootfs: PathBuf,
    /// The VM's writable layer and `/root` work disk.
    pub disks: VmDisks,
    /// Sockets go here (the VM's runtime directory).
    pub run_dir: PathBuf,
    /// The guest's serial console.
    pub console_log: PathBuf,
    /// The VMM's (and its helpers') own messages.
    pub vmm_log: PathBuf,
    /// `User`: QEMU's user-mode network, or Firecracker's tap (it has no user-mode network);
    /// `None`: no network device; `Tap`: the caller's tap on banger's bridge ([`Self::tap`]),
    /// root only ([`check_network`]).
    pub network: NetworkMode,
    /// The loopback port forwarded to the guest's port 22 (QEMU's user-mode network).
    pub ssh_port: u16,
    /// Published ports (`-p`): QEMU host forwards in user mode (DNAT on the bridge, made by
    /// the caller, in tap mode).
    pub ports: Vec<crate::spec::PortForward>,
    /// `Tap`: the VM's tap on banger's bridge and its addresses (made by the caller).
    pub tap: Option<super::boot::TapAttachment>,
}

/// Where the agent listens, in a form the scratch file can hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentAddress {
    Vsock { uds_path: PathBuf, port: u32 },
    Serial { path: PathBuf },
}

impl AgentAddress {
    pub fn endpoint(&self) -> GuestEndpoint {
        match self {
            AgentAddress::Vsock { uds_path, port } => GuestEndpoint::HybridVsock {
                uds_path: uds_path.clone(),
                port: *port,
            },
            AgentAddress::Serial { path } => GuestEndpoint::Serial { path: path.clone() },
        }
    }

    fn of(endpoint: GuestEndpoint) -> AgentAddress {
        match endpoint {
            GuestEndpoint::HybridVsock { uds_path, port } => AgentAddress::Vsock { uds_path, port },
            GuestEndpoint::Serial { path } | GuestEndpoint::Unix { path } => {
                AgentAddress::Serial { path }
            }
        }
    }
}

/// A running VM's momentary handles: what the daemon keeps in memory and in the VM's
/// scratch file, and all it needs to reach or stop the VM after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launched {
    pub backend: BackendKind,
    /// QEMU or Firecracker.
    pub vmm: ProcessHandle,
    /// Processes that live and die with the VMM (`vhost-device-vsock`).
    pub helpers: Vec<ProcessHandle>,
    /// QMP, or Firecracker's API socket.
    pub control_socket: PathBuf,
    pub agent: AgentAddress,
    /// Where the guest's sshd is reached from the host; `None` without a network. (Scratch
    /// files written before VMs could have none hold plain values, which read as `Some`.)
    #[serde(default)]
    pub ssh_host: Option<String>,
    #[serde(default)]
    pub ssh_port: Option<u16>,
    /// The host tap (Firecracker), deleted with the VM's run.
    pub tap: Option<String>,
}

/// One VMM.
pub trait VmmBackend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Starts the machine; returns as soon as the VMM runs (the guest is still booting).
    /// On failure nothing it started is left running.
    fn launch(
        &self,
        spec: &MachineSpec,
    ) -> impl Future<Output = Result<Launched, BackendError>> + Send;

    /// Makes the VMM quit: politely for `grace`, then by force. The guest has had its chance
    /// to power off through its agent before this is called. Returns when it is gone.
    fn halt(&self, launched: &Launched, grace: Duration) -> impl Future<Output = ()> + Send;
}

/// QEMU `microvm`.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    pub binary: String,
    pub accel: Accel,
    pub transport: AgentTransport,
    pub vsock_daemon: Option<PathBuf>,
    /// banger itself, run as the serial agent's multiplexer (`agent_mux.rs`) beside each VM
    /// on the serial transport; `None`: the VM's chardev serves one client at a time.
    pub serial_mux: Option<PathBuf>,
}

impl QemuBackend {
    /// QEMU as banger finds it: `$BANGER_QEMU` or `qemu-system-x86_64`, vsock when
    /// `vhost-device-vsock` is installed, virtio-serial (multiplexed by this very program,
    /// which is banger) otherwise.
    pub fn from_env(accel: Accel) -> QemuBackend {
        let vsock_daemon = super::vsock::find_binary();
        QemuBackend {
            binary: super::qemu::binary(),
            accel,
            transport: if vsock_daemon.is_some() {
                AgentTransport::Vsock
            } else {
                AgentTransport::Serial
            },
            vsock_daemon,
            serial_mux: this_program(),
        }
    }

    /// The boot of `spec` (pure): user-mode networking for `user`, the bridge tap for `tap`,
    /// no network device for `none`.
    pub fn boot_spec(&self, spec: &MachineSpec) -> BootSpec {
        let network = spec.network == NetworkMode::User;
        BootSpec {
            qemu_binary: self.binary.clone(),
            accel: self.accel.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            rootfs: spec.rootfs.clone(),
            transport: self.transport,
            vsock_daemon: self.vsock_daemon.clone(),
            extra_cmdline: hostname_words(spec),
            writable: super::boot::WritableLayer::VmDisks(spec.disks.clone()),
            forwards: if network {
                std::iter::once(crate::spec::PortForward::loopback_tcp(spec.ssh_port, 22))
                    .chain(spec.ports.iter().copied())
                    .collect()
            } else {
                Vec::new()
            },
            network,
            tap: match spec.network {
                NetworkMode::Tap => spec.tap.clone(),
                NetworkMode::User | NetworkMode::None => None,
            },
            dir: spec.run_dir.clone(),
            serial_log: spec.console_log.clone(),
        }
    }
}

/// The kernel command-line word that names the guest after its VM, if it is named.
fn hostname_words(spec: &MachineSpec) -> Vec<String> {
    spec.hostname
        .iter()
        .map(|name| format!("banger.hostname={name}"))
        .collect()
}

/// This program's binary, to run again as a helper: its path, or `/proc/self/exe` once the
/// path no longer holds it (banger was upgraded while the daemon ran).
fn this_program() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .filter(|path| path.is_file())
        .or_else(|| Some(PathBuf::from("/proc/self/exe")))
}

impl VmmBackend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    async fn launch(&self, spec: &MachineSpec) -> Result<Launched, BackendError> {
        self.launch_from(spec, None).await
    }

    async fn halt(&self, launched: &Launched, grace: Duration) {
        if launched.vmm.is_alive()
            && let Ok(mut qmp) = super::qmp::Qmp::connect(&launched.control_socket).await
        {
            let _ = qmp.quit().await;
        }
        if !launched.vmm.wait_gone(grace).await {
            launched.vmm.terminate(grace).await;
        }
    }
}

impl QemuBackend {
    /// This backend as a VM that is saved or restored needs it: the agent over virtio-serial,
    /// since QEMU cannot migrate a vhost-user vsock device (`snapshot.rs`).
    pub fn for_snapshots(&self) -> QemuBackend {
        QemuBackend {
            transport: AgentTransport::Serial,
            vsock_daemon: None,
            ..self.clone()
        }
    }

    /// [`VmmBackend::launch`], restoring the memory snapshot `state` instead of booting
    /// (a backend from [`QemuBackend::for_snapshots`], and disks copied from the snapshot).
    pub async fn launch_restored(
        &self,
        spec: &MachineSpec,
        state: &Path,
    ) -> Result<Launched, BackendError> {
        self.launch_from(spec, Some(state)).await
    }

    async fn launch_from(
        &self,
        spec: &MachineSpec,
        restore: Option<&Path>,
    ) -> Result<Launched, BackendError> {
        check_network(spec.network)?;
        let network = spec.network == NetworkMode::User;
        let tap = match (spec.network, &spec.tap) {
            (NetworkMode::Tap, None) => return Err(BackendError::TapMissing),
            (NetworkMode::Tap, Some(tap)) => Some(tap),
            _ => None,
        };
        let boot = self.boot_spec(spec);
        let vm = match restore {
            None => BootedVm::start_logged(&boot, Some(&spec.vmm_log)).await?,
            Some(state) => BootedVm::restore_logged(&boot, state, Some(&spec.vmm_log)).await?,
        };
        let control_socket = vm.qemu().qmp_socket().to_owned();
        let (qemu, vsock, endpoint) = vm.detach();
        let vmm = match qemu {
            Some(qemu) => qemu,
            None => {
                if let Some(vsock) = vsock {
                    vsock.kill().await;
                }
                return Err(BackendError::NoPid);
            }
        };
        let mut helpers: Vec<ProcessHandle> = vsock.into_iter().collect();
        let mut agent = AgentAddress::of(endpoint);
        if let (AgentAddress::Serial { path: chardev }, Some(program)) = (&agent, &self.serial_mux)
        {
            match super::agent_mux::spawn(program, chardev, &spec.run_dir, &spec.vmm_log).await {
                Ok((mux, listen)) => {
                    helpers.push(mux);
                    agent = AgentAddress::Serial { path: listen };
                }
                Err(error) => {
                    vmm.kill().await;
                    return Err(error.into());
                }
            }
        }
        Ok(Launched {
            backend: BackendKind::Qemu,
            vmm,
            helpers,
            control_socket,
            agent,
            ssh_host: match tap {
                Some(tap) => Some(tap.address.to_string()),
                None => network.then(|| "127.0.0.1".to_owned()),
            },
            ssh_port: if tap.is_some() {
                Some(22)
            } else {
                network.then_some(spec.ssh_port)
            },
            tap: tap.map(|tap| tap.tap.clone()),
        })
    }
}

/// Firecracker (needs KVM that works; networking through a tap, so root).
#[derive(Debug, Clone)]
pub struct FirecrackerBackend {
    pub binary: PathBuf,
}

/// The MAC of a Firecracker VM's interface: locally administered, from its id.
pub fn guest_mac(vm_id: &str) -> super::firecracker::MacAddr {
    let hash = blake3::hash(vm_id.as_bytes());
    let bytes = hash.as_bytes();
    super::firecracker::MacAddr([0x06, 0x00, bytes[0], bytes[1], bytes[2], bytes[3]])
}

impl FirecrackerBackend {
    /// The Firecracker spec of `spec`, its `eth0` on the tap `tap` whose guest side the
    /// kernel's `ip=` word configures, or with no network interface (and no `ip=`) when `tap`
    /// is `None` (pure).
    pub fn firecracker_spec(
        &self,
        spec: &MachineSpec,
        tap: Option<(&str, &str)>,
    ) -> FirecrackerSpec {
        let mut extra: Vec<String> = VmDisks::cmdline()
            .iter()
            .map(|word| (*word).to_owned())
            .collect();
        if let Some((_, ip_word)) = tap {
            extra.push(ip_word.to_owned());
        }
        extra.extend(hostname_words(spec));
        FirecrackerSpec {
            binary: self.binary.clone(),
            id: spec.id.clone(),
            jailer: None,
            api_socket: spec.run_dir.join("firecracker.sock"),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            boot_args: super::boot::kernel_cmdline(&Accel::Kvm, None, &extra),
            // Named relative to the run directory, where Firecracker runs: a snapshot records
            // these names, so a VM restored from it in its own run directory opens its own
            // disks and makes its own vsock socket ([`link_drives`] makes the links).
            drives: vec![
                Drive::root(ROOTFS_LINK),
                Drive::writable("overlay", OVERLAY_LINK),
                Drive::writable("work", WORK_LINK),
            ],
            network_interfaces: tap
                .map(|(tap, _)| NetworkInterface {
                    id: "eth0".to_owned(),
                    tap: tap.to_owned(),
                    guest_mac: Some(guest_mac(&spec.id)),
                })
                .into_iter()
                .collect(),
            vsock: Some(Vsock::new(VSOCK_SOCKET)),
            serial_log: Some(spec.console_log.clone()),
            logger: Some(Logger {
                path: spec.vmm_log.clone(),
                level: LogLevel::Warning,
            }),
            work_dir: Some(spec.run_dir.clone()),
        }
    }

    /// [`VmmBackend::launch`], loading the Firecracker snapshot `files` instead of booting
    /// (the VM's disks copied from the snapshot's). The guest is the saved one: it still has
    /// the saved VM's address and MAC until the caller re-identifies it.
    pub async fn launch_restored(
        &self,
        spec: &MachineSpec,
        files: &SnapshotFiles,
    ) -> Result<Launched, BackendError> {
        self.launch_from(spec, Some(files)).await
    }

    async fn launch_from(
        &self,
        spec: &MachineSpec,
        restore: Option<&SnapshotFiles>,
    ) -> Result<Launched, BackendError> {
        check_network(spec.network)?;
        if !spec.ports.is_empty() && spec.network != NetworkMode::Tap {
            return Err(BackendError::PortsNeedQemu);
        }
        link_drives(spec)?;
        // `user`: a point-to-point /30 tap of its own (Firecracker has no user-mode network);
        // `tap`: the caller's tap on banger's bridge.
        let addresses = privileged::tap_addresses(&spec.id);
        let own_tap = match spec.network {
            NetworkMode::User => Some(TapDevice::create(
                &privileged::tap_name(&spec.id),
                &addresses,
                nix::unistd::getuid().as_raw(),
            )?),
            NetworkMode::None | NetworkMode::Tap => None,
        };
        let attached: Option<(String, String, String)> = match (spec.network, &spec.tap, &own_tap) {
            (NetworkMode::Tap, None, _) => return Err(BackendError::TapMissing),
            (NetworkMode::Tap, Some(tap), _) => Some((
                tap.tap.clone(),
                tap.guest_cmdline(),
                tap.address.to_string(),
            )),
            (_, _, Some(own)) => Some((
                own.name().to_owned(),
                addresses.guest_cmdline("eth0"),
                addresses.guest.to_string(),
            )),
            _ => None,
        };
        let delete_tap = || {
            if let Some(tap) = &own_tap {
                let _ = TapDevice::delete_by_name(tap.name());
            }
        };
        let fc_spec = self.firecracker_spec(
            spec,
            attached
                .as_ref()
                .map(|(tap, ip_word, _)| (tap.as_str(), ip_word.as_str())),
        );
        let started = match restore {
            None => FirecrackerProcess::launch(&fc_spec).await,
            Some(files) => FirecrackerProcess::restore(&fc_spec, files).await,
        };
        let process = match started {
            Ok(process) => process,
            Err(error) => {
                delete_tap();
                return Err(error.into());
            }
        };
        let control_socket = process.api_socket().to_owned();
        let uds_path = process
            .vsock_uds_path()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| spec.run_dir.join(VSOCK_SOCKET));
        let Some(vmm) = process.detach() else {
            delete_tap();
            return Err(BackendError::NoPid);
        };
        Ok(Launched {
            backend: BackendKind::Firecracker,
            vmm,
            helpers: Vec::new(),
            control_socket,
            agent: AgentAddress::Vsock {
                uds_path,
                port: crate::assets::AGENT_VSOCK_PORT,
            },
            ssh_host: attached.as_ref().map(|(_, _, guest)| guest.clone()),
            ssh_port: attached.as_ref().map(|_| 22),
            tap: attached.map(|(tap, _, _)| tap),
        })
    }
}

/// The names, in a Firecracker VM's run directory, of its drives and its vsock socket.
const ROOTFS_LINK: &str = "rootfs.ext4";
const OVERLAY_LINK: &str = "overlay.ext4";
const WORK_LINK: &str = "work.ext4";
const VSOCK_SOCKET: &str = "vsock.sock";

/// Links the run directory's drive names ([`FirecrackerBackend::firecracker_spec`]) to the
/// image and the VM's disks, replacing links a previous run left.
fn link_drives(spec: &MachineSpec) -> Result<(), BackendError> {
    for (name, target) in [
        (ROOTFS_LINK, &spec.rootfs),
        (OVERLAY_LINK, &spec.disks.overlay),
        (WORK_LINK, &spec.disks.work),
    ] {
        let link = spec.run_dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link).map_err(|source| BackendError::Io {
            what: "cannot link the VM's drive at",
            path: link,
            source,
        })?;
    }
    Ok(())
}

impl VmmBackend for FirecrackerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    async fn launch(&self, spec: &MachineSpec) -> Result<Launched, BackendError> {
        self.launch_from(spec, None).await
    }

    async fn halt(&self, launched: &Launched, grace: Duration) {
        if launched.vmm.is_alive() {
            let api = ApiClient::new(&launched.control_socket).with_timeout(grace);
            let _ = api.send(&ApiRequest::send_ctrl_alt_del()).await;
        }
        if !launched.vmm.wait_gone(grace).await {
            launched.vmm.kill().await;
        }
    }
}

/// The backend a VM uses, chosen at creation and recorded with it.
#[derive(Debug, Clone)]
pub enum Backend {
    Qemu(QemuBackend),
    Firecracker(FirecrackerBackend),
}

impl Backend {
    /// The backend for `kind` on this host (`None`: the best one here — Firecracker where
    /// KVM works and it is installed and banger runs as root, QEMU otherwise). An explicit
    /// Firecracker that cannot boot here is refused with the reason.
    pub fn choose(kind: Option<BackendKind>, accel: &Accel) -> Result<Backend, BackendError> {
        let firecracker = crate::env::find_program("firecracker");
        match kind {
            Some(BackendKind::Qemu) => Ok(Backend::Qemu(QemuBackend::from_env(accel.clone()))),
            Some(BackendKind::Firecracker) => match (accel, firecracker) {
                (Accel::Tcg { reason }, _) => Err(BackendError::FirecrackerUnusable {
                    reason: reason.clone(),
                }),
                (Accel::Kvm, None) => Err(BackendError::FirecrackerMissing),
                (Accel::Kvm, Some(binary)) => {
                    Ok(Backend::Firecracker(FirecrackerBackend { binary }))
                }
            },
            None => match (accel, firecracker) {
                (Accel::Kvm, Some(binary)) if privileged::is_root() => {
                    Ok(Backend::Firecracker(FirecrackerBackend { binary }))
                }
                _ => Ok(Backend::Qemu(QemuBackend::from_env(accel.clone()))),
            },
        }
    }

    /// The backend that runs a VM recorded with `kind` (for stopping it: no host checks).
    pub fn for_recorded(kind: BackendKind, accel: &Accel) -> Backend {
        match kind {
            BackendKind::Qemu => Backend::Qemu(QemuBackend::from_env(accel.clone())),
            BackendKind::Firecracker => Backend::Firecracker(FirecrackerBackend {
                binary: crate::env::find_program("firecracker")
                    .unwrap_or_else(|| PathBuf::from("firecracker")),
            }),
        }
    }
}

impl VmmBackend for Backend {
    fn kind(&self) -> BackendKind {
        match self {
            Backend::Qemu(backend) => backend.kind(),
            Backend::Firecracker(backend) => backend.kind(),
        }
    }

    async fn launch(&self, spec: &MachineSpec) -> Result<Launched, BackendError> {
        match self {
            Backend::Qemu(backend) => backend.launch(spec).await,
            Backend::Firecracker(backend) => backend.launch(spec).await,
        }
    }

    async fn halt(&self, launched: &Launched, grace: Duration) {
        match self {
            Backend::Qemu(backend) => backend.halt(launched, grace).await,
            Backend::Firecracker(backend) => backend.halt(launched, grace).await,
        }
    }
}

/// What the VMM of a guest whose agent never answered says of it, in one line: whether the
/// VMM still answers on its control socket within a second (a QEMU whose main loop is stuck,
/// say on a vhost-user device, does not), the state it reports, and which helper processes
/// are gone. For the error that a guest did not come up.
pub async fn diagnose(launched: &Launched) -> String {
    const PATIENCE: Duration = Duration::from_secs(1);
    let vmm = match launched.backend {
        BackendKind::Qemu => "QEMU",
        BackendKind::Firecracker => "Firecracker",
    };
    // `None`: no answer within `PATIENCE`.
    let state: Option<Result<String, String>> = match launched.backend {
        BackendKind::Qemu => {
            let asked = async {
                let mut qmp = super::qmp::Qmp::connect(&launched.control_socket).await?;
                qmp.status().await
            };
            tokio::time::timeout(PATIENCE, asked)
                .await
                .ok()
                .map(|answer| answer.map_err(|error| error.to_string()))
        }
        BackendKind::Firecracker => {
            let api = ApiClient::new(&launched.control_socket).with_timeout(PATIENCE);
            match api.get_json("/").await {
                Ok(info) => Some(Ok(info["state"].as_str().unwrap_or("unknown").to_owned())),
                Err(FirecrackerError::ApiTimeout { .. }) => None,
                Err(error) => Some(Err(error.to_string())),
            }
        }
    };
    let mut said = match state {
        Some(Ok(state)) => format!("{vmm} reports the guest `{state}`"),
        Some(Err(error)) => format!("{vmm}'s control socket: {error}"),
        None => format!(
            "{vmm} did not answer on its control socket within {} s (the VMM itself is stuck)",
            PATIENCE.as_secs()
        ),
    };
    for helper in launched.helpers.iter().filter(|helper| !helper.is_alive()) {
        said.push_str(&format!("; its helper process {} is gone", helper.pid));
    }
    said
}

/// Whether a running QEMU VM's agent is behind a multiplexer that is gone (killed by hand:
/// `pkill banger` takes it with the daemon), so that nothing reaches the agent.
pub fn agent_mux_gone(launched: &Launched) -> bool {
    let AgentAddress::Serial { path } = &launched.agent else {
        return false;
    };
    // A serial VM's only helper is its multiplexer.
    launched.backend == BackendKind::Qemu
        && path.file_name() == Some(std::ffi::OsStr::new(super::agent_mux::SOCKET_NAME))
        && !launched.helpers.iter().any(ProcessHandle::is_alive)
}

/// Starts the serial agent's multiplexer again for a VM whose multiplexer is gone
/// ([`agent_mux_gone`]); returns the handles with the new helper, or `None` when
/// `launched` needs none.
pub async fn revive_agent_mux(
    launched: &Launched,
    vmm_log: &Path,
) -> Result<Option<Launched>, BackendError> {
    if !agent_mux_gone(launched) {
        return Ok(None);
    }
    let (AgentAddress::Serial { path }, Some(program)) = (&launched.agent, this_program()) else {
        return Ok(None);
    };
    let run_dir = path.parent().unwrap_or(Path::new("/"));
    let chardev = run_dir.join(super::boot::AGENT_SERIAL_SOCKET);
    let (mux, _) = super::agent_mux::spawn(&program, &chardev, run_dir, vmm_log).await?;
    Ok(Some(Launched {
        helpers: vec![mux],
        ..launched.clone()
    }))
}

/// Stops what a launch left besides the VMM (helpers, the tap) once the VMM is gone.
pub async fn release(launched: &Launched) {
    for helper in &launched.helpers {
        helper.terminate(Duration::from_secs(2)).await;
    }
    if let Some(tap) = &launched.tap {
        let _ = TapDevice::delete_by_name(tap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineSpec {
        MachineSpec {
            id: "k3j9x2p0qa7m".into(),
            hostname: Some("box".into()),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/store/vmlinux".into(),
            initrd: Some("/store/initrd".into()),
            rootfs: "/store/rootfs.ext4".into(),
            disks: VmDisks::in_dir(Path::new("/state/vms/box")),
            run_dir: "/run/banger/vms/box".into(),
            console_log: "/state/vms/box/console.log".into(),
            vmm_log: "/state/vms/box/vmm.log".into(),
            network: NetworkMode::User,
            ssh_port: 40022,
            ports: Vec::new(),
            tap: None,
        }
    }

    #[test]
    fn published_ports_become_qemu_host_forwards_after_ssh() {
        let spec = MachineSpec {
            ports: vec![
                crate::spec::PortForward::parse("18080:8080").unwrap(),
                crate::spec::PortForward::parse("0.0.0.0:5353:53/udp").unwrap(),
            ],
            ..machine()
        };
        let argv = qemu_argv(&spec);
        assert!(
            argv.windows(2).any(|pair| pair
                == [
                    "-netdev",
                    "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:18080-:8080,\
                     hostfwd=udp:0.0.0.0:5353-:53"
                ]),
            "{argv:?}"
        );
    }

    fn qemu() -> QemuBackend {
        QemuBackend {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg {
                reason: "test".into(),
            },
            transport: AgentTransport::Serial,
            vsock_daemon: None,
            serial_mux: None,
        }
    }

    /// The QEMU argv of `machine`, as a launch would run it (virtio-serial agent).
    fn qemu_argv(machine: &MachineSpec) -> Vec<String> {
        qemu()
            .boot_spec(machine)
            .qemu_spec(
                Some(2_000_000),
                None,
                Some(machine.run_dir.join(crate::vm::boot::AGENT_SERIAL_SOCKET)),
                Some(&machine.vmm_log),
            )
            .argv()
    }

    #[test]
    fn a_qemu_machine_with_user_networking_forwards_ssh_and_tells_the_guest_its_address() {
        let argv = qemu_argv(&machine());
        assert!(
            argv.windows(2)
                .any(|pair| pair == ["-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22"]),
            "{argv:?}"
        );
        assert!(
            argv.iter()
                .any(|arg| arg == "virtio-net-device,netdev=net0")
        );
        let append = argv[argv.iter().position(|arg| arg == "-append").unwrap() + 1].clone();
        assert!(append.contains(crate::vm::boot::USER_NET_IP), "{append}");
        assert!(append.contains(" banger.hostname=box"), "{append}");
    }

    #[test]
    fn a_qemu_machine_without_network_has_no_network_device_and_no_address() {
        let machine = MachineSpec {
            network: NetworkMode::None,
            ..machine()
        };
        insta::assert_snapshot!(qemu_argv(&machine).join("\n"), @r#"
        qemu-system-x86_64
        -nodefaults
        -no-user-config
        -nographic
        -no-reboot
        -machine
        microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on
        -accel
        tcg,tb-size=128
        -cpu
        max
        -smp
        2
        -m
        512M
        -kernel
        /store/vmlinux
        -initrd
        /store/initrd
        -append
        console=ttyS0 root=/dev/vda rw rootwait panic=-1 quiet tsc_early_khz=2000000 banger.overlay=/dev/vdb banger.work=/dev/vdc banger.hostname=box
        -chardev
        file,id=serial0,path=/state/vms/box/console.log
        -serial
        chardev:serial0
        -qmp
        unix:/run/banger/vms/box/qmp.sock,server=on,wait=off
        -drive
        id=disk0,file=/store/rootfs.ext4,format=raw,if=none,readonly=on,cache=unsafe
        -device
        virtio-blk-device,drive=disk0
        -drive
        id=disk1,file=/state/vms/box/overlay.ext4,format=raw,if=none
        -device
        virtio-blk-device,drive=disk1
        -drive
        id=disk2,file=/state/vms/box/work.ext4,format=raw,if=none
        -device
        virtio-blk-device,drive=disk2
        -device
        virtio-serial-device
        -chardev
        socket,id=agent0,path=/run/banger/vms/box/agent-serial.sock,server=on,wait=off
        -device
        virtserialport,chardev=agent0,name=banger.0
        "#);
    }

    #[test]
    fn tap_networking_needs_root_and_says_the_way_out() {
        match check_network(NetworkMode::Tap) {
            Ok(()) => assert!(privileged::is_root()),
            Err(error) => {
                assert!(!privileged::is_root());
                assert!(error.to_string().contains("only root"), "{error}");
                assert!(error.to_string().contains("--network user"), "{error}");
            }
        }
        check_network(NetworkMode::User).unwrap();
        check_network(NetworkMode::None).unwrap();
    }

    #[test]
    fn the_firecracker_machine_has_the_image_read_only_and_the_vm_disks_writable() {
        let backend = FirecrackerBackend {
            binary: "/usr/bin/firecracker".into(),
        };
        let addresses = privileged::tap_addresses("k3j9x2p0qa7m");
        let ip_word = addresses.guest_cmdline("eth0");
        let spec = backend.firecracker_spec(&machine(), Some(("bgr-k3j9x2p0qa", &ip_word)));
        assert_eq!(spec.drives[0], Drive::root("rootfs.ext4"));
        assert!(spec.drives[1..].iter().all(|drive| !drive.is_read_only));
        // Relative names, resolved where Firecracker runs: the VM's run directory.
        assert_eq!(
            spec.work_dir.as_deref(),
            Some(Path::new("/run/banger/vms/box"))
        );
        assert!(spec.drives.iter().all(|drive| drive.path.is_relative()));
        assert!(spec.boot_args.contains("banger.overlay=/dev/vdb"));
        assert!(spec.boot_args.contains("banger.work=/dev/vdc"));
        assert!(
            spec.boot_args.contains("banger.hostname=box"),
            "{}",
            spec.boot_args
        );
        assert!(
            spec.boot_args
                .contains(&format!("ip={}::{}:", addresses.guest, addresses.host)),
            "{}",
            spec.boot_args
        );
        assert!(!spec.boot_args.contains("tsc_early_khz"), "KVM only");
        assert_eq!(spec.network_interfaces[0].tap, "bgr-k3j9x2p0qa");
        assert_eq!(
            spec.network_interfaces[0].guest_mac,
            Some(guest_mac("k3j9x2p0qa7m")),
            "the MAC is stable across boots"
        );
        spec.configuration_requests()
            .expect("every path fits the API");
    }

    #[test]
    fn the_run_directory_links_name_the_image_and_the_vm_disks_and_replace_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let machine = MachineSpec {
            run_dir: dir.path().join("run"),
            ..machine()
        };
        std::fs::create_dir_all(&machine.run_dir).unwrap();
        std::os::unix::fs::symlink("/elsewhere", machine.run_dir.join("work.ext4")).unwrap();
        link_drives(&machine).unwrap();
        let backend = FirecrackerBackend {
            binary: "/usr/bin/firecracker".into(),
        };
        let spec = backend.firecracker_spec(&machine, None);
        let targets: Vec<PathBuf> = spec
            .drives
            .iter()
            .map(|drive| std::fs::read_link(machine.run_dir.join(&drive.path)).unwrap())
            .collect();
        assert_eq!(
            targets,
            [
                machine.rootfs.clone(),
                machine.disks.overlay.clone(),
                machine.disks.work.clone()
            ]
        );
        // Without its run directory nothing is linked, and the error names the link.
        let missing = MachineSpec {
            run_dir: dir.path().join("gone"),
            ..machine
        };
        let error = link_drives(&missing).unwrap_err().to_string();
        assert!(error.contains("gone/rootfs.ext4"), "{error}");
    }

    #[test]
    fn a_firecracker_machine_without_network_has_no_interface_and_no_address() {
        let backend = FirecrackerBackend {
            binary: "/usr/bin/firecracker".into(),
        };
        let machine = MachineSpec {
            network: NetworkMode::None,
            ..machine()
        };
        let spec = backend.firecracker_spec(&machine, None);
        assert!(spec.network_interfaces.is_empty());
        assert!(!spec.boot_args.contains("ip="), "{}", spec.boot_args);
        let requests = spec
            .configuration_requests()
            .expect("every path fits the API");
        assert!(
            requests
                .iter()
                .all(|request| !request.path.starts_with("/network-interfaces")),
            "{:?}",
            requests
                .iter()
                .map(ApiRequest::describe)
                .collect::<Vec<_>>()
        );
        assert!(
            requests.iter().any(|request| request.path == "/vsock"),
            "the agent is still reachable"
        );
    }

    #[test]
    fn launched_vms_round_trip_through_the_scratch_file_format() {
        let launched = Launched {
            backend: BackendKind::Qemu,
            vmm: ProcessHandle {
                pid: 42,
                start_ticks: 7,
            },
            helpers: vec![ProcessHandle {
                pid: 43,
                start_ticks: 8,
            }],
            control_socket: "/run/x/qmp.sock".into(),
            agent: AgentAddress::Vsock {
                uds_path: "/run/x/vsock.sock".into(),
                port: 1024,
            },
            ssh_host: Some("127.0.0.1".into()),
            ssh_port: Some(40022),
            tap: None,
        };
        let text = serde_json::to_string(&launched).unwrap();
        assert_eq!(serde_json::from_str::<Launched>(&text).unwrap(), launched);
        let sealed = Launched {
            ssh_host: None,
            ssh_port: None,
            ..launched.clone()
        };
        let text = serde_json::to_string(&sealed).unwrap();
        assert_eq!(serde_json::from_str::<Launched>(&text).unwrap(), sealed);
    }

    #[test]
    fn scratch_files_from_before_vms_could_lack_a_network_still_read() {
        let text = r#"{"backend":"qemu","vmm":{"pid":42,"start_ticks":7},"helpers":[],
            "control_socket":"/run/x/qmp.sock","agent":{"kind":"serial","path":"/run/x/s"},
            "ssh_host":"127.0.0.1","ssh_port":40022,"tap":null}"#;
        let launched: Launched = serde_json::from_str(text).unwrap();
        assert_eq!(launched.ssh_host.as_deref(), Some("127.0.0.1"));
        assert_eq!(launched.ssh_port, Some(40022));
    }

    #[test]
    fn an_explicit_firecracker_is_refused_where_only_tcg_works() {
        let tcg = Accel::Tcg {
            reason: "nested PVM".into(),
        };
        let error = Backend::choose(Some(BackendKind::Firecracker), &tcg).unwrap_err();
        assert!(error.to_string().contains("nested PVM"), "{error}");
        assert!(matches!(
            Backend::choose(None, &tcg).unwrap(),
            Backend::Qemu(_)
        ));
    }
}
