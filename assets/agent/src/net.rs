//! Bringing the network up from `ip=` with rtnetlink, for images without iproute2 or a
//! network manager (container images run with the agent as PID 1, and `banger-agent
//! network-up` in images whose systemd has no networkd).
//!
//! Netlink requests are plain byte buffers sent on an AF_NETLINK socket, so this needs no
//! `unsafe` and no ioctl structures: loopback up; the interface up; its address; a default
//! route. Each request asks for an acknowledgement, and "already exists" counts as done, so
//! running it twice is harmless.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    socket,
};

use crate::cmdline::IpConfig;

const NLMSG_HEADER_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;
const IFA_ADDRESS: u16 = 1;
const IFLA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// How long to wait for the interface to appear (its driver may still be probing).
const INTERFACE_TIMEOUT: Duration = Duration::from_secs(5);

/// One netlink message: header, fixed body, then attributes, each padded to 4 bytes.
pub fn message(
    kind: u16,
    flags: u16,
    sequence: u32,
    body: &[u8],
    attributes: &[(u16, &[u8])],
) -> Vec<u8> {
    let mut bytes = vec![0u8; NLMSG_HEADER_LEN];
    bytes.extend_from_slice(body);
    pad(&mut bytes);
    for (attribute, value) in attributes {
        let length = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
        bytes.extend_from_slice(&length.to_ne_bytes());
        bytes.extend_from_slice(&attribute.to_ne_bytes());
        bytes.extend_from_slice(value);
        pad(&mut bytes);
    }
    let total = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    bytes[0..4].copy_from_slice(&total.to_ne_bytes());
    bytes[4..6].copy_from_slice(&kind.to_ne_bytes());
    bytes[6..8].copy_from_slice(&flags.to_ne_bytes());
    bytes[8..12].copy_from_slice(&sequence.to_ne_bytes());
    // Bytes 12..16, the sender's port id: 0 lets the kernel fill it in.
    bytes
}

fn pad(bytes: &mut Vec<u8>) {
    while !bytes.len().is_multiple_of(4) {
        bytes.push(0);
    }
}

/// `struct ifinfomsg` setting IFF_UP on `index`.
pub fn link_up_body(index: u32) -> Vec<u8> {
    let mut body = vec![AF_UNSPEC, 0, 0, 0];
    body.extend_from_slice(&(index as i32).to_ne_bytes());
    body.extend_from_slice(&IFF_UP.to_ne_bytes()); // flags
    body.extend_from_slice(&IFF_UP.to_ne_bytes()); // change mask
    body
}

/// `struct ifaddrmsg` for an IPv4 address on `index`.
pub fn address_body(index: u32, prefix_len: u8) -> Vec<u8> {
    let mut body = vec![AF_INET, prefix_len, 0, RT_SCOPE_UNIVERSE];
    body.extend_from_slice(&index.to_ne_bytes());
    body
}

/// `struct rtmsg` for a default IPv4 route in the main table.
pub fn default_route_body() -> Vec<u8> {
    let mut body = vec![
        AF_INET,
        0, // destination prefix length: 0 is the default route
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes());
    body
}

/// The broadcast address of `address/prefix_len`.
pub fn broadcast(address: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let host_bits = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
    Ipv4Addr::from(u32::from(address) | host_bits)
}

/// A route netlink socket.
struct Netlink {
    socket: OwnedFd,
    sequence: u32,
}

impl Netlink {
    fn open() -> Result<Netlink, String> {
        let socket = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(|errno| format!("cannot open a netlink socket: {errno}"))?;
        bind(socket.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|errno| format!("cannot bind a netlink socket: {errno}"))?;
        Ok(Netlink {
            socket,
            sequence: 0,
        })
    }

    /// Sends one request and waits for its acknowledgement; EEXIST counts as success.
    fn request(
        &mut self,
        what: &str,
        kind: u16,
        flags: u16,
        body: &[u8],
        attributes: &[(u16, &[u8])],
    ) -> Result<(), String> {
        self.request_tolerating(what, kind, flags, body, attributes, Errno::EEXIST)
    }

