//! Verified downloads: a URL and an expected sha256 (and size) in, a verified file out, or
//! nothing at all.
//!
//! Lifecycle of [`Fetcher::fetch_verified`]:
//! 1. Parse the source: `http://`, `https://`, `file://` or a plain absolute path. Errors and
//!    messages show the URL without user info, query or fragment ([`display_url`]), since
//!    those are where credentials and signed tokens live.
//! 2. Create a temp file beside the destination (same file system, so the final rename is
//!    atomic).
//! 3. Stream the source into it, hashing and counting every byte: a body longer than the
//!    expected size stops as soon as it is; a `Content-Length` that disagrees with it fails
//!    before the body is read.
//! 4. Compare size and sha256; rename into place only when both match.
//!
//! HTTP requests are retried from byte 0 on 408, 429, 5xx, timeouts, refused or reset
//! connections and bodies that break off, with [`RetryPolicy`]'s backoff, attempt limit and
//! deadline (the same as the registry client's); 404, 410, 401, 403, other statuses and
//! verification failures are final. `file://` sources are read once, never retried.
//!
//! The future is cancellable by dropping it, and through a [`CancellationToken`]: the temp
//! file is a `tempfile` that removes itself when dropped, so a cancelled, failed or
//! mismatched download leaves nothing in the destination directory.
//!
//! TLS: rustls with ring ([`crate::oci::install_tls_provider`]) and the platform's roots, like
//! the registry client. Redirects are followed (at most 10). Plain `http://` is allowed: the
//! expected sha256 pins the content, whoever serves it.
//!
//! Known weaknesses:
//! - A transfer that fails midway restarts from byte 0 (no `Range` resume).
//! - `Retry-After` is not honoured; the backoff is the policy's.
//! - Proxies come from `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` ([`crate::oci::Proxies`]), as for
//!   registries.
//! - The downloaded file is renamed into place without fsync; the store decides durability.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::bundle::hex;
use crate::error::error_chain;
use crate::oci::{Retrier, RetryPolicy, install_tls_provider};

const USER_AGENT: &str = concat!("banger/", env!("CARGO_PKG_VERSION"));
/// Writes to the destination are batched into buffers of this size; file sources are read in
/// chunks of it.
const BUFFER_SIZE: usize = 1024 * 1024;
/// Progress is reported at most once per this many bytes (and at the end).
const PROGRESS_STEP: u64 = 1024 * 1024;

/// Errors of [`Fetcher::fetch_verified`]. URLs are shown by [`display_url`]: never with
/// credentials or query strings.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot fetch `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },

    #[error(
        "cannot fetch {url}: the expected sha256 `{sha256}` is not 64 hex digits (check the \
         catalog entry)"
    )]
    InvalidExpected { url: String, sha256: String },

    #[error("cannot set up an HTTP client: {message}")]
    ClientSetup { message: String },

    #[error("{url} was not found ({detail}); check the URL, or the catalog entry that names it")]
    NotFound { url: String, detail: String },

    #[error("{url} was refused (HTTP {status}); the URL may need credentials, or may have expired")]
    Refused { url: String, status: u16 },

    #[error("{url} answered HTTP {status}; check the URL")]
    HttpStatus { url: String, status: u16 },

    #[error("fetching {url} failed: {message}")]
    Request { url: String, message: String },

    #[error(
        "fetching {url} failed with a transient error, retried {retries} time(s) over \
         {elapsed_secs:.1}s; last error: {last}; check the network connection and try again"
    )]
    Transient {
        url: String,
        /// Retries after the first attempt.
        retries: u32,
        elapsed_secs: f64,
        last: String,
    },

    #[error("cannot read {url}")]
    ReadSource {
        url: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{url} has {announced} bytes, but {expected} were expected; the catalog entry may be \
         outdated; nothing was kept"
    )]
    LengthMismatch {
        url: String,
        expected: u64,
        announced: u64,
    },

    #[error(
        "{url} ended after {received} of the {expected} expected bytes; nothing was kept (try \
         again; if it persists, the catalog entry may be outdated)"
    )]
    Truncated {
        url: String,
        expected: u64,
        received: u64,
    },

    #[error(
        "{url} is larger than the {expected} bytes expected; the catalog entry may be outdated; \
         nothing was kept"
    )]
    TooLarge { url: String, expected: u64 },

    #[error(
        "{url} failed verification: its content has sha256 {actual}, not the expected \
         {expected}; the file was altered or the catalog entry is outdated; nothing was kept"
    )]
    DigestMismatch {
        url: String,
        expected: String,
        actual: String,
    },

    #[error("cannot write the download of {url} to {}", path.display())]
    WriteDestination {
        url: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("fetching {url} was cancelled; nothing was kept")]
    Cancelled { url: String },
}

