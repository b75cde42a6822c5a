//! Scenario 5, the control plane: how fast a change of the Service model
//! reaches the datapath, and what the agent costs in memory as Services
//! grow. The datapath is read where the eBPF programs read it: the pinned
//! maps.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use serde_json::json;
use tern_common::{Backend, ServiceKey, ServiceValue, maps as map_names};
use tern_lab::apiserver::ApiServer;
use tern_lab::lab::{Lab, LabNode};
use tern_lab::netns::Netns;

use super::kube_proxy::{self, IptablesBackend};
use super::report::{Metric, ScenarioResult};
use super::scenarios::{Profile, percentile, row};
use super::topology::PLAIN_CLUSTER_CIDR;
use tern_lab::commands::{map_memlock_kib, rss_kib, scale_manifest};

const GROUP: &str = "control plane";
/// The Service whose endpoint changes.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const BACKENDS_PER_SERVICE: usize = 10;

pub fn control_plane(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    eprintln!("bench: {GROUP}");
    let lab = Lab::new()?;
    let node = lab.node("cp", "10.244.65.0/24", Ipv4Addr::new(10, 0, 0, 11))?;
    let pid = node.agent_pid().context("agent pid")?;
    let mut rows = Vec::new();

    // One endpoint change at a time, with only that Service loaded.
    let alone = endpoint_changes(&node, profile.endpoint_changes)?;
    rows.push(change_row("Tern, 1 Service loaded", alone));

    // Cold load of the large set, then the same changes next to it.
    let big = profile.control_plane_services;
    let idle_rss = rss_kib(pid)?;
    let load = cold_load(&node, big)?;
    let loaded_rss = settled_rss(pid)?;
    let maps = map_memlock_kib(pid)? as f64 / 1024.0;
    let beside = endpoint_changes(&node, profile.endpoint_changes)?;
    rows.push(change_row(&format!("Tern, {big} Services loaded"), beside));

    let mut memory = vec![
        single("agent RSS, 0 Services", "MiB", idle_rss as f64 / 1024.0),
        single(
            &format!("agent RSS, {big} Services"),
            "MiB",
            loaded_rss as f64 / 1024.0,
        ),
        single(&format!("map memory, {big} Services"), "MiB", maps),
    ];
    if let Some(huge) = profile.control_plane_max_services {
        let huge_load = cold_load(&node, huge)?;
        memory.push(single(
            &format!("agent RSS, {huge} Services"),
            "MiB",
            settled_rss(pid)? as f64 / 1024.0,
        ));
        memory.push(single(
            &format!("map memory, {huge} Services"),
            "MiB",
            map_memlock_kib(pid)? as f64 / 1024.0,
        ));
        memory.push(single(
            &format!("load {huge} x {BACKENDS_PER_SERVICE}"),
            "s",
            huge_load,
        ));
    }
    drop(node);

    // The same changes with the agent watching an API server (the stand-in
    // the tests use, in the node's namespace): one watch event per change,
    // folded into the agent's store, instead of a directory re-read.
    let (api_alone, api_beside) = api_watch_changes(&lab, profile)?;
    rows.push(change_row("Tern API watch, 1 Service loaded", api_alone));
    rows.push(change_row(
        &format!("Tern API watch, {big} Services loaded"),
        api_beside,
    ));
    drop(lab);

    // Loading the same set as kube-proxy's iptables rules (one
    // iptables-restore, as kube-proxy's full sync does) is the baseline.
    let baseline = format!("kube-proxy iptables-restore, {big} x {BACKENDS_PER_SERVICE}");
    let endpoints: Vec<(Ipv4Addr, u16)> = (0..BACKENDS_PER_SERVICE as u8)
        .map(|i| (Ipv4Addr::new(10, 10, 2, 2 + i), 8080))
        .collect();
    let rules = kube_proxy::synthetic_services(big, BACKENDS_PER_SERVICE, &endpoints);
    let router = Netns::new("cpr")?;
    let started = Instant::now();
    kube_proxy::apply_iptables_with(&router, &rules, PLAIN_CLUSTER_CIDR, IptablesBackend::Legacy)?;
    let iptables = started.elapsed().as_secs_f64();
    drop(router);
    let load_metric = format!("load {big} x {BACKENDS_PER_SERVICE}");
    rows.push(row(
        GROUP,
        &baseline,
        None,
        &[],
        vec![single(&load_metric, "s", iptables)],
    ));
    let mut tern_load = vec![single(&load_metric, "s", load)];
    tern_load.extend(memory);
    rows.push(row(
        GROUP,
        "Tern manifest -> maps",
        Some(&baseline),
        &[],
        tern_load,
    ));
    Ok(rows)
}

