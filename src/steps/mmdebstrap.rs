//! `recipe.mmdebstrap`: a Debian root filesystem tar from distribution packages, so the default
//! image can be built on a host where no catalog URL is reachable.
//!
//! Params: [`crate::plan::kinds::RecipeParams`]: `distro` (`debian`), `suite` (`bookworm`),
//! `packages` (sorted; lowering adds
//! [`crate::plan::lower::RECIPE_BASE_PACKAGES`]), `source_date_epoch` (the lock's). Outputs:
//! `rootfs.tar`, and [`PACKAGES_OUTPUT`], the versions it installed. Runs `mmdebstrap
//! --variant=minbase` with the packages included; it needs `mmdebstrap` on the host and uses
//! the host's apt configuration to reach the archive.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::plan::kinds::RecipeParams;

#[derive(Debug, Clone, Copy, Default)]
pub struct Mmdebstrap;

impl Executor for Mmdebstrap {
    fn cancel_grace(&self) -> Duration {
        MMDEBSTRAP_CANCEL_GRACE
    }

    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let params: RecipeParams = super::params(ctx)?;
            let distro = &params.distro;
            if distro != "debian" {
                return Err(StepError::new(format!(
                    "recipe distro `{distro}` is not supported; only `debian` recipes exist"
                )));
            }
            check_recipe_words(&params.suite, &params.packages)?;
            let mut packages = params.packages.clone();
            packages.sort();
            packages.dedup();
            let output = ctx.output("rootfs.tar")?;
            let argv = vec![
                "mmdebstrap".to_owned(),
                "--variant=minbase".to_owned(),
                "--mode=auto".to_owned(),
                "--quiet".to_owned(),
                format!("--include={}", packages.join(",")),
                // Host keys are per machine (first boot makes them), and the only bytes that
                // differ between two runs with the same SOURCE_DATE_EPOCH and packages.
                "--customize-hook=rm -f \"$1\"/etc/ssh/ssh_host_*_key \"$1\"/etc/ssh/ssh_host_*_key.pub"
                    .to_owned(),
                // Nothing after this is an option, whatever a catalog's recipe says.
                "--".to_owned(),
                params.suite.clone(),
                output.to_string_lossy().into_owned(),
            ];
            run_mmdebstrap(
                &argv,
                Some(params.source_date_epoch),
                "to build Debian images from packages, or pull a catalog bundle instead",
                ctx.cancellation(),
            )
            .await?;
            let packages_out = ctx.output(PACKAGES_OUTPUT)?;
            tokio::task::spawn_blocking(move || {
                let packages = installed_packages(&output)?;
                std::fs::write(&packages_out, packages.join("\n") + "\n").map_err(|error| {
                    StepError::with_source(
                        format!("cannot write {}", packages_out.display()),
                        error,
                    )
                })
            })
            .await
            .map_err(|error| {
                StepError::new(format!("reading the package list panicked: {error}"))
            })?
        })
    }
}

/// How long mmdebstrap gets, after SIGTERM, to unmount and remove its temporary directory.
const MMDEBSTRAP_GRACE: Duration = Duration::from_secs(10);

/// What the engine waits for a cancelled mmdebstrap step: its grace after SIGTERM, and time to
/// reap it after SIGKILL.
pub(super) const MMDEBSTRAP_CANCEL_GRACE: Duration = Duration::from_secs(12);

/// Refuses a suite or package name that is not one (a catalog's recipe reaches mmdebstrap's
/// command line, where an option-looking word would run hooks on the host).
pub(super) fn check_recipe_words(suite: &str, packages: &[String]) -> Result<(), StepError> {
    crate::catalog::check_suite(suite).map_err(StepError::new)?;
    for package in packages {
        crate::catalog::check_package_name(package).map_err(StepError::new)?;
    }
    Ok(())
}

