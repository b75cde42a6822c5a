//! The policy maps (IDENTITIES, POLICY_ENDPOINTS, POLICY, POLICY_CIDR),
//! brought to a compiled `PolicyState` by an ordered diff that never
//! leaves a pod less isolated than both the old and the new state allow:
//!
//! 1. a pod that gains isolation (or a fail-closed deny) gets it first,
//!    with the union of its old and new flags;
//! 2. allow entries that go are removed, identities updated;
//! 3. new ipBlock prefixes, then new allow entries are added (a failure
//!    makes that direction of the pod deny everything: fail closed);
//! 4. each changed pod gets its final flags and a new revision, so its
//!    established connections are judged again at their next packet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, MapError};
use tern_common::{
    POLICY_CIDR_PREFIX_BASE, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, PolicyCidrKey,
    PolicyEndpoint, PolicyKey, PolicyRuleRef, maps, policy_direction, policy_flags,
};

use super::maps::{ip_from_key, ip_to_key, take};
use crate::compiler::policy::{AllowKey, Direction, DirectionPolicy, PolicyState};

pub struct PolicyMaps {
    pub identities: HashMap<MapData, u32, u32>,
    pub endpoints: HashMap<MapData, u32, PolicyEndpoint>,
    pub allow: LpmTrie<MapData, PolicyKey, PolicyRuleRef>,
    pub cidrs: LpmTrie<MapData, PolicyCidrKey, u32>,
}

impl PolicyMaps {
    /// Takes the policy maps out of the loaded object: the policy
    /// pipeline is their one writer.
    pub fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        Ok(PolicyMaps {
            identities: take(ebpf, maps::IDENTITIES)?,
            endpoints: take(ebpf, maps::POLICY_ENDPOINTS)?,
            allow: take(ebpf, maps::POLICY)?,
            cidrs: take(ebpf, maps::POLICY_CIDR)?,
        })
    }
}

/// An allow entry as the trie holds it: key data and prefix length.
type AllowEntry = (PolicyKey, u32);
type CidrEntry = (PolicyCidrKey, u32);

/// What the maps hold, as the last sync left them.
#[derive(Debug, Default)]
pub struct PolicySync {
    /// The last revision given out. Revisions only ever grow on a node:
    /// a pod that takes over a gone pod's address must not match the
    /// tracked connections (POLICY_CT) the old one left behind.
    revision: u32,
    identities: BTreeMap<u32, u32>,
    endpoints: BTreeMap<u32, PolicyEndpoint>,
    allow: BTreeMap<AllowEntry, PolicyRuleRef>,
    cidrs: BTreeMap<CidrEntry, u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySyncStats {
    pub writes: usize,
    pub deletes: usize,
    /// Pods (and direction) left denying everything because an entry
    /// could not be written.
    pub failed: Vec<(Ipv4Addr, Direction, String)>,
}

/// One local pod's wanted map content.
#[derive(Default)]
struct Wanted {
    flags: u32,
    /// The first isolating policy per direction (denials are counted
    /// against it).
    ingress_policy: u32,
    egress_policy: u32,
    allow: BTreeMap<AllowEntry, PolicyRuleRef>,
    cidrs: BTreeMap<CidrEntry, u32>,
}

impl PolicySync {
    /// Reads back what the pinned maps hold (after a restart).
    pub fn adopt(maps: &PolicyMaps) -> anyhow::Result<Self> {
        let mut sync = PolicySync::default();
        for entry in maps.identities.iter() {
            let (ip, identity) = entry?;
            sync.identities.insert(ip, identity);
        }
        for entry in maps.endpoints.iter() {
            let (ip, endpoint) = entry?;
            sync.revision = sync.revision.max(endpoint.revision);
            sync.endpoints.insert(ip, endpoint);
        }
        for entry in maps.allow.iter() {
            let (key, rule) = entry?;
            sync.allow.insert((key.data(), key.prefix_len()), rule);
        }
        for entry in maps.cidrs.iter() {
            let (key, number) = entry?;
            sync.cidrs.insert((key.data(), key.prefix_len()), number);
        }
        Ok(sync)
    }

