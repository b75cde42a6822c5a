//! Connection tracking for translated flows (CT for Services, NAT for
//! masquerade): each flow has an entry for its original direction and one
//! for replies; both say what the tuple becomes.
//!
//! The two entries of a flow are one connection: every packet refreshes
//! both (same last-seen second, same state, same lifetime), so they expire
//! together; a packet that finds one whose partner is gone re-creates it;
//! a reply entry whose original now belongs to another flow is stale and
//! removed. A new TCP connection (a SYN without ACK) on an entry whose
//! connection was established or is closing starts a fresh flow, and one
//! that is not translated at all takes over the tuple from any reply entry
//! left by an earlier flow. The agent removes expired entries.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    maps::{HashMap, LruHashMap},
};
use tern_common::{CtKey, CtValue, ct_flags, ct_lifetime};

use crate::maps::CT;
use crate::packet::{IPPROTO_TCP, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tuple};

pub fn now() -> u32 {
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}

/// A table of flow entries: CT (LRU) and NAT (a plain hash, so that a
/// full table refuses new flows instead of evicting live ones).
pub trait FlowTable {
    fn entry(&self, key: &CtKey) -> Option<*mut CtValue>;
    fn put(&self, key: &CtKey, value: &CtValue) -> Result<(), i64>;
    fn delete(&self, key: &CtKey);
}

macro_rules! flow_table {
    ($map:ty) => {
        impl FlowTable for $map {
            fn entry(&self, key: &CtKey) -> Option<*mut CtValue> {
                self.get_ptr_mut(key)
            }
            fn put(&self, key: &CtKey, value: &CtValue) -> Result<(), i64> {
                self.insert(key, value, 0).map_err(i64::from)
            }
            fn delete(&self, key: &CtKey) {
                let _ = self.remove(key);
            }
        }
    };
}
flow_table!(HashMap<CtKey, CtValue>);
flow_table!(LruHashMap<CtKey, CtValue>);

pub fn key_of(p: &Packet) -> CtKey {
    CtKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        pad: [0; 3],
    }
}

/// A TCP segment that opens a connection: SYN without ACK.
pub fn opens_connection(p: &Packet) -> bool {
    p.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

fn lifetime(proto: u8, flags: u32) -> u32 {
    if proto != IPPROTO_TCP {
        ct_lifetime::OTHER
    } else if flags & ct_flags::CLOSING != 0 {
        ct_lifetime::TCP_CLOSING
    } else if flags & ct_flags::ESTABLISHED != 0 {
        ct_lifetime::TCP_ESTABLISHED
    } else {
        ct_lifetime::TCP_SYN
    }
}

/// The key of the other direction of the flow `entry` (found at `key`)
/// belongs to: the reverse of what `key` becomes.
fn partner_key(key: &CtKey, entry: &CtValue) -> CtKey {
    CtKey {
        saddr: entry.daddr,
        daddr: entry.saddr,
        sport: entry.dport,
        dport: entry.sport,
        proto: key.proto,
        pad: [0; 3],
    }
}

/// Whether `partner` is the other direction of the entry at `key`: it
/// turns its packets into the reverse of `key`, and faces the other way.
fn pairs_with(partner: &CtValue, key: &CtKey, flags: u32) -> bool {
    partner.saddr == key.daddr
        && partner.daddr == key.saddr
        && partner.sport == key.dport
        && partner.dport == key.sport
        && (partner.flags ^ flags) & ct_flags::REPLY != 0
}

/// The live entry for this packet in `table`, refreshed together with its
/// partner; `None` if absent, expired, stale, or the packet opens a new
/// connection on a tuple whose previous connection is over.
// A leaf call of its own (map helpers only): inlined, its locals would
// push from_netdev's frame and the deepest call chain past the verifier's
// 512 bytes of combined stack.
#[inline(never)]
pub fn lookup<T: FlowTable>(table: &T, p: &Packet) -> Option<CtValue> {
    let key = key_of(p);
    // SAFETY: map values, updated in place (a racing update from another
    // CPU only shifts a timestamp or ORs a state bit in).
    let entry = unsafe { &mut *table.entry(&key)? };
    let now = now();
    if !live_at(entry, now) {
        return None;
    }
    let reply = entry.flags & ct_flags::REPLY != 0;
    if !reply
        && opens_connection(p)
        && entry.flags & (ct_flags::ESTABLISHED | ct_flags::CLOSING) != 0
    {
        // The client reuses the tuple for a new connection: it gets a
        // fresh flow (and backend selection), not the old one's leftovers.
        return None;
    }
    let mut state = entry.flags & !ct_flags::REPLY;
    if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        state |= ct_flags::CLOSING;
        if entry.flags & ct_flags::CLOSING == 0 && entry.backend_id != 0 {
            // The flow's first FIN or RST: its backend has one open
            // connection less (both entries turn CLOSING together).
            crate::lb::count_connection(entry.backend_id, -1);
        }
    }
    if reply && p.tcp_flags & TCP_SYN == 0 {
        state |= ct_flags::ESTABLISHED;
    }
    let lifetime = lifetime(key.proto, state);
    let other = partner_key(&key, entry);
    match table.entry(&other) {
        // SAFETY: as above.
        Some(partner) if pairs_with(unsafe { &*partner }, &key, entry.flags) => {
            // SAFETY: as above.
            refresh(unsafe { &mut *partner }, state, now, lifetime);
        }
        Some(_) if reply => {
            // The original now translates to another backend: this reply
            // entry is a leftover of an earlier flow and captures nothing.
            table.delete(&key);
            return None;
        }
        // Missing (evicted, or removed by the agent racing a new flow), or
        // taken by a reply of another flow: this flow, in use, claims it.
        _ => {
            let partner = CtValue {
                saddr: key.daddr,
                daddr: key.saddr,
                sport: key.dport,
                dport: key.sport,
                ifindex: entry.ifindex,
                rev_nat_id: entry.rev_nat_id,
                last_seen: now,
                lifetime,
                flags: state | (!entry.flags & ct_flags::REPLY),
                backend_id: entry.backend_id,
            };
            // A full table keeps the flow as it is, one direction short.
            let _ = table.put(&other, &partner);
        }
    }
    refresh(entry, state, now, lifetime);
    Some(*entry)
}

