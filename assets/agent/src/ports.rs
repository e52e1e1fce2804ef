//! `banger-agent ports`: the guest's listening sockets and the processes holding them, for
//! `banger vm ports NAME`.
//!
//! Read from `/proc` rather than by running `ss`: busybox and distroless images have no `ss`,
//! and every banger image has the agent. A socket is "listening" when it is a TCP socket in
//! state LISTEN, or a UDP socket bound but not connected (what `ss -lu` shows as UNCONN).
//! Owners come from matching `socket:[INODE]` links under `/proc/PID/fd`; sockets of other
//! users' processes are found only when the agent runs as root, which it does in a guest.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use crate::protocol::{Listener, ListeningProcess as Process};

/// `/proc/net` tables and what counts as listening in each.
const TABLES: [(&str, &str, Want); 4] = [
    ("tcp", "tcp", Want::TcpListen),
    ("tcp6", "tcp", Want::TcpListen),
    ("udp", "udp", Want::UdpBound),
    ("udp6", "udp", Want::UdpBound),
];

#[derive(Debug, Clone, Copy)]
enum Want {
    TcpListen,
    UdpBound,
}

/// `banger-agent ports [--json]`.
pub fn command(arguments: &[String]) -> Result<(), String> {
    let mut json = false;
    for argument in arguments {
        match argument.as_str() {
            "--json" => json = true,
            other => return Err(format!("ports: unknown argument `{other}`")),
        }
    }
    let listeners = listeners(Path::new("/proc"))?;
    if json {
        let text = serde_json::to_string(&listeners).map_err(|error| error.to_string())?;
        println!("{text}");
    } else {
        for listener in &listeners {
            let names: Vec<String> = listener
                .processes
                .iter()
                .map(|process| format!("{}/{}", process.pid, process.name))
                .collect();
            println!(
                "{} {} {} {}",
                listener.protocol,
                listener.address,
                listener.port,
                names.join(",")
            );
        }
    }
    Ok(())
}

/// Every listening socket under `proc` (a procfs mount), sorted by protocol, port and address.
pub fn listeners(proc: &Path) -> Result<Vec<Listener>, String> {
    // Each listener with its socket's inode, to find its owners by.
    let mut found: Vec<(Listener, u64)> = Vec::new();
    for (table, protocol, want) in TABLES {
        let path = proc.join("net").join(table);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // A kernel without IPv6 has no tcp6/udp6.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
        };
        for line in text.lines().skip(1) {
            let Some(entry) = parse_line(line) else {
                return Err(format!("{}: cannot parse line `{line}`", path.display()));
            };
            let listening = match want {
                Want::TcpListen => entry.state == TCP_LISTEN,
                Want::UdpBound => entry.state == UDP_UNCONNECTED && entry.remote_port == 0,
            };
            if listening {
                found.push((
                    Listener {
                        protocol: protocol.to_owned(),
                        address: entry.address,
                        port: entry.port,
                        processes: Vec::new(),
                    },
                    entry.inode,
                ));
            }
        }
    }
    let owners = socket_owners(proc);
    let mut listeners: Vec<Listener> = found
        .into_iter()
        .map(|(mut listener, inode)| {
            if let Some(processes) = owners.get(&inode) {
                listener.processes = processes.clone();
            }
            listener
        })
        .collect();
    listeners.sort_by(|a, b| {
        (&a.protocol, a.port, a.address.is_ipv6(), a.address).cmp(&(
            &b.protocol,
            b.port,
            b.address.is_ipv6(),
            b.address,
        ))
    });
    Ok(listeners)
}

const TCP_LISTEN: u8 = 0x0A;
const UDP_UNCONNECTED: u8 = 0x07;

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    address: IpAddr,
    port: u16,
    remote_port: u16,
    state: u8,
    inode: u64,
}

