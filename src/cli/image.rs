//! `banger image pull|list|show|rm|import-tar|register`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::json;

use banger::catalog::Catalogs;
use banger::engine::Engine;
use banger::ops::graph::format_time_ms;
use banger::ops::images::{self, ImageJob, ImagePullRequest, PullEnv};
use banger::spec::ByteSize;
use banger::state::ImageRecord;
use banger::steps;
use banger::store::Store;

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
Podman's auth.json ($REGISTRY_AUTH_FILE), then ~/.docker/config.json ($DOCKER_CONFIG), \
through their credential helpers (credHelpers, credsStore) or auths entries; loopback registries are spoken to over plain HTTP.")]
    Pull(PullArgs),
    /// List recorded images (or, with --available, the catalog).
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one image.
    Show {
        #[arg(add = super::complete::image_names())]
        name: String,
    },
    /// Forget an image; its bytes go at the next `banger cache gc` unless still used.
    #[command(visible_alias = "rm")]
    Remove {
        #[arg(add = super::complete::image_names())]
        names: Vec<String>,
    },
    /// Turn a `docker export`-style root filesystem tar (FILE, or - for stdin) into an image.
    ImportTar(ImportTarArgs),
    /// Record an existing ext4 root filesystem image under a name.
    Register(RegisterArgs),
    /// Write an image as a bundle (`.tar.zst` of rootfs.ext4 + manifest.json) and print its
    /// catalog entry.
    Export(ExportArgs),
    /// Publish an image to an OCI registry: its layers are the steps that made it.
    #[command(
        long_about = "Publish a recorded image to an OCI registry as an ordinary OCI image \
whose layers are the steps that built it: the base's layers, one per provisioning step, and \
banger's agent. Layers the repository has already are not sent again, so a push after editing \
the last provisioning step sends that layer and the config. `banger image pull REF` on another \
host rebuilds the same ext4, byte for byte. Credentials as for pulls (Docker's config.json and \
its credential helpers). Images from catalog bundles and registered ext4 files cannot be pushed \
yet."
    )]
    Push(PushArgs),
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The image to push (`banger image list`).
    #[arg(add = super::complete::image_names())]
    name: String,
    /// Where to: REGISTRY/REPOSITORY:TAG (`registry.example.com/team/sandbox:1`).
    reference: String,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The image to export.
    #[arg(add = super::complete::image_names())]
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
        ImageCommand::Push(args) => {
            let runtime = super::runtime()?;
            let services = steps::Services::from_env(&context.paths()?.state_dir.clone())?;
            let mount_from: Vec<String> = context.config()?.cache_remote.iter().cloned().collect();
            push(
                context,
                &runtime,
                &services,
                &args.name,
                &args.reference,
                &mount_from,
            )?;
            Ok(ExitStatus::Success)
        }
    }
}

/// Pushes the recorded image `name` to `reference` with a progress bar per layer, and prints
/// where it went (`image push`, `build --push`).
pub fn push(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    services: &steps::Services,
    name: &str,
    reference: &str,
    mount_from: &[String],
) -> anyhow::Result<()> {
    let store = context.store()?;
    let state_dir = context.paths()?.state_dir.clone();
    let printer = &context.printer;
    let bar = UploadBar::new(printer);
    let progress = |what: &str, done: u64, total: u64| bar.show(what, done, total);
    let outcome = runtime.block_on(banger::ops::publish::push_image(
        &store,
        &state_dir,
        &services.registry,
        name,
        reference,
        mount_from,
        &progress,
    ));
    bar.finish();
    let outcome = outcome?;
    print_pushed(context, "image_pushed", name, &outcome)
}

/// One progress bar for the uploads of a push, when the printer shows progress.
#[derive(Debug)]
pub struct UploadBar(Option<indicatif::ProgressBar>);

