//! NodePort, LoadBalancer and externalIPs reached from a client outside the
//! cluster (a lab namespace on the node's underlay), through from_netdev:
//! SNAT to the node with externalTrafficPolicy Cluster, the client's own
//! address and local backends only with Local. Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;
use tern_lab::lab::{Lab, LabNode, Pod};
use tern_lab::netns::Netns;
use tern_lab::skip::require_root;
use tern_lab::traffic::{EchoServer, tcp_roundtrip, udp_roundtrip};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 100);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 5);

struct Setup {
    client: Netns,
    node: LabNode,
    backends: Vec<Pod>,
    _servers: Vec<EchoServer>,
    lab: Lab,
}

fn setup(cidr: &str) -> Result<Setup> {
    setup_with(cidr, true)
}

/// A node on `cidr` (socket-LB on or off), its two backends (b0, b1,
/// echo on 8080) and a client outside the cluster that routes the load
/// balancer and external IPs to the node.
fn setup_with(cidr: &str, socket_lb: bool) -> Result<Setup> {
    let lab = Lab::new()?;
    let node = lab.node_with("n1", cidr, NODE_IP, socket_lb)?;
    let client = lab.external_client(CLIENT_IP)?;
    // The underlay routes LoadBalancer and external IPs to the node.
    client.sh(&format!(
        "ip route add {LB_IP}/32 via {NODE_IP}\nip route add {EXTERNAL_IP}/32 via {NODE_IP}"
    ))?;
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for i in 0..2 {
        let pod = node.add_pod(&format!("b{i}"))?;
        servers.push(EchoServer::start(&pod.ns, 8080, &format!("b{i}"))?);
        backends.push(pod);
    }
    Ok(Setup {
        client,
        node,
        backends,
        _servers: servers,
        lab,
    })
}

fn manifest(policy: &str, backends: &[&Pod], remote: Option<Ipv4Addr>) -> String {
    let mut endpoints = String::new();
    for pod in backends {
        endpoints.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: n1\n  conditions: {{ready: true}}\n",
            pod.ip
        ));
    }
    if let Some(ip) = remote {
        endpoints.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  nodeName: n2\n  conditions: {{ready: true}}\n"
        ));
    }
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalIPs: [\"{EXTERNAL_IP}\"]
  externalTrafficPolicy: {policy}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 8080, nodePort: 30053, protocol: UDP}}
