//! banger-agent: the guest side of banger's host↔guest channel.
//!
//! It listens on AF_VSOCK (port [`DEFAULT_PORT`]), which both VMMs expose to the host through
//! Firecracker's hybrid vsock protocol, and answers line-based requests. Version 1 of the
//! protocol knows `ping` (readiness); exec, file transfer and network bootstrap grow with the
//! kernel/agent work and are documented in banger's `docs/agent.md` as they land.
//!
//! Statically linked (`+crt-static`), with no dynamic dependencies at all, so the same binary
//! runs on glibc and musl guests and in images that lack a C library.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept, bind, listen, socket,
};

/// The vsock port the agent listens on unless `--port` says otherwise.
const DEFAULT_PORT: u32 = 10_789;
/// Protocol version, sent in every `ping` answer.
const PROTOCOL_VERSION: u32 = 1;

fn usage() -> String {
    format!(
        "usage: banger-agent [--port N] [--version]\n\nServes banger's guest protocol v{PROTOCOL_VERSION} on vsock port {DEFAULT_PORT}."
    )
}

fn main() -> ExitCode {
    let mut port = DEFAULT_PORT;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--version" => {
                println!(
                    "banger-agent {} (protocol {PROTOCOL_VERSION})",
                    env!("CARGO_PKG_VERSION")
                );
                return ExitCode::SUCCESS;
            }
            "--port" => match args.next().and_then(|value| value.parse().ok()) {
                Some(value) => port = value,
                None => {
                    eprintln!("banger-agent: --port needs a number\n{}", usage());
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{}", usage());
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("banger-agent: unknown argument `{other}`\n{}", usage());
                return ExitCode::from(2);
            }
        }
    }
    match serve(port) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("banger-agent: {message}");
            ExitCode::FAILURE
        }
    }
}

fn serve(port: u32) -> Result<(), String> {
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| format!("cannot create a vsock socket (is vsock loaded?): {errno}"))?;
    let address = VsockAddr::new(libc_vmaddr_cid_any(), port);
    bind(listener.as_raw_fd(), &address)
        .map_err(|errno| format!("cannot bind vsock port {port}: {errno}"))?;
    listen(&listener, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
        .map_err(|errno| format!("cannot listen on vsock port {port}: {errno}"))?;
    loop {
        let fd = match accept(listener.as_raw_fd()) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(format!("accept failed: {errno}")),
        };
        std::thread::spawn(move || handle(fd));
    }
}

/// VMADDR_CID_ANY: accept connections addressed to any of this guest's CIDs.
fn libc_vmaddr_cid_any() -> u32 {
    u32::MAX
}

fn handle(fd: std::os::fd::RawFd) {
    let stream = into_stream(fd);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut writer = stream;
    for line in BufReader::new(read_half).lines() {
        let Ok(line) = line else { return };
        let reply = match line.trim() {
            "ping" => format!(
                "ok banger-agent {} protocol {PROTOCOL_VERSION}",
                env!("CARGO_PKG_VERSION")
            ),
            "" => continue,
            other => format!("error unknown request `{other}`"),
        };
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

fn into_stream(fd: std::os::fd::RawFd) -> std::fs::File {
    std::fs::File::from(owned(fd))
}

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    #[allow(unsafe_code)]
    // SAFETY: `fd` comes straight from `accept` and is owned by no one else.
    unsafe {
        OwnedFd::from_raw_fd(fd)
    }
}
