//! Bandwidth limits of a pod (the CNI `bandwidth` capability) as token
//! bucket filters: one on the host veth's egress for what the pod
//! receives, one on the pod interface's egress for what it sends. Both
//! directions are shaped whatever the traffic's other end is (a pod on
//! this node, another node, the node itself); the datapath delivers into
//! a pod with a limit through its host veth (not `bpf_redirect_peer`), so
//! the filter sees that traffic too.
//!
//! Token buckets rather than departure times (EDT) with a fair-queue
//! qdisc, as Cilium's bandwidth manager does: sch_fq is not built into
//! every kernel Tern runs on, sch_tbf is in every one that has traffic
//! control at all. The pod's own filter sits in its network namespace,
//! next to its sockets, so TCP's small-queue back-pressure paces senders
//! instead of drops.
//!
//! netlink-packet-route has no TBF attributes, so they are built here
//! (`struct tc_tbf_qopt`, `linux/pkt_sched.h`).

use std::path::Path;

use futures::TryStreamExt;
use futures::stream::StreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload, Nla,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption};

use super::netlink::{get_link, open_netns, run_netlink};
use super::{PodNetError, Result, nl};

/// The qdisc's options attribute (`TCA_OPTIONS`).
const TCA_OPTIONS: u16 = 2;
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
const TC_LINKLAYER_ETHERNET: u8 = 1;

/// The bucket never holds less: a full GSO burst of a few frames.
const MIN_BUCKET: u64 = 32 * 1024;
/// Nor more than this much time at the rate: runtimes pass a burst of
/// 2^32 bits when the Pod names none (containerd, CRI-O), which would let
/// the first 512 MiB through unshaped.
const MAX_BUCKET_MS: u64 = 50;
/// Queue behind the bucket, as time at the rate.
const QUEUE_MS: u64 = 50;
const MIN_QUEUE: u64 = 64 * 1024;

/// A limit for one direction, as the CNI conventions give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Bits per second; more than 0.
    pub rate_bits: u64,
    /// Bits; 0 when not given.
    pub burst_bits: u64,
}

/// The token bucket filter of a [`Limit`], in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Bytes per second.
    pub rate: u64,
    pub size: u32,
    /// The queue in front of it.
    pub limit: u32,
}

impl Limit {
    pub fn bucket(&self) -> Bucket {
        let rate = (self.rate_bits / 8).max(1);
        let largest = (rate * MAX_BUCKET_MS / 1000).max(MIN_BUCKET);
        let size = match self.burst_bits / 8 {
            0 => largest,
            given => given.clamp(MIN_BUCKET, largest),
        };
        let limit = size + (rate * QUEUE_MS / 1000).max(MIN_QUEUE);
        Bucket {
            rate,
            size: u32::try_from(size).unwrap_or(u32::MAX),
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        }
    }
}

/// TCP small queues let one socket keep this much in its device's queue.
const TSQ_BYTES: u64 = 1024 * 1024;

impl Bucket {
    /// The pod's own senders sit right behind the filter on its interface:
    /// a queue shorter than TCP small queues' allowance drops their
    /// segments locally, and TCP then falls well short of the rate (-12 %
    /// seen at 10 Mbit/s); one that holds it paces them by back-pressure.
    fn for_local_senders(self) -> Bucket {
        let limit = u64::from(self.size) + TSQ_BYTES;
        Bucket {
            limit: self.limit.max(u32::try_from(limit).unwrap_or(u32::MAX)),
            ..self
        }
    }
}

/// Puts the filters in place: `ingress` on `host_ifname` (node side),
/// `egress` on `ifname` in the pod's netns. `None` leaves that side alone.
pub fn shape(
    netns: &Path,
    ifname: &str,
    host_ifname: &str,
    ingress: Option<Limit>,
    egress: Option<Limit>,
) -> Result<()> {
    on_both_sides(Op::Replace, netns, (ifname, host_ifname), ingress, egress)
}

