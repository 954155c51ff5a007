//! `actwatch token`: a new bearer token and the `[[tokens]]` entry that admits it.

use std::io::Read;

use anyhow::{Context, Result};

use crate::cli::TokenArgs;

/// Prints a fresh token (32 bytes from the OS, hex) and its config entry. The server stores only
/// the SHA-256, so a leaked config file grants nothing.
pub fn run(a: TokenArgs) -> Result<()> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // The entry is checked the way the server will check it.
    let entry = actwatch_server::TokenEntry {
        name: a.name.clone(),
        role: if a.role == "admin" {
            actwatch_server::Role::Admin
        } else {
            actwatch_server::Role::Read
        },
        sha256: actwatch_server::token_digest(&token),
    };
    actwatch_server::Tokens::new(std::slice::from_ref(&entry))?;
    println!(
        "# token for {:?} (give it to the client; the server keeps only its hash):",
        a.name
    );
    println!("# {token}");
    println!("[[tokens]]");
    println!("name = {:?}", entry.name);
    println!("role = \"{}\"", entry.role.name());
    println!("sha256 = \"{}\"", entry.sha256);
    Ok(())
}
