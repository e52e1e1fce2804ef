//! The ext4 reader and the tar exporter against real images. One source tree (every entry
//! type, odd owners and modes, attributes and ACLs, a 3000-entry directory, a sparse file
//! with a deep extent tree, long names) goes into images made by `mkfs.ext4 -d` in several
//! configurations and by banger's writer; the reader must give the tree back exactly, the
//! export must be byte-for-byte repeatable, readable by `tar::Archive` and GNU tar, and
//! survive a round trip through `build_rootfs`. Overlay upper directories must become OCI
//! diffs, and corrupt images must fail with an error, never a panic or a hang.
//!
//! Needs root (mknod, chown, `trusted.*` attributes), e2fsprogs and the attr tools; `setfacl`
//! only for the ACL part. Without them the tests skip, except under
//! `BANGER_TEST_REQUIRE_ALL=1`, where a missing capability fails.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use banger::ext4::{
    BuildOptions, EntryKind, ExcludeRule, ExportError, ExportOptions, Ext4Builder, Ext4ReadError,
    Ext4Reader, FileKind, InodeNo, Metadata, Sizing, export_tar, export_tar_to_file,
};
use banger::rootfs::layers::{Layer, RootfsOptions, build_rootfs};

use crate::ext4::{LoopMount, can_loop_mount};
use crate::support::{capable, find_program, have_e2fsprogs, pseudo_random, run, run_ok};

// ---------------------------------------------------------------------------------------
// Capabilities

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// mkfs.ext4 and friends, root, and the attr tools: what every test here needs.
fn ready() -> bool {
    capable(
        "e2fsprogs (mkfs.ext4, e2fsck, debugfs, dumpe2fs)",
        have_e2fsprogs() && find_program("mkfs.ext4").is_some(),
    ) && capable("root, for mknod, chown and trusted.* attributes", is_root())
        && capable(
            "setfattr and getfattr (the attr package)",
            find_program("setfattr").is_some() && find_program("getfattr").is_some(),
        )
}

// ---------------------------------------------------------------------------------------
// Trees as comparable data

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File { size: u64, hash: String },
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: Kind,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For an inode with several names: the smallest of its paths.
    link_group: Option<Vec<u8>>,
}

/// Relative path (`/`-joined bytes) → entry.
type Tree = BTreeMap<Vec<u8>, Node>;

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Sets `link_group` of every path in each group of names of one inode.
fn label_groups<K: std::hash::Hash + Eq>(tree: &mut Tree, groups: HashMap<K, Vec<Vec<u8>>>) {
    for paths in groups.into_values() {
        if paths.len() < 2 {
            continue;
        }
        let label = paths.iter().min().cloned();
        for path in paths {
            tree.get_mut(&path).unwrap().link_group = label.clone();
        }
    }
}

