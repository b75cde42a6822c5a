//! Service load balancing: the frontends (SERVICES), their backends,
//! reverse translation, lookup tables, affinity, socket-LB bookkeeping and
//! source ranges, as the eBPF programs and the agent's Service pipeline
//! share them.

/// Default capacities of the service maps: 100k services x 10 backends fit
/// with room to spare (a frontend takes 1 + backends entries in SERVICES;
/// a sync writes new backends before it removes the old ones).
pub const SERVICES_MAX: u32 = 1_200_000;
pub const BACKENDS_MAX: u32 = 1 << 20;
pub const REVNAT_MAX: u32 = 262_144;
/// Frontends with a lookup table (maglev, wrr, sh, dh).
pub const LB_TABLES_MAX: u32 = 4096;
pub const AFFINITY_MAX: u32 = 262_144;
pub const SOCK_REVNAT_MAX: u32 = 262_144;
/// Socket-LB connections counted for least-connection schedulers.
pub const LB_SOCKETS_MAX: u32 = 262_144;

/// Source address for hairpin traffic (a pod reaching itself through a
/// Service): the pod would drop a packet from its own address.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];

/// Largest LB_TABLES table (a prime, the largest Maglev size); each
/// frontend's own size is in its master entry.
pub const LB_TABLE_MAX: usize = 16381;

/// Scope of a SERVICES entry: external clients use External; pods look up
/// Internal first (present only when externalTrafficPolicy=Local makes the
/// two backend sets differ), then External.
pub mod scope {
    pub const EXTERNAL: u8 = 0;
    pub const INTERNAL: u8 = 1;
}

/// ServiceValue.flags of a master entry.
pub mod service_flags {
    pub const CLUSTER_IP: u16 = 1 << 0;
    pub const NODE_PORT: u16 = 1 << 1;
    pub const LOAD_BALANCER: u16 = 1 << 2;
    pub const EXTERNAL_IP: u16 = 1 << 3;
    /// sessionAffinity: ClientIP.
    pub const AFFINITY: u16 = 1 << 4;
    // 1 << 5 was MAGLEV, now `lb_algorithm::MAGLEV`.
    /// externalTrafficPolicy=Local: keep the client address (no SNAT).
    pub const EXTERNAL_LOCAL: u16 = 1 << 6;
    /// A pod's hostPort (CNI portMappings); no bind on the node is refused.
    pub const HOST_PORT: u16 = 1 << 7;
    /// No backend here although the Service has endpoints elsewhere (a
    /// Local traffic policy and none on this node): connections are
    /// dropped, not refused, as kube-proxy does.
    pub const NO_LOCAL_BACKEND: u16 = 1 << 8;
    /// A LoadBalancer frontend with `loadBalancerSourceRanges`: only
    /// clients in its SOURCE_RANGES entries are served, others dropped.
    pub const SOURCE_RANGES: u16 = 1 << 9;
}

/// SERVICES key. Slot 0 is the master entry (count, flags); slots
/// 1..=count hold the backend ids. Address and port in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: u16,
}
layout!(ServiceKey { addr, port, slot, proto, scope, pad }, size 12, align 4);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Slots > 0: the backend id.
    pub backend_id: u32,
    /// Master: id of the REVNAT entry (and of the LB_TABLES entry).
    pub rev_nat_id: u32,
    /// Master: how many backend slots follow (0 = refuse connections).
    pub count: u16,
    pub flags: u16,
    /// Master: entries of the frontend's LB_TABLES table (maglev, wrr, sh,
    /// dh), else 0.
    pub table_size: u16,
    /// Master: one of `lb_algorithm`.
    pub algorithm: u8,
    pub pad: u8,
    /// Master: session affinity timeout in seconds (AFFINITY flag).
    pub affinity_timeout: u32,
    /// Slots > 0: the backend's weight (wlc, sed, nq; > 0).
    pub weight: u32,
    /// Master: the round-robin position (rr, wrr), advanced atomically by
    /// the datapath; the agent writes 0.
    pub position: u32,
}
layout!(
    ServiceValue {
        backend_id, rev_nat_id, count, flags, table_size, algorithm, pad, affinity_timeout, weight,
        position
    },
    size 28, align 4
);

