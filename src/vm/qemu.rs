//! The QEMU `microvm` backend: the command line, and the QEMU process.
//!
//! Lifecycle of a boot:
//! 1. [`QemuSpec`] says what to boot; [`QemuSpec::argv`] is pure (unit-tested, and shown by
//!    `-v` so a failing boot can be reproduced by hand).
//! 2. [`QemuProcess::spawn`] starts QEMU as a child in its own process group (never
//!    `-daemonize`: it leaves zombies), serial console to a log file, QMP on a unix socket.
//! 3. [`QemuProcess::stop`] asks over QMP to quit, then SIGTERM, then SIGKILL after a grace
//!    period; dropping a process that was not stopped kills its group.
//!
//! Choices that come from measurements on TCG hosts (docs/hosts.md): `microvm` with ACPI on
//! (devices appear as `LNRO0005`, banger's initramfs loads `virtio_mmio`), PIT and PIC kept
//! on, `tsc_early_khz=` on the kernel command line, a 128 MiB translation cache, `quiet`
//! serial. Memory comes from a shared memfd backend when a vhost-user vsock device is
//! attached (the vhost-user daemon maps guest memory).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::accel::Accel;
use super::qmp::Qmp;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(
        "QEMU is not installed (`{binary}` not found); install it (`apt-get install \
         qemu-system-x86`)"
    )]
    NotInstalled { binary: String },
    #[error("cannot start {argv}")]
    Spawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited at start-up ({status}): {argv}\n{stderr}")]
    EarlyExit {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("QEMU's control socket {path} did not appear within {seconds} s")]
    NoControlSocket { path: PathBuf, seconds: u64 },
    #[error("cannot wait for QEMU")]
    Wait(#[source] std::io::Error),
}

/// A disk attached as a virtio-blk device (`/dev/vda`, `/dev/vdb`, … in attach order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
    /// Writes go to a temporary overlay QEMU discards at exit (throwaway runs).
    pub snapshot: bool,
}

/// The guest's network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuNet {
    User(UserNet),
    /// An existing tap (banger's bridge), opened by QEMU; no scripts.
    Tap {
        ifname: String,
        mac: String,
    },
}

/// User-mode networking with host ports forwarded to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNet {
    pub forwards: Vec<crate::spec::PortForward>,
}

/// The QEMU binary banger runs: `$BANGER_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn binary() -> String {
    crate::env::var_path(crate::env::BANGER_QEMU).map_or_else(
        || "qemu-system-x86_64".to_owned(),
        |path| path.display().to_string(),
    )
}

/// Everything QEMU needs to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSpec {
    pub binary: String,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub disks: Vec<Disk>,
    pub net: Option<QemuNet>,
    /// A vhost-user vsock daemon's socket (`vhost-device-vsock`).
    pub vhost_vsock: Option<PathBuf>,
    /// The host end of the guest's virtio-serial port `banger.0` (the agent's fallback
    /// transport): QEMU listens on this unix socket.
    pub agent_serial: Option<PathBuf>,
    /// Serial console output goes here.
    pub serial_log: PathBuf,
    /// QMP listens here.
    pub qmp_socket: PathBuf,
    /// Restore a snapshot instead of booting: QEMU waits for its migration stream on this
    /// unix socket (`snapshot::restore` sends it).
    pub incoming: Option<PathBuf>,
    /// QEMU's own stderr is appended here, and the process is meant to outlive this one
    /// (a daemon's VM): it is not killed when its [`QemuProcess`] is dropped or detached.
    /// `None`: stderr is captured for errors and QEMU dies with its handle, and with this
    /// process however it ends (even SIGKILL).
    pub stderr_log: Option<PathBuf>,
}

