//! `provision.copy`: a project file or directory as a layer, root-owned at its destination.
//!
//! No inputs: what a copy adds does not depend on the image below it, so editing an earlier
//! provision entry does not re-run it. Params: [`crate::plan::kinds::ProvisionCopyParams`].
//! Hint: `project_dir`. Output: `layer.tar` ([`crate::rootfs::layer_tar::write_copy_layer`]).
//!
//! 1. Re-fingerprint the source: if it changed since the plan was keyed, fail rather than
//!    store content the key does not describe.
//! 2. Write the layer: the source at `dest`, owner root, the given mode on the top entry (else
//!    the host's), modification time `SOURCE_DATE_EPOCH`. Applying it replaces a file at
//!    `dest`, merges into a directory there, and creates missing parents root-owned 0755
//!    (following symlinks inside the image, as every layer does).

use std::path::PathBuf;

use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::plan::kinds::ProvisionCopyParams;

#[derive(Debug, Clone, Copy, Default)]
pub struct ProvisionCopy;

impl Executor for ProvisionCopy {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let params: ProvisionCopyParams = super::params(ctx)?;
            let project_dir = ctx
                .hints
                .get("project_dir")
                .map(PathBuf::from)
                .ok_or_else(|| StepError::new("copy step does not know the project directory"))?;
            let source = project_dir.join(&params.src);
            let out = ctx.output(super::agent_layer::LAYER_OUTPUT)?;
            tokio::task::spawn_blocking(move || {
                let current = crate::sources::fingerprint_path(&source).map_err(|error| {
                    StepError::with_source("cannot read the copy source", error)
                })?;
                if current != params.digest {
                    return Err(StepError::new(format!(
                        "{} changed after the plan was made; run the command again",
                        source.display()
                    )));
                }
                crate::rootfs::layer_tar::write_copy_layer(
                    &source,
                    &params.dest,
                    params.mode,
                    params.source_date_epoch,
                    &out,
                )
                .map_err(|error| StepError::with_source("cannot write the copy layer", error))
            })
            .await
            .map_err(|error| StepError::new(format!("the copy step panicked: {error}")))?
        })
    }
}
