//! ferry's nftables backends. Rulesets are rendered as text from the Plan
//! (pure) and applied atomically with `nft -f -` to tables ferry owns.

pub mod masquerade;
pub mod nft;
pub mod ruleset;
pub mod services;

pub use nft::NftError;

/// The nftables tables ferry owns that exist in this network namespace, as
/// (family, name): the service datapath's and the masquerade fallback's.
pub fn owned_tables() -> Vec<(&'static str, &'static str)> {
    [("ip", services::TABLE), ("ip6", services::TABLE), (masquerade::FAMILY, masquerade::TABLE)]
        .into_iter()
        .filter(|(family, name)| nft::table_exists(family, name))
        .collect()
}
