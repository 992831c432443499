//! Running `nft`: one atomic transaction per script, only on ferry's tables.
//!
//! The `nft` command is the interface nftables documents for whole-ruleset
//! transactions; a script applies completely or not at all.

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft: {0} (is the nftables package installed? scripts/install-deps.sh installs it)")]
    Spawn(std::io::Error),
    #[error("nft rejected the ruleset for table {table}: {stderr}")]
    Rejected { table: String, stderr: String },
}

/// Applies `script` in one transaction. `table` names the table for errors.
pub fn apply(table: &str, script: &str) -> Result<(), NftError> {
    apply_with(Command::new("nft"), table, script)
}

/// [`apply`] with the `nft` command given by the caller, e.g. one that joins
/// a network namespace before exec (benchmarks, sandboxes); `-f -` is added.
pub fn apply_with(mut nft: Command, table: &str, script: &str) -> Result<(), NftError> {
    let mut child = nft
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child.stdin.take().expect("piped stdin").write_all(script.as_bytes()).map_err(NftError::Spawn)?;
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Rejected {
            table: table.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Deletes `family name` if it exists (ours, by name); absent is fine.
pub fn delete_table(family: &str, name: &str) -> Result<(), NftError> {
    // "add" first makes the delete valid whether or not the table existed, in one transaction.
    apply(name, &format!("add table {family} {name}\ndelete table {family} {name}\n"))
}

/// Whether a table exists.
pub fn table_exists(family: &str, name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", family, name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
