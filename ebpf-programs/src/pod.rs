//! Forwarding: a packet for a pod on this node is handed straight to that
//! pod's interface with `bpf_redirect_peer`, skipping the node's routing;
//! one for a pod on another node goes into the VXLAN overlay with that
//! node as the tunnel's far end (overlay mode), or straight out of the
//! device a FIB lookup picks (native routing); anything else goes up the
//! node's own stack.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_REDIRECT,
        TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
    },
    maps::lpm_trie::Key,
    programs::TcContext,
};
use tern_common::events::point;
use tern_common::{DropReason, EndpointInfo, Reason, endpoint_flags};

use crate::events;
use crate::maps::{CONFIG, ENDPOINTS, TUNNEL, config, count};
use crate::packet::{IP_CHECK, L3, Packet, ifindex, malformed_ipv4, parse};
use crate::policy::{self, Tracked};
use crate::service_nat::{self, Outcome};
use crate::{arp, masq, overlay};

const IPV4_TTL: usize = L3 + 8;
const AF_INET: u8 = 2;

pub fn from_pod(ctx: &TcContext) -> i32 {
    from_pod_to::<false>(ctx)
}

/// A pod whose veth has an ingress qdisc of its own (a chained bandwidth
/// plugin shapes its egress there, through an ifb): Service translation
/// as in `from_pod`, then the packet goes on to that qdisc (TCX_NEXT),
/// which hands it to the node's stack, not straight to its destination.
pub fn from_pod_via_qdisc(ctx: &TcContext) -> i32 {
    from_pod_to::<true>(ctx)
}

// One body for both programs (the verifier takes them the same way).
#[inline(always)]
fn from_pod_to<const VIA_QDISC: bool>(ctx: &TcContext) -> i32 {
    let Some(mut p) = parse(ctx) else {
        if let Some(verdict) = arp::answer_gateway(ctx) {
            return verdict;
        }
        if malformed_ipv4(ctx) {
            count(Reason::MalformedIpv4);
            events::drop_unparsed(DropReason::MalformedIpv4, point::FROM_POD, ifindex(ctx));
            return TC_ACT_SHOT;
        }
        count(Reason::NotIpv4);
        return if VIA_QDISC { TC_ACT_UNSPEC } else { TC_ACT_OK };
    };
    // A pod sends from its own address, on its own veth: policy knows
    // peers by address, so no pod may speak as another.
    // SAFETY: the value is copied out at once.
    match unsafe { ENDPOINTS.get(p.saddr) } {
        Some(own) if own.ifindex == ifindex(ctx) => {}
        _ => {
            count(Reason::SourceNotPod);
            events::drop(&p, DropReason::SourceNotPod, point::FROM_POD, ifindex(ctx));
            return TC_ACT_SHOT;
        }
    }
    events::trace(&p, point::FROM_POD, ifindex(ctx));
    // Policy sees the connection as the pod sent it (its replies, before
    // reverse translation) and judges a new one on where it goes (after
    // Service translation).
    let sent = p;
    let tracked = policy::egress_tracked(&sent);
    if let Tracked::Denied = tracked {
        return TC_ACT_SHOT;
    }
    match service_nat::from_pod(ctx, &mut p) {
        Outcome::Verdict(verdict) => verdict,
        Outcome::Route if matches!(tracked, Tracked::New) && !policy::egress_new(&sent, &p) => {
            TC_ACT_SHOT
        }
        Outcome::Route if VIA_QDISC => {
            // The stack delivers it to a local pod without us: judge its
            // ingress here.
            // SAFETY: only presence is read.
            if unsafe { ENDPOINTS.get(p.daddr) }.is_some() && !policy::ingress(&p) {
                return TC_ACT_SHOT;
            }
            count(Reason::ToPodQdisc);
            TC_ACT_UNSPEC
        }
        Outcome::Route => forwarded(ctx, &p, point::FROM_POD),
    }
}

pub fn from_netdev(ctx: &TcContext) -> i32 {
    let Some(mut p) = parse(ctx) else {
        return unparsed(ctx, point::FROM_NETDEV);
    };
    if claims_local_address(ctx, &p, point::FROM_NETDEV) {
        return TC_ACT_SHOT;
    }
    events::trace(&p, point::FROM_NETDEV, ifindex(ctx));
    // A reply to masqueraded traffic gets the pod's address back first;
    // if the pod had reached it through a Service, CT then gives it the
    // Service's address too.
    if let Err(verdict) = masq::reply_to_pod(ctx, &mut p) {
        return verdict;
    }
    match service_nat::from_netdev(ctx, &mut p) {
        Outcome::Verdict(verdict) => verdict,
        Outcome::Route => forwarded(ctx, &p, point::FROM_NETDEV),
    }
}

