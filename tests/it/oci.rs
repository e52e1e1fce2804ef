//! The OCI registry client against a real registry (Debian's `docker-registry`, skipped when
//! missing unless `BANGER_TEST_REQUIRE_ALL=1`) and against a scripted fake for the failures a
//! real registry will not produce. Every image is built and pushed by the test itself.

use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;

use banger::oci::{
    ImageReference, Layer, OciError, RegistryClient, RegistryOptions, ResolvedImage, RetryPolicy,
    docker_config_path, layer_reader, media_types,
};

use crate::registry::{
    BasicUser, FakeRegistry, Pusher, RealRegistry, Reply, Request, TestImage, entries, push_image,
    push_index, sha256,
};

fn reference(text: &str) -> ImageReference {
    ImageReference::parse(text).unwrap()
}

fn fast_options() -> RegistryOptions {
    RegistryOptions {
        retry: RetryPolicy::fast(3),
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(5),
        ..RegistryOptions::default()
    }
}

fn client() -> RegistryClient {
    RegistryClient::new(fast_options())
}

fn assert_matches_image(resolved: &ResolvedImage, image: &TestImage) {
    assert_eq!(resolved.manifest_digest, image.manifest_digest);
    assert_eq!(
        resolved.reference.digest(),
        Some(image.manifest_digest.as_str())
    );
    assert_eq!(resolved.config_digest, image.config_digest);
    assert_eq!(resolved.config_size, image.config.len() as u64);
    let expected: Vec<&Layer> = image.layers.iter().map(|layer| &layer.layer).collect();
    let actual: Vec<&Layer> = resolved.layers.iter().collect();
    assert_eq!(actual, expected);
}

#[tokio::test]
async fn resolves_tags_indexes_and_digests_in_a_real_registry() {
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    let host = &registry.address;
    let pusher = Pusher::new(host, None).await;
    let amd64 = push_image(&pusher, "demo", Some("amd64-only"), "amd64", false).await;
    let arm64 = push_image(&pusher, "demo", Some("arm64-only"), "arm64", false).await;
    let index = push_index(
        &pusher,
        "demo",
        "multi",
        &[(&arm64, "arm64"), (&amd64, "amd64")],
        false,
    )
    .await;
    push_index(&pusher, "demo", "arm-index", &[(&arm64, "arm64")], false).await;
    let docker_amd64 = push_image(&pusher, "dockerish", None, "amd64", true).await;
    let docker_arm64 = push_image(&pusher, "dockerish", None, "arm64", true).await;
    push_index(
        &pusher,
        "dockerish",
        "latest",
        &[(&docker_arm64, "arm64"), (&docker_amd64, "amd64")],
        true,
    )
    .await;
    let client = client();

    // A tag naming one manifest.
    let resolved = client
        .resolve(&reference(&format!("{host}/demo:amd64-only")))
        .await
        .unwrap();
    assert_matches_image(&resolved, &amd64);
    assert_eq!(resolved.reference.tag(), Some("amd64-only"));

    // An OCI index: the amd64 entry, and its digest, not the index's.
    let resolved = client
        .resolve(&reference(&format!("{host}/demo:multi")))
        .await
        .unwrap();
    assert_matches_image(&resolved, &amd64);
    assert_ne!(resolved.manifest_digest, index);

    // A Docker manifest list, reached through the implicit :latest.
    let resolved = client
        .resolve(&reference(&format!("{host}/dockerish")))
        .await
        .unwrap();
    assert_matches_image(&resolved, &docker_amd64);
    assert!(
        resolved.layers[0]
            .media_type
            .starts_with("application/vnd.docker.image.rootfs.diff.tar")
    );

    // By digest: of the manifest, of the index, and with a tag that does not exist (a digest
    // reference never consults its tag).
    for text in [
        format!("{host}/demo@{}", amd64.manifest_digest),
        format!("{host}/demo@{index}"),
        format!("{host}/demo:no-such-tag@{}", amd64.manifest_digest),
    ] {
        let resolved = client.resolve(&reference(&text)).await.unwrap();
        assert_matches_image(&resolved, &amd64);
    }

    // Pinned: the lock entry resolves again by digest, and converts back without the network.
    let written = format!("{host}/demo:multi");
    let pin = client
        .resolve(&reference(&written))
        .await
        .unwrap()
        .pin(&written);
    let again = client.resolve_pinned(&pin).await.unwrap();
    assert_matches_image(&again, &amd64);
    assert_eq!(ResolvedImage::from_pinned(&pin).unwrap(), again);

    // The wrong platform: a lone arm64 manifest, and an index with no amd64 entry.
    let error = client
        .resolve(&reference(&format!("{host}/demo:arm64-only")))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, OciError::WrongPlatform { platform, .. } if platform == "linux/arm64"),
        "{error}"
    );
    let error = client
        .resolve(&reference(&format!("{host}/demo:arm-index")))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(error, OciError::NoMatchingPlatform { .. }),
        "{text}"
    );
    assert!(text.contains("no linux/amd64 image"), "{text}");
    assert!(text.contains("linux/arm64"), "{text}");
    assert!(text.contains(&format!("{host}/demo:arm-index")), "{text}");
}

