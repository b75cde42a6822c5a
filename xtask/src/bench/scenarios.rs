//! The scenarios: each a topology, a data path and the measures taken, run
//! next to its baseline in the same run with the same CPU pinning.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tern_tests::netns::Netns;

use super::kube_proxy::{self, IptablesBackend, KpService, Proto};
use super::report::{Metric, ScenarioResult};
use super::tools;
use super::topology::{
    KernelNodes, KernelRouting, PLAIN_CLUSTER_CIDR, PLAIN_SERVER, Plain, Tern, TernNodes, at,
};

pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
pub const HTTP_PORT: u16 = 8080;
/// The Service every ClusterIP scenario measures.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// (server CPU, client CPU) for throughput and connection rates: one each.
const CPUS: Option<(usize, usize)> = Some((0, 1));
/// Round trips on one shared CPU: across vCPUs every round trip waits for a
/// cross-CPU wake-up (p50 ~20 µs with millisecond tails on this machine),
/// which would hide the data path.
const RR_CPUS: Option<(usize, usize)> = Some((1, 1));

#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    pub repetitions: usize,
    pub seconds: u32,
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
}

impl Profile {
    pub fn quick() -> Profile {
        Profile {
            name: "quick",
            repetitions: 1,
            seconds: 1,
            service_counts: vec![1, 100],
            cni_pods: 20,
            nftables_max_services: 100,
            endpoint_changes: 50,
            control_plane_services: 1_000,
            control_plane_max_services: None,
        }
    }
    pub fn full() -> Profile {
        Profile {
            name: "full",
            repetitions: 5,
            seconds: 5,
            service_counts: vec![1, 1_000, 10_000, 100_000],
            cni_pods: 100,
            nftables_max_services: 10_000,
            endpoint_changes: 1_000,
            control_plane_services: 10_000,
            control_plane_max_services: Some(100_000),
        }
    }
}

/// Which measures a row takes.
#[derive(Clone, Copy)]
pub struct Measures {
    pub throughput: bool,
    pub latency: bool,
    pub http: bool,
    pub keep_alive: bool,
}

const ALL: Measures = Measures {
    throughput: true,
    latency: true,
    http: true,
    keep_alive: true,
};
/// Service scale: per-connection cost is what grows with the rule count
/// (a new connection walks kube-proxy's rules; an established one is
/// conntrack's), so connections are opened and closed per request.
const CONNECTIONS: Measures = Measures {
    throughput: false,
    latency: false,
    http: true,
    keep_alive: false,
};

fn metric(name: &str, unit: &str, higher_is_better: bool) -> Metric {
    Metric {
        name: name.into(),
        unit: unit.into(),
        higher_is_better,
        samples: Vec::new(),
    }
}

