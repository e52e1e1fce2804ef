//! Kernel recipe pieces against real tools: `.deb`s built by `dpkg-deb`, compressed modules
//! made by `xz`/`zstd`, initramfs archives read back by `cpio` and `file`, and (slow) Debian's
//! real `linux-image-cloud-amd64` turned into a PVH vmlinux, a module closure and an initramfs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger::kernel::compression::Compression;
use banger::kernel::deb::DebPackage;
use banger::kernel::initramfs::{
    InitBinary, InitramfsCompression, InitramfsContents, MODULES_LOAD_PATH, build_initramfs,
};
use banger::kernel::modules::{ModuleClosure, ModuleTree};
use banger::kernel::vmlinux::{ImageFormat, Vmlinux};
use banger::kernel::{KernelFiles, is_kernel_file, vmlinux};
use banger::plan::lower::INITRAMFS_MODULES;

use crate::support::{capable, find_program, run, run_ok};

fn have(program: &str, package: &str) -> bool {
    capable(
        &format!("{program} (Debian package `{package}`)"),
        find_program(program).is_some(),
    )
}

/// Every file, directory and symlink below `root`: relative path → description.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = path.symlink_metadata().unwrap();
            let relative = path.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            let description = if meta.file_type().is_symlink() {
                format!("symlink → {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                pending.push(path.clone());
                format!("dir {mode:o}")
            } else {
                format!("file {mode:o} {:?}", std::fs::read(&path).unwrap())
            };
            out.insert(relative, description);
        }
    }
    out
}

/// Lists a cpio archive with the real `cpio`.
fn cpio_list(archive: &Path, verbose: bool) -> Vec<String> {
    let mut command = Command::new("cpio");
    command
        .arg(if verbose { "-itv" } else { "-it" })
        .arg("--quiet")
        .stdin(std::fs::File::open(archive).unwrap());
    run_ok(&mut command).lines().map(str::to_owned).collect()
}

/// Extracts the regular files and directories of a cpio archive with the real `cpio`.
fn cpio_extract(archive: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    run_ok(
        Command::new("cpio")
            .args([
                "-id",
                "--quiet",
                "--no-absolute-filenames",
                "init",
                "etc/*",
                "lib/*",
            ])
            .current_dir(into)
            .stdin(std::fs::File::open(archive).unwrap()),
    );
}

fn file_says(path: &Path) -> String {
    run_ok(Command::new("file").arg("--brief").arg(path))
}

#[test]
fn deb_extraction_matches_dpkg_deb_for_every_data_compression() {
    if !have("dpkg-deb", "dpkg") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    std::fs::create_dir_all(source.join("DEBIAN")).unwrap();
    std::fs::write(
        source.join("DEBIAN/control"),
        "Package: banger-test-kernel\nVersion: 1.2-3\nArchitecture: amd64\nMaintainer: banger tests <tests@invalid>\nDepends: linux-image-9.9.9-cloud-amd64 (= 1.2-3)\nDescription: test\n a test package\n",
    )
    .unwrap();
    let modules = source.join("lib/modules/9.9.9-cloud-amd64/kernel/drivers");
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::create_dir_all(source.join("boot")).unwrap();
    std::fs::write(
        source.join("boot/vmlinuz-9.9.9-cloud-amd64"),
        vec![7u8; 300_000],
    )
    .unwrap();
    std::fs::write(modules.join("a.ko"), b"module a").unwrap();
    std::fs::write(modules.join("odd-size.ko"), b"odd").unwrap();
    std::fs::set_permissions(modules.join("a.ko"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("drivers/a.ko", modules.join("../link.ko")).unwrap();
    std::fs::create_dir_all(source.join("usr/share/doc/x")).unwrap();
    std::fs::write(source.join("usr/share/doc/x/copyright"), b"c").unwrap();

    for compression in ["xz", "zstd", "gzip", "none"] {
        let deb = dir.path().join(format!("p-{compression}.deb"));
        run_ok(
            Command::new("dpkg-deb")
                .args(["--root-owner-group", &format!("-Z{compression}"), "--build"])
                .arg(&source)
                .arg(&deb),
        );
        let package = DebPackage::open(&deb).unwrap();
        let control = package.control().unwrap();
        assert_eq!(control.get("Package"), Some("banger-test-kernel"));
        assert_eq!(
            control.relations("Depends")[0][0].version,
            Some(("=".to_owned(), "1.2-3".to_owned()))
        );

        let ours = dir.path().join(format!("ours-{compression}"));
        let summary = package.extract(&ours, &|_| true).unwrap();
        assert_eq!(summary.files, 4, "{compression}");
        assert_eq!(summary.symlinks, 1, "{compression}");
        let theirs = dir.path().join(format!("theirs-{compression}"));
        run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&theirs));
        assert_eq!(tree(&ours), tree(&theirs), "{compression}");

        let selected = dir.path().join(format!("kernel-{compression}"));
        package.extract(&selected, &is_kernel_file).unwrap();
        assert!(!selected.join("usr").exists());
        let files = KernelFiles::locate(&selected).unwrap();
        assert_eq!(files.release, "9.9.9-cloud-amd64");
        assert_eq!(
            files.modules_dir,
            selected.join("lib/modules/9.9.9-cloud-amd64")
        );
    }
}

