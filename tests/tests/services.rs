//! Services translated by the eBPF datapath from Service and EndpointSlice
//! manifests the agent watches, with real traffic. Every case runs twice:
//! with socket-LB (the client's process is in the node's pods cgroup) and
//! with the per-packet path only (`--socket-lb false`). Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tern_lab::lab::{Lab, LabNode, Pod};
use tern_lab::skip::require_root;
use tern_lab::traffic::{EchoServer, IO_TIMEOUT, tcp_connect, tcp_exchange, udp_roundtrip};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

struct Cluster {
    node: LabNode,
    client: Pod,
    backends: Vec<Pod>,
    _servers: Vec<EchoServer>,
    _lab: Lab,
}

tern_lab::both_service_paths!(
    socket_lb: super::Path::SocketLb,
    per_packet: super::Path::PerPacket;
    cluster_ip_spreads_over_ready_backends_only,
    multi_port_service_resolves_named_target_ports_per_slice,
    udp_service_answers_from_the_service_address,
    endpoint_changes_steer_new_connections_and_spare_established_ones,
    session_affinity_sticks_expires_and_can_be_switched,
    service_without_endpoints_refuses_at_once_and_deleted_service_is_gone,
    hairpin_internal_traffic_policy_and_maglev,
);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    SocketLb,
    PerPacket,
}

impl Path {
    /// The counter that shows this path translated a connection.
    fn translated_counter(self) -> &'static str {
        match self {
            Path::SocketLb => "sock_lb_translated",
            Path::PerPacket => "lb_dnat",
        }
    }
    fn refused_counter(self) -> &'static str {
        match self {
            Path::SocketLb => "sock_lb_no_backend",
            Path::PerPacket => "lb_reject",
        }
    }
    fn unknown_service_counter(self) -> &'static str {
        match self {
            Path::SocketLb => "sock_lb_unknown_service",
            Path::PerPacket => "lb_reject",
        }
    }
}

/// A node, a client pod and `n` backend pods, each serving `ports` as
/// "b<i>:<line>" echoes.
fn cluster(cidr: &str, n: usize, ports: &[u16], path: Path) -> Result<Cluster> {
    let lab = Lab::new()?;
    let node = lab.node_with("n1", cidr, NODE_IP, path == Path::SocketLb)?;
    let client = node.add_pod("client")?;
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for i in 0..n {
        let pod = node.add_pod(&format!("b{i}"))?;
        for port in ports {
            servers.push(EchoServer::start(&pod.ns, *port, &format!("b{i}"))?);
        }
        backends.push(pod);
    }
    Ok(Cluster {
        node,
        client,
        backends,
        _servers: servers,
        _lab: lab,
    })
}

fn service(name: &str, vip: Ipv4Addr, ports: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  clusterIP: {vip}
  ports: {ports}
{extra_spec}"
    )
}

/// One EndpointSlice; `endpoints` are (ip, ready, serving, terminating, node).
fn slice(
    name: &str,
    service: &str,
    ports: &str,
    endpoints: &[(Ipv4Addr, bool, bool, bool, &str)],
) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  labels:
    kubernetes.io/service-name: {service}
addressType: IPv4
ports: {ports}
endpoints:
"
    );
    for (ip, ready, serving, terminating, node) in endpoints {
        yaml.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
        ));
    }
    if endpoints.is_empty() {
        yaml = yaml.replace("endpoints:\n", "endpoints: []\n");
    }
    yaml
}

fn ready(ip: Ipv4Addr) -> (Ipv4Addr, bool, bool, bool, &'static str) {
    (ip, true, true, false, "n1")
}

/// Which backend answers a new TCP connection to `to` from the client.
fn who_answers(c: &Cluster, to: SocketAddr) -> Result<String> {
    let mut conn = tcp_connect(&c.client.ns, to)?;
    let answer = tcp_exchange(&mut conn, "x")?;
    Ok(answer.trim_end_matches(":x").to_owned())
}

fn spread(c: &Cluster, to: SocketAddr, connections: usize) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for _ in 0..connections {
        *counts.entry(who_answers(c, to)?).or_insert(0) += 1;
    }
    Ok(counts)
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn backend_str(pod: &Pod, port: u16) -> String {
    format!("{}:{port}", pod.ip)
}

