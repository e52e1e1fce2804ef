//! The CLI's side: connect to the daemon, starting it when none runs.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::DaemonError;
use super::protocol::{ErrorKind, PROTOCOL_VERSION, Request, Response};

/// How long a freshly started daemon may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A greeted connection to the daemon.
#[derive(Debug)]
pub struct DaemonClient {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    /// The daemon's pid, from its greeting.
    pub pid: u32,
}

/// How to start a daemon: the binary and where its stderr goes.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub executable: PathBuf,
    pub log: PathBuf,
}

impl DaemonClient {
    /// Connects to a running daemon; `Ok(None)` when none listens on `socket`.
    pub async fn connect(socket: &Path) -> Result<Option<DaemonClient>, DaemonError> {
        let stream = match UnixStream::connect(socket).await {
            Ok(stream) => stream,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None);
            }
            Err(source) => {
                return Err(DaemonError::Io {
                    path: socket.to_owned(),
                    source,
                });
            }
        };
        // The socket's directory could be another user's (a planted /tmp/banger-<uid>): check
        // who serves it before sending anything.
        let peer = stream.peer_cred().map_err(|source| DaemonError::Io {
            path: socket.to_owned(),
            source,
        })?;
        if !super::trusted_peer(peer.uid()) {
            return Err(DaemonError::ForeignDaemon {
                socket: socket.to_owned(),
                peer: peer.uid(),
                uid: nix::unistd::geteuid().as_raw(),
            });
        }
        let (reader, writer) = stream.into_split();
        let mut client = DaemonClient {
            lines: BufReader::new(reader).lines(),
            writer,
            pid: 0,
        };
        let hello = Request::Hello {
            protocol: PROTOCOL_VERSION,
            client_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        match client.request(&hello).await? {
            Response::Hello { pid, .. } => {
                client.pid = pid;
                Ok(Some(client))
            }
            Response::Error {
                kind: ErrorKind::Version,
                message,
            } => Err(DaemonError::Version { message }),
            other => Err(DaemonError::Unexpected {
                during: "hello",
                response: format!("{other:?}"),
            }),
        }
    }

    /// Connects, starting the daemon first if none runs (or replacing one of another
    /// protocol version).
    pub async fn connect_or_start(
        socket: &Path,
        launcher: &Launcher,
    ) -> Result<DaemonClient, DaemonError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match DaemonClient::connect(socket).await {
                Ok(Some(client)) => return Ok(client),
                Ok(None) => break,
                Err(DaemonError::Version { .. }) => {
                    stop(socket).await?;
                    break;
                }
                // A daemon killed a moment ago can still accept and then reset: once it is
                // gone, the socket refuses and a new one is started.
                Err(error) if error.is_a_dying_daemon() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error),
            }
        }
        start(socket, launcher).await
    }

    /// Sends `request` and returns the response that ends it, passing events to `on_event`.
    pub async fn request_with_events(
        &mut self,
        request: &Request,
        mut on_event: impl FnMut(serde_json::Value),
    ) -> Result<Response, DaemonError> {
        let mut line = serde_json::to_string(request).expect("requests serialize");
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|source| DaemonError::Lost { source })?;
        loop {
            let line = self
                .lines
                .next_line()
                .await
                .map_err(|source| DaemonError::Lost { source })?
                .ok_or_else(|| DaemonError::Lost {
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                })?;
            let response: Response =
                serde_json::from_str(&line).map_err(|error| DaemonError::Unexpected {
                    during: "a response",
                    response: format!("{line} ({error})"),
                })?;
            match response {
                Response::Event(event) => on_event(event),
                other => return Ok(other),
            }
        }
    }

    /// Sends `request` and returns the response that ends it (events are dropped).
    pub async fn request(&mut self, request: &Request) -> Result<Response, DaemonError> {
        self.request_with_events(request, |_| {}).await
    }
}

/// Asks the daemon on `socket` to stop and waits until its socket is gone. Nothing
/// running is not an error.
pub async fn stop(socket: &Path) -> Result<Option<u32>, DaemonError> {
    let stream = match UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(_) => return Ok(None),
    };
    let pid = super::server::lock_pid(socket);
    let (reader, mut writer) = stream.into_split();
    let mut line = serde_json::to_string(&Request::Stop).expect("requests serialize");
    line.push('\n');
    writer
        .write_all(line.as_bytes())
        .await
        .map_err(|source| DaemonError::Lost { source })?;
    let mut lines = BufReader::new(reader).lines();
    let _ = lines.next_line().await;
    let deadline = Instant::now() + START_TIMEOUT;
    while socket.exists() {
        if Instant::now() >= deadline {
            return Err(DaemonError::StopTimeout {
                socket: socket.to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(pid)
}

/// Starts `launcher.executable daemon run` detached (its own process group, so the
/// terminal's Ctrl-C does not reach it; stderr appended to the log) and connects.
async fn start(socket: &Path, launcher: &Launcher) -> Result<DaemonClient, DaemonError> {
    if let Some(dir) = launcher.log.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    super::log::rotate_if_over(&launcher.log, super::log::LOG_CAP).map_err(|source| {
        DaemonError::Io {
            path: launcher.log.clone(),
            source,
        }
    })?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launcher.log)
        .map_err(|source| DaemonError::Io {
            path: launcher.log.clone(),
            source,
        })?;
    let log_start = log.metadata().map(|meta| meta.len()).unwrap_or(0);
    let argv = format!("{} daemon run", launcher.executable.display());
    let mut child = std::process::Command::new(&launcher.executable)
        .args(["daemon", "run"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|source| DaemonError::Spawn {
            argv: argv.clone(),
            source,
        })?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(client) = DaemonClient::connect(socket).await? {
            // Not waited for: it outlives this process (init reaps it).
            drop(child);
            return Ok(client);
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Another client may have started one at the same moment: ours found it holding
            // the lock and left. Wait for that one to listen (it finds its VMs first).
            if other_daemon_starting(socket) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            if let Some(client) = DaemonClient::connect(socket).await? {
                return Ok(client);
            }
            return Err(DaemonError::StartFailed {
                argv,
                status: status.to_string(),
                log: launcher.log.clone(),
                stderr: crate::vm::log_since(&launcher.log, log_start),
            });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(DaemonError::StartFailed {
                argv,
                status: format!("no answer within {} s", START_TIMEOUT.as_secs()),
                log: launcher.log.clone(),
                stderr: crate::vm::log_since(&launcher.log, log_start),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a live daemon holds the lock next to `socket` (it may not listen yet).
fn other_daemon_starting(socket: &Path) -> bool {
    super::server::lock_pid(socket)
        .and_then(crate::vm::process::ProcessHandle::of)
        .is_some_and(|daemon| daemon.is_alive())
}
