//! banger: one-command microVM sandboxes, driven by a content-addressed DAG of steps.
//!
//! See `ARCHITECTURE.md` for the data flow, the code map and the invariants.

pub mod assets;
pub mod catalog;
pub mod engine;
pub mod ext4;
pub mod key;
pub mod lock;
pub mod plan;
pub mod spec;
pub mod steps;
pub mod store;
