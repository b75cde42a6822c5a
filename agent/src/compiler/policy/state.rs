//! What the policy compiler produces: this node's compiled policy, map
//! shaped (identities, per-pod allow entries and ipBlock prefixes).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// The identity number that stands for every peer (`from: []`).
pub const ANY_IDENTITY: u32 = 0;
/// Numbers from here on are per-endpoint ipBlock sets, not pod identities.
pub const CIDR_IDENTITY_BASE: u32 = 1 << 31;

/// A pod of this node, as the endpoint manager knows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalEndpoint {
    pub ip: Ipv4Addr,
    /// (namespace, name) from the runtime's CNI_ARGS, when it gave them.
    pub pod: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

/// The compiled policy of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Every pod address of the cluster (local endpoints included) -> its
    /// identity.
    pub identities: BTreeMap<Ipv4Addr, u32>,
    /// What each identity number stands for.
    pub identity_info: BTreeMap<u32, IdentityInfo>,
    /// The cluster's policies by number ("namespace/name").
    pub policies: BTreeMap<u32, PolicyInfo>,
    /// This node's pods.
    pub endpoints: BTreeMap<Ipv4Addr, EndpointPolicy>,
    /// What could not be compiled as written (each also fails closed).
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    pub namespace: String,
    pub labels: crate::model::Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    /// "namespace/name".
    pub name: String,
    /// The local endpoints it selects (either direction).
    pub selects: Vec<Ipv4Addr>,
    /// Set when the object was not converted whole (it fails closed).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub pod: Option<(String, String)>,
    /// `None` when the pod is not known to the source (yet).
    pub identity: Option<u32>,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

impl EndpointPolicy {
    pub fn direction(&self, direction: Direction) -> &DirectionPolicy {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectionPolicy {
    /// Some policy selects the pod for this direction.
    pub isolated: bool,
    /// Those policies' numbers.
    pub policies: Vec<u32>,
    /// Fail closed: deny everything in this direction (the pod is unknown
    /// while its namespace has policies, so which select it cannot be
    /// told). A policy that could not be compiled only isolates: it adds
    /// no entries, and the other policies' entries still hold.
    pub deny_all: bool,
    /// What is allowed: peer identity, protocol and port prefix -> the
    /// (policy, rule) that allows it (the lowest, when several do).
    pub allow: BTreeMap<AllowKey, RuleRef>,
    /// ipBlock prefixes -> the number (from `CIDR_IDENTITY_BASE`) `allow`
    /// knows the addresses under them by.
    pub cidrs: BTreeMap<Ipv4Network, u32>,
}

/// One allow entry. The datapath looks it up as a longest-prefix match on
/// (identity, protocol, port): `protocol: None` covers every protocol and
/// port, `ports: None` every port of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowKey {
    pub identity: u32,
    pub protocol: Option<u8>,
    pub ports: Option<PortPrefix>,
}

/// The ports sharing their first `len` bits with `port` (a port range is
/// a few of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    pub port: u16,
    /// 1..=16
    pub len: u8,
}

/// A policy by number and one of its rules by index (in its direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: u32,
    pub rule: u32,
}

impl EndpointPolicy {
    pub(super) fn direction_mut(&mut self, direction: Direction) -> &mut DirectionPolicy {
        match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

impl DirectionPolicy {
    /// The datapath's decision for a peer, once the endpoint is isolated:
    /// its identity, then every peer, then its ipBlock set.
    pub fn allowing(
        &self,
        identity: Option<u32>,
        peer: Ipv4Addr,
        protocol: u8,
        port: u16,
    ) -> Option<RuleRef> {
        identity
            .and_then(|id| self.lookup(id, protocol, port))
            .or_else(|| self.lookup(ANY_IDENTITY, protocol, port))
            .or_else(|| {
                self.cidr_of(peer)
                    .and_then(|id| self.lookup(id, protocol, port))
            })
    }

    /// The longest-prefix match on (identity, protocol, port), as the
    /// datapath's LPM map answers it.
    pub fn lookup(&self, identity: u32, protocol: u8, port: u16) -> Option<RuleRef> {
        let first = AllowKey {
            identity,
            protocol: None,
            ports: None,
        };
        self.allow
            .range(first..)
            .take_while(|(key, _)| key.identity == identity)
            .filter(|(key, _)| key.matches(protocol, port))
            .max_by_key(|(key, _)| key.specificity())
            .map(|(_, rule)| *rule)
    }

    /// The number of `addr`'s longest match among the ipBlock prefixes.
    pub fn cidr_of(&self, addr: Ipv4Addr) -> Option<u32> {
        self.cidrs
            .iter()
            .filter(|(net, _)| net.contains(addr))
            .max_by_key(|(net, _)| net.prefix())
            .map(|(_, number)| *number)
    }
}

impl AllowKey {
    fn matches(&self, protocol: u8, port: u16) -> bool {
        match (self.protocol, self.ports) {
            (None, _) => true,
            (Some(p), None) => p == protocol,
            (Some(p), Some(ports)) => p == protocol && ports.contains(port),
        }
    }

    /// The LPM key's prefix length beyond the identity: a longer one wins.
    fn specificity(&self) -> u8 {
        match (self.protocol, self.ports) {
            (None, _) => 0,
            (Some(_), None) => 8,
            (Some(_), Some(ports)) => 8 + ports.len,
        }
    }
}

impl PortPrefix {
    pub fn contains(self, port: u16) -> bool {
        let shift = 16 - u32::from(self.len.min(16));
        (u32::from(port) >> shift) == (u32::from(self.port) >> shift)
    }
}

/// The minimal aligned prefixes covering `first..=last` exactly (the LPM
/// map matches prefixes, not ranges). Port 0 is never a destination.
pub fn port_prefixes(first: u16, last: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let mut lo = u32::from(first.max(1));
    let hi = u32::from(last);
    while lo <= hi {
        let mut bits = lo.trailing_zeros().min(16);
        while bits > 0 && lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        let (Ok(port), Ok(len)) = (u16::try_from(lo), u8::try_from(16 - bits)) else {
            break;
        };
        out.push(PortPrefix { port, len });
        lo += 1 << bits;
    }
    out
}
