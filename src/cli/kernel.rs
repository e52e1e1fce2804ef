//! `banger kernel pull|import|list|show|rm`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use banger::ops::graph::format_time_ms;
use banger::ops::kernels::{self, PulledKernel};
use banger::state::KernelRecord;

use super::Context;
use super::exit::{ExitStatus, UsageError};
use super::image::BuildEnv;
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
only if the bytes changed).

A registry reference (REGISTRY/REPOSITORY:TAG) instead of a name pulls a kernel pushed with \
`banger kernel push`: its files are downloaded, each verified by sha256 and size, and recorded \
as `kernel import` records a directory, under the name it was pushed with (or --name)."
    )]
    Pull(PullArgs),
    /// Publish a recorded kernel to an OCI registry as one artifact (vmlinux, initrd, modules).
    Push(PushArgs),
    /// Record a kernel from a directory: `vmlinux` (ELF with PVH, or a bzImage), optional
    /// `initrd`, optional `modules/` (a lib/modules/RELEASE tree).
    Import(ImportArgs),
    /// List recorded kernels (or, with --available, the catalog).
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one kernel.
    Show {
        #[arg(add = super::complete::kernel_names())]
        name: String,
    },
    /// Forget kernels; their bytes go at the next `banger cache gc`.
    #[command(visible_alias = "rm")]
    Remove {
        #[arg(add = super::complete::kernel_names())]
        names: Vec<String>,
    },
    /// Boot a kernel on an image and check that banger's guest agent answers.
    #[command(
        long_about = "Boot a kernel with its initramfs on an image under QEMU microvm and check \
that banger's guest agent answers: readiness, `uname -r` (must match the kernel's release), and \
`sh -c 'exit 7'` (must return 7). Prints the time from QEMU start to the agent being ready and \
to the first command's result, and the command round trip.

The image is attached read-only with the guest's writes in memory, so nothing is modified. \
KVM is used only where guests really run under it; otherwise TCG (see `banger doctor`, \
BANGER_ACCEL). Exits 1 if the guest does not come up or a check fails, with the end of the \
serial console; the whole console log is kept under the state directory."
    )]
    Test(TestArgs),
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The recorded kernel to boot (`banger kernel list`).
    #[arg(add = super::complete::kernel_names())]
    name: String,
    /// The image to boot it on (`banger image list`).
    #[arg(long, default_value = banger::bangerfile::DEFAULT_IMAGE)]
    image: String,
    /// How the host reaches the agent: vsock (through vhost-device-vsock) or the virtio-serial
    /// fallback; auto picks vsock when vhost-device-vsock is installed.
    #[arg(long, value_enum, default_value_t = TransportChoice::Auto)]
    transport: TransportChoice,
    /// Give up on the agent after this many seconds (at most a week).
    #[arg(long, default_value_t = 120, value_name = "SECONDS", value_parser = super::vm::timeout_secs())]
    timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    memory: u64,
    /// Extra kernel command-line words (e.g. `banger.init=agent`); repeatable.
    #[arg(long = "append", value_name = "WORD")]
    append: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TransportChoice {
    Auto,
    Vsock,
    Serial,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The catalog kernel, or the registry reference of a kernel pushed by banger.
    name: String,
    /// Fetch again even if it is cached (a moved package version is picked up).
    #[arg(long)]
    force: bool,
    /// With a registry reference: the name to record the kernel under [default: the name it
    /// was pushed with].
    #[arg(long = "name", value_name = "NAME")]
    record_as: Option<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The kernel to push (`banger kernel list`).
    #[arg(add = super::complete::kernel_names())]
    name: String,
    /// Where to: REGISTRY/REPOSITORY:TAG.
    reference: String,
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
        KernelCommand::Push(args) => push(context, args),
        KernelCommand::Import(args) => import(context, args),
        KernelCommand::List(args) => list(context, args),
        KernelCommand::Show { name } => show(context, name),
        KernelCommand::Remove { names } => remove(context, names),
        KernelCommand::Test(args) => test(context, args),
    }
}

