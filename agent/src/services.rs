//! The Service pipeline: model -> lb compiler -> ordered diff (`LbSync`)
//! -> the Service maps, re-run on every snapshot the source hands over.
//! It owns all of that alone — the compiler, the sync state and the five
//! Service maps — and lives in the sync task; readers get
//! `ServicesStatus` snapshots.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_api::SyncCounts;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::compiler::lb::{Frontend, LbCompiler, LbState, NodeContext};
use crate::datapath::services::{LbSync, ServedFrontend, ServiceMaps, SyncStats};
use crate::metrics::Metrics;
use crate::model::{Cluster, HostPort};
use crate::sources::LoadReport;

/// Map writes and deletes of a sync from which on the heap is trimmed.
const TRIM_AFTER_MAP_CHANGES: usize = 1000;

/// A sync that left entries out (a map full) is retried without a new
/// snapshot, after 1 s doubling to 30 s: room may have been made since
/// (another Service deleted), and nothing else would try again.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);

/// What readers see of the Service pipeline, replaced after every sync.
#[derive(Debug, Clone, Default)]
pub struct ServicesStatus {
    /// What the datapath was last told to serve.
    pub state: Arc<LbState>,
    pub frontends: usize,
    pub backends: usize,
    pub last_sync: SyncCounts,
    pub last_sync_at: Option<Instant>,
    /// Frontends of `state` the last sync could not write (a map full),
    /// with the reason.
    pub left_out: Arc<BTreeMap<Frontend, String>>,
    /// What the pinned maps served when the agent started, until the first
    /// sync confirms (or corrects) it.
    pub adopted: Arc<Vec<ServedFrontend>>,
}

pub struct ServicePipeline {
    /// Kept across syncs: it recompiles only the Services that changed.
    compiler: LbCompiler,
    /// The inputs of the last compilation: the source's last snapshot (it
    /// shares its objects, so keeping it costs little) and this node's
    /// pods' hostPorts. Either one changing recompiles with the other.
    cluster: Cluster,
    host_ports: Arc<Vec<HostPort>>,
    sync: LbSync,
    maps: ServiceMaps,
    status: watch::Sender<ServicesStatus>,
    /// Where frontend conflicts and ClusterIPs outside the service CIDR
    /// are counted (none in tests).
    metrics: Option<Arc<Metrics>>,
    /// The conflicts and out-of-CIDR addresses of the last compilation, as
    /// logged: each is logged (and counted) once, when it first appears.
    reported: HashSet<String>,
    /// When to apply the last inputs again: `None` while the maps hold
    /// everything.
    retry_after: Option<Duration>,
}

impl ServicePipeline {
    /// Adopts what the (pinned) maps hold, so the first sync after a
    /// restart writes only what changed.
    pub fn adopt(context: NodeContext, mut maps: ServiceMaps) -> anyhow::Result<Self> {
        let sync = LbSync::adopt(&mut maps)?;
        let status = watch::Sender::new(ServicesStatus {
            frontends: sync.frontends(),
            backends: sync.backends(),
            adopted: Arc::new(sync.served()),
            ..ServicesStatus::default()
        });
        Ok(ServicePipeline {
            compiler: LbCompiler::new(context),
            cluster: Cluster::default(),
            host_ports: Arc::default(),
            sync,
            maps,
            status,
            metrics: None,
            reported: HashSet::new(),
            retry_after: None,
        })
    }

