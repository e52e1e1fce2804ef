//! Durable state in SQLite (`~/.local/state/banger/state.db`): named images, kernels and VMs.
//! A VM row is what must survive the daemon (its name, what it boots, its shape, whether it
//! should be running); momentary handles (pids, sockets, ports) live with the daemon.
//!
//! An image row names the step output that holds its `rootfs.ext4` (the definition key of the
//! step that built it, and the output's integrity), so the bytes stay in the content store and
//! are never copied per image. Every image is also a GC root (`image:<name>`) in the store, so
//! `banger cache gc` never evicts an image that is registered.
//!
//! Schema versions are applied in order by [`migrate`] and recorded in `PRAGMA user_version`;
//! a database from a newer banger is refused rather than misread.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use crate::key::Key;
use crate::spec::NetworkMode;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the state database {path} has schema version {found}, newer than this banger knows \
         ({known}); upgrade banger"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("state database query failed ({what})")]
    Query {
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("no image named `{name}`; `banger image list` shows the images there are")]
    NoSuchImage { name: String },
    #[error(
        "no kernel named `{name}`; `banger kernel list` shows the kernels there are, `banger \
         kernel list --available` the catalog (`banger kernel pull NAME` fetches one)"
    )]
    NoSuchKernel { name: String },
    #[error(
        "a kernel named `{name}` already exists; remove it first (`banger kernel rm {name}`) or \
         pick another name"
    )]
    KernelExists { name: String },
    #[error(
        "an image named `{name}` already exists; remove it first (`banger image rm {name}`) or \
         pick another name"
    )]
    ImageExists { name: String },
    #[error("no VM named `{name}`; `banger vm list` shows the VMs there are")]
    NoSuchVm { name: String },
    #[error(
        "a VM named `{name}` already exists; pick another name or remove it first (`banger vm \
         rm {name}`)"
    )]
    VmExists { name: String },
}

/// Whether a VM should be running: what the daemon restores after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Created, never started, or stopped.
    Stopped,
    Running,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Running => "running",
        }
    }

    fn parse(text: &str) -> VmState {
        match text {
            "running" => VmState::Running,
            _ => VmState::Stopped,
        }
    }
}

/// A VM, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    pub name: String,
    /// Random, fixed at creation: seeds its disks' UUIDs, names its directories' contents.
    pub id: String,
    pub image: String,
    pub kernel: String,
    /// `qemu` or `firecracker`.
    pub backend: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    pub state: VmState,
    pub created_ms: u64,
    /// Integrity of the image's `rootfs.ext4` the VM boots (`None`: recorded before this was).
    pub rootfs_integrity: Option<String>,
    /// `user` or `none` (VMs recorded before this was have `user`, what they were made with).
    pub network: NetworkMode,
    /// Published ports, in the order given.
    pub ports: Vec<crate::spec::PortForward>,
}

/// Where an image came from, for `image list` and `image show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    /// `oci:REF@DIGEST`, `catalog:NAME`, `tar:DIGEST`, `file:PATH`, `bangerfile:PATH#IMAGE`.
    pub source: String,
    pub distro: Option<String>,
    pub arch: String,
    /// The kernel it boots with (a catalog or imported kernel name).
    pub kernel_ref: Option<String>,
    /// Integrity (`sha256-…`) and size of `rootfs.ext4` in the store.
    pub rootfs_integrity: String,
    pub rootfs_size: u64,
    /// Definition key of the step whose output this is.
    pub step_key: Key,
    pub created_ms: u64,
}

/// One stored file of a kernel: integrity in the store and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    pub integrity: String,
    pub size: u64,
}

/// A kernel banger can boot: an ELF vmlinux with PVH, an optional initramfs and modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRecord {
    pub name: String,
    /// `catalog:NAME (recipe|bundle)`, `import:DIR`.
    pub source: String,
    /// `uname -r` of the kernel, when known.
    pub release: Option<String>,
    pub vmlinux: StoredFile,
    pub initrd: Option<StoredFile>,
    /// The modules tree, as a tar.
    pub modules: Option<StoredFile>,
    pub step_key: Key,
    pub created_ms: u64,
}

