//! Drives the pipelines from the source: every snapshot first gives this
//! node the PodCIDR its Node object names, then goes to node routing (a
//! Service's remote backends need their routes), then to the services.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tracing::{error, warn};

use crate::config::Source;
use crate::endpoints::EndpointManager;
use crate::metrics::Metrics;
use crate::model::Cluster;
use crate::routing::Routing;
use crate::services::ServicePipeline;
use crate::sources::manifests::{self, DEFAULT_POLL_INTERVAL};
use crate::sources::{LoadReport, kube};
use crate::status::SourceStatus;

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

/// The owners the snapshots drive.
pub struct Pipelines {
    pub endpoints: Arc<EndpointManager>,
    pub routing: Routing,
    pub services: ServicePipeline,
    /// Published for readers after every snapshot.
    pub source_status: watch::Sender<SourceStatus>,
}

pub async fn run(
    mut snapshots: mpsc::Receiver<LoadReport>,
    pipelines: Pipelines,
    metrics: Arc<Metrics>,
    source_lists_pods: bool,
) {
    let Pipelines {
        endpoints,
        mut routing,
        mut services,
        source_status,
    } = pipelines;
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
        source_status.send_replace(SourceStatus::of(&report.cluster, source_lists_pods));
        adopt_pod_cidr(&report.cluster, &endpoints, routing.node_name());
        let local_cidrs = endpoints.pod_cidr().into_iter().collect();
        routing.apply(&report.cluster.nodes, local_cidrs).await;
        let count = report.cluster.services.len();
        services = match services.apply(report).await {
            Some(services) => services,
            None => {
                error!("the Service pipeline is gone; Services are no longer synced");
                return;
            }
        };
        metrics.record_sync(count, started.elapsed());
    }
}

/// The Node object's PodCIDR wins over the configured one, which stays
/// the fallback while the object has none. The endpoint manager holds it;
/// routing reads it from there.
fn adopt_pod_cidr(cluster: &Cluster, endpoints: &EndpointManager, node_name: &str) {
    let Some(cidr) = cluster
        .nodes
        .get(node_name)
        .and_then(|n| n.pod_cidrs.first().copied())
    else {
        return;
    };
    if let Err(e) = endpoints.serve_pod_cidr(cidr) {
        warn!(%cidr, "cannot serve the Node object's PodCIDR: {e:#}");
    }
}
