//! Per-instance identity that must never land in an image: every VM makes its own at first
//! boot (`assets/agent/src/firstboot.rs`, `banger-first-boot`), so two VMs of one image never
//! share SSH host keys or a machine id.
//!
//! Two places keep it out: [`strip`] removes it from every image `rootfs.build` writes
//! (whatever the base brought: Debian's `openssh-server` makes host keys when it is
//! installed), and [`RUN_LAYER_EXCLUDES`] keeps it, and what only the builder VM needed, out
//! of the layers `run` steps make.

use std::path::Path;

use crate::ext4::{EntryKind, EntryType, Ext4Builder, Ext4Error, Metadata};

/// Files that identify one machine, relative to the image root. A trailing `*` matches any
/// name that starts with what precedes it, in that directory.
pub const IDENTITY_PATHS: &[&str] = &[
    "etc/ssh/ssh_host_*",
    "var/lib/systemd/random-seed",
    "var/lib/systemd/credential.secret",
    "var/lib/dbus/machine-id",
    // The marker that first boot ran: an image must make its VMs run it.
    "var/lib/banger/first-boot.done",
];

/// Emptied rather than removed: systemd treats an empty `/etc/machine-id` as "first boot,
/// make one", and some programs expect the file to exist.
pub const MACHINE_ID: &str = "etc/machine-id";

/// Removes [`IDENTITY_PATHS`] and empties [`MACHINE_ID`] in an image being built. A
/// `var/lib/dbus/machine-id` that is a symlink (to `/etc/machine-id`, as Debian ships it) is
/// kept.
pub fn strip(builder: &mut Ext4Builder) -> Result<(), Ext4Error> {
    for pattern in IDENTITY_PATHS {
        for path in matching(builder, pattern) {
            let is_link = builder
                .lookup(Path::new(&path))
                .is_some_and(|info| info.kind == EntryType::Symlink);
            if is_link && path.ends_with("machine-id") {
                continue;
            }
            builder.remove(Path::new(&path))?;
        }
    }
    let machine_id = Path::new(MACHINE_ID);
    if builder
        .lookup(machine_id)
        .is_some_and(|info| info.kind == EntryType::File)
    {
        let mut empty: &[u8] = &[];
        builder.insert(
            machine_id,
            EntryKind::File {
                size: 0,
                data: &mut empty,
            },
            &Metadata {
                mode: 0o444,
                ..Metadata::default()
            },
        )?;
    }
    Ok(())
}

/// The paths in the image that `pattern` names (see [`IDENTITY_PATHS`]).
fn matching(builder: &Ext4Builder, pattern: &str) -> Vec<String> {
    let Some(prefix) = pattern.strip_suffix('*') else {
        return if builder.lookup(Path::new(pattern)).is_some() {
            vec![pattern.to_owned()]
        } else {
            Vec::new()
        };
    };
    let (dir, start) = prefix.rsplit_once('/').unwrap_or(("", prefix));
    let Some(children) = builder.children(Path::new(dir)) else {
        return Vec::new();
    };
    children
        .into_iter()
        .filter_map(|name| {
            let name = name.to_string_lossy().into_owned();
            name.starts_with(start).then(|| format!("{dir}/{name}"))
        })
        .collect()
}

/// What a `run` step's layer leaves out, as exclusion rules for the diff export:
/// identity (above), and what exists only because a builder VM ran (its `resolv.conf`, its
/// temporary files, runtime state and journal).
pub const RUN_LAYER_EXCLUDES: &[RunExclude] = &[
    RunExclude::Path("etc/machine-id"),
    RunExclude::Path("etc/ssh/ssh_host_*"),
    RunExclude::Path("var/lib/systemd/random-seed"),
    RunExclude::Path("var/lib/systemd/credential.secret"),
    RunExclude::Path("var/lib/dbus/machine-id"),
    RunExclude::Path("var/lib/banger"),
    // The builder's agent writes it from the VM's network; a command cannot change it
    // (as with `docker build`).
    RunExclude::Path("etc/resolv.conf"),
    RunExclude::Contents("tmp"),
    RunExclude::Contents("run"),
    RunExclude::Contents("var/log/journal"),
];

/// One exclusion from a `run` layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunExclude {
    /// The entry and everything under it.
    Path(&'static str),
    /// What is under the directory, not the directory itself.
    Contents(&'static str),
}
