//! The ext4 writer against the real tools: `e2fsck -fn` must find nothing, `debugfs` must
//! read back exactly what went in, and a loop mount must show the same tree as the input.
//!
//! Tests that need e2fsprogs or root + loop devices check at run time and skip with a
//! message, except under `BANGER_TEST_REQUIRE_ALL=1`, where a missing capability fails.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::support::{assert_fsck_clean, capable, debugfs, field, have_e2fsprogs, run, run_ok};
use banger::ext4::{
    BuildOptions, EntryInfo, EntryKind, EntryType, Ext4Builder, Ext4Error, Metadata, Sizing,
};

// ---------------------------------------------------------------------------------------
// Capabilities and tools

/// Root, loop devices and a working `mount -o loop`, probed once with a real image.
pub(crate) fn can_loop_mount() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| {
        if !Path::new("/dev/loop-control").exists() {
            return false;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("probe.img");
        let builder = Ext4Builder::create(&image, options()).expect("probe image");
        builder.finish(auto()).expect("probe image");
        LoopMount::new(&image, true).is_ok()
    })
}

/// A loop mount, unmounted (and its directory removed) on drop, even when a test fails.
pub(crate) struct LoopMount {
    dir: tempfile::TempDir,
}

impl LoopMount {
    pub(crate) fn new(image: &Path, read_only: bool) -> Result<LoopMount, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let options = if read_only { "loop,ro" } else { "loop" };
        run(Command::new("mount")
            .arg("-o")
            .arg(options)
            .arg(image)
            .arg(dir.path()))?;
        Ok(LoopMount { dir })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if let Err(error) = run(Command::new("umount").arg(self.dir.path())) {
            eprintln!("{error}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Building from a description

fn options() -> BuildOptions {
    let mut options = BuildOptions::with_seed(b"banger ext4 tests");
    options.sync = false; // tests do not need durability
    options
}

fn auto() -> Sizing {
    Sizing::Auto {
        headroom_percent: 20,
        min_bytes: 0,
    }
}

fn meta(uid: u32, gid: u32, mode: u32, mtime: (i64, u32)) -> Metadata {
    Metadata {
        uid,
        gid,
        mode,
        mtime,
        xattrs: Vec::new(),
    }
}

/// One input entry.
#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
    HardLink(&'static str),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
}

#[derive(Debug, Clone)]
struct Entry {
    path: &'static str,
    kind: Kind,
    meta: Metadata,
}

fn insert(builder: &mut Ext4Builder, entry: &Entry) -> Result<(), Ext4Error> {
    let path = Path::new(entry.path);
    match &entry.kind {
        Kind::Dir => builder.insert(path, EntryKind::Directory, &entry.meta),
        Kind::File(bytes) => builder.insert(
            path,
            EntryKind::File {
                size: bytes.len() as u64,
                data: &mut &bytes[..],
            },
            &entry.meta,
        ),
        Kind::Symlink(target) => builder.insert(
            path,
            EntryKind::Symlink {
                target: target.clone(),
            },
            &entry.meta,
        ),
        Kind::HardLink(target) => builder.insert(
            path,
            EntryKind::HardLink {
                target: PathBuf::from(target),
            },
            &entry.meta,
        ),
        Kind::Char(major, minor) => builder.insert(
            path,
            EntryKind::CharDevice {
                major: *major,
                minor: *minor,
            },
            &entry.meta,
        ),
        Kind::Block(major, minor) => builder.insert(
            path,
            EntryKind::BlockDevice {
                major: *major,
                minor: *minor,
            },
            &entry.meta,
        ),
        Kind::Fifo => builder.insert(path, EntryKind::Fifo, &entry.meta),
        Kind::Socket => builder.insert(path, EntryKind::Socket, &entry.meta),
    }
}

fn build(image: &Path, options: BuildOptions, entries: &[Entry]) -> banger::ext4::Ext4Summary {
    let mut builder = Ext4Builder::create(image, options).expect("create");
    for entry in entries {
        insert(&mut builder, entry).unwrap_or_else(|e| panic!("insert {}: {e}", entry.path));
    }
    builder.finish(auto()).expect("finish")
}

/// A user-space POSIX ACL (`getxattr` format, version 2).
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

const UNDEFINED: u32 = u32::MAX;

/// A file whose blocks alternate data and zeros: `runs` data blocks, each followed by a hole.
fn holey(runs: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; runs * 2 * 4096 + 100];
    for run in 0..runs {
        bytes[run * 2 * 4096..run * 2 * 4096 + 4096].fill((run % 250 + 1) as u8);
    }
    let len = bytes.len();
    bytes[len - 100..].fill(9); // a partial last block with data
    bytes
}

/// Every entry kind and metadata case the writer must carry faithfully.
fn kitchen_sink() -> Vec<Entry> {
    let t = (1_700_000_000, 123_456_789);
    let capability = vec![
        0x00, 0x00, 0x00, 0x02, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    let access_acl = acl(&[
        (0x01, 7, UNDEFINED),
        (0x02, 5, 1000),
        (0x02, 4, 70_000),
        (0x04, 5, UNDEFINED),
        (0x08, 4, 2000),
        (0x10, 5, UNDEFINED),
        (0x20, 0, UNDEFINED),
    ]);
    let default_acl = acl(&[
        (0x01, 7, UNDEFINED),
        (0x04, 5, UNDEFINED),
        (0x08, 7, 3000),
        (0x10, 7, UNDEFINED),
        (0x20, 5, UNDEFINED),
    ]);
    let mut with_caps = meta(0, 0, 0o755, t);
    with_caps.xattrs = vec![(b"security.capability".to_vec(), capability)];
    let mut acl_dir = meta(1000, 1000, 0o2775, t);
    acl_dir.xattrs = vec![
        (b"system.posix_acl_access".to_vec(), access_acl.clone()),
        (b"system.posix_acl_default".to_vec(), default_acl),
    ];
    let mut acl_file = meta(1000, 1000, 0o640, t);
    acl_file.xattrs = vec![(b"system.posix_acl_access".to_vec(), access_acl)];
    let mut big_xattrs = meta(0, 0, 0o644, t);
    big_xattrs.xattrs = vec![
        (b"user.small".to_vec(), b"in the inode".to_vec()),
        (b"user.large".to_vec(), vec![0xAB; 1500]),
        (b"trusted.overlay.opaque".to_vec(), b"y".to_vec()),
        (b"user.empty".to_vec(), Vec::new()),
    ];
    let mut shared_a = meta(0, 0, 0o644, t);
    shared_a.xattrs = vec![(b"user.shared".to_vec(), vec![0x5A; 600])];
    let shared_b = shared_a.clone();
    let long_target = b"../"
        .repeat(30)
        .into_iter()
        .chain(*b"usr/share/zoneinfo/UTC")
        .collect();
    vec![
        Entry {
            path: ".",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, (1_600_000_000, 1)),
        },
        Entry {
            path: "bin",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "bin/ping",
            kind: Kind::File(b"\x7fELF ping".to_vec()),
            meta: with_caps,
        },
        Entry {
            path: "bin/su",
            kind: Kind::File(b"\x7fELF su".to_vec()),
            meta: meta(0, 0, 0o4755, t),
        },
        Entry {
            path: "bin/wall",
            kind: Kind::File(b"\x7fELF wall".to_vec()),
            meta: meta(0, 5, 0o2755, t),
        },
        Entry {
            path: "bin/sh",
            kind: Kind::Symlink(b"dash".to_vec()),
            meta: meta(0, 0, 0o777, t),
        },
        Entry {
            path: "bin/dash",
            kind: Kind::File(vec![7; 125_000]),
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "tmp",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o1777, t),
        },
        Entry {
            path: "home",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "home/big-ids",
            kind: Kind::Dir,
            meta: meta(4_000_000_000, 70_001, 0o700, (-1_000_000, 999_999_999)),
        },
        Entry {
            path: "home/big-ids/future",
            kind: Kind::File(b"2100".to_vec()),
            meta: meta(70_000, 70_001, 0o600, (4_102_444_800, 5)),
        },
        Entry {
            path: "home/big-ids/empty",
            kind: Kind::File(Vec::new()),
            meta: meta(70_000, 70_001, 0o444, (0, 0)),
        },
        Entry {
            path: "home/big-ids/holes",
            kind: Kind::File(holey(12)),
            meta: meta(1, 2, 0o644, t),
        },
        Entry {
            path: "home/big-ids/zeros",
            kind: Kind::File(vec![0; 3 * 4096 + 5]),
            meta: meta(1, 2, 0o644, t),
        },
        Entry {
            path: "home/big-ids/long-link",
            kind: Kind::Symlink(long_target),
            meta: meta(5, 6, 0o777, t),
        },
        Entry {
            path: "var",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "var/log",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "var/log/journal",
            kind: Kind::Dir,
            meta: acl_dir,
        },
        Entry {
            path: "var/log/journal/system.journal",
            kind: Kind::File(b"LPKSHHRH".to_vec()),
            meta: acl_file,
        },
        Entry {
            path: "var/xattrs",
            kind: Kind::File(b"x".to_vec()),
            meta: big_xattrs,
        },
        Entry {
            path: "var/shared-a",
            kind: Kind::File(b"a".to_vec()),
            meta: shared_a,
        },
        Entry {
            path: "var/shared-b",
            kind: Kind::File(b"b".to_vec()),
            meta: shared_b,
        },
        Entry {
            path: "var/su-link",
            kind: Kind::HardLink("bin/su"),
            meta: meta(9, 9, 0o777, t),
        },
        Entry {
            path: "var/su-link2",
            kind: Kind::HardLink("var/su-link"),
            meta: Metadata::default(),
        },
        Entry {
            path: "dev",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "dev/null",
            kind: Kind::Char(1, 3),
            meta: meta(0, 0, 0o666, t),
        },
        Entry {
            path: "dev/nvme0n1p9",
            kind: Kind::Block(259, 70_000),
            meta: meta(0, 6, 0o660, t),
        },
        Entry {
            path: "dev/sda",
            kind: Kind::Block(8, 0),
            meta: meta(0, 6, 0o660, t),
        },
        Entry {
            path: "dev/ttyS300",
            kind: Kind::Char(4, 300),
            meta: meta(0, 5, 0o620, t),
        },
        Entry {
            path: "run",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "run/initctl",
            kind: Kind::Fifo,
            meta: meta(0, 0, 0o600, t),
        },
        Entry {
            path: "run/socket",
            kind: Kind::Socket,
            meta: meta(0, 0, 0o666, t),
        },
    ]
}

// ---------------------------------------------------------------------------------------
// What a tree looks like, from the input description or from a mount

#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    kind: char,
    perm: u32,
    uid: u32,
    gid: u32,
    /// Files and symlinks only.
    size: u64,
    nlink: u64,
    device: Option<(u64, u64)>,
    mtime: (i64, i64),
    content: Option<String>,
    target: Option<Vec<u8>>,
    xattrs: BTreeMap<String, String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The tree the entries describe (no replacements among them), `lost+found` included.
fn expected_tree(entries: &[Entry], timestamp: i64) -> BTreeMap<PathBuf, Observed> {
    let mut tree: BTreeMap<PathBuf, Observed> = BTreeMap::new();
    let mut inode_of: HashMap<&str, &str> = HashMap::new();
    let mut names: HashMap<&str, u64> = HashMap::new();
    for entry in entries {
        if let Kind::HardLink(target) = entry.kind {
            let original = inode_of.get(target).copied().unwrap_or(target);
            inode_of.insert(entry.path, original);
            *names.entry(original).or_insert(1) += 1;
        }
    }
    let mut lost_found = observed_dir(&meta(0, 0, 0o700, (timestamp, 0)));
    lost_found.nlink = 2;
    tree.insert(PathBuf::from("lost+found"), lost_found);
    let by_path: HashMap<&str, &Entry> = entries.iter().map(|e| (e.path, e)).collect();
    for entry in entries {
        let path = PathBuf::from(entry.path.trim_start_matches("./"));
        let path = if entry.path == "." {
            PathBuf::new()
        } else {
            path
        };
        let observed = match &entry.kind {
            Kind::HardLink(_) => {
                let original = by_path[inode_of[entry.path]];
                let mut observed = observe_entry(original);
                observed.nlink = names[original.path];
                observed
            }
            _ => {
                let mut observed = observe_entry(entry);
                if let Some(&count) = names.get(entry.path) {
                    observed.nlink = count;
                }
                observed
            }
        };
        tree.insert(path, observed);
    }
    // Directory link counts: 2 + subdirectories.
    let dirs: Vec<PathBuf> = tree
        .iter()
        .filter(|(_, o)| o.kind == 'd')
        .map(|(p, _)| p.clone())
        .collect();
    for dir in dirs {
        let subdirs = tree
            .iter()
            .filter(|(p, o)| o.kind == 'd' && p.parent() == Some(&dir) && **p != dir)
            .count() as u64;
        tree.get_mut(&dir).expect("dir").nlink = 2 + subdirs;
    }
    tree
}

fn observed_dir(meta: &Metadata) -> Observed {
    Observed {
        kind: 'd',
        perm: meta.mode & 0o7777,
        uid: meta.uid,
        gid: meta.gid,
        size: 0,
        nlink: 2,
        device: None,
        mtime: (meta.mtime.0, i64::from(meta.mtime.1)),
        content: None,
        target: None,
        xattrs: meta
            .xattrs
            .iter()
            .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), hex(v)))
            .collect(),
    }
}

