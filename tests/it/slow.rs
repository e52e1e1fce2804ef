//! The slow end-to-end group: real Debian root filesystems from distribution packages (and,
//! with the VM issues, real boots). Each test takes tens of seconds; CI runs them all.

use crate::registry::{Pusher, RealRegistry, push_layers};
use crate::support::{
    TestContext, assert_fsck_clean, capable, debugfs, field, find_program, have_e2fsprogs,
};

fn records(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn slow_debian_recipe_builds_and_its_tar_pulls_back_from_a_registry() {
    if !capable(
        "mmdebstrap (Debian package `mmdebstrap`)",
        find_program("mmdebstrap").is_some(),
    ) || !capable("e2fsprogs", have_e2fsprogs())
    {
        return;
    }
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    let context = TestContext::new();

    // The catalog's default image, built from packages: no hosted URL needed.
    let pull = context.run(&["image", "pull", "debian-bookworm"]);
    assert_eq!(pull.code, Some(0), "{pull}");
    let show = context.run(&["--json", "image", "show", "debian-bookworm"]);
    let record = &records(&show.stdout)[0]["data"];
    let store = banger::store::Store::open(context.store_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rootfs.ext4");
    store
        .materialize(
            &banger::store::OutputRef {
                integrity: record["rootfs"].as_str().unwrap().to_owned(),
                size: record["bytes"].as_u64().unwrap(),
            },
            &image,
        )
        .unwrap();
    assert_fsck_clean(&image);
    for path in [
        "/usr/sbin/sshd",
        "/usr/bin/ip",
        "/lib/systemd/systemd",
        "/etc/ssh/sshd_config.d/banger.conf",
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
    store
        .materialize(
            &banger::store::OutputRef {
                integrity: record["rootfs"].as_str().unwrap().to_owned(),
                size: record["bytes"].as_u64().unwrap(),
            },
            &pulled_image,
        )
        .unwrap();
    assert_fsck_clean(&pulled_image);
    assert!(!debugfs(&pulled_image, "stat /usr/sbin/sshd").is_empty());
}

#[test]
fn slow_default_kernel_builds_from_the_debian_package_once_and_imports_back() {
    if !capable(
        "apt-get (the default kernel comes from Debian's package)",
        find_program("apt-get").is_some(),
    ) {
        return;
    }
    let context = TestContext::new();
    let pull = context.run(&["--json", "kernel", "pull", "debian-cloud-amd64"]);
    assert_eq!(pull.code, Some(0), "{pull}");
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
