//! `import_vm` (registering a failover with Compare-VM / Import-VM) over canned outputs: the
//! constant script, paths as JSON data, Windows' JSON shapes, refusals and failures as errors.

use std::path::PathBuf;
use std::sync::Arc;

use hypervisor::hyperv::scripts::{self, Op};
use hypervisor::hyperv::{CannedRunner, HyperVHypervisor, PsOutput};
use hypervisor::{Error, VmState};
use serde_json::{json, Value};

fn with(runner: CannedRunner) -> (HyperVHypervisor, Arc<CannedRunner>) {
    let r = Arc::new(runner);
    (HyperVHypervisor::new(Box::new(r.clone())), r)
}

const CONFIG: &str = r"D:\Replicas\O'Brien's VM\failover\5F1E0C2A-1B3C-4D5E-8F90-A1B2C3D4E5F6.vmcx";

fn disks() -> Vec<PathBuf> {
    vec![
        PathBuf::from(r"D:\Replicas\O'Brien's VM\failover\sys.vhdx"),
        PathBuf::from(r"D:\Replicas\O'Brien's VM\failover\data.vhdx"),
    ]
}

#[test]
fn a_path_with_quotes_travels_as_data_in_the_constant_script() {
    let (hv, r) = with(CannedRunner::new().respond(
        Op::ImportVm,
        PsOutput::ok(
            r#"{"Name":"O'Brien's VM","Id":"0a1b2c3d-0000-4000-8000-000000000001","State":"Off","Disks":["D:\\Replicas\\O'Brien's VM\\failover\\sys.vhdx","D:\\Replicas\\O'Brien's VM\\failover\\data.vhdx"]}"#,
        ),
    ));
    hv.import_vm(CONFIG.as_ref(), &disks(), false).unwrap();
    let calls = r.calls();
    assert_eq!(calls.len(), 1);
    // The exact text sent: prologue, the constant body, the shared error handling.
    let expected = format!(
        "{}try {{\n{}}} catch {{\n  [Console]::Error.WriteLine($_.Exception.Message)\n  exit 1\n}}\n",
        scripts::PROLOGUE,
        scripts::IMPORT_VM
    );
    assert_eq!(calls[0].script, expected);
    assert!(
        !calls[0].script.contains("O'Brien"),
        "a path got into the script"
    );
    assert!(scripts::IMPORT_VM.starts_with("$r = Compare-VM -Path $A.Config -Register\n"));
    let args: Value = serde_json::from_str(&calls[0].stdin_json).unwrap();
    assert_eq!(
        args,
        json!({
            "Config": CONFIG,
            "Disks": [
                r"D:\Replicas\O'Brien's VM\failover\sys.vhdx",
                r"D:\Replicas\O'Brien's VM\failover\data.vhdx"
            ],
            "Start": false
        })
    );
    // For commands printed for people: a single-quoted literal with each quote doubled.
    assert_eq!(
        scripts::single_quoted(r"D:\R\O'Brien's VM\x.vmcx"),
        r"'D:\R\O''Brien''s VM\x.vmcx'"
    );
    assert_eq!(scripts::single_quoted("a\u{2019}b"), "'a\u{2019}\u{2019}b'");
    assert_eq!(scripts::single_quoted("$(x) `n"), "'$(x) `n'");
}

#[test]
fn the_script_fixes_missing_disks_refuses_the_rest_and_fails_loudly() {
    let s = Op::ImportVm.script();
    assert!(s.contains("MessageId -eq 40010"));
    assert!(s.contains("MessageId -ne 40010"));
    assert!(s.contains("Set-VMHardDiskDrive -VMHardDiskDrive $i.Source -Path $disks[$k]"));
    assert!(s.contains("$r = Compare-VM -CompatibilityReport $r"));
    assert!(s.contains("Import-VM -CompatibilityReport $r"));
    assert!(s.contains("if ($A.Start)"));
    assert!(s.contains("ConvertTo-Json"));
    assert!(s.contains("$ErrorActionPreference = 'Stop'"));
    assert!(s.contains("exit 1"));
    // Nothing is ever copied or overwritten elsewhere: the VM is registered in place.
    assert!(!s.contains("-Copy"));
}

