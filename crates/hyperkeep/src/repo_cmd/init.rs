//! `hyperkeep init`: create a repository.

use anyhow::Result;
use repo::crypto::Cipher;
use repo::repository::{InitOptions, Repository};
use serde_json::json;

use crate::cli::Cli;
use crate::repo_open;
use crate::size::human_exact;
use crate::EXIT_OK;

pub fn run(cli: &Cli, chunk_size: Option<u32>, cipher: Cipher) -> Result<u8> {
    let backend = repo_open::backend(cli)?;
    let password = repo_open::password(cli, true)?;
    let mut opts = InitOptions {
        cipher,
        ..InitOptions::default()
    };
    if let Some(c) = chunk_size {
        opts.chunk_size = c;
    }
    let repo = Repository::init(backend, &password, opts)?;
    let c = repo.config();
    if cli.json {
        super::print_json(&json!({
            "location": repo.backend().location(),
            "id": c.id,
            "version": c.version,
            "chunk_size": c.chunk_size,
            "pack_size": c.pack_size,
            "compression": c.compression,
            "encryption": c.encryption,
            "key": repo.current_key_id(),
        }))?;
    } else {
        println!(
            "created hyperkeep repository {} at {}",
            c.id,
            repo.backend().location()
        );
        println!(
            "  chunks of {}, packs of {}, {} compression, {} encryption",
            human_exact(u64::from(c.chunk_size)),
            human_exact(c.pack_size as u64),
            c.compression,
            c.encryption
        );
        println!(
            "Keep the password safe: without it nobody, you included, can read this repository."
        );
    }
    Ok(EXIT_OK)
}
