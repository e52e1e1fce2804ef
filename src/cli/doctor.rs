//! `banger doctor`: a report of what this host can do. Exits 1 when a required check is
//! missing, so a CI job (or `banger doctor && banger up`) stops before a build that would fail.

use serde_json::json;

use banger::ops::doctor::{
    Health, INSTALL_SCRIPT, missing_required, network_check, run_checks, script_would_help,
};

use super::Context;
use super::exit::ExitStatus;

pub fn run(context: &mut Context) -> anyhow::Result<ExitStatus> {
    let store_dir = context.paths()?.store_dir();
    let runtime_dir = context.paths()?.runtime_dir.clone();
    let subnet = context.config()?.subnet;
    let mut checks = run_checks(&store_dir);
    checks.push(network_check(&runtime_dir, subnet));
    let printer = &context.printer;
    let required: Vec<&str> = missing_required(&checks).map(|check| check.name).collect();
    let status = if required.is_empty() {
        ExitStatus::Success
    } else {
        ExitStatus::UserError
    };
    if printer.json {
        for check in &checks {
            printer.record(
                "check",
                json!({
                    "name": check.name,
                    "health": check.health.as_str(),
                    "required": check.required,
                    "detail": check.detail,
                    "needed_for": check.needed_for,
                    "fix": check.fix,
                }),
            )?;
        }
        return Ok(status);
    }
    let rows: Vec<[String; 3]> = checks
        .iter()
        .map(|check| {
            [
                check.name.to_owned(),
                check.health.as_str().to_owned(),
                check.detail.clone(),
            ]
        })
        .collect();
    let mut out = super::table(&["CHECK", "STATUS", "DETAIL"], &rows);
    let problems: Vec<_> = checks
        .iter()
        .filter(|check| check.health != Health::Ok)
        .collect();
    if !problems.is_empty() {
        out.push('\n');
        for check in problems {
            let required = if check.required && check.health == Health::Missing {
                ", required"
            } else {
                ""
            };
            out.push_str(&format!(
                "{} ({}{required}): needed for {}",
                check.name,
                check.health.as_str(),
                check.needed_for
            ));
            if let Some(fix) = &check.fix {
                out.push_str(&format!("; fix: {fix}"));
            }
            out.push('\n');
        }
    }
    if script_would_help(&checks) {
        out.push_str(&format!(
            "\nOn Debian 12 and Ubuntu 24.04, `{INSTALL_SCRIPT}` (in banger's source tree) \
             installs every missing program above that has a package.\n"
        ));
    }
    printer.data(&out)?;
    if !required.is_empty() {
        printer.error(&format!(
            "missing what `banger up` needs: {}",
            required.join(", ")
        ));
    }
    Ok(status)
}
