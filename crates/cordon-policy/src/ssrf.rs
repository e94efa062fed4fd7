//! Address ranges the gateway never connects to unless `network.allow_private` names them.
//!
//! Guarantees: [`blocked_range`] returns `Some` for every address that is not plain public
//! unicast — loopback, RFC 1918, CGNAT, link-local and cloud metadata, benchmarking (which also
//! holds cordon's synthetic DNS answers), documentation/TEST-NET, multicast, reserved, broadcast,
//! and for IPv6 also the unspecified, loopback, ULA, link-local, multicast, discard and
//! documentation ranges, every form that embeds an IPv4 address (IPv4-mapped, IPv4-compatible,
//! NAT64, 6to4, Teredo) and everything outside global unicast `2000::/3`. The table is checked
//! in order, most specific range first, so the name in a message is the most precise one
//! (`metadata 169.254.169.254/32`, not `link-local 169.254.0.0/16`).
//!
//! IPv6 forms that embed an IPv4 address are blocked whatever the embedded address is: a public
//! service has no reason to be reached that way, and the embedded address would otherwise need a
//! second check that is easy to get wrong.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Serialize, Serializer};

/// A blocked range: a stable short name and its CIDR. Displays as `"loopback 127.0.0.0/8"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockedRange {
    /// Stable short name (`loopback`, `private`, `metadata`, ...) for messages and audit rules.
    pub name: &'static str,
    /// The range.
    pub net: IpNet,
}

impl fmt::Display for BlockedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.net)
    }
}

impl Serialize for BlockedRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

const fn v4(name: &'static str, a: u8, b: u8, c: u8, d: u8, prefix: u8) -> BlockedRange {
    BlockedRange {
        name,
        net: IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)),
    }
}

const fn v6(name: &'static str, segments: [u16; 8], prefix: u8) -> BlockedRange {
    let [a, b, c, d, e, f, g, h] = segments;
    BlockedRange {
        name,
        net: IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(a, b, c, d, e, f, g, h),
            prefix,
        )),
    }
}