/// Schema migrations, in order; index + 1 is the version each produces.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE images (
        name TEXT PRIMARY KEY NOT NULL,
        source TEXT NOT NULL,
        distro TEXT,
        arch TEXT NOT NULL,
        kernel_ref TEXT,
        rootfs_integrity TEXT NOT NULL,
        rootfs_size INTEGER NOT NULL,
        step_key TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );",
    "CREATE TABLE kernels (
        name TEXT PRIMARY KEY NOT NULL,
        source TEXT NOT NULL,
        release TEXT,
        vmlinux_integrity TEXT NOT NULL,
        vmlinux_size INTEGER NOT NULL,
        initrd_integrity TEXT,
        initrd_size INTEGER,
        modules_integrity TEXT,
        modules_size INTEGER,
        step_key TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );",
    "CREATE TABLE vms (
        name TEXT PRIMARY KEY NOT NULL,
        id TEXT NOT NULL UNIQUE,
        image TEXT NOT NULL,
        kernel TEXT NOT NULL,
        backend TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_bytes INTEGER NOT NULL,
        state TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );",
    // The image's rootfs a VM boots, so `banger up` can tell an unchanged sandbox from one
    // whose image was rebuilt. NULL for VMs made before it was recorded.
    "ALTER TABLE vms ADD COLUMN rootfs_integrity TEXT;",
    // Every VM made before this had user-mode networking.
    "ALTER TABLE vms ADD COLUMN network TEXT NOT NULL DEFAULT 'user';",
    // Published ports, space-separated in canonical form (`127.0.0.1:8080:80/tcp`).
    "ALTER TABLE vms ADD COLUMN ports TEXT NOT NULL DEFAULT '';",
    // The bridge's address pool: one row per `tap` VM, kept while the VM exists (stopped
    // included), so a VM keeps its address and its `NAME.vm` answer across boots.
    "CREATE TABLE addresses (
        vm_id TEXT PRIMARY KEY NOT NULL,
        address TEXT NOT NULL UNIQUE
    );",
];

/// The state database.
#[derive(Debug)]
pub struct State {
    connection: Connection,
}

fn query(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StateError {
    move |source| StateError::Query { what, source }
}

/// The kinds of record [`names_read_only`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named {
    Vms,
    Images,
    Kernels,
}

/// The names of one kind of record in `state_dir`'s database, sorted, read without creating,
/// migrating or waiting on anything: for shell completion, which must be fast and harmless.
/// A missing, busy or unreadable database gives no names.
pub fn names_read_only(state_dir: &Path, kind: Named) -> Vec<String> {
    use rusqlite::OpenFlags;
    let table = match kind {
        Named::Vms => "vms",
        Named::Images => "images",
        Named::Kernels => "kernels",
    };
    let Ok(connection) = Connection::open_with_flags(
        state_dir.join("state.db"),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) else {
        return Vec::new();
    };
    let Ok(mut statement) = connection.prepare(&format!("SELECT name FROM {table} ORDER BY name"))
    else {
        return Vec::new();
    };
    statement
        .query_map([], |row| row.get::<_, String>(0))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// The id of VM `name`, read like [`names_read_only`] (for shell completion, which must not
/// wait for the daemon); `None` when there is no such VM or no database.
pub fn vm_id_read_only(state_dir: &Path, name: &str) -> Option<String> {
    use rusqlite::OpenFlags;
    let connection = Connection::open_with_flags(
        state_dir.join("state.db"),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    connection
        .query_row("SELECT id FROM vms WHERE name = ?1", [name], |row| {
            row.get::<_, String>(0)
        })
        .ok()
}

impl State {
    /// Opens (creating and migrating as needed) the database in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<State, StateError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StateError::CreateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join("state.db");
        let open_error = |source| StateError::Open {
            path: path.clone(),
            source,
        };
        let connection = Connection::open(&path).map_err(open_error)?;
        // Several CLI processes may write at once; wait instead of failing with SQLITE_BUSY.
        connection
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(open_error)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(open_error)?;
        migrate(&connection, &path)?;
        Ok(State { connection })
    }

    /// Adds an image; an existing name is an error unless `replace`.
    pub fn put_image(&self, image: &ImageRecord, replace: bool) -> Result<(), StateError> {
        let verb = if replace {
            "INSERT OR REPLACE"
        } else {
            "INSERT"
        };
        let result = self.connection.execute(
            &format!(
                "{verb} INTO images (name, source, distro, arch, kernel_ref, rootfs_integrity, \
                 rootfs_size, step_key, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ),
            params![
                image.name,
                image.source,
                image.distro,
                image.arch,
                image.kernel_ref,
                image.rootfs_integrity,
                image.rootfs_size as i64,
                image.step_key.to_hex(),
                image.created_ms as i64,
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StateError::ImageExists {
                    name: image.name.clone(),
                })
            }
            Err(source) => Err(StateError::Query {
                what: "insert image",
                source,
            }),
        }
    }

    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, StateError> {
        self.connection
            .query_row(
                "SELECT name, source, distro, arch, kernel_ref, rootfs_integrity, rootfs_size, \
                 step_key, created_ms FROM images WHERE name = ?1",
                params![name],
                row_to_image,
            )
            .optional()
            .map_err(query("read image"))
    }

    /// The image, or an error naming it.
    pub fn require_image(&self, name: &str) -> Result<ImageRecord, StateError> {
        self.image(name)?.ok_or_else(|| StateError::NoSuchImage {
            name: name.to_owned(),
        })
    }

    /// Every image, by name.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StateError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT name, source, distro, arch, kernel_ref, rootfs_integrity, rootfs_size, \
                 step_key, created_ms FROM images ORDER BY name",
            )
            .map_err(query("list images"))?;
        let rows = statement
            .query_map([], row_to_image)
            .map_err(query("list images"))?;
        rows.collect::<Result<_, _>>().map_err(query("list images"))
    }

    /// Removes an image row; false when there was none.
    pub fn remove_image(&self, name: &str) -> Result<bool, StateError> {
        let removed = self
            .connection
            .execute("DELETE FROM images WHERE name = ?1", params![name])
            .map_err(query("remove image"))?;
        Ok(removed > 0)
    }
}

