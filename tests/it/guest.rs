//! The guest channel end to end, with no VM: the real agent binary (the bytes banger embeds)
//! serving a unix socket, driven by the real host client. A fake VMM socket stands in for
//! Firecracker/vhost-device-vsock's hybrid vsock handshake, and the agent's serial mode is
//! driven through a unix socket standing in for QEMU's chardev.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use banger::guest::protocol::{self, ErrorReply, FrameHeader, FrameType, HEADER_LEN};
use banger::guest::{
    ErrorKind, ExecRequest, ExitStatus, GuestChannel, GuestEndpoint, GuestError, PutFileRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// A running agent; killed on drop.
pub(crate) struct Agent {
    child: Child,
    dir: tempfile::TempDir,
}

impl Agent {
    /// `banger-agent --listen-unix <dir>/agent.sock`.
    pub(crate) fn start() -> Agent {
        Agent::start_with(|socket| vec!["--listen-unix".into(), socket.display().to_string()])
    }

    /// `banger-agent --no-vsock --serial-listen-unix <dir>/agent.sock`: each connection to
    /// the socket stands in for a VMM's serial chardev session.
    fn start_serial() -> Agent {
        Agent::start_with(|socket| {
            vec![
                "--no-vsock".into(),
                "--serial-listen-unix".into(),
                socket.display().to_string(),
            ]
        })
    }

    /// Starts the agent with the arguments `args` builds from the socket path, and waits for
    /// that socket to appear.
    fn start_with(args: impl Fn(&Path) -> Vec<String>) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        Agent::start_listening_at(dir, &socket, args(&socket))
    }

    /// Starts the agent the way `nohup`-style launchers do: with SIGHUP, SIGINT and SIGTERM
    /// ignored, a disposition that survives `exec`.
    fn start_with_signals_ignored() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut shell = Command::new("sh");
        shell
            .arg("-c")
            .arg(r#"trap '' HUP INT TERM; exec "$0" --listen-unix "$1""#)
            .arg(crate::support::agent_binary())
            .arg(&socket);
        Agent::spawn(dir, &socket, shell)
    }

    /// `banger-agent --listen-unix`, with `PATH` set to `path` for the commands it runs.
    pub(crate) fn start_with_path(path: &str) -> Agent {
        Agent::start_with_env(&[("PATH", path)])
    }

    /// `banger-agent --listen-unix` with these environment variables set on top of this
    /// process's.
    pub(crate) fn start_with_env(variables: &[(&str, &str)]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut command = Command::new(crate::support::agent_binary());
        command.arg("--listen-unix").arg(&socket);
        command.envs(variables.iter().copied());
        Agent::spawn(dir, &socket, command)
    }

    /// Starts the agent with `args` and waits for `socket`, wherever it is, to appear.
    fn start_listening_at(dir: tempfile::TempDir, socket: &Path, args: Vec<String>) -> Agent {
        let mut command = Command::new(crate::support::agent_binary());
        command.args(&args);
        Agent::spawn(dir, socket, command)
    }

    /// Runs `command`, which starts the agent, and waits for `socket` to appear.
    fn spawn(dir: tempfile::TempDir, socket: &Path, mut command: Command) -> Agent {
        let mut attempts = 0;
        let child = loop {
            match command.spawn() {
                Ok(child) => break child,
                // Another test thread forking while the binary was being written keeps it
                // open for writing for a moment (ETXTBSY).
                Err(error) if error.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => panic!("cannot start the agent: {error}"),
            }
        };
        // Until a connection is accepted, not just until the file exists: it appears at
        // `bind`, a moment before the agent listens. (The probe is a connection that ends at
        // once, which the agent shrugs off.)
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the agent never listened on {socket:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent { child, dir }
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub(crate) async fn channel(&self) -> GuestChannel {
        crate::support::connect_agent(&self.socket()).await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `request` with `stdin`; returns status, stdout and stderr.
async fn run(
    channel: &mut GuestChannel,
    request: ExecRequest,
    stdin: &[u8],
) -> (ExitStatus, Vec<u8>, Vec<u8>) {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = channel
        .exec(&request, stdin, &mut stdout, &mut stderr)
        .await
        .unwrap();
    (status, stdout, stderr)
}

fn host_kernel_release() -> String {
    nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn hello_reports_version_kernel_and_boot_time() {
    let agent = Agent::start();
    let mut channel = agent.channel().await;
    let ready = channel.hello().await.unwrap();
    assert_eq!(ready.protocol, protocol::PROTOCOL_VERSION);
    assert_eq!(ready.kernel_release, host_kernel_release());
    assert!(!ready.agent_version.is_empty());
    assert!(ready.boot_ms > 0);
    assert!(!ready.pid1);
}

#[tokio::test]
async fn uname_in_the_agent_matches_the_host() {
    let agent = Agent::start();
    let mut channel = agent.channel().await;
    let (status, stdout, stderr) = run(&mut channel, ExecRequest::argv(["uname", "-r"]), b"").await;
    assert_eq!(status, ExitStatus::Code(0), "stderr: {stderr:?}");
    assert_eq!(
        String::from_utf8(stdout).unwrap().trim(),
        host_kernel_release()
    );
}

#[tokio::test]
async fn exit_codes_and_signals_come_back() {
    let agent = Agent::start();
    let mut channel = agent.channel().await;
    let (status, ..) = run(&mut channel, ExecRequest::shell("exit 7"), b"").await;
    assert_eq!(status, ExitStatus::Code(7));
    assert!(!status.success());
    // The same connection serves the next request.
    let (status, ..) = run(&mut channel, ExecRequest::shell("kill -KILL $$"), b"").await;
    assert_eq!(status, ExitStatus::Signal(9));
    assert_eq!(status.code(), None);
}

#[tokio::test]
async fn stdin_streams_a_mebibyte_through_cat_exactly() {
    let agent = Agent::start();
    let mut channel = agent.channel().await;
    let input: Vec<u8> = (0..1u32 << 20)
        .map(|index| (index.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (status, stdout, _) = run(
        &mut channel,
        ExecRequest::argv(["cat"]).with_stdin(),
        &input,
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(stdout.len(), input.len());
    assert!(stdout == input, "the echoed bytes differ");
}

#[tokio::test]
async fn stderr_is_kept_apart_from_stdout() {
    let agent = Agent::start();
    let mut channel = agent.channel().await;
    let (status, stdout, stderr) = run(
        &mut channel,
        ExecRequest::shell("echo out; echo err >&2; echo more"),
        b"",
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(stdout, b"out\nmore\n");
    assert_eq!(stderr, b"err\n");
}

#[tokio::test]
async fn env_and_cwd_are_honoured() {
    let agent = Agent::start();
    let workdir = tempfile::tempdir().unwrap();
    let mut channel = agent.channel().await;
    let request = ExecRequest::argv(["sh", "-c", "printf '%s|' \"$GREETING\"; pwd"])
        .with_env("GREETING", "hello there")
        .with_cwd(workdir.path().display().to_string());
    let (status, stdout, _) = run(&mut channel, request, b"").await;
    assert_eq!(status, ExitStatus::Code(0));
    let canonical = workdir.path().canonicalize().unwrap();
    assert_eq!(
        String::from_utf8(stdout).unwrap(),
        format!("hello there|{}\n", canonical.display())
    );

    let mut request = ExecRequest::shell("env");
    request.clear_env = true;
    let (_, stdout, _) = run(&mut channel, request.with_env("ONLY", "me"), b"").await;
    let stdout = String::from_utf8(stdout).unwrap();
    assert!(stdout.contains("ONLY=me"), "{stdout}");
    assert!(
        !stdout.contains("HOME="),
        "clear_env kept the agent's environment: {stdout}"
    );
}

#[tokio::test]
async fn commands_start_with_no_blocked_or_ignored_signals() {
    // The agent blocks SIGCHLD for its reaper and ignores SIGPIPE; children must not inherit
    // either, or shells and pipelines misbehave. Nor may they inherit what the agent's own
    // launcher ignored.
    let agent = Agent::start_with_signals_ignored();
    let mut channel = agent.channel().await;
    let (_, stdout, _) = run(
        &mut channel,
        ExecRequest::argv(["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]),
        b"",
    )
    .await;
    let stdout = String::from_utf8(stdout).unwrap();
    // Signals 32 and 33 are reserved by libc for its threads: the agent cannot change them
    // and programs never use them, whatever a launcher left there. Every other bit is clear.
    let mask_of = |name: &str| -> u64 {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {stdout}"));
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    let reserved_real_time: u64 = 0b11 << 31;
    assert_eq!(mask_of("SigBlk:"), 0, "{stdout}");
    assert_eq!(mask_of("SigIgn:") & !reserved_real_time, 0, "{stdout}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
}

#[tokio::test]
async fn a_ten_mebibyte_file_goes_in_and_comes_back_with_its_mode() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("sub/dir/data.bin");
    let content: Vec<u8> = (0..10u32 << 20).map(|index| (index % 251) as u8).collect();
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let mut channel = agent.channel().await;
    let request = PutFileRequest {
        path: target.display().to_string(),
        mode: 0o640,
        uid,
        gid,
        size: content.len() as u64,
        create_parents: true,
    };
    channel
        .put_file(&request, content.as_slice())
        .await
        .unwrap();
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    assert!(
        std::fs::read(&target).unwrap() == content,
        "the stored bytes differ"
    );
    let leftovers: Vec<_> = std::fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary files left behind: {leftovers:?}"
    );

    let mut fetched = Vec::new();
    let info = channel
        .get_file(&target.display().to_string(), &mut fetched)
        .await
        .unwrap();
    assert_eq!(info.size, content.len() as u64);
    assert_eq!(info.mode, 0o640);
    assert!(fetched == content, "the fetched bytes differ");
}

#[tokio::test]
async fn file_errors_are_reported_and_the_channel_stays_usable() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let mut channel = agent.channel().await;
    let missing = dir.path().join("no/such/dir/file");
    let request = PutFileRequest {
        path: missing.display().to_string(),
        mode: 0o644,
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        size: 200_000,
        create_parents: false,
    };
    let error = channel
        .put_file(&request, vec![7u8; 200_000].as_slice())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            GuestError::Remote {
                kind: ErrorKind::NotFound,
                ..
            }
        ),
        "{error:?}"
    );
    let error = channel
        .get_file(&missing.display().to_string(), Vec::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            GuestError::Remote {
                kind: ErrorKind::NotFound,
                ..
            }
        ),
        "{error:?}"
    );
    let error = channel.get_file("/dev/null", Vec::new()).await.unwrap_err();
    assert!(
        matches!(
            error,
            GuestError::Remote {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{error:?}"
    );
    let (status, ..) = run(&mut channel, ExecRequest::argv(["true"]), b"").await;
    assert!(status.success());
}

#[tokio::test]
async fn connections_are_served_concurrently() {
    let agent = Agent::start();
    let mut first = agent.channel().await;
    let mut second = agent.channel().await;
    // `cat` on the first channel waits for stdin that arrives only after the second channel
    // has run a whole command: this finishes only if both are served at once.
    let (stdin_writer, stdin_reader) = tokio::io::duplex(64);
    let waiting = tokio::spawn(async move {
        let mut stdout = Vec::new();
        let status = first
            .exec(
                &ExecRequest::argv(["cat"]).with_stdin(),
                stdin_reader,
                &mut stdout,
                tokio::io::sink(),
            )
            .await
            .unwrap();
        (status, stdout)
    });
    let (status, stdout, _) = run(&mut second, ExecRequest::argv(["echo", "second"]), b"").await;
    assert_eq!(
        (status, stdout.as_slice()),
        (ExitStatus::Code(0), b"second\n".as_slice())
    );
    let mut stdin_writer = stdin_writer;
    stdin_writer.write_all(b"first\n").await.unwrap();
    drop(stdin_writer);
    let (status, stdout) = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (status, stdout.as_slice()),
        (ExitStatus::Code(0), b"first\n".as_slice())
    );

    // And many at once.
    let socket = agent.socket();
    let runs = (0..8).map(|index| {
        let socket = socket.clone();
        tokio::spawn(async move {
            let mut channel = GuestChannel::connect_unix(&socket).await.unwrap();
            let (status, stdout, _) = run(
                &mut channel,
                ExecRequest::shell(format!("echo {index}")),
                b"",
            )
            .await;
            (status, String::from_utf8(stdout).unwrap())
        })
    });
    for (index, handle) in runs.enumerate() {
        let (status, stdout) = handle.await.unwrap();
        assert_eq!(status, ExitStatus::Code(0));
        assert_eq!(stdout, format!("{index}\n"));
    }
}

#[tokio::test]
async fn bad_requests_get_an_error_not_a_hang() {
    let agent = Agent::start();
    let mut channel = agent.channel().await;
    let error = channel
        .exec(
            &ExecRequest::default(),
            tokio::io::empty(),
            tokio::io::sink(),
            tokio::io::sink(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            GuestError::Remote {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{error:?}"
    );
    let error = channel
        .exec(
            &ExecRequest::argv(["no-such-program-anywhere"]),
            tokio::io::empty(),
            tokio::io::sink(),
            tokio::io::sink(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            GuestError::Remote {
                kind: ErrorKind::NotFound,
                ..
            }
        ),
        "{error:?}"
    );
    let error = channel
        .exec(
            &ExecRequest::argv(["true"]).with_cwd("/no/such/dir"),
            tokio::io::empty(),
            tokio::io::sink(),
            tokio::io::sink(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            GuestError::Remote {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{error:?}"
    );
    // Without `Hello` the agent assumes protocol 1, which has no terminals: the client
    // says so itself, before sending anything.
    let mut tty = ExecRequest::argv(["true"]);
    tty.tty = true;
    let (_resize, resizes) = tokio::sync::mpsc::unbounded_channel();
    let error = channel
        .exec_tty(&tty, tokio::io::empty(), tokio::io::sink(), resizes)
        .await
        .unwrap_err();
    assert!(
        matches!(error, GuestError::TtyUnsupported { agent: 1 }),
        "{error:?}"
    );

    // Raw frames a client library would never send.
    let mut raw = UnixStream::connect(agent.socket()).await.unwrap();
    let deadline = Duration::from_secs(10);
    raw.write_all(&protocol::encode_frame(FrameType::Exec, 0, b"{not json"))
        .await
        .unwrap();
    assert_eq!(
        read_error(&mut raw, deadline).await.kind,
        ErrorKind::BadRequest
    );
    raw.write_all(&[0, 0, 0, 2, 0, 0, 0, 0, 0x42, b'{', b'}'])
        .await
        .unwrap();
    assert_eq!(
        read_error(&mut raw, deadline).await.kind,
        ErrorKind::UnknownFrame
    );
    raw.write_all(&protocol::encode_frame(FrameType::Ready, 0, b"{}"))
        .await
        .unwrap();
    assert_eq!(
        read_error(&mut raw, deadline).await.kind,
        ErrorKind::BadRequest
    );
    raw.write_all(&protocol::encode_json_frame(
        FrameType::Hello,
        0,
        &protocol::Hello { version: 0 },
    ))
    .await
    .unwrap();
    assert_eq!(
        read_error(&mut raw, deadline).await.kind,
        ErrorKind::UnsupportedVersion
    );
    // An oversized frame breaks framing: an Error, then the connection closes.
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, FrameType::Exec as u8])
        .await
        .unwrap();
    assert_eq!(
        read_error(&mut raw, deadline).await.kind,
        ErrorKind::BadRequest
    );
    let mut rest = Vec::new();
    tokio::time::timeout(deadline, raw.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
}

/// Reads one frame from a raw connection and expects an `Error`.
async fn read_error(stream: &mut UnixStream, deadline: Duration) -> ErrorReply {
    let mut header = [0u8; HEADER_LEN];
    tokio::time::timeout(deadline, stream.read_exact(&mut header))
        .await
        .expect("no answer: the agent hangs")
        .unwrap();
    let header = FrameHeader::decode(&header).unwrap();
    let mut payload = vec![0u8; header.len as usize];
    stream.read_exact(&mut payload).await.unwrap();
    assert_eq!(header.frame_type(), Some(FrameType::Error));
    protocol::decode_json(&payload).unwrap()
}

#[tokio::test]
async fn a_newer_client_is_answered_in_the_agents_version() {
    let agent = Agent::start();
    let mut raw = UnixStream::connect(agent.socket()).await.unwrap();
    raw.write_all(&protocol::encode_json_frame(
        FrameType::Hello,
        0,
        &protocol::Hello { version: 99 },
    ))
    .await
    .unwrap();
    let mut header = [0u8; HEADER_LEN];
    raw.read_exact(&mut header).await.unwrap();
    let header = FrameHeader::decode(&header).unwrap();
    let mut payload = vec![0u8; header.len as usize];
    raw.read_exact(&mut payload).await.unwrap();
    assert_eq!(header.frame_type(), Some(FrameType::Ready));
    let ready: protocol::Ready = protocol::decode_json(&payload).unwrap();
    assert_eq!(ready.protocol, protocol::PROTOCOL_VERSION);
}

#[tokio::test]
async fn dropping_an_exec_kills_the_command_and_poisons_the_channel() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let mut channel = agent.channel().await;
    let request = ExecRequest::shell(format!("echo $$ > {}; exec sleep 1000", pid_file.display()));
    let cancelled = tokio::time::timeout(
        Duration::from_millis(300),
        channel.exec(
            &request,
            tokio::io::empty(),
            tokio::io::sink(),
            tokio::io::sink(),
        ),
    )
    .await;
    assert!(cancelled.is_err(), "sleep 1000 finished?");
    let error = channel.hello().await.unwrap_err();
    assert!(matches!(error, GuestError::Poisoned), "{error:?}");
    let pid: i32 = wait_for_content(&pid_file).trim().parse().unwrap();
    drop(channel);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Gone, or a zombie not yet reaped by the agent.
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() && !is_zombie(pid) {
        assert!(
            Instant::now() < deadline,
            "the command outlived its connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn wait_for_content(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text;
        }
        assert!(Instant::now() < deadline, "{path:?} never filled");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// A stand-in for a VMM's hybrid vsock socket: answers `CONNECT <port>` with `OK <n>` and
/// relays to the agent's unix socket when `port` is the agent's, else closes the connection
/// as Firecracker does when nothing listens on the guest port.
async fn fake_vmm(listener: UnixListener, agent_socket: PathBuf, agent_port: u32) {
    loop {
        let Ok((mut host, _)) = listener.accept().await else {
            return;
        };
        let agent_socket = agent_socket.clone();
        tokio::spawn(async move {
            let mut line = Vec::new();
            loop {
                let Ok(byte) = host.read_u8().await else {
                    return;
                };
                if byte == b'\n' {
                    break;
                }
                line.push(byte);
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            let requested: Option<u32> = line
                .strip_prefix("CONNECT ")
                .and_then(|port| port.parse().ok());
            if requested != Some(agent_port) {
                return;
            }
            // The guest is not up until its socket exists: the VMM drops the connection.
            let Ok(mut guest) = UnixStream::connect(&agent_socket).await else {
                return;
            };
            if host.write_all(b"OK 1073741824\n").await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
        });
    }
}

#[tokio::test]
async fn hybrid_vsock_reaches_the_agent_through_a_vmm_socket() {
    let port = banger::assets::AGENT_VSOCK_PORT;
    let dir = tempfile::tempdir().unwrap();
    let vmm_socket = dir.path().join("vsock.sock");
    let agent_socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&vmm_socket).unwrap();
    let vmm = tokio::spawn(fake_vmm(listener, agent_socket.clone(), port));

    // Nothing listens in the "guest" yet: the handshake fails until the deadline.
    let started = Instant::now();
    let error = GuestChannel::connect_hybrid_vsock(
        &vmm_socket,
        port,
        Instant::now() + Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "gave up early: {error:?}"
    );
    assert!(
        matches!(
            error,
            GuestError::Closed { .. } | GuestError::NotReady { .. }
        ),
        "{error:?}"
    );

    // The agent comes up while the client is already waiting for it.
    let endpoint = GuestEndpoint::HybridVsock {
        uds_path: vmm_socket.clone(),
        port,
    };
    let waiting = tokio::spawn(async move {
        endpoint
            .wait_ready(Instant::now() + Duration::from_secs(30))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let socket_for_agent = agent_socket.clone();
    let starting = tokio::task::spawn_blocking(move || {
        Agent::start_listening_at(
            tempfile::tempdir().unwrap(),
            &socket_for_agent,
            vec![
                "--listen-unix".into(),
                socket_for_agent.display().to_string(),
            ],
        )
    });
    let (mut channel, ready) = waiting.await.unwrap().unwrap();
    let _agent = starting.await.unwrap();
    assert_eq!(ready.protocol, protocol::PROTOCOL_VERSION);
    let (status, stdout, _) = run(
        &mut channel,
        ExecRequest::argv(["echo", "through vsock"]),
        b"",
    )
    .await;
    assert_eq!(
        (status, stdout.as_slice()),
        (ExitStatus::Code(0), b"through vsock\n".as_slice())
    );

    // Another port is refused.
    let error = GuestChannel::connect_hybrid_vsock(
        &vmm_socket,
        port + 1,
        Instant::now() + Duration::from_millis(100),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            GuestError::Closed { .. } | GuestError::NotReady { .. }
        ),
        "{error:?}"
    );
    drop(channel);
    vmm.abort();
}

#[tokio::test]
async fn the_serial_transport_multiplexes_channels_and_survives_reconnects() {
    let agent = Agent::start_serial();
    let endpoint = GuestEndpoint::Serial {
        path: agent.socket(),
    };
    let (mut channel, ready) = endpoint
        .wait_ready(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ready.protocol, protocol::PROTOCOL_VERSION);
    let input = vec![b'x'; 300_000];
    let (status, stdout, _) = run(
        &mut channel,
        ExecRequest::argv(["cat"]).with_stdin(),
        &input,
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(stdout.len(), input.len());
    // Leave a command running and hang up: the next host session starts clean.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(200),
        channel.exec(
            &ExecRequest::argv(["sleep", "1000"]),
            tokio::io::empty(),
            tokio::io::sink(),
            tokio::io::sink(),
        ),
    )
    .await;
    assert!(cancelled.is_err());
    drop(channel);
    let mut channel = GuestChannel::connect_serial(&agent.socket()).await.unwrap();
    let (status, stdout, _) =
        run(&mut channel, ExecRequest::shell("echo again; exit 3"), b"").await;
    assert_eq!(
        (status, stdout.as_slice()),
        (ExitStatus::Code(3), b"again\n".as_slice())
    );

    // Two channels interleaved on one serial stream, as a host multiplexer would use it.
    // Queued behind the current session until it hangs up.
    let mut raw = UnixStream::connect(agent.socket()).await.unwrap();
    drop(channel);
    for channel_id in [11u32, 12] {
        let request = ExecRequest::shell(format!("echo channel {channel_id}"));
        raw.write_all(&protocol::encode_json_frame(
            FrameType::Exec,
            channel_id,
            &request,
        ))
        .await
        .unwrap();
    }
    let mut outputs = std::collections::BTreeMap::<u32, Vec<u8>>::new();
    let mut exits = 0;
    let mut closes = 0;
    while exits < 2 {
        let mut header = [0u8; HEADER_LEN];
        tokio::time::timeout(Duration::from_secs(10), raw.read_exact(&mut header))
            .await
            .unwrap()
            .unwrap();
        let header = FrameHeader::decode(&header).unwrap();
        let mut payload = vec![0u8; header.len as usize];
        raw.read_exact(&mut payload).await.unwrap();
        match header.frame_type() {
            Some(FrameType::Stdout) => outputs.entry(header.channel).or_default().extend(payload),
            Some(FrameType::Exit) => exits += 1,
            Some(FrameType::Close) => closes += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(closes, 0, "channels stay open after a request");
    assert_eq!(outputs[&11], b"channel 11\n");
    assert_eq!(outputs[&12], b"channel 12\n");
}

#[tokio::test]
async fn the_serial_multiplexer_serves_clients_at_once_and_closes_their_channels() {
    use banger::guest::SerialMux;
    use tokio_util::sync::CancellationToken;
    let agent = Agent::start_serial();
    let dir = tempfile::tempdir().unwrap();
    let mux_socket = dir.path().join("mux.sock");
    // A stale file where the socket goes is replaced.
    std::fs::write(&mux_socket, b"stale").unwrap();
    let mux = SerialMux::bind(&agent.socket(), &mux_socket).await.unwrap();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(mux.run(stop.clone()));

    // A holds its channel with a command waiting on stdin; B's request goes through
    // meanwhile. On the chardev alone, B would wait for A to hang up.
    let mut a = GuestChannel::connect_serial(&mux_socket).await.unwrap();
    a.hello().await.unwrap();
    let (mut a_stdin, a_input) = tokio::io::duplex(64);
    let a_running = tokio::spawn(async move {
        let mut stdout = Vec::new();
        let status = a
            .exec(
                &ExecRequest::shell("read line; echo \"a got $line\"").with_stdin(),
                a_input,
                &mut stdout,
                tokio::io::sink(),
            )
            .await
            .unwrap();
        (status, stdout)
    });
    let mut b = GuestChannel::connect_serial(&mux_socket).await.unwrap();
    let (status, stdout, _) = tokio::time::timeout(
        Duration::from_secs(20),
        run(&mut b, ExecRequest::argv(["echo", "b"]), b""),
    )
    .await
    .expect("B waited for A");
    assert_eq!(
        (status, stdout.as_slice()),
        (ExitStatus::Code(0), b"b\n".as_slice())
    );
    assert!(!a_running.is_finished());
    a_stdin.write_all(b"hello\n").await.unwrap();
    let (status, stdout) = tokio::time::timeout(Duration::from_secs(20), a_running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (status, stdout.as_slice()),
        (ExitStatus::Code(0), b"a got hello\n".as_slice())
    );

    // A client that hangs up mid-command has its command killed.
    let pid_file = dir.path().join("sleeper.pid");
    let mut c = GuestChannel::connect_serial(&mux_socket).await.unwrap();
    let script = format!("echo $$ > {}; exec sleep 1000", pid_file.display());
    let hung_up = tokio::time::timeout(
        Duration::from_secs(2),
        c.exec(
            &ExecRequest::shell(script),
            tokio::io::empty(),
            tokio::io::sink(),
            tokio::io::sink(),
        ),
    )
    .await;
    assert!(hung_up.is_err(), "the sleeper ended by itself");
    drop(c);
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(
            Instant::now() < deadline,
            "the sleeper outlived its channel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A channel another client holds is refused; the holder is unaffected.
    let hello = protocol::encode_json_frame(
        FrameType::Hello,
        77,
        &protocol::Hello {
            version: protocol::PROTOCOL_VERSION,
        },
    );
    let mut holder = UnixStream::connect(&mux_socket).await.unwrap();
    holder.write_all(&hello).await.unwrap();
    let mut header = [0u8; HEADER_LEN];
    holder.read_exact(&mut header).await.unwrap();
    let header = FrameHeader::decode(&header).unwrap();
    assert_eq!(
        (header.channel, header.frame_type()),
        (77, Some(FrameType::Ready))
    );
    let mut payload = vec![0u8; header.len as usize];
    holder.read_exact(&mut payload).await.unwrap();
    let mut intruder = UnixStream::connect(&mux_socket).await.unwrap();
    intruder.write_all(&hello).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), intruder.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read, 0, "the intruder was answered: {rest:?}");

    // Stopping disconnects clients and removes the socket.
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!mux_socket.exists());
    let mut rest = Vec::new();
    assert_eq!(holder.read_to_end(&mut rest).await.unwrap_or(0), 0);

    // When the guest's end goes away, the multiplexer returns by itself.
    let mux = SerialMux::bind(&agent.socket(), &mux_socket).await.unwrap();
    let serving = tokio::spawn(mux.run(CancellationToken::new()));
    let mut d = GuestChannel::connect_serial(&mux_socket).await.unwrap();
    d.hello().await.unwrap();
    drop(agent);
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the multiplexer outlived its serial stream")
        .unwrap()
        .unwrap();
    assert!(!mux_socket.exists());
}

#[tokio::test]
async fn clear_env_gives_the_command_and_its_children_a_default_path() {
    let agent = Agent::start();
    let mut channel = agent.channel().await;
    let mut request = ExecRequest::argv(["sh", "-c", "echo $PATH; env | grep -c ^PATH="]);
    request.clear_env = true;
    let (status, stdout, stderr) = run(&mut channel, request, b"").await;
    assert_eq!(status, ExitStatus::Code(0), "stderr: {stderr:?}");
    assert_eq!(
        String::from_utf8(stdout).unwrap(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n1\n"
    );

    // A PATH in `env` wins, with or without clear_env.
    let mut request = ExecRequest::shell("echo $PATH").with_env("PATH", "/bin:/usr/bin");
    request.clear_env = true;
    let (_, stdout, _) = run(&mut channel, request, b"").await;
    assert_eq!(stdout, b"/bin:/usr/bin\n");
}

#[tokio::test]
async fn get_file_refuses_a_fifo_at_once_and_the_channel_stays_usable() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut channel = agent.channel().await;
    let error = tokio::time::timeout(
        Duration::from_secs(10),
        channel.get_file(&fifo.display().to_string(), Vec::new()),
    )
    .await
    .expect("GetFile of a FIFO hangs")
    .unwrap_err();
    assert!(
        matches!(
            error,
            GuestError::Remote {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{error:?}"
    );
    let (status, stdout, _) = run(&mut channel, ExecRequest::argv(["echo", "ok"]), b"").await;
    assert_eq!(
        (status, stdout.as_slice()),
        (ExitStatus::Code(0), b"ok\n".as_slice())
    );
}

#[tokio::test]
async fn a_command_that_exits_before_its_stdin_is_sent_leaves_the_channel_in_step() {
    let agent = Agent::start();
    let mut channel = agent.channel().await;
    let input = vec![b'x'; 4 << 20];
    // `true` exits at once; `sleep` never reads, so the agent stops reading the connection
    // once its stdin backlog is full. Either way the client is often cut off inside a
    // `Stdin` frame, but not always: a short first read shifts where every later frame
    // starts, and many rounds make a missed cut (the bug hiding) very unlikely.
    for round in 0..32 {
        let first = 1 + round * 2039;
        let line = if round % 4 == 3 { "sleep 0.05" } else { "true" };
        let stdin = (&input[..first]).chain(input.as_slice());
        let status = tokio::time::timeout(
            Duration::from_secs(30),
            channel.exec(
                &ExecRequest::shell(line).with_stdin(),
                stdin,
                tokio::io::sink(),
                tokio::io::sink(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("`{line}` hangs"))
        .unwrap();
        assert_eq!(status, ExitStatus::Code(0), "{line}");
        let mut stdout = Vec::new();
        let status = tokio::time::timeout(
            Duration::from_secs(10),
            channel.exec(
                &ExecRequest::argv(["echo", "ok"]),
                tokio::io::empty(),
                &mut stdout,
                tokio::io::sink(),
            ),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("the request after `{line}` ({first}) hangs: the stream is out of step")
        });
        assert_eq!(
            (status.unwrap(), stdout.as_slice()),
            (ExitStatus::Code(0), b"ok\n".as_slice()),
            "after `{line}` ({first})"
        );
    }
}

#[tokio::test]
async fn wait_ready_gives_up_at_once_when_the_agent_refuses_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // An agent that speaks only versions newer than this client: every Hello gets
    // `unsupported_version`.
    let fake_agent = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                loop {
                    let mut header = [0u8; HEADER_LEN];
                    if stream.read_exact(&mut header).await.is_err() {
                        return;
                    }
                    let header = FrameHeader::decode(&header).unwrap();
                    let mut payload = vec![0u8; header.len as usize];
                    if stream.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let reply = ErrorReply {
                        kind: ErrorKind::UnsupportedVersion,
                        message: "this agent speaks 1000 to 1001".into(),
                    };
                    let frame = protocol::encode_json_frame(FrameType::Error, 0, &reply);
                    if stream.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let endpoint = GuestEndpoint::Unix { path: socket };
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(3),
        endpoint.wait_ready(Instant::now() + Duration::from_secs(10)),
    )
    .await
    .expect("wait_ready retried a version refusal");
    let error = outcome.map(|_| ()).unwrap_err();
    assert!(
        matches!(
            error,
            GuestError::Remote {
                kind: ErrorKind::UnsupportedVersion,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    fake_agent.abort();
}

/// A command on a pseudo-terminal, through the host client: the window size it starts with,
/// a resize delivered while it runs, and its exit code.
#[tokio::test]
async fn a_tty_command_sees_its_window_and_a_resize() {
    let agent = Agent::start();
    let mut channel = agent.channel().await;
    let ready = channel.hello().await.unwrap();
    assert_eq!(ready.protocol, banger::guest::PROTOCOL_VERSION);
    let mut request = ExecRequest::shell(
        "test -t 0 && test -t 1 && stty size; trap 'stty size; exit 3' WINCH; echo ready; \
         while :; do sleep 0.1; done",
    );
    request.tty = true;
    request.window = Some(banger::guest::WindowSize { rows: 24, cols: 80 });
    let (resize, resizes) = tokio::sync::mpsc::unbounded_channel();
    let (output, mut seen) = tokio::io::duplex(64 * 1024);
    let exec = channel.exec_tty(&request, tokio::io::empty(), output, resizes);
    let watch = async {
        let mut text = String::new();
        let mut buffer = [0u8; 1024];
        while !text.contains("ready") {
            let count = seen.read(&mut buffer).await.unwrap();
            assert!(count > 0, "the output ended before `ready`: {text:?}");
            text.push_str(&String::from_utf8_lossy(&buffer[..count]));
        }
        resize
            .send(banger::guest::WindowSize {
                rows: 30,
                cols: 100,
            })
            .unwrap();
        (text, seen)
    };
    let (status, (before, mut seen)) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(exec, watch) })
            .await
            .expect("the tty command finished");
    assert_eq!(status.unwrap(), ExitStatus::Code(3));
    let mut after = String::new();
    seen.read_to_string(&mut after).await.unwrap();
    assert!(before.contains("24 80\r\n"), "{before:?}");
    assert!(after.contains("30 100\r\n"), "{after:?}");
}

#[tokio::test]
async fn the_multiplexer_helper_process_serves_two_clients_and_exits_with_the_stream() {
    let agent = Agent::start_serial();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("vmm.log");
    let (helper, listen) = banger::vm::agent_mux::spawn(
        Path::new(env!("CARGO_BIN_EXE_banger")),
        &agent.socket(),
        dir.path(),
        &log,
    )
    .await
    .unwrap();
    assert!(helper.is_alive());
    assert_eq!(listen, dir.path().join(banger::vm::agent_mux::SOCKET_NAME));

    // Two clients at once: one holds a command waiting on stdin while the other's runs.
    let mut a = GuestChannel::connect_serial(&listen).await.unwrap();
    let (mut a_stdin, a_input) = tokio::io::duplex(64);
    let a_running = tokio::spawn(async move {
        let mut stdout = Vec::new();
        let status = a
            .exec(
                &ExecRequest::shell("read line; echo \"a got $line\"").with_stdin(),
                a_input,
                &mut stdout,
                tokio::io::sink(),
            )
            .await
            .unwrap();
        (status, stdout)
    });
    let mut b = GuestChannel::connect_serial(&listen).await.unwrap();
    let (status, stdout, _) = tokio::time::timeout(
        Duration::from_secs(20),
        run(&mut b, ExecRequest::argv(["echo", "b"]), b""),
    )
    .await
    .expect("B waited for A");
    assert_eq!(
        (status, stdout.as_slice()),
        (ExitStatus::Code(0), b"b\n".as_slice())
    );
    a_stdin.write_all(b"x\n").await.unwrap();
    let (status, stdout) = tokio::time::timeout(Duration::from_secs(20), a_running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (status, stdout.as_slice()),
        (ExitStatus::Code(0), b"a got x\n".as_slice())
    );

    // The VMM going away (here: the agent's end) ends the helper and its socket.
    drop(agent);
    assert!(
        helper.wait_gone(Duration::from_secs(10)).await,
        "the helper outlived its serial stream; its log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!listen.exists());

    // A serial socket that is not there: the start fails, saying why, and leaves nothing.
    let missing = dir.path().join("no-such.sock");
    let error = banger::vm::agent_mux::spawn(
        Path::new(env!("CARGO_BIN_EXE_banger")),
        &missing,
        dir.path(),
        &log,
    )
    .await
    .unwrap_err();
    let message = banger::error::error_chain(&error);
    assert!(
        message.contains("exited at start-up") && message.contains("no-such.sock"),
        "{message}"
    );
    assert!(!listen.exists());
}