/// A module tree with `modules.dep`, modules compressed by the real `xz` and `zstd`.
#[test]
fn compressed_modules_are_resolved_and_packed_plain() {
    if !have("xz", "xz-utils") || !have("zstd", "zstd") || !have("cpio", "cpio") {
        return;
    }
    if !have("file", "file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lib/modules/6.12.0-9-cloud-amd64");
    let drivers = root.join("kernel/drivers");
    std::fs::create_dir_all(&drivers).unwrap();
    let plain: BTreeMap<&str, Vec<u8>> = [
        ("virtio_ring", b"ring ".repeat(1000)),
        ("virtio", b"virtio ".repeat(1000)),
        ("virtio_blk", b"blk ".repeat(1000)),
    ]
    .into_iter()
    .collect();
    for (name, bytes) in &plain {
        std::fs::write(drivers.join(format!("{name}.ko")), bytes).unwrap();
    }
    run_ok(
        Command::new("xz")
            .args(["--check=crc32"])
            .arg(drivers.join("virtio_ring.ko")),
    );
    run_ok(
        Command::new("zstd")
            .args(["-q", "--rm"])
            .arg(drivers.join("virtio.ko")),
    );
    std::fs::write(
        root.join("modules.dep"),
        "kernel/drivers/virtio_blk.ko: kernel/drivers/virtio.ko.zst kernel/drivers/virtio_ring.ko.xz\n\
         kernel/drivers/virtio.ko.zst: kernel/drivers/virtio_ring.ko.xz\n\
         kernel/drivers/virtio_ring.ko.xz:\n",
    )
    .unwrap();
    std::fs::write(
        root.join("modules.builtin"),
        "kernel/drivers/virtio_mmio.ko\n",
    )
    .unwrap();

    let closure = ModuleTree::open(&root)
        .unwrap()
        .resolve(&["virtio_blk", "virtio_mmio"])
        .unwrap();
    assert_eq!(closure.names(), ["virtio_ring", "virtio", "virtio_blk"]);
    assert_eq!(closure.builtin, ["virtio_mmio"]);
    assert_eq!(closure.load_order[0].compression, Compression::Xz);
    assert_eq!(closure.load_order[1].compression, Compression::Zstd);

    let init = b"#!/bin/sh\necho hello from init\n";
    let contents = InitramfsContents {
        init: InitBinary::Bytes(init),
        kernel_release: "6.12.0-9-cloud-amd64",
        modules: &closure.load_order,
    };
    let cpio_path = dir.path().join("initramfs.cpio");
    let summary = build_initramfs(&contents, InitramfsCompression::None, &cpio_path).unwrap();
    assert_eq!(cpio_list(&cpio_path, false), summary.entries);
    assert_eq!(
        file_says(&cpio_path).trim(),
        "ASCII cpio archive (SVR4 with no CRC)"
    );
    let out = dir.path().join("out");
    cpio_extract(&cpio_path, &out);
    assert_eq!(std::fs::read(out.join("init")).unwrap(), init);
    // The load list is relative to /lib/modules/<release>/, where the agent's init looks.
    let prefix = "lib/modules/6.12.0-9-cloud-amd64/kernel/drivers";
    assert_eq!(
        std::fs::read_to_string(out.join(MODULES_LOAD_PATH)).unwrap(),
        "kernel/drivers/virtio_ring.ko\nkernel/drivers/virtio.ko\nkernel/drivers/virtio_blk.ko\n"
    );
    for (name, bytes) in &plain {
        assert_eq!(
            &std::fs::read(out.join(format!("{prefix}/{name}.ko"))).unwrap(),
            bytes,
            "{name}"
        );
    }
    let listing = cpio_list(&cpio_path, true).join("\n");
    assert!(
        listing.lines().any(|line| line.starts_with("crw-------")
            && line.contains(" 5,")
            && line.ends_with(" dev/console")),
        "{listing}"
    );

    let gzip_path = dir.path().join("initrd.img");
    build_initramfs(&contents, InitramfsCompression::Gzip, &gzip_path).unwrap();
    assert!(file_says(&gzip_path).starts_with("gzip compressed data"));
    let unzipped = run(Command::new("gzip").arg("-dc").arg(&gzip_path))
        .unwrap()
        .stdout;
    assert!(unzipped == std::fs::read(&cpio_path).unwrap());
}

