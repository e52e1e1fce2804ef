//! Garbage collection: a size cap, least-recently-used order, and roots.
//!
//! 1. Scan the index: every definition record, content record, root and tombstone.
//! 2. Live size = the bytes of every distinct output still referenced by a record.
//! 3. Walk records from least to most recently used, skipping rooted keys; evict (delete the
//!    definition record, the content record, write a tombstone) until live size ≤ cap. An
//!    output's bytes are removed when no remaining record references them.
//! 4. Sweep content no index entry references (bytes from a publish that was killed before its
//!    record was written) and cacache's temp files of dead writers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::{NAMESPACE, StepRecord, Store, StoreError, entry_name, now_ms, parse_integrity};
use crate::key::Key;

pub(super) const LAST_USE_LOG: &str = "last-use-v1.log";

/// What `banger cache gc` should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcOptions {
    /// Evict least-recently-used records until outputs fit in this many bytes.
    pub max_size: u64,
    /// Report what would be removed without removing it.
    pub dry_run: bool,
}

/// What a GC did (or would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Step ids of evicted records, least recently used first.
    pub evicted: Vec<String>,
    /// Bytes of outputs removed (or that would be).
    pub freed_bytes: u64,
    /// Bytes of unreferenced content swept.
    pub orphan_bytes: u64,
    /// Live output bytes after the GC.
    pub remaining_bytes: u64,
    /// Records kept only because a root pins them.
    pub rooted: usize,
}

pub(super) struct DefinitionEntry {
    pub record: StepRecord,
    pub last_used_ms: u64,
}

/// Everything the index says, gathered in one pass.
pub(super) struct Inventory {
    pub definitions: BTreeMap<Key, DefinitionEntry>,
    pub content_records: HashMap<Key, StepRecord>,
    pub roots: HashSet<Key>,
    /// Integrities of the index entries themselves (record bodies).
    pub entry_integrities: HashSet<String>,
}

impl Inventory {
    pub fn scan(store: &Store) -> Result<Inventory, StoreError> {
        let mut inventory = Inventory {
            definitions: BTreeMap::new(),
            content_records: HashMap::new(),
            roots: HashSet::new(),
            entry_integrities: HashSet::new(),
        };
        let def_prefix = format!("{NAMESPACE}/def/");
        let content_prefix = format!("{NAMESPACE}/content/");
        let root_prefix = format!("{NAMESPACE}/root/");
        // cacache creates its index lazily; an empty store has none yet.
        let index_exists = store.dir.join("index-v5").is_dir();
        for entry in cacache::index::ls(&store.dir).filter(|_| index_exists) {
            let metadata = entry.map_err(|source| StoreError::ReadEntry {
                entry: "index".into(),
                source,
            })?;
            inventory
                .entry_integrities
                .insert(metadata.integrity.to_string());
            let corrupt = |source| StoreError::CorruptEntry {
                entry: metadata.key.clone(),
                source,
            };
            if let Some(hex) = metadata.key.strip_prefix(&def_prefix) {
                let Some(key) = Key::parse_hex(hex) else {
                    continue;
                };
                let record: StepRecord =
                    serde_json::from_value(metadata.metadata.clone()).map_err(corrupt)?;
                inventory.definitions.insert(
                    key,
                    DefinitionEntry {
                        record,
                        last_used_ms: metadata.time as u64,
                    },
                );
            } else if let Some(hex) = metadata.key.strip_prefix(&content_prefix) {
                let Some(key) = Key::parse_hex(hex) else {
                    continue;
                };
                let record: StepRecord =
                    serde_json::from_value(metadata.metadata.clone()).map_err(corrupt)?;
                inventory.content_records.insert(key, record);
            } else if metadata.key.starts_with(&root_prefix) {
                let keys: Vec<Key> =
                    serde_json::from_value(metadata.metadata.clone()).map_err(corrupt)?;
                inventory.roots.extend(keys);
            }
        }
        if let Ok(log) = std::fs::read_to_string(store.dir.join(LAST_USE_LOG)) {
            for line in log.lines() {
                let mut fields = line.split(' ');
                let Some(time) = fields.next().and_then(|t| t.parse::<u64>().ok()) else {
                    continue;
                };
                for key in fields.filter_map(Key::parse_hex) {
                    if let Some(entry) = inventory.definitions.get_mut(&key) {
                        entry.last_used_ms = entry.last_used_ms.max(time);
                    }
                }
            }
        }
        Ok(inventory)
    }

    /// How many records reference each output integrity, and its size.
    fn output_references(&self) -> HashMap<String, (usize, u64)> {
        let mut references: HashMap<String, (usize, u64)> = HashMap::new();
        let records = self
            .definitions
            .values()
            .map(|entry| &entry.record)
            .chain(self.content_records.values());
        for record in records {
            for output in record.outputs.values() {
                let slot = references
                    .entry(output.integrity.clone())
                    .or_insert((0, output.size));
                slot.0 += 1;
            }
        }
        references
    }
}

/// Sizes of the store, for `banger cache du`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub records: usize,
    /// Distinct output bytes referenced by records.
    pub output_bytes: u64,
    /// Every byte under the store directory (index, content, scratch, temp files).
    pub disk_bytes: u64,
}

