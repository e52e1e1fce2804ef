//! `banger vm run|create|start|stop|restart|kill|delete|list|show|logs|ssh|prune`: a thin
//! client of the daemon, which owns the VMs. Commands in a guest run over its agent (`vm run
//! -- CMD`) or the system `ssh` (`vm ssh`, the shell of a bare `vm run`).

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::json;

use banger::daemon::client::DaemonClient;
use banger::daemon::protocol::{CreateVm, ErrorKind, Progress, Request, Response, VmInfo};
use banger::ops::graph::format_time_ms;
use banger::spec::{ByteSize, NetworkMode, PortForward};

use super::Context;
use super::exit::ExitStatus;
use super::printer::{human_bytes, human_duration};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM, boot it, and open a shell in it, or run CMD and exit with its code.
    #[command(
        long_about = "Create a VM, boot it and wait for it, then either open an SSH \
shell in it (no CMD) or run CMD through the guest agent, streaming its output, and exit with \
CMD's exit code.

A missing image or kernel is produced first (the default image is the catalog's \
debian-bookworm, with the kernel its catalog entry names), with progress on stderr. With --rm the \
VM is deleted afterwards, unless the guest never came up: then it is kept (stopped) so that \
`banger vm logs NAME` can show why.

With CMD, the exit status is CMD's own, or 125 when banger itself failed (the VM could not \
be made or reached), 126 when CMD cannot be executed and 127 when it is not found in the guest, \
as `docker run` has it.

Examples:
  banger vm run
  banger vm run --rm -- uname -r
  banger vm run --rm -e CI=1 -w /tmp -- sh -c 'echo $CI; pwd'
  banger vm run --name ci --memory 4G -- make test"
    )]
    Run(RunArgs),
    /// Run a command in a running VM through its agent, and exit with its code.
    #[command(
        long_about = "Run CMD in the running VM NAME through banger's guest agent (not SSH: it \
works with `--network none` too), streaming its output, and exit with CMD's own exit status; \
125 when banger itself failed (no such VM, not running, agent unreachable), 126 when CMD cannot \
be executed, 127 when it is not found in the guest.

Several CMD words are a program and its arguments, run directly; use `sh -c '...'` for a shell \
line. Standard input is forwarded only with -i. With -t the command runs on a pseudo-terminal \
of this terminal's size, following its resizes; with -it this terminal is in raw mode until \
the command ends (Ctrl-C goes to the guest).

Examples:
  banger vm exec box -- uname -r
  banger vm exec -it box -- top
  banger vm exec -e A=1 -w /tmp box -- sh -c 'echo $A; pwd'
  tar c src | banger vm exec -i box -- tar x -C /root"
    )]
    Exec(ExecArgs),
    /// Copy files or directories between the host and a running VM.
    #[command(
        long_about = "Copy a file or directory tree between the host and the running VM NAME, \
one side written NAME:/path (absolute in the guest), the other a host path, as `docker cp` has \
it: into an existing directory DST the source goes under its own name; a DST that does not \
exist becomes the copy; SRC/. copies a directory's contents. `-` as DST writes a tar stream to \
stdout, `-` as SRC extracts one from stdin into the guest directory DST.

Modes, times and symlinks are kept. Copies into the guest are owned by root (with -a, by the \
host's uid and gid); copies onto the host by you, without setuid/setgid bits, devices or \
FIFOs. What the guest sends is checked before it lands: entries that would leave the \
destination or write through a symlink are refused and nothing is written. A directory copied \
onto an existing one is merged into it. The guest needs `tar` and `sh` (busybox's will do).

Examples:
  banger vm cp ./src box:/root/src
  banger vm cp box:/var/log/app.log .
  banger vm cp box:/root/out/. ./results
  banger vm cp box:/etc - | tar t"
    )]
    Cp(super::copy::CpArgs),
    /// Create a VM (stopped, unless --start): its disks, its links to the image and kernel,
    /// its record.
    Create(CreateCommandArgs),
    /// Boot a stopped VM and wait until its agent answers.
    Start(StartArgs),
    /// Power a VM off cleanly through its agent (forced after 30 s, or -t).
    Stop {
        #[arg(add = super::complete::vm_names())]
        name: String,
        /// Seconds the guest gets to shut down before its VMM is stopped (0: at once).
        #[arg(short = 't', long = "time", value_name = "SECONDS", default_value_t = 30,
              value_parser = clap::value_parser!(u64).range(0..=banger::spec::MAX_TIMEOUT_SECS))]
        time: u64,
    },
    /// Stop a VM, then start it again.
    Restart(StartArgs),
    /// Change a stopped VM's vCPUs, memory or disk size (disks only grow).
    #[command(
        long_about = "Change a stopped VM's vCPUs, memory or disk size; the VM boots with them \
from its next start. --disk grows both of its disks, the writable layer and the /root work \
disk, file systems included (checked with e2fsck, grown with resize2fs: e2fsprogs is needed); \
disks never shrink. `banger up` makes its VM again when the shape differs from the \
Bangerfile's.

Examples:
  banger vm set box --vcpu 4 --memory 4G
  banger vm set box --disk 32G"
    )]
    Set(SetArgs),
    /// Stop a VM's VMM at once, with no guest shutdown.
    Kill {
        #[arg(add = super::complete::vm_names())]
        name: String,
    },
    /// Delete VMs: their disks, logs and records (a running VM only with -f).
    #[command(visible_alias = "rm")]
    Delete {
        #[arg(required = true, add = super::complete::vm_names())]
        names: Vec<String>,
        /// Delete running VMs too, killing them (no guest shutdown).
        #[arg(short, long)]
        force: bool,
    },
    /// List VMs with their state, spec and SSH address.
    #[command(visible_aliases = ["ls", "ps"])]
    List,
    /// Show one VM.
    #[command(visible_alias = "inspect")]
    Show {
        #[arg(add = super::complete::vm_names())]
        name: String,
    },
    /// Print a VM's serial console log (the guest's boot messages).
    #[command(
        long_about = "Print a VM's serial console log (the guest's boot messages). On \
a terminal, control characters from the guest are shown escaped (`\\u{1b}`) rather than obeyed; \
piped or redirected, the log's bytes are written as they are."
    )]
    Logs {
        #[arg(add = super::complete::vm_names())]
        name: String,
        /// Keep printing what the guest writes, until Ctrl-C.
        #[arg(short, long)]
        follow: bool,
        /// Start with the last N lines only (of the log's last 4 MiB).
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<usize>,
    },
    /// Open an SSH session in a running VM, or run CMD there.
    #[command(
        long_about = "Open an SSH session in a running VM as root, or run CMD there and \
exit with its code. Uses banger's own key and the VM's own known_hosts (no prompts).

