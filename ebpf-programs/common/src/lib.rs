//! Map keys and values shared by Tern's eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side reads it with
//! raw loads, the user side (feature "user") writes it through aya maps.
#![no_std]

/// Every map of the datapath: its name, as the eBPF object defines it and
/// the agent pins it, with its type and key/value layout. The `#[map]`
/// statics in tern-ebpf are declared separately (each needs its Rust type);
/// the agent's tests check the built object against this list, both ways.
pub mod maps {
    use core::mem::size_of;

    use super::{
        AffinityKey, AffinityValue, Backend, CtKey, CtValue, DatapathConfig, EndpointInfo,
        EventBudget, LbTable, PolicyCidrKey, PolicyEndpoint, PolicyFlowKey, PolicyFlowValue,
        PolicyKey, PolicyRuleRef, RevNat, ServiceKey, ServiceValue, SockRevNatKey, SourceRangeKey,
        TunnelEndpoint,
    };

    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const METRICS: &str = "METRICS";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const REVNAT: &str = "REVNAT";
    pub const LB_TABLES: &str = "LB_TABLES";
    pub const AFFINITY: &str = "AFFINITY";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const CONFIG: &str = "CONFIG";
    pub const CT: &str = "CT";
    pub const TUNNEL: &str = "TUNNEL";
    pub const NAT: &str = "NAT";
    pub const NON_MASQUERADE: &str = "NON_MASQUERADE";
    pub const IDENTITIES: &str = "IDENTITIES";
    pub const POLICY_ENDPOINTS: &str = "POLICY_ENDPOINTS";
    pub const POLICY: &str = "POLICY";
    pub const POLICY_CIDR: &str = "POLICY_CIDR";
    pub const POLICY_CT: &str = "POLICY_CT";
    pub const POLICY_COUNTS: &str = "POLICY_COUNTS";
    pub const POLICY_DENIALS: &str = "POLICY_DENIALS";
    pub const EVENTS: &str = "EVENTS";
    pub const DROPS: &str = "DROPS";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const CONNECTIONS: &str = "CONNECTIONS";
    pub const LB_SOCKETS: &str = "LB_SOCKETS";

    /// Pins earlier agents created under names no map has any more: removed
    /// at load (LB_TABLES was MAGLEV before it held other schedulers' tables).
    pub const RETIRED: [&str; 1] = ["MAGLEV"];

    /// The BPF map type (the aya-ebpf map the static is declared as).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum MapKind {
        Hash,
        LruHash,
        Array,
        PerCpuArray,
        /// Keys carry a 32-bit prefix length in front of the data.
        LpmTrie,
        /// A BPF ring buffer: no keys or values; its size is in bytes.
        RingBuf,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MapSpec {
        pub name: &'static str,
        pub kind: MapKind,
        /// Bytes, as the kernel sees them (LPM trie keys include the prefix
        /// length).
        pub key_size: u32,
        pub value_size: u32,
        /// An operator may change its capacity (agent `--map-size`).
        pub resizable: bool,
    }

    impl MapSpec {
        const fn new<K, V>(name: &'static str, kind: MapKind, resizable: bool) -> Self {
            let prefix_len = match kind {
                MapKind::LpmTrie => size_of::<u32>(),
                _ => 0,
            };
            MapSpec {
                name,
                kind,
                key_size: (prefix_len + size_of::<K>()) as u32,
                value_size: size_of::<V>() as u32,
                resizable,
            }
        }
    }

    const RESIZABLE: bool = true;
    const FIXED: bool = false;

