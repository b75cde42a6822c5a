//! Drives the pipelines from the source: every snapshot of the manifest
//! directory goes to node routing first (a Service's remote backends need
//! their routes), then to the services.

use std::path::PathBuf;

use tokio::sync::mpsc;
use tracing::warn;

use crate::routing::Routing;
use crate::services::ServiceSync;
use crate::sources::manifests::{self, DEFAULT_POLL_INTERVAL};

pub async fn run(dir: PathBuf, mut routing: Routing, services: ServiceSync) {
    let (tx, mut rx) = mpsc::channel(1);
    tokio::spawn(manifests::watch(dir, DEFAULT_POLL_INTERVAL, tx));
    while let Some(report) = rx.recv().await {
        for error in &report.errors {
            warn!("manifests: {error}");
        }
        for warning in &report.warnings {
            warn!("manifests: {warning}");
        }
        routing.apply(&report.cluster.nodes).await;
        services.apply(report).await;
    }
}
