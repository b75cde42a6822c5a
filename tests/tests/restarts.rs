//! The agent stopped under steady traffic: two nodes, backends on n2, a
//! client pod on n1 and an external client, 10 000 other Services in the
//! manifests. Three ways: stopped 10 times (SIGKILL and SIGTERM in turn,
//! at random moments, one of them in the middle of a sync that rewrites
//! the 10 000); upgraded in place to a build whose programs differ and
//! rolled back; started while its API server is down. Counts what the
//! traffic lost. Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tern_lab::apiserver::ApiServer;
use tern_lab::lab::{Lab, LabNode, Pod};
use tern_lab::netns::Netns;
use tern_lab::traffic::{EchoServer, tcp_exchange};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const PORT: u16 = 8080;
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// Services besides the one under traffic, so that every start syncs a
/// realistic amount and a stop can land in the middle of a sync.
const BULK: usize = 10_000;
const RESTARTS: usize = 10;
/// A request not answered within this counts as failed (lost).
const TIMEOUT: Duration = Duration::from_millis(1000);
/// Under target/release: the agent whose programs differ (`cargo xtask
/// build` builds it with the feature `ebpf-upgrade-probe`).
const UPGRADE_PROBE_AGENT: &str = "upgrade-probe/tern-agent";

tern_lab::both_service_paths!(
    socket_lb: true,
    per_packet: false;
    traffic_survives_agent_restarts,
    traffic_survives_an_upgrade_to_programs_that_differ,
    traffic_survives_an_agent_start_while_the_api_server_is_down,
);

/// What one kind of traffic saw.
#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    failed: u64,
    /// Longest time between two answered requests.
    longest_gap: Duration,
    first_errors: Vec<String>,
}

/// Keeps a [`Tally`] for a load loop: answered and failed requests and
/// the longest wait between two answers.
struct Meter<'a> {
    tally: &'a Mutex<Tally>,
    last_ok: Instant,
}

impl<'a> Meter<'a> {
    fn new(tally: &'a Mutex<Tally>) -> Self {
        Meter {
            tally,
            last_ok: Instant::now(),
        }
    }

    fn count<T>(&mut self, outcome: Result<T>) {
        let mut tally = self.tally.lock().unwrap();
        match outcome {
            Ok(_) => {
                tally.ok += 1;
                let gap = self.last_ok.elapsed();
                tally.longest_gap = tally.longest_gap.max(gap);
                self.last_ok = Instant::now();
            }
            Err(e) => {
                tally.failed += 1;
                if tally.first_errors.len() < 5 {
                    tally.first_errors.push(format!("{e:#}"));
                }
            }
        }
    }
}

