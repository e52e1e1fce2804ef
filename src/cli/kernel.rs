//! `banger kernel pull|import|list|show|rm`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::json;

use banger::catalog::Prefer;
use banger::inspect::format_time_ms;
use banger::kernels;
use banger::key::Params;
use banger::plan::lower::{INITRAMFS_MODULES, lower_kernel};
use banger::plan::{Plan, StepNode};
use banger::state::KernelRecord;
use banger::steps;
use banger::store::now_ms;

use super::Context;
use super::exit::{ExitStatus, UsageError};
use super::printer::human_bytes;

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Fetch or build a catalog kernel (`banger kernel list --available`).
    #[command(
        long_about = "Fetch or build a catalog kernel and record it under its name.

A catalog kernel comes from a sha256-verified bundle, or from a recipe: the distribution's \
packaged kernel, fetched with the ordinary package client (apt), turned into an ELF vmlinux \
with the PVH entry note, with banger's small initramfs (the guest agent as /init plus the \
virtio, vsock and overlay modules). Every step is cached; --force fetches again (and rebuilds \
only if the bytes changed)."
    )]
    Pull(PullArgs),
    /// Record a kernel from a directory: `vmlinux` (ELF with PVH, or a bzImage), optional
    /// `initrd`, optional `modules/` (a lib/modules/RELEASE tree).
    Import(ImportArgs),
    /// List recorded kernels (or, with --available, the catalog).
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one kernel.
    Show { name: String },
    /// Forget kernels; their bytes go at the next `banger cache gc`.
    #[command(visible_alias = "rm")]
    Remove { names: Vec<String> },
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The catalog kernel.
    name: String,
    /// Fetch again even if it is cached (a moved package version is picked up).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The name to record it under.
    name: String,
    /// The directory holding `vmlinux`, optional `initrd` and optional `modules/`.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// List the kernel catalog instead of recorded kernels.
    #[arg(long)]
    available: bool,
}

pub fn run(context: &mut Context, command: &KernelCommand) -> anyhow::Result<ExitStatus> {
    match command {
        KernelCommand::Pull(args) => pull(context, args),
        KernelCommand::Import(args) => import(context, args),
        KernelCommand::List(args) => list(context, args),
        KernelCommand::Show { name } => show(context, name),
        KernelCommand::Remove { names } => remove(context, names),
    }
}

/// Runs a kernel plan and records its staging step's outputs as `name`.
fn build_and_record(
    context: &mut Context,
    name: &str,
    source: &str,
    plan: &Plan,
    target: petgraph::graph::NodeIndex,
) -> anyhow::Result<ExitStatus> {
    let runtime = super::runtime()?;
    let state_dir = context.paths()?.state_dir.clone();
    let services = steps::Services::from_env(&state_dir)?;
    let store = context.store()?;
    let engine = super::engine(&store, &services);
    let reporter = super::reporters::for_printer(&context.printer);
    let keys = plan.definition_keys()?;
    let project = format!("kernel:{name}");
    let report = super::run_cancellable(&runtime, false, |options| {
        engine.run(plan, &project, reporter.as_ref(), options)
    })?;
    let step = plan.node(target);
    let record = kernels::record_from_outputs(
        name,
        source,
        &step.id,
        keys[target.index()],
        &report,
        &store,
        now_ms(),
    )?;
    let state = context.state()?;
    kernels::register(&state, &store, &record)?;
    let printer = &context.printer;
    if printer.json {
        printer.record("kernel", kernel_json(&record))?;
    } else {
        let verb = if report.ran.is_empty() {
            "up to date"
        } else {
            "ready"
        };
        printer.data(&format!(
            "{}  {}  {verb}\n",
            record.name,
            record.release.as_deref().unwrap_or("-")
        ))?;
    }
    Ok(ExitStatus::Success)
}

fn pull(context: &mut Context, args: &PullArgs) -> anyhow::Result<ExitStatus> {
    let catalogs = context.catalogs()?;
    let Some(entry) = catalogs.kernel(&args.name) else {
        let known: Vec<&str> = catalogs
            .kernels
            .iter()
            .map(|entry| entry.name.as_str())
            .collect();
        return Err(UsageError(format!(
            "`{}` is not in the kernel catalog (it has: {}); a kernel of your own is added with \
             `banger kernel import NAME --from DIR`",
            args.name,
            known.join(", ")
        ))
        .into());
    };
    let how = match (entry.prefer, &entry.bundle) {
        (Prefer::Bundle, Some(_)) => "bundle",
        _ if entry.recipe.is_none() => "bundle",
        _ => "recipe",
    };
    let refresh = args.force.then(now_ms);
    let (plan, target) = lower_kernel(&args.name, &catalogs, refresh)?;
    let source = format!("catalog:{} ({how})", entry.name);
    build_and_record(context, &args.name, &source, &plan, target)
}

