//! `banger-agent settle` and `banger-agent reidentify`: the guest's side of memory snapshots.
//!
//! banger saves a booted, idle guest's memory once per (image, kernel, shape) and starts later
//! VMs by restoring it instead of booting. Two moments need the guest's help:
//!
//! 1. **Before the save, `settle`**: waits until the boot has finished (systemd's
//!    `is-system-running --wait` where systemd runs, and banger's first-boot marker where the
//!    root is writable), then syncs, so a restored guest is up at once and starts with its
//!    first boot done.
//! 2. **After each restore, `reidentify`**: every restored VM starts as an exact copy of the
//!    saved one, so it is made a new instance. A JSON request on stdin
//!    ([`Request`]: the host's time, a random seed, a MAC) drives these steps, in order:
//!    - the clock is set to the host's time (the saved guest's clock stopped at the save);
//!    - the seed is added to the kernel's entropy pool, credited, and the random number
//!      generator is reseeded at once (`RNDADDENTROPY`, `RNDRESEEDCRNG`): two copies of
//!      one kernel state would otherwise draw the same "random" bytes;
//!    - the first network interface takes the MAC;
//!    - with `ip`, the interface moves from the saved boot's address (its `ip=`) to the VM's
//!      own, its default route is replaced, and `/etc/resolv.conf` names the new resolver;
//!    - a new machine id replaces the saved one (where the image has one);
//!    - every SSH host key is replaced: by the pair of its type in the request (the host
//!      makes them: `ssh-keygen` here costs about 0.4 s under TCG), else by `ssh-keygen`;
//!      a running `sshd` is told to reload them (SIGHUP to the pid in `/run/sshd.pid`).
//!
//!    Every step is tried; the command fails naming each step that failed.
//!
//! `unsafe` here is two `ioctl`s on `/dev/urandom` that nix has no wrapper for.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::libc;
use serde::Deserialize;

use crate::exec::DEFAULT_PATH;

/// What the host sends `reidentify` on stdin.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct Request {
    /// The host's wall-clock time, nanoseconds since the Unix epoch.
    pub time_ns: u128,
    /// Random bytes from the host, as hex (at least 32 bytes).
    pub seed: String,
    /// The new MAC of the first network interface, `aa:bb:cc:dd:ee:ff`.
    #[serde(default)]
    pub mac: Option<String>,
    /// The VM's own static address, as the value of an `ip=` word (a VM on banger's bridge:
    /// the saved guest has the address of the VM it was saved from).
    #[serde(default)]
    pub ip: Option<String>,
    /// The VM's name, as its hostname ([`set_hostname`]): the saved guest has the name of
    /// the VM it was saved from.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New host keys made by the host, by type (`ed25519`); a type the guest has and this
    /// lacks is made here with `ssh-keygen`.
    #[serde(default)]
    pub host_keys: std::collections::BTreeMap<String, HostKey>,
}

/// One SSH host key pair, as OpenSSH writes its two files.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct HostKey {
    pub private: String,
    pub public: String,
}

/// The least seed `reidentify` accepts: 256 bits, what the kernel's generator is keyed with.
const MIN_SEED_BYTES: usize = 32;

/// Where OpenSSH keeps its host keys.
const SSH_DIR: &str = "/etc/ssh";

/// `banger-agent settle [--timeout SECONDS]`.
pub fn settle_command(arguments: &[String]) -> Result<(), String> {
    let timeout = match arguments {
        [] => Duration::from_secs(60),
        [flag, seconds] if flag == "--timeout" => Duration::from_secs(
            seconds
                .parse()
                .map_err(|_| format!("--timeout takes whole seconds, not `{seconds}`"))?,
        ),
        _ => return Err("usage: banger-agent settle [--timeout SECONDS]".into()),
    };
    settle(Instant::now() + timeout)
}

fn settle(deadline: Instant) -> Result<(), String> {
    if Path::new("/run/systemd/system").exists()
        && let Some(systemctl) = find_program("systemctl")
    {
        // `degraded` (some unit failed) is as settled as `running`: only the wait matters.
        let mut child = Command::new(systemctl)
            .args(["is-system-running", "--wait"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("cannot run systemctl: {error}"))?;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("systemd did not finish booting in time".into());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(error) => return Err(format!("cannot wait for systemctl: {error}")),
            }
        }
    }
    if first_boot_expected() {
        let marker = Path::new(crate::firstboot::MARKER);
        while !marker.exists() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "first boot did not finish in time ({} is missing)",
                    marker.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    nix::unistd::sync();
    Ok(())
}

