//! Writes compiled load-balancer state into the service maps with the
//! fewest map operations, in an order that never shows a half-updated
//! Service to the datapath:
//! backends and lookup tables first, then a frontend's slots, then its
//! master entry (which holds the count), then slots beyond the new count;
//! removal runs the other way round (master first, backends last).
//!
//! While the maps hold the last state exactly, only frontends whose compiled
//! entry is a new object (`Arc`) are looked at, so one endpoint change costs
//! a few map writes, not a pass over every Service.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{Context, bail};
use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{HashMap, LpmTrie, MapData};
use imbl::ordmap::DiffItem;
use tern_common::{
    AffinityKey, AffinityValue, Backend, LB_TABLE_MAX, LbTable, RevNat, SOURCE_RANGE_PREFIX_BASE,
    ServiceKey, ServiceValue, SourceRangeKey, lb_algorithm::counts_connections, maps,
    service_flags,
};
use tracing::warn;

use super::ids::{ById, IdAllocator, KeyIds};
use super::maps::{MapWriteError, ip_from_key, ip_to_key, remove_if_present, take};
use crate::compiler::lb::{BackendAddr, Frontend, FrontendEntry, FrontendKind, LbState, Weights};
use crate::model::boxed_if_set;

pub struct ServiceMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub revnat: HashMap<MapData, u32, RevNat>,
    pub tables: HashMap<MapData, u32, LbTable>,
    /// Keys only: a backend's open-connection counter exists while the
    /// backend does (the datapath counts, the recount corrects).
    pub connections: HashMap<MapData, u32, u32>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
}

impl ServiceMaps {
    /// Takes the Service maps out of the loaded object: the Service
    /// pipeline is their one writer.
    pub fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        Ok(ServiceMaps {
            services: take(ebpf, maps::SERVICES)?,
            backends: take(ebpf, maps::BACKENDS)?,
            revnat: take(ebpf, maps::REVNAT)?,
            tables: take(ebpf, maps::LB_TABLES)?,
            connections: take(ebpf, maps::CONNECTIONS)?,
            affinity: take(ebpf, maps::AFFINITY)?,
            source_ranges: take(ebpf, maps::SOURCE_RANGES)?,
        })
    }
}

/// A backend as the maps key it: address and port in network order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct BackendKey {
    addr: u32,
    port: u16,
    proto: u8,
}

impl From<&BackendAddr> for BackendKey {
    fn from(b: &BackendAddr) -> Self {
        BackendKey {
            addr: ip_to_key(b.ip),
            port: b.port.to_be(),
            proto: b.protocol.number(),
        }
    }
}

/// One frontend as it is in the maps now. Kept small (one per frontend):
/// what most frontends lack is behind one pointer.
#[derive(Debug, Clone, Default)]
struct Applied {
    value: ServiceValue,
    /// Backend ids by slot.
    slots: Box<[u32]>,
    /// `None`: every weight 1, no lookup table, no source ranges.
    rare: Option<Box<RareApplied>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RareApplied {
    /// Backend weights by slot.
    weights: Weights,
    /// `None` also when unknown (adopted at start): rewritten on next apply.
    table: Option<Vec<u32>>,
    /// SOURCE_RANGES entries: (address in network order, prefix length).
    ranges: BTreeSet<(u32, u8)>,
}

static NO_RANGES: BTreeSet<(u32, u8)> = BTreeSet::new();

impl Applied {
    fn new(value: ServiceValue, slots: Vec<u32>, rare: RareApplied) -> Self {
        Applied {
            value,
            slots: slots.into_boxed_slice(),
            rare: boxed_if_set(rare),
        }
    }

    /// Changes the rare parts.
    fn edit_rare(&mut self, edit: impl FnOnce(&mut RareApplied)) {
        let mut rare = self.rare.take().map_or_else(RareApplied::default, |r| *r);
        edit(&mut rare);
        self.rare = boxed_if_set(rare);
    }

