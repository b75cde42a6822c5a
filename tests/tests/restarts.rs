//! Agent restarts under steady traffic: two nodes, backends on n2, a
//! client pod on n1 and an external client, 10 000 other Services in the
//! manifests; the agents are stopped 10 times (SIGKILL and SIGTERM in
//! turn, at random moments, one of them in the middle of a sync that
//! rewrites the 10 000) and started again. Counts what the traffic lost.
//! Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use tern_lab::lab::{Lab, LabNode};
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

tern_lab::both_service_paths!(
    socket_lb: true,
    per_packet: false;
    traffic_survives_agent_restarts,
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
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = node.agent_request(&serde_json::json!({"op": "status"}))?;
        if status["services"].as_u64() == Some(BULK as u64 + 1)
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

fn traffic_survives_agent_restarts(socket_lb: bool) -> Result<()> {
    let lab = Lab::new()?;
    let mut nodes = lab.cluster(2, "overlay")?;
    let client = nodes[0].add_pod("client")?;
    let b0 = nodes[1].add_pod("b0")?;
    let b1 = nodes[1].add_pod("b1")?;
    let _servers = [
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
    // Socket-LB serves the processes of the node's pods cgroup.
    let _pods = socket_lb
        .then(|| nodes[0].enter_pods_cgroup())
        .transpose()?;

    let stop = AtomicBool::new(false);
    let long = Mutex::new(Tally::default());
    let short = Mutex::new(Tally::default());
    let udp = Mutex::new(Tally::default());
    let node_port = Mutex::new(Tally::default());
    let vip = SocketAddr::from((VIP, 80));
    let external_to = SocketAddr::from((nodes[0].node_ip, NODE_PORT));
    let mut restarts = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        s.spawn(|| long_streams(&client.ns, vip, &stop, &long));
        s.spawn(|| short_connections(&client.ns, vip, &stop, &short));
        s.spawn(|| udp_requests(&client.ns, vip, &stop, &udp));
        // The test process is in the pods cgroup with socket-LB: its
        // connects would be translated at the socket, not the NodePort's
        // per-packet path; that path is the same with socket-LB on.
        if !socket_lb {
            s.spawn(|| short_connections(&external, external_to, &stop, &node_port));
        }
        let outcome = (|| -> Result<()> {
            std::thread::sleep(Duration::from_secs(1));
            // TERN_RESTARTS=0: the same traffic without restarts, to tell
            // what the restarts cost from what the traffic costs anyway.
            let restarts_wanted = std::env::var("TERN_RESTARTS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(RESTARTS);
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
                restarts.push(format!(
                    "{} {signal}: answering again after {:?}",
                    node.name,
                    started.elapsed()
                ));
            }
            for node in &nodes {
                wait_for_full_sync(node)?;
            }
            std::thread::sleep(Duration::from_secs(if restarts_wanted == 0 {
                60
            } else {
                1
            }));
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        outcome
    })?;

    for line in &restarts {
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
        ensure!(t.failed == 0, "{what} failed across restarts: {t:?}");
        ensure!(
            t.longest_gap < TIMEOUT,
            "{what}: a gap in service of {:?}",
            t.longest_gap
        );
    }
    Ok(())
}
