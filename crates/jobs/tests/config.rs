//! The job file: what it accepts, and that bad files fail with the line and column.

use std::time::Duration;

use hypervisor::strategy::Mode;
use jobs::config::HypervisorKind;
use jobs::JobConfig;

const GOOD: &str = r#"
prune = true

[hypervisor]
kind = "qemu"
runtime_dir = "vms"

[repository]
location = "repo"
password_file = "pass.txt"

[[vm]]
name = "SQL01"
mode = "live-app-only"

[[vm]]
pattern = "web-*"
mode = "offline"
shutdown_timeout = "90s"
boot_timeout = "1h30m"
tags = { tier = "web" }

[retention]
keep_daily = 7
keep_weekly = 4
keep_within = "1y6m"
"#;

fn err(text: &str) -> String {
    JobConfig::parse(text, "job.toml").unwrap_err().to_string()
}

#[test]
fn a_full_job_file_parses_and_resolves_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(&path, GOOD).unwrap();
    let cfg = JobConfig::load(&path).unwrap();
    assert_eq!(cfg.hypervisor.kind, HypervisorKind::Qemu);
    assert_eq!(
        cfg.hypervisor.runtime_dir.as_deref(),
        Some(dir.path().join("vms").as_path())
    );
    let r = cfg.repository.as_ref().unwrap();
    assert_eq!(r.location, dir.path().join("repo").to_string_lossy());
    assert_eq!(
        r.password_file.as_deref(),
        Some(dir.path().join("pass.txt").as_path())
    );
    assert!(cfg.prune);
    assert_eq!(cfg.vms.len(), 2);
    assert_eq!(cfg.vms[0].mode, Mode::LiveAppOnly);
    assert_eq!(cfg.vms[0].shutdown_timeout, Duration::from_secs(300));
    assert_eq!(cfg.vms[1].shutdown_timeout, Duration::from_secs(90));
    assert_eq!(cfg.vms[1].boot_timeout, Duration::from_secs(5400));
    assert_eq!(cfg.vms[1].tags.get("tier").map(String::as_str), Some("web"));
    // Names are exact but case-insensitive; patterns are globs.
    assert_eq!(cfg.selector_for("sql01").unwrap().mode, Mode::LiveAppOnly);
    assert_eq!(cfg.selector_for("WEB-02").unwrap().mode, Mode::Offline);
    assert!(cfg.selector_for("sql011").is_none());
    assert!(cfg.selector_for("db-web-1").is_none());
    let p = cfg.keep_policy().unwrap().unwrap();
    assert_eq!((p.daily, p.weekly, p.last), (Some(7), Some(4), None));
    let w = p.within.unwrap();
    assert_eq!((w.years, w.months), (1, 6));
    assert_eq!(
        cfg.state_path().unwrap(),
        dir.path().join("job.toml.state.json")
    );
}

#[test]
fn errors_name_line_and_column() {
    let e = err("[hypervisor]\nkind = \"vmware\"\n[[vm]]\nname = \"a\"\n");
    assert!(e.starts_with("job.toml, line 2, column 8:"), "{e}");
    assert!(e.contains("unknown variant `vmware`"), "{e}");

    let e = err("[hypervisor]\nkind = \"hyperv\"\n[[vm]]\nname = \"a\"\nmode = \"fast\"\n");
    assert!(e.starts_with("job.toml, line 5, column 8:"), "{e}");
    assert!(e.contains("live-app-only"), "{e}");

    // A typo in a retention rule must not silently mean "keep everything".
    let e =
        err("[hypervisor]\nkind = \"hyperv\"\n[[vm]]\nname = \"a\"\n[retention]\nkeep_dialy = 7\n");
    assert!(e.starts_with("job.toml, line 6, column 1:"), "{e}");
    assert!(e.contains("unknown field `keep_dialy`"), "{e}");

    let e = err(
        "[hypervisor]\nkind = \"hyperv\"\n[[vm]]\nname = \"a\"\nshutdown_timeout = \"5 minutes\"\n",
    );
    assert!(e.starts_with("job.toml, line 5"), "{e}");
    assert!(e.contains("duration \"5 minutes\""), "{e}");

    let e = err("[hypervisor]\nkind = \"hyperv\"\n[[vm]\nname = \"a\"\n");
    assert!(e.starts_with("job.toml, line 3"), "{e}");
}

#[test]
fn meaningless_jobs_are_refused() {
    let e = err("[hypervisor]\nkind = \"hyperv\"\n");
    assert!(e.contains("no [[vm]] table"), "{e}");
    let e = err("[hypervisor]\nkind = \"hyperv\"\n[[vm]]\nname = \"a\"\npattern = \"b*\"\n");
    assert!(e.contains("name or pattern, not both"), "{e}");
    let e = err("[hypervisor]\nkind = \"hyperv\"\n[[vm]]\nmode = \"auto\"\n");
    assert!(e.contains("needs name"), "{e}");
    let e = err("[hypervisor]\nkind = \"qemu\"\n[[vm]]\nname = \"a\"\n");
    assert!(e.contains("runtime_dir"), "{e}");
    let e = err("[hypervisor]\nkind = \"hyperv\"\n[[vm]]\nname = \"a\"\n[retention]\n");
    assert!(e.contains("no keep_* rule"), "{e}");
    let e = err("[hypervisor]\nkind = \"hyperv\"\n[[vm]]\nname = \"a\"\n[retention]\nkeep_within = \"7x\"\n");
    assert!(e.contains("keep_within"), "{e}");
    let e = JobConfig::load(std::path::Path::new("/nonexistent/job.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot read the job file /nonexistent/job.toml"),
        "{e}"
    );
}