    /// The weight of slot `i`.
    fn weight(&self, i: usize) -> u32 {
        self.rare.as_ref().map_or(1, |r| r.weights.of(i))
    }

    fn table(&self) -> Option<&Vec<u32>> {
        self.rare.as_ref()?.table.as_ref()
    }

    fn ranges(&self) -> &BTreeSet<(u32, u8)> {
        self.rare.as_ref().map_or(&NO_RANGES, |r| &r.ranges)
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncStats {
    pub writes: usize,
    pub deletes: usize,
    pub errors: usize,
    /// Backends and frontends left out because a map refused a write, by
    /// map (`tern status`, `tern_map_write_failures_total`).
    pub refused: BTreeMap<&'static str, usize>,
    /// Frontends not in the maps after this apply, with the reason.
    pub left_out: BTreeMap<Frontend, String>,
}

/// Failures of one apply logged one by one; the rest are summed up (a full
/// map can refuse thousands, and failed applies are retried).
const LOGGED_FAILURES: usize = 10;

impl SyncStats {
    /// Counts (by map, when a map refused it) and logs a failed backend or
    /// frontend.
    fn failed(&mut self, e: &anyhow::Error, what: impl FnOnce() -> String) {
        self.errors += 1;
        if let Some(refused) = e.downcast_ref::<MapWriteError>() {
            *self.refused.entry(refused.map).or_default() += 1;
        }
        if self.errors <= LOGGED_FAILURES {
            warn!("{}: {e:#}", what());
        }
    }
}

#[derive(Default)]
pub struct LbSync {
    applied: BTreeMap<ServiceKey, Applied>,
    /// Backend ids by address, and back.
    backend_ids: KeyIds<BackendKey>,
    /// How many frontend slots in `applied` point at each backend id.
    backend_refs: ById<u32>,
    /// Backend ids that may have lost their last slot since the last sweep.
    maybe_unused: BTreeSet<u32>,
    /// Backend ids with a CONNECTIONS counter: the backends of frontends
    /// whose scheduler counts connections. Other backends have none, so a
    /// large random or Maglev set costs no counter writes or kernel memory.
    counted: BTreeSet<u32>,
    ids: IdAllocator,
    rev_nat_ids: IdAllocator,
    /// The state of the last apply, shared with readers' snapshots.
    state: Arc<LbState>,
    /// The maps hold `state` exactly (the last apply had no error): the next
    /// apply may compare by pointer against it.
    in_sync: bool,
}

pub fn master_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: ip_to_key(frontend.ip),
        port: frontend.port.to_be(),
        slot: 0,
        proto: frontend.protocol.number(),
        scope: frontend.scope as u8,
        pad: 0,
    }
}

fn flags(entry: &FrontendEntry) -> u16 {
    let mut flags = match entry.kind {
        FrontendKind::ClusterIp => service_flags::CLUSTER_IP,
        FrontendKind::NodePort => service_flags::NODE_PORT,
        FrontendKind::LoadBalancer => service_flags::LOAD_BALANCER,
        FrontendKind::ExternalIp => service_flags::EXTERNAL_IP,
        FrontendKind::HostPort => service_flags::HOST_PORT,
    };
    if entry.affinity_timeout.is_some() {
        flags |= service_flags::AFFINITY;
    }
    if entry.external_traffic_local {
        flags |= service_flags::EXTERNAL_LOCAL;
    }
    if entry.no_local_backend {
        flags |= service_flags::NO_LOCAL_BACKEND;
    }
    if entry.source_ranges.is_some() {
        flags |= service_flags::SOURCE_RANGES;
    }
    flags
}

/// The SOURCE_RANGES key of a frontend's allowed prefix.
fn range_key(rev_nat_id: u32, addr: u32, prefix: u8) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        SOURCE_RANGE_PREFIX_BASE + u32::from(prefix),
        SourceRangeKey { rev_nat_id, addr },
    )
}