/// What a download must turn out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Hex sha256, optionally prefixed `sha256:`; either case.
    pub sha256: String,
    /// The exact size in bytes, when known: checked against `Content-Length` up front and
    /// against the body as it streams.
    pub size: Option<u64>,
}

impl From<&crate::catalog::BundleSource> for Expected {
    fn from(source: &crate::catalog::BundleSource) -> Expected {
        Expected {
            sha256: source.sha256.clone(),
            size: Some(source.size),
        }
    }
}

/// How downloads reach servers.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    /// Longest wait for any single read, so a stalled transfer fails (and is retried) instead
    /// of hanging.
    pub read_timeout: Duration,
    /// `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`, as registries use them.
    pub proxies: crate::oci::Proxies,
}

impl Default for FetchOptions {
    fn default() -> FetchOptions {
        FetchOptions {
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
            proxies: crate::oci::Proxies::default(),
        }
    }
}

/// Downloads verified files. Share one: it keeps connections.
#[derive(Debug, Clone)]
pub struct Fetcher {
    options: FetchOptions,
    client: reqwest::Client,
}

/// Where bytes come from.
enum Source {
    Http(reqwest::Url),
    File(PathBuf),
}

/// Why one HTTP attempt failed.
enum Failure {
    Transient(String),
    Fatal(FetchError),
}

/// One download in progress: what it is, where it goes.
struct Download<'a> {
    /// The URL as shown in errors.
    shown: &'a str,
    sha256: &'a str,
    size: Option<u64>,
    writer: tokio::io::BufWriter<tokio::fs::File>,
    path: &'a Path,
}

impl Download<'_> {
    fn write_error(&self, source: std::io::Error) -> FetchError {
        FetchError::WriteDestination {
            url: self.shown.to_owned(),
            path: self.path.to_owned(),
            source,
        }
    }

    /// Empties the temp file before an attempt.
    async fn reset(&mut self) -> Result<(), FetchError> {
        let result = async {
            self.writer.flush().await?;
            let file = self.writer.get_mut();
            file.set_len(0).await?;
            file.rewind().await?;
            Ok(())
        }
        .await;
        result.map_err(|source| self.write_error(source))
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), FetchError> {
        match self.writer.write_all(bytes).await {
            Ok(()) => Ok(()),
            Err(source) => Err(self.write_error(source)),
        }
    }

    async fn finish(&mut self) -> Result<(), FetchError> {
        match self.writer.flush().await {
            Ok(()) => Ok(()),
            Err(source) => Err(self.write_error(source)),
        }
    }

    fn too_large(&self, received: u64) -> Option<FetchError> {
        self.size
            .filter(|expected| received > *expected)
            .map(|expected| FetchError::TooLarge {
                url: self.shown.to_owned(),
                expected,
            })
    }

    /// The final size and digest check.
    fn verify(&self, received: u64, hasher: Sha256) -> Result<(), FetchError> {
        if let Some(expected) = self.size
            && received < expected
        {
            return Err(FetchError::Truncated {
                url: self.shown.to_owned(),
                expected,
                received,
            });
        }
        let actual = hex(&hasher.finalize());
        if actual != self.sha256 {
            return Err(FetchError::DigestMismatch {
                url: self.shown.to_owned(),
                expected: self.sha256.to_owned(),
                actual,
            });
        }
        Ok(())
    }
}

