//! OCI registry client: image references → pinned linux/amd64 manifests → verified blobs on
//! disk. Built on oci-client (HTTP, the `WWW-Authenticate` bearer/basic dance, manifest and
//! blob requests); this module adds what banger needs around it: Docker-style reference
//! normalization, platform selection with a useful error, credentials from the Docker config,
//! plain HTTP for loopback registries, retries with backoff, streaming digest and size
//! verification, and errors that name the reference, the digest and what to do.
//!
//! Lifecycle of one image:
//! 1. [`ImageReference::parse`] normalizes what the user wrote (`alpine:3.20` →
//!    `docker.io/library/alpine:3.20`); a bad reference is an error naming the input.
//! 2. [`RegistryClient::resolve`] reads credentials for the registry (`auth`), fetches the
//!    manifest by tag or digest, follows an image index / Docker manifest list to the
//!    linux/amd64 entry, checks every layer's media type, and returns a [`ResolvedImage`]
//!    whose reference carries the manifest digest. A manifest reached without an index has its
//!    config's platform checked instead.
//! 3. The caller pins it ([`ResolvedImage::pin`] → [`crate::lock::PinnedReference`]); later runs
//!    use [`ResolvedImage::from_pinned`] (no network) or [`RegistryClient::resolve_pinned`]
//!    (by digest, never by tag), so a moved tag changes nothing until the user updates.
//! 4. [`RegistryClient::fetch_layer`] streams each layer into a temp file beside the
//!    destination, hashing as it goes; only a blob of the right size and sha256 is renamed into
//!    place. [`RegistryClient::fetch_config`] does the same into memory.
//! 5. [`layer_reader`] opens a fetched layer with the decompressor its media type names.
//!
//! Every request is retried on 429, 5xx, timeouts and dropped connections (`retry`), with
//! exponential backoff and jitter, a bounded number of attempts and a total deadline; 401/403,
//! 404 and verification failures are not retried. Errors are returned, never remembered: the
//! engine records only successes, so a failure is tried afresh next time.
//!
//! Everything is async and cancellable by dropping the future: a partial blob is a
//! `tempfile` that removes itself when dropped.
//!
//! Known weaknesses:
//! - A transfer that fails midway restarts from byte 0 (no `Range` resume).
//! - `Retry-After` is not honoured (oci-client does not expose the headers of failures).
//! - oci-client swallows token-endpoint failures and goes on anonymously, so a broken token
//!   service shows up as "not authorized" rather than as its own error.
//! - `identitytoken` entries, and identity tokens from credential helpers, are not used (they
//!   need an OAuth2 refresh exchange oci-client does not do).
//! - `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` apply to registry requests (through oci-client's
//!   settings); plain downloads (`fetch.rs`: catalog bundles, kernels) do not use them yet.
//! - Fetched blobs are renamed into place without fsync; the store decides durability.

mod auth;
mod client;
mod layer;
mod reference;
mod retry;

use std::path::PathBuf;

pub use auth::{CredentialSource, docker_config_path};
pub use client::{
    MAX_MANIFEST_SIZE, Proxies, RegistryClient, RegistryOptions, install_tls_provider,
};
pub use layer::{
    Compression, decompressed, decompressed_ahead, layer_compression, layer_reader, media_types,
    sniff_compression,
};
pub use reference::{DEFAULT_REGISTRY, ImageReference, is_loopback_registry};
/// For other HTTP clients of banger (`fetch`) to retry the same way.
pub(crate) use retry::Retrier;
pub use retry::RetryPolicy;

use crate::lock::{PinnedLayer, PinnedReference};

/// `sha256:<hex>`, a registry digest, of a cacache integrity (`sha256-<base64>`, how the
/// store names content); `None` for another algorithm or a malformed integrity.
pub fn registry_digest(integrity: &str) -> Option<String> {
    let parsed: ssri::Integrity = integrity.parse().ok()?;
    match parsed.to_hex() {
        (ssri::Algorithm::Sha256, hex) => Some(format!("sha256:{hex}")),
        _ => None,
    }
}

