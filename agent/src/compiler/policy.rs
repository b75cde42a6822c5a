//! NetworkPolicy -> per-endpoint allow entries, following the
//! `networking.k8s.io/v1` rules: a pod is isolated for a direction when
//! some policy selects it for that direction; what it may then send or
//! receive is the union of those policies' rules. Pure: the same cluster
//! and local endpoints always compile to the same state (identity numbers
//! are kept by the compiler across compilations, so an unchanged pod keeps
//! its number).
//!
//! Identities: one number per distinct (namespace, pod labels, named
//! ports) of the cluster's pods; every pod address maps to its pod's
//! number (the IDENTITIES map). Named ports are part of the identity so
//! that an egress rule's named port resolves exactly, per destination.
//! ipBlock peers do not use identities: each endpoint direction gets its
//! own prefix set (POLICY_CIDR), partitioned so that the longest matching
//! prefix names exactly the ipBlocks (cidr minus except) an address is in.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::model::{
    Cluster, Labels, NamedPort, NamespaceScope, NetworkPolicy, Peer, Peers, Pod, PolicyRule,
    PortRef, Ports,
};

/// The identity number that stands for every peer (`from: []`).
pub const ANY_IDENTITY: u32 = 0;
/// Numbers from here on are per-endpoint ipBlock sets, not pod identities.
pub const CIDR_IDENTITY_BASE: u32 = 1 << 31;

/// A pod of this node, as the endpoint manager knows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalEndpoint {
    pub ip: Ipv4Addr,
    /// (namespace, name) from the runtime's CNI_ARGS, when it gave them.
    pub pod: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

/// The compiled policy of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Every pod address of the cluster (local endpoints included) -> its
    /// identity.
    pub identities: BTreeMap<Ipv4Addr, u32>,
    /// What each identity number stands for.
    pub identity_info: BTreeMap<u32, IdentityInfo>,
    /// The cluster's policies by number ("namespace/name").
    pub policies: BTreeMap<u32, PolicyInfo>,
    /// This node's pods.
    pub endpoints: BTreeMap<Ipv4Addr, EndpointPolicy>,
    /// What could not be compiled as written (each also fails closed).
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    pub namespace: String,
    pub labels: crate::model::Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    /// "namespace/name".
    pub name: String,
    /// The local endpoints it selects (either direction).
    pub selects: Vec<Ipv4Addr>,
    /// Set when the object was not converted whole (it fails closed).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub pod: Option<(String, String)>,
    /// `None` when the pod is not known to the source (yet).
    pub identity: Option<u32>,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

impl EndpointPolicy {
    pub fn direction(&self, direction: Direction) -> &DirectionPolicy {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectionPolicy {
    /// Some policy selects the pod for this direction.
    pub isolated: bool,
    /// Those policies' numbers.
    pub policies: Vec<u32>,
    /// Fail closed: deny everything in this direction (the pod is unknown
    /// while its namespace has policies, so which select it cannot be
    /// told). A policy that could not be compiled only isolates: it adds
    /// no entries, and the other policies' entries still hold.
    pub deny_all: bool,
    /// What is allowed: peer identity, protocol and port prefix -> the
    /// (policy, rule) that allows it (the lowest, when several do).
    pub allow: BTreeMap<AllowKey, RuleRef>,
    /// ipBlock prefixes -> the number (from `CIDR_IDENTITY_BASE`) `allow`
    /// knows the addresses under them by.
    pub cidrs: BTreeMap<Ipv4Network, u32>,
}

/// One allow entry. The datapath looks it up as a longest-prefix match on
/// (identity, protocol, port): `protocol: None` covers every protocol and
/// port, `ports: None` every port of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowKey {
    pub identity: u32,
    pub protocol: Option<u8>,
    pub ports: Option<PortPrefix>,
}

/// The ports sharing their first `len` bits with `port` (a port range is
/// a few of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    pub port: u16,
    /// 1..=16
    pub len: u8,
}

/// A policy by number and one of its rules by index (in its direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: u32,
    pub rule: u32,
}

impl EndpointPolicy {
    fn direction_mut(&mut self, direction: Direction) -> &mut DirectionPolicy {
        match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

impl DirectionPolicy {
    /// The datapath's decision for a peer, once the endpoint is isolated:
    /// its identity, then every peer, then its ipBlock set.
    pub fn allowing(
        &self,
        identity: Option<u32>,
        peer: Ipv4Addr,
        protocol: u8,
        port: u16,
    ) -> Option<RuleRef> {
        identity
            .and_then(|id| self.lookup(id, protocol, port))
            .or_else(|| self.lookup(ANY_IDENTITY, protocol, port))
            .or_else(|| {
                self.cidr_of(peer)
                    .and_then(|id| self.lookup(id, protocol, port))
            })
    }

    /// The longest-prefix match on (identity, protocol, port), as the
    /// datapath's LPM map answers it.
    pub fn lookup(&self, identity: u32, protocol: u8, port: u16) -> Option<RuleRef> {
        let first = AllowKey {
            identity,
            protocol: None,
            ports: None,
        };
        self.allow
            .range(first..)
            .take_while(|(key, _)| key.identity == identity)
            .filter(|(key, _)| key.matches(protocol, port))
            .max_by_key(|(key, _)| key.specificity())
            .map(|(_, rule)| *rule)
    }

    /// The number of `addr`'s longest match among the ipBlock prefixes.
    pub fn cidr_of(&self, addr: Ipv4Addr) -> Option<u32> {
        self.cidrs
            .iter()
            .filter(|(net, _)| net.contains(addr))
            .max_by_key(|(net, _)| net.prefix())
            .map(|(_, number)| *number)
    }
}

impl AllowKey {
    fn matches(&self, protocol: u8, port: u16) -> bool {
        match (self.protocol, self.ports) {
            (None, _) => true,
            (Some(p), None) => p == protocol,
            (Some(p), Some(ports)) => p == protocol && ports.contains(port),
        }
    }

    /// The LPM key's prefix length beyond the identity: a longer one wins.
    fn specificity(&self) -> u8 {
        match (self.protocol, self.ports) {
            (None, _) => 0,
            (Some(_), None) => 8,
            (Some(_), Some(ports)) => 8 + ports.len,
        }
    }
}

impl PortPrefix {
    pub fn contains(self, port: u16) -> bool {
        let shift = 16 - u32::from(self.len.min(16));
        (u32::from(port) >> shift) == (u32::from(self.port) >> shift)
    }
}

/// The minimal aligned prefixes covering `first..=last` exactly (the LPM
/// map matches prefixes, not ranges). Port 0 is never a destination.
pub fn port_prefixes(first: u16, last: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let mut lo = u32::from(first.max(1));
    let hi = u32::from(last);
    while lo <= hi {
        let mut bits = lo.trailing_zeros().min(16);
        while bits > 0 && lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        let (Ok(port), Ok(len)) = (u16::try_from(lo), u8::try_from(16 - bits)) else {
            break;
        };
        out.push(PortPrefix { port, len });
        lo += 1 << bits;
    }
    out
}

/// What a pod identity stands for: pods with the same key are the same to
/// every policy (named ports included, so egress named ports resolve).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct IdentityKey {
    namespace: String,
    labels: Labels,
    named_ports: Vec<NamedPort>,
}

impl IdentityKey {
    fn of(pod: &Pod) -> Self {
        IdentityKey {
            namespace: pod.key.0.clone(),
            labels: pod.labels.clone(),
            named_ports: pod.named_ports.clone(),
        }
    }
}

/// Compiles NetworkPolicies; keeps identity numbers across compilations so
/// that the datapath's maps change only where the cluster did.
#[derive(Debug, Default)]
pub struct PolicyCompiler {
    numbers: HashMap<IdentityKey, u32>,
    taken: HashSet<u32>,
    next: u32,
    /// Policy numbers, kept while the policy exists: POLICY's values and
    /// POLICY_COUNTS name policies by them, so adding one policy must not
    /// renumber (and rewrite the entries of) the others.
    policy_numbers: HashMap<(String, String), u32>,
    next_policy: u32,
    /// ipBlock prefix numbers per pod direction, kept while the prefix
    /// is in use: a block added elsewhere must not shift the meaning of
    /// a number the maps hold (the sync would briefly apply one prefix's
    /// entries to another's addresses). New ones count up, never reused.
    cidr_numbers: HashMap<(Ipv4Addr, Direction, Ipv4Network), u32>,
    cidr_next: HashMap<(Ipv4Addr, Direction), u32>,
    /// Numbers the maps held for pod addresses when the agent started:
    /// the first compilation gives them back to the same pods, so a
    /// restart rewrites no entry that did not change.
    seeds: HashMap<Ipv4Addr, u32>,
}

/// A local endpoint and what the cluster knows of it.
struct Local<'a> {
    ip: Ipv4Addr,
    named: Option<(String, String)>,
    pod: Option<&'a Pod>,
    identity: Option<u32>,
}

