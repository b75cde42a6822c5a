//! `cargo xtask <command>`: project tasks that are easier to keep in Rust than
//! in shell scripts. One module per concern; `main` only parses and dispatches.
//!
//! xtask is built by the default (stable) toolchain. Of the project's crates
//! it uses only the host-side lab library (tern-lab) and the benchmark
//! (tern-bench, with tern-common's map types), not the agent, the CNI
//! plugin or the eBPF programs.

mod bench;
mod build;
mod fuzz;
mod lab;
mod setup;
mod soak;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Tern project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what builds and tests need (idempotent; fast when done):
    /// apt packages, bpffs mount, nightly + rust-src, bpf-linker, cargo-fuzz.
    Setup,
    /// Setup, then build the release binaries of the workspace
    /// (the agent's build.rs builds the eBPF object).
    Build,
    /// Setup, then fmt check, clippy, unit tests, a short run of each fuzz
    /// target, release build and the root
    /// integration tests (tern-lab, tern-tests, serially). The README/CI test command.
    Test,
    /// Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of what Tern parses:
    /// each target of fuzz/ in turn, for --runs N or --seconds S (default 60 s).
    Fuzz(fuzz::FuzzArgs),
    /// The churn soak: pods, Services and agent restarts churning for
    /// --minutes (default 30), then the leak checks and the agent's memory.
    Soak(soak::SoakArgs),
    /// Benchmarks: Tern against the physical limit and kube-proxy, side by side.
    Bench(bench::BenchArgs),
    /// The lab: a node made of network namespaces running the real binaries.
    Lab {
        #[command(subcommand)]
        command: lab::LabCommand,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build => build::run(),
        Command::Test => test::run(),
        Command::Lab { command } => lab::run(command),
        Command::Bench(args) => bench::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Soak(args) => soak::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}`: the whole context chain on one line, without the
            // backtrace anyhow would add under RUST_BACKTRACE=1.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
