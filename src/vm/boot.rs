//! A throwaway boot: a kernel and banger's initramfs on an image, under QEMU `microvm`, with
//! the guest agent reached over vsock (through `vhost-device-vsock`) or the virtio-serial
//! fallback. `banger kernel test` and the boot benchmark run on this; the VM lifecycle
//! (per-VM disks, networking, the daemon) builds on the same pieces.
//!
//! The image is attached read-only and the guest's changes live in an overlay set up by the
//! agent in the initramfs: over a tmpfs, or over the VM's own disks (`storage.rs`), so the
//! stored image is never written and nothing needs copying.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::accel::{self, Accel};
use super::qemu::{Disk, QemuError, QemuProcess, QemuSpec};
use super::vsock::{VhostVsock, VsockError};
use crate::guest::{GuestChannel, GuestEndpoint, GuestError, Ready};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(
        "the guest's agent did not answer within {waited:.1?} over {endpoint} ({reason})\n\
         the console log is {log}; its last lines:\n{tail}",
        log = serial_log.display()
    )]
    AgentTimeout {
        endpoint: String,
        waited: Duration,
        serial_log: PathBuf,
        /// Why the last attempt failed; in the message, not a source, so that the console's
        /// lines end the error instead of having it appended to their last one.
        reason: String,
        tail: String,
    },
    #[error(
        "QEMU exited ({status}) before the guest's agent answered (a kernel panic or \
         power-off in the guest)\nthe console log is {log}; its last lines:\n{tail}",
        log = serial_log.display()
    )]
    GuestDied {
        status: String,
        serial_log: PathBuf,
        tail: String,
    },
    #[error(
        "cannot restore the snapshot {}{}", state.display(),
        vmm_log.as_ref().map(|log| format!(" (QEMU's log: {})", log.display())).unwrap_or_default()
    )]
    Restore {
        state: PathBuf,
        vmm_log: Option<PathBuf>,
        #[source]
        source: super::snapshot::SnapshotError,
    },
    #[error("a command in the guest failed (console log: {log})", log = serial_log.display())]
    Command {
        serial_log: PathBuf,
        #[source]
        source: GuestError,
    },
}

/// QEMU's socket for the agent's virtio-serial port, in the VM's run directory.
pub const AGENT_SERIAL_SOCKET: &str = "agent-serial.sock";

/// How the host reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentTransport {
    /// Hybrid vsock through `vhost-device-vsock`.
    Vsock,
    /// The virtio-serial port `banger.0`, multiplexed by the agent.
    Serial,
}

impl std::fmt::Display for AgentTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentTransport::Vsock => "vsock",
            AgentTransport::Serial => "virtio-serial",
        })
    }
}

/// Everything a throwaway boot needs.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub qemu_binary: String,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The image's `rootfs.ext4`; attached read-only.
    pub rootfs: PathBuf,
    pub transport: AgentTransport,
    /// `vhost-device-vsock`, for [`AgentTransport::Vsock`].
    pub vsock_daemon: Option<PathBuf>,
    /// Appended to the kernel command line (`banger.init=agent`, `init=…`).
    pub extra_cmdline: Vec<String>,
    /// Where the guest's changes to the image go.
    pub writable: WritableLayer,
    /// Host ports forwarded to the guest through QEMU's user-mode network.
    pub forwards: Vec<crate::spec::PortForward>,
    /// A user-mode network device even without forwards (the guest reaches what the host
    /// reaches). Forwards imply it.
    pub network: bool,
    /// A tap on banger's bridge instead of the user-mode network (then `network` and
    /// `forwards` are ignored).
    pub tap: Option<TapAttachment>,
    /// Sockets go here; the caller owns and removes it.
    pub dir: PathBuf,
    /// The serial console is written here (replaced if it exists).
    pub serial_log: PathBuf,
}

