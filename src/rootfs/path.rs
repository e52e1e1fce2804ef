//! Tar entry paths: normalization, whiteouts, and resolution through symlinks inside the image.
//!
//! Nothing here touches the host file system: paths are resolved against the image being built
//! (the [`ImageTree`] trait), so a hostile layer can never make banger write outside its
//! scratch area. What a layer may not do at all is rejected with an error naming the entry:
//! absolute entry paths, `..` components, hard links that leave the root, and writes through a
//! symlink whose relative target climbs above the root. Absolute symlink targets
//! (`lib -> /usr/lib`) are followed from the image's root, as the guest will see them.

use std::path::{Component, Path, PathBuf};

/// What the image being built has at a path, as far as path resolution cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeNode {
    Directory,
    Symlink { target: PathBuf },
    Other,
}

/// Read access to the image being built.
pub trait ImageTree {
    /// The node at a normalized, root-relative path (`usr/lib`); `None` when absent. The root
    /// itself (empty path) is a directory.
    fn node(&self, path: &Path) -> Option<TreeNode>;
}

/// Why an entry path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("`{entry}` is an absolute path")]
    Absolute { entry: String },
    #[error("`{entry}` contains `..`")]
    ParentComponent { entry: String },
    #[error(
        "`{entry}` writes through symlink `{link}` -> `{target}`, which points outside the image"
    )]
    SymlinkEscape {
        entry: String,
        link: String,
        target: String,
    },
    #[error("`{entry}` resolves through more than {MAX_SYMLINK_HOPS} symlinks (a loop?)")]
    SymlinkLoop { entry: String },
    #[error("`{entry}` is not valid UTF-8 and not a valid path")]
    Empty { entry: String },
}

/// Symlinks followed while resolving one path before giving up, as Linux's `MAXSYMLINKS`.
pub const MAX_SYMLINK_HOPS: usize = 40;

/// Normalizes a tar entry name to a root-relative path: leading `./` and repeated or trailing
/// slashes are dropped, `.` components removed. `None` is the root itself (`./`). Absolute
/// names and `..` anywhere are refused.
pub fn normalize_entry(entry: &Path) -> Result<Option<PathBuf>, PathError> {
    let name = || entry.to_string_lossy().into_owned();
    let mut normalized = PathBuf::new();
    for component in entry.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Absolute { entry: name() });
            }
            Component::ParentDir => return Err(PathError::ParentComponent { entry: name() }),
            Component::CurDir => {}
            Component::Normal(part) => normalized.push(part),
        }
    }
    Ok((!normalized.as_os_str().is_empty()).then_some(normalized))
}

/// What a tar entry means under the OCI layer rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryMeaning {
    /// An ordinary entry at this path.
    Regular,
    /// `.wh.NAME`: delete `NAME` (and below) from lower layers.
    Whiteout { target: PathBuf },
    /// `.wh..wh..opq`: delete every child of this directory from lower layers.
    Opaque { dir: PathBuf },
    /// Other `.wh..wh.*` names (aufs bookkeeping): ignored.
    Ignored,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_NAME: &str = ".wh..wh..opq";

/// Classifies a normalized entry path.
pub fn meaning(path: &Path) -> EntryMeaning {
    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
        return EntryMeaning::Regular;
    };
    let parent = path.parent().unwrap_or(Path::new("")).to_owned();
    if name == OPAQUE_NAME {
        EntryMeaning::Opaque { dir: parent }
    } else if name.starts_with(".wh..wh.") {
        EntryMeaning::Ignored
    } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
        if target.is_empty() {
            EntryMeaning::Ignored
        } else {
            EntryMeaning::Whiteout {
                target: parent.join(target),
            }
        }
    } else {
        EntryMeaning::Regular
    }
}