/// Every blocked range, most specific first. `new_assert` runs at compile time here, so a typo
/// in a prefix fails the build instead of panicking at run time.
pub const BLOCKED_RANGES: &[BlockedRange] = &[
    // IPv4
    v4("this-network", 0, 0, 0, 0, 8),
    v4("private", 10, 0, 0, 0, 8),
    v4("cgnat", 100, 64, 0, 0, 10),
    v4("loopback", 127, 0, 0, 0, 8),
    v4("metadata", 169, 254, 169, 254, 32),
    v4("link-local", 169, 254, 0, 0, 16),
    v4("private", 172, 16, 0, 0, 12),
    v4("ietf-protocol", 192, 0, 0, 0, 24),
    v4("test-net", 192, 0, 2, 0, 24),
    v4("6to4-relay", 192, 88, 99, 0, 24),
    v4("private", 192, 168, 0, 0, 16),
    v4("benchmark", 198, 18, 0, 0, 15),
    v4("test-net", 198, 51, 100, 0, 24),
    v4("test-net", 203, 0, 113, 0, 24),
    v4("multicast", 224, 0, 0, 0, 4),
    v4("broadcast", 255, 255, 255, 255, 32),
    v4("reserved", 240, 0, 0, 0, 4),
    // IPv6, specific ranges inside ::/3 first
    v6("unspecified", [0, 0, 0, 0, 0, 0, 0, 0], 128),
    v6("loopback", [0, 0, 0, 0, 0, 0, 0, 1], 128),
    v6("ipv4-mapped", [0, 0, 0, 0, 0, 0xffff, 0, 0], 96),
    v6("ipv4-compatible", [0, 0, 0, 0, 0, 0, 0, 0], 96),
    v6("nat64", [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96),
    v6("nat64", [0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
    v6("discard", [0x100, 0, 0, 0, 0, 0, 0, 0], 64),
    v6("reserved", [0, 0, 0, 0, 0, 0, 0, 0], 3),
    // inside global unicast 2000::/3
    v6("teredo", [0x2001, 0, 0, 0, 0, 0, 0, 0], 32),
    v6("benchmark", [0x2001, 2, 0, 0, 0, 0, 0, 0], 48),
    v6("documentation", [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
    v6("6to4", [0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
    v6("documentation", [0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),
    // outside 2000::/3
    v6("reserved", [0x4000, 0, 0, 0, 0, 0, 0, 0], 2),
    v6("metadata", [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128),
    v6("unique-local", [0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    v6("link-local", [0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    v6("site-local", [0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
    v6("multicast", [0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
    v6("reserved", [0x8000, 0, 0, 0, 0, 0, 0, 0], 1),
];

/// The blocked range `ip` is in, or `None` if it is public unicast.
pub fn blocked_range(ip: IpAddr) -> Option<BlockedRange> {
    BLOCKED_RANGES
        .iter()
        .find(|range| range.net.contains(&ip))
        .copied()
}

/// The blocked range that holds every address of `net`, if there is one (a CIDR allow entry that
/// could never match anything the gateway would connect to).
pub fn blocked_range_covering(net: &IpNet) -> Option<BlockedRange> {
    BLOCKED_RANGES
        .iter()
        .find(|range| range.net.contains(net))
        .copied()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn name_of(ip: &str) -> Option<String> {
        blocked_range(ip.parse().unwrap()).map(|r| r.to_string())
    }

    #[test]
    fn metadata_addresses_are_named_as_metadata() {
        assert_eq!(
            name_of("169.254.169.254").as_deref(),
            Some("metadata 169.254.169.254/32")
        );
        assert_eq!(
            name_of("fd00:ec2::254").as_deref(),
            Some("metadata fd00:ec2::254/128")
        );
        assert_eq!(
            name_of("169.254.1.1").as_deref(),
            Some("link-local 169.254.0.0/16")
        );
    }

    #[test]
    fn ipv4_special_ranges_are_blocked_with_their_names() {
        for (ip, expected) in [
            ("0.0.0.0", "this-network 0.0.0.0/8"),
            ("10.0.0.5", "private 10.0.0.0/8"),
            ("100.100.100.200", "cgnat 100.64.0.0/10"),
            ("127.0.0.1", "loopback 127.0.0.0/8"),
            ("172.31.255.255", "private 172.16.0.0/12"),
            ("192.0.0.192", "ietf-protocol 192.0.0.0/24"),
            ("192.0.2.1", "test-net 192.0.2.0/24"),
            ("192.88.99.1", "6to4-relay 192.88.99.0/24"),
            ("192.168.1.1", "private 192.168.0.0/16"),
            ("198.19.255.1", "benchmark 198.18.0.0/15"),
            ("198.51.100.7", "test-net 198.51.100.0/24"),
            ("203.0.113.7", "test-net 203.0.113.0/24"),
            ("239.255.255.250", "multicast 224.0.0.0/4"),
            ("255.255.255.255", "broadcast 255.255.255.255/32"),
            ("250.1.2.3", "reserved 240.0.0.0/4"),
        ] {
            assert_eq!(name_of(ip).as_deref(), Some(expected), "{ip}");
        }
    }

    #[test]
    fn ipv6_special_ranges_are_blocked_with_their_names() {
        for (ip, expected) in [
            ("::", "unspecified ::/128"),
            ("::1", "loopback ::1/128"),
            ("::ffff:169.254.169.254", "ipv4-mapped ::ffff:0.0.0.0/96"),
            ("::ffff:8.8.8.8", "ipv4-mapped ::ffff:0.0.0.0/96"),
            ("::127.0.0.1", "ipv4-compatible ::/96"),
            ("64:ff9b::a9fe:a9fe", "nat64 64:ff9b::/96"),
            ("64:ff9b:1::1", "nat64 64:ff9b:1::/48"),
            ("100::1", "discard 100::/64"),
            ("2001::1", "teredo 2001::/32"),
            ("2001:2::1", "benchmark 2001:2::/48"),
            ("2001:db8::1", "documentation 2001:db8::/32"),
            ("2002:a9fe:a9fe::1", "6to4 2002::/16"),
            ("3fff::1", "documentation 3fff::/20"),
            ("fc00::1", "unique-local fc00::/7"),
            ("fd12:3456::1", "unique-local fc00::/7"),
            ("fe80::1", "link-local fe80::/10"),
            ("fec0::1", "site-local fec0::/10"),
            ("ff02::1", "multicast ff00::/8"),
            ("1::1", "reserved ::/3"),
            ("4000::1", "reserved 4000::/2"),
            ("8000::1", "reserved 8000::/1"),
        ] {
            assert_eq!(name_of(ip).as_deref(), Some(expected), "{ip}");
        }
    }

    #[test]
    fn public_addresses_are_not_blocked() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "140.82.112.3",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "2001:4860:4860::8888",
        ] {
            assert_eq!(name_of(ip), None, "{ip}");
        }
    }

    #[test]
    fn covering_range_is_found_only_for_cidrs_wholly_inside_one() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert_eq!(
            blocked_range_covering(&net).map(|r| r.name),
            Some("private")
        );
        let net: IpNet = "0.0.0.0/0".parse().unwrap();
        assert_eq!(blocked_range_covering(&net), None);
        let net: IpNet = "8.8.8.0/24".parse().unwrap();
        assert_eq!(blocked_range_covering(&net), None);
    }
}
