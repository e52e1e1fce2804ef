//! Kernels from distribution packages: what the `kernel.fetch-package`, `kernel.extract` and
//! `kernel.initramfs` steps are made of. Library code only: no engine, no store, no printing.
//!
//! The default kernel recipe (`catalogs/kernels.json`: Debian bookworm's
//! `linux-image-cloud-amd64`) becomes what banger boots in four moves:
//!
//! 1. The `kernel.fetch-package` step has mmdebstrap download the package and its
//!    dependencies from the recipe's suite; [`fetch::pick_kernel_package`] follows the
//!    metapackage to the versioned package it pins.
//! 2. [`deb::DebPackage::extract`] unpacks the kernel's files ([`is_kernel_file`] selects
//!    `boot/vmlinuz-*`, `boot/config-*` and the module tree) path-traversal-safely, and
//!    [`KernelFiles::locate`] finds the image, the release and `lib/modules/<release>`.
//! 3. [`vmlinux::convert`] turns the bzImage into an ELF vmlinux and insists on the PVH note;
//!    its banner gives the release, to check against the module tree's name.
//! 4. [`modules::ModuleTree::resolve`] orders the closure of
//!    [`crate::plan::lower::INITRAMFS_MODULES`], and [`initramfs::build_initramfs`] packs
//!    banger's agent as `/init` with those modules and their load list into a cpio
//!    ([`cpio`]).
//!
//! What Debian 12's package holds (6.1.0-56, measured): a 14 MB bzImage with an LZ4 payload
//! (`CONFIG_KERNEL_LZ4`) that decodes to a 53 MB ELF vmlinux with the Xen PVH note;
//! 1121 uncompressed `.ko` files (`CONFIG_MODULE_COMPRESS_NONE`); `modules.builtin` and
//! `modules.order` but no `modules.dep` (its postinst runs depmod), so dependencies come from
//! each module's `.modinfo`. `virtio_console` is a module there too. Kernels built with
//! `CONFIG_MODULE_COMPRESS_*` ship `.ko.xz`/`.ko.zst`/`.ko.gz`, which are decompressed.
//!
//! Every module here has its own error enum naming the package, file or entry involved.

pub mod compression;
pub mod cpio;
pub mod deb;
mod elf;
pub mod fetch;
pub mod initramfs;
pub mod modules;
pub mod modules_tar;
pub mod vmlinux;

use std::path::{Path, PathBuf};

pub use elf::ElfError;

/// Errors from finding the kernel's files in an extracted package.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{root} holds no kernel image (boot/vmlinuz-* or boot/vmlinux-*)")]
    NoImage { root: PathBuf },
    #[error("{root} holds several kernel images ({}); a kernel package has one", found.join(", "))]
    SeveralImages { root: PathBuf, found: Vec<String> },
    #[error(
        "{root} has no module tree for release {release} (lib/modules/{release} or usr/lib/modules/{release})"
    )]
    NoModules { root: PathBuf, release: String },
}

/// Whether a package path (normalized, as [`deb::DebPackage::extract`] passes it) belongs to
/// the kernel: its image, config and modules (in `lib/` or merged-`/usr` `usr/lib/`).
pub fn is_kernel_file(path: &Path) -> bool {
    let boot_file = path.starts_with("boot")
        && path.components().count() == 2
        && path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| {
                ["vmlinuz-", "vmlinux-", "config-"]
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
            });
    // Directories above these are created as needed, so they need not be selected.
    boot_file || path.starts_with("lib/modules") || path.starts_with("usr/lib/modules")
}

/// The kernel's files in an extracted package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFiles {
    /// `boot/vmlinuz-<release>` (or `vmlinux-`).
    pub image: PathBuf,
    /// From the image's file name.
    pub release: String,
    /// `lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

impl KernelFiles {
    /// Finds the kernel image and module tree below `root`.
    pub fn locate(root: &Path) -> Result<KernelFiles, LayoutError> {
        let boot = root.join("boot");
        let read_error = |source| LayoutError::Read {
            path: boot.clone(),
            source,
        };
        let mut images = Vec::new();
        if boot.is_dir() {
            for entry in std::fs::read_dir(&boot).map_err(read_error)? {
                let entry = entry.map_err(read_error)?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let release = name
                    .strip_prefix("vmlinuz-")
                    .or_else(|| name.strip_prefix("vmlinux-"));
                if let Some(release) = release {
                    images.push((name.clone(), release.to_owned()));
                }
            }
        }
        images.sort();
        let (name, release) = match images.len() {
            0 => {
                return Err(LayoutError::NoImage {
                    root: root.to_owned(),
                });
            }
            1 => images.remove(0),
            _ => {
                return Err(LayoutError::SeveralImages {
                    root: root.to_owned(),
                    found: images.into_iter().map(|(name, _)| name).collect(),
                });
            }
        };
        let modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|base| root.join(base).join(&release))
            .find(|dir| dir.is_dir())
            .ok_or_else(|| LayoutError::NoModules {
                root: root.to_owned(),
                release: release.clone(),
            })?;
        Ok(KernelFiles {
            image: boot.join(name),
            release,
            modules_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_the_kernel_files_of_a_package() {
        for (path, wanted) in [
            ("boot/vmlinuz-6.1.0-56-cloud-amd64", true),
            ("boot/config-6.1.0-56-cloud-amd64", true),
            ("boot/System.map-6.1.0-56-cloud-amd64", false),
            (
                "lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/virtio/virtio.ko",
                true,
            ),
            ("usr/lib/modules/6.12.0-1-cloud-amd64/modules.builtin", true),
            (
                "usr/share/doc/linux-image-6.1.0-56-cloud-amd64/changelog.Debian.gz",
                false,
            ),
            ("boot", false),
            ("boot/grub/grub.cfg", false),
        ] {
            assert_eq!(is_kernel_file(Path::new(path)), wanted, "{path}");
        }
    }

    #[test]
    fn locates_image_release_and_modules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("boot")).unwrap();
        assert!(matches!(
            KernelFiles::locate(dir.path()),
            Err(LayoutError::NoImage { .. })
        ));
        std::fs::write(dir.path().join("boot/vmlinuz-6.12.0-1-cloud-amd64"), b"").unwrap();
        std::fs::write(dir.path().join("boot/config-6.12.0-1-cloud-amd64"), b"").unwrap();
        let error = KernelFiles::locate(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("no module tree for release 6.12.0-1-cloud-amd64"),
            "{error}"
        );
        std::fs::create_dir_all(dir.path().join("usr/lib/modules/6.12.0-1-cloud-amd64")).unwrap();
        assert_eq!(
            KernelFiles::locate(dir.path()).unwrap(),
            KernelFiles {
                image: dir.path().join("boot/vmlinuz-6.12.0-1-cloud-amd64"),
                release: "6.12.0-1-cloud-amd64".into(),
                modules_dir: dir.path().join("usr/lib/modules/6.12.0-1-cloud-amd64"),
            }
        );
    }
}