/// Calls `progress` at most once per [`PROGRESS_STEP`] bytes, and at the end.
struct Progress<'a> {
    report: &'a mut (dyn FnMut(u64, Option<u64>) + Send),
    total: Option<u64>,
    reported: u64,
}

impl Progress<'_> {
    fn start(&mut self, total: Option<u64>) {
        self.total = total;
        self.reported = 0;
        (self.report)(0, total);
    }

    fn advance(&mut self, done: u64) {
        if done - self.reported >= PROGRESS_STEP {
            self.reported = done;
            (self.report)(done, self.total);
        }
    }

    fn end(&mut self, done: u64) {
        if done != self.reported || done == 0 {
            self.reported = done;
            (self.report)(done, self.total);
        }
    }
}

impl Fetcher {
    pub fn new(options: FetchOptions) -> Result<Fetcher, FetchError> {
        install_tls_provider();
        let builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout);
        let client = options
            .proxies
            .apply(builder)
            .and_then(reqwest::ClientBuilder::build)
            .map_err(|error| FetchError::ClientSetup {
                message: error_chain(&error.without_url()),
            })?;
        Ok(Fetcher { options, client })
    }

    pub fn options(&self) -> &FetchOptions {
        &self.options
    }

    /// A small text document (a catalog) that comes with no digest to check: read whole, at
    /// most `max_bytes`. One attempt: callers fall back to their last good copy.
    pub async fn fetch_text(&self, url: &str, max_bytes: u64) -> Result<String, FetchError> {
        let (source, shown) = parse_source(url)?;
        let too_large = |size: u64| FetchError::Request {
            url: shown.clone(),
            message: format!("{size} bytes is more than the {max_bytes} a catalog may have"),
        };
        let bytes = match source {
            Source::File(path) => {
                let bytes =
                    tokio::fs::read(&path)
                        .await
                        .map_err(|source| FetchError::ReadSource {
                            url: shown.clone(),
                            source,
                        })?;
                if bytes.len() as u64 > max_bytes {
                    return Err(too_large(bytes.len() as u64));
                }
                bytes
            }
            Source::Http(url) => {
                let request_error = |error: reqwest::Error| FetchError::Request {
                    url: shown.clone(),
                    message: error_chain(&error.without_url()),
                };
                let response = self.client.get(url).send().await.map_err(request_error)?;
                let status = response.status().as_u16();
                match status {
                    200 => {}
                    404 | 410 => {
                        return Err(FetchError::NotFound {
                            url: shown,
                            detail: format!("HTTP {status}"),
                        });
                    }
                    401 | 403 => return Err(FetchError::Refused { url: shown, status }),
                    _ => return Err(FetchError::HttpStatus { url: shown, status }),
                }
                if let Some(length) = response.content_length()
                    && length > max_bytes
                {
                    return Err(too_large(length));
                }
                // Read in chunks: without a Content-Length, only counting stops an endless body.
                let mut response = response;
                let mut bytes = Vec::new();
                while let Some(chunk) = response.chunk().await.map_err(request_error)? {
                    if (bytes.len() + chunk.len()) as u64 > max_bytes {
                        return Err(too_large((bytes.len() + chunk.len()) as u64));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                bytes
            }
        };
        String::from_utf8(bytes).map_err(|_| FetchError::Request {
            url: shown,
            message: "the document is not UTF-8 text".into(),
        })
    }

    /// Downloads `url` (`http://`, `https://`, `file://` or an absolute path) to `dest`,
    /// verifying it against `expected` while it streams. Only a verified file is renamed into
    /// place; on any error, on cancellation through `cancel`, or when the future is dropped,
    /// nothing is left beside `dest` (an existing `dest` is replaced only on success).
    /// `progress(done, total)` is called as bytes arrive, from 0 again on a retry; `total` is
    /// the expected size, else the `Content-Length`, if any.
    pub async fn fetch_verified(
        &self,
        url: &str,
        expected: &Expected,
        dest: &Path,
        mut progress: impl FnMut(u64, Option<u64>) + Send,
        cancel: &CancellationToken,
    ) -> Result<(), FetchError> {
        let (source, shown) = parse_source(url)?;
        let sha256 =
            normalize_sha256(&expected.sha256).ok_or_else(|| FetchError::InvalidExpected {
                url: shown.clone(),
                sha256: expected.sha256.clone(),
            })?;
        let directory = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let write_error = |path: &Path, source| FetchError::WriteDestination {
            url: shown.clone(),
            path: path.to_owned(),
            source,
        };
        let partial = tempfile::Builder::new()
            .prefix(".banger-fetch-")
            .suffix(".partial")
            .tempfile_in(directory)
            .map_err(|source| write_error(directory, source))?;
        let file = partial
            .as_file()
            .try_clone()
            .map_err(|source| write_error(partial.path(), source))?;
        let mut download = Download {
            shown: &shown,
            sha256: &sha256,
            size: expected.size,
            writer: tokio::io::BufWriter::with_capacity(
                BUFFER_SIZE,
                tokio::fs::File::from_std(file),
            ),
            path: partial.path(),
        };
        let mut progress = Progress {
            report: &mut progress,
            total: expected.size,
            reported: 0,
        };
        let work = async {
            match &source {
                Source::Http(url) => self.fetch_http(url, &mut download, &mut progress).await,
                Source::File(path) => fetch_file(path, &mut download, &mut progress).await,
            }
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                return Err(FetchError::Cancelled { url: shown.clone() });
            }
            result = work => result?,
        }
        drop(download);
        partial
            .persist(dest)
            .map_err(|error| write_error(dest, error.error))?;
        Ok(())
    }

    async fn fetch_http(
        &self,
        url: &reqwest::Url,
        download: &mut Download<'_>,
        progress: &mut Progress<'_>,
    ) -> Result<(), FetchError> {
        let mut retrier = Retrier::new(&self.options.retry);
        loop {
            download.reset().await?;
            let message = match self.attempt(url, download, progress).await {
                Ok(()) => return Ok(()),
                Err(Failure::Fatal(error)) => return Err(error),
                Err(Failure::Transient(message)) => message,
            };
            retrier
                .wait_or_give_up(message)
                .await
                .map_err(|gave_up| FetchError::Transient {
                    url: download.shown.to_owned(),
                    retries: gave_up.retries,
                    elapsed_secs: gave_up.elapsed.as_secs_f64(),
                    last: gave_up.last,
                })?;
        }
    }

    /// One request: status, length, body streamed, hashed and counted, verified.
    async fn attempt(
        &self,
        url: &reqwest::Url,
        download: &mut Download<'_>,
        progress: &mut Progress<'_>,
    ) -> Result<(), Failure> {
        let shown = download.shown.to_owned();
        let mut response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|error| classify(error, &shown, 0))?;
        let status = response.status();
        if !status.is_success() {
            let code = status.as_u16();
            return Err(match code {
                404 | 410 => Failure::Fatal(FetchError::NotFound {
                    url: shown,
                    detail: format!("HTTP {code}"),
                }),
                401 | 403 => Failure::Fatal(FetchError::Refused {
                    url: shown,
                    status: code,
                }),
                408 | 429 | 500..=599 => Failure::Transient(format!("HTTP {status}")),
                _ => Failure::Fatal(FetchError::HttpStatus {
                    url: shown,
                    status: code,
                }),
            });
        }
        let announced = response.content_length();
        if let (Some(expected), Some(announced)) = (download.size, announced)
            && expected != announced
        {
            return Err(Failure::Fatal(FetchError::LengthMismatch {
                url: shown,
                expected,
                announced,
            }));
        }
        progress.start(download.size.or(announced));
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(error) => return Err(classify(error, &shown, received)),
            };
            received += chunk.len() as u64;
            if let Some(error) = download.too_large(received) {
                return Err(Failure::Fatal(error));
            }
            hasher.update(&chunk);
            download.write(&chunk).await.map_err(Failure::Fatal)?;
            progress.advance(received);
        }
        download.verify(received, hasher).map_err(Failure::Fatal)?;
        download.finish().await.map_err(Failure::Fatal)?;
        progress.end(received);
        Ok(())
    }
}

