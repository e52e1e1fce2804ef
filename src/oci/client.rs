//! [`RegistryClient`]: resolve references and fetch blobs, with retries and verification.
//!
//! One oci-client `Client` is kept per (registry, credentials) pair, so connections and bearer
//! tokens are reused across the layers of an image; the credentials themselves are read from
//! the Docker config on every operation and only a hash of them is kept as the cache key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::auth::{self, Credentials};
use super::layer::media_types;
use super::reference::is_loopback_registry;
use super::retry::{Failure, Retrier};
use super::{
    ImageReference, Layer, OciError, Operation, ResolvedImage, RetryPolicy, check_layers,
    docker_config_path,
};
use crate::error::error_chain;
use crate::lock::PinnedReference;

const USER_AGENT: &str = concat!("banger/", env!("CARGO_PKG_VERSION"));

/// Manifest kinds asked for; anything else the registry sends is refused when parsed.
const MANIFEST_MEDIA_TYPES: &[&str] = &[
    media_types::OCI_MANIFEST,
    media_types::OCI_INDEX,
    media_types::DOCKER_MANIFEST,
    media_types::DOCKER_MANIFEST_LIST,
];

/// A config larger than this is not an image config; refuse it rather than hold it in memory.
const MAX_CONFIG_SIZE: u64 = 16 * 1024 * 1024;

/// A manifest or index larger than this is refused while it streams (the largest real ones,
/// multi-platform indexes, are tens of KiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// Writes of blobs to disk are batched into buffers of this size.
const WRITE_BUFFER_SIZE: usize = 1024 * 1024;

/// Installs rustls' ring crypto provider as the process default if none is installed yet.
/// The client calls it itself; code that builds an `oci_client::Client` directly (tests
/// pushing images) must call it first.
pub fn install_tls_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // An error means another provider is already the default, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// How the client reaches registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// The Docker `config.json` to read credentials from; `None` means anonymous everywhere.
    pub docker_config: Option<PathBuf>,
    /// Podman's `auth.json` (same format), read before `docker_config`: an entry or helper
    /// for the registry there wins.
    pub containers_auth: Option<PathBuf>,
    /// Proxies for registry requests, as `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` give them
    /// (either case); `None`: direct.
    pub proxies: Proxies,
    /// The `PATH` credential helpers (`docker-credential-NAME`) are looked up in; `None`:
    /// this process's.
    pub credential_helper_path: Option<std::ffi::OsString>,
    /// Registries (`host[:port]`, as references write them) spoken to over plain HTTP, in
    /// addition to loopback ones.
    pub insecure_registries: Vec<String>,
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    /// Longest wait for any single read, so a stalled transfer fails (and is retried) instead
    /// of hanging.
    pub read_timeout: Duration,
}

