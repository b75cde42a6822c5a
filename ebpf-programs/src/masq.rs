//! Masquerade: TCP, UDP and ICMP echo from a local pod to a destination
//! outside the cluster (not in NON_MASQUERADE) leave the underlay device
//! with the node's address and a node port (for echo: identifier) of their
//! own; replies coming in get the pod's address and port back. Flows live
//! in the NAT map, kept like CT entries (an entry per direction, TCP-state
//! lifetimes, agent GC).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_get_prandom_u32,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use tern_common::events::point;
use tern_common::{DropReason, MASQUERADE_PORT_MAX, MASQUERADE_PORT_MIN, Reason};

use crate::ct;
use crate::events;
use crate::maps::{ENDPOINTS, NAT, NON_MASQUERADE, config, count};
use crate::packet::{
    IP_CHECK, IP_DADDR, IP_SADDR, IPPROTO_ICMP, IPPROTO_TCP, Packet, Tuple, ifindex, parse, rewrite,
};

/// Ports tried for a new flow before it is refused.
const PORT_TRIES: u32 = 16;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// Offset of an echo's identifier in its ICMP header.
const ICMP_ID: usize = 4;

/// tc egress on an underlay device.
pub fn to_netdev(ctx: &TcContext) -> i32 {
    let cfg = config();
    if cfg.masquerade == 0 || cfg.node_addr == 0 {
        return TC_ACT_OK;
    }
    let Some(mut p) = parse(ctx) else {
        return TC_ACT_OK;
    };
    if !identify(ctx, &mut p, ICMP_ECHO_REQUEST) {
        return TC_ACT_OK;
    }
    // SAFETY: only presence is read.
    if unsafe { ENDPOINTS.get(p.saddr) }.is_none()
        || NON_MASQUERADE.get(Key::new(32, p.daddr)).is_some()
    {
        return TC_ACT_OK;
    }
    // Only a new outgoing flow gets a NAT entry: a TCP segment other than
    // the opening SYN without one belongs to a connection made from
    // outside (the pod's answer), which keeps the pod's address.
    let opens = p.proto != IPPROTO_TCP || ct::opens_connection(&p);
    let to = match ct::lookup(&NAT, &p) {
        Some(entry) => Tuple::of(&entry),
        None if opens => match new_flow(&p, cfg.node_addr) {
            Ok(to) => to,
            Err(reason) => {
                events::drop(&p, reason, point::TO_NETDEV, ifindex(ctx));
                return TC_ACT_SHOT;
            }
        },
        None => return TC_ACT_OK,
    };
    if rewrite_flow(ctx, &p, &to).is_err() {
        events::drop(
            &p,
            DropReason::RewriteFailed,
            point::TO_NETDEV,
            ifindex(ctx),
        );
        return TC_ACT_SHOT;
    }
    events::trace(&p, point::TO_NETDEV, ifindex(ctx));
    count(Reason::Masquerade);
    TC_ACT_OK
}

/// Gives `p` the identity masquerade tracks its flow by: TCP and UDP ports
/// as they are; an ICMP echo's identifier as the requester's port (a
/// request's source, a reply's destination). False for anything else.
fn identify(ctx: &TcContext, p: &mut Packet, echo: u8) -> bool {
    if p.has_ports() {
        return true;
    }
    let first_fragment = u16::from_be_bytes(p.ip.frags) & 0x1fff == 0;
    if p.proto != IPPROTO_ICMP || !first_fragment || ctx.load::<u8>(p.l4) != Ok(echo) {
        return false;
    }
    let Ok(id) = ctx.load::<u16>(p.l4 + ICMP_ID) else {
        return false;
    };
    (p.sport, p.dport) = if echo == ICMP_ECHO_REQUEST {
        (id, 0)
    } else {
        (0, id)
    };
    true
}

