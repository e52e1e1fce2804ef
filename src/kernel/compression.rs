//! The compressions a kernel package uses, recognised by magic and decoded as streams.
//!
//! Three places need them: a `.deb`'s `data.tar.*` member (xz in Debian 12, zstd or gzip
//! elsewhere), a bzImage's payload (whatever `CONFIG_KERNEL_*` chose: LZ4 for Debian 12's
//! cloud kernel) and compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`). The formats are
//! sniffed from their first bytes rather than trusted from names, because a bzImage payload
//! has no name and a `.deb` member name can lie.
//!
//! The kernel's LZ4 is not the LZ4 frame format but its older "legacy" framing: a magic, then
//! blocks of at most 8 MiB of output, each preceded by its compressed length (LE u32). A
//! repeated magic starts a concatenated stream. [`Lz4LegacyReader`] decodes that on top of
//! lz4_flex's block decoder.
//!
//! Known weakness: bzip2 and LZO are recognised but not decoded (no Debian kernel uses them);
//! they fail with [`DecompressError::Unsupported`].

use std::io::{self, BufReader, Read};

/// A compression format, as recognised by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
    /// The kernel's legacy LZ4 framing (`lz4 -l`).
    Lz4Legacy,
    /// The legacy `.lzma` ("LZMA alone") format.
    Lzma,
    Bzip2,
    Lzo,
}

/// Magic of the legacy LZ4 framing (LE u32 0x184C2102).
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Output size of every legacy LZ4 block but the last.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// The worst-case compressed size of one block (LZ4_compressBound of 8 MiB).
const LZ4_LEGACY_BOUND: usize = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;

impl Compression {
    /// The compression `head` (the first bytes of a stream, at least 6 for a sure answer)
    /// starts with; [`Compression::None`] when no known magic matches.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else if head.starts_with(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
            Compression::Lz4Legacy
        } else if head.starts_with(&[0x5d, 0x00, 0x00]) {
            // The properties byte 0x5d (lc=3, lp=0, pb=2) and a dictionary size whose low
            // bytes are zero: what every `lzma` encoder writes, and what the kernel checks.
            Compression::Lzma
        } else if head.starts_with(b"BZh") {
            Compression::Bzip2
        } else if head.starts_with(&[0x89, b'L', b'Z', b'O']) {
            Compression::Lzo
        } else {
            Compression::None
        }
    }

    /// The compression a file name's extension announces (`.ko.xz`, `data.tar.zst`), or
    /// `None` when it has no compression extension.
    pub fn from_extension(file_name: &str) -> Option<Compression> {
        let (_, extension) = file_name.rsplit_once('.')?;
        match extension {
            "gz" => Some(Compression::Gzip),
            "xz" => Some(Compression::Xz),
            "zst" => Some(Compression::Zstd),
            "lz4" => Some(Compression::Lz4Legacy),
            "lzma" => Some(Compression::Lzma),
            "bz2" => Some(Compression::Bzip2),
            "lzo" => Some(Compression::Lzo),
            _ => None,
        }
    }

    /// A short lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lz4Legacy => "lz4 (legacy framing)",
            Compression::Lzma => "lzma",
            Compression::Bzip2 => "bzip2",
            Compression::Lzo => "lzo",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a decoder could not be set up. Errors in the compressed data itself surface later, as
/// `io::Error`s from reading the decoder.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    #[error("{0} compression is recognised but not supported (gzip, xz, zstd, lz4, lzma are)")]
    Unsupported(Compression),
    #[error("cannot start the {compression} decoder")]
    Start {
        compression: Compression,
        #[source]
        source: io::Error,
    },
}

/// `compressed`, decoded as `compression`.
pub fn decoder<'a, R: Read + 'a>(
    compression: Compression,
    compressed: R,
) -> Result<Box<dyn Read + 'a>, DecompressError> {
    let buffered = BufReader::with_capacity(64 * 1024, compressed);
    Ok(match compression {
        Compression::None => Box::new(buffered),
        // Multi-member, like gunzip: concatenated gzip members are one stream.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        // Multi-stream, like unxz (also accepts stream padding).
        Compression::Xz => Box::new(lzma_rust2::XzReader::new(buffered, true)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(
            |source| DecompressError::Start {
                compression,
                source,
            },
        )?),
        Compression::Lz4Legacy => Box::new(Lz4LegacyReader::new(buffered)),
        Compression::Lzma => Box::new(
            lzma_rust2::LzmaReader::new_mem_limit(buffered, u32::MAX, None).map_err(|source| {
                DecompressError::Start {
                    compression,
                    source,
                }
            })?,
        ),
        Compression::Bzip2 | Compression::Lzo => {
            return Err(DecompressError::Unsupported(compression));
        }
    })
}

/// All of `compressed`, decoded; the compression is sniffed from its first bytes.
pub fn decompress_all(compressed: &[u8]) -> Result<(Compression, Vec<u8>), io::Error> {
    let compression = Compression::sniff(compressed);
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(3));
    decoder(compression, compressed)
        .map_err(|error| io::Error::new(io::ErrorKind::Unsupported, error))?
        .read_to_end(&mut out)?;
    Ok((compression, out))
}

