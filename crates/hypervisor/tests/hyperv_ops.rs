//! The Hyper-V operations over canned outputs: arguments sent, results parsed, failures
//! reported as failures.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hypervisor::hyperv::{CannedRunner, HyperVHypervisor, Op, PsOutput};
use hypervisor::{ChangeToken, Consistency, Error, Hypervisor};
use serde_json::Value;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn with(runner: CannedRunner) -> (HyperVHypervisor, Arc<CannedRunner>) {
    let r = Arc::new(runner);
    (HyperVHypervisor::new(Box::new(r.clone())), r)
}

fn args(r: &CannedRunner, op: Op) -> Vec<Value> {
    r.calls()
        .iter()
        .filter(|c| c.op == op)
        .map(|c| serde_json::from_str(&c.stdin_json).unwrap())
        .collect()
}

fn checkpoint(hv: &HyperVHypervisor) -> hypervisor::Checkpoint {
    hv.create_checkpoint("sql01", Consistency::Application)
        .unwrap()
}

#[test]
fn create_checkpoint_freezes_the_parents() {
    let (hv, r) = with(CannedRunner::new().respond(
        Op::CreateCheckpoint,
        PsOutput::ok(fixture("create_checkpoint.json")),
    ));
    let cp = checkpoint(&hv);
    assert_eq!(cp.id, "Microsoft:9C8B7A6D-5E4F-4321-8765-0FEDCBA98765");
    assert_eq!(cp.consistency, Consistency::Application);
    assert_eq!(
        cp.frozen_disks,
        [
            PathBuf::from("D:\\Hyper-V\\VHD\\sys.vhdx"),
            PathBuf::from("D:\\Hyper-V\\VHD\\data.vhdx")
        ]
    );
    assert_eq!(cp.config_files.len(), 2);
    assert_eq!(
        args(&r, Op::CreateCheckpoint),
        [serde_json::json!({"Name": "sql01", "ConsistencyLevel": 1})]
    );
}