/// `rewrite` for TCP and UDP; for ICMP echo the checksum covers no pseudo
/// header (addresses touch only the IP header's) and the identifier is
/// the port that changes.
fn rewrite_flow(ctx: &TcContext, p: &Packet, to: &Tuple) -> Result<(), i64> {
    if p.proto != IPPROTO_ICMP {
        return rewrite(ctx, p, to);
    }
    for (offset, old, new) in [(IP_SADDR, p.saddr, to.saddr), (IP_DADDR, p.daddr, to.daddr)] {
        if old != new {
            ctx.l3_csum_replace(IP_CHECK, old as u64, new as u64, 4)?;
            ctx.store(offset, &new, 0)?;
        }
    }
    // A request's identifier is its "source port", a reply's its "destination".
    let (old, new) = if p.dport == 0 && to.dport == 0 {
        (p.sport, to.sport)
    } else {
        (p.dport, to.dport)
    };
    if old != new {
        ctx.l4_csum_replace(p.l4 + 2, old as u64, new as u64, 2)?;
        ctx.store(p.l4 + ICMP_ID, &new, 0)?;
    }
    Ok(())
}

/// Picks a free node port for `p` (a hash of the flow first, then random
/// ones) and records both directions; why not (counted) when the map is
/// full or no port was free.
fn new_flow(p: &Packet, node_addr: u32) -> Result<Tuple, DropReason> {
    let span = (MASQUERADE_PORT_MAX - MASQUERADE_PORT_MIN) as u32 + 1;
    let mut to = Tuple {
        saddr: node_addr,
        daddr: p.daddr,
        sport: 0,
        dport: p.dport,
    };
    let mut pick = p.saddr ^ (p.sport as u32) << 16 ^ p.daddr.rotate_left(5);
    for _ in 0..PORT_TRIES {
        to.sport = (MASQUERADE_PORT_MIN + (pick % span) as u16).to_be();
        if !ct::reply_taken(&NAT, p.proto, &to) {
            let ((reply_key, reply), (key, forward)) = ct::entries(p, &to, 0, 0);
            // Reply entry first: a reply never arrives without its way back.
            if NAT.insert(reply_key, reply, 0).is_err() {
                count(Reason::NatFull);
                return Err(DropReason::NatFull);
            }
            if NAT.insert(key, forward, 0).is_err() {
                let _ = NAT.remove(reply_key);
                count(Reason::NatFull);
                return Err(DropReason::NatFull);
            }
            return Ok(to);
        }
        // SAFETY: plain helper call.
        pick = unsafe { bpf_get_prandom_u32() };
    }
    count(Reason::NatFull);
    Err(DropReason::NatPortsExhausted)
}

/// On the way in (underlay ingress): a reply to a masqueraded flow gets
/// the pod's address and port back (`p` follows); an error is the verdict
/// for a packet that could not be rewritten.
pub fn reply_to_pod(ctx: &TcContext, p: &mut Packet) -> Result<(), i32> {
    // Masqueraded flows are answered to the node's address: anything else
    // (pod to pod, NodePort) skips the NAT lookup.
    let cfg = config();
    if cfg.masquerade == 0 || p.daddr != cfg.node_addr {
        return Ok(());
    }
    // An echo's identity lives in a copy: other code keys ICMP by nothing.
    let mut flow = *p;
    if !identify(ctx, &mut flow, ICMP_ECHO_REPLY) {
        return Ok(());
    }
    let Some(entry) = ct::lookup(&NAT, &flow) else {
        return Ok(());
    };
    let to = Tuple::of(&entry);
    if rewrite_flow(ctx, &flow, &to).is_err() {
        events::drop(
            p,
            DropReason::RewriteFailed,
            point::FROM_NETDEV,
            ifindex(ctx),
        );
        return Err(TC_ACT_SHOT);
    }
    p.saddr = to.saddr;
    p.daddr = to.daddr;
    if p.has_ports() {
        p.sport = to.sport;
        p.dport = to.dport;
    }
    count(Reason::MasqueradeReply);
    Ok(())
}
