//! The one place banger does privileged host operations: the tap devices that give a
//! Firecracker VM its network, and handing the files of a Firecracker jail to the jail's
//! user ([`hand_over`]).
//!
//! Firecracker has no user-mode network: a guest's `eth0` is a tap on the host, and making a
//! tap needs `CAP_NET_ADMIN`. banger makes one only when it runs as root, and says so plainly
//! otherwise (the QEMU backend's user-mode network needs no privileges). Everything here is
//! done by `ip` (iproute2) rather than ioctls, so the crate keeps `unsafe_code = "deny"` and
//! every failure carries the exact command a person can re-run by hand.
//!
//! A tap's life:
//! 1. [`tap_name`] and [`tap_addresses`] derive its name and its /30 from the VM's id, so a
//!    daemon restarted after a crash finds them again without any saved state.
//! 2. [`TapDevice::create`] (as root) adds a persistent tap owned by the user Firecracker runs
//!    as (so a jailed, unprivileged Firecracker can open it), gives it the host address and
//!    brings it up. A failure part-way deletes the tap: nothing is left half-made.
//! 3. Firecracker attaches to it; the guest configures itself from
//!    [`TapAddresses::guest_cmdline`].
//! 4. [`TapDevice::delete`], or [`TapDevice::delete_by_name`] from a later daemon, removes it.
//!    There is deliberately no `Drop`: a VM outlives the daemon process that started it, and
//!    its tap must outlive it too.
//!
//! Known weaknesses: addresses come from a hash, so two VMs can share a /30 (one pair in
//! 16384); nothing on the host routes or NATs the guest beyond its /30.

pub mod bridge;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegedError {
    #[error(
        "{what} needs a tap device, and banger creates taps only when it runs as root; run \
         banger (its daemon) as root, or use the QEMU backend (`--backend qemu`), whose \
         user-mode network needs no privileges"
    )]
    NotRoot { what: String },
    #[error("`{argv}` failed ({status}): {stderr}")]
    Command {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{argv}` (banger manages tap devices with `ip`, from iproute2)")]
    Spawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "network interface {name} is not a tap device; banger deletes only taps, so it is left \
         alone"
    )]
    NotATap { name: String },
    #[error(
        "`--network tap` puts the VM on banger's bridge (`{bridge}`), which only root can make; \
         run banger as root, or use `--network user` (rootless, with `-p` for ports and \
         `banger ssh-config install` for `ssh NAME.vm`)"
    )]
    TapNeedsRoot { bridge: String },
    #[error(
        "the bridge subnet {subnet} clashes with the host's route `{route}`; set another in \
         config.toml (`[network] subnet = \"10.214.0.0/24\"`)"
    )]
    SubnetClash { subnet: String, route: String },
    #[error(
        "bridge {bridge} exists with {found}, not {expected} as configured; remove it with \
         `banger network down` (no tap VM may run) to make it again"
    )]
    BridgeMismatch {
        bridge: String,
        found: String,
        expected: String,
    },
    #[error("cannot {what} {}", path.display())]
    Sysctl {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl crate::error::Classify for PrivilegedError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            // The user's to change: run as root, another subnet, `network down`.
            PrivilegedError::TapNeedsRoot { .. }
            | PrivilegedError::SubnetClash { .. }
            | PrivilegedError::BridgeMismatch { .. } => ErrorClass::User,
            _ => ErrorClass::Environment,
        }
    }
}

/// Makes `path` owned by `uid:gid`: a per-VM file (a writable drive, the log) handed to the
/// unprivileged user a jailed Firecracker runs as. Needs root (`CAP_CHOWN`); the caller
/// checks that it is.
pub fn hand_over(path: &std::path::Path, uid: u32, gid: u32) -> std::io::Result<()> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(std::io::Error::from)
}

/// Whether banger runs with root's effective uid.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A VM's point-to-point /30: the host's end on the tap, the guest's on its `eth0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapAddresses {
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
    pub prefix: u8,
}

/// The /16 every VM's /30 is carved from: private, and near the end of the range Docker hands
/// out a /16 at a time from 172.17, so only a host with a dozen Docker networks meets it.
const TAP_NETWORK: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 0);
const TAP_PREFIX: u8 = 30;

/// The /30 of VM `vm_id`, the same on every call (see the module note for collisions).
pub fn tap_addresses(vm_id: &str) -> TapAddresses {
    let mut hasher = blake3::Hasher::new();
    // Domain-tagged so this never coincides with another use of blake3 over a VM id.
    hasher.update(b"banger tap /30 v1\0");
    hasher.update(vm_id.as_bytes());
    let hash = hasher.finalize();
    let blocks = 1u32 << (TAP_PREFIX - 16);
    let block = u32::from(u16::from_le_bytes([hash.as_bytes()[0], hash.as_bytes()[1]])) % blocks;
    let base = u32::from(TAP_NETWORK) + block * 4;
    TapAddresses {
        host: Ipv4Addr::from(base + 1),
        guest: Ipv4Addr::from(base + 2),
        prefix: TAP_PREFIX,
    }
}