fn api_watch_changes(lab: &Lab, profile: &Profile) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut node = LabNode::create(
        lab,
        "cpk",
        Some("10.244.66.0/24"),
        Ipv4Addr::new(10, 0, 0, 12),
    )?;
    let (api, _running) = ApiServer::spawn_in(node.ns.path())?;
    let kubeconfig = node.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    node.kubeconfig = Some(kubeconfig);
    node.start_agent()?;
    let alone = api_endpoint_changes(&node, &api, profile.endpoint_changes)?;
    let big = profile.control_plane_services;
    let list: serde_json::Value =
        serde_json::from_slice(&scale_manifest(big, BACKENDS_PER_SERVICE)?)?;
    let started = Instant::now();
    for object in list["items"].as_array().into_iter().flatten() {
        api.apply(object.clone());
    }
    wait_for_frontends(&node, big, started)?;
    let beside = api_endpoint_changes(&node, &api, profile.endpoint_changes)?;
    Ok((alone, beside))
}

pub(crate) fn single(name: &str, unit: &str, value: f64) -> Metric {
    Metric {
        name: name.into(),
        unit: unit.into(),
        higher_is_better: false,
        samples: vec![value],
    }
}

fn change_row(name: &str, latencies_ms: Vec<f64>) -> ScenarioResult {
    let changes = latencies_ms.len().to_string();
    row(
        GROUP,
        name,
        None,
        &[("changes", changes)],
        vec![
            single(
                "endpoint change -> datapath p50",
                "ms",
                percentile(&latencies_ms, 0.50),
            ),
            single(
                "endpoint change -> datapath p99",
                "ms",
                percentile(&latencies_ms, 0.99),
            ),
            single(
                "endpoint change -> datapath max",
                "ms",
                percentile(&latencies_ms, 1.0),
            ),
        ],
    )
}

/// Replaces the one endpoint of the Service at `VIP` `changes` times
/// through the node's manifest directory: each timed from the manifest's
/// rename.
fn endpoint_changes(node: &LabNode, changes: usize) -> Result<Vec<f64>> {
    timed_changes(node, changes, |endpoint| {
        let tmp = node.manifests_dir.join(".changing.json.tmp");
        std::fs::write(&tmp, changing_service(endpoint).to_string())?;
        let started = Instant::now();
        std::fs::rename(&tmp, node.manifests_dir.join("changing.json"))?;
        Ok(started)
    })
}

/// The same through the API: each timed from the slice's watch event.
fn api_endpoint_changes(node: &LabNode, api: &ApiServer, changes: usize) -> Result<Vec<f64>> {
    timed_changes(node, changes, |endpoint| {
        let list = changing_service(endpoint);
        let mut items = list["items"].as_array().cloned().unwrap_or_default();
        let slice = items.pop().context("the changing slice")?;
        for object in items {
            api.apply(object); // the Service: unchanged after the first time
        }
        let started = Instant::now();
        api.apply(slice);
        Ok(started)
    })
}

