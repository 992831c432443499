//! ferry as a library: the CLI's commands, the config file, the agent's sync
//! loop, and the sandboxed lab used by the demo, conformance runs, tests and
//! benchmarks. The `ferry` binary (main.rs) only parses the command line.

pub mod agent;
pub mod cli;
pub mod config;
pub mod conformance;
pub mod datapath;
pub mod health;
pub mod lab;
pub mod localnet;
pub mod memory;
pub mod node_addrs;
pub mod pin_lock;
pub mod proxier;