#[test]
fn create_checkpoint_rejects_inconsistent_answers() {
    let (hv, _) = with(CannedRunner::new().respond(
        Op::CreateCheckpoint,
        PsOutput::ok(r#"{"InstanceId":"Microsoft:X","FrozenDisks":["a.vhdx","b.vhdx"],"NewTops":"a_X.avhdx"}"#),
    ));
    let e = hv.create_checkpoint("v", Consistency::Crash).unwrap_err();
    assert!(
        matches!(e, Error::Parse(_)) && e.to_string().contains("2 frozen disks but 1"),
        "{e}"
    );
    let (hv, _) = with(CannedRunner::new().respond(
        Op::CreateCheckpoint,
        PsOutput::ok(r#"{"FrozenDisks":null}"#),
    ));
    assert!(matches!(
        hv.create_checkpoint("v", Consistency::Crash),
        Err(Error::Parse(_))
    ));
}

#[test]
fn release_keeping_a_reference_point_returns_rct_ids() {
    let (hv, r) = with(
        CannedRunner::new()
            .respond(
                Op::CreateCheckpoint,
                PsOutput::ok(fixture("create_checkpoint.json")),
            )
            .respond(
                Op::ReleaseCheckpoint,
                PsOutput::ok(fixture("release_reference_point.json")),
            ),
    );
    let cp = checkpoint(&hv);
    let token = hv.release_checkpoint("sql01", &cp, true).unwrap().unwrap();
    assert_eq!(
        token.id,
        "Microsoft:5F0B2A4E-1C3D-4E5F-8A9B-0C1D2E3F4A5B:RP:0000000A"
    );
    assert_eq!(
        token.per_disk[0],
        "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001"
    );
    assert_eq!(token.per_disk.len(), 2);
    let a = &args(&r, Op::ReleaseCheckpoint)[0];
    assert_eq!(a["KeepReferencePoint"], true);
    assert_eq!(a["InstanceId"], cp.id.as_str());
    assert_eq!(a["FrozenDisks"][1], "D:\\Hyper-V\\VHD\\data.vhdx");
    assert_eq!(a["MergeTimeoutSeconds"], 3600);
}

#[test]
fn release_without_token_and_merge_timeout_failure() {
    let (hv, r) = with(
        CannedRunner::new()
            .respond(Op::CreateCheckpoint, PsOutput::ok(fixture("create_checkpoint.json")))
            .respond(Op::ReleaseCheckpoint, PsOutput::ok(r#"{"ReferencePoint":null,"RctIds":[]}"#))
            .respond(
                Op::ReleaseCheckpoint,
                PsOutput::failed("the checkpoint merge of VM 'sql01' did not finish within 3600 s; disks are still: x.avhdx"),
            ),
    );
    let cp = checkpoint(&hv);
    assert_eq!(hv.release_checkpoint("sql01", &cp, false).unwrap(), None);
    assert_eq!(
        args(&r, Op::ReleaseCheckpoint)[0]["KeepReferencePoint"],
        false
    );
    let e = hv.release_checkpoint("sql01", &cp, false).unwrap_err();
    assert!(
        matches!(&e, Error::Operation(m) if m.contains("did not finish within 3600 s")),
        "{e}"
    );
}

fn token() -> ChangeToken {
    ChangeToken {
        id: "rp".into(),
        per_disk: vec!["rctX:a:00000001".into(), "rctX:b:00000001".into()],
    }
}

#[test]
fn changed_ranges_sorted_and_checked() {
    let (hv, r) = with(
        CannedRunner::new()
            .respond(
                Op::CreateCheckpoint,
                PsOutput::ok(fixture("create_checkpoint.json")),
            )
            .respond(
                Op::ChangedRanges,
                PsOutput::ok(fixture("changed_ranges.json")),
            )
            .respond(
                Op::ChangedRanges,
                PsOutput::ok(fixture("changed_ranges_single.json")),
            )
            .respond(
                Op::ChangedRanges,
                PsOutput::ok(fixture("changed_ranges_unavailable.json")),
            ),
    );
    let cp = checkpoint(&hv);
    assert_eq!(
        hv.changed_ranges("sql01", &cp, 1, &token()).unwrap(),
        Some(vec![(0, 65536), (1048576, 2097152), (2147483648, 1048576)])
    );
    assert_eq!(
        args(&r, Op::ChangedRanges)[0],
        serde_json::json!({"Path": "D:\\Hyper-V\\VHD\\data.vhdx", "LimitId": "rctX:b:00000001"})
    );
    assert_eq!(
        hv.changed_ranges("sql01", &cp, 0, &token()).unwrap(),
        Some(vec![(4194304, 262144)])
    );
    assert_eq!(
        hv.changed_ranges("sql01", &cp, 0, &token()).unwrap(),
        None,
        "RCT refused: full read"
    );
    // Disk set changed since the reference point: full read, no PowerShell call.
    let calls = r.calls().len();
    let one = ChangeToken {
        id: "rp".into(),
        per_disk: vec!["rctX:a:00000001".into()],
    };
    assert_eq!(hv.changed_ranges("sql01", &cp, 0, &one).unwrap(), None);
    assert_eq!(r.calls().len(), calls);
    assert!(matches!(
        hv.changed_ranges("sql01", &cp, 2, &token()),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn changed_ranges_outside_the_disk_are_errors() {
    for bad in [
        r#"{"Available":true,"DiskSize":100,"ChangedByteOffsets":[90],"ChangedByteLengths":[20]}"#,
        r#"{"Available":true,"DiskSize":100,"ChangedByteOffsets":[18446744073709551615],"ChangedByteLengths":[2]}"#,
        r#"{"Available":true,"DiskSize":100,"ChangedByteOffsets":[1,2],"ChangedByteLengths":[1]}"#,
        r#"{"Available":true,"ChangedByteOffsets":[],"ChangedByteLengths":[]}"#,
    ] {
        let (hv, _) = with(
            CannedRunner::new()
                .respond(
                    Op::CreateCheckpoint,
                    PsOutput::ok(fixture("create_checkpoint.json")),
                )
                .respond(Op::ChangedRanges, PsOutput::ok(bad)),
        );
        let cp = checkpoint(&hv);
        assert!(
            matches!(
                hv.changed_ranges("sql01", &cp, 0, &token()),
                Err(Error::Parse(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn vhd_disks_have_no_rct() {
    let (hv, r) = with(CannedRunner::new().respond(
        Op::CreateCheckpoint,
        PsOutput::ok(
            r#"{"InstanceId":"I","FrozenDisks":"E:\\old.vhd","NewTops":"E:\\old_I.avhd"}"#,
        ),
    ));
    let cp = hv.create_checkpoint("v", Consistency::Crash).unwrap();
    let t = ChangeToken {
        id: "rp".into(),
        per_disk: vec!["rctX:a:1".into()],
    };
    assert_eq!(hv.changed_ranges("v", &cp, 0, &t).unwrap(), None);
    assert!(r.calls().iter().all(|c| c.op != Op::ChangedRanges));
}

#[test]
fn power_operations_check_the_resulting_state() {
    let (hv, r) = with(
        CannedRunner::new()
            .respond(Op::SaveVm, PsOutput::ok(r#"{"State":"Saved"}"#))
            .respond(Op::SaveVm, PsOutput::ok(r#"{"State":"Running"}"#))
            .respond(Op::StartVm, PsOutput::ok(r#"{"State":2}"#))
            .respond(
                Op::StopVm,
                PsOutput::ok(r#"{"TimedOut":false,"State":"Off"}"#),
            )
            .respond(
                Op::StopVm,
                PsOutput::ok(r#"{"TimedOut":true,"State":"Running"}"#),
            )
            .respond(Op::WaitBooted, PsOutput::ok(r#"{"Booted":true}"#))
            .respond(Op::WaitBooted, PsOutput::ok(r#"{"Booted":false}"#)),
    );
    hv.save_state("v").unwrap();
    let e = hv.save_state("v").unwrap_err();
    assert!(
        e.to_string().contains("the VM is Running, not Saved"),
        "{e}"
    );
    hv.resume("v").unwrap();
    hv.start("v").unwrap();
    hv.shutdown("v", Duration::from_secs(300)).unwrap();
    let e = hv.shutdown("v", Duration::from_secs(300)).unwrap_err();
    assert!(
        matches!(&e, Error::Timeout(m) if m.contains("within 300 s") && m.contains("not powered off")),
        "{e}"
    );
    assert!(hv.wait_booted("v", Duration::from_secs(120)).unwrap());
    assert!(!hv.wait_booted("v", Duration::from_secs(120)).unwrap());
    assert_eq!(args(&r, Op::StopVm)[0]["TimeoutSeconds"], 300);
    assert_eq!(args(&r, Op::WaitBooted)[0]["TimeoutSeconds"], 120);
}

#[test]
fn powershell_failures_are_never_success() {
    let (hv, _) = with(
        CannedRunner::new()
            .respond(
                Op::SaveVm,
                PsOutput {
                    exit_code: 1,
                    stdout: String::new(),
                    stderr: "VM 'v': 0 VMs have this exact name (expected 1)\r\n".into(),
                },
            )
            .respond(
                Op::SaveVm,
                PsOutput {
                    exit_code: 0,
                    stdout: r#"{"State":"Saved"}"#.into(),
                    stderr: "Save-VM : The operation failed.".into(),
                },
            )
            .respond(
                Op::SaveVm,
                PsOutput {
                    exit_code: 5,
                    stdout: String::new(),
                    stderr: String::new(),
                },
            )
            .respond(Op::SaveVm, PsOutput::ok("")),
    );
    let e = hv.save_state("v").unwrap_err();
    assert_eq!(e.to_string(), "Hyper-V save-vm of VM 'v' failed (exit code 1): VM 'v': 0 VMs have this exact name (expected 1)");
    let e = hv.save_state("v").unwrap_err();
    assert!(
        matches!(&e, Error::Operation(m) if m.contains("Save-VM : The operation failed.")),
        "{e}"
    );
    let e = hv.save_state("v").unwrap_err();
    assert!(
        e.to_string().contains("exit code 5): no error message"),
        "{e}"
    );
    let e = hv.save_state("v").unwrap_err();
    assert!(
        matches!(&e, Error::Parse(m) if m.contains("printed nothing")),
        "{e}"
    );
}

#[test]
fn cleanup_leftovers_reports_what_it_removed_and_the_merge_trap() {
    let (hv, r) = with(
        CannedRunner::new()
            .respond(Op::CleanupLeftovers, PsOutput::ok(r#"{"Removed":"app04 - Backup - (11/14/2023 - 22:13:20)"}"#))
            .respond(Op::CleanupLeftovers, PsOutput::ok(r#"{"Removed":[]}"#))
            .respond(Op::CleanupLeftovers, PsOutput::failed("VM 'app04' has no checkpoint but still writes to differencing disks (x.avhdx): a merge is pending or disk merging was disabled")),
    );
    assert_eq!(
        hv.cleanup_leftovers("app04").unwrap(),
        ["app04 - Backup - (11/14/2023 - 22:13:20)"]
    );
    assert!(hv.cleanup_leftovers("app04").unwrap().is_empty());
    let e = hv.cleanup_leftovers("app04").unwrap_err();
    assert!(e.to_string().contains("disk merging was disabled"), "{e}");
    assert_eq!(
        args(&r, Op::CleanupLeftovers)[0]["MergeTimeoutSeconds"],
        3600
    );
    assert_eq!(hv.kind(), "hyperv");
}

#[test]
fn missing_canned_output_is_an_error() {
    let (hv, _) = with(CannedRunner::new());
    assert!(
        matches!(hv.start("v"), Err(Error::Operation(m)) if m.contains("no canned output for operation start-vm"))
    );
}