One CMD argument is a shell line (`banger vm ssh box -- 'ls | wc -l'`); several are a command \
and its arguments, each passed as one word (`banger vm ssh box -- sh -c 'exit 7'`)."
    )]
    Ssh {
        #[arg(add = super::complete::vm_names())]
        name: String,
        /// The command to run instead of a shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Connect stdin and stdout to a VM's SSH server: the ProxyCommand of `ssh NAME.vm`.
    #[command(
        long_about = "Connect stdin and stdout to the SSH server of VM NAME, given as NAME.vm: the ProxyCommand that `banger ssh-config install` sets for `Host *.vm`, so that the system's ssh, scp and rsync reach banger's VMs by name. Waits up to a minute for the guest's sshd after a boot. Only port 22 is reached."
    )]
    Proxy {
        /// The SSH host name, NAME.vm.
        host: String,
        /// The port ssh asked for (22).
        #[arg(default_value_t = 22)]
        port: u16,
    },
    /// List the sockets listening in a running VM, with their processes.
    #[command(
        long_about = "List the sockets listening in a running VM: TCP sockets in LISTEN and \
bound, unconnected UDP sockets, each with its address, port, the processes holding it \
(pid/name) and the host address it is published on (`-p`), if any. Read by banger's guest \
agent from the guest's /proc, so it works in images without `ss` or `netstat`."
    )]
    Ports {
        #[arg(add = super::complete::vm_names())]
        name: String,
    },
    /// Show a running VM's resource use: its VMM's CPU and memory, its disks, the guest's own.
    #[command(
        long_about = "Show what a running VM uses: its VMM process's CPU (over one second, as \
a percentage of one core, and in all since it started) and resident memory, its two disks \
(bytes allocated on the host, of their size: they are sparse), and what the guest says of \
itself through banger's agent: uptime, load, processes, available memory and the use of its \
root file system and /root."
    )]
    Stats {
        #[arg(add = super::complete::vm_names())]
        name: String,
    },
    /// Long-lived commands in a running VM that outlive this command and the daemon.
    #[command(subcommand)]
    Session(super::session::SessionCommand),
    /// Delete every stopped VM (asks first unless -f).
    Prune {
        /// Do not ask.
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("change").required(true).multiple(true))]
pub struct SetArgs {
    #[arg(add = super::complete::vm_names())]
    name: String,
    /// Virtual CPUs.
    #[arg(long, group = "change", value_parser = clap::value_parser!(u32).range(1..=256))]
    vcpu: Option<u32>,
    /// Memory, e.g. `4G`, `1536M`.
    #[arg(long, group = "change", value_parser = ByteSize::parse)]
    memory: Option<ByteSize>,
    /// Both disks' size, e.g. `32G`: larger than now (they never shrink).
    #[arg(long, group = "change", value_parser = ByteSize::parse)]
    disk: Option<ByteSize>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's name (generated when absent; becomes its host name).
    #[arg(long)]
    name: Option<String>,
    /// The image (`banger image list`; a catalog name or OCI reference is pulled).
    #[arg(long, add = super::complete::image_names())]
    image: Option<String>,
    /// The kernel (default: the one the image names).
    #[arg(long, add = super::complete::kernel_names())]
    kernel: Option<String>,
    /// The VMM: `qemu` or `firecracker` (default: Firecracker where KVM works and banger runs
    /// as root, QEMU otherwise).
    #[arg(long, value_parser = ["qemu", "firecracker"])]
    backend: Option<String>,
    /// Virtual CPUs (default: config [vm_defaults], else host CPUs / 4, at least 2, at most 4).
    #[arg(long)]
    vcpu: Option<u32>,
    /// Memory, e.g. `2G`, `1536M` (default: config, else host RAM / 8, at most 8 GiB).
    #[arg(long, value_parser = ByteSize::parse)]
    memory: Option<ByteSize>,
    /// The VM's writable disk size, e.g. `8G` (sparse: it costs what is written).
    #[arg(long, value_parser = ByteSize::parse)]
    disk: Option<ByteSize>,
    /// The guest's network: `user` (rootless, the guest's SSH forwarded from a loopback
    /// port; a tap under Firecracker), `tap` (root: a tap on banger's bridge `banger0` with
    /// NAT, an address of its own and `NAME.vm` in the bridge's DNS) or `none` (no network
    /// device at all: commands still run through the agent, SSH cannot reach it)
    /// [default: user].
    #[arg(long, value_name = "MODE", value_parser = parse_network)]
    network: Option<NetworkMode>,
    /// Publish a guest port on the host: `[HOST_IP:]HOST_PORT:GUEST_PORT[/udp]` (repeatable).
    /// The host address defaults to 127.0.0.1; `0.0.0.0:8080:80` opens it to the network.
    #[arg(short = 'p', long, value_name = "PORTS", value_parser = PortForward::parse)]
    publish: Vec<PortForward>,
}

#[derive(Debug, Args)]
pub struct CreateCommandArgs {
    #[command(flatten)]
    create: CreateArgs,
    /// Start it too, and wait until its agent answers. Under QEMU with the `user` or `none`
    /// network it starts from a memory snapshot of the same image, kernel and shape booted
    /// before (saved by the first such start), made a new instance.
    #[arg(long)]
    start: bool,
    /// With --start: boot from scratch, neither restoring nor saving a snapshot.
    #[arg(long, requires = "start")]
    cold: bool,
    /// With --start: seconds to wait for the guest to come up (at most a week).
    #[arg(long, requires = "start", value_name = "SECONDS", value_parser = timeout_secs())]
    timeout: Option<u64>,
}

/// `--network`: `tap`'s root check is the daemon's (it is the one that makes the bridge).
fn parse_network(text: &str) -> Result<NetworkMode, String> {
    NetworkMode::from_name(text)
        .ok_or_else(|| format!("`{text}` is not a network mode: use `user`, `tap` or `none`"))
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    create: CreateArgs,
    /// Delete the VM afterwards (kept if it never came up, for `vm logs`).
    #[arg(long)]
    rm: bool,
    /// Boot from scratch, neither restoring nor saving a snapshot. Without it, under QEMU with
    /// the `user` or `none` network, the VM starts from a memory snapshot of the same image,
    /// kernel and shape booted before (saved by the first such run), made a new instance:
    /// its own clock, entropy, MAC, machine id and SSH host keys.
    #[arg(long)]
    cold: bool,
    /// Seconds to wait for the guest to come up (at most a week).
    #[arg(long, default_value_t = 180, value_name = "SECONDS", value_parser = timeout_secs())]
    timeout: u64,
    #[command(flatten)]
    guest: GuestCommandArgs,
    /// The command to run in the guest (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

/// How a guest command runs: `vm exec` and `vm run -- CMD`.
#[derive(Debug, Args)]
pub struct GuestCommandArgs {
    /// Set NAME to VALUE for the command (repeatable); `-e NAME` passes this shell's NAME.
    #[arg(short = 'e', long = "env", value_name = "NAME[=VALUE]", value_parser = parse_env)]
    pub(super) env: Vec<(String, String)>,
    /// The command's working directory in the guest (absolute; default `/`).
    #[arg(short = 'w', long = "workdir", value_name = "DIR", value_parser = parse_workdir)]
    pub(super) workdir: Option<String>,
    /// Run the command on a pseudo-terminal of this terminal's size, resized with it; with
    /// input forwarded, this terminal is in raw mode meanwhile.
    #[arg(short = 't', long)]
    pub(super) tty: bool,
}

/// `-e NAME=VALUE`, or `-e NAME` for this process's value of NAME.
fn parse_env(text: &str) -> Result<(String, String), String> {
    let (name, value) = match text.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (text, None),
    };
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "`{name}` is not an environment variable name (letters, digits and `_`, not \
             starting with a digit)"
        ));
    }
    let value = match value {
        Some(value) => value.to_owned(),
        None => std::env::var(name)
            .map_err(|_| format!("`-e {name}` passes this shell's {name}, which is not set"))?,
    };
    Ok((name.to_owned(), value))
}