/// Where the slow test keeps the downloaded package between runs.
fn package_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("test-cache/kernel")
}

/// The real kernel package: from the cache, or downloaded with mmdebstrap into it.
fn debian_cloud_kernel() -> (String, PathBuf) {
    let cache = package_cache();
    if let Ok(entries) = std::fs::read_dir(&cache) {
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("linux-image-") && name.ends_with(".deb") {
                let package = name.split('_').next().unwrap().to_owned();
                eprintln!("using the cached {}", path.display());
                return (package, path);
            }
        }
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fetched = runtime
        .block_on(banger::steps::kernel_package::download_kernel_package(
            "bookworm",
            "linux-image-cloud-amd64",
            work.path(),
            &cache,
            &tokio_util::sync::CancellationToken::new(),
        ))
        .unwrap();
    eprintln!("fetched {:?}", fetched.chain);
    assert_eq!(fetched.requested, "linux-image-cloud-amd64");
    assert_eq!(
        fetched.chain.len(),
        2,
        "the metapackage, then the kernel: {:?}",
        fetched.chain
    );
    assert!(fetched.chain[0].starts_with("linux-image-cloud-amd64="));
    assert_eq!(
        fetched.chain[1],
        format!("{}={}", fetched.name, fetched.version)
    );
    assert!(fetched.path.starts_with(&cache));
    let leftovers: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temp directories left: {leftovers:?}");
    (fetched.name, fetched.path)
}

/// Every module's dependencies come before it (or are built in).
fn assert_dependencies_first(closure: &ModuleClosure) {
    for (index, module) in closure.load_order.iter().enumerate() {
        for dependency in &module.depends {
            let position = closure
                .load_order
                .iter()
                .position(|other| &other.name == dependency);
            assert!(
                position.is_some_and(|at| at < index) || closure.builtin.contains(dependency),
                "{} needs {dependency}, which is not loaded before it: {:?}",
                module.name,
                closure.names()
            );
        }
    }
}

