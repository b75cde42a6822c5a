//! `tern policy explain`: the datapath's decision for a new connection,
//! taken from the compiled state exactly as the eBPF programs take it.

use std::fmt;
use std::net::Ipv4Addr;

use super::{Direction, PolicyState, RuleRef};

/// The datapath's decision for one direction of a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No policy selects the pod for this direction.
    NotIsolated,
    Allowed {
        by: RuleRef,
        /// "namespace/name".
        policy: String,
    },
    /// A pod reaching itself (e.g. through a Service) is never denied.
    AllowedSelf,
    Denied {
        /// The policies isolating the pod, none of which allows it.
        isolating: Vec<String>,
    },
    /// The pod's policy is not known: everything is denied.
    DeniedFailClosed,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        matches!(
            self,
            Verdict::NotIsolated | Verdict::Allowed { .. } | Verdict::AllowedSelf
        )
    }
}

/// Both ends' decisions; `None` where that end is not a pod of this node
/// (its own node decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub egress: Option<Verdict>,
    pub ingress: Option<Verdict>,
}

impl Explanation {
    pub fn allowed(&self) -> bool {
        [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .all(Verdict::allowed)
    }
}

/// For `tern policy explain`: what this node's datapath decides for a new
/// connection from `src` to `dst`.
pub fn explain(
    state: &PolicyState,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    port: u16,
) -> Explanation {
    Explanation {
        egress: decide(state, src, Direction::Egress, dst, protocol, port),
        ingress: decide(state, dst, Direction::Ingress, src, protocol, port),
    }
}

/// The decision at local endpoint `own` for traffic with `peer` in
/// `direction`, exactly as the datapath takes it; `None` when `own` is not
/// a local endpoint.
pub fn decide(
    state: &PolicyState,
    own: Ipv4Addr,
    direction: Direction,
    peer: Ipv4Addr,
    protocol: u8,
    port: u16,
) -> Option<Verdict> {
    let dir = state.endpoints.get(&own)?.direction(direction);
    let name = |policy: &u32| {
        state
            .policies
            .get(policy)
            .map_or_else(|| format!("#{policy}"), |p| p.name.clone())
    };
    let verdict = if !dir.isolated {
        Verdict::NotIsolated
    } else if dir.deny_all {
        Verdict::DeniedFailClosed
    } else if peer == own {
        Verdict::AllowedSelf
    } else {
        let identity = state.identities.get(&peer).copied();
        match dir.allowing(identity, peer, protocol, port) {
            Some(by) => Verdict::Allowed {
                by,
                policy: name(&by.policy),
            },
            None => Verdict::Denied {
                isolating: dir.policies.iter().map(name).collect(),
            },
        }
    };
    Some(verdict)
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::NotIsolated => f.write_str("allowed (no policy isolates the pod)"),
            Verdict::Allowed { by, policy } => {
                write!(f, "allowed by {policy} rule {}", by.rule)
            }
            Verdict::AllowedSelf => f.write_str("allowed (the pod itself)"),
            Verdict::Denied { isolating } => write!(
                f,
                "denied (isolated by {}; no rule allows it)",
                isolating.join(", ")
            ),
            Verdict::DeniedFailClosed => {
                f.write_str("denied (fail closed: the pod's policy is not known)")
            }
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let not_local = "not a pod of this node";
        match &self.egress {
            Some(v) => writeln!(f, "egress: {v}")?,
            None => writeln!(f, "egress: {not_local}")?,
        }
        match &self.ingress {
            Some(v) => write!(f, "ingress: {v}"),
            None => write!(f, "ingress: {not_local}"),
        }
    }
}
