//! NetworkPolicy (`networking.k8s.io/v1`) as the policy compiler needs it:
//! defaulted and validated by the source, no Kubernetes types. Empty and
//! absent fields carry the API's meanings explicitly (`Peers::All`,
//! `Ports::All`, `None` for a direction the policy does not isolate), so
//! that nothing downstream can confuse "empty" with "everything".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnetwork::Ipv4Network;

use super::Protocol;

/// Labels of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries (the API server sets it): its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// (namespace, name).
    pub key: (String, String),
    /// The pods of the policy's namespace it applies to.
    pub pod_selector: LabelSelector,
    /// `Some` when `policyTypes` (after defaulting) includes Ingress: the
    /// selected pods are isolated for ingress and these rules (maybe none)
    /// are what the policy allows.
    pub ingress: Option<Vec<PolicyRule>>,
    /// The same for Egress.
    pub egress: Option<Vec<PolicyRule>>,
    /// Set when the object could not be converted as a whole: the policy
    /// then isolates what it selects in the directions it names (all of
    /// them when unknown) and allows nothing (fail closed).
    pub error: Option<String>,
}

impl NetworkPolicy {
    pub fn name(&self) -> String {
        format!("{}/{}", self.key.0, self.key.1)
    }
}

/// One ingress (`from`) or egress (`to`) rule: traffic with any of the
/// peers on any of the ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub peers: Peers,
    pub ports: Ports,
}

/// `from` / `to`: empty or absent means every peer (also outside the
/// cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    All,
    /// At least one entry was given; the list may still be empty when all
    /// of them were dropped (e.g. IPv6 ipBlocks): then nothing matches.
    Some(Vec<Peer>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector`: the pods matching `pods`
    /// in the namespaces `namespaces` names.
    Pods {
        namespaces: NamespaceScope,
        pods: LabelSelector,
    },
    /// `ipBlock`: addresses in `cidr` but in none of `except`.
    IpBlock {
        cidr: Ipv4Network,
        except: Vec<Ipv4Network>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceScope {
    /// No namespaceSelector: the policy's own namespace.
    Own,
    /// A namespaceSelector (the empty one selects every namespace).
    Selected(LabelSelector),
}

/// `ports`: empty or absent means every port of every protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    All,
    /// May be empty when every entry was refused (SCTP): nothing matches.
    Some(Vec<PolicyPort>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPort {
    /// TCP or UDP (SCTP is refused by the source).
    pub protocol: Protocol,
    /// `None`: every port of the protocol.
    pub port: Option<PortRef>,
    /// `endPort`: with a numeric `port`, the range `port..=end_port`.
    pub end_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortRef {
    Number(u16),
    /// A container port's name, resolved against the destination pod.
    Name(String),
}

/// A label selector: `matchLabels` and `matchExpressions`, all of which
/// must hold (the empty selector matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    /// For In and NotIn (never empty there); empty for the others.
    pub values: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|r| r.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.expressions.is_empty()
    }
}

impl Requirement {
    /// As `k8s.io/apimachinery/pkg/labels`: NotIn and DoesNotExist hold
    /// for a missing key.
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => !value.is_some_and(|v| self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(all)");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.expressions {
            let values = r.values.iter().cloned().collect::<Vec<_>>().join(",");
            parts.push(match r.operator {
                Operator::In => format!("{} in ({values})", r.key),
                Operator::NotIn => format!("{} notin ({values})", r.key),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn requirement(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn selectors_match_as_the_api_defines() {
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        assert!(LabelSelector::default().matches(&pod));
        assert!(LabelSelector::default().matches(&Labels::new()));
        let by_label = LabelSelector {
            match_labels: labels(&[("app", "web")]),
            expressions: vec![],
        };
        assert!(by_label.matches(&pod));
        assert!(!by_label.matches(&labels(&[("app", "db")])));
        let cases = [
            (requirement("tier", Operator::In, &["front", "x"]), true),
            (requirement("tier", Operator::In, &["back"]), false),
            (requirement("missing", Operator::In, &["x"]), false),
            (requirement("tier", Operator::NotIn, &["front"]), false),
            (requirement("tier", Operator::NotIn, &["back"]), true),
            (requirement("missing", Operator::NotIn, &["x"]), true),
            (requirement("tier", Operator::Exists, &[]), true),
            (requirement("missing", Operator::Exists, &[]), false),
            (requirement("tier", Operator::DoesNotExist, &[]), false),
            (requirement("missing", Operator::DoesNotExist, &[]), true),
        ];
        for (r, expected) in cases {
            assert_eq!(r.matches(&pod), expected, "{r:?}");
        }
        // matchLabels and expressions are ANDed.
        let both = LabelSelector {
            match_labels: labels(&[("app", "web")]),
            expressions: vec![requirement("tier", Operator::In, &["back"])],
        };
        assert!(!both.matches(&pod));
        assert_eq!(both.to_string(), "app=web,tier in (back)");
    }
}
