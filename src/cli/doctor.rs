//! `banger doctor`: a report of what this host can do.

use serde_json::json;

use banger::ops::doctor::{Health, run_checks};

use super::Context;
use super::exit::ExitStatus;

pub fn run(context: &mut Context) -> anyhow::Result<ExitStatus> {
    let store_dir = context.paths()?.store_dir();
    let checks = run_checks(&store_dir);
    let printer = &context.printer;
    if printer.json {
        for check in &checks {
            printer.record(
                "check",
                json!({
                    "name": check.name,
                    "health": check.health.as_str(),
                    "detail": check.detail,
                    "needed_for": check.needed_for,
                    "fix": check.fix,
                }),
            )?;
        }
        return Ok(ExitStatus::Success);
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
            out.push_str(&format!(
                "{} ({}): needed for {}",
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
    printer.data(&out)?;
    Ok(ExitStatus::Success)
}
