//! What the agent counts, and its rendering in the Prometheus text format.
//! Event metrics (CNI requests, syncs, source errors) are recorded as they
//! happen; state (Services, backends, endpoints, table entries, datapath
//! counters) is read at scrape time, so it is never stale.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tern_common::events::Direction;
use tern_common::{DropReason, Reason};

use tern_api::AgentStatus;

use crate::compiler::policy::PolicyInfo;
use crate::datapath::Counters;
use crate::sources::Rejection;

/// The policy verdict counters: (reason, direction, verdict).
const POLICY_VERDICTS: [(Reason, &str, &str); 4] = [
    (Reason::PolicyAllowedIngress, "ingress", "allowed"),
    (Reason::PolicyAllowedEgress, "egress", "allowed"),
    (Reason::PolicyDeniedIngress, "ingress", "denied"),
    (Reason::PolicyDeniedEgress, "egress", "denied"),
];

type Labels = Vec<(&'static str, &'static str)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    services: Gauge,
    sync_duration: Histogram,
    source_errors: Counter,
    /// Backend connection counters the recount set right.
    connection_corrections: Counter,
    cni_requests: Family<Labels, Counter>,
    cni_duration: HistogramFamily,
    /// Entry counts of the flow tables, from their last garbage collection
    /// (counting a million-entry map per scrape would cost too much).
    conntrack_entries: Gauge,
    nat_entries: Gauge,
    /// Fill levels of the maps that refuse or evict when full, from the
    /// last count: map -> (entries, capacity).
    map_fill: std::sync::Mutex<BTreeMap<&'static str, (usize, u32)>>,
    /// Flow events read from the ring, by type and verdict.
    flows: Family<Labels, Counter>,
    /// Ring records that were not flow events this agent understands.
    flows_undecoded: Counter,
    /// CNI API requests served and failed, for `tern status`.
    requests: AtomicU64,
    requests_failed: AtomicU64,
    /// Objects the source's last snapshot left out, by (kind, reason);
    /// a pair seen once stays, at 0, so its series does not vanish.
    rejected: std::sync::Mutex<BTreeMap<(&'static str, &'static str), usize>>,
    /// Each time an object is first left out (when it is logged).
    rejections: Family<Labels, Counter>,
    /// Service frontends the last compilation gave to another Service
    /// (or a hostPort), by the loser's frontend kind; same rule as above.
    frontend_conflicts: std::sync::Mutex<BTreeMap<&'static str, usize>>,
    /// Each time a frontend is first lost to another Service.
    frontend_conflicts_total: Family<Labels, Counter>,
    /// ClusterIPs of the last compilation outside the service CIDR.
    outside_service_cidr: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            services: Gauge::default(),
            // 100 µs .. ~3.3 s.
            sync_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            source_errors: Counter::default(),
            connection_corrections: Counter::default(),
            cni_requests: Family::default(),
            // 100 µs .. ~1.6 s: an ADD's agent part is milliseconds.
            cni_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 15))
            }),
            conntrack_entries: Gauge::default(),
            nat_entries: Gauge::default(),
            map_fill: Default::default(),
            flows: Family::default(),
            flows_undecoded: Counter::default(),
            requests: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            rejected: Default::default(),
            rejections: Family::default(),
            frontend_conflicts: Default::default(),
            frontend_conflicts_total: Family::default(),
            outside_service_cidr: Gauge::default(),
        }
    }
}

impl Metrics {
    /// A snapshot of `services` Services is in the datapath.
    pub fn record_sync(&self, services: usize, took: Duration) {
        self.sync_duration.observe(took.as_secs_f64());
        self.services.set(services as i64);
    }

    pub fn record_source_error(&self) {
        self.source_errors.inc();
    }

    /// The objects the source's last snapshot left out.
    pub fn set_rejected(&self, rejected: &[Rejection]) {
        let mut counts = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        counts.values_mut().for_each(|n| *n = 0);
        for r in rejected {
            *counts.entry((r.kind, r.reason.name())).or_default() += 1;
        }
    }

    /// An object newly left out (it is logged once, and counted here once).
    pub fn record_rejection(&self, rejection: &Rejection) {
        self.rejections
            .get_or_create(&vec![
                ("kind", rejection.kind),
                ("reason", rejection.reason.name()),
            ])
            .inc();
    }

    /// How often objects of `kind` were newly rejected for `reason`.
    pub fn rejections_counted(&self, kind: &'static str, reason: &'static str) -> u64 {
        self.rejections
            .get_or_create(&vec![("kind", kind), ("reason", reason)])
            .get()
    }

