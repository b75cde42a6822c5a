//! Connection tracking for translated flows: each flow has an entry for
//! its original direction and one for replies; both say what the tuple
//! becomes. Entries expire by protocol and TCP state; the agent removes
//! expired ones.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use tern_common::{CtKey, CtValue, ct_flags, ct_lifetime};

use crate::maps::CT;
use crate::packet::{IPPROTO_TCP, Packet, TCP_FIN, TCP_RST, TCP_SYN, Tuple};

pub fn now() -> u32 {
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}

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

fn lifetime(p: &Packet, flags: u32) -> u32 {
    if p.proto != IPPROTO_TCP {
        ct_lifetime::OTHER
    } else if flags & ct_flags::CLOSING != 0 {
        ct_lifetime::TCP_CLOSING
    } else if flags & ct_flags::ESTABLISHED != 0 {
        ct_lifetime::TCP_ESTABLISHED
    } else {
        ct_lifetime::TCP_SYN
    }
}

/// The live entry for this packet, refreshed; `None` if absent or expired.
pub fn lookup(p: &Packet) -> Option<CtValue> {
    let entry = CT.get_ptr_mut(key_of(p))?;
    // SAFETY: the pointer is to a map value; fields are updated in place
    // (a racing update from another CPU only shifts a timestamp).
    refresh(unsafe { &mut *entry }, p)
}

/// Updates a tracked entry (CT or NAT) for packet `p`: TCP state, last
/// seen, lifetime. `None` if it had expired.
pub fn refresh(entry: &mut CtValue, p: &Packet) -> Option<CtValue> {
    let now = now();
    if !live_at(entry, now) {
        return None;
    }
    let mut flags = entry.flags;
    if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flags |= ct_flags::CLOSING;
    }
    if entry.flags & ct_flags::REPLY != 0 && p.tcp_flags & TCP_SYN == 0 {
        flags |= ct_flags::ESTABLISHED;
    }
    entry.flags = flags;
    entry.last_seen = now;
    entry.lifetime = lifetime(p, flags);
    Some(*entry)
}

/// Records a new flow: `p` becomes `to`; replies (the reverse of `to`)
/// become the reverse of `p` and leave through `reply_ifindex`.
pub fn create(p: &Packet, to: &Tuple, rev_nat_id: u32, reply_ifindex: u32) -> Result<(), i64> {
    let ((reply_key, reply), (key, forward)) = entries(p, to, rev_nat_id, reply_ifindex);
    // Reply entry first: a reply can never find its way back untranslated.
    CT.insert(reply_key, reply, 0).map_err(i64::from)?;
    CT.insert(key, forward, 0).map_err(i64::from)
}

/// The (reply, forward) entries of a flow `p` translated to `to`.
pub fn entries(
    p: &Packet,
    to: &Tuple,
    rev_nat_id: u32,
    reply_ifindex: u32,
) -> ((CtKey, CtValue), (CtKey, CtValue)) {
    let now = now();
    let forward = CtValue {
        saddr: to.saddr,
        daddr: to.daddr,
        sport: to.sport,
        dport: to.dport,
        ifindex: 0,
        rev_nat_id,
        last_seen: now,
        lifetime: lifetime(p, 0),
        flags: 0,
    };
    let reply = CtValue {
        saddr: p.daddr,
        daddr: p.saddr,
        sport: p.dport,
        dport: p.sport,
        ifindex: reply_ifindex,
        rev_nat_id,
        last_seen: now,
        lifetime: lifetime(p, 0),
        flags: ct_flags::REPLY,
    };
    ((reply_key(p.proto, to), reply), (key_of(p), forward))
}

/// Whether a translated source port is already used by another flow to
/// the same backend (SNAT collision).
pub fn reply_taken(proto: u8, to: &Tuple) -> bool {
    // SAFETY: the value is read at once.
    unsafe { CT.get(reply_key(proto, to)) }.is_some_and(live)
}

/// Not expired yet.
pub fn live(entry: &CtValue) -> bool {
    live_at(entry, now())
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
