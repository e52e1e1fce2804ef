//! The kernel command line: splitting it like the kernel does, and the parameters banger's
//! init and network setup read from it. Pure: parsing only, so everything here is unit-tested
//! on the host. `docs/agent.md` lists the parameters.

use std::net::Ipv4Addr;
use std::time::Duration;

/// How long init waits for the root (or overlay) device unless told otherwise.
pub const DEFAULT_DEVICE_TIMEOUT: Duration = Duration::from_secs(30);

/// A split command line: `name` or `name=value` parameters, then what follows `--`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub params: Vec<(String, Option<String>)>,
    /// Arguments after `--`, which the kernel hands to init.
    pub init_args: Vec<String>,
}

impl Cmdline {
    /// Splits at unquoted whitespace; double quotes group and are removed, as the kernel's
    /// `next_arg` does (`name="a b"` and `"name=a b"` both give `a b`).
    pub fn parse(text: &str) -> Cmdline {
        let mut words = Vec::new();
        let mut current = String::new();
        let mut in_word = false;
        let mut quoted = false;
        for character in text.chars() {
            match character {
                '"' => {
                    quoted = !quoted;
                    in_word = true;
                }
                c if c.is_whitespace() && !quoted => {
                    if in_word {
                        words.push(std::mem::take(&mut current));
                        in_word = false;
                    }
                }
                c => {
                    current.push(c);
                    in_word = true;
                }
            }
        }
        if in_word {
            words.push(current);
        }
        let mut cmdline = Cmdline::default();
        let mut words = words.into_iter();
        for word in words.by_ref() {
            if word == "--" {
                break;
            }
            cmdline.params.push(match word.split_once('=') {
                Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
                None => (word, None),
            });
        }
        cmdline.init_args = words.collect();
        cmdline
    }

    /// The value of the last `name=value` (later parameters override earlier ones).
    pub fn value(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(key, value)| key == name && value.is_some())
            .and_then(|(_, value)| value.as_deref())
    }

    /// Whether `name` appears at all, with or without a value.
    pub fn has(&self, name: &str) -> bool {
        self.params.iter().any(|(key, _)| key == name)
    }
}

/// The writable layer over a read-only root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    /// `banger.overlay=tmpfs`: changes live in memory and vanish at power-off.
    Tmpfs { size: Option<String> },
    /// `banger.overlay=/dev/vdb`: changes go to a disk that already holds a filesystem.
    Device { path: String, fstype: String },
}

/// Who runs as PID 1 once the root is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitChoice {
    /// `init=PATH`: exactly this program.
    Path(String),
    /// The default: the image's init if it is systemd, which starts the agent unit banger
    /// installed; with any other init (busybox, OpenRC) or none, the agent stays PID 1,
    /// since nothing would start it otherwise.
    Auto,
    /// `banger.init=image`: the image's own init (`/sbin/init`, then systemd) whatever it
    /// is; the agent is reachable only if the image starts it.
    Image,
    /// `banger.init=agent`: the agent stays PID 1 even if the image has an init.
    Agent,
}

/// Everything init mode reads from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    /// `root=`: a device path such as `/dev/vda`.
    pub root: Option<String>,
    /// `rootfstype=`; unset means every block filesystem the kernel knows, ext4 first.
    pub root_fstype: Option<String>,
    /// `rootflags=`: filesystem-specific mount options.
    pub root_flags: Option<String>,
    /// `ro`/`rw`, the last one wins; read-only when neither is given, like the kernel.
    pub read_only: bool,
    /// How long to wait for block devices; `None` waits forever (`rootwait`).
    pub device_timeout: Option<Duration>,
    pub init: InitChoice,
    pub overlay: Option<Overlay>,
    /// `banger.work=/dev/vdX`: an ext4 disk mounted on `/root`, the VM's work area that
    /// survives stop/start whatever happens to the root's writable layer.
    pub work: Option<String>,
    /// `quiet`: only warnings and errors on the console.
    pub quiet: bool,
    /// `ip=`, for images where the agent stays PID 1.
    pub ip: Option<IpConfig>,
    /// `banger.builder`: a throwaway builder VM whose writable layer the host turns into an
    /// image layer. The overlay is mounted so that its upper directory is a self-contained
    /// diff (no metacopy, redirects or index), first boot never runs (its identity must not
    /// land in an image), and when the image's init is exec'd a copy of the agent keeps
    /// serving beside it (the intermediate image has no agent unit).
    pub builder: bool,
    pub init_args: Vec<String>,
}

