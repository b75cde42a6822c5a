//! Commands on the host: running them (logged, checked, or probed), and
//! installing the Debian packages the lab and its tools need.

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

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Fails unless this process is root, saying what needed it.
pub fn need_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("need root to {what}: run `cargo xtask setup` as root");
    }
    Ok(())
}

/// Installs the Debian `packages` that are missing (one `apt-get update`
/// first); quick when all are there.
pub fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let status = probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]));
            status.as_deref() != Some("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        println!("ok   apt packages: {}", packages.join(" "));
        return Ok(());
    }
    need_root(&format!("install apt packages {}", missing.join(" ")))?;
    exec(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    println!("did  install apt packages: {}", missing.join(" "));
    Ok(())
}
