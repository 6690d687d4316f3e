//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  problems found (disk check)
  2  error (bad arguments, unreadable file, failed operation)";

/// Backup and replication for Hyper-V virtual machines.
///
/// Today: the virtual-disk layer (VHDX, VHD and raw images: inspect, convert, check,
/// differencing children, merge). Repository, restore and replication come next.
#[derive(Parser, Debug)]
#[command(name = "hyperkeep", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Print results as JSON on stdout (errors stay one line on stderr).
    #[arg(long, global = true)]
    pub json: bool,

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
pub enum FormatArg {
    Vhdx,
    Vhd,
    Raw,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    let v = crate::size::parse_size(s)?;
    u32::try_from(v).map_err(|_| format!("block size {s} is too large (at most 256M for vhdx)"))
}
