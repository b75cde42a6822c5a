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
    // Only the eBPF datapath may carry pod traffic.
    node.ns.sysctl("net.ipv4.ip_forward", "0")?;
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
    let result = chain.run("add", &id, ns.path(), &caps)?.success_json()?;

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

    let check = chain.run("check", &id, ns.path(), &caps)?;
    assert_eq!(check.code, Some(0), "{check:?}");
    let del = chain.run("del", &id, ns.path(), &caps)?;
    assert_eq!(del.code, Some(0), "{del:?}");
    let status = node.agent_request(&json!({"op": "status"}))?;
    assert_eq!(status["allocated"], 1, "only the other pod: {status}");
    assert!(
        ns.sh("ip -o link show dev eth0").is_err(),
        "eth0 left behind"
    );
    Ok(())
}
