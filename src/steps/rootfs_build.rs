//! `rootfs.build`: layers → one ext4 image, in one pass over the layers (see
//! [`crate::rootfs::layers`]): flatten with whiteouts, write the ext4 with owners, modes and
//! xattrs, strip per-instance identity ([`crate::rootfs::identity`]).
//!
//! Inputs: `layer[0]`, `layer[1]`, … in order, each with one output file: a tar (compressed
//! or not: OCI blobs, a recipe's rootfs, provisioning and agent layers), or, first, an ext4
//! image (a catalog bundle's `rootfs.ext4`), read as the layer of its whole tree. Params:
//! [`crate::plan::kinds::RootfsBuildParams`]. Output: `rootfs.ext4`.

use crate::engine::{BoxFuture, Executor, ProgressUnit, StepContext, StepError};
use crate::plan::kinds::RootfsBuildParams;
use crate::rootfs::layers::{Layer, LayerFormat, RootfsOptions, build_rootfs};

#[derive(Debug, Clone, Copy, Default)]
pub struct RootfsBuild;

/// Outputs a layer may be named by, when its step has more than one: an image, a recipe's
/// root filesystem, a layer banger wrote.
const LAYER_OUTPUTS: [&str; 3] = [crate::steps::ROOTFS_OUTPUT, "rootfs.tar", "layer.tar"];

/// The output of an input that holds its layer: the only one, else the one with a layer name
/// (also how `image push` finds an image's layers).
pub fn layer_output(
    outputs: &std::collections::BTreeMap<String, crate::store::OutputRef>,
) -> Option<(&String, &crate::store::OutputRef)> {
    if outputs.len() == 1 {
        return outputs.iter().next();
    }
    LAYER_OUTPUTS
        .iter()
        .find_map(|name| outputs.get_key_value(*name))
}

impl Executor for RootfsBuild {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let params: RootfsBuildParams = super::params(ctx)?;
            let mut layers = Vec::new();
            let mut seed = Vec::new();
            for (index, input) in ctx.inputs().iter().enumerate() {
                let Some((file, reference)) = layer_output(&input.outputs) else {
                    return Err(StepError::new(format!(
                        "input `{}` of {} has no layer among its outputs ({})",
                        input.name,
                        ctx.step_id,
                        input.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                    )));
                };
                let format = if file == crate::steps::ROOTFS_OUTPUT {
                    if index != 0 {
                        return Err(StepError::new(format!(
                            "input `{}` of {} is an ext4 image; only the first layer may be one",
                            input.name, ctx.step_id
                        )));
                    }
                    LayerFormat::Ext4
                } else {
                    LayerFormat::Tar
                };
                seed.extend_from_slice(reference.integrity.as_bytes());
                layers.push(Layer {
                    name: format!("{} ({})", input.name, input.step_id),
                    path: ctx.input_file(&input.name, file)?,
                    format,
                });
            }
            let image = ctx.output(crate::steps::ROOTFS_OUTPUT)?;
            let options = RootfsOptions {
                sizing: params.size.to_sizing(),
                strip_identity: true,
                seed,
                cancel: Some(ctx.cancellation().clone()),
                // Like every stored output, the image is not fsynced (see `store`): the
                // fsync was a sixth of a cold pull here, spent waiting on the disk.
                sync: false,
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
