//! A datapath event as a flow: times made wall-clock, numbers made names.

use std::borrow::Cow;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

use tern_api::flows::{Endpoint, Flow, FlowType, FlowVerdict, Name, ServiceRef, Word};
use tern_common::FlowEvent;
use tern_common::events::{DropReason, kind, point, service_path, verdict};

use super::names::Names;

/// Nanoseconds to add to CLOCK_MONOTONIC for wall-clock time.
pub fn monotonic_to_wall() -> i128 {
    use nix::time::{ClockId, clock_gettime};
    let nanos = |clock| {
        clock_gettime(clock).map_or(0, |t| {
            t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128
        })
    };
    nanos(ClockId::CLOCK_REALTIME) - nanos(ClockId::CLOCK_MONOTONIC)
}

/// `None` for an event of a kind this agent does not know (a newer
/// datapath's): counted by the caller, not guessed at. Every string is
/// shared or static: an event costs no allocation but its flow's.
pub fn flow(event: &FlowEvent, names: &mut Names, node: &Name, offset: i128) -> Option<Flow> {
    let flow_type = match event.kind {
        kind::DROP => FlowType::Drop,
        kind::POLICY => FlowType::Policy,
        kind::SERVICE => FlowType::Service,
        kind::TRACE => FlowType::Trace,
        _ => return None,
    };
    let flow_verdict = match event.verdict {
        verdict::FORWARDED => FlowVerdict::Forwarded,
        verdict::DROPPED => FlowVerdict::Dropped,
        verdict::TRANSLATED => FlowVerdict::Translated,
        _ => return None,
    };
    let reason = match flow_type {
        FlowType::Service => Some(Cow::Borrowed(match event.reason {
            service_path::SOCKET => "socket",
            service_path::PACKET => "packet",
            service_path::EXTERNAL => "external",
            _ => "unknown",
        })),
        _ if flow_verdict == FlowVerdict::Dropped => {
            Some(DropReason::from_u8(event.reason).map_or_else(
                || Cow::Owned(format!("reason_{}", event.reason)),
                |r| Cow::Borrowed(r.name()),
            ))
        }
        _ => None,
    };
    let saddr = Ipv4Addr::from(u32::from_be(event.saddr));
    // A socket event knows its pod by the network namespace, not (yet)
    // by a source address.
    let source_ip = if event.saddr == 0 {
        (event.netns_cookie != 0)
            .then(|| names.pod_of_cookie(event.netns_cookie))
            .flatten()
    } else {
        Some(saddr)
    };
    let has_ports = matches!(event.proto, 6 | 17);
    let port = |p: u16| (has_ports && p != 0).then(|| u16::from_be(p));
    let source = endpoint(names, source_ip, port(event.sport));
    let daddr = Ipv4Addr::from(u32::from_be(event.daddr));
    let destination = endpoint(
        names,
        (event.daddr != 0).then_some(daddr),
        port(event.dport),
    );
    let refused_service = flow_type == FlowType::Drop
        && matches!(
            DropReason::from_u8(event.reason),
            Some(DropReason::NoBackend | DropReason::UnknownService | DropReason::NoLocalBackend)
        );
    let service = if flow_type == FlowType::Service {
        let ip = Ipv4Addr::from(u32::from_be(event.service_addr));
        let port = u16::from_be(event.service_port);
        Some(ServiceRef {
            name: names.service(ip, port, event.proto),
            ip,
            port,
        })
    } else if refused_service {
        let port = u16::from_be(event.dport);
        Some(ServiceRef {
            name: names.service(daddr, port, event.proto),
            ip: daddr,
            port,
        })
    } else {
        None
    };
    let policy = (flow_type == FlowType::Policy && event.policy != 0).then(|| {
        names
            .policy(event.policy)
            .unwrap_or_else(|| format!("#{}", event.policy).into())
    });
    Some(Flow {
        time_ns: (event.time_ns as i128 + offset).max(0) as u64,
        node: node.clone(),
        kind: flow_type,
        verdict: flow_verdict,
        reason,
        point: Cow::Borrowed(point::name(event.point)),
        direction: Cow::Borrowed(if event.direction == 0 {
            "ingress"
        } else {
            "egress"
        }),
        protocol: protocol_name(event.proto),
        source,
        destination,
        service,
        policy,
        interface: names.interface(event.ifindex),
        tcp_flags: (event.proto == 6 && event.tcp_flags != 0).then(|| tcp_flags(event.tcp_flags)),
    })
}

fn endpoint(names: &Names, ip: Option<Ipv4Addr>, port: Option<u16>) -> Endpoint {
    let pod = ip.and_then(|ip| names.pod(ip));
    let node = match &pod {
        Some(pod) => pod.node.clone(),
        None => ip.and_then(|ip| names.node(ip)),
    };
    Endpoint {
        ip,
        port,
        pod: pod.map(|p| p.name),
        node,
    }
}

pub fn protocol_name(proto: u8) -> Word {
    match proto {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        0 => "-".into(),
        other => other.to_string().into(),
    }
}

/// The six flags tcpdump names, e.g. "SYN|ACK" (spelt once per set).
fn tcp_flags(flags: u8) -> Word {
    static SPELT: OnceLock<Vec<String>> = OnceLock::new();
    let spelt = SPELT.get_or_init(|| (0..=0x3f).map(spell_tcp_flags).collect());
    Cow::Borrowed(spelt[usize::from(flags & 0x3f)].as_str())
}

fn spell_tcp_flags(flags: u8) -> String {
    const NAMES: [(u8, &str); 6] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_flags_read_as_tcpdump_names() {
        assert_eq!(tcp_flags(0x12), "SYN|ACK");
        assert_eq!(tcp_flags(0x04), "RST");
        assert_eq!(protocol_name(17), "UDP");
        assert_eq!(protocol_name(47), "47");
    }
}
