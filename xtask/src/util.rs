//! Running commands and finding the workspace.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Human-readable form of a command line, for logs and error messages.
pub fn display(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    let program = cmd.get_program();
    if std::env::var_os("CARGO").as_deref() == Some(program) {
        s.push_str("cargo"); // the toolchain's own cargo, see `cargo()`
    } else {
        s.push_str(&program.to_string_lossy());
    }
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio (output streams to the terminal) and fails
/// when it does not exit with status 0.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or `None` when it cannot be
/// started or fails. For probes ("is X there?").
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` capturing stdout; fails with stderr in the message.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

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
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
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
