//! tern-agent: the per-node half of Tern.
//!
//! Data flows one way: configuration and CNI requests (sources) change the
//! node model (IPAM, endpoints), which is compiled into eBPF map entries and
//! links (datapath).

pub mod cli;
pub mod cni_api;
pub mod compiler;
pub mod config;
pub mod datapath;
pub mod endpoints;
pub mod health;
pub mod host;
pub mod install;
pub mod ipam;
pub mod metrics;
pub mod model;
pub mod node;
pub mod routing;
pub mod services;
pub mod sources;
pub mod sync;
pub mod table;
