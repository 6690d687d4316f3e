//! `hyperkeep run`, `preflight` and `backup --config`: job files, exit codes and JSON. (The
//! strategies themselves are tested in crates/jobs against Hyper-V canned outputs and a real
//! QEMU VM.)

use std::path::Path;
use std::process::{Command, Output};

fn hk(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hyperkeep"))
        .current_dir(dir)
        .env_remove("HYPERKEEP_REPOSITORY")
        .env_remove("HYPERKEEP_PASSWORD")
        .env_remove("HYPERKEEP_PASSWORD_FILE")
        .args(args)
        .output()
        .expect("run hyperkeep")
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stdout_json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// A repository and a QEMU job whose runtime directory has no VM definitions.
fn setup(vm_table: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pass"), "pw\n").unwrap();
    let out = hk(
        dir.path(),
        &["--repo", "repo", "--password-file", "pass", "init"],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(
        dir.path().join("job.toml"),
        format!(
            "[hypervisor]\nkind = \"qemu\"\nruntime_dir = \"vms\"\n\n[repository]\nlocation = \"repo\"\npassword_file = \"pass\"\n\n{vm_table}"
        ),
    )
    .unwrap();
    dir
}

#[test]
fn a_bad_job_file_is_an_error_naming_the_line() {
    let dir = setup("[[vm]]\nname = \"web01\"\nmode = \"offlin\"\n");
    let out = hk(dir.path(), &["run", "job.toml"]);
    assert_eq!(code(&out), 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("job.toml, line 11, column 8"), "{err}");
    assert!(err.contains("unknown variant `offlin`"), "{err}");
    let out = hk(dir.path(), &["run", "job.toml", "--json"]);
    assert_eq!(code(&out), 2);
    assert_eq!(stdout_json(&out)["exit_code"], 2);
}

#[test]
fn a_vm_that_does_not_exist_fails_the_run_with_exit_1() {
    let dir = setup("[[vm]]\nname = \"web01\"\nmode = \"offline\"\n");
    let out = hk(dir.path(), &["run", "job.toml", "--json"]);
    assert_eq!(code(&out), 1);
    let v = stdout_json(&out);
    assert_eq!(v["exit_code"], 1);
    assert_eq!(v["failed"], 1);
    assert_eq!(v["vms"][0]["vm"], "web01");
    assert_eq!(v["vms"][0]["status"], "failed");
    assert!(v["vms"][0]["error"]
        .as_str()
        .unwrap()
        .contains("no VM named 'web01'"));

    let out = hk(
        dir.path(),
        &["backup", "--vm", "web01", "--config", "job.toml"],
    );
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED web01"));

    let out = hk(dir.path(), &["preflight", "--config", "job.toml", "--json"]);
    assert_eq!(code(&out), 1);
    let v = stdout_json(&out);
    assert_eq!(v["hypervisor"], "qemu");
    assert!(v["errors"][0].as_str().unwrap().contains("web01"));
}

#[test]
fn preflight_without_a_job_lists_every_vm() {
    let dir = tempfile::tempdir().unwrap();
    let out = hk(
        dir.path(),
        &[
            "preflight",
            "--hypervisor",
            "qemu",
            "--runtime-dir",
            "vms",
            "--json",
        ],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout_json(&out)["vms"], serde_json::json!([]));
    let out = hk(dir.path(), &["preflight", "--hypervisor", "qemu"]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--runtime-dir"));
}

#[test]
fn backup_needs_paths_or_a_job_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = hk(dir.path(), &["backup", "--vm", "web01"]);
    assert_eq!(code(&out), 2);
    let out = hk(
        dir.path(),
        &[
            "backup",
            "--vm",
            "web01",
            "--config",
            "job.toml",
            "disk.vhdx",
        ],
    );
    assert_eq!(code(&out), 2);
}

#[test]
fn a_job_without_a_repository_there_exits_10() {
    let dir = setup("[[vm]]\nname = \"web01\"\n");
    std::fs::remove_dir_all(dir.path().join("repo")).unwrap();
    let out = hk(dir.path(), &["run", "job.toml"]);
    assert_eq!(code(&out), 10, "{}", String::from_utf8_lossy(&out.stderr));
}

/// The `preflight` block the README shows for the QEMU test VM is what the binary prints for it:
/// the real test VM (TCG, guest agent with fsfreeze; assets from `testvm/build.sh`) booted under
/// the name `testvm`.
#[test]
fn readme_preflight_matches_the_qemu_test_vm() {
    use hypervisor::qemu::{build_testvm, testvm_definition, QemuHypervisor};
    use hypervisor::Hypervisor;

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let intro = "`preflight` for the QEMU test VM";
    let after = &readme[readme
        .find(intro)
        .expect("README shows preflight for the test VM")..];
    let start = after.find("```text\n").expect("a text block") + "```text\n".len();
    let expected = &after[start..start + after[start..].find("```").unwrap()];

    let assets = build_testvm(&root).unwrap_or_else(|e| panic!("{e}"));
    // Short path: QEMU's unix sockets live under the runtime directory.
    let tmp = tempfile::Builder::new()
        .prefix("hkp")
        .tempdir_in("/tmp")
        .unwrap();
    let disk = tmp.path().join("disk.vhdx");
    std::fs::copy(assets.join("disk-template.vhdx"), &disk).unwrap();
    let hv = QemuHypervisor::new(tmp.path().join("vms"))
        .unwrap()
        .kill_on_drop(true);
    hv.define(&testvm_definition("testvm", &assets, vec![disk]))
        .unwrap();
    hv.start("testvm").unwrap();
    assert!(
        hv.wait_booted("testvm", std::time::Duration::from_secs(90))
            .unwrap(),
        "the test VM did not boot"
    );
    // Booted means the console marker; wait for the agent too (what preflight asks about).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !hv.vm("testvm").unwrap().guest.backup_service_enabled {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest agent never answered with fsfreeze"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let out = hk(
        tmp.path(),
        &["preflight", "--hypervisor", "qemu", "--runtime-dir", "vms"],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected,
        "README.md's preflight block differs from the binary's output"
    );
}
