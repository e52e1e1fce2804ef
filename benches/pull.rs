//! `banger image pull` against Debian's real `docker-registry` on loopback: a cold pull, then a
//! re-pull with everything cached (target ≤ 200 ms and no step run), each against baselines
//! from the same run: starting the binary at all (`banger --version`) and the one registry
//! round trip a re-pull must make (resolving the tag, done by hand with a raw HTTP request).
//! Run: `cargo bench --bench pull` (or `scripts/bench-images`).

// The integration tests' registry harness, shared rather than copied (both files allow dead
// code themselves).
#[path = "../tests/it/support.rs"]
mod support;

#[path = "../tests/it/registry.rs"]
mod registry;

use std::io::{Read, Write};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use registry::{Pusher, RealRegistry, push_image};

const RUNS: usize = 10;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn banger(home: &std::path::Path, args: &[&str]) -> (Duration, std::process::Output) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_banger"))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CACHE_HOME")
        .env_remove("XDG_STATE_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("BANGER_CACHE_DIR")
        .env_remove("BANGER_STATE_DIR")
        .output()
        .expect("run banger");
    (started.elapsed(), output)
}

/// One raw `GET /v2/REPO/manifests/TAG`, the round trip a cached re-pull cannot avoid.
fn resolve_by_hand(address: &str, path: &str) -> Duration {
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response");
    assert!(response.starts_with(b"HTTP/1.1 200"), "registry said no");
    started.elapsed()
}

fn main() -> ExitCode {
    let Some(registry) = RealRegistry::start(None) else {
        eprintln!("pull bench: docker-registry is not installed (apt-get install docker-registry)");
        return ExitCode::FAILURE;
    };
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let pusher = Pusher::new(&registry.address, None).await;
            push_image(&pusher, "bench/image", Some("v1"), "amd64", false).await;
        });
    let reference = format!("{}/bench/image:v1", registry.address);
    let home = tempfile::tempdir().expect("temp home");

    let (cold, output) = banger(home.path(), &["image", "pull", &reference]);
    assert!(output.status.success(), "{output:?}");

    let mut cached = Vec::new();
    for _ in 0..RUNS {
        let (elapsed, output) = banger(home.path(), &["--json", "image", "pull", &reference]);
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !stdout.contains("\"step_started\""),
            "a cached pull ran a step:\n{stdout}"
        );
        cached.push(elapsed);
    }
    let startup = median(
        (0..RUNS)
            .map(|_| banger(home.path(), &["--version"]).0)
            .collect(),
    );
    let round_trip = median(
        (0..RUNS)
            .map(|_| resolve_by_hand(&registry.address, "/v2/bench/image/manifests/v1"))
            .collect(),
    );
    let cached = median(cached);
    println!("banger image pull, 3 layers (gzip, zstd, plain) from a loopback registry");
    println!("cold pull:                    {:.0} ms", ms(cold));
    println!(
        "cached re-pull (median of {RUNS}): {:.0} ms (target ≤ 200 ms: {}); no step ran",
        ms(cached),
        if ms(cached) <= 200.0 { "ok" } else { "MISSED" }
    );
    println!(
        "  = {:.1}× starting banger at all ({:.1} ms), {:.0}× one raw manifest round trip ({:.2} ms)",
        ms(cached) / ms(startup),
        ms(startup),
        ms(cached) / ms(round_trip),
        ms(round_trip)
    );
    ExitCode::SUCCESS
}