/// Runs the measures `profile.repetitions` times between `client` and the
/// `server` namespace, reaching it at `target`.
pub fn measure(
    server: &Netns,
    client: &Netns,
    target: Ipv4Addr,
    what: Measures,
    profile: &Profile,
) -> Result<Vec<Metric>> {
    let mut metrics = Vec::new();
    let push = |metrics: &mut Vec<Metric>, m: Metric, v: f64| match metrics
        .iter_mut()
        .find(|x: &&mut Metric| x.name == m.name)
    {
        Some(existing) => existing.samples.push(v),
        None => metrics.push(Metric {
            samples: vec![v],
            ..m
        }),
    };
    let nginx = if what.http || what.keep_alive {
        Some(tools::nginx(server, HTTP_PORT)?)
    } else {
        None
    };
    let url = format!("http://{target}:{HTTP_PORT}/");
    let mut retried = 0;
    for _ in 0..profile.repetitions {
        let s = profile.seconds;
        let mut again = |what: &str, e: anyhow::Error| {
            eprintln!("bench: {what} failed, running it once more: {e:#}");
            retried += 1;
        };
        if what.throughput {
            let one =
                tools::iperf3(server, client, at(target, IPERF_PORT), 1, s, CPUS).or_else(|e| {
                    again("iperf3", e);
                    tools::iperf3(server, client, at(target, IPERF_PORT), 1, s, CPUS)
                })?;
            push(
                &mut metrics,
                metric("throughput 1 stream", "Gbit/s", true),
                one.gbit_per_s,
            );
            let four =
                tools::iperf3(server, client, at(target, IPERF_PORT), 4, s, CPUS).or_else(|e| {
                    again("iperf3", e);
                    tools::iperf3(server, client, at(target, IPERF_PORT), 4, s, CPUS)
                })?;
            push(
                &mut metrics,
                metric("throughput 4 streams", "Gbit/s", true),
                four.gbit_per_s,
            );
            push(
                &mut metrics,
                metric("sender CPU, 1 stream", "%", false),
                one.sender_cpu_pct,
            );
        }
        if what.latency {
            let tcp = tools::sockperf_ping_pong(
                server,
                client,
                at(target, SOCKPERF_PORT),
                true,
                s,
                RR_CPUS,
            )?;
            push(&mut metrics, metric("TCP RR p50", "µs", false), tcp.p50_us);
            push(&mut metrics, metric("TCP RR p99", "µs", false), tcp.p99_us);
            push(
                &mut metrics,
                metric("TCP RR p99.9", "µs", false),
                tcp.p999_us,
            );
            let udp = tools::sockperf_ping_pong(
                server,
                client,
                at(target, SOCKPERF_PORT),
                false,
                s,
                RR_CPUS,
            )?;
            push(&mut metrics, metric("UDP RR p50", "µs", false), udp.p50_us);
            push(&mut metrics, metric("UDP RR p99", "µs", false), udp.p99_us);
        }
        if what.http {
            let close = tools::wrk(client, &url, 8, s, true, CPUS.map(|c| c.1))?;
            push(
                &mut metrics,
                metric("connections/s (Connection: close)", "req/s", true),
                close.requests_per_s,
            );
            push(
                &mut metrics,
                metric("connection latency p50", "ms", false),
                close.p50_ms,
            );
        }
        if what.keep_alive {
            let keep = tools::wrk(client, &url, 8, s, false, CPUS.map(|c| c.1))?;
            push(
                &mut metrics,
                metric("requests/s (keep-alive)", "req/s", true),
                keep.requests_per_s,
            );
        }
    }
    drop(nginx);
    if retried > 0 {
        // Shown in the table, so a flaky path cannot hide behind retries.
        push(
            &mut metrics,
            metric("tool runs retried", "runs", false),
            retried as f64,
        );
    }
    Ok(metrics)
}

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
    }
}

/// Scenario 1 and 2: the physical limit, and Tern's same-node redirect.
pub fn pod_to_pod(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let group = "pod-to-pod, same node";
    let baseline = "physical limit (veth + routes, no BPF)";
    eprintln!("bench: {group}");
    let plain = Plain::new()?;
    let physical = measure(&plain.server, &plain.client, PLAIN_SERVER, ALL, profile)?;
    drop(plain);
    let tern = Tern::new(true, "10.244.61.0/24")?;
    let redirect = measure(
        &tern.server.ns,
        &tern.client.ns,
        tern.server.ip,
        ALL,
        profile,
    )?;
    Ok(vec![
        row(group, baseline, None, &[], physical),
        row(group, "Tern eBPF redirect", Some(baseline), &[], redirect),
    ])
}

