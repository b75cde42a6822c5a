//! Pod traffic on one node: a packet for another local pod is handed
//! straight to that pod's interface with `bpf_redirect_peer`, skipping the
//! node's routing; anything else goes up the node's own stack.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::generated::bpf_redirect_peer,
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use tern_common::Reason;

use crate::maps::{ENDPOINTS, count};

const ETH_P_IP: u16 = 0x0800;
const IPV4_TTL_OFFSET: usize = EthHdr::LEN + 8;
const IPV4_CHECK_OFFSET: usize = EthHdr::LEN + 10;

pub fn from_pod(ctx: &TcContext) -> i32 {
    let (reason, verdict) = route_from_pod(ctx);
    count(reason);
    verdict
}

fn route_from_pod(ctx: &TcContext) -> (Reason, i32) {
    let pass = TC_ACT_OK;
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return (Reason::NotIpv4, pass);
    };
    if u16::from_be(eth.ether_type) != ETH_P_IP {
        return (Reason::NotIpv4, pass);
    }
    let Ok(ip) = ctx.load::<Ipv4Hdr>(EthHdr::LEN) else {
        return (Reason::NotIpv4, pass);
    };
    let dst = u32::from_ne_bytes(ip.dst_addr);
    // SAFETY: the value is copied out at once; the map is only written by
    // the agent, never through this reference.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(dst) }).copied() else {
        return (Reason::PassToStack, pass);
    };
    // Routing semantics as if the node had forwarded the packet: the TTL
    // drops by one, and an expiring packet goes to the stack, which answers
    // with ICMP time exceeded.
    if ip.ttl <= 1 || decrement_ttl(ctx, &ip).is_err() {
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
fn decrement_ttl(ctx: &TcContext, ip: &Ipv4Hdr) -> Result<(), i64> {
    let old = u16::from_be_bytes([ip.ttl, ip.proto]);
    let new = u16::from_be_bytes([ip.ttl - 1, ip.proto]);
    ctx.store(IPV4_TTL_OFFSET, &(ip.ttl - 1), 0)?;
    ctx.l3_csum_replace(IPV4_CHECK_OFFSET, old.to_be() as u64, new.to_be() as u64, 2)
}
