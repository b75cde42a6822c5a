//! The tc programs run on crafted frames with BPF_PROG_TEST_RUN: in
//! process, attached nowhere, no namespaces. Each test loads the object
//! afresh (its own maps, small), fills the maps as the agent would, runs a
//! program and checks the frame it returns (every checksum recomputed) and
//! the maps it left. A redirect is only a verdict here: nothing is sent.
//!
//! Loading needs root: without it a test is a counted, printed skip
//! (`tern_lab::skip`), and fails if CI is set.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod packet;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader, Pod};
use tern_agent::datapath::{OBJECT, ip_from_key, ip_to_key};
use tern_common::{
    Backend, CtKey, CtValue, DatapathConfig, EndpointInfo, Reason, RevNat, ServiceKey,
    ServiceValue, TunnelEndpoint, ct_flags, maps, programs, scope, service_flags,
};

use packet::{
    ACK, ARP_REPLY, ARP_REQUEST, ICMP, ICMP_DEST_UNREACHABLE, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
    ICMP_PORT_UNREACHABLE, Packet, RST, SYN, TCP, UDP,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

/// Capacity of every resizable map in these tests.
const MAP_SIZE: u32 = 1024;

/// The device BPF_PROG_TEST_RUN runs a packet on: loopback.
const TEST_RUN_IFINDEX: u32 = 1;

struct LocalPod {
    ip: Ipv4Addr,
    ifindex: u32,
    mac: [u8; 6],
    host_mac: [u8; 6],
}

const CLIENT: LocalPod = LocalPod {
    ip: Ipv4Addr::new(10, 244, 0, 2),
    ifindex: TEST_RUN_IFINDEX,
    mac: [0x0a, 0, 0, 0, 0, 0x02],
    host_mac: [0x0e, 0, 0, 0, 0, 0x02],
};

const BACKEND: LocalPod = LocalPod {
    ip: Ipv4Addr::new(10, 244, 0, 3),
    ifindex: TEST_RUN_IFINDEX,
    mac: [0x0a, 0, 0, 0, 0, 0x03],
    host_mac: [0x0e, 0, 0, 0, 0, 0x03],
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);

/// A fresh copy of the object's maps, with the tc programs loaded on use.
struct Datapath {
    ebpf: Ebpf,
}

/// A directory of its own under /sys/fs/bpf for the maps' pins (the object
/// pins every map by name), removed as soon as the maps exist: they live on
/// through their file descriptors.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Datapath {
    /// None (after saying so) when not root and CI is not set.
    fn load() -> Option<Datapath> {
        let thread = std::thread::current();
        if !tern_lab::skip::require_root(thread.name().unwrap_or("ebpf_programs")) {
            return None;
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pins = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/tern-ebpf-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )));
        std::fs::create_dir(&pins.0)
            .unwrap_or_else(|e| panic!("creating {}: {e}", pins.0.display()));
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&pins.0);
        for name in maps::resizable() {
            loader.map_max_entries(name, MAP_SIZE);
        }
        let ebpf = loader.load(OBJECT).expect("loading the eBPF object");
        drop(pins);
        Some(Datapath { ebpf })
    }

    /// Runs `program` on `frame`: its verdict and the frame it leaves.
    fn run(&mut self, program: &str, frame: &[u8]) -> (i32, Vec<u8>) {
        let classifier: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .unwrap_or_else(|| panic!("no program {program}"))
            .try_into()
            .unwrap();
        if classifier.fd().is_err() {
            classifier
                .load()
                .unwrap_or_else(|e| panic!("the verifier refused {program}: {e:?}"));
        }
        let mut out = vec![0; 2048];
        let result = classifier
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("test run of {program}: {e:?}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value as i32, out)
    }

    fn hash<K: Pod, V: Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).unwrap()).unwrap()
    }

    fn set_config(&mut self, config: DatapathConfig) {
        let mut array: Array<_, DatapathConfig> =
            Array::try_from(self.ebpf.map_mut(maps::CONFIG).unwrap()).unwrap();
        array.set(0, config, 0).unwrap();
    }

    fn add_endpoint(&mut self, pod: &LocalPod) {
        self.add_endpoint_with(pod, 0);
    }

    fn add_endpoint_with(&mut self, pod: &LocalPod, flags: u32) {
        let info = EndpointInfo {
            ifindex: pod.ifindex,
            flags,
            pod_mac: pod.mac,
            host_mac: pod.host_mac,
        };
        let mut endpoints = self.hash::<u32, EndpointInfo>(maps::ENDPOINTS);
        endpoints.insert(ip_to_key(pod.ip), info, 0).unwrap();
    }

    /// A frontend as the agent writes it: backends, slots 1..=n, master.
    fn add_service(
        &mut self,
        frontend: SocketAddrV4,
        proto: u8,
        kind: (u8, u16),
        rev_nat_id: u32,
        backends: &[SocketAddrV4],
    ) {
        let (scope, flags) = kind;
        let master = ServiceKey {
            addr: ip_to_key(*frontend.ip()),
            port: frontend.port().to_be(),
            slot: 0,
            proto,
            scope,
            pad: 0,
        };
        for (i, backend) in backends.iter().enumerate() {
            let id = rev_nat_id * 100 + i as u32;
            let value = Backend {
                addr: ip_to_key(*backend.ip()),
                port: backend.port().to_be(),
                proto,
                flags: 0,
            };
            self.hash::<u32, Backend>(maps::BACKENDS)
                .insert(id, value, 0)
                .unwrap();
            let slot = ServiceKey {
                slot: i as u16 + 1,
                ..master
            };
            let value = ServiceValue {
                backend_id: id,
                ..ServiceValue::default()
            };
            self.hash::<ServiceKey, ServiceValue>(maps::SERVICES)
                .insert(slot, value, 0)
                .unwrap();
        }
        let revnat = RevNat {
            addr: master.addr,
            port: master.port,
            pad: 0,
        };
        self.hash::<u32, RevNat>(maps::REVNAT)
            .insert(rev_nat_id, revnat, 0)
            .unwrap();
        let value = ServiceValue {
            rev_nat_id,
            count: backends.len() as u16,
            flags,
            ..ServiceValue::default()
        };
        self.hash::<ServiceKey, ServiceValue>(maps::SERVICES)
            .insert(master, value, 0)
            .unwrap();
    }

    fn add_prefix<V: Pod>(&mut self, map: &str, addr: Ipv4Addr, len: u32, value: V) {
        let mut trie: LpmTrie<_, u32, V> =
            LpmTrie::try_from(self.ebpf.map_mut(map).unwrap()).unwrap();
        trie.insert(&Key::new(len, ip_to_key(addr)), value, 0)
            .unwrap();
    }

    /// The CT (or NAT) entry of packets from `src` to `dst`.
    fn flow(&mut self, map: &str, proto: u8, src: SocketAddrV4, dst: SocketAddrV4) -> CtValue {
        let key = CtKey {
            saddr: ip_to_key(*src.ip()),
            daddr: ip_to_key(*dst.ip()),
            sport: src.port().to_be(),
            dport: dst.port().to_be(),
            proto,
            pad: [0; 3],
        };
        self.hash::<CtKey, CtValue>(map)
            .get(&key, 0)
            .unwrap_or_else(|e| panic!("no {map} entry {src} -> {dst}: {e}"))
    }

    fn entries(&mut self, map: &str) -> usize {
        self.hash::<CtKey, CtValue>(map).keys().count()
    }

    /// The METRICS counters are exactly `expected` (in `Reason` order);
    /// all others are 0.
    fn assert_counts(&self, expected: &[(Reason, u64)]) {
        let metrics: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(maps::METRICS).unwrap()).unwrap();
        let counted: Vec<(Reason, u64)> = Reason::ALL
            .into_iter()
            .map(|reason| {
                let per_cpu = metrics.get(&(reason as u32), 0).unwrap();
                (reason, per_cpu.iter().sum())
            })
            .filter(|(_, count)| *count != 0)
            .collect();
        assert_eq!(counted, expected);
    }
}

