//! `banger-agent first-boot`: what an image instance needs once, so clones of one image never
//! share identities, and images that lack an SSH server get one.
//!
//! Steps, in order:
//!
//! 1. A fresh machine id (`systemd-machine-id-setup`, or 16 random bytes) when the image's is
//!    empty or systemd's `uninitialized` placeholder.
//! 2. When no `sshd` is in the usual sbin/bin directories ([`SSHD_DIRS`]), the OpenSSH server
//!    is installed with the guest's package manager, non-interactively. The manager follows
//!    from `/etc/os-release` (or `/usr/lib/os-release`): its `ID` first, then each `ID_LIKE`
//!    entry, mapped to a [`Family`] (Debian → apt-get, Alpine → apk, Red Hat → dnf, or yum
//!    when only yum exists, Arch → pacman, SUSE → zypper). An unknown distribution is an
//!    error naming its `ID` and `ID_LIKE` and the supported families; a failing package
//!    manager is an error with its argv, exit status and the tail of its stderr.
//! 3. SSH host keys (`ssh-keygen -A`) when the image has ssh-keygen.
//! 4. The marker [`MARKER`], written only once everything above succeeded, so a first boot
//!    that failed (no network for the package manager, say) is tried again at the next boot.
//!
//! Who runs it:
//!
//! - The agent as PID 1 (images without a usable init, `init.rs`): [`start_once`] starts it
//!   after the network is up, unless the marker exists or the root is read-only, as a child
//!   process (`/proc/self/exe first-boot`) rather than a thread, so nothing it does (a hung
//!   mirror, a crash) can block or kill PID 1. The reaper collects its status; progress and
//!   the outcome go to the console.
//! - systemd images: `banger-first-boot.service` (`ConditionPathExists=!` the marker) runs the
//!   shell script `assets/libexec/banger-first-boot`, which does steps 1, 3 and 4 only.
//! - By hand: `banger-agent first-boot [--quiet]` runs every step whether or not the marker
//!   exists.
//!
//! The decisions (parsing os-release, choosing the manager, building its commands, trimming
//! its output) are pure functions, unit-tested below; [`run`] only executes them.
//!
//! Weaknesses: the package manager has no time limit (as PID 1's background child it holds
//! up nothing, but a hung one is never retried during that boot); installing sshd does not
//! start it, since with the agent as PID 1 nothing supervises services; systemd images that
//! lack sshd do not get one.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::console;
use crate::exec::DEFAULT_PATH;
use crate::protocol::Exit;
use crate::reaper::Reaper;

/// Written last; its presence means first boot is done (the systemd unit and [`start_once`]
/// check it).
pub const MARKER: &str = "/var/lib/banger/first-boot.done";

/// Where os-release may be, in the order the os-release specification says to look.
const OS_RELEASE_PATHS: [&str; 2] = ["/etc/os-release", "/usr/lib/os-release"];

/// Where distributions put `sshd` (most in `/usr/sbin`, Arch in `/usr/bin`).
pub const SSHD_DIRS: [&str; 6] = [
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
    "/usr/local/sbin",
    "/usr/local/bin",
];

/// Lines of a failing package manager's output kept in the error.
const TAIL_LINES: usize = 15;

/// The families banger knows, for error messages.
const SUPPORTED: &str = "debian, ubuntu (apt-get); alpine (apk); fedora, rhel, centos, rocky, \
                         almalinux, amzn (dnf or yum); arch, manjaro (pacman); opensuse*, sles, \
                         suse (zypper)";

// ---------------------------------------------------------------------------------------
// Pure: deciding what to run

/// The fields of os-release that choose a package manager.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsRelease {
    /// `ID`, lowercased; `None` when absent or empty.
    pub id: Option<String>,
    /// `ID_LIKE`, split at whitespace, lowercased.
    pub id_like: Vec<String>,
}

impl OsRelease {
    /// Parses os-release text: `KEY=value` lines, values bare or shell-quoted; blank lines,
    /// comments and anything unparsable are skipped. A later assignment wins.
    pub fn parse(text: &str) -> OsRelease {
        let mut release = OsRelease::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = unquote(value.trim()).to_lowercase();
            match key.trim() {
                "ID" => release.id = Some(value).filter(|id| !id.is_empty()),
                "ID_LIKE" => {
                    release.id_like = value.split_whitespace().map(str::to_owned).collect();
                }
                _ => {}
            }
        }
        release
    }

    /// `ID`, then each `ID_LIKE` entry: the order in which they choose a family.
    pub fn candidates(&self) -> impl Iterator<Item = &str> {
        self.id
            .iter()
            .chain(self.id_like.iter())
            .map(String::as_str)
    }
}

