//! The NetworkPolicy pipeline: model -> policy compiler -> ordered diff
//! (`PolicySync`) -> the policy maps, re-run when the source's snapshot or
//! this node's pods change. It owns the compiler (its identity numbers),
//! the sync state and the four policy maps, and lives in the sync task;
//! readers get `PolicyStatus` snapshots.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::compiler::policy::{Direction, LocalEndpoint, PolicyCompiler, PolicyState};
use crate::datapath::policy::{PolicyMaps, PolicySync};
use crate::model::Cluster;

/// What readers see of the policy pipeline, replaced after every sync.
#[derive(Debug, Clone, Default)]
pub struct PolicyStatus {
    /// What the datapath was last told to enforce.
    pub state: Arc<PolicyState>,
    /// Allow and ipBlock entries in the maps.
    pub entries: usize,
    /// Pods left denying a direction because their policy could not be
    /// programmed in full (fail closed), with the reason.
    pub failed: Vec<(Ipv4Addr, Direction, String)>,
    /// Syncs that left some pod failed closed, since start.
    pub failures_total: u64,
    pub syncs: u64,
    pub last_sync_at: Option<Instant>,
}

pub struct PolicyPipeline {
    compiler: PolicyCompiler,
    cluster: Cluster,
    local: Arc<Vec<LocalEndpoint>>,
    sync: PolicySync,
    maps: PolicyMaps,
    status: watch::Sender<PolicyStatus>,
    /// Policy numbers -> "namespace/name", published before the maps are
    /// written: the datapath's first verdict under a new policy already
    /// has a name (flow events).
    numbers: watch::Sender<PolicyNumbers>,
}

/// Policy numbers as the datapath counts and reports them, with names.
pub type PolicyNumbers = Arc<std::collections::BTreeMap<u32, tern_api::flows::Name>>;

impl PolicyPipeline {
    /// Adopts what the (pinned) maps hold: until the first sync the
    /// datapath keeps enforcing what the last agent left.
    pub fn adopt(maps: PolicyMaps) -> anyhow::Result<Self> {
        let sync = PolicySync::adopt(&maps)?;
        let status = watch::Sender::new(PolicyStatus {
            entries: sync.entries(),
            ..PolicyStatus::default()
        });
        Ok(PolicyPipeline {
            compiler: PolicyCompiler::adopt(sync.identities()),
            cluster: Cluster::default(),
            local: Arc::default(),
            sync,
            maps,
            status,
            numbers: watch::Sender::new(PolicyNumbers::default()),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<PolicyStatus> {
        self.status.subscribe()
    }

    pub fn subscribe_numbers(&self) -> watch::Receiver<PolicyNumbers> {
        self.numbers.subscribe()
    }

    /// Records this node's pods for the next sync, without one.
    pub fn set_local(&mut self, local: Arc<Vec<LocalEndpoint>>) {
        self.local = local;
    }

    /// Compiles and syncs, off the async workers, with the source's new
    /// snapshot and/or this node's new pods. `None` if the sync task
    /// panicked (the pipeline is then gone).
    pub async fn apply(
        mut self,
        cluster: Option<Cluster>,
        local: Option<Arc<Vec<LocalEndpoint>>>,
    ) -> Option<Self> {
        let mut changed = false;
        if let Some(cluster) = cluster {
            changed |= !same_policy_inputs(&self.cluster, &cluster);
            self.cluster = cluster;
        }
        if let Some(local) = local {
            changed |= local != self.local;
            self.local = local;
        }
        if !changed && self.status.borrow().syncs > 0 {
            // A Service or EndpointSlice changed: nothing policy reads.
            return Some(self);
        }
        let applied = tokio::task::spawn_blocking(move || {
            self.apply_now();
            self
        })
        .await;
        match applied {
            Ok(pipeline) => Some(pipeline),
            Err(e) => {
                warn!("policy sync failed: {e}");
                None
            }
        }
    }

    fn apply_now(&mut self) {
        let started = Instant::now();
        let state = self.compiler.compile(&self.cluster, &self.local);
        let compiled_us = started.elapsed().as_micros() as u64;
        let numbers: std::collections::BTreeMap<u32, tern_api::flows::Name> = state
            .policies
            .iter()
            .map(|(number, policy)| (*number, policy.name.as_str().into()))
            .collect();
        self.numbers.send_if_modified(|published| {
            let changed = **published != numbers;
            if changed {
                *published = Arc::new(numbers);
            }
            changed
        });
        let stats = self.sync.sync(&mut self.maps, &state);
        for (ip, direction, error) in &stats.failed {
            warn!(%ip, ?direction, "policy could not be programmed, the pod denies that way (fail closed): {error}");
        }
        let isolated = state
            .endpoints
            .values()
            .filter(|e| e.ingress.isolated || e.egress.isolated)
            .count();
        info!(
            policies = state.policies.len(),
            identities = state.identities.len(),
            pods = state.endpoints.len(),
            isolated,
            writes = stats.writes,
            deletes = stats.deletes,
            failed = stats.failed.len(),
            compile_us = compiled_us,
            took_us = started.elapsed().as_micros() as u64,
            "policy synced"
        );
        let entries = self.sync.entries();
        self.status.send_modify(|status| {
            status.state = Arc::new(state);
            status.entries = entries;
            if !stats.failed.is_empty() {
                status.failures_total += 1;
            }
            status.failed = stats.failed;
            status.syncs += 1;
            status.last_sync_at = Some(Instant::now());
        });
    }
}

/// Whether two snapshots hold the same pods, namespaces and policies. The
/// maps share structure with the source's store, so an unchanged map is
/// the same tree: a pointer comparison, not a walk of 100 000 pods.
fn same_policy_inputs(a: &Cluster, b: &Cluster) -> bool {
    a.pods.ptr_eq(&b.pods)
        && a.namespaces.ptr_eq(&b.namespaces)
        && a.network_policies.ptr_eq(&b.network_policies)
}