/// What an entry turns its packets into.
fn rewritten_to(entry: &CtValue) -> (SocketAddrV4, SocketAddrV4) {
    let end = |addr, port: u16| SocketAddrV4::new(ip_from_key(addr), u16::from_be(port));
    (end(entry.saddr, entry.sport), end(entry.daddr, entry.dport))
}

fn segment(proto: u8, src: SocketAddrV4, dst: SocketAddrV4, tcp_flags: u8) -> Vec<u8> {
    match proto {
        TCP => packet::tcp(src, dst, tcp_flags, 1000),
        _ => packet::udp(src, dst, b"hello"),
    }
}

const CLUSTER_IP: (u8, u16) = (scope::EXTERNAL, service_flags::CLUSTER_IP);

/// A pod's packet to a ClusterIP goes to the backend (a local pod) with
/// valid checksums, leaving a CT entry for each direction; the backend's
/// reply comes back from the Service address.
fn cluster_ip_round_trip(proto: u8) {
    let Some(mut dp) = Datapath::load() else {
        return;
    };
    dp.add_endpoint(&CLIENT);
    dp.add_endpoint(&BACKEND);
    let backend = SocketAddrV4::new(BACKEND.ip, 8080);
    dp.add_service(SERVICE, proto, CLUSTER_IP, 1, &[backend]);
    let client = SocketAddrV4::new(CLIENT.ip, 40000);

    let (verdict, out) = dp.run(programs::FROM_POD, &segment(proto, client, SERVICE, SYN));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = Packet::parse(&out);
    assert_eq!((out.source(), out.destination()), (client, backend));
    assert_eq!((out.eth_dst, out.eth_src), (BACKEND.mac, BACKEND.host_mac));
    assert_eq!(out.ttl, 63);

    let forward = dp.flow(maps::CT, proto, client, SERVICE);
    assert_eq!(rewritten_to(&forward), (client, backend));
    assert_eq!((forward.flags, forward.rev_nat_id), (0, 1));
    let reply = dp.flow(maps::CT, proto, backend, client);
    assert_eq!(rewritten_to(&reply), (SERVICE, client));
    assert_eq!((reply.flags, reply.rev_nat_id), (ct_flags::REPLY, 1));
    assert_eq!(dp.entries(maps::CT), 2);

    let (verdict, out) = dp.run(
        programs::FROM_POD,
        &segment(proto, backend, client, SYN | ACK),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = Packet::parse(&out);
    assert_eq!((out.source(), out.destination()), (SERVICE, client));
    assert_eq!((out.eth_dst, out.eth_src), (CLIENT.mac, CLIENT.host_mac));

    dp.assert_counts(&[
        (Reason::RedirectLocalPod, 2),
        (Reason::LbDnat, 1),
        (Reason::LbRevNat, 1),
    ]);
}

#[test]
fn tcp_to_a_cluster_ip_is_translated_both_ways() {
    cluster_ip_round_trip(TCP);
}

#[test]
fn udp_to_a_cluster_ip_is_translated_both_ways() {
    cluster_ip_round_trip(UDP);
}

/// The flow's next packets follow CT (no new backend selection), and a
/// reply without SYN marks both entries established.
#[test]
fn a_tcp_flow_is_established_by_its_reply() {
    let Some(mut dp) = Datapath::load() else {
        return;
    };
    dp.add_endpoint(&CLIENT);
    let backend = SocketAddrV4::new(Ipv4Addr::new(10, 244, 7, 7), 8080);
    dp.add_service(SERVICE, TCP, CLUSTER_IP, 1, &[backend]);
    let client = SocketAddrV4::new(CLIENT.ip, 40000);
    // The backend's replies come from the underlay (native routing).
    for (program, flags, from, to) in [
        (programs::FROM_POD, SYN, client, SERVICE),
        (programs::FROM_NETDEV, SYN | ACK, backend, client),
        (programs::FROM_POD, ACK, client, SERVICE),
        (programs::FROM_NETDEV, ACK, backend, client),
    ] {
        let (_, out) = dp.run(program, &packet::tcp(from, to, flags, 1000));
        Packet::parse(&out);
    }
    let established = ct_flags::ESTABLISHED;
    assert_eq!(dp.flow(maps::CT, TCP, client, SERVICE).flags, established);
    let reply = dp.flow(maps::CT, TCP, backend, client).flags;
    assert_eq!(reply, established | ct_flags::REPLY);
    // The backend is on no node this datapath knows: the stack routes the
    // requests; the replies go straight to the client.
    dp.assert_counts(&[
        (Reason::RedirectLocalPod, 2),
        (Reason::PassToStack, 2),
        (Reason::LbDnat, 2),
        (Reason::LbRevNat, 2),
    ]);
}

/// A Service without backends answers TCP with RST and UDP with ICMP port
/// unreachable, from the Service address, out where the packet came in;
/// so does an address in the Service CIDR that no Service uses.
#[test]
fn a_service_without_backends_is_refused() {
    let Some(mut dp) = Datapath::load() else {
        return;
    };
    dp.set_config(DatapathConfig {
        service_cidr_addr: ip_to_key(Ipv4Addr::new(10, 96, 0, 0)),
        service_cidr_mask: ip_to_key(Ipv4Addr::new(255, 240, 0, 0)),
        ..DatapathConfig::default()
    });
    dp.add_service(SERVICE, TCP, CLUSTER_IP, 1, &[]);
    dp.add_service(SERVICE, UDP, CLUSTER_IP, 2, &[]);
    dp.add_endpoint(&CLIENT);
    let client = SocketAddrV4::new(CLIENT.ip, 40000);

    let (verdict, out) = dp.run(programs::FROM_POD, &packet::tcp(client, SERVICE, SYN, 1000));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let rst = Packet::parse(&out);
    assert_eq!((rst.source(), rst.destination()), (SERVICE, client));
    assert_eq!(rst.tcp_flags(), RST | ACK);
    assert_eq!(rst.tcp_seq_ack(), (0, 1001));
    assert_eq!(
        (rst.eth_dst, rst.eth_src),
        (packet::SRC_MAC, packet::DST_MAC)
    );
    assert_eq!(out.len(), packet::ETH_LEN + 40);

    let unused = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 99), 53);
    for dst in [SERVICE, unused] {
        let request = packet::udp(client, dst, b"hello");
        let (verdict, out) = dp.run(programs::FROM_POD, &request);
        assert_eq!(verdict, TC_ACT_REDIRECT, "UDP to {dst}");
        let icmp = Packet::parse(&out);
        assert_eq!(
            (icmp.proto, icmp.src, icmp.dst),
            (ICMP, *dst.ip(), CLIENT.ip)
        );
        let unreachable = (ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE);
        assert_eq!(icmp.icmp_type_code(), unreachable);
        // It quotes the refused packet's IP header and first 8 bytes.
        let quoted = packet::ETH_LEN..packet::ETH_LEN + packet::IP_LEN + 8;
        assert_eq!(icmp.l4[8..], request[quoted]);
    }
    dp.assert_counts(&[(Reason::LbReject, 3)]);
    assert_eq!(dp.entries(maps::CT), 0);
}