#[test]
fn an_import_parses_integer_states_and_collapsed_arrays() {
    let (hv, r) = with(
        CannedRunner::new()
            .respond(
                Op::ImportVm,
                // One disk: ConvertTo-Json collapses the array to a string; State as a number.
                PsOutput::ok(
                    "\r\n{\"Name\":\"web\",\"Id\":\"11111111-2222-4333-8444-555555555555\",\"State\":2,\"Disks\":\"E:\\\\failover\\\\web.vhdx\"}\r\n",
                ),
            ),
    );
    let vm = hv
        .import_vm(
            r"E:\failover\cfg.vmcx".as_ref(),
            &[PathBuf::from(r"e:\FAILOVER\web.vhdx")],
            true,
        )
        .unwrap();
    assert_eq!(vm.name, "web");
    assert_eq!(vm.id, "11111111-2222-4333-8444-555555555555");
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.disks, [PathBuf::from(r"E:\failover\web.vhdx")]);
    let args: Value = serde_json::from_str(&r.calls()[0].stdin_json).unwrap();
    assert_eq!(args["Start"], true);
    assert_eq!(args["Disks"], json!([r"e:\FAILOVER\web.vhdx"]));
}

#[test]
fn other_incompatibilities_are_refused_with_hyper_vs_list() {
    let msg = "Hyper-V cannot register 'D:\\f\\x.vmcx' as it is: [33012] Could not find Ethernet \
               switch 'External'.; [24008] Processor features are not supported. Nothing was \
               registered; resolve these by hand (Compare-VM, then Import-VM -CompatibilityReport)";
    let (hv, _) = with(CannedRunner::new().respond(
        Op::ImportVm,
        PsOutput {
            exit_code: 1,
            stdout: String::new(),
            stderr: format!("{msg}\r\n"),
        },
    ));
    let e = hv
        .import_vm(r"D:\f\x.vmcx".as_ref(), &disks(), false)
        .unwrap_err();
    assert!(matches!(e, Error::Operation(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("Hyper-V import-vm failed (exit code 1): {msg}")
    );
}

#[test]
fn powershell_failures_and_wrong_results_are_errors() {
    let (hv, _) = with(
        CannedRunner::new()
            // Import-VM threw: the catch block's message and exit code.
            .respond(
                Op::ImportVm,
                PsOutput::failed(
                    "A virtual machine with the same identifier already exists.",
                ),
            )
            // Exit 0 but an error written: still a failure.
            .respond(
                Op::ImportVm,
                PsOutput {
                    exit_code: 0,
                    stdout: r#"{"Name":"v","Id":"x","State":"Off","Disks":[]}"#.into(),
                    stderr: "Import-VM : Access denied.".into(),
                },
            )
            // No output at all.
            .respond(Op::ImportVm, PsOutput::ok(""))
            // Registered, but not on the failover disks.
            .respond(
                Op::ImportVm,
                PsOutput::ok(
                    r#"{"Name":"v","Id":"x","State":"Off","Disks":["D:\\orig\\sys.vhdx","D:\\orig\\data.vhdx"]}"#,
                ),
            )
            // Asked to start, but not running.
            .respond(
                Op::ImportVm,
                PsOutput::ok(
                    r#"{"Name":"v","Id":"x","State":3,"Disks":["D:\\Replicas\\O'Brien's VM\\failover\\sys.vhdx","D:\\Replicas\\O'Brien's VM\\failover\\data.vhdx"]}"#,
                ),
            )
            // No Id.
            .respond(Op::ImportVm, PsOutput::ok(r#"{"Name":"v","State":"Off"}"#)),
    );
    let cfg = std::path::Path::new(CONFIG);
    let e = hv.import_vm(cfg, &disks(), false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Hyper-V import-vm failed (exit code 1): A virtual machine with the same identifier \
         already exists."
    );
    let e = hv.import_vm(cfg, &disks(), false).unwrap_err();
    assert!(e.to_string().contains("Access denied."), "{e}");
    let e = hv.import_vm(cfg, &disks(), false).unwrap_err();
    assert!(
        matches!(&e, Error::Parse(m) if m.contains("printed nothing")),
        "{e}"
    );
    let e = hv.import_vm(cfg, &disks(), false).unwrap_err();
    assert!(
        e.to_string().contains("instead of the failover disks")
            && e.to_string().contains(r"D:\orig\sys.vhdx"),
        "{e}"
    );
    let e = hv.import_vm(cfg, &disks(), true).unwrap_err();
    assert!(
        e.to_string()
            .contains("was registered but is 3 after Start-VM"),
        "{e}"
    );
    let e = hv.import_vm(cfg, &disks(), false).unwrap_err();
    assert!(matches!(&e, Error::Parse(m) if m.contains("no Id")), "{e}");
}
