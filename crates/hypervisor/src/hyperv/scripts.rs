//! All PowerShell text hyperkeep sends to a Hyper-V host, in one place.
//!
//! Why one module: the scripts are the whole contract with Windows, so they are reviewed,
//! documented (docs/hyperv.md embeds every template verbatim; a test checks it) and tested
//! together.
//!
//! **How arguments travel.** No value (VM name, path, id) is ever put into script text. Every
//! script is a constant; it is sent with `powershell.exe -EncodedCommand` (base64 of UTF-16LE)
//! and reads its arguments as one JSON object from standard input (`$A`). The JSON is written
//! ASCII-only (`\uXXXX` escapes), so the console code page cannot mangle names. A VM called
//! `a'; Remove-Item C:\ -Recurse #` is therefore just a string compared with `-eq`; we also
//! never pass names to `-Name`/`-VMName` parameters, which treat `*`, `?` and `[` as wildcards.

use std::fmt::Write as _;

/// The operations, each one constant script.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Inventory,
    CreateCheckpoint,
    ReleaseCheckpoint,
    ChangedRanges,
    SaveVm,
    StartVm,
    StopVm,
    WaitBooted,
    CleanupLeftovers,
    ImportVm,
}

impl Op {
    pub const ALL: [Op; 10] = [
        Op::Inventory,
        Op::CreateCheckpoint,
        Op::ReleaseCheckpoint,
        Op::ChangedRanges,
        Op::SaveVm,
        Op::StartVm,
        Op::StopVm,
        Op::WaitBooted,
        Op::CleanupLeftovers,
        Op::ImportVm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Inventory => "inventory",
            Op::CreateCheckpoint => "create-checkpoint",
            Op::ReleaseCheckpoint => "release-checkpoint",
            Op::ChangedRanges => "changed-ranges",
            Op::SaveVm => "save-vm",
            Op::StartVm => "start-vm",
            Op::StopVm => "stop-vm",
            Op::WaitBooted => "wait-booted",
            Op::CleanupLeftovers => "cleanup-leftovers",
            Op::ImportVm => "import-vm",
        }
    }

    /// The operation-specific part of the script.
    pub fn body(self) -> &'static str {
        match self {
            Op::Inventory => INVENTORY,
            Op::CreateCheckpoint => CREATE_CHECKPOINT,
            Op::ReleaseCheckpoint => RELEASE_CHECKPOINT,
            Op::ChangedRanges => CHANGED_RANGES,
            Op::SaveVm => SAVE_VM,
            Op::StartVm => START_VM,
            Op::StopVm => STOP_VM,
            Op::WaitBooted => WAIT_BOOTED,
            Op::CleanupLeftovers => CLEANUP_LEFTOVERS,
            Op::ImportVm => IMPORT_VM,
        }
    }

    /// The complete script: prologue (argument reading, helpers, error handling) + body.
    pub fn script(self) -> String {
        format!("{PROLOGUE}try {{\n{}}} catch {{\n{CATCH}}}\n", self.body())
    }
}

