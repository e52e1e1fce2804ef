//! `banger vm cp SRC DST`: one side `NAME:/path` in a running VM, the other a host path or
//! `-`; the work is `ops::copy`'s.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use banger::ops::copy::{self, CopySummary, HostDestination, HostSource, ToGuest};

use super::Context;
use super::exit::ExitStatus;
use super::printer::human_bytes;
use super::vm::{Session, agent_channel, running_agent};

#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: `NAME:/guest/path`, a host path, or `-` (a tar stream on stdin).
    source: String,
    /// Where to: `NAME:/guest/path`, a host path, or `-` (the tar stream to stdout).
    destination: String,
    /// Copies into the guest keep the host's uid and gid (without it they are root's).
    #[arg(short, long)]
    archive: bool,
}

/// One side of a copy, as written on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Side {
    Guest { vm: String, path: String },
    Host(PathBuf),
    Stdio,
}

/// `NAME:PATH` is a guest path when the colon comes before any slash (as `docker cp` reads
/// it: `./a:b` is a host file); `-` is stdin or stdout.
fn side(text: &str) -> Side {
    if text == "-" {
        return Side::Stdio;
    }
    match text.split_once(':') {
        Some((vm, path)) if !vm.is_empty() && !vm.contains('/') => Side::Guest {
            vm: vm.to_owned(),
            path: path.to_owned(),
        },
        _ => Side::Host(PathBuf::from(text)),
    }
}

pub(super) fn cp(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    args: &CpArgs,
) -> anyhow::Result<ExitStatus> {
    let (vm_name, into_guest) = match (side(&args.source), side(&args.destination)) {
        (Side::Guest { vm, .. }, Side::Host(_) | Side::Stdio) => (vm, false),
        (Side::Host(_) | Side::Stdio, Side::Guest { vm, .. }) => (vm, true),
        (Side::Guest { .. }, Side::Guest { .. }) => {
            context.printer.error(
                "both sides name a VM; copy through the host (`vm cp A:/x - | vm cp - B:/y`)",
            );
            return Ok(ExitStatus::UserError);
        }
        _ => {
            context.printer.error(&format!(
                "neither `{}` nor `{}` names a VM: write one side as NAME:/path",
                args.source, args.destination
            ));
            return Ok(ExitStatus::UserError);
        }
    };
    let endpoint = match running_agent(context, runtime, session, &vm_name)? {
        Ok((_, endpoint)) => endpoint,
        Err(status) => return Ok(status),
    };
    let result = runtime.block_on(async {
        let mut channel = agent_channel(&endpoint, &vm_name).await?;
        let copying = async {
            if into_guest {
                let Side::Guest { path, .. } = side(&args.destination) else {
                    unreachable!("the destination was matched as a guest path");
                };
                let source = match side(&args.source) {
                    Side::Host(path) => HostSource::Path(path),
                    _ => HostSource::Stdin,
                };
                let request = ToGuest {
                    source,
                    destination: path,
                    keep_owner: args.archive,
                };
                copy::to_guest(&mut channel, &request).await
            } else {
                let Side::Guest { path, .. } = side(&args.source) else {
                    unreachable!("the source was matched as a guest path");
                };
                let destination = match side(&args.destination) {
                    Side::Host(path) => HostDestination::Path(path),
                    _ => HostDestination::Stdout,
                };
                copy::from_guest(&mut channel, &path, &destination).await
            }
        };
        tokio::select! {
            copied = copying => copied.map(Some).with_context(|| {
                format!("cannot copy {} to {}", args.source, args.destination)
            }),
            _ = tokio::signal::ctrl_c() => Ok(None),
        }
    })?;
    let Some(summary) = result else {
        return Ok(ExitStatus::Interrupted);
    };
    report(context, args, &summary)?;
    Ok(ExitStatus::Success)
}

fn report(context: &Context, args: &CpArgs, summary: &CopySummary) -> anyhow::Result<()> {
    // With `-`, stdout may be the tar stream itself: nothing else goes there.
    if args.source == "-" || args.destination == "-" {
        return Ok(());
    }
    if context.printer.json {
        return context.printer.record(
            "copied",
            json!({
                "source": args.source,
                "destination": args.destination,
                "files": summary.files,
                "directories": summary.directories,
                "symlinks": summary.symlinks,
                "skipped": summary.skipped,
                "bytes": summary.bytes,
            }),
        );
    }
    let mut counts = vec![plural(summary.files, "file")];
    if summary.directories > 0 {
        counts.push(plural(summary.directories, "directory"));
    }
    if summary.symlinks > 0 {
        counts.push(plural(summary.symlinks, "symlink"));
    }
    context.printer.info(&format!(
        "copied {} ({}) to {}",
        counts.join(", "),
        human_bytes(summary.bytes),
        args.destination
    ));
    if summary.skipped > 0 {
        context.printer.warn(&format!(
            "left out {} (devices, FIFOs or sockets are not copied)",
            plural(summary.skipped, "special file")
        ));
    }
    Ok(())
}

fn plural(count: u64, noun: &str) -> String {
    match (count, noun) {
        (1, _) => format!("1 {noun}"),
        (_, "directory") => format!("{count} directories"),
        _ => format!("{count} {noun}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_read_as_docker_cp_reads_them() {
        assert_eq!(
            side("box:/etc/hosts"),
            Side::Guest {
                vm: "box".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(side("./a:b"), Side::Host("./a:b".into()));
        assert_eq!(side("/tmp/x"), Side::Host("/tmp/x".into()));
        assert_eq!(side(":x"), Side::Host(":x".into()));
        assert_eq!(side("-"), Side::Stdio);
    }
}
