//! A deterministic cpio `newc` writer, the archive format the kernel unpacks as an initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields: inode,
//! mode, uid, gid, nlink, mtime, size, dev major/minor, rdev major/minor, name size with its
//! NUL, check), the NUL-terminated name padded to a multiple of 4, then the data padded to a
//! multiple of 4. The archive ends with an entry named `TRAILER!!!`.
//!
//! Determinism: inode numbers count up from 1 in call order, mtimes are 0, owners are root,
//! so the same calls give the same bytes. File contents are streamed, so the size must be
//! known up front and a reader that yields a different amount is an error. Names are
//! relative (`dev/console`, no leading `/`) and must not contain `..`; the caller adds parent
//! directories before their contents, since the kernel does not create them.

use std::io::{self, Read, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const TRAILER: &str = "TRAILER!!!";

/// Errors from writing a cpio archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cpio entry name {name:?} is refused: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cpio entry {name:?} is {size} bytes; newc entries hold at most 4 GiB - 1")]
    TooLarge { name: String, size: u64 },
    #[error("cpio entry {name:?} was declared as {declared} bytes but its reader {actual}")]
    SizeMismatch {
        name: String,
        declared: u64,
        actual: String,
    },
    #[error("cannot read the contents of cpio entry {name:?}")]
    ReadContents {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write cpio entry {name:?}")]
    Write {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Writes a newc archive to `W`.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
    /// Bytes written so far (for padding).
    offset: u64,
}

/// The fields of one header that vary.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u64,
    rdev: (u32, u32),
}

fn check_name(name: &str) -> Result<(), CpioError> {
    let refuse = |reason| CpioError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(refuse("it is empty"));
    }
    if name.starts_with('/') {
        return Err(refuse("it is absolute (initramfs names are relative)"));
    }
    if name.contains('\0') {
        return Err(refuse("it contains a NUL byte"));
    }
    if name == TRAILER {
        return Err(refuse("it is the end-of-archive marker"));
    }
    for part in name.split('/') {
        match part {
            "" => return Err(refuse("it has an empty component")),
            "." | ".." => return Err(refuse("it has a `.` or `..` component")),
            _ => {}
        }
    }
    Ok(())
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter {
            out,
            next_inode: 1,
            offset: 0,
        }
    }

    fn write_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), CpioError> {
        self.out
            .write_all(bytes)
            .map_err(|source| CpioError::Write {
                name: name.to_owned(),
                source,
            })?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self, name: &str) -> Result<(), CpioError> {
        let padding = (4 - (self.offset % 4) as usize) % 4;
        self.write_bytes(name, &[0u8; 3][..padding])
    }

    fn header(&mut self, header: Header) -> Result<(), CpioError> {
        let size = u32::try_from(header.size).map_err(|_| CpioError::TooLarge {
            name: header.name.to_owned(),
            size: header.size,
        })?;
        let inode = if header.name == TRAILER {
            0
        } else {
            self.next_inode += 1;
            self.next_inode - 1
        };
        let text = format!(
            "070701{inode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            header.mode,
            0,
            0,
            header.nlink,
            0,
            0,
            0,
            header.rdev.0,
            header.rdev.1,
            header.name.len() + 1,
            0,
        );
        self.write_bytes(header.name, text.as_bytes())?;
        self.write_bytes(header.name, header.name.as_bytes())?;
        self.write_bytes(header.name, &[0])?;
        self.pad(header.name)
    }

    /// A directory (`mode` is the permission bits).
    pub fn directory(&mut self, name: &str, mode: u32) -> Result<(), CpioError> {
        check_name(name)?;
        self.header(Header {
            name,
            mode: S_IFDIR | (mode & 0o7777),
            nlink: 2,
            size: 0,
            rdev: (0, 0),
        })
    }

    /// A regular file of `size` bytes read from `contents`.
    pub fn file(
        &mut self,
        name: &str,
        mode: u32,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), CpioError> {
        check_name(name)?;
        self.header(Header {
            name,
            mode: S_IFREG | (mode & 0o7777),
            nlink: 1,
            size,
            rdev: (0, 0),
        })?;
        let mut limited = contents.take(size);
        let copied = io::copy(&mut limited, &mut self.out).map_err(|source| {
            // `io::copy` does not say which side failed; a write error is the likelier
            // catastrophe, but a read error is what a changing input file produces.
            CpioError::ReadContents {
                name: name.to_owned(),
                source,
            }
        })?;
        self.offset += copied;
        if copied < size {
            return Err(CpioError::SizeMismatch {
                name: name.to_owned(),
                declared: size,
                actual: format!("ended after {copied}"),
            });
        }
        let mut one = [0u8; 1];
        let more =
            limited
                .into_inner()
                .read(&mut one)
                .map_err(|source| CpioError::ReadContents {
                    name: name.to_owned(),
                    source,
                })?;
        if more != 0 {
            return Err(CpioError::SizeMismatch {
                name: name.to_owned(),
                declared: size,
                actual: "has more".into(),
            });
        }
        self.pad(name)
    }

    /// A regular file holding `bytes`.
    pub fn file_bytes(&mut self, name: &str, mode: u32, bytes: &[u8]) -> Result<(), CpioError> {
        self.file(name, mode, bytes.len() as u64, &mut &bytes[..])
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        check_name(name)?;
        self.header(Header {
            name,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            size: target.len() as u64,
            rdev: (0, 0),
        })?;
        self.write_bytes(name, target.as_bytes())?;
        self.pad(name)
    }

    /// A character device node.
    pub fn char_device(
        &mut self,
        name: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        check_name(name)?;
        self.header(Header {
            name,
            mode: S_IFCHR | (mode & 0o7777),
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        })
    }

    /// A block device node.
    pub fn block_device(
        &mut self,
        name: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        check_name(name)?;
        self.header(Header {
            name,
            mode: S_IFBLK | (mode & 0o7777),
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        })
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(Header {
            name: TRAILER,
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
        })?;
        self.out.flush().map_err(|source| CpioError::Write {
            name: TRAILER.to_owned(),
            source,
        })?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_archive_is_byte_exact() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.directory("dev", 0o755).unwrap();
        cpio.char_device("dev/console", 0o600, 5, 1).unwrap();
        cpio.file_bytes("init", 0o755, b"hi\n").unwrap();
        cpio.symlink("sbin", "init").unwrap();
        let bytes = cpio.finish().unwrap();
        let expected = [
            // ino, mode, uid, gid, nlink, mtime, size, devmaj, devmin, rdevmaj, rdevmin,
            // namesize, check; then the name, NUL, padding to 4; data, padding to 4.
            "07070100000001000041ed0000000000000000000000020000000000000000000000000000000000000000000000000000000400000000dev\0\0\0",
            "07070100000002000021800000000000000000000000010000000000000000000000000000000000000005000000010000000c00000000dev/console\0\0\0",
            "07070100000003000081ed0000000000000000000000010000000000000003000000000000000000000000000000000000000500000000init\0\0hi\n\0",
            "070701000000040000a1ff0000000000000000000000010000000000000004000000000000000000000000000000000000000500000000sbin\0\0init",
            "07070100000000000000000000000000000000000000010000000000000000000000000000000000000000000000000000000b00000000TRAILER!!!\0\0\0\0",
        ]
        .concat();
        assert_eq!(String::from_utf8(bytes).unwrap(), expected);
    }

    #[test]
    fn names_are_checked() {
        let mut cpio = CpioWriter::new(Vec::new());
        for (name, reason) in [
            ("/init", "absolute"),
            ("a/../b", "`..`"),
            ("a//b", "empty component"),
            ("", "empty"),
            ("TRAILER!!!", "end-of-archive"),
        ] {
            let error = cpio.directory(name, 0o755).unwrap_err().to_string();
            assert!(error.contains(reason), "{name}: {error}");
        }
    }

    #[test]
    fn a_reader_yielding_another_size_is_an_error() {
        let mut cpio = CpioWriter::new(Vec::new());
        let error = cpio.file("f", 0o644, 5, &mut &b"abc"[..]).unwrap_err();
        assert!(error.to_string().contains("ended after 3"), "{error}");
        let mut cpio = CpioWriter::new(Vec::new());
        let error = cpio.file("f", 0o644, 2, &mut &b"abc"[..]).unwrap_err();
        assert!(error.to_string().contains("has more"), "{error}");
    }
}
