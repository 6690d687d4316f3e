//! Every case of the article's list, fed through the Hyper-V implementation with canned
//! PowerShell outputs: parsing and the strategy engine tested together.

use std::sync::Arc;

use hypervisor::hyperv::{CannedRunner, HyperVHypervisor, Op, PsOutput};
use hypervisor::strategy::{self, req, Method, Mode, OnCheckpointFailure, Plan};
use hypervisor::{Consistency, Hypervisor};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn hv(fixture_name: &str) -> (HyperVHypervisor, Arc<CannedRunner>) {
    let runner =
        Arc::new(CannedRunner::new().respond(Op::Inventory, PsOutput::ok(fixture(fixture_name))));
    (HyperVHypervisor::new(Box::new(runner.clone())), runner)
}

fn preflight(fixture_name: &str, vm: &str, mode: Mode) -> Plan {
    hv(fixture_name).0.preflight(vm, mode).unwrap()
}

fn unmet(p: &Plan) -> Vec<&str> {
    p.reasons
        .iter()
        .filter(|r| !r.met)
        .map(|r| r.name.as_str())
        .collect()
}

fn warned(p: &Plan, needle: &str) -> bool {
    p.warnings.iter().any(|w| w.contains(needle))
}

#[test]
fn capable_guest_gets_live_application_consistent() {
    let p = preflight("vm_app_ok.json", "sql01", Mode::Auto);
    assert_eq!(p.method, Method::Live);
    assert_eq!(p.consistency, Some(Consistency::Application));
    assert!(p.crash_fallback_allowed);
    assert!(unmet(&p).is_empty(), "{:?}", p.reasons);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(p.reasons.len(), 7);
}

#[test]
fn vss_disabled_gives_crash_consistent_live_with_warning() {
    let p = preflight("vm_vss_disabled.json", "files01", Mode::Auto);
    assert_eq!(
        (p.method, p.consistency),
        (Method::Live, Some(Consistency::Crash))
    );
    assert_eq!(unmet(&p), [req::BACKUP_SERVICE]);
    assert!(p
        .requirement(req::BACKUP_SERVICE)
        .unwrap()
        .detail
        .contains("VSS integration service: disabled"));
    assert!(warned(&p, "crash-consistent live backup"));
}

#[test]
fn no_integration_services_gives_crash_consistent_live() {
    let p = preflight("vm_no_integration.json", "legacy01", Mode::Auto);
    assert_eq!(
        (p.method, p.consistency),
        (Method::Live, Some(Consistency::Crash))
    );
    assert_eq!(unmet(&p), [req::INTEGRATION, req::BACKUP_SERVICE]);
    assert!(p
        .requirement(req::INTEGRATION)
        .unwrap()
        .detail
        .contains("heartbeat: No Contact"));
    assert!(warned(&p, "cannot take part"));
}

#[test]
fn outdated_integration_services_try_application_with_fallback() {
    let p = preflight("vm_outdated_is.json", "web01", Mode::Auto);
    assert_eq!(
        (p.method, p.consistency),
        (Method::Live, Some(Consistency::Application))
    );
    assert!(p.crash_fallback_allowed);
    assert_eq!(unmet(&p), [req::INTEGRATION_CURRENT]);
    assert!(p
        .requirement(req::INTEGRATION_CURRENT)
        .unwrap()
        .detail
        .contains("outdated"));
    assert!(warned(&p, "may fail and fall back"));
}

#[test]
fn passthrough_disk_needs_agent_backup() {
    let p = preflight("vm_passthrough.json", "db02", Mode::Auto);
    assert_eq!(
        (p.method, p.consistency),
        (Method::Live, Some(Consistency::Crash))
    );
    assert_eq!(unmet(&p), [req::NO_PASSTHROUGH]);
    assert_eq!(
        p.needs_agent_backup_disks,
        ["pass-through disk at SCSI 0:2"]
    );
    assert!(warned(&p, "agent mode inside the guest"));
}

