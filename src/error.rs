//! What every error of banger is, for whoever must act on it: one [`ErrorClass`] per error,
//! given by each module's error enum through [`Classify`], so the CLI (exit codes) and the
//! daemon (the protocol's error kinds) treat the same mistake the same way; and
//! [`error_chain`], how an error and its sources read as one line; [`printable`], how text from
//! a guest is made safe to show.
//!
//! A foundation module: it imports nothing of banger's.

/// Who can fix an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The input: an argument, a Bangerfile, a name that does not exist or is taken, a lock
    /// that would change under `--locked`. Exit 1.
    User,
    /// The work was understood and failed: a build step, a guest that never came up. Exit 1.
    Failed,
    /// banger could not work here: a missing program, no permission, an unreadable store,
    /// an internal error. Exit 2.
    Environment,
    /// Stopped by the user (Ctrl-C, SIGTERM). Exit 130.
    Interrupted,
}

/// An error that knows its [`ErrorClass`].
pub trait Classify {
    fn class(&self) -> ErrorClass;
}

/// Renders an error and its sources as `outer: inner: innermost`, leaving out a source whose
/// text the outer message already contains.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// `text` from somewhere untrusted (a guest's console, its agent's error messages, a build
/// command's output) made safe for the host's terminal: control characters other than tab and
/// newline, C1 controls and DEL are shown escaped (`\u{1b}`), so an escape sequence cannot
/// move the cursor, retitle the window, or hide what precedes it.
pub fn printable(text: &str) -> String {
    if !text.chars().any(is_unsafe_control) {
        return text.to_owned();
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe_control(c) {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    shown
}

fn is_unsafe_control(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_from_a_guest_are_shown_not_obeyed() {
        assert_eq!(
            printable("plain text\twith a tab\n"),
            "plain text\twith a tab\n"
        );
        assert_eq!(
            printable("\u{1b}]0;owned\u{7}\u{1b}[2Jred\u{9b}31m\r"),
            "\\u{1b}]0;owned\\u{7}\\u{1b}[2Jred\\u{9b}31m\\u{d}"
        );
        assert_eq!(printable("ünïcode ✓"), "ünïcode ✓");
    }
}
