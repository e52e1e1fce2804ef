//! `banger build`: the arguments, and what is printed; the work is `ops::build`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use banger::ops::build::{self, BuildEnv, BuildRequest};
use banger::ops::images::BuiltImage;
use banger::ops::project::{self, Project};

use super::Context;
use super::exit::ExitStatus;
use super::printer::human_bytes;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The Bangerfile [default: ./Bangerfile, else the nearest one in a parent directory].
    #[arg(short, long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Resolve every OCI reference again and move the pins in Bangerfile.lock to what the
    /// tags point at now (without it, pinned references are reused as they are).
    #[arg(long)]
    update: bool,
    /// After a failure, keep building steps that do not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// Also write the sandbox image as a bundle (`.tar.zst`) and print its catalog entry.
    #[arg(long, value_name = "OUT")]
    bundle: Option<PathBuf>,
    /// Fail (exit 1) instead of changing Bangerfile.lock: every reference must be pinned
    /// already, and recipes must resolve to the package versions the lock records.
    #[arg(long)]
    locked: bool,
    /// Like --locked, and never ask a registry what a tag points at.
    #[arg(long)]
    frozen: bool,
    /// Run this step again even if it is stored (its id or a suffix of it, as `banger
    /// graph` shows it, e.g. `sandbox/provision[1]`); steps after it re-run only if its
    /// output changed. Repeatable.
    #[arg(long, value_name = "STEP")]
    rebuild: Vec<String>,
    /// Print the kept log of a step (the output of a `run` provisioning step, from its last
    /// execution, successful or not) instead of building.
    #[arg(long, value_name = "STEP", conflicts_with_all = ["rebuild", "bundle", "update"])]
    log: Option<String>,
    #[command(flatten)]
    remote: RemoteCacheArgs,
    /// After the build, push the sandbox image to this registry reference
    /// (REGISTRY/REPOSITORY:TAG), as `banger image push` does.
    #[arg(long, value_name = "REF", conflicts_with = "log")]
    push: Option<String>,
}

/// The remote step cache of one run (`docs/remote-cache.md`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RemoteCacheArgs {
    /// Download shared steps (recipes, `run` provisioning, the kernel's steps) that are not
    /// stored here from this registry repository instead of running them
    /// [default: `[cache] remote` of config.toml].
    #[arg(long, value_name = "REGISTRY/REPO")]
    cache_from: Option<String>,
    /// After a successful run, upload the shared steps it used to this registry repository
    /// (only what it lacks) [default: `[cache] remote` when `[cache] push = true`].
    #[arg(long, value_name = "REGISTRY/REPO")]
    cache_to: Option<String>,
}

impl RemoteCacheArgs {
    /// The run's remote caches, with the config's defaults; an unusable name is an error
    /// before anything runs.
    pub fn caches(
        &self,
        config: &banger::config::Config,
        services: &banger::steps::Services,
    ) -> anyhow::Result<banger::remote::RunCaches> {
        Ok(banger::remote::run_caches(
            self.cache_from.as_deref(),
            self.cache_to.as_deref(),
            config,
            services.registry.options(),
        )?)
    }
}

pub fn run(context: &mut Context, args: &BuildArgs) -> anyhow::Result<ExitStatus> {
    let file = match &args.file {
        Some(file) => file.clone(),
        None => {
            let cwd = std::env::current_dir().context("cannot read the current directory")?;
            project::find_bangerfile(&cwd)?
        }
    };
    let config = context.config()?.clone();
    let catalogs = context.catalogs()?;
    let project = Project::load_with(&file, &config, catalogs)?;
    if let Some(step) = &args.log {
        let store = context.existing_store()?;
        let log = build::step_log(&project, store.as_ref(), step)?;
        context
            .printer
            .info(&format!("{} ({})", log.step, log.path.display()));
        context.printer.data(&String::from_utf8_lossy(&log.text))?;
        return Ok(ExitStatus::Success);
    }
    let request = BuildRequest {
        update: args.update,
        locked: args.locked,
        frozen: args.frozen,
        rebuild: args.rebuild.clone(),
        bundle: args.bundle.clone(),
    };
    // Before the store or the lock is touched.
    build::check_request(&project, &request)?;
    let runtime = super::runtime()?;
    let services = banger::steps::Services::from_env(&context.paths()?.state_dir.clone())?;
    let store = context.store()?;
    let state = context.state()?;
    let env = BuildEnv {
        store: &store,
        state: &state,
        services: &services,
    };
    let reporter = super::reporters::for_printer(&context.printer);
    let printer = &context.printer;
    let notes = |text: String| printer.info(&text);
    let project_name = project.spec.name.clone();
    let sandbox = format!("{}/{}", project.spec.name, project.spec.sandbox_image);
    if let Some(reference) = &args.push {
        // A bad reference fails before anything is built.
        banger::ops::publish::push_target(reference)?;
    }
    let caches = args.remote.caches(&config, &services)?;
    let outcome = super::run_cancellable(&runtime, args.keep_going, |mut options| {
        caches.apply(&mut options);
        build::build(&env, project, &request, reporter.as_ref(), &notes, options)
    })?;
    report_built(context, &outcome.built, &project_name)?;
    if let Some(bundle) = &outcome.bundle {
        super::image::print_bundle_entry(
            context,
            &bundle.params.name,
            &bundle.distro,
            &bundle.params.arch,
            &bundle.params.kernel_ref,
            &bundle.path,
            &(bundle.sha256.clone(), bundle.size),
        )?;
    }
    if let Some(reference) = &args.push {
        // Layers the remote step cache holds are mounted from it rather than sent again.
        let mount_from: Vec<String> = [&args.remote.cache_to, &args.remote.cache_from]
            .into_iter()
            .flatten()
            .chain(config.cache_remote.iter())
            .cloned()
            .collect();
        super::image::push(
            context,
            &runtime,
            &services,
            &sandbox,
            reference,
            &mount_from,
        )?;
    }
    Ok(ExitStatus::Success)
}

fn report_built(context: &Context, built: &[BuiltImage], project: &str) -> anyhow::Result<()> {
    let printer = &context.printer;
    for image in built {
        let name = format!("{project}/{}", image.name);
        if printer.json {
            printer.record(
                "image_built",
                json!({
                    "name": name,
                    "key": image.step_key.to_hex(),
                    "rootfs": image.rootfs.integrity,
                    "bytes": image.rootfs.size,
                }),
            )?;
        } else {
            printer.data(&format!(
                "{name}  {}  {}\n",
                image.step_key.short(),
                human_bytes(image.rootfs.size)
            ))?;
        }
    }
    Ok(())
}
