//! Shared helpers for integration tests.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger::engine::{BoxFuture, Executor, StepContext, StepError};
use banger::key::Params;
use banger::plan::{Plan, ResourceClass, StepNode};

/// Whether a test may run given `capability`: true when it is there. When it is missing the
/// test should return early (skip), except under `BANGER_TEST_REQUIRE_ALL=1`, where this
/// panics so CI can never pass by skipping.
pub fn require(capability: bool, what: &str) -> bool {
    if capability {
        return true;
    }
    if banger::env::test_require_all() {
        panic!("{what} is unavailable, and BANGER_TEST_REQUIRE_ALL=1 forbids skipping this test");
    }
    eprintln!("skipped: {what} is unavailable");
    false
}

/// The first executable called `name` on `PATH`.
pub fn find_program(name: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// Counts executions per step id and the peak number running at once.
#[derive(Debug, Default)]
pub struct Counters {
    pub runs: Mutex<HashMap<String, usize>>,
    pub current: AtomicUsize,
    pub peak: AtomicUsize,
}

impl Counters {
    pub fn runs_of(&self, step: &str) -> usize {
        self.runs.lock().unwrap().get(step).copied().unwrap_or(0)
    }

    pub fn total_runs(&self) -> usize {
        self.runs.lock().unwrap().values().sum()
    }

    pub fn enter(&self, step: &str) {
        *self
            .runs
            .lock()
            .unwrap()
            .entry(step.to_owned())
            .or_default() += 1;
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    pub fn leave(&self) {
        self.current.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Test step kind `test.write`: writes output `out` = param `content` followed by every input's
/// `out`, after sleeping `sleep_ms`; fails when param `fail` is set.
#[derive(Debug, Clone)]
pub struct WriteExecutor {
    pub counters: Arc<Counters>,
}

impl Executor for WriteExecutor {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            self.counters.enter(&ctx.step_id);
            let result = async {
                if let Some(ms) = ctx.params.get_int("sleep_ms") {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if let Some(message) = ctx.params.get_str("fail") {
                    return Err(StepError::new(message.to_owned()));
                }
                let mut bytes = ctx
                    .params
                    .get_str("content")
                    .unwrap_or("")
                    .as_bytes()
                    .to_vec();
                for input in ctx.inputs() {
                    let path = ctx.input_file(&input.name, "out")?;
                    bytes.extend(
                        std::fs::read(path).map_err(|e| StepError::with_source("read", e))?,
                    );
                }
                let out = ctx.output("out")?;
                std::fs::write(out, bytes).map_err(|e| StepError::with_source("write", e))?;
                Ok(())
            }
            .await;
            self.counters.leave();
            result
        })
    }
}

pub fn write_step(id: &str, content: &str) -> StepNode {
    StepNode::new(
        id,
        "test.write",
        1,
        Params::new().with("content", content),
        ResourceClass::Cpu,
    )
}

/// A chain `a → b → c` of write steps.
pub fn chain(contents: [&str; 3]) -> Plan {
    let mut plan = Plan::new();
    let a = plan.add_step(write_step("a", contents[0])).unwrap();
    let b = plan.add_step(write_step("b", contents[1])).unwrap();
    let c = plan.add_step(write_step("c", contents[2])).unwrap();
    plan.add_input(b, "in", a);
    plan.add_input(c, "in", b);
    plan
}

/// Reads a step's `out` from a run report through the store.
pub fn read_output(
    store: &banger::store::Store,
    report: &banger::engine::RunReport,
    step: &str,
) -> Vec<u8> {
    let output = &report.outputs[step].outputs["out"];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    store.materialize(output, &path).unwrap();
    std::fs::read(path).unwrap()
}

/// A sandbox for running the real `banger` binary: its own HOME, XDG dirs and store, and no
/// inherited `BANGER_*` variables.
#[derive(Debug)]
pub struct TestContext {
    pub root: tempfile::TempDir,
}

impl TestContext {
    pub fn new() -> TestContext {
        TestContext {
            root: tempfile::tempdir().unwrap(),
        }
    }

    pub fn home(&self) -> std::path::PathBuf {
        self.root.path().join("home")
    }

    /// The project directory tests put Bangerfiles in.
    pub fn project(&self) -> std::path::PathBuf {
        let dir = self.root.path().join("project");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub fn cache_dir(&self) -> std::path::PathBuf {
        self.home().join(".cache/banger")
    }

    pub fn store_dir(&self) -> std::path::PathBuf {
        self.cache_dir().join("store")
    }

    /// Where the daemon keeps memory snapshots.
    pub fn snapshots_dir(&self) -> std::path::PathBuf {
        self.cache_dir().join(banger::paths::SNAPSHOTS_DIR)
    }

    pub fn config_file(&self) -> std::path::PathBuf {
        self.home().join(".config/banger/config.toml")
    }

    /// Copies `Bangerfile.example` (and the file it copies) into the project directory.
    pub fn with_example_project(&self) -> std::path::PathBuf {
        let project = self.project();
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::copy(repo.join("Bangerfile.example"), project.join("Bangerfile")).unwrap();
        std::fs::create_dir_all(project.join("examples")).unwrap();
        std::fs::copy(
            repo.join("examples/motd.sh"),
            project.join("examples/motd.sh"),
        )
        .unwrap();
        project
    }

    /// `banger ARGS` run in the project directory.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_banger"));
        command.args(args).current_dir(self.project());
        for name in banger::env::ALL.iter().chain(banger::env::STANDARD) {
            command.env_remove(name);
        }
        command
            .env("HOME", self.home())
            .env("XDG_RUNTIME_DIR", self.root.path().join("run"))
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let output = self.command(args).output().unwrap();
        Output {
            code: output.status.code(),
            stdout: self.redact(&String::from_utf8_lossy(&output.stdout)),
            stderr: self.redact(&String::from_utf8_lossy(&output.stderr)),
        }
    }

    /// Replaces this sandbox's temp path with `[ROOT]`.
    pub fn redact(&self, text: &str) -> String {
        let root = self.root.path().to_string_lossy().into_owned();
        let canonical = std::fs::canonicalize(self.root.path())
            .map(|path| path.to_string_lossy().into_owned())
            .unwrap_or_else(|_| root.clone());
        text.replace(&canonical, "[ROOT]").replace(&root, "[ROOT]")
    }
}

/// A finished `banger` run, redacted.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Output {
    /// The snapshot form: exit code, then stdout, then stderr.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "exit: {:?}", self.code)?;
        writeln!(f, "--- stdout\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr\n{}", self.stderr.trim_end())
    }
}

