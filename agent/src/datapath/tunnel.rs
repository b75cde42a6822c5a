//! The TUNNEL map (overlay mode): remote PodCIDR -> the node to
//! encapsulate to, kept equal to what the routing compiler wants.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData};
use ipnetwork::Ipv4Network;
use tern_common::{TunnelEndpoint, maps};

use super::{ip_from_key, ip_to_key};
use crate::datapath::routes::RouteStats;

pub struct TunnelMap(LpmTrie<MapData, u32, TunnelEndpoint>);

impl TunnelMap {
    pub fn open_pinned(bpffs_dir: &Path) -> anyhow::Result<Self> {
        let path = bpffs_dir.join(maps::TUNNEL);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("no pinned map at {}", path.display()))?;
        Ok(TunnelMap(Map::from_map_data(data)?.try_into()?))
    }

    /// Every entry: PodCIDR -> node address.
    pub fn entries(&self) -> anyhow::Result<BTreeMap<Ipv4Network, Ipv4Addr>> {
        let mut all = BTreeMap::new();
        for key in self.0.keys() {
            let key = key?;
            let value = self.0.get(&key, 0)?;
            let cidr = Ipv4Network::new(ip_from_key(key.data()), key.prefix_len() as u8)?;
            all.insert(cidr, ip_from_key(value.node_addr));
        }
        Ok(all)
    }

    /// Writes the wanted entries first, then removes the rest, so a PodCIDR
    /// that moves to another node is never without an entry.
    pub fn sync(&mut self, wanted: &BTreeMap<Ipv4Network, Ipv4Addr>) -> anyhow::Result<RouteStats> {
        let installed = self.entries()?;
        let mut stats = RouteStats::default();
        for (cidr, node_ip) in wanted {
            if installed.get(cidr) == Some(node_ip) {
                continue;
            }
            let value = TunnelEndpoint {
                node_addr: ip_to_key(*node_ip),
            };
            match self.0.insert(&key_of(cidr), value, 0) {
                Ok(()) => stats.added += 1,
                Err(e) => {
                    tracing::warn!(%cidr, %node_ip, "TUNNEL map: cannot add (full?): {e}");
                    stats.errors += 1;
                }
            }
        }
        for cidr in installed.keys().filter(|c| !wanted.contains_key(c)) {
            match self.0.remove(&key_of(cidr)) {
                Ok(()) => stats.removed += 1,
                Err(e) => {
                    tracing::warn!(%cidr, "TUNNEL map: cannot remove: {e}");
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
