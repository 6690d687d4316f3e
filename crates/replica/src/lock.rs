//! One replication at a time per replica directory.
//!
//! The lock is an OS file lock on `replica.lock` (held by the open file, so it disappears with
//! the process however it ends, SIGKILL included: no stale locks to clean up), and the file
//! holds the holder's process id and start time for the error message a second run prints.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

pub const LOCK_NAME: &str = "replica.lock";

pub struct ReplicaLock {
    _file: File,
}

pub fn acquire(vm_dir: &Path, operation: &str) -> Result<ReplicaLock> {
    let path = vm_dir.join(LOCK_NAME);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    // File locks are std since 1.89; the VHDX writer (vdisk-vhdx) already relies on them.
    #[allow(clippy::incompatible_msrv)]
    let locked = file.try_lock();
    match locked {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "the replica {} is in use by another hyperkeep ({}); wait for it to finish\nhint: \
                 two replications of one VM cannot run at once",
                vm_dir.display(),
                if holder.trim().is_empty() {
                    "unknown process".to_string()
                } else {
                    holder.trim().to_string()
                }
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    let text = format!(
        "pid {} ({operation}, since {})\n",
        std::process::id(),
        repo::snapshot::now_rfc3339()
    );
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write the lock file {}", path.display()))?;
    Ok(ReplicaLock { _file: file })
}
