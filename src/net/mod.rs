//! The host side of VM networking that needs no privileges: published ports checked before
//! a boot ([`ports`]).

pub mod ports;
