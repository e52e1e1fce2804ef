use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::error_chain;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::error::GuestError;
use super::protocol::{
    self, DATA_CHUNK, End, ErrorKind, ErrorReply, Exec, FileInfo, FrameHeader, FrameType, GetFile,
    GuestStats, HEADER_LEN, Hello, Listener, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, PutFile,
    Ready, TTY_PROTOCOL_VERSION, WindowSize, encode_frame, encode_json_frame,
};

/// Where a guest's agent is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEndpoint {
    /// A VMM's hybrid vsock socket (Firecracker, vhost-device-vsock) and the guest port.
    HybridVsock { uds_path: PathBuf, port: u32 },
    /// An agent listening on a unix socket (`banger-agent --listen-unix`).
    Unix { path: PathBuf },
    /// The host socket of the guest's virtio-serial port `banger.0`.
    Serial { path: PathBuf },
}

impl fmt::Display for GuestEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestEndpoint::HybridVsock { uds_path, port } => {
                write!(f, "vsock port {port} via {}", uds_path.display())
            }
            GuestEndpoint::Unix { path } => write!(f, "{}", path.display()),
            GuestEndpoint::Serial { path } => write!(f, "serial {}", path.display()),
        }
    }
}

/// Pause between attempts while a guest is not up yet; doubles up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(10);
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(200);

impl GuestEndpoint {
    /// Connects once, retrying only the hybrid vsock handshake until `deadline`.
    pub async fn connect(&self, deadline: Instant) -> Result<GuestChannel, GuestError> {
        match self {
            GuestEndpoint::HybridVsock { uds_path, port } => {
                GuestChannel::connect_hybrid_vsock(uds_path, *port, deadline).await
            }
            GuestEndpoint::Unix { path } => GuestChannel::connect_unix(path).await,
            GuestEndpoint::Serial { path } => GuestChannel::connect_serial(path).await,
        }
    }

    /// Connects and exchanges `Hello`/`Ready`, retrying every failure until `deadline`: a
    /// booting guest's socket may not exist yet, or accept and then close.
    pub async fn wait_ready(&self, deadline: Instant) -> Result<(GuestChannel, Ready), GuestError> {
        let endpoint = self.to_string();
        retry_until(deadline, &endpoint, || async {
            let mut channel = self.connect(deadline).await?;
            let ready = channel.hello().await?;
            Ok((channel, ready))
        })
        .await
    }
}

/// Runs `attempt` until it succeeds or `deadline` passes, pausing between tries; the error
/// then is [`GuestError::NotReady`] naming the last failure. A version mismatch, found by
/// either side, is final: retrying cannot change it.
async fn retry_until<T, F, Fut>(
    deadline: Instant,
    endpoint: &str,
    mut attempt: F,
) -> Result<T, GuestError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, GuestError>>,
{
    let started = Instant::now();
    let mut pause = FIRST_RETRY_PAUSE;
    loop {
        let last = match tokio::time::timeout_at(deadline.into(), attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) if is_version_mismatch(&error) => return Err(error),
            Ok(Err(error)) => error_chain(&error),
            Err(_) => "timed out".to_owned(),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(GuestError::NotReady {
                endpoint: endpoint.to_owned(),
                waited: started.elapsed(),
                last,
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
    }
}

/// Whether `error` says the two sides share no protocol version: this client's own check of
/// `Ready`, or the agent's `unsupported_version` answer to `Hello`.
fn is_version_mismatch(error: &GuestError) -> bool {
    matches!(
        error,
        GuestError::UnsupportedVersion { .. }
            | GuestError::Remote {
                kind: ErrorKind::UnsupportedVersion,
                ..
            }
    )
}

/// A unix stream to `path`, its failure naming the path.
async fn connect_stream(path: &Path) -> Result<UnixStream, GuestError> {
    UnixStream::connect(path)
        .await
        .map_err(|source| GuestError::Connect {
            path: path.to_owned(),
            source,
        })
}

/// How a guest command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit {code}"),
            ExitStatus::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Code(code) => Some(code),
            ExitStatus::Signal(_) => None,
        }
    }

    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Signal(signal) => Some(signal),
            ExitStatus::Code(_) => None,
        }
    }
}

