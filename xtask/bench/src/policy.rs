//! The network policy group: what NetworkPolicy costs the datapath, how
//! fast one policy change is enforced among many, and what the agent holds
//! in memory for a large cluster. Pod, Namespace and NetworkPolicy objects
//! reach the agent through its manifest directory, as in the policy tests;
//! Pod objects that are not pods of the lab node stand for pods of other
//! nodes (addresses in 10.128.0.0/9, a /24 per "remote" node).
//!
//! Three tables:
//! - `network policy`: pod to pod on one node (the same-node group's
//!   tools) with no policy (the baseline, in the same run), with
//!   `policies_selecting` policies whose ingress rules allow the client
//!   into the server on one port each (the measured ports among them), and
//!   with `policies_total` policies and `policy_pods` Pod objects in the
//!   cluster, most of them in other namespaces. The same pods for all rows,
//!   the state loaded before each row's repetition (interleaved).
//! - `network policy, change -> datapath`: one policy's rule edited, or
//!   the client pod's label changed, so that the client's connections to
//!   the server's probe port flip between allowed and denied; each change
//!   timed from the rename of its manifest into the directory until the
//!   pinned maps give the new verdict (read as the eBPF programs read
//!   them), split by the agent's own `policy synced` log line into what
//!   comes before the policy sync (inotify, parsing the changed file,
//!   merging the snapshot, routing) and the sync itself (compile + map
//!   writes, `took_us`). A real TCP connection checks every verdict. One
//!   policy and 2 pods is the baseline, the large clusters beside it, each
//!   on its own node, interleaved.
//! - `network policy, agent memory`: RSS and the policy maps' kernel
//!   memory with no policy, then `policies_total` policies with
//!   `policy_pods` and `policy_pods_max` Pod objects (one agent, in that
//!   order).
//!
//! Each repetition of the first two also records the CPU other processes
//! of the machine took meanwhile (`contention`), so that a repetition run
//! beside a build is seen as such.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError};
use serde_json::{Value, json};
use tern_common::{
    POLICY_CIDR_PREFIX_BASE, PolicyCidrKey, PolicyEndpoint, PolicyKey, PolicyRuleRef,
    maps as map_names, policy_direction, policy_flags,
};
use tern_lab::lab::{Lab, LabNode, Pod, list_manifest, namespace_object, pod_object};
use tern_lab::traffic::{EchoServer, tcp_connect_from};

use super::contention::CpuWatch;
use super::control_plane::{settled_rss, single};
use super::interrupt;
use super::report::{Metric, ScenarioResult};
use super::scenarios::{
    ALL, Arm, HTTP_PORT, IPERF_PORT, OTHER_CPU, Profile, SOCKPERF_PORT, percentile, push, row,
};
use super::topology::{Tern, Topology};

pub const GROUP: &str = "network policy";
pub const CHANGES_GROUP: &str = "network policy, change -> datapath";
pub const MEMORY_GROUP: &str = "network policy, agent memory";

/// The namespace of the real client and server pods.
pub(crate) const NAMESPACE: &str = "bench";
/// Namespaces of the other pods and policies: team-0 ...
const OTHER_NAMESPACES: usize = 100;
/// Apps per namespace (`app: app-N`): pods of one app share labels, so a
/// namespace holds this many pod identities.
const APPS: usize = 10;
/// Pods per remote node (a /24 each).
const PODS_PER_NODE: usize = 250;
/// The server port whose verdict the changes flip.
const PROBE_PORT: u16 = 9000;
const TCP: u8 = 6;
const UDP: u8 = 17;
/// The ports the datapath rows measure: each allowed by one of the
/// policies selecting the server.
const MEASURED: [(u16, u8); 4] = [
    (IPERF_PORT, TCP),
    (SOCKPERF_PORT, TCP),
    (SOCKPERF_PORT, UDP),
    (HTTP_PORT, TCP),
];
/// Full POLICY key: every field, the port to its last bit.
const POLICY_PREFIX_FULL: u32 = 96;
/// How long one change or load may take before the run fails.
const CHANGE_LIMIT: Duration = Duration::from_secs(60);
const LOAD_LIMIT: Duration = Duration::from_secs(600);

/// The whole group: datapath rows, change latency, memory.
pub fn network_policy(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let mut rows = datapath(profile)?;
    rows.extend(changes_and_memory(profile)?);
    Ok(rows)
}

// ---------------------------------------------------------------------------
// Objects

/// What a node's manifest directory holds besides the changing objects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fixture {
    /// Policies selecting the server (ingress from the client on one port
    /// each; the measured ports among them).
    selecting: usize,
    /// All policies of the fixture (the rest select pods of other
    /// namespaces).
    policies: usize,
    /// Pod objects, the client and server included.
    pods: usize,
}

impl Fixture {
    /// `selecting` policies, all selecting the server, and the Pod objects
    /// of the real pods only: the server and a client per row ([`CLIENTS`]).
    pub(crate) fn local(selecting: usize) -> Fixture {
        Fixture {
            selecting,
            policies: selecting,
            pods: 1 + CLIENTS.len(),
        }
    }

    fn params(&self, extra_policies: usize) -> Vec<(&'static str, String)> {
        vec![
            ("policies", (self.policies + extra_policies).to_string()),
            ("pods", self.pods.to_string()),
        ]
    }
}

fn quantity(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn networkpolicy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"namespace": namespace, "name": name}, "spec": spec})
}

/// The fewest policies selecting the server that allow every measured
/// port (one each).
pub(crate) const FEWEST_SELECTING: usize = MEASURED.len();

/// Policy `i` of those selecting the server: ingress from the client on one
/// port, and from the front tier of one other namespace (pods that exist
/// only in the large clusters).
fn selecting_policy(i: usize, selecting: usize) -> Value {
    let measured = (0..MEASURED.len()).find(|k| (k + 1) * selecting / MEASURED.len() - 1 == i);
    let (port, proto) = match measured {
        Some(k) => MEASURED[k],
        None => (
            20000 + quantity(i % 40000) as u16,
            if i.is_multiple_of(2) { TCP } else { UDP },
        ),
    };
    networkpolicy(
        NAMESPACE,
        &format!("allow-{i}"),
        json!({
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app": "client"}}},
                    {"namespaceSelector": {"matchLabels": {"team": format!("team-{}", i % OTHER_NAMESPACES)}},
                     "podSelector": {"matchLabels": {"tier": "front"}}},
                ],
                "ports": [{"protocol": protocol_name(proto), "port": port}],
            }],
        }),
    )
}