/// The registry digest (`sha256:<hex>`) of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(bytes);
    let hex: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256:{hex}")
}

/// One layer of a resolved image, as its manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// `sha256:<hex>` of the blob as stored (compressed) in the registry.
    pub digest: String,
    pub media_type: String,
    /// Size in bytes of the blob as stored.
    pub size: u64,
}

impl Layer {
    /// The decompressor this layer needs; `None` for a media type banger does not know
    /// (never the case for layers of a [`ResolvedImage`], which are checked).
    pub fn compression(&self) -> Option<Compression> {
        layer_compression(&self.media_type)
    }
}

/// A reference resolved to its linux/amd64 image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The reference, pinned to `manifest_digest` (its tag kept for display).
    pub reference: ImageReference,
    /// Digest of the linux/amd64 image manifest (not of the index that led to it).
    pub manifest_digest: String,
    pub config_digest: String,
    pub config_size: u64,
    /// In application order, base layer first.
    pub layers: Vec<Layer>,
}

impl ResolvedImage {
    /// The lock entry for this image; `written` is the reference as the Bangerfile spells it,
    /// which is what [`crate::lock::Lock::pinned`] looks up.
    pub fn pin(&self, written: &str) -> PinnedReference {
        PinnedReference {
            reference: written.to_owned(),
            manifest_digest: self.manifest_digest.clone(),
            config_digest: Some(self.config_digest.clone()),
            config_size: Some(self.config_size),
            layers: self
                .layers
                .iter()
                .map(|layer| PinnedLayer {
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                    size: layer.size,
                })
                .collect(),
        }
    }

    /// The image a lock entry pins, without asking the registry. The digests are checked for
    /// form, the layer media types for support.
    pub fn from_pinned(pin: &PinnedReference) -> Result<ResolvedImage, OciError> {
        let reference = ImageReference::parse(&pin.reference)?.with_digest(&pin.manifest_digest)?;
        let incomplete = |what: &str| OciError::PinIncomplete {
            reference: pin.reference.clone(),
            missing: what.to_owned(),
        };
        let config_digest = pin
            .config_digest
            .clone()
            .ok_or_else(|| incomplete("config_digest"))?;
        let config_size = pin.config_size.ok_or_else(|| incomplete("config_size"))?;
        reference::validate_digest(&config_digest).map_err(|reason| OciError::InvalidPin {
            reference: pin.reference.clone(),
            reason,
        })?;
        let layers = pin
            .layers
            .iter()
            .map(|layer| Layer {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
                size: layer.size,
            })
            .collect::<Vec<_>>();
        check_layers(&reference, &layers)?;
        Ok(ResolvedImage {
            reference,
            manifest_digest: pin.manifest_digest.clone(),
            config_digest,
            config_size,
            layers,
        })
    }
}

/// Every layer must have a sha256 digest and a media type banger can decompress.
fn check_layers(reference: &ImageReference, layers: &[Layer]) -> Result<(), OciError> {
    for layer in layers {
        reference::validate_digest(&layer.digest).map_err(|reason| OciError::InvalidManifest {
            reference: reference.to_string(),
            reason,
        })?;
        if layer.compression().is_none() {
            return Err(OciError::UnsupportedLayer {
                reference: reference.to_string(),
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }
    }
    Ok(())
}

/// What was being done when a registry request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ResolveManifest,
    FetchConfig,
    FetchLayer,
    FetchBlob,
    CheckBlob,
    PushBlob,
    PushManifest,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::ResolveManifest => "resolving",
            Operation::FetchConfig => "fetching the config of",
            Operation::FetchLayer => "fetching a layer of",
            Operation::FetchBlob => "fetching a blob of",
            Operation::CheckBlob => "checking for a blob in",
            Operation::PushBlob => "uploading a blob to",
            Operation::PushManifest => "pushing a manifest to",
        })
    }
}