/// Shared by every script: strict errors, UTF-8 output, arguments from stdin, helpers.
pub const PROLOGUE: &str = r#"$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$WarningPreference = 'SilentlyContinue'
[Console]::OutputEncoding = [Text.Encoding]::UTF8
$A = [Console]::In.ReadToEnd() | ConvertFrom-Json
$NS = 'root/virtualization/v2'
function Find-HkVM([string]$Name) {
  # Exact, case-insensitive match; never -Name (it treats * ? [ ] as wildcards).
  $m = @(Get-VM | Where-Object { $_.Name -eq $Name })
  if ($m.Count -ne 1) { throw "VM '$Name': $($m.Count) VMs have this exact name (expected 1)" }
  $m[0]
}
function Get-HkComputerSystem($VM) {
  $id = $VM.Id.ToString()
  @(Get-CimInstance -Namespace $NS -ClassName Msvm_ComputerSystem | Where-Object { $_.Name -eq $id })[0]
}
function Wait-HkJob($Result, [string]$What) {
  # Methods return 0 (done) or 4096 (a CIM_ConcreteJob to poll); JobState 7 = Completed.
  if ($Result.ReturnValue -eq 0) { return }
  if ($Result.ReturnValue -ne 4096) { throw "$What failed: return value $($Result.ReturnValue)" }
  $job = $Result.Job
  while ($true) {
    $job = Get-CimInstance -InputObject $job
    if ($job.JobState -eq 7) { return }
    if ($job.JobState -notin 2, 3, 4, 5, 6) {
      throw "$What failed: $($job.ErrorDescription) (job state $($job.JobState), error code $($job.ErrorCode))"
    }
    Start-Sleep -Milliseconds 500
  }
}
function Get-HkDrives($VM) {
  @(Get-VMHardDiskDrive -VM $VM | Select-Object Path, @{n='ControllerType';e={$_.ControllerType.ToString()}}, ControllerNumber, ControllerLocation, DiskNumber)
}
function Wait-HkMerge($VM, $Expected, [int]$TimeoutSeconds) {
  # After a checkpoint is removed, the .avhdx merges back; the next backup must not start before.
  $deadline = (Get-Date).AddSeconds($TimeoutSeconds)
  while ($true) {
    $now = @(Get-HkDrives $VM | Where-Object { $null -eq $_.DiskNumber } | ForEach-Object { $_.Path })
    if ((@($Expected) -join '|') -eq ($now -join '|')) { return }
    if ((Get-Date) -gt $deadline) { throw "the checkpoint merge of VM '$($VM.Name)' did not finish within $TimeoutSeconds s; disks are still: $($now -join ', ')" }
    Start-Sleep -Seconds 2
  }
}
"#;

const CATCH: &str = r#"  [Console]::Error.WriteLine($_.Exception.Message)
  exit 1
"#;

/// Every VM (or the one named `$A.Name`) with its drives, integration services, checkpoints
/// and configuration files, enums as names.
pub const INVENTORY: &str = r#"# Exact-name filter (no -Name wildcards); an unknown name gives an empty list, not an error.
$vms = @(Get-VM | Where-Object { $null -eq $A.Name -or $_.Name -eq $A.Name })
$out = @(foreach ($vm in $vms) {
  $cfgDir = Join-Path $vm.ConfigurationLocation 'Virtual Machines'
  $cfg = @(Get-ChildItem -LiteralPath $cfgDir -File -ErrorAction SilentlyContinue |
    Where-Object { $_.BaseName -eq $vm.Id.ToString() -and $_.Extension -in '.vmcx', '.vmgs', '.vmrs' } |
    ForEach-Object { $_.FullName })
  [pscustomobject]@{
    Name = $vm.Name
    Id = $vm.Id.ToString()
    State = $vm.State.ToString()
    Status = $vm.Status
    Generation = $vm.Generation
    Version = $vm.Version
    Path = $vm.Path
    ConfigurationLocation = $vm.ConfigurationLocation
    CheckpointType = $vm.CheckpointType.ToString()
    Heartbeat = [string]$vm.Heartbeat
    IntegrationServicesState = $vm.IntegrationServicesState
    IntegrationServicesVersion = $vm.IntegrationServicesVersion
    HardDrives = @(Get-HkDrives $vm)
    IntegrationServices = @(Get-VMIntegrationService -VM $vm | Select-Object Name, Enabled, @{n='PrimaryStatusDescription';e={[string]$_.PrimaryStatusDescription}})
    Snapshots = @(Get-VMSnapshot -VM $vm | Select-Object Name, @{n='Id';e={$_.Id.ToString()}}, @{n='SnapshotType';e={$_.SnapshotType.ToString()}}, CreationTime)
    ConfigFiles = $cfg
  }
})
ConvertTo-Json -InputObject $out -Depth 6 -Compress
"#;

