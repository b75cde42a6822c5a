//! Connection tracking of the per-packet Service path when clients reuse
//! their ports, as every busy node does: a new connection on a port whose
//! earlier Service flow just ended must connect at once, and what that
//! flow left in CT must never capture another connection's replies. Every
//! case runs on both Service paths (on a socket-LB node, processes outside
//! the pods' cgroup still take the per-packet path). Needs root.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tern_lab::lab::{CgroupGuard, Lab, LabNode, Pod};
use tern_lab::traffic::{EchoServer, tcp_abort, tcp_connect_from, tcp_exchange};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(VIP), 80);
const BACKEND_PORT: u16 = 8080;
/// Well under the first SYN retransmission (1 s): a connection that needed
/// one was stalled by the datapath.
const CONNECT_BOUND: Duration = Duration::from_millis(500);

tern_lab::both_service_paths!(
    socket_lb: true,
    per_packet: false;
    a_port_reused_after_its_flow_expired_apart_connects_at_once,
    thousands_of_connections_on_a_narrow_port_range_never_stall,
    a_reply_entry_left_by_a_service_flow_captures_no_later_connection,
);

struct Cluster {
    node: LabNode,
    client: Pod,
    backends: Vec<Pod>,
    _servers: Vec<EchoServer>,
    _lab: Lab,
}

/// A node (socket-LB on or off), a client pod and `n` backends behind the
/// ClusterIP `VIP:80`.
fn cluster(cidr: &str, n: usize, socket_lb: bool) -> Result<Cluster> {
    let lab = Lab::new()?;
    let node = lab.node_with("n1", cidr, NODE_IP, socket_lb)?;
    let client = node.add_pod("client")?;
    let (backends, servers) = node.add_echo_pods(n, BACKEND_PORT)?;
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
  ports: [{{name: http, port: 80, targetPort: {BACKEND_PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: {BACKEND_PORT}}}]
endpoints:
"
    );
    for pod in &backends {
        yaml.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n",
            pod.ip
        ));
    }
    node.write_manifest("web.yaml", &yaml)?;
    let want: Vec<String> = backends
        .iter()
        .map(|p| format!("{}:{BACKEND_PORT}", p.ip))
        .collect();
    node.wait_for_frontend(
        "10.96.0.10:80/TCP",
        Some(&want.iter().map(String::as_str).collect::<Vec<_>>()),
    )?;
    Ok(Cluster {
        node,
        client,
        backends,
        _servers: servers,
        _lab: lab,
    })
}

impl Cluster {
    /// The client's connections take the socket-LB path from here on (a
    /// no-op on a per-packet node: nothing translates at the socket there).
    fn socket_lb(&self) -> Result<CgroupGuard> {
        self.node.enter_pods_cgroup()
    }

    /// A connection from the client's `port` to `to`, which must be made
    /// within the bound.
    fn connect(&self, port: u16, to: SocketAddr) -> Result<std::net::TcpStream> {
        let started = Instant::now();
        let conn = tcp_connect_from(&self.client.ns, port, to, Duration::from_secs(5))
            .with_context(|| format!("connecting from port {port}; CT:\n{}", self.ct_table()))?;
        let took = started.elapsed();
        ensure!(
            took < CONNECT_BOUND,
            "connect from port {port} to {to} took {took:?}\n{}",
            self.ct_table()
        );
        Ok(conn)
    }

    fn ct_table(&self) -> String {
        self.node
            .tern(&["ct", "list"])
            .unwrap_or_else(|e| format!("(tern ct list: {e:#})"))
    }
}

/// Seconds of CLOCK_MONOTONIC, the clock CT entries are stamped with.
fn monotonic_s() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64)
        .unwrap_or(0)
}

/// Sleeps until CLOCK_MONOTONIC has reached the start of second `s`, plus
/// `margin`.
fn sleep_until_second(s: u64, margin: Duration) {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default();
    let target = Duration::from_secs(s) + margin;
    if let Some(wait) = target.checked_sub(now) {
        std::thread::sleep(wait);
    }
}

