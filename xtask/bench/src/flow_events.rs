//! The flow events group: what reporting flow events (`tern observe`)
//! costs the datapath. Pod to pod through a ClusterIP Service (socket-LB,
//! the client in the pods cgroup) on one Tern node, with NetworkPolicies
//! selecting the server that allow the clients on the measured ports, so
//! that every new connection makes a Service translation and an ingress
//! policy verdict, each an event when its kind is on. Three rows, the
//! agent started with:
//! - `--events none` (the baseline),
//! - no `--events` (the default set: drops, policy, service),
//! - `--events drops,policy,service,trace` (trace: every packet at each
//!   observation point, TCP only on SYN, FIN and RST).
//!
//! The flag is read at start, so each repetition of a row restarts the
//! node's agent with the row's flag (pods, pins and the Service and policy
//! state survive a restart) and waits until it has synced the manifests
//! again; the same pods, nginx and servers serve every row, each row with
//! a client pod of its own (see `policy::datapath`). Before and after each
//! repetition the agent's `/metrics` give the flow events it read by type
//! (`tern_flows_total`), those the ring lost (`tern_events_lost_total`)
//! and the connections the server's policy admitted
//! (`tern_policy_verdicts_total`): a repetition fails the run unless the
//! kinds its flag turns on were reported and the others were not, so a
//! row where nothing was reported cannot pass as "events on".

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tern_lab::lab::LabNode;
use tern_lab::netns::Netns;
use tern_lab::traffic::agent_http_get;

use super::contention::{process_cpu_seconds, process_wakeups};
use super::control_plane::single;
use super::interrupt;
use super::policy::{
    AgentLog, FEWEST_SELECTING, Fixture, NAMESPACE, PinnedPolicyMaps, RowClients, load_state,
    synced_state, tern_of,
};
use super::report::ScenarioResult;
use super::scenarios::{
    ALL, Arm, Measures, Profile, VIP, push, row, tern_services, wait_for_frontends,
};
use super::topology::{Tern, Topology};

pub const GROUP: &str = "flow events";

/// Throughput, round trips (TCP and UDP: trace mode reports every UDP
/// packet) and connection rates; keep-alive requests make no event in any
/// mode.
const MEASURES: Measures = Measures {
    keep_alive: false,
    ..ALL
};

/// Frontends of the measured Service (its four ports).
const FRONTENDS: usize = 4;

/// After a restart, before measuring: the agent's start-up work done.
const SETTLE: Duration = Duration::from_secs(1);

/// How long the agent may take to read what the ring still holds after a
/// repetition.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Flow event types as `tern_flows_total` labels them.
const KINDS: [&str; 4] = ["drop", "policy", "service", "trace"];

/// A row: the agent's `--events` (`None`: the flag not given) and the
/// event types each of its repetitions must report (`reported`) or must
/// not (`silent`).
struct Mode {
    name: &'static str,
    events: Option<&'static str>,
    reported: &'static [&'static str],
    silent: &'static [&'static str],
}

const MODES: [Mode; 3] = [
    Mode {
        name: "Tern, events off (--events none)",
        events: Some("none"),
        reported: &[],
        silent: &KINDS,
    },
    Mode {
        name: "Tern, events on (default: drops,policy,service)",
        events: None,
        reported: &["policy", "service"],
        silent: &["trace"],
    },
    Mode {
        name: "Tern, trace on (--events drops,policy,service,trace)",
        events: Some("drops,policy,service,trace"),
        reported: &["policy", "service", "trace"],
        silent: &[],
    },
];

impl Mode {
    fn args(&self) -> Vec<String> {
        self.events
            .map(|e| vec!["--events".to_owned(), e.to_owned()])
            .unwrap_or_default()
    }

