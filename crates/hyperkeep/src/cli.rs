//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   problems found (check, disk check), a VM failed (run) or can't be backed up (preflight)
  2   error (bad arguments, unreadable file, failed operation, damaged data)
  10  no repository at the location
  11  the repository is locked
  12  wrong password";

const PASSWORD_HELP: &str = "\
The repository password comes from, in this order: --password-file FILE (or
HYPERKEEP_PASSWORD_FILE), the HYPERKEEP_PASSWORD environment variable, or a prompt
when standard input is a terminal.";

/// Backup and replication for Hyper-V virtual machines.
///
/// Virtual disks (VHDX, VHD and raw images: inspect, convert, check, differencing children,
/// merge) and a deduplicating, compressed, encrypted backup repository of VM snapshots.
#[derive(Parser, Debug)]
#[command(name = "hyperkeep", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Print results as JSON on stdout; errors too, as {"error", "hint", "exit_code"} (and on stderr).
    #[arg(long, global = true)]
    pub json: bool,

    /// Repository location: a directory (env HYPERKEEP_REPOSITORY).
    #[arg(
        long = "repo",
        short = 'r',
        global = true,
        env = "HYPERKEEP_REPOSITORY",
        value_name = "LOCATION"
    )]
    pub repo: Option<String>,

    /// Read the repository password from this file (first line; env HYPERKEEP_PASSWORD_FILE).
    #[arg(
        long,
        global = true,
        env = "HYPERKEEP_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub password_file: Option<PathBuf>,

    /// No progress bar (it only ever shows when stderr is a terminal).
    #[arg(long, global = true)]
    pub no_progress: bool,

    /// More log output on stderr (-v info, -vv debug, -vvv trace; or set HYPERKEEP_LOG).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Virtual disks: info, convert, check, create, create-child, merge.
    #[command(subcommand, after_help = EXIT_CODES)]
    Disk(DiskCommand),
    /// Create a new repository at --repo.
    #[command(after_help = PASSWORD_HELP)]
    Init {
        /// Chunk size of disks and files: a power of two from 64K to 16M (default 1M).
        #[arg(long, value_parser = parse_chunk_size, value_name = "SIZE")]
        chunk_size: Option<u32>,
        /// Cipher for every object. xaes-256-gcm (the default) is fastest on CPUs with AES
        /// instructions; xchacha20poly1305 suits CPUs without them and writes a format-version-1
        /// repository that older hyperkeep releases can read.
        #[arg(
            long,
            value_enum,
            value_name = "CIPHER",
            default_value = "xaes-256-gcm"
        )]
        encryption: CipherArg,
    },
    /// Back up one VM: its disks (VHDX, VHD, raw .raw/.img) and other files (.vmcx, .vmrs, ...).
    #[command(after_help = PASSWORD_HELP)]
    Backup(BackupArgs),
    /// List snapshots, oldest first.
    #[command(after_help = PASSWORD_HELP)]
    Snapshots {
        /// Only snapshots of this VM.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Restore a snapshot's disks and files into a directory.
    #[command(after_help = PASSWORD_HELP)]
    Restore {
        /// Snapshot id, unique prefix (at least 4 hex digits), or `latest`.
        snapshot: String,
        /// Directory to restore into (created if missing; existing files are never overwritten).
        #[arg(long)]
        target: PathBuf,
        /// Disk format of the restored disks (default: each disk's original format).
        #[arg(long, value_enum)]
        to: Option<FormatArg>,
        /// With `latest`: the newest snapshot of this VM.
        #[arg(long)]
        vm: Option<String>,
        /// Restore only these files or directories from inside the disk (guest paths, repeatable);
        /// exit 1 if some entries were skipped.
        #[arg(long, value_name = "GUESTPATH", num_args = 1.., conflicts_with = "to")]
        include: Vec<String>,
        /// With --include: the disk (from 1, in the snapshot's order).
        #[arg(long, value_name = "N", requires = "include")]
        disk: Option<usize>,
        /// With --include: the partition (as `hyperkeep ls` lists them).
        #[arg(long, value_name = "N", requires = "include")]
        partition: Option<u32>,
        /// With --include: replace existing regular files.
        #[arg(long, requires = "include")]
        overwrite: bool,
    },
    /// List files inside a disk of a snapshot or a disk file (or its partitions).
    #[command(after_help = PASSWORD_HELP)]
    Ls(LsArgs),
    /// Write a file from inside a disk of a snapshot or a disk file to stdout.
    #[command(after_help = PASSWORD_HELP)]
    Cat(CatArgs),
    /// Find files by name (glob) in every snapshot's disks, newest snapshot first (exit 1 if a
    /// disk or filesystem could not be read to the end).
    #[command(after_help = PASSWORD_HELP)]
    Find(FindArgs),
    /// Remove snapshots by a retention policy (or by id); data is freed by `prune`.
    #[command(after_help = PASSWORD_HELP)]
    Forget(ForgetArgs),
    /// Delete data no snapshot uses any more (takes an exclusive lock).
    #[command(after_help = PASSWORD_HELP)]
    Prune {
        /// Only say what would be deleted or repacked.
        #[arg(long)]
        dry_run: bool,
    },
    /// Verify the repository's structure, and with --read-data every stored byte (exit 1 on problems).
    #[command(after_help = PASSWORD_HELP)]
    Check {
        /// Read and authenticate every pack.
        #[arg(long, conflicts_with = "read_data_subset")]
        read_data: bool,
        /// Read a share of the packs: N% (a random selection) or n/t (group n of t; reading
        /// groups 1/t .. t/t on successive runs covers every pack).
        #[arg(long, value_name = "N%")]
        read_data_subset: Option<String>,
    },
    /// Repository statistics: snapshots, sizes, deduplication and compression.
    #[command(after_help = PASSWORD_HELP)]
    Stats,
    /// Changed bytes per disk between two snapshots, and added/removed disks and files.
    #[command(after_help = PASSWORD_HELP)]
    Diff {
        /// The older snapshot (id, prefix or `latest`).
        snapshot1: String,
        /// The newer snapshot (id, prefix or `latest`).
        snapshot2: String,
        /// With `latest`: the newest snapshot of this VM.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Manage the repository's passwords (key slots).
    #[command(subcommand, after_help = PASSWORD_HELP)]
    Key(KeyCommand),
    /// Remove stale locks (left by a crashed hyperkeep), or all locks with --remove-all.
    #[command(after_help = PASSWORD_HELP)]
    Unlock {
        /// Also remove locks that look alive (only when you are sure nothing else runs).
        #[arg(long)]
        remove_all: bool,
    },
    /// Per VM, the backup mode that will be used and why: each requirement met or missing
    /// (exit 1 if some VM cannot be backed up).
    Preflight(crate::job_cmd::PreflightArgs),
    /// Run a backup job file: every VM in its mode, then retention and prune (exit 1 if a VM
    /// failed).
    #[command(after_help = PASSWORD_HELP)]
    Run(crate::job_cmd::RunArgs),
    /// Show a snapshot's (or a disk file's) disks, partitions and guest files read-only under a
    /// directory (FUSE), until unmounted (`fusermount3 -u DIR`) or Ctrl-C.
    #[command(after_help = PASSWORD_HELP)]
    Mount {
        /// Snapshot id, unique prefix, or `latest`; or a disk file (VHDX, VHD, raw).
        source: String,
        /// An existing, empty directory.
        mountpoint: PathBuf,
        /// With `latest`: the newest snapshot of this VM.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Update a VM's replica (native VHDX/VHD disks and config files in DIR/VM/) from the
    /// repository, writing only what changed; keeps the last N versions.
    #[command(after_help = PASSWORD_HELP)]
    Replicate(crate::replica_cmd::ReplicateArgs),
    /// Replicas: list, verify against the repository, prepare a failover.
    #[command(subcommand)]
    Replica(crate::replica_cmd::ReplicaCommand),
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The VM's name (snapshots are grouped and retained per VM).
    #[arg(long)]
    pub vm: String,
    /// A tag KEY=VALUE (repeatable).
    #[arg(long = "tag", value_parser = parse_tag, value_name = "KEY=VALUE")]
    pub tags: Vec<(String, String)>,
    /// A differencing disk whose allocated ranges are the change list: only those are read,
    /// everything else comes from the parent snapshot. Repeatable, one per disk of the VM (each
    /// such child must be one of the PATHs).
    #[arg(long, value_name = "CHILD")]
    pub changes_from: Vec<PathBuf>,
    /// Parent snapshot for the incremental (default: the latest snapshot of this VM).
    #[arg(long, value_name = "SNAPSHOT")]
    pub parent: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    /// The VM's disks and files.
    #[arg(required_unless_present = "config", value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Instead of PATHs: back the VM up through the hypervisor of this job file, in its mode.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["paths", "changes_from", "parent"])]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Snapshot ids to remove (instead of a policy).
    #[arg(value_name = "SNAPSHOT", conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly", "keep_within", "keep_tag"])]
    pub ids: Vec<String>,
    /// Only snapshots of this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the last N years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot younger than this (e.g. 7d, 2w, 1y6m, 12h) before the newest.
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<repo::forget::KeepDuration>,
    /// Keep every snapshot with this tag (KEY or KEY=VALUE; repeatable).
    #[arg(long, value_name = "TAG")]
    pub keep_tag: Vec<String>,
    /// Only consider snapshots with this tag (KEY or KEY=VALUE; repeatable, all must match).
    #[arg(long, value_name = "TAG")]
    pub tag: Vec<String>,
    /// Only say what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Prune afterwards (exclusive lock).
    #[arg(long)]
    pub prune: bool,
}

/// Where the guest files are: `SNAPSHOT|DISKFILE`, `--disk`, `--partition`.
#[derive(Args, Debug)]
pub struct LsArgs {
    /// A disk file (VHDX, VHD, raw) if it exists, else a snapshot id, prefix or `latest`.
    #[arg(value_name = "SNAPSHOT|DISKFILE")]
    pub source: String,
    /// Directory or file inside the filesystem (default /).
    pub path: Option<String>,
    /// The disk (from 1, in the snapshot's order).
    #[arg(long, value_name = "N")]
    pub disk: Option<usize>,
    /// The partition (without it, and with several filesystems, the partitions are listed).
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
    /// With `latest`: the newest snapshot of this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// Type, permissions or attributes, size, modification time, link targets, streams.
    #[arg(long, short = 'l')]
    pub long: bool,
    /// Everything below PATH.
    #[arg(long, short = 'R')]
    pub recursive: bool,
}

#[derive(Args, Debug)]
pub struct CatArgs {
    /// A disk file (VHDX, VHD, raw) if it exists, else a snapshot id, prefix or `latest`.
    #[arg(value_name = "SNAPSHOT|DISKFILE")]
    pub source: String,
    /// The file inside the filesystem.
    pub path: String,
    /// The disk (from 1, in the snapshot's order).
    #[arg(long, value_name = "N")]
    pub disk: Option<usize>,
    /// The partition (as `hyperkeep ls` lists them).
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
    /// With `latest`: the newest snapshot of this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// An NTFS alternate data stream (or ext extended attribute) instead of the file's data.
    #[arg(long, value_name = "NAME")]
    pub stream: Option<String>,
}

#[derive(Args, Debug)]
pub struct FindArgs {
    /// Glob on file names (`*`, `?`; case-insensitive on NTFS/FAT/exFAT); with a `/`, on the
    /// whole path from the filesystem's root.
    pub pattern: String,
    /// Only snapshots of this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// Stop after this many matches.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub limit: usize,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List the key slots (the one in use is marked).
    List,
    /// Add a password (a new key slot for the same master key).
    Add {
        /// Read the new password from this file instead of a prompt.
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// Remove a key slot (not the one in use, never the last).
    Remove {
        /// The key slot's id (`key list` shows them).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Show a disk's format, sizes, allocation and parent chain.
    #[command(after_help = EXIT_CODES)]
    Info {
        /// The disk file (format is recognised by content).
        file: PathBuf,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Copy a disk into a new file of any format; holes and zeros stay unallocated.
    #[command(after_help = EXIT_CODES)]
    Convert {
        /// Source disk (any format; a differencing disk is read with its chain).
        input: PathBuf,
        /// New file to write (never overwritten).
        output: PathBuf,
        /// Output format; default: from OUTPUT's extension (.vhdx/.avhdx, .vhd, .raw/.img/.bin).
        #[arg(long, value_enum)]
        to: Option<FormatArg>,
        /// Fully allocated output (vhdx, vhd) instead of dynamic.
        #[arg(long)]
        fixed: bool,
        /// Block size of a dynamic output, e.g. 32M or 2MiB (default: vhdx 32 MiB, vhd 2 MiB).
        #[arg(long, value_parser = parse_block_size)]
        block_size: Option<u32>,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Check a disk's structure and its parent chain (exit 1 if problems are found).
    #[command(after_help = EXIT_CODES)]
    Check {
        /// The disk file; a differencing disk's parents are checked too.
        file: PathBuf,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Create a new, empty disk.
    #[command(after_help = EXIT_CODES)]
    Create {
        /// New file to write (never overwritten).
        file: PathBuf,
        /// Virtual size, e.g. 10G.
        #[arg(long, value_parser = crate::size::parse_size)]
        size: u64,
        /// Format; default: from FILE's extension.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Fully allocated (vhdx, vhd) instead of dynamic.
        #[arg(long)]
        fixed: bool,
        /// Block size, e.g. 32M (default: vhdx 32 MiB, vhd 2 MiB).
        #[arg(long, value_parser = parse_block_size)]
        block_size: Option<u32>,
        /// Logical sector size (512 or 4096; vhd only has 512).
        #[arg(long, default_value_t = 512)]
        logical_sector_size: u32,
        /// Physical sector size (512 or 4096).
        #[arg(long, default_value_t = 4096)]
        physical_sector_size: u32,
    },
    /// Create a differencing child (same format as the parent) that records changes on top of it.
    #[command(after_help = EXIT_CODES)]
    CreateChild {
        /// The existing disk (vhdx or vhd) the child records changes against.
        parent: PathBuf,
        /// New file to write; Hyper-V names them .avhdx/.avhd.
        child: PathBuf,
    },
    /// Merge a differencing child into its parent, then delete the child.
    #[command(after_help = EXIT_CODES)]
    Merge {
        /// The differencing disk to merge into its immediate parent.
        child: PathBuf,
        #[command(flatten)]
        open: OpenArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct OpenArgs {
    /// Use this file as the parent of a differencing disk instead of what its locator says
    /// (the parent linkage is still checked).
    #[arg(long, value_name = "P")]
    pub parent: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherArg {
    #[value(name = "xaes-256-gcm")]
    Xaes256Gcm,
    #[value(name = "xchacha20poly1305")]
    XChaCha20Poly1305,
}

impl From<CipherArg> for repo::crypto::Cipher {
    fn from(c: CipherArg) -> Self {
        match c {
            CipherArg::Xaes256Gcm => repo::crypto::Cipher::Xaes256Gcm,
            CipherArg::XChaCha20Poly1305 => repo::crypto::Cipher::XChaCha20Poly1305,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatArg {
    Vhdx,
    Vhd,
    Raw,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    let v = crate::size::parse_size(s)?;
    u32::try_from(v).map_err(|_| format!("block size {s} is too large (at most 256M for vhdx)"))
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let v = crate::size::parse_size(s)?;
    if !v.is_power_of_two() || !(64 << 10..=16 << 20).contains(&v) {
        return Err(format!(
            "chunk size {s} is not a power of two between 64K and 16M (e.g. 1M)"
        ));
    }
    Ok(v as u32)
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("tag {s:?} is not KEY=VALUE")),
    }
}
