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

mod explain;
mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

pub use explain::{Explanation, Verdict, decide, explain};
pub use state::*;

use crate::model::{
    Cluster, Labels, NamedPort, NamespaceScope, NetworkPolicy, Peer, Peers, Pod, PolicyRule,
    PortRef, Ports,
};

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
        let Some((ns, name)) = &local.named else {
            return out;
        };
        if self
            .cluster
            .network_policies
            .keys()
            .any(|(pns, _)| pns == ns)
        {
            for dir in [&mut out.ingress, &mut out.egress] {
                dir.isolated = true;
                dir.deny_all = true;
            }
            problems.push(format!(
                "endpoint {} ({ns}/{name}): pod not known while NetworkPolicies may select it; \
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
