//! tern-cni first in a conflist, the reference plugins after it, run by
//! libcni exactly as containerd, CRI-O and podman run a chain: each plugin
//! gets the previous one's result, CHECK and DEL get the cached result.
//! Needs root and `cargo xtask setup` (reference plugins, tests/libcni).

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;
use serde_json::{Value, json};
use tern_lab::lab::{Lab, LabNode, pod_ip};
use tern_lab::libcni::Chain;
use tern_lab::netns::{Netns, unique_name};
use tern_lab::skip::require_root;
use tern_lab::traffic::{EchoServer, tcp_roundtrip, udp_roundtrip};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const PORT: u16 = 8080;

fn lab_node(cidr: &str) -> Result<(Lab, LabNode)> {
    let lab = Lab::new()?;
    let node = lab.node("n1", cidr, NODE_IP)?;
    node.forward_only_through_ebpf()?;
    Ok((lab, node))
}

fn interface<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["interfaces"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no interface {name} in {result}"))
}

/// `podman run --mac-address` / the `tuning` plugin's `mac` capability:
/// the MAC change flushes the pod's permanent neighbour entry for its
/// gateway; the datapath answers the pod's ARP, so the pod keeps talking
/// both ways, and CHECK and DEL of the chain pass.
#[test]
fn tuning_mac_change_keeps_the_pod_connected() -> Result<()> {
    if !require_root("tuning_mac_change") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.46.0/24")?;
    let chain = Chain::new(
        &node,
        "1.0.0",
        json!({}),
        &[json!({"type": "tuning", "capabilities": {"mac": true}})],
    )?;
    let mac = "c2:b0:57:49:47:f1";
    let ns = Netns::new("mac")?;
    let id = unique_name("mac");
    let caps = json!({ "mac": mac });
    let result = chain
        .run(&node, "add", &id, ns.path(), &caps)?
        .success_json()?;

    // tuning got tern-cni's result and extended it with the new MAC.
    assert_eq!(interface(&result, "eth0")["mac"], mac, "{result}");
    let host_mac = result["interfaces"][0]["mac"].as_str().unwrap().to_owned();
    let ip = pod_ip(&result)?;
    assert!(ns.sh("ip -o link show dev eth0")?.contains(mac));
    assert!(
        !ns.sh("ip neigh show 169.254.1.1")?.contains("PERMANENT"),
        "the MAC change should have flushed the gateway's permanent entry"
    );

    let other = node.add_pod("other")?;
    let _server = EchoServer::start(&other.ns, PORT, "other")?;
    let _own = EchoServer::start(&ns, PORT, "mac")?;
    let arp_before = node.counter("gateway_arp_reply")?;
    let to_other = SocketAddr::from((other.ip, PORT));
    assert_eq!(tcp_roundtrip(&ns, to_other, "out")?, "other:out");
    assert_eq!(udp_roundtrip(&ns, to_other, "out")?.0, "other:out");
    let to_pod = SocketAddr::from((ip, PORT));
    assert_eq!(tcp_roundtrip(&other.ns, to_pod, "in")?, "mac:in");
    assert!(
        node.counter("gateway_arp_reply")? > arp_before,
        "the pod resolved its gateway without the datapath's ARP answer?"
    );
    let neigh = ns.sh("ip neigh show 169.254.1.1")?;
    assert!(neigh.contains(&host_mac), "{neigh} (host veth {host_mac})");

    let check = chain.run(&node, "check", &id, ns.path(), &caps)?;
    assert_eq!(check.code, Some(0), "{check:?}");
    let del = chain.run(&node, "del", &id, ns.path(), &caps)?;
    assert_eq!(del.code, Some(0), "{del:?}");
    let status = node.agent_request(&json!({"op": "status"}))?;
    assert_eq!(status["allocated"], 1, "only the other pod: {status}");
    assert!(
        ns.sh("ip -o link show dev eth0").is_err(),
        "eth0 left behind"
    );
    Ok(())
}

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

