//! NetworkPolicy (`networking.k8s.io/v1`) -> model, as the API reference
//! defines it (policyTypes defaulting, empty versus absent rules). An
//! object that is invalid in part fails closed: it still isolates what it
//! selects, allows nothing, and says why.

use std::collections::BTreeSet;

use ipnetwork::{IpNetwork, Ipv4Network};
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::convert::{Conversion, check_name, is_port_name, port_number, protocol};
use crate::model::{
    LabelSelector, Labels, NamespaceScope, NetworkPolicy, Operator, Peer, Peers, PolicyPort,
    PolicyRule, PortRef, Ports, Protocol, Requirement,
};

/// A NetworkPolicy, defaulted as the API server does. One that does not
/// validate is still used, failing closed: it isolates what it selects and
/// allows nothing, since dropping it would open what its author meant to
/// close. Only one that cannot be keyed (no namespace or name) is rejected.
pub fn network_policy(object: &networking::NetworkPolicy) -> Conversion<NetworkPolicy> {
    let meta = &object.metadata;
    let (namespace, name) = (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    );
    let named = check_name("metadata.name", name)
        .and_then(|()| check_name("metadata.namespace", namespace));
    if let Err(refusal) = named {
        return Conversion::Rejected(refusal);
    }
    let key = (namespace.to_owned(), name.to_owned());
    let empty = networking::NetworkPolicySpec::default();
    let spec = object.spec.as_ref().unwrap_or(&empty);
    let isolates = policy_types(spec);
    let mut warnings = Vec::new();
    let converted = isolates
        .clone()
        .and_then(|isolates| convert_policy(key.clone(), spec, isolates, &mut warnings));
    match converted {
        Ok(policy) => Conversion::Accepted(policy, warnings),
        Err(reason) => {
            // Both directions when policyTypes itself is what is wrong.
            let isolates = isolates.unwrap_or(Isolates {
                ingress: true,
                egress: true,
            });
            // A bad podSelector: the whole namespace, rather than nothing.
            let pod_selector = spec
                .pod_selector
                .as_ref()
                .and_then(|s| label_selector("spec.podSelector", s).ok())
                .unwrap_or_default();
            let warning = format!(
                "{reason}; the policy fails closed: it allows nothing to or from the pods it selects"
            );
            let policy = NetworkPolicy {
                key,
                pod_selector,
                ingress: isolates.ingress.then(Vec::new),
                egress: isolates.egress.then(Vec::new),
                error: Some(reason),
            };
            Conversion::Accepted(policy, vec![warning])
        }
    }
}

/// The directions a policy isolates (`policyTypes`, defaulted).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Isolates {
    ingress: bool,
    egress: bool,
}

/// `policyTypes`; when empty, as the API server defaults it: Ingress
/// always, Egress when there are egress rules.
fn policy_types(spec: &networking::NetworkPolicySpec) -> Result<Isolates, String> {
    let types = spec.policy_types.as_deref().unwrap_or_default();
    if types.is_empty() {
        return Ok(Isolates {
            ingress: true,
            egress: spec.egress.as_ref().is_some_and(|rules| !rules.is_empty()),
        });
    }
    if types.len() > 2 {
        return Err("spec.policyTypes: may not name more than two types".into());
    }
    let mut isolates = Isolates {
        ingress: false,
        egress: false,
    };
    for (index, t) in types.iter().enumerate() {
        match t.as_str() {
            "Ingress" => isolates.ingress = true,
            "Egress" => isolates.egress = true,
            other => {
                return Err(format!(
                    "spec.policyTypes[{index}]: {other:?} is neither Ingress nor Egress"
                ));
            }
        }
    }
    Ok(isolates)
}

