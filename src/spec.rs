//! The validated description of a sandbox: what a Bangerfile means once every default is
//! resolved.
//!
//! A [`Spec`] is pure data. It is produced by [`crate::bangerfile`] (which owns parsing and
//! diagnostics) and consumed by [`crate::plan`] (which lowers it into a DAG of steps). Nothing
//! here does I/O, so a `Spec` can be built by hand in tests.
//!
//! Invariants a `Spec` upholds (the Bangerfile validator guarantees them):
//! - `images` is in dependency order: an image built `from` another local image comes after it,
//!   and there are no cycles.
//! - `sandbox_image` names an entry of `images`.
//! - every path is either relative to `project_dir` (project files) or a guest path that starts
//!   with `/`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// The longest timeout banger accepts anywhere (a week): a deadline is `now + timeout`, and a
/// value near `u64::MAX` seconds would overflow it.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 86_400;

/// Everything `banger up` needs to know about a project's sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The Bangerfile this spec came from (absolute or as given on the command line).
    pub source_file: PathBuf,
    /// The directory that relative project paths are resolved against (the Bangerfile's dir).
    pub project_dir: PathBuf,
    /// Project name: `[project] name`, else the project directory's name.
    pub name: String,
    /// Images in dependency order; the sandbox image is among them.
    pub images: Vec<ImageSpec>,
    /// Name of the image `banger up` boots (`"sandbox"` for the `[image]` table).
    pub sandbox_image: String,
    /// The VM shape `banger up` boots with.
    pub vm: VmShape,
    /// Host ports forwarded to the sandbox's guest ports (`[vm] ports`).
    pub ports: Vec<PortForward>,
    /// Host directory imported into the guest, if any.
    pub workspace: Option<WorkspaceSpec>,
    /// The command `banger up` runs once the sandbox is ready, if any.
    pub up: Option<UpCommand>,
    /// Files copied from the host into the guest on every boot.
    pub file_sync: Vec<FileSyncSpec>,
}

impl Spec {
    /// The image with this name, if the Bangerfile defines it.
    pub fn image(&self, name: &str) -> Option<&ImageSpec> {
        self.images.iter().find(|image| image.name == name)
    }
}

/// Name given to the `[image]` table: the image `banger up` boots.
pub const SANDBOX_IMAGE_NAME: &str = "sandbox";

/// One image: a base plus ordered provisioning steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// `"sandbox"` for `[image]`, else the key of `[images.NAME]`.
    pub name: String,
    /// Where the base root filesystem comes from.
    pub from: ImageSource,
    /// Fixed ext4 size; `None` means content × headroom with a floor.
    pub size: Option<ByteSize>,
    /// Kernel catalog name the image boots with.
    pub kernel: String,
    /// Provisioning steps, applied in order, each cached like an image layer.
    pub provision: Vec<ProvisionStep>,
}

/// Where an image's base root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A bundle listed in the image catalog (`debian-bookworm`).
    Catalog { name: String },
    /// Any OCI reference (`docker.io/library/alpine:3.20`, `localhost:5000/x@sha256:…`).
    Oci { reference: String },
    /// A root filesystem built from distribution packages.
    Recipe(RecipeSpec),
    /// Another image defined in the same Bangerfile (`[images.NAME]`).
    Image { name: String },
}

/// A distribution recipe: a base image built from packages (e.g. with `mmdebstrap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeSpec {
    /// Distribution family; only `debian` exists today.
    pub distro: String,
    /// Release name (`bookworm`).
    pub suite: String,
    /// Packages installed on top of the recipe's own base set, sorted and deduplicated.
    pub packages: Vec<String>,
}

/// One provisioning step. Each produces a new root filesystem from the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvisionStep {
    /// Run a shell command inside the image (`sh -c`).
    Run {
        command: String,
        /// Extra environment for the command, sorted by name.
        env: BTreeMap<String, String>,
        /// How long the command may run before the step fails (not part of its key).
        timeout: std::time::Duration,
        /// What runs as the builder VM's PID 1.
        init: BuilderInit,
    },
    /// Copy a project file or directory into the image.
    Copy {
        /// Path relative to the project directory.
        src: PathBuf,
        /// Absolute guest path.
        dest: String,
        /// File mode to apply; `None` keeps the host file's mode.
        mode: Option<u32>,
    },
}

/// Who is PID 1 in the builder VM of a `run` step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BuilderInit {
    /// banger's agent, as `docker build` runs `RUN` without an init: boots fastest.
    #[default]
    Agent,
    /// The image's systemd, for the rare command that needs running services.
    Systemd,
}

impl BuilderInit {
    pub fn as_str(self) -> &'static str {
        match self {
            BuilderInit::Agent => "agent",
            BuilderInit::Systemd => "systemd",
        }
    }
}