impl InitConfig {
    pub fn from_cmdline(cmdline: &Cmdline) -> Result<InitConfig, String> {
        let mut read_only = true;
        for (name, value) in &cmdline.params {
            match (name.as_str(), value) {
                ("ro", None) => read_only = true,
                ("rw", None) => read_only = false,
                _ => {}
            }
        }
        let device_timeout = if let Some(seconds) = cmdline.value("rootwait") {
            Some(parse_seconds("rootwait", seconds)?)
        } else if cmdline.has("rootwait") {
            None
        } else if let Some(seconds) = cmdline.value("rootdelay") {
            Some(parse_seconds("rootdelay", seconds)?)
        } else {
            Some(DEFAULT_DEVICE_TIMEOUT)
        };
        let init = match (cmdline.value("init"), cmdline.value("banger.init")) {
            (_, Some("agent")) => InitChoice::Agent,
            (_, Some(other)) if other != "image" => {
                return Err(format!("banger.init={other}: expected `agent` or `image`"));
            }
            (Some(path), _) => InitChoice::Path(path.to_owned()),
            (None, Some(_)) => InitChoice::Image,
            (None, None) => InitChoice::Auto,
        };
        let overlay = match cmdline.value("banger.overlay") {
            None | Some("") | Some("none") => None,
            Some("tmpfs") => Some(Overlay::Tmpfs {
                size: cmdline.value("banger.overlay_size").map(str::to_owned),
            }),
            Some(path) if path.starts_with("/dev/") => Some(Overlay::Device {
                path: path.to_owned(),
                fstype: cmdline
                    .value("banger.overlay_fstype")
                    .unwrap_or("ext4")
                    .to_owned(),
            }),
            Some(other) => {
                return Err(format!(
                    "banger.overlay={other}: expected `tmpfs` or a device path under /dev"
                ));
            }
        };
        let work = match cmdline.value("banger.work") {
            None | Some("") | Some("none") => None,
            Some(path) if path.starts_with("/dev/") => Some(path.to_owned()),
            Some(other) => {
                return Err(format!(
                    "banger.work={other}: expected a device path under /dev"
                ));
            }
        };
        let ip = match cmdline.value("ip") {
            Some(spec) => IpConfig::parse(spec)?,
            None => None,
        };
        Ok(InitConfig {
            root: cmdline.value("root").map(str::to_owned),
            root_fstype: cmdline.value("rootfstype").map(str::to_owned),
            root_flags: cmdline.value("rootflags").map(str::to_owned),
            read_only,
            device_timeout,
            init,
            overlay,
            work,
            quiet: cmdline.has("quiet"),
            ip,
            builder: match cmdline.value("banger.builder") {
                None => cmdline.has("banger.builder"),
                Some("1") | Some("yes") | Some("true") => true,
                Some("0") | Some("no") | Some("false") => false,
                Some(other) => {
                    return Err(format!("banger.builder={other}: expected 1 or 0"));
                }
            },
            init_args: cmdline.init_args.clone(),
        })
    }
}

fn parse_seconds(name: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{name}={value}: expected a number of seconds"))
}

/// A static address from `ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:
/// <autoconf>:<dns0>:<dns1>`, the kernel's nfsroot syntax that banger passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub hostname: Option<String>,
    /// The interface; the first non-loopback one when empty.
    pub device: Option<String>,
    pub dns: Vec<Ipv4Addr>,
}

impl IpConfig {
    /// `Ok(None)` for the automatic forms (`dhcp`, `off`, …), which are not banger's to do.
    pub fn parse(spec: &str) -> Result<Option<IpConfig>, String> {
        let fields: Vec<&str> = spec.split(':').collect();
        if fields.len() == 1 {
            return Ok(None);
        }
        let field = |index: usize| fields.get(index).copied().filter(|value| !value.is_empty());
        let ip = |index: usize, what: &str| -> Result<Option<Ipv4Addr>, String> {
            field(index)
                .map(|value| {
                    value
                        .parse::<Ipv4Addr>()
                        .map_err(|_| format!("ip=: bad {what} `{value}`"))
                })
                .transpose()
        };
        let Some(address) = ip(0, "client address")? else {
            return Ok(None);
        };
        let prefix_len = match field(3) {
            None => 24,
            Some(mask) => match mask.parse::<u8>() {
                Ok(prefix) if prefix <= 32 => prefix,
                _ => netmask_prefix(mask)?,
            },
        };
        let dns = [ip(7, "dns0")?, ip(8, "dns1")?]
            .into_iter()
            .flatten()
            .collect();
        Ok(Some(IpConfig {
            address,
            prefix_len,
            gateway: ip(2, "gateway")?,
            hostname: field(4).map(str::to_owned),
            device: field(5).map(str::to_owned),
            dns,
        }))
    }
}

