//! The kept compiler: compilation after compilation, it compiles again only
//! the Services whose own inputs changed — the Service, its slices, its
//! namespace — found by diffing the cluster's persistent maps against the
//! last ones (the diff skips the subtrees they share, so one endpoint change
//! among 100 000 Services costs a few map lookups, not a walk of them all),
//! and resolves again only the frontends those Services claim.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use imbl::ordmap::DiffItem;

use super::{
    Conflict, Frontend, FrontendEntry, LbState, NodeContext, Topology, host_port_frontends,
    service_frontends,
};
use crate::model::{
    Cluster, EndpointSlice, HostPort, LbAlgorithm, Map, Namespace, Service, ServiceKey, SliceKey,
};

/// A Service's frontends, boxed: no spare capacity kept per Service.
type Frontends = Box<[(Frontend, Arc<FrontendEntry>)]>;

/// Compiles cluster after cluster; see the module's comment.
pub struct LbCompiler {
    ctx: NodeContext,
    /// The inputs of the last compilation (`None` before the first).
    last: Option<Inputs>,
    /// Each Service's slices and frontends as last compiled (also for a
    /// Service not there yet that slices name).
    kept: BTreeMap<ServiceKey, Kept>,
    /// Who claims each frontend: more than one is a conflict.
    claims: BTreeMap<Frontend, Vec<Claim>>,
    /// The frontends the last host ports claimed.
    host_port_frontends: Vec<Frontend>,
    /// The frontends in force: the first claim of each.
    frontends: Map<Frontend, Arc<FrontendEntry>>,
    /// The claims left out, by frontend.
    conflicts: BTreeMap<Frontend, Vec<Conflict>>,
    /// ClusterIPs outside the service CIDR, by Service.
    outside: BTreeMap<ServiceKey, Vec<Ipv4Addr>>,
}

#[derive(Default)]
struct Kept {
    /// Sorted by slice key: the order a Service's slices are compiled in.
    slices: Vec<Arc<EndpointSlice>>,
    frontends: Frontends,
}

struct Inputs {
    services: Map<ServiceKey, Arc<Service>>,
    slices: Map<SliceKey, Arc<EndpointSlice>>,
    namespaces: Map<String, Arc<Namespace>>,
    zone: Option<String>,
    host_ports: Vec<HostPort>,
}

/// One claim on a frontend.
struct Claim {
    rank: Rank,
    by: ClaimBy,
    entry: Arc<FrontendEntry>,
}

/// Who claims: among equal ranks, Services by key, then host ports in the
/// order given.
#[derive(Debug, Clone)]
enum ClaimBy {
    /// The object, not a copy of its key: one claim per frontend.
    Service(Arc<Service>),
    HostPort(usize),
}

impl ClaimBy {
    /// Services (false) before host ports, then by key or index.
    fn order(&self) -> (bool, Option<&ServiceKey>, usize) {
        match self {
            ClaimBy::Service(service) => (false, Some(&service.key), 0),
            ClaimBy::HostPort(i) => (true, None, *i),
        }
    }
}

impl PartialEq for ClaimBy {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for ClaimBy {}

impl PartialOrd for ClaimBy {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ClaimBy {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
}

/// Who keeps a frontend claimed twice: the lowest. Services before
/// hostPorts; dated Services before undated ones, the oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    host_port: bool,
    undated: bool,
    created: i64,
}

const HOST_PORT: Rank = Rank {
    host_port: true,
    undated: true,
    created: 0,
};

impl LbCompiler {
    pub fn new(ctx: NodeContext) -> Self {
        LbCompiler {
            ctx,
            last: None,
            kept: BTreeMap::new(),
            claims: BTreeMap::new(),
            host_port_frontends: Vec::new(),
            frontends: Map::new(),
            conflicts: BTreeMap::new(),
            outside: BTreeMap::new(),
        }
    }