/// CNI CHECK: each limit's filter is at the root of its device with the
/// rate ADD gave it.
pub fn check_shape(
    netns: &Path,
    ifname: &str,
    host_ifname: &str,
    ingress: Option<Limit>,
    egress: Option<Limit>,
) -> Result<()> {
    on_both_sides(Op::Expect, netns, (ifname, host_ifname), ingress, egress)
}

#[derive(Clone, Copy)]
enum Op {
    Replace,
    Expect,
}

fn on_both_sides(
    op: Op,
    netns: &Path,
    (ifname, host_ifname): (&str, &str),
    ingress: Option<Limit>,
    egress: Option<Limit>,
) -> Result<()> {
    if let Some(limit) = ingress {
        run_netlink(None, "host", |h| do_op(op, h, host_ifname, limit.bucket()))?;
    }
    if let Some(limit) = egress {
        let ns = open_netns(netns)?.ok_or_else(|| PodNetError::NetnsMissing(netns.into()))?;
        run_netlink(Some(&ns), "pod", |h| {
            do_op(op, h, ifname, limit.bucket().for_local_senders())
        })?;
    }
    Ok(())
}

async fn do_op(op: Op, h: Handle, name: &str, bucket: Bucket) -> Result<()> {
    match op {
        Op::Replace => replace_tbf(&h, name, bucket).await,
        Op::Expect => expect_tbf(&h, name, bucket).await,
    }
}

async fn link_index(h: &Handle, name: &str) -> Result<u32> {
    get_link(h, name)
        .await
        .map_err(nl(format_args!("looking up {name}")))?
        .map(|l| l.header.index)
        .ok_or_else(|| PodNetError::Netlink(format!("interface {name} does not exist")))
}

async fn replace_tbf(h: &Handle, name: &str, bucket: Bucket) -> Result<()> {
    let index = link_index(h, name).await?;
    let mut message = TcMessage::default();
    message.header.index = index as i32;
    message.header.handle = TcHandle { major: 1, minor: 0 };
    message.header.parent = TcHandle::ROOT;
    message.attributes.push(TcAttribute::Kind("tbf".into()));
    message
        .attributes
        .push(TcAttribute::Options(tbf_options(bucket)));
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    let mut answers = h
        .clone()
        .request(request)
        .map_err(nl(format_args!("adding the bandwidth limit on {name}")))?;
    while let Some(answer) = answers.next().await {
        if let NetlinkPayload::Error(e) = answer.payload
            && e.code.is_some()
        {
            return Err(PodNetError::Netlink(format!(
                "adding the bandwidth limit ({} bytes/s) on {name}: {e}",
                bucket.rate
            )));
        }
    }
    Ok(())
}

/// `TCA_TBF_PARMS` (`struct tc_tbf_qopt`: rate and peak rate as `struct
/// tc_ratespec`, limit, buffer, mtu), the burst in bytes (the kernel
/// derives the buffer time from it) and the 64-bit rate when it needs one.
fn tbf_options(bucket: Bucket) -> Vec<TcOption> {
    let mut parms = Vec::with_capacity(36);
    parms.push(0); // cell_log
    parms.push(TC_LINKLAYER_ETHERNET);
    parms.extend_from_slice(&0u16.to_ne_bytes()); // overhead
    parms.extend_from_slice(&0i16.to_ne_bytes()); // cell_align
    parms.extend_from_slice(&0u16.to_ne_bytes()); // mpu
    let rate32 = u32::try_from(bucket.rate).unwrap_or(u32::MAX);
    parms.extend_from_slice(&rate32.to_ne_bytes());
    parms.extend_from_slice(&[0; 12]); // no peak rate
    parms.extend_from_slice(&bucket.limit.to_ne_bytes());
    // In scheduler ticks of 64 ns; TCA_TBF_BURST below takes precedence.
    let buffer_ns = u64::from(bucket.size) * 1_000_000_000 / bucket.rate;
    let buffer = u32::try_from(buffer_ns >> 6).unwrap_or(u32::MAX);
    parms.extend_from_slice(&buffer.to_ne_bytes());
    parms.extend_from_slice(&0u32.to_ne_bytes()); // mtu
    let mut options = vec![
        TcOption::Other(DefaultNla::new(TCA_TBF_PARMS, parms)),
        TcOption::Other(DefaultNla::new(
            TCA_TBF_BURST,
            bucket.size.to_ne_bytes().to_vec(),
        )),
    ];
    if rate32 == u32::MAX {
        options.push(TcOption::Other(DefaultNla::new(
            TCA_TBF_RATE64,
            bucket.rate.to_ne_bytes().to_vec(),
        )));
    }
    options
}