/// Long-lived connections, each exchanging a line every 20 ms.
fn long_streams(ns: &Netns, to: SocketAddr, stop: &AtomicBool, tally: &Mutex<Tally>) {
    ns.run(|| {
        let mut streams: Vec<TcpStream> = (0..4)
            .filter_map(|_| TcpStream::connect_timeout(&to, TIMEOUT).ok())
            .collect();
        for s in &streams {
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
        }
        let mut meter = Meter::new(tally);
        if streams.len() < 4 {
            meter.count::<()>(Err(anyhow::anyhow!("connect to {to} failed")));
        }
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) && !streams.is_empty() {
            n += 1;
            let line = format!("l{n}");
            let mut alive = Vec::new();
            for mut s in streams {
                match tcp_exchange(&mut s, &line) {
                    Ok(echo) if echo.ends_with(&line) => {
                        meter.count(Ok(()));
                        alive.push(s);
                    }
                    Ok(echo) => meter.count::<()>(Err(anyhow::anyhow!("bad echo {echo:?}"))),
                    Err(e) => meter.count::<()>(Err(e.context("established connection lost"))),
                }
            }
            streams = alive;
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

/// New connections one after another, each one request, the server
/// closing first (as with `Connection: close`).
fn short_connections(ns: &Netns, to: SocketAddr, stop: &AtomicBool, tally: &Mutex<Tally>) {
    ns.run(|| {
        let mut meter = Meter::new(tally);
        while !stop.load(Ordering::Relaxed) {
            meter.count(one_short_connection(to));
        }
    });
}

fn one_short_connection(to: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"close?\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    ensure!(answer.contains("close?"), "answer {answer:?}");
    Ok(())
}

/// UDP request/response every 5 ms; an answer later than TIMEOUT is lost.
fn udp_requests(ns: &Netns, to: SocketAddr, stop: &AtomicBool, tally: &Mutex<Tally>) {
    ns.run(|| {
        let mut meter = Meter::new(tally);
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut n = 0u64;
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let message = format!("u{n}");
            let outcome = socket
                .send_to(format!("{message}\n").as_bytes(), to)
                .map_err(anyhow::Error::from)
                .and_then(|_| {
                    loop {
                        // Skip late answers to earlier requests.
                        let (len, _) = socket.recv_from(&mut buf)?;
                        if String::from_utf8_lossy(&buf[..len]).contains(&message) {
                            return Ok(());
                        }
                    }
                })
                .map_err(|e| e.context(format!("UDP request {message}")));
            meter.count(outcome);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}

/// The web Service (ClusterIP and NodePort) -> the two backends on n2.
fn web_service(backends: &[Ipv4Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|ip| {
            format!("- addresses: [\"{ip}\"]\n  nodeName: n2\n  conditions: {{ready: true}}\n")
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP}
  ports:
  - {{name: tcp, port: 80, targetPort: {PORT}, nodePort: {NODE_PORT}, protocol: TCP}}
  - {{name: udp, port: 80, targetPort: {PORT}, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: tcp, port: {PORT}, protocol: TCP}}, {{name: udp, port: {PORT}, protocol: UDP}}]
endpoints:
{endpoints}"
    )
}

/// BULK ClusterIP Services without endpoints, on `port`: changing the
/// port rewrites every one of them.
fn bulk_services(port: u16) -> String {
    let mut yaml = String::with_capacity(BULK * 160);
    for i in 0..BULK {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bulk-{i}, namespace: default}}\nspec:\n  clusterIP: 10.97.{}.{}\n  ports: [{{port: {port}}}]\n---\n",
            i / 250,
            i % 250 + 1
        ));
    }
    yaml
}

/// A random duration in [0, max), different in every run.
fn random_below(max: Duration, salt: usize) -> Duration {
    let r = std::collections::hash_map::RandomState::new().hash_one(salt);
    max.mul_f64((r % 10_000) as f64 / 10_000.0)
}

/// Waits until `node`'s last sync has every Service of the manifests:
/// BULK + the web Service's frontends.
fn wait_for_full_sync(node: &LabNode) -> Result<()> {
    wait_for_sync_of(node, BULK as u64 + 1)
}