    /// Whether one repetition's events are what the flag turns on.
    fn check(&self, got: &Counts) -> Result<()> {
        let flag = self.events.unwrap_or("(default)");
        for kind in self.reported {
            ensure!(
                got.flows(kind) > 0.0,
                "{}: no {kind} events in a repetition with --events {flag} ({} connections admitted): {got:?}",
                self.name,
                got.admitted
            );
        }
        for kind in self.silent {
            ensure!(
                got.flows(kind) == 0.0,
                "{}: {} {kind} events in a repetition with --events {flag}: {got:?}",
                self.name,
                got.flows(kind)
            );
        }
        Ok(())
    }
}

/// The agent's counters a repetition is judged by, from `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    /// `tern_flows_total` by type, in [`KINDS`] order.
    flows: [f64; KINDS.len()],
    /// `tern_events_lost_total`: the ring was full.
    lost: f64,
    /// New connections the server's policy allowed:
    /// `tern_policy_verdicts_total{direction="ingress",verdict="allowed"}`.
    admitted: f64,
}

impl Counts {
    fn parse(text: &str) -> Counts {
        Counts {
            flows: KINDS.map(|kind| sample_sum(text, "tern_flows_total", &[("type", kind)])),
            lost: sample_sum(text, "tern_events_lost_total", &[]),
            admitted: sample_sum(
                text,
                "tern_policy_verdicts_total",
                &[("direction", "ingress"), ("verdict", "allowed")],
            ),
        }
    }

    fn read(node: &LabNode) -> Result<Counts> {
        let (code, body) = agent_http_get(&node.ns, "/metrics")?;
        ensure!(code == 200, "the agent's /metrics answered {code}: {body}");
        Ok(Counts::parse(&body))
    }

    /// Read once the agent has taken what the ring still held (the flow
    /// count stays put).
    fn settled(node: &LabNode) -> Result<Counts> {
        let started = Instant::now();
        let mut last = Counts::read(node)?;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = Counts::read(node)?;
            if now.total() == last.total() {
                return Ok(now);
            }
            ensure!(
                started.elapsed() < DRAIN_LIMIT,
                "the agent was still reading flow events {DRAIN_LIMIT:?} after the repetition"
            );
            last = now;
        }
    }

    fn flows(&self, kind: &str) -> f64 {
        KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0.0, |i| self.flows[i])
    }

    fn total(&self) -> f64 {
        self.flows.iter().sum()
    }

    /// What happened between `before` and `self` (one agent's lifetime:
    /// its own counters start at zero).
    fn since(&self, before: &Counts) -> Counts {
        Counts {
            flows: std::array::from_fn(|i| self.flows[i] - before.flows[i]),
            lost: self.lost - before.lost,
            admitted: self.admitted - before.admitted,
        }
    }
}

/// The sum of the samples of `name` in a Prometheus / OpenMetrics text
/// exposition whose labels include all of `labels` (`&[]`: every sample).
fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, rest) = match line.split_once('{') {
                Some((series, rest)) => {
                    let (labels, value) = rest.split_once('}')?;
                    (series, (labels, value))
                }
                None => {
                    let (series, value) = line.split_once(' ')?;
                    (series, ("", value))
                }
            };
            let (have, value) = rest;
            if series != name {
                return None;
            }
            let pairs: Vec<(&str, &str)> = have
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
                .collect();
            if !labels.iter().all(|want| pairs.contains(want)) {
                return None;
            }
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// Restarts the node's agent with `mode`'s flag and waits until it has
/// synced the fixture and the Service again (the pinned maps checked for
/// every client), then gives its start-up [`SETTLE`].
fn restart(
    tern: &mut Tern,
    mode: &Mode,
    log: &mut AgentLog,
    maps: &PinnedPolicyMaps,
    f: Fixture,
    clients: &[(&str, Ipv4Addr)],
) -> Result<()> {
    *log = AgentLog::from_end(&tern.node);
    tern.node.kill_agent()?;
    tern.node.extra_args = mode.args();
    tern.node.start_agent()?;
    synced_state(tern, log, maps, f, clients)?;
    wait_for_frontends(&tern.node, FRONTENDS)?;
    std::thread::sleep(SETTLE);
    Ok(())
}