fn parse_workdir(text: &str) -> Result<String, String> {
    if text.starts_with('/') {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "`{text}` is not an absolute path: the guest command's directory must be"
        ))
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The running VM.
    #[arg(add = super::complete::vm_names())]
    name: String,
    #[command(flatten)]
    guest: GuestCommandArgs,
    /// Forward this process's standard input to the command (otherwise it reads nothing).
    #[arg(short, long)]
    interactive: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    #[arg(add = super::complete::vm_names())]
    name: String,
    /// Seconds to wait for the guest to come up (at most a week).
    #[arg(long, default_value_t = 180, value_name = "SECONDS", value_parser = timeout_secs())]
    timeout: u64,
}

/// Seconds from 1 to [`banger::spec::MAX_TIMEOUT_SECS`].
pub(super) fn timeout_secs() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(1..=banger::spec::MAX_TIMEOUT_SECS)
}

pub fn run(context: &mut Context, command: &VmCommand) -> anyhow::Result<ExitStatus> {
    let runtime = super::runtime()?;
    let result = run_on(context, &runtime, command);
    // tokio reads stdin on a blocking thread that a terminal never lets go of (no end of file
    // comes after `vm exec -it` or `session attach`), and dropping the runtime would wait for
    // it: everything this command awaited is done, so leave the thread to the exit.
    runtime.shutdown_background();
    result
}

fn run_on(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    command: &VmCommand,
) -> anyhow::Result<ExitStatus> {
    let mut session = Session::connect(context, runtime)?;
    match command {
        VmCommand::Run(args) if !args.command.is_empty() => {
            let result = vm_run(context, runtime, &mut session, args);
            Ok(guest_command_status(context, result))
        }
        VmCommand::Run(args) => vm_run(context, runtime, &mut session, args),
        VmCommand::Exec(args) => {
            let result = exec(context, runtime, &mut session, args);
            Ok(guest_command_status(context, result))
        }
        VmCommand::Create(args) => {
            let mut create = create_request(&args.create, args.start, args.timeout);
            create.warm_start = args.start && !args.cold;
            let request = Request::VmCreate(create);
            let done = if args.start { "running" } else { "created" };
            one_vm(context, runtime, &mut session, &request, done)
        }
        VmCommand::Start(args) => {
            let request = Request::VmStart {
                name: args.name.clone(),
                timeout_secs: Some(args.timeout),
            };
            one_vm(context, runtime, &mut session, &request, "running")
        }
        VmCommand::Stop { name, time } => {
            let request = Request::VmStop {
                name: name.clone(),
                timeout_secs: Some(*time),
            };
            one_vm(context, runtime, &mut session, &request, "stopped")
        }
        VmCommand::Restart(args) => {
            let request = Request::VmRestart {
                name: args.name.clone(),
                timeout_secs: Some(args.timeout),
            };
            one_vm(context, runtime, &mut session, &request, "running")
        }
        VmCommand::Set(args) => {
            let request = Request::VmSet(banger::daemon::protocol::SetVm {
                name: args.name.clone(),
                vcpus: args.vcpu,
                memory_mib: args.memory.map(|size| size.bytes() >> 20),
                disk_bytes: args.disk.map(|size| size.bytes()),
            });
            one_vm(context, runtime, &mut session, &request, "updated")
        }
        VmCommand::Kill { name } => {
            let request = Request::VmKill { name: name.clone() };
            one_vm(context, runtime, &mut session, &request, "killed")
        }
        VmCommand::Delete { names, force } => delete(context, runtime, &mut session, names, *force),
        VmCommand::List => list(context, runtime, &mut session),
        VmCommand::Show { name } => show(context, runtime, &mut session, name),
        VmCommand::Logs { name, follow, tail } => {
            logs(context, runtime, &mut session, name, *follow, *tail)
        }
        VmCommand::Ssh { name, command } => ssh(context, runtime, &mut session, name, command),
        VmCommand::Cp(args) => super::copy::cp(context, runtime, &mut session, args),
        VmCommand::Session(command) => super::session::run(context, runtime, &mut session, command),
        VmCommand::Ports { name } => ports(context, runtime, &mut session, name),
        VmCommand::Stats { name } => stats(context, runtime, &mut session, name),
        VmCommand::Prune { force } => prune(context, runtime, &mut session, *force),
        VmCommand::Proxy { host, port } => proxy(context, runtime, &mut session, host, *port),
    }
}

/// A connection to the daemon (started if need be) and how to show its progress.
pub(super) struct Session {
    client: DaemonClient,
    reporter: Box<dyn banger::engine::Reporter>,
}

/// The daemon said no: its message is printed once, the exit status follows its kind.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refused {
    pub(super) fn status(&self) -> ExitStatus {
        match self.kind {
            ErrorKind::Environment => ExitStatus::Failure,
            _ => ExitStatus::UserError,
        }
    }
}