async fn expect_tbf(h: &Handle, name: &str, bucket: Bucket) -> Result<()> {
    let index = link_index(h, name).await?;
    let qdiscs: Vec<TcMessage> = h
        .qdisc()
        .get()
        .index(index as i32)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format_args!("listing the qdiscs of {name}")))?;
    let root = qdiscs
        .iter()
        .find(|q| q.header.index == index as i32 && q.header.parent == TcHandle::ROOT);
    let rate = root.and_then(tbf_rate);
    if rate != Some(bucket.rate) {
        return Err(PodNetError::Check(format!(
            "{name} has no bandwidth limit of {} bytes/s at its root (found {})",
            bucket.rate,
            rate.map_or("none".into(), |r| format!("{r} bytes/s"))
        )));
    }
    Ok(())
}

/// The rate of a TBF qdisc, bytes per second.
fn tbf_rate(qdisc: &TcMessage) -> Option<u64> {
    let is_tbf = qdisc
        .attributes
        .iter()
        .any(|a| matches!(a, TcAttribute::Kind(k) if k == "tbf"));
    if !is_tbf {
        return None;
    }
    let options = qdisc.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(o) => Some(o),
        _ => None,
    })?;
    // Depending on how the options were parsed, the attributes are ours or
    // nested in one TCA_OPTIONS attribute whose value is them.
    let mut nlas: Vec<(u16, Vec<u8>)> = Vec::new();
    for option in options {
        if let TcOption::Other(n) = option {
            let mut value = vec![0; n.value_len()];
            n.emit_value(&mut value);
            if n.kind() == TCA_OPTIONS {
                nlas.extend(walk_nlas(&value));
            } else {
                nlas.push((n.kind(), value));
            }
        }
    }
    let nla = |kind: u16| nlas.iter().find(|(k, _)| *k == kind).map(|(_, v)| v);
    if let Some(rate64) = nla(TCA_TBF_RATE64) {
        return Some(u64::from_ne_bytes(rate64.get(..8)?.try_into().ok()?));
    }
    let parms = nla(TCA_TBF_PARMS)?;
    Some(u32::from_ne_bytes(parms.get(8..12)?.try_into().ok()?).into())
}

/// (type, value) of each netlink attribute in `bytes`.
fn walk_nlas(mut bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & 0x3fff;
        let Some(value) = bytes.get(4..len) else {
            break;
        };
        out.push((kind, value.to_vec()));
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_kept_in_proportion() {
        let ten_mbit = |burst_bits| {
            Limit {
                rate_bits: 10_000_000,
                burst_bits,
            }
            .bucket()
        };
        // 50 ms at 1.25 MB/s; a runtime's 2^32-bit burst is cut to it.
        assert_eq!(ten_mbit(0).size, 62_500);
        assert_eq!(ten_mbit(u64::from(u32::MAX)).size, 62_500);
        assert_eq!(ten_mbit(8 * 40_000).size, 40_000);
        assert_eq!(ten_mbit(8).size, MIN_BUCKET as u32);
        assert_eq!(ten_mbit(0).rate, 1_250_000);
        assert_eq!(ten_mbit(0).limit, 62_500 + 65_536);
        let fast = Limit {
            rate_bits: 100_000_000_000,
            burst_bits: 0,
        }
        .bucket();
        assert_eq!(fast.rate, 12_500_000_000);
        let options = tbf_options(fast);
        assert_eq!(options.len(), 3, "a rate over 4 GB/s needs TCA_TBF_RATE64");
    }
}
