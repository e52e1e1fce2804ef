//! Registries for the OCI tests: Debian's real `docker-registry` (distribution 2.8) on a free
//! loopback port, optionally behind htpasswd basic auth; a tiny scripted HTTP server for the
//! failures a real registry will not produce; and builders that make test images (tar layers
//! compressed three ways, configs, manifests, indexes) and push them.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger::oci::{Layer, media_types};
use oci_client::secrets::RegistryAuth;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{find_program, require};

pub fn sha256(bytes: &[u8]) -> String {
    let hash = sha2::Sha256::digest(bytes);
    let hex: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256:{hex}")
}

/// A user for an htpasswd-protected registry.
#[derive(Debug, Clone)]
pub struct BasicUser {
    pub name: String,
    pub password: String,
}

/// A running `docker-registry serve`, killed on drop.
#[derive(Debug)]
pub struct RealRegistry {
    child: Child,
    /// `127.0.0.1:PORT`, as references write it.
    pub address: String,
    pub root: tempfile::TempDir,
}

impl RealRegistry {
    /// Starts a registry, or returns `None` (test skipped) when `docker-registry` is not
    /// installed, unless `BANGER_TEST_REQUIRE_ALL=1`.
    pub fn start(user: Option<&BasicUser>) -> Option<RealRegistry> {
        RealRegistry::start_with(user, false)
    }

    /// [`RealRegistry::start`] with the access log on: [`RealRegistry::blob_uploads`] counts
    /// from it.
    pub fn start_logging_requests() -> Option<RealRegistry> {
        RealRegistry::start_with(None, true)
    }

    fn start_with(user: Option<&BasicUser>, access_log: bool) -> Option<RealRegistry> {
        let binary = find_program("docker-registry");
        if !require(
            binary.is_some(),
            "docker-registry (Debian package `docker-registry`)",
        ) {
            return None;
        }
        let binary = binary.unwrap();
        let mut root = tempfile::tempdir().unwrap();
        let auth = match user {
            Some(user) => {
                let hash = bcrypt::hash_with_result(&user.password, 4)
                    .unwrap()
                    .format_for_version(bcrypt::Version::TwoA);
                let htpasswd = root.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{}:{hash}\n", user.name)).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        // Another user of the machine may take the port between probing and binding: retry.
        for _ in 0..5 {
            let port = free_port();
            let address = format!("127.0.0.1:{port}");
            let config = root.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: {}\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: {address}\n  secret: banger-test-secret\n{auth}",
                    !access_log,
                    root.path().join("storage").display()
                ),
            )
            .unwrap();
            let log_path = root.path().join("registry.log");
            let log = std::fs::File::create(&log_path).unwrap();
            let child = Command::new(&binary)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut registry = RealRegistry {
                child,
                address,
                root,
            };
            match registry.wait_ready(Duration::from_secs(15)) {
                Ok(()) => return Some(registry),
                Err(exited) => {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if exited && log.contains("address already in use") {
                        root = registry.take_root();
                        continue;
                    }
                    panic!(
                        "docker-registry did not come up on {}:\n{log}",
                        registry.address
                    );
                }
            }
        }
        panic!("no free loopback port for docker-registry after 5 tries");
    }

    /// Waits until `/v2/` answers; `Err(true)` when the process exited first.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), bool> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return Err(true);
            }
            // This registry, not another test's server that took the port first (then this
            // one exits with "address already in use" a moment later).
            if is_docker_registry(&self.address) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(false)
    }

    /// Moves the temp dir out of a registry that failed to start, for the next try.
    fn take_root(mut self) -> tempfile::TempDir {
        self.stop();
        std::mem::replace(&mut self.root, tempfile::tempdir().unwrap())
    }

    /// Blob uploads the registry completed into `repository` (the `PUT`s that end one), by
    /// its access log.
    pub fn blob_uploads(&self, repository: &str) -> Vec<String> {
        let marker = format!("\"PUT /v2/{repository}/blobs/uploads/");
        self.log()
            .lines()
            .filter(|line| line.contains(&marker) && line.contains("\" 201 "))
            .map(str::to_owned)
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("registry.log")).unwrap_or_default()
    }

    /// SIGTERM, a short grace period, then SIGKILL. Only ever our own child.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RealRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The status code of `GET path`, if anything answers HTTP.