impl TapAddresses {
    /// The dotted form of `prefix`, as the kernel's `ip=` wants it.
    pub fn netmask(&self) -> Ipv4Addr {
        let host_bits = 32u32.saturating_sub(u32::from(self.prefix));
        Ipv4Addr::from(u32::MAX.checked_shl(host_bits).unwrap_or(0))
    }

    /// The kernel's `ip=` word (`ip=<client>::<gw>:<netmask>::<device>:off`): the guest kernel
    /// configures `device` before init runs, so the agent needs no DHCP client.
    pub fn guest_cmdline(&self, device: &str) -> String {
        format!(
            "ip={}::{}:{}::{device}:off",
            self.guest,
            self.host,
            self.netmask()
        )
    }
}

/// The tap name of VM `vm_id`: `bgr-` and up to 10 of its letters and digits, within the
/// kernel's 15-byte limit (IFNAMSIZ). The prefix marks banger's taps among the host's.
pub fn tap_name(vm_id: &str) -> String {
    let suffix: String = vm_id
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        .take(10)
        .collect();
    format!("bgr-{suffix}")
}

/// A persistent tap banger made. Dropping it leaves the tap in place (the VM may outlive this
/// process); remove it with [`TapDevice::delete`] or [`TapDevice::delete_by_name`].
#[derive(Debug)]
#[must_use = "dropping a TapDevice leaves the tap on the host; delete it when the VM is gone"]
pub struct TapDevice {
    name: String,
    addresses: TapAddresses,
}

impl TapDevice {
    /// Adds tap `name` owned by `owner_uid`, with `addresses.host` on it, up. Refuses before
    /// touching anything when not root; fails (leaving the existing one alone) when an
    /// interface of that name exists.
    pub fn create(
        name: &str,
        addresses: &TapAddresses,
        owner_uid: u32,
    ) -> Result<TapDevice, PrivilegedError> {
        create_checked(is_root(), name, addresses, owner_uid)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addresses(&self) -> &TapAddresses {
        &self.addresses
    }

    /// Removes the tap, whether or not a Firecracker still holds it.
    pub fn delete(self) -> Result<(), PrivilegedError> {
        TapDevice::delete_by_name(&self.name)
    }

    /// Removes tap `name` if it exists: for a daemon cleaning up after its predecessor, so a
    /// tap already gone is success. An interface of that name that is not a tap is refused.
    pub fn delete_by_name(name: &str) -> Result<(), PrivilegedError> {
        // Not an interface name: refused, so the look below never leaves /sys/class/net.
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(PrivilegedError::NotATap {
                name: name.to_owned(),
            });
        }
        let sys = sys_class_net(name);
        if !sys.exists() {
            return Ok(());
        }
        // Only tun/tap devices have `tun_flags`; checking it keeps `ip link del` (which would
        // delete any interface) to taps.
        let is_tap = std::fs::read_to_string(sys.join("tun_flags"))
            .ok()
            .and_then(|flags| u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok())
            .is_some_and(|flags| flags & IFF_TAP != 0);
        if !is_tap {
            // Gone between the two looks: as good as deleted.
            if !sys.exists() {
                return Ok(());
            }
            return Err(PrivilegedError::NotATap {
                name: name.to_owned(),
            });
        }
        // `ip link del` rather than `ip tuntap del`: the latter re-attaches to the tap and so
        // fails with EBUSY while a Firecracker (even one being killed) still holds it.
        match run(&["ip", "link", "del", "dev", name]) {
            Err(_) if !sys.exists() => Ok(()),
            result => result,
        }
    }
}

/// `IFF_TAP` in `tun_flags` (linux/if_tun.h).
const IFF_TAP: u32 = 0x0002;

fn sys_class_net(name: &str) -> PathBuf {
    PathBuf::from("/sys/class/net").join(name)
}

