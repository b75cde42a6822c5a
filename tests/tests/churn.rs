//! Churn soak: pods added and deleted without pause (two at a time; some
//! DELs after the pod's netns is already gone), Services and their
//! endpoints rewritten, the agent restarted every third of the run. At
//! the end nothing may have leaked: addresses, IPAM state, ENDPOINTS
//! entries, veths, routes, link pins, Service frontends and backends all
//! match the pods and Services that are left; the agent's memory is
//! reported with its slope. `TERN_CHURN_SECONDS` sets the length (60 by
//! default; `cargo xtask soak` runs 30 minutes). Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tern_lab::lab::{Lab, LabNode, Pod};
use tern_lab::skip::require_root;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const POD_CIDR: &str = "10.244.71.0/24";
/// Pods each churning thread keeps at most.
const MAX_PODS: usize = 12;
const SERVICES: u8 = 8;

/// A random number, different in every call.
fn random(salt: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one((salt, Instant::now()))
}

/// What the churn did, for the report.
#[derive(Default)]
struct Counts {
    adds: AtomicU64,
    dels: AtomicU64,
    dels_after_netns_gone: AtomicU64,
    service_writes: AtomicU64,
}

/// Adds and deletes pods until `stop`, keeping at most MAX_PODS; every
/// third DEL comes after the pod's netns was deleted. Leaves its last
/// pods in `left`.
fn churn_pods(
    node: &RwLock<LabNode>,
    thread: u64,
    stop: &AtomicBool,
    counts: &Counts,
    left: &Mutex<Vec<Pod>>,
    live_ips: &Mutex<BTreeSet<Ipv4Addr>>,
) -> Result<()> {
    let mut pods: Vec<Pod> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let add = pods.is_empty() || (pods.len() < MAX_PODS && random(n).is_multiple_of(2));
        if add {
            let pod = node
                .read()
                .unwrap()
                .add_pod(&format!("c{thread}"))
                .with_context(|| format!("ADD {n} of thread {thread}"))?;
            counts.adds.fetch_add(1, Ordering::Relaxed);
            live_ips.lock().unwrap().insert(pod.ip);
            pods.push(pod);
            continue;
        }
        let pod = pods.swap_remove((random(n) % pods.len() as u64) as usize);
        live_ips.lock().unwrap().remove(&pod.ip);
        let Pod {
            ns, container_id, ..
        } = pod;
        let path = ns.path().to_owned();
        if n.is_multiple_of(3) {
            // The runtime removed the sandbox first: DEL must still work.
            drop(ns);
            counts.dels_after_netns_gone.fetch_add(1, Ordering::Relaxed);
            let out = node
                .read()
                .unwrap()
                .cni("DEL", &container_id, &path, "1.1.0")?;
            ensure!(out.code == Some(0), "DEL after the netns went: {out:?}");
        } else {
            let out = node
                .read()
                .unwrap()
                .cni("DEL", &container_id, &path, "1.1.0")?;
            ensure!(out.code == Some(0), "DEL: {out:?}");
        }
        counts.dels.fetch_add(1, Ordering::Relaxed);
    }
    left.lock().unwrap().extend(pods);
    Ok(())
}

