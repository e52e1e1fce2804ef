//! Layer media types and the decompressor each one needs.
//!
//! Decompression belongs to whoever unpacks layers; it lives here because every consumer needs
//! the same mapping from media type to decoder, and the media type comes from the manifest.

use std::io::{BufReader, Read};

use super::OciError;

/// Layer media types banger unpacks.
pub mod media_types {
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression a layer media type names; `None` for media types that are not tar layers
/// banger can unpack (foreign/non-distributable layers, artifacts).
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    use media_types::*;
    match media_type {
        OCI_LAYER_TAR | DOCKER_LAYER_TAR => Some(Compression::None),
        OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Some(Compression::Gzip),
        OCI_LAYER_ZSTD | DOCKER_LAYER_ZSTD => Some(Compression::Zstd),
        _ => None,
    }
}

/// The compression of a blob judged by its first bytes (for tars that come with no media
/// type, like a recipe's output or `banger image import-tar`).
pub fn sniff_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// `blob`, decompressed.
pub fn decompressed<R: Read + Send + 'static>(
    compression: Compression,
    blob: R,
) -> std::io::Result<Box<dyn Read + Send>> {
    Ok(match compression {
        Compression::None => Box::new(BufReader::with_capacity(64 * 1024, blob)),
        // Multi-member: parallel compressors (pigz) write several gzip members.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(blob))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(blob)?),
    })
}

/// [`decompressed`], with the decompression on a thread of its own a few MiB ahead of the
/// reader: the caller (the ext4 writer) and the inflater then use two cores instead of
/// taking turns on one. A plain blob is returned as [`decompressed`] returns it (there is
/// nothing to overlap but reads the page cache serves). Dropping the reader stops the thread
/// at its next chunk.
pub fn decompressed_ahead<R: Read + Send + 'static>(
    compression: Compression,
    blob: R,
) -> std::io::Result<Box<dyn Read + Send>> {
    let reader = decompressed(compression, blob)?;
    if compression == Compression::None {
        return Ok(reader);
    }
    Ok(Box::new(ReadAhead::spawn(reader)))
}

/// Chunks the read-ahead thread produces, and how many may wait: 8 MiB in flight at most.
const AHEAD_CHUNK: usize = 1 << 20;
const AHEAD_DEPTH: usize = 8;

/// A reader fed by a thread that reads its source ahead.
struct ReadAhead {
    chunks: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    position: usize,
    done: bool,
}

impl ReadAhead {
    fn spawn(mut source: Box<dyn Read + Send>) -> ReadAhead {
        let (sender, chunks) = std::sync::mpsc::sync_channel(AHEAD_DEPTH);
        std::thread::spawn(move || {
            loop {
                let mut chunk = vec![0u8; AHEAD_CHUNK];
                let mut filled = 0;
                // Fill the chunk: decoders return a few KiB a call.
                let outcome = loop {
                    match source.read(&mut chunk[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(read) => {
                            filled += read;
                            if filled == chunk.len() {
                                break Ok(());
                            }
                        }
                        Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(error) => break Err(error),
                    }
                };
                chunk.truncate(filled);
                let last = filled == 0 || outcome.is_err();
                let message = match outcome {
                    Ok(()) if filled == 0 => Ok(Vec::new()),
                    Ok(()) => Ok(chunk),
                    Err(error) => Err(error),
                };
                // The reader is gone: stop.
                if sender.send(message).is_err() || last {
                    return;
                }
            }
        });
        ReadAhead {
            chunks,
            current: Vec::new(),
            position: 0,
            done: false,
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.position == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.chunks.recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => self.done = true,
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.position = 0;
                }
                Ok(Err(error)) => {
                    self.done = true;
                    return Err(error);
                }
                Err(_) => {
                    self.done = true;
                    return Err(std::io::Error::other(
                        "the decompression thread stopped early",
                    ));
                }
            }
        }
        let read = buf.len().min(self.current.len() - self.position);
        buf[..read].copy_from_slice(&self.current[self.position..self.position + read]);
        self.position += read;
        Ok(read)
    }
}

/// The uncompressed tar stream of a layer blob.
pub fn layer_reader<R: Read + Send + 'static>(
    media_type: &str,
    blob: R,
) -> Result<Box<dyn Read + Send>, OciError> {
    let compression =
        layer_compression(media_type).ok_or_else(|| OciError::UnknownLayerMediaType {
            media_type: media_type.to_owned(),
        })?;
    decompressed(compression, blob).map_err(|source| OciError::LayerDecoder {
        media_type: media_type.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn compression_is_sniffed_from_magic_bytes() {
        assert_eq!(
            super::sniff_compression(&[0x1f, 0x8b, 8, 0]),
            super::Compression::Gzip
        );
        assert_eq!(
            super::sniff_compression(&[0x28, 0xb5, 0x2f, 0xfd]),
            super::Compression::Zstd
        );
        assert_eq!(super::sniff_compression(b"usr/"), super::Compression::None);
    }

    use std::io::Write;

    use super::*;

    #[test]
    fn every_layer_media_type_decodes() {
        let payload = b"pretend this is a tar stream".repeat(100);
        let gzip = {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(&payload).unwrap();
            encoder.finish().unwrap()
        };
        let zstd = zstd::encode_all(&payload[..], 3).unwrap();
        for (media_type, blob) in [
            (media_types::OCI_LAYER_TAR, payload.clone()),
            (media_types::DOCKER_LAYER_TAR, payload.clone()),
            (media_types::OCI_LAYER_GZIP, gzip.clone()),
            (media_types::DOCKER_LAYER_GZIP, gzip.clone()),
            (media_types::OCI_LAYER_ZSTD, zstd.clone()),
            (media_types::DOCKER_LAYER_ZSTD, zstd.clone()),
        ] {
            let mut decoded = Vec::new();
            layer_reader(media_type, std::io::Cursor::new(blob))
                .unwrap()
                .read_to_end(&mut decoded)
                .unwrap();
            assert_eq!(decoded, payload, "{media_type}");
        }
    }

    #[test]
    fn reading_ahead_gives_the_same_bytes_and_passes_errors_on() {
        // More than one chunk, not a multiple of it.
        let payload: Vec<u8> = (0..(3 * super::AHEAD_CHUNK + 12345))
            .map(|index| (index % 251) as u8)
            .collect();
        let gzip = {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(&payload).unwrap();
            encoder.finish().unwrap()
        };
        let mut decoded = Vec::new();
        decompressed_ahead(Compression::Gzip, std::io::Cursor::new(gzip.clone()))
            .unwrap()
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, payload);
        // A truncated stream is an error, not a short read.
        let truncated = gzip[..gzip.len() / 2].to_vec();
        let mut partial = Vec::new();
        let error = decompressed_ahead(Compression::Gzip, std::io::Cursor::new(truncated))
            .unwrap()
            .read_to_end(&mut partial)
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
        // Dropped early, the reader lets its thread end (nothing to assert but no hang).
        let mut reader = decompressed_ahead(Compression::Gzip, std::io::Cursor::new(gzip)).unwrap();
        let mut first = [0u8; 10];
        reader.read_exact(&mut first).unwrap();
        drop(reader);
    }

    #[test]
    fn unknown_media_types_are_refused() {
        let error = layer_reader("application/x-foreign", std::io::empty())
            .err()
            .unwrap();
        assert!(error.to_string().contains("application/x-foreign"));
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
            None
        );
    }
}
