//! `banger vm cp`: files and directory trees between the host and a running guest, as a tar
//! stream through the guest's agent, with `docker cp`'s naming rules.
//!
//! The guest side is the guest's own `tar` run through `Exec` (`tar -c` to read, `tar -x` to
//! write), so the agent needs nothing new and the guest's idea of owners and special files
//! holds. Its output is not trusted: on the host it is extracted by [`crate::untar`] into a
//! fresh temporary directory beside the destination (no `..`, no absolute names, nothing
//! written through a symlink, no setuid/setgid), then moved into place, so a refused or
//! broken stream leaves the destination as it was.
//!
//! Naming, for `SRC` and `DST` as in `docker cp`:
//! - DST an existing directory: SRC lands inside it under its own name.
//! - DST absent (its parent must exist): SRC is created as DST.
//! - DST an existing file: a file SRC replaces it; a directory SRC is refused.
//! - SRC ending in `/.`: the directory's contents, not the directory, are copied into DST.
//! - `-` as DST (from a guest) writes the raw tar stream to stdout; as SRC (to a guest) reads
//!   one from stdin and extracts it into DST, which must be a directory.
//!
//! A directory copied onto an existing one is merged: files replace files (and symlinks)
//! of the same name, directories merge, a file meeting a directory (or the reverse) is refused
//! before anything is moved. Symlinks in the destination are never followed: one where a
//! directory is needed is refused. Copies into a guest are owned by root unless
//! [`ToGuest::keep_owner`]; copies onto the host are owned by the caller.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tokio::io::AsyncWrite;

use crate::guest::{ErrorKind, ExecRequest, GuestChannel, GuestError};
use crate::untar::{self, LinkTargets, SpecialFiles, UntarError};

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("the guest path {path:?} is not absolute")]
    RelativeGuestPath { path: String },
    #[error("{path}: {reason}")]
    HostDestination { path: PathBuf, reason: String },
    #[error("cannot read {}", path.display())]
    HostSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the guest path {path}: {reason}")]
    GuestDestination { path: String, reason: String },
    #[error("the guest has no `tar`, which `vm cp` runs there")]
    NoTarInGuest,
    #[error("`{argv}` failed in the guest ({status}): {stderr}")]
    GuestTar {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("the guest's tar stream for {source_path} is refused")]
    Refused {
        source_path: String,
        #[source]
        source: UntarError,
    },
    #[error("the guest sent nothing for {path} (an empty archive)")]
    NothingReceived { path: String },
    #[error("cannot move the copy into {}", path.display())]
    Place {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("cannot set up the local side of the stream")]
    Pipe(#[source] io::Error),
}

impl crate::error::Classify for CopyError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            CopyError::RelativeGuestPath { .. }
            | CopyError::HostDestination { .. }
            | CopyError::HostSource { .. }
            | CopyError::GuestDestination { .. } => ErrorClass::User,
            // The guest's side did not hold: a missing path there, a hostile or broken stream.
            CopyError::GuestTar { .. }
            | CopyError::Refused { .. }
            | CopyError::NothingReceived { .. }
            | CopyError::NoTarInGuest => ErrorClass::Failed,
            CopyError::Place { .. } | CopyError::Guest(_) | CopyError::Pipe(_) => {
                ErrorClass::Environment
            }
        }
    }
}

/// What a copy moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopySummary {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Devices, FIFOs and sockets left out.
    pub skipped: u64,
    /// Bytes of file contents.
    pub bytes: u64,
}

/// Where a copy out of a guest goes.
#[derive(Debug, Clone)]
pub enum HostDestination {
    Path(PathBuf),
    /// The raw tar stream, to this process's stdout.
    Stdout,
}

/// Where a copy into a guest comes from.
#[derive(Debug, Clone)]
pub enum HostSource {
    Path(PathBuf),
    /// A tar stream on this process's stdin.
    Stdin,
}

/// A copy into a guest.
#[derive(Debug, Clone)]
pub struct ToGuest {
    pub source: HostSource,
    /// Absolute path in the guest.
    pub destination: String,
    /// Keep the host's uid/gid instead of making the copy root's.
    pub keep_owner: bool,
}

