//! What the agent reports (`tern status`, `/readyz`, `/metrics`, the
//! Service listing), assembled from the snapshots each owner publishes.
//! Reading takes no pipeline's lock: a long Service sync or a busy CNI
//! request never holds up a probe or a scrape.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use tern_api::{
    AgentStatus, EndpointPolicyListing, FrontendStatus, PolicyListing, PolicySummary, Response,
};
use tokio::sync::watch;

use crate::compiler::lb::{FrontendKind, Scope};
use crate::compiler::policy::{self, DirectionPolicy};
use crate::datapath::services::ServedFrontend;
use crate::endpoints::EndpointsStatus;
use crate::metrics::Metrics;
use crate::model::{Cluster, LbAlgorithm};
use crate::policy::PolicyStatus;
use crate::services::ServicesStatus;

/// What the sync loop saw in the source's last snapshot.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    pub services: usize,
    /// This node's pods with their own network, and their addresses;
    /// `None` when the source does not list pods.
    pub pods: Option<(usize, Arc<HashSet<Ipv4Addr>>)>,
}

impl SourceStatus {
    /// `cluster.pods` holds every pod of the cluster; only those on
    /// `node_name` count, since the endpoints checked against them are ours.
    pub fn of(cluster: &Cluster, node_name: &str, source_lists_pods: bool) -> Self {
        SourceStatus {
            services: cluster.services.len(),
            pods: source_lists_pods.then(|| {
                let own: Vec<_> = cluster
                    .pods
                    .values()
                    .filter(|p| !p.host_network && p.node.as_deref() == Some(node_name))
                    .collect();
                let ips = own.iter().flat_map(|p| p.ips.iter().copied()).collect();
                (own.len(), Arc::new(ips))
            }),
        }
    }
}

/// The node's settings, fixed at start.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub node_name: String,
    pub routing_mode: &'static str,
    pub mtu: u32,
    pub bpffs_dir: PathBuf,
    pub socket_lb: bool,
    /// The source's description, and whether it syncs at all.
    pub source: String,
    pub source_syncs: bool,
}

/// The readers' side of every owner's snapshot.
#[derive(Clone)]
pub struct StatusView {
    pub facts: Arc<NodeFacts>,
    pub endpoints: watch::Receiver<EndpointsStatus>,
    pub services: watch::Receiver<ServicesStatus>,
    pub policy: watch::Receiver<PolicyStatus>,
    pub source: watch::Receiver<SourceStatus>,
    pub metrics: Arc<Metrics>,
}

impl StatusView {
    pub fn agent_status(&self) -> AgentStatus {
        let facts = &self.facts;
        let endpoints = self.endpoints.borrow().clone();
        let services = self.services.borrow().clone();
        let source = self.source.borrow().clone();
        let (requests, requests_failed) = self.metrics.cni_request_totals();
        AgentStatus {
            node_name: facts.node_name.clone(),
            pod_cidr: endpoints.pod_cidr.map(|c| c.to_string()),
            mtu: facts.mtu,
            allocated: endpoints.allocated,
            capacity: endpoints.capacity,
            endpoints: endpoints.endpoints,
            ready: endpoints.pod_cidr.is_some(),
            reason: endpoints
                .pod_cidr
                .is_none()
                .then(|| "node has no PodCIDR".to_owned()),
            bpffs_dir: facts.bpffs_dir.display().to_string(),
            requests,
            requests_failed,
            frontends: services.frontends,
            backends: services.backends,
            last_sync: services.last_sync.clone(),
            source: facts.source.clone(),
            last_sync_age_s: services.last_sync_at.map(|at| at.elapsed().as_secs()),
            synced: !facts.source_syncs || services.last_sync_at.is_some(),
            services: source.services,
            pods: source.pods.as_ref().map(|(pods, _)| *pods),
            endpoints_without_pod: source.pods.as_ref().map(|(_, ips)| {
                endpoints
                    .endpoint_ips
                    .iter()
                    .filter(|ip| !ips.contains(ip))
                    .count()
            }),
            policy: self.policy_summary(),
            routing_mode: facts.routing_mode.into(),
            service_path: if facts.socket_lb {
                "socket-lb"
            } else {
                "per-packet"
            }
            .into(),
        }
    }

    fn policy_summary(&self) -> PolicySummary {
        let policy = self.policy.borrow().clone();
        PolicySummary {
            policies: policy.state.policies.len(),
            isolated_pods: policy
                .state
                .endpoints
                .values()
                .filter(|e| e.ingress.isolated || e.egress.isolated)
                .count(),
            entries: policy.entries,
            failed: policy
                .failed
                .iter()
                .map(|(ip, direction, reason)| format!("{ip} {direction:?}: {reason}"))
                .collect(),
            failures_total: policy.failures_total,
            problems: policy.state.problems.clone(),
        }
    }

    /// The policies and this node's pods as policy sees them.
    pub fn policies(&self) -> Response {
        let policy = self.policy.borrow().clone();
        let policies = policy
            .state
            .policies
            .iter()
            .map(|(number, p)| PolicyListing {
                name: p.name.clone(),
                number: *number,
                selects: p.selects.clone(),
                // The CLI reads POLICY_COUNTS and POLICY_DENIALS.
                allowed: 0,
                denied: 0,
                error: p.error.clone(),
            })
            .collect();
        let isolation = |d: &DirectionPolicy| {
            if d.deny_all {
                "deny-all"
            } else if d.isolated {
                "isolated"
            } else {
                "open"
            }
            .to_owned()
        };
        let endpoints = policy
            .state
            .endpoints
            .iter()
            .map(|(ip, e)| EndpointPolicyListing {
                ip: *ip,
                pod: e.pod.as_ref().map(|(ns, name)| format!("{ns}/{name}")),
                identity: e.identity,
                ingress: isolation(&e.ingress),
                egress: isolation(&e.egress),
                entries: e.ingress.allow.len() + e.egress.allow.len(),
            })
            .collect();
        Response::Policies {
            policies,
            endpoints,
        }
    }

