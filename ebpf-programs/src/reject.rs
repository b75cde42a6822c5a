//! Refusals built in place of the packet and sent back where it came from:
//! TCP RST for a TCP segment, ICMP port unreachable for anything else.
//! kube-proxy answers Services without endpoints the same way (REJECT).

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use network_types::eth::EthHdr;

use tern_common::DropReason;

use crate::events;
use crate::packet::{IPPROTO_ICMP, IPPROTO_TCP, L3, Packet, TCP_ACK, TCP_RST, ifindex};

const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;
/// ICMP header plus what it quotes: the offending IP header and 8 bytes.
const ICMP_LEN: usize = 8 + IP_LEN + 8;

/// A refusal for `reason` at `at`: built, counted and reported (as
/// `RejectFailed` when none could be built, and the packet is dropped).
/// A call of its own, made only from a program's top level: building the
/// answer takes a large frame.
#[inline(never)]
pub fn refuse(ctx: &TcContext, p: &Packet, reason: DropReason, at: u8) -> i32 {
    let verdict = reject(ctx, p);
    let reported = if verdict == TC_ACT_SHOT {
        DropReason::RejectFailed
    } else {
        reason
    };
    events::drop(p, reported, at, ifindex(ctx));
    verdict
}

/// Turns the packet into a refusal and sends it back out of the device it
/// came in on. Returns the tc verdict.
pub fn reject(ctx: &TcContext, p: &Packet) -> i32 {
    // Options would shift every offset below; such packets are rare.
    if p.l4 != L3 + IP_LEN {
        return TC_ACT_SHOT;
    }
    let built = if p.proto == IPPROTO_TCP {
        tcp_reset(ctx, p)
    } else {
        icmp_unreachable(ctx, p)
    };
    if built.is_err() || swap_macs(ctx).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex(ctx), 0) as i32 }
}

fn swap_macs(ctx: &TcContext) -> Result<(), i64> {
    let eth = ctx.load::<EthHdr>(0)?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&eth.src_addr);
    macs[6..].copy_from_slice(&eth.dst_addr);
    ctx.store(0, &macs, 0)
}

/// One's-complement sum of `words`, folded to 16 bits.
fn checksum(bytes: &[u8], seed: u32) -> u16 {
    // SAFETY: the helper only reads `bytes` (a multiple of 4 long).
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            bytes.as_ptr() as *mut u32,
            bytes.len() as u32,
            seed,
        )
    } as u64;
    let mut sum = (sum & 0xffff_ffff) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

fn ip_header(total_len: u16, proto: u8, saddr: u32, daddr: u32) -> [u8; IP_LEN] {
    let mut h = [0u8; IP_LEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total_len.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&saddr.to_ne_bytes());
    h[16..20].copy_from_slice(&daddr.to_ne_bytes());
    let csum = checksum(&h, 0);
    h[10..12].copy_from_slice(&csum.to_ne_bytes());
    h
}

fn tcp_reset(ctx: &TcContext, p: &Packet) -> Result<(), i64> {
    let seq = u32::from_be(ctx.load::<u32>(p.l4 + 4)?);
    let ack = u32::from_be(ctx.load::<u32>(p.l4 + 8)?);
    let payload = u16::from_be_bytes(p.ip.tot_len) as u32
        - IP_LEN as u32
        - ((ctx.load::<u8>(p.l4 + 12)? >> 4) as u32) * 4;
    let syn_fin = (p.tcp_flags & 0x03 != 0) as u32;
    // SAFETY: shrinking the packet to headers only.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), (L3 + IP_LEN + TCP_LEN) as u32, 0) } != 0 {
        return Err(-1);
    }
    // Pseudo header (12 bytes) followed by the TCP header, for the checksum.
    let mut buf = [0u8; 12 + TCP_LEN];
    buf[0..4].copy_from_slice(&p.daddr.to_ne_bytes());
    buf[4..8].copy_from_slice(&p.saddr.to_ne_bytes());
    buf[9] = IPPROTO_TCP;
    buf[10..12].copy_from_slice(&(TCP_LEN as u16).to_be_bytes());
    let tcp = &mut buf[12..];
    tcp[0..2].copy_from_slice(&p.dport.to_ne_bytes());
    tcp[2..4].copy_from_slice(&p.sport.to_ne_bytes());
    // RFC 793: answer an ACK with seq = its ack; else seq 0 and ACK the segment.
    let (rst_seq, rst_ack, flags) = if p.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        (0, seq.wrapping_add(payload + syn_fin), TCP_RST | TCP_ACK)
    };
    tcp[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    let csum = checksum(&buf, 0);
    buf[12 + 16..12 + 18].copy_from_slice(&csum.to_ne_bytes());
    let ip = ip_header((IP_LEN + TCP_LEN) as u16, IPPROTO_TCP, p.daddr, p.saddr);
    ctx.store(L3, &ip, 0)?;
    let mut segment = [0u8; TCP_LEN];
    segment.copy_from_slice(&buf[12..]);
    ctx.store(L3 + IP_LEN, &segment, 0)
}

fn icmp_unreachable(ctx: &TcContext, p: &Packet) -> Result<(), i64> {
    // Keep the offending IP header and 8 bytes, then open room in front of
    // them for the new IP and ICMP headers.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), (L3 + IP_LEN + 8) as u32, 0) } != 0 {
        return Err(-1);
    }
    ctx.adjust_room((IP_LEN + 8) as i32, BPF_ADJ_ROOM_MAC, 0)?;
    let quoted = ctx.load::<[u8; IP_LEN + 8]>(L3 + IP_LEN + 8)?;
    let mut icmp = [0u8; ICMP_LEN];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 3; // port unreachable
    icmp[8..].copy_from_slice(&quoted);
    let csum = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&csum.to_ne_bytes());
    let ip = ip_header((IP_LEN + ICMP_LEN) as u16, IPPROTO_ICMP, p.daddr, p.saddr);
    ctx.store(L3, &ip, 0)?;
    ctx.store(L3 + IP_LEN, &icmp, 0)
}