fn observe_entry(entry: &Entry) -> Observed {
    let mut observed = observed_dir(&entry.meta);
    observed.nlink = 1;
    match &entry.kind {
        Kind::Dir => observed.nlink = 2,
        Kind::File(bytes) => {
            observed.kind = 'f';
            observed.size = bytes.len() as u64;
            observed.content = Some(blake3::hash(bytes).to_hex().to_string());
        }
        Kind::Symlink(target) => {
            observed.kind = 'l';
            observed.size = target.len() as u64;
            observed.target = Some(target.clone());
        }
        Kind::Char(major, minor) => {
            observed.kind = 'c';
            observed.device = Some((u64::from(*major), u64::from(*minor)));
        }
        Kind::Block(major, minor) => {
            observed.kind = 'b';
            observed.device = Some((u64::from(*major), u64::from(*minor)));
        }
        Kind::Fifo => observed.kind = 'p',
        Kind::Socket => observed.kind = 's',
        Kind::HardLink(_) => unreachable!("resolved by the caller"),
    }
    observed
}

/// Walks a mounted tree (without following symlinks) and reads every xattr with getfattr.
fn observe_mount(root: &Path) -> BTreeMap<PathBuf, Observed> {
    let mut tree = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let path = root.join(&relative);
        let md = std::fs::symlink_metadata(&path).expect("lstat");
        let file_type = md.file_type();
        let kind = if file_type.is_dir() {
            'd'
        } else if file_type.is_file() {
            'f'
        } else if file_type.is_symlink() {
            'l'
        } else if file_type.is_char_device() {
            'c'
        } else if file_type.is_block_device() {
            'b'
        } else if file_type.is_fifo() {
            'p'
        } else {
            's'
        };
        let device = matches!(kind, 'c' | 'b').then(|| {
            (
                nix::sys::stat::major(md.rdev()),
                nix::sys::stat::minor(md.rdev()),
            )
        });
        let content = (kind == 'f').then(|| {
            let bytes = std::fs::read(&path).expect("read");
            blake3::hash(&bytes).to_hex().to_string()
        });
        let target = (kind == 'l').then(|| {
            use std::os::unix::ffi::OsStrExt;
            std::fs::read_link(&path)
                .expect("readlink")
                .as_os_str()
                .as_bytes()
                .to_vec()
        });
        tree.insert(
            relative.clone(),
            Observed {
                kind,
                perm: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: if matches!(kind, 'f' | 'l') {
                    md.size()
                } else {
                    0
                },
                nlink: md.nlink(),
                device,
                mtime: (md.mtime(), md.mtime_nsec()),
                content,
                target,
                xattrs: BTreeMap::new(),
            },
        );
        if kind == 'd' {
            for child in std::fs::read_dir(&path).expect("readdir") {
                pending.push(relative.join(child.expect("entry").file_name()));
            }
        }
    }
    let dump = run_ok(
        Command::new("getfattr")
            .args(["-R", "-h", "-d", "-m", "-", "-e", "hex", "--absolute-names"])
            .arg(root),
    );
    let mut current: Option<PathBuf> = None;
    for line in dump.lines() {
        if let Some(file) = line.strip_prefix("# file: ") {
            let file = Path::new(file).strip_prefix(root).expect("under the mount");
            current = Some(file.to_owned());
        } else if let Some((name, value)) = line.split_once('=') {
            let path = current.as_ref().expect("a file header first");
            let value = value.strip_prefix("0x").unwrap_or(value);
            let observed = tree.get_mut(path).expect("walked");
            observed.xattrs.insert(name.to_owned(), value.to_owned());
        }
    }
    tree
}