/// What arrives from outside the node that `parse` could not read: left
/// to the stack unless it is IPv4 (which could reach a pod unjudged).
pub fn unparsed(ctx: &TcContext, at: u8) -> i32 {
    if malformed_ipv4(ctx) {
        count(Reason::MalformedIpv4);
        events::drop_unparsed(DropReason::MalformedIpv4, at, ifindex(ctx));
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

/// A packet from outside the node (underlay, overlay) whose source is a
/// local pod's address or the hairpin address: forged, since those only
/// ever come from the pod's own veth. Counted; the caller drops it.
pub fn claims_local_address(ctx: &TcContext, p: &Packet, at: u8) -> bool {
    // SAFETY: only presence is read.
    let forged = p.saddr == u32::from_ne_bytes(tern_common::HAIRPIN_ADDR)
        || unsafe { ENDPOINTS.get(p.saddr) }.is_some();
    if forged {
        count(Reason::SourceNotPod);
        events::drop(p, DropReason::SourceNotPod, at, ifindex(ctx));
    }
    forged
}

/// `forward`'s verdict; a packet for an unknown pod is refused here, at
/// the program's top level (the refusal's frame is large).
#[inline(always)]
fn forwarded(ctx: &TcContext, p: &Packet, at: u8) -> i32 {
    match forward(ctx, p) {
        UNKNOWN_POD => refuse_unknown_pod(ctx, p, at).1,
        verdict => verdict,
    }
}

/// `forward`: the destination is an address of this node's PodCIDR that
/// no pod has (not a tc verdict; those are -1 and up).
const UNKNOWN_POD: i32 = -2;

/// Into the local pod `p.daddr`, else through the overlay to the node that
/// has it, else to the node's stack; `UNKNOWN_POD` for the caller to refuse.
fn forward(ctx: &TcContext, p: &Packet) -> i32 {
    // SAFETY: the value is copied out at once.
    let (reason, verdict) = match unsafe { ENDPOINTS.get(p.daddr) }.copied() {
        Some(_) if !policy::ingress(p) => return TC_ACT_SHOT,
        Some(endpoint) => redirect_to_local_pod(ctx, p, &endpoint),
        None if unknown_pod(p.daddr) => return UNKNOWN_POD,
        None => to_remote_node(ctx, p),
    };
    count(reason);
    verdict
}

/// A packet for an address of this node's PodCIDR that no pod has (a pod
/// just deleted, a stale backend): refused at once — TCP RST, ICMP port
/// unreachable for UDP — so the client fails now instead of timing out.
/// Anything else (ICMP) is only dropped: no error answers an error.
#[inline(always)]
pub fn refuse_unknown_pod(ctx: &TcContext, p: &Packet, at: u8) -> (Reason, i32) {
    count(Reason::UnknownPod);
    let verdict = if p.has_ports() {
        crate::reject::refuse(ctx, p, DropReason::UnknownPod, at)
    } else {
        events::drop(p, DropReason::UnknownPod, at, ifindex(ctx));
        TC_ACT_SHOT
    };
    (Reason::UnknownPod, verdict)
}

/// An address of this node's PodCIDR that no local pod has (ENDPOINTS
/// was just asked). The network, first (router) and broadcast addresses
/// are the stack's.
pub fn unknown_pod(daddr: u32) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    if cfg.pod_cidr_mask == 0 || daddr & cfg.pod_cidr_mask != cfg.pod_cidr_addr {
        return false;
    }
    let host = u32::from_be(daddr) & !u32::from_be(cfg.pod_cidr_mask);
    host > 1 && host != !u32::from_be(cfg.pod_cidr_mask)
}

pub fn redirect_to_local_pod(
    ctx: &TcContext,
    p: &Packet,
    endpoint: &EndpointInfo,
) -> (Reason, i32) {
    let pass = TC_ACT_OK;
    if !hop(ctx, p) {
        return (Reason::PassToStack, pass);
    }
    if endpoint.flags & endpoint_flags::INGRESS_SHAPED != 0 {
        // Through the host veth's qdisc (the pod's ingress limit); the
        // neighbour table supplies the pod's current MAC.
        // SAFETY: plain helper call; the kernel resolves the next hop.
        let verdict = unsafe { bpf_redirect_neigh(endpoint.ifindex, core::ptr::null_mut(), 0, 0) };
        return if verdict == TC_ACT_REDIRECT as i64 {
            events::trace(p, point::TO_POD, endpoint.ifindex);
            (Reason::RedirectLocalPod, verdict as i32)
        } else {
            (Reason::RedirectFailed, pass)
        };
    }
    if set_macs(ctx, &endpoint.pod_mac, &endpoint.host_mac).is_err() {
        return (Reason::RedirectFailed, pass);
    }
    // SAFETY: plain helper call; it only records the target for tc.
    let verdict = unsafe { bpf_redirect_peer(endpoint.ifindex, 0) };
    if verdict == TC_ACT_REDIRECT as i64 {
        events::trace(p, point::TO_POD, endpoint.ifindex);
        (Reason::RedirectLocalPod, verdict as i32)
    } else {
        (Reason::RedirectFailed, pass)
    }
}

/// A packet for a remote node's PodCIDR: into the overlay (overlay mode),
/// or out of the underlay device towards that node (native routing).
/// Anything else is the node stack's to route. A call of its own: its
/// FIB lookup must not sit in `forward`'s frame, on the path that goes on
/// to judge policy.
#[inline(never)]
fn to_remote_node(ctx: &TcContext, p: &Packet) -> (Reason, i32) {
    let Some(node) = TUNNEL.get(Key::new(32, p.daddr)).copied() else {
        return (Reason::PassToStack, TC_ACT_OK);
    };
    match config().tunnel_ifindex {
        0 => redirect_by_fib(ctx, p),
        tunnel_ifindex => overlay::encapsulate(ctx, p, &node, tunnel_ifindex),
    }
}

/// Native routing without a trip through the stack: the FIB names the
/// device and next hop; the packet leaves there with that hop's MAC (or
/// the neighbour subsystem resolves it first). Also what lets a NodePort
/// packet SNATed to this node's address leave at all: coming back into
/// the stack with the node's own address as source, it would be dropped
/// as a martian.
fn redirect_by_fib(ctx: &TcContext, p: &Packet) -> (Reason, i32) {
    // SAFETY: a plain C struct; all-zero is its "nothing set" value.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = p.proto;
    fib.sport = p.sport;
    fib.dport = p.dport;
    fib.ifindex = ifindex(ctx);
    fib.__bindgen_anon_3.ipv4_src = p.saddr;
    fib.__bindgen_anon_4.ipv4_dst = p.daddr;
    // SAFETY: the parameters live on the stack for the call; size is their own.
    let found = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let found = found as u32;
    if found != BPF_FIB_LKUP_RET_SUCCESS && found != BPF_FIB_LKUP_RET_NO_NEIGH {
        // Not forwardable here (forwarding off, no route, ...): the stack
        // decides, and answers with ICMP where it should.
        return (Reason::PassToStack, TC_ACT_OK);
    }
    if !hop(ctx, p) {
        return (Reason::PassToStack, TC_ACT_OK);
    }
    let verdict = match found {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if set_macs(ctx, &fib.dmac, &fib.smac).is_err() {
                return (Reason::RedirectFailed, TC_ACT_OK);
            }
            // SAFETY: plain helper call; it only records the target for tc.
            unsafe { bpf_redirect(fib.ifindex, 0) }
        }
        // SAFETY: plain helper call; the kernel resolves the next hop.
        _ => unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) },
    };
    if verdict == TC_ACT_REDIRECT as i64 {
        events::trace(p, point::TO_NETDEV, fib.ifindex);
    }
    (Reason::RedirectFib, verdict as i32)
}

/// The Ethernet addresses of the next hop: destination, then source.
fn set_macs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), i64> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(dst);
    macs[6..].copy_from_slice(src);
    ctx.store(0, &macs, 0)
}

/// Routing semantics as if the node had forwarded the packet: the TTL
/// drops by one; an expiring packet (false) is left to the stack, which
/// answers with ICMP time exceeded.
pub fn hop(ctx: &TcContext, p: &Packet) -> bool {
    match ctx.load::<u8>(IPV4_TTL) {
        Ok(ttl) => ttl > 1 && decrement_ttl(ctx, ttl, p.proto).is_ok(),
        Err(_) => false,
    }
}

/// TTL shares a 16-bit checksum word with the protocol byte.
fn decrement_ttl(ctx: &TcContext, ttl: u8, proto: u8) -> Result<(), i64> {
    let old = u16::from_be_bytes([ttl, proto]);
    let new = u16::from_be_bytes([ttl - 1, proto]);
    ctx.store(IPV4_TTL, &(ttl - 1), 0)?;
    ctx.l3_csum_replace(IP_CHECK, old.to_be() as u64, new.to_be() as u64, 2)
}