/// Pod to pod across two nodes: the physical limit, the kernel's own
/// routes and VXLAN as Flannel sets them up, and Tern in both routing modes.
pub fn cross_node(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let group = "pod-to-pod, across nodes";
    let baseline = "physical limit (veth + routes, no BPF)";
    eprintln!("bench: {group}");
    let plain = Plain::new()?;
    let physical = measure(&plain.server, &plain.client, PLAIN_SERVER, ALL, profile)?;
    drop(plain);
    let mut rows = vec![row(group, baseline, None, &[], physical)];
    for (name, routing) in [
        ("kernel routes (Flannel host-gw)", KernelRouting::Routes),
        ("kernel VXLAN (Flannel vxlan)", KernelRouting::Vxlan),
    ] {
        eprintln!("bench: {group}: {name}");
        let nodes = KernelNodes::new(routing)?;
        let metrics = measure(&nodes.server, &nodes.client, nodes.server_ip, ALL, profile)?;
        rows.push(row(group, name, Some(baseline), &[], metrics));
    }
    for (name, mode) in [
        ("Tern native routing", "native"),
        ("Tern overlay (VXLAN)", "overlay"),
    ] {
        eprintln!("bench: {group}: {name}");
        let nodes = TernNodes::new(mode)?;
        let metrics = measure(
            &nodes.server.ns,
            &nodes.client.ns,
            nodes.server.ip,
            ALL,
            profile,
        )?;
        rows.push(row(group, name, Some(baseline), &[], metrics));
    }
    Ok(rows)
}