    /// [`Netlink::request`], with `tolerated` counting as success instead of EEXIST.
    fn request_tolerating(
        &mut self,
        what: &str,
        kind: u16,
        flags: u16,
        body: &[u8],
        attributes: &[(u16, &[u8])],
        tolerated: Errno,
    ) -> Result<(), String> {
        self.sequence += 1;
        let bytes = message(
            kind,
            flags | NLM_F_REQUEST | NLM_F_ACK,
            self.sequence,
            body,
            attributes,
        );
        sendto(
            self.socket.as_raw_fd(),
            &bytes,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(|errno| format!("{what}: {errno}"))?;
        let mut reply = vec![0u8; 8192];
        loop {
            let count = match recv(self.socket.as_raw_fd(), &mut reply, MsgFlags::empty()) {
                Ok(count) => count,
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(format!("{what}: {errno}")),
            };
            match ack_status(&reply[..count], self.sequence) {
                Some(0) => return Ok(()),
                Some(code) if -code == tolerated as i32 => return Ok(()),
                Some(code) => return Err(format!("{what}: {}", Errno::from_raw(-code))),
                None => continue,
            }
        }
    }
}

/// The error code (0 for success) of the acknowledgement for `sequence` in `reply`.
pub fn ack_status(reply: &[u8], sequence: u32) -> Option<i32> {
    let mut offset = 0;
    while offset + NLMSG_HEADER_LEN <= reply.len() {
        let word = |at: usize| {
            u32::from_ne_bytes([reply[at], reply[at + 1], reply[at + 2], reply[at + 3]])
        };
        let length = word(offset) as usize;
        let kind = u16::from_ne_bytes([reply[offset + 4], reply[offset + 5]]);
        let seq = word(offset + 8);
        if length < NLMSG_HEADER_LEN || offset + length > reply.len() {
            return None;
        }
        if kind == NLMSG_ERROR && seq == sequence && length >= NLMSG_HEADER_LEN + 4 {
            return Some(word(offset + NLMSG_HEADER_LEN) as i32);
        }
        offset += (length + 3) & !3;
    }
    None
}

/// The interface to configure: the named one, else the first non-loopback one.
fn choose_interface(named: Option<&str>) -> Result<String, String> {
    if let Some(name) = named {
        return Ok(name.to_owned());
    }
    let waited = crate::init::wait_for_path_with(
        || first_ethernet().is_some(),
        Some(INTERFACE_TIMEOUT),
        |_| {},
    );
    match (waited, first_ethernet()) {
        (Ok(_), Some(name)) => Ok(name),
        _ => Err("no network interface besides lo".into()),
    }
}

/// The first interface besides `lo` by name, if there is one now.
pub fn first_interface() -> Option<String> {
    first_ethernet()
}

/// Gives interface `name` the MAC `mac` (virtio-net takes it while up).
pub fn set_mac(name: &str, mac: [u8; 6]) -> Result<(), String> {
    let index = nix::net::if_::if_nametoindex(name).map_err(|errno| format!("{name}: {errno}"))?;
    let mut body = vec![AF_UNSPEC, 0, 0, 0];
    body.extend_from_slice(&(index as i32).to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes()); // flags
    body.extend_from_slice(&0u32.to_ne_bytes()); // change mask: flags untouched
    Netlink::open()?.request(
        &format!("set the MAC of {name}"),
        RTM_NEWLINK,
        0,
        &body,
        &[(IFLA_ADDRESS, &mac)],
    )
}

fn first_ethernet() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "lo")
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Brings `lo` up: what a guest with no network (no `ip=`) still needs for local services.
pub fn loopback_up() -> Result<(), String> {
    loopback_up_with(&mut Netlink::open()?)
}

fn loopback_up_with(netlink: &mut Netlink) -> Result<(), String> {
    let loopback = nix::net::if_::if_nametoindex("lo").map_err(|errno| format!("lo: {errno}"))?;
    netlink.request("bring lo up", RTM_NEWLINK, 0, &link_up_body(loopback), &[])
}

