//! The node-routing pipeline: Nodes (model) -> routing compiler -> the
//! TUNNEL map (remote PodCIDR -> node: what the eBPF programs encapsulate
//! to in overlay mode, and recognise as another node's pods in native
//! mode) and, in native mode, kernel routes via the nodes for the node's
//! own traffic. Re-run on every snapshot the source hands over, applied
//! only when the compiled result changed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use tracing::{info, warn};

use crate::compiler::routing::{self, RoutingState};
use crate::config::{AgentConfig, RoutingMode};
use crate::datapath::routes::{self, NextHop, RouteStats};
use crate::datapath::tunnel::TunnelMap;
use crate::model::Node;

pub struct Routing {
    node_name: String,
    mode: RoutingMode,
    local_cidrs: Vec<Ipv4Network>,
    cluster_cidr: Option<Ipv4Network>,
    tunnel: TunnelMap,
    /// What was applied last; `None` before the first sync.
    applied: Option<RoutingState>,
}

impl Routing {
    pub fn new(config: &AgentConfig, bpffs_dir: &Path) -> anyhow::Result<Self> {
        Ok(Routing {
            tunnel: TunnelMap::open_pinned(bpffs_dir)?,
            mode: config.routing_mode,
            node_name: config.node_name.clone(),
            local_cidrs: config.pod_cidr.into_iter().collect(),
            cluster_cidr: config.cluster_cidr,
            applied: None,
        })
    }

    /// Brings tunnel entries or routes in line with `nodes`.
    pub async fn apply(&mut self, nodes: &BTreeMap<String, Arc<Node>>) {
        let state = routing::compile(nodes, &self.node_name, &self.local_cidrs);
        if self.applied.as_ref() == Some(&state) {
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
        if self.mode == RoutingMode::Native {
            wanted_routes.extend(remote.iter().map(|(c, ip)| (*c, NextHop::Via(*ip))));
        }
        let mut stats = match self.tunnel.sync(&remote) {
            Ok(stats) => stats,
            Err(e) => {
                warn!("routing: TUNNEL map sync failed: {e:#}");
                RouteStats {
                    errors: 1,
                    ..RouteStats::default()
                }
            }
        };
        match routes::sync(&wanted_routes).await {
            Ok(s) => {
                stats.added += s.added;
                stats.removed += s.removed;
                stats.errors += s.errors;
            }
            Err(e) => {
                warn!("routing: route sync failed: {e:#}");
                stats.errors += 1;
            }
        }
        info!(
            remote_pod_cidrs = remote.len(),
            added = stats.added,
            removed = stats.removed,
            errors = stats.errors,
            "routing synced"
        );
        // A failed sync is retried with the next snapshot.
        self.applied = (stats.errors == 0).then_some(state);
    }
}
