//! The scenarios: each a topology, a data path and the measures taken, run
//! next to its baseline in the same run with the same CPU pinning.
//!
//! A group's rows are [`Arm`]s, all set up before the first measurement and
//! kept alive to the end: repetition after repetition, the baseline runs
//! once, then every other row once ([`interleave`]), so drift of the
//! machine (a noisy neighbour, thermal state, a background task) falls on
//! all rows alike instead of on whichever ran last.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tern_lab::lab::{LabNode, Pod};
use tern_lab::netns::Netns;

use super::contention::CpuWatch;
use super::interrupt;
use super::kube_proxy::{self, IptablesBackend, KpService, Proto};
use super::report::{Metric, ScenarioResult};
use super::tools;
use super::topology::{
    HostNs, KernelNodes, KernelRouting, PLAIN_CLUSTER_CIDR, PLAIN_SERVER, Plain, Tern, TernNodes,
    Topology, at,
};

pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
pub const HTTP_PORT: u16 = 8080;
/// The same-node group's row for two host-network processes (loopback).
pub const HOST_NETNS_ROW: &str = "host network namespace (loopback)";
/// The Service every ClusterIP scenario measures.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// (server CPU, client CPU) for throughput and connection rates: one each.
const CPUS: Option<(usize, usize)> = Some((0, 1));
/// Round trips on one shared CPU: across vCPUs every round trip waits for a
/// cross-CPU wake-up (p50 ~20 µs with millisecond tails on this machine),
/// which would hide the data path.
const RR_CPUS: Option<(usize, usize)> = Some((1, 1));

/// The client's ephemeral ports in the connection-rate measures
/// (`net.ipv4.ip_local_port_range` of its namespace): 16 384 ports, so that
/// ports come back as they do for a client pod of a busy node that keeps
/// opening connections to a Service. connect() takes the 8 192 ports of the
/// range's even half (Linux leaves the other half to bind()) in a random
/// walk, so at the 3 000–25 000 connections/s measured here a port is reused
/// every 0.3–3 s on average: several times per repetition (at the faster
/// rows within the quick profile's 1 s too), each time while the datapath's
/// conntrack still holds the previous connection (closing: 10 s). Not
/// narrower: wrk closes a few % of the connections itself, and their ports
/// stay in TIME_WAIT on the client for 60 s; with 4 096 ports they starve
/// connect() and the measure times the kernel's port search instead (c=8
/// halved on plain veths).
pub const BUSY_PORT_RANGE: (u16, u16) = (32768, 49151);

/// The mean time after which the port-reuse measure's client takes a port
/// again, see [`reuse_port_range`].
pub const REUSE_INTERVAL_S: f64 = 10.0;
/// The fewest ports the port-reuse measure runs with (a stalled row).
const REUSE_MIN_PORTS: u32 = 2048;
/// All unprivileged ports, 1024–65535.
const REUSE_MAX_PORTS: u32 = 64512;

/// The client's port range for the port-reuse measure (wrk -c1, `Connection:
/// close`), sized from the row's own c=1 rate of the same repetition so that
/// a port is taken again [`REUSE_INTERVAL_S`] after its last use on average:
/// twice `rate` × 10 s ports (connect() uses every other one), ending at
/// 65535, at most 1024–65535. The kernel's random walk over the range spreads
/// the intervals from a fraction of that mean to over twice it (measured with
/// nginx logging client ports: at 9 100 connections/s over all 64 512 ports,
/// 695 reuses 10–12 s after the port's previous connection within 15 s).
/// That is where conntrack entries of the previous connection expire: Tern's
/// closing state lasts 10 s, and issue 13 (a port reused ~10 s later stalled
/// for ~30 s) hid from a benchmark whose ports came back within ~1 s.
pub fn reuse_port_range(rate: f64) -> (u16, u16) {
    // NaN (nothing measured) counts as 0: f64::max returns the other operand.
    let want = 2.0 * rate.max(0.0) * REUSE_INTERVAL_S;
    let ports = (want.min(f64::from(REUSE_MAX_PORTS)) as u32).max(REUSE_MIN_PORTS) & !1;
    // An even first port and an odd last one: the halves stay equal.
    ((65536 - ports) as u16, 65535)
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    pub repetitions: usize,
    pub seconds: u32,
    /// How long the port-reuse measure runs: long enough that ports come
    /// back 10–12 s after their previous use (full profile).
    pub reuse_seconds: u32,
    pub service_counts: Vec<usize>,
    pub cni_pods: usize,
    /// kube-proxy's nftables rules for more Services than this are not
    /// loaded: nft takes about half an hour for 100 000.
    pub nftables_max_services: usize,
    pub endpoint_changes: usize,
    /// The Service set loaded from cold, and next to which the endpoint
    /// changes are timed again.
    pub control_plane_services: usize,
    /// A larger set for the agent's memory, if measured.
    pub control_plane_max_services: Option<usize>,
    /// Network policy: the NetworkPolicies selecting the server pod (at
    /// least 4: the measured ports are spread over them).
    pub policies_selecting: usize,
    /// All NetworkPolicies of the large cluster (the rest select pods of
    /// other namespaces, none of this node).
    pub policies_total: usize,
    /// Pod objects of the large cluster, the real client and server
    /// included.
    pub policy_pods: usize,
    /// Pod objects beside `policies_total` policies for the agent's
    /// memory (and one more change row).
    pub policy_pods_max: usize,
    /// Policy changes of each kind per repetition and row.
    pub policy_changes: usize,
}