/// Resolves the directories above `path` through symlinks in the image, returning where the
/// entry really lands. The last component is never followed (an entry replaces a symlink, it
/// does not write through it).
pub fn resolve_parents(tree: &dyn ImageTree, path: &Path) -> Result<PathBuf, PathError> {
    let entry = || path.to_string_lossy().into_owned();
    let Some(last) = path.file_name() else {
        return Err(PathError::Empty { entry: entry() });
    };
    let parent = path.parent().unwrap_or(Path::new(""));
    let mut resolved = resolve_dir(tree, parent, &entry)?;
    resolved.push(last);
    Ok(resolved)
}

/// Resolves a whole root-relative directory path through symlinks.
fn resolve_dir(
    tree: &dyn ImageTree,
    dir: &Path,
    entry: &dyn Fn() -> String,
) -> Result<PathBuf, PathError> {
    // Components still to walk, in reverse so `pop` yields the next one.
    let mut pending: Vec<std::ffi::OsString> = dir
        .components()
        .rev()
        .map(|component| component.as_os_str().to_owned())
        .collect();
    let mut resolved = PathBuf::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == "." {
            continue;
        }
        if part == ".." {
            // Only symlink targets put `..` here; entry names were refused earlier.
            if !resolved.pop() {
                return Err(PathError::SymlinkEscape {
                    entry: entry(),
                    link: resolved.to_string_lossy().into_owned(),
                    target: "..".into(),
                });
            }
            continue;
        }
        let candidate = resolved.join(&part);
        match tree.node(&candidate) {
            Some(TreeNode::Symlink { target }) => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(PathError::SymlinkLoop { entry: entry() });
                }
                let escape = || PathError::SymlinkEscape {
                    entry: entry(),
                    link: candidate.to_string_lossy().into_owned(),
                    target: target.to_string_lossy().into_owned(),
                };
                if target.is_absolute() {
                    resolved = PathBuf::new();
                } else if !stays_inside(&resolved, &target) {
                    return Err(escape());
                }
                for component in target.components().rev() {
                    match component {
                        Component::RootDir | Component::Prefix(_) => {}
                        other => pending.push(other.as_os_str().to_owned()),
                    }
                }
            }
            // A missing directory is created by the caller; a file in the way is the caller's
            // error to report (it knows the entry kind).
            Some(TreeNode::Directory | TreeNode::Other) | None => resolved = candidate,
        }
    }
    Ok(resolved)
}

