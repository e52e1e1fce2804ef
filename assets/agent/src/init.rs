//! Init mode: the agent as PID 1 of banger's initramfs.
//!
//! Lifecycle (each step prints one console line unless `quiet`; failures power the VM off
//! after printing why, since PID 1 must never exit):
//!
//! 1. Mount `/proc`, `/sys` and `/dev` (devtmpfs); point stdin/stdout/stderr at
//!    `/dev/console`.
//! 2. Read `/proc/cmdline` ([`InitConfig`]).
//! 3. Load the modules listed in `/etc/banger/modules.load` (`modules.rs`).
//! 4. Wait for the `root=` device (`rootwait`, `rootwait=N`, `rootdelay=N`; 30 s by default),
//!    printing what block devices exist if it never comes.
//! 5. Mount it on `/newroot`, read-only unless `rw`. With `banger.overlay=`, mount it
//!    read-only on `/banger/lower` instead, mount the writable layer (a tmpfs, or a disk that
//!    already holds a filesystem) on `/banger/rw`, and mount an overlayfs of the two on
//!    `/newroot` (`upper/` and `work/` on the writable layer, created if missing). With
//!    `banger.work=/dev/vdX`, mount that ext4 disk on the new root's `/root` (seeded from the
//!    image's `/root` the first time).
//! 6. Move `/dev`, `/proc` and `/sys` into the new root, delete the initramfs's files (they
//!    would pin memory forever), move the new root onto `/` and `chroot` into it
//!    (`switch_root`).
//! 7. Exec the image's init: `init=` if given, else the image's systemd (`/sbin/init` or the
//!    systemd binary), which starts the agent unit banger installed. If the image's init is
//!    something else (busybox, OpenRC) or missing (a container image), or with
//!    `banger.init=agent`, the agent stays PID 1 (`banger.init=image` execs any init): it mounts
//!    `/dev/pts`, `/dev/shm` and cgroup2, sets the hostname and brings the network up from
//!    `ip=` (only `lo` without it), writes `/etc/resolv.conf` from its DNS fields, reaps orphans, serves the
//!    protocol, and powers off on SIGTERM, SIGINT (Ctrl-Alt-Del) or SIGPWR.
//! 8. As PID 1, once serving, the agent starts first boot (`firstboot.rs`) in the background
//!    unless `/var/lib/banger/first-boot.done` exists or the root is read-only: machine id,
//!    the OpenSSH server through the image's package manager when `sshd` is missing, host
//!    keys. It runs as a child process; its progress and outcome are console lines, and a
//!    failure is retried at the next boot but never stops the agent. (systemd images run
//!    banger's first-boot unit instead.)
//!
//! Only steps 2 and 4's waiting logic and the parsers are testable without being PID 1; they
//! are unit-tested here and in `cmdline.rs` and `modules.rs`.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::IntoRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, chdir, chroot, execv};

use crate::cmdline::{Cmdline, InitChoice, InitConfig, Overlay};
use crate::console;

/// Where the new root is assembled in the initramfs.
const NEW_ROOT: &str = "/newroot";
/// The read-only root under an overlay.
const LOWER: &str = "/banger/lower";
/// The writable layer of an overlay.
const WRITABLE: &str = "/banger/rw";
/// Inits tried in order when the command line names none.
const IMAGE_INITS: [&str; 3] = [
    "/sbin/init",
    "/lib/systemd/systemd",
    "/usr/lib/systemd/systemd",
];
/// statfs magic numbers of the filesystems an initramfs can be.
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether this process should run init mode: it is PID 1.
pub fn is_pid1() -> bool {
    nix::unistd::getpid().as_raw() == 1
}

/// Runs init mode; never returns.
pub fn run() -> ! {
    match boot() {
        Ok(never) => match never {},
        Err(message) => fatal(&message),
    }
}

fn boot() -> Result<Infallible, String> {
    mount_kernel_filesystems()?;
    attach_console();
    let text = std::fs::read_to_string("/proc/cmdline")
        .map_err(|error| format!("cannot read /proc/cmdline: {error}"))?;
    let config = InitConfig::from_cmdline(&Cmdline::parse(&text))?;
    console::set_quiet(config.quiet);
    console::info(&format!("init {} started", env!("CARGO_PKG_VERSION")));
    load_modules();
    let root = config
        .root
        .clone()
        .ok_or("no root= on the kernel command line")?;
    wait_for_device(&root, config.device_timeout)?;
    assemble_root(&root, &config)?;
    if let Some(work) = &config.work {
        mount_work_disk(work, config.device_timeout)?;
    }
    switch_root()?;
    start_init(&config)
}