impl Profile {
    pub fn quick() -> Profile {
        Profile {
            name: "quick",
            repetitions: 1,
            seconds: 1,
            // Checks that the measure runs; too short for reuse.
            reuse_seconds: 1,
            service_counts: vec![1, 100],
            cni_pods: 20,
            nftables_max_services: 100,
            endpoint_changes: 50,
            control_plane_services: 1_000,
            control_plane_max_services: None,
            policies_selecting: 10,
            policies_total: 1_000,
            policy_pods: 1_000,
            policy_pods_max: 10_000,
            policy_changes: 4,
        }
    }
    pub fn full() -> Profile {
        Profile {
            name: "full",
            repetitions: 5,
            seconds: 5,
            reuse_seconds: 15,
            service_counts: vec![1, 1_000, 10_000, 100_000],
            cni_pods: 100,
            nftables_max_services: 10_000,
            endpoint_changes: 1_000,
            control_plane_services: 10_000,
            control_plane_max_services: Some(100_000),
            policies_selecting: 100,
            policies_total: 10_000,
            policy_pods: 10_000,
            policy_pods_max: 100_000,
            policy_changes: 20,
        }
    }
}

/// Which measures a row takes.
#[derive(Clone, Copy)]
pub struct Measures {
    pub throughput: bool,
    pub latency: bool,
    /// Connection rate and latency, wrk -c1 and -c8 with `Connection: close`.
    pub http: bool,
    pub keep_alive: bool,
    /// wrk -c1 with ports coming back ~10 s after their last use
    /// ([`reuse_port_range`]); needs `http` (sized from its c=1 rate).
    pub port_reuse: bool,
}

pub(crate) const ALL: Measures = Measures {
    throughput: true,
    latency: true,
    http: true,
    keep_alive: true,
    port_reuse: false,
};
/// Pod -> ClusterIP -> pod: everything, and ports reused when the
/// datapath's conntrack entries of their previous connection expire.
const CLUSTER_IP: Measures = Measures {
    port_reuse: true,
    ..ALL
};
// The port-reuse measure is sized from the c=1 rate of `http`.
const _: () = assert!(CLUSTER_IP.http);
/// Service scale: per-connection cost is what grows with the rule count
/// (a new connection walks kube-proxy's rules; an established one is
/// conntrack's), so connections are opened and closed per request.
const CONNECTIONS: Measures = Measures {
    throughput: false,
    latency: false,
    http: true,
    keep_alive: false,
    port_reuse: false,
};

/// Adds `value` to the metric `name` of `metrics`, created on first use.
pub(crate) fn push(
    metrics: &mut Vec<Metric>,
    name: &str,
    unit: &str,
    higher_is_better: bool,
    value: f64,
) {
    match metrics.iter_mut().find(|m| m.name == name) {
        Some(m) => m.samples.push(value),
        None => metrics.push(Metric {
            name: name.into(),
            unit: unit.into(),
            higher_is_better,
            samples: vec![value],
        }),
    }
}

fn set_port_range(client: &Netns, (first, last): (u16, u16)) -> Result<()> {
    client.sysctl("net.ipv4.ip_local_port_range", &format!("{first} {last}"))
}

/// One row of a group while it is measured: its topology (alive until the
/// group is done), where the client connects to, and the samples so far.
pub struct Arm {
    // Fields drop in order: nginx stops before its namespace goes.
    /// One nginx per server namespace ([`Topology::servers`]), started with
    /// the first HTTP measure.
    nginx: Vec<tools::NginxGuard>,
    topology: Topology,
    target: Ipv4Addr,
    /// Measure from inside the node's pods cgroup (socket-LB applies to
    /// processes in it).
    pods_cgroup: bool,
    what: Measures,
    row: ScenarioResult,
    retried: usize,
}

impl Arm {
    /// The row `row` (its metrics filled in by [`interleave`]) measured on
    /// `topology` against `target`.
    pub fn new(
        row: ScenarioResult,
        topology: Topology,
        target: Ipv4Addr,
        pods_cgroup: bool,
        what: Measures,
    ) -> Arm {
        Arm {
            nginx: Vec::new(),
            topology,
            target,
            pods_cgroup,
            what,
            row,
            retried: 0,
        }
    }

    /// The row against the server pod's own address.
    pub fn direct(row: ScenarioResult, topology: Topology, what: Measures) -> Arm {
        let target = topology.server_ip();
        Arm::new(row, topology, target, false, what)
    }

    /// The topology the arm measures (its pods may be swapped between
    /// repetitions).
    pub(crate) fn topology_mut(&mut self) -> &mut Topology {
        &mut self.topology
    }

