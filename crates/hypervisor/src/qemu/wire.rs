//! JSON lines over a unix socket, with a deadline on every read: the transport shared by QMP and
//! the guest agent. We read raw chunks into our own buffer (rather than `BufRead::read_line`) so a
//! read that times out in the middle of a line never loses the part already received.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Error, Result};

/// Longest line we accept: QMP answers (query-block of a few disks) are a few KiB; a peer that
/// sends megabytes without a newline is broken, and we must not grow without bound.
const MAX_LINE: usize = 4 << 20;

/// Unix socket paths are limited by `sockaddr_un.sun_path` (108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

pub struct JsonLines {
    stream: UnixStream,
    pending: Vec<u8>,
    what: String,
}

impl JsonLines {
    pub fn connect(path: &Path, what: &str) -> Result<Self> {
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::Operation(format!(
                "{what} socket path {} is longer than {MAX_SOCKET_PATH} bytes (the unix socket \
                 limit); use a shorter runtime directory",
                path.display()
            )));
        }
        let stream = UnixStream::connect(path).map_err(|e| Error::Io {
            context: format!("cannot connect to the {what} socket {}", path.display()),
            source: e,
        })?;
        Ok(JsonLines {
            stream,
            pending: Vec::new(),
            what: what.to_string(),
        })
    }

    pub fn send(&mut self, v: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(v).map_err(|e| Error::Parse(e.to_string()))?;
        line.push(b'\n');
        self.send_raw(&line)
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).map_err(|e| Error::Io {
            context: format!("cannot write to the {} socket", self.what),
            source: e,
        })
    }

    /// Drop everything received so far up to and including the first `byte` (the guest agent's
    /// 0xFF resync marker), waiting for it until `deadline`.
    pub fn skip_through(&mut self, byte: u8, deadline: Instant) -> Result<()> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == byte) {
                self.pending.drain(..=i);
                return Ok(());
            }
            self.pending.clear();
            self.fill(deadline)?;
        }
    }

    /// The next JSON object, or `Error::Timeout` at `deadline`.
    pub fn recv(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text).map_err(|e| {
                    Error::Parse(format!(
                        "{} sent a line that is not JSON ({e}): {text:.200}",
                        self.what
                    ))
                });
            }
            self.fill(deadline)?;
        }
    }

    fn fill(&mut self, deadline: Instant) -> Result<()> {
        if self.pending.len() > MAX_LINE {
            return Err(Error::Parse(format!(
                "{} sent more than {MAX_LINE} bytes without a line end",
                self.what
            )));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout(format!("no answer from the {}", self.what)));
        }
        let wait = (deadline - now).max(Duration::from_millis(1));
        self.stream
            .set_read_timeout(Some(wait))
            .map_err(|e| Error::Io {
                context: format!("cannot set a timeout on the {} socket", self.what),
                source: e,
            })?;
        let mut buf = [0u8; 8192];
        match self.stream.read(&mut buf) {
            Ok(0) => Err(Error::Operation(format!(
                "the {} closed the connection",
                self.what
            ))),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(Error::Timeout(format!("no answer from the {}", self.what)))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(Error::Io {
                context: format!("cannot read from the {} socket", self.what),
                source: e,
            }),
        }
    }
}