    /// The identity numbers the maps hold, by pod address.
    pub fn identities(&self) -> impl Iterator<Item = (Ipv4Addr, u32)> + '_ {
        self.identities.iter().map(|(ip, n)| (ip_from_key(*ip), *n))
    }

    pub fn entries(&self) -> usize {
        self.allow.len() + self.cidrs.len()
    }

    /// Brings the maps to `state` in the order the module explains.
    pub fn sync(&mut self, maps: &mut PolicyMaps, state: &PolicyState) -> PolicySyncStats {
        let mut stats = PolicySyncStats::default();
        let wanted: BTreeMap<u32, Wanted> = state
            .endpoints
            .iter()
            .map(|(ip, endpoint)| {
                let key = ip_to_key(*ip);
                let mut w = Wanted::default();
                for (direction, policy) in [
                    (Direction::Ingress, &endpoint.ingress),
                    (Direction::Egress, &endpoint.egress),
                ] {
                    w.flags |= flags(direction, policy);
                    let first = policy.policies.first().copied().unwrap_or(0);
                    match direction {
                        Direction::Ingress => w.ingress_policy = first,
                        Direction::Egress => w.egress_policy = first,
                    }
                    add_entries(&mut w, key, direction, policy);
                }
                (key, w)
            })
            .collect();
        let identities: BTreeMap<u32, u32> = state
            .identities
            .iter()
            .map(|(ip, id)| (ip_to_key(*ip), *id))
            .collect();
        // A peer whose identity changed or went may have been allowed by
        // what it was: connections are judged again. A new address only
        // adds what may be allowed.
        let identities_changed = self
            .identities
            .iter()
            .any(|(ip, id)| identities.get(ip) != Some(id));
        let changed_pods = changed_endpoints(self, &wanted);

        // 1. More isolation first.
        for (key, w) in &wanted {
            let old = self.endpoints.get(key).copied().unwrap_or_default();
            let union = old.flags | w.flags;
            if union != old.flags {
                // The policies that isolate it now are the ones a denial in
                // the meantime is counted against and named by.
                let tightened = PolicyEndpoint {
                    revision: self.next_revision(),
                    flags: union,
                    ingress_policy: first_of(w.ingress_policy, old.ingress_policy),
                    egress_policy: first_of(w.egress_policy, old.egress_policy),
                };
                self.write_endpoint(maps, *key, tightened, &mut stats);
            }
        }
        // 2. Entries that go, identities that change or go.
        let allow_wanted: BTreeMap<AllowEntry, PolicyRuleRef> =
            wanted.values().flat_map(|w| w.allow.clone()).collect();
        let cidrs_wanted: BTreeMap<CidrEntry, u32> =
            wanted.values().flat_map(|w| w.cidrs.clone()).collect();
        remove_gone(&mut self.allow, &allow_wanted, &mut stats, |k| {
            maps.allow.remove(&Key::new(k.1, k.0))
        });
        remove_gone(&mut self.cidrs, &cidrs_wanted, &mut stats, |k| {
            maps.cidrs.remove(&Key::new(k.1, k.0))
        });
        remove_gone(&mut self.identities, &identities, &mut stats, |ip| {
            maps.identities.remove(ip)
        });
        // 3. New identities, then prefixes before the entries that allow
        // them: a new except must be in place before the ports its block
        // gains.
        for (ip, e) in write_changed(&mut self.identities, &identities, &mut stats, |ip, id| {
            maps.identities.insert(ip, id, 0)
        }) {
            // An unknown peer matches only "any peer" and ipBlock rules:
            // fewer connections are allowed, none more.
            tracing::warn!(ip = %ip_from_key(ip), "policy: cannot add an identity: {e}");
        }
        let mut failed: BTreeSet<(u32, u8)> = BTreeSet::new();
        let cidr_failures = write_changed(&mut self.cidrs, &cidrs_wanted, &mut stats, |k, n| {
            maps.cidrs.insert(&Key::new(k.1, k.0), n, 0)
        })
        .into_iter()
        .map(|(k, e)| (k.0.endpoint, k.0.direction, format!("POLICY_CIDR: {e}")));
        let allow_failures = write_changed(&mut self.allow, &allow_wanted, &mut stats, |k, r| {
            maps.allow.insert(&Key::new(k.1, k.0), r, 0)
        })
        .into_iter()
        .map(|(k, e)| (k.0.endpoint, k.0.direction, format!("POLICY: {e}")));
        for (endpoint, direction, error) in cidr_failures.chain(allow_failures) {
            if failed.insert((endpoint, direction)) {
                stats
                    .failed
                    .push((ip_from_key(endpoint), direction_of(direction), error));
            }
        }
        // 4. Final flags, new revisions; pods that are gone.
        for (key, w) in &wanted {
            let old = self.endpoints.get(key).copied().unwrap_or_default();
            let mut flags = w.flags;
            for (direction, deny_all) in [
                (policy_direction::INGRESS, policy_flags::INGRESS_DENY_ALL),
                (policy_direction::EGRESS, policy_flags::EGRESS_DENY_ALL),
            ] {
                if failed.contains(&(*key, direction)) {
                    flags |= deny_all;
                }
            }
            let entries_changed = changed_pods.contains(key) || identities_changed;
            let counted = (w.ingress_policy, w.egress_policy);
            if flags == old.flags
                && counted == (old.ingress_policy, old.egress_policy)
                && !entries_changed
                && self.endpoints.contains_key(key)
            {
                continue;
            }
            let endpoint = PolicyEndpoint {
                revision: self.next_revision(),
                flags,
                ingress_policy: w.ingress_policy,
                egress_policy: w.egress_policy,
            };
            self.write_endpoint(maps, *key, endpoint, &mut stats);
        }
        let gone: Vec<u32> = self
            .endpoints
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            match maps.endpoints.remove(&key) {
                Ok(()) => stats.deletes += 1,
                Err(e) => tracing::warn!("policy: cannot remove a pod's policy state: {e}"),
            }
            self.endpoints.remove(&key);
        }
        stats
    }

    fn next_revision(&mut self) -> u32 {
        // 4 billion changes on one node before it wraps.
        self.revision = self.revision.wrapping_add(1).max(1);
        self.revision
    }

    fn write_endpoint(
        &mut self,
        maps: &mut PolicyMaps,
        key: u32,
        endpoint: PolicyEndpoint,
        stats: &mut PolicySyncStats,
    ) {
        match maps.endpoints.insert(key, endpoint, 0) {
            Ok(()) => {
                stats.writes += 1;
                self.endpoints.insert(key, endpoint);
            }
            Err(e) => {
                // Without its entry the pod is not isolated at all: the
                // one write that must not fail. Said loudly.
                tracing::error!(ip = %ip_from_key(key), "policy: cannot write POLICY_ENDPOINTS: {e}");
                for direction in [Direction::Ingress, Direction::Egress] {
                    stats.failed.push((
                        ip_from_key(key),
                        direction,
                        format!("POLICY_ENDPOINTS: {e}"),
                    ));
                }
            }
        }
    }
}

