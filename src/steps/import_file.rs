//! `import.file`: a file from the host (a rootfs tar for `banger image import-tar`, an ext4
//! image for `banger image register`), brought into the store.
//!
//! Params: [`crate::plan::kinds::ImportFileParams`]: `digest` (blake3 of the content, so the
//! key follows the bytes, not the path) and `name` (the output's name). Hint: `path`, where to read it. The file is re-hashed while it
//! is copied: if it changed since it was planned, the step fails rather than store bytes its
//! key does not describe.

use crate::engine::{BoxFuture, Executor, ProgressUnit, StepContext, StepError};
use crate::plan::kinds::ImportFileParams;

#[derive(Debug, Clone, Copy, Default)]
pub struct ImportFile;

impl Executor for ImportFile {
    fn execute<'a>(&'a self, ctx: &'a StepContext) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let source = ctx
                .hints
                .get("path")
                .cloned()
                .ok_or_else(|| StepError::new(format!("step {} has no path", ctx.step_id)))?;
            let params: ImportFileParams = super::params(ctx)?;
            let expected = params.digest;
            let destination = ctx.output(&params.name)?;
            let progress = ctx.progress_handle();
            tokio::task::spawn_blocking(move || {
                copy_verified(&source, &destination, &expected, &progress)
            })
            .await
            .map_err(|error| StepError::new(format!("the import panicked: {error}")))?
        })
    }
}

/// Copies `source` to `destination`, data only (holes stay holes: a registered 2 GiB image
/// holding 200 MB takes 200 MB in the store), hashing every byte, holes included, as it goes.
fn copy_verified(
    source: &str,
    destination: &std::path::Path,
    expected: &str,
    progress: &crate::engine::ProgressHandle,
) -> Result<(), StepError> {
    use std::os::unix::fs::FileExt;
    let read_error = |error| StepError::with_source(format!("cannot read {source}"), error);
    let write_error =
        |error| StepError::with_source(format!("cannot write {}", destination.display()), error);
    let input = std::fs::File::open(source).map_err(read_error)?;
    let total = input.metadata().map_err(read_error)?.len();
    let output = std::fs::File::create(destination).map_err(write_error)?;
    let mut hasher = blake3::Hasher::new();
    let mut done = 0u64;
    let copied = crate::sparse::read_sparse(&input, |chunk| {
        hasher.update(chunk.bytes);
        if !chunk.hole {
            output.write_all_at(chunk.bytes, chunk.offset)?;
        }
        done += chunk.bytes.len() as u64;
        progress.report(done, Some(total), ProgressUnit::Bytes);
        Ok(())
    })
    .map_err(|error| match error {
        crate::sparse::SparseReadError::Read(error) => read_error(error),
        crate::sparse::SparseReadError::Consumer(error) => write_error(error),
    })?;
    output.set_len(copied).map_err(write_error)?;
    let actual = format!("blake3:{}", hasher.finalize().to_hex());
    if actual != expected {
        return Err(StepError::new(format!(
            "{source} changed while it was being imported (expected {expected}, read {actual}); run the command again"
        )));
    }
    Ok(())
}