impl Session {
    pub(super) fn connect(
        context: &mut Context,
        runtime: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Self> {
        let socket = context.paths()?.socket();
        let launcher = super::daemon::launcher(context)?;
        let client = runtime.block_on(DaemonClient::connect_or_start(&socket, &launcher))?;
        Ok(Session {
            client,
            reporter: super::reporters::for_printer(&context.printer),
        })
    }

    /// Sends `request`, rendering its progress; a refusal comes back as [`Refused`].
    pub(super) fn call(
        &mut self,
        context: &Context,
        runtime: &tokio::runtime::Runtime,
        request: &Request,
    ) -> anyhow::Result<Result<Response, Refused>> {
        let printer = context.printer.clone();
        let reporter = &self.reporter;
        let exchange =
            self.client.request_with_events(request, |event| {
                match serde_json::from_value::<Progress>(event) {
                    Ok(Progress::Engine(event)) => reporter.report(&event),
                    Ok(Progress::Note(text)) if printer.json => {
                        let _ = printer.record("vm_progress", json!({ "message": text }));
                    }
                    Ok(Progress::Note(text)) => printer.info(&text),
                    Ok(Progress::Detail(text)) => printer.detail("vm_progress", &text),
                    Err(_) => {}
                }
            });
        // Ctrl-C is caught, not left to its default action: the exit is 130 whatever the
        // shell did with SIGINT (a script's background job inherits it ignored).
        let response = runtime.block_on(async {
            tokio::select! {
                response = exchange => response.map(Some),
                _ = tokio::signal::ctrl_c() => Ok(None),
            }
        })?;
        let Some(response) = response else {
            return Err(super::exit::Interrupted(
                "interrupted; the daemon finishes the request on its own (a `vm run --rm` VM is \
                 deleted once it is up)"
                    .to_owned(),
            )
            .into());
        };
        Ok(match response {
            Response::Error { kind, message } => Err(Refused { kind, message }),
            other => Ok(other),
        })
    }

    pub(super) fn vm(
        &mut self,
        context: &Context,
        runtime: &tokio::runtime::Runtime,
        request: &Request,
    ) -> anyhow::Result<Result<VmInfo, Refused>> {
        Ok(match self.call(context, runtime, request)? {
            Ok(Response::Vm(info)) => Ok(*info),
            Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
            Err(refused) => Err(refused),
        })
    }
}

fn create_request(args: &CreateArgs, start: bool, timeout: Option<u64>) -> CreateVm {
    CreateVm {
        name: args.name.clone(),
        image: args.image.clone(),
        kernel: args.kernel.clone(),
        backend: args.backend.clone(),
        vcpus: args.vcpu,
        memory_mib: args.memory.map(|size| size.bytes() >> 20),
        disk_bytes: args.disk.map(|size| size.bytes()),
        network: args.network,
        ports: args.publish.clone(),
        start,
        timeout_secs: timeout,
        remove_if_abandoned: false,
        warm_start: false,
    }
}

pub(super) fn refused(context: &Context, refused: &Refused) -> ExitStatus {
    context.printer.error(&refused.message);
    refused.status()
}

fn vm_json(info: &VmInfo) -> serde_json::Value {
    json!(info)
}

fn one_vm(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    request: &Request,
    verb: &str,
) -> anyhow::Result<ExitStatus> {
    let info = match session.vm(context, runtime, request)? {
        Ok(info) => info,
        Err(error) => return Ok(refused(context, &error)),
    };
    let printer = &context.printer;
    if printer.json {
        printer.record("vm", vm_json(&info))?;
    } else {
        printer.data(&format!("{}  {verb}\n", info.name))?;
    }
    Ok(ExitStatus::Success)
}

fn delete(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    names: &[String],
    force: bool,
) -> anyhow::Result<ExitStatus> {
    let mut status = ExitStatus::Success;
    for name in names {
        let request = Request::VmDelete {
            name: name.clone(),
            force,
        };
        match session.call(context, runtime, &request)? {
            Ok(_) => {
                let printer = &context.printer;
                if printer.json {
                    printer.record("vm_deleted", json!({ "name": name }))?;
                } else {
                    printer.data(&format!("{name}  deleted\n"))?;
                }
            }
            Err(error) => status = refused(context, &error),
        }
    }
    Ok(status)
}

fn list_vms(
    context: &Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
) -> anyhow::Result<Result<Vec<VmInfo>, Refused>> {
    Ok(match session.call(context, runtime, &Request::VmList)? {
        Ok(Response::Vms(vms)) => Ok(vms),
        Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
        Err(refused) => Err(refused),
    })
}

fn list(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
) -> anyhow::Result<ExitStatus> {
    let vms = match list_vms(context, runtime, session)? {
        Ok(vms) => vms,
        Err(error) => return Ok(refused(context, &error)),
    };
    let printer = &context.printer;
    if printer.json {
        for vm in &vms {
            printer.record("vm", vm_json(vm))?;
        }
        return Ok(ExitStatus::Success);
    }
    if vms.is_empty() {
        printer.info("no VMs; `banger vm run` makes one");
        return Ok(ExitStatus::Success);
    }
    let rows: Vec<[String; 7]> = vms
        .iter()
        .map(|vm| {
            [
                vm.name.clone(),
                vm.state.clone(),
                vm.image.clone(),
                vm.spec.clone(),
                ssh_address(vm).unwrap_or_else(|| "-".to_owned()),
                published(&vm.ports),
                format_time_ms(vm.created_ms),
            ]
        })
        .collect();
    printer.data(&super::table(
        &["NAME", "STATE", "IMAGE", "SPEC", "SSH", "PORTS", "CREATED"],
        &rows,
    ))?;
    Ok(ExitStatus::Success)
}

/// Published ports as `docker ps` shows them: `127.0.0.1:8080->80/tcp`, comma-separated.
fn published(ports: &[PortForward]) -> String {
    if ports.is_empty() {
        return "-".to_owned();
    }
    ports
        .iter()
        .map(|port| {
            format!(
                "{}:{}->{}/{}",
                port.host_ip,
                port.host_port,
                port.guest_port,
                port.protocol.as_str()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn ssh_address(vm: &VmInfo) -> Option<String> {
    Some(format!("{}:{}", vm.ssh_host.as_ref()?, vm.ssh_port?))
}

pub(super) fn show_vm(
    context: &Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    name: &str,
) -> anyhow::Result<Result<VmInfo, Refused>> {
    let request = Request::VmShow {
        name: name.to_owned(),
    };
    session.vm(context, runtime, &request)
}

fn show(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    name: &str,
) -> anyhow::Result<ExitStatus> {
    let vm = match show_vm(context, runtime, session, name)? {
        Ok(vm) => vm,
        Err(error) => return Ok(refused(context, &error)),
    };
    let printer = &context.printer;
    if printer.json {
        printer.record("vm", vm_json(&vm))?;
        return Ok(ExitStatus::Success);
    }
    printer.data(&format!(
        "name:     {}\nstate:    {}{}\nimage:    {}\nkernel:   {}\nbackend:  {}\nspec:     {}\n\
         network:  {}\nports:    {}\nssh:      {}\nconsole:  {}\ndisks:    {}\ncreated:  {}\n",
        vm.name,
        vm.state,
        vm.pid
            .map(|pid| format!(" (pid {pid})"))
            .unwrap_or_default(),
        vm.image,
        vm.kernel,
        vm.backend,
        vm.spec,
        match &vm.address {
            Some(address) => format!(
                "{} ({address} on {})",
                vm.network,
                banger::privileged::bridge::BRIDGE
            ),
            None => vm.network.to_string(),
        },
        published(&vm.ports),
        ssh_address(&vm).unwrap_or_else(|| "-".to_owned()),
        vm.console_log,
        vm.dir,
        format_time_ms(vm.created_ms),
    ))?;
    Ok(ExitStatus::Success)
}

fn logs(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    name: &str,
    follow: bool,
    tail: Option<usize>,
) -> anyhow::Result<ExitStatus> {
    let vm = match show_vm(context, runtime, session, name)? {
        Ok(vm) => vm,
        Err(error) => return Ok(refused(context, &error)),
    };
    let path = Path::new(&vm.console_log);
    if !follow && !path.exists() {
        context
            .printer
            .info(&format!("VM `{name}` has not booted yet: no console log"));
        return Ok(ExitStatus::Success);
    }
    show_log_file(path, follow, tail)
}

/// Prints the log at `path` (its last `tail` lines, looked for in its last 4 MiB), and with
/// `follow` keeps printing what is appended until Ctrl-C, starting over when the file is
/// truncated (a VM's restart) or replaced (a rotation). On a terminal, control characters are
/// shown escaped: a guest's escape sequences must not drive the host's terminal.
pub(super) fn show_log_file(
    path: &Path,
    follow: bool,
    tail: Option<usize>,
) -> anyhow::Result<ExitStatus> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::MetadataExt;
    /// How far back `--tail` looks for its lines.
    const TAIL_WINDOW: u64 = 4 << 20;
    let read_error = || format!("cannot read {}", path.display());
    let open = || -> anyhow::Result<Option<std::fs::File>> {
        match std::fs::File::open(path) {
            Ok(file) => Ok(Some(file)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && follow => Ok(None),
            Err(error) => Err(error).with_context(read_error),
        }
    };
    let mut file = open()?;
    let mut stdout = std::io::stdout().lock();
    let terminal = stdout.is_terminal();
    let mut buffer = Vec::new();
    if let Some(open_file) = file.as_mut() {
        if let Some(lines) = tail {
            let size = open_file.metadata().with_context(read_error)?.len();
            open_file
                .seek(std::io::SeekFrom::Start(size.saturating_sub(TAIL_WINDOW)))
                .with_context(read_error)?;
            open_file
                .read_to_end(&mut buffer)
                .with_context(read_error)?;
            let body = buffer.strip_suffix(b"\n").unwrap_or(&buffer);
            let start = body
                .iter()
                .enumerate()
                .rev()
                .filter(|(_, byte)| **byte == b'\n')
                .nth(lines.saturating_sub(1))
                .map_or(0, |(at, _)| at + 1);
            let start = if lines == 0 { buffer.len() } else { start };
            buffer.drain(..start);
        } else {
            open_file
                .read_to_end(&mut buffer)
                .with_context(read_error)?;
        }
    }
    loop {
        let shown = if terminal {
            let text = String::from_utf8_lossy(&buffer).replace("\r\n", "\n");
            banger::error::printable(&text).into_bytes()
        } else {
            std::mem::take(&mut buffer)
        };
        if stdout
            .write_all(&shown)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(ExitStatus::Success);
        }
        if !follow {
            return Ok(ExitStatus::Success);
        }
        std::thread::sleep(Duration::from_millis(200));
        buffer.clear();
        let on_disk = std::fs::metadata(path).ok();
        let Some(open_file) = file.as_mut() else {
            file = open()?;
            if let Some(open_file) = file.as_mut() {
                open_file
                    .read_to_end(&mut buffer)
                    .with_context(read_error)?;
            }
            continue;
        };
        let held = open_file.metadata().with_context(read_error)?;
        let replaced = on_disk
            .as_ref()
            .is_some_and(|meta| (meta.dev(), meta.ino()) != (held.dev(), held.ino()));
        if replaced {
            // Rotated: what was appended to the old file first, then the new one.
            open_file
                .read_to_end(&mut buffer)
                .with_context(read_error)?;
            file = open()?;
        } else if held.len() < open_file.stream_position().unwrap_or(0) {
            open_file.seek(std::io::SeekFrom::Start(0))?;
        }
        if let Some(open_file) = file.as_mut() {
            open_file
                .read_to_end(&mut buffer)
                .with_context(read_error)?;
        }
    }
}

/// The `ssh` argv for a running VM.
fn ssh_argv(
    context: &mut Context,
    vm: &VmInfo,
    command: &[String],
) -> anyhow::Result<Option<Vec<String>>> {
    let (Some(host), Some(port)) = (&vm.ssh_host, vm.ssh_port) else {
        return Ok(None);
    };
    let identity = banger::ssh::SshIdentity::ensure(&context.paths()?.state_dir)?;
    let target = banger::ssh::SshTarget {
        host: host.clone(),
        port,
        user: "root".to_owned(),
        known_hosts: vm.known_hosts.clone().into(),
    };
    let command = banger::ssh::remote_command(command);
    Ok(Some(banger::ssh::ssh_argv(
        &identity, &target, &command, false,
    )))
}

pub(super) fn ssh(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    name: &str,
    command: &[String],
) -> anyhow::Result<ExitStatus> {
    use std::os::unix::process::CommandExt;
    let vm = match show_vm(context, runtime, session, name)? {
        Ok(vm) => vm,
        Err(error) => return Ok(refused(context, &error)),
    };
    if vm.network == NetworkMode::None {
        context.printer.error(&no_network(name));
        return Ok(ExitStatus::UserError);
    }
    let Some(argv) = ssh_argv(context, &vm, command)? else {
        return Ok(not_running(context, name));
    };
    wait_for_sshd(context, runtime, &vm);
    let error = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
    Err(error).with_context(|| format!("cannot run {}", argv.join(" ")))
}

/// CPU time (user + system, in clock ticks) and resident bytes of process `pid`.
fn process_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields resume after the command name's last `)`: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((ticks, rss_kib * 1024))
}

/// `vm stats NAME`.
fn stats(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    name: &str,
) -> anyhow::Result<ExitStatus> {
    use std::os::unix::fs::MetadataExt;
    let vm = match show_vm(context, runtime, session, name)? {
        Ok(vm) => vm,
        Err(error) => return Ok(refused(context, &error)),
    };
    let (Some(pid), Some(agent)) = (vm.pid, vm.agent.as_ref()) else {
        return Ok(not_running(context, name));
    };
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|ticks| *ticks > 0)
        .unwrap_or(100) as f64;
    let started = std::time::Instant::now();
    let before = process_usage(pid);
    // The guest is asked while the CPU sample runs; the sample lasts a second at least.
    let endpoint = agent.endpoint();
    let guest = runtime.block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (mut channel, _) = endpoint.wait_ready(deadline).await?;
        let stats = channel.stats().await;
        let elapsed = started.elapsed();
        if elapsed < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_secs(1) - elapsed).await;
        }
        stats
    });
    let elapsed = started.elapsed().as_secs_f64();
    let after = process_usage(pid);
    let (Some((ticks_before, _)), Some((ticks_after, rss_bytes))) = (before, after) else {
        context.printer.error(&format!(
            "VM `{name}`'s VMM (pid {pid}) is gone; `banger vm show {name}` says what it is now"
        ));
        return Ok(ExitStatus::UserError);
    };
    let cpu_percent =
        ticks_after.saturating_sub(ticks_before) as f64 / ticks_per_second / elapsed * 100.0;
    let cpu_seconds = ticks_after as f64 / ticks_per_second;
    let guest = match guest {
        Ok(guest) => Some(guest),
        Err(banger::guest::GuestError::AgentTooOld { .. }) => {
            context.printer.warn(&format!(
                "the guest agent in VM `{name}` predates `vm stats` (image `{}`): only the \
                 host's figures are shown",
                vm.image
            ));
            None
        }
        Err(error) => {
            return Err(error).with_context(|| format!("cannot ask VM `{name}` for its figures"));
        }
    };
    let disks = banger::vm::storage::VmDisks::in_dir(Path::new(&vm.dir));
    let disk_use: Vec<(String, u64, u64)> = [&disks.overlay, &disks.work]
        .into_iter()
        .filter_map(|path| {
            let metadata = std::fs::metadata(path).ok()?;
            let name = path.file_name()?.to_string_lossy().into_owned();
            Some((name, metadata.blocks() * 512, metadata.len()))
        })
        .collect();
    let printer = &context.printer;
    if printer.json {
        printer.record(
            "vm_stats",
            json!({
                "name": vm.name,
                "vmm": {
                    "pid": pid,
                    "cpu_percent": cpu_percent,
                    "cpu_seconds": cpu_seconds,
                    "rss_bytes": rss_bytes,
                },
                "disks": disk_use.iter().map(|(name, allocated, size)| json!({
                    "name": name,
                    "allocated_bytes": allocated,
                    "size_bytes": size,
                })).collect::<Vec<_>>(),
                "guest": guest,
            }),
        )?;
        return Ok(ExitStatus::Success);
    }
    let mut text = format!(
        "vmm:     pid {pid} · cpu {cpu_percent:.1}% of a core now, {cpu_seconds:.1} s in all · \
         {} resident\ndisks:   {}\n",
        human_bytes(rss_bytes),
        disk_use
            .iter()
            .map(|(name, allocated, size)| format!(
                "{name} {} of {}",
                human_bytes(*allocated),
                human_bytes(*size)
            ))
            .collect::<Vec<_>>()
            .join(" · ")
    );
    if let Some(guest) = &guest {
        text.push_str(&format!(
            "guest:   up {} · load {:.2} {:.2} {:.2} · {} processes\nmemory:  {} available of {}\n",
            human_duration(Duration::from_secs_f64(guest.uptime_secs.max(0.0))),
            guest.load[0],
            guest.load[1],
            guest.load[2],
            guest.processes,
            human_bytes(guest.memory_available_bytes),
            human_bytes(guest.memory_total_bytes),
        ));
        for filesystem in &guest.filesystems {
            text.push_str(&format!(
                "{:<9}{} used of {}\n",
                format!("{}:", filesystem.mount),
                human_bytes(filesystem.used_bytes),
                human_bytes(filesystem.total_bytes)
            ));
        }
    }
    printer.data(&text)?;
    Ok(ExitStatus::Success)
}