/// Test step kind for every real kind: writes `out` = kind, params and every input's `out`, so
/// keys and early cutoff behave as with real executors. Never-cached kinds write nothing.
#[derive(Debug, Clone)]
pub struct FakeStep {
    pub counters: Arc<Counters>,
}

impl Executor for FakeStep {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            self.counters.enter(&ctx.step_id);
            let result = (|| {
                let info = banger::steps::kind_info(&ctx.kind).expect("a real kind");
                if info.cache == banger::plan::CachePolicy::Never {
                    return Ok(());
                }
                let mut bytes = format!("{} {:?}\n", ctx.kind, ctx.params).into_bytes();
                for input in ctx.inputs() {
                    if input.outputs.contains_key("out") {
                        let path = ctx.input_file(&input.name, "out")?;
                        bytes.extend(
                            std::fs::read(path).map_err(|e| StepError::with_source("read", e))?,
                        );
                    }
                }
                std::fs::write(ctx.output("out")?, bytes)
                    .map_err(|e| StepError::with_source("write", e))
            })();
            self.counters.leave();
            result
        })
    }
}

/// An engine with [`FakeStep`] for every step kind banger plans.
pub fn fake_engine(
    store_dir: &std::path::Path,
    counters: &Arc<Counters>,
) -> banger::engine::Engine {
    let mut builder =
        banger::engine::Engine::builder(banger::store::Store::open(store_dir).unwrap());
    for info in banger::steps::ALL_KINDS {
        builder = builder.executor(
            info.name,
            FakeStep {
                counters: Arc::clone(counters),
            },
        );
    }
    builder.build()
}

/// Runs the project's Bangerfile through the engine with fake executors, as `banger up` would
/// key and record it.
pub fn build_with_fakes(
    context: &TestContext,
    counters: &Arc<Counters>,
) -> banger::engine::RunReport {
    let config = banger::config::Config::defaults(&context.config_file());
    let (spec, plan) =
        banger::ops::project::load_plan(&context.project().join("Bangerfile"), &config).unwrap();
    let engine = fake_engine(&context.store_dir(), counters);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(engine.run(
            &plan,
            &banger::ops::project::project_id(&spec),
            &banger::engine::NullReporter,
            banger::engine::RunOptions::default(),
        ))
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Capabilities and external tools

pub fn require_all() -> bool {
    std::env::var("BANGER_TEST_REQUIRE_ALL").as_deref() == Ok("1")
}

/// True when `available`; otherwise skips (returns false) or, under
/// `BANGER_TEST_REQUIRE_ALL=1`, fails.
pub fn capable(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    assert!(
        !require_all(),
        "{what} is unavailable, and BANGER_TEST_REQUIRE_ALL=1 forbids skipping"
    );
    eprintln!("skipping: {what} is unavailable");
    false
}

pub fn have_e2fsprogs() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        ["e2fsck", "debugfs", "dumpe2fs"].iter().all(|tool| {
            Command::new(tool)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    })
}

