//! `kernel.initramfs`: banger's small initramfs for a kernel: the static guest agent as `/init`
//! and the closure of the modules it must load (virtio, vsock, overlay) in load order.
//!
//! Input: `kernel` (`modules.tar`, `release.txt`). Params:
//! [`crate::plan::kinds::KernelInitramfsParams`]: `modules` (what to load; their dependencies
//! are resolved here), `agent` (the agent's digest, so a new agent re-keys it).
//! Output: `initrd` (gzip cpio newc).

use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::kernel::initramfs::{
    InitBinary, InitramfsCompression, InitramfsContents, build_initramfs,
};
use crate::kernel::modules::ModuleTree;
use crate::plan::kinds::KernelInitramfsParams;

#[derive(Debug, Clone, Copy, Default)]
pub struct BuildInitramfs;

impl Executor for BuildInitramfs {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let modules_tar = ctx.input_file("kernel", "modules.tar")?;
            let release_file = ctx.input_file("kernel", "release.txt")?;
            let wanted = super::params::<KernelInitramfsParams>(ctx)?.modules;
            let tree = ctx.work_dir()?.join("modules");
            let output = ctx.output("initrd")?;
            tokio::task::spawn_blocking(move || -> Result<(), StepError> {
                let release = std::fs::read_to_string(&release_file)
                    .map_err(|error| StepError::with_source("cannot read release.txt", error))?
                    .trim()
                    .to_owned();
                let file = std::fs::File::open(&modules_tar)
                    .map_err(|error| StepError::with_source("cannot read modules.tar", error))?;
                tar::Archive::new(std::io::BufReader::new(file))
                    .unpack(&tree)
                    .map_err(|error| StepError::with_source("cannot unpack modules.tar", error))?;
                let closure = ModuleTree::open(&tree)
                    .and_then(|modules| modules.resolve(&wanted))
                    .map_err(|error| StepError::with_source("cannot resolve the modules", error))?;
                build_initramfs(
                    &InitramfsContents {
                        init: InitBinary::Bytes(crate::assets::AGENT_BINARY),
                        kernel_release: &release,
                        modules: &closure.load_order,
                    },
                    InitramfsCompression::Gzip,
                    &output,
                )
                .map(|_| ())
                .map_err(|error| StepError::with_source("cannot build the initramfs", error))
            })
            .await
            .map_err(|error| StepError::new(format!("building the initramfs panicked: {error}")))?
        })
    }
}
