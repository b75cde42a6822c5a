//! The networks a benchmark runs on, built from lab namespaces.
//!
//! - `Plain`: the physical limit — client and server namespaces joined by
//!   veths through a router namespace with static routes and no BPF at all
//!   (also where kube-proxy's rules are installed).
//! - `HostNs`: client and server in one namespace, as two host-network
//!   pods of a node are: their traffic goes over loopback, no device pair
//!   at all — the limit a pod device can only approach (netkit's claim).
//! - `Tern`: a lab node running the real agent with a client and a server
//!   pod wired by the real tern-cni (and more server pods on demand, the
//!   backends of a Service whose scheduler is measured).
//! - `KernelNodes`: two nodes on a lab underlay switch, a pod behind each,
//!   joined the way Flannel does it with the kernel alone: plain routes
//!   via the other node (host-gw) or a VXLAN device with static neighbour
//!   and forwarding entries (vxlan backend). No BPF.
//! - `TernNodes`: two lab nodes running the real agent (overlay or native
//!   routing), a client pod on the first and a server pod on the second.
//!
//! Every instance is its own set of namespaces (unique names), its own lab
//! switch, and for a Tern node its own pins, cgroup and state directory, so
//! any number of them coexist: a group keeps all of its rows' topologies up
//! while it measures them interleaved ([`Topology`]).

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;
use tern_lab::lab::{Lab, LabNode, Pod};
use tern_lab::netns::Netns;

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

/// One namespace for both ends, loopback between them. Loopback gets the
/// pods' MTU (1500 like the veths), so the row differs from the others in
/// the path, not in the packet size.
pub struct HostNs {
    pub ns: Netns,
}

impl HostNs {
    pub fn new() -> Result<HostNs> {
        let ns = Netns::new("bh")?;
        ns.sh("ip link set lo mtu 1500")?;
        Ok(HostNs { ns })
    }
}

pub struct Tern {
    pub client: Pod,
    pub server: Pod,
    /// Server pods besides `server`, running the same servers: the other
    /// endpoints of a Service with several backends. Empty unless asked for
    /// ([`Tern::with_servers`]).
    pub more_servers: Vec<Pod>,
    pub node: LabNode,
    /// Kept for its switch namespace; dropped last.
    _lab: Lab,
}

impl Tern {
    pub fn new(socket_lb: bool, cidr: &str) -> Result<Tern> {
        Tern::with_servers(socket_lb, cidr, 1)
    }

    /// The node with `servers` server pods (at least one): `server`, then
    /// `server-1`, `server-2`... in `more_servers`.
    pub fn with_servers(socket_lb: bool, cidr: &str, servers: usize) -> Result<Tern> {
        let (lab, node) = Tern::node(socket_lb, cidr)?;
        let client = node.add_pod("client")?;
        let server = node.add_pod("server")?;
        let more_servers = (1..servers)
            .map(|i| node.add_pod(&format!("server-{i}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tern {
            client,
            server,
            more_servers,
            node,
            _lab: lab,
        })
    }

    /// Every server pod, `server` first.
    pub fn servers(&self) -> impl Iterator<Item = &Pod> {
        std::iter::once(&self.server).chain(&self.more_servers)
    }

    /// The same node with its pods added as a Kubernetes runtime adds
    /// them: CNI_ARGS name them `namespace`/client and `namespace`/server,
    /// by which the agent finds their Pod objects (NetworkPolicy needs
    /// them; the objects are the caller's to write).
    pub fn with_k8s_pods(cidr: &str, namespace: &str) -> Result<Tern> {
        let (lab, node) = Tern::node(true, cidr)?;
        let client = node.add_k8s_pod(namespace, "client")?;
        let server = node.add_k8s_pod(namespace, "server")?;
        Ok(Tern {
            client,
            server,
            more_servers: Vec::new(),
            node,
            _lab: lab,
        })
    }

    fn node(socket_lb: bool, cidr: &str) -> Result<(Lab, LabNode)> {
        let lab = Lab::new()?;
        let mut node = LabNode::create(&lab, "bench", Some(cidr), Ipv4Addr::new(10, 0, 0, 11))?;
        node.socket_lb = socket_lb;
        // Same-node traffic never touches the overlay; native mode keeps
        // the pods at the underlay's MTU, like the physical limit's veths.
        node.routing_mode = "native".into();
        node.start_agent()?;
        Ok((lab, node))
    }
}

/// How `KernelNodes` carries pod traffic between the nodes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum KernelRouting {
    /// Flannel's host-gw backend: a route per remote PodCIDR via its node.
    Routes,
    /// Flannel's vxlan backend: `flannel.1`, VNI 1, port 8472, with static
    /// neighbour and FDB entries for the other node.
    Vxlan,
}

pub struct KernelNodes {
    pub client: Netns,
    pub server: Netns,
    pub server_ip: Ipv4Addr,
    _nodes: [Netns; 2],
    _lab: Lab,
}

