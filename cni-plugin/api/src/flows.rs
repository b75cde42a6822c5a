//! Flows as `tern observe` shows them: datapath events with the names the
//! agent resolved (pods, Services, nodes), and the filters that select them.

use std::borrow::Cow;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A name the agent resolved (pod, node, Service, policy, device): shared
/// with the agent's name index, so resolving an event allocates nothing.
pub type Name = Arc<str>;

/// A word of a fixed vocabulary (point, direction, protocol, reason):
/// borrowed from the agent's constants, owned when deserialized.
pub type Word = Cow<'static, str>;

/// One flow event, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// Wall-clock time of the event, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// The node whose datapath saw it.
    pub node: Name,
    /// drop, policy, service or trace.
    #[serde(rename = "type")]
    pub kind: FlowType,
    pub verdict: FlowVerdict,
    /// Drops and denials: the drop reason's name (e.g. `no_backend`);
    /// Service translations: the path (`socket`, `packet`, `external`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Word>,
    /// Where the datapath saw it (e.g. `from_pod`, `sock_connect`).
    pub point: Word,
    /// ingress or egress, as the pod (or node) there sees it.
    pub direction: Word,
    /// TCP, UDP, ICMP, or the protocol number.
    pub protocol: Word,
    pub source: Endpoint,
    /// Service translations: the chosen backend.
    pub destination: Endpoint,
    /// Service translations: the frontend the client used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Policy verdicts: the policy (namespace/name) that allowed, or the
    /// first isolating the pod for a denial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Name>,
    /// The device the packet was seen on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<Name>,
    /// TCP flags, e.g. `SYN` or `SYN|ACK`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<Word>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowType {
    Drop,
    Policy,
    Service,
    Trace,
}

impl FlowType {
    pub fn name(self) -> &'static str {
        match self {
            FlowType::Drop => "drop",
            FlowType::Policy => "policy",
            FlowType::Service => "service",
            FlowType::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowVerdict {
    Forwarded,
    Dropped,
    Translated,
}

impl FlowVerdict {
    pub fn name(self) -> &'static str {
        match self {
            FlowVerdict::Forwarded => "forwarded",
            FlowVerdict::Dropped => "dropped",
            FlowVerdict::Translated => "translated",
        }
    }
}

/// One side of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `None` when the datapath did not know it (a socket not bound yet
    /// whose pod is unknown).
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The pod with this address, "namespace/name".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Name>,
    /// The node it is on, or the node with this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
}

/// A Service frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRef {
    /// "namespace/name"; `None` if no Service has this frontend now.
    pub name: Option<Name>,
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// What `tern observe` asks for; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    /// A pod on either side: "namespace/name", or a name in any namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// A pod of this namespace on either side (or the Service's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ip: Option<Ipv4Addr>,
    /// The destination (or the Service frontend's) address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ip: Option<Ipv4Addr>,
    /// Either side's port, or the frontend's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// "TCP", "UDP", "ICMP" (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<FlowVerdict>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<FlowType>,
}

impl Flow {
    /// A translated connection (socket-LB, shop/frontend to the Service
    /// shop/backend, sent to shop/backend-1): for tests and examples.
    #[doc(hidden)]
    pub fn example() -> Flow {
        Flow {
            time_ns: 1_765_015_562_123_000_000,
            node: "node-a".into(),
            kind: FlowType::Service,
            verdict: FlowVerdict::Translated,
            reason: Some("socket".into()),
            point: "sock_connect".into(),
            direction: "egress".into(),
            protocol: "TCP".into(),
            source: Endpoint {
                ip: Some(Ipv4Addr::new(10, 244, 1, 5)),
                port: None,
                pod: Some("shop/frontend".into()),
                node: Some("node-a".into()),
            },
            destination: Endpoint {
                ip: Some(Ipv4Addr::new(10, 244, 2, 7)),
                port: Some(8080),
                pod: Some("shop/backend-1".into()),
                node: Some("node-b".into()),
            },
            service: Some(ServiceRef {
                name: Some("shop/backend".into()),
                ip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
            }),
            policy: None,
            interface: None,
            tcp_flags: None,
        }
    }
}

