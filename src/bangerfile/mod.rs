//! The Bangerfile: a project's TOML description of its sandbox, parsed into a validated
//! [`Spec`].
//!
//! This module owns the file format (documented as a grammar in `docs/bangerfile.md`), every
//! default a Bangerfile may leave out, and the diagnostics for everything that can be wrong in
//! one. It does not know about steps, keys or the store: [`crate::plan::lower`] turns the
//! `Spec` into a plan.
//!
//! Lifecycle of [`load`] / [`parse`]:
//! 1. [`load`] reads the file (the only I/O of its own) and makes its path absolute; [`parse`]
//!    takes the text directly.
//! 2. The text is parsed into `toml`'s spanned document with error recovery. Syntax errors are
//!    reported, all of them, and parsing stops there: a broken document would only produce
//!    confusing follow-on errors.
//! 3. Stage 1 (`document.rs`): each table, each `[images.NAME]` and each `[[...]]` entry is
//!    deserialized on its own into the raw types of `raw.rs` (`deny_unknown_fields`, every field
//!    optional and spanned). A bad entry is reported and dropped, and the rest still read.
//! 4. Stage 2 (`validate.rs`): raw values are checked and resolved against the catalogs and
//!    [`Defaults`]: sizes, modes, guest and project paths, names, `from` sources, kernels,
//!    image references, cycles (one error naming the whole cycle) and dependency order. Project
//!    files are looked up through [`ParseContext::probe`] only.
//! 5. No diagnostics → a [`Spec`] with every default resolved; otherwise
//!    [`BangerfileError::Invalid`] with every diagnostic, sorted by position.
//!
//! Weaknesses:
//! - Within one unit (say `[vm]`), errors are found one serde attempt at a time; several bad
//!   values inside one nested value (two bad `env` entries) need as many attempts, which is fine
//!   for human-sized files but quadratic in principle.
//! - Two errors inside one array value (`packages = [1, 2]`) report only the first: array
//!   elements are never dropped, so indices in later messages stay true.
//! - A `copy` source is checked when the Bangerfile is parsed; it can still vanish before the
//!   step runs, and the step must report that itself.
//! - Key paths of syntax errors are best effort: they come from the partially recovered
//!   document.

mod check;
mod diagnostic;
mod document;
mod raw;
mod validate;

impl crate::error::Classify for BangerfileError {
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::User
    }
}

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use toml::de::DeTable;

pub use diagnostic::{Diagnostic, Snippet};

use crate::catalog::Catalogs;
use crate::spec::{ByteSize, NetworkMode, Spec, VmShape};
use diagnostic::Report;

/// The conventional file name.
pub const FILE_NAME: &str = "Bangerfile";

/// Errors from loading or parsing a Bangerfile.
#[derive(Debug, thiserror::Error)]
pub enum BangerfileError {
    /// The file could not be read (missing, a directory, not UTF-8, no permission).
    #[error("cannot read Bangerfile {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid Bangerfile. Displays as a complete cargo-style
    /// report (every diagnostic, then `error: could not read FILE: N errors`), meant to be
    /// printed as is rather than behind another `error:` prefix.
    #[error("{}", diagnostic::render_report(.file, .diagnostics))]
    Invalid {
        file: PathBuf,
        /// In file order; never empty.
        diagnostics: Vec<Diagnostic>,
    },
}

/// What a project-relative path is, as far as the Bangerfile cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathStatus {
    /// Does not exist (or cannot be inspected).
    Missing,
    File,
    Directory,
    /// Exists, but resolves (through a symlink) outside the project directory.
    OutsideProject,
}

/// Looks up a path relative to the project directory: `probe(project_dir, relative)`.
pub type Probe = dyn Fn(&Path, &Path) -> PathStatus + Sync;

/// The real file system: follows symlinks, and reports a path whose real location is outside
/// the project's real location as [`PathStatus::OutsideProject`].
pub fn probe_filesystem(project_dir: &Path, relative: &Path) -> PathStatus {
    let path = project_dir.join(relative);
    let Ok(metadata) = std::fs::metadata(&path) else {
        return PathStatus::Missing;
    };
    if let (Ok(real), Ok(root)) = (
        std::fs::canonicalize(&path),
        std::fs::canonicalize(project_dir),
    ) && !real.starts_with(&root)
    {
        return PathStatus::OutsideProject;
    }
    if metadata.is_dir() {
        PathStatus::Directory
    } else {
        PathStatus::File
    }
}

