//! The agent in a root filesystem with nothing but a static busybox in it, entered with
//! `chroot`, no VM: the real agent binary (the bytes banger embeds) serves the guest protocol
//! there with no C library anywhere, and `banger-agent first-boot` picks the image's package
//! manager from `/etc/os-release` and installs the OpenSSH server through it (fake package
//! managers here: shell scripts that log their arguments and create an `sshd`).
//!
//! Needs root (for `chroot` and device nodes) and a statically linked `/bin/busybox`
//! (Debian's `busybox-static`); skipped without them unless `BANGER_TEST_REQUIRE_ALL=1`.
//! The agent needs no `/proc` to serve or run commands, so nothing is mounted: every file a
//! test creates lives in its temp directory, and a guard kills the chrooted agent on every
//! path out of the test, panics included.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use banger::guest::{ExecRequest, ExitStatus, GuestChannel};

use crate::support::capable;

const BUSYBOX: &str = "/bin/busybox";
/// Where the agent binary sits inside the test roots.
const AGENT_IN_ROOT: &str = "/banger-agent";
/// `firstboot.rs`: written last, once first boot succeeded.
const MARKER: &str = "var/lib/banger/first-boot.done";
/// `PATH` inside the roots, so the host's does not matter.
const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Root and a statically linked busybox, or skip.
fn can_chroot_busybox() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let busybox = std::fs::read(BUSYBOX).is_ok_and(|elf| is_static_elf(&elf));
    capable(
        "root and a statically linked /bin/busybox (busybox-static)",
        root && busybox,
    )
}

/// An x86_64 ELF that asks for no dynamic loader (no PT_INTERP program header).
fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let phentsize = usize::from(u16::from_le_bytes([elf[54], elf[55]]));
    let phnum = usize::from(u16::from_le_bytes([elf[56], elf[57]]));
    (0..phnum).all(|index| {
        let start = phoff + index * phentsize;
        elf.get(start..start + 4)
            .is_some_and(|kind| u32::from_le_bytes(kind.try_into().unwrap()) != PT_INTERP)
    })
}

/// A root filesystem holding only busybox, its applet links, a few device nodes and the
/// agent at `/banger-agent`. Removed on drop.
struct BusyboxRoot {
    dir: tempfile::TempDir,
}

