//! kube-proxy's chain and map names: base32(sha256(...)) exactly as its
//! `portProtoHash` / `servicePortEndpointChainName` (iptables) and
//! `hashAndTruncate` (nftables) make them. SHA-256 is implemented here
//! because `sha2` is not in the dependency tree.

use std::net::Ipv4Addr;

use super::NFT_CHAIN_BASE_MAX;

/// `KUBE-SVC-` + base32(sha256(servicePortName + protocol))[:16].
pub(super) fn iptables_service_chain(spn: &str, proto: &str) -> String {
    let hash = sha256(format!("{spn}{proto}").as_bytes());
    format!("KUBE-SVC-{}", base32_prefix(&hash, 16))
}

/// `KUBE-SEP-` + base32(sha256(servicePortName + protocol + "ip:port"))[:16].
pub(super) fn iptables_endpoint_chain(spn: &str, proto: &str, ip: Ipv4Addr, port: u16) -> String {
    let hash = sha256(format!("{spn}{proto}{ip}:{port}").as_bytes());
    format!("KUBE-SEP-{}", base32_prefix(&hash, 16))
}

/// kube-proxy's nftables `hashAndTruncate`: base32(sha256(name))[:8] + "-" +
/// name, cut to 240 characters with "..." at the end.
pub(super) fn nft_hash_and_truncate(name: &str) -> String {
    let hash = sha256(name.as_bytes());
    let mut out = format!("{}-{name}", base32_prefix(&hash, 8));
    if out.len() > NFT_CHAIN_BASE_MAX {
        out.truncate(NFT_CHAIN_BASE_MAX - 3);
        out.push_str("...");
    }
    out
}

/// The first `chars` characters of the RFC 4648 base32 encoding of `bytes`
/// (Go's `base32.StdEncoding`).
pub(super) fn base32_prefix(bytes: &[u8], chars: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(chars);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = ((acc << 8) | u32::from(b)) & 0xffff;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
            if out.len() == chars {
                return out;
            }
        }
    }
    if bits > 0 && out.len() < chars {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// SHA-256 (FIPS 180-4). Written with plain operators and index loops:
/// `cargo xtask` runs a debug build, where method calls and iterator
/// adapters are not inlined and cost ten times more (10 -> 1 us a hash).
#[allow(clippy::needless_range_loop)]
pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    const MASK: u64 = 0xffff_ffff;
    // Rotations and sums on u64 so that nothing overflows: no calls, no
    // overflow panics, the result masked back to 32 bits.
    macro_rules! rotr {
        ($x:expr, $n:expr) => {
            (($x >> $n) | ($x << (32 - $n))) & MASK
        };
    }
    let mut h: [u64; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = Vec::with_capacity(data.len() + 72);
    msg.extend_from_slice(data);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    let mut w = [0u64; 64];
    let mut off = 0;
    while off < msg.len() {
        for i in 0..16 {
            let j = off + 4 * i;
            w[i] = (msg[j] as u64) << 24
                | (msg[j + 1] as u64) << 16
                | (msg[j + 2] as u64) << 8
                | msg[j + 3] as u64;
        }
        for i in 16..64 {
            let (x, y) = (w[i - 15], w[i - 2]);
            let s0 = rotr!(x, 7) ^ rotr!(x, 18) ^ (x >> 3);
            let s1 = rotr!(y, 17) ^ rotr!(y, 19) ^ (y >> 10);
            w[i] = (w[i - 16] + s0 + w[i - 7] + s1) & MASK;
        }
        let (mut a, mut b, mut c, mut d) = (h[0], h[1], h[2], h[3]);
        let (mut e, mut f, mut g, mut hh) = (h[4], h[5], h[6], h[7]);
        for i in 0..64 {
            let s1 = rotr!(e, 6) ^ rotr!(e, 11) ^ rotr!(e, 25);
            let ch = (e & f) ^ (!e & MASK & g);
            let t1 = hh + s1 + ch + K[i] as u64 + w[i];
            let s0 = rotr!(a, 2) ^ rotr!(a, 13) ^ rotr!(a, 22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            hh = g;
            g = f;
            f = e;
            e = (d + t1) & MASK;
            d = c;
            c = b;
            b = a;
            a = (t1 + s0 + maj) & MASK;
        }
        for (i, v) in [a, b, c, d, e, f, g, hh].into_iter().enumerate() {
            h[i] = (h[i] + v) & MASK;
        }
        off += 64;
    }
    let mut out = [0u8; 32];
    for i in 0..8 {
        out[4 * i..4 * i + 4].copy_from_slice(&(h[i] as u32).to_be_bytes());
    }
    out
}