impl FlowFilter {
    pub fn matches(&self, flow: &Flow) -> bool {
        let sides = [&flow.source, &flow.destination];
        let pod_matches = |wanted: &str, pod: &Option<Name>| {
            pod.as_deref().is_some_and(|pod| {
                pod == wanted || (!wanted.contains('/') && pod.split('/').nth(1) == Some(wanted))
            })
        };
        let service_name = flow.service.as_ref().and_then(|s| s.name.as_deref());
        let in_namespace = |namespace: &str| {
            let prefix = |name: Option<&str>| {
                name.and_then(|n| n.split_once('/'))
                    .is_some_and(|(ns, _)| ns == namespace)
            };
            sides.iter().any(|side| prefix(side.pod.as_deref())) || prefix(service_name)
        };
        self.pod
            .as_deref()
            .is_none_or(|wanted| sides.iter().any(|side| pod_matches(wanted, &side.pod)))
            && self.namespace.as_deref().is_none_or(in_namespace)
            && self.from_ip.is_none_or(|ip| flow.source.ip == Some(ip))
            && self.to_ip.is_none_or(|ip| {
                flow.destination.ip == Some(ip) || flow.service.as_ref().is_some_and(|s| s.ip == ip)
            })
            && self.port.is_none_or(|port| {
                sides.iter().any(|side| side.port == Some(port))
                    || flow.service.as_ref().is_some_and(|s| s.port == port)
            })
            && self
                .protocol
                .as_deref()
                .is_none_or(|p| flow.protocol.eq_ignore_ascii_case(p))
            && (self.verdicts.is_empty() || self.verdicts.contains(&flow.verdict))
            && (self.types.is_empty() || self.types.contains(&flow.kind))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn flow() -> Flow {
        Flow::example()
    }

    #[test]
    fn every_filter_selects_exactly_what_it_names() {
        let f = flow();
        let yes = |filter: FlowFilter| assert!(filter.matches(&f), "{filter:?}");
        let no = |filter: FlowFilter| assert!(!filter.matches(&f), "{filter:?}");
        yes(FlowFilter::default());
        yes(FlowFilter {
            pod: Some("shop/frontend".into()),
            ..Default::default()
        });
        yes(FlowFilter {
            pod: Some("backend-1".into()),
            ..Default::default()
        });
        no(FlowFilter {
            pod: Some("shop/back".into()),
            ..Default::default()
        });
        no(FlowFilter {
            pod: Some("other/frontend".into()),
            ..Default::default()
        });
        yes(FlowFilter {
            namespace: Some("shop".into()),
            ..Default::default()
        });
        no(FlowFilter {
            namespace: Some("sho".into()),
            ..Default::default()
        });
        yes(FlowFilter {
            from_ip: Some(Ipv4Addr::new(10, 244, 1, 5)),
            ..Default::default()
        });
        no(FlowFilter {
            from_ip: Some(Ipv4Addr::new(10, 244, 2, 7)),
            ..Default::default()
        });
        yes(FlowFilter {
            to_ip: Some(Ipv4Addr::new(10, 244, 2, 7)),
            ..Default::default()
        });
        yes(FlowFilter {
            to_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
            ..Default::default()
        });
        no(FlowFilter {
            to_ip: Some(Ipv4Addr::new(10, 244, 1, 5)),
            ..Default::default()
        });
        yes(FlowFilter {
            port: Some(8080),
            ..Default::default()
        });
        yes(FlowFilter {
            port: Some(80),
            ..Default::default()
        });
        no(FlowFilter {
            port: Some(81),
            ..Default::default()
        });
        yes(FlowFilter {
            protocol: Some("tcp".into()),
            ..Default::default()
        });
        no(FlowFilter {
            protocol: Some("udp".into()),
            ..Default::default()
        });
        yes(FlowFilter {
            verdicts: vec![FlowVerdict::Translated],
            ..Default::default()
        });
        no(FlowFilter {
            verdicts: vec![FlowVerdict::Dropped],
            ..Default::default()
        });
        yes(FlowFilter {
            types: vec![FlowType::Drop, FlowType::Service],
            ..Default::default()
        });
        no(FlowFilter {
            types: vec![FlowType::Policy],
            ..Default::default()
        });
        no(FlowFilter {
            pod: Some("frontend".into()),
            verdicts: vec![FlowVerdict::Dropped],
            ..Default::default()
        });
    }

    #[test]
    fn a_flow_reads_back_from_its_json() {
        let f = flow();
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"type\":\"service\""), "{json}");
        assert_eq!(serde_json::from_str::<Flow>(&json).unwrap(), f);
    }
}
