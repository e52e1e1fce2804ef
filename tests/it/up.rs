//! `banger up` end to end, through the real binary and its daemon, on real Debian images
//! under QEMU (TCG where KVM does not work). Part of the slow group (`slow_up_*`); the VM's
//! console is in the failure messages.

use std::path::{Path, PathBuf};

use crate::slow::{debian_world, have_qemu, records};
use crate::support::{Output, TestContext, capable, find_program};

fn can_up() -> bool {
    have_qemu()
        && capable(
            "ssh and ssh-keygen (Debian package `openssh-client`)",
            find_program("ssh").is_some() && find_program("ssh-keygen").is_some(),
        )
}

/// Copies `tests/fixtures/NAME` into a directory of its own in `context`.
fn fixture(context: &TestContext, name: &str) -> PathBuf {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let to = context.root.path().join("projects").join(name);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&from)
        .arg(&to)
        .status()
        .unwrap();
    assert!(status.success());
    to
}

/// `banger ARGS` in `dir`.
fn banger(context: &TestContext, dir: &Path, args: &[&str]) -> Output {
    let output = context.command(args).current_dir(dir).output().unwrap();
    Output {
        code: output.status.code(),
        stdout: context.redact(&String::from_utf8_lossy(&output.stdout)),
        stderr: context.redact(&String::from_utf8_lossy(&output.stderr)),
    }
}

/// The console of the project's VM, for failure messages.
fn console(context: &TestContext, name: &str) -> String {
    let log = context
        .home()
        .join(".local/state/banger/vms")
        .join(name)
        .join("console.log");
    match std::fs::read_to_string(&log) {
        Ok(text) => format!("--- console of {name}\n{text}"),
        Err(error) => format!("--- no console of {name} ({error})"),
    }
}

