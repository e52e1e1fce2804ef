//! The daemon process: one per user, found through its socket.
//!
//! Start-up, in order, each step undone if a later one fails (a [`Running`] guard owns what
//! was made):
//! 1. the runtime directory (0700);
//! 2. an exclusive `flock` on `daemon.lock` there, holding our pid: a second daemon stops
//!    here with [`DaemonError::AlreadyRunning`] and touches nothing;
//! 3. a socket left by a daemon that died (the lock proves none runs) is removed;
//! 4. bind `banger.sock`, mode 0600 (only this user may talk to the daemon).
//!
//! It serves until `Stop`, SIGTERM or SIGINT, then removes the socket and the lock file.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::DaemonError;
use super::protocol::Progress;
use super::protocol::{DaemonStatus, ErrorKind, PROTOCOL_VERSION, Request, Response};
use crate::ops::vms::{VmProgress, Vms, timeout};
use crate::paths::Paths;

/// What a running daemon holds; dropping it removes the socket, then releases the lock.
struct Running {
    socket: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<std::fs::File>,
    bound: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.bound {
            let _ = std::fs::remove_file(&self.socket);
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// The lock file next to `socket`.
pub fn lock_path(socket: &Path) -> PathBuf {
    socket.with_file_name("daemon.lock")
}

/// The pid a daemon wrote into the lock file next to `socket` (it may have died since).
pub fn lock_pid(socket: &Path) -> Option<u32> {
    std::fs::read_to_string(lock_path(socket))
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// Runs the daemon for `paths` (on [`Paths::socket`]) until asked to stop.
pub async fn run(paths: &Paths) -> Result<(), DaemonError> {
    let socket = &paths.socket();
    let dir = socket.parent().expect("the socket lives in a directory");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DaemonError::Io { path, source }
    };
    crate::paths::ensure_runtime_dir(dir)?;
    let lock_path = lock_path(socket);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        // Never through a link, even in a directory that is ours.
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            return Err(DaemonError::AlreadyRunning {
                pid: lock_pid(socket),
                socket: socket.to_owned(),
            });
        }
        Err((_, errno)) => {
            return Err(DaemonError::Io {
                path: lock_path,
                source: errno.into(),
            });
        }
    };
    let mut running = Running {
        socket: socket.to_owned(),
        lock_path: lock_path.clone(),
        _lock: lock,
        bound: false,
    };
    {
        use std::io::{Seek, Write};
        let mut file: &std::fs::File = &running._lock;
        file.set_len(0).map_err(io(&lock_path))?;
        file.seek(std::io::SeekFrom::Start(0))
            .map_err(io(&lock_path))?;
        writeln!(file, "{}", std::process::id()).map_err(io(&lock_path))?;
    }
    // Before the socket exists: no client can ask about VMs the daemon has not found yet.
    let vms = Vms::open(paths.clone())
        .await
        .map_err(|source| DaemonError::Vms { source })?;
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(socket)(error)),
    }
    let listener = UnixListener::bind(socket).map_err(io(socket))?;
    running.bound = true;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(io(socket))?;

    let state = Arc::new(State {
        socket: socket.to_owned(),
        started_ms: crate::store::now_ms(),
        connections: AtomicU64::new(0),
        stop: tokio::sync::Notify::new(),
        vms: Arc::new(vms),
    });
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io(socket))?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // The socket is 0600 in a 0700 directory; this is the second lock on the door.
                match stream.peer_cred() {
                    Ok(peer) if super::trusted_peer(peer.uid()) => {}
                    _ => continue,
                }
                state.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve_connection(stream, Arc::clone(&state)));
            }
            () = state.stop.notified() => break,
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(listener);
    state.vms.shutdown();
    drop(running);
    Ok(())
}

struct State {
    socket: PathBuf,
    started_ms: u64,
    connections: AtomicU64,
    stop: tokio::sync::Notify,
    vms: Arc<Vms>,
}

