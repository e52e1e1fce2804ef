//! The workspace: a project directory on the host, imported into the guest as a tar stream
//! that the guest's `tar` extracts (`banger up`'s `vm/workspace` step).
//!
//! What is imported ([`collect`]):
//! - in a git work tree: the tracked files and the untracked files that are not ignored, as
//!   they are on disk (uncommitted and staged changes included), plus `.git` itself when the
//!   workspace is the repository's top, so `git status` in the guest shows what the host
//!   shows. git is asked through a throwaway copy of the index (`GIT_INDEX_FILE`, with
//!   `GIT_OPTIONAL_LOCKS=0`), so the host's `.git/index`, refs and work tree are never
//!   written — the earlier tool's fix for phantom staged changes;
//! - elsewhere: every file, minus the patterns of a `.bangerignore` at the workspace's top.
//!
//! Symbolic links are imported as links and never followed: nothing outside the workspace
//! is read through one. A second import sends only what changed ([`Manifest::changes`]): new
//! and changed entries (by type, size, mode and modification time) in the tar, and the
//! paths that went away for the guest to remove.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("the workspace {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{argv}` failed ({status}): {stderr}")]
    Git {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{argv}`")]
    GitSpawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the workspace stream")]
    Write(#[source] std::io::Error),
}

impl crate::error::Classify for WorkspaceError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            WorkspaceError::NotADirectory { .. } | WorkspaceError::Read { .. } => {
                crate::error::ErrorClass::User
            }
            _ => crate::error::ErrorClass::Environment,
        }
    }
}

/// What one workspace entry is, as imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntryKind {
    File { size: u64 },
    Dir,
    Symlink { target: PathBuf },
}

/// One entry, by its path relative to the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: EntryKind,
    pub mode: u32,
    pub mtime: i64,
    pub mtime_nanos: u32,
}

/// The entries of a workspace, sorted by path (a directory before what it holds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: BTreeMap<PathBuf, Entry>,
    /// The git tree of the import ([`git_baseline`]), when the workspace is a repository's
    /// top: what `banger workspace export` diffs the guest's work tree against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_baseline: Option<String>,
}

/// What an import sends after an earlier one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// New or changed entries, in tar order.
    pub send: Vec<PathBuf>,
    /// Paths the guest must remove (not under another removed path).
    pub remove: Vec<PathBuf>,
}

impl Manifest {
    /// What to send so that a guest holding `previous` holds `self`.
    pub fn changes(&self, previous: &Manifest) -> Changes {
        let send = self
            .entries
            .iter()
            .filter(|(path, entry)| previous.entries.get(*path) != Some(entry))
            .map(|(path, _)| path.clone())
            .collect();
        let mut remove: Vec<PathBuf> = Vec::new();
        for path in previous.entries.keys() {
            if self.entries.contains_key(path) {
                continue;
            }
            if remove
                .last()
                .is_some_and(|removed| path.starts_with(removed))
            {
                continue;
            }
            remove.push(path.clone());
        }
        Changes { send, remove }
    }

    /// Bytes of file data `paths` name.
    pub fn bytes_of(&self, paths: &[PathBuf]) -> u64 {
        paths
            .iter()
            .filter_map(
                |path| match self.entries.get(path).map(|entry| &entry.kind) {
                    Some(EntryKind::File { size }) => Some(*size),
                    _ => None,
                },
            )
            .sum()
    }
}

/// The workspace's entries (the rules in the module note).
pub fn collect(root: &Path) -> Result<Manifest, WorkspaceError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |source| WorkspaceError::Read { path, source }
    };
    let metadata = std::fs::metadata(root).map_err(read_error(root))?;
    if !metadata.is_dir() {
        return Err(WorkspaceError::NotADirectory {
            path: root.to_owned(),
        });
    }
    let mut manifest = Manifest::default();
    match git_top(root)? {
        Some(top) => {
            for relative in git_files(root, &top)? {
                add_with_parents(&mut manifest, root, &relative)?;
            }
            let canonical = std::fs::canonicalize(root).map_err(read_error(root))?;
            if canonical == top {
                walk(&mut manifest, root, Path::new(".git"), &[])?;
            }
        }
        None => {
            let ignore = read_bangerignore(root);
            walk(&mut manifest, root, Path::new(""), &ignore)?;
        }
    }
    Ok(manifest)
}

/// The work tree's top when `dir` is in one.
fn git_top(dir: &Path) -> Result<Option<PathBuf>, WorkspaceError> {
    if crate::env::find_program("git").is_none() {
        return Ok(None);
    }
    let output = git(dir, None)
        .args(["rev-parse", "--show-toplevel"])
        .output()
        .map_err(|source| WorkspaceError::GitSpawn {
            argv: "git rev-parse --show-toplevel".into(),
            source,
        })?;
    if !output.status.success() {
        return Ok(None);
    }
    let top = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Ok((!top.is_empty()).then(|| PathBuf::from(top)))
}

fn git(dir: &Path, index: Option<&Path>) -> Command {
    let mut command = Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        // Never take or refresh the index lock: nothing of the host's repository is written.
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(std::process::Stdio::null());
    if let Some(index) = index {
        command.env("GIT_INDEX_FILE", index);
    }
    command
}

/// Tracked and untracked-but-not-ignored files under `dir`, relative to it, through a
/// throwaway copy of the index.
fn git_files(dir: &Path, top: &Path) -> Result<Vec<PathBuf>, WorkspaceError> {
    let scratch = tempfile::tempdir().map_err(WorkspaceError::Write)?;
    let index = scratch.path().join("index");
    let real_index = top.join(".git/index");
    if real_index.exists() {
        std::fs::copy(&real_index, &index).map_err(|source| WorkspaceError::Read {
            path: real_index.clone(),
            source,
        })?;
    }
    let stdout = git_output(
        git(dir, Some(&index)).args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ]),
        dir,
    )?;
    let mut files: Vec<PathBuf> = stdout
        .split(|&byte| byte == 0)
        .filter(|name| !name.is_empty())
        .map(|name| {
            PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name))
        })
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The import's content as a git tree, for `banger workspace export` to diff against.
#[derive(Debug)]
pub struct GitBaseline {
    /// The tree's id.
    pub tree: String,
    /// A loose-object directory with what the tree needs that the repository lacks (the
    /// blobs of changed and untracked files, the trees above them).
    pub objects: PathBuf,
    /// Owns `objects`.
    _scratch: tempfile::TempDir,
}

/// When `root` is a repository's top: the work tree as [`collect`] imports it (tracked files
/// as they are on disk, untracked ones that are not ignored) written as a git tree. Through
/// a throwaway copy of the index and a throwaway object directory that has the repository's
/// as an alternate, so nothing of the repository is written, and only files whose index
/// entry is stale are hashed.
pub fn git_baseline(root: &Path) -> Result<Option<GitBaseline>, WorkspaceError> {
    let Some(top) = git_top(root)? else {
        return Ok(None);
    };
    let canonical = std::fs::canonicalize(root).map_err(|source| WorkspaceError::Read {
        path: root.to_owned(),
        source,
    })?;
    if canonical != top {
        return Ok(None);
    }
    let git_path = |name: &str| -> Result<PathBuf, WorkspaceError> {
        let output = git_output(
            git(root, None).args(["rev-parse", "--git-path", name]),
            root,
        )?;
        let path = PathBuf::from(String::from_utf8_lossy(&output).trim());
        Ok(if path.is_absolute() {
            path
        } else {
            root.join(path)
        })
    };
    let (real_index, real_objects) = (git_path("index")?, git_path("objects")?);
    let scratch = tempfile::tempdir().map_err(WorkspaceError::Write)?;
    let index = scratch.path().join("index");
    let objects = scratch.path().join("objects");
    std::fs::create_dir(&objects).map_err(WorkspaceError::Write)?;
    if real_index.exists() {
        std::fs::copy(&real_index, &index).map_err(|source| WorkspaceError::Read {
            path: real_index.clone(),
            source,
        })?;
    }
    let scratch_git = |args: &[&str]| {
        let mut command = git(root, Some(&index));
        command
            .env("GIT_OBJECT_DIRECTORY", &objects)
            .env("GIT_ALTERNATE_OBJECT_DIRECTORIES", &real_objects)
            .args(args);
        git_output(&mut command, root)
    };
    scratch_git(&["add", "--all", "--", "."])?;
    let tree = String::from_utf8_lossy(&scratch_git(&["write-tree"])?)
        .trim()
        .to_owned();
    Ok(Some(GitBaseline {
        tree,
        objects,
        _scratch: scratch,
    }))
}

/// Runs a git `command` (in `dir`), its stdout if it exits 0.
fn git_output(command: &mut Command, dir: &Path) -> Result<Vec<u8>, WorkspaceError> {
    let argv = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let output = command
        .output()
        .map_err(|source| WorkspaceError::GitSpawn {
            argv: argv.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(WorkspaceError::Git {
            argv: format!("{argv} (in {})", dir.display()),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output.stdout)
}

/// Adds `relative` (if it still exists: a tracked file may be deleted in the work tree) and
/// its parent directories.
fn add_with_parents(
    manifest: &mut Manifest,
    root: &Path,
    relative: &Path,
) -> Result<(), WorkspaceError> {
    if !is_plain(relative) {
        return Ok(());
    }
    let mut parent = PathBuf::new();
    let components: Vec<_> = relative.components().collect();
    for component in &components[..components.len().saturating_sub(1)] {
        parent.push(component);
        if manifest.entries.contains_key(&parent) {
            continue;
        }
        // A parent that is a symlink would be followed by everything below it: skip the entry.
        let Some(entry) = entry_of(&root.join(&parent))? else {
            return Ok(());
        };
        if entry.kind != EntryKind::Dir {
            return Ok(());
        }
        manifest.entries.insert(parent.clone(), entry);
    }
    if let Some(entry) = entry_of(&root.join(relative))? {
        if entry.kind == EntryKind::Dir {
            // A submodule or nested repository: everything in it.
            manifest.entries.insert(relative.to_owned(), entry);
            walk(manifest, root, relative, &[])?;
        } else {
            manifest.entries.insert(relative.to_owned(), entry);
        }
    }
    Ok(())
}

/// A relative path of plain components (no `..`, no root).
fn is_plain(path: &Path) -> bool {
    path.components()
        .all(|component| matches!(component, Component::Normal(_)))
        && !path.as_os_str().is_empty()
}

/// The entry at `path` without following a symlink; `None` if it is gone or of another type
/// (a socket, a device).
fn entry_of(path: &Path) -> Result<Option<Entry>, WorkspaceError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(WorkspaceError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file_type = metadata.file_type();
    let kind = if file_type.is_symlink() {
        EntryKind::Symlink {
            target: std::fs::read_link(path).map_err(|source| WorkspaceError::Read {
                path: path.to_owned(),
                source,
            })?,
        }
    } else if file_type.is_dir() {
        EntryKind::Dir
    } else if file_type.is_file() {
        EntryKind::File {
            size: metadata.len(),
        }
    } else {
        return Ok(None);
    };
    Ok(Some(Entry {
        kind,
        mode: metadata.permissions().mode() & 0o7777,
        mtime: metadata.mtime(),
        mtime_nanos: metadata.mtime_nsec().clamp(0, 999_999_999) as u32,
    }))
}

/// Adds every entry under `relative` (itself included unless it is the root), skipping what
/// `ignore` matches; never follows symlinks.
fn walk(
    manifest: &mut Manifest,
    root: &Path,
    relative: &Path,
    ignore: &[IgnorePattern],
) -> Result<(), WorkspaceError> {
    let path = root.join(relative);
    if !relative.as_os_str().is_empty() {
        let Some(entry) = entry_of(&path)? else {
            return Ok(());
        };
        let is_dir = entry.kind == EntryKind::Dir;
        manifest.entries.insert(relative.to_owned(), entry);
        if !is_dir {
            return Ok(());
        }
    }
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&path)
        .map_err(|source| WorkspaceError::Read {
            path: path.clone(),
            source,
        })?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|source| WorkspaceError::Read {
            path: path.clone(),
            source,
        })?;
    names.sort();
    for name in names {
        let child = relative.join(&name);
        let is_dir = std::fs::symlink_metadata(root.join(&child)).is_ok_and(|m| m.is_dir());
        if ignore.iter().any(|pattern| pattern.matches(&child, is_dir)) {
            continue;
        }
        walk(manifest, root, &child, ignore)?;
    }
    Ok(())
}

/// One `.bangerignore` line: `*` and `?` globs; a pattern with a `/` inside is anchored at
/// the workspace's top, one without matches a name at any depth; a trailing `/` matches
/// directories only; `#` starts a comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnorePattern {
    glob: String,
    anchored: bool,
    dir_only: bool,
}

