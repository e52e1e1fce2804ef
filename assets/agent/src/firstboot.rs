//! `banger-agent first-boot`: once per image instance, so clones of one image never share
//! identities: a fresh machine id and SSH host keys, then a marker file that the systemd unit
//! checks (`ConditionPathExists=!`). Each step is skipped when the image lacks its tool.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::console;

const MARKER: &str = "/var/lib/banger/first-boot.done";

pub fn run() -> Result<(), String> {
    std::fs::create_dir_all("/var/lib/banger")
        .map_err(|error| format!("cannot create /var/lib/banger: {error}"))?;
    if needs_machine_id(&std::fs::read_to_string("/etc/machine-id").unwrap_or_default()) {
        if let Some(setup) = find_program("systemd-machine-id-setup") {
            run_quietly(&setup, &[]);
        } else if let Err(error) = std::fs::write("/etc/machine-id", random_machine_id()? + "\n") {
            console::warn(&format!("cannot write /etc/machine-id: {error}"));
        }
    }
    if let Some(keygen) = find_program("ssh-keygen") {
        run_quietly(&keygen, &["-A"]);
    }
    std::fs::write(MARKER, b"").map_err(|error| format!("cannot write {MARKER}: {error}"))
}

/// An empty id, or systemd's "not set yet" placeholder, must be replaced.
pub fn needs_machine_id(current: &str) -> bool {
    let current = current.trim();
    current.is_empty() || current == "uninitialized"
}

fn random_machine_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|error| format!("cannot read /dev/urandom: {error}"))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

fn run_quietly(program: &Path, arguments: &[&str]) {
    match Command::new(program).args(arguments).output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => console::warn(&format!(
            "{} failed ({}): {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => console::warn(&format!("cannot run {}: {error}", program.display())),
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_else(|_| crate::exec::DEFAULT_PATH.to_owned());
    crate::exec::resolve_program(name, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_and_empty_machine_ids_are_replaced() {
        assert!(needs_machine_id(""));
        assert!(needs_machine_id("uninitialized\n"));
        assert!(!needs_machine_id("0123456789abcdef0123456789abcdef\n"));
    }

    #[test]
    fn random_machine_ids_are_32_hex_digits() {
        let id = random_machine_id().unwrap();
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, random_machine_id().unwrap());
    }
}
