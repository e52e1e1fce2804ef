//! The reliability group: trials that would have found the hardening review's defects, with
//! real processes racing each other. (Crash and disk-full trials are planned.)

use crate::registry::{Pusher, RealRegistry, push_layers};
use crate::rootfs::faithful_layer_blobs;
use crate::support::{TestContext, capable, have_e2fsprogs};

/// Eight `banger build` processes of one Bangerfile, started together, build each step once in
/// all (the store's per-step locks) and all report the same image.
#[test]
fn reliability_eight_concurrent_builds_run_each_step_once_and_agree() {
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pusher = Pusher::new(&registry.address, None).await;
        push_layers(
            &pusher,
            "test/race",
            Some("v1"),
            "amd64",
            false,
            faithful_layer_blobs(),
        )
        .await;
    });
    let reference = format!("{}/test/race:v1", registry.address);
    let context = TestContext::new();
    let project = context.project();
    std::fs::write(project.join("motd"), "hello\n").unwrap();
    std::fs::write(
        project.join("Bangerfile"),
        format!(
            "[project]\nname = \"race\"\n\n[image]\nfrom = {{ oci = \"{reference}\" }}\n\
             size = \"256M\"\n\n[[image.provision]]\ncopy = \"motd\"\nto = \"/etc/motd\"\n"
        ),
    )
    .unwrap();
    // Pinned first, so that the eight differ in nothing but timing.
    let pinned = context.run(&["graph"]);
    assert_eq!(pinned.code, Some(0), "{pinned}");
    let children: Vec<_> = (0..8)
        .map(|_| {
            context
                .command(&["--json", "build"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|child| child.wait_with_output().unwrap())
        .collect();
    let mut ran: Vec<String> = Vec::new();
    let mut images = std::collections::BTreeSet::new();
    for output in &outputs {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        for line in stdout.lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            match record["type"].as_str() {
                Some("step_finished") => {
                    ran.push(record["data"]["step"].as_str().unwrap().to_owned());
                }
                Some("image_built") => {
                    images.insert((
                        record["data"]["key"].as_str().unwrap().to_owned(),
                        record["data"]["rootfs"].as_str().unwrap().to_owned(),
                    ));
                }
                _ => {}
            }
        }
    }
    let mut unique = ran.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(ran.len(), unique.len(), "a step ran twice: {ran:?}");
    assert!(
        unique.iter().any(|step| step.ends_with("/rootfs")),
        "nothing was built: {ran:?}"
    );
    assert_eq!(images.len(), 1, "the builds disagree: {images:?}");
}
