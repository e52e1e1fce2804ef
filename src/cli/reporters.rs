//! Renderers of engine [`Event`]s: progress bars, plain lines, JSON Lines.
//!
//! The engine calls [`Reporter::report`] from its scheduling loop only, so these never race
//! with each other; they still lock because the trait takes `&self`.
//!
//! - [`ProgressReporter`] (stderr is a TTY): one bar per running step (bytes for downloads,
//!   items otherwise, a spinner when the total is unknown; a `run` step's bar shows its
//!   command's last output line); finished steps print a line above the bars.
//! - [`LineReporter`] (piped stderr): a line per finished, failed or skipped step; cached steps,
//!   starts and the output lines of `run` steps only with `-v`. Quiet mode prints failures
//!   only.
//! - [`JsonReporter`] (`--json`): every event as `{"type": …, "data": …}` on stdout, which
//!   is the event's serde form (see [`Event`]).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use banger::engine::{Event, ProgressUnit, Reporter};

use super::printer::{Printer, Verbosity, human_bytes, human_duration};

/// Picks the renderer the printer's settings call for.
pub fn for_printer(printer: &Printer) -> Box<dyn Reporter> {
    if printer.json {
        Box::new(JsonReporter::new(Box::new(std::io::stdout())))
    } else if printer.progress {
        Box::new(ProgressReporter::new(printer.verbosity))
    } else {
        Box::new(LineReporter::new(
            printer.verbosity,
            Box::new(std::io::stderr()),
        ))
    }
}

/// One line of text for an event, or `None` for events this verbosity hides.
pub fn event_line(event: &Event, verbosity: Verbosity) -> Option<String> {
    let verbose = verbosity >= Verbosity::Verbose;
    let quiet = verbosity == Verbosity::Quiet;
    match event {
        Event::RunStarted {
            steps,
            cached,
            to_run,
        } if !quiet => Some(format!(
            "{steps} step(s): {cached} cached, {to_run} to check or run"
        )),
        Event::StepCached { step, hit, key, .. } if verbose => {
            Some(format!("{:>9} {step} ({})", hit.as_str(), key.short()))
        }
        Event::StepStarted { step, summary, .. } if verbose => {
            Some(format!("{:>9} {step}  {summary}", "start"))
        }
        Event::StepOutput { step, line, .. } if verbose => Some(format!("{step} | {line}")),
        Event::StepFinished {
            step,
            duration,
            output_bytes,
            ..
        } if !quiet => Some(format!(
            "{:>9} {step} in {} ({})",
            "ran",
            human_duration(*duration),
            human_bytes(*output_bytes)
        )),
        Event::StepFailed { step, error, .. } => Some(format!("{:>9} {step}: {error}", "failed")),
        Event::StepSkipped { step, because } if !quiet => Some(format!(
            "{:>9} {step} (because {because} did not finish)",
            "skipped"
        )),
        Event::StepCancelled { step } => Some(format!("{:>9} {step}", "cancelled")),
        Event::CacheWarning { step, warning } if !quiet => Some(if step.is_empty() {
            format!("{:>9} {warning}", "warning")
        } else {
            format!("{:>9} {step}: {warning}", "warning")
        }),
        Event::StepPushed {
            step,
            uploaded_bytes,
            reused_bytes,
            ..
        } if verbose => Some(format!(
            "{:>9} {step} ({} sent, {} already there)",
            "pushed",
            human_bytes(*uploaded_bytes),
            human_bytes(*reused_bytes)
        )),
        Event::PushFinished {
            remote,
            pushed,
            present,
            uploaded_bytes,
        } if !quiet => Some(format!(
            "{:>9} {pushed} step(s) to {remote}, {} sent; {present} already there",
            "pushed",
            human_bytes(*uploaded_bytes)
        )),
        Event::RunFinished {
            ran,
            cached,
            remote,
            remote_bytes,
            failed,
            skipped,
            duration,
        } if !quiet => {
            let mut line = format!(
                "{:>9} in {}: {ran} ran, {cached} cached, {failed} failed, {skipped} skipped",
                "done",
                human_duration(*duration)
            );
            if *remote > 0 {
                line.push_str(&format!(
                    "\n{:>9} {remote} step(s) from the remote cache, {}; {ran} ran",
                    "remote",
                    human_bytes(*remote_bytes)
                ));
            }
            Some(line)
        }
        _ => None,
    }
}

