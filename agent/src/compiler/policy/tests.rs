// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::model::{
    LabelSelector, NAMESPACE_NAME_LABEL, Namespace, Operator, PolicyPort, Protocol, Requirement,
};
use std::sync::Arc;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        expressions: vec![],
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn pod(ns: &str, name: &str, addr: &str, pairs: &[(&str, &str)]) -> Pod {
    Pod {
        key: (ns.into(), name.into()),
        node: Some("n1".into()),
        ips: vec![ip(addr)],
        host_network: false,
        finished: false,
        labels: labels(pairs),
        named_ports: vec![],
    }
}

fn with_port(mut p: Pod, name: &str, protocol: Protocol, port: u16) -> Pod {
    p.named_ports.push(NamedPort {
        name: name.into(),
        protocol,
        port,
    });
    p.named_ports.sort();
    p
}

fn namespace(name: &str, pairs: &[(&str, &str)]) -> Namespace {
    let mut labels = labels(pairs);
    labels.insert(NAMESPACE_NAME_LABEL.into(), name.into());
    Namespace {
        name: name.into(),
        lb_algorithm: None,
        labels,
    }
}

fn policy(
    ns: &str,
    name: &str,
    selector: LabelSelector,
    ingress: Option<Vec<PolicyRule>>,
    egress: Option<Vec<PolicyRule>>,
) -> NetworkPolicy {
    NetworkPolicy {
        key: (ns.into(), name.into()),
        pod_selector: selector,
        ingress,
        egress,
        error: None,
    }
}

fn rule(peers: Vec<Peer>, ports: Vec<PolicyPort>) -> PolicyRule {
    PolicyRule {
        peers: Peers::Some(peers),
        ports: Ports::Some(ports),
    }
}

/// `from: []` / `to: []`: every peer.
fn any_peer(ports: Vec<PolicyPort>) -> PolicyRule {
    PolicyRule {
        peers: Peers::All,
        ports: Ports::Some(ports),
    }
}

fn pods_peer(pairs: &[(&str, &str)]) -> Peer {
    Peer::Pods {
        namespaces: NamespaceScope::Own,
        pods: sel(pairs),
    }
}

fn ns_peer(ns: &[(&str, &str)], pods: &[(&str, &str)]) -> Peer {
    Peer::Pods {
        namespaces: NamespaceScope::Selected(sel(ns)),
        pods: sel(pods),
    }
}

fn port(protocol: Protocol, number: u16) -> PolicyPort {
    PolicyPort {
        protocol,
        port: Some(PortRef::Number(number)),
        end_port: None,
    }
}

fn named(protocol: Protocol, name: &str) -> PolicyPort {
    PolicyPort {
        protocol,
        port: Some(PortRef::Name(name.into())),
        end_port: None,
    }
}

fn cluster(pods: Vec<Pod>, namespaces: Vec<Namespace>, policies: Vec<NetworkPolicy>) -> Cluster {
    let mut c = Cluster::default();
    for p in pods {
        c.pods.insert(p.key.clone(), Arc::new(p));
    }
    for n in namespaces {
        c.namespaces.insert(n.name.clone(), Arc::new(n));
    }
    for p in policies {
        c.network_policies.insert(p.key.clone(), Arc::new(p));
    }
    c
}

fn local(addr: &str, ns: &str, name: &str) -> LocalEndpoint {
    LocalEndpoint {
        ip: ip(addr),
        pod: Some((ns.into(), name.into())),
    }
}

fn compile(c: &Cluster, locals: &[LocalEndpoint]) -> PolicyState {
    PolicyCompiler::new().compile(c, locals)
}

fn allowed(state: &PolicyState, src: &str, dst: &str, protocol: u8, port: u16) -> bool {
    explain(state, ip(src), ip(dst), protocol, port).allowed()
}

/// backend 10.0.0.1 (local), frontend .2, database .3, other .4, all
/// in namespace "a".
fn example_cluster(policies: Vec<NetworkPolicy>) -> Cluster {
    cluster(
        vec![
            pod("a", "backend", "10.0.0.1", &[("app", "backend")]),
            pod("a", "frontend", "10.0.0.2", &[("app", "frontend")]),
            pod("a", "database", "10.0.0.3", &[("app", "database")]),
            pod("a", "other", "10.0.0.4", &[("app", "other")]),
        ],
        vec![namespace("a", &[])],
        policies,
    )
}