/// [`TapDevice::create`] with the root check given, so the refusal is testable as root.
fn create_checked(
    root: bool,
    name: &str,
    addresses: &TapAddresses,
    owner_uid: u32,
) -> Result<TapDevice, PrivilegedError> {
    if !root {
        return Err(PrivilegedError::NotRoot {
            what: "Firecracker's network".to_owned(),
        });
    }
    let uid = owner_uid.to_string();
    run(&[
        "ip", "tuntap", "add", "dev", name, "mode", "tap", "user", &uid,
    ])?;
    let address = format!("{}/{}", addresses.host, addresses.prefix);
    let configured = run(&["ip", "addr", "add", &address, "dev", name])
        .and_then(|()| run(&["ip", "link", "set", name, "up"]));
    if let Err(error) = configured {
        // The first error is the one worth reporting; a failed clean-up here would only
        // repeat that `ip` cannot manage this tap.
        let _ = TapDevice::delete_by_name(name);
        return Err(error);
    }
    Ok(TapDevice {
        name: name.to_owned(),
        addresses: *addresses,
    })
}

/// Runs `argv`; a failure carries the command line and its stderr.
fn run(argv: &[&str]) -> Result<(), PrivilegedError> {
    run_output(argv, None).map(drop)
}

/// Runs `argv` with `stdin` (or none) and returns its stdout; a failure carries the command
/// line and its stderr.
fn run_output(argv: &[&str], stdin: Option<&str>) -> Result<String, PrivilegedError> {
    use std::io::Write;
    let joined = argv.join(" ");
    let spawn_error = |source| PrivilegedError::Spawn {
        argv: joined.clone(),
        source,
    };
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A program that exits without reading says why on stderr, reported below.
        let _ = pipe.write_all(text.as_bytes());
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    Err(PrivilegedError::Command {
        argv: joined,
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifnamsiz_and_keep_to_lowercase_letters_and_digits() {
        assert_eq!(tap_name("0123456789abcdef"), "bgr-0123456789");
        assert_eq!(tap_name("Vm-1_a/B"), "bgr-vm1ab");
        for id in [
            "",
            "x",
            "a-very-long-VM-id-with-dashes-0123456789",
            "é漢字ß-42",
        ] {
            let name = tap_name(id);
            assert!(name.len() <= 15, "{name}");
            assert!(name.starts_with("bgr-"), "{name}");
            assert!(
                name[4..]
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
                "{name}"
            );
        }
    }

    #[test]
    fn tap_addresses_are_a_deterministic_slash_30_in_172_30() {
        let mut blocks = std::collections::BTreeSet::new();
        for index in 0..200 {
            let id = format!("vm-{index}");
            let addresses = tap_addresses(&id);
            assert_eq!(addresses, tap_addresses(&id));
            assert_eq!(addresses.prefix, 30);
            let (host, guest) = (u32::from(addresses.host), u32::from(addresses.guest));
            assert_eq!(host >> 16, u32::from(Ipv4Addr::new(172, 30, 0, 0)) >> 16);
            // Same /30, host on .1 and guest on .2 of it (not its network or broadcast).
            assert_eq!(host & !3, guest & !3);
            assert_eq!((host & 3, guest & 3), (1, 2));
            blocks.insert(host & !3);
        }
        // The hash spreads VMs over the /16.
        assert!(blocks.len() > 190, "{}", blocks.len());
    }

    #[test]
    fn guest_cmdline_is_the_kernels_ip_word() {
        let addresses = TapAddresses {
            host: Ipv4Addr::new(172, 30, 4, 1),
            guest: Ipv4Addr::new(172, 30, 4, 2),
            prefix: 30,
        };
        assert_eq!(
            addresses.guest_cmdline("eth0"),
            "ip=172.30.4.2::172.30.4.1:255.255.255.252::eth0:off"
        );
    }

    #[test]
    fn not_root_says_what_needs_root_and_the_way_out() {
        let error = create_checked(
            false,
            "bgr-notroot",
            &tap_addresses("notroot"),
            nix::unistd::getuid().as_raw(),
        )
        .unwrap_err();
        assert!(
            matches!(error, PrivilegedError::NotRoot { .. }),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(text.contains("Firecracker"), "{text}");
        assert!(text.contains("root"), "{text}");
        assert!(text.contains("`--backend qemu`"), "{text}");
        // Refused before anything was made.
        assert!(!sys_class_net("bgr-notroot").exists());
    }

    #[test]
    fn a_missing_tap_is_already_deleted() {
        TapDevice::delete_by_name("bgr-nosuchtap0").unwrap();
    }

    #[test]
    fn command_errors_carry_argv_and_stderr() {
        let error = run(&["sh", "-c", "echo oops >&2; exit 3"]).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("`sh -c echo oops >&2; exit 3`"), "{text}");
        assert!(text.contains("oops"), "{text}");
        assert!(text.contains('3'), "{text}");
        let error = run(&["banger-no-such-program"]).unwrap_err();
        assert!(matches!(error, PrivilegedError::Spawn { .. }), "{error:?}");
    }
}