/// Prints a kernel a pull or import recorded.
fn print_recorded(context: &Context, pulled: &PulledKernel) -> anyhow::Result<ExitStatus> {
    let PulledKernel { record, report } = pulled;
    let printer = &context.printer;
    if printer.json {
        printer.record("kernel", kernel_json(record))?;
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
    let build = BuildEnv::open(context)?;
    let env = build.env();
    let reporter = super::reporters::for_printer(&context.printer);
    // A name the catalog does not know, written as a registry reference, is one.
    let pushed = build.catalogs.kernel(&args.name).is_none() && args.name.contains('/');
    if args.record_as.is_some() && !pushed {
        return Err(super::exit::UsageError(
            "--name applies to a registry reference, not a catalog kernel".into(),
        )
        .into());
    }
    let pulled = super::run_cancellable(&build.runtime, false, |mut options| {
        build.caches.clone().apply(&mut options);
        async {
            if pushed {
                kernels::pull_reference(
                    &env,
                    &args.name,
                    args.record_as.as_deref(),
                    reporter.as_ref(),
                    options,
                )
                .await
            } else {
                kernels::pull(&env, &args.name, args.force, reporter.as_ref(), options).await
            }
        }
    })?;
    print_recorded(context, &pulled)
}

fn push(context: &mut Context, args: &PushArgs) -> anyhow::Result<ExitStatus> {
    let runtime = super::runtime()?;
    let services = banger::steps::Services::from_env(&context.paths()?.state_dir.clone())?;
    let store = context.store()?;
    let state_dir = context.paths()?.state_dir.clone();
    let bar = super::image::UploadBar::new(&context.printer);
    let outcome = runtime.block_on(banger::ops::publish::push_kernel(
        &store,
        &state_dir,
        &services.registry,
        &args.name,
        &args.reference,
        &|what, done, total| bar.show(what, done, total),
    ));
    bar.finish();
    let outcome = outcome?;
    super::image::print_pushed(context, "kernel_pushed", &args.name, &outcome)?;
    Ok(ExitStatus::Success)
}

fn import(context: &mut Context, args: &ImportArgs) -> anyhow::Result<ExitStatus> {
    let build = BuildEnv::open(context)?;
    let (plan, stage, source) = kernels::import_plan(&args.name, &args.from, &build.catalogs)?;
    let env = build.env();
    let reporter = super::reporters::for_printer(&context.printer);
    let pulled = super::run_cancellable(&build.runtime, false, |options| {
        kernels::build_and_record(
            &env,
            &args.name,
            &source,
            &plan,
            stage,
            reporter.as_ref(),
            options,
        )
    })?;
    print_recorded(context, &pulled)
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

fn test(context: &mut Context, args: &TestArgs) -> anyhow::Result<ExitStatus> {
    use banger::vm::boot::AgentTransport;
    let state = context.state()?;
    let store = context.store()?;
    let paths = context.paths()?.clone();
    let request = kernels::KernelTest {
        kernel: args.name.clone(),
        image: args.image.clone(),
        transport: match args.transport {
            TransportChoice::Auto => None,
            TransportChoice::Vsock => Some(AgentTransport::Vsock),
            TransportChoice::Serial => Some(AgentTransport::Serial),
        },
        memory_mib: args.memory,
        timeout: std::time::Duration::from_secs(args.timeout),
        append: args.append.clone(),
    };
    let runtime = super::runtime()?;
    let printer = &context.printer;
    let notes = |text: String| printer.info(&text);
    let outcome = runtime.block_on(kernels::test(&paths, &state, &store, &request, &notes))?;
    let (kernel, image, accel) = (&outcome.kernel, &outcome.image, &outcome.accel);
    let report = match &outcome.result {
        Ok(report) => report,
        Err(error) => {
            printer.error(&format!(
                "kernel {}: {}",
                kernel.name,
                banger::error::error_chain(error)
            ));
            return Ok(ExitStatus::UserError);
        }
    };
    let (release_ok, exit_ok) = (outcome.release_ok, outcome.exit_ok);
    if printer.json {
        printer.record(
            "kernel_test",
            json!({
                "kernel": kernel.name,
                "image": image.name,
                "accel": accel.to_string(),
                "transport": report.transport.to_string(),
                "agent_ready_ms": report.agent_ready.as_millis() as u64,
                "first_command_ms": report.first_command.as_millis() as u64,
                "round_trip_us": report.round_trip.as_micros() as u64,
                "round_trip_settled_us": report
                    .round_trip_settled
                    .map(|settled| settled.as_micros() as u64),
                "agent_version": report.ready.agent_version,
                "protocol": report.ready.protocol,
                "agent_pid1": report.ready.pid1,
                "uname_release": report.uname_release,
                "expected_release": kernel.release,
                "exit_seven": report.exit_seven.to_string(),
                "passed": release_ok && exit_ok,
            }),
        )?;
    } else {
        let mark = |ok: bool| if ok { "ok" } else { "FAILED" };
        printer.data(&format!(
            "agent ready      {:.1} s after QEMU start (agent {}, protocol {})\n\
             uname -r         {}  {}\n\
             sh -c 'exit 7'   {}  {}\n\
             first command    {:.1} s after QEMU start\n\
             round trip       {:.1} ms (median of {}, right after the first command){}\n",
            report.agent_ready.as_secs_f64(),
            report.ready.agent_version,
            report.ready.protocol,
            report.uname_release,
            mark(release_ok),
            report.exit_seven,
            mark(exit_ok),
            report.first_command.as_secs_f64(),
            report.round_trip.as_secs_f64() * 1000.0,
            banger::vm::boot::SMOKE_ROUND_TRIPS,
            report
                .round_trip_settled
                .map(|settled| format!(
                    "\nsettled          {:.1} ms (the same, once the boot is over)",
                    settled.as_secs_f64() * 1000.0
                ))
                .unwrap_or_default(),
        ))?;
    }
    if !release_ok {
        printer.error(&format!(
            "the guest runs {}, but kernel {} is {}",
            report.uname_release,
            kernel.name,
            kernel.release.as_deref().unwrap_or("-")
        ));
    }
    if !exit_ok {
        printer.error(&format!(
            "`sh -c 'exit 7'` came back as {}, not exit 7",
            report.exit_seven
        ));
    }
    Ok(if release_ok && exit_ok {
        ExitStatus::Success
    } else {
        ExitStatus::UserError
    })
}