/// Waits until `node`'s last sync, without errors, has `services` Services.
fn wait_for_sync_of(node: &LabNode, services: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = node.agent_request(&json!({"op": "status"}))?;
        if status["services"].as_u64() == Some(services)
            && status["last_sync_age_s"].is_u64()
            && status["last_sync"]["errors"] == 0
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} never synced: {status}\n{}",
            node.name,
            node.agent_log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The two-node lab of every scenario, synced (fields drop in order: the
/// lab last).
struct Setup {
    ends: Ends,
    nodes: Vec<LabNode>,
    _lab: Lab,
}

/// Where the traffic comes from and goes to.
struct Ends {
    client: Pod,
    external: Netns,
    _servers: [EchoServer; 2],
    backends: [Pod; 2],
    socket_lb: bool,
}

fn setup(socket_lb: bool) -> Result<Setup> {
    let lab = Lab::new()?;
    let mut nodes = lab.cluster(2, "overlay")?;
    let client = nodes[0].add_pod("client")?;
    let b0 = nodes[1].add_pod("b0")?;
    let b1 = nodes[1].add_pod("b1")?;
    let servers = [
        EchoServer::start(&b0.ns, PORT, "b0")?,
        EchoServer::start(&b1.ns, PORT, "b1")?,
    ];
    let external = lab.external_client(EXTERNAL_IP)?;
    for node in &mut nodes {
        node.write_manifest("web.yaml", &web_service(&[b0.ip, b1.ip]))?;
        node.write_manifest("bulk.yaml", &bulk_services(81))?;
        node.kill_agent()?;
        node.socket_lb = socket_lb;
        node.start_agent()?;
    }
    for node in &nodes {
        wait_for_full_sync(node)?;
    }
    Ok(Setup {
        ends: Ends {
            client,
            external,
            _servers: servers,
            backends: [b0, b1],
            socket_lb,
        },
        nodes,
        _lab: lab,
    })
}

/// Runs the traffic (long TCP streams, short connections and UDP to the
/// ClusterIP from the client pod; short NodePort connections from outside
/// on the per-packet path) around `disrupt`, then judges it: nothing
/// failed, no gap of a second or more. `disrupt` returns lines to print.
fn under_traffic(
    ends: &Ends,
    nodes: &mut [LabNode],
    disrupt: impl FnOnce(&mut [LabNode]) -> Result<Vec<String>> + Send,
) -> Result<()> {
    // Socket-LB serves the processes of the node's pods cgroup.
    let _pods = ends
        .socket_lb
        .then(|| nodes[0].enter_pods_cgroup())
        .transpose()?;
    let stop = AtomicBool::new(false);
    let long = Mutex::new(Tally::default());
    let short = Mutex::new(Tally::default());
    let udp = Mutex::new(Tally::default());
    let node_port = Mutex::new(Tally::default());
    let vip = SocketAddr::from((VIP, 80));
    let external_to = SocketAddr::from((nodes[0].node_ip, NODE_PORT));
    let socket_lb = ends.socket_lb;
    let (client, external) = (&ends.client.ns, &ends.external);
    let lines = std::thread::scope(|s| -> Result<Vec<String>> {
        s.spawn(|| long_streams(client, vip, &stop, &long));
        s.spawn(|| short_connections(client, vip, &stop, &short));
        s.spawn(|| udp_requests(client, vip, &stop, &udp));
        // The test process is in the pods cgroup with socket-LB: its
        // connects would be translated at the socket, not the NodePort's
        // per-packet path; that path is the same with socket-LB on.
        if !socket_lb {
            s.spawn(|| short_connections(external, external_to, &stop, &node_port));
        }
        let outcome = (|| {
            std::thread::sleep(Duration::from_secs(1));
            let lines = disrupt(nodes)?;
            std::thread::sleep(Duration::from_secs(1));
            Ok(lines)
        })();
        stop.store(true, Ordering::Relaxed);
        outcome
    })?;

    for line in &lines {
        println!("{line}");
    }
    let report = |what: &str, t: &Mutex<Tally>| {
        let t = t.lock().unwrap();
        println!(
            "{what}: {} answered, {} failed, longest gap {:?} {:?}",
            t.ok, t.failed, t.longest_gap, t.first_errors
        );
    };
    report("established connections (exchanges)", &long);
    report("short connections to the ClusterIP", &short);
    report("UDP requests to the ClusterIP", &udp);
    let mut judged = vec![
        ("established connections", &long),
        ("short connections", &short),
        ("UDP requests", &udp),
    ];
    if !socket_lb {
        report("short connections to the NodePort from outside", &node_port);
        judged.push(("NodePort connections", &node_port));
    }
    for (what, t) in judged {
        let t = t.lock().unwrap();
        ensure!(t.ok > 100, "{what}: too little traffic to judge: {t:?}");
        ensure!(t.failed == 0, "{what} failed: {t:?}");
        ensure!(
            t.longest_gap < TIMEOUT,
            "{what}: a gap in service of {:?}",
            t.longest_gap
        );
    }
    Ok(())
}

fn traffic_survives_agent_restarts(socket_lb: bool) -> Result<()> {
    let mut setup = setup(socket_lb)?;
    under_traffic(&setup.ends, &mut setup.nodes, |nodes| {
        // TERN_RESTARTS=0: the same traffic without restarts, to tell
        // what the restarts cost from what the traffic costs anyway.
        let restarts_wanted = std::env::var("TERN_RESTARTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(RESTARTS);
        let mut lines = Vec::new();
        for i in 0..restarts_wanted {
            let node = &mut nodes[i % 2];
            if i == 4 {
                // In the middle of a sync: every bulk Service changes,
                // the agent is stopped while it writes them.
                node.write_manifest("bulk.yaml", &bulk_services(82))?;
                std::thread::sleep(Duration::from_millis(300));
            } else {
                std::thread::sleep(random_below(Duration::from_millis(1500), i));
            }
            let started = Instant::now();
            let signal = if i % 2 == 0 {
                node.kill_agent()?;
                "SIGKILL"
            } else {
                node.terminate_agent()?;
                "SIGTERM"
            };
            node.start_agent()?;
            lines.push(format!(
                "{} {signal}: answering again after {:?}",
                node.name,
                started.elapsed()
            ));
        }
        for node in nodes.iter() {
            wait_for_full_sync(node)?;
        }
        if restarts_wanted == 0 {
            std::thread::sleep(Duration::from_secs(60));
        }
        Ok(lines)
    })
}

/// Each tern program loaded since `first_id`, by (name, tag): the tag is
/// the kernel's hash of the program's instructions.
fn programs_since(first_id: u32) -> Result<BTreeSet<(String, u64)>> {
    // The kernel keeps the first 15 bytes of a program's name.
    let tern_names: Vec<&str> = tern_common::programs::ALL
        .iter()
        .map(|name| &name[..name.len().min(15)])
        .collect();
    let mut programs = BTreeSet::new();
    for program in aya::programs::loaded_programs() {
        let program = program?;
        let name = program.name_as_str().unwrap_or_default();
        if program.id() >= first_id && tern_names.contains(&name) {
            programs.insert((name.to_owned(), program.tag()));
        }
    }
    Ok(programs)
}

/// The next program id the kernel will give (ids only grow).
fn next_program_id() -> Result<u32> {
    let mut last = 0;
    for program in aya::programs::loaded_programs() {
        last = last.max(program?.id());
    }
    Ok(last + 1)
}

/// Runs of the upgrade-probe programs counted in `node`'s pinned map.
fn probe_runs(node: &LabNode) -> Result<u64> {
    let pin = node.bpffs_dir.join("UPGRADE_PROBE");
    let map = aya::maps::MapData::from_pin(&pin)
        .with_context(|| format!("{} is not pinned", pin.display()))?;
    let counts: aya::maps::PerCpuArray<_, u64> = aya::maps::Map::PerCpuArray(map).try_into()?;
    Ok(counts.get(&0, 0)?.iter().sum())
}

/// Stops each node's agent with SIGTERM, as a DaemonSet rollout does, and
/// starts `agent` in its place; returns a line per node.
fn roll_out(nodes: &mut [LabNode], agent: &Path) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for node in nodes {
        let started = Instant::now();
        node.terminate_agent()?;
        node.bins.agent = agent.to_owned();
        node.start_agent()?;
        wait_for_full_sync(node)?;
        lines.push(format!(
            "{} now runs {}: answering and synced after {:?}",
            node.name,
            agent.display(),
            started.elapsed()
        ));
    }
    Ok(lines)
}

/// An in-place upgrade to an agent whose programs differ (each counts its
/// runs in a map of its own, as a new release adds code and a map), then
/// a rollback: every link must hold the new programs — no old one stays
/// loaded — and the traffic must not notice either way.
fn traffic_survives_an_upgrade_to_programs_that_differ(socket_lb: bool) -> Result<()> {
    let first_id = next_program_id()?;
    let mut setup = setup(socket_lb)?;
    let current = setup.nodes[0].bins.agent.clone();
    let upgraded = current
        .parent()
        .context("the agent's directory")?
        .join(UPGRADE_PROBE_AGENT);
    ensure!(
        upgraded.is_file(),
        "{} is missing: `cargo xtask build` builds it (the agent with the feature ebpf-upgrade-probe)",
        upgraded.display()
    );
    let old = programs_since(first_id)?;
    ensure!(
        old.len() == tern_common::programs::ALL.len(),
        "not every tern program is loaded, once per build: {old:?}"
    );
    under_traffic(&setup.ends, &mut setup.nodes, |nodes| {
        let mut lines = roll_out(nodes, &upgraded)?;
        let new = programs_since(first_id)?;
        let still_loaded: Vec<_> = old.intersection(&new).collect();
        ensure!(
            still_loaded.is_empty(),
            "programs of the old build are still loaded (held by a link): {still_loaded:?}"
        );
        let names = |set: &BTreeSet<(String, u64)>| -> BTreeSet<String> {
            set.iter().map(|(name, _)| name.clone()).collect()
        };
        ensure!(
            names(&old) == names(&new),
            "the upgrade loaded other programs: {:?} -> {:?}",
            names(&old),
            names(&new)
        );
        for node in nodes.iter() {
            let before = probe_runs(node)?;
            std::thread::sleep(Duration::from_millis(300));
            let after = probe_runs(node)?;
            ensure!(
                after > before,
                "{}: the new programs did not run ({before} -> {after} runs)",
                node.name
            );
            lines.push(format!(
                "{}: the new programs ran {after} times so far",
                node.name
            ));
        }
        lines.extend(roll_out(nodes, &current)?);
        let back = programs_since(first_id)?;
        ensure!(
            back == old,
            "after the rollback the programs are not the first build's: {old:?} -> {back:?}"
        );
        for node in nodes.iter() {
            let before = probe_runs(node)?;
            std::thread::sleep(Duration::from_millis(300));
            ensure!(
                probe_runs(node)? == before,
                "{}: an upgrade-probe program still runs after the rollback",
                node.name
            );
        }
        Ok(lines)
    })
}

/// n1's objects for its API server: both Nodes and the web Service.
fn api_objects(nodes: &[LabNode], backends: &[Ipv4Addr]) -> Vec<Value> {
    let mut objects: Vec<Value> = nodes
        .iter()
        .map(|node| {
            let cidr = node.pod_cidr.clone().unwrap_or_default();
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name},
                "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                "status": {"addresses": [{"type": "InternalIP", "address": node.node_ip.to_string()}]}})
        })
        .collect();
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "nodeName": "n2", "conditions": {"ready": true}}))
        .collect();
    objects.push(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": VIP.to_string(), "clusterIPs": [VIP.to_string()],
            "ports": [
                {"name": "tcp", "port": 80, "targetPort": PORT, "nodePort": NODE_PORT, "protocol": "TCP"},
                {"name": "udp", "port": 80, "targetPort": PORT, "protocol": "UDP"}]}}));
    objects.push(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP"},
                  {"name": "udp", "port": PORT, "protocol": "UDP"}]}),
    );
    objects
}