async fn serve_connection(stream: UnixStream, state: Arc<State>) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut greeted = false;
    let mut line = Vec::new();
    loop {
        match crate::limits::read_line_capped(
            &mut reader,
            crate::limits::DAEMON_REQUEST_LINE,
            &mut line,
        )
        .await
        {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => {
                // Said once, then the connection is closed: the rest of the line is unread.
                let _ = write_line(
                    &mut writer,
                    &Response::Error {
                        kind: ErrorKind::BadRequest,
                        message: format!("not a request: {error}"),
                    },
                )
                .await;
                break;
            }
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Err(error) => Response::Error {
                kind: ErrorKind::BadRequest,
                message: format!("not a request: {error}"),
            },
            Ok(Request::Hello { protocol, .. }) if protocol != PROTOCOL_VERSION => {
                Response::Error {
                    kind: ErrorKind::Version,
                    message: format!(
                        "this daemon (pid {}, banger {}) speaks protocol {PROTOCOL_VERSION}, \
                         the client {protocol}",
                        std::process::id(),
                        env!("CARGO_PKG_VERSION")
                    ),
                }
            }
            Ok(Request::Hello { .. }) => {
                greeted = true;
                Response::Hello {
                    protocol: PROTOCOL_VERSION,
                    daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
                    pid: std::process::id(),
                }
            }
            // Stop is honoured without a greeting: it is how a client of another version
            // replaces this daemon.
            Ok(Request::Stop) => {
                let _ = write_line(&mut writer, &Response::Stopping).await;
                state.stop.notify_one();
                return;
            }
            Ok(_) if !greeted => Response::Error {
                kind: ErrorKind::BadRequest,
                message: "say hello first".into(),
            },
            Ok(Request::Status) => Response::Status(DaemonStatus {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                protocol: PROTOCOL_VERSION,
                socket: state.socket.display().to_string(),
                started_ms: state.started_ms,
                connections: state.connections.load(Ordering::Relaxed),
            }),
            Ok(request) => {
                if serve_vm_request(request, &state, &mut writer)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        if write_line(&mut writer, &response).await.is_err() {
            return;
        }
    }
}

/// Runs a VM request in a task of its own (a client that goes away does not cancel it
/// halfway), relaying its progress events, then its answer.
async fn serve_vm_request(
    request: Request,
    state: &Arc<State>,
    writer: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let remove_if_abandoned =
        matches!(&request, Request::VmCreate(create) if create.remove_if_abandoned);
    let (kind, vm) = request.describe();
    let vm = vm.to_owned();
    let started = std::time::Instant::now();
    tracing::info!(request = kind, vm, "request");
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let events = Events(sender);
    let vms = Arc::clone(&state.vms);
    let task = tokio::spawn(async move {
        let result = match request {
            Request::VmCreate(create) => vms
                .create(&create, &events)
                .await
                .map(|info| Response::Vm(Box::new(info))),
            Request::VmStart { name, timeout_secs } => vms
                .start(&name, timeout(timeout_secs), &events)
                .await
                .map(|info| Response::Vm(Box::new(info))),
            Request::VmStop { name, timeout_secs } => vms
                .stop(
                    &name,
                    timeout_secs.map(std::time::Duration::from_secs),
                    &events,
                )
                .await
                .map(|info| Response::Vm(Box::new(info))),
            Request::VmRestart { name, timeout_secs } => vms
                .restart(&name, timeout(timeout_secs), &events)
                .await
                .map(|info| Response::Vm(Box::new(info))),
            Request::VmSet(set) => vms
                .set(&set, &events)
                .await
                .map(|info| Response::Vm(Box::new(info))),
            Request::VmKill { name } => vms
                .kill(&name)
                .await
                .map(|info| Response::Vm(Box::new(info))),
            Request::VmDelete { name, force } => vms
                .delete(&name, force)
                .await
                .map(|()| Response::Deleted { name }),
            Request::VmUp(up) => vms
                .up(&up, &events)
                .await
                .map(|report| Response::VmUp(Box::new(report))),
            Request::VmList => vms.list().await.map(Response::Vms),
            Request::VmShow { name } => vms
                .show(&name)
                .await
                .map(|info| Response::Vm(Box::new(info))),
            Request::NetworkDown => vms
                .network_down()
                .await
                .map(|removed| Response::NetworkDown {
                    bridge: removed.bridge,
                    taps: removed.taps,
                    nft_table: removed.nft_table,
                }),
            Request::Hello { .. } | Request::Status | Request::Stop => {
                unreachable!("answered by serve_connection")
            }
        };
        result.unwrap_or_else(|error| Response::Error {
            kind: ErrorKind::of(crate::error::Classify::class(&error)),
            message: crate::error::error_chain(&error),
        })
    });
    tokio::pin!(task);
    let response = loop {
        tokio::select! {
            // A client that went away still gets its request finished (and, for an abandoned
            // `vm run --rm`, cleaned up below).
            Some(event) = receiver.recv() => { let _ = write_line(writer, &event).await; }
            joined = &mut task => break joined.unwrap_or_else(|error| Response::Error {
                kind: ErrorKind::Failed,
                message: format!("the daemon's task failed: {error}"),
            }),
        }
    };
    match &response {
        Response::Error {
            kind: error,
            message,
        } => tracing::info!(
            request = kind,
            vm,
            millis = started.elapsed().as_millis() as u64,
            error = ?error,
            message = message.as_str(),
            "request failed"
        ),
        _ => tracing::info!(
            request = kind,
            vm,
            millis = started.elapsed().as_millis() as u64,
            "request done"
        ),
    }
    let mut delivered = Ok(());
    while let Ok(event) = receiver.try_recv() {
        delivered = delivered.and(write_line(writer, &event).await);
    }
    let delivered = delivered.and(write_line(writer, &response).await);
    if delivered.is_err()
        && remove_if_abandoned
        && let Response::Vm(info) = &response
    {
        // Nobody is left to use or delete this one-shot VM.
        let _ = state.vms.delete(&info.name, true).await;
    }
    delivered
}

async fn write_line(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_string(response).map_err(std::io::Error::other)?;
    line.push('\n');
    writer.write_all(line.as_bytes()).await
}

/// Where one request's progress goes: its client's response channel.
#[derive(Debug, Clone)]
struct Events(tokio::sync::mpsc::UnboundedSender<Response>);

impl Events {
    fn send(&self, progress: &Progress) {
        if let Ok(value) = serde_json::to_value(progress) {
            // A client that went away stops listening; the work goes on.
            let _ = self.0.send(Response::Event(value));
        }
    }
}

impl crate::engine::Reporter for Events {
    fn report(&self, event: &crate::engine::Event) {
        self.send(&Progress::Engine(event.clone()));
    }
}

impl VmProgress for Events {
    fn note(&self, text: String) {
        self.send(&Progress::Note(text));
    }

    fn detail(&self, text: String) {
        self.send(&Progress::Detail(text));
    }
}