#[test]
fn the_example_policy_explains_as_documented() {
    let p = policy(
        "a",
        "backend",
        sel(&[("app", "backend")]),
        Some(vec![rule(
            vec![pods_peer(&[("app", "frontend")])],
            vec![port(Protocol::Tcp, 8080)],
        )]),
        Some(vec![
            rule(
                vec![pods_peer(&[("app", "database")])],
                vec![port(Protocol::Tcp, 5432)],
            ),
            any_peer(vec![port(Protocol::Tcp, 53), port(Protocol::Udp, 53)]),
        ]),
    );
    let c = example_cluster(vec![p]);
    let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
    assert_eq!(state.policies[&1].selects, vec![ip("10.0.0.1")]);
    let e = explain(&state, ip("10.0.0.2"), ip("10.0.0.1"), TCP, 8080);
    assert_eq!(e.egress, None); // the frontend is not on this node
    assert_eq!(
        e.ingress,
        Some(Verdict::Allowed {
            by: RuleRef { policy: 1, rule: 0 },
            policy: "a/backend".into()
        })
    );
    assert!(e.allowed());
    assert_eq!(
        e.to_string(),
        "egress: not a pod of this node\ningress: allowed by a/backend rule 0"
    );
    assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 8081));
    assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", UDP, 8080));
    let denied = explain(&state, ip("10.0.0.4"), ip("10.0.0.1"), TCP, 8080);
    assert_eq!(
        denied.ingress,
        Some(Verdict::Denied {
            isolating: vec!["a/backend".into()]
        })
    );
    assert!(!denied.allowed());
    assert!(allowed(&state, "10.0.0.1", "10.0.0.3", TCP, 5432));
    assert!(!allowed(&state, "10.0.0.1", "10.0.0.3", TCP, 5433));
    assert!(!allowed(&state, "10.0.0.1", "10.0.0.4", TCP, 5432));
    for dst in ["10.0.0.4", "8.8.8.8", "10.0.0.3"] {
        assert!(allowed(&state, "10.0.0.1", dst, TCP, 53), "{dst}");
        assert!(allowed(&state, "10.0.0.1", dst, UDP, 53), "{dst}");
    }
    assert!(!allowed(&state, "10.0.0.1", "10.0.0.4", TCP, 80));
    assert!(!allowed(&state, "10.0.0.1", "8.8.8.8", ICMP, 0));
    // A pod reaching itself (through a Service) is never denied.
    let own = explain(&state, ip("10.0.0.1"), ip("10.0.0.1"), TCP, 80);
    assert_eq!(own.egress, Some(Verdict::AllowedSelf));
    assert_eq!(own.ingress, Some(Verdict::AllowedSelf));
}

#[test]
fn a_policy_isolates_only_the_directions_it_names() {
    let p = policy("a", "deny-in", sel(&[]), Some(vec![]), None);
    let c = example_cluster(vec![p]);
    let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
    let ep = &state.endpoints[&ip("10.0.0.1")];
    assert!(ep.ingress.isolated);
    assert_eq!(ep.ingress.policies, vec![1]);
    assert!(!ep.egress.isolated);
    let e = explain(&state, ip("10.0.0.1"), ip("10.0.0.2"), TCP, 80);
    assert_eq!(e.egress, Some(Verdict::NotIsolated));
    assert!(e.allowed());
    assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 80));
}

#[test]
fn default_deny_denies_everything_but_the_pod_itself() {
    let p = policy("a", "deny", sel(&[]), Some(vec![]), Some(vec![]));
    let c = example_cluster(vec![p]);
    let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
    let ep = &state.endpoints[&ip("10.0.0.1")];
    assert!(ep.ingress.allow.is_empty() && ep.egress.allow.is_empty());
    for peer in ["10.0.0.2", "1.2.3.4"] {
        assert!(!allowed(&state, peer, "10.0.0.1", TCP, 80));
        assert!(!allowed(&state, "10.0.0.1", peer, UDP, 53));
    }
    assert!(allowed(&state, "10.0.0.1", "10.0.0.1", TCP, 80));
    // Not selected by the pod selector of another namespace's policy.
    let other = policy("b", "deny", sel(&[]), Some(vec![]), Some(vec![]));
    let state = compile(
        &example_cluster(vec![other]),
        &[local("10.0.0.1", "a", "backend")],
    );
    assert!(allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 80));
    assert!(state.policies[&1].selects.is_empty());
}

