//! The host side of VM networking that needs no privileges: published ports checked before
//! a boot ([`ports`]); the bridge's subnet ([`subnet`]) and the nftables ruleset of its NAT and
//! published ports ([`nft`]), which [`crate::privileged`] applies; the `.vm` DNS server the
//! daemon runs on the bridge ([`dns`]).

pub mod dns;
pub mod nft;
pub mod ports;
pub mod subnet;