    pub const ALL: [MapSpec; 26] = [
        MapSpec::new::<u32, EndpointInfo>(ENDPOINTS, MapKind::Hash, RESIZABLE),
        // Indexed by `Reason`: its size is `Reason::COUNT`.
        MapSpec::new::<u32, u64>(METRICS, MapKind::PerCpuArray, FIXED),
        MapSpec::new::<ServiceKey, ServiceValue>(SERVICES, MapKind::Hash, RESIZABLE),
        MapSpec::new::<u32, Backend>(BACKENDS, MapKind::Hash, RESIZABLE),
        MapSpec::new::<u32, RevNat>(REVNAT, MapKind::Hash, RESIZABLE),
        MapSpec::new::<u32, LbTable>(LB_TABLES, MapKind::Hash, RESIZABLE),
        MapSpec::new::<AffinityKey, AffinityValue>(AFFINITY, MapKind::LruHash, RESIZABLE),
        MapSpec::new::<SockRevNatKey, RevNat>(SOCK_REVNAT, MapKind::LruHash, RESIZABLE),
        // One entry.
        MapSpec::new::<u32, DatapathConfig>(CONFIG, MapKind::Array, FIXED),
        MapSpec::new::<CtKey, CtValue>(CT, MapKind::LruHash, RESIZABLE),
        MapSpec::new::<u32, TunnelEndpoint>(TUNNEL, MapKind::LpmTrie, RESIZABLE),
        MapSpec::new::<CtKey, CtValue>(NAT, MapKind::Hash, RESIZABLE),
        MapSpec::new::<u32, u8>(NON_MASQUERADE, MapKind::LpmTrie, RESIZABLE),
        MapSpec::new::<u32, u32>(IDENTITIES, MapKind::Hash, RESIZABLE),
        MapSpec::new::<u32, PolicyEndpoint>(POLICY_ENDPOINTS, MapKind::Hash, RESIZABLE),
        MapSpec::new::<PolicyKey, PolicyRuleRef>(POLICY, MapKind::LpmTrie, RESIZABLE),
        MapSpec::new::<PolicyCidrKey, u32>(POLICY_CIDR, MapKind::LpmTrie, RESIZABLE),
        MapSpec::new::<PolicyFlowKey, PolicyFlowValue>(POLICY_CT, MapKind::LruHash, RESIZABLE),
        // Indexed by policy number: its size is `POLICY_NUMBERS_MAX`.
        MapSpec::new::<u32, u64>(POLICY_COUNTS, MapKind::PerCpuArray, FIXED),
        // The same, for denials.
        MapSpec::new::<u32, u64>(POLICY_DENIALS, MapKind::PerCpuArray, FIXED),
        // Flow events for the agent; its size (bytes) is the agent's
        // `--events-ring-size`.
        MapSpec::new::<(), ()>(EVENTS, MapKind::RingBuf, FIXED),
        // Indexed by `DropReason * 2 + Direction`.
        MapSpec::new::<u32, u64>(DROPS, MapKind::PerCpuArray, FIXED),
        // One entry per CPU: the drop-event rate limit.
        MapSpec::new::<u32, EventBudget>(EVENT_BUDGET, MapKind::PerCpuArray, FIXED),
        MapSpec::new::<SourceRangeKey, u8>(SOURCE_RANGES, MapKind::LpmTrie, RESIZABLE),
        // Open connections by backend id (least-connection schedulers).
        MapSpec::new::<u32, u32>(CONNECTIONS, MapKind::Hash, RESIZABLE),
        // Socket cookie -> backend id of a socket-LB connection counted there.
        MapSpec::new::<u64, u32>(LB_SOCKETS, MapKind::LruHash, RESIZABLE),
    ];

    /// The map called `name`.
    pub fn spec(name: &str) -> Option<&'static MapSpec> {
        ALL.iter().find(|map| map.name == name)
    }

    /// Names of the maps whose capacity an operator may change.
    pub fn resizable() -> impl Iterator<Item = &'static str> {
        ALL.iter().filter(|map| map.resizable).map(|map| map.name)
    }
}

/// Program names (the Rust function names in tern-ebpf).
pub mod programs {
    /// tc ingress on the host side of each pod veth: traffic leaving a pod.
    pub const FROM_POD: &str = "from_pod";
    /// In its place on a pod veth that has an ingress qdisc of its own (a
    /// chained plugin's egress shaping): Services are translated, then
    /// the packet goes on to that qdisc and the node's stack.
    pub const FROM_POD_VIA_QDISC: &str = "from_pod_via_qdisc";
    /// tc ingress on the node's underlay devices: NodePort, LoadBalancer and
    /// externalIPs for clients outside the cluster.
    pub const FROM_NETDEV: &str = "from_netdev";
    /// tc ingress on the node's VXLAN device: decapsulated traffic from
    /// pods on other nodes, delivered straight to the local pod.
    pub const FROM_OVERLAY: &str = "from_overlay";
    /// tc egress on the VXLAN device: the node's own traffic to other
    /// nodes' pods gets its tunnel far end.
    pub const TO_OVERLAY: &str = "to_overlay";
    /// tc egress on the node's underlay devices: masquerade of pod traffic
    /// leaving the cluster.
    pub const TO_NETDEV: &str = "to_netdev";
    /// Socket-LB: cgroup v2 hooks translating Service addresses at the socket.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    pub const SOCK_POST_BIND4: &str = "sock_post_bind4";
    /// A socket's release: its counted socket-LB connection ends.
    pub const SOCK_RELEASE: &str = "sock_release";

