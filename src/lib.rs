//! banger: one-command microVM sandboxes, driven by a content-addressed DAG of steps.
//!
//! See `ARCHITECTURE.md` for the data flow, the code map and the invariants.

pub mod catalog;
pub mod key;
pub mod spec;
pub mod assets;
pub mod lock;
pub mod plan;
pub mod steps;
pub mod store;