impl IgnorePattern {
    pub fn parse(line: &str) -> Option<IgnorePattern> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let dir_only = line.ends_with('/');
        let line = line.trim_end_matches('/');
        let anchored = line.contains('/');
        Some(IgnorePattern {
            glob: line.trim_start_matches('/').to_owned(),
            anchored,
            dir_only,
        })
    }

    pub fn matches(&self, path: &Path, is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        if self.anchored {
            return glob_match(&self.glob, &path.to_string_lossy());
        }
        path.file_name()
            .is_some_and(|name| glob_match(&self.glob, &name.to_string_lossy()))
    }
}

fn read_bangerignore(root: &Path) -> Vec<IgnorePattern> {
    std::fs::read_to_string(root.join(".bangerignore"))
        .map(|text| text.lines().filter_map(IgnorePattern::parse).collect())
        .unwrap_or_default()
}

/// `*` (any run of characters but `/`) and `?` (one character but `/`).
fn glob_match(pattern: &str, text: &str) -> bool {
    fn matches(pattern: &[char], text: &[char]) -> bool {
        match pattern.split_first() {
            None => text.is_empty(),
            Some(('*', rest)) => (0..=text.len())
                .take_while(|&skip| skip == 0 || text[skip - 1] != '/')
                .any(|skip| matches(rest, &text[skip..])),
            Some(('?', rest)) => text
                .split_first()
                .is_some_and(|(&c, tail)| c != '/' && matches(rest, tail)),
            Some((&c, rest)) => text
                .split_first()
                .is_some_and(|(&t, tail)| t == c && matches(rest, tail)),
        }
    }
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    matches(&pattern, &text)
}