    /// Every program of the object.
    pub const ALL: [&str; 12] = [
        FROM_POD,
        FROM_POD_VIA_QDISC,
        FROM_NETDEV,
        FROM_OVERLAY,
        TO_OVERLAY,
        TO_NETDEV,
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
        SOCK_POST_BIND4,
        SOCK_RELEASE,
    ];
}

/// Every map key and value below is read by the eBPF programs and written by
/// the agent (possibly an older one, through pinned maps): both sides must
/// agree on the exact bytes. `layout!` fixes each type's size and alignment,
/// so a change is a deliberate one, and checks that its fields (all of them
/// listed) fill it: padding must be an explicit `pad` field, since the kernel
/// compares keys bytewise and implicit padding is uninitialised.
macro_rules! layout {
    ($type:ty { $($field:ident),+ }, size $size:expr, align $align:expr) => {
        const _: () = {
            assert!(
                core::mem::size_of::<$type>() == $size && core::mem::align_of::<$type>() == $align,
                concat!("the size or alignment of ", stringify!($type), " changed")
            );
            let value = core::mem::MaybeUninit::<$type>::uninit();
            let base = value.as_ptr();
            // SAFETY: field addresses only; nothing is read.
            let fields = 0 $(+ $crate::field_size(unsafe { &raw const (*base).$field }))+;
            assert!(
                fields == $size,
                concat!(stringify!($type), " has implicit padding, or a field is not listed")
            );
        };
    };
}

#[doc(hidden)]
pub const fn field_size<F>(_: *const F) -> usize {
    core::mem::size_of::<F>()
}

pub mod events;
pub use events::{DropReason, EventBudget, FlowEvent};
pub mod service;
pub use service::*;

/// Default capacity of the ENDPOINTS map (local pods on one node).
pub const ENDPOINTS_MAX: u32 = 16384;

/// The link-local gateway every pod routes through (169.254.1.1). No
/// device has it: the pod's neighbour entry names the host veth's MAC, and
/// the host-side program answers the pod's ARP for it when that entry is
/// gone.
pub const POD_GATEWAY: [u8; 4] = [169, 254, 1, 1];

/// EndpointInfo flags.
pub mod endpoint_flags {
    /// What the pod receives is shaped on its host veth: deliver through
    /// that device's egress (and qdisc), not straight to its peer.
    pub const INGRESS_SHAPED: u32 = 1 << 0;
}

/// ENDPOINTS value: where a local pod lives. Key: the pod's IPv4 address
/// as a `u32` in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the host-side veth; the packet is redirected to its peer.
    pub ifindex: u32,
    /// `endpoint_flags`.
    pub flags: u32,
    /// MAC of the pod's interface (destination MAC on delivery).
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth (source MAC on delivery: the pod's gateway).
    pub host_mac: [u8; 6],
}
layout!(EndpointInfo { ifindex, flags, pod_mac, host_mac }, size 20, align 4);

/// Default capacity of the TUNNEL map (remote PodCIDRs: one or two per node).
pub const TUNNEL_MAX: u32 = 16384;

/// Default capacity of the NAT map (masqueraded flows: two entries each).
/// A plain hash, not LRU: when it is full, new flows are refused and
/// counted instead of silently breaking live ones.
pub const NAT_MAX: u32 = 262_144;
/// Default capacity of NON_MASQUERADE (destinations kept unmasqueraded).
pub const NON_MASQUERADE_MAX: u32 = 4096;
/// Masqueraded flows get node ports from here, above Linux's default
/// ephemeral range (32768-60999), so they never collide with the node's
/// own connections.
pub const MASQUERADE_PORT_MIN: u16 = 61000;
pub const MASQUERADE_PORT_MAX: u16 = 65535;

/// VXLAN network identifier of the overlay (Flannel's too): the same on
/// every node.
pub const OVERLAY_VNI: u32 = 1;

