//! `banger image pull|list|show|rm|import-tar|register`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::json;

use banger::catalog::Prefer;
use banger::images::{self, PullSource};
use banger::inspect::format_time_ms;
use banger::key::Params;
use banger::lock::Lock;
use banger::plan::lower::{EXT4_HEADROOM_PERCENT, EXT4_MIN_BYTES};
use banger::plan::{Plan, StepNode};
use banger::spec::{ByteSize, ImageSource, ImageSpec};
use banger::state::ImageRecord;
use banger::steps;
use banger::store::now_ms;

use super::Context;
use super::exit::{ExitStatus, UsageError};
use super::printer::human_bytes;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Fetch an image: a catalog name (`debian-bookworm`) or any OCI reference
    /// (`alpine:3.20`, `docker.io/library/debian:bookworm`, `localhost:5000/x@sha256:…`).
    #[command(long_about = "Fetch an image and record it under a name.

NAME is looked up in the image catalog first (`banger image list --available`); anything else \
is an OCI reference, resolved to its linux/amd64 manifest. Layers are fetched in parallel, \
verified against their digests, and written into an ext4 image with banger's guest agent. \
Every step is cached: pulling again with nothing changed does no work. Credentials come from \
~/.docker/config.json; loopback registries are spoken to over plain HTTP.")]
    Pull(PullArgs),
    /// List recorded images (or, with --available, the catalog).
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one image.
    Show { name: String },
    /// Forget an image; its bytes go at the next `banger cache gc` unless still used.
    #[command(visible_alias = "rm")]
    Remove { names: Vec<String> },
    /// Turn a `docker export`-style root filesystem tar (FILE, or - for stdin) into an image.
    ImportTar(ImportTarArgs),
    /// Record an existing ext4 root filesystem image under a name.
    Register(RegisterArgs),
    /// Write an image as a bundle (`.tar.zst` of rootfs.ext4 + manifest.json) and print its
    /// catalog entry.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The image to export.
    name: String,
    /// The bundle to write (`NAME.tar.zst`).
    out: PathBuf,
    /// Distribution for the manifest [default: the image's, else its /etc/os-release ID].
    #[arg(long)]
    distro: Option<String>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Catalog name or OCI reference.
    image: String,
    /// Record it under this name [default: the catalog name, or the reference as given].
    #[arg(long)]
    name: Option<String>,
    /// The kernel it boots with [default: the catalog's, else the default kernel].
    #[arg(long)]
    kernel: Option<String>,
    /// Fixed ext4 size (4G, 512M) instead of content × headroom.
    #[arg(long, value_parser = parse_size)]
    size: Option<ByteSize>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// List the image catalog instead of recorded images.
    #[arg(long)]
    available: bool,
}

#[derive(Debug, Args)]
pub struct ImportTarArgs {
    /// The tar (gzip or zstd compressed, or not), or `-` to read standard input.
    file: String,
    /// Record it under this name.
    #[arg(long)]
    name: String,
    /// The kernel it boots with [default: the default kernel].
    #[arg(long)]
    kernel: Option<String>,
    /// Fixed ext4 size (4G, 512M) instead of content × headroom.
    #[arg(long, value_parser = parse_size)]
    size: Option<ByteSize>,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The name to record it under.
    name: String,
    /// The ext4 image file; it is copied into the store.
    #[arg(long)]
    rootfs: PathBuf,
    /// The kernel it boots with [default: the default kernel].
    #[arg(long)]
    kernel: Option<String>,
    /// Distribution, for `image list` (debian, alpine, …).
    #[arg(long)]
    distro: Option<String>,
}

fn parse_size(text: &str) -> Result<ByteSize, String> {
    ByteSize::parse(text)
}

