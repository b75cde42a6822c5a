//! The IPVS schedulers (`tern.io/lb-algorithm`) with endpoint weights
//! (`tern.io/lb-weights`), checked against IPVS's definitions with real
//! connections, on both Service paths: rr and wrr take their exact turns,
//! lc/wlc/sed/nq follow the open connections the datapath counts (and the
//! counts heal after an agent restart that lost them), sh and dh pin a
//! client (a frontend) to the backend IPVS's bucket table names. Needs root.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use tern_common::lb_algorithm::hash_bucket;
use tern_lab::lab::{Lab, LabNode, Pod};
use tern_lab::traffic::{EchoServer, tcp_connect, tcp_exchange};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const PORT: u16 = 8080;

tern_lab::both_service_paths!(
    socket_lb: true,
    per_packet: false;
    round_robin_and_weighted_round_robin_take_ipvs_turns,
    least_connection_family_follows_open_connections,
    connection_counts_survive_and_heal_across_agent_restarts,
    only_backends_of_counting_schedulers_get_connection_counters,
    source_and_destination_hashing_pin_to_ipvs_buckets,
);

struct Cluster {
    node: LabNode,
    clients: Vec<Pod>,
    /// b0, b1, ... in address order (the order backends are listed in).
    backends: Vec<Pod>,
    _servers: Vec<EchoServer>,
    _lab: Lab,
}

/// A node with two client pods and `n` backend pods ("b<i>") echoing on
/// PORT.
fn cluster(cidr: &str, n: usize, socket_lb: bool) -> Result<Cluster> {
    let lab = Lab::new()?;
    let node = lab.node_with("n1", cidr, NODE_IP, socket_lb)?;
    let clients = vec![node.add_pod("client")?, node.add_pod("client2")?];
    let (backends, servers) = node.add_echo_pods(n, PORT)?;
    ensure!(
        backends.windows(2).all(|w| w[0].ip < w[1].ip),
        "backend pods not in address order"
    );
    Ok(Cluster {
        node,
        clients,
        backends,
        _servers: servers,
        _lab: lab,
    })
}

