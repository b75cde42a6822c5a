//! The per-packet path's connection tracking table: listing for operators
//! and removal of expired entries (the datapath only ignores them).

use std::path::Path;

use aya::maps::{HashMap, MapData};
use tern_common::{CtKey, CtValue, ct_flags, maps};

use super::maps::ip_from_key;

pub type CtMap = HashMap<MapData, CtKey, CtValue>;

/// CT opened from its pin, for reading (the CLI).
pub fn open_pinned(bpffs_dir: &Path) -> anyhow::Result<CtMap> {
    super::maps::open_pinned(bpffs_dir, maps::CT)
}

/// Seconds of CLOCK_MONOTONIC, the clock the datapath stamps entries with.
pub fn now() -> u32 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u32)
        .unwrap_or(0)
}

/// Past its lifetime, and for a closed TCP flow past TIME_WAIT too: the
/// datapath keeps such a tuple from new translated flows until then.
fn expired(value: &CtValue, now: u32) -> bool {
    now.wrapping_sub(value.last_seen) > value.held_for()
}

/// Removes the expired entries: (entries removed, entries left).
pub fn collect_garbage(ct: &mut CtMap) -> (usize, usize) {
    let now = now();
    let mut seen = 0;
    let doomed: Vec<CtKey> = ct
        .iter()
        .filter_map(Result::ok)
        .inspect(|_| seen += 1)
        .filter(|(_, v)| expired(v, now))
        .map(|(k, _)| k)
        .collect();
    // A new flow may have taken an expired entry's key since the walk (a
    // client port reused): read it again right before removing it, so the
    // live entry of a new connection is not removed in its place.
    let mut removed = 0;
    for key in &doomed {
        if ct.get(key, 0).is_ok_and(|v| expired(&v, self::now())) && ct.remove(key).is_ok() {
            removed += 1;
        }
    }
    (removed, seen - removed)
}

/// One entry, readable.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CtEntry {
    pub proto: &'static str,
    pub direction: &'static str,
    pub from: String,
    pub to: String,
    pub becomes: String,
    pub state: &'static str,
    pub expires_in: u32,
}

pub fn list(ct: &CtMap) -> anyhow::Result<Vec<CtEntry>> {
    let now = now();
    let endpoint = |addr: u32, port: u16| format!("{}:{}", ip_from_key(addr), u16::from_be(port));
    let mut entries = Vec::new();
    for item in ct.iter() {
        let (k, v) = item?;
        if expired(&v, now) {
            continue;
        }
        entries.push(CtEntry {
            proto: match k.proto {
                6 => "TCP",
                17 => "UDP",
                _ => "other",
            },
            direction: if v.flags & ct_flags::REPLY != 0 {
                "reply"
            } else {
                "original"
            },
            from: endpoint(k.saddr, k.sport),
            to: endpoint(k.daddr, k.dport),
            becomes: format!(
                "{} -> {}",
                endpoint(v.saddr, v.sport),
                endpoint(v.daddr, v.dport)
            ),
            // Closed, no longer translated, its tuple kept from new flows.
            state: if now.wrapping_sub(v.last_seen) > v.lifetime {
                "time_wait"
            } else if v.flags & ct_flags::CLOSING != 0 {
                "closing"
            } else if v.flags & ct_flags::ESTABLISHED != 0 {
                "established"
            } else {
                "new"
            },
            expires_in: v.held_for().saturating_sub(now.wrapping_sub(v.last_seen)),
        });
    }
    entries.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
    Ok(entries)
}
