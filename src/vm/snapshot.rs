//! Memory snapshots of a booted QEMU guest, and new VMs restored from them.
//!
//! A snapshot is QEMU's migration stream (RAM, vCPUs, every device) written to a file while
//! the guest is paused, plus copies of the VM's two writable disks taken at the same moment
//! (the guest's page cache and file systems refer to their contents). Restoring starts QEMU
//! with the same machine and `-incoming unix:SOCKET`, feeds the file into that socket, and
//! the guest runs on from where it was saved, with disks that are copies of the saved ones.
//!
//! 1. [`save`]: `stop`, `migrate` to a unix socket this process listens on, the stream copied
//!    to `state.partial`, renamed into place only once QEMU says `completed`. QEMU is left
//!    paused (`postmigrate`) with its disks flushed, so the caller copies them, then
//!    [`resume`]s the guest (or quits it).
//! 2. [`restore`]: connects to QEMU's incoming socket, sends the file, waits until the guest
//!    runs.
//!
//! What must match between the saved and the restoring QEMU: its version, the machine and
//! its options, vCPUs, memory, and the devices in order (QEMU refuses a stream that does not
//! fit, and [`restore`] reports its words). vhost-user devices cannot migrate, so a VM that
//! is saved reaches its agent over virtio-serial, not vsock. Paths (disks, sockets, the
//! console log) and host port forwards may differ: they are not part of the stream.
//!
//! QEMU 7.2 caps migration at 32 MiB/s by default; [`save`] lifts the cap, since the stream
//! goes to a local file, not over a network.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::qmp::{Qmp, QmpError};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU's migration {status}: {reason}")]
    Migration { status: String, reason: String },
    #[error("{what} took longer than {} s", limit.as_secs())]
    Timeout { what: &'static str, limit: Duration },
}

/// How long a save or a restore may take: the stream is at most the guest's memory, read
/// from or written to a local file.
const TRANSFER_LIMIT: Duration = Duration::from_secs(300);

/// What [`save`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// The size of the state file.
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Pauses the guest of the QEMU at `qmp_socket` and writes its state to `state` (through a
/// socket in `socket_dir`). QEMU stays paused, also when this fails: call [`resume`] after.
pub async fn save(
    qmp_socket: &Path,
    socket_dir: &Path,
    state: &Path,
) -> Result<Saved, SnapshotError> {
    let started = Instant::now();
    let partial = state.with_extension("partial");
    let result = save_to(qmp_socket, socket_dir, &partial).await;
    let bytes = match result {
        Ok(bytes) => bytes,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    std::fs::rename(&partial, state).map_err(|source| {
        let _ = std::fs::remove_file(&partial);
        SnapshotError::Io {
            what: "cannot publish the snapshot",
            path: state.to_owned(),
            source,
        }
    })?;
    Ok(Saved {
        bytes,
        elapsed: started.elapsed(),
    })
}

async fn save_to(
    qmp_socket: &Path,
    socket_dir: &Path,
    partial: &Path,
) -> Result<u64, SnapshotError> {
    let mut qmp = Qmp::connect(qmp_socket).await?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 1u64 << 40 })),
    )
    .await?;
    qmp.execute("stop", None).await?;
    let socket = socket_dir.join("snapshot-out.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket).map_err(|source| SnapshotError::Io {
        what: "cannot listen on",
        path: socket.clone(),
        source,
    })?;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| SnapshotError::Io { what, path, source }
    };
    let file = tokio::fs::File::create(partial)
        .await
        .map_err(io("cannot create", partial))?;
    let partial_path = partial.to_owned();
    let receive = tokio::spawn(async move {
        let (mut stream, _) = listener
            .accept()
            .await
            .map_err(io("cannot accept QEMU's migration on", &socket))?;
        let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let bytes = tokio::io::copy(&mut stream, &mut file)
            .await
            .map_err(io("cannot write", &partial_path))?;
        file.flush()
            .await
            .map_err(io("cannot write", &partial_path))?;
        file.get_ref()
            .sync_all()
            .await
            .map_err(io("cannot write", &partial_path))?;
        let _ = std::fs::remove_file(&socket);
        Ok::<u64, SnapshotError>(bytes)
    });
    let uri = format!("unix:{}", socket_dir.join("snapshot-out.sock").display());
    if let Err(error) = qmp.execute("migrate", Some(json!({ "uri": uri }))).await {
        receive.abort();
        return Err(error.into());
    }
    let bytes = match tokio::time::timeout(TRANSFER_LIMIT, receive).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => {
            return Err(SnapshotError::Migration {
                status: "failed".into(),
                reason: join.to_string(),
            });
        }
        Err(_) => {
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(SnapshotError::Timeout {
                what: "saving the guest's memory",
                limit: TRANSFER_LIMIT,
            });
        }
    };
    wait_for_migration(&mut qmp).await?;
    Ok(bytes)
}

