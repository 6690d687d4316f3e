//! Printing results: aligned text for people, JSON (`--json`) for programs.

use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;
use serde_json::json;
use vdisk::{CheckReport, ConvertReport, DiskFormat, DiskInfo, MergeReport};

use crate::size::{human, human_exact};

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn path_of(i: &DiskInfo) -> String {
    i.path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(in memory)".into())
}

/// Rows of "label: value" with the values aligned.
struct Table(Vec<(String, String)>);

impl Table {
    fn row(&mut self, k: impl Into<String>, v: impl Into<String>) {
        self.0.push((k.into(), v.into()));
    }
    fn render(&self) -> String {
        let w = self.0.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        let mut s = String::new();
        for (k, v) in &self.0 {
            let _ = writeln!(s, "{:<w$} {v}", format!("{k}:"));
        }
        s
    }
}

pub fn disk_info(info: &DiskInfo, json: bool) -> Result<()> {
    if json {
        return print_json(info);
    }
    let mut t = Table(Vec::new());
    t.row("file", path_of(info));
    t.row("format", format!("{} ({})", info.format, info.subformat));
    t.row("virtual size", human_exact(info.virtual_size));
    if let Some(b) = info.block_size {
        t.row("block size", human_exact(u64::from(b)));
    }
    t.row(
        "sector size",
        format!(
            "{} logical, {} physical",
            info.logical_sector_size, info.physical_sector_size
        ),
    );
    t.row("allocated", human_exact(info.allocated_bytes));
    t.row("file size", human_exact(info.file_size));
    if let Some(id) = &info.identifier {
        t.row("identifier", id.clone());
    }
    for (k, v) in &info.details {
        t.row(k.clone(), v.clone());
    }
    if info.parent.is_some() {
        let mut chain = Vec::new();
        let mut p = info.parent.as_deref();
        while let Some(layer) = p {
            chain.push(format!(
                "{} ({} {}, {} allocated{})",
                path_of(layer),
                layer.format,
                layer.subformat,
                human(layer.allocated_bytes),
                layer
                    .identifier
                    .as_ref()
                    .map(|i| format!(", id {i}"))
                    .unwrap_or_default()
            ));
            p = layer.parent.as_deref();
        }
        for (n, c) in chain.iter().enumerate() {
            t.row(
                if n == 0 { "parent chain" } else { "" },
                format!("{}. {c}", n + 1),
            );
        }
    }
    print!("{}", t.render());
    Ok(())
}

pub fn convert_report(
    src: &DiskInfo,
    format: DiskFormat,
    fixed: bool,
    r: &ConvertReport,
    seconds: f64,
    json: bool,
) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(r)?;
        v["format"] = json!(format);
        v["fixed"] = json!(fixed);
        v["seconds"] = json!(seconds);
        return print_json(&v);
    }
    let rate = if seconds > 0.0 {
        format!(", {}/s", human((r.bytes_read as f64 / seconds) as u64))
    } else {
        String::new()
    };
    println!(
        "converted {} ({} {}, {}) to {} ({}{}): read {}, wrote {} in {:.2} s{}",
        path_of(src),
        src.format,
        src.subformat,
        human(src.virtual_size),
        r.output.display(),
        format,
        if format == DiskFormat::Raw {
            ""
        } else if fixed {
            " fixed"
        } else {
            " dynamic"
        },
        human(r.bytes_read),
        human(r.bytes_written),
        seconds,
        rate
    );
    Ok(())
}

pub fn check_report(r: &CheckReport, json: bool) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(r)?;
        v["clean"] = json!(r.problems.is_empty());
        return print_json(&v);
    }
    if r.problems.is_empty() {
        println!("{}: clean ({})", r.path.display(), r.format);
    } else {
        println!(
            "{}: {} problem{} found ({})",
            r.path.display(),
            r.problems.len(),
            if r.problems.len() == 1 { "" } else { "s" },
            r.format
        );
        for p in &r.problems {
            println!("  - {p}");
        }
    }
    for w in &r.warnings {
        println!("  {w}");
    }
    Ok(())
}

