//! Services -> load-balancer frontends with their backends, following the
//! Kubernetes "Virtual IPs and Service Proxies" rules as kube-proxy and
//! Cilium apply them. Deterministic: the same cluster always compiles to the
//! same state, on every node that has the same node context.

use std::cell::LazyCell;
use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use super::{maglev, schedulers};
use crate::model::{
    Cluster, Endpoint, EndpointSlice, HostPort, LbAlgorithm, Map, Protocol, Service, ServiceKey,
    ServicePort, ServiceType, TargetPort, TrafficPolicy,
};

mod incremental;
pub use incremental::LbCompiler;

/// What the compiler needs to know about the node it compiles for.
#[derive(Debug, Clone)]
pub struct NodeContext {
    pub node_name: String,
    /// Addresses NodePorts listen on.
    pub node_ips: Vec<Ipv4Addr>,
    /// Must be prime (checked with [`maglev::is_prime`] by configuration).
    pub maglev_table_size: u32,
    /// For Services without the `tern.io/lb-algorithm` annotation.
    pub default_algorithm: LbAlgorithm,
    /// The configured service CIDR: a ClusterIP outside it is served all
    /// the same (kube-proxy serves what the API says, and a cluster may
    /// have ServiceCIDRs beyond the first), but reported.
    pub service_cidr: Option<ipnetwork::Ipv4Network>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbState {
    /// Shared (`Arc`) between compilations while the Service behind them
    /// does not change, so the datapath sync can skip them by pointer.
    /// Persistent: the sync diffs it against the last state, skipping the
    /// subtrees they share.
    pub frontends: Map<Frontend, Arc<FrontendEntry>>,
    /// Frontends claimed by more than one Service (or a Service and a
    /// hostPort): the oldest Service keeps it (`creationTimestamp`, then
    /// namespace/name; one without a timestamp after those with one; a
    /// hostPort after every Service); the others are listed here.
    pub conflicts: Vec<Conflict>,
    /// Services with a ClusterIP outside the configured service CIDR
    /// (served all the same), with that address.
    pub outside_service_cidr: Vec<(ServiceKey, Ipv4Addr)>,
}

/// A frontend a Service (or hostPort) claims and another keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub frontend: Frontend,
    /// What the frontend is to the loser.
    pub kind: FrontendKind,
    pub service: ServiceKey,
    pub port_name: String,
    /// Who keeps it.
    pub owner: ServiceKey,
    pub owner_port_name: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} of {} port {:?} is already {}'s port {:?} (the older one keeps it): left out",
            self.kind.name(),
            self.frontend,
            self.service,
            self.port_name,
            self.owner,
            self.owner_port_name
        )
    }
}

/// Which clients a frontend entry serves; the datapath picks External for
/// packets from outside the cluster and tries Internal first for in-cluster
/// ones (only ETP=Local frontends have an Internal entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Scope {
    External = 0,
    Internal = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)?;
        if self.scope == Scope::Internal {
            f.write_str(" (internal)")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
    /// A pod's hostPort (CNI `portMappings`), on this node only.
    HostPort,
}