#[test]
fn allow_all_is_the_any_identity_for_every_protocol() {
    let all = PolicyRule {
        peers: Peers::All,
        ports: Ports::All,
    };
    let p = policy("a", "all", sel(&[]), Some(vec![all]), None);
    let c = example_cluster(vec![p]);
    let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
    let allow = &state.endpoints[&ip("10.0.0.1")].ingress.allow;
    let key = AllowKey {
        identity: ANY_IDENTITY,
        protocol: None,
        ports: None,
    };
    assert_eq!(allow.len(), 1);
    assert_eq!(allow[&key], RuleRef { policy: 1, rule: 0 });
    assert!(allowed(&state, "10.0.0.4", "10.0.0.1", TCP, 1));
    assert!(allowed(&state, "203.0.113.9", "10.0.0.1", ICMP, 0));
}

#[test]
fn two_policies_allow_their_union_and_report_the_lowest_rule() {
    let front = policy(
        "a",
        "front",
        sel(&[("app", "backend")]),
        Some(vec![rule(
            vec![pods_peer(&[("app", "frontend")])],
            vec![port(Protocol::Tcp, 80)],
        )]),
        None,
    );
    let other = policy(
        "a",
        "other",
        sel(&[]),
        Some(vec![
            rule(
                vec![pods_peer(&[("app", "other")])],
                vec![port(Protocol::Tcp, 9090)],
            ),
            rule(
                vec![pods_peer(&[("app", "frontend")])],
                vec![port(Protocol::Tcp, 80)],
            ),
        ]),
        None,
    );
    let c = example_cluster(vec![front, other]);
    let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
    let ingress = &state.endpoints[&ip("10.0.0.1")].ingress;
    assert_eq!(ingress.policies, vec![1, 2]);
    assert!(allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 80));
    assert!(allowed(&state, "10.0.0.4", "10.0.0.1", TCP, 9090));
    assert!(!allowed(&state, "10.0.0.4", "10.0.0.1", TCP, 80));
    assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 9090));
    let front_id = state.identities[&ip("10.0.0.2")];
    assert_eq!(
        ingress.lookup(front_id, TCP, 80),
        Some(RuleRef { policy: 1, rule: 0 })
    );
    let denied = explain(&state, ip("10.0.0.3"), ip("10.0.0.1"), TCP, 80);
    assert_eq!(
        denied.ingress,
        Some(Verdict::Denied {
            isolating: vec!["a/front".into(), "a/other".into()]
        })
    );
}

fn allowed_from(peers: Vec<Peer>, sources: &[&str]) -> Vec<bool> {
    let p = policy(
        "a",
        "p",
        sel(&[("app", "target")]),
        Some(vec![PolicyRule {
            peers: Peers::Some(peers),
            ports: Ports::All,
        }]),
        None,
    );
    let c = cluster(
        vec![
            pod("a", "target", "10.0.0.1", &[("app", "target")]),
            pod("a", "x", "10.0.1.1", &[("app", "x")]),
            pod("a", "y", "10.0.1.2", &[("app", "y")]),
            pod("b", "x", "10.0.2.1", &[("app", "x")]),
            pod("b", "y", "10.0.2.2", &[("app", "y")]),
            pod("c", "x", "10.0.3.1", &[("app", "x")]),
        ],
        vec![namespace("a", &[]), namespace("b", &[("team", "b")])],
        vec![p],
    );
    let state = compile(&c, &[local("10.0.0.1", "a", "target")]);
    sources
        .iter()
        .map(|s| allowed(&state, s, "10.0.0.1", TCP, 80))
        .collect()
}

const SOURCES: [&str; 5] = ["10.0.1.1", "10.0.1.2", "10.0.2.1", "10.0.2.2", "10.0.3.1"];