/// Sets an entry's state (keeping its own direction bit), timestamp and
/// lifetime, writing only when one of them changes (the clock is in
/// seconds): both directions of a flow, often on two CPUs, refresh the same
/// entries, and a write per packet would bounce their cache lines between
/// the CPUs.
#[inline(always)]
fn refresh(entry: &mut CtValue, state: u32, now: u32, lifetime: u32) {
    let flags = state | (entry.flags & ct_flags::REPLY);
    if entry.flags != flags || entry.last_seen != now || entry.lifetime != lifetime {
        entry.flags = flags;
        entry.last_seen = now;
        entry.lifetime = lifetime;
    }
}

/// A connection that is not translated starts from `p`: any reply entry
/// at the tuple its replies will arrive with is a leftover of an earlier
/// translated flow of the same client port (it would rewrite this
/// connection's replies), so that flow's entries go.
pub fn claim<T: FlowTable>(table: &T, p: &Packet) {
    let reply_key = CtKey {
        saddr: p.daddr,
        daddr: p.saddr,
        sport: p.dport,
        dport: p.sport,
        proto: p.proto,
        pad: [0; 3],
    };
    let Some(entry) = table.entry(&reply_key) else {
        return;
    };
    // SAFETY: the value is copied out at once.
    let entry = unsafe { *entry };
    if entry.flags & ct_flags::REPLY == 0 {
        return;
    }
    let original = partner_key(&reply_key, &entry);
    if let Some(found) = table.entry(&original) {
        // SAFETY: read at once.
        if pairs_with(unsafe { &*found }, &reply_key, entry.flags) {
            table.delete(&original);
        }
    }
    table.delete(&reply_key);
}

/// What a new translated flow records besides its tuples.
pub struct NewFlow {
    pub rev_nat_id: u32,
    /// Replies leave through this device (0: routed).
    pub reply_ifindex: u32,
    /// The backend whose open connections count the flow, or 0.
    pub backend_id: u32,
}

/// Records a new flow: `p` becomes `to`; replies (the reverse of `to`)
/// become the reverse of `p` and leave as `flow` says.
// A leaf call (see `lookup`).
#[inline(never)]
pub fn create(p: &Packet, to: &Tuple, flow: &NewFlow) -> Result<(), i64> {
    let ((reply_key, mut reply), (key, mut forward)) =
        entries(p, to, flow.rev_nat_id, flow.reply_ifindex);
    forward.backend_id = flow.backend_id;
    reply.backend_id = flow.backend_id;
    // Reply entry first: a reply can never find its way back untranslated.
    CT.put(&reply_key, &reply)?;
    CT.put(&key, &forward)
}

/// The (reply, forward) entries of a flow `p` translated to `to`. Both
/// carry `reply_ifindex`, so either can re-create the other.
pub fn entries(
    p: &Packet,
    to: &Tuple,
    rev_nat_id: u32,
    reply_ifindex: u32,
) -> ((CtKey, CtValue), (CtKey, CtValue)) {
    let forward = CtValue {
        saddr: to.saddr,
        daddr: to.daddr,
        sport: to.sport,
        dport: to.dport,
        ifindex: reply_ifindex,
        rev_nat_id,
        last_seen: now(),
        lifetime: lifetime(p.proto, 0),
        flags: 0,
        backend_id: 0,
    };
    let reply = CtValue {
        saddr: p.daddr,
        daddr: p.saddr,
        sport: p.dport,
        dport: p.sport,
        flags: ct_flags::REPLY,
        ..forward
    };
    ((reply_key(p.proto, to), reply), (key_of(p), forward))
}

/// Whether a translated source port is already used by another flow to
/// the same backend (SNAT collision), or was by one closed so recently
/// that the backend may still hold TIME_WAIT for it.
pub fn reply_taken<T: FlowTable>(table: &T, proto: u8, to: &Tuple) -> bool {
    table.entry(&reply_key(proto, to)).is_some_and(|entry| {
        // SAFETY: the value is read at once.
        let entry = unsafe { &*entry };
        now().wrapping_sub(entry.last_seen) <= entry.held_for()
    })
}

fn live_at(entry: &CtValue, now: u32) -> bool {
    now.wrapping_sub(entry.last_seen) <= entry.lifetime
}

/// The key replies to a flow translated to `to` arrive with.
pub fn reply_key(proto: u8, to: &Tuple) -> CtKey {
    CtKey {
        saddr: to.daddr,
        daddr: to.saddr,
        sport: to.dport,
        dport: to.sport,
        proto,
        pad: [0; 3],
    }
}
