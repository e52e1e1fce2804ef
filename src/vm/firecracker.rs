//! The Firecracker backend: what to boot ([`FirecrackerSpec`]), the requests that configure
//! it (pure), and the Firecracker process ([`FirecrackerProcess`]), optionally jailed.
//!
//! Lifecycle of a VM:
//! 1. [`FirecrackerSpec::configuration_requests`] turns the spec into the API requests, in
//!    the order they are sent: `/logger` (first, so the rest is logged), `/machine-config`,
//!    `/boot-source`, `/drives/{id}`, `/network-interfaces/{id}`, `/vsock`. Pure: the
//!    integration tests check each against Firecracker's OpenAPI document.
//! 2. [`FirecrackerProcess::spawn`] clears what a dead run may have left (a stale API or vsock
//!    socket, a stale jail; a socket that still answers is someone's live VM and an error),
//!    creates the log file Firecracker insists exists, stages files into the jail when
//!    jailed ([`jailer`]), and starts `firecracker --api-sock PATH --id ID` (or the jailer)
//!    as a child in its own process group, killed if dropped. It returns once the API socket
//!    accepts connections; a Firecracker that exits first is an error with its argv, status,
//!    stderr and its own log lines.
//! 3. [`FirecrackerProcess::configure`] sends the requests; [`FirecrackerProcess::start`]
//!    sends `InstanceStart`. [`FirecrackerProcess::launch`] does spawn, configure and start,
//!    and on any failure kills the process and removes what it created before returning the
//!    error. A refused request is [`FirecrackerError::Api`] with the method, path, body and
//!    Firecracker's `fault_message` verbatim; a request that fails because Firecracker died
//!    is [`FirecrackerError::Exited`] with its argv, status and stderr.
//! 4. [`FirecrackerProcess::stop`] sends `SendCtrlAltDel` (a Linux guest reboots on it, and
//!    Firecracker ends when its guest reboots), waits up to a grace period, then SIGKILLs the
//!    process group. A Firecracker never started holds nothing worth a grace period and is
//!    killed at once. Either way the API socket, the vsock socket and the jail are removed.
//!    Dropping a process that was not stopped kills its group and removes them too.
//!
//! Choices, and why:
//! - **stdout goes straight to the serial log file** when there is one: Firecracker writes
//!   the guest's serial console there (and its own log lines until `/logger` is set). A file
//!   rather than a pipe banger copies, so the VM keeps its console if banger's daemon dies.
//!   The file is appended to, so `vm logs` keeps earlier boots. Without a serial log, stdout
//!   is captured in memory (the last 64 KiB) for error messages. stderr (where Firecracker
//!   prints its final error) is always captured that way.
//! - **The logger is configured first**, to a file banger creates beforehand (Firecracker
//!   refuses a missing one), so every later request and Firecracker's reason for refusing it
//!   is in that file.
//! - **Writable drives use `cache_type: Writeback`**: the guest's flushes reach the host file,
//!   so the per-VM work disk keeps what the guest synced even if the host goes down.
//!   Read-only drives keep Firecracker's default (`Unsafe`: nothing to flush).
//! - `boot_args` replace Firecracker's default command line entirely; a root drive makes
//!   Firecracker append `root=/dev/vda` (`ro` or `rw` per the drive) to them.
//! - The vsock device uses [`super::vsock::GUEST_CID`] and Firecracker's hybrid vsock on
//!   `uds_path`, the protocol [`crate::guest`] speaks for both backends. Firecracker binds
//!   `uds_path` when `/vsock` is configured and fails if the file exists, hence the stale
//!   check at spawn.
//! - The API client ([`api`]) is hyper's HTTP/1.1 connection over the unix socket, one per
//!   request: see its module note.
//!
//! Known weaknesses: a `FirecrackerProcess` is tied to the tokio child that started it; the
//! daemon follows a running Firecracker by its pid and start time instead (`backend.rs`,
//! `process.rs`) and reaches it through its API socket with an [`ApiClient`]; no metrics, balloon, MMDS or rate limiters; jailer cgroups
//! are not offered. On PVM hosts (docs/hosts.md) Firecracker cannot boot a stock guest
//! kernel: everything up to `InstanceStart` works, then the guest hangs.

pub mod api;
pub mod jailer;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::error_chain;

pub use api::{ApiClient, ApiRequest, ApiResponse, Method};
pub use jailer::JailerSpec;
pub use snapshot::SnapshotFiles;

