//! Firecracker's API: the requests banger sends, and a client for them on hyper's HTTP/1.1
//! connection over the API's unix socket.
//!
//! Why hyper: the framing (request heads, `Content-Length`, chunked or length-delimited
//! bodies, status lines with or without a reason phrase, keep-alive) is hyper's, so there is
//! no hand-written HTTP parser in banger to get wrong. hyper is already in the build through
//! reqwest, which itself cannot dial a unix socket; hyper's connection-level client
//! (`client::conn::http1`) takes any byte stream, here a `tokio::net::UnixStream`.
//!
//! What is still banger's, and why:
//! - **The requests**: [`ApiRequest`] keeps the JSON body as the exact text sent (fields in
//!   their struct's order), so an error shows what Firecracker read; ids in paths go through
//!   [`encode_segment`].
//! - **One connection per request.** Firecracker keeps connections open after answering. A
//!   fresh connection per request means a failed or timed-out exchange never leaves a
//!   half-read stream or a confused connection for the next one, and no pool has to notice a
//!   Firecracker that died; a connect costs microseconds. The connection is driven inside
//!   [`ApiClient::send`] itself, not in a spawned task, so it lives exactly as long as the
//!   exchange and is closed when `send` returns or is dropped.
//! - **One timeout for the whole exchange** (connect to last body byte, [`DEFAULT_TIMEOUT`]
//!   unless [`ApiClient::with_timeout`] says otherwise): a Firecracker that accepts but never
//!   answers cannot hang banger.
//! - **Errors keep Firecracker's own words**: a non-2xx answer becomes
//!   [`FirecrackerError::Api`] with the method, path, request body and the body's
//!   `fault_message` verbatim (the raw body when it is not the documented JSON). Every other
//!   failure names the step that failed (connect, handshake, send, read body) with the
//!   socket, the request and hyper's error.
//! - **Bounded answers**: a body longer than [`MAX_BODY`] is refused, at once when its
//!   `Content-Length` says so, else once that many bytes arrived (`http_body_util::Limited`).
//!   Heads are bounded by hyper's read buffer (about 400 KiB).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixStream;

use super::FirecrackerError;

