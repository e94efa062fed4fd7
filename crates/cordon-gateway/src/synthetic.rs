//! Synthetic addresses: the only addresses the sandbox's DNS ever hands out.
//!
//! Guarantees:
//! - Every address comes from 198.18.0.0/15 (RFC 2544 benchmarking space, never routed), so a
//!   synthetic answer can never point at a real host, private or public.
//! - A name keeps the same address for the whole session, and an address names exactly one name
//!   (the map is a bijection), so a connect to a synthetic address identifies the name the client
//!   asked for; there is nothing for DNS rebinding to change.
//! - When the range is used up, no further names are mapped (the caller answers SERVFAIL); an
//!   existing mapping is never reused for another name.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::RwLock;

use cordon_policy::host::HostName;
use thiserror::Error;

/// First address of 198.18.0.0/15.
const BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// Number of addresses in the /15.
const SIZE: u32 = 1 << 17;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SyntheticError {
    #[error("all {0} synthetic addresses in 198.18.0.0/15 are in use")]
    Exhausted(u32),
}

/// True for any address in 198.18.0.0/15.
pub fn is_synthetic(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => u32::from(v4).wrapping_sub(BASE) < SIZE,
        IpAddr::V6(_) => false,
    }
}

#[derive(Debug, Default)]
struct Maps {
    by_name: HashMap<HostName, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, HostName>,
}

/// The session's name ⇄ synthetic address map, shared by the DNS server and the TCP paths.
#[derive(Debug)]
pub struct SyntheticMap {
    maps: RwLock<Maps>,
    /// Offsets 1..=capacity are handed out; 0 (198.18.0.0) and the last address are skipped.
    capacity: u32,
}

impl Default for SyntheticMap {
    fn default() -> Self {
        Self::with_capacity(SIZE - 2)
    }
}

impl SyntheticMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// A map that hands out at most `capacity` addresses (tests use a small one).
    pub fn with_capacity(capacity: u32) -> Self {
        SyntheticMap {
            maps: RwLock::new(Maps::default()),
            capacity: capacity.min(SIZE - 2),
        }
    }

    /// The address for `name`, assigning the next free one on first use.
    pub fn assign(&self, name: &HostName) -> Result<Ipv4Addr, SyntheticError> {
        if let Some(ip) = self.read().by_name.get(name) {
            return Ok(*ip);
        }
        let mut maps = match self.maps.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(ip) = maps.by_name.get(name) {
            return Ok(*ip);
        }
        let used = u32::try_from(maps.by_name.len()).unwrap_or(u32::MAX);
        if used >= self.capacity {
            return Err(SyntheticError::Exhausted(self.capacity));
        }
        let ip = Ipv4Addr::from(BASE + 1 + used);
        maps.by_name.insert(name.clone(), ip);
        maps.by_addr.insert(ip, name.clone());
        Ok(ip)
    }

    /// The name a synthetic address was handed out for, if any.
    pub fn lookup(&self, ip: IpAddr) -> Option<HostName> {
        match ip {
            IpAddr::V4(v4) => self.read().by_addr.get(&v4).cloned(),
            IpAddr::V6(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        self.read().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        match self.maps.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    #[test]
    fn a_name_keeps_its_address_and_addresses_map_back_to_names() {
        let map = SyntheticMap::new();
        let a = map.assign(&name("api.github.com")).unwrap();
        let b = map.assign(&name("example.com")).unwrap();
        assert_ne!(a, b);
        assert_eq!(map.assign(&name("API.GitHub.com.")).unwrap(), a);
        assert_eq!(map.lookup(a.into()), Some(name("api.github.com")));
        assert_eq!(map.lookup(b.into()), Some(name("example.com")));
        assert!(is_synthetic(a.into()) && is_synthetic(b.into()));
        assert_eq!(a, Ipv4Addr::new(198, 18, 0, 1));
    }

    #[test]
    fn an_unassigned_synthetic_address_names_nothing() {
        let map = SyntheticMap::new();
        assert_eq!(map.lookup(Ipv4Addr::new(198, 19, 1, 1).into()), None);
    }

    #[test]
    fn the_range_is_exactly_198_18_0_0_slash_15() {
        assert!(is_synthetic(Ipv4Addr::new(198, 18, 0, 0).into()));
        assert!(is_synthetic(Ipv4Addr::new(198, 19, 255, 255).into()));
        assert!(!is_synthetic(Ipv4Addr::new(198, 17, 255, 255).into()));
        assert!(!is_synthetic(Ipv4Addr::new(198, 20, 0, 0).into()));
        assert!(!is_synthetic("::ffff:198.18.0.1".parse().unwrap()));
    }

    #[test]
    fn an_exhausted_map_refuses_new_names_but_keeps_old_ones() {
        let map = SyntheticMap::with_capacity(2);
        let a = map.assign(&name("a.test")).unwrap();
        map.assign(&name("b.test")).unwrap();
        assert_eq!(
            map.assign(&name("c.test")),
            Err(SyntheticError::Exhausted(2))
        );
        assert_eq!(map.assign(&name("a.test")).unwrap(), a);
    }

    #[test]
    fn the_full_map_never_leaves_the_range() {
        let map = SyntheticMap::new();
        let last = Ipv4Addr::from(BASE + SIZE - 2);
        assert!(is_synthetic(last.into()));
        assert_eq!(map.capacity, SIZE - 2);
    }
}
