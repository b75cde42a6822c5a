//! Unit tests of the parent module.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::model::{EndpointPort, RareEndpointFields, SliceKey, TopologyHints};
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
        service_cidr: None,
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
        lb_algorithm: None,
        created: None,
        rare: None,
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
        node_name: Some(node.into()),
        ..Endpoint::new(ip.parse().unwrap(), ready, serving, terminating)
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
        (entry.kind, &*entry.port_name),
        (FrontendKind::ClusterIp, "http")
    );
    assert!(
        !entry.external_traffic_local && entry.table.is_none() && entry.affinity_timeout.is_none()
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
    assert_eq!(state.conflicts[0].service.to_string(), "hostPort/c0ffee");
    assert_eq!(state.conflicts[0].kind, FrontendKind::HostPort);
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
    svc.rare_mut().load_balancer_ips = vec![lb_ip];
    svc.rare_mut().external_ips = vec![external_ip];
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
    svc.rare_mut().external_ips = vec![Ipv4Addr::new(198, 51, 100, 9)];
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
    alias.rare_mut().external_ips = vec![Ipv4Addr::new(198, 51, 100, 9)];
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
        (entry.algorithm, &entry.table),
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
            service_cidr: None,
            ..ctx()
        };
        let state = compile(&cluster(vec![svc], slices.clone()), &ctx);
        let entry = state.frontends.values().next().cloned().unwrap();
        (entry.algorithm, entry.table.clone())
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
    assert_eq!(
        &*state.frontends.values().next().unwrap().service.name,
        "web"
    );
    assert_eq!(state.conflicts.len(), 1, "{:?}", state.conflicts);
    assert!(state.conflicts[0].to_string().contains("default/zz-other"));
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
    assert!(compiler.compiled_services() == 1);
}