#[tokio::test]
async fn fetches_gzip_zstd_and_plain_layers_verified_with_progress() {
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    let host = &registry.address;
    let pusher = Pusher::new(host, None).await;
    let image = push_image(&pusher, "layers", Some("v1"), "amd64", false).await;
    let client = client();
    let resolved = client
        .resolve(&reference(&format!("{host}/layers:v1")))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (index, (layer, expected)) in resolved.layers.iter().zip(&image.layers).enumerate() {
        let destination = dir.path().join(format!("layer-{index}"));
        let reports = Mutex::new(Vec::new());
        client
            .fetch_layer(&resolved.reference, layer, &destination, |done, total| {
                reports.lock().unwrap().push((done, total))
            })
            .await
            .unwrap();
        let blob = std::fs::read(&destination).unwrap();
        assert_eq!(blob, expected.blob, "layer {index} bytes");
        assert_eq!(sha256(&blob), layer.digest);

        let reports = reports.into_inner().unwrap();
        assert_eq!(reports.first(), Some(&(0, layer.size)));
        assert_eq!(reports.last(), Some(&(layer.size, layer.size)));
        assert!(reports.windows(2).all(|pair| pair[0].0 <= pair[1].0));
        assert!(reports.len() > 2, "progress is reported while streaming");

        let mut tar = Vec::new();
        layer_reader(
            &layer.media_type,
            std::fs::File::open(&destination).unwrap(),
        )
        .unwrap()
        .read_to_end(&mut tar)
        .unwrap();
        assert_eq!(
            tar, expected.tar,
            "layer {index} ({}) unpacks",
            layer.media_type
        );
    }
    let compressions: Vec<_> = resolved.layers.iter().map(Layer::compression).collect();
    use banger::oci::Compression;
    assert_eq!(
        compressions,
        [
            Some(Compression::Gzip),
            Some(Compression::Zstd),
            Some(Compression::None)
        ]
    );
    assert_eq!(
        entries(dir.path()).len(),
        3,
        "only the three layers, no partial files"
    );
    assert_eq!(client.fetch_config(&resolved).await.unwrap(), image.config);
}