impl Store {
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let inventory = Inventory::scan(self)?;
        let output_bytes = inventory
            .output_references()
            .values()
            .map(|(_, size)| size)
            .sum();
        Ok(Usage {
            records: inventory.definitions.len(),
            output_bytes,
            disk_bytes: disk_usage(&self.dir)?,
        })
    }

    /// Fails with [`StoreError::Busy`] while a run holds the store (a dry run only reads,
    /// and does not wait).
    pub fn gc(&self, options: GcOptions) -> Result<GcReport, StoreError> {
        let _exclusive = if options.dry_run {
            None
        } else {
            Some(
                self.try_lease_exclusive()?
                    .ok_or_else(|| StoreError::Busy {
                        path: self.dir.clone(),
                    })?,
            )
        };
        let inventory = Inventory::scan(self)?;
        let mut references = inventory.output_references();
        let mut live: u64 = references.values().map(|(_, size)| size).sum();
        let mut report = GcReport::default();

        let mut by_age: Vec<(&Key, &DefinitionEntry)> = inventory.definitions.iter().collect();
        by_age.sort_by_key(|(key, entry)| (entry.last_used_ms, **key));
        let now = now_ms();
        let mut evicted_integrities: Vec<String> = Vec::new();
        for (key, entry) in by_age {
            if live <= options.max_size {
                break;
            }
            if inventory.roots.contains(key) {
                report.rooted += 1;
                continue;
            }
            report.evicted.push(entry.record.step_id.clone());
            let mut release = |record: &StepRecord| {
                for output in record.outputs.values() {
                    if let Some(slot) = references.get_mut(&output.integrity) {
                        slot.0 = slot.0.saturating_sub(1);
                        if slot.0 == 0 {
                            live -= slot.1;
                            report.freed_bytes += slot.1;
                            evicted_integrities.push(output.integrity.clone());
                        }
                    }
                }
            };
            release(&entry.record);
            let content_key = entry.record.content_key;
            let content_record = inventory.content_records.get(&content_key);
            if let Some(record) = content_record {
                release(record);
            }
            if options.dry_run {
                continue;
            }
            let def_entry = entry_name("def", &key.to_hex());
            cacache::index::delete(&self.dir, &def_entry).map_err(|source| {
                StoreError::WriteEntry {
                    entry: def_entry.clone(),
                    source,
                }
            })?;
            if content_record.is_some() {
                let content_entry = entry_name("content", &content_key.to_hex());
                cacache::index::delete(&self.dir, &content_entry).map_err(|source| {
                    StoreError::WriteEntry {
                        entry: content_entry.clone(),
                        source,
                    }
                })?;
            }
            self.write_json(&entry_name("evicted", &key.to_hex()), &now)?;
        }
        if !options.dry_run {
            for integrity in &evicted_integrities {
                let parsed = parse_integrity(integrity)?;
                cacache::remove_hash_sync(&self.dir, &parsed).map_err(|source| {
                    StoreError::WriteEntry {
                        entry: integrity.clone(),
                        source,
                    }
                })?;
            }
        }
        // Everything referenced by a surviving record or by an index entry stays.
        let mut keep: HashSet<PathBuf> = HashSet::new();
        for (integrity, (count, _)) in &references {
            if *count > 0 {
                keep.insert(content_path(&self.dir, &parse_integrity(integrity)?));
            }
        }
        for integrity in &inventory.entry_integrities {
            keep.insert(content_path(&self.dir, &parse_integrity(integrity)?));
        }
        report.orphan_bytes = sweep_orphans(&self.dir, &keep, options.dry_run)?;
        report.remaining_bytes = live;
        Ok(report)
    }
}

/// Mirrors cacache's content layout (`content-v2/<algo>/<hex[0..2]>/<hex[2..4]>/<hex[4..]>`);
/// a unit test fails if cacache ever changes it.
pub(super) fn content_path(dir: &Path, integrity: &cacache::Integrity) -> PathBuf {
    let (algorithm, hex) = integrity.to_hex();
    dir.join("content-v2")
        .join(algorithm.to_string())
        .join(&hex[0..2])
        .join(&hex[2..4])
        .join(&hex[4..])
}

fn sweep_orphans(dir: &Path, keep: &HashSet<PathBuf>, dry_run: bool) -> Result<u64, StoreError> {
    let mut freed = 0;
    let mut stack = vec![dir.join("content-v2"), dir.join("tmp")];
    while let Some(current) = stack.pop() {
        let entries = match std::fs::read_dir(&current) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(StoreError::Scan {
                    path: current,
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                stack.push(path);
            } else if !keep.contains(&path) {
                // A temp file younger than a minute may belong to a writer that is still running.
                let metadata = entry.metadata().ok();
                let young = metadata
                    .as_ref()
                    .and_then(|m| m.modified().ok())
                    .and_then(|modified| modified.elapsed().ok())
                    .is_some_and(|age| age.as_secs() < 60);
                if path.starts_with(dir.join("tmp")) && young {
                    continue;
                }
                freed += metadata.map_or(0, |m| m.len());
                if !dry_run {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
    Ok(freed)
}

fn disk_usage(dir: &Path) -> Result<u64, StoreError> {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(current) = stack.pop() {
        let entries = std::fs::read_dir(&current).map_err(|source| StoreError::Scan {
            path: current.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                stack.push(entry.path());
            } else {
                total += metadata.len();
            }
        }
    }
    Ok(total)
}