/// Whether a relative symlink target, read from directory `base`, stays inside the root.
fn stays_inside(base: &Path, target: &Path) -> bool {
    let mut depth = base.components().count();
    for component in target.components() {
        match component {
            Component::ParentDir => {
                if depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return true,
        }
    }
    true
}

/// Normalizes a hard link's target (a root-relative name in the tar), refusing ones that leave
/// the root, then resolves its directories through symlinks.
pub fn resolve_hardlink_target(
    tree: &dyn ImageTree,
    entry: &Path,
    target: &Path,
) -> Result<PathBuf, PathError> {
    let described = || {
        format!(
            "{} (hard link to {})",
            entry.to_string_lossy(),
            target.to_string_lossy()
        )
    };
    let normalized = normalize_entry(target)
        .map_err(|error| match error {
            PathError::Absolute { .. } => PathError::Absolute { entry: described() },
            PathError::ParentComponent { .. } => PathError::ParentComponent { entry: described() },
            other => other,
        })?
        .ok_or_else(|| PathError::Empty { entry: described() })?;
    resolve_parents(tree, &normalized)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[derive(Default)]
    struct FakeTree(HashMap<PathBuf, TreeNode>);

    impl FakeTree {
        fn dir(mut self, path: &str) -> Self {
            self.0.insert(path.into(), TreeNode::Directory);
            self
        }
        fn link(mut self, path: &str, target: &str) -> Self {
            self.0.insert(
                path.into(),
                TreeNode::Symlink {
                    target: target.into(),
                },
            );
            self
        }
    }

    impl ImageTree for FakeTree {
        fn node(&self, path: &Path) -> Option<TreeNode> {
            if path.as_os_str().is_empty() {
                return Some(TreeNode::Directory);
            }
            self.0.get(path).cloned()
        }
    }

    #[test]
    fn entry_names_are_normalized_and_escapes_refused() {
        let ok = |name: &str| normalize_entry(Path::new(name)).unwrap();
        assert_eq!(ok("./etc/passwd"), Some(PathBuf::from("etc/passwd")));
        assert_eq!(
            ok("etc//ssh/./sshd_config"),
            Some(PathBuf::from("etc/ssh/sshd_config"))
        );
        assert_eq!(ok("usr/bin/"), Some(PathBuf::from("usr/bin")));
        assert_eq!(ok("./"), None);
        assert_eq!(ok("."), None);
        assert_eq!(
            normalize_entry(Path::new("/etc/passwd")),
            Err(PathError::Absolute {
                entry: "/etc/passwd".into()
            })
        );
        assert!(matches!(
            normalize_entry(Path::new("usr/../../etc/shadow")),
            Err(PathError::ParentComponent { .. })
        ));
    }

    #[test]
    fn whiteouts_and_opaque_markers_are_recognized() {
        assert_eq!(
            meaning(Path::new("etc/.wh.motd")),
            EntryMeaning::Whiteout {
                target: "etc/motd".into()
            }
        );
        assert_eq!(
            meaning(Path::new(".wh.tmp")),
            EntryMeaning::Whiteout {
                target: "tmp".into()
            }
        );
        assert_eq!(
            meaning(Path::new("var/cache/.wh..wh..opq")),
            EntryMeaning::Opaque {
                dir: "var/cache".into()
            }
        );
        assert_eq!(meaning(Path::new(".wh..wh.plnk")), EntryMeaning::Ignored);
        assert_eq!(meaning(Path::new("etc/motd")), EntryMeaning::Regular);
    }

    #[test]
    fn parents_resolve_through_symlinks_inside_the_image() {
        let tree = FakeTree::default()
            .dir("usr")
            .dir("usr/lib")
            .link("lib", "usr/lib")
            .link("lib64", "/usr/lib")
            .link("usr/lib/alias", "../lib");
        let resolve = |path: &str| resolve_parents(&tree, Path::new(path)).unwrap();
        assert_eq!(resolve("lib/libc.so.6"), PathBuf::from("usr/lib/libc.so.6"));
        assert_eq!(resolve("lib64/ld.so"), PathBuf::from("usr/lib/ld.so"));
        assert_eq!(resolve("lib/alias/x"), PathBuf::from("usr/lib/x"));
        // The last component is never followed: an entry replaces a symlink.
        assert_eq!(resolve("lib"), PathBuf::from("lib"));
        assert_eq!(resolve("new/dir/file"), PathBuf::from("new/dir/file"));
    }

    #[test]
    fn writes_through_escaping_symlinks_are_refused() {
        let tree = FakeTree::default()
            .dir("a")
            .link("a/up", "../../..")
            .link("loop1", "loop2")
            .link("loop2", "loop1");
        assert_eq!(
            resolve_parents(&tree, Path::new("a/up/etc/passwd")),
            Err(PathError::SymlinkEscape {
                entry: "a/up/etc/passwd".into(),
                link: "a/up".into(),
                target: "../../..".into()
            })
        );
        assert!(matches!(
            resolve_parents(&tree, Path::new("loop1/x")),
            Err(PathError::SymlinkLoop { .. })
        ));
    }

    #[test]
    fn hard_links_may_not_leave_the_root() {
        let tree = FakeTree::default().dir("bin");
        assert_eq!(
            resolve_hardlink_target(&tree, Path::new("bin/sh"), Path::new("bin/dash")).unwrap(),
            PathBuf::from("bin/dash")
        );
        assert_eq!(
            resolve_hardlink_target(&tree, Path::new("x"), Path::new("/etc/shadow")),
            Err(PathError::Absolute {
                entry: "x (hard link to /etc/shadow)".into()
            })
        );
        assert!(matches!(
            resolve_hardlink_target(&tree, Path::new("x"), Path::new("../etc/shadow")),
            Err(PathError::ParentComponent { .. })
        ));
    }
}
