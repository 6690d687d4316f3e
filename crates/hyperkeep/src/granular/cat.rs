//! `hyperkeep cat SNAPSHOT|DISKFILE PATH`: a guest file's bytes on stdout.

use std::io::Write;

use anyhow::{bail, Result};
use guestfs::fs::FileType;

use crate::cli::{CatArgs, Cli};
use crate::EXIT_OK;

/// Pieces read and written at once: large enough that a snapshot read touches each chunk once.
const PIECE: usize = 1 << 20;

pub fn run(cli: &Cli, args: &CatArgs) -> Result<u8> {
    let src = super::open_source(cli, &args.source, args.vm.as_deref())?;
    let picked = super::select_one(&src, args.disk, args.partition)?;
    let fs = picked.fs.as_ref();
    let node = fs.lookup(&args.path)?;
    let md = fs.metadata(node)?;
    let size = match &args.stream {
        None => {
            if md.file_type != FileType::File {
                bail!(
                    "{} is a {:?}, not a file\nhint: `hyperkeep ls` lists directories",
                    args.path,
                    md.file_type
                );
            }
            md.size
        }
        Some(s) => match md.streams.iter().find(|st| &st.name == s) {
            Some(st) => st.size,
            None => bail!(
                "{} has no stream {s:?}; its streams: {}",
                args.path,
                if md.streams.is_empty() {
                    "none".to_string()
                } else {
                    md.streams
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        },
    };
    let mut buf = vec![0u8; PIECE];
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut pos = 0u64;
    while pos < size {
        let want = (size - pos).min(PIECE as u64) as usize;
        let n = fs.read_at(node, args.stream.as_deref(), &mut buf[..want], pos)?;
        if n == 0 {
            bail!(
                "{} ends at {pos} bytes although its size is {size}: the filesystem is damaged",
                args.path
            );
        }
        out.write_all(&buf[..n])?;
        pos += n as u64;
    }
    out.flush()?;
    Ok(EXIT_OK)
}
