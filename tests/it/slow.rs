//! The slow end-to-end group: real Debian root filesystems from distribution packages, the
//! default kernel from Debian's package, and real boots under QEMU. Each test takes tens of
//! seconds to minutes; CI runs them all.
//!
//! Building the default image (mmdebstrap) and kernel takes minutes, so the tests share one
//! HOME where both are built once per test process: [`debian_world`].

use std::path::{Path, PathBuf};

use banger::vm::boot::{AgentTransport, BootSpec};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::registry::{Pusher, RealRegistry, push_layers};
use crate::support::{
    Output, TestContext, assert_fsck_clean, capable, debugfs, field, find_program, have_e2fsprogs,
};

/// A HOME holding the default kernel and the default image, built by the first test that
/// asks; `kernel_pull` is that first `--json kernel pull` run.
pub(crate) struct DebianWorld {
    pub(crate) context: TestContext,
    pub(crate) kernel_pull: Output,
}

/// Where the shared world lives, for removal at exit (statics are never dropped).
static WORLD_ROOT: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn remove_world() {
    if let Ok(root) = WORLD_ROOT.lock()
        && let Some(root) = root.as_ref()
    {
        crate::support::stop_daemon_and_vms(&root.join("home"), &root.join("run"));
        let _ = std::fs::remove_dir_all(root);
    }
}

/// Tests that kill or restart the shared world's daemon hold this for writing; every other
/// user of the world holds it for reading, so no test loses its daemon mid-request.
static WORLD_DAEMON: RwLock<()> = RwLock::new(());

/// The shared world, borrowed for one test: while it lives, nobody kills the world's daemon.
pub(crate) struct WorldGuard {
    world: &'static DebianWorld,
    _shared: RwLockReadGuard<'static, ()>,
}

impl std::ops::Deref for WorldGuard {
    type Target = DebianWorld;
    fn deref(&self) -> &DebianWorld {
        self.world
    }
}

/// The shared world for a test that kills its daemon: waits until no other test uses it.
pub(crate) struct ExclusiveWorld {
    world: &'static DebianWorld,
    _alone: RwLockWriteGuard<'static, ()>,
}

impl std::ops::Deref for ExclusiveWorld {
    type Target = DebianWorld;
    fn deref(&self) -> &DebianWorld {
        self.world
    }
}

/// The shared world, or `None` (skip) when the host cannot build it.
pub(crate) fn debian_world() -> Option<WorldGuard> {
    let world = build_debian_world()?;
    let shared = WORLD_DAEMON
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Some(WorldGuard {
        world,
        _shared: shared,
    })
}

/// [`debian_world`] for a test that kills the daemon (see [`WORLD_DAEMON`]).
pub(crate) fn debian_world_alone() -> Option<ExclusiveWorld> {
    let world = build_debian_world()?;
    let alone = WORLD_DAEMON
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Some(ExclusiveWorld {
        world,
        _alone: alone,
    })
}

fn build_debian_world() -> Option<&'static DebianWorld> {
    if !capable(
        "mmdebstrap (Debian package `mmdebstrap`)",
        find_program("mmdebstrap").is_some(),
    ) || !capable("e2fsprogs", have_e2fsprogs())
        || !capable(
            "apt-get (the default kernel comes from Debian's package)",
            find_program("apt-get").is_some(),
        )
    {
        return None;
    }
    static WORLD: OnceLock<DebianWorld> = OnceLock::new();
    Some(WORLD.get_or_init(|| {
        let context = TestContext::new();
        *WORLD_ROOT.lock().unwrap() = Some(context.root.path().to_owned());
        // The test harness ends with `exit`, which runs atexit handlers but drops no statics.
        // SAFETY: registers a plain function with no captured state; it runs at exit.
        #[allow(unsafe_code)]
        unsafe {
            libc::atexit(remove_world)
        };
        let kernel_pull = context.run(&["--json", "kernel", "pull", "debian-cloud-amd64"]);
        assert_eq!(kernel_pull.code, Some(0), "{kernel_pull}");
        // The catalog's default image, built from packages: no hosted URL needed.
        let image_pull = context.run(&["image", "pull", "debian-bookworm"]);
        assert_eq!(image_pull.code, Some(0), "{image_pull}");
        DebianWorld {
            context,
            kernel_pull,
        }
    }))
}

