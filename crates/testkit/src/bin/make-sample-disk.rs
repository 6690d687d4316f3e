//! `make-sample-disk OUT --size SIZE`: write a sample VM disk (GPT + FAT32 with files) as a
//! sparse raw image.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str =
    "usage: make-sample-disk OUT [--size SIZE]   (SIZE in MiB with M, or G; default 64M)";

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut out: Option<PathBuf> = None;
    let mut size = 64u64 << 20;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => match args.next().as_deref().and_then(parse_size) {
                Some(s) => size = s,
                None => {
                    eprintln!("error: --size needs a size such as 64M or 1G\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ if out.is_none() && !a.starts_with('-') => out = Some(PathBuf::from(a)),
            _ => {
                eprintln!("error: unexpected argument {a:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(out) = out else {
        eprintln!("error: no output file given\n{USAGE}");
        return ExitCode::from(2);
    };
    match testkit::write_sample_disk(&out, size) {
        Ok(m) => {
            println!(
                "wrote {} ({} MiB): GPT, FAT32 partition at {} MiB, label {}",
                out.display(),
                m.disk_size >> 20,
                m.partition_offset >> 20,
                m.volume_label
            );
            for f in &m.files {
                println!("  {:<18} {:>9} bytes  sha256 {}", f.path, f.size, f.sha256);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
