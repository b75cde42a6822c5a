//! Pods on different nodes, in both routing modes: overlay (VXLAN, the
//! eBPF programs encapsulate) and native (routes via the nodes). Real
//! agents on a lab underlay, real traffic. Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tern_lab::lab::{Lab, LabNode, NODES_MANIFEST, OUTSIDE_IP, Pod, nodes_manifest};
use tern_lab::netns::Netns;
use tern_lab::traffic::{
    EchoServer, IO_TIMEOUT, icmp_echo, tcp_connect, tcp_roundtrip, udp_roundtrip,
};

const PORT: u16 = 8080;
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

tern_lab::both_routing_modes!(
    pods_on_two_nodes_talk_with_their_own_addresses,
    cluster_ip_with_only_remote_backends,
    node_port_from_outside_reaches_a_backend_on_another_node,
    a_removed_node_stops_being_reachable,
    pod_traffic_leaving_the_cluster_is_masqueraded,
);

/// Two nodes with one pod each, both pods serving echo on PORT.
struct TwoNodes {
    nodes: Vec<LabNode>,
    pods: Vec<Pod>,
    _servers: Vec<EchoServer>,
    lab: Lab,
}

fn two_nodes(mode: &str) -> Result<TwoNodes> {
    let lab = Lab::new()?;
    let nodes = lab.cluster(2, mode)?;
    let mut pods = Vec::new();
    let mut servers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let pod = node.add_pod(&format!("p{}", i + 1))?;
        servers.push(EchoServer::start(&pod.ns, PORT, &format!("p{}", i + 1))?);
        pods.push(pod);
    }
    Ok(TwoNodes {
        nodes,
        pods,
        _servers: servers,
        lab,
    })
}

fn pods_on_two_nodes_talk_with_their_own_addresses(mode: &str) -> Result<()> {
    let c = two_nodes(mode)?;
    let (p1, p2) = (&c.pods[0], &c.pods[1]);
    assert!(
        p1.ip.octets()[2] == 1 && p2.ip.octets()[2] == 2,
        "{} {}",
        p1.ip,
        p2.ip
    );
    for (from, to, name) in [(p1, p2, "p2"), (p2, p1, "p1")] {
        let at = SocketAddr::from((to.ip, PORT));
        // The far pod sees the near pod's own address: no NAT between pods.
        let seen = tcp_roundtrip(&from.ns, at, "peer?")?;
        assert_eq!(
            seen,
            format!("{name}:{}", from.ip),
            "TCP {} -> {}",
            from.ip,
            to.ip
        );
        let (seen, answered_from) = udp_roundtrip(&from.ns, at, "peer?")?;
        assert_eq!(
            seen,
            format!("{name}:{}", from.ip),
            "UDP {} -> {}",
            from.ip,
            to.ip
        );
        assert_eq!(answered_from, at);
    }
    let n1 = &c.nodes[0];
    // The node itself (a hostNetwork pod, kubelet) reaches the far pod too.
    let at = SocketAddr::from((p2.ip, PORT));
    assert_eq!(
        tcp_roundtrip(&n1.ns, at, "peer?")?,
        format!("p2:{}", n1.node_ip)
    );
    match mode {
        "overlay" => {
            assert!(n1.counter("encap_overlay")? >= 2, "n1 never encapsulated");
            let routes = n1.ns.sh("ip route show proto 0x74")?;
            assert!(routes.contains("10.244.2.0/24 dev tern_vxlan"), "{routes}");
            let tunnel = n1.tern(&["tunnel", "list", "-o", "json"])?;
            assert!(
                tunnel.contains("\"10.244.2.0/24\"") && tunnel.contains("\"10.0.0.2\""),
                "{tunnel}"
            );
            // The far node by its FDB entry, which keeps the outer route
            // cached (no per-packet tunnel key: not an external device).
            let fdb = n1.ns.sh("bridge fdb show dev tern_vxlan")?;
            assert!(fdb.contains("0e:74:0a:00:00:02 dst 10.0.0.2 "), "{fdb}");
            let device = n1.ns.sh("ip -d link show tern_vxlan")?;
            assert!(
                device.contains("vxlan id 1 ") && !device.contains("external"),
                "{device}"
            );
            // Pods fit in the overlay: 1500 on the underlay - 50 of VXLAN.
            // (Not /sys: sysfs shows the namespace that mounted it.)
            let link = p1.ns.sh("ip -o link show eth0")?;
            assert!(link.contains(" mtu 1450 "), "{link}");
            large_transfer(&p1.ns, SocketAddr::from((p2.ip, PORT)))?;
        }
        _ => {
            let routes = n1.ns.sh("ip route show proto 0x74")?;
            assert!(
                routes.contains("10.244.2.0/24 via 10.0.0.2 dev eth0"),
                "{routes}"
            );
            assert!(routes.contains("unreachable 10.244.0.0/16"), "{routes}");
            assert_eq!(n1.counter("encap_overlay")?, 0);
            // Forwarded by the eBPF FIB lookup, not the node's stack.
            assert!(
                n1.counter("redirect_fib")? >= 2,
                "n1 never used the FIB redirect"
            );
        }
    }
    Ok(())
}

