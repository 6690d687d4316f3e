//! Repository locks: shared (backup) and exclusive (prune, forget --prune).
//!
//! A lock is a plaintext JSON object `locks/<BLAKE3 of its bytes>`:
//! `{"hostname","pid","time","exclusive","operation","nonce"}`. Acquiring writes our lock
//! first and then lists the others, so of two processes racing, at least one sees the other
//! (object stores offer no compare-and-swap; this write-then-check needs none). A shared lock
//! conflicts with any live exclusive lock, an exclusive lock with any live lock; on conflict our
//! lock is deleted again and [`Error::Locked`] names the holder.
//!
//! Locks are refreshed (rewritten with a new time, then the old one deleted) every
//! [`REFRESH_INTERVAL`] by a background thread, so a lock older than [`STALE_AFTER`] belongs to
//! a process that is gone. A lock from this host whose process no longer exists is stale at
//! once. Stale locks are ignored and can be removed with `hyperkeep unlock`.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, ObjectKind};
use crate::crypto::{hash, random_bytes, to_hex};
use crate::repository::{local_hostname, now_rfc3339, Repository};
use crate::{Error, Result};

/// How often a held lock is rewritten.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// A lock not refreshed for this long is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);

/// The content of a lock object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub hostname: String,
    pub pid: u32,
    /// RFC 3339, UTC: when the lock was written (or last refreshed).
    pub time: String,
    pub exclusive: bool,
    /// What holds it (`backup`, `prune`, ...), for messages.
    pub operation: String,
    /// Random, so that two locks written in the same microsecond still get distinct names.
    #[serde(default)]
    pub nonce: String,
}

impl LockInfo {
    fn describe(&self) -> String {
        format!(
            "{} lock held by `{}` on {} (pid {}) since {}",
            if self.exclusive {
                "an exclusive"
            } else {
                "a shared"
            },
            self.operation,
            self.hostname,
            self.pid,
            self.time
        )
    }
}

/// Timing of locks. Tests shorten it; everything else uses [`LockTimes::default`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockTimes {
    pub refresh: Duration,
    pub stale_after: Duration,
}

impl Default for LockTimes {
    fn default() -> Self {
        LockTimes {
            refresh: REFRESH_INTERVAL,
            stale_after: STALE_AFTER,
        }
    }
}

/// One lock object as found in the repository.
#[derive(Clone, Debug)]
pub struct LockStatus {
    pub name: String,
    /// `None` if the object could not be read as a lock.
    pub info: Option<LockInfo>,
    pub stale: bool,
}

/// Whether the process `pid` on this host still exists.
fn pid_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(p) = libc::pid_t::try_from(pid) else {
            return true;
        };
        if p <= 0 {
            return true; // not a real pid: assume alive rather than break someone's lock
        }
        // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
        let r = unsafe { libc::kill(p, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Whether a lock is stale: not refreshed for `stale_after`, or from this host and its process
/// is gone. A time in the future (clock skew) is not stale.
pub fn is_stale(info: &LockInfo, now: SystemTime, stale_after: Duration) -> bool {
    if info.hostname == local_hostname() && !pid_alive(info.pid) {
        return true;
    }
    match chrono::DateTime::parse_from_rfc3339(&info.time) {
        Ok(t) => {
            let t: SystemTime = t.with_timezone(&chrono::Utc).into();
            now.duration_since(t).is_ok_and(|age| age > stale_after)
        }
        // An unreadable time can never be refreshed into a readable one: treat as stale.
        Err(_) => true,
    }
}

/// Every lock in the repository, with staleness.
pub fn list_locks(backend: &dyn Backend, stale_after: Duration) -> Result<Vec<LockStatus>> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    for obj in backend.list(ObjectKind::Lock)? {
        let info = if obj.size > 64 << 10 {
            None
        } else {
            match backend.get(ObjectKind::Lock, &obj.name) {
                Ok(b) => serde_json::from_slice::<LockInfo>(&b).ok(),
                Err(Error::Missing(_)) => continue, // released meanwhile
                Err(e) => return Err(e),
            }
        };
        let stale = match &info {
            Some(i) => is_stale(i, now, stale_after),
            // Unreadable: stale once it is old enough that no live holder would still have it.
            None => obj
                .modified
                .and_then(|m| now.duration_since(m).ok())
                .is_none_or(|age| age > stale_after),
        };
        out.push(LockStatus {
            name: obj.name,
            info,
            stale,
        });
    }
    Ok(out)
}

/// Remove stale locks (all locks with `remove_all`). Returns the removed locks.
pub fn unlock(repo: &Repository, remove_all: bool) -> Result<Vec<LockStatus>> {
    let backend = repo.backend();
    let mut removed = Vec::new();
    for l in list_locks(backend.as_ref(), STALE_AFTER)? {
        if remove_all || l.stale {
            backend.delete(ObjectKind::Lock, &l.name)?;
            removed.push(l);
        }
    }
    Ok(removed)
}

fn write_lock(
    backend: &dyn Backend,
    exclusive: bool,
    operation: &str,
) -> Result<(String, LockInfo)> {
    let mut nonce = [0u8; 8];
    random_bytes(&mut nonce);
    let info = LockInfo {
        hostname: local_hostname(),
        pid: std::process::id(),
        time: now_rfc3339(),
        exclusive,
        operation: operation.to_string(),
        nonce: to_hex(&nonce),
    };
    let bytes = serde_json::to_vec(&info)
        .map_err(|e| Error::InvalidArgument(format!("cannot encode lock: {e}")))?;
    let name = hash(&bytes).to_hex();
    backend.put(ObjectKind::Lock, &name, &bytes)?;
    Ok((name, info))
}

/// A held lock. Dropping it stops the refresher and deletes the lock.
pub struct LockGuard {
    backend: Arc<dyn Backend>,
    current: Arc<Mutex<String>>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    info: LockInfo,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name())
            .field("info", &self.info)
            .finish()
    }
}

