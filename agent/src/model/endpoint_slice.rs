//! EndpointSlices: where a Service's traffic can go, with the conditions
//! that decide whether it should.

use std::net::Ipv4Addr;

use smallvec::SmallVec;

use super::{Protocol, ServiceKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// (namespace, name) of the slice itself.
    pub key: (String, String),
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
/// Kept small: a node may hold a million of them. The addresses are inline
/// (a heap block for one address took 32 B more), boxed strs carry no spare
/// capacity, and the rarely set hints are one pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: SmallVec<[Ipv4Addr; 2]>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Box<str>>,
    /// `None`: no hints.
    pub hints: Option<Box<TopologyHints>>,
    /// `targetRef.name` when the target is a Pod (`tern.io/lb-weights`
    /// names endpoints by it).
    pub pod_name: Option<Box<str>>,
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
    pub fn zone_hints(&self) -> &[String] {
        self.hints.as_ref().map_or(&[], |h| &h.zones)
    }

    pub fn node_hints(&self) -> &[String] {
        self.hints.as_ref().map_or(&[], |h| &h.nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_stays_small() {
        // A node may hold a million: every 8 B is 8 MB.
        assert_eq!(std::mem::size_of::<Endpoint>(), 72);
    }
}