fn convert_policy(
    key: (String, String),
    spec: &networking::NetworkPolicySpec,
    isolates: Isolates,
    warnings: &mut Vec<String>,
) -> Result<NetworkPolicy, String> {
    let pod_selector = match &spec.pod_selector {
        Some(selector) => label_selector("spec.podSelector", selector)?,
        None => LabelSelector::default(),
    };
    // Every rule is validated, also those of a direction the policy does
    // not isolate: the API server would refuse the object as a whole.
    let mut ingress = Vec::new();
    for (index, rule) in spec.ingress.iter().flatten().enumerate() {
        ingress.push(policy_rule(
            &format!("spec.ingress[{index}]"),
            "from",
            rule.from.as_deref(),
            rule.ports.as_deref(),
            warnings,
        )?);
    }
    let mut egress = Vec::new();
    for (index, rule) in spec.egress.iter().flatten().enumerate() {
        egress.push(policy_rule(
            &format!("spec.egress[{index}]"),
            "to",
            rule.to.as_deref(),
            rule.ports.as_deref(),
            warnings,
        )?);
    }
    for (name, field, isolated, rules) in [
        ("Ingress", "spec.ingress", isolates.ingress, &ingress),
        ("Egress", "spec.egress", isolates.egress, &egress),
    ] {
        if !isolated && !rules.is_empty() {
            warnings.push(format!(
                "{field}: ignored: spec.policyTypes does not include {name}"
            ));
        }
    }
    Ok(NetworkPolicy {
        key,
        pod_selector,
        ingress: isolates.ingress.then_some(ingress),
        egress: isolates.egress.then_some(egress),
        error: None,
    })
}

/// One rule; `peer_field` is `from` or `to`.
fn policy_rule(
    field: &str,
    peer_field: &str,
    peers: Option<&[networking::NetworkPolicyPeer]>,
    ports: Option<&[networking::NetworkPolicyPort]>,
    warnings: &mut Vec<String>,
) -> Result<PolicyRule, String> {
    let peers = match peers {
        None | Some([]) => Peers::All,
        Some(raw) => {
            let mut out = Vec::new();
            for (index, p) in raw.iter().enumerate() {
                out.extend(peer(
                    &format!("{field}.{peer_field}[{index}]"),
                    p,
                    warnings,
                )?);
            }
            Peers::Some(out)
        }
    };
    let ports = match ports {
        None | Some([]) => Ports::All,
        Some(raw) => {
            let mut out = Vec::new();
            for (index, p) in raw.iter().enumerate() {
                out.extend(policy_port(
                    &format!("{field}.ports[{index}]"),
                    p,
                    warnings,
                )?);
            }
            Ports::Some(out)
        }
    };
    Ok(PolicyRule { peers, ports })
}

/// One peer; `None` when it is left out (an IPv6 ipBlock).
fn peer(
    field: &str,
    raw: &networking::NetworkPolicyPeer,
    warnings: &mut Vec<String>,
) -> Result<Option<Peer>, String> {
    match (&raw.ip_block, &raw.namespace_selector, &raw.pod_selector) {
        (None, None, None) => Err(format!(
            "{field}: names no peer (podSelector, namespaceSelector or ipBlock)"
        )),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(format!(
            "{field}: ipBlock may not be combined with podSelector or namespaceSelector"
        )),
        (Some(block), None, None) => ip_block(&format!("{field}.ipBlock"), block, warnings),
        (None, namespaces, pods) => {
            let namespaces = match namespaces {
                None => NamespaceScope::Own,
                Some(s) => NamespaceScope::Selected(label_selector(
                    &format!("{field}.namespaceSelector"),
                    s,
                )?),
            };
            let pods = match pods {
                None => LabelSelector::default(),
                Some(s) => label_selector(&format!("{field}.podSelector"), s)?,
            };
            Ok(Some(Peer::Pods { namespaces, pods }))
        }
    }
}

