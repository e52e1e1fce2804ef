//! `kernel.stage`: one step whose outputs are everything a boot needs from a kernel, so a
//! kernel is one record: `vmlinux`, and when there are any, `initrd`, `modules.tar` and
//! `release.txt`.
//!
//! Inputs: `kernel` (a recipe's extract step, a bundle's unpack step, or an import) and
//! optionally `initramfs`; no params. Outputs are hard links of the inputs: staging copies no bytes.

use crate::engine::{BoxFuture, Executor, StepContext, StepError};

#[derive(Debug, Clone, Copy, Default)]
pub struct StageKernel;

/// The files a staged kernel may have, and which are required.
pub const STAGED_FILES: &[(&str, bool)] = &[
    ("vmlinux", true),
    ("initrd", false),
    ("modules.tar", false),
    ("release.txt", false),
];

impl Executor for StageKernel {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            for (file, required) in STAGED_FILES {
                let source = ctx
                    .inputs()
                    .iter()
                    .rev()
                    .find(|input| input.outputs.contains_key(*file))
                    .map(|input| input.name.clone());
                let Some(input) = source else {
                    if *required {
                        return Err(StepError::new(format!(
                            "no input of {} provides `{file}`",
                            ctx.step_id
                        )));
                    }
                    continue;
                };
                let path = ctx.input_file(&input, file)?;
                std::fs::hard_link(&path, ctx.output(file)?).map_err(|error| {
                    StepError::with_source(format!("cannot stage `{file}`"), error)
                })?;
            }
            Ok(())
        })
    }
}