/// Downloads with default options; see [`Fetcher::fetch_verified`]. Callers that download
/// more than once should share a [`Fetcher`], which keeps connections.
pub async fn fetch_verified(
    url: &str,
    expected: &Expected,
    dest: &Path,
    progress: impl FnMut(u64, Option<u64>) + Send,
    cancel: &CancellationToken,
) -> Result<(), FetchError> {
    Fetcher::new(FetchOptions::default())?
        .fetch_verified(url, expected, dest, progress, cancel)
        .await
}

/// A local file, read once: an I/O error is final.
async fn fetch_file(
    path: &Path,
    download: &mut Download<'_>,
    progress: &mut Progress<'_>,
) -> Result<(), FetchError> {
    let shown = download.shown.to_owned();
    let read_error = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::NotFound {
            FetchError::NotFound {
                url: shown.clone(),
                detail: "no such file".to_owned(),
            }
        } else {
            FetchError::ReadSource {
                url: shown.clone(),
                source,
            }
        }
    };
    let mut file = tokio::fs::File::open(path).await.map_err(read_error)?;
    let length = file.metadata().await.map_err(read_error)?.len();
    if let Some(expected) = download.size
        && expected != length
    {
        return Err(FetchError::LengthMismatch {
            url: shown.clone(),
            expected,
            announced: length,
        });
    }
    progress.start(Some(length));
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BUFFER_SIZE];
    let mut received = 0u64;
    loop {
        let read = file.read(&mut buffer).await.map_err(read_error)?;
        if read == 0 {
            break;
        }
        received += read as u64;
        // The file may grow while it is read.
        if let Some(error) = download.too_large(received) {
            return Err(error);
        }
        hasher.update(&buffer[..read]);
        download.write(&buffer[..read]).await?;
        progress.advance(received);
    }
    download.verify(received, hasher)?;
    download.finish().await?;
    progress.end(received);
    Ok(())
}