/// Configures the interface from `ip`; returns its name.
pub fn configure(ip: &IpConfig) -> Result<String, String> {
    let mut netlink = Netlink::open()?;
    loopback_up_with(&mut netlink)?;
    let name = choose_interface(ip.device.as_deref())?;
    let class = Path::new("/sys/class/net").join(&name);
    if crate::init::wait_for_path_with(|| class.exists(), Some(INTERFACE_TIMEOUT), |_| {}).is_err()
    {
        return Err(format!(
            "interface {name} did not appear within {INTERFACE_TIMEOUT:?}"
        ));
    }
    let index =
        nix::net::if_::if_nametoindex(name.as_str()).map_err(|errno| format!("{name}: {errno}"))?;
    netlink.request(
        &format!("bring {name} up"),
        RTM_NEWLINK,
        0,
        &link_up_body(index),
        &[],
    )?;
    let address = ip.address.octets();
    let broadcast = broadcast(ip.address, ip.prefix_len).octets();
    netlink.request(
        &format!("add {}/{} to {name}", ip.address, ip.prefix_len),
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_EXCL,
        &address_body(index, ip.prefix_len),
        &[
            (IFA_LOCAL, &address),
            (IFA_ADDRESS, &address),
            (IFA_BROADCAST, &broadcast),
        ],
    )?;
    if let Some(gateway) = ip.gateway {
        let gateway_bytes = gateway.octets();
        let index_bytes = index.to_ne_bytes();
        netlink.request(
            &format!("add a default route via {gateway}"),
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_EXCL,
            &default_route_body(),
            &[(RTA_GATEWAY, &gateway_bytes), (RTA_OIF, &index_bytes)],
        )?;
    }
    Ok(name)
}

/// Moves an interface that `old` configured (the boot's `ip=`) to the address and default
/// route of `new` (a VM restored from another VM's memory snapshot); returns its name. The old
/// address is removed (one already gone is fine), the new one added, and the default route
/// replaced.
pub fn readdress(old: Option<&IpConfig>, new: &IpConfig) -> Result<String, String> {
    let mut netlink = Netlink::open()?;
    let name = choose_interface(new.device.as_deref())?;
    let index =
        nix::net::if_::if_nametoindex(name.as_str()).map_err(|errno| format!("{name}: {errno}"))?;
    if let Some(old) = old
        && (old.address, old.prefix_len) != (new.address, new.prefix_len)
    {
        let address = old.address.octets();
        netlink.request_tolerating(
            &format!("remove {}/{} from {name}", old.address, old.prefix_len),
            RTM_DELADDR,
            0,
            &address_body(index, old.prefix_len),
            &[(IFA_LOCAL, &address), (IFA_ADDRESS, &address)],
            Errno::EADDRNOTAVAIL,
        )?;
    }
    let address = new.address.octets();
    let broadcast = broadcast(new.address, new.prefix_len).octets();
    netlink.request(
        &format!("add {}/{} to {name}", new.address, new.prefix_len),
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_EXCL,
        &address_body(index, new.prefix_len),
        &[
            (IFA_LOCAL, &address),
            (IFA_ADDRESS, &address),
            (IFA_BROADCAST, &broadcast),
        ],
    )?;
    if let Some(gateway) = new.gateway {
        let gateway_bytes = gateway.octets();
        let index_bytes = index.to_ne_bytes();
        netlink.request(
            &format!("route by default via {gateway}"),
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_REPLACE,
            &default_route_body(),
            &[(RTA_GATEWAY, &gateway_bytes), (RTA_OIF, &index_bytes)],
        )?;
    }
    Ok(name)
}

/// Replaces `path` with a regular file naming `dns`, written beside it and renamed into
/// place: a symlink there (to a resolver daemon's stub file, which nothing fills without
/// DHCP) is replaced, not written through.
pub fn replace_resolv_conf(path: &Path, dns: &[Ipv4Addr]) -> std::io::Result<()> {
    let temporary = path.with_extension("banger-new");
    let _ = std::fs::remove_file(&temporary);
    std::fs::write(&temporary, resolv_conf(dns))?;
    std::fs::rename(&temporary, path)
}