#[tokio::test]
async fn missing_tags_repositories_and_blobs_are_not_found() {
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    let host = &registry.address;
    let pusher = Pusher::new(host, None).await;
    push_image(&pusher, "present", Some("v1"), "amd64", false).await;
    let client = client();
    for text in [format!("{host}/present:nope"), format!("{host}/absent:v1")] {
        let error = client.resolve(&reference(&text)).await.unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, OciError::ManifestNotFound { .. }),
            "{message}"
        );
        assert!(message.contains(&text), "{message}");
        assert!(message.contains("not found"), "{message}");
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = Layer {
        digest: sha256(b"never pushed"),
        media_type: media_types::OCI_LAYER_GZIP.to_owned(),
        size: 12,
    };
    let error = client
        .fetch_layer(
            &reference(&format!("{host}/present:v1")),
            &missing,
            &dir.path().join("blob"),
            |_, _| {},
        )
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, OciError::BlobNotFound { .. }), "{message}");
    assert!(message.contains(&missing.digest), "{message}");
    assert!(message.contains(&format!("{host}/present:v1")), "{message}");
    assert!(entries(dir.path()).is_empty());
}

#[tokio::test]
async fn basic_auth_from_the_docker_config() {
    let user = BasicUser {
        name: "alice".into(),
        password: "correct-horse".into(),
    };
    let Some(registry) = RealRegistry::start(Some(&user)) else {
        return;
    };
    let host = &registry.address;
    let pusher = Pusher::new(host, Some(&user)).await;
    let image = push_image(&pusher, "private", Some("v1"), "amd64", false).await;
    let text = format!("{host}/private:v1");

    let with_config = |config: serde_json::Value| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let options = RegistryOptions {
            docker_config: docker_config_path(Some(dir.path().to_owned()), None),
            ..fast_options()
        };
        (dir, RegistryClient::new(options))
    };
    let encoded = |user: &str, password: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    };

    // Right credentials, as `docker login` writes them.
    let (_dir, client) = with_config(serde_json::json!({
        "auths": {format!("https://{host}"): {"auth": encoded("alice", "correct-horse")}}
    }));
    let resolved = client.resolve(&reference(&text)).await.unwrap();
    assert_matches_image(&resolved, &image);
    let blobs = tempfile::tempdir().unwrap();
    let destination = blobs.path().join("layer");
    client
        .fetch_layer(
            &resolved.reference,
            &resolved.layers[0],
            &destination,
            |_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(std::fs::read(&destination).unwrap(), image.layers[0].blob);

    // No entry for this registry: anonymous, refused, and told how to fix it.
    let (dir, client) = with_config(serde_json::json!({"auths": {}}));
    let error = client.resolve(&reference(&text)).await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, OciError::Unauthorized { .. }), "{message}");
    assert!(message.contains("not authorized"), "{message}");
    assert!(message.contains(&text), "{message}");
    assert!(message.contains("anonymous"), "{message}");
    assert!(
        message.contains(&format!("docker login {host}")),
        "{message}"
    );
    assert!(
        message.contains(&dir.path().join("config.json").display().to_string()),
        "{message}"
    );

    // A wrong password: 401, names the user and the file, never the password.
    let (_dir, client) = with_config(serde_json::json!({
        "auths": {host.clone(): {"username": "alice", "password": "wrong-staple"}}
    }));
    let error = client.resolve(&reference(&text)).await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, OciError::Unauthorized { .. }), "{message}");
    assert!(message.contains("HTTP 401"), "{message}");
    assert!(message.contains("user `alice`"), "{message}");
    assert!(!message.contains("wrong-staple"), "{message}");
    let error = client
        .fetch_layer(
            &resolved.reference,
            &resolved.layers[0],
            &blobs.path().join("denied"),
            |_, _| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(error, OciError::Unauthorized { .. }), "{error}");
    assert_eq!(entries(blobs.path()), [destination]);
}

