//! `banger cache ls|du|gc`.

use clap::{Args, Subcommand};
use serde_json::json;

use banger::ops::graph::format_time_ms;
use banger::spec::ByteSize;
use banger::store::{GcOptions, Store};
use banger::vm::snapshot::{
    SnapshotCurrency, Snapshots, StoredSnapshot, least_recently_used_beyond, short_key,
};

use super::Context;
use super::exit::ExitStatus;
use super::printer::human_bytes;

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List stored steps, most recently used first.
    #[command(visible_alias = "list")]
    Ls,
    /// Show how much the store holds and where.
    Du,
    /// Evict least-recently-used steps until the store fits its size cap.
    #[command(
        long_about = "Evict least-recently-used steps until the store fits its size cap.

The cap is --max-size, else `[cache] max_size` in the config file, else 20G. Steps pinned by a \
root (an image in use, a running VM) are never evicted. Evicted steps leave a tombstone, so \
`banger graph --why` can say a step will run because it was evicted. Content that no record \
references (left by an interrupted build) is removed as well.

Memory snapshots that no VM can start from any more are removed too: those saved by another \
banger or QEMU version, or of an image that is no longer recorded. Then the least recently \
used snapshots go until the rest fit `[cache] snapshots_max_size` (default 2G), as they do \
whenever a new one is saved."
    )]
    Gc(GcArgs),
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Size cap for this run (512M, 20G, ...), overriding the config.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<ByteSize>,
    /// Show what would be evicted without removing anything.
    #[arg(long)]
    dry_run: bool,
}

fn parse_size(text: &str) -> Result<ByteSize, String> {
    ByteSize::parse(text)
}

pub fn run(context: &mut Context, command: &CacheCommand) -> anyhow::Result<ExitStatus> {
    match command {
        CacheCommand::Ls => ls(context),
        CacheCommand::Du => du(context),
        CacheCommand::Gc(args) => gc(context, args),
    }
}

fn ls(context: &mut Context) -> anyhow::Result<ExitStatus> {
    let Some(store) = context.existing_store()? else {
        if !context.printer.json {
            context.printer.info("the store is empty");
        }
        return Ok(ExitStatus::Success);
    };
    let records = store.records()?;
    let printer = &context.printer;
    if printer.json {
        for (record, last_used_ms) in &records {
            printer.record(
                "cache_entry",
                json!({
                    "step": record.step_id,
                    "kind": record.kind,
                    "key": record.definition_key.to_hex(),
                    "bytes": record.total_size(),
                    "created_ms": record.created_ms,
                    "duration_ms": record.duration_ms,
                    "last_used_ms": last_used_ms,
                }),
            )?;
        }
        return Ok(ExitStatus::Success);
    }
    if records.is_empty() {
        printer.info("the store is empty");
        return Ok(ExitStatus::Success);
    }
    let rows: Vec<[String; 5]> = records
        .iter()
        .map(|(record, last_used_ms)| {
            [
                record.step_id.clone(),
                record.kind.clone(),
                record.definition_key.short(),
                human_bytes(record.total_size()),
                format_time_ms(*last_used_ms),
            ]
        })
        .collect();
    let out = super::table(&["STEP", "KIND", "KEY", "SIZE", "LAST USED"], &rows);
    printer.data(&out)?;
    Ok(ExitStatus::Success)
}

fn du(context: &mut Context) -> anyhow::Result<ExitStatus> {
    let cap = context.config()?.cache_max_size;
    let snapshots_cap = context.config()?.cache_snapshots_max_size;
    let dir = context.paths()?.store_dir();
    let usage = match context.existing_store()? {
        Some(store) => store.usage()?,
        None => Default::default(),
    };
    let snapshots_dir = context.paths()?.snapshots_dir();
    let snapshots = if snapshots_dir.exists() {
        Snapshots::open(&snapshots_dir)?.list()?
    } else {
        Vec::new()
    };
    let snapshot_bytes: u64 = snapshots.iter().map(|snapshot| snapshot.disk_usage).sum();
    let printer = &context.printer;
    if printer.json {
        printer.record(
            "cache_usage",
            json!({
                "path": dir,
                "records": usage.records,
                "output_bytes": usage.output_bytes,
                "disk_bytes": usage.disk_bytes,
                "max_size": cap.bytes(),
                "snapshots": snapshots.len(),
                "snapshot_bytes": snapshot_bytes,
                "snapshots_max_size": snapshots_cap.bytes(),
            }),
        )?;
        return Ok(ExitStatus::Success);
    }
    printer.data(&format!(
        "store:     {}\nsteps:     {}\noutputs:   {} (cap {})\non disk:   {}\nsnapshots: {} ({} on disk, cap {}, in {})\n",
        dir.display(),
        usage.records,
        human_bytes(usage.output_bytes),
        human_bytes(cap.bytes()),
        human_bytes(usage.disk_bytes),
        snapshots.len(),
        human_bytes(snapshot_bytes),
        human_bytes(snapshots_cap.bytes()),
        snapshots_dir.display(),
    ))?;
    Ok(ExitStatus::Success)
}

fn gc(context: &mut Context, args: &GcArgs) -> anyhow::Result<ExitStatus> {
    let cap = match args.max_size {
        Some(size) => size,
        None => context.config()?.cache_max_size,
    };
    let snapshots = collect_snapshots(context, args.dry_run)?;
    let Some(store) = context.existing_store()? else {
        let printer = &context.printer;
        if printer.json {
            printer.record(
                "cache_gc",
                json!({"dry_run": args.dry_run, "snapshots": snapshots.json()}),
            )?;
        } else {
            printer.data(&snapshots.text(args.dry_run))?;
            printer.info("the store is empty: nothing to collect");
        }
        return Ok(ExitStatus::Success);
    };
    collect(context, &store, cap, args.dry_run, &snapshots)
}

