//! Faults through the job engine with a real QEMU VM (one booted guest shared by the cases, in
//! this order, each leaving the VM as the next one needs it):
//! - a guest that ignores the power button: an offline job fails with a timeout, nothing is
//!   stored, the VM keeps running, the exit code is 1;
//! - the repository's disk full (a small tmpfs): the backup fails with "no space left", the VM
//!   keeps running on its own disk with no overlay left, older snapshots are intact and the
//!   repository checks clean once there is room again;
//! - no guest agent: `auto` falls back to a crash-consistent live backup with a warning (and the
//!   copy checks clean after journal replay), `live-app-only` fails with a clear error and
//!   leaves no checkpoint or overlay;
//! - the VM's QEMU process killed while the backup reads the frozen disk: that VM's backup is
//!   reported as failed, nothing is left behind once the next run has cleaned up, and every
//!   older snapshot still restores to a filesystem that checks clean.

#[path = "../../hypervisor/tests/qemu_common/mod.rs"]
mod qemu_common;
#[path = "common/qemu.rs"]
mod qemu_jobs;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hypervisor::qemu::QemuHypervisor;
use hypervisor::strategy::Method;
use hypervisor::{Hypervisor, VmState};
use jobs::run::VmStatus;
use qemu_common::*;
use qemu_jobs::*;
use repo::backup::{NoProgress, Progress};
use repo::repository::Repository;

/// A tmpfs mounted for the test; unmounted when dropped, also when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let (code, text) = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "hk-test-full"])
            .arg(dir));
        assert_eq!(
            code,
            0,
            "mount -t tmpfs {} failed (the test needs root): {text}",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let (code, text) = run(Command::new("umount").arg(&self.0));
        if code != 0 {
            eprintln!("umount {} failed ({text}); detaching it", self.0.display());
            let _ = run(Command::new("umount").arg("-l").arg(&self.0));
        }
    }
}

/// Fill the filesystem holding `dir` up to `leave` bytes with a file; returns it.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0x5au8; 64 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
    f.set_len(written.saturating_sub(leave)).unwrap();
    drop(f);
    path
}

/// Repository check reading every pack: no problems.
fn assert_repo_clean(repo: &Repository) {
    let check = repo::check::check(
        repo,
        &repo::check::CheckOptions {
            read_data: repo::check::ReadData::All,
        },
    )
    .unwrap();
    assert!(check.is_clean(), "{:?}", check.problems);
}

/// Kills the VM's QEMU at the first bytes the backup reads (the checkpoint exists by then).
struct KillWhileReading<'a> {
    hv: &'a QemuHypervisor,
    killed: AtomicBool,
}

impl Progress for KillWhileReading<'_> {
    fn start(&self, _total: u64) {}
    fn advance(&self, _bytes: u64) {
        if !self.killed.swap(true, Ordering::SeqCst) {
            let info = self.hv.vm(VM).unwrap();
            assert_eq!(
                info.existing_checkpoints.len(),
                1,
                "the backup reads before the checkpoint exists: {info:#?}"
            );
            self.hv.kill(VM).expect("kill the VM's QEMU");
        }
    }
    fn finish(&self) {}
}