impl FrontendKind {
    /// The Kubernetes name (metric labels, logs).
    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::HostPort => "HostPort",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for BackendAddr {
    /// Also the stable name Maglev hashes, so it must never change.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

/// The lists are shared (`Arc`) by the frontends of one Service port that
/// serve the same backends (ClusterIP, NodePort on each node address, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendEntry {
    pub service: ServiceKey,
    pub port_name: Arc<str>,
    pub kind: FrontendKind,
    /// Sorted and deduplicated. Empty: the datapath refuses connections.
    pub backends: Arc<[BackendAddr]>,
    pub affinity_timeout: Option<u32>,
    pub algorithm: LbAlgorithm,
    /// Each backend's weight (`tern.io/lb-weights`; 1 for random and
    /// Maglev). Backends weighing 0 are not listed: they take no new
    /// connections.
    pub weights: Weights,
    /// The scheduler's lookup table, each entry an index into `backends`:
    /// Maglev's (`maglev_table_size` entries), wrr's sequence, sh's or dh's
    /// buckets; `None` for the others or when there are no backends.
    pub table: Option<Arc<[u32]>>,
    /// ETP=Local on an externally reachable frontend: keep the client's
    /// source address (no SNAT); only node-local backends are listed.
    pub external_traffic_local: bool,
    /// No backend here, though the Service has usable endpoints elsewhere
    /// (a Local traffic policy): the datapath drops, it does not refuse.
    pub no_local_backend: bool,
    /// A LoadBalancer frontend's allowed clients
    /// (`loadBalancerSourceRanges`); `None`: every client.
    pub source_ranges: Option<Arc<[ipnetwork::Ipv4Network]>>,
}

/// Backend weights by index. Stored only when one is not 1: most
/// frontends weigh every backend 1, and a Vec per frontend (here and in the
/// datapath sync's record) added up to MiBs with 100 000 Services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Weights(Option<Arc<[u32]>>);

impl Weights {
    pub fn new(weights: Vec<u32>) -> Self {
        Weights((!weights.iter().all(|&w| w == 1)).then(|| weights.into()))
    }

    /// The weight of backend `i`.
    pub fn of(&self, i: usize) -> u32 {
        self.0.as_ref().and_then(|w| w.get(i)).copied().unwrap_or(1)
    }

    /// The weights of backends `0..count`.
    pub fn to_vec(&self, count: usize) -> Vec<u32> {
        (0..count).map(|i| self.of(i)).collect()
    }
}

/// Compiles `cluster` from scratch (no hostPorts).
pub fn compile(cluster: &Cluster, ctx: &NodeContext) -> LbState {
    LbCompiler::new(ctx.clone()).compile(cluster, &[])
}

/// A hostPort on its address, or on every node address: the pod is its
/// only backend, and the client keeps its address (a hostPort is DNAT only,
/// as the portmap plugin does it; the pod is on this node).
fn host_port_frontends(port: &HostPort, ctx: &NodeContext) -> Vec<(Frontend, Arc<FrontendEntry>)> {
    let entry = Arc::new(FrontendEntry {
        service: ServiceKey::new("hostPort", port.pod.clone()),
        port_name: "".into(),
        kind: FrontendKind::HostPort,
        backends: Arc::new([BackendAddr {
            ip: port.pod_ip,
            port: port.container_port,
            protocol: port.protocol,
        }]),
        affinity_timeout: None,
        algorithm: LbAlgorithm::Random,
        weights: Weights::default(),
        table: None,
        external_traffic_local: true,
        no_local_backend: false,
        source_ranges: None,
    });
    let ips = match port.host_ip {
        Some(ip) => vec![ip],
        None => ctx.node_ips.clone(),
    };
    ips.into_iter()
        .map(|ip| {
            let frontend = at(ip, port.host_port, port.protocol, Scope::External);
            (frontend, entry.clone())
        })
        .collect()
}

/// Where this node is, for endpoints' topology hints.
#[derive(Clone, Copy)]
struct Topology<'a> {
    node: &'a str,
    zone: Option<&'a str>,
}

/// Every frontend of one Service, in port order.
fn service_frontends(
    service: &Service,
    slices: &[&EndpointSlice],
    algorithm: LbAlgorithm,
    topology: Topology,
    ctx: &NodeContext,
) -> Vec<(Frontend, Arc<FrontendEntry>)> {
    let mut out = Vec::new();
    if service.service_type == ServiceType::ExternalName || service.is_headless() {
        return out;
    }
    for port in &service.ports {
        if port.protocol != Protocol::Sctp {
            compile_port(&mut out, service, port, slices, algorithm, topology, ctx);
        }
    }
    out
}