/// The `up` record of a `--json up`.
fn up_record(output: &Output) -> serde_json::Value {
    records(
        &output
            .stdout
            .lines()
            .filter(|line| line.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .into_iter()
    .find(|record| record["type"] == "up")
    .unwrap_or_else(|| panic!("no up record:\n{output}"))["data"]
        .clone()
}

/// Image steps a `--json` run executed.
fn image_steps_run(output: &Output) -> Vec<String> {
    output
        .stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["type"] == "step_finished")
        .filter_map(|event| event["data"]["step"].as_str().map(str::to_owned))
        .filter(|step| step.starts_with("image:"))
        .collect()
}

fn vm_id(context: &TestContext, dir: &Path, name: &str) -> String {
    let shown = banger(context, dir, &["--json", "vm", "show", name]);
    assert_eq!(shown.code, Some(0), "{shown}");
    records(&shown.stdout)[0]["data"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Deletes the project's VM however the test ends.
struct Down<'a> {
    context: &'a TestContext,
    dir: PathBuf,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = banger(self.context, &self.dir, &["down", "--rm"]);
    }
}

#[test]
fn slow_up_builds_boots_runs_reuses_and_recreates_the_c_project() {
    if !can_up() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let dir = fixture(context, "c-project");
    let _down = Down {
        context,
        dir: dir.clone(),
    };

    // CI mode: build, boot, import, `make test`, delete.
    let first = banger(context, &dir, &["up", "--rm"]);
    assert_eq!(
        first.code,
        Some(0),
        "{first}\n{}",
        console(context, "c-project")
    );
    assert!(first.stdout.contains("all tests passed"), "{first}");
    let listed = banger(context, &dir, &["--json", "vm", "list"]);
    assert!(
        !listed.stdout.contains("\"c-project\""),
        "--rm left the VM: {listed}"
    );

    // A broken test: banger exits with make's code.
    let main = dir.join("src/main.c");
    let good = std::fs::read_to_string(&main).unwrap();
    std::fs::write(
        &main,
        good.replace("if (got != atoi(argv[3]))", "if (got == atoi(argv[3]))"),
    )
    .unwrap();
    let broken = banger(context, &dir, &["up", "--rm"]);
    assert_eq!(broken.code, Some(2), "make's exit code: {broken}");
    std::fs::write(&main, &good).unwrap();

    // Kept: a second up reuses the same VM and runs no image step.
    let kept = banger(context, &dir, &["--json", "up"]);
    assert_eq!(
        kept.code,
        Some(0),
        "{kept}\n{}",
        console(context, "c-project")
    );
    let id = vm_id(context, &dir, "c-project");
    let again = banger(context, &dir, &["--json", "up"]);
    assert_eq!(again.code, Some(0), "{again}");
    assert_eq!(up_record(&again)["action"], "reused", "{again}");
    assert_eq!(image_steps_run(&again), Vec::<String>::new(), "{again}");
    assert_eq!(vm_id(context, &dir, "c-project"), id);

    // A file under /root survives a recreation for a new image.
    let wrote = banger(
        context,
        &dir,
        &["ssh", "--", "sh", "-c", "echo kept > /root/kept"],
    );
    assert_eq!(wrote.code, Some(0), "{wrote}");
    let bangerfile = std::fs::read_to_string(dir.join("Bangerfile")).unwrap();
    std::fs::write(
        dir.join("Bangerfile"),
        bangerfile.replace(
            "[vm]",
            "[[image.provision]]\nrun = \"echo v2 > /etc/v2\"\n\n[vm]",
        ),
    )
    .unwrap();
    let recreated = banger(context, &dir, &["--json", "up", "--no-run"]);
    assert_eq!(recreated.code, Some(0), "{recreated}");
    assert_eq!(up_record(&recreated)["action"], "recreated", "{recreated}");
    let check = banger(
        context,
        &dir,
        &["ssh", "--", "cat", "/root/kept", "/etc/v2"],
    );
    assert_eq!(check.code, Some(0), "{check}");
    assert!(
        check.stdout.contains("kept") && check.stdout.contains("v2"),
        "{check}"
    );

    // Editing a workspace file runs no image step and the guest sees it.
    std::fs::write(dir.join("NOTES"), "fresh notes\n").unwrap();
    let edited = banger(context, &dir, &["--json", "up"]);
    assert_eq!(edited.code, Some(0), "{edited}");
    assert_eq!(image_steps_run(&edited), Vec::<String>::new(), "{edited}");
    let notes = banger(context, &dir, &["ssh", "--", "cat", "/root/project/NOTES"]);
    assert!(notes.stdout.contains("fresh notes"), "{notes}");

    // A stale lock under --locked: exit 1 naming it.
    let lock = dir.join("Bangerfile.lock");
    let text = std::fs::read_to_string(&lock).unwrap();
    std::fs::write(
        &lock,
        text.lines()
            .filter(|line| !line.starts_with("source_date_epoch"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let stale = banger(context, &dir, &["up", "--locked"]);
    assert_eq!(stale.code, Some(1), "{stale}");
    assert!(stale.stderr.contains("Bangerfile.lock"), "{stale}");
}

/// `git` in `dir`, which must succeed.
fn git(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=banger",
            "-c",
            "user.email=banger@example.invalid",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "git {args:?}: {output:?}");
}

#[test]
fn slow_up_imports_a_git_workspace_as_it_is_without_touching_the_index() {
    if !can_up() || !capable("git", find_program("git").is_some()) {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let dir = context.root.path().join("projects/git-workspace");
    std::fs::create_dir_all(&dir).unwrap();
    let _down = Down {
        context,
        dir: dir.clone(),
    };
    std::fs::write(
        dir.join("Bangerfile"),
        format!(
            "[project]\nname = \"git-workspace\"\n\n{C_PROJECT_PACKAGES}\n\
             [vm]\nvcpu = 1\nmemory = \"1G\"\n\n\
             [workspace]\n\n[up]\nrun = \"cat committed.txt staged.txt untracked.txt && \
             test ! -e ignored.txt && test -d .git && echo ignored-absent\"\n"
        ),
    )
    .unwrap();
    git(&dir, &["init", "-q"]);
    std::fs::write(dir.join(".gitignore"), "ignored.txt\n").unwrap();
    std::fs::write(dir.join("committed.txt"), "committed v1\n").unwrap();
    git(&dir, &["add", ".gitignore", "committed.txt", "Bangerfile"]);
    git(&dir, &["commit", "-q", "-m", "first"]);
    // A modified tracked file, a staged new file, an untracked file, an ignored file.
    std::fs::write(dir.join("committed.txt"), "committed v2, not committed\n").unwrap();
    std::fs::write(dir.join("staged.txt"), "staged\n").unwrap();
    git(&dir, &["add", "staged.txt"]);
    std::fs::write(dir.join("untracked.txt"), "untracked\n").unwrap();
    std::fs::write(dir.join("ignored.txt"), "ignored\n").unwrap();
    let index = dir.join(".git/index");
    let (bytes, mtime) = (
        std::fs::read(&index).unwrap(),
        std::fs::metadata(&index).unwrap().modified().unwrap(),
    );

    let up = banger(context, &dir, &["up"]);
    assert_eq!(
        up.code,
        Some(0),
        "{up}\n{}",
        console(context, "git-workspace")
    );
    for expected in [
        "committed v2, not committed",
        "staged",
        "untracked",
        "ignored-absent",
    ] {
        assert!(up.stdout.contains(expected), "{expected}: {up}");
    }
    assert_eq!(std::fs::read(&index).unwrap(), bytes, "the index changed");
    assert_eq!(
        std::fs::metadata(&index).unwrap().modified().unwrap(),
        mtime,
        "the index was rewritten"
    );

    // A second import of a 1,000-file tree after one edit sends that file only.
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    for index in 0..1000 {
        std::fs::write(
            tree.join(format!("file-{index:04}.txt")),
            format!("{index}\n"),
        )
        .unwrap();
    }
    let full = banger(context, &dir, &["--json", "up", "--no-run"]);
    assert_eq!(full.code, Some(0), "{full}");
    let full_bytes = up_record(&full)["workspace_bytes"].as_u64().unwrap();
    std::fs::write(tree.join("file-0500.txt"), "edited five hundred\n").unwrap();
    let one = banger(context, &dir, &["--json", "up", "--no-run"]);
    assert_eq!(one.code, Some(0), "{one}");
    let one_bytes = up_record(&one)["workspace_bytes"].as_u64().unwrap();
    assert_eq!(one_bytes, "edited five hundred\n".len() as u64, "{one}");
    assert!(full_bytes > 1000 * 2, "{full}");
    let seen = banger(
        context,
        &dir,
        &["ssh", "--", "cat", "/root/project/tree/file-0500.txt"],
    );
    assert!(seen.stdout.contains("edited five hundred"), "{seen}");

    // The guest's git sees the work tree as the host's does.
    // `--no-optional-locks`: a plain `git status` refreshes the index's stat data, which would
    // rewrite the index this test checks banger never touches.
    let host_status = git_stdout(
        &dir,
        &[
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=all",
        ],
    );
    let guest_status = banger(
        context,
        &dir,
        &[
            "ssh",
            "--",
            "sh",
            "-c",
            "cd /root/project && git status --porcelain --untracked-files=all",
        ],
    );
    assert_eq!(guest_status.code, Some(0), "{guest_status}");
    assert_eq!(guest_status.stdout, host_status, "{guest_status}");

    // Work in the guest (edits, a new text and binary file, a removal, a commit, an edit
    // after it) comes back as a patch that `git apply` turns the host's tree into the guest's.
    let work = "cd /root/project && echo 'guest edit' >> committed.txt && \
                printf 'new\\n' > guest-new.txt && head -c 3000 /dev/urandom > guest.bin && \
                rm untracked.txt && git add -A && \
                git -c user.name=g -c user.email=g@g commit -q -m 'in the guest' && \
                echo 'after the commit' >> staged.txt && echo ignored-in-guest > ignored.txt";
    let worked = banger(context, &dir, &["ssh", "--", "sh", "-c", work]);
    assert_eq!(worked.code, Some(0), "{worked}");
    let patch = context.root.path().join("workspace.patch");
    let exported = banger(
        context,
        &dir,
        &["workspace", "export", "--output", patch.to_str().unwrap()],
    );
    assert_eq!(exported.code, Some(0), "{exported}");
    let text = std::fs::read(&patch).unwrap();
    assert!(
        String::from_utf8_lossy(&text).contains("GIT binary patch"),
        "{exported}"
    );
    git(&dir, &["apply", patch.to_str().unwrap()]);
    let guest_files = banger(
        context,
        &dir,
        &[
            "ssh",
            "--",
            "sh",
            "-c",
            &format!("cd /root/project && {FILE_SUMS}"),
        ],
    );
    assert_eq!(guest_files.code, Some(0), "{guest_files}");
    let host_files = std::process::Command::new("sh")
        .args(["-c", FILE_SUMS])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&host_files.stdout),
        guest_files.stdout,
        "the patched host tree differs from the guest's"
    );
    assert!(guest_files.stdout.contains("guest.bin"), "{guest_files}");
    assert!(
        !guest_files.stdout.contains("untracked.txt"),
        "{guest_files}"
    );
    assert_eq!(std::fs::read(&index).unwrap(), bytes, "the index changed");
    assert_eq!(
        std::fs::metadata(&index).unwrap().modified().unwrap(),
        mtime,
        "the index was rewritten"
    );

    // Once the host has the guest's work, a new import leaves nothing to export.
    let again = banger(context, &dir, &["up", "--no-run"]);
    assert_eq!(again.code, Some(0), "{again}");
    let empty = banger(context, &dir, &["workspace", "export"]);
    assert_eq!(empty.code, Some(0), "{empty}");
    assert_eq!(empty.stdout, "", "{empty}");
}

/// The provision step of the c-project fixture (same text, so the same cached step), whose
/// packages include git for `banger workspace export`.
#[test]
fn slow_up_syncs_host_files_forwards_stdin_and_fresh_drops_the_work_disk() {
    if !can_up() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let root = context.root.path().join("sync-host");
    let dir = context.root.path().join("projects/sync");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(root.join("conf/sub")).unwrap();
    let _down = Down {
        context,
        dir: dir.clone(),
    };
    // Host files: one with a mode of its own, a directory tree, and the config's credential.
    std::fs::write(root.join("secret.txt"), "s3cret\n").unwrap();
    std::fs::write(root.join("conf/a"), "conf a\n").unwrap();
    std::fs::write(root.join("conf/sub/b"), "conf b\n").unwrap();
    std::fs::write(root.join("gitconfig"), "[user]\n\tname = synced\n").unwrap();
    let config = root.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[file_sync]]\nhost = \"{}\"\nguest = \"/root/.gitconfig\"\n",
            root.join("gitconfig").display()
        ),
    )
    .unwrap();
    let missing = root.join("not-there");
    std::fs::write(
        dir.join("Bangerfile"),
        format!(
            "[project]\nname = \"sync\"\n\n{C_PROJECT_PACKAGES}\n\
             [vm]\nvcpu = 1\nmemory = \"1G\"\n\n\
             [[file_sync]]\nhost = \"{secret}\"\nguest = \"/root/.secret\"\nmode = \"0600\"\n\n\
             [[file_sync]]\nhost = \"{conf}\"\nguest = \"/etc/conf-sync\"\n\n\
             [[file_sync]]\nhost = \"{missing}\"\nguest = \"/root/missing\"\n\n\
             [up]\nrun = \"cat > /root/stdin.txt && stat -c %a /root/.secret && \
             cat /root/.secret /etc/conf-sync/a /etc/conf-sync/sub/b /root/.gitconfig\"\n",
            secret = root.join("secret.txt").display(),
            conf = root.join("conf").display(),
            missing = missing.display(),
        ),
    )
    .unwrap();
    let up = |args: &[&str], stdin: &[u8]| {
        use std::io::Write;
        let mut child = context
            .command(args)
            .current_dir(&dir)
            .env("BANGER_CONFIG", &config)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let output = child.wait_with_output().unwrap();
        Output {
            code: output.status.code(),
            stdout: context.redact(&String::from_utf8_lossy(&output.stdout)),
            stderr: context.redact(&String::from_utf8_lossy(&output.stderr)),
        }
    };
    let first = up(&["up"], b"piped input\n");
    assert_eq!(first.code, Some(0), "{first}\n{}", console(context, "sync"));
    assert_eq!(
        first.stdout, "600\ns3cret\nconf a\nconf b\n[user]\n\tname = synced\n",
        "{first}"
    );
    assert!(
        first.stderr.contains(&format!(
            "warning vm/file-sync: {} does not exist; not synced",
            context.redact(&missing.display().to_string())
        )),
        "{first}"
    );
    let stdin = banger(context, &dir, &["ssh", "--", "cat", "/root/stdin.txt"]);
    assert_eq!(stdin.stdout, "piped input\n", "{stdin}");

    // A changed host file is synced again at the next boot; --fresh also drops the work disk.
    std::fs::write(root.join("secret.txt"), "rotated\n").unwrap();
    let fresh = up(&["--json", "up", "--fresh", "--no-run"], b"");
    assert_eq!(fresh.code, Some(0), "{fresh}\n{}", console(context, "sync"));
    assert_eq!(up_record(&fresh)["action"], "replaced", "{fresh}");
    let after = banger(
        context,
        &dir,
        &[
            "ssh",
            "--",
            "sh",
            "-c",
            "cat /root/.secret; test -e /root/stdin.txt || echo gone",
        ],
    );
    assert_eq!(after.stdout, "rotated\ngone\n", "{after}");
}

