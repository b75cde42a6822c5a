//! tern: the operator CLI.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match tern_agent::cli::run(tern_agent::cli::Cli::parse()) {
        Ok(out) => {
            print!("{out}");
            if !out.ends_with('\n') {
                println!();
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