/// A fresh HOME whose store is a copy of the world's (its image and kernel steps are hits):
/// for tests that change the HOME's configuration.
pub(crate) fn home_like_the_world(world: &DebianWorld) -> TestContext {
    let context = TestContext::new();
    let store = context.store_dir();
    std::fs::create_dir_all(&store).unwrap();
    // Other tests run steps in the world's store meanwhile: their scratch directories and
    // cacache's temporary files come and go under `cp`, so only the settled parts are copied.
    for entry in std::fs::read_dir(world.context.store_dir()).unwrap() {
        let entry = entry.unwrap();
        if matches!(entry.file_name().to_str(), Some("scratch" | "tmp")) {
            continue;
        }
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(entry.path())
            .arg(&store)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cp -a of {} failed",
            entry.path().display()
        );
    }
    context
}

pub(crate) fn records(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn slow_debian_recipe_builds_and_its_tar_pulls_back_from_a_registry() {
    let Some(world) = debian_world() else {
        return;
    };
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    let context = &world.context;
    let show = context.run(&["--json", "image", "show", "debian-bookworm"]);
    let record = &records(&show.stdout)[0]["data"];
    let store = banger::store::Store::open(context.store_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rootfs.ext4");
    materialize_rootfs(context, record, &image);
    assert_fsck_clean(&image);
    for path in [
        "/usr/sbin/sshd",
        "/usr/bin/ip",
        "/lib/systemd/systemd",
        "/etc/ssh/sshd_config.d/00-banger.conf",
        "/etc/systemd/system/sysinit.target.wants/banger-agent.service",
    ] {
        assert!(
            !debugfs(&image, &format!("stat {path}")).is_empty(),
            "{path} missing from the recipe image"
        );
    }
    assert_eq!(
        field(&debugfs(&image, "stat /usr/bin/passwd"), "Mode:"),
        "04755",
        "setuid lost"
    );

    // The recipe's tar, pushed to the registry as a one-layer image and pulled back.
    let (tar_record, _) = store
        .records()
        .unwrap()
        .into_iter()
        .find(|(record, _)| record.kind == "recipe.mmdebstrap")
        .expect("the recipe step is stored");
    let tar_path = dir.path().join("rootfs.tar");
    store
        .materialize(&tar_record.outputs["rootfs.tar"], &tar_path)
        .unwrap();
    let tar = std::fs::read(&tar_path).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pusher = Pusher::new(&registry.address, None).await;
        push_layers(
            &pusher,
            "debian/recipe",
            Some("bookworm"),
            "amd64",
            false,
            vec![(
                banger::oci::media_types::OCI_LAYER_TAR.to_owned(),
                tar.clone(),
                tar,
            )],
        )
        .await;
    });
    let reference = format!("{}/debian/recipe:bookworm", registry.address);
    let pulled = context.run(&["image", "pull", &reference, "--name", "from-registry"]);
    assert_eq!(pulled.code, Some(0), "{pulled}\n{}", registry.log());
    let show = context.run(&["--json", "image", "show", "from-registry"]);
    let record = &records(&show.stdout)[0]["data"];
    let pulled_image = dir.path().join("pulled.ext4");
    materialize_rootfs(context, record, &pulled_image);
    assert_fsck_clean(&pulled_image);
    assert!(!debugfs(&pulled_image, "stat /usr/sbin/sshd").is_empty());
}

