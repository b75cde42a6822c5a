//! The pod's gateway answers ARP. A pod reaches everything through
//! 169.254.1.1, which no device holds; the CNI plugin gives the pod a
//! permanent neighbour entry for it, but a MAC change (the `tuning` plugin,
//! `podman run --mac-address`) or a neighbour flush removes that entry.
//! The pod then asks by ARP, and the host side of its veth answers with its
//! own MAC, as Cilium's ARP responder does.

use aya_ebpf::{helpers::generated::bpf_redirect, programs::TcContext};
use network_types::eth::EthHdr;
use tern_common::{POD_GATEWAY, Reason};

use crate::maps::{ENDPOINTS, count};
use crate::packet::{L3, ifindex};

const ETH_P_ARP: u16 = 0x0806;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const HTYPE_ETHERNET: u16 = 1;
const PTYPE_IPV4: u16 = 0x0800;

/// An ARP packet for IPv4 over Ethernet (RFC 826), as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct ArpIpv4 {
    htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    oper: [u8; 2],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// Answers a pod's ARP request for its gateway with the host veth's MAC,
/// sent straight back into the pod: `Some(verdict)`. Anything else (not
/// ARP, another target, a sender that is not the pod on this veth) is
/// `None`, left to the caller.
pub fn answer_gateway(ctx: &TcContext) -> Option<i32> {
    let eth = ctx.load::<EthHdr>(0).ok()?;
    if u16::from_be(eth.ether_type) != ETH_P_ARP {
        return None;
    }
    let arp = ctx.load::<ArpIpv4>(L3).ok()?;
    if u16::from_be_bytes(arp.htype) != HTYPE_ETHERNET
        || u16::from_be_bytes(arp.ptype) != PTYPE_IPV4
        || arp.hlen != 6
        || arp.plen != 4
        || u16::from_be_bytes(arp.oper) != ARP_REQUEST
        || arp.tpa != POD_GATEWAY
    {
        return None;
    }
    // Only the pod this veth belongs to, asking from its own address: the
    // answer must not let a pod claim another pod's gateway traffic.
    // SAFETY: the value is copied out at once.
    let endpoint = unsafe { ENDPOINTS.get(u32::from_ne_bytes(arp.spa)) }.copied()?;
    if endpoint.ifindex != ifindex(ctx) {
        return None;
    }
    let reply = ArpIpv4 {
        oper: ARP_REPLY.to_be_bytes(),
        sha: endpoint.host_mac,
        spa: POD_GATEWAY,
        tha: arp.sha,
        tpa: arp.spa,
        ..arp
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&arp.sha);
    macs[6..].copy_from_slice(&endpoint.host_mac);
    if ctx.store(0, &macs, 0).is_err() || ctx.store(L3, &reply, 0).is_err() {
        return None;
    }
    count(Reason::GatewayArpReply);
    // SAFETY: plain helper call; out of the host veth is into the pod.
    Some(unsafe { bpf_redirect(endpoint.ifindex, 0) as i32 })
}