impl State {
    /// Adds a kernel; an existing name is an error unless `replace`.
    pub fn put_kernel(&self, kernel: &KernelRecord, replace: bool) -> Result<(), StateError> {
        let verb = if replace {
            "INSERT OR REPLACE"
        } else {
            "INSERT"
        };
        let optional = |file: &Option<StoredFile>| {
            (
                file.as_ref().map(|file| file.integrity.clone()),
                file.as_ref().map(|file| file.size as i64),
            )
        };
        let (initrd_integrity, initrd_size) = optional(&kernel.initrd);
        let (modules_integrity, modules_size) = optional(&kernel.modules);
        let result = self.connection.execute(
            &format!(
                "{verb} INTO kernels (name, source, release, vmlinux_integrity, vmlinux_size, \
                 initrd_integrity, initrd_size, modules_integrity, modules_size, step_key, \
                 created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ),
            params![
                kernel.name,
                kernel.source,
                kernel.release,
                kernel.vmlinux.integrity,
                kernel.vmlinux.size as i64,
                initrd_integrity,
                initrd_size,
                modules_integrity,
                modules_size,
                kernel.step_key.to_hex(),
                kernel.created_ms as i64,
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StateError::KernelExists {
                    name: kernel.name.clone(),
                })
            }
            Err(source) => Err(StateError::Query {
                what: "insert kernel",
                source,
            }),
        }
    }

    pub fn kernel(&self, name: &str) -> Result<Option<KernelRecord>, StateError> {
        self.connection
            .query_row(
                &format!("SELECT {KERNEL_COLUMNS} FROM kernels WHERE name = ?1"),
                params![name],
                row_to_kernel,
            )
            .optional()
            .map_err(query("read kernel"))
    }

    /// The kernel, or an error naming it and the commands that provide one.
    pub fn require_kernel(&self, name: &str) -> Result<KernelRecord, StateError> {
        self.kernel(name)?.ok_or_else(|| StateError::NoSuchKernel {
            name: name.to_owned(),
        })
    }

    pub fn kernels(&self) -> Result<Vec<KernelRecord>, StateError> {
        let mut statement = self
            .connection
            .prepare(&format!(
                "SELECT {KERNEL_COLUMNS} FROM kernels ORDER BY name"
            ))
            .map_err(query("list kernels"))?;
        let rows = statement
            .query_map([], row_to_kernel)
            .map_err(query("list kernels"))?;
        rows.collect::<Result<_, _>>()
            .map_err(query("list kernels"))
    }

