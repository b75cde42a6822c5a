//! Finding the workspace and its toolchain's commands (running them:
//! [`tern_lab::host`]).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use tern_lab::host::output;

/// A `cargo` of the toolchain that runs xtask (stable), for workspace commands.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// The rustup proxy `name` (e.g. `cargo`, `rustc`), so that `+nightly` works.
pub fn rustup_proxy(name: &str) -> Command {
    Command::new(name)
}

pub fn workspace_root() -> &'static Path {
    // xtask/ sits directly under the workspace root.
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// What `cargo metadata --no-deps` says about the workspace.
pub struct Workspace {
    pub members: Vec<String>,
    pub target_dir: PathBuf,
}

impl Workspace {
    pub fn load() -> Result<Self> {
        let json = output(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?;
        let v: serde_json::Value =
            serde_json::from_str(&json).context("cannot parse `cargo metadata` output")?;
        let members = v["packages"]
            .as_array()
            .context("`cargo metadata`: no packages")?
            .iter()
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect();
        let target_dir = PathBuf::from(
            v["target_directory"]
                .as_str()
                .context("`cargo metadata`: no target_directory")?,
        );
        Ok(Self {
            members,
            target_dir,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.members.iter().any(|m| m == name)
    }

    /// `--exclude tern-ebpf` when the eBPF crate is a workspace member: it
    /// only builds for bpfel-unknown-none with the nightly (via the agent's
    /// build.rs), never for the host.
    pub fn ebpf_exclude(&self) -> Vec<&'static OsStr> {
        if self.has("tern-ebpf") {
            vec![OsStr::new("--exclude"), OsStr::new("tern-ebpf")]
        } else {
            Vec::new()
        }
    }
}
