//! The store: step outputs by content, one small record per step key.
//!
//! Layout (under the store directory, `~/.cache/banger/store` by default):
//! - a `cacache` cache: output bytes are content-addressed (sha256 integrity); records are index
//!   entries whose JSON metadata is the [`StepRecord`]. Every record key lives in the versioned
//!   namespace [`NAMESPACE`] (`steps-v1/def/<key>`, `steps-v1/content/<key>`), so a format change
//!   starts a new namespace instead of misreading old records.
//! - `scratch/`: one directory per running step (`step-<pid>-…`), on the same file system so
//!   publishing never crosses devices. Directories of dead processes are removed at start-up.
//! - `last-use-v1.log`: one line per run listing the keys it used, for LRU order in GC.
//! - `last-run-v1/`: per project, each step's definition on its last run, for `graph --why`.
//! - `locks-v1/<content key>.lock`: empty files `flock`ed while a process executes that step
//!   ([`Store::lock_step`]); kept (a few bytes of inode each), never deleted, since deleting a
//!   lock file another process waits on would let a third take a lock on a new one.
//! - `logs-v1/<definition key>.log`: the output of the last execution of a step that keeps a
//!   log (a `run` provisioning command), successful or not: `banger build --log STEP` shows it.
//!
//! Lifecycle of an output:
//! 1. A step writes files into its scratch directory.
//! 2. [`Store::publish_file`] hashes each file (one streaming read of its data) and renames
//!    it into content storage: never copied, never held in memory, read-only from then on.
//! 3. [`Store::commit`] writes the content-key record, then the definition-key record. Bytes
//!    first, record last: a reader that finds a record finds its bytes, and a record whose bytes
//!    are gone (evicted, deleted by hand) is treated as a miss ([`Miss::OutputMissing`]).
//! 4. A hit hands out outputs by hard link ([`Store::materialize`]): no bytes are copied.
//! 5. [`Store::gc`] evicts least-recently-used records above a size cap, never touching roots,
//!    and leaves a tombstone so `banger graph --why` can say "evicted".
//!
//! Known weaknesses: nothing is fsynced, so the atomicity holds against crashes of banger
//! (SIGKILL) but not against power loss; publishing relies on cacache's content layout
//! (`content-v2/sha256/..`), which a unit test pins; hits are not re-verified (that would read
//! every byte), so a stored file modified in place by root would go unnoticed.

mod gc;

pub use gc::{GcOptions, GcReport, Usage};

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::key::{Key, Params};

/// Version of the record namespace; bump when [`StepRecord`] changes incompatibly.
pub const NAMESPACE: &str = "steps-v1";