/// Docker credential helpers against a real registry with basic auth: `credHelpers` for the
/// registry, then `credsStore`, run as `docker-credential-NAME get` with the server on stdin;
/// a helper with nothing for the server means anonymous; a missing one is an error naming it.
#[tokio::test]
async fn credentials_from_a_docker_credential_helper() {
    use std::os::unix::fs::PermissionsExt;
    let user = BasicUser {
        name: "carol".into(),
        password: "helper-secret".into(),
    };
    let Some(registry) = RealRegistry::start(Some(&user)) else {
        return;
    };
    let host = registry.address.clone();
    let pusher = Pusher::new(&host, Some(&user)).await;
    let image = push_image(&pusher, "helped", Some("v1"), "amd64", false).await;
    let text = format!("{host}/helped:v1");

    // Two helpers: `test` knows this registry (and notes what it was asked), `empty` knows
    // nothing. Found through the client's helper PATH, not this process's.
    let bin = tempfile::tempdir().unwrap();
    let asked = bin.path().join("asked");
    let write_helper = |name: &str, body: &str| {
        let path = bin.path().join(format!("docker-credential-{name}"));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_helper(
        "test",
        &format!(
            "[ \"$1\" = get ] || exit 2\nread -r server\necho \"$server\" > '{}'\n\
             [ \"$server\" = '{host}' ] || {{ echo 'credentials not found in native keychain'; \
             exit 1; }}\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"carol\",\
             \"Secret\":\"helper-secret\"}}' \"$server\"",
            asked.display()
        ),
    );
    write_helper(
        "empty",
        "echo 'credentials not found in native keychain'; exit 1",
    );
    let with_config = |config: serde_json::Value| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let options = RegistryOptions {
            docker_config: docker_config_path(Some(dir.path().to_owned()), None),
            credential_helper_path: Some(bin.path().as_os_str().to_owned()),
            ..fast_options()
        };
        (dir, RegistryClient::new(options))
    };

    // credHelpers names the helper for this registry (over a credsStore that knows nothing).
    let (_dir, client) = with_config(serde_json::json!({
        "credsStore": "empty",
        "credHelpers": {host.clone(): "test"},
        "auths": {host.clone(): {}}
    }));
    let resolved = client.resolve(&reference(&text)).await.unwrap();
    assert_matches_image(&resolved, &image);
    assert_eq!(std::fs::read_to_string(&asked).unwrap().trim(), host);

    // credsStore alone serves every registry.
    let (_dir, client) = with_config(serde_json::json!({"credsStore": "test"}));
    client.resolve(&reference(&text)).await.unwrap();

    // A helper with nothing for the registry: anonymous, refused, told so.
    let (_dir, client) = with_config(serde_json::json!({"credsStore": "empty"}));
    let error = client.resolve(&reference(&text)).await.unwrap_err();
    assert!(matches!(error, OciError::Unauthorized { .. }), "{error}");
    assert!(error.to_string().contains("anonymous"), "{error}");

    // Podman's auth.json is read first; an entry there wins, none there means Docker's.
    let podman = tempfile::tempdir().unwrap();
    let auth_file = podman.path().join("auth.json");
    let with_both = |podman_config: serde_json::Value, docker_config: serde_json::Value| {
        std::fs::write(&auth_file, podman_config.to_string()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), docker_config.to_string()).unwrap();
        let options = RegistryOptions {
            docker_config: docker_config_path(Some(dir.path().to_owned()), None),
            containers_auth: Some(auth_file.clone()),
            credential_helper_path: Some(bin.path().as_os_str().to_owned()),
            ..fast_options()
        };
        (dir, RegistryClient::new(options))
    };
    let (_dir, client) = with_both(
        serde_json::json!({"auths": {host.clone(): {"username": "carol", "password": "helper-secret"}}}),
        serde_json::json!({"auths": {host.clone(): {"username": "carol", "password": "wrong"}}}),
    );
    client.resolve(&reference(&text)).await.unwrap();
    let (_dir, client) = with_both(
        serde_json::json!({"auths": {}}),
        serde_json::json!({"credsStore": "test"}),
    );
    client.resolve(&reference(&text)).await.unwrap();

    // A helper that is not installed: an error naming it and the config file.
    let (dir, client) = with_config(serde_json::json!({"credsStore": "absent"}));
    let error = client.resolve(&reference(&text)).await.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, OciError::CredentialHelper { .. }),
        "{message}"
    );
    assert!(
        message.contains("docker-credential-absent get"),
        "{message}"
    );
    assert!(
        message.contains(&dir.path().join("config.json").display().to_string()),
        "{message}"
    );
}

