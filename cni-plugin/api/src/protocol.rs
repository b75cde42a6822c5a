//! The messages on the agent's unix socket: one JSON [`Request`] per
//! connection, one JSON [`Response`] back.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Default path of the agent's socket.
pub const DEFAULT_SOCKET: &str = "/var/run/tern/tern.sock";

/// One pod attachment, as the runtime names it: (container id, interface).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// A pod's interface as the datapath needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub attachment: Attachment,
    pub ip: Ipv4Addr,
    /// MAC address of the pod-side interface.
    pub mac: [u8; 6],
    /// Name of the host-side veth in the node's namespace.
    pub host_ifname: String,
    /// Network namespace path the runtime gave (for operators only).
    pub netns: String,
    /// The pod's hostPorts (the CNI `portMappings` capability): served by
    /// the datapath on the node's addresses while the endpoint exists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<HostPort>,
    /// The pod's bandwidth limits (the CNI `bandwidth` capability), which
    /// tern-cni put on its interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BandwidthLimits>,
    /// The pod this endpoint belongs to, from the runtime's CNI_ARGS
    /// (K8S_POD_NAMESPACE, K8S_POD_NAME): NetworkPolicy knows the pod's
    /// labels by it before the kubelet reports the pod's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The pod network namespace's cookie (SO_NETNS_COOKIE): how socket
    /// events (`tern observe`) name their pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
}

/// A pod by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// Rates in bits per second; 0 is unlimited. Ingress is into the pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BandwidthLimits {
    pub ingress_rate: u64,
    pub egress_rate: u64,
}

/// One hostPort: `host_ip:host_port` (every node address when `host_ip`
/// is `None`) forwarded to the pod's `container_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostPort {
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: HostPortProtocol,
}

