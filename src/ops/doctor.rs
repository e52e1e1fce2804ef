//! `banger doctor`: what this host can do, what is missing, and how to fix it.
//!
//! Each check probes one capability (a program, a device, a directory) and says whether banger
//! can use it, and if not, the command that fixes it. Checks never change anything.
//!
//! [`TOOLS`] is every program banger runs on the host, each with the Debian/Ubuntu package
//! (or crate) that provides it; `scripts/install-host-tools` installs the same set, and a test
//! keeps the two lists in step. A check is *required* when `banger up` of a Bangerfile with
//! the defaults (the Debian image and kernel, built here, booted under QEMU) cannot work
//! without it; `banger doctor` exits 1 when a required check is missing. The rest (Firecracker,
//! vsock, `ssh`, `git`, `ip`) make something faster or possible, and are listed all the same.

use std::path::Path;
use std::process::Command;

use crate::vm::accel::{self, Accel, HostFacts};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Works.
    Ok,
    /// Works, with a limitation worth knowing (TCG instead of KVM).
    Degraded,
    /// Missing: the features that need it fail until it is fixed.
    Missing,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Degraded => "degraded",
            Health::Missing => "missing",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub health: Health,
    /// What was found, or what is wrong.
    pub detail: String,
    /// What needs it.
    pub needed_for: &'static str,
    /// How to fix it, when it is not ok.
    pub fix: Option<String>,
    /// Whether `banger up` with the defaults fails while this is missing.
    pub required: bool,
}

pub use crate::env::find_program;

/// How a program gets onto a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// A Debian/Ubuntu package (the same name on Debian 12 and Ubuntu 24.04).
    Apt(&'static str),
    /// A crate with a binary: `cargo install --locked NAME`.
    Cargo(&'static str),
    /// No package: what to do instead.
    Advice(&'static str),
}

impl Install {
    /// The command (or advice) that installs it; apt runs through sudo unless `root`.
    pub fn command(self, root: bool) -> String {
        match self {
            Install::Apt(package) => {
                let sudo = if root { "" } else { "sudo " };
                format!("{sudo}apt-get install {package}")
            }
            Install::Cargo(krate) => format!("cargo install --locked {krate}"),
            Install::Advice(text) => text.to_owned(),
        }
    }
}

/// A program banger runs on the host.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// The check's name.
    pub name: &'static str,
    /// The program, looked up on `PATH`.
    pub program: &'static str,
    /// Arguments that make it print its version; empty: it is not run (for programs such as
    /// `ssh-keygen` that have no harmless version flag), and the check shows its path.
    pub version_args: &'static [&'static str],
    pub needed_for: &'static str,
    pub install: Install,
    pub required: bool,
}

/// Every program banger may run on the host, in report order. `newuidmap` is checked only when
/// banger does not run as root (see [`tool_checks`]).
pub const TOOLS: &[Tool] = &[
    Tool {
        name: "qemu",
        program: "qemu-system-x86_64",
        version_args: &["--version"],
        needed_for: "booting VMs (the QEMU microvm backend)",
        install: Install::Apt("qemu-system-x86"),
        required: true,
    },
    Tool {
        name: "vhost-device-vsock",
        program: "vhost-device-vsock",
        version_args: &["--version"],
        needed_for: "the host↔guest agent channel under QEMU (hybrid vsock; without it, \
                     virtio-serial)",
        install: Install::Cargo("vhost-device-vsock"),
        required: false,
    },
    Tool {
        name: "firecracker",
        program: "firecracker",
        version_args: &["--version"],
        needed_for: "the Firecracker backend (needs working KVM; QEMU is used without it)",
        install: Install::Advice("install the firecracker binary on PATH"),
        required: false,
    },
    Tool {
        name: "mmdebstrap",
        program: "mmdebstrap",
        version_args: &["--version"],
        needed_for: "building the default Debian image and fetching its kernel from packages",
        install: Install::Apt("mmdebstrap"),
        required: true,
    },
    Tool {
        name: "newuidmap",
        program: "newuidmap",
        version_args: &[],
        needed_for: "mmdebstrap as a user other than root (its unshare mode)",
        install: Install::Apt("uidmap"),
        required: true,
    },
    Tool {
        name: "ssh-keygen",
        program: "ssh-keygen",
        version_args: &[],
        needed_for: "the SSH key banger installs in every VM it starts",
        install: Install::Apt("openssh-client"),
        required: true,
    },
    Tool {
        name: "ssh",
        program: "ssh",
        version_args: &["-V"],
        needed_for: "`banger ssh` and `banger vm ssh`",
        install: Install::Apt("openssh-client"),
        required: false,
    },
    Tool {
        name: "git",
        program: "git",
        version_args: &["--version"],
        needed_for: "importing a workspace that is a git work tree as git sees it (without \
                     it, every file is imported)",
        install: Install::Apt("git"),
        required: false,
    },
    Tool {
        name: "resize2fs",
        program: "resize2fs",
        version_args: &[],
        needed_for: "`banger vm set --disk`: growing a VM's disks (with e2fsck)",
        install: Install::Apt("e2fsprogs"),
        required: false,
    },
    Tool {
        name: "ip",
        program: "ip",
        version_args: &["-V"],
        needed_for: "the tap networks of Firecracker VMs and `--network tap` (as root)",
        install: Install::Apt("iproute2"),
        required: false,
    },
    Tool {
        name: "nft",
        program: "nft",
        version_args: &["--version"],
        needed_for: "`--network tap`: NAT and published ports on banger's bridge (as root)",
        install: Install::Apt("nftables"),
        required: false,
    },
];

