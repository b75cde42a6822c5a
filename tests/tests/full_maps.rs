//! Maps filled on purpose (small `--map-size`): new work is refused and
//! counted by the map that refused it, what is already served keeps
//! working, nothing leaks, and room made later is used without a new
//! event. Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};
use tern_lab::lab::{Lab, LabNode, Pod, pod_ip};
use tern_lab::netns::{Netns, unique_name};
use tern_lab::skip::require_root;
use tern_lab::traffic::{EchoServer, agent_http_get, tcp_connect, tcp_exchange, tcp_roundtrip};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const PORT: u16 = 8080;

/// A node whose agent runs with `map_sizes` ("NAME=entries"), per-packet
/// Service path (no cgroup needed for the client).
fn node(lab: &Lab, cidr: &str, map_sizes: &[&str]) -> Result<LabNode> {
    let mut node = LabNode::create(lab, "n1", Some(cidr), NODE_IP)?;
    node.socket_lb = false;
    for size in map_sizes {
        node.extra_args
            .extend(["--map-size".into(), (*size).into()]);
    }
    node.start_agent()?;
    Ok(node)
}

/// Service `name` on `vip`:80 -> `backends`:PORT, in its own manifest file.
fn service(
    node: &LabNode,
    name: &str,
    vip: Ipv4Addr,
    backends: &[&Pod],
    label: &str,
) -> Result<()> {
    let endpoints: String = backends
        .iter()
        .map(|b| {
            format!(
                "- addresses: [\"{}\"]\n  nodeName: n1\n  conditions: {{ready: true}}\n",
                b.ip
            )
        })
        .collect();
    node.write_manifest(
        &format!("{name}.yaml"),
        &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, labels: {{rev: \"{label}\"}}}}
spec:
  clusterIP: {vip}
  ports: [{{port: 80, targetPort: {PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{port: {PORT}}}]
endpoints:
{endpoints}"
        ),
    )
}

fn status(node: &LabNode) -> Result<Value> {
    node.agent_request(&json!({"op": "status"}))
}

/// Waits until the last Service sync left out exactly `refused` (map ->
/// entries; empty: nothing), as the agent reports it.
fn wait_for_refused(node: &LabNode, refused: Value) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = status(node)?;
        if status["last_sync"]["refused"] == refused {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!(
                "wanted {refused} refused, the agent says {}\n{}",
                status["last_sync"],
                node.agent_log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 7, i)
}

fn frontend(i: u8) -> String {
    format!("{}:80/TCP", vip(i))
}

/// SERVICES holds 8 entries (a one-backend frontend takes two: master and
/// slot), REVNAT 5. Four Services fit; the fifth is refused by SERVICES,
/// named in `tern status` and the metrics, while the four and an open
/// connection keep working. Deleting one lets the fifth in with no other
/// change (the failed sync is retried). Refused attempts leak nothing:
/// after several of them, four new Services fit into the same maps.
#[test]
fn a_full_services_map_refuses_new_frontends_and_keeps_the_others() -> Result<()> {
    if !require_root("full_services_map") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let node = node(&lab, "10.244.61.0/24", &["SERVICES=8", "REVNAT=5"])?;
    let client = node.add_pod("client")?;
    let (pods, _servers) = node.add_echo_pods(1, PORT)?;
    let b0 = format!("{}:{PORT}", pods[0].ip);
    for i in 1..=4 {
        service(&node, &format!("s{i}"), vip(i), &[&pods[0]], "a")?;
    }
    for i in 1..=4 {
        node.wait_for_frontend(&frontend(i), Some(&[&b0]))?;
    }
    wait_for_refused(&node, json!({}))?;
    let mut open = tcp_connect(&client.ns, SocketAddr::from((vip(1), 80)))?;
    assert_eq!(tcp_exchange(&mut open, "before")?, "b0:before");

    service(&node, "s5", vip(5), &[&pods[0]], "a")?;
    wait_for_refused(&node, json!({"SERVICES": 1}))?;
    let shown = node.tern(&["status"])?;
    ensure!(shown.contains("map SERVICES FULL"), "{shown}");
    let (_, metrics) = agent_http_get(&node.ns, "/metrics")?;
    ensure!(
        metrics.contains("tern_service_sync_refused_entries{map=\"SERVICES\"} 1"),
        "{metrics}"
    );
    ensure!(
        node.agent_log_tail().contains("the SERVICES map is full"),
        "{}",
        node.agent_log_tail()
    );
    let listed = node.frontends()?;
    let s5 = listed.iter().find(|f| f["frontend"] == frontend(5));
    ensure!(
        s5.is_some_and(|f| f["flags"]
            .to_string()
            .contains("NOT SERVED: the SERVICES map is full")),
        "the refused frontend is not shown as such: {s5:?}"
    );
    assert!(tcp_roundtrip(&client.ns, SocketAddr::from((vip(5), 80)), "s5").is_err());
    for i in 1..=4 {
        assert_eq!(
            tcp_roundtrip(&client.ns, SocketAddr::from((vip(i), 80)), "x")?,
            "b0:x"
        );
    }
    // More refused attempts: each rewrite of s5 is a sync that tries it.
    for label in ["b", "c"] {
        service(&node, "s5", vip(5), &[&pods[0]], label)?;
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for_refused(&node, json!({"SERVICES": 1}))?;
    assert_eq!(tcp_exchange(&mut open, "while full")?, "b0:while full");

    // Room made: s5 gets in without any change to it.
    node.remove_manifest("s2.yaml")?;
    node.wait_for_frontend(&frontend(5), Some(&[&b0]))?;
    wait_for_refused(&node, json!({}))?;
    ensure!(!node.tern(&["status"])?.contains("FULL"));
    assert_eq!(
        tcp_roundtrip(&client.ns, SocketAddr::from((vip(5), 80)), "in")?,
        "b0:in"
    );
    assert_eq!(tcp_exchange(&mut open, "after")?, "b0:after");

    // Nothing leaked: with everything removed, four new Services fill
    // SERVICES and REVNAT (5) again, none refused.
    for i in [1, 3, 4, 5] {
        node.remove_manifest(&format!("s{i}.yaml"))?;
    }
    for i in [1, 3, 4, 5] {
        node.wait_for_frontend(&frontend(i), None)?;
    }
    for i in 11..=14 {
        service(&node, &format!("s{i}"), vip(i), &[&pods[0]], "a")?;
    }
    for i in 11..=14 {
        node.wait_for_frontend(&frontend(i), Some(&[&b0]))?;
    }
    wait_for_refused(&node, json!({}))?;
    Ok(())
}

/// BACKENDS holds 2 entries: a Service whose backends do not fit is left
/// out (refused by BACKENDS), the one that fits keeps serving, and when a
/// backend is freed the waiting Service gets in on the retry.
#[test]
fn a_full_backends_map_refuses_new_backends_and_keeps_the_others() -> Result<()> {
    if !require_root("full_backends_map") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let node = node(&lab, "10.244.62.0/24", &["BACKENDS=2"])?;
    let client = node.add_pod("client")?;
    let (pods, _servers) = node.add_echo_pods(3, PORT)?;
    let at = |i: usize| format!("{}:{PORT}", pods[i].ip);
    service(&node, "s1", vip(1), &[&pods[0], &pods[1]], "a")?;
    node.wait_for_frontend(&frontend(1), Some(&[&at(0), &at(1)]))?;
    service(&node, "s2", vip(2), &[&pods[2]], "a")?;
    wait_for_refused(&node, json!({"BACKENDS": 1}))?;
    ensure!(node.tern(&["status"])?.contains("map BACKENDS FULL"));
    let shown = node.tern(&["service", "list"])?;
    ensure!(
        shown.contains("NOT SERVED: its backend"),
        "the refused frontend is not shown as such: {shown}"
    );
    assert!(tcp_roundtrip(&client.ns, SocketAddr::from((vip(2), 80)), "s2").is_err());
    let answer = tcp_roundtrip(&client.ns, SocketAddr::from((vip(1), 80)), "s1")?;
    ensure!(answer == "b0:s1" || answer == "b1:s1", "{answer}");

    // s1 gives up b1: its backend entry goes, and the retry writes b2.
    service(&node, "s1", vip(1), &[&pods[0]], "b")?;
    node.wait_for_frontend(&frontend(1), Some(&[&at(0)]))?;
    node.wait_for_frontend(&frontend(2), Some(&[&at(2)]))?;
    wait_for_refused(&node, json!({}))?;
    assert_eq!(
        tcp_roundtrip(&client.ns, SocketAddr::from((vip(2), 80)), "s2")?,
        "b2:s2"
    );
    Ok(())
}

/// Host-side pod veths in the node namespace.
fn host_veths(node: &LabNode) -> Result<usize> {
    Ok(node
        .ns
        .sh("ip -o link show type veth")?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// A pod made by CNI ADD: its netns, container id and address.
type AddedPod = (Netns, String, Ipv4Addr);

/// CNI ADDs of new pods until one is refused (more than `most` fitting
/// fails): the pods that got in (netns, container id, address) and the
/// refused ADD's error message and details.
fn add_until_refused(node: &LabNode, prefix: &str, most: usize) -> Result<(Vec<AddedPod>, String)> {
    let mut pods = Vec::new();
    loop {
        let ns = Netns::new(&format!("{prefix}{}", pods.len()))?;
        let id = unique_name(prefix);
        let out = node.cni("ADD", &id, ns.path(), "1.1.0")?;
        if out.code != Some(0) {
            let error: Value = serde_json::from_str(&out.stdout)?;
            return Ok((pods, format!("{} {}", error["msg"], error["details"])));
        }
        let ip = pod_ip(&out.success_json()?)?;
        pods.push((ns, id, ip));
        ensure!(pods.len() <= most, "more than {most} pods fit");
    }
}

/// ENDPOINTS holds 3 entries: the ADD that finds it full fails with an
/// error naming the map, gives its address back and leaves no veth; the
/// pods already there keep talking; after a DEL the next ADD works.
#[test]
fn a_full_endpoints_map_fails_the_add_cleanly() -> Result<()> {
    if !require_root("full_endpoints_map") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let node = node(&lab, "10.244.63.0/24", &["ENDPOINTS=3"])?;
    let veths_before = host_veths(&node)?;
    let (mut pods, refused) = add_until_refused(&node, "ep", 3)?;
    ensure!(pods.len() >= 2, "fewer than two pods fit: {refused}");
    ensure!(refused.contains("the ENDPOINTS map is full"), "{refused}");
    assert_eq!(
        status(&node)?["allocated"].as_u64(),
        Some(pods.len() as u64),
        "the refused ADD kept its address"
    );
    assert_eq!(
        host_veths(&node)?,
        veths_before + pods.len(),
        "the refused ADD left a veth"
    );
    // The pods in the map still talk to each other.
    let _server = EchoServer::start(&pods[1].0, PORT, "p1")?;
    assert_eq!(
        tcp_roundtrip(&pods[0].0, SocketAddr::from((pods[1].2, PORT)), "hi")?,
        "p1:hi"
    );

    // A DEL makes room: the next ADD works.
    let (ns, id, _) = pods.pop().unwrap();
    let del = node.cni("DEL", &id, ns.path(), "1.1.0")?;
    assert_eq!(del.code, Some(0), "{del:?}");
    let again = Netns::new("ep-again")?;
    let add = node.cni("ADD", &unique_name("ep"), again.path(), "1.1.0")?;
    assert_eq!(add.code, Some(0), "{add:?}");
    Ok(())
}

/// A PodCIDR of 8 addresses (/29: 5 for pods, after the network, gateway
/// and broadcast addresses): the ADD that finds none left fails with an
/// error naming the PodCIDR, keeps no veth, and a DEL makes room again.
#[test]
fn an_exhausted_pod_cidr_fails_the_add_naming_it() -> Result<()> {
    if !require_root("exhausted_pod_cidr") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let node = node(&lab, "10.244.64.0/29", &[])?;
    let veths_before = host_veths(&node)?;
    let (mut pods, refused) = add_until_refused(&node, "x", 5)?;
    ensure!(
        pods.len() == 5,
        "{} pods fit in a /29: {refused}",
        pods.len()
    );
    ensure!(
        refused.contains("no free address left in PodCIDR 10.244.64.0/29"),
        "{refused}"
    );
    assert_eq!(status(&node)?["allocated"].as_u64(), Some(5));
    assert_eq!(
        host_veths(&node)?,
        veths_before + 5,
        "the refused ADD left a veth"
    );
    let (ns, id, _) = pods.pop().unwrap();
    let del = node.cni("DEL", &id, ns.path(), "1.1.0")?;
    assert_eq!(del.code, Some(0), "{del:?}");
    let again = Netns::new("x-again")?;
    let add = node.cni("ADD", &unique_name("x"), again.path(), "1.1.0")?;
    assert_eq!(add.code, Some(0), "{add:?}");
    Ok(())
}