impl HostPort {
    /// Whether both would take the same node address and port.
    pub fn overlaps(&self, other: &HostPort) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host_ip {
            Some(ip) => write!(f, "{ip}:")?,
            None => f.write_str("*:")?,
        }
        write!(
            f,
            "{}/{} -> {}",
            self.host_port, self.protocol, self.container_port
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HostPortProtocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for HostPortProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostPortProtocol::Tcp => "TCP",
            HostPortProtocol::Udp => "UDP",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Give this attachment an address from the node PodCIDR (idempotent:
    /// the same attachment gets the address it already has).
    Allocate { attachment: Attachment },
    /// Give the address back; releasing an unknown attachment is not an error.
    Release { attachment: Attachment },
    /// The pod's interface exists: attach the datapath and publish it.
    EndpointCreate { endpoint: Endpoint },
    /// Remove the endpoint from the datapath (idempotent).
    EndpointDelete { attachment: Attachment },
    /// Forget everything not in `valid`: addresses, endpoints, host veths.
    Gc { valid: Vec<Attachment> },
    /// Whether the agent can serve ADDs now.
    Status,
    /// Everything the agent holds about endpoints.
    ListEndpoints,
    /// The Service frontends in the datapath, with their backends.
    ListServices,
    /// The NetworkPolicies, the pods of this node they select, and each
    /// pod's identity and isolation.
    ListPolicies,
    /// What the datapath decides for a new connection `from` -> `to`
    /// (`protocol`: 6 TCP, 17 UDP), and by which policy and rule.
    ExplainPolicy {
        from: Ipv4Addr,
        to: Ipv4Addr,
        protocol: u8,
        port: u16,
    },
    /// The last `last` flows `filter` selects, oldest first, each its own
    /// [`Response::Flow`] line; then, with `follow`, new ones as they come,
    /// until the client hangs up. [`Response::FlowsLost`] reports events
    /// the datapath or this stream lost.
    Observe {
        filter: crate::flows::FlowFilter,
        last: usize,
        follow: bool,
    },
}

impl Request {
    /// The `op` the request is sent as.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Allocate { .. } => "allocate",
            Request::Release { .. } => "release",
            Request::EndpointCreate { .. } => "endpoint_create",
            Request::EndpointDelete { .. } => "endpoint_delete",
            Request::Gc { .. } => "gc",
            Request::Status => "status",
            Request::ListEndpoints => "list_endpoints",
            Request::ListServices => "list_services",
            Request::ListPolicies => "list_policies",
            Request::ExplainPolicy { .. } => "explain_policy",
            Request::Observe { .. } => "observe",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Allocated {
        ip: Ipv4Addr,
        /// PodCIDR prefix length, for operators; the pod itself gets a /32.
        pod_cidr: String,
        mtu: u32,
    },
    Done,
    Released {
        ip: Option<Ipv4Addr>,
    },
    GcDone {
        released: Vec<Attachment>,
    },
    /// Boxed: much larger than the other answers.
    Status(Box<AgentStatus>),
    Endpoints {
        endpoints: Vec<EndpointStatus>,
    },
    Services {
        frontends: Vec<FrontendStatus>,
    },
    Policies {
        policies: Vec<PolicyListing>,
        endpoints: Vec<EndpointPolicyListing>,
    },
    /// One flow of an `Observe` stream.
    Flow(Box<crate::flows::Flow>),
    /// Events lost so far: `ring` the datapath could not report (ring
    /// buffer full) and `rate_limited` drop events over the per-CPU
    /// budget, both since the datapath's maps were created (they outlive
    /// agent restarts); `stream` flows this stream skipped because its
    /// reader fell behind. Sent first and whenever a count grows.
    FlowsLost {
        ring: u64,
        rate_limited: u64,
        stream: u64,
    },
    /// The end of an `Observe` answer without `follow`.
    FlowsEnd,
    Explained {
        allowed: bool,
        /// One line per direction judged (egress at a local sender,
        /// ingress at a local receiver).
        lines: Vec<String>,
    },
    Error {
        message: String,
        /// The request may succeed later (e.g. the node has no PodCIDR yet):
        /// the plugin answers CNI code 11, "try again later".
        try_again: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node_name: String,
    pub pod_cidr: Option<String>,
    pub mtu: u32,
    pub allocated: usize,
    pub capacity: usize,
    pub endpoints: usize,
    /// Ready means ADDs can be served: PodCIDR known and datapath loaded.
    pub ready: bool,
    pub reason: Option<String>,
    pub bpffs_dir: String,
    /// Requests served since the agent started, and how many of them failed.
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub requests_failed: u64,
    /// Service frontends and backends in the datapath.
    #[serde(default)]
    pub frontends: usize,
    #[serde(default)]
    pub backends: usize,
    /// "socket-lb" or "per-packet".
    #[serde(default)]
    pub service_path: String,
    /// "overlay" or "native": how pods on other nodes are reached.
    #[serde(default)]
    pub routing_mode: String,
    /// Map operations of the last service sync, and how many failed.
    #[serde(default)]
    pub last_sync: SyncCounts,
    /// Where Services, EndpointSlices and Nodes come from: "manifests
    /// <dir>", or "none".
    #[serde(default)]
    pub source: String,
    /// Seconds since the last service sync; `None` before the first.
    #[serde(default)]
    pub last_sync_age_s: Option<u64>,
    /// The first snapshot from the source is in the datapath (always, with
    /// no source).
    #[serde(default)]
    pub synced: bool,
    /// Services in the last snapshot from the source.
    #[serde(default)]
    pub services: usize,
    /// This node's pods with their own network, as the API lists them;
    /// `None` when the source has no pods (manifests, none).
    #[serde(default)]
    pub pods: Option<usize>,
    /// Endpoints whose address no pod of this node has: addresses the API
    /// does not know (yet), or leaked ones.
    #[serde(default)]
    pub endpoints_without_pod: Option<usize>,
    /// NetworkPolicy enforcement on this node.
    #[serde(default)]
    pub policy: PolicySummary,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicySummary {
    /// NetworkPolicies in the cluster.
    pub policies: usize,
    /// This node's pods isolated in at least one direction.
    pub isolated_pods: usize,
    /// Allow and ipBlock entries in the maps.
    pub entries: usize,
    /// Pods denying a direction because their policy could not be
    /// programmed (fail closed): "ip direction: reason".
    pub failed: Vec<String>,
    /// Syncs that left a pod failed closed, since the agent started.
    pub failures_total: u64,
    /// Policies not applied as written (they fail closed), and pods
    /// denied because they are unknown.
    pub problems: Vec<String>,
}

/// One NetworkPolicy as `tern policy list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyListing {
    pub name: String,
    pub number: u32,
    /// The pods of this node it selects.
    pub selects: Vec<Ipv4Addr>,
    /// New connections it allowed on this node (from POLICY_COUNTS;
    /// the CLI fills it in).
    pub allowed: u64,
    /// Connections denied at pods it isolates (first by number; from
    /// POLICY_DENIALS, the CLI fills it in).
    #[serde(default)]
    pub denied: u64,
    pub error: Option<String>,
}

/// One pod of this node as policy sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointPolicyListing {
    pub ip: Ipv4Addr,
    /// "namespace/name", when known.
    pub pod: Option<String>,
    pub identity: Option<u32>,
    /// "isolated", "deny-all" (fail closed) or "open".
    pub ingress: String,
    pub egress: String,
    /// Allow entries (both directions).
    pub entries: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncCounts {
    pub syncs: u64,
    pub writes: u64,
    pub deletes: u64,
    pub errors: u64,
    /// Backends and frontends left out because a map refused to take them
    /// (full), by map name, e.g. {"SERVICES": 12}.
    #[serde(default)]
    pub refused: std::collections::BTreeMap<String, u64>,
}

/// One Service frontend as `tern service list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontendStatus {
    /// "ip:port/PROTO".
    pub frontend: String,
    /// "ClusterIP", "NodePort", "LoadBalancer" or "ExternalIP".
    pub kind: String,
    /// "external" or "internal" (ETP=Local frontends have both).
    pub scope: String,
    /// "namespace/name" and the Service port's name.
    pub service: String,
    pub port_name: String,
    /// e.g. "affinity=10800s", "maglev", "local".
    pub flags: Vec<String>,
    /// "ip:port".
    pub backends: Vec<String>,
    /// The scheduler (`tern.io/lb-algorithm`): "random", "maglev", "rr"...
    #[serde(default)]
    pub algorithm: String,
    /// Each backend's weight, in the order of `backends`.
    #[serde(default)]
    pub weights: Vec<u32>,
    /// Each backend's open connections as the datapath counts them (lc,
    /// wlc, sed, nq; filled in by the CLI from the pinned CONNECTIONS map),
    /// in the order of `backends`; empty when not counted.
    #[serde(default)]
    pub connections: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub endpoint: Endpoint,
    pub host_ifindex: u32,
    /// Whether the datapath program is attached to the host veth.
    pub attached: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_tagged_json() {
        let req = Request::Allocate {
            attachment: Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
        };
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["op"], "allocate");
        assert_eq!(json["attachment"]["container_id"], "c1");
        let back: Request = serde_json::from_value(json).unwrap();
        assert_eq!(back, req);
    }

    /// Endpoints an agent without hostPorts stored (and plugins that send
    /// none) still read; an endpoint without hostPorts is written as before.
    #[test]
    fn host_ports_are_optional_on_the_wire() {
        let old = serde_json::json!({
            "attachment": {"container_id": "c1", "ifname": "eth0"},
            "ip": "10.244.0.2",
            "mac": [2, 0, 0, 0, 0, 2],
            "host_ifname": "ternabc",
            "netns": "/run/netns/x"
        });
        let endpoint: Endpoint = serde_json::from_value(old.clone()).unwrap();
        assert!(endpoint.host_ports.is_empty());
        assert_eq!(serde_json::to_value(&endpoint).unwrap(), old);
        let port = HostPort {
            host_ip: None,
            host_port: 8080,
            container_port: 80,
            protocol: HostPortProtocol::Udp,
        };
        let json = serde_json::to_value(port).unwrap();
        assert_eq!(json["protocol"], "UDP");
        assert_eq!(port.to_string(), "*:8080/UDP -> 80");
        let on_node = HostPort {
            host_ip: Some(std::net::Ipv4Addr::new(10, 0, 0, 11)),
            ..port
        };
        let tcp = HostPort {
            protocol: HostPortProtocol::Tcp,
            ..port
        };
        assert!(port.overlaps(&on_node) && on_node.overlaps(&port));
        assert!(!port.overlaps(&tcp));
    }
}
