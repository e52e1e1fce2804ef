//! Bundles: real ext4 images and kernel trees packed and unpacked, byte-for-byte determinism,
//! interoperability with GNU tar and zstd, and hostile bundles refused without leaving
//! anything behind.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger::bundle::{
    BundleError, BundleKind, BundleManifest, FileDigest, kernel_files, read_manifest,
    unpack_bundle, write_bundle,
};
use banger::ext4::{BuildOptions, EntryKind, Ext4Builder, Metadata, Sizing};
use tokio_util::sync::CancellationToken;

use crate::registry::entries;
use crate::support::{
    assert_fsck_clean, capable, find_program, have_e2fsprogs, run_ok, sha256_hex,
};

const IMAGE_SIZE: u64 = 128 * 1024 * 1024;

fn no_progress() -> impl FnMut(u64, u64) {
    |_, _| {}
}

/// A real ext4 image, mostly empty: a few directories and files, sized [`IMAGE_SIZE`].
fn build_ext4(path: &Path) {
    let mut options = BuildOptions::with_seed(b"banger bundle tests");
    options.sync = false;
    let mut builder = Ext4Builder::create(path, options).unwrap();
    let directory = Metadata {
        mode: 0o755,
        ..Metadata::default()
    };
    let file = Metadata {
        mode: 0o644,
        ..Metadata::default()
    };
    for dir in ["etc", "usr", "usr/bin"] {
        builder
            .insert(Path::new(dir), EntryKind::Directory, &directory)
            .unwrap();
    }
    let hostname = b"bundle-test\n";
    builder
        .insert(
            Path::new("etc/hostname"),
            EntryKind::File {
                size: hostname.len() as u64,
                data: &mut &hostname[..],
            },
            &file,
        )
        .unwrap();
    let binary = crate::support::pseudo_random(6 * 1024 * 1024 + 123, 7);
    builder
        .insert(
            Path::new("usr/bin/tool"),
            EntryKind::File {
                size: binary.len() as u64,
                data: &mut &binary[..],
            },
            &file,
        )
        .unwrap();
    builder.finish(Sizing::Fixed(IMAGE_SIZE)).unwrap();
}

fn image_manifest() -> BundleManifest {
    BundleManifest::image("test-image", "debian", "x86_64", "test-kernel")
}

