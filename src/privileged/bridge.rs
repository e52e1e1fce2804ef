//! banger's bridge network for `--network tap` VMs: a Linux bridge (`banger0`) holding the
//! first address of the configured subnet, a tap per VM attached to it, NAT and published
//! ports in nftables (`table inet banger`, written by [`crate::net::nft`]), and IPv4
//! forwarding.
//!
//! Its life:
//! 1. [`ensure`] (as root): refuses a subnet the host already routes, makes the bridge if
//!    missing (or checks the one there has the configured address), turns IPv4 forwarding on
//!    if it was off (remembering so in a marker file in the runtime directory, which a reboot
//!    clears with the bridge), and writes the ruleset.
//! 2. [`create_tap`] makes a tap on the bridge (the daemon keeps a few ready: see
//!    `ops::network`); [`super::TapDevice::delete_by_name`] removes one.
//! 3. [`apply_ruleset`] rewrites the table when published ports change.
//! 4. [`teardown`] removes every bridge tap, the table and the bridge, and turns forwarding
//!    back off if banger turned it on.
//!
//! Every step is an `ip` or `nft` command (no ioctls: the crate denies `unsafe`), so each
//! failure names a command a person can re-run. Nothing here knows which network namespace
//! it runs in: tests run all of it inside one of their own.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::{PrivilegedError, is_root, run, run_output};
use crate::net::nft::{Ruleset, TABLE};
use crate::net::subnet::Subnet;

/// The bridge's name.
pub const BRIDGE: &str = "banger0";

/// Names of bridge taps: this prefix and a number (within IFNAMSIZ).
pub const TAP_PREFIX: &str = "bgtap";

/// The marker that says banger switched IPv4 forwarding on (so teardown switches it off).
const FORWARDING_MARKER: &str = "network-forwarding-enabled";

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// What exists of the bridge network, for `banger doctor` and `banger network`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkStatus {
    /// The bridge's IPv4 address with its prefix (`10.213.0.1/24`), if the bridge exists.
    pub bridge: Option<String>,
    /// Bridge taps (`bgtap…`), sorted.
    pub taps: Vec<String>,
    /// Whether `table inet banger` exists.
    pub nft_table: bool,
    /// IPv4 forwarding, and whether banger switched it on.
    pub forwarding: bool,
    pub forwarding_by_banger: bool,
}

/// Makes sure the bridge network exists for `subnet`, with `published` DNATs (see the module
/// note). Refuses before touching anything when not root or when the subnet clashes.
pub fn ensure(
    subnet: Subnet,
    published: &[(crate::spec::PortForward, Ipv4Addr)],
    marker_dir: &Path,
) -> Result<(), PrivilegedError> {
    if !is_root() {
        return Err(PrivilegedError::TapNeedsRoot {
            bridge: BRIDGE.to_owned(),
        });
    }
    let expected = format!("{}/{}", subnet.gateway(), subnet.prefix());
    match bridge_address()? {
        Some(found) if found == expected => {}
        Some(found) => {
            return Err(PrivilegedError::BridgeMismatch {
                bridge: BRIDGE.to_owned(),
                found,
                expected,
            });
        }
        None => {
            check_no_clash(subnet)?;
            create_bridge(&expected)?;
        }
    }
    enable_forwarding(marker_dir)?;
    apply_ruleset(&ruleset(subnet, published, marker_dir))
}

/// The ruleset for `subnet` and `published`, with forwarding restricted to the bridge when
/// banger switched it on.
pub fn ruleset(
    subnet: Subnet,
    published: &[(crate::spec::PortForward, Ipv4Addr)],
    marker_dir: &Path,
) -> Ruleset {
    Ruleset {
        bridge: BRIDGE.to_owned(),
        subnet,
        forward_only_bridge: marker_dir.join(FORWARDING_MARKER).exists(),
        published: published.to_vec(),
    }
}

/// Replaces `table inet banger` with `ruleset` in one `nft` transaction.
pub fn apply_ruleset(ruleset: &Ruleset) -> Result<(), PrivilegedError> {
    run_output(&["nft", "-f", "-"], Some(&ruleset.script())).map(drop)
}

/// The bridge's IPv4 address and prefix, `None` when there is no bridge.
fn bridge_address() -> Result<Option<String>, PrivilegedError> {
    if !super::sys_class_net(BRIDGE).exists() {
        return Ok(None);
    }
    let json = run_output(&["ip", "-j", "-4", "addr", "show", "dev", BRIDGE], None)?;
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    let address = parsed
        .get(0)
        .and_then(|link| link.get("addr_info"))
        .and_then(|infos| infos.get(0))
        .and_then(|info| {
            Some(format!(
                "{}/{}",
                info.get("local")?.as_str()?,
                info.get("prefixlen")?.as_u64()?
            ))
        });
    Ok(Some(address.unwrap_or_else(|| "no address".to_owned())))
}

