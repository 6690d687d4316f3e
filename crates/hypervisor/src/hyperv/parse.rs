//! Parsing what the scripts print, tolerant of the shapes Windows PowerShell really produces.
//!
//! Traps handled (containers/libhvee and eryph met them too): enums arrive as integers or
//! names (and the numbers differ between Windows versions, so names win when present); a
//! one-element array collapses to a scalar and an empty one to `null`; dates are
//! `"/Date(ms)/"` strings (optionally with a `+hhmm` offset) or `{ "value": "/Date(..)/" }`;
//! versions are nested objects (`Major`, `Minor`, `Build`, `Revision`) or strings; booleans
//! are `true` or `"True"`.

use serde_json::Value;

use crate::{DiskAttachment, Error, GuestIntegration, Result, VmInfo, VmState};

/// The JSON document a script printed (ignoring blank lines around it).
pub fn document(stdout: &str) -> Result<Value> {
    let text = stdout.trim_start_matches('\u{feff}').trim();
    if text.is_empty() {
        return Err(Error::Parse("the script printed nothing".into()));
    }
    if let Ok(v) = serde_json::from_str(text) {
        return Ok(v);
    }
    // Anything a cmdlet printed before the result (a stray warning) ends before the last line.
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(text);
    serde_json::from_str(last.trim()).map_err(|e| {
        let head: String = text.chars().take(200).collect();
        Error::Parse(format!("invalid JSON ({e}); output begins: {head}"))
    })
}

/// A value that should be a list: `null` → empty, a scalar/object → one element.
pub fn list(v: Option<&Value>) -> Vec<&Value> {
    match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.iter().collect(),
        Some(other) => vec![other],
    }
}

pub fn string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        // A collapsed one-element array of strings.
        Value::Array(a) if a.len() == 1 => string(a.first()),
        _ => None,
    }
}

pub fn uint(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        Value::Array(a) if a.len() == 1 => uint(a.first()),
        _ => None,
    }
}

pub fn boolean(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        Value::Number(n) => n.as_u64().map(|n| n != 0),
        _ => None,
    }
}

/// Milliseconds since the Unix epoch from `"/Date(1700000000000)/"`,
/// `"/Date(1700000000000+0100)/"` (the offset is display-only: the number is UTC) or an object
/// wrapping one in `value`.
pub fn date_ms(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => {
            let inner = s.trim().strip_prefix("/Date(")?.strip_suffix(")/")?;
            let end = inner
                .char_indices()
                .skip(1)
                .find(|(_, c)| *c == '+' || *c == '-')
                .map_or(inner.len(), |(i, _)| i);
            inner[..end].parse().ok()
        }
        Value::Object(o) => date_ms(o.get("value")),
        _ => None,
    }
}

/// `Major.Minor.Build.Revision` from a nested version object or a string; negative parts
/// (PowerShell's "unset" -1) are dropped.
pub fn version(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Object(o) => {
            let parts: Vec<String> = ["Major", "Minor", "Build", "Revision"]
                .iter()
                .filter_map(|k| o.get(*k).and_then(Value::as_i64))
                .take_while(|n| *n >= 0)
                .map(|n| n.to_string())
                .collect();
            (!parts.is_empty()).then(|| parts.join("."))
        }
        other => string(Some(other)),
    }
}

/// Hyper-V's VMState, by name (preferred) or number (Microsoft.HyperV.PowerShell.VMState).
pub fn vm_state(v: Option<&Value>) -> VmState {
    match v {
        Some(Value::String(s)) => state_by_name(s),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(2) => VmState::Running,
            Some(3) => VmState::Off,
            Some(4) => VmState::Stopping,
            Some(6) | Some(32779) => VmState::Saved,
            Some(9) => VmState::Paused,
            Some(10) | Some(32777) => VmState::Starting,
            Some(32773) | Some(32776) | Some(32780) => VmState::Saving,
            _ => VmState::Other,
        },
        _ => VmState::Other,
    }
}

