//! The repository commands of the `hyperkeep` binary, run as a user runs them: init, backup of a
//! VHDX and a configuration file, snapshots, restore (checked with `qemu-img compare`), diff,
//! forget, key slots, and every documented error exit code. The KDF is the fast test one
//! (`HYPERKEEP_TEST_FAST_KDF=1`); everything else is real.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use vdisk::OpenOptions;

/// A scratch directory with a repository location, a password file and a sample VM.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("password"), "correct horse\n").unwrap();
        std::fs::write(dir.path().join("wrong"), "battery staple\n").unwrap();
        Env { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    /// Run hyperkeep with this repository and a password file (`pw`), no terminal, and none of
    /// the user's own HYPERKEEP_* settings.
    fn run_pw(&self, pw: Option<&str>, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hyperkeep"));
        c.env_remove("HYPERKEEP_PASSWORD")
            .env_remove("HYPERKEEP_PASSWORD_FILE")
            .env_remove("HYPERKEEP_LOG")
            .env("HYPERKEEP_TEST_FAST_KDF", "1")
            .env("HYPERKEEP_REPOSITORY", self.repo())
            .stdin(Stdio::null());
        if let Some(pw) = pw {
            c.arg("--password-file").arg(self.path(pw));
        }
        c.args(args).output().expect("run hyperkeep")
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_pw(Some("password"), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "hyperkeep {args:?} failed ({:?}):\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let text = self.ok(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{text}"))
    }

    fn init(&self) {
        self.ok(&["init"]);
    }

    /// A VM folder: a dynamic VHDX made from the sample disk, and a configuration file.
    fn vm(&self) -> (PathBuf, PathBuf) {
        let raw = self.path("sample.raw");
        testkit::write_sample_disk(&raw, 64 << 20).unwrap();
        let vm = self.path("vm");
        std::fs::create_dir_all(&vm).unwrap();
        let vhdx = vm.join("disk.vhdx");
        // Through the binary (its own process), so no writer lock is held by this test process.
        // 1 MiB blocks, so that the VHDX's allocation follows the data closely.
        self.ok(&["disk", "convert", s(&raw), s(&vhdx), "--block-size", "1M"]);
        let config = vm.join("vm.vmcx");
        std::fs::write(&config, b"<configuration name=\"test vm\"/>\n".repeat(100)).unwrap();
        (vhdx, config)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fails_with(o: &Output, code: i32, needle: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}, got {:?}:\n{}",
        o.status.code(),
        stderr(o)
    );
    let err = stderr(o);
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(err.contains(needle), "{needle:?} not in stderr: {err}");
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().unwrap_or_else(|e| {
        panic!("qemu-img is needed by this test but cannot run ({e}); install qemu-utils (./scripts/test.sh does)")
    })
}

/// Every file under `dir` with its content: a repository "before" to compare with "after".
/// `qemu-img compare`: the two images show the same guest view.
fn assert_same_view(a_format: &str, a: &Path, b_format: &str, b: &Path) {
    let cmp = qemu_img(&["compare", "-f", a_format, "-F", b_format, s(a), s(b)]);
    assert!(
        cmp.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&cmp.stdout),
        stderr(&cmp)
    );
}

fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.insert(e.path(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

/// Open for writing, retrying only for the moment a sibling test thread's fork holds a copy of
/// the VHDX writer's lock (see tests/cli.rs).
fn write_pattern(p: &Path, offset: u64, len: usize, byte: u8) {
    for _ in 0..50 {
        match vdisk::open_mut(p, &OpenOptions::default()) {
            Err(e) if e.to_string().contains("already open for writing") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => {
                let mut d = other.unwrap();
                d.write_at(&vec![byte; len], offset).unwrap();
                d.flush().unwrap();
                return;
            }
        }
    }
    panic!("{} stays locked by another writer", p.display());
}

#[test]
fn init_creates_a_repository_once() {
    let env = Env::new();
    let v = env.json(&["init"]);
    assert_eq!(v["chunk_size"], 1 << 20);
    assert_eq!(v["version"], 2);
    assert_eq!(v["encryption"], "xaes-256-gcm");
    assert!(v["id"].as_str().unwrap().len() >= 16);
    let config: Value =
        serde_json::from_slice(&std::fs::read(env.repo().join("config")).unwrap()).unwrap();
    assert_eq!(config["format"], "hyperkeep-repository");
    assert_eq!(config["id"], v["id"]);

    let before = tree(&env.repo());
    let again = env.run(&["init"]);
    fails_with(&again, 2, "already exists");
    assert_eq!(
        tree(&env.repo()),
        before,
        "a second init changed the repository"
    );

    let other = Env::new();
    other.ok(&["init", "--chunk-size", "256K"]);
    let v = other.json(&["snapshots"]);
    assert_eq!(v, serde_json::json!([]));
    let bad = other.run(&["init", "--chunk-size", "3M"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

#[test]
fn an_xchacha_repository_is_format_version_1_and_round_trips() {
    let env = Env::new();
    let v = env.json(&["init", "--encryption", "xchacha20poly1305"]);
    assert_eq!(v["version"], 1);
    assert_eq!(v["encryption"], "xchacha20poly1305");
    let (vhdx, config) = env.vm();
    env.ok(&["backup", "--vm", "web01", s(&vhdx), s(&config)]);
    let target = env.path("restored");
    env.ok(&["restore", "latest", "--target", s(&target), "--to", "raw"]);
    assert_same_view("vhdx", &vhdx, "raw", &target.join("disk.raw"));
    assert_eq!(env.json(&["check", "--read-data"])["clean"], true);
    let o = env.run(&["init", "--encryption", "aes-128-ecb"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn backup_snapshots_restore_round_trip() {
    let env = Env::new();
    env.init();
    let (vhdx, config) = env.vm();
    let b = env.json(&[
        "backup",
        "--vm",
        "web01",
        "--tag",
        "env=test",
        s(&vhdx),
        s(&config),
    ]);
    let id = b["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64);
    assert_eq!(b["short_id"], &id[..8]);
    let summary = &b["summary"];
    // Only the allocated part of the 64 MiB disk is read, and it is all new.
    let read = summary["bytes_read"].as_u64().unwrap();
    assert!(read > 2 << 20 && read < 64 << 20, "bytes_read {read}");
    assert!(summary["chunks_new"].as_u64().unwrap() > 0);

    let list = env.json(&["snapshots"]);
    let snaps = list.as_array().unwrap();
    assert_eq!(snaps.len(), 1);
    let sn = &snaps[0];
    assert_eq!(sn["id"], id.as_str());
    assert_eq!(sn["short_id"], &id[..8]);
    assert_eq!(sn["vm"], "web01");
    assert_eq!(sn["tags"]["env"], "test");
    assert!(sn["time"].as_str().unwrap().ends_with('Z'));
    assert!(!sn["hostname"].as_str().unwrap().is_empty());
    assert_eq!(sn["disks"][0]["name"], "disk.vhdx");
    assert_eq!(sn["disks"][0]["format"], "vhdx");
    assert_eq!(sn["disks"][0]["virtual_size"], 64 << 20);
    // Everything read was the disk's data, and the 3200-byte configuration file.
    assert_eq!(sn["disks"][0]["data_bytes"].as_u64().unwrap(), read - 3200);
    assert_eq!(sn["files"][0]["name"], "vm.vmcx");
    assert_eq!(sn["files"][0]["size"], 3200);
    assert_eq!(sn["summary"], *summary);

    // The human table: short id, VM, tags and disk names on one aligned row.
    let text = env.ok(&["snapshots"]);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("ID"), "{text}");
    let row = lines.next().unwrap();
    assert!(row.starts_with(&id[..8]), "{text}");
    assert!(row.contains("web01") && row.contains("env=test") && row.contains("disk.vhdx"));
    assert_eq!(
        header.find("VM"),
        row.find("web01"),
        "columns not aligned:\n{text}"
    );

    // Restore by prefix into a new directory; `latest` of the VM names the same snapshot.
    let target = env.path("restored");
    let r = env.json(&["restore", &id[..6], "--target", s(&target)]);
    assert_eq!(r["snapshot"], id.as_str());
    let restored = target.join("disk.vhdx");
    assert_same_view("vhdx", &vhdx, "vhdx", &restored);
    let chk = qemu_img(&["check", "-f", "vhdx", s(&restored)]);
    assert!(
        chk.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&chk.stdout)
    );
    assert_eq!(
        std::fs::read(target.join("vm.vmcx")).unwrap(),
        std::fs::read(&config).unwrap()
    );

    // Restoring again over the same files is refused, and nothing is overwritten.
    let again = env.run(&["restore", "latest", "--vm", "web01", "--target", s(&target)]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));

    // --to raw: a raw image equal to the guest view.
    let raw_target = env.path("restored-raw");
    env.ok(&[
        "restore",
        "latest",
        "--target",
        s(&raw_target),
        "--to",
        "raw",
    ]);
    assert_same_view("vhdx", &vhdx, "raw", &raw_target.join("disk.raw"));

    env.ok(&["check"]);
    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["clean"], true);
    assert!(c["blobs_verified"].as_u64().unwrap() > 0);
    let st = env.json(&["stats"]);
    assert_eq!(st["snapshots"], 1);
}

#[test]
fn incremental_backup_and_diff() {
    let env = Env::new();
    env.init();
    let (vhdx, config) = env.vm();
    let first = env.json(&["backup", "--vm", "vm1", s(&vhdx), s(&config)]);
    let first_id = first["id"].as_str().unwrap().to_string();

    // Change 2 MiB at a 1 MiB-aligned offset (two chunks) in a differencing child, then back up
    // the child's view with its own ranges as the change list.
    let child = env.path("vm/disk-checkpoint.avhdx");
    env.ok(&["disk", "create-child", s(&vhdx), s(&child)]);
    write_pattern(&child, 40 << 20, 1 << 20, 0x5a);
    write_pattern(&child, 41 << 20, 1 << 20, 0xa5);
    let second = env.json(&[
        "backup",
        "--vm",
        "vm1",
        "--changes-from",
        s(&child),
        s(&child),
        s(&config),
    ]);
    let sum = &second["summary"];
    assert_eq!(second["parent"], first_id.as_str());
    assert_eq!(sum["bytes_new"], 2 << 20, "{sum}");
    // Only the changed ranges (plus the small config file) were read.
    assert!(
        sum["bytes_read"].as_u64().unwrap() <= (2 << 20) + 4096,
        "{sum}"
    );

    let restored = env.path("r2");
    env.ok(&["restore", "latest", "--target", s(&restored)]);
    let out = restored.join("disk-checkpoint.vhdx");
    // qemu-img cannot open VHDX differencing disks: compare with the chain flattened by us.
    let flat = env.path("flat.raw");
    env.ok(&["disk", "convert", s(&child), s(&flat)]);
    assert_same_view("raw", &flat, "vhdx", &out);

    // diff by disk name: the child has a new name, so compare two backups of the same name.
    let third = env.json(&["backup", "--vm", "vm1", s(&vhdx), s(&config)]);
    let d = env.json(&["diff", &first_id, third["id"].as_str().unwrap()]);
    assert_eq!(d["changed_bytes"], 0);
    assert_eq!(d["disks"][0]["change"], "unchanged");
    let d = env.json(&["diff", &first_id, second["id"].as_str().unwrap()]);
    let names: Vec<(&str, &str)> = d["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), x["change"].as_str().unwrap()))
        .collect();
    assert!(names.contains(&("disk.vhdx", "removed")), "{d}");
    assert!(names.contains(&("disk-checkpoint.avhdx", "added")), "{d}");
    let text = env.ok(&["diff", &first_id, "latest"]);
    assert!(
        text.contains("disk.vhdx") && text.contains("unchanged"),
        "{text}"
    );
}

#[test]
fn forget_dry_run_lists_and_keeps_everything() {
    let env = Env::new();
    env.init();
    let (vhdx, config) = env.vm();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let v = env.json(&["backup", "--vm", "vm1", s(&vhdx), s(&config)]);
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let text = env.ok(&["forget", "--keep-last", "1", "--dry-run"]);
    assert!(text.contains("VM vm1"), "{text}");
    for (n, id) in ids.iter().enumerate() {
        let line = text
            .lines()
            .find(|l| l.starts_with(&id[..8]))
            .unwrap_or_else(|| panic!("{id} not listed:\n{text}"));
        let want = if n == 2 { "keep" } else { "remove" };
        assert!(line.contains(want), "{line}");
    }
    assert!(text.contains("1 kept, 2 would be removed"), "{text}");
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 3);

    let v = env.json(&["forget", "--keep-last", "2", "--dry-run"]);
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["removed"], 1);
    assert_eq!(v["kept"], 2);

    // For real, then prune frees the data nobody uses (here: nothing, the three are identical).
    let v = env.json(&["forget", "--keep-last", "1", "--prune"]);
    assert_eq!(v["forget"]["removed"], 2);
    assert_eq!(v["prune"]["dry_run"], false);
    let left = env.json(&["snapshots"]);
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["id"], ids[2].as_str());
    env.ok(&["check", "--read-data"]);

    let no_policy = env.run(&["forget"]);
    fails_with(&no_policy, 2, "policy");
}

#[test]
fn key_add_list_remove() {
    let env = Env::new();
    env.init();
    std::fs::write(env.path("second"), "second password\n").unwrap();
    let added = env.json(&["key", "add", "--new-password-file", s(&env.path("second"))]);
    let new_id = added["added"].as_str().unwrap().to_string();
    let keys = env.json(&["key", "list"]);
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let current: Vec<&Value> = keys.iter().filter(|k| k["current"] == true).collect();
    assert_eq!(current.len(), 1);
    let first_id = current[0]["id"].as_str().unwrap().to_string();
    assert_ne!(first_id, new_id);

    // The new password opens the repository; the key in use cannot remove itself.
    let with_second = env.run_pw(Some("second"), &["--json", "key", "list"]);
    assert!(with_second.status.success(), "{}", stderr(&with_second));
    let refused = env.run(&["key", "remove", &first_id]);
    fails_with(&refused, 2, "opened");
    assert_eq!(env.json(&["key", "list"]).as_array().unwrap().len(), 2);

    // Removed through the other key, the first password no longer opens anything.
    let removed = env.run_pw(Some("second"), &["key", "remove", &first_id]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    fails_with(&env.run(&["snapshots"]), 12, "wrong password");
    let last = env.run_pw(Some("second"), &["key", "remove", &new_id]);
    assert_eq!(last.status.code(), Some(2), "{}", stderr(&last));
}

#[test]
fn exit_codes_and_json_errors() {
    let env = Env::new();
    // 10: nothing at the location, before any password is needed.
    let none = env.run_pw(None, &["snapshots"]);
    fails_with(&none, 10, "no hyperkeep repository");
    let none = env.run(&["--json", "snapshots"]);
    assert_eq!(none.status.code(), Some(10));
    let v: Value = serde_json::from_slice(&none.stdout).unwrap();
    assert_eq!(v["exit_code"], 10);
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("no hyperkeep repository"));
    assert!(v["hint"].as_str().unwrap().contains("hyperkeep init"));

    env.init();
    // 12: wrong password, human and JSON.
    fails_with(
        &env.run_pw(Some("wrong"), &["snapshots"]),
        12,
        "wrong password",
    );
    let wrong = env.run_pw(Some("wrong"), &["--json", "snapshots"]);
    assert_eq!(wrong.status.code(), Some(12));
    let v: Value = serde_json::from_slice(&wrong.stdout).unwrap();
    assert_eq!(v["exit_code"], 12);

    // 2: no password source and no terminal: the message names the three ways.
    let nopw = env.run_pw(None, &["snapshots"]);
    fails_with(&nopw, 2, "--password-file");
    let err = stderr(&nopw);
    assert!(err.contains("HYPERKEEP_PASSWORD_FILE") && err.contains("HYPERKEEP_PASSWORD"));
    // The password from the environment works.
    let mut c = Command::new(env!("CARGO_BIN_EXE_hyperkeep"));
    let o = c
        .env_remove("HYPERKEEP_PASSWORD_FILE")
        .env("HYPERKEEP_TEST_FAST_KDF", "1")
        .env("HYPERKEEP_PASSWORD", "correct horse")
        .args(["--repo", s(&env.repo()), "snapshots"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // 2 with JSON for bad arguments and an unknown snapshot, too.
    let bad = env.run(&["--json", "restore"]);
    assert_eq!(bad.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(v["exit_code"], 2);
    let unknown = env.run(&[
        "--json",
        "restore",
        "abcdef12",
        "--target",
        s(&env.path("x")),
    ]);
    assert_eq!(unknown.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&unknown.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("no snapshot"), "{v}");
    assert!(!env.path("x").exists());

    // A JSON error for a disk command as well.
    let d = env.run(&["--json", "disk", "info", s(&env.path("missing.vhdx"))]);
    assert_eq!(d.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&d.stdout).unwrap();
    assert_eq!(v["exit_code"], 2);
}

#[test]
fn locked_repository_exits_11_until_unlocked() {
    let env = Env::new();
    env.init();
    let (vhdx, _) = env.vm();
    // An exclusive lock held by a live process on this host (this test): not stale.
    let hostname = {
        let o = Command::new("hostname")
            .output()
            .unwrap_or_else(|e| panic!("the `hostname` command is needed by this test ({e})"));
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let lock = serde_json::json!({
        "hostname": hostname, "pid": std::process::id(),
        "time": chrono_now(), "exclusive": true, "operation": "prune",
    });
    let name = "ab".repeat(32);
    std::fs::create_dir_all(env.repo().join("locks")).unwrap();
    std::fs::write(env.repo().join("locks").join(&name), lock.to_string()).unwrap();

    let o = env.run(&["backup", "--vm", "x", s(&vhdx)]);
    fails_with(&o, 11, "locked");
    assert!(stderr(&o).contains("hyperkeep unlock"));
    assert_eq!(env.json(&["snapshots"]), serde_json::json!([]));

    // `unlock` leaves a live lock alone; --remove-all removes it.
    let v = env.json(&["unlock"]);
    assert_eq!(v["removed"], serde_json::json!([]));
    let v = env.json(&["unlock", "--remove-all"]);
    assert_eq!(v["removed"].as_array().unwrap().len(), 1);
    env.ok(&["backup", "--vm", "x", s(&vhdx)]);
}

/// Now as RFC 3339 UTC, without a date crate: from `date`.
fn chrono_now() -> String {
    let o = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("run date");
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

#[test]
fn newer_or_foreign_repositories_are_refused_untouched() {
    // A newer format version: exit 2, "upgrade", not one byte changed.
    let env = Env::new();
    env.init();
    let (vhdx, config) = env.vm();
    env.ok(&["backup", "--vm", "vm1", s(&vhdx), s(&config)]);
    let cfg_path = env.repo().join("config");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["version"] = 99.into();
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let before = tree(&env.repo());
    for args in [
        vec!["snapshots"],
        vec!["backup", "--vm", "vm1", s(&vhdx)],
        vec!["prune"],
        vec!["forget", "--keep-last", "1"],
        vec!["key", "add", "--new-password-file", s(&env.path("wrong"))],
        vec!["unlock", "--remove-all"],
    ] {
        let o = env.run(&args);
        fails_with(&o, 2, "upgrade");
        assert!(stderr(&o).contains("99"), "{}", stderr(&o));
    }
    let o = env.run(&["--json", "check"]);
    assert_eq!(o.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("upgrade"));
    assert_eq!(
        tree(&env.repo()),
        before,
        "the newer repository was modified"
    );

    // A directory with someone else's `config`: not ours, refused, untouched.
    let foreign = Env::new();
    std::fs::create_dir_all(foreign.repo()).unwrap();
    std::fs::write(
        foreign.repo().join("config"),
        br#"{"version":2,"id":"5c0ffee","chunker_polynomial":"3d0f6b9e5a8c71"}"#,
    )
    .unwrap();
    std::fs::create_dir_all(foreign.repo().join("keys")).unwrap();
    std::fs::write(foreign.repo().join("keys/0123"), b"{}").unwrap();
    let before = tree(&foreign.repo());
    let o = foreign.run(&["snapshots"]);
    fails_with(&o, 2, "not a hyperkeep repository");
    let o = foreign.run(&["init"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(
        tree(&foreign.repo()),
        before,
        "the foreign repository was modified"
    );
}

#[test]
fn check_exits_1_on_a_damaged_pack_and_forget_by_id() {
    let env = Env::new();
    env.init();
    let (vhdx, config) = env.vm();
    let a = env.json(&["backup", "--vm", "vm1", s(&vhdx), s(&config)]);
    std::fs::write(&config, b"changed").unwrap();
    let b = env.json(&["backup", "--vm", "vm1", s(&vhdx), s(&config)]);
    assert_eq!(
        env.json(&["check", "--read-data-subset", "100%"])["clean"],
        true
    );

    // Forget one snapshot by an abbreviated id.
    let a_id = a["id"].as_str().unwrap();
    let v = env.json(&["forget", &a_id[..10]]);
    assert_eq!(v["removed"], serde_json::json!([a_id]));
    let left = env.json(&["snapshots"]);
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["id"], b["id"]);

    // Flip one byte in the middle of every pack: structure still fine, data not.
    let packs: Vec<PathBuf> = tree(&env.repo().join("data")).into_keys().collect();
    assert!(!packs.is_empty());
    for p in &packs {
        let mut bytes = std::fs::read(p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(p, bytes).unwrap();
    }
    env.ok(&["check"]);
    let o = env.run(&["--json", "check", "--read-data"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["clean"], false);
    assert!(!v["problems"].as_array().unwrap().is_empty());
    let o = env.run(&["check", "--read-data"]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("found:") && text.contains("data/"), "{text}");

    // A missing password file is an error naming it.
    let o = env.run_pw(Some("nonexistent"), &["snapshots"]);
    fails_with(&o, 2, "password file");
}

/// The prompt path, on a real terminal: `script` gives hyperkeep a pseudo-terminal; the test
/// types the password (twice for `init`) as a user would.
#[test]
fn password_prompt_on_a_terminal() {
    use std::io::Write;
    let env = Env::new();
    let typed = |command: &str, lines: &[&str]| -> (Option<i32>, String) {
        let mut child = Command::new("script")
            .args(["-qec", command, "/dev/null"])
            .env_remove("HYPERKEEP_PASSWORD")
            .env_remove("HYPERKEEP_PASSWORD_FILE")
            .env("HYPERKEEP_TEST_FAST_KDF", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("`script` (util-linux) is needed by this test but cannot run ({e})")
            });
        let mut stdin = child.stdin.take().unwrap();
        for l in lines {
            // Give hyperkeep time to switch echo off and read the previous line.
            std::thread::sleep(std::time::Duration::from_millis(700));
            stdin.write_all(format!("{l}\n").as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let bin = env!("CARGO_BIN_EXE_hyperkeep");
    let repo = env.repo();
    let init = format!("{bin} --repo {} init", s(&repo));
    // Two different passwords: refused, nothing created.
    let (code, out) = typed(&init, &["one password", "another"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("differ"), "{out}");
    assert!(!repo.join("config").exists());
    let (code, out) = typed(&init, &["typed secret", "typed secret"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("enter repository password again"), "{out}");
    assert!(
        !out.contains("typed secret"),
        "the password was echoed: {out}"
    );
    let list = format!("{bin} --repo {} snapshots", s(&repo));
    let (code, out) = typed(&list, &["typed secret"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no snapshots yet"), "{out}");
    let (code, _) = typed(&list, &["wrong"]);
    assert_eq!(code, Some(12));
}

fn qemu_io(args: &[&str]) {
    let o = Command::new("qemu-io").args(args).output().unwrap_or_else(|e| {
        panic!("qemu-io is needed by this test but cannot run ({e}); install qemu-utils (./scripts/test.sh does)")
    });
    assert!(o.status.success(), "qemu-io {args:?}: {}", stderr(&o));
}

/// Disks made by an independent implementation (qemu): a dynamic VHD and a VHDX with data at
/// unaligned places, backed up as one VM and restored both as themselves and as raw.
#[test]
fn qemu_made_vhd_and_vhdx_round_trip() {
    let env = Env::new();
    env.init();
    let vhd = env.path("a.vhd");
    let vhdx = env.path("b.vhdx");
    let o = qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        s(&vhd),
        "40M",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = qemu_img(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=8M",
        s(&vhdx),
        "72M",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    qemu_io(&["-f", "vpc", "-c", "write -P 0x11 4096 3M", s(&vhd)]);
    qemu_io(&["-f", "vpc", "-c", "write -P 0x22 30M 512", s(&vhd)]);
    qemu_io(&["-f", "vhdx", "-c", "write -P 0x33 1M 9M", s(&vhdx)]);
    qemu_io(&["-f", "vhdx", "-c", "write -P 0x44 71M 1M", s(&vhdx)]);

    let b = env.json(&["backup", "--vm", "two-disks", s(&vhd), s(&vhdx)]);
    let sn = &env.json(&["snapshots", "--vm", "two-disks"])[0];
    assert_eq!(sn["id"], b["id"]);
    let formats: Vec<&str> = sn["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["vhd", "vhdx"]);

    let same = env.path("same");
    env.ok(&["restore", "latest", "--target", s(&same)]);
    let raw = env.path("raw");
    env.ok(&["restore", "latest", "--target", s(&raw), "--to", "raw"]);
    for (src, fmt, name) in [(&vhd, "vpc", "a"), (&vhdx, "vhdx", "b")] {
        let ext = if fmt == "vpc" { "vhd" } else { "vhdx" };
        let restored = same.join(format!("{name}.{ext}"));
        for (other, other_fmt) in [
            (restored.clone(), fmt),
            (raw.join(format!("{name}.raw")), "raw"),
        ] {
            assert_same_view(fmt, src, other_fmt, &other);
        }
        if fmt == "vpc" {
            continue; // qemu-img has no check for VHD
        }
        let chk = qemu_img(&["check", "-f", fmt, s(&restored)]);
        assert!(
            chk.status.success(),
            "{}",
            String::from_utf8_lossy(&chk.stdout)
        );
    }
}
