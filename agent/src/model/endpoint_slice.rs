//! EndpointSlices: where a Service's traffic can go, with the conditions
//! that decide whether it should.

use std::net::Ipv4Addr;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<Ipv4Addr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// `hints.forZones`: the zones whose nodes should use this endpoint
    /// (set by the EndpointSlice controller for `trafficDistribution:
    /// PreferClose` / `PreferSameZone` and topology-aware routing).
    pub zone_hints: Vec<String>,
    /// `hints.forNodes` (`trafficDistribution: PreferSameNode`).
    pub node_hints: Vec<String>,
    /// `targetRef.name` when the target is a Pod (`tern.io/lb-weights`
    /// names endpoints by it).
    pub pod_name: Option<String>,
}