/// Writes the entries `paths` of `manifest` (relative to `root`) as a tar stream to `out`:
/// owner root, the host's modes and modification times (`make` compares them), links as
/// links. A file that changed size since it was listed fails the write.
pub fn write_tar(
    root: &Path,
    manifest: &Manifest,
    paths: &[PathBuf],
    out: impl Write,
) -> Result<(), WorkspaceError> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    for path in paths {
        let Some(entry) = manifest.entries.get(path) else {
            continue;
        };
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(entry.mode);
        header.set_mtime(entry.mtime.max(0) as u64);
        let written = match &entry.kind {
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder.append_data(&mut header, path, std::io::empty())
            }
            EntryKind::Symlink { target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder.append_link(&mut header, path, target)
            }
            EntryKind::File { size } => {
                let full = root.join(path);
                let file = std::fs::File::open(&full).map_err(|source| WorkspaceError::Read {
                    path: full.clone(),
                    source,
                })?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(*size);
                builder.append_data(&mut header, path, std::io::Read::take(file, *size))
            }
        };
        written.map_err(WorkspaceError::Write)?;
    }
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(WorkspaceError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_names_at_any_depth_or_anchored_paths() {
        let p = |text: &str| IgnorePattern::parse(text).unwrap();
        assert!(p("*.o").matches(Path::new("src/main.o"), false));
        assert!(!p("*.o").matches(Path::new("src/main.c"), false));
        assert!(p("target/").matches(Path::new("target"), true));
        assert!(!p("target/").matches(Path::new("target"), false));
        assert!(p("build/out").matches(Path::new("build/out"), true));
        assert!(!p("build/out").matches(Path::new("x/build/out"), true));
        assert!(p("a?c").matches(Path::new("abc"), false));
        assert!(IgnorePattern::parse("# comment").is_none());
        assert!(!glob_match("a*", "a/b"), "* does not cross /");
    }

    #[test]
    fn changes_send_what_differs_and_remove_what_went() {
        let file = |size, mtime| Entry {
            kind: EntryKind::File { size },
            mode: 0o644,
            mtime,
            mtime_nanos: 0,
        };
        let dir = Entry {
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime: 1,
            mtime_nanos: 0,
        };
        let before = Manifest {
            git_baseline: None,
            entries: BTreeMap::from([
                (PathBuf::from("a"), file(1, 1)),
                (PathBuf::from("d"), dir.clone()),
                (PathBuf::from("d/x"), file(2, 1)),
                (PathBuf::from("gone"), dir.clone()),
                (PathBuf::from("gone/y"), file(3, 1)),
            ]),
        };
        let after = Manifest {
            git_baseline: None,
            entries: BTreeMap::from([
                (PathBuf::from("a"), file(1, 1)),
                (PathBuf::from("d"), dir),
                (PathBuf::from("d/x"), file(2, 5)),
                (PathBuf::from("new"), file(4, 1)),
            ]),
        };
        let changes = after.changes(&before);
        assert_eq!(changes.send, [PathBuf::from("d/x"), PathBuf::from("new")]);
        assert_eq!(changes.remove, [PathBuf::from("gone")]);
        assert_eq!(after.bytes_of(&changes.send), 6);
    }

    #[test]
    fn outside_git_everything_but_the_ignored_and_links_as_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::create_dir_all(root.join("target/debug")).unwrap();
        std::fs::write(root.join("src/main.c"), "int main;").unwrap();
        std::fs::write(root.join("src/main.o"), "obj").unwrap();
        std::fs::write(root.join("target/debug/x"), "x").unwrap();
        std::fs::write(root.join(".bangerignore"), "*.o\ntarget/\n").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("outside")).unwrap();
        let manifest = collect(root).unwrap();
        let paths: Vec<String> = manifest
            .entries
            .keys()
            .map(|path| path.to_string_lossy().into_owned())
            .collect();
        assert_eq!(paths, [".bangerignore", "outside", "src", "src/main.c"]);
        assert_eq!(
            manifest.entries[Path::new("outside")].kind,
            EntryKind::Symlink {
                target: PathBuf::from("/etc")
            }
        );
    }

    /// Runs git in `dir` with `env`, panicking with its stderr unless it succeeds.
    fn run_git(dir: &Path, env: &[(&str, &Path)], args: &[&str]) -> String {
        let mut command = Command::new("git");
        command
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args);
        for (key, value) in env {
            command.env(key, value);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "git {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Every file under `dir` with its content: what "nothing was written" compares. (Git
    /// refreshes the mtime of objects it finds already stored, as every `git add` does.)
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut pending = vec![dir.to_owned()];
        while let Some(next) = pending.pop() {
            for entry in std::fs::read_dir(&next).unwrap() {
                let entry = entry.unwrap();
                let metadata = entry.metadata().unwrap();
                if metadata.is_dir() {
                    pending.push(entry.path());
                } else {
                    files.insert(entry.path(), std::fs::read(entry.path()).unwrap());
                }
            }
        }
        files
    }

    #[test]
    fn the_git_baseline_is_the_imported_tree_and_writes_nothing_in_the_repository() {
        if crate::env::find_program("git").is_none() {
            eprintln!("skipped: no git on this host");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        std::fs::create_dir_all(root.join("src")).unwrap();
        run_git(&root, &[], &["init", "-q"]);
        std::fs::write(root.join(".gitignore"), "*.o\n").unwrap();
        std::fs::write(root.join("src/a.txt"), "a v1\n").unwrap();
        std::fs::write(root.join("gone.bin"), [0u8, 1, 2, 255]).unwrap();
        run_git(&root, &[], &["add", "-A"]);
        run_git(&root, &[], &["commit", "-q", "-m", "first"]);
        // Modified, staged, untracked, ignored and deleted files.
        std::fs::write(root.join("src/a.txt"), "a v2, not committed\n").unwrap();
        std::fs::write(root.join("staged.txt"), "staged\n").unwrap();
        run_git(&root, &[], &["add", "staged.txt"]);
        std::fs::write(root.join("src/untracked.txt"), "untracked\n").unwrap();
        std::fs::write(root.join("src/main.o"), "object\n").unwrap();
        std::fs::remove_file(root.join("gone.bin")).unwrap();
        let before = snapshot(&root.join(".git"));
        let index_mtime = || {
            std::fs::metadata(root.join(".git/index"))
                .unwrap()
                .modified()
                .unwrap()
        };
        let index_before = index_mtime();

        let baseline = git_baseline(&root).unwrap().expect("a repository's top");

        assert!(snapshot(&root.join(".git")) == before, ".git was written");
        assert_eq!(index_mtime(), index_before, "the index was rewritten");
        // The same tree as staging everything in a copy of the repository.
        let copy = dir.path().join("copy");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&root)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(status.success());
        run_git(&copy, &[], &["add", "--all"]);
        assert_eq!(baseline.tree, run_git(&copy, &[], &["write-tree"]));
        // The repository plus the baseline's objects hold the whole tree.
        let alternates = [(
            "GIT_ALTERNATE_OBJECT_DIRECTORIES",
            baseline.objects.as_path(),
        )];
        let listed = run_git(
            &root,
            &alternates,
            &["ls-tree", "-r", "--name-only", &baseline.tree],
        );
        assert_eq!(
            listed.lines().collect::<Vec<_>>(),
            [".gitignore", "src/a.txt", "src/untracked.txt", "staged.txt"]
        );
        let blob = run_git(
            &root,
            &alternates,
            &["rev-parse", &format!("{}:src/a.txt", baseline.tree)],
        );
        assert_eq!(
            run_git(&root, &alternates, &["cat-file", "blob", &blob]),
            "a v2, not committed"
        );
        // Only a repository's top has a baseline; elsewhere there is none.
        assert!(git_baseline(&root.join("src")).unwrap().is_none());
        let plain = tempfile::tempdir().unwrap();
        assert!(git_baseline(plain.path()).unwrap().is_none());
    }
}