fn assert_same_tree(expected: &BTreeMap<PathBuf, Observed>, actual: &BTreeMap<PathBuf, Observed>) {
    for (path, want) in expected {
        let got = actual
            .get(path)
            .unwrap_or_else(|| panic!("{path:?} missing from the mount"));
        assert_eq!(want, got, "{path:?} differs");
    }
    let extra: Vec<&PathBuf> = actual
        .keys()
        .filter(|p| !expected.contains_key(*p))
        .collect();
    assert!(
        extra.is_empty(),
        "unexpected entries in the mount: {extra:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Tests

fn kitchen_sink_round_trips(options: BuildOptions) {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("sink.img");
    let entries = kitchen_sink();
    let timestamp = options.timestamp;
    build(&image, options, &entries);
    assert_fsck_clean(&image);

    // debugfs reads back exactly what went in.
    let su = debugfs(&image, "stat /bin/su");
    assert_eq!(field(&su, "Mode:"), "04755");
    assert_eq!(field(&su, "Links:"), "3");
    let future = debugfs(&image, "stat /home/big-ids/future");
    assert_eq!(field(&future, "User:"), "70000");
    assert_eq!(field(&future, "Group:"), "70001");
    // 2100-01-01: low 32 bits 0xf4865700, epoch bit 1, 5 ns.
    assert_eq!(field(&future, " mtime:"), "0xf4865700:00000015");
    let big_ids = debugfs(&image, "stat /home/big-ids");
    // debugfs prints ids as signed ints.
    let uid: i64 = field(&big_ids, "User:").parse().unwrap();
    assert_eq!(uid as u32, 4_000_000_000);
    assert_eq!(field(&big_ids, " mtime:"), "0xfff0bdc0:ee6b27fc"); // -1e6 s, 999999999 ns
    let device = debugfs(&image, "stat /dev/nvme0n1p9");
    assert!(
        device.contains("Device major/minor number: 259:70000"),
        "{device}"
    );
    let null = debugfs(&image, "stat /dev/null");
    assert!(null.contains("Device major/minor number: 01:03"), "{null}");
    let xattrs = debugfs(&image, "ea_list /var/xattrs");
    for expected in [
        "user.small",
        "user.large (1500)",
        "trusted.overlay.opaque",
        "user.empty",
    ] {
        assert!(xattrs.contains(expected), "{expected} not in:\n{xattrs}");
    }
    let shared_a = debugfs(&image, "stat /var/shared-a");
    let shared_b = debugfs(&image, "stat /var/shared-b");
    assert_eq!(field(&shared_a, "File ACL:"), field(&shared_b, "File ACL:"));
    assert_ne!(field(&shared_a, "File ACL:"), "0");
    let holes = debugfs(&image, "stat /home/big-ids/holes");
    assert!(
        holes.contains("(ETB0)"),
        "13 extents need a tree block:\n{holes}"
    );
    let zeros = debugfs(&image, "stat /home/big-ids/zeros");
    assert_eq!(field(&zeros, "Blockcount:"), "0");
    let dumped = dir.path().join("dash");
    debugfs(&image, &format!("dump /bin/dash {}", dumped.display()));
    assert_eq!(std::fs::read(&dumped).unwrap(), vec![7; 125_000]);
    let lost_found = debugfs(&image, "stat /lost+found");
    assert_eq!(field(&lost_found, "Size:"), "16384");

    // A loop mount shows the tree that went in.
    if !capable("root with loop devices", can_loop_mount()) {
        return;
    }
    let mount = LoopMount::new(&image, true).unwrap();
    let expected = expected_tree(&entries, timestamp);
    assert_same_tree(&expected, &observe_mount(mount.path()));
    let facl = run_ok(
        Command::new("getfacl")
            .args(["-n", "-p", "-d"])
            .arg(mount.path().join("var/log/journal")),
    );
    assert!(facl.contains("group:3000:rwx"), "{facl}");
    let facl = run_ok(
        Command::new("getfacl")
            .args(["-n", "-p"])
            .arg(mount.path().join("var/log/journal/system.journal")),
    );
    for line in [
        "user:1000:r-x",
        "user:70000:r--",
        "group:2000:r--",
        "mask::r-x",
    ] {
        assert!(facl.contains(line), "{line} not in:\n{facl}");
    }
}

#[test]
fn every_entry_kind_round_trips_with_checksums_and_journal() {
    kitchen_sink_round_trips(options());
}

#[test]
fn every_entry_kind_round_trips_without_checksums_or_journal() {
    let mut options = options();
    options.metadata_csum = false;
    options.journal = false;
    options.timestamp = 1_234_567_890;
    kitchen_sink_round_trips(options);
}

#[test]
fn the_guest_can_write_to_the_image() {
    if !capable("e2fsprogs", have_e2fsprogs())
        || !capable("root with loop devices", can_loop_mount())
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rw.img");
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    for entry in kitchen_sink() {
        insert(&mut builder, &entry).unwrap();
    }
    let floor = Sizing::Auto {
        headroom_percent: 20,
        min_bytes: 64 << 20,
    };
    builder.finish(floor).unwrap();
    {
        let mount = LoopMount::new(&image, false).unwrap();
        let root = mount.path();
        std::fs::create_dir(root.join("var/new")).unwrap();
        for i in 0..300 {
            std::fs::write(root.join(format!("var/new/f{i}")), vec![i as u8; 5000]).unwrap();
        }
        std::fs::remove_file(root.join("bin/dash")).unwrap();
        std::fs::write(root.join("var/log/journal/new"), b"acl inherited").unwrap();
        run_ok(Command::new("sync").arg("-f").arg(root));
    }
    assert_fsck_clean(&image);
}

#[test]
fn layers_replace_remove_and_clear_like_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("layers.img");
    let t = (1_650_000_000, 0);
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    let lower = [
        Entry {
            path: "etc",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "etc/keep",
            kind: Kind::File(b"keep".to_vec()),
            meta: meta(0, 0, 0o644, t),
        },
        Entry {
            path: "etc/gone",
            kind: Kind::File(vec![1; 50_000]),
            meta: meta(0, 0, 0o644, t),
        },
        Entry {
            path: "opt",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "opt/a",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "opt/a/b",
            kind: Kind::File(vec![2; 9000]),
            meta: meta(0, 0, 0o644, t),
        },
        Entry {
            path: "opaque",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "opaque/old",
            kind: Kind::File(b"old".to_vec()),
            meta: meta(0, 0, 0o644, t),
        },
        Entry {
            path: "opaque/sub",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "was-file",
            kind: Kind::File(b"f".to_vec()),
            meta: meta(0, 0, 0o644, t),
        },
        Entry {
            path: "linked",
            kind: Kind::File(b"shared".to_vec()),
            meta: meta(0, 0, 0o644, t),
        },
        Entry {
            path: "other-name",
            kind: Kind::HardLink("linked"),
            meta: Metadata::default(),
        },
    ];
    for entry in &lower {
        insert(&mut builder, entry).unwrap();
    }
    // Upper layer: directory over directory keeps children and takes new metadata.
    insert(
        &mut builder,
        &Entry {
            path: "etc",
            kind: Kind::Dir,
            meta: meta(5, 5, 0o750, t),
        },
    )
    .unwrap();
    // Whiteout of a file, of a tree, of something absent.
    assert!(builder.remove(Path::new("etc/gone")).unwrap());
    assert!(builder.remove(Path::new("opt/a")).unwrap());
    assert!(!builder.remove(Path::new("opt/a")).unwrap());
    assert!(!builder.remove(Path::new("no/such/parent")).unwrap());
    // Opaque directory.
    builder.clear_directory(Path::new("opaque")).unwrap();
    insert(
        &mut builder,
        &Entry {
            path: "opaque/new",
            kind: Kind::File(b"new".to_vec()),
            meta: meta(0, 0, 0o644, t),
        },
    )
    .unwrap();
    // A directory replaces a file; a file replaces a directory tree; a symlink a file.
    insert(
        &mut builder,
        &Entry {
            path: "was-file",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o700, t),
        },
    )
    .unwrap();
    insert(
        &mut builder,
        &Entry {
            path: "opt",
            kind: Kind::File(b"now a file".to_vec()),
            meta: meta(0, 0, 0o600, t),
        },
    )
    .unwrap();
    // Replacing one name of a hard-linked inode leaves the other.
    insert(
        &mut builder,
        &Entry {
            path: "linked",
            kind: Kind::Symlink(b"other-name".to_vec()),
            meta: meta(0, 0, 0o777, t),
        },
    )
    .unwrap();

    let info = |path: &str| builder.lookup(Path::new(path));
    assert_eq!(info("etc").unwrap().mode, 0o750);
    assert_eq!(info("etc").unwrap().uid, 5);
    assert!(info("etc/keep").is_some());
    assert!(info("etc/gone").is_none());
    assert!(info("opaque/old").is_none() && info("opaque/sub").is_none());
    assert_eq!(info("opaque").unwrap().links, 2);
    assert_eq!(info("was-file").unwrap().kind, EntryType::Directory);
    assert_eq!(info("opt").unwrap().kind, EntryType::File);
    assert_eq!(
        info("linked"),
        Some(EntryInfo {
            kind: EntryType::Symlink,
            mode: 0o777,
            uid: 0,
            gid: 0,
            size: 10,
            symlink_target: Some(b"other-name".to_vec()),
            links: 1,
        })
    );
    assert_eq!(info("other-name").unwrap().links, 1);
    assert_eq!(info("").unwrap().links, 2 + 4); // lost+found, etc, opaque, was-file
    builder.finish(auto()).unwrap();

    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    assert_fsck_clean(&image);
    if !capable("root with loop devices", can_loop_mount()) {
        return;
    }
    let mount = LoopMount::new(&image, true).unwrap();
    let root = mount.path();
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "etc",
            "linked",
            "lost+found",
            "opaque",
            "opt",
            "other-name",
            "was-file"
        ]
    );
    assert_eq!(std::fs::read(root.join("opt")).unwrap(), b"now a file");
    assert_eq!(std::fs::read(root.join("other-name")).unwrap(), b"shared");
    assert_eq!(
        std::fs::read_link(root.join("linked")).unwrap(),
        Path::new("other-name")
    );
    let opaque: Vec<_> = std::fs::read_dir(root.join("opaque")).unwrap().collect();
    assert_eq!(opaque.len(), 1);
    let etc = std::fs::metadata(root.join("etc")).unwrap();
    assert_eq!((etc.uid(), etc.mode() & 0o7777), (5, 0o750));
    assert_eq!(std::fs::read(root.join("etc/keep")).unwrap(), b"keep");
}

