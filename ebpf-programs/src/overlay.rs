//! The VXLAN overlay. The node's `tern_vxlan` device holds one FDB entry
//! per remote node (its VTEP MAC, `vtep_mac`, -> its underlay address),
//! as Flannel's does: a frame sent through the device is encapsulated to
//! the node its destination MAC names, with the outer route the driver
//! caches per FDB entry. Pod traffic is addressed to that MAC by
//! `encapsulate` (called by the forwarding of from_pod / from_netdev);
//! traffic the node's own stack routes into the device by `to_overlay`.
//! What arrives decapsulated goes straight to the local pod
//! (`from_overlay`).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect, bpf_skb_change_type},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use tern_common::events::point;
use tern_common::{DropReason, Reason, TunnelEndpoint, VTEP_MAC_PREFIX, vtep_mac};

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

/// A pod's packet for `node`'s PodCIDR: addressed to that node's VTEP MAC
/// and sent out of the VXLAN device, which encapsulates it.
pub fn encapsulate(
    ctx: &TcContext,
    p: &Packet,
    node: &TunnelEndpoint,
    tunnel_ifindex: u32,
) -> (Reason, i32) {
    if !hop(ctx, p) {
        return (Reason::PassToStack, TC_ACT_OK);
    }
    if address_to(ctx, node).is_err() {
        return (Reason::RedirectFailed, TC_ACT_OK);
    }
    // SAFETY: plain helper call; it only records the target for tc.
    let verdict = unsafe { bpf_redirect(tunnel_ifindex, 0) };
    events::trace(p, point::TO_OVERLAY, tunnel_ifindex);
    (Reason::EncapOverlay, verdict as i32)
}

/// tc egress on the VXLAN device: traffic the kernel routed here (the
/// node's own to a remote pod, or a pod's that went through the node's
/// stack), which it addressed to the device's own MAC (the device does no
/// ARP), is addressed to its node's VTEP MAC. What `encapsulate`
/// redirected here has its own already.
pub fn to_overlay(ctx: &TcContext) -> i32 {
    // Redirected by a pod's program (IPv4, addressed already): the fast
    // path, decided before any parsing.
    if ctx.load::<[u8; 2]>(0) == Ok(VTEP_MAC_PREFIX) {
        return TC_ACT_OK;
    }
    let Some(p) = parse(ctx) else {
        // The overlay carries IPv4 only; nothing else has a far end.
        events::drop_unparsed(DropReason::NotIpv4, point::TO_OVERLAY, ifindex(ctx));
        return TC_ACT_SHOT;
    };
    let Some(node) = TUNNEL.get(Key::new(32, p.daddr)).copied() else {
        events::drop(&p, DropReason::Unroutable, point::TO_OVERLAY, ifindex(ctx));
        return TC_ACT_SHOT;
    };
    if address_to(ctx, &node).is_err() {
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

/// Addresses the inner frame to `node`'s VTEP MAC: the device's FDB
/// entry for it names the outer destination.
fn address_to(ctx: &TcContext, node: &TunnelEndpoint) -> Result<(), i64> {
    ctx.store(0, &vtep_mac(node.node_addr), 0)
}