/// A shell-style value: `"…"` with `\"`, `\\`, `\$` and `` \` `` escapes, `'…'` literally,
/// or bare.
fn unquote(value: &str) -> String {
    let quoted = |quote: char| {
        (value.len() >= 2 && value.starts_with(quote) && value.ends_with(quote))
            .then(|| &value[1..value.len() - 1])
    };
    if let Some(inner) = quoted('"') {
        let mut unquoted = String::with_capacity(inner.len());
        let mut characters = inner.chars();
        while let Some(character) = characters.next() {
            match (character, characters.clone().next()) {
                ('\\', Some(next @ ('"' | '\\' | '$' | '`'))) => {
                    unquoted.push(next);
                    characters.next();
                }
                (character, _) => unquoted.push(character),
            }
        }
        unquoted
    } else if let Some(inner) = quoted('\'') {
        inner.to_owned()
    } else {
        value.to_owned()
    }
}

/// A family of distributions that share a package manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Debian,
    Alpine,
    RedHat,
    Arch,
    Suse,
}

impl Family {
    /// The family an os-release `ID` (or `ID_LIKE` entry) belongs to.
    pub fn of(id: &str) -> Option<Family> {
        match id {
            "debian" | "ubuntu" => Some(Family::Debian),
            "alpine" => Some(Family::Alpine),
            "fedora" | "rhel" | "centos" | "rocky" | "almalinux" | "amzn" => Some(Family::RedHat),
            "arch" | "manjaro" => Some(Family::Arch),
            "sles" | "suse" => Some(Family::Suse),
            _ if id.starts_with("opensuse") => Some(Family::Suse),
            _ => None,
        }
    }

    /// The package managers that serve this family, preferred first.
    pub fn managers(self) -> &'static [PackageManager] {
        match self {
            Family::Debian => &[PackageManager::AptGet],
            Family::Alpine => &[PackageManager::Apk],
            Family::RedHat => &[PackageManager::Dnf, PackageManager::Yum],
            Family::Arch => &[PackageManager::Pacman],
            Family::Suse => &[PackageManager::Zypper],
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Family::Debian => "Debian",
            Family::Alpine => "Alpine",
            Family::RedHat => "Red Hat",
            Family::Arch => "Arch",
            Family::Suse => "SUSE",
        })
    }
}

/// An os-release whose `ID` and `ID_LIKE` name no family banger knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownDistribution(pub OsRelease);

impl fmt::Display for UnknownDistribution {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let OsRelease { id, id_like } = &self.0;
        let id = match id {
            Some(id) => format!("ID={id}"),
            None => "no ID".to_owned(),
        };
        let id_like = match id_like.as_slice() {
            [] => "no ID_LIKE".to_owned(),
            entries => format!("ID_LIKE=\"{}\"", entries.join(" ")),
        };
        write!(
            formatter,
            "sshd is missing and banger cannot tell how to install it: os-release has {id} and \
             {id_like}, and banger installs packages only on {SUPPORTED}"
        )
    }
}

/// The family of the first of `ID`, then the `ID_LIKE` entries, that banger knows.
pub fn choose_family(release: &OsRelease) -> Result<Family, UnknownDistribution> {
    release
        .candidates()
        .find_map(Family::of)
        .ok_or_else(|| UnknownDistribution(release.clone()))
}

/// The first of `family`'s package managers that the image has (`installed` says which).
pub fn choose_manager(
    family: Family,
    installed: impl Fn(&str) -> bool,
) -> Result<PackageManager, String> {
    let managers = family.managers();
    managers
        .iter()
        .copied()
        .find(|manager| installed(manager.program()))
        .ok_or_else(|| {
            let names: Vec<&str> = managers.iter().map(|manager| manager.program()).collect();
            format!(
                "sshd is missing, and this {family}-family image has no {} in PATH to install it with",
                names.join(" or ")
            )
        })
}

/// A package manager banger can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageManager {
    AptGet,
    Apk,
    Dnf,
    Yum,
    Pacman,
    Zypper,
}