#[test]
fn slow_default_kernel_builds_from_the_debian_package_once_and_imports_back() {
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let pull = &world.kernel_pull;
    let events = records(&pull.stdout);
    let ran: Vec<&str> = events
        .iter()
        .filter(|event| event["type"] == "step_finished")
        .map(|event| event["data"]["step"].as_str().unwrap())
        .collect();
    assert_eq!(ran.len(), 4, "{ran:?}");
    let kernel = events
        .iter()
        .find(|event| event["type"] == "kernel")
        .unwrap()["data"]
        .clone();
    let release = kernel["release"].as_str().unwrap().to_owned();
    assert!(release.ends_with("-cloud-amd64"), "{release}");

    // Memoized: the second pull runs nothing.
    let again = context.run(&["--json", "kernel", "pull", "debian-cloud-amd64"]);
    let finished = records(&again.stdout)
        .into_iter()
        .find(|event| event["type"] == "run_finished")
        .unwrap();
    assert_eq!(finished["data"]["ran"], 0, "{again}");

    // The staged files: an ELF vmlinux with the PVH note, an initramfs listing the modules.
    let store = banger::store::Store::open(context.store_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let materialize = |name: &str, file: &serde_json::Value| {
        let path = dir.path().join(name);
        store
            .materialize(
                &banger::store::OutputRef {
                    integrity: file["integrity"].as_str().unwrap().to_owned(),
                    size: file["bytes"].as_u64().unwrap(),
                },
                &path,
            )
            .unwrap();
        path
    };
    let vmlinux = materialize("vmlinux", &kernel["vmlinux"]);
    let info = banger::kernel::vmlinux::Vmlinux::from_file(&vmlinux)
        .unwrap()
        .info;
    assert_eq!(info.release, release);
    let initrd = materialize("initrd", &kernel["initrd"]);
    let listing = crate::support::run_ok(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("zcat {} | cpio -t 2>/dev/null", initrd.display())),
    );
    for module in banger::plan::lower::INITRAMFS_MODULES {
        let file = format!("/{}.ko", module);
        assert!(
            listing.lines().any(|line| line.ends_with(&file)),
            "{module} missing from the initramfs:\n{listing}"
        );
    }
    assert!(listing.lines().any(|line| line == "init"), "{listing}");

    // The same files imported under another name give a kernel with the same vmlinux.
    let import_dir = dir.path().join("import");
    std::fs::create_dir(&import_dir).unwrap();
    std::fs::copy(&vmlinux, import_dir.join("vmlinux")).unwrap();
    std::fs::copy(&initrd, import_dir.join("initrd")).unwrap();
    let imported = context.run(&[
        "--json",
        "kernel",
        "import",
        "mine",
        "--from",
        import_dir.to_str().unwrap(),
    ]);
    assert_eq!(imported.code, Some(0), "{imported}");
    let mine = records(&imported.stdout)
        .into_iter()
        .find(|event| event["type"] == "kernel")
        .unwrap();
    assert_eq!(mine["data"]["vmlinux"], kernel["vmlinux"]);
    assert_eq!(mine["data"]["release"], kernel["release"]);
    let list = context.run(&["kernel", "ls"]);
    assert!(
        list.stdout.contains("mine") && list.stdout.contains("debian-cloud-amd64"),
        "{list}"
    );
}

/// The console log `banger kernel test` keeps for `kernel`, for failure messages.
fn console_log(context: &TestContext, kernel: &str) -> String {
    let path = context.home().join(format!(
        ".local/state/banger/logs/kernel-test-{kernel}.console.log"
    ));
    match std::fs::read_to_string(&path) {
        Ok(text) => format!("--- serial console ({}) ---\n{text}", path.display()),
        Err(error) => format!("(no console log at {}: {error})", path.display()),
    }
}

/// Runs `banger --json kernel test` and returns its `kernel_test` record, dumping the whole
/// serial console if it did not pass.
fn kernel_test(context: &TestContext, image: &str, transport: &str) -> serde_json::Value {
    let output = context.run(&[
        "--json",
        "kernel",
        "test",
        "debian-cloud-amd64",
        "--image",
        image,
        "--transport",
        transport,
        "--timeout",
        "300",
    ]);
    let console = || console_log(context, "debian-cloud-amd64");
    assert_eq!(output.code, Some(0), "{output}\n{}", console());
    let record = records(&output.stdout)
        .into_iter()
        .find(|record| record["type"] == "kernel_test")
        .unwrap_or_else(|| panic!("no kernel_test record: {output}\n{}", console()));
    eprintln!(
        "kernel test on {image} over {transport}: {}",
        record["data"]
    );
    record["data"].clone()
}

