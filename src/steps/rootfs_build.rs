//! `rootfs.build`: layers (OCI blobs or a recipe's tar) → one ext4 image with banger's guest
//! assets, in one pass over the tars (see [`crate::rootfs::layers`]).
//!
//! Inputs: `layer[0]`, `layer[1]`, … in order, each with one output file (its tar, compressed
//! or not). Params: `size` (fixed) or `headroom_percent` + `min_size`; `assets` (the guest
//! assets' digest, so new assets re-key the image). Output: `rootfs.ext4`.

use crate::engine::{BoxFuture, Executor, ProgressUnit, StepContext, StepError};
use crate::ext4::Sizing;
use crate::rootfs::layers::{Layer, RootfsOptions, build_rootfs};

#[derive(Debug, Clone, Copy, Default)]
pub struct RootfsBuild;

/// The ext4 sizing a `rootfs.build` step's params ask for.
pub fn sizing(params: &crate::key::Params) -> Sizing {
    match params.get_int("size") {
        Some(bytes) => Sizing::Fixed(bytes),
        None => Sizing::Auto {
            headroom_percent: params
                .get_int("headroom_percent")
                .map_or(150, |percent| percent.min(u64::from(u32::MAX)) as u32),
            min_bytes: params.get_int("min_size").unwrap_or(1 << 30),
        },
    }
}

impl Executor for RootfsBuild {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let mut layers = Vec::new();
            let mut seed = Vec::new();
            for input in ctx.inputs() {
                let (file, reference) = match input.outputs.iter().next() {
                    Some((file, reference)) if input.outputs.len() == 1 => (file, reference),
                    _ => {
                        return Err(StepError::new(format!(
                            "input `{}` of {} must have exactly one output (a tar)",
                            input.name, ctx.step_id
                        )));
                    }
                };
                seed.extend_from_slice(reference.integrity.as_bytes());
                layers.push(Layer {
                    name: format!("{} ({})", input.name, input.step_id),
                    path: ctx.input_file(&input.name, file)?,
                });
            }
            let image = ctx.output("rootfs.ext4")?;
            let options = RootfsOptions {
                sizing: sizing(&ctx.params),
                inject_assets: true,
                seed,
                cancel: Some(ctx.cancellation().clone()),
                sync: true,
            };
            let progress = ctx.progress_handle();
            tokio::task::spawn_blocking(move || {
                build_rootfs(&layers, &image, &options, &|done, total| {
                    progress.report(done, Some(total), ProgressUnit::Bytes)
                })
            })
            .await
            .map_err(|error| StepError::new(format!("the image build panicked: {error}")))?
            .map(|_summary| ())
            .map_err(|error| StepError::with_source("cannot build the root filesystem", error))
        })
    }
}
