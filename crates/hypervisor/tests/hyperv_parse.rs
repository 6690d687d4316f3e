//! Parsing the JSON shapes Windows PowerShell prints.

use std::path::PathBuf;

use hypervisor::hyperv::parse;
use hypervisor::VmState;
use serde_json::json;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn states_by_name_and_number() {
    for (v, s) in [
        (json!(2), VmState::Running),
        (json!(3), VmState::Off),
        (json!(6), VmState::Saved),
        (json!(9), VmState::Paused),
        (json!(32773), VmState::Saving),
        (json!(10), VmState::Starting),
        (json!(4), VmState::Stopping),
        (json!(999), VmState::Other),
        (json!("Running"), VmState::Running),
        (json!("RunningCritical"), VmState::Running),
        (json!("off"), VmState::Off),
        (json!("FastSaved"), VmState::Saved),
        (json!("Saving"), VmState::Saving),
        (json!("Resuming"), VmState::Starting),
        (json!("3"), VmState::Off),
        (json!("Hibernated"), VmState::Other),
        (json!(null), VmState::Other),
    ] {
        assert_eq!(parse::vm_state(Some(&v)), s, "{v}");
    }
}

#[test]
fn dates_versions_lists_and_booleans() {
    assert_eq!(
        parse::date_ms(Some(&json!("/Date(1700000000000)/"))),
        Some(1_700_000_000_000)
    );
    assert_eq!(
        parse::date_ms(Some(&json!("/Date(1700000000000+0100)/"))),
        Some(1_700_000_000_000)
    );
    assert_eq!(
        parse::date_ms(Some(&json!("/Date(-86400000)/"))),
        Some(-86_400_000)
    );
    assert_eq!(
        parse::date_ms(Some(&json!({"value": "/Date(5)/", "DateTime": "x"}))),
        Some(5)
    );
    assert_eq!(parse::date_ms(Some(&json!("2023-11-14"))), None);
    assert_eq!(parse::date_ms(Some(&json!("/Date(abc)/"))), None);
    assert_eq!(
        parse::version(Some(
            &json!({"Major": 10, "Minor": 0, "Build": 17763, "Revision": 1})
        ))
        .as_deref(),
        Some("10.0.17763.1")
    );
    assert_eq!(
        parse::version(Some(
            &json!({"Major": 9, "Minor": 0, "Build": -1, "Revision": -1})
        ))
        .as_deref(),
        Some("9.0")
    );
    assert_eq!(
        parse::version(Some(&json!("10.0"))).as_deref(),
        Some("10.0")
    );
    assert_eq!(parse::version(Some(&json!(null))), None);
    assert_eq!(parse::list(Some(&json!(null))).len(), 0);
    assert_eq!(parse::list(Some(&json!({"a": 1}))).len(), 1);
    assert_eq!(parse::list(Some(&json!([1, 2]))).len(), 2);
    assert_eq!(parse::list(None).len(), 0);
    assert_eq!(parse::boolean(Some(&json!("True"))), Some(true));
    assert_eq!(parse::boolean(Some(&json!(false))), Some(false));
    assert_eq!(parse::uint(Some(&json!(["42"]))), Some(42));
    assert_eq!(
        parse::string(Some(&json!(["only"]))).as_deref(),
        Some("only")
    );
}

#[test]
fn document_errors_and_stray_lines() {
    assert!(matches!(
        parse::document("  \r\n"),
        Err(hypervisor::Error::Parse(_))
    ));
    let e = parse::document("Get-VM : Access denied")
        .unwrap_err()
        .to_string();
    assert!(e.contains("Access denied"), "{e}");
    assert_eq!(
        parse::document("\u{feff}WARNING: x\r\n{\"a\":1}\r\n").unwrap(),
        json!({"a": 1})
    );
}

