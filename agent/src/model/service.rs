//! Services as the load balancer needs them: no Kubernetes types, every
//! field already validated and defaulted by the source that made it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use super::PodName;

/// A Service's identity, shown as `namespace/name`. Shared strings: the
/// model, the compiler and every frontend entry hold a key per Service, and
/// a clone is a count, not two allocations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number, as the datapath keys its maps.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .find(|p| p.number() == number)
    }

    /// "TCP", "UDP", "SCTP", or the number of any other protocol.
    pub fn name_of(number: u8) -> String {
        Self::from_number(number).map_or_else(|| number.to_string(), |p| p.to_string())
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    /// A DNS alias: kept in the model, never in the datapath.
    ExternalName,
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    /// Only endpoints on the receiving node serve.
    Local,
}

/// How a frontend picks a backend for a new connection
/// (`tern.io/lb-algorithm`); besides random and Maglev, the IPVS
/// schedulers, with IPVS's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum LbAlgorithm {
    #[default]
    Random,
    Maglev,
    /// Round robin.
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections.
    Wlc,
    /// Source hashing.
    Sh,
    /// Destination hashing.
    Dh,
    /// Shortest expected delay.
    Sed,
    /// Never queue.
    Nq,
}

impl LbAlgorithm {
    pub const ALL: [LbAlgorithm; 10] = [
        LbAlgorithm::Random,
        LbAlgorithm::Maglev,
        LbAlgorithm::Rr,
        LbAlgorithm::Wrr,
        LbAlgorithm::Lc,
        LbAlgorithm::Wlc,
        LbAlgorithm::Sh,
        LbAlgorithm::Dh,
        LbAlgorithm::Sed,
        LbAlgorithm::Nq,
    ];

    /// The annotation's (and IPVS's) name.
    pub fn name(self) -> &'static str {
        match self {
            LbAlgorithm::Random => "random",
            LbAlgorithm::Maglev => "maglev",
            LbAlgorithm::Rr => "rr",
            LbAlgorithm::Wrr => "wrr",
            LbAlgorithm::Lc => "lc",
            LbAlgorithm::Wlc => "wlc",
            LbAlgorithm::Sh => "sh",
            LbAlgorithm::Dh => "dh",
            LbAlgorithm::Sed => "sed",
            LbAlgorithm::Nq => "nq",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The datapath's code (`tern_common::lb_algorithm`).
    pub fn code(self) -> u8 {
        use tern_common::lb_algorithm as code;
        match self {
            LbAlgorithm::Random => code::RANDOM,
            LbAlgorithm::Maglev => code::MAGLEV,
            LbAlgorithm::Rr => code::RR,
            LbAlgorithm::Wrr => code::WRR,
            LbAlgorithm::Lc => code::LC,
            LbAlgorithm::Wlc => code::WLC,
            LbAlgorithm::Sh => code::SH,
            LbAlgorithm::Dh => code::DH,
            LbAlgorithm::Sed => code::SED,
            LbAlgorithm::Nq => code::NQ,
        }
    }

    /// The IPVS schedulers: endpoint weights apply (weight 0 takes no new
    /// connections); random and Maglev ignore them.
    pub fn uses_weights(self) -> bool {
        !matches!(self, LbAlgorithm::Random | LbAlgorithm::Maglev)
    }
}

impl fmt::Display for LbAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `tern.io/lb-weights`: per-endpoint weights for the IPVS schedulers,
/// keyed by the endpoint's pod name (`targetRef.name`) or address; the
/// others weigh `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbWeights {
    pub by_pod: BTreeMap<PodName, u32>,
    pub by_address: BTreeMap<Ipv4Addr, u32>,
    pub default: u32,
}

impl Default for LbWeights {
    fn default() -> Self {
        LbWeights::NONE
    }
}

impl LbWeights {
    /// No annotation: every endpoint weighs 1.
    pub const NONE: LbWeights = LbWeights {
        by_pod: BTreeMap::new(),
        by_address: BTreeMap::new(),
        default: 1,
    };

    /// The weight of an endpoint address (of pod `pod`, if known): by
    /// address first, then by pod name.
    pub fn of(&self, address: Ipv4Addr, pod: Option<PodName>) -> u32 {
        self.by_address
            .get(&address)
            .or_else(|| pod.and_then(|p| self.by_pod.get(&p)))
            .copied()
            .unwrap_or(self.default)
    }
}

/// Where a Service port sends traffic on the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per endpoint through the
    /// EndpointSlice ports (the pods behind one Service may differ).
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Empty only when the Service has a single port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    pub service_type: ServiceType,
    /// Empty for a headless Service (`clusterIP: None`); IPv4 only.
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// `Some(seconds)` with `sessionAffinity: ClientIP`.
    pub session_affinity_timeout: Option<u32>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub publish_not_ready_addresses: bool,
    /// From the `tern.io/lb-algorithm` annotation; `None` leaves the choice
    /// to the node's configured default (sources need no config that way).
    pub lb_algorithm: Option<LbAlgorithm>,
    /// `metadata.creationTimestamp` in Unix seconds (`None` in manifests
    /// that leave it out): of two Services claiming one frontend, the older
    /// keeps it.
    pub created: Option<i64>,
    /// `None`: none of them is set, as on most Services (one pointer
    /// instead of ~130 B on each of 100 000). Read through the accessors.
    pub rare: Option<Box<RareServiceFields>>,
}

/// What few Services have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RareServiceFields {
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `spec.healthCheckNodePort` (a LoadBalancer with
    /// externalTrafficPolicy Local): the node answers cloud load
    /// balancers' health checks there with its count of local endpoints.
    pub health_check_node_port: Option<u16>,
    /// `spec.loadBalancerSourceRanges` (or the older annotation): clients
    /// its LoadBalancer addresses serve. `Some(empty)`: ranges were given
    /// but none is IPv4, so no IPv4 client is served (never "all").
    pub load_balancer_source_ranges: Option<Vec<ipnetwork::Ipv4Network>>,
    /// From the `tern.io/lb-weights` annotation (every endpoint weighs 1
    /// without it).
    pub lb_weights: LbWeights,
}

/// The weights of a Service without the annotation.
static NO_WEIGHTS: LbWeights = LbWeights::NONE;

impl Service {
    /// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

    pub fn is_headless(&self) -> bool {
        self.cluster_ips.is_empty()
    }

    pub fn external_ips(&self) -> &[Ipv4Addr] {
        self.rare.as_ref().map_or(&[], |r| &r.external_ips)
    }

    pub fn load_balancer_ips(&self) -> &[Ipv4Addr] {
        self.rare.as_ref().map_or(&[], |r| &r.load_balancer_ips)
    }

    pub fn health_check_node_port(&self) -> Option<u16> {
        self.rare.as_ref()?.health_check_node_port
    }

    pub fn load_balancer_source_ranges(&self) -> Option<&[ipnetwork::Ipv4Network]> {
        self.rare.as_ref()?.load_balancer_source_ranges.as_deref()
    }

    pub fn lb_weights(&self) -> &LbWeights {
        self.rare.as_ref().map_or(&NO_WEIGHTS, |r| &r.lb_weights)
    }

    /// The rarely set fields to fill in or edit, boxed on first use (for
    /// tests: sources build them whole and box them only when set).
    #[cfg(test)]
    pub fn rare_mut(&mut self) -> &mut RareServiceFields {
        self.rare.get_or_insert_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_stays_small() {
        // 100 000 of them: every 8 B is 0.8 MB.
        assert_eq!(std::mem::size_of::<Service>(), 120);
    }
}
