//! Shared helpers for the end-to-end tests (`tests/e2e_*.rs`): they run the built `hyperkeep`
//! binary against real repositories in temporary directories, with source VMs made of real VHDX
//! files written through `vdisk`, and compare restored content by SHA-256 (computed by the
//! system's `sha256sum`, which is fast even when the tests are built without optimisation).
//!
//! Each test file includes this module with `mod support;` and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vdisk::{CreateOptions, DiskFormat, OpenOptions, VirtualDisk};

pub const MIB: u64 = 1 << 20;
pub const PASSWORD: &str = "correct horse battery staple";

/// Exit codes from the CLI contract.
pub const EXIT_PROBLEMS: i32 = 1;
pub const EXIT_ERROR: i32 = 2;
pub const EXIT_NO_REPO: i32 = 10;
pub const EXIT_LOCKED: i32 = 11;
pub const EXIT_WRONG_PASSWORD: i32 = 12;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hyperkeep")
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Text of both output streams, for assertion messages.
pub fn both(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ------------------------------------------------------------------------------------------------
// Deterministic randomness (no extra dependency; the seed is printed so a failure can be replayed).

#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A seed from the environment (`HK_TEST_SEED`) or the clock, printed for replay.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("HK_TEST_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{test}: seed {seed} (replay with HK_TEST_SEED={seed})");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

// ------------------------------------------------------------------------------------------------
// Hashing with the system's sha256sum.

fn sha256sum_missing(e: std::io::Error) -> ! {
    panic!("sha256sum (coreutils) is needed by this test but cannot run: {e}")
}

pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| sha256sum_missing(e));
    assert!(
        out.status.success(),
        "sha256sum {}: {}",
        path.display(),
        both(&out)
    );
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// SHA-256 of the guest view of a disk (any format, read through vdisk).
pub fn view_sha256(path: &Path) -> String {
    let disk = vdisk::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open {} as a disk: {e}", path.display()));
    let size = disk.geometry().virtual_size;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| sha256sum_missing(e));
    let mut stdin = child.stdin.take().unwrap();
    let mut buf = vec![0u8; (4 * MIB) as usize];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        disk.read_at(&mut buf[..n], off)
            .unwrap_or_else(|e| panic!("read {} at {off}: {e}", path.display()));
        stdin.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    format!("{}/{}", size, &String::from_utf8_lossy(&out.stdout)[..64])
}

/// Every file under `dir` (relative path -> SHA-256), to prove that a command left a repository
/// untouched.
pub fn tree_hashes(dir: &Path) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                map.insert(rel, sha256_file(&p));
            }
        }
    }
    map
}

