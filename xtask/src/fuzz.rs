//! `cargo xtask fuzz`: the coverage-guided fuzz targets of `fuzz/`
//! (cargo-fuzz, libFuzzer), one after the other, each for a number of
//! runs or seconds; and the short run `cargo xtask test` makes of each.
//!
//! Each target reads the seeds committed in `fuzz/seeds/<target>` and
//! keeps what it finds in `fuzz/corpus/<target>` (not committed); a crash
//! leaves its input in `fuzz/artifacts/<target>` and fails the command.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tern_lab::host::exec;

use crate::util::{rustup_proxy, workspace_root};

/// Every target, in the order they run.
pub const TARGETS: &[&str] = &["cni_config", "api_protocol", "manifests", "state_files"];

/// The CI smoke: this many runs of each target (a few seconds each here).
const SMOKE_RUNS: u64 = 20_000;

/// A run that takes longer than this on one input is reported as a hang.
const INPUT_TIMEOUT_S: u32 = 10;

#[derive(Args, Debug)]
pub struct FuzzArgs {
    /// Run only this target (cni_config, api_protocol, manifests,
    /// state_files); default: every target.
    #[arg(long)]
    pub target: Option<String>,
    /// Stop each target after this many runs.
    #[arg(long, conflicts_with = "seconds")]
    pub runs: Option<u64>,
    /// Stop each target after this many seconds (default: 60 when neither
    /// --runs nor --seconds is given).
    #[arg(long)]
    pub seconds: Option<u64>,
}

/// How the targets are built: optimized for long runs, or unoptimized
/// for the smoke, which then builds in a fraction of the time (a cold
/// optimized build of the agent in one codegen unit took 14-16 min here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Build {
    Release,
    Dev,
}

/// How long each target runs.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Runs(u64),
    Seconds(u64),
}

/// What one target did.
struct Outcome {
    target: &'static str,
    runs: Option<u64>,
    wall: Duration,
}

pub fn run(args: FuzzArgs) -> Result<()> {
    let targets: Vec<&'static str> = match &args.target {
        None => TARGETS.to_vec(),
        Some(name) => match TARGETS.iter().find(|t| *t == name) {
            Some(t) => vec![*t],
            None => bail!(
                "no fuzz target {name:?}; the targets: {}",
                TARGETS.join(", ")
            ),
        },
    };
    let budget = match (args.runs, args.seconds) {
        (Some(n), _) => Budget::Runs(n),
        (None, Some(s)) => Budget::Seconds(s),
        (None, None) => Budget::Seconds(60),
    };
    crate::setup::fuzz_tools()?;
    fuzz(&targets, budget, Build::Release)
}

/// `cargo xtask test`'s smoke: every target briefly. Setup is done.
pub fn smoke() -> Result<()> {
    fuzz(TARGETS, Budget::Runs(SMOKE_RUNS), Build::Dev)
}

fn fuzz(targets: &[&'static str], budget: Budget, build: Build) -> Result<()> {
    let started = Instant::now();
    exec(&mut cargo_fuzz("build", build))?;
    let built = started.elapsed();
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_target(target, budget, build)?);
    }
    eprintln!("fuzzing done (build {:.0} s):", built.as_secs_f64());
    for o in &outcomes {
        let runs = o
            .runs
            .map_or_else(|| "? runs".to_owned(), |n| format!("{n} runs"));
        eprintln!("  {:<13} {runs} in {:.1} s", o.target, o.wall.as_secs_f64());
    }
    eprintln!("  total {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// `cargo +nightly fuzz` with the options every call shares: overflow
/// checks and debug assertions on; no sanitizer (the targets run safe
/// Rust, and without one they run several times faster). `build` builds
/// every target at once (one build of the crates they share).
fn cargo_fuzz(subcommand: &str, build: Build) -> std::process::Command {
    let mut cmd = rustup_proxy("cargo");
    cmd.current_dir(workspace_root())
        .args(["+nightly", "fuzz", subcommand])
        .args(["--fuzz-dir", "fuzz", "--debug-assertions"])
        .arg(match build {
            Build::Release => "--release",
            Build::Dev => "--dev",
        })
        .args(["--sanitizer", "none"]);
    cmd
}

fn run_target(target: &'static str, budget: Budget, build: Build) -> Result<Outcome> {
    let corpus = fuzz_dir().join("corpus").join(target);
    let seeds = fuzz_dir().join("seeds").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let limit = match budget {
        Budget::Runs(n) => format!("-runs={n}"),
        Budget::Seconds(s) => format!("-max_total_time={s}"),
    };
    // Where state_files writes its state files, removed after the run.
    let state_dir = std::env::temp_dir().join(format!("tern-fuzz-state-{}", std::process::id()));
    let mut cmd = cargo_fuzz("run", build);
    cmd.env("TERN_FUZZ_STATE_DIR", &state_dir);
    // New inputs go to the first directory; the seeds are only read.
    cmd.arg(target).arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    // One process (no -jobs: libFuzzer would write its output to fuzz-0.log).
    cmd.args(["--", "-print_final_stats=1"])
        .arg(limit)
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .stderr(Stdio::piped());
    eprintln!("fuzz {target} ({budget:?})");
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let mut runs = None;
    if let Some(stderr) = child.stderr.take() {
        let mut out = std::io::stderr().lock();
        for line in BufReader::new(stderr).lines() {
            let line = line.context("reading libFuzzer's output")?;
            if let Some(n) = executed_units(&line) {
                runs = Some(n);
            }
            // One line per new input is noise here; progress (pulse),
            // the final stats and any crash are kept.
            let new_input =
                line.starts_with('#') && (line.contains(" NEW ") || line.contains(" REDUCE "));
            if !new_input {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    let wall = started.elapsed();
    let _ = std::fs::remove_dir_all(&state_dir);
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}): the crashing input is in {}",
            artifacts(target).display()
        );
    }
    Ok(Outcome { target, runs, wall })
}

fn artifacts(target: &str) -> PathBuf {
    fuzz_dir().join("artifacts").join(target)
}

/// `stat::number_of_executed_units: 20000` (from -print_final_stats=1).
fn executed_units(line: &str) -> Option<u64> {
    line.strip_prefix("stat::number_of_executed_units:")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_final_run_count() {
        assert_eq!(
            executed_units("stat::number_of_executed_units: 1000000"),
            Some(1_000_000)
        );
        assert_eq!(executed_units("#1000 pulse cov: 12"), None);
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        let dir = fuzz_dir();
        assert!(dir.join("Cargo.toml").is_file());
        for target in TARGETS {
            assert!(
                dir.join("fuzz_targets")
                    .join(format!("{target}.rs"))
                    .is_file(),
                "{target}"
            );
            assert!(dir.join("seeds").join(target).is_dir(), "{target}");
        }
    }
}