/// Recovery checkpoint (SnapshotType 32768) with ConsistencyLevel `$A.ConsistencyLevel`
/// (1 application, 2 crash) through Msvm_VirtualSystemSnapshotService.CreateSnapshot.
pub const CREATE_CHECKPOINT: &str = r#"$vm = Find-HkVM $A.Name
$before = @(Get-HkDrives $vm | Where-Object { $null -eq $_.DiskNumber } | ForEach-Object { $_.Path })
$cs = Get-HkComputerSystem $vm
$svc = Get-CimInstance -Namespace $NS -ClassName Msvm_VirtualSystemSnapshotService
$ssd = ([wmiclass]'root\virtualization\v2:Msvm_VirtualSystemSnapshotSettingData').CreateInstance()
$ssd.ConsistencyLevel = [byte]$A.ConsistencyLevel
$ssd.IgnoreNonSnapshottableDisks = $true
$r = Invoke-CimMethod -InputObject $svc -MethodName CreateSnapshot -Arguments @{
  AffectedSystem = $cs
  SnapshotSettings = $ssd.GetText([System.Management.TextFormat]::WmiDtd20)
  SnapshotType = [uint16]32768
}
Wait-HkJob $r 'CreateSnapshot (recovery checkpoint)'
$id = $vm.Id.ToString()
$snap = $null
if ($null -ne $r.ResultingSnapshot) { $snap = Get-CimInstance -InputObject $r.ResultingSnapshot }
if ($null -eq $snap) {
  $snap = @(Get-CimInstance -Namespace $NS -ClassName Msvm_VirtualSystemSettingData |
    Where-Object { $_.VirtualSystemIdentifier -eq $id -and $_.VirtualSystemType -eq 'Microsoft:Hyper-V:Snapshot:Recovery' } |
    Sort-Object CreationTime)[-1]
}
if ($null -eq $snap) { throw "CreateSnapshot reported success but VM '$($vm.Name)' has no recovery checkpoint" }
$after = @(Get-HkDrives $vm | Where-Object { $null -eq $_.DiskNumber } | ForEach-Object { $_.Path })
for ($i = 0; $i -lt $before.Count; $i++) {
  if ($after[$i] -eq $before[$i]) {
    # A disk the checkpoint skipped (IgnoreNonSnapshottableDisks) is not frozen: reading it would be unsafe.
    $d = Invoke-CimMethod -InputObject $svc -MethodName DestroySnapshot -Arguments @{ AffectedSnapshot = $snap }
    Wait-HkJob $d 'DestroySnapshot'
    throw "the checkpoint did not freeze disk '$($before[$i])' (shared or non-snapshottable disk); checkpoint removed"
  }
}
$snapDir = Join-Path $snap.ConfigurationDataRoot 'Snapshots'
$cfg = @(Get-ChildItem -LiteralPath $snapDir -File -ErrorAction SilentlyContinue |
  Where-Object { $_.BaseName -eq $snap.ConfigurationID } | ForEach-Object { $_.FullName })
ConvertTo-Json -Depth 6 -Compress -InputObject ([pscustomobject]@{
  InstanceId = $snap.InstanceID
  ConfigurationId = $snap.ConfigurationID
  FrozenDisks = $before
  NewTops = $after
  ConfigFiles = $cfg
})
"#;

/// Merge the recovery checkpoint `$A.InstanceId` away. With `$A.KeepReferencePoint`,
/// ConvertToReferencePoint (keeps RCT ids, destroys older reference points of the VM, which
/// would otherwise block later merges); else DestroySnapshot. Then wait for the merge.
pub const RELEASE_CHECKPOINT: &str = r#"$vm = Find-HkVM $A.Name
$id = $vm.Id.ToString()
$snap = @(Get-CimInstance -Namespace $NS -ClassName Msvm_VirtualSystemSettingData |
  Where-Object { $_.InstanceID -eq $A.InstanceId })[0]
if ($null -eq $snap) { throw "checkpoint $($A.InstanceId) of VM '$($vm.Name)' no longer exists" }
$svc = Get-CimInstance -Namespace $NS -ClassName Msvm_VirtualSystemSnapshotService
$rct = @()
$refId = $null
if ($A.KeepReferencePoint) {
  $r = Invoke-CimMethod -InputObject $svc -MethodName ConvertToReferencePoint -Arguments @{ AffectedSnapshot = $snap }
  Wait-HkJob $r 'ConvertToReferencePoint'
  $refs = @(Get-CimInstance -Namespace $NS -ClassName Msvm_VirtualSystemReferencePoint |
    Where-Object { $_.VirtualSystemIdentifier -eq $id } | Sort-Object CreationTime)
  $new = $null
  if ($null -ne $r.ResultingReferencePoint) { $new = Get-CimInstance -InputObject $r.ResultingReferencePoint }
  if ($null -eq $new -and $refs.Count -gt 0) { $new = $refs[-1] }
  if ($null -eq $new) { throw "ConvertToReferencePoint reported success but VM '$($vm.Name)' has no reference point" }
  $refId = $new.InstanceID
  $rct = @($new.ResilientChangeTrackingIdentifiers)
  $rps = Get-CimInstance -Namespace $NS -ClassName Msvm_VirtualSystemReferencePointService
  foreach ($old in $refs | Where-Object { $_.InstanceID -ne $refId }) {
    $d = Invoke-CimMethod -InputObject $rps -MethodName DestroyReferencePoint -Arguments @{ AffectedReferencePoint = $old }
    Wait-HkJob $d 'DestroyReferencePoint'
  }
} else {
  $r = Invoke-CimMethod -InputObject $svc -MethodName DestroySnapshot -Arguments @{ AffectedSnapshot = $snap }
  Wait-HkJob $r 'DestroySnapshot'
}
Wait-HkMerge $vm @($A.FrozenDisks) ([int]$A.MergeTimeoutSeconds)
ConvertTo-Json -Depth 6 -Compress -InputObject ([pscustomobject]@{ ReferencePoint = $refId; RctIds = $rct })
"#;

