//! `Exec { tty: true }` end to end: the real binary serving `--listen-unix`, driven frame by
//! frame with the protocol file itself (included the way the host includes it), on real
//! pseudo-terminals. Every read has a deadline, so a command that never ends fails its test
//! instead of hanging it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../src/protocol.rs"]
mod protocol;

use protocol::{
    ErrorKind, ErrorReply, Exec, Exit, FrameHeader, FrameType, HEADER_LEN, Hello, Ready, Signal,
    WindowSize, encode_frame, encode_json_frame,
};

const AGENT: &str = env!("CARGO_BIN_EXE_banger-agent");
/// Upper bound for one frame to arrive; generous for loaded CI machines.
const FRAME_TIMEOUT: Duration = Duration::from_secs(15);

/// `banger-agent --listen-unix` in a directory of its own; killed on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    fn start(test: &str) -> Agent {
        Agent::start_in(Agent::fresh_dir(test), &[])
    }

    fn fresh_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "banger-agent-tty-test-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn start_in(dir: PathBuf, env: &[(&str, &std::ffi::OsStr)]) -> Agent {
        let socket = dir.join("agent.sock");
        let mut attempts = 0;
        let child = loop {
            match Command::new(AGENT)
                .arg("--listen-unix")
                .arg(&socket)
                .envs(env.iter().copied())
                .spawn()
            {
                Ok(child) => break child,
                // Another test thread forking while cargo finished writing the binary keeps
                // it open for writing for a moment.
                Err(error) if error.raw_os_error() == Some(nix::libc::ETXTBSY) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => panic!("cannot start {AGENT}: {error}"),
            }
        };
        let agent = Agent { child, dir };
        // Until a connection is accepted, not just until the file exists (it appears at
        // `bind`, a moment before `listen`).
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(agent.socket()).is_err() {
            assert!(Instant::now() < deadline, "the agent never listened");
            std::thread::sleep(Duration::from_millis(5));
        }
        agent
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// A connection that said `Hello` with `version`, and the agent's `Ready`.
    fn connect(&self, version: u32) -> (Client, Ready) {
        let mut client = self.connect_without_hello();
        client.send_json(FrameType::Hello, &Hello { version });
        let ready = client.expect_json(FrameType::Ready);
        (client, ready)
    }

    fn connect_without_hello(&self) -> Client {
        let stream = UnixStream::connect(self.socket()).unwrap();
        stream.set_read_timeout(Some(FRAME_TIMEOUT)).unwrap();
        Client { stream }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One protocol connection, read and written a frame at a time.
struct Client {
    stream: UnixStream,
}

/// What a command sent until its `Exit` (or until the test stopped reading).
#[derive(Debug, Default)]
struct Output {
    stdout: String,
    stderr: String,
    exit: Option<Exit>,
}

impl Client {
    fn send_json<T: serde::Serialize>(&mut self, kind: FrameType, message: &T) {
        self.stream
            .write_all(&encode_json_frame(kind, 0, message))
            .unwrap();
    }

    fn send_bytes(&mut self, kind: FrameType, payload: &[u8]) {
        self.stream
            .write_all(&encode_frame(kind, 0, payload))
            .unwrap();
    }

    fn next_frame(&mut self) -> (FrameType, Vec<u8>) {
        let mut header = [0u8; HEADER_LEN];
        if let Err(error) = self.stream.read_exact(&mut header) {
            panic!("no frame from the agent within {FRAME_TIMEOUT:?}: {error}");
        }
        let header = FrameHeader::decode(&header).unwrap();
        let mut payload = vec![0; header.len as usize];
        self.stream.read_exact(&mut payload).unwrap();
        let kind = header
            .frame_type()
            .unwrap_or_else(|| panic!("unknown frame type {:#04x}", header.kind));
        (kind, payload)
    }

    fn expect_json<T: serde::de::DeserializeOwned>(&mut self, expected: FrameType) -> T {
        let (kind, payload) = self.next_frame();
        assert_eq!(
            kind,
            expected,
            "payload: {}",
            String::from_utf8_lossy(&payload)
        );
        serde_json::from_slice(&payload).unwrap()
    }

    /// Reads the command's frames until `Exit`, or until `stop` holds for its stdout so far.
    fn read_until(&mut self, stop: impl Fn(&str) -> bool, output: &mut Output) {
        while output.exit.is_none() && !stop(&output.stdout) {
            let (kind, payload) = self.next_frame();
            match kind {
                FrameType::Stdout => output.stdout.push_str(&String::from_utf8_lossy(&payload)),
                FrameType::Stderr => output.stderr.push_str(&String::from_utf8_lossy(&payload)),
                FrameType::Exit => output.exit = Some(serde_json::from_slice(&payload).unwrap()),
                FrameType::Error => {
                    let error: ErrorReply = serde_json::from_slice(&payload).unwrap();
                    panic!("the agent refused: {error:?}; output so far: {output:?}");
                }
                other => panic!("unexpected {other:?} frame; output so far: {output:?}"),
            }
        }
    }

    /// Reads the command's frames up to and including `Exit`.
    fn finish(&mut self, mut output: Output) -> Output {
        self.read_until(|_| false, &mut output);
        output
    }
}

/// `sh -c LINE` on a terminal of `rows` × `cols`.
fn tty_shell(line: &str, rows: u16, cols: u16) -> Exec {
    Exec {
        shell: Some(line.into()),
        tty: true,
        window: Some(WindowSize { rows, cols }),
        ..Exec::default()
    }
}

fn exit_code(code: i32) -> Option<Exit> {
    Some(Exit {
        code: Some(code),
        signal: None,
    })
}

#[test]
fn a_tty_command_has_a_terminal_of_the_requested_size_and_no_separate_stderr() {
    let agent = Agent::start("size");
    let (mut client, ready) = agent.connect(protocol::PROTOCOL_VERSION);
    assert_eq!(ready.protocol, 2);
    client.send_json(
        FrameType::Exec,
        &tty_shell(
            "test -t 0 && test -t 1 && test -t 2 && stty size >&2",
            24,
            80,
        ),
    );
    let output = client.finish(Output::default());
    assert_eq!(output.exit, exit_code(0), "{output:?}");
    // The terminal turns `\n` into `\r\n` (onlcr), and what the command writes to stderr
    // comes back as stdout: a terminal has one output.
    assert_eq!(output.stdout, "24 80\r\n");
    assert_eq!(output.stderr, "");
}

#[test]
fn resize_changes_the_window_and_signals_the_command() {
    let agent = Agent::start("resize");
    let (mut client, _) = agent.connect(protocol::PROTOCOL_VERSION);
    client.send_json(
        FrameType::Exec,
        &tty_shell(
            "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.1; done",
            24,
            80,
        ),
    );
    let mut output = Output::default();
    client.read_until(|stdout| stdout.contains("ready\r\n"), &mut output);
    assert_eq!(output.exit, None, "{output:?}");
    client.send_json(
        FrameType::Resize,
        &WindowSize {
            rows: 30,
            cols: 100,
        },
    );
    let output = client.finish(output);
    assert_eq!(output.exit, exit_code(0), "{output:?}");
    assert_eq!(output.stdout, "ready\r\n30 100\r\n");
}

#[test]
fn stdin_reaches_the_command_through_the_terminal() {
    let agent = Agent::start("stdin");
    let (mut client, _) = agent.connect(protocol::PROTOCOL_VERSION);
    let mut request = tty_shell("read line; echo got:$line", 24, 80);
    request.stdin = true;
    client.send_json(FrameType::Exec, &request);
    client.send_bytes(FrameType::Stdin, b"hi\r");
    let output = client.finish(Output::default());
    assert_eq!(output.exit, exit_code(0), "{output:?}");
    // The terminal echoes the input (the carriage return as `\r\n`), then the reply follows.
    assert_eq!(output.stdout, "hi\r\ngot:hi\r\n");
}

#[test]
fn stdin_eof_on_a_tty_ends_the_commands_input_with_the_eof_character() {
    let agent = Agent::start("eof");
    let (mut client, _) = agent.connect(protocol::PROTOCOL_VERSION);
    let mut request = tty_shell("stty -echo; cat; echo done", 24, 80);
    request.stdin = true;
    client.send_json(FrameType::Exec, &request);
    client.send_bytes(FrameType::Stdin, b"abc\n");
    // Without the EOF character `cat` would wait for more forever (and the test time out).
    client.send_bytes(FrameType::StdinEof, b"");
    let output = client.finish(Output::default());
    assert_eq!(output.exit, exit_code(0), "{output:?}");
    assert!(output.stdout.ends_with("abc\r\ndone\r\n"), "{output:?}");
}

#[test]
fn a_tty_commands_exit_code_comes_back_after_all_its_output() {
    let agent = Agent::start("exit");
    let (mut client, _) = agent.connect(protocol::PROTOCOL_VERSION);
    client.send_json(FrameType::Exec, &tty_shell("exit 3", 24, 80));
    let output = client.finish(Output::default());
    assert_eq!(output.exit, exit_code(3), "{output:?}");
    // Output still in the terminal when the command exits must be sent before `Exit`, up
    // to the EIO that says every slave descriptor is closed. Not reading for a while makes
    // some likely to be left (the agent blocks sending, the terminal fills up behind it),
    // though not certain: how much is left depends on scheduling. (NUL bytes and no
    // newlines, so the terminal passes them through unchanged.)
    let size = 300_000;
    client.send_json(
        FrameType::Exec,
        &tty_shell(&format!("exec head -c {size} /dev/zero"), 24, 80),
    );
    std::thread::sleep(Duration::from_millis(500));
    let output = client.finish(Output::default());
    assert_eq!(
        output.exit,
        exit_code(0),
        "stdout: {} bytes",
        output.stdout.len()
    );
    assert_eq!(output.stdout.len(), size);
    assert!(output.stdout.bytes().all(|byte| byte == 0));
}

#[test]
fn signal_reaches_a_tty_commands_process_group() {
    let agent = Agent::start("signal");
    let (mut client, _) = agent.connect(protocol::PROTOCOL_VERSION);
    client.send_json(FrameType::Exec, &tty_shell("echo ready; sleep 30", 24, 80));
    let mut output = Output::default();
    client.read_until(|stdout| stdout.contains("ready\r\n"), &mut output);
    client.send_json(FrameType::Signal, &Signal { signal: 15 });
    let started = Instant::now();
    let output = client.finish(output);
    assert_eq!(
        output.exit,
        Some(Exit {
            code: None,
            signal: Some(15)
        }),
        "{output:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn term_defaults_to_xterm_256color_unless_the_request_sets_it() {
    let agent = Agent::start("term");
    let (mut client, _) = agent.connect(protocol::PROTOCOL_VERSION);
    client.send_json(FrameType::Exec, &tty_shell("echo $TERM", 24, 80));
    let output = client.finish(Output::default());
    assert_eq!(output.stdout, "xterm-256color\r\n");
    let mut request = tty_shell("echo $TERM", 24, 80);
    request.env.insert("TERM".into(), "vt100".into());
    client.send_json(FrameType::Exec, &request);
    let output = client.finish(Output::default());
    assert_eq!(output.stdout, "vt100\r\n");
}

#[test]
fn a_version_1_connection_still_refuses_tty() {
    let agent = Agent::start("v1");
    let (mut client, ready) = agent.connect(1);
    assert_eq!(ready.protocol, 1);
    client.send_json(FrameType::Exec, &tty_shell("true", 24, 80));
    let error: ErrorReply = client.expect_json(FrameType::Error);
    assert_eq!(error.kind, ErrorKind::Unsupported, "{error:?}");
    // The connection carries on, serving version 1 as before.
    client.send_json(
        FrameType::Exec,
        &Exec {
            shell: Some("test -t 1 || echo pipe".into()),
            ..Exec::default()
        },
    );
    let output = client.finish(Output::default());
    assert_eq!(output.exit, exit_code(0), "{output:?}");
    assert_eq!(output.stdout, "pipe\n");

    // A client that never says Hello is served as version 1 too.
    let mut silent = agent.connect_without_hello();
    silent.send_json(FrameType::Exec, &tty_shell("true", 24, 80));
    let error: ErrorReply = silent.expect_json(FrameType::Error);
    assert_eq!(error.kind, ErrorKind::Unsupported, "{error:?}");
}

#[test]
fn resize_without_a_terminal_is_ignored() {
    let agent = Agent::start("stray-resize");
    let (mut client, _) = agent.connect(protocol::PROTOCOL_VERSION);
    // Between requests, and during a piped command: neither is an error.
    client.send_json(FrameType::Resize, &WindowSize { rows: 1, cols: 1 });
    client.send_json(
        FrameType::Exec,
        &Exec {
            shell: Some("read line; echo got:$line".into()),
            stdin: true,
            ..Exec::default()
        },
    );
    client.send_json(FrameType::Resize, &WindowSize { rows: 2, cols: 2 });
    client.send_bytes(FrameType::Stdin, b"hi\n");
    client.send_bytes(FrameType::StdinEof, b"");
    let output = client.finish(Output::default());
    assert_eq!(output.exit, exit_code(0), "{output:?}");
    assert_eq!(output.stdout, "got:hi\n");
    // After a tty command's Exit, a late Resize and Stdin are ignored as well.
    let mut request = tty_shell("true", 24, 80);
    request.stdin = true;
    client.send_json(FrameType::Exec, &request);
    let output = client.finish(Output::default());
    assert_eq!(output.exit, exit_code(0), "{output:?}");
    client.send_json(FrameType::Resize, &WindowSize { rows: 3, cols: 3 });
    client.send_bytes(FrameType::Stdin, b"late\n");
    client.send_json(FrameType::Exec, &tty_shell("stty size", 5, 6));
    let output = client.finish(Output::default());
    assert_eq!(output.stdout, "5 6\r\n", "{output:?}");
}

#[test]
fn ready_goes_to_the_service_manager_and_its_socket_to_no_command() {
    let dir = Agent::fresh_dir("notify");
    let notify = dir.join("notify.sock");
    let manager = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let agent = Agent::start_in(dir, &[("NOTIFY_SOCKET", notify.as_os_str())]);
    let mut buffer = [0u8; 64];
    let length = manager
        .recv(&mut buffer)
        .expect("no READY=1 from the agent");
    assert_eq!(&buffer[..length], b"READY=1");
    let (mut client, _) = agent.connect(protocol::PROTOCOL_VERSION);
    client.send_json(
        FrameType::Exec,
        &tty_shell("echo ${NOTIFY_SOCKET-unset}", 24, 80),
    );
    let output = client.finish(Output::default());
    assert_eq!(output.stdout, "unset\r\n");
}
