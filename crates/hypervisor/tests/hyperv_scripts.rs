//! The PowerShell layer: constant scripts, arguments only through stdin JSON, encoding.

use hypervisor::hyperv::scripts::{self, Op};
use hypervisor::hyperv::{CannedRunner, HyperVHypervisor, PsOutput};
use hypervisor::Hypervisor;

const HOSTILE: &str = "a'; Remove-Item C:\\ -Recurse #";

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let n = chunk
            .iter()
            .filter(|&&c| c != b'=')
            .fold(0u32, |n, &c| (n << 6) | u32::from(val(c)))
            << (6 * pad);
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    out
}

#[test]
fn encoded_command_is_base64_of_utf16le() {
    assert_eq!(scripts::encode_command("a"), "YQA=");
    assert_eq!(scripts::encode_command("Get-VM"), "RwBlAHQALQBWAE0A");
    for op in Op::ALL {
        let script = op.script();
        let bytes = decode_base64(&scripts::encode_command(&script));
        let units: Vec<u16> = bytes
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(String::from_utf16(&units).unwrap(), script, "{}", op.name());
        // Windows limits a command line to 32767 characters.
        let line: usize = scripts::command_line(&script)
            .iter()
            .map(|a| a.len() + 1)
            .sum();
        assert!(
            line < 32_000,
            "{} command line is {line} characters",
            op.name()
        );
    }
}

#[test]
fn command_line_is_noninteractive_powershell() {
    let cl = scripts::command_line("x");
    assert_eq!(
        cl[..6],
        [
            "powershell.exe",
            "-NoProfile",
            "-NonInteractive",
            "-ExecutionPolicy",
            "Bypass",
            "-EncodedCommand"
        ]
    );
}

#[test]
fn hostile_names_only_travel_as_json_data() {
    let runner = std::sync::Arc::new(
        CannedRunner::new()
            .respond(Op::SaveVm, PsOutput::ok(r#"{"State":"Saved"}"#))
            .respond(
                Op::StopVm,
                PsOutput::ok(r#"{"TimedOut":false,"State":"Off"}"#),
            ),
    );
    let hv = HyperVHypervisor::new(Box::new(runner.clone()));
    for name in [
        HOSTILE,
        "x\"; exit 0; \"",
        "vm*[0-9]?",
        "$(Stop-Computer)",
        "日本語のVM",
    ] {
        hv.save_state(name).unwrap();
        hv.shutdown(name, std::time::Duration::from_millis(1500))
            .unwrap();
    }
    let calls = runner.calls();
    assert_eq!(calls.len(), 10);
    for call in &calls {
        // The script is the constant template, untouched by the name.
        assert_eq!(call.script, call.op.script());
        assert!(call.stdin_json.is_ascii(), "{}", call.stdin_json);
        let v: serde_json::Value = serde_json::from_str(&call.stdin_json).unwrap();
        assert!(v["Name"].is_string());
    }
    let v: serde_json::Value = serde_json::from_str(&calls[0].stdin_json).unwrap();
    assert_eq!(v["Name"], HOSTILE);
    let v: serde_json::Value = serde_json::from_str(&calls[8].stdin_json).unwrap();
    assert_eq!(v["Name"], "日本語のVM");
    assert!(calls[8].stdin_json.contains("\\u65e5"));
    let v: serde_json::Value = serde_json::from_str(&calls[1].stdin_json).unwrap();
    assert_eq!(
        v["TimeoutSeconds"], 2,
        "a timeout rounds up to whole seconds"
    );
}

#[test]
fn scripts_never_pass_values_as_code_or_wildcards() {
    for op in Op::ALL {
        let s = op.script();
        assert!(
            !s.contains("-TurnOff"),
            "{}: backups never power off hard",
            op.name()
        );
        assert!(
            !s.contains("Invoke-Expression") && !s.contains("iex "),
            "{}",
            op.name()
        );
        // -Name / -VMName treat * ? [ ] as wildcards; VMs are found by exact comparison.
        assert!(
            !s.contains("-VMName") && !s.contains("Get-VM -Name"),
            "{}",
            op.name()
        );
        assert!(s.starts_with(scripts::PROLOGUE));
        assert!(
            s.contains("exit 1"),
            "{}: failures must give a non-zero exit",
            op.name()
        );
    }
    assert!(scripts::CREATE_CHECKPOINT.contains("SnapshotType = [uint16]32768"));
    assert!(scripts::CREATE_CHECKPOINT.contains("IgnoreNonSnapshottableDisks = $true"));
    assert!(scripts::PROLOGUE.contains("$job.JobState -eq 7"));
    assert!(scripts::PROLOGUE.contains("-ne 4096"));
    assert!(scripts::CLEANUP_LEFTOVERS.contains("Get-VMSnapshot -VM $vm -SnapshotType Recovery"));
    assert!(scripts::STOP_VM.contains("Stop-VM -VM $vm -Force -AsJob"));
}

#[test]
fn docs_show_every_script_verbatim() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/hyperv.md"))
        .expect("docs/hyperv.md must exist");
    assert!(
        doc.contains(&scripts::markdown_listing()),
        "docs/hyperv.md is out of date: replace its script listing with scripts::markdown_listing()"
    );
}