impl KernelNodes {
    pub fn new(routing: KernelRouting) -> Result<KernelNodes> {
        let lab = Lab::new()?;
        let nodes = [Netns::new("kn1")?, Netns::new("kn2")?];
        let pods = [Netns::new("kp1")?, Netns::new("kp2")?];
        let mtu = match routing {
            KernelRouting::Routes => 1500,
            KernelRouting::Vxlan => 1450,
        };
        for (i, (node, pod)) in nodes.iter().zip(&pods).enumerate() {
            let n = i + 1;
            let other = 3 - n;
            lab.plug(node, Ipv4Addr::new(10, 0, 0, n as u8))?;
            node.sysctl("net.ipv4.ip_forward", "1")?;
            // The pod: 10.244.n.2 behind a veth whose node end is its gateway.
            node.sh(&format!(
                "ip link add veth0 mtu {mtu} type veth peer name eth0 mtu {mtu} netns {pod}
                 ip addr add 10.244.{n}.1/24 dev veth0
                 ip link set veth0 up",
                pod = pod.name()
            ))?;
            pod.sh(&format!(
                "ip addr add 10.244.{n}.2/24 dev eth0
                 ip link set eth0 up
                 ip route add default via 10.244.{n}.1"
            ))?;
            match routing {
                KernelRouting::Routes => node.sh(&format!(
                    "ip route add 10.244.{other}.0/24 via 10.0.0.{other}"
                ))?,
                KernelRouting::Vxlan => node.sh(&format!(
                    "ip link add flannel.1 address 02:00:00:00:00:0{n} type vxlan id 1                        local 10.0.0.{n} dev eth0 dstport 8472 nolearning
                     ip link set flannel.1 mtu 1450 up
                     ip addr add 10.244.{n}.0/32 dev flannel.1
                     ip neigh add 10.244.{other}.0 lladdr 02:00:00:00:00:0{other} dev flannel.1 nud permanent
                     bridge fdb append 02:00:00:00:00:0{other} dev flannel.1 dst 10.0.0.{other}
                     ip route add 10.244.{other}.0/24 via 10.244.{other}.0 dev flannel.1 onlink"
                ))?,
            };
        }
        let [client, server] = pods;
        Ok(KernelNodes {
            client,
            server,
            server_ip: Ipv4Addr::new(10, 244, 2, 2),
            _nodes: nodes,
            _lab: lab,
        })
    }
}

pub struct TernNodes {
    pub client: Pod,
    pub server: Pod,
    _nodes: Vec<LabNode>,
    _lab: Lab,
}

impl TernNodes {
    pub fn new(routing_mode: &str) -> Result<TernNodes> {
        let lab = Lab::new()?;
        let nodes = lab.cluster(2, routing_mode)?;
        let client = nodes[0].add_pod("client")?;
        let server = nodes[1].add_pod("server")?;
        Ok(TernNodes {
            client,
            server,
            _nodes: nodes,
            _lab: lab,
        })
    }
}

/// Any of the above, as one row of a group measures it.
pub enum Topology {
    Plain(Plain),
    HostNs(HostNs),
    // Boxed: a lab node is large, and a group holds a few of these.
    Tern(Box<Tern>),
    KernelNodes(KernelNodes),
    TernNodes(TernNodes),
}

impl Topology {
    /// Where the servers run.
    pub fn server(&self) -> &Netns {
        match self {
            Topology::Plain(t) => &t.server,
            Topology::HostNs(t) => &t.ns,
            Topology::Tern(t) => &t.server.ns,
            Topology::KernelNodes(t) => &t.server,
            Topology::TernNodes(t) => &t.server.ns,
        }
    }

    /// Every namespace that runs the servers: [`Topology::server`], then a
    /// Tern node's further server pods (the backends of one Service).
    pub fn servers(&self) -> Vec<&Netns> {
        match self {
            Topology::Tern(t) => t.servers().map(|p| &p.ns).collect(),
            _ => vec![self.server()],
        }
    }

    /// Where the clients run.
    pub fn client(&self) -> &Netns {
        match self {
            Topology::Plain(t) => &t.client,
            Topology::HostNs(t) => &t.ns,
            Topology::Tern(t) => &t.client.ns,
            Topology::KernelNodes(t) => &t.client,
            Topology::TernNodes(t) => &t.client.ns,
        }
    }

    /// The server's own address.
    pub fn server_ip(&self) -> Ipv4Addr {
        match self {
            Topology::Plain(_) => PLAIN_SERVER,
            Topology::HostNs(_) => Ipv4Addr::LOCALHOST,
            Topology::Tern(t) => t.server.ip,
            Topology::KernelNodes(t) => t.server_ip,
            Topology::TernNodes(t) => t.server.ip,
        }
    }

    /// The node whose pods cgroup a client joins for socket-LB.
    pub fn node(&self) -> Option<&LabNode> {
        match self {
            Topology::Tern(t) => Some(&t.node),
            _ => None,
        }
    }
}

pub fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}
