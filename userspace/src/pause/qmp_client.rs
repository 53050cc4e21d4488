//! A QMP client on a QEMU monitor unix socket: one command at a time,
//! asynchronous events set aside, and a blocking path for `Drop`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{PauseError, io_err};

/// Bound on one QMP exchange; QEMU answers `stop`/`cont` in well under that.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the synchronous QMP `cont` sent from `Drop`.
const QMP_DROP_TIMEOUT: Duration = Duration::from_secs(3);
/// How many unread QMP events are kept; older ones are dropped.
const QMP_MAX_EVENTS: usize = 256;

/// A QMP client on a QEMU monitor unix socket: one command at a time,
/// asynchronous events set aside for [`Qmp::take_events`].
pub struct Qmp {
    path: PathBuf,
    stream: BufReader<UnixStream>,
    next_id: u64,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, PauseError> {
        let stream = tokio::time::timeout(QMP_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| PauseError::QmpProtocol {
                path: path.to_path_buf(),
                what: "connect timed out (is another client holding the monitor?)".to_owned(),
            })?
            .map_err(io_err("connect to QMP socket", path))?;
        let mut qmp = Self {
            path: path.to_path_buf(),
            stream: BufReader::new(stream),
            next_id: 0,
            events: Vec::new(),
        };
        let greeting = tokio::time::timeout(QMP_TIMEOUT, qmp.read_message())
            .await
            .map_err(|_| qmp.protocol("no greeting (is this a QMP socket?)"))??;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(format!("expected the QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value. A QMP error comes
    /// back as [`PauseError::Qmp`] with QEMU's `desc`.
    pub async fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
    ) -> Result<Value, PauseError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        tokio::time::timeout(QMP_TIMEOUT, async {
            self.stream
                .get_mut()
                .write_all(line.as_bytes())
                .await
                .map_err(io_err("write to QMP socket", &self.path))?;
            loop {
                let reply = self.read_message().await?;
                if reply.get("event").is_some() {
                    self.push_event(reply);
                    continue;
                }
                if reply.get("id").and_then(Value::as_u64) != Some(id) {
                    tracing::debug!(%reply, "QMP reply to another command, skipped");
                    continue;
                }
                return reply_result(command, reply, &self.path);
            }
        })
        .await
        .map_err(|_| self.protocol(format!("no reply to {command} within {QMP_TIMEOUT:?}")))?
    }

    /// Events received so far (oldest first), clearing the list.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn push_event(&mut self, event: Value) {
        if self.events.len() == QMP_MAX_EVENTS {
            self.events.remove(0);
        }
        self.events.push(event);
    }

    async fn read_message(&mut self) -> Result<Value, PauseError> {
        let mut line = String::new();
        let n = self
            .stream
            .read_line(&mut line)
            .await
            .map_err(io_err("read from QMP socket", &self.path))?;
        if n == 0 {
            return Err(self.protocol("QEMU closed the connection"));
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(format!("bad JSON {line:?}: {e}")))
    }

    fn protocol(&self, what: impl Into<String>) -> PauseError {
        PauseError::QmpProtocol {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// `commands` without a runtime, for `Drop`: the same connection is turned
    /// into a blocking socket (QEMU would not serve a second one meanwhile);
    /// if that fails the socket is closed and a fresh connection is made.
    pub(super) fn commands_blocking(
        self,
        socket: &Path,
        commands: &[&str],
    ) -> Result<(), PauseError> {
        let leftover = self.stream.buffer().to_vec();
        let (stream, skip_greeting, leftover) = match self.stream.into_inner().into_std() {
            Ok(s) => (s, false, leftover),
            Err(e) => {
                tracing::debug!(error = %e, "QMP socket not reusable, reconnecting");
                let s = std::os::unix::net::UnixStream::connect(socket)
                    .map_err(io_err("connect to QMP socket", socket))?;
                (s, true, Vec::new())
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(io_err("talk QMP on", socket))?;
        stream
            .set_read_timeout(Some(QMP_DROP_TIMEOUT))
            .map_err(io_err("talk QMP on", socket))?;
        stream
            .set_write_timeout(Some(QMP_DROP_TIMEOUT))
            .map_err(io_err("talk QMP on", socket))?;
        let mut reader = std::io::BufReader::new(std::io::Read::chain(&leftover[..], &stream));
        let mut writer = &stream;
        let protocol = |what: String| PauseError::QmpProtocol {
            path: socket.to_path_buf(),
            what,
        };
        let mut commands = commands.to_vec();
        if skip_greeting {
            let mut greeting = String::new();
            reader
                .read_line(&mut greeting)
                .map_err(io_err("read from QMP socket", socket))?;
            commands.insert(0, "qmp_capabilities");
        }
        for (id, command) in commands.into_iter().enumerate() {
            let id = u64::MAX - id as u64;
            writeln!(writer, "{}", json!({ "execute": command, "id": id }))
                .map_err(io_err("write to QMP socket", socket))?;
            loop {
                let mut line = String::new();
                if reader
                    .read_line(&mut line)
                    .map_err(io_err("read from QMP socket", socket))?
                    == 0
                {
                    return Err(protocol("QEMU closed the connection".to_owned()));
                }
                // A partial line left from the async reader cannot parse; skip it.
                let Ok(reply) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if reply.get("id").and_then(Value::as_u64) == Some(id) {
                    reply_result(command, reply, socket)?;
                    break;
                }
            }
        }
        Ok(())
    }
}

fn reply_result(command: &str, reply: Value, path: &Path) -> Result<Value, PauseError> {
    if let Some(error) = reply.get("error") {
        return Err(PauseError::Qmp {
            command: command.to_owned(),
            class: error["class"].as_str().unwrap_or("GenericError").to_owned(),
            desc: error["desc"]
                .as_str()
                .unwrap_or("(no description)")
                .to_owned(),
        });
    }
    match reply {
        Value::Object(mut map) if map.contains_key("return") => {
            Ok(map.remove("return").unwrap_or(Value::Null))
        }
        other => Err(PauseError::QmpProtocol {
            path: path.to_path_buf(),
            what: format!("reply to {command} has neither return nor error: {other}"),
        }),
    }
}
