//! Getting a distribution's kernel package with the host's own package client, so the default
//! kernel needs no hosted URL.
//!
//! 1. `apt-get download NAME` runs in a fresh temp directory inside the destination
//!    directory (apt-get download writes to its working directory and needs no root, only
//!    current package lists).
//! 2. The downloaded `.deb`'s control `Depends` is read. A metapackage such as
//!    `linux-image-cloud-amd64` ships no kernel and depends on exactly the versioned package
//!    that does (`linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)`): while the package depends
//!    on another `linux-image-*`, that one is downloaded next, pinned to the version the
//!    dependency names, so the kernel matches the metapackage that was asked for.
//! 3. The final `.deb` is renamed into the destination directory.
//!
//! Children run in their own process group and are killed when the future is dropped, so an
//! executor cancels a fetch by dropping it. A host without apt-get gets an error naming the
//! other ways to a kernel.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::deb::{DebError, DebPackage};

/// How many metapackage hops are followed before giving up (Debian needs one).
const MAX_HOPS: usize = 4;

/// Errors from fetching a kernel package.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "`apt-get` is not available on this host, so the kernel package {package} cannot be \
         downloaded from the distribution; get a kernel another way: `banger kernel pull NAME` \
         downloads a catalog bundle, `banger kernel import NAME --from DIR` imports a vmlinux \
         (and modules) you already have"
    )]
    AptUnavailable { package: String },
    #[error("cannot run {argv:?}")]
    Spawn {
        argv: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("{argv:?} failed ({status}):\n{stderr}{hint}")]
    Command {
        argv: Vec<String>,
        status: String,
        stderr: String,
        /// Advice for a recognised failure, starting with a newline, or empty.
        hint: String,
    },
    #[error("{argv:?} succeeded but left no .deb in {dir}")]
    NoPackage { argv: Vec<String>, dir: PathBuf },
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
    #[error("cannot use directory {path} for the download")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A downloaded kernel package.
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
    /// Every package downloaded on the way, `name=version`, the kernel's last.
    pub chain: Vec<String>,
}

/// Downloads `package` (resolving kernel metapackages to the versioned package they pin)
/// into `destination_dir`.
pub async fn fetch_kernel_package(
    package: &str,
    destination_dir: &Path,
) -> Result<FetchedPackage, FetchError> {
    let directory_error = |source| FetchError::Directory {
        path: destination_dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(destination_dir).map_err(directory_error)?;
    let mut wanted = package.to_owned();
    let mut chain = Vec::new();
    for _ in 0..=MAX_HOPS {
        // A fresh directory per download, so the one .deb in it is the one just fetched.
        let work = tempfile::Builder::new()
            .prefix(".apt-download-")
            .tempdir_in(destination_dir)
            .map_err(directory_error)?;
        let argv = vec![
            "apt-get".to_owned(),
            "download".to_owned(),
            "--quiet".to_owned(),
            wanted.clone(),
        ];
        run(&argv, work.path(), package).await?;
        let deb_path = single_deb(work.path())
            .map_err(directory_error)?
            .ok_or_else(|| FetchError::NoPackage {
                argv: argv.clone(),
                dir: work.path().to_owned(),
            })?;
        let deb = DebPackage::open(&deb_path).map_err(|source| FetchError::Inspect { source })?;
        let control = deb
            .control()
            .map_err(|source| FetchError::Inspect { source })?;
        let name = control.get("Package").unwrap_or(&wanted).to_owned();
        let version = control.get("Version").unwrap_or("").to_owned();
        chain.push(format!("{name}={version}"));
        let next = control
            .relations("Depends")
            .into_iter()
            .flatten()
            .find(|relation| relation.name.starts_with("linux-image-"));
        match next {
            Some(relation) => {
                wanted = match relation.version {
                    Some((op, version)) if op == "=" => format!("{}={version}", relation.name),
                    _ => relation.name,
                };
            }
            None => {
                let file_name = deb_path.file_name().expect("a file in the work dir");
                let path = destination_dir.join(file_name);
                std::fs::rename(&deb_path, &path).map_err(directory_error)?;
                return Ok(FetchedPackage {
                    requested: package.to_owned(),
                    name,
                    version,
                    path,
                    chain,
                });
            }
        }
    }
    Err(FetchError::TooManyHops {
        requested: package.to_owned(),
        hops: MAX_HOPS,
        chain,
    })
}

/// The only `.deb` in `dir`, if any.
fn single_deb(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|extension| extension == "deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Runs `argv` in `dir`, capturing stderr for the error.
async fn run(argv: &[String], dir: &Path, package: &str) -> Result<(), FetchError> {
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let output = command.output().await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            FetchError::AptUnavailable {
                package: package.to_owned(),
            }
        } else {
            FetchError::Spawn {
                argv: argv.to_vec(),
                source,
            }
        }
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr)
        .trim_end()
        .to_owned();
    let hint = if stderr.contains("Unable to locate package")
        || stderr.contains("Can't select candidate")
        || stderr.contains("has no installation candidate")
    {
        format!(
            "\nThe package lists may be missing or stale: run `apt-get update` (as root) and \
             retry, and check that {package} exists for this host's distribution."
        )
    } else {
        String::new()
    };
    Err(FetchError::Command {
        argv: argv.to_vec(),
        status: output.status.to_string(),
        stderr,
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_no_apt_error_names_the_alternatives() {
        let message = FetchError::AptUnavailable {
            package: "linux-image-cloud-amd64".into(),
        }
        .to_string();
        for expected in [
            "linux-image-cloud-amd64",
            "banger kernel pull NAME",
            "banger kernel import NAME --from DIR",
        ] {
            assert!(message.contains(expected), "{message}");
        }
    }

    #[tokio::test]
    async fn a_failed_command_carries_argv_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let argv: Vec<String> = [
            "sh",
            "-c",
            "echo 'E: Unable to locate package nope' >&2; exit 100",
        ]
        .map(String::from)
        .to_vec();
        let error = run(&argv, dir.path(), "nope").await.unwrap_err();
        let message = error.to_string();
        assert!(message.contains("\"sh\", \"-c\""), "{message}");
        assert!(message.contains("exit status: 100"), "{message}");
        assert!(
            message.contains("E: Unable to locate package nope"),
            "{message}"
        );
        assert!(message.contains("apt-get update"), "{message}");
        let argv = vec!["/nonexistent/apt-get".to_owned()];
        assert!(matches!(
            run(&argv, dir.path(), "p").await,
            Err(FetchError::AptUnavailable { .. })
        ));
    }
}
