//! Names for the addresses in flow events, kept in step with the owners'
//! snapshots: pods cluster-wide (from the source; indexed by address and
//! updated by diff, so a large cluster costs only its changes), this
//! node's endpoints (their pods and network namespace cookies), nodes,
//! Service frontends and NetworkPolicy numbers.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use imbl::ordmap::DiffItem;
use tern_api::flows::Name;
use tokio::sync::watch;

use crate::compiler::lb::{Frontend, LbState, Scope};
use crate::endpoints::EndpointsStatus;
use crate::model::{Cluster, Pod, Protocol};
use crate::policy::PolicyNumbers;
use crate::services::ServicesStatus;

/// The snapshots names come from.
pub struct NameSources {
    pub cluster: watch::Receiver<Cluster>,
    pub endpoints: watch::Receiver<EndpointsStatus>,
    pub services: watch::Receiver<ServicesStatus>,
    pub policies: watch::Receiver<PolicyNumbers>,
}

/// A pod as flows show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName {
    /// "namespace/name".
    pub name: Name,
    pub node: Option<Name>,
}

pub struct Names {
    node_name: Name,
    sources: NameSources,
    /// The cluster the pod index was built from.
    cluster: Cluster,
    pods: HashMap<Ipv4Addr, PodName>,
    nodes: HashMap<Ipv4Addr, Name>,
    /// This node's endpoints: their pods win over the cluster's list.
    local: HashMap<Ipv4Addr, Name>,
    cookies: HashMap<u64, Ipv4Addr>,
    frontends: Arc<LbState>,
    /// The Service of each frontend named so far (of `frontends`).
    service_names: HashMap<Frontend, Option<Name>>,
    policies: PolicyNumbers,
    /// Device names by index; `None`: the device was gone when asked.
    interfaces: HashMap<u32, Option<Name>>,
}

impl Names {
    pub fn new(node_name: &str, sources: NameSources) -> Self {
        let mut names = Names {
            node_name: node_name.into(),
            sources,
            cluster: Cluster::default(),
            pods: HashMap::new(),
            nodes: HashMap::new(),
            local: HashMap::new(),
            cookies: HashMap::new(),
            frontends: Arc::default(),
            service_names: HashMap::new(),
            policies: Arc::default(),
            interfaces: HashMap::new(),
        };
        names.refresh(true);
        names
    }

    /// Takes what changed in the owners' snapshots since the last call.
    pub fn refresh(&mut self, all: bool) {
        if all || self.sources.cluster.has_changed().unwrap_or(false) {
            let cluster = self.sources.cluster.borrow_and_update().clone();
            self.index_pods(&cluster);
            if !cluster.nodes.ptr_eq(&self.cluster.nodes) {
                self.nodes = cluster
                    .nodes
                    .values()
                    .filter_map(|n| Some((n.internal_ip?, n.name.as_str().into())))
                    .collect();
            }
            self.cluster = cluster;
        }
        if all || self.sources.endpoints.has_changed().unwrap_or(false) {
            let endpoints = self.sources.endpoints.borrow_and_update();
            self.local = endpoints
                .local_pods
                .iter()
                .filter_map(|e| {
                    let (namespace, name) = e.pod.as_ref()?;
                    Some((e.ip, format!("{namespace}/{name}").into()))
                })
                .collect();
            self.cookies = endpoints.netns_cookies.iter().copied().collect();
        }
        if all || self.sources.services.has_changed().unwrap_or(false) {
            self.frontends = self.sources.services.borrow_and_update().state.clone();
            self.service_names.clear();
        }
        if all || self.sources.policies.has_changed().unwrap_or(false) {
            self.policies = self.sources.policies.borrow_and_update().clone();
        }
    }

    fn index_pods(&mut self, cluster: &Cluster) {
        if cluster.pods.ptr_eq(&self.cluster.pods) {
            return;
        }
        let index = &mut self.pods;
        for change in self.cluster.pods.diff(&cluster.pods) {
            match change {
                DiffItem::Add(_, pod) => add_pod(index, pod),
                DiffItem::Update { old, new } => {
                    remove_pod(index, old.1);
                    add_pod(index, new.1);
                }
                DiffItem::Remove(_, pod) => remove_pod(index, pod),
            }
        }
    }

    /// The pod with this address: this node's endpoints first.
    pub fn pod(&self, ip: Ipv4Addr) -> Option<PodName> {
        if let Some(name) = self.local.get(&ip) {
            return Some(PodName {
                name: name.clone(),
                node: Some(self.node_name.clone()),
            });
        }
        self.pods.get(&ip).cloned()
    }

    pub fn node(&self, ip: Ipv4Addr) -> Option<Name> {
        self.nodes.get(&ip).cloned()
    }

    /// The address of the pod whose network namespace has this cookie.
    pub fn pod_of_cookie(&self, cookie: u64) -> Option<Ipv4Addr> {
        self.cookies.get(&cookie).copied()
    }

    /// The Service ("namespace/name") of a frontend, either scope.
    pub fn service(&mut self, ip: Ipv4Addr, port: u16, protocol: u8) -> Option<Name> {
        let protocol = match protocol {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            _ => return None,
        };
        let asked = Frontend {
            ip,
            port,
            protocol,
            scope: Scope::Internal,
        };
        if let Some(name) = self.service_names.get(&asked) {
            return name.clone();
        }
        let frontends = &self.frontends.frontends;
        let name = [Scope::Internal, Scope::External]
            .into_iter()
            .find_map(|scope| {
                let frontend = Frontend { scope, ..asked };
                // NodePorts are keyed by port alone (address 0.0.0.0).
                let any = Frontend {
                    ip: Ipv4Addr::UNSPECIFIED,
                    ..frontend
                };
                frontends
                    .get(&frontend)
                    .or_else(|| frontends.get(&any))
                    .map(|entry| Name::from(entry.service.to_string()))
            });
        // Refused connections may ask for any address: bounded as below.
        if self.service_names.len() > 65_536 {
            self.service_names.clear();
        }
        self.service_names.insert(asked, name.clone());
        name
    }

    pub fn policy(&self, number: u32) -> Option<Name> {
        self.policies.get(&number).cloned()
    }

    /// The device's name (asked once per index).
    pub fn interface(&mut self, ifindex: u32) -> Option<Name> {
        if ifindex == 0 {
            return None;
        }
        if let Some(name) = self.interfaces.get(&ifindex) {
            return name.clone();
        }
        let name = nix::net::if_::if_indextoname(ifindex)
            .ok()
            .map(|name| Name::from(name.to_string_lossy()));
        // Pods come and go: a bounded cache, cleared when it grows large.
        if self.interfaces.len() > 65_536 {
            self.interfaces.clear();
        }
        self.interfaces.insert(ifindex, name.clone());
        name
    }
}

fn add_pod(index: &mut HashMap<Ipv4Addr, PodName>, pod: &Pod) {
    if pod.host_network || pod.finished {
        return;
    }
    for ip in &pod.ips {
        index.insert(
            *ip,
            PodName {
                name: format!("{}/{}", pod.key.0, pod.key.1).into(),
                node: pod.node.as_deref().map(Name::from),
            },
        );
    }
}

/// Only its own addresses: another pod may hold one of them by now.
fn remove_pod(index: &mut HashMap<Ipv4Addr, PodName>, pod: &Pod) {
    let name = format!("{}/{}", pod.key.0, pod.key.1);
    for ip in &pod.ips {
        if index.get(ip).is_some_and(|p| *p.name == *name) {
            index.remove(ip);
        }
    }
}
