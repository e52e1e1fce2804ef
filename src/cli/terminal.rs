//! This process's terminal, for guest commands on a pseudo-terminal (`vm exec -t`): its
//! window size, and raw mode that is always undone.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::sys::termios::{self, SetArg, Termios};

use banger::guest::WindowSize;

/// The window size of the terminal `fd` is, if it is one (and says so: a size of 0×0 is no
/// answer).
pub fn window_size(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: TIOCGWINSZ writes one `struct winsize` through the pointer, which points at a
    // live, properly aligned one; the descriptor is borrowed, so it stays open for the call.
    let answer = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (answer == 0 && size.ws_row > 0 && size.ws_col > 0).then_some(WindowSize {
        rows: size.ws_row,
        cols: size.ws_col,
    })
}

/// The size of whichever of stdout and stdin is a terminal, stdout first (it is where the
/// guest's output is drawn).
pub fn own_window_size() -> Option<WindowSize> {
    window_size(std::io::stdout().as_fd()).or_else(|| window_size(std::io::stdin().as_fd()))
}

/// Stdin's terminal in raw mode (no echo, no line editing, Ctrl-C a byte for the guest) until
/// dropped: the settings it had are put back on every way out, a panic included.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Raw mode on stdin, which must be a terminal.
    pub fn enable() -> nix::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_has_no_window_size() {
        let (reader, _writer) = std::io::pipe().unwrap();
        assert_eq!(window_size(reader.as_fd()), None);
    }

    #[test]
    fn a_pseudo_terminal_reports_the_size_it_was_given() {
        let size = nix::pty::Winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).unwrap();
        assert_eq!(
            window_size(pty.slave.as_fd()),
            Some(WindowSize {
                rows: 33,
                cols: 101
            })
        );
    }
}
