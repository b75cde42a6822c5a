use std::fmt;
use std::net::Ipv4Addr;

use super::Protocol;

/// A hostPort of one of this node's pods: `host_ip:host_port` (every node
/// address when `host_ip` is `None`) to the pod's `container_port`. The
/// CNI plugin hands them over (`portMappings`) and the endpoint manager
/// holds them while the pod's endpoint exists.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPort {
    /// The runtime's container id of the pod, for operators.
    pub pod: String,
    pub pod_ip: Ipv4Addr,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(ip) => write!(f, "{ip}:{}/{}", self.host_port, self.protocol),
            None => write!(f, "*:{}/{}", self.host_port, self.protocol),
        }
    }
}
