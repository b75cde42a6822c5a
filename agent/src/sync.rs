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
use crate::policy::PolicyPipeline;
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
    pub policy: PolicyPipeline,
    /// Published for readers after every snapshot.
    pub source_status: watch::Sender<SourceStatus>,
    /// The source's last snapshot itself, for readers that name things
    /// (flows); shares the snapshot's structure, so it costs O(1).
    pub cluster: watch::Sender<Cluster>,
}

/// Every snapshot from the source (`None`: there is none) and every
/// change of this node's pods' hostPorts drive the pipelines. hostPorts
/// alone are synced only once the source's first snapshot is in (the
/// pinned Service maps are not rewritten from half a picture), or at once
/// when there is no source.
pub async fn run(
    mut snapshots: Option<mpsc::Receiver<LoadReport>>,
    pipelines: Pipelines,
    metrics: Arc<Metrics>,
    source_lists_pods: bool,
) {
    let Pipelines {
        endpoints,
        mut routing,
        mut services,
        mut policy,
        source_status,
        cluster,
    } = pipelines;
    let mut pods = endpoints.subscribe();
    let (mut host_ports, mut local_pods) = {
        let now = pods.borrow_and_update();
        (now.host_ports.clone(), now.local_pods.clone())
    };
    let mut synced = snapshots.is_none();
    services.set_host_ports(host_ports.clone());
    policy.set_local(local_pods.clone());
    if synced {
        // No source: no policies; the pods are all there is to sync.
        policy = match policy.apply(Some(Cluster::default()), None).await {
            Some(policy) => policy,
            None => return gone_policy(),
        };
    }
    if synced && !host_ports.is_empty() {
        services = match services.apply_host_ports(host_ports.clone()).await {
            Some(services) => services,
            None => return gone(),
        };
    }
    // Problems are logged when they first appear, not with every snapshot.
    let mut reported = HashSet::new();
    loop {
        let retry_after = services.retry_after();
        let report = tokio::select! {
            report = next(&mut snapshots) => match report {
                Some(report) => report,
                None => return,
            },
            // The last sync left entries out (a map full): try again
            // with the same inputs, as no new snapshot may come.
            () = tokio::time::sleep(retry_after.unwrap_or_default()), if synced && retry_after.is_some() => {
                services = match services.retry().await {
                    Some(services) => services,
                    None => return gone(),
                };
                continue;
            }
            changed = pods.changed() => {
                if changed.is_err() {
                    return;
                }
                let (now, now_local) = {
                    let now = pods.borrow_and_update();
                    (now.host_ports.clone(), now.local_pods.clone())
                };
                if now_local != local_pods {
                    local_pods = now_local;
                    if synced {
                        policy = match policy.apply(None, Some(local_pods.clone())).await {
                            Some(policy) => policy,
                            None => return gone_policy(),
                        };
                    } else {
                        policy.set_local(local_pods.clone());
                    }
                }
                if now == host_ports {
                    continue;
                }
                host_ports = now;
                if !synced {
                    services.set_host_ports(host_ports.clone());
                    continue;
                }
                services = match services.apply_host_ports(host_ports.clone()).await {
                    Some(services) => services,
                    None => return gone(),
                };
                continue;
            }
        };
        let started = Instant::now();
        reported = report_problems(&report, &reported, &metrics);
        source_status.send_replace(SourceStatus::of(
            &report.cluster,
            routing.node_name(),
            source_lists_pods,
        ));
        cluster.send_replace(report.cluster.clone());
        adopt_pod_cidr(&report.cluster, &endpoints, routing.node_name());
        let local_cidrs = endpoints.pod_cidr().into_iter().collect();
        routing.apply(&report.cluster.nodes, local_cidrs).await;
        policy = match policy.apply(Some(report.cluster.clone()), None).await {
            Some(policy) => policy,
            None => return gone_policy(),
        };
        let count = report.cluster.services.len();
        services = match services.apply(report).await {
            Some(services) => services,
            None => return gone(),
        };
        synced = true;
        metrics.record_sync(count, started.elapsed());
    }
}

/// Logs the snapshot's rejected objects and warnings that were not in
/// the last one (once each, not with every snapshot), counts the newly
/// rejected ones and sets the gauge of those rejected now. Returns what
/// was reported, for the next call.
fn report_problems(
    report: &LoadReport,
    reported: &HashSet<String>,
    metrics: &Metrics,
) -> HashSet<String> {
    for rejection in &report.errors {
        if !reported.contains(&rejection.message) {
            warn!(
                kind = rejection.kind,
                reason = rejection.reason.name(),
                "source: {} (left out)",
                rejection.message
            );
            metrics.record_rejection(rejection);
        }
    }
    for warning in &report.warnings {
        if !reported.contains(warning) {
            warn!("source: {warning}");
        }
    }
    metrics.set_rejected(&report.errors);
    report
        .errors
        .iter()
        .map(|r| r.message.clone())
        .chain(report.warnings.iter().cloned())
        .collect()
}

/// The next snapshot; never, without a source.
async fn next(snapshots: &mut Option<mpsc::Receiver<LoadReport>>) -> Option<LoadReport> {
    match snapshots {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn gone() {
    error!("the Service pipeline is gone; Services are no longer synced");
}

fn gone_policy() {
    error!("the policy pipeline is gone; NetworkPolicies are no longer synced");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{RejectReason, Rejection};

    #[test]
    fn a_rejection_is_counted_once_while_it_lasts() {
        let metrics = Metrics::default();
        let bad = Rejection::new("Service", RejectReason::DuplicatePort, "Service a/b: twice");
        let report = LoadReport {
            errors: vec![bad.clone()],
            ..LoadReport::default()
        };
        let reported = report_problems(&report, &HashSet::new(), &metrics);
        // The same rejection in the next snapshots: not logged or counted again.
        let reported = report_problems(&report, &reported, &metrics);
        let reported = report_problems(&report, &reported, &metrics);
        assert_eq!(reported, HashSet::from([bad.message.clone()]));
        assert_eq!(metrics.rejected()[&("Service", "duplicate_port")], 1);
        assert_eq!(metrics.rejections_counted("Service", "duplicate_port"), 1);
        // Fixed, then broken again: counted again.
        let reported = report_problems(&LoadReport::default(), &reported, &metrics);
        assert_eq!(metrics.rejected()[&("Service", "duplicate_port")], 0);
        report_problems(&report, &reported, &metrics);
        assert_eq!(metrics.rejections_counted("Service", "duplicate_port"), 2);
    }
}
