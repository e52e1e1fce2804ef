//! `run` provisioning end to end, through the real `banger` binary: builder VMs booting the
//! real default image and kernel under QEMU (TCG where KVM does not work), their changes
//! turned into layers, the images booted as VMs. Part of the slow group (`slow_provision_*`).
//! On failure, the step's kept log and console are in the output.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::slow::{debian_world, have_qemu, home_like_the_world, records};
use crate::support::{Output, StopDaemon, TestContext, capable, find_program};

fn can_build() -> bool {
    have_qemu()
        && capable(
            "ssh-keygen (Debian package `openssh-client`)",
            find_program("ssh-keygen").is_some(),
        )
}

/// A project directory of its own in `context`, with `bangerfile` written into it.
fn project(context: &TestContext, name: &str, bangerfile: &str) -> PathBuf {
    let dir = context.root.path().join("projects").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Bangerfile"), bangerfile).unwrap();
    dir
}

/// `banger ARGS --file DIR/Bangerfile`.
fn in_project(context: &TestContext, dir: &Path, args: &[&str]) -> std::process::Command {
    let file = dir.join("Bangerfile");
    let mut all: Vec<&str> = args.to_vec();
    all.push("--file");
    all.push(file.to_str().unwrap());
    let mut command = context.command(&all);
    command.current_dir(dir);
    command
}

fn output_of(context: &TestContext, output: std::process::Output) -> Output {
    Output {
        code: output.status.code(),
        stdout: context.redact(&String::from_utf8_lossy(&output.stdout)),
        stderr: context.redact(&String::from_utf8_lossy(&output.stderr)),
    }
}

fn build(context: &TestContext, dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--json", "build"];
    args.extend_from_slice(extra);
    output_of(context, in_project(context, dir, &args).output().unwrap())
}

/// Ids of the steps a `--json` run executed (`step_finished`).
fn ran(output: &Output) -> Vec<String> {
    let mut ran: Vec<String> = records(&output.stdout)
        .iter()
        .filter(|event| event["type"] == "step_finished")
        .map(|event| event["data"]["step"].as_str().unwrap().to_owned())
        .collect();
    ran.sort();
    ran
}

/// Ids of the steps a `--json` run satisfied by early cutoff.
fn cut_off(output: &Output) -> Vec<String> {
    records(&output.stdout)
        .iter()
        .filter(|event| event["type"] == "step_cached" && event["data"]["hit"] == "cutoff")
        .map(|event| event["data"]["step"].as_str().unwrap().to_owned())
        .collect()
}

/// Pids of QEMU processes started by the `banger` process `pid` (their console log is in a
/// scratch directory named after it).
fn builder_qemus(pid: u32) -> Vec<u32> {
    let marker = format!("/scratch/step-{pid}-");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(candidate) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if cmdline.contains("qemu-system") && cmdline.contains(&marker) && !zombie {
            found.push(candidate);
        }
    }
    found
}