/// Errors from the store. Each names the key, path or integrity involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot take the store's use lock {path}")]
    Lease {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the store {path} is in use by a running build (in this or another banger process); \
         run `banger cache gc` again once it has finished"
    )]
    Busy { path: PathBuf },
    #[error("cannot lock step {key} in the store ({path})")]
    LockStep {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read store entry {entry}")]
    ReadEntry {
        entry: String,
        #[source]
        source: cacache::Error,
    },
    #[error("store entry {entry} is corrupt (`banger cache gc` removes it)")]
    CorruptEntry {
        entry: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write store entry {entry}")]
    WriteEntry {
        entry: String,
        #[source]
        source: cacache::Error,
    },
    #[error("cannot store output {path}")]
    Publish {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot link stored output {integrity} to {to}")]
    Materialize {
        integrity: String,
        to: PathBuf,
        #[source]
        source: cacache::Error,
    },
    #[error("stored output has an invalid integrity `{integrity}`")]
    BadIntegrity { integrity: String },
    #[error("cannot create a scratch directory in {path}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot scan the store at {path}")]
    Scan {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Directory of per-project last-run files (`<blake3(project)>.json`).
const LAST_RUN_DIR: &str = "last-run-v1";
/// Directory of step logs (`<definition key>.log`).
const LOG_DIR: &str = "logs-v1";
/// Directory of per-step lock files (`<content key>.lock`).
const LOCK_DIR: &str = "locks-v1";

/// A step's lock across processes ([`Store::lock_step`]); released on drop, or when the
/// process dies.
#[derive(Debug)]
pub struct StepLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// A step as it was defined on a project's last run: what `banger graph --why` compares the
/// current plan against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRun {
    pub definition_key: Key,
    pub kind: String,
    pub version: u32,
    pub params: Params,
    pub inputs: Vec<LastRunInput>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRunInput {
    pub name: String,
    pub step_id: String,
    pub definition_key: Key,
}

#[derive(Debug, Serialize, Deserialize)]
struct LastRunFile {
    project: String,
    steps: BTreeMap<String, LastRun>,
}

/// One stored output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRef {
    /// cacache integrity (`sha256-…`).
    pub integrity: String,
    pub size: u64,
}

/// An input as it was when the step ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedInput {
    pub name: String,
    pub step_id: String,
    pub definition_key: Key,
    pub output_digest: Key,
}

/// What the store knows about one execution of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step_id: String,
    pub kind: String,
    pub version: u32,
    pub params: Params,
    pub inputs: Vec<RecordedInput>,
    pub outputs: BTreeMap<String, OutputRef>,
    pub definition_key: Key,
    pub content_key: Key,
    pub output_digest: Key,
    /// Unix milliseconds when the step finished.
    pub created_ms: u64,
    pub duration_ms: u64,
}

impl StepRecord {
    pub fn total_size(&self) -> u64 {
        self.outputs.values().map(|output| output.size).sum()
    }
}

/// Why a lookup found nothing usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// No record under this key, ever (as far as the store knows).
    NoRecord,
    /// `banger cache gc` evicted the record at this time.
    Evicted { at_ms: u64 },
    /// The record exists but this output's bytes are gone.
    OutputMissing {
        record: Box<StepRecord>,
        output: String,
    },
}

/// Result of looking a key up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Hit(Box<StepRecord>),
    Miss(Miss),
}

impl Lookup {
    pub fn hit(self) -> Option<StepRecord> {
        match self {
            Lookup::Hit(record) => Some(*record),
            Lookup::Miss(_) => None,
        }
    }
}

/// Which of a step's two keys a lookup uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Definition,
    Content,
}

impl KeyKind {
    fn prefix(self) -> &'static str {
        match self {
            KeyKind::Definition => "def",
            KeyKind::Content => "content",
        }
    }
}

/// The file whose flock is the store's use lease (see [`Store::try_lease`]).
const LEASE_FILE: &str = "use.lock";

