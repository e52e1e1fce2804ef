//! Stage 1: the spanned TOML document → raw sections, collecting every error.
//!
//! Serde stops at the first error, so it is never run on the whole file. The document is parsed
//! into `toml`'s spanned tree ([`DeTable`]) and each unit that can fail on its own (a top-level
//! table, one `[[image.provision]]` entry, one `[images.NAME]`, one `[[file_sync]]` entry) is
//! deserialized separately. Within a unit, a failed attempt reports its error, removes the
//! offending table entry (the innermost one, so `from = { oci = 1, tag = "x" }` reports both
//! keys) and tries again, until the unit deserializes or nothing more can be removed. The
//! removed entries are remembered so that stage 2 does not also complain that they are missing.

use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::check;
use super::diagnostic::{KeyPath, Report, Segment};
use super::raw::{RawFileSync, RawImage, RawProject, RawProvision, RawUp, RawVm, RawWorkspace};

/// One deserialized unit with where it came from.
#[derive(Debug)]
pub(crate) struct Read<T> {
    pub value: T,
    /// Key path of the unit (`vm`, `image.provision[2]`).
    pub path: KeyPath,
    /// Its span: the `[header]` for a table written with one, else the whole value.
    pub span: Range<usize>,
    /// Entries (relative to `path`) that were reported and removed.
    failed: Vec<KeyPath>,
}

impl<T> Read<T> {
    /// Whether the entry `key` (or something inside it) was reported and dropped.
    pub fn failed(&self, key: &str) -> bool {
        let prefix = KeyPath::root().key(key);
        self.failed.iter().any(|path| path.starts_with(&prefix))
    }

    /// Whether any entry of this unit was reported and dropped: checks about which keys are
    /// present would then only repeat an error the user already sees.
    pub fn any_failed(&self) -> bool {
        !self.failed.is_empty()
    }
}

/// An `[image]` or `[images.NAME]` table and its provisioning entries.
#[derive(Debug)]
pub(crate) struct RawImageDef {
    pub body: Read<RawImage>,
    pub provision: Vec<Read<RawProvision>>,
    /// Some provisioning entry could not be read, so the image cannot be built.
    pub provision_failed: bool,
}

/// The key of an `[images.NAME]` table.
#[derive(Debug)]
pub(crate) struct NamedImage {
    pub name: String,
    pub name_span: Range<usize>,
    pub def: Option<RawImageDef>,
}

/// The whole Bangerfile after stage 1. `None`/missing entries were absent or unreadable (and
/// reported).
#[derive(Debug, Default)]
pub(crate) struct RawDocument {
    pub project: Option<Read<RawProject>>,
    /// `[image]`, with the span of its `image` key (for ordering).
    pub image: Option<(Range<usize>, Option<RawImageDef>)>,
    pub images: Vec<NamedImage>,
    pub vm: Option<Read<RawVm>>,
    pub workspace: Option<Read<RawWorkspace>>,
    pub up: Option<Read<RawUp>>,
    pub file_sync: Vec<Read<RawFileSync>>,
}

const TOP_LEVEL_KEYS: &[&str] = &[
    "project",
    "image",
    "images",
    "vm",
    "workspace",
    "up",
    "file_sync",
];

/// Reads every section of a parsed document, reporting what cannot be read.
pub(crate) fn read_document(
    document: &Spanned<DeTable<'_>>,
    report: &mut Report<'_>,
) -> RawDocument {
    let mut raw = RawDocument::default();
    for (key, value) in document.get_ref().iter() {
        let name = key.get_ref().as_ref();
        let path = KeyPath::root().key(name);
        match name {
            "project" => raw.project = read_table(value, &path, report),
            "vm" => raw.vm = read_table(value, &path, report),
            "workspace" => raw.workspace = read_table(value, &path, report),
            "up" => raw.up = read_table(value, &path, report),
            "image" => raw.image = Some((key.span(), read_image(value, &path, report))),
            "images" => raw.images = read_images(value, &path, report),
            "file_sync" => raw.file_sync = read_array(value, &path, report).0,
            unknown => unknown_key(report, key.span(), &path, unknown, TOP_LEVEL_KEYS),
        }
    }
    raw
}