/// A backend candidate: one address of one endpoint, with its conditions.
struct Candidate<'a> {
    addr: BackendAddr,
    endpoint: &'a Endpoint,
}

/// A backend set with its weights and lookup table, computed once and
/// shared by every frontend of the port that uses it.
struct Pool {
    backends: Arc<[BackendAddr]>,
    weights: Weights,
    table: Option<Arc<[u32]>>,
}

impl Pool {
    /// The IPVS schedulers weigh each backend (and leave out those weighing
    /// 0); random and Maglev weigh them all 1.
    fn new(
        backends: Vec<BackendAddr>,
        service: &Service,
        candidates: &[Candidate],
        algorithm: LbAlgorithm,
        ctx: &NodeContext,
    ) -> Pool {
        let (backends, weights): (Vec<BackendAddr>, Vec<u32>) = if algorithm.uses_weights() {
            backends
                .into_iter()
                .map(|b| {
                    let pod = candidates
                        .iter()
                        .find(|c| c.addr == b)
                        .and_then(|c| c.endpoint.pod_name);
                    (b, service.lb_weights().of(b.ip, pod))
                })
                .filter(|(_, weight)| *weight > 0)
                .unzip()
        } else {
            (backends, Vec::new())
        };
        let table = (!backends.is_empty())
            .then(|| match algorithm {
                LbAlgorithm::Maglev => {
                    let names: Vec<String> = backends.iter().map(BackendAddr::to_string).collect();
                    Some(maglev::table(&names, ctx.maglev_table_size))
                }
                LbAlgorithm::Wrr => Some(schedulers::wrr_sequence(&weights)),
                LbAlgorithm::Sh => Some(schedulers::sh_table(&weights)),
                LbAlgorithm::Dh => Some(schedulers::dh_table(backends.len())),
                _ => None,
            })
            .flatten();
        Pool {
            backends: backends.into(),
            weights: Weights::new(weights),
            table: table.map(Arc::from),
        }
    }
}

fn compile_port(
    compiled: &mut Vec<(Frontend, Arc<FrontendEntry>)>,
    service: &Service,
    port: &ServicePort,
    slices: &[&EndpointSlice],
    algorithm: LbAlgorithm,
    topology: Topology,
    ctx: &NodeContext,
) {
    let candidates = candidates(port, slices);
    let pool =
        |backends: Vec<BackendAddr>| Pool::new(backends, service, &candidates, algorithm, ctx);
    // Topology hints steer cluster-wide traffic only; Local policies
    // already keep it on the node.
    let all = match topology_filter(&candidates, topology) {
        Some(close) => pool(select(
            service,
            candidates.iter().filter(|c| close.keeps(c.endpoint)),
        )),
        None => pool(select(service, candidates.iter())),
    };
    let is_local = |c: &&Candidate| c.endpoint.node_name.as_deref() == Some(&ctx.node_name);
    // Only Local traffic policies need the node-local set (and its table).
    let local = LazyCell::new(|| pool(select(service, candidates.iter().filter(is_local))));

    // (frontend, kind, pool, external_traffic_local)
    let mut out: Vec<(Frontend, FrontendKind, &Pool, bool)> = Vec::new();
    let cluster_ip_pool = match service.internal_traffic_policy {
        TrafficPolicy::Cluster => &all,
        TrafficPolicy::Local => &*local,
    };
    for &ip in &service.cluster_ips {
        out.push((
            at(ip, port.port, port.protocol, Scope::External),
            FrontendKind::ClusterIp,
            cluster_ip_pool,
            false,
        ));
    }
    for (ip, frontend_port, kind) in external_addresses(service, port, ctx) {
        let external_scope = at(ip, frontend_port, port.protocol, Scope::External);
        match service.external_traffic_policy {
            TrafficPolicy::Cluster => out.push((external_scope, kind, &all, false)),
            TrafficPolicy::Local => {
                out.push((external_scope, kind, &*local, true));
                // In-cluster clients are exempt from ETP (kube-proxy does the
                // same): they may reach every backend, wherever it runs.
                let internal_scope = at(ip, frontend_port, port.protocol, Scope::Internal);
                out.push((internal_scope, kind, &all, false));
            }
        }
    }

    let source_ranges: Option<Arc<[_]>> = load_balancer_source_ranges(service, ctx).map(Arc::from);
    let port_name: Arc<str> = port.name.as_str().into();
    for (frontend, kind, pool, external_traffic_local) in out {
        let entry = FrontendEntry {
            service: service.key.clone(),
            port_name: port_name.clone(),
            kind,
            backends: pool.backends.clone(),
            affinity_timeout: service.session_affinity_timeout,
            algorithm,
            weights: pool.weights.clone(),
            table: pool.table.clone(),
            external_traffic_local,
            no_local_backend: pool.backends.is_empty() && !all.backends.is_empty(),
            // kube-proxy applies them to the load balancer's addresses only
            // (a balancer sending to NodePorts hides the client anyway).
            source_ranges: (kind == FrontendKind::LoadBalancer)
                .then(|| source_ranges.clone())
                .flatten(),
        };
        compiled.push((frontend, Arc::new(entry)));
    }
}

