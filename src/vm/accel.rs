//! Which accelerator QEMU should use on this host.
//!
//! `/dev/kvm` existing is not enough: on a host that is itself a guest of a PVM hypervisor
//! (`kvm_pvm` loaded), ordinary guest kernels hang right after "Booting paravirtualized kernel
//! on KVM" (see docs/hosts.md), so such a host must never be given `-accel kvm`. Detection is
//! a pure function of what [`HostFacts::probe`] reads, so it is unit-tested with fake facts.
//! `BANGER_ACCEL=kvm|tcg` overrides it.

use std::fmt;
use std::path::Path;

/// An accelerator, with the reason it was chosen (for `banger doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg { reason: String },
}

impl Accel {
    /// QEMU's `-accel` argument. TCG gets a 128 MiB translation cache: the default grows QEMU
    /// to 430–950 MiB RSS with no measurable gain (docs/hosts.md).
    pub fn qemu_arg(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg { .. } => "tcg,tb-size=128",
        }
    }

    pub fn is_tcg(&self) -> bool {
        matches!(self, Accel::Tcg { .. })
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Accel::Kvm => f.write_str("kvm"),
            Accel::Tcg { reason } => write!(f, "tcg ({reason})"),
        }
    }
}

/// What the host says about virtualization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/kvm` can be opened read-write.
    pub kvm_usable: bool,
    /// The `kvm_pvm` module is loaded (this host is a PVM guest).
    pub pvm_host: bool,
    /// `BANGER_ACCEL`, if set.
    pub forced: Option<String>,
}

impl HostFacts {
    pub fn probe() -> HostFacts {
        HostFacts {
            kvm_usable: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            pvm_host: Path::new("/sys/module/kvm_pvm").exists(),
            forced: std::env::var(crate::env::BANGER_ACCEL)
                .ok()
                .filter(|value| !value.is_empty()),
        }
    }
}

/// Errors choosing an accelerator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccelError {
    #[error("{var}={value:?} is not an accelerator; use `kvm` or `tcg`", var = crate::env::BANGER_ACCEL)]
    UnknownForced { value: String },
}

/// Picks KVM only when it really works here.
pub fn choose(facts: &HostFacts) -> Result<Accel, AccelError> {
    match facts.forced.as_deref() {
        Some("kvm") => return Ok(Accel::Kvm),
        Some("tcg") => {
            return Ok(Accel::Tcg {
                reason: format!("{}=tcg", crate::env::BANGER_ACCEL),
            });
        }
        Some(other) => {
            return Err(AccelError::UnknownForced {
                value: other.to_owned(),
            });
        }
        None => {}
    }
    if !facts.kvm_usable {
        return Ok(Accel::Tcg {
            reason: "/dev/kvm is missing or not accessible".into(),
        });
    }
    if facts.pvm_host {
        return Ok(Accel::Tcg {
            reason: "this host runs under a PVM hypervisor (kvm_pvm is loaded); ordinary guest \
                     kernels hang under its KVM"
                .into(),
        });
    }
    Ok(Accel::Kvm)
}

/// The host TSC frequency in kHz, from the kernel log (`tsc: Detected 2300.000 MHz
/// processor`), else `/proc/cpuinfo`'s `cpu MHz`. Under TCG with ACPI, a stock kernel hangs at
/// TSC calibration unless the command line carries `tsc_early_khz=` (docs/hosts.md).
pub fn host_tsc_khz() -> Option<u64> {
    let from_log = std::process::Command::new("dmesg")
        .output()
        .ok()
        .and_then(|output| parse_tsc_khz(&String::from_utf8_lossy(&output.stdout)));
    from_log.or_else(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| parse_cpuinfo_khz(&text))
    })
}

fn parse_tsc_khz(log: &str) -> Option<u64> {
    log.lines().find_map(|line| {
        let rest = line.split("tsc: Detected ").nth(1)?;
        let mhz = rest.split_whitespace().next()?;
        mhz_to_khz(mhz)
    })
}

fn parse_cpuinfo_khz(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "cpu MHz").then(|| mhz_to_khz(value.trim()))?
    })
}

fn mhz_to_khz(mhz: &str) -> Option<u64> {
    let (whole, fraction) = mhz.split_once('.').unwrap_or((mhz, ""));
    let whole: u64 = whole.parse().ok()?;
    let fraction: String = fraction.chars().chain("000".chars()).take(3).collect();
    Some(whole * 1000 + fraction.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kvm_usable: bool, pvm_host: bool, forced: Option<&str>) -> HostFacts {
        HostFacts {
            kvm_usable,
            pvm_host,
            forced: forced.map(str::to_owned),
        }
    }

    #[test]
    fn kvm_is_chosen_only_when_it_really_works() {
        assert_eq!(choose(&facts(true, false, None)), Ok(Accel::Kvm));
        assert!(
            choose(&facts(true, true, None)).unwrap().is_tcg(),
            "PVM host"
        );
        assert!(choose(&facts(false, false, None)).unwrap().is_tcg());
        assert_eq!(choose(&facts(false, true, Some("kvm"))), Ok(Accel::Kvm));
        assert!(choose(&facts(true, false, Some("tcg"))).unwrap().is_tcg());
        assert!(choose(&facts(true, false, Some("hvf"))).is_err());
    }

    #[test]
    fn the_tsc_frequency_comes_from_the_kernel_log_or_cpuinfo() {
        assert_eq!(
            parse_tsc_khz("[    0.000057] tsc: Detected 2300.000 MHz processor\n"),
            Some(2_300_000)
        );
        assert_eq!(parse_tsc_khz("nothing here"), None);
        assert_eq!(
            parse_cpuinfo_khz("processor\t: 0\ncpu MHz\t\t: 2294.608\n"),
            Some(2_294_608)
        );
    }
}
