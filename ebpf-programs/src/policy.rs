//! NetworkPolicy enforcement. Every connection of a local pod is tracked
//! at that pod (POLICY_CT, one entry per pod side) with the policy
//! revision it was allowed under; a new one is judged once — at the
//! sender for egress, after Service translation, and at the receiving pod
//! for ingress — and its replies follow the entry. When a pod's policy
//! changes (new revision), its connections are judged again at their next
//! packet: a connection the new policy denies stops there.
//!
//! A judgement: a pod not isolated in the direction allows; one whose
//! policy failed to program denies (fail closed); otherwise the peer's
//! identity (IDENTITIES), "any peer", and the peer's ipBlock number
//! (POLICY_CIDR) are each looked up in POLICY with the protocol and port.

use aya_ebpf::maps::lpm_trie::Key;
use tern_common::{
    HAIRPIN_ADDR, POLICY_CIDR_PREFIX_BASE, PolicyCidrKey, PolicyEndpoint, PolicyFlowKey,
    PolicyFlowValue, PolicyKey, Reason, ct_flags, ct_lifetime, policy_direction, policy_flags,
};

use crate::ct::{now, opens_connection};
use crate::events;
use crate::maps::{
    IDENTITIES, POLICY, POLICY_CIDR, POLICY_COUNTS, POLICY_CT, POLICY_DENIALS, POLICY_ENDPOINTS,
    bump, config, count,
};
use crate::packet::{IPPROTO_ICMP, IPPROTO_TCP, Packet, TCP_FIN, TCP_RST};
use tern_common::events::point;

/// The identity number that stands for every peer.
const ANY_IDENTITY: u32 = 0;
/// Full POLICY key: every field, the port to its last bit.
const POLICY_PREFIX_FULL: u32 = 96;
/// `judge`: denied.
const DENIED: i64 = -1;
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// What the tracked entries say of a packet.
pub enum Tracked {
    /// Part of a connection allowed at this pod (either way).
    Allowed,
    /// Part of a connection the pod's new policy no longer allows.
    Denied,
    /// No connection known: a new one, to be judged.
    New,
}

/// A local pod's packet as it sent it (before Service translation).
#[inline(never)]
pub fn egress_tracked(p: &Packet) -> Tracked {
    tracked(p, p.saddr, policy_direction::EGRESS)
}

/// A new connection from a local pod, judged on `to` (after Service
/// translation) and tracked under `sent` (as the pod sent it). False:
/// drop it.
#[inline(never)]
pub fn egress_new(sent: &Packet, to: &Packet) -> bool {
    let local = sent.saddr;
    let ep = endpoint(local);
    if ep.flags & policy_flags::EGRESS_ISOLATED != 0
        && to.proto == IPPROTO_TCP
        && !opens_connection(to)
        && to.daddr == config().node_addr
    {
        // The node's own connections reach the pod through the stack,
        // where nothing tracks them: the pod's TCP answers pass untracked
        // (kubelet probes must work under any policy).
        return true;
    }
    admit(sent, to, &ep, policy_direction::EGRESS, to.daddr, to.dport)
}

/// A packet about to be delivered to the local pod `p.daddr`, as that pod
/// will receive it. False: drop it.
#[inline(never)]
pub fn ingress(p: &Packet) -> bool {
    match tracked(p, p.daddr, policy_direction::INGRESS) {
        Tracked::Allowed => true,
        Tracked::Denied => false,
        Tracked::New => {
            let ep = endpoint(p.daddr);
            admit(p, p, &ep, policy_direction::INGRESS, p.saddr, p.dport)
        }
    }
}

/// Judges a new connection at `ep` and tracks it (under `key_of`'s tuple)
/// when allowed; counts, and reports it as `shown` (egress: after Service
/// translation, the tuple the verdict was on).
#[inline(always)]
fn admit(
    key_of: &Packet,
    shown: &Packet,
    ep: &Isolation,
    direction: u8,
    peer: u32,
    port: u16,
) -> bool {
    let local = if direction == policy_direction::EGRESS {
        key_of.saddr
    } else {
        key_of.daddr
    };
    let verdict = judge(ep, local, direction, peer, proto_port(key_of.proto, port));
    let isolated = ep.flags & isolated_flag(direction) != 0;
    let ingress = direction == policy_direction::INGRESS;
    let at = if ingress {
        point::TO_POD
    } else {
        point::FROM_POD
    };
    if verdict == DENIED {
        count_denial(shown, local, direction, at);
        return false;
    }
    if isolated {
        count(if ingress {
            Reason::PolicyAllowedIngress
        } else {
            Reason::PolicyAllowedEgress
        });
        if verdict > 0 {
            bump(&POLICY_COUNTS, verdict as u32);
        }
    }
    // Only a TCP segment that opens a connection starts tracking one: a
    // stray segment of a connection that was cut (or whose entry is gone)
    // passes on its own merit but does not let the other side's packets
    // through as its "replies".
    if key_of.proto == IPPROTO_TCP && !opens_connection(key_of) {
        return true;
    }
    // Reported once per connection: when its tracking starts.
    if isolated {
        events::policy_verdict(shown, true, at, verdict as u32);
    }
    let entry = PolicyFlowValue {
        revision: ep.revision,
        last_seen: now(),
        peer,
        port,
        flags: closing(key_of),
    };
    // Full (LRU: only under memory pressure): the next packet is judged
    // again, with the same result.
    let _ = POLICY_CT.insert(flow_key(key_of, direction), entry, 0);
    true
}