/// `vm ports NAME`: the guest's listeners, from its agent.
fn ports(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    name: &str,
) -> anyhow::Result<ExitStatus> {
    let (vm, endpoint) = match running_agent(context, runtime, session, name)? {
        Ok(running) => running,
        Err(status) => return Ok(status),
    };
    let listeners = runtime.block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (mut channel, _) = endpoint.wait_ready(deadline).await?;
        channel.listeners().await
    });
    let listeners = match listeners {
        Ok(listeners) => listeners,
        Err(banger::guest::GuestError::AgentTooOld { .. }) => {
            context.printer.error(&format!(
                "the guest agent in VM `{name}` predates `vm ports` (image `{image}`); \
                 `banger image pull {image}` brings the current agent into the image, and VMs \
                 created from it afterwards can list their ports",
                image = vm.image
            ));
            return Ok(ExitStatus::UserError);
        }
        Err(error) => {
            return Err(error).with_context(|| format!("cannot list the ports of VM `{name}`"));
        }
    };
    let published_on = |listener: &banger::guest::Listener| -> Vec<String> {
        vm.ports
            .iter()
            .filter(|port| {
                port.guest_port == listener.port && port.protocol.as_str() == listener.protocol
            })
            .map(|port| format!("{}:{}", port.host_ip, port.host_port))
            .collect()
    };
    let printer = &context.printer;
    if printer.json {
        for listener in &listeners {
            printer.record(
                "listener",
                json!({
                    "protocol": listener.protocol,
                    "address": listener.address,
                    "port": listener.port,
                    "processes": listener.processes,
                    "published": published_on(listener),
                }),
            )?;
        }
        return Ok(ExitStatus::Success);
    }
    if listeners.is_empty() {
        printer.info(&format!("nothing listens in VM `{name}`"));
        return Ok(ExitStatus::Success);
    }
    let rows: Vec<[String; 5]> = listeners
        .iter()
        .map(|listener| {
            let processes: Vec<String> = listener
                .processes
                .iter()
                .map(|process| format!("{}/{}", process.pid, process.name))
                .collect();
            let published = published_on(listener);
            [
                listener.protocol.clone(),
                listener.address.to_string(),
                listener.port.to_string(),
                if processes.is_empty() {
                    "-".to_owned()
                } else {
                    processes.join(",")
                },
                if published.is_empty() {
                    "-".to_owned()
                } else {
                    published.join(", ")
                },
            ]
        })
        .collect();
    printer.data(&super::table(
        &["PROTO", "ADDRESS", "PORT", "PROCESS", "PUBLISHED"],
        &rows,
    ))?;
    Ok(ExitStatus::Success)
}

