//! `catalog.fetch-bundle` and `bundle.unpack`: an image (or kernel) from a catalog bundle;
//! `bundle.write`: an image as a golden bundle.
//!
//! `catalog.fetch-bundle` and `kernel.fetch-bundle` — params
//! [`crate::plan::kinds::FetchBundleParams`] (`url`, `sha256`, `size`, and for a kernel
//! `refresh` on `--force`); output `bundle.tar.zst`, verified while it streams
//! ([`crate::fetch`]); a mismatch stores nothing.
//! `bundle.unpack` — input `bundle`, no params; outputs the bundle's files (`rootfs.ext4` for images;
//! `vmlinux`, `initrd` and `modules.tar` for kernels) and `manifest.json`, each checked
//! against the manifest's sha256 ([`crate::bundle::unpack_bundle`]). Hint `url` (not keyed):
//! where the bundle came from, named in errors, since the file being read is a scratch copy
//! that is gone by the time the error is shown.
//! `bundle.write` — input `rootfs`; params [`crate::plan::kinds::BundleWriteParams`]; output
//! `bundle.tar.zst` ([`crate::bundle::write_bundle`], deterministic: the same image gives the
//! same bytes, so a rebuild of an unchanged image reuses the stored bundle without
//! compressing anything).

use std::sync::Arc;

use crate::bundle::{BundleKind, unpack_bundle};
use crate::engine::{BoxFuture, Executor, ProgressUnit, StepContext, StepError};
use crate::fetch::{Expected, Fetcher};
use crate::plan::kinds::{BundleWriteParams, FetchBundleParams};

#[derive(Debug, Clone)]
pub struct FetchBundle {
    pub fetcher: Arc<Fetcher>,
}

impl Executor for FetchBundle {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let params: FetchBundleParams = super::params(ctx)?;
            let expected = Expected {
                sha256: params.sha256,
                size: Some(params.size),
            };
            let destination = ctx.output("bundle.tar.zst")?;
            self.fetcher
                .fetch_verified(
                    &params.url,
                    &expected,
                    &destination,
                    |done, total| ctx.progress(done, total, ProgressUnit::Bytes),
                    ctx.cancellation(),
                )
                .await
                .map_err(|error| StepError::with_source("cannot fetch the bundle", error))
        })
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct UnpackBundle;

impl Executor for UnpackBundle {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let bundle = ctx.input_file("bundle", "bundle.tar.zst")?;
            let unpacked = ctx.work_dir()?.join("unpacked");
            let rootfs = ctx.output(crate::steps::ROOTFS_OUTPUT)?;
            let out_dir = rootfs
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default();
            let progress = ctx.progress_handle();
            let cancel = ctx.cancellation().clone();
            let failed = match ctx.hints.get("url") {
                Some(url) => format!(
                    "cannot unpack the bundle from {}",
                    crate::fetch::display_source(url)
                ),
                None => "cannot unpack the bundle".to_owned(),
            };
            tokio::task::spawn_blocking(move || -> Result<(), StepError> {
                let manifest = unpack_bundle(
                    &bundle,
                    &unpacked,
                    &mut |done, total| progress.report(done, Some(total), ProgressUnit::Bytes),
                    &cancel,
                )
                .map_err(|error| StepError::with_source(failed, error))?;
                let move_out = |name: &str, to: &std::path::Path| {
                    std::fs::rename(unpacked.join(name), to).map_err(|error| {
                        StepError::with_source(
                            format!("cannot move {name} out of the bundle"),
                            error,
                        )
                    })
                };
                match manifest.kind {
                    BundleKind::Image => move_out("rootfs.ext4", &out_dir.join("rootfs.ext4"))?,
                    BundleKind::Kernel => {
                        move_out("vmlinux", &out_dir.join("vmlinux"))?;
                        if unpacked.join("initrd").exists() {
                            move_out("initrd", &out_dir.join("initrd"))?;
                        }
                        if unpacked.join("modules").is_dir() {
                            crate::kernel::modules_tar::pack(
                                &unpacked.join("modules"),
                                &out_dir.join("modules.tar"),
                            )
                            .map_err(|error| {
                                StepError::with_source("cannot pack the kernel's modules", error)
                            })?;
                        }
                    }
                }
                std::fs::write(out_dir.join("manifest.json"), manifest.to_json())
                    .map_err(|error| StepError::with_source("cannot write manifest.json", error))?;
                Ok(())
            })
            .await
            .map_err(|error| StepError::new(format!("unpacking panicked: {error}")))?
        })
    }
}

/// The file name of a bundle step's output.
pub const BUNDLE_OUTPUT: &str = "bundle.tar.zst";

#[derive(Debug, Clone, Copy, Default)]
pub struct WriteBundle;

impl Executor for WriteBundle {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let params: BundleWriteParams = super::params(ctx)?;
            let rootfs = ctx.input_file("rootfs", crate::steps::ROOTFS_OUTPUT)?;
            let out = ctx.output(BUNDLE_OUTPUT)?;
            let progress = ctx.progress_handle();
            let cancel = ctx.cancellation().clone();
            tokio::task::spawn_blocking(move || {
                let distro = crate::bundle::image_distro(&rootfs);
                let manifest = crate::bundle::BundleManifest::image(
                    &params.name,
                    &distro,
                    &params.arch,
                    &params.kernel_ref,
                );
                crate::bundle::write_bundle(
                    &manifest,
                    &[(crate::steps::ROOTFS_OUTPUT.to_owned(), rootfs)],
                    &out,
                    &mut |done, total| progress.report(done, Some(total), ProgressUnit::Bytes),
                    &cancel,
                )
            })
            .await
            .map_err(|error| StepError::new(format!("writing the bundle panicked: {error}")))?
            .map(|_| ())
            .map_err(|error| StepError::with_source("cannot write the bundle", error))
        })
    }
}