/// Panics with a readable list of differences.
fn assert_same_tree(expected: &Tree, actual: &Tree, context: &str) {
    let mut problems = Vec::new();
    for (path, node) in expected {
        match actual.get(path) {
            None => problems.push(format!("missing {}", show(path))),
            Some(got) if got != node => problems.push(format!(
                "{} differs:\n   expected {node:?}\n   actual   {got:?}",
                show(path)
            )),
            Some(_) => {}
        }
    }
    for path in actual.keys() {
        if !expected.contains_key(path) {
            problems.push(format!("unexpected {}", show(path)));
        }
    }
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(15).collect();
        panic!(
            "{context}: {} differences, first ones:\n{}",
            problems.len(),
            shown
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Size and blake3 of everything `reader` gives, read in 64 KiB pieces.
fn hash_reader(reader: impl Read) -> (u64, String) {
    hash_with_buffer(reader, 1 << 16)
}

// ---------------------------------------------------------------------------------------
// The source tree

const BASE_TIME: i64 = 1_600_000_000;
/// 2036: beyond "now", still within signed 32 bits.
const FUTURE: i64 = 2_100_000_000;
/// 2100: needs ext4's epoch bits.
const FAR_FUTURE: i64 = 4_102_444_800;
const LONG_TARGET: &str = "a-symlink-target-well-over-one-hundred-bytes/so-that-tar-needs/a-gnu-long-link-entry/to-carry-it/whole/target";
const HTREE_ENTRIES: usize = 3000;
const SPARSE_RUNS: u64 = 400;

fn setfattr(path: &Path, name: &str, value: Option<&str>) {
    let mut command = Command::new("setfattr");
    command.arg("-h").arg("-n").arg(name);
    if let Some(value) = value {
        command.arg("-v").arg(value);
    }
    run_ok(command.arg(path));
}

fn mknod(path: &Path, kind: nix::sys::stat::SFlag, major: u64, minor: u64) {
    nix::sys::stat::mknod(
        path,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(0o640),
        nix::sys::stat::makedev(major, minor),
    )
    .unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
}

fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let time = nix::sys::time::TimeSpec::new(secs, nanos);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &time,
        &time,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// One file with `SPARSE_RUNS` 4 KiB data chunks, each followed by a 4 KiB hole, and a hole
/// at the end: `SPARSE_RUNS` extents, more than the inode's 4, so the tree has depth ≥ 1.
fn write_sparse(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    for run in 0..SPARSE_RUNS {
        let chunk = vec![(run % 251 + 1) as u8; 4096];
        file.write_all_at(&chunk, run * 8192).unwrap();
    }
    file.set_len(SPARSE_RUNS * 8192 + 3 * 4096 + 17).unwrap();
}

/// Builds the source tree at `root`. Returns whether ACLs were set.
fn make_source(root: &Path) -> bool {
    use nix::sys::stat::SFlag;
    let p = |relative: &str| root.join(relative);
    std::fs::create_dir(root).unwrap();
    std::fs::write(p("empty"), b"").unwrap();
    std::fs::write(p("small"), b"hello, ext4\n").unwrap();
    std::fs::write(p("big"), pseudo_random((3 << 20) + 123, 7)).unwrap();
    write_sparse(&p("sparse"));

    std::fs::create_dir(p("htree")).unwrap();
    for i in 0..HTREE_ENTRIES {
        let content = if i % 500 == 0 {
            format!("entry {i}\n")
        } else {
            String::new()
        };
        std::fs::write(p(&format!("htree/entry-{i:05}")), content).unwrap();
    }

    std::os::unix::fs::symlink("small", p("link-short")).unwrap();
    std::os::unix::fs::symlink(LONG_TARGET, p("link-long")).unwrap();
    std::os::unix::fs::symlink("a/./b//c", p("link-odd")).unwrap(); // kept byte for byte

    std::fs::create_dir(p("deep")).unwrap();
    std::fs::write(p("hard-a"), b"two names\n").unwrap();
    std::fs::hard_link(p("hard-a"), p("deep/hard-b")).unwrap();
    let mut long_dir = PathBuf::from("deep");
    for i in 0..4 {
        long_dir.push(format!("directory-{i}-with-a-rather-long-name"));
        std::fs::create_dir(root.join(&long_dir)).unwrap();
    }
    let long_file = long_dir.join("and-finally-a-file-with-a-long-name-too");
    assert!(long_file.as_os_str().len() > 100);
    std::fs::write(root.join(&long_file), b"deep\n").unwrap();

    nix::unistd::mkfifo(&p("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    std::fs::create_dir(p("dev")).unwrap();
    mknod(&p("dev/null"), SFlag::S_IFCHR, 1, 3);
    mknod(&p("dev/sda1"), SFlag::S_IFBLK, 8, 1);
    mknod(&p("dev/wide"), SFlag::S_IFCHR, 300, 70_000); // the new 12:20 encoding
    drop(std::os::unix::net::UnixListener::bind(p("sock")).unwrap());

    std::fs::write(p("setuid"), b"#!/bin/sh\n").unwrap();
    std::fs::create_dir(p("sticky")).unwrap();
    std::fs::create_dir(p("setgid")).unwrap();
    std::fs::write(p("owned"), b"owned\n").unwrap();
    std::fs::write(p("owned-high"), b"owned high\n").unwrap();
    std::os::unix::fs::lchown(p("owned"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(p("owned-high"), Some(70_000), Some(80_000)).unwrap();
    std::os::unix::fs::lchown(p("link-short"), Some(1234), Some(1234)).unwrap();
    std::os::unix::fs::lchown(p("setuid"), Some(0), Some(50)).unwrap();
    chmod(&p("setuid"), 0o4755);
    chmod(&p("sticky"), 0o1777);
    chmod(&p("setgid"), 0o2775);
    chmod(&p("small"), 0o600);

    std::fs::write(p("attrs"), b"with attributes\n").unwrap();
    setfattr(&p("attrs"), "user.comment", Some("hello"));
    setfattr(&p("attrs"), "user.binary", Some("0x00ff10"));
    setfattr(&p("attrs"), "user.empty", None);
    setfattr(&p("attrs"), "security.test", Some("label"));
    setfattr(&p("attrs"), "trusted.kept", Some("0x0102"));
    setfattr(&p("sticky"), "user.dir", Some("x"));
    let big_value = format!("0x{}", "ab".repeat(600));
    setfattr(&p("owned"), "user.big", Some(&big_value)); // beyond the inode: a block

    std::fs::write(p("future"), b"later\n").unwrap();
    std::fs::write(p("far-future"), b"much later\n").unwrap();

    let acls = capable(
        "setfacl (the acl package)",
        find_program("setfacl").is_some(),
    );
    if acls {
        std::fs::write(p("acl-file"), b"acl\n").unwrap();
        run_ok(
            Command::new("setfacl")
                .args(["-m", "u:1000:r-x,g:2000:r--"])
                .arg(p("acl-file")),
        );
        std::fs::create_dir(p("acl-dir")).unwrap();
        run_ok(
            Command::new("setfacl")
                .args(["-m", "u:1000:rwx", "-d", "-m", "u:1000:rwx,g:3000:r-x"])
                .arg(p("acl-dir")),
        );
    }

    // Times last (creating children changes a directory's), children before parents.
    let mut paths: Vec<PathBuf> = walk_paths(root);
    paths.sort();
    for (i, path) in paths.iter().enumerate().rev() {
        set_mtime(path, BASE_TIME + i as i64, 123_456_789);
    }
    set_mtime(&p("future"), FUTURE, 0);
    set_mtime(&p("far-future"), FAR_FUTURE, 5);
    acls
}

fn walk_paths(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        out.push(path.clone());
        if meta.is_dir() {
            out.extend(walk_paths(&path));
        }
    }
    out
}

/// Every attribute of every entry under `root`, as the kernel reports them
/// (`getfattr`'s hex dump: ACLs in the user-space format).
fn source_xattrs(root: &Path) -> HashMap<PathBuf, BTreeMap<Vec<u8>, Vec<u8>>> {
    let output = run(Command::new("getfattr")
        .args([
            "-R",
            "-P",
            "-h",
            "-d",
            "-m",
            "-",
            "-e",
            "hex",
            "--absolute-names",
        ])
        .arg(root))
    .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8(output.stdout).unwrap();
    let mut out: HashMap<PathBuf, BTreeMap<Vec<u8>, Vec<u8>>> = HashMap::new();
    let mut current: Option<PathBuf> = None;
    for line in text.lines() {
        if let Some(file) = line.strip_prefix("# file: ") {
            current = Some(PathBuf::from(file));
        } else if let Some((name, value)) = line.split_once('=') {
            let value = value.strip_prefix("0x").expect("hex value");
            let bytes = (0..value.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&value[i..i + 2], 16).unwrap())
                .collect();
            out.entry(current.clone().expect("a file line first"))
                .or_default()
                .insert(name.as_bytes().to_vec(), bytes);
        } else if !line.is_empty() {
            // A name with an empty value prints without `=`.
            out.entry(current.clone().expect("a file line first"))
                .or_default()
                .insert(line.as_bytes().to_vec(), Vec::new());
        }
    }
    out
}

/// The source tree as the kernel shows it.
fn scan_source(root: &Path) -> Tree {
    let xattrs = source_xattrs(root);
    let mut tree = Tree::new();
    let mut groups: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    for path in walk_paths(root) {
        let relative = path
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let rdev = meta.rdev();
        let device = (
            nix::sys::stat::major(rdev) as u32,
            nix::sys::stat::minor(rdev) as u32,
        );
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            let (size, hash) = hash_reader(std::fs::File::open(&path).unwrap());
            Kind::File { size, hash }
        } else if ft.is_symlink() {
            Kind::Symlink(
                std::fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if ft.is_char_device() {
            Kind::Char(device.0, device.1)
        } else if ft.is_block_device() {
            Kind::Block(device.0, device.1)
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            assert!(ft.is_socket());
            Kind::Socket
        };
        if !ft.is_dir() && meta.nlink() > 1 {
            groups
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(relative.clone());
        }
        tree.insert(
            relative,
            Node {
                kind,
                perm: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: (meta.mtime(), meta.mtime_nsec() as u32),
                xattrs: xattrs.get(&path).cloned().unwrap_or_default(),
                link_group: None,
            },
        );
    }
    label_groups(&mut tree, groups);
    tree
}

/// What mke2fs 1.47.0 stores of a time: the low 32 bits as signed seconds, no nanoseconds.
fn as_mkfs_stores(mut tree: Tree) -> Tree {
    for node in tree.values_mut() {
        node.mtime = (i64::from(node.mtime.0 as u32 as i32), 0);
    }
    tree
}

/// What a tar export carries: no sockets, whole seconds.
fn as_tar_carries(mut tree: Tree) -> Tree {
    tree.retain(|_, node| node.kind != Kind::Socket);
    for node in tree.values_mut() {
        node.mtime.1 = 0;
    }
    tree
}

// ---------------------------------------------------------------------------------------
// Reading back

/// The whole tree of an image through the reader's public API (`lost+found` left out).
fn scan_image(reader: &Ext4Reader) -> Tree {
    let mut tree = Tree::new();
    let mut groups: HashMap<InodeNo, Vec<Vec<u8>>> = HashMap::new();
    let mut stack = vec![(InodeNo::ROOT, Vec::new())];
    while let Some((dir, dir_path)) = stack.pop() {
        for entry in reader.read_dir(dir).unwrap() {
            if dir_path.is_empty() && entry.name == b"lost+found" {
                // Not compared, but read: its empty blocks hold one entry spanning the block
                // (with 64 KiB blocks, the special record length encoding).
                assert_eq!(reader.read_dir(entry.ino).unwrap(), []);
                continue;
            }
            let path = join(&dir_path, &entry.name);
            let info = reader.inode(entry.ino).unwrap();
            let device = info.device.unwrap_or((0, 0));
            let kind = match info.kind {
                FileKind::Directory => {
                    stack.push((entry.ino, path.clone()));
                    Kind::Dir
                }
                FileKind::Regular => {
                    let (size, hash) = hash_reader(reader.open_file(entry.ino).unwrap());
                    assert_eq!(size, info.size, "{}: bytes read vs size", show(&path));
                    Kind::File { size, hash }
                }
                FileKind::Symlink => Kind::Symlink(reader.symlink_target(entry.ino).unwrap()),
                FileKind::CharDevice => Kind::Char(device.0, device.1),
                FileKind::BlockDevice => Kind::Block(device.0, device.1),
                FileKind::Fifo => Kind::Fifo,
                FileKind::Socket => Kind::Socket,
            };
            if let Some(file_type) = entry.file_type {
                assert_eq!(file_type, info.kind, "{}: dirent type", show(&path));
            }
            if info.kind != FileKind::Directory && info.nlink > 1 {
                groups.entry(entry.ino).or_default().push(path.clone());
            }
            let node = Node {
                kind,
                perm: u32::from(info.perm),
                uid: info.uid,
                gid: info.gid,
                mtime: info.mtime,
                xattrs: reader.xattrs(entry.ino).unwrap().into_iter().collect(),
                link_group: None,
            };
            assert!(
                tree.insert(path.clone(), node).is_none(),
                "{} twice",
                show(&path)
            );
        }
    }
    label_groups(&mut tree, groups);
    tree
}

/// A tar stream as a tree, plus its entry names in order.
fn scan_tar(bytes: &[u8]) -> (Tree, Vec<Vec<u8>>) {
    let mut archive = tar::Archive::new(bytes);
    let mut tree = Tree::new();
    let mut order = Vec::new();
    let mut links: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path_bytes().into_owned();
        order.push(path.clone());
        let header = entry.header().clone();
        let mut xattrs = BTreeMap::new();
        let mut mtime = header.mtime().unwrap() as i64;
        if let Some(extensions) = entry.pax_extensions().unwrap() {
            for extension in extensions {
                let extension = extension.unwrap();
                if let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.insert(name.to_vec(), extension.value_bytes().to_vec());
                } else if extension.key_bytes() == b"mtime" {
                    mtime = extension.value().unwrap().parse().unwrap();
                }
            }
        }
        let device = || {
            (
                header.device_major().unwrap().unwrap(),
                header.device_minor().unwrap().unwrap(),
            )
        };
        let kind = match header.entry_type() {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular => {
                let (size, hash) = hash_reader(&mut entry);
                Kind::File { size, hash }
            }
            tar::EntryType::Symlink => Kind::Symlink(entry.link_name_bytes().unwrap().into_owned()),
            tar::EntryType::Char => Kind::Char(device().0, device().1),
            tar::EntryType::Block => Kind::Block(device().0, device().1),
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::Link => {
                links.push((path, entry.link_name_bytes().unwrap().into_owned()));
                continue;
            }
            other => panic!("unexpected entry type {other:?} for {}", show(&path)),
        };
        assert!(
            header.username_bytes().is_none_or(|name| name.is_empty()),
            "no user names"
        );
        let node = Node {
            kind,
            perm: header.mode().unwrap(),
            uid: header.uid().unwrap() as u32,
            gid: header.gid().unwrap() as u32,
            mtime: (mtime, 0),
            xattrs,
            link_group: None,
        };
        assert!(
            tree.insert(path.clone(), node).is_none(),
            "{} twice",
            show(&path)
        );
    }
    let mut groups: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
    for (path, target) in links {
        let node = tree
            .get(&target)
            .unwrap_or_else(|| panic!("hard link {} to missing {}", show(&path), show(&target)))
            .clone();
        tree.insert(path.clone(), node);
        let group = groups.entry(target.clone()).or_insert_with(|| vec![target]);
        group.push(path);
    }
    label_groups(&mut tree, groups);
    (tree, order)
}

fn export(
    reader: &Ext4Reader,
    root: &str,
    options: &ExportOptions,
) -> (Vec<u8>, banger::ext4::ExportSummary) {
    let mut out = Vec::new();
    let summary = export_tar(reader, Path::new(root), &mut out, options)
        .unwrap_or_else(|e| panic!("export of {}: {e}", reader.path().display()));
    (out, summary)
}

// ---------------------------------------------------------------------------------------
// Making images

fn sparse_file(path: &Path, size: &str) {
    run_ok(Command::new("truncate").args(["-s", size]).arg(path));
}

fn mkfs(image: &Path, source: &Path, size: &str, args: &[&str]) {
    sparse_file(image, size);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=1"])
            .args(args)
            .arg("-d")
            .arg(source)
            .arg(image),
    );
}

/// `e2fsck -fyD`: re-indexes every directory (hash trees above one block). Exit 1 means
/// "file system changed", which is the point.
fn reindex(image: &Path) {
    let output = Command::new("e2fsck")
        .arg("-fyD")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        matches!(output.status.code(), Some(0 | 1)),
        "e2fsck -fyD {}: {output:?}",
        image.display()
    );
}

fn builder_options() -> BuildOptions {
    let mut options = BuildOptions::with_seed(b"banger ext4 reader tests");
    options.sync = false;
    options
}

fn auto_size() -> Sizing {
    Sizing::Auto {
        headroom_percent: 20,
        min_bytes: 0,
    }
}

/// The source tree written by banger's writer, entry by entry.
fn banger_image(image: &Path, source: &Path, tree: &Tree) {
    let mut builder = Ext4Builder::create(image, builder_options()).unwrap();
    let mut first_names: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    // BTreeMap order puts "a" before "a/b" but may put "a-b" between them; parents exist
    // either way because "a" < "a/…" always.
    for (path, node) in tree {
        let os_path = Path::new(OsStr::from_bytes(path));
        let meta = Metadata {
            uid: node.uid,
            gid: node.gid,
            mode: node.perm,
            mtime: node.mtime,
            xattrs: node.xattrs.clone().into_iter().collect(),
        };
        if let Some(group) = &node.link_group {
            if let Some(first) = first_names.get(group) {
                let target = PathBuf::from(OsStr::from_bytes(first));
                builder
                    .insert(os_path, EntryKind::HardLink { target }, &meta)
                    .unwrap();
                continue;
            }
            first_names.insert(group.clone(), path.clone());
        }
        let mut file;
        let kind = match &node.kind {
            Kind::Dir => EntryKind::Directory,
            Kind::File { size, .. } => {
                file = std::fs::File::open(source.join(os_path)).unwrap();
                EntryKind::File {
                    size: *size,
                    data: &mut file,
                }
            }
            Kind::Symlink(target) => EntryKind::Symlink {
                target: target.clone(),
            },
            Kind::Char(major, minor) => EntryKind::CharDevice {
                major: *major,
                minor: *minor,
            },
            Kind::Block(major, minor) => EntryKind::BlockDevice {
                major: *major,
                minor: *minor,
            },
            Kind::Fifo => EntryKind::Fifo,
            Kind::Socket => EntryKind::Socket,
        };
        builder
            .insert(os_path, kind, &meta)
            .unwrap_or_else(|e| panic!("insert {}: {e}", show(path)));
    }
    builder.finish(auto_size()).unwrap();
}

/// One source tree for the whole test binary (building it costs a second).
struct Source {
    _dir: tempfile::TempDir,
    root: PathBuf,
    tree: Tree,
}

fn source() -> &'static Source {
    static SOURCE: std::sync::OnceLock<Source> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("src");
        make_source(&root);
        let tree = scan_source(&root);
        Source {
            _dir: dir,
            root,
            tree,
        }
    })
}

