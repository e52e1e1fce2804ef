//! `banger image` and `banger build` end to end: the real binary against Debian's real
//! `docker-registry`, images the test pushes, the resulting ext4 checked with e2fsprogs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::registry::{BasicUser, FakeRegistry, Pusher, RealRegistry, Reply, push_layers};
use crate::rootfs::faithful_layer_blobs;
use crate::support::{TestContext, assert_fsck_clean, capable, debugfs, field, have_e2fsprogs};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Pushes the faithful three-layer image as `REPO:v1` and returns its reference.
fn push_faithful(registry: &RealRegistry, repository: &str, user: Option<&BasicUser>) -> String {
    runtime().block_on(async {
        let pusher = Pusher::new(&registry.address, user).await;
        push_layers(
            &pusher,
            repository,
            Some("v1"),
            "amd64",
            false,
            faithful_layer_blobs(),
        )
        .await;
    });
    format!("{}/{repository}:v1", registry.address)
}

/// The JSON Lines records of a `--json` run.
fn records(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Hard-links the recorded image's rootfs out of the store.
fn rootfs_of(context: &TestContext, name: &str) -> (tempfile::TempDir, PathBuf) {
    let show = context.run(&["--json", "image", "show", name]);
    assert_eq!(show.code, Some(0), "{show}");
    let record = &records(&show.stdout)[0]["data"];
    let store = banger::store::Store::open(context.store_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rootfs.ext4");
    store
        .materialize(
            &banger::store::OutputRef {
                integrity: record["rootfs"].as_str().unwrap().to_owned(),
                size: record["bytes"].as_u64().unwrap(),
            },
            &path,
        )
        .unwrap();
    (dir, path)
}

#[test]
fn pulling_from_a_real_registry_builds_a_faithful_ext4_once() {
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let reference = push_faithful(&registry, "test/faithful", None);
    let context = TestContext::new();

    let pull = context.run(&["image", "pull", &reference, "--name", "faithful"]);
    assert_eq!(pull.code, Some(0), "{pull}\n{}", registry.log());
    assert!(pull.stdout.starts_with("faithful  "), "{pull}");
    assert!(pull.stdout.trim_end().ends_with("pulled"), "{pull}");

    let (_dir, image) = rootfs_of(&context, "faithful");
    assert_fsck_clean(&image);
    assert_eq!(
        field(&debugfs(&image, "stat /usr/bin/sudo"), "Mode:"),
        "04755"
    );
    assert_eq!(debugfs(&image, "cat /etc/hosts"), "new\n");
    assert!(
        debugfs(&image, "stat /etc/motd").is_empty(),
        "whiteout ignored"
    );
    assert_eq!(
        field(
            &debugfs(&image, "stat /usr/local/bin/banger-agent"),
            "Mode:"
        ),
        "0755"
    );

    // Pulling again does no work: nothing runs, the image is up to date.
    let again = context.run(&["--json", "image", "pull", &reference, "--name", "faithful"]);
    assert_eq!(again.code, Some(0), "{again}");
    let events = records(&again.stdout);
    let ran: Vec<&serde_json::Value> = events
        .iter()
        .filter(|event| event["type"] == "step_started" || event["type"] == "step_finished")
        .collect();
    assert!(ran.is_empty(), "a cached pull ran steps: {ran:?}");
    let finished = events
        .iter()
        .find(|event| event["type"] == "run_finished")
        .unwrap();
    assert_eq!(finished["data"]["ran"], 0);

    // The same layers under another tag are shared by digest: only nothing new runs.
    let list = context.run(&["image", "ls"]);
    assert!(list.stdout.contains("faithful"), "{list}");
    let cache = context.run(&["--json", "cache", "ls"]);
    let fetches = records(&cache.stdout)
        .iter()
        .filter(|record| record["data"]["kind"] == "oci.fetch-layer")
        .count();
    assert_eq!(fetches, 3);
}

#[test]
fn registry_failures_are_clear_and_poison_nothing() {
    let user = BasicUser {
        name: "alice".into(),
        password: "secret".into(),
    };
    let Some(registry) = RealRegistry::start(Some(&user)) else {
        return;
    };
    let reference = push_faithful(&registry, "private/image", Some(&user));
    let context = TestContext::new();
    let denied = context.run(&["image", "pull", &reference]);
    assert_eq!(denied.code, Some(1), "{denied}");
    assert!(
        denied.stderr.contains("not authorized") && denied.stderr.contains(&reference),
        "{denied}"
    );

    // The fake registries serve from this runtime's workers, so it lives as long as the test.
    let fakes = runtime();
    let broken = fakes.block_on(FakeRegistry::start(|_path, _count| Reply::status(500)));
    let reference = format!("{}/broken/image:v1", broken.address);
    let failed = context
        .command(&["image", "pull", &reference])
        .env("BANGER_REGISTRY_RETRIES", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("transient")
            && stderr.contains("broken/image")
            && stderr.contains("HTTP 500"),
        "{stderr}"
    );

    // A layer whose bytes do not match its digest, and a truncated one.
    for (what, reply) in [("mismatch", 0usize), ("truncated", 1usize)] {
        let fake = fakes.block_on(crate::oci::FakeImage::start(move |blob, _| {
            let mut bytes = blob.to_vec();
            if reply == 0 {
                bytes[100] ^= 0xff;
            } else {
                bytes.truncate(bytes.len() / 2);
            }
            Reply::ok("application/octet-stream", bytes)
        }));
        let reference = format!("{}/x:v1", fake.server.address);
        let failed = context
            .command(&["image", "pull", &reference])
            .env("BANGER_REGISTRY_RETRIES", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert_ne!(failed.status.code(), Some(0), "{what}: {stderr}");
        assert!(stderr.contains(&fake.layer.digest), "{what}: {stderr}");
    }

    // Nothing was recorded by any failure, and no scratch is left.
    let list = context.run(&["--json", "image", "ls"]);
    assert!(list.stdout.is_empty(), "{list}");
    // The guest agent's layer depends on no download: it may be built beside a failing
    // fetch, and is the only thing stored.
    let cache = context.run(&["--json", "cache", "ls"]);
    assert!(
        records(&cache.stdout)
            .iter()
            .all(|record| record["data"]["kind"] == "agent.layer"),
        "{cache}"
    );
    let scratch: Vec<_> = std::fs::read_dir(context.store_dir().join("scratch"))
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    assert!(scratch.is_empty(), "{scratch:?}");
}

#[test]
fn build_pins_the_bangerfile_and_rebuilds_nothing() {
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let reference = push_faithful(&registry, "test/base", None);
    let context = TestContext::new();
    let project = context.project();
    std::fs::create_dir_all(project.join("conf/nested")).unwrap();
    std::fs::write(project.join("setup.sh"), "#!/bin/sh\necho one\n").unwrap();
    std::fs::write(project.join("conf/app.toml"), "x = 1\n").unwrap();
    std::fs::write(project.join("conf/nested/deep"), "deep\n").unwrap();
    std::os::unix::fs::symlink("app.toml", project.join("conf/link")).unwrap();
    std::fs::write(
        project.join("Bangerfile"),
        format!(
            "[project]\nname = \"demo\"\n\n[image]\nfrom = {{ oci = \"{reference}\" }}\nsize = \"256M\"\n\n\
             [[image.provision]]\ncopy = \"setup.sh\"\nto = \"/usr/local/bin/setup\"\nmode = \"0750\"\n\n\
             [[image.provision]]\ncopy = \"conf\"\nto = \"/etc/app\"\n"
        ),
    )
    .unwrap();

    let graph = context.run(&["graph"]);
    assert!(graph.stdout.contains("(not pinned yet)"), "{graph}");

    let build = context.run(&["build"]);
    assert_eq!(build.code, Some(0), "{build}");
    assert!(build.stderr.contains("pinned"), "{build}");
    assert!(build.stdout.starts_with("demo/sandbox  "), "{build}");
    let lock = std::fs::read_to_string(project.join("Bangerfile.lock")).unwrap();
    assert!(lock.contains("manifest_digest = \"sha256:"), "{lock}");

    let (_dir, image) = rootfs_of(&context, "demo/sandbox");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 256 << 20);
    assert_fsck_clean(&image);
    assert_eq!(
        debugfs(&image, "cat /usr/local/bin/setup"),
        "#!/bin/sh\necho one\n"
    );
    let setup = debugfs(&image, "stat /usr/local/bin/setup");
    assert_eq!(field(&setup, "Mode:"), "0750");
    assert_eq!(field(&setup, "User:"), "0");
    assert_eq!(debugfs(&image, "cat /etc/app/nested/deep"), "deep\n");
    assert!(
        debugfs(&image, "stat /etc/app/link").contains("Fast link dest: \"app.toml\""),
        "{}",
        debugfs(&image, "stat /etc/app/link")
    );

    // Pinned now: graph shows layers by digest, all cached; a rebuild runs nothing.
    let graph = context.run(&["graph"]);
    assert!(graph.stdout.contains("image:sandbox/layer[2]"), "{graph}");
    let again = context.run(&["--json", "build"]);
    assert_eq!(again.code, Some(0), "{again}");
    let events = records(&again.stdout);
    let finished = events
        .iter()
        .find(|event| event["type"] == "run_finished")
        .unwrap();
    assert_eq!(finished["data"]["ran"], 0, "{again}");
    assert!(events.iter().any(|event| event["type"] == "image_built"));

    // Editing a copied file re-runs that step and the image build, nothing else: the layer
    // of the copy after it does not depend on it.
    std::fs::write(project.join("setup.sh"), "#!/bin/sh\necho two\n").unwrap();
    let edited = context.run(&["--json", "build"]);
    assert_eq!(edited.code, Some(0), "{edited}");
    let mut ran: Vec<String> = records(&edited.stdout)
        .iter()
        .filter(|event| event["type"] == "step_finished")
        .map(|event| event["data"]["step"].as_str().unwrap().to_owned())
        .collect();
    ran.sort();
    assert_eq!(ran, ["image:sandbox/provision[0]", "image:sandbox/rootfs"]);
    let (_dir, image) = rootfs_of(&context, "demo/sandbox");
    assert_eq!(
        debugfs(&image, "cat /usr/local/bin/setup"),
        "#!/bin/sh\necho two\n"
    );
    assert_fsck_clean(&image);
}

#[test]
fn import_tar_and_register_and_remove() {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let context = TestContext::new();
    let tar = import_faithful_layer(&context, "mine");
    let (_dir, image) = rootfs_of(&context, "mine");
    assert_fsck_clean(&image);

    // From stdin, the same bytes give the same image without running the build again.
    let piped = context
        .command(&["--json", "image", "import-tar", "-", "--name", "mine-too"])
        .stdin(std::fs::File::open(&tar).unwrap())
        .output()
        .unwrap();
    assert_eq!(piped.status.code(), Some(0));
    let events = records(&String::from_utf8_lossy(&piped.stdout));
    let finished = events
        .iter()
        .find(|event| event["type"] == "run_finished")
        .unwrap();
    assert_eq!(finished["data"]["ran"], 0, "{events:?}");

    let registered = context.run(&[
        "image",
        "register",
        "copy",
        "--rootfs",
        image.to_str().unwrap(),
        "--distro",
        "debian",
    ]);
    assert_eq!(registered.code, Some(0), "{registered}");
    // A registered image keeps its holes in the store: this one ends in 64 MiB of hole, which
    // a plain copy would write out as zeros.
    let holey = context.home().join("holey.ext4");
    std::fs::copy(&image, &holey).unwrap();
    let holey_size = std::fs::metadata(&holey).unwrap().len() + (64 << 20);
    std::fs::File::options()
        .write(true)
        .open(&holey)
        .unwrap()
        .set_len(holey_size)
        .unwrap();
    let registered = context.run(&[
        "image",
        "register",
        "holey",
        "--rootfs",
        holey.to_str().unwrap(),
    ]);
    assert_eq!(registered.code, Some(0), "{registered}");
    let (_holey_dir, stored) = rootfs_of(&context, "holey");
    assert!(
        std::fs::read(&stored).unwrap() == std::fs::read(&holey).unwrap(),
        "the stored image differs from the registered file"
    );
    let allocated = |path: &Path| std::fs::metadata(path).unwrap().blocks() * 512;
    assert!(
        allocated(&stored) <= allocated(&holey) + (1 << 20),
        "registering filled holes: {} bytes allocated for {holey_size}, the file {}",
        allocated(&stored),
        allocated(&holey)
    );
    let not_ext4 = context.run(&[
        "image",
        "register",
        "bad",
        "--rootfs",
        tar.to_str().unwrap(),
    ]);
    assert_eq!(not_ext4.code, Some(1));
    assert!(
        not_ext4.stderr.contains("is not an ext4 image"),
        "{not_ext4}"
    );
    let bad_kernel = context.run(&[
        "image",
        "register",
        "bad",
        "--rootfs",
        image.to_str().unwrap(),
        "--kernel",
        "nope",
    ]);
    assert_eq!(bad_kernel.code, Some(1));
    assert!(
        bad_kernel.stderr.contains("unknown kernel `nope`")
            && bad_kernel
                .stderr
                .contains("banger kernel import nope --from DIR"),
        "{bad_kernel}"
    );

    let removed = context.run(&["image", "rm", "mine", "copy"]);
    assert_eq!(removed.code, Some(0), "{removed}");
    let list = context.run(&["image", "ls"]);
    assert!(
        list.stdout.contains("mine-too") && !list.stdout.contains("copy"),
        "{list}"
    );
    let missing = context.run(&["image", "show", "copy"]);
    assert_eq!(missing.code, Some(1));
    assert!(
        missing.stderr.contains("no image named `copy`"),
        "{missing}"
    );

    // Unpinned images can be collected; the one still recorded cannot.
    let gc = context.run(&["cache", "gc", "--max-size", "0"]);
    assert_eq!(gc.code, Some(0), "{gc}");
    let (_dir, still_there) = rootfs_of(&context, "mine-too");
    assert_fsck_clean(&still_there);
}

#[test]
fn bundles_export_and_pull_back_through_a_catalog() {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let context = TestContext::new();
    import_faithful_layer(&context, "golden");

    let bundle = context.root.path().join("golden.tar.zst");
    // Raw output: the entry's URL holds the temp path, which `run` would redact.
    let export = context
        .command(&[
            "--json",
            "image",
            "export",
            "golden",
            bundle.to_str().unwrap(),
            "--distro",
            "debian",
        ])
        .output()
        .unwrap();
    assert_eq!(export.status.code(), Some(0), "{export:?}");
    let entry = records(&String::from_utf8_lossy(&export.stdout))[0]["data"].clone();
    assert_eq!(
        entry["bundle"]["size"],
        std::fs::metadata(&bundle).unwrap().len()
    );
    assert_eq!(entry["kernel_ref"], "debian-cloud-amd64");

    // A catalog that lists the bundle, configured by path.
    let write_catalog = |name: &str, entry: &serde_json::Value| {
        let mut entry = entry.clone();
        entry["name"] = serde_json::json!(name);
        let catalog = context.root.path().join(format!("{name}.json"));
        std::fs::write(
            &catalog,
            serde_json::json!({"version": 1, "images": [entry]}).to_string(),
        )
        .unwrap();
        std::fs::create_dir_all(context.config_file().parent().unwrap()).unwrap();
        std::fs::write(
            context.config_file(),
            format!("[catalogs]\nimages = \"{}\"\n", catalog.display()),
        )
        .unwrap();
    };
    write_catalog("golden-bundle", &entry);
    let available = context.run(&["image", "list", "--available"]);
    assert!(available.stdout.contains("golden-bundle"), "{available}");
    let pulled = context.run(&["image", "pull", "golden-bundle"]);
    assert_eq!(pulled.code, Some(0), "{pulled}");
    let original = records(&context.run(&["--json", "image", "show", "golden"]).stdout)[0]["data"]
        ["rootfs"]
        .clone();
    let from_bundle = records(
        &context
            .run(&["--json", "image", "show", "golden-bundle"])
            .stdout,
    )[0]["data"]
        .clone();
    assert_eq!(
        from_bundle["rootfs"], original,
        "the bundle changed the image"
    );
    assert!(
        from_bundle["source"]
            .as_str()
            .unwrap()
            .starts_with("catalog:golden-bundle (bundle)"),
        "{from_bundle}"
    );

    // A catalog whose sha256 is wrong: a clear error, and nothing of it is stored.
    let mut bad = entry.clone();
    bad["bundle"]["sha256"] = serde_json::json!("0".repeat(64));
    write_catalog("tampered", &bad);
    let before = records(&context.run(&["--json", "cache", "ls"]).stdout).len();
    let refused = context.run(&["image", "pull", "tampered"]);
    assert_ne!(refused.code, Some(0), "{refused}");
    assert!(refused.stderr.contains("failed verification"), "{refused}");
    assert_eq!(
        records(&context.run(&["--json", "cache", "ls"]).stdout).len(),
        before,
        "a failed fetch was recorded"
    );
    let scratch: Vec<_> = std::fs::read_dir(context.store_dir().join("scratch"))
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    assert!(scratch.is_empty(), "{scratch:?}");
}

/// The `--json` record of `kind` in a run's output.
fn record_of(output: &crate::support::Output, kind: &str) -> serde_json::Value {
    records(&output.stdout)
        .into_iter()
        .find(|record| record["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} record: {output}"))["data"]
        .clone()
}

#[test]
fn a_pushed_image_pulls_back_byte_for_byte_and_a_second_push_sends_only_the_changed_layer() {
    let Some(registry) = RealRegistry::start_logging_requests() else {
        return;
    };
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let base = push_faithful(&registry, "test/base", None);
    let target = format!("{}/team/app:1", registry.address);
    let a = TestContext::new();
    let project = a.project();
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("one.txt"), "one\n").unwrap();
    std::fs::write(project.join("two.txt"), "two\n").unwrap();
    std::fs::write(
        project.join("Bangerfile"),
        format!(
            "[project]\nname = \"app\"\n\n[image]\nfrom = {{ oci = \"{base}\" }}\nsize = \"256M\"\n\n\
             [[image.provision]]\ncopy = \"one.txt\"\nto = \"/etc/one\"\n\n\
             [[image.provision]]\ncopy = \"two.txt\"\nto = \"/etc/two\"\n"
        ),
    )
    .unwrap();

    // A bad reference is refused before anything is built.
    let refused = a.run(&["build", "--push", "Not A Reference"]);
    assert_eq!(refused.code, Some(1), "{refused}");
    assert!(refused.stderr.contains("Not A Reference"), "{refused}");
    assert!(!project.join("Bangerfile.lock").exists(), "{refused}");

    let built = a.run(&["--json", "build", "--push", &target]);
    assert_eq!(built.code, Some(0), "{built}");
    let pushed = record_of(&built, "image_pushed");
    // Three base layers, two copies and banger's agent; every blob and the config sent.
    assert_eq!(pushed["layers"], 6, "{built}");
    assert_eq!(pushed["uploaded_blobs"], 7, "{built}");
    let a_rootfs = record_of(&built, "image_built")["rootfs"].clone();
    let uploads = registry.blob_uploads("team/app").len();
    assert_eq!(uploads, 7, "{}", registry.log());

    // A fresh HOME pulls it: the same ext4, no agent layer added, the kernel kept.
    let b = TestContext::new();
    let pulled = b.run(&["--json", "image", "pull", &target, "--name", "pulled"]);
    assert_eq!(pulled.code, Some(0), "{pulled}");
    let image = record_of(&pulled, "image");
    assert_eq!(image["rootfs"], a_rootfs, "{pulled}");
    assert!(
        image["source"]
            .as_str()
            .is_some_and(|source| source.contains("pushed by banger")),
        "{pulled}"
    );
    let (_dir, rootfs) = rootfs_of(&b, "pulled");
    assert_eq!(debugfs(&rootfs, "cat /etc/two"), "two\n");

    // The last step edited: its layer and the config are the only uploads.
    std::fs::write(project.join("two.txt"), "TWO\n").unwrap();
    let again = a.run(&["--json", "build", "--push", &target]);
    assert_eq!(again.code, Some(0), "{again}");
    let pushed = record_of(&again, "image_pushed");
    assert_eq!(pushed["uploaded_blobs"], 2, "{again}");
    assert!(pushed["reused_bytes"].as_u64().unwrap() > 0, "{again}");
    let uploads = registry.blob_uploads("team/app");
    assert_eq!(uploads.len(), 7 + 2, "{uploads:#?}");
    let b_again = b.run(&["--json", "image", "pull", &target, "--name", "pulled"]);
    assert_eq!(b_again.code, Some(0), "{b_again}");
    assert_eq!(
        record_of(&b_again, "image")["rootfs"],
        record_of(&again, "image_built")["rootfs"],
        "{b_again}"
    );

    // To another repository of the registry: with the first as a mount source (it stands
    // for the remote step cache), every layer is linked, not uploaded; only the config is.
    std::fs::create_dir_all(a.config_file().parent().unwrap()).unwrap();
    std::fs::write(
        a.config_file(),
        format!("[cache]\nremote = \"{}/team/app\"\n", registry.address),
    )
    .unwrap();
    let mirror = format!("{}/team/mirror:1", registry.address);
    let mirrored = a.run(&["--json", "image", "push", "app/sandbox", &mirror]);
    assert_eq!(mirrored.code, Some(0), "{mirrored}");
    let pushed = record_of(&mirrored, "image_pushed");
    assert_eq!(pushed["mounted_blobs"], 6, "{mirrored}");
    assert_eq!(pushed["uploaded_blobs"], 1, "{mirrored}");
    assert_eq!(
        registry.blob_uploads("team/mirror").len(),
        1,
        "{}",
        registry.log()
    );

    // Pushing an image that does not exist names it.
    let missing = a.run(&["image", "push", "no-such-image", &target]);
    assert_eq!(missing.code, Some(1), "{missing}");
    assert!(missing.stderr.contains("no-such-image"), "{missing}");
}

/// Imports the first faithful layer as image `name` (`image import-tar`); the layer's path.
fn import_faithful_layer(context: &TestContext, name: &str) -> PathBuf {
    let (_, blob, _) = faithful_layer_blobs().remove(0);
    let tar = context.root.path().join("rootfs.tar.gz");
    std::fs::write(&tar, &blob).unwrap();
    let imported = context.run(&["image", "import-tar", tar.to_str().unwrap(), "--name", name]);
    assert_eq!(imported.code, Some(0), "{imported}");
    tar
}

/// A published snapshot of `rootfs` made by banger `banger_version`, 1 MiB of state.
/// Imports the faithful layer as `name` and returns its rootfs integrity, what snapshots of it
/// are keyed by.
fn imported_rootfs_integrity(context: &TestContext, name: &str) -> String {
    import_faithful_layer(context, name);
    let show = context.run(&["--json", "image", "show", name]);
    let record: serde_json::Value = serde_json::from_str(show.stdout.trim()).unwrap();
    record["data"]["rootfs"].as_str().unwrap().to_owned()
}

fn fake_snapshot(context: &TestContext, banger_version: &str, rootfs: &str) -> String {
    fake_snapshot_of_shape(context, banger_version, rootfs, 1)
}

fn fake_snapshot_of_shape(
    context: &TestContext,
    banger_version: &str,
    rootfs: &str,
    vcpus: u32,
) -> String {
    use banger::vm::snapshot::{SNAPSHOT_FORMAT, SnapshotSpec, Snapshots, vmm_version};
    let spec = SnapshotSpec {
        format: SNAPSHOT_FORMAT,
        banger: banger_version.to_owned(),
        vmm: vmm_version(banger::vm::qemu::binary()).unwrap_or_else(|| "no QEMU".into()),
        accel: "tcg".into(),
        tsc_khz: None,
        rootfs: rootfs.to_owned(),
        vmlinux: "v".into(),
        initrd: "i".into(),
        vcpus,
        memory_mib: 256,
        disk_bytes: 1 << 30,
        network: banger::spec::NetworkMode::None,
    };
    let snapshots = Snapshots::open(context.snapshots_dir()).unwrap();
    let pending = snapshots.begin(&spec.key()).unwrap();
    std::fs::write(pending.files().state, vec![1u8; 1 << 20]).unwrap();
    pending.publish(&spec).unwrap();
    spec.key()
}

#[test]
fn cache_gc_removes_the_snapshots_no_vm_can_start_from_any_more() {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let context = TestContext::new();
    let integrity = imported_rootfs_integrity(&context, "kept");

    let this_version = env!("CARGO_PKG_VERSION");
    let fits = fake_snapshot(&context, this_version, &integrity);
    let old = fake_snapshot(&context, "0.0.0-old", &integrity);
    let orphan = fake_snapshot(&context, this_version, "sha256-of-a-removed-image");
    let dir = context.snapshots_dir();
    let present = |key: &str| dir.join(key).join("snapshot.json").exists();

    let du = context.run(&["--json", "cache", "du"]);
    let usage: serde_json::Value = serde_json::from_str(du.stdout.trim()).unwrap();
    assert_eq!(usage["data"]["snapshots"], 3, "{du}");
    assert!(usage["data"]["snapshot_bytes"].as_u64().unwrap() >= 3 << 20);

    let dry = context.run(&["cache", "gc", "--dry-run"]);
    assert_eq!(dry.code, Some(0), "{dry}");
    assert!(
        dry.stdout.contains(&format!(
            "would remove snapshot {} (saved by banger 0.0.0-old, this is {this_version})",
            &old[..12]
        )) && dry.stdout.contains(&format!(
            "would remove snapshot {} (its image is no longer recorded)",
            &orphan[..12]
        )) && dry
            .stdout
            .contains("would remove 2 snapshot(s), 2.0 MiB; 1 kept (1.0 MiB)"),
        "{dry}"
    );
    assert!(present(&fits) && present(&old) && present(&orphan));

    let gc = context.run(&["cache", "gc"]);
    assert_eq!(gc.code, Some(0), "{gc}");
    assert!(gc.stdout.contains("removed 2 snapshot(s)"), "{gc}");
    assert!(present(&fits) && !present(&old) && !present(&orphan));
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert_eq!(leftovers, [std::ffi::OsString::from(&fits)]);

    // Once its image is forgotten, the last one goes too.
    let removed = context.run(&["image", "rm", "kept"]);
    assert_eq!(removed.code, Some(0), "{removed}");
    let gc = context.run(&["--json", "cache", "gc"]);
    let report: serde_json::Value = serde_json::from_str(gc.stdout.trim()).unwrap();
    let snapshots = &report["data"]["snapshots"];
    assert_eq!(snapshots["removed"][0]["key"], fits.as_str(), "{gc}");
    assert_eq!(
        snapshots["removed"][0]["reason"],
        "its image is no longer recorded"
    );
    assert_eq!(snapshots["kept"], 0);
    assert!(!present(&fits));
}

#[test]
fn cache_gc_keeps_the_snapshots_within_their_cap_the_least_recently_used_going_first() {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let context = TestContext::new();
    let integrity = imported_rootfs_integrity(&context, "kept");
    // Three snapshots that still fit, about 1 MiB each, against a cap for two.
    std::fs::create_dir_all(context.config_file().parent().unwrap()).unwrap();
    std::fs::write(
        context.config_file(),
        "[cache]\nsnapshots_max_size = \"2100K\"\n",
    )
    .unwrap();
    let this_version = env!("CARGO_PKG_VERSION");
    let mut keys = Vec::new();
    for vcpus in 1..=3 {
        keys.push(fake_snapshot_of_shape(
            &context,
            this_version,
            &integrity,
            vcpus,
        ));
    }
    let dir = context.snapshots_dir();
    // Used in the order: the first, the third, then the second.
    for (key, seconds) in [(&keys[0], 1_000), (&keys[2], 2_000), (&keys[1], 3_000)] {
        std::fs::File::options()
            .write(true)
            .open(dir.join(key).join("snapshot.json"))
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
            .unwrap();
    }
    let present = |key: &str| dir.join(key).join("snapshot.json").exists();

    let du = context.run(&["--json", "cache", "du"]);
    let usage: serde_json::Value = serde_json::from_str(du.stdout.trim()).unwrap();
    assert_eq!(usage["data"]["snapshots_max_size"], 2100 << 10, "{du}");

    let dry = context.run(&["cache", "gc", "--dry-run"]);
    assert_eq!(dry.code, Some(0), "{dry}");
    assert!(
        dry.stdout.contains(&format!(
            "would remove snapshot {} (least recently used, beyond `[cache] snapshots_max_size` \
             2100K)",
            &keys[0][..12]
        )) && dry.stdout.contains("would remove 1 snapshot(s)"),
        "{dry}"
    );
    assert!(keys.iter().all(|key| present(key)));

    let gc = context.run(&["cache", "gc"]);
    assert_eq!(gc.code, Some(0), "{gc}");
    assert!(
        !present(&keys[0]) && present(&keys[1]) && present(&keys[2]),
        "{gc}"
    );
}