/// 10 MB through the far pod's echo and back, byte for byte: no
/// fragmentation trouble and no MTU black hole on the way.
fn large_transfer(ns: &Netns, to: SocketAddr) -> Result<()> {
    let payload: Vec<u8> = (0..10_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut conn = tcp_connect(ns, to)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = conn.try_clone()?;
    let sent = payload.clone();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&sent)?;
        writer.write_all(b"\n")
    });
    let mut echoed = Vec::with_capacity(payload.len() + 8);
    let mut buf = [0u8; 65536];
    while !echoed.ends_with(b"\n") {
        let n = conn.read(&mut buf).context("reading the echo of 10 MB")?;
        ensure!(n > 0, "connection closed after {} bytes", echoed.len());
        echoed.extend_from_slice(&buf[..n]);
    }
    sender.join().expect("sender thread")?;
    let body = echoed
        .strip_prefix(b"p2:")
        .context("echo without the server's prefix")?;
    ensure!(
        body[..body.len() - 1] == payload[..],
        "10 MB came back as {} different bytes",
        body.len() - 1
    );
    Ok(())
}

fn service_manifest(kind_spec: &str, backend: &Pod, node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: 10.96.0.20
{kind_spec}
  ports:
  - {{name: http, port: 80, targetPort: {PORT}, nodePort: 30080, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: {PORT}, protocol: TCP}}]
endpoints:
- addresses: [\"{}\"]
  nodeName: {node}
  conditions: {{ready: true}}
",
        backend.ip
    )
}

fn cluster_ip_with_only_remote_backends(mode: &str) -> Result<()> {
    let mut c = two_nodes(mode)?;
    // The per-packet path in overlay mode (replies come back through the
    // overlay and are translated there), socket-LB in native mode.
    if mode == "overlay" {
        c.nodes[0].kill_agent()?;
        c.nodes[0].socket_lb = false;
        c.nodes[0].start_agent()?;
    }
    let yaml = service_manifest("", &c.pods[1], "n2");
    for node in &c.nodes {
        node.write_manifest("web.yaml", &yaml)?;
    }
    let backend = format!("{}:{PORT}", c.pods[1].ip);
    c.nodes[0].wait_for_frontend("10.96.0.20:80/TCP", Some(&[&backend]))?;
    let _pods = c.nodes[0].enter_pods_cgroup()?;
    let vip = SocketAddr::from(([10, 96, 0, 20], 80));
    for _ in 0..5 {
        let conn = tcp_connect(&c.pods[0].ns, vip)?;
        assert_eq!(
            conn.peer_addr()?,
            vip,
            "the client sees the Service address"
        );
        drop(conn);
        assert_eq!(
            tcp_roundtrip(&c.pods[0].ns, vip, "peer?")?,
            format!("p2:{}", c.pods[0].ip),
            "the remote backend sees the client pod's own address"
        );
    }
    let counter = if mode == "overlay" {
        "lb_dnat"
    } else {
        "sock_lb_translated"
    };
    assert!(c.nodes[0].counter(counter)? >= 5, "{counter} did not count");
    Ok(())
}

