//! Verified downloads against real HTTP servers on loopback: the scripted server of the OCI
//! tests for faults (5xx then success, 404, bodies cut off, wrong bytes, stalls), Python's
//! `http.server` as an independent implementation, and `file://` sources. After every
//! failure the destination directory must be empty.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger::fetch::{Expected, FetchError, FetchOptions, Fetcher};
use banger::oci::RetryPolicy;
use tokio_util::sync::CancellationToken;

use crate::registry::{FakeRegistry, Reply, entries, free_port, http_status};
use crate::support::{capable, find_program, sha256_hex};

const PATH: &str = "/bundles/image.tar.zst";

/// Whether an error is the one a case expects.
type IsExpected = fn(&FetchError) -> bool;

fn fetcher() -> Fetcher {
    Fetcher::new(FetchOptions {
        retry: RetryPolicy::fast(3),
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_millis(500),
        ..FetchOptions::default()
    })
    .unwrap()
}

/// A few MiB, so progress is reported more than once.
fn body() -> Vec<u8> {
    (0..3 * 1024 * 1024 + 17u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn expected(body: &[u8]) -> Expected {
    Expected {
        sha256: sha256_hex(body),
        size: Some(body.len() as u64),
    }
}

/// A destination in a directory of its own, so "nothing left behind" is easy to check.
struct Destination {
    dir: tempfile::TempDir,
}

impl Destination {
    fn new() -> Destination {
        Destination {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("image.tar.zst")
    }

    fn assert_empty(&self, after: &dyn std::fmt::Display) {
        let left = entries(self.dir.path());
        assert!(left.is_empty(), "after `{after}`, left behind: {left:?}");
    }
}

async fn fetch(url: &str, expected: &Expected, dest: &Path) -> Result<(), FetchError> {
    fetcher()
        .fetch_verified(url, expected, dest, |_, _| {}, &CancellationToken::new())
        .await
}

#[tokio::test]
async fn a_download_is_verified_and_lands_whole() {
    let content = body();
    let server = FakeRegistry::start({
        let content = content.clone();
        move |_, _| Reply::ok("application/zstd", content.clone())
    })
    .await;
    let url = format!("http://{}{PATH}", server.address);
    let destination = Destination::new();
    let reports = Arc::new(Mutex::new(Vec::new()));
    fetcher()
        .fetch_verified(
            &url,
            &expected(&content),
            &destination.path(),
            {
                let reports = Arc::clone(&reports);
                move |done, total| reports.lock().unwrap().push((done, total))
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(std::fs::read(destination.path()).unwrap() == content);
    assert_eq!(entries(destination.dir.path()), [destination.path()]);
    let reports = reports.lock().unwrap().clone();
    let total = Some(content.len() as u64);
    assert_eq!(reports.first(), Some(&(0, total)));
    assert_eq!(reports.last(), Some(&(content.len() as u64, total)));
    assert!(reports.len() >= 3, "{reports:?}");
    assert_eq!(server.count(PATH), 1);

    // A second download replaces the first; without a size, only the digest is checked.
    let digest_only = Expected {
        sha256: format!("sha256:{}", sha256_hex(&content).to_uppercase()),
        size: None,
    };
    fetch(&url, &digest_only, &destination.path())
        .await
        .unwrap();
    assert_eq!(entries(destination.dir.path()), [destination.path()]);
}

/// A download from a host that resolves nowhere lands, verified, through `HTTP_PROXY`'s
/// proxy (a loopback server that serves the file for the absolute URL it is asked for).
#[tokio::test]
async fn a_download_goes_through_the_proxy() {
    let content = body();
    let proxy = FakeRegistry::start({
        let content = content.clone();
        move |_, _| Reply::ok("application/zstd", content.clone())
    })
    .await;
    let url = format!("http://downloads.invalid{PATH}");
    let through_proxy = Fetcher::new(FetchOptions {
        retry: RetryPolicy::fast(2),
        proxies: banger::oci::Proxies {
            http: Some(format!("http://{}", proxy.address)),
            ..banger::oci::Proxies::default()
        },
        ..FetchOptions::default()
    })
    .unwrap();
    let destination = Destination::new();
    through_proxy
        .fetch_verified(
            &url,
            &expected(&content),
            &destination.path(),
            |_, _| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(std::fs::read(destination.path()).unwrap() == content);
    assert_eq!(proxy.count(&url), 1);
}

#[tokio::test]
async fn transient_statuses_are_retried() {
    let content = body();
    let server = FakeRegistry::start({
        let content = content.clone();
        move |_, nth| match nth {
            0 => Reply::status(500),
            1 => Reply::status(429),
            _ => Reply::ok("application/zstd", content.clone()),
        }
    })
    .await;
    let destination = Destination::new();
    let url = format!("http://{}{PATH}", server.address);
    fetch(&url, &expected(&content), &destination.path())
        .await
        .unwrap();
    assert_eq!(server.count(PATH), 3);
    assert!(std::fs::read(destination.path()).unwrap() == content);

    // Always failing: the policy's three attempts, then an error that says what to do.
    let server = FakeRegistry::start(|_, _| Reply::status(503)).await;
    let url = format!("http://{}{PATH}", server.address);
    let destination = Destination::new();
    let error = fetch(&url, &expected(&content), &destination.path())
        .await
        .unwrap_err();
    assert!(
        matches!(error, FetchError::Transient { retries: 2, .. }),
        "{error}"
    );
    let text = error.to_string();
    assert!(text.contains(&url) && text.contains("503"), "{text}");
    assert!(text.contains("try again"), "{text}");
    assert_eq!(server.count(PATH), 3);
    destination.assert_empty(&error);
}

#[tokio::test]
async fn a_body_cut_off_before_its_content_length_is_retried() {
    let content = body();
    let half = content[..content.len() / 2].to_vec();
    let server = FakeRegistry::start({
        let (content, half) = (content.clone(), half.clone());
        move |_, nth| match nth {
            0 => Reply::CutOff {
                declared: content.len(),
                body: half.clone(),
            },
            _ => Reply::ok("application/zstd", content.clone()),
        }
    })
    .await;
    let destination = Destination::new();
    let url = format!("http://{}{PATH}", server.address);
    fetch(&url, &expected(&content), &destination.path())
        .await
        .unwrap();
    assert_eq!(server.count(PATH), 2);
    assert!(std::fs::read(destination.path()).unwrap() == content);

    let server = FakeRegistry::start({
        let content_length = content.len();
        move |_, _| Reply::CutOff {
            declared: content_length,
            body: half.clone(),
        }
    })
    .await;
    let destination = Destination::new();
    let url = format!("http://{}{PATH}", server.address);
    let error = fetch(&url, &expected(&content), &destination.path())
        .await
        .unwrap_err();
    assert!(matches!(error, FetchError::Transient { .. }), "{error}");
    assert!(error.to_string().contains("broke off"), "{error}");
    assert_eq!(server.count(PATH), 3);
    destination.assert_empty(&error);
}

#[tokio::test]
async fn not_found_and_refused_are_final() {
    for (status, what) in [(404, "not found"), (410, "not found"), (403, "refused")] {
        let server = FakeRegistry::start(move |_, _| Reply::status(status)).await;
        let destination = Destination::new();
        let url = format!("http://{}{PATH}", server.address);
        let error = fetch(&url, &expected(b"x"), &destination.path())
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains(what) && text.contains(&url) && text.contains(&status.to_string()),
            "{text}"
        );
        assert_eq!(server.count(PATH), 1, "HTTP {status} is not retried");
        destination.assert_empty(&error);
    }
    let server = FakeRegistry::start(|_, _| Reply::status(404)).await;
    let url = format!("http://{}{PATH}", server.address);
    let error = fetch(&url, &expected(b"x"), &Destination::new().path())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("check the URL"), "{error}");
}

#[tokio::test]
async fn wrong_bytes_and_sizes_are_refused_and_nothing_is_kept() {
    let content = body();
    let mut altered = content.clone();
    altered[12_345] ^= 1;
    let longer = [content.as_slice(), b"!"].concat();
    let shorter = content[..content.len() - 1].to_vec();
    let cases: Vec<(Reply, IsExpected)> = vec![
        (Reply::ok("application/zstd", altered.clone()), |error| {
            matches!(error, FetchError::DigestMismatch { .. })
        }),
        (Reply::ok("application/zstd", longer.clone()), |error| {
            matches!(error, FetchError::LengthMismatch { .. })
        }),
        (Reply::Unannounced { body: longer }, |error| {
            matches!(error, FetchError::TooLarge { .. })
        }),
        (Reply::Unannounced { body: shorter }, |error| {
            matches!(error, FetchError::Truncated { .. })
        }),
        (Reply::Unannounced { body: altered }, |error| {
            matches!(error, FetchError::DigestMismatch { .. })
        }),
    ];
    for (reply, check) in cases {
        let server = FakeRegistry::start(move |_, _| reply.clone()).await;
        let destination = Destination::new();
        let url = format!("http://{}{PATH}", server.address);
        let error = fetch(&url, &expected(&content), &destination.path())
            .await
            .unwrap_err();
        assert!(check(&error), "unexpected: {error:?}");
        let text = error.to_string();
        assert!(
            text.contains(&url) && text.contains("nothing was kept"),
            "{text}"
        );
        assert_eq!(
            server.count(PATH),
            1,
            "verification failures are not retried"
        );
        destination.assert_empty(&error);
    }
}

#[tokio::test]
async fn credentials_are_sent_but_never_shown() {
    let authorization = Arc::new(Mutex::new(None));
    let server = FakeRegistry::start_with_requests({
        let authorization = Arc::clone(&authorization);
        move |request| {
            *authorization.lock().unwrap() = request.header("authorization").map(str::to_owned);
            Reply::status(404)
        }
    })
    .await;
    let url = format!(
        "http://bundle-user:hunter2@{}{PATH}?token=s3cr3t#part",
        server.address
    );
    let destination = Destination::new();
    let error = fetch(&url, &expected(b"x"), &destination.path())
        .await
        .unwrap_err();
    let text = format!("{error} {error:?}");
    assert!(
        !text.contains("hunter2") && !text.contains("bundle-user"),
        "{text}"
    );
    assert!(!text.contains("s3cr3t") && !text.contains("part"), "{text}");
    assert!(
        text.contains(&format!("http://{}{PATH}?…", server.address)),
        "{text}"
    );
    let sent = authorization.lock().unwrap().clone();
    assert!(
        sent.as_deref()
            .is_some_and(|value| value.starts_with("Basic ")),
        "the user info becomes basic auth: {sent:?}"
    );
}

#[tokio::test]
async fn a_stalled_transfer_times_out_and_is_retried() {
    let content = body();
    let server = FakeRegistry::start({
        let content = content.clone();
        move |_, nth| match nth {
            0 => Reply::Stall,
            1 => Reply::StallAfter {
                declared: content.len(),
                body: content[..1000].to_vec(),
            },
            _ => Reply::ok("application/zstd", content.clone()),
        }
    })
    .await;
    let destination = Destination::new();
    let url = format!("http://{}{PATH}", server.address);
    let started = Instant::now();
    fetch(&url, &expected(&content), &destination.path())
        .await
        .unwrap();
    assert_eq!(server.count(PATH), 3);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn cancelling_or_dropping_a_download_leaves_nothing() {
    let content = body();
    let server = FakeRegistry::start({
        let content = content.clone();
        move |_, _| Reply::StallAfter {
            declared: content.len(),
            body: content[..2 * 1024 * 1024].to_vec(),
        }
    })
    .await;
    let url = format!("http://{}{PATH}", server.address);
    let slow = Fetcher::new(FetchOptions {
        read_timeout: Duration::from_secs(30),
        ..FetchOptions::default()
    })
    .unwrap();

    let destination = Destination::new();
    let cancel = CancellationToken::new();
    let error = slow
        .fetch_verified(
            &url,
            &expected(&content),
            &destination.path(),
            {
                let cancel = cancel.clone();
                move |done, _| {
                    if done > 0 {
                        cancel.cancel();
                    }
                }
            },
            &cancel,
        )
        .await
        .unwrap_err();
    assert!(matches!(error, FetchError::Cancelled { .. }), "{error}");
    destination.assert_empty(&error);

    let destination = Destination::new();
    let (reached, reached_rx) = tokio::sync::oneshot::channel::<()>();
    let mut reached = Some(reached);
    let (wanted, dest, never) = (
        expected(&content),
        destination.path(),
        CancellationToken::new(),
    );
    let download = slow.fetch_verified(
        &url,
        &wanted,
        &dest,
        move |done, _| {
            if done > 0
                && let Some(reached) = reached.take()
            {
                let _ = reached.send(());
            }
        },
        &never,
    );
    tokio::select! {
        result = download => panic!("the stalled download finished: {result:?}"),
        _ = reached_rx => {}
    }
    // `select!` has dropped the download future, mid-transfer.
    destination.assert_empty(&"dropping the download");
}

#[tokio::test]
async fn file_urls_and_absolute_paths_are_verified_too() {
    let content = body();
    let source_dir = tempfile::tempdir().unwrap();
    let source = source_dir.path().join("image bundle.tar.zst");
    std::fs::write(&source, &content).unwrap();
    let file_url = reqwest::Url::from_file_path(&source).unwrap().to_string();
    let path = source.to_str().unwrap().to_owned();

    for url in [&file_url, &path] {
        let destination = Destination::new();
        fetch(url, &expected(&content), &destination.path())
            .await
            .unwrap();
        assert!(std::fs::read(destination.path()).unwrap() == content);
    }

    let wrong = Expected {
        sha256: sha256_hex(b"something else"),
        size: Some(content.len() as u64),
    };
    let wrong_size = Expected {
        sha256: sha256_hex(&content),
        size: Some(content.len() as u64 + 1),
    };
    let missing = source_dir.path().join("missing.tar.zst");
    let missing = missing.to_str().unwrap();
    let cases: [(&str, &Expected, IsExpected); 3] = [
        (&file_url, &wrong, |error| {
            matches!(error, FetchError::DigestMismatch { .. })
        }),
        (&path, &wrong_size, |error| {
            matches!(error, FetchError::LengthMismatch { .. })
        }),
        (missing, &wrong, |error| {
            matches!(error, FetchError::NotFound { .. })
        }),
    ];
    for (url, expected, check) in cases {
        let destination = Destination::new();
        let error = fetch(url, expected, &destination.path()).await.unwrap_err();
        assert!(check(&error), "unexpected: {error:?}");
        destination.assert_empty(&error);
    }

    let error = fetch("relative/path.tar.zst", &wrong, &Destination::new().path())
        .await
        .unwrap_err();
    assert!(matches!(error, FetchError::InvalidUrl { .. }), "{error}");
}

/// `python3 -m http.server` on a free loopback port, killed on drop.
struct PythonServer {
    child: Child,
    address: String,
}

impl PythonServer {
    fn start(directory: &Path) -> PythonServer {
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("python3")
                .args(["-m", "http.server", "--bind", "127.0.0.1"])
                .arg("--directory")
                .arg(directory)
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let address = format!("127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                if http_status(&address, "/").is_some() {
                    return PythonServer { child, address };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Exited (port taken since probing) or never answered: try another port.
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("python3 -m http.server did not come up");
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn downloads_from_pythons_http_server() {
    if !capable("python3", find_program("python3").is_some()) {
        return;
    }
    let content = body();
    let served = tempfile::tempdir().unwrap();
    std::fs::write(served.path().join("image.tar.zst"), &content).unwrap();
    let server = PythonServer::start(served.path());

    let destination = Destination::new();
    let url = format!("http://{}/image.tar.zst", server.address);
    fetch(&url, &expected(&content), &destination.path())
        .await
        .unwrap();
    assert!(std::fs::read(destination.path()).unwrap() == content);

    let destination = Destination::new();
    let url = format!("http://{}/missing.tar.zst", server.address);
    let error = fetch(&url, &expected(&content), &destination.path())
        .await
        .unwrap_err();
    assert!(matches!(error, FetchError::NotFound { .. }), "{error}");
    destination.assert_empty(&error);
}

#[tokio::test]
async fn a_text_document_without_a_length_is_cut_off_at_its_cap() {
    let server = FakeRegistry::start(|path, _| match path {
        "/endless.json" => Reply::Unannounced {
            body: vec![b' '; 3 << 20],
        },
        "/small.json" => Reply::Unannounced {
            body: b"{}".to_vec(),
        },
        _ => Reply::status(404),
    })
    .await;
    let fetcher = fetcher();
    let small = format!("http://{}/small.json", server.address);
    assert_eq!(fetcher.fetch_text(&small, 1 << 20).await.unwrap(), "{}");
    let endless = format!("http://{}/endless.json", server.address);
    let error = fetcher.fetch_text(&endless, 1 << 20).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("more than the 1048576 a catalog may have"),
        "{error}"
    );
}