/// What the host keeps of a guest's entries: any symlink (as data), permission bits without
/// setuid/setgid, times; devices and FIFOs are left out.
const FROM_GUEST_RULES: untar::Rules = untar::Rules {
    link_targets: LinkTargets::Anywhere,
    special_files: SpecialFiles::Skip,
    mode_mask: 0o1777,
    directory_mode_floor: 0,
    keep_times: true,
};

/// A guest path split for `tar -C DIR MEMBER`: the member is `./NAME`, or `.` for the
/// contents of a directory (`SRC/.`, or `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct GuestSource {
    directory: String,
    member: String,
    /// The name the copy gets when DST is a directory; `None` for contents.
    name: Option<String>,
}

fn guest_source(path: &str) -> Result<GuestSource, CopyError> {
    if !path.starts_with('/') {
        return Err(CopyError::RelativeGuestPath { path: path.into() });
    }
    let contents = path.ends_with("/.");
    let trimmed = path.trim_end_matches("/.").trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(GuestSource {
            directory: "/".into(),
            member: ".".into(),
            name: None,
        });
    }
    if contents {
        return Ok(GuestSource {
            directory: trimmed.into(),
            member: ".".into(),
            name: None,
        });
    }
    let (parent, name) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    Ok(GuestSource {
        directory: if parent.is_empty() { "/" } else { parent }.into(),
        member: format!("./{name}"),
        name: Some(name.into()),
    })
}

/// Copies `source` (a guest path) out of the guest.
pub async fn from_guest(
    channel: &mut GuestChannel,
    source: &str,
    destination: &HostDestination,
) -> Result<CopySummary, CopyError> {
    let split = guest_source(source)?;
    let argv = vec![
        "tar".to_owned(),
        "-C".into(),
        split.directory.clone(),
        "-cf".into(),
        "-".into(),
        split.member.clone(),
    ];
    let path = match destination {
        HostDestination::Stdout => {
            run_guest_tar(
                channel,
                &argv,
                None::<tokio::io::Empty>,
                tokio::io::stdout(),
            )
            .await?;
            return Ok(CopySummary::default());
        }
        HostDestination::Path(path) => path,
    };
    let plan = plan_host_destination(path, split.name.as_deref())?;
    let staging = tempfile::Builder::new()
        .prefix(".banger-cp-")
        .tempdir_in(&plan.staging_parent)
        .map_err(|error| CopyError::HostDestination {
            path: plan.staging_parent.clone(),
            reason: format!("cannot make a temporary directory there: {error}"),
        })?;
    let staging = StagingDir(Some(staging));
    let (reader, writer) = io::pipe().map_err(CopyError::Pipe)?;
    let root = staging.path().to_owned();
    let extraction = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let result = untar::extract_into(
            &mut tar::Archive::new(&mut reader),
            &root,
            &FROM_GUEST_RULES,
            &|_| true,
        );
        // The guest's tar pads its stream past the end-of-archive blocks: read it all, or the
        // sender would fail on a closed pipe.
        if result.is_ok() {
            let _ = io::copy(&mut reader, &mut io::sink());
        }
        result
    });
    let sender =
        tokio::net::unix::pipe::Sender::from_owned_fd(writer.into()).map_err(CopyError::Pipe)?;
    let streamed = run_guest_tar(channel, &argv, None::<tokio::io::Empty>, sender).await;
    let extracted = extraction
        .await
        .map_err(|error| CopyError::Pipe(io::Error::other(error)))?;
    // A refused stream makes the guest's writes fail too: the refusal is the news.
    let summary = match (extracted, streamed) {
        (Err(refusal), _) => {
            return Err(CopyError::Refused {
                source_path: source.into(),
                source: refusal,
            });
        }
        (Ok(_), Err(error)) => return Err(error),
        (Ok(summary), Ok(())) => summary,
    };
    let produced = match &split.name {
        Some(name) => staging.path().join(name),
        None => staging.path().to_owned(),
    };
    if split.name.is_some() && produced.symlink_metadata().is_err() {
        return Err(CopyError::NothingReceived {
            path: source.into(),
        });
    }
    if split.name.is_none() {
        // The staging directory itself becomes the copy when DST is new: give it a
        // directory's usual mode rather than a temporary one's 0700.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&produced, std::fs::Permissions::from_mode(0o755)).map_err(
            |source| CopyError::Place {
                path: plan.target.clone(),
                source,
            },
        )?;
    }
    place(&produced, &plan.target)?;
    Ok(CopySummary {
        files: summary.files + summary.hard_links,
        directories: summary.directories,
        symlinks: summary.symlinks,
        skipped: summary.skipped,
        bytes: summary.bytes,
    })
}

