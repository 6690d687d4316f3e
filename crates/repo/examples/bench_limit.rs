//! This machine's limit for a backup of one disk (used by `bench/backup.sh`): read every
//! allocated 1 MiB chunk of the disk, BLAKE3-hash it and compress it with zstd level 1, on all
//! cores, and nothing else (no encryption, no packing, no writing). A backup tool cannot be faster
//! than this on the same hardware; the benchmark reports hyperkeep's time against it.
//!
//! Usage: cargo run --release -p repo --example bench_limit -- DISK [THREADS]
//! Prints one line: `seconds bytes_read bytes_compressed`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use vdisk::{MapScope, OpenOptions};

const CHUNK: u64 = 1 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: bench_limit DISK [THREADS]");
        std::process::exit(2);
    };
    let threads = args
        .get(2)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let start = Instant::now();
    let disk = vdisk::open(path.as_ref(), &OpenOptions::default()).unwrap_or_else(|e| {
        eprintln!("bench_limit: {path}: {e}");
        std::process::exit(2);
    });
    let size = disk.geometry().virtual_size;
    // Chunks holding any data, from the disk's own allocation map (as a backup plans its work).
    let mut chunks = Vec::new();
    let window = 4u64 << 30;
    let mut off = 0;
    while off < size {
        let len = window.min(size - off);
        for e in disk.map(off, len, MapScope::View).expect("map") {
            if e.state.has_data() {
                let first = e.offset / CHUNK;
                let last = (e.end() - 1) / CHUNK;
                for c in first..=last {
                    if chunks.last() != Some(&c) {
                        chunks.push(c);
                    }
                }
            }
        }
        off += len;
    }
    let next = AtomicUsize::new(0);
    let read = AtomicU64::new(0);
    let compressed = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; CHUNK as usize];
                let mut comp = zstd::bulk::Compressor::new(1).unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&c) = chunks.get(i) else { break };
                    let off = c * CHUNK;
                    let n = CHUNK.min(size - off) as usize;
                    disk.read_at(&mut buf[..n], off).expect("read");
                    std::hint::black_box(blake3::hash(&buf[..n]));
                    let z = comp.compress(&buf[..n]).unwrap();
                    read.fetch_add(n as u64, Ordering::Relaxed);
                    compressed.fetch_add(z.len().min(n) as u64, Ordering::Relaxed);
                }
            });
        }
    });
    println!(
        "{:.2} {} {}",
        start.elapsed().as_secs_f64(),
        read.load(Ordering::Relaxed),
        compressed.load(Ordering::Relaxed)
    );
}