/// Polls `query-migrate` until it says `completed`; `failed` or `cancelled` is an error with
/// QEMU's reason.
async fn wait_for_migration(qmp: &mut Qmp) -> Result<(), SnapshotError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = qmp.execute("query-migrate", None).await?;
        let status = reply["status"].as_str().unwrap_or("none").to_owned();
        match status.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(SnapshotError::Migration {
                    status,
                    reason: reply["error-desc"]
                        .as_str()
                        .unwrap_or("QEMU gave no reason")
                        .to_owned(),
                });
            }
            _ if Instant::now() >= deadline => {
                return Err(SnapshotError::Timeout {
                    what: "finishing the migration",
                    limit: Duration::from_secs(30),
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Lets a guest paused by [`save`] run on.
pub async fn resume(qmp_socket: &Path) -> Result<(), SnapshotError> {
    Qmp::connect(qmp_socket)
        .await?
        .execute("cont", None)
        .await?;
    Ok(())
}

/// Sends `state` into the QEMU at `qmp_socket`, started with `-incoming unix:{incoming}`, and
/// waits until its guest runs. Returns how long that took.
pub async fn restore(
    qmp_socket: &Path,
    incoming: &Path,
    state: &Path,
) -> Result<Duration, SnapshotError> {
    let started = Instant::now();
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| SnapshotError::Io { what, path, source }
    };
    let file = std::fs::File::open(state).map_err(io("cannot open the snapshot", state))?;
    // QEMU listens for the stream only after its control socket is up.
    let listening = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match tokio::net::UnixStream::connect(incoming).await {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < listening => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(source) => {
                return Err(io(
                    "cannot connect to QEMU's incoming migration socket",
                    incoming,
                )(source));
            }
        }
    };
    let mut qmp = Qmp::connect(qmp_socket).await?;
    // One blocking copy, which std does with sendfile(2) in the kernel: tokio's copy from a
    // file hops to a blocking thread for every 8 KiB read, which made the load of a 112 MiB
    // stream take up to 2 s on a busy host (docs/decisions.md).
    let stream = stream
        .into_std()
        .and_then(|stream| stream.set_nonblocking(false).map(|()| stream))
        .map_err(io("cannot send the snapshot to QEMU from", state))?;
    let send = tokio::task::spawn_blocking(move || {
        let (mut file, mut stream) = (file, stream);
        std::io::copy(&mut file, &mut stream)?;
        stream.shutdown(std::net::Shutdown::Write)
    });
    match tokio::time::timeout(TRANSFER_LIMIT, send).await {
        Ok(Ok(result)) => result.map_err(io("cannot send the snapshot to QEMU from", state))?,
        Ok(Err(join)) => {
            return Err(SnapshotError::Migration {
                status: "failed".into(),
                reason: join.to_string(),
            });
        }
        Err(_) => {
            return Err(SnapshotError::Timeout {
                what: "loading the guest's memory",
                limit: TRANSFER_LIMIT,
            });
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = qmp.status().await?;
        match status.as_str() {
            "running" => return Ok(started.elapsed()),
            "inmigrate" | "prelaunch" | "restore-vm" | "finish-migrate"
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The guest was paused when it was saved, and QEMU restores that state.
            "paused" | "postmigrate"
                if qmp.execute("query-migrate", None).await?["status"] == "completed" =>
            {
                qmp.execute("cont", None).await?;
            }
            _ if Instant::now() >= deadline => {
                return Err(SnapshotError::Timeout {
                    what: "starting the restored guest",
                    limit: Duration::from_secs(60),
                });
            }
            other => {
                let reply = qmp.execute("query-migrate", None).await.unwrap_or_default();
                return Err(SnapshotError::Migration {
                    status: format!("left the guest {other}"),
                    reason: reply["error-desc"]
                        .as_str()
                        .unwrap_or("the stream did not fit this machine (see QEMU's log)")
                        .to_owned(),
                });
            }
        }
    }
}

/// Version of the snapshot directory layout and of what a snapshot's key covers; bump when
/// either changes, so old snapshots are simply never found (and `cache gc` removes them).
/// 2: the boot files are named by their store integrity, not by a blake3 of their bytes.
/// 3: `vmm` (QEMU's or Firecracker's version) in place of `qemu`; Firecracker's `memory`.
pub const SNAPSHOT_FORMAT: u32 = 3;

/// Everything a saved guest depends on: a snapshot is reused only when all of it matches.
/// Its blake3 over the JSON form is the snapshot's key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotSpec {
    pub format: u32,
    /// banger's version: the machine's command line and the guest agent come with it.
    pub banger: String,
    /// The first line of the VMM's `--version` (`QEMU emulator version …`, `Firecracker
    /// v…`): snapshots do not cross VMMs or their versions.
    pub vmm: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The TSC rate on the kernel command line under TCG (the host's).
    pub tsc_khz: Option<u64>,
    /// Store integrities of the image and the boot files.
    pub rootfs: String,
    pub vmlinux: String,
    pub initrd: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    pub network: crate::spec::NetworkMode,
}

impl SnapshotSpec {
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&json).to_hex().to_string()
    }
}