status:
  loadBalancer:
    ingress: [{{ip: \"{LB_IP}\"}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 8080, protocol: UDP}}]
endpoints:
{endpoints}"
    )
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn node_port_load_balancer_and_external_ip_with_cluster_policy_snat_to_the_node() -> Result<()> {
    if !require_root("external_cluster_policy") {
        return Ok(());
    }
    let s = setup("10.244.41.0/24")?;
    let b: Vec<&Pod> = s.backends.iter().collect();
    s.node
        .write_manifest("web.yaml", &manifest("Cluster", &b, None))?;
    let want = [format!("{}:8080", b[0].ip), format!("{}:8080", b[1].ip)];
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    for frontend in [
        "10.0.0.11:30080/TCP",
        "10.98.0.100:80/TCP",
        "10.99.0.5:80/TCP",
        "10.0.0.11:30053/UDP",
    ] {
        s.node.wait_for_frontend(frontend, Some(&want))?;
    }
    for (ip, port) in [(NODE_IP, 30080), (LB_IP, 80), (EXTERNAL_IP, 80)] {
        let answer = tcp_roundtrip(&s.client, at(ip, port), "peer?")?;
        let (who, peer) = answer.split_once(':').unwrap();
        assert!(who == "b0" || who == "b1", "{answer}");
        assert_eq!(
            peer,
            NODE_IP.to_string(),
            "{ip}:{port}: Cluster policy SNATs to the node"
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen.insert(tcp_roundtrip(&s.client, at(NODE_IP, 30080), "x")?);
    }
    assert_eq!(
        seen.len(),
        2,
        "NodePort spreads over both backends: {seen:?}"
    );
    let (answer, from) = udp_roundtrip(&s.client, at(NODE_IP, 30053), "peer?")?;
    assert_eq!(
        from,
        at(NODE_IP, 30053),
        "the UDP reply comes from the NodePort"
    );
    assert!(answer.ends_with(&NODE_IP.to_string()), "{answer}");
    assert!(s.node.counter("external_dnat")? >= 34);
    Ok(())
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_local_backends() -> Result<()> {
    if !require_root("external_local_policy") {
        return Ok(());
    }
    let s = setup("10.244.42.0/24")?;
    // b1 is listed as being on another node: Local must not use it.
    let remote = s.backends[1].ip;
    s.node.write_manifest(
        "web.yaml",
        &manifest("Local", &[&s.backends[0]], Some(remote)),
    )?;
    s.node.wait_for_frontend(
        "10.0.0.11:30080/TCP",
        Some(&[&format!("{}:8080", s.backends[0].ip)]),
    )?;
    for (ip, port) in [(NODE_IP, 30080), (LB_IP, 80), (EXTERNAL_IP, 80)] {
        for _ in 0..10 {
            let answer = tcp_roundtrip(&s.client, at(ip, port), "peer?")?;
            assert_eq!(
                answer,
                format!("b0:{CLIENT_IP}"),
                "{ip}:{port}: the client's own address, local backend"
            );
        }
    }
    let (answer, from) = udp_roundtrip(&s.client, at(NODE_IP, 30053), "peer?")?;
    assert_eq!(
        (answer.as_str(), from),
        (format!("b0:{CLIENT_IP}").as_str(), at(NODE_IP, 30053))
    );
    // In-cluster clients of the same frontend still reach every backend
    // (the Internal scope entry).
    let list = s.node.frontends()?;
    assert!(list.iter().any(|f| f["frontend"] == "10.0.0.11:30080/TCP"
        && f["scope"] == "internal"
        && f["backends"].as_array().unwrap().len() == 2));
    // And the datapath finds it: a pod's connections to the NodePort (the
    // per-packet path, from its veth) reach the backend listed on another
    // node too.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let answer = tcp_roundtrip(&s.backends[0].ns, at(NODE_IP, 30080), "x")?;
        seen.insert(
            answer
                .split_once(':')
                .map_or(answer.clone(), |(who, _)| who.to_owned()),
        );
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["b0", "b1"],
        "a pod reaches every backend of an externalTrafficPolicy=Local frontend"
    );
    let ct = s.node.tern(&["ct", "list"])?;
    assert!(ct.contains(&CLIENT_IP.to_string()), "{ct}");
    Ok(())
}

/// The backend's TIME_WAIT sockets (remote ends "ip:port") in `ns`.
fn time_wait_peers(ns: &Netns) -> Result<Vec<String>> {
    Ok(ns
        .sh("ss -tanH state time-wait")?
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect())
}

/// With externalTrafficPolicy Cluster the node keeps a client's port as
/// the SNAT source port when it is free. After a connection the backend
/// closed first, the backend holds TIME_WAIT for node:port for 60 s, and
/// another client's connection given that same tuple carries other TCP
/// timestamps: the backend refuses its SYN (PAWS) and the client waits a
/// second or more for a retry (seen 1 in ~7 000 NodePort connections in
/// tests/tests/restarts.rs). The tuple must stay taken that long, not just
/// for the 10 s a closed flow is still translated.
#[test]
fn a_node_port_snat_tuple_is_not_reused_while_the_backend_holds_time_wait() -> Result<()> {
    if !require_root("snat_time_wait") {
        return Ok(());
    }
    let s = setup("10.244.47.0/24")?;
    let b0 = &s.backends[0];
    s.node
        .write_manifest("web.yaml", &manifest("Cluster", &[b0], None))?;
    s.node
        .wait_for_frontend("10.0.0.11:30080/TCP", Some(&[&format!("{}:8080", b0.ip)]))?;
    let second = s.lab.external_client(Ipv4Addr::new(10, 0, 0, 101))?;
    const PORT: u16 = 40_777;
    let close_first = |ns: &Netns| -> Result<()> {
        let mut conn = tern_lab::traffic::tcp_connect_from(
            ns,
            PORT,
            at(NODE_IP, 30080),
            std::time::Duration::from_millis(900),
        )?;
        tern_lab::traffic::tcp_exchange(&mut conn, "close?")?;
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut conn, &mut rest)?;
        Ok(())
    };
    close_first(&s.client)?;
    let first = format!("{NODE_IP}:{PORT}");
    anyhow::ensure!(
        time_wait_peers(&b0.ns)? == [first.clone()],
        "the backend holds no TIME_WAIT for {first}: {:?}",
        time_wait_peers(&b0.ns)?
    );
    // Past the 10 s a closed flow is translated (and the agent's next
    // garbage collection), within the backend's 60 s of TIME_WAIT.
    std::thread::sleep(std::time::Duration::from_secs(12));
    // Connects at once (the SYN is not refused), from another tuple.
    close_first(&second)?;
    let peers = time_wait_peers(&b0.ns)?;
    anyhow::ensure!(
        peers.len() == 2 && peers.contains(&first),
        "the second client's connection was given the tuple the backend still holds: {peers:?}"
    );
    Ok(())
}

#[test]
fn node_port_without_backends_is_refused_from_outside() -> Result<()> {
    if !require_root("external_refused") {
        return Ok(());
    }
    let s = setup("10.244.43.0/24")?;
    s.node
        .write_manifest("web.yaml", &manifest("Cluster", &[], None))?;
    s.node.wait_for_frontend("10.0.0.11:30080/TCP", Some(&[]))?;
    let started = std::time::Instant::now();
    let err = s
        .client
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &at(NODE_IP, 30080),
                std::time::Duration::from_secs(3),
            )
        })
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

