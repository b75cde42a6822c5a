//! kube-proxy's health endpoints as cloud load balancers probe them, from
//! a client outside the cluster: a LoadBalancer Service with
//! externalTrafficPolicy Local and a healthCheckNodePort answers 200 with
//! its local endpoint count on a node that has one, 503 elsewhere; the
//! node's proxy health on port 10256 (/healthz, /livez) says whether the
//! node may take traffic. Real agents on two lab nodes. Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;
use tern_lab::lab::{Lab, NODES_MANIFEST};
use tern_lab::netns::Netns;
use tern_lab::skip::require_root;
use tern_lab::traffic::{EchoServer, http_get};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const HEALTH_PORT: u16 = 32100;
const NODES: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)];

fn service(endpoints: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_PORT}
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: {endpoints}
"
    )
}

/// Polls `GET address path` from `client` until `wanted(code, body)`.
fn wait_for(
    client: &Netns,
    address: SocketAddr,
    path: &str,
    wanted: impl Fn(u16, &Value) -> bool,
) -> Result<(u16, Value)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = http_get(client, address, path)
            .and_then(|(code, body)| Ok((code, serde_json::from_str::<Value>(&body)?)));
        match answer {
            Ok((code, body)) if wanted(code, &body) => return Ok((code, body)),
            other if Instant::now() > deadline => {
                bail!("GET {address}{path}: never as wanted, last {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn health_check_node_port_and_proxy_health_answer_as_kube_proxy() -> Result<()> {
    if !require_root("health_check_node_port_and_proxy_health_answer_as_kube_proxy") {
        return Ok(());
    }
    let lab = Lab::new()?;
    let nodes = lab.cluster(2, "overlay")?;
    let client = lab.external_client(CLIENT_IP)?;
    let pod = nodes[0].add_k8s_pod("shop", "web-1")?;
    let _server = EchoServer::start(&pod.ns, 8080, "web-1")?;
    let ready = format!(
        "[{{addresses: [\"{}\"], nodeName: n1, conditions: {{ready: true}}}}]",
        pod.ip
    );
    for node in &nodes {
        node.write_manifest("web.yaml", &service(&ready))?;
    }
    let at = |node: usize, port: u16| SocketAddr::from((NODES[node], port));

    // The node with the endpoint: 200 and its count; the other: 503, 0.
    let (_, body) = wait_for(&client, at(0, HEALTH_PORT), "/", |code, _| code == 200)?;
    assert_eq!(body["localEndpoints"], 1, "{body}");
    assert_eq!(body["service"]["namespace"], "shop", "{body}");
    assert_eq!(body["service"]["name"], "web", "{body}");
    assert_eq!(body["serviceProxyHealthy"], true, "{body}");
    let (_, body) = wait_for(&client, at(1, HEALTH_PORT), "/", |code, _| code == 503)?;
    assert_eq!(body["localEndpoints"], 0, "{body}");
    assert_eq!(body["serviceProxyHealthy"], true, "{body}");

    // The proxy's own health: both nodes serve and are eligible.
    for node in 0..2 {
        let (_, body) = wait_for(&client, at(node, 10256), "/healthz", |code, _| code == 200)?;
        assert_eq!(body["nodeEligible"], true, "{body}");
        assert!(
            body["lastUpdated"].is_string() && body["currentTime"].is_string(),
            "{body}"
        );
        wait_for(&client, at(node, 10256), "/livez", |code, _| code == 200)?;
    }
    // n2 about to be removed by the autoscaler: not eligible, still live.
    let nodes_yaml = std::fs::read_to_string(nodes[0].manifests_dir.join(NODES_MANIFEST))?;
    let tainted = nodes_yaml.replacen(
        "metadata: {name: n2}\nspec: {",
        "metadata: {name: n2}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}], ",
        1,
    );
    assert_ne!(tainted, nodes_yaml, "the taint went nowhere");
    for node in &nodes {
        node.write_manifest(NODES_MANIFEST, &tainted)?;
    }
    let (_, body) = wait_for(&client, at(1, 10256), "/healthz", |code, _| code == 503)?;
    assert_eq!(body["nodeEligible"], false, "{body}");
    wait_for(&client, at(1, 10256), "/livez", |code, _| code == 200)?;
    wait_for(&client, at(0, 10256), "/healthz", |code, _| code == 200)?;

    // The endpoint not ready any more: n1 says 503 too.
    let not_ready = ready.replace("ready: true", "ready: false");
    for node in &nodes {
        node.write_manifest("web.yaml", &service(&not_ready))?;
    }
    let (_, body) = wait_for(&client, at(0, HEALTH_PORT), "/", |code, _| code == 503)?;
    assert_eq!(body["localEndpoints"], 0, "{body}");

    // The Service gone: the port is closed.
    for node in &nodes {
        node.remove_manifest("web.yaml")?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&client, at(0, HEALTH_PORT), "/").is_ok() {
        assert!(
            Instant::now() < deadline,
            "the health check port stayed open"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
