//! Namespaces: defaults for the Services in them.

use super::LbAlgorithm;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    /// The namespace's `tern.io/lb-algorithm` annotation: the choice for
    /// its Services that have none of their own.
    pub lb_algorithm: Option<LbAlgorithm>,
}