/// NodePort from outside: DNAT to the backend and SNAT to the node (so
/// replies come back here); the reply leaves from the NodePort again,
/// redirected out of the device the request came in on.
#[test]
fn node_port_traffic_reaches_its_backend_from_the_node_address() {
    let Some(mut dp) = Datapath::load() else {
        return;
    };
    dp.set_config(DatapathConfig {
        node_addr: ip_to_key(NODE),
        ..DatapathConfig::default()
    });
    dp.add_endpoint(&BACKEND);
    let backend = SocketAddrV4::new(BACKEND.ip, 8080);
    let node_port = SocketAddrV4::new(NODE, 30080);
    let kind = (scope::EXTERNAL, service_flags::NODE_PORT);
    dp.add_service(node_port, TCP, kind, 3, &[backend]);
    let external = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 5555);

    let (verdict, out) = dp.run(
        programs::FROM_NETDEV,
        &packet::tcp(external, node_port, SYN, 1),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = Packet::parse(&out);
    assert_eq!((out.src, out.destination()), (NODE, backend));
    let snat = out.source();
    let reply_entry = dp.flow(maps::CT, TCP, backend, snat);
    assert_eq!(rewritten_to(&reply_entry), (node_port, external));
    assert_eq!(reply_entry.ifindex, TEST_RUN_IFINDEX);

    let (verdict, out) = dp.run(
        programs::FROM_POD,
        &packet::tcp(backend, snat, SYN | ACK, 1),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = Packet::parse(&out);
    assert_eq!((out.source(), out.destination()), (node_port, external));
    dp.assert_counts(&[
        (Reason::RedirectLocalPod, 1),
        (Reason::LbRevNat, 1),
        (Reason::ExternalDnat, 1),
    ]);
}

/// Pod traffic to outside the cluster leaves with the node's address and a
/// masquerade port (ICMP echo: identifier); replies get the pod's back.
/// Traffic to NON_MASQUERADE destinations is left alone.
#[test]
fn pod_traffic_leaving_the_cluster_is_masqueraded() {
    let Some(mut dp) = Datapath::load() else {
        return;
    };
    dp.set_config(DatapathConfig {
        node_addr: ip_to_key(NODE),
        masquerade: 1,
        ..DatapathConfig::default()
    });
    dp.add_endpoint(&CLIENT);
    dp.add_prefix(maps::NON_MASQUERADE, Ipv4Addr::new(10, 244, 0, 0), 16, 1u8);
    let client = SocketAddrV4::new(CLIENT.ip, 40000);
    let server = SocketAddrV4::new(Ipv4Addr::new(1, 1, 1, 1), 443);
    let masquerade_ports = tern_common::MASQUERADE_PORT_MIN..=tern_common::MASQUERADE_PORT_MAX;

    let (verdict, out) = dp.run(programs::TO_NETDEV, &packet::tcp(client, server, SYN, 1));
    assert_eq!(verdict, TC_ACT_OK);
    let out = Packet::parse(&out);
    assert_eq!((out.src, out.destination()), (NODE, server));
    let masqueraded = out.source();
    assert!(
        masquerade_ports.contains(&masqueraded.port()),
        "{masqueraded}"
    );
    assert_eq!(
        rewritten_to(&dp.flow(maps::NAT, TCP, server, masqueraded)),
        (server, client)
    );
    assert_eq!(dp.entries(maps::NAT), 2);

    let reply = packet::tcp(server, masqueraded, SYN | ACK, 1);
    let (verdict, out) = dp.run(programs::FROM_NETDEV, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = Packet::parse(&out);
    assert_eq!((out.source(), out.destination()), (server, client));
    assert_eq!(out.eth_dst, CLIENT.mac);

    let pinged = Ipv4Addr::new(8, 8, 8, 8);
    let echo = packet::icmp_echo(CLIENT.ip, pinged, ICMP_ECHO_REQUEST, 77, 1);
    let (verdict, out) = dp.run(programs::TO_NETDEV, &echo);
    assert_eq!(verdict, TC_ACT_OK);
    let out = Packet::parse(&out);
    assert_eq!((out.src, out.dst), (NODE, pinged));
    let id = out.icmp_echo_id();
    assert!(masquerade_ports.contains(&id), "echo identifier {id}");
    let echo_reply = packet::icmp_echo(pinged, NODE, ICMP_ECHO_REPLY, id, 1);
    let (verdict, out) = dp.run(programs::FROM_NETDEV, &echo_reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = Packet::parse(&out);
    assert_eq!(
        (out.src, out.dst, out.icmp_echo_id()),
        (pinged, CLIENT.ip, 77)
    );

    let in_cluster = packet::tcp(
        client,
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 5, 5), 80),
        SYN,
        1,
    );
    assert_eq!(
        dp.run(programs::TO_NETDEV, &in_cluster),
        (TC_ACT_OK, in_cluster)
    );
    dp.assert_counts(&[
        (Reason::RedirectLocalPod, 2),
        (Reason::Masquerade, 2),
        (Reason::MasqueradeReply, 2),
    ]);
    assert_eq!(dp.entries(maps::NAT), 4);
}

/// Overlay mode: a pod's packet for another node's PodCIDR is redirected
/// into the VXLAN device (TTL spent), addressed to that node's VTEP MAC;
/// the node's own packets there are addressed on the device's egress, and
/// ones for no known node are dropped.
#[test]
fn traffic_to_other_nodes_pods_goes_into_the_overlay() {
    let Some(mut dp) = Datapath::load() else {
        return;
    };
    let vxlan_ifindex = 42;
    dp.set_config(DatapathConfig {
        tunnel_ifindex: vxlan_ifindex,
        ..DatapathConfig::default()
    });
    let other_node = TunnelEndpoint {
        node_addr: ip_to_key(Ipv4Addr::new(192, 168, 1, 11)),
    };
    dp.add_prefix(maps::TUNNEL, Ipv4Addr::new(10, 244, 1, 0), 24, other_node);
    dp.add_endpoint(&CLIENT);
    let client = SocketAddrV4::new(CLIENT.ip, 40000);
    let remote_pod = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 9), 80);

    // Addressed to the far node's VTEP MAC: the device's FDB entry for it
    // names the outer destination.
    let far_mac = tern_common::vtep_mac(other_node.node_addr);
    assert_eq!(far_mac, [0x0e, 0x74, 192, 168, 1, 11]);
    let (verdict, out) = dp.run(programs::FROM_POD, &packet::tcp(client, remote_pod, SYN, 1));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[..6], far_mac);
    let pod_frame = out.clone();
    let out = Packet::parse(&out);
    assert_eq!(
        (out.source(), out.destination(), out.ttl),
        (client, remote_pod, 63)
    );
    // On through the device's egress as it is.
    assert_eq!(
        dp.run(programs::TO_OVERLAY, &pod_frame),
        (TC_ACT_OK, pod_frame)
    );

    // The node's own packet, addressed by its stack to the device's own
    // MAC: only the destination MAC changes.
    let node = SocketAddrV4::new(NODE, 40000);
    let from_node = packet::tcp(node, remote_pod, SYN, 1);
    let mut addressed = from_node.clone();
    addressed[..6].copy_from_slice(&far_mac);
    assert_eq!(
        dp.run(programs::TO_OVERLAY, &from_node),
        (TC_ACT_OK, addressed)
    );
    let nowhere = packet::tcp(
        node,
        SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 80),
        SYN,
        1,
    );
    assert_eq!(dp.run(programs::TO_OVERLAY, &nowhere).0, TC_ACT_SHOT);
    dp.assert_counts(&[(Reason::EncapOverlay, 2)]);
}

