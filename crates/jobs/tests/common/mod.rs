//! Shared fixtures: a repository and a small VM (a real VHDX with data + a .vmcx) in a temp
//! dir, and a Hyper-V implementation fed canned PowerShell outputs that point at those files.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hypervisor::hyperv::{CannedRunner, HyperVHypervisor, Op, PsOutput};
use repo::backend::{Backend, LocalBackend};
use repo::crypto::KdfParams;
use repo::repository::{InitOptions, Repository};
use repo::snapshot::{list_snapshots, Snapshot};
use serde_json::{json, Value};
use tempfile::TempDir;
use vdisk::{CreateOptions, DiskFormat, OpenOptions, VirtualDisk, VirtualDiskMut};

pub const MIB: u64 = 1 << 20;
pub const DISK_SIZE: u64 = 8 * MIB;

pub struct Env {
    pub dir: TempDir,
    pub repo: Repository,
    pub disk: PathBuf,
    pub vmcx: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("repo")));
        let repo = Repository::init(
            backend,
            "pw",
            InitOptions {
                chunk_size: MIB as u32,
                pack_size: MIB,
                compression_level: 1,
                kdf: Some(KdfParams::FAST_FOR_TESTS),
                ..Default::default()
            },
        )
        .unwrap();
        let disk = dir.path().join("sys.vhdx");
        // 1 MiB blocks, so the allocated ranges are exactly the chunks written.
        let copts = CreateOptions {
            block_size: Some(MIB as u32),
            ..CreateOptions::new(DiskFormat::Vhdx, DISK_SIZE)
        };
        let mut d = vdisk::create(&disk, &copts).unwrap();
        d.write_at(&pattern(64 * 1024, 1), 0).unwrap();
        d.write_at(&pattern(128 * 1024, 2), 3 * MIB + 4096).unwrap();
        d.flush().unwrap();
        drop(d);
        let vmcx = dir.path().join("5F0B2A4E.vmcx");
        std::fs::write(&vmcx, b"fake vm configuration\n").unwrap();
        Env {
            dir,
            repo,
            disk,
            vmcx,
        }
    }

    /// A second (third, ...) disk of the VM beside `sys.vhdx`: 1 MiB blocks, `writes` applied.
    pub fn add_disk(&self, name: &str, size: u64, writes: &[(u64, Vec<u8>)]) -> PathBuf {
        let path = self.dir.path().join(name);
        let copts = CreateOptions {
            block_size: Some(MIB as u32),
            ..CreateOptions::new(DiskFormat::Vhdx, size)
        };
        let mut d = vdisk::create(&path, &copts).unwrap();
        for (offset, data) in writes {
            d.write_at(data, *offset).unwrap();
        }
        d.flush().unwrap();
        path
    }

    pub fn write_disk(&self, offset: u64, data: &[u8]) {
        self.write_disk_at(&self.disk, offset, data)
    }

    pub fn write_disk_at(&self, disk: &Path, offset: u64, data: &[u8]) {
        let mut d = vdisk::open_mut(
            disk,
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        d.write_at(data, offset).unwrap();
        d.flush().unwrap();
    }

    pub fn snapshots(&self) -> Vec<(String, Snapshot)> {
        list_snapshots(&self.repo).unwrap()
    }

    /// The backed-up disk of a snapshot, read back whole through the repository.
    pub fn snapshot_disk_bytes(&self, snap: &Snapshot) -> Vec<u8> {
        self.snapshot_disk_bytes_at(snap, 0)
    }

    /// Disk `i` of a snapshot, read back whole through the repository.
    pub fn snapshot_disk_bytes_at(&self, snap: &Snapshot, i: usize) -> Vec<u8> {
        let index = self.repo.load_index().unwrap();
        let d = repo::restore::SnapshotDisk::open(&self.repo, &index, &snap.disks[i]).unwrap();
        let mut buf = vec![0u8; d.info().virtual_size as usize];
        d.read_at(&mut buf, 0).unwrap();
        buf
    }

    pub fn disk_bytes(&self) -> Vec<u8> {
        self.disk_bytes_of(&self.disk)
    }

    /// The guest view of one of the VM's disks, read whole.
    pub fn disk_bytes_of(&self, disk: &Path) -> Vec<u8> {
        let d = vdisk::open(disk, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; d.info().virtual_size as usize];
        d.read_at(&mut buf, 0).unwrap();
        buf
    }

    pub fn path(&self, p: &Path) -> String {
        p.to_string_lossy().into_owned()
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8 | 1)
        .collect()
}

