//! `kernel.fetch-package`: the distribution's packaged kernel, downloaded from the recipe's
//! suite with mmdebstrap (so Debian's kernel comes from Debian's archive on any host, Ubuntu
//! included), following a metapackage to the versioned kernel package.
//!
//! Params: [`crate::plan::kinds::KernelPackageParams`]: `distro` (`debian`), `suite`,
//! `package`, and `refresh` when `kernel pull --force` asks to fetch again. Outputs:
//! `kernel.deb`, and `package.json` (what was fetched: the package name, version and the chain
//! from the metapackage).
//!
//! mmdebstrap's `extract` variant resolves the package's dependencies against the suite,
//! downloads them and unpacks them into a throwaway tree (`--format=null`: nothing is kept);
//! an extract hook copies the downloaded `.deb` files out first. Measured here: 43 packages,
//! 41 MB, for bookworm's `linux-image-cloud-amd64`; the step is cached, so that is paid once.

use std::path::Path;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::mmdebstrap::{MMDEBSTRAP_CANCEL_GRACE, check_recipe_words, run_mmdebstrap};
use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::kernel::fetch::{FetchedPackage, pick_kernel_package};
use crate::plan::kinds::KernelPackageParams;

#[derive(Debug, Clone, Copy, Default)]
pub struct FetchKernelPackage;

impl Executor for FetchKernelPackage {
    fn cancel_grace(&self) -> std::time::Duration {
        MMDEBSTRAP_CANCEL_GRACE
    }

    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let params: KernelPackageParams = super::params(ctx)?;
            let distro = &params.distro;
            if distro != "debian" {
                return Err(StepError::new(format!(
                    "kernel recipes for `{distro}` are not supported; only `debian` ones are \
                     (use `banger kernel import NAME --from DIR` for another kernel)"
                )));
            }
            let package = &params.package;
            let work = ctx.work_dir()?;
            let picked = download_kernel_package(
                &params.suite,
                package,
                &work,
                &work.join("picked"),
                ctx.cancellation(),
            )
            .await?;
            std::fs::rename(&picked.path, ctx.output("kernel.deb")?).map_err(|error| {
                StepError::with_source("cannot keep the downloaded package", error)
            })?;
            let description = json!({
                "requested": picked.requested,
                "name": picked.name,
                "version": picked.version,
                "chain": picked.chain,
            });
            std::fs::write(ctx.output("package.json")?, description.to_string())
                .map_err(|error| StepError::with_source("cannot write package.json", error))
        })
    }
}

/// Downloads `package` and its dependencies from `suite` into a directory under `work`, and
/// moves the package holding the kernel into `destination_dir` (see
/// [`crate::kernel::fetch`]).
pub async fn download_kernel_package(
    suite: &str,
    package: &str,
    work: &Path,
    destination_dir: &Path,
    cancellation: &CancellationToken,
) -> Result<FetchedPackage, StepError> {
    check_recipe_words(suite, &[package.to_owned()])?;
    let downloads = tempfile::Builder::new()
        .prefix("downloads-")
        .tempdir_in(work)
        .map_err(|error| {
            StepError::with_source(
                format!("cannot make a directory in {}", work.display()),
                error,
            )
        })?;
    let argv = vec![
        "mmdebstrap".to_owned(),
        "--variant=extract".to_owned(),
        "--mode=auto".to_owned(),
        "--quiet".to_owned(),
        "--format=null".to_owned(),
        // Nothing runs in the tree, so nothing needs /proc or /sys.
        "--skip=chroot/mount".to_owned(),
        format!("--include={package}"),
        format!(
            "--extract-hook=sync-out /var/cache/apt/archives {}",
            crate::ssh::shell_quote(&downloads.path().to_string_lossy())
        ),
        "--".to_owned(),
        suite.to_owned(),
        "/dev/null".to_owned(),
    ];
    run_mmdebstrap(
        &argv,
        None,
        "to fetch the distribution's kernel, or get a kernel another way: `banger kernel pull \
         NAME` downloads a catalog bundle, `banger kernel import NAME --from DIR` imports a \
         vmlinux (and modules) you already have",
        cancellation,
    )
    .await
    .map_err(|error| {
        StepError::with_source(format!("cannot fetch {package} from {suite}"), error)
    })?;
    pick_kernel_package(package, downloads.path(), destination_dir)
        .map_err(|error| StepError::with_source(format!("cannot fetch {package}"), error))
}
