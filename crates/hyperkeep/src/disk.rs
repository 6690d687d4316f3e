//! `hyperkeep disk ...`: the virtual-disk commands.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use vdisk::{ConvertOptions, CreateOptions, DiskFormat, OpenOptions};

use crate::cli::{DiskCommand, FormatArg, OpenArgs};
use crate::output;
use crate::{EXIT_OK, EXIT_PROBLEMS};

pub fn run(cmd: &DiskCommand, json: bool) -> Result<u8> {
    tracing::debug!(?cmd, "disk command");
    match cmd {
        DiskCommand::Info { file, open } => {
            let disk = vdisk::open(file, &open_options(open))?;
            output::disk_info(&disk.info(), json)?;
            Ok(EXIT_OK)
        }
        DiskCommand::Convert {
            input,
            output: out,
            to,
            fixed,
            block_size,
            open,
        } => convert(input, out, *to, *fixed, *block_size, open, json),
        DiskCommand::Check { file, open } => {
            let report = vdisk::check(file, &open_options(open))?;
            output::check_report(&report, json)?;
            Ok(if report.problems.is_empty() {
                EXIT_OK
            } else {
                EXIT_PROBLEMS
            })
        }
        DiskCommand::Create {
            file,
            size,
            format,
            fixed,
            block_size,
            logical_sector_size,
            physical_sector_size,
        } => {
            let format = pick_format(*format, file, "--format")?;
            let mut opts = CreateOptions::new(format, *size);
            opts.fixed = *fixed;
            opts.block_size = *block_size;
            opts.logical_sector_size = *logical_sector_size;
            opts.physical_sector_size = *physical_sector_size;
            let mut disk = vdisk::create(file, &opts)?;
            disk.flush()?;
            output::created("created", &disk.info(), json)?;
            Ok(EXIT_OK)
        }
        DiskCommand::CreateChild { parent, child } => {
            let mut disk = vdisk::create_child(parent, child)?;
            disk.flush()?;
            output::created("created differencing child", &disk.info(), json)?;
            Ok(EXIT_OK)
        }
        DiskCommand::Merge { child, open } => {
            let report = vdisk::merge(child, &open_options(open))?;
            output::merge_report(&report, json)?;
            Ok(EXIT_OK)
        }
    }
}

fn open_options(a: &OpenArgs) -> OpenOptions {
    OpenOptions {
        parent_override: a.parent.clone(),
        ..OpenOptions::default()
    }
}

/// The format the user asked for, else the one the file name implies.
fn pick_format(arg: Option<FormatArg>, file: &Path, flag: &str) -> Result<DiskFormat> {
    if let Some(f) = arg {
        return Ok(match f {
            FormatArg::Vhdx => DiskFormat::Vhdx,
            FormatArg::Vhd => DiskFormat::Vhd,
            FormatArg::Raw => DiskFormat::Raw,
        });
    }
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("vhdx" | "avhdx") => Ok(DiskFormat::Vhdx),
        Some("vhd" | "avhd") => Ok(DiskFormat::Vhd),
        Some("raw" | "img" | "bin") => Ok(DiskFormat::Raw),
        _ => Err(anyhow!(
            "cannot tell the output format from the name {}\nhint: add {flag} vhdx, {flag} vhd or {flag} raw",
            file.display()
        )),
    }
}

fn convert(
    input: &Path,
    out: &Path,
    to: Option<FormatArg>,
    fixed: bool,
    block_size: Option<u32>,
    open: &OpenArgs,
    json: bool,
) -> Result<u8> {
    let format = pick_format(to, out, "--to")?;
    let src = vdisk::open(input, &open_options(open))?;
    let src_info = src.info();
    tracing::info!(
        input = %input.display(),
        source_format = %src_info.format,
        output = %out.display(),
        output_format = %format,
        fixed,
        ?block_size,
        "converting"
    );
    let opts = ConvertOptions {
        format,
        fixed,
        block_size,
    };
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(src_info.virtual_size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("the template is valid"),
        );
        bar
    });
    let progress = |done: u64, _total: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    let started = Instant::now();
    let report = vdisk::convert(&*src, out, &opts, Some(&progress))
        .with_context(|| format!("converting {} to {}", input.display(), out.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(?report, seconds, "converted");
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    output::convert_report(&src_info, format, fixed, &report, seconds, json)?;
    Ok(EXIT_OK)
}