#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    #[error(
        "Firecracker is not installed (`{binary}` not found); install the static `firecracker` \
         binary of a release (and `jailer` to jail it)"
    )]
    NotInstalled { binary: String },
    #[error("{what} {} is not UTF-8, which Firecracker's JSON API cannot carry", path.display())]
    NonUtf8Path { what: &'static str, path: PathBuf },
    #[error(
        "{} is in use: a Firecracker answers on it (another VM with the same socket or jail?)",
        path.display()
    )]
    SocketInUse { path: PathBuf },
    #[error(
        "{id:?} cannot name a jail: the jailer takes 1 to 64 letters, digits and `-` (banger \
         removes the directory it names)"
    )]
    InvalidJailId { id: String },
    #[error("cannot {what} {}", path.display())]
    Prepare {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot hard-link {} into the jail as {}{}",
        from.display(),
        to.display(),
        if source.raw_os_error() == Some(libc::EXDEV) {
            " (the jail's chroot base must be on the same filesystem as the VM's files)"
        } else {
            ""
        }
    )]
    Stage {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {argv}")]
    Spawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Firecracker exited at start-up ({status}): {argv}{}",
        output(stderr, log)
    )]
    EarlyExit {
        argv: String,
        status: String,
        stderr: String,
        log: String,
    },
    #[error(
        "Firecracker's API socket {} did not accept connections within {seconds} s: {argv}{}",
        socket.display(),
        output(stderr, log)
    )]
    NoApiSocket {
        argv: String,
        socket: PathBuf,
        seconds: u64,
        stderr: String,
        log: String,
    },
    #[error(
        "Firecracker exited ({status}) during {during}: {argv}{}",
        output(stderr, log)
    )]
    Exited {
        argv: String,
        status: String,
        during: String,
        stderr: String,
        log: String,
    },
    #[error(
        "Firecracker refused {method} {path} (HTTP {status}): {fault_message}\n  request body: {}",
        shown(body)
    )]
    Api {
        method: Method,
        path: String,
        body: String,
        status: u16,
        /// Firecracker's own error text, verbatim.
        fault_message: String,
    },
    #[error(
        "cannot make {method} {path} an HTTP request for Firecracker's API\n  request \
         body: {}",
        shown(body)
    )]
    ApiBuildRequest {
        method: Method,
        path: String,
        body: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error(
        "cannot connect to Firecracker's API at {} ({method} {path})\n  request body: {}",
        socket.display(),
        shown(body)
    )]
    ApiConnect {
        socket: PathBuf,
        method: Method,
        path: String,
        body: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot open an HTTP/1.1 connection on Firecracker's API at {} ({method} {path}): {}\n  \
         request body: {}",
        socket.display(),
        error_chain(source),
        shown(body)
    )]
    ApiHandshake {
        socket: PathBuf,
        method: Method,
        path: String,
        body: String,
        #[source]
        source: hyper::Error,
    },
    #[error(
        "cannot send {method} {path} to Firecracker's API at {} or read the head of its answer: \
         {}\n  request body: {}",
        socket.display(),
        error_chain(source),
        shown(body)
    )]
    ApiSend {
        socket: PathBuf,
        method: Method,
        path: String,
        body: String,
        #[source]
        source: hyper::Error,
    },
    #[error(
        "cannot read the body of the HTTP {status} answer to {method} {path} from Firecracker's \
         API at {}: {}\n  request body: {}",
        socket.display(),
        error_chain(source.as_ref()),
        shown(body)
    )]
    ApiReadBody {
        socket: PathBuf,
        method: Method,
        path: String,
        body: String,
        status: u16,
        /// hyper's error, boxed by `http_body_util::Limited`.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the HTTP {status} answer to {method} {path} from Firecracker's API at {} is longer than \
         the {limit} bytes banger reads\n  request body: {}",
        socket.display(),
        shown(body)
    )]
    ApiBodyTooLarge {
        socket: PathBuf,
        method: Method,
        path: String,
        body: String,
        status: u16,
        limit: usize,
    },
    #[error(
        "cannot parse the answer to {method} {path} from Firecracker's API at {} as JSON: \
         {answer}",
        socket.display()
    )]
    ApiParseAnswer {
        socket: PathBuf,
        method: Method,
        path: String,
        /// The answer's body, as text.
        answer: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "Firecracker's API at {} did not answer {method} {path} within {seconds} s\n  request \
         body: {}",
        socket.display(),
        shown(body)
    )]
    ApiTimeout {
        socket: PathBuf,
        method: Method,
        path: String,
        body: String,
        seconds: f64,
    },
    #[error(
        "Firecracker VM {id} is jailed: banger does not snapshot or restore jailed VMs yet \
         (their files live in the jail, under other names)"
    )]
    SnapshotJailed { id: String },
    #[error(
        "the snapshot's vsock socket is {}, not {} as the VM asks: Firecracker restores it \
         where it was saved",
        shown_path(recorded.as_deref()),
        shown_path(wanted.as_deref())
    )]
    SnapshotVsockMoved {
        recorded: Option<PathBuf>,
        wanted: Option<PathBuf>,
    },
    #[error("cannot wait for {argv}")]
    Wait {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove {} after Firecracker stopped", path.display())]
    Cleanup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn shown_path(path: Option<&Path>) -> String {
    path.map_or_else(|| "(none)".to_owned(), |path| path.display().to_string())
}

fn shown(body: &str) -> &str {
    if body.is_empty() { "(none)" } else { body }
}

/// Lines of Firecracker's own log shown in an error (the end is where its reason is).
const LOG_LINES_SHOWN: usize = 20;

/// The captured output shown under a process error.
fn output(stderr: &str, log: &str) -> String {
    let mut text = String::new();
    let stderr = stderr.trim_end();
    text.push_str("\nstderr:");
    if stderr.is_empty() {
        text.push_str(" (empty)");
    }
    for line in stderr.lines() {
        text.push_str("\n  ");
        text.push_str(line);
    }
    let lines: Vec<&str> = log.trim_end().lines().collect();
    if !lines.is_empty() {
        text.push_str("\nFirecracker's log (last lines):");
        for line in &lines[lines.len().saturating_sub(LOG_LINES_SHOWN)..] {
            text.push_str("\n  ");
            text.push_str(line);
        }
    }
    text
}

/// A block device. Firecracker names them `/dev/vda`, `/dev/vdb`, … in the order configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    /// Firecracker's `drive_id` (letters, digits and `_`).
    pub id: String,
    pub path: PathBuf,
    pub is_root_device: bool,
    pub is_read_only: bool,
}

