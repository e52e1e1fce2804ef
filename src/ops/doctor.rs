//! `banger doctor`: what this host can do, what is missing, and how to fix it.
//!
//! Each check probes one capability (a program, a device, a directory) and says whether banger
//! can use it, and if not, the command that fixes it. Checks never change anything.

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
}

pub use crate::env::find_program;

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

fn program_check(
    name: &'static str,
    program: &str,
    version_args: &[&str],
    needed_for: &'static str,
    fix: &str,
) -> Check {
    match find_program(program) {
        Some(path) => Check {
            name,
            health: Health::Ok,
            detail: first_line(&path, version_args).unwrap_or_else(|| path.display().to_string()),
            needed_for,
            fix: None,
        },
        None => Check {
            name,
            health: Health::Missing,
            detail: format!("`{program}` not found on PATH"),
            needed_for,
            fix: Some(fix.to_owned()),
        },
    }
}

/// Every check, in report order.
pub fn run_checks(store_dir: &Path) -> Vec<Check> {
    let facts = HostFacts::probe();
    let accel_check = match accel::choose(&facts) {
        Ok(Accel::Kvm) => Check {
            name: "accelerator",
            health: Health::Ok,
            detail: "KVM".into(),
            needed_for: "fast VM boots",
            fix: None,
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
        },
        Err(error) => Check {
            name: "accelerator",
            health: Health::Missing,
            detail: crate::error::error_chain(&error),
            needed_for: "VM boots",
            fix: Some(format!(
                "unset {} or set it to kvm or tcg",
                crate::env::BANGER_ACCEL
            )),
        },
    };
    let tsc = match accel::host_tsc_khz() {
        Some(khz) => Check {
            name: "host TSC frequency",
            health: Health::Ok,
            detail: format!("{khz} kHz (passed to TCG guests as tsc_early_khz)"),
            needed_for: "booting under TCG",
            fix: None,
        },
        None => Check {
            name: "host TSC frequency",
            health: Health::Degraded,
            detail: "not found in the kernel log or /proc/cpuinfo".into(),
            needed_for: "booting under TCG (guests may hang calibrating the TSC)",
            fix: Some("run banger as a user who may read the kernel log (dmesg)".into()),
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
            },
        }
    };
    let qemu = crate::vm::qemu::binary();
    let vhost_vsock = crate::vm::vsock::find_binary().map_or_else(
        || "vhost-device-vsock".to_owned(),
        |path| path.display().to_string(),
    );
    vec![
        accel_check,
        tsc,
        program_check(
            "qemu",
            &qemu,
            &["--version"],
            "booting VMs (the QEMU microvm backend)",
            "apt-get install qemu-system-x86",
        ),
        program_check(
            "vhost-device-vsock",
            &vhost_vsock,
            &["--version"],
            "the host↔guest agent channel under QEMU (hybrid vsock; without it, virtio-serial)",
            "cargo install --locked vhost-device-vsock",
        ),
        firecracker_backend(
            program_check(
                "firecracker",
                "firecracker",
                &["--version"],
                "the Firecracker backend (needs working KVM)",
                "install the firecracker binary on PATH",
            ),
            &accel::choose(&facts),
        ),
        program_check(
            "debugfs",
            "debugfs",
            &["-V"],
            "`copy` provisioning steps",
            "apt-get install e2fsprogs",
        ),
        program_check(
            "mmdebstrap",
            "mmdebstrap",
            &["--version"],
            "building the default Debian image from packages",
            "apt-get install mmdebstrap",
        ),
        program_check(
            "apt-get",
            "apt-get",
            &["--version"],
            "building the default kernel from the distribution's package",
            "use `banger kernel pull` from a catalog bundle, or `banger kernel import`",
        ),
        store,
    ]
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

    #[test]
    fn firecracker_is_unusable_where_only_tcg_would_work() {
        let installed = || Check {
            name: "firecracker",
            health: Health::Ok,
            detail: "Firecracker v1.12.1".into(),
            needed_for: "the Firecracker backend (needs working KVM)",
            fix: None,
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

    #[test]
    fn programs_are_found_on_path_and_missing_ones_say_how_to_fix() {
        assert!(find_program("sh").is_some());
        let missing = program_check(
            "nope",
            "banger-surely-missing-program",
            &[],
            "testing",
            "install it",
        );
        assert_eq!(missing.health, Health::Missing);
        assert_eq!(missing.fix.as_deref(), Some("install it"));
        let present = program_check("sh", "sh", &["-c", "echo hi"], "testing", "");
        assert_eq!(present.health, Health::Ok);
        assert_eq!(present.detail, "hi");
    }
}