    /// One repetition of every measure into `row` instead of the arm's own
    /// row: one topology measured as several rows (the same pods under
    /// different NetworkPolicy, say), with the same processes (nginx) and
    /// their placement for all of them.
    pub(crate) fn measure_into(
        &mut self,
        profile: &Profile,
        row: &mut ScenarioResult,
    ) -> Result<()> {
        std::mem::swap(&mut self.row, row);
        let retried = std::mem::take(&mut self.retried);
        let measured = self.measure_once(profile);
        std::mem::swap(&mut self.row, row);
        let now = std::mem::replace(&mut self.retried, retried);
        if now > 0 {
            let name = "tool runs retried";
            match row.metrics.iter_mut().find(|m| m.name == name) {
                Some(m) => {
                    if let Some(v) = m.samples.first_mut() {
                        *v += now as f64;
                    }
                }
                None => push(&mut row.metrics, name, "runs", false, now as f64),
            }
        }
        measured
    }

    /// One repetition into `row` ([`Arm::measure_into`]) with the CPU other
    /// processes of the machine took meanwhile ([`OTHER_CPU`]), measured
    /// from `client` instead of the Tern node's own client pod when given:
    /// rows of one node each with a client pod of their own (see
    /// `policy::datapath` for why a shared client skews the rows).
    pub(crate) fn measure_row(
        &mut self,
        profile: &Profile,
        row: &mut ScenarioResult,
        mut client: Option<&mut Pod>,
    ) -> Result<()> {
        self.swap_client(client.as_deref_mut())?;
        let watch = CpuWatch::start();
        let measured = self.measure_into(profile, row);
        let other = watch.finish();
        self.swap_client(client)?;
        measured.with_context(|| row.label())?;
        push(&mut row.metrics, OTHER_CPU, "%", false, other);
        Ok(())
    }

    /// Exchanges the Tern node's client pod with `client`.
    fn swap_client(&mut self, client: Option<&mut Pod>) -> Result<()> {
        let Some(client) = client else {
            return Ok(());
        };
        let Topology::Tern(tern) = &mut self.topology else {
            anyhow::bail!("only a Tern node's client pod is swapped between rows");
        };
        std::mem::swap(&mut tern.client, client);
        Ok(())
    }

    /// One repetition of every measure, added to the row's samples.
    fn measure_once(&mut self, profile: &Profile) -> Result<()> {
        let Arm {
            nginx,
            topology,
            target,
            pods_cgroup,
            what,
            row,
            retried,
        } = self;
        let _pods = match (*pods_cgroup, topology.node()) {
            (true, Some(node)) => Some(node.enter_pods_cgroup()?),
            (true, None) => anyhow::bail!("no pods cgroup in this topology"),
            (false, _) => None,
        };
        let (server, client, target) = (topology.server(), topology.client(), *target);
        // iperf3 and sockperf run in `server` alone: through a Service
        // with more backends their connections would reach servers that
        // are not there.
        anyhow::ensure!(
            !(what.throughput || what.latency) || topology.servers().len() == 1,
            "throughput and round trips are measured against one server pod only"
        );
        if (what.http || what.keep_alive) && nginx.is_empty() {
            *nginx = topology
                .servers()
                .into_iter()
                .map(|server| tools::nginx(server, HTTP_PORT))
                .collect::<Result<_>>()?;
        }
        let metrics = &mut row.metrics;
        let url = format!("http://{target}:{HTTP_PORT}/");
        let s = profile.seconds;
        let mut again = |what: &str, e: anyhow::Error| {
            eprintln!("bench: {what} failed, running it once more: {e:#}");
            *retried += 1;
        };
        if what.throughput {
            let iperf =
                |streams| tools::iperf3(server, client, at(target, IPERF_PORT), streams, s, CPUS);
            let one = iperf(1).or_else(|e| {
                interrupt::check()?;
                again("iperf3", e);
                iperf(1)
            })?;
            push(
                metrics,
                "throughput 1 stream",
                "Gbit/s",
                true,
                one.gbit_per_s,
            );
            let four = iperf(4).or_else(|e| {
                interrupt::check()?;
                again("iperf3", e);
                iperf(4)
            })?;
            push(
                metrics,
                "throughput 4 streams",
                "Gbit/s",
                true,
                four.gbit_per_s,
            );
            push(
                metrics,
                "sender CPU, 1 stream",
                "%",
                false,
                one.sender_cpu_pct,
            );
        }
        if what.latency {
            let rr = |tcp| {
                tools::sockperf_ping_pong(
                    server,
                    client,
                    at(target, SOCKPERF_PORT),
                    tcp,
                    s,
                    RR_CPUS,
                )
            };
            let tcp = rr(true)?;
            push(metrics, "TCP RR p50", "µs", false, tcp.p50_us);
            push(metrics, "TCP RR p99", "µs", false, tcp.p99_us);
            push(metrics, "TCP RR p99.9", "µs", false, tcp.p999_us);
            let udp = rr(false)?;
            push(metrics, "UDP RR p50", "µs", false, udp.p50_us);
            push(metrics, "UDP RR p99", "µs", false, udp.p99_us);
        }
        let wrk = |connections, seconds, close| {
            let r = tools::wrk(client, &url, connections, seconds, close, CPUS.map(|c| c.1))?;
            if r.errors > 0 {
                eprintln!(
                    "bench: wrk -c{connections} against {url}: {} errors (non-2xx, connect, read, write, timeout)",
                    r.errors
                );
            }
            anyhow::Ok(r)
        };
        let mut c1_rate = None;
        if what.http {
            set_port_range(client, BUSY_PORT_RANGE)?;
            for c in [1, 8] {
                let r = wrk(c, s, true)?;
                push(
                    metrics,
                    &format!("connections/s c={c}"),
                    "conn/s",
                    true,
                    r.requests_per_s,
                );
                push(
                    metrics,
                    &format!("connection latency c={c} p50"),
                    "ms",
                    false,
                    r.p50_ms,
                );
                push(
                    metrics,
                    &format!("connection latency c={c} p99"),
                    "ms",
                    false,
                    r.p99_ms,
                );
                push(
                    metrics,
                    &format!("connection latency c={c} max"),
                    "ms",
                    false,
                    r.max_ms,
                );
                if c == 1 {
                    c1_rate = Some(r.requests_per_s);
                }
            }
        }
        if what.keep_alive {
            let keep = wrk(8, s, false)?;
            push(
                metrics,
                "requests/s (keep-alive)",
                "req/s",
                true,
                keep.requests_per_s,
            );
        }
        if what.port_reuse {
            let rate = c1_rate.context("the port-reuse measure is sized from the c=1 rate")?;
            let range = reuse_port_range(rate);
            eprintln!(
                "bench: port reuse: {rate:.0} connections/s at c=1, ports {}-{}",
                range.0, range.1
            );
            set_port_range(client, range)?;
            let r = wrk(1, profile.reuse_seconds, true)?;
            set_port_range(client, BUSY_PORT_RANGE)?;
            let name = "port reuse ~10 s";
            push(
                metrics,
                &format!("connections/s c=1, {name}"),
                "conn/s",
                true,
                r.requests_per_s,
            );
            push(
                metrics,
                &format!("connection latency c=1 max, {name}"),
                "ms",
                false,
                r.max_ms,
            );
        }
        Ok(())
    }

