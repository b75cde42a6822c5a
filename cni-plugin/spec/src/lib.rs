//! tern-cni-spec: the CNI specification (1.1.0 and the older versions it
//! still accepts) as pure data: environment, network configuration, results
//! and errors.
//!
//! `tern-cni` parses its input and writes its answers with it; `tern install-cni`
//! (in the agent) checks the network configuration it installs the same way.

pub mod env;
pub mod error;
mod json;
pub mod netconf;
pub mod result;
pub mod version;

pub use env::{CniEnv, Command};
pub use error::CniError;
pub use netconf::{Bandwidth, IpamConf, NetConf, PortMapping, PortProtocol, requested_version};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::{
    LATEST_VERSION, SUPPORTED_VERSIONS, highest_common, is_supported, supports_check,
    supports_status_gc, version_json,
};
