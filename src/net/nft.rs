//! The nftables ruleset of banger's bridge network, as text for `nft -f -` (applied by
//! [`crate::privileged::bridge`]).
//!
//! Everything lives in one table of banger's own, `table inet banger`, rewritten whole in one
//! `nft` transaction whenever it changes (the bridge comes up, a VM with published ports
//! starts or stops): no rule of anyone else's is touched, and deleting the table removes all
//! of banger's. Its chains:
//! 1. `postrouting`: masquerade what guests send off the subnet (NAT to whatever uplink the
//!    route picks), and what the host sends to a guest from loopback (a `127.0.0.1` published
//!    port, rewritten by `output`, leaves with the bridge's address instead).
//! 2. `prerouting` and `output`: published ports, DNAT from the host address to the guest's
//!    (`prerouting` for other machines, `output` for the host's own connections).
//! 3. `forward`: lets guests out and their replies and DNATed connections in. When banger
//!    turned IPv4 forwarding on itself (it was off), the chain ends in `drop`, so the host
//!    forwards nothing but its guests' traffic, as before.
//!
//! Known weakness: a `drop` in another table's forward chain (Docker's iptables `FORWARD`
//! policy) still drops guests' traffic; `banger doctor` says when forwarding is filtered.

use std::fmt::Write;
use std::net::Ipv4Addr;

use crate::net::subnet::Subnet;
use crate::spec::PortForward;

/// The table's name, in family `inet`.
pub const TABLE: &str = "banger";

/// What the ruleset is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub bridge: String,
    pub subnet: Subnet,
    /// Forward nothing but the bridge's traffic (banger switched forwarding on).
    pub forward_only_bridge: bool,
    /// Published ports of running VMs, each with its guest's address.
    pub published: Vec<(PortForward, Ipv4Addr)>,
}

impl Ruleset {
    /// The `nft -f` script that replaces banger's table with this ruleset in one transaction
    /// (the `add` makes the `delete` succeed when there is no table yet).
    pub fn script(&self) -> String {
        let bridge = &self.bridge;
        let subnet = self.subnet;
        let mut text = String::new();
        let _ = writeln!(text, "add table inet {TABLE}");
        let _ = writeln!(text, "delete table inet {TABLE}");
        let _ = writeln!(text, "table inet {TABLE} {{");
        let _ = writeln!(text, "  chain postrouting {{");
        let _ = writeln!(
            text,
            "    type nat hook postrouting priority srcnat; policy accept;"
        );
        let _ = writeln!(
            text,
            "    ip saddr {subnet} ip daddr != {subnet} masquerade"
        );
        let _ = writeln!(
            text,
            "    ip saddr 127.0.0.0/8 oifname \"{bridge}\" masquerade"
        );
        let _ = writeln!(text, "  }}");
        // `dstnat` is -100, but nft names it only for prerouting.
        for chain in ["prerouting", "output"] {
            let _ = writeln!(text, "  chain {chain} {{");
            let _ = writeln!(
                text,
                "    type nat hook {chain} priority -100; policy accept;"
            );
            for (port, guest) in &self.published {
                let destination = if port.host_ip.is_unspecified() {
                    "fib daddr type local".to_owned()
                } else {
                    format!("ip daddr {}", port.host_ip)
                };
                let _ = writeln!(
                    text,
                    "    {destination} {protocol} dport {host_port} dnat ip to {guest}:{guest_port}",
                    protocol = port.protocol.as_str(),
                    host_port = port.host_port,
                    guest_port = port.guest_port,
                );
            }
            let _ = writeln!(text, "  }}");
        }
        let _ = writeln!(text, "  chain forward {{");
        let _ = writeln!(
            text,
            "    type filter hook forward priority filter; policy accept;"
        );
        let _ = writeln!(text, "    iifname \"{bridge}\" accept");
        let _ = writeln!(
            text,
            "    oifname \"{bridge}\" ct state established,related accept"
        );
        let _ = writeln!(text, "    oifname \"{bridge}\" ct status dnat accept");
        if self.forward_only_bridge {
            let _ = writeln!(text, "    drop");
        }
        let _ = writeln!(text, "  }}");
        let _ = writeln!(text, "}}");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_replaces_banger_table_whole_with_nat_ports_and_forwarding() {
        let ruleset = Ruleset {
            bridge: "banger0".into(),
            subnet: crate::net::subnet::DEFAULT_SUBNET,
            forward_only_bridge: true,
            published: vec![
                (
                    PortForward::parse("18080:8080").unwrap(),
                    Ipv4Addr::new(10, 213, 0, 2),
                ),
                (
                    PortForward::parse("0.0.0.0:5353:53/udp").unwrap(),
                    Ipv4Addr::new(10, 213, 0, 3),
                ),
            ],
        };
        insta::assert_snapshot!(ruleset.script(), @r#"
        add table inet banger
        delete table inet banger
        table inet banger {
          chain postrouting {
            type nat hook postrouting priority srcnat; policy accept;
            ip saddr 10.213.0.0/24 ip daddr != 10.213.0.0/24 masquerade
            ip saddr 127.0.0.0/8 oifname "banger0" masquerade
          }
          chain prerouting {
            type nat hook prerouting priority -100; policy accept;
            ip daddr 127.0.0.1 tcp dport 18080 dnat ip to 10.213.0.2:8080
            fib daddr type local udp dport 5353 dnat ip to 10.213.0.3:53
          }
          chain output {
            type nat hook output priority -100; policy accept;
            ip daddr 127.0.0.1 tcp dport 18080 dnat ip to 10.213.0.2:8080
            fib daddr type local udp dport 5353 dnat ip to 10.213.0.3:53
          }
          chain forward {
            type filter hook forward priority filter; policy accept;
            iifname "banger0" accept
            oifname "banger0" ct state established,related accept
            oifname "banger0" ct status dnat accept
            drop
          }
        }
        "#);
        let open = Ruleset {
            forward_only_bridge: false,
            published: Vec::new(),
            ..ruleset
        };
        assert!(!open.script().contains("    drop\n"));
        assert!(!open.script().contains("dnat ip to"));
    }
}