pub fn run(context: &mut Context, command: &ImageCommand) -> anyhow::Result<ExitStatus> {
    match command {
        ImageCommand::Pull(args) => pull(context, args),
        ImageCommand::List(args) => list(context, args),
        ImageCommand::Show { name } => show(context, name),
        ImageCommand::Remove { names } => remove(context, names),
        ImageCommand::ImportTar(args) => import_tar(context, args),
        ImageCommand::Register(args) => register(context, args),
        ImageCommand::Export(args) => {
            let state = context.state()?;
            let record = state.require_image(&args.name)?;
            export_bundle(context, &record, &args.out, args.distro.as_deref())
        }
    }
}

fn default_kernel(context: &mut Context, chosen: Option<&str>) -> anyhow::Result<String> {
    let catalogs = context.catalogs()?;
    let kernel = match chosen {
        Some(kernel) => kernel.to_owned(),
        None => catalogs
            .kernels
            .first()
            .map(|entry| entry.name.clone())
            .context("the kernel catalog is empty; pass --kernel")?,
    };
    images::check_kernel(&kernel, &catalogs, &recorded_kernels(context)?)?;
    Ok(kernel)
}

/// What a pull or import builds and how it is recorded.
struct Job {
    name: String,
    source: String,
    distro: Option<String>,
    kernel: String,
    plan: Plan,
    finals: BTreeMap<String, petgraph::graph::NodeIndex>,
}

fn pull(context: &mut Context, args: &PullArgs) -> anyhow::Result<ExitStatus> {
    let catalogs = context.catalogs()?;
    let runtime = super::runtime()?;
    let services = steps::Services::from_env(&context.paths()?.state_dir.clone())?;
    let size = args.size.map(|size| size.bytes());
    let job = match images::classify_pull(&args.image, &catalogs)? {
        PullSource::Catalog(entry) => {
            let kernel = args
                .kernel
                .clone()
                .unwrap_or_else(|| entry.kernel_ref.clone());
            images::check_kernel(&kernel, &catalogs, &recorded_kernels(context)?)?;
            let spec = ImageSpec {
                name: entry.name.clone(),
                from: ImageSource::Catalog {
                    name: entry.name.clone(),
                },
                size: args.size,
                kernel: kernel.clone(),
                provision: Vec::new(),
            };
            let (plan, finals) = images::plan_images(&[spec], &Lock::default(), &catalogs)?;
            let how = match (entry.prefer, &entry.bundle) {
                (Prefer::Bundle, Some(_)) => "bundle",
                _ => "recipe",
            };
            Job {
                name: args.name.clone().unwrap_or_else(|| entry.name.clone()),
                source: format!("catalog:{} ({how})", entry.name),
                distro: Some(entry.distro.clone()),
                kernel,
                plan,
                finals,
            }
        }
        PullSource::Oci(reference) => {
            let kernel = default_kernel(context, args.kernel.as_deref())?;
            let spec = ImageSpec {
                name: args.image.clone(),
                from: ImageSource::Oci {
                    reference: args.image.clone(),
                },
                size: size.map(ByteSize),
                kernel: kernel.clone(),
                provision: Vec::new(),
            };
            let mut lock = Lock::default();
            let pinned = runtime.block_on(images::pin_references(
                std::slice::from_ref(&spec),
                &mut lock,
                &services.registry,
                true,
            ))?;
            let digest = pinned
                .first()
                .map(|(_, digest)| digest.clone())
                .unwrap_or_default();
            context
                .printer
                .info(&format!("{reference} resolved to {digest}"));
            let (plan, finals) = images::plan_images(&[spec], &lock, &catalogs)?;
            Job {
                name: args.name.clone().unwrap_or_else(|| args.image.clone()),
                source: format!("oci:{reference}@{digest}"),
                distro: None,
                kernel,
                plan,
                finals,
            }
        }
    };
    build_and_record(context, &runtime, &services, job)
}