    pub fn remove_kernel(&self, name: &str) -> Result<bool, StateError> {
        let removed = self
            .connection
            .execute("DELETE FROM kernels WHERE name = ?1", params![name])
            .map_err(query("remove kernel"))?;
        Ok(removed > 0)
    }
}

const KERNEL_COLUMNS: &str = "name, source, release, vmlinux_integrity, vmlinux_size, \
    initrd_integrity, initrd_size, modules_integrity, modules_size, step_key, created_ms";

fn parse_key(column: usize, text: &str) -> rusqlite::Result<Key> {
    Key::parse_hex(text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Text,
            format!("`{text}` is not a step key").into(),
        )
    })
}

fn row_to_kernel(row: &rusqlite::Row<'_>) -> rusqlite::Result<KernelRecord> {
    let optional = |integrity: Option<String>, size: Option<i64>| {
        integrity.map(|integrity| StoredFile {
            integrity,
            size: size.unwrap_or(0) as u64,
        })
    };
    let key: String = row.get(9)?;
    Ok(KernelRecord {
        name: row.get(0)?,
        source: row.get(1)?,
        release: row.get(2)?,
        vmlinux: StoredFile {
            integrity: row.get(3)?,
            size: row.get::<_, i64>(4)? as u64,
        },
        initrd: optional(row.get(5)?, row.get(6)?),
        modules: optional(row.get(7)?, row.get(8)?),
        step_key: parse_key(9, &key)?,
        created_ms: row.get::<_, i64>(10)? as u64,
    })
}