/// The pod's ARP request for its gateway is answered from the host veth's
/// MAC, back out of the device it came in on; requests for anything else,
/// from another pod's address, or replies are left to the kernel.
#[test]
fn the_gateway_answers_its_pods_arp() {
    let Some(mut dp) = Datapath::load() else {
        return;
    };
    let gateway = Ipv4Addr::from(tern_common::POD_GATEWAY);
    // The pod behind the device the test run uses; BACKEND is elsewhere.
    let pod = LocalPod {
        ifindex: TEST_RUN_IFINDEX,
        ..CLIENT
    };
    dp.add_endpoint(&pod);
    let elsewhere = LocalPod {
        ifindex: TEST_RUN_IFINDEX + 11,
        ..BACKEND
    };
    dp.add_endpoint(&elsewhere);
    let new_mac = [0xc2, 0, 0, 0, 0, 0x42];

    let request = packet::arp(ARP_REQUEST, new_mac, pod.ip, [0; 6], gateway);
    let (verdict, out) = dp.run(programs::FROM_POD, &request);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        packet::arp(ARP_REPLY, pod.host_mac, gateway, new_mac, pod.ip)
    );

    let unanswered = [
        packet::arp(
            ARP_REQUEST,
            new_mac,
            pod.ip,
            [0; 6],
            Ipv4Addr::new(10, 244, 0, 1),
        ),
        packet::arp(ARP_REQUEST, new_mac, BACKEND.ip, [0; 6], gateway),
        packet::arp(
            ARP_REQUEST,
            new_mac,
            Ipv4Addr::new(10, 244, 0, 99),
            [0; 6],
            gateway,
        ),
        packet::arp(ARP_REPLY, new_mac, pod.ip, pod.host_mac, gateway),
    ];
    for frame in &unanswered {
        assert_eq!(
            dp.run(programs::FROM_POD, frame),
            (TC_ACT_OK, frame.clone())
        );
    }
    dp.assert_counts(&[(Reason::NotIpv4, 4), (Reason::GatewayArpReply, 1)]);
}

