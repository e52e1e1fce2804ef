//! The remote step cache, through the real `banger` binary and Debian's real `docker-registry`
//! on loopback, against baselines measured in the same run.
//!
//! 1. **A fresh store with a warm remote** against **building from scratch**: a Bangerfile of
//!    the default Debian image with one `run` step. Baseline: `banger build` in an empty HOME
//!    (mmdebstrap, the kernel's steps, a builder VM, the ext4). Then the same HOME uploads
//!    (`--cache-to`, untimed), and another empty HOME builds with `--cache-from`: the recipe's
//!    tar and the `run` layer are downloaded and verified, the ext4 written locally. Target:
//!    the warm build ≥ 10× faster than the scratch build. One sample each: the baseline
//!    takes minutes.
//! 2. **Bytes of a second push** against the first: the `run` step edited, built and pushed
//!    again from the first HOME; only its layer (and two small records) should travel.
//!
//! HOMEs and the registry live in a temporary directory removed at the end. Needs
//! docker-registry, QEMU, vhost-device-vsock, mmdebstrap and apt. Run:
//! `cargo bench --bench remote_cache` (or `scripts/bench-remote-cache`).

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, json_record, secs};

const TARGET_SPEEDUP: f64 = 10.0;

struct Registry {
    child: Child,
    address: String,
}

impl Registry {
    fn start(root: &Path) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = root.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {address}\n  secret: banger-bench\n",
                root.join("registry").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package `docker-registry`)");
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { child, address }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sandbox(root: &Path, name: &str) -> Sandbox {
    let home = root.join(name);
    std::fs::create_dir_all(&home).unwrap();
    let runtime =
        std::env::temp_dir().join(format!("banger-bench-rc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&runtime).unwrap();
    Sandbox { home, runtime }
}

fn project(home: &Path, bangerfile: &str) -> PathBuf {
    let dir = home.join("project");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Bangerfile"), bangerfile).unwrap();
    dir
}

/// Kinds of the steps a `--json` run executed.
fn ran_kinds(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["type"] == "step_finished")
        .map(|event| event["data"]["kind"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn mib(bytes: u64) -> String {
    format!(
        "{:.1} MiB ({bytes} bytes)",
        bytes as f64 / (1024.0 * 1024.0)
    )
}

fn main() -> ExitCode {
    if std::env::args().any(|arg| arg == "--list") {
        println!("remote_cache: benchmark");
        return ExitCode::SUCCESS;
    }
    let root = tempfile::Builder::new()
        .prefix("banger-bench-remote-")
        .tempdir()
        .unwrap();
    let registry = Registry::start(root.path());
    let remote = format!("{}/bench/banger-cache", registry.address);
    let bangerfile = "[project]\nname = \"bench-remote\"\n\n\
                      [[image.provision]]\nrun = \"echo one > /etc/one\"\n";

    // 1. From scratch (the baseline), then the same HOME uploads.
    let scratch = sandbox(root.path(), "scratch");
    let scratch_dir = project(&scratch.home, bangerfile);
    eprintln!("building from scratch (mmdebstrap, kernel, builder VM): minutes");
    let (scratch_time, _) = scratch.timed(&["--json", "build"], &scratch_dir);
    let (_, first_push) = scratch.timed(&["--json", "build", "--cache-to", &remote], &scratch_dir);
    let first = json_record(
        &String::from_utf8_lossy(&first_push.stdout),
        "push_finished",
    );
    let first_bytes = first["uploaded_bytes"].as_u64().unwrap_or(0);

    // A fresh HOME with the project and its lock, from the warm remote.
    let warm = sandbox(root.path(), "warm");
    let warm_dir = project(&warm.home, bangerfile);
    std::fs::copy(
        scratch_dir.join("Bangerfile.lock"),
        warm_dir.join("Bangerfile.lock"),
    )
    .unwrap();
    let (warm_time, warm_output) =
        warm.timed(&["--json", "build", "--cache-from", &remote], &warm_dir);
    let kinds = ran_kinds(&warm_output.stdout);
    assert!(
        !kinds
            .iter()
            .any(|kind| kind == "provision.run" || kind.starts_with("recipe.")),
        "the warm build ran {kinds:?}"
    );
    let speedup = scratch_time.as_secs_f64() / warm_time.as_secs_f64();
    println!(
        "fresh store, warm remote: {} ; baseline from scratch: {} ; scratch / warm = {:.1}× \
         (target ≥ {TARGET_SPEEDUP}×: {})",
        secs(warm_time),
        secs(scratch_time),
        speedup,
        if speedup >= TARGET_SPEEDUP {
            "met"
        } else {
            "MISSED"
        }
    );

    // 2. The run step edited, then pushed again.
    std::fs::write(
        scratch_dir.join("Bangerfile"),
        bangerfile.replace("echo one", "echo ONE"),
    )
    .unwrap();
    let (_, second_push) = scratch.timed(&["--json", "build", "--cache-to", &remote], &scratch_dir);
    let second = json_record(
        &String::from_utf8_lossy(&second_push.stdout),
        "push_finished",
    );
    let second_bytes = second["uploaded_bytes"].as_u64().unwrap_or(0);
    println!(
        "bytes uploaded: first push {} ({} steps), second push after editing the run step {} \
         ({} steps) ; second / first = {:.4}×",
        mib(first_bytes),
        first["pushed"],
        mib(second_bytes),
        second["pushed"],
        second_bytes as f64 / first_bytes.max(1) as f64
    );
    drop(scratch);
    drop(warm);
    drop(registry);
    ExitCode::SUCCESS
}
