//! Every map of the datapath. All are pinned by name (the agent gives the
//! directory), so they outlive an agent restart. Each is listed, with its
//! type and key/value sizes, in `tern_common::maps::ALL`; an agent test
//! checks the built object against that list.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use tern_common::{
    AFFINITY_MAX, AffinityKey, AffinityValue, BACKENDS_MAX, Backend, CT_MAX, CtKey, CtValue,
    DatapathConfig, DropReason, ENDPOINTS_MAX, EndpointInfo, EventBudget, IDENTITIES_MAX,
    LB_SOCKETS_MAX, LB_TABLES_MAX, LbTable, NAT_MAX, NON_MASQUERADE_MAX, POLICY_CIDR_MAX,
    POLICY_CT_MAX, POLICY_MAX, POLICY_NUMBERS_MAX, PolicyCidrKey, PolicyEndpoint, PolicyFlowKey,
    PolicyFlowValue, PolicyKey, PolicyRuleRef, REVNAT_MAX, Reason, RevNat, SERVICES_MAX,
    SOCK_REVNAT_MAX, ServiceKey, ServiceValue, SockRevNatKey, SourceRangeKey, TUNNEL_MAX,
    TunnelEndpoint,
};

/// Local pods by IPv4 address (network byte order).
#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(ENDPOINTS_MAX, 0);

/// Packet and translation counters by `Reason`, per CPU.
#[map]
pub static METRICS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

/// Service frontends: master entries (slot 0) and backend slots.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(SERVICES_MAX, BPF_F_NO_PREALLOC);

/// Backends by id.
#[map]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(BACKENDS_MAX, BPF_F_NO_PREALLOC);

/// Frontend address by rev_nat_id, to translate replies back.
#[map]
pub static REVNAT: HashMap<u32, RevNat> = HashMap::pinned(REVNAT_MAX, BPF_F_NO_PREALLOC);

/// Lookup tables by rev_nat_id (maglev, wrr, sh, dh frontends only).
#[map]
pub static LB_TABLES: HashMap<u32, LbTable> = HashMap::pinned(LB_TABLES_MAX, BPF_F_NO_PREALLOC);

/// Open connections by backend id, for the least-connection schedulers.
/// The agent creates and removes a backend's entry with the backend (and
/// corrects drifted counts); the datapath adds and subtracts atomically.
#[map]
pub static CONNECTIONS: HashMap<u32, u32> = HashMap::pinned(BACKENDS_MAX, BPF_F_NO_PREALLOC);

/// Socket-LB connections counted in CONNECTIONS: socket cookie -> backend
/// id, so the socket's release takes its count back exactly once.
#[map]
pub static LB_SOCKETS: LruHashMap<u64, u32> = LruHashMap::pinned(LB_SOCKETS_MAX, 0);

/// sessionAffinity ClientIP: the backend a client last used, per service.
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(AFFINITY_MAX, 0);

/// Socket-LB: which Service address a socket's backend stands for.
#[map]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, RevNat> = LruHashMap::pinned(SOCK_REVNAT_MAX, 0);

/// Connection tracking of per-packet translated flows.
#[map]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CT_MAX, 0);

/// Remote PodCIDRs -> their node (the tunnel's far end in overlay mode).
#[map]
pub static TUNNEL: LpmTrie<u32, TunnelEndpoint> = LpmTrie::pinned(TUNNEL_MAX, 0);

/// Masqueraded flows: an entry for the way out (pod tuple -> node address
/// and port) and one for replies (-> the pod), as CT keeps them.
#[map]
pub static NAT: HashMap<CtKey, CtValue> = HashMap::pinned(NAT_MAX, BPF_F_NO_PREALLOC);

/// Destinations pod traffic keeps its own address for: the cluster's pod
/// ranges, the nodes, and the operator's nonMasqueradeCIDRs.
#[map]
pub static NON_MASQUERADE: LpmTrie<u32, u8> = LpmTrie::pinned(NON_MASQUERADE_MAX, 0);

/// Every pod address of the cluster -> its identity (NetworkPolicy).
#[map]
pub static IDENTITIES: HashMap<u32, u32> = HashMap::pinned(IDENTITIES_MAX, BPF_F_NO_PREALLOC);

/// Local pods' isolation and policy revision; absent = not isolated.
#[map]
pub static POLICY_ENDPOINTS: HashMap<u32, PolicyEndpoint> = HashMap::pinned(ENDPOINTS_MAX, 0);

/// Allow entries of local pods: (pod, peer identity, direction, protocol,
/// port prefix) -> the policy rule that allows it.
#[map]
pub static POLICY: LpmTrie<PolicyKey, PolicyRuleRef> = LpmTrie::pinned(POLICY_MAX, 0);

/// ipBlock prefixes of local pods -> the identity number POLICY knows them by.
#[map]
pub static POLICY_CIDR: LpmTrie<PolicyCidrKey, u32> = LpmTrie::pinned(POLICY_CIDR_MAX, 0);

/// Connections of local pods and the policy revision that allowed them.
#[map]
pub static POLICY_CT: LruHashMap<PolicyFlowKey, PolicyFlowValue> =
    LruHashMap::pinned(POLICY_CT_MAX, 0);

/// New connections allowed, per policy number, per CPU.
#[map]
pub static POLICY_COUNTS: PerCpuArray<u64> = PerCpuArray::pinned(POLICY_NUMBERS_MAX, 0);

/// Connections denied, per policy number (the first isolating the pod in
/// that direction), per CPU.
#[map]
pub static POLICY_DENIALS: PerCpuArray<u64> = PerCpuArray::pinned(POLICY_NUMBERS_MAX, 0);

/// Flow events for the agent (`tern observe`); the agent sizes it.
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(tern_common::events::EVENTS_RING_BYTES, 0);

/// Drops and refusals by `DropReason * 2 + Direction`, per CPU: counted
/// whether or not an event reports them.
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DropReason::COUNT * 2, 0);

/// The drop-event rate limit's window, per CPU.
#[map]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);

/// LoadBalancer frontends' allowed client prefixes.
#[map]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::pinned(tern_common::SOURCE_RANGES_MAX, 0);

/// Settings from the agent (index 0).
#[map]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

pub fn config() -> DatapathConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// Upgrade tests only (feature `upgrade-probe`): every program run counts
/// here, so a test that upgrades the agent to this build sees that the new
/// programs, not the old ones, sit in the links. The map is new to such a
/// build, as maps added by a real upgrade are.
#[cfg(feature = "upgrade-probe")]
#[map]
pub static UPGRADE_PROBE: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Counts one program run in [`UPGRADE_PROBE`]; nothing without the feature.
#[inline(always)]
pub fn upgrade_probe() {
    #[cfg(feature = "upgrade-probe")]
    bump(&UPGRADE_PROBE, 0);
}

pub fn count(reason: Reason) {
    bump(&METRICS, reason as u32);
}

pub fn bump(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU meanwhile.
        unsafe { *counter += 1 };
    }
}
