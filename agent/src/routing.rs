//! The node-routing pipeline: Nodes (model) -> routing compiler -> the
//! TUNNEL map (remote PodCIDR -> node: what the eBPF programs encapsulate
//! to in overlay mode, and recognise as another node's pods in native
//! mode), kernel routes for the node's own traffic (via the nodes in
//! native mode, into the VXLAN device in overlay mode) and, in overlay
//! mode, the VXLAN device's FDB entry per remote node. The same snapshot
//! gives NON_MASQUERADE: the destinations pod traffic keeps its own
//! address for (pod ranges, nodes, and the operator's
//! nonMasqueradeCIDRs). Re-run on every snapshot the source hands over,
//! applied only when the compiled result changed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use tern_common::TunnelEndpoint;
use tracing::{info, warn};

use crate::compiler::routing::{self, RoutingState};
use crate::config::AgentConfig;
use crate::datapath::prefixes::PrefixMap;
use crate::datapath::routes::{self, NextHop, RouteStats};
use crate::datapath::{fdb, ip_to_key};
use crate::model::Node;

pub struct Routing {
    node_name: String,
    /// The VXLAN device's ifindex in overlay mode.
    overlay_ifindex: Option<u32>,
    cluster_cidr: Option<Ipv4Network>,
    /// Kept unmasqueraded whatever the nodes are: the node's own
    /// addresses and the operator's nonMasqueradeCIDRs.
    static_non_masquerade: Vec<Ipv4Network>,
    tunnel: PrefixMap<TunnelEndpoint>,
    non_masquerade: PrefixMap<u8>,
    /// What was applied last, and for which local PodCIDRs; `None` before
    /// the first sync.
    applied: Option<(Vec<Ipv4Network>, RoutingState)>,
}

impl Routing {
    /// Routing owns the TUNNEL and NON_MASQUERADE maps.
    pub fn new(
        config: &AgentConfig,
        node_ips: &[Ipv4Addr],
        overlay_ifindex: Option<u32>,
        tunnel: PrefixMap<TunnelEndpoint>,
        non_masquerade: PrefixMap<u8>,
    ) -> Self {
        let mut static_non_masquerade = config.non_masquerade_cidrs.clone();
        static_non_masquerade.extend(node_ips.iter().map(|ip| Ipv4Network::from(*ip)));
        Routing {
            tunnel,
            non_masquerade,
            static_non_masquerade,
            overlay_ifindex,
            node_name: config.node_name.clone(),
            cluster_cidr: config.cluster_cidr,
            applied: None,
        }
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Brings tunnel entries or routes in line with `nodes`; `local_cidrs`
    /// are the PodCIDRs this node serves (the endpoint manager's).
    pub async fn apply(
        &mut self,
        nodes: &crate::model::Map<String, Arc<Node>>,
        local_cidrs: Vec<Ipv4Network>,
    ) {
        let state = routing::compile(nodes, &self.node_name, &local_cidrs);
        if self
            .applied
            .as_ref()
            .is_some_and(|(cidrs, applied)| *cidrs == local_cidrs && *applied == state)
        {
            return;
        }
        for problem in &state.problems {
            warn!("routing: {problem}");
        }
        let remote: BTreeMap<Ipv4Network, std::net::Ipv4Addr> = state
            .remote
            .iter()
            .map(|(cidr, node)| (*cidr, node.node_ip))
            .collect();
        // The rest of the cluster CIDR is unreachable: a removed node's
        // pods fail at once instead of by the default route.
        let mut wanted_routes: BTreeMap<Ipv4Network, NextHop> = self
            .cluster_cidr
            .map(|cidr| (cidr, NextHop::Unreachable))
            .into_iter()
            .collect();
        wanted_routes.extend(remote.iter().map(|(cidr, ip)| {
            let hop = match self.overlay_ifindex {
                Some(ifindex) => NextHop::Device(ifindex),
                None => NextHop::Via(*ip),
            };
            (*cidr, hop)
        }));
        let tunnel: BTreeMap<Ipv4Network, TunnelEndpoint> = remote
            .iter()
            .map(|(cidr, ip)| {
                let node_addr = ip_to_key(*ip);
                (*cidr, TunnelEndpoint { node_addr })
            })
            .collect();
        let non_masquerade = self.non_masquerade_destinations(&state, &local_cidrs);
        let mut stats = RouteStats::default();
        stats.add("TUNNEL map", self.tunnel.sync(&tunnel));
        stats.add(
            "NON_MASQUERADE map",
            self.non_masquerade.sync(&non_masquerade),
        );
        stats.add("routes", routes::sync(&wanted_routes).await);
        if let Some(ifindex) = self.overlay_ifindex {
            let entries = fdb::wanted(remote.values().copied());
            stats.add("overlay FDB", fdb::sync(ifindex, &entries).await);
        }
        info!(
            remote_pod_cidrs = remote.len(),
            added = stats.added,
            removed = stats.removed,
            errors = stats.errors,
            "routing synced"
        );
        // A failed sync is retried with the next snapshot.
        self.applied = (stats.errors == 0).then_some((local_cidrs, state));
    }

    /// Pod ranges (the cluster CIDR, this node's and every remote
    /// PodCIDR), every node's address, and the static ones.
    fn non_masquerade_destinations(
        &self,
        state: &RoutingState,
        local_cidrs: &[Ipv4Network],
    ) -> BTreeMap<Ipv4Network, u8> {
        self.cluster_cidr
            .iter()
            .chain(local_cidrs)
            .chain(state.remote.keys())
            .chain(&self.static_non_masquerade)
            .copied()
            .chain(state.node_ips.iter().map(|ip| Ipv4Network::from(*ip)))
            .map(|cidr| (cidr, 1))
            .collect()
    }
}