/// Runs mmdebstrap's `argv` with stdin closed, keeping stderr for the error (its last 20
/// lines). Cancelled, it gets SIGTERM first, so that it unmounts and removes its temporary
/// directory, and SIGKILL after [`MMDEBSTRAP_GRACE`]. `purpose` completes the not-installed
/// error ("install it … {purpose}").
pub(super) async fn run_mmdebstrap(
    argv: &[String],
    source_date_epoch: Option<u64>,
    purpose: &str,
    cancellation: &CancellationToken,
) -> Result<(), StepError> {
    let mut command = tokio::process::Command::new(&argv[0]);
    if let Some(epoch) = source_date_epoch {
        // mmdebstrap then clamps times and drops what differs run to run, so the same
        // packages give the same tar.
        command.env("SOURCE_DATE_EPOCH", epoch.to_string());
    }
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut child = command.spawn().map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            StepError::new(format!(
                "mmdebstrap is not installed; install it (`apt-get install mmdebstrap`) {purpose}"
            ))
        } else {
            StepError::with_source(format!("cannot run {argv:?}"), error)
        }
    })?;
    let mut stderr = child.stderr.take().expect("piped");
    let mut errors = Vec::new();
    let status = tokio::select! {
        status = async {
            let _ = stderr.read_to_end(&mut errors).await;
            child.wait().await
        } => status.map_err(|error| StepError::with_source(format!("waiting for {argv:?}"), error))?,
        () = cancellation.cancelled() => {
            stop_gracefully(&mut child).await;
            return Err(StepError::new("cancelled"));
        }
    };
    if !status.success() {
        let text = String::from_utf8_lossy(&errors);
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        return Err(StepError::new(format!(
            "{argv:?} failed ({status}):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )));
    }
    Ok(())
}

/// SIGTERM to the child's process group, then SIGKILL if it is still there after
/// [`MMDEBSTRAP_GRACE`].
async fn stop_gracefully(child: &mut tokio::process::Child) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let Some(pid) = child.id() else {
        return;
    };
    // The child leads its own group (`process_group(0)`), so the group id is its pid.
    let group = Pid::from_raw(pid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    if tokio::time::timeout(MMDEBSTRAP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

/// The output listing what a recipe installed: `name=version` per line, sorted (what
/// `Bangerfile.lock` records, so `--locked` can refuse a rebuild that would install other
/// versions).
pub const PACKAGES_OUTPUT: &str = "packages.txt";

/// `name=version` of every package dpkg's status in the root filesystem tar marks
/// installed, sorted.
pub fn installed_packages(rootfs_tar: &std::path::Path) -> Result<Vec<String>, StepError> {
    let read_error =
        |error| StepError::with_source(format!("cannot read {}", rootfs_tar.display()), error);
    let file = std::fs::File::open(rootfs_tar).map_err(read_error)?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, file));
    for entry in archive.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        let path = entry.path_bytes().into_owned();
        if path.strip_prefix(b"./").unwrap_or(&path) == b"var/lib/dpkg/status" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).map_err(read_error)?;
            return Ok(parse_dpkg_status(&text));
        }
    }
    Err(StepError::new(format!(
        "{} has no var/lib/dpkg/status: the recipe did not install packages with dpkg",
        rootfs_tar.display()
    )))
}

/// Installed packages of a dpkg status file, as sorted `name=version` (`name:arch` for
/// packages that are not of the native or `all` architecture).
fn parse_dpkg_status(text: &str) -> Vec<String> {
    let mut packages = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let (Some(name), Some(version), Some(status)) =
            (field("Package"), field("Version"), field("Status"))
        else {
            continue;
        };
        if status != "install ok installed" {
            continue;
        }
        let name = match field("Architecture") {
            Some(arch) if arch != "amd64" && arch != "all" => format!("{name}:{arch}"),
            _ => name.to_owned(),
        };
        packages.push(format!("{name}={version}"));
    }
    packages.sort();
    packages.dedup();
    packages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_installed_packages_are_listed_sorted() {
        let status = "Package: zlib1g\nStatus: install ok installed\nArchitecture: amd64\n\
                      Version: 1:1.2.13.dfsg-1\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: base-files\nStatus: install ok installed\nVersion: 12.4+deb12u5\n\
                      Architecture: amd64\n\n\
                      Package: libc6\nStatus: install ok installed\nArchitecture: i386\n\
                      Version: 2.36-9\n";
        assert_eq!(
            parse_dpkg_status(status),
            [
                "base-files=12.4+deb12u5",
                "libc6:i386=2.36-9",
                "zlib1g=1:1.2.13.dfsg-1"
            ]
        );
    }
}