/// Removes (through `remove`) what `installed` holds and `wanted` does not.
fn remove_gone<K: Ord + Copy, V>(
    installed: &mut BTreeMap<K, V>,
    wanted: &BTreeMap<K, V>,
    stats: &mut PolicySyncStats,
    mut remove: impl FnMut(&K) -> Result<(), MapError>,
) {
    let gone: Vec<K> = installed
        .keys()
        .filter(|k| !wanted.contains_key(k))
        .copied()
        .collect();
    for key in gone {
        match remove(&key) {
            Ok(()) => stats.deletes += 1,
            // A delete fails only for a key the map does not hold.
            Err(e) => tracing::warn!("policy: cannot remove an entry: {e}"),
        }
        installed.remove(&key);
    }
}

/// Writes (through `insert`) what `wanted` holds and `installed` does not
/// hold the same; the keys whose write failed, with why.
fn write_changed<K: Ord + Copy, V: PartialEq + Copy>(
    installed: &mut BTreeMap<K, V>,
    wanted: &BTreeMap<K, V>,
    stats: &mut PolicySyncStats,
    mut insert: impl FnMut(&K, &V) -> Result<(), MapError>,
) -> Vec<(K, MapError)> {
    let mut failed = Vec::new();
    for (key, value) in wanted {
        if installed.get(key) == Some(value) {
            continue;
        }
        match insert(key, value) {
            Ok(()) => {
                stats.writes += 1;
                installed.insert(*key, *value);
            }
            Err(e) => failed.push((*key, e)),
        }
    }
    failed
}