impl PolicyCompiler {
    pub fn new() -> Self {
        Self::default()
    }

    /// A compiler that numbers pods as the maps did (address -> number,
    /// as IDENTITIES holds them), where their address still has one.
    pub fn adopt(identities: impl IntoIterator<Item = (Ipv4Addr, u32)>) -> Self {
        PolicyCompiler {
            seeds: identities
                .into_iter()
                .filter(|(_, n)| (1..CIDR_IDENTITY_BASE).contains(n))
                .collect(),
            ..Self::default()
        }
    }

    /// `local`: this node's pods (the endpoint manager's list).
    pub fn compile(&mut self, cluster: &Cluster, local: &[LocalEndpoint]) -> PolicyState {
        let mut state = PolicyState::default();
        let mut locals = find_local_pods(cluster, local);
        let ids = self.identities(cluster, &mut locals, &mut state);
        let namespaces = namespace_labels(cluster, &ids);
        self.number_policies(cluster);
        let policies = compile_policies(
            cluster,
            &PolicyScope {
                ids: &ids,
                namespaces: &namespaces,
                numbers: &self.policy_numbers,
                locals: &locals,
            },
            &mut state.problems,
        );
        let ctx = Ctx {
            cluster,
            ids: &ids,
            policies: &policies,
        };
        let mut selects: BTreeMap<u32, Vec<Ipv4Addr>> = BTreeMap::new();
        for l in &locals {
            let endpoint = ctx.endpoint(l, &mut selects, &mut state.problems);
            state.endpoints.entry(l.ip).or_insert(endpoint);
        }
        for c in &policies {
            let mut selected = selects.remove(&c.number).unwrap_or_default();
            selected.sort();
            selected.dedup();
            let info = PolicyInfo {
                name: c.policy.name(),
                selects: selected,
                error: c.policy.error.clone(),
            };
            state.policies.insert(c.number, info);
        }
        self.renumber_cidrs(&mut state);
        dedup_in_order(&mut state.problems);
        state
    }

    /// Gives each pod direction's ipBlock prefixes their kept numbers (the
    /// compilation numbers them by position) and forgets unused ones.
    fn renumber_cidrs(&mut self, state: &mut PolicyState) {
        let mut used = HashSet::new();
        for (ip, endpoint) in &mut state.endpoints {
            for direction in [Direction::Ingress, Direction::Egress] {
                let dir = match direction {
                    Direction::Ingress => &mut endpoint.ingress,
                    Direction::Egress => &mut endpoint.egress,
                };
                if dir.cidrs.is_empty() {
                    continue;
                }
                let mut renamed = BTreeMap::new();
                for (prefix, positional) in &mut dir.cidrs {
                    let key = (*ip, direction, *prefix);
                    let number = match self.cidr_numbers.get(&key) {
                        Some(n) => *n,
                        None => {
                            let next = self
                                .cidr_next
                                .entry((*ip, direction))
                                .or_insert(CIDR_IDENTITY_BASE);
                            let n = *next;
                            *next = next.wrapping_add(1).max(CIDR_IDENTITY_BASE);
                            self.cidr_numbers.insert(key, n);
                            n
                        }
                    };
                    used.insert(key);
                    renamed.insert(*positional, number);
                    *positional = number;
                }
                dir.allow = std::mem::take(&mut dir.allow)
                    .into_iter()
                    .map(|(mut key, rule)| {
                        if let Some(n) = renamed.get(&key.identity) {
                            key.identity = *n;
                        }
                        (key, rule)
                    })
                    .collect();
            }
        }
        self.cidr_numbers.retain(|key, _| used.contains(key));
        let endpoints: HashSet<(Ipv4Addr, Direction)> =
            used.iter().map(|(ip, d, _)| (*ip, *d)).collect();
        self.cidr_next.retain(|key, _| endpoints.contains(key));
    }

    /// Numbers the pods (those with addresses, and the local ones), fills
    /// `identities` and `identity_info`, and forgets keys no longer used.
    fn identities(
        &mut self,
        cluster: &Cluster,
        locals: &mut [Local<'_>],
        state: &mut PolicyState,
    ) -> BTreeMap<u32, IdentityKey> {
        let mut used = BTreeMap::new();
        let mut contested = BTreeSet::new();
        for pod in cluster.pods.values() {
            if pod.host_network || pod.finished || pod.ips.is_empty() {
                continue;
            }
            let id = self.intern(pod, &pod.ips, &mut used);
            for ip in &pod.ips {
                match state.identities.get(ip) {
                    Some(other) if *other != id => {
                        contested.insert(*ip);
                    }
                    Some(_) => {}
                    None => {
                        state.identities.insert(*ip, id);
                    }
                }
            }
        }
        // Two running pods claim one address (one of them stale): which
        // one sends from it cannot be told, so it is nobody's.
        for ip in contested {
            state.identities.remove(&ip);
            state.problems.push(format!(
                "address {ip} is claimed by pods of different identities: it matches no pod selector"
            ));
        }
        for l in locals.iter_mut() {
            // This node's endpoints are authoritative for their addresses
            // (a stale pod object may still claim one).
            match l.pod {
                Some(pod) => {
                    let id = self.intern(pod, &[l.ip], &mut used);
                    l.identity = Some(id);
                    state.identities.insert(l.ip, id);
                }
                None => {
                    state.identities.remove(&l.ip);
                }
            }
        }
        self.seeds.clear();
        self.numbers.retain(|_, n| used.contains_key(n));
        self.taken.retain(|n| used.contains_key(n));
        state.identity_info = used
            .iter()
            .map(|(n, key)| {
                let info = IdentityInfo {
                    namespace: key.namespace.clone(),
                    labels: key.labels.clone(),
                };
                (*n, info)
            })
            .collect();
        used
    }

    fn intern(
        &mut self,
        pod: &Pod,
        ips: &[Ipv4Addr],
        used: &mut BTreeMap<u32, IdentityKey>,
    ) -> u32 {
        let key = IdentityKey::of(pod);
        let number = match self.numbers.get(&key) {
            Some(n) => *n,
            None => {
                let seeded = ips
                    .iter()
                    .filter_map(|ip| self.seeds.get(ip).copied())
                    .find(|n| !self.taken.contains(n));
                let n = match seeded {
                    Some(n) => {
                        self.taken.insert(n);
                        n
                    }
                    None => self.allocate(),
                };
                self.numbers.insert(key.clone(), n);
                n
            }
        };
        used.entry(number).or_insert(key);
        number
    }

    /// Gives every policy of the cluster a number (a new one the next
    /// free) and forgets those of policies that are gone.
    fn number_policies(&mut self, cluster: &Cluster) {
        self.policy_numbers
            .retain(|key, _| cluster.network_policies.contains_key(key));
        let taken: HashSet<u32> = self.policy_numbers.values().copied().collect();
        for key in cluster.network_policies.keys() {
            if self.policy_numbers.contains_key(key) {
                continue;
            }
            let number = loop {
                let n = self.next_policy.max(1);
                self.next_policy = if n + 1 >= CIDR_IDENTITY_BASE {
                    1
                } else {
                    n + 1
                };
                if !taken.contains(&n) {
                    break n;
                }
            };
            self.policy_numbers.insert(key.clone(), number);
        }
    }

    /// The next free number in 1..CIDR_IDENTITY_BASE (wrapping; there are
    /// far more numbers than pods).
    fn allocate(&mut self) -> u32 {
        loop {
            let n = self.next.max(1);
            self.next = if n + 1 >= CIDR_IDENTITY_BASE {
                1
            } else {
                n + 1
            };
            if self.taken.insert(n) {
                return n;
            }
        }
    }
}

/// The pod of each local endpoint: by the name the runtime gave, or, when
/// it gave none, by address. A named pod the source does not have (yet) is
/// unknown: a stale pod holding the address is not it.
fn find_local_pods<'a>(cluster: &'a Cluster, local: &[LocalEndpoint]) -> Vec<Local<'a>> {
    let mut by_ip: HashMap<Ipv4Addr, &Pod> = HashMap::new();
    for pod in cluster
        .pods
        .values()
        .filter(|p| !p.host_network && !p.finished)
    {
        for ip in &pod.ips {
            by_ip.entry(*ip).or_insert(&**pod);
        }
    }
    local
        .iter()
        .map(|ep| {
            let pod = match &ep.pod {
                Some(key) => cluster.pods.get(key).map(|p| &**p),
                None => by_ip.get(&ep.ip).copied(),
            };
            Local {
                ip: ep.ip,
                named: ep.pod.clone(),
                pod,
                identity: None,
            }
        })
        .collect()
}