/// Service `s{i}` on 10.96.71.{i}:80 -> `backends`:8080.
fn service(i: u8, backends: &[Ipv4Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|ip| {
            format!("- addresses: [\"{ip}\"]\n  nodeName: n1\n  conditions: {{ready: true}}\n")
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: s{i}, namespace: default}}
spec:
  clusterIP: 10.96.71.{}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: s{i}-1
  namespace: default
  labels: {{kubernetes.io/service-name: s{i}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
{endpoints}",
        i + 1
    )
}

/// Rewrites or removes Services with endpoints among the live pods, every
/// 100 ms; returns what is left: Service index -> its backends.
fn churn_services(
    node: &RwLock<LabNode>,
    stop: &AtomicBool,
    counts: &Counts,
    live_ips: &Mutex<BTreeSet<Ipv4Addr>>,
) -> Result<BTreeMap<u8, Vec<Ipv4Addr>>> {
    let mut services = BTreeMap::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let i = (random(n) % u64::from(SERVICES)) as u8;
        let file = format!("s{i}.yaml");
        if random(n + 1).is_multiple_of(4) {
            if services.remove(&i).is_some() {
                node.read().unwrap().remove_manifest(&file)?;
            }
        } else {
            let ips: Vec<Ipv4Addr> = live_ips
                .lock()
                .unwrap()
                .iter()
                .copied()
                .filter(|_| random(n).is_multiple_of(2))
                .take(4)
                .collect();
            node.read()
                .unwrap()
                .write_manifest(&file, &service(i, &ips))?;
            services.insert(i, ips);
        }
        counts.service_writes.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(services)
}

/// The agent's resident memory, KiB.
/// Seconds of an agent's lifetime before its RSS is expected flat.
const WARM_UP_S: f64 = 30.0;

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Least-squares slope of (seconds, KiB) samples, KiB per minute.
fn slope_kib_per_min(samples: &[(f64, u64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_m = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    let cov: f64 = samples
        .iter()
        .map(|s| (s.0 - mean_t) * (s.1 as f64 - mean_m))
        .sum();
    let var: f64 = samples.iter().map(|s| (s.0 - mean_t).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var * 60.0 }
}

fn sorted<T: Ord>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = items.into_iter().collect();
    v.sort();
    v
}

#[test]
fn churn_leaks_nothing() -> Result<()> {
    if !require_root("churn") {
        return Ok(());
    }
    let seconds: u64 = std::env::var("TERN_CHURN_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let lab = Lab::new()?;
    let node = RwLock::new(lab.node_with("n1", POD_CIDR, NODE_IP, false)?);
    let stop = AtomicBool::new(false);
    let counts = Counts::default();
    let left = Mutex::new(Vec::new());
    let live_ips = Mutex::new(BTreeSet::new());
    let started = Instant::now();
    let run = Duration::from_secs(seconds);
    // (seconds since the agent started, KiB) of the agent alive at the end.
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let mut restarts = 0;
    let services = std::thread::scope(|s| -> Result<BTreeMap<u8, Vec<Ipv4Addr>>> {
        let workers: Vec<_> = (0..2)
            .map(|t| {
                let (node, stop, counts, left, live_ips) =
                    (&node, &stop, &counts, &left, &live_ips);
                s.spawn(move || churn_pods(node, t, stop, counts, left, live_ips))
            })
            .collect();
        let services = s.spawn(|| churn_services(&node, &stop, &counts, &live_ips));
        let mut agent_started = Instant::now();
        while started.elapsed() < run && !workers.iter().any(|w| w.is_finished()) {
            std::thread::sleep(Duration::from_secs(1));
            // A restart every third of the run.
            let due = started.elapsed().as_secs_f64() / run.as_secs_f64() * 3.0;
            if due as usize > restarts && restarts < 2 {
                restarts += 1;
                let mut node = node.write().unwrap();
                node.kill_agent()?;
                node.start_agent()?;
                agent_started = Instant::now();
                rss.clear();
            }
            if let Some(kib) = node.read().unwrap().agent_pid().and_then(rss_kib) {
                rss.push((agent_started.elapsed().as_secs_f64(), kib));
            }
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap()?;
        }
        services.join().unwrap()
    })?;
    let mut node = node.into_inner().unwrap();
    let left = left.into_inner().unwrap();
    println!(
        "{seconds} s: {} ADDs, {} DELs ({} after the netns was gone), {} Service writes, {restarts} agent restarts; {} pods and {} Services left",
        counts.adds.load(Ordering::Relaxed),
        counts.dels.load(Ordering::Relaxed),
        counts.dels_after_netns_gone.load(Ordering::Relaxed),
        counts.service_writes.load(Ordering::Relaxed),
        left.len(),
        services.len()
    );
    ensure!(counts.adds.load(Ordering::Relaxed) > 20, "too little churn");

    let want_ips: Vec<String> = sorted(left.iter().map(|p| p.ip.to_string()));
    // IPAM: addresses in use and its state file.
    let status = node.agent_request(&json!({"op": "status"}))?;
    ensure!(
        status["allocated"].as_u64() == Some(left.len() as u64),
        "addresses in use: {} for {} pods",
        status["allocated"],
        left.len()
    );
    let state: Value = serde_json::from_str(&std::fs::read_to_string(
        node.dir.join("state").join("ipam.json"),
    )?)?;
    let in_state: Vec<String> = sorted(
        state["allocations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["ip"].as_str().map(str::to_owned)),
    );
    ensure!(
        in_state == want_ips,
        "ipam.json {in_state:?} != pods {want_ips:?}"
    );
    // The agent's endpoints, and (agent stopped) the pinned ENDPOINTS map.
    let endpoint_ips = |list: &Value, ip: &dyn Fn(&Value) -> Option<String>| {
        sorted(list.as_array().into_iter().flatten().filter_map(ip))
    };
    let listed: Value = serde_json::from_str(&node.tern(&["endpoint", "list", "-o", "json"])?)?;
    let in_store = endpoint_ips(&listed, &|e| Some(e["endpoint"]["ip"].as_str()?.to_owned()));
    ensure!(
        in_store == want_ips,
        "endpoints {in_store:?} != pods {want_ips:?}"
    );
    node.kill_agent()?;
    let pinned: Value = serde_json::from_str(&node.tern(&["endpoint", "list", "-o", "json"])?)?;
    ensure!(pinned["source"] == "pinned maps", "{pinned}");
    let in_map = endpoint_ips(&pinned["endpoints"], &|e| {
        Some(e["ip"].as_str()?.to_owned())
    });
    ensure!(
        in_map == want_ips,
        "ENDPOINTS {in_map:?} != pods {want_ips:?}"
    );
    node.start_agent()?;
    // Veths, routes to pods, link pins.
    // Every veth but the node's own underlay link (eth0).
    let veths = node
        .ns
        .sh("ip -o link show type veth")?
        .lines()
        .filter(|l| !l.contains(" eth0@"))
        .count();
    ensure!(veths == left.len(), "{veths} veths for {} pods", left.len());
    let routes: Vec<String> = sorted(
        node.ns
            .sh("ip -4 route show scope link")?
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .filter(|dst| dst.starts_with("10.244.71.")),
    );
    ensure!(
        routes == want_ips,
        "pod routes {routes:?} != pods {want_ips:?}"
    );
    let pins = std::fs::read_dir(node.bpffs_dir.join("links"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("from_pod_"))
        .count();
    ensure!(
        pins == left.len(),
        "{pins} pod link pins for {} pods",
        left.len()
    );
    // Services: the frontends and backends the manifests leave.
    let deadline = Instant::now() + Duration::from_secs(10);
    let want_backends: BTreeSet<Ipv4Addr> = services.values().flatten().copied().collect();
    loop {
        let status = node.agent_request(&json!({"op": "status"}))?;
        let frontends = node.frontends()?;
        let ok = frontends.len() == services.len()
            && status["backends"].as_u64() == Some(want_backends.len() as u64);
        if ok {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{} frontends / {} backends for {} Services / {} backends",
            frontends.len(),
            status["backends"],
            services.len(),
            want_backends.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let slope = slope_kib_per_min(&rss);
    let (first, last) = (
        rss.first().map_or(0, |s| s.1),
        rss.last().map_or(0, |s| s.1),
    );
    println!(
        "agent RSS over its last {:.0} s: {first} -> {last} KiB, slope {slope:+.0} KiB/min ({} samples)",
        rss.last().map_or(0.0, |s| s.0),
        rss.len()
    );
    // The curve, a sample a minute (or ten for short runs).
    let every = (rss.len() / 10).clamp(1, 60);
    let curve: Vec<String> = rss
        .iter()
        .step_by(every)
        .map(|(t, kib)| format!("{t:.0}s:{kib}"))
        .collect();
    println!(
        "agent RSS (KiB) by seconds since its start: {}",
        curve.join(" ")
    );
    ensure!(
        last < first + 16 * 1024,
        "agent RSS grew from {first} to {last} KiB"
    );
    // After its warm-up the agent's RSS stays flat (it grew ~107 KiB/min
    // with glibc's per-thread arenas); judged when the lifetime is long
    // enough to tell (the soak command, not the suite's 60 s).
    let warm: Vec<(f64, u64)> = rss.iter().copied().filter(|s| s.0 >= WARM_UP_S).collect();
    if rss.last().is_some_and(|s| s.0 >= 4.0 * WARM_UP_S) {
        let slope = slope_kib_per_min(&warm);
        println!("agent RSS after {WARM_UP_S:.0} s of warm-up: slope {slope:+.1} KiB/min");
        ensure!(
            slope < 32.0,
            "agent RSS keeps growing after its warm-up: {slope:+.1} KiB/min"
        );
    }
    for pod in &left {
        let out = node.del_pod(pod)?;
        ensure!(out.code == Some(0), "{out:?}");
    }
    let status = node.agent_request(&json!({"op": "status"}))?;
    ensure!(status["allocated"] == 0, "{status}");
    Ok(())
}
