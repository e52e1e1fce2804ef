//! `oci.fetch-layer`: one layer blob, downloaded and verified against its digest.
//!
//! Params: [`crate::plan::kinds::OciFetchLayerParams`] (`digest`, `media_type`, `size`: the
//! key, so the same blob from any repository is the same step). Hint: `reference`, the repository to download it from. Output: `layer`.

use std::sync::Arc;

use crate::engine::{BoxFuture, Executor, ProgressUnit, StepContext, StepError};
use crate::oci::{ImageReference, Layer, RegistryClient};
use crate::plan::kinds::OciFetchLayerParams;

#[derive(Debug, Clone)]
pub struct FetchLayer {
    pub client: Arc<RegistryClient>,
}

impl Executor for FetchLayer {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let params: OciFetchLayerParams = super::params(ctx)?;
            let layer = Layer {
                digest: params.digest,
                media_type: params.media_type,
                size: params.size,
            };
            let reference = ctx.hints.get("reference").ok_or_else(|| {
                StepError::new(format!(
                    "step {} does not say which repository holds {}",
                    ctx.step_id, layer.digest
                ))
            })?;
            let reference = ImageReference::parse(reference)
                .map_err(|error| StepError::with_source("bad reference", error))?;
            let destination = ctx.output("layer")?;
            self.client
                .fetch_layer(&reference, &layer, &destination, |done, total| {
                    ctx.progress(done, Some(total), ProgressUnit::Bytes)
                })
                .await
                .map_err(|error| {
                    StepError::with_source(format!("cannot fetch layer {}", layer.digest), error)
                })?;
            // The client hashed every byte it wrote and checked the digest: no second read.
            if let Some(sha256_hex) = layer.digest.strip_prefix("sha256:") {
                ctx.vouch_sha256("layer", sha256_hex);
            }
            Ok(())
        })
    }
}