/// What `cache gc` did (or would do) to the memory snapshots.
#[derive(Debug, Default)]
struct SnapshotCollection {
    removed: Vec<(StoredSnapshot, String)>,
    kept: Vec<StoredSnapshot>,
}

impl SnapshotCollection {
    fn freed_bytes(&self) -> u64 {
        self.removed
            .iter()
            .map(|(snapshot, _)| snapshot.disk_usage)
            .sum()
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "removed": self.removed.iter().map(|(snapshot, reason)| json!({
                "key": snapshot.key,
                "reason": reason,
                "bytes": snapshot.disk_usage,
            })).collect::<Vec<_>>(),
            "freed_bytes": self.freed_bytes(),
            "kept": self.kept.len(),
            "kept_bytes": self.kept.iter().map(|snapshot| snapshot.disk_usage).sum::<u64>(),
        })
    }

    /// Nothing when there are no snapshots at all.
    fn text(&self, dry_run: bool) -> String {
        if self.removed.is_empty() && self.kept.is_empty() {
            return String::new();
        }
        let verb = if dry_run { "would remove" } else { "removed" };
        let mut out = String::new();
        for (snapshot, reason) in &self.removed {
            out.push_str(&format!(
                "{verb} snapshot {} ({reason})\n",
                short_key(&snapshot.key)
            ));
        }
        out.push_str(&format!(
            "{verb} {} snapshot(s), {}; {} kept ({})\n",
            self.removed.len(),
            human_bytes(self.freed_bytes()),
            self.kept.len(),
            human_bytes(self.kept.iter().map(|snapshot| snapshot.disk_usage).sum()),
        ));
        out
    }
}

/// Removes the snapshots no VM can start from any more (none when `dry_run`).
fn collect_snapshots(context: &mut Context, dry_run: bool) -> anyhow::Result<SnapshotCollection> {
    let dir = context.paths()?.snapshots_dir();
    if !dir.exists() {
        return Ok(SnapshotCollection::default());
    }
    let images = context.state()?.images()?;
    let now = SnapshotCurrency::now(images.into_iter().map(|image| image.rootfs_integrity));
    let cap = context.config()?.cache_snapshots_max_size;
    let snapshots = Snapshots::open(dir)?;
    let mut collection = SnapshotCollection::default();
    for snapshot in snapshots.list()? {
        match snapshot.stale_reason(&now) {
            Some(reason) => collection.removed.push((snapshot, reason)),
            None => collection.kept.push(snapshot),
        }
    }
    let beyond: Vec<String> = least_recently_used_beyond(&collection.kept, cap.bytes(), None)
        .into_iter()
        .map(|snapshot| snapshot.key.clone())
        .collect();
    let (evicted, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut collection.kept)
        .into_iter()
        .partition(|snapshot| beyond.contains(&snapshot.key));
    collection.kept = kept;
    collection
        .removed
        .extend(evicted.into_iter().map(|snapshot| {
            let reason = format!("least recently used, beyond `[cache] snapshots_max_size` {cap}");
            (snapshot, reason)
        }));
    if !dry_run {
        for (snapshot, _) in &collection.removed {
            snapshots.remove(&snapshot.key);
        }
    }
    Ok(collection)
}

fn collect(
    context: &Context,
    store: &Store,
    cap: ByteSize,
    dry_run: bool,
    snapshots: &SnapshotCollection,
) -> anyhow::Result<ExitStatus> {
    let report = store.gc(GcOptions {
        max_size: cap.bytes(),
        dry_run,
    })?;
    let printer = &context.printer;
    if printer.json {
        printer.record(
            "cache_gc",
            json!({
                "dry_run": dry_run,
                "evicted": report.evicted,
                "freed_bytes": report.freed_bytes,
                "orphan_bytes": report.orphan_bytes,
                "remaining_bytes": report.remaining_bytes,
                "rooted": report.rooted,
                "max_size": cap.bytes(),
                "snapshots": snapshots.json(),
            }),
        )?;
        return Ok(ExitStatus::Success);
    }
    let verb = if dry_run { "would evict" } else { "evicted" };
    let mut out = snapshots.text(dry_run);
    for step in &report.evicted {
        out.push_str(&format!("{verb} {step}\n"));
    }
    out.push_str(&format!(
        "{verb} {} step(s), {} of outputs; {} of unreferenced content {}; {} remain (cap {})\n",
        report.evicted.len(),
        human_bytes(report.freed_bytes),
        human_bytes(report.orphan_bytes),
        if dry_run { "would be swept" } else { "swept" },
        human_bytes(report.remaining_bytes),
        human_bytes(cap.bytes()),
    ));
    if report.rooted > 0 {
        out.push_str(&format!(
            "{} step(s) kept because a root pins them\n",
            report.rooted
        ));
    }
    printer.data(&out)?;
    if report.remaining_bytes > cap.bytes() {
        printer.warn(&format!(
            "the store still holds {}, above the cap of {}: everything left is pinned by roots",
            human_bytes(report.remaining_bytes),
            human_bytes(cap.bytes())
        ));
    }
    Ok(ExitStatus::Success)
}