fn build_and_record(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    services: &steps::Services,
    job: Job,
) -> anyhow::Result<ExitStatus> {
    let store = context.store()?;
    let engine = super::engine(&store, services);
    let reporter = super::reporters::for_printer(&context.printer);
    let project = format!("image:{}", job.name);
    let (report, built) = super::run_cancellable(runtime, false, |options| {
        images::build(
            &engine,
            &job.plan,
            &job.finals,
            &project,
            reporter.as_ref(),
            options,
        )
    })?;
    let image = built
        .into_iter()
        .next()
        .context("the plan built no image")?;
    let record = ImageRecord {
        name: job.name.clone(),
        source: job.source,
        distro: job.distro,
        arch: "x86_64".into(),
        kernel_ref: Some(job.kernel),
        rootfs_integrity: image.rootfs.integrity.clone(),
        rootfs_size: image.rootfs.size,
        step_key: image.step_key,
        created_ms: now_ms(),
    };
    let state = context.state()?;
    images::register(&state, &store, &record, true)?;
    let printer = &context.printer;
    if printer.json {
        printer.record("image", image_json(&record))?;
    } else {
        let verb = if report.ran.is_empty() {
            "up to date"
        } else {
            "pulled"
        };
        printer.data(&format!(
            "{}  {}  {verb}\n",
            record.name,
            human_bytes(record.rootfs_size)
        ))?;
    }
    Ok(ExitStatus::Success)
}

/// Reads `source` (a path, or `-` for stdin) into a file in `dir`, returning the file and the
/// blake3 digest of its bytes.
fn spool(source: &str, dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let mut input: Box<dyn Read> = if source == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(source).with_context(|| format!("cannot open {source}"))?)
    };
    let path = dir.join("import.tar");
    let mut output =
        std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = input
            .read(&mut buffer)
            .with_context(|| format!("cannot read {source}"))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        output.write_all(&buffer[..read])?;
    }
    Ok((path, format!("blake3:{}", hasher.finalize().to_hex())))
}

/// The plan of `import.file` (keyed by the file's digest) → `rootfs.build`.
fn import_plan(path: &Path, digest: &str, size: Option<ByteSize>) -> anyhow::Result<Job> {
    let mut plan = Plan::new();
    let import = plan.add_step(
        StepNode::new(
            "import/tar",
            steps::IMPORT_FILE.name,
            steps::IMPORT_FILE.version,
            Params::new()
                .with("digest", digest)
                .with("name", "rootfs.tar"),
            steps::IMPORT_FILE.resource,
        )
        .hint("path", path.to_string_lossy())
        .summary(format!("{} ({digest})", path.display())),
    )?;
    let mut params = Params::new()
        .with("block_size", 4096u64)
        .with("assets", banger::assets::guest_assets_digest());
    match size {
        Some(size) => params.insert("size", size.bytes()),
        None => {
            params.insert("headroom_percent", EXT4_HEADROOM_PERCENT);
            params.insert("min_size", EXT4_MIN_BYTES);
        }
    }
    let build = plan.add_step(
        StepNode::new(
            "import/rootfs",
            steps::ROOTFS_BUILD.name,
            steps::ROOTFS_BUILD.version,
            params,
            steps::ROOTFS_BUILD.resource,
        )
        .summary("tar → ext4 with owners, modes, xattrs → guest agent"),
    )?;
    plan.add_input(build, "layer[0]", import);
    plan.add_target(build);
    Ok(Job {
        name: String::new(),
        source: format!("tar:{digest}"),
        distro: None,
        kernel: String::new(),
        plan,
        finals: BTreeMap::from([("import".to_owned(), build)]),
    })
}

fn import_tar(context: &mut Context, args: &ImportTarArgs) -> anyhow::Result<ExitStatus> {
    let kernel = default_kernel(context, args.kernel.as_deref())?;
    let store = context.store()?;
    // Spooled inside the store's scratch area: the import step then hard-links nothing across
    // file systems, and a crash leaves scratch that the next open removes.
    let spool_dir = store.scratch()?;
    let (path, digest) = spool(&args.file, spool_dir.path())?;
    let mut job = import_plan(&path, &digest, args.size)?;
    job.name = args.name.clone();
    job.kernel = kernel;
    let runtime = super::runtime()?;
    let services = steps::Services::from_env(&context.paths()?.state_dir.clone())?;
    build_and_record(context, &runtime, &services, job)
}