impl PackageManager {
    /// The program's name, looked up in `PATH`.
    pub fn program(self) -> &'static str {
        match self {
            PackageManager::AptGet => "apt-get",
            PackageManager::Apk => "apk",
            PackageManager::Dnf => "dnf",
            PackageManager::Yum => "yum",
            PackageManager::Pacman => "pacman",
            PackageManager::Zypper => "zypper",
        }
    }

    /// The commands that install the OpenSSH server, in order, none asking questions.
    pub fn install_openssh(self) -> Vec<Invocation> {
        let plain = |argv: &[&'static str]| Invocation {
            argv: argv.to_vec(),
            env: Vec::new(),
        };
        match self {
            PackageManager::AptGet => {
                let apt = |argv: &[&'static str]| Invocation {
                    argv: argv.to_vec(),
                    env: vec![("DEBIAN_FRONTEND", "noninteractive")],
                };
                vec![
                    apt(&["apt-get", "update"]),
                    apt(&[
                        "apt-get",
                        "install",
                        "-y",
                        "--no-install-recommends",
                        "openssh-server",
                    ]),
                ]
            }
            PackageManager::Apk => vec![plain(&["apk", "add", "--no-cache", "openssh-server"])],
            PackageManager::Dnf => vec![plain(&["dnf", "install", "-y", "openssh-server"])],
            PackageManager::Yum => vec![plain(&["yum", "install", "-y", "openssh-server"])],
            PackageManager::Pacman => {
                vec![plain(&["pacman", "-Sy", "--noconfirm", "openssh"])]
            }
            PackageManager::Zypper => vec![plain(&[
                "zypper",
                "--non-interactive",
                "install",
                "openssh-server",
            ])],
        }
    }
}

/// One command to run: its argv (the program first, looked up in `PATH`) and the
/// environment variables it needs beyond the agent's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub argv: Vec<&'static str>,
    pub env: Vec<(&'static str, &'static str)>,
}

impl fmt::Display for Invocation {
    /// Shell-like: `DEBIAN_FRONTEND=noninteractive apt-get update`.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<String> = self
            .env
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .chain(self.argv.iter().map(|word| (*word).to_owned()))
            .collect();
        formatter.write_str(&words.join(" "))
    }
}

