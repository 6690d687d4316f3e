//! Turn disk images into fuzz inputs and back.
//!
//! ```text
//! encode_corpus encode IMAGE OUT   # a real image (<= 64 MiB) -> compact fuzz input
//! encode_corpus decode INPUT OUT   # a fuzz input (e.g. a crash artifact) -> the file it describes
//! encode_corpus own CORPUS_DIR     # write seeds made by hyperkeep's own writer (differencing
//!                                  # layers with partly present blocks, 4 KiB sectors)
//! ```
//!
//! `decode` is how a crash is inspected with other tools (`qemu-img info`, a hex dump).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let [_, m, dir] = args.as_slice() {
        if m == "own" {
            return match own_seeds(std::path::Path::new(dir)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("encode_corpus own: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    let (mode, src, dst) = match args.as_slice() {
        [_, m, s, d] if m == "encode" || m == "decode" => (m.as_str(), s, d),
        _ => {
            eprintln!("usage: encode_corpus encode IMAGE OUT | encode_corpus decode INPUT OUT");
            return ExitCode::from(2);
        }
    };
    let bytes = match std::fs::read(src) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot read {src}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = if mode == "encode" {
        match hyperkeep_fuzz::encode(&bytes) {
            Some(v) => v,
            None => {
                eprintln!(
                    "{src} is {} bytes; fuzz inputs describe files of at most {} bytes: make a smaller image",
                    bytes.len(),
                    hyperkeep_fuzz::MAX_FILE_SIZE
                );
                return ExitCode::FAILURE;
            }
        }
    } else {
        hyperkeep_fuzz::SparseFile::decode(&bytes).to_vec()
    };
    if let Err(e) = std::fs::write(dst, &out) {
        eprintln!("cannot write {dst}: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "{src} ({} bytes) -> {dst} ({} bytes)",
        bytes.len(),
        out.len()
    );
    ExitCode::SUCCESS
}

/// Seeds qemu cannot make: differencing layers (opened standalone by `open_backing`, so their
/// bitmaps and parent locators are parsed), with single sectors written into blocks so the
/// sector bitmaps are partly set, and a VHDX with 4 KiB logical sectors.
fn own_seeds(corpus: &std::path::Path) -> Result<(), String> {
    use vdisk::{CreateOptions, DiskFormat, VirtualDiskMut};

    let work = std::env::temp_dir().join(format!("hk-own-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let size: u64 = 8 << 20;
    let scribble = |d: &mut dyn VirtualDiskMut, sector: u64, salt: u8| -> Result<(), String> {
        for (i, &(s, n)) in [
            (1u64, 1u64),
            (9, 3),
            (2047, 2),
            (4096, 1),
            (size / sector - 1, 1),
        ]
        .iter()
        .enumerate()
        {
            let off = s * sector;
            if off >= size {
                continue;
            }
            let buf = vec![salt.wrapping_add(i as u8) | 1; (n * sector).min(size - off) as usize];
            d.write_at(&buf, off).map_err(|e| e.to_string())?;
        }
        d.flush().map_err(|e| e.to_string())
    };
    let encode_to = |file: &std::path::Path, target: &str, name: &str| -> Result<(), String> {
        let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
        let enc = hyperkeep_fuzz::encode(&bytes).ok_or("image too big")?;
        let out = corpus.join(target).join(name);
        std::fs::write(&out, &enc).map_err(|e| e.to_string())?;
        eprintln!("  {target:12} {name:34} {:6} bytes", enc.len());
        Ok(())
    };

    let mut failures = Vec::new();
    for (format, ext, target, sector, block) in [
        (DiskFormat::Vhdx, "vhdx", "vhdx_open", 512u32, 1u32 << 20),
        (DiskFormat::Vhdx, "vhdx", "vhdx_open", 4096, 1 << 20),
        (DiskFormat::Vhd, "vhd", "vhd_open", 512, 1 << 20),
    ] {
        let result = (|| -> Result<(), String> {
            let base = work.join(format!("base-{sector}.{ext}"));
            let child = work.join(format!("child-{sector}.{ext}"));
            let mut opts = CreateOptions::new(format, size);
            opts.block_size = Some(block);
            opts.logical_sector_size = sector;
            {
                let mut d =
                    vdisk::create(&base, &opts).map_err(|e| format!("create {ext}: {e}"))?;
                scribble(&mut *d, u64::from(sector), 0x10)?;
            }
            {
                let mut d = vdisk::create_child(&base, &child)
                    .map_err(|e| format!("create_child {ext}: {e}"))?;
                scribble(&mut *d, u64::from(sector), 0x80)?;
                // Zeroes over the parent's data: recorded in the child, hiding the parent.
                d.write_zeroes(u64::from(sector) * 9, u64::from(sector))
                    .map_err(|e| e.to_string())?;
                // And a whole block of zeroes (a ZERO block entry in the child).
                d.write_zeroes(2 << 20, u64::from(block))
                    .map_err(|e| e.to_string())?;
                d.flush().map_err(|e| e.to_string())?;
            }
            encode_to(
                &base,
                target,
                &format!("hyperkeep-dynamic-{sector}-written"),
            )?;
            encode_to(&child, target, &format!("hyperkeep-child-{sector}-partial"))
        })();
        if let Err(e) = result {
            failures.push(format!("{ext} ({sector}-byte sectors): {e}"));
        }
    }
    // A VHDX whose writer "crashed" between writing the log and applying it: the reader must
    // replay the log (in memory) before anything else, so the log parser gets seeds too.
    if let Err(e) = pending_log_seed(&work, &encode_to) {
        failures.push(format!("vhdx with a pending log: {e}"));
    }
    let _ = std::fs::remove_dir_all(&work);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

fn pending_log_seed(
    work: &std::path::Path,
    encode_to: &dyn Fn(&std::path::Path, &str, &str) -> Result<(), String>,
) -> Result<(), String> {
    use vdisk::VirtualDiskMut;
    use vdisk_vhdx::{CreateOptions, Vhdx};

    let e = |e: vdisk::Error| e.to_string();
    let base = work.join("log-base.vhdx");
    let child = work.join("log-child.avhdx");
    let opts = CreateOptions {
        virtual_size: 8 << 20,
        block_size: 1 << 20,
        ..CreateOptions::default()
    };
    let mut d = Vhdx::create(&base, &opts).map_err(e)?;
    d.write_at(&[0x11; 4096], 4096).map_err(e)?;
    d.flush().map_err(e)?;
    d.set_crash_after_log_write(true).map_err(e)?;
    // New blocks: BAT pages change and go through the log.
    d.write_at(&[0x22; 1536], (3 << 20) + 512).map_err(e)?;
    d.write_at(&[0x33; 512], (6 << 20) + 4096).map_err(e)?;
    if d.flush().is_ok() {
        return Err("the crash hook did not stop the log apply".into());
    }
    drop(d);
    encode_to(&base, "vhdx_open", "hyperkeep-pending-log")?;

    // The same for a differencing layer: bitmap pages that exist only in the log.
    let base2 = work.join("log-base2.vhdx");
    let mut b = Vhdx::create(&base2, &opts).map_err(e)?;
    b.write_at(&[0x44; 8192], 0).map_err(e)?;
    b.flush().map_err(e)?;
    drop(b);
    let mut c = Vhdx::create_child(&base2, &child).map_err(e)?;
    c.write_at(&[0x55; 512], 1536).map_err(e)?;
    c.flush().map_err(e)?;
    c.set_crash_after_log_write(true).map_err(e)?;
    for i in 0..6u64 {
        c.write_at(&[0x60 + i as u8; 512], (i * 1_300_000) / 512 * 512)
            .map_err(e)?;
    }
    if c.flush().is_ok() {
        return Err("the crash hook did not stop the log apply (child)".into());
    }
    drop(c);
    encode_to(&child, "vhdx_open", "hyperkeep-child-pending-log")?;
    Ok(())
}