#[test]
fn empty_peers_or_ports_allow_nothing() {
    let p = policy(
        "a",
        "p",
        sel(&[]),
        Some(vec![rule(vec![pods_peer(&[])], vec![])]),
        Some(vec![rule(vec![], vec![port(Protocol::Tcp, 80)])]),
    );
    let state = compile(
        &example_cluster(vec![p]),
        &[local("10.0.0.1", "a", "backend")],
    );
    let ep = &state.endpoints[&ip("10.0.0.1")];
    assert!(ep.ingress.allow.is_empty() && ep.egress.allow.is_empty());
    assert!(ep.ingress.isolated && ep.egress.isolated);
}

#[test]
fn pod_selectors_stay_in_the_policy_namespace_unless_a_namespace_selector_says() {
    // a/x, a/y, b/x, b/y, c/x
    assert_eq!(
        allowed_from(vec![pods_peer(&[("app", "x")])], &SOURCES),
        [true, false, false, false, false]
    );
    assert_eq!(
        allowed_from(vec![ns_peer(&[("team", "b")], &[])], &SOURCES),
        [false, false, true, true, false]
    );
    assert_eq!(
        allowed_from(vec![ns_peer(&[], &[("app", "x")])], &SOURCES),
        [true, false, true, false, true]
    );
    // The name label, also for a namespace the source has no object of.
    assert_eq!(
        allowed_from(vec![ns_peer(&[(NAMESPACE_NAME_LABEL, "c")], &[])], &SOURCES),
        [false, false, false, false, true]
    );
    assert_eq!(
        allowed_from(vec![ns_peer(&[(NAMESPACE_NAME_LABEL, "b")], &[])], &SOURCES),
        [false, false, true, true, false]
    );
}

#[test]
fn one_peer_ands_its_selectors_and_two_peers_or() {
    assert_eq!(
        allowed_from(vec![ns_peer(&[("team", "b")], &[("app", "x")])], &SOURCES),
        [false, false, true, false, false]
    );
    assert_eq!(
        allowed_from(
            vec![ns_peer(&[("team", "b")], &[]), pods_peer(&[("app", "x")])],
            &SOURCES
        ),
        [true, false, true, true, false]
    );
    // External addresses are no pods.
    assert_eq!(allowed_from(vec![ns_peer(&[], &[])], &["1.1.1.1"]), [false]);
}