// ---------------------------------------------------------------------------------------
// The tests

/// How mke2fs maps `/sparse` (400 data blocks of 4 KiB between 4 KiB holes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SparseMap {
    /// An extent tree with leaves in blocks of their own.
    ExtentTree,
    /// 84 extents per 1 KiB leaf: five leaves under an index block.
    ExtentTreeOfDepth2,
    /// 64 KiB blocks all hold data: one extent in the inode.
    OneExtent,
    /// Indirect blocks (no `extent` feature).
    Indirect,
}

/// mke2fs configurations: name, size, extra arguments, how `/sparse` gets mapped.
const MKFS_CONFIGS: &[(&str, &str, &[&str], SparseMap)] = &[
    (
        "default, re-indexed",
        "128M",
        &["-b", "4096", "-I", "256"],
        SparseMap::ExtentTree,
    ),
    (
        "no journal",
        "128M",
        &["-b", "4096", "-O", "^has_journal"],
        SparseMap::ExtentTree,
    ),
    (
        "64bit + meta_bg, 17 GiB",
        "17G",
        &[
            "-b",
            "4096",
            "-O",
            "64bit,meta_bg,^resize_inode",
            "-J",
            "size=8",
        ],
        SparseMap::ExtentTree,
    ),
    (
        "1 KiB blocks",
        "128M",
        &["-b", "1024"],
        SparseMap::ExtentTreeOfDepth2,
    ),
    (
        "64 KiB blocks",
        "512M",
        &["-b", "65536"],
        SparseMap::OneExtent,
    ),
    (
        "128-byte inodes",
        "128M",
        &["-b", "4096", "-I", "128"],
        SparseMap::ExtentTree,
    ),
    (
        "indirect block maps",
        "128M",
        &["-b", "4096", "-O", "^extent,^64bit"],
        SparseMap::Indirect,
    ),
    (
        "ext2 layout, 2 KiB blocks",
        "128M",
        &["-t", "ext2", "-b", "2048", "-O", "^resize_inode"],
        SparseMap::Indirect,
    ),
];

