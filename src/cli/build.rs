//! `banger build`: pin the Bangerfile's references, build its images, record them.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use banger::images::{self, BuiltImage};
use banger::project::{self, Project};
use banger::state::ImageRecord;
use banger::store::now_ms;

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
    let mut project = Project::load_with(&file, &config, catalogs)?;
    let runtime = super::runtime()?;
    let services = banger::steps::Services::from_env(&context.paths()?.state_dir.clone())?;

    // 1. Pin what the lock does not pin yet.
    let before = project.lock.clone();
    let pinned = runtime.block_on(images::pin_references(
        &project.spec.images,
        &mut project.lock,
        &services.registry,
        args.update,
    ))?;
    for (reference, digest) in &pinned {
        context
            .printer
            .info(&format!("pinned {reference} to {digest}"));
    }
    if project.lock != before {
        project.lock.save(&project.lock_path())?;
    }

    // 2. Build.
    let (plan, finals) = project.plan_images()?;
    let store = context.store()?;
    let project_id = project::project_id(&project.spec);
    let engine = super::engine(&store, &services);
    let reporter = super::reporters::for_printer(&context.printer);
    let (_report, built) = super::run_cancellable(&runtime, args.keep_going, |options| {
        images::build(
            &engine,
            &plan,
            &finals,
            &project_id,
            reporter.as_ref(),
            options,
        )
    })?;

    // 3. Record.
    let state = context.state()?;
    for image in &built {
        let spec = project
            .spec
            .image(&image.name)
            .expect("built images come from the spec");
        let record = ImageRecord {
            name: format!("{}/{}", project.spec.name, image.name),
            source: format!(
                "bangerfile:{}#{}",
                project.spec.source_file.display(),
                image.name
            ),
            distro: None,
            arch: "x86_64".into(),
            kernel_ref: Some(spec.kernel.clone()),
            rootfs_integrity: image.rootfs.integrity.clone(),
            rootfs_size: image.rootfs.size,
            step_key: image.step_key,
            created_ms: now_ms(),
        };
        images::register(&state, &store, &record, true)?;
    }
    report_built(context, &built, &project.spec.name)?;
    if let Some(out) = &args.bundle {
        let name = format!("{}/{}", project.spec.name, project.spec.sandbox_image);
        let record = state.require_image(&name)?;
        return super::image::export_bundle(context, &record, out, None);
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