/// Registry requests go through `HTTP_PROXY`'s proxy (here a loopback server that answers
/// 404 to everything and notes what it was asked), unless `NO_PROXY` names the registry. The
/// registry's name resolves nowhere, so only the proxy can have answered.
#[tokio::test]
async fn registry_requests_go_through_the_proxy_unless_no_proxy_names_the_registry() {
    let proxy = FakeRegistry::start(|_, _| Reply::status(404)).await;
    let registry = "registry.invalid:5000";
    let text = format!("{registry}/team/app:v1");
    let client = |no_proxy: Option<&str>| {
        RegistryClient::new(RegistryOptions {
            insecure_registries: vec![registry.to_owned()],
            proxies: banger::oci::Proxies {
                http: Some(format!("http://{}", proxy.address)),
                https: None,
                no_proxy: no_proxy.map(str::to_owned),
            },
            ..fast_options()
        })
    };
    let asked = format!("http://{registry}/v2/team/app/manifests/v1");

    let error = client(None).resolve(&reference(&text)).await.unwrap_err();
    assert!(
        matches!(error, OciError::ManifestNotFound { .. }),
        "{error}"
    );
    assert!(
        proxy.count(&asked) >= 1,
        "the proxy was not asked for {asked}"
    );

    let before = proxy.count(&asked);
    let error = client(Some("example.org,registry.invalid"))
        .resolve(&reference(&text))
        .await
        .unwrap_err();
    assert!(
        !matches!(error, OciError::ManifestNotFound { .. }),
        "{error}"
    );
    assert_eq!(proxy.count(&asked), before, "NO_PROXY was not honoured");
}

/// A fake registry holding one amd64 image whose config and manifest are served faithfully
/// and whose single layer is served by `layer`.
pub(crate) struct FakeImage {
    pub(crate) server: FakeRegistry,
    pub(crate) layer: Layer,
    blob: Vec<u8>,
    layer_path: String,
}

impl FakeImage {
    pub(crate) async fn start(
        layer_reply: impl Fn(&[u8], usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        FakeImage::start_gated(layer_reply, |_| None).await
    }

    /// Like [`FakeImage::start`], with `gate` answering first whenever it returns a reply.
    async fn start_gated(
        layer_reply: impl Fn(&[u8], usize) -> Reply + Send + Sync + 'static,
        gate: impl Fn(&Request) -> Option<Reply> + Send + Sync + 'static,
    ) -> Self {
        let mut rng = fastrand::Rng::with_seed(7);
        let content: Vec<u8> = std::iter::repeat_with(|| rng.u8(..))
            .take(200_000)
            .collect();
        let blob = crate::registry::gzip(&crate::registry::tar_with("etc/x", &content));
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let layer = Layer {
            digest: sha256(&blob),
            media_type: media_types::OCI_LAYER_GZIP.to_owned(),
            size: blob.len() as u64,
        };
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_types::OCI_MANIFEST,
            "config": {"mediaType": media_types::OCI_CONFIG, "digest": sha256(&config), "size": config.len()},
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}],
        }))
        .unwrap();
        let manifest_path = "/v2/x/manifests/v1".to_owned();
        let layer_path = format!("/v2/x/blobs/{}", layer.digest);
        let config_path = format!("/v2/x/blobs/{}", sha256(&config));
        let server = FakeRegistry::start_with_requests({
            let (manifest_path, layer_path, blob) =
                (manifest_path.clone(), layer_path.clone(), blob.clone());
            move |request| {
                if let Some(reply) = gate(request) {
                    return reply;
                }
                let (path, nth) = (request.path.as_str(), request.nth);
                if path == "/v2/" {
                    Reply::ok("application/json", b"{}".to_vec())
                } else if path == manifest_path {
                    Reply::ok(media_types::OCI_MANIFEST, manifest.clone())
                } else if path == config_path {
                    Reply::ok("application/octet-stream", config.clone())
                } else if path == layer_path {
                    layer_reply(&blob, nth)
                } else {
                    Reply::status(404)
                }
            }
        })
        .await;
        FakeImage {
            server,
            layer,
            blob,
            layer_path,
        }
    }

    fn reference(&self) -> ImageReference {
        reference(&format!("{}/x:v1", self.server.address))
    }

    /// Resolves through the fake, then fetches its layer into an empty directory.
    async fn fetch(&self, client: &RegistryClient) -> (tempfile::TempDir, Result<(), OciError>) {
        let resolved = client.resolve(&self.reference()).await.unwrap();
        assert_eq!(resolved.layers, std::slice::from_ref(&self.layer));
        let dir = tempfile::tempdir().unwrap();
        let result = client
            .fetch_layer(
                &resolved.reference,
                &self.layer,
                &dir.path().join("layer"),
                |_, _| {},
            )
            .await;
        (dir, result)
    }
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_digest_leaves_nothing() {
    let fake = FakeImage::start(|blob, _| {
        let mut corrupted = blob.to_vec();
        corrupted[100] ^= 0xff;
        Reply::ok("application/octet-stream", corrupted)
    })
    .await;
    let (dir, result) = fake.fetch(&client()).await;
    let error = result.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, OciError::BlobDigestMismatch { .. }),
        "{message}"
    );
    assert!(message.contains(&fake.layer.digest), "{message}");
    assert!(message.contains(&fake.reference().name()), "{message}");
    assert!(entries(dir.path()).is_empty());
    assert_eq!(fake.server.count(&fake.layer_path), 1, "never retried");
}