#[test]
fn ext4_read_mkfs_images_give_the_tree_back() {
    if !ready() {
        return;
    }
    let source = source();
    let expected = as_mkfs_stores(source.tree.clone());
    assert!(expected.len() > HTREE_ENTRIES + 20);
    let dir = tempfile::tempdir().unwrap();
    for (i, &(name, size, args, sparse_map)) in MKFS_CONFIGS.iter().enumerate() {
        let image = dir.path().join(format!("image-{i}.ext4"));
        mkfs(&image, &source.root, size, args);
        if i == 0 {
            reindex(&image);
            let dump = run_ok(
                Command::new("debugfs")
                    .arg("-R")
                    .arg("htree_dump /htree")
                    .arg(&image),
            );
            assert!(
                dump.contains("Root node dump"),
                "{name}: /htree is not indexed:\n{dump}"
            );
        }
        let stat = run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg("stat /sparse")
                .arg(&image),
        );
        let expected_marker = match sparse_map {
            SparseMap::ExtentTree => Some("(ETB0)"),
            SparseMap::ExtentTreeOfDepth2 => Some("(ETB1)"),
            SparseMap::OneExtent => None,
            SparseMap::Indirect => Some("(IND)"),
        };
        if let Some(marker) = expected_marker {
            assert!(
                stat.contains(marker),
                "{name}: /sparse has no {marker} block:\n{stat}"
            );
        }
        let reader = Ext4Reader::open(&image).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(reader.cleanly_unmounted(), "{name}");
        assert_same_tree(&expected, &scan_image(&reader), name);
        // Lookups resolve without following symlinks.
        let small = reader.lookup(Path::new("/small")).unwrap().unwrap();
        assert_eq!(reader.inode(small).unwrap().size, 12);
        assert!(reader.lookup(Path::new("link-short/x")).unwrap().is_none());
        assert!(reader.lookup(Path::new("deep/missing")).unwrap().is_none());
        assert!(matches!(
            reader.lookup(Path::new("deep/../small")),
            Err(Ext4ReadError::Lookup { .. })
        ));
        let link = reader.lookup(Path::new("link-short")).unwrap().unwrap();
        assert!(matches!(
            reader.open_file(link),
            Err(Ext4ReadError::WrongKind { .. })
        ));
        std::fs::remove_file(&image).unwrap();
    }
}

#[test]
fn ext4_read_banger_images_give_the_tree_back() {
    if !ready() {
        return;
    }
    let source = source();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("banger.ext4");
    banger_image(&image, &source.root, &source.tree);
    let reader = Ext4Reader::open(&image).unwrap();
    // banger's writer keeps nanoseconds and the epoch bits: the source exactly.
    assert_same_tree(&source.tree, &scan_image(&reader), "banger's writer");
}

#[test]
fn ext4_read_export_is_deterministic_and_round_trips() {
    if !ready() {
        return;
    }
    let source = source();
    let dir = tempfile::tempdir().unwrap();
    let mkfs_image = dir.path().join("mkfs.ext4");
    mkfs(&mkfs_image, &source.root, "128M", &["-b", "4096"]);
    reindex(&mkfs_image);
    let banger = dir.path().join("banger.ext4");
    banger_image(&banger, &source.root, &source.tree);

    for (name, image, expected) in [
        (
            "mkfs",
            &mkfs_image,
            as_tar_carries(as_mkfs_stores(source.tree.clone())),
        ),
        ("banger", &banger, as_tar_carries(source.tree.clone())),
    ] {
        let reader = Ext4Reader::open(image).unwrap();
        let (first, summary) = export(&reader, "", &ExportOptions::default());
        let (second, _) = export(&reader, "/", &ExportOptions::default());
        assert!(first == second, "{name}: two exports differ");
        let (mut tree, order) = scan_tar(&first);
        tree.remove(b"lost+found".as_slice());
        assert_same_tree(&expected, &tree, &format!("{name}: tar"));

        // Depth-first, children sorted bytewise, each directory before its children.
        let mut previous: Vec<&[u8]> = Vec::new();
        for path in &order {
            let parts: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
            assert!(
                parts.len() <= previous.len() + 1
                    && parts[..parts.len() - 1] == previous[..parts.len() - 1],
                "{name}: {} does not follow its parent",
                show(path)
            );
            if parts.len() <= previous.len() {
                assert!(
                    parts[parts.len() - 1] > previous[parts.len() - 1],
                    "{name}: {} out of order",
                    show(path)
                );
            }
            previous = parts;
        }
        assert_eq!(summary.entries, order.len() as u64, "{name}");
        assert_eq!(summary.skipped_sockets, 1, "{name}");
        assert_eq!(summary.hard_links, 1, "{name}");
        let bytes: u64 = expected
            .iter()
            .filter(|(path, node)| node.link_group.as_ref().is_none_or(|first| first == *path))
            .map(|(_, node)| match node.kind {
                Kind::File { size, .. } => size,
                _ => 0,
            })
            .sum();
        assert_eq!(summary.bytes, bytes, "{name}");

        // GNU tar reads it too, long names and link targets included.
        let tar_path = dir.path().join(format!("{name}.tar"));
        std::fs::write(&tar_path, &first).unwrap();
        let listing = run_ok(Command::new("tar").arg("-tvf").arg(&tar_path));
        assert!(
            listing.contains(LONG_TARGET),
            "{name}: GNU tar lost the long link target"
        );
        assert!(
            listing.contains("and-finally-a-file-with-a-long-name-too"),
            "{name}: GNU tar lost the long name"
        );
        assert!(
            listing.contains("1234/5678"),
            "{name}: numeric owners:\n{listing}"
        );

        // Clamped times: later ones become the clamp, earlier ones stay.
        let clamp = 2_000_000_000;
        let (clamped, _) = export(
            &reader,
            "",
            &ExportOptions {
                clamp_mtime: Some(clamp),
                ..ExportOptions::default()
            },
        );
        let (clamped_tree, _) = scan_tar(&clamped);
        assert_eq!(
            clamped_tree[b"future".as_slice()].mtime,
            (clamp, 0),
            "{name}"
        );
        assert_eq!(
            clamped_tree[b"small".as_slice()].mtime,
            expected[b"small".as_slice()].mtime,
            "{name}"
        );
        assert!(
            clamped_tree.values().all(|node| node.mtime.0 <= clamp),
            "{name}"
        );

        // tar → banger's writer → reader: the same tree again.
        let rebuilt = dir.path().join(format!("{name}-rebuilt.ext4"));
        build_rootfs(
            &[Layer::tar(format!("{name} export"), tar_path.clone())],
            &rebuilt,
            &RootfsOptions {
                sizing: auto_size(),
                strip_identity: false,
                seed: b"round trip".to_vec(),
                cancel: None,
                sync: false,
            },
            &|_, _| {},
        )
        .unwrap_or_else(|e| panic!("{name}: build_rootfs of the export: {e}"));
        let reread = scan_image(&Ext4Reader::open(&rebuilt).unwrap());
        let mut reread = reread;
        reread.remove(b"lost+found".as_slice());
        assert_same_tree(
            &expected,
            &reread,
            &format!("{name}: export → build_rootfs → reader"),
        );

        // A subtree: paths relative to it.
        let (sub, _) = export(&reader, "/deep", &ExportOptions::default());
        let (sub_tree, _) = scan_tar(&sub);
        assert!(sub_tree.contains_key(b"hard-b".as_slice()), "{name}");
        assert_eq!(
            sub_tree[b"hard-b".as_slice()].kind,
            expected[b"deep/hard-b".as_slice()].kind
        );
    }
}

// ---------------------------------------------------------------------------------------
// Overlay upper directories

/// An upper directory as overlayfs (Linux 6.1, privileged) leaves it, under `root/upper`.
fn make_upper(root: &Path) {
    use nix::sys::stat::SFlag;
    let upper = root.join("upper");
    let p = |relative: &str| upper.join(relative);
    std::fs::create_dir_all(p("etc/ssh")).unwrap();
    std::fs::create_dir(root.join("work")).unwrap();
    mknod(&p("gone"), SFlag::S_IFCHR, 0, 0);
    // overlayfs links whiteouts to one shared inode: two names, still two whiteouts.
    mknod(&p("whiteout-a"), SFlag::S_IFCHR, 0, 0);
    std::fs::hard_link(p("whiteout-a"), p("whiteout-b")).unwrap();
    mknod(&p("etc/ssh/ssh_host_rsa_key"), SFlag::S_IFCHR, 0, 0);
    std::fs::create_dir(p("replaced")).unwrap();
    std::fs::write(p("replaced/new-file"), b"new\n").unwrap();
    std::fs::write(p("replaced/+plus"), b"sorts before the marker's dot\n").unwrap();
    setfattr(&p("replaced"), "trusted.overlay.opaque", Some("y"));
    std::fs::write(p("kept"), b"new kept\n").unwrap();
    setfattr(&p("kept"), "trusted.overlay.origin", Some("0x00fb2100"));
    setfattr(&p("kept"), "user.keep", Some("1"));
    setfattr(&p("etc"), "trusted.overlay.impure", Some("y"));
    std::fs::write(p("etc/machine-id"), b"0123456789abcdef\n").unwrap();
    std::fs::write(p("etc/hostname"), b"builder\n").unwrap();
    std::fs::write(p("etc/ssh/ssh_host_ed25519_key"), b"private\n").unwrap();
    std::fs::write(p("etc/ssh/ssh_host_ed25519_key.pub"), b"public\n").unwrap();
    std::fs::write(p("etc/ssh/sshd_config"), b"Port 22\n").unwrap();
    std::fs::create_dir_all(p("tmp/junk-dir")).unwrap();
    std::fs::write(p("tmp/junk"), b"junk\n").unwrap();
    chmod(&p("tmp"), 0o1777);
}