/// Another name for [`LockGuard`]: `Lock::acquire(repo, exclusive, operation)`.
pub type Lock = LockGuard;

impl LockGuard {
    /// Same as [`acquire`].
    pub fn acquire(repo: &Repository, exclusive: bool, operation: &str) -> Result<LockGuard> {
        acquire(repo, exclusive, operation)
    }

    /// The current lock object's name (it changes at each refresh).
    pub fn name(&self) -> String {
        self.current.lock().map(|n| n.clone()).unwrap_or_default()
    }

    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    pub fn is_exclusive(&self) -> bool {
        self.info.exclusive
    }

    /// Release now, reporting a failure to delete the lock (drop ignores it).
    pub fn release(mut self) -> Result<()> {
        self.stop_refresher();
        let name = self.name();
        self.backend.delete(ObjectKind::Lock, &name)?;
        // Nothing left for drop to do.
        if let Ok(mut n) = self.current.lock() {
            n.clear();
        }
        Ok(())
    }

    fn stop_refresher(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop_refresher();
        let name = self.name();
        if !name.is_empty() {
            if let Err(e) = self.backend.delete(ObjectKind::Lock, &name) {
                tracing::warn!("could not remove lock {name}: {e}");
            }
        }
    }
}

/// Acquire a lock on the repository with the default timing.
pub fn acquire(repo: &Repository, exclusive: bool, operation: &str) -> Result<LockGuard> {
    acquire_with(
        repo.backend().clone(),
        exclusive,
        operation,
        LockTimes::default(),
    )
}

