//! Same-node pod networking through the eBPF datapath, with real TCP and UDP
//! between namespaces. The node forwards nothing itself (ip_forward=0), so
//! pod-to-pod traffic only works if from_pod redirects it. Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use anyhow::Result;
use tern_lab::lab::{Lab, LabNode};
use tern_lab::skip::require_root;
use tern_lab::traffic::{EchoServer, tcp_connect, tcp_exchange, tcp_roundtrip, udp_roundtrip};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const PORT: u16 = 8080;

fn lab_node(cidr: &str) -> Result<(Lab, LabNode)> {
    let lab = Lab::new()?;
    let node = lab.node("n1", cidr, NODE_IP)?;
    node.forward_only_through_ebpf()?;
    Ok((lab, node))
}

fn at(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, PORT))
}

#[test]
fn pod_to_pod_tcp_and_udp_on_one_node_go_through_ebpf() -> Result<()> {
    if !require_root("pod_to_pod") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.21.0/24")?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _sa = EchoServer::start(&a.ns, PORT, "a")?;
    let _sb = EchoServer::start(&b.ns, PORT, "b")?;
    let before = node.counter("redirect_local_pod")?;

    assert_eq!(tcp_roundtrip(&a.ns, at(b.ip), "hello")?, "b:hello");
    assert_eq!(tcp_roundtrip(&b.ns, at(a.ip), "hi")?, "a:hi");
    let (answer, from) = udp_roundtrip(&a.ns, at(b.ip), "ping")?;
    assert_eq!(answer, "b:ping");
    assert_eq!(
        from,
        at(b.ip),
        "the UDP answer comes from the pod's own address"
    );

    // The server sees the client pod's own address: no NAT on the node.
    let listener = b.ns.run(|| TcpListener::bind(("0.0.0.0", PORT + 1)))?;
    let _conn = tcp_connect(&a.ns, SocketAddr::from((b.ip, PORT + 1)))?;
    let (_, peer) = listener.accept()?;
    assert_eq!(peer.ip(), a.ip);

    let after = node.counter("redirect_local_pod")?;
    assert!(
        after >= before + 10,
        "from_pod redirected only {} packets",
        after - before
    );
    Ok(())
}

#[test]
fn pods_and_their_node_reach_each_other() -> Result<()> {
    if !require_root("pod_and_node") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.22.0/24")?;
    let pod = node.add_pod("p")?;
    let _pod_server = EchoServer::start(&pod.ns, PORT, "pod")?;
    let _node_server = EchoServer::start(&node.ns, PORT, "node")?;

    assert_eq!(tcp_roundtrip(&pod.ns, at(NODE_IP), "up")?, "node:up");
    assert_eq!(tcp_roundtrip(&node.ns, at(pod.ip), "down")?, "pod:down");
    let (answer, from) = udp_roundtrip(&node.ns, at(pod.ip), "u")?;
    assert_eq!((answer.as_str(), from), ("pod:u", at(pod.ip)));
    let (answer, _) = udp_roundtrip(&pod.ns, at(NODE_IP), "v")?;
    assert_eq!(answer, "node:v");
    Ok(())
}

#[test]
fn agent_restart_keeps_pods_and_established_connections_working() -> Result<()> {
    if !require_root("agent_restart") {
        return Ok(());
    }
    let (_lab, mut node) = lab_node("10.244.23.0/24")?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _sb = EchoServer::start(&b.ns, PORT, "b")?;
    let mut conn = tcp_connect(&a.ns, at(b.ip))?;
    assert_eq!(tcp_exchange(&mut conn, "before")?, "b:before");

    node.kill_agent()?;
    let during = node.counter("redirect_local_pod")?;
    assert_eq!(tcp_exchange(&mut conn, "agent down")?, "b:agent down");
    assert_eq!(
        tcp_roundtrip(&a.ns, at(b.ip), "new conn while down")?,
        "b:new conn while down"
    );
    assert!(
        node.counter("redirect_local_pod")? > during,
        "the pinned program kept forwarding while the agent was down"
    );
    let listing = node.tern(&["endpoint", "list"])?;
    assert!(
        listing.contains("pinned ENDPOINTS map") && listing.contains(&a.ip.to_string()),
        "{listing}"
    );

    node.start_agent()?;
    assert_eq!(tcp_exchange(&mut conn, "after")?, "b:after");
    let listing = node.tern(&["endpoint", "list"])?;
    for pod in [&a, &b] {
        let line = listing.lines().find(|l| l.starts_with(&pod.ip.to_string()));
        assert!(line.is_some_and(|l| l.contains("attached")), "{listing}");
    }
    // The restarted agent remembers what it handed out.
    let c = node.add_pod("c")?;
    assert!(c.ip != a.ip && c.ip != b.ip);
    let _sc = EchoServer::start(&c.ns, PORT, "c")?;
    assert_eq!(tcp_roundtrip(&a.ns, at(c.ip), "to c")?, "c:to c");
    assert_eq!(tcp_exchange(&mut conn, "still")?, "b:still");
    // After DEL the datapath no longer knows the pod.
    assert_eq!(node.del_pod(&c)?.code, Some(0));
    assert!(
        !node
            .tern(&["endpoint", "list"])?
            .contains(&c.ip.to_string())
    );
    Ok(())
}

/// The `max_entries` of every BPF map the process `pid` holds open.
fn open_map_sizes(pid: u32) -> Result<Vec<u64>> {
    let mut sizes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(fd?.path()).unwrap_or_default();
        if info.contains("map_type:") {
            let entries = info
                .lines()
                .find_map(|l| l.strip_prefix("max_entries:"))
                .and_then(|v| v.trim().parse::<u64>().ok());
            sizes.extend(entries);
        }
    }
    Ok(sizes)
}

#[test]
fn a_pinned_map_of_another_shape_is_replaced_at_restart() -> Result<()> {
    if !require_root("pinned_map_replaced") {
        return Ok(());
    }
    let (_lab, mut node) = lab_node("10.244.24.0/24")?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _sb = EchoServer::start(&b.ns, PORT, "b")?;
    const CT_SIZE: u64 = 4093;
    let pid = node.agent_pid().expect("agent runs");
    assert!(!open_map_sizes(pid)?.contains(&CT_SIZE));

    // As after an upgrade that changed a map: the pinned CT no longer fits
    // what the agent wants (here its size). The agent replaces it instead
    // of loading programs against the old one, and pods keep working.
    node.kill_agent()?;
    node.extra_args = vec!["--map-size".into(), format!("CT={CT_SIZE}")];
    node.start_agent()?;
    let pid = node.agent_pid().expect("agent runs");
    assert!(
        open_map_sizes(pid)?.contains(&CT_SIZE),
        "the agent still uses the old CT map\n{}",
        node.agent_log_tail()
    );
    let replaced = |node: &LabNode| -> Result<usize> {
        let log = std::fs::read_to_string(node.agent_log())?;
        Ok(log.lines().filter(|l| l.contains("replacing it")).count())
    };
    assert_eq!(replaced(&node)?, 1, "{}", node.agent_log_tail());
    assert_eq!(tcp_roundtrip(&a.ns, at(b.ip), "after")?, "b:after");

    // A map that fits is kept: the next restart replaces nothing.
    node.kill_agent()?;
    node.start_agent()?;
    assert_eq!(replaced(&node)?, 1, "{}", node.agent_log_tail());
    assert_eq!(tcp_roundtrip(&a.ns, at(b.ip), "again")?, "b:again");
    Ok(())
}