impl Drive {
    /// The image, shared by every VM: read-only root device `rootfs`.
    pub fn root(path: impl Into<PathBuf>) -> Drive {
        Drive {
            id: "rootfs".to_owned(),
            path: path.into(),
            is_root_device: true,
            is_read_only: true,
        }
    }

    /// A per-VM writable disk.
    pub fn writable(id: impl Into<String>, path: impl Into<PathBuf>) -> Drive {
        Drive {
            id: id.into(),
            path: path.into(),
            is_root_device: false,
            is_read_only: false,
        }
    }
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A virtio-net device backed by a host tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInterface {
    /// Firecracker's `iface_id` (letters, digits and `_`).
    pub id: String,
    /// The host tap device (Firecracker opens it; as root, opening a missing tap creates a
    /// non-persistent one that goes away with Firecracker).
    pub tap: String,
    /// Firecracker picks one when absent.
    pub guest_mac: Option<MacAddr>,
}

/// The vsock device, reached from the host through Firecracker's hybrid vsock socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vsock {
    pub guest_cid: u32,
    /// Firecracker listens here for host-initiated connections (`CONNECT <port>\n`), and
    /// connects to `<uds_path>_<port>` for guest-initiated ones.
    pub uds_path: PathBuf,
}

impl Vsock {
    pub fn new(uds_path: impl Into<PathBuf>) -> Vsock {
        Vsock {
            guest_cid: super::vsock::GUEST_CID,
            uds_path: uds_path.into(),
        }
    }
}

/// Firecracker's own log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

/// Firecracker's own log, to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logger {
    pub path: PathBuf,
    pub level: LogLevel,
}

/// Everything Firecracker needs to boot one VM. Paths are host paths; when jailed, banger
/// stages the files into the jail and Firecracker is given their paths there ([`jailer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerSpec {
    /// The `firecracker` binary.
    pub binary: PathBuf,
    /// Firecracker's `--id` and the jail's name: letters, digits and `-`, at most 64.
    pub id: String,
    pub jailer: Option<JailerSpec>,
    /// Firecracker's API socket (unused when jailed: the socket is in the jail).
    pub api_socket: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// An uncompressed ELF `vmlinux` (Firecracker on x86_64 takes no bzImage).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The whole kernel command line (it replaces Firecracker's default).
    pub boot_args: String,
    pub drives: Vec<Drive>,
    pub network_interfaces: Vec<NetworkInterface>,
    /// The vsock device (its `uds_path` is unused when jailed: the socket is in the jail).
    pub vsock: Option<Vsock>,
    /// Firecracker's stdout: the guest's serial console (and Firecracker's log lines until
    /// the logger is configured). Appended to.
    pub serial_log: Option<PathBuf>,
    pub logger: Option<Logger>,
    /// The directory an unjailed Firecracker runs in, where relative paths in `drives` and
    /// `vsock` resolve, at boot and again when a snapshot is loaded. A snapshot records the
    /// paths as given, so one saved with relative paths restores in any VM's directory onto
    /// that VM's own files and socket. `None`: this process's directory.
    pub work_dir: Option<PathBuf>,
}

/// `PUT /machine-config`.
#[derive(Debug, Serialize)]
struct MachineConfigBody {
    vcpu_count: u32,
    mem_size_mib: u64,
}

/// `PUT /boot-source`.
#[derive(Debug, Serialize)]
struct BootSourceBody<'a> {
    kernel_image_path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd_path: Option<&'a str>,
    boot_args: &'a str,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Serialize)]
struct DriveBody<'a> {
    drive_id: &'a str,
    path_on_host: &'a str,
    is_root_device: bool,
    is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_type: Option<&'static str>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Serialize)]
struct NetworkInterfaceBody<'a> {
    iface_id: &'a str,
    host_dev_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_mac: Option<String>,
}

/// `PUT /vsock`.
#[derive(Debug, Serialize)]
struct VsockBody<'a> {
    guest_cid: u32,
    uds_path: &'a str,
}

/// `PUT /logger`.
#[derive(Debug, Serialize)]
struct LoggerBody<'a> {
    log_path: &'a str,
    level: LogLevel,
    show_level: bool,
    show_log_origin: bool,
}

fn utf8<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, FirecrackerError> {
    path.to_str().ok_or_else(|| FirecrackerError::NonUtf8Path {
        what,
        path: path.to_path_buf(),
    })
}

impl FirecrackerSpec {
    /// The requests that configure Firecracker, in the order they are sent (not
    /// `InstanceStart`: [`ApiRequest::instance_start`]). Pure.
    pub fn configuration_requests(&self) -> Result<Vec<ApiRequest>, FirecrackerError> {
        let mut requests = Vec::new();
        if let Some(logger) = &self.logger {
            requests.push(ApiRequest::put(
                "/logger",
                &LoggerBody {
                    log_path: utf8("log file", &logger.path)?,
                    level: logger.level,
                    show_level: true,
                    show_log_origin: false,
                },
            ));
        }
        requests.push(ApiRequest::put(
            "/machine-config",
            &MachineConfigBody {
                vcpu_count: self.vcpus,
                mem_size_mib: self.memory_mib,
            },
        ));
        requests.push(ApiRequest::put(
            "/boot-source",
            &BootSourceBody {
                kernel_image_path: utf8("kernel", &self.kernel)?,
                initrd_path: match &self.initrd {
                    Some(initrd) => Some(utf8("initrd", initrd)?),
                    None => None,
                },
                boot_args: &self.boot_args,
            },
        ));
        for drive in &self.drives {
            requests.push(ApiRequest::put(
                format!("/drives/{}", api::encode_segment(&drive.id)),
                &DriveBody {
                    drive_id: &drive.id,
                    path_on_host: utf8("drive", &drive.path)?,
                    is_root_device: drive.is_root_device,
                    is_read_only: drive.is_read_only,
                    cache_type: (!drive.is_read_only).then_some("Writeback"),
                },
            ));
        }
        for interface in &self.network_interfaces {
            requests.push(ApiRequest::put(
                format!("/network-interfaces/{}", api::encode_segment(&interface.id)),
                &NetworkInterfaceBody {
                    iface_id: &interface.id,
                    host_dev_name: &interface.tap,
                    guest_mac: interface.guest_mac.map(|mac| mac.to_string()),
                },
            ));
        }
        if let Some(vsock) = &self.vsock {
            requests.push(ApiRequest::put(
                "/vsock",
                &VsockBody {
                    guest_cid: vsock.guest_cid,
                    uds_path: utf8("vsock socket", &vsock.uds_path)?,
                },
            ));
        }
        Ok(requests)
    }