impl Cluster {
    /// Service `name` on `vip`:80 -> every backend, with the scheduler and
    /// weights annotations; endpoints name their pods (targetRef) so
    /// weights can name them. Waits until the datapath has it.
    fn service(&self, name: &str, vip: Ipv4Addr, algorithm: &str, weights: &str) -> Result<()> {
        let mut endpoints = String::new();
        for (i, pod) in self.backends.iter().enumerate() {
            endpoints.push_str(&format!(
                "- addresses: [\"{}\"]\n  nodeName: n1\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: b{i}, namespace: default}}\n",
                pod.ip
            ));
        }
        let yaml = format!(
            "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
  annotations:
    tern.io/lb-algorithm: {algorithm}
    tern.io/lb-weights: \"{weights}\"
spec:
  clusterIP: {vip}
  ports: [{{name: http, port: 80, targetPort: {PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports: [{{name: http, port: {PORT}}}]
endpoints:
{endpoints}"
        );
        self.node.write_manifest(&format!("{name}.yaml"), &yaml)?;
        let frontend = format!("{vip}:80/TCP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.frontend(&frontend)?["algorithm"] != algorithm {
            ensure!(
                Instant::now() < deadline,
                "{frontend} never got {algorithm}:\n{}",
                self.node.agent_log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn frontend(&self, frontend: &str) -> Result<serde_json::Value> {
        Ok(self
            .node
            .frontends()?
            .into_iter()
            .find(|f| f["frontend"] == frontend && f["scope"] == "external")
            .unwrap_or_default())
    }

    /// A new connection from client `client` to `vip`:80, held open, and
    /// the backend ("b<i>") that answered on it.
    fn open(&self, client: usize, vip: Ipv4Addr) -> Result<(TcpStream, String)> {
        let mut conn = tcp_connect(&self.clients[client].ns, SocketAddr::from((vip, 80)))?;
        let answer = tcp_exchange(&mut conn, "x")?;
        Ok((conn, answer.trim_end_matches(":x").to_owned()))
    }

    /// Backends of `n` new connections, each closed before the next.
    fn answers(&self, client: usize, vip: Ipv4Addr, n: usize) -> Result<Vec<String>> {
        (0..n).map(|_| Ok(self.open(client, vip)?.1)).collect()
    }

    /// The open connections `tern service list` shows per backend of the
    /// frontend on `vip`, waiting up to `within` for them to be `want`.
    fn wait_for_counts(&self, vip: Ipv4Addr, want: &[u64], within: Duration) -> Result<()> {
        let frontend = format!("{vip}:80/TCP");
        let deadline = Instant::now() + within;
        loop {
            let f = self.frontend(&frontend)?;
            let have: Vec<u64> = f["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_u64())
                .collect();
            if have == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{frontend}: open connections {have:?}, wanted {want:?}\n{}",
                    self.node.agent_log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn tally(answers: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a.clone()).or_insert(0) += 1;
    }
    counts
}

/// Holds `n` new connections to `vip` and returns how many each backend
/// answered ("b0" -> 2, ...).
fn hold(
    c: &Cluster,
    vip: Ipv4Addr,
    n: usize,
    held: &mut Vec<(TcpStream, String)>,
) -> Result<BTreeMap<String, usize>> {
    let mut answers = Vec::new();
    for _ in 0..n {
        let (conn, backend) = c.open(0, vip)?;
        answers.push(backend.clone());
        held.push((conn, backend));
    }
    Ok(tally(&answers))
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(b, n)| (b.to_string(), *n)).collect()
}

fn round_robin_and_weighted_round_robin_take_ipvs_turns(socket_lb: bool) -> Result<()> {
    let c = cluster("10.244.51.0/24", 4, socket_lb)?;
    let _pods = c.node.enter_pods_cgroup()?;

    // rr: every backend in turn; b3 weighs 0 and takes no connection.
    let rr = Ipv4Addr::new(10, 96, 0, 51);
    c.service("rr", rr, "rr", "b3=0")?;
    let turns = c.answers(0, rr, 9)?;
    assert_eq!(
        tally(&turns),
        counts(&[("b0", 3), ("b1", 3), ("b2", 3)]),
        "{turns:?}"
    );
    assert!(
        turns
            .windows(3)
            .all(|w| w[0] != w[1] && w[1] != w[2] && w[0] != w[2]),
        "not in turn: {turns:?}"
    );

    // wrr, weights 3:2:1 (by pod name, and by address for b1): IPVS's
    // interleaved cycle b0 b0 b1 b0 b1 b2, from wherever it stands.
    let wrr = Ipv4Addr::new(10, 96, 0, 52);
    let b1 = c.backends[1].ip;
    c.service("wrr", wrr, "wrr", &format!("b0=3,{b1}=2,b1=7,b3=0"))?;
    let turns = c.answers(0, wrr, 12)?;
    let cycle = ["b0", "b0", "b1", "b0", "b1", "b2"];
    let start =
        (0..cycle.len()).find(|&s| (0..12).all(|i| turns[i] == cycle[(s + i) % cycle.len()]));
    assert!(start.is_some(), "not IPVS's wrr cycle {cycle:?}: {turns:?}");
    let weights = c.frontend(&format!("{wrr}:80/TCP"))?["weights"].clone();
    assert_eq!(weights, serde_json::json!([3, 2, 1]));
    Ok(())
}

fn least_connection_family_follows_open_connections(socket_lb: bool) -> Result<()> {
    let c = cluster("10.244.52.0/24", 3, socket_lb)?;
    let _pods = c.node.enter_pods_cgroup()?;
    let quiet = Duration::from_secs(2);

    // lc: weights only exclude, so 6 held connections end up 2, 2, 2
    // whatever b0 weighs; the datapath's counts show them.
    let lc = Ipv4Addr::new(10, 96, 0, 61);
    c.service("lc", lc, "lc", "b0=5")?;
    let mut held = Vec::new();
    let spread = hold(&c, lc, 6, &mut held)?;
    assert_eq!(spread, counts(&[("b0", 2), ("b1", 2), ("b2", 2)]));
    c.wait_for_counts(lc, &[2, 2, 2], quiet)?;
    // b0's connections close: the next two new ones both go to b0, the
    // one with fewest (the others still hold theirs).
    held.retain(|(_, backend)| backend != "b0");
    c.wait_for_counts(lc, &[0, 2, 2], quiet)?;
    let next = hold(&c, lc, 2, &mut held)?;
    assert_eq!(next, counts(&[("b0", 2)]));
    // Short connections (opened and closed) leave no count behind.
    c.answers(0, lc, 10)?;
    c.wait_for_counts(lc, &[2, 2, 2], quiet)?;
    held.clear();
    c.wait_for_counts(lc, &[0, 0, 0], quiet)?;

    // b0 weighs 1, b1 3 (b2 0: not a backend). IPVS's definitions over
    // open connections c and weights w, from (0, 0):
    // wlc (least c/w) and sed (least (c+1)/w) reach exactly (2, 6) at 8;
    // with weights 1 and 100, sed sends both of 2 to b1, while nq first
    // takes an idle backend: one each.
    // Each case runs a few rounds: ties and the scan's start are random.
    for (algorithm, vip, weights, n, want) in [
        (
            "wlc",
            62,
            "b0=1,b1=3,b2=0",
            8,
            counts(&[("b0", 2), ("b1", 6)]),
        ),
        (
            "sed",
            63,
            "b0=1,b1=3,b2=0",
            8,
            counts(&[("b0", 2), ("b1", 6)]),
        ),
        (
            "nq",
            64,
            "b0=1,b1=3,b2=0",
            8,
            counts(&[("b0", 2), ("b1", 6)]),
        ),
        ("sed", 65, "b0=1,b1=100,b2=0", 2, counts(&[("b1", 2)])),
        (
            "nq",
            66,
            "b0=1,b1=100,b2=0",
            2,
            counts(&[("b0", 1), ("b1", 1)]),
        ),
    ] {
        let vip = Ipv4Addr::new(10, 96, 0, vip);
        c.service(&format!("{algorithm}-{n}"), vip, algorithm, weights)?;
        for round in 0..4 {
            let mut held = Vec::new();
            let spread = hold(&c, vip, n, &mut held)?;
            assert_eq!(spread, want, "{algorithm} with {weights}, round {round}");
            drop(held);
            c.wait_for_counts(vip, &[0, 0], quiet)?;
        }
    }
    Ok(())
}

fn connection_counts_survive_and_heal_across_agent_restarts(socket_lb: bool) -> Result<()> {
    let mut c = cluster("10.244.53.0/24", 3, socket_lb)?;
    let pods = c.node.enter_pods_cgroup()?;
    let lc = Ipv4Addr::new(10, 96, 0, 71);
    c.service("lc", lc, "lc", "")?;
    let mut held = Vec::new();
    hold(&c, lc, 3, &mut held)?;
    c.wait_for_counts(lc, &[1, 1, 1], Duration::from_secs(2))?;
    drop(pods);

    // A restart keeps the pinned counts as they are.
    c.node.kill_agent()?;
    c.node.start_agent()?;
    c.wait_for_counts(lc, &[1, 1, 1], Duration::from_secs(10))?;

    // An upgrade that replaces the counters' map (another shape) starts
    // them at 0 under live connections: the recount restores them from
    // the connections' own records (CT, LB_SOCKETS) within its period.
    c.node.kill_agent()?;
    std::fs::remove_file(c.node.bpffs_dir.join("CONNECTIONS"))?;
    c.node.start_agent()?;
    c.wait_for_counts(lc, &[1, 1, 1], Duration::from_secs(25))?;

    // And the healed counts still steer: b1's connection closes, the next
    // goes to b1; every close takes its count back, none goes negative.
    let _pods = c.node.enter_pods_cgroup()?;
    held.retain(|(_, backend)| backend != "b1");
    c.wait_for_counts(lc, &[1, 0, 1], Duration::from_secs(2))?;
    assert_eq!(hold(&c, lc, 1, &mut held)?, counts(&[("b1", 1)]));
    held.clear();
    c.wait_for_counts(lc, &[0, 0, 0], Duration::from_secs(2))?;
    Ok(())
}

/// CONNECTIONS has a counter for exactly the backends a least-connection
/// frontend uses: none for random ones (100 000 Services x 10 backends
/// would cost a million counter writes), created before such a frontend
/// serves, removed with the backend.
fn only_backends_of_counting_schedulers_get_connection_counters(socket_lb: bool) -> Result<()> {
    let mut c = cluster("10.244.55.0/24", 3, socket_lb)?;
    let pods = c.node.enter_pods_cgroup()?;
    let vip = Ipv4Addr::new(10, 96, 0, 81);

    c.service("s", vip, "random", "")?;
    ensure!(
        backend_ids(&c.node)?.len() == 3,
        "backends {:?}",
        backend_ids(&c.node)?
    );
    ensure!(
        counter_ids(&c.node)?.is_empty(),
        "random: counters {:?}",
        counter_ids(&c.node)?
    );

    // The same Service turned lc: each backend gets its counter, and the
    // first held connections are counted.
    c.service("s", vip, "lc", "")?;
    assert_eq!(counter_ids(&c.node)?, backend_ids(&c.node)?);
    let mut held = Vec::new();
    hold(&c, vip, 3, &mut held)?;
    c.wait_for_counts(vip, &[1, 1, 1], Duration::from_secs(2))?;
    drop(held);
    c.wait_for_counts(vip, &[0, 0, 0], Duration::from_secs(2))?;
    drop(pods);

    // A restart keeps them; the Service gone takes them with its backends.
    c.node.kill_agent()?;
    c.node.start_agent()?;
    c.wait_for_counts(vip, &[0, 0, 0], Duration::from_secs(10))?;
    assert_eq!(counter_ids(&c.node)?, backend_ids(&c.node)?);
    c.node.remove_manifest("s.yaml")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backend_ids(&c.node)?.is_empty() || !counter_ids(&c.node)?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "left behind: backends {:?}, counters {:?}",
            backend_ids(&c.node)?,
            counter_ids(&c.node)?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The node's backend ids (pinned BACKENDS), sorted.
fn backend_ids(node: &LabNode) -> Result<Vec<u32>> {
    pinned_keys::<tern_common::Backend>(node, tern_common::maps::BACKENDS)
}

/// The backend ids with a connection counter (pinned CONNECTIONS), sorted.
fn counter_ids(node: &LabNode) -> Result<Vec<u32>> {
    pinned_keys::<u32>(node, tern_common::maps::CONNECTIONS)
}

/// The keys of a pinned `u32`-keyed hash map of the node, sorted.
fn pinned_keys<V: aya::Pod>(node: &LabNode, name: &str) -> Result<Vec<u32>> {
    let data = aya::maps::MapData::from_pin(node.bpffs_dir.join(name))?;
    let map: aya::maps::HashMap<_, u32, V> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
    let mut keys = map.keys().collect::<Result<Vec<u32>, _>>()?;
    keys.sort_unstable();
    Ok(keys)
}

fn source_and_destination_hashing_pin_to_ipvs_buckets(socket_lb: bool) -> Result<()> {
    let c = cluster("10.244.54.0/24", 3, socket_lb)?;
    let _pods = c.node.enter_pods_cgroup()?;

    // sh: a client always reaches the same backend. Per packet the client
    // is its address, hashed into IPVS's 256 buckets, which equal weights
    // deal out b0, b1, b2, b0...; on the socket path it is the pod itself.
    let sh = Ipv4Addr::new(10, 96, 0, 81);
    c.service("sh", sh, "sh", "")?;
    for client in 0..c.clients.len() {
        let seen = tally(&c.answers(client, sh, 12)?);
        assert_eq!(seen.len(), 1, "client {client} moved: {seen:?}");
        if !socket_lb {
            let bucket = hash_bucket(u32::from(c.clients[client].ip));
            let want = format!("b{}", bucket % 3);
            assert_eq!(seen.keys().next(), Some(&want), "client {client}");
        }
    }

    // dh: every connection to the frontend goes to the backend its
    // address hashes to, from any client, on both paths.
    let dh = Ipv4Addr::new(10, 96, 0, 82);
    c.service("dh", dh, "dh", "")?;
    let want = format!("b{}", hash_bucket(u32::from(dh)) % 3);
    for client in 0..c.clients.len() {
        let seen = tally(&c.answers(client, dh, 8)?);
        assert_eq!(seen, counts(&[(want.as_str(), 8)]), "client {client}");
    }
    Ok(())
}