/// The labels of every namespace some identity lives in.
fn namespace_labels(
    cluster: &Cluster,
    ids: &BTreeMap<u32, IdentityKey>,
) -> BTreeMap<String, Labels> {
    ids.values()
        .map(|key| {
            let labels = cluster.namespace_labels(&key.namespace);
            (key.namespace.clone(), labels)
        })
        .collect()
}

/// A policy with its peers resolved to identities (the same for every
/// endpoint it selects).
struct Compiled<'a> {
    number: u32,
    policy: &'a NetworkPolicy,
    ingress: Option<Vec<Rule<'a>>>,
    egress: Option<Vec<Rule<'a>>>,
}

impl Compiled<'_> {
    fn rules(&self, direction: Direction) -> Option<&[Rule<'_>]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

struct Rule<'a> {
    at: RuleRef,
    /// `from`/`to` absent or empty: every peer.
    any: bool,
    /// The pod identities its pod peers select.
    identities: BTreeSet<u32>,
    /// Its ipBlocks: (cidr, except), masked.
    blocks: Vec<(Ipv4Network, Vec<Ipv4Network>)>,
    ports: &'a Ports,
}

/// What compiling the policies needs besides the cluster.
struct PolicyScope<'s, 'l> {
    ids: &'s BTreeMap<u32, IdentityKey>,
    namespaces: &'s BTreeMap<String, Labels>,
    numbers: &'s HashMap<(String, String), u32>,
    locals: &'s [Local<'l>],
}

/// Every policy with its number; the rules (peers resolved to identities)
/// only of those that select a pod of this node: of 10 000 policies in a
/// cluster a node resolves the few that concern its pods.
fn compile_policies<'a>(
    cluster: &'a Cluster,
    scope: &PolicyScope<'_, '_>,
    problems: &mut Vec<String>,
) -> Vec<Compiled<'a>> {
    cluster
        .network_policies
        .iter()
        .map(|(key, policy)| {
            let number = scope.numbers.get(key).copied().unwrap_or(0);
            if let Some(error) = &policy.error {
                problems.push(format!(
                    "policy {}: {error}; it isolates the pods it selects and allows nothing",
                    policy.name()
                ));
            }
            let selects_here = scope.locals.iter().any(|l| {
                l.pod.is_some_and(|pod| {
                    pod.key.0 == policy.key.0 && policy.pod_selector.matches(&pod.labels)
                })
            });
            let rules = |list: &'a Option<Vec<PolicyRule>>| {
                list.as_ref().map(|list| {
                    if policy.error.is_some() || !selects_here {
                        // Fail closed (isolate, allow nothing), or nothing
                        // of this node to compile for.
                        return Vec::new();
                    }
                    let peers = PeerScope {
                        ids: scope.ids,
                        namespaces: scope.namespaces,
                        own: &policy.key.0,
                    };
                    list.iter()
                        .zip(0..)
                        .map(|(rule, index)| {
                            let at = RuleRef {
                                policy: number,
                                rule: index,
                            };
                            peers.rule(rule, at)
                        })
                        .collect()
                })
            };
            Compiled {
                number,
                policy,
                ingress: rules(&policy.ingress),
                egress: rules(&policy.egress),
            }
        })
        .collect()
}

/// What resolving a policy's peers needs.
struct PeerScope<'s> {
    ids: &'s BTreeMap<u32, IdentityKey>,
    namespaces: &'s BTreeMap<String, Labels>,
    /// The policy's namespace.
    own: &'s str,
}

impl PeerScope<'_> {
    fn rule<'a>(&self, rule: &'a PolicyRule, at: RuleRef) -> Rule<'a> {
        let mut out = Rule {
            at,
            any: false,
            identities: BTreeSet::new(),
            blocks: Vec::new(),
            ports: &rule.ports,
        };
        let Peers::Some(peers) = &rule.peers else {
            out.any = true;
            return out;
        };
        for peer in peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    let selected = self.ids.iter().filter(|(_, key)| {
                        self.namespace_selected(namespaces, &key.namespace)
                            && pods.matches(&key.labels)
                    });
                    out.identities.extend(selected.map(|(n, _)| *n));
                }
                Peer::IpBlock { cidr, except } => {
                    let except = except.iter().map(|e| masked(*e)).collect();
                    out.blocks.push((masked(*cidr), except));
                }
            }
        }
        out
    }

    fn namespace_selected(&self, scope: &NamespaceScope, namespace: &str) -> bool {
        match scope {
            NamespaceScope::Own => namespace == self.own,
            NamespaceScope::Selected(selector) => self
                .namespaces
                .get(namespace)
                .is_some_and(|labels| selector.matches(labels)),
        }
    }
}

/// One allow entry's (protocol, ports).
type PortEntry = (Option<u8>, Option<PortPrefix>);

/// The entries of `ports` that need no destination pod: all but the
/// named ports.
fn numeric_entries(ports: &Ports) -> Vec<PortEntry> {
    let Ports::Some(list) = ports else {
        return vec![(None, None)];
    };
    let mut out = Vec::new();
    for p in list {
        let protocol = Some(p.protocol.number());
        match &p.port {
            None => out.push((protocol, None)),
            Some(PortRef::Number(first)) => {
                let last = p.end_port.unwrap_or(*first).max(*first);
                let prefixes = port_prefixes(*first, last);
                out.extend(prefixes.into_iter().map(|pp| (protocol, Some(pp))));
            }
            Some(PortRef::Name(_)) => {}
        }
    }
    out
}

/// The entries of the named ports of `ports`, resolved against the
/// destination pod's named ports (same name and protocol).
fn named_entries(ports: &Ports, destination: &[NamedPort]) -> Vec<PortEntry> {
    let Ports::Some(list) = ports else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|p| {
            let Some(PortRef::Name(name)) = &p.port else {
                return None;
            };
            let found = destination
                .iter()
                .find(|np| np.name == *name && np.protocol == p.protocol)?;
            let prefix = PortPrefix {
                port: found.port,
                len: 16,
            };
            Some((Some(p.protocol.number()), Some(prefix)))
        })
        .collect()
}

fn has_named(ports: &Ports) -> bool {
    matches!(ports, Ports::Some(list) if list.iter().any(|p| matches!(p.port, Some(PortRef::Name(_)))))
}

fn add_entries(
    allow: &mut BTreeMap<AllowKey, RuleRef>,
    identity: u32,
    entries: &[PortEntry],
    at: RuleRef,
) {
    for &(protocol, ports) in entries {
        let key = AllowKey {
            identity,
            protocol,
            ports,
        };
        allow
            .entry(key)
            .and_modify(|r| *r = (*r).min(at))
            .or_insert(at);
    }
}

/// An ipBlock of a rule selecting an endpoint, with its ports resolved.
struct Block {
    cidr: Ipv4Network,
    except: Vec<Ipv4Network>,
    at: RuleRef,
    entries: Vec<PortEntry>,
}

impl Block {
    /// Whether the addresses whose longest match is `q` are in the block.
    fn matches(&self, q: Ipv4Network) -> bool {
        covers(self.cidr, q) && !self.except.iter().any(|e| covers(*e, q))
    }
}

fn masked(net: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(net.network(), net.prefix()).unwrap_or(net)
}

fn covers(outer: Ipv4Network, inner: Ipv4Network) -> bool {
    outer.prefix() <= inner.prefix() && outer.contains(inner.network())
}

/// Numbers every cidr and except so that an address's longest match names
/// exactly the blocks it is in, and allows those blocks' ports for it.
fn add_blocks(out: &mut DirectionPolicy, blocks: &[Block]) {
    let prefixes: BTreeSet<Ipv4Network> = blocks
        .iter()
        .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
        .collect();
    for (q, number) in prefixes.into_iter().zip(CIDR_IDENTITY_BASE..) {
        out.cidrs.insert(q, number);
        for block in blocks.iter().filter(|b| b.matches(q)) {
            add_entries(&mut out.allow, number, &block.entries, block.at);
        }
    }
}