/// A lease on the store; released on drop (or when the process dies).
#[derive(Debug)]
pub struct StoreLease {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// A handle on the store directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

fn entry_name(kind: &str, rest: &str) -> String {
    format!("{NAMESPACE}/{kind}/{rest}")
}

impl Store {
    /// Opens (creating if needed) the store at `dir` and removes scratch directories left by
    /// processes that no longer exist.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("scratch")).map_err(|source| StoreError::Open {
            path: dir.clone(),
            source,
        })?;
        let store = Store { dir };
        store.remove_stale_scratch();
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks a step up by one of its keys; a record whose bytes are missing is a miss.
    pub fn lookup(&self, kind: KeyKind, key: &Key) -> Result<Lookup, StoreError> {
        let name = entry_name(kind.prefix(), &key.to_hex());
        let Some(record) = self.read_json::<StepRecord>(&name)? else {
            let tombstone = entry_name("evicted", &key.to_hex());
            return Ok(Lookup::Miss(match self.read_json::<u64>(&tombstone)? {
                Some(at_ms) => Miss::Evicted { at_ms },
                None => Miss::NoRecord,
            }));
        };
        for (output, reference) in &record.outputs {
            let integrity = parse_integrity(&reference.integrity)?;
            if !cacache::exists_sync(&self.dir, &integrity) {
                return Ok(Lookup::Miss(Miss::OutputMissing {
                    record: Box::new(record.clone()),
                    output: output.clone(),
                }));
            }
        }
        Ok(Lookup::Hit(Box::new(record)))
    }

    /// Moves a finished output file into content storage and returns its reference. The file
    /// is read once to hash it (its data only: holes, most of an image's free space, are
    /// hashed as zeros without reading them), then renamed into place (it is in the store's
    /// scratch area, so on the same file system): a multi-GiB image is never copied and never
    /// held in memory.
    /// Stored content is made read-only, since hits hand it out by hard link.
    pub fn publish_file(&self, path: &Path) -> Result<OutputRef, StoreError> {
        let publish_error = |source| StoreError::Publish {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(publish_error)?;
        let mut hasher = ssri::IntegrityOpts::new().algorithm(ssri::Algorithm::Sha256);
        let size = crate::sparse::read_sparse(&file, |chunk| {
            hasher.input(chunk.bytes);
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|error| match error {
            crate::sparse::SparseReadError::Read(error) => publish_error(error),
            crate::sparse::SparseReadError::Consumer(never) => match never {},
        })?;
        drop(file);
        self.publish_as(path, hasher.result(), size)
    }

    /// [`Store::publish_file`] for a file whose sha256 (lowercase hex) the caller computed
    /// over exactly its bytes as it wrote them, such as a download verified against its
    /// digest: the file is not read again.
    pub fn publish_hashed_file(
        &self,
        path: &Path,
        sha256_hex: &str,
    ) -> Result<OutputRef, StoreError> {
        let bad = || StoreError::BadIntegrity {
            integrity: format!("sha256 {sha256_hex}"),
        };
        if !is_sha256_hex(sha256_hex) {
            return Err(bad());
        }
        let integrity =
            ssri::Integrity::from_hex(sha256_hex, ssri::Algorithm::Sha256).map_err(|_| bad())?;
        let size = std::fs::metadata(path)
            .map_err(|source| StoreError::Publish {
                path: path.to_owned(),
                source,
            })?
            .len();
        self.publish_as(path, integrity, size)
    }

    /// Renames `path`, whose bytes hash to `integrity`, into content storage.
    fn publish_as(
        &self,
        path: &Path,
        integrity: ssri::Integrity,
        size: u64,
    ) -> Result<OutputRef, StoreError> {
        let publish_error = |source| StoreError::Publish {
            path: path.to_owned(),
            source,
        };
        let target = gc::content_path(&self.dir, &integrity);
        let reference = OutputRef {
            integrity: integrity.to_string(),
            size,
        };
        if target.exists() {
            // Identical bytes are already stored (early cutoff territory): keep one copy.
            let _ = std::fs::remove_file(path);
            return Ok(reference);
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(publish_error)?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
            .map_err(publish_error)?;
        match std::fs::rename(path, &target) {
            Ok(()) => Ok(reference),
            // A scratch directory on another file system (it never is, but be safe): copy.
            Err(error) if error.raw_os_error() == Some(libc::EXDEV) => {
                self.publish_by_copy(path, size)
            }
            Err(source) => Err(publish_error(source)),
        }
    }

    fn publish_by_copy(&self, path: &Path, size: u64) -> Result<OutputRef, StoreError> {
        let publish_error = |source| StoreError::Publish {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(publish_error)?;
        let writer = cacache::WriteOpts::new()
            .size(size as usize)
            .open_hash_sync(&self.dir)
            .map_err(|error| publish_error(std::io::Error::other(error)))?;
        let mut buffered = BufWriter::with_capacity(1 << 20, writer);
        std::io::copy(&mut file, &mut buffered).map_err(publish_error)?;
        buffered.flush().map_err(publish_error)?;
        let writer = buffered
            .into_inner()
            .map_err(|error| publish_error(error.into_error()))?;
        let integrity = writer
            .commit()
            .map_err(|error| publish_error(std::io::Error::other(error)))?;
        Ok(OutputRef {
            integrity: integrity.to_string(),
            size,
        })
    }

    /// Publishes a record under its content key, then its definition key. Call only after
    /// every output has been published.
    pub fn commit(&self, record: &StepRecord) -> Result<(), StoreError> {
        self.write_json(&entry_name("content", &record.content_key.to_hex()), record)?;
        self.alias(record, &record.definition_key)
    }

    /// Publishes a record under its content key only: for steps downstream of a never-cached
    /// step, whose definition key does not pin what they read.
    pub fn commit_content_only(&self, record: &StepRecord) -> Result<(), StoreError> {
        self.write_json(&entry_name("content", &record.content_key.to_hex()), record)
    }

    /// Records `record` under another definition key: after early cutoff, the new definition
    /// key reuses the outputs found by content key.
    pub fn alias(&self, record: &StepRecord, definition_key: &Key) -> Result<(), StoreError> {
        let mut aliased = record.clone();
        aliased.definition_key = *definition_key;
        self.write_json(&entry_name("def", &definition_key.to_hex()), &aliased)
    }

    /// Makes a stored output available at `to` by hard link: no bytes are copied or read (the
    /// content was hashed when it was published, and is read-only since). The result is shared
    /// with the store: copy it before modifying it.
    pub fn materialize(&self, output: &OutputRef, to: &Path) -> Result<(), StoreError> {
        let integrity = parse_integrity(&output.integrity)?;
        cacache::hard_link_hash_unchecked_sync(&self.dir, &integrity, to).map_err(|source| {
            StoreError::Materialize {
                integrity: output.integrity.clone(),
                to: to.to_owned(),
                source,
            }
        })
    }

    /// The stored file of `output`, to read in place (uploads): read-only, and valid while
    /// the caller holds the store's lease ([`Store::lease`]). An error if it is gone.
    pub fn content_file(&self, output: &OutputRef) -> Result<PathBuf, StoreError> {
        let integrity = parse_integrity(&output.integrity)?;
        let path = gc::content_path(&self.dir, &integrity);
        match std::fs::metadata(&path) {
            Ok(metadata) if metadata.len() == output.size => Ok(path),
            Ok(_) => Err(StoreError::Publish {
                path,
                source: std::io::Error::other(format!(
                    "the stored file is not {} bytes long",
                    output.size
                )),
            }),
            Err(source) => Err(StoreError::Publish { path, source }),
        }
    }

    /// What each step of `project` looked like on its last successful run (for
    /// `banger graph --why`). Empty when the project never ran.
    pub fn last_runs(&self, project: &str) -> Result<BTreeMap<String, LastRun>, StoreError> {
        let path = self.last_runs_path(project);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(BTreeMap::new());
            }
            Err(source) => return Err(StoreError::Scan { path, source }),
        };
        let file: LastRunFile =
            serde_json::from_str(&text).map_err(|source| StoreError::CorruptEntry {
                entry: path.display().to_string(),
                source,
            })?;
        Ok(file.steps)
    }

    /// Merges `runs` into the project's last-run file (one atomic rewrite, skipped when nothing
    /// changed). Concurrent runs of one project may lose each other's update; that only makes
    /// `--why` compare against an older run.
    pub fn update_last_runs(
        &self,
        project: &str,
        runs: impl IntoIterator<Item = (String, LastRun)>,
    ) -> Result<(), StoreError> {
        let mut steps = self.last_runs(project).unwrap_or_default();
        let mut changed = false;
        for (step_id, run) in runs {
            if steps.get(&step_id) != Some(&run) {
                steps.insert(step_id, run);
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        let path = self.last_runs_path(project);
        let dir = path.parent().unwrap_or(&self.dir).to_owned();
        let write_error = |source| StoreError::Publish {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(write_error)?;
        let file = LastRunFile {
            project: project.to_owned(),
            steps,
        };
        let json = serde_json::to_vec(&file).map_err(|source| StoreError::CorruptEntry {
            entry: path.display().to_string(),
            source,
        })?;
        let mut temp = tempfile::NamedTempFile::new_in(&dir).map_err(write_error)?;
        temp.write_all(&json).map_err(write_error)?;
        temp.persist(&path)
            .map_err(|error| write_error(error.error))?;
        Ok(())
    }

    fn last_runs_path(&self, project: &str) -> PathBuf {
        let digest = blake3::hash(project.as_bytes()).to_hex();
        self.dir
            .join(LAST_RUN_DIR)
            .join(format!("{}.json", &digest[..32]))
    }

    /// Notes that these definition keys were used now (LRU order for GC). One append per run.
    pub fn touch(&self, keys: &[Key]) -> Result<(), StoreError> {
        self.touch_at(keys, now_ms())
    }

    /// [`Store::touch`] at a given time (tests need distinct times within one millisecond).
    pub(crate) fn touch_at(&self, keys: &[Key], at_ms: u64) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(gc::LAST_USE_LOG);
        let mut line = at_ms.to_string();
        for key in keys {
            line.push(' ');
            line.push_str(&key.to_hex());
        }
        line.push('\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| StoreError::Publish {
                path: path.clone(),
                source,
            })?;
        file.write_all(line.as_bytes())
            .map_err(|source| StoreError::Publish { path, source })
    }

    /// Pins definition keys under a root name (an image in use, a running VM, a pinned
    /// bundle): GC never evicts them. An empty list removes the root.
    pub fn set_root(&self, name: &str, keys: &[Key]) -> Result<(), StoreError> {
        let entry = entry_name("root", name);
        if keys.is_empty() {
            return cacache::index::delete(&self.dir, &entry)
                .map_err(|source| StoreError::WriteEntry { entry, source });
        }
        self.write_json(&entry, &keys)
    }

    /// Where the log of the step with `definition_key` is kept (it may not exist).
    pub fn step_log_path(&self, definition_key: &Key) -> PathBuf {
        self.dir
            .join(LOG_DIR)
            .join(format!("{}.log", definition_key.to_hex()))
    }

    /// Waits until no other process executes the step with content key `key`, and holds
    /// it: two processes that need one step build it once (the second finds it stored once
    /// it gets the lock). An advisory `flock` on `locks-v1/<key>.lock`, so a process that
    /// dies releases it. Blocks: call it off the async threads.
    pub fn lock_step(&self, key: &Key) -> Result<StepLock, StoreError> {
        self.step_lock(key, nix::fcntl::FlockArg::LockExclusive)
            .map(|lock| lock.expect("a blocking lock is taken or fails"))
    }

    /// [`Store::lock_step`] if no other process holds it now; `None` if one does.
    pub fn try_lock_step(&self, key: &Key) -> Result<Option<StepLock>, StoreError> {
        self.step_lock(key, nix::fcntl::FlockArg::LockExclusiveNonblock)
    }

    fn step_lock(
        &self,
        key: &Key,
        how: nix::fcntl::FlockArg,
    ) -> Result<Option<StepLock>, StoreError> {
        let dir = self.dir.join(LOCK_DIR);
        let path = dir.join(format!("{}.lock", key.to_hex()));
        let error = |source| StoreError::LockStep {
            key: key.to_hex(),
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(error)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(error)?;
        match nix::fcntl::Flock::lock(file, how) {
            Ok(lock) => Ok(Some(StepLock { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(error(errno.into())),
        }
    }

    /// A shared lease on the store, held by every engine run for its whole length, so that
    /// `gc` (which takes it exclusively) never sweeps an output a run has published but not
    /// yet recorded, nor one it is about to read. `None` while a GC holds it. Never blocks.
    pub fn try_lease(&self) -> Result<Option<StoreLease>, StoreError> {
        self.lease_with(nix::fcntl::FlockArg::LockSharedNonblock)
    }

    /// [`Store::try_lease`], waiting for a running GC. Blocks: call it off the async threads.
    pub fn lease(&self) -> Result<StoreLease, StoreError> {
        self.lease_with(nix::fcntl::FlockArg::LockShared)
            .map(|lease| lease.expect("a blocking lock is taken or fails"))
    }

    /// [`Store::lease`] for async callers: taken at once when no GC runs, else waited for on
    /// a blocking thread.
    pub async fn lease_async(&self) -> Result<StoreLease, StoreError> {
        if let Some(lease) = self.try_lease()? {
            return Ok(lease);
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.lease())
            .await
            .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
    }

    /// The exclusive lease GC holds; `None` while any run holds a shared one.
    fn try_lease_exclusive(&self) -> Result<Option<StoreLease>, StoreError> {
        self.lease_with(nix::fcntl::FlockArg::LockExclusiveNonblock)
    }

    fn lease_with(&self, how: nix::fcntl::FlockArg) -> Result<Option<StoreLease>, StoreError> {
        let path = self.dir.join(LEASE_FILE);
        let error = |source| StoreError::Lease {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(error)?;
        match nix::fcntl::Flock::lock(file, how) {
            Ok(lock) => Ok(Some(StoreLease { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(error(errno.into())),
        }
    }

    /// A fresh scratch directory for one step, removed when the returned guard drops.
    pub fn scratch(&self) -> Result<tempfile::TempDir, StoreError> {
        let parent = self.dir.join("scratch");
        tempfile::Builder::new()
            .prefix(&format!("step-{}-", std::process::id()))
            .tempdir_in(&parent)
            .map_err(|source| StoreError::Scratch {
                path: parent,
                source,
            })
    }

    /// Every definition-key record, with the time it was last used.
    pub fn records(&self) -> Result<Vec<(StepRecord, u64)>, StoreError> {
        let inventory = gc::Inventory::scan(self)?;
        let mut records: Vec<(StepRecord, u64)> = inventory
            .definitions
            .into_values()
            .map(|entry| (entry.record, entry.last_used_ms))
            .collect();
        records.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.step_id.cmp(&b.0.step_id)));
        Ok(records)
    }

    fn remove_stale_scratch(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("scratch")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|name| name.strip_prefix("step-"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<i32>().ok())
            else {
                continue;
            };
            if !process_alive(pid) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        entry: &str,
    ) -> Result<Option<T>, StoreError> {
        let found =
            cacache::index::find(&self.dir, entry).map_err(|source| StoreError::ReadEntry {
                entry: entry.to_owned(),
                source,
            })?;
        match found {
            None => Ok(None),
            Some(metadata) => {
                serde_json::from_value(metadata.metadata)
                    .map(Some)
                    .map_err(|source| StoreError::CorruptEntry {
                        entry: entry.to_owned(),
                        source,
                    })
            }
        }
    }

    fn write_json<T: Serialize>(&self, entry: &str, value: &T) -> Result<(), StoreError> {
        let json = serde_json::to_value(value).map_err(|source| StoreError::CorruptEntry {
            entry: entry.to_owned(),
            source,
        })?;
        let bytes = json.to_string().into_bytes();
        let write_error = |source| StoreError::WriteEntry {
            entry: entry.to_owned(),
            source,
        };
        let mut writer = cacache::WriteOpts::new()
            .size(bytes.len())
            .metadata(json)
            .open_sync(&self.dir, entry)
            .map_err(write_error)?;
        writer
            .write_all(&bytes)
            .map_err(|error| write_error(cacache::Error::IoError(error, entry.to_owned())))?;
        writer.commit().map_err(write_error)?;
        Ok(())
    }
}

/// Whether `text` is a sha256 digest as banger writes them: 64 lowercase hex digits.
pub(crate) fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_integrity(text: &str) -> Result<cacache::Integrity, StoreError> {
    text.parse().map_err(|_| StoreError::BadIntegrity {
        integrity: text.to_owned(),
    })
}

pub(crate) fn process_alive(pid: i32) -> bool {
    // Signal 0 checks existence without sending anything; EPERM still means it exists.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(errno) => errno == nix::errno::Errno::EPERM,
    }
}

impl crate::error::Classify for StoreError {
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::Environment
    }
}

#[cfg(test)]
mod tests;