impl Exec {
    /// Runs `argv` directly, with no shell.
    pub fn argv<I, S>(argv: I) -> Exec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Exec {
            argv: Some(argv.into_iter().map(Into::into).collect()),
            ..Exec::default()
        }
    }

    /// Runs `line` with `/bin/sh -c`.
    pub fn shell(line: impl Into<String>) -> Exec {
        Exec {
            shell: Some(line.into()),
            ..Exec::default()
        }
    }

    /// Sets one environment variable.
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Exec {
        self.env.insert(name.into(), value.into());
        self
    }

    pub fn with_cwd(mut self, cwd: impl Into<String>) -> Exec {
        self.cwd = Some(cwd.into());
        self
    }

    /// Streams the `stdin` reader given to [`GuestChannel::exec`] to the command.
    pub fn with_stdin(mut self) -> Exec {
        self.stdin = true;
        self
    }
}

/// One connection to a guest's agent, serving one request at a time.
#[derive(Debug)]
pub struct GuestChannel {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// 0 on sockets; a random number on the serial transport, whose stream other channels
    /// (earlier connections' leftovers) may share.
    channel: u32,
    /// Set while a request is in flight; still set afterwards if it was cancelled or broke
    /// off, because the stream is then out of step.
    busy: bool,
    /// The version `Hello` settled on; 1 until then, as the agent assumes.
    protocol: u32,
}

impl GuestChannel {
    fn new(stream: UnixStream, channel: u32) -> GuestChannel {
        let (read_half, write_half) = stream.into_split();
        GuestChannel {
            reader: BufReader::with_capacity(HEADER_LEN + DATA_CHUNK, read_half),
            writer: write_half,
            channel,
            busy: false,
            protocol: 1,
        }
    }

    /// Connects to an agent listening on a unix socket.
    pub async fn connect_unix(path: &Path) -> Result<GuestChannel, GuestError> {
        Ok(GuestChannel::new(connect_stream(path).await?, 0))
    }

    /// Connects to the host socket of a guest's virtio-serial port, on a fresh channel.
    pub async fn connect_serial(path: &Path) -> Result<GuestChannel, GuestError> {
        Ok(GuestChannel::new(
            connect_stream(path).await?,
            fastrand::u32(1..),
        ))
    }

    /// Connects to guest `port` through a VMM's hybrid vsock socket, retrying until
    /// `deadline` while the socket is missing or the VMM turns the connection down (nothing
    /// listens in the guest yet).
    pub async fn connect_hybrid_vsock(
        uds_path: &Path,
        port: u32,
        deadline: Instant,
    ) -> Result<GuestChannel, GuestError> {
        let endpoint = format!("vsock port {port} via {}", uds_path.display());
        retry_until(deadline, &endpoint, || hybrid_vsock_once(uds_path, port)).await
    }

    /// Exchanges versions. Returns the agent's [`Ready`]; its `protocol` is the version both
    /// sides use.
    pub async fn hello(&mut self) -> Result<Ready, GuestError> {
        const DURING: &str = "Hello";
        self.begin()?;
        self.send_json(
            FrameType::Hello,
            "Hello",
            &Hello {
                version: PROTOCOL_VERSION,
            },
        )
        .await?;
        let (kind, payload) = read_frame(&mut self.reader, self.channel, DURING).await?;
        match kind {
            FrameType::Ready => {
                let ready: Ready = decode(&payload, DURING)?;
                self.busy = false;
                if ready.protocol < MIN_PROTOCOL_VERSION || ready.protocol > PROTOCOL_VERSION {
                    return Err(GuestError::UnsupportedVersion {
                        agent: ready.protocol,
                    });
                }
                self.protocol = ready.protocol;
                Ok(ready)
            }
            FrameType::Error => {
                let reply: ErrorReply = decode(&payload, DURING)?;
                self.busy = false;
                Err(remote(DURING, reply))
            }
            other => Err(unexpected(DURING, other)),
        }
    }