impl BootSpec {
    /// QEMU's description of this boot (pure): `vhost_vsock` is the vsock daemon's socket
    /// ([`AgentTransport::Vsock`]), `agent_serial` the virtio-serial one
    /// ([`AgentTransport::Serial`]). Without `network` or forwards the guest gets no network
    /// device and no `ip=`.
    pub fn qemu_spec(
        &self,
        tsc_khz: Option<u64>,
        vhost_vsock: Option<PathBuf>,
        agent_serial: Option<PathBuf>,
        stderr_log: Option<&Path>,
    ) -> QemuSpec {
        let mut extra = Vec::new();
        let mut disks = vec![Disk {
            path: self.rootfs.clone(),
            read_only: true,
            snapshot: false,
        }];
        match &self.writable {
            WritableLayer::VmDisks(vm_disks) => {
                for path in [&vm_disks.overlay, &vm_disks.work] {
                    disks.push(Disk {
                        path: path.clone(),
                        read_only: false,
                        snapshot: false,
                    });
                }
                extra.extend(
                    super::storage::VmDisks::cmdline()
                        .iter()
                        .map(|word| (*word).to_owned()),
                );
            }
            WritableLayer::Disk(path) => {
                disks.push(Disk {
                    path: path.clone(),
                    read_only: false,
                    snapshot: false,
                });
                extra.push("banger.overlay=/dev/vdb".to_owned());
            }
            WritableLayer::Memory => extra.push("banger.overlay=tmpfs".to_owned()),
        }
        let network = self.tap.is_none() && (self.network || !self.forwards.is_empty());
        if network {
            extra.push(USER_NET_IP.to_owned());
        }
        if let Some(tap) = &self.tap {
            extra.push(tap.guest_cmdline());
        }
        extra.extend(self.extra_cmdline.iter().cloned());
        QemuSpec {
            binary: self.qemu_binary.clone(),
            accel: self.accel.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: kernel_cmdline(&self.accel, tsc_khz, &extra),
            disks,
            net: match &self.tap {
                Some(tap) => Some(super::qemu::QemuNet::Tap {
                    ifname: tap.tap.clone(),
                    mac: tap.mac.clone(),
                }),
                None => network.then(|| {
                    super::qemu::QemuNet::User(super::qemu::UserNet {
                        forwards: self.forwards.clone(),
                    })
                }),
            },
            vhost_vsock,
            agent_serial,
            serial_log: self.serial_log.clone(),
            qmp_socket: self.dir.join("qmp.sock"),
            incoming: None,
            stderr_log: stderr_log.map(Path::to_path_buf),
        }
    }
}

/// Where a boot's writes to its (read-only) image go: the upper layer of the overlay the
/// agent's init mounts over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WritableLayer {
    /// A tmpfs: the changes vanish at power-off.
    Memory,
    /// A VM's own writable layer, plus its work disk on `/root`.
    VmDisks(super::storage::VmDisks),
    /// One blank ext4 disk for the layer and nothing on `/root` (a builder VM, whose every
    /// change, `/root` included, belongs to the image it builds).
    Disk(PathBuf),
}

/// A VM's place on banger's bridge: its tap, its MAC, and the addresses the guest configures
/// itself with from the kernel's `ip=` (the agent does it before init runs). Only the tap's
/// name outlives the launch (in [`crate::vm::backend::Launched`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapAttachment {
    pub tap: String,
    /// `52:54:00:…`, from the VM's id: stable across boots, distinct between VMs.
    pub mac: String,
    pub address: std::net::Ipv4Addr,
    pub gateway: std::net::Ipv4Addr,
    pub netmask: std::net::Ipv4Addr,
    /// The guest's resolver: the daemon's DNS server on the bridge.
    pub dns: std::net::Ipv4Addr,
}

impl TapAttachment {
    /// The kernel's `ip=` word for `eth0`.
    pub fn guest_cmdline(&self) -> String {
        format!(
            "ip={}::{}:{}::eth0:off:{}",
            self.address, self.gateway, self.netmask, self.dns
        )
    }

    /// A MAC in QEMU's locally used range, from `vm_id`.
    pub fn mac_for(vm_id: &str) -> String {
        let hash = blake3::hash(vm_id.as_bytes());
        let bytes = hash.as_bytes();
        format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            bytes[0], bytes[1], bytes[2]
        )
    }
}

/// The guest's address on QEMU's user-mode network (always 10.0.2.0/24: the gateway is
/// .2, the DNS forwarder .3), for the agent's or the image's network bring-up.
pub const USER_NET_IP: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off:10.0.2.3";