pub fn http_status(address: &str, path: &str) -> Option<u16> {
    let mut stream =
        TcpStream::connect_timeout(&address.parse().ok()?, Duration::from_millis(200)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Whether a docker-registry answers at `address`: its `/v2/` answers carry
/// `Docker-Distribution-Api-Version`, which the tests' fake servers never send.
fn is_docker_registry(address: &str) -> bool {
    let Ok(socket) = address.parse() else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&socket, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if write!(stream, "GET /v2/ HTTP/1.0\r\nHost: {address}\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .to_ascii_lowercase()
        .contains("docker-distribution-api-version")
}

/// Pushes blobs and manifests with oci-client's push API.
pub struct Pusher {
    client: oci_client::Client,
    registry: String,
}

impl Pusher {
    pub async fn new(registry: &str, user: Option<&BasicUser>) -> Pusher {
        banger::oci::install_tls_provider();
        let client = oci_client::Client::try_from(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        })
        .unwrap();
        let auth = match user {
            Some(user) => RegistryAuth::Basic(user.name.clone(), user.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        client.store_auth_if_needed(registry, &auth).await;
        Pusher {
            client,
            registry: registry.to_owned(),
        }
    }

    fn reference(&self, repository: &str, tag: &str) -> oci_client::Reference {
        oci_client::Reference::with_tag(self.registry.clone(), repository.to_owned(), tag.into())
    }

    pub async fn blob(&self, repository: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        self.client
            .push_blob(&self.reference(repository, "x"), bytes.to_vec(), &digest)
            .await
            .unwrap();
        digest
    }

    /// Pushes a manifest under `tag` (or by digest when `None`); returns its digest.
    pub async fn manifest(
        &self,
        repository: &str,
        tag: Option<&str>,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let digest = sha256(body);
        let reference = oci_client::Reference::with_digest(
            self.registry.clone(),
            repository.to_owned(),
            digest.clone(),
        );
        let reference = match tag {
            Some(tag) => self.reference(repository, tag),
            None => reference,
        };
        self.client
            .push_manifest_raw(&reference, body.to_vec(), media_type.parse().unwrap())
            .await
            .unwrap();
        digest
    }
}

/// One layer of a test image: the blob as pushed and the tar it unpacks to.
#[derive(Debug, Clone)]
pub struct TestLayer {
    pub layer: Layer,
    pub blob: Vec<u8>,
    pub tar: Vec<u8>,
}

/// A pushed single-platform image.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub manifest_media_type: String,
    pub config_digest: String,
    pub config: Vec<u8>,
    pub layers: Vec<TestLayer>,
}

/// A tar with one file `name` holding `content`.
pub fn tar_with(name: &str, content: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder.append_data(&mut header, name, content).unwrap();
    builder.into_inner().unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// Layers compressed with gzip, zstd and not at all, in the OCI or the Docker media types.
pub fn three_layers(label: &str, docker: bool) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let (tar, gz, zst) = if docker {
        (
            media_types::DOCKER_LAYER_TAR,
            media_types::DOCKER_LAYER_GZIP,
            media_types::DOCKER_LAYER_ZSTD,
        )
    } else {
        (
            media_types::OCI_LAYER_TAR,
            media_types::OCI_LAYER_GZIP,
            media_types::OCI_LAYER_ZSTD,
        )
    };
    // Incompressible, and bigger than hyper's largest read buffer (about 400 KiB), so that
    // every fetch takes several reads and reports progress between them.
    let filler = |n: u64| {
        let mut rng = fastrand::Rng::with_seed(n + label.len() as u64 * 1000);
        let mut bytes = format!("{label} layer {n}\n").into_bytes();
        bytes.extend(std::iter::repeat_with(|| rng.u8(..)).take(1024 * 1024));
        bytes
    };
    let first = tar_with("etc/gzip-layer", &filler(1));
    let second = tar_with("etc/zstd-layer", &filler(2));
    let third = tar_with("etc/plain-layer", &filler(3));
    vec![
        (gz.to_owned(), gzip(&first), first),
        (zst.to_owned(), zstd(&second), second),
        (tar.to_owned(), third.clone(), third),
    ]
}

/// Pushes an image for `architecture` into `repository` (by digest, plus `tag` if given).
pub async fn push_image(
    pusher: &Pusher,
    repository: &str,
    tag: Option<&str>,
    architecture: &str,
    docker: bool,
) -> TestImage {
    push_layers(
        pusher,
        repository,
        tag,
        architecture,
        docker,
        three_layers(architecture, docker),
    )
    .await
}

/// Pushes an image made of `layers` (media type, blob, the tar it unpacks to).
pub async fn push_layers(
    pusher: &Pusher,
    repository: &str,
    tag: Option<&str>,
    architecture: &str,
    docker: bool,
    layer_blobs: Vec<(String, Vec<u8>, Vec<u8>)>,
) -> TestImage {
    let mut layers = Vec::new();
    for (media_type, blob, tar) in layer_blobs {
        let digest = pusher.blob(repository, &blob).await;
        layers.push(TestLayer {
            layer: Layer {
                digest,
                media_type,
                size: blob.len() as u64,
            },
            blob,
            tar,
        });
    }
    let diff_ids: Vec<String> = layers.iter().map(|layer| sha256(&layer.tar)).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = pusher.blob(repository, &config).await;
    let (manifest_type, config_type) = if docker {
        (media_types::DOCKER_MANIFEST, media_types::DOCKER_CONFIG)
    } else {
        (media_types::OCI_MANIFEST, media_types::OCI_CONFIG)
    };
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": config_digest, "size": config.len()},
        "layers": layers.iter().map(|layer| serde_json::json!({
            "mediaType": layer.layer.media_type,
            "digest": layer.layer.digest,
            "size": layer.layer.size,
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let manifest_digest = pusher
        .manifest(repository, tag, manifest_type, &manifest)
        .await;
    TestImage {
        manifest_digest,
        manifest_size: manifest.len() as u64,
        manifest_media_type: manifest_type.to_owned(),
        config_digest,
        config,
        layers,
    }
}

/// Pushes an index (OCI) or manifest list (Docker) of `images` with their architectures.
pub async fn push_index(
    pusher: &Pusher,
    repository: &str,
    tag: &str,
    images: &[(&TestImage, &str)],
    docker: bool,
) -> String {
    let media_type = if docker {
        media_types::DOCKER_MANIFEST_LIST
    } else {
        media_types::OCI_INDEX
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": images.iter().map(|(image, architecture)| serde_json::json!({
            "mediaType": image.manifest_media_type,
            "digest": image.manifest_digest,
            "size": image.manifest_size,
            "platform": {"architecture": architecture, "os": "linux"},
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    pusher
        .manifest(repository, Some(tag), media_type, &index)
        .await
}

/// What the fake registry sends for one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete response.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Declares `declared` bytes, sends `body`, then closes the connection.
    CutOff { declared: usize, body: Vec<u8> },
    /// A 200 with no `Content-Length`: `body`, then the connection closes (HTTP/1.0 style).
    Unannounced { body: Vec<u8> },
    /// Declares `declared` bytes, sends `body`, then neither sends more nor closes.
    StallAfter { declared: usize, body: Vec<u8> },
    /// Reads the request and never answers.
    Stall,
}

impl Reply {
    pub fn ok(content_type: &str, body: Vec<u8>) -> Reply {
        Reply::Full {
            status: 200,
            headers: vec![("Content-Type".into(), content_type.into())],
            body,
        }
    }

    pub fn status(status: u16) -> Reply {
        Reply::Full {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
}

/// One request to the fake registry.
#[derive(Debug, Clone)]
pub struct Request {
    /// Without the query string.
    pub path: String,
    /// How many requests for this path came before this one.
    pub nth: usize,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// A scripted HTTP/1.1 server on loopback. One request per connection. Stops on drop.
pub struct FakeRegistry {
    pub address: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeRegistry {
    /// `handler(path, n)` answers the `n`-th (0-based) request for `path`.
    pub async fn start(handler: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> Self {
        FakeRegistry::start_with_requests(move |request| handler(&request.path, request.nth)).await
    }

    /// `handler` sees the whole request head.
    pub async fn start_with_requests(
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let task = tokio::spawn({
            let counts = Arc::clone(&counts);
            async move {
                // Connection tasks live in the set, so stopping the server stops them too.
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((socket, _)) = listener.accept().await else {
                        return;
                    };
                    connections.spawn(serve(socket, Arc::clone(&handler), Arc::clone(&counts)));
                }
            }
        });
        FakeRegistry {
            address,
            counts,
            task,
        }
    }

    /// Requests seen for `path`.
    pub fn count(&self, path: &str) -> usize {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut socket: tokio::net::TcpStream,
    handler: Arc<Handler>,
    counts: Arc<Mutex<HashMap<String, usize>>>,
) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match socket.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/")
        .to_owned();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let nth = {
        let mut counts = counts.lock().unwrap();
        let count = counts.entry(path.clone()).or_default();
        *count += 1;
        *count - 1
    };
    let reply = handler(&Request { path, nth, headers });
    let (status, headers, declared, body) = match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => (status, headers, Some(body.len()), body),
        Reply::CutOff { declared, body } => (200, Vec::new(), Some(declared), body),
        Reply::Unannounced { body } => (200, Vec::new(), None, body),
        Reply::StallAfter { declared, body } => {
            let head = format!("HTTP/1.1 200 Fake\r\nContent-Length: {declared}\r\n\r\n");
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        Reply::Stall => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
    };
    let mut response = format!("HTTP/1.1 {status} Fake\r\nConnection: close\r\n");
    if let Some(declared) = declared {
        response.push_str(&format!("Content-Length: {declared}\r\n"));
    }
    for (name, value) in headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.write_all(&body).await;
    let _ = socket.shutdown().await;
}

/// Lists a directory's entries, for "nothing left behind" checks.
pub fn entries(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    found.sort();
    found
}
