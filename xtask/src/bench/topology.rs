//! The networks a benchmark runs on, built from lab namespaces.
//!
//! - `Plain`: the physical limit — client and server namespaces joined by
//!   veths through a router namespace with static routes and no BPF at all
//!   (also where kube-proxy's rules are installed).
//! - `Tern`: a lab node running the real agent with a client and a server
//!   pod wired by the real tern-cni.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;
use tern_tests::lab::{Lab, LabNode, Pod};
use tern_tests::netns::Netns;

pub const PLAIN_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
pub const PLAIN_SERVER: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 2);
/// What kube-proxy would call the cluster CIDR in the plain topology:
/// traffic from it is not masqueraded.
pub const PLAIN_CLUSTER_CIDR: &str = "10.10.0.0/16";

pub struct Plain {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
}

impl Plain {
    pub fn new() -> Result<Plain> {
        let client = Netns::new("bc")?;
        let router = Netns::new("br")?;
        let server = Netns::new("bs")?;
        router.sh(&format!(
            "ip link add c0 type veth peer name eth0 netns {c}
             ip link add s0 type veth peer name eth0 netns {s}
             ip addr add 10.10.1.1/24 dev c0
             ip addr add 10.10.2.1/24 dev s0
             ip link set c0 up
             ip link set s0 up",
            c = client.name(),
            s = server.name()
        ))?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        client.sh(&format!(
            "ip addr add {PLAIN_CLIENT}/24 dev eth0\nip link set eth0 up\nip route add default via 10.10.1.1"
        ))?;
        server.sh(&format!(
            "ip addr add {PLAIN_SERVER}/24 dev eth0\nip link set eth0 up\nip route add default via 10.10.2.1"
        ))?;
        Ok(Plain {
            client,
            router,
            server,
        })
    }
}

pub struct Tern {
    pub client: Pod,
    pub server: Pod,
    pub node: LabNode,
    /// Kept for its switch namespace; dropped last.
    _lab: Lab,
}

impl Tern {
    pub fn new(socket_lb: bool, cidr: &str) -> Result<Tern> {
        let lab = Lab::new()?;
        let node = lab.node_with("bench", cidr, Ipv4Addr::new(10, 0, 0, 11), socket_lb)?;
        let client = node.add_pod("client")?;
        let server = node.add_pod("server")?;
        Ok(Tern {
            client,
            server,
            node,
            _lab: lab,
        })
    }
}

pub fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}