/// The script in banger's source tree that installs every [`Install::Apt`] and
/// [`Install::Cargo`] tool on Debian 12 and Ubuntu 24.04.
pub const INSTALL_SCRIPT: &str = "scripts/install-host-tools";

/// Whether [`INSTALL_SCRIPT`] would install something `checks` found missing.
pub fn script_would_help(checks: &[Check]) -> bool {
    checks.iter().any(|check| {
        check.health == Health::Missing
            && TOOLS
                .iter()
                .any(|tool| tool.name == check.name && !matches!(tool.install, Install::Advice(_)))
    })
}

/// The required checks that are missing: `banger doctor` fails when there is one.
pub fn missing_required(checks: &[Check]) -> impl Iterator<Item = &Check> {
    checks
        .iter()
        .filter(|check| check.required && check.health == Health::Missing)
}

/// The first line a program prints for `args`, if it runs.
fn first_line(program: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = if output.stdout.is_empty() {
        output.stderr
    } else {
        output.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|line| line.trim().to_owned())
}

/// Checks `tool`, found as `program` (its own name, or where an override points) on
/// `search_path`.
fn tool_check(
    tool: &Tool,
    program: &str,
    search_path: Option<&std::ffi::OsStr>,
    root: bool,
) -> Check {
    match crate::env::find_program_in(program, search_path) {
        Some(path) => Check {
            name: tool.name,
            health: Health::Ok,
            detail: if tool.version_args.is_empty() {
                None
            } else {
                first_line(&path, tool.version_args).filter(|line| !line.is_empty())
            }
            .unwrap_or_else(|| path.display().to_string()),
            needed_for: tool.needed_for,
            fix: None,
            required: tool.required,
        },
        None => Check {
            name: tool.name,
            health: Health::Missing,
            detail: format!("`{program}` not found on PATH"),
            needed_for: tool.needed_for,
            fix: Some(tool.install.command(root)),
            required: tool.required,
        },
    }
}

/// The checks of [`TOOLS`] on `search_path`, as a user who is `root` or not. `overrides`
/// gives the program to look for instead of a tool's own name (an environment variable's
/// path, cargo's install directory).
pub fn tool_checks(
    search_path: Option<&std::ffi::OsStr>,
    root: bool,
    overrides: &dyn Fn(&Tool) -> Option<String>,
) -> Vec<Check> {
    TOOLS
        .iter()
        // As root, mmdebstrap picks its root mode and never runs newuidmap.
        .filter(|tool| !(root && tool.program == "newuidmap"))
        .map(|tool| {
            let program = overrides(tool).unwrap_or_else(|| tool.program.to_owned());
            tool_check(tool, &program, search_path, root)
        })
        .collect()
}

