//! Typed access to Tern's pinned maps, for the agent and for read-only
//! tools (the `tern` CLI, tests) that open them from bpffs by path.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use tern_common::{DatapathConfig, EndpointInfo, Reason, maps};

pub type EndpointsMap = HashMap<MapData, u32, EndpointInfo>;
pub type MetricsMap = PerCpuArray<MapData, u64>;

/// The datapath's maps, whoever opened them.
pub struct DatapathMaps {
    pub endpoints: EndpointsMap,
    pub metrics: MetricsMap,
    pub config: Array<MapData, DatapathConfig>,
}

impl DatapathMaps {
    /// Opens the maps an agent pinned under `bpffs_dir`.
    pub fn open_pinned(bpffs_dir: &Path) -> anyhow::Result<Self> {
        let open = |name: &str| -> anyhow::Result<Map> {
            let path = bpffs_dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "no pinned map at {} (is the agent running?)",
                    path.display()
                )
            })?;
            Map::from_map_data(data).with_context(|| format!("map {name}"))
        };
        Ok(DatapathMaps {
            endpoints: open(maps::ENDPOINTS)?.try_into()?,
            metrics: open(maps::METRICS)?.try_into()?,
            config: open(maps::CONFIG)?.try_into()?,
        })
    }

    pub fn endpoints(&self) -> anyhow::Result<Vec<(Ipv4Addr, EndpointInfo)>> {
        let mut all = Vec::new();
        for entry in self.endpoints.iter() {
            let (key, info) = entry?;
            all.push((ip_from_key(key), info));
        }
        all.sort_by_key(|(ip, _)| *ip);
        Ok(all)
    }

    pub fn upsert_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> anyhow::Result<()> {
        self.endpoints
            .insert(ip_to_key(ip), info, 0)
            .with_context(|| format!("cannot write endpoint {ip} to the ENDPOINTS map (full?)"))
    }

    /// Removes `ip`; an absent entry is not an error.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> anyhow::Result<()> {
        match self.endpoints.remove(&ip_to_key(ip)) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("cannot remove endpoint {ip}")),
        }
    }

    pub fn set_config(&mut self, config: DatapathConfig) -> anyhow::Result<()> {
        self.config
            .set(0, config, 0)
            .context("writing the CONFIG map")
    }

    /// Packet counters summed over CPUs, by reason.
    pub fn metrics(&self) -> anyhow::Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|reason| {
                let per_cpu = self.metrics.get(&(*reason as u32), 0)?;
                Ok((*reason, per_cpu.iter().sum()))
            })
            .collect()
    }

    pub fn metric(&self, reason: Reason) -> anyhow::Result<u64> {
        Ok(self.metrics.get(&(reason as u32), 0)?.iter().sum())
    }
}

/// Map keys hold IPv4 addresses as the packet carries them (network order).
pub fn ip_to_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ip_from_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_in_network_byte_order() {
        let ip = Ipv4Addr::new(10, 244, 1, 2);
        assert_eq!(ip_to_key(ip).to_ne_bytes(), [10, 244, 1, 2]);
        assert_eq!(ip_from_key(ip_to_key(ip)), ip);
    }
}
