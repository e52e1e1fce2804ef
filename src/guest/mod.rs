//! The host side of banger's guest channel: a client for the agent's protocol (v2, and v1
//! agents of older images).
//!
//! It owns connecting to a guest's agent and every request after that; what to run and when
//! is the caller's business (the VM and CLI layers). The wire format lives in one file shared
//! verbatim with the agent, [`protocol`] (`assets/agent/src/protocol.rs`), so the two sides
//! cannot drift; `docs/agent.md` specifies it.
//!
//! Lifecycle:
//! 1. Connect through a [`GuestEndpoint`]: Firecracker-style hybrid vsock (a unix socket
//!    where `CONNECT <port>\n` is answered by `OK <n>\n`; Firecracker and
//!    vhost-device-vsock both speak it), a plain unix socket (tests, or an agent started with
//!    `--listen-unix`), or a virtio-serial port's host socket, where frames carry a channel
//!    number chosen at random per connection. [`GuestEndpoint::wait_ready`] retries
//!    connecting and `Hello` until a deadline, because a booting guest's VMM accepts the
//!    connection and then drops it while nothing listens yet.
//! 2. [`GuestChannel::hello`] exchanges versions and returns [`Ready`].
//! 3. Requests run one at a time per channel (`exec`, `put_file`, `get_file`); for
//!    concurrency, open more channels.
//! 4. Every future here is cancellable by drop. A request dropped half-way leaves its channel
//!    mid-stream, so the channel refuses further requests ([`GuestError::Poisoned`]);
//!    dropping the channel closes the connection, and the agent then kills the command. A
//!    command that ends before its stdin is all sent leaves the channel usable: `exec`
//!    finishes the `Stdin` frame it was writing (the agent ignores stdin after `Exit`) and
//!    sends no more.
//!
//! Commands on a pseudo-terminal (`exec_tty`, with window sizes sent as `Resize` frames) need
//! protocol 2; an agent that answers `Hello` with 1 (an older image) still serves everything
//! else, and `exec_tty` tells it apart ([`GuestError::TtyUnsupported`]).
//!
//! Many clients can share one serial stream through [`SerialMux`] (`serial_mux.rs`), which
//! holds the VMM's one connection and gives each of its own connections a channel; the VM
//! layer runs one beside every QEMU VM on the serial transport (`vm/agent_mux.rs`).
//!
//! Weakness: no signal forwarding during `exec` yet (the agent understands `Signal`).

mod client;
mod error;
mod serial_mux;

#[path = "../../assets/agent/src/protocol.rs"]
pub mod protocol;

pub use client::{ExitStatus, GuestChannel, GuestEndpoint};
pub use error::GuestError;
pub use protocol::{
    ErrorKind, Exec as ExecRequest, FileInfo, FilesystemUse, GuestStats, Listener,
    ListeningProcess, PROTOCOL_VERSION, PutFile as PutFileRequest, Ready, WindowSize,
};
pub use serial_mux::SerialMux;