/// The whole group: the three rows, interleaved, on one node.
pub fn flow_events(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    eprintln!("bench: {GROUP}: setting up");
    let tern = Tern::with_k8s_pods("10.244.77.0/24", NAMESPACE)?;
    tern_services(&tern, 0, None)?;
    let mut clients = RowClients::add(&tern)?;
    let fixture = Fixture::local(FEWEST_SELECTING);
    let mut log = AgentLog::from_end(&tern.node);
    let maps = PinnedPolicyMaps::open(&tern.node.bpffs_dir)?;
    load_state(&tern, &mut log, &maps, fixture, &clients.addresses, GROUP)?;
    let baseline = MODES[0].name;
    let mut rows: Vec<ScenarioResult> = MODES
        .iter()
        .map(|m| {
            let b = (m.name != baseline).then_some(baseline);
            row(GROUP, m.name, b, &[], vec![])
        })
        .collect();
    let mut totals = vec![RowTotals::default(); MODES.len()];
    let placeholder = row(GROUP, "", None, &[], vec![]);
    // From inside the pods cgroup: socket-LB translates the VIP.
    let mut arm = Arm::new(
        placeholder,
        Topology::Tern(Box::new(tern)),
        VIP,
        true,
        MEASURES,
    );
    let n = profile.repetitions;
    for rep in 1..=n {
        for (i, (mode, r)) in MODES.iter().zip(&mut rows).enumerate() {
            interrupt::check()?;
            let tern = tern_of(&mut arm)?;
            restart(tern, mode, &mut log, &maps, fixture, &clients.addresses)
                .with_context(|| format!("restarting the agent for {}", mode.name))?;
            let pid = tern.node.agent_pid().context("agent pid")?;
            let before = Counts::read(&tern.node)?;
            let agent = AgentUse::read(pid);
            eprintln!("bench: {GROUP}: {} ({rep}/{n})", r.label());
            arm.measure_row(profile, r, clients.of_row(i))?;
            let used = AgentUse::read(pid).since(&agent);
            let tern = tern_of(&mut arm)?;
            let got = Counts::settled(&tern.node)?.since(&before);
            let client = match clients.of_row(i) {
                Some(pod) => &pod.ns,
                None => &tern.client.ns,
            };
            let time_wait = time_wait_sockets(client)?;
            eprintln!(
                "bench: {GROUP}: {}: {got:?}, agent CPU {:.1} %, {:.0} wake-ups/s, client TIME_WAIT {time_wait}",
                r.label(),
                used.cpu_pct(),
                used.wakeups_per_s()
            );
            mode.check(&got)?;
            let metrics = &mut r.metrics;
            push(
                metrics,
                "connections the server's policy admitted",
                "conns",
                true,
                got.admitted,
            );
            push(metrics, "flow events read", "events", false, got.total());
            // Trace events have no such ratio: sockperf's UDP round trips
            // make most of them, whatever the connections.
            for kind in ["service", "policy"] {
                push(
                    metrics,
                    &format!("{kind} events per admitted connection"),
                    "events/conn",
                    true,
                    got.flows(kind) / got.admitted.max(1.0),
                );
            }
            let total = &mut totals[i];
            total.lost += got.lost;
            total.drops += got.flows("drop");
            total.agent.add(&used);
            total.time_wait = total.time_wait.max(time_wait);
        }
    }
    drop(arm);
    for (r, total) in rows.iter_mut().zip(totals) {
        // Over all repetitions: near zero (the baseline), a repetition's
        // figure differs from the next by more than the 2x the report flags,
        // which says nothing of the measures' spread; the same for counts
        // that are 0 in some repetitions and not in others.
        r.metrics.push(single(
            "agent CPU, all repetitions",
            "%",
            total.agent.cpu_pct(),
        ));
        r.metrics.push(single(
            "agent wake-ups, all repetitions",
            "1/s",
            total.agent.wakeups_per_s(),
        ));
        r.metrics.push(single(
            "events lost (ring full), all repetitions",
            "events",
            total.lost,
        ));
        r.metrics.push(single(
            "client TIME_WAIT sockets after a repetition, max",
            "sockets",
            total.time_wait,
        ));
        if total.drops > 0.0 {
            r.metrics.push(single(
                "drop events, all repetitions",
                "events",
                total.drops,
            ));
        }
    }
    Ok(rows)
}

