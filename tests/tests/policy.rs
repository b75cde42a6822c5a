//! NetworkPolicy, enforced by the eBPF datapath: real agents on two lab
//! nodes, pods wired by tern-cni with the CNI_ARGS a Kubernetes runtime
//! passes, Pod/Namespace/NetworkPolicy objects in the nodes' manifest
//! directories, real TCP and UDP probes (1 s each, all pairs at once).
//! The truth tables follow the upstream network-policy e2e suite's shape
//! (namespaces x, y, z; pods a, b, c; ports 80 and 81). Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use serde_json::Value;
use tern_lab::lab::{
    Lab, LabNode, Pod, course_policy, list_manifest, namespace_object, pod_object,
};
use tern_lab::netns::Netns;
use tern_lab::traffic::{EchoServer, agent_http_get, tcp_connect_from, tcp_exchange};

/// How long a probe waits: a denied connection is dropped, not refused.
const PROBE: Duration = Duration::from_secs(1);
/// Policy changes reach every node within this (manifest poll + sync).
const SETTLE: Duration = Duration::from_secs(8);

tern_lab::both_routing_modes!(
    truth_tables,
    established_connections_are_judged_again_when_policy_changes,
    a_policy_that_does_not_fit_its_map_fails_closed,
    node_port_from_outside_and_hairpin_under_policy,
);

tern_lab::both_service_paths!(
    socket_lb: true, per_packet: false;
    the_course_policy_behaves_as_written,
);

/// A pod to create: namespace, name, labels, ports it serves.
type PodSpec<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a [u16]);

/// A pod of the lab cluster with what its object says.
struct LabPod {
    namespace: String,
    name: String,
    node: usize,
    pod: Pod,
    labels: Vec<(String, String)>,
    _servers: Vec<EchoServer>,
}

impl LabPod {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

struct Cluster {
    nodes: Vec<LabNode>,
    pods: Vec<LabPod>,
    /// Namespace objects and Pod objects, rewritten on every node.
    objects: Vec<Value>,
    _lab: Lab,
}

impl Cluster {
    /// `mode` routing, `socket_lb` Service path; pods (namespace, name,
    /// labels, ports served) spread over two nodes in turn.
    fn new(
        mode: &str,
        socket_lb: bool,
        namespaces: &[(&str, &[(&str, &str)])],
        pods: &[PodSpec],
        named_ports: &[(&str, u16, &str)],
    ) -> Result<Cluster> {
        let lab = Lab::new()?;
        let mut nodes = lab.cluster(2, mode)?;
        if !socket_lb {
            for node in &mut nodes {
                node.kill_agent()?;
                node.socket_lb = false;
                node.start_agent()?;
            }
        }
        let mut objects: Vec<Value> = namespaces
            .iter()
            .map(|(name, labels)| namespace_object(name, labels))
            .collect();
        let mut lab_pods = Vec::new();
        for (i, (namespace, name, labels, ports)) in pods.iter().enumerate() {
            let node = i % 2;
            let pod = nodes[node].add_k8s_pod(namespace, name)?;
            let mut servers = Vec::new();
            for port in *ports {
                servers.push(EchoServer::start(&pod.ns, *port, name)?);
            }
            objects.push(pod_object(
                namespace,
                name,
                &nodes[node].name,
                pod.ip,
                labels,
                named_ports,
            ));
            lab_pods.push(LabPod {
                namespace: namespace.to_string(),
                name: name.to_string(),
                node,
                pod,
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                _servers: servers,
            });
        }
        let cluster = Cluster {
            nodes,
            pods: lab_pods,
            objects,
            _lab: lab,
        };
        cluster.write_all("objects.json", &list_manifest(cluster.objects.clone()))?;
        cluster.wait_for_identities()?;
        Ok(cluster)
    }

    fn write_all(&self, file: &str, text: &str) -> Result<()> {
        for node in &self.nodes {
            node.write_manifest(file, text)?;
        }
        Ok(())
    }