const C_PROJECT_PACKAGES: &str = "[[image.provision]]\n\
    run = \"apt-get update && apt-get install -y --no-install-recommends make gcc libc6-dev git\"\n\
    env = { DEBIAN_FRONTEND = \"noninteractive\" }\n";

/// Every workspace file but `.git` and the ignored file, with its checksum, sorted.
const FILE_SUMS: &str = "find . -path ./.git -prune -o -type f ! -name ignored.txt -print | \
                         LC_ALL=C sort | xargs sha256sum";

/// `git ARGS` in `dir`, its stdout.
fn git_stdout(dir: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "git {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn slow_up_applies_network_none_and_a_network_change_recreates_the_vm() {
    if !can_up() {
        return;
    }
    let Some(world) = debian_world() else {
        return;
    };
    let context = &world.context;
    let dir = context.root.path().join("projects/sealed-up");
    std::fs::create_dir_all(&dir).unwrap();
    let _down = Down {
        context,
        dir: dir.clone(),
    };
    let bangerfile = |network: &str| {
        format!(
            "[project]\nname = \"sealed-up\"\n\n[vm]\nvcpu = 1\nmemory = \"1G\"\n\
             network = \"{network}\"\n\n[workspace]\n\n[up]\nrun = \"ls /sys/class/net\"\n"
        )
    };
    std::fs::write(dir.join("Bangerfile"), bangerfile("none")).unwrap();
    let up = banger(context, &dir, &["up"]);
    assert_eq!(up.code, Some(0), "{up}\n{}", console(context, "sealed-up"));
    // The workspace import and the up command went through the agent; the guest has only lo.
    assert_eq!(
        up.stdout.split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "{up}"
    );
    let shown = banger(context, &dir, &["--json", "vm", "show", "sealed-up"]);
    assert_eq!(
        records(&shown.stdout)[0]["data"]["network"],
        "none",
        "{shown}"
    );
    let ssh = banger(context, &dir, &["ssh", "--", "true"]);
    assert_eq!(ssh.code, Some(1), "{ssh}");
    assert!(
        ssh.stderr
            .contains("VM `sealed-up` has no network (network mode `none`)"),
        "{ssh}"
    );

    // The network is part of what `up` compares: changing it recreates the VM, and then
    // the VM is reused as it is.
    std::fs::write(dir.join("Bangerfile"), bangerfile("user")).unwrap();
    let recreated = banger(context, &dir, &["--json", "up"]);
    assert_eq!(
        recreated.code,
        Some(0),
        "{recreated}\n{}",
        console(context, "sealed-up")
    );
    assert_eq!(up_record(&recreated)["action"], "recreated", "{recreated}");
    assert!(
        recreated.stdout.contains("network none -> user"),
        "{recreated}"
    );
    // With --json the command's output is on stderr.
    assert!(recreated.stderr.contains("eth0"), "{recreated}");
    let again = banger(context, &dir, &["--json", "up", "--no-run"]);
    assert_eq!(again.code, Some(0), "{again}");
    assert_eq!(up_record(&again)["action"], "reused", "{again}");
    let ssh = banger(context, &dir, &["ssh", "--", "echo", "reachable"]);
    assert_eq!(ssh.code, Some(0), "{ssh}");
    assert!(ssh.stdout.contains("reachable"), "{ssh}");
    // (`network = "tap"` makes a bridge: tests/it/network.rs does that, in namespaces of its
    // own, never here in the host's.)
}
