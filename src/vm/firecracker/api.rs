//! Firecracker's API: the requests banger sends and a minimal HTTP/1.1 client over the API's
//! unix socket.
//!
//! Why by hand: the API is a handful of `PUT`s and `GET`s with small JSON bodies, and no HTTP
//! crate in banger's tree speaks HTTP over a unix socket (reqwest cannot). What the client
//! does, and why:
//! - **One connection per request.** Firecracker keeps connections open after answering, so
//!   the end of a response is known only from its head: `Content-Length`, or no body at all
//!   for `204`. A fresh connection per request means a failed or timed-out exchange never
//!   leaves a half-read stream for the next request; a connect costs microseconds.
//! - **Status lines without a reason phrase** (`HTTP/1.1 204 `) are what Firecracker sends;
//!   only the version and the three-digit code are read.
//! - **Errors keep Firecracker's own words**: a non-2xx answer becomes
//!   [`FirecrackerError::Api`] with the method, path, request body and the body's
//!   `fault_message` verbatim (the raw body when it is not the documented JSON).
//! - Chunked responses are refused (Firecracker does not send them); heads and bodies are
//!   bounded so a confused peer cannot make banger buffer without limit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

    /// The request's bytes on the wire.
    fn encode(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n",
            self.method, self.path
        );
        let body = self.body_text();
        if self.body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if self.body.is_some() || self.method != Method::Get {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
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
/// Longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Longest response body accepted (the largest answer banger reads is `/vm/config`).
const MAX_BODY: usize = 16 * 1024 * 1024;

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
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket)
                .await
                .map_err(Exchange::Io)?;
            stream
                .write_all(&request.encode())
                .await
                .map_err(Exchange::Io)?;
            read_response(&mut stream).await
        };
        let (status, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => {
                return Err(FirecrackerError::ApiTimeout {
                    socket: self.socket.clone(),
                    method: request.method,
                    path: request.path.clone(),
                    body: request.body_text(),
                    seconds: self.timeout.as_secs_f64(),
                });
            }
            Ok(Err(Exchange::Io(source))) => {
                return Err(FirecrackerError::ApiIo {
                    socket: self.socket.clone(),
                    method: request.method,
                    path: request.path.clone(),
                    body: request.body_text(),
                    source,
                });
            }
            Ok(Err(Exchange::Malformed(detail))) => {
                return Err(FirecrackerError::ApiMalformed {
                    socket: self.socket.clone(),
                    method: request.method,
                    path: request.path.clone(),
                    body: request.body_text(),
                    detail,
                });
            }
            Ok(Ok(answer)) => answer,
        };
        if (200..300).contains(&status) {
            return Ok(ApiResponse { status, body });
        }
        Err(FirecrackerError::Api {
            method: request.method,
            path: request.path.clone(),
            body: request.body_text(),
            status,
            fault_message: fault_message(&body),
        })
    }

    /// `GET path`, the answer parsed as JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, FirecrackerError> {
        let request = ApiRequest::get(path);
        let response = self.send(&request).await?;
        serde_json::from_slice(&response.body).map_err(|error| FirecrackerError::ApiMalformed {
            socket: self.socket.clone(),
            method: request.method,
            path: request.path.clone(),
            body: String::new(),
            detail: format!(
                "the answer is not JSON ({error}): {}",
                String::from_utf8_lossy(&response.body)
            ),
        })
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

#[derive(Debug)]
enum Exchange {
    Io(std::io::Error),
    Malformed(String),
}

/// Reads one response: the head up to the blank line, then the body by `Content-Length`
/// (none for 1xx, 204 and 304; until end of stream when the length is absent).
async fn read_response(stream: &mut UnixStream) -> Result<(u16, Vec<u8>), Exchange> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = find(&buffer, b"\r\n\r\n") {
            break at;
        }
        if buffer.len() > MAX_HEAD {
            return Err(Exchange::Malformed(format!(
                "the response head is longer than {MAX_HEAD} bytes"
            )));
        }
        let read = stream.read(&mut chunk).await.map_err(Exchange::Io)?;
        if read == 0 {
            return Err(if buffer.is_empty() {
                Exchange::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "Firecracker closed the connection without answering",
                ))
            } else {
                Exchange::Malformed(format!(
                    "the connection closed inside the response head: {:?}",
                    String::from_utf8_lossy(&buffer)
                ))
            });
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = std::str::from_utf8(&buffer[..head_end])
        .map_err(|_| Exchange::Malformed("the response head is not UTF-8".to_owned()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = parse_status_line(status_line).ok_or_else(|| {
        Exchange::Malformed(format!("not an HTTP/1.x status line: {status_line:?}"))
    })?;
    let mut content_length = None;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| Exchange::Malformed(format!("not a header line: {line:?}")))?;
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("content-length") {
            let length = value.parse::<usize>().map_err(|_| {
                Exchange::Malformed(format!("Content-Length is not a number: {value:?}"))
            })?;
            if length > MAX_BODY {
                return Err(Exchange::Malformed(format!(
                    "the response body is {length} bytes, more than the {MAX_BODY} accepted"
                )));
            }
            content_length = Some(length);
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(Exchange::Malformed(format!(
                "unsupported Transfer-Encoding {value:?}"
            )));
        }
    }
    let mut body = buffer.split_off(head_end + 4);
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok((status, Vec::new()));
    }
    match content_length {
        Some(length) => {
            while body.len() < length {
                let read = stream.read(&mut chunk).await.map_err(Exchange::Io)?;
                if read == 0 {
                    return Err(Exchange::Malformed(format!(
                        "the connection closed after {} of {length} body bytes",
                        body.len()
                    )));
                }
                body.extend_from_slice(&chunk[..read]);
            }
            body.truncate(length);
        }
        None => loop {
            let read = stream.read(&mut chunk).await.map_err(Exchange::Io)?;
            if read == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..read]);
            if body.len() > MAX_BODY {
                return Err(Exchange::Malformed(format!(
                    "the response body is longer than the {MAX_BODY} bytes accepted"
                )));
            }
        },
    }
    Ok((status, body))
}