    /// The policies in force: `yaml` replaces the previous set.
    fn set_policies(&self, yaml: &str) -> Result<()> {
        self.write_all("policies.yaml", yaml)
    }

    /// Every node knows every pod's identity (the objects are in).
    fn wait_for_identities(&self) -> Result<()> {
        let deadline = Instant::now() + SETTLE;
        for node in &self.nodes {
            loop {
                let list: Value =
                    serde_json::from_str(&node.tern(&["policy", "list", "-o", "json"])?)?;
                let known = list["endpoints"]
                    .as_array()
                    .map(|e| e.iter().filter(|e| !e["identity"].is_null()).count())
                    .unwrap_or(0);
                let local = self
                    .pods
                    .iter()
                    .filter(|p| self.nodes[p.node].name == node.name)
                    .count();
                if known == local {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{}: {known} of {local} pods have an identity: {list}",
                        node.name
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    fn pod(&self, key: &str) -> &LabPod {
        self.pods
            .iter()
            .find(|p| p.key() == key)
            .unwrap_or_else(|| panic!("no pod {key}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// One probe: a connection (TCP) or request (UDP) answered within 1 s.
fn probe(from: &Netns, to: SocketAddr, proto: Proto) -> bool {
    match proto {
        Proto::Tcp => tcp_connect_from(from, 0, to, PROBE)
            .and_then(|mut s| {
                s.set_read_timeout(Some(PROBE))?;
                s.write_all(b"ping\n")?;
                let mut byte = [0u8; 1];
                ensure!(s.read(&mut byte)? == 1, "closed");
                Ok(())
            })
            .is_ok(),
        Proto::Udp => from
            .run(|| -> Result<()> {
                let socket = UdpSocket::bind(("0.0.0.0", 0))?;
                socket.set_read_timeout(Some(PROBE))?;
                socket.send_to(b"ping", to)?;
                let mut buf = [0u8; 256];
                socket.recv_from(&mut buf)?;
                Ok(())
            })
            .is_ok(),
    }
}

/// Probes every ordered pair of pods at `port` at once: pair -> reached.
fn matrix(c: &Cluster, port: u16, proto: Proto) -> BTreeMap<(String, String), bool> {
    let pairs: Vec<(&LabPod, &LabPod)> = c
        .pods
        .iter()
        .flat_map(|a| c.pods.iter().map(move |b| (a, b)))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(a, b)| {
                let to = SocketAddr::from((b.pod.ip, port));
                (
                    (a.key(), b.key()),
                    s.spawn(move || probe(&a.pod.ns, to, proto)),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(k, h)| (k, h.join().expect("probe thread")))
            .collect()
    })
}

/// Probes until the matrix equals `expected` (policy takes a moment to
/// reach both nodes), then says which pairs still differ.
fn expect_matrix(
    c: &Cluster,
    case: &str,
    port: u16,
    proto: Proto,
    expected: impl Fn(&LabPod, &LabPod) -> bool,
) -> Result<()> {
    let want: BTreeMap<(String, String), bool> = c
        .pods
        .iter()
        .flat_map(|a| c.pods.iter().map(move |b| (a, b)))
        .map(|(a, b)| {
            // A pod reaching itself never leaves its namespace.
            ((a.key(), b.key()), a.key() == b.key() || expected(a, b))
        })
        .collect();
    let deadline = Instant::now() + SETTLE;
    loop {
        let got = matrix(c, port, proto);
        if got == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            let wrong: Vec<String> = want
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(v))
                .map(|((a, b), v)| {
                    format!(
                        "{a} -> {b}: expected {}",
                        if *v { "allowed" } else { "denied" }
                    )
                })
                .collect();
            bail!(
                "{case} ({port}/{proto:?}): {} pairs wrong:\n{}",
                wrong.len(),
                wrong.join("\n")
            );
        }
    }
}

fn label<'a>(p: &'a LabPod, key: &str) -> Option<&'a str> {
    p.labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

const NAMESPACES: [(&str, &[(&str, &str)]); 3] = [
    ("x", &[("ns", "x")]),
    ("y", &[("ns", "y")]),
    ("z", &[("ns", "z")]),
];

fn upstream_shape(mode: &str, socket_lb: bool) -> Result<Cluster> {
    let mut pods: Vec<PodSpec> = Vec::new();
    for ns in ["x", "y", "z"] {
        for (name, labels) in [
            ("a", &[("pod", "a")] as &[(&str, &str)]),
            ("b", &[("pod", "b")]),
            ("c", &[("pod", "c")]),
        ] {
            pods.push((ns, name, labels, &[80, 81]));
        }
    }
    Cluster::new(
        mode,
        socket_lb,
        &NAMESPACES,
        &pods,
        &[("serve-80-tcp", 80, "TCP"), ("serve-81-udp", 81, "UDP")],
    )
}

fn policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}\n---\n"
    )
}

/// The upstream suite's cases, one after the other on one cluster.
fn truth_tables(mode: &str) -> Result<()> {
    upstream_cases(&upstream_shape(mode, true)?)
}

/// The same with Services translated per packet only (its connection
/// tracking also sees pod-to-pod flows).
#[test]
fn truth_tables_without_socket_lb() -> Result<()> {
    if !tern_lab::skip::require_root("truth_tables_without_socket_lb") {
        return Ok(());
    }
    upstream_cases(&upstream_shape("overlay", false)?)
}

fn upstream_cases(c: &Cluster) -> Result<()> {
    let ns = |p: &LabPod| p.namespace.clone();
    let pod = |p: &LabPod| label(p, "pod").unwrap_or_default().to_owned();
    let all = |_: &LabPod, _: &LabPod| true;

    expect_matrix(c, "no policy", 80, Proto::Tcp, all)?;

    let deny_ingress_x = policy(
        "x",
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]",
    );
    c.set_policies(&deny_ingress_x)?;
    expect_matrix(c, "default deny ingress", 80, Proto::Tcp, |_, b| {
        ns(b) != "x"
    })?;
    expect_matrix(c, "default deny ingress", 81, Proto::Udp, |_, b| {
        ns(b) != "x"
    })?;

