//! `banger graph`: load the Bangerfile, plan, key and inspect against the store, render.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use banger::ops::graph::{self, Inspection, Style};
use banger::ops::project;
use banger::store::Store;

use super::Context;
use super::exit::ExitStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A tree from the final step down to its inputs, with aligned columns.
    Text,
    /// Graphviz DOT (`banger graph --format dot | dot -Tsvg > graph.svg`).
    Dot,
    /// One JSON document: steps in dependency order with keys, statuses, params and inputs.
    Json,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    /// The Bangerfile [default: ./Bangerfile, else the nearest one in a parent directory].
    #[arg(short, long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Explain why STEP would run: a full step id (`image:sandbox/provision[1]`) or a unique
    /// suffix of one (`provision[1]`, `mkfs`).
    #[arg(long, value_name = "STEP")]
    why: Option<String>,
}

pub fn run(context: &mut Context, args: &GraphArgs) -> anyhow::Result<ExitStatus> {
    let file = match &args.file {
        Some(file) => file.clone(),
        None => {
            let cwd = std::env::current_dir().context("cannot read the current directory")?;
            project::find_bangerfile(&cwd)?
        }
    };
    let config = context.config()?.clone();
    let catalogs = context.catalogs()?;
    let loaded = project::Project::load_with(&file, &config, catalogs)?;
    let plan = loaded.plan()?;
    let spec = loaded.spec;
    let empty_store;
    let store = match context.existing_store()? {
        Some(store) => store,
        None => {
            // Nothing was ever built: inspect against an empty store rather than create one.
            empty_store = tempfile::tempdir().context("cannot create a temporary directory")?;
            Store::open(empty_store.path())?
        }
    };
    let project = project::project_id(&spec);
    let inspection = Inspection::new(&plan, &store, &project)?;
    let printer = &context.printer;
    let style = Style {
        color: printer.color_stdout,
    };

    if let Some(query) = &args.why {
        let node = plan.find(query)?;
        let explanation = inspection.explain(node);
        if printer.json {
            printer.record("why", graph::explanation_json(&explanation))?;
        } else if args.format == Format::Json {
            printer.data(&format!("{:#}\n", graph::explanation_json(&explanation)))?;
        } else {
            printer.data(&graph::render_explanation(&explanation, style))?;
        }
        return Ok(ExitStatus::Success);
    }

    if printer.json {
        printer.record("graph", graph::render_json(&inspection)?)?;
        return Ok(ExitStatus::Success);
    }
    match args.format {
        Format::Text => printer.data(&graph::render_text(&inspection, style))?,
        Format::Dot => printer.data(&graph::render_dot(&inspection))?,
        Format::Json => printer.data(&format!("{:#}\n", graph::render_json(&inspection)?))?,
    }
    Ok(ExitStatus::Success)
}