fn cluster_ip_spreads_over_ready_backends_only(path: Path) -> Result<()> {
    let c = cluster("10.244.31.0/24", 4, &[8080], path)?;
    let ports = "[{name: http, port: 80, targetPort: 8080}]";
    let b = &c.backends;
    let mut eps: Vec<_> = b[..3].iter().map(|p| ready(p.ip)).collect();
    eps.push((b[3].ip, false, false, false, "n1")); // not ready: never used
    c.node.write_manifest(
        "web.yaml",
        &format!(
            "{}\n---\n{}",
            service("web", VIP, ports, ""),
            slice("web-1", "web", "[{name: http, port: 8080}]", &eps)
        ),
    )?;
    let want: Vec<String> = b[..3].iter().map(|p| backend_str(p, 8080)).collect();
    c.node.wait_for_frontend(
        "10.96.0.10:80/TCP",
        Some(&want.iter().map(String::as_str).collect::<Vec<_>>()),
    )?;

    let _pods = c.node.enter_pods_cgroup()?;
    let conn = tcp_connect(&c.client.ns, at(VIP, 80))?;
    assert_eq!(
        conn.peer_addr()?,
        at(VIP, 80),
        "getpeername shows the Service, not the backend"
    );
    drop(conn);
    let n = 300;
    let counts = spread(&c, at(VIP, 80), n)?;
    // Binomial(300, 1/3): mean 100, sd 8.2; [55, 145] is beyond 5 sd.
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, count) in &counts {
        assert!(backend != "b3", "a not-ready endpoint was used: {counts:?}");
        assert!(
            (55..=145).contains(count),
            "{backend} got {count} of {n}: {counts:?}"
        );
    }
    let translated = c.node.counter(path.translated_counter())?;
    assert!(translated >= n as u64, "socket-LB translated {translated}");
    Ok(())
}

fn multi_port_service_resolves_named_target_ports_per_slice(path: Path) -> Result<()> {
    let c = cluster("10.244.32.0/24", 2, &[8080, 8081, 9100], path)?;
    let ports =
        "[{name: http, port: 80, targetPort: web}, {name: metrics, port: 9090, targetPort: 9100}]";
    // The same port name resolves to 8080 on b0 and 8081 on b1.
    let s1 = slice(
        "m-1",
        "multi",
        "[{name: http, port: 8080}, {name: metrics, port: 9100}]",
        &[ready(c.backends[0].ip)],
    );
    let s2 = slice(
        "m-2",
        "multi",
        "[{name: http, port: 8081}, {name: metrics, port: 9100}]",
        &[ready(c.backends[1].ip)],
    );
    c.node.write_manifest(
        "multi.yaml",
        &format!("{}\n---\n{s1}\n---\n{s2}", service("multi", VIP, ports, "")),
    )?;
    let http = [
        backend_str(&c.backends[0], 8080),
        backend_str(&c.backends[1], 8081),
    ];
    c.node
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&[&http[0], &http[1]]))?;
    let metrics = [
        backend_str(&c.backends[0], 9100),
        backend_str(&c.backends[1], 9100),
    ];
    c.node
        .wait_for_frontend("10.96.0.10:9090/TCP", Some(&[&metrics[0], &metrics[1]]))?;

    let _pods = c.node.enter_pods_cgroup()?;
    let http_spread = spread(&c, at(VIP, 80), 40)?;
    assert_eq!(
        http_spread.keys().collect::<Vec<_>>(),
        ["b0", "b1"],
        "{http_spread:?}"
    );
    let metrics_spread = spread(&c, at(VIP, 9090), 40)?;
    assert_eq!(
        metrics_spread.keys().collect::<Vec<_>>(),
        ["b0", "b1"],
        "{metrics_spread:?}"
    );
    Ok(())
}