fn overlay_options() -> ExportOptions {
    ExportOptions {
        clamp_mtime: None,
        overlay_upper: true,
        exclude: vec![
            ExcludeRule::Path("etc/machine-id".into()),
            ExcludeRule::Path("etc/ssh/ssh_host_*".into()),
            ExcludeRule::Contents("tmp".into()),
        ],
    }
}

/// A base layer for the diff to apply on.
fn base_layer(path: &Path) {
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, data: Option<&[u8]>| {
        let mut header = tar::Header::new_gnu();
        match data {
            Some(data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                builder.append_data(&mut header, name, data).unwrap();
            }
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                header.set_mode(0o755);
                builder.append_data(&mut header, name, io::empty()).unwrap();
            }
        }
    };
    add("gone", Some(b"old\n"));
    add("whiteout-a", Some(b"a\n"));
    add("whiteout-b", Some(b"b\n"));
    add("replaced", None);
    add("replaced/old-child", Some(b"old child\n"));
    add("kept", Some(b"old kept\n"));
    add("etc", None);
    add("etc/machine-id", Some(b"base id\n"));
    add("etc/hostname", Some(b"base\n"));
    add("etc/ssh", None);
    add("etc/ssh/ssh_host_rsa_key", Some(b"base rsa\n"));
    add("tmp", None);
    add("tmp/base-tmp", Some(b"from the base\n"));
    builder.finish().unwrap();
}

fn read_file(reader: &Ext4Reader, path: &str) -> Option<Vec<u8>> {
    let ino = reader.lookup(Path::new(path)).unwrap()?;
    let mut out = Vec::new();
    reader
        .open_file(ino)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    Some(out)
}

/// Checks a diff produced from `make_upper`'s upper directory, then applies it over the base.
fn check_overlay_diff(diff: &[u8], summary: banger::ext4::ExportSummary, dir: &Path) {
    let (tree, order) = scan_tar(diff);
    let names: Vec<String> = order.iter().map(|path| show(path)).collect();
    assert_eq!(
        names,
        [
            ".wh.gone",
            ".wh.whiteout-a",
            ".wh.whiteout-b",
            "etc",
            "etc/hostname",
            "etc/ssh",
            "etc/ssh/sshd_config",
            "kept",
            "replaced",
            "replaced/.wh..wh..opq",
            "replaced/+plus",
            "replaced/new-file",
            "tmp",
        ]
    );
    for marker in [".wh.gone", ".wh.whiteout-a", "replaced/.wh..wh..opq"] {
        let node = &tree[marker.as_bytes()];
        assert_eq!(
            (node.perm, node.uid, node.gid, node.mtime.0),
            (0, 0, 0, 0),
            "{marker}"
        );
        assert!(matches!(node.kind, Kind::File { size: 0, .. }), "{marker}");
    }
    for (path, node) in &tree {
        assert!(
            node.xattrs
                .keys()
                .all(|name| !name.starts_with(b"trusted.overlay.")),
            "{} keeps an overlay attribute",
            show(path)
        );
    }
    assert_eq!(
        tree[b"kept".as_slice()].xattrs,
        BTreeMap::from([(b"user.keep".to_vec(), b"1".to_vec())])
    );
    assert_eq!(tree[b"tmp".as_slice()].perm, 0o1777);
    assert_eq!(summary.whiteouts, 3);
    assert_eq!(summary.opaque_dirs, 1);
    assert_eq!(summary.hard_links, 0);
    // machine-id, 3 × ssh_host_*, and the 2 children of tmp.
    assert_eq!(summary.excluded, 6);
    assert_eq!(summary.entries, 13);

    let base = dir.join("base.tar");
    base_layer(&base);
    let diff_path = dir.join("diff.tar");
    std::fs::write(&diff_path, diff).unwrap();
    let image = dir.join("applied.ext4");
    build_rootfs(
        &[Layer::tar("base", base), Layer::tar("diff", diff_path)],
        &image,
        &RootfsOptions {
            sizing: auto_size(),
            strip_identity: false,
            seed: b"overlay".to_vec(),
            cancel: None,
            sync: false,
        },
        &|_, _| {},
    )
    .unwrap();
    let reader = Ext4Reader::open(&image).unwrap();
    for gone in ["gone", "whiteout-a", "whiteout-b", "replaced/old-child"] {
        assert!(
            reader.lookup(Path::new(gone)).unwrap().is_none(),
            "{gone} survived"
        );
    }
    // Its whiteout was excluded with the other host keys: the base's file stays.
    assert_eq!(
        read_file(&reader, "etc/ssh/ssh_host_rsa_key").unwrap(),
        b"base rsa\n"
    );
    assert_eq!(read_file(&reader, "replaced/new-file").unwrap(), b"new\n");
    assert_eq!(read_file(&reader, "kept").unwrap(), b"new kept\n");
    assert_eq!(read_file(&reader, "etc/hostname").unwrap(), b"builder\n");
    // Excluded from the diff: the base's stays.
    assert_eq!(read_file(&reader, "etc/machine-id").unwrap(), b"base id\n");
    assert_eq!(
        read_file(&reader, "tmp/base-tmp").unwrap(),
        b"from the base\n"
    );
    assert!(reader.lookup(Path::new("tmp/junk")).unwrap().is_none());
    let kept = reader.lookup(Path::new("kept")).unwrap().unwrap();
    assert_eq!(
        reader.xattrs(kept).unwrap(),
        [(b"user.keep".to_vec(), b"1".to_vec())]
    );
}

#[test]
fn ext4_read_overlay_upper_becomes_an_oci_diff() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("overlay-disk");
    std::fs::create_dir(&source).unwrap();
    make_upper(&source);
    let image = dir.path().join("overlay.ext4");
    // As the builder VM's overlay disk: no journal.
    mkfs(
        &image,
        &source,
        "64M",
        &["-b", "4096", "-O", "^has_journal"],
    );
    let reader = Ext4Reader::open(&image).unwrap();
    let (diff, summary) = export(&reader, "/upper", &overlay_options());
    let (again, _) = export(&reader, "upper", &overlay_options());
    assert!(diff == again, "two exports differ");
    check_overlay_diff(&diff, summary, dir.path());

    // Through a file: the same bytes, nothing else left in the directory.
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("diff.tar");
    let file_summary =
        export_tar_to_file(&image, Path::new("/upper"), &out, &overlay_options()).unwrap();
    assert_eq!(file_summary, summary);
    assert!(std::fs::read(&out).unwrap() == diff);
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 1);
}

/// The real thing: Linux's overlayfs writes the upper directory on a loop-mounted image
/// made by banger's writer without a journal, then the reader exports it.
#[test]
fn ext4_read_real_overlayfs_upper_exports_as_a_diff() {
    if !ready() || !capable("root with loop devices", can_loop_mount()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The lower layer, as a directory.
    let lower = dir.path().join("lower");
    std::fs::create_dir_all(lower.join("replaced/sub")).unwrap();
    std::fs::write(lower.join("gone"), b"old\n").unwrap();
    std::fs::write(lower.join("replaced/old-child"), b"old\n").unwrap();
    std::fs::write(lower.join("kept"), b"old kept\n").unwrap();
    std::fs::create_dir_all(lower.join("etc")).unwrap();
    std::fs::write(lower.join("etc/hostname"), b"base\n").unwrap();
    // The overlay disk: banger's writer, no journal, as the builder VM gets it.
    let disk = dir.path().join("overlay.ext4");
    let mut options = builder_options();
    options.journal = false;
    let mut builder = Ext4Builder::create(&disk, options).unwrap();
    let dir_meta = Metadata {
        mode: 0o755,
        ..Metadata::default()
    };
    builder
        .insert(Path::new("upper"), EntryKind::Directory, &dir_meta)
        .unwrap();
    builder
        .insert(Path::new("work"), EntryKind::Directory, &dir_meta)
        .unwrap();
    builder.finish(Sizing::Fixed(64 << 20)).unwrap();
    {
        let mount = LoopMount::new(&disk, false).unwrap();
        let merged = dir.path().join("merged");
        std::fs::create_dir(&merged).unwrap();
        let options = format!(
            "lowerdir={},upperdir={},workdir={},metacopy=off,redirect_dir=off,index=off",
            lower.display(),
            mount.path().join("upper").display(),
            mount.path().join("work").display()
        );
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &options])
                .arg(&merged),
        );
        let result = std::panic::catch_unwind(|| {
            std::fs::remove_file(merged.join("gone")).unwrap();
            std::fs::remove_dir_all(merged.join("replaced")).unwrap();
            std::fs::create_dir(merged.join("replaced")).unwrap();
            std::fs::write(merged.join("replaced/new-file"), b"new\n").unwrap();
            std::fs::write(merged.join("kept"), b"new kept\n").unwrap();
            std::fs::write(merged.join("etc/hostname"), b"builder\n").unwrap();
            std::fs::create_dir(merged.join("tmp")).unwrap();
            std::fs::write(merged.join("tmp/junk"), b"junk\n").unwrap();
            std::fs::write(merged.join("etc/machine-id"), b"id\n").unwrap();
        });
        run_ok(Command::new("umount").arg(&merged));
        result.unwrap();
    }
    let reader = Ext4Reader::open(&disk).unwrap();
    let (diff, summary) = export(&reader, "/upper", &overlay_options());
    let (tree, order) = scan_tar(&diff);
    let names: Vec<String> = order.iter().map(|path| show(path)).collect();
    assert_eq!(
        names,
        [
            ".wh.gone",
            "etc",
            "etc/hostname",
            "kept",
            "replaced",
            "replaced/.wh..wh..opq",
            "replaced/new-file",
            "tmp"
        ],
        "{summary:?}"
    );
    assert!(tree.values().all(|node| {
        node.xattrs
            .keys()
            .all(|name| !name.starts_with(b"trusted.overlay."))
    }));
    assert_eq!(summary.excluded, 2); // etc/machine-id, tmp/junk
}

