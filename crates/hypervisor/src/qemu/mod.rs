//! QEMU/KVM through QMP and the guest agent, for VMs that hyperkeep launches itself from a
//! [`VmDefinition`] (a JSON file standing in for Hyper-V's .vmcx).
//!
//! How each operation maps onto QEMU (see `docs` / the QEMU brief for the reasoning):
//! - checkpoint: `guest-fsfreeze-freeze` (application-consistent only) →
//!   `blockdev-snapshot-sync` of every disk to a qcow2 overlay → `guest-fsfreeze-thaw`. The base
//!   files are then stable and readable from outside, like a Hyper-V checkpoint's parent VHDX.
//! - release: `block-commit` of each overlay into its base (an "active commit": wait for
//!   `BLOCK_JOB_READY`, `block-job-complete`, wait for `BLOCK_JOB_COMPLETED`), delete the overlay.
//! - saved state: `stop` → `migrate-set-parameters mode=cpr-reboot` → `migrate file:` → `quit`;
//!   resume starts QEMU with `-incoming defer` → `migrate-incoming` → `cont`. (Plain migration is
//!   refused: the VHDX driver blocks live migration; cpr-reboot needs QEMU ≥ 8.2.)
//! - offline: `system_powerdown`, wait for QEMU to exit.
//! - change tracking: each checkpoint adds a dirty bitmap on every base node in the same
//!   `transaction` as the overlay; the next backup reads it through a short-lived read-only NBD
//!   export (`qemu-img map` with `x-dirty-bitmap`). The bitmaps live in the QEMU process (VHDX
//!   cannot hold persistent ones), so a QEMU restart (saved state, offline) loses tracking and
//!   `changed_ranges` answers `None`.
//!
//! Everything about a VM lives in `<runtime_dir>/<name>/`: the definition (`vm.json`), the QMP
//! and agent sockets, the serial console log, the checkpoint record (`checkpoint.json`, written
//! *before* the overlays are created so a crash at any point leaves something
//! [`QemuHypervisor::cleanup_leftovers`] can undo), overlays and the saved state.
//!
//! We talk QMP ourselves (a few hundred lines) rather than through libvirt: the test VMs must run
//! anywhere QEMU runs, and the operations are few and precisely specified.

mod agent;
mod qmp;
mod wire;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use agent::Agent;
pub use qmp::Qmp;
pub use wire::MAX_SOCKET_PATH;

use crate::{
    ChangeToken, Checkpoint, Consistency, DiskAttachment, Error, GuestIntegration, Hypervisor,
    Result, VmInfo, VmState,
};

/// What QEMU runs: a direct-kernel-boot VM with virtio disks and a guest-agent port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    pub name: String,
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub append: String,
    /// Disk files (VHDX, VHD, qcow2 or raw, by extension), attached as virtio disks in order.
    pub disks: Vec<PathBuf>,
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub cpus: u32,
    /// `tcg` (software emulation, works everywhere) or `kvm`.
    #[serde(default = "tcg")]
    pub accel: String,
    /// A line the guest prints on its serial console once it is up; `wait_booted` accepts it as
    /// well as an answering guest agent.
    #[serde(default)]
    pub boot_marker: Option<String>,
}

/// The line the test VM of `testvm/` prints on its console once it writes records.
pub const TESTVM_BOOT_MARKER: &str = "HK-BOOTED";

/// The definition of the test VM built by `testvm/build.sh` (its output directory is
/// `assets_dir`): TCG, 256 MiB, serial console, the boot marker above.
pub fn testvm_definition(name: &str, assets_dir: &Path, disks: Vec<PathBuf>) -> VmDefinition {
    VmDefinition {
        name: name.into(),
        kernel: assets_dir.join("vmlinuz"),
        initrd: Some(assets_dir.join("initrd.cpio.gz")),
        append: "console=ttyS0 quiet panic=-1".into(),
        disks,
        memory_mib: 256,
        cpus: 1,
        accel: "tcg".into(),
        boot_marker: Some(TESTVM_BOOT_MARKER.into()),
    }
}

/// Run `testvm/build.sh` of the repository at `repo_root` (idempotent; needs root the first time)
/// and return its output directory. The error carries the script's output.
pub fn build_testvm(repo_root: &Path) -> Result<PathBuf> {
    let script = repo_root.join("testvm/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(io_err(format!("cannot run {}", script.display())))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(Error::Operation(format!(
            "{} failed (it needs root for apt the first time):\n{stdout}\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let dir = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    for f in ["vmlinuz", "initrd.cpio.gz", "disk-template.vhdx"] {
        if !dir.join(f).is_file() {
            return Err(Error::Operation(format!(
                "{} did not produce {}",
                script.display(),
                dir.join(f).display()
            )));
        }
    }
    Ok(dir)
}

fn one() -> u32 {
    1
}
fn tcg() -> String {
    "tcg".into()
}

/// The record of an active checkpoint, kept in the runtime directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CheckpointRecord {
    id: String,
    consistency: Consistency,
    bases: Vec<PathBuf>,
    overlays: Vec<PathBuf>,
}

const CHECKPOINT_FILE: &str = "checkpoint.json";
const SAVED_MARKER: &str = "saved.json";
const STATE_FILE: &str = "state.bin";
const DEFINITION_FILE: &str = "vm.json";

const AGENT_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);
/// A present agent answers the resync within a second even in a busy TCG guest.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

