//! banger-agent: the guest side of banger's host↔guest channel, and banger's initramfs init.
//!
//! Modes, chosen from the command line (and from being PID 1):
//! - **init** (`init.rs`): PID 1 of banger's initramfs. Mounts the root (optionally under an
//!   overlay), switches to it and execs the image's init, or stays PID 1 and serves.
//! - **serve** (default; `serve.rs`, `exec.rs`, `files.rs`, `mux.rs`): serves protocol v2
//!   (`protocol.rs`, specified in banger's `docs/agent.md`) on AF_VSOCK port
//!   [`DEFAULT_PORT`] and, if present, the virtio-serial port `banger.0`; `--listen-unix`
//!   serves a unix socket instead, so tests drive the real binary without a VM.
//! - **network-up** (`net.rs`): configures the network from `ip=` once, for images whose
//!   own tools will not.
//! - **first-boot** (`firstboot.rs`): what an image instance needs once (machine id, the
//!   OpenSSH server through the guest's package manager if `sshd` is missing, host keys). The
//!   agent as PID 1 starts it in the background; it can also be run by hand.
//!
//! - **settle**, **reidentify** (`identity.rs`): before banger saves a booted guest's memory,
//!   and in each VM restored from it.
//!
//! Statically linked (`+crt-static`) with no dynamic dependencies, so the same binary runs on
//! glibc and musl guests and in images that lack a C library.

mod cmdline;
mod console;
mod exec;
mod files;
mod firstboot;
mod identity;
mod init;
mod modules;
mod mux;
mod net;
mod ports;
mod protocol;
mod reaper;
mod serve;
mod service;
mod session;
mod stats;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use crate::mux::SerialSource;
use crate::protocol::{PROTOCOL_VERSION, Ready};
use crate::reaper::{Reaper, ShutdownHandler};
use crate::serve::Agent;

/// The vsock port the agent listens on unless `--port` says otherwise (banger's
/// `assets::AGENT_VSOCK_PORT`).
const DEFAULT_PORT: u32 = 10_789;

/// How long the agent, as a service, tries to listen on vsock before it serves without it.
const VSOCK_MODULES_WAIT: Duration = Duration::from_secs(10);