impl LbSync {
    /// Rebuilds what is in the (pinned) maps, so that the first apply after
    /// an agent restart changes only what really changed.
    pub fn adopt(maps: &mut ServiceMaps) -> anyhow::Result<Self> {
        let mut sync = LbSync::default();
        let mut slots: BTreeMap<ServiceKey, BTreeMap<u16, (u32, u32)>> = BTreeMap::new();
        for entry in maps.services.iter() {
            let (key, mut value) = entry?;
            if key.slot == 0 {
                sync.rev_nat_ids.seen(value.rev_nat_id);
                // The datapath's rr position is not part of what was written.
                value.position = 0;
                sync.applied
                    .insert(key, Applied::new(value, Vec::new(), RareApplied::default()));
            } else {
                slots
                    .entry(ServiceKey { slot: 0, ..key })
                    .or_default()
                    .insert(key.slot, (value.backend_id, value.weight));
            }
        }
        for (master, by_slot) in slots {
            match sync.applied.get_mut(&master) {
                Some(applied) => {
                    let (slots, weights): (Vec<u32>, Vec<u32>) = by_slot.into_values().unzip();
                    applied.slots = slots.into_boxed_slice();
                    applied.edit_rare(|r| r.weights = Weights::new(weights));
                }
                // Slots without a master are leftovers of an interrupted
                // removal: clean them up.
                None => {
                    for slot in by_slot.keys() {
                        let _ = maps.services.remove(&ServiceKey {
                            slot: *slot,
                            ..master
                        });
                    }
                }
            }
        }
        let mut ranges: BTreeMap<u32, BTreeSet<(u32, u8)>> = BTreeMap::new();
        for key in maps.source_ranges.keys() {
            let key = key?;
            let prefix = key.prefix_len().saturating_sub(SOURCE_RANGE_PREFIX_BASE) as u8;
            let data = key.data();
            ranges
                .entry(data.rev_nat_id)
                .or_default()
                .insert((data.addr, prefix));
        }
        for applied in sync.applied.values_mut() {
            if let Some(ranges) = ranges.remove(&applied.value.rev_nat_id) {
                applied.edit_rare(|r| r.ranges = ranges);
            }
        }
        // Entries of no frontend: leftovers of an interrupted removal.
        for (rev_nat_id, stale) in ranges {
            for (addr, prefix) in stale {
                let _ = maps
                    .source_ranges
                    .remove(&range_key(rev_nat_id, addr, prefix));
            }
        }
        for entry in maps.backends.iter() {
            let (id, b) = entry?;
            sync.ids.seen(id);
            let key = BackendKey {
                addr: b.addr,
                port: b.port,
                proto: b.proto,
            };
            sync.backend_ids.insert(id, key);
        }
        // Counters of no backend: leftovers of an interrupted removal.
        let counters: Vec<u32> = maps.connections.keys().filter_map(Result::ok).collect();
        for id in counters {
            if sync.backend_ids.key(id).is_some() {
                sync.counted.insert(id);
            } else {
                let _ = maps.connections.remove(&id);
            }
        }
        // A CONNECTIONS map created anew (another shape) has none: the
        // least-connection frontends the maps serve get theirs now, before
        // the first apply (the recount fills in their values).
        let counting = sync
            .applied
            .values()
            .filter(|a| counts_connections(a.value.algorithm))
            .flat_map(|a| a.slots.iter().copied())
            .filter(|id| !sync.counted.contains(id))
            .collect::<BTreeSet<u32>>();
        let noexist = u64::from(aya_obj::generated::BPF_NOEXIST);
        for id in counting {
            if maps.connections.insert(id, 0, noexist).is_ok() {
                sync.counted.insert(id);
            }
        }
        for id in sync.applied.values().flat_map(|a| a.slots.iter()) {
            *sync.backend_refs.or_default(*id) += 1;
        }
        sync.maybe_unused = sync
            .backend_ids
            .ids()
            .filter(|id| !sync.backend_refs.contains_key(id))
            .collect();
        let used: BTreeSet<u32> = sync.applied.values().map(|a| a.value.rev_nat_id).collect();
        sync.rev_nat_ids.free = (1..=sync.rev_nat_ids.next)
            .filter(|id| !used.contains(id))
            .collect();
        let used: BTreeSet<u32> = sync.backend_ids.ids().collect();
        sync.ids.free = (1..=sync.ids.next)
            .filter(|id| !used.contains(id))
            .collect();
        Ok(sync)
    }