/// The connection `p` belongs to at the local pod `local`: one opened in
/// the packet's own direction, or one opened the other way (`p` is a
/// reply). An entry allowed under an older revision is judged again.
#[inline(always)]
fn tracked(p: &Packet, local: u32, direction: u8) -> Tracked {
    if p.proto == IPPROTO_ICMP && matches!(p.icmp_type, ICMP_UNREACHABLE | ICMP_TIME_EXCEEDED) {
        // Errors about a connection (port unreachable, fragmentation
        // needed, TTL) belong to it: without them PMTU discovery breaks.
        return Tracked::Allowed;
    }
    if opens_connection(p) {
        // A new TCP connection is judged, even on a tuple an earlier one
        // used (which a Service may now send to another backend).
        return Tracked::New;
    }
    let ep = endpoint(local);
    let now = now();
    let own = flow_key(p, direction);
    // Where the packet is: leaving the pod (egress) or reaching it.
    let at = if direction == policy_direction::INGRESS {
        point::TO_POD
    } else {
        point::FROM_POD
    };
    // Both directions are tried; the order only spares a lookup. A packet
    // from the lower port to the higher is most likely a server's reply to
    // a client's ephemeral port, so its connection is looked for the other
    // way first.
    let other = reply_key(p, opposite(direction));
    let (first, second) = if u16::from_be(p.sport) < u16::from_be(p.dport) {
        (&other, &own)
    } else {
        (&own, &other)
    };
    if let Some(found) = follow(first, &ep, local, now, p, at) {
        return found;
    }
    follow(second, &ep, local, now, p, at).unwrap_or(Tracked::New)
}

#[inline(always)]
fn follow(
    key: &PolicyFlowKey,
    ep: &Isolation,
    local: u32,
    now: u32,
    p: &Packet,
    at: u8,
) -> Option<Tracked> {
    let entry = POLICY_CT.get_ptr_mut(key)?;
    // SAFETY: a map value, updated in place (racing CPUs only move a
    // timestamp or set a flag).
    let entry = unsafe { &mut *entry };
    if !live(entry, key.proto, now) {
        return None;
    }
    if entry.revision != ep.revision {
        let judged = judge(
            ep,
            local,
            key.direction,
            entry.peer,
            proto_port(key.proto, entry.port),
        );
        if judged == DENIED {
            let _ = POLICY_CT.remove(key);
            count_denial(p, local, key.direction, at);
            return Some(Tracked::Denied);
        }
        entry.revision = ep.revision;
    }
    // Written only when something changes (the clock is in seconds): both
    // ends' CPUs look this entry up for every packet, and a write per
    // packet would bounce its cache line between them.
    if entry.last_seen != now {
        entry.last_seen = now;
    }
    let flags = entry.flags | closing(p);
    if flags != entry.flags {
        entry.flags = flags;
    }
    Some(Tracked::Allowed)
}

/// A denial, by direction and against the pod's first isolating policy.
// Inlined: a call of its own would take the deepest chain past the
// verifier's 512 bytes of combined stack.
#[inline(always)]
fn count_denial(p: &Packet, local: u32, direction: u8, at: u8) {
    let ingress = direction == policy_direction::INGRESS;
    count(if ingress {
        Reason::PolicyDeniedIngress
    } else {
        Reason::PolicyDeniedEgress
    });
    // Read here, on the denial path only: the hot path carries just the
    // revision and flags.
    // SAFETY: fields are read at once.
    if let Some(ep) = unsafe { POLICY_ENDPOINTS.get(local) } {
        let policy = if ingress {
            ep.ingress_policy
        } else {
            ep.egress_policy
        };
        if policy != 0 {
            bump(&POLICY_DENIALS, policy);
        }
        events::policy_verdict(p, false, at, policy);
    }
}