#[test]
fn ext4_read_overlay_metacopy_and_redirect_are_refused() {
    if !ready() {
        return;
    }
    for (xattr, entry) in [
        ("trusted.overlay.metacopy", "upper/file"),
        ("trusted.overlay.redirect", "upper/moved"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("disk");
        std::fs::create_dir_all(source.join("upper/moved")).unwrap();
        std::fs::write(source.join("upper/file"), b"").unwrap();
        setfattr(&source.join(entry), xattr, Some("0x2f6f6c64"));
        let image = dir.path().join("overlay.ext4");
        mkfs(
            &image,
            &source,
            "32M",
            &["-b", "4096", "-O", "^has_journal"],
        );
        let out_dir = dir.path().join("out");
        std::fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join("diff.tar");
        let error = export_tar_to_file(
            &image,
            Path::new("/upper"),
            &out,
            &ExportOptions {
                overlay_upper: true,
                ..ExportOptions::default()
            },
        )
        .unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, ExportError::OverlayUnrepresentable { .. }),
            "{message}"
        );
        let name = entry.strip_prefix("upper/").unwrap();
        assert!(message.contains(name), "{message}");
        assert!(message.contains(xattr), "{message}");
        assert!(
            message.contains("metacopy=off,redirect_dir=off"),
            "{message}"
        );
        assert_eq!(
            std::fs::read_dir(&out_dir).unwrap().count(),
            0,
            "a failed export left files behind"
        );
        // Without overlay mode the attribute is just an attribute.
        let reader = Ext4Reader::open(&image).unwrap();
        let (plain, _) = export(&reader, "/upper", &ExportOptions::default());
        let (tree, _) = scan_tar(&plain);
        assert!(tree[name.as_bytes()].xattrs.contains_key(xattr.as_bytes()));
    }
}

