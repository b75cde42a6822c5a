//! The per-packet Service path: DNAT to a backend with connection
//! tracking, reverse NAT of replies, SNAT for NodePort traffic from
//! outside, and refusals for Services without backends.

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::generated::{bpf_get_prandom_u32, bpf_redirect_neigh},
    programs::TcContext,
};
use tern_common::events::{point, service_path};
use tern_common::{
    DropReason, HAIRPIN_ADDR, Reason, SOURCE_RANGE_PREFIX_BASE, ServiceKey, ServiceValue,
    SourceRangeKey, ct_flags, scope, service_flags,
};

use crate::ct;
use crate::events;
use crate::lb::{count_connection, counts_connections, lookup_service_for_pod, select_backend};
use crate::maps::{CT, SERVICES, SOURCE_RANGES, config, count};
use crate::packet::{Packet, Tuple, ifindex, translate};
use crate::reject;

/// What became of the packet: handled (a tc verdict), or to be routed on
/// (possibly rewritten).
pub enum Outcome {
    Verdict(i32),
    Route,
}

/// Same hash on every node for the same flow, so Maglev picks the same
/// backend wherever the flow lands.
fn flow_hash(p: &Packet) -> u32 {
    let mut h = p.saddr
        ^ p.daddr.rotate_left(7)
        ^ ((p.sport as u32) << 16 | p.dport as u32)
        ^ p.proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

/// A packet of a tracked flow: translated as its entry says.
// Inlined, so that the chain program -> CT lookup is one call deep.
#[inline(always)]
fn follow_ct(ctx: &TcContext, p: &mut Packet, at: u8) -> Option<Outcome> {
    let entry = ct::lookup(&CT, p)?;
    if translate(ctx, p, &Tuple::of(&entry)).is_err() {
        events::drop(p, DropReason::RewriteFailed, at, ifindex(ctx));
        return Some(Outcome::Verdict(TC_ACT_SHOT));
    }
    count(if entry.flags & ct_flags::REPLY != 0 {
        Reason::LbRevNat
    } else {
        Reason::LbDnat
    });
    if entry.flags & ct_flags::REPLY != 0 && entry.ifindex != 0 {
        // A reply to a client outside: out of the device the request came
        // in on, next hop and MACs from the neighbour table.
        let verdict = unsafe { bpf_redirect_neigh(entry.ifindex, core::ptr::null_mut(), 0, 0) };
        return Some(Outcome::Verdict(verdict as i32));
    }
    Some(Outcome::Route)
}

/// A connection opened without translation (to a pod address, or one
/// socket-LB translated) owns its tuple: replies left over from an earlier
/// per-packet flow of the same client port must not rewrite its replies.
fn claim_if_opening(p: &Packet) {
    if ct::opens_connection(p) {
        ct::claim(&CT, p);
    }
}

/// Traffic from a pod on another node (overlay): replies of flows this
/// node translated are translated back; nothing else is touched.
pub fn from_overlay(ctx: &TcContext, p: &mut Packet) -> Outcome {
    if !p.has_ports() {
        return Outcome::Route;
    }
    follow_ct(ctx, p, point::FROM_OVERLAY).unwrap_or(Outcome::Route)
}

/// Traffic from a local pod.
// Inlined into both pod programs: as a BPF function of its own, its
// `Outcome::Route` return leaves the unused payload slot holding whatever
// register LLVM picks, which the verifier refuses when it is a pointer.
#[inline(always)]
pub fn from_pod(ctx: &TcContext, p: &mut Packet) -> Outcome {
    if !p.has_ports() {
        return Outcome::Route;
    }
    if let Some(outcome) = follow_ct(ctx, p, point::FROM_POD) {
        return outcome;
    }
    let Some((master, service)) = lookup_service_for_pod(p.daddr, p.dport, p.proto) else {
        let cfg = config();
        if cfg.service_cidr_mask != 0 && p.daddr & cfg.service_cidr_mask == cfg.service_cidr_addr {
            return Outcome::Verdict(refuse(ctx, p, DropReason::UnknownService, point::FROM_POD));
        }
        claim_if_opening(p);
        return Outcome::Route;
    };
    let (mut to, counted) = match to_backend(ctx, p, &master, &service, point::FROM_POD) {
        Ok(chosen) => chosen,
        Err(refused) => return refused,
    };
    if to.daddr == p.saddr {
        // Hairpin: the pod would drop a packet from its own address.
        to.saddr = u32::from_ne_bytes(HAIRPIN_ADDR);
    }
    let flow = ct::NewFlow {
        rev_nat_id: service.rev_nat_id,
        reply_ifindex: 0,
        backend_id: counted,
    };
    translate_new(ctx, p, &to, &flow, Reason::LbDnat)
}

/// The tuple of `p` sent to one of the service's backends, with the
/// backend's id when the flow counts as its open connection (else 0), or
/// the refusal when it has none.
// Inlined: BPF calls take at most five arguments (the result is a sixth).
#[inline(always)]
fn to_backend(
    ctx: &TcContext,
    p: &Packet,
    master: &ServiceKey,
    service: &ServiceValue,
    at: u8,
) -> Result<(Tuple, u32), Outcome> {
    if !source_allowed(service, p.saddr) {
        events::drop(p, DropReason::SourceRangeDenied, at, ifindex(ctx));
        return Err(Outcome::Verdict(TC_ACT_SHOT));
    }
    let Some(chosen) = select_backend(master, service, flow_hash(p), p.saddr as u64) else {
        if service.flags & service_flags::NO_LOCAL_BACKEND != 0 {
            events::drop(p, DropReason::NoLocalBackend, at, ifindex(ctx));
            return Err(Outcome::Verdict(TC_ACT_SHOT));
        }
        return Err(Outcome::Verdict(refuse(ctx, p, DropReason::NoBackend, at)));
    };
    let to = Tuple {
        saddr: p.saddr,
        daddr: chosen.backend.addr,
        sport: p.sport,
        dport: chosen.backend.port,
    };
    let counted = if counts_connections(service, p.proto) {
        chosen.id
    } else {
        0
    };
    Ok((to, counted))
}

/// `loadBalancerSourceRanges`: the client is in one of the frontend's
/// ranges (or it has none).
#[inline(always)]
fn source_allowed(service: &ServiceValue, saddr: u32) -> bool {
    if service.flags & service_flags::SOURCE_RANGES == 0 {
        return true;
    }
    let key = SourceRangeKey {
        rev_nat_id: service.rev_nat_id,
        addr: saddr,
    };
    SOURCE_RANGES
        .get(Key::new(SOURCE_RANGE_PREFIX_BASE + 32, key))
        .is_some()
}

/// Answers with a refusal (kube-proxy's REJECT).
#[inline(always)]
fn refuse(ctx: &TcContext, p: &Packet, reason: DropReason, at: u8) -> i32 {
    count(Reason::LbReject);
    reject::refuse(ctx, p, reason, at)
}

// Inlined: BPF calls take at most five arguments.
#[inline(always)]
fn translate_new(
    ctx: &TcContext,
    p: &mut Packet,
    to: &Tuple,
    flow: &ct::NewFlow,
    reason: Reason,
) -> Outcome {
    let (at, path) = if reason == Reason::ExternalDnat {
        (point::FROM_NETDEV, service_path::EXTERNAL)
    } else {
        (point::FROM_POD, service_path::PACKET)
    };
    if ct::create(p, to, flow).is_err() {
        count(Reason::CtFull);
        events::drop(p, DropReason::CtFull, at, ifindex(ctx));
        return Outcome::Verdict(TC_ACT_SHOT);
    }
    if flow.backend_id != 0 {
        count_connection(flow.backend_id, 1);
    }
    events::service(p, to.daddr, to.dport, path, at, 0);
    if translate(ctx, p, to).is_err() {
        events::drop(p, DropReason::RewriteFailed, at, ifindex(ctx));
        return Outcome::Verdict(TC_ACT_SHOT);
    }
    count(reason);
    Outcome::Route
}

/// Traffic from outside the cluster on an underlay device: NodePort,
/// LoadBalancer and externalIP frontends (External scope).
pub fn from_netdev(ctx: &TcContext, p: &mut Packet) -> Outcome {
    if !p.has_ports() {
        return Outcome::Route;
    }
    if let Some(outcome) = follow_ct(ctx, p, point::FROM_NETDEV) {
        return outcome;
    }
    let master = ServiceKey {
        addr: p.daddr,
        port: p.dport,
        slot: 0,
        proto: p.proto,
        scope: scope::EXTERNAL,
        pad: 0,
    };
    let Some(service) = (unsafe { SERVICES.get(master) }).copied() else {
        claim_if_opening(p);
        return Outcome::Route;
    };
    let (mut to, counted) = match to_backend(ctx, p, &master, &service, point::FROM_NETDEV) {
        Ok(chosen) => chosen,
        Err(refused) => return refused,
    };
    if service.flags & service_flags::EXTERNAL_LOCAL == 0 {
        // externalTrafficPolicy=Cluster: replies must come back through
        // this node, so the source becomes the node (port kept if free).
        let node = config().node_addr;
        to.saddr = if node != 0 { node } else { p.daddr };
        let mut taken = ct::reply_taken(&CT, p.proto, &to);
        let mut tries = 0;
        while taken && tries < 8 {
            let port = 32768 + (unsafe { bpf_get_prandom_u32() } % 28232) as u16;
            to.sport = port.to_be();
            taken = ct::reply_taken(&CT, p.proto, &to);
            tries += 1;
        }
        // Dropped only when the last port tried is taken too.
        if taken {
            count(Reason::CtFull);
            events::drop(
                p,
                DropReason::SnatPortsExhausted,
                point::FROM_NETDEV,
                ifindex(ctx),
            );
            return Outcome::Verdict(TC_ACT_SHOT);
        }
    }
    let flow = ct::NewFlow {
        rev_nat_id: service.rev_nat_id,
        reply_ifindex: ifindex(ctx),
        backend_id: counted,
    };
    translate_new(ctx, p, &to, &flow, Reason::ExternalDnat)
}