/// n1's agent reads a (stand-in) API server; the server goes down, the
/// agent is SIGKILLed and started again while it is down. Meanwhile the
/// pinned datapath serves, `tern service list` shows it unconfirmed, a
/// new pod gets its address and reaches the Service; when the server is
/// back the agent follows it within a second.
fn traffic_survives_an_agent_start_while_the_api_server_is_down(socket_lb: bool) -> Result<()> {
    let mut setup = setup(socket_lb)?;
    let backends = [setup.ends.backends[0].ip, setup.ends.backends[1].ip];
    let (api, _running) = ApiServer::spawn_in(setup.nodes[0].ns.path())?;
    for object in api_objects(&setup.nodes, &backends) {
        api.apply(object);
    }
    let n1 = &mut setup.nodes[0];
    let kubeconfig = n1.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    n1.kubeconfig = Some(kubeconfig);
    n1.kill_agent()?;
    n1.start_agent()?;
    wait_for_sync_of(n1, 1)?;
    let down = Duration::from_secs(6);
    under_traffic(&setup.ends, &mut setup.nodes, |nodes| {
        let n1 = &mut nodes[0];
        api.down_for(down);
        let back = Instant::now() + down;
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        n1.kill_agent()?;
        n1.start_agent()?;
        let mut lines = vec![format!(
            "n1 SIGKILL, started with its API server down: answering after {:?}",
            started.elapsed()
        )];
        let web = format!("{VIP}:80/TCP");
        let shown = n1.frontends()?;
        let unconfirmed = shown
            .iter()
            .find(|f| f["frontend"] == web.as_str())
            .is_some_and(|f| f["flags"].to_string().contains("unconfirmed"));
        ensure!(
            unconfirmed,
            "{web} not shown as served but unconfirmed: {shown:?}"
        );
        let late = n1.add_pod("late")?;
        late.ns
            .run(|| one_short_connection(SocketAddr::from((VIP, 80))))
            .context("a pod added while the API server is down, to the ClusterIP")?;
        ensure!(
            Instant::now() < back,
            "the API server came back before the checks ended: make `down` longer"
        );
        api.apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "after", "namespace": "default"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.11"],
                "ports": [{"name": "tcp", "port": 80, "targetPort": PORT, "protocol": "TCP"}]}}));
        let after = "10.96.0.11:80/TCP";
        while !n1.frontends()?.iter().any(|f| f["frontend"] == after) {
            if back.elapsed() > Duration::from_secs(15) {
                bail!("{after} never arrived\n{}", n1.agent_log_tail());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let recovery = Instant::now().saturating_duration_since(back);
        lines.push(format!(
            "n1 followed its API server {recovery:?} after it was back"
        ));
        // The target is 1 s; the CLI poll adds a few ms.
        ensure!(
            recovery < Duration::from_millis(1100),
            "the datapath followed the API {recovery:?} after it was back"
        );
        wait_for_sync_of(n1, 2)?;
        Ok(lines)
    })
}
