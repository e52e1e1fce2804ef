//! `banger build`: pin the Bangerfile's references, build its images, record them.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use banger::images::{self, BuiltImage};
use banger::plan::kinds::BundleWriteParams;
use banger::plan::lower;
use banger::project::{self, Project};
use banger::state::ImageRecord;
use banger::steps::bundle_steps::BUNDLE_OUTPUT;
use banger::store::now_ms;

use super::Context;
use super::exit::{ExitStatus, UsageError};
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
    if let Some(step) = &args.log {
        return print_log(context, &project, step);
    }
    let locked = args.locked || args.frozen;
    if locked && args.update {
        return Err(usage(
            "--update moves the pins in Bangerfile.lock, which --locked and --frozen forbid",
        )
        .into());
    }
    // Refuse a --rebuild that names nothing before anything is written (the pins below do
    // not rename steps other than an unpinned image's layer fetches).
    {
        let (plan, _) = project.plan_images()?;
        for query in &args.rebuild {
            plan.find(query)
                .map_err(|error| usage(format!("--rebuild {query}: {error}")))?;
        }
    }
    let runtime = super::runtime()?;
    let services = banger::steps::Services::from_env(&context.paths()?.state_dir.clone())?;

    // 1. Pin what the lock does not pin yet.
    let before = project.lock.clone();
    if args.frozen {
        let unpinned = images::unpinned_references(&project.spec.images, &project.lock);
        if !unpinned.is_empty() {
            return Err(usage(format!(
                "{} pins no digest for {}; --frozen does not resolve tags: run `banger build`                  without it to pin them",
                project.lock_path().display(),
                unpinned.join(", ")
            ))
            .into());
        }
    } else {
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
    }
    if project.lock.source_date_epoch.is_none() {
        project.lock.source_date_epoch = Some(banger::lock::DEFAULT_SOURCE_DATE_EPOCH);
    }
    if project.lock != before {
        if locked {
            return Err(usage(format!(
                "{} needs updating ({}), which --locked forbids; run `banger build` without it",
                project.lock_path().display(),
                lock_changes(&before, &project.lock).join("; ")
            ))
            .into());
        }
        project.lock.save(&project.lock_path())?;
    }

    // 2. Build (and pack, with --bundle).
    let (mut plan, finals) = project.plan_images()?;
    let sandbox_name = format!("{}/{}", project.spec.name, project.spec.sandbox_image);
    let bundle_step = match &args.bundle {
        Some(_) => {
            let sandbox = project
                .spec
                .image(&project.spec.sandbox_image)
                .expect("a validated spec has its sandbox image");
            let params = BundleWriteParams {
                name: sandbox_name.clone(),
                arch: "x86_64".into(),
                kernel_ref: sandbox.kernel.clone(),
            };
            let step = lower::add_bundle(
                &mut plan,
                &project.spec.sandbox_image,
                finals[&project.spec.sandbox_image],
                &params,
            )?;
            plan.add_target(step);
            Some((step, params))
        }
        None => None,
    };
    let mut rebuild = std::collections::HashSet::new();
    for query in &args.rebuild {
        let node = plan
            .find(query)
            .map_err(|error| usage(format!("--rebuild {query}: {error}")))?;
        rebuild.insert(plan.node(node).id.clone());
    }
    let store = context.store()?;
    let project_id = project::project_id(&project.spec);
    let engine = super::engine(&store, &services);
    let reporter = super::reporters::for_printer(&context.printer);
    let (report, built) = super::run_cancellable(&runtime, args.keep_going, |mut options| {
        options.rebuild = rebuild;
        images::build(
            &engine,
            &plan,
            &finals,
            &project_id,
            reporter.as_ref(),
            options,
        )
    })?;

    // 3. The lock records what recipes installed; --locked refuses other versions.
    let resolved = images::resolved_recipes(&plan, &report, &store)?;
    let mut lock = project.lock.clone();
    let mut differences = Vec::new();
    for recipe in resolved {
        match lock.recipe(&recipe.recipe) {
            Some(old) if old.packages == recipe.packages => continue,
            Some(old) => differences.push(format!(
                "recipe `{}` installed other versions than the lock records ({})",
                recipe.recipe,
                package_changes(&old.packages, &recipe.packages)
            )),
            None => differences.push(format!(
                "recipe `{}` has no package versions recorded",
                recipe.recipe
            )),
        }
        lock.insert_recipe(recipe);
    }
    if !differences.is_empty() {
        if locked {
            return Err(usage(format!(
                "{} needs updating: {}; --locked forbids it (nothing was recorded: run `banger \
                 build` without --locked to accept these versions)",
                project.lock_path().display(),
                differences.join("; ")
            ))
            .into());
        }
        lock.save(&project.lock_path())?;
    }

    // 4. Record.
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
    if let (Some(out), Some((step, params))) = (&args.bundle, bundle_step) {
        let id = &plan.node(step).id;
        let bundle = report
            .outputs
            .get(id)
            .and_then(|outputs| outputs.outputs.get(BUNDLE_OUTPUT))
            .with_context(|| format!("{id} produced no {BUNDLE_OUTPUT}"))?;
        let written = copy_out(&store, bundle, out)?;
        let distro = banger::bundle::read_manifest(out)
            .ok()
            .and_then(|manifest| manifest.distro)
            .unwrap_or_else(|| "unknown".into());
        super::image::print_bundle_entry(
            context,
            &params.name,
            &distro,
            &params.arch,
            &params.kernel_ref,
            out,
            &written,
        )?;
    }
    Ok(ExitStatus::Success)
}