    pub fn frontends(&self) -> usize {
        self.applied.len()
    }

    /// What the maps serve now, as far as they tell (no Service names): for
    /// operators before the first sync after a restart, when the pinned
    /// datapath already serves Services the agent has not confirmed yet.
    pub fn served(&self) -> Vec<ServedFrontend> {
        self.applied
            .iter()
            .map(|(key, applied)| ServedFrontend {
                frontend: describe(key),
                internal: key.scope == tern_common::scope::INTERNAL,
                flags: applied.value.flags,
                backends: applied
                    .slots
                    .iter()
                    .filter_map(|id| self.backend_ids.key(*id))
                    .map(|b| format!("{}:{}", ip_from_key(b.addr), u16::from_be(b.port)))
                    .collect(),
            })
            .collect()
    }

    pub fn backends(&self) -> usize {
        self.backend_ids.len()
    }

    /// The state of the last apply (what the maps hold unless it failed).
    pub fn state(&self) -> &Arc<LbState> {
        &self.state
    }

    /// Makes the maps hold `desired`. A failing entry (e.g. map full) is
    /// logged and counted; the rest is still applied.
    pub fn apply(&mut self, maps: &mut ServiceMaps, desired: LbState) -> SyncStats {
        let mut stats = SyncStats::default();
        let mut stale_affinity: BTreeMap<u32, StaleAffinity> = BTreeMap::new();
        let (changed, removed) = self.changes(&desired);

        for (_, entry) in &changed {
            for backend in entry.backends.iter() {
                if let Err(e) = self.ensure_backend(maps, backend, &mut stats) {
                    stats.failed(&e, || format!("backend {backend}"));
                }
            }
        }
        for (frontend, entry) in &changed {
            let key = master_key(frontend);
            match self.apply_frontend(maps, key, entry, &mut stats) {
                Ok(Some((rev_nat_id, stale))) => {
                    stale_affinity.insert(rev_nat_id, stale);
                }
                Ok(_) => {}
                Err(e) => {
                    stats.failed(&e, || format!("frontend {frontend} of {}", entry.service));
                    stats.left_out.insert(**frontend, format!("{e:#}"));
                }
            }
        }
        for key in removed {
            // Removals come last: no frontend of this apply takes its
            // rev_nat id again before the walk below clears its entries.
            if let Some(old) = self.applied.get(&key).filter(|a| has_affinity(&a.value)) {
                stale_affinity.insert(old.value.rev_nat_id, StaleAffinity::All);
            }
            if let Err(e) = self.remove_frontend(maps, key, &mut stats) {
                stats.errors += 1;
                warn!(
                    "removing frontend {}:{}: {e:#}",
                    ip_from_key(key.addr),
                    u16::from_be(key.port)
                );
            }
        }
        if !stale_affinity.is_empty() {
            invalidate_affinity(maps, &stale_affinity, &mut stats);
        }
        self.remove_unused_backends(maps, &mut stats);
        if stats.errors > LOGGED_FAILURES {
            warn!(
                "{} more backends or frontends failed ({:?} refused by full maps)",
                stats.errors - LOGGED_FAILURES,
                stats.refused
            );
        }
        self.in_sync = stats.errors == 0;
        self.state = Arc::new(desired);
        stats
    }