    /// The row with all its samples; the topology is torn down.
    fn into_row(self) -> ScenarioResult {
        let Arm {
            nginx,
            topology,
            mut row,
            retried,
            ..
        } = self;
        drop(nginx);
        drop(topology);
        if retried > 0 {
            // Shown in the table, so a flaky path cannot hide behind retries.
            push(
                &mut row.metrics,
                "tool runs retried",
                "runs",
                false,
                retried as f64,
            );
        }
        row
    }
}

/// Measures every arm `profile.repetitions` times, interleaved: round after
/// round, each arm once in order (the baseline first). Returns the rows.
pub fn interleave(
    group: &str,
    mut arms: Vec<Arm>,
    profile: &Profile,
) -> Result<Vec<ScenarioResult>> {
    let n = profile.repetitions;
    for rep in 1..=n {
        for arm in &mut arms {
            interrupt::check()?;
            eprintln!("bench: {group}: {} ({rep}/{n})", arm.row.label());
            arm.measure_once(profile).with_context(|| arm.row.label())?;
        }
    }
    Ok(arms.into_iter().map(Arm::into_row).collect())
}

/// The metric of the CPU other processes of the machine took while a row
/// was measured: the busiest second, % of one CPU (`contention`), so that
/// a repetition that shared the CPUs with a build shows as such.
pub const OTHER_CPU: &str = "CPU of other processes, max";

pub fn row(
    group: &str,
    name: &str,
    baseline: Option<&str>,
    params: &[(&str, String)],
    metrics: Vec<Metric>,
) -> ScenarioResult {
    ScenarioResult {
        group: group.into(),
        name: name.into(),
        baseline: baseline.map(str::to_owned),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        metrics,
        flagged: Vec::new(),
    }
}

/// Scenario 1 and 2: the physical limit, and Tern's same-node redirect.
pub fn pod_to_pod(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let group = "pod-to-pod, same node";
    let baseline = "physical limit (veth + routes, no BPF)";
    eprintln!("bench: {group}: setting up");
    let arms = vec![
        Arm::direct(
            row(group, baseline, None, &[], vec![]),
            Topology::Plain(Plain::new()?),
            ALL,
        ),
        // What no pod device can beat: kept beside the veth baseline (the
        // targets' ratios stay against veth), it shows how far that is.
        Arm::direct(
            row(group, HOST_NETNS_ROW, Some(baseline), &[], vec![]),
            Topology::HostNs(HostNs::new()?),
            ALL,
        ),
        Arm::direct(
            row(group, "Tern eBPF redirect", Some(baseline), &[], vec![]),
            Topology::Tern(Box::new(Tern::new(true, "10.244.61.0/24")?)),
            ALL,
        ),
    ];
    interleave(group, arms, profile)
}

