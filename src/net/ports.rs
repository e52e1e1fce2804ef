//! Published ports (`-p HOST:GUEST`, `[vm] ports`) checked on the host before a VM boots.
//!
//! QEMU binds a user-mode forward's host port itself, long after banger decided to boot: a
//! port taken by another program would surface as a VMM that exited with a `hostfwd` error
//! in its log. So before a launch every published port is bound here once and released, and a
//! taken one is an error that names it. A program can still take the port between this check
//! and QEMU's bind (the window is the VMM's start-up); then the launch fails with QEMU's own
//! message.

use std::net::{SocketAddr, SocketAddrV4, TcpListener, UdpSocket};

use crate::spec::{PortForward, PortProtocol};

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(
        "host port {address}/{protocol} (published as `{forward}`) is already in use on this \
         host; pick another host port, e.g. `-p {suggestion}:{guest}`",
        protocol = forward.protocol.as_str(),
        guest = forward.guest_port,
        suggestion = forward.host_port.saturating_add(1).max(1024),
    )]
    InUse {
        forward: PortForward,
        address: SocketAddr,
    },
    #[error(
        "cannot publish host port {address}/{protocol} (`{forward}`): {source}",
        protocol = forward.protocol.as_str()
    )]
    Bind {
        forward: PortForward,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl crate::error::Classify for PortError {
    fn class(&self) -> crate::error::ErrorClass {
        // Both are the user's to change: another port, or an address this host has.
        crate::error::ErrorClass::User
    }
}

/// Binds each forward's host address once and lets it go: `Ok` when every one was free.
pub fn check_free(ports: &[PortForward]) -> Result<(), PortError> {
    for forward in ports {
        let address = SocketAddr::V4(SocketAddrV4::new(forward.host_ip, forward.host_port));
        let bound = match forward.protocol {
            PortProtocol::Tcp => TcpListener::bind(address).map(drop),
            PortProtocol::Udp => UdpSocket::bind(address).map(drop),
        };
        match bound {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(PortError::InUse {
                    forward: *forward,
                    address,
                });
            }
            Err(source) => {
                return Err(PortError::Bind {
                    forward: *forward,
                    address,
                    source,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_another_program_holds_is_named_and_a_free_one_passes() {
        let holder = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = holder.local_addr().unwrap().port();
        let forward = PortForward::loopback_tcp(taken, 80);
        let error = check_free(&[forward]).unwrap_err();
        assert!(matches!(error, PortError::InUse { .. }), "{error:?}");
        let text = error.to_string();
        assert!(
            text.contains(&format!("host port 127.0.0.1:{taken}/tcp")) && text.contains("in use"),
            "{text}"
        );
        drop(holder);
        assert!(check_free(&[forward]).is_ok());
        // The same number on UDP is another port.
        let udp_holder = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_port = udp_holder.local_addr().unwrap().port();
        let udp = PortForward {
            protocol: PortProtocol::Udp,
            ..PortForward::loopback_tcp(udp_port, 53)
        };
        assert!(matches!(check_free(&[udp]), Err(PortError::InUse { .. })));
    }

    #[test]
    fn an_address_this_host_does_not_have_is_a_bind_error_naming_it() {
        // TEST-NET-1: never configured on a host, so binding it fails without sending anything.
        let forward = PortForward {
            host_ip: std::net::Ipv4Addr::new(192, 0, 2, 1),
            ..PortForward::loopback_tcp(18080, 80)
        };
        let error = check_free(&[forward]).unwrap_err();
        assert!(error.to_string().contains("192.0.2.1:18080/tcp"), "{error}");
    }
}