/// `nameserver` lines for `/etc/resolv.conf`.
pub fn resolv_conf(dns: &[Ipv4Addr]) -> String {
    dns.iter()
        .map(|server| format!("nameserver {server}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_their_length_type_flags_and_padded_attributes() {
        let bytes = message(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            &address_body(3, 24),
            &[(IFA_LOCAL, &[10, 0, 0, 2]), (99, &[1])],
        );
        // 16 header + 8 body + 8 first attribute + 8 (5 padded) second attribute.
        assert_eq!(bytes.len(), 40);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 40);
        assert_eq!(
            u16::from_ne_bytes(bytes[4..6].try_into().unwrap()),
            RTM_NEWADDR
        );
        assert_eq!(u16::from_ne_bytes(bytes[6..8].try_into().unwrap()), 5);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 7);
        assert_eq!(&bytes[16..20], &[AF_INET, 24, 0, 0]);
        assert_eq!(u32::from_ne_bytes(bytes[20..24].try_into().unwrap()), 3);
        assert_eq!(u16::from_ne_bytes(bytes[24..26].try_into().unwrap()), 8);
        assert_eq!(&bytes[28..32], &[10, 0, 0, 2]);
        assert_eq!(u16::from_ne_bytes(bytes[32..34].try_into().unwrap()), 5);
        assert_eq!(&bytes[36..40], &[1, 0, 0, 0]);
    }

    #[test]
    fn acknowledgements_are_found_by_sequence() {
        let mut reply = message(NLMSG_ERROR, 0, 4, &(-17i32).to_ne_bytes(), &[]);
        reply.extend(message(NLMSG_ERROR, 0, 5, &0i32.to_ne_bytes(), &[]));
        assert_eq!(ack_status(&reply, 4), Some(-17));
        assert_eq!(ack_status(&reply, 5), Some(0));
        assert_eq!(ack_status(&reply, 6), None);
        assert_eq!(ack_status(&reply[..10], 4), None);
    }

    #[test]
    fn broadcast_addresses() {
        assert_eq!(
            broadcast(Ipv4Addr::new(10, 0, 2, 15), 24),
            Ipv4Addr::new(10, 0, 2, 255)
        );
        assert_eq!(
            broadcast(Ipv4Addr::new(10, 0, 2, 15), 32),
            Ipv4Addr::new(10, 0, 2, 15)
        );
        assert_eq!(
            broadcast(Ipv4Addr::new(10, 0, 2, 15), 0),
            Ipv4Addr::BROADCAST
        );
    }

    #[test]
    fn a_resolv_conf_symlink_is_replaced_not_written_through() {
        let dir = std::env::temp_dir().join(format!("banger-agent-resolv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let stub = dir.join("stub-resolv.conf");
        std::fs::write(&stub, "nameserver 127.0.0.53\n").unwrap();
        let path = dir.join("resolv.conf");
        std::os::unix::fs::symlink(&stub, &path).unwrap();
        replace_resolv_conf(&path, &[Ipv4Addr::new(10, 213, 0, 1)]).unwrap();
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "nameserver 10.213.0.1\n"
        );
        assert_eq!(
            std::fs::read_to_string(&stub).unwrap(),
            "nameserver 127.0.0.53\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resolv_conf_lists_servers_in_order() {
        assert_eq!(
            resolv_conf(&[Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(9, 9, 9, 9)]),
            "nameserver 1.1.1.1\nnameserver 9.9.9.9\n"
        );
    }

    /// `ip ARGS` in the calling thread's network namespace; its output.
    fn ip(args: &[&str]) -> String {
        let output = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn readdressing_moves_the_interface_and_its_default_route() {
        let usable = nix::unistd::geteuid().is_root()
            && std::process::Command::new("ip")
                .arg("-V")
                .output()
                .is_ok_and(|output| output.status.success());
        if !usable {
            assert!(
                std::env::var_os("BANGER_TEST_REQUIRE_ALL").is_none(),
                "needs root and ip"
            );
            eprintln!("skipped: needs root and ip (iproute2)");
            return;
        }
        // A network namespace of this thread's own (and of the `ip`s it starts).
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            ip(&[
                "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
            ]);
            ip(&["link", "set", "peer0", "up"]);
            let booted = IpConfig::parse("10.213.0.5::10.213.0.1:255.255.255.0::eth0:off")
                .unwrap()
                .unwrap();
            configure(&booted).unwrap();
            assert!(ip(&["-4", "-o", "addr", "show", "dev", "eth0"]).contains("10.213.0.5/24"));

            let own = IpConfig::parse("10.214.0.9::10.214.0.1:16::eth0:off")
                .unwrap()
                .unwrap();
            assert_eq!(readdress(Some(&booted), &own).unwrap(), "eth0");
            let addresses = ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
            assert!(addresses.contains("10.214.0.9/16"), "{addresses}");
            assert!(!addresses.contains("10.213.0.5"), "{addresses}");
            let routes = ip(&["-4", "route", "show", "default"]);
            assert_eq!(routes.trim(), "default via 10.214.0.1 dev eth0", "{routes}");

            // Again (a retried request, or an address already gone): the same end state.
            readdress(Some(&booted), &own).unwrap();
            let again = ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
            assert_eq!(again.lines().count(), 1, "{again}");
        })
        .join()
        .unwrap();
    }
}