#[tokio::test]
async fn a_truncated_blob_leaves_nothing() {
    // The server admits to the short length.
    let fake = FakeImage::start(|blob, _| {
        Reply::ok("application/octet-stream", blob[..blob.len() / 2].to_vec())
    })
    .await;
    let (dir, result) = fake.fetch(&client()).await;
    let error = result.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, OciError::BlobTruncated { .. }), "{message}");
    assert!(message.contains(&fake.layer.digest), "{message}");
    assert!(message.contains("truncated"), "{message}");
    assert!(entries(dir.path()).is_empty());

    // The connection drops midway through the declared length: transient, retried, then
    // given up on.
    let fake = FakeImage::start(|blob, _| Reply::CutOff {
        declared: blob.len(),
        body: blob[..blob.len() / 2].to_vec(),
    })
    .await;
    let (dir, result) = fake.fetch(&client()).await;
    let error = result.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, OciError::Transient { .. }), "{message}");
    assert!(message.contains(&fake.layer.digest), "{message}");
    assert!(entries(dir.path()).is_empty());
    assert_eq!(fake.server.count(&fake.layer_path), 3);

    // A blob larger than declared is cut short, not written out.
    let fake = FakeImage::start(|blob, _| {
        let mut longer = blob.to_vec();
        longer.extend_from_slice(&[0; 10]);
        Reply::ok("application/octet-stream", longer)
    })
    .await;
    let (dir, result) = fake.fetch(&client()).await;
    let error = result.unwrap_err();
    assert!(matches!(error, OciError::BlobTooLarge { .. }), "{error}");
    assert!(entries(dir.path()).is_empty());
}

#[tokio::test]
async fn server_errors_are_retried_then_reported_as_transient() {
    let server = FakeRegistry::start(|_, _| Reply::status(500)).await;
    let client = client();
    let text = format!("{}/x:v1", server.address);
    let error = client.resolve(&reference(&text)).await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, OciError::Transient { .. }), "{message}");
    assert!(message.contains("transient"), "{message}");
    assert!(message.contains("retried 2 time(s)"), "{message}");
    assert!(message.contains("HTTP 500"), "{message}");
    assert!(message.contains(&text), "{message}");
    assert_eq!(server.count("/v2/x/manifests/v1"), 3);

    let dir = tempfile::tempdir().unwrap();
    let layer = Layer {
        digest: sha256(b"layer"),
        media_type: media_types::OCI_LAYER_TAR.to_owned(),
        size: 5,
    };
    let error = client
        .fetch_layer(&reference(&text), &layer, &dir.path().join("l"), |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(error, OciError::Transient { .. }), "{error}");
    assert!(error.to_string().contains(&layer.digest), "{error}");
    assert!(entries(dir.path()).is_empty());
}