/// The first line of `binary --version` (QEMU, Firecracker), or `None` when it cannot be
/// run.
pub fn vmm_version(binary: impl AsRef<std::ffi::OsStr>) -> Option<String> {
    let output = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().next()?.trim();
    (output.status.success() && !line.is_empty()).then(|| line.to_owned())
}

/// Saved snapshots, one directory per key under `dir` (`<cache>/snapshots-v1`):
/// `state` (QEMU's stream, or Firecracker's device and vCPU state), `memory` (Firecracker's
/// guest memory; QEMU's is in its stream), `overlay.ext4` and `work.ext4` (the writable
/// disks at the save),
/// `snapshot.json` (the [`SnapshotSpec`], sizes, when). A snapshot is written in a
/// `.partial-*` directory beside them and renamed into place whole, so one that exists is
/// complete; partial directories of processes that died are removed by [`Snapshots::open`].
#[derive(Debug, Clone)]
pub struct Snapshots {
    dir: PathBuf,
}

/// A complete saved snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSnapshot {
    pub key: String,
    pub dir: PathBuf,
    pub state: PathBuf,
    /// Firecracker's guest memory (absent for QEMU).
    pub memory: PathBuf,
    pub disks: super::storage::VmDisks,
}

impl SavedSnapshot {
    fn in_dir(key: &str, dir: PathBuf) -> SavedSnapshot {
        SavedSnapshot {
            key: key.to_owned(),
            state: dir.join("state"),
            memory: dir.join("memory"),
            disks: super::storage::VmDisks::in_dir(&dir),
            dir,
        }
    }

    /// Records that a VM started from this snapshot now: the modification time of its
    /// `snapshot.json`, by which [`least_recently_used_beyond`] chooses what to evict.
    pub fn mark_used(&self) -> std::io::Result<()> {
        std::fs::File::options()
            .write(true)
            .open(self.dir.join("snapshot.json"))?
            .set_modified(std::time::SystemTime::now())
    }