/// What a row's repetitions add up to.
#[derive(Debug, Clone, Copy, Default)]
struct RowTotals {
    /// `tern_events_lost_total`.
    lost: f64,
    /// Drop events (none expected: nothing is dropped).
    drops: f64,
    agent: AgentUse,
    /// The most TIME_WAIT sockets the row's client held after a repetition.
    time_wait: f64,
}

/// TCP sockets in TIME_WAIT in `ns` (`tw` of its /proc/net/sockstat).
fn time_wait_sockets(ns: &Netns) -> Result<f64> {
    let sockstat = ns.sh("cat /proc/net/sockstat")?;
    sockstat_time_wait(&sockstat).with_context(|| format!("no TCP tw in {sockstat:?}"))
}

fn sockstat_time_wait(sockstat: &str) -> Option<f64> {
    let tcp = sockstat.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let fields: Vec<&str> = tcp.split_whitespace().collect();
    fields
        .chunks(2)
        .find(|kv| kv[0] == "tw")?
        .get(1)?
        .parse()
        .ok()
}

/// What the agent process took while a row was measured: CPU time, and
/// how often its threads were woken (the events ring wakes the reader).
#[derive(Debug, Clone, Copy, Default)]
struct AgentUse {
    cpu_s: f64,
    wakeups: f64,
    wall_s: f64,
    /// When read (`None`: a sum of differences).
    at: Option<Instant>,
}

impl AgentUse {
    /// NaN where the process could not be read.
    fn read(pid: u32) -> AgentUse {
        AgentUse {
            cpu_s: process_cpu_seconds(pid).unwrap_or(f64::NAN),
            wakeups: process_wakeups(pid).map_or(f64::NAN, |n| n as f64),
            wall_s: 0.0,
            at: Some(Instant::now()),
        }
    }

    fn since(&self, before: &AgentUse) -> AgentUse {
        let wall_s = match (self.at, before.at) {
            (Some(now), Some(then)) => (now - then).as_secs_f64(),
            _ => f64::NAN,
        };
        AgentUse {
            cpu_s: self.cpu_s - before.cpu_s,
            wakeups: self.wakeups - before.wakeups,
            wall_s,
            at: None,
        }
    }

    fn add(&mut self, other: &AgentUse) {
        self.cpu_s += other.cpu_s;
        self.wakeups += other.wakeups;
        self.wall_s += other.wall_s;
    }

    /// % of one CPU.
    fn cpu_pct(&self) -> f64 {
        self.cpu_s / self.wall_s * 100.0
    }

    fn wakeups_per_s(&self) -> f64 {
        self.wakeups / self.wall_s
    }
}

