//! tern-cni: the CNI plugin half of Tern.

pub mod delegate;
pub mod plugin;
