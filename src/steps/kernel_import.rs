//! `kernel.import`: a kernel from a directory on the host (`banger kernel import NAME --from
//! DIR`): `vmlinux` (an ELF with the PVH note, or a bzImage, converted), optional `initrd`,
//! optional `modules/` (a `lib/modules/<release>` tree).
//!
//! Params: [`crate::plan::kinds::KernelImportParams`] (`fingerprint` of the whole directory:
//! content, names, modes). Hint: `dir`.
//! Outputs: `vmlinux`, and `initrd`, `modules.tar`, `release.txt` when there are any. The
//! directory is fingerprinted again when the step runs; a change since planning fails it.

use std::path::PathBuf;

use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::kernel::{modules_tar, vmlinux};
use crate::plan::kinds::KernelImportParams;

#[derive(Debug, Clone, Copy, Default)]
pub struct ImportKernel;

impl Executor for ImportKernel {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let dir =
                ctx.hints.get("dir").map(PathBuf::from).ok_or_else(|| {
                    StepError::new(format!("step {} has no directory", ctx.step_id))
                })?;
            let expected = super::params::<KernelImportParams>(ctx)?.fingerprint;
            let vmlinux_out = ctx.output("vmlinux")?;
            let out_dir = vmlinux_out
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default();
            tokio::task::spawn_blocking(move || -> Result<(), StepError> {
                let actual = crate::sources::fingerprint_path(&dir).map_err(|error| {
                    StepError::with_source("cannot read the kernel directory", error)
                })?;
                if actual != expected {
                    return Err(StepError::new(format!(
                        "{} changed after the plan was made; run the command again",
                        dir.display()
                    )));
                }
                let info =
                    vmlinux::convert(&dir.join("vmlinux"), &vmlinux_out).map_err(|error| {
                        StepError::with_source(
                            format!("{}/vmlinux is not bootable", dir.display()),
                            error,
                        )
                    })?;
                let initrd = dir.join("initrd");
                if initrd.is_file() {
                    std::fs::copy(&initrd, out_dir.join("initrd"))
                        .map_err(|error| StepError::with_source("cannot copy the initrd", error))?;
                }
                let modules = dir.join("modules");
                if modules.is_dir() {
                    modules_tar::pack(&modules, &out_dir.join("modules.tar")).map_err(|error| {
                        StepError::with_source("cannot pack the modules", error)
                    })?;
                }
                std::fs::write(out_dir.join("release.txt"), format!("{}\n", info.release))
                    .map_err(|error| StepError::with_source("cannot write release.txt", error))?;
                Ok(())
            })
            .await
            .map_err(|error| StepError::new(format!("the kernel import panicked: {error}")))?
        })
    }
}