/// The HTTP methods banger uses on Firecracker's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Put,
    Patch,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }

    fn to_http(self) -> hyper::Method {
        match self {
            Method::Get => hyper::Method::GET,
            Method::Put => hyper::Method::PUT,
            Method::Patch => hyper::Method::PATCH,
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One API request: method, path (ids already percent-encoded) and JSON body, kept as the
/// exact text sent (fields in their struct's order) so errors show what Firecracker read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub body: Option<String>,
}

impl ApiRequest {
    pub fn get(path: impl Into<String>) -> ApiRequest {
        ApiRequest {
            method: Method::Get,
            path: path.into(),
            body: None,
        }
    }

    pub fn put(path: impl Into<String>, body: &impl Serialize) -> ApiRequest {
        ApiRequest {
            method: Method::Put,
            path: path.into(),
            body: Some(serde_json::to_string(body).expect("API bodies are plain JSON")),
        }
    }

    pub fn patch(path: impl Into<String>, body: &impl Serialize) -> ApiRequest {
        ApiRequest {
            method: Method::Patch,
            ..ApiRequest::put(path, body)
        }
    }

    /// `PUT /actions {"action_type": "InstanceStart"}`: boots the configured guest.
    pub fn instance_start() -> ApiRequest {
        ApiRequest::action("InstanceStart")
    }

    /// `PUT /actions {"action_type": "SendCtrlAltDel"}`: on x86 the i8042 controller sends
    /// Ctrl+Alt+Del; a Linux guest reboots, and a guest reboot ends Firecracker.
    pub fn send_ctrl_alt_del() -> ApiRequest {
        ApiRequest::action("SendCtrlAltDel")
    }

    fn action(action_type: &'static str) -> ApiRequest {
        #[derive(Serialize)]
        struct Action {
            action_type: &'static str,
        }
        ApiRequest::put("/actions", &Action { action_type })
    }

    /// The body as sent (compact JSON), or empty.
    pub fn body_text(&self) -> String {
        self.body.clone().unwrap_or_default()
    }

    /// The body parsed back (for checks).
    pub fn body_json(&self) -> Option<serde_json::Value> {
        self.body
            .as_deref()
            .map(|body| serde_json::from_str(body).expect("bodies are serialized JSON"))
    }

    /// `PUT /drives/rootfs`, the request's short form in messages.
    pub fn describe(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// The request as hyper sends it. hyper adds `Content-Length` from the body (none when
    /// there is no body); `Host` is required by HTTP/1.1 and ignored by Firecracker.
    fn to_http(&self) -> Result<hyper::Request<Full<Bytes>>, hyper::http::Error> {
        let mut builder = hyper::Request::builder()
            .method(self.method.to_http())
            .uri(self.path.as_str())
            .header(HOST, "localhost")
            .header(ACCEPT, "application/json");
        if self.body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        builder.body(Full::new(Bytes::from(self.body_text())))
    }
}

/// A successful (2xx) answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A path segment with everything outside RFC 3986's unreserved set percent-encoded, so any
/// id yields a well-formed request line (Firecracker then judges the id itself).
pub fn encode_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// How long one request may take, connect to last body byte, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest response body accepted (the largest answer banger reads is `/vm/config`).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// A client for one Firecracker API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> ApiClient {
        ApiClient {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` on a fresh connection. A non-2xx answer is [`FirecrackerError::Api`]
    /// with Firecracker's `fault_message`.
    pub async fn send(&self, request: &ApiRequest) -> Result<ApiResponse, FirecrackerError> {
        let http_request =
            request
                .to_http()
                .map_err(|source| FirecrackerError::ApiBuildRequest {
                    method: request.method,
                    path: request.path.clone(),
                    body: request.body_text(),
                    source,
                })?;
        let answer = tokio::time::timeout(self.timeout, self.exchange(http_request)).await;
        let (status, body) = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(failure)) => return Err(failure.into_error(&self.socket, request)),
            Err(_) => {
                return Err(FirecrackerError::ApiTimeout {
                    socket: self.socket.clone(),
                    method: request.method,
                    path: request.path.clone(),
                    body: request.body_text(),
                    seconds: self.timeout.as_secs_f64(),
                });
            }
        };
        if (200..300).contains(&status) {
            return Ok(ApiResponse {
                status,
                body: body.to_vec(),
            });
        }
        Err(FirecrackerError::Api {
            method: request.method,
            path: request.path.clone(),
            body: request.body_text(),
            status,
            fault_message: fault_message(&body),
        })
    }

    /// One exchange on a fresh connection: connect, hand the stream to hyper, send, read the
    /// whole (bounded) body. Dropping the returned future closes the connection.
    async fn exchange(
        &self,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), Failure> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(Failure::Connect)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(Failure::Handshake)?;
        let answer = async move {
            let response = sender.send_request(request).await.map_err(Failure::Send)?;
            let status = response.status().as_u16();
            // The length Firecracker announces, refused before reading a byte of it.
            if response.body().size_hint().lower() > MAX_BODY as u64 {
                return Err(Failure::TooLarge { status });
            }
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|source| {
                    if source.is::<LengthLimitError>() {
                        Failure::TooLarge { status }
                    } else {
                        Failure::ReadBody { status, source }
                    }
                })?
                .to_bytes();
            Ok((status, body))
        };
        // The connection does the reading and writing and must be polled alongside the
        // answer. Its own result is not needed: hyper hands a connection error to the request
        // in flight, so `answer` fails with it.
        let mut connection = std::pin::pin!(connection);
        let mut answer = std::pin::pin!(answer);
        let mut driving = true;
        loop {
            tokio::select! {
                result = &mut answer => return result,
                _ = &mut connection, if driving => driving = false,
            }
        }
    }

    /// `GET path`, the answer parsed as JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, FirecrackerError> {
        let request = ApiRequest::get(path);
        let response = self.send(&request).await?;
        serde_json::from_slice(&response.body).map_err(|source| FirecrackerError::ApiParseAnswer {
            socket: self.socket.clone(),
            method: request.method,
            path: request.path.clone(),
            answer: String::from_utf8_lossy(&response.body).into_owned(),
            source,
        })
    }
}

/// What failed in one exchange, before the request's details are attached.
#[derive(Debug)]
enum Failure {
    Connect(std::io::Error),
    Handshake(hyper::Error),
    Send(hyper::Error),
    ReadBody {
        status: u16,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    TooLarge {
        status: u16,
    },
}

impl Failure {
    /// The error for `request`, naming the socket and the request.
    fn into_error(self, socket: &Path, request: &ApiRequest) -> FirecrackerError {
        let socket = socket.to_path_buf();
        let (method, path, body) = (request.method, request.path.clone(), request.body_text());
        match self {
            Failure::Connect(source) => FirecrackerError::ApiConnect {
                socket,
                method,
                path,
                body,
                source,
            },
            Failure::Handshake(source) => FirecrackerError::ApiHandshake {
                socket,
                method,
                path,
                body,
                source,
            },
            Failure::Send(source) => FirecrackerError::ApiSend {
                socket,
                method,
                path,
                body,
                source,
            },
            Failure::ReadBody { status, source } => FirecrackerError::ApiReadBody {
                socket,
                method,
                path,
                body,
                status,
                source,
            },
            Failure::TooLarge { status } => FirecrackerError::ApiBodyTooLarge {
                socket,
                method,
                path,
                body,
                status,
                limit: MAX_BODY,
            },
        }
    }
}

/// Firecracker's error text: `fault_message` of its `Error` body, else the body itself.
fn fault_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Fault {
        fault_message: String,
    }
    match serde_json::from_slice::<Fault>(body) {
        Ok(fault) => fault.fault_message,
        Err(_) if body.is_empty() => "(no error text in the answer)".to_owned(),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack
            .windows(needle.len())
            .position(|window| window == needle)
    }

    /// A one-shot server speaking raw bytes, to play Firecracker (status lines without a
    /// reason phrase, connections kept open) and peers that misbehave: reads one request head
    /// (and a body by Content-Length), sends it back through the receiver, writes each of
    /// `replies` in turn, then keeps the connection open unless `close` is set.
    async fn serve(
        dir: &Path,
        replies: Vec<Vec<u8>>,
        close: bool,
    ) -> (
        PathBuf,
        tokio::task::JoinHandle<()>,
        tokio::sync::oneshot::Receiver<Vec<u8>>,
    ) {
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                let read = stream.read(&mut chunk).await.unwrap();
                request.extend_from_slice(&chunk[..read]);
                if read == 0 {
                    break;
                }
                if let Some(end) = find(&request, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length: "))
                        .map_or(0, |value| value.trim().parse::<usize>().unwrap());
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            let _ = sender.send(request);
            for reply in replies {
                // The client may hang up first (an answer it refuses to read to the end).
                if stream.write_all(&reply).await.is_err() {
                    return;
                }
                let _ = stream.flush().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !close {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        (path, task, receiver)
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("rootfs_1-a.b~"), "rootfs_1-a.b~");
        assert_eq!(encode_segment("a b/c?é"), "a%20b%2Fc%3F%C3%A9");
    }

    #[tokio::test]
    async fn requests_carry_their_json_body_and_a_204_on_a_kept_open_connection_returns() {
        let dir = tempfile::tempdir().unwrap();
        // Firecracker's own answer: no reason phrase, and the connection stays open.
        let reply = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        for (index, request, expected_head, expected_body) in [
            (
                0,
                ApiRequest::instance_start(),
                &[
                    "put /actions http/1.1",
                    "accept: application/json",
                    "content-type: application/json",
                    "content-length: 31",
                ][..],
                r#"{"action_type":"InstanceStart"}"#,
            ),
            (
                1,
                ApiRequest::get("/vm/config"),
                &["get /vm/config http/1.1", "accept: application/json"][..],
                "",
            ),
        ] {
            let case = dir.path().join(index.to_string());
            std::fs::create_dir(&case).unwrap();
            let (path, server, sent) = serve(&case, vec![reply.to_vec()], false).await;
            let client = ApiClient::new(&path).with_timeout(Duration::from_secs(5));
            let response = client.send(&request).await.unwrap();
            assert_eq!(response.status, 204);
            assert!(response.body.is_empty());
            let sent = String::from_utf8(sent.await.unwrap()).unwrap();
            let (head, body) = sent.split_once("\r\n\r\n").unwrap();
            let head = head.to_lowercase();
            let lines: Vec<&str> = head.split("\r\n").collect();
            for line in expected_head {
                assert!(lines.contains(line), "{line:?} missing from {head:?}");
            }
            if request.body.is_none() {
                assert!(!head.contains("content-type"), "{head}");
            }
            assert_eq!(body, expected_body);
            server.abort();
        }
    }

    #[tokio::test]
    async fn a_json_answer_is_read_by_its_length_on_a_kept_open_connection() {
        let dir = tempfile::tempdir().unwrap();
        let body = br#"{"vcpu_count":2,"mem_size_mib":256}"#;
        let head = format!(
            "HTTP/1.1 200 \r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let (path, server, _) =
            serve(dir.path(), vec![head.into_bytes(), body.to_vec()], false).await;
        let client = ApiClient::new(&path).with_timeout(Duration::from_secs(5));
        let config = client.get_json("/machine-config").await.unwrap();
        assert_eq!(config["vcpu_count"], 2);
        server.abort();
    }

    #[tokio::test]
    async fn an_answer_that_is_not_json_names_the_request_and_shows_the_text() {
        let dir = tempfile::tempdir().unwrap();
        let reply = b"HTTP/1.1 200 \r\nContent-Length: 5\r\n\r\nhello".to_vec();
        let (path, server, _) = serve(dir.path(), vec![reply], false).await;
        let error = ApiClient::new(&path)
            .get_json("/vm/config")
            .await
            .unwrap_err();
        assert!(
            matches!(&error, FirecrackerError::ApiParseAnswer { answer, .. } if answer == "hello"),
            "{error:?}"
        );
        assert!(error.to_string().contains("GET /vm/config"), "{error}");
        server.abort();
    }

    #[tokio::test]
    async fn a_refusal_carries_the_request_and_the_fault_message_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let fault = r#"{"fault_message":"Machine config error: The number of vCPUs must be greater than 0."}"#;
        let reply = format!(
            "HTTP/1.1 400 \r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{fault}",
            fault.len()
        );
        let (path, server, _) = serve(dir.path(), vec![reply.into_bytes()], false).await;
        let client = ApiClient::new(&path);
        let request = ApiRequest::put(
            "/machine-config",
            &serde_json::json!({"vcpu_count": 0, "mem_size_mib": 128}),
        );
        let error = client.send(&request).await.unwrap_err();
        match &error {
            FirecrackerError::Api {
                method,
                path,
                body,
                status,
                fault_message,
            } => {
                assert_eq!(*method, Method::Put);
                assert_eq!(path, "/machine-config");
                let sent: serde_json::Value = serde_json::from_str(body).unwrap();
                assert_eq!(
                    sent,
                    serde_json::json!({"vcpu_count": 0, "mem_size_mib": 128})
                );
                assert_eq!(*status, 400);
                assert_eq!(
                    fault_message,
                    "Machine config error: The number of vCPUs must be greater than 0."
                );
            }
            other => panic!("unexpected error {other:?}"),
        }
        let text = error.to_string();
        assert!(text.contains("PUT /machine-config"), "{text}");
        assert!(text.contains(r#""vcpu_count":0"#), "{text}");
        assert!(
            text.contains("The number of vCPUs must be greater than 0."),
            "{text}"
        );
        server.abort();
    }

    #[test]
    fn fault_messages_are_taken_verbatim_else_the_body_is() {
        assert_eq!(
            fault_message(br#"{"fault_message":"Invalid entry address."}"#),
            "Invalid entry address."
        );
        assert_eq!(fault_message(b"it broke!"), "it broke!");
        assert_eq!(
            fault_message(br#"{"error":"elsewhere"}"#),
            r#"{"error":"elsewhere"}"#
        );
        assert_eq!(fault_message(b""), "(no error text in the answer)");
    }

    #[tokio::test]
    async fn an_error_body_that_is_not_json_is_kept_as_text() {
        let dir = tempfile::tempdir().unwrap();
        let reply = b"HTTP/1.1 500 \r\nContent-Length: 9\r\n\r\nit broke!".to_vec();
        let (path, server, _) = serve(dir.path(), vec![reply], false).await;
        let error = ApiClient::new(&path)
            .send(&ApiRequest::get("/"))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, FirecrackerError::Api { status: 500, fault_message, .. } if fault_message == "it broke!"),
            "{error:?}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn broken_answers_are_reported_by_the_step_that_failed_not_hung_on() {
        let dir = tempfile::tempdir().unwrap();
        type Expected = fn(&FirecrackerError) -> bool;
        let cases: Vec<(Vec<u8>, Expected)> = vec![
            (
                b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(),
                |error| matches!(error, FirecrackerError::ApiSend { source, .. } if source.is_parse()),
            ),
            // Firecracker gone before answering.
            (
                Vec::new(),
                |error| matches!(error, FirecrackerError::ApiSend { source, .. } if source.is_incomplete_message()),
            ),
            (b"HTTP/1.1 200 \r\nContent-Le".to_vec(), |error| {
                matches!(error, FirecrackerError::ApiSend { .. })
            }),
            (
                b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\nabc".to_vec(),
                |error| matches!(error, FirecrackerError::ApiReadBody { status: 200, .. }),
            ),
        ];
        for (index, (reply, expected)) in cases.into_iter().enumerate() {
            let case = dir.path().join(index.to_string());
            std::fs::create_dir(&case).unwrap();
            let (path, _server, _) = serve(&case, vec![reply], true).await;
            let error = ApiClient::new(&path)
                .with_timeout(Duration::from_secs(5))
                .send(&ApiRequest::get("/vm/config"))
                .await
                .unwrap_err();
            assert!(expected(&error), "case {index}: {error:?}");
            let text = error.to_string();
            assert!(text.contains("GET /vm/config"), "{text}");
            assert!(text.contains("api.sock"), "{text}");
        }
    }

    #[tokio::test]
    async fn an_answer_longer_than_the_bound_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Announced by its length: refused before any of it is read.
        let announced =
            format!("HTTP/1.1 200 \r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1).into_bytes();
        // Chunked, so only counting tells: one chunk a byte too long.
        let mut chunked = format!(
            "HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            MAX_BODY + 1
        )
        .into_bytes();
        chunked.resize(chunked.len() + MAX_BODY + 1, b'x');
        chunked.extend_from_slice(b"\r\n0\r\n\r\n");
        for (index, reply) in [announced, chunked].into_iter().enumerate() {
            let case = dir.path().join(index.to_string());
            std::fs::create_dir(&case).unwrap();
            let (path, server, _) = serve(&case, vec![reply], false).await;
            let error = ApiClient::new(&path)
                .with_timeout(Duration::from_secs(10))
                .send(&ApiRequest::get("/vm/config"))
                .await
                .unwrap_err();
            assert!(
                matches!(
                    error,
                    FirecrackerError::ApiBodyTooLarge {
                        status: 200,
                        limit: MAX_BODY,
                        ..
                    }
                ),
                "case {index}: {error:?}"
            );
            server.abort();
        }
    }

    #[tokio::test]
    async fn a_silent_server_times_out_with_the_request_named() {
        let dir = tempfile::tempdir().unwrap();
        let (path, server, _) = serve(dir.path(), vec![], false).await;
        let error = ApiClient::new(&path)
            .with_timeout(Duration::from_millis(200))
            .send(&ApiRequest::instance_start())
            .await
            .unwrap_err();
        assert!(
            matches!(error, FirecrackerError::ApiTimeout { .. }),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(text.contains("PUT /actions"), "{text}");
        assert!(text.contains("InstanceStart"), "{text}");
        server.abort();
    }

    #[tokio::test]
    async fn no_socket_is_a_connect_error_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.sock");
        let error = ApiClient::new(&path)
            .send(&ApiRequest::get("/"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, FirecrackerError::ApiConnect { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("missing.sock"), "{error}");
    }

    #[tokio::test]
    async fn a_path_that_is_no_uri_is_refused_before_connecting() {
        let error = ApiClient::new("/nonexistent/api.sock")
            .send(&ApiRequest::get("/drives/a b"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, FirecrackerError::ApiBuildRequest { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("GET /drives/a b"), "{error}");
    }
}