#[test]
fn freed_blocks_are_reused_and_scrubbed() {
    let dir = tempfile::tempdir().unwrap();
    let t = (0, 0);
    let file = |path: &'static str, byte: u8, len: usize| Entry {
        path,
        kind: Kind::File(vec![byte; len]),
        meta: meta(0, 0, 0o644, t),
    };
    // Removing the last file written gives its blocks back to the cursor.
    let mut builder = Ext4Builder::create(&dir.path().join("a.img"), options()).unwrap();
    insert(&mut builder, &file("keep", 1, 4096 * 10)).unwrap();
    insert(&mut builder, &file("secret", 0xEE, 4096 * 100)).unwrap();
    builder.remove(Path::new("secret")).unwrap();
    insert(&mut builder, &file("later", 2, 4096 * 40)).unwrap();
    insert(&mut builder, &file("hole-filler", 3, 4096 * 30)).unwrap();
    let summary = builder.finish(auto()).unwrap();
    assert_eq!(summary.data_blocks, 80);

    // A freed range in the middle is reused by a file that fits, and the rest reads as zeros.
    let image = dir.path().join("b.img");
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    insert(&mut builder, &file("first", 1, 4096 * 10)).unwrap();
    insert(&mut builder, &file("secret", 0xEE, 4096 * 100)).unwrap();
    insert(&mut builder, &file("last", 3, 4096 * 10)).unwrap();
    builder.remove(Path::new("secret")).unwrap();
    insert(&mut builder, &file("reuse", 4, 4096 * 60)).unwrap();
    builder.finish(auto()).unwrap();
    let bytes = std::fs::read(&image).unwrap();
    let secret_block = vec![0xEE; 4096];
    assert!(
        !bytes
            .chunks(4096)
            .any(|block| block == secret_block.as_slice()),
        "bytes of the removed file are still in the image"
    );
    if capable("e2fsprogs", have_e2fsprogs()) {
        assert_fsck_clean(&image);
        let reuse = debugfs(&image, "stat /reuse");
        let last = debugfs(&image, "stat /last");
        let first_block = |stat: &str| -> u64 {
            let extents = &stat[stat.find("EXTENTS:").unwrap()..];
            let span = extents.split(':').nth(2).unwrap();
            span.trim()
                .split('-')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert!(
            first_block(&reuse) < first_block(&last),
            "the freed range was not reused"
        );
    }
}