/// The kernel's legacy LZ4 framing, decoded block by block.
#[derive(Debug)]
pub struct Lz4LegacyReader<R> {
    inner: R,
    compressed: Vec<u8>,
    block: Vec<u8>,
    position: usize,
    filled: usize,
    finished: bool,
}

impl<R: Read> Lz4LegacyReader<R> {
    pub fn new(inner: R) -> Self {
        Lz4LegacyReader {
            inner,
            compressed: Vec::new(),
            block: Vec::new(),
            position: 0,
            filled: 0,
            finished: false,
        }
    }

    /// Reads a little-endian u32, or `None` at a clean end of input.
    fn read_word(&mut self) -> io::Result<Option<u32>> {
        let mut word = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut word[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "lz4: input ends inside a block length",
                    ));
                }
                Ok(n) => got += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(Some(u32::from_le_bytes(word)))
    }

    /// Decodes the next block into `self.block`; false at the end of the stream.
    fn next_block(&mut self) -> io::Result<bool> {
        loop {
            let Some(length) = self.read_word()? else {
                return Ok(false);
            };
            if length == LZ4_LEGACY_MAGIC {
                continue;
            }
            let length = length as usize;
            if length > LZ4_LEGACY_BOUND {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "lz4: block of {length} bytes is larger than any 8 MiB block compresses to"
                    ),
                ));
            }
            self.compressed.resize(length, 0);
            self.inner
                .read_exact(&mut self.compressed)
                .map_err(|error| {
                    io::Error::new(error.kind(), format!("lz4: truncated block: {error}"))
                })?;
            self.block.resize(LZ4_LEGACY_BLOCK, 0);
            let produced = lz4_flex::block::decompress_into(&self.compressed, &mut self.block)
                .map_err(|error| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("lz4: {error}"))
                })?;
            self.position = 0;
            self.filled = produced;
            if produced > 0 {
                return Ok(true);
            }
        }
    }
}

impl<R: Read> Read for Lz4LegacyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.position == self.filled && (self.finished || !self.next_block()?) {
            self.finished = true;
            return Ok(0);
        }
        let n = buf.len().min(self.filled - self.position);
        buf[..n].copy_from_slice(&self.block[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

/// Legacy-framed LZ4 of `data`, as `lz4 -l` writes it (for tests).
#[cfg(test)]
pub(crate) fn lz4_legacy_compress(data: &[u8]) -> Vec<u8> {
    let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
    for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
        let block = lz4_flex::block::compress(chunk);
        out.extend((block.len() as u32).to_le_bytes());
        out.extend(block);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn sniffs_every_known_magic() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::sniff(b"\xfd7zXZ\x00\x00"), Compression::Xz);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(
            Compression::sniff(&[0x02, 0x21, 0x4c, 0x18]),
            Compression::Lz4Legacy
        );
        assert_eq!(Compression::sniff(&[0x5d, 0, 0, 0x80]), Compression::Lzma);
        assert_eq!(Compression::sniff(b"BZh91AY"), Compression::Bzip2);
        assert_eq!(Compression::sniff(b"\x89LZO\x00"), Compression::Lzo);
        assert_eq!(Compression::sniff(b"\x7fELF"), Compression::None);
        assert_eq!(
            Compression::from_extension("virtio.ko.zst"),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::from_extension("virtio.ko"), None);
    }

    #[test]
    fn gzip_zstd_and_lz4_round_trip() {
        let data = sample();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&data).unwrap();
        let gzip = gzip.finish().unwrap();
        let zstd = zstd::encode_all(&data[..], 3).unwrap();
        let lz4 = lz4_legacy_compress(&data);
        for compressed in [gzip, zstd, lz4] {
            let (_, out) = decompress_all(&compressed).unwrap();
            assert!(out == data);
        }
    }

    #[test]
    fn lz4_spans_blocks_and_concatenated_streams() {
        let data: Vec<u8> = (0..(LZ4_LEGACY_BLOCK + 1000))
            .map(|i| (i % 7) as u8)
            .collect();
        let mut twice = lz4_legacy_compress(&data);
        twice.extend(lz4_legacy_compress(b"tail"));
        let (compression, out) = decompress_all(&twice).unwrap();
        assert_eq!(compression, Compression::Lz4Legacy);
        assert_eq!(out.len(), data.len() + 4);
        assert!(out[..data.len()] == data[..]);
        assert_eq!(&out[data.len()..], b"tail");
    }

    #[test]
    fn truncated_lz4_is_an_error() {
        let mut compressed = lz4_legacy_compress(&sample());
        compressed.truncate(compressed.len() - 10);
        let error = decompress_all(&compressed).unwrap_err();
        assert!(error.to_string().contains("truncated block"), "{error}");
    }

    #[test]
    fn bzip2_is_refused_by_name() {
        let Err(error) = decoder(Compression::Bzip2, &b"BZh9"[..]) else {
            panic!("bzip2 decoded");
        };
        assert!(
            error
                .to_string()
                .starts_with("bzip2 compression is recognised but not supported")
        );
    }
}
