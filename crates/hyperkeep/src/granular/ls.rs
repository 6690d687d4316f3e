//! `hyperkeep ls SNAPSHOT|DISKFILE [PATH]`: a directory (or one file) inside a disk; the
//! partitions when the user must choose one.

use anyhow::Result;
use guestfs::fs::{walk, FileType, GuestFs, Metadata, NodeId};
use serde::Serialize;

use super::{local, rfc3339, select, Selection};
use crate::cli::{Cli, LsArgs};
use crate::size::human;
use crate::EXIT_OK;

/// Most entries a recursive listing prints; a bigger tree asks for a narrower PATH.
const MAX_ENTRIES: usize = 1_000_000;

#[derive(Serialize)]
pub struct Entry {
    pub path: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub size: u64,
    pub mtime: Option<String>,
    pub mode: Option<u32>,
    pub attributes: Option<u32>,
    pub link_target: Option<String>,
    pub streams: Vec<guestfs::fs::StreamInfo>,
    #[serde(skip)]
    mtime_ns: Option<i128>,
}

pub fn entry(fs: &dyn GuestFs, path: String, node: NodeId, md: Metadata) -> Entry {
    let link_target = matches!(md.file_type, FileType::Symlink | FileType::Junction)
        .then(|| fs.read_link(node).map(|l| l.target).ok())
        .flatten();
    Entry {
        path,
        file_type: md.file_type,
        size: md.size,
        mtime: rfc3339(md.mtime),
        mode: md.mode,
        attributes: md.windows_attributes,
        link_target,
        streams: md.streams,
        mtime_ns: md.mtime,
    }
}

fn type_char(t: FileType) -> char {
    match t {
        FileType::File => '-',
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::Junction => 'j',
        FileType::Other => '?',
    }
}

/// `rwxr-xr-x` from Unix mode bits, or Windows attributes as letters (R H S A ...).
fn perms(e: &Entry) -> String {
    if let Some(m) = e.mode {
        let mut s = String::new();
        for shift in [6, 3, 0] {
            let b = (m >> shift) & 7;
            s.push(if b & 4 != 0 { 'r' } else { '-' });
            s.push(if b & 2 != 0 { 'w' } else { '-' });
            s.push(if b & 1 != 0 { 'x' } else { '-' });
        }
        return s;
    }
    if let Some(a) = e.attributes {
        let flags = [
            (0x1, 'R'),
            (0x2, 'H'),
            (0x4, 'S'),
            (0x20, 'A'),
            (0x200, 'P'),
            (0x400, 'L'),
            (0x800, 'C'),
        ];
        return flags
            .iter()
            .map(|(bit, c)| if a & bit != 0 { *c } else { '-' })
            .collect();
    }
    "-".into()
}

pub fn run(cli: &Cli, args: &LsArgs) -> Result<u8> {
    let src = super::open_source(cli, &args.source, args.vm.as_deref())?;
    let picked = match select(&src, args.disk, args.partition)? {
        Selection::One(p) => p,
        Selection::Choose(layout) => {
            if cli.json {
                super::super::repo_cmd::print_json(&layout)?;
            } else {
                print!("{}", layout.render());
                println!("pick a filesystem with --disk N and --partition N");
            }
            return Ok(EXIT_OK);
        }
    };
    let fs = picked.fs.as_ref();
    let path = args.path.as_deref().unwrap_or("/");
    let node = fs.lookup(path)?;
    let md = fs.metadata(node)?;
    let mut entries = Vec::new();
    if md.file_type != FileType::Directory {
        entries.push(entry(fs, path.to_string(), node, md));
    } else if args.recursive {
        let mut loops = Vec::new();
        walk(fs, node, &mut |w| {
            if entries.len() >= MAX_ENTRIES {
                return Err(guestfs::Error::InvalidArgument(format!(
                    "more than {MAX_ENTRIES} entries below {path}; list a smaller directory"
                )));
            }
            if w.is_loop {
                loops.push(w.path.clone());
                return Ok(false);
            }
            let md = fs.metadata(w.entry.node)?;
            entries.push(entry(fs, w.path.clone(), w.entry.node, md));
            Ok(true)
        })?;
        for l in loops {
            eprintln!("warning: {l} is a directory loop (not entered)");
        }
    } else {
        for e in fs.read_dir(node)? {
            let md = fs.metadata(e.node)?;
            entries.push(entry(fs, e.name, e.node, md));
        }
    }
    if cli.json {
        #[derive(Serialize)]
        struct Out<'a> {
            source: &'a str,
            disk: usize,
            partition: u32,
            filesystem: guestfs::fs::FsKind,
            path: &'a str,
            entries: &'a [Entry],
        }
        super::super::repo_cmd::print_json(&Out {
            source: &src.describe,
            disk: picked.disk,
            partition: picked.partition,
            filesystem: fs.kind(),
            path,
            entries: &entries,
        })?;
        return Ok(EXIT_OK);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    use std::io::Write;
    for e in &entries {
        let name = if e.file_type == FileType::Directory {
            format!("{}/", e.path)
        } else {
            e.path.clone()
        };
        if args.long {
            let link = e
                .link_target
                .as_ref()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default();
            let streams: String = e
                .streams
                .iter()
                .map(|s| format!(" [:{} {}]", s.name, s.size))
                .collect();
            writeln!(
                out,
                "{}{:<10} {:>10}  {}  {name}{link}{streams}",
                type_char(e.file_type),
                perms(e),
                human(e.size),
                local(e.mtime_ns),
            )?;
        } else {
            writeln!(out, "{name}")?;
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}