/// Every file under `dir`, by `/`-separated relative path, with its bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let file_type = entry.file_type().unwrap();
            if file_type.is_dir() {
                walk(root, &path, out);
            } else {
                assert!(
                    file_type.is_file(),
                    "{} is not a regular file",
                    path.display()
                );
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                out.insert(relative, fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The names directly in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    entries(dir)
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn an_ext4_image_round_trips_and_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rootfs.ext4");
    build_ext4(&image);
    let bundle = dir.path().join("image.tar.zst");
    let mut reports = Vec::new();
    let written = write_bundle(
        &image_manifest(),
        &[("rootfs.ext4".to_owned(), image.clone())],
        &bundle,
        &mut |done, total| reports.push((done, total)),
        &CancellationToken::new(),
    )
    .unwrap();

    let original = fs::read(&image).unwrap();
    assert_eq!(
        written.manifest.files["rootfs.ext4"],
        FileDigest {
            sha256: sha256_hex(&original),
            size: IMAGE_SIZE,
        }
    );
    let bundle_bytes = fs::read(&bundle).unwrap();
    assert_eq!(written.sha256, sha256_hex(&bundle_bytes));
    assert_eq!(written.size, bundle_bytes.len() as u64);
    assert!(
        written.size < IMAGE_SIZE / 8,
        "a mostly empty image compresses well: {} bytes",
        written.size
    );
    assert_eq!(reports.first(), Some(&(0, IMAGE_SIZE)));
    assert_eq!(reports.last(), Some(&(IMAGE_SIZE, IMAGE_SIZE)));
    assert_eq!(names(dir.path()), ["image.tar.zst", "rootfs.ext4"]);
    assert_eq!(
        fs::metadata(&bundle).unwrap().mode() & 0o777,
        0o644,
        "a bundle is for sharing"
    );

    assert_eq!(read_manifest(&bundle).unwrap(), written.manifest);
    let out = dir.path().join("out");
    let mut unpacked_reports = Vec::new();
    let manifest = unpack_bundle(
        &bundle,
        &out,
        &mut |done, total| unpacked_reports.push((done, total)),
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(manifest, written.manifest);
    assert_eq!(names(&out), ["rootfs.ext4"]);
    let unpacked = out.join("rootfs.ext4");
    assert!(
        fs::read(&unpacked).unwrap() == original,
        "unpacked bytes differ"
    );
    assert_eq!(unpacked_reports.last(), Some(&(IMAGE_SIZE, IMAGE_SIZE)));
    let allocated = fs::metadata(&unpacked).unwrap().blocks() * 512;
    assert!(
        allocated < IMAGE_SIZE / 4,
        "zero blocks stay holes: {allocated} bytes allocated"
    );
    if capable("e2fsprogs", have_e2fsprogs()) {
        assert_fsck_clean(&unpacked);
    }
}

#[test]
fn the_same_inputs_give_the_same_bundle_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = kernel_tree(dir.path());
    let mut files = kernel_files(&kernel).unwrap();
    let write = |files: &[(String, PathBuf)], out: &Path| {
        write_bundle(
            &BundleManifest::kernel("test-kernel", "x86_64"),
            files,
            out,
            &mut no_progress(),
            &CancellationToken::new(),
        )
        .unwrap()
    };
    let first = write(&files, &dir.path().join("first.tar.zst"));
    // Another order, later modification times: the bytes must not change.
    files.reverse();
    assert!(move_mtime_forward(&kernel.join("vmlinux")));
    let second = write(&files, &dir.path().join("second.tar.zst"));
    assert_eq!(first, second);
    assert!(
        fs::read(dir.path().join("first.tar.zst")).unwrap()
            == fs::read(dir.path().join("second.tar.zst")).unwrap(),
        "two writes of the same inputs differ"
    );
}

/// Touches `path` so its mtime moves; true when it did.
fn move_mtime_forward(path: &Path) -> bool {
    let before = fs::metadata(path).unwrap().mtime();
    let file = fs::File::options().write(true).open(path).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    file.set_modified(later).unwrap();
    fs::metadata(path).unwrap().mtime() != before
}

/// A kernel directory: vmlinux, initrd and a module tree with a path too long for a plain tar
/// header.
fn kernel_tree(root: &Path) -> PathBuf {
    let kernel = root.join("kernel");
    let modules = kernel.join("modules/6.1.0-test/kernel/drivers");
    fs::create_dir_all(modules.join("net")).unwrap();
    fs::create_dir_all(modules.join("block")).unwrap();
    let deep = modules.join(format!("very/{}/deep", "nested-directory-name".repeat(4)));
    fs::create_dir_all(&deep).unwrap();
    fs::write(
        kernel.join("vmlinux"),
        crate::support::pseudo_random(3 * 1024 * 1024, 1),
    )
    .unwrap();
    fs::write(
        kernel.join("initrd"),
        crate::support::pseudo_random(700 * 1024, 2),
    )
    .unwrap();
    fs::write(
        modules.join("net/virtio_net.ko"),
        crate::support::pseudo_random(90_000, 3),
    )
    .unwrap();
    fs::write(
        modules.join("block/virtio_blk.ko"),
        crate::support::pseudo_random(40_000, 4),
    )
    .unwrap();
    fs::write(
        deep.join("vsock.ko"),
        crate::support::pseudo_random(5_000, 5),
    )
    .unwrap();
    fs::write(kernel.join("modules/6.1.0-test/modules.dep"), b"").unwrap();
    kernel
}

#[test]
fn a_kernel_bundle_with_a_module_tree_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = kernel_tree(dir.path());
    let files = kernel_files(&kernel).unwrap();
    assert_eq!(files.len(), 6);
    assert!(files.iter().any(|(path, _)| path.len() > 100));
    let bundle = dir.path().join("kernel.tar.zst");
    let written = write_bundle(
        &BundleManifest::kernel("test-kernel", "x86_64"),
        &files,
        &bundle,
        &mut no_progress(),
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(written.manifest.kind, BundleKind::Kernel);
    assert_eq!(written.manifest.files.len(), 6);
    assert_eq!(
        written.manifest.files["modules/6.1.0-test/modules.dep"].size,
        0
    );

    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("unrelated"), b"left alone").unwrap();
    let manifest =
        unpack_bundle(&bundle, &out, &mut no_progress(), &CancellationToken::new()).unwrap();
    assert_eq!(manifest, written.manifest);
    let mut expected = tree(&kernel);
    expected.insert("unrelated".to_owned(), b"left alone".to_vec());
    assert!(tree(&out) == expected, "the unpacked tree differs");
    assert_eq!(names(&out), ["initrd", "modules", "unrelated", "vmlinux"]);
}