/// A fresh image, populated by the kernel through a loop mount.
fn kernel_populate(root: &Path) {
    use nix::fcntl::{FallocateFlags, fallocate};
    // Top-level directories: the Orlov allocator spreads them over the groups.
    for i in 0..40 {
        let dir = root.join(format!("top-{i:02}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("file"), format!("in group of top-{i}\n")).unwrap();
        setfattr(&dir.join("file"), "user.index", Some(&i.to_string()));
    }
    // Big enough for a hash tree.
    std::fs::create_dir(root.join("big-dir")).unwrap();
    for i in 0..600 {
        std::fs::write(
            root.join(format!("big-dir/a-rather-long-file-name-{i:04}")),
            b"",
        )
        .unwrap();
    }
    // Stale data on blocks that the preallocation below is likely to reuse: unwritten
    // extents must read as zeros, not as what the disk holds.
    std::fs::write(root.join("stale"), vec![0xAA; 2 << 20]).unwrap();
    nix::unistd::sync();
    std::fs::remove_file(root.join("stale")).unwrap();
    nix::unistd::sync();
    let prealloc = std::fs::File::create(root.join("prealloc")).unwrap();
    fallocate(&prealloc, FallocateFlags::empty(), 0, 2 << 20).unwrap();
    prealloc.write_all_at(&[7; 4096], 100 << 10).unwrap();
    let beyond = std::fs::File::create(root.join("allocated-beyond-eof")).unwrap();
    beyond.write_all_at(b"short", 0).unwrap();
    fallocate(&beyond, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, 1 << 20).unwrap();
    let punched = std::fs::File::create(root.join("punched")).unwrap();
    punched
        .write_all_at(&pseudo_random(1 << 20, 11), 0)
        .unwrap();
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(&punched, punch, 200 << 10, 400 << 10).unwrap();
    std::os::unix::fs::symlink(LONG_TARGET, root.join("long-link")).unwrap();
    std::os::unix::fs::symlink("top-00/file", root.join("short-link")).unwrap();
    mknod(&root.join("tty"), nix::sys::stat::SFlag::S_IFCHR, 5, 0);
    std::fs::write(root.join("owned"), b"x").unwrap();
    std::os::unix::fs::lchown(root.join("owned"), Some(100_000), Some(7)).unwrap();
    set_mtime(&root.join("owned"), FAR_FUTURE, 999_999_999);
    nix::unistd::sync();
}

/// Images the Linux kernel wrote, read back: directories in groups far into `meta_bg`,
/// hash trees with checksum tails, unwritten extents, punched holes, extents past the end
/// of a file. The tree as the mounted file system shows it is the reference.
#[test]
fn ext4_read_kernel_written_images_give_the_mounted_tree_back() {
    if !ready() || !capable("root with loop devices", can_loop_mount()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let configs: [(&str, &str, &[&str]); 2] = [
        (
            "64bit + meta_bg, 17 GiB",
            "17G",
            &[
                "-b",
                "4096",
                "-O",
                "64bit,meta_bg,^resize_inode",
                "-J",
                "size=8",
            ],
        ),
        (
            "1 KiB blocks, no journal",
            "256M",
            &["-b", "1024", "-O", "^has_journal"],
        ),
    ];
    for (name, size, args) in configs {
        let image = dir.path().join("kernel.ext4");
        sparse_file(&image, size);
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=1"])
                .args(args)
                .arg(&image),
        );
        let mut expected = {
            let mount = LoopMount::new(&image, false).unwrap();
            kernel_populate(mount.path());
            scan_source(mount.path())
        };
        expected.remove(b"lost+found".as_slice());
        let reader = Ext4Reader::open(&image).unwrap();
        assert!(reader.cleanly_unmounted(), "{name}");
        assert_same_tree(&expected, &scan_image(&reader), name);
        if args.contains(&"64bit,meta_bg,^resize_inode") {
            // The directories really are spread: some live in groups whose descriptors are
            // in a later meta group (64 descriptors of 64 bytes per 4 KiB block).
            let dumpe2fs = run_ok(Command::new("dumpe2fs").arg("-h").arg(&image));
            let at = dumpe2fs.find("Inodes per group:").unwrap() + "Inodes per group:".len();
            let per_group: u32 = dumpe2fs[at..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let highest = (0..40)
                .map(|i| {
                    reader
                        .lookup(Path::new(&format!("top-{i:02}")))
                        .unwrap()
                        .unwrap()
                        .0
                })
                .max()
                .unwrap();
            assert!(
                highest > 64 * per_group,
                "{name}: every directory is in the first 64 groups (highest inode {highest})"
            );
        }
        std::fs::remove_file(&image).unwrap();
    }
}

/// Where the only data of the 4 GiB+ test file starts.
const HUGE_DATA_AT: u64 = (4 << 30) + 4096;

fn hash_with_buffer(mut reader: impl Read, size: usize) -> (u64, String) {
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; size];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
    (total, hasher.finalize().to_hex().to_string())
}

/// Without extents, 1 KiB blocks: direct, single, double and triple indirect blocks.
#[test]
fn ext4_read_indirect_maps_reach_triple_indirect_blocks() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    std::fs::create_dir(&source).unwrap();
    let far = std::fs::File::create(source.join("far")).unwrap();
    // Direct (0), single (20 KiB), double (1 MiB), triple (65 MiB) with 1 KiB blocks.
    for (offset, byte) in [(0u64, 1u8), (20 << 10, 2), (1 << 20, 3), (65 << 20, 4)] {
        far.write_all_at(&vec![byte; 3000], offset).unwrap();
    }
    drop(far);
    // Data only past 4 GiB: the size needs i_size_high, the block number 32 bits.
    let huge = std::fs::File::create(source.join("huge")).unwrap();
    huge.write_all_at(b"0123456789", HUGE_DATA_AT).unwrap();
    drop(huge);
    let expected = hash_reader(std::fs::File::open(source.join("far")).unwrap());
    for args in [
        &["-b", "1024", "-O", "^extent,^64bit"][..],
        &["-b", "4096", "-O", "^extent,^64bit"][..],
        &["-b", "1024"][..],
    ] {
        let image = dir.path().join("far.ext4");
        mkfs(&image, &source, "64M", args);
        let stat = run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg("stat /far")
                .arg(&image),
        );
        if args[1] == "1024" && args.len() > 2 {
            assert!(
                stat.contains("(TIND)"),
                "{args:?}: no triple indirect block:\n{stat}"
            );
        }
        let reader = Ext4Reader::open(&image).unwrap();
        let ino = reader.lookup(Path::new("far")).unwrap().unwrap();
        assert_eq!(
            hash_reader(reader.open_file(ino).unwrap()),
            expected,
            "{args:?}"
        );
        // Reads of 1 MiB or more bypass the buffer: the same bytes.
        assert_eq!(
            hash_with_buffer(reader.open_file(ino).unwrap(), 3 << 20),
            expected,
            "{args:?}, large reads"
        );
        let huge = reader.lookup(Path::new("huge")).unwrap().unwrap();
        assert_eq!(reader.inode(huge).unwrap().size, HUGE_DATA_AT + 10);
        let mut file = reader.open_file(huge).unwrap();
        let mut buffer = vec![0u8; 4 << 20];
        let zeros = vec![0u8; 4 << 20];
        let (mut position, mut tail) = (0u64, Vec::new());
        loop {
            let n = file.read(&mut buffer).unwrap();
            if n == 0 {
                break;
            }
            let zero = (HUGE_DATA_AT.saturating_sub(position) as usize).min(n);
            assert!(
                buffer[..zero] == zeros[..zero],
                "{args:?}: data in the hole"
            );
            tail.extend_from_slice(&buffer[zero..n]);
            position += n as u64;
        }
        assert_eq!(
            (position, tail.as_slice()),
            (HUGE_DATA_AT + 10, &b"0123456789"[..])
        );
        std::fs::remove_file(&image).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Refusals and corruption

fn small_source(root: &Path) {
    std::fs::create_dir_all(root.join("dir/sub")).unwrap();
    for i in 0..200 {
        std::fs::write(root.join(format!("dir/file-{i:03}")), format!("{i}\n")).unwrap();
    }
    std::fs::write(root.join("data"), pseudo_random(100_000, 3)).unwrap();
    let sparse = std::fs::File::create(root.join("sparse")).unwrap();
    for run in 0..40u64 {
        sparse
            .write_all_at(&[run as u8 + 1; 1024], run * 4096)
            .unwrap();
    }
    drop(sparse);
    std::os::unix::fs::symlink(LONG_TARGET, root.join("dir/long-link")).unwrap();
    std::os::unix::fs::symlink("data", root.join("short-link")).unwrap();
    std::fs::hard_link(root.join("data"), root.join("dir/sub/data-again")).unwrap();
    std::fs::write(root.join("attrs"), b"x").unwrap();
    setfattr(&root.join("attrs"), "user.a", Some("0x0001"));
    setfattr(
        &root.join("attrs"),
        "user.long",
        Some(&format!("0x{}", "cd".repeat(300))),
    );
    setfattr(&root.join("dir"), "trusted.overlay.opaque", Some("y"));
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
}

#[test]
fn ext4_read_refuses_damaged_and_unsupported_images_clearly() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    std::fs::create_dir(&source).unwrap();
    small_source(&source);
    let image = dir.path().join("image.ext4");
    mkfs(&image, &source, "16M", &["-b", "4096"]);
    let pristine = std::fs::read(&image).unwrap();
    let open_error = |bytes: &[u8]| -> Ext4ReadError {
        std::fs::write(&image, bytes).unwrap();
        Ext4Reader::open(&image).unwrap_err()
    };
    let image_name = image.display().to_string();

    let error = open_error(&pristine[..pristine.len() / 2]);
    assert!(matches!(error, Ext4ReadError::Truncated { .. }), "{error}");
    assert!(error.to_string().contains(&image_name), "{error}");

    let mut zeroed = pristine.clone();
    zeroed[1024..2048].fill(0);
    let error = open_error(&zeroed);
    assert!(matches!(error, Ext4ReadError::NotExt4 { .. }), "{error}");

    let mut flipped = pristine.clone();
    flipped[1024 + 0x20] ^= 0x40; // blocks per group, under the superblock checksum
    let error = open_error(&flipped);
    assert!(error.to_string().contains("checksum"), "{error}");

    let error = open_error(&pristine[..1500]);
    assert!(matches!(error, Ext4ReadError::NotExt4 { .. }), "{error}");

    std::fs::write(&image, &pristine).unwrap();
    run_ok(
        Command::new("debugfs")
            .args(["-w", "-R", "feature needs_recovery"])
            .arg(&image),
    );
    let error = Ext4Reader::open(&image).unwrap_err();
    assert!(
        matches!(error, Ext4ReadError::NeedsRecovery { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("not cleanly unmounted"),
        "{error}"
    );

    for feature in ["inline_data", "encrypt", "casefold"] {
        let other = dir.path().join(format!("{feature}.ext4"));
        mkfs(&other, &source, "16M", &["-b", "4096", "-O", feature]);
        let error = Ext4Reader::open(&other).unwrap_err();
        assert!(
            matches!(error, Ext4ReadError::Unsupported { .. }),
            "{feature}: {error}"
        );
        assert!(error.to_string().contains(feature), "{error}");
        assert!(
            error.to_string().contains(&other.display().to_string()),
            "{error}"
        );
    }

    std::fs::write(&image, &pristine).unwrap();
    let reader = Ext4Reader::open(&image).unwrap();
    let missing = export_tar(
        &reader,
        Path::new("/nope"),
        io::sink(),
        &ExportOptions::default(),
    );
    assert!(
        matches!(missing, Err(ExportError::RootNotFound { .. })),
        "{missing:?}"
    );
    let file = export_tar(
        &reader,
        Path::new("/data"),
        io::sink(),
        &ExportOptions::default(),
    );
    assert!(
        matches!(file, Err(ExportError::RootNotADirectory { .. })),
        "{file:?}"
    );
    for rule in ["a/*/b", "../x", "x*y"] {
        let options = ExportOptions {
            exclude: vec![ExcludeRule::Path(rule.into())],
            ..ExportOptions::default()
        };
        let result = export_tar(&reader, Path::new(""), io::sink(), &options);
        assert!(
            matches!(result, Err(ExportError::InvalidExcludeRule { .. })),
            "{rule}: {result:?}"
        );
    }
}

/// A writer that takes at most `limit` bytes, so a corrupt size cannot make a walk write
/// terabytes of holes.
struct Bounded {
    left: u64,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left < buf.len() as u64 {
            return Err(io::Error::other("output limit reached"));
        }
        self.left -= buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Blocks holding metadata: superblock and descriptors, used inode tables, directories,
/// extent-tree and indirect blocks, attribute blocks.
fn metadata_blocks(image: &Path) -> Vec<u64> {
    let mut blocks = vec![0, 1];
    let dumpe2fs = run_ok(Command::new("dumpe2fs").arg(image));
    for line in dumpe2fs.lines() {
        if let Some(rest) = line.trim().strip_prefix("Inode table at ") {
            let range = rest.split_whitespace().next().unwrap();
            let (start, end) = range.split_once('-').unwrap();
            let (start, end): (u64, u64) = (start.parse().unwrap(), end.parse().unwrap());
            blocks.extend(start..=end.min(start + 63));
        }
        if let Some(at) = line.find("Group descriptors at ") {
            let rest = &line[at + "Group descriptors at ".len()..];
            let range = rest
                .split(|c: char| c == ',' || c.is_whitespace())
                .next()
                .unwrap();
            let start: u64 = range.split('-').next().unwrap().parse().unwrap();
            blocks.push(start);
        }
    }
    for path in [
        "/",
        "/dir",
        "/dir/sub",
        "/sparse",
        "/data",
        "/attrs",
        "/dir/long-link",
    ] {
        let stat = run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("stat {path}"))
                .arg(image),
        );
        for marker in [
            "(ETB0):",
            "(ETB1):",
            "(IND):",
            "(DIND):",
            "(TIND):",
            "File ACL: ",
        ] {
            for (at, _) in stat.match_indices(marker) {
                let digits: String = stat[at + marker.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                if let Ok(block) = digits.parse::<u64>()
                    && block > 0
                {
                    blocks.push(block);
                }
            }
        }
        let listed = run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("blocks {path}"))
                .arg(image),
        );
        if path.starts_with("/dir") || path == "/" {
            blocks.extend(
                listed
                    .split_whitespace()
                    .filter_map(|b| b.parse::<u64>().ok()),
            );
        }
    }
    blocks.sort_unstable();
    blocks.dedup();
    blocks
}

/// Resident memory of this process (`/proc/self/statm`, assuming 4 KiB pages).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Walks images one after another, each under `catch_unwind`, with a watchdog thread that
/// aborts the test binary when one walk takes over a minute or the process over 4 GiB (a
/// loop in the reader would otherwise hang the test or exhaust the host's memory).
struct GuardedWalker {
    current: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, String)>>>,
}