#[test]
fn match_expressions_select_peers() {
    let expr = |key: &str, operator, values: &[&str]| Peer::Pods {
        namespaces: NamespaceScope::Selected(LabelSelector::default()),
        pods: LabelSelector {
            match_labels: Labels::new(),
            expressions: vec![Requirement {
                key: key.into(),
                operator,
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
        },
    };
    assert_eq!(
        allowed_from(vec![expr("app", Operator::In, &["y"])], &SOURCES),
        [false, true, false, true, false]
    );
    assert_eq!(
        allowed_from(vec![expr("app", Operator::NotIn, &["y"])], &SOURCES),
        [true, false, true, false, true]
    );
    assert_eq!(
        allowed_from(vec![expr("tier", Operator::DoesNotExist, &[])], &SOURCES),
        [true; 5]
    );
    let by_ns = Peer::Pods {
        namespaces: NamespaceScope::Selected(LabelSelector {
            match_labels: Labels::new(),
            expressions: vec![Requirement {
                key: "team".into(),
                operator: Operator::Exists,
                values: Default::default(),
            }],
        }),
        pods: LabelSelector::default(),
    };
    assert_eq!(
        allowed_from(vec![by_ns], &SOURCES),
        [false, false, true, true, false]
    );
}

#[test]
fn ip_blocks_allow_the_cidr_minus_its_excepts() {
    let block = |cidr: &str, except: &[&str]| Peer::IpBlock {
        cidr: net(cidr),
        except: except.iter().map(|e| net(e)).collect(),
    };
    let p = policy(
        "a",
        "p",
        sel(&[("app", "backend")]),
        None,
        Some(vec![
            // Host bits are ignored, as the API server does.
            rule(
                vec![block("10.1.0.7/16", &["10.1.2.0/24"])],
                vec![port(Protocol::Tcp, 443)],
            ),
            rule(
                vec![block("10.1.2.128/25", &[])],
                vec![port(Protocol::Tcp, 80)],
            ),
        ]),
    );
    let c = example_cluster(vec![p]);
    let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
    let egress = &state.endpoints[&ip("10.0.0.1")].egress;
    assert_eq!(egress.cidrs.len(), 3);
    assert!(egress.cidrs.values().all(|n| *n >= CIDR_IDENTITY_BASE));
    let e = explain(&state, ip("10.0.0.1"), ip("10.1.3.5"), TCP, 443);
    assert_eq!(
        e.egress,
        Some(Verdict::Allowed {
            by: RuleRef { policy: 1, rule: 0 },
            policy: "a/p".into()
        })
    );
    assert!(!allowed(&state, "10.0.0.1", "10.1.3.5", TCP, 80));
    assert!(!allowed(&state, "10.0.0.1", "10.1.2.5", TCP, 443)); // in the except
    assert!(!allowed(&state, "10.0.0.1", "10.1.2.200", TCP, 443));
    assert!(allowed(&state, "10.0.0.1", "10.1.2.200", TCP, 80)); // the /25
    assert!(!allowed(&state, "10.0.0.1", "10.1.2.5", TCP, 80));
    assert!(!allowed(&state, "10.0.0.1", "10.2.0.1", TCP, 443)); // outside
    assert!(!allowed(&state, "10.0.0.1", "10.0.0.2", TCP, 443));
}

#[test]
fn ingress_named_ports_resolve_against_the_endpoint() {
    let p = policy(
        "a",
        "p",
        sel(&[("app", "backend")]),
        Some(vec![rule(
            vec![pods_peer(&[("app", "frontend")])],
            vec![named(Protocol::Tcp, "http"), named(Protocol::Tcp, "nope")],
        )]),
        None,
    );
    let mut c = example_cluster(vec![p]);
    let backend = with_port(
        pod("a", "backend", "10.0.0.1", &[("app", "backend")]),
        "http",
        Protocol::Tcp,
        8080,
    );
    let backend = with_port(backend, "dns", Protocol::Udp, 53);
    c.pods.insert(backend.key.clone(), Arc::new(backend));
    let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
    let ingress = &state.endpoints[&ip("10.0.0.1")].ingress;
    let front = state.identities[&ip("10.0.0.2")];
    let keys: Vec<AllowKey> = ingress.allow.keys().copied().collect();
    assert_eq!(
        keys,
        [AllowKey {
            identity: front,
            protocol: Some(TCP),
            ports: Some(PortPrefix {
                port: 8080,
                len: 16
            }),
        }]
    );
    assert!(allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 8080));
    assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", UDP, 8080));
}

#[test]
fn egress_named_ports_resolve_per_destination() {
    let db = |name: &str, addr: &str, number: u16| {
        with_port(
            pod("a", name, addr, &[("app", "db")]),
            "sql",
            Protocol::Tcp,
            number,
        )
    };
    let p = policy(
        "a",
        "p",
        sel(&[("app", "backend")]),
        None,
        Some(vec![
            rule(
                vec![pods_peer(&[("app", "db")])],
                vec![named(Protocol::Tcp, "sql")],
            ),
            PolicyRule {
                peers: Peers::All,
                ports: Ports::Some(vec![named(Protocol::Tcp, "sql")]),
            },
            rule(
                vec![Peer::IpBlock {
                    cidr: net("192.168.0.0/16"),
                    except: vec![],
                }],
                vec![named(Protocol::Tcp, "sql")],
            ),
        ]),
    );
    let mut c = example_cluster(vec![p]);
    for d in [db("db1", "10.0.5.1", 5432), db("db2", "10.0.5.2", 5433)] {
        c.pods.insert(d.key.clone(), Arc::new(d));
    }
    let other = with_port(
        pod("b", "db3", "10.0.6.1", &[("app", "x")]),
        "sql",
        Protocol::Tcp,
        3306,
    );
    c.pods.insert(other.key.clone(), Arc::new(other));
    let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
    let (id1, id2) = (
        state.identities[&ip("10.0.5.1")],
        state.identities[&ip("10.0.5.2")],
    );
    assert_ne!(id1, id2, "named ports are part of the identity");
    assert_eq!(state.identity_info[&id1], state.identity_info[&id2]);
    let egress = &state.endpoints[&ip("10.0.0.1")].egress;
    assert_eq!(
        egress.lookup(id1, TCP, 5432),
        Some(RuleRef { policy: 1, rule: 0 })
    );
    assert_eq!(egress.lookup(id1, TCP, 5433), None);
    assert_eq!(
        egress.lookup(id2, TCP, 5433),
        Some(RuleRef { policy: 1, rule: 0 })
    );
    // `to: []` with a named port: each pod that has the name, not ANY.
    assert!(allowed(&state, "10.0.0.1", "10.0.6.1", TCP, 3306));
    assert!(!allowed(&state, "10.0.0.1", "10.0.6.1", TCP, 5432));
    assert!(egress.allow.keys().all(|k| k.identity != ANY_IDENTITY));
    // An ipBlock has no named ports.
    assert!(!allowed(&state, "10.0.0.1", "192.168.1.1", TCP, 5432));
    assert!(state.problems.iter().any(|p| p.contains("named port")));
}

#[test]
fn end_port_ranges_are_covered_exactly() {
    let range = PolicyPort {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Number(32000)),
        end_port: Some(32768),
    };
    let entries = numeric_entries(&Ports::Some(vec![range]));
    let prefixes: Vec<PortPrefix> = entries.iter().filter_map(|(_, p)| *p).collect();
    assert_eq!(prefixes.len(), entries.len());
    for p in 31990..32780u16 {
        let hits = prefixes.iter().filter(|pp| pp.contains(p)).count();
        assert_eq!(hits, usize::from((32000..=32768).contains(&p)), "port {p}");
    }
    assert_eq!(port_prefixes(80, 80), [PortPrefix { port: 80, len: 16 }]);
    assert_eq!(port_prefixes(0, 65535).len(), 16);
    assert!(!port_prefixes(0, 65535).iter().any(|pp| pp.contains(0)));
    assert_eq!(
        port_prefixes(1024, 2047),
        [PortPrefix { port: 1024, len: 6 }]
    );
    let p = policy(
        "a",
        "p",
        sel(&[]),
        Some(vec![any_peer(vec![PolicyPort {
            protocol: Protocol::Tcp,
            port: Some(PortRef::Number(32000)),
            end_port: Some(32768),
        }])]),
        None,
    );
    let state = compile(
        &example_cluster(vec![p]),
        &[local("10.0.0.1", "a", "backend")],
    );
    assert!(allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 32768));
    assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 32769));
}

