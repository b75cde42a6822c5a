//! The Kubernetes API source: watchers on the objects Tern reads, folded
//! into one consistent snapshot of the model.

/// Every resource the agent reads from the API, as (API group, resource),
/// each only with `list` and `watch`: the ClusterRole in `manifests/` grants
/// exactly these (a test checks it).
pub const WATCHED_RESOURCES: &[(&str, &str)] = &[
    ("", "nodes"),
    ("", "namespaces"),
    ("", "services"),
    ("", "pods"),
    ("discovery.k8s.io", "endpointslices"),
];
