//! `kernel.fetch-package`: the distribution's packaged kernel, with its ordinary package client
//! (`apt-get download`, following a metapackage to the versioned kernel package).
//!
//! Params: [`crate::plan::kinds::KernelPackageParams`]: `distro` (`debian`), `suite`,
//! `package`, and `refresh` when `kernel pull --force` asks to fetch again. Outputs: `kernel.deb`, and `package.json` (what was fetched: the
//! package name, version and the chain from the metapackage).

use serde_json::json;

use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::kernel::fetch::fetch_kernel_package;
use crate::plan::kinds::KernelPackageParams;

#[derive(Debug, Clone, Copy, Default)]
pub struct FetchKernelPackage;

impl Executor for FetchKernelPackage {
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
            let download_dir = ctx.work_dir()?.join("download");
            let fetched = tokio::select! {
                fetched = fetch_kernel_package(package, &download_dir) => fetched
                    .map_err(|error| StepError::with_source(format!("cannot fetch {package}"), error))?,
                () = ctx.cancellation().cancelled() => return Err(StepError::new("cancelled")),
            };
            std::fs::rename(&fetched.path, ctx.output("kernel.deb")?).map_err(|error| {
                StepError::with_source("cannot keep the downloaded package", error)
            })?;
            let description = json!({
                "requested": fetched.requested,
                "name": fetched.name,
                "version": fetched.version,
                "chain": fetched.chain,
            });
            std::fs::write(ctx.output("package.json")?, description.to_string())
                .map_err(|error| StepError::with_source("cannot write package.json", error))
        })
    }
}
