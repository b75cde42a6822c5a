//! tern-agent: the per-node half of Tern.
//!
//! Data flows one way: sources (the API server or a manifest directory)
//! -> model -> pure compilers -> datapath sync -> maps -> eBPF. Each piece
//! of state and each map has one owner that writes it: the endpoint
//! manager (CNI requests: IPAM, endpoints, ENDPOINTS, pod links), node
//! routing (TUNNEL, NON_MASQUERADE, routes), the Service pipeline (the five
//! Service maps), the flow-table GC (CT, NAT), the flow reader (the
//! EVENTS ring). Readers get snapshots (`status`, `flows`).

pub mod cli;
pub mod cni_api;
pub mod compiler;
pub mod config;
pub mod datapath;
pub mod endpoints;
pub mod flows;
pub mod health;
pub mod host;
pub mod install;
pub mod ipam;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod qdiscs;
pub mod routing;
pub mod service_health;
pub mod services;
pub mod sources;
pub mod startup;
pub mod status;
pub mod sync;
pub mod table;