#[test]
fn raw_off_vm_with_integer_enums_and_collapsed_arrays() {
    let vms = parse::inventory(&fixture("vm_off_raw.json")).unwrap();
    assert_eq!(vms.len(), 1, "a top-level object is one VM");
    let vm = &vms[0];
    assert_eq!(vm.name, "archive01");
    assert_eq!(vm.state, VmState::Off);
    assert_eq!(vm.drives.len(), 1);
    assert_eq!(vm.drives[0].controller, "IDE 0:0");
    assert_eq!(
        vm.drives[0].path.as_deref(),
        Some("E:\\VMs\\archive01\\disk.vhd")
    );
    assert_eq!(vm.services.len(), 1);
    assert!(vm.services[0].enabled);
    assert!(vm.snapshots.is_empty());
    let info = vm.to_info();
    assert_eq!(info.guest.integration_current, None);
    assert!(!info.guest.agent_responding);
    assert!(!info.guest.backup_service_enabled);
    // ConfigFiles was null: the files Hyper-V 2016+ keeps are named from the location and id.
    assert_eq!(
        info.config_files,
        ["vmcx", "vmgs", "vmrs"].map(|e| PathBuf::from(format!(
            "E:\\VMs\\archive01\\Virtual Machines\\7A6B5C4D-3E2F-4A1B-8C9D-0E1F2A3B4C5D.{e}"
        )))
    );
}

#[test]
fn saving_vm_with_numbers() {
    let vm = &parse::inventory(&fixture("vm_saving_raw.json")).unwrap()[0];
    assert_eq!(vm.state, VmState::Saving);
    assert_eq!(vm.state_raw, "32773");
    assert_eq!(vm.drives[0].controller, "SCSI 0:0");
    assert_eq!(vm.integration_version.as_deref(), Some("10.0.20348.1"));
    let info = vm.to_info();
    assert!(info.guest.backup_service_enabled && info.guest.agent_responding);
    assert_eq!(info.guest.integration_current, Some(true));
}

#[test]
fn projected_vm_disks_config_and_checkpoints() {
    let vm = &parse::inventory(&fixture("vm_checkpoints.json")).unwrap()[0];
    assert_eq!(vm.integration_version.as_deref(), Some("10.0.17763.1"));
    assert_eq!(vm.snapshots[0].created_ms, Some(1_699_990_000_000));
    assert_eq!(vm.snapshots[1].created_ms, Some(1_700_000_000_000));
    let info = vm.to_info();
    assert_eq!(
        info.existing_checkpoints,
        [
            "Before patch Tuesday [Standard]",
            "app04 - Backup - (11/14/2023 - 22:13:20) [Recovery]"
        ]
    );
    assert_eq!(
        info.disks[0].path,
        Some(PathBuf::from(
            "D:\\Hyper-V\\VHD\\sys_8D3E1C2B-4A5F-4B6C-9D7E-0F1A2B3C4D5E.avhdx"
        ))
    );
    assert_eq!(info.config_files.len(), 3);
    assert!(info.config_files[0].to_string_lossy().ends_with(".vmcx"));
}

#[test]
fn passthrough_disk_has_no_path() {
    let info = parse::inventory(&fixture("vm_passthrough.json")).unwrap()[0].to_info();
    assert_eq!(info.disks.len(), 2);
    assert!(!info.disks[0].passthrough);
    assert!(info.disks[1].passthrough);
    assert_eq!(
        info.disks[1].path, None,
        "the description in Path is not a file"
    );
    assert_eq!(info.disks[1].location, "SCSI 0:2");
}

#[test]
fn malformed_inventories_are_errors_not_panics() {
    for bad in [
        "[{\"Id\":\"x\"}]",
        "[{\"Name\":\"a\"}]",
        "[1]",
        "\"text\"",
        "{\"Name\":[]}",
    ] {
        assert!(parse::inventory(bad).is_err(), "{bad}");
    }
    assert_eq!(parse::inventory("[]").unwrap().len(), 0);
    assert_eq!(parse::inventory("null").unwrap().len(), 0);
}