/// Errors of the registry client. References are shown normalized; secrets never appear.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid image reference `{input}`: {reason}")]
    InvalidReference { input: String, reason: String },

    #[error("cannot set up an HTTP client for registry {registry}: {message}")]
    ClientSetup { registry: String, message: String },

    #[error("cannot read registry credentials from {}: {message}", path.display())]
    DockerConfig { path: PathBuf, message: String },

    #[error(
        "the credential helper `{argv}` (named by {}) failed for {registry}: {message}",
        config.display()
    )]
    CredentialHelper {
        argv: String,
        config: PathBuf,
        registry: String,
        /// What went wrong, with the helper's stderr; never its stdout (it may hold a secret).
        message: String,
    },

    #[error(
        "image {reference} not found: the registry has no such manifest (check the name, the \
         tag and the registry)"
    )]
    ManifestNotFound { reference: String },

    #[error("blob {digest} of {reference} not found in the registry")]
    BlobNotFound { reference: String, digest: String },

    #[error("not authorized: {operation} {reference} was refused{}; tried {credentials}", status_suffix(*status))]
    Unauthorized {
        operation: Operation,
        reference: String,
        /// 401 or 403 when the registry said so with a status.
        status: Option<u16>,
        credentials: CredentialSource,
    },

    #[error(
        "{operation} {reference}{} failed with a transient error, retried {retries} time(s) \
         over {elapsed_secs:.1}s; last error: {last}",
        digest_suffix(digest)
    )]
    Transient {
        operation: Operation,
        reference: String,
        digest: Option<String>,
        /// Retries after the first attempt.
        retries: u32,
        elapsed_secs: f64,
        last: String,
    },

    #[error(
        "{operation} {reference}{}: the registry answered: {message}",
        digest_suffix(digest)
    )]
    Registry {
        operation: Operation,
        reference: String,
        digest: Option<String>,
        message: String,
    },

    #[error("the manifest of {reference} is not usable: {reason}")]
    InvalidManifest { reference: String, reason: String },

    #[error(
        "{reference} has no linux/amd64 image; its index offers: {}",
        if available.is_empty() { "nothing".to_owned() } else { available.join(", ") }
    )]
    NoMatchingPlatform {
        reference: String,
        available: Vec<String>,
    },

    #[error("{reference} is an image for {platform}, not linux/amd64")]
    WrongPlatform { reference: String, platform: String },

    #[error(
        "layer {digest} of {reference} has media type `{media_type}`, which banger cannot \
         unpack (supported: uncompressed, gzip and zstd tar layers)"
    )]
    UnsupportedLayer {
        reference: String,
        digest: String,
        media_type: String,
    },

    #[error("unknown layer media type `{media_type}`")]
    UnknownLayerMediaType { media_type: String },

    #[error("cannot start decompressing a `{media_type}` layer")]
    LayerDecoder {
        media_type: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "blob {digest} of {reference} failed verification: its content hashes to {actual}; \
         nothing was kept"
    )]
    BlobDigestMismatch {
        reference: String,
        digest: String,
        actual: String,
    },

    #[error(
        "blob {digest} of {reference} is truncated: expected {expected} bytes, received \
         {received}; nothing was kept"
    )]
    BlobTruncated {
        reference: String,
        digest: String,
        expected: u64,
        received: u64,
    },

    #[error(
        "blob {digest} of {reference} is larger than the {expected} bytes its manifest \
         declares; nothing was kept"
    )]
    BlobTooLarge {
        reference: String,
        digest: String,
        expected: u64,
    },

    #[error(
        "the registry's manifest for {reference} is larger than banger's limit of {limit} bytes \
         (real manifests are a few KiB); nothing was kept"
    )]
    ManifestTooLarge { reference: String, limit: u64 },

    #[error(
        "the registry's manifest for {reference} does not match {expected} (its bytes are \
         {actual}); nothing was kept"
    )]
    ManifestDigestMismatch {
        reference: String,
        expected: String,
        actual: String,
    },

    #[error("cannot write blob {digest} of {reference} to {}", path.display())]
    BlobWrite {
        reference: String,
        digest: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "lock entry for {reference} lacks `{missing}`; remove the entry from Bangerfile.lock \
         to resolve the reference again"
    )]
    PinIncomplete { reference: String, missing: String },

    #[error("lock entry for {reference} is not valid: {reason}")]
    InvalidPin { reference: String, reason: String },

    #[error(
        "the registry's manifest {manifest_digest} of {reference} does not match the lock \
         entry ({field} differs); remove the entry from Bangerfile.lock to resolve again"
    )]
    PinMismatch {
        reference: String,
        manifest_digest: String,
        field: String,
    },
}