/// An ipBlock: IPv4 kept; IPv6 left out with a warning, since Tern's pods
/// have only IPv4 peers for it to match.
fn ip_block(
    field: &str,
    raw: &networking::IPBlock,
    warnings: &mut Vec<String>,
) -> Result<Option<Peer>, String> {
    let cidr = policy_cidr(&format!("{field}.cidr"), &raw.cidr)?;
    let mut except = Vec::new();
    for (index, text) in raw.except.iter().flatten().enumerate() {
        let field = format!("{field}.except[{index}]");
        let excluded = policy_cidr(&field, text)?;
        let inside = excluded.is_ipv4() == cidr.is_ipv4()
            && excluded.prefix() > cidr.prefix()
            && cidr.contains(excluded.network());
        if !inside {
            return Err(format!(
                "{field}: {text} is not a strict subset of cidr {cidr}"
            ));
        }
        except.push(excluded);
    }
    match cidr {
        IpNetwork::V4(cidr) => Ok(Some(Peer::IpBlock {
            cidr,
            except: except
                .into_iter()
                .filter_map(|e| match e {
                    IpNetwork::V4(e) => Some(e),
                    IpNetwork::V6(_) => None,
                })
                .collect(),
        })),
        IpNetwork::V6(cidr) => {
            warnings.push(format!(
                "{field}: IPv6 {cidr} skipped (IPv4 only): it can match no peer"
            ));
            Ok(None)
        }
    }
}

/// A CIDR as the API reads it: the prefix length is required, and host
/// bits are cleared (`10.0.0.1/8` is `10.0.0.0/8`).
fn policy_cidr(field: &str, text: &str) -> Result<IpNetwork, String> {
    let invalid = || format!("{field}: {text:?} is not a CIDR");
    if !text.contains('/') {
        return Err(invalid());
    }
    let parsed = text.parse::<IpNetwork>().map_err(|_| invalid())?;
    match parsed {
        IpNetwork::V4(n) => Ipv4Network::new(n.network(), n.prefix()).map(IpNetwork::V4),
        IpNetwork::V6(n) => ipnetwork::Ipv6Network::new(n.network(), n.prefix()).map(IpNetwork::V6),
    }
    .map_err(|_| invalid())
}

/// One port entry; `None` when it is refused (SCTP).
fn policy_port(
    field: &str,
    raw: &networking::NetworkPolicyPort,
    warnings: &mut Vec<String>,
) -> Result<Option<PolicyPort>, String> {
    let protocol = protocol(raw.protocol.as_deref()).map_err(|e| format!("{field}: {e}"))?;
    let port = match &raw.port {
        None => None,
        Some(IntOrString::Int(n)) => {
            Some(PortRef::Number(port_number(*n).ok_or_else(|| {
                format!("{field}.port: {n} is out of range 1..=65535")
            })?))
        }
        Some(IntOrString::String(s)) if is_port_name(s) => Some(PortRef::Name(s.clone())),
        Some(IntOrString::String(s)) => {
            return Err(format!(
                "{field}.port: {s:?} is neither a number nor a port name"
            ));
        }
    };
    let end_port = match (raw.end_port, &port) {
        (None, _) => None,
        (Some(end), Some(PortRef::Number(start))) => {
            let end = port_number(end)
                .ok_or_else(|| format!("{field}.endPort: {end} is out of range 1..=65535"))?;
            if end < *start {
                return Err(format!("{field}.endPort: {end} is less than port {start}"));
            }
            Some(end)
        }
        (Some(_), Some(PortRef::Name(_))) => {
            return Err(format!("{field}.endPort: not allowed with a named port"));
        }
        (Some(_), None) => return Err(format!("{field}.endPort: not allowed without a port")),
    };
    if protocol == Protocol::Sctp {
        warnings.push(format!(
            "{field}: SCTP is not supported; the traffic it names stays denied"
        ));
        return Ok(None);
    }
    Ok(Some(PolicyPort {
        protocol,
        port,
        end_port,
    }))
}