tern_lab::both_service_paths!(
    socket_lb: true, per_packet: false;
    load_balancer_and_external_ips_from_pods_inside_the_cluster,
    load_balancer_source_ranges_admit_only_their_clients,
);

#[test]
fn session_affinity_and_publish_not_ready_addresses_from_outside() -> Result<()> {
    if !require_root("session_affinity_and_publish_not_ready_addresses_from_outside") {
        return Ok(());
    }
    let s = setup("10.244.46.0/24")?;
    let b: Vec<&Pod> = s.backends.iter().collect();
    let who = |to: SocketAddr| -> Result<String> {
        let answer = tcp_roundtrip(&s.client, to, "who")?;
        Ok(answer.split(':').next().unwrap_or_default().to_owned())
    };
    let spread = |to: SocketAddr| -> Result<std::collections::BTreeSet<String>> {
        (0..24).map(|_| who(to)).collect()
    };
    // sessionAffinity ClientIP holds on the NodePort and the load
    // balancer address too (kube-proxy applies it to every frontend).
    let sticky = manifest("Cluster", &b, None).replace(
        "  externalTrafficPolicy: Cluster\n",
        "  externalTrafficPolicy: Cluster\n  sessionAffinity: ClientIP\n",
    );
    s.node.write_manifest("web.yaml", &sticky)?;
    let want = [format!("{}:8080", b[0].ip), format!("{}:8080", b[1].ip)];
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    s.node
        .wait_for_frontend("10.0.0.11:30080/TCP", Some(&want))?;
    for to in [at(NODE_IP, 30080), at(LB_IP, 80)] {
        let seen = spread(to)?;
        assert_eq!(seen.len(), 1, "{to}: affinity did not hold: {seen:?}");
    }
    // A not-ready endpoint: left out, unless publishNotReadyAddresses.
    let not_ready = manifest("Cluster", &b, None).replacen(
        "conditions: {ready: true}",
        "conditions: {ready: false}",
        1,
    );
    s.node.write_manifest("web.yaml", &not_ready)?;
    s.node
        .wait_for_frontend("10.0.0.11:30080/TCP", Some(&[&format!("{}:8080", b[1].ip)]))?;
    assert_eq!(
        spread(at(NODE_IP, 30080))?.into_iter().collect::<Vec<_>>(),
        ["b1"]
    );
    let published = not_ready.replace(
        "  externalTrafficPolicy: Cluster\n",
        "  externalTrafficPolicy: Cluster\n  publishNotReadyAddresses: true\n",
    );
    s.node.write_manifest("web.yaml", &published)?;
    s.node
        .wait_for_frontend("10.0.0.11:30080/TCP", Some(&want))?;
    assert_eq!(spread(at(NODE_IP, 30080))?.len(), 2, "both endpoints serve");
    Ok(())
}

