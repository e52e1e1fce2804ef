//! `kernel.local`: a kernel recorded by `banger kernel import`, handed to the steps that boot
//! it. Never cached: it reads the state database, which changes outside any plan.
//!
//! Params: [`crate::plan::kinds::KernelLocalParams`] (`name`). Outputs: the recorded files (`vmlinux`, and `initrd`, `modules.tar` when
//! present), hard-linked from the store.

use std::path::PathBuf;

use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::plan::kinds::KernelLocalParams;
use crate::state::State;
use crate::store::OutputRef;

#[derive(Debug, Clone)]
pub struct LocalKernel {
    pub state_dir: PathBuf,
}

impl Executor for LocalKernel {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let name = &super::params::<KernelLocalParams>(ctx)?.name;
            let state = State::open(&self.state_dir)
                .map_err(|error| StepError::with_source("cannot open the state database", error))?;
            let kernel = state
                .require_kernel(name)
                .map_err(|error| StepError::with_source("unknown kernel", error))?;
            let files = [
                ("vmlinux", Some(kernel.vmlinux)),
                ("initrd", kernel.initrd),
                ("modules.tar", kernel.modules),
            ];
            for (file, stored) in files {
                let Some(stored) = stored else { continue };
                ctx.store()
                    .materialize(
                        &OutputRef {
                            integrity: stored.integrity,
                            size: stored.size,
                        },
                        &ctx.output(file)?,
                    )
                    .map_err(|error| {
                        StepError::with_source(
                            format!(
                                "kernel {name}'s `{file}` is not in the store (was it collected?)"
                            ),
                            error,
                        )
                    })?;
            }
            Ok(())
        })
    }
}
