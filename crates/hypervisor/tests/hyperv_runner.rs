//! The real runner's process plumbing, with a stand-in executable (no PowerShell on Linux):
//! the flags and the encoded script on the command line, the arguments on stdin, exit codes
//! and stderr reported.

#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hypervisor::hyperv::scripts::{self, Op};
use hypervisor::hyperv::{HyperVHypervisor, PowerShellRunner, SystemPowerShell};
use hypervisor::{Error, Hypervisor};

fn fake(dir: &Path, body: &str) -> SystemPowerShell {
    let exe = dir.join("powershell.exe");
    std::fs::write(&exe, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    SystemPowerShell { executable: exe }
}

#[test]
fn arguments_go_to_stdin_and_the_script_to_encoded_command() {
    let dir = tempfile::tempdir().unwrap();
    let args_file = dir.path().join("args");
    let ps = fake(
        dir.path(),
        &format!("printf '%s\\n' \"$@\" > '{}'; cat", args_file.display()),
    );
    let input =
        scripts::encode_input(&serde_json::json!({"Name": "a'; Remove-Item C:\\ -Recurse #"}));
    let out = ps.run(Op::SaveVm, &Op::SaveVm.script(), &input).unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.stdout, input, "stdin carried the arguments unchanged");
    let args = std::fs::read_to_string(&args_file).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(
        args[..5],
        [
            "-NoProfile",
            "-NonInteractive",
            "-ExecutionPolicy",
            "Bypass",
            "-EncodedCommand"
        ]
    );
    assert_eq!(args[5], scripts::encode_command(&Op::SaveVm.script()));
    assert_eq!(args.len(), 6);
}

#[test]
fn exit_codes_and_stderr_become_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ps = fake(
        dir.path(),
        "cat > /dev/null; echo 'Save-VM : Access is denied.' >&2; exit 1",
    );
    let hv = HyperVHypervisor::new(Box::new(ps));
    let e = hv.save_state("vm1").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Hyper-V save-vm of VM 'vm1' failed (exit code 1): Save-VM : Access is denied."
    );

    let ps = fake(dir.path(), "cat > /dev/null; echo '{\"State\":\"Saved\"}'");
    HyperVHypervisor::new(Box::new(ps))
        .save_state("vm1")
        .unwrap();
}

#[test]
fn missing_powershell_is_a_clear_io_error() {
    let ps = SystemPowerShell {
        executable: "/nonexistent/powershell.exe".into(),
    };
    let e = HyperVHypervisor::new(Box::new(ps)).list_vms().unwrap_err();
    assert!(matches!(&e, Error::Io { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("cannot start /nonexistent/powershell.exe for Hyper-V operation inventory"),
        "{e}"
    );
}

#[test]
fn a_script_that_never_reads_its_arguments_still_reports_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let ps = fake(
        dir.path(),
        "exec 0<&-; echo 'Hyper-V module not installed' >&2; exit 3",
    );
    let e = HyperVHypervisor::new(Box::new(ps))
        .start("vm1")
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("(exit code 3): Hyper-V module not installed"),
        "{e}"
    );
}