/// Reports TOML syntax errors, located in the partially recovered document where possible.
pub(crate) fn report_syntax_errors(
    document: &Spanned<DeTable<'_>>,
    errors: &[toml::de::Error],
    report: &mut Report<'_>,
) {
    let text = report.text();
    for error in errors {
        let span = error.span().unwrap_or(text.len()..text.len());
        let message = error.message().trim_end();
        let mut path = KeyPath::root();
        locate_in_table(document.get_ref(), &span, &mut path);
        if message != "duplicate key" {
            report.error(span, &path, format!("invalid TOML: {message}"));
            continue;
        }
        // The recovered document keeps one of the two definitions; name the key and, when the
        // kept one is the first, where that is.
        let key = text.get(span.clone()).unwrap_or_default();
        let key = key.trim_matches(['"', '\'']);
        let first = find_key_before(document.get_ref(), key, span.start);
        let help = first.as_ref().map(|(first_path, first_span)| {
            let line = text[..first_span.start].matches('\n').count() + 1;
            format!("`{first_path}` is first defined on line {line}")
        });
        if let Some((first_path, _)) = first {
            path = first_path;
        }
        report.error_with_help(
            span,
            &path,
            format!("invalid TOML: duplicate key `{key}`"),
            help,
        );
    }
}

fn unknown_key(
    report: &mut Report<'_>,
    span: Range<usize>,
    path: &KeyPath,
    key: &str,
    expected: &[&str],
) {
    let help = check::closest(key, expected.iter().copied())
        .map(|candidate| format!("did you mean `{candidate}`?"));
    report.error_with_help(
        span,
        path,
        format!(
            "unknown key `{key}`, expected one of {}",
            check::backticked(expected.iter().copied())
        ),
        help,
    );
}

/// A single table such as `[vm]`.
fn read_table<T: DeserializeOwned>(
    value: &Spanned<DeValue<'_>>,
    path: &KeyPath,
    report: &mut Report<'_>,
) -> Option<Read<T>> {
    if !value.get_ref().is_table() {
        report.error(
            value.span(),
            path,
            format!(
                "`{path}` must be a table like `[{path}]`, found {}",
                a_type(value.get_ref())
            ),
        );
        return None;
    }
    deserialize_unit(value, path, report)
}

/// An array of tables such as `[[file_sync]]`; the flag says whether an entry was dropped.
fn read_array<T: DeserializeOwned>(
    value: &Spanned<DeValue<'_>>,
    path: &KeyPath,
    report: &mut Report<'_>,
) -> (Vec<Read<T>>, bool) {
    let Some(array) = value.get_ref().as_array() else {
        report.error_with_help(
            value.span(),
            path,
            format!(
                "`{path}` must be an array of tables, found {}",
                a_type(value.get_ref())
            ),
            Some(format!("write `[[{path}]]` before each entry")),
        );
        return (Vec::new(), true);
    };
    let mut entries = Vec::new();
    let mut failed = false;
    for (index, element) in array.iter().enumerate() {
        let element_path = path.index(index);
        if !element.get_ref().is_table() {
            report.error(
                element.span(),
                &element_path,
                format!(
                    "each `{path}` entry must be a table, found {}",
                    a_type(element.get_ref())
                ),
            );
            failed = true;
            continue;
        }
        match deserialize_unit(element, &element_path, report) {
            Some(entry) => entries.push(entry),
            None => failed = true,
        }
    }
    (entries, failed)
}

fn read_image(
    value: &Spanned<DeValue<'_>>,
    path: &KeyPath,
    report: &mut Report<'_>,
) -> Option<RawImageDef> {
    let body = read_table::<RawImage>(value, path, report)?;
    let (provision, provision_failed) = match value.get_ref().get("provision") {
        Some(entries) => read_array(entries, &path.key("provision"), report),
        None => (Vec::new(), false),
    };
    Some(RawImageDef {
        body,
        provision,
        provision_failed,
    })
}

fn read_images(
    value: &Spanned<DeValue<'_>>,
    path: &KeyPath,
    report: &mut Report<'_>,
) -> Vec<NamedImage> {
    let Some(table) = value.get_ref().as_table() else {
        report.error_with_help(
            value.span(),
            path,
            format!(
                "`images` must be a table of named images, found {}",
                a_type(value.get_ref())
            ),
            Some("write `[images.NAME]` for each image"),
        );
        return Vec::new();
    };
    table
        .iter()
        .map(|(name, image)| {
            let name_str = name.get_ref().as_ref().to_owned();
            let image_path = path.key(&name_str);
            NamedImage {
                def: read_image(image, &image_path, report),
                name: name_str,
                name_span: name.span(),
            }
        })
        .collect()
}

/// Deserializes one unit, dropping and reporting bad entries until it succeeds.
fn deserialize_unit<T: DeserializeOwned>(
    value: &Spanned<DeValue<'_>>,
    path: &KeyPath,
    report: &mut Report<'_>,
) -> Option<Read<T>> {
    let span = value.span();
    let mut value = value.clone();
    let mut failed = Vec::new();
    loop {
        match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(parsed) => {
                return Some(Read {
                    value: parsed,
                    path: path.clone(),
                    span,
                    failed,
                });
            }
            Err(error) => {
                let error_span = error.span().unwrap_or_else(|| span.clone());
                let mut relative = KeyPath::root();
                locate(value.get_ref(), &error_span, &mut relative);
                report_serde_error(report, error.message(), error_span, &path.join(&relative));
                // Array elements are never removed: that would renumber their siblings.
                let removable = relative.up_to_first_index();
                if removable.is_empty() || !remove(value.get_mut(), removable.segments()) {
                    return None;
                }
                failed.push(removable);
            }
        }
    }
}