fn row_to_image(row: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRecord> {
    let key: String = row.get(7)?;
    Ok(ImageRecord {
        name: row.get(0)?,
        source: row.get(1)?,
        distro: row.get(2)?,
        arch: row.get(3)?,
        kernel_ref: row.get(4)?,
        rootfs_integrity: row.get(5)?,
        rootfs_size: row.get::<_, i64>(6)? as u64,
        step_key: parse_key(7, &key)?,
        created_ms: row.get::<_, i64>(8)? as u64,
    })
}

fn migrate(connection: &Connection, path: &Path) -> Result<(), StateError> {
    let known = MIGRATIONS.len() as i64;
    let read_version = || -> Result<i64, StateError> {
        connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(query("read schema version"))
    };
    let version = read_version()?;
    if version == known {
        return Ok(());
    }
    // Processes opening a fresh database together: the write lock is taken before the
    // version is read again, so exactly one of them migrates and the others see its result.
    connection
        .execute_batch("BEGIN IMMEDIATE")
        .map_err(query("lock the database to migrate its schema"))?;
    let migrated = (|| {
        let version = read_version()?;
        if version > known {
            return Err(StateError::TooNew {
                path: path.to_owned(),
                found: version,
                known,
            });
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let target = index as i64 + 1;
            connection
                .execute_batch(&format!("{migration} PRAGMA user_version = {target};"))
                .map_err(query("migrate schema"))?;
        }
        Ok(())
    })();
    let end = if migrated.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = connection
        .execute_batch(end)
        .map_err(query("finish the schema migration"));
    migrated.and(ended)
}

impl State {
    /// Records a new VM; its name must be free.
    pub fn create_vm(&self, vm: &VmRecord) -> Result<(), StateError> {
        let result = self.connection.execute(
            "INSERT INTO vms (name, id, image, kernel, backend, vcpus, memory_mib, disk_bytes, \
             state, created_ms, rootfs_integrity, network, ports) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                vm.name,
                vm.id,
                vm.image,
                vm.kernel,
                vm.backend,
                vm.vcpus,
                vm.memory_mib as i64,
                vm.disk_bytes as i64,
                vm.state.as_str(),
                vm.created_ms as i64,
                vm.rootfs_integrity,
                vm.network.as_str(),
                ports_text(&vm.ports),
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StateError::VmExists {
                    name: vm.name.clone(),
                })
            }
            Err(source) => Err(StateError::Query {
                what: "insert VM",
                source,
            }),
        }
    }

    pub fn vm(&self, name: &str) -> Result<Option<VmRecord>, StateError> {
        self.connection
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM vms WHERE name = ?1"),
                params![name],
                row_to_vm,
            )
            .optional()
            .map_err(query("read VM"))
    }

    /// The VM, or an error naming it.
    pub fn require_vm(&self, name: &str) -> Result<VmRecord, StateError> {
        self.vm(name)?.ok_or_else(|| StateError::NoSuchVm {
            name: name.to_owned(),
        })
    }

    /// Every VM, by name.
    pub fn vms(&self) -> Result<Vec<VmRecord>, StateError> {
        let mut statement = self
            .connection
            .prepare(&format!("SELECT {VM_COLUMNS} FROM vms ORDER BY name"))
            .map_err(query("list VMs"))?;
        let rows = statement
            .query_map([], row_to_vm)
            .map_err(query("list VMs"))?;
        rows.collect::<Result<_, _>>().map_err(query("list VMs"))
    }

    /// Points an existing VM at another image, kernel, shape and network (`banger up`
    /// recreating it).
    pub fn update_vm(&self, vm: &VmRecord) -> Result<(), StateError> {
        let changed = self
            .connection
            .execute(
                "UPDATE vms SET image = ?2, kernel = ?3, backend = ?4, vcpus = ?5, \
                 memory_mib = ?6, disk_bytes = ?7, state = ?8, rootfs_integrity = ?9, \
                 network = ?10, ports = ?11 WHERE name = ?1",
                params![
                    vm.name,
                    vm.image,
                    vm.kernel,
                    vm.backend,
                    vm.vcpus,
                    vm.memory_mib as i64,
                    vm.disk_bytes as i64,
                    vm.state.as_str(),
                    vm.rootfs_integrity,
                    vm.network.as_str(),
                    ports_text(&vm.ports),
                ],
            )
            .map_err(query("update VM"))?;
        if changed == 0 {
            return Err(StateError::NoSuchVm {
                name: vm.name.clone(),
            });
        }
        Ok(())
    }

    /// Records whether `name` should be running.
    pub fn set_vm_state(&self, name: &str, state: VmState) -> Result<(), StateError> {
        let changed = self
            .connection
            .execute(
                "UPDATE vms SET state = ?2 WHERE name = ?1",
                params![name, state.as_str()],
            )
            .map_err(query("update VM"))?;
        if changed == 0 {
            return Err(StateError::NoSuchVm {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    /// The address of VM `vm_id`, allocating the lowest free one of `candidates` if it has
    /// none. In one immediate transaction, so two daemons (or two creates) never hand out one
    /// address twice. `None` when every candidate is taken.
    pub fn allocate_address(
        &mut self,
        vm_id: &str,
        candidates: impl Iterator<Item = std::net::Ipv4Addr>,
    ) -> Result<Option<std::net::Ipv4Addr>, StateError> {
        let transaction = self
            .connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(query("allocate an address"))?;
        let existing: Option<String> = transaction
            .query_row(
                "SELECT address FROM addresses WHERE vm_id = ?1",
                params![vm_id],
                |row| row.get(0),
            )
            .optional()
            .map_err(query("allocate an address"))?;
        if let Some(address) = existing.and_then(|text| text.parse().ok()) {
            return Ok(Some(address));
        }
        let taken: std::collections::HashSet<String> = {
            let mut statement = transaction
                .prepare("SELECT address FROM addresses")
                .map_err(query("allocate an address"))?;
            let rows = statement
                .query_map([], |row| row.get::<_, String>(0))
                .map_err(query("allocate an address"))?;
            rows.collect::<Result<_, _>>()
                .map_err(query("allocate an address"))?
        };
        let Some(free) = candidates
            .into_iter()
            .find(|candidate| !taken.contains(&candidate.to_string()))
        else {
            return Ok(None);
        };
        transaction
            .execute(
                "INSERT INTO addresses (vm_id, address) VALUES (?1, ?2)",
                params![vm_id, free.to_string()],
            )
            .map_err(query("allocate an address"))?;
        transaction.commit().map_err(query("allocate an address"))?;
        Ok(Some(free))
    }

    /// The address VM `vm_id` holds, if any.
    pub fn address(&self, vm_id: &str) -> Result<Option<std::net::Ipv4Addr>, StateError> {
        let text: Option<String> = self
            .connection
            .query_row(
                "SELECT address FROM addresses WHERE vm_id = ?1",
                params![vm_id],
                |row| row.get(0),
            )
            .optional()
            .map_err(query("read an address"))?;
        Ok(text.and_then(|text| text.parse().ok()))
    }

    /// Gives VM `vm_id`'s address back to the pool.
    pub fn free_address(&self, vm_id: &str) -> Result<(), StateError> {
        self.connection
            .execute("DELETE FROM addresses WHERE vm_id = ?1", params![vm_id])
            .map_err(query("free an address"))?;
        Ok(())
    }

    /// Frees the addresses of VMs that no longer exist (a create that died between taking
    /// an address and recording its VM); returns how many.
    pub fn reconcile_addresses(&self) -> Result<usize, StateError> {
        self.connection
            .execute(
                "DELETE FROM addresses WHERE vm_id NOT IN (SELECT id FROM vms)",
                [],
            )
            .map_err(query("reconcile addresses"))
    }

    /// Every allocated address with its VM's name (for DNS and `doctor`).
    pub fn addresses(&self) -> Result<Vec<(String, std::net::Ipv4Addr)>, StateError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT vms.name, addresses.address FROM addresses \
                 JOIN vms ON vms.id = addresses.vm_id ORDER BY vms.name",
            )
            .map_err(query("list addresses"))?;
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(query("list addresses"))?;
        let mut addresses = Vec::new();
        for row in rows {
            let (name, address) = row.map_err(query("list addresses"))?;
            if let Ok(address) = address.parse() {
                addresses.push((name, address));
            }
        }
        Ok(addresses)
    }

    /// Removes a VM row; false when there was none.
    pub fn remove_vm(&self, name: &str) -> Result<bool, StateError> {
        let removed = self
            .connection
            .execute("DELETE FROM vms WHERE name = ?1", params![name])
            .map_err(query("remove VM"))?;
        Ok(removed > 0)
    }
}

const VM_COLUMNS: &str = "name, id, image, kernel, backend, vcpus, memory_mib, disk_bytes, \
    state, created_ms, rootfs_integrity, network, ports";

fn ports_text(ports: &[crate::spec::PortForward]) -> String {
    ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

fn row_to_vm(row: &rusqlite::Row<'_>) -> rusqlite::Result<VmRecord> {
    let state: String = row.get(8)?;
    let network: String = row.get(11)?;
    // A name this banger does not know is refused rather than booted with another network.
    let network = NetworkMode::from_name(&network).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            11,
            rusqlite::types::Type::Text,
            format!("`{network}` is not a network mode").into(),
        )
    })?;
    let ports: String = row.get(12)?;
    let ports = ports
        .split_whitespace()
        .map(crate::spec::PortForward::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|problem| {
            rusqlite::Error::FromSqlConversionFailure(
                12,
                rusqlite::types::Type::Text,
                problem.into(),
            )
        })?;
    Ok(VmRecord {
        name: row.get(0)?,
        id: row.get(1)?,
        image: row.get(2)?,
        kernel: row.get(3)?,
        backend: row.get(4)?,
        vcpus: row.get(5)?,
        memory_mib: row.get::<_, i64>(6)? as u64,
        disk_bytes: row.get::<_, i64>(7)? as u64,
        state: VmState::parse(&state),
        created_ms: row.get::<_, i64>(9)? as u64,
        rootfs_integrity: row.get(10)?,
        network,
        ports,
    })
}

