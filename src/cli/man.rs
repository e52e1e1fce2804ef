//! `banger man DIR`: manual pages for banger and each of its commands (clap_mangen), written
//! from the same definitions as `--help`, so the two cannot drift.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, CommandFactory};

use super::{Context, ExitStatus};

#[derive(Debug, Args)]
pub struct ManArgs {
    /// The directory to write them to (made if missing), e.g. `/usr/local/share/man/man1`.
    dir: PathBuf,
}

/// Renders every page into a scratch directory inside DIR, then renames each into place: an
/// interrupted run leaves no half-written page.
pub fn run(context: &mut Context, args: &ManArgs) -> anyhow::Result<ExitStatus> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(".banger-man-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("cannot write in {}", args.dir.display()))?;
    clap_mangen::generate_to(super::Cli::command(), scratch.path())
        .with_context(|| format!("cannot write manual pages in {}", args.dir.display()))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(scratch.path())?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    for page in &pages {
        let target = args.dir.join(page.file_name().expect("a page has a name"));
        std::fs::rename(page, &target)
            .with_context(|| format!("cannot move a page to {}", target.display()))?;
    }
    context.printer.info(&format!(
        "wrote {} manual pages to {} (banger.1 and one per command)",
        pages.len(),
        args.dir.display()
    ));
    Ok(ExitStatus::Success)
}