/// The overlay address (VTEP MAC) that stands for a node on the overlay
/// device: locally administered, the node's underlay address (network
/// order, as in `TunnelEndpoint`) in its last four bytes. Every node
/// derives it alike, so nothing has to be published: the agent gives
/// each remote node's an FDB entry (MAC -> node address) and the eBPF
/// programs address the inner frame to it, which lets the VXLAN driver
/// keep a cached route per remote node.
pub const fn vtep_mac(node_addr: u32) -> [u8; 6] {
    let [a, b, c, d] = node_addr.to_ne_bytes();
    let [p, q] = VTEP_MAC_PREFIX;
    [p, q, a, b, c, d]
}

/// The first two bytes of every VTEP MAC (`vtep_mac`).
pub const VTEP_MAC_PREFIX: [u8; 2] = [0x0e, 0x74];

/// TUNNEL value (an LPM trie keyed by remote PodCIDR, address in network
/// order): the node whose pods these are, the tunnel's far end in overlay
/// mode. In native mode it only marks the PodCIDR as another node's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TunnelEndpoint {
    /// The node's underlay address (network order): the outer destination.
    pub node_addr: u32,
}
layout!(TunnelEndpoint { node_addr }, size 4, align 4);

/// Default capacity of CT (per-packet translated flows, two entries each).
pub const CT_MAX: u32 = 262_144;

/// Connection-tracking lifetimes (seconds), as Cilium uses them.
pub mod ct_lifetime {
    pub const TCP_SYN: u32 = 60;
    pub const TCP_ESTABLISHED: u32 = 21_600;
    pub const TCP_CLOSING: u32 = 10;
    pub const OTHER: u32 = 60;
    /// How long a closed TCP flow's tuple stays taken for new translated
    /// flows (SNAT port choice), though its packets are no longer
    /// translated after TCP_CLOSING: the side that closed first holds
    /// TIME_WAIT for 60 s (Linux's TCP_TIMEWAIT_LEN), and a new connection
    /// given the same tuple from another client carries other timestamps,
    /// which that side refuses (PAWS): the client waits 1 s or more for its
    /// SYN to be retried. Netfilter keeps such entries 120 s for this.
    pub const TCP_TIME_WAIT: u32 = 60;
}

/// CT key: the tuple of a packet as it arrives (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}
layout!(CtKey { saddr, daddr, sport, dport, proto, pad }, size 16, align 4);

/// CT value: what the packet's tuple becomes, and where it goes then.
/// A translated flow has two entries: the original direction (service
/// address -> backend) and the reply direction (backend -> service); the
/// datapath keeps their state and last-seen time equal, so they expire
/// together.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// Replies leave through this device (redirect with neighbour
    /// lookup); 0 = route as usual (a local pod, or the node's stack).
    /// Both entries of a flow carry it, so either can re-create the other.
    pub ifindex: u32,
    pub rev_nat_id: u32,
    /// Seconds of CLOCK_MONOTONIC.
    pub last_seen: u32,
    pub lifetime: u32,
    pub flags: u32,
    /// The backend's id when its open connections are counted (CONNECTIONS,
    /// least-connection schedulers), else 0: the count drops when the
    /// connection starts closing.
    pub backend_id: u32,
}
layout!(
    CtValue { saddr, daddr, sport, dport, ifindex, rev_nat_id, last_seen, lifetime, flags, backend_id },
    size 36, align 4
);

impl CtValue {
    /// Seconds after `last_seen` the entry's tuple stays taken, and the
    /// entry with it: its lifetime, or TIME_WAIT's for a closed TCP flow.
    pub fn held_for(&self) -> u32 {
        if self.flags & ct_flags::CLOSING != 0 && self.lifetime < ct_lifetime::TCP_TIME_WAIT {
            ct_lifetime::TCP_TIME_WAIT
        } else {
            self.lifetime
        }
    }
}