fn usage() -> String {
    format!(
        "usage: banger-agent [serve] [--port N] [--no-vsock] [--listen-unix PATH]
                    [--serial DEVICE | --no-serial | --serial-listen-unix PATH]
                    [--empty-tmp]   (empty /tmp once per boot before serving)
       banger-agent init          (as PID 1 of banger's initramfs; implied when PID 1)
       banger-agent network-up [--cmdline FILE]
       banger-agent first-boot [--quiet]
       banger-agent ports [--json]   (listening sockets and their processes)
       banger-agent stats [--json]   (uptime, load, memory, disk use)
       banger-agent settle [--timeout SECONDS]
                                     (wait for the boot to finish: before a snapshot)
       banger-agent reidentify < REQUEST.json
                                     (clock, entropy, MAC, machine id, host keys: after one)
       banger-agent session start|list|show|logs|attach|send|stop|kill ...
                                     (long-lived guest commands; `session --help`)
       banger-agent --version

Serves banger's guest protocol v{PROTOCOL_VERSION}: by default on vsock port {DEFAULT_PORT} and
the virtio-serial port banger.0 if there is one. Naming any transport serves only the named ones."
    )
}

/// Where to serve.
#[derive(Debug, Default)]
pub struct ServeOptions {
    vsock_port: Option<u32>,
    unix: Option<PathBuf>,
    serial: Option<SerialChoice>,
    /// Empty `/tmp` once per boot before serving (`--empty-tmp`: banger's systemd unit).
    empty_tmp: bool,
}

#[derive(Debug)]
enum SerialChoice {
    /// The `banger.0` port if the guest has one.
    Auto,
    Device(PathBuf),
    /// Tests: a unix socket whose connections stand in for the serial port's host side.
    ListenUnix(PathBuf),
}

impl ServeOptions {
    /// What a guest serves on: vsock and the serial port if present.
    pub fn guest_default() -> ServeOptions {
        ServeOptions {
            vsock_port: Some(DEFAULT_PORT),
            unix: None,
            serial: Some(SerialChoice::Auto),
            empty_tmp: false,
        }
    }

    fn parse(arguments: &[String]) -> Result<ServeOptions, String> {
        let mut options = ServeOptions::default();
        let mut explicit = false;
        let mut no_vsock = false;
        let mut no_serial = false;
        let mut empty_tmp = false;
        let mut arguments = arguments.iter();
        let value = |flag: &str, arguments: &mut std::slice::Iter<'_, String>| {
            arguments
                .next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        while let Some(argument) = arguments.next() {
            match argument.as_str() {
                "--port" => {
                    let port = value("--port", &mut arguments)?;
                    options.vsock_port = Some(
                        port.parse()
                            .map_err(|_| format!("--port {port}: not a number"))?,
                    );
                    explicit = true;
                }
                "--no-vsock" => no_vsock = true,
                "--listen-unix" => {
                    options.unix = Some(value("--listen-unix", &mut arguments)?.into());
                    explicit = true;
                }
                "--serial" => {
                    options.serial = Some(SerialChoice::Device(
                        value("--serial", &mut arguments)?.into(),
                    ));
                    explicit = true;
                }
                "--serial-listen-unix" => {
                    options.serial = Some(SerialChoice::ListenUnix(
                        value("--serial-listen-unix", &mut arguments)?.into(),
                    ));
                    explicit = true;
                }
                "--no-serial" => no_serial = true,
                "--empty-tmp" => empty_tmp = true,
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if !explicit {
            options = ServeOptions::guest_default();
        }
        if no_vsock {
            options.vsock_port = None;
        }
        if no_serial {
            options.serial = None;
        }
        options.empty_tmp = empty_tmp;
        Ok(options)
    }
}

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    // As PID 1 the agent is always init: the kernel passes the command line's unknown words
    // (`single`, whatever follows `--`) as arguments, and PID 1 must never exit.
    if init::is_pid1() {
        init::run();
    }
    let (command, rest) = match arguments.split_first() {
        Some((first, rest)) if !first.starts_with('-') => (first.as_str(), rest),
        _ => ("serve", arguments.as_slice()),
    };
    // Before the generic help check: `session start -- CMD --help` passes --help to CMD,
    // and sessions have exit codes of their own.
    if command == "session" {
        return session::command(rest);
    }
    let result = match command {
        _ if rest
            .iter()
            .any(|argument| argument == "-h" || argument == "--help") =>
        {
            println!("{}", usage());
            Ok(())
        }
        "serve" if rest.iter().any(|argument| argument == "--version") => {
            println!(
                "banger-agent {} (protocol {PROTOCOL_VERSION})",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        "serve" => ServeOptions::parse(rest).and_then(|options| serve_forever(options, None)),
        "init" => Err("init mode runs only as PID 1 (from banger's initramfs)".into()),
        "network-up" => network_up(rest),
        "first-boot" => firstboot::command(rest),
        "ports" => ports::command(rest),
        "stats" => stats::command(rest),
        "settle" => identity::settle_command(rest),
        "reidentify" => identity::reidentify_command(rest),
        other => Err(format!("unknown command `{other}`\n{}", usage())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("banger-agent: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Undoes signals ignored by whoever started the agent (`nohup`, a service manager, a CI
/// runner): ignored dispositions survive `exec`, so every guest command would inherit them.
/// The real-time signals libc reserves for itself cannot be changed and are left alone.
fn restore_default_signal_dispositions() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for candidate in Signal::iterator() {
        // SIGPIPE stays ignored: Rust's runtime set that up so a closed peer is an error,
        // not death, and std restores the default in every child it spawns.
        if matches!(
            candidate,
            Signal::SIGKILL | Signal::SIGSTOP | Signal::SIGPIPE
        ) {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no code of ours in signal context; the only
        // thread that exists yet is this one.
        #[allow(unsafe_code)]
        let previous = unsafe { signal(candidate, SigHandler::SigDfl) };
        if let Ok(previous) = previous
            && !matches!(previous, SigHandler::SigIgn)
        {
            // Put back whatever Rust's runtime or a library installed on purpose.
            #[allow(unsafe_code)]
            // SAFETY: re-installs the handler that was there a moment ago.
            let _ = unsafe { signal(candidate, previous) };
        }
    }
}

/// What the agent does only as the guest's PID 1 (`init.rs`).
pub struct Pid1 {
    /// Receives SIGTERM, SIGINT (Ctrl-Alt-Del) and SIGPWR.
    pub on_shutdown: ShutdownHandler,
    /// Called once the reaper runs and the transports listen, before serving: every process
    /// it starts must go through the reaper, and every thread it starts inherits the
    /// reaper's signal mask. It must return promptly; lasting work belongs on its own thread.
    pub on_start: Box<dyn FnOnce(&Reaper)>,
}

/// Listens on every requested transport and serves until all of them have failed.
pub fn serve_forever(options: ServeOptions, pid1: Option<Pid1>) -> Result<(), String> {
    restore_default_signal_dispositions();
    let (on_shutdown, on_start) = match pid1 {
        Some(Pid1 {
            on_shutdown,
            on_start,
        }) => (Some(on_shutdown), Some(on_start)),
        None => (None, None),
    };
    let is_pid1 = on_start.is_some();
    // First, while this is the only thread: the signal mask is inherited by every thread.
    let reaper =
        Reaper::start(on_shutdown).map_err(|error| format!("cannot start the reaper: {error}"))?;
    if options.empty_tmp {
        empty_tmp();
    }
    name_the_machine();
    let mut problems = Vec::new();
    // As PID 1 the initramfs has loaded the modules already; as a service, see
    // `listen_vsock_waiting`.
    let vsock_wait = if is_pid1 {
        Duration::ZERO
    } else {
        VSOCK_MODULES_WAIT
    };
    let vsock = match options.vsock_port {
        Some(port) => match serve::listen_vsock_waiting(port, vsock_wait) {
            Ok(listener) => Some((port, listener)),
            Err(error) => {
                problems.push(error.to_string());
                None
            }
        },
        None => None,
    };
    let unix = match &options.unix {
        Some(path) => Some(serve::listen_unix(path).map_err(|error| error.to_string())?),
        None => None,
    };
    let serial = match options.serial {
        Some(SerialChoice::Auto) => mux::find_serial_port().map(SerialSource::Device),
        Some(SerialChoice::Device(path)) => Some(SerialSource::Device(path)),
        Some(SerialChoice::ListenUnix(path)) => Some(SerialSource::Listener(
            serve::listen_unix(&path).map_err(|error| error.to_string())?,
        )),
        None => None,
    };
    let mut transports = Vec::new();
    if let Some((port, _)) = &vsock {
        transports.push(format!("vsock port {port}"));
    }
    if let Some(path) = &options.unix {
        transports.push(format!("unix {}", path.display()));
    }
    match &serial {
        Some(SerialSource::Device(path)) => transports.push(format!("serial {}", path.display())),
        Some(SerialSource::Listener(_)) => transports.push("serial over unix".into()),
        None => {}
    }
    if transports.is_empty() {
        problems.push("no transport to serve on".into());
        return Err(problems.join("; "));
    }
    for problem in &problems {
        console::warn(problem);
    }
    let boot = console::since_boot();
    let agent = Arc::new(Agent {
        reaper,
        ready: Ready {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: PROTOCOL_VERSION,
            kernel_release: init::kernel_release(),
            boot_ms: u64::try_from(boot.as_millis()).unwrap_or(u64::MAX),
            pid1: is_pid1,
        },
    });
    console::info(&format!("agent ready on {}", transports.join(", ")));
    // Under `Type=notify` systemd starts what is ordered after the agent only now.
    if let Ok(socket) = std::env::var(service::NOTIFY_SOCKET)
        && let Err(error) = service::notify_ready(&socket)
    {
        console::warn(&format!("cannot notify {socket}: {error}"));
    }
    if let Some(on_start) = on_start {
        on_start(&agent.reaper);
    }
    let (ended, endings) = mpsc::channel::<String>();
    let mut running = 0;
    let mut start = |name: &str, work: Box<dyn FnOnce() -> std::io::Result<()> + Send>| {
        let ended = ended.clone();
        let name = name.to_owned();
        let started = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let outcome = work();
                let _ = ended.send(match outcome {
                    Ok(()) => format!("{name} stopped"),
                    Err(error) => format!("{name} failed: {error}"),
                });
            });
        if started.is_ok() {
            running += 1;
        }
    };
    if let Some((_, listener)) = vsock {
        let agent = Arc::clone(&agent);
        start(
            "vsock",
            Box::new(move || serve::accept_vsock(agent, listener)),
        );
    }
    if let Some(listener) = unix {
        let agent = Arc::clone(&agent);
        start(
            "unix",
            Box::new(move || serve::accept_unix(agent, listener)),
        );
    }
    if let Some(source) = serial {
        let agent = Arc::clone(&agent);
        start("serial", Box::new(move || mux::serve_serial(agent, source)));
    }
    drop(ended);
    let mut failures = Vec::new();
    for _ in 0..running {
        match endings.recv() {
            Ok(message) => {
                console::warn(&message);
                failures.push(message);
            }
            Err(_) => break,
        }
    }
    Err(failures.join("; "))
}

/// Makes the VM's name (`banger.hostname=` on the kernel command line) the hostname, before
/// anything is served: a command run through the agent sees it at once.
fn name_the_machine() {
    let Ok(text) = std::fs::read_to_string("/proc/cmdline") else {
        return;
    };
    let cmdline = cmdline::Cmdline::parse(&text);
    let Some(name) = cmdline.value("banger.hostname") else {
        return;
    };
    if let Err(error) = identity::set_hostname(name, std::path::Path::new("/etc")) {
        console::warn(&format!("hostname: {error}"));
    }
}

/// `--empty-tmp`: a failure is reported and serving goes on, as it would have after
/// systemd-tmpfiles failed to empty `/tmp`.
fn empty_tmp() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    match service::empty_once_per_boot(
        std::path::Path::new(service::TMP),
        std::path::Path::new(service::TMP_EMPTIED_MARKER),
        &mountinfo,
    ) {
        Ok(service::Emptied::Now { removed, failed }) => {
            if removed > 0 {
                console::info(&format!("emptied {}: {removed} entries", service::TMP));
            }
            for problem in failed {
                console::warn(&format!("cannot remove {problem}"));
            }
        }
        Ok(service::Emptied::Already) => {}
        Err(error) => console::warn(&format!("cannot empty {}: {error}", service::TMP)),
    }
}

/// `network-up`: configures the interface from `ip=` unless systemd-networkd will.
fn network_up(arguments: &[String]) -> Result<(), String> {
    let cmdline_path = match arguments {
        [] => "/proc/cmdline".to_owned(),
        [flag, path] if flag == "--cmdline" => path.clone(),
        _ => return Err(format!("network-up takes only --cmdline FILE\n{}", usage())),
    };
    let text = std::fs::read_to_string(&cmdline_path)
        .map_err(|error| format!("cannot read {cmdline_path}: {error}"))?;
    let networkd_configured = std::fs::read_dir("/run/systemd/network").is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            entry
                .path()
                .extension()
                .is_some_and(|extension| extension == "network")
        })
    });
    if networkd_configured {
        // systemd-network-generator turned `ip=` into networkd configuration already.
        return Ok(());
    }
    let cmdline = cmdline::Cmdline::parse(&text);
    let Some(spec) = cmdline.value("ip") else {
        return Ok(());
    };
    let Some(ip) = cmdline::IpConfig::parse(spec)? else {
        return Ok(());
    };
    let interface = net::configure(&ip)?;
    console::info(&format!(
        "network {interface} {}/{}",
        ip.address, ip.prefix_len
    ));
    if !ip.dns.is_empty() {
        // The image's resolv.conf is whatever its build left (often the build host's,
        // unreachable from here); the resolver banger names is the one this network has.
        net::replace_resolv_conf(std::path::Path::new("/etc/resolv.conf"), &ip.dns)
            .map_err(|error| format!("cannot write /etc/resolv.conf: {error}"))?;
    }
    Ok(())
}