/// Pod to pod across two nodes: the physical limit, the kernel's own
/// routes and VXLAN as Flannel sets them up, and Tern in both routing modes.
/// Each topology has its own lab switch, so all coexist.
pub fn cross_node(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let group = "pod-to-pod, across nodes";
    let baseline = "physical limit (veth + routes, no BPF)";
    eprintln!("bench: {group}: setting up");
    let mut arms = vec![Arm::direct(
        row(group, baseline, None, &[], vec![]),
        Topology::Plain(Plain::new()?),
        ALL,
    )];
    for (name, routing) in [
        ("kernel routes (Flannel host-gw)", KernelRouting::Routes),
        ("kernel VXLAN (Flannel vxlan)", KernelRouting::Vxlan),
    ] {
        arms.push(Arm::direct(
            row(group, name, Some(baseline), &[], vec![]),
            Topology::KernelNodes(KernelNodes::new(routing)?),
            ALL,
        ));
    }
    for (name, mode) in [
        ("Tern native routing", "native"),
        ("Tern overlay (VXLAN)", "overlay"),
    ] {
        arms.push(Arm::direct(
            row(group, name, Some(baseline), &[], vec![]),
            Topology::TernNodes(TernNodes::new(mode)?),
            ALL,
        ));
    }
    interleave(group, arms, profile)
}

/// The Service (and `fillers` more) as manifests for the Tern agent, its
/// endpoints every server pod of `tern` ([`Tern::servers`]). With
/// `lb_algorithm`, the Service is annotated `tern.io/lb-algorithm` with it
/// and `tern.io/lb-weights` with [`lb_weights`] (ignored by the schedulers
/// that do not weigh, so that the manifests of two algorithms differ only
/// in the name); without it the node's default (random) applies.
pub(crate) fn tern_services(tern: &Tern, fillers: usize, lb_algorithm: Option<&str>) -> Result<()> {
    let ports = json!([
        {"name": "iperf", "port": IPERF_PORT, "protocol": "TCP"},
        {"name": "rr-tcp", "port": SOCKPERF_PORT, "protocol": "TCP"},
        {"name": "rr-udp", "port": SOCKPERF_PORT, "protocol": "UDP"},
        {"name": "http", "port": HTTP_PORT, "protocol": "TCP"},
    ]);
    let servers: Vec<Ipv4Addr> = tern.servers().map(|p| p.ip).collect();
    let endpoints: Vec<Value> = servers
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    let mut service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench", "namespace": "bench"},
                             "spec": {"clusterIP": VIP.to_string(), "ports": ports}});
    if let Some(algorithm) = lb_algorithm {
        service["metadata"]["annotations"] = json!({
            "tern.io/lb-algorithm": algorithm,
            "tern.io/lb-weights": lb_weights(&servers),
        });
    }
    let mut items = vec![
        service,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "bench-1", "namespace": "bench", "labels": {"kubernetes.io/service-name": "bench"}},
               "addressType": "IPv4", "ports": ports, "endpoints": endpoints}),
    ];
    for (i, service) in kube_proxy::synthetic_services(fillers, 1, &[(tern.server.ip, HTTP_PORT)])
        .into_iter()
        .enumerate()
    {
        let name = format!("filler-{i}");
        items.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
            "spec": {"clusterIP": service.cluster_ip.to_string(), "ports": [{"name": "http", "port": service.port}]}}));
        items.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": HTTP_PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [tern.server.ip.to_string()], "conditions": {"ready": true}}]}));
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    tern.node
        .write_manifest("bench.json", &serde_json::to_string(&list)?)?;
    wait_for_frontends(&tern.node, 4 + fillers)
}