/// Whether this boot runs banger's first boot: its root takes writes (a read-only root never
/// gets the marker) and it has sshd or a systemd unit that makes keys.
fn first_boot_expected() -> bool {
    nix::unistd::access("/var/lib", nix::unistd::AccessFlags::W_OK).is_ok()
        && (Path::new("/etc/systemd/system/banger-first-boot.service").exists()
            || !Path::new("/run/systemd/system").exists())
}

/// `banger-agent reidentify`: the request comes on stdin.
pub fn reidentify_command(arguments: &[String]) -> Result<(), String> {
    if !arguments.is_empty() {
        return Err("usage: banger-agent reidentify < REQUEST.json".into());
    }
    let mut text = String::new();
    std::io::stdin()
        .take(64 * 1024)
        .read_to_string(&mut text)
        .map_err(|error| format!("cannot read the request on stdin: {error}"))?;
    let request = parse_request(&text)?;
    reidentify(&request)
}

/// The request, checked: a seed too short or not hex, or a malformed MAC, is refused.
pub fn parse_request(text: &str) -> Result<Request, String> {
    let request: Request =
        serde_json::from_str(text).map_err(|error| format!("bad request: {error}"))?;
    let seed = decode_hex(&request.seed).ok_or("bad request: the seed is not hex")?;
    if seed.len() < MIN_SEED_BYTES {
        return Err(format!(
            "bad request: the seed is {} bytes, at least {MIN_SEED_BYTES} are needed",
            seed.len()
        ));
    }
    if let Some(mac) = &request.mac {
        parse_mac(mac).ok_or_else(|| format!("bad request: `{mac}` is not a MAC address"))?;
    }
    if let Some(ip) = &request.ip {
        static_address(ip)?;
    }
    if let Some(name) = &request.hostname {
        check_hostname(name).map_err(|error| format!("bad request: {error}"))?;
    }
    Ok(request)
}