/// Object files of a repository of one kind ("data", "index", "snapshots", "keys", "locks").
pub fn repo_files(repo: &Path, kind: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![repo.join(kind)];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if !e.file_name().to_string_lossy().contains(".tmp") {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

pub fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

// ------------------------------------------------------------------------------------------------
// Source VMs: one dynamic VHDX disk with random and compressible data, holes and zero runs, and a
// small configuration file.

pub struct SourceVm {
    pub name: String,
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub config: PathBuf,
    pub virtual_size: u64,
    rng: Rng,
}

/// What a snapshot of a VM must restore to: disk stem -> view hash, file name -> file hash.
pub type Expected = BTreeMap<String, String>;

impl SourceVm {
    /// A VM named `name` in `dir/name/`, with `data_bytes` of non-zero data spread over a disk of
    /// `virtual_size` bytes (in runs that are not aligned to chunk boundaries).
    pub fn create(
        dir: &Path,
        name: &str,
        virtual_size: u64,
        data_bytes: u64,
        seed: u64,
    ) -> SourceVm {
        let vm_dir = dir.join(name);
        std::fs::create_dir_all(&vm_dir).unwrap();
        let disk = vm_dir.join(format!("{name}-disk.vhdx"));
        let config = vm_dir.join(format!("{name}.vmcx"));
        let mut opts = CreateOptions::new(DiskFormat::Vhdx, virtual_size);
        opts.block_size = Some(2 * MIB as u32);
        let mut d = vdisk::create(&disk, &opts).unwrap();
        d.flush().unwrap();
        drop(d);
        let mut vm = SourceVm {
            name: name.to_string(),
            dir: vm_dir,
            disk,
            config,
            virtual_size,
            rng: Rng::new(seed),
        };
        vm.mutate(data_bytes);
        vm
    }

    /// Write `bytes` of new data at random places: mostly random (incompressible) runs, some
    /// compressible text and some explicit zero runs; and rewrite the configuration file.
    pub fn mutate(&mut self, bytes: u64) {
        let mut d = vdisk::open_mut(&self.disk, &OpenOptions::default()).unwrap();
        let mut left = bytes;
        while left > 0 {
            let len = self.rng.range(64 << 10, 3 * MIB).min(left);
            let off = self.rng.below(self.virtual_size - len) & !511;
            let buf = match self.rng.below(10) {
                0 => vec![0u8; len as usize],
                1 | 2 => {
                    let line = format!(
                        "log line {} of VM {}: all is well\n",
                        self.rng.next_u64(),
                        self.name
                    );
                    line.bytes().cycle().take(len as usize).collect()
                }
                _ => self.rng.bytes(len as usize),
            };
            d.write_at(&buf, off).unwrap();
            left -= len;
        }
        d.flush().unwrap();
        drop(d);
        let cfg_len = self.rng.range(1, 40_000) as usize;
        let cfg = self.rng.bytes(cfg_len);
        std::fs::write(&self.config, cfg).unwrap();
    }

    /// Write the same random 1 MiB block at `count` random 1 MiB-aligned places: lots of data to
    /// read and hash, but only one new chunk to compress and encrypt (a fast backup, even in a
    /// debug build, that still takes long enough to be interfered with).
    pub fn fill_repeated(&mut self, count: u64) {
        let block = self.rng.bytes(MIB as usize);
        let mut d = vdisk::open_mut(&self.disk, &OpenOptions::default()).unwrap();
        for _ in 0..count {
            let off = self.rng.below(self.virtual_size / MIB) * MIB;
            d.write_at(&block, off).unwrap();
        }
        d.flush().unwrap();
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        vec![self.disk.clone(), self.config.clone()]
    }

    pub fn expected(&self) -> Expected {
        let mut m = Expected::new();
        m.insert(disk_key(&self.disk), view_sha256(&self.disk));
        m.insert(file_name(&self.config), sha256_file(&self.config));
        m
    }
}

fn is_disk_name(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("vhdx" | "avhdx" | "vhd" | "avhd" | "raw" | "img")
    )
}

/// Disks are compared by their stem, so that a `--to raw` restore matches too.
fn disk_key(p: &Path) -> String {
    format!("disk:{}", p.file_stem().unwrap().to_string_lossy())
}

/// Hash what a restore wrote into `dir` (the same keys as [`SourceVm::expected`]).
pub fn restored(dir: &Path) -> Expected {
    let mut m = Expected::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else if is_disk_name(&p) {
                let raw = matches!(vdisk::detect(&p), Ok(DiskFormat::Raw));
                // A raw image is its own guest view: hash the file directly (faster).
                let h = if raw {
                    let len = std::fs::metadata(&p).unwrap().len();
                    format!("{len}/{}", sha256_file(&p))
                } else {
                    view_sha256(&p)
                };
                m.insert(disk_key(&p), h);
            } else {
                m.insert(file_name(&p), sha256_file(&p));
            }
        }
    }
    m
}

// ------------------------------------------------------------------------------------------------
// A repository in a temporary directory, and the CLI run against it.

pub struct Env {
    pub tmp: tempfile::TempDir,
    pub repo: PathBuf,
    pub password: String,
}

impl Env {
    /// A scratch directory with a repository location `repo/` (not yet initialised).
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("hk-e2e-")
            .tempdir()
            .unwrap();
        let repo = tmp.path().join("repo");
        Env {
            tmp,
            repo,
            password: PASSWORD.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// A fresh directory under the scratch directory.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// `hyperkeep ARGS` against this repository, never attached to a terminal.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .env("HYPERKEEP_REPOSITORY", &self.repo)
            .env("HYPERKEEP_PASSWORD", &self.password)
            .env("HYPERKEEP_TEST_FAST_KDF", "1")
            .env_remove("HYPERKEEP_PASSWORD_FILE")
            .env_remove("HYPERKEEP_LOG")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run hyperkeep")
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hyperkeep")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "hyperkeep {args:?} failed:\n{}",
            both(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let text = self.ok(&a);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("hyperkeep {a:?}: stdout is not JSON ({e}):\n{text}"))
    }

