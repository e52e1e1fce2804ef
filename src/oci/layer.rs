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