fn udp_service_answers_from_the_service_address(path: Path) -> Result<()> {
    let c = cluster("10.244.33.0/24", 2, &[5353], path)?;
    let ports = "[{name: dns, port: 53, targetPort: 5353, protocol: UDP}]";
    let eps: Vec<_> = c.backends.iter().map(|p| ready(p.ip)).collect();
    c.node.write_manifest(
        "dns.yaml",
        &format!(
            "{}\n---\n{}",
            service("dns", VIP, ports, ""),
            slice(
                "dns-1",
                "dns",
                "[{name: dns, port: 5353, protocol: UDP}]",
                &eps
            )
        ),
    )?;
    let want: Vec<String> = c.backends.iter().map(|p| backend_str(p, 5353)).collect();
    c.node
        .wait_for_frontend("10.96.0.10:53/UDP", Some(&[&want[0], &want[1]]))?;

    let _pods = c.node.enter_pods_cgroup()?;
    let mut seen = BTreeMap::new();
    for _ in 0..30 {
        let (answer, from) = udp_roundtrip(&c.client.ns, at(VIP, 53), "q")?;
        assert_eq!(from, at(VIP, 53), "the reply must come from the VIP");
        *seen.entry(answer).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "unconnected UDP spreads too: {seen:?}");
    // Connected UDP: one backend for the socket's life, peer = VIP.
    let socket = c.client.ns.run(|| UdpSocket::bind(("0.0.0.0", 0)))?;
    socket.connect(at(VIP, 53))?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    assert_eq!(socket.peer_addr()?, at(VIP, 53));
    let mut answers = BTreeMap::new();
    for _ in 0..5 {
        socket.send(b"c")?;
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf)?;
        *answers
            .entry(String::from_utf8_lossy(&buf[..n]).into_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(answers.len(), 1, "{answers:?}");
    Ok(())
}

fn endpoint_changes_steer_new_connections_and_spare_established_ones(path: Path) -> Result<()> {
    let c = cluster("10.244.34.0/24", 3, &[8080], path)?;
    let ports = "[{name: http, port: 80, targetPort: 8080}]";
    let sports = "[{name: http, port: 8080}]";
    let svc = service("web", VIP, ports, "");
    let b = &c.backends;
    let write = |eps: &[(Ipv4Addr, bool, bool, bool, &str)]| {
        c.node.write_manifest(
            "web.yaml",
            &format!("{svc}\n---\n{}", slice("web-1", "web", sports, eps)),
        )
    };
    write(&[ready(b[0].ip)])?;
    c.node
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&[&backend_str(&b[0], 8080)]))?;
    let _pods = c.node.enter_pods_cgroup()?;
    let mut established = tcp_connect(&c.client.ns, at(VIP, 80))?;
    assert_eq!(tcp_exchange(&mut established, "1")?, "b0:1");

    // b0 removed, b1 added: new connections go to b1; the open one stays on b0.
    write(&[ready(b[1].ip)])?;
    c.node
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&[&backend_str(&b[1], 8080)]))?;
    assert_eq!(
        spread(&c, at(VIP, 80), 10)?.keys().collect::<Vec<_>>(),
        ["b1"]
    );
    assert_eq!(tcp_exchange(&mut established, "2")?, "b0:2");

    // Nothing ready: terminating-but-serving endpoints take over (b2 only,
    // b0 is terminating and not serving).
    write(&[
        (b[1].ip, false, false, false, "n1"),
        (b[2].ip, false, true, true, "n1"),
        (b[0].ip, false, false, true, "n1"),
    ])?;
    c.node
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&[&backend_str(&b[2], 8080)]))?;
    assert_eq!(
        spread(&c, at(VIP, 80), 10)?.keys().collect::<Vec<_>>(),
        ["b2"]
    );

    // Back to a ready one: terminating endpoints are not used any more.
    write(&[ready(b[1].ip), (b[2].ip, false, true, true, "n1")])?;
    c.node
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&[&backend_str(&b[1], 8080)]))?;
    assert_eq!(
        spread(&c, at(VIP, 80), 10)?.keys().collect::<Vec<_>>(),
        ["b1"]
    );
    assert_eq!(tcp_exchange(&mut established, "3")?, "b0:3");
    Ok(())
}

