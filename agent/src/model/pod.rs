//! Pods as policy and the endpoint checks need them: every pod of the
//! cluster (the API source), the smallest projection that serves.

use std::net::Ipv4Addr;

use super::{Labels, Protocol};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// (namespace, name).
    pub key: (String, String),
    /// `spec.nodeName`; `None` until scheduled.
    pub node: Option<String>,
    /// `status.podIPs`, IPv4 only; empty until the kubelet reports them.
    pub ips: Vec<Ipv4Addr>,
    /// Uses the node's network: has no endpoint of Tern's.
    pub host_network: bool,
    /// `status.phase` Succeeded or Failed: its containers are gone and its
    /// address may already be another pod's (the status keeps it).
    pub finished: bool,
    pub labels: Labels,
    /// The containers' named ports (what a NetworkPolicy's named port
    /// resolves to), sorted.
    pub named_ports: Vec<NamedPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}