/// The host route (other than the bridge's own) that overlaps `subnet`, if any. Reading
/// routes needs no privilege.
pub fn subnet_clash(subnet: Subnet) -> Result<Option<String>, PrivilegedError> {
    let json = run_output(&["ip", "-j", "-4", "route", "show", "table", "all"], None)?;
    Ok(clashing_route(&json, subnet))
}

/// Refuses `subnet` when a route of the host (other than the bridge's own) overlaps it.
fn check_no_clash(subnet: Subnet) -> Result<(), PrivilegedError> {
    if let Some(route) = subnet_clash(subnet)? {
        return Err(PrivilegedError::SubnetClash {
            subnet: subnet.to_string(),
            route,
        });
    }
    Ok(())
}

/// The first route in `ip -j route` output `json` that overlaps `subnet`, as text.
pub fn clashing_route(json: &str, subnet: Subnet) -> Option<String> {
    let routes: Vec<serde_json::Value> = serde_json::from_str(json).ok()?;
    routes.iter().find_map(|route| {
        let dst = route.get("dst")?.as_str()?;
        let dev = route.get("dev").and_then(|dev| dev.as_str()).unwrap_or("");
        if dst == "default" || dev == BRIDGE {
            return None;
        }
        // Local and broadcast routes of the host's own addresses name a bare address.
        let (address, prefix) = dst.split_once('/').unwrap_or((dst, "32"));
        let address: Ipv4Addr = address.parse().ok()?;
        let prefix: u32 = prefix.parse().ok().filter(|prefix| *prefix <= 32)?;
        // Two prefixes overlap when they agree on the shorter one's bits.
        let shorter = prefix.min(u32::from(subnet.prefix()));
        let mask = u32::MAX.checked_shl(32 - shorter).unwrap_or(0);
        (u32::from(address) & mask == u32::from(subnet.network()) & mask)
            .then(|| format!("{dst} dev {dev}"))
    })
}

fn create_bridge(address: &str) -> Result<(), PrivilegedError> {
    run(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
    let configured = run(&["ip", "addr", "add", address, "dev", BRIDGE])
        .and_then(|()| run(&["ip", "link", "set", BRIDGE, "up"]))
        // A `127.0.0.1` published port is DNATed in `output` and leaves with a loopback
        // source, which the kernel routes out of a non-loopback device only with this.
        .and_then(|()| {
            write_sysctl(
                &PathBuf::from(format!("/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet")),
                "1",
            )
        });
    if let Err(error) = configured {
        let _ = run(&["ip", "link", "del", BRIDGE]);
        return Err(error);
    }
    Ok(())
}

fn enable_forwarding(marker_dir: &Path) -> Result<(), PrivilegedError> {
    let path = PathBuf::from(IP_FORWARD);
    if read_sysctl(&path)? == "1" {
        return Ok(());
    }
    let marker = marker_dir.join(FORWARDING_MARKER);
    std::fs::write(&marker, "banger switched net.ipv4.ip_forward on\n").map_err(|source| {
        PrivilegedError::Sysctl {
            what: "write",
            path: marker.clone(),
            source,
        }
    })?;
    write_sysctl(&path, "1")
}

fn read_sysctl(path: &Path) -> Result<String, PrivilegedError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|source| PrivilegedError::Sysctl {
            what: "read",
            path: path.to_owned(),
            source,
        })
}

fn write_sysctl(path: &Path, value: &str) -> Result<(), PrivilegedError> {
    std::fs::write(path, value).map_err(|source| PrivilegedError::Sysctl {
        what: "write",
        path: path.to_owned(),
        source,
    })
}

/// Adds tap `name` owned by `owner_uid` to the bridge, up. A failure part-way deletes it.
pub fn create_tap(name: &str, owner_uid: u32) -> Result<(), PrivilegedError> {
    if !is_root() {
        return Err(PrivilegedError::TapNeedsRoot {
            bridge: BRIDGE.to_owned(),
        });
    }
    let uid = owner_uid.to_string();
    run(&[
        "ip", "tuntap", "add", "dev", name, "mode", "tap", "user", &uid,
    ])?;
    let attached = run(&["ip", "link", "set", name, "master", BRIDGE])
        .and_then(|()| run(&["ip", "link", "set", name, "up"]));
    if let Err(error) = attached {
        let _ = super::TapDevice::delete_by_name(name);
        return Err(error);
    }
    Ok(())
}

