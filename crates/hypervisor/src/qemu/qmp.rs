//! A QMP client: capabilities negotiation, commands matched to answers by id, and the
//! asynchronous events (BLOCK_JOB_READY, BLOCK_JOB_COMPLETED, SHUTDOWN, ...) kept in arrival order
//! so a caller can wait for one that may have arrived while it waited for a command's answer.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::wire::JsonLines;
use crate::{Error, Result};

pub struct Qmp {
    conn: JsonLines,
    next_id: u64,
    events: Vec<Value>,
}

/// How long one command may take: everything we send answers at once (jobs report through
/// events), but a TCG guest on a busy machine can delay the main loop.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    pub fn connect(path: &Path) -> Result<Self> {
        let mut conn = JsonLines::connect(path, "QEMU monitor (QMP)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let greeting = conn.recv(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Parse(format!(
                "QMP greeting expected, got {greeting}"
            )));
        }
        let mut qmp = Qmp {
            conn,
            next_id: 1,
            events: Vec::new(),
        };
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Run a command and return its `return` value; a QMP error becomes `Error::Operation` with
    /// QEMU's own description.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        tracing::debug!(%msg, "qmp send");
        self.conn.send(&msg)?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let v = self.conn.recv(deadline).map_err(|e| match e {
                Error::Timeout(m) => Error::Timeout(format!("{m} to {command}")),
                other => other,
            })?;
            if v.get("event").is_some() {
                tracing::debug!(%v, "qmp event");
                self.events.push(v);
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // an answer to an earlier command we gave up on
            }
            if let Some(err) = v.get("error") {
                let desc = err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("(no description)");
                return Err(Error::Operation(format!("QEMU refused {command}: {desc}")));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Wait for the first event named `name` whose `data` satisfies `pred` (already received or
    /// arriving before `timeout`); it is removed from the queue.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let hit = self.events.iter().position(|e| {
                e.get("event").and_then(Value::as_str) == Some(name)
                    && pred(e.get("data").unwrap_or(&Value::Null))
            });
            if let Some(i) = hit {
                return Ok(self.events.remove(i));
            }
            let v = self.conn.recv(deadline).map_err(|e| match e {
                Error::Timeout(_) => {
                    Error::Timeout(format!("QEMU did not report {name} in {timeout:?}"))
                }
                other => other,
            })?;
            if v.get("event").is_some() {
                tracing::debug!(%v, "qmp event");
                self.events.push(v);
            }
        }
    }

    /// Events received so far and not consumed by `wait_event`.
    pub fn events(&self) -> &[Value] {
        &self.events
    }
}