/// The verdict for a new connection at `local` with `peer` on the packed
/// protocol and port: `DENIED`, 0 (allowed, no policy needed) or the
/// number of the policy that allows it.
#[inline(never)]
fn judge(ep: &Isolation, local: u32, direction: u8, peer: u32, proto_port: u32) -> i64 {
    if ep.flags & isolated_flag(direction) == 0 {
        return 0;
    }
    let deny_all = if direction == policy_direction::INGRESS {
        policy_flags::INGRESS_DENY_ALL
    } else {
        policy_flags::EGRESS_DENY_ALL
    };
    if ep.flags & deny_all != 0 {
        return DENIED;
    }
    if peer == local || peer == u32::from_ne_bytes(HAIRPIN_ADDR) {
        return 0; // a pod reaching itself, e.g. through a Service
    }
    // SAFETY: the value is copied out at once.
    if let Some(identity) = unsafe { IDENTITIES.get(peer) }.copied()
        && let Some(policy) = allowed_for(local, identity, direction, proto_port)
    {
        return policy;
    }
    if let Some(policy) = allowed_for(local, ANY_IDENTITY, direction, proto_port) {
        return policy;
    }
    let cidr = PolicyCidrKey {
        endpoint: local,
        direction,
        pad: [0; 3],
        addr: peer,
    };
    if let Some(number) = POLICY_CIDR
        .get(Key::new(POLICY_CIDR_PREFIX_BASE + 32, cidr))
        .copied()
        && let Some(policy) = allowed_for(local, number, direction, proto_port)
    {
        return policy;
    }
    DENIED
}

/// The POLICY entry for (pod, identity, direction, protocol, port), as
/// the policy number allowing it.
#[inline(always)]
fn allowed_for(local: u32, identity: u32, direction: u8, proto_port: u32) -> Option<i64> {
    let key = PolicyKey {
        endpoint: local,
        identity: identity.to_be_bytes(),
        direction,
        proto: (proto_port >> 16) as u8,
        port: (proto_port as u16).to_ne_bytes(),
    };
    POLICY
        .get(Key::new(POLICY_PREFIX_FULL, key))
        .map(|rule| rule.policy as i64)
}

/// Protocol and wire-order port in one argument (BPF calls take five).
fn proto_port(proto: u8, port: u16) -> u32 {
    (proto as u32) << 16 | port as u32
}

/// What the hot path needs of a local pod's POLICY_ENDPOINTS entry
/// (none: not isolated).
#[derive(Clone, Copy, Default)]
struct Isolation {
    revision: u32,
    flags: u32,
}

fn endpoint(local: u32) -> Isolation {
    // SAFETY: the fields are copied out at once.
    unsafe { POLICY_ENDPOINTS.get(local) }.map_or(Isolation::default(), |e: &PolicyEndpoint| {
        Isolation {
            revision: e.revision,
            flags: e.flags,
        }
    })
}

fn isolated_flag(direction: u8) -> u32 {
    if direction == policy_direction::INGRESS {
        policy_flags::INGRESS_ISOLATED
    } else {
        policy_flags::EGRESS_ISOLATED
    }
}

fn opposite(direction: u8) -> u8 {
    if direction == policy_direction::INGRESS {
        policy_direction::EGRESS
    } else {
        policy_direction::INGRESS
    }
}

fn flow_key(p: &Packet, direction: u8) -> PolicyFlowKey {
    PolicyFlowKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        direction,
        pad: [0; 2],
    }
}

/// The key of the connection `p` answers.
fn reply_key(p: &Packet, direction: u8) -> PolicyFlowKey {
    PolicyFlowKey {
        saddr: p.daddr,
        daddr: p.saddr,
        sport: p.dport,
        dport: p.sport,
        proto: p.proto,
        direction,
        pad: [0; 2],
    }
}

fn closing(p: &Packet) -> u16 {
    if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        ct_flags::CLOSING as u16
    } else {
        0
    }
}

fn live(entry: &PolicyFlowValue, proto: u8, now: u32) -> bool {
    let lifetime = if proto != IPPROTO_TCP {
        ct_lifetime::OTHER
    } else if entry.flags & ct_flags::CLOSING as u16 != 0 {
        ct_lifetime::TCP_CLOSING
    } else {
        ct_lifetime::TCP_ESTABLISHED
    };
    now.wrapping_sub(entry.last_seen) <= lifetime
}