impl crate::error::Classify for StateError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            StateError::NoSuchImage { .. }
            | StateError::ImageExists { .. }
            | StateError::NoSuchKernel { .. }
            | StateError::KernelExists { .. }
            | StateError::NoSuchVm { .. }
            | StateError::VmExists { .. } => crate::error::ErrorClass::User,
            _ => crate::error::ErrorClass::Environment,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, id: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            id: id.into(),
            image: "debian-bookworm".into(),
            kernel: "debian-cloud-amd64".into(),
            backend: "qemu".into(),
            vcpus: 2,
            memory_mib: 2048,
            disk_bytes: 8 << 30,
            state: VmState::Stopped,
            created_ms: 1_700_000_000_000,
            rootfs_integrity: Some("sha256-AAAA".into()),
            network: NetworkMode::User,
            ports: Vec::new(),
        }
    }

    #[test]
    fn vms_round_trip_with_unique_names_and_a_state() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        state.create_vm(&vm("web", "01")).unwrap();
        state.create_vm(&vm("db", "02")).unwrap();
        assert_eq!(state.vm("web").unwrap(), Some(vm("web", "01")));
        assert!(matches!(
            state.create_vm(&vm("web", "03")),
            Err(StateError::VmExists { .. })
        ));
        state.set_vm_state("web", VmState::Running).unwrap();
        // What the daemon reads back after a restart.
        let reopened = State::open(dir.path()).unwrap();
        let names: Vec<(String, VmState)> = reopened
            .vms()
            .unwrap()
            .into_iter()
            .map(|vm| (vm.name, vm.state))
            .collect();
        assert_eq!(
            names,
            [
                ("db".to_owned(), VmState::Stopped),
                ("web".to_owned(), VmState::Running)
            ]
        );
        assert!(matches!(
            reopened.set_vm_state("nope", VmState::Running),
            Err(StateError::NoSuchVm { .. })
        ));
        assert!(reopened.remove_vm("web").unwrap());
        assert!(!reopened.remove_vm("web").unwrap());
        assert!(
            reopened
                .require_vm("web")
                .unwrap_err()
                .to_string()
                .contains("no VM named `web`")
        );
    }

    #[test]
    fn a_vm_keeps_its_published_ports_in_order_through_create_and_update() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let ports = |texts: &[&str]| -> Vec<crate::spec::PortForward> {
            texts
                .iter()
                .map(|text| crate::spec::PortForward::parse(text).unwrap())
                .collect()
        };
        let web = VmRecord {
            ports: ports(&["9090:90", "0.0.0.0:5353:53/udp"]),
            ..vm("web", "01")
        };
        state.create_vm(&web).unwrap();
        assert_eq!(state.require_vm("web").unwrap().ports, web.ports);
        state
            .update_vm(&VmRecord {
                ports: ports(&["8080:80"]),
                ..web
            })
            .unwrap();
        assert_eq!(state.require_vm("web").unwrap().ports, ports(&["8080:80"]));
    }

    #[test]
    fn the_address_pool_hands_out_distinct_lowest_free_addresses_that_outlive_a_reopen() {
        use std::net::Ipv4Addr;
        let dir = tempfile::tempdir().unwrap();
        let pool = || (2..6u8).map(|last| Ipv4Addr::new(10, 213, 0, last));
        let mut state = State::open(dir.path()).unwrap();
        state.create_vm(&vm("a", "id-a")).unwrap();
        state.create_vm(&vm("b", "id-b")).unwrap();
        let a = state.allocate_address("id-a", pool()).unwrap();
        assert_eq!(a, Some(Ipv4Addr::new(10, 213, 0, 2)));
        // Asking again is the same address, not a second one.
        assert_eq!(state.allocate_address("id-a", pool()).unwrap(), a);
        // A daemon killed here and started again reads the same pool.
        let mut state = State::open(dir.path()).unwrap();
        let b = state.allocate_address("id-b", pool()).unwrap();
        assert_eq!(b, Some(Ipv4Addr::new(10, 213, 0, 3)));
        assert_eq!(
            state.addresses().unwrap(),
            [
                ("a".to_owned(), Ipv4Addr::new(10, 213, 0, 2)),
                ("b".to_owned(), Ipv4Addr::new(10, 213, 0, 3))
            ]
        );
        // Freed, the lowest address is handed out again.
        state.free_address("id-a").unwrap();
        assert_eq!(state.address("id-a").unwrap(), None);
        assert_eq!(
            state.allocate_address("id-c", pool()).unwrap(),
            Some(Ipv4Addr::new(10, 213, 0, 2))
        );
        // id-c has no VM record: reconciling frees it.
        assert_eq!(state.reconcile_addresses().unwrap(), 1);
        assert_eq!(state.address("id-b").unwrap(), b);
        for id in ["x1", "x2", "x3"] {
            state.allocate_address(id, pool()).unwrap();
        }
        assert_eq!(state.allocate_address("full", pool()).unwrap(), None);
    }

    #[test]
    fn a_vm_keeps_its_network_mode_through_create_and_update() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let sealed = VmRecord {
            network: NetworkMode::None,
            ..vm("sealed", "01")
        };
        state.create_vm(&sealed).unwrap();
        assert_eq!(
            state.require_vm("sealed").unwrap().network,
            NetworkMode::None
        );
        state
            .update_vm(&VmRecord {
                network: NetworkMode::User,
                ..sealed
            })
            .unwrap();
        assert_eq!(
            state.require_vm("sealed").unwrap().network,
            NetworkMode::User
        );
    }

    #[test]
    fn vms_recorded_before_the_network_column_read_back_with_user_networking() {
        let dir = tempfile::tempdir().unwrap();
        // A database as the banger before the network column left it (schema version 4).
        let connection = Connection::open(dir.path().join("state.db")).unwrap();
        for migration in &MIGRATIONS[..4] {
            connection.execute_batch(migration).unwrap();
        }
        connection.pragma_update(None, "user_version", 4).unwrap();
        connection
            .execute(
                "INSERT INTO vms (name, id, image, kernel, backend, vcpus, memory_mib, \
                 disk_bytes, state, created_ms, rootfs_integrity) \
                 VALUES ('old', '01', 'debian-bookworm', 'debian-cloud-amd64', 'qemu', 2, 2048, \
                 8589934592, 'running', 1700000000000, 'sha256-AAAA')",
                [],
            )
            .unwrap();
        drop(connection);
        let state = State::open(dir.path()).unwrap();
        assert_eq!(
            state.require_vm("old").unwrap(),
            VmRecord {
                state: VmState::Running,
                ..vm("old", "01")
            }
        );
        let version: i64 = state
            .connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn a_network_mode_this_banger_does_not_know_is_an_error_not_a_default() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        state.create_vm(&vm("odd", "01")).unwrap();
        state
            .connection
            .execute("UPDATE vms SET network = 'bridge' WHERE name = 'odd'", [])
            .unwrap();
        let error = state.vm("odd").unwrap_err();
        assert!(
            crate::error::error_chain(&error).contains("`bridge` is not a network mode"),
            "{error:?}"
        );
    }

    fn image(name: &str) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            source: "oci:docker.io/library/alpine:3.20@sha256:00".into(),
            distro: Some("alpine".into()),
            arch: "x86_64".into(),
            kernel_ref: Some("debian-cloud-amd64".into()),
            rootfs_integrity: "sha256-abc".into(),
            rootfs_size: 1 << 30,
            step_key: Key::from_bytes([7; 32]),
            created_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn images_round_trip_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        state.put_image(&image("b"), false).unwrap();
        state.put_image(&image("a"), false).unwrap();
        assert_eq!(state.image("a").unwrap(), Some(image("a")));
        let names: Vec<String> = state
            .images()
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(
            state.put_image(&image("a"), false),
            Err(StateError::ImageExists { .. })
        ));
        state.put_image(&image("a"), true).unwrap();
        assert!(state.remove_image("a").unwrap());
        assert!(!state.remove_image("a").unwrap());
        assert_eq!(
            state.require_image("a").unwrap_err().to_string(),
            "no image named `a`; `banger image list` shows the images there are"
        );
    }

    #[test]
    fn kernels_round_trip_with_optional_files() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let kernel = KernelRecord {
            name: "k".into(),
            source: "import:/tmp/k".into(),
            release: Some("6.1.0-56-cloud-amd64".into()),
            vmlinux: StoredFile {
                integrity: "sha256-v".into(),
                size: 30 << 20,
            },
            initrd: None,
            modules: Some(StoredFile {
                integrity: "sha256-m".into(),
                size: 1 << 20,
            }),
            step_key: Key::from_bytes([1; 32]),
            created_ms: 5,
        };
        state.put_kernel(&kernel, false).unwrap();
        assert_eq!(state.require_kernel("k").unwrap(), kernel);
        assert!(matches!(
            state.put_kernel(&kernel, false),
            Err(StateError::KernelExists { .. })
        ));
        assert_eq!(state.kernels().unwrap().len(), 1);
        assert!(state.remove_kernel("k").unwrap());
        assert!(
            state
                .require_kernel("k")
                .unwrap_err()
                .to_string()
                .contains("banger kernel pull NAME")
        );
    }

    #[test]
    fn reopening_keeps_data_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        State::open(dir.path())
            .unwrap()
            .put_image(&image("kept"), false)
            .unwrap();
        assert!(
            State::open(dir.path())
                .unwrap()
                .image("kept")
                .unwrap()
                .is_some()
        );
        let connection = Connection::open(dir.path().join("state.db")).unwrap();
        connection.pragma_update(None, "user_version", 99).unwrap();
        drop(connection);
        assert!(matches!(
            State::open(dir.path()),
            Err(StateError::TooNew { found: 99, .. })
        ));
    }
}