/// The `portMappings` capability served by the datapath (no iptables):
/// hostPorts on the node's address for TCP and UDP, reached from outside
/// with the client's own address kept and from a pod on the node (per
/// packet and at the socket); a second pod asking for a taken hostPort is
/// refused and keeps nothing; CHECK passes and DEL removes the hostPorts.
#[test]
fn port_mappings_are_served_natively() -> Result<()> {
    if !require_root("port_mappings") {
        return Ok(());
    }
    let (lab, mut node) = lab_node("10.244.47.0/24")?;
    let client = lab.external_client(CLIENT_IP)?;
    let chain = Chain::new(
        &node,
        "1.0.0",
        json!({"capabilities": {"portMappings": true}}),
        &[],
    )?;
    let caps = json!({"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 8053, "containerPort": 80, "protocol": "udp"},
        {"hostPort": 8081, "containerPort": 81, "protocol": "tcp", "hostIP": ""}
    ]});
    let ns = Netns::new("web")?;
    let id = unique_name("web");
    let result = chain
        .run(&node, "add", &id, ns.path(), &caps)?
        .success_json()?;
    let ip = pod_ip(&result)?;
    let _server = EchoServer::start(&ns, 80, "web")?;
    let listener = ns.run(|| std::net::TcpListener::bind(("0.0.0.0", 81)))?;
    let backend = format!("{ip}:80");
    node.wait_for_frontend(&format!("{NODE_IP}:8080/TCP"), Some(&[&backend]))?;
    node.wait_for_frontend(&format!("{NODE_IP}:8053/UDP"), Some(&[&backend]))?;

    let tcp = SocketAddr::from((NODE_IP, 8080));
    let udp = SocketAddr::from((NODE_IP, 8053));
    assert_eq!(tcp_roundtrip(&client, tcp, "outside")?, "web:outside");
    let (answer, from) = udp_roundtrip(&client, udp, "outside")?;
    assert_eq!((answer.as_str(), from), ("web:outside", udp));
    // DNAT only: the pod sees the client's own address.
    let _conn = tern_lab::traffic::tcp_connect(&client, SocketAddr::from((NODE_IP, 8081)))?;
    let (_, peer) = listener.accept()?;
    assert_eq!(peer.ip(), CLIENT_IP);

    let other = node.add_pod("other")?;
    assert_eq!(tcp_roundtrip(&other.ns, tcp, "pod")?, "web:pod");
    {
        let _in_pods = node.enter_pods_cgroup()?;
        assert_eq!(tcp_roundtrip(&other.ns, tcp, "socket")?, "web:socket");
    }

    // A second pod may not take the hostPort; it keeps nothing.
    let allocated = |node: &LabNode| -> Result<Value> {
        Ok(node.agent_request(&json!({"op": "status"}))?["allocated"].clone())
    };
    let before = allocated(&node)?;
    let ns2 = Netns::new("web2")?;
    let id2 = unique_name("web2");
    let taken =
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]});
    let refused = chain.run(&node, "add", &id2, ns2.path(), &taken)?;
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(
        refused.stderr.contains("hostPort *:8080/TCP") && refused.stderr.contains("taken"),
        "{refused:?}"
    );
    assert_eq!(allocated(&node)?, before);
    assert!(
        ns2.sh("ip -o link show dev eth0").is_err(),
        "eth0 left behind"
    );
    assert_eq!(tcp_roundtrip(&client, tcp, "still")?, "web:still");

    // A hostPort dies with its pod's endpoint, also when GC collects it.
    let gone_pod = Netns::new("gc")?;
    let gone_id = unique_name("gc");
    let gone_caps =
        json!({"portMappings": [{"hostPort": 9090, "containerPort": 80, "protocol": "tcp"}]});
    let gone = chain.run(&node, "add", &gone_id, gone_pod.path(), &gone_caps)?;
    let gone_ip = pod_ip(&gone.success_json()?)?;
    node.wait_for_frontend(
        &format!("{NODE_IP}:9090/TCP"),
        Some(&[&format!("{gone_ip}:80")]),
    )?;
    let mut gc = node.netconf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([
        {"containerID": id, "ifname": "eth0"},
        {"containerID": other.container_id, "ifname": "eth0"}
    ]);
    let out = node.invoke_cni(&[("CNI_COMMAND", "GC")], gc.to_string().as_bytes())?;
    assert_eq!(out.code, Some(0), "{out:?}");
    node.wait_for_frontend(&format!("{NODE_IP}:9090/TCP"), None)?;
    node.wait_for_frontend(&format!("{NODE_IP}:8080/TCP"), Some(&[&backend]))?;

    // The agent keeps the hostPorts across a restart (endpoint state).
    node.kill_agent()?;
    node.start_agent()?;
    node.wait_for_frontend(&format!("{NODE_IP}:8080/TCP"), Some(&[&backend]))?;
    assert_eq!(tcp_roundtrip(&client, tcp, "restarted")?, "web:restarted");

    let check = chain.run(&node, "check", &id, ns.path(), &caps)?;
    assert_eq!(check.code, Some(0), "{check:?}");
    let del = chain.run(&node, "del", &id, ns.path(), &caps)?;
    assert_eq!(del.code, Some(0), "{del:?}");
    node.wait_for_frontend(&format!("{NODE_IP}:8080/TCP"), None)?;
    node.wait_for_frontend(&format!("{NODE_IP}:8053/UDP"), None)?;
    assert!(tcp_roundtrip(&client, tcp, "gone").is_err());
    Ok(())
}

