//! Topology-aware routing as kube-proxy reads it: EndpointSlice hints
//! (set by the EndpointSlice controller for `trafficDistribution:
//! PreferClose` and friends) and the Node's zone label keep a pod's
//! Service traffic in its zone; without usable hints every endpoint
//! serves. Real agents on two lab nodes, both Service paths. Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;
use tern_lab::lab::{Lab, NODES_MANIFEST};
use tern_lab::traffic::{EchoServer, tcp_roundtrip};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);

tern_lab::both_service_paths!(
    socket_lb: true, per_packet: false;
    zone_hints_keep_traffic_in_the_zone,
);

fn zone_hints_keep_traffic_in_the_zone(socket_lb: bool) -> Result<()> {
    let lab = Lab::new()?;
    let mut nodes = lab.cluster(2, "overlay")?;
    for node in &mut nodes {
        node.kill_agent()?;
        node.socket_lb = socket_lb;
        node.start_agent()?;
    }
    let zoned = std::fs::read_to_string(nodes[0].manifests_dir.join(NODES_MANIFEST))?
        .replace(
            "metadata: {name: n1}",
            "metadata: {name: n1, labels: {topology.kubernetes.io/zone: zone-a}}",
        )
        .replace(
            "metadata: {name: n2}",
            "metadata: {name: n2, labels: {topology.kubernetes.io/zone: zone-b}}",
        );
    let a = nodes[0].add_pod("a")?;
    let b = nodes[1].add_pod("b")?;
    let client = nodes[0].add_pod("client")?;
    let _servers = [
        EchoServer::start(&a.ns, 8080, "a")?,
        EchoServer::start(&b.ns, 8080, "b")?,
    ];
    let manifest = |hints: bool| {
        let hint = |zone: &str| {
            if hints {
                format!(", hints: {{forZones: [{{name: {zone}}}]}}")
            } else {
                String::new()
            }
        };
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
  trafficDistribution: PreferClose
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: [\"{}\"], nodeName: n1, conditions: {{ready: true}}{}}}
- {{addresses: [\"{}\"], nodeName: n2, conditions: {{ready: true}}{}}}
",
            a.ip,
            hint("zone-a"),
            b.ip,
            hint("zone-b")
        )
    };
    for node in &nodes {
        node.write_manifest(NODES_MANIFEST, &zoned)?;
        node.write_manifest("web.yaml", &manifest(true))?;
    }
    nodes[0].wait_for_frontend(&format!("{VIP}:80/TCP"), Some(&[&format!("{}:8080", a.ip)]))?;
    nodes[1].wait_for_frontend(&format!("{VIP}:80/TCP"), Some(&[&format!("{}:8080", b.ip)]))?;
    let _pods = socket_lb
        .then(|| nodes[0].enter_pods_cgroup())
        .transpose()?;
    let spread = || -> Result<BTreeSet<String>> {
        (0..20)
            .map(|_| {
                let answer = tcp_roundtrip(&client.ns, SocketAddr::from((VIP, 80)), "who")?;
                Ok(answer.split(':').next().unwrap_or_default().to_owned())
            })
            .collect()
    };
    assert_eq!(
        spread()?.into_iter().collect::<Vec<_>>(),
        ["a"],
        "zone-a's client stays in zone-a"
    );
    // Hints gone: every endpoint serves again.
    for node in &nodes {
        node.write_manifest("web.yaml", &manifest(false))?;
    }
    let both = [format!("{}:8080", a.ip), format!("{}:8080", b.ip)];
    let both: Vec<&str> = both.iter().map(String::as_str).collect();
    nodes[0].wait_for_frontend(&format!("{VIP}:80/TCP"), Some(&both))?;
    assert_eq!(spread()?.len(), 2);
    Ok(())
}
