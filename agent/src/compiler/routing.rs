//! Nodes -> where each remote PodCIDR is reached: the node address a
//! tunnel (overlay) or a route (native routing) points at. The local
//! node's own PodCIDRs are delivered by the datapath directly.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;

use crate::model::Node;

/// A remote node's PodCIDR is reached through that node's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    pub name: String,
    pub node_ip: Ipv4Addr,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingState {
    pub remote: BTreeMap<Ipv4Network, RemoteNode>,
    /// Every node's address (with a PodCIDR or not): traffic to the nodes
    /// is never masqueraded.
    pub node_ips: BTreeSet<Ipv4Addr>,
    /// Nodes (or PodCIDRs) left out, and why: no address, or a PodCIDR
    /// that overlaps one already taken.
    pub problems: Vec<String>,
}

/// `local_name`'s PodCIDRs are this node's own: never routed elsewhere,
/// whatever another node claims.
pub fn compile(
    nodes: &crate::model::Map<String, Arc<Node>>,
    local_name: &str,
    local_cidrs: &[Ipv4Network],
) -> RoutingState {
    let mut state = RoutingState {
        node_ips: nodes.values().filter_map(|n| n.internal_ip).collect(),
        ..RoutingState::default()
    };
    let mut taken: Vec<(Ipv4Network, &str)> =
        local_cidrs.iter().map(|c| (*c, local_name)).collect();
    if let Some(local) = nodes.get(local_name) {
        taken.extend(local.pod_cidrs.iter().map(|c| (*c, local_name)));
    }
    // Name order: on an overlap the same node wins on every node.
    for node in nodes.values().filter(|n| n.name != local_name) {
        if node.pod_cidrs.is_empty() {
            continue; // nothing to route to yet
        }
        let Some(node_ip) = node.internal_ip else {
            state.problems.push(format!(
                "node {}: no InternalIP in status.addresses; its pods are unreachable",
                node.name
            ));
            continue;
        };
        for cidr in &node.pod_cidrs {
            if let Some((_, owner)) = taken.iter().find(|(c, _)| c.overlaps(*cidr)) {
                state.problems.push(format!(
                    "node {}: PodCIDR {cidr} overlaps node {owner}'s; left out",
                    node.name
                ));
                continue;
            }
            taken.push((*cidr, &node.name));
            state.remote.insert(
                *cidr,
                RemoteNode {
                    name: node.name.clone(),
                    node_ip,
                },
            );
        }
    }
    state
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn node(name: &str, ip: Option<&str>, cidrs: &[&str]) -> (String, Arc<Node>) {
        (
            name.into(),
            Arc::new(Node {
                name: name.into(),
                internal_ip: ip.map(|ip| ip.parse().unwrap()),
                pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
                zone: None,
                to_be_deleted: false,
            }),
        )
    }

    #[test]
    fn remote_pod_cidrs_point_at_their_nodes() {
        let nodes = crate::model::Map::from_iter([
            node("n1", Some("10.0.0.1"), &["10.244.1.0/24"]),
            node("n2", Some("10.0.0.2"), &["10.244.2.0/24", "10.245.2.0/24"]),
            node("n3", Some("10.0.0.3"), &[]),
        ]);
        let state = compile(&nodes, "n1", &[]);
        let remote: Vec<(String, Ipv4Addr)> = state
            .remote
            .iter()
            .map(|(cidr, n)| (cidr.to_string(), n.node_ip))
            .collect();
        assert_eq!(
            remote,
            [
                ("10.244.2.0/24".into(), "10.0.0.2".parse().unwrap()),
                ("10.245.2.0/24".into(), "10.0.0.2".parse().unwrap()),
            ]
        );
        assert!(state.problems.is_empty(), "{:?}", state.problems);
        // n3 has no PodCIDR yet, but its address is still a node's.
        assert_eq!(state.node_ips.len(), 3);
    }

    #[test]
    fn overlaps_and_missing_addresses_are_reported_not_routed() {
        let nodes = crate::model::Map::from_iter([
            node("a", Some("10.0.0.9"), &["10.244.1.128/25"]),
            node("b", Some("10.0.0.2"), &["10.244.2.0/24"]),
            node("c", Some("10.0.0.3"), &["10.244.2.0/23"]),
            node("d", None, &["10.244.4.0/24"]),
        ]);
        // The local PodCIDR comes from config; the Node object has none.
        let state = compile(&nodes, "local", &["10.244.1.0/24".parse().unwrap()]);
        assert_eq!(
            state
                .remote
                .keys()
                .map(|c| c.to_string())
                .collect::<Vec<_>>(),
            ["10.244.2.0/24"]
        );
        assert_eq!(state.problems.len(), 3, "{:?}", state.problems);
        assert!(
            state.problems[0].contains("node a: PodCIDR 10.244.1.128/25 overlaps node local's")
        );
        assert!(state.problems[1].contains("node c: PodCIDR 10.244.2.0/23 overlaps node b's"));
        assert!(state.problems[2].contains("node d: no InternalIP"));
    }
}