impl GuardedWalker {
    fn new() -> GuardedWalker {
        let current: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, String)>>> =
            Default::default();
        let watched = std::sync::Arc::downgrade(&current);
        std::thread::spawn(move || {
            while let Some(current) = watched.upgrade() {
                if let Some((started, what)) = &*current.lock().unwrap() {
                    let problem = if started.elapsed() > Duration::from_secs(60) {
                        "did not finish in a minute (a loop?)"
                    } else if resident_bytes() > 4 << 30 {
                        "holds over 4 GiB (an unbounded loop?)"
                    } else {
                        ""
                    };
                    if !problem.is_empty() {
                        // Straight to the handle: libtest's capture would swallow eprintln!
                        // output when the process aborts.
                        let _ = writeln!(io::stderr(), "{what}: the walk {problem}");
                        std::process::abort();
                    }
                }
                drop(current);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        GuardedWalker { current }
    }

    /// Opens `image`, looks a few paths up and exports everything (overlay mode, so the
    /// attribute checks run too) into a bounded sink. A panic fails the test, naming `what`.
    fn walk(&self, image: &Path, what: &str) -> Result<(), String> {
        *self.current.lock().unwrap() = Some((std::time::Instant::now(), what.to_owned()));
        let result = std::panic::catch_unwind(|| -> Result<(), String> {
            let reader = Ext4Reader::open(image).map_err(|e| e.to_string())?;
            for path in ["dir/file-007", "dir/sub/data-again", "nope"] {
                let _ = reader.lookup(Path::new(path));
            }
            export_tar(
                &reader,
                Path::new(""),
                Bounded { left: 256 << 20 },
                &ExportOptions {
                    overlay_upper: true,
                    ..ExportOptions::default()
                },
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        });
        *self.current.lock().unwrap() = None;
        match result {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{what}: the walk panicked: {message}");
            }
        }
    }
}

/// Byte ranges worth mutating exhaustively: the inodes of the interesting entries, and the
/// headers of their extent, indirect, attribute and directory blocks.
fn hot_ranges(image: &Path, block_size: u64) -> Vec<std::ops::Range<u64>> {
    let mut ranges = Vec::new();
    for path in ["/", "/dir", "/sparse", "/attrs", "/dir/long-link"] {
        let imap = run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("imap {path}"))
                .arg(image),
        );
        let block: u64 = field_after(&imap, "located at block ").unwrap();
        let offset = u64::from_str_radix(
            imap.split("offset 0x")
                .nth(1)
                .unwrap()
                .trim()
                .trim_end_matches('.'),
            16,
        )
        .unwrap();
        let start = block * block_size + offset;
        ranges.push(start..start + 256);
        let stat = run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("stat {path}"))
                .arg(image),
        );
        for marker in ["(ETB0):", "(IND):", "(DIND):", "File ACL: "] {
            if let Some(block) = field_after(&stat, marker).filter(|&block| block > 0) {
                ranges.push(block * block_size..block * block_size + 96);
            }
        }
    }
    // Whole directory blocks: every entry header, the last one's record length included.
    for dir in ["/", "/dir"] {
        let blocks = run_ok(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("blocks {dir}"))
                .arg(image),
        );
        if let Some(block) = blocks
            .split_whitespace()
            .find_map(|b| b.parse::<u64>().ok())
        {
            ranges.push(block * block_size..(block + 1) * block_size);
        }
    }
    ranges
}

fn field_after(text: &str, marker: &str) -> Option<u64> {
    let at = text.find(marker)? + marker.len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

#[test]
fn ext4_read_corrupted_metadata_never_panics_or_hangs() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    std::fs::create_dir(&source).unwrap();
    small_source(&source);
    let iterations: u64 = 600;
    let walker = GuardedWalker::new();
    for (config, args, systematic) in [
        (
            "1 KiB blocks, no checksums",
            &["-b", "1024", "-O", "^metadata_csum"][..],
            true,
        ),
        (
            "indirect maps, no checksums",
            &["-b", "1024", "-O", "^extent,^64bit,^metadata_csum"][..],
            true,
        ),
        ("default, checksums", &["-b", "4096"][..], false),
    ] {
        let image = dir.path().join("fuzz.ext4");
        mkfs(&image, &source, "8M", args);
        walker.walk(&image, &format!("{config}: pristine")).unwrap();
        let block_size: u64 = if args[1] == "1024" { 1024 } else { 4096 };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let byte_at = |offset: u64| {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, offset).unwrap();
            byte[0]
        };

        // Every byte of the hot ranges, one at a time, set to a few values.
        let mut refused = 0;
        let mut tried = 0;
        if systematic {
            for range in hot_ranges(&image, block_size) {
                for offset in range.clone() {
                    let original = byte_at(offset);
                    let mut values = if range.end - range.start > 256 {
                        vec![0xFF, original ^ 0x80] // whole directory blocks: fewer
                    } else {
                        vec![0x00, 0xFF, original ^ 0x80, original ^ 0x01]
                    };
                    values.retain(|&value| value != original);
                    values.dedup();
                    for value in values {
                        file.write_all_at(&[value], offset).unwrap();
                        let what = format!("{config}: byte {offset} set to {value:#04x}");
                        refused += usize::from(walker.walk(&image, &what).is_err());
                        tried += 1;
                    }
                    file.write_all_at(&[original], offset).unwrap();
                }
            }
            eprintln!("{config}: {refused} of {tried} single-byte corruptions refused");
            assert!(refused > 0, "{config}: no corruption was ever noticed");
        }

        // Seeded random flips anywhere in metadata, several at once.
        let blocks = metadata_blocks(&image);
        assert!(blocks.len() > 10, "{config}: {blocks:?}");
        let mut errors = 0;
        for iteration in 0..iterations {
            let seed = iteration * 7919 + block_size;
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut saved = Vec::new();
            for _ in 0..rng.usize(1..=6) {
                let block = blocks[rng.usize(..blocks.len())];
                // Half the flips hit the start of a block, where headers live.
                let within = if rng.bool() {
                    rng.u64(..128)
                } else {
                    rng.u64(..block_size)
                };
                let offset = block * block_size + within;
                let original = byte_at(offset);
                saved.push((offset, original));
                let flipped = if rng.bool() {
                    original ^ (1 << rng.u8(..8))
                } else {
                    rng.u8(..)
                };
                file.write_all_at(&[flipped], offset).unwrap();
            }
            let what = format!("{config}, iteration {iteration} (seed {seed})");
            if walker.walk(&image, &what).is_err() {
                errors += 1;
            }
            for (offset, byte) in saved.into_iter().rev() {
                file.write_all_at(&[byte], offset).unwrap();
            }
        }
        eprintln!("{config}: {errors} of {iterations} randomly corrupted images refused");
        assert!(errors > 0, "{config}: no corruption was ever noticed");
        std::fs::remove_file(&image).unwrap();
    }
}
