//! Pods on this node, as the API sees them.

use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// (namespace, name).
    pub key: (String, String),
    /// `status.podIPs`, IPv4 only; empty until the kubelet reports them.
    pub ips: Vec<Ipv4Addr>,
    /// Uses the node's network: has no endpoint of Tern's.
    pub host_network: bool,
}
