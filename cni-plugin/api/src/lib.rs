//! tern-api: the protocol between `tern-cni` and `tern-agent`, owned by
//! neither binary. The plugin is the client, the agent serves it on its unix
//! socket, and the `tern` CLI asks the same way; all three depend on this
//! crate so both ends always agree.
//!
//! [`protocol`] holds the messages, [`client`] the blocking call the plugin
//! and the CLI make. Both are re-exported at the top.

pub mod client;
pub mod flows;
pub mod protocol;

pub use client::{CallError, call, stream};
pub use protocol::*;
