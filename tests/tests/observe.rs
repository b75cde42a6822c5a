//! Flow observability end to end: real agents on two lab nodes, pods
//! wired by tern-cni, real traffic; what the datapath reports must show
//! up in `tern observe` (the real CLI against the real agent) with the
//! right type, reason, pods, Service and node within a second. Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tern_lab::lab::{Lab, LabNode, OUTSIDE_IP, Pod, list_manifest, namespace_object, pod_object};
use tern_lab::netns::ChildGuard;
use tern_lab::traffic::{EchoServer, agent_http_get, tcp_connect_from, udp_roundtrip};

/// Events reach `tern observe` within this (the promise).
const WITHIN: Duration = Duration::from_secs(1);
/// Manifest changes reach the datapath within this (poll + sync).
const SETTLE: Duration = Duration::from_secs(8);
const SERVER_PORT: u16 = 8080;
/// An address of n1's PodCIDR that no pod has.
const NO_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 200);
const EMPTY_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const WEB_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 41);
/// internalTrafficPolicy Local, its one endpoint on n2.
const LOCAL_ONLY_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 42);

tern_lab::both_service_paths!(
    socket_lb: true, per_packet: false;
    drops_show_with_their_reason_pods_and_node,
    translations_show_frontend_and_chosen_backend,
);

#[test]
fn filters_json_and_follow() -> Result<()> {
    if !tern_lab::skip::require_root("filters_json_and_follow") {
        return Ok(());
    }
    filters(true)
}

#[test]
fn trace_mode_shows_every_observation_point() -> Result<()> {
    if !tern_lab::skip::require_root("trace_mode_shows_every_observation_point") {
        return Ok(());
    }
    trace_mode()
}

#[test]
fn ring_overflow_is_counted_and_reported() -> Result<()> {
    if !tern_lab::skip::require_root("ring_overflow_is_counted_and_reported") {
        return Ok(());
    }
    ring_overflow()
}

/// Two nodes; n1 has pods client and server (echo on 8080), n2 has
/// remote (echo on 8080); Pod and Namespace objects on every node; the
/// Service "empty" has no endpoints, "web" sends to server.
struct Cluster {
    nodes: Vec<LabNode>,
    client: Pod,
    server: Pod,
    remote: Pod,
    _servers: Vec<EchoServer>,
    lab: Lab,
}