impl QemuSpec {
    /// The full argv, binary first.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = vec![self.binary.clone()];
        let mut push = |items: &[&str]| argv.extend(items.iter().map(|item| (*item).to_owned()));
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        let machine = if self.vhost_vsock.is_some() {
            // The vhost-user daemon needs guest memory it can map: a shared memfd.
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on,memory-backend=mem0"
        } else {
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on"
        };
        push(&["-machine", machine]);
        let accel = self.accel.qemu_arg();
        push(&["-accel", accel]);
        let cpu = if self.accel.is_tcg() { "max" } else { "host" };
        push(&["-cpu", cpu]);
        let smp = self.vcpus.max(1).to_string();
        push(&["-smp", &smp]);
        let memory = format!("{}M", self.memory_mib);
        push(&["-m", &memory]);
        if self.vhost_vsock.is_some() {
            let backend = format!("memory-backend-memfd,id=mem0,size={memory},share=on");
            push(&["-object", &backend]);
        }
        let kernel = self.kernel.to_string_lossy().into_owned();
        push(&["-kernel", &kernel]);
        if let Some(initrd) = &self.initrd {
            let initrd = initrd.to_string_lossy().into_owned();
            push(&["-initrd", &initrd]);
        }
        push(&["-append", &self.cmdline]);
        let serial = format!(
            "file,id=serial0,path={}",
            escape_option(&self.serial_log.to_string_lossy())
        );
        push(&["-chardev", &serial, "-serial", "chardev:serial0"]);
        let qmp = format!(
            "unix:{},server=on,wait=off",
            escape_option(&self.qmp_socket.to_string_lossy())
        );
        push(&["-qmp", &qmp]);
        if let Some(socket) = &self.incoming {
            let incoming = format!("unix:{}", socket.to_string_lossy());
            push(&["-incoming", &incoming]);
        }
        for (index, disk) in self.disks.iter().enumerate() {
            let mut drive = format!(
                "id=disk{index},file={},format=raw,if=none",
                escape_option(&disk.path.to_string_lossy())
            );
            if disk.read_only {
                drive.push_str(",readonly=on");
            }
            if disk.snapshot {
                drive.push_str(",snapshot=on");
            }
            // Flushes matter only for writes that must survive: a disk nothing keeps needs none.
            if disk.read_only || disk.snapshot {
                drive.push_str(",cache=unsafe");
            }
            let device = format!("virtio-blk-device,drive=disk{index}");
            push(&["-drive", &drive, "-device", &device]);
        }
        match &self.net {
            Some(QemuNet::User(net)) => {
                let mut netdev = String::from("user,id=net0");
                for forward in &net.forwards {
                    netdev.push_str(&format!(
                        ",hostfwd={}:{}:{}-:{}",
                        forward.protocol.as_str(),
                        forward.host_ip,
                        forward.host_port,
                        forward.guest_port
                    ));
                }
                push(&[
                    "-netdev",
                    &netdev,
                    "-device",
                    "virtio-net-device,netdev=net0",
                ]);
            }
            Some(QemuNet::Tap { ifname, mac }) => {
                let netdev = format!("tap,id=net0,ifname={ifname},script=no,downscript=no");
                let device = format!("virtio-net-device,netdev=net0,mac={mac}");
                push(&["-netdev", &netdev, "-device", &device]);
            }
            None => {}
        }
        if let Some(socket) = &self.vhost_vsock {
            let chardev = format!(
                "socket,id=vsock0,path={}",
                escape_option(&socket.to_string_lossy())
            );
            push(&[
                "-chardev",
                &chardev,
                "-device",
                "vhost-user-vsock-device,chardev=vsock0",
            ]);
        }
        if let Some(socket) = &self.agent_serial {
            let chardev = format!(
                "socket,id=agent0,path={},server=on,wait=off",
                escape_option(&socket.to_string_lossy())
            );
            push(&[
                "-device",
                "virtio-serial-device",
                "-chardev",
                &chardev,
                "-device",
                "virtserialport,chardev=agent0,name=banger.0",
            ]);
        }
        argv
    }
}

/// QEMU's option parser splits on commas; a literal comma is written twice.
fn escape_option(value: &str) -> String {
    value.replace(',', ",,")
}

/// A running QEMU.
#[derive(Debug)]
pub struct QemuProcess {
    child: tokio::process::Child,
    qmp_socket: PathBuf,
    argv: Vec<String>,
    stderr_log: Option<PathBuf>,
    /// Handed over with [`QemuProcess::detach`]: dropping this handle leaves QEMU running.
    detached: bool,
}