    c.set_policies(&policy(
        "x",
        "deny-egress",
        "  podSelector: {}\n  policyTypes: [Egress]",
    ))?;
    expect_matrix(c, "default deny egress", 80, Proto::Tcp, |a, _| {
        ns(a) != "x"
    })?;

    c.set_policies(&policy(
        "x",
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]",
    ))?;
    expect_matrix(c, "deny all both ways", 80, Proto::Tcp, |a, b| {
        ns(a) != "x" && ns(b) != "x"
    })?;

    c.set_policies(&format!(
        "{deny_ingress_x}{}",
        policy("x", "allow-all", "  podSelector: {}\n  ingress: [{}]")
    ))?;
    expect_matrix(c, "allow all (union with deny)", 80, Proto::Tcp, all)?;

    c.set_policies(&policy(
        "x",
        "same-namespace",
        "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}}]",
    ))?;
    expect_matrix(
        c,
        "allow from the same namespace",
        80,
        Proto::Tcp,
        |a, b| ns(b) != "x" || ns(a) == "x",
    )?;

    c.set_policies(&policy(
        "x",
        "from-y",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]",
    ))?;
    expect_matrix(c, "namespaceSelector", 80, Proto::Tcp, |a, b| {
        b.key() != "x/a" || ns(a) == "y"
    })?;

    c.set_policies(&policy(
        "x",
        "by-name-label",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]",
    ))?;
    expect_matrix(
        c,
        "namespaceSelector on kubernetes.io/metadata.name",
        80,
        Proto::Tcp,
        |a, b| b.key() != "x/a" || ns(a) == "z",
    )?;

    c.set_policies(&policy(
        "x",
        "from-b",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]",
    ))?;
    expect_matrix(c, "podSelector (own namespace)", 80, Proto::Tcp, |a, b| {
        b.key() != "x/a" || a.key() == "x/b"
    })?;

    c.set_policies(&policy(
        "x",
        "and",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: c}}}]",
    ))?;
    expect_matrix(c, "pod AND namespace selector", 80, Proto::Tcp, |a, b| {
        b.key() != "x/a" || a.key() == "y/c"
    })?;

    c.set_policies(&policy(
        "x",
        "or",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: c}}}]",
    ))?;
    expect_matrix(c, "pod OR namespace selector", 80, Proto::Tcp, |a, b| {
        b.key() != "x/a" || ns(a) == "y" || a.key() == "x/c"
    })?;

    c.set_policies(&policy(
        "x",
        "expressions",
        "  podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x, y]}]}\n      podSelector: {matchExpressions: [{key: pod, operator: Exists}]}",
    ))?;
    expect_matrix(c, "matchExpressions", 80, Proto::Tcp, |a, b| {
        !(ns(b) == "x" && (pod(b) == "a" || pod(b) == "b")) || ns(a) == "z"
    })?;

    // ipBlock: every pod address, except y/b's.
    let yb = c.pod("y/b").pod.ip;
    c.set_policies(&policy(
        "x",
        "ip-block",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [{yb}/32]}}}}]"
        ),
    ))?;
    expect_matrix(c, "ipBlock with except", 80, Proto::Tcp, |a, b| {
        b.key() != "x/a" || a.key() != "y/b"
    })?;

    c.set_policies(&policy(
        "x",
        "egress-ip-block",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {}/32}}}}]",
            c.pod("z/c").pod.ip
        ),
    ))?;
    expect_matrix(
        c,
        "egress to an ipBlock of one pod",
        80,
        Proto::Tcp,
        |a, b| a.key() != "x/a" || b.key() == "z/c",
    )?;

    c.set_policies(&policy(
        "x",
        "named-port",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: serve-80-tcp}]",
    ))?;
    expect_matrix(c, "named port (allowed)", 80, Proto::Tcp, all)?;
    expect_matrix(c, "named port (other port)", 81, Proto::Tcp, |_, b| {
        ns(b) != "x"
    })?;

    c.set_policies(&policy(
        "x",
        "named-udp-port",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: serve-81-udp, protocol: UDP}]",
    ))?;
    expect_matrix(c, "named UDP port", 81, Proto::Udp, all)?;
    expect_matrix(c, "named UDP port (TCP denied)", 81, Proto::Tcp, |_, b| {
        ns(b) != "x"
    })?;

    c.set_policies(&policy(
        "x",
        "end-port",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: 79, endPort: 80, protocol: TCP}]",
    ))?;
    expect_matrix(c, "endPort range (inside)", 80, Proto::Tcp, all)?;
    expect_matrix(c, "endPort range (outside)", 81, Proto::Tcp, |_, b| {
        ns(b) != "x"
    })?;

    c.set_policies(&policy(
        "x",
        "dns-only",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]",
    ))?;
    expect_matrix(c, "egress allowing only DNS", 80, Proto::Tcp, |a, _| {
        ns(a) != "x"
    })?;
    expect_matrix(c, "egress allowing only DNS", 81, Proto::Udp, |a, _| {
        ns(a) != "x"
    })?;

    // Union: two policies each allowing one source.
    c.set_policies(&format!(
        "{}{}",
        policy("x", "from-xb", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]"),
        policy("x", "from-ns-z", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: z}}}]"),
    ))?;
    expect_matrix(c, "multiple policies (union)", 80, Proto::Tcp, |a, b| {
        b.key() != "x/a" || a.key() == "x/b" || ns(a) == "z"
    })?;

    // The same policy updated in place: from z -> from y.
    c.set_policies(&format!(
        "{}{}",
        policy("x", "from-xb", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]"),
        policy("x", "from-ns-z", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]"),
    ))?;
    expect_matrix(c, "policy updated in place", 80, Proto::Tcp, |a, b| {
        b.key() != "x/a" || a.key() == "x/b" || ns(a) == "y"
    })?;

    c.set_policies("")?;
    expect_matrix(c, "policies deleted", 80, Proto::Tcp, all)?;
    expect_matrix(c, "policies deleted", 81, Proto::Udp, all)?;
    Ok(())
}