/// The last `lines` lines of a command's output, without trailing blank space.
pub fn tail(output: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(output);
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An empty id, or systemd's "not set yet" placeholder, must be replaced.
pub fn needs_machine_id(current: &str) -> bool {
    let current = current.trim();
    current.is_empty() || current == "uninitialized"
}

// ---------------------------------------------------------------------------------------
// Executing

/// `banger-agent first-boot [--quiet]`.
pub fn command(arguments: &[String]) -> Result<(), String> {
    match arguments {
        [] => {}
        [flag] if flag == "--quiet" => console::set_quiet(true),
        _ => return Err("first-boot takes only --quiet".into()),
    }
    run()
}

/// Runs every step (module doc), writing the marker last.
pub fn run() -> Result<(), String> {
    std::fs::create_dir_all("/var/lib/banger")
        .map_err(|error| format!("cannot create /var/lib/banger: {error}"))?;
    if needs_machine_id(&std::fs::read_to_string("/etc/machine-id").unwrap_or_default()) {
        if let Some(setup) = find_program("systemd-machine-id-setup") {
            run_quietly(&setup, &[]);
        } else if let Err(error) = std::fs::write("/etc/machine-id", random_machine_id()? + "\n") {
            console::warn(&format!("cannot write /etc/machine-id: {error}"));
        }
    }
    ensure_sshd()?;
    if let Some(keygen) = find_program("ssh-keygen") {
        run_quietly(&keygen, &["-A"]);
    }
    std::fs::write(MARKER, b"").map_err(|error| format!("cannot write {MARKER}: {error}"))
}

/// Installs the OpenSSH server unless `sshd` is there already.
fn ensure_sshd() -> Result<(), String> {
    if find_sshd().is_some() {
        return Ok(());
    }
    let release = read_os_release()?;
    let family = choose_family(&release).map_err(|unknown| unknown.to_string())?;
    let manager = choose_manager(family, |program| find_program(program).is_some())?;
    console::info(&format!(
        "first boot: no sshd, installing the OpenSSH server with {}",
        manager.program()
    ));
    for invocation in manager.install_openssh() {
        run_checked(&invocation)?;
    }
    let sshd = find_sshd().ok_or_else(|| {
        format!(
            "{} succeeded, but there is still no sshd in {}",
            manager.program(),
            SSHD_DIRS.join(", ")
        )
    })?;
    console::info(&format!("first boot: installed {}", sshd.display()));
    Ok(())
}

fn read_os_release() -> Result<OsRelease, String> {
    for path in OS_RELEASE_PATHS {
        match std::fs::read_to_string(path) {
            Ok(text) => return Ok(OsRelease::parse(&text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(format!("cannot read {path}: {error}")),
        }
    }
    Err(format!(
        "sshd is missing and banger cannot tell how to install it: there is no {}",
        OS_RELEASE_PATHS.join(" and no ")
    ))
}

fn find_sshd() -> Option<PathBuf> {
    SSHD_DIRS
        .iter()
        .map(|directory| Path::new(directory).join("sshd"))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Runs `invocation` to completion with its output captured; an error carries its argv,
/// status and the tail of its stderr (or stdout, if stderr is empty).
fn run_checked(invocation: &Invocation) -> Result<(), String> {
    let Some((program, arguments)) = invocation.argv.split_first() else {
        return Ok(());
    };
    let path = find_program(program)
        .ok_or_else(|| format!("cannot run `{invocation}`: {program} is not in PATH"))?;
    let mut command = Command::new(path);
    command
        .arg0(program)
        .args(arguments)
        .envs(invocation.env.iter().copied())
        .stdin(Stdio::null());
    if std::env::var_os("PATH").is_none() {
        // The agent as PID 1 starts with the kernel's bare environment.
        command.env("PATH", DEFAULT_PATH);
    }
    let output = command
        .output()
        .map_err(|error| format!("cannot run `{invocation}`: {error}"))?;
    if output.status.success() {
        return Ok(());
    }
    let mut detail = tail(&output.stderr, TAIL_LINES);
    if detail.is_empty() {
        detail = tail(&output.stdout, TAIL_LINES);
    }
    if detail.is_empty() {
        detail = "(no output)".into();
    }
    Err(format!(
        "`{invocation}` failed ({}):\n{detail}",
        output.status
    ))
}

pub fn random_machine_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|error| format!("cannot read /dev/urandom: {error}"))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

fn run_quietly(program: &Path, arguments: &[&str]) {
    match Command::new(program).args(arguments).output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => console::warn(&format!(
            "{} failed ({}): {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => console::warn(&format!("cannot run {}: {error}", program.display())),
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    crate::exec::resolve_program(name, &path)
}

// ---------------------------------------------------------------------------------------
// The agent as PID 1

/// Starts first boot in the background unless it is done or cannot write its marker, and
/// returns at once. Call with the reaper running: the child is started and waited for
/// through it, and the thread that reports the outcome inherits its signal mask. Failures
/// are console lines, never errors: PID 1 goes on serving whatever happens here.
pub fn start_once(reaper: &Reaper) {
    if Path::new(MARKER).exists() {
        return;
    }
    if marker_on_read_only_filesystem() {
        console::info("first boot skipped: the root filesystem is read-only");
        return;
    }
    // Our own binary, even once the initramfs that held it has been deleted.
    let mut command = Command::new("/proc/self/exe");
    command
        .arg0("banger-agent")
        .arg("first-boot")
        .stdin(Stdio::null());
    if console::is_quiet() {
        command.arg("--quiet");
    }
    let (child, exit_pipe) = match reaper.spawn(&mut command) {
        Ok(started) => started,
        Err(error) => {
            console::warn(&format!("cannot start first boot: {error}"));
            return;
        }
    };
    let pid = child.id();
    // Never waited for through `child`: the reaper owns every wait.
    drop(child);
    console::info(&format!("first boot started (pid {pid})"));
    let reporter = std::thread::Builder::new()
        .name("first-boot".into())
        .spawn(move || match crate::reaper::read_exit(&exit_pipe) {
            Ok(Exit {
                code: Some(0),
                signal: None,
            }) => console::info("first boot done"),
            Ok(exit) => console::warn(&format!(
                "first boot failed ({}); it runs again at the next boot",
                describe_exit(exit)
            )),
            Err(error) => console::warn(&format!(
                "first boot (pid {pid}): cannot read its exit status: {error}"
            )),
        });
    if let Err(error) = reporter {
        console::warn(&format!(
            "first boot (pid {pid}) runs unobserved: cannot start a thread: {error}"
        ));
    }
}

/// Whether the filesystem that would hold the marker is mounted read-only (a root mounted
/// without `rw` and no overlay).
fn marker_on_read_only_filesystem() -> bool {
    let Some(existing) = Path::new(MARKER).ancestors().find(|path| path.exists()) else {
        return false;
    };
    nix::sys::statvfs::statvfs(existing)
        .is_ok_and(|fs| fs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

fn describe_exit(exit: Exit) -> String {
    match (exit.code, exit.signal) {
        (_, Some(signal)) => format!("killed by signal {signal}"),
        (Some(code), None) => format!("exit code {code}"),
        (None, None) => "unknown status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_and_empty_machine_ids_are_replaced() {
        assert!(needs_machine_id(""));
        assert!(needs_machine_id("uninitialized\n"));
        assert!(!needs_machine_id("0123456789abcdef0123456789abcdef\n"));
    }

    #[test]
    fn random_machine_ids_are_32_hex_digits() {
        let id = random_machine_id().unwrap();
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, random_machine_id().unwrap());
    }

    fn release(id: Option<&str>, id_like: &[&str]) -> OsRelease {
        OsRelease {
            id: id.map(str::to_owned),
            id_like: id_like.iter().map(|entry| (*entry).to_owned()).collect(),
        }
    }

    #[test]
    fn os_release_values_may_be_bare_or_quoted() {
        let text = "NAME=\"Rocky Linux\"\n\
                    # a comment\n\
                    \n\
                    ID=\"rocky\"\n\
                    ID_LIKE=\"rhel centos fedora\"\n\
                    VERSION_ID=\"9.3\"\n\
                    garbage line\n";
        assert_eq!(
            OsRelease::parse(text),
            release(Some("rocky"), &["rhel", "centos", "fedora"])
        );
        assert_eq!(
            OsRelease::parse("ID=alpine\nVERSION_ID=3.20.0\n"),
            release(Some("alpine"), &[])
        );
        assert_eq!(
            OsRelease::parse("ID='opensuse-tumbleweed'\nID_LIKE='opensuse  suse'\n"),
            release(Some("opensuse-tumbleweed"), &["opensuse", "suse"])
        );
        assert_eq!(
            OsRelease::parse("  ID = Ubuntu \nID_LIKE=debian\n"),
            release(Some("ubuntu"), &["debian"])
        );
    }

    #[test]
    fn os_release_double_quotes_unescape_like_a_shell() {
        assert_eq!(
            unquote(r#""a \"b\" \\ \$c \`d\` \n""#),
            r#"a "b" \ $c `d` \n"#
        );
        assert_eq!(unquote("'a \\\"b'"), "a \\\"b");
        assert_eq!(unquote("\""), "\"");
        assert_eq!(unquote("\"\""), "");
    }

    #[test]
    fn os_release_without_an_id_or_with_an_empty_one_has_none() {
        assert_eq!(OsRelease::parse("NAME=x\n"), release(None, &[]));
        assert_eq!(OsRelease::parse("ID=\"\"\n"), release(None, &[]));
        assert_eq!(OsRelease::parse("ID=a\nID=b\n"), release(Some("b"), &[]));
    }

    #[test]
    fn families_come_from_the_id_first_then_id_like_in_order() {
        let cases: &[(Option<&str>, &[&str], Family)] = &[
            (Some("debian"), &[], Family::Debian),
            (Some("ubuntu"), &["debian"], Family::Debian),
            (Some("alpine"), &[], Family::Alpine),
            (Some("fedora"), &[], Family::RedHat),
            (Some("rhel"), &["fedora"], Family::RedHat),
            (Some("centos"), &["rhel", "fedora"], Family::RedHat),
            (Some("rocky"), &[], Family::RedHat),
            (Some("almalinux"), &[], Family::RedHat),
            (Some("amzn"), &["centos", "rhel", "fedora"], Family::RedHat),
            (Some("arch"), &[], Family::Arch),
            (Some("manjaro"), &["arch"], Family::Arch),
            (Some("opensuse-leap"), &["suse", "opensuse"], Family::Suse),
            (Some("opensuse-tumbleweed"), &[], Family::Suse),
            (Some("sles"), &[], Family::Suse),
            // Unknown IDs fall through to ID_LIKE, first known entry wins.
            (Some("linuxmint"), &["ubuntu", "debian"], Family::Debian),
            (Some("someos"), &["plan9", "arch", "debian"], Family::Arch),
            (None, &["alpine"], Family::Alpine),
            // The ID wins over ID_LIKE.
            (Some("alpine"), &["debian"], Family::Alpine),
        ];
        for (id, id_like, expected) in cases {
            let release = release(*id, id_like);
            assert_eq!(choose_family(&release), Ok(*expected), "{release:?}");
        }
    }

    #[test]
    fn an_unknown_distribution_is_named_with_the_supported_families() {
        let message = choose_family(&release(Some("plan9"), &[]))
            .unwrap_err()
            .to_string();
        assert!(message.contains("ID=plan9 and no ID_LIKE"), "{message}");
        assert!(message.contains("alpine (apk)"), "{message}");
        assert!(message.contains("zypper"), "{message}");
        let message = choose_family(&release(Some("gentoo"), &["funtoo", "x"]))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("ID=gentoo and ID_LIKE=\"funtoo x\""),
            "{message}"
        );
        let message = choose_family(&release(None, &[])).unwrap_err().to_string();
        assert!(message.contains("no ID and no ID_LIKE"), "{message}");
    }

    #[test]
    fn red_hat_prefers_dnf_and_falls_back_to_yum() {
        let only = |present: &'static str| move |program: &str| program == present;
        assert_eq!(
            choose_manager(Family::RedHat, |_| true),
            Ok(PackageManager::Dnf)
        );
        assert_eq!(
            choose_manager(Family::RedHat, only("yum")),
            Ok(PackageManager::Yum)
        );
        assert_eq!(
            choose_manager(Family::Debian, only("apt-get")),
            Ok(PackageManager::AptGet)
        );
        assert_eq!(
            choose_manager(Family::Arch, only("pacman")),
            Ok(PackageManager::Pacman)
        );
        assert_eq!(
            choose_manager(Family::Suse, only("zypper")),
            Ok(PackageManager::Zypper)
        );
        let missing = choose_manager(Family::RedHat, |_| false).unwrap_err();
        assert!(missing.contains("Red Hat-family"), "{missing}");
        assert!(missing.contains("no dnf or yum"), "{missing}");
        let missing = choose_manager(Family::Alpine, only("apt-get")).unwrap_err();
        assert!(missing.contains("no apk"), "{missing}");
    }

    #[test]
    fn install_commands_are_non_interactive() {
        let shown = |manager: PackageManager| -> Vec<String> {
            manager
                .install_openssh()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            shown(PackageManager::AptGet),
            [
                "DEBIAN_FRONTEND=noninteractive apt-get update",
                "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                 openssh-server",
            ]
        );
        assert_eq!(
            shown(PackageManager::Apk),
            ["apk add --no-cache openssh-server"]
        );
        assert_eq!(
            shown(PackageManager::Dnf),
            ["dnf install -y openssh-server"]
        );
        assert_eq!(
            shown(PackageManager::Yum),
            ["yum install -y openssh-server"]
        );
        assert_eq!(
            shown(PackageManager::Pacman),
            ["pacman -Sy --noconfirm openssh"]
        );
        assert_eq!(
            shown(PackageManager::Zypper),
            ["zypper --non-interactive install openssh-server"]
        );
        for manager in [
            PackageManager::AptGet,
            PackageManager::Apk,
            PackageManager::Dnf,
            PackageManager::Yum,
            PackageManager::Pacman,
            PackageManager::Zypper,
        ] {
            for invocation in manager.install_openssh() {
                assert_eq!(invocation.argv[0], manager.program());
            }
        }
    }

    #[test]
    fn tails_keep_the_last_lines() {
        assert_eq!(tail(b"", 3), "");
        assert_eq!(tail(b"\n\n", 3), "");
        assert_eq!(tail(b"one\ntwo\n", 3), "one\ntwo");
        assert_eq!(tail(b"1\n2\n3\n4\n5\n\n", 2), "4\n5");
        assert_eq!(tail(b"E: \xff bad\n", 1), "E: \u{fffd} bad");
    }

    #[test]
    fn exits_are_described() {
        let exit = |code, signal| Exit { code, signal };
        assert_eq!(describe_exit(exit(Some(1), None)), "exit code 1");
        assert_eq!(describe_exit(exit(None, Some(9))), "killed by signal 9");
    }
}
