//! The job file: which hypervisor, which VMs in which mode, which repository, what retention.
//!
//! Parsed with serde + the `toml` crate; unknown keys are refused (a typo such as `keep_dialy`
//! must not silently mean "keep everything"), and every error names the file, line and column.
//! Relative paths in the file are relative to the file's directory, so a job works the same from
//! Task Scheduler, cron or a shell.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hypervisor::strategy::Mode;
use repo::forget::{KeepDuration, KeepPolicy};
use serde::Deserialize;

use crate::{Error, Result};

/// The whole job file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub hypervisor: HypervisorConfig,
    #[serde(default)]
    pub repository: Option<RepositoryConfig>,
    /// `[[vm]]` tables, in order; a VM matched by several is backed up once, by the first.
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmSelector>,
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
    /// Prune once after all VMs (frees what retention forgot).
    #[serde(default)]
    pub prune: bool,
    /// Where the file was read from (for messages and the change-tracking state file).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    Hyperv,
    Qemu,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorConfig {
    pub kind: HypervisorKind,
    /// Hyper-V: the PowerShell executable (default `powershell.exe`).
    #[serde(default)]
    pub powershell: Option<PathBuf>,
    /// QEMU: the directory holding one sub-directory per VM (definition, sockets, overlays).
    #[serde(default)]
    pub runtime_dir: Option<PathBuf>,
    /// QEMU: the `qemu-system-x86_64` binary (default: found on PATH).
    #[serde(default)]
    pub qemu_binary: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    pub location: String,
    /// First line = the password; without it, HYPERKEEP_PASSWORD / the CLI's sources apply.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// One `[[vm]]` table: `name` (exact, case-insensitive) or `pattern` (glob: `*`, `?`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSelector {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// How long a graceful shutdown may take (offline mode), e.g. `5m`, `90s`.
    #[serde(default = "default_shutdown", deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// How long to wait for the guest to answer after starting it again (offline mode).
    #[serde(default = "default_boot", deserialize_with = "de_duration")]
    pub boot_timeout: Duration,
    /// Tags for this VM's snapshots.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

fn default_mode() -> Mode {
    Mode::Auto
}
fn default_shutdown() -> Duration {
    Duration::from_secs(300)
}
fn default_boot() -> Duration {
    Duration::from_secs(300)
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// `90s`, `5m`, `1h`, `1h30m`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let bad = || format!("duration {text:?}: use a number with s, m or h, e.g. 90s, 5m, 1h30m");
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// `[retention]`: the fields of `hyperkeep forget`, applied per VM after its backup succeeded.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// e.g. `7d`, `1y6m`.
    pub keep_within: Option<String>,
    #[serde(default)]
    pub keep_tags: Vec<String>,
}

impl RetentionConfig {
    pub fn policy(&self) -> Result<KeepPolicy> {
        let within = match &self.keep_within {
            Some(w) => Some(
                KeepDuration::parse(w)
                    .map_err(|e| Error::Config(format!("[retention] keep_within = {w:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(KeepPolicy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
            within,
            keep_tags: self.keep_tags.clone(),
            tags: Vec::new(),
        })
    }
}

impl JobConfig {
    /// Read and check a job file.
    pub fn load(path: &Path) -> Result<JobConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("cannot read the job file {}: {e}", path.display()))
        })?;
        let mut cfg = Self::parse(&text, &path.display().to_string())?;
        // Absolute, so that paths handed to other processes (QEMU) mean the same from any
        // working directory.
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let base = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
        cfg.resolve_paths(&base);
        cfg.path = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parse job-file text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<JobConfig> {
        let cfg: JobConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().trim_end().to_string();
            match e.span() {
                Some(span) => {
                    let (line, col) = line_col(text, span.start);
                    Error::Config(format!("{origin}, line {line}, column {col}: {msg}"))
                }
                None => Error::Config(format!("{origin}: {msg}")),
            }
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let err = |m: String| Err(Error::Config(format!("{origin}: {m}")));
        if self.vms.is_empty() {
            return err(
                "no [[vm]] table: name at least one VM (name = \"...\" or pattern = \"*\")".into(),
            );
        }
        for (i, v) in self.vms.iter().enumerate() {
            match (&v.name, &v.pattern) {
                (Some(_), Some(_)) => {
                    return err(format!(
                        "[[vm]] number {}: give name or pattern, not both",
                        i + 1
                    ))
                }
                (None, None) => {
                    return err(format!(
                        "[[vm]] number {}: needs name = \"VM\" or pattern = \"glob*\"",
                        i + 1
                    ))
                }
                (Some(n), None) | (None, Some(n)) if n.trim().is_empty() => {
                    return err(format!(
                        "[[vm]] number {}: the name or pattern is empty",
                        i + 1
                    ))
                }
                _ => {}
            }
        }
        if self.hypervisor.kind == HypervisorKind::Qemu && self.hypervisor.runtime_dir.is_none() {
            return err("[hypervisor] kind = \"qemu\" needs runtime_dir = \"DIR\" (the directory of the VM definitions)".into());
        }
        if let Some(r) = &self.retention {
            let p = r.policy()?;
            if p.is_empty() {
                return err(
                    "[retention] has no keep_* rule; remove the table or add e.g. keep_daily = 7"
                        .into(),
                );
            }
        }
        if let Some(r) = &self.repository {
            if r.location.trim().is_empty() {
                return err("[repository] location is empty".into());
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.hypervisor.runtime_dir.as_mut() {
            fix(p)
        }
        if let Some(r) = self.repository.as_mut() {
            if let Some(p) = r.password_file.as_mut() {
                fix(p)
            }
            // A location without a scheme is a directory path.
            let loc = PathBuf::from(&r.location);
            if loc.is_relative() && !r.location.contains("://") {
                r.location = base.join(loc).to_string_lossy().into_owned();
            }
        }
    }

    /// The retention policy, if the job has one.
    pub fn keep_policy(&self) -> Result<Option<KeepPolicy>> {
        self.retention.as_ref().map(|r| r.policy()).transpose()
    }

    /// Where change-tracking state is kept: `<job file>.state.json` beside the job file.
    pub fn state_path(&self) -> Option<PathBuf> {
        self.path.as_ref().map(|p| {
            let mut s = p.as_os_str().to_owned();
            s.push(".state.json");
            PathBuf::from(s)
        })
    }

    /// The selector that applies to `vm` (the first that matches).
    pub fn selector_for(&self, vm: &str) -> Option<&VmSelector> {
        self.vms.iter().find(|s| s.matches(vm))
    }
}

impl VmSelector {
    pub fn matches(&self, vm: &str) -> bool {
        match (&self.name, &self.pattern) {
            (Some(n), _) => n.eq_ignore_ascii_case(vm),
            (None, Some(p)) => glob_match(&p.to_lowercase(), &vm.to_lowercase()),
            (None, None) => false,
        }
    }

    /// For messages: `name "x"` or `pattern "x*"`.
    pub fn describe(&self) -> String {
        match (&self.name, &self.pattern) {
            (Some(n), _) => format!("name {n:?}"),
            (None, Some(p)) => format!("pattern {p:?}"),
            _ => "empty selector".into(),
        }
    }
}

/// `*` any run of characters, `?` one character; everything else literal. Iterative with one
/// backtrack point, so no pattern can take exponential time.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("web-*", "web-01"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*-db-*", "prod-db-02"));
        assert!(!glob_match("web-*", "db-01"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
    }
}
