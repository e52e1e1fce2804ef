//! The real `banger` binary in a sandboxed HOME: graph, cache, errors, exit codes.

use std::sync::Arc;

use crate::support::{Counters, TestContext, build_with_fakes};

/// Runs `assertions` with the short keys of steps downstream of the embedded guest agent
/// redacted: those keys hash the agent binary, so every agent change (or another compiler)
/// would move them. Key stability itself is pinned by `key::tests`.
fn with_agent_keys_redacted(assertions: impl FnOnce()) {
    insta::with_settings!({filters => vec![(
        r"(rootfs\.build|provision\.run|agent\.layer|kernel\.initramfs|kernel\.stage|vm\.[a-z-]+)( +)[0-9a-f]{12}",
        "$1$2[agent-dep.]",
    )]}, {
        assertions();
    });
}

#[test]
fn graph_of_the_example_bangerfile() {
    let context = TestContext::new();
    context.with_example_project();
    let output = context.run(&["graph"]);
    with_agent_keys_redacted(|| insta::assert_snapshot!(output.to_string()));
    assert!(
        !context.home().exists(),
        "a read-only command created files under HOME"
    );
}

#[test]
fn graph_as_dot_and_json() {
    let context = TestContext::new();
    context.with_example_project();
    let dot = context.run(&["graph", "--format", "dot"]);
    assert_eq!(dot.code, Some(0), "{dot}");
    assert!(dot.stdout.starts_with("digraph banger {"));
    assert!(
        dot.stdout.contains(
            "\"image:sandbox/provision[1]\" -> \"image:sandbox/rootfs\" [label=\"layer[3]\"];"
        ),
        "{}",
        dot.stdout
    );

    let json = context.run(&["graph", "--format", "json"]);
    assert_eq!(json.code, Some(0), "{json}");
    let document: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let steps = document["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 17);
    assert_eq!(document["targets"], serde_json::json!(["vm/up"]));
    let copy = steps
        .iter()
        .find(|step| step["id"] == "image:sandbox/provision[1]")
        .unwrap();
    assert_eq!(copy["status"], "will_run");
    assert_eq!(copy["params"]["dest"], "/etc/profile.d/banger-example.sh");
    assert!(
        copy["params"]["src"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("blake3:")
    );

    let lines = context.run(&["--json", "graph"]);
    let record: serde_json::Value = serde_json::from_str(lines.stdout.trim()).unwrap();
    assert_eq!(record["type"], "graph");
    assert_eq!(record["data"]["steps"].as_array().unwrap().len(), 17);
}

#[test]
fn graph_shows_cached_steps_and_explains_what_changed() {
    let context = TestContext::new();
    let project = context.with_example_project();
    let counters = Arc::new(Counters::default());
    build_with_fakes(&context, &counters);

    let after_build = context.run(&["graph"]);
    with_agent_keys_redacted(|| insta::assert_snapshot!("after_build", after_build.to_string()));

    // Change the first provisioning step of the sandbox image.
    let bangerfile = project.join("Bangerfile");
    let text = std::fs::read_to_string(&bangerfile).unwrap();
    std::fs::write(
        &bangerfile,
        text.replace(
            "useradd --create-home --shell /bin/bash dev",
            "useradd --create-home dev",
        ),
    )
    .unwrap();
    let changed = context.run(&["graph"]);
    with_agent_keys_redacted(|| insta::assert_snapshot!("after_edit", changed.to_string()));

    let why = context.run(&["graph", "--why", "sandbox/rootfs"]);
    with_agent_keys_redacted(|| insta::assert_snapshot!("why_after_edit", why.to_string()));

    let why_json = context.run(&["--json", "graph", "--why", "sandbox/provision[0]"]);
    let record: serde_json::Value = serde_json::from_str(why_json.stdout.trim()).unwrap();
    assert_eq!(record["type"], "why");
    let change = &record["data"]["reasons"][0];
    assert_eq!(change["reason"], "params_changed");
    assert_eq!(change["changes"][0]["param"], "command");
    assert_eq!(
        change["changes"][0]["old"],
        "useradd --create-home --shell /bin/bash dev"
    );
    assert_eq!(change["changes"][0]["new"], "useradd --create-home dev");
}

#[test]
fn a_rebuild_with_everything_cached_runs_nothing_and_evicted_steps_are_explained() {
    let context = TestContext::new();
    context.with_example_project();
    let counters = Arc::new(Counters::default());
    let first = build_with_fakes(&context, &counters);
    // Every step of the plan but `base/rootfs`, which the sandbox does not boot.
    assert_eq!(first.ran.len(), 16);
    let second = build_with_fakes(&context, &counters);
    // Only never-cached steps (boot, file sync, workspace, up) execute again.
    let mut ran = second.ran.clone();
    ran.sort();
    assert_eq!(ran, ["vm/boot", "vm/file-sync", "vm/up", "vm/workspace"]);

    let ls = context.run(&["cache", "ls"]);
    assert_eq!(ls.code, Some(0), "{ls}");
    assert!(ls.stdout.starts_with("STEP"), "{ls}");
    assert_eq!(ls.stdout.lines().count(), 13, "{ls}");

    let ls_json = context.run(&["--json", "cache", "ls"]);
    for line in ls_json.stdout.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["type"], "cache_entry");
        assert!(record["data"]["bytes"].as_u64().unwrap() > 0);
    }

    let du = context.run(&["--json", "cache", "du"]);
    let usage: serde_json::Value = serde_json::from_str(du.stdout.trim()).unwrap();
    assert_eq!(usage["data"]["records"], 12);

    let dry = context.run(&["cache", "gc", "--max-size", "0", "--dry-run"]);
    assert_eq!(dry.code, Some(0), "{dry}");
    assert!(dry.stdout.contains("would evict 12 step(s)"), "{dry}");
    assert_eq!(context.run(&["--json", "cache", "du"]).stdout, du.stdout);

    let gc = context.run(&["cache", "gc", "--max-size", "0"]);
    assert!(gc.stdout.contains("evicted 12 step(s)"), "{gc}");
    let why = context.run(&["graph", "--why", "base/mmdebstrap"]);
    assert!(
        why.stdout
            .contains("unchanged since the last run, but `banger cache gc` evicted it"),
        "{why}"
    );
}