#[test]
fn hard_links_share_one_inode() {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("links.img");
    let t = (1, 0);
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    for entry in [
        Entry {
            path: "a",
            kind: Kind::File(b"data".to_vec()),
            meta: meta(3, 4, 0o640, t),
        },
        Entry {
            path: "d",
            kind: Kind::Dir,
            meta: meta(0, 0, 0o755, t),
        },
        Entry {
            path: "d/b",
            kind: Kind::HardLink("a"),
            meta: Metadata::default(),
        },
        Entry {
            path: "d/c",
            kind: Kind::HardLink("d/b"),
            meta: Metadata::default(),
        },
        Entry {
            path: "s",
            kind: Kind::Symlink(b"a".to_vec()),
            meta: meta(0, 0, 0o777, t),
        },
        Entry {
            path: "s2",
            kind: Kind::HardLink("s"),
            meta: Metadata::default(),
        },
    ] {
        insert(&mut builder, &entry).unwrap();
    }
    assert_eq!(builder.lookup(Path::new("d/c")).unwrap().links, 3);
    builder.remove(Path::new("a")).unwrap();
    assert_eq!(builder.lookup(Path::new("d/b")).unwrap().links, 2);
    builder.finish(auto()).unwrap();
    assert_fsck_clean(&image);
    let b = debugfs(&image, "stat /d/b");
    let c = debugfs(&image, "stat /d/c");
    assert_eq!(field(&b, "Inode:"), field(&c, "Inode:"));
    assert_eq!(field(&b, "Links:"), "2");
    assert_eq!(field(&b, "User:"), "3");
    assert_eq!(field(&debugfs(&image, "stat /s2"), "Links:"), "2");
}

