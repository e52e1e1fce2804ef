//! Exit codes, decided in one place.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success (also when stdout was closed early, e.g. `banger cache ls \| head`) |
//! | 1    | bad input (arguments, Bangerfile, config, unknown step), a step failed, or a boot |
//! |      | check failed (`kernel test`) |
//! | 2    | banger could not work: environment (store unreadable, no HOME) or internal error |
//! | 130  | interrupted (Ctrl-C) |
//!
//! `vm run -- CMD` and `vm ssh NAME -- CMD` exit with the guest command's own code.

use std::process::ExitCode;

use banger::bangerfile::BangerfileError;
use banger::config::ConfigError;
use banger::engine::{EngineError, error_chain};
use banger::images::ImageError;
use banger::kernels::KernelError;
use banger::lock::LockError;
use banger::oci::OciError;
use banger::plan::PlanError;
use banger::project::ProjectError;
use banger::sources::SourceError;
use banger::state::StateError;

use super::printer::{BrokenPipe, Printer};

/// What the process exits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Success,
    UserError,
    Failure,
    Interrupted,
    /// A guest command's own exit code (`vm run -- CMD`, `vm run`'s shell).
    Code(u8),
}

impl ExitStatus {
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::UserError => 1,
            ExitStatus::Failure => 2,
            ExitStatus::Interrupted => 130,
            ExitStatus::Code(code) => code,
        }
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> ExitCode {
        ExitCode::from(status.code())
    }
}

/// A user error the CLI itself detects (an argument that names nothing, say).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Prints `error` once and picks the exit status for it.
pub fn classify(error: &anyhow::Error, printer: &Printer) -> ExitStatus {
    if error.downcast_ref::<BrokenPipe>().is_some() {
        return ExitStatus::Success;
    }
    let engine = error
        .downcast_ref::<EngineError>()
        .or_else(|| match error.downcast_ref::<ImageError>() {
            Some(ImageError::Engine(inner)) => Some(inner),
            _ => None,
        })
        .or_else(|| match error.downcast_ref::<KernelError>() {
            Some(KernelError::Engine(inner)) => Some(inner),
            _ => None,
        });
    if let Some(engine) = engine {
        match engine {
            EngineError::Cancelled => return ExitStatus::Interrupted,
            // Each failure was already shown as an event.
            EngineError::StepsFailed { .. } => return ExitStatus::UserError,
            _ => {}
        }
    }
    let bangerfile = error.downcast_ref::<BangerfileError>().or_else(|| {
        match error.downcast_ref::<ProjectError>() {
            Some(ProjectError::Bangerfile(inner)) => Some(inner),
            _ => None,
        }
    });
    if let Some(BangerfileError::Invalid { .. }) = bangerfile {
        // A complete report with its own `error:` lines.
        eprintln!("{error}");
        return ExitStatus::UserError;
    }
    let user_error = error.downcast_ref::<UsageError>().is_some()
        || error.downcast_ref::<BangerfileError>().is_some()
        || error.downcast_ref::<ConfigError>().is_some()
        || error.downcast_ref::<LockError>().is_some()
        || error.downcast_ref::<StateError>().is_some_and(|error| {
            matches!(
                error,
                StateError::NoSuchImage { .. }
                    | StateError::ImageExists { .. }
                    | StateError::NoSuchKernel { .. }
                    | StateError::KernelExists { .. }
                    | StateError::NoSuchVm { .. }
                    | StateError::VmExists { .. }
            )
        })
        || matches!(
            error.downcast_ref::<ImageError>(),
            Some(
                ImageError::UnknownImage { .. }
                    | ImageError::UnknownKernel { .. }
                    | ImageError::State(StateError::NoSuchImage { .. })
            )
        )
        || matches!(
            error.downcast_ref::<KernelError>(),
            Some(KernelError::NotInCatalog { .. })
        )
        || error
            .downcast_ref::<OciError>()
            .is_some_and(OciError::is_user_error)
        || matches!(error.downcast_ref::<ImageError>(), Some(ImageError::Oci(oci)) if oci.is_user_error())
        || error.downcast_ref::<SourceError>().is_some()
        || matches!(
            error.downcast_ref::<ProjectError>(),
            Some(
                ProjectError::NotFound { .. }
                    | ProjectError::Config(_)
                    | ProjectError::Bangerfile(_)
                    | ProjectError::Lock(_)
                    | ProjectError::Source(_)
                    | ProjectError::Plan(
                        PlanError::UnknownStep { .. }
                            | PlanError::AmbiguousStep { .. }
                            | PlanError::Cycle { .. }
                    )
            )
        )
        || matches!(
            error.downcast_ref::<PlanError>(),
            Some(
                PlanError::UnknownStep { .. }
                    | PlanError::AmbiguousStep { .. }
                    | PlanError::Cycle { .. }
            )
        );
    printer.error(&render(error));
    if user_error {
        ExitStatus::UserError
    } else {
        ExitStatus::Failure
    }
}

/// `outer: inner: innermost`, without repeating text a wrapper already included.
fn render(error: &anyhow::Error) -> String {
    let root: &(dyn std::error::Error + 'static) = error.as_ref();
    error_chain(root)
}

/// clap's own errors: help and version are successes, everything else a user error.
pub fn clap_error(error: &clap::Error) -> ExitStatus {
    let _ = error.print();
    match error.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
            ExitStatus::Success
        }
        _ => ExitStatus::UserError,
    }
}