    /// Runs a command, streaming `stdin` to it (when the request asks for stdin) and its
    /// output to `stdout` and `stderr` as it comes, until it ends. Stdin not yet sent when the
    /// command ends is not read.
    pub async fn exec<I, O, E>(
        &mut self,
        request: &Exec,
        stdin: I,
        stdout: O,
        stderr: E,
    ) -> Result<ExitStatus, GuestError>
    where
        I: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        self.exec_with_resizes(request, stdin, stdout, stderr, None)
            .await
    }

    /// [`GuestChannel::exec`] of a command on a pseudo-terminal (`request.tty`, protocol 2):
    /// its output (stdout and stderr in one) goes to `stdout`, and each window size received
    /// from `resizes` is sent on as it comes. An agent that speaks only protocol 1 is
    /// [`GuestError::TtyUnsupported`], before anything is sent.
    pub async fn exec_tty<I, O>(
        &mut self,
        request: &Exec,
        stdin: I,
        stdout: O,
        resizes: tokio::sync::mpsc::UnboundedReceiver<WindowSize>,
    ) -> Result<ExitStatus, GuestError>
    where
        I: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
    {
        self.exec_with_resizes(request, stdin, stdout, tokio::io::sink(), Some(resizes))
            .await
    }

    async fn exec_with_resizes<I, O, E>(
        &mut self,
        request: &Exec,
        mut stdin: I,
        mut stdout: O,
        mut stderr: E,
        mut resizes: Option<tokio::sync::mpsc::UnboundedReceiver<WindowSize>>,
    ) -> Result<ExitStatus, GuestError>
    where
        I: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        const DURING: &str = "Exec";
        if request.tty && self.protocol < TTY_PROTOCOL_VERSION {
            return Err(GuestError::TtyUnsupported {
                agent: self.protocol,
            });
        }
        self.begin()?;
        self.send_json(FrameType::Exec, DURING, request).await?;
        let channel = self.channel;
        let writer = &mut self.writer;
        let reader = &mut self.reader;
        let receive = async {
            // Outer error: the stream broke off. Inner: the agent refused, cleanly.
            loop {
                let (kind, payload) = read_frame(reader, channel, DURING).await?;
                match kind {
                    FrameType::Stdout => write_local(&mut stdout, &payload, "stdout").await?,
                    FrameType::Stderr => write_local(&mut stderr, &payload, "stderr").await?,
                    FrameType::Exit => {
                        let exit: protocol::Exit = decode(&payload, DURING)?;
                        flush_local(&mut stdout, "stdout").await?;
                        flush_local(&mut stderr, "stderr").await?;
                        return match (exit.code, exit.signal) {
                            (Some(code), _) => Ok::<_, GuestError>(Ok(ExitStatus::Code(code))),
                            (None, Some(signal)) => Ok(Ok(ExitStatus::Signal(signal))),
                            (None, None) => Err(GuestError::Protocol {
                                during: DURING,
                                message: "Exit without code or signal".into(),
                            }),
                        };
                    }
                    FrameType::Error => return Ok(Err(remote(DURING, decode(&payload, DURING)?))),
                    other => return Err(unexpected(DURING, other)),
                }
            }
        };
        tokio::pin!(receive);
        // Stdin is fed from this loop, not a future of its own, so that what was sent is known
        // when the command ends: `read` and `write` are cancel-safe, and `frame` and `written`
        // are the frame being sent and how much of it the agent has.
        let mut feeding = request.stdin;
        let mut buffer = vec![0u8; if feeding { DATA_CHUNK } else { 0 }];
        let mut frame = Vec::new();
        let mut written = 0;
        let outcome = loop {
            tokio::select! {
                outcome = &mut receive => break outcome,
                size = next_resize(&mut resizes), if frame.is_empty() => {
                    match size {
                        Some(size) => frame = encode_json_frame(FrameType::Resize, channel, &size),
                        // The sender is gone: no more resizes to wait for.
                        None => resizes = None,
                    }
                }
                read = stdin.read(&mut buffer), if feeding && frame.is_empty() => {
                    let count = read.map_err(|source| GuestError::LocalRead {
                        what: "stdin",
                        source,
                    })?;
                    frame = if count == 0 {
                        feeding = false;
                        encode_frame(FrameType::StdinEof, channel, b"")
                    } else {
                        encode_frame(FrameType::Stdin, channel, &buffer[..count])
                    };
                }
                sent = writer.write(&frame[written..]), if !frame.is_empty() => {
                    let what = frame_name(&frame);
                    match sent {
                        Ok(0) => {
                            return Err(GuestError::Send {
                                what,
                                source: std::io::ErrorKind::WriteZero.into(),
                            });
                        }
                        Ok(count) => written += count,
                        Err(source) => return Err(GuestError::Send { what, source }),
                    }
                    if written == frame.len() {
                        frame.clear();
                        written = 0;
                    }
                }
            }
        };
        let result = outcome?;
        // The command is over and the rest of stdin is dropped, but a frame cut in the middle
        // would swallow the next request: finish it. The agent ignores `Stdin` after `Exit`.
        if written > 0 {
            write_all_to(writer, &frame[written..], frame_name(&frame)).await?;
        }
        self.busy = false;
        result
    }

    /// The guest's listening sockets with the processes holding them: the agent's own
    /// `ports --json` run through `Exec`, so it works in images without `ss` or `netstat`.
    pub async fn listeners(&mut self) -> Result<Vec<Listener>, GuestError> {
        self.agent_json("ports").await
    }

    /// The guest's uptime, load, memory and disk use: the agent's `stats --json`.
    pub async fn stats(&mut self) -> Result<GuestStats, GuestError> {
        self.agent_json("stats").await
    }

    /// Runs `banger-agent COMMAND --json` in the guest and parses what it prints.
    async fn agent_json<T: DeserializeOwned>(
        &mut self,
        command: &'static str,
    ) -> Result<T, GuestError> {
        let arguments = ["--json".to_owned()];
        let mut stdout = Vec::new();
        let (status, stderr) = self
            .agent_command(command, &arguments, None::<&[u8]>, &mut stdout)
            .await?;
        if !status.success() {
            return Err(GuestError::AgentCommand {
                argv: agent_argv(command, &arguments),
                status: status.to_string(),
                stderr,
            });
        }
        serde_json::from_slice(&stdout).map_err(|error| GuestError::Protocol {
            during: command,
            message: format!(
                "cannot parse what `{}` printed: {error}",
                agent_argv(command, &arguments)
            ),
        })
    }

    /// Runs the agent's own `banger-agent COMMAND ARGUMENTS...` in the guest, forwarding
    /// `stdin` when given and writing its stdout to `stdout` as it comes; returns its exit
    /// status and what it wrote to stderr (trimmed). An agent without COMMAND, from an image
    /// built before this banger, is [`GuestError::AgentTooOld`].
    pub async fn agent_command<I, O>(
        &mut self,
        command: &'static str,
        arguments: &[String],
        stdin: Option<I>,
        stdout: O,
    ) -> Result<(ExitStatus, String), GuestError>
    where
        I: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
    {
        let argv = std::iter::once(crate::assets::AGENT_GUEST_PATH.to_owned())
            .chain(std::iter::once(command.to_owned()))
            .chain(arguments.iter().cloned());
        let mut request = Exec::argv(argv);
        let mut stderr = Vec::new();
        let status = match stdin {
            Some(stdin) => {
                request = request.with_stdin();
                self.exec(&request, stdin, stdout, &mut stderr).await?
            }
            None => {
                self.exec(&request, tokio::io::empty(), stdout, &mut stderr)
                    .await?
            }
        };
        let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
        // What `banger-agent` says of a command it does not have.
        if !status.success() && stderr.contains(&format!("unknown command `{command}`")) {
            return Err(GuestError::AgentTooOld { command });
        }
        Ok((status, stderr))
    }

    /// Writes a file in the guest: `request.size` bytes read from `data`, installed
    /// atomically with the request's mode and owner.
    pub async fn put_file<R>(&mut self, request: &PutFile, mut data: R) -> Result<(), GuestError>
    where
        R: AsyncRead + Unpin,
    {
        const DURING: &str = "PutFile";
        self.begin()?;
        self.send_json(FrameType::PutFile, DURING, request).await?;
        let mut remaining = request.size;
        let mut buffer = vec![0u8; DATA_CHUNK];
        while remaining > 0 {
            let want = buffer
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let count =
                data.read(&mut buffer[..want])
                    .await
                    .map_err(|source| GuestError::LocalRead {
                        what: "file",
                        source,
                    })?;
            if count == 0 {
                // The agent still waits for the rest: this channel cannot be reused.
                return Err(GuestError::LocalRead {
                    what: "file",
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the source ended {remaining} bytes short of the announced size"),
                    ),
                });
            }
            write_frame(
                &mut self.writer,
                FrameType::Data,
                self.channel,
                &buffer[..count],
                "Data",
            )
            .await?;
            remaining -= count as u64;
        }
        let (kind, payload) = read_frame(&mut self.reader, self.channel, DURING).await?;
        let outcome = match kind {
            FrameType::Ok => Ok(()),
            FrameType::Error => Err(remote(DURING, decode(&payload, DURING)?)),
            other => return Err(unexpected(DURING, other)),
        };
        self.busy = false;
        outcome
    }

    /// Reads a regular file from the guest into `sink`; returns its size, mode and owner.
    pub async fn get_file<W>(&mut self, path: &str, mut sink: W) -> Result<FileInfo, GuestError>
    where
        W: AsyncWrite + Unpin,
    {
        const DURING: &str = "GetFile";
        self.begin()?;
        self.send_json(
            FrameType::GetFile,
            DURING,
            &GetFile {
                path: path.to_owned(),
            },
        )
        .await?;
        let (kind, payload) = read_frame(&mut self.reader, self.channel, DURING).await?;
        let mut info: FileInfo = match kind {
            FrameType::FileInfo => decode(&payload, DURING)?,
            FrameType::Error => {
                let error = remote(DURING, decode(&payload, DURING)?);
                self.busy = false;
                return Err(error);
            }
            other => return Err(unexpected(DURING, other)),
        };
        let mut received: u64 = 0;
        loop {
            let (kind, payload) = read_frame(&mut self.reader, self.channel, DURING).await?;
            match kind {
                FrameType::Data => {
                    write_local(&mut sink, &payload, "file").await?;
                    received += payload.len() as u64;
                }
                FrameType::End => {
                    let end: End = decode(&payload, DURING)?;
                    if end.size != received {
                        return Err(GuestError::Protocol {
                            during: DURING,
                            message: format!("End says {} bytes, {received} arrived", end.size),
                        });
                    }
                    flush_local(&mut sink, "file").await?;
                    self.busy = false;
                    info.size = received;
                    return Ok(info);
                }
                FrameType::Error => {
                    let error = remote(DURING, decode(&payload, DURING)?);
                    self.busy = false;
                    return Err(error);
                }
                other => return Err(unexpected(DURING, other)),
            }
        }
    }

    /// Marks a request as started, refusing if an earlier one broke off.
    fn begin(&mut self) -> Result<(), GuestError> {
        if self.busy {
            return Err(GuestError::Poisoned);
        }
        self.busy = true;
        Ok(())
    }

    async fn send_json<T: Serialize>(
        &mut self,
        kind: FrameType,
        what: &'static str,
        message: &T,
    ) -> Result<(), GuestError> {
        self.writer
            .write_all(&encode_json_frame(kind, self.channel, message))
            .await
            .map_err(|source| GuestError::Send { what, source })
    }
}