/// A pod with an ingress limit gets its traffic through its host veth (the
/// neighbour path, whose qdisc shapes it), not straight into its peer: the
/// frame leaves with the TTL spent but its MACs for the kernel to fill.
#[test]
fn a_pod_with_an_ingress_limit_is_reached_through_its_host_veth() {
    let Some(mut dp) = Datapath::load() else {
        return;
    };
    dp.add_endpoint(&CLIENT);
    dp.add_endpoint_with(&BACKEND, tern_common::endpoint_flags::INGRESS_SHAPED);
    let client = SocketAddrV4::new(CLIENT.ip, 40000);
    let backend = SocketAddrV4::new(BACKEND.ip, 8080);
    let (verdict, out) = dp.run(programs::FROM_POD, &packet::tcp(client, backend, SYN, 1));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = Packet::parse(&out);
    assert_eq!(out.ttl, 63);
    assert_ne!(
        out.eth_dst, BACKEND.mac,
        "the peer path's MACs were written"
    );
    let (verdict, out) = dp.run(
        programs::FROM_POD,
        &packet::tcp(backend, client, SYN | ACK, 1),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        Packet::parse(&out).eth_dst,
        CLIENT.mac,
        "unlimited pods keep the peer path"
    );
    dp.assert_counts(&[(Reason::RedirectLocalPod, 2)]);
}

