//! Flow events into the EVENTS ring (`tern observe`) and drop accounting
//! (DROPS). What is reported is aggregated: policy verdicts and Service
//! translations once per new connection (their callers only act then),
//! drops always but within a per-CPU budget, trace events only in trace
//! mode and, for TCP, only on SYN, FIN and RST.

use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use tern_common::events::{Direction, event_flags, kind, point, verdict};
use tern_common::{DropReason, FlowEvent, Reason};

use crate::maps::{CONFIG, DROPS, EVENT_BUDGET, EVENTS, bump, count};
use crate::packet::{IPPROTO_TCP, Packet, TCP_FIN, TCP_RST, TCP_SYN};

const NANOS_PER_SECOND: u64 = 1_000_000_000;
/// Unread events (bytes; 64 each) that wake the agent before its timer.
const WAKE_BACKLOG_BYTES: u64 = 64 * 1024;

/// What a point is to the pod (or node) there: what it sends, or what
/// arrives for it.
fn direction(at: u8) -> Direction {
    match at {
        point::FROM_POD
        | point::TO_OVERLAY
        | point::TO_NETDEV
        | point::SOCK_CONNECT
        | point::SOCK_SENDMSG
        | point::SOCK_BIND => Direction::Egress,
        _ => Direction::Ingress,
    }
}

/// The `event_flags` the agent turned on.
#[inline(always)]
fn enabled() -> u32 {
    CONFIG.get(0).map_or(0, |c| c.events)
}

/// A packet dropped (or a connection refused) at `at`: counted, and
/// reported when drop events are on and the CPU's budget allows.
#[inline(always)]
pub fn drop(p: &Packet, reason: DropReason, at: u8, ifindex: u32) {
    report_drop(p, reason, at, ifindex, 0);
}

/// A socket call refused; `cookie`: the socket's network namespace.
#[inline(always)]
pub fn drop_socket(p: &Packet, reason: DropReason, at: u8, cookie: u64) {
    report_drop(p, reason, at, 0, cookie);
}

#[inline(always)]
fn report_drop(p: &Packet, reason: DropReason, at: u8, ifindex: u32, cookie: u64) {
    count_drop(reason, at);
    if enabled() & event_flags::DROPS != 0 {
        emit(
            p,
            meta(kind::DROP, at, reason as u8, verdict::DROPPED),
            0,
            cookie,
            ifindex,
        );
    }
}

/// A drop before the packet could be read. A call of its own: the empty
/// packet must not sit in the caller's frame on the deep paths.
#[inline(never)]
pub fn drop_unparsed(reason: DropReason, at: u8, ifindex: u32) {
    drop(&Packet::empty(), reason, at, ifindex);
}

fn count_drop(reason: DropReason, at: u8) {
    bump(&DROPS, reason as u32 * 2 + direction(at) as u32);
}

/// A NetworkPolicy verdict on a new connection (or the denial of a live
/// one whose policy changed) at the local pod, `at` where the packet was:
/// leaving it (FROM_POD) or about to reach it (TO_POD). Denials are drops
/// too.
#[inline(always)]
pub fn policy_verdict(p: &Packet, allowed: bool, at: u8, policy: u32) {
    let (reason, outcome) = if allowed {
        (0, verdict::FORWARDED)
    } else {
        count_drop(DropReason::PolicyDenied, at);
        (DropReason::PolicyDenied as u8, verdict::DROPPED)
    };
    if enabled() & event_flags::POLICY != 0 {
        emit(
            p,
            meta(kind::POLICY, at, reason, outcome),
            policy as u64,
            0,
            0,
        );
    }
}

/// A new connection `p` (client -> frontend) sent to the backend
/// `addr:port` by the Service path `path`.
#[inline(always)]
pub fn service(p: &Packet, addr: u32, port: u16, path: u8, at: u8, cookie: u64) {
    if enabled() & event_flags::SERVICE != 0 {
        let backend = addr as u64 | (port as u64) << 32;
        emit(
            p,
            meta(kind::SERVICE, at, path, verdict::TRANSLATED),
            backend,
            cookie,
            0,
        );
    }
}

/// Trace mode: the packet passed `at`. TCP only when it opens or closes.
#[inline(always)]
pub fn trace(p: &Packet, at: u8, ifindex: u32) {
    if enabled() & event_flags::TRACE == 0 {
        return;
    }
    if p.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        return;
    }
    emit(
        p,
        meta(kind::TRACE, at, 0, verdict::FORWARDED),
        0,
        0,
        ifindex,
    );
}

#[inline(always)]
fn meta(kind: u8, at: u8, reason: u8, outcome: u8) -> u32 {
    kind as u32 | (at as u32) << 8 | (reason as u32) << 16 | (outcome as u32) << 24
}

/// Writes one event straight into the ring (nothing big on the stack: the
/// callers sit on deep paths). `extra`: a SERVICE event's backend
/// (address | port << 32), a POLICY event's policy number.
#[inline(never)]
fn emit(p: &Packet, meta: u32, extra: u64, cookie: u64, ifindex: u32) {
    let event_kind = meta as u8;
    let outcome = (meta >> 24) as u8;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if outcome == verdict::DROPPED && !within_budget(now) {
        count(Reason::EventsRateLimited);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        count(Reason::EventsLost);
        return;
    };
    let service = event_kind == kind::SERVICE;
    let at = (meta >> 8) as u8;
    let event = entry.as_mut_ptr();
    // SAFETY: the reserved record is ours until submitted; every field is
    // written in place (a FlowEvent built on the stack would take the
    // deepest policy path past the verifier's 512 bytes).
    unsafe {
        (*event).time_ns = now;
        (*event).netns_cookie = cookie;
        (*event).saddr = p.saddr;
        (*event).daddr = if service { extra as u32 } else { p.daddr };
        (*event).sport = p.sport;
        (*event).dport = if service {
            (extra >> 32) as u16
        } else {
            p.dport
        };
        (*event).service_addr = if service { p.daddr } else { 0 };
        (*event).service_port = if service { p.dport } else { 0 };
        (*event).kind = event_kind;
        (*event).point = at;
        (*event).ifindex = ifindex;
        (*event).policy = if event_kind == kind::POLICY {
            extra as u32
        } else {
            0
        };
        (*event).reason = (meta >> 16) as u8;
        (*event).verdict = outcome;
        (*event).proto = p.proto;
        (*event).direction = direction(at) as u8;
        (*event).tcp_flags = p.tcp_flags;
        (*event).pad = [0; 7];
    }
    // No wake-up per event (each would cost the sender an irq_work): the
    // agent drains the ring on a short timer, and is woken only when a
    // backlog builds up.
    let wake = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKE_BACKLOG_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
}

/// Drop events this CPU may still report in the current second.
#[inline(always)]
fn within_budget(now: u64) -> bool {
    let limit = CONFIG.get(0).map_or(0, |c| c.drop_events_per_second);
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    let budget = unsafe { &mut *budget };
    if now.wrapping_sub(budget.window_start_ns) >= NANOS_PER_SECOND {
        budget.window_start_ns = now;
        budget.reported = 0;
    }
    if budget.reported >= limit {
        return false;
    }
    budget.reported += 1;
    true
}