/// The bridge taps that exist (`bgtap…`), sorted.
pub fn taps() -> Vec<String> {
    let mut taps: Vec<String> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| is_bridge_tap(name))
        .collect();
    taps.sort();
    taps
}

/// Whether `name` is one of banger's bridge tap names.
pub fn is_bridge_tap(name: &str) -> bool {
    name.strip_prefix(TAP_PREFIX)
        .is_some_and(|number| !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes everything [`ensure`] and [`create_tap`] made: taps, table, bridge, and the
/// forwarding banger switched on. What is already gone is skipped.
pub fn teardown(marker_dir: &Path) -> Result<(), PrivilegedError> {
    if !is_root() {
        return Err(PrivilegedError::TapNeedsRoot {
            bridge: BRIDGE.to_owned(),
        });
    }
    for tap in taps() {
        super::TapDevice::delete_by_name(&tap)?;
    }
    if nft_table_exists() {
        run(&["nft", "delete", "table", "inet", TABLE])?;
    }
    if super::sys_class_net(BRIDGE).exists() {
        run(&["ip", "link", "del", BRIDGE])?;
    }
    let marker = marker_dir.join(FORWARDING_MARKER);
    if marker.exists() {
        write_sysctl(Path::new(IP_FORWARD), "0")?;
        let _ = std::fs::remove_file(&marker);
    }
    Ok(())
}

/// When systemd-resolved runs, sends the host's `*.vm` lookups to `server` (the daemon's DNS
/// on the bridge) through the bridge link: `Ok(false)` when it does not run.
pub fn route_dns(server: Ipv4Addr) -> Result<bool, PrivilegedError> {
    if !resolved_runs() {
        return Ok(false);
    }
    let server = server.to_string();
    run(&["resolvectl", "dns", BRIDGE, &server])?;
    run(&["resolvectl", "domain", BRIDGE, "~vm"])?;
    Ok(true)
}

/// Undoes [`route_dns`] (the bridge's per-link DNS settings go back to none).
pub fn unroute_dns() {
    if resolved_runs() && super::sys_class_net(BRIDGE).exists() {
        let _ = run(&["resolvectl", "revert", BRIDGE]);
    }
}

/// Whether systemd-resolved answers here (its varlink socket exists and resolvectl is
/// installed).
fn resolved_runs() -> bool {
    Path::new("/run/systemd/resolve/io.systemd.Resolve").exists()
        && crate::env::find_program("resolvectl").is_some()
}

fn nft_table_exists() -> bool {
    run(&["nft", "list", "table", "inet", TABLE]).is_ok()
}

/// What exists now.
pub fn status(marker_dir: &Path) -> NetworkStatus {
    NetworkStatus {
        bridge: bridge_address().ok().flatten(),
        taps: taps(),
        nft_table: nft_table_exists(),
        forwarding: read_sysctl(Path::new(IP_FORWARD)).is_ok_and(|value| value == "1"),
        forwarding_by_banger: marker_dir.join(FORWARDING_MARKER).exists(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_overlapping_the_subnet_is_a_clash_and_default_or_the_bridge_is_not() {
        let subnet = crate::net::subnet::DEFAULT_SUBNET;
        let routes = r#"[
            {"dst":"default","gateway":"192.168.1.1","dev":"eth0"},
            {"dst":"192.168.1.0/24","dev":"eth0"},
            {"dst":"10.213.0.0/24","dev":"banger0"}
        ]"#;
        assert_eq!(clashing_route(routes, subnet), None);
        let vpn = r#"[{"dst":"10.0.0.0/8","dev":"tun0"}]"#;
        assert_eq!(
            clashing_route(vpn, subnet).as_deref(),
            Some("10.0.0.0/8 dev tun0")
        );
        let narrow = r#"[{"dst":"10.213.0.128/25","dev":"docker1"}]"#;
        assert_eq!(
            clashing_route(narrow, subnet).as_deref(),
            Some("10.213.0.128/25 dev docker1")
        );
        let host = r#"[{"type":"local","dst":"10.213.0.9","dev":"eth1"}]"#;
        assert_eq!(
            clashing_route(host, subnet).as_deref(),
            Some("10.213.0.9 dev eth1")
        );
        let elsewhere = r#"[{"dst":"10.0.0.0/9","dev":"tun0"},
            {"dst":"10.213.1.0/30","dev":"x"},{"dst":"10.212.255.255","dev":"y"}]"#;
        assert_eq!(clashing_route(elsewhere, subnet), None);
        let tiny = r#"[{"dst":"10.213.0.128/30","dev":"x"}]"#;
        assert!(clashing_route(tiny, subnet).is_some());
    }

    /// Runs the rest of the calling test inside a network namespace of its own: `false`
    /// here, after the namespace's run (asserted successful) and its removal; `true` inside.
    /// Skipped (false) without root, `ip` or `nft`, unless CI requires every capability.
    fn inside_own_netns(test: &str) -> bool {
        if std::env::var_os(crate::env::BANGER_TEST_NETNS).is_some() {
            return true;
        }
        let capable = is_root()
            && crate::env::find_program("ip").is_some()
            && crate::env::find_program("nft").is_some();
        if !capable {
            assert!(
                !crate::env::test_require_all(),
                "{test} needs root, ip and nft"
            );
            eprintln!("skipped {test}: needs root, ip and nft");
            return false;
        }
        let namespace = format!("bgt{}", std::process::id());
        run(&["ip", "netns", "add", &namespace]).unwrap();
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", &namespace])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(crate::env::BANGER_TEST_NETNS, &namespace)
            .output()
            .unwrap();
        let _ = run(&["ip", "netns", "del", &namespace]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        false
    }

    #[test]
    fn in_a_namespace_the_bridge_its_taps_and_nat_come_and_go_leaving_nothing() {
        let test = "privileged::bridge::tests::\
                    in_a_namespace_the_bridge_its_taps_and_nat_come_and_go_leaving_nothing";
        if !inside_own_netns(test) {
            return;
        }
        run(&["ip", "link", "set", "lo", "up"]).unwrap();
        let markers = tempfile::tempdir().unwrap();
        let subnet = crate::net::subnet::DEFAULT_SUBNET;
        // A fresh namespace forwards nothing: banger switches it on and says so.
        assert_eq!(read_sysctl(Path::new(IP_FORWARD)).unwrap(), "0");
        ensure(subnet, &[], markers.path()).unwrap();
        ensure(subnet, &[], markers.path()).unwrap();
        let made = status(markers.path());
        assert_eq!(made.bridge.as_deref(), Some("10.213.0.1/24"));
        assert!(
            made.nft_table && made.forwarding && made.forwarding_by_banger,
            "{made:?}"
        );

        create_tap("bgtap0", 0).unwrap();
        create_tap("bgtap1", 0).unwrap();
        assert_eq!(taps(), ["bgtap0", "bgtap1"]);
        let master = std::fs::read_link("/sys/class/net/bgtap0/master").unwrap();
        assert!(master.ends_with(BRIDGE), "{master:?}");

        let published = [(
            crate::spec::PortForward::parse("18080:8080").unwrap(),
            Ipv4Addr::new(10, 213, 0, 2),
        )];
        apply_ruleset(&ruleset(subnet, &published, markers.path())).unwrap();
        let listed = run_output(&["nft", "list", "table", "inet", TABLE], None).unwrap();
        assert!(listed.contains("dnat ip to 10.213.0.2:8080"), "{listed}");
        assert!(listed.contains("masquerade"), "{listed}");

        let other = Subnet::parse("10.99.0.0/24").unwrap();
        let mismatch = ensure(other, &[], markers.path()).unwrap_err();
        assert!(
            mismatch
                .to_string()
                .contains("exists with 10.213.0.1/24, not 10.99.0.1/24"),
            "{mismatch}"
        );

        teardown(markers.path()).unwrap();
        assert_eq!(status(markers.path()), NetworkStatus::default());
        teardown(markers.path()).unwrap();

        // A subnet the host routes already is refused, and nothing is made.
        // (A veth, not a dummy: some hosts' kernels lack the dummy module.)
        run(&[
            "ip", "link", "add", "bgveth0", "type", "veth", "peer", "name", "bgveth1",
        ])
        .unwrap();
        run(&["ip", "addr", "add", "10.213.0.77/16", "dev", "bgveth0"]).unwrap();
        run(&["ip", "link", "set", "bgveth0", "up"]).unwrap();
        let clash = ensure(subnet, &[], markers.path()).unwrap_err();
        assert!(
            matches!(clash, PrivilegedError::SubnetClash { .. })
                && clash.to_string().contains("10.213.0.0/16 dev bgveth0"),
            "{clash}"
        );
        assert_eq!(status(markers.path()).bridge, None);
    }

    #[test]
    fn bridge_tap_names_are_the_prefix_and_a_number() {
        assert!(is_bridge_tap("bgtap0"));
        assert!(is_bridge_tap("bgtap123"));
        assert!(!is_bridge_tap("bgtap"));
        assert!(!is_bridge_tap("bgtapx"));
        assert!(!is_bridge_tap("bgr-abc"));
        assert!(!is_bridge_tap("eth0"));
    }
}
