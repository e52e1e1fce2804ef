//! Kernels from distribution packages: what the `kernel.fetch-package`, `kernel.extract` and
//! `kernel.initramfs` steps are made of. Library code only: no engine, no store, no printing.
//!
//! The default kernel recipe (`catalogs/kernels.json`: Debian bookworm's
//! `linux-image-cloud-amd64`) becomes what banger boots in four moves:
//!
//! 1. [`fetch::fetch_kernel_package`] downloads the package with `apt-get download`,
//!    following the metapackage to the versioned package it pins.
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
mod elf;
pub mod initramfs;
pub mod modules;
pub mod vmlinux;

pub use elf::ElfError;