#[test]
fn bad_bangerfiles_are_reported_with_locations() {
    let context = TestContext::new();
    let project = context.project();
    let cases = [
        ("unknown_key", "[vm]\nvcpus = 4\n"),
        (
            "wrong_type",
            "[[image.provision]]\nrun = [\"make\"]\n\n[vm]\nmemory = true\n",
        ),
        (
            "cycle",
            "[images.a]\nfrom = { image = \"b\" }\n\n[images.b]\nfrom = { image = \"a\" }\n",
        ),
        (
            "missing_file",
            "[[image.provision]]\ncopy = \"scripts/setup.sh\"\nto = \"/usr/local/bin/setup\"\n",
        ),
    ];
    for (name, text) in cases {
        std::fs::write(project.join("Bangerfile"), text).unwrap();
        let output = context.run(&["graph"]);
        assert_eq!(output.code, Some(1), "{name}: {output}");
        insta::assert_snapshot!(format!("bad_{name}"), output.to_string());
    }
}

#[test]
fn a_missing_bangerfile_and_an_unknown_step_are_user_errors() {
    let context = TestContext::new();
    let missing = context.run(&["graph"]);
    insta::assert_snapshot!(missing.to_string(), @r"
    exit: Some(1)
    --- stdout

    --- stderr
    error: no Bangerfile in [ROOT]/project or any parent directory; create one (see Bangerfile.example and docs/bangerfile.md) or pass --file PATH
    ");
    let explicit = context.run(&["graph", "--file", "nope/Bangerfile"]);
    assert_eq!(explicit.code, Some(1));
    assert!(
        explicit
            .stderr
            .starts_with("error: cannot read Bangerfile nope/Bangerfile: No such file"),
        "{explicit}"
    );

    context.with_example_project();
    let unknown = context.run(&["graph", "--why", "provision[7]"]);
    assert_eq!(unknown.code, Some(1));
    assert!(
        unknown
            .stderr
            .starts_with("error: no step matches `provision[7]`"),
        "{unknown}"
    );
    let ambiguous = context.run(&["graph", "--why", "provision[0]"]);
    assert_eq!(ambiguous.code, Some(1));
    assert!(
        ambiguous.stderr.contains("matches several steps"),
        "{ambiguous}"
    );
}

#[test]
fn help_lists_only_working_commands_and_usage_errors_exit_1() {
    let context = TestContext::new();
    let help = context.run(&["--help"]);
    assert_eq!(help.code, Some(0));
    let commands: Vec<&str> = help
        .stdout
        .lines()
        .skip_while(|line| *line != "Commands:")
        .skip(1)
        .take_while(|line| !line.is_empty())
        .map(|line| line.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        commands,
        [
            "vm",
            "graph",
            "build",
            "up",
            "down",
            "ssh",
            "workspace",
            "image",
            "kernel",
            "ssh-config",
            "completion",
            "man",
            "network",
            "doctor",
            "cache",
            "daemon",
            "help"
        ]
    );
    for args in [&["graph", "--help"][..], &["cache", "gc", "--help"]] {
        let output = context.run(args);
        assert_eq!(output.code, Some(0), "{output}");
        assert!(output.stdout.contains("Usage: banger"), "{output}");
    }
    let usage = context.run(&["cache", "gc", "--max-size", "lots"]);
    assert_eq!(usage.code, Some(1), "{usage}");
    assert!(usage.stderr.contains("`lots` is not a size"), "{usage}");
}

#[test]
fn a_bad_config_file_names_itself() {
    let context = TestContext::new();
    std::fs::create_dir_all(context.config_file().parent().unwrap()).unwrap();
    std::fs::write(context.config_file(), "[cache]\nmax_size = \"huge\"\n").unwrap();
    let output = context.run(&["cache", "du"]);
    assert_eq!(output.code, Some(1), "{output}");
    assert_eq!(
        output.stderr.trim(),
        "error: config file [ROOT]/home/.config/banger/config.toml: `cache.max_size` = \"huge\": `huge` is not a size: expected a number with an optional unit, like `512M` or `4G`"
    );
}

#[test]
fn locked_and_frozen_builds_refuse_to_change_the_lock_and_name_it() {
    let context = TestContext::new();
    let project = context.project();
    // Port 1 on loopback: a registry nothing answers on, which --frozen must never ask.
    std::fs::write(
        project.join("Bangerfile"),
        "[image]\nfrom = { oci = \"127.0.0.1:1/team/base:v1\" }\n",
    )
    .unwrap();
    let frozen = context.run(&["build", "--frozen"]);
    assert_eq!(frozen.code, Some(1), "{frozen}");
    assert!(
        frozen.stderr.contains("Bangerfile.lock") && frozen.stderr.contains("team/base:v1"),
        "{frozen}"
    );
    assert!(frozen.stderr.contains("--frozen"), "{frozen}");
    assert!(!project.join("Bangerfile.lock").exists());

    let update = context.run(&["build", "--locked", "--update"]);
    assert_eq!(update.code, Some(1), "{update}");
    assert!(update.stderr.contains("--update"), "{update}");

    // A lock that pins nothing yet: --locked would have to write one.
    std::fs::write(project.join("Bangerfile"), "[project]\nname = \"plain\"\n").unwrap();
    let locked = context.run(&["build", "--locked"]);
    assert_eq!(locked.code, Some(1), "{locked}");
    assert!(
        locked.stderr.contains("Bangerfile.lock needs updating")
            && locked.stderr.contains("source_date_epoch"),
        "{locked}"
    );
    assert!(!project.join("Bangerfile.lock").exists());
}

#[test]
fn build_log_and_rebuild_name_unknown_steps_and_steps_without_a_log() {
    let context = TestContext::new();
    context.with_example_project();
    let unknown = context.run(&["build", "--log", "sandbox/nosuch"]);
    assert_eq!(unknown.code, Some(1), "{unknown}");
    assert!(unknown.stderr.contains("sandbox/nosuch"), "{unknown}");
    let never = context.run(&["build", "--log", "base/provision[0]"]);
    assert_eq!(never.code, Some(1), "{never}");
    assert!(
        never.stderr.contains("image:base/provision[0]") && never.stderr.contains("has not run"),
        "{never}"
    );
    let rebuild = context.run(&["build", "--rebuild", "nosuch"]);
    assert_eq!(rebuild.code, Some(1), "{rebuild}");
    assert!(rebuild.stderr.contains("--rebuild nosuch"), "{rebuild}");
    assert!(
        !context.store_dir().exists() && !context.project().join("Bangerfile.lock").exists(),
        "a refused command wrote the store or the lock"
    );
}

#[test]
fn doctor_lists_every_missing_program_with_its_install_command_and_exits_1() {
    let context = TestContext::new();
    let empty_path = context.root.path().join("empty-path");
    std::fs::create_dir_all(&empty_path).unwrap();
    let doctor = |args: &[&str]| {
        let output = context
            .command(args)
            .env("PATH", &empty_path)
            // Else vhost-device-vsock is found in the developer's cargo home.
            .env_remove("CARGO_HOME")
            .output()
            .unwrap();
        crate::support::Output {
            code: output.status.code(),
            stdout: context.redact(&String::from_utf8_lossy(&output.stdout)),
            stderr: context.redact(&String::from_utf8_lossy(&output.stderr)),
        }
    };
    let sudo = if banger::privileged::is_root() {
        ""
    } else {
        "sudo "
    };
    let text = doctor(&["doctor"]);
    assert_eq!(text.code, Some(1), "{text}");
    for line in [
        format!(
            "qemu (missing, required): needed for booting VMs (the QEMU microvm backend); fix: \
             {sudo}apt-get install qemu-system-x86"
        ),
        "vhost-device-vsock (missing): needed for the host↔guest agent channel under QEMU \
         (hybrid vsock; without it, virtio-serial); fix: cargo install --locked \
         vhost-device-vsock"
            .to_owned(),
        format!(
            "mmdebstrap (missing, required): needed for building the default Debian image and \
             fetching its kernel from packages; fix: {sudo}apt-get install mmdebstrap"
        ),
        format!(
            "ssh-keygen (missing, required): needed for the SSH key banger installs in every VM \
             it starts; fix: {sudo}apt-get install openssh-client"
        ),
    ] {
        assert!(
            text.stdout.lines().any(|got| got == line),
            "no `{line}` in:\n{text}"
        );
    }
    assert!(
        text.stdout.contains("`scripts/install-host-tools`"),
        "{text}"
    );
    assert!(
        text.stderr
            .contains("error: missing what `banger up` needs: qemu, mmdebstrap"),
        "{text}"
    );

    let json = doctor(&["--json", "doctor"]);
    assert_eq!(json.code, Some(1), "{json}");
    let qemu: serde_json::Value = json
        .stdout
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|record| record["data"]["name"] == "qemu")
        .unwrap_or_else(|| panic!("no qemu check in:\n{json}"));
    assert_eq!(qemu["type"], "check");
    assert_eq!(qemu["data"]["health"], "missing");
    assert_eq!(qemu["data"]["required"], true);
    assert_eq!(
        qemu["data"]["fix"],
        format!("{sudo}apt-get install qemu-system-x86")
    );
}

