//! A VM's shape (vCPUs, memory, disk) and its name.
//!
//! Each dimension resolves, first match wins: the command's flag, the config's
//! `[vm_defaults]`, a host heuristic (a quarter of the host's CPUs, at least 2 where the host
//! has them, at most 4; an eighth of its memory capped at 8 GiB), the built-in default (2 vCPUs, 2048 MiB, 8 GiB disk; the disk
//! has no heuristic: it is sparse, so its size costs nothing until written).

use std::fmt;

use crate::config::VmDefaults;

pub const BUILTIN_VCPUS: u32 = 2;
pub const BUILTIN_MEMORY_MIB: u64 = 2048;
pub const BUILTIN_DISK_BYTES: u64 = 8 << 30;
const MAX_HEURISTIC_VCPUS: u32 = 4;
/// systemd starts a guest's units in parallel: under emulation a Debian guest's agent was
/// ready at 9.6 s with 2 vCPUs against 13.1 s with 1 on a 2-CPU host (docs/decisions.md).
const MIN_HEURISTIC_VCPUS: u32 = 2;
const MAX_HEURISTIC_MEMORY_MIB: u64 = 8 << 10;
/// Below this a Debian guest with systemd does not boot comfortably.
const MIN_HEURISTIC_MEMORY_MIB: u64 = 512;

/// What the host offers, for the heuristics; `None` when it could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
}

impl HostResources {
    pub fn probe() -> HostResources {
        let cpus = std::thread::available_parallelism()
            .ok()
            .map(|count| count.get() as u32);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| parse_mem_total_kib(&text))
            .map(|kib| kib / 1024);
        HostResources { cpus, memory_mib }
    }
}

fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// What the user asked for on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShapeRequest {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_bytes: Option<u64>,
}

/// A resolved shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmShape {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
}

impl VmShape {
    pub fn resolve(request: &ShapeRequest, defaults: &VmDefaults, host: &HostResources) -> VmShape {
        let vcpus = request
            .vcpus
            .or(defaults.vcpu)
            .or(host.cpus.map(|cpus| {
                (cpus / 4)
                    .max(MIN_HEURISTIC_VCPUS.min(cpus))
                    .clamp(1, MAX_HEURISTIC_VCPUS)
            }))
            .unwrap_or(BUILTIN_VCPUS);
        let memory_mib = request
            .memory_mib
            .or(defaults.memory.map(|size| size.bytes() >> 20))
            .or(host
                .memory_mib
                .map(|mib| (mib / 8).clamp(MIN_HEURISTIC_MEMORY_MIB, MAX_HEURISTIC_MEMORY_MIB)))
            .unwrap_or(BUILTIN_MEMORY_MIB);
        let disk_bytes = request
            .disk_bytes
            .or(defaults.disk.map(|size| size.bytes()))
            .unwrap_or(BUILTIN_DISK_BYTES);
        VmShape {
            vcpus,
            memory_mib,
            disk_bytes,
        }
    }
}

impl fmt::Display for VmShape {
    /// `2 vcpu · 2048 MiB · 8G disk`, as every create prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = self.disk_bytes as f64 / (1u64 << 30) as f64;
        let disk = if self.disk_bytes.is_multiple_of(1 << 30) {
            format!("{}G", self.disk_bytes >> 30)
        } else if self.disk_bytes.is_multiple_of(1 << 20) {
            format!("{}M", self.disk_bytes >> 20)
        } else {
            format!("{gib:.1}G")
        };
        write!(
            f,
            "{} vcpu · {} MiB · {disk} disk",
            self.vcpus, self.memory_mib
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "`{name}` is not a valid VM name: use 1 to 63 lowercase letters, digits and `-`, starting \
     with a letter and not ending with `-` (it becomes the host name `{name}.vm`)"
)]
pub struct BadName {
    pub name: String,
}

/// Checks that `name` can be a VM's name: a DNS label, since the VM is reachable as
/// `<name>.vm`.
pub fn validate_name(name: &str) -> Result<(), BadName> {
    let bad = || BadName {
        name: name.to_owned(),
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > 63 {
        return Err(bad());
    }
    if !bytes[0].is_ascii_lowercase() || bytes[bytes.len() - 1] == b'-' {
        return Err(bad());
    }
    if !bytes
        .iter()
        .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || *byte == b'-')
    {
        return Err(bad());
    }
    Ok(())
}