pub mod ct_flags {
    /// Entry of the reply direction.
    pub const REPLY: u32 = 1 << 0;
    /// A FIN or RST was seen: the short closing lifetime applies.
    pub const CLOSING: u32 = 1 << 1;
    /// TCP handshake completed (a packet flowed in the reply direction).
    pub const ESTABLISHED: u32 = 1 << 2;
}
/// Default capacity of IDENTITIES (every pod address of the cluster).
pub const IDENTITIES_MAX: u32 = 262_144;
/// Default capacity of POLICY (allow entries of this node's pods).
pub const POLICY_MAX: u32 = 262_144;
/// Default capacity of POLICY_CIDR (ipBlock prefixes of this node's pods).
pub const POLICY_CIDR_MAX: u32 = 65_536;
/// Default capacity of POLICY_CT (connections of this node's pods, one
/// entry per pod side).
pub const POLICY_CT_MAX: u32 = 262_144;
/// Policies counted per number (POLICY_COUNTS); higher numbers are not.
pub const POLICY_NUMBERS_MAX: u32 = 65_536;

/// The `direction` byte of the policy maps.
pub mod policy_direction {
    pub const INGRESS: u8 = 1;
    pub const EGRESS: u8 = 2;
}

/// PolicyEndpoint flags.
pub mod policy_flags {
    /// Some NetworkPolicy selects the pod for ingress: only what POLICY
    /// allows may open a connection to it.
    pub const INGRESS_ISOLATED: u32 = 1 << 0;
    pub const EGRESS_ISOLATED: u32 = 1 << 1;
    /// Fail closed: the pod's policy could not be programmed in full;
    /// nothing new is allowed in that direction.
    pub const INGRESS_DENY_ALL: u32 = 1 << 2;
    pub const EGRESS_DENY_ALL: u32 = 1 << 3;
}

/// POLICY_ENDPOINTS value (key: a local pod's IPv4, network order). A
/// local pod without one is not isolated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyEndpoint {
    /// Changes whenever the pod's policy does: connections judged under
    /// another revision are judged again at their next packet.
    pub revision: u32,
    /// `policy_flags`.
    pub flags: u32,
    /// The first policy isolating the pod for ingress / egress (by
    /// number; 0: none): what its denials are counted against.
    pub ingress_policy: u32,
    pub egress_policy: u32,
}
layout!(PolicyEndpoint { revision, flags, ingress_policy, egress_policy }, size 16, align 4);

/// POLICY key (LPM trie, prefix over these bytes in order): a local pod,
/// the peer's identity, direction, protocol, port. Prefix 72 = every
/// protocol and port; 80 = every port of `proto`; 80 + n = the ports
/// sharing their first n bits with `port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// The local pod's IPv4 (network order).
    pub endpoint: u32,
    /// Big-endian bytes, like every other field, so the trie's bit order
    /// is the field's.
    pub identity: [u8; 4],
    pub direction: u8,
    pub proto: u8,
    /// Big-endian (wire order).
    pub port: [u8; 2],
}
layout!(PolicyKey { endpoint, identity, direction, proto, port }, size 12, align 4);

/// Prefix length of a POLICY key that fixes everything up to the identity
/// and direction (every protocol and port).
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
/// ... up to the protocol (every port).
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;

/// POLICY value: the policy (by number) and rule that allow the entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyRuleRef {
    pub policy: u32,
    pub rule: u32,
}
layout!(PolicyRuleRef { policy, rule }, size 8, align 4);

/// POLICY_CIDR key (LPM trie): a local pod and direction, then the peer
/// address; prefix = 64 + the ipBlock prefix length. Value: the number
/// POLICY knows addresses under that prefix by.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyCidrKey {
    pub endpoint: u32,
    pub direction: u8,
    pub pad: [u8; 3],
    pub addr: u32,
}
layout!(PolicyCidrKey { endpoint, direction, pad, addr }, size 12, align 4);

/// The bits of a POLICY_CIDR key before the address.
pub const POLICY_CIDR_PREFIX_BASE: u32 = 64;

/// POLICY_CT key: a connection at one local pod, as the pod sends it
/// (egress: before Service translation) or receives it (ingress), and the
/// direction it was opened in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyFlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub pad: [u8; 2],
}
layout!(PolicyFlowKey { saddr, daddr, sport, dport, proto, direction, pad }, size 16, align 4);

/// POLICY_CT value: the connection was allowed under the pod's policy
/// `revision`, judged on `peer`:`port` (after Service translation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyFlowValue {
    pub revision: u32,
    /// Seconds of CLOCK_MONOTONIC.
    pub last_seen: u32,
    pub peer: u32,
    /// The port the connection was judged on (the server's), wire order.
    pub port: u16,
    /// `ct_flags::CLOSING` once a FIN or RST was seen.
    pub flags: u16,
}
layout!(PolicyFlowValue { revision, last_seen, peer, port, flags }, size 16, align 4);

