//! `hyperkeep`: backup and replication for Hyper-V virtual machines.
//!
//! Map: `cli` declares the arguments (clap), `disk` runs the `hyperkeep disk ...` commands,
//! `output` prints results for humans or as JSON, `size` parses sizes such as `32M`.

mod cli;
mod disk;
mod output;
mod size;

use std::process::ExitCode;

use clap::Parser;

/// Exit codes, as documented in `--help`.
pub const EXIT_OK: u8 = 0;
pub const EXIT_PROBLEMS: u8 = 1;
pub const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // Help and version are not errors; clap's usage errors get our exit code 2.
            let code = if e.use_stderr() { EXIT_ERROR } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_tracing(args.verbose);
    let result = match &args.command {
        cli::Command::Disk(cmd) => disk::run(cmd, args.json),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            output::print_error(&e);
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn init_tracing(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HYPERKEEP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
