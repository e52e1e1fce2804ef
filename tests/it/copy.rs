//! `vm cp` without a VM: `ops::copy` against the real agent serving a unix socket, so the
//! "guest" is this host's file system and its `tar` and `sh` are the ones the copy runs.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use banger::ops::copy::{self, CopyError, HostDestination, HostSource, ToGuest};

use crate::guest::Agent;

const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn mode(path: &Path) -> u32 {
    path.symlink_metadata().unwrap().mode() & 0o7777
}

/// `tree/` with a nested file, an executable, a symlink, an empty directory and a file owned
/// by uid 1234 (when run as root).
pub(crate) fn make_tree(root: &Path) -> std::path::PathBuf {
    let tree = root.join("tree");
    std::fs::create_dir_all(tree.join("sub/empty")).unwrap();
    std::fs::write(tree.join("sub/data.txt"), b"data\n").unwrap();
    std::fs::set_permissions(
        tree.join("sub/data.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::write(tree.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(tree.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("sub/data.txt", tree.join("link")).unwrap();
    std::fs::write(tree.join("owned"), b"x").unwrap();
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(tree.join("owned"), Some(1234), Some(1234)).unwrap();
    }
    tree
}

pub(crate) fn assert_same_tree(copied: &Path) {
    assert_eq!(
        std::fs::read(copied.join("sub/data.txt")).unwrap(),
        b"data\n"
    );
    assert_eq!(mode(&copied.join("sub/data.txt")), 0o640);
    assert_eq!(mode(&copied.join("run.sh")), 0o755);
    assert_eq!(
        std::fs::read_link(copied.join("link")).unwrap(),
        Path::new("sub/data.txt")
    );
    assert!(copied.join("sub/empty").is_dir());
}

#[tokio::test]
async fn a_tree_goes_into_the_guest_and_back_with_modes_and_links() {
    let agent = Agent::start_with_path(SYSTEM_PATH);
    let mut channel = agent.channel().await;
    let host = tempfile::tempdir().unwrap();
    let guest = tempfile::tempdir().unwrap();
    let tree = make_tree(host.path());

    // Into an existing guest directory: the tree keeps its name, root owns it.
    let summary = copy::to_guest(
        &mut channel,
        &ToGuest {
            source: HostSource::Path(tree.clone()),
            destination: guest.path().display().to_string(),
            keep_owner: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.files, summary.directories, summary.symlinks),
        (3, 3, 1)
    );
    let in_guest = guest.path().join("tree");
    assert_same_tree(&in_guest);
    if nix::unistd::geteuid().is_root() {
        assert_eq!(in_guest.join("owned").metadata().unwrap().uid(), 0);
    }

    // To a new guest path with -a: the copy takes that name and keeps the host's owners.
    let renamed = guest.path().join("renamed");
    copy::to_guest(
        &mut channel,
        &ToGuest {
            source: HostSource::Path(tree.clone()),
            destination: renamed.display().to_string(),
            keep_owner: true,
        },
    )
    .await
    .unwrap();
    assert_same_tree(&renamed);
    if nix::unistd::geteuid().is_root() {
        assert_eq!(renamed.join("owned").metadata().unwrap().uid(), 1234);
    }

    // Back out: to a new host path, into an existing directory, and a directory's contents.
    let back = host.path().join("back");
    let summary = copy::from_guest(
        &mut channel,
        &in_guest.display().to_string(),
        &HostDestination::Path(back.clone()),
    )
    .await
    .unwrap();
    assert_same_tree(&back);
    assert_eq!(summary.files, 3);
    let into = host.path().join("into");
    std::fs::create_dir(&into).unwrap();
    copy::from_guest(
        &mut channel,
        &in_guest.display().to_string(),
        &HostDestination::Path(into.clone()),
    )
    .await
    .unwrap();
    assert_same_tree(&into.join("tree"));
    let contents = host.path().join("contents");
    copy::from_guest(
        &mut channel,
        &format!("{}/.", in_guest.display()),
        &HostDestination::Path(contents.clone()),
    )
    .await
    .unwrap();
    assert_same_tree(&contents);

    // One file onto an existing file replaces it; nothing is left in the staging area.
    std::fs::write(host.path().join("data.txt"), b"old").unwrap();
    copy::from_guest(
        &mut channel,
        &in_guest.join("sub/data.txt").display().to_string(),
        &HostDestination::Path(host.path().join("data.txt")),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(host.path().join("data.txt")).unwrap(),
        b"data\n"
    );
    let leftovers: Vec<_> = std::fs::read_dir(host.path())
        .unwrap()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with(".banger-cp")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn bad_destinations_are_refused_with_their_names() {
    let agent = Agent::start_with_path(SYSTEM_PATH);
    let mut channel = agent.channel().await;
    let host = tempfile::tempdir().unwrap();
    let guest = tempfile::tempdir().unwrap();
    let tree = make_tree(host.path());
    std::fs::write(guest.path().join("file"), b"x").unwrap();

    let into_guest = |destination: String| ToGuest {
        source: HostSource::Path(tree.clone()),
        destination,
        keep_owner: false,
    };
    let error = copy::to_guest(
        &mut channel,
        &into_guest(guest.path().join("file").display().to_string()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, CopyError::GuestDestination { .. }),
        "{error}"
    );
    let error = copy::to_guest(
        &mut channel,
        &into_guest(guest.path().join("no/such/dir").display().to_string()),
    )
    .await
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("parent directory does not exist"),
        "{error}"
    );
    let error = copy::to_guest(&mut channel, &into_guest("relative/path".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(error, CopyError::RelativeGuestPath { .. }),
        "{error}"
    );

    // A guest path that does not exist: the guest's tar says so.
    let error = copy::from_guest(
        &mut channel,
        &guest.path().join("missing").display().to_string(),
        &HostDestination::Path(host.path().join("out")),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, CopyError::GuestTar { .. }), "{error}");
    assert!(!host.path().join("out").exists());
}

/// A stream that makes `loot/out`, a symlink to `outside`, then writes `loot/out/pwned`
/// through it, as a compromised guest's `tar` could send.
pub(crate) fn tar_writing_through_a_symlink(outside: &Path) -> Vec<u8> {
    let mut hostile = Vec::new();
    let mut builder = tar::Builder::new(&mut hostile);
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    builder
        .append_data(&mut header, "loot", std::io::empty())
        .unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_mode(0o777);
    header.set_size(0);
    builder
        .append_link(&mut header, "loot/out", outside)
        .unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(6);
    builder
        .append_data(&mut header, "loot/out/pwned", &b"pwned\n"[..])
        .unwrap();
    builder.finish().unwrap();
    drop(builder);
    hostile
}

#[tokio::test]
async fn a_hostile_stream_from_the_guest_writes_nothing_outside() {
    let host = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let hostile = tar_writing_through_a_symlink(outside.path());
    let fake = tempfile::tempdir().unwrap();
    std::fs::write(fake.path().join("hostile.tar"), &hostile).unwrap();
    let script = fake.path().join("tar");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec cat {}\n",
            fake.path().join("hostile.tar").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let agent = Agent::start_with_path(&format!("{}:{SYSTEM_PATH}", fake.path().display()));
    let mut channel = agent.channel().await;
    let destination = host.path().join("dst");
    let error = copy::from_guest(
        &mut channel,
        "/srv/loot",
        &HostDestination::Path(destination.clone()),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, CopyError::Refused { .. }), "{error}");
    let chain = format!("{:?}", anyhow::Error::from(error));
    assert!(
        chain.contains("symlink"),
        "the refusal names the symlink: {chain}"
    );
    assert!(!outside.path().join("pwned").exists());
    assert!(!destination.exists());
    assert_eq!(std::fs::read_dir(host.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_guest_without_tar_is_told_apart() {
    let empty = tempfile::tempdir().unwrap();
    let agent = Agent::start_with_path(&empty.path().display().to_string());
    let mut channel = agent.channel().await;
    let host = tempfile::tempdir().unwrap();
    let error = copy::from_guest(
        &mut channel,
        "/etc/hostname",
        &HostDestination::Path(host.path().join("x")),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, CopyError::NoTarInGuest), "{error}");
}