/// CONFIG value (an array of one): settings the agent gives the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// The cluster's Service CIDR (network order); a mask of 0 disables it.
    /// Connections to an address in it that no Service serves are refused,
    /// as kube-proxy does for unused ClusterIPs.
    pub service_cidr_addr: u32,
    pub service_cidr_mask: u32,
    /// The node's address: the source of NodePort / LoadBalancer traffic
    /// SNATed with externalTrafficPolicy=Cluster (network order).
    pub node_addr: u32,
    /// The VXLAN device pods on other nodes are reached through (overlay
    /// mode); 0 = native routing: the node's routes carry that traffic.
    pub tunnel_ifindex: u32,
    /// 1: pod traffic to destinations outside NON_MASQUERADE leaves with
    /// `node_addr` as source.
    pub masquerade: u32,
    /// This node's PodCIDR (network order): a packet for an address in it
    /// that no pod has is dropped (`DropReason::UnknownPod`). Mask 0: none.
    pub pod_cidr_addr: u32,
    pub pod_cidr_mask: u32,
    /// `events::event_flags`: which flow events the programs report.
    pub events: u32,
    /// Drop events each CPU reports per second at most.
    pub drop_events_per_second: u32,
}
layout!(
    DatapathConfig {
        service_cidr_addr, service_cidr_mask, node_addr, tunnel_ifindex, masquerade,
        pod_cidr_addr, pod_cidr_mask, events, drop_events_per_second
    },
    size 36, align 4
);

/// Why a packet took the path it took; index into the per-CPU METRICS array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Delivered straight into a local pod with bpf_redirect_peer.
    RedirectLocalPod = 0,
    /// Not for a local pod: handed to the node's own stack.
    PassToStack = 1,
    /// Not IPv4, or too short to parse: left to the kernel untouched.
    NotIpv4 = 2,
    /// The redirect helper refused (target gone): left to the kernel.
    RedirectFailed = 3,
    /// Socket-LB: a connect/sendmsg to a Service was sent to a backend.
    SockLbTranslated = 4,
    /// Socket-LB: a Service without backends refused a connect/sendmsg.
    SockLbNoBackend = 5,
    /// Socket-LB: recvmsg/getpeername showed the Service address again.
    SockLbRevNat = 6,
    /// Socket-LB: a bind to a NodePort port was refused.
    SockLbBindRefused = 7,
    /// Socket-LB: an unused address or port in the Service CIDR was refused.
    SockLbUnknownService = 8,
    /// Per-packet: a packet to a Service was sent to its backend (DNAT).
    LbDnat = 9,
    /// Per-packet: a reply was given the Service address back.
    LbRevNat = 10,
    /// Per-packet: a Service without backends (or an unused Service
    /// address) answered with TCP RST / ICMP port unreachable.
    LbReject = 11,
    /// Per-packet: the CT map refused a new entry (full): packet dropped.
    CtFull = 12,
    /// NodePort / LoadBalancer / externalIP traffic from outside.
    ExternalDnat = 13,
    /// Sent to a pod on another node through the VXLAN overlay.
    EncapOverlay = 14,
    /// Native routing: sent to a pod on another node out of the device
    /// (and to the next hop) a FIB lookup chose, without the stack.
    RedirectFib = 15,
    /// Pod traffic leaving the cluster took the node's address.
    Masquerade = 16,
    /// A reply to masqueraded traffic was given the pod's address back.
    MasqueradeReply = 17,
    /// The NAT map is full, or no node port was free: the new flow's
    /// packet was dropped (the pod's TCP retries).
    NatFull = 18,
    /// The pod asked (ARP) for its gateway's MAC and the host side
    /// answered: its neighbour entry was flushed, e.g. by a MAC change.
    GatewayArpReply = 19,
    /// A pod's packet left to the qdisc on its veth (a chained plugin's
    /// shaping) and then the node's stack.
    ToPodQdisc = 20,
    /// NetworkPolicy: a new connection into an isolated pod was denied
    /// (dropped).
    PolicyDeniedIngress = 21,
    /// NetworkPolicy: a new connection from an isolated pod was denied.
    PolicyDeniedEgress = 22,
    /// NetworkPolicy: a new connection was allowed into an isolated pod.
    PolicyAllowedIngress = 23,
    PolicyAllowedEgress = 24,
    /// A pod sent a packet from an address that is not its own, or one
    /// from outside claimed a local pod's (or the hairpin) address:
    /// dropped (NetworkPolicy identifies peers by address).
    SourceNotPod = 25,
    /// An IPv4 packet whose TCP/UDP/ICMP header could not be read:
    /// dropped (nothing could judge or translate it).
    MalformedIpv4 = 26,
    /// A flow event was lost: the EVENTS ring was full.
    EventsLost = 27,
    /// A drop event was not reported: its CPU's per-second budget was
    /// spent (the drop itself is counted in DROPS).
    EventsRateLimited = 28,
    /// For an address of this node's PodCIDR that no pod has: dropped.
    UnknownPod = 29,
}