/// Changed ranges of `$A.Path` since RCT id `$A.LimitId` through
/// Msvm_ImageManagementService.GetVirtualDiskChanges, looped until the whole disk is processed.
/// A refused query is reported as `Available = $false` (the caller then reads everything).
pub const CHANGED_RANGES: &str = r#"$ims = Get-CimInstance -Namespace $NS -ClassName Msvm_ImageManagementService
$size = [uint64](Get-VHD -Path $A.Path).Size
$offsets = New-Object System.Collections.Generic.List[uint64]
$lengths = New-Object System.Collections.Generic.List[uint64]
$pos = [uint64]0
$available = $true
$reason = $null
while ($pos -lt $size) {
  try {
    $r = Invoke-CimMethod -InputObject $ims -MethodName GetVirtualDiskChanges -Arguments @{
      Path = $A.Path; LimitId = $A.LimitId
      ByteOffset = [uint64]$pos; ByteLength = [uint64]($size - $pos)
    }
    Wait-HkJob $r 'GetVirtualDiskChanges'
  } catch { $available = $false; $reason = $_.Exception.Message; break }
  if ([uint64]$r.ProcessedByteLength -eq 0) { $available = $false; $reason = 'GetVirtualDiskChanges made no progress'; break }
  foreach ($o in @($r.ChangedByteOffsets)) { $offsets.Add([uint64]$o) }
  foreach ($l in @($r.ChangedByteLengths)) { $lengths.Add([uint64]$l) }
  $pos += [uint64]$r.ProcessedByteLength
}
ConvertTo-Json -Depth 6 -Compress -InputObject ([pscustomobject]@{
  Available = $available; Reason = $reason; DiskSize = $size
  ChangedByteOffsets = $offsets.ToArray(); ChangedByteLengths = $lengths.ToArray()
})
"#;

/// Save state (memory to disk); Save-VM waits until the VM is Saved.
pub const SAVE_VM: &str = r#"$vm = Find-HkVM $A.Name
Save-VM -VM $vm
ConvertTo-Json -Compress -InputObject ([pscustomobject]@{ State = (Get-VM -Id $vm.Id).State.ToString() })
"#;

/// Start (from Off) or resume (from Saved/Paused).
pub const START_VM: &str = r#"$vm = Find-HkVM $A.Name
if ($vm.State.ToString() -eq 'Paused') { Resume-VM -VM $vm } else { Start-VM -VM $vm }
ConvertTo-Json -Compress -InputObject ([pscustomobject]@{ State = (Get-VM -Id $vm.Id).State.ToString() })
"#;

/// Graceful shutdown through the guest's Shutdown integration service. Never -TurnOff: a
/// timeout is reported as such and the guest is left to finish or refuse on its own.
pub const STOP_VM: &str = r#"$vm = Find-HkVM $A.Name
$job = Stop-VM -VM $vm -Force -AsJob
$done = Wait-Job -Job $job -Timeout ([int]$A.TimeoutSeconds)
if ($null -eq $done) {
  Stop-Job -Job $job
  ConvertTo-Json -Compress -InputObject ([pscustomobject]@{ TimedOut = $true; State = (Get-VM -Id $vm.Id).State.ToString() })
} else {
  Receive-Job -Job $job | Out-Null
  ConvertTo-Json -Compress -InputObject ([pscustomobject]@{ TimedOut = $false; State = (Get-VM -Id $vm.Id).State.ToString() })
}
"#;