#[tokio::test]
async fn too_many_requests_is_retried_until_it_succeeds() {
    let fake = FakeImage::start(|blob, nth| match nth {
        0 => Reply::status(429),
        _ => Reply::ok("application/octet-stream", blob.to_vec()),
    })
    .await;
    let (dir, result) = fake.fetch(&client()).await;
    result.unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("layer")).unwrap(),
        fake.blob,
        "the retried fetch wrote the whole blob"
    );
    assert_eq!(entries(dir.path()), [dir.path().join("layer")]);
    assert_eq!(fake.server.count(&fake.layer_path), 2);

    // The same for the manifest, with the registry's JSON error body.
    let server = FakeRegistry::start(|path, nth| {
        if path.contains("/manifests/") && nth == 0 {
            return Reply::Full {
                status: 429,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#.to_vec(),
            };
        }
        Reply::status(404)
    })
    .await;
    let error = client()
        .resolve(&reference(&format!("{}/x:v1", server.address)))
        .await
        .unwrap_err();
    assert!(
        matches!(error, OciError::ManifestNotFound { .. }),
        "a 429 was retried, and the retry's 404 reported: {error}"
    );
    assert_eq!(server.count("/v2/x/manifests/v1"), 2);
}

#[tokio::test]
async fn unauthorized_is_reported_without_retrying() {
    let server = FakeRegistry::start(|_, _| Reply::Full {
        status: 401,
        headers: vec![("WWW-Authenticate".into(), "Basic realm=\"fake\"".into())],
        body: Vec::new(),
    })
    .await;
    let client = client();
    let text = format!("{}/x:v1", server.address);
    let error = client.resolve(&reference(&text)).await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, OciError::Unauthorized { .. }), "{message}");
    assert!(message.contains(&text), "{message}");
    assert!(message.contains("anonymous"), "{message}");
    assert_eq!(server.count("/v2/x/manifests/v1"), 1);

    let dir = tempfile::tempdir().unwrap();
    let layer = Layer {
        digest: sha256(b"layer"),
        media_type: media_types::OCI_LAYER_ZSTD.to_owned(),
        size: 5,
    };
    let error = client
        .fetch_layer(&reference(&text), &layer, &dir.path().join("l"), |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(error, OciError::Unauthorized { .. }), "{error}");
    assert!(entries(dir.path()).is_empty());
}

#[tokio::test]
async fn a_stalled_transfer_times_out_and_is_retried() {
    let fake = FakeImage::start(|_, _| Reply::Stall).await;
    let client = RegistryClient::new(RegistryOptions {
        read_timeout: Duration::from_millis(300),
        retry: RetryPolicy::fast(2),
        ..fast_options()
    });
    let (dir, result) = fake.fetch(&client).await;
    let error = result.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, OciError::Transient { .. }), "{message}");
    assert!(message.contains("retried 1 time(s)"), "{message}");
    assert!(entries(dir.path()).is_empty());
    assert_eq!(fake.server.count(&fake.layer_path), 2);
}

