//! ferry-conntrack: the kernel conntrack reconciler. Deletes the conntrack
//! entries of UDP flows whose backend no longer serves, over ctnetlink.
//!
//! ```text
//! StaleFlowIndex (ferry-model, pure) ─┐
//!                                     ▼
//! Conntrack::reconcile ── list (dump, kernel-filtered to UDP) ── is_stale? ── delete_all (batched)
//!        │                                                                        │
//!        └──────────────── ReconcileReport {listed, deleted, duration} per family ┘
//! ```
//!
//! Which entries are stale is decided in `ferry_model::stale`; this crate only
//! lists and deletes. `wire` builds and reads the messages (pure, unit-tested),
//! `table` owns the socket, `reconcile` joins the two.
//!
//! We own the dump, filter and delete code (a few hundred lines) because no
//! crate does it well: `conntrack` only dumps, `nlink` does it all but is very
//! large and slow to build, and netlink-packet-netfilter has the message types
//! but no filter, zone or id support and allocates per attribute when
//! parsing (see `shared/reference/rust-stack.md` §5). Requests are
//! built with netlink-packet-netfilter; replies are read zero-copy.
//!
//! Conntrack tables are per network namespace, and a socket works on the
//! table of the namespace its creating thread was in, for its whole life. So
//! [`Conntrack::open`] from a thread that has `setns()`d into a namespace gets
//! that namespace's table, and [`Conntrack::open_in_netns`] does exactly that
//! in a short-lived helper thread, leaving the caller's threads where they are.
//! The agent opens its socket in the node's namespace; tests and benchmarks in
//! namespaces of their own.

mod entry;
mod error;
mod reconcile;
mod table;
pub mod wire;

pub use entry::{Entry, IPPROTO_UDP, Tuple};
pub use error::Error;
pub use reconcile::{FamilyReconcile, ReconcileReport};
pub use table::{Conntrack, Created, Deleted, Listing, MAX_DUMP_ATTEMPTS};
