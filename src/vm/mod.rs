//! Virtual machines: accelerator choice, the QEMU microvm backend and its control protocol,
//! the Firecracker backend (API client, process, jailer), vsock through
//! `vhost-device-vsock`, and throwaway boots that reach the guest agent. (The backend trait,
//! per-VM storage and the lifecycle arrive with the VM issue.)

pub mod accel;
pub mod boot;
pub mod firecracker;
pub mod qemu;
pub mod qmp;
pub mod shape;
pub mod storage;
pub mod vsock;
