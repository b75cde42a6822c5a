//! `cargo xtask lab`: the lab's commands ([`tern_lab::commands`]), after
//! setup and a release build of the binaries they run.

use anyhow::Result;
use clap::Subcommand;
use tern_lab::commands;

#[derive(Subcommand)]
pub enum LabCommand {
    /// Build, then start nodes with pods and leave them running.
    Up {
        /// Pods per node.
        #[arg(long, default_value_t = 3)]
        pods: usize,
        #[arg(long, default_value_t = 1)]
        nodes: u8,
        /// How pods reach other nodes' pods: overlay or native.
        #[arg(long, default_value = "overlay")]
        routing_mode: String,
    },
    /// Show the running lab: agent status, endpoints, pod-to-pod probes.
    Status,
    /// Remove everything the lab made.
    Down,
    /// Up, prove pod networking with real traffic, print what was proved, down.
    Demo {
        #[arg(long, default_value_t = 3)]
        pods: usize,
    },
    /// Measure CNI ADD and DEL latency (p50/p99) of the real binary over N pods.
    CniLatency {
        #[arg(long, default_value_t = 100)]
        pods: usize,
    },
    /// Load N Services x M backends into a lab agent; report sync time,
    /// agent memory and the kernel memory of the maps.
    Scale {
        #[arg(long, default_value_t = 100_000)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        backends: usize,
    },
    /// (internal) The echo server run inside each pod
    /// ([`commands::SERVE_COMMAND`]).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        name: String,
    },
}

pub fn run(command: LabCommand) -> Result<()> {
    if let LabCommand::Serve { name } = command {
        return commands::serve(&name);
    }
    crate::build::run()?;
    match command {
        LabCommand::Up {
            pods,
            nodes,
            routing_mode,
        } => commands::up(nodes, pods, &routing_mode),
        LabCommand::Status => commands::status(),
        LabCommand::Down => commands::down(),
        LabCommand::Demo { pods } => commands::demo(pods),
        LabCommand::CniLatency { pods } => commands::cni_latency(pods),
        LabCommand::Scale { services, backends } => commands::scale(services, backends),
        LabCommand::Serve { .. } => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    /// The lab starts its echo servers as `<this binary> SERVE_COMMAND
    /// --name <name>`: that must be `lab serve`.
    #[test]
    fn serve_command_is_lab_serve() {
        let args = ["xtask"]
            .into_iter()
            .chain(commands::SERVE_COMMAND)
            .chain(["--name", "pod0"]);
        assert!(matches!(
            Cli::parse_from(args).command,
            Command::Lab { command: LabCommand::Serve { name } } if name == "pod0"
        ));
    }
}
