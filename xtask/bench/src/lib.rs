//! `cargo xtask bench`: Tern against the physical limit and kube-proxy,
//! measured side by side in one run, on lab namespaces.
//!
//! A scenario is a topology (`topology`), a data path and the measures
//! taken (`scenarios`); tools are wrapped in `tools`, kube-proxy's rules
//! are generated in `kube_proxy`, and `report` / `charts` write the results.
//! Ctrl-C or SIGTERM ends a run like an error, cleaning up (`interrupt`).

pub mod charts;
pub mod contention;
pub mod control_plane;
pub mod flow_events;
pub mod interrupt;
pub mod kube_proxy;
pub mod policy;
pub mod report;
pub mod scenarios;
pub mod tools;
pub mod topology;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use tern_lab::host::{apt, output, probe};

use self::report::Results;
use self::scenarios::Profile;

#[derive(Args)]
pub struct BenchArgs {
    /// The CI smoke profile: one short repetition of each scenario, checks
    /// the harness works and asserts no figure.
    #[arg(long)]
    quick: bool,
    /// Where results.json, results.md and the charts go (default:
    /// xtask/results for the full profile, target/bench/quick for the
    /// quick one, target/bench/<profile>-<only> with `--only`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A results.json of an earlier run to compare with.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Only the scenario groups whose name contains this text.
    #[arg(long)]
    only: Option<String>,
    /// Measure nothing: write results.md and the charts again from the
    /// results.json in this directory (after a change of the report).
    #[arg(long, conflicts_with_all = ["quick", "only", "out"])]
    render: Option<PathBuf>,
}

impl BenchArgs {
    /// The CI smoke run, into target/bench/quick.
    pub fn quick() -> BenchArgs {
        BenchArgs {
            quick: true,
            out: None,
            compare: None,
            only: None,
            render: None,
        }
    }

    /// Whether this run measures (and so needs the release binaries).
    pub fn measures(&self) -> bool {
        self.render.is_none()
    }
}

/// A run: every scenario of the profile (or of `--only`), then results.json,
/// results.md and the charts. Needs root and the release binaries of the
/// workspace (`cargo xtask bench` builds them first).
pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(dir) = &args.render {
        let mut results = report::load_json(&dir.join("results.json"))?;
        return write_report(&mut results, dir, args.compare.as_deref());
    }
    // The tools, kube-proxy's rule front ends, and a font for the charts.
    apt(tools::PACKAGES)?;
    apt(&["iptables", "nftables", "fonts-dejavu-core"])?;
    let profile = if args.quick {
        Profile::quick()
    } else {
        Profile::full()
    };
    let started = std::time::Instant::now();
    let mut results = Results {
        date: output(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?
            .trim()
            .to_owned(),
        commit: probe(std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]))
            .unwrap_or_default()
            .trim()
            .to_owned(),
        command: format!(
            "cargo xtask bench{}{}",
            if args.quick { " --quick" } else { "" },
            args.only
                .as_deref()
                .map(|only| format!(" --only {only}"))
                .unwrap_or_default()
        ),
        machine: report::machine_facts(),
        profile: profile.name.into(),
        seconds: None,
        scenarios: Vec::new(),
    };
    // From here on the run creates namespaces, agents and pins: a signal
    // stops it through the same clean-up as an error.
    interrupt::install()?;
    type Scenario = fn(&Profile) -> Result<Vec<report::ScenarioResult>>;
    let all: [(&str, Scenario); 8] = [
        ("pod-to-pod", scenarios::pod_to_pod),
        ("cross-node", scenarios::cross_node),
        ("clusterip", scenarios::cluster_ip),
        ("scale", scenarios::service_scale),
        ("control-plane", control_plane::control_plane),
        ("network-policy", policy::network_policy),
        ("flow-events", flow_events::flow_events),
        ("cni", scenarios::cni),
    ];
    let out = args.out.unwrap_or_else(|| {
        let root = workspace_root();
        match (&args.only, args.quick) {
            // Part of a run never replaces the full run's xtask/results.
            (Some(only), _) => {
                let only: String = only
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                    .collect();
                root.join(format!("target/bench/{}-{only}", profile.name))
            }
            (None, true) => root.join("target/bench/quick"),
            (None, false) => root.join("xtask/results"),
        }
    });
    std::fs::create_dir_all(&out)?;
    // Each group's figures as soon as it is done: a run stopped later (a
    // signal, a failing group) still leaves what it measured.
    let partial = out.join(PARTIAL_RESULTS);
    for (key, scenario) in all {
        if args.only.as_deref().is_some_and(|only| !key.contains(only)) {
            continue;
        }
        interrupt::check()?;
        results
            .scenarios
            .extend(scenario(&profile).with_context(|| format!("scenario {key}"))?);
        report::save_json(&results, &partial)?;
    }
    results.seconds = Some(started.elapsed().as_secs_f64());
    write_report(&mut results, &out, args.compare.as_deref())?;
    match std::fs::remove_file(&partial) {
        // No group ran (an `--only` that names none).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => other.with_context(|| format!("removing {}", partial.display()))?,
    }
    Ok(())
}