/// The kernel command line for a boot (the overlay words come from [`BootSpec::vm_disks`]).
///
/// `tsc_early_khz` matters only under TCG: without it the kernel calibrates the TSC against
/// an emulated timer, which under TCG takes seconds and can pick a wildly wrong rate.
pub fn kernel_cmdline(accel: &Accel, tsc_khz: Option<u64>, extra: &[String]) -> String {
    let mut words = vec![
        "console=ttyS0".to_owned(),
        "root=/dev/vda".to_owned(),
        // The image itself is always mounted read-only under the overlay; `rw` is the
        // overlay's mode.
        "rw".to_owned(),
        "rootwait".to_owned(),
        "panic=-1".to_owned(),
        "quiet".to_owned(),
    ];
    if let (true, Some(khz)) = (accel.is_tcg(), tsc_khz) {
        words.push(format!("tsc_early_khz={khz}"));
    }
    words.extend(extra.iter().cloned());
    words.join(" ")
}

/// A booted (or booting) throwaway VM.
#[derive(Debug)]
pub struct BootedVm {
    qemu: QemuProcess,
    vsock: Option<VhostVsock>,
    endpoint: GuestEndpoint,
    serial_log: PathBuf,
    started: Instant,
}

impl BootedVm {
    /// Starts the vsock daemon (if used) and QEMU; returns as soon as QEMU runs. Both die
    /// with the returned value.
    pub async fn start(spec: &BootSpec) -> Result<BootedVm, BootError> {
        BootedVm::start_logged(spec, None).await
    }

    /// [`BootedVm::start`], with QEMU's and the vsock daemon's stderr appended to
    /// `stderr_log` so that they can be [detached](BootedVm::detach) to outlive this process.
    pub async fn start_logged(
        spec: &BootSpec,
        stderr_log: Option<&Path>,
    ) -> Result<BootedVm, BootError> {
        BootedVm::launch(spec, stderr_log, None).await
    }

    /// [`BootedVm::start_logged`], restoring the memory snapshot `state` (`snapshot.rs`)
    /// instead of booting: returns once the restored guest runs. `spec` must describe the
    /// machine the snapshot was saved from, with the virtio-serial transport; its disks are
    /// copies of the ones saved with it.
    pub async fn restore_logged(
        spec: &BootSpec,
        state: &Path,
        stderr_log: Option<&Path>,
    ) -> Result<BootedVm, BootError> {
        BootedVm::launch(spec, stderr_log, Some(state)).await
    }

    async fn launch(
        spec: &BootSpec,
        stderr_log: Option<&Path>,
        restore: Option<&Path>,
    ) -> Result<BootedVm, BootError> {
        let started = Instant::now();
        let serial_log = spec.serial_log.clone();
        let (vsock, endpoint, agent_serial) = match spec.transport {
            AgentTransport::Vsock => {
                let binary = spec
                    .vsock_daemon
                    .clone()
                    .or_else(super::vsock::find_binary)
                    .ok_or_else(|| VsockError::NotInstalled {
                        binary: "vhost-device-vsock".into(),
                    })?;
                let daemon = VhostVsock::spawn(&binary, &spec.dir, stderr_log).await?;
                let endpoint = GuestEndpoint::HybridVsock {
                    uds_path: daemon.uds_path().to_owned(),
                    port: crate::assets::AGENT_VSOCK_PORT,
                };
                (Some(daemon), endpoint, None)
            }
            AgentTransport::Serial => {
                let socket = spec.dir.join(AGENT_SERIAL_SOCKET);
                let endpoint = GuestEndpoint::Serial {
                    path: socket.clone(),
                };
                (None, endpoint, Some(socket))
            }
        };
        let mut qemu_spec = spec.qemu_spec(
            accel::host_tsc_khz(),
            vsock
                .as_ref()
                .map(|daemon| daemon.vhost_socket().to_owned()),
            agent_serial,
            stderr_log,
        );
        if restore.is_some() {
            qemu_spec.incoming = Some(spec.dir.join("incoming.sock"));
        }
        let qemu = QemuProcess::spawn(&qemu_spec).await?;
        if let (Some(state), Some(incoming)) = (restore, &qemu_spec.incoming) {
            // On failure `qemu` is dropped, and with it the QEMU process.
            let took = super::snapshot::restore(qemu.qmp_socket(), incoming, state)
                .await
                .map_err(|source| BootError::Restore {
                    state: state.to_owned(),
                    vmm_log: stderr_log.map(Path::to_path_buf),
                    source,
                })?;
            tracing::info!(
                state = %state.display(),
                load_ms = took.as_millis() as u64,
                running_ms = started.elapsed().as_millis() as u64,
                "snapshot restored"
            );
        }
        Ok(BootedVm {
            qemu,
            vsock,
            endpoint,
            serial_log,
            started,
        })
    }