fn state_by_name(s: &str) -> VmState {
    // "RunningCritical" etc.: the VM is in that state, but its storage is unreachable.
    let base = s.trim().strip_suffix("Critical").unwrap_or(s.trim());
    match base.to_ascii_lowercase().as_str() {
        "running" => VmState::Running,
        "off" => VmState::Off,
        "saved" | "fastsaved" => VmState::Saved,
        "paused" => VmState::Paused,
        "starting" | "resuming" => VmState::Starting,
        "stopping" | "forceshutdown" => VmState::Stopping,
        "saving" | "fastsaving" | "pausing" => VmState::Saving,
        other => match other.parse::<u64>() {
            Ok(n) => vm_state(Some(&Value::from(n))),
            Err(_) => VmState::Other,
        },
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HvDrive {
    pub path: Option<String>,
    pub controller: String,
    /// Non-null: a physical disk passed through to the guest.
    pub disk_number: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HvService {
    pub name: String,
    pub enabled: bool,
    pub status: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HvSnapshot {
    pub name: String,
    pub id: String,
    /// "Standard", "Recovery", "Planned", "Missing", "Replica", ... (or a number).
    pub kind: String,
    pub created_ms: Option<i64>,
}

/// One VM as the inventory script describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HvVm {
    pub name: String,
    pub id: String,
    pub state: VmState,
    pub state_raw: String,
    pub config_version: Option<String>,
    pub configuration_location: Option<String>,
    pub heartbeat: Option<String>,
    pub integration_state: Option<String>,
    pub integration_version: Option<String>,
    pub drives: Vec<HvDrive>,
    pub services: Vec<HvService>,
    pub snapshots: Vec<HvSnapshot>,
    pub config_files: Vec<String>,
}

pub fn inventory(stdout: &str) -> Result<Vec<HvVm>> {
    let doc = document(stdout)?;
    list(Some(&doc)).into_iter().map(vm).collect()
}

pub fn vm(v: &Value) -> Result<HvVm> {
    let name =
        string(v.get("Name")).ok_or_else(|| Error::Parse(format!("a VM without a Name: {v}")))?;
    let id = string(v.get("Id"))
        .or_else(|| string(v.get("VMId")))
        .ok_or_else(|| Error::Parse(format!("VM '{name}' has no Id")))?;
    let drives = list(v.get("HardDrives"))
        .into_iter()
        .map(|d| {
            let kind = string(d.get("ControllerType")).map(|t| match t.as_str() {
                "0" => "IDE".to_string(),
                "1" => "SCSI".to_string(),
                _ => t,
            });
            HvDrive {
                path: string(d.get("Path")),
                controller: format!(
                    "{} {}:{}",
                    kind.unwrap_or_else(|| "?".into()),
                    uint(d.get("ControllerNumber")).map_or("?".into(), |n| n.to_string()),
                    uint(d.get("ControllerLocation")).map_or("?".into(), |n| n.to_string())
                ),
                disk_number: uint(d.get("DiskNumber")),
            }
        })
        .collect();
    let services = list(v.get("IntegrationServices"))
        .into_iter()
        .filter_map(|s| {
            Some(HvService {
                name: string(s.get("Name"))?,
                enabled: boolean(s.get("Enabled")).unwrap_or(false),
                status: string(s.get("PrimaryStatusDescription")),
            })
        })
        .collect();
    let snapshots = list(v.get("Snapshots"))
        .into_iter()
        .filter_map(|s| {
            Some(HvSnapshot {
                name: string(s.get("Name"))?,
                id: string(s.get("Id")).unwrap_or_default(),
                kind: string(s.get("SnapshotType")).unwrap_or_else(|| "Unknown".into()),
                created_ms: date_ms(s.get("CreationTime")),
            })
        })
        .collect();
    let config_files = list(v.get("ConfigFiles"))
        .into_iter()
        .filter_map(|f| string(Some(f)))
        .collect();
    Ok(HvVm {
        state: vm_state(v.get("State")),
        state_raw: string(v.get("State")).unwrap_or_else(|| "null".into()),
        config_version: version(v.get("Version")),
        configuration_location: string(v.get("ConfigurationLocation")),
        heartbeat: string(v.get("Heartbeat")),
        integration_state: string(v.get("IntegrationServicesState")),
        integration_version: version(v.get("IntegrationServicesVersion")),
        name,
        id,
        drives,
        services,
        snapshots,
        config_files,
    })
}

/// Names of the backup integration service (English; Windows Server 2012 R2 called it
/// "Backup (volume snapshot)", 2016 and later "VSS").
const VSS_NAMES: [&str; 3] = [
    "VSS",
    "Backup (volume snapshot)",
    "Backup (volume shadow copy)",
];

impl HvVm {
    fn service(&self, names: &[&str]) -> Option<&HvService> {
        self.services
            .iter()
            .find(|s| names.iter().any(|n| s.name.eq_ignore_ascii_case(n)))
    }

    /// "Recovery" checkpoints are what a failed backup leaves behind.
    pub fn is_recovery(s: &HvSnapshot) -> bool {
        s.kind.eq_ignore_ascii_case("Recovery") || s.kind == "2"
    }

    pub fn to_info(&self) -> VmInfo {
        let heartbeat = self.service(&["Heartbeat"]);
        let heartbeat_ok = heartbeat
            .is_some_and(|h| h.enabled && h.status.as_deref() == Some("OK"))
            || self
                .heartbeat
                .as_deref()
                .is_some_and(|h| h.starts_with("Ok"));
        let vss = self.service(&VSS_NAMES);
        let mut notes = Vec::new();
        match vss {
            Some(s) => notes.push(format!(
                "VSS integration service: {}, status {}",
                if s.enabled { "enabled" } else { "disabled" },
                s.status.as_deref().unwrap_or("unknown")
            )),
            None => notes.push("VSS integration service: not present".into()),
        }
        notes.push(format!(
            "heartbeat: {}",
            heartbeat
                .and_then(|h| h.status.clone())
                .or_else(|| self.heartbeat.clone())
                .unwrap_or_else(|| "unknown".into())
        ));
        notes.push(format!(
            "integration services: {} (version {})",
            self.integration_state.as_deref().unwrap_or("unknown"),
            self.integration_version.as_deref().unwrap_or("unknown")
        ));
        if let Some(v) = &self.config_version {
            notes.push(format!("configuration version {v}"));
        }
        let integration_current = self.integration_state.as_deref().and_then(|s| {
            let s = s.to_ascii_lowercase();
            if s.contains("up to date") || s == "uptodate" {
                Some(true)
            } else if s.contains("update required") || s == "updaterequired" {
                Some(false)
            } else {
                None
            }
        });
        let mut config_files: Vec<std::path::PathBuf> =
            self.config_files.iter().map(Into::into).collect();
        if config_files.is_empty() {
            // The inventory could not list the folder: name the files Hyper-V 2016+ keeps.
            if let Some(loc) = &self.configuration_location {
                let base = format!(
                    "{}\\Virtual Machines\\{}",
                    loc.trim_end_matches('\\'),
                    self.id.to_uppercase()
                );
                config_files = ["vmcx", "vmgs", "vmrs"]
                    .iter()
                    .map(|e| format!("{base}.{e}").into())
                    .collect();
            }
        }
        VmInfo {
            name: self.name.clone(),
            id: self.id.clone(),
            state: self.state,
            disks: self
                .drives
                .iter()
                .map(|d| DiskAttachment {
                    path: if d.disk_number.is_some() {
                        None
                    } else {
                        d.path.as_ref().map(Into::into)
                    },
                    passthrough: d.disk_number.is_some(),
                    location: d.controller.clone(),
                })
                .collect(),
            config_files,
            guest: GuestIntegration {
                agent_responding: heartbeat_ok,
                backup_service_enabled: vss
                    .is_some_and(|s| s.enabled && s.status.as_deref() == Some("OK")),
                integration_current,
                notes,
            },
            existing_checkpoints: self
                .snapshots
                .iter()
                .map(|s| {
                    format!(
                        "{} [{}]",
                        s.name,
                        if Self::is_recovery(s) {
                            "Recovery"
                        } else {
                            s.kind.as_str()
                        }
                    )
                })
                .collect(),
        }
    }

    /// Why a live checkpoint with our WMI sequence cannot be used, if it can't.
    pub fn checkpoint_blocker(&self) -> Option<String> {
        let v = self.config_version.as_deref()?;
        let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
        let (major, minor) = (it.next().flatten()?, it.next().flatten().unwrap_or(0));
        ((major, minor) < (6, 2)).then(|| {
            format!(
                "configuration version {v} predates Windows Server 2016 (6.2): no recovery checkpoints or RCT; \
                 upgrade it with Update-VMVersion to allow live backups"
            )
        })
    }
}