    pub fn init(&self) {
        self.ok(&["init"]);
    }

    pub fn backup_args(vm: &SourceVm) -> Vec<String> {
        let mut a = vec![
            "--json".to_string(),
            "backup".into(),
            "--vm".into(),
            vm.name.clone(),
        ];
        a.extend(vm.paths().iter().map(|p| s(p).to_string()));
        a
    }

    /// Back up `vm`; returns the new snapshot's id.
    pub fn backup(&self, vm: &SourceVm) -> String {
        let a = Self::backup_args(vm);
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "backup of {} failed:\n{}",
            vm.name,
            both(&out)
        );
        backup_id(&String::from_utf8_lossy(&out.stdout))
    }

    /// Ids of all snapshots.
    pub fn snapshot_ids(&self) -> Vec<String> {
        let v = self.json(&["snapshots"]);
        let arr = v
            .as_array()
            .unwrap_or_else(|| panic!("snapshots --json is not an array: {v}"));
        arr.iter()
            .map(|s| {
                s["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("snapshot without id: {s}"))
                    .to_string()
            })
            .collect()
    }

    /// Restore `id` into a fresh directory; Ok(hashes) or Err(output) when the restore failed.
    pub fn try_restore(&self, id: &str, to: Option<&str>) -> (PathBuf, Result<Expected, Output>) {
        let target = self
            .tmp
            .path()
            .join(format!("restore-{}", &id[..id.len().min(16)]));
        let _ = std::fs::remove_dir_all(&target);
        let mut a = vec!["restore", id, "--target", s(&target)];
        if let Some(f) = to {
            a.extend(["--to", f]);
        }
        let out = self.run(&a);
        if !out.status.success() {
            return (target, Err(out));
        }
        let got = restored(&target);
        (target, Ok(got))
    }

    /// Restore `id` and assert it equals `want`; removes the output afterwards.
    pub fn assert_restores(&self, id: &str, want: &Expected, to: Option<&str>) {
        let (target, got) = self.try_restore(id, to);
        match got {
            Ok(got) => assert_eq!(
                &got, want,
                "snapshot {id} restored different content (--to {to:?})"
            ),
            Err(out) => panic!("restore of snapshot {id} failed:\n{}", both(&out)),
        }
        let _ = std::fs::remove_dir_all(&target);
    }

    /// `check ARGS`; asserts exit 0 and returns the output.
    pub fn check_clean(&self, args: &[&str]) -> Output {
        let mut a = vec!["check"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        assert_eq!(
            out.status.code(),
            Some(0),
            "check {args:?} is not clean:\n{}",
            both(&out)
        );
        out
    }
}

/// The snapshot id from `backup --json` output (field `id`, `snapshot_id` or `snapshot`).
pub fn backup_id(stdout: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("backup --json printed no JSON ({e}):\n{stdout}"));
    for k in ["id", "snapshot_id", "snapshot"] {
        match &v[k] {
            serde_json::Value::String(s) => return s.clone(),
            serde_json::Value::Object(o) => {
                if let Some(serde_json::Value::String(s)) = o.get("id") {
                    return s.clone();
                }
            }
            _ => {}
        }
    }
    panic!("backup --json printed no snapshot id:\n{stdout}")
}

/// Run a command to completion, killing it with SIGKILL after `after`. Returns
/// (output, true if it was killed while still running).
pub fn run_and_kill(mut child: Child, after: Duration) -> (Output, bool) {
    let start = Instant::now();
    let mut killed = false;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() >= after {
            // Child::kill sends SIGKILL on Unix: no cleanup code of ours runs.
            child.kill().unwrap();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2).min(after.saturating_sub(start.elapsed())));
    }
    let out = child.wait_with_output().unwrap();
    // A child that exited on its own between try_wait and kill was not killed.
    let killed = killed && out.status.code().is_none();
    (out, killed)
}

/// Wall time of a closure.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}
