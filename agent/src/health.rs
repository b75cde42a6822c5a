//! The health and metrics endpoint: /healthz, /readyz, /metrics.

/// Where the endpoint listens unless configured: loopback on the host
/// network, so only the node (and the kubelet's probes) reach it.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9876";