impl OciError {
    /// True when the user can fix it by changing what they asked for or their credentials;
    /// false for failures of the network, the registry or the machine.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            OciError::InvalidReference { .. }
                | OciError::DockerConfig { .. }
                | OciError::CredentialHelper { .. }
                | OciError::ManifestNotFound { .. }
                | OciError::Unauthorized { .. }
                | OciError::NoMatchingPlatform { .. }
                | OciError::WrongPlatform { .. }
                | OciError::UnsupportedLayer { .. }
                | OciError::UnknownLayerMediaType { .. }
        )
    }
}

fn status_suffix(status: Option<u16>) -> String {
    status
        .map(|code| format!(" (HTTP {code})"))
        .unwrap_or_default()
}

fn digest_suffix(digest: &Option<String>) -> String {
    digest
        .as_ref()
        .map(|digest| format!(" (blob {digest})"))
        .unwrap_or_default()
}

impl crate::error::Classify for OciError {
    fn class(&self) -> crate::error::ErrorClass {
        if self.is_user_error() {
            crate::error::ErrorClass::User
        } else {
            crate::error::ErrorClass::Environment
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved() -> ResolvedImage {
        let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        ResolvedImage {
            reference: ImageReference::parse("alpine:3.20")
                .unwrap()
                .with_digest(&digest('a'))
                .unwrap(),
            manifest_digest: digest('a'),
            config_digest: digest('c'),
            config_size: 12,
            layers: vec![
                Layer {
                    digest: digest('1'),
                    media_type: media_types::OCI_LAYER_GZIP.to_owned(),
                    size: 100,
                },
                Layer {
                    digest: digest('2'),
                    media_type: media_types::DOCKER_LAYER_GZIP.to_owned(),
                    size: 200,
                },
            ],
        }
    }

    #[test]
    fn store_integrities_become_registry_digests() {
        let integrity = ssri::IntegrityOpts::new()
            .algorithm(ssri::Algorithm::Sha256)
            .chain(b"hello")
            .result()
            .to_string();
        assert_eq!(
            registry_digest(&integrity).unwrap(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(
            sha256_digest(b"hello"),
            registry_digest(&integrity).unwrap()
        );
        assert_eq!(registry_digest("sha512-AAAA"), None);
        assert_eq!(registry_digest("nonsense"), None);
    }

    #[test]
    fn errors_can_cross_tasks_and_become_step_error_sources() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}
        assert_error::<OciError>();
    }

    #[test]
    fn pins_round_trip() {
        let image = resolved();
        let pin = image.pin("alpine:3.20");
        assert_eq!(pin.reference, "alpine:3.20");
        assert_eq!(pin.manifest_digest, image.manifest_digest);
        assert_eq!(ResolvedImage::from_pinned(&pin).unwrap(), image);
        let text = toml::to_string(&crate::lock::Lock {
            oci: vec![pin],
            ..Default::default()
        })
        .unwrap();
        let lock: crate::lock::Lock = toml::from_str(&text).unwrap();
        assert_eq!(
            ResolvedImage::from_pinned(lock.pinned("alpine:3.20").unwrap()).unwrap(),
            image
        );
    }

    #[test]
    fn incomplete_or_unsupported_pins_are_refused() {
        let mut pin = resolved().pin("alpine:3.20");
        pin.config_digest = None;
        let error = ResolvedImage::from_pinned(&pin).unwrap_err().to_string();
        assert!(error.contains("config_digest"), "{error}");
        let mut pin = resolved().pin("alpine:3.20");
        pin.layers[0].media_type = "application/x-foreign".to_owned();
        let error = ResolvedImage::from_pinned(&pin).unwrap_err().to_string();
        assert!(error.contains("application/x-foreign"), "{error}");
    }
}