/// Says that VM `name` is not running (for commands that need it running): exit 1.
/// The agent of running VM `name`, or the exit status of the refusal already printed (no
/// such VM, not running).
pub(super) fn running_agent(
    context: &Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    name: &str,
) -> anyhow::Result<Result<(VmInfo, banger::guest::GuestEndpoint), ExitStatus>> {
    let vm = match show_vm(context, runtime, session, name)? {
        Ok(vm) => vm,
        Err(error) => return Ok(Err(refused(context, &error))),
    };
    match vm.agent.as_ref().filter(|_| vm.state == "running") {
        Some(agent) => {
            let endpoint = agent.endpoint();
            Ok(Ok((vm, endpoint)))
        }
        None => Ok(Err(not_running(context, name))),
    }
}

/// Connects to `endpoint` and says hello, waiting up to 30 s (a guest just booted may not
/// listen yet).
pub(super) async fn agent_channel(
    endpoint: &banger::guest::GuestEndpoint,
    name: &str,
) -> anyhow::Result<banger::guest::GuestChannel> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (channel, _) = endpoint
        .wait_ready(deadline)
        .await
        .with_context(|| format!("cannot reach the agent of VM `{name}`"))?;
    Ok(channel)
}

pub(super) fn not_running(context: &Context, name: &str) -> ExitStatus {
    context.printer.error(&format!(
        "VM `{name}` is not running; start it with `banger vm start {name}`"
    ));
    ExitStatus::UserError
}

/// Why SSH cannot reach VM `name`: it has no network device (connecting would only hang).
fn no_network(name: &str) -> String {
    format!(
        "VM `{name}` has no network (network mode `none`), so SSH cannot reach it; a VM made \
         with `--network user` (or `[vm] network = \"user\"` in a Bangerfile) can be reached"
    )
}

