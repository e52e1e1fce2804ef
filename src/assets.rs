//! Guest-side files embedded in the binary (`assets/`), written into images by the agent
//! injection step.
//!
//! Their combined digest is a parameter of that step, so changing any asset re-keys every image
//! that carries it, and nothing else.
//!
//! Every asset is written root-owned (uid 0, gid 0); missing parent directories are created
//! root-owned with mode 0755. Units are enabled by the `*.wants` symlinks listed here, exactly
//! as `systemctl enable` would, so nothing has to run inside the image.

use crate::key::KeyEncoder;

/// The static agent binary built from `assets/agent` by `build.rs`.
pub const AGENT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/banger-agent"));

/// Where the agent lives in every image.
pub const AGENT_GUEST_PATH: &str = "/usr/local/bin/banger-agent";

/// The vsock port the agent listens on (see `assets/agent/src/main.rs`).
pub const AGENT_VSOCK_PORT: u32 = 10_789;

/// What one guest asset is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    File { mode: u32, contents: &'static [u8] },
    Symlink { target: &'static str },
}

/// One embedded guest file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestAsset {
    /// Absolute path inside the guest.
    pub guest_path: &'static str,
    pub kind: AssetKind,
}

const fn file(guest_path: &'static str, mode: u32, contents: &'static [u8]) -> GuestAsset {
    GuestAsset {
        guest_path,
        kind: AssetKind::File { mode, contents },
    }
}

const fn symlink(guest_path: &'static str, target: &'static str) -> GuestAsset {
    GuestAsset {
        guest_path,
        kind: AssetKind::Symlink { target },
    }
}

/// Every guest asset, in the order they are written.
pub const GUEST_ASSETS: &[GuestAsset] = &[
    file(AGENT_GUEST_PATH, 0o755, AGENT_BINARY),
    file(
        "/usr/local/libexec/banger-first-boot",
        0o755,
        include_bytes!("../assets/libexec/banger-first-boot"),
    ),
    file(
        "/etc/systemd/system/banger-agent.service",
        0o644,
        include_bytes!("../assets/systemd/banger-agent.service"),
    ),
    file(
        "/etc/systemd/system/systemd-tmpfiles-setup.service.d/banger-agent.conf",
        0o644,
        include_bytes!("../assets/systemd/systemd-tmpfiles-setup.service.d/banger-agent.conf"),
    ),
    // Replaces the image's own (Debian's empties /tmp late in the boot: see the file).
    file(
        "/etc/tmpfiles.d/tmp.conf",
        0o644,
        include_bytes!("../assets/tmpfiles.d/tmp.conf"),
    ),
    file(
        "/etc/systemd/system/banger-network.service",
        0o644,
        include_bytes!("../assets/systemd/banger-network.service"),
    ),
    file(
        "/etc/systemd/system/banger-first-boot.service",
        0o644,
        include_bytes!("../assets/systemd/banger-first-boot.service"),
    ),
    symlink(
        "/etc/systemd/system/sysinit.target.wants/banger-agent.service",
        "../banger-agent.service",
    ),
    symlink(
        "/etc/systemd/system/sysinit.target.wants/banger-network.service",
        "../banger-network.service",
    ),
    symlink(
        "/etc/systemd/system/multi-user.target.wants/banger-first-boot.service",
        "../banger-first-boot.service",
    ),
    // Masked: `console=ttyS0` makes systemd's getty generator start a login prompt on the
    // serial console, whose device job waits 90 s under QEMU microvm before it gives up, and
    // multi-user.target waits with it (measured: reached at 93 s instead of 9 s). banger
    // offers no console login: the agent and ssh are the ways in.
    symlink(
        "/etc/systemd/system/serial-getty@ttyS0.service",
        "/dev/null",
    ),
    // Masked for the same reason, and because they compete for the guest's vCPUs with the
    // first commands: logins on virtual terminals no banger VM has a display for (Debian
    // starts tty1 to tty6, 1.6 s of unit time under TCG), and e2scrub's reaper of LVM
    // snapshots (3 s), which a banger VM has none of.
    symlink("/etc/systemd/system/getty@.service", "/dev/null"),
    symlink("/etc/systemd/system/getty-static.service", "/dev/null"),
    symlink("/etc/systemd/system/e2scrub_reap.service", "/dev/null"),
    // Generators run before systemd starts any unit, the agent's included: under TCG each
    // costs tens of milliseconds of a boot. These do nothing in a banger VM (no EFI boot
    // counting, encrypted, integrity or verity volumes, GPT auto-discovery, hibernation,
    // offline updates, and no console login: see the mask above), so they are disabled the way
    // systemd.generator(7) documents, by a /dev/null link of the same name. The ones an image
    // may rely on stay: fstab, rc-local, sysv, and debug (`systemd.mask=` on the command line).
    symlink(
        "/etc/systemd/system-generators/systemd-bless-boot-generator",
        "/dev/null",
    ),
    symlink(
        "/etc/systemd/system-generators/systemd-cryptsetup-generator",
        "/dev/null",
    ),
    symlink(
        "/etc/systemd/system-generators/systemd-integritysetup-generator",
        "/dev/null",
    ),
    symlink(
        "/etc/systemd/system-generators/systemd-veritysetup-generator",
        "/dev/null",
    ),
    symlink(
        "/etc/systemd/system-generators/systemd-gpt-auto-generator",
        "/dev/null",
    ),
    symlink(
        "/etc/systemd/system-generators/systemd-hibernate-resume-generator",
        "/dev/null",
    ),
    symlink(
        "/etc/systemd/system-generators/systemd-system-update-generator",
        "/dev/null",
    ),
    symlink(
        "/etc/systemd/system-generators/systemd-getty-generator",
        "/dev/null",
    ),
    file(
        "/etc/modules-load.d/banger-vsock.conf",
        0o644,
        include_bytes!("../assets/modules-load.d/banger-vsock.conf"),
    ),
    file(
        "/etc/ssh/sshd_config.d/00-banger.conf",
        0o644,
        include_bytes!("../assets/sshd/banger.conf"),
    ),
];

