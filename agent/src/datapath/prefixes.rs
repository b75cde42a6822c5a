//! Prefix maps (LPM tries keyed by an IPv4 CIDR): TUNNEL (remote PodCIDR
//! -> node) and NON_MASQUERADE (destinations that keep pod addresses),
//! each kept equal to what the agent computed.

use std::collections::BTreeMap;
use std::path::Path;

use aya::Pod;
use aya::maps::MapData;
use aya::maps::lpm_trie::{Key, LpmTrie};
use ipnetwork::Ipv4Network;

use super::{ip_from_key, ip_to_key};
use crate::datapath::routes::RouteStats;

pub struct PrefixMap<V: Pod> {
    name: &'static str,
    map: LpmTrie<MapData, u32, V>,
}

impl<V: Pod + PartialEq> PrefixMap<V> {
    /// Takes map `name` from the loaded object: routing is its one writer.
    pub fn take(ebpf: &mut aya::Ebpf, name: &'static str) -> anyhow::Result<Self> {
        Ok(PrefixMap {
            name,
            map: super::maps::take(ebpf, name)?,
        })
    }

    /// Opens map `name` from its pin, for reading (the CLI).
    pub fn open_pinned(bpffs_dir: &Path, name: &'static str) -> anyhow::Result<Self> {
        Ok(PrefixMap {
            name,
            map: super::maps::open_pinned(bpffs_dir, name)?,
        })
    }

    pub fn entries(&self) -> anyhow::Result<BTreeMap<Ipv4Network, V>> {
        let mut all = BTreeMap::new();
        for key in self.map.keys() {
            let key = key?;
            let value = self.map.get(&key, 0)?;
            let cidr = Ipv4Network::new(ip_from_key(key.data()), key.prefix_len() as u8)?;
            all.insert(cidr, value);
        }
        Ok(all)
    }

    /// Writes the wanted entries first, then removes the rest, so a prefix
    /// that changes hands is never without an entry.
    pub fn sync(&mut self, wanted: &BTreeMap<Ipv4Network, V>) -> anyhow::Result<RouteStats> {
        let installed = self.entries()?;
        let mut stats = RouteStats::default();
        for (cidr, value) in wanted {
            if installed.get(cidr) == Some(value) {
                continue;
            }
            match self.map.insert(&key_of(cidr), value, 0) {
                Ok(()) => stats.added += 1,
                Err(e) => {
                    tracing::warn!(map = self.name, %cidr, "cannot add (full?): {e}");
                    stats.errors += 1;
                }
            }
        }
        for cidr in installed.keys().filter(|c| !wanted.contains_key(c)) {
            match self.map.remove(&key_of(cidr)) {
                Ok(()) => stats.removed += 1,
                Err(e) => {
                    tracing::warn!(map = self.name, %cidr, "cannot remove: {e}");
                    stats.errors += 1;
                }
            }
        }
        Ok(stats)
    }
}

fn key_of(cidr: &Ipv4Network) -> Key<u32> {
    Key::new(cidr.prefix() as u32, ip_to_key(cidr.network()))
}
