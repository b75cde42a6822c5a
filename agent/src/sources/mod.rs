//! Sources turn Kubernetes objects into the model: the manifest directory
//! (standalone mode) reads them, `convert` turns each into the model's
//! plain Rust, shared by every source.

mod convert;
pub mod kube;
pub mod manifests;

pub use convert::*;