/// How long a `run` step may take unless its entry says otherwise.
pub const DEFAULT_RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The VM's resources and network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmShape {
    pub vcpu: u32,
    pub memory: ByteSize,
    pub disk: ByteSize,
    pub network: NetworkMode,
}

impl fmt::Display for VmShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vcpu · {} MiB · {} disk · {} network",
            self.vcpu,
            self.memory.as_mib(),
            self.disk,
            self.network
        )
    }
}

/// How the guest reaches the network. Serialized as its name (`"none"`), as the daemon's
/// protocol carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// Rootless user-mode networking with forwarded ports.
    User,
    /// A tap device on a host bridge (needs root).
    Tap,
    /// No network device at all.
    None,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::User => "user",
            NetworkMode::Tap => "tap",
            NetworkMode::None => "none",
        }
    }

    /// The mode [`NetworkMode::as_str`] names.
    pub fn from_name(name: &str) -> Option<NetworkMode> {
        [NetworkMode::User, NetworkMode::Tap, NetworkMode::None]
            .into_iter()
            .find(|mode| mode.as_str() == name)
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A published port: connections to `host_ip:host_port` on the host reach `guest_port` in
/// the guest. Written `[HOST_IP:]HOST_PORT:GUEST_PORT[/udp]`, as `docker run -p` does, except
/// that the host address defaults to loopback (`127.0.0.1`): a sandbox's service is not put
/// on the host's network unless `0.0.0.0:` says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortForward {
    pub host_ip: std::net::Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: PortProtocol,
}

/// The transport a published port forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortProtocol {
    Tcp,
    Udp,
}

impl PortProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        }
    }
}

impl PortForward {
    /// TCP from `host_port` on the host's loopback to `guest_port`.
    pub fn loopback_tcp(host_port: u16, guest_port: u16) -> PortForward {
        PortForward {
            host_ip: std::net::Ipv4Addr::LOCALHOST,
            host_port,
            guest_port,
            protocol: PortProtocol::Tcp,
        }
    }

    /// Reads `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]`; the error says what is wrong with
    /// `text` in words a `-p` user can act on.
    pub fn parse(text: &str) -> Result<PortForward, String> {
        let usage = "expected [HOST_IP:]HOST_PORT:GUEST_PORT[/udp], e.g. `8080:80` or \
                     `0.0.0.0:5353:53/udp`";
        let (addresses, protocol) = match text.rsplit_once('/') {
            Some((addresses, "tcp")) => (addresses, PortProtocol::Tcp),
            Some((addresses, "udp")) => (addresses, PortProtocol::Udp),
            Some((_, other)) => {
                return Err(format!(
                    "`{text}`: unknown protocol `{other}` (use `tcp` or `udp`)"
                ));
            }
            None => (text, PortProtocol::Tcp),
        };
        let fields: Vec<&str> = addresses.split(':').collect();
        let (host_ip, host_port, guest_port) = match fields.as_slice() {
            [host, guest] => (std::net::Ipv4Addr::LOCALHOST, *host, *guest),
            [ip, host, guest] => {
                let ip = ip
                    .parse()
                    .map_err(|_| format!("`{text}`: `{ip}` is not an IPv4 address ({usage})"))?;
                (ip, *host, *guest)
            }
            _ => return Err(format!("`{text}`: {usage}")),
        };
        let port = |field: &str, which: &str| -> Result<u16, String> {
            match field.parse::<u16>() {
                Ok(0) | Err(_) => Err(format!(
                    "`{text}`: the {which} port `{field}` is not a port number (1 to 65535)"
                )),
                Ok(port) => Ok(port),
            }
        };
        Ok(PortForward {
            host_ip,
            host_port: port(host_port, "host")?,
            guest_port: port(guest_port, "guest")?,
            protocol,
        })
    }

    /// The same forward's twin on another transport can share its host port; two forwards
    /// of one transport cannot.
    pub fn clashes_with(&self, other: &PortForward) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.host_ip == other.host_ip
                || self.host_ip.is_unspecified()
                || other.host_ip.is_unspecified())
    }
}

/// Checks that no two of `ports` would bind the same host port.
pub fn check_port_clashes(ports: &[PortForward]) -> Result<(), String> {
    for (index, port) in ports.iter().enumerate() {
        if let Some(other) = ports[..index].iter().find(|other| other.clashes_with(port)) {
            return Err(format!(
                "`{other}` and `{port}` publish the same host port {}/{}",
                port.host_port,
                port.protocol.as_str()
            ));
        }
    }
    Ok(())
}

impl fmt::Display for PortForward {
    /// The canonical form, which [`PortForward::parse`] reads back: `127.0.0.1:8080:80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}/{}",
            self.host_ip,
            self.host_port,
            self.guest_port,
            self.protocol.as_str()
        )
    }
}

