//! Frames for BPF_PROG_TEST_RUN: Ethernet, IPv4 without options, and TCP,
//! UDP or ICMP with every checksum filled in; and `Packet::parse`, which
//! takes a frame a program returned apart and checks every checksum.

use std::net::{Ipv4Addr, SocketAddrV4};

// RFC 1071: 0 over data that includes a correct checksum.
use tern_lab::traffic::internet_checksum as checksum;

pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_PORT_UNREACHABLE: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// The Ethernet addresses of every frame built here: sender, then receiver.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const ETH_LEN: usize = 14;
pub const IP_LEN: usize = 20;
const TTL: u8 = 64;

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// An ARP frame for IPv4 over Ethernet (RFC 826): `op` from `sha`/`spa`
/// about `tha`/`tpa`; requests go to the broadcast address.
pub fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let eth_dst = if op == ARP_REQUEST { [0xff; 6] } else { tha };
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f
}

/// A TCP segment without payload.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, seq: u32) -> Vec<u8> {
    let mut l4 = vec![0; 20];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..8].copy_from_slice(&seq.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    frame(*src.ip(), *dst.ip(), TCP, l4)
}

pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0; 8];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(payload);
    frame(*src.ip(), *dst.ip(), UDP, l4)
}

/// An ICMP echo request or reply (`kind`).
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut l4 = vec![0; 8];
    l4[0] = kind;
    l4[4..6].copy_from_slice(&id.to_be_bytes());
    l4[6..8].copy_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(b"ping");
    frame(src, dst, ICMP, l4)
}

/// Ethernet and IPv4 headers in front of `l4`, whose checksum is filled in.
fn frame(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, mut l4: Vec<u8>) -> Vec<u8> {
    let at = l4_checksum_offset(proto);
    let mut sum = checksum(&l4_checksummed(src, dst, proto, &l4));
    if proto == UDP && sum == 0 {
        sum = 0xffff; // 0 means "no checksum" in UDP
    }
    l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    let mut ip = [0u8; IP_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_LEN + l4.len()) as u16).to_be_bytes());
    ip[8] = TTL;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::with_capacity(ETH_LEN + ip.len() + l4.len());
    frame.extend_from_slice(&DST_MAC);
    frame.extend_from_slice(&SRC_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

fn l4_checksum_offset(proto: u8) -> usize {
    match proto {
        TCP => 16,
        UDP => 6,
        ICMP => 2,
        _ => panic!("no checksum known for protocol {proto}"),
    }
}

/// What the L4 checksum covers: TCP and UDP a pseudo header too.
fn l4_checksummed(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    if proto != ICMP {
        data.extend_from_slice(&src.octets());
        data.extend_from_slice(&dst.octets());
        data.extend_from_slice(&[0, proto]);
        data.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    }
    data.extend_from_slice(l4);
    data
}

/// A frame a program returned.
#[derive(Debug, Clone)]
pub struct Packet {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub ttl: u8,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Everything after the IPv4 header.
    pub l4: Vec<u8>,
}

impl Packet {
    /// Takes `frame` apart; panics unless it is IPv4 without options whose
    /// total length, header checksum and TCP/UDP/ICMP checksum are right.
    pub fn parse(frame: &[u8]) -> Packet {
        assert!(frame.len() >= ETH_LEN + IP_LEN, "short frame {frame:02x?}");
        assert_eq!(frame[12..14], [0x08, 0x00], "not IPv4");
        let ip = &frame[ETH_LEN..ETH_LEN + IP_LEN];
        assert_eq!(ip[0], 0x45, "IPv4 without options expected");
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        assert_eq!(ETH_LEN + total, frame.len(), "IPv4 total length");
        assert_eq!(checksum(ip), 0, "IPv4 header checksum of {frame:02x?}");
        let packet = Packet {
            eth_dst: frame[0..6].try_into().unwrap(),
            eth_src: frame[6..12].try_into().unwrap(),
            ttl: ip[8],
            proto: ip[9],
            src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            l4: frame[ETH_LEN + IP_LEN..].to_vec(),
        };
        if packet.proto == UDP {
            assert_ne!(packet.word(6), 0, "UDP checksum dropped");
        }
        let covered = l4_checksummed(packet.src, packet.dst, packet.proto, &packet.l4);
        assert_eq!(checksum(&covered), 0, "L4 checksum of {frame:02x?}");
        packet
    }

    fn word(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.l4[at], self.l4[at + 1]])
    }

    pub fn source(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.src, self.word(0))
    }

    pub fn destination(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.dst, self.word(2))
    }

    pub fn tcp_flags(&self) -> u8 {
        self.l4[13]
    }

    pub fn tcp_seq_ack(&self) -> (u32, u32) {
        let word = |at: usize| u32::from_be_bytes(self.l4[at..at + 4].try_into().unwrap());
        (word(4), word(8))
    }

    pub fn icmp_type_code(&self) -> (u8, u8) {
        (self.l4[0], self.l4[1])
    }

    pub fn icmp_echo_id(&self) -> u16 {
        self.word(4)
    }
}