/// Policy `j` of the other namespaces: selects one app there, allows the
/// next app and another namespace's front tier on a port (a named port for
/// every third), and every fourth also limits egress.
fn other_policy(j: usize) -> Value {
    let team = j % OTHER_NAMESPACES;
    let m = j / OTHER_NAMESPACES;
    let app = m % APPS;
    let port = if m.is_multiple_of(3) {
        json!("http")
    } else {
        json!(8000 + m % 1000)
    };
    let mut spec = json!({
        "podSelector": {"matchLabels": {"app": format!("app-{app}")}},
        "policyTypes": ["Ingress"],
        "ingress": [{
            "from": [
                {"podSelector": {"matchLabels": {"app": format!("app-{}", (app + 1) % APPS)}}},
                {"namespaceSelector": {"matchLabels": {"team": format!("team-{}", (team + 1) % OTHER_NAMESPACES)}},
                 "podSelector": {"matchLabels": {"tier": "front"}}},
            ],
            "ports": [{"protocol": "TCP", "port": port}],
        }],
    });
    if m.is_multiple_of(4) {
        spec["policyTypes"] = json!(["Ingress", "Egress"]);
        spec["egress"] = json!([{"to": [{"namespaceSelector": {}}],
                                 "ports": [{"protocol": "TCP", "port": 5432}]}]);
    }
    networkpolicy(&format!("team-{team}"), &format!("np-{m}"), spec)
}

/// Pod `i` of the other nodes: namespace team-(i mod 100), app by replica
/// group, a named port; node remote-(i / 250) with a /24 of 10.128.0.0/9.
fn remote_pod(i: usize) -> Value {
    let team = i % OTHER_NAMESPACES;
    let k = i / OTHER_NAMESPACES;
    let app = k % APPS;
    let tier = if app < APPS / 2 { "front" } else { "back" };
    let node = i / PODS_PER_NODE;
    let ip = Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 128, 0, 0))
            + quantity(node) * 256
            + 2
            + quantity(i % PODS_PER_NODE),
    );
    let app = format!("app-{app}");
    pod_object(
        &format!("team-{team}"),
        &format!("p-{k}"),
        &format!("remote-{node}"),
        ip,
        &[("app", &app), ("tier", tier)],
        &[("http", 8080, "TCP")],
    )
}

/// A real client's Pod object, with `role` (the label changes flip it).
fn client_object(node: &str, name: &str, ip: Ipv4Addr, role: &str) -> Value {
    pod_object(
        NAMESPACE,
        name,
        node,
        ip,
        &[("app", "client"), ("role", role)],
        &[],
    )
}

/// The policy whose rule the changes edit: the server's probe port from
/// pods with `role: <from_role>`.
fn toggle_policy(from_role: &str) -> Value {
    networkpolicy(
        NAMESPACE,
        "toggle",
        json!({
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": from_role}}}],
                         "ports": [{"protocol": "TCP", "port": PROBE_PORT}]}],
        }),
    )
}

/// Namespaces, the server's Pod object and the `clients`' (name, address),
/// the other pods, the policies. `elsewhere`: pods of the node whose
/// objects are in another file (they count in `f.pods`).
fn fixture_objects(
    f: Fixture,
    node: &str,
    server: Ipv4Addr,
    clients: &[(&str, Ipv4Addr)],
    elsewhere: usize,
) -> Vec<Value> {
    let remote = f.pods.saturating_sub(1 + clients.len() + elsewhere);
    let others = f.policies.saturating_sub(f.selecting);
    let mut items = Vec::with_capacity(OTHER_NAMESPACES + f.pods + f.policies + 1);
    items.push(namespace_object(NAMESPACE, &[("team", NAMESPACE)]));
    if remote > 0 || others > 0 {
        for t in 0..OTHER_NAMESPACES {
            let name = format!("team-{t}");
            items.push(namespace_object(&name, &[("team", &name)]));
        }
    }
    items.push(pod_object(
        NAMESPACE,
        "server",
        node,
        server,
        &[("app", "server")],
        &[],
    ));
    for (name, ip) in clients {
        items.push(client_object(node, name, *ip, "probe"));
    }
    items.extend((0..remote).map(remote_pod));
    items.extend((0..f.selecting).map(|i| selecting_policy(i, f.selecting)));
    items.extend((0..others).map(other_policy));
    items
}

fn protocol_name(proto: u8) -> &'static str {
    if proto == UDP { "UDP" } else { "TCP" }
}

/// Writes `items` as one List manifest, atomically; the wall-clock time
/// and instant of the rename that makes it visible.
fn publish(node: &LabNode, file: &str, items: Vec<Value>) -> Result<(SystemTime, Instant)> {
    let tmp = node.manifests_dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, list_manifest(items))?;
    let (wall, started) = (SystemTime::now(), Instant::now());
    std::fs::rename(&tmp, node.manifests_dir.join(file))?;
    Ok((wall, started))
}

// ---------------------------------------------------------------------------
// The agent's log

/// One `policy synced` line of the agent's log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PolicySync {
    /// When the line was logged, right after the sync.
    at: SystemTime,
    policies: usize,
    identities: usize,
    isolated: usize,
    writes: usize,
    deletes: usize,
    failed: usize,
    compile_us: u64,
    took_us: u64,
}

impl PolicySync {
    fn parse(line: &str) -> Option<PolicySync> {
        let (head, fields) = line.split_once("policy synced")?;
        let at = parse_utc(head.split_whitespace().next()?)?;
        let field = |name: &str| -> Option<u64> {
            fields
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
                .parse()
                .ok()
        };
        let count = |name: &str| field(name).and_then(|v| usize::try_from(v).ok());
        Some(PolicySync {
            at,
            policies: count("policies")?,
            identities: count("identities")?,
            isolated: count("isolated")?,
            writes: count("writes")?,
            deletes: count("deletes")?,
            failed: count("failed")?,
            compile_us: field("compile_us")?,
            took_us: field("took_us")?,
        })
    }

    /// When the sync started (the line minus its `took_us`).
    fn started(&self) -> SystemTime {
        self.at
            .checked_sub(Duration::from_micros(self.took_us))
            .unwrap_or(self.at)
    }
}

