//! Traffic leaving a pod (tc ingress on its host veth) and the local
//! delivery shared with the underlay device: a packet for a pod on this
//! node is handed straight to that pod's interface with
//! `bpf_redirect_peer`, skipping the node's routing; anything else goes up
//! the node's own stack.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::generated::bpf_redirect_peer,
    programs::TcContext,
};
use tern_common::Reason;

use crate::maps::{ENDPOINTS, count};
use crate::packet::{IP_CHECK, L3, Packet, parse};
use crate::service_nat::{self, Outcome};

const IPV4_TTL: usize = L3 + 8;

pub fn from_pod(ctx: &TcContext) -> i32 {
    let Some(mut p) = parse(ctx) else {
        count(Reason::NotIpv4);
        return TC_ACT_OK;
    };
    match service_nat::from_pod(ctx, &mut p) {
        Outcome::Verdict(verdict) => verdict,
        Outcome::Route => deliver(ctx, &p),
    }
}

pub fn from_netdev(ctx: &TcContext) -> i32 {
    let Some(mut p) = parse(ctx) else {
        return TC_ACT_OK;
    };
    match service_nat::from_netdev(ctx, &mut p) {
        Outcome::Verdict(verdict) => verdict,
        Outcome::Route => deliver(ctx, &p),
    }
}

/// Into the local pod `p.daddr` if there is one, else to the node's stack.
fn deliver(ctx: &TcContext, p: &Packet) -> i32 {
    let (reason, verdict) = redirect_to_local_pod(ctx, p);
    count(reason);
    verdict
}

fn redirect_to_local_pod(ctx: &TcContext, p: &Packet) -> (Reason, i32) {
    let pass = TC_ACT_OK;
    // SAFETY: the value is copied out at once.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(p.daddr) }).copied() else {
        return (Reason::PassToStack, pass);
    };
    // Routing semantics as if the node had forwarded the packet: the TTL
    // drops by one, and an expiring packet goes to the stack, which answers
    // with ICMP time exceeded.
    let ttl = match ctx.load::<u8>(IPV4_TTL) {
        Ok(ttl) => ttl,
        Err(_) => return (Reason::PassToStack, pass),
    };
    if ttl <= 1 || decrement_ttl(ctx, ttl, p.proto).is_err() {
        return (Reason::PassToStack, pass);
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&endpoint.pod_mac);
    macs[6..].copy_from_slice(&endpoint.host_mac);
    if ctx.store(0, &macs, 0).is_err() {
        return (Reason::RedirectFailed, pass);
    }
    // SAFETY: plain helper call; it only records the target for tc.
    let verdict = unsafe { bpf_redirect_peer(endpoint.ifindex, 0) };
    if verdict == TC_ACT_REDIRECT as i64 {
        (Reason::RedirectLocalPod, verdict as i32)
    } else {
        (Reason::RedirectFailed, pass)
    }
}

/// TTL shares a 16-bit checksum word with the protocol byte.
fn decrement_ttl(ctx: &TcContext, ttl: u8, proto: u8) -> Result<(), i64> {
    let old = u16::from_be_bytes([ttl, proto]);
    let new = u16::from_be_bytes([ttl - 1, proto]);
    ctx.store(IPV4_TTL, &(ttl - 1), 0)?;
    ctx.l3_csum_replace(IP_CHECK, old.to_be() as u64, new.to_be() as u64, 2)
}