#[test]
fn errors_name_what_failed_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("errors.img");
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    let m = meta(0, 0, 0o644, (0, 0));
    let file = |bytes: &'static [u8]| Entry {
        path: "f",
        kind: Kind::File(bytes.to_vec()),
        meta: m.clone(),
    };
    insert(&mut builder, &file(b"x")).unwrap();

    let error = builder
        .insert(Path::new("missing/f"), EntryKind::Fifo, &m)
        .unwrap_err();
    assert!(matches!(&error, Ext4Error::ParentMissing { path } if path == Path::new("missing/f")));
    let error = builder
        .insert(Path::new("f/child"), EntryKind::Fifo, &m)
        .unwrap_err();
    assert!(
        matches!(&error, Ext4Error::NotADirectory { path } if path == Path::new("f")),
        "{error}"
    );
    let error = builder
        .insert(
            Path::new("l"),
            EntryKind::HardLink {
                target: "nope".into(),
            },
            &m,
        )
        .unwrap_err();
    assert!(matches!(error, Ext4Error::HardLinkTarget { .. }), "{error}");
    let error = builder
        .insert(
            Path::new("l"),
            EntryKind::HardLink {
                target: "lost+found".into(),
            },
            &m,
        )
        .unwrap_err();
    assert!(error.to_string().contains("is a directory"), "{error}");
    for bad in ["../x", "/abs"] {
        let error = builder
            .insert(Path::new(bad), EntryKind::Fifo, &m)
            .unwrap_err();
        assert!(matches!(error, Ext4Error::InvalidPath { .. }), "{error}");
    }
    let error = builder
        .insert(
            Path::new("s"),
            EntryKind::Symlink { target: Vec::new() },
            &m,
        )
        .unwrap_err();
    assert!(matches!(error, Ext4Error::SymlinkTarget { .. }), "{error}");
    let error = builder
        .insert(
            Path::new("dev"),
            EntryKind::CharDevice {
                major: 5000,
                minor: 1,
            },
            &m,
        )
        .unwrap_err();
    assert!(
        matches!(error, Ext4Error::DeviceNumber { major: 5000, .. }),
        "{error}"
    );
    let mut bad_xattr = m.clone();
    bad_xattr.xattrs = vec![(b"system.nfs4_acl".to_vec(), b"x".to_vec())];
    let error = builder
        .insert(Path::new("x"), EntryKind::Fifo, &bad_xattr)
        .unwrap_err();
    assert!(error.to_string().contains("system.nfs4_acl"), "{error}");
    let mut bad_acl = m.clone();
    bad_acl.xattrs = vec![(b"system.posix_acl_access".to_vec(), vec![1, 0, 0, 0])];
    let error = builder
        .insert(Path::new("x"), EntryKind::Fifo, &bad_acl)
        .unwrap_err();
    assert!(error.to_string().contains("invalid POSIX ACL"), "{error}");
    let mut too_many = m.clone();
    too_many.xattrs = (0..5)
        .map(|i| (format!("user.{i}").into_bytes(), vec![0; 1000]))
        .collect();
    let error = builder
        .insert(Path::new("x"), EntryKind::Fifo, &too_many)
        .unwrap_err();
    assert!(matches!(error, Ext4Error::XattrsTooLarge { .. }), "{error}");
    let error = builder.clear_directory(Path::new("f")).unwrap_err();
    assert!(matches!(error, Ext4Error::NotADirectory { .. }), "{error}");

    // A short read fails the entry, not the builder.
    let error = builder
        .insert(
            Path::new("short"),
            EntryKind::File {
                size: 10_000,
                data: &mut &[1u8; 10][..],
            },
            &m,
        )
        .unwrap_err();
    assert!(
        matches!(&error, Ext4Error::DataRead { entry, size: 10_000, .. } if entry == Path::new("short"))
    );
    assert!(builder.lookup(Path::new("short")).is_none());
    insert(&mut builder, &file(b"still usable")).unwrap();

    // Too small a fixed size names the size needed, and the image is gone.
    let error = builder.finish(Sizing::Fixed(1 << 20)).unwrap_err();
    match error {
        Ext4Error::TooSmall { needed, requested } => {
            assert_eq!(requested, 1 << 20);
            assert!(needed > requested && needed < 64 << 20, "needed {needed}");
        }
        other => panic!("expected TooSmall, got {other}"),
    }
    assert!(!image.exists());

    // Dropping an unfinished builder removes the image.
    let builder = Ext4Builder::create(&image, options()).unwrap();
    assert!(image.exists());
    drop(builder);
    assert!(!image.exists());

    // max_bytes stops a runaway input early.
    let mut limited = options();
    limited.max_bytes = Some(1 << 20);
    let mut builder = Ext4Builder::create(&image, limited).unwrap();
    let big = vec![1u8; 2 << 20];
    let error = builder
        .insert(
            Path::new("big"),
            EntryKind::File {
                size: big.len() as u64,
                data: &mut &big[..],
            },
            &m,
        )
        .unwrap_err();
    assert!(
        matches!(
            error,
            Ext4Error::TooSmall {
                requested: 1048576,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn the_same_input_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let build_once = |name: &str| {
        let image = dir.path().join(name);
        let mut builder = Ext4Builder::create(&image, options()).unwrap();
        for entry in kitchen_sink() {
            insert(&mut builder, &entry).unwrap();
        }
        builder.remove(Path::new("bin/dash")).unwrap();
        let filler = Entry {
            path: "var/filler",
            kind: Kind::File(vec![3; 30_000]),
            meta: meta(0, 0, 0o644, (0, 0)),
        };
        insert(&mut builder, &filler).unwrap();
        builder.finish(auto()).unwrap();
        std::fs::read(&image).unwrap()
    };
    let first = build_once("one.img");
    let second = build_once("two.img");
    assert!(first == second, "two builds of the same input differ");
    let mut other = options();
    other.uuid[0] ^= 1;
    let image = dir.path().join("three.img");
    build(&image, other, &kitchen_sink());
    assert_ne!(std::fs::read(&image).unwrap(), first);
}

#[test]
fn lost_found_is_created_unless_the_input_has_one() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lf.img");
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    assert_eq!(builder.lookup(Path::new("lost+found")).unwrap().mode, 0o700);
    let input = Entry {
        path: "lost+found",
        kind: Kind::Dir,
        meta: meta(0, 0, 0o755, (42, 0)),
    };
    insert(&mut builder, &input).unwrap();
    assert_eq!(builder.lookup(Path::new("lost+found")).unwrap().mode, 0o755);
    builder.finish(auto()).unwrap();
    if capable("e2fsprogs", have_e2fsprogs()) {
        assert_fsck_clean(&image);
        let stat = debugfs(&image, "stat /lost+found");
        assert_eq!(field(&stat, "Inode:"), "11");
        assert_eq!(field(&stat, "Mode:"), "0755");
    }
}

#[test]
fn sizes_follow_the_request() {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let content = || {
        (0..50)
            .map(|i| Entry {
                path: Box::leak(format!("f{i}").into_boxed_str()),
                kind: Kind::File(vec![i as u8 + 1; 100_000]),
                meta: meta(0, 0, 0o644, (0, 0)),
            })
            .collect::<Vec<_>>()
    };
    // Auto: room to spare, and the floor.
    let image = dir.path().join("auto.img");
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    for entry in content() {
        insert(&mut builder, &entry).unwrap();
    }
    let summary = builder
        .finish(Sizing::Auto {
            headroom_percent: 50,
            min_bytes: 0,
        })
        .unwrap();
    let used = summary.blocks - summary.free_blocks;
    assert!(summary.free_blocks * 100 >= used * 45, "{summary:?}");
    assert_eq!(
        std::fs::metadata(&image).unwrap().len(),
        summary.image_bytes
    );
    assert_eq!(summary.image_bytes % (1 << 20), 0);
    assert!(summary.inodes >= 50 + 10 + 256);
    assert_fsck_clean(&image);
    let image = dir.path().join("floor.img");
    let builder = Ext4Builder::create(&image, options()).unwrap();
    let summary = builder
        .finish(Sizing::Auto {
            headroom_percent: 0,
            min_bytes: 100 << 20,
        })
        .unwrap();
    assert_eq!(summary.image_bytes, 100 << 20);
    assert_eq!(summary.journal_blocks, 1024); // as mke2fs for 100 MiB of 4 KiB blocks
    assert_fsck_clean(&image);

    // Fixed: exactly the bytes asked for; beyond 128 groups the descriptors use meta_bg.
    let image = dir.path().join("fixed.img");
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    for entry in content() {
        insert(&mut builder, &entry).unwrap();
    }
    let requested = (20 << 30) + 12345;
    let summary = builder.finish(Sizing::Fixed(requested)).unwrap();
    assert_eq!(std::fs::metadata(&image).unwrap().len(), requested);
    assert_eq!(summary.inodes, (20u64 << 30) / 16384);
    assert_fsck_clean(&image);
    let features = run_ok(Command::new("dumpe2fs").arg("-h").arg(&image));
    assert!(features.contains("meta_bg"), "{features}");
    if capable("root with loop devices", can_loop_mount()) {
        let mount = LoopMount::new(&image, true).unwrap();
        assert_eq!(
            std::fs::read(mount.path().join("f49")).unwrap(),
            vec![50; 100_000]
        );
        let stat = nix::sys::statvfs::statvfs(mount.path()).unwrap();
        assert!(stat.blocks() * stat.fragment_size() > 19 << 30);
    }
}

#[test]
fn a_large_directory_gets_a_two_level_hash_tree() {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("large-dir.img");
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    let m = meta(0, 0, 0o644, (0, 0));
    builder
        .insert(Path::new("d"), EntryKind::Directory, &m)
        .unwrap();
    // Long names: 20,000 of them fill more leaves than the root indexes, so a level of index
    // nodes is needed.
    let name = |i: usize| format!("d/entry-{i:05}-{}", "x".repeat(90));
    for i in 0..20_000 {
        let content = format!("{i}");
        builder
            .insert(
                Path::new(&name(i)),
                EntryKind::File {
                    size: content.len() as u64,
                    data: &mut content.as_bytes(),
                },
                &m,
            )
            .unwrap();
    }
    builder.finish(auto()).unwrap();
    assert_fsck_clean(&image);
    let htree = debugfs(&image, "htree /d");
    assert_eq!(field(&htree, "Indirect levels:"), "1");
    if !capable("root with loop devices", can_loop_mount()) {
        return;
    }
    let mount = LoopMount::new(&image, true).unwrap();
    assert_eq!(
        std::fs::read_dir(mount.path().join("d")).unwrap().count(),
        20_000
    );
    for i in [0, 1, 7777, 19_999] {
        let read = std::fs::read_to_string(mount.path().join(name(i))).unwrap();
        assert_eq!(read, i.to_string());
    }
}

/// Generates a large file on the fly: 2 MiB of data in every 16 MiB, zeros elsewhere. Records
/// the largest read asked of it, to show the writer streams.
struct Generated {
    size: u64,
    position: u64,
    largest_read: usize,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.largest_read = self.largest_read.max(buf.len());
        let len = (buf.len() as u64).min(self.size - self.position) as usize;
        let mut done = 0;
        while done < len {
            // One value per 4 KiB block: data in the first 2 MiB of every 16 MiB.
            let at = self.position + done as u64;
            let block_end = (at / 4096 + 1) * 4096;
            let count = ((block_end - at) as usize).min(len - done);
            let value = if at % (16 << 20) < (2 << 20) {
                (at / 4096 % 251) as u8 + 1
            } else {
                0
            };
            buf[done..done + count].fill(value);
            done += count;
        }
        self.position += len as u64;
        Ok(len)
    }
}