    /// The frontends to write and the master keys to remove so that the
    /// maps hold `desired`: a diff against the last state while the maps
    /// hold it, else every frontend against what is in the maps.
    fn changes<'a>(
        &self,
        desired: &'a LbState,
    ) -> (Vec<(&'a Frontend, &'a FrontendEntry)>, Vec<ServiceKey>) {
        if !self.in_sync {
            let wanted: BTreeSet<ServiceKey> = desired.frontends.keys().map(master_key).collect();
            let removed = self
                .applied
                .keys()
                .filter(|k| !wanted.contains(k))
                .copied()
                .collect();
            let all = desired.frontends.iter().map(|(f, e)| (f, &**e)).collect();
            return (all, removed);
        }
        let (mut changed, mut removed) = (Vec::new(), Vec::new());
        // Both are persistent maps: the diff skips the subtrees they share,
        // and an entry that is the very same `Arc` is no change.
        for item in self.state.frontends.diff(&desired.frontends) {
            match item {
                DiffItem::Add(f, e) | DiffItem::Update { new: (f, e), .. } => {
                    changed.push((f, &**e));
                }
                DiffItem::Remove(f, _) => removed.push(master_key(f)),
            }
        }
        (changed, removed)
    }

    fn ensure_backend(
        &mut self,
        maps: &mut ServiceMaps,
        backend: &BackendAddr,
        stats: &mut SyncStats,
    ) -> anyhow::Result<()> {
        let key = BackendKey::from(backend);
        if self.backend_ids.id(&key).is_some() {
            return Ok(());
        }
        let id = self.ids.take();
        let value = Backend {
            addr: key.addr,
            port: key.port,
            proto: key.proto,
            flags: 0,
        };
        if let Err(e) = maps.backends.insert(id, value, 0) {
            self.ids.give_back(id);
            return Err(MapWriteError::new(maps::BACKENDS, e).into());
        }
        stats.writes += 1;
        self.backend_ids.insert(id, key);
        // Unused until a frontend slot points at it.
        self.maybe_unused.insert(id);
        Ok(())
    }

    /// Returns the rev_nat id and the AFFINITY entries to drop, if any.
    ///
    /// The writes that add keys (and so can find a map full) come first:
    /// the rev_nat entry of a new frontend, slots beyond the old count, a
    /// first lookup table, new source ranges. If one is refused they are
    /// taken back and the frontend stays exactly as it was (a new one stays
    /// absent). Only then are existing keys overwritten and the master
    /// written, which a full map does not refuse.
    fn apply_frontend(
        &mut self,
        maps: &mut ServiceMaps,
        key: ServiceKey,
        entry: &FrontendEntry,
        stats: &mut SyncStats,
    ) -> anyhow::Result<Option<(u32, StaleAffinity)>> {
        // Exact capacity (kept as the frontend's slots): collecting into a
        // Result grows the Vec 4, 8, 16.
        let mut ids = Vec::with_capacity(entry.backends.len());
        for b in entry.backends.iter() {
            let id = self.backend_ids.id(&BackendKey::from(b));
            ids.push(id.with_context(|| format!("its backend {b} could not be written"))?);
        }
        if ids.len() > usize::from(u16::MAX) {
            bail!(
                "{} backends exceed the 65535 a frontend can hold",
                ids.len()
            );
        }
        if counts_connections(entry.algorithm.code()) {
            self.ensure_counters(maps, &ids, stats)?;
        }
        let table = entry
            .table
            .as_ref()
            .map(|t| t.iter().map(|&i| ids[i as usize]).collect::<Vec<u32>>());
        if let Some(table) = &table
            && table.len() > LB_TABLE_MAX
        {
            bail!(
                "lookup table of {} exceeds the maximum {LB_TABLE_MAX}",
                table.len()
            );
        }
        let ranges: BTreeSet<(u32, u8)> = entry
            .source_ranges
            .iter()
            .flat_map(|r| r.iter())
            .map(|r| (ip_to_key(r.network()), r.prefix()))
            .collect();
        let old = self.applied.get(&key).cloned();
        let rev_nat_id = match &old {
            Some(old) => old.value.rev_nat_id,
            None => self.rev_nat_ids.take(),
        };
        let old = old.unwrap_or_default();
        let added = Added {
            rev_nat_id,
            revnat: !self.applied.contains_key(&key),
            slots: old.slots.len()..ids.len(),
            table: old.value.table_size == 0 && table.is_some(),
            ranges: ranges.difference(old.ranges()).copied().collect(),
        };
        if let Err(e) = add_keys(maps, key, &added, &ids, &entry.weights, &table, stats) {
            added.take_back(maps, key);
            if added.revnat {
                self.rev_nat_ids.give_back(rev_nat_id);
            }
            return Err(e.into());
        }
        if let Some(table) = &table
            && !added.table
            && old.table() != Some(table)
        {
            maps.tables
                .insert(rev_nat_id, lb_table(table), 0)
                .map_err(|e| MapWriteError::new(maps::LB_TABLES, e))?;
            stats.writes += 1;
        }
        for (i, id) in ids.iter().enumerate() {
            let weight = entry.weights.of(i);
            if i < old.slots.len() && (old.slots.get(i) != Some(id) || old.weight(i) != weight) {
                write_slot(maps, key, i, *id, weight)?;
                stats.writes += 1;
            }
        }
        let value = ServiceValue {
            backend_id: 0,
            rev_nat_id,
            count: ids.len() as u16,
            flags: flags(entry),
            table_size: table.as_ref().map_or(0, |t| t.len() as u16),
            algorithm: entry.algorithm.code(),
            pad: 0,
            affinity_timeout: entry.affinity_timeout.unwrap_or(0),
            weight: 0,
            position: 0,
        };
        if old.value != value || added.revnat {
            maps.services
                .insert(key, value, 0)
                .map_err(|e| MapWriteError::new(maps::SERVICES, e))?;
            stats.writes += 1;
        }
        for i in ids.len()..old.slots.len() {
            let _ = maps.services.remove(&slot_key(key, i));
            stats.deletes += 1;
        }
        if table.is_none() && old.value.table_size != 0 {
            let _ = maps.tables.remove(&rev_nat_id);
            stats.deletes += 1;
        }
        for (addr, prefix) in old.ranges().difference(&ranges) {
            let _ = maps
                .source_ranges
                .remove(&range_key(rev_nat_id, *addr, *prefix));
            stats.deletes += 1;
        }
        // A frontend without session affinity has no AFFINITY entries (the
        // datapath adds them only under the flag, and they go when it goes
        // or the frontend does): only one with it needs the walk of that
        // map (a kernel scan of all its buckets).
        let stale = match (has_affinity(&old.value), has_affinity(&value)) {
            (false, _) => None,
            (true, false) => Some(StaleAffinity::All),
            (true, true) => {
                let new_ids: BTreeSet<u32> = ids.iter().copied().collect();
                let gone: BTreeSet<u32> = old
                    .slots
                    .iter()
                    .filter(|id| !new_ids.contains(id))
                    .copied()
                    .collect();
                (!gone.is_empty()).then_some(StaleAffinity::Backends(gone))
            }
        };
        self.count_refs(&ids, &old.slots);
        let rare = RareApplied {
            weights: entry.weights.clone(),
            table,
            ranges,
        };
        self.applied.insert(key, Applied::new(value, ids, rare));
        Ok(stale.map(|stale| (rev_nat_id, stale)))
    }

    fn remove_frontend(
        &mut self,
        maps: &mut ServiceMaps,
        key: ServiceKey,
        stats: &mut SyncStats,
    ) -> anyhow::Result<()> {
        let Some(old) = self.applied.remove(&key) else {
            return Ok(());
        };
        // Master first: from here on nothing selects the slots below.
        remove_if_present(&mut maps.services, &key)?;
        for i in 0..old.slots.len() {
            remove_if_present(&mut maps.services, &slot_key(key, i))?;
        }
        if old.value.table_size != 0 {
            let _ = maps.tables.remove(&old.value.rev_nat_id);
        }
        for (addr, prefix) in old.ranges() {
            let _ = maps
                .source_ranges
                .remove(&range_key(old.value.rev_nat_id, *addr, *prefix));
        }
        remove_if_present(&mut maps.revnat, &old.value.rev_nat_id)?;
        self.rev_nat_ids.give_back(old.value.rev_nat_id);
        self.count_refs(&[], &old.slots);
        stats.deletes += 2 + old.slots.len();
        Ok(())
    }

    /// Gives each of `ids` a connection counter (at 0) if it has none yet,
    /// before a master entry points the datapath at it: the datapath counts
    /// only backends that have one. A counter stays until its backend goes.
    fn ensure_counters(
        &mut self,
        maps: &mut ServiceMaps,
        ids: &[u32],
        stats: &mut SyncStats,
    ) -> Result<(), MapWriteError> {
        for &id in ids {
            if self.counted.contains(&id) {
                continue;
            }
            maps.connections
                .insert(id, 0, 0)
                .map_err(|e| MapWriteError::new(maps::CONNECTIONS, e))?;
            self.counted.insert(id);
            stats.writes += 1;
        }
        Ok(())
    }

    /// Moves the slot counts of a frontend from `old` to `new` backend ids.
    fn count_refs(&mut self, new: &[u32], old: &[u32]) {
        for id in new {
            *self.backend_refs.or_default(*id) += 1;
        }
        for id in old {
            if let Some(refs) = self.backend_refs.get_mut(id) {
                *refs -= 1;
                if *refs == 0 {
                    self.backend_refs.remove(id);
                    self.maybe_unused.insert(*id);
                }
            }
        }
    }

    fn remove_unused_backends(&mut self, maps: &mut ServiceMaps, stats: &mut SyncStats) {
        for id in std::mem::take(&mut self.maybe_unused) {
            if self.backend_refs.contains_key(&id) {
                continue;
            }
            match remove_if_present(&mut maps.backends, &id) {
                Ok(()) => {
                    if self.counted.remove(&id) {
                        let _ = maps.connections.remove(&id);
                        stats.deletes += 1;
                    }
                    self.backend_ids.remove(id);
                    self.ids.give_back(id);
                    stats.deletes += 1;
                }
                Err(e) => {
                    self.maybe_unused.insert(id);
                    stats.errors += 1;
                    warn!("removing backend {id}: {e:#}");
                }
            }
        }
    }
}

