//! Virtual machines: accelerator choice, the QEMU microvm backend and its control protocol.
//! (The Firecracker backend, per-VM storage and the lifecycle arrive with the VM issue.)

pub mod accel;
pub mod qemu;
pub mod qmp;
