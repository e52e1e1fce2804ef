//! A QMP client: QEMU's JSON control protocol over a unix socket.
//!
//! 1. Connect and read the greeting (`{"QMP": …}`).
//! 2. `qmp_capabilities` leaves negotiation mode.
//! 3. Each command is one JSON line; the reply is the next object that is not an event:
//!    QEMU interleaves asynchronous events (`{"event": …}`) with replies, so they are skipped
//!    (docs/hosts.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QEMU's control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU's control socket {path} closed")]
    Closed { path: PathBuf },
    #[error("reading QEMU's control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU sent something that is not QMP on {path}: {line}")]
    Protocol { path: PathBuf, line: String },
    #[error("QEMU refused `{command}`: {class}: {description}")]
    Command {
        command: String,
        class: String,
        description: String,
    },
    #[error("QEMU did not answer `{command}` within {seconds} s")]
    Timeout { command: String, seconds: u64 },
}

/// A negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut qmp = Qmp {
            path: path.to_owned(),
            reader: BufReader::new(read),
            writer: write,
        };
        let greeting = qmp.next_object().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                path: qmp.path.clone(),
                line: greeting.to_string(),
            });
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        let seconds = 30;
        let reply = tokio::time::timeout(Duration::from_secs(seconds), async {
            loop {
                let object = self.next_object().await?;
                if object.get("event").is_none() {
                    return Ok::<Value, QmpError>(object);
                }
            }
        })
        .await
        .map_err(|_| QmpError::Timeout {
            command: command.to_owned(),
            seconds,
        })??;
        if let Some(error) = reply.get("error") {
            return Err(QmpError::Command {
                command: command.to_owned(),
                class: error["class"].as_str().unwrap_or("Error").to_owned(),
                description: error["desc"].as_str().unwrap_or("").to_owned(),
            });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// `running`, `paused`, `shutdown`, …
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let reply = self.execute("query-status", None).await?;
        Ok(reply["status"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Asks the guest to power off (ACPI); it may ignore it.
    pub async fn powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(|_| ())
    }

    /// Stops QEMU at once.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            // QEMU may close the socket before its reply arrives.
            Err(QmpError::Closed { .. }) | Ok(_) => Ok(()),
            Err(error) => Err(error),
        }
    }

    async fn next_object(&mut self) -> Result<Value, QmpError> {
        let mut bytes = Vec::new();
        loop {
            let read = crate::limits::read_line_capped(
                &mut self.reader,
                crate::limits::QMP_LINE,
                &mut bytes,
            )
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
            let line = String::from_utf8_lossy(&bytes);
            if read == 0 {
                return Err(QmpError::Closed {
                    path: self.path.clone(),
                });
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(line.trim()).map_err(|_| QmpError::Protocol {
                path: self.path.clone(),
                line: line.trim().to_owned(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A scripted QMP peer: greets, then answers each command, sending an event first.
    async fn fake_qemu(listener: UnixListener) {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut line = String::new();
        while reader.read_line(&mut line).await.unwrap() > 0 {
            let request: Value = serde_json::from_str(line.trim()).unwrap();
            let reply = match request["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}}),
                "query-status" => json!({"return": {"status": "running", "running": true}}),
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}})
                }
            };
            write
                .write_all(b"{\"event\": \"RTC_CHANGE\", \"data\": {}}\n")
                .await
                .unwrap();
            write
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .unwrap();
            line.clear();
        }
    }

    #[tokio::test]
    async fn events_are_skipped_and_errors_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(fake_qemu(listener));
        let mut qmp = Qmp::connect(&path).await.unwrap();
        assert_eq!(qmp.status().await.unwrap(), "running");
        let error = qmp.execute("no-such-command", None).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "QEMU refused `no-such-command`: CommandNotFound: The command no-such-command has not been found"
        );
    }
}