/// The policy new users try first, exactly as written, with a ClusterIP
/// in front of the backend; and the node's own probe under it.
fn the_course_policy_behaves_as_written(socket_lb: bool) -> Result<()> {
    let no_labels: &[(&str, &str)] = &[];
    let c = Cluster::new(
        "overlay",
        socket_lb,
        &[("default", no_labels)],
        &[
            ("default", "frontend", &[("app", "frontend")], &[8080]),
            ("default", "backend", &[("app", "backend")], &[8080, 9090]),
            ("default", "database", &[("app", "database")], &[5432, 8080]),
            ("default", "dns", &[("app", "dns")], &[53]),
            ("default", "other", &[("app", "other")], &[8080]),
        ],
        &[],
    )?;
    let backend = c.pod("default/backend");
    let service = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: backend, namespace: default}}
spec:
  clusterIP: 10.96.0.30
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: backend-1, namespace: default, labels: {{kubernetes.io/service-name: backend}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- addresses: [\"{}\"]
  conditions: {{ready: true}}
  nodeName: {}
",
        backend.pod.ip, c.nodes[backend.node].name
    );
    c.write_all("service.yaml", &service)?;
    for node in &c.nodes {
        node.wait_for_frontend(
            "10.96.0.30:80/TCP",
            Some(&[&format!("{}:8080", backend.pod.ip)]),
        )?;
    }
    c.set_policies(&course_policy("default"))?;
    let at = |key: &str, port: u16| SocketAddr::from((c.pod(key).pod.ip, port));
    let from = |key: &str| &c.pod(key).pod.ns;
    let service_ip = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 30), 80));
    let cases: Vec<(&str, &Netns, SocketAddr, Proto, bool)> = vec![
        (
            "frontend -> backend:8080",
            from("default/frontend"),
            at("default/backend", 8080),
            Proto::Tcp,
            true,
        ),
        (
            "frontend -> backend:9090",
            from("default/frontend"),
            at("default/backend", 9090),
            Proto::Tcp,
            false,
        ),
        (
            "other -> backend:8080",
            from("default/other"),
            at("default/backend", 8080),
            Proto::Tcp,
            false,
        ),
        (
            "database -> backend:8080",
            from("default/database"),
            at("default/backend", 8080),
            Proto::Tcp,
            false,
        ),
        (
            "frontend -> ClusterIP -> backend",
            from("default/frontend"),
            service_ip,
            Proto::Tcp,
            true,
        ),
        (
            "other -> ClusterIP -> backend",
            from("default/other"),
            service_ip,
            Proto::Tcp,
            false,
        ),
        (
            "backend -> database:5432",
            from("default/backend"),
            at("default/database", 5432),
            Proto::Tcp,
            true,
        ),
        (
            "backend -> database:8080",
            from("default/backend"),
            at("default/database", 8080),
            Proto::Tcp,
            false,
        ),
        (
            "backend -> dns:53/TCP",
            from("default/backend"),
            at("default/dns", 53),
            Proto::Tcp,
            true,
        ),
        (
            "backend -> dns:53/UDP",
            from("default/backend"),
            at("default/dns", 53),
            Proto::Udp,
            true,
        ),
        (
            "backend -> other:8080",
            from("default/backend"),
            at("default/other", 8080),
            Proto::Tcp,
            false,
        ),
        (
            "backend -> frontend:8080",
            from("default/backend"),
            at("default/frontend", 8080),
            Proto::Tcp,
            false,
        ),
        (
            "other -> database:5432 (not selected)",
            from("default/other"),
            at("default/database", 5432),
            Proto::Tcp,
            true,
        ),
        // The backend's own node (kubelet probes) is always allowed in.
        (
            "node -> backend:9090",
            &c.nodes[backend.node].ns,
            at("default/backend", 9090),
            Proto::Tcp,
            true,
        ),
    ];
    // In force on the backend's node (which judges both of its directions).
    wait_for_verdict(&c, "default/other", "default/backend", "DENIED")?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let reached: Vec<bool> = std::thread::scope(|s| {
            let probes: Vec<_> = cases
                .iter()
                .map(|(_, ns, to, proto, _)| s.spawn(move || probe(ns, *to, *proto)))
                .collect();
            probes
                .into_iter()
                .map(|h| h.join().expect("probe thread"))
                .collect()
        });
        let wrong: Vec<String> = cases
            .iter()
            .zip(&reached)
            .filter(|((.., want), reached)| *reached != want)
            .map(|(case, _)| case)
            .map(|(name, .., want)| {
                format!(
                    "{name}: expected {}",
                    if *want { "allowed" } else { "denied" }
                )
            })
            .collect();
        if wrong.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let counters = |n: &LabNode| -> Result<Value> {
                let v: Value = serde_json::from_str(&n.tern(&["status", "-o", "json"])?)?;
                Ok(v["datapath"].clone())
            };
            let before: Vec<Value> = c.nodes.iter().map(counters).collect::<Result<_>>()?;
            let one = probe(
                from("default/frontend"),
                at("default/backend", 8080),
                Proto::Tcp,
            );
            let after: Vec<Value> = c.nodes.iter().map(counters).collect::<Result<_>>()?;
            let mut deltas = format!("one more probe: {one}\n");
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                if let Some(map) = a.as_object() {
                    for (k, v) in map {
                        let d = v.as_u64().unwrap_or(0) - b[k].as_u64().unwrap_or(0);
                        if d != 0 {
                            deltas.push_str(&format!("  node {i} {k} +{d}\n"));
                        }
                    }
                }
            }
            eprintln!("{deltas}");
            let node = &c.nodes[backend.node];
            let explained = node.tern(&[
                "policy",
                "explain",
                &c.pod("default/frontend").pod.ip.to_string(),
                &backend.pod.ip.to_string(),
                "8080/TCP",
            ])?;
            bail!(
                "{} cases wrong:\n{}\n{explained}\n{}\n{}\nother node:\n{}\n{}\n{}",
                wrong.len(),
                wrong.join("\n"),
                node.tern(&["policy", "list"])?,
                node.tern(&["status"])?,
                c.nodes[1 - backend.node].tern(&["status"])?,
                c.nodes[1 - backend.node].tern(&["ct", "list"])?,
                node.tern(&["ct", "list"])?,
            );
        }
    }
    // Counted, and explained from the compiled state.
    let node = &c.nodes[backend.node];
    ensure!(
        node.counter("policy_denied_ingress")? > 0,
        "no ingress denial counted"
    );
    let explained = node.tern(&[
        "policy",
        "explain",
        &c.pod("default/frontend").pod.ip.to_string(),
        &backend.pod.ip.to_string(),
        "8080/TCP",
    ])?;
    ensure!(
        explained.starts_with("ALLOWED") && explained.contains("default/backend-netpol"),
        "{explained}"
    );
    let explained = node.tern(&[
        "policy",
        "explain",
        &c.pod("default/other").pod.ip.to_string(),
        &backend.pod.ip.to_string(),
        "8080/TCP",
    ])?;
    ensure!(explained.starts_with("DENIED"), "{explained}");
    let list = node.tern(&["policy", "list"])?;
    ensure!(
        list.contains("default/backend-netpol") && list.contains(&backend.pod.ip.to_string()),
        "{list}"
    );
    // Counted per policy: what it allowed and what was denied at its pod.
    let listed: Value = serde_json::from_str(&node.tern(&["policy", "list", "-o", "json"])?)?;
    let counted = &listed["policies"][0];
    ensure!(
        counted["allowed"].as_u64() > Some(0) && counted["denied"].as_u64() > Some(0),
        "{listed}"
    );
    Ok(())
}