/// One row of `/proc/net/{tcp,udp}{,6}`:
/// `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode …`.
fn parse_line(line: &str) -> Option<Entry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        return None;
    }
    let (address, port) = parse_endpoint(fields[1])?;
    let (_, remote_port) = parse_endpoint(fields[2])?;
    Some(Entry {
        address,
        port,
        remote_port,
        state: u8::from_str_radix(fields[3], 16).ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// `0100007F:1F90` → 127.0.0.1:8080. The kernel prints each 32-bit word of the address as a
/// native-endian integer in hex, and the port as a plain hex number.
fn parse_endpoint(text: &str) -> Option<(IpAddr, u16)> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut words = Vec::new();
    for start in (0..address.len()).step_by(8) {
        let word = u32::from_str_radix(address.get(start..start + 8)?, 16).ok()?;
        words.extend_from_slice(&word.to_ne_bytes());
    }
    let address = match words.len() {
        4 => IpAddr::V4(Ipv4Addr::new(words[0], words[1], words[2], words[3])),
        16 => {
            let octets: [u8; 16] = words.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some((address, port))
}

/// Socket inode → the processes with it open. Processes that exit mid-scan, or whose `fd`
/// directory is not readable, are skipped: the table is a snapshot, not a promise.
fn socket_owners(proc: &Path) -> BTreeMap<u64, Vec<Process>> {
    let mut owners: BTreeMap<u64, Vec<Process>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(proc) else {
        return owners;
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let process_dir = proc.join(pid.to_string());
        let Ok(fds) = std::fs::read_dir(process_dir.join("fd")) else {
            continue;
        };
        let mut name = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|target| target.strip_prefix("socket:["))
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|inode| inode.parse::<u64>().ok())
            else {
                continue;
            };
            let name = name
                .get_or_insert_with(|| {
                    std::fs::read_to_string(process_dir.join("comm"))
                        .map(|comm| comm.trim_end().to_owned())
                        .unwrap_or_default()
                })
                .clone();
            let holders = owners.entry(inode).or_default();
            if !holders.iter().any(|holder| holder.pid == pid) {
                holders.push(Process { pid, name });
            }
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_each_family_parse() {
        let v4 = "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 \
                  00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        let entry = parse_line(v4).unwrap();
        assert_eq!(entry.address, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((entry.port, entry.state, entry.inode), (8080, 0x0A, 12345));
        // ::1 port 53, as a little-endian kernel prints it.
        let v6 = "   0: 00000000000000000000000001000000:0035 \
                  00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 \
                  00000000     0        0 777 2 0000000000000000 0";
        if cfg!(target_endian = "little") {
            let entry = parse_line(v6).unwrap();
            assert_eq!(entry.address, "::1".parse::<IpAddr>().unwrap());
            assert_eq!((entry.port, entry.remote_port, entry.inode), (53, 0, 777));
        }
        assert_eq!(parse_line("garbage"), None);
        assert_eq!(parse_line("0: XYZ:1 0:0 0A a b c d 1"), None);
    }

    #[test]
    fn a_process_finds_its_own_listeners_by_name_and_not_its_connected_sockets() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_port = tcp.local_addr().unwrap().port();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        let connected = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect(("127.0.0.1", udp_port)).unwrap();
        let connected_port = connected.local_addr().unwrap().port();
        // A TCP connection's own ends are not listeners either.
        let client = std::net::TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
        let client_port = client.local_addr().unwrap().port();

        let listeners = listeners(Path::new("/proc")).unwrap();
        let me = std::process::id();
        let find = |protocol: &str, port: u16| {
            listeners
                .iter()
                .find(|listener| listener.protocol == protocol && listener.port == port)
        };
        let tcp_listener = find("tcp", tcp_port).expect("the TCP listener");
        assert_eq!(tcp_listener.address, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert!(
            tcp_listener
                .processes
                .iter()
                .any(|process| process.pid == me && !process.name.is_empty()),
            "{tcp_listener:?}"
        );
        assert!(find("udp", udp_port).is_some(), "{listeners:?}");
        assert!(find("udp", connected_port).is_none(), "{listeners:?}");
        assert!(find("tcp", client_port).is_none(), "{listeners:?}");
    }
}