/// The bridge network of `--network tap` VMs: what exists of it, or whether it could be made
/// with `subnet` (a host route overlapping it would be refused).
pub fn network_check(runtime_dir: &Path, subnet: crate::net::subnet::Subnet) -> Check {
    use crate::privileged::bridge;
    let status = crate::ops::network::status(runtime_dir);
    let needed_for = "`--network tap` VMs (bridge, NAT, `.vm` DNS; root only)";
    if let Some(address) = &status.bridge {
        return Check {
            name: "bridge network",
            health: Health::Ok,
            detail: format!(
                "{} {address}, {} tap(s), {}, IPv4 forwarding {}",
                bridge::BRIDGE,
                status.taps.len(),
                if status.nft_table {
                    "table inet banger"
                } else {
                    "no nft table (or not readable without root)"
                },
                match (status.forwarding, status.forwarding_by_banger) {
                    (true, true) => "on (by banger)",
                    (true, false) => "on",
                    (false, _) => "off",
                }
            ),
            needed_for,
            fix: None,
            required: false,
        };
    }
    match bridge::subnet_clash(subnet) {
        Ok(None) => Check {
            name: "bridge network",
            health: Health::Ok,
            detail: format!(
                "none yet; the first tap VM makes {} on {subnet}",
                bridge::BRIDGE
            ),
            needed_for,
            fix: None,
            required: false,
        },
        Ok(Some(route)) => Check {
            name: "bridge network",
            health: Health::Degraded,
            detail: format!("subnet {subnet} clashes with the host route `{route}`"),
            needed_for,
            fix: Some("set another `[network] subnet` in config.toml".into()),
            required: false,
        },
        Err(error) => Check {
            name: "bridge network",
            health: Health::Degraded,
            detail: format!(
                "cannot read the host's routes: {}",
                crate::error::error_chain(&error)
            ),
            needed_for,
            fix: Some("install iproute2".into()),
            required: false,
        },
    }
}

/// Every check, in report order.
pub fn run_checks(store_dir: &Path) -> Vec<Check> {
    let facts = HostFacts::probe();
    let accel_choice = accel::choose(&facts);
    let accel_check = match &accel_choice {
        Ok(Accel::Kvm) => Check {
            name: "accelerator",
            health: Health::Ok,
            detail: "KVM".into(),
            needed_for: "fast VM boots",
            fix: None,
            required: true,
        },
        Ok(Accel::Tcg { reason }) => Check {
            name: "accelerator",
            health: Health::Degraded,
            detail: format!("TCG (software emulation): {reason}"),
            needed_for: "fast VM boots",
            fix: Some(
                "boots work, several times slower; on a host where KVM works for ordinary \
                 guests, give banger access to /dev/kvm"
                    .into(),
            ),
            required: true,
        },
        Err(error) => Check {
            name: "accelerator",
            health: Health::Missing,
            detail: crate::error::error_chain(error),
            needed_for: "VM boots",
            fix: Some(format!(
                "unset {} or set it to kvm or tcg",
                crate::env::BANGER_ACCEL
            )),
            required: true,
        },
    };
    let tsc = match accel::host_tsc_khz() {
        Some(khz) => Check {
            name: "host TSC frequency",
            health: Health::Ok,
            detail: format!("{khz} kHz (passed to TCG guests as tsc_early_khz)"),
            needed_for: "booting under TCG",
            fix: None,
            required: false,
        },
        None => Check {
            name: "host TSC frequency",
            health: Health::Degraded,
            detail: "not found in the kernel log or /proc/cpuinfo".into(),
            needed_for: "booting under TCG (guests may hang calibrating the TSC)",
            fix: Some("run banger as a user who may read the kernel log (dmesg)".into()),
            required: false,
        },
    };
    let store = {
        // The store may not exist yet: probe the nearest directory that does, creating nothing.
        let existing = store_dir
            .ancestors()
            .find(|dir| dir.is_dir())
            .unwrap_or(Path::new("/"));
        let probe = tempfile::tempfile_in(existing).map(|_| ());
        match probe {
            Ok(()) => Check {
                name: "store",
                health: Health::Ok,
                detail: format!("{} is writable", store_dir.display()),
                needed_for: "everything that builds",
                fix: None,
                required: true,
            },
            Err(error) => Check {
                name: "store",
                health: Health::Missing,
                detail: format!("{}: {error}", store_dir.display()),
                needed_for: "everything that builds",
                fix: Some(format!(
                    "make it writable, or point {} elsewhere",
                    crate::env::BANGER_CACHE_DIR
                )),
                required: true,
            },
        }
    };
    let root = crate::privileged::is_root();
    let search_path = crate::env::search_path();
    // Where banger itself would look: `$BANGER_QEMU`, and for vhost-device-vsock also
    // `$BANGER_VHOST_DEVICE_VSOCK` and cargo's bin directory.
    let overrides = |tool: &Tool| match tool.program {
        "qemu-system-x86_64" => Some(crate::vm::qemu::binary()),
        "vhost-device-vsock" => {
            crate::vm::vsock::find_binary().map(|path| path.display().to_string())
        }
        _ => None,
    };
    let mut checks = vec![accel_check, tsc];
    checks.extend(
        tool_checks(search_path.as_deref(), root, &overrides)
            .into_iter()
            .map(|check| {
                if check.name == "firecracker" {
                    firecracker_backend(check, &accel_choice)
                } else {
                    check
                }
            }),
    );
    checks.push(debian_keyring_check(Path::new(DEBIAN_KEYRING), root));
    checks.push(store);
    checks
}

