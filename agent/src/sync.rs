//! Drives the pipelines from the source: every snapshot first gives this
//! node the PodCIDR its Node object names, then goes to node routing (a
//! Service's remote backends need their routes), then to the services.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::warn;

use crate::config::Source;
use crate::metrics::Metrics;
use crate::model::Cluster;
use crate::node::Node;
use crate::routing::Routing;
use crate::services::ServiceSync;
use crate::sources::manifests::{self, DEFAULT_POLL_INTERVAL};
use crate::sources::{LoadReport, kube};

/// Starts the configured source; `None` when there is none.
pub async fn start_source(
    source: &Source,
    node_name: &str,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<mpsc::Receiver<LoadReport>>> {
    // One snapshot in flight: the sources fold what comes meanwhile.
    let (tx, rx) = mpsc::channel(1);
    match source {
        Source::Manifests(dir) => {
            tokio::spawn(manifests::watch(dir.clone(), DEFAULT_POLL_INTERVAL, tx));
        }
        Source::Kube {
            kubeconfig,
            api_server,
        } => {
            let client = kube::client(kubeconfig.as_deref(), api_server.as_deref()).await?;
            let on_error = move || metrics.record_source_error();
            tokio::spawn(kube::watch(client, node_name.to_owned(), tx, on_error));
        }
        Source::None => return Ok(None),
    }
    Ok(Some(rx))
}

pub async fn run(
    mut snapshots: mpsc::Receiver<LoadReport>,
    node: Arc<Mutex<Node>>,
    mut routing: Routing,
    services: ServiceSync,
    metrics: Arc<Metrics>,
    source_lists_pods: bool,
) {
    // Problems are logged when they first appear, not with every snapshot.
    let mut reported = HashSet::new();
    while let Some(report) = snapshots.recv().await {
        let started = Instant::now();
        let now: HashSet<String> = report
            .errors
            .iter()
            .chain(&report.warnings)
            .cloned()
            .collect();
        for problem in now.difference(&reported) {
            warn!("source: {problem}");
        }
        reported = now;
        node.lock()
            .unwrap_or_else(|p| p.into_inner())
            .note_snapshot(&report.cluster, source_lists_pods);
        adopt_pod_cidr(&report.cluster, &node, &mut routing);
        routing.apply(&report.cluster.nodes).await;
        let count = report.cluster.services.len();
        services.apply(report).await;
        metrics.record_sync(count, started.elapsed());
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
