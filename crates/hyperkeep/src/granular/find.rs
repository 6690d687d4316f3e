//! `hyperkeep find PATTERN`: which snapshots hold a file whose name matches a glob, newest
//! snapshot first, every disk and partition with a filesystem we read.

use anyhow::Result;
use guestfs::fs::{walk, FileType, FsKind};
use repo::snapshot::{list_snapshots, short_id};
use serde::Serialize;

use super::{local, rfc3339, OpenRepo};
use crate::cli::{Cli, FindArgs};
use crate::size::human;
use crate::{EXIT_OK, EXIT_PROBLEMS};

/// `*` any run of characters, `?` one character; everything else literal.
pub fn glob_match(pattern: &str, name: &str, ignore_case: bool) -> bool {
    let fold = |s: &str| -> Vec<char> {
        if ignore_case {
            s.chars().flat_map(char::to_lowercase).collect()
        } else {
            s.chars().collect()
        }
    };
    let (p, n) = (fold(pattern), fold(name));
    // Iterative matcher with one backtrack point (the last `*`): linear-ish, no recursion.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[derive(Serialize)]
struct Match {
    snapshot: String,
    time: String,
    vm: String,
    disk: usize,
    disk_name: String,
    partition: u32,
    path: String,
    #[serde(rename = "type")]
    file_type: FileType,
    size: u64,
    mtime: Option<String>,
    #[serde(skip)]
    mtime_ns: Option<i128>,
}

pub fn run(cli: &Cli, args: &FindArgs) -> Result<u8> {
    let repo = OpenRepo::open(cli)?;
    let mut snaps = list_snapshots(repo.repo)?;
    snaps.reverse();
    let with_slash = args.pattern.contains('/');
    let mut matches: Vec<Match> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    let mut truncated = false;
    'snaps: for (id, snap) in &snaps {
        if args.vm.as_deref().is_some_and(|v| v != snap.vm) {
            continue;
        }
        let src = super::Source {
            describe: format!("snapshot {}", short_id(id)),
            disks: repo.disks(snap)?,
            repo: None,
        };
        for (di, nd) in src.disks.iter().enumerate() {
            let table = match guestfs::partitions(nd.disk.as_ref()) {
                Ok(t) => t,
                Err(e) => {
                    warnings.push(format!("snapshot {} disk {}: {e}", short_id(id), nd.name));
                    continue;
                }
            };
            for p in &table.partitions {
                // Partitions without a filesystem we know (swap, MSR, LVM) are skipped quietly.
                let Ok(fs) = p.volume(nd.disk.clone()).and_then(guestfs::open_fs) else {
                    continue;
                };
                let ignore_case = !matches!(fs.kind(), FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4);
                let root = fs.root();
                let r = walk(fs.as_ref(), root, &mut |w| {
                    if w.is_loop {
                        return Ok(false);
                    }
                    let subject = if with_slash {
                        format!("/{}", w.path)
                    } else {
                        w.entry.name.clone()
                    };
                    if glob_match(&args.pattern, &subject, ignore_case) {
                        if matches.len() >= args.limit {
                            truncated = true;
                            return Err(guestfs::Error::InvalidArgument("limit".into()));
                        }
                        let md = fs.metadata(w.entry.node)?;
                        matches.push(Match {
                            snapshot: id.clone(),
                            time: snap.time.clone(),
                            vm: snap.vm.clone(),
                            disk: di + 1,
                            disk_name: nd.name.clone(),
                            partition: p.index,
                            path: format!("/{}", w.path),
                            file_type: md.file_type,
                            size: md.size,
                            mtime: rfc3339(md.mtime),
                            mtime_ns: md.mtime,
                        });
                    }
                    Ok(true)
                });
                if truncated {
                    break 'snaps;
                }
                if let Err(e) = r {
                    warnings.push(format!(
                        "snapshot {} disk {} partition {}: {e}",
                        short_id(id),
                        di + 1,
                        p.index
                    ));
                }
            }
        }
    }
    if cli.json {
        #[derive(Serialize)]
        struct Out<'a> {
            pattern: &'a str,
            matches: &'a [Match],
            truncated: bool,
            warnings: &'a [String],
        }
        crate::repo_cmd::print_json(&Out {
            pattern: &args.pattern,
            matches: &matches,
            truncated,
            warnings: &warnings,
        })?;
    } else {
        let mut cols = crate::repo_cmd::Columns::new(
            &[
                "SNAPSHOT", "TIME", "VM", "DISK", "PART", "SIZE", "MODIFIED", "PATH",
            ],
            &[3, 4, 5],
        );
        for m in &matches {
            cols.push(vec![
                short_id(&m.snapshot),
                crate::repo_cmd::local_time(&m.time),
                m.vm.clone(),
                m.disk.to_string(),
                m.partition.to_string(),
                if m.file_type == FileType::Directory {
                    "dir".into()
                } else {
                    human(m.size)
                },
                local(m.mtime_ns),
                m.path.clone(),
            ]);
        }
        if matches.is_empty() {
            println!("no file matches {:?}", args.pattern);
        } else {
            print!("{}", cols.render());
        }
        if truncated {
            println!(
                "(stopped at {} matches; raise --limit to see more)",
                args.limit
            );
        }
        for w in &warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(if warnings.is_empty() {
        EXIT_OK
    } else {
        EXIT_PROBLEMS
    })
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*.txt", "README.TXT", true));
        assert!(!glob_match("*.txt", "README.TXT", false));
        assert!(glob_match("r?adme*", "readme.md", false));
        assert!(glob_match("*", "", false));
        assert!(!glob_match("a*b", "acbd", false));
        assert!(glob_match("a*b*c", "aXXbYYbc", false));
        assert!(glob_match("/docs/*.txt", "/docs/a.txt", false));
    }
}