/// A root filesystem tar with nothing but a static busybox: no libc, no init system, no
/// package manager banger knows.
fn busybox_rootfs_tar(busybox: &Path) -> Vec<u8> {
    let applets = crate::support::run_ok(std::process::Command::new(busybox).arg("--list-full"));
    let mut builder = tar::Builder::new(Vec::new());
    let header = |path: &str, kind: tar::EntryType, mode: u32, size: u64| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_path(path).unwrap();
        header
    };
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys",
    ] {
        let mut entry = header(dir, tar::EntryType::Directory, 0o755, 0);
        entry.set_cksum();
        builder.append(&entry, std::io::empty()).unwrap();
    }
    for dir in ["tmp", "root"] {
        let mode = if dir == "tmp" { 0o1777 } else { 0o700 };
        let mut entry = header(dir, tar::EntryType::Directory, mode, 0);
        entry.set_cksum();
        builder.append(&entry, std::io::empty()).unwrap();
    }
    let binary = std::fs::read(busybox).unwrap();
    let mut entry = header(
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        binary.len() as u64,
    );
    entry.set_cksum();
    builder.append(&entry, binary.as_slice()).unwrap();
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
    {
        if applet == "bin/busybox" {
            continue;
        }
        let mut entry = header(applet, tar::EntryType::Symlink, 0o777, 0);
        entry.set_link_name("/bin/busybox").unwrap();
        entry.set_cksum();
        builder.append(&entry, std::io::empty()).unwrap();
    }
    let os_release = b"ID=busybox\nNAME=\"busybox only\"\n";
    let mut entry = header(
        "etc/os-release",
        tar::EntryType::Regular,
        0o644,
        os_release.len() as u64,
    );
    entry.set_cksum();
    builder.append(&entry, &os_release[..]).unwrap();
    builder.into_inner().unwrap()
}

