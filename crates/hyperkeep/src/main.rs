//! `hyperkeep`: backup and replication for Hyper-V virtual machines.
//!
//! Map: `cli` declares the arguments (clap), `disk` runs the `hyperkeep disk ...` commands,
//! `repo_cmd` the repository commands (one module per command) with `repo_open` finding the
//! repository and its password and `progress` drawing progress bars, `granular` the commands on
//! files inside disks (`ls`, `cat`, `find`, `restore --include`), `mount` the read-only FUSE view
//! of a snapshot's disks and files (`hyperkeep mount`), `replica_cmd` replication (`replicate`,
//! `replica list|verify|failover`), `output` prints results for
//! humans or as JSON (errors included), `size` parses sizes such as `32M`.

mod cli;
mod disk;
mod granular;
mod job_cmd;
mod mount;
mod output;
mod progress;
mod replica_cmd;
mod repo_cmd;
mod repo_open;
mod size;

use std::process::ExitCode;

use clap::Parser;

/// Exit codes, as documented in `--help`.
pub const EXIT_OK: u8 = 0;
pub const EXIT_PROBLEMS: u8 = 1;
pub const EXIT_ERROR: u8 = 2;
pub const EXIT_NO_REPOSITORY: u8 = 10;
pub const EXIT_LOCKED: u8 = 11;
pub const EXIT_WRONG_PASSWORD: u8 = 12;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // Help and version are not errors; clap's usage errors get our exit code 2.
            let code = if e.use_stderr() { EXIT_ERROR } else { EXIT_OK };
            let _ = e.print();
            // The arguments did not parse, so look for --json by hand: a program that asked for
            // JSON gets its error as JSON even for a typo.
            if code != EXIT_OK && std::env::args().any(|a| a == "--json") {
                let first = e.to_string();
                let msg = first
                    .lines()
                    .next()
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ");
                let v = serde_json::json!({
                    "error": msg,
                    "hint": "run with --help to see the usage",
                    "exit_code": code,
                });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            return ExitCode::from(code);
        }
    };
    init_tracing(args.verbose);
    let result = repo_cmd::run(&args);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = output::exit_code(&e);
            output::print_error(&e, code, args.json);
            ExitCode::from(code)
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