fn import(context: &mut Context, args: &ImportArgs) -> anyhow::Result<ExitStatus> {
    let dir = std::fs::canonicalize(&args.from)
        .with_context(|| format!("cannot read {}", args.from.display()))?;
    if !dir.join("vmlinux").is_file() {
        return Err(UsageError(format!(
            "{} has no `vmlinux`; a kernel directory holds vmlinux (an ELF with the PVH note, or \
             a bzImage), and optionally initrd and modules/",
            dir.display()
        ))
        .into());
    }
    let catalogs = context.catalogs()?;
    if catalogs.kernel(&args.name).is_some() {
        return Err(UsageError(format!(
            "`{}` is a catalog kernel's name; pick another name for your own kernel",
            args.name
        ))
        .into());
    }
    let fingerprint = banger::sources::fingerprint_path(&dir)?;
    let mut plan = Plan::new();
    let import = plan.add_step(
        StepNode::new(
            format!("kernel:{}/import", args.name),
            steps::KERNEL_IMPORT.name,
            steps::KERNEL_IMPORT.version,
            Params::new().with("fingerprint", fingerprint),
            steps::KERNEL_IMPORT.resource,
        )
        .hint("dir", dir.to_string_lossy())
        .summary(format!("{}", dir.display())),
    )?;
    let stage = plan.add_step(
        StepNode::new(
            format!("kernel:{}/stage", args.name),
            steps::KERNEL_STAGE.name,
            steps::KERNEL_STAGE.version,
            Params::new(),
            steps::KERNEL_STAGE.resource,
        )
        .summary("vmlinux + initrd + modules"),
    )?;
    plan.add_input(stage, "kernel", import);
    // Modules but no initrd: banger builds its own initramfs around them.
    if dir.join("modules").is_dir() && !dir.join("initrd").exists() {
        let initramfs = plan.add_step(
            StepNode::new(
                format!("kernel:{}/initramfs", args.name),
                steps::KERNEL_INITRAMFS.name,
                steps::KERNEL_INITRAMFS.version,
                Params::new()
                    .with(
                        "modules",
                        banger::key::ParamValue::List(
                            INITRAMFS_MODULES
                                .iter()
                                .map(|name| (*name).into())
                                .collect(),
                        ),
                    )
                    .with("agent", banger::assets::agent_digest()),
                steps::KERNEL_INITRAMFS.resource,
            )
            .summary("banger's agent as /init + virtio, vsock and overlay modules"),
        )?;
        plan.add_input(initramfs, "kernel", import);
        plan.add_input(stage, "initramfs", initramfs);
    }
    plan.add_target(stage);
    let source = format!("import:{}", dir.display());
    build_and_record(context, &args.name, &source, &plan, stage)
}

fn kernel_json(record: &KernelRecord) -> serde_json::Value {
    let file = |file: &Option<banger::state::StoredFile>| {
        file.as_ref()
            .map(|file| json!({"integrity": file.integrity, "bytes": file.size}))
    };
    json!({
        "name": record.name,
        "source": record.source,
        "release": record.release,
        "vmlinux": {"integrity": record.vmlinux.integrity, "bytes": record.vmlinux.size},
        "initrd": file(&record.initrd),
        "modules": file(&record.modules),
        "key": record.step_key.to_hex(),
        "created_ms": record.created_ms,
    })
}

fn list(context: &mut Context, args: &ListArgs) -> anyhow::Result<ExitStatus> {
    if args.available {
        let catalogs = context.catalogs()?;
        let printer = &context.printer;
        let mut out = String::new();
        for entry in &catalogs.kernels {
            if printer.json {
                printer.record(
                    "catalog_kernel",
                    json!({
                        "name": entry.name,
                        "description": entry.description,
                        "bundle": entry.bundle.is_some(),
                        "recipe": entry.recipe.is_some(),
                    }),
                )?;
            } else {
                out.push_str(&format!("{}  {}\n", entry.name, entry.description));
            }
        }
        if !printer.json {
            printer.data(&out)?;
        }
        return Ok(ExitStatus::Success);
    }
    let state = context.state()?;
    let records = state.kernels()?;
    let printer = &context.printer;
    if printer.json {
        for record in &records {
            printer.record("kernel", kernel_json(record))?;
        }
        return Ok(ExitStatus::Success);
    }
    if records.is_empty() {
        printer
            .info("no kernels yet; `banger kernel pull debian-cloud-amd64` builds the default one");
        return Ok(ExitStatus::Success);
    }
    let rows: Vec<[String; 5]> = records
        .iter()
        .map(|record| {
            [
                record.name.clone(),
                record.release.clone().unwrap_or_else(|| "-".into()),
                human_bytes(record.vmlinux.size),
                format_time_ms(record.created_ms),
                record.source.clone(),
            ]
        })
        .collect();
    printer.data(&super::table(
        &["NAME", "RELEASE", "SIZE", "CREATED", "SOURCE"],
        &rows,
    ))?;
    Ok(ExitStatus::Success)
}

fn show(context: &mut Context, name: &str) -> anyhow::Result<ExitStatus> {
    let state = context.state()?;
    let record = state.require_kernel(name)?;
    let printer = &context.printer;
    if printer.json {
        printer.record("kernel", kernel_json(&record))?;
        return Ok(ExitStatus::Success);
    }
    let optional = |file: &Option<banger::state::StoredFile>| {
        file.as_ref().map_or_else(
            || "-".to_owned(),
            |file| format!("{} ({})", human_bytes(file.size), file.integrity),
        )
    };
    printer.data(&format!(
        "name:     {}\nsource:   {}\nrelease:  {}\nvmlinux:  {} ({})\ninitrd:   {}\nmodules:  {}\nstep:     {}\ncreated:  {}\n",
        record.name,
        record.source,
        record.release.as_deref().unwrap_or("-"),
        human_bytes(record.vmlinux.size),
        record.vmlinux.integrity,
        optional(&record.initrd),
        optional(&record.modules),
        record.step_key,
        format_time_ms(record.created_ms),
    ))?;
    Ok(ExitStatus::Success)
}

fn remove(context: &mut Context, names: &[String]) -> anyhow::Result<ExitStatus> {
    if names.is_empty() {
        return Err(UsageError("name at least one kernel to remove".into()).into());
    }
    let state = context.state()?;
    let store = context.store()?;
    for name in names {
        let record = kernels::remove(&state, &store, name)?;
        context.printer.info(&format!(
            "removed {}; `banger cache gc` frees its space",
            record.name
        ));
    }
    Ok(ExitStatus::Success)
}
