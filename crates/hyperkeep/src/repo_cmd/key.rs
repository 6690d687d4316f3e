//! `hyperkeep key list|add|remove`: the repository's passwords. Every key slot wraps the same
//! master key with its own password, so adding or removing one never re-encrypts data.

use anyhow::Result;
use serde_json::json;

use crate::cli::{Cli, KeyCommand};
use crate::repo_open;
use crate::EXIT_OK;

pub fn run(cli: &Cli, cmd: &KeyCommand) -> Result<u8> {
    let repo = repo_open::open(cli)?;
    match cmd {
        KeyCommand::List => {
            let keys = repo.list_keys()?;
            if cli.json {
                super::print_json(&keys)?;
                return Ok(EXIT_OK);
            }
            let mut t = super::Columns::new(&["", "ID", "CREATED", "USER", "HOST"], &[]);
            for k in &keys {
                t.push(vec![
                    if k.current { "*" } else { "" }.into(),
                    k.id.clone(),
                    super::local_time(&k.created),
                    or_dash(&k.username),
                    or_dash(&k.hostname),
                ]);
            }
            print!("{}", t.render());
            println!("* = the key this password opened");
        }
        KeyCommand::Add { new_password_file } => {
            let password = repo_open::new_password(new_password_file.as_deref())?;
            let id = repo.add_key(&password)?;
            if cli.json {
                super::print_json(&json!({ "added": id }))?;
            } else {
                println!("added key {id}");
            }
        }
        KeyCommand::Remove { id } => {
            repo.remove_key(id)?;
            if cli.json {
                super::print_json(&json!({ "removed": id }))?;
            } else {
                println!("removed key {id}");
            }
        }
    }
    Ok(EXIT_OK)
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}
