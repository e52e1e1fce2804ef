//! Caps on what banger reads from peers it does not control (a client of the daemon, QEMU's
//! monitor, a guest's console), so that no input makes it allocate without bound. Each cap
//! is named in the error that enforces it.
//!
//! A foundation module: it imports nothing of banger's.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// The longest daemon request line (a request is a few hundred bytes of JSON).
pub const DAEMON_REQUEST_LINE: usize = 1 << 20;

/// The longest QMP line (QEMU's replies to banger's commands are small).
pub const QMP_LINE: usize = 1 << 20;

/// How much of the end of a console log is read to show its last lines.
pub const CONSOLE_TAIL_BYTES: u64 = 64 << 10;

/// Reads one line (with its `\n`, if any) into `line`, replacing what it held. Returns the
/// bytes read, 0 at the end of input. A line longer than `max` bytes is an `InvalidData`
/// error naming the cap, and nothing of it is kept.
pub async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    line.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(line.len());
        }
        let (take, complete) = match available.iter().position(|&byte| byte == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (available.len(), false),
        };
        if line.len() + take > max {
            line.clear();
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a line longer than the {max}-byte limit"),
            ));
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if complete {
            return Ok(line.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_read_whole_and_an_endless_one_is_refused() {
        let input = b"first\nsecond without end".to_vec();
        let mut reader = tokio::io::BufReader::with_capacity(4, &input[..]);
        let mut line = Vec::new();
        assert_eq!(
            read_line_capped(&mut reader, 16, &mut line).await.unwrap(),
            6
        );
        assert_eq!(line, b"first\n");
        let error = read_line_capped(&mut reader, 16, &mut line)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("16-byte limit"), "{error}");
        assert!(line.is_empty());
        let mut reader = tokio::io::BufReader::new(&b"last"[..]);
        assert_eq!(
            read_line_capped(&mut reader, 16, &mut line).await.unwrap(),
            4
        );
        assert_eq!(
            read_line_capped(&mut reader, 16, &mut line).await.unwrap(),
            0
        );
    }
}