/// Sorts a reqwest error into retry-worthy or final. `received` bytes of the body had
/// arrived.
fn classify(error: reqwest::Error, shown: &str, received: u64) -> Failure {
    let transient = error.is_timeout()
        || error.is_connect()
        || error.is_request()
        || error.is_body()
        || error.is_decode();
    // reqwest's messages repeat the URL in full; ours shows it without secrets.
    let message = error_chain(&error.without_url());
    if !transient {
        return Failure::Fatal(FetchError::Request {
            url: shown.to_owned(),
            message,
        });
    }
    if received > 0 {
        Failure::Transient(format!(
            "the transfer broke off after {received} bytes: {message}"
        ))
    } else {
        Failure::Transient(message)
    }
}

fn parse_source(input: &str) -> Result<(Source, String), FetchError> {
    if input.starts_with('/') {
        return Ok((Source::File(PathBuf::from(input)), input.to_owned()));
    }
    let invalid = |reason: String| FetchError::InvalidUrl {
        url: display_raw(input),
        reason,
    };
    let url = reqwest::Url::parse(input).map_err(|error| {
        invalid(format!(
            "{error} (give an http://, https:// or file:// URL, or an absolute path)"
        ))
    })?;
    let shown = display_url(&url);
    match url.scheme() {
        "http" | "https" => Ok((Source::Http(url), shown)),
        "file" => {
            let path = url.to_file_path().map_err(|()| {
                invalid("a file:// URL must name an absolute path on this host".to_owned())
            })?;
            Ok((Source::File(path), shown))
        }
        scheme => Err(invalid(format!(
            "the `{scheme}` scheme is not supported (http, https and file are)"
        ))),
    }
}

