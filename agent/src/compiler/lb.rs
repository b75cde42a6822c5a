//! Services -> load-balancer frontends with their backends, following the
//! Kubernetes "Virtual IPs and Service Proxies" rules as kube-proxy and
//! Cilium apply them. Deterministic: the same cluster always compiles to the
//! same state, on every node that has the same node context.

use std::cell::LazyCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use super::maglev;
use crate::model::{
    Cluster, Endpoint, EndpointSlice, HostPort, LbAlgorithm, Protocol, Service, ServiceKey,
    ServicePort, ServiceType, TargetPort, TrafficPolicy,
};

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
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbState {
    /// Shared (`Arc`) between compilations while the Service behind them
    /// does not change, so the datapath sync can skip them by pointer.
    pub frontends: BTreeMap<Frontend, Arc<FrontendEntry>>,
    /// Frontends claimed by more than one Service: the first Service in key
    /// order keeps it, the rest are listed here for the log.
    pub conflicts: Vec<String>,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendEntry {
    pub service: ServiceKey,
    pub port_name: String,
    pub kind: FrontendKind,
    /// Sorted and deduplicated. Empty: the datapath refuses connections.
    pub backends: Vec<BackendAddr>,
    pub affinity_timeout: Option<u32>,
    pub algorithm: LbAlgorithm,
    /// `maglev_table_size` slots, each an index into `backends`; `None` for
    /// Random or when there are no backends.
    pub maglev: Option<Vec<u32>>,
    /// ETP=Local on an externally reachable frontend: keep the client's
    /// source address (no SNAT); only node-local backends are listed.
    pub external_traffic_local: bool,
    /// No backend here, though the Service has usable endpoints elsewhere
    /// (a Local traffic policy): the datapath drops, it does not refuse.
    pub no_local_backend: bool,
    /// A LoadBalancer frontend's allowed clients
    /// (`loadBalancerSourceRanges`); `None`: every client.
    pub source_ranges: Option<Vec<ipnetwork::Ipv4Network>>,
}

/// Compiles `cluster` from scratch (no hostPorts).
pub fn compile(cluster: &Cluster, ctx: &NodeContext) -> LbState {
    LbCompiler::new(ctx.clone()).compile(cluster, &[])
}

/// Compiles cluster after cluster, reusing a Service's frontends while the
/// Service and its slices are the very objects (`Arc`) of the last time:
/// one endpoint change recompiles one Service, not all of them.
pub struct LbCompiler {
    ctx: NodeContext,
    /// Sorted by Service key.
    memo: Vec<(ServiceKey, Memo)>,
}

struct Memo {
    service: Arc<Service>,
    /// The namespace's default algorithm it was compiled with.
    namespace_algorithm: Option<LbAlgorithm>,
    /// This node's zone it was compiled with (topology hints).
    zone: Option<String>,
    slices: Vec<Arc<EndpointSlice>>,
    frontends: Vec<(Frontend, Arc<FrontendEntry>)>,
}

impl LbCompiler {
    pub fn new(ctx: NodeContext) -> Self {
        LbCompiler {
            ctx,
            memo: Vec::new(),
        }
    }

    /// The frontends of every Service of `cluster`, and of this node's
    /// pods' `host_ports`.
    pub fn compile(&mut self, cluster: &Cluster, host_ports: &[HostPort]) -> LbState {
        // Services, slices (by their Service) and the memo are all walked in
        // Service key order, side by side: no hashing, no key copies.
        let mut slices: Vec<&Arc<EndpointSlice>> = cluster.slices.values().collect();
        // Nearly sorted already (slices are named after their Service).
        slices.sort_by(|a, b| a.service.cmp(&b.service));
        let mut slices = slices.into_iter().peekable();
        let mut old = std::mem::take(&mut self.memo).into_iter().peekable();
        let mut compiled = Vec::with_capacity(cluster.services.len());
        let mut own_slices = Vec::new();
        let zone = cluster
            .nodes
            .get(&self.ctx.node_name)
            .and_then(|node| node.zone.clone());
        for service in cluster.services.values() {
            while old.next_if(|(key, _)| *key < service.key).is_some() {}
            while slices.next_if(|s| s.service < service.key).is_some() {}
            own_slices.clear();
            own_slices.extend(std::iter::from_fn(|| {
                slices.next_if(|s| s.service == service.key)
            }));
            let namespace_algorithm = cluster
                .namespaces
                .get(&service.key.namespace)
                .and_then(|ns| ns.lb_algorithm);
            let (key, entry) = match old.next_if(|(key, _)| *key == service.key) {
                Some((key, m))
                    if Arc::ptr_eq(&m.service, service)
                        && m.namespace_algorithm == namespace_algorithm
                        && m.zone == zone
                        && m.slices.len() == own_slices.len()
                        && m.slices
                            .iter()
                            .zip(&own_slices)
                            .all(|(a, b)| Arc::ptr_eq(a, b)) =>
                {
                    (key, m)
                }
                _ => {
                    let plain: Vec<&EndpointSlice> = own_slices.iter().map(|s| &***s).collect();
                    let algorithm = service
                        .lb_algorithm
                        .or(namespace_algorithm)
                        .unwrap_or(self.ctx.default_algorithm);
                    let topology = Topology {
                        node: &self.ctx.node_name,
                        zone: zone.as_deref(),
                    };
                    let frontends =
                        service_frontends(service, &plain, algorithm, topology, &self.ctx);
                    let entry = Memo {
                        service: service.clone(),
                        namespace_algorithm,
                        zone: zone.clone(),
                        slices: own_slices.iter().map(|s| (*s).clone()).collect(),
                        frontends: frontends
                            .into_iter()
                            .map(|(f, e)| (f, Arc::new(e)))
                            .collect(),
                    };
                    (service.key.clone(), entry)
                }
            };
            compiled.extend(entry.frontends.iter().cloned());
            self.memo.push((key, entry));
        }
        // After every Service: a Service keeps a frontend a hostPort claims too.
        compiled.extend(
            host_ports
                .iter()
                .flat_map(|p| host_port_frontends(p, &self.ctx)),
        );
        // A stable sort keeps the Services' key order among equal frontends:
        // the first Service keeps a frontend claimed twice.
        compiled.sort_by_key(|(frontend, _)| *frontend);
        let mut state = LbState::default();
        let mut unique: Vec<(Frontend, Arc<FrontendEntry>)> = Vec::with_capacity(compiled.len());
        for (frontend, entry) in compiled {
            match unique.last() {
                Some((last, owner)) if *last == frontend => state.conflicts.push(format!(
                    "{frontend} of {} port {:?} is already {}'s port {:?}",
                    entry.service, entry.port_name, owner.service, owner.port_name
                )),
                _ => unique.push((frontend, entry)),
            }
        }
        state.frontends = unique.into_iter().collect();
        state
    }
}

/// A hostPort on its address, or on every node address: the pod is its
/// only backend, and the client keeps its address (a hostPort is DNAT only,
/// as the portmap plugin does it; the pod is on this node).
fn host_port_frontends(port: &HostPort, ctx: &NodeContext) -> Vec<(Frontend, Arc<FrontendEntry>)> {
    let entry = Arc::new(FrontendEntry {
        service: ServiceKey::new("hostPort", port.pod.clone()),
        port_name: String::new(),
        kind: FrontendKind::HostPort,
        backends: vec![BackendAddr {
            ip: port.pod_ip,
            port: port.container_port,
            protocol: port.protocol,
        }],
        affinity_timeout: None,
        algorithm: LbAlgorithm::Random,
        maglev: None,
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
) -> Vec<(Frontend, FrontendEntry)> {
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

/// A backend set with its Maglev table, computed once and shared by every
/// frontend of the port that uses it.
struct Pool {
    backends: Vec<BackendAddr>,
    maglev: Option<Vec<u32>>,
}

fn compile_port(
    compiled: &mut Vec<(Frontend, FrontendEntry)>,
    service: &Service,
    port: &ServicePort,
    slices: &[&EndpointSlice],
    algorithm: LbAlgorithm,
    topology: Topology,
    ctx: &NodeContext,
) {
    let pool = |backends: Vec<BackendAddr>| Pool {
        maglev: maglev_table(algorithm, &backends, ctx.maglev_table_size),
        backends,
    };
    let candidates = candidates(port, slices);
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

    let source_ranges = load_balancer_source_ranges(service, ctx);
    for (frontend, kind, pool, external_traffic_local) in out {
        let entry = FrontendEntry {
            service: service.key.clone(),
            port_name: port.name.clone(),
            kind,
            backends: pool.backends.clone(),
            affinity_timeout: service.session_affinity_timeout,
            algorithm,
            maglev: pool.maglev.clone(),
            external_traffic_local,
            no_local_backend: pool.backends.is_empty() && !all.backends.is_empty(),
            // kube-proxy applies them to the load balancer's addresses only
            // (a balancer sending to NodePorts hides the client anyway).
            source_ranges: (kind == FrontendKind::LoadBalancer)
                .then(|| source_ranges.clone())
                .flatten(),
        };
        compiled.push((frontend, entry));
    }
}

/// The Service's `loadBalancerSourceRanges`, and as kube-proxy adds them
/// when a range holds this node: the load balancer addresses themselves
/// (a node reaching its own VIP loops back with the VIP as source).
fn load_balancer_source_ranges(
    service: &Service,
    ctx: &NodeContext,
) -> Option<Vec<ipnetwork::Ipv4Network>> {
    let mut ranges = service.load_balancer_source_ranges.clone()?;
    let holds_node = ranges.iter().any(|range| {
        ctx.node_ips
            .iter()
            .any(|ip| !ip.is_unspecified() && range.contains(*ip))
    });
    if holds_node {
        ranges.extend(
            service
                .load_balancer_ips
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
        let ingress = service.load_balancer_ips.iter();
        out.extend(ingress.map(|&ip| (ip, port.port, FrontendKind::LoadBalancer)));
    }
    let external_ips = service.external_ips.iter();
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
            for &ip in &endpoint.addresses {
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
    if all_have(|e| &e.node_hints) && one_for(|e| &e.node_hints, node) {
        return Some(Close::Node(node));
    }
    let zone = topology.zone?;
    if all_have(|e| &e.zone_hints) && one_for(|e| &e.zone_hints, zone) {
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
            Close::Node(node) => endpoint.node_hints.iter().any(|h| h == node),
            Close::Zone(zone) => endpoint.zone_hints.iter().any(|h| h == zone),
        }
    }
}

fn maglev_table(algorithm: LbAlgorithm, backends: &[BackendAddr], size: u32) -> Option<Vec<u32>> {
    if algorithm != LbAlgorithm::Maglev || backends.is_empty() {
        return None;
    }
    let names: Vec<String> = backends.iter().map(BackendAddr::to_string).collect();
    Some(maglev::table(&names, size))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::EndpointPort;
    use std::sync::Arc;

    const NODE: &str = "node-a";
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const NODE_IPS: [Ipv4Addr; 2] = [
        Ipv4Addr::new(192, 168, 1, 10),
        Ipv4Addr::new(192, 168, 1, 11),
    ];

    fn ctx() -> NodeContext {
        NodeContext {
            node_name: NODE.into(),
            node_ips: NODE_IPS.to_vec(),
            maglev_table_size: 251,
            default_algorithm: LbAlgorithm::Random,
        }
    }

    fn port(name: &str, protocol: Protocol, port: u16, target: TargetPort) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol,
            port,
            target_port: target,
            node_port: None,
        }
    }

    /// ClusterIP `web` on 10.96.0.10:80 -> targetPort "http".
    fn web() -> Service {
        Service {
            key: ServiceKey::new("default", "web"),
            service_type: ServiceType::ClusterIp,
            cluster_ips: vec![CLUSTER_IP],
            external_ips: vec![],
            load_balancer_ips: vec![],
            ports: vec![port(
                "http",
                Protocol::Tcp,
                80,
                TargetPort::Name("http".into()),
            )],
            session_affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            publish_not_ready_addresses: false,
            health_check_node_port: None,
            load_balancer_source_ranges: None,
            lb_algorithm: None,
        }
    }

    #[derive(Clone, Copy)]
    enum State {
        Ready,
        NotReady,
        /// Terminating, still serving.
        Draining,
        /// Terminating, no longer serving.
        Gone,
    }

    fn ep(ip: &str, node: &str, state: State) -> Endpoint {
        let (ready, serving, terminating) = match state {
            State::Ready => (true, true, false),
            State::NotReady => (false, false, false),
            State::Draining => (false, true, true),
            State::Gone => (false, false, true),
        };
        Endpoint {
            addresses: vec![ip.parse().unwrap()],
            ready,
            serving,
            terminating,
            node_name: Some(node.into()),
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    /// A slice of `web` whose "http" port is `http`.
    fn slice(name: &str, http: u16, endpoints: Vec<Endpoint>) -> EndpointSlice {
        slice_with_ports(name, Some(vec![("http", Protocol::Tcp, http)]), endpoints)
    }

    fn slice_with_ports(
        name: &str,
        ports: Option<Vec<(&str, Protocol, u16)>>,
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            key: ("default".into(), name.into()),
            service: ServiceKey::new("default", "web"),
            ports: ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|(name, protocol, port)| EndpointPort {
                        name: name.into(),
                        port,
                        protocol,
                    })
                    .collect()
            }),
            endpoints,
        }
    }

    fn cluster(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Cluster {
        Cluster {
            services: services
                .into_iter()
                .map(|s| (s.key.clone(), Arc::new(s)))
                .collect(),
            slices: slices
                .into_iter()
                .map(|s| (s.key.clone(), Arc::new(s)))
                .collect(),
            ..Default::default()
        }
    }

    fn at(ip: Ipv4Addr, port: u16, scope: Scope) -> Frontend {
        Frontend {
            ip,
            port,
            protocol: Protocol::Tcp,
            scope,
        }
    }

    fn backends_of(state: &LbState, frontend: Frontend) -> Vec<String> {
        let entry = state.frontends.get(&frontend).unwrap_or_else(|| {
            panic!(
                "no {frontend}; have {:?}",
                state.frontends.keys().collect::<Vec<_>>()
            )
        });
        entry
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.ip, b.port))
            .collect()
    }

    fn cluster_ip_backends(state: &LbState) -> Vec<String> {
        backends_of(state, at(CLUSTER_IP, 80, Scope::External))
    }

    #[test]
    fn cluster_ip_spreads_over_ready_backends_of_every_slice() {
        let c = cluster(
            vec![web()],
            vec![
                slice(
                    "web-a",
                    8080,
                    vec![
                        ep("10.0.1.2", NODE, State::Ready),
                        ep("10.0.1.1", NODE, State::Ready),
                    ],
                ),
                // The same pod listed twice (e.g. during a slice rebalance) is one backend.
                slice(
                    "web-b",
                    8080,
                    vec![
                        ep("10.0.2.1", "node-b", State::Ready),
                        ep("10.0.1.1", NODE, State::Ready),
                    ],
                ),
            ],
        );
        let state = compile(&c, &ctx());
        assert_eq!(state.frontends.len(), 1);
        assert_eq!(
            cluster_ip_backends(&state),
            ["10.0.1.1:8080", "10.0.1.2:8080", "10.0.2.1:8080"]
        );
        let entry = state.frontends.values().next().unwrap();
        assert_eq!(
            (entry.kind, entry.port_name.as_str()),
            (FrontendKind::ClusterIp, "http")
        );
        assert!(
            !entry.external_traffic_local
                && entry.maglev.is_none()
                && entry.affinity_timeout.is_none()
        );
        assert!(state.conflicts.is_empty());
    }

    #[test]
    fn terminating_endpoints_serve_only_when_nothing_is_ready() {
        let mixed = vec![
            ep("10.0.1.1", NODE, State::Ready),
            ep("10.0.1.2", NODE, State::NotReady),
            ep("10.0.1.3", NODE, State::Draining),
            ep("10.0.1.4", NODE, State::Gone),
        ];
        let state = compile(
            &cluster(vec![web()], vec![slice("web-a", 8080, mixed.clone())]),
            &ctx(),
        );
        assert_eq!(cluster_ip_backends(&state), ["10.0.1.1:8080"]);

        let none_ready = mixed[1..].to_vec();
        let state = compile(
            &cluster(vec![web()], vec![slice("web-a", 8080, none_ready.clone())]),
            &ctx(),
        );
        assert_eq!(cluster_ip_backends(&state), ["10.0.1.3:8080"]);

        let mut publish = web();
        publish.publish_not_ready_addresses = true;
        let state = compile(
            &cluster(vec![publish], vec![slice("web-a", 8080, mixed)]),
            &ctx(),
        );
        assert_eq!(cluster_ip_backends(&state).len(), 4);
    }

    #[test]
    fn named_target_port_resolves_per_slice() {
        let c = cluster(
            vec![web()],
            vec![
                slice("web-v1", 8080, vec![ep("10.0.1.1", NODE, State::Ready)]),
                slice("web-v2", 9090, vec![ep("10.0.2.1", NODE, State::Ready)]),
                // No ports: a named targetPort has nothing to resolve through.
                slice_with_ports("web-bare", None, vec![ep("10.0.3.1", NODE, State::Ready)]),
                // A port of another name or protocol is not this one.
                slice_with_ports(
                    "web-udp",
                    Some(vec![
                        ("http", Protocol::Udp, 7070),
                        ("metrics", Protocol::Tcp, 9100),
                    ]),
                    vec![ep("10.0.4.1", NODE, State::Ready)],
                ),
            ],
        );
        let state = compile(&c, &ctx());
        assert_eq!(
            cluster_ip_backends(&state),
            ["10.0.1.1:8080", "10.0.2.1:9090"]
        );

        // A numeric targetPort serves slices without ports.
        let mut numeric = web();
        numeric.ports[0].target_port = TargetPort::Number(8000);
        let state = compile(
            &cluster(
                vec![numeric],
                vec![slice_with_ports(
                    "web-bare",
                    None,
                    vec![ep("10.0.3.1", NODE, State::Ready)],
                )],
            ),
            &ctx(),
        );
        assert_eq!(cluster_ip_backends(&state), ["10.0.3.1:8000"]);
    }

    #[test]
    fn every_port_of_a_multi_port_service_is_a_frontend() {
        let mut dns = web();
        dns.ports = vec![
            port("dns", Protocol::Udp, 53, TargetPort::Number(53)),
            port("dns-tcp", Protocol::Tcp, 53, TargetPort::Number(53)),
            port("sctp", Protocol::Sctp, 9999, TargetPort::Number(9999)),
        ];
        let ports = vec![
            ("dns", Protocol::Udp, 5353),
            ("dns-tcp", Protocol::Tcp, 5354),
            ("sctp", Protocol::Sctp, 9999),
        ];
        let state = compile(
            &cluster(
                vec![dns],
                vec![slice_with_ports(
                    "dns-a",
                    Some(ports),
                    vec![ep("10.0.1.1", NODE, State::Ready)],
                )],
            ),
            &ctx(),
        );
        let summary: Vec<(String, Vec<String>)> = state
            .frontends
            .iter()
            .map(|(f, e)| {
                (
                    f.to_string(),
                    e.backends.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        // SCTP is not compiled.
        assert_eq!(
            summary,
            [
                (
                    "10.96.0.10:53/TCP".to_string(),
                    vec!["10.0.1.1:5354/TCP".to_string()]
                ),
                (
                    "10.96.0.10:53/UDP".to_string(),
                    vec!["10.0.1.1:5353/UDP".to_string()]
                ),
            ]
        );
    }

    #[test]
    fn node_port_listens_on_every_node_ip() {
        let mut svc = web();
        svc.service_type = ServiceType::NodePort;
        svc.ports[0].node_port = Some(30080);
        svc.session_affinity_timeout = Some(600);
        let state = compile(
            &cluster(
                vec![svc],
                vec![slice(
                    "web-a",
                    8080,
                    vec![ep("10.0.1.1", "node-b", State::Ready)],
                )],
            ),
            &ctx(),
        );
        assert_eq!(state.frontends.len(), 3);
        for ip in NODE_IPS {
            let entry = &state.frontends[&at(ip, 30080, Scope::External)];
            assert_eq!(entry.kind, FrontendKind::NodePort);
            assert_eq!(entry.affinity_timeout, Some(600));
            assert_eq!(
                backends_of(&state, at(ip, 30080, Scope::External)),
                ["10.0.1.1:8080"]
            );
        }
        assert_eq!(
            state.frontends[&at(CLUSTER_IP, 80, Scope::External)].affinity_timeout,
            Some(600)
        );
    }

    /// A hostPort listens on every node address (or its hostIP) with the
    /// pod as its only backend, keeps the client address, and yields to a
    /// Service frontend on the same address and port.
    #[test]
    fn host_ports_are_frontends_services_win() {
        let host_port = |host_ip, host_port| HostPort {
            pod: "c0ffee".into(),
            pod_ip: Ipv4Addr::new(10, 244, 0, 7),
            host_ip,
            host_port,
            container_port: 80,
            protocol: Protocol::Tcp,
        };
        let mut svc = web();
        svc.service_type = ServiceType::NodePort;
        svc.ports[0].node_port = Some(30080);
        let ports = [host_port(None, 8080), host_port(Some(NODE_IPS[1]), 30080)];
        let state = LbCompiler::new(ctx()).compile(&cluster(vec![svc], vec![]), &ports);
        for ip in NODE_IPS {
            let entry = &state.frontends[&at(ip, 8080, Scope::External)];
            assert_eq!(entry.kind, FrontendKind::HostPort);
            assert_eq!(entry.service.to_string(), "hostPort/c0ffee");
            assert!(entry.external_traffic_local);
            assert_eq!(
                backends_of(&state, at(ip, 8080, Scope::External)),
                ["10.244.0.7:80"]
            );
        }
        let node_port = &state.frontends[&at(NODE_IPS[1], 30080, Scope::External)];
        assert_eq!(node_port.kind, FrontendKind::NodePort);
        assert_eq!(state.conflicts.len(), 1, "{:?}", state.conflicts);
        assert!(state.conflicts[0].contains("hostPort/c0ffee"));
        // ClusterIP, two NodePorts, two hostPorts.
        assert_eq!(state.frontends.len(), 5);
    }

    #[test]
    fn load_balancer_ingress_and_external_ips() {
        let lb_ip = Ipv4Addr::new(203, 0, 113, 7);
        let external_ip = Ipv4Addr::new(198, 51, 100, 9);
        let mut svc = web();
        svc.service_type = ServiceType::LoadBalancer;
        svc.ports[0].node_port = Some(31000);
        svc.load_balancer_ips = vec![lb_ip];
        svc.external_ips = vec![external_ip];
        let state = compile(
            &cluster(
                vec![svc],
                vec![slice(
                    "web-a",
                    8080,
                    vec![ep("10.0.1.1", NODE, State::Ready)],
                )],
            ),
            &ctx(),
        );
        let kinds: Vec<(String, FrontendKind)> = state
            .frontends
            .iter()
            .map(|(f, e)| (f.to_string(), e.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                ("10.96.0.10:80/TCP".into(), FrontendKind::ClusterIp),
                ("192.168.1.10:31000/TCP".into(), FrontendKind::NodePort),
                ("192.168.1.11:31000/TCP".into(), FrontendKind::NodePort),
                ("198.51.100.9:80/TCP".into(), FrontendKind::ExternalIp),
                ("203.0.113.7:80/TCP".into(), FrontendKind::LoadBalancer),
            ]
        );
        assert!(state.frontends.values().all(|e| e.backends.len() == 1));
    }

    #[test]
    fn external_traffic_policy_local_splits_outside_and_inside_clients() {
        let mut svc = web();
        svc.service_type = ServiceType::NodePort;
        svc.ports[0].node_port = Some(30080);
        svc.external_ips = vec![Ipv4Addr::new(198, 51, 100, 9)];
        svc.external_traffic_policy = TrafficPolicy::Local;
        let endpoints = vec![
            ep("10.0.1.1", NODE, State::Ready),
            ep("10.0.2.1", "node-b", State::Ready),
        ];
        let state = compile(
            &cluster(vec![svc], vec![slice("web-a", 8080, endpoints)]),
            &ctx(),
        );

        for (ip, port) in [
            (NODE_IPS[0], 30080),
            (NODE_IPS[1], 30080),
            (Ipv4Addr::new(198, 51, 100, 9), 80),
        ] {
            let outside = &state.frontends[&at(ip, port, Scope::External)];
            assert!(outside.external_traffic_local);
            assert_eq!(
                backends_of(&state, at(ip, port, Scope::External)),
                ["10.0.1.1:8080"]
            );
            let inside = &state.frontends[&at(ip, port, Scope::Internal)];
            assert!(!inside.external_traffic_local);
            assert_eq!(
                backends_of(&state, at(ip, port, Scope::Internal)),
                ["10.0.1.1:8080", "10.0.2.1:8080"]
            );
        }
        // ETP does not touch the ClusterIP.
        assert_eq!(cluster_ip_backends(&state).len(), 2);
        assert_eq!(state.frontends.len(), 7);
    }

    #[test]
    fn local_policies_fall_back_to_local_terminating_endpoints() {
        let mut svc = web();
        svc.internal_traffic_policy = TrafficPolicy::Local;
        // Ready elsewhere, only draining here: the local choice is made
        // among local endpoints (as kube-proxy does).
        let endpoints = vec![
            ep("10.0.1.1", NODE, State::Draining),
            ep("10.0.2.1", "node-b", State::Ready),
        ];
        let state = compile(
            &cluster(vec![svc.clone()], vec![slice("web-a", 8080, endpoints)]),
            &ctx(),
        );
        assert_eq!(cluster_ip_backends(&state), ["10.0.1.1:8080"]);

        let endpoints = vec![
            ep("10.0.1.1", NODE, State::Ready),
            ep("10.0.2.1", "node-b", State::Ready),
        ];
        let state = compile(
            &cluster(vec![svc.clone()], vec![slice("web-a", 8080, endpoints)]),
            &ctx(),
        );
        assert_eq!(cluster_ip_backends(&state), ["10.0.1.1:8080"]);

        // No local endpoint: the frontend stays, with nothing to refuse from.
        let endpoints = vec![ep("10.0.2.1", "node-b", State::Ready)];
        let state = compile(
            &cluster(vec![svc], vec![slice("web-a", 8080, endpoints)]),
            &ctx(),
        );
        assert!(cluster_ip_backends(&state).is_empty());
    }

    #[test]
    fn headless_and_external_name_services_have_no_frontends() {
        let mut headless = web();
        headless.cluster_ips.clear();
        let mut alias = web();
        alias.key = ServiceKey::new("default", "alias");
        alias.service_type = ServiceType::ExternalName;
        alias.external_ips = vec![Ipv4Addr::new(198, 51, 100, 9)];
        let state = compile(
            &cluster(
                vec![headless, alias],
                vec![slice(
                    "web-a",
                    8080,
                    vec![ep("10.0.1.1", NODE, State::Ready)],
                )],
            ),
            &ctx(),
        );
        assert_eq!(state, LbState::default());
    }

    #[test]
    fn a_service_without_endpoints_keeps_its_frontend() {
        let mut svc = web();
        svc.lb_algorithm = Some(LbAlgorithm::Maglev);
        let state = compile(&cluster(vec![svc], vec![]), &ctx());
        let entry = &state.frontends[&at(CLUSTER_IP, 80, Scope::External)];
        assert!(entry.backends.is_empty());
        assert_eq!(
            (entry.algorithm, &entry.maglev),
            (LbAlgorithm::Maglev, &None)
        );
    }

    #[test]
    fn maglev_table_only_for_maglev_services_with_backends() {
        let endpoints = vec![
            ep("10.0.1.1", NODE, State::Ready),
            ep("10.0.1.2", NODE, State::Ready),
        ];
        let slices = vec![slice("web-a", 8080, endpoints)];
        let maglev_of = |annotation, default| {
            let mut svc = web();
            svc.lb_algorithm = annotation;
            let ctx = NodeContext {
                default_algorithm: default,
                ..ctx()
            };
            let state = compile(&cluster(vec![svc], slices.clone()), &ctx);
            let entry = state.frontends.into_values().next().unwrap();
            (entry.algorithm, entry.maglev.clone())
        };
        let (algorithm, table) = maglev_of(Some(LbAlgorithm::Maglev), LbAlgorithm::Random);
        let table = table.unwrap();
        assert_eq!((algorithm, table.len()), (LbAlgorithm::Maglev, 251));
        assert!(table.iter().all(|&i| i < 2) && table.contains(&0) && table.contains(&1));
        assert!(maglev_of(None, LbAlgorithm::Maglev).1.is_some());
        assert_eq!(
            maglev_of(None, LbAlgorithm::Random),
            (LbAlgorithm::Random, None)
        );
        assert_eq!(
            maglev_of(Some(LbAlgorithm::Random), LbAlgorithm::Maglev),
            (LbAlgorithm::Random, None)
        );
    }

    #[test]
    fn the_namespace_annotation_is_the_default_of_its_services() {
        let slices = vec![slice(
            "web-a",
            8080,
            vec![ep("10.0.1.1", NODE, State::Ready)],
        )];
        let mut c = cluster(vec![web()], slices);
        let mut compiler = LbCompiler::new(ctx());
        let algorithm = |state: &LbState| state.frontends.values().next().unwrap().algorithm;
        assert_eq!(algorithm(&compiler.compile(&c, &[])), LbAlgorithm::Random);
        let namespace = |lb_algorithm| {
            Arc::new(crate::model::Namespace {
                name: "default".into(),
                lb_algorithm,
                labels: Default::default(),
            })
        };
        // A kept compiler notices the namespace's change alone.
        c.namespaces
            .insert("default".into(), namespace(Some(LbAlgorithm::Maglev)));
        assert_eq!(algorithm(&compiler.compile(&c, &[])), LbAlgorithm::Maglev);
        // The Service's own annotation wins.
        let mut svc = web();
        svc.lb_algorithm = Some(LbAlgorithm::Random);
        c.services.insert(svc.key.clone(), Arc::new(svc));
        assert_eq!(algorithm(&compiler.compile(&c, &[])), LbAlgorithm::Random);
    }

    #[test]
    fn a_frontend_claimed_twice_stays_with_the_first_service() {
        let mut other = web();
        other.key = ServiceKey::new("default", "zz-other");
        let state = compile(&cluster(vec![web(), other], vec![]), &ctx());
        assert_eq!(state.frontends.len(), 1);
        assert_eq!(state.frontends.values().next().unwrap().service.name, "web");
        assert_eq!(state.conflicts.len(), 1, "{:?}", state.conflicts);
        assert!(state.conflicts[0].contains("default/zz-other"));
    }

    #[test]
    fn a_kept_compiler_recompiles_only_the_changed_service() {
        let mut api = web();
        api.key = ServiceKey::new("default", "api");
        api.cluster_ips = vec![Ipv4Addr::new(10, 96, 0, 11)];
        let mut api_slice = slice("api-a", 9090, vec![ep("10.0.3.1", NODE, State::Ready)]);
        api_slice.service = api.key.clone();
        let web_slice = slice("web-a", 8080, vec![ep("10.0.1.1", NODE, State::Ready)]);
        let mut c = cluster(vec![web(), api], vec![web_slice, api_slice]);
        let mut compiler = LbCompiler::new(ctx());
        let first = compiler.compile(&c, &[]);
        assert_eq!(first.frontends.len(), 2);

        // A new web slice object (one more endpoint); api's objects stay.
        let web_slice = slice(
            "web-a",
            8080,
            vec![
                ep("10.0.1.1", NODE, State::Ready),
                ep("10.0.1.2", NODE, State::Ready),
            ],
        );
        c.slices.insert(web_slice.key.clone(), Arc::new(web_slice));
        let second = compiler.compile(&c, &[]);
        let web_at = at(CLUSTER_IP, 80, Scope::External);
        let api_at = at(Ipv4Addr::new(10, 96, 0, 11), 80, Scope::External);
        assert!(Arc::ptr_eq(
            &first.frontends[&api_at],
            &second.frontends[&api_at]
        ));
        assert!(!Arc::ptr_eq(
            &first.frontends[&web_at],
            &second.frontends[&web_at]
        ));
        assert_eq!(
            cluster_ip_backends(&second),
            ["10.0.1.1:8080", "10.0.1.2:8080"]
        );
        // Same result as compiling from scratch.
        assert_eq!(second, compile(&c, &ctx()));

        // A removed Service leaves the memo and the state.
        c.services.remove(&ServiceKey::new("default", "api"));
        let third = compiler.compile(&c, &[]);
        assert_eq!(third.frontends.len(), 1);
        assert!(compiler.memo.len() == 1);
    }

    /// An endpoint with topology hints.
    fn hinted(ip: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Endpoint {
        Endpoint {
            zone_hints: zones.iter().map(|z| z.to_string()).collect(),
            node_hints: nodes.iter().map(|n| n.to_string()).collect(),
            ..ep(ip, node, State::Ready)
        }
    }

    /// `web` with `endpoints`, compiled on NODE in `zone`.
    fn in_zone(zone: Option<&str>, endpoints: Vec<Endpoint>) -> LbState {
        let mut c = cluster(vec![web()], vec![slice("web-a", 8080, endpoints)]);
        let node = crate::model::Node {
            name: NODE.into(),
            internal_ip: None,
            pod_cidrs: vec![],
            zone: zone.map(str::to_owned),
            to_be_deleted: false,
        };
        c.nodes.insert(NODE.into(), Arc::new(node));
        compile(&c, &ctx())
    }

    #[test]
    fn zone_hints_keep_cluster_traffic_in_the_node_zone() {
        let hinted_endpoints = || {
            vec![
                hinted("10.0.1.1", NODE, &["zone-a"], &[]),
                hinted("10.0.2.1", "node-b", &["zone-a"], &[]),
                hinted("10.0.3.1", "node-c", &["zone-b"], &[]),
            ]
        };
        let state = in_zone(Some("zone-a"), hinted_endpoints());
        assert_eq!(
            cluster_ip_backends(&state),
            ["10.0.1.1:8080", "10.0.2.1:8080"]
        );
        let state = in_zone(Some("zone-b"), hinted_endpoints());
        assert_eq!(cluster_ip_backends(&state), ["10.0.3.1:8080"]);
        // No endpoint for this zone, or a node without a zone label, or
        // one ready endpoint without hints: the hints are ignored.
        let every = ["10.0.1.1:8080", "10.0.2.1:8080", "10.0.3.1:8080"];
        assert_eq!(
            cluster_ip_backends(&in_zone(Some("zone-c"), hinted_endpoints())),
            every
        );
        assert_eq!(
            cluster_ip_backends(&in_zone(None, hinted_endpoints())),
            every
        );
        let mut partly = hinted_endpoints();
        partly[2].zone_hints.clear();
        assert_eq!(cluster_ip_backends(&in_zone(Some("zone-a"), partly)), every);
        // A not-ready endpoint without hints does not count.
        let mut with_unready = hinted_endpoints();
        with_unready.push(ep("10.0.4.1", "node-d", State::NotReady));
        assert_eq!(
            cluster_ip_backends(&in_zone(Some("zone-b"), with_unready)),
            ["10.0.3.1:8080"]
        );
    }

    #[test]
    fn node_hints_win_over_zone_hints() {
        let state = in_zone(
            Some("zone-a"),
            vec![
                hinted("10.0.1.1", NODE, &["zone-a"], &[NODE]),
                hinted("10.0.2.1", "node-b", &["zone-a"], &["node-b"]),
            ],
        );
        assert_eq!(cluster_ip_backends(&state), ["10.0.1.1:8080"]);
        // Not every endpoint has node hints: zones decide.
        let state = in_zone(
            Some("zone-a"),
            vec![
                hinted("10.0.1.1", NODE, &["zone-a"], &[NODE]),
                hinted("10.0.2.1", "node-b", &["zone-a"], &[]),
            ],
        );
        assert_eq!(
            cluster_ip_backends(&state),
            ["10.0.1.1:8080", "10.0.2.1:8080"]
        );
    }

    #[test]
    fn a_zone_change_of_the_node_recompiles() {
        let endpoints = vec![
            hinted("10.0.1.1", NODE, &["zone-a"], &[]),
            hinted("10.0.3.1", "node-c", &["zone-b"], &[]),
        ];
        let mut c = cluster(vec![web()], vec![slice("web-a", 8080, endpoints)]);
        let node = |zone: &str| {
            Arc::new(crate::model::Node {
                name: NODE.into(),
                internal_ip: None,
                pod_cidrs: vec![],
                zone: Some(zone.into()),
                to_be_deleted: false,
            })
        };
        let mut compiler = LbCompiler::new(ctx());
        c.nodes.insert(NODE.into(), node("zone-a"));
        assert_eq!(
            cluster_ip_backends(&compiler.compile(&c, &[])),
            ["10.0.1.1:8080"]
        );
        c.nodes.insert(NODE.into(), node("zone-b"));
        assert_eq!(
            cluster_ip_backends(&compiler.compile(&c, &[])),
            ["10.0.3.1:8080"]
        );
    }

    #[test]
    fn local_policies_without_a_local_endpoint_drop_instead_of_refusing() {
        let mut svc = web();
        svc.service_type = ServiceType::NodePort;
        svc.ports[0].node_port = Some(30080);
        svc.internal_traffic_policy = TrafficPolicy::Local;
        svc.external_traffic_policy = TrafficPolicy::Local;
        // Endpoints elsewhere only: kube-proxy DROPs (not REJECTs).
        let elsewhere = vec![ep("10.0.2.1", "node-b", State::Ready)];
        let state = compile(
            &cluster(vec![svc.clone()], vec![slice("web-a", 8080, elsewhere)]),
            &ctx(),
        );
        let cluster_ip = &state.frontends[&at(CLUSTER_IP, 80, Scope::External)];
        assert!(cluster_ip.backends.is_empty() && cluster_ip.no_local_backend);
        let outside = &state.frontends[&at(NODE_IPS[0], 30080, Scope::External)];
        assert!(outside.backends.is_empty() && outside.no_local_backend);
        // In-cluster clients of the NodePort may use every endpoint.
        let inside = &state.frontends[&at(NODE_IPS[0], 30080, Scope::Internal)];
        assert!(!inside.no_local_backend && inside.backends.len() == 1);
        // No endpoint anywhere: refused, as for any Service without one.
        let state = compile(&cluster(vec![svc], vec![]), &ctx());
        assert!(
            state
                .frontends
                .values()
                .all(|e| e.backends.is_empty() && !e.no_local_backend)
        );
    }

    #[test]
    fn source_ranges_guard_load_balancer_addresses_only() {
        let lb_ip = Ipv4Addr::new(203, 0, 113, 7);
        let mut svc = web();
        svc.service_type = ServiceType::LoadBalancer;
        svc.ports[0].node_port = Some(30080);
        svc.load_balancer_ips = vec![lb_ip];
        svc.load_balancer_source_ranges = Some(vec!["10.0.0.0/8".parse().unwrap()]);
        let endpoints = vec![ep("10.0.1.1", NODE, State::Ready)];
        let c = cluster(
            vec![svc.clone()],
            vec![slice("web-a", 8080, endpoints.clone())],
        );
        let state = compile(&c, &ctx());
        let ranges = |ip: Ipv4Addr, port: u16| {
            state.frontends[&at(ip, port, Scope::External)]
                .source_ranges
                .clone()
        };
        assert_eq!(ranges(lb_ip, 80), Some(vec!["10.0.0.0/8".parse().unwrap()]));
        // NodePort and ClusterIP are not guarded (kube-proxy's choice).
        assert_eq!(ranges(NODE_IPS[0], 30080), None);
        assert_eq!(ranges(CLUSTER_IP, 80), None);
        // A range holding the node lets the VIP itself in (hairpin from the node).
        svc.load_balancer_source_ranges = Some(vec!["192.168.1.0/24".parse().unwrap()]);
        let c = cluster(vec![svc], vec![slice("web-a", 8080, endpoints)]);
        let state = compile(&c, &ctx());
        assert_eq!(
            state.frontends[&at(lb_ip, 80, Scope::External)].source_ranges,
            Some(vec![
                "192.168.1.0/24".parse().unwrap(),
                "203.0.113.7/32".parse().unwrap()
            ])
        );
    }
}