impl Cluster {
    /// `args`: more flags for both agents.
    fn new(socket_lb: bool, args: &[&str]) -> Result<Cluster> {
        let lab = Lab::new()?;
        let mut nodes = lab.cluster(2, "overlay")?;
        for node in &mut nodes {
            node.kill_agent()?;
            node.socket_lb = socket_lb;
            node.extra_args = args.iter().map(|a| a.to_string()).collect();
            node.start_agent()?;
        }
        let client = nodes[0].add_k8s_pod("default", "client")?;
        let server = nodes[0].add_k8s_pod("default", "server")?;
        let remote = nodes[1].add_k8s_pod("default", "remote")?;
        let servers = vec![
            EchoServer::start(&server.ns, SERVER_PORT, "server")?,
            EchoServer::start(&remote.ns, SERVER_PORT, "remote")?,
        ];
        let objects = list_manifest(vec![
            namespace_object("default", &[]),
            pod_object(
                "default",
                "client",
                "n1",
                client.ip,
                &[("app", "client")],
                &[],
            ),
            pod_object(
                "default",
                "server",
                "n1",
                server.ip,
                &[("app", "server")],
                &[],
            ),
            pod_object(
                "default",
                "remote",
                "n2",
                remote.ip,
                &[("app", "remote")],
                &[],
            ),
        ]);
        let services = format!(
            "apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  clusterIP: {EMPTY_SERVICE}
  ports: [{{name: http, port: 80, targetPort: {SERVER_PORT}, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {WEB_SERVICE}
  ports: [{{name: http, port: 80, targetPort: {SERVER_PORT}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: {SERVER_PORT}, protocol: TCP}}]
endpoints:
- addresses: [\"{}\"]
  conditions: {{ready: true}}
  nodeName: n1
---
apiVersion: v1
kind: Service
metadata: {{name: local-only, namespace: default}}
spec:
  clusterIP: {LOCAL_ONLY_SERVICE}
  internalTrafficPolicy: Local
  ports: [{{name: http, port: 80, targetPort: {SERVER_PORT}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: local-only-1, namespace: default, labels: {{kubernetes.io/service-name: local-only}}}}
addressType: IPv4
ports: [{{name: http, port: {SERVER_PORT}, protocol: TCP}}]
endpoints:
- addresses: [\"{}\"]
  conditions: {{ready: true}}
  nodeName: n2
",
            server.ip, remote.ip
        );
        for node in &nodes {
            node.write_manifest("objects.json", &objects)?;
            node.write_manifest("services.yaml", &services)?;
        }
        for node in &nodes {
            node.wait_for_frontend(&format!("{EMPTY_SERVICE}:80/TCP"), Some(&[]))?;
            node.wait_for_frontend(
                &format!("{WEB_SERVICE}:80/TCP"),
                Some(&[&format!("{}:{SERVER_PORT}", server.ip)]),
            )?;
        }
        Ok(Cluster {
            nodes,
            client,
            server,
            remote,
            _servers: servers,
            lab,
        })
    }

    fn n1(&self) -> &LabNode {
        &self.nodes[0]
    }
}

/// `tern observe -o json` with `args` on `node`: the flows, parsed.
fn observe(node: &LabNode, args: &[&str]) -> Result<Vec<Value>> {
    let mut all = vec!["observe", "-o", "json", "--last", "100000"];
    all.extend_from_slice(args);
    node.tern(&all)?
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}")))
        .collect()
}

/// Waits (at most `within`) for a flow of `node` that `wanted` accepts,
/// among those `args` select.
fn wait_for_flow(
    node: &LabNode,
    args: &[&str],
    within: Duration,
    what: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + within;
    loop {
        let flows = observe(node, args)?;
        if let Some(flow) = flows.iter().find(|f| wanted(f)) {
            return Ok(flow.clone());
        }
        if Instant::now() > deadline {
            bail!(
                "no flow for {what} within {within:?}; tern observe showed:\n{}",
                node.tern(&["observe", "--last", "30"])?
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A series of the agent's /metrics (the full name with its labels).
fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// `count` UDP datagrams from `pod` to a port of NO_POD: each dropped.
fn flood_unknown_pod(pod: &Pod, count: usize, port: u16) -> Result<()> {
    pod.ns.run(|| -> Result<()> {
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
        for _ in 0..count {
            socket.send_to(b"x", (NO_POD, port))?;
        }
        Ok(())
    })
}

/// A TCP connect that is expected to fail (refused or dropped).
fn connect_fails(from: &Pod, to: SocketAddr) -> bool {
    tcp_connect_from(&from.ns, 0, to, Duration::from_millis(500)).is_err()
}

fn drops_show_with_their_reason_pods_and_node(socket_lb: bool) -> Result<()> {
    let c = Cluster::new(socket_lb, &["--map-size", "NAT=2"])?;
    let n1 = c.n1();
    // Socket-LB applies to sockets made by processes of the pods cgroup.
    let _pods = socket_lb.then(|| n1.enter_pods_cgroup()).transpose()?;

    // A Service without backends: refused, reason no_backend, the Service named.
    ensure!(connect_fails(
        &c.client,
        SocketAddr::from((EMPTY_SERVICE, 80))
    ));
    let flow = wait_for_flow(n1, &["--type", "drop"], WITHIN, "no backend", |f| {
        f["reason"] == "no_backend" && f["source"]["pod"] == "default/client"
    })?;
    assert_eq!(flow["verdict"], "dropped", "{flow}");
    assert_eq!(flow["node"], "n1", "{flow}");
    assert_eq!(flow["service"]["name"], "default/empty", "{flow}");
    assert_eq!(flow["service"]["ip"], EMPTY_SERVICE.to_string(), "{flow}");
    let point = if socket_lb {
        "sock_connect"
    } else {
        "from_pod"
    };
    assert_eq!(flow["point"], point, "{flow}");
    assert_eq!(flow["direction"], "egress", "{flow}");

    // internalTrafficPolicy Local with its only endpoint on n2: dropped
    // (the client times out), not refused, as kube-proxy does.
    n1.wait_for_frontend(&format!("{LOCAL_ONLY_SERVICE}:80/TCP"), Some(&[]))?;
    let started = Instant::now();
    ensure!(connect_fails(
        &c.client,
        SocketAddr::from((LOCAL_ONLY_SERVICE, 80))
    ));
    ensure!(
        started.elapsed() >= Duration::from_millis(450),
        "refused at once ({:?}): should have been dropped",
        started.elapsed()
    );
    let flow = wait_for_flow(n1, &["--type", "drop"], WITHIN, "no local backend", |f| {
        f["reason"] == "no_local_backend"
    })?;
    assert_eq!(flow["source"]["pod"], "default/client", "{flow}");
    assert_eq!(
        flow["destination"]["ip"],
        LOCAL_ONLY_SERVICE.to_string(),
        "{flow}"
    );
    assert_eq!(flow["point"], "from_pod", "{flow}");

    // Denied by policy: the server isolated for ingress, nothing allowed.
    let deny = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-server, namespace: default}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
";
    for node in &c.nodes {
        node.write_manifest("policy.yaml", deny)?;
    }
    let to_server = SocketAddr::from((c.server.ip, SERVER_PORT));
    // The case is a new connection's SYN dropped at the server. While the
    // policy comes into force a connection may fail otherwise (its SYN
    // admitted just before, its SYN|ACK or FIN dropped after, as replies
    // of a denied connection), so connect anew until such a SYN drop shows.
    let denied_syn = |f: &Value| {
        f["verdict"] == "dropped"
            && f["destination"]["pod"] == "default/server"
            && f["tcp_flags"].as_str().is_some_and(|t| t.contains("SYN"))
    };
    let deadline = Instant::now() + SETTLE;
    let flow = loop {
        if connect_fails(&c.client, to_server) {
            let flows = observe(n1, &["--type", "policy"])?;
            if let Some(flow) = flows.into_iter().find(denied_syn) {
                break flow;
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no new connection's SYN denied by the policy within {SETTLE:?}; tern observe showed:\n{}",
            n1.tern(&["observe", "--last", "30"])?
        );
    };
    assert_eq!(flow["reason"], "policy_denied", "{flow}");
    assert_eq!(flow["source"]["pod"], "default/client", "{flow}");
    assert_eq!(flow["destination"]["port"], SERVER_PORT, "{flow}");
    assert_eq!(flow["direction"], "ingress", "{flow}");
    assert_eq!(flow["policy"], "default/deny-server", "{flow}");
    assert_eq!(flow["node"], "n1", "{flow}");

    // Masquerade with a NAT map of 2 entries: one flow fits, the next is
    // dropped as nat_full.
    let outside = c.lab.outside()?;
    let _echo = EchoServer::start(&outside.host, 9000, "outside")?;
    let to_outside = SocketAddr::from((OUTSIDE_IP, 9000));
    udp_roundtrip(&c.client.ns, to_outside, "first").context("the first flow out")?;
    ensure!(
        udp_roundtrip(&c.client.ns, to_outside, "second").is_err(),
        "a second flow fitted into a NAT map of 2 entries"
    );
    let flow = wait_for_flow(n1, &["--type", "drop"], WITHIN, "NAT full", |f| {
        f["reason"] == "nat_full"
    })?;
    assert_eq!(flow["source"]["pod"], "default/client", "{flow}");
    assert_eq!(flow["destination"]["ip"], OUTSIDE_IP.to_string(), "{flow}");
    assert_eq!(flow["protocol"], "UDP", "{flow}");
    assert_eq!(flow["point"], "to_netdev", "{flow}");

    // A packet for an address of n1's PodCIDR that no pod has, from a pod
    // of n2: dropped on n1 as it comes out of the overlay.
    ensure!(connect_fails(&c.remote, SocketAddr::from((NO_POD, 80))));
    let flow = wait_for_flow(n1, &["--type", "drop"], WITHIN, "unknown pod", |f| {
        f["reason"] == "unknown_pod"
    })?;
    assert_eq!(flow["source"]["pod"], "default/remote", "{flow}");
    assert_eq!(flow["source"]["node"], "n2", "{flow}");
    assert_eq!(flow["destination"]["ip"], NO_POD.to_string(), "{flow}");
    assert_eq!(flow["point"], "from_overlay", "{flow}");

    // Every drop is counted by reason and direction.
    let (_, metrics) = agent_http_get(&n1.ns, "/metrics")?;
    for (reason, direction) in [
        ("no_backend", "egress"),
        ("policy_denied", "ingress"),
        ("nat_full", "egress"),
        ("unknown_pod", "ingress"),
    ] {
        let series = format!("tern_drops_total{{reason=\"{reason}\",direction=\"{direction}\"}}");
        let value = metric(&metrics, &series);
        assert!(value.is_some_and(|v| v >= 1.0), "{series}: {value:?}");
    }
    let flows = metric(
        &metrics,
        "tern_flows_total{type=\"drop\",verdict=\"dropped\"}",
    );
    assert!(
        flows.is_some_and(|v| v >= 3.0),
        "tern_flows_total: {flows:?}"
    );
    // Fill levels, counted every 10 s: the NAT map shows full.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let (_, metrics) = agent_http_get(&n1.ns, "/metrics")?;
        let value = |series: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(series))
                .map(str::to_owned)
        };
        let nat = (
            value("tern_map_entries{map=\"NAT\"} "),
            value("tern_map_capacity{map=\"NAT\"} "),
            value("tern_map_fill_ratio{map=\"NAT\"} "),
        );
        if nat.0.as_deref() == Some("2") {
            assert_eq!(nat.1.as_deref(), Some("2"), "{nat:?}");
            assert_eq!(nat.2.as_deref(), Some("1.0"), "{nat:?}");
            for map in ["CT", "POLICY_CT", "AFFINITY", "POLICY"] {
                let series = format!("tern_map_capacity{{map=\"{map}\"}} ");
                ensure!(
                    value(&series).is_some(),
                    "no fill level of {map}:\n{metrics}"
                );
            }
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the NAT map never showed full: {nat:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

fn translations_show_frontend_and_chosen_backend(socket_lb: bool) -> Result<()> {
    let c = Cluster::new(socket_lb, &[])?;
    let n1 = c.n1();
    let _pods = socket_lb.then(|| n1.enter_pods_cgroup()).transpose()?;
    let mut stream = tcp_connect_from(
        &c.client.ns,
        0,
        SocketAddr::from((WEB_SERVICE, 80)),
        Duration::from_secs(2),
    )?;
    stream.write_all(b"hello\n")?;
    let flow = wait_for_flow(n1, &["--type", "service"], WITHIN, "translation", |f| {
        f["service"]["name"] == "default/web"
    })?;
    assert_eq!(flow["verdict"], "translated", "{flow}");
    assert_eq!(
        flow["reason"],
        if socket_lb { "socket" } else { "packet" },
        "{flow}"
    );
    assert_eq!(flow["source"]["pod"], "default/client", "{flow}");
    assert_eq!(flow["source"]["ip"], c.client.ip.to_string(), "{flow}");
    assert_eq!(flow["destination"]["pod"], "default/server", "{flow}");
    assert_eq!(flow["destination"]["ip"], c.server.ip.to_string(), "{flow}");
    assert_eq!(flow["destination"]["port"], SERVER_PORT, "{flow}");
    assert_eq!(flow["service"]["ip"], WEB_SERVICE.to_string(), "{flow}");
    assert_eq!(flow["service"]["port"], 80, "{flow}");
    assert_eq!(flow["protocol"], "TCP", "{flow}");
    // One event per connection, not per packet.
    for _ in 0..20 {
        stream.write_all(b"more\n")?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let translations = observe(
        n1,
        &["--type", "service", "--to-ip", &WEB_SERVICE.to_string()],
    )?;
    assert_eq!(translations.len(), 1, "{translations:?}");
    // Aligned text names the same.
    let text = n1.tern(&["observe", "--type", "service"])?;
    assert!(
        text.lines().next().unwrap_or("").starts_with("TIME"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "-> default/web {WEB_SERVICE}:80/TCP => default/server ({}:{SERVER_PORT})",
            c.server.ip
        )),
        "{text}"
    );
    Ok(())
}

/// Whether a flow is one a filter should select.
type Selects<'a> = Box<dyn Fn(&Value) -> bool + 'a>;

fn filters(socket_lb: bool) -> Result<()> {
    let c = Cluster::new(socket_lb, &[])?;
    let n1 = c.n1();
    let _pods = socket_lb.then(|| n1.enter_pods_cgroup()).transpose()?;
    // `tern observe --follow` as an operator runs it: started first, it
    // must stream what happens next.
    let mut follow = Command::new(&n1.bins.tern);
    follow
        .args(["--socket"])
        .arg(&n1.socket)
        .args(["observe", "--follow", "-o", "json", "--type", "drop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut follower = ChildGuard::new(follow.spawn()?);
    let lines = BufReader::new(follower.0.stdout.take().expect("piped"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    // Traffic of every kind: a refused Service (TCP), a translated one,
    // UDP to a pod that does not exist, a UDP round trip to the server.
    ensure!(connect_fails(
        &c.client,
        SocketAddr::from((EMPTY_SERVICE, 80))
    ));
    tcp_connect_from(
        &c.client.ns,
        0,
        SocketAddr::from((WEB_SERVICE, 80)),
        Duration::from_secs(2),
    )?;
    c.client.ns.run(|| -> Result<()> {
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
        socket.send_to(b"lost", (NO_POD, 5353))?;
        Ok(())
    })?;
    udp_roundtrip(
        &c.remote.ns,
        SocketAddr::from((c.server.ip, SERVER_PORT)),
        "hi",
    )?;
    let streamed: Value = serde_json::from_str(
        &rx.recv_timeout(Duration::from_secs(2))
            .context("tern observe --follow streamed nothing")?,
    )?;
    assert_eq!(streamed["type"], "drop", "{streamed}");
    drop(follower);

    let all = wait_for_flow(n1, &[], WITHIN, "the UDP drop", |f| {
        f["reason"] == "unknown_pod" && f["protocol"] == "UDP"
    })
    .and_then(|_| observe(n1, &[]))?;
    ensure!(all.len() >= 3, "{all:?}");
    let client = c.client.ip.to_string();
    let no_pod = NO_POD.to_string();
    let web = WEB_SERVICE.to_string();
    let side = |f: &Value, key: &str, value: &str| {
        f["source"][key] == value || f["destination"][key] == value
    };
    let cases: Vec<(Vec<&str>, Selects)> = vec![
        (
            vec!["--pod", "default/client"],
            Box::new(|f| side(f, "pod", "default/client")),
        ),
        (
            vec!["--pod", "client"],
            Box::new(|f| side(f, "pod", "default/client")),
        ),
        (vec!["--namespace", "default"], Box::new(|_| true)),
        (
            vec!["--from-ip", &client],
            Box::new(|f| f["source"]["ip"] == client.as_str()),
        ),
        (
            vec!["--to-ip", &no_pod],
            Box::new(|f| f["destination"]["ip"] == no_pod.as_str()),
        ),
        (
            vec!["--to-ip", &web],
            Box::new(|f| f["service"]["ip"] == web.as_str()),
        ),
        (
            vec!["--port", "5353"],
            Box::new(|f| f["destination"]["port"] == 5353),
        ),
        (
            vec!["--protocol", "udp"],
            Box::new(|f| f["protocol"] == "UDP"),
        ),
        (
            vec!["--verdict", "dropped"],
            Box::new(|f| f["verdict"] == "dropped"),
        ),
        (
            vec!["--verdict", "translated"],
            Box::new(|f| f["verdict"] == "translated"),
        ),
        (
            vec!["--type", "service"],
            Box::new(|f| f["type"] == "service"),
        ),
        (
            vec!["--type", "drop,service"],
            Box::new(|f| f["type"] == "drop" || f["type"] == "service"),
        ),
    ];
    for (args, selects) in cases {
        let expected: Vec<&Value> = all.iter().filter(|f| selects(f)).collect();
        let got = observe(n1, &args)?;
        ensure!(
            !expected.is_empty(),
            "{args:?} selects nothing to compare with in {all:?}"
        );
        assert_eq!(got.iter().collect::<Vec<_>>(), expected, "{args:?}");
    }
    // --last N: the newest N.
    let newest = observe(n1, &[])?;
    let last_two = n1.tern(&["observe", "-o", "json", "--last", "2"])?;
    let last_two: Vec<Value> = last_two
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(last_two, newest[newest.len() - 2..], "--last 2");
    // A reader that goes away (`| head -1`) ends the CLI cleanly, also
    // while it follows.
    for follow in [false, true] {
        let mut cmd = Command::new(&n1.bins.tern);
        cmd.arg("--socket")
            .arg(&n1.socket)
            .args(["observe", "--last", "100"]);
        if follow {
            cmd.arg("--follow");
        }
        let mut tern = ChildGuard::new(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?);
        let mut first = String::new();
        BufReader::new(tern.0.stdout.take().expect("piped")).read_line(&mut first)?;
        ensure!(first.starts_with("TIME"), "{first}");
        // The pipe is closed now; more flows make the CLI write into it.
        ensure!(connect_fails(
            &c.client,
            SocketAddr::from((EMPTY_SERVICE, 80))
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = tern.0.try_wait()? {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "tern observe (follow: {follow}) kept running into a closed pipe"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut tern.0.stderr.take().expect("piped"), &mut stderr)?;
        assert!(status.success(), "follow: {follow}: {status}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    // A burst of drops: each is counted, but each CPU reports at most
    // 1000 a second (the default budget). Every drop is accounted for:
    // read as an event, over the budget, or lost to a full ring.
    // Every drop of any reason (the budget is shared), against the drop
    // and denial events read, over the budget, or lost.
    let accounts = || -> Result<[f64; 4]> {
        let (_, metrics) = agent_http_get(&n1.ns, "/metrics")?;
        let value = |series: &str| metric(&metrics, series).unwrap_or(0.0);
        let all_drops: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("tern_drops_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Ok([
            all_drops,
            value("tern_flows_total{type=\"drop\",verdict=\"dropped\"}")
                + value("tern_flows_total{type=\"policy\",verdict=\"dropped\"}"),
            value("tern_events_rate_limited_total"),
            value("tern_events_lost_total"),
        ])
    };
    // Earlier drops' events read first (the reader drains every 100 ms).
    std::thread::sleep(Duration::from_millis(500));
    let before = accounts()?;
    flood_unknown_pod(&c.client, 20_000, 7)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let (dropped, read, limited, lost) = loop {
        let now = accounts()?;
        let delta: Vec<f64> = now.iter().zip(before).map(|(n, b)| n - b).collect();
        let (dropped, read, limited, lost) = (delta[0], delta[1], delta[2], delta[3]);
        if read + limited + lost == dropped || Instant::now() > deadline {
            break (dropped, read, limited, lost);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(dropped >= 20_000.0, "{dropped} of 20 000 drops counted");
    ensure!(limited > 0.0, "20 000 drops at once were all reported");
    ensure!(read > 0.0, "no drop event of the burst was reported");
    assert_eq!(
        read + limited + lost,
        dropped,
        "drops unaccounted for: {read} read, {limited} over the budget, {lost} lost"
    );
    Ok(())
}

fn trace_mode() -> Result<()> {
    let c = Cluster::new(false, &["--events", "drops,policy,service,trace"])?;
    let to_remote = SocketAddr::from((c.remote.ip, SERVER_PORT));
    let mut stream = tcp_connect_from(&c.client.ns, 0, to_remote, Duration::from_secs(2))?;
    for _ in 0..20 {
        tern_lab::traffic::tcp_exchange(&mut stream, "data")?;
    }
    let (client, remote) = (c.client.ip.to_string(), c.remote.ip.to_string());
    // Each node sees the connection's packets leave one pod and reach the
    // other, through the overlay both ways.
    for (node, expected) in [
        (
            &c.nodes[0],
            [
                ("from_pod", &client),
                ("to_overlay", &client),
                ("from_overlay", &remote),
                ("to_pod", &remote),
            ],
        ),
        (
            &c.nodes[1],
            [
                ("from_overlay", &client),
                ("to_pod", &client),
                ("from_pod", &remote),
                ("to_overlay", &remote),
            ],
        ),
    ] {
        for (point, source) in expected {
            wait_for_flow(node, &["--type", "trace"], WITHIN, point, |f| {
                f["point"] == point && f["source"]["ip"] == source.as_str()
            })?;
        }
        // TCP only on SYN, FIN and RST: 20 round trips of data add nothing.
        let traced = observe(
            node,
            &["--type", "trace", "--port", &SERVER_PORT.to_string()],
        )?;
        ensure!(traced.len() <= 8, "data packets were traced: {traced:?}");
        for flow in &traced {
            let flags = flow["tcp_flags"].as_str().unwrap_or("");
            ensure!(
                flags.contains("SYN") || flags.contains("FIN") || flags.contains("RST"),
                "{flow}"
            );
        }
    }
    Ok(())
}

fn ring_overflow() -> Result<()> {
    // A ring of one page (about 60 events) and no drop-event budget: a
    // burst of drops overflows it, and the losses must be counted.
    let c = Cluster::new(
        false,
        &[
            "--events-ring-size",
            "4096",
            "--drop-events-per-second",
            "100000000",
        ],
    )?;
    let n1 = c.n1();
    flood_unknown_pod(&c.client, 20_000, 9)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let lost = loop {
        let (_, metrics) = agent_http_get(&n1.ns, "/metrics")?;
        let lost = metric(&metrics, "tern_events_lost_total").unwrap_or(0.0);
        if lost > 0.0 || Instant::now() > deadline {
            break lost;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(lost > 0.0, "20 000 drops into a 4 KiB ring lost nothing?");
    // tern observe says so (on stderr, so stdout stays one flow per line).
    let out = Command::new(&n1.bins.tern)
        .arg("--socket")
        .arg(&n1.socket)
        .args(["observe", "--last", "5"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("events lost:"), "{stderr}");
    // Every drop is still counted, reported or not.
    let (_, metrics) = agent_http_get(&n1.ns, "/metrics")?;
    let dropped = metric(
        &metrics,
        "tern_drops_total{reason=\"unknown_pod\",direction=\"egress\"}",
    );
    assert!(dropped.is_some_and(|d| d >= 20_000.0), "{dropped:?}");
    Ok(())
}