fn mount_kernel_filesystems() -> Result<(), String> {
    let quiet_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for (fstype, target, flags) in [
        ("proc", "/proc", quiet_flags),
        ("sysfs", "/sys", quiet_flags),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID),
    ] {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(fstype), target, Some(fstype), flags, None::<&str>) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(errno) => return Err(format!("cannot mount {fstype} on {target}: {errno}")),
        }
    }
    Ok(())
}

/// Points fds 0–2 at the console: the kernel only opens it for init if the initramfs has a
/// `/dev/console` node, and devtmpfs now provides one either way.
fn attach_console() {
    let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    let _ = nix::unistd::dup2_stdin(&console);
    let _ = nix::unistd::dup2_stdout(&console);
    let _ = nix::unistd::dup2_stderr(&console);
    // If 0–2 were closed, the console itself got one of them: keep it open.
    let fd = console.into_raw_fd();
    if fd > 2 {
        let _ = nix::unistd::close(fd);
    }
}

fn load_modules() {
    let text = match std::fs::read_to_string(crate::modules::MODULES_LOAD) {
        Ok(text) => text,
        Err(_) => return,
    };
    let modules = match crate::modules::parse_modules_load(&text) {
        Ok(modules) => modules,
        Err(message) => {
            console::warn(&message);
            return;
        }
    };
    let release = kernel_release();
    let directory = Path::new("/lib/modules").join(&release);
    let started = Instant::now();
    let mut loaded = 0;
    for module in &modules {
        match crate::modules::load(&directory, module) {
            Ok(true) => loaded += 1,
            Ok(false) => {}
            // The root wait that follows says clearly what is missing if this mattered.
            Err(message) => console::warn(&format!("module {message}")),
        }
    }
    console::info(&format!(
        "{loaded} of {} modules loaded in {} ms",
        modules.len(),
        started.elapsed().as_millis()
    ));
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|uts| uts.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Polls `exists` every 10 ms until it holds or `timeout` passes (`None`: forever), calling
/// `on_slow` after one second and every five seconds after that. Returns how long it
/// waited, as `Err` on timeout.
pub fn wait_for_path_with(
    mut exists: impl FnMut() -> bool,
    timeout: Option<Duration>,
    mut on_slow: impl FnMut(Duration),
) -> Result<Duration, Duration> {
    let started = Instant::now();
    let mut next_notice = Duration::from_secs(1);
    loop {
        if exists() {
            return Ok(started.elapsed());
        }
        let waited = started.elapsed();
        if timeout.is_some_and(|timeout| waited >= timeout) {
            return Err(waited);
        }
        if waited >= next_notice {
            on_slow(waited);
            next_notice += Duration::from_secs(5);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for a block device node, explaining on the console when it is slow or missing.
fn wait_for_device(device: &str, timeout: Option<Duration>) -> Result<(), String> {
    let path = Path::new(device);
    let waited = wait_for_path_with(
        || path.exists(),
        timeout,
        |waited| {
            console::info(&format!(
                "waiting for {device} ({} s so far{})",
                waited.as_secs(),
                timeout.map_or(", no time limit".into(), |limit| format!(
                    " of {} s",
                    limit.as_secs_f32()
                ))
            ));
        },
    );
    match waited {
        Ok(_) => Ok(()),
        Err(waited) => Err(format!(
            "{device} did not appear within {:.1} s; block devices: {}. Is its driver in \
             /etc/banger/modules.load?",
            waited.as_secs_f32(),
            block_devices()
        )),
    }
}

fn block_devices() -> String {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/block")
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(" ")
    }
}

/// The block-device filesystems in `/proc/filesystems`, ext4 first.
pub fn block_filesystems(proc_filesystems: &str) -> Vec<String> {
    let mut types: Vec<String> = proc_filesystems
        .lines()
        .filter(|line| !line.starts_with("nodev"))
        .map(|line| line.trim().to_owned())
        .filter(|name| !name.is_empty())
        .collect();
    if let Some(index) = types.iter().position(|name| name == "ext4") {
        let ext4 = types.remove(index);
        types.insert(0, ext4);
    }
    types
}

/// Mounts a block device, trying each candidate filesystem type; returns the one that worked.
fn mount_device(
    device: &str,
    target: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<String, String> {
    std::fs::create_dir_all(target).map_err(|error| format!("cannot create {target}: {error}"))?;
    let candidates = match fstype {
        Some(fstype) => vec![fstype.to_owned()],
        None => {
            block_filesystems(&std::fs::read_to_string("/proc/filesystems").unwrap_or_default())
        }
    };
    let mut failures = Vec::new();
    for candidate in &candidates {
        match mount(Some(device), target, Some(candidate.as_str()), flags, data) {
            Ok(()) => return Ok(candidate.clone()),
            Err(errno) => failures.push(format!("{candidate}: {errno}")),
        }
    }
    Err(format!(
        "cannot mount {device} on {target} ({})",
        if failures.is_empty() {
            "the kernel knows no block filesystem".into()
        } else {
            failures.join(", ")
        }
    ))
}

/// Whether the device starts like an ext2/3/4 filesystem (magic 0xEF53 at byte 1080).
fn has_ext_magic(device: &str) -> bool {
    let mut bytes = [0u8; 1082];
    std::fs::File::open(device)
        .and_then(|mut file| file.read_exact(&mut bytes))
        .is_ok()
        && bytes[1080..1082] == [0x53, 0xEF]
}

/// Where the work disk is mounted first, to be seeded before it covers the image's `/root`.
const WORK_STAGING: &str = "/banger/work";

/// Mounts the work disk on the new root's `/root`. A fresh disk (nothing but `lost+found`)
/// first gets the image's `/root` files (shell profiles) and mode 0700, so the first login
/// looks like the image's; after that it is left as the guest left it.
fn mount_work_disk(device: &str, timeout: Option<Duration>) -> Result<(), String> {
    wait_for_device(device, timeout)?;
    std::fs::create_dir_all(WORK_STAGING)
        .map_err(|error| format!("cannot create {WORK_STAGING}: {error}"))?;
    mount_device(device, WORK_STAGING, Some("ext4"), MsFlags::MS_NOSUID, None).map_err(
        |error| {
            if has_ext_magic(device) {
                error
            } else {
                format!(
                    "{error}: {device} holds no ext4 filesystem (banger formats work disks on \
                     the host; init never formats disks)"
                )
            }
        },
    )?;
    let image_root = format!("{NEW_ROOT}/root");
    if is_fresh(Path::new(WORK_STAGING)) {
        if let Err(error) = copy_tree(Path::new(&image_root), Path::new(WORK_STAGING)) {
            console::warn(&format!("cannot seed the work disk from /root: {error}"));
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(WORK_STAGING, std::fs::Permissions::from_mode(0o700));
    }
    std::fs::create_dir_all(&image_root)
        .map_err(|error| format!("cannot create {image_root}: {error}"))?;
    mount(
        Some(WORK_STAGING),
        image_root.as_str(),
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(|errno| format!("cannot move the work disk onto {image_root}: {errno}"))?;
    console::info(&format!("work disk {device} mounted on /root"));
    Ok(())
}

/// A file system holding nothing but `lost+found`.
fn is_fresh(root: &Path) -> bool {
    std::fs::read_dir(root).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .all(|entry| entry.file_name() == "lost+found")
    })
}

/// Copies regular files, directories and symlinks from `from` into `to`, keeping modes and
/// owners (a home directory's skeleton: small, so no care for sparse or special files).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(entries) = std::fs::read_dir(from) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&source)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&source, &target)?;
        } else if kind.is_file() {
            std::fs::copy(&source, &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
        } else {
            continue;
        }
        if !kind.is_symlink() {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(meta.mode()))?;
        }
        std::os::unix::fs::lchown(&target, Some(meta.uid()), Some(meta.gid()))?;
    }
    Ok(())
}

fn assemble_root(root: &str, config: &InitConfig) -> Result<(), String> {
    let root_flags = if config.read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    let data = config.root_flags.as_deref();
    let fstype = config.root_fstype.as_deref();
    let Some(overlay) = &config.overlay else {
        let used = mount_device(root, NEW_ROOT, fstype, root_flags, data)?;
        console::info(&format!(
            "root {root} mounted ({used}, {})",
            if config.read_only { "ro" } else { "rw" }
        ));
        return Ok(());
    };
    let used = mount_device(root, LOWER, fstype, MsFlags::MS_RDONLY, data)?;
    std::fs::create_dir_all(WRITABLE)
        .map_err(|error| format!("cannot create {WRITABLE}: {error}"))?;
    let layer = match overlay {
        Overlay::Tmpfs { size } => {
            let options = match size {
                Some(size) => format!("mode=0755,size={size}"),
                None => "mode=0755".to_owned(),
            };
            mount(
                Some("tmpfs"),
                WRITABLE,
                Some("tmpfs"),
                MsFlags::MS_NOSUID,
                Some(options.as_str()),
            )
            .map_err(|errno| format!("cannot mount the tmpfs overlay layer: {errno}"))?;
            "tmpfs".to_owned()
        }
        Overlay::Device { path, fstype } => {
            wait_for_device(path, config.device_timeout)?;
            mount_device(path, WRITABLE, Some(fstype), MsFlags::empty(), None).map_err(|error| {
                if fstype == "ext4" && !has_ext_magic(path) {
                    format!(
                        "{error}: {path} holds no ext4 filesystem. The writable layer must be \
                         formatted before boot (banger formats it on the host; init never formats disks)"
                    )
                } else {
                    error
                }
            })?;
            path.clone()
        }
    };
    let upper = format!("{WRITABLE}/upper");
    let work = format!("{WRITABLE}/work");
    for directory in [&upper, &work] {
        std::fs::create_dir_all(directory)
            .map_err(|error| format!("cannot create {directory}: {error}"))?;
    }
    std::fs::create_dir_all(NEW_ROOT)
        .map_err(|error| format!("cannot create {NEW_ROOT}: {error}"))?;
    let mut options = format!("lowerdir={LOWER},upperdir={upper},workdir={work}");
    if config.builder {
        // The host reads the upper directory as a diff layer: every changed file must be
        // there whole (no metacopy), renamed directories copied (no redirects), and nothing
        // may point into the lower file system (no index).
        options.push_str(",redirect_dir=off,index=off,metacopy=off");
    }
    mount(
        Some("overlay"),
        NEW_ROOT,
        Some("overlay"),
        root_flags,
        Some(options.as_str()),
    )
    .map_err(|errno| {
        format!(
            "cannot mount the overlay ({options}): {errno}; is overlay in /etc/banger/modules.load?"
        )
    })?;
    console::info(&format!(
        "root {root} ({used}) mounted under a {layer} overlay ({})",
        if config.read_only { "ro" } else { "rw" }
    ));
    Ok(())
}

/// `switch_root`: moves the kernel filesystems over, frees the initramfs, makes the new
/// root `/`.
fn switch_root() -> Result<(), String> {
    for name in ["dev", "proc", "sys"] {
        let source = format!("/{name}");
        let target = format!("{NEW_ROOT}/{name}");
        let _ = std::fs::create_dir_all(&target);
        if let Err(errno) = mount(
            Some(source.as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ) {
            // The image's init mounts its own; only the agent as PID 1 needs these.
            console::warn(&format!("cannot move {source} to {target}: {errno}"));
        }
    }
    chdir(NEW_ROOT).map_err(|errno| format!("cannot enter {NEW_ROOT}: {errno}"))?;
    delete_initramfs();
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|errno| format!("cannot move {NEW_ROOT} onto /: {errno}"))?;
    chroot(".").map_err(|errno| format!("cannot chroot into the new root: {errno}"))?;
    chdir("/").map_err(|errno| format!("cannot enter the new root: {errno}"))?;
    Ok(())
}

/// Deletes the initramfs's files, staying on its filesystem (mounts are skipped). Only when
/// we are PID 1 and `/` really is a ramfs or tmpfs: this must never run on a real disk.
fn delete_initramfs() {
    let is_initramfs = nix::sys::statfs::statfs("/").is_ok_and(|fs| {
        let magic = fs.filesystem_type().0;
        magic == RAMFS_MAGIC || magic == TMPFS_MAGIC
    });
    let Ok(root) = std::fs::symlink_metadata("/") else {
        return;
    };
    if !is_pid1() || !is_initramfs {
        return;
    }
    remove_tree(Path::new("/"), root.dev());
}

fn remove_tree(directory: &Path, device: u64) {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != device {
            continue;
        }
        if meta.is_dir() {
            remove_tree(&path, device);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Execs the image's init, or becomes the image's PID 1 when it has none.
fn start_init(config: &InitConfig) -> Result<Infallible, String> {
    if config.builder && config.init != InitChoice::Agent {
        prepare_builder_beside_init(config);
    }
    match &config.init {
        InitChoice::Path(path) => {
            let error = exec_init(path, &config.init_args);
            Err(format!("cannot start init={path}: {error}"))
        }
        InitChoice::Agent => stay_pid1(config),
        InitChoice::Auto => {
            match IMAGE_INITS
                .iter()
                .find(|candidate| Path::new(candidate).exists())
            {
                Some(candidate) if is_systemd(Path::new(candidate)) => {
                    let error = exec_init(candidate, &config.init_args);
                    console::warn(&format!("cannot start {candidate}: {error}"));
                }
                Some(candidate) => console::info(&format!(
                    "{candidate} is not systemd, so it would not start the agent: the agent \
                     stays PID 1 (banger.init=image runs it anyway)"
                )),
                None => {}
            }
            stay_pid1(config)
        }
        InitChoice::Image => {
            for candidate in IMAGE_INITS {
                if Path::new(candidate).exists() {
                    let error = exec_init(candidate, &config.init_args);
                    console::warn(&format!("cannot start {candidate}: {error}"));
                }
            }
            stay_pid1(config)
        }
    }
}

/// A builder VM that runs the image's init (`init = "systemd"` steps): its intermediate image
/// has no agent unit, so before the exec this agent brings the network up itself and starts
/// a copy of itself, serving, as a child that the image's init inherits.
fn prepare_builder_beside_init(config: &InitConfig) {
    configure_network(config);
    // The initramfs is gone, but /proc/self/exe still names this very binary.
    match std::process::Command::new("/proc/self/exe")
        .arg("serve")
        .stdin(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => console::info(&format!("builder agent serving as pid {}", child.id())),
        Err(error) => console::warn(&format!("cannot start the builder's agent: {error}")),
    }
}

/// Hostname, addresses and `resolv.conf` from `ip=`, as the agent does when it is PID 1.
/// Without `ip=` (a VM with no network device) only `lo` comes up, at once: nothing waits
/// for an interface that will never appear.
fn configure_network(config: &InitConfig) {
    let Some(ip) = &config.ip else {
        if let Err(message) = crate::net::loopback_up() {
            console::warn(&format!("network: {message}"));
        }
        return;
    };
    if let Some(hostname) = &ip.hostname
        && let Err(errno) = nix::unistd::sethostname(hostname)
    {
        console::warn(&format!("cannot set the hostname {hostname}: {errno}"));
    }
    match crate::net::configure(ip) {
        Ok(interface) => console::info(&format!(
            "network {interface} {}/{}{}",
            ip.address,
            ip.prefix_len,
            ip.gateway
                .map(|gateway| format!(" via {gateway}"))
                .unwrap_or_default()
        )),
        Err(message) => console::warn(&format!("network: {message}")),
    }
    if !ip.dns.is_empty()
        && let Err(error) = std::fs::write("/etc/resolv.conf", crate::net::resolv_conf(&ip.dns))
    {
        console::warn(&format!("cannot write /etc/resolv.conf: {error}"));
    }
}

/// Whether `init` is systemd, following symlinks (`/sbin/init` usually points at it).
fn is_systemd(init: &Path) -> bool {
    std::fs::canonicalize(init)
        .is_ok_and(|target| target.file_name().is_some_and(|name| name == "systemd"))
}

/// Execs `path`; returns only on failure.
fn exec_init(path: &str, arguments: &[String]) -> String {
    let mut argv = vec![path.to_owned()];
    argv.extend(arguments.iter().cloned());
    let Ok(argv) = argv
        .into_iter()
        .map(CString::new)
        .collect::<Result<Vec<_>, _>>()
    else {
        return "an argument contains a NUL byte".into();
    };
    console::info(&format!("starting {path}"));
    match execv(&argv[0], &argv) {
        Ok(never) => match never {},
        Err(errno) => errno.to_string(),
    }
}

/// The agent is the guest's PID 1 from here on.
fn stay_pid1(config: &InitConfig) -> ! {
    console::info("the agent stays PID 1");
    mount_container_filesystems();
    configure_network(config);
    // Ctrl-Alt-Del becomes SIGINT for PID 1 instead of an immediate reboot.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    let shutdown: crate::reaper::ShutdownHandler = Box::new(|signal| {
        // On its own thread, so the reaper keeps reaping what the shutdown kills.
        let _ = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || power_off(signal));
    });
    let options = crate::ServeOptions::guest_default();
    let pid1 = crate::Pid1 {
        on_shutdown: shutdown,
        // After the network (above), in the background: the package manager may need it.
        // Never in a builder: the identity it makes must not land in an image.
        on_start: if config.builder {
            Box::new(|_: &crate::reaper::Reaper| {})
        } else {
            Box::new(crate::firstboot::start_once)
        },
    };
    if let Err(message) = crate::serve_forever(options, Some(pid1)) {
        console::error(&message);
    }
    // Nothing to serve on: stay alive so the kernel does not panic, and keep reaping.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// What a container runtime would provide and a PID 1 agent must mount itself. Each is
/// optional: an image that lacks the directory simply does without.
fn mount_container_filesystems() {
    let mounts: [(&str, &str, &str, MsFlags, &str); 3] = [
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            "",
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        if let Err(errno) = mount(Some(source), target, Some(fstype), flags, Some(data)) {
            console::warn(&format!("cannot mount {fstype} on {target}: {errno}"));
        }
    }
}

/// Stops everything and powers off: SIGTERM to every process, up to 3 s for them to go,
/// SIGKILL, sync, read-only root, power off.
fn power_off(signal: Signal) -> ! {
    console::info(&format!("{signal} received: powering off"));
    let everyone = Pid::from_raw(-1);
    let _ = kill(everyone, Signal::SIGTERM);
    let _ = wait_for_path_with(
        || user_processes() == 0,
        Some(Duration::from_secs(3)),
        |_| {},
    );
    let _ = kill(everyone, Signal::SIGKILL);
    nix::unistd::sync();
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    halt()
}

/// Processes other than PID 1 and kernel threads (children of kthreadd, PID 2).
fn user_processes() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid > 2)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_pid(&stat))
                .is_some_and(|parent| parent != 2)
        })
        .count()
}