/// Waits until `pid` has no builder QEMU left; fails after `limit`.
fn assert_no_builder_left(pid: u32, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    loop {
        let left = builder_qemus(pid);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: builder QEMU {left:?} still runs {limit:?} later"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kept log of a step, for failure messages.
fn step_log(context: &TestContext, dir: &Path, step: &str) -> String {
    let output = in_project(context, dir, &["build", "--log", step])
        .output()
        .unwrap();
    format!(
        "--- log of {step}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn slow_provision_run_steps_build_an_image_that_boots_and_rebuild_only_what_changed() {
    if !can_build() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let dir = project(
        context,
        "make",
        r#"[project]
name = "provisioned"

[[image.provision]]
run = "apt-get update && apt-get install -y --no-install-recommends make"
env = { DEBIAN_FRONTEND = "noninteractive" }

[[image.provision]]
run = "make --version > /etc/make-version"

[[image.provision]]
copy = "hello.txt"
to = "/etc/hello.txt"
"#,
    );
    std::fs::write(dir.join("hello.txt"), "hello\n").unwrap();

    let first = build(context, &dir, &[]);
    assert_eq!(
        first.code,
        Some(0),
        "{first}\n{}",
        step_log(context, &dir, "sandbox/provision[0]")
    );
    let first_ran = ran(&first);
    for step in [
        "image:sandbox/provision[0]",
        "image:sandbox/provision[1]",
        "image:sandbox/provision[2]",
        "image:sandbox/rootfs",
    ] {
        assert!(first_ran.iter().any(|id| id == step), "{step}: {first}");
    }
    // The command's output streamed as events, and the whole of it is kept.
    assert!(
        records(&first.stdout).iter().any(|event| {
            event["type"] == "step_output"
                && event["data"]["step"] == "image:sandbox/provision[0]"
                && event["data"]["line"]
                    .as_str()
                    .is_some_and(|line| line.contains("Setting up make"))
        }),
        "{first}"
    );
    assert!(step_log(context, &dir, "sandbox/provision[0]").contains("Setting up make"));

    let run = context.run(&[
        "vm",
        "run",
        "--image",
        "provisioned/sandbox",
        "--rm",
        "--memory",
        "1G",
        "--",
        "cat",
        "/etc/make-version",
        "/etc/hello.txt",
    ]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("GNU Make"), "{run}");
    assert!(run.stdout.contains("hello"), "{run}");

    // Nothing changed: nothing runs.
    let again = build(context, &dir, &[]);
    assert_eq!(again.code, Some(0), "{again}");
    assert_eq!(ran(&again), Vec::<String>::new(), "{again}");

    // Editing the second `run` re-runs it and what follows only; the copy's layer does not
    // depend on it.
    let text = std::fs::read_to_string(dir.join("Bangerfile")).unwrap();
    std::fs::write(
        dir.join("Bangerfile"),
        text.replace(
            "make --version > /etc/make-version",
            "make --version | head -n 1 > /etc/make-version",
        ),
    )
    .unwrap();
    let edited = build(context, &dir, &[]);
    assert_eq!(edited.code, Some(0), "{edited}");
    assert_eq!(
        ran(&edited),
        ["image:sandbox/provision[1]", "image:sandbox/rootfs"],
        "{edited}"
    );

    // Identity: two VMs of the provisioned image make their own host keys and machine ids.
    let identity = || {
        let output = context.run(&[
            "vm",
            "run",
            "--image",
            "provisioned/sandbox",
            "--rm",
            "--memory",
            "1G",
            "--",
            "sh",
            "-c",
            "for i in $(seq 600); do [ -s /etc/ssh/ssh_host_ed25519_key.pub ] && \
             [ -s /etc/machine-id ] && break; sleep 0.2; done; \
             cat /etc/ssh/ssh_host_ed25519_key.pub /etc/machine-id",
        ]);
        assert_eq!(output.code, Some(0), "{output}");
        let lines: Vec<String> = output
            .stdout
            .lines()
            .filter(|line| line.starts_with("ssh-ed25519") || line.len() == 32)
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), 2, "a host key and a machine id: {output}");
        lines
    };
    let (one, two) = (identity(), identity());
    assert_ne!(one[0], two[0], "two VMs share an SSH host key");
    assert_ne!(one[1], two[1], "two VMs share a machine id");
}

#[test]
fn slow_provision_a_failing_command_fails_its_step_with_its_output_and_stores_nothing() {
    if !can_build() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let dir = project(
        context,
        "failing",
        "[project]\nname = \"failing\"\n\n[[image.provision]]\n\
         run = \"echo first words; echo to stderr >&2; exit $((1 + 2))\"\n",
    );
    let mut command = in_project(context, &dir, &["build"]);
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = command.spawn().unwrap();
    let pid = child.id();
    let failed = output_of(context, child.wait_with_output().unwrap());
    assert_eq!(failed.code, Some(1), "{failed}");
    for expected in [
        // The status, in words the command's text does not hold.
        "failed (exit 3)",
        "first words",
        "to stderr",
        "the whole log: [ROOT]",
    ] {
        assert!(failed.stderr.contains(expected), "{expected}: {failed}");
    }
    assert_no_builder_left(pid, Duration::from_secs(10), "after a failed step");
    // Nothing stored: the step would run again, and its image was not recorded.
    let graph = output_of(
        context,
        in_project(context, &dir, &["graph"]).output().unwrap(),
    );
    let line = graph
        .stdout
        .lines()
        .find(|line| line.contains("image:sandbox/provision[0] "))
        .unwrap_or_default()
        .to_owned();
    assert!(line.contains("will run"), "{graph}");
    let images = context.run(&["--json", "image", "list"]);
    assert!(!images.stdout.contains("failing/sandbox"), "{images}");
    // The log is kept and names the failure's output.
    assert!(step_log(context, &dir, "sandbox/provision[0]").contains("first words"));

    // A command that outlives its entry's timeout fails the same way.
    std::fs::write(
        dir.join("Bangerfile"),
        "[project]\nname = \"failing\"\n\n[[image.provision]]\n\
         run = \"echo waiting; sleep 600\"\ntimeout = \"5s\"\n",
    )
    .unwrap();
    let mut command = in_project(context, &dir, &["build"]);
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = command.spawn().unwrap();
    let pid = child.id();
    let timed_out = output_of(context, child.wait_with_output().unwrap());
    assert_eq!(timed_out.code, Some(1), "{timed_out}");
    for expected in [
        "did not finish within 5s",
        "waiting",
        "the whole log: [ROOT]",
    ] {
        assert!(
            timed_out.stderr.contains(expected),
            "{expected}: {timed_out}"
        );
    }
    assert_no_builder_left(pid, Duration::from_secs(10), "after a timed-out step");
}

#[test]
fn slow_provision_interrupted_builds_leave_no_qemu_and_the_next_build_completes() {
    if !can_build() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let dir = project(
        context,
        "interrupted",
        "[project]\nname = \"interrupted\"\n\n[[image.provision]]\n\
         run = \"echo interrupted-build > /etc/interrupted\"\n",
    );
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let mut command = in_project(context, &dir, &["build"]);
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        let pid = child.id();
        // Interrupted while the builder boots.
        let deadline = Instant::now() + Duration::from_secs(300);
        while builder_qemus(pid).is_empty() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{signal}: the build ended ({status}) before a builder started");
            }
            assert!(Instant::now() < deadline, "{signal}: no builder VM started");
            std::thread::sleep(Duration::from_millis(50));
        }
        if signal == nix::sys::signal::Signal::SIGINT {
            // Builder VMs are the engine's, not the user's: `vm list` does not show them.
            let listed = context.run(&["--json", "vm", "list"]);
            assert_eq!(listed.code, Some(0), "{listed}");
            assert!(
                records(&listed.stdout).is_empty(),
                "a builder VM is listed: {listed}"
            );
            assert!(!builder_qemus(pid).is_empty(), "the builder ran throughout");
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "{signal}: {status}");
        assert_no_builder_left(pid, Duration::from_secs(10), signal.as_ref());
        // Nothing of the step was stored.
        let graph = output_of(
            context,
            in_project(context, &dir, &["graph"]).output().unwrap(),
        );
        assert!(
            graph
                .stdout
                .lines()
                .any(|line| line.contains("image:sandbox/provision[0] ")
                    && line.contains("will run")),
            "{signal}: {graph}"
        );
    }
    let completed = build(context, &dir, &[]);
    assert_eq!(completed.code, Some(0), "{completed}");
    assert!(
        ran(&completed)
            .iter()
            .any(|id| id == "image:sandbox/provision[0]"),
        "{completed}"
    );
}