/// `tern.io/lb-weights` for the endpoints `servers`, by address: 1, 2, 3...
/// in order, unequal so that the weighted schedulers (wrr, wlc, sed, nq)
/// have weights to follow, none 0 (no endpoint left without connections).
fn lb_weights(servers: &[Ipv4Addr]) -> String {
    servers
        .iter()
        .zip(1..)
        .map(|(ip, weight)| format!("{ip}={weight}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Waits until the agent has `frontends` Service frontends in the datapath
/// (the measured Service's four and the fillers').
pub(crate) fn wait_for_frontends(node: &LabNode, frontends: usize) -> Result<()> {
    let started = Instant::now();
    loop {
        let status: Value = node
            .agent_request(&json!({"op": "status"}))
            .unwrap_or(Value::Null);
        if status["frontends"].as_u64() >= Some(frontends as u64) {
            return Ok(());
        }
        interrupt::check()?;
        anyhow::ensure!(
            started.elapsed().as_secs() < 600,
            "services not synced:\n{}",
            node.agent_log_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The Service and fillers in kube-proxy's layout, for the plain topology.
/// The measured Service sits in the middle of the fillers: kube-proxy writes
/// Services in Go map order (random), so that is where iptables' linear
/// KUBE-SERVICES chain finds it on average (first would be its best case).
fn kube_proxy_services(fillers: usize) -> Vec<KpService> {
    let measured: Vec<KpService> = [
        (IPERF_PORT, Proto::Tcp),
        (SOCKPERF_PORT, Proto::Tcp),
        (SOCKPERF_PORT, Proto::Udp),
        (HTTP_PORT, Proto::Tcp),
    ]
    .into_iter()
    .map(|(port, protocol)| KpService {
        name: format!("bench/bench:{port}"),
        cluster_ip: VIP,
        port,
        protocol,
        endpoints: vec![(PLAIN_SERVER, port)],
    })
    .collect();
    let mut services = kube_proxy::synthetic_services(fillers, 1, &[(PLAIN_SERVER, HTTP_PORT)]);
    let middle = services.len() / 2;
    services.splice(middle..middle, measured);
    services
}

/// The Service data paths compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DataPath {
    SocketLb,
    PerPacket,
    Iptables,
    Nftables,
}

impl DataPath {
    const ALL: [DataPath; 4] = [
        DataPath::SocketLb,
        DataPath::PerPacket,
        DataPath::Iptables,
        DataPath::Nftables,
    ];

    fn name(self) -> &'static str {
        match self {
            DataPath::SocketLb => "Tern socket-LB",
            DataPath::PerPacket => "Tern per-packet",
            DataPath::Iptables => "kube-proxy iptables",
            DataPath::Nftables => "kube-proxy nftables",
        }
    }
}

/// The row `row` on `path` with `services` Services loaded, against the
/// VIP. A Tern node gets PodCIDR `cidr`: each Tern arm of a group has its
/// own lab (switch, node namespace, pins, cgroup), so they coexist; distinct
/// PodCIDRs keep their addresses apart in logs too.
fn service_arm(
    path: DataPath,
    services: usize,
    what: Measures,
    row: ScenarioResult,
    cidr: &str,
) -> Result<Arm> {
    eprintln!(
        "bench: {}: setting up {} with {services} Service(s)",
        row.group,
        row.label()
    );
    let fillers = services.saturating_sub(1);
    match path {
        DataPath::SocketLb | DataPath::PerPacket => {
            let tern = Tern::new(path == DataPath::SocketLb, cidr)?;
            tern_services(&tern, fillers, None)?;
            // Socket-LB applies to processes in the pods' cgroup.
            Ok(Arm::new(
                row,
                Topology::Tern(Box::new(tern)),
                VIP,
                true,
                what,
            ))
        }
        DataPath::Iptables | DataPath::Nftables => {
            let plain = Plain::new()?;
            let rules = kube_proxy_services(fillers);
            if path == DataPath::Nftables {
                kube_proxy::apply_nftables(&plain.router, &rules, PLAIN_CLUSTER_CIDR)?;
            } else {
                // iptables-nft 1.8.9 needs about half an hour for 100 000
                // Services' rules (it looks chains up one by one); the legacy
                // backend loads them in seconds and walks them the same way.
                kube_proxy::apply_iptables_with(
                    &plain.router,
                    &rules,
                    PLAIN_CLUSTER_CIDR,
                    IptablesBackend::Legacy,
                )?;
            }
            Ok(Arm::new(row, Topology::Plain(plain), VIP, false, what))
        }
    }
}

/// The schedulers of `tern.io/lb-algorithm`, random (the agent's default)
/// first: the ClusterIP group measures each against it.
pub const LB_ALGORITHMS: [&str; 10] = [
    "random", "maglev", "rr", "wrr", "lc", "wlc", "sh", "dh", "sed", "nq",
];
/// Server pods behind the Service of the scheduler rows: with one a
/// scheduler has nothing to choose.
const SCHEDULER_BACKENDS: usize = 4;
/// The data paths whose schedulers the ClusterIP group measures. Socket-LB
/// only, Tern's default: per-packet would be ten more rows, about 9 min of
/// the full profile.
const SCHEDULER_PATHS: [DataPath; 1] = [DataPath::SocketLb];

/// The row `row` on Tern's `path` against the VIP of a Service of
/// [`SCHEDULER_BACKENDS`] server pods with scheduler `algorithm` and
/// unequal weights ([`tern_services`]). Connection rate only
/// ([`CONNECTIONS`]): the per-connection cost is where a scheduler's work
/// is (an established connection keeps its backend), and nginx is the one
/// server that runs on every backend.
fn scheduler_arm(path: DataPath, algorithm: &str, row: ScenarioResult, cidr: &str) -> Result<Arm> {
    eprintln!(
        "bench: {}: setting up {} with {SCHEDULER_BACKENDS} backends",
        row.group,
        row.label()
    );
    let socket_lb = match path {
        DataPath::SocketLb => true,
        DataPath::PerPacket => false,
        DataPath::Iptables | DataPath::Nftables => {
            anyhow::bail!("{}: tern.io/lb-algorithm is Tern's", path.name())
        }
    };
    let tern = Tern::with_servers(socket_lb, cidr, SCHEDULER_BACKENDS)?;
    tern_services(&tern, 0, Some(algorithm))?;
    Ok(Arm::new(
        row,
        Topology::Tern(Box::new(tern)),
        VIP,
        true,
        CONNECTIONS,
    ))
}

/// Scenario 3: pod -> ClusterIP -> pod on every data path, against the
/// same pods reached by address; then Tern's schedulers
/// ([`LB_ALGORITHMS`]) on a Service of several backends, each against
/// random there (random against the one-backend row of its data path).
/// All set up, then measured interleaved.
pub fn cluster_ip(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let group = "pod -> ClusterIP -> pod";
    let baseline = "direct pod IP (Tern)";
    eprintln!("bench: {group}: setting up {baseline}");
    // From inside the pods cgroup, as every pod of a Tern node connects:
    // the socket hooks run for a pod address too (and find no Service).
    let direct = Tern::new(true, "10.244.63.0/24")?;
    let server = direct.server.ip;
    let mut arms = vec![Arm::new(
        row(group, baseline, None, &[], vec![]),
        Topology::Tern(Box::new(direct)),
        server,
        true,
        CLUSTER_IP,
    )];
    for (path, cidr) in DataPath::ALL
        .into_iter()
        .zip(["10.244.62.0/24", "10.244.68.0/24", "", ""])
    {
        arms.push(service_arm(
            path,
            1,
            CLUSTER_IP,
            row(group, path.name(), Some(baseline), &[], vec![]),
            cidr,
        )?);
    }
    for (p, path) in SCHEDULER_PATHS.into_iter().enumerate() {
        // Random (first) against the path's one-backend row, the others
        // against random.
        let mut baseline = path.name().to_owned();
        for (i, algorithm) in LB_ALGORITHMS.into_iter().enumerate() {
            let params = [
                ("backends", SCHEDULER_BACKENDS.to_string()),
                ("lb-algorithm", algorithm.to_owned()),
            ];
            let r = row(group, path.name(), Some(&baseline), &params, vec![]);
            if i == 0 {
                baseline = r.label();
            }
            let cidr = format!("10.244.{}.0/24", 120 + 10 * p + i);
            arms.push(
                scheduler_arm(path, algorithm, r, &cidr)
                    .with_context(|| format!("{} lb-algorithm={algorithm}", path.name()))?,
            );
        }
    }
    interleave(group, arms, profile)
}

/// Scenario 4: per-connection latency and rate as Services grow; each data
/// path against itself with one Service. A data path's instances at every
/// Service count are set up side by side and measured interleaved (the
/// 1-Service one first each round); data paths follow each other, as they
/// are not compared with each other here.
pub fn service_scale(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let group = "service scale";
    let first = profile.service_counts[0];
    let mut rows: Vec<ScenarioResult> = Vec::new();
    for (p, path) in DataPath::ALL.into_iter().enumerate() {
        let mut arms = Vec::new();
        for (i, &n) in profile.service_counts.iter().enumerate() {
            if path == DataPath::Nftables && n > profile.nftables_max_services {
                eprintln!(
                    "bench: {group}: {} skipped for {n} services (nft load time)",
                    path.name()
                );
                continue;
            }
            let baseline = (n != first).then(|| format!("{} (services={first})", path.name()));
            let params = [("services", n.to_string())];
            let cidr = format!("10.244.{}.0/24", 80 + 10 * p + i);
            let r = row(group, path.name(), baseline.as_deref(), &params, vec![]);
            arms.push(
                service_arm(path, n, CONNECTIONS, r, &cidr)
                    .with_context(|| format!("{} ({n} services)", path.name()))?,
            );
        }
        rows.extend(interleave(group, arms, profile)?);
    }
    Ok(rows)
}

/// Scenario 6: CNI ADD and DEL, Tern against the reference bridge +
/// host-local plugins, invoked the same way.
pub fn cni(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let group = "CNI";
    let baseline = "bridge + host-local";
    eprintln!("bench: {group}");
    let lab = tern_lab::lab::Lab::new()?;
    let node = lab.node("cni", "10.244.64.0/22", Ipv4Addr::new(10, 0, 0, 11))?;
    let data_dir = std::env::temp_dir().join(tern_lab::netns::unique_name("hl"));
    let bridge_conf = json!({
        "cniVersion": "1.0.0", "name": "bench-bridge", "type": "bridge", "bridge": "cni-bench0",
        "isGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": "10.88.0.0/22", "dataDir": data_dir}
    });
    let tern_conf = node.netconf("1.0.0");
    let tern_bin = node.bins.cni.to_str().unwrap_or_default().to_owned();
    let plugins = [
        (baseline, bridge_conf, "/usr/lib/cni/bridge"),
        ("Tern", tern_conf, tern_bin.as_str()),
    ];
    let mut metrics: Vec<Vec<Metric>> = vec![Vec::new(); plugins.len()];
    // Interleaved: each repetition times the baseline, then Tern.
    for rep in 1..=profile.repetitions {
        for ((name, conf, bin), metrics) in plugins.iter().zip(&mut metrics) {
            interrupt::check()?;
            eprintln!("bench: {group}: {name} ({rep}/{})", profile.repetitions);
            let (a, d) = cni_latencies(&node, bin, conf, profile.cni_pods, 1)?;
            push(metrics, "ADD p50", "ms", false, percentile(&a, 0.50));
            push(metrics, "ADD p99", "ms", false, percentile(&a, 0.99));
            push(metrics, "DEL p50", "ms", false, percentile(&d, 0.50));
            push(metrics, "DEL p99", "ms", false, percentile(&d, 0.99));
            let (a, d) = cni_latencies(&node, bin, conf, 20, 20)?;
            push(
                metrics,
                "ADD p50, 20 concurrent",
                "ms",
                false,
                percentile(&a, 0.50),
            );
            push(
                metrics,
                "ADD p99, 20 concurrent",
                "ms",
                false,
                percentile(&a, 0.99),
            );
            push(
                metrics,
                "DEL p50, 20 concurrent",
                "ms",
                false,
                percentile(&d, 0.50),
            );
            push(
                metrics,
                "DEL p99, 20 concurrent",
                "ms",
                false,
                percentile(&d, 0.99),
            );
        }
    }
    let rows = plugins
        .iter()
        .zip(metrics)
        .map(|((name, _, _), metrics)| {
            let b = (*name != baseline).then_some(baseline);
            row(
                group,
                name,
                b,
                &[("pods", profile.cni_pods.to_string())],
                metrics,
            )
        })
        .collect();
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(rows)
}

pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// ADD then DEL of `pods` pods with `binary` as the plugin, `parallel` at
/// a time: each group's ADDs run together, then their DELs.
fn cni_latencies(
    node: &LabNode,
    binary: &str,
    conf: &Value,
    pods: usize,
    parallel: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut add = Vec::new();
    let mut del = Vec::new();
    let stdin = conf.to_string();
    let invoke = |cmd: &str, netns: &Netns, id: &str| -> Result<f64> {
        let netns = netns.path().display().to_string();
        let env = [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        let t = Instant::now();
        let out = node.invoke_plugin(binary, &env, stdin.as_bytes())?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if cmd == "ADD" {
            out.success_json()
                .with_context(|| format!("{binary} ADD"))?;
        } else {
            anyhow::ensure!(out.code == Some(0), "{binary} DEL: {out:?}");
        }
        Ok(ms)
    };
    let all = |cmd: &str, group: &[(Netns, String)]| -> Result<Vec<f64>> {
        std::thread::scope(|scope| {
            let running: Vec<_> = group
                .iter()
                .map(|(ns, id)| scope.spawn(move || invoke(cmd, ns, id)))
                .collect();
            running
                .into_iter()
                .map(|t| {
                    t.join()
                        .map_err(|_| anyhow::anyhow!("CNI thread panicked"))?
                })
                .collect()
        })
    };
    for start in (0..pods).step_by(parallel.max(1)) {
        let group = (start..(start + parallel).min(pods))
            .map(|i| {
                Ok((
                    Netns::new(&format!("c{i}"))?,
                    tern_lab::netns::unique_name("cni"),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        add.extend(all("ADD", &group)?);
        del.extend(all("DEL", &group)?);
    }
    Ok((add, del))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_port_range_sizes_for_ten_seconds() {
        // 3 000 connections/s: 30 000 ports of one parity, 60 000 in all.
        assert_eq!(reuse_port_range(3000.0), (5536, 65535));
        assert_eq!(reuse_port_range(500.0), (55536, 65535));
        // Faster than the unprivileged ports allow: all of them.
        assert_eq!(reuse_port_range(9100.0), (1024, 65535));
        // Nothing measured, or a stalled row: the floor.
        assert_eq!(reuse_port_range(0.0), (63488, 65535));
        assert_eq!(reuse_port_range(f64::NAN), (63488, 65535));
        assert_eq!(reuse_port_range(-1.0), (63488, 65535));
        for rate in [1.0, 77.7, 1234.5, 3225.6, 1e9] {
            let (first, last) = reuse_port_range(rate);
            // Even first port, odd last: both halves equal.
            assert!(first % 2 == 0 && last == 65535 && first >= 1024, "{rate}");
        }
        // The busy range: an even first port and an odd last one too.
        assert_eq!(BUSY_PORT_RANGE.0 % 2, 0);
        assert_eq!(BUSY_PORT_RANGE.1 % 2, 1);
    }

    #[test]
    fn scheduler_rows() {
        assert_eq!(LB_ALGORITHMS[0], "random", "the schedulers' baseline");
        let distinct: std::collections::BTreeSet<_> = LB_ALGORITHMS.iter().collect();
        assert_eq!(distinct.len(), LB_ALGORITHMS.len());
        let servers = [
            Ipv4Addr::new(10, 244, 120, 3),
            Ipv4Addr::new(10, 244, 120, 4),
        ];
        assert_eq!(lb_weights(&servers), "10.244.120.3=1,10.244.120.4=2");
    }

    #[test]
    fn profiles() {
        for p in [Profile::quick(), Profile::full()] {
            assert!(p.repetitions >= 1 && p.seconds >= 1 && p.reuse_seconds >= 1);
            assert_eq!(p.service_counts[0], 1, "the scale baseline is 1 Service");
            assert!(p.policies_selecting >= 4, "4 measured ports");
            assert!(p.policies_total > p.policies_selecting);
            assert!(p.policy_pods > 2 && p.policy_pods_max >= p.policy_pods);
            assert!(p.policy_changes >= 2 && p.policy_changes.is_multiple_of(2));
        }
        // Ports come back after 10-12 s only in a run longer than that.
        assert!(f64::from(Profile::full().reuse_seconds) > REUSE_INTERVAL_S + 2.0);
    }
}