/// The parent pid from a `/proc/<pid>/stat` line (the field after the parenthesised name,
/// which may itself contain spaces and parentheses).
pub fn parent_pid(stat: &str) -> Option<u32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Prints why boot failed and powers the VM off (PID 1 exiting would panic the kernel).
fn fatal(message: &str) -> ! {
    console::error(message);
    console::error("cannot boot: powering off");
    nix::unistd::sync();
    halt()
}

fn halt() -> ! {
    let _ = reboot(RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_path_that_appears_later_ends_the_wait() {
        let dir = std::env::temp_dir().join(format!("banger-agent-wait-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let target = dir.clone();
        let creator = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(&target, b"").unwrap();
        });
        let waited = wait_for_path_with(|| dir.exists(), Some(Duration::from_secs(10)), |_| {});
        creator.join().unwrap();
        let _ = std::fs::remove_file(&dir);
        assert!(waited.unwrap() >= Duration::from_millis(40));
    }

    #[test]
    fn a_path_that_never_appears_times_out_and_reports_slowness_once_per_interval() {
        let notices = Cell::new(0);
        let waited = wait_for_path_with(
            || false,
            Some(Duration::from_millis(1200)),
            |_| notices.set(notices.get() + 1),
        );
        let waited = waited.unwrap_err();
        assert!(waited >= Duration::from_millis(1200));
        assert_eq!(notices.get(), 1, "one notice after the first second");
    }

    #[test]
    fn a_present_path_does_not_wait() {
        let waited = wait_for_path_with(|| true, Some(Duration::ZERO), |_| panic!("slow"));
        assert!(waited.unwrap() < Duration::from_millis(10));
    }

    #[test]
    fn block_filesystems_skip_nodev_and_put_ext4_first() {
        let text = "nodev\tsysfs\nnodev\ttmpfs\n\text3\n\text2\n\text4\n\tvfat\nnodev\toverlay\n";
        assert_eq!(block_filesystems(text), ["ext4", "ext3", "ext2", "vfat"]);
    }

    #[test]
    fn parent_pids_survive_odd_process_names() {
        assert_eq!(parent_pid("42 (a) b (c)) S 7 42 42 0"), Some(7));
        assert_eq!(parent_pid("3 (kworker/0:0) I 2 0 0"), Some(2));
        assert_eq!(parent_pid("garbage"), None);
    }
}