impl Reason {
    pub const COUNT: u32 = 30;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::RedirectLocalPod,
        Reason::PassToStack,
        Reason::NotIpv4,
        Reason::RedirectFailed,
        Reason::SockLbTranslated,
        Reason::SockLbNoBackend,
        Reason::SockLbRevNat,
        Reason::SockLbBindRefused,
        Reason::SockLbUnknownService,
        Reason::LbDnat,
        Reason::LbRevNat,
        Reason::LbReject,
        Reason::CtFull,
        Reason::ExternalDnat,
        Reason::EncapOverlay,
        Reason::RedirectFib,
        Reason::Masquerade,
        Reason::MasqueradeReply,
        Reason::NatFull,
        Reason::GatewayArpReply,
        Reason::ToPodQdisc,
        Reason::PolicyDeniedIngress,
        Reason::PolicyDeniedEgress,
        Reason::PolicyAllowedIngress,
        Reason::PolicyAllowedEgress,
        Reason::SourceNotPod,
        Reason::MalformedIpv4,
        Reason::EventsLost,
        Reason::EventsRateLimited,
        Reason::UnknownPod,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::RedirectLocalPod => "redirect_local_pod",
            Reason::PassToStack => "pass_to_stack",
            Reason::NotIpv4 => "not_ipv4",
            Reason::RedirectFailed => "redirect_failed",
            Reason::SockLbTranslated => "sock_lb_translated",
            Reason::SockLbNoBackend => "sock_lb_no_backend",
            Reason::SockLbRevNat => "sock_lb_rev_nat",
            Reason::SockLbBindRefused => "sock_lb_bind_refused",
            Reason::SockLbUnknownService => "sock_lb_unknown_service",
            Reason::LbDnat => "lb_dnat",
            Reason::LbRevNat => "lb_rev_nat",
            Reason::LbReject => "lb_reject",
            Reason::CtFull => "ct_full",
            Reason::ExternalDnat => "external_dnat",
            Reason::EncapOverlay => "encap_overlay",
            Reason::RedirectFib => "redirect_fib",
            Reason::Masquerade => "masquerade",
            Reason::MasqueradeReply => "masquerade_reply",
            Reason::NatFull => "nat_full",
            Reason::GatewayArpReply => "gateway_arp_reply",
            Reason::ToPodQdisc => "to_pod_qdisc",
            Reason::PolicyDeniedIngress => "policy_denied_ingress",
            Reason::PolicyDeniedEgress => "policy_denied_egress",
            Reason::PolicyAllowedIngress => "policy_allowed_ingress",
            Reason::PolicyAllowedEgress => "policy_allowed_egress",
            Reason::SourceNotPod => "source_not_pod",
            Reason::MalformedIpv4 => "malformed_ipv4",
            Reason::EventsLost => "events_lost",
            Reason::EventsRateLimited => "events_rate_limited",
            Reason::UnknownPod => "unknown_pod",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)] plain data made of integers and
    // integer arrays, with explicit padding fields.
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::LbTable {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::TunnelEndpoint {}
    unsafe impl aya::Pod for super::PolicyEndpoint {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyRuleRef {}
    unsafe impl aya::Pod for super::PolicyCidrKey {}
    unsafe impl aya::Pod for super::PolicyFlowKey {}
    unsafe impl aya::Pod for super::PolicyFlowValue {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::EventBudget {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
}