/// The Service's `loadBalancerSourceRanges`, and as kube-proxy adds them
/// when a range holds this node: the load balancer addresses themselves
/// (a node reaching its own VIP loops back with the VIP as source).
fn load_balancer_source_ranges(
    service: &Service,
    ctx: &NodeContext,
) -> Option<Vec<ipnetwork::Ipv4Network>> {
    let mut ranges = service.load_balancer_source_ranges()?.to_vec();
    let holds_node = ranges.iter().any(|range| {
        ctx.node_ips
            .iter()
            .any(|ip| !ip.is_unspecified() && range.contains(*ip))
    });
    if holds_node {
        ranges.extend(
            service
                .load_balancer_ips()
                .iter()
                .filter_map(|ip| ipnetwork::Ipv4Network::new(*ip, 32).ok()),
        );
    }
    Some(ranges)
}

/// (ip, port, kind) of every frontend reachable from outside the cluster.
fn external_addresses(
    service: &Service,
    port: &ServicePort,
    ctx: &NodeContext,
) -> Vec<(Ipv4Addr, u16, FrontendKind)> {
    let mut out = Vec::new();
    // LoadBalancer Services are NodePort Services too.
    if let (ServiceType::NodePort | ServiceType::LoadBalancer, Some(node_port)) =
        (service.service_type, port.node_port)
    {
        out.extend(
            ctx.node_ips
                .iter()
                .map(|&ip| (ip, node_port, FrontendKind::NodePort)),
        );
    }
    if service.service_type == ServiceType::LoadBalancer {
        let ingress = service.load_balancer_ips().iter();
        out.extend(ingress.map(|&ip| (ip, port.port, FrontendKind::LoadBalancer)));
    }
    let external_ips = service.external_ips().iter();
    out.extend(external_ips.map(|&ip| (ip, port.port, FrontendKind::ExternalIp)));
    out
}

fn at(ip: Ipv4Addr, port: u16, protocol: Protocol, scope: Scope) -> Frontend {
    Frontend {
        ip,
        port,
        protocol,
        scope,
    }
}

/// kube-proxy's count for a Service's health check: its ready endpoints on
/// `node_name`, once per Service port that resolves on them.
pub fn local_ready_endpoints(
    service: &Service,
    slices: &[&EndpointSlice],
    node_name: &str,
) -> usize {
    service
        .ports
        .iter()
        .map(|port| {
            candidates(port, slices)
                .iter()
                .filter(|c| c.endpoint.ready && c.endpoint.node_name.as_deref() == Some(node_name))
                .map(|c| c.addr)
                .collect::<BTreeSet<_>>()
                .len()
        })
        .sum()
}