/// On a pod veth with an ingress qdisc of its own (a chained bandwidth
/// plugin's egress shaping), Services are still translated, and every
/// packet then goes on to that qdisc (TCX_NEXT) instead of being
/// redirected past it.
#[test]
fn a_pod_behind_its_own_qdisc_is_translated_then_left_to_it() {
    const TCX_NEXT: i32 = -1;
    let Some(mut dp) = Datapath::load() else {
        return;
    };
    dp.add_endpoint(&CLIENT);
    dp.add_endpoint(&BACKEND);
    let backend = SocketAddrV4::new(BACKEND.ip, 8080);
    dp.add_service(SERVICE, TCP, CLUSTER_IP, 1, &[backend]);
    let client = SocketAddrV4::new(CLIENT.ip, 40000);

    let (verdict, out) = dp.run(
        programs::FROM_POD_VIA_QDISC,
        &packet::tcp(client, SERVICE, SYN, 1),
    );
    assert_eq!(verdict, TCX_NEXT);
    let out = Packet::parse(&out);
    assert_eq!((out.source(), out.destination()), (client, backend));
    assert_eq!(out.ttl, 64, "the stack routes it, and spends the TTL");
    let to_pod = packet::tcp(client, backend, SYN, 2);
    assert_eq!(
        dp.run(programs::FROM_POD_VIA_QDISC, &to_pod),
        (TCX_NEXT, to_pod)
    );
    dp.assert_counts(&[(Reason::LbDnat, 1), (Reason::ToPodQdisc, 2)]);
}