    /// The frontend conflicts of the last Service compilation, by the
    /// losing frontend's kind.
    pub fn set_frontend_conflicts(&self, kinds: impl Iterator<Item = &'static str>) {
        let mut counts = self
            .frontend_conflicts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        counts.values_mut().for_each(|n| *n = 0);
        for kind in kinds {
            *counts.entry(kind).or_default() += 1;
        }
    }

    pub fn set_cluster_ips_outside_service_cidr(&self, n: usize) {
        self.outside_service_cidr.set(n as i64);
    }

    /// A frontend newly lost to another Service (logged once, counted once).
    pub fn record_frontend_conflict(&self, kind: &'static str) {
        self.frontend_conflicts_total
            .get_or_create(&vec![("kind", kind)])
            .inc();
    }

    /// (kind, reason) -> objects left out of the last snapshot.
    pub fn rejected(&self) -> BTreeMap<(&'static str, &'static str), usize> {
        self.rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn record_connection_corrections(&self, corrected: usize) {
        self.connection_corrections.inc_by(corrected as u64);
    }

    pub fn record_cni_request(&self, op: &'static str, ok: bool, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.requests_failed.fetch_add(1, Ordering::Relaxed);
        }
        let result = if ok { "success" } else { "error" };
        self.cni_requests
            .get_or_create(&vec![("op", op), ("result", result)])
            .inc();
        self.cni_duration
            .get_or_create(&vec![("op", op)])
            .observe(took.as_secs_f64());
    }

