//! IPv4 packet parsing and address/port rewriting with checksum fix-up.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use tern_common::CtValue;

pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const L3: usize = EthHdr::LEN;
pub const IP_CHECK: usize = L3 + 10;
pub const IP_SADDR: usize = L3 + 12;
pub const IP_DADDR: usize = L3 + 16;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The fields the datapath decides on. Addresses and ports are kept as
/// they are on the wire (network byte order read as native integers).
#[derive(Clone, Copy)]
pub struct Packet {
    pub ip: Ipv4Hdr,
    pub l4: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// ICMP (first fragment): the message type; 0xff otherwise.
    pub icmp_type: u8,
}

impl Packet {
    /// A packet with nothing known (events of what could not be read, or
    /// of sockets, which fill in what they know).
    pub fn empty() -> Packet {
        Packet {
            // SAFETY: plain integers; all-zero is a valid header value.
            ip: unsafe { core::mem::zeroed() },
            l4: 0,
            proto: 0,
            saddr: 0,
            daddr: 0,
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            icmp_type: 0xff,
        }
    }

    /// Ports are known: TCP or UDP, first fragment.
    pub fn has_ports(&self) -> bool {
        (self.proto == IPPROTO_TCP || self.proto == IPPROTO_UDP)
            && u16::from_be_bytes(self.ip.frags) & 0x1fff == 0
    }
}

pub fn parse(ctx: &TcContext) -> Option<Packet> {
    let eth = ctx.load::<EthHdr>(0).ok()?;
    if u16::from_be(eth.ether_type) != ETH_P_IP {
        return None;
    }
    let ip = ctx.load::<Ipv4Hdr>(L3).ok()?;
    let l4 = L3 + ((ip.vihl & 0x0f) as usize) * 4;
    let mut packet = Packet {
        ip,
        l4,
        proto: ip.proto,
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0xff,
    };
    if packet.has_ports() {
        let ports = ctx.load::<[u16; 2]>(l4).ok()?;
        packet.sport = ports[0];
        packet.dport = ports[1];
        if packet.proto == IPPROTO_TCP {
            packet.tcp_flags = ctx.load::<u8>(l4 + 13).ok()?;
        }
    } else if packet.proto == IPPROTO_ICMP && u16::from_be_bytes(ip.frags) & 0x1fff == 0 {
        packet.icmp_type = ctx.load::<u8>(l4).ok()?;
    }
    Some(packet)
}

/// An IPv4 frame `parse` could not read (its L4 header cut short): never
/// to be handed on, since nothing could judge it.
pub fn malformed_ipv4(ctx: &TcContext) -> bool {
    ctx.load::<EthHdr>(0)
        .is_ok_and(|eth| u16::from_be(eth.ether_type) == ETH_P_IP)
}

/// The tuple a packet is rewritten to.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl Tuple {
    /// What a tracked flow's entry (CT or NAT) says the packet becomes.
    pub fn of(entry: &CtValue) -> Tuple {
        Tuple {
            saddr: entry.saddr,
            daddr: entry.daddr,
            sport: entry.sport,
            dport: entry.dport,
        }
    }
}

/// Rewrites the packet to `to` and keeps `p` in step with it.
pub fn translate(ctx: &TcContext, p: &mut Packet, to: &Tuple) -> Result<(), i64> {
    rewrite(ctx, p, to)?;
    p.saddr = to.saddr;
    p.daddr = to.daddr;
    p.sport = to.sport;
    p.dport = to.dport;
    Ok(())
}

/// Rewrites the packet's addresses and ports to `to`, fixing the IPv4 and
/// TCP/UDP checksums incrementally.
pub fn rewrite(ctx: &TcContext, p: &Packet, to: &Tuple) -> Result<(), i64> {
    let (csum, mangled) = if p.proto == IPPROTO_TCP {
        (p.l4 + 16, 0)
    } else {
        (p.l4 + 6, BPF_F_MARK_MANGLED_0 as u64)
    };
    for (offset, old, new) in [(IP_SADDR, p.saddr, to.saddr), (IP_DADDR, p.daddr, to.daddr)] {
        if old != new {
            ctx.l4_csum_replace(
                csum,
                old as u64,
                new as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled | 4,
            )?;
            ctx.l3_csum_replace(IP_CHECK, old as u64, new as u64, 4)?;
            ctx.store(offset, &new, 0)?;
        }
    }
    for (offset, old, new) in [(p.l4, p.sport, to.sport), (p.l4 + 2, p.dport, to.dport)] {
        if old != new {
            ctx.l4_csum_replace(csum, old as u64, new as u64, mangled | 2)?;
            ctx.store(offset, &new, 0)?;
        }
    }
    Ok(())
}

/// The ingress device of the packet.
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a context field tc programs may read.
    unsafe { (*ctx.skb.skb).ifindex }
}