/// Where Debian's archive keyring lives on Debian and Ubuntu (package `debian-archive-keyring`).
pub const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// mmdebstrap checks Debian's archive against Debian's keyring; a Debian host has it, an
/// Ubuntu host does not until the package is installed, and then the default image and kernel
/// cannot be fetched.
fn debian_keyring_check(keyring: &Path, root: bool) -> Check {
    let needed_for =
        "the default Debian image and kernel (mmdebstrap checks Debian's archive with it)";
    if keyring.is_file() {
        Check {
            name: "debian keyring",
            health: Health::Ok,
            detail: keyring.display().to_string(),
            needed_for,
            fix: None,
            required: true,
        }
    } else {
        Check {
            name: "debian keyring",
            health: Health::Missing,
            detail: format!("{} not found", keyring.display()),
            needed_for,
            fix: Some(Install::Apt("debian-archive-keyring").command(root)),
            required: true,
        }
    }
}

/// The Firecracker check says whether the backend can boot guests, not only whether the
/// binary is there: Firecracker has no TCG, so where banger would pick TCG (no KVM, or a PVM
/// host whose KVM hangs ordinary guests) it is installed but unusable.
fn firecracker_backend(binary: Check, accel: &Result<Accel, accel::AccelError>) -> Check {
    match (binary.health, accel) {
        (Health::Ok, Ok(Accel::Tcg { reason })) => Check {
            health: Health::Degraded,
            detail: format!(
                "{}, but it cannot boot guests here: {reason}",
                binary.detail
            ),
            fix: Some("VMs use the QEMU backend on this host".into()),
            ..binary
        },
        _ => binary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn firecracker_is_unusable_where_only_tcg_would_work() {
        let installed = || Check {
            name: "firecracker",
            health: Health::Ok,
            detail: "Firecracker v1.12.1".into(),
            needed_for: "the Firecracker backend (needs working KVM)",
            fix: None,
            required: false,
        };
        let kvm = firecracker_backend(installed(), &Ok(Accel::Kvm));
        assert_eq!(kvm.health, Health::Ok);
        let pvm = firecracker_backend(
            installed(),
            &Ok(Accel::Tcg {
                reason: "this host runs under a PVM hypervisor".into(),
            }),
        );
        assert_eq!(pvm.health, Health::Degraded);
        assert_eq!(
            pvm.detail,
            "Firecracker v1.12.1, but it cannot boot guests here: this host runs under a PVM \
             hypervisor"
        );
        assert!(pvm.fix.unwrap().contains("QEMU backend"));
    }

    fn no_overrides(_: &Tool) -> Option<String> {
        None
    }

    /// An executable shell script `name` in `dir`.
    fn fake_program(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn fixes(checks: &[Check]) -> Vec<(&str, Health, Option<&str>)> {
        checks
            .iter()
            .map(|check| (check.name, check.health, check.fix.as_deref()))
            .collect()
    }

    #[test]
    fn every_missing_program_says_exactly_how_to_install_it() {
        let empty = tempfile::tempdir().unwrap();
        let path = empty.path().as_os_str();
        let user = tool_checks(Some(path), false, &no_overrides);
        let missing = Health::Missing;
        assert_eq!(
            fixes(&user),
            [
                (
                    "qemu",
                    missing,
                    Some("sudo apt-get install qemu-system-x86")
                ),
                (
                    "vhost-device-vsock",
                    missing,
                    Some("cargo install --locked vhost-device-vsock")
                ),
                (
                    "firecracker",
                    missing,
                    Some("install the firecracker binary on PATH")
                ),
                (
                    "mmdebstrap",
                    missing,
                    Some("sudo apt-get install mmdebstrap")
                ),
                ("newuidmap", missing, Some("sudo apt-get install uidmap")),
                (
                    "ssh-keygen",
                    missing,
                    Some("sudo apt-get install openssh-client")
                ),
                ("ssh", missing, Some("sudo apt-get install openssh-client")),
                ("git", missing, Some("sudo apt-get install git")),
                ("resize2fs", missing, Some("sudo apt-get install e2fsprogs")),
                ("ip", missing, Some("sudo apt-get install iproute2")),
                ("nft", missing, Some("sudo apt-get install nftables")),
            ]
        );
        assert_eq!(
            user[0].detail, "`qemu-system-x86_64` not found on PATH",
            "{user:?}"
        );
        assert_eq!(
            missing_required(&user)
                .map(|check| check.name)
                .collect::<Vec<_>>(),
            ["qemu", "mmdebstrap", "newuidmap", "ssh-keygen"]
        );
        assert!(script_would_help(&user));

        // Root needs no sudo, and mmdebstrap's root mode needs no newuidmap.
        let root = tool_checks(Some(path), true, &no_overrides);
        assert!(
            root.iter().all(|check| check.name != "newuidmap"),
            "{root:?}"
        );
        assert_eq!(
            root[0].fix.as_deref(),
            Some("apt-get install qemu-system-x86")
        );
        // No PATH at all: the same, nothing found.
        let no_path = tool_checks(None, true, &no_overrides);
        assert!(no_path.iter().all(|check| check.health == Health::Missing));
    }

    #[test]
    fn programs_on_the_search_path_are_found_and_only_safe_ones_are_run() {
        let dir = tempfile::tempdir().unwrap();
        fake_program(dir.path(), "mmdebstrap", "echo \"mmdebstrap 1.3.5\"");
        // ssh-keygen has no version flag: running it could make a key, so it must not run.
        let ran = dir.path().join("ssh-keygen-ran");
        let keygen = fake_program(
            dir.path(),
            "ssh-keygen",
            &format!("touch '{}'", ran.display()),
        );
        // An override (`$BANGER_QEMU`) is found by its path, off the search path.
        let elsewhere = tempfile::tempdir().unwrap();
        let qemu = fake_program(
            elsewhere.path(),
            "my-qemu",
            "echo \"QEMU emulator version 7.2.0\"",
        );
        let qemu_path = qemu.display().to_string();
        let overrides = |tool: &Tool| (tool.name == "qemu").then(|| qemu_path.clone());
        let checks = tool_checks(Some(dir.path().as_os_str()), false, &overrides);
        let by_name = |name: &str| checks.iter().find(|check| check.name == name).unwrap();
        assert_eq!(by_name("mmdebstrap").health, Health::Ok);
        assert_eq!(by_name("mmdebstrap").detail, "mmdebstrap 1.3.5");
        assert_eq!(by_name("mmdebstrap").fix, None);
        assert_eq!(by_name("ssh-keygen").health, Health::Ok);
        assert_eq!(by_name("ssh-keygen").detail, keygen.display().to_string());
        assert!(!ran.exists(), "ssh-keygen was run");
        assert_eq!(by_name("qemu").health, Health::Ok);
        assert_eq!(by_name("qemu").detail, "QEMU emulator version 7.2.0");
        assert_eq!(
            missing_required(&checks)
                .map(|check| check.name)
                .collect::<Vec<_>>(),
            ["newuidmap"]
        );
    }

    #[test]
    fn a_missing_debian_keyring_says_which_package_brings_it() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("debian-archive-keyring.gpg");
        let missing = debian_keyring_check(&keyring, false);
        assert_eq!(missing.health, Health::Missing);
        assert!(missing.required);
        assert_eq!(
            missing.fix.as_deref(),
            Some("sudo apt-get install debian-archive-keyring")
        );
        std::fs::write(&keyring, b"keys").unwrap();
        let found = debian_keyring_check(&keyring, true);
        assert_eq!(found.health, Health::Ok);
        assert_eq!(found.fix, None);
    }

    #[test]
    fn the_install_script_installs_every_packaged_program() {
        let script =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(INSTALL_SCRIPT))
                .unwrap();
        let packages: Vec<&str> = script
            .lines()
            .find_map(|line| line.strip_prefix("PACKAGES=\""))
            .and_then(|rest| rest.strip_suffix('"'))
            .expect("the script's first PACKAGES=\"...\" line")
            .split_whitespace()
            .collect();
        for tool in TOOLS {
            match tool.install {
                Install::Apt(package) => assert!(
                    packages.contains(&package),
                    "{INSTALL_SCRIPT} does not install {package} (for {})",
                    tool.program
                ),
                Install::Cargo(krate) => assert!(
                    script.contains(&format!("install --locked {krate}")),
                    "{INSTALL_SCRIPT} does not install {krate}"
                ),
                Install::Advice(_) => {}
            }
        }
    }
}