/// Where a copy onto the host ends up.
struct HostPlan {
    /// The path the copy takes (it may exist: then it is replaced or merged into).
    target: PathBuf,
    /// The directory to stage in: the target's parent, so the move is a rename.
    staging_parent: PathBuf,
}

fn plan_host_destination(path: &Path, name: Option<&str>) -> Result<HostPlan, CopyError> {
    let refuse = |reason: &str| CopyError::HostDestination {
        path: path.to_owned(),
        reason: reason.into(),
    };
    // The destination the user named is followed if it is a symlink (`cp` does the same);
    // nothing below it is.
    match (std::fs::metadata(path), name) {
        (Ok(meta), Some(name)) if meta.is_dir() => Ok(HostPlan {
            target: path.join(name),
            staging_parent: path.to_owned(),
        }),
        (Ok(meta), None) if !meta.is_dir() => Err(refuse(
            "is not a directory, and the source is a directory's contents",
        )),
        (Ok(_), _) => Ok(HostPlan {
            target: path.to_owned(),
            staging_parent: parent_of(path),
        }),
        (Err(error), _) if error.kind() == io::ErrorKind::NotFound => {
            let parent = parent_of(path);
            if !parent.is_dir() {
                return Err(refuse("its parent directory does not exist"));
            }
            Ok(HostPlan {
                target: path.to_owned(),
                staging_parent: parent,
            })
        }
        (Err(error), _) => Err(refuse(&error.to_string())),
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// A staging directory, removed with whatever it still holds, read-only directories included.
struct StagingDir(Option<tempfile::TempDir>);

impl StagingDir {
    fn path(&self) -> &Path {
        self.0.as_ref().map_or(Path::new(""), |dir| dir.path())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            make_writable(dir.path());
            let _ = std::fs::remove_dir_all(dir.path());
        }
    }
}

/// Gives the owner write access to every directory below `path`, so it can be removed.
fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = path.symlink_metadata() else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(meta.mode() & 0o7777 | 0o700),
    );
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}

/// Moves `produced` to `target`: a rename when the target is absent, else a merge checked in
/// full before anything moves.
fn place(produced: &Path, target: &Path) -> Result<(), CopyError> {
    check_merge(produced, target)?;
    merge(produced, target)
}

fn conflict(target: &Path, reason: &str) -> CopyError {
    CopyError::HostDestination {
        path: target.to_owned(),
        reason: reason.into(),
    }
}

/// Whether `produced` can be moved onto `target` with nothing refused half-way.
fn check_merge(produced: &Path, target: &Path) -> Result<(), CopyError> {
    let Ok(existing) = target.symlink_metadata() else {
        return Ok(());
    };
    let incoming_is_dir = produced
        .symlink_metadata()
        .map_err(|source| CopyError::Place {
            path: target.to_owned(),
            source,
        })?
        .is_dir();
    match (incoming_is_dir, existing.is_dir(), existing.is_symlink()) {
        (true, true, _) => {
            for entry in std::fs::read_dir(produced).map_err(|source| CopyError::Place {
                path: target.to_owned(),
                source,
            })? {
                let entry = entry.map_err(|source| CopyError::Place {
                    path: target.to_owned(),
                    source,
                })?;
                check_merge(&entry.path(), &target.join(entry.file_name()))?;
            }
            Ok(())
        }
        (true, _, true) => Err(conflict(
            target,
            "is a symlink where the copy has a directory (banger does not write through it)",
        )),
        (true, _, _) => Err(conflict(
            target,
            "exists and is not a directory, and the copy there is one",
        )),
        (false, true, _) => Err(conflict(
            target,
            "is a directory, and the copy there is not one",
        )),
        (false, false, _) => Ok(()),
    }
}