/// The prefix length of a dotted netmask, refusing non-contiguous ones.
fn netmask_prefix(mask: &str) -> Result<u8, String> {
    let bits = u32::from(
        mask.parse::<Ipv4Addr>()
            .map_err(|_| format!("ip=: bad netmask `{mask}`"))?,
    );
    let prefix = bits.leading_ones();
    if bits.checked_shl(prefix).unwrap_or(0) != 0 {
        return Err(format!("ip=: netmask `{mask}` is not contiguous"));
    }
    Ok(prefix as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_the_kernel_with_quotes_and_init_arguments() {
        let cmdline = Cmdline::parse(
            "console=ttyS0 root=/dev/vda rw quiet foo=\"a b\" \"bar=c d\" -- single x\n",
        );
        assert_eq!(cmdline.value("root"), Some("/dev/vda"));
        assert!(cmdline.has("rw") && cmdline.has("quiet"));
        assert_eq!(cmdline.value("foo"), Some("a b"));
        assert_eq!(cmdline.value("bar"), Some("c d"));
        assert_eq!(cmdline.init_args, ["single", "x"]);
        assert_eq!(cmdline.value("quiet"), None);
    }

    #[test]
    fn later_values_win_and_values_may_contain_equals() {
        let cmdline = Cmdline::parse("init=/a init=/b rootflags=data=ordered");
        assert_eq!(cmdline.value("init"), Some("/b"));
        assert_eq!(cmdline.value("rootflags"), Some("data=ordered"));
    }

    fn config(text: &str) -> InitConfig {
        InitConfig::from_cmdline(&Cmdline::parse(text)).unwrap()
    }

    #[test]
    fn defaults_follow_the_kernel() {
        let config = config("root=/dev/vda");
        assert_eq!(config.root.as_deref(), Some("/dev/vda"));
        assert!(
            config.read_only,
            "the kernel mounts root read-only by default"
        );
        assert_eq!(config.device_timeout, Some(DEFAULT_DEVICE_TIMEOUT));
        assert_eq!(config.init, InitChoice::Auto);
        assert_eq!(config.overlay, None);
        assert!(!config.quiet);
        assert!(!config.builder);
    }

    #[test]
    fn builder_mode_is_a_flag_or_a_boolean_value() {
        assert!(config("root=/dev/vda banger.builder").builder);
        assert!(config("banger.builder=1").builder);
        assert!(!config("banger.builder=0").builder);
        let error = InitConfig::from_cmdline(&Cmdline::parse("banger.builder=maybe")).unwrap_err();
        assert!(error.contains("banger.builder=maybe"), "{error}");
    }

    #[test]
    fn the_last_of_ro_and_rw_wins() {
        assert!(!config("ro rw").read_only);
        assert!(config("rw ro").read_only);
    }

    #[test]
    fn rootwait_waits_forever_or_for_its_value() {
        assert_eq!(config("rootwait").device_timeout, None);
        assert_eq!(
            config("rootwait=2.5").device_timeout,
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            config("rootdelay=3").device_timeout,
            Some(Duration::from_secs(3))
        );
        assert!(InitConfig::from_cmdline(&Cmdline::parse("rootwait=soon")).is_err());
    }

    #[test]
    fn init_choices() {
        assert_eq!(
            config("init=/bin/sh").init,
            InitChoice::Path("/bin/sh".into())
        );
        assert_eq!(
            config("init=/bin/sh banger.init=agent").init,
            InitChoice::Agent
        );
        assert_eq!(config("banger.init=image").init, InitChoice::Image);
        assert!(InitConfig::from_cmdline(&Cmdline::parse("banger.init=busybox")).is_err());
    }

    #[test]
    fn overlays() {
        assert_eq!(
            config("banger.overlay=tmpfs banger.overlay_size=256m").overlay,
            Some(Overlay::Tmpfs {
                size: Some("256m".into())
            })
        );
        assert_eq!(
            config("banger.overlay=/dev/vdb").overlay,
            Some(Overlay::Device {
                path: "/dev/vdb".into(),
                fstype: "ext4".into()
            })
        );
        assert!(InitConfig::from_cmdline(&Cmdline::parse("banger.overlay=vdb")).is_err());
        assert_eq!(
            config("banger.work=/dev/vdc").work.as_deref(),
            Some("/dev/vdc")
        );
        assert_eq!(config("").work, None);
        assert!(InitConfig::from_cmdline(&Cmdline::parse("banger.work=vdc")).is_err());
    }

    #[test]
    fn static_ip_with_every_field() {
        let ip = IpConfig::parse(
            "172.16.0.2::172.16.0.1:255.255.255.0:sandbox:eth0:off:1.1.1.1:8.8.8.8",
        )
        .unwrap()
        .unwrap();
        assert_eq!(ip.address, Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(ip.prefix_len, 24);
        assert_eq!(ip.gateway, Some(Ipv4Addr::new(172, 16, 0, 1)));
        assert_eq!(ip.hostname.as_deref(), Some("sandbox"));
        assert_eq!(ip.device.as_deref(), Some("eth0"));
        assert_eq!(
            ip.dns,
            [Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]
        );
    }

    #[test]
    fn static_ip_with_few_fields_and_automatic_forms() {
        let ip = IpConfig::parse("10.0.2.15::10.0.2.2:255.255.0.0")
            .unwrap()
            .unwrap();
        assert_eq!(ip.prefix_len, 16);
        assert_eq!(ip.device, None);
        assert!(ip.dns.is_empty());
        assert_eq!(IpConfig::parse("dhcp").unwrap(), None);
        assert_eq!(IpConfig::parse("off").unwrap(), None);
        assert_eq!(IpConfig::parse(":::::eth0:dhcp").unwrap(), None);
    }

    #[test]
    fn bad_addresses_and_masks_are_errors() {
        assert!(IpConfig::parse("10.0.0.300::::").is_err());
        assert!(IpConfig::parse("10.0.0.2:::255.0.255.0").is_err());
        assert_eq!(
            IpConfig::parse("10.0.0.2:::30")
                .unwrap()
                .unwrap()
                .prefix_len,
            30
        );
    }
}
