//! `replica failover`: prepare one version as the VM's disks without changing the replica.
//!
//! Default: a new differencing child of each of the version's disks in `DIR/<vm>/failover/`, so
//! the VM can run at once and its writes never touch the replica's layers. `flatten`: a
//! standalone dynamic disk per VM disk instead (a copy of the chain's view), for hypervisors
//! that cannot follow a differencing chain (QEMU cannot open differencing VHDX) or to leave the
//! replica's chain behind. The directory is built as `failover.partial` and renamed when
//! complete, so a `failover/` directory is always complete.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hypervisor::hyperv::scripts::single_quoted;
use hypervisor::hyperv::{HyperVHypervisor, ImportedVm};
use serde::Serialize;
use vdisk::{ConvertOptions, DiskFormat, OpenOptions};

use crate::manifest;
use crate::{config_dir, disks_dir, FAILOVER_DIR};

#[derive(Clone, Debug, Default)]
pub struct FailoverOptions {
    /// The version to prepare; `None` = the newest.
    pub version: Option<u64>,
    /// Standalone disks instead of differencing children.
    pub flatten: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct FailoverDisk {
    pub name: String,
    pub path: PathBuf,
    /// `differencing` (a child of the replica layer `parent`) or `standalone`.
    pub kind: String,
    pub parent: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    pub vm: String,
    pub version: u64,
    pub snapshot: String,
    pub snapshot_time: String,
    pub directory: PathBuf,
    pub disks: Vec<FailoverDisk>,
    pub files: Vec<PathBuf>,
    /// What to do next, for people (Hyper-V and other hypervisors).
    pub steps: Vec<String>,
}

pub fn failover(vm_dir: &Path, opts: &FailoverOptions) -> Result<FailoverReport> {
    // Absolute: the printed steps are pasted into other programs, on other working directories.
    let vm_dir = &vm_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", vm_dir.display()))?;
    let _lock = crate::lock::acquire(vm_dir, "failover")?;
    let m =
        manifest::load(vm_dir)?.ok_or_else(|| anyhow!("{} is not a replica", vm_dir.display()))?;
    let out = vm_dir.join(FAILOVER_DIR);
    if out.exists() {
        bail!(
            "{} already exists (a failover was prepared before); delete it first to prepare \
             another",
            out.display()
        );
    }
    let v = match opts.version {
        Some(n) => m.version(n).ok_or_else(|| {
            let have: Vec<String> = m.versions.iter().map(|v| v.version.to_string()).collect();
            anyhow!(
                "the replica of {} has no version {n} (it has: {})",
                m.vm,
                if have.is_empty() {
                    "none".into()
                } else {
                    have.join(", ")
                }
            )
        })?,
        None => m
            .versions
            .last()
            .ok_or_else(|| anyhow!("the replica of {} has no version yet", m.vm))?,
    };
    let partial = vm_dir.join(format!("{FAILOVER_DIR}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot delete {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut disks = Vec::new();
    for d in &v.disks {
        let layer = disks_dir(vm_dir).join(&d.file);
        let stem = Path::new(&d.name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| d.name.clone());
        let name = format!("{stem}.{}", d.format);
        let path = partial.join(&name);
        if opts.flatten {
            let src = vdisk::open(&layer, &OpenOptions::default())
                .with_context(|| format!("opening {}", layer.display()))?;
            let format = if d.format == "vhd" {
                DiskFormat::Vhd
            } else {
                DiskFormat::Vhdx
            };
            let copts = ConvertOptions {
                format,
                fixed: false,
                block_size: None,
            };
            vdisk::convert(&*src, &path, &copts, None)
                .with_context(|| format!("writing {}", path.display()))?;
            disks.push(FailoverDisk {
                name: d.name.clone(),
                path: out.join(&name),
                kind: "standalone".into(),
                parent: None,
            });
        } else {
            let mut c = vdisk::create_child(&layer, &path)
                .with_context(|| format!("creating {}", path.display()))?;
            c.flush()?;
            disks.push(FailoverDisk {
                name: d.name.clone(),
                path: out.join(&name),
                kind: "differencing".into(),
                parent: Some(layer),
            });
        }
    }
    let mut files = Vec::new();
    for f in &v.files {
        let from = config_dir(vm_dir, &v.config_dir).join(f);
        let to = partial.join(f);
        std::fs::copy(&from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        files.push(out.join(f));
    }
    manifest::sync_dir(&partial)?;
    std::fs::rename(&partial, &out)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()))?;
    manifest::sync_dir(vm_dir)?;
    let steps = steps(&m.vm, &disks, &files, opts.flatten);
    Ok(FailoverReport {
        vm: m.vm.clone(),
        version: v.version,
        snapshot: v.snapshot.clone(),
        snapshot_time: v.snapshot_time.clone(),
        directory: out,
        disks,
        files,
        steps,
    })
}

fn steps(vm: &str, disks: &[FailoverDisk], files: &[PathBuf], flat: bool) -> Vec<String> {
    let mut s = Vec::new();
    let vmcx = files.iter().find(|f| {
        f.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("vmcx"))
    });
    match vmcx {
        Some(cfg) => {
            s.push(format!(
                "Hyper-V (PowerShell, as administrator; the original VM must not be registered \
                 on this host): $r = Compare-VM -Path {} -Register",
                single_quoted(&windows_path(cfg))
            ));
            for d in disks {
                s.push(format!(
                    "Hyper-V: attach {} in place of {}: $r.Incompatibilities | Where-Object \
                     MessageId -eq 40010 | ForEach-Object {{ Set-VMHardDiskDrive $_.Source -Path \
                     {} }} (once per missing disk, in the VM's disk order)",
                    single_quoted(&windows_path(&d.path)),
                    d.name,
                    single_quoted(&windows_path(&d.path))
                ));
            }
            s.push(
                "Hyper-V: Import-VM -CompatibilityReport $r; then Start-VM (on the Hyper-V host, \
                 `replica failover --register [--start]` does these steps)"
                    .to_string(),
            );
        }
        None => s.push(format!(
            "Hyper-V: the snapshot of {vm} has no .vmcx; create a VM (New-VM -VHDPath ...) with \
             the disks below"
        )),
    }
    let paths: Vec<String> = disks.iter().map(|d| d.path.display().to_string()).collect();
    if flat {
        s.push(format!(
            "QEMU/other hypervisors: boot from the standalone disk(s): {}",
            paths.join(", ")
        ));
    } else {
        s.push(format!(
            "Other hypervisors: the disks are differencing disks ({}) over the replica's layers; \
             QEMU cannot open differencing VHDX, use `replica failover --flatten` for it",
            paths.join(", ")
        ));
    }
    s.push(
        "Replication of this VM into this directory refuses to run while failover/ exists: its \
         merges would change the layers these disks depend on"
            .to_string(),
    );
    s
}

#[derive(Clone, Debug, Default)]
pub struct RegisterOptions {
    /// Start the VM once it is registered.
    pub start: bool,
}

/// What [`register`] did.
#[derive(Clone, Debug, Serialize)]
pub struct Registered {
    /// The configuration file Hyper-V registered (in place, in the failover directory).
    pub config: PathBuf,
    pub vm: ImportedVm,
    pub started: bool,
}

/// Register a prepared failover with Hyper-V: its .vmcx in place, the failover disks attached in
/// the VM's disk order (see [`HyperVHypervisor::import_vm`]), optionally started.
pub fn register(
    report: &FailoverReport,
    hv: &HyperVHypervisor,
    opts: &RegisterOptions,
) -> Result<Registered> {
    let config = report
        .files
        .iter()
        .find(|f| {
            f.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("vmcx"))
        })
        .ok_or_else(|| {
            anyhow!(
                "version {} of {} has no .vmcx configuration file, so Hyper-V cannot register it; \
                 create a VM with New-VM and attach the disks in {} instead",
                report.version,
                report.vm,
                report.directory.display()
            )
        })?;
    let config_path = PathBuf::from(windows_path(config));
    let disks: Vec<PathBuf> = report
        .disks
        .iter()
        .map(|d| PathBuf::from(windows_path(&d.path)))
        .collect();
    let vm = hv
        .import_vm(&config_path, &disks, opts.start)
        .with_context(|| {
            format!(
                "registering version {} of VM '{}' with Hyper-V from {} failed",
                report.version,
                report.vm,
                config_path.display()
            )
        })?;
    Ok(Registered {
        config: config_path,
        vm,
        started: opts.start,
    })
}

/// `path` as Hyper-V should see it. On Windows the failover paths come from `canonicalize`,
/// which gives verbatim paths (`\\?\C:\...`, `\\?\UNC\server\share\...`); they would
/// end up in the VM's configuration, where Hyper-V and people expect the ordinary form.
pub fn windows_path(path: &Path) -> String {
    let p = path.to_string_lossy();
    if let Some(rest) = p.strip_prefix(r"\\?\UNC\") {
        format!(r"\\{rest}")
    } else if let Some(rest) = p.strip_prefix(r"\\?\") {
        rest.to_string()
    } else {
        p.into_owned()
    }
}
