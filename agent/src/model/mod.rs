//! The cluster as Tern sees it: plain Rust, no Kubernetes types. Sources
//! build it; compilers read it.

mod endpoint_slice;
mod host_port;
mod namespace;
mod network_policy;
mod node;
mod pod;
mod service;

use std::sync::Arc;

pub use endpoint_slice::{
    Endpoint, EndpointPort, EndpointSlice, PodName, RareEndpointFields, SliceKey, TopologyHints,
};
pub use host_port::HostPort;
pub use namespace::Namespace;
pub use network_policy::{
    LabelSelector, Labels, NAMESPACE_NAME_LABEL, NamespaceScope, NetworkPolicy, Operator, Peer,
    Peers, PolicyPort, PolicyRule, PortRef, Ports, Requirement,
};
pub use node::Node;
pub use pod::{NamedPort, Pod};
pub use service::{
    LbAlgorithm, LbWeights, Protocol, RareServiceFields, Service, ServiceKey, ServicePort,
    ServiceType, TargetPort, TrafficPolicy,
};

/// An ordered map whose clones share structure: a snapshot of the source's
/// store is a copy of its root, and a changed object copies only its path.
pub type Map<K, V> = imbl::OrdMap<K, V>;

/// Objects are shared (`Arc`) with the source that read them, and the maps
/// with the source's store, so handing a new snapshot over costs O(1), not
/// a copy of every object or entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    pub services: Map<ServiceKey, Arc<Service>>,
    /// Keyed by the slice's (namespace, name).
    pub slices: Map<SliceKey, Arc<EndpointSlice>>,
    /// Keyed by the node's name.
    pub nodes: Map<String, Arc<Node>>,
    /// Keyed by name.
    pub namespaces: Map<String, Arc<Namespace>>,
    /// Every pod of the cluster, keyed by (namespace, name).
    pub pods: Map<(String, String), Arc<Pod>>,
    /// Keyed by (namespace, name).
    pub network_policies: Map<(String, String), Arc<NetworkPolicy>>,
}

/// Rarely set fields (`RareEndpointFields`, `RareServiceFields`, LbSync's
/// per-frontend record) boxed only when something is set, so that an object without any compares
/// equal however it was built.
pub fn boxed_if_set<T: Default + PartialEq>(rare: T) -> Option<Box<T>> {
    (rare != T::default()).then(|| Box::new(rare))
}

impl Cluster {
    /// The slices that belong to `service`, in key order. A slice names its
    /// Service by label and lives in the Service's namespace.
    pub fn slices_of<'a>(
        &'a self,
        service: &'a ServiceKey,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        let namespace = (service.namespace.clone(), Arc::from(""));
        self.slices
            .range(namespace..)
            .take_while(|((ns, _), _)| **ns == *service.namespace)
            .map(|(_, slice)| &**slice)
            .filter(move |slice| slice.service == *service)
    }

    /// A namespace's labels; a namespace the source has no object for
    /// still has its name label (the API server always sets it).
    pub fn namespace_labels(&self, name: &str) -> Labels {
        match self.namespaces.get(name) {
            Some(namespace) => namespace.labels.clone(),
            None => Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned())]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(namespace: &str, name: &str, service: &str) -> EndpointSlice {
        EndpointSlice {
            key: (namespace.into(), name.into()),
            service: ServiceKey::new(namespace, service),
            ports: None,
            endpoints: vec![],
        }
    }

    #[test]
    fn slices_of_finds_only_that_services_slices() {
        let mut cluster = Cluster::default();
        for s in [
            slice("a", "web-1", "web"),
            slice("a", "web-2", "web"),
            slice("a", "db-1", "db"),
            slice("b", "web-1", "web"),
        ] {
            cluster.slices.insert(s.key.clone(), Arc::new(s));
        }
        let web = ServiceKey::new("a", "web");
        let names: Vec<&str> = cluster.slices_of(&web).map(|s| &*s.key.1).collect();
        assert_eq!(names, ["web-1", "web-2"]);
        assert_eq!(web.to_string(), "a/web");
        assert_eq!(Protocol::Sctp.number(), 132);
    }
}
