//! Diagnostics: one problem in a Bangerfile, located by TOML key path and line:column, rendered
//! the way rustc and cargo render theirs.
//!
//! A [`Diagnostic`] is self-contained (it copies the offending source line), so it can be
//! rendered, compared in tests or sent over the daemon protocol without the Bangerfile text.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One step of a TOML key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

/// A TOML key path such as `image.provision[1].run` or `images.base.from`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(Vec<Segment>);

impl KeyPath {
    pub(crate) fn root() -> KeyPath {
        KeyPath(Vec::new())
    }

    pub(crate) fn key(&self, key: &str) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    pub(crate) fn index(&self, index: usize) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }

    pub(crate) fn join(&self, relative: &KeyPath) -> KeyPath {
        let mut path = self.clone();
        path.0.extend(relative.0.iter().cloned());
        path
    }

    pub(crate) fn push(&mut self, segment: Segment) {
        self.0.push(segment);
    }

    pub(crate) fn pop(&mut self) {
        self.0.pop();
    }

    pub(crate) fn segments(&self) -> &[Segment] {
        &self.0
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn starts_with(&self, prefix: &KeyPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// The table keys up to (not including) the first array index: the entry that can be
    /// removed from a table without renumbering any array.
    pub(crate) fn up_to_first_index(&self) -> KeyPath {
        KeyPath(
            self.0
                .iter()
                .take_while(|segment| matches!(segment, Segment::Key(_)))
                .cloned()
                .collect(),
        )
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if position > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The source line a diagnostic points at, with the part to underline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snippet {
    /// The whole line, without its line break.
    pub line_text: String,
    /// 0-based column (in characters) where the underline starts.
    pub start: usize,
    /// Underlined width in characters, at least 1; a span running past the line ends at it.
    pub len: usize,
}

/// One problem found in a Bangerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The Bangerfile, as the caller named it.
    pub file: PathBuf,
    /// TOML key path of the offending key or value (`vm.vcpus`, `image.provision[1].run`);
    /// empty for a syntax error outside any key.
    pub key_path: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    pub message: String,
    /// A hint on how to fix it (`did you mean ...`), rendered as `= help:`.
    pub help: Option<String>,
    pub snippet: Snippet,
}

impl Diagnostic {
    /// Locates `span` (byte offsets into `text`) and builds a diagnostic there.
    pub(crate) fn at(
        file: &Path,
        text: &str,
        span: Range<usize>,
        key_path: &KeyPath,
        message: String,
    ) -> Diagnostic {
        let start = floor_char_boundary(text, span.start.min(text.len()));
        let end = floor_char_boundary(text, span.end.clamp(start, text.len()));
        let line_start = text[..start].rfind('\n').map_or(0, |newline| newline + 1);
        let line_end = text[start..]
            .find('\n')
            .map_or(text.len(), |offset| start + offset);
        let line_text = text[line_start..line_end].trim_end_matches('\r');
        let column = text[line_start..start].chars().count();
        let underlined = text[start..end.min(line_end)].chars().count();
        Diagnostic {
            file: file.to_owned(),
            key_path: key_path.to_string(),
            line: text[..line_start].matches('\n').count() + 1,
            column: column + 1,
            message,
            help: None,
            snippet: Snippet {
                line_text: line_text.to_owned(),
                start: column,
                len: underlined.max(1),
            },
        }
    }

    pub(crate) fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

/// Tabs are drawn as this many spaces so the underline lines up with the code above it.
const TAB_WIDTH: usize = 4;

impl fmt::Display for Diagnostic {
    /// ```text
    /// error: unknown key `vcpus`, expected one of `vcpu`, `memory`, `disk`, `network`
    ///   --> Bangerfile:12:1 (vm.vcpus)
    ///    |
    /// 12 | vcpus = 4
    ///    | ^^^^^
    ///    = help: did you mean `vcpu`?
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let number = self.line.to_string();
        let pad = " ".repeat(number.len());
        writeln!(f, "error: {}", self.message)?;
        write!(
            f,
            "{pad}--> {}:{}:{}",
            self.file.display(),
            self.line,
            self.column
        )?;
        if !self.key_path.is_empty() {
            write!(f, " ({})", self.key_path)?;
        }
        writeln!(f)?;
        writeln!(f, "{pad} |")?;

        let snippet = &self.snippet;
        let width = |c: char| if c == '\t' { TAB_WIDTH } else { 1 };
        let shown: String = snippet
            .line_text
            .chars()
            .map(|c| {
                if c == '\t' {
                    " ".repeat(TAB_WIDTH)
                } else {
                    c.to_string()
                }
            })
            .collect();
        let lead: usize = snippet
            .line_text
            .chars()
            .take(snippet.start)
            .map(width)
            .sum();
        let carets: usize = snippet
            .line_text
            .chars()
            .skip(snippet.start)
            .take(snippet.len)
            .map(width)
            .sum();
        let shown = shown.trim_end();
        if shown.is_empty() {
            writeln!(f, "{number} |")?;
        } else {
            writeln!(f, "{number} | {shown}")?;
        }
        write!(
            f,
            "{pad} | {}{}",
            " ".repeat(lead),
            "^".repeat(carets.max(1))
        )?;
        if let Some(help) = &self.help {
            write!(f, "\n{pad} = help: {help}")?;
        }
        Ok(())
    }
}

/// Collects diagnostics while the Bangerfile is read and validated.
#[derive(Debug)]
pub(crate) struct Report<'a> {
    file: &'a Path,
    text: &'a str,
    diagnostics: Vec<Diagnostic>,
}

impl<'a> Report<'a> {
    pub(crate) fn new(file: &'a Path, text: &'a str) -> Report<'a> {
        Report {
            file,
            text,
            diagnostics: Vec::new(),
        }
    }

    /// The Bangerfile text, for checks that depend on how a value was written.
    pub(crate) fn text(&self) -> &'a str {
        self.text
    }

    pub(crate) fn error(&mut self, span: Range<usize>, path: &KeyPath, message: impl Into<String>) {
        self.error_with_help(span, path, message, None::<String>);
    }

    pub(crate) fn error_with_help(
        &mut self,
        span: Range<usize>,
        path: &KeyPath,
        message: impl Into<String>,
        help: Option<impl Into<String>>,
    ) {
        let mut diagnostic = Diagnostic::at(self.file, self.text, span, path, message.into());
        if let Some(help) = help {
            diagnostic = diagnostic.with_help(help);
        }
        self.diagnostics.push(diagnostic);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.diagnostics.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.diagnostics.len()
    }

    /// In file order, so the report reads top to bottom whatever order the checks ran in.
    pub(crate) fn into_diagnostics(self) -> Vec<Diagnostic> {
        let mut diagnostics = self.diagnostics;
        diagnostics.sort_by_key(|diagnostic| (diagnostic.line, diagnostic.column));
        diagnostics
    }
}