/// What the table measures, for results.md.
pub fn notes() -> String {
    format!(
        "\nFlow events table:\n\n\
         - **{GROUP}**: pod -> ClusterIP -> pod on one Tern node (socket-LB), with {FEWEST_SELECTING} \
         NetworkPolicies selecting the server that allow the clients on the measured ports, so every \
         new connection makes one Service translation and one ingress policy verdict. The agent's \
         `--events` is read at start: every repetition of a row restarts the node's agent with the \
         row's flag and waits until it has synced the manifests again (pods, pins and maps stay), so \
         every row, the baseline too, measures a freshly started agent; the same server pod, nginx and \
         servers for all rows, a client pod per row. `flow events read`: `tern_flows_total` over the \
         repetition (read after the agent took what the ring still held); `service` / `policy events \
         per admitted connection`: events of that type over the new connections the server's policy \
         allowed (`tern_policy_verdicts_total`: the iperf3, sockperf and wrk connections and UDP flows), \
         1 when every connection is reported (trace events have no such ratio: sockperf's UDP round \
         trips, every packet reported, make most of them). A repetition in which a kind its flag turns \
         on was not reported, or one it leaves off was, fails the run. Over all repetitions of a row: \
         `agent CPU`, the agent's CPU time over the wall time (% of one CPU; the agent drains the events \
         ring and names every flow); `agent wake-ups`, how often its threads blocked and were woken \
         again (voluntary context switches) per second; `events lost (ring full)`, \
         `tern_events_lost_total`; `client TIME_WAIT sockets`, the most the row's client held after a \
         repetition (connections the client closed first; connect() takes 8 192 ports, see the \
         connection rates above).\n"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const EXPOSITION: &str =
        "# HELP tern_flows Flow events read from the datapath, by type and verdict.
# TYPE tern_flows counter
tern_flows_total{type=\"service\",verdict=\"translated\"} 1200
tern_flows_total{type=\"policy\",verdict=\"forwarded\"} 1190
tern_flows_total{type=\"policy\",verdict=\"dropped\"} 10
tern_flows_total{type=\"trace\",verdict=\"forwarded\"} 9000
# HELP tern_events_lost Flow events the datapath could not report.
# TYPE tern_events_lost counter
tern_events_lost_total 7
# TYPE tern_policy_verdicts counter
tern_policy_verdicts_total{direction=\"ingress\",verdict=\"allowed\"} 1190
tern_policy_verdicts_total{direction=\"egress\",verdict=\"allowed\"} 3
tern_policy_verdicts_total{direction=\"ingress\",verdict=\"denied\"} 10
tern_policy_verdicts_total{direction=\"egress\",verdict=\"denied\"} 0
tern_flows_undecoded_total 0
# EOF
";

    #[test]
    fn reads_the_agents_counters() {
        let c = Counts::parse(EXPOSITION);
        assert_eq!(c.flows("service"), 1200.0);
        assert_eq!(c.flows("policy"), 1200.0);
        assert_eq!(c.flows("trace"), 9000.0);
        assert_eq!(c.flows("drop"), 0.0);
        assert_eq!((c.lost, c.admitted), (7.0, 1190.0));
        assert_eq!(c.total(), 11_400.0);
        assert_eq!(sample_sum(EXPOSITION, "tern_flows", &[]), 0.0);
        assert_eq!(
            sample_sum(EXPOSITION, "tern_flows_total", &[("verdict", "dropped")]),
            10.0
        );
        let d = c.since(&Counts::parse(""));
        assert_eq!(d, c);
        assert_eq!(c.since(&c).total(), 0.0);
    }

    #[test]
    fn modes_are_judged_by_what_they_report() {
        let c = Counts::parse(EXPOSITION);
        let [off, on, trace] = &MODES;
        assert!(off.check(&c).is_err());
        assert!(off.check(&Counts::default()).is_ok());
        // Trace events with the default set: not what the flag says.
        assert!(on.check(&c).is_err());
        assert!(trace.check(&c).is_ok());
        let mut no_trace = c;
        no_trace.flows[3] = 0.0;
        assert!(on.check(&no_trace).is_ok());
        assert!(trace.check(&no_trace).is_err());
        assert_eq!(off.args(), ["--events", "none"]);
        assert!(on.args().is_empty());
    }

    #[test]
    fn reads_time_wait_of_sockstat() {
        let sockstat =
            "sockets: used 5\nTCP: inuse 3 orphan 0 tw 8194 alloc 4 mem 1\nUDP: inuse 0 mem 0\n";
        assert_eq!(sockstat_time_wait(sockstat), Some(8194.0));
        assert_eq!(sockstat_time_wait("UDP: inuse 0 mem 0\n"), None);
    }
}