/// How a frontend picks a backend for a new connection (`tern.io/lb-algorithm`),
/// the IPVS schedulers with IPVS's meaning.
pub mod lb_algorithm {
    /// Uniformly at random.
    pub const RANDOM: u8 = 0;
    /// Maglev consistent hashing of the flow (LB_TABLES).
    pub const MAGLEV: u8 = 1;
    /// Round robin over the slots.
    pub const RR: u8 = 2;
    /// Weighted round robin: IPVS's interleaved sequence (LB_TABLES).
    pub const WRR: u8 = 3;
    /// Least connections.
    pub const LC: u8 = 4;
    /// Weighted least connections.
    pub const WLC: u8 = 5;
    /// Source hashing: a 256-bucket table by client (LB_TABLES).
    pub const SH: u8 = 6;
    /// Destination hashing: the same table by frontend address.
    pub const DH: u8 = 7;
    /// Shortest expected delay: least (connections + 1) / weight.
    pub const SED: u8 = 8;
    /// Never queue: an idle backend if any, else as SED.
    pub const NQ: u8 = 9;

    /// The least-connection family: needs CONNECTIONS counts.
    pub const fn counts_connections(algorithm: u8) -> bool {
        matches!(algorithm, LC | WLC | SED | NQ)
    }

    /// Buckets of the sh and dh tables (IPVS's default, 2^8).
    pub const HASH_BUCKETS: u16 = 256;

    /// The bucket of a client or destination in an sh/dh table: the top 8
    /// bits of the 32-bit golden-ratio hash, as the kernel's hash_32.
    pub const fn hash_bucket(value: u32) -> u32 {
        value.wrapping_mul(0x61C8_8647) >> 24
    }
}

/// BACKENDS value, keyed by backend id (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}
layout!(Backend { addr, port, proto, flags }, size 8, align 4);

/// REVNAT value, keyed by rev_nat_id (u32): the frontend to show replies from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNat {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}
layout!(RevNat { addr, port, pad }, size 8, align 4);

/// LB_TABLES value, keyed by rev_nat_id (u32): backend ids by table
/// position (a Maglev table, a wrr sequence, sh/dh buckets).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LbTable {
    pub backend_ids: [u32; LB_TABLE_MAX],
}
layout!(LbTable { backend_ids }, size 4 * LB_TABLE_MAX, align 4);

/// AFFINITY key: a client (netns cookie for socket-LB, address for the
/// per-packet path) and the service it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityKey {
    pub client: u64,
    pub rev_nat_id: u32,
    pub pad: u32,
}
layout!(AffinityKey { client, rev_nat_id, pad }, size 16, align 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// Milliseconds of CLOCK_MONOTONIC (bpf_ktime_get_ns / 1e6, wrapping) at
    /// last use.
    pub last_used_ms: u32,
}
layout!(AffinityValue { backend_id, last_used_ms }, size 8, align 4);

/// SOCK_REVNAT key: a socket and the backend it was sent to; the value (a
/// RevNat) is the Service address recvmsg/getpeername must show instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}
layout!(SockRevNatKey { cookie, addr, port, pad }, size 16, align 8);

/// Default capacity of SOURCE_RANGES (loadBalancerSourceRanges entries).
pub const SOURCE_RANGES_MAX: u32 = 65_536;

/// SOURCE_RANGES key (an LPM trie): a LoadBalancer frontend (its REVNAT
/// id) and a client prefix its `loadBalancerSourceRanges` allow; prefix
/// = 32 + the range's prefix length. Value: 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRangeKey {
    pub rev_nat_id: u32,
    /// Network order.
    pub addr: u32,
}
layout!(SourceRangeKey { rev_nat_id, addr }, size 8, align 4);

/// The bits of a SOURCE_RANGES key before the address.
pub const SOURCE_RANGE_PREFIX_BASE: u32 = 32;