/// A label selector; expressions as `k8s.io/apimachinery` validates them.
fn label_selector(field: &str, raw: &meta::LabelSelector) -> Result<LabelSelector, String> {
    let mut expressions = Vec::new();
    for (index, r) in raw.match_expressions.iter().flatten().enumerate() {
        let field = format!("{field}.matchExpressions[{index}]");
        if r.key.is_empty() {
            return Err(format!("{field}.key: is empty"));
        }
        let operator = match r.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(format!(
                    "{field}.operator: {other:?} is none of In, NotIn, Exists, DoesNotExist"
                ));
            }
        };
        let values: BTreeSet<String> = r.values.iter().flatten().cloned().collect();
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(format!("{field}.values: {} needs at least one", r.operator));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(format!("{field}.values: {} takes none", r.operator));
            }
            _ => {}
        }
        expressions.push(Requirement {
            key: r.key.clone(),
            operator,
            values,
        });
    }
    let match_labels: Labels = raw.match_labels.clone().unwrap_or_default();
    if match_labels.contains_key("") {
        return Err(format!("{field}.matchLabels: a key is empty"));
    }
    Ok(LabelSelector {
        match_labels,
        expressions,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn accepted<T: std::fmt::Debug>(c: Conversion<T>) -> (T, Vec<String>) {
        match c {
            Conversion::Accepted(value, warnings) => (value, warnings),
            other => panic!("expected accepted, got {other:?}"),
        }
    }

    fn policy_from(yaml: &str) -> Conversion<NetworkPolicy> {
        network_policy(&serde_yaml_ng::from_str(yaml).expect("test YAML parses"))
    }

    /// A NetworkPolicy `p` in namespace `shop` with the given `spec` body
    /// (indented 2).
    fn policy_with(spec: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: shop\nspec:\n{spec}"
        )
    }

    fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            expressions: vec![],
        }
    }

    fn own_pods(pairs: &[(&str, &str)]) -> Peer {
        Peer::Pods {
            namespaces: NamespaceScope::Own,
            pods: selector(pairs),
        }
    }

    fn tcp(port: u16) -> PolicyPort {
        PolicyPort {
            protocol: Protocol::Tcp,
            port: Some(PortRef::Number(port)),
            end_port: None,
        }
    }

    #[test]
    fn a_network_policy_converts_field_by_field() {
        let (policy, warnings) = accepted(policy_from(&tern_lab::lab::course_policy("default")));
        assert!(warnings.is_empty(), "{warnings:?}");
        let expected = NetworkPolicy {
            key: ("default".into(), "backend-netpol".into()),
            pod_selector: selector(&[("app", "backend")]),
            ingress: Some(vec![PolicyRule {
                peers: Peers::Some(vec![own_pods(&[("app", "frontend")])]),
                ports: Ports::Some(vec![tcp(8080)]),
            }]),
            egress: Some(vec![
                PolicyRule {
                    peers: Peers::Some(vec![own_pods(&[("app", "database")])]),
                    ports: Ports::Some(vec![tcp(5432)]),
                },
                PolicyRule {
                    // `to: []`: every destination, DNS ports only.
                    peers: Peers::All,
                    ports: Ports::Some(vec![
                        tcp(53),
                        PolicyPort {
                            protocol: Protocol::Udp,
                            port: Some(PortRef::Number(53)),
                            end_port: None,
                        },
                    ]),
                },
            ]),
            error: None,
        };
        assert_eq!(policy, expected);
        assert_eq!(policy.name(), "default/backend-netpol");
    }

    #[test]
    fn policy_types_default_as_the_api_server_does() {
        let directions = |spec: &str| {
            let (policy, warnings) = accepted(policy_from(&policy_with(spec)));
            (policy.ingress, policy.egress, warnings)
        };
        // No policyTypes, no rules: Ingress isolated, nothing allowed.
        assert_eq!(
            directions("  podSelector: {}\n"),
            (Some(vec![]), None, vec![])
        );
        // No policyTypes, egress rules: both; `egress: []` is no section.
        let all = PolicyRule {
            peers: Peers::All,
            ports: Ports::All,
        };
        assert_eq!(
            directions("  podSelector: {}\n  egress: [{}]\n"),
            (Some(vec![]), Some(vec![all.clone()]), vec![])
        );
        assert_eq!(
            directions("  podSelector: {}\n  policyTypes: []\n  egress: []\n"),
            (Some(vec![]), None, vec![])
        );
        // Absent spec and absent podSelector: the whole namespace.
        let (bare, _) = accepted(policy_from(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\n",
        ));
        assert!(bare.pod_selector.is_empty());
        assert_eq!((bare.ingress, bare.egress), (Some(vec![]), None));
        // Egress only: deny all egress; ingress rules written are ignored.
        let (ingress, egress, warnings) =
            directions("  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n");
        assert_eq!((ingress, egress), (None, Some(vec![])));
        assert_eq!(
            warnings,
            ["spec.ingress: ignored: spec.policyTypes does not include Ingress"]
        );
        // An empty rule and `from: []`: every peer on every port.
        assert_eq!(
            directions("  podSelector: {}\n  ingress: [{}, {from: [], ports: []}]\n"),
            (Some(vec![all.clone(), all]), None, vec![])
        );
    }

    #[test]
    fn peers_ports_and_selectors_take_the_apis_meanings() {
        let spec = r#"  podSelector:
    matchExpressions:
    - {key: tier, operator: In, values: [web, api, web]}
    - {key: canary, operator: DoesNotExist}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: a}}
    - namespaceSelector: {}
      podSelector: {matchLabels: {role: client}}
    - ipBlock: {cidr: 10.1.2.3/16, except: [10.1.9.0/24]}
    ports:
    - port: http
    - {protocol: UDP}
    - {port: 8000, endPort: 8080}