#[test]
fn off_vm_is_backed_up_as_it_is_in_every_mode() {
    for mode in [
        Mode::Auto,
        Mode::Live,
        Mode::LiveAppOnly,
        Mode::SavedState,
        Mode::Offline,
    ] {
        let p = preflight("vm_off_raw.json", "archive01", mode);
        assert_eq!(p.method, Method::AsIs, "{mode:?}");
        assert_eq!(p.consistency, None);
        assert!(unmet(&p).contains(&req::RUNNING));
        assert_eq!(p.requirement(req::RUNNING).unwrap().detail, "vm state: off");
    }
}

#[test]
fn saving_vm_is_retried_then_saved_state() {
    let p = preflight("vm_saving_raw.json", "build07", Mode::Auto);
    assert_eq!(p.method, Method::Retry);
    let r = p.retry.unwrap();
    assert_eq!(
        (r.attempts, r.delay_secs, r.then),
        (3, 60, Method::SavedState)
    );
    assert!(warned(&p, "vm is saving (in transition)"));
}

#[test]
fn booting_vm_is_retried_then_saved_state_or_per_mode() {
    let p = preflight("vm_starting.json", "app03", Mode::Auto);
    assert_eq!(
        (p.method, p.retry.unwrap().then),
        (Method::Retry, Method::SavedState)
    );
    let p = preflight("vm_starting.json", "app03", Mode::Offline);
    assert_eq!(p.retry.unwrap().then, Method::Shutdown);
    let p = preflight("vm_starting.json", "app03", Mode::LiveAppOnly);
    assert_eq!(p.retry.unwrap().then, Method::Refused);
}

#[test]
fn linux_guest_without_vss_daemon_gives_crash_consistent_live() {
    let p = preflight("vm_linux_no_vss.json", "linux01", Mode::Auto);
    assert_eq!(
        (p.method, p.consistency),
        (Method::Live, Some(Consistency::Crash))
    );
    assert_eq!(unmet(&p), [req::BACKUP_SERVICE]);
    assert!(p
        .requirement(req::BACKUP_SERVICE)
        .unwrap()
        .detail
        .contains("enabled, status No Contact"));
    assert!(
        p.requirement(req::INTEGRATION).unwrap().met,
        "the heartbeat answers"
    );
}

#[test]
fn live_app_only_refuses_guests_that_cannot() {
    let p = preflight("vm_linux_no_vss.json", "linux01", Mode::LiveAppOnly);
    assert_eq!(p.method, Method::Refused);
    assert!(warned(&p, "backup refused"));
    let p = preflight("vm_app_ok.json", "sql01", Mode::LiveAppOnly);
    assert_eq!(
        (p.method, p.consistency),
        (Method::Live, Some(Consistency::Application))
    );
    assert!(!p.crash_fallback_allowed);
}