/// Append `mib` MiB of random data to a file in the guest (new data a backup must store), and
/// wait until it is on the disk.
fn guest_noise(hv: &QemuHypervisor, mib: u32) {
    guest_sh(
        hv,
        &format!(
            "dd if=/dev/urandom of=/mnt/noise bs=1M count={mib} 2>/dev/null; sync; \
             echo HK-NOISE-DONE > /dev/console"
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(hv.console_log(VM))
        .unwrap_or_default()
        .contains("HK-NOISE-DONE")
    {
        assert!(
            Instant::now() < deadline,
            "the guest did not write its noise"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn job_faults_with_a_real_qemu_vm() {
    let started = Instant::now();
    let t = test_vm();
    let (hv, disk, scratch) = (&t.hv, t.disk.clone(), t.scratch.clone());
    let dir = t.tmp.path();
    // The repository lives on a small tmpfs so that its disk can be filled; the guard unmounts
    // it when dropped (before the temp dir goes), also when an assertion fails.
    let fs = Tmpfs::mount(&dir.join("small"), "48m");
    let repo = init_repo(&fs.0.join("repo"));
    boot(hv);

    // An older snapshot every fault must leave intact.
    let cfg = job(dir, "mode = \"auto\"");
    let before = wait_announced(hv, announced(hv));
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 0, "{rep:#?}");
    assert_eq!(out.consistency.as_deref(), Some("application"));
    let base_id = out.snapshot.clone().unwrap();
    let base_records = before;

    // (b) A guest that ignores the power button: offline fails with a timeout, nothing stored.
    guest_sh(hv, "killall acpid");
    std::thread::sleep(Duration::from_millis(500));
    let ids = snapshot_ids(&repo);
    let cfg = job(dir, "mode = \"offline\"\nshutdown_timeout = \"3s\"");
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 1, "{rep:#?}");
    assert_eq!((rep.failed, rep.succeeded), (1, 0));
    assert_eq!(out.status, VmStatus::Failed);
    assert_eq!(out.method, Some(Method::Shutdown));
    let err = out.error.clone().unwrap();
    assert!(
        err.contains("timed out")
            && err.contains("nothing was backed up")
            && err.contains("left running"),
        "{err}"
    );
    assert_eq!(out.snapshot, None);
    assert_eq!(out.downtime_ms, None);
    assert_eq!(snapshot_ids(&repo), ids, "a snapshot was recorded");
    assert_vm_untouched(hv, &disk);
    eprintln!("shutdown timeout done after {:?}", started.elapsed());

    // (d) The repository's disk full: new data (random, incompressible) to store and only
    //     256 KiB left on the tmpfs.
    guest_noise(hv, 8);
    let filler = fill(&fs.0, 256 << 10);
    let cfg = job(dir, "mode = \"auto\"\n\n[retention]\nkeep_last = 1");
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 1, "{rep:#?}");
    assert_eq!(out.status, VmStatus::Failed);
    assert_eq!(out.method, Some(Method::Live));
    let err = out.error.clone().unwrap();
    assert!(err.contains("no space left"), "{err}");
    assert_eq!(out.snapshot, None);
    assert_eq!(out.retention, None, "retention ran after a failed backup");
    assert_vm_untouched(hv, &disk);
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(snapshot_ids(&repo), ids, "snapshots changed");
    assert_repo_clean(&repo);
    eprintln!("disk full done after {:?}", started.elapsed());

    // (a) No guest agent: auto falls back to crash-consistent with a warning ...
    kill_agent(hv);
    let cfg = job(dir, "mode = \"auto\"");
    let before = wait_announced(hv, announced(hv));
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 0, "{rep:#?}");
    assert_eq!(out.method, Some(Method::Live));
    assert_eq!(out.consistency.as_deref(), Some("crash"));
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("crash-consistent") && w.contains("cannot take part")),
        "{:?}",
        out.warnings
    );
    let crash_id = out.snapshot.clone().unwrap();
    assert_vm_untouched(hv, &disk);
    let (snap, crash_records) = check_snapshot(&repo, &crash_id, &scratch, true, before);
    assert_eq!(snap.consistency.as_deref(), Some("crash"));
    assert_eq!(snap.mode.as_deref(), Some("live"));

    // ... and live-app-only fails, clearly, touching nothing.
    let ids = snapshot_ids(&repo);
    let cfg = job(dir, "mode = \"live-app-only\"");
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 1, "{rep:#?}");
    assert_eq!(out.status, VmStatus::Failed);
    let err = out.error.clone().unwrap();
    assert!(
        err.contains("live-app-only") && err.contains("guest agent do not answer"),
        "{err}"
    );
    assert_eq!(out.snapshot, None);
    assert_eq!(snapshot_ids(&repo), ids);
    assert_vm_untouched(hv, &disk);
    eprintln!("no agent done after {:?}", started.elapsed());

    // (c) The VM's QEMU killed while the backup reads the frozen disk. The copy itself is
    //     sound (the frozen disk does not change), but the VM stopped during its backup: that
    //     is reported as a failure, saying what happened and that nothing was left behind (the
    //     release merged the overlay offline).
    let ids = snapshot_ids(&repo);
    let killer = KillWhileReading {
        hv,
        killed: AtomicBool::new(false),
    };
    let cfg = job(dir, "mode = \"auto\"");
    let before_kill = wait_announced(hv, announced(hv));
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &killer);
    assert!(
        killer.killed.load(Ordering::SeqCst),
        "the backup read nothing"
    );
    assert_eq!(rep.exit_code(), 1, "{rep:#?}");
    assert_eq!(out.status, VmStatus::Failed);
    assert_eq!(out.consistency.as_deref(), Some("crash"));
    assert_eq!(out.retention, None);
    let err = out.error.clone().unwrap();
    assert!(
        err.contains("stopped while checkpoint")
            && err.contains("QEMU process exited")
            && err.contains("no checkpoint is left behind"),
        "{err}"
    );
    assert!(!err.contains("next run"), "{err}");
    let killed_id = out
        .snapshot
        .clone()
        .expect("the copy was stored before the release");
    assert!(err.contains(&killed_id[..8]), "{err}");
    let info = hv.vm(VM).unwrap();
    assert_eq!(info.state, VmState::Off);
    assert!(info.existing_checkpoints.is_empty(), "{info:#?}");
    assert_eq!(info.disks[0].path.as_deref(), Some(disk.as_path()));
    assert_eq!(overlays(hv), Vec::<PathBuf>::new());
    // Every record the guest announced before it died is on its disk (the overlay's part was
    // merged into it).
    let announced_at_kill = announced(hv);
    // The next run finds nothing to clean up and backs the (now off) VM up as it is.
    let (rep, out) = run_vm_job(&cfg, hv, &repo, &NoProgress);
    assert_eq!(rep.exit_code(), 0, "{rep:#?}");
    assert_eq!(out.method, Some(Method::AsIs));
    assert_eq!(out.cleaned_up, Vec::<String>::new());
    assert!(hv.cleanup_leftovers(VM).unwrap().is_empty());
    assert_eq!(overlays(hv), Vec::<PathBuf>::new());
    assert_eq!(hv.vm(VM).unwrap().state, VmState::Off);
    let after_id = out.snapshot.clone().unwrap();
    // The disk of a killed guest needs journal replay.
    check_snapshot(&repo, &after_id, &scratch, true, announced_at_kill);
    check_snapshot(&repo, &killed_id, &scratch, true, before_kill);
    // Older snapshots still restore.
    for id in &ids {
        assert!(snapshot_ids(&repo).contains(id), "snapshot {id} is gone");
    }
    check_snapshot(&repo, &base_id, &scratch, false, base_records);
    check_snapshot(&repo, &crash_id, &scratch, true, crash_records);
    assert_repo_clean(&repo);
    eprintln!("total {:?}", started.elapsed());
}