impl Default for RegistryOptions {
    fn default() -> RegistryOptions {
        RegistryOptions {
            docker_config: None,
            containers_auth: None,
            proxies: Proxies::default(),
            credential_helper_path: None,
            insecure_registries: Vec::new(),
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// The proxy settings of the conventional environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proxies {
    /// For `http://` registries (loopback and `BANGER_INSECURE_REGISTRIES` ones).
    pub http: Option<String>,
    pub https: Option<String>,
    /// Hosts that are reached directly: comma-separated names, domains and addresses.
    pub no_proxy: Option<String>,
}

impl Proxies {
    /// `HTTP_PROXY`/`http_proxy`, `HTTPS_PROXY`/`https_proxy`, `NO_PROXY`/`no_proxy`; the
    /// lower-case spelling wins when both are set, as curl has it. Empty means unset.
    pub fn from_env() -> Proxies {
        let read = |name: &str| {
            [name.to_ascii_lowercase(), name.to_owned()]
                .iter()
                .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
        };
        Proxies {
            http: read(crate::env::HTTP_PROXY),
            https: read(crate::env::HTTPS_PROXY),
            no_proxy: read(crate::env::NO_PROXY),
        }
    }

    /// `builder` with these proxies (for the HTTP clients banger builds itself; oci-client
    /// gets them through its own settings).
    pub fn apply(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, reqwest::Error> {
        let no_proxy = || {
            self.no_proxy
                .as_deref()
                .and_then(reqwest::NoProxy::from_string)
        };
        if let Some(url) = &self.https {
            builder = builder.proxy(reqwest::Proxy::https(url)?.no_proxy(no_proxy()));
        }
        if let Some(url) = &self.http {
            builder = builder.proxy(reqwest::Proxy::http(url)?.no_proxy(no_proxy()));
        }
        Ok(builder)
    }
}

impl RegistryOptions {
    /// Defaults, with the Docker config from `DOCKER_CONFIG` or `HOME` and the insecure
    /// registries from `BANGER_INSECURE_REGISTRIES`.
    pub fn from_env() -> RegistryOptions {
        RegistryOptions {
            docker_config: docker_config_path(
                crate::env::var_path(crate::env::DOCKER_CONFIG),
                crate::env::var_path(crate::env::HOME),
            ),
            proxies: Proxies::from_env(),
            containers_auth: crate::env::var_path(crate::env::REGISTRY_AUTH_FILE).or_else(|| {
                crate::env::var_path(crate::env::XDG_RUNTIME_DIR)
                    .map(|dir| dir.join("containers/auth.json"))
            }),
            insecure_registries: crate::env::insecure_registries(),
            retry: RetryPolicy {
                max_attempts: crate::env::registry_retries()
                    .unwrap_or(RetryPolicy::default().max_attempts),
                ..RetryPolicy::default()
            },
            ..RegistryOptions::default()
        }
    }

    fn plain_http(&self, registry: &str) -> bool {
        is_loopback_registry(registry)
            || self
                .insecure_registries
                .iter()
                .any(|insecure| insecure.eq_ignore_ascii_case(registry))
    }
}

/// Resolves references and fetches blobs. Share one per process: it keeps connections and
/// tokens per registry.
pub struct RegistryClient {
    options: RegistryOptions,
    clients: Mutex<HashMap<String, oci_client::Client>>,
    /// Per registry: manifests are fetched without oci-client (see `fetch_manifest_once`).
    http_clients: Mutex<HashMap<String, reqwest::Client>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// One operation's client and credentials.
struct Session {
    client: oci_client::Client,
    credentials: Credentials,
    /// The repository's pull token for manifest requests (`None`: basic or no auth), asked
    /// for once per session: an index and the manifest it points to share it.
    manifest_token: tokio::sync::OnceCell<Option<String>>,
}

/// What a failure is about, for errors.
struct Context<'a> {
    operation: Operation,
    reference: &'a ImageReference,
    digest: Option<&'a str>,
    credentials: &'a Credentials,
}

impl RegistryClient {
    pub fn new(options: RegistryOptions) -> RegistryClient {
        RegistryClient {
            options,
            clients: Mutex::new(HashMap::new()),
            http_clients: Mutex::new(HashMap::new()),
        }
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// Resolves `reference` to its linux/amd64 image manifest: an index or manifest list is
    /// followed to its linux/amd64 entry; a lone manifest has its config's platform checked.
    /// A reference with a digest is fetched by digest alone (its tag is not consulted).
    pub async fn resolve(&self, reference: &ImageReference) -> Result<ResolvedImage, OciError> {
        let session = self.session(reference).await?;
        let (body, digest) = self.fetch_manifest(&session, reference).await?;
        match parse_manifest(reference, &body)? {
            ParsedManifest::Image(manifest) => {
                let image = resolved_image(reference, digest, manifest)?;
                self.check_config_platform(&session, &image).await?;
                Ok(image)
            }
            ParsedManifest::Index(entries) => {
                let entry =
                    select_linux_amd64(&entries).ok_or_else(|| OciError::NoMatchingPlatform {
                        reference: reference.to_string(),
                        available: available_platforms(&entries),
                    })?;
                let child = reference.with_digest(&entry.digest).map_err(|_| {
                    OciError::InvalidManifest {
                        reference: reference.to_string(),
                        reason: format!(
                            "its linux/amd64 entry has an unusable digest `{}`",
                            entry.digest
                        ),
                    }
                })?;
                let (body, digest) = self.fetch_manifest(&session, &child).await?;
                match parse_manifest(&child, &body)? {
                    ParsedManifest::Image(manifest) => resolved_image(reference, digest, manifest),
                    ParsedManifest::Index(_) => Err(OciError::InvalidManifest {
                        reference: reference.to_string(),
                        reason: "the linux/amd64 entry of its index is itself an index".to_owned(),
                    }),
                }
            }
        }
    }

    /// Resolves a lock entry by its manifest digest (never its tag) and checks the registry
    /// still describes the same layers.
    pub async fn resolve_pinned(&self, pin: &PinnedReference) -> Result<ResolvedImage, OciError> {
        let reference = ImageReference::parse(&pin.reference)?.with_digest(&pin.manifest_digest)?;
        let image = self.resolve(&reference).await?;
        let mismatch = |field: &str| OciError::PinMismatch {
            reference: pin.reference.clone(),
            manifest_digest: pin.manifest_digest.clone(),
            field: field.to_owned(),
        };
        if image.manifest_digest != pin.manifest_digest {
            return Err(mismatch("manifest digest"));
        }
        if pin
            .config_digest
            .as_ref()
            .is_some_and(|config| *config != image.config_digest)
        {
            return Err(mismatch("config digest"));
        }
        let same_layers = image.layers.len() == pin.layers.len()
            && image.layers.iter().zip(&pin.layers).all(|(layer, pinned)| {
                layer.digest == pinned.digest
                    && layer.media_type == pinned.media_type
                    && layer.size == pinned.size
            });
        if !same_layers {
            return Err(mismatch("layers"));
        }
        Ok(image)
    }

    /// Streams one layer blob of `reference`'s repository to `destination`, verifying size and
    /// sha256 as it arrives. The bytes go to a temp file beside `destination`, renamed into
    /// place only once verified: on any error, or if the future is dropped, nothing is left
    /// behind. `progress(done, total)` is called as bytes arrive (from 0 again on a retry).
    pub async fn fetch_layer(
        &self,
        reference: &ImageReference,
        layer: &Layer,
        destination: &Path,
        progress: impl FnMut(u64, u64) + Send,
    ) -> Result<(), OciError> {
        check_layers(reference, std::slice::from_ref(layer))?;
        self.fetch_blob_file(
            Operation::FetchLayer,
            reference,
            &layer.digest,
            layer.size,
            destination,
            progress,
        )
        .await
    }

    /// [`RegistryClient::fetch_layer`] for a blob of any kind (the remote step cache's
    /// outputs): streamed to a temp file beside `destination`, sha256 and size checked on the
    /// way, renamed into place only once verified.
    pub async fn fetch_blob_to_file(
        &self,
        reference: &ImageReference,
        digest: &str,
        size: u64,
        destination: &Path,
        progress: impl FnMut(u64, u64) + Send,
    ) -> Result<(), OciError> {
        super::reference::validate_digest(digest).map_err(|reason| OciError::InvalidManifest {
            reference: reference.to_string(),
            reason,
        })?;
        self.fetch_blob_file(
            Operation::FetchBlob,
            reference,
            digest,
            size,
            destination,
            progress,
        )
        .await
    }

    async fn fetch_blob_file(
        &self,
        operation: Operation,
        reference: &ImageReference,
        digest: &str,
        size: u64,
        destination: &Path,
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<(), OciError> {
        let session = self.session(reference).await?;
        let write_error = |path: &Path, source| OciError::BlobWrite {
            reference: reference.to_string(),
            digest: digest.to_owned(),
            path: path.to_owned(),
            source,
        };
        let directory = match destination.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let partial = tempfile::Builder::new()
            .prefix(".banger-blob-")
            .suffix(".partial")
            .tempfile_in(directory)
            .map_err(|source| write_error(directory, source))?;
        let file = partial
            .as_file()
            .try_clone()
            .map_err(|source| write_error(partial.path(), source))?;
        let mut sink = BlobSink::File {
            writer: tokio::io::BufWriter::with_capacity(
                WRITE_BUFFER_SIZE,
                tokio::fs::File::from_std(file),
            ),
            path: partial.path().to_owned(),
        };
        let context = Context {
            operation,
            reference,
            digest: Some(digest),
            credentials: &session.credentials,
        };
        self.fetch_blob(&session, &context, size, &mut sink, &mut progress)
            .await?;
        drop(sink);
        partial
            .persist(destination)
            .map_err(|error| write_error(destination, error.error))?;
        Ok(())
    }

    /// A small blob (a record) into memory, verified against `digest` and `size`; refused
    /// when `size` is above `limit`.
    pub async fn fetch_blob_bytes(
        &self,
        reference: &ImageReference,
        digest: &str,
        size: u64,
        limit: u64,
    ) -> Result<Vec<u8>, OciError> {
        super::reference::validate_digest(digest).map_err(|reason| OciError::InvalidManifest {
            reference: reference.to_string(),
            reason,
        })?;
        if size > limit {
            return Err(OciError::InvalidManifest {
                reference: reference.to_string(),
                reason: format!("its blob {digest} declares {size} bytes, more than {limit}"),
            });
        }
        let session = self.session(reference).await?;
        let context = Context {
            operation: Operation::FetchBlob,
            reference,
            digest: Some(digest),
            credentials: &session.credentials,
        };
        let mut sink = BlobSink::Memory(Vec::new());
        self.fetch_blob(&session, &context, size, &mut sink, &mut |_, _| {})
            .await?;
        match sink {
            BlobSink::Memory(bytes) => Ok(bytes),
            BlobSink::File { .. } => unreachable!("the sink was created in memory"),
        }
    }

    /// The manifest `reference` names (by tag or digest), as its bytes and digest, checked and
    /// capped as for [`RegistryClient::resolve`]; `None` when the registry has no such
    /// manifest or repository.
    pub async fn fetch_manifest_bytes(
        &self,
        reference: &ImageReference,
    ) -> Result<Option<(Vec<u8>, String)>, OciError> {
        let session = self.session(reference).await?;
        match self.fetch_manifest(&session, reference).await {
            Ok(found) => Ok(Some(found)),
            Err(OciError::ManifestNotFound { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Whether `reference`'s repository has blob `digest` (a `HEAD`, retried like the rest).
    pub async fn blob_exists(
        &self,
        reference: &ImageReference,
        digest: &str,
    ) -> Result<bool, OciError> {
        self.retried(
            Operation::CheckBlob,
            reference,
            Some(digest),
            |client, image| {
                let digest = digest.to_owned();
                async move { client.blob_exists(&image, &digest).await }
            },
        )
        .await
    }

    /// One request of `operation`, made by `attempt` with the repository's client and its
    /// oci-client reference, retried on transient failures; its error in banger's terms.
    async fn retried<T, F, Fut>(
        &self,
        operation: Operation,
        reference: &ImageReference,
        digest: Option<&str>,
        mut attempt: F,
    ) -> Result<T, OciError>
    where
        F: FnMut(oci_client::Client, oci_client::Reference) -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let session = self.session(reference).await?;
        let context = Context {
            operation,
            reference,
            digest,
            credentials: &session.credentials,
        };
        let mut retrier = Retrier::new(&self.options.retry);
        loop {
            let failure =
                match attempt(session.client.clone(), reference.to_client_reference()).await {
                    Ok(value) => return Ok(value),
                    Err(error) => classify(error, &context),
                };
            after_failure(&mut retrier, failure, &context).await?;
        }
    }

    /// Uploads the file at `path` as blob `digest` of `size` bytes to `reference`'s
    /// repository, unless the repository has it already. True when the bytes were sent.
    /// One `PUT` of the whole file (a monolithic upload, which every registry takes), from
    /// the start again on a transient failure; `progress(sent, size)` as it goes.
    pub async fn push_blob_file(
        &self,
        reference: &ImageReference,
        path: &Path,
        digest: &str,
        size: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<bool, OciError> {
        if self.blob_exists(reference, digest).await? {
            return Ok(false);
        }
        let session = self.session(reference).await?;
        let context = Context {
            operation: Operation::PushBlob,
            reference,
            digest: Some(digest),
            credentials: &session.credentials,
        };
        let client_reference = reference.to_client_reference();
        let mut retrier = Retrier::new(&self.options.retry);
        loop {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|source| OciError::BlobWrite {
                    reference: reference.to_string(),
                    digest: digest.to_owned(),
                    path: path.to_owned(),
                    source,
                })?;
            let (sent, mut sent_updates) = tokio::sync::mpsc::unbounded_channel::<u64>();
            let mut total = 0u64;
            let body = tokio_util::io::ReaderStream::with_capacity(file, WRITE_BUFFER_SIZE).map(
                move |chunk| {
                    let chunk = chunk.map_err(OciDistributionError::IoError)?;
                    total += chunk.len() as u64;
                    let _ = sent.send(total);
                    Ok(chunk)
                },
            );
            progress(0, size);
            let push = session
                .client
                .push_blob_stream(&client_reference, body, digest, Some(size));
            let mut push = std::pin::pin!(push);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut push => break outcome,
                    Some(done) = sent_updates.recv() => progress(done, size),
                }
            };
            let failure = match outcome {
                Ok(_) => {
                    progress(size, size);
                    return Ok(true);
                }
                Err(error) => classify(error, &context),
            };
            after_failure(&mut retrier, failure, &context).await?;
        }
    }

    /// Asks the registry to link blob `digest` from `source`'s repository into `target`'s
    /// (a cross-repository mount: nothing is uploaded). True when the registry did; false
    /// when it cannot (another registry, a blob `source` lacks, a registry without mounts),
    /// and the caller uploads instead.
    pub async fn mount_blob(
        &self,
        target: &ImageReference,
        source: &ImageReference,
        digest: &str,
    ) -> Result<bool, OciError> {
        if source.registry() != target.registry() || source.repository() == target.repository() {
            return Ok(false);
        }
        let session = self.session(target).await?;
        Ok(session
            .client
            .mount_blob(
                &target.to_client_reference(),
                &source.to_client_reference(),
                digest,
            )
            .await
            .is_ok())
    }

    /// [`RegistryClient::push_blob_file`] for bytes in memory.
    pub async fn push_blob_bytes(
        &self,
        reference: &ImageReference,
        bytes: &[u8],
        digest: &str,
    ) -> Result<bool, OciError> {
        if self.blob_exists(reference, digest).await? {
            return Ok(false);
        }
        self.retried(
            Operation::PushBlob,
            reference,
            Some(digest),
            |client, image| {
                let (bytes, digest) = (bytes.to_vec(), digest.to_owned());
                async move { client.push_blob(&image, bytes, &digest).await }
            },
        )
        .await?;
        Ok(true)
    }

    /// Puts `body` (a manifest of `media_type`) under `reference`'s tag or digest; returns
    /// its digest. Push the blobs it names first: registries refuse a manifest whose blobs
    /// they lack.
    pub async fn push_manifest(
        &self,
        reference: &ImageReference,
        body: &[u8],
        media_type: &str,
    ) -> Result<String, OciError> {
        let content_type = reqwest::header::HeaderValue::from_str(media_type).map_err(|_| {
            OciError::InvalidManifest {
                reference: reference.to_string(),
                reason: format!("`{media_type}` is not a media type"),
            }
        })?;
        self.retried(Operation::PushManifest, reference, None, |client, image| {
            let (body, content_type) = (body.to_vec(), content_type.clone());
            async move { client.push_manifest_raw(&image, body, content_type).await }
        })
        .await?;
        Ok(format!("sha256:{}", hex(&Sha256::digest(body))))
    }

    /// The image's config blob, verified against its digest.
    pub async fn fetch_config(&self, image: &ResolvedImage) -> Result<Vec<u8>, OciError> {
        let session = self.session(&image.reference).await?;
        self.fetch_config_with(&session, image).await
    }

    async fn fetch_config_with(
        &self,
        session: &Session,
        image: &ResolvedImage,
    ) -> Result<Vec<u8>, OciError> {
        if image.config_size > MAX_CONFIG_SIZE {
            return Err(OciError::InvalidManifest {
                reference: image.reference.to_string(),
                reason: format!(
                    "its config declares {} bytes, more than an image config can need",
                    image.config_size
                ),
            });
        }
        let context = Context {
            operation: Operation::FetchConfig,
            reference: &image.reference,
            digest: Some(&image.config_digest),
            credentials: &session.credentials,
        };
        let mut sink = BlobSink::Memory(Vec::new());
        self.fetch_blob(
            session,
            &context,
            image.config_size,
            &mut sink,
            &mut |_, _| {},
        )
        .await?;
        match sink {
            BlobSink::Memory(bytes) => Ok(bytes),
            BlobSink::File { .. } => unreachable!("the sink was created in memory"),
        }
    }

    /// A lone manifest (no index) could be for any platform: its config says which.
    async fn check_config_platform(
        &self,
        session: &Session,
        image: &ResolvedImage,
    ) -> Result<(), OciError> {
        #[derive(Deserialize)]
        struct ConfigPlatform {
            architecture: Option<String>,
            os: Option<String>,
            variant: Option<String>,
        }
        let config = self.fetch_config_with(session, image).await?;
        let platform: ConfigPlatform =
            serde_json::from_slice(&config).map_err(|error| OciError::InvalidManifest {
                reference: image.reference.to_string(),
                reason: format!("its config {} is not JSON: {error}", image.config_digest),
            })?;
        let os = platform.os.as_deref().unwrap_or("linux");
        let architecture = platform.architecture.as_deref().unwrap_or("amd64");
        if os != "linux" || architecture != "amd64" {
            let mut shown = format!("{os}/{architecture}");
            if let Some(variant) = platform.variant {
                shown = format!("{shown}/{variant}");
            }
            return Err(OciError::WrongPlatform {
                reference: image.reference.to_string(),
                platform: shown,
            });
        }
        Ok(())
    }

    async fn session(&self, reference: &ImageReference) -> Result<Session, OciError> {
        // A credential helper is a process to wait for: not on the runtime's threads.
        let config = self.options.docker_config.clone();
        let containers_auth = self.options.containers_auth.clone();
        let helper_path = self.options.credential_helper_path.clone();
        let registry = reference.registry().to_owned();
        let credentials = tokio::task::spawn_blocking(move || {
            // Podman's file first, as Podman reads it; anonymous there means "look on".
            if let Some(path) = containers_auth.as_deref().filter(|path| path.is_file()) {
                let found = auth::lookup(Some(path), &registry, helper_path.as_deref())?;
                if found.auth != oci_client::secrets::RegistryAuth::Anonymous {
                    return Ok(found);
                }
            }
            auth::lookup(config.as_deref(), &registry, helper_path.as_deref())
        })
        .await
        .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))?;
        let client = self.client_for(reference.registry(), &credentials)?;
        client
            .store_auth_if_needed(
                reference.to_client_reference().resolve_registry(),
                &credentials.auth,
            )
            .await;
        Ok(Session {
            client,
            credentials,
            manifest_token: tokio::sync::OnceCell::new(),
        })
    }

    fn client_for(
        &self,
        registry: &str,
        credentials: &Credentials,
    ) -> Result<oci_client::Client, OciError> {
        let key = format!("{registry}\n{}", credentials.fingerprint());
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        install_tls_provider();
        let config = ClientConfig {
            protocol: if self.options.plain_http(registry) {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            // Platforms are chosen here, so that a miss can list what is available.
            platform_resolver: None,
            connect_timeout: Some(self.options.connect_timeout),
            read_timeout: Some(self.options.read_timeout),
            user_agent: USER_AGENT,
            http_proxy: self.options.proxies.http.clone(),
            https_proxy: self.options.proxies.https.clone(),
            no_proxy: self.options.proxies.no_proxy.clone(),
            // One PUT per blob, streamed: chunked uploads would be one request per buffer.
            use_monolithic_push: true,
            ..ClientConfig::default()
        };
        let client =
            oci_client::Client::try_from(config).map_err(|error| OciError::ClientSetup {
                registry: registry.to_owned(),
                message: error_chain(&error),
            })?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// The manifest's bytes and digest, checked against the reference's digest and the
    /// registry's `Docker-Content-Digest`, read with a cap of [`MAX_MANIFEST_SIZE`].
    async fn fetch_manifest(
        &self,
        session: &Session,
        reference: &ImageReference,
    ) -> Result<(Vec<u8>, String), OciError> {
        let context = Context {
            operation: Operation::ResolveManifest,
            reference,
            digest: None,
            credentials: &session.credentials,
        };
        let mut retrier = Retrier::new(&self.options.retry);
        loop {
            let failure = match self.fetch_manifest_once(session, &context).await {
                Ok(fetched) => return Ok(fetched),
                Err(failure) => failure,
            };
            after_failure(&mut retrier, failure, &context).await?;
        }
    }

    /// One GET of a manifest. oci-client reads manifests whole into memory with no limit, so
    /// banger asks for them itself, with oci-client's token for the repository (or the
    /// credentials for a registry that takes basic auth), and stops reading at the cap.
    async fn fetch_manifest_once(
        &self,
        session: &Session,
        context: &Context<'_>,
    ) -> Result<(Vec<u8>, String), Failure> {
        use oci_client::secrets::RegistryAuth;
        let reference = context.reference;
        let client_reference = reference.to_client_reference();
        let registry = client_reference.resolve_registry().to_owned();
        let token = session
            .manifest_token
            .get_or_try_init(|| {
                session.client.auth(
                    &client_reference,
                    &session.credentials.auth,
                    oci_client::RegistryOperation::Pull,
                )
            })
            .await
            .map_err(|error| classify(error, context))?;
        let scheme = if self.options.plain_http(&registry) {
            "http"
        } else {
            "https"
        };
        let url = format!(
            "{scheme}://{registry}/v2/{}/manifests/{}{}",
            client_reference.repository(),
            client_reference
                .digest()
                .or(client_reference.tag())
                .unwrap_or("latest"),
            client_reference
                .namespace()
                .map(|namespace| format!("?ns={namespace}"))
                .unwrap_or_default(),
        );
        let mut request = self
            .http_client(&registry)
            .map_err(Failure::Fatal)?
            .get(&url)
            .header(reqwest::header::ACCEPT, MANIFEST_MEDIA_TYPES.join(", "));
        request = match (&token, &session.credentials.auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            (None, _) => request,
        };
        let transport =
            |error: reqwest::Error| classify(OciDistributionError::RequestError(error), context);
        let mut response = request.send().await.map_err(transport)?;
        let too_large = || {
            Failure::Fatal(OciError::ManifestTooLarge {
                reference: reference.to_string(),
                limit: MAX_MANIFEST_SIZE,
            })
        };
        if response
            .content_length()
            .is_some_and(|length| length > MAX_MANIFEST_SIZE)
        {
            return Err(too_large());
        }
        let status = response.status();
        let header_digest = response
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|value| value.to_str().ok())
            .filter(|value| !value.is_empty())
            .map(str::to_owned);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if (body.len() + chunk.len()) as u64 > MAX_MANIFEST_SIZE {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        if status != reqwest::StatusCode::OK {
            return Err(classify(status_error(status, &body, &url), context));
        }
        let actual = format!("sha256:{}", hex(&Sha256::digest(&body)));
        for expected in [client_reference.digest(), header_digest.as_deref()]
            .into_iter()
            .flatten()
        {
            // Only sha256 is in use; another algorithm's digest cannot be checked here.
            if expected.starts_with("sha256:") && expected != actual {
                return Err(Failure::Fatal(OciError::ManifestDigestMismatch {
                    reference: reference.to_string(),
                    expected: expected.to_owned(),
                    actual,
                }));
            }
        }
        Ok((body, actual))
    }

    /// The HTTP client for manifests from `registry`, made once (connections are reused).
    fn http_client(&self, registry: &str) -> Result<reqwest::Client, OciError> {
        let mut clients = self
            .http_clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(client) = clients.get(registry) {
            return Ok(client.clone());
        }
        install_tls_provider();
        let setup_error = |error: reqwest::Error| OciError::ClientSetup {
            registry: registry.to_owned(),
            message: error_chain(&error),
        };
        // The same proxies oci-client is given for blobs and tokens.
        let builder = reqwest::Client::builder()
            .connect_timeout(self.options.connect_timeout)
            .read_timeout(self.options.read_timeout)
            .user_agent(USER_AGENT);
        let client = self
            .options
            .proxies
            .apply(builder)
            .and_then(reqwest::ClientBuilder::build)
            .map_err(setup_error)?;
        clients.insert(registry.to_owned(), client.clone());
        Ok(client)
    }

    /// Streams a blob into `sink`, retrying transient failures from the start.
    async fn fetch_blob(
        &self,
        session: &Session,
        context: &Context<'_>,
        size: u64,
        sink: &mut BlobSink,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(), OciError> {
        let mut retrier = Retrier::new(&self.options.retry);
        loop {
            sink.reset()
                .await
                .map_err(|source| sink.write_error(context, source))?;
            progress(0, size);
            let failure = match fetch_blob_once(session, context, size, sink, progress).await {
                Ok(()) => return Ok(()),
                Err(failure) => failure,
            };
            after_failure(&mut retrier, failure, context).await?;
        }
    }
}

/// Where a blob's bytes go.
enum BlobSink {
    File {
        writer: tokio::io::BufWriter<tokio::fs::File>,
        path: PathBuf,
    },
    Memory(Vec<u8>),
}

impl BlobSink {
    /// Empties the sink before an attempt.
    async fn reset(&mut self) -> std::io::Result<()> {
        match self {
            BlobSink::File { writer, .. } => {
                writer.flush().await?;
                let file = writer.get_mut();
                file.set_len(0).await?;
                file.rewind().await?;
                Ok(())
            }
            BlobSink::Memory(bytes) => {
                bytes.clear();
                Ok(())
            }
        }
    }

    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        match self {
            BlobSink::File { writer, .. } => writer.write_all(chunk).await,
            BlobSink::Memory(bytes) => {
                bytes.extend_from_slice(chunk);
                Ok(())
            }
        }
    }

    async fn finish(&mut self) -> std::io::Result<()> {
        match self {
            BlobSink::File { writer, .. } => writer.flush().await,
            BlobSink::Memory(_) => Ok(()),
        }
    }

    fn write_error(&self, context: &Context<'_>, source: std::io::Error) -> OciError {
        let path = match self {
            BlobSink::File { path, .. } => path.clone(),
            BlobSink::Memory(_) => PathBuf::from("<memory>"),
        };
        OciError::BlobWrite {
            reference: context.reference.to_string(),
            digest: context.digest.unwrap_or_default().to_owned(),
            path,
            source,
        }
    }
}

/// One attempt at a blob: request, stream, hash, count, compare.
async fn fetch_blob_once(
    session: &Session,
    context: &Context<'_>,
    size: u64,
    sink: &mut BlobSink,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(), Failure> {
    let digest = context.digest.unwrap_or_default();
    let reference = context.reference.to_string();
    let truncated = |received| {
        Failure::Fatal(OciError::BlobTruncated {
            reference: reference.clone(),
            digest: digest.to_owned(),
            expected: size,
            received,
        })
    };
    let too_large = || {
        Failure::Fatal(OciError::BlobTooLarge {
            reference: reference.clone(),
            digest: digest.to_owned(),
            expected: size,
        })
    };
    let mut stream = session
        .client
        .pull_blob_stream(&context.reference.to_client_reference(), digest)
        .await
        .map_err(|error| classify(error, context))?;
    match stream.content_length {
        Some(length) if length > size => return Err(too_large()),
        Some(length) if length < size => return Err(truncated(length)),
        _ => {}
    }
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let bytes = match chunk {
            Ok(bytes) => bytes,
            // oci-client's own end-of-stream check; ours below says more.
            Err(error) if is_digest_error(&error) => break,
            Err(error) => {
                return Err(Failure::Transient(format!(
                    "the transfer broke off after {received} bytes: {}",
                    error_chain(&error)
                )));
            }
        };
        received += bytes.len() as u64;
        if received > size {
            return Err(too_large());
        }
        hasher.update(&bytes);
        sink.write(&bytes)
            .await
            .map_err(|source| Failure::Fatal(sink.write_error(context, source)))?;
        progress(received, size);
    }
    if received < size {
        return Err(truncated(received));
    }
    let actual = format!("sha256:{}", hex(&hasher.finalize()));
    if actual != digest {
        return Err(Failure::Fatal(OciError::BlobDigestMismatch {
            reference,
            digest: digest.to_owned(),
            actual,
        }));
    }
    sink.finish()
        .await
        .map_err(|source| Failure::Fatal(sink.write_error(context, source)))
}

fn is_digest_error(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<DigestError>().is_some())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Turns a failed attempt into the final error, or waits for the next attempt.
async fn after_failure(
    retrier: &mut Retrier<'_>,
    failure: Failure,
    context: &Context<'_>,
) -> Result<(), OciError> {
    match failure {
        Failure::Fatal(error) => Err(error),
        Failure::Transient(message) => {
            retrier
                .wait_or_give_up(message)
                .await
                .map_err(|gave_up| OciError::Transient {
                    operation: context.operation,
                    reference: context.reference.to_string(),
                    digest: context.digest.map(str::to_owned),
                    retries: gave_up.retries,
                    elapsed_secs: gave_up.elapsed.as_secs_f64(),
                    last: gave_up.last,
                })
        }
    }
}

/// Sorts an oci-client error into retry-worthy or final, and makes final ones say what
/// happened in banger's terms.
fn classify(error: OciDistributionError, context: &Context<'_>) -> Failure {
    let not_found = || match context.digest {
        Some(digest) => OciError::BlobNotFound {
            reference: context.reference.to_string(),
            digest: digest.to_owned(),
        },
        None => OciError::ManifestNotFound {
            reference: context.reference.to_string(),
        },
    };
    let unauthorized = |status| OciError::Unauthorized {
        operation: context.operation,
        reference: context.reference.to_string(),
        status,
        credentials: context.credentials.source.clone(),
    };
    let other = |message: String| OciError::Registry {
        operation: context.operation,
        reference: context.reference.to_string(),
        digest: context.digest.map(str::to_owned),
        message,
    };
    match error {
        OciDistributionError::UnauthorizedError { .. } => Failure::Fatal(unauthorized(Some(401))),
        OciDistributionError::AuthenticationFailure(_) => Failure::Fatal(unauthorized(None)),
        OciDistributionError::ServerError { code, url, message } => match code {
            404 => Failure::Fatal(not_found()),
            401 | 403 => Failure::Fatal(unauthorized(Some(code))),
            408 | 429 | 500..=599 => Failure::Transient(format!("HTTP {code} from {url}")),
            _ => Failure::Fatal(other(format!(
                "HTTP {code} from {url}: {}",
                shorten(&message)
            ))),
        },
        OciDistributionError::RegistryError { envelope, url } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let any = |wanted: &[OciErrorCode]| codes.iter().any(|code| wanted.contains(code));
            if any(&[OciErrorCode::Unauthorized, OciErrorCode::Denied]) {
                Failure::Fatal(unauthorized(None))
            } else if any(&[
                OciErrorCode::ManifestUnknown,
                OciErrorCode::BlobUnknown,
                OciErrorCode::NameUnknown,
                OciErrorCode::NotFound,
            ]) {
                Failure::Fatal(not_found())
            } else if any(&[OciErrorCode::Toomanyrequests]) {
                Failure::Transient(format!("too many requests (from {url})"))
            } else {
                Failure::Fatal(other(format!("{url}: {}", shorten(&envelope.to_string()))))
            }
        }
        OciDistributionError::RequestError(error) => {
            let text = error_chain(&error);
            if error.is_timeout()
                || error.is_connect()
                || error.is_request()
                || error.is_body()
                || error.is_decode()
            {
                Failure::Transient(text)
            } else {
                Failure::Fatal(other(text))
            }
        }
        OciDistributionError::IoError(error) => Failure::Transient(error_chain(&error)),
        other_error => Failure::Fatal(other(error_chain(&other_error))),
    }
}

/// The error oci-client gives for a manifest answered with `status` and `body`, so that one
/// [`classify`] judges both paths.
fn status_error(status: reqwest::StatusCode, body: &[u8], url: &str) -> OciDistributionError {
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return OciDistributionError::UnauthorizedError {
            url: url.to_owned(),
        };
    }
    if status.is_client_error()
        && let Ok(envelope) = serde_json::from_slice::<oci_client::errors::OciEnvelope>(body)
    {
        return OciDistributionError::RegistryError {
            envelope,
            url: url.to_owned(),
        };
    }
    OciDistributionError::ServerError {
        code: status.as_u16(),
        url: url.to_owned(),
        message: String::from_utf8_lossy(body).into_owned(),
    }
}

/// Registry error bodies can be whole HTML pages.
fn shorten(text: &str) -> String {
    const LIMIT: usize = 300;
    let text = text.trim();
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<u32>,
    media_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<IndexEntry>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: String,
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
    variant: Option<String>,
}

enum ParsedManifest {
    Image(ImageManifest),
    Index(Vec<IndexEntry>),
}

struct ImageManifest {
    config: RawDescriptor,
    layers: Vec<RawDescriptor>,
}

fn parse_manifest(reference: &ImageReference, body: &[u8]) -> Result<ParsedManifest, OciError> {
    let invalid = |reason: String| OciError::InvalidManifest {
        reference: reference.to_string(),
        reason,
    };
    let raw: RawManifest = serde_json::from_slice(body)
        .map_err(|error| invalid(format!("it is not a manifest JSON document: {error}")))?;
    match raw.schema_version {
        Some(2) => {}
        Some(version) => {
            return Err(invalid(format!(
                "schema version {version} is not supported (only schema 2)"
            )));
        }
        None => return Err(invalid("it has no schemaVersion".to_owned())),
    }
    let media_type = raw.media_type.as_deref();
    let is_index = matches!(
        media_type,
        Some(media_types::OCI_INDEX | media_types::DOCKER_MANIFEST_LIST)
    );
    if let Some(other) = media_type
        && !is_index
        && !matches!(
            other,
            media_types::OCI_MANIFEST | media_types::DOCKER_MANIFEST
        )
    {
        return Err(invalid(format!(
            "its media type `{other}` is not an image's"
        )));
    }
    if is_index || (media_type.is_none() && raw.manifests.is_some()) {
        let entries = raw
            .manifests
            .ok_or_else(|| invalid("the index lists no manifests".to_owned()))?;
        return Ok(ParsedManifest::Index(entries));
    }
    let config = raw
        .config
        .ok_or_else(|| invalid("it has no config descriptor".to_owned()))?;
    let layers = raw
        .layers
        .ok_or_else(|| invalid("it has no layers list".to_owned()))?;
    Ok(ParsedManifest::Image(ImageManifest { config, layers }))
}

/// The linux/amd64 entry, preferring one without a CPU variant (the baseline any x86_64
/// machine runs).
fn select_linux_amd64(entries: &[IndexEntry]) -> Option<&IndexEntry> {
    let amd64 = |entry: &&IndexEntry| {
        entry
            .platform
            .as_ref()
            .is_some_and(|platform| platform.os == "linux" && platform.architecture == "amd64")
    };
    entries
        .iter()
        .filter(amd64)
        .find(|entry| {
            entry
                .platform
                .as_ref()
                .is_some_and(|platform| platform.variant.is_none())
        })
        .or_else(|| entries.iter().find(amd64))
}

fn available_platforms(entries: &[IndexEntry]) -> Vec<String> {
    let mut seen = Vec::new();
    for entry in entries {
        let shown = match &entry.platform {
            Some(Platform {
                architecture,
                os,
                variant: Some(variant),
            }) => format!("{os}/{architecture}/{variant}"),
            Some(Platform {
                architecture, os, ..
            }) => format!("{os}/{architecture}"),
            None => "unspecified".to_owned(),
        };
        if !seen.contains(&shown) {
            seen.push(shown);
        }
    }
    seen
}

fn resolved_image(
    reference: &ImageReference,
    manifest_digest: String,
    manifest: ImageManifest,
) -> Result<ResolvedImage, OciError> {
    let pinned =
        reference
            .with_digest(&manifest_digest)
            .map_err(|_| OciError::InvalidManifest {
                reference: reference.to_string(),
                reason: format!("the registry gave it the unusable digest `{manifest_digest}`"),
            })?;
    super::reference::validate_digest(&manifest.config.digest).map_err(|reason| {
        OciError::InvalidManifest {
            reference: reference.to_string(),
            reason: format!("config: {reason}"),
        }
    })?;
    let layers: Vec<Layer> = manifest
        .layers
        .into_iter()
        .map(|layer| Layer {
            digest: layer.digest,
            media_type: layer.media_type,
            size: layer.size,
        })
        .collect();
    check_layers(&pinned, &layers)?;
    Ok(ResolvedImage {
        reference: pinned,
        manifest_digest,
        config_digest: manifest.config.digest,
        config_size: manifest.config.size,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> ImageReference {
        ImageReference::parse("127.0.0.1:5000/x:1").unwrap()
    }

    #[test]
    fn index_selection_prefers_plain_amd64_and_lists_platforms() {
        let body = br#"{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
              {"digest": "sha256:a", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
              {"digest": "sha256:b", "platform": {"os": "linux", "architecture": "amd64", "variant": "v3"}},
              {"digest": "sha256:c", "platform": {"os": "linux", "architecture": "amd64"}},
              {"digest": "sha256:d"}
            ]}"#;
        let ParsedManifest::Index(entries) = parse_manifest(&reference(), body).unwrap() else {
            panic!("an index");
        };
        assert_eq!(select_linux_amd64(&entries).unwrap().digest, "sha256:c");
        assert_eq!(
            available_platforms(&entries),
            [
                "linux/arm64/v8",
                "linux/amd64/v3",
                "linux/amd64",
                "unspecified"
            ]
        );
        assert_eq!(
            select_linux_amd64(&entries[..2]).unwrap().digest,
            "sha256:b"
        );
        assert!(select_linux_amd64(&entries[..1]).is_none());
    }

    #[test]
    fn refuses_unusable_manifests() {
        for (body, needle) in [
            (&br#"{"schemaVersion": 1, "fsLayers": []}"#[..], "schema version 1"),
            (br#"not json"#, "not a manifest JSON"),
            (
                br#"{"schemaVersion": 2, "mediaType": "application/vnd.example+json"}"#,
                "application/vnd.example+json",
            ),
            (
                br#"{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}"#,
                "no config",
            ),
        ] {
            let error = parse_manifest(&reference(), body).err().unwrap().to_string();
            assert!(error.contains(needle), "{error}");
            assert!(error.contains("127.0.0.1:5000/x:1"), "{error}");
        }
    }

    #[test]
    fn plain_http_for_loopback_and_listed_registries() {
        let options = RegistryOptions {
            insecure_registries: vec!["registry.lan:5000".into()],
            ..RegistryOptions::default()
        };
        assert!(options.plain_http("127.0.0.1:5000"));
        assert!(options.plain_http("localhost"));
        assert!(options.plain_http("[::1]:1"));
        assert!(options.plain_http("registry.lan:5000"));
        assert!(!options.plain_http("registry.lan"));
        assert!(!options.plain_http("docker.io"));
    }

    #[test]
    fn client_futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let client = RegistryClient::new(RegistryOptions::default());
        let reference = reference();
        let resolve = client.resolve(&reference);
        assert_send(&resolve);
        let layer = Layer {
            digest: format!("sha256:{}", "0".repeat(64)),
            media_type: media_types::OCI_LAYER_GZIP.to_owned(),
            size: 1,
        };
        let fetch = client.fetch_layer(&reference, &layer, Path::new("x"), |_, _| {});
        assert_send(&fetch);
    }
}
