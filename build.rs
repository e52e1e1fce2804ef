//! Builds banger's guest agent (`assets/agent`, its own package) as a static binary, so
//! `src/assets.rs` can embed it with `include_bytes!`.
//!
//! The agent runs inside guests of any libc (or none), so it is linked with `+crt-static` for
//! the host's x86_64 GNU target, which needs no extra toolchain. It gets its own target
//! directory under `OUT_DIR`: sharing banger's would deadlock on cargo's build lock.

use std::path::PathBuf;
use std::process::Command;

const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    println!("cargo:rerun-if-changed=assets/agent/src");
    println!("cargo:rerun-if-changed=assets/agent/Cargo.toml");
    println!("cargo:rerun-if-changed=assets/agent/Cargo.lock");
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("agent-target");
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_default();
    // Remapped paths make the binary identical whatever the checkout and cargo home, so image
    // keys (which cover the agent's bytes) are the same on every machine.
    let rustflags = [
        "-C".to_owned(),
        "target-feature=+crt-static".to_owned(),
        format!(
            "--remap-path-prefix={}=/banger-agent",
            manifest_dir.join("assets/agent").display()
        ),
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
    ]
    .join("\x1f");
    let mut command = Command::new(&cargo);
    command
        .args(["build", "--release", "--locked", "--target", AGENT_TARGET])
        .arg("--manifest-path")
        .arg("assets/agent/Cargo.toml")
        .arg("--target-dir")
        .arg(&target_dir)
        // With an explicit --target these flags reach only the agent, not its build scripts.
        // The encoded form keeps paths with spaces intact.
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    if !output.status.success() {
        panic!(
            "building the guest agent failed: {command:?}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let built = target_dir
        .join(AGENT_TARGET)
        .join("release")
        .join("banger-agent");
    std::fs::copy(&built, out_dir.join("banger-agent"))
        .unwrap_or_else(|error| panic!("cannot copy {}: {error}", built.display()));
}