/// Where `scripts/install-host-tools` ran (CI runs it), `banger doctor` finds everything
/// `banger up` needs.
#[test]
fn doctor_passes_where_the_host_tools_are_installed() {
    let context = TestContext::new();
    let output = context.run(&["doctor"]);
    if !crate::support::capable(
        "every required `banger doctor` check (scripts/install-host-tools installs them)",
        output.code == Some(0),
    ) {
        eprintln!("{output}");
        return;
    }
    assert!(!output.stdout.contains("required)"), "{output}");
}

/// The same mistake exits the same way whatever it names: an unknown image or kernel to
/// remove or show is the user's (exit 1), and the error names it.
#[test]
fn unknown_images_and_kernels_exit_1_naming_them() {
    let context = TestContext::new();
    for args in [
        ["image", "rm", "nosuch-image"],
        ["kernel", "rm", "nosuch-kernel"],
        ["image", "show", "nosuch-image"],
        ["kernel", "show", "nosuch-kernel"],
    ] {
        let output = context.run(&args);
        assert_eq!(output.code, Some(1), "{args:?}: {output}");
        assert!(output.stderr.contains(args[2]), "{args:?}: {output}");
    }
}

/// `banger completion bash`, sourced by a real bash and driven as Tab drives it, offers
/// subcommands and the names of the VMs in the state database, without starting a daemon.
#[test]
fn completion_in_bash_offers_subcommands_and_existing_vm_names_without_a_daemon() {
    use banger::spec::NetworkMode;
    use banger::state::{State, VmRecord, VmState};
    if !crate::support::capable("bash", crate::support::find_program("bash").is_some()) {
        return;
    }
    let context = TestContext::new();
    let state_dir = context.home().join(".local/state/banger");
    let state = State::open(&state_dir).unwrap();
    for (index, name) in ["beta", "alpha", "alpine-box"].into_iter().enumerate() {
        state
            .create_vm(&VmRecord {
                name: name.to_owned(),
                id: format!("completion{index}"),
                image: "debian-bookworm".into(),
                kernel: "debian-bookworm".into(),
                backend: "qemu".into(),
                vcpus: 1,
                memory_mib: 256,
                disk_bytes: 1 << 30,
                state: VmState::Stopped,
                created_ms: 0,
                rootfs_integrity: None,
                network: NetworkMode::User,
                ports: Vec::new(),
            })
            .unwrap();
    }
    drop(state);
    let complete = |words: &[&str]| crate::support::bash_complete(&context, words);
    // An empty word is offered the names, then the flags.
    let names: Vec<String> = complete(&["banger", "vm", "ssh", ""])
        .into_iter()
        .filter(|candidate| !candidate.starts_with('-'))
        .collect();
    assert_eq!(names, ["alpha", "alpine-box", "beta"]);
    assert_eq!(
        complete(&["banger", "vm", "ssh", "alp"]),
        ["alpha", "alpine-box"]
    );
    assert_eq!(complete(&["banger", "vm", "rm", "-f", "b"]), ["beta"]);
    assert!(
        complete(&["banger", "vm", "ex"]).contains(&"exec".to_owned()),
        "{:?}",
        complete(&["banger", "vm", "ex"])
    );
    // Completing never started the daemon.
    let socket = banger::paths::Paths::resolve(
        &|name| {
            context
                .command(&[])
                .get_envs()
                .find(|(key, _)| *key == name)
                .and_then(|(_, value)| value.map(std::path::PathBuf::from))
        },
        nix::unistd::getuid().as_raw(),
    )
    .unwrap()
    .socket();
    assert!(!socket.exists(), "{} exists", socket.display());
}

/// `banger man DIR` writes a page for banger and one per command, from the same definitions
/// as `--help`, and leaves nothing else behind.
#[test]
fn man_writes_a_page_per_command() {
    let context = TestContext::new();
    let dir = context.root.path().join("man/man1");
    let output = context.run(&["man", dir.to_str().unwrap()]);
    assert_eq!(output.code, Some(0), "{output}");
    let page = |name: &str| {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|error| panic!("{name}: {error}"))
    };
    let top = page("banger.1");
    assert!(top.contains(".TH banger 1"), "{top}");
    let exec = page("banger-vm-exec.1");
    assert!(exec.contains(".TH banger-vm-exec 1"), "{exec}");
    assert!(exec.contains("\\-\\-workdir"), "{exec}");
    assert!(dir.join("banger-completion.1").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".1"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn an_invalid_log_filter_is_reported_and_the_command_still_runs() {
    let context = TestContext::new();
    let output = context
        .command(&["cache", "du"])
        .env("BANGER_LOG", "banger=loud")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("ignoring the log filter `banger=loud`"),
        "{stderr}"
    );
}
