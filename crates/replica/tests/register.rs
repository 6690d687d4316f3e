//! `replica::register` (`replica failover --register`) against a canned Hyper-V: which
//! configuration and disks are sent, in which order, and failures kept as failures.

use std::path::PathBuf;
use std::sync::Arc;

use hypervisor::hyperv::{CannedRunner, HyperVHypervisor, Op, PsOutput};
use replica::failover::FailoverDisk;
use replica::{register, FailoverReport, RegisterOptions};
use serde_json::{json, Value};

fn report(files: &[&str]) -> FailoverReport {
    let dir = r"\\?\D:\Replicas\O'Brien\failover";
    let disk = |name: &str| FailoverDisk {
        name: name.into(),
        path: PathBuf::from(format!(r"{dir}\{name}")),
        kind: "differencing".into(),
        parent: None,
    };
    FailoverReport {
        vm: "O'Brien".into(),
        version: 4,
        snapshot: "ab".repeat(32),
        snapshot_time: "2026-12-04T01:00:00Z".into(),
        directory: PathBuf::from(dir),
        disks: vec![disk("sys.vhdx"), disk("data.vhdx")],
        files: files
            .iter()
            .map(|f| PathBuf::from(format!(r"{dir}\{f}")))
            .collect(),
        steps: Vec::new(),
    }
}

fn canned(out: PsOutput) -> (HyperVHypervisor, Arc<CannedRunner>) {
    let r = Arc::new(CannedRunner::new().respond(Op::ImportVm, out));
    (HyperVHypervisor::new(Box::new(r.clone())), r)
}

const CFG: &str = "5F1E0C2A-1B3C-4D5E-8F90-A1B2C3D4E5F6.vmcx";

#[test]
fn registers_the_vmcx_with_the_failover_disks_in_order() {
    let (hv, r) = canned(PsOutput::ok(
        r#"{"Name":"O'Brien","Id":"9a9a9a9a-0000-4000-8000-000000000002","State":"Running","Disks":["D:\\Replicas\\O'Brien\\failover\\sys.vhdx","D:\\Replicas\\O'Brien\\failover\\data.vhdx"]}"#,
    ));
    let opts = RegisterOptions { start: true };
    let reg = register(
        &report(&[CFG, "5F1E0C2A-1B3C-4D5E-8F90-A1B2C3D4E5F6.vmgs"]),
        &hv,
        &opts,
    )
    .unwrap();
    assert_eq!(reg.vm.name, "O'Brien");
    assert_eq!(reg.vm.id, "9a9a9a9a-0000-4000-8000-000000000002");
    assert!(reg.started);
    // Verbatim (\\?\) prefixes from canonicalize on Windows are not handed to Hyper-V.
    assert_eq!(
        reg.config,
        PathBuf::from(format!(r"D:\Replicas\O'Brien\failover\{CFG}"))
    );
    let args: Value = serde_json::from_str(&r.calls()[0].stdin_json).unwrap();
    assert_eq!(
        args,
        json!({
            "Config": format!(r"D:\Replicas\O'Brien\failover\{CFG}"),
            "Disks": [
                r"D:\Replicas\O'Brien\failover\sys.vhdx",
                r"D:\Replicas\O'Brien\failover\data.vhdx"
            ],
            "Start": true
        })
    );
    assert_eq!(
        replica::failover::windows_path(r"\\?\UNC\srv\share\x.vhdx".as_ref()),
        r"\\srv\share\x.vhdx"
    );
}

#[test]
fn refusals_and_failures_are_errors_that_say_what_happened() {
    let (hv, _) = canned(PsOutput::failed(
        "Hyper-V cannot register 'x.vmcx' as it is: [33012] Could not find Ethernet switch \
         'External'.. Nothing was registered; resolve these by hand (Compare-VM, then Import-VM \
         -CompatibilityReport)",
    ));
    let e = register(&report(&[CFG]), &hv, &RegisterOptions::default()).unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.starts_with("registering version 4 of VM 'O'Brien' with Hyper-V from")
            && text.contains("[33012] Could not find Ethernet switch 'External'")
            && text.contains("Nothing was registered"),
        "{text}"
    );
    // No configuration file: nothing is sent to Hyper-V.
    let (hv, r) = canned(PsOutput::ok("{}"));
    let e = register(&report(&["x.xml"]), &hv, &RegisterOptions::default()).unwrap_err();
    assert!(e.to_string().contains("has no .vmcx"), "{e}");
    assert!(r.calls().is_empty());
}
