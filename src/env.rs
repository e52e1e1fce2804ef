//! Every environment variable banger reads, in one place.
//!
//! Other modules read variables only through the functions here, so `docs/cli.md` can list them
//! all and tests can see what a sandboxed run must override. The standard XDG variables and
//! `HOME` are read by [`crate::paths`] through [`var_path`].

use std::ffi::OsString;
use std::path::PathBuf;

/// Directory of the step store and downloads. Default: `$XDG_CACHE_HOME/banger`, else
/// `~/.cache/banger`.
pub const BANGER_CACHE_DIR: &str = "BANGER_CACHE_DIR";
/// Directory of durable state (VM and image database, logs). Default:
/// `$XDG_STATE_HOME/banger`, else `~/.local/state/banger`.
pub const BANGER_STATE_DIR: &str = "BANGER_STATE_DIR";
/// The config file. Default: `$XDG_CONFIG_HOME/banger/config.toml`, else
/// `~/.config/banger/config.toml`. A missing file means built-in defaults.
pub const BANGER_CONFIG: &str = "BANGER_CONFIG";
/// Directory of sockets and other per-boot files. Default: `$XDG_RUNTIME_DIR/banger`, else
/// `/tmp/banger-<uid>`.
pub const BANGER_RUNTIME_DIR: &str = "BANGER_RUNTIME_DIR";
/// `kvm` or `tcg`: the accelerator QEMU uses, overriding detection (which never picks KVM on a
/// host where guests hang under it).
pub const BANGER_ACCEL: &str = "BANGER_ACCEL";
/// The `vhost-device-vsock` binary QEMU's vsock runs through. Default: found on `PATH`, else
/// in cargo's `bin` directory.
pub const BANGER_VHOST_DEVICE_VSOCK: &str = "BANGER_VHOST_DEVICE_VSOCK";
/// The QEMU binary. Default: `qemu-system-x86_64` on `PATH`.
pub const BANGER_QEMU: &str = "BANGER_QEMU";
/// Any non-empty value hides progress bars (events still print as plain lines with `-v`).
pub const BANGER_NO_PROGRESS: &str = "BANGER_NO_PROGRESS";
/// The `tracing` filter for banger's events (`info`, `banger=debug`, `banger::ops=trace`…):
/// the CLI's on stderr, the daemon's in `daemon.log`. Default: warnings for the CLI (more
/// with `-v`), `info` for the daemon.
pub const BANGER_LOG: &str = "BANGER_LOG";
/// The filter when `BANGER_LOG` is unset, as other Rust programs read it.
pub const RUST_LOG: &str = "RUST_LOG";
/// Any non-empty value disables colour (<https://no-color.org>).
pub const NO_COLOR: &str = "NO_COLOR";
/// Registries (`host[:port]`, comma-separated) spoken to over plain HTTP, in addition to
/// loopback ones (`localhost`, `127.0.0.0/8`, `[::1]`), which always are.
pub const BANGER_INSECURE_REGISTRIES: &str = "BANGER_INSECURE_REGISTRIES";
/// How many times a registry or download request is tried in all when it fails transiently
/// (5xx, 429, timeouts, dropped connections). Default 5; `1` disables retries.
pub const BANGER_REGISTRY_RETRIES: &str = "BANGER_REGISTRY_RETRIES";
/// Docker's: the directory holding `config.json`, whose `auths` give registry credentials.
/// Default: `~/.docker`.
pub const DOCKER_CONFIG: &str = "DOCKER_CONFIG";
/// Podman's (containers-auth.json): the registry credentials file it writes; default
/// `$XDG_RUNTIME_DIR/containers/auth.json`. Read before Docker's config.
pub const REGISTRY_AUTH_FILE: &str = "REGISTRY_AUTH_FILE";
/// Tests only: the `firecracker` binary the Firecracker backend tests run (default: on
/// `PATH`).
pub const BANGER_TEST_FIRECRACKER: &str = "BANGER_TEST_FIRECRACKER";
/// Tests only: `1` turns "skipped: capability missing" into a failure, so CI never silently
/// skips a test it was meant to run.
pub const BANGER_TEST_REQUIRE_ALL: &str = "BANGER_TEST_REQUIRE_ALL";
/// Tests only: set when a test re-ran itself inside a network namespace it made (the bridge
/// network tests), naming that namespace.
pub const BANGER_TEST_NETNS: &str = "BANGER_TEST_NETNS";

/// The home directory (paths, Docker's config, cargo's `bin`).
pub const HOME: &str = "HOME";
/// XDG base directories ([`crate::paths`]).
pub const XDG_CACHE_HOME: &str = "XDG_CACHE_HOME";
pub const XDG_STATE_HOME: &str = "XDG_STATE_HOME";
pub const XDG_CONFIG_HOME: &str = "XDG_CONFIG_HOME";
pub const XDG_RUNTIME_DIR: &str = "XDG_RUNTIME_DIR";
/// Where `cargo install` put `vhost-device-vsock` (default `~/.cargo`), searched after `PATH`.
pub const CARGO_HOME: &str = "CARGO_HOME";
/// Proxies for registry requests (either case; `NO_PROXY` lists hosts reached directly).
pub const HTTP_PROXY: &str = "HTTP_PROXY";
pub const HTTPS_PROXY: &str = "HTTPS_PROXY";
pub const NO_PROXY: &str = "NO_PROXY";
/// Where programs banger runs are found (`banger doctor` reports what it finds there).
pub const PATH: &str = "PATH";

