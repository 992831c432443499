//! `ferry cleanup`: remove everything ferry attached or pinned, and nothing
//! else: the pinned eBPF datapath, the defrag loop (its namespace
//! `ferry-dfl-<inode>` and the device `ferry-defrag`), and the nftables
//! tables ferry owns (the nftables datapath's `ip ferry` / `ip6 ferry`, the
//! masquerade fallback's `inet ferry-masq`) in this network namespace.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Pin directory the datapath was installed in.
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/ferry")]
    pub pin_dir: PathBuf,
}

/// bpffs's `statfs` magic number.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The pin directory `ferry cleanup` may empty: `path` with `..` and symlinks
/// resolved, strictly below the bpffs mount and on bpffs itself. `Ok(None)`:
/// it does not exist (nothing to remove there).
pub fn checked_pin_dir(path: &std::path::Path) -> anyhow::Result<Option<PathBuf>> {
    let bpffs = std::path::Path::new(ferry_bpf::system::BPFFS);
    let lexically_inside = path.is_absolute()
        && path.starts_with(bpffs)
        && path.components().all(|c| !matches!(c, std::path::Component::ParentDir));
    let canonical = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && lexically_inside => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("{} is not below {}; refusing to remove anything there", path.display(), bpffs.display())
        }
        Err(e) => anyhow::bail!("cannot resolve {}: {e}", path.display()),
    };
    if !canonical.starts_with(bpffs) || canonical == bpffs {
        anyhow::bail!(
            "{} resolves to {}, which is not a directory below {}; refusing to remove anything there",
            path.display(),
            canonical.display(),
            bpffs.display()
        );
    }
    let c = std::ffi::CString::new(canonical.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs into a zeroed struct we own, with a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        anyhow::bail!("cannot statfs {}: {}", canonical.display(), std::io::Error::last_os_error());
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        anyhow::bail!(
            "{} is not on a bpffs mount (filesystem magic {:#x}); refusing to remove anything there",
            canonical.display(),
            st.f_type
        );
    }
    Ok(Some(canonical))
}

pub fn run(args: CleanupArgs) -> anyhow::Result<ExitCode> {
    let removed = match checked_pin_dir(&args.pin_dir)? {
        None => ferry_bpf::install::Removed::default(),
        Some(dir) => {
            // Never pull the datapath from under a running agent.
            let _lock = crate::pin_lock::lock(&dir)?;
            // The agent's list of refused objects for `ferry status` goes with the datapath.
            crate::agent::sync::remove_run_files(&dir);
            ferry_bpf::uninstall(&dir)?
        }
    };
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
    // After the links: nothing sends into the loop any more.
    if let Some(netns) = ferry_bpf::defrag_loop::remove()? {
        println!("removed the defrag loop (namespace {netns}, device {})", ferry_bpf::defrag_loop::NODE_DEVICE);
    }
    // Before the guard rule goes with the nftables table.
    if let Some(before) = crate::localnet::restore()? {
        println!("restored net.ipv4.conf.all.route_localnet to {before}");
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