fn session_affinity_sticks_expires_and_can_be_switched(path: Path) -> Result<()> {
    let c = cluster("10.244.35.0/24", 3, &[8080], path)?;
    let ports = "[{name: http, port: 80, targetPort: 8080}]";
    let eps: Vec<_> = c.backends.iter().map(|p| ready(p.ip)).collect();
    let endpoints = slice("web-1", "web", "[{name: http, port: 8080}]", &eps);
    let affinity = "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 1\n";
    let all: Vec<String> = c.backends.iter().map(|p| backend_str(p, 8080)).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let _pods = c.node.enter_pods_cgroup()?;

    c.node.write_manifest(
        "web.yaml",
        &format!("{}\n---\n{endpoints}", service("web", VIP, ports, affinity)),
    )?;
    wait_for_flag(&c.node, "affinity=1s")?;
    c.node.wait_for_frontend("10.96.0.10:80/TCP", Some(&all))?;
    let sticky = spread(&c, at(VIP, 80), 30)?;
    assert_eq!(
        sticky.len(),
        1,
        "affinity must keep one backend: {sticky:?}"
    );
    let first = sticky.keys().next().unwrap().clone();
    // After the timeout, a new choice is made: within a few expiries it
    // differs (each time with probability 2/3). 1.2 s idle is past the 1 s
    // timeout: an entry kept in whole seconds would often still hold.
    let mut moved = false;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1200));
        if who_answers(&c, at(VIP, 80))? != first {
            moved = true;
            break;
        }
    }
    assert!(moved, "affinity never expired");

    // Switched off: connections spread again.
    c.node.write_manifest(
        "web.yaml",
        &format!("{}\n---\n{endpoints}", service("web", VIP, ports, "")),
    )?;
    wait_for_flag_gone(&c.node, "affinity=1s")?;
    assert!(spread(&c, at(VIP, 80), 30)?.len() > 1);
    // And on again (default timeout 10800 s).
    c.node.write_manifest(
        "web.yaml",
        &format!(
            "{}\n---\n{endpoints}",
            service("web", VIP, ports, "  sessionAffinity: ClientIP\n")
        ),
    )?;
    wait_for_flag(&c.node, "affinity=10800s")?;
    assert_eq!(spread(&c, at(VIP, 80), 30)?.len(), 1);
    Ok(())
}

fn wait_for_flag(node: &LabNode, flag: &str) -> Result<()> {
    wait_until(|| {
        Ok(node.frontends()?.iter().any(|f| {
            f["flags"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == flag))
        }))
    })
    .with_context(|| format!("flag {flag} never appeared"))
}

fn wait_for_flag_gone(node: &LabNode, flag: &str) -> Result<()> {
    wait_until(|| {
        Ok(!node.frontends()?.iter().any(|f| {
            f["flags"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == flag))
        }))
    })
    .with_context(|| format!("flag {flag} never went away"))
}