const HWM_MARKER: &str = "BANGER_EXT4_PEAK_RSS_KIB=";
const MEMORY_CHILD_ENV: &str = "BANGER_EXT4_MEMORY_CHILD_IMAGE";

/// Runs in a child process (see the test below) so its peak RSS is its own.
#[test]
#[ignore = "run by multi_gib_images_stream_in_bounded_memory in a child process"]
fn memory_child() {
    let Ok(image) = std::env::var(MEMORY_CHILD_ENV) else {
        return;
    };
    let mut builder = Ext4Builder::create(Path::new(&image), options()).unwrap();
    let m = meta(0, 0, 0o644, (0, 0));
    let mut data = Generated {
        size: 3 << 30,
        position: 0,
        largest_read: 0,
    };
    builder
        .insert(
            Path::new("big"),
            EntryKind::File {
                size: data.size,
                data: &mut data,
            },
            &m,
        )
        .unwrap();
    assert!(
        data.largest_read <= 1 << 20,
        "asked for {} bytes at once",
        data.largest_read
    );
    for d in 0..200 {
        let dir = format!("d{d}");
        builder
            .insert(Path::new(&dir), EntryKind::Directory, &m)
            .unwrap();
        for f in 0..1000 {
            let path = format!("{dir}/file-number-{f}");
            builder
                .insert(
                    Path::new(&path),
                    EntryKind::File {
                        size: 0,
                        data: &mut io::empty(),
                    },
                    &m,
                )
                .unwrap();
        }
    }
    builder.finish(auto()).unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .expect("VmHWM")
        .trim()
        .trim_end_matches(" kB")
        .to_owned();
    println!("{HWM_MARKER}{peak}");
}

