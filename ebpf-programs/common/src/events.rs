//! Flow events: what the datapath reports through the EVENTS ring buffer
//! (`tern observe`), and the drop reasons shared by the programs, the
//! agent's metrics and the CLI.
//!
//! Events are aggregated as Hubble does: one per new connection (policy
//! verdict, Service translation), one per verdict change, and drops always
//! (rate-limited per CPU); trace events only when asked for.

/// Why the datapath dropped a packet or refused a connection. Every place
/// the programs drop or refuse has its own reason; DROPS counts them per
/// reason and direction (index `reason * 2 + direction`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A Service without (ready) backends: refused with TCP RST / ICMP
    /// port unreachable, or ECONNREFUSED at the socket.
    NoBackend = 0,
    /// An address or port in the Service CIDR that no Service uses:
    /// refused the same way.
    UnknownService = 1,
    /// A bind to a NodePort's port on the node (it would shadow the
    /// Service): EADDRINUSE.
    NodePortBind = 2,
    /// The CT map refused a new entry.
    CtFull = 3,
    /// The NAT map is full: a new flow to outside the cluster is refused.
    NatFull = 4,
    /// A NetworkPolicy isolating the pod does not allow the connection.
    PolicyDenied = 5,
    /// A pod sent from an address that is not its own, or a packet from
    /// outside claimed a local pod's (or the hairpin) address.
    SourceNotPod = 6,
    /// IPv4 whose TCP/UDP/ICMP header could not be read.
    MalformedIpv4 = 7,
    /// For an address of this node's PodCIDR that no pod has: refused
    /// (TCP RST / ICMP unreachable) so the client fails at once.
    UnknownPod = 8,
    /// The node's own packet into the overlay for an address no node's
    /// PodCIDR holds: there is no far end to send it to.
    Unroutable = 9,
    /// The tunnel key (the far end) could not be set.
    EncapFailed = 10,
    /// An address or port rewrite (NAT) failed in the kernel helper.
    RewriteFailed = 11,
    /// A refusal (RST / ICMP) could not be built (IP options).
    RejectFailed = 12,
    /// No node port was free to masquerade the new flow (the NAT map has
    /// room).
    NatPortsExhausted = 13,
    /// No port was free to SNAT a NodePort connection to the node address.
    SnatPortsExhausted = 14,
    /// Not IPv4 (e.g. IPv6) where only IPv4 can go: the overlay.
    NotIpv4 = 15,
    /// A Service with a Local traffic policy and no endpoint on this node
    /// (it has some elsewhere): dropped, as kube-proxy does.
    NoLocalBackend = 16,
    /// A client outside a LoadBalancer Service's `loadBalancerSourceRanges`.
    SourceRangeDenied = 17,
}

impl DropReason {
    pub const COUNT: u32 = 18;
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        DropReason::NoBackend,
        DropReason::UnknownService,
        DropReason::NodePortBind,
        DropReason::CtFull,
        DropReason::NatFull,
        DropReason::PolicyDenied,
        DropReason::SourceNotPod,
        DropReason::MalformedIpv4,
        DropReason::UnknownPod,
        DropReason::Unroutable,
        DropReason::EncapFailed,
        DropReason::RewriteFailed,
        DropReason::RejectFailed,
        DropReason::NatPortsExhausted,
        DropReason::SnatPortsExhausted,
        DropReason::NotIpv4,
        DropReason::NoLocalBackend,
        DropReason::SourceRangeDenied,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NoBackend => "no_backend",
            DropReason::UnknownService => "unknown_service",
            DropReason::NodePortBind => "node_port_bind",
            DropReason::CtFull => "ct_full",
            DropReason::NatFull => "nat_full",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::SourceNotPod => "source_not_pod",
            DropReason::MalformedIpv4 => "malformed_ipv4",
            DropReason::UnknownPod => "unknown_pod",
            DropReason::Unroutable => "unroutable",
            DropReason::EncapFailed => "encap_failed",
            DropReason::RewriteFailed => "rewrite_failed",
            DropReason::RejectFailed => "reject_failed",
            DropReason::NatPortsExhausted => "nat_ports_exhausted",
            DropReason::SnatPortsExhausted => "snat_ports_exhausted",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::NoLocalBackend => "no_local_backend",
            DropReason::SourceRangeDenied => "source_range_denied",
        }
    }

    pub fn from_u8(value: u8) -> Option<DropReason> {
        Self::ALL.get(value as usize).copied()
    }
}

/// Relative to the pod (or node) the datapath acts for: egress is what a
/// pod (or the node) sends, ingress what arrives for it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