fn wait_until(mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f()? {
        anyhow::ensure!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn service_without_endpoints_refuses_at_once_and_deleted_service_is_gone(path: Path) -> Result<()> {
    let c = cluster("10.244.36.0/24", 1, &[8080], path)?;
    let ports = "[{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]";
    c.node.write_manifest(
        "empty.yaml",
        &format!(
            "{}\n---\n{}",
            service("empty", VIP, ports, ""),
            slice("e-1", "empty", "[{name: http, port: 8080}]", &[])
        ),
    )?;
    c.node.wait_for_frontend("10.96.0.10:80/TCP", Some(&[]))?;
    let _pods = c.node.enter_pods_cgroup()?;

    let started = Instant::now();
    let err = c
        .client
        .ns
        .run(|| TcpStream::connect_timeout(&at(VIP, 80), Duration::from_secs(5)))
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(took < Duration::from_millis(100), "refusal took {took:?}");
    let err = udp_refusal(&c, at(VIP, 53))?;
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(c.node.counter(path.refused_counter())? >= 2);

    c.node.remove_manifest("empty.yaml")?;
    c.node.wait_for_frontend("10.96.0.10:80/TCP", None)?;
    let started = Instant::now();
    let err = c
        .client
        .ns
        .run(|| TcpStream::connect_timeout(&at(VIP, 80), Duration::from_secs(3)))
        .unwrap_err();
    // An unused address in the Service CIDR is refused, as kube-proxy does.
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "took {:?}",
        started.elapsed()
    );
    assert!(c.node.counter(path.unknown_service_counter())? >= 1);
    Ok(())
}

/// The error a connected UDP socket gets from a refusing Service: at
/// connect (socket-LB) or, after an ICMP port unreachable, at recv.
fn udp_refusal(c: &Cluster, to: SocketAddr) -> Result<std::io::Error> {
    let started = Instant::now();
    let socket = c.client.ns.run(|| UdpSocket::bind(("0.0.0.0", 0)))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let err = match socket.connect(to).and_then(|()| socket.send(b"q")) {
        Err(e) => e,
        Ok(_) => socket.recv(&mut [0u8; 16]).map(|_| ()).unwrap_err(),
    };
    let took = started.elapsed();
    anyhow::ensure!(
        took < Duration::from_millis(100),
        "UDP refusal took {took:?}"
    );
    Ok(err)
}

fn hairpin_internal_traffic_policy_and_maglev(path: Path) -> Result<()> {
    let c = cluster("10.244.37.0/24", 2, &[8080], path)?;
    let ports = "[{name: http, port: 80, targetPort: 8080}]";
    let sports = "[{name: http, port: 8080}]";
    let b = &c.backends;
    // Hairpin: b0 reaches itself through the Service.
    c.node.write_manifest(
        "self.yaml",
        &format!(
            "{}\n---\n{}",
            service("self", VIP, ports, ""),
            slice("s-1", "self", sports, &[ready(b[0].ip)])
        ),
    )?;
    // internalTrafficPolicy Local: only the endpoint on this node is used.
    let vip2 = Ipv4Addr::new(10, 96, 0, 11);
    c.node.write_manifest(
        "local.yaml",
        &format!(
            "{}\n---\n{}",
            service("local", vip2, ports, "  internalTrafficPolicy: Local\n"),
            slice(
                "l-1",
                "local",
                sports,
                &[ready(b[1].ip), (b[0].ip, true, true, false, "n2")]
            )
        ),
    )?;
    // Maglev by annotation: still spreads, and the CLI says so.
    let vip3 = Ipv4Addr::new(10, 96, 0, 12);
    let maglev = service("mag", vip3, ports, "").replace(
        "  namespace: default\n",
        "  namespace: default\n  annotations:\n    tern.io/lb-algorithm: maglev\n",
    );
    c.node.write_manifest(
        "mag.yaml",
        &format!(
            "{maglev}\n---\n{}",
            slice("m-1", "mag", sports, &[ready(b[0].ip), ready(b[1].ip)])
        ),
    )?;
    c.node
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&[&backend_str(&b[0], 8080)]))?;
    c.node
        .wait_for_frontend("10.96.0.11:80/TCP", Some(&[&backend_str(&b[1], 8080)]))?;
    c.node.wait_for_frontend(
        "10.96.0.12:80/TCP",
        Some(&[&backend_str(&b[0], 8080), &backend_str(&b[1], 8080)]),
    )?;
    let _pods = c.node.enter_pods_cgroup()?;

    let mut own = tcp_connect(&b[0].ns, at(VIP, 80))?;
    assert_eq!(tcp_exchange(&mut own, "me")?, "b0:me");
    assert_eq!(
        spread(&c, at(vip2, 80), 20)?.keys().collect::<Vec<_>>(),
        ["b1"]
    );
    assert_eq!(spread(&c, at(vip3, 80), 40)?.len(), 2);
    let list = c.node.tern(&["service", "list"])?;
    assert!(
        list.lines()
            .any(|l| l.starts_with("10.96.0.12:80/TCP") && l.contains("maglev")),
        "{list}"
    );
    Ok(())
}