#[test]
fn multi_gib_images_stream_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.img");
    let exe = std::env::current_exe().unwrap();
    let stdout = run_ok(
        Command::new(exe)
            .args([
                "ext4::memory_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(MEMORY_CHILD_ENV, &image),
    );
    let peak_kib: u64 = stdout
        .lines()
        .find_map(|l| l.split(HWM_MARKER).nth(1))
        .unwrap_or_else(|| panic!("no peak RSS in the child's output:\n{stdout}"))
        .parse()
        .unwrap();
    eprintln!(
        "3 GiB file + 200,000 entries: peak RSS {} MiB",
        peak_kib / 1024
    );
    assert!(peak_kib < 256 * 1024, "peak RSS {peak_kib} KiB");
    let on_disk = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(
        on_disk < 600 << 20,
        "holes were written: {on_disk} bytes on disk"
    );
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    assert_fsck_clean(&image);
    let stat = debugfs(&image, "stat /big");
    assert_eq!(field(&stat, "Size:"), (3u64 << 30).to_string());
    assert!(
        stat.contains("(ETB0)"),
        "192 extents need a tree:\n{}",
        &stat[..stat.len().min(2000)]
    );
    if !capable("root with loop devices", can_loop_mount()) {
        return;
    }
    let mount = LoopMount::new(&image, true).unwrap();
    let mut file = std::fs::File::open(mount.path().join("big")).unwrap();
    let mut expected = Generated {
        size: 3 << 30,
        position: 0,
        largest_read: 0,
    };
    let (mut got, mut want) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = file.read(&mut got).unwrap();
        if n == 0 {
            break;
        }
        expected.read_exact(&mut want[..n]).unwrap();
        assert!(
            got[..n] == want[..n],
            "content differs near byte {}",
            expected.position
        );
    }
    assert_eq!(expected.position, 3 << 30);
    assert_eq!(
        std::fs::read_dir(mount.path().join("d199"))
            .unwrap()
            .count(),
        1000
    );
}

#[test]
fn link_counts_at_their_limits() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("limits.img");
    let m = meta(0, 0, 0o755, (0, 0));
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    // More subdirectories than a link count holds: dir_nlink says 1.
    builder
        .insert(Path::new("many"), EntryKind::Directory, &m)
        .unwrap();
    for i in 0..65_100 {
        let path = format!("many/{i}");
        builder
            .insert(Path::new(&path), EntryKind::Directory, &m)
            .unwrap();
    }
    // The most hard links one inode may have, then one too many.
    builder
        .insert(Path::new("links"), EntryKind::Directory, &m)
        .unwrap();
    builder
        .insert(
            Path::new("links/0"),
            EntryKind::File {
                size: 1,
                data: &mut &b"x"[..],
            },
            &m,
        )
        .unwrap();
    for i in 1..65_000 {
        let path = format!("links/{i}");
        let target = PathBuf::from("links/0");
        builder
            .insert(Path::new(&path), EntryKind::HardLink { target }, &m)
            .unwrap();
    }
    let error = builder
        .insert(
            Path::new("links/extra"),
            EntryKind::HardLink {
                target: "links/0".into(),
            },
            &m,
        )
        .unwrap_err();
    assert!(matches!(error, Ext4Error::TooManyLinks { .. }), "{error}");
    builder.finish(auto()).unwrap();
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    assert_fsck_clean(&image);
    assert_eq!(field(&debugfs(&image, "stat /many"), "Links:"), "1");
    assert_eq!(
        field(&debugfs(&image, "stat /links/64999"), "Links:"),
        "65000"
    );
}

#[test]
fn long_and_non_ascii_names_hash_like_the_kernel() {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("names.img");
    let m = meta(0, 0, 0o644, (0, 0));
    let mut builder = Ext4Builder::create(&image, options()).unwrap();
    builder
        .insert(Path::new("d"), EntryKind::Directory, &m)
        .unwrap();
    // Bytes ≥ 0x80 hash differently with signed and unsigned chars; e2fsck checks every
    // entry against the superblock's choice.
    let mut names: Vec<Vec<u8>> = (0..600)
        .map(|i| {
            let mut name = format!("caf\u{e9}-{i}-").into_bytes();
            name.extend_from_slice(&[0xff, 0xfe, b'a' + (i % 26) as u8]);
            name
        })
        .collect();
    names.push(vec![b'n'; 255]);
    names.push([vec![0xc3; 254], vec![b'z']].concat());
    for name in &names {
        let path = Path::new("d").join(std::ffi::OsStr::from_bytes(name));
        builder.insert(&path, EntryKind::Fifo, &m).unwrap();
    }
    let too_long = Path::new("d").join("x".repeat(256));
    let error = builder.insert(&too_long, EntryKind::Fifo, &m).unwrap_err();
    assert!(matches!(error, Ext4Error::InvalidPath { .. }), "{error}");
    builder.finish(auto()).unwrap();
    assert_fsck_clean(&image);
    assert_eq!(field(&debugfs(&image, "htree /d"), "Indirect levels:"), "0");
    if !capable("root with loop devices", can_loop_mount()) {
        return;
    }
    let mount = LoopMount::new(&image, true).unwrap();
    for name in &names {
        let path = mount
            .path()
            .join("d")
            .join(std::ffi::OsStr::from_bytes(name));
        assert!(
            std::fs::symlink_metadata(&path).is_ok(),
            "lookup of {path:?} failed"
        );
    }
}