    /// What the compiled policy decides for a new connection.
    pub fn explain_policy(
        &self,
        from: Ipv4Addr,
        to: Ipv4Addr,
        protocol: u8,
        port: u16,
    ) -> Response {
        let state = self.policy.borrow().state.clone();
        let explanation = policy::explain(&state, from, to, protocol, port);
        Response::Explained {
            allowed: explanation.allowed(),
            lines: explanation.to_string().lines().map(str::to_owned).collect(),
        }
    }

    /// The Service frontends in the datapath, with their backends. Before
    /// the first sync after a start, what the pinned maps serve, marked
    /// unconfirmed (no Service names: the maps do not keep them).
    pub fn services(&self) -> Response {
        let (state, adopted, synced, left_out) = {
            let services = self.services.borrow();
            (
                services.state.clone(),
                services.adopted.clone(),
                services.last_sync_at.is_some(),
                services.left_out.clone(),
            )
        };
        if !synced && state.frontends.is_empty() {
            return Response::Services {
                frontends: adopted.iter().map(unconfirmed_frontend).collect(),
            };
        }
        let frontends = state
            .frontends
            .iter()
            .map(|(frontend, entry)| {
                let mut flags = Vec::new();
                if let Some(t) = entry.affinity_timeout {
                    flags.push(format!("affinity={t}s"));
                }
                if entry.algorithm != LbAlgorithm::Random {
                    flags.push(entry.algorithm.name().into());
                }
                if entry.external_traffic_local {
                    flags.push("local".into());
                }
                if entry.no_local_backend {
                    flags.push("drop:no-local-backend".into());
                }
                if let Some(reason) = left_out.get(frontend) {
                    flags.push(format!("NOT SERVED: {reason}"));
                }
                FrontendStatus {
                    frontend: format!("{}:{}/{}", frontend.ip, frontend.port, frontend.protocol),
                    kind: match entry.kind {
                        FrontendKind::ClusterIp => "ClusterIP",
                        FrontendKind::NodePort => "NodePort",
                        FrontendKind::LoadBalancer => "LoadBalancer",
                        FrontendKind::ExternalIp => "ExternalIP",
                        FrontendKind::HostPort => "HostPort",
                    }
                    .into(),
                    scope: match frontend.scope {
                        Scope::External => "external",
                        Scope::Internal => "internal",
                    }
                    .into(),
                    service: entry.service.to_string(),
                    port_name: entry.port_name.to_string(),
                    flags,
                    backends: entry
                        .backends
                        .iter()
                        .map(|b| format!("{}:{}", b.ip, b.port))
                        .collect(),
                    algorithm: entry.algorithm.name().into(),
                    weights: entry.weights.to_vec(entry.backends.len()),
                    connections: Vec::new(),
                }
            })
            .collect();
        Response::Services { frontends }
    }
}

/// A frontend the pinned maps serve that no sync has confirmed yet.
fn unconfirmed_frontend(served: &ServedFrontend) -> FrontendStatus {
    use tern_common::service_flags as f;
    let kind = [
        (f::CLUSTER_IP, "ClusterIP"),
        (f::NODE_PORT, "NodePort"),
        (f::LOAD_BALANCER, "LoadBalancer"),
        (f::EXTERNAL_IP, "ExternalIP"),
        (f::HOST_PORT, "HostPort"),
    ]
    .into_iter()
    .find(|(flag, _)| served.flags & flag != 0)
    .map_or("?", |(_, kind)| kind);
    FrontendStatus {
        frontend: served.frontend.clone(),
        kind: kind.into(),
        scope: if served.internal {
            "internal"
        } else {
            "external"
        }
        .into(),
        service: "?".into(),
        port_name: String::new(),
        flags: vec!["unconfirmed: pinned, not synced yet".into()],
        backends: served.backends.clone(),
        algorithm: String::new(),
        weights: Vec::new(),
        connections: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pod;

    fn pod(name: &str, node: Option<&str>, ip: [u8; 4], host_network: bool) -> Arc<Pod> {
        Arc::new(Pod {
            key: ("default".into(), name.into()),
            node: node.map(Into::into),
            ips: vec![Ipv4Addr::from(ip)],
            host_network,
            finished: false,
            labels: Default::default(),
            named_ports: vec![],
        })
    }

    #[test]
    fn only_this_nodes_own_network_pods_count() {
        let mut cluster = Cluster::default();
        for p in [
            pod("here", Some("n1"), [10, 244, 1, 5], false),
            pod("host", Some("n1"), [10, 0, 0, 1], true),
            pod("there", Some("n2"), [10, 244, 2, 5], false),
            pod("pending", None, [10, 244, 1, 6], false),
        ] {
            cluster.pods.insert(p.key.clone(), p);
        }
        let (count, ips) = SourceStatus::of(&cluster, "n1", true)
            .pods
            .unwrap_or_default();
        assert_eq!(count, 1);
        assert_eq!(*ips, HashSet::from([Ipv4Addr::new(10, 244, 1, 5)]));
        assert!(SourceStatus::of(&cluster, "n1", false).pods.is_none());
    }
}