#[test]
fn a_policy_with_an_error_isolates_and_allows_nothing() {
    let mut broken = policy(
        "a",
        "broken",
        sel(&[("app", "backend")]),
        Some(vec![rule(vec![], vec![])]),
        Some(vec![]),
    );
    broken.error = Some("unsupported field".into());
    let open = policy(
        "a",
        "open",
        sel(&[]),
        Some(vec![PolicyRule {
            peers: Peers::Some(vec![pods_peer(&[("app", "frontend")])]),
            ports: Ports::All,
        }]),
        None,
    );
    let c = example_cluster(vec![broken, open]);
    let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
    assert_eq!(
        state.policies[&1].error.as_deref(),
        Some("unsupported field")
    );
    assert_eq!(state.policies[&1].selects, vec![ip("10.0.0.1")]);
    assert!(state.problems.iter().any(|p| p.contains("a/broken")));
    let ep = &state.endpoints[&ip("10.0.0.1")];
    assert!(ep.ingress.isolated && ep.egress.isolated);
    assert!(ep.egress.allow.is_empty());
    assert!(!allowed(&state, "10.0.0.1", "10.0.0.2", TCP, 80));
    assert!(!allowed(&state, "10.0.0.4", "10.0.0.1", TCP, 80));
    // Still the union: the other policy's rules hold.
    assert_eq!(ep.ingress.policies, vec![1, 2]);
    assert!(allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 80));
}