    /// The argv that starts Firecracker (the jailer's, when jailed), binary first.
    pub fn argv(&self) -> Vec<String> {
        if let Some(jailer) = &self.jailer {
            return jailer.argv(&self.binary, &self.id);
        }
        let mut argv = vec![
            self.binary.to_string_lossy().into_owned(),
            "--api-sock".to_owned(),
            self.api_socket.to_string_lossy().into_owned(),
        ];
        if !self.id.is_empty() {
            argv.extend(["--id".to_owned(), self.id.clone()]);
        }
        argv
    }

    /// Where the API socket appears on the host.
    pub fn host_api_socket(&self) -> PathBuf {
        match &self.jailer {
            Some(jailer) => jailer
                .jail_root(&self.binary, &self.id)
                .join(jailer::API_SOCKET.trim_start_matches('/')),
            None => self.api_socket.clone(),
        }
    }

    /// Where the vsock socket appears on the host.
    pub fn host_vsock_uds_path(&self) -> Option<PathBuf> {
        let vsock = self.vsock.as_ref()?;
        Some(match (&self.jailer, &self.work_dir) {
            (Some(jailer), _) => jailer
                .jail_root(&self.binary, &self.id)
                .join(jailer::VSOCK_SOCKET.trim_start_matches('/')),
            (None, Some(dir)) => dir.join(&vsock.uds_path),
            (None, None) => vsock.uds_path.clone(),
        })
    }
}

/// How [`FirecrackerProcess::stop`] ended Firecracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It had exited already (its guest rebooted or powered off, or it failed).
    AlreadyExited(ExitStatus),
    /// It exited within the grace period after `SendCtrlAltDel`.
    ShutDown(ExitStatus),
    /// Its process group was SIGKILLed: the guest ignored Ctrl+Alt+Del for the whole grace
    /// period, or it had never been started.
    Killed,
}

/// How much of a captured stream is kept (its end).
const CAPTURE_LIMIT: usize = 64 * 1024;