    /// Firecracker's names for the state and memory files.
    pub fn firecracker_files(&self) -> super::firecracker::SnapshotFiles {
        super::firecracker::SnapshotFiles {
            state: self.state.clone(),
            memory: self.memory.clone(),
        }
    }

    /// The state (and memory) file and both disks on disk: bytes on disk (sparse), not
    /// apparent sizes.
    pub fn disk_usage(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        [
            &self.state,
            &self.memory,
            &self.disks.overlay,
            &self.disks.work,
        ]
        .iter()
        .filter_map(|path| std::fs::metadata(path).ok())
        .map(|meta| meta.blocks() * 512)
        .sum()
    }
}

/// A snapshot being written; dropped unpublished, its directory is removed.
#[derive(Debug)]
pub struct PendingSnapshot {
    key: String,
    temporary: tempfile::TempDir,
    final_dir: PathBuf,
}

impl PendingSnapshot {
    /// Where the files go before [`PendingSnapshot::publish`].
    pub fn files(&self) -> SavedSnapshot {
        SavedSnapshot::in_dir(&self.key, self.temporary.path().to_owned())
    }

    /// Writes `snapshot.json` and renames the directory into place. Another process that
    /// published the same key first wins; this one's files are dropped.
    pub fn publish(self, spec: &SnapshotSpec) -> Result<SavedSnapshot, SnapshotError> {
        let files = self.files();
        let meta = serde_json::json!({
            "spec": spec,
            "key": self.key,
            "created_ms": crate::store::now_ms(),
            "disk_usage": files.disk_usage(),
        });
        let meta_path = self.temporary.path().join("snapshot.json");
        std::fs::write(&meta_path, meta.to_string()).map_err(|source| SnapshotError::Io {
            what: "cannot write",
            path: meta_path,
            source,
        })?;
        let temporary = self.temporary.keep();
        match std::fs::rename(&temporary, &self.final_dir) {
            Ok(()) => Ok(SavedSnapshot::in_dir(&self.key, self.final_dir)),
            Err(_) if self.final_dir.join("snapshot.json").exists() => {
                let _ = std::fs::remove_dir_all(&temporary);
                Ok(SavedSnapshot::in_dir(&self.key, self.final_dir))
            }
            Err(source) => {
                let _ = std::fs::remove_dir_all(&temporary);
                Err(SnapshotError::Io {
                    what: "cannot publish the snapshot",
                    path: self.final_dir,
                    source,
                })
            }
        }
    }
}