#[test]
fn an_unknown_pod_fails_closed_where_policies_may_select_it() {
    let p = policy("a", "deny", sel(&[("app", "nothing")]), Some(vec![]), None);
    let c = example_cluster(vec![p]);
    let locals = [
        local("10.0.0.9", "a", "gone"),
        local("10.0.0.10", "b", "gone"),
        LocalEndpoint {
            ip: ip("10.0.0.11"),
            pod: None,
        },
        // Found by address when the runtime gave no name.
        LocalEndpoint {
            ip: ip("10.0.0.2"),
            pod: None,
        },
    ];
    let state = compile(&c, &locals);
    let e = explain(&state, ip("10.0.0.9"), ip("10.0.0.2"), TCP, 80);
    assert_eq!(e.egress, Some(Verdict::DeniedFailClosed));
    assert!(!allowed(&state, "10.0.0.2", "10.0.0.9", TCP, 80));
    assert!(!allowed(&state, "10.0.0.9", "10.0.0.9", TCP, 80));
    assert!(state.problems.iter().any(|p| p.contains("a/gone")));
    // Not a pod (no name, no Pod with its address): nothing selects it.
    let unnamed = &state.endpoints[&ip("10.0.0.11")];
    assert!(!unnamed.ingress.isolated && !unnamed.egress.isolated);
    let b = &state.endpoints[&ip("10.0.0.10")];
    assert!(!b.ingress.isolated && !b.egress.isolated);
    assert_eq!(b.identity, None);
    let found = &state.endpoints[&ip("10.0.0.2")];
    assert_eq!(found.pod, Some(("a".into(), "frontend".into())));
    assert!(!found.ingress.isolated);
    assert_eq!(found.identity, Some(state.identities[&ip("10.0.0.2")]));
    // No policy anywhere: nothing to fail closed for.
    let state = compile(&example_cluster(vec![]), &locals);
    assert!(!state.endpoints[&ip("10.0.0.11")].ingress.isolated);
    assert!(state.problems.is_empty());
}

#[test]
fn identity_numbers_survive_a_recompile() {
    let mut c = example_cluster(vec![]);
    // Same namespace and labels: the same identity.
    let twin = pod("a", "frontend-2", "10.0.0.5", &[("app", "frontend")]);
    c.pods.insert(twin.key.clone(), Arc::new(twin));
    let locals = [local("10.0.0.1", "a", "backend")];
    let mut compiler = PolicyCompiler::new();
    let first = compiler.compile(&c, &locals);
    assert_eq!(
        first.identities[&ip("10.0.0.2")],
        first.identities[&ip("10.0.0.5")]
    );
    assert_eq!(first.identity_info.len(), 4);
    assert!(
        first
            .identity_info
            .keys()
            .all(|n| (1..CIDR_IDENTITY_BASE).contains(n))
    );
    let new = pod("a", "aaa-new", "10.0.0.6", &[("app", "new")]);
    c.pods.insert(new.key.clone(), Arc::new(new));
    let second = compiler.compile(&c, &locals);
    for (addr, id) in &first.identities {
        assert_eq!(second.identities[addr], *id, "{addr}");
    }
    let new_id = second.identities[&ip("10.0.0.6")];
    assert!(!first.identity_info.contains_key(&new_id));
    assert_eq!(second.identities.len(), 6);
    // Unused keys are dropped.
    c.pods.remove(&("a".to_string(), "aaa-new".to_string()));
    let third = compiler.compile(&c, &locals);
    assert!(!third.identity_info.contains_key(&new_id));
    assert!(!compiler.numbers.values().any(|n| *n == new_id));
    assert_eq!(third, first);
}

#[test]
fn a_restarted_compiler_numbers_pods_as_the_maps_did() {
    let c = example_cluster(vec![]);
    let locals = [local("10.0.0.1", "a", "backend")];
    let first = PolicyCompiler::new().compile(&c, &locals);
    // Numbers an earlier agent chose, not the ones a fresh one picks.
    let shifted: Vec<(Ipv4Addr, u32)> = first
        .identities
        .iter()
        .map(|(addr, n)| (*addr, n + 100))
        .collect();
    let adopted = PolicyCompiler::adopt(shifted.clone()).compile(&c, &locals);
    let numbers: Vec<(Ipv4Addr, u32)> = adopted.identities.into_iter().collect();
    assert_eq!(numbers, shifted);
    // A number two label sets claimed (stale map) goes to one of them.
    let clash: Vec<(Ipv4Addr, u32)> = first.identities.keys().map(|a| (*a, 7)).collect();
    let fresh = PolicyCompiler::adopt(clash).compile(&c, &locals);
    let distinct: BTreeSet<u32> = fresh.identities.values().copied().collect();
    assert_eq!(distinct.len(), first.identity_info.len());
}

