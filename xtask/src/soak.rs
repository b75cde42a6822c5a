//! `cargo xtask soak`: the churn soak (tests/tests/churn.rs) for as long as
//! asked: pods, Services and agent restarts churning, then every leak check
//! and the agent's memory slope. The test suite runs the same test for 60 s.

use anyhow::Result;
use tern_lab::host::exec;

use crate::util::{Workspace, cargo};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the churn runs.
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
}

pub fn run(args: SoakArgs) -> Result<()> {
    crate::setup::run()?;
    let ws = Workspace::load()?;
    crate::build::release_bins(&ws)?;
    exec(
        cargo()
            .env("TERN_BIN_DIR", ws.target_dir.join("release"))
            .env("TERN_CHURN_SECONDS", (args.minutes * 60).to_string())
            .args([
                "test",
                "-p",
                "tern-tests",
                "--test",
                "churn",
                "--",
                "--nocapture",
            ]),
    )
}
