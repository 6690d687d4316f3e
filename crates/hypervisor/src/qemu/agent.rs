//! A client for the QEMU guest agent (qemu-ga) on its virtio-serial socket.
//!
//! The agent channel has no greeting and may hold a stale answer from a client that went away
//! (or half a request from one), so every connection starts with `guest-sync-delimited`: the agent
//! answers it after a 0xFF byte, and everything before that byte is discarded.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::wire::JsonLines;
use crate::{Error, Result};

pub struct Agent {
    conn: JsonLines,
}

impl Agent {
    /// Connect and resynchronise; `Error::Timeout` when no agent answers within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let mut conn = JsonLines::connect(path, "guest agent")?;
        let deadline = Instant::now() + timeout;
        // 0xFF makes an agent that is in the middle of parsing a request drop it.
        conn.send_raw(&[0xff])?;
        // A token unlikely to match an old answer still in the channel.
        let token = ((std::process::id() as u64) << 32)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        let token = token & 0x7fff_ffff_ffff;
        conn.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": token}}))?;
        loop {
            conn.skip_through(0xff, deadline)?;
            match conn.recv(deadline) {
                Ok(v) if v.get("return").and_then(Value::as_u64) == Some(token) => break,
                Ok(_) => continue,
                Err(Error::Parse(_)) => continue, // a stale partial line before the marker
                Err(e) => return Err(e),
            }
        }
        Ok(Agent { conn })
    }

    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        self.conn.send(&msg)?;
        let v = self
            .conn
            .recv(Instant::now() + timeout)
            .map_err(|e| match e {
                Error::Timeout(_) => Error::Timeout(format!(
                    "the guest agent did not answer {command} in {timeout:?}"
                )),
                other => other,
            })?;
        if let Some(err) = v.get("error") {
            let desc = err
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("(no description)");
            return Err(Error::Operation(format!(
                "the guest agent refused {command}: {desc}"
            )));
        }
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }
}