pub struct QemuHypervisor {
    runtime_dir: PathBuf,
    qemu_binary: PathBuf,
    qemu_img: PathBuf,
    kill_on_drop: bool,
    /// QEMU processes this object started; only these are ever killed.
    children: Mutex<HashMap<String, Child>>,
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Operation(format!(
            "invalid VM name {name:?}: use 1-64 letters, digits, '.', '_' or '-'"
        )))
    }
}

/// QEMU option values separate sub-options with ',': a literal comma is written twice.
fn qemu_escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn disk_format(p: &Path) -> &'static str {
    match p
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("vhdx") => "vhdx",
        Some("vhd") => "vpc",
        Some("qcow2") => "qcow2",
        _ => "raw",
    }
}

fn write_json_atomic(path: &Path, v: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let data = serde_json::to_vec_pretty(v).map_err(|e| Error::Parse(e.to_string()))?;
    fs::write(&tmp, data).map_err(io_err(format!("cannot write {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!(
        "cannot rename {} into place",
        tmp.display()
    )))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| Error::Parse(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            context: format!("cannot read {}", path.display()),
            source: e,
        }),
    }
}

fn remove_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::Io {
            context: format!("cannot delete {}", path.display()),
            source: e,
        }),
    }
}

impl QemuHypervisor {
    /// VMs are defined under `runtime_dir` (created if missing). Keep it short: the sockets inside
    /// must stay under the unix-socket path limit.
    pub fn new(runtime_dir: impl Into<PathBuf>) -> Result<Self> {
        let runtime_dir = runtime_dir.into();
        fs::create_dir_all(&runtime_dir).map_err(io_err(format!(
            "cannot create the runtime directory {}",
            runtime_dir.display()
        )))?;
        Ok(QemuHypervisor {
            runtime_dir,
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            kill_on_drop: false,
            children: Mutex::new(HashMap::new()),
        })
    }

    /// Kill the QEMU processes this object started when it is dropped (tests: no VM outlives a
    /// failed test).
    pub fn kill_on_drop(mut self, yes: bool) -> Self {
        self.kill_on_drop = yes;
        self
    }

