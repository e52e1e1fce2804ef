//! OCI-style layers → ext4 through `banger::rootfs`, checked with e2fsck, debugfs and a loop
//! mount; hostile layers must fail naming the layer and entry and leave nothing behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use banger::ext4::Sizing;
use banger::rootfs::layers::{Layer, RootfsOptions, build_rootfs};

use crate::ext4::{LoopMount, can_loop_mount};
use crate::support::{assert_fsck_clean, capable, debugfs, field, have_e2fsprogs, run_ok};

/// Builds one tar layer entry by entry. Names are written raw, so hostile names (`..`,
/// absolute) can be produced, which `tar::Builder`'s own path setters refuse.
pub(crate) struct LayerTar {
    builder: tar::Builder<Vec<u8>>,
}

#[derive(Clone, Copy)]
pub(crate) enum Kind<'a> {
    Dir,
    File(&'a [u8]),
    Symlink(&'a str),
    HardLink(&'a str),
    Char(u32, u32),
    Fifo,
}

pub(crate) struct Spec<'a> {
    name: &'a str,
    kind: Kind<'a>,
    mode: u32,
    pub(crate) uid: u64,
    pub(crate) gid: u64,
    pax: Vec<(&'a str, &'a [u8])>,
}

pub(crate) fn entry<'a>(name: &'a str, kind: Kind<'a>, mode: u32) -> Spec<'a> {
    Spec {
        name,
        kind,
        mode,
        uid: 0,
        gid: 0,
        pax: Vec::new(),
    }
}

impl LayerTar {
    pub(crate) fn new() -> LayerTar {
        LayerTar {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    pub(crate) fn add(&mut self, spec: Spec<'_>) -> &mut Self {
        if !spec.pax.is_empty() {
            self.builder
                .append_pax_extensions(spec.pax.iter().map(|(key, value)| (*key, *value)))
                .unwrap();
        }
        let mut header = tar::Header::new_ustar();
        let (entry_type, data): (tar::EntryType, &[u8]) = match spec.kind {
            Kind::Dir => (tar::EntryType::Directory, b""),
            Kind::File(data) => (tar::EntryType::Regular, data),
            Kind::Symlink(_) => (tar::EntryType::Symlink, b""),
            Kind::HardLink(_) => (tar::EntryType::Link, b""),
            Kind::Char(..) => (tar::EntryType::Char, b""),
            Kind::Fifo => (tar::EntryType::Fifo, b""),
        };
        header.set_entry_type(entry_type);
        header.set_size(data.len() as u64);
        header.set_mode(spec.mode);
        header.set_uid(spec.uid);
        header.set_gid(spec.gid);
        header.set_mtime(1_700_000_000);
        let raw = header.as_old_mut();
        raw.name = [0; 100];
        raw.name[..spec.name.len()].copy_from_slice(spec.name.as_bytes());
        if let Kind::Symlink(target) | Kind::HardLink(target) = spec.kind {
            raw.linkname = [0; 100];
            raw.linkname[..target.len()].copy_from_slice(target.as_bytes());
        }
        if let Kind::Char(major, minor) = spec.kind {
            header.set_device_major(major).unwrap();
            header.set_device_minor(minor).unwrap();
        }
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

fn write_layer(dir: &Path, name: &str, bytes: &[u8]) -> Layer {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    Layer::tar(format!("sha256:{name}"), path)
}

pub(crate) fn options() -> RootfsOptions {
    RootfsOptions {
        sizing: Sizing::Auto {
            headroom_percent: 150,
            min_bytes: 64 << 20,
        },
        strip_identity: true,
        seed: b"rootfs-test".to_vec(),
        cancel: None,
        sync: true,
    }
}

/// Three layers (gzip, zstd, plain) exercising every case the images issue lists, as
/// `(OCI media type, blob, tar)`.
pub(crate) fn faithful_layer_blobs() -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let capability: &[u8] = &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut base = LayerTar::new();
    base.add(entry("./", Kind::Dir, 0o755))
        .add(entry("etc/", Kind::Dir, 0o755))
        .add(entry("etc/motd", Kind::File(b"welcome\n"), 0o644))
        .add(entry("etc/hosts", Kind::File(b"old\n"), 0o644))
        .add(entry("usr/", Kind::Dir, 0o755))
        .add(entry("usr/bin/", Kind::Dir, 0o755))
        .add(entry("usr/lib/", Kind::Dir, 0o755))
        .add(entry("usr/bin/sudo", Kind::File(b"#!/bin/true\n"), 0o4755))
        .add(Spec {
            uid: 1000,
            gid: 1001,
            ..entry("usr/bin/tool", Kind::File(b"tool\n"), 0o2750)
        })
        .add(entry(
            "usr/bin/tool-again",
            Kind::HardLink("usr/bin/tool"),
            0o2750,
        ))
        .add(Spec {
            pax: vec![
                ("SCHILY.xattr.user.note", b"hello".as_slice()),
                ("SCHILY.xattr.security.capability", capability),
                ("mtime", b"1700000000.123456789".as_slice()),
            ],
            ..entry("usr/bin/ping", Kind::File(b"ping\n"), 0o755)
        })
        .add(entry("lib", Kind::Symlink("usr/lib"), 0o777))
        .add(entry("bin", Kind::Symlink("/usr/bin"), 0o777))
        .add(entry("var/", Kind::Dir, 0o755))
        .add(entry("var/cache/", Kind::Dir, 0o755))
        .add(entry("var/cache/apt/", Kind::Dir, 0o755))
        .add(entry(
            "var/cache/apt/pkgcache.bin",
            Kind::File(b"cache"),
            0o644,
        ))
        .add(entry("dev/", Kind::Dir, 0o755))
        .add(entry("dev/null", Kind::Char(1, 3), 0o666))
        .add(entry("run/", Kind::Dir, 0o755))
        .add(entry("run/initctl", Kind::Fifo, 0o600))
        .add(entry("run/.containerenv", Kind::File(b""), 0o644))
        .add(entry("tmp/", Kind::Dir, 0o1777))
        .add(entry(".dockerenv", Kind::File(b""), 0o644));
    let mut second = LayerTar::new();
    second
        .add(entry("etc/.wh.motd", Kind::File(b""), 0o644))
        .add(entry("var/cache/.wh..wh..opq", Kind::File(b""), 0o644))
        .add(entry("var/cache/fresh", Kind::File(b"new"), 0o644))
        // Written through the `lib -> usr/lib` symlink, as merged-/usr images do.
        .add(entry("lib/libfoo.so.1", Kind::File(b"\x7fELF"), 0o755))
        // Parents the layer never declares.
        .add(entry("srv/data/file", Kind::File(b"data"), 0o640));
    let mut third = LayerTar::new();
    third.add(entry("etc/hosts", Kind::File(b"new\n"), 0o600));
    let (base, second, third) = (base.finish(), second.finish(), third.finish());
    vec![
        (
            banger::oci::media_types::OCI_LAYER_GZIP.to_owned(),
            gzip(&base),
            base,
        ),
        (
            banger::oci::media_types::OCI_LAYER_ZSTD.to_owned(),
            zstd(&second),
            second,
        ),
        (
            banger::oci::media_types::OCI_LAYER_TAR.to_owned(),
            third.clone(),
            third,
        ),
    ]
}

fn faithful_layers(dir: &Path) -> Vec<Layer> {
    faithful_layer_blobs()
        .into_iter()
        .zip(["base", "second", "third"])
        .map(|((_, blob, _), name)| write_layer(dir, name, &blob))
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    content: Option<Vec<u8>>,
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Seen>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let relative = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        let file_type = metadata.file_type();
        let (kind, content) = if file_type.is_dir() {
            ("dir", None)
        } else if file_type.is_symlink() {
            (
                "symlink",
                Some(
                    std::fs::read_link(&path)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                        .into_bytes(),
                ),
            )
        } else if file_type.is_file() {
            ("file", Some(std::fs::read(&path).unwrap()))
        } else if file_type.is_char_device() {
            ("char", Some(format!("{:x}", metadata.rdev()).into_bytes()))
        } else if file_type.is_fifo() {
            ("fifo", None)
        } else {
            ("other", None)
        };
        out.insert(
            relative,
            Seen {
                kind,
                mode: metadata.mode() & 0o7777,
                uid: metadata.uid(),
                gid: metadata.gid(),
                content,
            },
        );
        if file_type.is_dir() {
            walk(root, &path, out);
        }
    }
}

fn seen(kind: &'static str, mode: u32, content: Option<&[u8]>) -> Seen {
    Seen {
        kind,
        mode,
        uid: 0,
        gid: 0,
        content: content.map(<[u8]>::to_vec),
    }
}

#[test]
fn layers_flatten_into_a_faithful_ext4() {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut layers = faithful_layers(dir.path());
    // banger's guest assets come last, as in every image `rootfs.build` writes.
    let agent = dir.path().join("agent.tar");
    banger::rootfs::layer_tar::write_agent_layer(&agent).unwrap();
    layers.push(Layer::tar("agent", &agent));
    let image = dir.path().join("rootfs.ext4");
    let progress = std::cell::Cell::new(0u64);
    build_rootfs(&layers, &image, &options(), &|done, total| {
        assert!(done <= total);
        progress.set(done);
    })
    .unwrap();
    let compressed: u64 = layers
        .iter()
        .map(|layer| std::fs::metadata(&layer.path).unwrap().len())
        .sum();
    assert_eq!(progress.get(), compressed, "progress must reach the total");
    assert_fsck_clean(&image);

    let block_size = run_ok(Command::new("dumpe2fs").arg("-h").arg(&image));
    assert_eq!(field(&block_size, "Block size:"), "4096");
    let sudo = debugfs(&image, "stat /usr/bin/sudo");
    assert_eq!(field(&sudo, "Mode:"), "04755", "{sudo}");
    let tool = debugfs(&image, "stat /usr/bin/tool");
    assert_eq!(field(&tool, "User:"), "1000");
    assert_eq!(field(&tool, "Group:"), "1001");
    assert_eq!(field(&tool, "Mode:"), "02750");
    assert_eq!(field(&tool, "Links:"), "2", "hard link lost:\n{tool}");
    let null = debugfs(&image, "stat /dev/null");
    assert!(null.contains("Type: character special"), "{null}");
    assert!(null.contains("Device major/minor number: 01:03"), "{null}");
    let ping = debugfs(&image, "stat /usr/bin/ping");
    assert!(
        ping.contains("mtime: 0x6553f100:1d6f3454"),
        "nanoseconds lost (expect .123456789 << 2 = 0x1d6f3454):\n{ping}"
    );
    let xattrs = debugfs(&image, "ea_list /usr/bin/ping");
    assert!(xattrs.contains("user.note (5) = \"hello\""), "{xattrs}");
    assert!(xattrs.contains("security.capability (20)"), "{xattrs}");
    for gone in [
        "/etc/motd",
        "/.dockerenv",
        "/run/.containerenv",
        "/var/cache/apt",
    ] {
        let stat = debugfs(&image, &format!("stat {gone}"));
        assert!(stat.is_empty(), "{gone} should be gone:\n{stat}");
    }
    assert_eq!(debugfs(&image, "cat /etc/hosts"), "new\n");
    let agent = debugfs(&image, "stat /usr/local/bin/banger-agent");
    assert_eq!(field(&agent, "Mode:"), "0755");
    assert_eq!(field(&agent, "User:"), "0");

    // Entry for entry against the mounted image.
    if !capable("root with loop devices", can_loop_mount()) {
        return;
    }
    let mount = LoopMount::new(&image, true).unwrap();
    let mut tree = BTreeMap::new();
    walk(mount.path(), mount.path(), &mut tree);
    // banger's own files are checked above; compare what the layers said.
    tree.retain(|path, _| {
        !(path.starts_with("usr/local")
            || path.starts_with("etc/systemd")
            || path.starts_with("etc/modules-load.d")
            || path.starts_with("etc/tmpfiles.d")
            || path.starts_with("etc/ssh")
            || path == "lost+found")
    });
    let expected: BTreeMap<String, Seen> = [
        ("bin", seen("symlink", 0o777, Some(b"/usr/bin"))),
        ("dev", seen("dir", 0o755, None)),
        ("dev/null", seen("char", 0o666, Some(b"103"))),
        ("etc", seen("dir", 0o755, None)),
        ("etc/hosts", seen("file", 0o600, Some(b"new\n"))),
        ("lib", seen("symlink", 0o777, Some(b"usr/lib"))),
        ("run", seen("dir", 0o755, None)),
        ("run/initctl", seen("fifo", 0o600, None)),
        ("srv", seen("dir", 0o755, None)),
        ("srv/data", seen("dir", 0o755, None)),
        ("srv/data/file", seen("file", 0o640, Some(b"data"))),
        ("tmp", seen("dir", 0o1777, None)),
        ("usr", seen("dir", 0o755, None)),
        ("usr/bin", seen("dir", 0o755, None)),
        ("usr/bin/ping", seen("file", 0o755, Some(b"ping\n"))),
        ("usr/bin/sudo", seen("file", 0o4755, Some(b"#!/bin/true\n"))),
        (
            "usr/bin/tool",
            Seen {
                uid: 1000,
                gid: 1001,
                ..seen("file", 0o2750, Some(b"tool\n"))
            },
        ),
        (
            "usr/bin/tool-again",
            Seen {
                uid: 1000,
                gid: 1001,
                ..seen("file", 0o2750, Some(b"tool\n"))
            },
        ),
        ("usr/lib", seen("dir", 0o755, None)),
        ("usr/lib/libfoo.so.1", seen("file", 0o755, Some(b"\x7fELF"))),
        ("var", seen("dir", 0o755, None)),
        ("var/cache", seen("dir", 0o755, None)),
        ("var/cache/fresh", seen("file", 0o644, Some(b"new"))),
    ]
    .into_iter()
    .map(|(path, seen)| (path.to_owned(), seen))
    .collect();
    assert_eq!(tree, expected);
}

#[test]
fn the_same_layers_give_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let layers = faithful_layers(dir.path());
    let digest = |name: &str| {
        let image = dir.path().join(name);
        build_rootfs(&layers, &image, &options(), &|_, _| {}).unwrap();
        blake3::hash(&std::fs::read(&image).unwrap())
    };
    assert_eq!(digest("one.ext4"), digest("two.ext4"));
}

#[test]
fn hostile_layers_are_refused_naming_layer_and_entry() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            {
                let mut tar = LayerTar::new();
                tar.add(entry("../outside/pwned", Kind::File(b"x"), 0o644));
                tar.finish()
            },
            "layer sha256:dotdot: refusing entry: `../outside/pwned` contains `..`",
        ),
        (
            "absolute",
            {
                let mut tar = LayerTar::new();
                tar.add(entry("/etc/passwd", Kind::File(b"x"), 0o644));
                tar.finish()
            },
            "layer sha256:absolute: refusing entry: `/etc/passwd` is an absolute path",
        ),
        (
            "symlink-escape",
            {
                let mut tar = LayerTar::new();
                tar.add(entry("escape", Kind::Symlink("../../../.."), 0o777))
                    .add(entry("escape/etc/pwned", Kind::File(b"x"), 0o644));
                tar.finish()
            },
            "layer sha256:symlink-escape: refusing entry: `escape/etc/pwned` writes through symlink `escape` -> `../../../..`, which points outside the image",
        ),
        (
            "hardlink-outside",
            {
                let mut tar = LayerTar::new();
                tar.add(entry("shadow", Kind::HardLink("../etc/shadow"), 0o644));
                tar.finish()
            },
            "layer sha256:hardlink-outside: refusing entry: `shadow (hard link to ../etc/shadow)` contains `..`",
        ),
        (
            "hardlink-absolute",
            {
                let mut tar = LayerTar::new();
                tar.add(entry("shadow", Kind::HardLink("/etc/shadow"), 0o644));
                tar.finish()
            },
            "layer sha256:hardlink-absolute: refusing entry: `shadow (hard link to /etc/shadow)` is an absolute path",
        ),
        (
            "whiteout-outside",
            {
                let mut tar = LayerTar::new();
                tar.add(entry("../.wh.outside", Kind::File(b""), 0o644));
                tar.finish()
            },
            "layer sha256:whiteout-outside: refusing entry: `../.wh.outside` contains `..`",
        ),
    ];
    for (name, tar, message) in cases {
        let layer = write_layer(dir.path(), name, &gzip(&tar));
        let image = dir.path().join(format!("{name}.ext4"));
        let error = build_rootfs(&[layer], &image, &options(), &|_, _| {}).unwrap_err();
        assert_eq!(banger::error::error_chain(&error), message, "{name}");
        assert!(!image.exists(), "{name}: a partial image was left behind");
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn a_truncated_layer_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let layers = faithful_layers(dir.path());
    let bytes = std::fs::read(&layers[0].path).unwrap();
    let truncated = write_layer(dir.path(), "truncated", &bytes[..bytes.len() / 2]);
    let image = dir.path().join("truncated.ext4");
    let error = build_rootfs(&[truncated], &image, &options(), &|_, _| {}).unwrap_err();
    let text = banger::error::error_chain(&error);
    assert!(
        text.starts_with("cannot read layer sha256:truncated")
            || text.starts_with("layer sha256:truncated: entry"),
        "{text}"
    );
    assert!(!image.exists());
    let _: PathBuf = layers[0].path.clone();
}

#[test]
fn an_oversized_long_name_is_refused_before_it_is_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(1);
    header.set_mode(0o644);
    // A 2 MiB path: tar writes it as a GNU long-name entry of that size.
    let name = format!("{}/x", "d".repeat(2 << 20));
    builder.append_data(&mut header, &name, &b"x"[..]).unwrap();
    let tar = builder.into_inner().unwrap();
    let layer = write_layer(dir.path(), "longname", &gzip(&tar));
    let image = dir.path().join("longname.ext4");
    let error = build_rootfs(&[layer], &image, &options(), &|_, _| {}).unwrap_err();
    let text = banger::error::error_chain(&error);
    assert!(
        text.starts_with("cannot read layer sha256:longname"),
        "{text}"
    );
    assert!(
        text.contains(
            "a tar extension entry (type `L`) of 2097155 bytes, more than the 1048576-byte limit"
        ),
        "{text}"
    );
    assert!(!image.exists());
}