/// Every (endpoint address, backend port) the Service port could use,
/// whatever the endpoint's conditions.
fn candidates<'a>(port: &ServicePort, slices: &[&'a EndpointSlice]) -> Vec<Candidate<'a>> {
    let mut out = Vec::new();
    for slice in slices {
        let backend_port = match &slice.ports {
            // Named targetPorts were resolved by whoever wrote the slice:
            // its port of the same name and protocol carries the number.
            Some(ports) => ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
                .map(|p| p.port),
            None => match port.target_port {
                TargetPort::Number(n) => Some(n),
                // Nothing to resolve the name through.
                TargetPort::Name(_) => None,
            },
        };
        let Some(backend_port) = backend_port else {
            continue;
        };
        for endpoint in &slice.endpoints {
            for ip in endpoint.addresses() {
                let addr = BackendAddr {
                    ip,
                    port: backend_port,
                    protocol: port.protocol,
                };
                out.push(Candidate { addr, endpoint });
            }
        }
    }
    out
}

/// Kubernetes' endpoint choice: ready endpoints; only when none is ready,
/// the serving ones that are terminating (so a rolling update never leaves a
/// Service with nothing). publishNotReadyAddresses takes them all.
fn select<'a>(
    service: &Service,
    candidates: impl Iterator<Item = &'a Candidate<'a>> + Clone,
) -> Vec<BackendAddr> {
    let pick = |keep: fn(&Endpoint) -> bool| -> BTreeSet<BackendAddr> {
        candidates
            .clone()
            .filter(|c| keep(c.endpoint))
            .map(|c| c.addr)
            .collect()
    };
    let chosen = if service.publish_not_ready_addresses {
        pick(|_| true)
    } else {
        let ready = pick(|e| e.ready);
        if ready.is_empty() {
            pick(|e| e.serving && e.terminating)
        } else {
            ready
        }
    };
    chosen.into_iter().collect()
}

/// kube-proxy's reading of topology hints: when every ready endpoint has
/// node hints and one is for this node, those for this node; else when
/// every ready endpoint has zone hints and one is for this node's zone,
/// those for the zone; else none (every endpoint serves). The hints are
/// the EndpointSlice controller's answer to `trafficDistribution`
/// (PreferClose, PreferSameZone, PreferSameNode) and to the
/// `service.kubernetes.io/topology-mode: Auto` annotation.
fn topology_filter<'t>(candidates: &[Candidate], topology: Topology<'t>) -> Option<Close<'t>> {
    let ready: Vec<&Endpoint> = candidates
        .iter()
        .map(|c| c.endpoint)
        .filter(|e| e.ready)
        .collect();
    if ready.is_empty() {
        return None;
    }
    let all_have = |hints: fn(&Endpoint) -> &[String]| ready.iter().all(|e| !hints(e).is_empty());
    let one_for = |hints: fn(&Endpoint) -> &[String], wanted: &str| {
        ready.iter().any(|e| hints(e).iter().any(|h| h == wanted))
    };
    let node = topology.node;
    if all_have(Endpoint::node_hints) && one_for(Endpoint::node_hints, node) {
        return Some(Close::Node(node));
    }
    let zone = topology.zone?;
    if all_have(Endpoint::zone_hints) && one_for(Endpoint::zone_hints, zone) {
        return Some(Close::Zone(zone));
    }
    None
}

/// The endpoints topology hints keep: those hinted for this node, or for
/// its zone.
enum Close<'a> {
    Node(&'a str),
    Zone(&'a str),
}

impl Close<'_> {
    fn keeps(&self, endpoint: &Endpoint) -> bool {
        match self {
            Close::Node(node) => endpoint.node_hints().iter().any(|h| h == node),
            Close::Zone(zone) => endpoint.zone_hints().iter().any(|h| h == zone),
        }
    }
}

#[cfg(test)]
mod tests;