/// `ssh NAME.vm`'s ProxyCommand: the bytes of the VM's SSH server on stdin and stdout.
fn proxy(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    host: &str,
    port: u16,
) -> anyhow::Result<ExitStatus> {
    let name = banger::ops::ssh_config::vm_name_of_host(host)?;
    if port != 22 {
        context.printer.error(&format!(
            "`banger vm proxy` reaches the SSH server of a VM (port 22), not port {port}"
        ));
        return Ok(ExitStatus::UserError);
    }
    let vm = match show_vm(context, runtime, session, &name)? {
        Ok(vm) => vm,
        Err(error) => return Ok(refused(context, &error)),
    };
    if vm.network == NetworkMode::None {
        context.printer.error(&no_network(&name));
        return Ok(ExitStatus::UserError);
    }
    let (Some(address), Some(ssh_port)) = (&vm.ssh_host, vm.ssh_port) else {
        return Ok(not_running(context, &name));
    };
    let Some((stream, greeting)) = connect_when_sshd_answers(address, ssh_port) else {
        context.printer.error(&format!(
            "the SSH server of VM `{name}` at {address}:{ssh_port} did not answer within 60 s; \
             `banger vm logs {name}` shows its console"
        ));
        return Ok(ExitStatus::Failure);
    };
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(&greeting)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(ExitStatus::Success);
        }
    }
    splice_stdio(stream)?;
    Ok(ExitStatus::Success)
}

/// A connection to `host:port` on which the server has said something (its SSH version
/// line), with what it said, retried for up to a minute. Waiting on the very connection that
/// is then spliced, not on a probe before it, spares the guest's sshd a second connection
/// (a fork and re-exec, slow under TCG). A connection closed before any byte is retried: a
/// booting guest's forwarded port accepts and closes while nothing listens yet.
fn connect_when_sshd_answers(host: &str, port: u16) -> Option<(std::net::TcpStream, Vec<u8>)> {
    use std::io::Read;
    use std::net::ToSocketAddrs;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let address = (host, port).to_socket_addrs().ok()?.next()?;
    let mut greeting = vec![0u8; 4096];
    while std::time::Instant::now() < deadline {
        if let Ok(mut stream) =
            std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
        {
            let _ = stream.set_nodelay(true);
            if stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .is_ok()
                && let Ok(read @ 1..) = stream.read(&mut greeting)
                && stream.set_read_timeout(None).is_ok()
            {
                greeting.truncate(read);
                return Some((stream, greeting));
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    None
}

/// Copies stdin to `stream` and `stream` to stdout until the server closes. Plain threads
/// and blocking I/O: a read of stdin cannot be cancelled, so the stdin side is left behind
/// when the server is done, and ends with the process.
fn splice_stdio(stream: std::net::TcpStream) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut upstream = stream.try_clone()?;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if upstream.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    let mut downstream = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match downstream.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error).context("reading from the VM's SSH server"),
        };
        // Flushed at once: stdout is line-buffered, and the SSH protocol is not lines.
        if stdout
            .write_all(&buffer[..read])
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(());
        }
    }
}

fn prune(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    force: bool,
) -> anyhow::Result<ExitStatus> {
    let vms = match list_vms(context, runtime, session)? {
        Ok(vms) => vms,
        Err(error) => return Ok(refused(context, &error)),
    };
    let stopped: Vec<String> = vms
        .into_iter()
        .filter(|vm| vm.state == "stopped")
        .map(|vm| vm.name)
        .collect();
    if stopped.is_empty() {
        context.printer.info("no stopped VMs to delete");
        return Ok(ExitStatus::Success);
    }
    if !force {
        if !std::io::stdin().is_terminal() {
            context.printer.error(&format!(
                "would delete {} stopped VM(s) ({}); not asking without a terminal: pass -f",
                stopped.len(),
                stopped.join(", ")
            ));
            return Ok(ExitStatus::UserError);
        }
        eprint!(
            "delete {} stopped VM(s) and their disks ({})? [y/N] ",
            stopped.len(),
            stopped.join(", ")
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            context.printer.info("nothing deleted");
            return Ok(ExitStatus::Success);
        }
    }
    delete(context, runtime, session, &stopped, false)
}

fn vm_run(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    args: &RunArgs,
) -> anyhow::Result<ExitStatus> {
    if args.command.is_empty() && args.create.network == Some(NetworkMode::None) {
        // The shell of a bare `vm run` is SSH: refused before a VM is made for nothing.
        context.printer.error(
            "`vm run --network none` needs a command (`-- CMD`, run through the agent): its \
             shell would be SSH, which a VM without a network cannot have",
        );
        return Ok(ExitStatus::UserError);
    }
    let mut create = create_request(&args.create, true, Some(args.timeout));
    // Ctrl-C while the VM is being made ends this process; the daemon then deletes it.
    create.remove_if_abandoned = args.rm;
    create.warm_start = !args.cold;
    let request = Request::VmCreate(create);
    let vm = match session.vm(context, runtime, &request)? {
        Ok(vm) => vm,
        Err(error) => {
            // A guest that never came up is kept, stopped, for `vm logs`: the message says so.
            return Ok(refused(context, &error));
        }
    };
    let outcome = if args.command.is_empty() {
        interactive_shell(context, runtime, &vm)
    } else {
        // A terminal's input is forwarded only to a command on a terminal of its own (-t);
        // anything else (a pipe, a file) always is.
        let forward_stdin = args.guest.tty || !std::io::stdin().is_terminal();
        run_in_guest(runtime, &vm, &args.command, &args.guest, forward_stdin)
    };
    if args.rm {
        let request = Request::VmDelete {
            name: vm.name.clone(),
            force: true,
        };
        if let Err(error) = session.call(context, runtime, &request)? {
            context.printer.warn(&format!(
                "could not delete VM `{}`: {}",
                vm.name, error.message
            ));
        }
    } else if args.command.is_empty() {
        context.printer.info(&format!(
            "VM `{}` keeps running; `banger vm ssh {}` to come back, `banger vm rm -f {}` to \
             delete it",
            vm.name, vm.name, vm.name
        ));
    }
    outcome
}

/// `vm exec NAME -- CMD`.
fn exec(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    args: &ExecArgs,
) -> anyhow::Result<ExitStatus> {
    let vm = match running_agent(context, runtime, session, &args.name)? {
        Ok((vm, _)) => vm,
        Err(status) => return Ok(status),
    };
    run_in_guest(runtime, &vm, &args.command, &args.guest, args.interactive)
}

