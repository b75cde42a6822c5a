//! Open connections per backend (CONNECTIONS), the least-connection
//! schedulers' input. The datapath counts them as they open and close: a
//! per-packet flow from its CT entry's creation to its first FIN or RST, a
//! socket-LB connection from connect() to the socket's release (its
//! LB_SOCKETS entry). Counts drift when that record is lost without a
//! close: a CT entry expired or evicted while open, an LB_SOCKETS entry
//! evicted, a socket released while no release program was attached, a
//! counter recreated by an upgrade. The recount makes them right again
//! from those same records, so an agent restart or a lost event heals by
//! itself within one period.
//!
//! Owners: the Service pipeline creates and removes a backend's counter
//! with the backend; the datapath adds and subtracts; only the recount
//! (here) overwrites a value, and only one the datapath left alone while
//! it was counting.

use std::collections::BTreeMap;
use std::path::Path;

use aya::maps::{HashMap, MapData};
use tern_common::{CtKey, CtValue, ct_flags, maps};

use super::conntrack::now;
use super::maps::open_pinned;

/// CONNECTIONS: backend id -> open connections (as i32 bits).
pub type ConnectionsMap = HashMap<MapData, u32, u32>;
/// LB_SOCKETS: socket cookie -> backend id.
pub type SocketsMap = HashMap<MapData, u64, u32>;

pub struct Recount {
    connections: ConnectionsMap,
    sockets: SocketsMap,
}

/// What one recount found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecountStats {
    /// Backends counted.
    pub backends: usize,
    /// Counters overwritten with the true count.
    pub corrected: usize,
    /// Counters that were off but changed while counting (left to the next
    /// period).
    pub busy: usize,
}

impl Recount {
    pub fn open(bpffs_dir: &Path) -> anyhow::Result<Self> {
        Ok(Recount {
            connections: open_pinned(bpffs_dir, maps::CONNECTIONS)?,
            sockets: open_pinned(bpffs_dir, maps::LB_SOCKETS)?,
        })
    }

    /// Recounts every backend's open connections from `ct` and LB_SOCKETS
    /// and corrects the counters that differ. A counter that changed during
    /// the walk is left alone (its connection may be half-recorded).
    pub fn run(&mut self, ct: &HashMap<MapData, CtKey, CtValue>) -> RecountStats {
        let before = self.counters();
        let mut truth = open_flows(ct);
        for backend_id in self.sockets.iter().filter_map(Result::ok).map(|(_, id)| id) {
            *truth.entry(backend_id).or_default() += 1;
        }
        let mut stats = RecountStats {
            backends: before.len(),
            ..Default::default()
        };
        for (id, counted) in before {
            let want = truth.get(&id).copied().unwrap_or(0);
            if counted == want {
                continue;
            }
            match self.connections.get(&id, 0) {
                Ok(now) if now == counted => {
                    // BPF_EXIST: never re-create a counter the Service
                    // pipeline removed meanwhile.
                    let exist = u64::from(aya_obj::generated::BPF_EXIST);
                    if self.connections.insert(id, want, exist).is_ok() {
                        stats.corrected += 1;
                    }
                }
                _ => stats.busy += 1,
            }
        }
        stats
    }

    /// A Vec, not a map: one block instead of a B-tree built every 10 s
    /// (18 MiB with a million backends, kept by malloc once freed).
    fn counters(&self) -> Vec<(u32, u32)> {
        self.connections.iter().filter_map(Result::ok).collect()
    }
}

/// Per-packet flows still open, by the backend that counts them: the
/// original direction's live entries that are counted and not closing.
pub fn open_flows(ct: &HashMap<MapData, CtKey, CtValue>) -> BTreeMap<u32, u32> {
    let now = now();
    let mut open = BTreeMap::new();
    for (_, entry) in ct.iter().filter_map(Result::ok) {
        let counted = entry.backend_id != 0
            && entry.flags & (ct_flags::REPLY | ct_flags::CLOSING) == 0
            && now.wrapping_sub(entry.last_seen) <= entry.lifetime;
        if counted {
            *open.entry(entry.backend_id).or_default() += 1;
        }
    }
    open
}

/// Open connections by backend id as the datapath counts them now (a
/// transiently negative count reads as 0), from the pin: for the CLI.
pub fn read_pinned(bpffs_dir: &Path) -> anyhow::Result<BTreeMap<u32, u32>> {
    let connections: ConnectionsMap = open_pinned(bpffs_dir, maps::CONNECTIONS)?;
    Ok(connections
        .iter()
        .filter_map(Result::ok)
        .map(|(id, raw)| (id, (raw as i32).max(0) as u32))
        .collect())
}