/// TCP throughput `client` -> `server_ip` as the receiver counted it
/// (iperf3 for 4 s), bits per second. No `--omit`: iperf3's sender and
/// receiver end the omitted second each on their own clock, and the
/// receiver then now and then counted data queued before its end (up to
/// 7 % over a 20 Mbit/s filter that the filter's own counters showed had
/// not been exceeded; esnet/iperf#236, #692 report the same).
fn iperf3(server: &Netns, server_ip: Ipv4Addr, client: &Netns, port: u16) -> Result<f64> {
    let mut cmd = std::process::Command::new("iperf3");
    cmd.args(["-s", "-1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _server = server.spawn_guarded(cmd)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server
        .sh(&format!("ss -ltnH 'sport = :{port}'"))?
        .trim()
        .is_empty()
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "iperf3 -s never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut cmd = std::process::Command::new("iperf3");
    cmd.args(["-J", "-c", &server_ip.to_string(), "-p", &port.to_string()])
        .args(["-t", "4"])
        .stdout(std::process::Stdio::piped());
    let out = client.spawn(cmd)?.wait_with_output()?;
    let report: Value = serde_json::from_slice(&out.stdout)?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("no sum_received in {report}"))
}

/// Checks a limit on the wire against measured TCP payload rates. Limits
/// count bytes on the wire (Ethernet frames), as tc and the bandwidth plugin
/// do; iperf3 counts TCP payload: it is scaled to frames of the node's pod
/// MTU (20 + 32 bytes of IPv4 and TCP headers with timestamps, 14 of
/// Ethernet). A rate more than `tolerance` (0.05: 5 %) over the limit fails
/// at once: the limit was bypassed. A rate under it is measured again, up to
/// three runs in all: a 4 s TCP stream through a token bucket on a loaded
/// 2-core machine now and then comes in well under (one CI run: -17 %, then
/// +1 % twice when rerun), which says nothing about the limit; three runs
/// all under it still fail.
struct WireRate {
    on_wire: f64,
    tolerance: f64,
}

impl WireRate {
    fn new(node: &LabNode, tolerance: f64) -> Result<Self> {
        let mtu = node.agent_request(&json!({"op": "status"}))?["mtu"]
            .as_f64()
            .ok_or_else(|| anyhow::anyhow!("status without mtu"))?;
        Ok(Self {
            on_wire: (mtu + 14.0) / (mtu - 52.0),
            tolerance,
        })
    }

    fn within(&self, what: &str, measure: impl Fn() -> Result<f64>, want: f64) -> Result<()> {
        let mut offs = Vec::new();
        for _ in 0..3 {
            let goodput = measure()?;
            let got = goodput * self.on_wire;
            let off = (got - want) / want;
            println!(
                "{what}: {:.2} Mbit/s on the wire ({:.2} TCP payload), limit {:.0}: {:+.1} %",
                got / 1e6,
                goodput / 1e6,
                want / 1e6,
                off * 100.0
            );
            anyhow::ensure!(
                off <= self.tolerance,
                "{what}: {got} bit/s over a limit of {want}: bypassed"
            );
            if off >= -self.tolerance {
                return Ok(());
            }
            offs.push(format!("{:+.1} %", off * 100.0));
        }
        anyhow::bail!("{what}: under the limit of {want} bit/s in every run: {offs:?}")
    }
}

/// The `bandwidth` capability served by tern-cni: a pod's ingress and
/// egress limits hold within 5 % pod to pod and between pod and node, in
/// both directions; a pod without limits is not slowed; CHECK passes.
#[test]
fn bandwidth_limits_hold_both_ways() -> Result<()> {
    if !require_root("bandwidth_limits") {
        return Ok(());
    }
    let (_lab, node) = lab_node("10.244.48.0/24")?;
    let chain = Chain::new(
        &node,
        "1.0.0",
        json!({"capabilities": {"bandwidth": true}}),
        &[],
    )?;
    const INGRESS: f64 = 20e6;
    const EGRESS: f64 = 10e6;
    let caps = json!({"bandwidth": {
        "ingressRate": INGRESS as u64, "ingressBurst": u64::from(u32::MAX),
        "egressRate": EGRESS as u64, "egressBurst": u64::from(u32::MAX)
    }});
    let ns = Netns::new("bw")?;
    let id = unique_name("bw");
    let result = chain
        .run(&node, "add", &id, ns.path(), &caps)?
        .success_json()?;
    let limited = pod_ip(&result)?;
    let other = node.add_pod("other")?;
    let third = node.add_pod("third")?;
    let rate = WireRate::new(&node, 0.05)?;
    rate.within(
        "pod -> limited pod",
        || iperf3(&ns, limited, &other.ns, 5201),
        INGRESS,
    )?;
    rate.within(
        "limited pod -> pod",
        || iperf3(&other.ns, other.ip, &ns, 5202),
        EGRESS,
    )?;
    rate.within(
        "node -> limited pod",
        || iperf3(&ns, limited, &node.ns, 5203),
        INGRESS,
    )?;
    rate.within(
        "limited pod -> node",
        || iperf3(&node.ns, NODE_IP, &ns, 5204),
        EGRESS,
    )?;
    let free = iperf3(&third.ns, third.ip, &other.ns, 5205)?;
    println!("unlimited pod -> pod: {:.2} Mbit/s", free / 1e6);
    assert!(
        free > 20.0 * INGRESS,
        "pods without limits are slowed: {free}"
    );

    let check = chain.run(&node, "check", &id, ns.path(), &caps)?;
    assert_eq!(check.code, Some(0), "{check:?}");
    let endpoints = node.agent_request(&json!({"op": "list_endpoints"}))?;
    let ours = endpoints["endpoints"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|e| e["endpoint"]["ip"] == limited.to_string())
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        ours["endpoint"]["bandwidth"],
        json!({"ingress_rate": INGRESS as u64, "egress_rate": EGRESS as u64})
    );
    let del = chain.run(&node, "del", &id, ns.path(), &caps)?;
    assert_eq!(del.code, Some(0), "{del:?}");
    Ok(())
}

