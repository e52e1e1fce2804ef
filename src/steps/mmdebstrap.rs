//! `recipe.mmdebstrap`: a Debian root filesystem tar from distribution packages, so the default
//! image can be built on a host where no catalog URL is reachable.
//!
//! Params: `distro` (`debian`), `suite` (`bookworm`), `packages` (sorted; lowering adds
//! [`crate::plan::lower::RECIPE_BASE_PACKAGES`]). Output:
//! `rootfs.tar`. Runs `mmdebstrap --variant=minbase` with the packages included; it needs
//! `mmdebstrap` on the host and uses the host's apt configuration to reach the archive.

use std::process::Stdio;

use tokio::io::AsyncReadExt;

use crate::engine::{BoxFuture, Executor, StepContext, StepError};
use crate::key::ParamValue;

#[derive(Debug, Clone, Copy, Default)]
pub struct Mmdebstrap;

impl Executor for Mmdebstrap {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let distro = ctx.params.get_str("distro").unwrap_or("debian");
            if distro != "debian" {
                return Err(StepError::new(format!(
                    "recipe distro `{distro}` is not supported; only `debian` recipes exist"
                )));
            }
            let suite = ctx
                .params
                .get_str("suite")
                .ok_or_else(|| StepError::new("recipe has no suite"))?;
            let mut packages: Vec<String> = Vec::new();
            if let Some(ParamValue::List(listed)) = ctx.params.get("packages") {
                for package in listed {
                    if let ParamValue::Str(name) = package {
                        packages.push(name.clone());
                    }
                }
            }
            packages.sort();
            packages.dedup();
            let output = ctx.output("rootfs.tar")?;
            let argv = vec![
                "mmdebstrap".to_owned(),
                "--variant=minbase".to_owned(),
                "--mode=auto".to_owned(),
                "--quiet".to_owned(),
                format!("--include={}", packages.join(",")),
                suite.to_owned(),
                output.to_string_lossy().into_owned(),
            ];
            let mut command = tokio::process::Command::new(&argv[0]);
            command
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .process_group(0);
            let mut child = command.spawn().map_err(|error| {
                if error.kind() == std::io::ErrorKind::NotFound {
                    StepError::new(
                        "mmdebstrap is not installed; install it (`apt-get install mmdebstrap`) to \
                         build Debian images from packages, or pull a catalog bundle instead",
                    )
                } else {
                    StepError::with_source(format!("cannot run {argv:?}"), error)
                }
            })?;
            let mut stderr = child.stderr.take().expect("piped");
            let mut errors = Vec::new();
            let status = tokio::select! {
                status = async {
                    let _ = stderr.read_to_end(&mut errors).await;
                    child.wait().await
                } => status.map_err(|error| StepError::with_source(format!("waiting for {argv:?}"), error))?,
                () = ctx.cancellation().cancelled() => {
                    let _ = child.start_kill();
                    return Err(StepError::new("cancelled"));
                }
            };
            if !status.success() {
                let text = String::from_utf8_lossy(&errors);
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                return Err(StepError::new(format!(
                    "{argv:?} failed ({status}):\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )));
            }
            Ok(())
        })
    }
}