/// A URL as errors and messages show it: no user name, password, query or fragment, which is
/// where credentials and signed tokens live. A dropped query shows as `?…`.
pub fn display_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_fragment(None);
    let had_query = shown.query().is_some();
    shown.set_query(None);
    let mut text = shown.to_string();
    if had_query {
        text.push_str("?…");
    }
    text
}

/// A source (URL or path) as [`Fetcher::fetch_verified`]'s errors show it, for messages about
/// what was fetched from it: [`display_url`] for a URL, the path itself for a path.
pub fn display_source(input: &str) -> String {
    parse_source(input).map_or_else(|_| display_raw(input), |(_, shown)| shown)
}

/// [`display_url`] for text that did not parse as a URL.
fn display_raw(input: &str) -> String {
    let cut = input.find(['?', '#']).unwrap_or(input.len());
    let (mut text, had_query) = (input[..cut].to_owned(), cut < input.len());
    if let Some((scheme, rest)) = text.split_once("://") {
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            text = format!("{scheme}://{}", &rest[at + 1..]);
        }
    }
    if had_query {
        text.push_str("?…");
    }
    text
}

/// Lowercase 64-digit hex from `sha256:<hex>` or `<hex>`, either case.
fn normalize_sha256(text: &str) -> Option<String> {
    let hex = text.strip_prefix("sha256:").unwrap_or(text);
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_can_become_step_error_sources() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}
        assert_error::<FetchError>();
    }

    #[test]
    fn shown_urls_carry_no_secrets() {
        let url =
            reqwest::Url::parse("https://user:secret@example.test:8443/a/b.tar.zst?token=abc#frag")
                .unwrap();
        assert_eq!(display_url(&url), "https://example.test:8443/a/b.tar.zst?…");
        let url = reqwest::Url::parse("http://example.test/b").unwrap();
        assert_eq!(display_url(&url), "http://example.test/b");
        assert_eq!(
            display_raw("https://user:secret@exa mple/x?sig=1"),
            "https://exa mple/x?…"
        );
        assert_eq!(display_raw("not a url"), "not a url");
        assert_eq!(
            display_source("https://user:secret@example.test/k.tar.zst?sig=1"),
            "https://example.test/k.tar.zst?…"
        );
        assert_eq!(display_source("/srv/k.tar.zst"), "/srv/k.tar.zst");
    }

    #[test]
    fn sources_parse() {
        assert!(matches!(
            parse_source("/var/tmp/b.tar.zst").unwrap().0,
            Source::File(path) if path == Path::new("/var/tmp/b.tar.zst")
        ));
        assert!(matches!(
            parse_source("file:///var/tmp/b%20c").unwrap().0,
            Source::File(path) if path == Path::new("/var/tmp/b c")
        ));
        assert!(matches!(
            parse_source("http://127.0.0.1:1/x").unwrap().0,
            Source::Http(_)
        ));
        for bad in [
            "relative/path",
            "ftp://example.test/x",
            "file://other-host/x",
        ] {
            assert!(
                matches!(parse_source(bad), Err(FetchError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn digests_normalize() {
        let hex = "AB".repeat(32);
        assert_eq!(normalize_sha256(&hex), Some("ab".repeat(32)));
        assert_eq!(
            normalize_sha256(&format!("sha256:{hex}")),
            Some("ab".repeat(32))
        );
        assert_eq!(normalize_sha256("abc"), None);
        assert_eq!(normalize_sha256(&"g".repeat(64)), None);
    }
}