/// Every diagnostic, a blank line between them, then cargo's summary line.
pub(crate) fn render_report(file: &Path, diagnostics: &[Diagnostic]) -> String {
    let mut report = String::new();
    for diagnostic in diagnostics {
        report.push_str(&diagnostic.to_string());
        report.push_str("\n\n");
    }
    let count = diagnostics.len();
    let plural = if count == 1 { "" } else { "s" };
    report.push_str(&format!(
        "error: could not read {}: {count} error{plural}",
        file.display()
    ));
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_quote_keys_that_are_not_bare() {
        let path = KeyPath::root()
            .key("image")
            .key("provision")
            .index(1)
            .key("env")
            .key("MY VAR");
        assert_eq!(path.to_string(), r#"image.provision[1].env."MY VAR""#);
    }

    #[test]
    fn locations_are_one_based_and_count_characters() {
        let text = "a = 1\nnamé = \"x\"\n";
        let span = text.find("\"x\"").unwrap()..text.find("\"x\"").unwrap() + 3;
        let diagnostic = Diagnostic::at(
            Path::new("Bangerfile"),
            text,
            span,
            &KeyPath::root().key("namé"),
            "bad".into(),
        );
        assert_eq!((diagnostic.line, diagnostic.column), (2, 8));
        assert_eq!(diagnostic.snippet.len, 3);
    }

    #[test]
    fn tabs_keep_the_underline_aligned() {
        let text = "\tvcpus = 4\n";
        let diagnostic = Diagnostic::at(
            Path::new("Bangerfile"),
            text,
            1..6,
            &KeyPath::root().key("vm").key("vcpus"),
            "unknown key `vcpus`".into(),
        );
        insta::assert_snapshot!(diagnostic, @r"
        error: unknown key `vcpus`
         --> Bangerfile:1:2 (vm.vcpus)
          |
        1 |     vcpus = 4
          |     ^^^^^
        ");
    }
}