/// Runs a command; the error carries the argv, exit status and stderr.
pub fn run(command: &mut Command) -> Result<std::process::Output, String> {
    let argv = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| format!("cannot run {argv}: {e}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{argv} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

pub fn run_ok(command: &mut Command) -> String {
    let output = run(command).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `e2fsck -fn` exits 0 and says nothing beyond its five pass headers and the summary.
pub fn assert_fsck_clean(image: &Path) {
    let stdout = run_ok(Command::new("e2fsck").arg("-fn").arg(image));
    for line in stdout.lines() {
        let expected = line.starts_with("Pass ") || line.contains(" files (") || line.is_empty();
        assert!(expected, "e2fsck complained about {image:?}:\n{stdout}");
    }
}

pub fn debugfs(image: &Path, request: &str) -> String {
    run_ok(Command::new("debugfs").arg("-R").arg(request).arg(image))
}

/// The whitespace-separated token following `label` in debugfs output.
pub fn field<'a>(text: &'a str, label: &str) -> &'a str {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in:\n{text}"));
    text[at + label.len()..]
        .split_whitespace()
        .next()
        .expect("a value")
}

/// Lowercase hex sha256 of `bytes`, as bundle manifests and catalogs write it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Connects to an agent's unix socket, retrying while it is refused: the socket file
/// appears at `bind`, a moment before the agent listens.
pub async fn connect_agent(socket: &Path) -> banger::guest::GuestChannel {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match banger::guest::GuestChannel::connect_unix(socket).await {
            Ok(channel) => return channel,
            Err(banger::guest::GuestError::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(error) => panic!(
                "cannot connect to the agent at {}: {error}",
                socket.display()
            ),
        }
    }
}

/// The embedded agent, written once per test process (so no copy is ever open for writing
/// while another test thread forks: ETXTBSY); tests hard-link or run it from here.
pub fn agent_binary() -> &'static Path {
    use std::os::unix::fs::PermissionsExt;
    static BINARY: OnceLock<(tempfile::TempDir, std::path::PathBuf)> = OnceLock::new();
    &BINARY
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("banger-agent");
            std::fs::write(&path, banger::assets::AGENT_BINARY).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            (dir, path)
        })
        .1
}

/// Deterministic bytes that compress somewhat, like real binaries.
pub fn pseudo_random(length: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as u8) & 0x3f
        })
        .collect()
}

/// A VM the daemon adopts at start-up without any VMM behind it: a `sleep` process stands in
/// for QEMU, recorded as running with a scratch file as a real launch leaves. The agent and
/// SSH addresses are whatever the test serves. Create every fake VM before the daemon
/// starts: it reads scratch files only then.
pub struct FakeVm {
    pub name: String,
    pub vmm: std::process::Child,
    pub run_dir: std::path::PathBuf,
}

impl FakeVm {
    /// Records VM `name` in `context`'s state as running, `index` making its id unique.
    /// `ssh` is where its SSH server is reached, `None` for no network.
    pub fn adopt(
        context: &TestContext,
        name: &str,
        index: usize,
        ssh: Option<std::net::SocketAddr>,
    ) -> FakeVm {
        use banger::spec::NetworkMode;
        use banger::state::{State, VmRecord, VmState};
        use banger::vm::backend::{AgentAddress, BackendKind, Launched};
        use banger::vm::process::ProcessHandle;
        use std::os::unix::fs::DirBuilderExt;

        let id = format!("fakevm{index:06}");
        let run_dir = context.root.path().join("run/banger/vms").join(&id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&run_dir)
            .unwrap();
        let vmm = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let launched = Launched {
            backend: BackendKind::Qemu,
            vmm: ProcessHandle::of(vmm.id()).unwrap(),
            helpers: Vec::new(),
            control_socket: run_dir.join("qmp.sock"),
            agent: AgentAddress::Serial {
                path: run_dir.join("agent.sock"),
            },
            ssh_host: ssh.map(|address| address.ip().to_string()),
            ssh_port: ssh.map(|address| address.port()),
            tap: None,
        };
        std::fs::write(
            run_dir.join("launched.json"),
            serde_json::to_string(&launched).unwrap(),
        )
        .unwrap();
        let state_dir = context.home().join(".local/state/banger");
        std::fs::create_dir_all(&state_dir).unwrap();
        State::open(&state_dir)
            .unwrap()
            .create_vm(&VmRecord {
                name: name.to_owned(),
                id,
                image: "debian-bookworm".into(),
                kernel: "debian-bookworm".into(),
                backend: "qemu".into(),
                vcpus: 1,
                memory_mib: 256,
                disk_bytes: 1 << 30,
                state: VmState::Running,
                created_ms: 0,
                rootfs_integrity: None,
                network: if ssh.is_some() {
                    NetworkMode::User
                } else {
                    NetworkMode::None
                },
                ports: Vec::new(),
            })
            .unwrap();
        FakeVm {
            name: name.to_owned(),
            vmm,
            run_dir,
        }
    }