    /// Hands QEMU and the vsock daemon over to handles that outlive this process (started
    /// with [`BootedVm::start_logged`] and a log): `(qemu, vsock daemon, agent endpoint)`.
    pub fn detach(
        self,
    ) -> (
        Option<super::process::ProcessHandle>,
        Option<super::process::ProcessHandle>,
        GuestEndpoint,
    ) {
        let qemu = self.qemu.detach();
        let vsock = self.vsock.and_then(VhostVsock::detach);
        (qemu, vsock, self.endpoint)
    }

    /// When QEMU was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn transport(&self) -> AgentTransport {
        match self.endpoint {
            GuestEndpoint::Serial { .. } => AgentTransport::Serial,
            _ => AgentTransport::Vsock,
        }
    }

    pub fn endpoint(&self) -> &GuestEndpoint {
        &self.endpoint
    }

    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    pub fn qemu(&self) -> &QemuProcess {
        &self.qemu
    }

    /// Waits until the agent answers `Hello`, or QEMU exits, or `deadline` passes.
    pub async fn wait_agent(
        &mut self,
        deadline: Instant,
    ) -> Result<(GuestChannel, Ready), BootError> {
        let endpoint = self.endpoint.clone();
        let ready = endpoint.wait_ready(deadline);
        tokio::pin!(ready);
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                result = &mut ready => {
                    return result.map_err(|source| BootError::AgentTimeout {
                        endpoint: endpoint.to_string(),
                        waited: self.started.elapsed(),
                        serial_log: self.serial_log.clone(),
                        tail: console_tail(&self.serial_log, 30),
                        reason: crate::error::error_chain(&source),
                    });
                }
                _ = poll.tick() => {
                    if let Some(status) = self.qemu.try_wait()? {
                        return Err(BootError::GuestDied {
                            status: status.to_string(),
                            serial_log: self.serial_log.clone(),
                            tail: console_tail(&self.serial_log, 30),
                        });
                    }
                }
            }
        }
    }

    /// Powers the guest off cleanly, so its disks are consistent: through its agent (`channel`,
    /// whose `Ready` said whether the agent is PID 1), `systemctl poweroff` under systemd, or
    /// SIGTERM to the agent as PID 1 (it stops everything, syncs and powers off). Waits up to
    /// `grace` for QEMU to exit, then stops it hard. Returns whether the guest went by itself.
    pub async fn power_off(
        mut self,
        channel: &mut GuestChannel,
        agent_is_pid1: bool,
        grace: Duration,
    ) -> Result<bool, BootError> {
        let answered = request_poweroff(channel, agent_is_pid1).await;
        // A guest that did not answer will not power off by itself.
        let grace = if answered { grace } else { Duration::ZERO };
        let deadline = tokio::time::Instant::now() + grace;
        let mut graceful = false;
        while tokio::time::Instant::now() < deadline {
            if self.qemu.try_wait()?.is_some() {
                graceful = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop().await?;
        Ok(graceful)
    }

    /// Stops QEMU and the vsock daemon and removes their sockets (the console log stays).
    pub async fn stop(self) -> Result<(), BootError> {
        let qmp = self.qemu.qmp_socket().to_owned();
        self.qemu.stop(Duration::from_secs(3)).await?;
        let _ = std::fs::remove_file(qmp);
        if let Some(daemon) = self.vsock {
            daemon.stop().await?;
        }
        if let GuestEndpoint::Serial { path } = &self.endpoint {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }
}

/// What a boot smoke test saw.
#[derive(Debug, Clone)]
pub struct SmokeReport {
    pub transport: AgentTransport,
    /// QEMU start to the agent's `Ready`.
    pub agent_ready: Duration,
    /// QEMU start to the first command's exit status.
    pub first_command: Duration,
    /// The agent's own report of the guest.
    pub ready: Ready,
    /// `uname -r` in the guest.
    pub uname_release: String,
    /// What `sh -c 'exit 7'` returned.
    pub exit_seven: crate::guest::ExitStatus,
    /// The median of [`SMOKE_ROUND_TRIPS`] `true` commands on the ready channel, right after
    /// the first command: the guest may still be starting other services.
    pub round_trip: Duration,
    /// The same once the boot is over (`systemctl is-system-running --wait` where systemd
    /// runs, at once elsewhere); `None` where the guest has no shell to ask with (an
    /// initramfs whose `/init` is the agent).
    pub round_trip_settled: Option<Duration>,
}

/// How many `true` commands the smoke test times.
pub const SMOKE_ROUND_TRIPS: usize = 10;

/// Boots `spec`, waits for the agent until `deadline`, runs `uname -r`, `sh -c 'exit 7'` and a
/// few `true`s through it, and stops the VM, whatever happened.
pub async fn smoke_test(spec: &BootSpec, deadline: Instant) -> Result<SmokeReport, BootError> {
    let mut vm = BootedVm::start(spec).await?;
    let outcome = smoke_commands(&mut vm, deadline).await;
    let stopped = vm.stop().await;
    let report = outcome?;
    stopped?;
    Ok(report)
}

async fn smoke_commands(vm: &mut BootedVm, deadline: Instant) -> Result<SmokeReport, BootError> {
    use crate::guest::ExecRequest;
    let (mut channel, ready) = vm.wait_agent(deadline).await?;
    let agent_ready = vm.started().elapsed();
    let command_failed = |source: GuestError| BootError::Command {
        serial_log: vm.serial_log().to_owned(),
        source,
    };
    let (status, stdout, _) = run_captured(&mut channel, ExecRequest::argv(["uname", "-r"]))
        .await
        .map_err(command_failed)?;
    let first_command = vm.started().elapsed();
    let uname_release = if status == crate::guest::ExitStatus::Code(0) {
        String::from_utf8_lossy(&stdout).trim().to_owned()
    } else {
        format!("(uname -r failed: {status})")
    };
    let (exit_seven, _, _) = run_captured(&mut channel, ExecRequest::argv(["sh", "-c", "exit 7"]))
        .await
        .map_err(command_failed)?;
    let round_trip = median_round_trip(&mut channel)
        .await
        .map_err(command_failed)?;
    // systemd's own view of "booted"; a guest without systemd is settled once it answers.
    let settle = ExecRequest::shell(
        "if [ -d /run/systemd/system ]; then \
         timeout 120 systemctl is-system-running --wait >/dev/null; fi; exit 0",
    );
    let round_trip_settled = match run_captured(&mut channel, settle).await {
        Ok((status, _, _)) if status.success() => Some(
            median_round_trip(&mut channel)
                .await
                .map_err(command_failed)?,
        ),
        // No shell in the guest (the agent refuses a missing program).
        Ok(_) | Err(GuestError::Remote { .. }) => None,
        Err(error) => return Err(command_failed(error)),
    };
    Ok(SmokeReport {
        transport: vm.transport(),
        agent_ready,
        first_command,
        ready,
        uname_release,
        exit_seven,
        round_trip,
        round_trip_settled,
    })
}

/// The median time of [`SMOKE_ROUND_TRIPS`] `true` commands on `channel`.
async fn median_round_trip(channel: &mut GuestChannel) -> Result<Duration, GuestError> {
    let mut samples = Vec::with_capacity(SMOKE_ROUND_TRIPS);
    for _ in 0..SMOKE_ROUND_TRIPS {
        let sent = Instant::now();
        run_captured(channel, crate::guest::ExecRequest::argv(["true"])).await?;
        samples.push(sent.elapsed());
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

/// Asks the guest to power itself off cleanly through its agent: `systemctl poweroff` under
/// systemd, SIGTERM to the agent when it is PID 1 (it stops everything, syncs and powers
/// off). Does not wait for the power-off; the guest may go before answering, so errors are
/// expected and ignored. False when the guest did not answer at all in
/// [`POWEROFF_REQUEST_TIMEOUT`]: a hung guest, not worth waiting for.
pub async fn request_poweroff(channel: &mut GuestChannel, agent_is_pid1: bool) -> bool {
    use crate::guest::ExecRequest;
    let request = if agent_is_pid1 {
        ExecRequest::argv(["kill", "-TERM", "1"])
    } else {
        ExecRequest::argv(["systemctl", "poweroff", "--no-block"])
    };
    // Output is dropped, not kept: a guest may print without end.
    tokio::time::timeout(
        POWEROFF_REQUEST_TIMEOUT,
        channel.exec(&request, &[][..], tokio::io::sink(), tokio::io::sink()),
    )
    .await
    .is_ok()
}

/// How long a guest has to answer a power-off request. The agent answers at once when the
/// guest is well (the power-off itself is asynchronous).
pub const POWEROFF_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `request` with no stdin; returns its status, stdout and stderr.
pub async fn run_captured(
    channel: &mut GuestChannel,
    request: crate::guest::ExecRequest,
) -> Result<(crate::guest::ExitStatus, Vec<u8>, Vec<u8>), GuestError> {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = channel
        .exec(&request, &[][..], &mut stdout, &mut stderr)
        .await?;
    Ok((status, stdout, stderr))
}

/// The last `max` bytes of `path` (a guest writes its console log without limit).
fn read_end(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    file.seek(SeekFrom::Start(size.saturating_sub(max)))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The last `lines` lines of a console log, or a note saying it is empty or unreadable.
pub fn console_tail(path: &Path, lines: usize) -> String {
    log_tail(path, lines, "console log")
}

/// [`console_tail`] of any log, `what` naming it where it is empty or unreadable.
pub fn log_tail(path: &Path, lines: usize, what: &str) -> String {
    match read_end(path, crate::limits::CONSOLE_TAIL_BYTES) {
        Ok(bytes) if bytes.is_empty() => format!("  (the {what} is empty)"),
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..]
                .iter()
                .map(|line| {
                    format!(
                        "  | {}",
                        crate::error::printable(line.trim_end_matches('\r'))
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(error) => format!("  (cannot read the {what}: {error})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_boots_get_the_host_tsc_rate_and_kvm_boots_do_not() {
        let tcg = Accel::Tcg {
            reason: "test".into(),
        };
        let extra = vec!["banger.init=agent".to_owned()];
        assert_eq!(
            kernel_cmdline(&tcg, Some(2_300_000), &extra),
            "console=ttyS0 root=/dev/vda rw rootwait panic=-1 quiet tsc_early_khz=2300000 \
             banger.init=agent"
        );
        assert!(!kernel_cmdline(&Accel::Kvm, Some(2_300_000), &[]).contains("tsc_early_khz"));
        assert!(!kernel_cmdline(&tcg, None, &[]).contains("tsc_early_khz"));
    }

    #[test]
    fn an_agent_timeout_ends_with_the_console_lines() {
        let error = BootError::AgentTimeout {
            endpoint: "vsock port 1".into(),
            waited: Duration::from_secs(300),
            serial_log: "/x/console.log".into(),
            reason: "timed out".into(),
            tail: "  | [    0.59] last line".into(),
        };
        let text = crate::error::error_chain(&error);
        assert!(text.ends_with("  | [    0.59] last line"), "{text}");
        assert!(text.contains("over vsock port 1 (timed out)"), "{text}");
    }

    #[test]
    fn console_tails_keep_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, "one\r\ntwo\nthree\n").unwrap();
        assert_eq!(console_tail(&log, 2), "  | two\n  | three");
        std::fs::write(&log, "").unwrap();
        assert!(console_tail(&log, 2).contains("empty"));
        assert!(console_tail(&dir.path().join("missing"), 2).contains("cannot read"));
    }
}