impl Snapshots {
    /// The snapshots under `dir`, created if missing; partial snapshots of dead processes
    /// are removed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Snapshots, SnapshotError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| SnapshotError::Io {
            what: "cannot create",
            path: dir.clone(),
            source,
        })?;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = partial_owner(&name)
                    && !crate::store::process_alive(pid)
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(Snapshots { dir })
    }

    /// The complete snapshot saved under `key`, if there is one.
    pub fn find(&self, key: &str) -> Option<SavedSnapshot> {
        let dir = self.dir.join(key);
        dir.join("snapshot.json")
            .exists()
            .then(|| SavedSnapshot::in_dir(key, dir))
    }

    /// A new snapshot for `key`, written beside the others until published.
    pub fn begin(&self, key: &str) -> Result<PendingSnapshot, SnapshotError> {
        let temporary = tempfile::Builder::new()
            .prefix(&format!(".partial-{}-", std::process::id()))
            .tempdir_in(&self.dir)
            .map_err(|source| SnapshotError::Io {
                what: "cannot create a directory in",
                path: self.dir.clone(),
                source,
            })?;
        Ok(PendingSnapshot {
            key: key.to_owned(),
            temporary,
            final_dir: self.dir.join(key),
        })
    }

    /// Every complete snapshot, oldest first.
    pub fn list(&self) -> Result<Vec<StoredSnapshot>, SnapshotError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| SnapshotError::Io {
            what: "cannot list",
            path: self.dir.clone(),
            source,
        })?;
        let mut snapshots = Vec::new();
        for entry in entries.flatten() {
            let key = entry.file_name().to_string_lossy().into_owned();
            if key.starts_with('.') {
                continue;
            }
            let Some(saved) = self.find(&key) else {
                continue;
            };
            let meta_path = saved.dir.join("snapshot.json");
            let meta: Option<serde_json::Value> = std::fs::read(&meta_path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            let used_ms = std::fs::metadata(&meta_path)
                .and_then(|metadata| metadata.modified())
                .ok()
                .and_then(|modified| modified.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|since| since.as_millis() as u64);
            snapshots.push(StoredSnapshot {
                spec: meta
                    .as_ref()
                    .map(|meta| meta["spec"].clone())
                    .filter(|spec| spec.is_object()),
                created_ms: meta.as_ref().and_then(|meta| meta["created_ms"].as_u64()),
                used_ms,
                disk_usage: saved.disk_usage(),
                key,
            });
        }
        snapshots.sort_by(|a, b| (a.created_ms, &a.key).cmp(&(b.created_ms, &b.key)));
        Ok(snapshots)
    }

    /// Why no snapshot is saved under `spec`'s key: none of its image, or how the newest one
    /// of its image differs (the parts of the key that changed, saved value first).
    pub fn why_none_fits(&self, spec: &SnapshotSpec) -> String {
        let wanted = serde_json::to_value(spec).unwrap_or_default();
        let newest_of_image = self.list().ok().and_then(|snapshots| {
            snapshots.into_iter().rev().find_map(|snapshot| {
                snapshot
                    .spec
                    .filter(|saved| saved["rootfs"] == wanted["rootfs"])
            })
        });
        let Some(saved) = newest_of_image else {
            return "none is saved of its image (this run saves one)".to_owned();
        };
        let changes: Vec<String> = wanted
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(field, value)| &saved[field.as_str()] != *value)
            .map(|(field, value)| format!("{field} {} (now {value})", saved[field.as_str()]))
            .collect();
        format!(
            "the one saved of its image differs in {} (this run saves another)",
            changes.join(", ")
        )
    }

    /// Removes the least recently used snapshots, never `keep` (the one just saved), until
    /// all of them use at most `max_bytes` on disk; returns the removed ones.
    pub fn evict_to_fit(
        &self,
        max_bytes: u64,
        keep: &str,
    ) -> Result<Vec<StoredSnapshot>, SnapshotError> {
        let listed = self.list()?;
        let doomed: Vec<StoredSnapshot> =
            least_recently_used_beyond(&listed, max_bytes, Some(keep))
                .into_iter()
                .cloned()
                .collect();
        for snapshot in &doomed {
            self.remove(&snapshot.key);
        }
        Ok(doomed)
    }

    /// Deletes the snapshot of `key` (one that failed to restore).
    pub fn remove(&self, key: &str) {
        let dir = self.dir.join(key);
        // Renamed away first, so no reader ever sees it half-deleted.
        let doomed = self
            .dir
            .join(format!(".partial-{}-removed-{key}", std::process::id()));
        if std::fs::rename(&dir, &doomed).is_ok() {
            let _ = std::fs::remove_dir_all(&doomed);
        }
    }
}

/// The first 12 hex digits of a snapshot's key: how notes and `cache gc` name it.
pub fn short_key(key: &str) -> &str {
    &key[..key.len().min(12)]
}

/// The snapshots to remove, least recently used first, so that the rest use at most
/// `max_bytes` on disk; `keep` is never one of them, even when it alone is over.
pub fn least_recently_used_beyond<'a>(
    snapshots: &'a [StoredSnapshot],
    max_bytes: u64,
    keep: Option<&str>,
) -> Vec<&'a StoredSnapshot> {
    let mut total: u64 = snapshots.iter().map(|snapshot| snapshot.disk_usage).sum();
    let mut by_use: Vec<&StoredSnapshot> = snapshots
        .iter()
        .filter(|snapshot| Some(snapshot.key.as_str()) != keep)
        .collect();
    by_use.sort_by_key(|snapshot| (snapshot.used_ms.or(snapshot.created_ms), &snapshot.key));
    let mut doomed = Vec::new();
    for snapshot in by_use {
        if total <= max_bytes {
            break;
        }
        total -= snapshot.disk_usage;
        doomed.push(snapshot);
    }
    doomed
}