#[test]
fn application_consistent_failure_at_runtime_falls_back_unless_live_app_only() {
    let runner = Arc::new(
        CannedRunner::new()
            .respond(Op::Inventory, PsOutput::ok(fixture("vm_app_ok.json")))
            .respond(
                Op::CreateCheckpoint,
                PsOutput::failed("CreateSnapshot (recovery checkpoint) failed: Can not create an application consistent checkpoint (job state 10, error code 32768)"),
            )
            .respond(Op::CreateCheckpoint, PsOutput::ok(fixture("create_checkpoint.json"))),
    );
    let hv = HyperVHypervisor::new(Box::new(runner.clone()));
    let plan = hv.preflight("sql01", Mode::Auto).unwrap();
    let err = hv
        .create_checkpoint("sql01", plan.consistency.unwrap())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Can not create an application consistent checkpoint"),
        "{err}"
    );
    match strategy::on_checkpoint_failure(&plan, Consistency::Application, &err) {
        OnCheckpointFailure::RetryCrashConsistent { warning } => {
            assert!(warning.contains("retrying crash-consistent"), "{warning}")
        }
        other => panic!("{other:?}"),
    }
    let cp = hv.create_checkpoint("sql01", Consistency::Crash).unwrap();
    assert_eq!(cp.consistency, Consistency::Crash);
    let levels: Vec<serde_json::Value> = runner
        .calls()
        .iter()
        .filter(|c| c.op == Op::CreateCheckpoint)
        .map(|c| {
            serde_json::from_str::<serde_json::Value>(&c.stdin_json).unwrap()["ConsistencyLevel"]
                .clone()
        })
        .collect();
    assert_eq!(levels, [1, 2]);

    let strict = hv.preflight("sql01", Mode::LiveAppOnly).unwrap();
    match strategy::on_checkpoint_failure(&strict, Consistency::Application, &err) {
        OnCheckpointFailure::Fail { reason } => {
            assert!(reason.contains("live-app-only"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // A crash-consistent failure has nothing left to fall back to.
    assert!(matches!(
        strategy::on_checkpoint_failure(&plan, Consistency::Crash, &err),
        OnCheckpointFailure::Fail { .. }
    ));
}

#[test]
fn offline_only_when_configured() {
    for (mode, method) in [
        (Mode::Offline, Method::Shutdown),
        (Mode::SavedState, Method::SavedState),
        (Mode::Live, Method::Live),
        (Mode::Auto, Method::Live),
    ] {
        assert_eq!(
            preflight("vm_app_ok.json", "sql01", mode).method,
            method,
            "{mode:?}"
        );
    }
    // Even a guest that can do nothing gets a live crash-consistent backup in auto, never a shutdown.
    assert_eq!(
        preflight("vm_no_integration.json", "legacy01", Mode::Auto).method,
        Method::Live
    );
}

#[test]
fn impossible_checkpoint_gives_saved_state() {
    let p = preflight("vm_old_version.json", "nt2012", Mode::Auto);
    assert_eq!(p.method, Method::SavedState);
    assert_eq!(unmet(&p), [req::CHECKPOINT]);
    assert!(p
        .requirement(req::CHECKPOINT)
        .unwrap()
        .detail
        .contains("configuration version 5.0"));
    assert_eq!(
        preflight("vm_old_version.json", "nt2012", Mode::Live).method,
        Method::Refused
    );
}

#[test]
fn leftover_and_user_checkpoints() {
    let p = preflight("vm_checkpoints.json", "app04", Mode::Auto);
    assert_eq!(p.method, Method::Live);
    assert_eq!(
        p.cleanup_first,
        ["app04 - Backup - (11/14/2023 - 22:13:20) [Recovery]"]
    );
    assert!(warned(&p, "leftover recovery checkpoint app04 - Backup"));
    assert!(warned(
        &p,
        "user checkpoint Before patch Tuesday [Standard] exists"
    ));
    assert_eq!(unmet(&p), [req::NO_CHECKPOINTS]);
}

#[test]
fn unknown_vm_is_not_found() {
    let (hv, _) = hv("vm_app_ok.json");
    assert!(matches!(
        hv.preflight("nope", Mode::Auto),
        Err(hypervisor::Error::NotFound(_))
    ));
    // list_vms goes through the same parser.
    assert_eq!(hv.list_vms().unwrap()[0].name, "sql01");
}

#[test]
fn plans_serialize_for_preflight_json() {
    let p = preflight("vm_passthrough.json", "db02", Mode::Auto);
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["method"], "live");
    assert_eq!(v["configured"], "auto");
    assert_eq!(v["consistency"], "crash");
    assert_eq!("live-app-only".parse::<Mode>().unwrap(), Mode::LiveAppOnly);
    assert!("hot".parse::<Mode>().is_err());
}

#[test]
fn names_match_ignoring_case_and_duplicates_are_refused() {
    let (hv, r) = hv("vm_app_ok.json");
    assert_eq!(hv.vm("SQL01").unwrap().name, "sql01");
    let sent: serde_json::Value = serde_json::from_str(&r.calls()[0].stdin_json).unwrap();
    assert_eq!(sent["Name"], "SQL01");
    let one = fixture("vm_app_ok.json");
    let two = format!("[{0},{0}]", &one.trim()[1..one.trim().len() - 1]);
    let runner = CannedRunner::new().respond(Op::Inventory, PsOutput::ok(two));
    let e = HyperVHypervisor::new(Box::new(runner))
        .vm("sql01")
        .unwrap_err();
    assert!(
        e.to_string().contains("2 Hyper-V VMs are named 'sql01'"),
        "{e}"
    );
}