/// One hybrid vsock attempt: connect, `CONNECT <port>\n`, expect `OK <n>\n`.
async fn hybrid_vsock_once(uds_path: &Path, port: u32) -> Result<GuestChannel, GuestError> {
    let mut channel = GuestChannel::new(connect_stream(uds_path).await?, 0);
    channel
        .writer
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|source| GuestError::Send {
            what: "CONNECT",
            source,
        })?;
    // Byte by byte from the buffered reader: what follows the line is the guest's stream.
    let mut line = Vec::new();
    loop {
        let byte = match channel.reader.read_u8().await {
            Ok(byte) => byte,
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(GuestError::Closed {
                    during: "the hybrid vsock handshake",
                });
            }
            Err(source) => return Err(GuestError::Receive { source }),
        };
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > 64 {
            break;
        }
    }
    let reply = String::from_utf8_lossy(&line).into_owned();
    match reply.strip_prefix("OK ") {
        Some(number) if number.trim().parse::<u32>().is_ok() => Ok(channel),
        _ => Err(GuestError::VsockRefused {
            path: uds_path.to_owned(),
            port,
            reply,
        }),
    }
}

/// The next frame for `channel`, skipping frames of other channels (serial leftovers).
async fn read_frame(
    reader: &mut BufReader<OwnedReadHalf>,
    channel: u32,
    during: &'static str,
) -> Result<(FrameType, Vec<u8>), GuestError> {
    loop {
        let mut header_bytes = [0u8; HEADER_LEN];
        match reader.read_exact(&mut header_bytes).await {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(GuestError::Closed { during });
            }
            Err(source) => return Err(GuestError::Receive { source }),
        }
        let header = FrameHeader::decode(&header_bytes).map_err(|error| GuestError::Protocol {
            during,
            message: error.to_string(),
        })?;
        let mut payload = vec![0u8; header.len as usize];
        reader
            .read_exact(&mut payload)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::UnexpectedEof => GuestError::Closed { during },
                _ => GuestError::Receive { source },
            })?;
        if header.channel != channel {
            continue;
        }
        return match header.frame_type() {
            Some(FrameType::Close) => Err(GuestError::Closed { during }),
            Some(kind) => Ok((kind, payload)),
            None => Err(GuestError::Protocol {
                during,
                message: format!("unknown frame type {:#04x}", header.kind),
            }),
        };
    }
}