    pub fn with_qemu_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.qemu_binary = path.into();
        self
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.runtime_dir.join(name)
    }

    /// The guest's serial console output of the current run.
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("console.log")
    }

    /// Write (or replace) a VM's definition. Refused while that VM is running.
    pub fn define(&self, def: &VmDefinition) -> Result<()> {
        check_name(&def.name)?;
        if def.disks.is_empty() {
            return Err(Error::Operation(format!("VM {} has no disks", def.name)));
        }
        let dir = self.vm_dir(&def.name);
        fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
        for sock in ["qmp.sock", "qga.sock"] {
            let p = dir.join(sock);
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(Error::Operation(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter runtime \
                     directory or VM name",
                    p.display()
                )));
            }
        }
        if self.is_running(&def.name)? {
            return Err(Error::Operation(format!(
                "VM {} is running; shut it down before redefining it",
                def.name
            )));
        }
        write_json_atomic(&dir.join(DEFINITION_FILE), def)
    }

    pub fn definition(&self, name: &str) -> Result<VmDefinition> {
        check_name(name)?;
        read_json(&self.vm_dir(name).join(DEFINITION_FILE))?.ok_or_else(|| {
            Error::NotFound(format!(
                "no QEMU VM named {name} under {}",
                self.runtime_dir.display()
            ))
        })
    }

    fn checkpoint_record(&self, name: &str) -> Result<Option<CheckpointRecord>> {
        read_json(&self.vm_dir(name).join(CHECKPOINT_FILE))
    }

    /// Is the VM's QEMU process alive? Our own children are reaped here; a QEMU started by an
    /// earlier hyperkeep process is found through its pid file.
    pub fn is_running(&self, name: &str) -> Result<bool> {
        {
            let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(child) = children.get_mut(name) {
                match child.try_wait() {
                    Ok(None) => return Ok(true),
                    _ => {
                        children.remove(name);
                        return Ok(false);
                    }
                }
            }
        }
        let pidfile = self.vm_dir(name).join("qemu.pid");
        let Ok(text) = fs::read_to_string(&pidfile) else {
            return Ok(false);
        };
        let Ok(pid) = text.trim().parse::<u32>() else {
            return Ok(false);
        };
        // The pid may have been reused: it is our VM only if it is a QEMU with our socket.
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let qmp = self.vm_dir(name).join("qmp.sock");
        let needle = qmp.display().to_string();
        Ok(String::from_utf8_lossy(&cmdline).contains(&needle))
    }

    fn wait_exit(&self, name: &str, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running(name)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn qmp(&self, name: &str) -> Result<Qmp> {
        Qmp::connect(&self.vm_dir(name).join("qmp.sock"))
    }

    pub fn agent(&self, name: &str, timeout: Duration) -> Result<Agent> {
        Agent::connect(&self.vm_dir(name).join("qga.sock"), timeout)
    }

    /// Kill a VM's QEMU process (only one this object started): for tests and fault handling.
    pub fn kill(&self, name: &str) -> Result<()> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        match children.remove(name) {
            Some(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
                Ok(())
            }
            None => Err(Error::NotFound(format!(
                "VM {name} was not started by this hyperkeep process"
            ))),
        }
    }

    fn launch(&self, name: &str, incoming: bool) -> Result<()> {
        let def = self.definition(name)?;
        let dir = self.vm_dir(name);
        for f in ["qmp.sock", "qga.sock", "console.log", "qemu.pid"] {
            remove_if_exists(&dir.join(f))?;
        }
        let mut cmd = Command::new(&self.qemu_binary);
        cmd.arg("-name").arg(&def.name);
        cmd.arg("-machine").arg(format!("q35,accel={}", def.accel));
        cmd.args([
            "-smp",
            &def.cpus.to_string(),
            "-m",
            &def.memory_mib.to_string(),
        ]);
        cmd.args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-nic",
            "none",
            "-no-reboot",
        ]);
        cmd.arg("-serial")
            .arg(format!("file:{}", qemu_escape(&dir.join("console.log"))));
        cmd.arg("-kernel").arg(&def.kernel);
        if let Some(initrd) = &def.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        if !def.append.is_empty() {
            cmd.arg("-append").arg(&def.append);
        }
        for (i, disk) in def.disks.iter().enumerate() {
            cmd.arg("-drive").arg(format!(
                "file={},format={},if=none,id=d{i},node-name=base{i}",
                qemu_escape(disk),
                disk_format(disk)
            ));
            cmd.arg("-device").arg(format!("virtio-blk-pci,drive=d{i}"));
        }
        cmd.args(["-device", "virtio-serial-pci"]);
        cmd.arg("-chardev").arg(format!(
            "socket,path={},server=on,wait=off,id=qga0",
            qemu_escape(&dir.join("qga.sock"))
        ));
        cmd.args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
        cmd.arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            qemu_escape(&dir.join("qmp.sock"))
        ));
        cmd.arg("-pidfile").arg(dir.join("qemu.pid"));
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let log_path = dir.join("qemu.log");
        let log = fs::File::create(&log_path)
            .map_err(io_err(format!("cannot create {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io_err("cannot duplicate a file handle".into()))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        tracing::info!(vm = name, "starting QEMU");
        let child = cmd.spawn().map_err(io_err(format!(
            "cannot run {} (install qemu-system-x86)",
            self.qemu_binary.display()
        )))?;
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), child);

        // QEMU creates the QMP socket early; wait until it answers.
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        loop {
            if !self.is_running(name)? {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(Error::Operation(format!(
                    "QEMU for VM {name} exited at start: {}",
                    log.trim().chars().take(2000).collect::<String>()
                )));
            }
            if self.qmp(name).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.kill(name);
                return Err(Error::Timeout(format!(
                    "QEMU for VM {name} did not open its monitor socket"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn require_running(&self, name: &str, what: &str) -> Result<()> {
        self.definition(name)?;
        if self.is_running(name)? {
            Ok(())
        } else {
            Err(Error::Operation(format!(
                "cannot {what}: VM {name} is not running"
            )))
        }
    }

    fn state(&self, name: &str) -> Result<VmState> {
        if !self.is_running(name)? {
            return Ok(if self.vm_dir(name).join(SAVED_MARKER).exists() {
                VmState::Saved
            } else {
                VmState::Off
            });
        }
        let Ok(mut qmp) = self.qmp(name) else {
            return Ok(VmState::Starting);
        };
        let status = qmp.execute("query-status", None)?;
        Ok(
            match status.get("status").and_then(Value::as_str).unwrap_or("") {
                "running" => VmState::Running,
                "paused" | "suspended" | "debug" => VmState::Paused,
                "inmigrate" | "prelaunch" | "restore-vm" => VmState::Starting,
                "finish-migrate" | "postmigrate" | "save-vm" => VmState::Saving,
                "shutdown" => VmState::Stopping,
                _ => VmState::Other,
            },
        )
    }

    fn guest_integration(&self, name: &str, running: bool) -> GuestIntegration {
        let mut g = GuestIntegration::default();
        if !running {
            g.notes
                .push("VM not running: guest agent not checked".into());
            return g;
        }
        let probe = || -> Result<Value> {
            let mut agent = self.agent(name, AGENT_PROBE_TIMEOUT)?;
            agent.execute("guest-ping", None, AGENT_PROBE_TIMEOUT)?;
            agent.execute("guest-info", None, AGENT_PROBE_TIMEOUT)
        };
        match probe() {
            Ok(info) => {
                g.agent_responding = true;
                let version = info.get("version").and_then(Value::as_str).unwrap_or("?");
                g.notes.push(format!("guest agent {version} answers"));
                let enabled = |cmd: &str| {
                    info.get("supported_commands")
                        .and_then(Value::as_array)
                        .is_some_and(|cmds| {
                            cmds.iter().any(|c| {
                                c.get("name").and_then(Value::as_str) == Some(cmd)
                                    && c.get("enabled").and_then(Value::as_bool) == Some(true)
                            })
                        })
                };
                g.backup_service_enabled = [
                    "guest-fsfreeze-freeze",
                    "guest-fsfreeze-thaw",
                    "guest-fsfreeze-status",
                ]
                .iter()
                .all(|c| enabled(c));
                g.notes.push(if g.backup_service_enabled {
                    "fsfreeze available".into()
                } else {
                    "fsfreeze not available in the guest agent".into()
                });
            }
            Err(e) => g.notes.push(format!("guest agent not answering: {e}")),
        }
        g
    }

    fn thaw(&self, name: &str) -> Result<()> {
        let mut agent = self.agent(name, AGENT_CONNECT_TIMEOUT)?;
        agent.execute("guest-fsfreeze-thaw", None, FREEZE_TIMEOUT)?;
        Ok(())
    }

    /// Active commit of overlay node `ov{i}` into `base{i}`.
    fn commit_online(qmp: &mut Qmp, i: usize) -> Result<()> {
        let job = format!("hk-commit-{i}");
        qmp.execute(
            "block-commit",
            Some(
                json!({"job-id": job, "device": format!("ov{i}"), "base-node": format!("base{i}")}),
            ),
        )?;
        let is_job = |d: &Value| d.get("device").and_then(Value::as_str) == Some(job.as_str());
        // A failed job reports COMPLETED (with an error) without READY: watch for both.
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            if let Some(pos) = qmp.events().iter().position(|e| {
                e.get("event").and_then(Value::as_str) == Some("BLOCK_JOB_COMPLETED")
                    && is_job(e.get("data").unwrap_or(&Value::Null))
            }) {
                let e = qmp.events()[pos].clone();
                let msg = e["data"]
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("ended before it was ready");
                return Err(Error::Operation(format!(
                    "merging overlay {i} failed: {msg}"
                )));
            }
            match qmp.wait_event("BLOCK_JOB_READY", Duration::from_millis(500), is_job) {
                Ok(_) => break,
                Err(Error::Timeout(_)) if Instant::now() < deadline => continue,
                Err(e) => return Err(e),
            }
        }
        qmp.execute("block-job-complete", Some(json!({"device": job})))?;
        let done = qmp.wait_event("BLOCK_JOB_COMPLETED", JOB_TIMEOUT, is_job)?;
        if let Some(msg) = done["data"].get("error").and_then(Value::as_str) {
            return Err(Error::Operation(format!(
                "merging overlay {i} failed: {msg}"
            )));
        }
        Ok(())
    }

    fn node_names(qmp: &mut Qmp) -> Result<Vec<String>> {
        let nodes = qmp.execute("query-named-block-nodes", Some(json!({"flat": true})))?;
        Ok(nodes
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.get("node-name").and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Merge a VM-less overlay into its base with `qemu-img commit` (QEMU is not running).
    fn commit_offline(&self, overlay: &Path) -> Result<()> {
        let out = Command::new(&self.qemu_img)
            .args(["commit", "-q", "-f", "qcow2"])
            .arg(overlay)
            .output()
            .map_err(io_err(format!(
                "cannot run {} (install qemu-utils)",
                self.qemu_img.display()
            )))?;
        if !out.status.success() {
            return Err(Error::Operation(format!(
                "qemu-img commit {} failed: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Merge whatever overlays of `record` exist, online or offline, then forget the record.
    fn merge_record(&self, name: &str, record: &CheckpointRecord) -> Result<Vec<String>> {
        let mut done = Vec::new();
        if self.is_running(name)? {
            let mut qmp = self.qmp(name)?;
            let nodes = Self::node_names(&mut qmp)?;
            for i in 0..record.overlays.len() {
                if nodes.iter().any(|n| n == &format!("ov{i}")) {
                    Self::commit_online(&mut qmp, i)?;
                    done.push(format!(
                        "merged overlay {} into {}",
                        record.overlays[i].display(),
                        record.bases[i].display()
                    ));
                }
            }
        } else {
            for (i, overlay) in record.overlays.iter().enumerate() {
                if overlay.exists() {
                    self.commit_offline(overlay)?;
                    done.push(format!(
                        "merged overlay {} into {} (offline)",
                        overlay.display(),
                        record.bases[i].display()
                    ));
                }
            }
        }
        for overlay in &record.overlays {
            remove_if_exists(overlay)?;
        }
        remove_if_exists(&self.vm_dir(name).join(CHECKPOINT_FILE))?;
        Ok(done)
    }

    /// Dirty bitmaps on a node.
    fn bitmaps_of(qmp: &mut Qmp, node: &str) -> Result<Vec<String>> {
        let nodes = qmp.execute("query-named-block-nodes", Some(json!({"flat": true})))?;
        let list = nodes.as_array().cloned().unwrap_or_default();
        let Some(n) = list
            .iter()
            .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
        else {
            return Ok(Vec::new());
        };
        Ok(n.get("dirty-bitmaps")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|b| b.get("name").and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Remove our (`hk-`) bitmaps from the base nodes, except `keep`.
    fn drop_bitmaps(qmp: &mut Qmp, disks: usize, keep: Option<&str>) -> Result<()> {
        for i in 0..disks {
            let node = format!("base{i}");
            for b in Self::bitmaps_of(qmp, &node)? {
                if b.starts_with("hk-") && Some(b.as_str()) != keep {
                    qmp.execute(
                        "block-dirty-bitmap-remove",
                        Some(json!({"node": node, "name": b})),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The dirty ranges of `bitmap` on `base{i}`. QMP has no command that returns a bitmap's
    /// bits; the supported way out is an NBD export carrying the bitmap as a metadata context,
    /// read here with `qemu-img map` (its `x-dirty-bitmap` option reports dirty extents as
    /// `"data": false`). The export is read-only and exists only while we read.
    fn read_bitmap(
        &self,
        vm: &str,
        qmp: &mut Qmp,
        i: usize,
        bitmap: &str,
    ) -> Result<Vec<(u64, u64)>> {
        let sock = self.vm_dir(vm).join("nbd.sock");
        remove_if_exists(&sock)?;
        qmp.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "unix", "data": {"path": sock.display().to_string()}}})),
        )?;
        let export = format!("hk{i}");
        let result = (|| {
            qmp.execute(
                "block-export-add",
                Some(
                    json!({"type": "nbd", "id": export, "node-name": format!("base{i}"),
                    "name": export, "writable": false, "bitmaps": [bitmap]}),
                ),
            )?;
            let opts = format!(
                "driver=nbd,server.type=unix,server.path={},export={export},\
                 x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
                qemu_escape(&sock)
            );
            let out = Command::new(&self.qemu_img)
                .args(["map", "--output=json", "--image-opts", &opts])
                .output()
                .map_err(io_err(format!("cannot run {}", self.qemu_img.display())))?;
            if !out.status.success() {
                return Err(Error::Operation(format!(
                    "reading dirty bitmap {bitmap} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            parse_dirty_map(&out.stdout)
        })();
        let _ = qmp.execute("block-export-del", Some(json!({"id": export})));
        let _ = qmp.execute("nbd-server-stop", None);
        let _ = remove_if_exists(&sock);
        result
    }

    fn wait_migration(qmp: &mut Qmp, what: &str) -> Result<()> {
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        loop {
            let info = qmp.execute("query-migrate", None)?;
            match info.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let msg = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(Error::Operation(format!("{what} failed: {msg}")));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "{what} did not finish in {MIGRATE_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn resume_inner(&self, name: &str) -> Result<()> {
        let state = self.vm_dir(name).join(STATE_FILE);
        let mut qmp = self.qmp(name)?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({"mode": "cpr-reboot"})),
        )?;
        qmp.execute(
            "migrate-incoming",
            Some(json!({"uri": format!("file:{}", state.display())})),
        )?;
        Self::wait_migration(&mut qmp, "loading the saved state")?;
        // The state was saved from a stopped VM, so it arrives paused.
        qmp.execute("cont", None)?;
        Ok(())
    }
}

/// `qemu-img map --output=json` under `x-dirty-bitmap`: extents with `"data": false` are dirty.
/// Adjacent dirty extents are joined.
fn parse_dirty_map(json_text: &[u8]) -> Result<Vec<(u64, u64)>> {
    let v: Value = serde_json::from_slice(json_text)
        .map_err(|e| Error::Parse(format!("qemu-img map output: {e}")))?;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v
        .as_array()
        .ok_or_else(|| Error::Parse("qemu-img map: not an array".into()))?
    {
        let (Some(start), Some(len), Some(data)) = (
            e.get("start").and_then(Value::as_u64),
            e.get("length").and_then(Value::as_u64),
            e.get("data").and_then(Value::as_bool),
        ) else {
            return Err(Error::Parse(format!("qemu-img map: unexpected entry {e}")));
        };
        if data || len == 0 {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => ranges.push((start, len)),
        }
    }
    Ok(ranges)
}

impl Drop for QemuHypervisor {
    fn drop(&mut self) {
        if self.kill_on_drop {
            let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
            for (_, mut child) in children.drain() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Hypervisor for QemuHypervisor {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn list_vms(&self) -> Result<Vec<VmInfo>> {
        let mut names = Vec::new();
        let entries = fs::read_dir(&self.runtime_dir).map_err(io_err(format!(
            "cannot list {}",
            self.runtime_dir.display()
        )))?;
        for entry in entries.flatten() {
            if entry.path().join(DEFINITION_FILE).is_file() {
                if let Some(n) = entry.file_name().to_str() {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        names.iter().map(|n| self.vm(n)).collect()
    }

    fn vm(&self, name: &str) -> Result<VmInfo> {
        let def = self.definition(name)?;
        let state = self.state(name)?;
        let record = self.checkpoint_record(name)?;
        let dir = self.vm_dir(name);
        let disks = def
            .disks
            .iter()
            .enumerate()
            .map(|(i, base)| {
                // While a checkpoint exists the guest writes to the overlay: that is the top.
                let top = record
                    .as_ref()
                    .and_then(|r| r.overlays.get(i))
                    .filter(|o| o.exists())
                    .cloned()
                    .unwrap_or_else(|| base.clone());
                DiskAttachment {
                    path: Some(top),
                    passthrough: false,
                    location: format!("virtio {i}"),
                }
            })
            .collect();
        let mut config_files = vec![dir.join(DEFINITION_FILE)];
        if state == VmState::Saved {
            config_files.push(dir.join(STATE_FILE));
        }
        let running = !matches!(state, VmState::Off | VmState::Saved);
        Ok(VmInfo {
            name: def.name.clone(),
            id: def.name.clone(),
            state,
            disks,
            config_files,
            guest: self.guest_integration(name, running),
            existing_checkpoints: record.map(|r| vec![r.id]).unwrap_or_default(),
        })
    }

    fn create_checkpoint(&self, vm: &str, consistency: Consistency) -> Result<Checkpoint> {
        let def = self.definition(vm)?;
        self.require_running(vm, "take a checkpoint")?;
        if let Some(r) = self.checkpoint_record(vm)? {
            return Err(Error::Operation(format!(
                "VM {vm} still has checkpoint {} from an earlier backup; run cleanup first",
                r.id
            )));
        }
        let dir = self.vm_dir(vm);
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let record = CheckpointRecord {
            id: format!("hk-{millis}"),
            consistency,
            bases: def.disks.clone(),
            overlays: (0..def.disks.len())
                .map(|i| dir.join(format!("overlay-{i}.qcow2")))
                .collect(),
        };
        for o in &record.overlays {
            remove_if_exists(o)?; // never in use: the record would exist
        }
        // Recorded before anything changes, so a crash from here on is recoverable.
        write_json_atomic(&dir.join(CHECKPOINT_FILE), &record)?;

        let mut qmp = match self.qmp(vm) {
            Ok(q) => q,
            Err(e) => {
                remove_if_exists(&dir.join(CHECKPOINT_FILE))?;
                return Err(e);
            }
        };
        if consistency == Consistency::Application {
            let frozen = self.agent(vm, AGENT_CONNECT_TIMEOUT).and_then(|mut a| {
                let n = a.execute("guest-fsfreeze-freeze", None, FREEZE_TIMEOUT)?;
                if n.as_u64().unwrap_or(0) == 0 {
                    let _ = a.execute("guest-fsfreeze-thaw", None, FREEZE_TIMEOUT);
                    return Err(Error::Operation(
                        "the guest agent froze no filesystem".into(),
                    ));
                }
                Ok(())
            });
            if let Err(e) = frozen {
                remove_if_exists(&dir.join(CHECKPOINT_FILE))?;
                return Err(Error::Operation(format!(
                    "cannot take an application-consistent checkpoint of {vm}: {e}"
                )));
            }
        }
        // One transaction: every disk's overlay and its change-tracking bitmap appear at the same
        // instant (or none does). The bitmap sits on the base, which the guest no longer writes
        // during the checkpoint: it records the commit of the overlay and everything after, i.e.
        // exactly what changes after this freeze point.
        let mut actions = Vec::new();
        for (i, overlay) in record.overlays.iter().enumerate() {
            actions.push(json!({"type": "block-dirty-bitmap-add",
                "data": {"node": format!("base{i}"), "name": record.id}}));
            actions.push(json!({"type": "blockdev-snapshot-sync", "data": {
                "node-name": format!("base{i}"),
                "snapshot-file": overlay.display().to_string(),
                "snapshot-node-name": format!("ov{i}"),
                "format": "qcow2",
            }}));
        }
        let snap_err = qmp
            .execute("transaction", Some(json!({"actions": actions})))
            .err();
        let thaw_err = if consistency == Consistency::Application {
            self.thaw(vm).err()
        } else {
            None
        };
        if let Some(e) = snap_err {
            // Undo the overlays that were made; the VM keeps running on its original disks.
            let undo = self.merge_record(vm, &record);
            return Err(Error::Operation(format!(
                "cannot take a checkpoint of {vm}: {e}{}{}",
                thaw_err
                    .map(|t| format!("; thawing the guest also failed: {t}"))
                    .unwrap_or_default(),
                undo.err()
                    .map(|u| format!("; undoing the overlays failed: {u}"))
                    .unwrap_or_default()
            )));
        }
        if let Some(t) = thaw_err {
            let _ = self.merge_record(vm, &record);
            return Err(Error::Operation(format!(
                "cannot thaw the guest filesystems of {vm}: {t}"
            )));
        }
        Ok(Checkpoint {
            id: record.id.clone(),
            consistency,
            frozen_disks: record.bases.clone(),
            config_files: vec![dir.join(DEFINITION_FILE)],
            handle: json!({ "overlays": record.overlays }),
        })
    }

    fn release_checkpoint(
        &self,
        vm: &str,
        checkpoint: &Checkpoint,
        keep_change_token: bool,
    ) -> Result<Option<ChangeToken>> {
        let record = self
            .checkpoint_record(vm)?
            .filter(|r| r.id == checkpoint.id)
            .ok_or_else(|| {
                Error::NotFound(format!("VM {vm} has no checkpoint {}", checkpoint.id))
            })?;
        self.merge_record(vm, &record)?;
        // QEMU exited while the checkpoint existed (killed, crashed, powered off from inside):
        // the overlay was merged offline above, so nothing is left behind, but the VM stopped
        // during the backup and its change tracking died with the process. That is a failure
        // the caller must hear about, not a normal release.
        if !self.is_running(vm)? {
            return Err(Error::Operation(format!(
                "VM {vm} stopped while checkpoint {} existed (its QEMU process exited): the \
                 guest's writes since the checkpoint were merged into its disks offline; the VM \
                 is off (start it again once you know why it stopped)",
                record.id
            )));
        }
        // Bitmaps of older backups are no longer needed: the next backup asks about this one.
        let keep = if keep_change_token {
            Some(record.id.as_str())
        } else {
            None
        };
        let mut qmp = self.qmp(vm)?;
        Self::drop_bitmaps(&mut qmp, record.bases.len(), keep)?;
        Ok(keep.map(|id| ChangeToken {
            id: id.to_string(),
            per_disk: vec![id.to_string(); record.bases.len()],
        }))
    }

    fn changed_ranges(
        &self,
        vm: &str,
        checkpoint: &Checkpoint,
        disk_index: usize,
        token: &ChangeToken,
    ) -> Result<Option<Vec<(u64, u64)>>> {
        let active = self
            .checkpoint_record(vm)?
            .is_some_and(|r| r.id == checkpoint.id);
        if !active {
            return Err(Error::Operation(format!(
                "changed ranges of {vm} can only be asked while checkpoint {} is active",
                checkpoint.id
            )));
        }
        // QEMU's dirty bitmaps live in the QEMU process (VHDX cannot store persistent ones): a
        // restart since the last backup lost them, and the caller reads the whole disk.
        if !self.is_running(vm)? {
            return Ok(None);
        }
        let Some(bitmap) = token.per_disk.get(disk_index) else {
            return Ok(None);
        };
        let mut qmp = self.qmp(vm)?;
        let node = format!("base{disk_index}");
        if !Self::bitmaps_of(&mut qmp, &node)?
            .iter()
            .any(|b| b == bitmap)
        {
            return Ok(None);
        }
        self.read_bitmap(vm, &mut qmp, disk_index, bitmap).map(Some)
    }

    fn save_state(&self, vm: &str) -> Result<()> {
        self.require_running(vm, "save the state")?;
        if let Some(r) = self.checkpoint_record(vm)? {
            return Err(Error::Operation(format!(
                "VM {vm} has checkpoint {} active; release it first",
                r.id
            )));
        }
        let dir = self.vm_dir(vm);
        let state = dir.join(STATE_FILE);
        remove_if_exists(&state)?;
        let mut qmp = self.qmp(vm)?;
        qmp.execute("stop", None)?;
        let saved = (|| {
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({"mode": "cpr-reboot"})),
            )?;
            qmp.execute(
                "migrate",
                Some(json!({"uri": format!("file:{}", state.display())})),
            )?;
            Self::wait_migration(&mut qmp, "saving the VM state")
        })();
        if let Err(e) = saved {
            let _ = qmp.execute("cont", None);
            let _ = remove_if_exists(&state);
            return Err(e);
        }
        write_json_atomic(&dir.join(SAVED_MARKER), &json!({"state": state}))?;
        let _ = qmp.execute("quit", None); // the connection may close before the answer
        drop(qmp);
        if !self.wait_exit(vm, Duration::from_secs(30))? {
            return Err(Error::Timeout(format!(
                "QEMU for {vm} did not exit after saving its state"
            )));
        }
        Ok(())
    }

    fn resume(&self, vm: &str) -> Result<()> {
        self.definition(vm)?;
        if self.is_running(vm)? {
            return Err(Error::Operation(format!("VM {vm} is already running")));
        }
        let dir = self.vm_dir(vm);
        if !dir.join(SAVED_MARKER).exists() {
            return Err(Error::Operation(format!(
                "VM {vm} has no saved state to resume"
            )));
        }
        self.launch(vm, true)?;
        if let Err(e) = self.resume_inner(vm) {
            // Keep the saved state so a later attempt can still resume.
            let _ = self.kill(vm);
            return Err(Error::Operation(format!(
                "cannot resume {vm} from its saved state: {e}"
            )));
        }
        remove_if_exists(&dir.join(SAVED_MARKER))?;
        remove_if_exists(&dir.join(STATE_FILE))?;
        Ok(())
    }

    fn shutdown(&self, vm: &str, timeout: Duration) -> Result<()> {
        self.definition(vm)?;
        if !self.is_running(vm)? {
            return Ok(());
        }
        self.qmp(vm)?.execute("system_powerdown", None)?;
        if self.wait_exit(vm, timeout)? {
            Ok(())
        } else {
            Err(Error::Timeout(format!(
                "VM {vm} did not power off within {timeout:?} after the power button; it is left running"
            )))
        }
    }

    fn start(&self, vm: &str) -> Result<()> {
        self.definition(vm)?;
        if self.is_running(vm)? {
            return Ok(());
        }
        if self.vm_dir(vm).join(SAVED_MARKER).exists() {
            return self.resume(vm);
        }
        if let Some(r) = self.checkpoint_record(vm)? {
            return Err(Error::Operation(format!(
                "VM {vm} has a leftover checkpoint {}; run cleanup before starting it",
                r.id
            )));
        }
        self.launch(vm, false)
    }

    fn wait_booted(&self, vm: &str, timeout: Duration) -> Result<bool> {
        let def = self.definition(vm)?;
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running(vm)? {
                return Err(Error::Operation(format!(
                    "VM {vm} is not running (QEMU exited)"
                )));
            }
            if let Some(marker) = &def.boot_marker {
                let console = fs::read(self.console_log(vm)).unwrap_or_default();
                if String::from_utf8_lossy(&console)
                    .lines()
                    .any(|l| l.trim() == marker)
                {
                    return Ok(true);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let ping = self
                .agent(vm, left.min(Duration::from_secs(2)))
                .and_then(|mut a| a.execute("guest-ping", None, Duration::from_secs(2)));
            if ping.is_ok() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn cleanup_leftovers(&self, vm: &str) -> Result<Vec<String>> {
        self.definition(vm)?;
        let dir = self.vm_dir(vm);
        let mut done = Vec::new();
        let running = self.is_running(vm)?;
        if running {
            // A backup that died between freeze and thaw leaves the guest frozen.
            if let Ok(mut a) = self.agent(vm, AGENT_PROBE_TIMEOUT) {
                if let Ok(Value::String(s)) =
                    a.execute("guest-fsfreeze-status", None, AGENT_PROBE_TIMEOUT)
                {
                    if s == "frozen" {
                        a.execute("guest-fsfreeze-thaw", None, FREEZE_TIMEOUT)?;
                        done.push("thawed the guest's frozen filesystems".to_string());
                    }
                }
            }
        }
        if let Some(record) = self.checkpoint_record(vm)? {
            done.extend(self.merge_record(vm, &record)?);
            done.push(format!("removed checkpoint {}", record.id));
        }
        // Overlays not named by a record were never attached (the record is written first).
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.starts_with("overlay-")
                    && n.ends_with(".qcow2")
                    && remove_if_exists(&e.path())?
                {
                    done.push(format!("deleted unused overlay {}", e.path().display()));
                }
            }
        }
        // A state file without the marker is an interrupted save: useless.
        if !dir.join(SAVED_MARKER).exists() && remove_if_exists(&dir.join(STATE_FILE))? {
            done.push("deleted an incomplete saved state".into());
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn dirty_map_joins_dirty_extents_and_skips_clean_ones() {
        let text = br#"[{"start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true},
            {"start": 65536, "length": 65536, "depth": 0, "present": true, "zero": false, "data": false},
            {"start": 131072, "length": 131072, "depth": 0, "present": true, "zero": false, "data": false},
            {"start": 262144, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true},
            {"start": 327680, "length": 4096, "depth": 0, "present": true, "zero": false, "data": false}]"#;
        assert_eq!(
            parse_dirty_map(text).unwrap(),
            vec![(65536, 196608), (327680, 4096)]
        );
        assert!(matches!(parse_dirty_map(b"{}"), Err(Error::Parse(_))));
        assert!(matches!(
            parse_dirty_map(b"[{\"start\": 1}]"),
            Err(Error::Parse(_))
        ));
        assert!(matches!(parse_dirty_map(b"not json"), Err(Error::Parse(_))));
    }

    #[test]
    fn names_formats_and_escaping() {
        assert!(check_name("web-01.example_2").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(disk_format(Path::new("/d/a.VHDX")), "vhdx");
        assert_eq!(disk_format(Path::new("a.vhd")), "vpc");
        assert_eq!(disk_format(Path::new("a.qcow2")), "qcow2");
        assert_eq!(disk_format(Path::new("a.img")), "raw");
        assert_eq!(qemu_escape(Path::new("/a,b/c")), "/a,,b/c");
    }

    #[test]
    fn socket_paths_over_the_limit_are_refused() {
        let tmp = std::env::temp_dir().join("x".repeat(120));
        let err = Qmp::connect(&tmp.join("qmp.sock")).err().unwrap();
        assert!(err.to_string().contains("longer than"), "{err}");
    }

    /// A fake QMP server: greeting, capabilities, an event arriving before a command's answer,
    /// an answer to a stale id, and an error.
    #[test]
    fn qmp_matches_answers_by_id_and_keeps_events() {
        let dir = tempfile_dir();
        let sock = dir.join("q.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            r.read_line(&mut line).unwrap();
            assert!(
                line.contains("qmp_capabilities") && line.contains(r#""id":1"#),
                "{line}"
            );
            writeln!(w, r#"{{"return": {{}}, "id": 1}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("block-commit"), "{line}");
            writeln!(
                w,
                r#"{{"event": "BLOCK_JOB_READY", "data": {{"device": "j"}}}}"#
            )
            .unwrap();
            writeln!(w, r#"{{"return": {{"stale": true}}, "id": 99}}"#).unwrap();
            writeln!(w, r#"{{"return": {{"ok": 1}}, "id": 2}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            writeln!(
                w,
                r#"{{"error": {{"class": "GenericError", "desc": "no such job"}}, "id": 3}}"#
            )
            .unwrap();
            line.clear();
            let _ = r.read_line(&mut line); // wait for the client to go away
        });
        let mut qmp = Qmp::connect(&sock).unwrap();
        assert_eq!(qmp.execute("block-commit", None).unwrap(), json!({"ok": 1}));
        let ev = qmp
            .wait_event("BLOCK_JOB_READY", Duration::from_secs(1), |d| {
                d["device"] == "j"
            })
            .unwrap();
        assert_eq!(ev["data"]["device"], "j");
        let err = qmp.execute("block-job-complete", None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "QEMU refused block-job-complete: no such job"
        );
        let err = qmp
            .wait_event("BLOCK_JOB_COMPLETED", Duration::from_millis(200), |_| true)
            .unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        drop(qmp);
        server.join().unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    /// The agent channel may hold a stale answer and half a line: everything before the 0xFF of
    /// the resync answer is dropped, and a non-matching sync id is skipped.
    #[test]
    fn agent_resyncs_past_stale_data() {
        let dir = tempfile_dir();
        let sock = dir.join("a.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"return\": 7}\n{\"retu").unwrap();
            let mut buf = Vec::new();
            r.read_until(b'\n', &mut buf).unwrap();
            assert_eq!(buf[0], 0xff);
            let req: Value = serde_json::from_slice(&buf[1..]).unwrap();
            let id = req["arguments"]["id"].as_u64().unwrap();
            w.write_all(b"\xff{\"return\": 12345}\n").unwrap();
            let mut ans = vec![0xffu8];
            ans.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
            w.write_all(&ans).unwrap();
            buf.clear();
            r.read_until(b'\n', &mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf).contains("guest-ping"));
            w.write_all(b"{\"return\": {}}\n").unwrap();
            buf.clear();
            let _ = r.read_until(b'\n', &mut buf);
        });
        let mut agent = Agent::connect(&sock, Duration::from_secs(2)).unwrap();
        assert_eq!(
            agent
                .execute("guest-ping", None, Duration::from_secs(2))
                .unwrap(),
            json!({})
        );
        drop(agent);
        server.join().unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let d = std::env::temp_dir().join(format!("hkqmp-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }
}