/// The standard variables banger honours, for the docs and for test sandboxes.
pub const STANDARD: &[&str] = &[
    HOME,
    XDG_CACHE_HOME,
    XDG_STATE_HOME,
    XDG_CONFIG_HOME,
    XDG_RUNTIME_DIR,
    NO_COLOR,
    RUST_LOG,
    DOCKER_CONFIG,
    REGISTRY_AUTH_FILE,
    HTTP_PROXY,
    HTTPS_PROXY,
    NO_PROXY,
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// Every `BANGER_*` variable, for the docs and for test sandboxes.
pub const ALL: &[&str] = &[
    BANGER_ACCEL,
    BANGER_QEMU,
    BANGER_VHOST_DEVICE_VSOCK,
    BANGER_CACHE_DIR,
    BANGER_STATE_DIR,
    BANGER_CONFIG,
    BANGER_RUNTIME_DIR,
    BANGER_NO_PROGRESS,
    BANGER_LOG,
    BANGER_INSECURE_REGISTRIES,
    BANGER_REGISTRY_RETRIES,
    BANGER_TEST_REQUIRE_ALL,
    BANGER_TEST_NETNS,
    BANGER_TEST_FIRECRACKER,
];

/// Standard variables banger reads but a test sandbox keeps from its parent: they say where
/// programs are, not where banger's files go.
pub const INHERITED: &[&str] = &[PATH, CARGO_HOME];

/// A variable as a path; unset or empty counts as unset.
pub fn var_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

/// True when a flag variable is set to anything but the empty string.
pub fn flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|value: OsString| !value.is_empty())
}

/// `BANGER_NO_PROGRESS`.
pub fn no_progress() -> bool {
    flag(BANGER_NO_PROGRESS)
}

/// `NO_COLOR`.
pub fn no_color() -> bool {
    flag(NO_COLOR)
}

/// `BANGER_INSECURE_REGISTRIES`, split on commas, blanks dropped.
pub fn insecure_registries() -> Vec<String> {
    std::env::var(BANGER_INSECURE_REGISTRIES)
        .map(|value| {
            value
                .split(',')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `BANGER_TEST_REQUIRE_ALL=1`.
pub fn test_require_all() -> bool {
    std::env::var(BANGER_TEST_REQUIRE_ALL).is_ok_and(|value| value == "1")
}

/// `PATH`, as the OS gives it.
pub fn search_path() -> Option<OsString> {
    std::env::var_os(PATH)
}

/// Finds a program on `PATH` (or at an absolute path).
pub fn find_program(name: &str) -> Option<PathBuf> {
    find_program_in(name, search_path().as_deref())
}

/// Finds a program on the given search path (or at an absolute path): [`find_program`] with
/// the path passed in, so a caller (`banger doctor`'s tests) can look somewhere of its own
/// without changing the process's `PATH` under other threads.
pub fn find_program_in(name: &str, search_path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    if name.contains('/') {
        let path = std::path::Path::new(name);
        return path.is_file().then(|| path.to_path_buf());
    }
    std::env::split_paths(search_path?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `BANGER_REGISTRY_RETRIES`, when set to a positive number.
pub fn registry_retries() -> Option<u32> {
    std::env::var(BANGER_REGISTRY_RETRIES)
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .filter(|attempts: &u32| *attempts > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(dir: &std::path::Path, found: &mut Vec<(std::path::PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                found.push((path.clone(), std::fs::read_to_string(&path).unwrap()));
            }
        }
    }

    /// Only this module names variables: every other read goes through a constant here.
    #[test]
    fn no_module_reads_a_variable_by_a_name_of_its_own() {
        let mut files = Vec::new();
        sources(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let mut offenders = Vec::new();
        for (path, text) in files {
            if path.ends_with("src/env.rs") {
                continue;
            }
            for pattern in ["var_path(\"", "env::var(\"", "var_os(\"", "env::var_os(\""] {
                if text.contains(pattern) {
                    offenders.push(format!("{}: {pattern}", path.display()));
                }
            }
        }
        assert!(offenders.is_empty(), "read outside env.rs: {offenders:?}");
    }

    /// `docs/cli.md` lists every variable declared here, and declares no `BANGER_*` one that
    /// is not.
    #[test]
    fn the_docs_list_exactly_the_declared_variables() {
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md"),
        )
        .unwrap();
        let table = docs
            .split("## Environment")
            .nth(1)
            .expect("docs/cli.md has an Environment section");
        for name in ALL.iter().chain(STANDARD).chain(INHERITED) {
            assert!(
                table.contains(&format!("`{name}`")),
                "docs/cli.md does not list {name}"
            );
        }
        for word in table.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("BANGER_") {
                assert!(
                    ALL.contains(&word),
                    "docs/cli.md lists {word}, which env.rs does not declare"
                );
            }
        }
    }
}