    /// The frontends of every Service of `cluster`, and of this node's
    /// pods' `host_ports`.
    pub fn compile(&mut self, cluster: &Cluster, host_ports: &[HostPort]) -> LbState {
        let zone = cluster
            .nodes
            .get(&self.ctx.node_name)
            .and_then(|node| node.zone.clone());
        let last = self.last.take().unwrap_or_else(|| Inputs {
            services: Map::new(),
            slices: Map::new(),
            namespaces: Map::new(),
            zone: None,
            host_ports: Vec::new(),
        });
        let mut dirty = self.dirty_services(&last, cluster);
        if last.zone != zone {
            // Topology hints are read against this node's zone.
            dirty.extend(self.kept.keys().cloned());
            dirty.extend(cluster.services.keys().cloned());
        }
        let mut touched = BTreeSet::new();
        for key in dirty {
            self.compile_service(key, cluster, zone.as_deref(), &mut touched);
        }
        if last.host_ports != host_ports {
            self.claim_host_ports(host_ports, &mut touched);
        }
        for frontend in touched {
            self.resolve(frontend);
        }
        self.last = Some(Inputs {
            services: cluster.services.clone(),
            slices: cluster.slices.clone(),
            namespaces: cluster.namespaces.clone(),
            zone,
            host_ports: host_ports.to_vec(),
        });
        LbState {
            frontends: self.frontends.clone(),
            conflicts: self.conflicts.values().flatten().cloned().collect(),
            outside_service_cidr: self
                .outside
                .iter()
                .flat_map(|(key, ips)| ips.iter().map(|ip| (key.clone(), *ip)))
                .collect(),
        }
    }

    /// How many Services it holds compiled (tests: removed ones go).
    #[cfg(test)]
    pub fn compiled_services(&self) -> usize {
        self.kept
            .values()
            .filter(|k| !k.frontends.is_empty())
            .count()
    }

    /// The Services whose Service object, slices or namespace differ from
    /// `last`'s; keeps each Service's slices up to date on the way.
    fn dirty_services(&mut self, last: &Inputs, cluster: &Cluster) -> BTreeSet<ServiceKey> {
        let mut dirty = BTreeSet::new();
        for item in last.services.diff(&cluster.services) {
            match item {
                DiffItem::Add(key, _) | DiffItem::Remove(key, _) => dirty.insert(key.clone()),
                DiffItem::Update { new: (key, _), .. } => dirty.insert(key.clone()),
            };
        }
        for item in last.slices.diff(&cluster.slices) {
            let (old, new) = match item {
                DiffItem::Add(_, new) => (None, Some(new)),
                DiffItem::Update { old, new } => (Some(old.1), Some(new.1)),
                DiffItem::Remove(_, old) => (Some(old), None),
            };
            if let Some(old) = old {
                dirty.insert(old.service.clone());
                if let Some(kept) = self.kept.get_mut(&old.service) {
                    kept.slices.retain(|s| s.key != old.key);
                }
            }
            if let Some(new) = new {
                dirty.insert(new.service.clone());
                let slices = &mut self.kept.entry(new.service.clone()).or_default().slices;
                slices.reserve_exact(1);
                let at = slices.partition_point(|s| s.key < new.key);
                slices.insert(at, new.clone());
            }
        }
        // A namespace's default algorithm applies to all its Services
        // (rare: a namespace annotation changed).
        for item in last.namespaces.diff(&cluster.namespaces) {
            let name = match item {
                DiffItem::Add(name, _) | DiffItem::Remove(name, _) => name,
                DiffItem::Update { new: (name, _), .. } => name,
            };
            dirty.extend(
                cluster
                    .services
                    .keys()
                    .filter(|key| *key.namespace == **name)
                    .cloned(),
            );
        }
        dirty
    }