/// Poll the Heartbeat integration service until its status is OK.
pub const WAIT_BOOTED: &str = r#"$vm = Find-HkVM $A.Name
$deadline = (Get-Date).AddSeconds([int]$A.TimeoutSeconds)
$booted = $false
while ((Get-Date) -lt $deadline) {
  $hb = @(Get-VMIntegrationService -VM $vm | Where-Object { $_.Name -eq 'Heartbeat' })[0]
  if ($null -ne $hb -and [string]$hb.PrimaryStatusDescription -eq 'OK') { $booted = $true; break }
  Start-Sleep -Seconds 2
}
ConvertTo-Json -Compress -InputObject ([pscustomobject]@{ Booted = $booted })
"#;

/// Remove recovery checkpoints a failed backup left behind (user checkpoints are never
/// touched), wait for their merge, and detect the merge-disabled trap: drives still on an
/// .avhdx although no checkpoint exists.
pub const CLEANUP_LEFTOVERS: &str = r#"$vm = Find-HkVM $A.Name
$removed = @()
foreach ($s in @(Get-VMSnapshot -VM $vm -SnapshotType Recovery)) {
  $removed += $s.Name
  $s | Remove-VMSnapshot
}
if ($removed.Count -gt 0) {
  $deadline = (Get-Date).AddSeconds([int]$A.MergeTimeoutSeconds)
  while ((Get-VM -Id $vm.Id).Status -match 'Merging') {
    if ((Get-Date) -gt $deadline) { throw "the merge after removing leftover checkpoints of VM '$($vm.Name)' did not finish within $($A.MergeTimeoutSeconds) s" }
    Start-Sleep -Seconds 2
  }
}
if (@(Get-VMSnapshot -VM $vm).Count -eq 0) {
  $stuck = @(Get-HkDrives $vm | Where-Object { $_.Path -like '*.avhdx' -or $_.Path -like '*.avhd' } | ForEach-Object { $_.Path })
  if ($stuck.Count -gt 0) {
    throw "VM '$($vm.Name)' has no checkpoint but still writes to differencing disks ($($stuck -join ', ')): a merge is pending or disk merging was disabled (for example by an export with CopyVmStorage=false); re-enable it with Msvm_VirtualSystemManagementService.ModifyDiskMergeSettings or let the merge finish, then retry"
  }
}
ConvertTo-Json -Compress -InputObject ([pscustomobject]@{ Removed = @($removed) })
"#;