fn register(context: &mut Context, args: &RegisterArgs) -> anyhow::Result<ExitStatus> {
    let kernel = default_kernel(context, args.kernel.as_deref())?;
    let metadata = std::fs::metadata(&args.rootfs)
        .with_context(|| format!("cannot read {}", args.rootfs.display()))?;
    if !metadata.is_file() {
        return Err(UsageError(format!("{} is not a file", args.rootfs.display())).into());
    }
    let mut superblock = [0u8; 2];
    {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::File::open(&args.rootfs)?;
        file.seek(SeekFrom::Start(1024 + 56))?;
        file.read_exact(&mut superblock).ok();
    }
    if superblock != [0x53, 0xef] {
        return Err(UsageError(format!(
            "{} is not an ext4 image (no ext2/3/4 superblock magic)",
            args.rootfs.display()
        ))
        .into());
    }
    let digest = banger::sources::content_digest(&args.rootfs)?;
    let absolute = std::fs::canonicalize(&args.rootfs)?;
    let mut plan = Plan::new();
    let import = plan.add_step(
        StepNode::new(
            "import/rootfs",
            steps::IMPORT_FILE.name,
            steps::IMPORT_FILE.version,
            Params::new()
                .with("digest", digest.clone())
                .with("name", images::ROOTFS_OUTPUT),
            steps::IMPORT_FILE.resource,
        )
        .hint("path", absolute.to_string_lossy())
        .summary(format!("{}", absolute.display())),
    )?;
    plan.add_target(import);
    let job = Job {
        name: args.name.clone(),
        source: format!("file:{}", absolute.display()),
        distro: args.distro.clone(),
        kernel,
        plan,
        finals: BTreeMap::from([("import".to_owned(), import)]),
    };
    let runtime = super::runtime()?;
    let services = steps::Services::from_env(&context.paths()?.state_dir.clone())?;
    build_and_record(context, &runtime, &services, job)
}

fn image_json(record: &ImageRecord) -> serde_json::Value {
    json!({
        "name": record.name,
        "source": record.source,
        "distro": record.distro,
        "arch": record.arch,
        "kernel": record.kernel_ref,
        "rootfs": record.rootfs_integrity,
        "bytes": record.rootfs_size,
        "key": record.step_key.to_hex(),
        "created_ms": record.created_ms,
    })
}

