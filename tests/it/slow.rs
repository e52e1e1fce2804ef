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