/// Moves `produced` onto `target` after [`check_merge`] accepted it.
fn merge(produced: &Path, target: &Path) -> Result<(), CopyError> {
    let place_error = |source| CopyError::Place {
        path: target.to_owned(),
        source,
    };
    match target.symlink_metadata() {
        Ok(existing) if existing.is_dir() => {
            for entry in std::fs::read_dir(produced).map_err(place_error)? {
                let entry = entry.map_err(place_error)?;
                merge(&entry.path(), &target.join(entry.file_name()))?;
            }
            Ok(())
        }
        // Absent, or a file or symlink the copy replaces: rename never follows either.
        _ => std::fs::rename(produced, target).map_err(place_error),
    }
}

/// Copies a host file, tree or tar stream into the guest.
pub async fn to_guest(
    channel: &mut GuestChannel,
    copy: &ToGuest,
) -> Result<CopySummary, CopyError> {
    if !copy.destination.starts_with('/') {
        return Err(CopyError::RelativeGuestPath {
            path: copy.destination.clone(),
        });
    }
    let destination = copy.destination.trim_end_matches('/');
    let destination = if destination.is_empty() {
        "/"
    } else {
        destination
    };
    let kind = guest_path_kind(channel, destination).await?;
    let refuse = |reason: &str| CopyError::GuestDestination {
        path: destination.into(),
        reason: reason.into(),
    };
    let path = match &copy.source {
        HostSource::Stdin => {
            if kind != GuestPathKind::Directory {
                return Err(refuse(
                    "is not a directory (a tar stream is extracted into one)",
                ));
            }
            let argv = guest_extract_argv(destination);
            run_guest_tar(channel, &argv, Some(tokio::io::stdin()), tokio::io::sink()).await?;
            return Ok(CopySummary::default());
        }
        HostSource::Path(path) => path,
    };
    let contents = path.as_os_str().as_encoded_bytes().ends_with(b"/.");
    let meta = std::fs::metadata(path).map_err(|source| CopyError::HostSource {
        path: path.clone(),
        source,
    })?;
    if contents && !meta.is_dir() {
        return Err(CopyError::HostSource {
            path: path.clone(),
            source: io::Error::other("not a directory (a trailing /. copies one's contents)"),
        });
    }
    let (guest_parent, guest_base) = match destination.rsplit_once('/') {
        Some(("", base)) => ("/".to_owned(), base.to_owned()),
        Some((parent, base)) => (parent.to_owned(), base.to_owned()),
        None => ("/".to_owned(), destination.to_owned()),
    };
    // Where the guest's tar extracts, and the name the source gets in the stream (`None`:
    // its contents are the stream's top level).
    let (extract_in, top_name) = match kind {
        GuestPathKind::Directory if contents => (destination.to_owned(), None),
        GuestPathKind::Directory => {
            let name = path
                .canonicalize()
                .ok()
                .and_then(|real| real.file_name().map(|name| name.to_owned()))
                .ok_or_else(|| CopyError::HostSource {
                    path: path.clone(),
                    source: io::Error::other("names no file or directory"),
                })?;
            (destination.to_owned(), Some(PathBuf::from(name)))
        }
        GuestPathKind::File if meta.is_dir() => {
            return Err(refuse("is a file, and the source is a directory"));
        }
        GuestPathKind::File | GuestPathKind::Missing => {
            (guest_parent, Some(PathBuf::from(guest_base)))
        }
        GuestPathKind::NoParent => return Err(refuse("its parent directory does not exist")),
    };
    let (reader, writer) = io::pipe().map_err(CopyError::Pipe)?;
    let source = path.clone();
    let keep_owner = copy.keep_owner;
    let packing = tokio::task::spawn_blocking(move || {
        let mut builder = tar::Builder::new(writer);
        let mut counts = CopySummary::default();
        let result = append_tree(
            &mut builder,
            &source,
            top_name.as_deref(),
            keep_owner,
            &mut counts,
        )
        .and_then(|()| builder.finish());
        result.map(|()| counts)
    });
    let receiver =
        tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into()).map_err(CopyError::Pipe)?;
    let argv = guest_extract_argv(&extract_in);
    let streamed = run_guest_tar(channel, &argv, Some(receiver), tokio::io::sink()).await;
    let packed = packing
        .await
        .map_err(|error| CopyError::Pipe(io::Error::other(error)))?;
    match (packed, streamed) {
        // The guest's failure explains a broken pipe on this side.
        (_, Err(error)) => Err(error),
        (Err(source), Ok(())) => Err(CopyError::HostSource {
            path: path.clone(),
            source,
        }),
        (Ok(counts), Ok(())) => Ok(counts),
    }
}

