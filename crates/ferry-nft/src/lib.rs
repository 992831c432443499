//! ferry's nftables backends. Rulesets are rendered as text from the Plan
//! (pure) and applied atomically with `nft -f -` to tables ferry owns.

pub mod masquerade;
pub mod nft;
pub mod ruleset;
pub mod services;

pub use nft::NftError;