/// Rewords serde's messages into Bangerfile terms (keys, not fields) and adds a suggestion.
fn report_serde_error(report: &mut Report<'_>, message: &str, span: Range<usize>, path: &KeyPath) {
    let message = message.trim_end();
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        report.error(
            span,
            path,
            format!(
                "expected {}, found {}",
                toml_words(expected),
                toml_words(found)
            ),
        );
        return;
    }
    let Some(rest) = message.strip_prefix("unknown field ") else {
        report.error(span, path, message);
        return;
    };
    // serde's wording: unknown field `x`, expected one of `a`, `b` | expected `a` or `b`
    let names: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
    let help = names.split_first().and_then(|(unknown, expected)| {
        check::closest(unknown, expected.iter().copied())
            .map(|candidate| format!("did you mean `{candidate}`?"))
    });
    report.error_with_help(span, path, format!("unknown key {rest}"), help);
}

/// Serde's data-model words for what a TOML user wrote or must write.
fn toml_words(text: &str) -> String {
    match text {
        "sequence" | "a sequence" => "an array".into(),
        "map" | "a map" => "a table".into(),
        "i64" => "an integer".into(),
        other => other.replace("floating point", "float"),
    }
}

/// The last entry named `name` whose key starts before `before`: for a duplicate key, the
/// first definition, when the recovered document kept it.
fn find_key_before(
    table: &DeTable<'_>,
    name: &str,
    before: usize,
) -> Option<(KeyPath, Range<usize>)> {
    let mut best = None;
    find_in_table(table, name, before, &mut KeyPath::root(), &mut best);
    best
}

fn find_in_table(
    table: &DeTable<'_>,
    name: &str,
    before: usize,
    path: &mut KeyPath,
    best: &mut Option<(KeyPath, Range<usize>)>,
) {
    for (key, child) in table.iter() {
        path.push(Segment::Key(key.get_ref().as_ref().to_owned()));
        let span = key.span();
        let later = best
            .as_ref()
            .is_none_or(|(_, found)| found.start < span.start);
        if key.get_ref().as_ref() == name && span.start < before && later {
            *best = Some((path.clone(), span));
        }
        match child.get_ref() {
            DeValue::Table(table) => find_in_table(table, name, before, path, best),
            DeValue::Array(array) => {
                for (index, element) in array.iter().enumerate() {
                    if let DeValue::Table(table) = element.get_ref() {
                        path.push(Segment::Index(index));
                        find_in_table(table, name, before, path, best);
                        path.pop();
                    }
                }
            }
            _ => {}
        }
        path.pop();
    }
}

/// Finds the innermost table entry or array element whose key or value contains `span`, and
/// appends its path (relative to `value`). Tables written with a `[header]` have the header as
/// their span, so children are searched before the span of their parent is trusted.
fn locate(value: &DeValue<'_>, span: &Range<usize>, path: &mut KeyPath) -> bool {
    let contains = |outer: &Range<usize>| outer.start <= span.start && span.end <= outer.end;
    match value {
        DeValue::Table(table) => return locate_in_table(table, span, path),
        DeValue::Array(array) => {
            for (index, child) in array.iter().enumerate() {
                path.push(Segment::Index(index));
                if locate(child.get_ref(), span, path) || contains(&child.span()) {
                    return true;
                }
                path.pop();
            }
        }
        _ => {}
    }
    false
}

/// [`locate`] for a table, such as the document root.
fn locate_in_table(table: &DeTable<'_>, span: &Range<usize>, path: &mut KeyPath) -> bool {
    let contains = |outer: &Range<usize>| outer.start <= span.start && span.end <= outer.end;
    for (key, child) in table.iter() {
        path.push(Segment::Key(key.get_ref().as_ref().to_owned()));
        if contains(&key.span()) || locate(child.get_ref(), span, path) || contains(&child.span()) {
            return true;
        }
        path.pop();
    }
    false
}

/// Removes the table entry at `path` (table keys only).
fn remove(value: &mut DeValue<'_>, path: &[Segment]) -> bool {
    let (Some(Segment::Key(first)), DeValue::Table(table)) = (path.first(), value) else {
        return false;
    };
    if path.len() == 1 {
        return table.remove(first.as_str()).is_some();
    }
    match table.get_mut(first.as_str()) {
        Some(child) => remove(child.get_mut(), &path[1..]),
        None => false,
    }
}

fn a_type(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}
