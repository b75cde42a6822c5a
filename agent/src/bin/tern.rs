//! tern: the operator CLI.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match tern_agent::cli::run(tern_agent::cli::Cli::parse()) {
        Ok(out) => {
            // Streaming commands print as they go and return nothing (their
            // stdout may be closed by now: `| head`).
            if !out.is_empty() {
                print!("{out}");
                if !out.ends_with('\n') {
                    println!();
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