fn reidentify(request: &Request) -> Result<(), String> {
    let mut failures = Vec::new();
    let mut attempt = |what: &str, result: Result<(), String>| {
        if let Err(error) = result {
            failures.push(format!("{what}: {error}"));
        }
    };
    attempt("clock", set_clock(request.time_ns));
    let seed = decode_hex(&request.seed).unwrap_or_default();
    attempt("entropy", reseed(&seed));
    if let Some(mac) = request.mac.as_deref().and_then(parse_mac) {
        attempt("MAC", set_first_mac(mac));
    }
    if let Some(ip) = request.ip.as_deref() {
        attempt("network address", readdress(ip));
    }
    if let Some(name) = request.hostname.as_deref() {
        attempt("hostname", set_hostname(name, Path::new("/etc")));
    }
    attempt("machine id", new_machine_id());
    attempt("SSH host keys", new_host_keys(&request.host_keys));
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

fn set_clock(time_ns: u128) -> Result<(), String> {
    let seconds = i64::try_from(time_ns / 1_000_000_000).map_err(|_| "time out of range")?;
    let nanoseconds = (time_ns % 1_000_000_000) as i64;
    let time = nix::sys::time::TimeSpec::new(seconds, nanoseconds);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, time)
        .map_err(|errno| format!("cannot set the time: {errno}"))
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])` (asm-generic encoding, x86-64 and arm64).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn reseed(seed: &[u8]) -> Result<(), String> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|error| format!("cannot open /dev/urandom: {error}"))?;
    let count = libc::c_int::try_from(seed.len()).map_err(|_| "seed too long")?;
    // `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`, bits credited.
    let mut pool = Vec::with_capacity(8 + seed.len());
    pool.extend_from_slice(&(count * 8).to_ne_bytes());
    pool.extend_from_slice(&count.to_ne_bytes());
    pool.extend_from_slice(seed);
    #[allow(unsafe_code)]
    // SAFETY: `pool` is a complete `rand_pool_info` whose `buf_size` matches the bytes after
    // the header; the kernel only reads it, and it outlives the call.
    let added = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, pool.as_ptr()) };
    if added != 0 {
        return Err(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        ));
    }
    #[allow(unsafe_code)]
    // SAFETY: `RNDRESEEDCRNG` takes no argument and touches no memory of ours.
    let reseeded = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) };
    if reseeded != 0 {
        return Err(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn set_first_mac(mac: [u8; 6]) -> Result<(), String> {
    match crate::net::first_interface() {
        Some(name) => crate::net::set_mac(&name, mac),
        None => Ok(()),
    }
}

/// The static address of an `ip=` value; anything else (`dhcp`, a malformed one) is refused.
fn static_address(ip: &str) -> Result<crate::cmdline::IpConfig, String> {
    match crate::cmdline::IpConfig::parse(ip) {
        Ok(Some(config)) => Ok(config),
        Ok(None) => Err(format!("bad request: ip `{ip}` names no static address")),
        Err(error) => Err(format!("bad request: {error}")),
    }
}

/// Moves the interface from the address the saved boot's `ip=` gave it to `ip`'s.
fn readdress(ip: &str) -> Result<(), String> {
    let new = static_address(ip)?;
    let booted = std::fs::read_to_string("/proc/cmdline")
        .ok()
        .and_then(|text| {
            let cmdline = crate::cmdline::Cmdline::parse(&text);
            crate::cmdline::IpConfig::parse(cmdline.value("ip")?).ok()?
        });
    let interface = crate::net::readdress(booted.as_ref(), &new)?;
    // The host checks for this line: an agent without `ip` would leave the address alone.
    println!("address {}/{} on {interface}", new.address, new.prefix_len);
    if !new.dns.is_empty() {
        crate::net::replace_resolv_conf(Path::new("/etc/resolv.conf"), &new.dns)
            .map_err(|error| format!("cannot write /etc/resolv.conf: {error}"))?;
    }
    Ok(())
}

/// The longest hostname Linux keeps (`HOST_NAME_MAX`), and a DNS label's limit.
const HOSTNAME_MAX: usize = 63;

/// A hostname banger sets: one DNS label, letters, digits and inner hyphens.
pub fn check_hostname(name: &str) -> Result<(), String> {
    let fits = !name.is_empty()
        && name.len() <= HOSTNAME_MAX
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if fits {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a hostname (1-{HOSTNAME_MAX} letters, digits and inner hyphens)"
        ))
    }
}

/// Makes `name` the machine's hostname: the kernel's, `ETC/hostname`, and the `127.0.1.1`
/// line of `ETC/hosts` (Debian's convention), so the name resolves without DNS and tools
/// that look themselves up (`sudo`, Java) do not wait on a resolver. The files are written
/// only when they differ; a read-only `/etc` fails after the kernel's name is set.
pub fn set_hostname(name: &str, etc: &Path) -> Result<(), String> {
    check_hostname(name)?;
    nix::unistd::sethostname(name).map_err(|errno| format!("cannot set the hostname: {errno}"))?;
    write_hostname_files(name, etc)
}

fn write_hostname_files(name: &str, etc: &Path) -> Result<(), String> {
    let hostname = etc.join("hostname");
    let wanted = format!("{name}\n");
    if std::fs::read_to_string(&hostname).ok().as_deref() != Some(wanted.as_str()) {
        replace_file(&hostname, &wanted)?;
    }
    let hosts = etc.join("hosts");
    let current = std::fs::read_to_string(&hosts).unwrap_or_default();
    let updated = hosts_naming(&current, name);
    if updated != current {
        replace_file(&hosts, &updated)?;
    }
    Ok(())
}

/// `hosts` (an `/etc/hosts`) with one `127.0.1.1` line, for `name`, after the `127.0.0.1`
/// line (at the top without one); other lines as they were.
pub fn hosts_naming(hosts: &str, name: &str) -> String {
    let own = format!("127.0.1.1\t{name}");
    let mut lines: Vec<&str> = hosts
        .lines()
        .filter(|line| line.split_whitespace().next() != Some("127.0.1.1"))
        .collect();
    let at = lines
        .iter()
        .position(|line| line.split_whitespace().next() == Some("127.0.0.1"))
        .map_or(0, |loopback| loopback + 1);
    lines.insert(at, &own);
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// Replaces `path` with `contents` through a file beside it (mode 0644).
fn replace_file(path: &Path, contents: &str) -> Result<(), String> {
    let temporary = path.with_extension("banger-new");
    std::fs::write(&temporary, contents)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|error| {
            let _ = std::fs::remove_file(&temporary);
            format!("cannot write {}: {error}", path.display())
        })
}

fn new_machine_id() -> Result<(), String> {
    let path = Path::new("/etc/machine-id");
    let current = std::fs::read_to_string(path).unwrap_or_default();
    if current.trim().is_empty() {
        return Ok(());
    }
    let id = crate::firstboot::random_machine_id()?;
    replace_file(path, &format!("{id}\n"))
}

/// The host key files (private halves) in [`SSH_DIR`], with their key types.
fn host_keys(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut keys: Vec<_> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let kind = key_type(&name)?;
            Some((entry.path(), kind.to_owned()))
        })
        .collect();
    keys.sort();
    keys
}

/// `ssh_host_ed25519_key` → `ed25519`; public halves and other files → `None`.
pub fn key_type(file_name: &str) -> Option<&str> {
    file_name
        .strip_prefix("ssh_host_")?
        .strip_suffix("_key")
        .filter(|kind| !kind.is_empty())
}

fn new_host_keys(given: &std::collections::BTreeMap<String, HostKey>) -> Result<(), String> {
    let keys = host_keys(Path::new(SSH_DIR));
    if keys.is_empty() {
        return Ok(());
    }
    for (path, kind) in &keys {
        let public = path.with_extension("pub");
        if let Some(key) = given.get(kind) {
            write_key_file(&public, &format!("{}\n", key.public.trim()), 0o644)?;
            write_key_file(path, &key.private, 0o600)?;
            continue;
        }
        let keygen = find_program("ssh-keygen").ok_or("ssh-keygen is missing")?;
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(&public);
        let output = Command::new(&keygen)
            .args(["-q", "-t", kind, "-N", "", "-f"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("cannot run ssh-keygen: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "`ssh-keygen -t {kind} -f {}` failed ({}): {}",
                path.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    reload_sshd();
    Ok(())
}

/// Replaces `path` with `contents` (mode `mode` from the start), through a file beside it.
fn write_key_file(path: &Path, contents: &str, mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("banger-new");
    let _ = std::fs::remove_file(&temporary);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|error| {
            let _ = std::fs::remove_file(&temporary);
            format!("cannot write {}: {error}", path.display())
        })
}

/// SIGHUP makes a listening `sshd` re-execute itself and read its host keys again; an sshd
/// not started yet reads the new keys when it starts.
fn reload_sshd() {
    let Ok(text) = std::fs::read_to_string("/run/sshd.pid") else {
        return;
    };
    if let Ok(pid) = text.trim().parse::<i32>()
        && pid > 1
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        );
    }
}

fn find_program(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    crate::exec::resolve_program(name, &path)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

/// `aa:bb:cc:dd:ee:ff` → bytes; a multicast MAC (low bit of the first byte) is refused.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn requests_are_checked() {
        let good = format!(
            r#"{{"time_ns": 1700000000000000000, "seed": "{SEED}", "mac": "06:00:0a:0b:0c:0d"}}"#
        );
        let request = parse_request(&good).unwrap();
        assert_eq!(request.time_ns, 1_700_000_000_000_000_000);
        assert_eq!(request.mac.as_deref(), Some("06:00:0a:0b:0c:0d"));
        let short = r#"{"time_ns": 1, "seed": "0011"}"#;
        assert_eq!(
            parse_request(short).unwrap_err(),
            "bad request: the seed is 2 bytes, at least 32 are needed"
        );
        let not_hex = format!(r#"{{"time_ns": 1, "seed": "zz{}"}}"#, &SEED[2..]);
        assert_eq!(
            parse_request(&not_hex).unwrap_err(),
            "bad request: the seed is not hex"
        );
        let multicast =
            format!(r#"{{"time_ns": 1, "seed": "{SEED}", "mac": "01:00:5e:00:00:01"}}"#);
        assert_eq!(
            parse_request(&multicast).unwrap_err(),
            "bad request: `01:00:5e:00:00:01` is not a MAC address"
        );
        assert!(
            parse_request("{}")
                .unwrap_err()
                .starts_with("bad request: missing field")
        );
        let addressed = format!(
            r#"{{"time_ns": 1, "seed": "{SEED}", "ip": "10.213.0.7::10.213.0.1:255.255.255.0::eth0:off:10.213.0.1"}}"#
        );
        assert_eq!(
            parse_request(&addressed).unwrap().ip.as_deref(),
            Some("10.213.0.7::10.213.0.1:255.255.255.0::eth0:off:10.213.0.1")
        );
        for (ip, error) in [
            ("dhcp", "bad request: ip `dhcp` names no static address"),
            (
                "10.213.0.300::::",
                "bad request: ip=: bad client address `10.213.0.300`",
            ),
        ] {
            let request = format!(r#"{{"time_ns": 1, "seed": "{SEED}", "ip": "{ip}"}}"#);
            assert_eq!(parse_request(&request).unwrap_err(), error);
        }
    }

    #[test]
    fn macs_parse_only_whole() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f"),
            Some([0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f])
        );
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5:54:00:ab:cd:0f",
            "xx:54:00:ab:cd:0f",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_key_files_name_their_type() {
        assert_eq!(key_type("ssh_host_ed25519_key"), Some("ed25519"));
        assert_eq!(key_type("ssh_host_rsa_key"), Some("rsa"));
        assert_eq!(key_type("ssh_host_ed25519_key.pub"), None);
        assert_eq!(key_type("ssh_host__key"), None);
        assert_eq!(key_type("sshd_config"), None);
    }

    #[test]
    fn host_keys_are_listed_with_their_types() {
        let dir = tempfile_dir("list");
        for name in [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "ssh_host_rsa_key",
            "moduli",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let keys: Vec<String> = host_keys(&dir).into_iter().map(|(_, kind)| kind).collect();
        assert_eq!(keys, ["ed25519", "rsa"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn given_host_keys_replace_the_files_with_their_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile_dir("keys");
        let key = dir.join("ssh_host_ed25519_key");
        std::fs::write(&key, "old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_key_file(&key, "new private\n", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "new private\n");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!key.with_extension("banger-new").exists());
        let request = format!(
            r#"{{"time_ns": 1, "seed": "{SEED}", "host_keys": {{"ed25519": {{"private": "p", "public": "q"}}}}}}"#
        );
        let request = parse_request(&request).unwrap();
        assert_eq!(request.host_keys["ed25519"].public, "q");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hostnames_are_one_dns_label() {
        for good in ["box", "web-1", "A9", &"x".repeat(63)] {
            check_hostname(good).unwrap();
        }
        for bad in ["", "-box", "box-", "a.b", "a_b", "a b", &"x".repeat(64)] {
            let error = check_hostname(bad).unwrap_err();
            assert!(error.contains("is not a hostname"), "{error}");
        }
        let request = format!(r#"{{"time_ns": 1, "seed": "{SEED}", "hostname": "a_b"}}"#);
        assert!(parse_request(&request).unwrap_err().contains("a_b"));
    }

    #[test]
    fn the_hosts_file_names_the_machine_once_after_loopback() {
        let debian = "127.0.0.1\tlocalhost\n127.0.1.1\tbuildhost\n::1\tlocalhost ip6-localhost\n";
        assert_eq!(
            hosts_naming(debian, "box"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tbox\n::1\tlocalhost ip6-localhost\n"
        );
        // Idempotent, and the name is replaced, not added beside the old one.
        let named = hosts_naming(debian, "box");
        assert_eq!(hosts_naming(&named, "box"), named);
        assert_eq!(
            hosts_naming(&named, "other").matches("127.0.1.1").count(),
            1
        );
        // No loopback line, or no file: the name goes first.
        assert_eq!(hosts_naming("", "box"), "127.0.1.1\tbox\n");
        assert_eq!(
            hosts_naming("10.0.0.1 gw\n", "box"),
            "127.0.1.1\tbox\n10.0.0.1 gw\n"
        );
    }

    #[test]
    fn hostname_files_are_written_only_when_they_differ() {
        let dir = tempfile_dir("hostname");
        std::fs::write(dir.join("hostname"), "buildhost\n").unwrap();
        std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        write_hostname_files("box", &dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("hostname")).unwrap(),
            "box\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("hosts")).unwrap(),
            "127.0.0.1 localhost\n127.0.1.1\tbox\n"
        );
        // Unchanged files are not rewritten: a read-only one is no error then.
        let modified = std::fs::metadata(dir.join("hosts"))
            .unwrap()
            .modified()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_hostname_files("box", &dir).unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("hosts"))
                .unwrap()
                .modified()
                .unwrap(),
            modified
        );
        // A directory that cannot be written names the file.
        let error = write_hostname_files("other", &dir.join("missing")).unwrap_err();
        assert!(error.contains("missing/hostname"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "banger-agent-identity-{}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