    /// Withdraws the Service's old claims and makes its new ones.
    fn compile_service(
        &mut self,
        key: ServiceKey,
        cluster: &Cluster,
        zone: Option<&str>,
        touched: &mut BTreeSet<Frontend>,
    ) {
        let kept = self.kept.remove(&key).unwrap_or_default();
        for &(frontend, _) in kept.frontends.iter() {
            self.withdraw(frontend, &key);
            touched.insert(frontend);
        }
        self.outside.remove(&key);
        let Some(service) = cluster.services.get(&key) else {
            if !kept.slices.is_empty() {
                self.kept.insert(
                    key,
                    Kept {
                        slices: kept.slices,
                        frontends: Frontends::default(),
                    },
                );
            }
            return;
        };
        let slices: Vec<&EndpointSlice> = kept.slices.iter().map(|s| &**s).collect();
        let namespace_algorithm: Option<LbAlgorithm> = cluster
            .namespaces
            .get(&*key.namespace)
            .and_then(|ns| ns.lb_algorithm);
        let algorithm = service
            .lb_algorithm
            .or(namespace_algorithm)
            .unwrap_or(self.ctx.default_algorithm);
        let topology = Topology {
            node: &self.ctx.node_name,
            zone,
        };
        let frontends: Frontends =
            service_frontends(service, &slices, algorithm, topology, &self.ctx).into_boxed_slice();
        let rank = Rank {
            host_port: false,
            undated: service.created.is_none(),
            created: service.created.unwrap_or_default(),
        };
        for (frontend, entry) in &frontends {
            self.claim(
                *frontend,
                rank,
                ClaimBy::Service(service.clone()),
                entry.clone(),
            );
            touched.insert(*frontend);
        }
        if let Some(cidr) = self.ctx.service_cidr {
            let outside: Vec<Ipv4Addr> = service
                .cluster_ips
                .iter()
                .filter(|ip| !cidr.contains(**ip))
                .copied()
                .collect();
            if !outside.is_empty() {
                self.outside.insert(key.clone(), outside);
            }
        }
        self.kept.insert(
            key,
            Kept {
                slices: kept.slices,
                frontends,
            },
        );
    }

    fn claim_host_ports(&mut self, host_ports: &[HostPort], touched: &mut BTreeSet<Frontend>) {
        for frontend in std::mem::take(&mut self.host_port_frontends) {
            if let Some(claims) = self.claims.get_mut(&frontend) {
                claims.retain(|c| !matches!(c.by, ClaimBy::HostPort(_)));
            }
            touched.insert(frontend);
        }
        for (i, port) in host_ports.iter().enumerate() {
            for (frontend, entry) in host_port_frontends(port, &self.ctx) {
                self.claim(frontend, HOST_PORT, ClaimBy::HostPort(i), entry);
                self.host_port_frontends.push(frontend);
                touched.insert(frontend);
            }
        }
    }

    fn claim(&mut self, frontend: Frontend, rank: Rank, by: ClaimBy, entry: Arc<FrontendEntry>) {
        // Room for one: nearly every frontend has one claim, and a Vec's
        // first push makes room for four (160 B a frontend).
        let claims = self
            .claims
            .entry(frontend)
            .or_insert_with(|| Vec::with_capacity(1));
        // After the claims that sort before or equal to it: a Service that
        // claims one frontend twice keeps its first port's.
        let at = claims.partition_point(|c| (c.rank, &c.by) <= (rank, &by));
        claims.insert(at, Claim { rank, by, entry });
    }

    /// Takes back the claims of Service `key` on `frontend`.
    fn withdraw(&mut self, frontend: Frontend, key: &ServiceKey) {
        if let Some(claims) = self.claims.get_mut(&frontend) {
            claims.retain(|c| c.by.order().1 != Some(key));
        }
    }

    /// The first claim keeps the frontend; the others are conflicts.
    fn resolve(&mut self, frontend: Frontend) {
        let claims = self.claims.get(&frontend).map_or(&[][..], Vec::as_slice);
        match claims.split_first() {
            None => {
                self.claims.remove(&frontend);
                self.frontends.remove(&frontend);
                self.conflicts.remove(&frontend);
            }
            Some((owner, others)) => {
                if self.frontends.get(&frontend) != Some(&owner.entry) {
                    self.frontends.insert(frontend, owner.entry.clone());
                }
                if others.is_empty() {
                    self.conflicts.remove(&frontend);
                    return;
                }
                let conflicts = others
                    .iter()
                    .map(|c| Conflict {
                        frontend,
                        kind: c.entry.kind,
                        service: c.entry.service.clone(),
                        port_name: c.entry.port_name.to_string(),
                        owner: owner.entry.service.clone(),
                        owner_port_name: owner.entry.port_name.to_string(),
                    })
                    .collect();
                self.conflicts.insert(frontend, conflicts);
            }
        }
    }
}