/// kube-proxy short-circuits a Service's LoadBalancer ingress and external
/// IPs for traffic from inside the cluster: pods reach the backends
/// directly, keeping their own address, a backend reaching itself
/// included (hairpin); an ingress with ipMode Proxy is the load
/// balancer's to serve, not the node's.
fn load_balancer_and_external_ips_from_pods_inside_the_cluster(socket_lb: bool) -> Result<()> {
    let cidr = if socket_lb {
        "10.244.42.0/24"
    } else {
        "10.244.43.0/24"
    };
    let Setup { node, backends, .. } = &setup_with(cidr, socket_lb)?;
    let client = node.add_pod("client")?;
    let b: Vec<&Pod> = backends.iter().collect();
    let proxied = Ipv4Addr::new(10, 98, 0, 101);
    let yaml = manifest("Cluster", &b, None).replace(
        &format!("ingress: [{{ip: \"{LB_IP}\"}}]"),
        &format!("ingress: [{{ip: \"{LB_IP}\"}}, {{ip: \"{proxied}\", ipMode: Proxy}}]"),
    );
    node.write_manifest("web.yaml", &yaml)?;
    let want = [format!("{}:8080", b[0].ip), format!("{}:8080", b[1].ip)];
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    node.wait_for_frontend(&format!("{LB_IP}:80/TCP"), Some(&want))?;
    node.wait_for_frontend(&format!("{EXTERNAL_IP}:80/TCP"), Some(&want))?;
    node.wait_for_frontend(&format!("{proxied}:80/TCP"), None)?;
    let _pods = socket_lb.then(|| node.enter_pods_cgroup()).transpose()?;
    for ip in [LB_IP, EXTERNAL_IP] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let answer = tcp_roundtrip(&client.ns, at(ip, 80), "peer?")?;
            let (who, peer) = answer.split_once(':').unwrap();
            assert_eq!(
                peer,
                client.ip.to_string(),
                "{ip}: no SNAT inside the cluster"
            );
            seen.insert(who.to_owned());
        }
        assert_eq!(seen.len(), 2, "{ip}: both backends serve pods: {seen:?}");
        // A backend reaching its own Service through that address: every
        // attempt is answered, by itself too.
        let mut by_itself = false;
        for _ in 0..20 {
            let answer = tcp_roundtrip(&b[0].ns, at(ip, 80), "peer?")?;
            by_itself |= answer.starts_with("b0:");
        }
        assert!(by_itself, "{ip}: b0 never reached itself (hairpin)");
    }
    Ok(())
}

/// `loadBalancerSourceRanges` as kube-proxy applies them: the load
/// balancer's address serves clients in the ranges and drops the others
/// (counted by reason), from outside and from pods alike; the NodePort is
/// not guarded (a balancer sending to NodePorts hides the client).
fn load_balancer_source_ranges_admit_only_their_clients(socket_lb: bool) -> Result<()> {
    let cidr = if socket_lb {
        "10.244.44.0/24"
    } else {
        "10.244.45.0/24"
    };
    let s = setup_with(cidr, socket_lb)?;
    let (node, backend, allowed) = (&s.node, &s.backends[0], &s.client);
    let pod = node.add_pod("client")?;
    let denied = s.lab.external_client(Ipv4Addr::new(10, 0, 0, 101))?;
    denied.sh(&format!("ip route add {LB_IP}/32 via {NODE_IP}"))?;
    let yaml = manifest("Cluster", &[backend], None).replace(
        "  externalTrafficPolicy: Cluster\n",
        &format!(
            "  externalTrafficPolicy: Cluster\n  loadBalancerSourceRanges: [\"{CLIENT_IP}/32\"]\n"
        ),
    );
    node.write_manifest("web.yaml", &yaml)?;
    let want = format!("{}:8080", backend.ip);
    node.wait_for_frontend(&format!("{LB_IP}:80/TCP"), Some(&[&want]))?;
    let reached = |ns: &Netns, to: SocketAddr| {
        tern_lab::traffic::tcp_connect_from(ns, 0, to, std::time::Duration::from_millis(700))
            .is_ok()
    };
    // Clients outside the cluster first: this process is no pod yet.
    assert!(
        reached(allowed, at(LB_IP, 80)),
        "a client in the range is not served"
    );
    assert!(
        !reached(&denied, at(LB_IP, 80)),
        "a client outside the range is served"
    );
    assert!(
        reached(&denied, at(NODE_IP, 30080)),
        "the NodePort is not guarded"
    );
    let _pods = socket_lb.then(|| node.enter_pods_cgroup()).transpose()?;
    assert!(
        !reached(&pod.ns, at(LB_IP, 80)),
        "a pod outside the range is served"
    );
    let (_, metrics) = tern_lab::traffic::agent_http_get(&node.ns, "/metrics")?;
    for direction in ["ingress", "egress"] {
        let series = format!(
            "tern_drops_total{{reason=\"source_range_denied\",direction=\"{direction}\"}} "
        );
        let count: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(count >= 1.0, "{series}: {count}");
    }
    // Widened to every client: the pod gets through too.
    node.write_manifest(
        "web.yaml",
        &yaml.replace(&format!("{CLIENT_IP}/32"), "0.0.0.0/0"),
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !reached(&pod.ns, at(LB_IP, 80)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the widened range never served the pod"
        );
    }
    Ok(())
}
