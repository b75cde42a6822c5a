//! `cargo xtask build`: the release binaries of the workspace.

use anyhow::Result;

use tern_lab::host::exec;

use crate::util::{Workspace, cargo};

pub fn run() -> Result<()> {
    crate::setup::run()?;
    release_bins(&Workspace::load()?)
}

/// `cargo build --release --workspace --bins`. The agent's build.rs builds the
/// eBPF object with the nightly (aya-build).
pub fn release_bins(ws: &Workspace) -> Result<()> {
    exec(
        cargo()
            .args(["build", "--release", "--workspace", "--bins"])
            .args(ws.ebpf_exclude()),
    )
}
