//! `agent.layer` (the design card's "inject agents"): banger's guest assets as a layer of
//! their own, the last of every image's stack.
//!
//! No inputs. Params: [`crate::plan::kinds::AgentLayerParams`] (the assets' digest, so a new
//! agent re-keys this step and the image builds that take it, never a provision step).
//! Output: `layer.tar` ([`crate::rootfs::layer_tar::write_agent_layer`]).

use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::plan::kinds::AgentLayerParams;

/// The file name of every layer banger writes (`agent.layer`, `provision.*`).
pub const LAYER_OUTPUT: &str = "layer.tar";

#[derive(Debug, Clone, Copy, Default)]
pub struct AgentLayer;

impl Executor for AgentLayer {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let params: AgentLayerParams = super::params(ctx)?;
            let embedded = crate::assets::guest_assets_digest();
            if params.assets != embedded {
                // The plan was made by another banger build; writing this build's assets
                // under that key would store content the key does not describe.
                return Err(StepError::new(format!(
                    "the plan asks for guest assets {} but this banger carries {embedded}",
                    params.assets
                )));
            }
            let out = ctx.output(LAYER_OUTPUT)?;
            tokio::task::spawn_blocking(move || crate::rootfs::layer_tar::write_agent_layer(&out))
                .await
                .map_err(|error| StepError::new(format!("the agent layer panicked: {error}")))?
                .map_err(|error| StepError::with_source("cannot write the agent layer", error))
        })
    }
}