/// JSON Lines on a writer (stdout in the CLI).
pub struct JsonReporter {
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for JsonReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonReporter")
    }
}

impl JsonReporter {
    pub fn new(out: Box<dyn Write + Send>) -> JsonReporter {
        JsonReporter {
            out: Mutex::new(out),
        }
    }
}

impl Reporter for JsonReporter {
    fn report(&self, event: &Event) {
        // The event's serde form is the `{"type": …, "data": …}` envelope itself; through a
        // `Value` so keys come out sorted like every other JSON record.
        let Ok(value) = serde_json::to_value(event) else {
            return;
        };
        let mut line = value.to_string();
        line.push('\n');
        if let Ok(mut out) = self.out.lock() {
            // A closed stdout must not stop the build; main notices it on its next write.
            let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
        }
    }
}

/// Plain lines on a writer (stderr when it is not a terminal).
pub struct LineReporter {
    verbosity: Verbosity,
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for LineReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineReporter")
            .field("verbosity", &self.verbosity)
            .finish_non_exhaustive()
    }
}

impl LineReporter {
    pub fn new(verbosity: Verbosity, out: Box<dyn Write + Send>) -> LineReporter {
        LineReporter {
            verbosity,
            out: Mutex::new(out),
        }
    }
}

impl Reporter for LineReporter {
    fn report(&self, event: &Event) {
        if let Some(line) = event_line(event, self.verbosity)
            && let Ok(mut out) = self.out.lock()
        {
            let _ = writeln!(out, "{line}");
        }
    }
}

