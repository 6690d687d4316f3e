//! Shared by the qemu_* tests: the test VM's assets (from `testvm/build.sh`), booting it, and
//! checking disk copies from outside (e2fsck, debugfs, records with checksums).
//! The job engine's QEMU tests (crates/jobs/tests/qemu_job*.rs) include this file too, with
//! `#[path]`: keep its dependencies to hypervisor, vdisk, serde_json and tempfile.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hypervisor::qemu::{build_testvm, testvm_definition, QemuHypervisor};
use hypervisor::Hypervisor;

pub const VM: &str = "t1";
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

pub fn testvm_assets() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    build_testvm(&repo).unwrap_or_else(|e| panic!("{e}"))
}

pub fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is the tool installed?)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Copy the guest view of a (possibly frozen, possibly in-use-by-QEMU) disk to raw with vdisk.
pub fn copy_to_raw(src: &Path, dst: &Path) {
    let disk = vdisk::open(src, &vdisk::OpenOptions::default()).expect("vdisk opens the disk");
    let opts = vdisk::ConvertOptions {
        format: vdisk::DiskFormat::Raw,
        fixed: false,
        block_size: None,
    };
    vdisk::convert(&*disk, dst, &opts, None).expect("vdisk converts the disk");
}

pub fn e2fsck_clean(raw: &Path) {
    let (code, text) = run(Command::new("e2fsck").arg("-fn").arg(raw));
    assert_eq!(
        code,
        0,
        "e2fsck -fn {} is not clean:\n{text}",
        raw.display()
    );
}

pub fn e2fsck_repair(raw: &Path) {
    let (code, text) = run(Command::new("e2fsck").arg("-fy").arg(raw));
    // 0: clean, 1: errors corrected (journal replay counts).
    assert!(
        code == 0 || code == 1,
        "e2fsck -fy {} failed ({code}):\n{text}",
        raw.display()
    );
    e2fsck_clean(raw);
}

/// Read /records.log out of an ext4 image and check it: consecutive records 1..=n, each with the
/// right checksum. Only a crash-consistent copy may end in an incomplete line. Returns n.
pub fn check_records(raw: &Path, scratch: &Path, allow_partial_tail: bool) -> u64 {
    let out = scratch.join("records.txt");
    let _ = std::fs::remove_file(&out);
    let (code, text) = run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /records.log {}", out.display()))
        .arg(raw));
    assert_eq!(code, 0, "debugfs failed: {text}");
    let data = std::fs::read(&out)
        .unwrap_or_else(|e| panic!("debugfs wrote no records file ({e}): {text}"));
    let mut n = 0u64;
    let mut rest = &data[..];
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        let line = std::str::from_utf8(&rest[..i]).expect("record is text");
        n += 1;
        let sum = sha256_hex(format!("hk-record-{n}").as_bytes());
        assert_eq!(
            line,
            format!("rec {n:08} {sum}"),
            "record {n} is wrong in {}",
            raw.display()
        );
        rest = &rest[i + 1..];
    }
    if !allow_partial_tail {
        assert!(
            rest.is_empty(),
            "{} ends in a partial record: {:?}",
            raw.display(),
            String::from_utf8_lossy(rest)
        );
    }
    n
}

/// sha256 through the system tool: the guest uses busybox's, the check must be independent.
pub fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// The highest record number the guest announced on its console (announced after its sync, so
/// it is durable on the disk).
pub fn announced(hv: &QemuHypervisor) -> u64 {
    let text = std::fs::read_to_string(hv.console_log(VM)).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("HK-REC ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

pub fn wait_announced(hv: &QemuHypervisor, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = announced(hv);
        if n > above {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the guest wrote no records past {above}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Shuts the VM down and checks what its live disk ends with: `qemu-img check` clean, the
/// filesystem clean, every record the guest announced before the shutdown, and more than
/// `more_than` records (the count in the last backup's copy). Returns the record count.
pub fn shutdown_and_check_live_disk(
    hv: &QemuHypervisor,
    disk: &Path,
    scratch: &Path,
    more_than: u64,
) -> u64 {
    let last = wait_announced(hv, announced(hv));
    hv.shutdown(VM, Duration::from_secs(60)).unwrap();
    let (code, text) = run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(disk));
    assert_eq!(code, 0, "qemu-img check of the live disk:\n{text}");
    let fin = scratch.join("final.raw");
    copy_to_raw(disk, &fin);
    e2fsck_clean(&fin);
    let n = check_records(&fin, scratch, false);
    assert!(
        n >= last && n > more_than,
        "live disk holds {n} records, {last} were announced"
    );
    n
}

/// A QEMU hypervisor in a fresh temp dir with one defined (not started) test VM on a copy of the
/// template disk. Dropping the hypervisor kills the VM.
pub struct TestVm {
    pub tmp: tempfile::TempDir,
    pub disk: PathBuf,
    /// Blank data disks after the system disk (`test_vm_with_data_disks`).
    pub data_disks: Vec<PathBuf>,
    pub scratch: PathBuf,
    pub hv: QemuHypervisor,
}

pub fn test_vm() -> TestVm {
    test_vm_with_data_disks(&[])
}

/// The test VM with blank dynamic VHDX data disks (1 MiB blocks) of these sizes after its system
/// disk: `data1.vhdx`, ... in `TestVm::data_disks`, /dev/vdb, ... in the guest.
pub fn test_vm_with_data_disks(sizes: &[u64]) -> TestVm {
    let assets = testvm_assets();
    let tmp = tempfile::Builder::new()
        .prefix("hkq")
        .tempdir_in("/tmp")
        .unwrap();
    let disk = tmp.path().join("disk.vhdx");
    std::fs::copy(assets.join("disk-template.vhdx"), &disk).unwrap();
    let data_disks: Vec<PathBuf> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let path = tmp.path().join(format!("data{}.vhdx", i + 1));
            let opts = vdisk::CreateOptions {
                block_size: Some(1 << 20),
                ..vdisk::CreateOptions::new(vdisk::DiskFormat::Vhdx, size)
            };
            drop(vdisk::create(&path, &opts).unwrap());
            path
        })
        .collect();
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let hv = QemuHypervisor::new(tmp.path().join("run"))
        .unwrap()
        .kill_on_drop(true);
    let disks = std::iter::once(disk.clone())
        .chain(data_disks.iter().cloned())
        .collect();
    hv.define(&testvm_definition(VM, &assets, disks)).unwrap();
    TestVm {
        tmp,
        disk,
        data_disks,
        scratch,
        hv,
    }
}

/// Run a shell command in the guest through the agent's guest-exec (fire and forget).
pub fn guest_sh(hv: &QemuHypervisor, script: &str) {
    let mut agent = hv.agent(VM, Duration::from_secs(10)).expect("guest agent");
    agent
        .execute(
            "guest-exec",
            Some(serde_json::json!({"path": "/bin/sh", "arg": ["-c", script]})),
            Duration::from_secs(10),
        )
        .expect("guest-exec");
}
