//! Read a whole VHDX (flattened chain) and report the throughput: a quick check that the
//! reader runs at disk speed. `cargo run --release -p vdisk-vhdx --example vhdx_read_speed FILE`
use std::time::Instant;

use vdisk_core::{ExtentState, MapScope, OpenOptions, VirtualDisk};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: vhdx_read_speed FILE")?;
    let disk = vdisk_vhdx::Vhdx::open(path.as_ref(), &OpenOptions::default())?;
    let vs = disk.geometry().virtual_size;
    let mut buf = vec![0u8; 8 << 20];
    let t = Instant::now();
    let (mut read, mut sum) = (0u64, 0u64);
    for e in disk.map(0, vs, MapScope::View)? {
        if e.state != ExtentState::Data {
            continue;
        }
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (buf.len() as u64).min(e.end() - pos) as usize;
            disk.read_at(&mut buf[..n], pos)?;
            sum = sum.wrapping_add(buf[n - 1] as u64);
            read += n as u64;
            pos += n as u64;
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "read {} MiB of {} MiB in {s:.2} s: {:.0} MiB/s (checksum {sum})",
        read >> 20,
        vs >> 20,
        (read >> 20) as f64 / s
    );
    Ok(())
}