/// Acquire a lock with explicit timing.
pub fn acquire_with(
    backend: Arc<dyn Backend>,
    exclusive: bool,
    operation: &str,
    times: LockTimes,
) -> Result<LockGuard> {
    let (own, info) = write_lock(backend.as_ref(), exclusive, operation)?;
    let conflict = match list_locks(backend.as_ref(), times.stale_after) {
        Ok(locks) => locks
            .into_iter()
            .filter(|l| l.name != own && !l.stale)
            .find(|l| exclusive || l.info.as_ref().is_none_or(|i| i.exclusive)),
        Err(e) => {
            let _ = backend.delete(ObjectKind::Lock, &own);
            return Err(e);
        }
    };
    if let Some(holder) = conflict {
        let _ = backend.delete(ObjectKind::Lock, &own);
        let who = match &holder.info {
            Some(i) => i.describe(),
            None => format!(
                "an unreadable lock object {}",
                ObjectKind::Lock.key(&holder.name)
            ),
        };
        return Err(Error::Locked(format!(
            "the repository at {} is locked: {who}; wait for it to finish, or, if that process \
             is no longer running, remove the lock with `hyperkeep unlock`",
            backend.location()
        )));
    }

    let current = Arc::new(Mutex::new(own));
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = {
        let backend = backend.clone();
        let current = current.clone();
        let operation = operation.to_string();
        std::thread::Builder::new()
            .name("hyperkeep-lock-refresh".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(times.refresh)
                {
                    // New object first, then delete the old one: the repository is never
                    // without our lock.
                    match write_lock(backend.as_ref(), exclusive, &operation) {
                        Ok((new, _)) => {
                            let old = match current.lock() {
                                Ok(mut n) => std::mem::replace(&mut *n, new),
                                Err(_) => break,
                            };
                            if let Err(e) = backend.delete(ObjectKind::Lock, &old) {
                                tracing::warn!("could not remove old lock {old}: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("could not refresh the repository lock: {e}"),
                    }
                }
            })
            .map_err(|e| Error::io("starting the lock refresh thread", e))?
    };
    Ok(LockGuard {
        backend,
        current,
        stop: Some(stop),
        thread: Some(thread),
        info,
    })
}

impl Repository {
    /// A shared lock (backups: any number at once, but no prune).
    pub fn lock_shared(&self, operation: &str) -> Result<LockGuard> {
        acquire(self, false, operation)
    }

    /// An exclusive lock (prune: nothing else at the same time).
    pub fn lock_exclusive(&self, operation: &str) -> Result<LockGuard> {
        acquire(self, true, operation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    fn backend() -> (tempfile::TempDir, Arc<dyn Backend>) {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.create_layout().unwrap();
        (dir, Arc::new(b))
    }

    fn put_lock(b: &dyn Backend, info: &LockInfo) -> String {
        let bytes = serde_json::to_vec(info).unwrap();
        let name = hash(&bytes).to_hex();
        b.put(ObjectKind::Lock, &name, &bytes).unwrap();
        name
    }

    fn other_host(exclusive: bool, time: String) -> LockInfo {
        LockInfo {
            hostname: "some-other-host".into(),
            pid: 1,
            time,
            exclusive,
            operation: "prune".into(),
            nonce: String::new(),
        }
    }

    #[test]
    fn shared_and_exclusive_conflicts() {
        let (_d, b) = backend();
        let t = LockTimes::default();
        let s1 = acquire_with(b.clone(), false, "backup", t).unwrap();
        let s2 = acquire_with(b.clone(), false, "backup", t).unwrap();
        assert_eq!(b.list(ObjectKind::Lock).unwrap().len(), 2);
        let err = acquire_with(b.clone(), true, "prune", t).unwrap_err();
        match &err {
            Error::Locked(m) => assert!(
                m.contains("backup") && m.contains("hyperkeep unlock"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // The failed attempt left nothing behind.
        assert_eq!(b.list(ObjectKind::Lock).unwrap().len(), 2);
        drop(s1);
        s2.release().unwrap();
        assert!(b.list(ObjectKind::Lock).unwrap().is_empty());

        let x = acquire_with(b.clone(), true, "prune", t).unwrap();
        assert!(matches!(
            acquire_with(b.clone(), false, "backup", t),
            Err(Error::Locked(_))
        ));
        assert!(matches!(
            acquire_with(b.clone(), true, "prune", t),
            Err(Error::Locked(_))
        ));
        drop(x);
        acquire_with(b.clone(), false, "backup", t).unwrap();
    }

    #[test]
    fn stale_locks_are_ignored_and_unlockable() {
        let (dir, b) = backend();
        let t = LockTimes::default();
        let old = (chrono::Utc::now() - chrono::Duration::hours(2))
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let stale = put_lock(b.as_ref(), &other_host(true, old));
        // A dead process on this host: stale at once, whatever its time.
        let dead = LockInfo {
            hostname: local_hostname(),
            pid: i32::MAX as u32 - 7,
            time: now_rfc3339(),
            exclusive: true,
            operation: "prune".into(),
            nonce: String::new(),
        };
        let dead_name = put_lock(b.as_ref(), &dead);
        let live = put_lock(b.as_ref(), &other_host(false, now_rfc3339()));
        let g = acquire_with(b.clone(), false, "backup", t).unwrap();
        let statuses = list_locks(b.as_ref(), STALE_AFTER).unwrap();
        let stale_of = |n: &str| statuses.iter().find(|s| s.name == n).unwrap().stale;
        assert!(
            stale_of(&stale) && stale_of(&dead_name) && !stale_of(&live) && !stale_of(&g.name())
        );
        drop(g);

        let repo = crate::repository::Repository::init(
            Arc::new(LocalBackend::new(dir.path())),
            "pw",
            crate::repository::InitOptions {
                kdf: Some(crate::crypto::KdfParams::FAST_FOR_TESTS),
                ..Default::default()
            },
        )
        .unwrap();
        let removed = unlock(&repo, false).unwrap();
        assert_eq!(removed.len(), 2);
        assert_eq!(b.list(ObjectKind::Lock).unwrap().len(), 1);
        assert_eq!(unlock(&repo, true).unwrap().len(), 1);
        assert!(b.list(ObjectKind::Lock).unwrap().is_empty());
    }

    #[test]
    fn refresh_replaces_the_lock_object() {
        let (_d, b) = backend();
        let t = LockTimes {
            refresh: Duration::from_millis(50),
            stale_after: STALE_AFTER,
        };
        let g = acquire_with(b.clone(), false, "backup", t).unwrap();
        let first = g.name();
        // Poll: under load the refresher may be slow, and between its write and its delete two
        // objects exist for a moment.
        let mut refreshed_and_alone = false;
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(25));
            let now = g.name();
            let listed: Vec<String> = b
                .list(ObjectKind::Lock)
                .unwrap()
                .into_iter()
                .map(|o| o.name)
                .collect();
            if now != first && listed == vec![now.clone()] {
                refreshed_and_alone = true;
                break;
            }
        }
        assert!(refreshed_and_alone);
        assert!(!b.exists(ObjectKind::Lock, &first).unwrap());
        drop(g);
        assert!(b.list(ObjectKind::Lock).unwrap().is_empty());
    }

    #[test]
    fn unreadable_lock_blocks_until_old() {
        let (_d, b) = backend();
        b.put(ObjectKind::Lock, &"ab".repeat(32), b"not json")
            .unwrap();
        assert!(matches!(
            acquire_with(b.clone(), false, "backup", LockTimes::default()),
            Err(Error::Locked(_))
        ));
        let short = LockTimes {
            refresh: REFRESH_INTERVAL,
            stale_after: Duration::ZERO,
        };
        std::thread::sleep(Duration::from_millis(20));
        acquire_with(b, true, "prune", short).unwrap();
    }
}
