//! Choosing the kernel package among the packages a download brought, so the default kernel
//! needs no hosted URL.
//!
//! The `kernel.fetch-package` step has mmdebstrap download the requested package, with its
//! dependencies, from the recipe's suite (Debian's archive whatever the host runs: an Ubuntu
//! host's own package lists have no Debian kernel). What lands in the download directory is a
//! pile of `.deb` files; this module picks the one holding the kernel:
//!
//! 1. Every `.deb`'s control `Package` and `Version` are read.
//! 2. Starting at the requested package, while the package depends on another
//!    `linux-image-*` (a metapackage such as `linux-image-cloud-amd64` ships no kernel and
//!    depends on exactly the versioned package that does: `linux-image-6.1.0-56-cloud-amd64
//!    (= 6.1.192-2)`), that one is followed, and a pinned version must match.
//! 3. The last package of the chain is renamed into the destination directory.
//!
//! Library code: no processes, no engine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::deb::{DebError, DebPackage};

/// How many metapackage hops are followed before giving up (Debian needs one).
const MAX_HOPS: usize = 4;

/// Errors from picking the kernel package.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "the download has no package {package}{}, {wanted_by} (downloaded: {})",
        version.as_ref().map(|version| format!(" at version {version}")).unwrap_or_default(),
        if downloaded.is_empty() { "nothing".to_owned() } else { downloaded.join(", ") }
    )]
    Missing {
        package: String,
        version: Option<String>,
        /// `which the recipe names` or `which PACKAGE depends on`.
        wanted_by: String,
        downloaded: Vec<String>,
    },
    #[error("cannot read the downloaded package")]
    Inspect {
        #[source]
        source: DebError,
    },
    #[error("{requested} still names another linux-image package after {hops} hops: {}", chain.join(" → "))]
    TooManyHops {
        requested: String,
        hops: usize,
        chain: Vec<String>,
    },
    #[error("cannot use directory {path}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The kernel package picked from a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPackage {
    /// The name asked for (`linux-image-cloud-amd64`).
    pub requested: String,
    /// The package holding the kernel (`linux-image-6.1.0-56-cloud-amd64`).
    pub name: String,
    /// Its version (`6.1.192-2`).
    pub version: String,
    /// The `.deb` in the destination directory.
    pub path: PathBuf,
    /// Every package on the way, `name=version`, the kernel's last.
    pub chain: Vec<String>,
}

/// A downloaded package: its control version and file.
struct Downloaded {
    version: String,
    path: PathBuf,
    next: Option<(String, Option<String>)>,
}