/// The Service (and `fillers` more) as manifests for the Tern agent.
fn tern_services(tern: &Tern, fillers: usize) -> Result<()> {
    let ports = json!([
        {"name": "iperf", "port": IPERF_PORT, "protocol": "TCP"},
        {"name": "rr-tcp", "port": SOCKPERF_PORT, "protocol": "TCP"},
        {"name": "rr-udp", "port": SOCKPERF_PORT, "protocol": "UDP"},
        {"name": "http", "port": HTTP_PORT, "protocol": "TCP"},
    ]);
    let mut items = vec![
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench", "namespace": "bench"},
               "spec": {"clusterIP": VIP.to_string(), "ports": ports}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "bench-1", "namespace": "bench", "labels": {"kubernetes.io/service-name": "bench"}},
               "addressType": "IPv4", "ports": ports,
               "endpoints": [{"addresses": [tern.server.ip.to_string()], "conditions": {"ready": true}}]}),
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
    let started = Instant::now();
    loop {
        let status: Value = tern
            .node
            .agent_request(&json!({"op": "status"}))
            .unwrap_or(Value::Null);
        if status["frontends"].as_u64() >= Some(4 + fillers as u64) {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed().as_secs() < 600,
            "services not synced:\n{}",
            tern.node.agent_log_tail()
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

/// One ClusterIP row per data path, with `services` Services loaded.
fn cluster_ip_rows(
    group: &str,
    baseline: Option<&str>,
    services: usize,
    what: Measures,
    profile: &Profile,
    params: &[(&str, String)],
) -> Result<Vec<ScenarioResult>> {
    let fillers = services.saturating_sub(1);
    let mut rows = Vec::new();
    for (name, socket_lb) in [("Tern socket-LB", true), ("Tern per-packet", false)] {
        eprintln!("bench: {group}: {name} ({services} services)");
        let tern = Tern::new(socket_lb, "10.244.62.0/24")?;
        tern_services(&tern, fillers)?;
        let metrics = {
            // Socket-LB applies to processes in the pods' cgroup.
            let _pods = tern.node.enter_pods_cgroup()?;
            measure(&tern.server.ns, &tern.client.ns, VIP, what, profile)?
        };
        rows.push(row(group, name, baseline, params, metrics));
    }
    for (name, nft) in [
        ("kube-proxy iptables", false),
        ("kube-proxy nftables", true),
    ] {
        if nft && services > profile.nftables_max_services {
            eprintln!("bench: {group}: {name} skipped for {services} services (nft load time)");
            continue;
        }
        eprintln!("bench: {group}: {name} ({services} services)");
        let plain = Plain::new()?;
        let rules = kube_proxy_services(fillers);
        if nft {
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
        let metrics = measure(&plain.server, &plain.client, VIP, what, profile)
            .with_context(|| name.to_owned())?;
        rows.push(row(group, name, baseline, params, metrics));
    }
    Ok(rows)
}

/// Scenario 3: pod -> ClusterIP -> pod on every data path, against the
/// same pods reached by address.
pub fn cluster_ip(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let group = "pod -> ClusterIP -> pod";
    let baseline = "direct pod IP (Tern)";
    eprintln!("bench: {group}: {baseline}");
    let tern = Tern::new(true, "10.244.63.0/24")?;
    let direct = measure(
        &tern.server.ns,
        &tern.client.ns,
        tern.server.ip,
        ALL,
        profile,
    )?;
    drop(tern);
    let mut rows = vec![row(group, baseline, None, &[], direct)];
    rows.extend(cluster_ip_rows(
        group,
        Some(baseline),
        1,
        ALL,
        profile,
        &[],
    )?);
    Ok(rows)
}

/// Scenario 4: per-connection latency and rate as Services grow; each data
/// path against itself with one Service.
pub fn service_scale(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let group = "service scale";
    let mut rows: Vec<ScenarioResult> = Vec::new();
    for &n in &profile.service_counts {
        let params = [("services", n.to_string())];
        for mut r in cluster_ip_rows(group, None, n, CONNECTIONS, profile, &params)? {
            let first = profile.service_counts[0];
            if n != first {
                r.baseline = Some(format!("{} (services={first})", r.name));
            }
            rows.push(r);
        }
    }
    Ok(rows)
}

/// Scenario 6: CNI ADD and DEL, Tern against the reference bridge +
/// host-local plugins, invoked the same way.
pub fn cni(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let group = "CNI";
    let baseline = "bridge + host-local";
    eprintln!("bench: {group}");
    let lab = tern_tests::lab::Lab::new()?;
    let node = lab.node("cni", "10.244.64.0/22", Ipv4Addr::new(10, 0, 0, 11))?;
    let data_dir = std::env::temp_dir().join(tern_tests::netns::unique_name("hl"));
    let bridge_conf = json!({
        "cniVersion": "1.0.0", "name": "bench-bridge", "type": "bridge", "bridge": "cni-bench0",
        "isGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": "10.88.0.0/22", "dataDir": data_dir}
    });
    let tern_conf = node.netconf("1.0.0");
    let mut rows = Vec::new();
    for (name, conf, bin) in [
        (baseline, bridge_conf, "/usr/lib/cni/bridge"),
        (
            "Tern",
            tern_conf,
            node.bins.cni.to_str().unwrap_or_default(),
        ),
    ] {
        let mut add = metric("ADD p50", "ms", false);
        let mut add99 = metric("ADD p99", "ms", false);
        let mut del = metric("DEL p50", "ms", false);
        let mut del99 = metric("DEL p99", "ms", false);
        let mut cadd = metric("ADD p50, 20 concurrent", "ms", false);
        let mut cadd99 = metric("ADD p99, 20 concurrent", "ms", false);
        let mut cdel = metric("DEL p50, 20 concurrent", "ms", false);
        let mut cdel99 = metric("DEL p99, 20 concurrent", "ms", false);
        for _ in 0..profile.repetitions {
            let (a, d) = cni_latencies(&node, bin, &conf, profile.cni_pods, 1)?;
            add.samples.push(percentile(&a, 0.50));
            add99.samples.push(percentile(&a, 0.99));
            del.samples.push(percentile(&d, 0.50));
            del99.samples.push(percentile(&d, 0.99));
            let (a, d) = cni_latencies(&node, bin, &conf, 20, 20)?;
            cadd.samples.push(percentile(&a, 0.50));
            cadd99.samples.push(percentile(&a, 0.99));
            cdel.samples.push(percentile(&d, 0.50));
            cdel99.samples.push(percentile(&d, 0.99));
        }
        let b = if name == baseline {
            None
        } else {
            Some(baseline)
        };
        rows.push(row(
            group,
            name,
            b,
            &[("pods", profile.cni_pods.to_string())],
            vec![add, add99, del, del99, cadd, cadd99, cdel, cdel99],
        ));
    }
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
    node: &tern_tests::lab::LabNode,
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
                    tern_tests::netns::unique_name("cni"),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        add.extend(all("ADD", &group)?);
        del.extend(all("DEL", &group)?);
    }
    Ok((add, del))
}