fn node_port_from_outside_reaches_a_backend_on_another_node(mode: &str) -> Result<()> {
    let c = two_nodes(mode)?;
    let client = c.lab.external_client(CLIENT_IP)?;
    let backend = format!("{}:{PORT}", c.pods[1].ip);
    for policy in ["Cluster", "Local"] {
        let yaml = service_manifest(
            &format!("  type: NodePort\n  externalTrafficPolicy: {policy}"),
            &c.pods[1],
            "n2",
        );
        for node in &c.nodes {
            node.write_manifest("web.yaml", &yaml)?;
        }
        let want: &[&str] = if policy == "Cluster" {
            &[&backend]
        } else {
            &[]
        };
        c.nodes[0].wait_for_frontend("10.0.0.1:30080/TCP", Some(want))?;
        c.nodes[1].wait_for_frontend("10.0.0.2:30080/TCP", Some(&[&backend]))?;
        let via_n1 = SocketAddr::from(([10, 0, 0, 1], 30080));
        let via_n2 = SocketAddr::from(([10, 0, 0, 2], 30080));
        if policy == "Cluster" {
            // n1 has no backend of its own: SNAT to n1, so the reply comes
            // back through it.
            assert_eq!(tcp_roundtrip(&client, via_n1, "peer?")?, "p2:10.0.0.1");
            assert_eq!(tcp_roundtrip(&client, via_n2, "peer?")?, "p2:10.0.0.2");
        } else {
            // Local: the node with the backend keeps the client's address;
            // the one without refuses.
            assert_eq!(
                tcp_roundtrip(&client, via_n2, "peer?")?,
                format!("p2:{CLIENT_IP}")
            );
            assert!(
                tcp_roundtrip(&client, via_n1, "peer?").is_err(),
                "n1 has no local backend and must not serve with Local"
            );
        }
    }
    Ok(())
}

fn a_removed_node_stops_being_reachable(mode: &str) -> Result<()> {
    let c = two_nodes(mode)?;
    let (p1, p2) = (&c.pods[0], &c.pods[1]);
    let at = SocketAddr::from((p2.ip, PORT));
    tcp_roundtrip(&p1.ns, at, "hello")?;
    let n1 = &c.nodes[0];
    // n2 leaves the cluster: only n1 is left in n1's Node objects.
    n1.write_manifest(
        NODES_MANIFEST,
        &nodes_manifest(&[("n1".into(), n1.node_ip, "10.244.1.0/24".into())]),
    )?;
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let gone = match mode {
            "overlay" => {
                !n1.tern(&["tunnel", "list"])?.contains("10.244.2.0/24")
                    && !n1
                        .ns
                        .sh("bridge fdb show dev tern_vxlan")?
                        .contains("dst 10.0.0.2")
            }
            _ => !n1
                .ns
                .sh("ip route show proto 0x74")?
                .contains("10.244.2.0/24"),
        };
        if gone {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "n2's entries still on n1 after 1 s:\n{}",
                n1.agent_log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Fails at once (the rest of the cluster CIDR is unreachable), not
    // after a connect timeout.
    let started = Instant::now();
    let refused = tcp_roundtrip(&p1.ns, at, "hello");
    assert!(refused.is_err(), "n2's pod still answered");
    assert!(
        started.elapsed() < IO_TIMEOUT / 2,
        "took {:?} to fail",
        started.elapsed()
    );
    Ok(())
}

fn pod_traffic_leaving_the_cluster_is_masqueraded(mode: &str) -> Result<()> {
    let c = two_nodes(mode)?;
    let outside = c.lab.outside()?;
    let _server = EchoServer::start(&outside.host, PORT, "outside")?;
    let at = SocketAddr::from((OUTSIDE_IP, PORT));
    for (pod, node) in c.pods.iter().zip(&c.nodes) {
        // The outside sees the node, and its answers reach the pod.
        for _ in 0..20 {
            assert_eq!(
                tcp_roundtrip(&pod.ns, at, "peer?")?,
                format!("outside:{}", node.node_ip),
                "TCP from {}",
                pod.ip
            );
        }
        let (seen, from) = udp_roundtrip(&pod.ns, at, "peer?")?;
        assert_eq!(
            seen,
            format!("outside:{}", node.node_ip),
            "UDP from {}",
            pod.ip
        );
        assert_eq!(from, at);
        // Ping too: the outside's router knows no pod address, so an echo
        // reply comes back only to the node's.
        icmp_echo(&pod.ns, OUTSIDE_IP, 0x7e57)?;
        assert!(
            node.counter("masquerade")? >= 22,
            "{} masqueraded too little",
            node.name
        );
        assert!(node.counter("masquerade_reply")? >= 22);
        assert_eq!(node.counter("nat_full")?, 0);
    }
    // Pods still see each other's own addresses (no masquerade inside).
    let p2 = SocketAddr::from((c.pods[1].ip, PORT));
    assert_eq!(
        tcp_roundtrip(&c.pods[0].ns, p2, "peer?")?,
        format!("p2:{}", c.pods[0].ip)
    );
    Ok(())
}