/// A complete snapshot, as [`Snapshots::list`] finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSnapshot {
    pub key: String,
    /// The key's parts as saved (`snapshot.json`'s `spec`); `None` when unreadable.
    pub spec: Option<serde_json::Value>,
    pub created_ms: Option<u64>,
    /// When a VM last started from it, or when it was saved ([`SavedSnapshot::mark_used`]).
    pub used_ms: Option<u64>,
    /// Bytes on disk (sparse).
    pub disk_usage: u64,
}

/// What snapshots would be keyed with on this host now: a snapshot that differs in any of
/// it can never be found again ([`StoredSnapshot::stale_reason`]).
#[derive(Debug, Clone, Default)]
pub struct SnapshotCurrency {
    pub banger: String,
    /// The installed QEMU's `--version` line; `None` (not installed) judges nothing.
    pub qemu: Option<String>,
    /// The installed Firecracker's, likewise.
    pub firecracker: Option<String>,
    /// Rootfs integrities of the images recorded now.
    pub rootfs: std::collections::HashSet<String>,
}

impl SnapshotCurrency {
    /// This banger, the QEMU and Firecracker it would run, and `rootfs` (the recorded
    /// images').
    pub fn now(rootfs: impl IntoIterator<Item = String>) -> SnapshotCurrency {
        SnapshotCurrency {
            banger: env!("CARGO_PKG_VERSION").to_owned(),
            qemu: vmm_version(super::qemu::binary()),
            firecracker: crate::env::find_program("firecracker").and_then(vmm_version),
            rootfs: rootfs.into_iter().collect(),
        }
    }
}

impl StoredSnapshot {
    /// Why no VM can start from this snapshot any more, or `None` when one still could.
    pub fn stale_reason(&self, now: &SnapshotCurrency) -> Option<String> {
        let Some(spec) = &self.spec else {
            return Some("its snapshot.json cannot be read".to_owned());
        };
        let text = |field: &str| spec[field].as_str().unwrap_or("?").to_owned();
        if spec["format"].as_u64() != Some(u64::from(SNAPSHOT_FORMAT)) {
            return Some(format!(
                "saved in layout {}, not {SNAPSHOT_FORMAT}",
                spec["format"]
            ));
        }
        if text("banger") != now.banger {
            return Some(format!(
                "saved by banger {}, this is {}",
                text("banger"),
                now.banger
            ));
        }
        let saved_by = text("vmm");
        let (installed, vmm) = if saved_by.starts_with("Firecracker") {
            (&now.firecracker, "Firecracker")
        } else {
            (&now.qemu, "QEMU")
        };
        if let Some(installed) = installed
            && &saved_by != installed
        {
            return Some(format!("saved by {saved_by}, {vmm} is now {installed}"));
        }
        if !now.rootfs.contains(&text("rootfs")) {
            return Some("its image is no longer recorded".to_owned());
        }
        None
    }
}