    /// Counts frontend conflicts and ClusterIPs outside the service CIDR
    /// in `metrics`.
    pub fn counted(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn subscribe(&self) -> watch::Receiver<ServicesStatus> {
        self.status.subscribe()
    }

    /// Records this node's hostPorts for the next sync, without one.
    pub fn set_host_ports(&mut self, host_ports: Arc<Vec<HostPort>>) {
        self.host_ports = host_ports;
    }

    /// Compiles the snapshot and brings the Service maps to it, off the
    /// async workers. Takes the report so it is freed (and the heap
    /// trimmed) inside the sync. `None` if the sync task panicked (the
    /// pipeline is then gone).
    pub async fn apply(self, report: LoadReport) -> Option<Self> {
        self.apply_input(Input::Snapshot(report)).await
    }

    /// Recompiles with this node's new set of hostPorts, against the
    /// source's last snapshot (an empty cluster before the first).
    pub async fn apply_host_ports(self, host_ports: Arc<Vec<HostPort>>) -> Option<Self> {
        self.apply_input(Input::HostPorts(host_ports)).await
    }

    /// How long to wait before `retry`, if the last sync left entries out.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Applies the last inputs again, for what the last sync left out.
    pub async fn retry(self) -> Option<Self> {
        self.apply_input(Input::Retry).await
    }

    async fn apply_input(mut self, input: Input) -> Option<Self> {
        let started = Instant::now();
        let applied = tokio::task::spawn_blocking(move || {
            let report = match input {
                Input::Snapshot(report) => {
                    self.cluster = report.cluster.clone();
                    Some(report)
                }
                Input::HostPorts(host_ports) => {
                    self.host_ports = host_ports;
                    None
                }
                Input::Retry => None,
            };
            let outcome = self.apply_now(report);
            (self, outcome)
        })
        .await;
        match applied {
            Ok((pipeline, (services, frontends, stats, rejected, took))) => {
                info!(
                    services,
                    frontends,
                    rejected,
                    writes = stats.writes,
                    deletes = stats.deletes,
                    errors = stats.errors,
                    took_us = started.elapsed().as_micros() as u64,
                    compile_us = took.compile_us,
                    apply_us = took.apply_us,
                    release_us = took.release_us,
                    "services synced"
                );
                Some(pipeline)
            }
            Err(e) => {
                warn!("service sync failed: {e}");
                None
            }
        }
    }

    fn apply_now(
        &mut self,
        report: Option<LoadReport>,
    ) -> (usize, usize, SyncStats, usize, StageTimes) {
        let mut took = StageTimes::default();
        let stage = Instant::now();
        let state = self.compiler.compile(&self.cluster, &self.host_ports);
        self.report(&state);
        let services = self.cluster.services.len();
        let frontends = state.frontends.len();
        took.compile_us = stage.elapsed().as_micros() as u64;
        let stage = Instant::now();
        let stats = self.sync.apply(&mut self.maps, state);
        self.retry_after = (stats.errors > 0).then(|| {
            self.retry_after
                .map_or(FIRST_RETRY, |last| (last * 2).min(LAST_RETRY))
        });
        self.publish_status(&stats);
        took.apply_us = stage.elapsed().as_micros() as u64;
        let stage = Instant::now();
        let rejected = report.as_ref().map_or(0, |r| r.errors.len());
        drop(report);
        // Parsing a large manifest set peaks high; hand the freed memory
        // back to the system instead of keeping it in malloc's lists.
        // Not after small changes: trimming a large heap takes ~10 ms.
        #[cfg(target_env = "gnu")]
        if stats.writes + stats.deletes >= TRIM_AFTER_MAP_CHANGES {
            // SAFETY: malloc_trim only releases free heap memory.
            unsafe { libc::malloc_trim(0) };
        }
        took.release_us = stage.elapsed().as_micros() as u64;
        (services, frontends, stats, rejected, took)
    }

    /// Logs the compilation's frontend conflicts and ClusterIPs outside
    /// the service CIDR that the last one did not have, and counts them.
    fn report(&mut self, state: &LbState) {
        let mut now = HashSet::with_capacity(state.conflicts.len());
        for conflict in &state.conflicts {
            let line = conflict.to_string();
            if !self.reported.contains(&line) {
                warn!(
                    service = %conflict.service,
                    kind = conflict.kind.name(),
                    owner = %conflict.owner,
                    "services: {line}"
                );
                if let Some(metrics) = &self.metrics {
                    metrics.record_frontend_conflict(conflict.kind.name());
                }
            }
            now.insert(line);
        }
        for (service, ip) in &state.outside_service_cidr {
            let line = format!("{service}: ClusterIP {ip} is outside the service CIDR");
            if !self.reported.contains(&line) {
                warn!(%service, %ip, "services: {line} (served all the same)");
            }
            now.insert(line);
        }
        if let Some(metrics) = &self.metrics {
            metrics.set_frontend_conflicts(state.conflicts.iter().map(|c| c.kind.name()));
            metrics.set_cluster_ips_outside_service_cidr(state.outside_service_cidr.len());
        }
        self.reported = now;
    }

    fn publish_status(&self, stats: &SyncStats) {
        self.status.send_modify(|status| {
            status.state = self.sync.state().clone();
            status.frontends = self.sync.frontends();
            status.backends = self.sync.backends();
            status.last_sync_at = Some(Instant::now());
            status.adopted = Arc::default();
            status.left_out = Arc::new(stats.left_out.clone());
            status.last_sync = SyncCounts {
                syncs: status.last_sync.syncs + 1,
                writes: stats.writes as u64,
                deletes: stats.deletes as u64,
                errors: stats.errors as u64,
                refused: stats
                    .refused
                    .iter()
                    .map(|(map, n)| ((*map).to_owned(), *n as u64))
                    .collect(),
            };
        });
    }
}

/// What a sync recompiles for.
enum Input {
    Snapshot(LoadReport),
    HostPorts(Arc<Vec<HostPort>>),
    Retry,
}

/// Where a sync's time went, for the log.
#[derive(Default)]
struct StageTimes {
    compile_us: u64,
    apply_us: u64,
    release_us: u64,
}