fn list(context: &mut Context, args: &ListArgs) -> anyhow::Result<ExitStatus> {
    if args.available {
        let catalogs = context.catalogs()?;
        let printer = &context.printer;
        let mut out = String::new();
        for entry in &catalogs.images {
            if printer.json {
                printer.record(
                    "catalog_image",
                    json!({
                        "name": entry.name,
                        "description": entry.description,
                        "distro": entry.distro,
                        "kernel": entry.kernel_ref,
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
    let records = state.images()?;
    let printer = &context.printer;
    if printer.json {
        for record in &records {
            printer.record("image", image_json(record))?;
        }
        return Ok(ExitStatus::Success);
    }
    if records.is_empty() {
        printer.info("no images yet; `banger image pull debian-bookworm` fetches the default one");
        return Ok(ExitStatus::Success);
    }
    let rows: Vec<[String; 5]> = records
        .iter()
        .map(|record| {
            [
                record.name.clone(),
                human_bytes(record.rootfs_size),
                record.kernel_ref.clone().unwrap_or_else(|| "-".into()),
                format_time_ms(record.created_ms),
                record.source.clone(),
            ]
        })
        .collect();
    printer.data(&super::table(
        &["NAME", "SIZE", "KERNEL", "CREATED", "SOURCE"],
        &rows,
    ))?;
    Ok(ExitStatus::Success)
}

fn show(context: &mut Context, name: &str) -> anyhow::Result<ExitStatus> {
    let state = context.state()?;
    let record = state.require_image(name)?;
    let printer = &context.printer;
    if printer.json {
        printer.record("image", image_json(&record))?;
    } else {
        printer.data(&format!(
            "name:     {}\nsource:   {}\ndistro:   {}\narch:     {}\nkernel:   {}\nrootfs:   {} ({})\nstep:     {}\ncreated:  {}\n",
            record.name,
            record.source,
            record.distro.as_deref().unwrap_or("-"),
            record.arch,
            record.kernel_ref.as_deref().unwrap_or("-"),
            human_bytes(record.rootfs_size),
            record.rootfs_integrity,
            record.step_key,
            format_time_ms(record.created_ms),
        ))?;
    }
    Ok(ExitStatus::Success)
}

fn remove(context: &mut Context, names: &[String]) -> anyhow::Result<ExitStatus> {
    if names.is_empty() {
        return Err(UsageError("name at least one image to remove".into()).into());
    }
    let state = context.state()?;
    let store = context.store()?;
    for name in names {
        let record = images::remove(&state, &store, name)?;
        context.printer.info(&format!(
            "removed {} ({}); `banger cache gc` frees its space",
            record.name,
            human_bytes(record.rootfs_size)
        ));
    }
    Ok(ExitStatus::Success)
}

/// The image's distribution: its record, else `ID=` from its `/etc/os-release` (read with
/// debugfs, which is optional: `unknown` without it).
fn image_distro(record: &ImageRecord, rootfs: &Path) -> String {
    if let Some(distro) = &record.distro {
        return distro.clone();
    }
    let output = std::process::Command::new("debugfs")
        .arg("-R")
        .arg("cat /etc/os-release")
        .arg(rootfs)
        .stderr(std::process::Stdio::null())
        .output();
    output
        .ok()
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .find_map(|line| line.strip_prefix("ID="))
                .map(|id| id.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Writes `record` as a bundle at `out` and prints the catalog entry that points at it.
pub fn export_bundle(
    context: &mut Context,
    record: &ImageRecord,
    out: &Path,
    distro: Option<&str>,
) -> anyhow::Result<ExitStatus> {
    let store = context.store()?;
    let staging = store.scratch()?;
    let rootfs = staging.path().join("rootfs.ext4");
    store.materialize(
        &banger::store::OutputRef {
            integrity: record.rootfs_integrity.clone(),
            size: record.rootfs_size,
        },
        &rootfs,
    )?;
    let distro = distro
        .map(str::to_owned)
        .unwrap_or_else(|| image_distro(record, &rootfs));
    let kernel = record
        .kernel_ref
        .clone()
        .context("the image has no kernel; register it again with --kernel")?;
    let manifest =
        banger::bundle::BundleManifest::image(&record.name, &distro, &record.arch, &kernel);
    let cancel = tokio_util::sync::CancellationToken::new();
    let written = banger::bundle::write_bundle(
        &manifest,
        &[("rootfs.ext4".to_owned(), rootfs.clone())],
        out,
        &mut |_, _| {},
        &cancel,
    )?;
    let absolute = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_owned());
    let entry = json!({
        "name": record.name,
        "description": format!("{} ({distro})", record.name),
        "distro": distro,
        "arch": record.arch,
        "kernel_ref": kernel,
        "prefer": "bundle",
        "bundle": {
            "url": format!("file://{}", absolute.display()),
            "sha256": written.sha256,
            "size": written.size,
        },
    });
    let printer = &context.printer;
    if printer.json {
        printer.record("bundle", entry)?;
    } else {
        printer.info(&format!(
            "wrote {} ({}); its catalog entry (put it in a catalog's \"images\" list, with the \
             URL where you publish the bundle):",
            out.display(),
            human_bytes(written.size)
        ));
        printer.data(&format!("{entry:#}\n"))?;
    }
    Ok(ExitStatus::Success)
}

/// The names of the kernels recorded in the state database (imported or pulled).
fn recorded_kernels(context: &mut Context) -> anyhow::Result<Vec<String>> {
    Ok(context
        .state()?
        .kernels()?
        .into_iter()
        .map(|kernel| kernel.name)
        .collect())
}
