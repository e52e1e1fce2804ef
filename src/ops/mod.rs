//! The use cases: what a command does, callable from the CLI and from the daemon alike, as
//! cargo keeps its operations under `ops` beneath a thin command line.
//!
//! - `project`: find and load a Bangerfile with its lock, plan it.
//! - `graph`: `banger graph`: statuses, `--why` explanations, text/DOT/JSON rendering.
//! - `build`: `banger build`: pin, plan, run, check the lock, record the images, bundle.
//! - `images`, `kernels`: named images and kernels: pull, import, register, remove.
//! - `up`: `banger up`: the images, then the project's VM, host files, workspace and the up
//!   command, through the sandbox's step executors.
//! - `vms`: the VM lifecycle (create, start, stop, kill, delete, list, reconcile), run by
//!   the daemon.
//! - `workspace`: a project directory as the tar stream `banger up` imports (git-aware,
//!   incremental).
//! - `copy`: `banger vm cp`: files and trees between host and guest as a tar stream, the
//!   guest's side extracted under confinement.
//! - `sessions`: `banger vm session`: long-lived guest commands the agent tracks.
//! - `doctor`: what the host can do.
//!
//! Layering: `cli` (the binary) and `daemon` call `ops`; `ops` calls everything below it
//! (`engine`, `steps`, `plan`, `store`, `state`, `vm`, …); nothing below `ops` imports
//! `ops`, `daemon` or `cli` (a test in this module checks the `use` lines). The daemon
//! serves VM requests; builds, pulls and `graph` run in the calling process, on the same
//! store, where a per-step lock makes two processes that need one step build it once.

pub mod build;
pub mod copy;
pub mod doctor;
pub mod graph;
pub mod images;
pub mod kernels;
pub mod network;
pub mod project;
pub mod publish;
pub mod sessions;
pub mod ssh_config;
pub mod up;
pub mod vms;
pub mod workspace;

#[cfg(test)]
mod tests {
    fn sources(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                found.push(path);
            }
        }
    }

    /// The layering of the module note: nothing below `ops` reaches up into `ops`, `daemon`
    /// or `cli` (comments aside).
    #[test]
    fn no_module_below_ops_imports_ops_daemon_or_cli() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let above = [
            "src/ops/",
            "src/daemon/",
            "src/cli/",
            "src/main.rs",
            "src/lib.rs",
        ];
        let mut offenders = Vec::new();
        for file in files {
            let relative = file.strip_prefix(src.parent().unwrap()).unwrap();
            let name = relative.to_string_lossy();
            if above.iter().any(|prefix| name.starts_with(prefix)) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for (number, line) in text.lines().enumerate() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                for upper in ["crate::ops", "crate::daemon", "crate::cli", "super::ops"] {
                    if code.contains(upper) {
                        offenders.push(format!("{name}:{}: {code}", number + 1));
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "{offenders:#?}");
    }
}
