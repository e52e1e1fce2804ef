//! `kernel.extract`: a kernel package → an ELF vmlinux with the PVH note, its modules, its
//! release.
//!
//! Input: `package` (`kernel.deb`); no params. Outputs: `vmlinux` (the bzImage payload decompressed and
//! checked for the PVH entry note: Firecracker on x86_64 boots only that, and QEMU microvm too),
//! `modules.tar` (`lib/modules/<release>`, deterministic), `release.txt`.

use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::kernel::deb::DebPackage;
use crate::kernel::{KernelFiles, is_kernel_file, modules_tar, vmlinux};

#[derive(Debug, Clone, Copy, Default)]
pub struct ExtractKernel;

impl Executor for ExtractKernel {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let package = ctx.input_file("package", "kernel.deb")?;
            let root = ctx.work_dir()?.join("root");
            let vmlinux_out = ctx.output("vmlinux")?;
            let modules_out = ctx.output("modules.tar")?;
            let release_out = ctx.output("release.txt")?;
            tokio::task::spawn_blocking(move || -> Result<(), StepError> {
                let deb = DebPackage::open(&package).map_err(|error| {
                    StepError::with_source("cannot read the kernel package", error)
                })?;
                deb.extract(&root, &is_kernel_file).map_err(|error| {
                    StepError::with_source("cannot extract the kernel package", error)
                })?;
                let files = KernelFiles::locate(&root).map_err(|error| {
                    StepError::with_source("the package holds no usable kernel", error)
                })?;
                let info = vmlinux::convert(&files.image, &vmlinux_out).map_err(|error| {
                    StepError::with_source("cannot turn the kernel into an ELF vmlinux", error)
                })?;
                if info.release != files.release {
                    return Err(StepError::new(format!(
                        "the kernel says it is {}, but its modules are for {}",
                        info.release, files.release
                    )));
                }
                modules_tar::pack(&files.modules_dir, &modules_out)
                    .map_err(|error| StepError::with_source("cannot pack the modules", error))?;
                std::fs::write(&release_out, format!("{}\n", files.release))
                    .map_err(|error| StepError::with_source("cannot write release.txt", error))
            })
            .await
            .map_err(|error| StepError::new(format!("kernel extraction panicked: {error}")))?
        })
    }
}
