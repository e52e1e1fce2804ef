//! `banger-agent stats [--json]`: uptime, load, memory and disk use of the guest, for
//! `banger vm stats NAME`. Read from `/proc` and `statvfs`, so it works in any image.

use std::path::Path;

use crate::protocol::{FilesystemUse, GuestStats};

/// The file systems reported: the root and the work disk.
const MOUNTS: [&str; 2] = ["/", "/root"];

/// `banger-agent stats [--json]`.
pub fn command(arguments: &[String]) -> Result<(), String> {
    let mut json = false;
    for argument in arguments {
        match argument.as_str() {
            "--json" => json = true,
            other => return Err(format!("stats: unknown argument `{other}`")),
        }
    }
    let stats = collect(Path::new("/proc"))?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&stats).map_err(|error| error.to_string())?
        );
    } else {
        println!(
            "up {:.0} s, load {:.2} {:.2} {:.2}, {} processes, memory {} of {} MiB available",
            stats.uptime_secs,
            stats.load[0],
            stats.load[1],
            stats.load[2],
            stats.processes,
            stats.memory_available_bytes >> 20,
            stats.memory_total_bytes >> 20
        );
        for filesystem in &stats.filesystems {
            println!(
                "{}: {} of {} MiB used",
                filesystem.mount,
                filesystem.used_bytes >> 20,
                filesystem.total_bytes >> 20
            );
        }
    }
    Ok(())
}

/// The guest's figures, from `proc` (a procfs mount) and the mounts' `statvfs`.
pub fn collect(proc: &Path) -> Result<GuestStats, String> {
    let read = |name: &str| {
        std::fs::read_to_string(proc.join(name))
            .map_err(|error| format!("cannot read {}: {error}", proc.join(name).display()))
    };
    let uptime_secs = parse_uptime(&read("uptime")?)
        .ok_or_else(|| format!("{}: unexpected contents", proc.join("uptime").display()))?;
    let (load, processes) = parse_loadavg(&read("loadavg")?)
        .ok_or_else(|| format!("{}: unexpected contents", proc.join("loadavg").display()))?;
    let (memory_total_bytes, memory_available_bytes) = parse_meminfo(&read("meminfo")?)
        .ok_or_else(|| {
            format!(
                "{}: no MemTotal/MemAvailable",
                proc.join("meminfo").display()
            )
        })?;
    let mut filesystems = Vec::new();
    let mut seen = Vec::new();
    for mount in MOUNTS {
        // `/root` on the root file system (no work disk mounted) is the same file system.
        let Ok(stat) = nix::sys::statvfs::statvfs(mount) else {
            continue;
        };
        let id = stat.filesystem_id();
        if seen.contains(&id) {
            continue;
        }
        seen.push(id);
        let fragment = stat.fragment_size();
        let total_bytes = stat.blocks() * fragment;
        let used_bytes = total_bytes.saturating_sub(stat.blocks_free() * fragment);
        filesystems.push(FilesystemUse {
            mount: mount.to_owned(),
            total_bytes,
            used_bytes,
        });
    }
    Ok(GuestStats {
        uptime_secs,
        load,
        processes,
        memory_total_bytes,
        memory_available_bytes,
        filesystems,
    })
}

/// `12345.67 23456.78` → 12345.67.
fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `0.10 0.20 0.30 2/150 4242` → ([0.1, 0.2, 0.3], 150).
fn parse_loadavg(text: &str) -> Option<([f64; 3], u64)> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let load = [
        fields.first()?.parse().ok()?,
        fields.get(1)?.parse().ok()?,
        fields.get(2)?.parse().ok()?,
    ];
    let processes = fields.get(3)?.split_once('/')?.1.parse().ok()?;
    Some((load, processes))
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes.
fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|line| line.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        assert_eq!(parse_uptime("12345.67 23456.78\n"), Some(12345.67));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(
            parse_loadavg("0.10 0.20 0.30 2/150 4242\n"),
            Some(([0.1, 0.2, 0.3], 150))
        );
        assert_eq!(parse_loadavg("0.10 0.20"), None);
        let meminfo = "MemTotal:        1012345 kB\nMemFree:          500000 kB\n\
                       MemAvailable:     800000 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            Some((1_012_345 * 1024, 800_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn this_machines_figures_are_plausible() {
        let stats = collect(Path::new("/proc")).unwrap();
        assert!(stats.uptime_secs > 0.0, "{stats:?}");
        assert!(stats.processes >= 1, "{stats:?}");
        assert!(
            stats.memory_available_bytes <= stats.memory_total_bytes
                && stats.memory_total_bytes > 0,
            "{stats:?}"
        );
        let root = stats
            .filesystems
            .iter()
            .find(|filesystem| filesystem.mount == "/")
            .expect("the root file system");
        assert!(
            root.used_bytes <= root.total_bytes && root.total_bytes > 0,
            "{stats:?}"
        );
    }
}
