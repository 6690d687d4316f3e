//! Writes the difference between two raw images into a differencing disk (used by
//! `bench/backup.sh` to make the change list of a "VM with 2% of its data changed": qemu cannot
//! write differencing VHDX files, so we do it through vdisk).
//!
//! Usage: cargo run --release -p repo --example bench_write_changes -- BASE.raw CHANGED.raw CHILD
//! CHILD must be a new differencing child of the disk holding BASE.raw's content (made with
//! `hyperkeep disk create-child`). Every 4 KiB block that differs is written into the child, so
//! the child's own layer is exactly the change list and its view equals CHANGED.raw.
//! Prints the number of bytes written.

use std::fs::File;
use std::io::Read;

use vdisk::OpenOptions;

const BLOCK: usize = 4096;
const BUF: usize = 4 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: bench_write_changes BASE.raw CHANGED.raw CHILD");
        std::process::exit(2);
    }
    let mut base = File::open(&args[1]).expect("open base");
    let mut changed = File::open(&args[2]).expect("open changed");
    assert_eq!(
        base.metadata().unwrap().len(),
        changed.metadata().unwrap().len(),
        "the two images differ in size"
    );
    let mut child = vdisk::open_mut(args[3].as_ref(), &OpenOptions::default()).expect("open child");
    let (mut a, mut b) = (vec![0u8; BUF], vec![0u8; BUF]);
    let mut off = 0u64;
    let mut written = 0u64;
    loop {
        let n = read_full(&mut base, &mut a);
        let m = read_full(&mut changed, &mut b);
        assert_eq!(n, m);
        if n == 0 {
            break;
        }
        // Coalesce runs of differing blocks into one write each.
        let mut i = 0;
        while i < n {
            let end = (i + BLOCK).min(n);
            if a[i..end] != b[i..end] {
                let mut j = end;
                while j < n && a[j..(j + BLOCK).min(n)] != b[j..(j + BLOCK).min(n)] {
                    j = (j + BLOCK).min(n);
                }
                child
                    .write_at(&b[i..j], off + i as u64)
                    .expect("write child");
                written += (j - i) as u64;
                i = j;
            } else {
                i = end;
            }
        }
        off += n as u64;
    }
    child.flush().expect("flush child");
    println!("{written}");
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    n
}