fn usage(message: impl Into<String>) -> UsageError {
    UsageError(message.into())
}

/// Copies a stored bundle to `out` (through a temp file beside it, renamed into place);
/// returns its sha256 and size.
fn copy_out(
    store: &banger::store::Store,
    bundle: &banger::store::OutputRef,
    out: &std::path::Path,
) -> anyhow::Result<(String, u64)> {
    let dir = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    let temp = tempfile::Builder::new()
        .prefix(".banger-bundle-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write into {}", dir.display()))?;
    let linked = temp.path().with_extension("stored");
    store.materialize(bundle, &linked)?;
    let copied = std::fs::copy(&linked, temp.path());
    let _ = std::fs::remove_file(&linked);
    copied.with_context(|| format!("cannot write {}", out.display()))?;
    std::fs::set_permissions(
        temp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    temp.persist(out)
        .map_err(|error| error.error)
        .with_context(|| format!("cannot write {}", out.display()))?;
    let sha256 = bundle
        .integrity
        .parse::<ssri::Integrity>()
        .map(|integrity| integrity.to_hex().1)
        .context("the stored bundle has no sha256")?;
    Ok((sha256, bundle.size))
}

/// `a 1 → 2, b removed, c 3 added`, at most a few of them.
fn package_changes(old: &[String], new: &[String]) -> String {
    let split = |entry: &String| {
        let (name, version) = entry.split_once('=').unwrap_or((entry, ""));
        (name.to_owned(), version.to_owned())
    };
    let old: std::collections::BTreeMap<String, String> = old.iter().map(split).collect();
    let new: std::collections::BTreeMap<String, String> = new.iter().map(split).collect();
    let mut changes = Vec::new();
    for (name, version) in &new {
        match old.get(name) {
            Some(before) if before != version => {
                changes.push(format!("{name} {before} → {version}"))
            }
            None => changes.push(format!("{name} {version} added")),
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|name| !new.contains_key(*name)) {
        changes.push(format!("{name} removed"));
    }
    let total = changes.len();
    changes.truncate(5);
    if total > 5 {
        changes.push(format!("and {} more", total - 5));
    }
    changes.join(", ")
}

/// What changed between two locks, for `--locked`'s error.
fn lock_changes(before: &banger::lock::Lock, after: &banger::lock::Lock) -> Vec<String> {
    let mut changes = Vec::new();
    if before.source_date_epoch != after.source_date_epoch {
        changes.push("no source_date_epoch yet".to_owned());
    }
    for pin in &after.oci {
        match before.pinned(&pin.reference) {
            None => changes.push(format!("{} is not pinned", pin.reference)),
            Some(old) if old != pin => changes.push(format!(
                "{} moved from {} to {}",
                pin.reference, old.manifest_digest, pin.manifest_digest
            )),
            Some(_) => {}
        }
    }
    changes
}

/// `banger build --log STEP`: the kept log of the step's current definition.
fn print_log(context: &mut Context, project: &Project, query: &str) -> anyhow::Result<ExitStatus> {
    let (plan, _) = project.plan_images()?;
    let node = plan
        .find(query)
        .map_err(|error| usage(format!("--log {query}: {error}")))?;
    let step = plan.node(node);
    let key = plan.definition_keys()?[node.index()];
    let Some(store) = context.existing_store()? else {
        return Err(usage(format!("{} has not run yet: nothing is stored", step.id)).into());
    };
    let path = store.step_log_path(&key);
    match std::fs::read(&path) {
        Ok(log) => {
            context.printer.info(&format!("{} ({})", step.id, path.display()));
            context.printer.data(&String::from_utf8_lossy(&log))?;
            Ok(ExitStatus::Success)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(usage(format!(
            "{} keeps no log: only `run` provisioning steps do, once they have run as they are              defined now",
            step.id
        ))
        .into()),
        Err(error) => Err(anyhow::Error::new(error).context(format!("cannot read {}", path.display()))),
    }
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