/// NetworkPolicy at an ingress-isolated pod: a new connection from an
/// allowed identity to an allowed port passes and is tracked, its reply
/// follows the entry; another port is dropped; once the pod's policy
/// changes (new revision, entry gone) the same connection's next packet
/// is judged again and dropped. A pod speaking from another address is
/// dropped before anything else.
#[test]
fn policy_is_judged_once_per_connection_and_again_after_a_change() {
    use tern_common::{PolicyEndpoint, PolicyKey, PolicyRuleRef, policy_direction, policy_flags};
    let Some(mut dp) = Datapath::load() else {
        return;
    };
    dp.add_endpoint(&CLIENT);
    dp.add_endpoint(&BACKEND);
    let client_identity = 7u32;
    dp.hash::<u32, u32>(maps::IDENTITIES)
        .insert(ip_to_key(CLIENT.ip), client_identity, 0)
        .unwrap();
    let isolated = |revision| PolicyEndpoint {
        revision,
        flags: policy_flags::INGRESS_ISOLATED,
        ingress_policy: 3,
        egress_policy: 0,
    };
    dp.hash::<u32, PolicyEndpoint>(maps::POLICY_ENDPOINTS)
        .insert(ip_to_key(BACKEND.ip), isolated(1), 0)
        .unwrap();
    let allow = Key::new(
        96,
        PolicyKey {
            endpoint: ip_to_key(BACKEND.ip),
            identity: client_identity.to_be_bytes(),
            direction: policy_direction::INGRESS,
            proto: TCP,
            port: 8080u16.to_be_bytes(),
        },
    );
    {
        let mut policy: LpmTrie<_, PolicyKey, PolicyRuleRef> =
            LpmTrie::try_from(dp.ebpf.map_mut(maps::POLICY).unwrap()).unwrap();
        policy
            .insert(&allow, PolicyRuleRef { policy: 3, rule: 0 }, 0)
            .unwrap();
    }
    let client = SocketAddrV4::new(CLIENT.ip, 40000);
    let server = SocketAddrV4::new(BACKEND.ip, 8080);
    let other_port = SocketAddrV4::new(BACKEND.ip, 9090);

    let (verdict, _) = dp.run(programs::FROM_POD, &packet::tcp(client, server, SYN, 1));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, _) = dp.run(programs::FROM_POD, &packet::tcp(client, other_port, SYN, 1));
    assert_eq!(verdict, TC_ACT_SHOT);
    let (verdict, _) = dp.run(
        programs::FROM_POD,
        &packet::tcp(server, client, SYN | ACK, 1),
    );
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "the reply follows the tracked entry"
    );
    let (verdict, _) = dp.run(programs::FROM_POD, &packet::tcp(client, server, ACK, 2));
    assert_eq!(verdict, TC_ACT_REDIRECT);

    // The policy changes: the entry goes, the revision moves on.
    {
        let mut policy: LpmTrie<_, PolicyKey, PolicyRuleRef> =
            LpmTrie::try_from(dp.ebpf.map_mut(maps::POLICY).unwrap()).unwrap();
        policy.remove(&allow).unwrap();
    }
    dp.hash::<u32, PolicyEndpoint>(maps::POLICY_ENDPOINTS)
        .insert(ip_to_key(BACKEND.ip), isolated(2), 0)
        .unwrap();
    let (verdict, _) = dp.run(programs::FROM_POD, &packet::tcp(client, server, ACK, 3));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "the established connection is judged again"
    );
    // The backend may still reach the client: its segment passes as a
    // packet of its own, but opens nothing the client's could follow.
    let (verdict, _) = dp.run(programs::FROM_POD, &packet::tcp(server, client, ACK, 3));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, _) = dp.run(programs::FROM_POD, &packet::tcp(client, server, ACK, 4));
    assert_eq!(verdict, TC_ACT_SHOT, "the cut connection stays cut");

    // ICMP errors about a connection reach an isolated pod (PMTU
    // discovery); an echo request is a connection of its own.
    let error = packet::icmp_echo(CLIENT.ip, BACKEND.ip, ICMP_DEST_UNREACHABLE, 0, 0);
    assert_eq!(dp.run(programs::FROM_POD, &error).0, TC_ACT_REDIRECT);
    let echo = packet::icmp_echo(CLIENT.ip, BACKEND.ip, ICMP_ECHO_REQUEST, 1, 1);
    assert_eq!(dp.run(programs::FROM_POD, &echo).0, TC_ACT_SHOT);

    // Nobody speaks as a pod: not another pod, not a packet from outside
    // with a local pod's or the hairpin address.
    let spoofed = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 99), 40000);
    let (verdict, _) = dp.run(programs::FROM_POD, &packet::tcp(spoofed, server, SYN, 1));
    assert_eq!(verdict, TC_ACT_SHOT);
    let hairpin = SocketAddrV4::new(Ipv4Addr::from(tern_common::HAIRPIN_ADDR), 40000);
    for forged in [client, hairpin] {
        let (verdict, _) = dp.run(programs::FROM_NETDEV, &packet::tcp(forged, server, SYN, 1));
        assert_eq!(verdict, TC_ACT_SHOT, "{forged} from outside");
    }
    // A TCP header cut short cannot be judged: dropped, not handed on.
    let mut cut = packet::tcp(client, server, SYN, 9);
    cut.truncate(packet::ETH_LEN + packet::IP_LEN + 10);
    assert_eq!(dp.run(programs::FROM_POD, &cut).0, TC_ACT_SHOT);
    dp.assert_counts(&[
        (Reason::RedirectLocalPod, 5),
        (Reason::PolicyDeniedIngress, 4),
        (Reason::PolicyAllowedIngress, 1),
        (Reason::SourceNotPod, 3),
        (Reason::MalformedIpv4, 1),
    ]);
    // Allowed and denied, per policy: the one isolating the backend.
    let per_policy = |map: &str| -> u64 {
        let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(dp.ebpf.map(map).unwrap()).unwrap();
        counts.get(&3, 0).unwrap().iter().sum()
    };
    assert_eq!(per_policy(maps::POLICY_COUNTS), 1);
    assert_eq!(per_policy(maps::POLICY_DENIALS), 4);
}
