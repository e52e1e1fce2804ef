//! Exit codes, decided in one place.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success (also when stdout was closed early, e.g. `banger cache ls \| head`) |
//! | 1    | bad input (arguments, Bangerfile, config, unknown step), a step failed, a boot |
//! |      | check failed (`kernel test`), or a required host check is missing (`doctor`) |
//! | 2    | banger could not work: environment (store unreadable, no HOME) or internal error |
//! | 130  | interrupted (Ctrl-C) |
//!
//! `vm exec` and `vm run -- CMD` exit with the guest command's own code, else 125 (banger
//! failed), 126 (not executable in the guest) or 127 (not found in the guest), as `docker
//! run` does ([`super::vm`]'s `guest_command_status`); `vm ssh NAME -- CMD` with ssh's.

use std::process::ExitCode;

use banger::bangerfile::BangerfileError;
use banger::config::ConfigError;
use banger::engine::EngineError;
use banger::error::{Classify, ErrorClass, error_chain};
use banger::lock::LockError;
use banger::oci::OciError;
use banger::ops::build::BuildError;
use banger::ops::graph::InspectError;
use banger::ops::images::ImageError;
use banger::ops::kernels::KernelError;
use banger::ops::project::ProjectError;
use banger::ops::up::{ExportError, UpError};
use banger::ops::vms::VmError;
use banger::plan::PlanError;
use banger::sources::SourceError;
use banger::state::StateError;
use banger::store::StoreError;

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

/// The user pressed Ctrl-C while the CLI waited for something it does not control (the
/// daemon): exit 130 with what happens to the work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);

impl ExitStatus {
    /// The exit status of an error of `class`.
    pub fn of(class: ErrorClass) -> ExitStatus {
        match class {
            ErrorClass::User | ErrorClass::Failed => ExitStatus::UserError,
            ErrorClass::Environment => ExitStatus::Failure,
            ErrorClass::Interrupted => ExitStatus::Interrupted,
        }
    }
}

/// The class of an error the CLI got: the first banger error in its chain that knows its
/// class ([`Classify`], the same the daemon answers with), else an environment error.
fn class_of(error: &anyhow::Error) -> ErrorClass {
    macro_rules! classified {
        ($($kind:ty),* $(,)?) => {
            for cause in error.chain() {
                $(
                    if let Some(known) = cause.downcast_ref::<$kind>() {
                        return known.class();
                    }
                )*
                if cause.downcast_ref::<UsageError>().is_some() {
                    return ErrorClass::User;
                }
                if cause.downcast_ref::<Interrupted>().is_some() {
                    return ErrorClass::Interrupted;
                }
            }
        };
    }
    classified!(
        UpError,
        ExportError,
        BuildError,
        ImageError,
        KernelError,
        VmError,
        ProjectError,
        EngineError,
        BangerfileError,
        ConfigError,
        LockError,
        StateError,
        OciError,
        PlanError,
        SourceError,
        InspectError,
        StoreError,
        banger::ops::ssh_config::SshConfigError,
        banger::ops::copy::CopyError,
        banger::ops::sessions::SessionError,
        banger::remote::RemoteCacheError,
        banger::ops::publish::PublishError,
    );
    ErrorClass::Environment
}

/// Prints `error` once and picks the exit status for it.
pub fn classify(error: &anyhow::Error, printer: &Printer) -> ExitStatus {
    if error.downcast_ref::<BrokenPipe>().is_some() {
        return ExitStatus::Success;
    }
    if let Some(refused) = error.downcast_ref::<super::vm::Refused>() {
        printer.error(&refused.message);
        return refused.status();
    }
    let class = class_of(error);
    let reported = error.chain().any(|cause| {
        cause
            .downcast_ref::<EngineError>()
            .is_some_and(EngineError::already_reported)
            || cause
                .downcast_ref::<ImageError>()
                .is_some_and(ImageError::already_reported)
    });
    // Each failure was already shown as an event.
    if reported {
        return ExitStatus::of(class);
    }
    let bangerfile = error.chain().find_map(|cause| {
        cause.downcast_ref::<BangerfileError>().or_else(|| {
            match cause.downcast_ref::<ProjectError>() {
                Some(ProjectError::Bangerfile(inner)) => Some(inner),
                _ => None,
            }
        })
    });
    if let Some(BangerfileError::Invalid { .. }) = bangerfile {
        // A complete report with its own `error:` lines.
        eprintln!("{error}");
        return ExitStatus::UserError;
    }
    let causes = error.chain().skip(1).map(ToString::to_string).collect();
    printer.error_with_causes(&render(error), causes);
    ExitStatus::of(class)
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