impl BusyboxRoot {
    fn new() -> BusyboxRoot {
        let dir = tempfile::tempdir().unwrap();
        let root = BusyboxRoot { dir };
        for directory in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "dev"] {
            std::fs::create_dir_all(root.path().join(directory)).unwrap();
        }
        let tmp = root.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::copy(BUSYBOX, root.path().join("bin/busybox")).unwrap();
        let applets = Command::new(BUSYBOX).arg("--list-full").output().unwrap();
        assert!(applets.status.success(), "busybox --list-full: {applets:?}");
        for applet in String::from_utf8(applets.stdout).unwrap().lines() {
            let applet = applet.trim().trim_start_matches('/');
            if applet.is_empty() || applet == "bin/busybox" {
                continue;
            }
            // Relative, so that following one from the host stays inside the root.
            let depth = applet.matches('/').count();
            let target = format!("{}bin/busybox", "../".repeat(depth));
            let link = root.path().join(applet);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(&target, &link).unwrap();
            }
        }
        // What a guest's devtmpfs would have: commands' stdin is /dev/null, and first boot
        // reads /dev/urandom for a machine id.
        for (name, minor) in [("null", 3), ("urandom", 9)] {
            nix::sys::stat::mknod(
                &root.path().join("dev").join(name),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, minor),
            )
            .unwrap();
        }
        let agent = root.host_path(AGENT_IN_ROOT);
        if std::fs::hard_link(crate::support::agent_binary(), &agent).is_err() {
            std::fs::copy(crate::support::agent_binary(), &agent).unwrap();
        }
        root.assert_no_libc();
        root
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `guest_path` (absolute inside the root) as seen from the host.
    fn host_path(&self, guest_path: &str) -> PathBuf {
        self.path().join(guest_path.trim_start_matches('/'))
    }

    /// Writes a file at `guest_path`, replacing whatever (busybox link included) was there.
    fn write(&self, guest_path: &str, contents: &str, mode: u32) {
        let path = self.host_path(guest_path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => panic!("cannot replace {path:?}: {error}"),
        }
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn read(&self, guest_path: &str) -> String {
        std::fs::read_to_string(self.host_path(guest_path))
            .unwrap_or_else(|error| panic!("cannot read {guest_path} in the root: {error}"))
    }

    fn exists(&self, guest_path: &str) -> bool {
        std::fs::symlink_metadata(self.host_path(guest_path)).is_ok()
    }

    /// No C library and no dynamic loader anywhere in the root.
    fn assert_no_libc(&self) {
        let mut pending = vec![self.path().to_owned()];
        let mut regular_files = 0;
        while let Some(directory) = pending.pop() {
            for entry in std::fs::read_dir(&directory).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                assert!(
                    !name.starts_with("libc.so") && !name.starts_with("ld-linux"),
                    "the busybox root holds {:?}",
                    entry.path()
                );
                let kind = entry.file_type().unwrap();
                if kind.is_dir() {
                    pending.push(entry.path());
                } else if kind.is_file() {
                    regular_files += 1;
                } else {
                    assert!(kind.is_symlink() || kind.is_char_device(), "{entry:?}");
                }
            }
        }
        assert_eq!(regular_files, 2, "only busybox and the agent are files");
    }

    /// `/etc/os-release` with these lines.
    fn os_release(&self, text: &str) {
        self.write("/etc/os-release", text, 0o644);
    }

    /// `chroot ROOT /banger-agent ARGS…` to completion, with a clean environment.
    fn run_agent(&self, arguments: &[&str]) -> Output {
        retry_text_file_busy(|| {
            Command::new("chroot")
                .arg(self.path())
                .arg(AGENT_IN_ROOT)
                .args(arguments)
                .env_clear()
                .env("PATH", ROOT_PATH)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
    }
}

/// Runs `attempt` again while it fails with ETXTBSY: an executable just written in one test
/// is still open for writing in a child another test thread forked but has not exec'd yet.
fn retry_text_file_busy(mut attempt: impl FnMut() -> Output) -> Output {
    let mut tries = 0;
    loop {
        let output = attempt();
        let busy = String::from_utf8_lossy(&output.stderr).contains("Text file busy");
        if output.status.success() || !busy || tries == 50 {
            return output;
        }
        tries += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `chroot ROOT /banger-agent --listen-unix /agent.sock`, killed on drop (the root after it).
struct ChrootedAgent {
    child: Child,
    root: BusyboxRoot,
}

impl ChrootedAgent {
    fn start(mut root: BusyboxRoot) -> ChrootedAgent {
        let socket = root.host_path("/agent.sock");
        let log_path = root.host_path("/agent.log");
        let mut attempts = 0;
        loop {
            let log = std::fs::File::create(&log_path).unwrap();
            let child = Command::new("chroot")
                .arg(root.path())
                .args([AGENT_IN_ROOT, "--listen-unix", "/agent.sock"])
                .env_clear()
                .env("PATH", ROOT_PATH)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            // From here on the guard kills it, whatever happens.
            let mut agent = ChrootedAgent { child, root };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if socket.exists() {
                    return agent;
                }
                if let Some(status) = agent.child.try_wait().unwrap() {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if log.contains("Text file busy") && attempts < 50 {
                        break;
                    }
                    panic!("the chrooted agent exited ({status}) before listening:\n{log}");
                }
                assert!(
                    Instant::now() < deadline,
                    "the chrooted agent never created {socket:?}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            attempts += 1;
            std::thread::sleep(Duration::from_millis(20));
            root = agent.take_root();
        }
    }

    /// Ends this agent (it has exited already) and hands back its root for another try.
    fn take_root(mut self) -> BusyboxRoot {
        let _ = self.child.wait();
        let placeholder = BusyboxRoot {
            dir: tempfile::tempdir().unwrap(),
        };
        std::mem::replace(&mut self.root, placeholder)
    }

    async fn channel(&self) -> GuestChannel {
        crate::support::connect_agent(&self.root.host_path("/agent.sock")).await
    }
}

impl Drop for ChrootedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn host_kernel_release() -> String {
    nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned()
}

async fn run(channel: &mut GuestChannel, request: ExecRequest) -> (ExitStatus, String, String) {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = channel
        .exec(&request, &b""[..], &mut stdout, &mut stderr)
        .await
        .unwrap();
    (
        status,
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[tokio::test]
async fn firstboot_the_agent_serves_and_runs_commands_in_a_root_with_no_libc() {
    if !can_chroot_busybox() {
        return;
    }
    let agent = ChrootedAgent::start(BusyboxRoot::new());
    let mut channel = agent.channel().await;
    let ready = channel.hello().await.unwrap();
    assert_eq!(ready.kernel_release, host_kernel_release());
    assert!(!ready.pid1);

    let (status, stdout, stderr) = run(&mut channel, ExecRequest::argv(["uname", "-r"])).await;
    assert_eq!(status, ExitStatus::Code(0), "stderr: {stderr}");
    assert_eq!(stdout.trim(), host_kernel_release());

    let (status, ..) = run(&mut channel, ExecRequest::argv(["sh", "-c", "exit 7"])).await;
    assert_eq!(status, ExitStatus::Code(7));

    // The commands really ran inside the root: its busybox is the only `ls` there.
    let (status, stdout, _) = run(&mut channel, ExecRequest::argv(["ls", "/"])).await;
    assert_eq!(status, ExitStatus::Code(0));
    assert!(stdout.contains("banger-agent"), "{stdout}");
}

/// A fake package manager: appends `PREFIX<its arguments>` to `log`, and on `install_word`
/// (or always, if empty) creates `/usr/sbin/sshd`.
fn fake_manager(log: &str, prefix: &str, install_word: &str) -> String {
    let create = "mkdir -p /usr/sbin && printf '#!/bin/sh\\nexit 0\\n' > /usr/sbin/sshd && \
                  chmod 755 /usr/sbin/sshd";
    let install = if install_word.is_empty() {
        create.to_owned()
    } else {
        format!("case \"$1\" in {install_word}) {create} ;; esac")
    };
    format!("#!/bin/sh\necho \"{prefix}$*\" >> {log}\n{install}\n")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn firstboot_on_alpine_installs_openssh_with_apk() {
    if !can_chroot_busybox() {
        return;
    }
    let root = BusyboxRoot::new();
    root.os_release("NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.20.0\n");
    root.write("/sbin/apk", &fake_manager("/apk.log", "", ""), 0o755);
    assert!(!root.exists("/usr/sbin/sshd"));

    let output = root.run_agent(&["first-boot"]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(root.read("/apk.log"), "add --no-cache openssh-server\n");
    assert!(root.exists("/usr/sbin/sshd"));
    assert!(root.exists(MARKER), "no first-boot marker");
    let machine_id = root.read("/etc/machine-id");
    assert_eq!(machine_id.trim().len(), 32, "{machine_id:?}");
    assert!(machine_id.trim().chars().all(|c| c.is_ascii_hexdigit()));

    // With sshd there, the package manager is left alone.
    std::fs::remove_file(root.host_path("/apk.log")).unwrap();
    let output = root.run_agent(&["first-boot"]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(!root.exists("/apk.log"), "apk ran although sshd exists");
}

#[test]
fn firstboot_follows_id_like_to_apt_get_when_the_id_is_unknown() {
    if !can_chroot_busybox() {
        return;
    }
    let root = BusyboxRoot::new();
    root.os_release("ID=someos\nID_LIKE=\"debian\"\n");
    root.write(
        "/usr/bin/apt-get",
        &fake_manager(
            "/apt-get.log",
            "DEBIAN_FRONTEND=$DEBIAN_FRONTEND ",
            "install",
        ),
        0o755,
    );

    let output = root.run_agent(&["first-boot"]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        root.read("/apt-get.log"),
        "DEBIAN_FRONTEND=noninteractive update\n\
         DEBIAN_FRONTEND=noninteractive install -y --no-install-recommends openssh-server\n"
    );
    assert!(root.exists("/usr/sbin/sshd"));
    assert!(root.exists(MARKER), "no first-boot marker");
}

#[test]
fn firstboot_refuses_an_unknown_distribution_by_name() {
    if !can_chroot_busybox() {
        return;
    }
    let root = BusyboxRoot::new();
    root.os_release("NAME=\"Plan 9\"\nID=plan9\n");
    root.write("/sbin/apk", &fake_manager("/apk.log", "", ""), 0o755);

    let output = root.run_agent(&["first-boot"]);
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "{stderr}");
    assert_ne!(output.status.code(), Some(0));
    assert!(stderr.contains("ID=plan9"), "{stderr}");
    assert!(stderr.contains("no ID_LIKE"), "{stderr}");
    assert!(stderr.contains("alpine (apk)"), "{stderr}");
    assert!(!root.exists("/apk.log"), "a package manager ran");
    assert!(!root.exists(MARKER), "a failed first boot left its marker");
}

#[test]
fn firstboot_reports_a_failing_package_manager_with_its_stderr() {
    if !can_chroot_busybox() {
        return;
    }
    let root = BusyboxRoot::new();
    root.os_release("ID=alpine\n");
    root.write(
        "/sbin/apk",
        "#!/bin/sh\necho fetching >&2\necho 'ERROR: unable to select packages' >&2\nexit 3\n",
        0o755,
    );

    let output = root.run_agent(&["first-boot"]);
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("`apk add --no-cache openssh-server` failed"),
        "{stderr}"
    );
    assert!(stderr.contains("exit status: 3"), "{stderr}");
    assert!(
        stderr.contains("fetching\nERROR: unable to select packages"),
        "{stderr}"
    );
    assert!(!root.exists(MARKER), "a failed first boot left its marker");
}