/// Digest of the agent binary alone (`blake3:<hex>`): what an initramfs built around it is
/// keyed by.
pub fn agent_digest() -> String {
    format!("blake3:{}", blake3::hash(AGENT_BINARY).to_hex())
}

/// Digest over every asset's path, kind and contents (`blake3:<hex>`).
pub fn guest_assets_digest() -> String {
    let mut encoder = KeyEncoder::new("banger/guest-assets/v2");
    encoder.u64(GUEST_ASSETS.len() as u64);
    for asset in GUEST_ASSETS {
        encoder.str(asset.guest_path);
        match asset.kind {
            AssetKind::File { mode, contents } => {
                encoder.tag(b'f');
                encoder.u64(u64::from(mode));
                encoder.bytes(contents);
            }
            AssetKind::Symlink { target } => {
                encoder.tag(b'l');
                encoder.str(target);
            }
        }
    }
    format!("blake3:{}", encoder.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ELF program header type of the dynamic loader request: a static binary has none.
    const PT_INTERP: u32 = 3;

    #[test]
    fn the_agent_is_a_static_x86_64_elf() {
        let elf = AGENT_BINARY;
        assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
        assert_eq!(elf[4], 2, "not 64-bit");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "not x86_64");
        let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes([elf[54], elf[55]]) as usize;
        let phnum = u16::from_le_bytes([elf[56], elf[57]]) as usize;
        for index in 0..phnum {
            let header = &elf[phoff + index * phentsize..];
            let kind = u32::from_le_bytes(header[..4].try_into().unwrap());
            assert_ne!(kind, PT_INTERP, "the agent asks for a dynamic loader");
        }
    }

    #[test]
    fn the_agent_runs_and_reports_its_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger-agent");
        std::fs::write(&path, AGENT_BINARY).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Another test thread forking while the file was open for writing holds it open
        // until that child execs: ETXTBSY for a moment.
        let mut attempts = 0;
        let output = loop {
            match std::process::Command::new(&path).arg("--version").output() {
                Err(error) if error.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other.unwrap(),
            }
        };
        assert!(output.status.success());
        assert!(
            String::from_utf8_lossy(&output.stdout)
                .contains(&format!("protocol {}", crate::guest::PROTOCOL_VERSION)),
            "{output:?}"
        );
    }

    #[test]
    fn guest_paths_are_absolute_and_unique() {
        let mut paths: Vec<&str> = GUEST_ASSETS.iter().map(|asset| asset.guest_path).collect();
        assert!(paths.iter().all(|path| path.starts_with('/')));
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), GUEST_ASSETS.len());
    }
}
