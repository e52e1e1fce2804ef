//! banger's integration tests: one binary, one module per area.

mod bundle;
mod cli;
mod copy;
mod daemon;
mod engine;
mod ext4;
mod ext4_read;
mod fetch;
mod firecracker;
mod firstboot;
mod fuzz;
mod guest;
mod images;
mod kernel;
mod kernel_pull;
mod network;
mod oci;
mod provision;
mod registry;
mod reliability;
mod rootfs;
mod slow;
mod ssh_config;
mod support;
mod up;
mod vm;