#[tokio::test]
async fn a_dropped_fetch_leaves_nothing() {
    let fake = FakeImage::start(|_, _| Reply::Stall).await;
    let client = client();
    let resolved = client.resolve(&fake.reference()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let destination = dir.path().join("layer");
    let fetch = client.fetch_layer(&resolved.reference, &fake.layer, &destination, |_, _| {});
    let outcome = tokio::time::timeout(Duration::from_millis(300), fetch).await;
    assert!(outcome.is_err(), "the fetch was still waiting");
    assert!(
        entries(dir.path()).is_empty(),
        "dropping the future removed the partial file"
    );
}

#[tokio::test]
async fn bearer_tokens_come_from_the_challenge_realm_with_docker_config_credentials() {
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:pw")
    );
    let fake = FakeImage::start_gated(
        |blob, _| Reply::ok("application/octet-stream", blob.to_vec()),
        move |request| {
            if request.path == "/token" {
                // The credentials go to the token service, which swaps them for a token.
                return Some(if request.header("authorization") == Some(basic.as_str()) {
                    Reply::ok("application/json", br#"{"token": "tok-123"}"#.to_vec())
                } else {
                    Reply::status(401)
                });
            }
            if request.header("authorization") == Some("Bearer tok-123") {
                return None;
            }
            let realm = format!(
                "http://{}/token",
                request.header("host").unwrap_or_default()
            );
            Some(Reply::Full {
                status: 401,
                headers: vec![(
                    "WWW-Authenticate".into(),
                    format!("Bearer realm=\"{realm}\",service=\"fake\""),
                )],
                body: Vec::new(),
            })
        },
    )
    .await;
    let config_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        config_dir.path().join("config.json"),
        serde_json::json!({"auths": {fake.server.address.clone(): {"username": "alice", "password": "pw"}}})
            .to_string(),
    )
    .unwrap();
    let with_credentials = RegistryClient::new(RegistryOptions {
        docker_config: docker_config_path(Some(config_dir.path().to_owned()), None),
        ..fast_options()
    });
    let (dir, result) = fake.fetch(&with_credentials).await;
    result.unwrap();
    assert_eq!(std::fs::read(dir.path().join("layer")).unwrap(), fake.blob);
    assert_eq!(
        fake.server.count("/token"),
        1,
        "one token served the manifest, the config and the layer"
    );

    // Anonymous: the token service refuses, and so does the registry.
    let error = client().resolve(&fake.reference()).await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, OciError::Unauthorized { .. }), "{message}");
    assert!(message.contains("anonymous"), "{message}");
}

/// A manifest is read with a cap, announced or not, and its bytes must match the digest the
/// registry gives for them.
#[tokio::test]
async fn oversized_and_mislabelled_manifests_are_refused() {
    let oversized = vec![b' '; (banger::oci::MAX_MANIFEST_SIZE + 1) as usize];
    let server = FakeRegistry::start(move |path, _| match path {
        "/v2/announced/manifests/v1" => Reply::ok(media_types::OCI_MANIFEST, oversized.clone()),
        "/v2/unannounced/manifests/v1" => Reply::Unannounced {
            body: oversized.clone(),
        },
        "/v2/mislabelled/manifests/v1" => Reply::Full {
            status: 200,
            headers: vec![
                ("Content-Type".into(), media_types::OCI_MANIFEST.into()),
                ("Docker-Content-Digest".into(), sha256(b"other bytes")),
            ],
            body: b"{}".to_vec(),
        },
        _ => Reply::status(200),
    })
    .await;
    let client = client();
    for repository in ["announced", "unannounced"] {
        let text = format!("{}/{repository}:v1", server.address);
        let error = client.resolve(&reference(&text)).await.unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, OciError::ManifestTooLarge { .. }),
            "{message}"
        );
        assert!(message.contains(&text), "{message}");
        assert!(message.contains("4194304 bytes"), "{message}");
        assert_eq!(
            server.count(&format!("/v2/{repository}/manifests/v1")),
            1,
            "never retried"
        );
    }
    let text = format!("{}/mislabelled:v1", server.address);
    let error = client.resolve(&reference(&text)).await.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, OciError::ManifestDigestMismatch { .. }),
        "{message}"
    );
    assert!(message.contains(&sha256(b"other bytes")), "{message}");
}