/// The keys an apply adds for one frontend, none of which the datapath
/// reads before the master entry points at them.
struct Added {
    rev_nat_id: u32,
    /// A new frontend: its rev_nat entry.
    revnat: bool,
    /// Slot indexes (0-based) beyond the old count.
    slots: std::ops::Range<usize>,
    /// A lookup table where there was none.
    table: bool,
    ranges: Vec<(u32, u8)>,
}

impl Added {
    /// Removes what `add_keys` may have written (absent keys are fine).
    fn take_back(&self, maps: &mut ServiceMaps, key: ServiceKey) {
        for i in self.slots.clone() {
            let _ = maps.services.remove(&slot_key(key, i));
        }
        if self.table {
            let _ = maps.tables.remove(&self.rev_nat_id);
        }
        for (addr, prefix) in &self.ranges {
            let _ = maps
                .source_ranges
                .remove(&range_key(self.rev_nat_id, *addr, *prefix));
        }
        if self.revnat {
            let _ = maps.revnat.remove(&self.rev_nat_id);
        }
    }
}

/// Writes the keys of `added`: the ones a full map refuses.
fn add_keys(
    maps: &mut ServiceMaps,
    key: ServiceKey,
    added: &Added,
    ids: &[u32],
    weights: &Weights,
    table: &Option<Vec<u32>>,
    stats: &mut SyncStats,
) -> Result<(), MapWriteError> {
    if added.revnat {
        let revnat = RevNat {
            addr: key.addr,
            port: key.port,
            pad: 0,
        };
        maps.revnat
            .insert(added.rev_nat_id, revnat, 0)
            .map_err(|e| MapWriteError::new(maps::REVNAT, e))?;
        stats.writes += 1;
    }
    for i in added.slots.clone() {
        write_slot(maps, key, i, ids[i], weights.of(i))?;
        stats.writes += 1;
    }
    if let Some(table) = table.as_ref().filter(|_| added.table) {
        maps.tables
            .insert(added.rev_nat_id, lb_table(table), 0)
            .map_err(|e| MapWriteError::new(maps::LB_TABLES, e))?;
        stats.writes += 1;
    }
    for (addr, prefix) in &added.ranges {
        maps.source_ranges
            .insert(&range_key(added.rev_nat_id, *addr, *prefix), 1, 0)
            .map_err(|e| MapWriteError::new(maps::SOURCE_RANGES, e))?;
        stats.writes += 1;
    }
    Ok(())
}