/// The exit status of a command that runs a guest command (`vm exec`, `vm run -- CMD`): the
/// guest command's own code, else 126 (it cannot be executed, or not in that working
/// directory) or 127 (not found), as a shell and `docker exec` have it, and 125 for any failure of banger's own, whose message is
/// printed here, so that a guest's 1 or 2 is never taken for banger's.
fn guest_command_status(context: &Context, result: anyhow::Result<ExitStatus>) -> ExitStatus {
    use banger::guest::{ErrorKind, GuestError};
    match result {
        Ok(status @ (ExitStatus::Code(_) | ExitStatus::Success | ExitStatus::Interrupted)) => {
            status
        }
        // A refusal already printed its message.
        Ok(ExitStatus::UserError | ExitStatus::Failure) => ExitStatus::Code(BANGER_FAILED),
        Err(error) => {
            let refusal = error.chain().find_map(|cause| match cause.downcast_ref() {
                Some(GuestError::Remote {
                    request: "Exec",
                    kind,
                    message,
                }) => Some((*kind, message.clone())),
                _ => None,
            });
            match refusal {
                Some((ErrorKind::NotFound, message)) => {
                    context.printer.error(&message);
                    ExitStatus::Code(127)
                }
                Some((
                    ErrorKind::PermissionDenied | ErrorKind::Spawn | ErrorKind::BadRequest,
                    message,
                )) => {
                    context.printer.error(&message);
                    ExitStatus::Code(126)
                }
                _ => match super::exit::classify(&error, &context.printer) {
                    ExitStatus::Interrupted => ExitStatus::Interrupted,
                    _ => ExitStatus::Code(BANGER_FAILED),
                },
            }
        }
    }
}

/// The exit code of `vm exec` and `vm run -- CMD` when banger itself failed.
pub(super) const BANGER_FAILED: u8 = 125;

/// Whether `arguments` (without the program name) call `vm exec`, or `vm run` with a
/// command: for their usage errors, which clap reports before any command runs.
pub(super) fn runs_a_guest_command(arguments: &[String]) -> bool {
    let mut words = arguments.iter().filter(|word| !word.starts_with('-'));
    match (
        words.next().map(String::as_str),
        words.next().map(String::as_str),
    ) {
        (Some("vm"), Some("exec")) => true,
        (Some("vm"), Some("run")) => arguments.iter().any(|word| word == "--"),
        _ => false,
    }
}

/// Runs `command` through the guest's agent with this process's stdout and stderr (and its
/// stdin when `forward_stdin`), on a pseudo-terminal with `options.tty`; exits with the
/// command's code.
fn run_in_guest(
    runtime: &tokio::runtime::Runtime,
    vm: &VmInfo,
    command: &[String],
    options: &GuestCommandArgs,
    forward_stdin: bool,
) -> anyhow::Result<ExitStatus> {
    let agent = vm
        .agent
        .as_ref()
        .context("the daemon reported no agent address for the running VM")?;
    let endpoint = agent.endpoint();
    runtime.block_on(async {
        let mut channel = agent_channel(&endpoint, &vm.name).await?;
        let mut request = banger::guest::ExecRequest::argv(command.iter().cloned());
        for (name, value) in &options.env {
            request = request.with_env(name, value);
        }
        if let Some(dir) = &options.workdir {
            request = request.with_cwd(dir);
        }
        if forward_stdin {
            request = request.with_stdin();
        }
        let stdin: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if forward_stdin {
            Box::new(tokio::io::stdin())
        } else {
            Box::new(tokio::io::empty())
        };
        let running = format!("running `{}` in VM `{}`", command.join(" "), vm.name);
        if !options.tty {
            let exec = channel.exec(&request, stdin, tokio::io::stdout(), tokio::io::stderr());
            return tokio::select! {
                status = exec => Ok(guest_exit(status.context(running)?)),
                _ = tokio::signal::ctrl_c() => Ok(ExitStatus::Interrupted),
            };
        }
        request.tty = true;
        request.window = super::terminal::own_window_size();
        let (resize, resizes) = tokio::sync::mpsc::unbounded_channel();
        let mut window_changes =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                .context("cannot watch the terminal's size")?;
        let mut terminated =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot watch for SIGTERM")?;
        let mut hung_up = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot watch for SIGHUP")?;
        // Raw only when keystrokes go to the guest: its terminal does the echo and line
        // editing. Undone when this guard drops, whichever way the command ends.
        let _raw = if forward_stdin && std::io::stdin().is_terminal() {
            Some(
                super::terminal::RawMode::enable()
                    .context("cannot put the terminal in raw mode")?,
            )
        } else {
            None
        };
        let exec = channel.exec_tty(&request, stdin, tokio::io::stdout(), resizes);
        tokio::pin!(exec);
        loop {
            tokio::select! {
                status = &mut exec => return Ok(guest_exit(status.context(running)?)),
                _ = window_changes.recv() => {
                    if let Some(size) = super::terminal::own_window_size() {
                        let _ = resize.send(size);
                    }
                }
                // Ctrl-C is a byte for the guest in raw mode; these still end banger, with
                // the terminal restored.
                _ = terminated.recv() => return Ok(ExitStatus::Interrupted),
                _ = hung_up.recv() => return Ok(ExitStatus::Interrupted),
                _ = tokio::signal::ctrl_c() => return Ok(ExitStatus::Interrupted),
            }
        }
    })
}

/// The process exit status for a guest command's: its code, or 128 + signal like a shell.
fn guest_exit(status: banger::guest::ExitStatus) -> ExitStatus {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitStatus::Code(code.clamp(0, 255) as u8),
        (None, Some(signal)) => ExitStatus::Code((128 + signal).clamp(0, 255) as u8),
        (None, None) => ExitStatus::Failure,
    }
}

/// Waits for the guest's sshd, then runs `ssh` in this terminal.
fn interactive_shell(
    context: &mut Context,
    runtime: &tokio::runtime::Runtime,
    vm: &VmInfo,
) -> anyhow::Result<ExitStatus> {
    let Some(argv) = ssh_argv(context, vm, &[])? else {
        anyhow::bail!("the daemon reported no SSH address for VM `{}`", vm.name);
    };
    wait_for_sshd(context, runtime, vm);
    let status = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .status()
        .with_context(|| format!("cannot run {}", argv.join(" ")))?;
    Ok(match status.code() {
        Some(code) => ExitStatus::Code(code.clamp(0, 255) as u8),
        None => ExitStatus::Failure,
    })
}

/// Waits (up to a minute) for the VM's sshd: the agent answers before sshd listens, and
/// `ssh` would fail at once.
fn wait_for_sshd(context: &Context, runtime: &tokio::runtime::Runtime, vm: &VmInfo) {
    let (Some(host), Some(port)) = (&vm.ssh_host, vm.ssh_port) else {
        return;
    };
    if !runtime.block_on(sshd_answers(host, port)) {
        context.printer.warn(&format!(
            "the SSH server of VM `{}` did not answer within 60 s; trying anyway",
            vm.name
        ));
    }
}

/// Whether an SSH server answers with its banner at `host:port` within a minute.
async fn sshd_answers(host: &str, port: u16) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Ok(mut stream)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        {
            let mut banner = [0u8; 4];
            if let Ok(Ok(4)) =
                tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut banner)).await
                && &banner == b"SSH-"
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}
