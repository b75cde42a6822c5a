//! Drives the pipelines from the source: every snapshot of the manifest
//! directory first gives this node the PodCIDR its Node object names,
//! then goes to node routing (a Service's remote backends need their
//! routes), then to the services.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::warn;

use crate::model::Cluster;
use crate::node::Node;
use crate::routing::Routing;
use crate::services::ServiceSync;
use crate::sources::manifests::{self, DEFAULT_POLL_INTERVAL};

pub async fn run(
    dir: PathBuf,
    node: Arc<Mutex<Node>>,
    mut routing: Routing,
    services: ServiceSync,
) {
    let (tx, mut rx) = mpsc::channel(1);
    tokio::spawn(manifests::watch(dir, DEFAULT_POLL_INTERVAL, tx));
    while let Some(report) = rx.recv().await {
        for error in &report.errors {
            warn!("manifests: {error}");
        }
        for warning in &report.warnings {
            warn!("manifests: {warning}");
        }
        adopt_pod_cidr(&report.cluster, &node, &mut routing);
        routing.apply(&report.cluster.nodes).await;
        services.apply(report).await;
    }
}

/// The Node object's PodCIDR wins over the configured one, which stays
/// the fallback while the object has none.
fn adopt_pod_cidr(cluster: &Cluster, node: &Mutex<Node>, routing: &mut Routing) {
    let Some(cidr) = cluster
        .nodes
        .get(routing.node_name())
        .and_then(|n| n.pod_cidrs.first().copied())
    else {
        return;
    };
    let mut node = node.lock().unwrap_or_else(|p| p.into_inner());
    match node.set_pod_cidr(cidr) {
        Ok(true) => routing.set_local_cidrs(vec![cidr]),
        Ok(false) => {}
        Err(e) => warn!(%cidr, "cannot serve the Node object's PodCIDR: {e:#}"),
    }
}
