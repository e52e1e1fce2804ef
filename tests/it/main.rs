//! banger's integration tests: one binary, one module per area.

mod cli;
mod engine;
mod oci;
mod registry;
mod support;
