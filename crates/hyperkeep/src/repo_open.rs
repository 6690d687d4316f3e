//! Where the repository is and how its password is obtained, shared by every repository command.
//!
//! Password sources, in order: `--password-file` (or `HYPERKEEP_PASSWORD_FILE`), the
//! `HYPERKEEP_PASSWORD` environment variable, a prompt without echo when standard input is a
//! terminal. Without any of them (cron, CI) we stop with exit 2 and name the three ways rather
//! than block on a prompt nobody sees.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use repo::backend::{Backend, ObjectKind, CONFIG_NAME};
use repo::repository::Repository;

use crate::cli::Cli;

/// The password environment variable (the file variable is handled by clap).
pub const PASSWORD_ENV: &str = "HYPERKEEP_PASSWORD";

/// The repository location from `--repo` / `HYPERKEEP_REPOSITORY`.
pub fn location(cli: &Cli) -> Result<&str> {
    match cli.repo.as_deref() {
        Some(l) if !l.trim().is_empty() => Ok(l),
        _ => bail!(
            "no repository given\nhint: name it with --repo LOCATION (a directory) or set HYPERKEEP_REPOSITORY"
        ),
    }
}

/// The backend at the location, whether or not a repository exists there.
pub fn backend(cli: &Cli) -> Result<Arc<dyn Backend>> {
    let loc = location(cli)?;
    Ok(Repository::open_location(loc)?)
}

/// Open the existing repository: exit 10 (before asking for a password) if there is none.
pub fn open(cli: &Cli) -> Result<Repository> {
    let backend = backend(cli)?;
    if !backend.exists(ObjectKind::Config, CONFIG_NAME)? {
        return Err(repo::Error::NoRepository(backend.location()).into());
    }
    let password = password(cli, false)?;
    let repo = Repository::open(backend, &password)?;
    tracing::info!(key = repo.current_key_id(), "repository opened");
    Ok(repo)
}

/// The repository password. `confirm`: a prompt asks twice (a new repository's password).
pub fn password(cli: &Cli, confirm: bool) -> Result<String> {
    if let Some(file) = &cli.password_file {
        return read_password_file(file);
    }
    if let Ok(p) = std::env::var(PASSWORD_ENV) {
        if p.is_empty() {
            bail!("{PASSWORD_ENV} is set but empty\nhint: set it to the password, or unset it to be asked");
        }
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "the repository needs a password and there is no terminal to ask for it\nhint: use --password-file FILE, set HYPERKEEP_PASSWORD_FILE=FILE, or set HYPERKEEP_PASSWORD"
        );
    }
    prompt("repository password", confirm)
}

/// The first line of a password file (a trailing newline is not part of the password).
pub fn read_password_file(file: &Path) -> Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the password file {}", file.display()))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        bail!(
            "the password file {} is empty (its first line is the password)",
            file.display()
        );
    }
    Ok(line.to_string())
}

/// Ask on the terminal without echo; with `confirm` twice, and both must match.
pub fn prompt(what: &str, confirm: bool) -> Result<String> {
    let first = rpassword::prompt_password(format!("enter {what}: "))
        .context("cannot read the password from the terminal")?;
    if first.is_empty() {
        bail!("empty password\nhint: a repository password cannot be empty");
    }
    if confirm {
        let again = rpassword::prompt_password(format!("enter {what} again: "))
            .context("cannot read the password from the terminal")?;
        if again != first {
            return Err(anyhow!("the two passwords differ; nothing was changed"));
        }
    }
    Ok(first)
}

/// A new password for `key add`: from a file, else a prompt (twice).
pub fn new_password(file: Option<&Path>) -> Result<String> {
    if let Some(f) = file {
        return read_password_file(f);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "no terminal to ask for the new password\nhint: give it with --new-password-file FILE"
        );
    }
    prompt("new password", true)
}