/// The compiled cluster-wide parts every endpoint is compiled against.
struct Ctx<'c> {
    cluster: &'c Cluster,
    ids: &'c BTreeMap<u32, IdentityKey>,
    policies: &'c [Compiled<'c>],
}

impl Ctx<'_> {
    fn endpoint(
        &self,
        local: &Local<'_>,
        selects: &mut BTreeMap<u32, Vec<Ipv4Addr>>,
        problems: &mut Vec<String>,
    ) -> EndpointPolicy {
        let (Some(pod), Some(identity)) = (local.pod, local.identity) else {
            return self.unknown(local, problems);
        };
        let mut out = EndpointPolicy {
            pod: Some(pod.key.clone()),
            identity: Some(identity),
            ..EndpointPolicy::default()
        };
        let selecting = self
            .policies
            .iter()
            .filter(|c| c.policy.key.0 == pod.key.0 && c.policy.pod_selector.matches(&pod.labels));
        let mut blocks: [Vec<Block>; 2] = [Vec::new(), Vec::new()];
        for c in selecting {
            selects.entry(c.number).or_default().push(local.ip);
            for (direction, blocks) in [Direction::Ingress, Direction::Egress]
                .into_iter()
                .zip(blocks.iter_mut())
            {
                let Some(rules) = c.rules(direction) else {
                    continue;
                };
                let dir = out.direction_mut(direction);
                dir.isolated = true;
                dir.policies.push(c.number);
                for rule in rules {
                    self.apply(dir, blocks, direction, rule, pod, problems);
                }
            }
        }
        add_blocks(&mut out.ingress, &blocks[0]);
        add_blocks(&mut out.egress, &blocks[1]);
        out
    }

    /// Fail closed when policies might select the pod (its labels are not
    /// known, so which ones cannot be told). An endpoint the runtime gave
    /// no pod name (not a Kubernetes runtime: kubelet's always pass
    /// K8S_POD_NAMESPACE/K8S_POD_NAME) and no Pod claims by address is no
    /// pod at all: no NetworkPolicy can select it, so none isolates it.
    fn unknown(&self, local: &Local<'_>, problems: &mut Vec<String>) -> EndpointPolicy {
        let mut out = EndpointPolicy {
            pod: local.named.clone(),
            ..EndpointPolicy::default()
        };
        let policies = &self.cluster.network_policies;
        let guarded = match &local.named {
            Some((ns, _)) => policies.keys().any(|(pns, _)| pns == ns),
            None => false,
        };
        if guarded {
            for dir in [&mut out.ingress, &mut out.egress] {
                dir.isolated = true;
                dir.deny_all = true;
            }
            let who = match &local.named {
                Some((ns, name)) => format!("{ns}/{name}"),
                None => String::new(),
            };
            problems.push(format!(
                "endpoint {} ({who}): pod not known while NetworkPolicies may select it; \
                 denying all its traffic until it is",
                local.ip
            ));
        }
        out
    }

    /// Adds one rule's entries; its ipBlocks go to `blocks` (they are
    /// partitioned once all rules are in).
    fn apply(
        &self,
        dir: &mut DirectionPolicy,
        blocks: &mut Vec<Block>,
        direction: Direction,
        rule: &Rule<'_>,
        pod: &Pod,
        problems: &mut Vec<String>,
    ) {
        let at = rule.at;
        let mut fixed = numeric_entries(rule.ports);
        let named = has_named(rule.ports);
        if direction == Direction::Ingress {
            // The destination is the endpoint itself, whatever the peer.
            fixed.extend(named_entries(rule.ports, &pod.named_ports));
        }
        if rule.any {
            add_entries(&mut dir.allow, ANY_IDENTITY, &fixed, at);
        }
        for id in &rule.identities {
            add_entries(&mut dir.allow, *id, &fixed, at);
        }
        if named && direction == Direction::Egress {
            self.egress_named(dir, rule, problems);
        }
        for (cidr, except) in &rule.blocks {
            blocks.push(Block {
                cidr: *cidr,
                except: except.clone(),
                at,
                entries: fixed.clone(),
            });
        }
    }

    /// Egress named ports resolve per destination identity; an ipBlock has
    /// no pod to resolve them against.
    fn egress_named(&self, dir: &mut DirectionPolicy, rule: &Rule<'_>, problems: &mut Vec<String>) {
        let peers = self
            .ids
            .iter()
            .filter(|(n, _)| rule.any || rule.identities.contains(n));
        for (n, key) in peers {
            let entries = named_entries(rule.ports, &key.named_ports);
            add_entries(&mut dir.allow, *n, &entries, rule.at);
        }
        if !rule.blocks.is_empty() {
            let name = self
                .policies
                .iter()
                .find(|c| c.number == rule.at.policy)
                .map(|c| c.policy.name())
                .unwrap_or_default();
            problems.push(format!(
                "policy {name} egress rule {}: a named port matches no ipBlock peer \
                 (there is no pod to resolve it against)",
                rule.at.rule
            ));
        }
    }
}

fn dedup_in_order(items: &mut Vec<String>) {
    let mut seen = HashSet::new();
    items.retain(|item| seen.insert(item.clone()));
}

/// The datapath's decision for one direction of a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No policy selects the pod for this direction.
    NotIsolated,
    Allowed {
        by: RuleRef,
        /// "namespace/name".
        policy: String,
    },
    /// A pod reaching itself (e.g. through a Service) is never denied.
    AllowedSelf,
    Denied {
        /// The policies isolating the pod, none of which allows it.
        isolating: Vec<String>,
    },
    /// The pod's policy is not known: everything is denied.
    DeniedFailClosed,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        matches!(
            self,
            Verdict::NotIsolated | Verdict::Allowed { .. } | Verdict::AllowedSelf
        )
    }
}

/// Both ends' decisions; `None` where that end is not a pod of this node
/// (its own node decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub egress: Option<Verdict>,
    pub ingress: Option<Verdict>,
}