#[test]
fn kernel_directories_with_links_or_strays_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = kernel_tree(dir.path());
    std::os::unix::fs::symlink("/usr/src", kernel.join("modules/6.1.0-test/build")).unwrap();
    let error = kernel_files(&kernel).unwrap_err().to_string();
    assert!(
        error.contains("build") && error.contains("symlink"),
        "{error}"
    );
    fs::remove_file(kernel.join("modules/6.1.0-test/build")).unwrap();
    fs::write(kernel.join("config"), b"").unwrap();
    let error = kernel_files(&kernel).unwrap_err().to_string();
    assert!(error.contains("`config`"), "{error}");
}

#[test]
fn gnu_tar_and_zstd_read_bundles_and_hand_made_bundles_unpack() {
    let tools = find_program("tar").is_some() && find_program("zstd").is_some();
    if !capable("tar and zstd", tools) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = kernel_tree(dir.path());
    let bundle = dir.path().join("kernel.tar.zst");
    let written = write_bundle(
        &BundleManifest::kernel("test-kernel", "x86_64"),
        &kernel_files(&kernel).unwrap(),
        &bundle,
        &mut no_progress(),
        &CancellationToken::new(),
    )
    .unwrap();
    run_ok(Command::new("zstd").arg("-tq").arg(&bundle));
    let listing = run_ok(Command::new("tar").arg("--zstd").arg("-tf").arg(&bundle));
    let listed: Vec<&str> = listing.lines().collect();
    assert_eq!(listed[0], "manifest.json");
    assert_eq!(
        listed[1..].to_vec(),
        written
            .manifest
            .files
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );

    // By hand, as docs/bundles.md says: the manifest first, then the files; GNU tar adds
    // directory entries, `./` prefixes and (with -S) sparse entries.
    let hand = dir.path().join("hand");
    fs::create_dir(&hand).unwrap();
    let image = hand.join("rootfs.ext4");
    build_ext4(&image);
    let mut manifest = image_manifest();
    manifest.files.insert(
        "rootfs.ext4".to_owned(),
        FileDigest {
            sha256: sha256_hex(&fs::read(&image).unwrap()),
            size: IMAGE_SIZE,
        },
    );
    fs::write(hand.join("manifest.json"), manifest.to_json()).unwrap();
    let hand_bundle = dir.path().join("hand.tar.zst");
    run_ok(
        Command::new("tar")
            .arg("--zstd")
            .arg("--sparse")
            .arg("-cf")
            .arg(&hand_bundle)
            .arg("-C")
            .arg(&hand)
            .args(["./manifest.json", "./rootfs.ext4"]),
    );
    let out = dir.path().join("out");
    let unpacked = unpack_bundle(
        &hand_bundle,
        &out,
        &mut no_progress(),
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(unpacked, manifest);
    assert!(fs::read(out.join("rootfs.ext4")).unwrap() == fs::read(&image).unwrap());
}

// ---------------------------------------------------------------------------------------
// Failures leave nothing behind

#[test]
fn a_failed_or_cancelled_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let bundle = out_dir.join("image.tar.zst");
    let image = dir.path().join("rootfs.ext4");
    fs::write(&image, crate::support::pseudo_random(3 * 1024 * 1024, 9)).unwrap();
    let image_files = [("rootfs.ext4".to_owned(), image.clone())];
    let write =
        |manifest: &BundleManifest, files: &[(String, PathBuf)], cancel: &CancellationToken| {
            write_bundle(manifest, files, &bundle, &mut no_progress(), cancel).unwrap_err()
        };

    let missing = [("rootfs.ext4".to_owned(), dir.path().join("nope.ext4"))];
    let error = write(&image_manifest(), &missing, &CancellationToken::new());
    assert!(matches!(error, BundleError::ReadInput { .. }), "{error}");
    assert!(error.to_string().contains("nope.ext4"), "{error}");

    let wrong_kind = [("vmlinux".to_owned(), image.clone())];
    let error = write(&image_manifest(), &wrong_kind, &CancellationToken::new());
    assert!(matches!(error, BundleError::InvalidInput { .. }), "{error}");
    assert!(error.to_string().contains("vmlinux"), "{error}");

    let traversal = [("../rootfs.ext4".to_owned(), image.clone())];
    let error = write(&image_manifest(), &traversal, &CancellationToken::new());
    assert!(error.to_string().contains(".."), "{error}");

    let mut prefilled = image_manifest();
    prefilled.files.insert(
        "rootfs.ext4".to_owned(),
        FileDigest {
            sha256: "0".repeat(64),
            size: 1,
        },
    );
    let error = write(&prefilled, &image_files, &CancellationToken::new());
    assert!(
        error.to_string().contains("`files` must be empty"),
        "{error}"
    );

    let cancel = CancellationToken::new();
    cancel.cancel();
    let error = write(&image_manifest(), &image_files, &cancel);
    assert!(matches!(error, BundleError::Cancelled { .. }), "{error}");

    assert!(
        names(&out_dir).is_empty(),
        "left behind: {:?}",
        names(&out_dir)
    );
}