const ADJECTIVES: &[&str] = &[
    "amber", "brisk", "calm", "dapper", "eager", "fuzzy", "gentle", "hardy", "icy", "jolly",
    "keen", "lucid", "mellow", "nimble", "olive", "plucky", "quiet", "rapid", "sunny", "tidy",
    "urban", "vivid", "witty", "young", "zesty",
];
const NOUNS: &[&str] = &[
    "badger", "comet", "dingo", "ember", "falcon", "gecko", "heron", "ibis", "jackal", "koala",
    "lemur", "marten", "newt", "otter", "panda", "quokka", "raven", "stoat", "tapir", "urchin",
    "vole", "walrus", "yak", "zebra",
];

/// A fresh `adjective-noun` name not in `taken` (a number is appended once the pairs run
/// out). `seed` picks the starting pair, so callers pass something that varies.
pub fn generate_name(taken: &[String], seed: u64) -> String {
    let pairs = (ADJECTIVES.len() * NOUNS.len()) as u64;
    for attempt in 0u64.. {
        let index = seed.wrapping_add(attempt.wrapping_mul(7919)) % pairs;
        let adjective = ADJECTIVES[(index / NOUNS.len() as u64) as usize];
        let noun = NOUNS[(index % NOUNS.len() as u64) as usize];
        let name = if attempt < pairs {
            format!("{adjective}-{noun}")
        } else {
            format!("{adjective}-{noun}-{}", attempt / pairs + 1)
        };
        if !taken.contains(&name) {
            return name;
        }
    }
    unreachable!("the loop returns once a name is free")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ByteSize;

    const NOTHING: HostResources = HostResources {
        cpus: None,
        memory_mib: None,
    };

    #[test]
    fn flags_beat_config_beat_host_beat_built_in() {
        let host = HostResources {
            cpus: Some(32),
            memory_mib: Some(128 << 10),
        };
        let none = VmDefaults::default();
        // Host heuristics, capped.
        assert_eq!(
            VmShape::resolve(&ShapeRequest::default(), &none, &host),
            VmShape {
                vcpus: 4,
                memory_mib: 8192,
                disk_bytes: 8 << 30
            }
        );
        // A small host: two vCPUs where it has two CPUs, never more than it has; memory has
        // a floor.
        let small = HostResources {
            cpus: Some(2),
            memory_mib: Some(2048),
        };
        let shape = VmShape::resolve(&ShapeRequest::default(), &none, &small);
        assert_eq!((shape.vcpus, shape.memory_mib), (2, 512));
        let single = HostResources {
            cpus: Some(1),
            memory_mib: Some(2048),
        };
        assert_eq!(
            VmShape::resolve(&ShapeRequest::default(), &none, &single).vcpus,
            1
        );
        // Built-in when the host cannot be read.
        assert_eq!(
            VmShape::resolve(&ShapeRequest::default(), &none, &NOTHING).to_string(),
            "2 vcpu · 2048 MiB · 8G disk"
        );
        // Config beats the host; flags beat config.
        let config = VmDefaults {
            vcpu: Some(3),
            memory: Some(ByteSize(1 << 30)),
            disk: Some(ByteSize(20 << 30)),
        };
        assert_eq!(
            VmShape::resolve(&ShapeRequest::default(), &config, &host).to_string(),
            "3 vcpu · 1024 MiB · 20G disk"
        );
        let flags = ShapeRequest {
            vcpus: Some(1),
            memory_mib: Some(768),
            disk_bytes: Some(512 << 20),
        };
        assert_eq!(
            VmShape::resolve(&flags, &config, &host).to_string(),
            "1 vcpu · 768 MiB · 512M disk"
        );
    }

    #[test]
    fn meminfo_is_read_in_kib() {
        assert_eq!(
            parse_mem_total_kib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000)
        );
        assert_eq!(parse_mem_total_kib("nothing"), None);
    }

    #[test]
    fn names_are_dns_labels() {
        for good in ["dev", "a", "web-1", "x".repeat(63).as_str()] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        for bad in ["", "Dev", "1web", "web-", "we_b", "web.vm", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(
            validate_name("Bad")
                .unwrap_err()
                .to_string()
                .contains("`Bad` is not a valid VM name")
        );
    }

    #[test]
    fn generated_names_are_valid_and_avoid_taken_ones() {
        let first = generate_name(&[], 42);
        assert_eq!(validate_name(&first), Ok(()));
        let second = generate_name(std::slice::from_ref(&first), 42);
        assert_ne!(second, first);
        assert_eq!(validate_name(&second), Ok(()));
        // Every pair taken: a number is appended.
        let mut taken = Vec::new();
        for adjective in ADJECTIVES {
            for noun in NOUNS {
                taken.push(format!("{adjective}-{noun}"));
            }
        }
        let numbered = generate_name(&taken, 7);
        assert!(numbered.ends_with("-2"), "{numbered}");
        assert_eq!(validate_name(&numbered), Ok(()));
    }
}