/// The rootfs digest of a recorded image.
fn image_digest(context: &TestContext, name: &str) -> String {
    let list = context.run(&["--json", "image", "list"]);
    records(&list.stdout)
        .into_iter()
        .find(|record| record["data"]["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {list}"))["data"]["rootfs"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn slow_provision_two_cold_builds_give_identical_images_and_a_rebuilt_step_is_cut_off() {
    if !can_build()
        || !capable("mmdebstrap", find_program("mmdebstrap").is_some())
        || !capable("apt-get", find_program("apt-get").is_some())
    {
        return;
    }
    let bangerfile = "[project]\nname = \"repro\"\n\n\
        [image]\nfrom = { recipe = \"debian\", suite = \"bookworm\" }\n\n\
        [[image.provision]]\nrun = \"echo x > /etc/x\"\n";
    let mut digests = Vec::new();
    let mut lock = None;
    for _ in 0..2 {
        let context = TestContext::new();
        let dir = project(&context, "repro", bangerfile);
        if let Some(lock) = &lock {
            std::fs::write(dir.join("Bangerfile.lock"), lock).unwrap();
        }
        let built = build(&context, &dir, &[]);
        assert_eq!(built.code, Some(0), "{built}");
        lock = Some(std::fs::read_to_string(dir.join("Bangerfile.lock")).unwrap());
        digests.push(image_digest(&context, "repro/sandbox"));

        // Re-running the deterministic step gives the same layer: the image is cut off.
        let rebuilt = build(&context, &dir, &["--rebuild", "sandbox/provision[0]"]);
        assert_eq!(rebuilt.code, Some(0), "{rebuilt}");
        assert_eq!(ran(&rebuilt), ["image:sandbox/provision[0]"], "{rebuilt}");
        assert_eq!(cut_off(&rebuilt), ["image:sandbox/rootfs"], "{rebuilt}");

        // The lock records what the recipe installed; --locked refuses other versions.
        let lock_file = dir.join("Bangerfile.lock");
        let text = std::fs::read_to_string(&lock_file).unwrap();
        assert!(
            text.contains("[[recipe]]") && text.contains("\"bash="),
            "{text}"
        );
        let other = regex_free_replace_first_version(&text, "bash=");
        std::fs::write(&lock_file, &other).unwrap();
        let refused = build(&context, &dir, &["--locked"]);
        assert_eq!(refused.code, Some(1), "{refused}");
        assert!(
            refused.stderr.contains("Bangerfile.lock needs updating")
                && refused.stderr.contains("bash"),
            "{refused}"
        );
        assert_eq!(std::fs::read_to_string(&lock_file).unwrap(), other);
        std::fs::write(&lock_file, &text).unwrap();
    }
    assert_eq!(digests[0], digests[1], "two cold builds differ");
}

/// `text` with the version after the first `prefix` replaced by `0.0-banger-test`.
fn regex_free_replace_first_version(text: &str, prefix: &str) -> String {
    let start = text.find(prefix).unwrap() + prefix.len();
    let end = start + text[start..].find('"').unwrap();
    format!("{}0.0-banger-test{}", &text[..start], &text[end..])
}

#[test]
fn slow_provision_golden_bundles_are_a_stored_step_and_boot() {
    if !can_build() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = home_like_the_world(&world);
    let dir = project(
        &context,
        "golden",
        "[project]\nname = \"golden\"\n\n[[image.provision]]\nrun = \"echo golden > /etc/golden\"\n\n\
         [[image.provision]]\nrun = \"echo last > /etc/last\"\n",
    );
    let out = context.root.path().join("golden.tar.zst");
    let bundle_args = ["--bundle", out.to_str().unwrap()];
    let first = build(&context, &dir, &bundle_args);
    assert_eq!(first.code, Some(0), "{first}");
    assert!(
        ran(&first).iter().any(|id| id == "image:sandbox/bundle"),
        "{first}"
    );
    let entry = records(&first.stdout)
        .into_iter()
        .find(|record| record["type"] == "bundle")
        .expect("a catalog entry");
    let sha256 = entry["data"]["bundle"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let records_before = context
        .run(&["--json", "cache", "ls"])
        .stdout
        .lines()
        .count();

    // Nothing changed: the stored bundle is copied out, identical, nothing runs or is stored.
    std::fs::remove_file(&out).unwrap();
    let second = build(&context, &dir, &bundle_args);
    assert_eq!(second.code, Some(0), "{second}");
    assert_eq!(ran(&second), Vec::<String>::new(), "{second}");
    let again = records(&second.stdout)
        .into_iter()
        .find(|record| record["type"] == "bundle")
        .expect("a catalog entry");
    assert_eq!(again["data"]["bundle"]["sha256"], sha256.as_str());
    let written = std::process::Command::new("sha256sum")
        .arg(&out)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&written.stdout).starts_with(&sha256));
    assert_eq!(
        context
            .run(&["--json", "cache", "ls"])
            .stdout
            .lines()
            .count(),
        records_before,
        "the second bundle build stored something"
    );

    // The bundle, listed in a catalog, is pulled and boots.
    let mut catalog: serde_json::Value =
        serde_json::from_str(include_str!("../../catalogs/images.json")).unwrap();
    let mut listed = entry["data"].clone();
    listed["name"] = "golden-bundle".into();
    // The printed URL went through the test's redaction of temp paths.
    listed["bundle"]["url"] = format!("file://{}", out.display()).into();
    catalog["images"].as_array_mut().unwrap().push(listed);
    let catalog_file = context.root.path().join("images.json");
    std::fs::write(&catalog_file, catalog.to_string()).unwrap();
    std::fs::create_dir_all(context.config_file().parent().unwrap()).unwrap();
    std::fs::write(
        context.config_file(),
        format!("[catalogs]\nimages = \"{}\"\n", catalog_file.display()),
    )
    .unwrap();
    let pulled = context.run(&["image", "pull", "golden-bundle"]);
    assert_eq!(pulled.code, Some(0), "{pulled}");
    let _daemon = StopDaemon(&context);
    let run = context.run(&[
        "vm",
        "run",
        "--image",
        "golden-bundle",
        "--rm",
        "--memory",
        "1G",
        "--",
        "cat",
        "/etc/golden",
    ]);
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(
        run.stdout.trim_end().lines().last(),
        Some("golden"),
        "{run}"
    );

    // An image built on the bundle: its builder boots the bundle's ext4 as it is, and the
    // image is the bundle's tree (read as a layer) under the new layers.
    let on_top = project(
        &context,
        "on-golden",
        "[project]\nname = \"on-golden\"\n\n[image]\nfrom = \"golden-bundle\"\n\n\
         [[image.provision]]\nrun = \"echo on-top > /etc/on-top\"\n",
    );
    let built = build(&context, &on_top, &[]);
    assert_eq!(built.code, Some(0), "{built}");
    let on_top_ran = ran(&built);
    assert!(
        on_top_ran
            .iter()
            .any(|id| id == "image:sandbox/provision[0]")
            && on_top_ran.iter().any(|id| id == "image:sandbox/rootfs")
            && !on_top_ran.iter().any(|id| id.ends_with("/input")),
        "{built}"
    );
    let both = context.run(&[
        "vm",
        "run",
        "--image",
        "on-golden/sandbox",
        "--rm",
        "--memory",
        "1G",
        "--",
        "cat",
        "/etc/golden",
        "/etc/on-top",
    ]);
    assert_eq!(both.code, Some(0), "{both}");
    assert!(
        both.stdout.contains("golden\non-top"),
        "the bundle's files and the new layer: {both}"
    );

    // Editing the last step re-runs it, the image and the bundle, nothing before them.
    let text = std::fs::read_to_string(dir.join("Bangerfile")).unwrap();
    std::fs::write(
        dir.join("Bangerfile"),
        text.replace("echo last >", "echo edited >"),
    )
    .unwrap();
    let edited = build(&context, &dir, &bundle_args);
    assert_eq!(edited.code, Some(0), "{edited}");
    assert_eq!(
        ran(&edited),
        [
            "image:sandbox/bundle",
            "image:sandbox/provision[1]",
            "image:sandbox/rootfs"
        ],
        "{edited}"
    );
    let rewritten = records(&edited.stdout)
        .into_iter()
        .find(|record| record["type"] == "bundle")
        .expect("a catalog entry");
    assert_ne!(rewritten["data"]["bundle"]["sha256"], sha256.as_str());
}

/// A `run` step's builder has banger's agent as PID 1 (no init to wait for), unless the entry
/// asks for the image's systemd.
#[test]
fn slow_provision_builders_run_the_agent_as_pid1_unless_init_is_systemd() {
    if !can_build() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let dir = project(
        context,
        "inits",
        "[project]\nname = \"inits\"\n\n\
         [[image.provision]]\nrun = \"echo pid1=$(cat /proc/1/comm)\"\n\n\
         [[image.provision]]\nrun = \"echo pid1=$(cat /proc/1/comm)\"\n\
         init = \"systemd\"\n",
    );
    let built = build(context, &dir, &[]);
    assert_eq!(built.code, Some(0), "{built}");
    let pid1 = |step: &str| {
        let log = step_log(context, &dir, step);
        log.lines()
            .find_map(|line| line.trim().strip_prefix("pid1="))
            .unwrap_or_else(|| panic!("no pid1= line in {log}"))
            .to_owned()
    };
    let default = pid1("sandbox/provision[0]");
    assert_ne!(default, "systemd", "the default builder booted systemd");
    assert_eq!(pid1("sandbox/provision[1]"), "systemd");
}

/// Kinds of the steps a `--json` run executed.
fn ran_kinds(output: &Output) -> Vec<String> {
    records(&output.stdout)
        .iter()
        .filter(|event| event["type"] == "step_finished")
        .map(|event| event["data"]["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// The `push_finished` record of a `--json` run: (pushed, present, uploaded bytes).
fn push_summary(output: &Output) -> (u64, u64, u64) {
    let record = records(&output.stdout)
        .into_iter()
        .find(|event| event["type"] == "push_finished")
        .unwrap_or_else(|| panic!("no push_finished: {output}"));
    let data = &record["data"];
    (
        data["pushed"].as_u64().unwrap(),
        data["present"].as_u64().unwrap(),
        data["uploaded_bytes"].as_u64().unwrap(),
    )
}

#[test]
fn slow_provision_remote_cache_gives_a_fresh_home_the_same_image_without_running_steps() {
    if !can_build() {
        return;
    }
    let Some(registry) = crate::registry::RealRegistry::start(None) else {
        return;
    };
    let Some(world) = debian_world() else {
        return;
    };
    let remote = format!("{}/team/banger-cache", registry.address);
    let bangerfile = r#"[project]
name = "shared"

[[image.provision]]
run = "echo one > /etc/one"

[[image.provision]]
run = "echo two > /etc/two"

[[image.provision]]
run = "echo three > /etc/three"
"#;

    // A: the world's store (recipe and kernel stored), builds and uploads.
    let a = home_like_the_world(&world);
    let a_dir = project(&a, "shared", bangerfile);
    let built = build(&a, &a_dir, &["--cache-to", &remote]);
    assert_eq!(built.code, Some(0), "{built}");
    let a_ran = ran(&built);
    for step in [
        "image:sandbox/provision[0]",
        "image:sandbox/provision[1]",
        "image:sandbox/provision[2]",
    ] {
        assert!(a_ran.iter().any(|id| id == step), "{step}: {built}");
    }
    let (sent, _, sent_bytes) = push_summary(&built);
    // The recipe, three `run` layers and the kernel.
    assert!(sent >= 5 && sent_bytes > 0, "{built}");
    let a_digest = image_digest(&a, "shared/sandbox");
    // The image itself, pushed as an OCI image of its layers, pulls back byte for byte.
    let image_ref = format!("{}/team/shared:1", registry.address);
    let pushed = a.run(&["image", "push", "shared/sandbox", &image_ref]);
    assert_eq!(pushed.code, Some(0), "{pushed}");
    let c = TestContext::new();
    let pulled = c.run(&["image", "pull", &image_ref, "--name", "shared"]);
    assert_eq!(pulled.code, Some(0), "{pulled}");
    assert_eq!(image_digest(&c, "shared"), a_digest, "{pulled}");
    // The world's kernel as one artifact: the same files under the name it was pushed with.
    let kernel_ref = format!("{}/team/kernel:1", registry.address);
    let pushed = world.context.run(&[
        "--json",
        "kernel",
        "push",
        "debian-cloud-amd64",
        &kernel_ref,
    ]);
    assert_eq!(pushed.code, Some(0), "{pushed}");
    let kernel_of = |context: &TestContext, name: &str| {
        let shown = context.run(&["--json", "kernel", "show", name]);
        assert_eq!(shown.code, Some(0), "{shown}");
        records(&shown.stdout)[0]["data"].clone()
    };
    let pulled = c.run(&[
        "--json",
        "kernel",
        "pull",
        &kernel_ref,
        "--name",
        "shared-kernel",
    ]);
    assert_eq!(pulled.code, Some(0), "{pulled}");
    let (original, copy) = (
        kernel_of(&world.context, "debian-cloud-amd64"),
        kernel_of(&c, "shared-kernel"),
    );
    for field in ["vmlinux", "initrd", "modules", "release"] {
        assert_eq!(copy[field], original[field], "{field}: {pulled}");
    }

    // B: a fresh HOME with the same project (its lock too) runs no recipe and no `run`.
    let b = TestContext::new();
    let b_dir = project(&b, "shared", bangerfile);
    std::fs::copy(a_dir.join("Bangerfile.lock"), b_dir.join("Bangerfile.lock")).unwrap();
    let fetched = build(&b, &b_dir, &["--cache-from", &remote]);
    assert_eq!(fetched.code, Some(0), "{fetched}");
    let kinds = ran_kinds(&fetched);
    assert!(
        !kinds
            .iter()
            .any(|kind| kind == "provision.run" || kind.starts_with("recipe.")),
        "{kinds:?}: {fetched}"
    );
    assert!(
        records(&fetched.stdout).iter().any(|event| {
            event["type"] == "step_cached"
                && event["data"]["hit"] == "remote"
                && event["data"]["step"] == "image:sandbox/provision[2]"
        }),
        "{fetched}"
    );
    assert_eq!(image_digest(&b, "shared/sandbox"), a_digest, "{fetched}");

    // B edits the last step: only it runs (its kernel and input layers come from the remote).
    std::fs::write(
        b_dir.join("Bangerfile"),
        bangerfile.replace("echo three", "echo THREE"),
    )
    .unwrap();
    let edited = build(
        &b,
        &b_dir,
        &["--cache-from", &remote, "--cache-to", &remote],
    );
    assert_eq!(
        edited.code,
        Some(0),
        "{edited}\n{}",
        step_log(&b, &b_dir, "sandbox/provision[2]")
    );
    let kinds = ran_kinds(&edited);
    assert_eq!(
        kinds.iter().filter(|kind| *kind == "provision.run").count(),
        1,
        "{kinds:?}: {edited}"
    );
    assert!(
        !kinds.iter().any(|kind| kind.starts_with("recipe.")),
        "{edited}"
    );
    assert!(ran(&edited).contains(&"image:sandbox/provision[2]".to_owned()));
    // Its push sends the one new layer; the rest is there.
    let (sent, present, _) = push_summary(&edited);
    assert_eq!(sent, 1, "{edited}");
    assert!(present >= 1, "{edited}");
}