/// The key of a frontend's slot `i` (0-based; slot 0 is the master).
fn slot_key(master: ServiceKey, i: usize) -> ServiceKey {
    ServiceKey {
        slot: i as u16 + 1,
        ..master
    }
}

fn write_slot(
    maps: &mut ServiceMaps,
    master: ServiceKey,
    i: usize,
    backend_id: u32,
    weight: u32,
) -> Result<(), MapWriteError> {
    let value = ServiceValue {
        backend_id,
        weight,
        ..Default::default()
    };
    maps.services
        .insert(slot_key(master, i), value, 0)
        .map_err(|e| MapWriteError::new(maps::SERVICES, e))
}

/// Boxed: 64 KiB, too large to build on the stack.
fn lb_table(table: &[u32]) -> Box<LbTable> {
    let mut value = Box::new(LbTable {
        backend_ids: [0; LB_TABLE_MAX],
    });
    value.backend_ids[..table.len()].copy_from_slice(table);
    value
}

fn has_affinity(master: &ServiceValue) -> bool {
    master.flags & service_flags::AFFINITY != 0
}

/// A frontend's AFFINITY entries that must go.
enum StaleAffinity {
    /// Those pointing at backends the frontend no longer has.
    Backends(BTreeSet<u32>),
    /// All of them: affinity turned off, or the frontend removed.
    All,
}