#[test]
fn slow_debian_cloud_kernel_becomes_a_pvh_vmlinux_modules_and_an_initramfs() {
    if !have("mmdebstrap", "mmdebstrap") || !have("cpio", "cpio") || !have("file", "file") {
        return;
    }
    if !have("readelf", "binutils") || !have("xz", "xz-utils") || !have("zstd", "zstd") {
        return;
    }
    let (package, deb_path) = debian_cloud_kernel();
    let release = package
        .strip_prefix("linux-image-")
        .expect("a linux-image package")
        .to_owned();
    let dir = tempfile::tempdir().unwrap();

    // Extract the kernel's files.
    let deb = DebPackage::open(&deb_path).unwrap();
    assert_eq!(
        deb.control().unwrap().get("Package"),
        Some(package.as_str())
    );
    let root = dir.path().join("package");
    let summary = deb.extract(&root, &is_kernel_file).unwrap();
    eprintln!("extracted {summary:?}");
    let files = KernelFiles::locate(&root).unwrap();
    assert_eq!(files.release, release);

    // The ELF vmlinux, checked by us and by readelf/file.
    let vmlinux_path = dir.path().join("vmlinux");
    let info = vmlinux::convert(&files.image, &vmlinux_path).unwrap();
    let image_size = std::fs::metadata(&files.image).unwrap().len();
    eprintln!(
        "{} ({image_size} bytes) → vmlinux {} bytes, {:?}, PVH entry {:#x}\n{}",
        files.image.display(),
        info.size,
        info.format,
        info.pvh_entry,
        info.banner
    );
    assert_eq!(
        info.release, release,
        "the banner's release is the package's"
    );
    let ImageFormat::BzImage { header_version, .. } = &info.format else {
        panic!("Debian ships a bzImage: {:?}", info.format);
    };
    assert!(header_version.as_deref().unwrap().starts_with(&release));
    let elf = std::fs::read(&vmlinux_path).unwrap();
    assert_eq!(elf.len() as u64, info.size);
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELF64");
    assert_eq!(u16::from_le_bytes([elf[0x12], elf[0x13]]), 62, "x86_64");
    assert!(file_says(&vmlinux_path).starts_with("ELF 64-bit LSB executable, x86-64"));
    let notes = run_ok(Command::new("readelf").arg("-n").arg(&vmlinux_path));
    let pvh_line = notes
        .lines()
        .position(|line| line.trim_start().starts_with("Xen") && line.contains("0x00000012"))
        .unwrap_or_else(|| panic!("readelf shows no Xen note 0x12:\n{notes}"));
    let desc: Vec<u8> = notes
        .lines()
        .nth(pvh_line + 1)
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|byte| u8::from_str_radix(byte, 16).unwrap())
        .collect();
    assert_eq!(u64::from_le_bytes(desc.try_into().unwrap()), info.pvh_entry);
    // An ELF vmlinux is accepted as it is.
    let again = Vmlinux::from_file(&vmlinux_path).unwrap();
    assert_eq!(again.info.format, ImageFormat::Elf);
    assert_eq!(again.info.pvh_entry, info.pvh_entry);

    // The same ELF re-wrapped in the payload formats other kernels use, compressed by the
    // real tools the kernel build uses (xz with the x86 BCJ filter and CRC32, as
    // scripts/xz_wrap.sh does; fast presets to keep this test short).
    let bz = std::fs::read(&files.image).unwrap();
    for (tool, args, expected) in [
        (
            "xz",
            &["--check=crc32", "--x86", "--lzma2=preset=0", "-c"][..],
            Compression::Xz,
        ),
        ("xz", &["--format=lzma", "-0", "-c"][..], Compression::Lzma),
        ("zstd", &["-1", "-q", "-c"][..], Compression::Zstd),
        ("gzip", &["-1", "-n", "-c"][..], Compression::Gzip),
    ] {
        let compressed = run(Command::new(tool).args(args).arg(&vmlinux_path))
            .unwrap()
            .stdout;
        let image = rewrap_bzimage(&bz, &compressed, expected != Compression::Gzip, elf.len());
        let vmlinux = Vmlinux::from_image(image, Path::new("rewrapped")).unwrap();
        assert!(vmlinux.elf == elf, "{tool} {args:?}");
        assert!(
            matches!(&vmlinux.info.format, ImageFormat::BzImage { compression, .. } if *compression == expected),
            "{:?}",
            vmlinux.info.format
        );
    }

    // The module closure of banger's initramfs list.
    let tree = ModuleTree::open(&files.modules_dir).unwrap();
    let closure = tree.resolve(INITRAMFS_MODULES).unwrap();
    eprintln!(
        "{} module files; closure via {:?}, built in: {:?}",
        tree.files().len(),
        closure.source,
        closure.builtin
    );
    for module in &closure.load_order {
        eprintln!(
            "  {} ({}, {} bytes) needs {:?}",
            module.load_path.display(),
            module.compression,
            std::fs::metadata(&module.source).unwrap().len(),
            module.depends
        );
    }
    for wanted in INITRAMFS_MODULES {
        assert!(
            closure.names().contains(wanted) || closure.builtin.iter().any(|b| b == wanted),
            "{wanted} is neither loaded nor built in: {:?}",
            closure.names()
        );
    }
    assert_dependencies_first(&closure);
    for dependency in [
        "virtio_ring",
        "virtio",
        "failover",
        "net_failover",
        "vmw_vsock_virtio_transport_common",
    ] {
        assert!(
            closure.names().contains(&dependency),
            "{dependency} missing: {:?}",
            closure.names()
        );
    }

    // The initramfs, with banger's agent as /init, read back by cpio and file.
    let contents = InitramfsContents {
        init: InitBinary::Bytes(banger::assets::AGENT_BINARY),
        kernel_release: &release,
        modules: &closure.load_order,
    };
    let cpio_path = dir.path().join("initramfs.cpio");
    let summary = build_initramfs(&contents, InitramfsCompression::None, &cpio_path).unwrap();
    let gzip_path = dir.path().join("initrd.img");
    build_initramfs(&contents, InitramfsCompression::Gzip, &gzip_path).unwrap();
    eprintln!(
        "initramfs: {} entries, {} bytes, {} bytes gzipped",
        summary.entries.len(),
        summary.uncompressed_size,
        std::fs::metadata(&gzip_path).unwrap().len()
    );
    let listed = cpio_list(&cpio_path, false);
    assert_eq!(listed, summary.entries);
    for expected in [
        "init",
        "dev/console",
        "proc",
        "sys",
        "newroot",
        MODULES_LOAD_PATH,
    ] {
        assert!(
            listed.iter().any(|name| name == expected),
            "{expected} not in {listed:?}"
        );
    }
    assert!(file_says(&gzip_path).starts_with("gzip compressed data"));
    let out = dir.path().join("unpacked");
    cpio_extract(&cpio_path, &out);
    assert_eq!(
        std::fs::read(out.join("init")).unwrap(),
        banger::assets::AGENT_BINARY
    );
    let load_list = std::fs::read_to_string(out.join(MODULES_LOAD_PATH)).unwrap();
    let lines: Vec<&str> = load_list.lines().collect();
    assert_eq!(lines.len(), closure.load_order.len());
    // Each line is relative to /lib/modules/<release>/, where the agent's init looks.
    let modules_dir = out.join(format!("lib/modules/{release}"));
    for (line, module) in lines.iter().zip(&closure.load_order) {
        assert_eq!(*line, module.load_path.display().to_string());
        let packed = std::fs::read(modules_dir.join(line)).unwrap();
        assert_eq!(packed, module.read_plain().unwrap(), "{line}");
        assert!(
            file_says(&modules_dir.join(line)).starts_with("ELF 64-bit LSB relocatable, x86-64")
        );
    }
}

/// `bz` with its payload replaced by `compressed` (plus the size trailer the kernel build
/// appends for all but gzip) and the header's payload length patched.
fn rewrap_bzimage(bz: &[u8], compressed: &[u8], size_trailer: bool, decoded_len: usize) -> Vec<u8> {
    let setup_sectors = match bz[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = u32::from_le_bytes(bz[0x248..0x24c].try_into().unwrap()) as usize;
    let start = (setup_sectors + 1) * 512 + offset;
    let mut payload = compressed.to_vec();
    if size_trailer {
        payload.extend((decoded_len as u32).to_le_bytes());
    }
    let mut image = bz[..start].to_vec();
    image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    image.extend(payload);
    image
}