#[test]
fn unpacking_refuses_to_replace_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rootfs.ext4");
    fs::write(&image, b"new image").unwrap();
    let bundle = dir.path().join("image.tar.zst");
    write_bundle(
        &image_manifest(),
        &[("rootfs.ext4".to_owned(), image)],
        &bundle,
        &mut no_progress(),
        &CancellationToken::new(),
    )
    .unwrap();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("rootfs.ext4"), b"old image").unwrap();
    let error =
        unpack_bundle(&bundle, &out, &mut no_progress(), &CancellationToken::new()).unwrap_err();
    assert!(matches!(error, BundleError::UnpackTarget { .. }), "{error}");
    assert!(error.to_string().contains("already exists"), "{error}");
    assert_eq!(names(&out), ["rootfs.ext4"]);
    assert_eq!(fs::read(out.join("rootfs.ext4")).unwrap(), b"old image");
}

#[test]
fn a_cancelled_unpack_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rootfs.ext4");
    fs::write(&image, crate::support::pseudo_random(5 * 1024 * 1024, 11)).unwrap();
    let bundle = dir.path().join("image.tar.zst");
    write_bundle(
        &image_manifest(),
        &[("rootfs.ext4".to_owned(), image)],
        &bundle,
        &mut no_progress(),
        &CancellationToken::new(),
    )
    .unwrap();
    let out = dir.path().join("out");
    let cancel = CancellationToken::new();
    let error = unpack_bundle(
        &bundle,
        &out,
        &mut |done, _| {
            if done > 0 {
                cancel.cancel();
            }
        },
        &cancel,
    )
    .unwrap_err();
    assert!(matches!(error, BundleError::Cancelled { .. }), "{error}");
    assert!(
        !out.exists(),
        "the output directory was created by the unpack"
    );
}