/// The built-in VM shape: 2 vcpu, 2048 MiB, 8G disk, user networking.
pub const DEFAULT_VM: VmShape = VmShape {
    vcpu: 2,
    memory: ByteSize(2048 * ByteSize::MIB),
    disk: ByteSize(8 * ByteSize::GIB),
    network: NetworkMode::User,
};

/// The image a Bangerfile boots when it says nothing else.
pub const DEFAULT_IMAGE: &str = "debian-bookworm";

/// Where `[workspace]` puts the project in the guest unless `guest` says otherwise.
pub const DEFAULT_WORKSPACE_GUEST: &str = "/root/project";

/// Values a Bangerfile may leave out. Config can change them; the Bangerfile wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// Used for every `[vm]` key that is absent.
    pub vm: VmShape,
    /// The base of images with no `from` (and the sandbox when there is no `[image]`): a catalog
    /// name, else an OCI reference, exactly like a `from` string.
    pub image: String,
}

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults {
            vm: DEFAULT_VM,
            image: DEFAULT_IMAGE.to_owned(),
        }
    }
}

/// Everything outside the Bangerfile that parsing depends on.
///
/// Default kernels are not configured here but derived: an image takes its catalog entry's
/// `kernel_ref`, an image built from another image takes that image's kernel, and anything
/// else the first kernel of the kernel catalog.
pub struct ParseContext<'a> {
    pub catalogs: &'a Catalogs,
    pub defaults: Defaults,
    /// The only way parsing looks at project files.
    pub probe: &'a Probe,
}

impl<'a> ParseContext<'a> {
    /// Built-in defaults, with project files looked up on the real file system.
    pub fn new(catalogs: &'a Catalogs) -> ParseContext<'a> {
        ParseContext {
            catalogs,
            defaults: Defaults::default(),
            probe: &probe_filesystem,
        }
    }

    pub fn with_defaults(mut self, defaults: Defaults) -> ParseContext<'a> {
        self.defaults = defaults;
        self
    }

    /// Replaces the file-system lookup (tests, or a daemon checking a client's files).
    pub fn with_probe(mut self, probe: &'a Probe) -> ParseContext<'a> {
        self.probe = probe;
        self
    }
}

impl fmt::Debug for ParseContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParseContext")
            .field("catalogs", &self.catalogs)
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

/// Reads and parses the Bangerfile at `path`. The spec's `source_file` and `project_dir` are
/// absolute; diagnostics name the file as `path` spells it.
pub fn load(path: &Path, ctx: &ParseContext<'_>) -> Result<Spec, BangerfileError> {
    let read_error = |source| BangerfileError::Read {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    // The directory is canonicalized (not the file) so a symlinked Bangerfile still belongs to
    // the project it is linked into, and a path like `../x/Bangerfile` still yields a name.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path does not name a file",
        ))
    })?;
    let absolute = std::fs::canonicalize(dir)
        .map_err(read_error)?
        .join(file_name);
    parse_named(&text, &absolute, path, ctx)
}

/// Parses Bangerfile text. `file` is where it lives: its directory is the project directory,
/// and diagnostics name it. Does no I/O except through `ctx.probe`.
pub fn parse(text: &str, file: &Path, ctx: &ParseContext<'_>) -> Result<Spec, BangerfileError> {
    parse_named(text, file, file, ctx)
}

/// `file` locates the project; `shown` is how diagnostics name it.
fn parse_named(
    text: &str,
    file: &Path,
    shown: &Path,
    ctx: &ParseContext<'_>,
) -> Result<Spec, BangerfileError> {
    let mut report = Report::new(shown, text);
    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    document::report_syntax_errors(&document, &syntax_errors, &mut report);
    let spec = if syntax_errors.is_empty() {
        let raw = document::read_document(&document, &mut report);
        validate::validate(raw, file, ctx, &mut report)
    } else {
        None
    };
    match spec {
        Some(spec) if report.is_empty() => Ok(spec),
        _ => {
            debug_assert!(
                !report.is_empty(),
                "an invalid Bangerfile without a diagnostic"
            );
            Err(BangerfileError::Invalid {
                file: shown.to_owned(),
                diagnostics: report.into_diagnostics(),
            })
        }
    }
}
