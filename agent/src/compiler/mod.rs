//! Compilers: model in, plain map-shaped state out. No Kubernetes types and
//! no eBPF here, so everything is unit-testable; the datapath diffs the
//! output into its maps.

pub mod health;
pub mod lb;
pub mod maglev;
pub mod policy;
pub mod routing;
pub mod schedulers;