// ---------------------------------------------------------------------------------------
// Hostile bundles

/// One tar entry, written byte by byte so that names the tar crate would refuse to write
/// (`..`, absolute) can be tested.
struct RawEntry {
    name: String,
    entry_type: tar::EntryType,
    data: Vec<u8>,
    link: &'static str,
}

impl RawEntry {
    fn file(name: &str, data: &[u8]) -> RawEntry {
        RawEntry {
            name: name.to_owned(),
            entry_type: tar::EntryType::Regular,
            data: data.to_vec(),
            link: "",
        }
    }

    fn special(name: &str, entry_type: tar::EntryType, link: &'static str) -> RawEntry {
        RawEntry {
            name: name.to_owned(),
            entry_type,
            data: Vec::new(),
            link,
        }
    }
}

fn raw_tar(entries: &[RawEntry]) -> Vec<u8> {
    let mut tar = Vec::new();
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..entry.name.len()].copy_from_slice(entry.name.as_bytes());
        gnu.linkname[..entry.link.len()].copy_from_slice(entry.link.as_bytes());
        header.set_size(entry.data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(entry.entry_type);
        header.set_cksum();
        tar.extend_from_slice(header.as_bytes());
        tar.extend_from_slice(&entry.data);
        tar.resize(tar.len().next_multiple_of(512), 0);
    }
    tar.extend_from_slice(&[0u8; 1024]);
    tar
}

const ROOTFS: &[u8] = b"not really ext4, but bytes all the same";

/// The manifest of an image bundle whose `rootfs.ext4` is [`ROOTFS`].
fn rootfs_manifest() -> Vec<u8> {
    let mut manifest = image_manifest();
    manifest.files.insert(
        "rootfs.ext4".to_owned(),
        FileDigest {
            sha256: sha256_hex(ROOTFS),
            size: ROOTFS.len() as u64,
        },
    );
    manifest.to_json()
}

/// Unpacks `bundle_bytes` into a fresh directory and into one holding a sentinel; both must
/// fail and leave the directory as it was. Returns the error's text.
fn refused(bundle_bytes: &[u8], check: fn(&BundleError) -> bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("hostile.tar.zst");
    fs::write(&bundle, bundle_bytes).unwrap();

    let fresh = dir.path().join("fresh");
    let error = unpack_bundle(
        &bundle,
        &fresh,
        &mut no_progress(),
        &CancellationToken::new(),
    )
    .unwrap_err();
    assert!(check(&error), "unexpected error: {error:?}");
    assert!(
        !fresh.exists(),
        "{error}: the output directory was left behind"
    );

    let existing = dir.path().join("existing");
    fs::create_dir(&existing).unwrap();
    fs::write(existing.join("sentinel"), b"keep").unwrap();
    let again = unpack_bundle(
        &bundle,
        &existing,
        &mut no_progress(),
        &CancellationToken::new(),
    )
    .unwrap_err();
    assert_eq!(again.to_string(), error.to_string());
    assert_eq!(
        names(&existing),
        ["sentinel"],
        "{error}: files were left behind"
    );

    let text = error.to_string();
    assert!(
        text.contains(&bundle.display().to_string()),
        "the error names the bundle: {text}"
    );
    text
}

fn zstd(tar: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(tar, 3).unwrap()
}

fn hostile(entries: &[RawEntry]) -> Vec<u8> {
    zstd(&raw_tar(entries))
}