/// The pods whose wanted entries differ from the installed ones.
fn changed_endpoints(installed: &PolicySync, wanted: &BTreeMap<u32, Wanted>) -> BTreeSet<u32> {
    let mut allow: BTreeMap<u32, BTreeMap<AllowEntry, PolicyRuleRef>> = BTreeMap::new();
    for (entry, rule) in &installed.allow {
        allow
            .entry(entry.0.endpoint)
            .or_default()
            .insert(*entry, *rule);
    }
    let mut cidrs: BTreeMap<u32, BTreeMap<CidrEntry, u32>> = BTreeMap::new();
    for (entry, number) in &installed.cidrs {
        cidrs
            .entry(entry.0.endpoint)
            .or_default()
            .insert(*entry, *number);
    }
    let empty_allow = BTreeMap::new();
    let empty_cidrs = BTreeMap::new();
    wanted
        .iter()
        .filter(|(key, w)| {
            allow.get(key).unwrap_or(&empty_allow) != &w.allow
                || cidrs.get(key).unwrap_or(&empty_cidrs) != &w.cidrs
        })
        .map(|(key, _)| *key)
        .collect()
}

fn flags(direction: Direction, policy: &DirectionPolicy) -> u32 {
    let (isolated, deny_all) = match direction {
        Direction::Ingress => (
            policy_flags::INGRESS_ISOLATED,
            policy_flags::INGRESS_DENY_ALL,
        ),
        Direction::Egress => (policy_flags::EGRESS_ISOLATED, policy_flags::EGRESS_DENY_ALL),
    };
    let mut flags = 0;
    if policy.isolated {
        flags |= isolated;
    }
    if policy.deny_all {
        flags |= isolated | deny_all;
    }
    flags
}

fn direction_byte(direction: Direction) -> u8 {
    match direction {
        Direction::Ingress => policy_direction::INGRESS,
        Direction::Egress => policy_direction::EGRESS,
    }
}

fn direction_of(byte: u8) -> Direction {
    if byte == policy_direction::INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    }
}

fn add_entries(w: &mut Wanted, endpoint: u32, direction: Direction, policy: &DirectionPolicy) {
    let direction = direction_byte(direction);
    for (allow, rule) in &policy.allow {
        w.allow.insert(
            allow_entry(endpoint, direction, allow),
            PolicyRuleRef {
                policy: rule.policy,
                rule: rule.rule,
            },
        );
    }
    for (cidr, number) in &policy.cidrs {
        let key = PolicyCidrKey {
            endpoint,
            direction,
            pad: [0; 3],
            addr: ip_to_key(cidr.network()),
        };
        w.cidrs.insert(
            (key, POLICY_CIDR_PREFIX_BASE + cidr.prefix() as u32),
            *number,
        );
    }
}

/// The trie entry of one allow key: `AllowKey`'s wildcards become prefix
/// lengths.
pub fn allow_entry(endpoint: u32, direction: u8, allow: &AllowKey) -> AllowEntry {
    let (proto, port, prefix) = match (allow.protocol, allow.ports) {
        (None, _) => (0, 0, POLICY_PREFIX_ANY_PROTO),
        (Some(proto), None) => (proto, 0, POLICY_PREFIX_ANY_PORT),
        (Some(proto), Some(ports)) => {
            (proto, ports.port, POLICY_PREFIX_ANY_PORT + ports.len as u32)
        }
    };
    let key = PolicyKey {
        endpoint,
        identity: allow.identity.to_be_bytes(),
        direction,
        proto,
        port: port.to_be_bytes(),
    };
    (key, prefix)
}

/// The policy a direction's denials are counted against while a sync
/// tightens isolation: the new state's, or the old one if it has none.
fn first_of(wanted: u32, old: u32) -> u32 {
    if wanted != 0 { wanted } else { old }
}
