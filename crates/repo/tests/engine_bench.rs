//! Throughput of the backup pipeline against this machine's limit (not a timed test; run with
//! `cargo test --release -p repo --test engine_bench -- --ignored --nocapture`).
//!
//! The limit is what any backup of the same disk must at least do: read the allocated chunks,
//! BLAKE3 them and compress them with zstd level 1, on all cores. The pipeline also encrypts,
//! packs and writes; the goal is to stay within 1.25x of the limit.

mod engine_util;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use engine_util::*;
use repo::backup::{backup, BackupOptions, NoProgress};
use vdisk::{CreateOptions, DiskFormat, MapScope, OpenOptions, VirtualDisk};

/// A chunk that looks like a file system's content: some text-like (compressible), some
/// random (already compressed media), some half-empty.
fn fill_chunk(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match seed % 4 {
        0 | 1 => {
            const WORDS: [&[u8]; 8] = [
                b"the ",
                b"virtual ",
                b"machine ",
                b"backup ",
                b"config ",
                b"data ",
                b"log ",
                b"2026-11-25 ",
            ];
            let mut i = 0;
            while i < buf.len() {
                let r = next();
                let w = WORDS[(r % 8) as usize];
                let n = w.len().min(buf.len() - i);
                buf[i..i + n].copy_from_slice(&w[..n]);
                i += n;
                if r % 13 == 0 && i + 8 <= buf.len() {
                    buf[i..i + 8].copy_from_slice(&r.to_le_bytes());
                    i += 8;
                }
            }
        }
        2 => {
            for c in buf.chunks_mut(8) {
                let r = next().to_le_bytes();
                c.copy_from_slice(&r[..c.len()]);
            }
        }
        _ => {
            let half = buf.len() / 2;
            buf[half..].fill(0);
            for c in buf[..half].chunks_mut(8) {
                let r = next().to_le_bytes();
                c.copy_from_slice(&r[..c.len()]);
            }
        }
    }
}

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn backup_throughput_against_machine_limit() {
    let size_gib: u64 = std::env::var("ENGINE_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let tmp =
        tempfile::tempdir_in(std::env::var("ENGINE_BENCH_DIR").unwrap_or("/tmp".into())).unwrap();
    // ENGINE_BENCH_DISK=PATH keeps the generated disk for later runs (profiling).
    let keep = std::env::var_os("ENGINE_BENCH_DISK").map(std::path::PathBuf::from);
    let disk = keep
        .clone()
        .unwrap_or_else(|| tmp.path().join("bench.vhdx"));
    let size = size_gib << 30;
    if !disk.exists() {
        let mut d = vdisk::create(&disk, &CreateOptions::new(DiskFormat::Vhdx, size)).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        // 70% of the chunks hold data; the rest stay unallocated.
        for c in 0..size / MIB {
            if c % 10 >= 7 && (c / 32) % 3 == 0 {
                continue;
            }
            if (c / 32) % 3 == 1 && c % 32 >= 8 {
                continue;
            }
            fill_chunk(c, &mut buf);
            d.write_at(&buf, c * MIB).unwrap();
        }
        d.flush().unwrap();
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    // The limit: read + BLAKE3 + zstd-1 of every allocated chunk, all cores.
    let d = vdisk::open(&disk, &OpenOptions::default()).unwrap();
    let mut chunks = Vec::new();
    for e in d.map(0, size, MapScope::View).unwrap() {
        if e.state.has_data() {
            for c in e.offset / MIB..e.end().div_ceil(MIB) {
                if chunks.last() != Some(&c) {
                    chunks.push(c);
                }
            }
        }
    }
    let bytes = chunks.len() as u64 * MIB;
    let mut best_limit = f64::MAX;
    let mut limit_cpu = f64::MAX;
    let limit_runs = if std::env::var_os("ENGINE_BENCH_NO_LIMIT").is_some() {
        0
    } else {
        2
    };
    for _ in 0..limit_runs {
        let cpu0 = cpu_seconds();
        let next = AtomicUsize::new(0);
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let mut buf = vec![0u8; MIB as usize];
                    let mut z = zstd::bulk::Compressor::new(1).unwrap();
                    while let Some(&c) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                        d.read_at(&mut buf, c * MIB).unwrap();
                        std::hint::black_box(blake3::hash(&buf));
                        std::hint::black_box(z.compress(&buf).unwrap());
                    }
                });
            }
        });
        best_limit = best_limit.min(t.elapsed().as_secs_f64());
        limit_cpu = limit_cpu.min(cpu_seconds() - cpu0);
    }

    let mut best_backup = f64::MAX;
    let mut backup_cpu = f64::MAX;
    for i in 0..2 {
        let repo_dir = tmp.path().join(format!("r{i}"));
        std::fs::create_dir(&repo_dir).unwrap();
        let repo = new_repo_with_pack(&repo_dir, 32 << 20);
        let t = Instant::now();
        let cpu0 = cpu_seconds();
        let (_, snap) = backup(
            &repo,
            &BackupOptions {
                vm: "bench".into(),
                paths: vec![disk.clone()],
                ..Default::default()
            },
            &NoProgress,
        )
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        backup_cpu = backup_cpu.min(cpu);
        assert_eq!(snap.summary.bytes_read, bytes);
        best_backup = best_backup.min(secs);
        eprintln!(
            "backup {i}: {:.2}s ({cpu:.2}s CPU), stored {} MiB of {} MiB",
            secs,
            snap.summary.bytes_stored >> 20,
            bytes >> 20
        );
    }
    let mbs = |s: f64| bytes as f64 / s / 1e6;
    eprintln!(
        "{threads} threads, {} MiB allocated: limit {:.2}s ({:.0} MB/s), backup {:.2}s ({:.0} MB/s), ratio {:.2}",
        bytes >> 20,
        best_limit,
        mbs(best_limit),
        best_backup,
        mbs(best_backup),
        best_backup / best_limit
    );
    eprintln!("peak RSS of the whole test: {} MiB", peak_rss_kib() / 1024);
    eprintln!(
        "CPU time: limit {limit_cpu:.2}s, backup {backup_cpu:.2}s, ratio {:.2} (wall-clock \
         ratios mean little on a loaded machine)",
        backup_cpu / limit_cpu
    );
}

/// User + system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Peak resident memory of this process, KiB.
fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss
}