/// The pid in a `.partial-<pid>-…` directory name.
fn partial_owner(name: &str) -> Option<i32> {
    name.strip_prefix(".partial-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rootfs: &str) -> SnapshotSpec {
        SnapshotSpec {
            format: SNAPSHOT_FORMAT,
            banger: "1.0.0".into(),
            vmm: "QEMU emulator version 7.2.0".into(),
            accel: "tcg".into(),
            tsc_khz: Some(2_000_000),
            rootfs: rootfs.into(),
            vmlinux: "v".into(),
            initrd: "i".into(),
            vcpus: 1,
            memory_mib: 1024,
            disk_bytes: 8 << 30,
            network: crate::spec::NetworkMode::User,
        }
    }

    fn currency(banger: &str, qemu: Option<&str>, rootfs: &[&str]) -> SnapshotCurrency {
        SnapshotCurrency {
            banger: banger.into(),
            qemu: qemu.map(str::to_owned),
            firecracker: Some("Firecracker v1.12.0".into()),
            rootfs: rootfs
                .iter()
                .map(|integrity| (*integrity).to_owned())
                .collect(),
        }
    }

    #[test]
    fn only_published_snapshots_are_listed_with_their_spec_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(dir.path()).unwrap();
        let saved = spec("sha256-a");
        let pending = snapshots.begin(&saved.key()).unwrap();
        std::fs::write(pending.files().state, vec![7u8; 64 << 10]).unwrap();
        pending.publish(&saved).unwrap();
        // A snapshot still being written, and a directory that is not a snapshot.
        let _unpublished = snapshots.begin("other").unwrap();
        std::fs::create_dir(dir.path().join("not-a-snapshot")).unwrap();

        let listed = snapshots.list().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].key, saved.key());
        assert_eq!(
            listed[0].spec.as_ref().unwrap(),
            &serde_json::to_value(&saved).unwrap()
        );
        assert!(listed[0].disk_usage >= 64 << 10);
        assert!(listed[0].created_ms.is_some());

        snapshots.remove(&saved.key());
        assert_eq!(snapshots.list().unwrap(), Vec::new());
        assert!(snapshots.find(&saved.key()).is_none());
    }

    #[test]
    fn the_least_recently_used_snapshots_go_first_and_never_the_one_kept() {
        let stored = |key: &str, created_ms: u64, used_ms: Option<u64>, mib: u64| StoredSnapshot {
            key: key.into(),
            spec: None,
            created_ms: Some(created_ms),
            used_ms,
            disk_usage: mib << 20,
        };
        let snapshots = [
            stored("old-but-used", 1, Some(50), 100),
            stored("newer-unused", 10, None, 100),
            stored("middle", 5, Some(20), 100),
            stored("just-saved", 60, Some(60), 100),
        ];
        let keys = |max_mib: u64, keep: Option<&str>| -> Vec<String> {
            least_recently_used_beyond(&snapshots, max_mib << 20, keep)
                .into_iter()
                .map(|snapshot| snapshot.key.clone())
                .collect()
        };
        assert_eq!(keys(400, None), Vec::<String>::new());
        assert_eq!(keys(399, None), ["newer-unused"]);
        assert_eq!(keys(200, None), ["newer-unused", "middle"]);
        assert_eq!(
            keys(0, Some("just-saved")),
            ["newer-unused", "middle", "old-but-used"]
        );
    }

    #[test]
    fn eviction_removes_from_disk_and_a_use_protects_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(dir.path()).unwrap();
        let mut saved = Vec::new();
        for rootfs in ["sha256-a", "sha256-b", "sha256-c"] {
            let spec = spec(rootfs);
            let pending = snapshots.begin(&spec.key()).unwrap();
            std::fs::write(pending.files().state, vec![7u8; 1 << 20]).unwrap();
            saved.push(pending.publish(&spec).unwrap());
        }
        // Make the order of use unambiguous whatever the clock's resolution: a used first,
        // then c, then b.
        let at = |snapshot: &SavedSnapshot, seconds: u64| {
            std::fs::File::options()
                .write(true)
                .open(snapshot.dir.join("snapshot.json"))
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
                .unwrap();
        };
        at(&saved[0], 1_000);
        at(&saved[2], 2_000);
        at(&saved[1], 3_000);
        saved[0].mark_used().unwrap();
        let removed = snapshots.evict_to_fit(5 << 19, &saved[1].key).unwrap();
        let removed: Vec<&str> = removed
            .iter()
            .map(|snapshot| snapshot.key.as_str())
            .collect();
        assert_eq!(removed, [saved[2].key.as_str()]);
        assert!(snapshots.find(&saved[2].key).is_none());
        assert!(snapshots.find(&saved[0].key).is_some());
        assert!(snapshots.find(&saved[1].key).is_some());
    }

    #[test]
    fn a_missing_snapshot_is_explained_by_what_changed_in_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::open(dir.path()).unwrap();
        let wanted = spec("sha256-a");
        assert_eq!(
            snapshots.why_none_fits(&wanted),
            "none is saved of its image (this run saves one)"
        );
        let mut older = wanted.clone();
        older.vmm = "QEMU emulator version 7.1.0".into();
        older.vcpus = 2;
        let pending = snapshots.begin(&older.key()).unwrap();
        pending.publish(&older).unwrap();
        // Another image's snapshot says nothing about this one.
        let other = spec("sha256-b");
        snapshots
            .begin(&other.key())
            .unwrap()
            .publish(&other)
            .unwrap();
        assert_eq!(
            snapshots.why_none_fits(&wanted),
            "the one saved of its image differs in vcpus 2 (now 1), vmm \"QEMU emulator \
             version 7.1.0\" (now \"QEMU emulator version 7.2.0\") (this run saves another)"
        );
    }

    #[test]
    fn a_snapshot_is_stale_when_any_part_of_its_key_can_no_longer_match() {
        let stored = StoredSnapshot {
            key: "k".into(),
            spec: Some(serde_json::to_value(spec("sha256-a")).unwrap()),
            created_ms: None,
            used_ms: None,
            disk_usage: 0,
        };
        let qemu = "QEMU emulator version 7.2.0";
        let fits = currency("1.0.0", Some(qemu), &["sha256-a", "sha256-b"]);
        assert_eq!(stored.stale_reason(&fits), None);
        // No QEMU installed: the snapshot is not judged by it.
        assert_eq!(
            stored.stale_reason(&currency("1.0.0", None, &["sha256-a"])),
            None
        );
        let cases = [
            (
                currency("1.1.0", Some(qemu), &["sha256-a"]),
                "saved by banger 1.0.0, this is 1.1.0",
            ),
            (
                currency("1.0.0", Some("QEMU emulator version 8.0.0"), &["sha256-a"]),
                "saved by QEMU emulator version 7.2.0, QEMU is now QEMU emulator version 8.0.0",
            ),
            (
                currency("1.0.0", Some(qemu), &["sha256-b"]),
                "its image is no longer recorded",
            ),
        ];
        for (now, reason) in cases {
            assert_eq!(stored.stale_reason(&now).as_deref(), Some(reason));
        }
        let mut old_layout = stored.clone();
        old_layout.spec.as_mut().unwrap()["format"] = serde_json::json!(0);
        assert_eq!(
            old_layout.stale_reason(&fits).as_deref(),
            Some(format!("saved in layout 0, not {SNAPSHOT_FORMAT}").as_str())
        );
        let unreadable = StoredSnapshot {
            spec: None,
            ..stored
        };
        assert!(unreadable.stale_reason(&fits).is_some());
    }

    #[test]
    fn a_firecracker_snapshot_is_judged_by_the_installed_firecracker_only() {
        let mut saved = spec("sha256-a");
        saved.vmm = "Firecracker v1.12.0".into();
        saved.accel = "kvm".into();
        let stored = StoredSnapshot {
            key: "k".into(),
            spec: Some(serde_json::to_value(saved).unwrap()),
            created_ms: None,
            used_ms: None,
            disk_usage: 0,
        };
        // Any QEMU, or none, says nothing about it.
        let fits = currency("1.0.0", Some("QEMU emulator version 8.0.0"), &["sha256-a"]);
        assert_eq!(stored.stale_reason(&fits), None);
        let upgraded = SnapshotCurrency {
            firecracker: Some("Firecracker v1.13.0".into()),
            ..fits.clone()
        };
        assert_eq!(
            stored.stale_reason(&upgraded).as_deref(),
            Some("saved by Firecracker v1.12.0, Firecracker is now Firecracker v1.13.0")
        );
        let uninstalled = SnapshotCurrency {
            firecracker: None,
            ..fits
        };
        assert_eq!(stored.stale_reason(&uninstalled), None);
    }
}