/// `HTTP/1.1 204 ` or `HTTP/1.1 200 OK` → the code.
fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split(' ');
    let version = parts.next()?;
    let code = parts.next()?;
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return None;
    }
    code.parse().ok().filter(|code| (100..600).contains(code))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A one-shot server: reads one request head (and a body by Content-Length), sends it
    /// back through the receiver, writes each of `replies` in turn, then keeps the
    /// connection open (as Firecracker does) unless `close` is set.
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
                if let Some(end) = find(&request, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length: "))
                        .map_or(0, |value| value.trim().parse::<usize>().unwrap());
                    if request.len() >= end + 4 + length || read == 0 {
                        break;
                    }
                }
            }
            let _ = sender.send(request);
            for reply in replies {
                stream.write_all(&reply).await.unwrap();
                stream.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !close {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        (path, task, receiver)
    }

    #[test]
    fn requests_are_encoded_with_a_content_length() {
        let request = ApiRequest::instance_start();
        assert_eq!(
            String::from_utf8(request.encode()).unwrap(),
            "PUT /actions HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: 31\r\n\r\n\
             {\"action_type\":\"InstanceStart\"}"
        );
        let get = ApiRequest::get("/vm/config");
        assert_eq!(
            String::from_utf8(get.encode()).unwrap(),
            "GET /vm/config HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
        );
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("rootfs_1-a.b~"), "rootfs_1-a.b~");
        assert_eq!(encode_segment("a b/c?é"), "a%20b%2Fc%3F%C3%A9");
    }

    #[test]
    fn status_lines_need_no_reason_phrase() {
        assert_eq!(parse_status_line("HTTP/1.1 204 "), Some(204));
        assert_eq!(parse_status_line("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status_line("HTTP/1.1 400"), Some(400));
        assert_eq!(parse_status_line("HTTP/2 200"), None);
        assert_eq!(parse_status_line("HTTP/1.1 20x "), None);
        assert_eq!(parse_status_line("garbage"), None);
    }

    #[tokio::test]
    async fn a_204_on_a_kept_open_connection_returns_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let reply = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        let (path, server, _) = serve(dir.path(), vec![reply.to_vec()], false).await;
        let client = ApiClient::new(&path).with_timeout(Duration::from_secs(5));
        let response = client.send(&ApiRequest::instance_start()).await.unwrap();
        assert_eq!(response.status, 204);
        assert!(response.body.is_empty());
        server.abort();
    }

    #[tokio::test]
    async fn a_body_split_across_writes_is_read_by_content_length() {
        let dir = tempfile::tempdir().unwrap();
        let body = br#"{"vcpu_count":2,"mem_size_mib":256}"#;
        let head = format!(
            "HTTP/1.1 200 \r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let replies = vec![
            head.as_bytes()[..10].to_vec(),
            [&head.as_bytes()[10..], &body[..5]].concat(),
            body[5..].to_vec(),
        ];
        let (path, server, request) = serve(dir.path(), replies, false).await;
        let client = ApiClient::new(&path).with_timeout(Duration::from_secs(5));
        let config = client.get_json("/machine-config").await.unwrap();
        assert_eq!(config["vcpu_count"], 2);
        let request = String::from_utf8(request.await.unwrap()).unwrap();
        assert!(request.starts_with("GET /machine-config HTTP/1.1\r\n"));
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
    async fn malformed_and_truncated_answers_are_reported_not_hung_on() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(),
                "not an HTTP/1.x status line",
            ),
            (
                b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\nabc".to_vec(),
                "closed after 3 of 10 body bytes",
            ),
            (
                b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                "unsupported Transfer-Encoding",
            ),
            (
                b"HTTP/1.1 200 \r\nContent-Le".to_vec(),
                "inside the response head",
            ),
        ];
        for (index, (reply, expected)) in cases.into_iter().enumerate() {
            let case_dir = dir.path().join(index.to_string());
            std::fs::create_dir(&case_dir).unwrap();
            let (path, _server, _) = serve(&case_dir, vec![reply], true).await;
            let error = ApiClient::new(&path)
                .with_timeout(Duration::from_secs(5))
                .send(&ApiRequest::get("/"))
                .await
                .unwrap_err();
            assert!(
                matches!(error, FirecrackerError::ApiMalformed { .. }),
                "{error:?}"
            );
            assert!(error.to_string().contains(expected), "{error}");
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
    async fn no_socket_is_an_io_error_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.sock");
        let error = ApiClient::new(&path)
            .send(&ApiRequest::get("/"))
            .await
            .unwrap_err();
        assert!(matches!(error, FirecrackerError::ApiIo { .. }), "{error:?}");
        assert!(error.to_string().contains("missing.sock"), "{error}");
    }
}