/// Register the configuration `$A.Config` (a .vmcx) in place as a new VM whose virtual disks
/// are `$A.Disks`, given in the VM's drive order (pass-through disks excluded, as the backup
/// recorded them), keeping the VM id the configuration holds: `-GenerateNewId` only goes with
/// `-Copy` (which would copy the disks again), so the original VM must not be registered on this
/// host (the failover case: its host is gone), else Hyper-V refuses with its own message.
/// `$A.Start`: start it once registered. Incompatibilities other than a missing virtual disk
/// (MessageId 40010) are refused, listed, before anything is registered.
pub const IMPORT_VM: &str = r#"$r = Compare-VM -Path $A.Config -Register
# An empty or null list must give no entries ($null piped on would count as one).
$inc = @($r.Incompatibilities | Where-Object { $null -ne $_ })
$other = @($inc | Where-Object { $_.MessageId -ne 40010 })
if ($other.Count -gt 0) {
  $list = ($other | ForEach-Object { "[$($_.MessageId)] $($_.Message)" }) -join '; '
  throw "Hyper-V cannot register '$($A.Config)' as it is: $list. Nothing was registered; resolve these by hand (Compare-VM, then Import-VM -CompatibilityReport)"
}
$disks = @($A.Disks)
$drives = @(Get-VMHardDiskDrive -VM $r.VM | Where-Object { $null -eq $_.DiskNumber })
if ($drives.Count -ne $disks.Count) { throw "the configuration has $($drives.Count) virtual disk drive(s) but $($disks.Count) failover disk(s) were given" }
function Get-HkSlot($D) { "$($D.ControllerType)/$($D.ControllerNumber)/$($D.ControllerLocation)" }
$slots = @($drives | ForEach-Object { Get-HkSlot $_ })
$done = @{}
foreach ($i in @($inc | Where-Object { $_.MessageId -eq 40010 })) {
  $k = [array]::IndexOf($slots, (Get-HkSlot $i.Source))
  if ($k -lt 0) { throw "a missing disk at controller slot $(Get-HkSlot $i.Source) is not one of the VM's virtual disk drives" }
  Set-VMHardDiskDrive -VMHardDiskDrive $i.Source -Path $disks[$k]
  $done[$k] = $true
}
for ($k = 0; $k -lt $drives.Count; $k++) {
  # A disk still found at its original path (failover on the source host) must not be used:
  # the new VM would write into the original VM's disk.
  if (-not $done[$k] -and $drives[$k].Path -ne $disks[$k]) { Set-VMHardDiskDrive -VMHardDiskDrive $drives[$k] -Path $disks[$k] }
}
# Re-checked: Import-VM needs a report without incompatibilities.
$r = Compare-VM -CompatibilityReport $r
$inc = @($r.Incompatibilities | Where-Object { $null -ne $_ })
if ($inc.Count -gt 0) {
  $list = ($inc | ForEach-Object { "[$($_.MessageId)] $($_.Message)" }) -join '; '
  throw "Hyper-V still reports incompatibilities after attaching the failover disks: $list. Nothing was registered"
}
$vm = Import-VM -CompatibilityReport $r
if ($A.Start) {
  try { Start-VM -VM $vm } catch { throw "VM '$($vm.Name)' (id $($vm.Id)) was registered but did not start: $($_.Exception.Message)" }
}
$vm = Get-VM -Id $vm.Id
ConvertTo-Json -Depth 4 -Compress -InputObject ([pscustomobject]@{
  Name = $vm.Name
  Id = $vm.Id.ToString()
  State = $vm.State.ToString()
  Disks = @(Get-HkDrives $vm | Where-Object { $null -eq $_.DiskNumber } | ForEach-Object { $_.Path })
})
"#;

/// `text` as a PowerShell single-quoted string literal (no expansion; `'` doubled), for the
/// commands hyperkeep prints for people to paste. Scripts never need it: values reach them as
/// JSON on stdin.
pub fn single_quoted(text: &str) -> String {
    // PowerShell also ends a single-quoted string at the typographic quotes U+2018/U+2019/
    // U+201A/U+201B; doubling each of them keeps them literal too.
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for ch in text.chars() {
        if matches!(ch, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}') {
            out.push(ch);
        }
        out.push(ch);
    }
    out.push('\'');
    out
}

/// The command line that runs `script` (arguments go to stdin, see the module docs).
pub fn command_line(script: &str) -> Vec<String> {
    vec![
        "powershell.exe".into(),
        "-NoProfile".into(),
        "-NonInteractive".into(),
        "-ExecutionPolicy".into(),
        "Bypass".into(),
        "-EncodedCommand".into(),
        encode_command(script),
    ]
}

/// `-EncodedCommand` wants base64 of the UTF-16LE text.
pub fn encode_command(script: &str) -> String {
    let bytes: Vec<u8> = script
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    base64(&bytes)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The arguments as ASCII-only JSON (non-ASCII as `\uXXXX`), written to the script's stdin.
pub fn encode_input(input: &serde_json::Value) -> String {
    let json = input.to_string();
    let mut out = String::with_capacity(json.len());
    for ch in json.chars() {
        if ch.is_ascii() {
            out.push(ch);
        } else {
            // Non-ASCII can only occur inside JSON strings, where \u escapes are valid.
            let mut buf = [0u16; 2];
            for unit in ch.encode_utf16(&mut buf) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

/// The Markdown listing of every script, as docs/hyperv.md embeds it.
pub fn markdown_listing() -> String {
    let mut s = String::new();
    s.push_str("### Prologue (every script)\n\n```powershell\n");
    s.push_str(PROLOGUE);
    s.push_str("try {\n    <operation body>\n} catch {\n");
    s.push_str(CATCH);
    s.push_str("}\n```\n");
    for op in Op::ALL {
        let _ = write!(
            s,
            "\n### `{}`\n\n```powershell\n{}```\n",
            op.name(),
            op.body()
        );
    }
    s
}