"#;
        let (policy, warnings) = accepted(policy_from(&policy_with(spec)));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            policy.pod_selector.expressions,
            [
                Requirement {
                    key: "tier".into(),
                    operator: Operator::In,
                    values: ["api".to_owned(), "web".to_owned()].into(),
                },
                Requirement {
                    key: "canary".into(),
                    operator: Operator::DoesNotExist,
                    values: BTreeSet::new(),
                },
            ]
        );
        let rules = policy.ingress.unwrap();
        assert_eq!(
            rules[0].peers,
            Peers::Some(vec![
                Peer::Pods {
                    namespaces: NamespaceScope::Selected(selector(&[("team", "a")])),
                    pods: LabelSelector::default(),
                },
                Peer::Pods {
                    namespaces: NamespaceScope::Selected(LabelSelector::default()),
                    pods: selector(&[("role", "client")]),
                },
                // Host bits cleared, as the API reads the CIDR.
                Peer::IpBlock {
                    cidr: "10.1.0.0/16".parse().unwrap(),
                    except: vec!["10.1.9.0/24".parse().unwrap()],
                },
            ])
        );
        assert_eq!(
            rules[0].ports,
            Ports::Some(vec![
                PolicyPort {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Name("http".into())),
                    end_port: None,
                },
                PolicyPort {
                    protocol: Protocol::Udp,
                    port: None,
                    end_port: None,
                },
                PolicyPort {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Number(8000)),
                    end_port: Some(8080),
                },
            ])
        );
        assert_eq!(policy.error, None);
    }

    #[test]
    fn ipv6_blocks_and_sctp_ports_are_dropped_and_match_nothing() {
        let spec = r#"  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock: {cidr: "fd00::/64", except: ["fd00::/96"]}
    - ipBlock: {cidr: 192.0.2.0/24}
    ports: [{protocol: SCTP, port: 3868}, {port: 80}]
  egress:
  - to: [{ipBlock: {cidr: "2001:db8::/32"}}]
    ports: [{protocol: SCTP}]
"#;
        let (policy, warnings) = accepted(policy_from(&policy_with(spec)));
        assert_eq!(policy.error, None);
        let ingress = &policy.ingress.unwrap()[0];
        assert_eq!(
            ingress.peers,
            Peers::Some(vec![Peer::IpBlock {
                cidr: "192.0.2.0/24".parse().unwrap(),
                except: vec![],
            }])
        );
        assert_eq!(ingress.ports, Ports::Some(vec![tcp(80)]));
        // Everything dropped: an empty list, which matches nothing (never
        // "all", which empty means in the API).
        let egress = &policy.egress.unwrap()[0];
        assert_eq!(egress.peers, Peers::Some(vec![]));
        assert_eq!(egress.ports, Ports::Some(vec![]));
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        assert!(warnings.contains(
            &"spec.ingress[0].from[0].ipBlock: IPv6 fd00::/64 skipped (IPv4 only): it can match no peer"
                .to_owned()
        ));
        assert!(warnings.contains(
            &"spec.egress[0].ports[0]: SCTP is not supported; the traffic it names stays denied"
                .to_owned()
        ));
    }

    /// Every invalid policy is used all the same, isolating what it selects
    /// in the directions it names and allowing nothing.
    #[test]
    fn every_invalid_policy_fails_closed() {
        /// The rules of (ingress, egress) the policy ends up with.
        type Directions = (Option<Vec<PolicyRule>>, Option<Vec<PolicyRule>>);
        let web = "  podSelector: {matchLabels: {app: web}}\n";
        let both: Directions = (Some(vec![]), Some(vec![]));
        let ingress_only: Directions = (Some(vec![]), None);
        let egress_only: Directions = (None, Some(vec![]));
        let cases: Vec<(String, &str, Directions)> = vec![
            (
                format!("{web}  ingress: [{{from: [{{}}]}}]\n"),
                "spec.ingress[0].from[0]: names no peer",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8}}, podSelector: {{}}}}]}}]\n"
                ),
                "spec.ingress[0].from[0]: ipBlock may not be combined",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  egress: [{{to: [{{ipBlock: {{cidr: 10.0.0.0/8}}, namespaceSelector: {{}}}}]}}]\n"
                ),
                "spec.egress[0].to[0]: ipBlock may not be combined",
                both.clone(),
            ),
            (
                format!("{web}  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.1}}}}]}}]\n"),
                "spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.1\" is not a CIDR",
                ingress_only.clone(),
            ),
            (
                format!("{web}  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/33}}}}]}}]\n"),
                "is not a CIDR",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}}}]}}]\n"
                ),
                "spec.ingress[0].from[0].ipBlock.except[0]: 11.0.0.0/16 is not a strict subset of cidr 10.0.0.0/8",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}}}]}}]\n"
                ),
                "is not a strict subset",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [\"fd00::/64\"]}}}}]}}]\n"
                ),
                "is not a strict subset",
                ingress_only.clone(),
            ),
            (
                format!("{web}  ingress: [{{ports: [{{port: 0}}]}}]\n"),
                "spec.ingress[0].ports[0].port: 0 is out of range 1..=65535",
                ingress_only.clone(),
            ),
            (
                format!("{web}  ingress: [{{ports: [{{port: 80}}, {{port: 70000}}]}}]\n"),
                "spec.ingress[0].ports[1].port: 70000 is out of range",
                ingress_only.clone(),
            ),
            (
                format!("{web}  ingress: [{{ports: [{{port: Http_Port}}]}}]\n"),
                "\"Http_Port\" is neither a number nor a port name",
                ingress_only.clone(),
            ),
            (
                format!("{web}  ingress: [{{ports: [{{port: \"80\"}}]}}]\n"),
                "\"80\" is neither a number nor a port name",
                ingress_only.clone(),
            ),
            (
                format!("{web}  ingress: [{{ports: [{{port: http, endPort: 90}}]}}]\n"),
                "spec.ingress[0].ports[0].endPort: not allowed with a named port",
                ingress_only.clone(),
            ),
            (
                format!("{web}  ingress: [{{ports: [{{endPort: 90}}]}}]\n"),
                "spec.ingress[0].ports[0].endPort: not allowed without a port",
                ingress_only.clone(),
            ),
            (
                format!("{web}  ingress: [{{ports: [{{port: 90, endPort: 80}}]}}]\n"),
                "spec.ingress[0].ports[0].endPort: 80 is less than port 90",
                ingress_only.clone(),
            ),
            (
                format!("{web}  ingress: [{{ports: [{{port: 90, endPort: 65536}}]}}]\n"),
                "endPort: 65536 is out of range",
                ingress_only.clone(),
            ),
            (
                format!("{web}  ingress: [{{ports: [{{protocol: ICMP}}]}}]\n"),
                "spec.ingress[0].ports[0]: unknown protocol \"ICMP\"",
                ingress_only.clone(),
            ),
            // An SCTP entry must be valid too before it is refused.
            (
                format!(
                    "{web}  ingress: [{{ports: [{{protocol: SCTP, port: 90, endPort: 80}}]}}]\n"
                ),
                "endPort: 80 is less than port 90",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  ingress: [{{from: [{{podSelector: {{matchExpressions: [{{key: a, operator: In}}]}}}}]}}]\n"
                ),
                "spec.ingress[0].from[0].podSelector.matchExpressions[0].values: In needs at least one",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  ingress: [{{from: [{{namespaceSelector: {{matchExpressions: [{{key: a, operator: NotIn, values: []}}]}}}}]}}]\n"
                ),
                "namespaceSelector.matchExpressions[0].values: NotIn needs at least one",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  ingress: [{{from: [{{podSelector: {{matchExpressions: [{{key: a, operator: Exists, values: [x]}}]}}}}]}}]\n"
                ),
                "matchExpressions[0].values: Exists takes none",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  ingress: [{{from: [{{podSelector: {{matchExpressions: [{{key: a, operator: DoesNotExist, values: [x]}}]}}}}]}}]\n"
                ),
                "DoesNotExist takes none",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  ingress: [{{from: [{{podSelector: {{matchExpressions: [{{key: a, operator: Gt, values: [\"1\"]}}]}}}}]}}]\n"
                ),
                "matchExpressions[0].operator: \"Gt\" is none of",
                ingress_only.clone(),
            ),
            (
                format!(
                    "{web}  ingress: [{{from: [{{podSelector: {{matchExpressions: [{{key: \"\", operator: Exists}}]}}}}]}}]\n"
                ),
                "matchExpressions[0].key: is empty",
                ingress_only.clone(),
            ),
            // policyTypes as given, even when what is wrong is elsewhere.
            (
                format!("{web}  policyTypes: [Egress]\n  egress: [{{ports: [{{port: 0}}]}}]\n"),
                "spec.egress[0].ports[0].port: 0",
                egress_only.clone(),
            ),
            // An invalid rule of a direction not isolated still fails it.
            (
                format!("{web}  policyTypes: [Egress]\n  ingress: [{{ports: [{{port: 0}}]}}]\n"),
                "spec.ingress[0].ports[0].port: 0",
                egress_only,
            ),
            // policyTypes themselves wrong: both directions.
            (
                format!("{web}  policyTypes: [Ingress, Both]\n"),
                "spec.policyTypes[1]: \"Both\" is neither Ingress nor Egress",
                both.clone(),
            ),
            (
                format!("{web}  policyTypes: [Ingress, Egress, Ingress]\n"),
                "spec.policyTypes: may not name more than two types",
                both,
            ),
        ];
        for (spec, reason, (ingress, egress)) in cases {
            let (policy, warnings) = accepted(policy_from(&policy_with(&spec)));
            let error = policy.error.clone().unwrap_or_default();
            assert!(error.contains(reason), "{error:?} lacks {reason:?}");
            let expected = NetworkPolicy {
                key: ("shop".into(), "p".into()),
                pod_selector: selector(&[("app", "web")]),
                ingress,
                egress,
                error: Some(error.clone()),
            };
            assert_eq!(policy, expected, "{reason}");
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert!(warnings[0].contains(&error) && warnings[0].contains("fails closed"));
        }

        // A bad podSelector: every pod of the namespace, not none.
        let (policy, _) = accepted(policy_from(&policy_with(
            "  podSelector: {matchExpressions: [{key: app, operator: In}]}\n  policyTypes: [Egress]\n",
        )));
        assert_eq!(
            policy,
            NetworkPolicy {
                key: ("shop".into(), "p".into()),
                pod_selector: LabelSelector::default(),
                ingress: None,
                egress: Some(vec![]),
                error: Some(
                    "spec.podSelector.matchExpressions[0].values: In needs at least one".into()
                ),
            }
        );
    }

    #[test]
    fn a_policy_without_namespace_or_name_is_rejected() {
        let cases = [
            (
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {}\n",
                "metadata.namespace is missing",
            ),
            (
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: shop}\nspec: {}\n",
                "metadata.name is missing",
            ),
        ];
        for (yaml, reason) in cases {
            let refusal = super::super::convert::Refusal::new(
                super::super::convert::RejectReason::MissingName,
                reason,
            );
            assert_eq!(policy_from(yaml), Conversion::Rejected(refusal));
        }
    }
}