pub fn created(what: &str, info: &DiskInfo, json: bool) -> Result<()> {
    if json {
        return print_json(info);
    }
    let parent = info
        .parent
        .as_ref()
        .map(|p| format!(", parent {}", path_of(p)))
        .unwrap_or_default();
    println!(
        "{what} {} ({} {}, {}{parent})",
        path_of(info),
        info.format,
        info.subformat,
        human_exact(info.virtual_size)
    );
    Ok(())
}

pub fn merge_report(r: &MergeReport, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    println!(
        "merged {} into {} ({} of changes); {} was deleted",
        r.child.display(),
        r.parent.display(),
        human(r.bytes_merged),
        r.child.display()
    );
    Ok(())
}

/// The exit code an error maps to (the contract's table): a missing repository 10, a locked
/// one 11, a wrong password 12, anything else 2.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(r) = cause.downcast_ref::<repo::Error>() {
            return match r {
                repo::Error::NoRepository(_) => crate::EXIT_NO_REPOSITORY,
                repo::Error::Locked(_) => crate::EXIT_LOCKED,
                repo::Error::WrongPassword => crate::EXIT_WRONG_PASSWORD,
                _ => crate::EXIT_ERROR,
            };
        }
    }
    crate::EXIT_ERROR
}

/// An error's one-line message (the cause chain joined) and its hint, if any.
pub fn describe_error(e: &anyhow::Error) -> (String, Option<String>) {
    // vdisk's I/O errors print their cause themselves; don't repeat it.
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.last().is_some_and(|l| l.ends_with(&s)) {
            parts.push(s);
        }
    }
    let msg = parts.join(": ");
    let (msg, mut hint) = match msg.split_once("\nhint: ") {
        Some((m, h)) => (m.to_string(), Some(h.to_string())),
        None => (msg, None),
    };
    if hint.is_none() {
        hint = e.chain().find_map(|c| {
            if let Some(r) = c.downcast_ref::<repo::Error>() {
                return repo_hint(r);
            }
            match c.downcast_ref::<vdisk::Error>()? {
                vdisk::Error::Parent(m) if !m.contains("--parent") => Some(
                    "if the parent was moved, name it with --parent P (its linkage is still checked)"
                        .to_string(),
                ),
                vdisk::Error::Corrupt { .. } => {
                    Some("run `hyperkeep disk check FILE` to list the damage".to_string())
                }
                _ => None,
            }
        });
    }
    (msg.replace('\n', " "), hint)
}

fn repo_hint(e: &repo::Error) -> Option<String> {
    match e {
        repo::Error::NoRepository(_) => Some(
            "check --repo / HYPERKEEP_REPOSITORY, or create a repository there with `hyperkeep init`"
                .into(),
        ),
        repo::Error::WrongPassword => Some(
            "the password is taken from --password-file, else HYPERKEEP_PASSWORD_FILE, else HYPERKEEP_PASSWORD, else a prompt: check the first of them that is set"
                .into(),
        ),
        repo::Error::Locked(m) if !m.contains("unlock") => Some(
            "wait for the other hyperkeep to finish; if it crashed, `hyperkeep unlock` removes stale locks"
                .into(),
        ),
        repo::Error::Corrupt { .. } | repo::Error::Missing(_) => Some(
            "run `hyperkeep check --read-data` to list every damaged object and the snapshots it affects"
                .into(),
        ),
        _ => None,
    }
}

/// `error: ...` on one line on stderr, then a hint where one helps; with `--json` the same as
/// `{"error", "hint", "exit_code"}` on stdout too, so a program reading stdout learns why.
pub fn print_error(e: &anyhow::Error, code: u8, json: bool) {
    let (msg, hint) = describe_error(e);
    eprintln!("error: {msg}");
    if let Some(h) = &hint {
        eprintln!("hint: {h}");
    }
    if json {
        let v = json!({ "error": msg, "hint": hint, "exit_code": code });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
}
