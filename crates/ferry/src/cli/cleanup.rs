//! `ferry cleanup`: remove everything ferry attached or pinned, and nothing
//! else: the pinned eBPF datapath, and the nftables tables ferry owns (the
//! nftables datapath's `ip ferry` / `ip6 ferry`, the masquerade fallback's
//! `inet ferry-masq`) in this network namespace.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Pin directory the datapath was installed in.
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/ferry")]
    pub pin_dir: PathBuf,
}

pub fn run(args: CleanupArgs) -> anyhow::Result<ExitCode> {
    if !args.pin_dir.starts_with(ferry_bpf::system::BPFFS) {
        anyhow::bail!(
            "{} is not below {}; refusing to remove anything there",
            args.pin_dir.display(),
            ferry_bpf::system::BPFFS
        );
    }
    let removed = ferry_bpf::uninstall(&args.pin_dir)?;
    if removed.links.is_empty() && removed.maps.is_empty() {
        println!("nothing installed in {}", args.pin_dir.display());
    } else {
        println!(
            "detached {} link(s) ({}) and removed {} map(s) from {}",
            removed.links.len(),
            removed.links.join(", "),
            removed.maps.len(),
            args.pin_dir.display()
        );
    }
    let mut tables = Vec::new();
    for (family, name) in ferry_nft::owned_tables() {
        ferry_nft::nft::delete_table(family, name)?;
        tables.push(format!("{family} {name}"));
    }
    if !tables.is_empty() {
        println!("deleted nftables table(s) {}", tables.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
