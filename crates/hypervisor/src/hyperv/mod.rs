//! Hyper-V through PowerShell and CIM (WMI namespace `root\virtualization\v2`).
//!
//! Why PowerShell rather than COM/WMI bindings: it is on every Hyper-V host (5.1+), the Hyper-V
//! cmdlets and CIM methods are Microsoft's documented interface, and constant scripts are easy
//! to review and to test here against canned outputs ([`CannedRunner`]).
//!
//! - [`scripts`]: every line of PowerShell, and how arguments are passed safely (stdin JSON).
//! - [`parse`]: the JSON shapes Windows really prints (integer enums, collapsed arrays, dates).
//! - [`HyperVHypervisor`]: the [`crate::Hypervisor`] implementation on top of a
//!   [`PowerShellRunner`].

pub mod parse;
pub mod scripts;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use crate::strategy::{self, Mode, Plan};
use crate::{ChangeToken, Checkpoint, Consistency, Error, Hypervisor, Result, VmInfo};
use parse::HvVm;
pub use scripts::Op;

/// What one script run produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PsOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl PsOutput {
    pub fn ok(stdout: impl Into<String>) -> Self {
        PsOutput {
            exit_code: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }
    pub fn failed(stderr: impl Into<String>) -> Self {
        PsOutput {
            exit_code: 1,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
}

/// Runs one of the constant scripts with its JSON arguments on stdin.
pub trait PowerShellRunner: Send + Sync {
    fn run(&self, op: Op, script: &str, stdin_json: &str) -> Result<PsOutput>;
}

impl<T: PowerShellRunner + ?Sized> PowerShellRunner for std::sync::Arc<T> {
    fn run(&self, op: Op, script: &str, stdin_json: &str) -> Result<PsOutput> {
        (**self).run(op, script, stdin_json)
    }
}

/// The real runner: `powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass
/// -EncodedCommand ...` (Windows PowerShell 5.1, present on every Hyper-V host).
#[derive(Clone, Debug)]
pub struct SystemPowerShell {
    pub executable: PathBuf,
}

impl Default for SystemPowerShell {
    fn default() -> Self {
        SystemPowerShell {
            executable: "powershell.exe".into(),
        }
    }
}

impl PowerShellRunner for SystemPowerShell {
    fn run(&self, op: Op, script: &str, stdin_json: &str) -> Result<PsOutput> {
        let args = scripts::command_line(script);
        let io_err = |what: &str, e| Error::Io {
            context: format!(
                "{what} {} for Hyper-V operation {}",
                self.executable.display(),
                op.name()
            ),
            source: e,
        };
        let mut child = Command::new(&self.executable)
            .args(&args[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io_err("cannot start", e))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A script that failed before reading its arguments closes the pipe; its stderr
            // then says why, so a broken pipe is not the error to report.
            match stdin.write_all(stdin_json.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(io_err("cannot write arguments to", e))
                }
                _ => {}
            }
        }
        let out = child.wait_with_output().map_err(|e| io_err("lost", e))?;
        Ok(PsOutput {
            exit_code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// One call a [`CannedRunner`] received.
#[derive(Clone, Debug)]
pub struct RecordedCall {
    pub op: Op,
    pub script: String,
    pub stdin_json: String,
}

/// For tests: answers each operation from a queue of canned outputs (the last one repeats)
/// and records every script and argument it was given.
#[derive(Default)]
pub struct CannedRunner {
    outputs: Mutex<HashMap<Op, Vec<PsOutput>>>,
    calls: Mutex<Vec<RecordedCall>>,
}

impl CannedRunner {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn respond(self, op: Op, out: PsOutput) -> Self {
        self.outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(op)
            .or_default()
            .push(out);
        self
    }
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl PowerShellRunner for CannedRunner {
    fn run(&self, op: Op, script: &str, stdin_json: &str) -> Result<PsOutput> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(RecordedCall {
                op,
                script: script.to_string(),
                stdin_json: stdin_json.to_string(),
            });
        let mut outputs = self.outputs.lock().unwrap_or_else(|e| e.into_inner());
        let queue = outputs
            .get_mut(&op)
            .filter(|q| !q.is_empty())
            .ok_or_else(|| {
                Error::Operation(format!("no canned output for operation {}", op.name()))
            })?;
        Ok(if queue.len() > 1 {
            queue.remove(0)
        } else {
            queue[0].clone()
        })
    }
}

/// A VM [`HyperVHypervisor::import_vm`] registered.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImportedVm {
    pub name: String,
    pub id: String,
    pub state: crate::VmState,
    /// The virtual disks the registered VM uses, in drive order.
    pub disks: Vec<PathBuf>,
}

/// Hyper-V behind [`Hypervisor`].
pub struct HyperVHypervisor {
    runner: Box<dyn PowerShellRunner>,
    /// How long to wait for a checkpoint's .avhdx to merge back.
    pub merge_timeout: Duration,
}

fn seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl HyperVHypervisor {
    pub fn new(runner: Box<dyn PowerShellRunner>) -> Self {
        HyperVHypervisor {
            runner,
            merge_timeout: Duration::from_secs(3600),
        }
    }

    /// The local host's Windows PowerShell.
    pub fn local() -> Self {
        Self::new(Box::new(SystemPowerShell::default()))
    }

    fn call(&self, op: Op, vm: Option<&str>, input: Value) -> Result<Value> {
        let out = self
            .runner
            .run(op, &op.script(), &scripts::encode_input(&input))?;
        let target = vm.map(|v| format!(" of VM '{v}'")).unwrap_or_default();
        if out.exit_code != 0 || !out.stderr.trim().is_empty() {
            let msg = out.stderr.trim();
            return Err(Error::Operation(format!(
                "Hyper-V {}{target} failed (exit code {}): {}",
                op.name(),
                out.exit_code,
                if msg.is_empty() {
                    "no error message"
                } else {
                    msg
                }
            )));
        }
        parse::document(&out.stdout)
            .map_err(|e| Error::Parse(format!("Hyper-V {}{target}: {e}", op.name())))
    }

    /// The full Hyper-V view of VMs (`None`: all of them).
    pub fn inventory(&self, name: Option<&str>) -> Result<Vec<HvVm>> {
        let doc = self.call(Op::Inventory, name, json!({ "Name": name }))?;
        parse::list(Some(&doc)).into_iter().map(parse::vm).collect()
    }

    pub fn hv_vm(&self, name: &str) -> Result<HvVm> {
        // PowerShell's -eq ignores case; Hyper-V allows two VMs with one name.
        let wanted = name.to_lowercase();
        let mut found: Vec<HvVm> = self
            .inventory(Some(name))?
            .into_iter()
            .filter(|v| v.name.to_lowercase() == wanted)
            .collect();
        match found.len() {
            0 => Err(Error::NotFound(format!("no Hyper-V VM named '{name}'"))),
            1 => Ok(found.remove(0)),
            n => Err(Error::Operation(format!(
                "{n} Hyper-V VMs are named '{name}': rename them so each name is unique"
            ))),
        }
    }

    /// What a backup of `name` in `mode` would do, and why.
    pub fn preflight(&self, name: &str, mode: Mode) -> Result<Plan> {
        let vm = self.hv_vm(name)?;
        let inputs = strategy::PlanInputs {
            checkpoint_blocker: vm.checkpoint_blocker(),
            ..Default::default()
        };
        Ok(strategy::plan_with(&vm.to_info(), mode, &inputs))
    }

    /// Register the configuration `config` (a .vmcx, left where it is) as a VM using `disks`
    /// (in the VM's drive order, pass-through disks excluded) in place of the disks it names;
    /// the VM keeps the id in the configuration (see [`scripts::IMPORT_VM`]); `start`: start it.
    /// Refused, with Hyper-V's list, when the configuration has incompatibilities other than
    /// missing virtual disks (a missing virtual switch, processor features...).
    pub fn import_vm(&self, config: &Path, disks: &[PathBuf], start: bool) -> Result<ImportedVm> {
        let what = config.to_string_lossy();
        let doc = self.call(
            Op::ImportVm,
            None, // the caller names the VM; the path is in the script's own messages
            json!({
                "Config": what,
                "Disks": disks.iter().map(|d| d.to_string_lossy()).collect::<Vec<_>>(),
                "Start": start,
            }),
        )?;
        let field = |k: &str| {
            parse::string(doc.get(k)).ok_or_else(|| {
                Error::Parse(format!(
                    "import-vm of '{what}': no {k} in {doc} (the VM may have been registered: \
                     check Get-VM)"
                ))
            })
        };
        let vm = ImportedVm {
            name: field("Name")?,
            id: field("Id")?,
            state: parse::vm_state(doc.get("State")),
            disks: strings(doc.get("Disks"))
                .into_iter()
                .map(PathBuf::from)
                .collect(),
        };
        // Hyper-V compares paths without regard to case; so do we.
        let same = vm.disks.len() == disks.len()
            && vm.disks.iter().zip(disks).all(|(a, b)| {
                a.to_string_lossy()
                    .eq_ignore_ascii_case(&b.to_string_lossy())
            });
        if !same {
            return Err(Error::Operation(format!(
                "VM '{}' (id {}) was registered from '{what}' but uses the disks [{}] instead \
                 of the failover disks [{}]; remove it (Remove-VM) before starting it",
                vm.name,
                vm.id,
                join_paths(&vm.disks),
                join_paths(disks)
            )));
        }
        if start && !matches!(vm.state, crate::VmState::Running | crate::VmState::Starting) {
            return Err(Error::Operation(format!(
                "VM '{}' (id {}) was registered but is {} after Start-VM, not Running",
                vm.name,
                vm.id,
                parse::string(doc.get("State")).unwrap_or_else(|| "in an unknown state".into())
            )));
        }
        Ok(vm)
    }

    fn expect_state(&self, op: Op, vm: &str, doc: &Value, want: &str) -> Result<()> {
        let state = parse::string(doc.get("State")).unwrap_or_else(|| "unknown".into());
        if parse::vm_state(doc.get("State")) == parse::vm_state(Some(&Value::from(want))) {
            Ok(())
        } else {
            Err(Error::Operation(format!(
                "Hyper-V {} of VM '{vm}' finished but the VM is {state}, not {want}",
                op.name()
            )))
        }
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    parse::list(v)
        .into_iter()
        .filter_map(|s| parse::string(Some(s)))
        .collect()
}

fn join_paths(p: &[PathBuf]) -> String {
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn handle_frozen(c: &Checkpoint) -> Vec<String> {
    c.frozen_disks
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

impl Hypervisor for HyperVHypervisor {
    fn kind(&self) -> &'static str {
        "hyperv"
    }

    fn list_vms(&self) -> Result<Vec<VmInfo>> {
        Ok(self.inventory(None)?.iter().map(HvVm::to_info).collect())
    }

    fn vm(&self, name: &str) -> Result<VmInfo> {
        Ok(self.hv_vm(name)?.to_info())
    }

    fn create_checkpoint(&self, vm: &str, consistency: Consistency) -> Result<Checkpoint> {
        let level = match consistency {
            Consistency::Application => 1,
            Consistency::Crash => 2,
        };
        let doc = self.call(
            Op::CreateCheckpoint,
            Some(vm),
            json!({ "Name": vm, "ConsistencyLevel": level }),
        )?;
        let id = parse::string(doc.get("InstanceId")).ok_or_else(|| {
            Error::Parse(format!(
                "create-checkpoint of VM '{vm}': no InstanceId in {doc}"
            ))
        })?;
        let frozen = strings(doc.get("FrozenDisks"));
        let tops = strings(doc.get("NewTops"));
        if tops.len() != frozen.len() {
            return Err(Error::Parse(format!(
                "create-checkpoint of VM '{vm}': {} frozen disks but {} new differencing disks",
                frozen.len(),
                tops.len()
            )));
        }
        Ok(Checkpoint {
            id: id.clone(),
            consistency,
            frozen_disks: frozen.iter().map(PathBuf::from).collect(),
            config_files: strings(doc.get("ConfigFiles"))
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            handle: json!({ "instance_id": id, "new_tops": tops }),
        })
    }

    fn release_checkpoint(
        &self,
        vm: &str,
        checkpoint: &Checkpoint,
        keep_change_token: bool,
    ) -> Result<Option<ChangeToken>> {
        let doc = self.call(
            Op::ReleaseCheckpoint,
            Some(vm),
            json!({
                "Name": vm,
                "InstanceId": checkpoint.id,
                "KeepReferencePoint": keep_change_token,
                "FrozenDisks": handle_frozen(checkpoint),
                "MergeTimeoutSeconds": seconds(self.merge_timeout),
            }),
        )?;
        if !keep_change_token {
            return Ok(None);
        }
        let id = parse::string(doc.get("ReferencePoint")).ok_or_else(|| {
            Error::Parse(format!(
                "release-checkpoint of VM '{vm}': no ReferencePoint in {doc}"
            ))
        })?;
        Ok(Some(ChangeToken {
            id,
            per_disk: strings(doc.get("RctIds")),
        }))
    }

    fn changed_ranges(
        &self,
        vm: &str,
        checkpoint: &Checkpoint,
        disk_index: usize,
        token: &ChangeToken,
    ) -> Result<Option<Vec<(u64, u64)>>> {
        let path = checkpoint.frozen_disks.get(disk_index).ok_or_else(|| {
            Error::NotFound(format!(
                "VM '{vm}': disk index {disk_index} out of range ({} frozen disks)",
                checkpoint.frozen_disks.len()
            ))
        })?;
        // A disk added or removed since the reference point: the ids no longer line up.
        if token.per_disk.len() != checkpoint.frozen_disks.len() {
            tracing::warn!(
                vm,
                "disk set changed since the reference point: reading disks in full"
            );
            return Ok(None);
        }
        let limit = &token.per_disk[disk_index];
        let p = path.to_string_lossy().to_ascii_lowercase();
        if limit.is_empty() || !(p.ends_with(".vhdx") || p.ends_with(".avhdx")) {
            return Ok(None); // RCT exists only for VHDX disks.
        }
        let doc = self.call(
            Op::ChangedRanges,
            Some(vm),
            json!({ "Path": path.to_string_lossy(), "LimitId": limit }),
        )?;
        if parse::boolean(doc.get("Available")) != Some(true) {
            tracing::warn!(
                vm,
                disk = %path.display(),
                reason = parse::string(doc.get("Reason")).unwrap_or_default(),
                "change tracking unavailable: reading the disk in full"
            );
            return Ok(None);
        }
        let size = parse::uint(doc.get("DiskSize")).ok_or_else(|| {
            Error::Parse(format!(
                "changed-ranges of '{}': no DiskSize",
                path.display()
            ))
        })?;
        let offsets = parse::list(doc.get("ChangedByteOffsets"));
        let lengths = parse::list(doc.get("ChangedByteLengths"));
        if offsets.len() != lengths.len() {
            return Err(Error::Parse(format!(
                "changed-ranges of '{}': {} offsets but {} lengths",
                path.display(),
                offsets.len(),
                lengths.len()
            )));
        }
        let mut ranges = Vec::with_capacity(offsets.len());
        for (o, l) in offsets.into_iter().zip(lengths) {
            let (o, l) = (parse::uint(Some(o)), parse::uint(Some(l)));
            match (o, l) {
                (Some(o), Some(l)) if o.checked_add(l).is_some_and(|end| end <= size) => {
                    if l > 0 {
                        ranges.push((o, l));
                    }
                }
                _ => {
                    return Err(Error::Parse(format!(
                    "changed-ranges of '{}': range {o:?}+{l:?} is not inside the {size}-byte disk",
                    path.display()
                )))
                }
            }
        }
        ranges.sort_unstable();
        Ok(Some(ranges))
    }

    fn save_state(&self, vm: &str) -> Result<()> {
        let doc = self.call(Op::SaveVm, Some(vm), json!({ "Name": vm }))?;
        self.expect_state(Op::SaveVm, vm, &doc, "Saved")
    }

    fn resume(&self, vm: &str) -> Result<()> {
        let doc = self.call(Op::StartVm, Some(vm), json!({ "Name": vm }))?;
        self.expect_state(Op::StartVm, vm, &doc, "Running")
    }

    fn shutdown(&self, vm: &str, timeout: Duration) -> Result<()> {
        let doc = self.call(
            Op::StopVm,
            Some(vm),
            json!({ "Name": vm, "TimeoutSeconds": seconds(timeout) }),
        )?;
        if parse::boolean(doc.get("TimedOut")) == Some(true) {
            return Err(Error::Timeout(format!(
                "VM '{vm}' did not shut down within {} s (the guest may refuse or still be shutting down; it was not powered off)",
                seconds(timeout)
            )));
        }
        self.expect_state(Op::StopVm, vm, &doc, "Off")
    }

    fn start(&self, vm: &str) -> Result<()> {
        let doc = self.call(Op::StartVm, Some(vm), json!({ "Name": vm }))?;
        self.expect_state(Op::StartVm, vm, &doc, "Running")
    }

    fn wait_booted(&self, vm: &str, timeout: Duration) -> Result<bool> {
        let doc = self.call(
            Op::WaitBooted,
            Some(vm),
            json!({ "Name": vm, "TimeoutSeconds": seconds(timeout) }),
        )?;
        parse::boolean(doc.get("Booted"))
            .ok_or_else(|| Error::Parse(format!("wait-booted of VM '{vm}': no Booted in {doc}")))
    }

    fn cleanup_leftovers(&self, vm: &str) -> Result<Vec<String>> {
        let doc = self.call(
            Op::CleanupLeftovers,
            Some(vm),
            json!({ "Name": vm, "MergeTimeoutSeconds": seconds(self.merge_timeout) }),
        )?;
        Ok(strings(doc.get("Removed")))
    }
}