/// `2026-12-06T05:58:43.439831Z` (tracing's UTC timestamps).
fn parse_utc(ts: &str) -> Option<SystemTime> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(str::parse::<i64>);
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    let secs = days_from_civil(y, m, day) * 86_400 + h * 3600 + min * 60 + s;
    Some(SystemTime::UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The agent's log, read on from where it was last read.
pub(crate) struct AgentLog {
    path: PathBuf,
    offset: usize,
    /// The Services' sync after the last policy sync [`AgentLog::wait_for`]
    /// returned was read with it.
    done: bool,
}

impl AgentLog {
    /// From the log's current end on.
    pub(crate) fn from_end(node: &LabNode) -> AgentLog {
        let path = node.agent_log();
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len() as usize);
        AgentLog {
            path,
            offset,
            done: false,
        }
    }

    /// The policy syncs logged since the last call (whole lines only).
    fn syncs(&mut self) -> Result<Vec<PolicySync>> {
        Ok(self.lines()?.into_iter().flatten().collect())
    }

    /// The lines logged since the last call that end a source snapshot's
    /// processing: the policy sync (`Some`) and the Services' after it
    /// (`None`), the last the sync task does with a snapshot.
    fn lines(&mut self) -> Result<Vec<Option<PolicySync>>> {
        let text = std::fs::read(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let new = text.get(self.offset..).unwrap_or_default();
        let Some(end) = new.iter().rposition(|b| *b == b'\n') else {
            return Ok(Vec::new());
        };
        self.offset += end + 1;
        Ok(String::from_utf8_lossy(&new[..end])
            .lines()
            .filter_map(|line| match PolicySync::parse(line) {
                Some(sync) => Some(Some(sync)),
                None => line.contains("services synced").then_some(None),
            })
            .collect())
    }

    /// Waits for the Services' sync after the policy sync [`wait_for`]
    /// returned.
    pub(crate) fn wait_done(&mut self, node: &LabNode) -> Result<()> {
        let started = Instant::now();
        if std::mem::take(&mut self.done) {
            return Ok(());
        }
        loop {
            if self.lines()?.iter().any(Option::is_none) {
                return Ok(());
            }
            interrupt::check()?;
            ensure!(
                started.elapsed() < LOAD_LIMIT,
                "no Services sync after {LOAD_LIMIT:?}:\n{}",
                node.agent_log_tail()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the policy sync that has `policies` policies and `pods`
    /// pod addresses (logged after the last call), nothing failed closed.
    fn wait_loaded(&mut self, node: &LabNode, policies: usize, pods: usize) -> Result<PolicySync> {
        let sync = self.wait_for(node, LOAD_LIMIT, |s| {
            s.policies == policies && s.identities == pods
        })?;
        ensure!(
            sync.failed == 0,
            "{} pods failed closed loading {policies} policies:\n{}",
            sync.failed,
            node.agent_log_tail()
        );
        Ok(sync)
    }

    /// Waits for a policy sync that `wanted` accepts, logged after the
    /// last call.
    fn wait_for(
        &mut self,
        node: &LabNode,
        limit: Duration,
        wanted: impl Fn(&PolicySync) -> bool,
    ) -> Result<PolicySync> {
        let started = Instant::now();
        loop {
            let lines = self.lines()?;
            if let Some(at) = lines.iter().position(|l| l.as_ref().is_some_and(&wanted)) {
                // Read already: the Services' sync after it, if logged.
                self.done = lines[at..].iter().any(Option::is_none);
                return lines[at].clone().context("a policy sync");
            }
            interrupt::check()?;
            ensure!(
                started.elapsed() < limit,
                "no matching policy sync after {limit:?}:\n{}",
                node.agent_log_tail()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Writes the fixture (and `more` files) and waits for the sync that has
/// all of it: `policies` policies, `pods` pod addresses, nothing failed.
fn load(
    node: &LabNode,
    log: &mut AgentLog,
    files: Vec<(&str, Vec<Value>)>,
    policies: usize,
    pods: usize,
) -> Result<(f64, PolicySync)> {
    log.syncs()?;
    let mut first = None;
    for (file, items) in files {
        let (wall, _) = publish(node, file, items)?;
        first.get_or_insert(wall);
    }
    let sync = log.wait_loaded(node, policies, pods)?;
    let since = first
        .and_then(|wall| sync.at.duration_since(wall).ok())
        .unwrap_or_default();
    Ok((since.as_secs_f64(), sync))
}

// ---------------------------------------------------------------------------
// The pinned maps

fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The policy maps as the agent pinned them.
pub(crate) struct PinnedPolicyMaps {
    endpoints: HashMap<MapData, u32, PolicyEndpoint>,
    identities: HashMap<MapData, u32, u32>,
    allow: LpmTrie<MapData, PolicyKey, PolicyRuleRef>,
    cidrs: LpmTrie<MapData, PolicyCidrKey, u32>,
}

fn pinned(bpffs_dir: &Path, name: &str) -> Result<MapData> {
    let path = bpffs_dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
}

/// A lookup's value; `None` for a key that is not there.
fn found<V>(got: std::result::Result<V, MapError>) -> Result<Option<V>> {
    match got {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl PinnedPolicyMaps {
    pub(crate) fn open(bpffs_dir: &Path) -> Result<Self> {
        Ok(PinnedPolicyMaps {
            endpoints: HashMap::try_from(Map::HashMap(pinned(
                bpffs_dir,
                map_names::POLICY_ENDPOINTS,
            )?))?,
            identities: HashMap::try_from(Map::HashMap(pinned(bpffs_dir, map_names::IDENTITIES)?))?,
            allow: LpmTrie::try_from(Map::LpmTrie(pinned(bpffs_dir, map_names::POLICY)?))?,
            cidrs: LpmTrie::try_from(Map::LpmTrie(pinned(bpffs_dir, map_names::POLICY_CIDR)?))?,
        })
    }

    /// Whether the local pod `to` is isolated for ingress.
    fn ingress_isolated(&self, to: Ipv4Addr) -> Result<bool> {
        let ep = found(self.endpoints.get(&ip_key(to), 0))?.unwrap_or_default();
        Ok(ep.flags & policy_flags::INGRESS_ISOLATED != 0)
    }

    /// What the datapath decides for a new connection from `from` into
    /// the local pod `to` on `proto`/`port`: the eBPF programs' ingress
    /// judgement, made on the same maps.
    fn ingress_allows(&self, from: Ipv4Addr, to: Ipv4Addr, proto: u8, port: u16) -> Result<bool> {
        let local = ip_key(to);
        let ep = found(self.endpoints.get(&local, 0))?.unwrap_or_default();
        if ep.flags & policy_flags::INGRESS_ISOLATED == 0 {
            return Ok(true);
        }
        if ep.flags & policy_flags::INGRESS_DENY_ALL != 0 {
            return Ok(false);
        }
        if from == to {
            return Ok(true);
        }
        let allowed = |identity: u32| -> Result<bool> {
            let key = PolicyKey {
                endpoint: local,
                identity: identity.to_be_bytes(),
                direction: policy_direction::INGRESS,
                proto,
                port: port.to_be_bytes(),
            };
            Ok(found(self.allow.get(&Key::new(POLICY_PREFIX_FULL, key), 0))?.is_some())
        };
        if let Some(identity) = found(self.identities.get(&ip_key(from), 0))?
            && allowed(identity)?
        {
            return Ok(true);
        }
        if allowed(0)? {
            return Ok(true);
        }
        let cidr = PolicyCidrKey {
            endpoint: local,
            direction: policy_direction::INGRESS,
            pad: [0; 3],
            addr: ip_key(from),
        };
        match found(
            self.cidrs
                .get(&Key::new(POLICY_CIDR_PREFIX_BASE + 32, cidr), 0),
        )? {
            Some(number) => allowed(number),
            None => Ok(false),
        }
    }
}

/// One pinned map: the kernel's memory for it (`memlock` of its fdinfo),
/// its sizes, and its entries where counted.
#[derive(Debug, Clone, Default)]
struct MapUsage {
    memlock: u64,
    key_size: u64,
    value_size: u64,
    entries: Option<u64>,
}

fn map_usage(bpffs_dir: &Path, name: &str) -> Result<MapUsage> {
    let data = pinned(bpffs_dir, name)?;
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let field = |key: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut usage = MapUsage {
        memlock: field("memlock:"),
        key_size: field("key_size:"),
        value_size: field("value_size:"),
        entries: None,
    };
    // Keys walked with the kernel's get-next-key, as `bpftool map dump`.
    usage.entries = match name {
        map_names::IDENTITIES => {
            let map: HashMap<_, u32, u32> = HashMap::try_from(Map::HashMap(data))?;
            Some(map.keys().filter(Result::is_ok).count() as u64)
        }
        map_names::POLICY_ENDPOINTS => {
            let map: HashMap<_, u32, PolicyEndpoint> = HashMap::try_from(Map::HashMap(data))?;
            Some(map.keys().filter(Result::is_ok).count() as u64)
        }
        map_names::POLICY => {
            let map: LpmTrie<_, PolicyKey, PolicyRuleRef> = LpmTrie::try_from(Map::LpmTrie(data))?;
            Some(map.keys().filter(Result::is_ok).count() as u64)
        }
        map_names::POLICY_CIDR => {
            let map: LpmTrie<_, PolicyCidrKey, u32> = LpmTrie::try_from(Map::LpmTrie(data))?;
            Some(map.keys().filter(Result::is_ok).count() as u64)
        }
        _ => None,
    };
    Ok(usage)
}

/// The policy maps: their kernel memory, IDENTITIES and POLICY entries, and
/// the entries' own bytes (keys and values, the LPM prefix included).
struct PolicyMapMemory {
    memlock: u64,
    identities: u64,
    allow: u64,
    payload: u64,
}

fn policy_map_memory(bpffs_dir: &Path) -> Result<PolicyMapMemory> {
    let mut out = PolicyMapMemory {
        memlock: 0,
        identities: 0,
        allow: 0,
        payload: 0,
    };
    for name in [
        map_names::IDENTITIES,
        map_names::POLICY_ENDPOINTS,
        map_names::POLICY,
        map_names::POLICY_CIDR,
        map_names::POLICY_CT,
        map_names::POLICY_COUNTS,
    ] {
        let usage = map_usage(bpffs_dir, name)?;
        out.memlock += usage.memlock;
        let entries = usage.entries.unwrap_or(0);
        out.payload += entries * (usage.key_size + usage.value_size);
        match name {
            map_names::IDENTITIES => out.identities = entries,
            map_names::POLICY => out.allow = entries,
            _ => {}
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// 1. The datapath

/// The datapath rows' own clients, one per row, all `app: client`.
pub(crate) const CLIENTS: [&str; 3] = ["client", "client-2", "client-3"];

/// Pod to pod on one node with no policy, with policies selecting the
/// server, and with a large cluster's policies: the same server pod and
/// servers for all rows, each repetition loading one state after the other
/// into the node's manifest directory and measuring it (the baseline
/// first), so that the policy is what differs between the rows, not where
/// the unpinned nginx runs (with a node per row, one run had one row's c=1
/// connection rate ~10 % low in every round, the next run not). Each row
/// has a client pod of its own, idle while the others are measured: the
/// connections a client closes itself (a few % under wrk) stay in
/// TIME_WAIT for 60 s, and with the rows' wrk runs back to back in one
/// client their ports filled the 8 192 that connect() takes first, which
/// made connect()'s port search, not the datapath, set the rate (c=8 down
/// to ~600/s, no packet lost anywhere).
fn datapath(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    let none = Fixture::local(0);
    let selecting = Fixture::local(profile.policies_selecting);
    let cluster = Fixture {
        selecting: profile.policies_selecting,
        policies: profile.policies_total,
        pods: profile.policy_pods,
    };
    let baseline = row(
        GROUP,
        "Tern, no NetworkPolicy",
        None,
        &none.params(0),
        vec![],
    );
    let baseline_label = baseline.label();
    let mut states = vec![(none, baseline)];
    for (name, fixture) in [
        ("Tern, policies select the server", selecting),
        ("Tern, policies in the cluster", cluster),
    ] {
        let r = row(
            GROUP,
            name,
            Some(&baseline_label),
            &fixture.params(0),
            vec![],
        );
        states.push((fixture, r));
    }
    eprintln!("bench: {GROUP}: setting up");
    let tern = Tern::with_k8s_pods("10.244.71.0/24", NAMESPACE)?;
    let mut clients = RowClients::add(&tern)?;
    let mut log = AgentLog::from_end(&tern.node);
    let maps = PinnedPolicyMaps::open(&tern.node.bpffs_dir)?;
    let placeholder = row(GROUP, "", None, &[], vec![]);
    let mut arm = Arm::direct(placeholder, Topology::Tern(Box::new(tern)), ALL);
    let n = profile.repetitions;
    for rep in 1..=n {
        for (i, (fixture, r)) in states.iter_mut().enumerate() {
            interrupt::check()?;
            let tern = tern_of(&mut arm)?;
            load_state(tern, &mut log, &maps, *fixture, &clients.addresses, GROUP)?;
            eprintln!("bench: {GROUP}: {} ({rep}/{n})", r.label());
            // Row i measures from client i (0: the topology's own).
            arm.measure_row(profile, r, clients.of_row(i))?;
        }
    }
    drop(arm);
    Ok(states.into_iter().map(|(_, r)| r).collect())
}

/// The clients of the rows measured on one Tern node, one per row
/// ([`CLIENTS`]): the first row measures from the topology's own client,
/// every other row's pod is swapped in for its turn.
pub(crate) struct RowClients {
    /// The clients of the rows after the first.
    pods: Vec<Pod>,
    /// Every client's name and address, the first row's first.
    pub(crate) addresses: Vec<(&'static str, Ipv4Addr)>,
}

impl RowClients {
    /// Adds the pods of the rows after the first to `tern`'s node.
    pub(crate) fn add(tern: &Tern) -> Result<RowClients> {
        let pods: Vec<Pod> = CLIENTS[1..]
            .iter()
            .map(|name| tern.node.add_k8s_pod(NAMESPACE, name))
            .collect::<Result<_>>()?;
        let addresses = CLIENTS
            .into_iter()
            .zip(std::iter::once(tern.client.ip).chain(pods.iter().map(|c| c.ip)))
            .collect();
        Ok(RowClients { pods, addresses })
    }

    /// Row `i`'s client to swap in: `None` (the topology's own) for the
    /// first row.
    pub(crate) fn of_row(&mut self, i: usize) -> Option<&mut Pod> {
        i.checked_sub(1).and_then(|k| self.pods.get_mut(k))
    }
}

/// The Tern node an arm of these rows measures.
pub(crate) fn tern_of(arm: &mut Arm) -> Result<&mut Tern> {
    match arm.topology_mut() {
        Topology::Tern(tern) => Ok(tern),
        _ => anyhow::bail!("these rows run on a Tern node"),
    }
}

/// Brings the datapath node to fixture `f` (the pods' objects, `f`'s
/// policies and pods), waits until the agent is done with it, and checks
/// the measured ports in the pinned maps for every client.
pub(crate) fn load_state(
    tern: &Tern,
    log: &mut AgentLog,
    maps: &PinnedPolicyMaps,
    f: Fixture,
    clients: &[(&str, Ipv4Addr)],
    group: &str,
) -> Result<()> {
    let server = tern.server.ip;
    let objects = fixture_objects(f, &tern.node.name, server, clients, 0);
    let (seconds, sync) = load(
        &tern.node,
        log,
        vec![("objects.json", objects)],
        f.policies,
        f.pods,
    )?;
    // The Services' sync after it, the last the agent does with the
    // snapshot: it is idle from here on.
    log.wait_done(&tern.node)?;
    eprintln!(
        "bench: {group}: {} policies, {} pods loaded in {seconds:.2} s (policy sync {:.1} ms)",
        f.policies,
        f.pods,
        sync.took_us as f64 / 1e3
    );
    check_state(tern, maps, f, clients)
}

/// Waits until the agent has synced fixture `f` without it being written
/// again (a restarted agent reading its manifest directory), and checks
/// the maps as [`load_state`] does.
pub(crate) fn synced_state(
    tern: &Tern,
    log: &mut AgentLog,
    maps: &PinnedPolicyMaps,
    f: Fixture,
    clients: &[(&str, Ipv4Addr)],
) -> Result<()> {
    log.wait_loaded(&tern.node, f.policies, f.pods)?;
    log.wait_done(&tern.node)?;
    check_state(tern, maps, f, clients)
}

/// Whether the pinned maps hold fixture `f` for the server: isolated when
/// policies select it, and the measured ports allowed from every client.
fn check_state(
    tern: &Tern,
    maps: &PinnedPolicyMaps,
    f: Fixture,
    clients: &[(&str, Ipv4Addr)],
) -> Result<()> {
    let server = tern.server.ip;
    ensure!(
        maps.ingress_isolated(server)? == (f.selecting > 0),
        "server isolation is not what {} policies selecting it make it",
        f.selecting
    );
    for (name, client) in clients {
        for (port, proto) in MEASURED {
            ensure!(
                maps.ingress_allows(*client, server, proto, port)?,
                "the maps deny {name} {port}/{} into the server:\n{}",
                protocol_name(proto),
                tern.node.agent_log_tail()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. and 3. Changes and memory

/// What a change does: edit the toggle policy's rule, or change the
/// client pod's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Rule,
    Label,
}

impl Change {
    const BOTH: [Change; 2] = [Change::Rule, Change::Label];

    fn name(self) -> &'static str {
        match self {
            Change::Rule => "one policy's rule edited",
            Change::Label => "one pod's label changed",
        }
    }
}

/// A node of the change rows: the real client and server (an echo server
/// on the probe port), its maps and log, and its two rows.
struct ChangeNode {
    _echo: EchoServer,
    client: Pod,
    server: Pod,
    node: LabNode,
    maps: PinnedPolicyMaps,
    log: AgentLog,
    rows: [ScenarioResult; 2],
    /// Verdicts a real connection contradicted, per row.
    contradicted: [usize; 2],
    /// A port the changes never touch, allowed by the fixture's policies
    /// (none in the smallest).
    steady_port: Option<u16>,
    /// Changes during which the maps denied it at some moment, per row.
    steady_denied: [usize; 2],
}

/// Per change: end to end, before the policy sync, compile, sync (ms).
#[derive(Default)]
struct ChangeTimes {
    end_to_end: Vec<f64>,
    /// Map writes and deletes of the change's sync.
    map_ops: Vec<f64>,
    /// How long the untouched port read denied: from the first poll that
    /// found it so to the first that found it allowed again (at most a
    /// poll's interval more than it was); 0 when none did. ms.
    steady_denied: Vec<f64>,
    before_sync: Vec<f64>,
    compile: Vec<f64>,
    sync: Vec<f64>,
}

impl ChangeNode {
    /// A node with the real pods; the fixture is loaded by the caller.
    fn new(lab: &Lab, name: &str, cidr: &str, ip: Ipv4Addr) -> Result<ChangeNode> {
        let node = lab.node(name, cidr, ip)?;
        let client = node.add_k8s_pod(NAMESPACE, "client")?;
        let server = node.add_k8s_pod(NAMESPACE, "server")?;
        let echo = EchoServer::start(&server.ns, PROBE_PORT, "server")?;
        let maps = PinnedPolicyMaps::open(&node.bpffs_dir)?;
        let log = AgentLog::from_end(&node);
        Ok(ChangeNode {
            _echo: echo,
            client,
            server,
            node,
            maps,
            log,
            rows: [
                row(CHANGES_GROUP, "", None, &[], vec![]),
                row(CHANGES_GROUP, "", None, &[], vec![]),
            ],
            contradicted: [0; 2],
            steady_port: None,
            steady_denied: [0; 2],
        })
    }

    /// Loads `f`, the client's object and the toggle policy (allowing the
    /// client); names the rows after it.
    fn load(&mut self, f: Fixture, baseline: Option<&Fixture>) -> Result<(f64, PolicySync)> {
        let name = self.node.name.clone();
        // The large file first: the load is timed from its rename (the
        // small ones are unchanged after the first load).
        let files = vec![
            (
                "objects.json",
                fixture_objects(f, &name, self.server.ip, &[], 1),
            ),
            (
                "client.json",
                vec![client_object(&name, "client", self.client.ip, "probe")],
            ),
            ("toggle.json", vec![toggle_policy("probe")]),
        ];
        let loaded = load(&self.node, &mut self.log, files, f.policies + 1, f.pods)?;
        self.steady_port = (f.selecting > 0).then_some(HTTP_PORT);
        for (r, change) in self.rows.iter_mut().zip(Change::BOTH) {
            let base = baseline.map(|b| row_label(change, b));
            *r = row(
                CHANGES_GROUP,
                change.name(),
                base.as_deref(),
                &f.params(1),
                vec![],
            );
        }
        ensure!(
            self.allowed()?,
            "the maps deny the client the probe port after the load:\n{}",
            self.node.agent_log_tail()
        );
        Ok(loaded)
    }

    fn allowed(&self) -> Result<bool> {
        self.maps
            .ingress_allows(self.client.ip, self.server.ip, TCP, PROBE_PORT)
    }

    /// One repetition: `changes` rule edits, then as many label changes,
    /// each flipping the verdict (the first denies, the last allows).
    fn measure_once(&mut self, changes: usize) -> Result<()> {
        for (i, change) in Change::BOTH.into_iter().enumerate() {
            eprintln!(
                "bench: {CHANGES_GROUP}: {}: {changes} changes",
                self.rows[i].label()
            );
            let mut times = ChangeTimes::default();
            for c in 0..changes {
                interrupt::check()?;
                self.change(i, change, c % 2 == 1, &mut times)?;
            }
            let metrics = &mut self.rows[i].metrics;
            let e2e = &times.end_to_end;
            push(
                metrics,
                "change -> datapath p50",
                "ms",
                false,
                percentile(e2e, 0.5),
            );
            push(
                metrics,
                "change -> datapath p99",
                "ms",
                false,
                percentile(e2e, 0.99),
            );
            push(
                metrics,
                "before the policy sync p50",
                "ms",
                false,
                percentile(&times.before_sync, 0.5),
            );
            push(
                metrics,
                "policy compile p50",
                "ms",
                false,
                percentile(&times.compile, 0.5),
            );
            push(
                metrics,
                "policy sync (compile + maps) p50",
                "ms",
                false,
                percentile(&times.sync, 0.5),
            );
            push(
                metrics,
                "policy sync (compile + maps) p99",
                "ms",
                false,
                percentile(&times.sync, 0.99),
            );
            push(
                metrics,
                "map writes + deletes p50",
                "ops",
                false,
                percentile(&times.map_ops, 0.5),
            );
            if let Some(port) = self.steady_port {
                push(
                    metrics,
                    &format!("untouched port {port} denied for, max"),
                    "ms",
                    false,
                    percentile(&times.steady_denied, 1.0),
                );
            }
        }
        Ok(())
    }

    /// One change to `allow`, timed to the maps' new verdict, then checked
    /// with a real connection.
    fn change(
        &mut self,
        i: usize,
        change: Change,
        allow: bool,
        times: &mut ChangeTimes,
    ) -> Result<()> {
        self.log.syncs()?;
        let (file, item) = match change {
            Change::Rule => (
                "toggle.json",
                toggle_policy(if allow { "probe" } else { "nobody" }),
            ),
            Change::Label => (
                "client.json",
                client_object(
                    &self.node.name,
                    "client",
                    self.client.ip,
                    if allow { "probe" } else { "idle" },
                ),
            ),
        };
        let (wall, started) = publish(&self.node, file, vec![item])?;
        // Polled until the maps give the new verdict and the agent has
        // logged the sync (its writes are all done by then); meanwhile a
        // port no change touches must stay allowed.
        let mut end_to_end = None;
        let mut synced = None;
        let mut done = false;
        // The first poll that found the untouched port denied, and the
        // first that found it allowed again after the last denial.
        let mut steady_denied: Option<(Instant, Option<Instant>)> = None;
        for poll in 0u64.. {
            if let Some(port) = self.steady_port {
                let allowed =
                    self.maps
                        .ingress_allows(self.client.ip, self.server.ip, TCP, port)?;
                let now = Instant::now();
                steady_denied = match (steady_denied, allowed) {
                    (None, false) => Some((now, None)),
                    (Some((first, _)), false) => Some((first, None)),
                    (Some((first, None)), true) => Some((first, Some(now))),
                    (other, true) => other,
                };
            }
            if end_to_end.is_none() && self.allowed()? == allow {
                end_to_end = Some(started.elapsed().as_secs_f64() * 1e3);
            }
            if !done && poll % 20 == 0 {
                for line in self.log.lines()? {
                    match (line, &synced) {
                        (Some(sync), None) => synced = Some(sync),
                        (None, Some(_)) => done = true,
                        _ => {}
                    }
                }
            }
            // The next change starts once the agent is done with this one's
            // snapshot (the Services are synced after the policy).
            if let (Some(e2e), Some(sync), true) = (end_to_end, &synced, done) {
                let denied_ms = steady_denied.map_or(0.0, |(first, again)| {
                    let again = again.unwrap_or_else(Instant::now);
                    (again - first).as_secs_f64() * 1e3
                });
                if steady_denied.is_some() {
                    self.steady_denied[i] += 1;
                }
                times.steady_denied.push(denied_ms);
                times.end_to_end.push(e2e);
                times.map_ops.push((sync.writes + sync.deletes) as f64);
                break;
            }
            ensure!(
                started.elapsed() < CHANGE_LIMIT,
                "{}: the maps did not {} the client within {CHANGE_LIMIT:?}:\n{}",
                change.name(),
                if allow { "allow" } else { "deny" },
                self.node.agent_log_tail()
            );
            // As the control plane's changes: short enough not to blur
            // the figure, long enough to leave the agent its CPU.
            std::thread::sleep(Duration::from_micros(50));
        }
        let sync = synced.context("no policy sync")?;
        let before = sync
            .started()
            .duration_since(wall)
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3;
        times.before_sync.push(before);
        times.compile.push(sync.compile_us as f64 / 1e3);
        times.sync.push(sync.took_us as f64 / 1e3);
        // What a real connection gets now: a denied SYN is dropped, so a
        // denial shows as no connection within 200 ms.
        let to = SocketAddr::from((self.server.ip, PROBE_PORT));
        let limit = Duration::from_millis(if allow { 2000 } else { 200 });
        let connected = tcp_connect_from(&self.client.ns, 0, to, limit).is_ok();
        if connected != allow {
            self.contradicted[i] += 1;
            eprintln!(
                "bench: {CHANGES_GROUP}: {}: the maps {} the client, a real connection was {}",
                self.rows[i].label(),
                if allow { "allow" } else { "deny" },
                if connected { "made" } else { "not made" }
            );
        }
        Ok(())
    }

    fn into_rows(self) -> Vec<ScenarioResult> {
        let ChangeNode {
            rows,
            contradicted,
            steady_port,
            steady_denied,
            ..
        } = self;
        rows.into_iter()
            .zip(contradicted.into_iter().zip(steady_denied))
            .map(|(mut row, (n, denied))| {
                if let Some(port) = steady_port {
                    // Over all repetitions: the changes that made the maps
                    // deny, for a moment, a connection both the old and
                    // the new policy allow.
                    row.metrics.push(single(
                        &format!("changes denying the untouched port {port} for a moment"),
                        "changes",
                        denied as f64,
                    ));
                }
                if n > 0 {
                    // Shown in the table: the maps and the traffic disagreed.
                    row.metrics.push(single(
                        "verdicts a connection contradicted",
                        "changes",
                        n as f64,
                    ));
                }
                row
            })
            .collect()
    }
}

fn row_label(change: Change, f: &Fixture) -> String {
    row(CHANGES_GROUP, change.name(), None, &f.params(1), vec![]).label()
}

/// What a memory row measured, for the next one's per-pod figures.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    memlock: u64,
    pods: usize,
}

/// The agent's memory and the policy maps' at one state, as a row of the
/// memory table.
fn memory_row(
    name: &str,
    baseline: Option<&str>,
    (f, extra_policies): (Fixture, usize),
    node: &LabNode,
    previous: Option<Memory>,
    (seconds, sync): (f64, &PolicySync),
) -> Result<(ScenarioResult, Memory)> {
    let pid = node.agent_pid().context("agent pid")?;
    let rss = settled_rss(pid)?;
    let maps = policy_map_memory(&node.bpffs_dir)?;
    let memlock = maps.memlock;
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let kib = |bytes: u64| bytes as f64 / 1024.0;
    let mut metrics: Vec<Metric> = vec![single("agent RSS", "MiB", rss as f64 / 1024.0)];
    let per_pod = |now: f64, before: f64, before_pods: usize| {
        (now - before) / f.pods.saturating_sub(before_pods).max(1) as f64
    };
    if let Some(p) = previous {
        metrics.push(single(
            "RSS per Pod object added",
            "bytes",
            per_pod(rss as f64 * 1024.0, p.rss_kib as f64 * 1024.0, p.pods),
        ));
    }
    metrics.push(single("policy maps, kernel memory", "MiB", mib(memlock)));
    if let Some(p) = previous {
        metrics.push(single(
            "policy maps' kernel memory per Pod object added",
            "bytes",
            per_pod(memlock as f64, p.memlock as f64, p.pods),
        ));
    }
    metrics.push(single(
        "policy map entries x (key + value)",
        "KiB",
        kib(maps.payload),
    ));
    metrics.push(single(
        "IDENTITIES entries",
        "entries",
        maps.identities as f64,
    ));
    metrics.push(single("POLICY entries", "entries", maps.allow as f64));
    metrics.push(single("load -> policy synced", "s", seconds));
    metrics.push(single(
        "policy sync of the load",
        "ms",
        sync.took_us as f64 / 1e3,
    ));
    let params = f.params(extra_policies);
    let memory = Memory {
        rss_kib: rss,
        memlock,
        pods: f.pods,
    };
    Ok((row(MEMORY_GROUP, name, baseline, &params, metrics), memory))
}

/// Change latency on nodes of growing clusters (the smallest the
/// baseline), measured interleaved; the largest also gives the memory
/// table, measured as it is loaded.
fn changes_and_memory(profile: &Profile) -> Result<Vec<ScenarioResult>> {
    eprintln!("bench: {CHANGES_GROUP}: setting up");
    let lab = Lab::new()?;
    let small = Fixture {
        selecting: 0,
        policies: 0,
        pods: 2,
    };
    // The toggle policy is the last of `policies_total`.
    let large = Fixture {
        selecting: profile.policies_selecting,
        policies: profile.policies_total - 1,
        pods: profile.policy_pods,
    };
    let largest = Fixture {
        pods: profile.policy_pods_max,
        ..large
    };
    let mut nodes = Vec::new();
    let mut a = ChangeNode::new(&lab, "pc1", "10.244.74.0/24", Ipv4Addr::new(10, 0, 0, 11))?;
    a.load(small, None)?;
    nodes.push(a);
    let mut b = ChangeNode::new(&lab, "pc2", "10.244.75.0/24", Ipv4Addr::new(10, 0, 0, 12))?;
    let (seconds, sync) = b.load(large, Some(&small))?;
    eprintln!(
        "bench: {CHANGES_GROUP}: {} policies, {} pods loaded in {seconds:.2} s (policy sync {:.1} ms)",
        large.policies + 1,
        large.pods,
        sync.took_us as f64 / 1e3
    );
    nodes.push(b);

    // The largest: memory before anything, at the large fixture, then with
    // the most pods.
    eprintln!("bench: {MEMORY_GROUP}");
    let mut c = ChangeNode::new(&lab, "pc3", "10.244.76.0/24", Ipv4Addr::new(10, 0, 0, 13))?;
    let mut memory = Vec::new();
    let name = c.node.name.clone();
    let none = load(
        &c.node,
        &mut c.log,
        vec![(
            "objects.json",
            fixture_objects(small, &name, c.server.ip, &[("client", c.client.ip)], 0),
        )],
        0,
        2,
    )?;
    let (base_row, mut previous) = memory_row(
        "Tern agent, no NetworkPolicy",
        None,
        (small, 0),
        &c.node,
        None,
        (none.0, &none.1),
    )?;
    let base_label = base_row.label();
    memory.push(base_row);
    for f in [large, largest] {
        let (seconds, sync) = c.load(f, Some(&small))?;
        eprintln!(
            "bench: {MEMORY_GROUP}: {} policies, {} pods loaded in {seconds:.2} s (policy sync {:.1} ms)",
            f.policies + 1,
            f.pods,
            sync.took_us as f64 / 1e3
        );
        let (r, now) = memory_row(
            "Tern agent",
            Some(&base_label),
            (f, 1),
            &c.node,
            Some(previous),
            (seconds, &sync),
        )?;
        memory.push(r);
        previous = now;
    }
    nodes.push(c);

    let n = profile.repetitions;
    for rep in 1..=n {
        for node in &mut nodes {
            interrupt::check()?;
            eprintln!("bench: {CHANGES_GROUP}: {} ({rep}/{n})", node.node.name);
            let watch = CpuWatch::start();
            node.measure_once(profile.policy_changes)?;
            let other = watch.finish();
            for r in &mut node.rows {
                push(&mut r.metrics, OTHER_CPU, "%", false, other);
            }
        }
    }
    let mut rows: Vec<ScenarioResult> = Vec::new();
    for node in nodes {
        rows.extend(node.into_rows());
    }
    // Rule edits first, then label changes, each from the smallest cluster.
    rows.sort_by_key(|r| r.name != Change::Rule.name());
    rows.extend(memory);
    drop(lab);
    Ok(rows)
}

/// What the tables measure, for results.md.
pub fn notes() -> String {
    format!(
        "\nNetwork policy tables:\n\n\
         - **{GROUP}**: pod to pod on one Tern node, the same server pod and servers for every row, a \
         client pod per row (same labels; a client measured right after another row would start with \
         that row's TIME_WAIT sockets, and at ~8 000 of them connect()'s port search sets the rate): \
         each repetition loads a row's objects into the manifest directory, waits until the agent is \
         done with them, then measures the row (the baseline first). The pods have Pod objects (found by the \
         CNI_ARGS a Kubernetes runtime passes) and every policy selecting the server allows the client \
         on one port (the measured ports among them), so every connection takes the allow path. \
         `policies in the cluster`: most policies are in 100 other namespaces and select pods of other \
         nodes only (Pod objects with addresses in 10.128.0.0/9).\n\
         - **{CHANGES_GROUP}**: each change rewrites one small manifest (the toggle policy's rule, or \
         the client's Pod object) and is timed from its rename into the directory to the pinned maps' \
         new verdict for client -> server:{PROBE_PORT}, read as the eBPF programs read them; a real TCP \
         connection then checks the verdict. The agent's `policy synced` log line splits the time: \
         `before the policy sync` = rename -> the sync's start (inotify, parsing the changed file, \
         merging the directory's snapshot, routing), `policy compile` = its `compile_us`, `policy sync` \
         = its `took_us` (compile + map writes), `map writes + deletes` = its `writes` + `deletes`. The \
         manifest source reads a changed file on inotify, not on its 500 ms poll. p99 is over one \
         repetition's changes (the slowest of them at 20). Until each change's sync is logged the maps \
         are also read for client -> server:{HTTP_PORT}, which the other policies allow before and after \
         every change: `changes denying the untouched port` counts, over all repetitions, the changes \
         during which the maps denied it at some poll (a new connection then would have lost its SYN); \
         `denied for, max` is the longest such stretch of a repetition (from the first poll finding \
         it denied to the first finding it allowed again: up to one poll, ~0.1 ms, more than it was).\n\
         - **{MEMORY_GROUP}**: one agent, loaded in row order; RSS 2 s after the sync; the per-pod \
         figures are the growth over the row above divided by the Pod objects added. Kernel memory is \
         the `memlock` of the six policy maps (POLICY_ENDPOINTS, POLICY_CT and POLICY_COUNTS are \
         preallocated: fixed; IDENTITIES, POLICY and POLICY_CIDR grow with their entries); entries x \
         (key + value) is what the maps hold.\n\
         - `{OTHER_CPU}` (% of one CPU, the busiest second of a repetition): what processes outside \
         the benchmark (kernel threads left out) took meanwhile; a repetition run beside a build shows \
         there.\n"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_policy_sync_lines() {
        let line = "2026-12-06T05:58:43.439912Z  INFO tern_agent::policy: policy synced policies=10000 identities=10002 pods=2 isolated=1 writes=7 deletes=3 failed=0 compile_us=81234 took_us=90210";
        let s = PolicySync::parse(line).unwrap();
        assert_eq!(
            (s.policies, s.identities, s.isolated, s.failed),
            (10000, 10002, 1, 0)
        );
        assert_eq!((s.writes, s.deletes), (7, 3));
        assert_eq!((s.compile_us, s.took_us), (81234, 90210));
        let at = s.at.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        // 2026-12-06 is day 20793 of the epoch.
        assert_eq!(at.as_secs(), 20793 * 86_400 + 5 * 3600 + 58 * 60 + 43);
        assert_eq!(at.subsec_nanos(), 439_912_000);
        assert_eq!(
            s.started().duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            at - Duration::from_micros(90210)
        );
        assert!(
            PolicySync::parse(
                "2026-12-06T05:58:43.439839Z  INFO tern_agent::services: services synced took_us=59"
            )
            .is_none()
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
        assert_eq!(
            days_from_civil(2024, 2, 29) + 1,
            days_from_civil(2024, 3, 1)
        );
    }

    #[test]
    fn fixture_shapes() {
        let server = Ipv4Addr::new(10, 244, 1, 3);
        let f = Fixture {
            selecting: 100,
            policies: 10_000,
            pods: 10_000,
        };
        let items = fixture_objects(
            f,
            "n1",
            server,
            &[("client", Ipv4Addr::new(10, 244, 1, 2))],
            0,
        );
        let kind = |k: &str| items.iter().filter(|i| i["kind"] == k).count();
        assert_eq!(kind("Pod"), 10_000);
        assert_eq!(kind("NetworkPolicy"), 10_000);
        assert_eq!(kind("Namespace"), 1 + OTHER_NAMESPACES);
        // Names and pod addresses are unique.
        let unique = |values: Vec<String>| {
            let set: std::collections::BTreeSet<&String> = values.iter().collect();
            set.len() == values.len()
        };
        assert!(unique(
            items
                .iter()
                .map(|i| format!(
                    "{} {} {}",
                    i["kind"], i["metadata"]["namespace"], i["metadata"]["name"]
                ))
                .collect()
        ));
        assert!(unique(
            items
                .iter()
                .filter(|i| i["kind"] == "Pod")
                .map(|i| i["status"]["podIP"].to_string())
                .collect()
        ));
        // Each measured port is allowed by exactly one policy selecting the
        // server.
        for (port, proto) in MEASURED {
            let allowing = items
                .iter()
                .filter(|i| i["metadata"]["namespace"] == NAMESPACE && i["kind"] == "NetworkPolicy")
                .filter(|i| {
                    let p = &i["spec"]["ingress"][0]["ports"][0];
                    p["port"] == port && p["protocol"] == protocol_name(proto)
                })
                .count();
            assert_eq!(allowing, 1, "{port}/{proto}");
        }
        // The smallest number of selecting policies still covers them.
        let ports: Vec<Value> = (0..FEWEST_SELECTING)
            .map(|i| {
                selecting_policy(i, FEWEST_SELECTING)["spec"]["ingress"][0]["ports"][0]["port"]
                    .clone()
            })
            .collect();
        assert_eq!(
            ports,
            [json!(5201), json!(11111), json!(11111), json!(8080)]
        );
        // The largest: 100 000 pods stay within 10.128.0.0/9.
        let last = remote_pod(99_997);
        let ip: Ipv4Addr = last["status"]["podIP"].as_str().unwrap().parse().unwrap();
        assert!(
            ip.octets()[0] == 10 && ip.octets()[1] >= 128 && ip.octets()[1] < 136,
            "{ip}"
        );
    }
}