impl serde::Serialize for PortForward {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PortForward {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        PortForward::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A host directory imported into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceSpec {
    /// Host path relative to the project directory (`.` for the project itself).
    pub host: PathBuf,
    /// Absolute guest path.
    pub guest: String,
}

/// What `banger up` runs in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpCommand {
    /// Shell command line, run with `sh -c` in the workspace (or `/root`).
    pub run: String,
}

/// A host file copied into the guest at boot (credentials, dotfiles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSyncSpec {
    /// Host path as written; `~/` is expanded when the sync runs, not when planning.
    pub host: String,
    /// Absolute guest path.
    pub guest: String,
    /// Mode for the guest copy; `None` keeps the host file's mode.
    pub mode: Option<u32>,
}

/// A size in bytes, written in Bangerfiles as `512M`, `4G`, `2GiB` or a plain byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;

    pub fn bytes(self) -> u64 {
        self.0
    }

    pub fn as_mib(self) -> u64 {
        self.0 / Self::MIB
    }

    /// Parses `123`, `512K`, `512M`, `4G`, `1T`, with optional `i`/`iB`/`B` suffixes; all units
    /// are binary (1G = 1024 MiB), as disk and memory sizes are.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(split);
        if digits.is_empty() {
            return Err(format!(
                "`{text}` is not a size: expected a number with an optional unit, like `512M` or `4G`"
            ));
        }
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("`{text}` is too large"))?;
        let multiplier = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KI" | "KIB" => Self::KIB,
            "M" | "MB" | "MI" | "MIB" => Self::MIB,
            "G" | "GB" | "GI" | "GIB" => Self::GIB,
            "T" | "TB" | "TI" | "TIB" => Self::GIB * 1024,
            _ => {
                return Err(format!(
                    "`{text}` has an unknown unit `{unit}`: use K, M, G or T"
                ));
            }
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly (`8G`, `1536M`, `100`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (Self::GIB * 1024, "T"),
            (Self::GIB, "G"),
            (Self::MIB, "M"),
            (Self::KIB, "K"),
        ];
        for (size, suffix) in units {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{}", self.0 / size, suffix);
            }
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_parse_like_docker_with_loopback_as_the_default_host_address() {
        let port = PortForward::parse("8080:80").unwrap();
        assert_eq!(port.to_string(), "127.0.0.1:8080:80/tcp");
        assert_eq!(PortForward::parse(&port.to_string()), Ok(port));
        let udp = PortForward::parse("0.0.0.0:5353:53/udp").unwrap();
        assert_eq!(
            (udp.host_ip, udp.host_port, udp.guest_port, udp.protocol),
            (std::net::Ipv4Addr::UNSPECIFIED, 5353, 53, PortProtocol::Udp)
        );
        for (bad, says) in [
            ("80", "expected [HOST_IP:]HOST_PORT:GUEST_PORT"),
            ("0:80", "host port `0`"),
            ("8080:70000", "guest port `70000`"),
            ("x.y:1:2", "`x.y` is not an IPv4 address"),
            ("1:2/sctp", "unknown protocol `sctp`"),
            ("1:2:3:4", "expected"),
        ] {
            let error = PortForward::parse(bad).unwrap_err();
            assert!(
                error.contains(says) && error.contains(bad),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn two_forwards_of_one_transport_on_one_host_port_clash() {
        let ports = |texts: &[&str]| -> Vec<PortForward> {
            texts
                .iter()
                .map(|text| PortForward::parse(text).unwrap())
                .collect()
        };
        assert!(check_port_clashes(&ports(&["8080:80", "8080:80/udp", "8081:80"])).is_ok());
        assert!(check_port_clashes(&ports(&["127.0.0.2:8080:80", "8080:81"])).is_ok());
        let error = check_port_clashes(&ports(&["8080:80", "0.0.0.0:8080:81"])).unwrap_err();
        assert!(error.contains("same host port 8080/tcp"), "{error}");
    }

    #[test]
    fn byte_sizes_parse_binary_units() {
        assert_eq!(ByteSize::parse("4G"), Ok(ByteSize(4 * ByteSize::GIB)));
        assert_eq!(ByteSize::parse("512MiB"), Ok(ByteSize(512 * ByteSize::MIB)));
        assert_eq!(ByteSize::parse("100"), Ok(ByteSize(100)));
        assert!(ByteSize::parse("4X").unwrap_err().contains("unknown unit"));
        assert!(ByteSize::parse("G").is_err());
        assert!(ByteSize::parse("99999999999999999999G").is_err());
    }

    #[test]
    fn byte_sizes_display_in_the_largest_exact_unit() {
        assert_eq!(ByteSize(8 * ByteSize::GIB).to_string(), "8G");
        assert_eq!(ByteSize(1536 * ByteSize::MIB).to_string(), "1536M");
        assert_eq!(ByteSize(100).to_string(), "100");
    }
}