#[test]
fn slow_the_default_kernel_boots_debian_and_busybox_and_the_agent_answers() {
    if !capable(
        "qemu-system-x86_64 (Debian package `qemu-system-x86`)",
        find_program("qemu-system-x86_64").is_some(),
    ) || !capable(
        "vhost-device-vsock (`cargo install --locked vhost-device-vsock`)",
        banger::vm::vsock::find_binary().is_some(),
    ) || !capable(
        "a static busybox (Debian package `busybox-static`)",
        Path::new("/bin/busybox").exists(),
    ) {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let kernel = records(&world.kernel_pull.stdout)
        .into_iter()
        .find(|event| event["type"] == "kernel")
        .unwrap();
    let release = kernel["data"]["release"].as_str().unwrap().to_owned();

    // Debian with systemd: the initramfs hands over to systemd, which starts the agent.
    let debian = kernel_test(context, "debian-bookworm", "vsock");
    assert_eq!(debian["passed"], true, "{debian}");
    assert_eq!(debian["uname_release"], release.as_str());
    assert_eq!(debian["expected_release"], release.as_str());
    assert_eq!(debian["exit_seven"], "exit 7");
    assert_eq!(debian["transport"], "vsock");
    assert_eq!(
        debian["agent_pid1"], false,
        "systemd should be PID 1: {debian}"
    );

    // busybox only: no libc for the agent to lean on, no init that would start it, so the
    // agent stays PID 1; reached over vsock and over the virtio-serial fallback.
    let tar = busybox_rootfs_tar(Path::new("/bin/busybox"));
    let dir = tempfile::tempdir().unwrap();
    let tar_path = dir.path().join("busybox.tar");
    std::fs::write(&tar_path, &tar).unwrap();
    let imported = context.run(&[
        "image",
        "import-tar",
        tar_path.to_str().unwrap(),
        "--name",
        "busybox",
    ]);
    assert_eq!(imported.code, Some(0), "{imported}");
    let show = context.run(&["--json", "image", "show", "busybox"]);
    let record = &records(&show.stdout)[0]["data"];
    let image = dir.path().join("busybox.ext4");
    materialize_rootfs(context, record, &image);
    for libc_dir in ["/lib", "/lib64", "/usr/lib", "/lib/x86_64-linux-gnu"] {
        let ls = debugfs(&image, &format!("ls -l {libc_dir}"));
        assert!(
            !ls.contains("libc.so") && !ls.contains("ld-linux") && !ls.contains("ld-musl"),
            "the busybox image has a libc in {libc_dir}:\n{ls}"
        );
    }
    assert!(
        !debugfs(&image, "stat /usr/local/bin/banger-agent").is_empty(),
        "the agent was not injected"
    );
    for transport in ["vsock", "serial"] {
        let busybox = kernel_test(context, "busybox", transport);
        assert_eq!(busybox["passed"], true, "{busybox}");
        assert_eq!(busybox["uname_release"], release.as_str());
        assert_eq!(busybox["exit_seven"], "exit 7");
        assert_eq!(busybox["agent_pid1"], true, "{busybox}");
        let expected = if transport == "serial" {
            "virtio-serial"
        } else {
            "vsock"
        };
        assert_eq!(busybox["transport"], expected);
    }
}

/// Hard-links an image's `rootfs.ext4` (its `--json` record: `rootfs`, `bytes`) to `to`.
fn materialize_rootfs(context: &TestContext, image: &serde_json::Value, to: &Path) {
    materialize_record(
        context,
        &serde_json::json!({"integrity": image["rootfs"], "bytes": image["bytes"]}),
        to,
    );
}

/// Hard-links a stored file (`{integrity, bytes}` as the `--json` records show it) to `to`.
fn materialize_record(context: &TestContext, file: &serde_json::Value, to: &Path) {
    let store = banger::store::Store::open(context.store_dir()).unwrap();
    store
        .materialize(
            &banger::store::OutputRef {
                integrity: file["integrity"].as_str().unwrap().to_owned(),
                size: file["bytes"].as_u64().unwrap(),
            },
            to,
        )
        .unwrap();
}

/// A throwaway boot of the world's default kernel on `image` (its `--json` record): kernel,
/// initrd and image hard-linked into `dir`, the VM's files in `dir/vm`, serial transport, no
/// disks of its own and no network (tests set those).
fn boot_spec(world: &DebianWorld, image: &serde_json::Value, dir: &Path) -> BootSpec {
    let context = &world.context;
    let kernel = records(&world.kernel_pull.stdout)
        .into_iter()
        .find(|event| event["type"] == "kernel")
        .unwrap()["data"]
        .clone();
    let rootfs = dir.join("rootfs.ext4");
    materialize_rootfs(context, image, &rootfs);
    let vmlinux = dir.join("vmlinux");
    materialize_record(context, &kernel["vmlinux"], &vmlinux);
    let initrd = dir.join("initrd");
    materialize_record(context, &kernel["initrd"], &initrd);
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    BootSpec {
        qemu_binary: "qemu-system-x86_64".into(),
        accel: banger::vm::accel::choose(&banger::vm::accel::HostFacts::probe()).unwrap(),
        vcpus: 1,
        memory_mib: 1024,
        kernel: vmlinux,
        initrd: Some(initrd),
        rootfs,
        transport: AgentTransport::Serial,
        vsock_daemon: None,
        extra_cmdline: Vec::new(),
        writable: banger::vm::boot::WritableLayer::Memory,
        forwards: Vec::new(),
        network: false,
        tap: None,
        serial_log: vm_dir.join("console.log"),
        dir: vm_dir,
    }
}

pub(crate) fn have_qemu() -> bool {
    capable(
        "qemu-system-x86_64 (Debian package `qemu-system-x86`)",
        find_program("qemu-system-x86_64").is_some(),
    )
}

#[test]
fn slow_a_vms_own_disks_keep_its_changes_across_boots() {
    use banger::guest::{ExecRequest, ExitStatus};
    use banger::vm::boot::{BootedVm, run_captured};
    use banger::vm::storage::VmDisks;

    if !have_qemu()
        || !capable(
            "a static busybox (Debian package `busybox-static`)",
            Path::new("/bin/busybox").exists(),
        )
    {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let dir = tempfile::tempdir().unwrap();
    let tar_path = dir.path().join("busybox.tar");
    std::fs::write(&tar_path, busybox_rootfs_tar(Path::new("/bin/busybox"))).unwrap();
    let imported = context.run(&[
        "--json",
        "image",
        "import-tar",
        tar_path.to_str().unwrap(),
        "--name",
        "busybox-disks",
    ]);
    assert_eq!(imported.code, Some(0), "{imported}");
    let image = records(&imported.stdout)
        .into_iter()
        .find(|record| record["type"] == "image")
        .unwrap()["data"]
        .clone();
    let mut spec = boot_spec(&world, &image, dir.path());
    spec.memory_mib = 512;
    let vm_dir = spec.dir.clone();
    let disks = VmDisks::create(&vm_dir, "disk-test", 1 << 30, 256 << 20).unwrap();
    assert_fsck_clean(&disks.overlay);
    assert_fsck_clean(&disks.work);
    spec.writable = banger::vm::boot::WritableLayer::VmDisks(disks);
    let console = || {
        std::fs::read_to_string(vm_dir.join("console.log"))
            .unwrap_or_else(|error| error.to_string())
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Each boot runs `commands` through the agent, then powers the guest off cleanly.
    let run = |commands: &'static str| -> (ExitStatus, String) {
        runtime.block_on(async {
            let mut vm = BootedVm::start(&spec).await.unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
            let (mut channel, ready) = vm
                .wait_agent(deadline)
                .await
                .unwrap_or_else(|error| panic!("{error}\n{}", console()));
            let (status, stdout, stderr) =
                run_captured(&mut channel, ExecRequest::argv(["sh", "-c", commands]))
                    .await
                    .unwrap();
            let graceful = vm
                .power_off(&mut channel, ready.pid1, std::time::Duration::from_secs(60))
                .await
                .unwrap();
            assert!(
                graceful,
                "the guest did not power off by itself\n{}",
                console()
            );
            (
                status,
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                ),
            )
        })
    };

    // First boot: a change under /root (work disk) and one elsewhere (writable layer).
    let (status, output) =
        run("stat -c %a /root && echo kept > /root/note && echo also > /etc/banger-note && sync");
    assert_eq!(status, ExitStatus::Code(0), "{output}\n{}", console());
    assert_eq!(output.trim(), "700", "a fresh work disk is private to root");

    // Second boot on the same disks: both changes are there; the image was never written.
    let (status, output) = run("cat /root/note /etc/banger-note");
    assert_eq!(status, ExitStatus::Code(0), "{output}\n{}", console());
    assert_eq!(output, "kept\nalso\n");
    assert!(
        debugfs(&dir.path().join("rootfs.ext4"), "stat /etc/banger-note").is_empty(),
        "the shared image was written"
    );
}

#[test]
fn slow_ssh_reaches_a_debian_vm_with_bangers_key_through_a_forwarded_port() {
    use banger::ssh::{SshIdentity, SshTarget, authorize_in_guest, ssh_argv};
    use banger::vm::boot::BootedVm;

    if !have_qemu()
        || !capable(
            "ssh and ssh-keygen (Debian package `openssh-client`)",
            find_program("ssh").is_some() && find_program("ssh-keygen").is_some(),
        )
    {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let kernel = records(&world.kernel_pull.stdout)
        .into_iter()
        .find(|event| event["type"] == "kernel")
        .unwrap()["data"]
        .clone();
    let show = context.run(&["--json", "image", "show", "debian-bookworm"]);
    let image = records(&show.stdout)[0]["data"].clone();
    let dir = tempfile::tempdir().unwrap();
    let identity = SshIdentity::ensure(&dir.path().join("state")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut spec = boot_spec(&world, &image, dir.path());
    spec.forwards = vec![banger::spec::PortForward::loopback_tcp(port, 22)];
    let vm_dir = spec.dir.clone();
    let console = || std::fs::read_to_string(vm_dir.join("console.log")).unwrap_or_default();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut vm = runtime.block_on(BootedVm::start(&spec)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let result = runtime.block_on(async {
        let (mut channel, ready) = vm.wait_agent(deadline).await.map_err(|e| e.to_string())?;
        authorize_in_guest(&mut channel, &identity)
            .await
            .map_err(|e| banger::error::error_chain(&e))?;
        Ok::<_, String>((channel, ready))
    });
    let (mut channel, ready) = match result {
        Ok(connected) => connected,
        Err(error) => {
            let _ = runtime.block_on(vm.stop());
            panic!("{error}\n{}", console());
        }
    };
    let target = SshTarget {
        host: "127.0.0.1".into(),
        port,
        user: "root".into(),
        known_hosts: vm_dir.join("known_hosts"),
    };
    let argv = ssh_argv(&identity, &target, &["uname".into(), "-r".into()], true);
    // sshd comes up some seconds after the agent under TCG: retry until the deadline.
    let mut last = String::new();
    let mut answer = None;
    while std::time::Instant::now() < deadline {
        let output = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        if output.status.success() {
            answer = Some(String::from_utf8_lossy(&output.stdout).trim().to_owned());
            break;
        }
        last = String::from_utf8_lossy(&output.stderr).into_owned();
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // systemd powers the guest off when asked through the agent.
    let graceful = runtime
        .block_on(vm.power_off(
            &mut channel,
            ready.pid1,
            std::time::Duration::from_secs(120),
        ))
        .unwrap();
    let answer = answer.unwrap_or_else(|| panic!("ssh never answered: {last}\n{}", console()));
    assert_eq!(answer, kernel["release"].as_str().unwrap());
    assert!(graceful, "systemd did not power off\n{}", console());
    // The host key was pinned in the VM's own known_hosts, not the user's.
    let pinned = std::fs::read_to_string(vm_dir.join("known_hosts")).unwrap();
    assert!(pinned.contains(&format!("[127.0.0.1]:{port}")), "{pinned}");
}
