//! `ferry datapath`: the pinned datapath's layout version, and the way back
//! to an older one (`downgrade`), which only the newer build can take.

use clap::{Args, Subcommand};
use ferry_bpf::downgrade::{Converted, convert};
use ferry_bpf::layout::LAYOUT;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct DatapathArgs {
    #[command(subcommand)]
    pub command: DatapathCommand,
}

#[derive(Debug, Subcommand)]
pub enum DatapathCommand {
    /// Print the layout version of the pinned datapath and of this ferry.
    Layout {
        /// Pin directory the datapath was installed in.
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/ferry")]
        pin_dir: PathBuf,
    },
    /// Convert the pinned datapath to an older layout, keeping its tracked flows (a downgrade).
    ///
    /// An older ferry refuses a datapath of a newer layout (it cannot know
    /// what changed); this newer one knows both. Stop this ferry's agent
    /// first (the datapath keeps serving without it), then run this command
    /// with the older version's layout: the README's table of layouts says
    /// which release has which, and the older agent's refusal names it too
    /// ("newer than this ferry's layout M"). It rebuilds the maps that
    /// changed since in their older shape, copies the tracked flows into
    /// them, unpins the other changed maps and those the older layout lacks
    /// (the older agent refills them from the Services) and records the
    /// older layout. The running programs keep serving from the maps they
    /// hold, and (from this release on) write each flow they create into
    /// the converted conntrack table too, so the older programs know it the
    /// moment they take a link over (README "Downgrades").
    ///
    /// Then start the older agent: it adopts the converted maps and switches
    /// the links to its programs. Meanwhile this command keeps copying the
    /// flows the running programs create, and once the links have switched it
    /// adds the last ones and exits 0. With --wait 0 it exits right after the
    /// conversion (flows created after that and before the older agent starts
    /// are balanced again on their next packet; a SNATed one is reset).
    ///
    /// Example (on the node, agent stopped):
    ///   ferry datapath downgrade --to-layout 1 &
    ///   <start the older ferry agent>
    ///   wait   # "the links switched to the layout-1 programs ..."
    #[command(verbatim_doc_comment)]
    Downgrade {
        /// The older layout to convert to (the older ferry's own layout).
        #[arg(long, value_name = "N")]
        to_layout: u32,
        /// Pin directory the datapath was installed in.
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/ferry")]
        pin_dir: PathBuf,
        /// Seconds to wait for the older agent to switch the links (0: do not wait).
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        wait: u64,
    },
}

pub fn run(args: DatapathArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DatapathCommand::Layout { pin_dir } => {
            match ferry_bpf::install::pinned_layout(&pin_dir) {
                None => println!("nothing pinned in {}; this ferry: layout {LAYOUT}", pin_dir.display()),
                Some(found) => println!("pinned in {}: layout {found}; this ferry: layout {LAYOUT}", pin_dir.display()),
            }
            Ok(ExitCode::SUCCESS)
        }
        DatapathCommand::Downgrade { to_layout, pin_dir, wait } => downgrade(&pin_dir, to_layout, wait),
    }
}

/// How often the wait looks at the links and refreshes the copy: the flows
/// the newer programs create in the last interval before the switch are the
/// ones added only after it (`late`), so the interval is kept short; a
/// refresh writes only what changed since the last one.
const POLL: Duration = Duration::from_millis(50);
/// Once the older agent has switched a first link, until it has switched
/// them all: a packet of a flow the newer programs created since the last
/// pass may meet an older program now, so the late flows are added as fast
/// as a pass goes.
const POLL_SWITCHING: Duration = Duration::from_millis(5);

fn downgrade(pin_dir: &std::path::Path, to: u32, wait: u64) -> anyhow::Result<ExitCode> {
    let Some(dir) = super::cleanup::checked_pin_dir(pin_dir)? else {
        anyhow::bail!("nothing pinned in {}: there is nothing to downgrade", pin_dir.display());
    };
    let converted = {
        // No agent may program the maps while they are converted; the older
        // agent takes the lock once this one lets go.
        let _lock = crate::pin_lock::lock(&dir)?;
        convert(&dir, to)?
    };
    let Some(mut c) = converted else {
        println!("the datapath in {} already has layout {to}: nothing to do", dir.display());
        return Ok(ExitCode::SUCCESS);
    };
    println!("converted {} from layout {} to layout {}: {}", dir.display(), c.from, c.to, summary(&c));
    if wait == 0 {
        println!("not waiting: start the layout-{to} agent now");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "start the layout-{to} agent now; waiting up to {wait} s for it to switch the links (the layout-{} \
         programs keep serving meanwhile)",
        c.from
    );
    let _ = std::io::stdout().flush();
    // Bounded by count: `wait` seconds of the longer interval, and as many
    // of the short ones (an agent switches its links within milliseconds).
    let polls = wait.saturating_mul(1000) / POLL.as_millis() as u64;
    let mut late = 0;
    for _ in 0..polls.saturating_mul(2) {
        let (switched, links) = c.links_switched();
        if switched == 0 {
            // Should a link switch during this refresh, it may put back a
            // flow's state from just before the switch over what the older
            // programs wrote since (a deadline a few ms earlier): never a loss.
            c.refresh();
            std::thread::sleep(POLL);
            continue;
        }
        late += c.late();
        if switched == links {
            c.finish();
            println!("the links switched to the layout-{to} programs; late={late} ({})", summary(&c));
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(POLL_SWITCHING);
    }
    println!(
        "the links did not switch within {wait} s: the layout-{} programs still serve; the pinned maps are \
         of layout {to} and hold the flows as of now. Start the layout-{to} agent (flows created from now \
         on are balanced again at its switch) or the layout-{} agent again (it migrates back, keeping them)",
        c.from, c.from
    );
    Ok(ExitCode::from(1))
}

fn summary(c: &Converted) -> String {
    let mut parts: Vec<String> = c
        .rebuilt
        .iter()
        .map(|r| {
            format!(
                "{} rebuilt (capacity {}): confirmed={} unconfirmed={} expired={} not_copied={} stranded={} \
                 refreshed={} late={} mirrored={}",
                r.map,
                r.capacity,
                r.confirmed,
                r.unconfirmed,
                r.expired,
                r.not_copied,
                r.stranded,
                r.refreshed,
                r.late,
                r.mirrored
            )
        })
        .collect();
    if !c.retired.is_empty() {
        parts.push(format!("retired=[{}]", c.retired.join(",")));
    }
    parts.join("; ")
}