/// An endpoint with topology hints.
fn hinted(ip: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Endpoint {
    Endpoint {
        rare: Some(Box::new(RareEndpointFields {
            more_addresses: vec![],
            hints: TopologyHints {
                zones: zones.iter().map(|z| z.to_string()).collect(),
                nodes: nodes.iter().map(|n| n.to_string()).collect(),
            },
        })),
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
    partly[2].rare.as_mut().unwrap().hints.zones.clear();
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
    svc.rare_mut().load_balancer_ips = vec![lb_ip];
    svc.rare_mut().load_balancer_source_ranges = Some(vec!["10.0.0.0/8".parse().unwrap()]);
    let endpoints = vec![ep("10.0.1.1", NODE, State::Ready)];
    let c = cluster(
        vec![svc.clone()],
        vec![slice("web-a", 8080, endpoints.clone())],
    );
    let state = compile(&c, &ctx());
    let ranges = |ip: Ipv4Addr, port: u16| {
        state.frontends[&at(ip, port, Scope::External)]
            .source_ranges
            .as_deref()
            .map(<[_]>::to_vec)
    };
    assert_eq!(ranges(lb_ip, 80), Some(vec!["10.0.0.0/8".parse().unwrap()]));
    // NodePort and ClusterIP are not guarded (kube-proxy's choice).
    assert_eq!(ranges(NODE_IPS[0], 30080), None);
    assert_eq!(ranges(CLUSTER_IP, 80), None);
    // A range holding the node lets the VIP itself in (hairpin from the node).
    svc.rare_mut().load_balancer_source_ranges = Some(vec!["192.168.1.0/24".parse().unwrap()]);
    let c = cluster(vec![svc], vec![slice("web-a", 8080, endpoints)]);
    let state = compile(&c, &ctx());
    assert_eq!(
        state.frontends[&at(lb_ip, 80, Scope::External)]
            .source_ranges
            .as_deref(),
        Some(
            &[
                "192.168.1.0/24".parse().unwrap(),
                "203.0.113.7/32".parse().unwrap()
            ][..]
        )
    );
}

#[test]
fn ipvs_schedulers_weigh_endpoints_and_build_their_tables() {
    let named = |ip: &str, pod: &str| Endpoint {
        pod_name: Some(pod.into()),
        ..ep(ip, NODE, State::Ready)
    };
    let endpoints = vec![
        named("10.0.1.1", "web-0"),
        named("10.0.1.2", "web-1"),
        named("10.0.1.3", "web-2"),
    ];
    let slices = vec![slice("web-a", 8080, endpoints)];
    let compiled = |algorithm| {
        let mut svc = web();
        svc.lb_algorithm = Some(algorithm);
        // By pod name, by address (which wins), and a quiesced endpoint.
        svc.rare_mut().lb_weights.by_pod.insert("web-0".into(), 4);
        svc.rare_mut().lb_weights.by_pod.insert("web-1".into(), 9);
        svc.rare_mut()
            .lb_weights
            .by_address
            .insert("10.0.1.2".parse().unwrap(), 2);
        svc.rare_mut().lb_weights.by_pod.insert("web-2".into(), 0);
        let state = compile(&cluster(vec![svc], slices.clone()), &ctx());
        Arc::unwrap_or_clone(state.frontends.values().next().cloned().unwrap())
    };
    let ips = |entry: &FrontendEntry| -> Vec<String> {
        entry.backends.iter().map(|b| b.ip.to_string()).collect()
    };
    for algorithm in LbAlgorithm::ALL {
        let entry = compiled(algorithm);
        if algorithm.uses_weights() {
            // Weight 0 takes no new connections: not a backend at all.
            assert_eq!(ips(&entry), ["10.0.1.1", "10.0.1.2"], "{algorithm}");
            assert_eq!(entry.weights.to_vec(2), [4, 2], "{algorithm}");
        } else {
            assert_eq!(entry.backends.len(), 3, "{algorithm}");
            assert_eq!(entry.weights.to_vec(3), [1, 1, 1], "{algorithm}");
        }
        let table = entry.table.as_deref().map(<[u32]>::to_vec);
        match algorithm {
            LbAlgorithm::Maglev => assert_eq!(table.map(|t| t.len()), Some(251)),
            LbAlgorithm::Wrr => assert_eq!(table, Some(vec![0, 0, 1])),
            LbAlgorithm::Sh => {
                let table = table.unwrap();
                assert_eq!((table.len(), &table[..6]), (256, &[0, 0, 0, 0, 1, 1][..]));
            }
            LbAlgorithm::Dh => assert_eq!(&table.unwrap()[..4], [0, 1, 0, 1]),
            _ => assert_eq!(table, None, "{algorithm}"),
        }
    }
    // Every endpoint weighing 0: nothing takes connections (refused).
    let mut svc = web();
    svc.lb_algorithm = Some(LbAlgorithm::Wlc);
    svc.rare_mut().lb_weights.default = 0;
    let state = compile(&cluster(vec![svc], slices.clone()), &ctx());
    let entry = state.frontends.values().next().cloned().unwrap();
    assert!(entry.backends.is_empty() && !entry.no_local_backend);
}

/// A Service `name` (ClusterIP 10.96.0.`n`:80) created at `created`.
fn claimant(name: &str, n: u8, created: Option<i64>) -> Service {
    let mut svc = web();
    svc.key = ServiceKey::new("default", name);
    svc.cluster_ips = vec![Ipv4Addr::new(10, 96, 0, n)];
    svc.ports[0].target_port = TargetPort::Number(8080);
    svc.created = created;
    svc
}

fn owner_of(state: &LbState, frontend: Frontend) -> String {
    state.frontends[&frontend].service.name.to_string()
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_oldest_service_in_any_order() {
    const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    const INGRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
    // (what the two claim, how the claim is made on a Service)
    type Claim = fn(&mut Service);
    let node_port: Claim = |s| {
        s.service_type = ServiceType::NodePort;
        s.ports[0].node_port = Some(30080);
    };
    let external_ip: Claim = |s| s.rare_mut().external_ips = vec![EXTERNAL];
    let load_balancer: Claim = |s| {
        s.service_type = ServiceType::LoadBalancer;
        s.rare_mut().load_balancer_ips = vec![INGRESS];
    };
    let cluster_ip: Claim = |s| s.cluster_ips = vec![CLUSTER_IP];
    let claims: [(&str, Claim, Frontend, FrontendKind); 4] = [
        (
            "NodePort",
            node_port,
            at(NODE_IPS[0], 30080, Scope::External),
            FrontendKind::NodePort,
        ),
        (
            "externalIP",
            external_ip,
            at(EXTERNAL, 80, Scope::External),
            FrontendKind::ExternalIp,
        ),
        (
            "LoadBalancer",
            load_balancer,
            at(INGRESS, 80, Scope::External),
            FrontendKind::LoadBalancer,
        ),
        (
            "ClusterIP",
            cluster_ip,
            at(CLUSTER_IP, 80, Scope::External),
            FrontendKind::ClusterIp,
        ),
    ];
    // (first's name and creation, second's, who keeps the frontend)
    type Claimant = (&'static str, Option<i64>);
    let orders: [(Claimant, Claimant, &str); 5] = [
        (("zz-old", Some(100)), ("aa-new", Some(200)), "zz-old"),
        (("aa-old", Some(100)), ("zz-new", Some(200)), "aa-old"),
        (("bb", Some(100)), ("aa", Some(100)), "aa"), // same second: by name
        (("zz-dated", Some(500)), ("aa-undated", None), "zz-dated"),
        (("bb-undated", None), ("aa-undated", None), "aa-undated"),
    ];
    for (what, claim, frontend, kind) in claims {
        for ((a, a_created), (b, b_created), winner) in orders {
            let mut first = claimant(a, 1, a_created);
            let mut second = claimant(b, 2, b_created);
            claim(&mut first);
            claim(&mut second);
            let loser = if winner == a { b } else { a };
            // Whichever arrives first, and across recompilations.
            let mut compiler = LbCompiler::new(ctx());
            let one = compiler.compile(&cluster(vec![first.clone()], vec![]), &[]);
            let both = compiler.compile(&cluster(vec![first.clone(), second.clone()], vec![]), &[]);
            let again =
                compiler.compile(&cluster(vec![second.clone(), first.clone()], vec![]), &[]);
            let fresh = LbCompiler::new(ctx()).compile(&cluster(vec![second.clone()], vec![]), &[]);
            let fresh_both =
                LbCompiler::new(ctx()).compile(&cluster(vec![second, first.clone()], vec![]), &[]);
            assert_eq!(owner_of(&one, frontend), a, "{what}");
            assert_eq!(&*fresh.frontends[&frontend].service.name, b, "{what}");
            for state in [&both, &again, &fresh_both] {
                assert_eq!(owner_of(state, frontend), winner, "{what}: {a} vs {b}");
                assert_eq!(
                    state.conflicts.len(),
                    if what == "NodePort" { 2 } else { 1 },
                    "{what}: {:?}",
                    state.conflicts
                );
                let conflict = &state.conflicts[0];
                assert_eq!(
                    (&*conflict.service.name, &*conflict.owner.name),
                    (loser, winner)
                );
                assert_eq!(conflict.kind, kind);
                // The loser keeps every frontend nobody disputes.
                let own_cluster_ip = if what == "ClusterIP" {
                    None
                } else {
                    Some(at(
                        Ipv4Addr::new(10, 96, 0, if loser == a { 1 } else { 2 }),
                        80,
                        Scope::External,
                    ))
                };
                if let Some(own) = own_cluster_ip {
                    assert_eq!(owner_of(state, own), loser, "{what}");
                }
            }
            assert_eq!(both, again, "{what}: the winner must not flap");
            assert_eq!(both, fresh_both, "{what}");
        }
    }
}

#[test]
fn claims_that_differ_in_port_protocol_or_address_do_not_conflict() {
    let mut a = claimant("a", 1, Some(1));
    let mut b = claimant("b", 2, Some(2));
    for s in [&mut a, &mut b] {
        s.service_type = ServiceType::NodePort;
        s.rare_mut().external_ips = vec![Ipv4Addr::new(198, 51, 100, 7)];
    }
    a.ports[0].node_port = Some(30080);
    b.ports[0].node_port = Some(30080);
    b.ports[0].protocol = Protocol::Udp; // 30080/UDP is not 30080/TCP
    b.ports[0].port = 80;
    let mut c = claimant("c", 3, Some(3));
    c.rare_mut().external_ips = vec![Ipv4Addr::new(198, 51, 100, 7)];
    c.ports[0].port = 81; // another port on the same external IP
    let state = compile(&cluster(vec![a, b, c], vec![]), &ctx());
    assert!(state.conflicts.is_empty(), "{:?}", state.conflicts);
}

#[test]
fn cluster_ips_outside_the_service_cidr_are_served_and_reported() {
    let mut ctx = ctx();
    ctx.service_cidr = Some("10.96.0.0/12".parse().unwrap());
    let inside = claimant("inside", 1, None);
    let mut outside = claimant("outside", 1, None);
    outside.cluster_ips = vec![Ipv4Addr::new(172, 20, 0, 10)];
    let state = compile(&cluster(vec![inside, outside], vec![]), &ctx);
    assert_eq!(
        state.outside_service_cidr,
        [(
            ServiceKey::new("default", "outside"),
            Ipv4Addr::new(172, 20, 0, 10)
        )]
    );
    assert_eq!(
        owner_of(
            &state,
            at(Ipv4Addr::new(172, 20, 0, 10), 80, Scope::External)
        ),
        "outside"
    );
    // Without a configured CIDR nothing is checked.
    let state = compile(&cluster(vec![claimant("x", 1, None)], vec![]), &self::ctx());
    assert!(state.outside_service_cidr.is_empty());
}

#[test]
fn slices_and_services_arriving_in_any_order_give_the_same_state() {
    let svc = || {
        let mut s = web();
        s.ports[0].target_port = TargetPort::Number(8080);
        s
    };
    let slice_a = || slice("web-a", 8080, vec![ep("10.244.1.5", NODE, State::Ready)]);
    let slice_b = || {
        slice(
            "web-b",
            8080,
            vec![ep("10.244.2.5", "node-b", State::Ready)],
        )
    };
    let mut compiler = LbCompiler::new(ctx());
    // A slice before its Service: nothing to serve, nothing broken.
    let early = compiler.compile(&cluster(vec![], vec![slice_a()]), &[]);
    assert!(early.frontends.is_empty() && early.conflicts.is_empty());
    let whole = compiler.compile(&cluster(vec![svc()], vec![slice_a(), slice_b()]), &[]);
    assert_eq!(
        cluster_ip_backends(&whole),
        ["10.244.1.5:8080", "10.244.2.5:8080"]
    );
    // The same objects built in the other order, by a fresh compiler.
    let mut c = Cluster::default();
    for s in [slice_b(), slice_a()] {
        c.slices.insert(s.key.clone(), Arc::new(s));
    }
    c.services.insert(svc().key, Arc::new(svc()));
    assert_eq!(LbCompiler::new(ctx()).compile(&c, &[]), whole);
    // The Service deleted before its slices: its frontends go at once.
    let gone = compiler.compile(&cluster(vec![], vec![slice_a(), slice_b()]), &[]);
    assert!(gone.frontends.is_empty());
    // Back, with a slice deleted meanwhile.
    let back = compiler.compile(&cluster(vec![svc()], vec![slice_b()]), &[]);
    assert_eq!(cluster_ip_backends(&back), ["10.244.2.5:8080"]);
    // The slices deleted before the Service: it refuses (no backends).
    let empty = compiler.compile(&cluster(vec![svc()], vec![]), &[]);
    assert!(cluster_ip_backends(&empty).is_empty());
    // A slice naming another Service serves nothing of this one.
    let mut stray = slice_a();
    stray.service = ServiceKey::new("default", "not-yet");
    let state = compiler.compile(&cluster(vec![svc()], vec![stray]), &[]);
    assert!(cluster_ip_backends(&state).is_empty());
}

/// A kept compiler fed a long run of random changes — Services added,
/// changed (address, age, algorithm) and removed, slices moved between
/// Services, namespace defaults, this node's zone, hostPorts — gives at
/// every step exactly what a fresh compiler gives for that cluster:
/// frontends, conflicts (several Services share addresses on purpose) and
/// ClusterIPs outside the service CIDR.
#[test]
fn a_kept_compiler_equals_a_fresh_one_through_random_changes() {
    let mut ctx = ctx();
    ctx.service_cidr = Some("10.96.0.0/28".parse().unwrap());
    // xorshift: reproducible without a dependency.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut c = Cluster::default();
    let mut host_ports: Vec<HostPort> = Vec::new();
    let mut kept = LbCompiler::new(ctx.clone());
    for step in 0..2000 {
        match next(7) {
            0 | 1 => {
                let mut svc = claimant(&format!("s{}", next(12)), 1 + next(20) as u8, None);
                svc.created = (next(3) > 0).then(|| next(4) as i64);
                svc.lb_algorithm = (next(4) == 0).then_some(LbAlgorithm::Maglev);
                if next(3) == 0 {
                    svc.service_type = ServiceType::NodePort;
                    svc.ports[0].node_port = Some(30_000 + next(3) as u16);
                }
                c.services.insert(svc.key.clone(), Arc::new(svc));
            }
            2 => {
                let key = ServiceKey::new("default", format!("s{}", next(12)));
                c.services.remove(&key);
            }
            3 => {
                let name = format!("sl{}", next(10));
                let endpoints = (0..next(4))
                    .map(|i| {
                        let hints = [["zone-a"], ["zone-b"]][next(2) as usize];
                        hinted(&format!("10.0.{}.{}", next(3), i + 1), NODE, &hints, &[])
                    })
                    .collect();
                let mut s = slice(&name, 8080, endpoints);
                s.service = ServiceKey::new("default", format!("s{}", next(12)));
                c.slices.insert(s.key.clone(), Arc::new(s));
            }
            4 => {
                let key: SliceKey = ("default".into(), format!("sl{}", next(10)).into());
                c.slices.remove(&key);
            }
            5 => {
                let algorithm =
                    [None, Some(LbAlgorithm::Maglev), Some(LbAlgorithm::Random)][next(3) as usize];
                let ns = crate::model::Namespace {
                    name: "default".into(),
                    lb_algorithm: algorithm,
                    labels: Default::default(),
                };
                c.namespaces.insert("default".into(), Arc::new(ns));
            }
            _ => {
                if next(2) == 0 {
                    let node = crate::model::Node {
                        name: NODE.into(),
                        internal_ip: None,
                        pod_cidrs: vec![],
                        zone: ["zone-a", "zone-b"]
                            .get(next(3) as usize)
                            .map(|z| z.to_string()),
                        to_be_deleted: false,
                    };
                    c.nodes.insert(NODE.into(), Arc::new(node));
                } else {
                    host_ports = (0..next(3))
                        .map(|i| HostPort {
                            pod: format!("pod{i}"),
                            pod_ip: Ipv4Addr::new(10, 0, 9, i as u8 + 1),
                            host_ip: (next(2) == 0).then_some(NODE_IPS[0]),
                            host_port: 30_000 + next(3) as u16,
                            container_port: 80,
                            protocol: Protocol::Tcp,
                        })
                        .collect();
                }
            }
        }
        let fresh = LbCompiler::new(ctx.clone()).compile(&c, &host_ports);
        assert_eq!(kept.compile(&c, &host_ports), fresh, "step {step}");
    }
}
