//! The VXLAN overlay. The node's `tern_vxlan` device is in external
//! (collect_md) mode: whoever sends a packet through it names the far end.
//! Pod traffic gets that from `encapsulate` (called by the forwarding of
//! from_pod / from_netdev); traffic the node's own stack routes into the
//! device gets it from `to_overlay`. What arrives decapsulated goes
//! straight to the local pod (`from_overlay`).

use aya_ebpf::{
    bindings::{BPF_F_ZERO_CSUM_TX, TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::generated::{bpf_redirect, bpf_skb_change_type, bpf_skb_set_tunnel_key},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use tern_common::events::point;
use tern_common::{DropReason, OVERLAY_VNI, Reason, TunnelEndpoint};

use crate::events;
use crate::maps::{ENDPOINTS, TUNNEL, count};
use crate::packet::{Packet, ifindex, parse};
use crate::pod::{
    claims_local_address, hop, redirect_to_local_pod, refuse_unknown_pod, unknown_pod, unparsed,
};
use crate::policy;
use crate::service_nat::{self, Outcome};

/// `skb->pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;
/// TTL of the outer (underlay) header.
const TUNNEL_TTL: u8 = 64;

/// A pod's packet for `node`'s PodCIDR: given that node as the tunnel's
/// far end and sent out of the VXLAN device, which encapsulates it.
pub fn encapsulate(
    ctx: &TcContext,
    p: &Packet,
    node: &TunnelEndpoint,
    tunnel_ifindex: u32,
) -> (Reason, i32) {
    if !hop(ctx, p) {
        return (Reason::PassToStack, TC_ACT_OK);
    }
    if set_tunnel_key(ctx, node).is_err() {
        return (Reason::RedirectFailed, TC_ACT_OK);
    }
    // SAFETY: plain helper call; it only records the target for tc.
    let verdict = unsafe { bpf_redirect(tunnel_ifindex, 0) };
    events::trace(p, point::TO_OVERLAY, tunnel_ifindex);
    (Reason::EncapOverlay, verdict as i32)
}

/// tc egress on the VXLAN device: the node's own traffic to a remote pod
/// (routed here by the kernel) is given its far end. Pods' packets have
/// theirs already.
pub fn to_overlay(ctx: &TcContext) -> i32 {
    let Some(p) = parse(ctx) else {
        // The overlay carries IPv4 only; nothing else has a far end.
        events::drop_unparsed(DropReason::NotIpv4, point::TO_OVERLAY, ifindex(ctx));
        return TC_ACT_SHOT;
    };
    // SAFETY: only presence is read.
    if unsafe { ENDPOINTS.get(p.saddr) }.is_some() {
        return TC_ACT_OK;
    }
    let Some(node) = TUNNEL.get(Key::new(32, p.daddr)).copied() else {
        events::drop(&p, DropReason::Unroutable, point::TO_OVERLAY, ifindex(ctx));
        return TC_ACT_SHOT;
    };
    if set_tunnel_key(ctx, &node).is_err() {
        events::drop(&p, DropReason::EncapFailed, point::TO_OVERLAY, ifindex(ctx));
        return TC_ACT_SHOT;
    }
    events::trace(&p, point::TO_OVERLAY, ifindex(ctx));
    count(Reason::EncapOverlay);
    TC_ACT_OK
}

/// Decapsulated traffic from another node: for a local pod (a reply of a
/// translated flow is translated back first). Never sent on again into
/// the overlay, so nothing can loop between nodes.
pub fn from_overlay(ctx: &TcContext) -> i32 {
    // The inner frame is addressed to the sending node's pod gateway MAC:
    // left as it is, the kernel would drop it as another host's.
    // SAFETY: plain helper call on this packet.
    unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
    let Some(mut p) = parse(ctx) else {
        return unparsed(ctx, point::FROM_OVERLAY);
    };
    if claims_local_address(ctx, &p, point::FROM_OVERLAY) {
        return TC_ACT_SHOT;
    }
    events::trace(&p, point::FROM_OVERLAY, ifindex(ctx));
    if let Outcome::Verdict(verdict) = service_nat::from_overlay(ctx, &mut p) {
        return verdict;
    }
    // SAFETY: the value is copied out at once.
    let (reason, verdict) = match unsafe { ENDPOINTS.get(p.daddr) }.copied() {
        Some(_) if !policy::ingress(&p) => return TC_ACT_SHOT,
        Some(endpoint) => redirect_to_local_pod(ctx, &p, &endpoint),
        None if unknown_pod(p.daddr) => {
            return refuse_unknown_pod(ctx, &p, point::FROM_OVERLAY).1;
        }
        None => (Reason::PassToStack, TC_ACT_OK),
    };
    count(reason);
    verdict
}

fn set_tunnel_key(ctx: &TcContext, node: &TunnelEndpoint) -> Result<(), i64> {
    // SAFETY: a plain C struct; all-zero is its "nothing set" value.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = OVERLAY_VNI;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(node.node_addr);
    key.tunnel_ttl = TUNNEL_TTL;
    // No outer UDP checksum (as Cilium and the kernel's VXLAN default):
    // the inner packet carries its own.
    // SAFETY: the key lives on the stack for the call; size is its own.
    let set = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            BPF_F_ZERO_CSUM_TX as u64,
        )
    };
    if set == 0 { Ok(()) } else { Err(set) }
}