impl QemuProcess {
    /// Starts QEMU and waits for its control socket.
    pub async fn spawn(spec: &QemuSpec) -> Result<QemuProcess, QemuError> {
        let argv = spec.argv();
        let printable = argv.join(" ");
        let mut command = tokio::process::Command::new(&argv[0]);
        let (stderr, stderr_target) = super::StderrTarget::open(spec.stderr_log.as_deref())
            .map_err(|source| QemuError::Spawn {
                argv: format!("{printable} (its stderr log)"),
                source,
            })?;
        // Not `kill_on_drop`: `Drop` kills it unless it was detached.
        command
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        if spec.stderr_log.is_none() {
            super::process::die_with_parent(&mut command);
        }
        let mut child = command.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                QemuError::NotInstalled {
                    binary: argv[0].clone(),
                }
            } else {
                QemuError::Spawn {
                    argv: printable.clone(),
                    source,
                }
            }
        })?;
        tracing::info!(program = %argv[0], pid = child.id(), "process started");
        let seconds = 20;
        match super::wait_for_socket(
            &mut child,
            &spec.qmp_socket,
            Duration::from_secs(seconds),
            &stderr_target,
        )
        .await
        {
            Ok(()) => {}
            Err(super::StartupFailure::Exited { status, stderr }) => {
                return Err(QemuError::EarlyExit {
                    argv: printable,
                    status,
                    stderr,
                });
            }
            Err(super::StartupFailure::TimedOut) => {
                return Err(QemuError::NoControlSocket {
                    path: spec.qmp_socket.clone(),
                    seconds,
                });
            }
            Err(super::StartupFailure::Wait(error)) => return Err(QemuError::Wait(error)),
        }
        Ok(QemuProcess {
            child,
            qmp_socket: spec.qmp_socket.clone(),
            argv,
            stderr_log: spec.stderr_log.clone(),
            detached: false,
        })
    }

    /// Lets QEMU run on without this handle (its stderr must go to a log, not to a pipe
    /// this process holds); the returned handle finds it again.
    pub fn detach(mut self) -> Option<super::process::ProcessHandle> {
        debug_assert!(
            self.stderr_log.is_some(),
            "a detached QEMU needs a stderr log"
        );
        self.detached = true;
        self.child.id().and_then(super::process::ProcessHandle::of)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// Has QEMU exited (and with what)?
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>, QemuError> {
        self.child.try_wait().map_err(QemuError::Wait)
    }

    /// Quits QEMU: QMP `quit`, else SIGTERM to its group, else SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) -> Result<(), QemuError> {
        if let Ok(mut qmp) = Qmp::connect(&self.qmp_socket).await {
            let _ = qmp.quit().await;
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            return Ok(());
        }
        if let Some(pid) = self.child.id() {
            let group = nix::unistd::Pid::from_raw(-(pid as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            return Ok(());
        }
        let _ = self.child.start_kill();
        self.child.wait().await.map_err(QemuError::Wait)?;
        Ok(())
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if !self.detached {
            let _ = self.child.start_kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> QemuSpec {
        QemuSpec {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg {
                reason: "test".into(),
            },
            vcpus: 2,
            memory_mib: 1024,
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd".into()),
            cmdline: "console=ttyS0 quiet".into(),
            disks: vec![
                Disk {
                    path: "/images/root,1.ext4".into(),
                    read_only: true,
                    snapshot: false,
                },
                Disk {
                    path: "/vm/work.ext4".into(),
                    read_only: false,
                    snapshot: false,
                },
            ],
            net: Some(QemuNet::User(UserNet {
                forwards: vec![crate::spec::PortForward::loopback_tcp(40022, 22)],
            })),
            vhost_vsock: Some("/vm/vhost.sock".into()),
            agent_serial: Some("/vm/agent.sock".into()),
            serial_log: "/vm/serial.log".into(),
            qmp_socket: "/vm/qmp.sock".into(),
            incoming: None,
            stderr_log: None,
        }
    }

    #[test]
    fn the_command_line_carries_every_device() {
        insta::assert_snapshot!(spec().argv().join("\n"), @r"
        qemu-system-x86_64
        -nodefaults
        -no-user-config
        -nographic
        -no-reboot
        -machine
        microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on,memory-backend=mem0
        -accel
        tcg,tb-size=128
        -cpu
        max
        -smp
        2
        -m
        1024M
        -object
        memory-backend-memfd,id=mem0,size=1024M,share=on
        -kernel
        /k/vmlinux
        -initrd
        /k/initrd
        -append
        console=ttyS0 quiet
        -chardev
        file,id=serial0,path=/vm/serial.log
        -serial
        chardev:serial0
        -qmp
        unix:/vm/qmp.sock,server=on,wait=off
        -drive
        id=disk0,file=/images/root,,1.ext4,format=raw,if=none,readonly=on,cache=unsafe
        -device
        virtio-blk-device,drive=disk0
        -drive
        id=disk1,file=/vm/work.ext4,format=raw,if=none
        -device
        virtio-blk-device,drive=disk1
        -netdev
        user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22
        -device
        virtio-net-device,netdev=net0
        -chardev
        socket,id=vsock0,path=/vm/vhost.sock
        -device
        vhost-user-vsock-device,chardev=vsock0
        -device
        virtio-serial-device
        -chardev
        socket,id=agent0,path=/vm/agent.sock,server=on,wait=off
        -device
        virtserialport,chardev=agent0,name=banger.0
        ");
    }

    #[test]
    fn without_user_networking_there_is_no_network_device() {
        let mut spec = spec();
        spec.net = None;
        let argv = spec.argv();
        assert!(!argv.iter().any(|arg| arg == "-netdev"), "{argv:?}");
        assert!(
            !argv.iter().any(|arg| arg.contains("virtio-net")),
            "{argv:?}"
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_no_shared_memory_without_vsock() {
        let mut spec = spec();
        spec.accel = Accel::Kvm;
        spec.vhost_vsock = None;
        let argv = spec.argv();
        assert!(argv.windows(2).any(|pair| pair == ["-cpu", "host"]));
        assert!(argv.windows(2).any(|pair| pair == ["-accel", "kvm"]));
        assert!(!argv.iter().any(|arg| arg.contains("memory-backend")));
    }
}