    /// (requests served, of which failed) since the agent started.
    pub fn cni_request_totals(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.requests_failed.load(Ordering::Relaxed),
        )
    }

    pub fn set_table_entries(&self, table: &str, entries: usize) {
        let gauge = match table {
            tern_common::maps::CT => &self.conntrack_entries,
            tern_common::maps::NAT => &self.nat_entries,
            _ => return,
        };
        gauge.set(entries as i64);
    }

    /// A map's entries as last counted, against its capacity.
    pub fn set_map_fill(&self, map: &'static str, entries: usize, capacity: u32) {
        self.map_fill
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(map, (entries, capacity));
    }

    pub fn record_flows(&self, kind: &'static str, verdict: &'static str, n: u64) {
        self.flows
            .get_or_create(&vec![("type", kind), ("verdict", verdict)])
            .inc_by(n);
    }

    pub fn record_flow_undecoded(&self) {
        self.flows_undecoded.inc();
    }

    /// The source's rejected objects and the Services' frontend conflicts.
    fn register_rejections(&self, registry: &mut Registry) {
        let rejected: Family<Labels, Gauge> = Family::default();
        for ((kind, reason), n) in self.rejected() {
            rejected
                .get_or_create(&vec![("kind", kind), ("reason", reason)])
                .set(n as i64);
        }
        registry.register(
            "rejected_objects",
            "Objects the source's last snapshot left out (each logged once, with its \
             namespace/name and why), by kind and reason",
            rejected,
        );
        registry.register(
            "object_rejections",
            "Objects left out by the source, counted when each is first left out (and \
             logged), by kind and reason",
            self.rejections.clone(),
        );
        let conflicts: Family<Labels, Gauge> = Family::default();
        for (kind, n) in self
            .frontend_conflicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            conflicts
                .get_or_create(&vec![("kind", *kind)])
                .set(*n as i64);
        }
        registry.register(
            "service_frontend_conflicts",
            "Service frontends (address, port, protocol) another Service also claims and \
             keeps (the oldest wins), in the last compilation, by the loser's frontend kind",
            conflicts,
        );
        registry.register(
            "service_frontend_conflicts_found",
            "Service frontends lost to another Service, counted when each conflict first \
             appears (and is logged), by the loser's frontend kind",
            self.frontend_conflicts_total.clone(),
        );
        registry.register(
            "cluster_ips_outside_service_cidr",
            "ClusterIPs of Services outside the configured service CIDR (served all the same, \
             each logged once)",
            self.outside_service_cidr.clone(),
        );
    }

    /// The Prometheus text exposition of everything: `status` and the
    /// datapath's `counters` as they are now.
    /// `policies`: the policy numbers of the last policy sync, by which
    /// POLICY_COUNTS counts.
    pub fn render(
        &self,
        status: &AgentStatus,
        counters: &Counters,
        policies: &BTreeMap<u32, PolicyInfo>,
    ) -> String {
        let mut registry = Registry::with_prefix("tern");
        let gauge = |value: usize| {
            let g: Gauge = Gauge::default();
            g.set(value as i64);
            g
        };
        registry.register(
            "services",
            "Services in the last snapshot from the source",
            self.services.clone(),
        );
        registry.register(
            "service_frontends",
            "Service frontends (address, port, protocol) in the datapath",
            gauge(status.frontends),
        );
        registry.register(
            "service_backends",
            "Backends of all frontends in the datapath",
            gauge(status.backends),
        );
        registry.register(
            "endpoints",
            "Pod endpoints on this node",
            gauge(status.endpoints),
        );
        registry.register(
            "ipam_allocated",
            "Pod addresses given out of the node's PodCIDR",
            gauge(status.allocated),
        );
        registry.register(
            "conntrack_entries",
            "Entries of the per-packet Service path's connection table",
            self.conntrack_entries.clone(),
        );
        registry.register(
            "nat_entries",
            "Entries of the masquerade table",
            self.nat_entries.clone(),
        );
        registry.register(
            "network_policies",
            "NetworkPolicies in the cluster",
            gauge(status.policy.policies),
        );
        registry.register(
            "policy_isolated_pods",
            "Pods of this node isolated by NetworkPolicy in at least one direction",
            gauge(status.policy.isolated_pods),
        );
        registry.register(
            "policy_map_entries",
            "Allow and ipBlock entries of this node's pods in the policy maps",
            gauge(status.policy.entries),
        );
        registry.register(
            "policy_failed_closed_pods",
            "Pod directions denying everything because their policy could not be programmed",
            gauge(status.policy.failed.len()),
        );
        let failures: Counter = Counter::default();
        failures.inc_by(status.policy.failures_total);
        registry.register(
            "policy_sync_failures",
            "Policy syncs that left a pod failed closed",
            failures,
        );
        let verdicts: Family<Vec<(&'static str, String)>, Counter> = Family::default();
        for (reason, direction, verdict) in POLICY_VERDICTS {
            if let Ok(n) = counters.get(reason) {
                verdicts
                    .get_or_create(&vec![
                        ("direction", direction.to_owned()),
                        ("verdict", verdict.to_owned()),
                    ])
                    .inc_by(n);
            }
        }
        registry.register(
            "policy_verdicts",
            "New connections judged by NetworkPolicy at an isolated pod, by direction and verdict",
            verdicts,
        );
        let allowed: Family<Vec<(&'static str, String)>, Counter> = Family::default();
        let denied: Family<Vec<(&'static str, String)>, Counter> = Family::default();
        for (number, policy) in policies {
            let label = vec![("policy", policy.name.clone())];
            let (yes, no) = counters.policy_verdicts(*number);
            allowed.get_or_create(&label).inc_by(yes);
            denied.get_or_create(&label).inc_by(no);
        }
        registry.register(
            "policy_allowed_connections",
            "New connections a NetworkPolicy allowed on this node",
            allowed,
        );
        registry.register(
            "policy_denied_connections",
            "Connections denied at pods a NetworkPolicy isolates (counted against the first, by number)",
            denied,
        );
        let datapath: Family<Labels, Counter> = Family::default();
        let translations: Counter = Counter::default();
        if let Ok(counters) = counters.all() {
            for (reason, value) in counters {
                datapath
                    .get_or_create(&vec![("reason", reason.name())])
                    .inc_by(value);
                if reason == Reason::SockLbTranslated {
                    translations.inc_by(value);
                }
            }
        }
        // Every reason and direction, zeros included: alerts need the series.
        let counted = counters.drops();
        let drops: Family<Labels, Counter> = Family::default();
        for reason in DropReason::ALL {
            for direction in [Direction::Ingress, Direction::Egress] {
                let value = counted
                    .iter()
                    .find(|(r, d, _)| *r == reason && *d == direction)
                    .map_or(0, |(_, _, n)| *n);
                drops
                    .get_or_create(&vec![
                        ("reason", reason.name()),
                        ("direction", direction.name()),
                    ])
                    .inc_by(value);
            }
        }
        let lost: Counter = Counter::default();
        lost.inc_by(counters.get(Reason::EventsLost).unwrap_or(0));
        let rate_limited: Counter = Counter::default();
        rate_limited.inc_by(counters.get(Reason::EventsRateLimited).unwrap_or(0));
        registry.register(
            "flows",
            "Flow events read from the datapath, by type and verdict",
            self.flows.clone(),
        );
        registry.register(
            "events_lost",
            "Flow events the datapath could not report: the events ring buffer was full",
            lost,
        );
        registry.register(
            "events_rate_limited",
            "Drop events not reported: the CPU's per-second budget was spent (the drops are counted)",
            rate_limited,
        );
        registry.register(
            "flows_undecoded",
            "Records of the events ring this agent could not read as flow events",
            self.flows_undecoded.clone(),
        );
        let fill_entries: Family<Labels, Gauge> = Family::default();
        let fill_capacity: Family<Labels, Gauge> = Family::default();
        let fill_ratio: Family<Labels, Gauge<f64, AtomicU64>> = Family::default();
        for (map, (entries, capacity)) in self
            .map_fill
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let label = vec![("map", *map)];
            fill_entries.get_or_create(&label).set(*entries as i64);
            fill_capacity.get_or_create(&label).set(*capacity as i64);
            fill_ratio
                .get_or_create(&label)
                .set(*entries as f64 / f64::from((*capacity).max(1)));
        }
        registry.register(
            "map_entries",
            "Entries of the maps that refuse or evict when full, as last counted (every 10 s)",
            fill_entries,
        );
        registry.register(
            "map_capacity",
            "Capacity (max entries) of those maps",
            fill_capacity,
        );
        registry.register(
            "map_fill_ratio",
            "Entries / capacity of those maps: at 1 new flows are refused (NAT) or old ones evicted (LRU maps)",
            fill_ratio,
        );
        registry.register(
            "datapath_packets",
            "Packets (or socket calls) by the path the datapath gave them",
            datapath,
        );
        registry.register(
            "drops",
            "Packets dropped or connections refused by the datapath, by reason and direction",
            drops,
        );
        registry.register(
            "socket_lb_translations",
            "Connects and sends to a Service translated at the socket",
            translations,
        );
        registry.register(
            "cni_requests",
            "CNI API requests by operation and result",
            self.cni_requests.clone(),
        );
        registry.register(
            "cni_request_duration_seconds",
            "Time the agent took to serve a CNI API request",
            self.cni_duration.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "Time to bring routes and Service maps to a snapshot from the source",
            self.sync_duration.clone(),
        );
        registry.register(
            "source_errors",
            "Failed list or watch calls to the source (each retried with back-off)",
            self.source_errors.clone(),
        );
        self.register_rejections(&mut registry);
        registry.register(
            "lb_connection_corrections",
            "Backend open-connection counts (least-connection schedulers) the periodic recount found drifted and set right",
            self.connection_corrections.clone(),
        );
        let refused: Family<Vec<(&'static str, String)>, Gauge> = Family::default();
        for (map, n) in &status.last_sync.refused {
            refused
                .get_or_create(&vec![("map", map.clone())])
                .set(*n as i64);
        }
        registry.register(
            "service_sync_refused_entries",
            "Backends and frontends the last Service sync left out because the map named refused them (full)",
            refused,
        );
        let age: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64> =
            Default::default();
        age.set(status.last_sync_age_s.map_or(-1.0, |a| a as f64));
        registry.register(
            "last_sync_age_seconds",
            "Seconds since the last sync from the source (-1: none yet)",
            age,
        );
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::sources::{RejectReason, Rejection};

    fn exposition(metrics: &Metrics) -> String {
        let mut registry = Registry::with_prefix("tern");
        metrics.register_rejections(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn rejections_are_counted_by_kind_and_reason() {
        let metrics = Metrics::default();
        let port = Rejection::new("Service", RejectReason::InvalidPort, "Service a/b: port 0");
        let address = Rejection::new(
            "EndpointSlice",
            RejectReason::InvalidAddress,
            "EndpointSlice a/b-1: endpoints[0]",
        );
        metrics.record_rejection(&port);
        metrics.record_rejection(&address);
        metrics.set_rejected(&[port.clone(), address]);
        metrics.set_frontend_conflicts(["NodePort", "NodePort"].into_iter());
        metrics.record_frontend_conflict("NodePort");
        let text = exposition(&metrics);
        for line in [
            "tern_rejected_objects{kind=\"Service\",reason=\"invalid_port\"} 1",
            "tern_rejected_objects{kind=\"EndpointSlice\",reason=\"invalid_address\"} 1",
            "tern_object_rejections_total{kind=\"Service\",reason=\"invalid_port\"} 1",
            "tern_service_frontend_conflicts{kind=\"NodePort\"} 2",
            "tern_service_frontend_conflicts_found_total{kind=\"NodePort\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // Fixed: the gauge goes to 0 and stays; the counter keeps its count.
        metrics.set_rejected(&[]);
        metrics.set_frontend_conflicts(std::iter::empty());
        let text = exposition(&metrics);
        for line in [
            "tern_rejected_objects{kind=\"Service\",reason=\"invalid_port\"} 0",
            "tern_object_rejections_total{kind=\"Service\",reason=\"invalid_port\"} 1",
            "tern_service_frontend_conflicts{kind=\"NodePort\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
