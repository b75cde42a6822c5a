//! Namespaces: defaults for the Services in them, labels for policy.

use super::{Labels, LbAlgorithm};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    /// The namespace's `tern.io/lb-algorithm` annotation: the choice for
    /// its Services that have none of their own.
    pub lb_algorithm: Option<LbAlgorithm>,
    /// Its labels, `kubernetes.io/metadata.name` always among them.
    pub labels: Labels,
}
