//! Root integration tests' support: network namespaces, the lab (a cluster
//! made of namespaces running the real binaries) and real traffic.

pub mod apiserver;
pub mod lab;
pub mod netns;
pub mod traffic;
