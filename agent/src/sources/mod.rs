//! Sources turn Kubernetes objects into the model: the API server's
//! watchers (`kube`) or the manifest directory (standalone mode) read
//! them, `convert` turns each into the model's plain Rust, shared by every
//! source. Both hand over whole snapshots: a `LoadReport`.

mod api_errors;
mod backoff;
mod convert;
pub mod kube;
pub mod manifests;
mod network_policy;

pub use convert::*;
pub use network_policy::network_policy;

use crate::model::Cluster;

/// One consistent snapshot of the cluster, with what was left out of it.
#[derive(Debug, Default, PartialEq)]
pub struct LoadReport {
    pub cluster: Cluster,
    /// One per rejected file or object: where it is and why.
    pub errors: Vec<Rejection>,
    /// Objects used with parts left out (SCTP ports, IPv6 addresses).
    pub warnings: Vec<String>,
    /// Objects of other kinds, and ones that belong to another proxy.
    pub ignored: usize,
}