/// A flow whose two directions were last seen in different seconds: the
/// server closes first (its FIN is the last packet of the reply direction),
/// the client resets its side two seconds later (the last packet of the
/// original direction, which nothing answers). The client then reuses the
/// port when the reply direction's closing time has run out but the
/// original's has not. Entries that expire apart would DNAT the new SYN
/// with the old flow and leave its SYN-ACK untranslated: the client would
/// wait for SYN retransmissions until the original expired (~30 s).
fn a_port_reused_after_its_flow_expired_apart_connects_at_once(socket_lb: bool) -> Result<()> {
    let c = cluster("10.244.41.0/24", 2, socket_lb)?;
    let _pods = if socket_lb {
        Some(c.socket_lb()?)
    } else {
        None
    };
    let port = 40_123;
    let mut conn = c.connect(port, SERVICE)?;
    let server_fin = monotonic_s();
    let answer = tcp_exchange(&mut conn, "close?")?;
    ensure!(answer.ends_with(":close?"), "{answer}");
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut conn, &mut rest).context("the server's FIN")?;
    sleep_until_second(server_fin + 2, Duration::from_millis(100));
    tcp_abort(conn)?;
    // The reply direction was last seen in second `server_fin` (or the
    // next, if the FIN crossed a second), closing lifetime 10 s; the
    // original two seconds later.
    sleep_until_second(server_fin + 12, Duration::from_millis(300));
    let mut again = c.connect(port, SERVICE)?;
    let answer = tcp_exchange(&mut again, "again")?;
    ensure!(answer.ends_with(":again"), "{answer}");
    Ok(())
}

/// Ports reused within tenths of a second, as on a busy node: 64 client
/// ports, 2 000 connections, each closed by the server first (so the port
/// is free again at once on the client); none may stall, and new
/// connections keep being spread over both backends.
fn thousands_of_connections_on_a_narrow_port_range_never_stall(socket_lb: bool) -> Result<()> {
    let c = cluster("10.244.42.0/24", 2, socket_lb)?;
    c.client
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "40000 40063")?;
    let _pods = if socket_lb {
        Some(c.socket_lb()?)
    } else {
        None
    };
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    for i in 0..2_000 {
        let started = Instant::now();
        // Port 0: the kernel picks from the narrowed range.
        let mut conn = c
            .connect(0, SERVICE)
            .with_context(|| format!("connection {i}"))?;
        let answer = tcp_exchange(&mut conn, "close?")?;
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut conn, &mut rest)?;
        slowest = slowest.max(started.elapsed());
        let backend = answer.split(':').next().unwrap_or_default().to_owned();
        *answered.entry(backend).or_insert(0) += 1;
    }
    ensure!(
        slowest < CONNECT_BOUND,
        "slowest connection took {slowest:?}"
    );
    let names: Vec<&str> = answered.keys().map(String::as_str).collect();
    ensure!(names == ["b0", "b1"], "backends answering: {answered:?}");
    Ok(())
}

/// A per-packet Service flow from port P to backend b0 has just closed;
/// its CT entries live on for their closing time. A connection from the
/// same port P straight to b0 (by its pod address on a per-packet node, or
/// through socket-LB, which connects the socket to b0 itself) has the
/// tuple the old flow's reply entry is keyed by: that entry must not turn
/// its SYN-ACK into one from the Service address.
fn a_reply_entry_left_by_a_service_flow_captures_no_later_connection(
    socket_lb: bool,
) -> Result<()> {
    let c = cluster("10.244.43.0/24", 1, socket_lb)?;
    let b0 = &c.backends[0];
    let port = 40_321;
    // The first connection outside the pods' cgroup: per-packet on both nodes.
    let mut first = c.connect(port, SERVICE)?;
    ensure!(tcp_exchange(&mut first, "1")? == "b0:1");
    drop(first);
    ensure!(
        c.ct_table().contains(&format!("{}:{BACKEND_PORT}", b0.ip)),
        "the first connection was not tracked per packet:\n{}",
        c.ct_table()
    );
    let (_pods, to) = if socket_lb {
        (Some(c.socket_lb()?), SERVICE)
    } else {
        (None, SocketAddr::from((b0.ip, BACKEND_PORT)))
    };
    let mut second = c.connect(port, to)?;
    ensure!(second.peer_addr()? == to, "peer {:?}", second.peer_addr());
    ensure!(tcp_exchange(&mut second, "2")? == "b0:2");
    Ok(())
}
