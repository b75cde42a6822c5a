//! `cargo xtask test`: the project's whole test suite, the command README and
//! CI run. Stops at the first failing step. Tests that cannot run (not root)
//! are counted ([`tern_lab::skip`]) and reported at the end.

use std::path::Path;

use anyhow::{Result, bail};
use tern_lab::host::{exec, is_root};
use tern_lab::skip;

use crate::util::{Workspace, cargo, rustup_proxy, workspace_root};

pub fn run() -> Result<()> {
    crate::setup::run()?;
    let ws = Workspace::load()?;
    let skipped = ws.target_dir.join("tern-skipped.txt");
    if skipped.exists() {
        std::fs::remove_file(&skipped)?;
    }

    exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
    exec(
        cargo()
            .args(["clippy", "--workspace", "--all-targets"])
            .args(ws.ebpf_exclude())
            .args(["--", "-D", "warnings"]),
    )?;
    // The eBPF programs, linted for the target they are built for.
    exec(
        rustup_proxy("cargo")
            .current_dir(workspace_root().join("ebpf-programs"))
            .args([
                "+nightly",
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core", "--bins", "--", "-D", "warnings"]),
    )?;
    // Unit tests: everything but the root integration tests and the lab
    // library's own tests (they need root too).
    exec(
        cargo()
            .env(skip::LOG_ENV, &skipped)
            .args(["test", "--workspace", "--tests"])
            .args(["--exclude", "tern-tests", "--exclude", "tern-lab"])
            .args(ws.ebpf_exclude()),
    )?;
    // The fuzz targets, briefly each (fuzz/, `cargo xtask fuzz`): what they
    // find is a crash of what parses the plugin's and the agent's input.
    crate::fuzz::smoke()?;

    if !is_root() {
        report_skips(&skipped);
        bail!(
            "the integration tests (tern-lab, tern-tests) need root: they create network \
             namespaces, veths and eBPF programs. Run `cargo xtask test` as root."
        );
    }
    crate::build::release_bins(&ws)?;
    let bin_dir = ws.target_dir.join("release");
    // They share the kernel (bpffs pins, namespaces): run them one at a time.
    exec(
        cargo()
            .env("TERN_BIN_DIR", &bin_dir)
            .env(skip::LOG_ENV, &skipped)
            .args([
                "test",
                "-p",
                "tern-lab",
                "-p",
                "tern-tests",
                // No doc tests: the run ends on the integration tests' own summary.
                "--tests",
                "--",
                "--test-threads=1",
            ]),
    )?;
    // The benchmark harness's smoke run: every scenario once, briefly; it
    // checks the harness works and asserts no figure. Setup and the release
    // build are done above.
    tern_bench::run(tern_bench::BenchArgs::quick())?;
    report_skips(&skipped);
    eprintln!("all tests passed");
    Ok(())
}

/// Says how many tests did not run, and which, from the skip log.
fn report_skips(log: &Path) {
    let skipped = skip::read_log(log);
    if !skipped.is_empty() {
        eprintln!("{} test(s) skipped, they did not run:", skipped.len());
        for line in &skipped {
            eprintln!("  {line}");
        }
    }
}