async fn write_frame(
    writer: &mut OwnedWriteHalf,
    kind: FrameType,
    channel: u32,
    payload: &[u8],
    what: &'static str,
) -> Result<(), GuestError> {
    write_all_to(writer, &encode_frame(kind, channel, payload), what).await
}

async fn write_all_to(
    writer: &mut OwnedWriteHalf,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), GuestError> {
    writer
        .write_all(bytes)
        .await
        .map_err(|source| GuestError::Send { what, source })
}

async fn write_local<W: AsyncWrite + Unpin>(
    sink: &mut W,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), GuestError> {
    sink.write_all(bytes)
        .await
        .map_err(|source| GuestError::LocalWrite { what, source })
}

async fn flush_local<W: AsyncWrite + Unpin>(
    sink: &mut W,
    what: &'static str,
) -> Result<(), GuestError> {
    sink.flush()
        .await
        .map_err(|source| GuestError::LocalWrite { what, source })
}

fn decode<T: DeserializeOwned>(payload: &[u8], during: &'static str) -> Result<T, GuestError> {
    protocol::decode_json(payload).map_err(|error| GuestError::Protocol {
        during,
        message: format!("bad JSON: {error}"),
    })
}

fn remote(request: &'static str, reply: ErrorReply) -> GuestError {
    GuestError::Remote {
        request,
        kind: reply.kind,
        message: crate::error::printable(&reply.message),
    }
}

fn unexpected(during: &'static str, kind: FrameType) -> GuestError {
    GuestError::Protocol {
        during,
        message: format!("unexpected {kind:?} frame"),
    }
}

/// `banger-agent COMMAND ARGUMENTS...` as one line, for messages.
fn agent_argv(command: &str, arguments: &[String]) -> String {
    std::iter::once(crate::assets::AGENT_GUEST_PATH)
        .chain(std::iter::once(command))
        .chain(arguments.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The next window size from `resizes`; pending forever when there is none to wait for.
async fn next_resize(
    resizes: &mut Option<tokio::sync::mpsc::UnboundedReceiver<WindowSize>>,
) -> Option<WindowSize> {
    match resizes {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// The name of the frame `encoded` holds, for errors while sending it.
fn frame_name(encoded: &[u8]) -> &'static str {
    match encoded
        .get(HEADER_LEN - 1)
        .copied()
        .and_then(FrameType::from_byte)
    {
        Some(FrameType::Stdin) => "Stdin",
        Some(FrameType::StdinEof) => "StdinEof",
        Some(FrameType::Resize) => "Resize",
        _ => "a frame",
    }
}