impl Direction {
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Where in the datapath an event was seen.
pub mod point {
    /// tc ingress of a pod's host veth: the pod sent it.
    pub const FROM_POD: u8 = 1;
    /// Delivered into a local pod.
    pub const TO_POD: u8 = 2;
    /// Decapsulated from another node (tc ingress of the VXLAN device).
    pub const FROM_OVERLAY: u8 = 3;
    /// Into the VXLAN overlay towards another node.
    pub const TO_OVERLAY: u8 = 4;
    /// Arrived on an underlay device from outside.
    pub const FROM_NETDEV: u8 = 5;
    /// Leaving by an underlay device.
    pub const TO_NETDEV: u8 = 6;
    /// A pod socket's connect() (socket-LB).
    pub const SOCK_CONNECT: u8 = 7;
    /// A pod socket's sendmsg() (socket-LB).
    pub const SOCK_SENDMSG: u8 = 8;
    /// A bind() on the node (socket-LB).
    pub const SOCK_BIND: u8 = 9;

    pub const fn name(point: u8) -> &'static str {
        match point {
            FROM_POD => "from_pod",
            TO_POD => "to_pod",
            FROM_OVERLAY => "from_overlay",
            TO_OVERLAY => "to_overlay",
            FROM_NETDEV => "from_netdev",
            TO_NETDEV => "to_netdev",
            SOCK_CONNECT => "sock_connect",
            SOCK_SENDMSG => "sock_sendmsg",
            SOCK_BIND => "sock_bind",
            _ => "unknown",
        }
    }
}

/// `FlowEvent::kind`.
pub mod kind {
    /// A packet dropped or a connection refused (`reason`: a DropReason).
    pub const DROP: u8 = 1;
    /// A NetworkPolicy verdict on a new connection, or a changed verdict
    /// on a live one (`verdict`, `policy`).
    pub const POLICY: u8 = 2;
    /// A new connection to a Service sent to a backend (`service_addr`,
    /// `service_port` the frontend; `daddr`, `dport` the backend; `reason`
    /// the `service_path`).
    pub const SERVICE: u8 = 3;
    /// A packet seen at an observation point (trace mode).
    pub const TRACE: u8 = 4;
}

/// `FlowEvent::verdict`.
pub mod verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
    pub const TRANSLATED: u8 = 3;
}

/// Which Service path translated (`FlowEvent::reason` of a SERVICE event).
pub mod service_path {
    /// Socket-LB, at connect()/sendmsg().
    pub const SOCKET: u8 = 1;
    /// Per packet, with connection tracking (from a pod).
    pub const PACKET: u8 = 2;
    /// Per packet, from outside the node (NodePort, LoadBalancer,
    /// externalIPs).
    pub const EXTERNAL: u8 = 3;
}

/// `DatapathConfig::events`: which events the programs report.
pub mod event_flags {
    pub const DROPS: u32 = 1 << 0;
    pub const POLICY: u32 = 1 << 1;
    pub const SERVICE: u32 = 1 << 2;
    pub const TRACE: u32 = 1 << 3;
    /// What the agent enables unless told otherwise.
    pub const DEFAULT: u32 = DROPS | POLICY | SERVICE;
}

/// Default size of the EVENTS ring buffer (bytes; a power of two multiple
/// of the page size): 16 384 events of 64 bytes (56 and the ring's header).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
/// Drop events each CPU may report per second by default; more are
/// counted (`Reason::EventsRateLimited`), not reported.
pub const DROP_EVENTS_PER_SECOND: u32 = 1000;

/// One event in the EVENTS ring. Addresses and ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub time_ns: u64,
    /// Socket events: the socket's network namespace cookie (which pod);
    /// 0 for packets.
    pub netns_cookie: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// SERVICE: the frontend the client used.
    pub service_addr: u32,
    pub service_port: u16,
    /// `kind::*`.
    pub kind: u8,
    /// `point::*`.
    pub point: u8,
    /// The device the packet was seen on (0 for socket events).
    pub ifindex: u32,
    /// POLICY: the policy number that allowed the connection (0: the pod
    /// is not isolated that way), or the first isolating policy of a
    /// denial.
    pub policy: u32,
    /// DROP and denials: a `DropReason`; SERVICE: a `service_path`.
    pub reason: u8,
    /// `verdict::*`.
    pub verdict: u8,
    pub proto: u8,
    /// A `Direction`.
    pub direction: u8,
    pub tcp_flags: u8,
    pub pad: [u8; 7],
}
layout!(
    FlowEvent {
        time_ns, netns_cookie, saddr, daddr, sport, dport, service_addr, service_port, kind,
        point, ifindex, policy, reason, verdict, proto, direction, tcp_flags, pad
    },
    size 56, align 8
);

/// EVENT_BUDGET value (per CPU): the drop events reported in the current
/// one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventBudget {
    pub window_start_ns: u64,
    pub reported: u32,
    pub pad: u32,
}
layout!(EventBudget { window_start_ns, reported, pad }, size 16, align 8);