/// A client pod on node 1 and a server pod on node 2.
fn client_and_server(mode: &str) -> Result<Cluster> {
    let no_labels: &[(&str, &str)] = &[];
    Cluster::new(
        mode,
        true,
        &[("default", no_labels)],
        &[
            ("default", "client", &[("app", "client")], &[8080]),
            ("default", "server", &[("app", "server")], &[8080, 8081]),
        ],
        &[],
    )
}

/// Waits until the node of pod `to` explains `from` -> `to`:8080/TCP as
/// `verdict` ("ALLOWED" / "DENIED"): the policy is in that node's maps.
fn wait_for_verdict(c: &Cluster, from: &str, to: &str, verdict: &str) -> Result<()> {
    let to = c.pod(to);
    let node = &c.nodes[to.node];
    let deadline = Instant::now() + SETTLE;
    loop {
        let explained = node.tern(&[
            "policy",
            "explain",
            &c.pod(from).pod.ip.to_string(),
            &to.pod.ip.to_string(),
            "8080/TCP",
        ])?;
        if explained.starts_with(verdict) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("still not {verdict}: {explained}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Decided and documented: a policy change applies to established
/// connections too — each is judged again, under the new policy, at its
/// next packet. A connection the new policy denies stops; the node's own
/// connections (kubelet probes) are never denied.
fn established_connections_are_judged_again_when_policy_changes(mode: &str) -> Result<()> {
    let c = client_and_server(mode)?;
    let server = c.pod("default/server");
    let to = SocketAddr::from((server.pod.ip, 8080));
    let mut open = tcp_connect_from(&c.pod("default/client").pod.ns, 0, to, PROBE)?;
    open.set_read_timeout(Some(PROBE))?;
    ensure!(exchange(&mut open), "no echo before any policy");
    c.set_policies(&policy(
        "default",
        "deny-all",
        "  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress, Egress]",
    ))?;
    wait_for_verdict(&c, "default/client", "default/server", "DENIED")?;
    let node = &c.nodes[server.node];
    let denied_before = node.counter("policy_denied_ingress")?;
    ensure!(
        !exchange(&mut open),
        "the established connection still passes under deny-all"
    );
    ensure!(node.counter("policy_denied_ingress")? > denied_before);
    ensure!(
        !probe(&c.pod("default/client").pod.ns, to, Proto::Tcp),
        "a new connection passes under deny-all"
    );
    // The server's own node still reaches it (and gets its answers).
    ensure!(
        probe(&node.ns, to, Proto::Tcp),
        "the node's probe was denied"
    );
    c.set_policies("")?;
    wait_for_verdict(&c, "default/client", "default/server", "ALLOWED")?;
    ensure!(probe(&c.pod("default/client").pod.ns, to, Proto::Tcp));
    Ok(())
}

/// A NodePort with externalTrafficPolicy Local keeps the outside client's
/// address: an ipBlock decides whether it gets in. A pod reaching itself
/// through its own Service (hairpin) is allowed under deny-all.
fn node_port_from_outside_and_hairpin_under_policy(mode: &str) -> Result<()> {
    let c = client_and_server(mode)?;
    let server = c.pod("default/server");
    let node = &c.nodes[server.node];
    let outside = c._lab.external_client(Ipv4Addr::new(10, 0, 0, 100))?;
    c.write_all(
        "service.yaml",
        &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.40
  externalTrafficPolicy: Local
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- addresses: [\"{}\"]
  conditions: {{ready: true}}
  nodeName: {}
",
            server.pod.ip, node.name
        ),
    )?;
    let backend = format!("{}:8080", server.pod.ip);
    node.wait_for_frontend(&format!("{}:30080/TCP", node.node_ip), Some(&[&backend]))?;
    let node_port = SocketAddr::from((node.node_ip, 30080));
    ensure!(probe(&outside, node_port, Proto::Tcp), "no policy yet");
    let only_from = |cidr: &str| {
        policy(
            "default",
            "outside-only",
            &format!(
                "  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: {cidr}}}}}]"
            ),
        )
    };
    c.set_policies(&only_from("10.0.0.100/32"))?;
    wait_for_verdict(&c, "default/client", "default/server", "DENIED")?;
    ensure!(
        probe(&outside, node_port, Proto::Tcp),
        "the allowed outside client was denied"
    );
    c.set_policies(&only_from("10.0.0.200/32"))?;
    let deadline = Instant::now() + SETTLE;
    while probe(&outside, node_port, Proto::Tcp) {
        if Instant::now() > deadline {
            bail!("an outside client outside the ipBlock still gets in");
        }
    }
    c.set_policies(&policy(
        "default",
        "deny-all",
        "  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress, Egress]",
    ))?;
    wait_for_verdict(&c, "default/client", "default/server", "DENIED")?;
    let own_service = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 40), 80));
    ensure!(
        probe(&server.pod.ns, own_service, Proto::Tcp),
        "the pod could not reach itself through its Service"
    );
    Ok(())
}

