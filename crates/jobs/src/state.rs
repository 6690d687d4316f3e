//! Change-tracking state: per VM, the change token the hypervisor gave at the last successful
//! live backup and the snapshot that backup wrote.
//!
//! Why a file beside the job file rather than a tag in the repository: the token is host state
//! (a Hyper-V reference point exists on that host only), it changes every run, and snapshots are
//! immutable. The snapshot id is kept with it because changed ranges are only meaningful against
//! the snapshot taken at the token: the next backup uses exactly that snapshot as its parent, and
//! if it has been forgotten the backup reads the disks in full.
//!
//! Written atomically (temporary file, then rename) so a crash leaves the old or the new state;
//! a missing or unreadable state only costs one full read.

use std::collections::BTreeMap;
use std::path::Path;

use hypervisor::ChangeToken;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    #[serde(default)]
    pub vms: BTreeMap<String, VmTracking>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmTracking {
    pub token: ChangeToken,
    /// The snapshot written at the time of `token`.
    pub snapshot: String,
}

/// Largest state file we read (thousands of VMs fit easily).
const MAX_STATE_LEN: u64 = 16 << 20;

impl JobState {
    /// The state at `path`; an absent file is an empty state. A damaged file is reported as a
    /// warning and treated as empty (the next backups read in full), never as a failure.
    pub fn load(path: &Path) -> JobState {
        match std::fs::metadata(path) {
            Err(_) => return JobState::default(),
            Ok(m) if m.len() > MAX_STATE_LEN => {
                tracing::warn!(path = %path.display(), "change-tracking state file is too large; ignoring it (full reads)");
                return JobState::default();
            }
            Ok(_) => {}
        }
        match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the change-tracking state; the next backups read disks in full");
                JobState::default()
            }
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::State(format!("cannot encode the change-tracking state: {e}")))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let fail = |e: std::io::Error| {
            Error::State(format!(
                "cannot write the change-tracking state {}: {e}",
                path.display()
            ))
        };
        std::fs::write(&tmp, json).map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)
    }
}