/// A child's pipe drained into memory (its last [`CAPTURE_LIMIT`] bytes) by a task that ends
/// at end of stream, so the child never blocks on a full pipe.
#[derive(Debug)]
struct Capture {
    bytes: Arc<Mutex<Vec<u8>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Capture {
    fn start<R: AsyncRead + Unpin + Send + 'static>(pipe: Option<R>) -> Capture {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let task = pipe.map(|mut pipe| {
            let bytes = Arc::clone(&bytes);
            tokio::spawn(async move {
                let mut chunk = [0u8; 4096];
                while let Ok(read) = pipe.read(&mut chunk).await {
                    if read == 0 {
                        break;
                    }
                    let mut bytes = bytes.lock().unwrap_or_else(|poison| poison.into_inner());
                    bytes.extend_from_slice(&chunk[..read]);
                    if bytes.len() > CAPTURE_LIMIT {
                        let excess = bytes.len() - CAPTURE_LIMIT;
                        bytes.drain(..excess);
                    }
                }
            })
        });
        Capture { bytes, task }
    }

    /// Waits (briefly) for the stream's end, once the child has exited.
    async fn finish(&mut self) {
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    fn text(&self) -> String {
        let bytes = self
            .bytes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// How long [`FirecrackerProcess::spawn`] waits for the API socket.
const API_SOCKET_SECONDS: u64 = 10;
/// How much of the serial log's end is read for an error message.
const LOG_TAIL_BYTES: u64 = 8 * 1024;

/// A running Firecracker (or jailer), its sockets and its jail.
#[derive(Debug)]
pub struct FirecrackerProcess {
    child: tokio::process::Child,
    argv: Vec<String>,
    api: ApiClient,
    /// The spec as Firecracker sees it (paths inside the jail when jailed).
    inside: FirecrackerSpec,
    vsock_uds_path: Option<PathBuf>,
    jail_dir: Option<PathBuf>,
    serial_log: Option<PathBuf>,
    stdout: Capture,
    stderr: Capture,
    started: bool,
    /// Sockets and jail removed (after stop/kill): nothing left for `Drop`.
    cleaned: bool,
}

impl FirecrackerProcess {
    /// Starts Firecracker (jailed if the spec says so) and waits until its API socket accepts
    /// connections. Nothing is configured yet.
    pub async fn spawn(spec: &FirecrackerSpec) -> Result<FirecrackerProcess, FirecrackerError> {
        // Every path must be expressible in the API's JSON: find out before doing anything.
        spec.configuration_requests()?;
        let api_socket = spec.host_api_socket();
        let vsock_uds_path = spec.host_vsock_uds_path();
        let (inside, jail_dir) = match &spec.jailer {
            Some(jailer) => {
                if !jailer::valid_id(&spec.id) {
                    return Err(FirecrackerError::InvalidJailId {
                        id: spec.id.clone(),
                    });
                }
                let jail_dir = jailer.jail_dir(&spec.binary, &spec.id);
                clear_stale_jail(&jail_dir, &api_socket)?;
                if let Some(logger) = &spec.logger {
                    create_log_file(&logger.path)?;
                }
                let (inside, links) = jailer::inside_view(spec);
                let root = jailer.jail_root(&spec.binary, &spec.id);
                if let Err(error) = jailer::stage(&links, &root, jailer.uid, jailer.gid) {
                    let _ = remove_dir(&jail_dir);
                    return Err(error);
                }
                (inside, Some(jail_dir))
            }
            None => {
                clear_stale_socket(&api_socket)?;
                if let Some(path) = &vsock_uds_path {
                    clear_stale_socket(path)?;
                }
                if let Some(logger) = &spec.logger {
                    create_log_file(&logger.path)?;
                }
                (spec.clone(), None)
            }
        };
        let discard_jail = |error: FirecrackerError| {
            if let Some(dir) = &jail_dir {
                let _ = remove_dir(dir);
            }
            error
        };
        let stdout = match &spec.serial_log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| {
                        discard_jail(FirecrackerError::Prepare {
                            what: "open the serial log",
                            path: path.clone(),
                            source,
                        })
                    })?,
            ),
            None => Stdio::piped(),
        };
        let argv = spec.argv();
        let mut command = tokio::process::Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            // Not `kill_on_drop`: `Drop` kills its group unless it was detached.
            .process_group(0);
        if let (None, Some(dir)) = (&spec.jailer, &spec.work_dir) {
            command.current_dir(dir);
        }
        let mut child = command.spawn().map_err(|source| {
            discard_jail(if source.kind() == std::io::ErrorKind::NotFound {
                FirecrackerError::NotInstalled {
                    binary: argv[0].clone(),
                }
            } else {
                FirecrackerError::Spawn {
                    argv: argv.join(" "),
                    source,
                }
            })
        })?;
        tracing::info!(program = %argv[0], pid = child.id(), "process started");
        let stdout = Capture::start(child.stdout.take());
        let stderr = Capture::start(child.stderr.take());
        let mut process = FirecrackerProcess {
            child,
            argv,
            api: ApiClient::new(api_socket),
            inside,
            vsock_uds_path,
            jail_dir,
            serial_log: spec.serial_log.clone(),
            stdout,
            stderr,
            started: false,
            cleaned: false,
        };
        match process.wait_for_api().await {
            Ok(()) => Ok(process),
            Err(error) => {
                let _ = process.kill_and_clean().await;
                Err(error)
            }
        }
    }

    /// Spawns, configures and starts a VM; on failure nothing is left running or on disk.
    pub async fn launch(spec: &FirecrackerSpec) -> Result<FirecrackerProcess, FirecrackerError> {
        let mut process = FirecrackerProcess::spawn(spec).await?;
        let result = async {
            process.configure().await?;
            process.start().await
        }
        .await;
        process.kept_if(result).await
    }

    /// `self` when `result` (the steps that set it up) succeeded; otherwise killed, its files
    /// removed, and the error.
    async fn kept_if(
        mut self,
        result: Result<(), FirecrackerError>,
    ) -> Result<FirecrackerProcess, FirecrackerError> {
        match result {
            Ok(()) => Ok(self),
            Err(error) => {
                let _ = self.kill_and_clean().await;
                Err(error)
            }
        }
    }

    async fn wait_for_api(&mut self) -> Result<(), FirecrackerError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(API_SOCKET_SECONDS);
        loop {
            if let Some(status) = self.try_wait()? {
                self.stderr.finish().await;
                self.stdout.finish().await;
                return Err(FirecrackerError::EarlyExit {
                    argv: self.argv.join(" "),
                    status: status.to_string(),
                    stderr: self.stderr.text(),
                    log: self.log_text(),
                });
            }
            if tokio::net::UnixStream::connect(self.api.socket())
                .await
                .is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                self.kill_group();
                let _ = self.child.wait().await;
                self.stderr.finish().await;
                self.stdout.finish().await;
                return Err(FirecrackerError::NoApiSocket {
                    argv: self.argv.join(" "),
                    socket: self.api.socket().to_path_buf(),
                    seconds: API_SOCKET_SECONDS,
                    stderr: self.stderr.text(),
                    log: self.log_text(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends every configuration request ([`FirecrackerSpec::configuration_requests`]).
    pub async fn configure(&mut self) -> Result<(), FirecrackerError> {
        for request in self.inside.configuration_requests()? {
            self.request(&request).await?;
        }
        Ok(())
    }

    /// `InstanceStart`: boots the guest.
    pub async fn start(&mut self) -> Result<(), FirecrackerError> {
        self.request(&ApiRequest::instance_start()).await?;
        self.started = true;
        Ok(())
    }

    /// Sends one request. When it fails because Firecracker is gone, the error says so, with
    /// its status and stderr, rather than only that the socket stopped answering.
    pub async fn request(&mut self, request: &ApiRequest) -> Result<ApiResponse, FirecrackerError> {
        match self.api.send(request).await {
            Ok(response) => Ok(response),
            Err(error @ FirecrackerError::Api { .. }) => Err(error),
            Err(error) => {
                let exited = tokio::time::timeout(Duration::from_millis(200), self.child.wait());
                match exited.await {
                    Ok(Ok(status)) => {
                        self.stderr.finish().await;
                        self.stdout.finish().await;
                        Err(FirecrackerError::Exited {
                            argv: self.argv.join(" "),
                            status: status.to_string(),
                            during: request.describe(),
                            stderr: self.stderr.text(),
                            log: self.log_text(),
                        })
                    }
                    _ => Err(error),
                }
            }
        }
    }

    /// The API client (for reading state, e.g. `GET /vm/config`).
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// The API socket's host path.
    pub fn api_socket(&self) -> &Path {
        self.api.socket()
    }

    /// The vsock socket's host path, for [`crate::guest::GuestEndpoint`].
    pub fn vsock_uds_path(&self) -> Option<&Path> {
        self.vsock_uds_path.as_deref()
    }

    /// The jail's directory, when jailed.
    pub fn jail_dir(&self) -> Option<&Path> {
        self.jail_dir.as_deref()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// What Firecracker has written to stderr so far (its last 64 KiB).
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Has Firecracker exited (and with what)?
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, FirecrackerError> {
        self.child
            .try_wait()
            .map_err(|source| FirecrackerError::Wait {
                argv: self.argv.join(" "),
                source,
            })
    }

    /// Stops the VM: `SendCtrlAltDel`, up to `grace` for Firecracker to exit, then SIGKILL
    /// to its process group. Removes its sockets and jail.
    pub async fn stop(mut self, grace: Duration) -> Result<Stopped, FirecrackerError> {
        let stopped = self.stop_process(grace).await;
        let cleaned = self.clean().await;
        let stopped = stopped?;
        cleaned?;
        Ok(stopped)
    }

    async fn stop_process(&mut self, grace: Duration) -> Result<Stopped, FirecrackerError> {
        if let Some(status) = self.try_wait()? {
            return Ok(Stopped::AlreadyExited(status));
        }
        if self.started {
            // A refusal or no answer changes nothing: whether Firecracker exits decides.
            let deadline = tokio::time::Instant::now() + grace;
            let api = self.api.clone().with_timeout(grace);
            let _ = api.send(&ApiRequest::send_ctrl_alt_del()).await;
            if let Ok(status) = tokio::time::timeout_at(deadline, self.child.wait()).await {
                let status = status.map_err(|source| FirecrackerError::Wait {
                    argv: self.argv.join(" "),
                    source,
                })?;
                return Ok(Stopped::ShutDown(status));
            }
        }
        self.kill_group();
        self.child
            .wait()
            .await
            .map_err(|source| FirecrackerError::Wait {
                argv: self.argv.join(" "),
                source,
            })?;
        Ok(Stopped::Killed)
    }

    /// Lets Firecracker run on without this handle (a daemon's VM outlives the daemon); the
    /// returned handle finds it again. Its sockets and jail stay: they are the VM's.
    pub fn detach(mut self) -> Option<super::process::ProcessHandle> {
        self.cleaned = true;
        self.child.id().and_then(super::process::ProcessHandle::of)
    }

    /// SIGKILLs the process group at once and removes the sockets and jail.
    pub async fn kill(mut self) -> Result<(), FirecrackerError> {
        self.kill_and_clean().await
    }

    async fn kill_and_clean(&mut self) -> Result<(), FirecrackerError> {
        self.kill_group();
        let waited = self.child.wait().await;
        let cleaned = self.clean().await;
        waited.map_err(|source| FirecrackerError::Wait {
            argv: self.argv.join(" "),
            source,
        })?;
        cleaned
    }

    /// SIGKILL to the process group, while the child is not yet reaped (after that its pid,
    /// and so its group id, may belong to someone else).
    fn kill_group(&mut self) {
        if let Some(pid) = self.child.id() {
            let group = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Removes the sockets and the jail once Firecracker is gone; ends the output captures.
    async fn clean(&mut self) -> Result<(), FirecrackerError> {
        self.stderr.finish().await;
        self.stdout.finish().await;
        self.cleaned = true;
        self.remove_files()
    }

    fn remove_files(&self) -> Result<(), FirecrackerError> {
        let mut first_error = None;
        let mut note = |result: Result<(), FirecrackerError>| {
            if let Err(error) = result {
                first_error.get_or_insert(error);
            }
        };
        match &self.jail_dir {
            Some(dir) => note(remove_dir(dir)),
            None => {
                note(remove_file(self.api.socket()));
                if let Some(path) = &self.vsock_uds_path {
                    note(remove_file(path));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Firecracker's stdout so far: the captured pipe, or the serial log's end.
    fn log_text(&self) -> String {
        match &self.serial_log {
            Some(path) => read_tail(path, LOG_TAIL_BYTES),
            None => self.stdout.text(),
        }
    }
}

impl Drop for FirecrackerProcess {
    fn drop(&mut self) {
        if !self.cleaned {
            self.kill_group();
            let _ = self.remove_files();
        }
    }
}

fn remove_file(path: &Path) -> Result<(), FirecrackerError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(FirecrackerError::Cleanup {
                path: path.to_path_buf(),
                source: error,
            })
        }
        _ => Ok(()),
    }
}

fn remove_dir(path: &Path) -> Result<(), FirecrackerError> {
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(FirecrackerError::Cleanup {
                path: path.to_path_buf(),
                source: error,
            })
        }
        _ => Ok(()),
    }
}

/// Is something listening on this unix socket?
fn answers(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Removes a socket file left by a dead Firecracker; one that still answers is an error.
fn clear_stale_socket(path: &Path) -> Result<(), FirecrackerError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    if answers(path) {
        return Err(FirecrackerError::SocketInUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(|source| FirecrackerError::Prepare {
        what: "remove the stale socket",
        path: path.to_path_buf(),
        source,
    })
}

/// Removes a jail left by a dead run; one whose API socket answers is an error.
fn clear_stale_jail(jail_dir: &Path, api_socket: &Path) -> Result<(), FirecrackerError> {
    if answers(api_socket) {
        return Err(FirecrackerError::SocketInUse {
            path: api_socket.to_path_buf(),
        });
    }
    match std::fs::remove_dir_all(jail_dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(FirecrackerError::Prepare {
                what: "remove the stale jail",
                path: jail_dir.to_path_buf(),
                source: error,
            })
        }
        _ => Ok(()),
    }
}

/// Firecracker's logger opens an existing file only.
fn create_log_file(path: &Path) -> Result<(), FirecrackerError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(drop)
        .map_err(|source| FirecrackerError::Prepare {
            what: "create the log file",
            path: path.to_path_buf(),
            source,
        })
}

/// The last `bytes` of a file, as text (empty when unreadable).
fn read_tail(path: &Path, bytes: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(length.saturating_sub(bytes)))
        .is_err()
    {
        return String::new();
    }
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).into_owned()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::vm::firecracker) fn spec() -> FirecrackerSpec {
        FirecrackerSpec {
            binary: "/usr/local/bin/firecracker".into(),
            id: "vm-1".into(),
            jailer: None,
            api_socket: "/run/vm/api.sock".into(),
            vcpus: 2,
            memory_mib: 1024,
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd".into()),
            boot_args: "console=ttyS0 reboot=k panic=1".into(),
            drives: vec![
                Drive::root("/images/root.ext4"),
                Drive::writable("work", "/vm/work.ext4"),
            ],
            network_interfaces: vec![NetworkInterface {
                id: "eth0".into(),
                tap: "bgtap0".into(),
                guest_mac: Some(MacAddr([0x06, 0, 0xac, 0x10, 0, 0x02])),
            }],
            vsock: Some(Vsock::new("/run/vm/vsock.sock")),
            serial_log: Some("/vm/serial.log".into()),
            logger: Some(Logger {
                path: "/vm/firecracker.log".into(),
                level: LogLevel::Info,
            }),
            work_dir: None,
        }
    }

    fn render(requests: &[ApiRequest]) -> String {
        requests
            .iter()
            .map(|request| format!("{} {}", request.describe(), request.body_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn every_device_becomes_one_request_in_order() {
        let requests = spec().configuration_requests().unwrap();
        insta::assert_snapshot!(render(&requests), @r#"
        PUT /logger {"log_path":"/vm/firecracker.log","level":"Info","show_level":true,"show_log_origin":false}
        PUT /machine-config {"vcpu_count":2,"mem_size_mib":1024}
        PUT /boot-source {"kernel_image_path":"/k/vmlinux","initrd_path":"/k/initrd","boot_args":"console=ttyS0 reboot=k panic=1"}
        PUT /drives/rootfs {"drive_id":"rootfs","path_on_host":"/images/root.ext4","is_root_device":true,"is_read_only":true}
        PUT /drives/work {"drive_id":"work","path_on_host":"/vm/work.ext4","is_root_device":false,"is_read_only":false,"cache_type":"Writeback"}
        PUT /network-interfaces/eth0 {"iface_id":"eth0","host_dev_name":"bgtap0","guest_mac":"06:00:ac:10:00:02"}
        PUT /vsock {"guest_cid":3,"uds_path":"/run/vm/vsock.sock"}
        "#);
    }

    #[test]
    fn optional_devices_are_left_out() {
        let mut spec = spec();
        spec.logger = None;
        spec.initrd = None;
        spec.network_interfaces.clear();
        spec.vsock = None;
        spec.drives.truncate(1);
        let rendered = render(&spec.configuration_requests().unwrap());
        insta::assert_snapshot!(rendered, @r#"
        PUT /machine-config {"vcpu_count":2,"mem_size_mib":1024}
        PUT /boot-source {"kernel_image_path":"/k/vmlinux","boot_args":"console=ttyS0 reboot=k panic=1"}
        PUT /drives/rootfs {"drive_id":"rootfs","path_on_host":"/images/root.ext4","is_root_device":true,"is_read_only":true}
        "#);
    }

    #[test]
    fn ids_are_percent_encoded_in_paths_and_verbatim_in_bodies() {
        let mut spec = spec();
        spec.drives = vec![Drive::writable("a b", "/x")];
        let requests = spec.configuration_requests().unwrap();
        let drive = requests
            .iter()
            .find(|request| request.path.starts_with("/drives/"))
            .unwrap();
        assert_eq!(drive.path, "/drives/a%20b");
        assert_eq!(drive.body_json().unwrap()["drive_id"], "a b");
    }

    #[test]
    fn non_utf8_paths_are_refused_before_anything_runs() {
        use std::os::unix::ffi::OsStrExt;
        let mut spec = spec();
        spec.kernel = PathBuf::from(std::ffi::OsStr::from_bytes(b"/k/\xffvmlinux"));
        let error = spec.configuration_requests().unwrap_err();
        assert!(
            matches!(error, FirecrackerError::NonUtf8Path { what: "kernel", .. }),
            "{error:?}"
        );
    }

    #[test]
    fn the_command_line_names_the_socket_and_the_id() {
        assert_eq!(
            spec().argv(),
            [
                "/usr/local/bin/firecracker",
                "--api-sock",
                "/run/vm/api.sock",
                "--id",
                "vm-1"
            ]
        );
    }

    fn jailed() -> FirecrackerSpec {
        let mut spec = spec();
        spec.jailer = Some(JailerSpec {
            binary: "/usr/local/bin/jailer".into(),
            uid: 123,
            gid: 456,
            chroot_base_dir: "/srv/jailer".into(),
            netns: Some("/var/run/netns/vm1".into()),
        });
        spec
    }

    #[test]
    fn jailed_firecracker_is_started_by_the_jailer_with_paths_inside_the_jail() {
        let spec = jailed();
        assert_eq!(
            spec.argv().join(" "),
            "/usr/local/bin/jailer --id vm-1 --exec-file /usr/local/bin/firecracker --uid 123 \
             --gid 456 --chroot-base-dir /srv/jailer --netns /var/run/netns/vm1 -- --api-sock \
             /api.sock"
        );
        assert_eq!(
            spec.host_api_socket(),
            Path::new("/srv/jailer/firecracker/vm-1/root/api.sock")
        );
        assert_eq!(
            spec.host_vsock_uds_path().unwrap(),
            Path::new("/srv/jailer/firecracker/vm-1/root/vsock.sock")
        );
        let (inside, links) = jailer::inside_view(&spec);
        insta::assert_snapshot!(render(&inside.configuration_requests().unwrap()), @r#"
        PUT /logger {"log_path":"/firecracker.log","level":"Info","show_level":true,"show_log_origin":false}
        PUT /machine-config {"vcpu_count":2,"mem_size_mib":1024}
        PUT /boot-source {"kernel_image_path":"/vmlinux","initrd_path":"/initrd","boot_args":"console=ttyS0 reboot=k panic=1"}
        PUT /drives/rootfs {"drive_id":"rootfs","path_on_host":"/drive0","is_root_device":true,"is_read_only":true}
        PUT /drives/work {"drive_id":"work","path_on_host":"/drive1","is_root_device":false,"is_read_only":false,"cache_type":"Writeback"}
        PUT /network-interfaces/eth0 {"iface_id":"eth0","host_dev_name":"bgtap0","guest_mac":"06:00:ac:10:00:02"}
        PUT /vsock {"guest_cid":3,"uds_path":"/vsock.sock"}
        "#);
        let links: Vec<String> = links
            .iter()
            .map(|link| {
                format!(
                    "{} -> {}{}",
                    link.from.display(),
                    link.inside,
                    if link.owned { " (owned)" } else { "" }
                )
            })
            .collect();
        assert_eq!(
            links,
            [
                "/k/vmlinux -> /vmlinux",
                "/k/initrd -> /initrd",
                "/images/root.ext4 -> /drive0",
                "/vm/work.ext4 -> /drive1 (owned)",
                "/vm/firecracker.log -> /firecracker.log (owned)",
            ]
        );
    }

    #[test]
    fn process_errors_show_stderr_and_the_end_of_the_log() {
        let log: String = (1..=30).map(|line| format!("log line {line}\n")).collect();
        let error = FirecrackerError::EarlyExit {
            argv: "firecracker --api-sock /nope/api.sock".into(),
            status: "exit status: 1".into(),
            stderr: "Error: RunWithApi(FailedToBindAndRunHttpServer(…))\n".into(),
            log,
        };
        let text = error.to_string();
        assert!(
            text.contains("firecracker --api-sock /nope/api.sock"),
            "{text}"
        );
        assert!(text.contains("\nstderr:\n  Error: RunWithApi"), "{text}");
        assert!(text.contains("log line 30"), "{text}");
        assert!(text.contains("log line 11\n"), "{text}");
        assert!(!text.contains("log line 10\n"), "{text}");
    }

    #[test]
    fn a_stale_socket_is_removed_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let error = clear_stale_socket(&path).unwrap_err();
        assert!(
            matches!(error, FirecrackerError::SocketInUse { .. }),
            "{error:?}"
        );
        drop(listener);
        clear_stale_socket(&path).unwrap();
        assert!(!path.exists());
        clear_stale_socket(&path).unwrap();
    }

    #[tokio::test]
    async fn a_jail_id_that_could_name_another_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = jailed();
        if let Some(jailer) = &mut spec.jailer {
            jailer.chroot_base_dir = dir.path().to_path_buf();
        }
        std::fs::create_dir_all(dir.path().join("firecracker/other/root")).unwrap();
        for id in ["", "..", "a/b", "a b", &"x".repeat(65)] {
            spec.id = id.to_owned();
            let error = FirecrackerProcess::spawn(&spec).await.unwrap_err();
            assert!(
                matches!(error, FirecrackerError::InvalidJailId { .. }),
                "{id:?}: {error:?}"
            );
        }
        assert!(dir.path().join("firecracker/other/root").exists());
    }

    #[tokio::test]
    async fn a_missing_binary_is_reported_as_not_installed() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec();
        spec.binary = dir.path().join("no-firecracker");
        spec.api_socket = dir.path().join("api.sock");
        spec.vsock = None;
        spec.logger = None;
        spec.serial_log = None;
        let error = FirecrackerProcess::spawn(&spec).await.unwrap_err();
        assert!(
            matches!(error, FirecrackerError::NotInstalled { .. }),
            "{error:?}"
        );
    }
}