impl Explanation {
    pub fn allowed(&self) -> bool {
        [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .all(Verdict::allowed)
    }
}

/// For `tern policy explain`: what this node's datapath decides for a new
/// connection from `src` to `dst`.
pub fn explain(
    state: &PolicyState,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    port: u16,
) -> Explanation {
    Explanation {
        egress: decide(state, src, Direction::Egress, dst, protocol, port),
        ingress: decide(state, dst, Direction::Ingress, src, protocol, port),
    }
}

/// The decision at local endpoint `own` for traffic with `peer` in
/// `direction`, exactly as the datapath takes it; `None` when `own` is not
/// a local endpoint.
pub fn decide(
    state: &PolicyState,
    own: Ipv4Addr,
    direction: Direction,
    peer: Ipv4Addr,
    protocol: u8,
    port: u16,
) -> Option<Verdict> {
    let dir = state.endpoints.get(&own)?.direction(direction);
    let name = |policy: &u32| {
        state
            .policies
            .get(policy)
            .map_or_else(|| format!("#{policy}"), |p| p.name.clone())
    };
    let verdict = if !dir.isolated {
        Verdict::NotIsolated
    } else if dir.deny_all {
        Verdict::DeniedFailClosed
    } else if peer == own {
        Verdict::AllowedSelf
    } else {
        let identity = state.identities.get(&peer).copied();
        match dir.allowing(identity, peer, protocol, port) {
            Some(by) => Verdict::Allowed {
                by,
                policy: name(&by.policy),
            },
            None => Verdict::Denied {
                isolating: dir.policies.iter().map(name).collect(),
            },
        }
    };
    Some(verdict)
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::NotIsolated => f.write_str("allowed (no policy isolates the pod)"),
            Verdict::Allowed { by, policy } => {
                write!(f, "allowed by {policy} rule {}", by.rule)
            }
            Verdict::AllowedSelf => f.write_str("allowed (the pod itself)"),
            Verdict::Denied { isolating } => write!(
                f,
                "denied (isolated by {}; no rule allows it)",
                isolating.join(", ")
            ),
            Verdict::DeniedFailClosed => {
                f.write_str("denied (fail closed: the pod's policy is not known)")
            }
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let not_local = "not a pod of this node";
        match &self.egress {
            Some(v) => writeln!(f, "egress: {v}")?,
            None => writeln!(f, "egress: {not_local}")?,
        }
        match &self.ingress {
            Some(v) => write!(f, "ingress: {v}"),
            None => write!(f, "ingress: {not_local}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::{
        LabelSelector, NAMESPACE_NAME_LABEL, Namespace, Operator, PolicyPort, Protocol, Requirement,
    };
    use std::sync::Arc;

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const ICMP: u8 = 1;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: labels(pairs),
            expressions: vec![],
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn pod(ns: &str, name: &str, addr: &str, pairs: &[(&str, &str)]) -> Pod {
        Pod {
            key: (ns.into(), name.into()),
            node: Some("n1".into()),
            ips: vec![ip(addr)],
            host_network: false,
            finished: false,
            labels: labels(pairs),
            named_ports: vec![],
        }
    }

    fn with_port(mut p: Pod, name: &str, protocol: Protocol, port: u16) -> Pod {
        p.named_ports.push(NamedPort {
            name: name.into(),
            protocol,
            port,
        });
        p.named_ports.sort();
        p
    }

    fn namespace(name: &str, pairs: &[(&str, &str)]) -> Namespace {
        let mut labels = labels(pairs);
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.into());
        Namespace {
            name: name.into(),
            lb_algorithm: None,
            labels,
        }
    }

    fn policy(
        ns: &str,
        name: &str,
        selector: LabelSelector,
        ingress: Option<Vec<PolicyRule>>,
        egress: Option<Vec<PolicyRule>>,
    ) -> NetworkPolicy {
        NetworkPolicy {
            key: (ns.into(), name.into()),
            pod_selector: selector,
            ingress,
            egress,
            error: None,
        }
    }

    fn rule(peers: Vec<Peer>, ports: Vec<PolicyPort>) -> PolicyRule {
        PolicyRule {
            peers: Peers::Some(peers),
            ports: Ports::Some(ports),
        }
    }

    /// `from: []` / `to: []`: every peer.
    fn any_peer(ports: Vec<PolicyPort>) -> PolicyRule {
        PolicyRule {
            peers: Peers::All,
            ports: Ports::Some(ports),
        }
    }

    fn pods_peer(pairs: &[(&str, &str)]) -> Peer {
        Peer::Pods {
            namespaces: NamespaceScope::Own,
            pods: sel(pairs),
        }
    }

    fn ns_peer(ns: &[(&str, &str)], pods: &[(&str, &str)]) -> Peer {
        Peer::Pods {
            namespaces: NamespaceScope::Selected(sel(ns)),
            pods: sel(pods),
        }
    }

    fn port(protocol: Protocol, number: u16) -> PolicyPort {
        PolicyPort {
            protocol,
            port: Some(PortRef::Number(number)),
            end_port: None,
        }
    }

    fn named(protocol: Protocol, name: &str) -> PolicyPort {
        PolicyPort {
            protocol,
            port: Some(PortRef::Name(name.into())),
            end_port: None,
        }
    }

    fn cluster(
        pods: Vec<Pod>,
        namespaces: Vec<Namespace>,
        policies: Vec<NetworkPolicy>,
    ) -> Cluster {
        let mut c = Cluster::default();
        for p in pods {
            c.pods.insert(p.key.clone(), Arc::new(p));
        }
        for n in namespaces {
            c.namespaces.insert(n.name.clone(), Arc::new(n));
        }
        for p in policies {
            c.network_policies.insert(p.key.clone(), Arc::new(p));
        }
        c
    }

    fn local(addr: &str, ns: &str, name: &str) -> LocalEndpoint {
        LocalEndpoint {
            ip: ip(addr),
            pod: Some((ns.into(), name.into())),
        }
    }

    fn compile(c: &Cluster, locals: &[LocalEndpoint]) -> PolicyState {
        PolicyCompiler::new().compile(c, locals)
    }

    fn allowed(state: &PolicyState, src: &str, dst: &str, protocol: u8, port: u16) -> bool {
        explain(state, ip(src), ip(dst), protocol, port).allowed()
    }

    /// backend 10.0.0.1 (local), frontend .2, database .3, other .4, all
    /// in namespace "a".
    fn example_cluster(policies: Vec<NetworkPolicy>) -> Cluster {
        cluster(
            vec![
                pod("a", "backend", "10.0.0.1", &[("app", "backend")]),
                pod("a", "frontend", "10.0.0.2", &[("app", "frontend")]),
                pod("a", "database", "10.0.0.3", &[("app", "database")]),
                pod("a", "other", "10.0.0.4", &[("app", "other")]),
            ],
            vec![namespace("a", &[])],
            policies,
        )
    }

    #[test]
    fn the_example_policy_explains_as_documented() {
        let p = policy(
            "a",
            "backend",
            sel(&[("app", "backend")]),
            Some(vec![rule(
                vec![pods_peer(&[("app", "frontend")])],
                vec![port(Protocol::Tcp, 8080)],
            )]),
            Some(vec![
                rule(
                    vec![pods_peer(&[("app", "database")])],
                    vec![port(Protocol::Tcp, 5432)],
                ),
                any_peer(vec![port(Protocol::Tcp, 53), port(Protocol::Udp, 53)]),
            ]),
        );
        let c = example_cluster(vec![p]);
        let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
        assert_eq!(state.policies[&1].selects, vec![ip("10.0.0.1")]);
        let e = explain(&state, ip("10.0.0.2"), ip("10.0.0.1"), TCP, 8080);
        assert_eq!(e.egress, None); // the frontend is not on this node
        assert_eq!(
            e.ingress,
            Some(Verdict::Allowed {
                by: RuleRef { policy: 1, rule: 0 },
                policy: "a/backend".into()
            })
        );
        assert!(e.allowed());
        assert_eq!(
            e.to_string(),
            "egress: not a pod of this node\ningress: allowed by a/backend rule 0"
        );
        assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 8081));
        assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", UDP, 8080));
        let denied = explain(&state, ip("10.0.0.4"), ip("10.0.0.1"), TCP, 8080);
        assert_eq!(
            denied.ingress,
            Some(Verdict::Denied {
                isolating: vec!["a/backend".into()]
            })
        );
        assert!(!denied.allowed());
        assert!(allowed(&state, "10.0.0.1", "10.0.0.3", TCP, 5432));
        assert!(!allowed(&state, "10.0.0.1", "10.0.0.3", TCP, 5433));
        assert!(!allowed(&state, "10.0.0.1", "10.0.0.4", TCP, 5432));
        for dst in ["10.0.0.4", "8.8.8.8", "10.0.0.3"] {
            assert!(allowed(&state, "10.0.0.1", dst, TCP, 53), "{dst}");
            assert!(allowed(&state, "10.0.0.1", dst, UDP, 53), "{dst}");
        }
        assert!(!allowed(&state, "10.0.0.1", "10.0.0.4", TCP, 80));
        assert!(!allowed(&state, "10.0.0.1", "8.8.8.8", ICMP, 0));
        // A pod reaching itself (through a Service) is never denied.
        let own = explain(&state, ip("10.0.0.1"), ip("10.0.0.1"), TCP, 80);
        assert_eq!(own.egress, Some(Verdict::AllowedSelf));
        assert_eq!(own.ingress, Some(Verdict::AllowedSelf));
    }

    #[test]
    fn a_policy_isolates_only_the_directions_it_names() {
        let p = policy("a", "deny-in", sel(&[]), Some(vec![]), None);
        let c = example_cluster(vec![p]);
        let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
        let ep = &state.endpoints[&ip("10.0.0.1")];
        assert!(ep.ingress.isolated);
        assert_eq!(ep.ingress.policies, vec![1]);
        assert!(!ep.egress.isolated);
        let e = explain(&state, ip("10.0.0.1"), ip("10.0.0.2"), TCP, 80);
        assert_eq!(e.egress, Some(Verdict::NotIsolated));
        assert!(e.allowed());
        assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 80));
    }

    #[test]
    fn default_deny_denies_everything_but_the_pod_itself() {
        let p = policy("a", "deny", sel(&[]), Some(vec![]), Some(vec![]));
        let c = example_cluster(vec![p]);
        let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
        let ep = &state.endpoints[&ip("10.0.0.1")];
        assert!(ep.ingress.allow.is_empty() && ep.egress.allow.is_empty());
        for peer in ["10.0.0.2", "1.2.3.4"] {
            assert!(!allowed(&state, peer, "10.0.0.1", TCP, 80));
            assert!(!allowed(&state, "10.0.0.1", peer, UDP, 53));
        }
        assert!(allowed(&state, "10.0.0.1", "10.0.0.1", TCP, 80));
        // Not selected by the pod selector of another namespace's policy.
        let other = policy("b", "deny", sel(&[]), Some(vec![]), Some(vec![]));
        let state = compile(
            &example_cluster(vec![other]),
            &[local("10.0.0.1", "a", "backend")],
        );
        assert!(allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 80));
        assert!(state.policies[&1].selects.is_empty());
    }

    #[test]
    fn allow_all_is_the_any_identity_for_every_protocol() {
        let all = PolicyRule {
            peers: Peers::All,
            ports: Ports::All,
        };
        let p = policy("a", "all", sel(&[]), Some(vec![all]), None);
        let c = example_cluster(vec![p]);
        let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
        let allow = &state.endpoints[&ip("10.0.0.1")].ingress.allow;
        let key = AllowKey {
            identity: ANY_IDENTITY,
            protocol: None,
            ports: None,
        };
        assert_eq!(allow.len(), 1);
        assert_eq!(allow[&key], RuleRef { policy: 1, rule: 0 });
        assert!(allowed(&state, "10.0.0.4", "10.0.0.1", TCP, 1));
        assert!(allowed(&state, "203.0.113.9", "10.0.0.1", ICMP, 0));
    }

    #[test]
    fn two_policies_allow_their_union_and_report_the_lowest_rule() {
        let front = policy(
            "a",
            "front",
            sel(&[("app", "backend")]),
            Some(vec![rule(
                vec![pods_peer(&[("app", "frontend")])],
                vec![port(Protocol::Tcp, 80)],
            )]),
            None,
        );
        let other = policy(
            "a",
            "other",
            sel(&[]),
            Some(vec![
                rule(
                    vec![pods_peer(&[("app", "other")])],
                    vec![port(Protocol::Tcp, 9090)],
                ),
                rule(
                    vec![pods_peer(&[("app", "frontend")])],
                    vec![port(Protocol::Tcp, 80)],
                ),
            ]),
            None,
        );
        let c = example_cluster(vec![front, other]);
        let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
        let ingress = &state.endpoints[&ip("10.0.0.1")].ingress;
        assert_eq!(ingress.policies, vec![1, 2]);
        assert!(allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 80));
        assert!(allowed(&state, "10.0.0.4", "10.0.0.1", TCP, 9090));
        assert!(!allowed(&state, "10.0.0.4", "10.0.0.1", TCP, 80));
        assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 9090));
        let front_id = state.identities[&ip("10.0.0.2")];
        assert_eq!(
            ingress.lookup(front_id, TCP, 80),
            Some(RuleRef { policy: 1, rule: 0 })
        );
        let denied = explain(&state, ip("10.0.0.3"), ip("10.0.0.1"), TCP, 80);
        assert_eq!(
            denied.ingress,
            Some(Verdict::Denied {
                isolating: vec!["a/front".into(), "a/other".into()]
            })
        );
    }

    fn allowed_from(peers: Vec<Peer>, sources: &[&str]) -> Vec<bool> {
        let p = policy(
            "a",
            "p",
            sel(&[("app", "target")]),
            Some(vec![PolicyRule {
                peers: Peers::Some(peers),
                ports: Ports::All,
            }]),
            None,
        );
        let c = cluster(
            vec![
                pod("a", "target", "10.0.0.1", &[("app", "target")]),
                pod("a", "x", "10.0.1.1", &[("app", "x")]),
                pod("a", "y", "10.0.1.2", &[("app", "y")]),
                pod("b", "x", "10.0.2.1", &[("app", "x")]),
                pod("b", "y", "10.0.2.2", &[("app", "y")]),
                pod("c", "x", "10.0.3.1", &[("app", "x")]),
            ],
            vec![namespace("a", &[]), namespace("b", &[("team", "b")])],
            vec![p],
        );
        let state = compile(&c, &[local("10.0.0.1", "a", "target")]);
        sources
            .iter()
            .map(|s| allowed(&state, s, "10.0.0.1", TCP, 80))
            .collect()
    }

    const SOURCES: [&str; 5] = ["10.0.1.1", "10.0.1.2", "10.0.2.1", "10.0.2.2", "10.0.3.1"];

    #[test]
    fn empty_peers_or_ports_allow_nothing() {
        let p = policy(
            "a",
            "p",
            sel(&[]),
            Some(vec![rule(vec![pods_peer(&[])], vec![])]),
            Some(vec![rule(vec![], vec![port(Protocol::Tcp, 80)])]),
        );
        let state = compile(
            &example_cluster(vec![p]),
            &[local("10.0.0.1", "a", "backend")],
        );
        let ep = &state.endpoints[&ip("10.0.0.1")];
        assert!(ep.ingress.allow.is_empty() && ep.egress.allow.is_empty());
        assert!(ep.ingress.isolated && ep.egress.isolated);
    }

    #[test]
    fn pod_selectors_stay_in_the_policy_namespace_unless_a_namespace_selector_says() {
        // a/x, a/y, b/x, b/y, c/x
        assert_eq!(
            allowed_from(vec![pods_peer(&[("app", "x")])], &SOURCES),
            [true, false, false, false, false]
        );
        assert_eq!(
            allowed_from(vec![ns_peer(&[("team", "b")], &[])], &SOURCES),
            [false, false, true, true, false]
        );
        assert_eq!(
            allowed_from(vec![ns_peer(&[], &[("app", "x")])], &SOURCES),
            [true, false, true, false, true]
        );
        // The name label, also for a namespace the source has no object of.
        assert_eq!(
            allowed_from(vec![ns_peer(&[(NAMESPACE_NAME_LABEL, "c")], &[])], &SOURCES),
            [false, false, false, false, true]
        );
        assert_eq!(
            allowed_from(vec![ns_peer(&[(NAMESPACE_NAME_LABEL, "b")], &[])], &SOURCES),
            [false, false, true, true, false]
        );
    }

    #[test]
    fn one_peer_ands_its_selectors_and_two_peers_or() {
        assert_eq!(
            allowed_from(vec![ns_peer(&[("team", "b")], &[("app", "x")])], &SOURCES),
            [false, false, true, false, false]
        );
        assert_eq!(
            allowed_from(
                vec![ns_peer(&[("team", "b")], &[]), pods_peer(&[("app", "x")])],
                &SOURCES
            ),
            [true, false, true, true, false]
        );
        // External addresses are no pods.
        assert_eq!(allowed_from(vec![ns_peer(&[], &[])], &["1.1.1.1"]), [false]);
    }

    #[test]
    fn match_expressions_select_peers() {
        let expr = |key: &str, operator, values: &[&str]| Peer::Pods {
            namespaces: NamespaceScope::Selected(LabelSelector::default()),
            pods: LabelSelector {
                match_labels: Labels::new(),
                expressions: vec![Requirement {
                    key: key.into(),
                    operator,
                    values: values.iter().map(|v| v.to_string()).collect(),
                }],
            },
        };
        assert_eq!(
            allowed_from(vec![expr("app", Operator::In, &["y"])], &SOURCES),
            [false, true, false, true, false]
        );
        assert_eq!(
            allowed_from(vec![expr("app", Operator::NotIn, &["y"])], &SOURCES),
            [true, false, true, false, true]
        );
        assert_eq!(
            allowed_from(vec![expr("tier", Operator::DoesNotExist, &[])], &SOURCES),
            [true; 5]
        );
        let by_ns = Peer::Pods {
            namespaces: NamespaceScope::Selected(LabelSelector {
                match_labels: Labels::new(),
                expressions: vec![Requirement {
                    key: "team".into(),
                    operator: Operator::Exists,
                    values: Default::default(),
                }],
            }),
            pods: LabelSelector::default(),
        };
        assert_eq!(
            allowed_from(vec![by_ns], &SOURCES),
            [false, false, true, true, false]
        );
    }

    #[test]
    fn ip_blocks_allow_the_cidr_minus_its_excepts() {
        let block = |cidr: &str, except: &[&str]| Peer::IpBlock {
            cidr: net(cidr),
            except: except.iter().map(|e| net(e)).collect(),
        };
        let p = policy(
            "a",
            "p",
            sel(&[("app", "backend")]),
            None,
            Some(vec![
                // Host bits are ignored, as the API server does.
                rule(
                    vec![block("10.1.0.7/16", &["10.1.2.0/24"])],
                    vec![port(Protocol::Tcp, 443)],
                ),
                rule(
                    vec![block("10.1.2.128/25", &[])],
                    vec![port(Protocol::Tcp, 80)],
                ),
            ]),
        );
        let c = example_cluster(vec![p]);
        let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
        let egress = &state.endpoints[&ip("10.0.0.1")].egress;
        assert_eq!(egress.cidrs.len(), 3);
        assert!(egress.cidrs.values().all(|n| *n >= CIDR_IDENTITY_BASE));
        let e = explain(&state, ip("10.0.0.1"), ip("10.1.3.5"), TCP, 443);
        assert_eq!(
            e.egress,
            Some(Verdict::Allowed {
                by: RuleRef { policy: 1, rule: 0 },
                policy: "a/p".into()
            })
        );
        assert!(!allowed(&state, "10.0.0.1", "10.1.3.5", TCP, 80));
        assert!(!allowed(&state, "10.0.0.1", "10.1.2.5", TCP, 443)); // in the except
        assert!(!allowed(&state, "10.0.0.1", "10.1.2.200", TCP, 443));
        assert!(allowed(&state, "10.0.0.1", "10.1.2.200", TCP, 80)); // the /25
        assert!(!allowed(&state, "10.0.0.1", "10.1.2.5", TCP, 80));
        assert!(!allowed(&state, "10.0.0.1", "10.2.0.1", TCP, 443)); // outside
        assert!(!allowed(&state, "10.0.0.1", "10.0.0.2", TCP, 443));
    }

    #[test]
    fn ingress_named_ports_resolve_against_the_endpoint() {
        let p = policy(
            "a",
            "p",
            sel(&[("app", "backend")]),
            Some(vec![rule(
                vec![pods_peer(&[("app", "frontend")])],
                vec![named(Protocol::Tcp, "http"), named(Protocol::Tcp, "nope")],
            )]),
            None,
        );
        let mut c = example_cluster(vec![p]);
        let backend = with_port(
            pod("a", "backend", "10.0.0.1", &[("app", "backend")]),
            "http",
            Protocol::Tcp,
            8080,
        );
        let backend = with_port(backend, "dns", Protocol::Udp, 53);
        c.pods.insert(backend.key.clone(), Arc::new(backend));
        let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
        let ingress = &state.endpoints[&ip("10.0.0.1")].ingress;
        let front = state.identities[&ip("10.0.0.2")];
        let keys: Vec<AllowKey> = ingress.allow.keys().copied().collect();
        assert_eq!(
            keys,
            [AllowKey {
                identity: front,
                protocol: Some(TCP),
                ports: Some(PortPrefix {
                    port: 8080,
                    len: 16
                }),
            }]
        );
        assert!(allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 8080));
        assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", UDP, 8080));
    }

    #[test]
    fn egress_named_ports_resolve_per_destination() {
        let db = |name: &str, addr: &str, number: u16| {
            with_port(
                pod("a", name, addr, &[("app", "db")]),
                "sql",
                Protocol::Tcp,
                number,
            )
        };
        let p = policy(
            "a",
            "p",
            sel(&[("app", "backend")]),
            None,
            Some(vec![
                rule(
                    vec![pods_peer(&[("app", "db")])],
                    vec![named(Protocol::Tcp, "sql")],
                ),
                PolicyRule {
                    peers: Peers::All,
                    ports: Ports::Some(vec![named(Protocol::Tcp, "sql")]),
                },
                rule(
                    vec![Peer::IpBlock {
                        cidr: net("192.168.0.0/16"),
                        except: vec![],
                    }],
                    vec![named(Protocol::Tcp, "sql")],
                ),
            ]),
        );
        let mut c = example_cluster(vec![p]);
        for d in [db("db1", "10.0.5.1", 5432), db("db2", "10.0.5.2", 5433)] {
            c.pods.insert(d.key.clone(), Arc::new(d));
        }
        let other = with_port(
            pod("b", "db3", "10.0.6.1", &[("app", "x")]),
            "sql",
            Protocol::Tcp,
            3306,
        );
        c.pods.insert(other.key.clone(), Arc::new(other));
        let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
        let (id1, id2) = (
            state.identities[&ip("10.0.5.1")],
            state.identities[&ip("10.0.5.2")],
        );
        assert_ne!(id1, id2, "named ports are part of the identity");
        assert_eq!(state.identity_info[&id1], state.identity_info[&id2]);
        let egress = &state.endpoints[&ip("10.0.0.1")].egress;
        assert_eq!(
            egress.lookup(id1, TCP, 5432),
            Some(RuleRef { policy: 1, rule: 0 })
        );
        assert_eq!(egress.lookup(id1, TCP, 5433), None);
        assert_eq!(
            egress.lookup(id2, TCP, 5433),
            Some(RuleRef { policy: 1, rule: 0 })
        );
        // `to: []` with a named port: each pod that has the name, not ANY.
        assert!(allowed(&state, "10.0.0.1", "10.0.6.1", TCP, 3306));
        assert!(!allowed(&state, "10.0.0.1", "10.0.6.1", TCP, 5432));
        assert!(egress.allow.keys().all(|k| k.identity != ANY_IDENTITY));
        // An ipBlock has no named ports.
        assert!(!allowed(&state, "10.0.0.1", "192.168.1.1", TCP, 5432));
        assert!(state.problems.iter().any(|p| p.contains("named port")));
    }

    #[test]
    fn end_port_ranges_are_covered_exactly() {
        let range = PolicyPort {
            protocol: Protocol::Tcp,
            port: Some(PortRef::Number(32000)),
            end_port: Some(32768),
        };
        let entries = numeric_entries(&Ports::Some(vec![range]));
        let prefixes: Vec<PortPrefix> = entries.iter().filter_map(|(_, p)| *p).collect();
        assert_eq!(prefixes.len(), entries.len());
        for p in 31990..32780u16 {
            let hits = prefixes.iter().filter(|pp| pp.contains(p)).count();
            assert_eq!(hits, usize::from((32000..=32768).contains(&p)), "port {p}");
        }
        assert_eq!(port_prefixes(80, 80), [PortPrefix { port: 80, len: 16 }]);
        assert_eq!(port_prefixes(0, 65535).len(), 16);
        assert!(!port_prefixes(0, 65535).iter().any(|pp| pp.contains(0)));
        assert_eq!(
            port_prefixes(1024, 2047),
            [PortPrefix { port: 1024, len: 6 }]
        );
        let p = policy(
            "a",
            "p",
            sel(&[]),
            Some(vec![any_peer(vec![PolicyPort {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Number(32000)),
                end_port: Some(32768),
            }])]),
            None,
        );
        let state = compile(
            &example_cluster(vec![p]),
            &[local("10.0.0.1", "a", "backend")],
        );
        assert!(allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 32768));
        assert!(!allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 32769));
    }

    #[test]
    fn a_policy_with_an_error_isolates_and_allows_nothing() {
        let mut broken = policy(
            "a",
            "broken",
            sel(&[("app", "backend")]),
            Some(vec![rule(vec![], vec![])]),
            Some(vec![]),
        );
        broken.error = Some("unsupported field".into());
        let open = policy(
            "a",
            "open",
            sel(&[]),
            Some(vec![PolicyRule {
                peers: Peers::Some(vec![pods_peer(&[("app", "frontend")])]),
                ports: Ports::All,
            }]),
            None,
        );
        let c = example_cluster(vec![broken, open]);
        let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
        assert_eq!(
            state.policies[&1].error.as_deref(),
            Some("unsupported field")
        );
        assert_eq!(state.policies[&1].selects, vec![ip("10.0.0.1")]);
        assert!(state.problems.iter().any(|p| p.contains("a/broken")));
        let ep = &state.endpoints[&ip("10.0.0.1")];
        assert!(ep.ingress.isolated && ep.egress.isolated);
        assert!(ep.egress.allow.is_empty());
        assert!(!allowed(&state, "10.0.0.1", "10.0.0.2", TCP, 80));
        assert!(!allowed(&state, "10.0.0.4", "10.0.0.1", TCP, 80));
        // Still the union: the other policy's rules hold.
        assert_eq!(ep.ingress.policies, vec![1, 2]);
        assert!(allowed(&state, "10.0.0.2", "10.0.0.1", TCP, 80));
    }

    #[test]
    fn an_unknown_pod_fails_closed_where_policies_may_select_it() {
        let p = policy("a", "deny", sel(&[("app", "nothing")]), Some(vec![]), None);
        let c = example_cluster(vec![p]);
        let locals = [
            local("10.0.0.9", "a", "gone"),
            local("10.0.0.10", "b", "gone"),
            LocalEndpoint {
                ip: ip("10.0.0.11"),
                pod: None,
            },
            // Found by address when the runtime gave no name.
            LocalEndpoint {
                ip: ip("10.0.0.2"),
                pod: None,
            },
        ];
        let state = compile(&c, &locals);
        let e = explain(&state, ip("10.0.0.9"), ip("10.0.0.2"), TCP, 80);
        assert_eq!(e.egress, Some(Verdict::DeniedFailClosed));
        assert!(!allowed(&state, "10.0.0.2", "10.0.0.9", TCP, 80));
        assert!(!allowed(&state, "10.0.0.9", "10.0.0.9", TCP, 80));
        assert!(state.problems.iter().any(|p| p.contains("a/gone")));
        // Not a pod (no name, no Pod with its address): nothing selects it.
        let unnamed = &state.endpoints[&ip("10.0.0.11")];
        assert!(!unnamed.ingress.isolated && !unnamed.egress.isolated);
        let b = &state.endpoints[&ip("10.0.0.10")];
        assert!(!b.ingress.isolated && !b.egress.isolated);
        assert_eq!(b.identity, None);
        let found = &state.endpoints[&ip("10.0.0.2")];
        assert_eq!(found.pod, Some(("a".into(), "frontend".into())));
        assert!(!found.ingress.isolated);
        assert_eq!(found.identity, Some(state.identities[&ip("10.0.0.2")]));
        // No policy anywhere: nothing to fail closed for.
        let state = compile(&example_cluster(vec![]), &locals);
        assert!(!state.endpoints[&ip("10.0.0.11")].ingress.isolated);
        assert!(state.problems.is_empty());
    }

    #[test]
    fn identity_numbers_survive_a_recompile() {
        let mut c = example_cluster(vec![]);
        // Same namespace and labels: the same identity.
        let twin = pod("a", "frontend-2", "10.0.0.5", &[("app", "frontend")]);
        c.pods.insert(twin.key.clone(), Arc::new(twin));
        let locals = [local("10.0.0.1", "a", "backend")];
        let mut compiler = PolicyCompiler::new();
        let first = compiler.compile(&c, &locals);
        assert_eq!(
            first.identities[&ip("10.0.0.2")],
            first.identities[&ip("10.0.0.5")]
        );
        assert_eq!(first.identity_info.len(), 4);
        assert!(
            first
                .identity_info
                .keys()
                .all(|n| (1..CIDR_IDENTITY_BASE).contains(n))
        );
        let new = pod("a", "aaa-new", "10.0.0.6", &[("app", "new")]);
        c.pods.insert(new.key.clone(), Arc::new(new));
        let second = compiler.compile(&c, &locals);
        for (addr, id) in &first.identities {
            assert_eq!(second.identities[addr], *id, "{addr}");
        }
        let new_id = second.identities[&ip("10.0.0.6")];
        assert!(!first.identity_info.contains_key(&new_id));
        assert_eq!(second.identities.len(), 6);
        // Unused keys are dropped.
        c.pods.remove(&("a".to_string(), "aaa-new".to_string()));
        let third = compiler.compile(&c, &locals);
        assert!(!third.identity_info.contains_key(&new_id));
        assert!(!compiler.numbers.values().any(|n| *n == new_id));
        assert_eq!(third, first);
    }

    #[test]
    fn a_restarted_compiler_numbers_pods_as_the_maps_did() {
        let c = example_cluster(vec![]);
        let locals = [local("10.0.0.1", "a", "backend")];
        let first = PolicyCompiler::new().compile(&c, &locals);
        // Numbers an earlier agent chose, not the ones a fresh one picks.
        let shifted: Vec<(Ipv4Addr, u32)> = first
            .identities
            .iter()
            .map(|(addr, n)| (*addr, n + 100))
            .collect();
        let adopted = PolicyCompiler::adopt(shifted.clone()).compile(&c, &locals);
        let numbers: Vec<(Ipv4Addr, u32)> = adopted.identities.into_iter().collect();
        assert_eq!(numbers, shifted);
        // A number two label sets claimed (stale map) goes to one of them.
        let clash: Vec<(Ipv4Addr, u32)> = first.identities.keys().map(|a| (*a, 7)).collect();
        let fresh = PolicyCompiler::adopt(clash).compile(&c, &locals);
        let distinct: BTreeSet<u32> = fresh.identities.values().copied().collect();
        assert_eq!(distinct.len(), first.identity_info.len());
    }

    #[test]
    fn policy_numbers_stay_when_others_come_and_go() {
        let deny = |name: &str| policy("a", name, sel(&[("app", "backend")]), Some(vec![]), None);
        let locals = [local("10.0.0.1", "a", "backend")];
        let mut compiler = PolicyCompiler::new();
        let first = compiler.compile(&example_cluster(vec![deny("m")]), &locals);
        assert_eq!(first.policies[&1].name, "a/m");
        // "a/b" sorts first, but "a/m" keeps its number.
        let second = compiler.compile(&example_cluster(vec![deny("b"), deny("m")]), &locals);
        assert_eq!(second.policies[&1].name, "a/m");
        assert_eq!(second.policies[&2].name, "a/b");
        // A policy selecting no pod of this node is numbered, not compiled.
        let elsewhere = policy("a", "z", sel(&[("app", "nobody")]), Some(vec![]), None);
        let third = compiler.compile(&example_cluster(vec![deny("m"), elsewhere]), &locals);
        assert_eq!(third.policies[&1].name, "a/m");
        assert_eq!(third.policies[&3].name, "a/z");
        assert!(third.policies[&3].selects.is_empty());
    }

    #[test]
    fn ip_block_numbers_keep_their_prefix_when_blocks_come_and_go() {
        use crate::model::{Peer, Peers, PolicyRule, Ports};
        let block = |cidr: &str, except: &[&str]| Peer::IpBlock {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        };
        let with = |peers: Vec<Peer>| {
            let rule = PolicyRule {
                peers: Peers::Some(peers),
                ports: Ports::All,
            };
            example_cluster(vec![policy(
                "a",
                "blocks",
                sel(&[("app", "backend")]),
                Some(vec![rule]),
                None,
            )])
        };
        let locals = [local("10.0.0.1", "a", "backend")];
        let mut compiler = PolicyCompiler::new();
        let first = compiler.compile(&with(vec![block("10.0.0.0/8", &["10.1.0.0/16"])]), &locals);
        let second = compiler.compile(
            &with(vec![
                block("9.0.0.0/8", &[]),
                block("10.0.0.0/8", &["10.1.0.0/16"]),
            ]),
            &locals,
        );
        let (old, new) = (
            &first.endpoints[&ip("10.0.0.1")].ingress,
            &second.endpoints[&ip("10.0.0.1")].ingress,
        );
        for prefix in ["10.0.0.0/8", "10.1.0.0/16"] {
            let prefix: Ipv4Network = prefix.parse().unwrap();
            assert_eq!(old.cidrs[&prefix], new.cidrs[&prefix], "{prefix}");
        }
        let nine = new.cidrs[&"9.0.0.0/8".parse::<Ipv4Network>().unwrap()];
        assert!(
            !old.cidrs.values().any(|n| *n == nine),
            "a new prefix gets a new number"
        );
        // Still exact: allowed inside, denied in the except and outside.
        assert!(allowed(&second, "9.9.9.9", "10.0.0.1", TCP, 80));
        assert!(allowed(&second, "10.2.0.1", "10.0.0.1", TCP, 80));
        assert!(!allowed(&second, "10.1.0.1", "10.0.0.1", TCP, 80));
        assert!(!allowed(&second, "11.0.0.1", "10.0.0.1", TCP, 80));
    }

    #[test]
    fn finished_pods_and_contested_addresses_have_no_identity() {
        let mut c = example_cluster(vec![]);
        // A finished Job pod still shows the address the frontend now has.
        let mut done = pod("a", "job", "10.0.0.2", &[("app", "job")]);
        done.finished = true;
        c.pods.insert(done.key.clone(), Arc::new(done));
        // A stale object claims the database's address with other labels.
        let stale = pod("b", "stale", "10.0.0.3", &[("app", "stale")]);
        c.pods.insert(stale.key.clone(), Arc::new(stale));
        let state = compile(&c, &[local("10.0.0.1", "a", "backend")]);
        let frontend = state.identities[&ip("10.0.0.2")];
        assert_eq!(state.identity_info[&frontend].labels["app"], "frontend");
        assert!(!state.identities.contains_key(&ip("10.0.0.3")));
        assert!(state.problems.iter().any(|p| p.contains("10.0.0.3")));
    }

    #[test]
    fn host_network_pods_have_no_identity() {
        let mut host = pod("a", "host", "192.168.0.10", &[("app", "frontend")]);
        host.host_network = true;
        let mut c = example_cluster(vec![]);
        c.pods.insert(host.key.clone(), Arc::new(host));
        let state = compile(&c, &[]);
        assert!(!state.identities.contains_key(&ip("192.168.0.10")));
        assert_eq!(state.identities.len(), 4);
    }
}