#[test]
fn a_well_formed_raw_bundle_unpacks() {
    // The control for the hostile cases below: the same construction, nothing wrong.
    let bytes = hostile(&[
        RawEntry::file("manifest.json", &rootfs_manifest()),
        RawEntry::file("rootfs.ext4", ROOTFS),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("good.tar.zst");
    fs::write(&bundle, bytes).unwrap();
    let out = dir.path().join("out");
    unpack_bundle(&bundle, &out, &mut no_progress(), &CancellationToken::new()).unwrap();
    assert_eq!(fs::read(out.join("rootfs.ext4")).unwrap(), ROOTFS);
}

#[test]
fn traversal_and_absolute_entries_are_refused() {
    for name in ["../rootfs.ext4", "/rootfs.ext4", "sub/../../rootfs.ext4"] {
        let text = refused(
            &hostile(&[
                RawEntry::file("manifest.json", &rootfs_manifest()),
                RawEntry::file(name, ROOTFS),
            ]),
            |error| matches!(error, BundleError::EntryRefused { .. }),
        );
        assert!(text.contains(name), "{text}");
    }
}

#[test]
fn entries_the_manifest_does_not_list_are_refused() {
    let text = refused(
        &hostile(&[
            RawEntry::file("manifest.json", &rootfs_manifest()),
            RawEntry::file("rootfs.ext4", ROOTFS),
            RawEntry::file("extra", b"smuggled"),
        ]),
        |error| matches!(error, BundleError::EntryRefused { .. }),
    );
    assert!(
        text.contains("`extra`") && text.contains("does not list"),
        "{text}"
    );
}

#[test]
fn wrong_digests_and_sizes_are_refused() {
    let mut altered = ROOTFS.to_vec();
    altered[0] ^= 1;
    let text = refused(
        &hostile(&[
            RawEntry::file("manifest.json", &rootfs_manifest()),
            RawEntry::file("rootfs.ext4", &altered),
        ]),
        |error| matches!(error, BundleError::EntryMismatch { .. }),
    );
    assert!(
        text.contains("`rootfs.ext4`") && text.contains("sha256"),
        "{text}"
    );

    let text = refused(
        &hostile(&[
            RawEntry::file("manifest.json", &rootfs_manifest()),
            RawEntry::file("rootfs.ext4", &ROOTFS[1..]),
        ]),
        |error| matches!(error, BundleError::EntryMismatch { .. }),
    );
    assert!(text.contains("bytes"), "{text}");

    let mut longer = ROOTFS.to_vec();
    longer.push(b'!');
    refused(
        &hostile(&[
            RawEntry::file("manifest.json", &rootfs_manifest()),
            RawEntry::file("rootfs.ext4", &longer),
        ]),
        |error| matches!(error, BundleError::EntryMismatch { .. }),
    );
}

#[test]
fn links_and_devices_are_refused() {
    let cases = [
        RawEntry::special("rootfs.ext4", tar::EntryType::Symlink, "/etc/shadow"),
        RawEntry::special("rootfs.ext4", tar::EntryType::Link, "manifest.json"),
        RawEntry::special("rootfs.ext4", tar::EntryType::Char, ""),
        RawEntry::special("rootfs.ext4", tar::EntryType::Block, ""),
        RawEntry::special("rootfs.ext4", tar::EntryType::Fifo, ""),
    ];
    for case in cases {
        let text = refused(
            &hostile(&[RawEntry::file("manifest.json", &rootfs_manifest()), case]),
            |error| matches!(error, BundleError::EntryRefused { .. }),
        );
        assert!(
            text.contains("links are not allowed") || text.contains("devices and FIFOs"),
            "{text}"
        );
    }
}

#[test]
fn duplicate_missing_and_misplaced_entries_are_refused() {
    let text = refused(
        &hostile(&[
            RawEntry::file("manifest.json", &rootfs_manifest()),
            RawEntry::file("rootfs.ext4", ROOTFS),
            RawEntry::file("rootfs.ext4", ROOTFS),
        ]),
        |error| matches!(error, BundleError::EntryRefused { .. }),
    );
    assert!(text.contains("twice"), "{text}");

    let text = refused(
        &hostile(&[RawEntry::file("manifest.json", &rootfs_manifest())]),
        |error| matches!(error, BundleError::EntryMissing { .. }),
    );
    assert!(text.contains("`rootfs.ext4`"), "{text}");

    let text = refused(
        &hostile(&[
            RawEntry::file("rootfs.ext4", ROOTFS),
            RawEntry::file("manifest.json", &rootfs_manifest()),
        ]),
        |error| matches!(error, BundleError::NotABundle { .. }),
    );
    assert!(text.contains("first entry"), "{text}");

    let text = refused(
        &hostile(&[
            RawEntry::file("manifest.json", &rootfs_manifest()),
            RawEntry::special("etc", tar::EntryType::Directory, ""),
            RawEntry::file("rootfs.ext4", ROOTFS),
        ]),
        |error| matches!(error, BundleError::EntryRefused { .. }),
    );
    assert!(
        text.contains("`etc`") && text.contains("directory"),
        "{text}"
    );
}

#[test]
fn invalid_manifests_are_refused() {
    let manifest = String::from_utf8(rootfs_manifest()).unwrap();
    let unknown_field = manifest.replacen("\"name\"", "\"colour\": \"red\",\n  \"name\"", 1);
    let text = refused(
        &hostile(&[
            RawEntry::file("manifest.json", unknown_field.as_bytes()),
            RawEntry::file("rootfs.ext4", ROOTFS),
        ]),
        |error| matches!(error, BundleError::InvalidManifest { .. }),
    );
    assert!(text.contains("colour"), "{text}");

    let escaping = manifest.replace("\"rootfs.ext4\"", "\"../rootfs.ext4\"");
    let text = refused(
        &hostile(&[
            RawEntry::file("manifest.json", escaping.as_bytes()),
            RawEntry::file("../rootfs.ext4", ROOTFS),
        ]),
        |error| matches!(error, BundleError::InvalidManifest { .. }),
    );
    assert!(text.contains(".."), "{text}");
}

#[test]
fn truncated_and_corrupt_bundles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rootfs.ext4");
    fs::write(&image, crate::support::pseudo_random(4 * 1024 * 1024, 13)).unwrap();
    let bundle = dir.path().join("image.tar.zst");
    write_bundle(
        &image_manifest(),
        &[("rootfs.ext4".to_owned(), image)],
        &bundle,
        &mut no_progress(),
        &CancellationToken::new(),
    )
    .unwrap();
    let bytes = fs::read(&bundle).unwrap();

    // Cut inside the data frame, and just before its end (only the frame's checksum missing).
    for cut in [bytes.len() / 2, bytes.len() - 2] {
        let text = refused(&bytes[..cut], |error| {
            matches!(error, BundleError::ReadBundle { .. })
        });
        assert!(text.contains("damaged or incomplete"), "{text}");
    }
    // Cut after the tar's last file, before its end: the zstd frame is incomplete.
    refused(&bytes[..bytes.len() - 20], |error| {
        matches!(error, BundleError::ReadBundle { .. })
    });

    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x55;
    refused(&flipped, |error| {
        matches!(
            error,
            BundleError::ReadBundle { .. } | BundleError::EntryMismatch { .. }
        )
    });

    refused(b"plain text, not zstd", |error| {
        matches!(error, BundleError::ReadBundle { .. })
    });

    let mut trailing = raw_tar(&[
        RawEntry::file("manifest.json", &rootfs_manifest()),
        RawEntry::file("rootfs.ext4", ROOTFS),
    ]);
    trailing.extend_from_slice(b"hidden after the end");
    let text = refused(&zstd(&trailing), |error| {
        matches!(error, BundleError::NotABundle { .. })
    });
    assert!(text.contains("after the end"), "{text}");
}