/// indicatif bars on stderr.
#[derive(Debug)]
pub struct ProgressReporter {
    verbosity: Verbosity,
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl ProgressReporter {
    pub fn new(verbosity: Verbosity) -> ProgressReporter {
        ProgressReporter {
            verbosity,
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn spinner_style() -> ProgressStyle {
        ProgressStyle::with_template("{spinner:.cyan} {prefix} {wide_msg:.dim} {elapsed:>4}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
    }

    fn bytes_style() -> ProgressStyle {
        ProgressStyle::with_template(
            "{spinner:.cyan} {prefix} [{bar:24.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec:>11} {eta:>4}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
    }

    fn items_style() -> ProgressStyle {
        ProgressStyle::with_template("{spinner:.cyan} {prefix} [{bar:24.cyan/blue}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }
}

impl Reporter for ProgressReporter {
    fn report(&self, event: &Event) {
        let Ok(mut bars) = self.bars.lock() else {
            return;
        };
        match event {
            Event::StepStarted { step, summary, .. } => {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(Self::spinner_style());
                bar.set_prefix(step.clone());
                bar.set_message(summary.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                bars.insert(step.clone(), bar);
            }
            Event::StepFetching { step, bytes, .. } | Event::StepPushing { step, bytes, .. } => {
                let bar = self.multi.add(ProgressBar::new(*bytes));
                bar.set_style(Self::bytes_style());
                bar.set_prefix(step.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                bars.insert(step.clone(), bar);
            }
            Event::StepCached { step, .. } | Event::StepPushed { step, .. } => {
                if let Some(bar) = bars.remove(step) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                if let Some(line) = event_line(event, self.verbosity) {
                    let _ = self.multi.println(line);
                }
            }
            Event::StepProgress {
                step,
                done,
                total,
                unit,
            } => {
                if let Some(bar) = bars.get(step) {
                    if let Some(total) = total {
                        if bar.length() != Some(*total) {
                            bar.set_length(*total);
                            bar.set_style(match unit {
                                ProgressUnit::Bytes => Self::bytes_style(),
                                ProgressUnit::Items => Self::items_style(),
                            });
                        }
                    } else if *unit == ProgressUnit::Bytes {
                        bar.set_message(human_bytes(*done));
                    }
                    bar.set_position(*done);
                }
            }
            Event::StepOutput { step, line, .. } => {
                // The command's last line under its step's bar; every line with `-v`.
                if let Some(bar) = bars.get(step) {
                    bar.set_message(line.clone());
                }
                if let Some(line) = event_line(event, self.verbosity) {
                    let _ = self.multi.println(line);
                }
            }
            Event::CacheWarning { step, .. } if bars.contains_key(step) => {
                // A download that failed: its bar goes, the step runs here.
                if let Some(bar) = bars.remove(step) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                if let Some(line) = event_line(event, self.verbosity) {
                    let _ = self.multi.println(line);
                }
            }
            Event::StepFinished { step, .. }
            | Event::StepFailed { step, .. }
            | Event::StepSkipped { step, .. }
            | Event::StepCancelled { step } => {
                if let Some(bar) = bars.remove(step) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                if let Some(line) = event_line(event, self.verbosity) {
                    let _ = self.multi.println(line);
                }
            }
            Event::RunFinished { .. } => {
                for (_, bar) in bars.drain() {
                    bar.finish_and_clear();
                }
                let _ = self.multi.clear();
                if let Some(line) = event_line(event, self.verbosity) {
                    let _ = self.multi.println(line);
                }
            }
            other => {
                if let Some(line) = event_line(other, self.verbosity) {
                    let _ = self.multi.println(line);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger::engine::HitKind;
    use banger::key::Key;
    use serde_json::Value;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn events() -> Vec<Event> {
        let key = Key::from_bytes([0xab; 32]);
        vec![
            Event::RunStarted {
                steps: 3,
                cached: 1,
                to_run: 2,
            },
            Event::StepCached {
                step: "image:x/mkfs".into(),
                kind: "rootfs.mkfs".into(),
                key,
                hit: HitKind::Definition,
            },
            Event::StepStarted {
                step: "image:x/layer[0]".into(),
                kind: "oci.fetch-layer".into(),
                key,
                summary: "sha256:1234".into(),
            },
            Event::StepProgress {
                step: "image:x/layer[0]".into(),
                done: 10,
                total: Some(100),
                unit: ProgressUnit::Bytes,
            },
            Event::StepFinished {
                step: "image:x/layer[0]".into(),
                kind: "oci.fetch-layer".into(),
                duration: Duration::from_millis(1500),
                output_bytes: 2048,
            },
            Event::StepFailed {
                step: "image:x/flatten".into(),
                kind: "rootfs.flatten".into(),
                error: "entry ../etc/passwd escapes the root".into(),
            },
            Event::StepSkipped {
                step: "vm/boot".into(),
                because: "image:x/flatten".into(),
            },
            Event::RunFinished {
                ran: 1,
                cached: 1,
                remote: 0,
                remote_bytes: 0,
                failed: 1,
                skipped: 1,
                duration: Duration::from_millis(1600),
            },
        ]
    }

    #[test]
    fn lines_depend_on_verbosity() {
        let render = |verbosity| {
            let out = Shared::default();
            let reporter = LineReporter::new(verbosity, Box::new(out.clone()));
            for event in events() {
                reporter.report(&event);
            }
            String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
        };
        insta::assert_snapshot!(render(Verbosity::Normal), @r"
        3 step(s): 1 cached, 2 to check or run
              ran image:x/layer[0] in 1.5 s (2.0 KiB)
           failed image:x/flatten: entry ../etc/passwd escapes the root
          skipped vm/boot (because image:x/flatten did not finish)
             done in 1.6 s: 1 ran, 1 cached, 1 failed, 1 skipped
        ");
        insta::assert_snapshot!(render(Verbosity::Quiet), @"   failed image:x/flatten: entry ../etc/passwd escapes the root");
        assert!(render(Verbosity::Verbose).contains("   cached image:x/mkfs (abababababab)"));
    }

    #[test]
    fn json_lines_use_the_type_data_envelope() {
        let out = Shared::default();
        let reporter = JsonReporter::new(Box::new(out.clone()));
        for event in events() {
            reporter.report(&event);
        }
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), events().len());
        for line in &lines {
            assert!(
                line["type"].is_string() && line["data"].is_object(),
                "{line}"
            );
        }
        // Keys sorted, as every JSON record the CLI prints.
        assert_eq!(
            text.lines().nth(4).unwrap(),
            r#"{"data":{"duration_ms":1500,"kind":"oci.fetch-layer","output_bytes":2048,"step":"image:x/layer[0]"},"type":"step_finished"}"#
        );
        assert_eq!(lines[3]["type"], "step_progress");
        assert_eq!(lines[3]["data"]["unit"], "bytes");
        assert_eq!(lines[4]["data"]["duration_ms"], 1500);
        assert_eq!(
            lines[5]["data"]["error"],
            "entry ../etc/passwd escapes the root"
        );
    }
}