/// The chain runtimes build from the reference plugins: tern-cni, then
/// tuning and portmap. Each gets the result so far and extends it; the
/// hostPort (served by Tern's datapath before portmap's iptables rules are
/// reached) and the new MAC both work; DEL passes through all.
#[test]
fn tern_then_tuning_then_portmap() -> Result<()> {
    if !require_root("tern_tuning_portmap") {
        return Ok(());
    }
    let (lab, node) = lab_node("10.244.49.0/24")?;
    let client = lab.external_client(CLIENT_IP)?;
    let chain = Chain::new(
        &node,
        "1.0.0",
        json!({"capabilities": {"portMappings": true}}),
        &[
            json!({"type": "tuning", "capabilities": {"mac": true}}),
            json!({"type": "portmap", "capabilities": {"portMappings": true}}),
        ],
    )?;
    let mac = "c2:b0:57:49:47:f2";
    let caps = json!({
        "mac": mac,
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    });
    let ns = Netns::new("full")?;
    let id = unique_name("full");
    let result = chain
        .run(&node, "add", &id, ns.path(), &caps)?
        .success_json()?;
    assert_eq!(interface(&result, "eth0")["mac"], mac, "{result}");
    let ip = pod_ip(&result)?;
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1", "{result}");
    let _server = EchoServer::start(&ns, 80, "full")?;
    node.wait_for_frontend(&format!("{NODE_IP}:8080/TCP"), Some(&[&format!("{ip}:80")]))?;
    let tcp = SocketAddr::from((NODE_IP, 8080));
    assert_eq!(tcp_roundtrip(&client, tcp, "chained")?, "full:chained");

    // No CHECK here: portmap 1.1.1 (Debian's) fails CHECK for every
    // IPv4-only pod, looking for ip6tables rules it never made
    // (containernetworking/plugins#819). tern-cni's and tuning's CHECK
    // run in tuning_mac_change_keeps_the_pod_connected.
    let del = chain.run(&node, "del", &id, ns.path(), &caps)?;
    assert_eq!(del.code, Some(0), "{del:?}");
    node.wait_for_frontend(&format!("{NODE_IP}:8080/TCP"), None)?;
    let status = node.agent_request(&json!({"op": "status"}))?;
    assert_eq!(status["allocated"], 0, "{status}");
    Ok(())
}