    /// Where its agent is expected to listen.
    pub fn agent_socket(&self) -> std::path::PathBuf {
        self.run_dir.join("agent.sock")
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        let _ = self.vmm.kill();
        let _ = self.vmm.wait();
    }
}

/// Stops a test HOME's VMs and daemon however the test ends.
pub struct StopDaemon<'a>(pub &'a TestContext);

impl Drop for StopDaemon<'_> {
    fn drop(&mut self) {
        stop_daemon_and_vms(&self.0.home(), &self.0.root.path().join("run"));
    }
}

/// Stops every VM of the HOME and then its daemon (for the shared world at exit).
pub fn stop_daemon_and_vms(home: &std::path::Path, runtime_dir: &std::path::Path) {
    let banger = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_banger"));
        for name in banger::env::ALL.iter().chain(banger::env::STANDARD) {
            command.env_remove(name);
        }
        command
            .args(args)
            .env("HOME", home)
            .env("XDG_RUNTIME_DIR", runtime_dir)
            .stdin(std::process::Stdio::null())
            .output()
    };
    if !runtime_dir.join("banger/banger.sock").exists() {
        return;
    }
    if let Ok(list) = banger(&["--json", "vm", "list"]) {
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            if let Ok(record) = serde_json::from_str::<serde_json::Value>(line)
                && let Some(name) = record["data"]["name"].as_str()
            {
                let _ = banger(&["vm", "rm", "-f", name]);
            }
        }
    }
    let _ = banger(&["daemon", "stop"]);
}

/// For fake agents: reads one frame from a client (its payload is read and dropped); `None`
/// when the stream ends or breaks first.
pub fn read_agent_request(
    stream: &mut impl std::io::Read,
) -> Option<banger::guest::protocol::FrameHeader> {
    use banger::guest::protocol::{FrameHeader, HEADER_LEN};
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).ok()?;
    let header = FrameHeader::decode(&header).unwrap();
    let mut payload = vec![0u8; header.len as usize];
    stream.read_exact(&mut payload).ok()?;
    Some(header)
}

/// For fake agents: the `Ready` frame answering a `Hello` on `channel`.
pub fn fake_ready_frame(channel: u32, label: &str) -> Vec<u8> {
    use banger::guest::protocol::{self, FrameType};
    protocol::encode_json_frame(
        FrameType::Ready,
        channel,
        &banger::guest::Ready {
            agent_version: format!("0.0.0-{label}"),
            protocol: banger::guest::PROTOCOL_VERSION,
            kernel_release: format!("6.1.0-{label}"),
            boot_ms: 1,
            pid1: false,
        },
    )
}

/// What `banger completion bash`, sourced by a real bash, offers for `words` (the last one
/// is the word being completed), as Tab would drive it in `context`'s environment.
pub fn bash_complete(context: &TestContext, words: &[&str]) -> Vec<String> {
    let script = context.run(&["completion", "bash"]);
    assert_eq!(script.code, Some(0), "{script}");
    let script_path = context.root.path().join("banger.bash");
    std::fs::write(&script_path, &script.stdout).unwrap();
    let template = context.command(&[]);
    let mut bash = std::process::Command::new("bash");
    for name in banger::env::ALL.iter().chain(banger::env::STANDARD) {
        bash.env_remove(name);
    }
    for (key, value) in template.get_envs() {
        if let Some(value) = value {
            bash.env(key, value);
        }
    }
    let quoted: Vec<String> = words.iter().map(|word| format!("'{word}'")).collect();
    let line = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; _clap_complete_banger banger {} {}; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script_path.display(),
        quoted.join(" "),
        words.len() - 1,
        quoted[words.len() - 1],
        quoted[words.len() - 2],
    );
    let output = bash.arg("-c").arg(&line).output().unwrap();
    assert!(
        output.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|candidate| candidate.trim_end().to_owned())
        .filter(|candidate| !candidate.is_empty())
        .collect()
}