/// Picks the package holding `requested`'s kernel among the `.deb` files in `downloads` and
/// moves it into `destination_dir`.
pub fn pick_kernel_package(
    requested: &str,
    downloads: &Path,
    destination_dir: &Path,
) -> Result<FetchedPackage, FetchError> {
    let directory_error = |path: &Path| {
        let path = path.to_owned();
        move |source| FetchError::Directory { path, source }
    };
    let mut by_name = BTreeMap::new();
    for entry in std::fs::read_dir(downloads).map_err(directory_error(downloads))? {
        let path = entry.map_err(directory_error(downloads))?.path();
        if path.extension().is_none_or(|extension| extension != "deb") {
            continue;
        }
        let deb = DebPackage::open(&path).map_err(|source| FetchError::Inspect { source })?;
        let control = deb
            .control()
            .map_err(|source| FetchError::Inspect { source })?;
        let Some(name) = control.get("Package") else {
            continue;
        };
        let next = control
            .relations("Depends")
            .into_iter()
            .flatten()
            .find(|relation| relation.name.starts_with("linux-image-"))
            .map(|relation| {
                let pinned = relation
                    .version
                    .and_then(|(op, version)| (op == "=").then_some(version));
                (relation.name, pinned)
            });
        by_name.insert(
            name.to_owned(),
            Downloaded {
                version: control.get("Version").unwrap_or("").to_owned(),
                path,
                next,
            },
        );
    }
    let mut wanted = (requested.to_owned(), None::<String>);
    let mut wanted_by = "which the recipe names".to_owned();
    let mut chain = Vec::new();
    for _ in 0..=MAX_HOPS {
        let (name, pinned) = &wanted;
        let downloaded = by_name
            .get(name)
            .filter(|downloaded| pinned.as_ref().is_none_or(|pin| *pin == downloaded.version))
            .ok_or_else(|| FetchError::Missing {
                package: name.clone(),
                version: pinned.clone(),
                wanted_by: wanted_by.clone(),
                downloaded: by_name
                    .iter()
                    .map(|(name, downloaded)| format!("{name}={}", downloaded.version))
                    .collect(),
            })?;
        chain.push(format!("{name}={}", downloaded.version));
        match &downloaded.next {
            Some(next) => {
                wanted_by = format!("which {name} depends on");
                wanted = next.clone();
            }
            None => {
                std::fs::create_dir_all(destination_dir)
                    .map_err(directory_error(destination_dir))?;
                let file_name = downloaded.path.file_name().expect("a listed file");
                let path = destination_dir.join(file_name);
                std::fs::rename(&downloaded.path, &path)
                    .map_err(directory_error(destination_dir))?;
                return Ok(FetchedPackage {
                    requested: requested.to_owned(),
                    name: name.clone(),
                    version: downloaded.version.clone(),
                    path,
                    chain,
                });
            }
        }
    }
    Err(FetchError::TooManyHops {
        requested: requested.to_owned(),
        hops: MAX_HOPS,
        chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::deb::build::{Entry, deb};

    fn write_deb(dir: &Path, file: &str, control: &str) {
        std::fs::write(
            dir.join(file),
            deb(control, &[Entry::Dir("./"), Entry::File("./x", b"x")]),
        )
        .unwrap();
    }

    #[test]
    fn the_metapackage_is_followed_to_the_pinned_kernel_among_its_dependencies() {
        let downloads = tempfile::tempdir().unwrap();
        let destination = tempfile::tempdir().unwrap();
        write_deb(
            downloads.path(),
            "meta.deb",
            "Package: linux-image-cloud-amd64\nVersion: 6.1.192-3\n\
             Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)\n",
        );
        write_deb(
            downloads.path(),
            "kernel.deb",
            "Package: linux-image-6.1.0-57-cloud-amd64\nVersion: 6.1.192-3\n\
             Depends: kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2)\n",
        );
        write_deb(
            downloads.path(),
            "kmod.deb",
            "Package: kmod\nVersion: 30+20221128-1\n",
        );
        std::fs::write(downloads.path().join("notes.txt"), "not a package").unwrap();
        let picked = pick_kernel_package(
            "linux-image-cloud-amd64",
            downloads.path(),
            destination.path(),
        )
        .unwrap();
        assert_eq!(picked.name, "linux-image-6.1.0-57-cloud-amd64");
        assert_eq!(picked.version, "6.1.192-3");
        assert_eq!(
            picked.chain,
            [
                "linux-image-cloud-amd64=6.1.192-3",
                "linux-image-6.1.0-57-cloud-amd64=6.1.192-3"
            ]
        );
        assert_eq!(picked.path, destination.path().join("kernel.deb"));
        assert!(picked.path.is_file());
        assert!(!downloads.path().join("kernel.deb").exists());
    }

    #[test]
    fn a_missing_or_mismatched_kernel_package_is_named() {
        let downloads = tempfile::tempdir().unwrap();
        let destination = tempfile::tempdir().unwrap();
        write_deb(
            downloads.path(),
            "meta.deb",
            "Package: linux-image-cloud-amd64\nVersion: 2\n\
             Depends: linux-image-6.1.0-57-cloud-amd64 (= 2)\n",
        );
        write_deb(
            downloads.path(),
            "kernel.deb",
            "Package: linux-image-6.1.0-57-cloud-amd64\nVersion: 1\n",
        );
        let message = pick_kernel_package(
            "linux-image-cloud-amd64",
            downloads.path(),
            destination.path(),
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "no package linux-image-6.1.0-57-cloud-amd64 at version 2",
            "which linux-image-cloud-amd64 depends on",
            "linux-image-6.1.0-57-cloud-amd64=1",
        ] {
            assert!(message.contains(expected), "{message}");
        }
        let message =
            pick_kernel_package("linux-image-rt-amd64", downloads.path(), destination.path())
                .unwrap_err()
                .to_string();
        assert!(
            message.contains("no package linux-image-rt-amd64, which the recipe names"),
            "{message}"
        );
    }
}
