//! `cargo xtask build`: the release binaries of the workspace.

use anyhow::{Context, Result};

use tern_lab::host::exec;

use crate::util::{Workspace, cargo};

pub fn run() -> Result<()> {
    crate::setup::run()?;
    release_bins(&Workspace::load()?)
}

/// `cargo build --release --workspace --bins`. The agent's build.rs builds the
/// eBPF object with the nightly (aya-build). First, the upgrade test's
/// second agent (feature `ebpf-upgrade-probe`: programs that differ) is
/// built and copied to [`UPGRADE_PROBE_DIR`]; the same workspace-wide
/// feature set keeps every other crate shared between the two builds.
pub fn release_bins(ws: &Workspace) -> Result<()> {
    let release = ws.target_dir.join("release");
    exec(
        cargo()
            .args(["build", "--release", "--workspace", "--bin", "tern-agent"])
            .args(["--features", "tern-agent/ebpf-upgrade-probe"])
            .args(ws.ebpf_exclude()),
    )?;
    let probe_dir = release.join(UPGRADE_PROBE_DIR);
    std::fs::create_dir_all(&probe_dir)?;
    // Copy to a new file, then rename: the old copy may be running.
    let staged = probe_dir.join("tern-agent.new");
    std::fs::copy(release.join("tern-agent"), &staged)
        .with_context(|| format!("copying the upgrade-probe agent to {}", staged.display()))?;
    std::fs::rename(&staged, probe_dir.join("tern-agent"))?;
    exec(
        cargo()
            .args(["build", "--release", "--workspace", "--bins"])
            .args(ws.ebpf_exclude()),
    )
}

/// Under target/release: the agent built with `ebpf-upgrade-probe`.
pub const UPGRADE_PROBE_DIR: &str = "upgrade-probe";