/// Makes `changes` endpoint changes with `publish` (which returns when it
/// started the change) and times each to the moment the pinned maps send
/// the Service's traffic to the new endpoint.
fn timed_changes(
    node: &LabNode,
    changes: usize,
    mut publish: impl FnMut(Ipv4Addr) -> Result<Instant>,
) -> Result<Vec<f64>> {
    let maps = PinnedServiceMaps::open(&node.bpffs_dir)?;
    let mut latencies = Vec::with_capacity(changes);
    for i in 0..changes {
        super::interrupt::check()?;
        let endpoint = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 1)) + i as u32);
        let started = publish(endpoint)?;
        while maps.first_backend(VIP, 80)? != Some(endpoint) {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "endpoint {endpoint} not in the datapath after 30 s:\n{}",
                node.agent_log_tail()
            );
            // Short enough not to blur the figure, long enough to leave
            // the agent its CPU.
            std::thread::sleep(Duration::from_micros(50));
        }
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(latencies)
}

fn changing_service(endpoint: Ipv4Addr) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "changing", "namespace": "bench"},
         "spec": {"clusterIP": VIP.to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "changing-1", "namespace": "bench", "labels": {"kubernetes.io/service-name": "changing"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": [endpoint.to_string()], "conditions": {"ready": true}}]}]})
}

/// Seconds from the rename of a `services` x 10 manifest into the
/// directory to the agent reporting every frontend written.
fn cold_load(node: &LabNode, services: usize) -> Result<f64> {
    let list = scale_manifest(services, BACKENDS_PER_SERVICE)?;
    let tmp = node.manifests_dir.join(".scale.json.tmp");
    std::fs::write(&tmp, &list)?;
    drop(list);
    let started = Instant::now();
    std::fs::rename(&tmp, node.manifests_dir.join("scale.json"))?;
    wait_for_frontends(node, services, started)
}

/// Waits until the agent has the changing Service and `services` more
/// frontends; seconds since `started`.
fn wait_for_frontends(node: &LabNode, services: usize, started: Instant) -> Result<f64> {
    // The changing Service stays loaded beside the set.
    let want = services as u64 + 1;
    loop {
        // The agent answers once the sync that holds its state is done.
        if let Ok(status) = node.agent_request(&json!({"op": "status"})) {
            if status["frontends"].as_u64() == Some(want) {
                return Ok(started.elapsed().as_secs_f64());
            }
            anyhow::ensure!(
                status["last_sync"]["errors"].as_u64() == Some(0),
                "loading {services} Services failed:\n{}",
                node.agent_log_tail()
            );
        }
        super::interrupt::check()?;
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{services} Services not loaded after 10 minutes:\n{}",
            node.agent_log_tail()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// RSS once the sync has handed parsing's memory back.
pub(crate) fn settled_rss(pid: u32) -> Result<u64> {
    std::thread::sleep(Duration::from_secs(2));
    rss_kib(pid)
}

/// The SERVICES and BACKENDS maps as the agent pinned them.
struct PinnedServiceMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
}

impl PinnedServiceMaps {
    fn open(bpffs_dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = bpffs_dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            Ok(Map::HashMap(data))
        };
        Ok(PinnedServiceMaps {
            services: HashMap::try_from(open(map_names::SERVICES)?)?,
            backends: HashMap::try_from(open(map_names::BACKENDS)?)?,
        })
    }

    /// The address slot 1 of the TCP frontend `ip:port` points at.
    fn first_backend(&self, ip: Ipv4Addr, port: u16) -> Result<Option<Ipv4Addr>> {
        let key = ServiceKey {
            addr: u32::from_ne_bytes(ip.octets()),
            port: port.to_be(),
            slot: 1,
            proto: 6,
            scope: 0,
            pad: 0,
        };
        let Ok(slot) = self.services.get(&key, 0) else {
            return Ok(None);
        };
        let Ok(backend) = self.backends.get(&slot.backend_id, 0) else {
            return Ok(None);
        };
        Ok(Some(Ipv4Addr::from(backend.addr.to_ne_bytes())))
    }
}
