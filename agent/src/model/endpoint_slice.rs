//! EndpointSlices: where a Service's traffic can go, with the conditions
//! that decide whether it should.

use std::hash::{BuildHasher, RandomState};
use std::net::Ipv4Addr;
use std::num::NonZeroU64;
use std::sync::{Arc, LazyLock};

use super::{Protocol, ServiceKey};

/// A slice's (namespace, name).
pub type SliceKey = (Arc<str>, Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// (namespace, name) of the slice itself (shared strings: the model's
    /// map and the compiler key slices by it).
    pub key: SliceKey,
    /// From the `kubernetes.io/service-name` label.
    pub service: ServiceKey,
    /// `None`: the slice lists no ports, so every endpoint serves the
    /// Service's numeric targetPort.
    pub ports: Option<Vec<EndpointPort>>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    /// Matches the Service port of the same name ("" for an unnamed one).
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// One pod (or other target). Conditions are already defaulted the way the
/// EndpointSlice API defines nil: ready => true, serving => ready,
/// terminating => false.
///
/// Kept small: a node may hold a million of them. The first address is
/// inline (the EndpointSlice controller writes exactly one), the rarely set
/// further addresses and topology hints share one pointer, node names are
/// shared and pod names hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `addresses[0]`; an endpoint without one is not kept.
    pub address: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Shared by the endpoints of one node (`sources::NodeNames`).
    pub node_name: Option<Arc<str>>,
    /// `targetRef.name` when the target is a Pod (`tern.io/lb-weights`
    /// names endpoints by it).
    pub pod_name: Option<PodName>,
    /// `None`: one address and no hints.
    pub rare: Option<Box<RareEndpointFields>>,
}

/// A Pod's name as the model keeps it: its hash under a key drawn when
/// the agent starts. The name only serves to find an endpoint's
/// `tern.io/lb-weights` entry, and as strings the names of 1 000 000
/// endpoints took ~40 MiB. The key is secret, so names cannot be chosen to
/// collide; two names collide by chance with probability 2^-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodName(NonZeroU64);

impl From<&str> for PodName {
    fn from(name: &str) -> Self {
        static KEY: LazyLock<RandomState> = LazyLock::new(RandomState::new);
        PodName(NonZeroU64::new(KEY.hash_one(name)).unwrap_or(NonZeroU64::MIN))
    }
}

/// What few endpoints have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RareEndpointFields {
    /// `addresses[1..]` (the API calls them fungible with the first).
    pub more_addresses: Vec<Ipv4Addr>,
    pub hints: TopologyHints,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyHints {
    /// `hints.forZones`: the zones whose nodes should use this endpoint
    /// (set by the EndpointSlice controller for `trafficDistribution:
    /// PreferClose` / `PreferSameZone` and topology-aware routing).
    pub zones: Vec<String>,
    /// `hints.forNodes` (`trafficDistribution: PreferSameNode`).
    pub nodes: Vec<String>,
}

impl Endpoint {
    /// An endpoint with one address, no hints and no names.
    pub fn new(address: Ipv4Addr, ready: bool, serving: bool, terminating: bool) -> Self {
        Endpoint {
            address,
            ready,
            serving,
            terminating,
            node_name: None,
            pod_name: None,
            rare: None,
        }
    }

    /// Every address, the first one first.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let more = self.rare.as_ref().map_or(&[][..], |r| &r.more_addresses);
        std::iter::once(self.address).chain(more.iter().copied())
    }

    pub fn zone_hints(&self) -> &[String] {
        self.rare.as_ref().map_or(&[], |r| &r.hints.zones)
    }

    pub fn node_hints(&self) -> &[String] {
        self.rare.as_ref().map_or(&[], |r| &r.hints.nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_stays_small() {
        // A node may hold a million: every 8 B is 8 MB.
        assert_eq!(std::mem::size_of::<Endpoint>(), 40);
    }
}