/// Affinity entries pointing at a backend the service no longer has would
/// keep clients on it: drop them (the datapath then picks anew).
fn invalidate_affinity(
    maps: &mut ServiceMaps,
    stale: &BTreeMap<u32, StaleAffinity>,
    stats: &mut SyncStats,
) {
    let doomed: Vec<AffinityKey> = maps
        .affinity
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| match stale.get(&k.rev_nat_id) {
            Some(StaleAffinity::All) => true,
            Some(StaleAffinity::Backends(gone)) => gone.contains(&v.backend_id),
            None => false,
        })
        .map(|(k, _)| k)
        .collect();
    for key in doomed {
        let _ = maps.affinity.remove(&key);
        stats.deletes += 1;
    }
}

/// Readable frontend for logs and the CLI: "ip:port/PROTO".
pub fn describe(key: &ServiceKey) -> String {
    format!(
        "{}:{}/{}",
        ip_from_key(key.addr),
        u16::from_be(key.port),
        crate::model::Protocol::name_of(key.proto)
    )
}

/// A frontend as the pinned maps hold it (`LbSync::served`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedFrontend {
    /// "ip:port/PROTO".
    pub frontend: String,
    pub internal: bool,
    /// `service_flags` of its master entry.
    pub flags: u16,
    /// "ip:port".
    pub backends: Vec<String>,
}