/// results.json (with its flags), results.md and the charts of a run, in
/// `out`; `compare`: an earlier run's results.json.
fn write_report(results: &mut Results, out: &Path, compare: Option<&Path>) -> Result<()> {
    let profile = if results.profile == Profile::quick().name {
        Profile::quick()
    } else {
        Profile::full()
    };
    report::flag_spreads(results);
    report::save_json(results, &out.join("results.json"))?;
    let mut markdown = report::markdown(results);
    if profile
        .service_counts
        .iter()
        .any(|&n| n > profile.nftables_max_services)
    {
        markdown.push_str(&format!(
            "\nkube-proxy nftables is not measured above {} Services: `nft -f` takes about half an hour to load 100 000 Services' ruleset on this machine. The iptables rows use the iptables-legacy backend for the same reason (iptables-nft-restore 1.8.9 is as slow).\n",
            profile.nftables_max_services
        ));
    }
    if !report::group_rows(results, policy::GROUP).is_empty() {
        markdown.push_str(&policy::notes());
    }
    if !report::group_rows(results, flow_events::GROUP).is_empty() {
        markdown.push_str(&flow_events::notes());
    }
    if let Some(seconds) = results.seconds {
        markdown.push_str(&format!(
            "\nProfile `{}` took {seconds:.0} s.\n",
            results.profile
        ));
    }
    write_charts(results, out)?;
    if let Some(old) = compare {
        markdown.push_str("\n## Compared with an earlier run\n\n");
        markdown.push_str(&report::compare_markdown(&report::load_json(old)?, results));
    }
    std::fs::write(out.join("results.md"), &markdown)?;
    println!("{markdown}");
    println!("results, charts and raw JSON in {}", out.display());
    Ok(())
}

/// The groups finished so far, in the format of results.json (for
/// `--compare` too); removed when the run completes.
const PARTIAL_RESULTS: &str = "results.partial.json";

/// The workspace root: this crate is xtask/bench.
fn workspace_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn write_charts(results: &Results, out: &std::path::Path) -> Result<()> {
    for (group, metric, stem) in [
        (
            "pod-to-pod, same node",
            "throughput 1 stream",
            "pod-to-pod-throughput",
        ),
        ("pod-to-pod, same node", "TCP RR p50", "pod-to-pod-latency"),
        (
            "pod-to-pod, across nodes",
            "throughput 1 stream",
            "cross-node-throughput",
        ),
        (
            "pod-to-pod, across nodes",
            "TCP RR p50",
            "cross-node-latency",
        ),
        (
            "pod -> ClusterIP -> pod",
            "throughput 1 stream",
            "clusterip-throughput",
        ),
        ("pod -> ClusterIP -> pod", "TCP RR p50", "clusterip-latency"),
        (
            "pod -> ClusterIP -> pod",
            "connections/s c=8",
            "clusterip-connection-rate",
        ),
    ] {
        if !report::group_rows(results, group).is_empty() {
            charts::bar_chart(results, group, metric, out, stem)?;
        }
    }
    if !report::group_rows(results, "service scale").is_empty() {
        charts::scale_chart(
            results,
            "service scale",
            "connection latency c=8 p50",
            "services",
            out,
            "scale-connection-latency",
        )?;
        charts::scale_chart(
            results,
            "service scale",
            "connections/s c=8",
            "services",
            out,
            "scale-connection-rate",
        )?;
    }
    Ok(())
}