/// What `scripts::INVENTORY` prints for one VM (the shape of the hypervisor crate's fixtures).
pub fn vm_json(name: &str, state: &str, disks: &[Value], vss: bool, config: &[String]) -> Value {
    json!({
        "Name": name, "Id": "5f0b2a4e-1c3d-4e5f-8a9b-0c1d2e3f4a5b", "State": state,
        "Status": "Operating normally", "Generation": 2, "Version": "10.0",
        "Path": "/vms", "ConfigurationLocation": "/vms", "CheckpointType": "Production",
        "Heartbeat": "OkApplicationsHealthy", "IntegrationServicesState": "Up to date",
        "IntegrationServicesVersion": {"Major":10,"Minor":0,"Build":17763,"Revision":1},
        "HardDrives": disks,
        "IntegrationServices": [
            {"Name":"Heartbeat","Enabled":true,"PrimaryStatusDescription":"OK"},
            {"Name":"Shutdown","Enabled":true,"PrimaryStatusDescription":"OK"},
            {"Name":"VSS","Enabled":vss,"PrimaryStatusDescription": if vss {"OK"} else {""}}
        ],
        "Snapshots": [],
        "ConfigFiles": config,
    })
}

pub fn drive(path: &str, location: u32) -> Value {
    json!({"Path": path, "ControllerType":"SCSI","ControllerNumber":0,"ControllerLocation":location,"DiskNumber":null})
}

pub fn passthrough_drive(location: u32) -> Value {
    json!({"Path": "Disk 2 2.00 TB Bus 0 Lun 2 Target 0", "ControllerType":"SCSI","ControllerNumber":0,"ControllerLocation":location,"DiskNumber":2})
}

pub fn inventory(vms: &[Value]) -> PsOutput {
    PsOutput::ok(Value::Array(vms.to_vec()).to_string())
}

/// The healthy VM `sql01` on `env`'s files.
pub fn healthy(env: &Env, state: &str) -> Value {
    vm_json(
        "sql01",
        state,
        &[drive(&env.path(&env.disk), 0)],
        true,
        &[env.path(&env.vmcx)],
    )
}

pub fn checkpoint_ok(env: &Env) -> PsOutput {
    PsOutput::ok(
        json!({
            "InstanceId": "Microsoft:CP1",
            "FrozenDisks": [env.path(&env.disk)],
            "NewTops": [env.path(&env.dir.path().join("sys_CP1.avhdx"))],
            "ConfigFiles": [env.path(&env.vmcx)],
        })
        .to_string(),
    )
}

pub fn release_ok(rct: &str) -> PsOutput {
    PsOutput::ok(json!({"ReferencePoint": format!("RP-{rct}"), "RctIds": [rct]}).to_string())
}

pub fn no_leftovers() -> PsOutput {
    PsOutput::ok(r#"{"Removed":[]}"#)
}

/// A runner answering every step of a healthy live backup.
pub fn live_runner(env: &Env) -> CannedRunner {
    CannedRunner::new()
        .respond(Op::Inventory, inventory(&[healthy(env, "Running")]))
        .respond(Op::CleanupLeftovers, no_leftovers())
        .respond(Op::CreateCheckpoint, checkpoint_ok(env))
        .respond(Op::ReleaseCheckpoint, release_ok("rct1"))
}

pub fn hv(runner: CannedRunner) -> (HyperVHypervisor, Arc<CannedRunner>) {
    let r = Arc::new(runner);
    (HyperVHypervisor::new(Box::new(r.clone())), r)
}

pub fn ops(r: &CannedRunner) -> Vec<Op> {
    r.calls().iter().map(|c| c.op).collect()
}

pub fn args(r: &CannedRunner, op: Op) -> Vec<Value> {
    r.calls()
        .iter()
        .filter(|c| c.op == op)
        .map(|c| serde_json::from_str(&c.stdin_json).unwrap())
        .collect()
}
