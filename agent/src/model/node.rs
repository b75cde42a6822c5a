//! Nodes: where each node's pods live (PodCIDRs) and how other nodes reach
//! it (its underlay address).

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// The InternalIP of `status.addresses` (first IPv4 one): the address
    /// tunnels and native routes point at. `None`: not known yet, so the
    /// node cannot be reached.
    pub internal_ip: Option<Ipv4Addr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`), IPv4 only.
    pub pod_cidrs: Vec<Ipv4Network>,
    /// The `topology.kubernetes.io/zone` label: which endpoints' zone
    /// hints this node follows.
    pub zone: Option<String>,
    /// Being deleted, or tainted ToBeDeletedByClusterAutoscaler: the
    /// proxy health check says "not eligible" so load balancers drain it.
    pub to_be_deleted: bool,
}