/// The reference `bandwidth` plugin chained after tern-cni (the capability
/// on the plugin, not on tern-cni): the agent sees its qdiscs on the pod's
/// veth and has the pod's traffic go through them, so its limits hold
/// both ways instead of being bypassed by the datapath.
#[test]
fn a_chained_bandwidth_plugin_is_not_bypassed() -> Result<()> {
    if !require_root("chained_bandwidth_plugin") {
        return Ok(());
    }
    let lab = Lab::new()?;
    // The plugin's egress path ends in the node's stack: forwarding stays on.
    let node = lab.node("n1", "10.244.51.0/24", NODE_IP)?;
    let chain = Chain::new(
        &node,
        "1.0.0",
        json!({}),
        &[json!({"type": "bandwidth", "capabilities": {"bandwidth": true}})],
    )?;
    const INGRESS: f64 = 20e6;
    const EGRESS: f64 = 10e6;
    let caps = json!({"bandwidth": {
        "ingressRate": INGRESS as u64, "ingressBurst": 1_000_000,
        "egressRate": EGRESS as u64, "egressBurst": 500_000
    }});
    let ns = Netns::new("cbw")?;
    let id = unique_name("cbw");
    let result = chain
        .run(&node, "add", &id, ns.path(), &caps)?
        .success_json()?;
    let limited = pod_ip(&result)?;
    let other = node.add_pod("other")?;
    let rate = WireRate::new(&node, 0.05)?;
    // The agent follows the plugin's qdiscs as soon as they exist.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.counter("to_pod_qdisc")? == 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the pod's traffic never reached the plugin's qdisc\n{}",
            node.agent_log_tail()
        );
        let _ = tern_lab::traffic::icmp_echo(&ns, other.ip, 7);
    }
    rate.within(
        "pod -> limited pod",
        || iperf3(&ns, limited, &other.ns, 5211),
        INGRESS,
    )?;
    rate.within(
        "limited pod -> pod",
        || iperf3(&other.ns, other.ip, &ns, 5212),
        EGRESS,
    )?;
    rate.within(
        "node -> limited pod",
        || iperf3(&ns, limited, &node.ns, 5213),
        INGRESS,
    )?;
    rate.within(
        "limited pod -> node",
        || iperf3(&node.ns, NODE_IP, &ns, 5214),
        EGRESS,
    )?;
    let del = chain.run(&node, "del", &id, ns.path(), &caps)?;
    assert_eq!(del.code, Some(0), "{del:?}");
    Ok(())
}