impl UploadBar {
    pub fn new(printer: &super::printer::Printer) -> UploadBar {
        UploadBar(printer.progress.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner:.cyan} {prefix} [{bar:24.cyan/blue}] {bytes}/{total_bytes} \
                     {bytes_per_sec:>11}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        }))
    }

    /// `done` of `total` bytes of `what` sent.
    pub fn show(&self, what: &str, done: u64, total: u64) {
        if let Some(bar) = &self.0 {
            bar.set_prefix(format!("pushing {what}"));
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Prints where a push went: the `KIND` record with `--json`, else the reference and a line
/// of what travelled.
pub fn print_pushed(
    context: &Context,
    kind: &str,
    name: &str,
    outcome: &banger::ops::publish::PushOutcome,
) -> anyhow::Result<()> {
    let printer = &context.printer;
    if printer.json {
        printer.record(
            kind,
            serde_json::json!({
                "name": name,
                "reference": outcome.reference,
                "digest": outcome.manifest_digest,
                "layers": outcome.layers,
                "uploaded_blobs": outcome.uploaded_blobs,
                "uploaded_bytes": outcome.uploaded_bytes,
                "reused_bytes": outcome.reused_bytes,
                "mounted_blobs": outcome.mounted_blobs,
            }),
        )?;
    } else {
        printer.data(&format!("{}\n", outcome.reference))?;
        printer.info(&format!(
            "pushed {name}: {} file(s), {} sent in {} blob(s), {} already there",
            outcome.layers,
            human_bytes(outcome.uploaded_bytes),
            outcome.uploaded_blobs,
            human_bytes(outcome.reused_bytes)
        ));
    }
    Ok(())
}

/// What a command that builds images or kernels owns; [`BuildEnv::env`] lends it to the
/// library's pull and record functions.
#[derive(Debug)]
pub struct BuildEnv {
    pub runtime: tokio::runtime::Runtime,
    pub catalogs: Catalogs,
    services: steps::Services,
    store: Store,
    engine: Engine,
    state_dir: PathBuf,
    /// The config's remote step cache (`[cache] remote`), for every run of this command.
    pub caches: banger::remote::RunCaches,
}

impl BuildEnv {
    /// The catalogs in force, a runtime, the services, the store (created if needed) and an
    /// engine over it.
    pub fn open(context: &mut Context) -> anyhow::Result<BuildEnv> {
        let catalogs = context.catalogs()?;
        let runtime = super::runtime()?;
        let state_dir = context.paths()?.state_dir.clone();
        let services = steps::Services::from_env(&state_dir)?;
        let store = context.store()?;
        let engine = super::engine(&store, &services);
        let caches =
            banger::remote::run_caches(None, None, context.config()?, services.registry.options())?;
        Ok(BuildEnv {
            runtime,
            catalogs,
            services,
            store,
            engine,
            state_dir,
            caches,
        })
    }

    pub fn env(&self) -> PullEnv<'_> {
        PullEnv {
            engine: &self.engine,
            services: &self.services,
            catalogs: &self.catalogs,
            store: &self.store,
            state_dir: &self.state_dir,
        }
    }
}

fn pull(context: &mut Context, args: &PullArgs) -> anyhow::Result<ExitStatus> {
    let build = BuildEnv::open(context)?;
    let env = build.env();
    let request = ImagePullRequest {
        query: args.image.clone(),
        name: args.name.clone(),
        kernel: args.kernel.clone(),
        size: args.size,
    };
    // The library's `images::pull` in two halves, so the pin is reported before the build.
    let prepared = build
        .runtime
        .block_on(images::prepare_pull(&env, &request))?;
    if let Some(resolved) = &prepared.resolved {
        context.printer.info(resolved);
    }
    build_and_record(context, &build, &prepared.job)
}

/// Runs `job` (Ctrl-C cancels it), records the image and prints it.
fn build_and_record(
    context: &Context,
    build: &BuildEnv,
    job: &ImageJob,
) -> anyhow::Result<ExitStatus> {
    let env = build.env();
    let reporter = super::reporters::for_printer(&context.printer);
    let (record, report) = super::run_cancellable(&build.runtime, false, |mut options| {
        build.caches.clone().apply(&mut options);
        images::build_and_record(&env, job, reporter.as_ref(), options)
    })?;
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

fn import_tar(context: &mut Context, args: &ImportTarArgs) -> anyhow::Result<ExitStatus> {
    let build = BuildEnv::open(context)?;
    let kernel = images::default_kernel(&build.catalogs, args.kernel.as_deref(), &build.state_dir)?;
    // Spooled inside the store's scratch area: the import step then hard-links nothing across
    // file systems, and a crash leaves scratch that the next open removes.
    let spool_dir = build.store.scratch()?;
    let (path, digest) = spool(&args.file, spool_dir.path())?;
    let job = images::import_tar_job(&path, &digest, args.size, &args.name, kernel)?;
    build_and_record(context, &build, &job)
}

fn register(context: &mut Context, args: &RegisterArgs) -> anyhow::Result<ExitStatus> {
    let build = BuildEnv::open(context)?;
    let kernel = images::default_kernel(&build.catalogs, args.kernel.as_deref(), &build.state_dir)?;
    let job = images::register_job(&args.rootfs, &args.name, kernel, args.distro.clone())?;
    build_and_record(context, &build, &job)
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

/// Prints the catalog entry of the bundle at `out` (`written`: its sha256 and size).
pub fn print_bundle_entry(
    context: &Context,
    name: &str,
    distro: &str,
    arch: &str,
    kernel: &str,
    out: &Path,
    written: &(String, u64),
) -> anyhow::Result<()> {
    let (sha256, size) = written;
    let absolute = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_owned());
    let entry = json!({
        "name": name,
        "description": format!("{name} ({distro})"),
        "distro": distro,
        "arch": arch,
        "kernel_ref": kernel,
        "prefer": "bundle",
        "bundle": {
            "url": format!("file://{}", absolute.display()),
            "sha256": sha256,
            "size": size,
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
            human_bytes(*size)
        ));
        printer.data(&format!("{entry:#}\n"))?;
    }
    Ok(())
}

/// Writes `record` as a bundle at `out` and prints the catalog entry that points at it.
pub fn export_bundle(
    context: &mut Context,
    record: &ImageRecord,
    out: &Path,
    distro: Option<&str>,
) -> anyhow::Result<ExitStatus> {
    let store = context.store()?;
    let exported = banger::ops::images::export_bundle(&store, record, out, distro)?;
    print_bundle_entry(
        context,
        &record.name,
        &exported.distro,
        &record.arch,
        &exported.kernel,
        out,
        &(exported.sha256, exported.size),
    )?;
    Ok(ExitStatus::Success)
}