fn guest_extract_argv(directory: &str) -> Vec<String> {
    ["tar", "-C", directory, "-xf", "-"]
        .map(str::to_owned)
        .to_vec()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuestPathKind {
    Directory,
    File,
    Missing,
    NoParent,
}

/// What the guest has at `path`, asked of its `sh` (symlinks followed, as `tar -C` will).
async fn guest_path_kind(
    channel: &mut GuestChannel,
    path: &str,
) -> Result<GuestPathKind, CopyError> {
    const PROBE: &str = r#"if [ -d "$1" ]; then echo directory; elif [ -e "$1" ]; then echo file; elif [ -d "$(dirname -- "$1")" ]; then echo missing; else echo no-parent; fi"#;
    let request = ExecRequest::argv(["sh", "-c", PROBE, "sh", path]);
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = channel
        .exec(&request, &[][..], &mut stdout, &mut stderr)
        .await?;
    match (status.success(), String::from_utf8_lossy(&stdout).trim()) {
        (true, "directory") => Ok(GuestPathKind::Directory),
        (true, "file") => Ok(GuestPathKind::File),
        (true, "missing") => Ok(GuestPathKind::Missing),
        (true, "no-parent") => Ok(GuestPathKind::NoParent),
        _ => Err(CopyError::GuestTar {
            argv: format!("sh -c <probe> sh {path}"),
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        }),
    }
}

/// Runs the guest's `tar` with `stdin` (when given) and its stdout to `stdout`.
async fn run_guest_tar<I, O>(
    channel: &mut GuestChannel,
    argv: &[String],
    stdin: Option<I>,
    stdout: O,
) -> Result<(), CopyError>
where
    I: tokio::io::AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
{
    let mut request = ExecRequest::argv(argv.iter().cloned());
    let mut stderr = Vec::new();
    let status = match stdin {
        Some(stdin) => {
            request = request.with_stdin();
            channel.exec(&request, stdin, stdout, &mut stderr).await
        }
        None => {
            channel
                .exec(&request, tokio::io::empty(), stdout, &mut stderr)
                .await
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(GuestError::Remote {
            kind: ErrorKind::NotFound,
            ..
        }) => return Err(CopyError::NoTarInGuest),
        Err(error) => return Err(error.into()),
    };
    if !status.success() {
        return Err(CopyError::GuestTar {
            argv: argv.join(" "),
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Appends `source` to the archive: as `name` (and below it), or its contents at the top
/// level when `name` is `None`. Symlinks inside are stored as links; the source itself is
/// followed. Devices, FIFOs and sockets are counted and left out.
fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    source: &Path,
    name: Option<&Path>,
    keep_owner: bool,
    counts: &mut CopySummary,
) -> io::Result<()> {
    let meta = std::fs::metadata(source)?;
    match name {
        Some(name) => append_entry(builder, source, &meta, name, keep_owner, counts),
        None => append_children(builder, source, Path::new(""), keep_owner, counts),
    }
}

fn append_children<W: Write>(
    builder: &mut tar::Builder<W>,
    directory: &Path,
    name: &Path,
    keep_owner: bool,
    counts: &mut CopySummary,
) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(directory)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = path.symlink_metadata()?;
        append_entry(
            builder,
            &path,
            &meta,
            &name.join(entry.file_name()),
            keep_owner,
            counts,
        )?;
    }
    Ok(())
}

fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    meta: &std::fs::Metadata,
    name: &Path,
    keep_owner: bool,
    counts: &mut CopySummary,
) -> io::Result<()> {
    let file_type = meta.file_type();
    if file_type.is_block_device()
        || file_type.is_char_device()
        || file_type.is_fifo()
        || file_type.is_socket()
    {
        counts.skipped += 1;
        return Ok(());
    }
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    if !keep_owner {
        header.set_uid(0);
        header.set_gid(0);
        header.set_username("root")?;
        header.set_groupname("root")?;
    }
    if file_type.is_symlink() {
        let target = std::fs::read_link(path)?;
        builder.append_link(&mut header, name, target)?;
        counts.symlinks += 1;
    } else if file_type.is_dir() {
        header.set_size(0);
        builder.append_data(&mut header, name, io::empty())?;
        counts.directories += 1;
        append_children(builder, path, name, keep_owner, counts)?;
    } else {
        let size = meta.len();
        let file = File::open(path)?;
        // A file that shrinks while it is read is padded with zeros to the size the header
        // announced, so the archive stays well-formed.
        let body = file.take(size).chain(io::repeat(0)).take(size);
        builder.append_data(&mut header, name, body)?;
        counts.files += 1;
        counts.bytes += size;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_sources_split_into_directory_and_member() {
        let split = |path| guest_source(path).unwrap();
        assert_eq!(
            split("/etc/hosts"),
            GuestSource {
                directory: "/etc".into(),
                member: "./hosts".into(),
                name: Some("hosts".into()),
            }
        );
        assert_eq!(split("/srv/"), split("/srv"));
        assert_eq!(split("/srv").directory, "/");
        assert_eq!(
            split("/srv/app/."),
            GuestSource {
                directory: "/srv/app".into(),
                member: ".".into(),
                name: None,
            }
        );
        assert_eq!(split("/").member, ".");
        assert!(matches!(
            guest_source("etc/hosts"),
            Err(CopyError::RelativeGuestPath { .. })
        ));
    }

    #[test]
    fn host_destinations_follow_docker_cp() {
        let dir = tempfile::tempdir().unwrap();
        let existing_file = dir.path().join("file");
        std::fs::write(&existing_file, b"x").unwrap();
        let plan = plan_host_destination(dir.path(), Some("tree")).unwrap();
        assert_eq!(plan.target, dir.path().join("tree"));
        assert_eq!(plan.staging_parent, dir.path());
        let plan = plan_host_destination(&dir.path().join("new"), Some("tree")).unwrap();
        assert_eq!(plan.target, dir.path().join("new"));
        assert_eq!(plan.staging_parent, dir.path());
        let plan = plan_host_destination(&existing_file, Some("tree")).unwrap();
        assert_eq!(plan.target, existing_file);
        assert!(plan_host_destination(&dir.path().join("no/such"), Some("x")).is_err());
        assert!(plan_host_destination(&existing_file, None).is_err());
    }

    #[test]
    fn merging_replaces_files_and_refuses_mismatches_before_moving_anything() {
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join("incoming");
        let target = dir.path().join("target");
        std::fs::create_dir_all(incoming.join("sub")).unwrap();
        std::fs::write(incoming.join("a"), b"new").unwrap();
        std::fs::write(incoming.join("sub/b"), b"new").unwrap();
        std::fs::create_dir_all(target.join("sub")).unwrap();
        std::fs::write(target.join("a"), b"old").unwrap();
        std::fs::write(target.join("kept"), b"old").unwrap();
        place(&incoming, &target).unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"new");
        assert_eq!(std::fs::read(target.join("sub/b")).unwrap(), b"new");
        assert_eq!(std::fs::read(target.join("kept")).unwrap(), b"old");

        // A symlink where a directory is needed is refused, and nothing moves.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let incoming = dir.path().join("incoming2");
        std::fs::create_dir_all(incoming.join("link")).unwrap();
        std::fs::write(incoming.join("link/escaped"), b"x").unwrap();
        std::fs::write(incoming.join("a"), b"newer").unwrap();
        std::os::unix::fs::symlink(&outside, target.join("link")).unwrap();
        let error = place(&incoming, &target).unwrap_err();
        assert!(error.to_string().contains("symlink"), "{error}");
        assert!(!outside.join("escaped").exists());
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"new");
    }

    #[test]
    fn a_host_tree_is_archived_with_links_kept_and_root_as_owner() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("sub/file"), b"hello").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tree.join("link")).unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut counts = CopySummary::default();
        append_tree(
            &mut builder,
            &tree,
            Some(Path::new("renamed")),
            false,
            &mut counts,
        )
        .unwrap();
        let bytes = builder.into_inner().unwrap();
        assert_eq!(
            (counts.files, counts.directories, counts.symlinks),
            (1, 2, 1)
        );
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut names = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            assert_eq!(entry.header().uid().unwrap(), 0);
            names.push(entry.path().unwrap().display().to_string());
        }
        assert_eq!(
            names,
            ["renamed", "renamed/link", "renamed/sub", "renamed/sub/file"]
        );
    }
}