/// One line echoed (whole) within the probe time.
fn exchange(stream: &mut std::net::TcpStream) -> bool {
    tcp_exchange(stream, "still there?").is_ok_and(|echo| echo.ends_with("still there?"))
}

/// POLICY holds 4 entries on the server's node: a policy that needs more
/// leaves the server denying all ingress (fail closed), says so in `tern
/// status` and the metrics, and recovers once the policy fits.
fn a_policy_that_does_not_fit_its_map_fails_closed(mode: &str) -> Result<()> {
    let mut c = client_and_server(mode)?;
    let server_node = c.pod("default/server").node;
    let node = &mut c.nodes[server_node];
    node.kill_agent()?;
    node.extra_args = vec!["--map-size".into(), "POLICY=4".into()];
    node.start_agent()?;
    c.wait_for_identities()?;
    let server = c.pod("default/server");
    let to = SocketAddr::from((server.pod.ip, 8080));
    let client = &c.pod("default/client").pod.ns;
    let ports: Vec<String> = (8080..8090).map(|p| format!("{{port: {p}}}")).collect();
    c.set_policies(&policy(
        "default",
        "many-ports",
        &format!(
            "  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{}]",
            ports.join(", ")
        ),
    ))?;
    let node = &c.nodes[server_node];
    let deadline = Instant::now() + SETTLE;
    let status = loop {
        let status = node.tern(&["status"])?;
        if status.contains("policy FAILED CLOSED") {
            break status;
        }
        if Instant::now() > deadline {
            bail!("no failure shown: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(status.contains(&server.pod.ip.to_string()), "{status}");
    ensure!(
        !probe(client, to, Proto::Tcp),
        "allowed although the policy is only partly programmed"
    );
    let (_, metrics) = agent_http_get(&node.ns, "/metrics")?;
    ensure!(
        metrics.contains("tern_policy_failed_closed_pods 1"),
        "{metrics}"
    );
    c.set_policies(&policy(
        "default",
        "many-ports",
        "  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 8080}]",
    ))?;
    let deadline = Instant::now() + SETTLE;
    while !probe(client, to, Proto::Tcp) {
        if Instant::now() > deadline {
            bail!(
                "still denied once the policy fits: {}",
                node.tern(&["status"])?
            );
        }
    }
    ensure!(!node.tern(&["status"])?.contains("FAILED CLOSED"));
    ensure!(!probe(
        client,
        SocketAddr::from((server.pod.ip, 8081)),
        Proto::Tcp
    ));
    Ok(())
}