#[test]
fn binding_a_node_port_locally_is_refused() -> Result<()> {
    if !require_root("node_port_bind") {
        return Ok(());
    }
    let c = cluster("10.244.38.0/24", 1, &[8080], Path::SocketLb)?;
    let spec = "  type: NodePort\n";
    let ports = "[{name: http, port: 80, targetPort: 8080, nodePort: 30080}]";
    c.node.write_manifest(
        "np.yaml",
        &format!(
            "{}\n---\n{}",
            service("np", VIP, ports, spec),
            slice(
                "np-1",
                "np",
                "[{name: http, port: 8080}]",
                &[ready(c.backends[0].ip)]
            )
        ),
    )?;
    c.node.wait_for_frontend(
        "10.0.0.11:30080/TCP",
        Some(&[&backend_str(&c.backends[0], 8080)]),
    )?;
    let _pods = c.node.enter_pods_cgroup()?;
    let err = c
        .client
        .ns
        .run(|| std::net::TcpListener::bind(("0.0.0.0", 30080)))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    assert!(
        c.client
            .ns
            .run(|| std::net::TcpListener::bind(("0.0.0.0", 30081)))
            .is_ok()
    );
    Ok(())
}

/// Map operations of the agent's last service sync.
fn last_sync(node: &LabNode) -> Result<(u64, u64, u64, u64)> {
    let status = node.agent_request(&serde_json::json!({"op": "status"}))?;
    let s = &status["last_sync"];
    let n = |k: &str| s[k].as_u64().unwrap_or(u64::MAX);
    Ok((n("syncs"), n("writes"), n("deletes"), n("errors")))
}

#[test]
fn changes_are_minimal_map_updates_and_a_restart_rewrites_nothing() -> Result<()> {
    if !require_root("minimal_updates") {
        return Ok(());
    }
    let mut c = cluster("10.244.39.0/24", 4, &[8080], Path::SocketLb)?;
    let ports = "[{name: http, port: 80, targetPort: 8080}]";
    let sports = "[{name: http, port: 8080}]";
    let svc = service("web", VIP, ports, "");
    let b: Vec<Ipv4Addr> = c.backends.iter().map(|p| p.ip).collect();
    let write = |node: &LabNode, eps: &[Ipv4Addr]| {
        let eps: Vec<_> = eps.iter().map(|ip| ready(*ip)).collect();
        node.write_manifest(
            "web.yaml",
            &format!("{svc}\n---\n{}", slice("web-1", "web", sports, &eps)),
        )
    };
    let name = |ips: &[Ipv4Addr]| {
        ips.iter()
            .map(|ip| format!("{ip}:8080"))
            .collect::<Vec<_>>()
    };
    write(&c.node, &b[..3])?;
    let want = name(&b[..3]);
    c.node.wait_for_frontend(
        "10.96.0.10:80/TCP",
        Some(&want.iter().map(String::as_str).collect::<Vec<_>>()),
    )?;
    // New service: 3 backends + revnat + 3 slots + master (a random
    // frontend's backends need no connection counters).
    assert_eq!(last_sync(&c.node)?.1, 8);

    // One endpoint replaced: a new backend, its slot; the old backend goes.
    write(&c.node, &[b[0], b[1], b[3]])?;
    let want = name(&[b[0], b[1], b[3]]);
    c.node.wait_for_frontend(
        "10.96.0.10:80/TCP",
        Some(&want.iter().map(String::as_str).collect::<Vec<_>>()),
    )?;
    let (_, writes, deletes, errors) = last_sync(&c.node)?;
    assert_eq!(
        (writes, deletes, errors),
        (2, 1, 0),
        "an endpoint change rewrites only what changed"
    );

    // Restart: the pinned maps are adopted; the first sync changes nothing.
    c.node.kill_agent()?;
    c.node.start_agent()?;
    wait_until(|| Ok(last_sync(&c.node)?.0 >= 1))?;
    assert_eq!(
        last_sync(&c.node)?,
        (1, 0, 0, 0),
        "a restart must not rewrite the maps"
    );
    {
        let _pods = c.node.enter_pods_cgroup()?;
        assert_eq!(spread(&c, at(VIP, 80), 30)?.len(), 3);
    }

    // Deletion: master, slots, revnat and the backends; no writes.
    c.node.remove_manifest("web.yaml")?;
    c.node.wait_for_frontend("10.96.0.10:80/TCP", None)?;
    let (_, writes, deletes, _) = last_sync(&c.node)?;
    assert_eq!((writes, deletes), (0, 8));
    Ok(())
}