#[test]
fn policy_numbers_stay_when_others_come_and_go() {
    let deny = |name: &str| policy("a", name, sel(&[("app", "backend")]), Some(vec![]), None);
    let locals = [local("10.0.0.1", "a", "backend")];
    let mut compiler = PolicyCompiler::new();
    let first = compiler.compile(&example_cluster(vec![deny("m")]), &locals);
    assert_eq!(first.policies[&1].name, "a/m");
    // "a/b" sorts first, but "a/m" keeps its number.
    let second = compiler.compile(&example_cluster(vec![deny("b"), deny("m")]), &locals);
    assert_eq!(second.policies[&1].name, "a/m");
    assert_eq!(second.policies[&2].name, "a/b");
    // A policy selecting no pod of this node is numbered, not compiled.
    let elsewhere = policy("a", "z", sel(&[("app", "nobody")]), Some(vec![]), None);
    let third = compiler.compile(&example_cluster(vec![deny("m"), elsewhere]), &locals);
    assert_eq!(third.policies[&1].name, "a/m");
    assert_eq!(third.policies[&3].name, "a/z");
    assert!(third.policies[&3].selects.is_empty());
}

#[test]
fn ip_block_numbers_keep_their_prefix_when_blocks_come_and_go() {
    use crate::model::{Peer, Peers, PolicyRule, Ports};
    let block = |cidr: &str, except: &[&str]| Peer::IpBlock {
        cidr: cidr.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
    };
    let with = |peers: Vec<Peer>| {
        let rule = PolicyRule {
            peers: Peers::Some(peers),
            ports: Ports::All,
        };
        example_cluster(vec![policy(
            "a",
            "blocks",
            sel(&[("app", "backend")]),
            Some(vec![rule]),
            None,
        )])
    };
    let locals = [local("10.0.0.1", "a", "backend")];
    let mut compiler = PolicyCompiler::new();
    let first = compiler.compile(&with(vec![block("10.0.0.0/8", &["10.1.0.0/16"])]), &locals);
    let second = compiler.compile(
        &with(vec![
            block("9.0.0.0/8", &[]),
            block("10.0.0.0/8", &["10.1.0.0/16"]),
        ]),
        &locals,
    );
    let (old, new) = (
        &first.endpoints[&ip("10.0.0.1")].ingress,
        &second.endpoints[&ip("10.0.0.1")].ingress,
    );
    for prefix in ["10.0.0.0/8", "10.1.0.0/16"] {
        let prefix: Ipv4Network = prefix.parse().unwrap();
        assert_eq!(old.cidrs[&prefix], new.cidrs[&prefix], "{prefix}");
    }
    let nine = new.cidrs[&"9.0.0.0/8".parse::<Ipv4Network>().unwrap()];
    assert!(
        !old.cidrs.values().any(|n| *n == nine),
        "a new prefix gets a new number"
    );
    // Still exact: allowed inside, denied in the except and outside.
    assert!(allowed(&second, "9.9.9.9", "10.0.0.1", TCP, 80));
    assert!(allowed(&second, "10.2.0.1", "10.0.0.1", TCP, 80));
    assert!(!allowed(&second, "10.1.0.1", "10.0.0.1", TCP, 80));
    assert!(!allowed(&second, "11.0.0.1", "10.0.0.1", TCP, 80));
}

#[test]
fn finished_pods_and_contested_addresses_have_no_identity() {
    let mut c = example_cluster(vec![]);
    // A finished Job pod still shows the address the frontend now has.
    let mut done = pod("a", "job", "10.0.0.2", &[("app", "job")]);
    done.finished = true;
    c.pods.insert(done.key.clone(), Arc::new(done));
    // A stale object claims the database's address with other labels.
    let stale = pod("b", "stale", "10.0.0.3", &[("app", "stale")]);
    c.pods.insert(stale.key.clone(), Arc::new(stale));
    let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
    let frontend = state.identities[&ip("10.0.0.2")];
    assert_eq!(state.identity_info[&frontend].labels["app"], "frontend");
    assert!(!state.identities.contains_key(&ip("10.0.0.3")));
    assert!(state.problems.iter().any(|p| p.contains("10.0.0.3")));
}

#[test]
fn host_network_pods_have_no_identity() {
    let mut host = pod("a", "host", "192.168.0.10", &[("app", "frontend")]);
    host.host_network = true;
    let mut c = example_cluster(vec![]);
    c.pods.insert(host.key.clone(), Arc::new(host));
    let state = compile(&c, &[]);
    assert!(!state.identities.contains_key(&ip("192.168.0.10")));
    assert_eq!(state.identities.len(), 4);
}
