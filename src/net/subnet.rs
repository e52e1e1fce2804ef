//! The IPv4 subnet of banger's bridge (`[network] subnet` in `config.toml`): the bridge takes
//! its first address and is every guest's gateway and DNS server; guests get the others, one
//! each, from the address pool in the state database ([`crate::state`]).

use std::fmt;
use std::net::Ipv4Addr;

/// The bridge's subnet unless the config names another: private, and outside the ranges
/// Docker (172.17–31, 192.168) and libvirt (192.168.122) hand out by default. A host that
/// routes it already is refused at bridge creation, naming the clashing route.
pub const DEFAULT_SUBNET: Subnet = Subnet {
    network: Ipv4Addr::new(10, 213, 0, 0),
    prefix: 24,
};

/// Narrowest and widest subnets accepted: a /29 leaves five guests, a /16 65 533.
const PREFIXES: std::ops::RangeInclusive<u8> = 16..=29;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// Reads `A.B.C.D/N`; the address must be the network's own (host bits zero).
    pub fn parse(text: &str) -> Result<Subnet, String> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not a subnet like `10.213.0.0/24`"))?;
        let network: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("`{address}` is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|prefix| PREFIXES.contains(prefix))
            .ok_or_else(|| {
                format!(
                    "`/{prefix}`: the prefix length must be {} to {}",
                    PREFIXES.start(),
                    PREFIXES.end()
                )
            })?;
        let subnet = Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            let aligned = Ipv4Addr::from(u32::from(network) & subnet.mask());
            return Err(format!(
                "`{text}` has host bits set; the subnet is `{aligned}/{prefix}`"
            ));
        }
        Ok(subnet)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The dotted netmask (`255.255.255.0`), as the kernel's `ip=` wants it.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    /// The bridge's address: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    fn broadcast(&self) -> u32 {
        u32::from(self.network) | !self.mask()
    }

    /// Every address a guest may have, lowest first (not the network, the gateway or the
    /// broadcast address).
    pub fn guest_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        (u32::from(self.network) + 2..self.broadcast()).map(Ipv4Addr::from)
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask() == u32::from(self.network)
    }

    /// Whether the two share any address (one contains the other's network).
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subnet_names_its_gateway_mask_and_guest_range() {
        let subnet = Subnet::parse("10.213.0.0/24").unwrap();
        assert_eq!(subnet, DEFAULT_SUBNET);
        assert_eq!(subnet.to_string(), "10.213.0.0/24");
        assert_eq!(subnet.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(subnet.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        let guests: Vec<Ipv4Addr> = subnet.guest_addresses().collect();
        assert_eq!(guests.len(), 253);
        assert_eq!(guests[0], Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(guests[252], Ipv4Addr::new(10, 213, 0, 254));
        let small = Subnet::parse("192.168.50.8/29").unwrap();
        assert_eq!(small.guest_addresses().count(), 5);
        assert!(small.contains(Ipv4Addr::new(192, 168, 50, 15)));
        assert!(!small.contains(Ipv4Addr::new(192, 168, 50, 16)));
    }

    #[test]
    fn bad_subnets_say_what_is_wrong() {
        for (text, says) in [
            ("10.213.0.0", "not a subnet"),
            ("10.213.0.300/24", "not an IPv4 address"),
            ("10.0.0.0/8", "prefix length must be 16 to 29"),
            ("10.0.0.0/30", "prefix length"),
            ("10.213.0.5/24", "the subnet is `10.213.0.0/24`"),
        ] {
            let error = Subnet::parse(text).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn overlap_is_containment_either_way() {
        let subnet = |text| Subnet::parse(text).unwrap();
        assert!(subnet("10.213.0.0/24").overlaps(&subnet("10.213.0.0/16")));
        assert!(subnet("10.213.0.0/16").overlaps(&subnet("10.213.7.0/24")));
        assert!(!subnet("10.213.0.0/24").overlaps(&subnet("10.213.1.0/24")));
    }
}
