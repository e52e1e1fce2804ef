//! banger: one-command microVM sandboxes, driven by a content-addressed DAG of steps.
//!
//! See `ARCHITECTURE.md` for the data flow, the code map and the invariants.

pub mod assets;
pub mod bangerfile;
pub mod bundle;
pub mod catalog;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod env;
pub mod error;
pub mod ext4;
pub mod fetch;
pub mod guest;
pub mod kernel;
pub mod key;
pub mod limits;
pub mod lock;
pub mod net;
pub mod oci;
pub mod ops;
pub mod paths;
pub mod plan;
pub mod privileged;
pub mod remote;
pub mod rootfs;
pub mod sources;
pub mod sparse;
pub mod spec;
pub mod ssh;
pub mod state;
pub mod steps;
pub mod store;
pub mod untar;
pub mod vm;
