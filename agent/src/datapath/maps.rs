//! Typed handles on Tern's maps. The agent takes each map once from the
//! loaded object and hands it to the one pipeline that writes it (see
//! `MapOwners`); read-only tools (the `tern` CLI, tests, the benchmark)
//! open the pins instead, and only read.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context;
use aya::Ebpf;
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use ipnetwork::Ipv4Network;
use tern_common::events::Direction;
use tern_common::{DatapathConfig, DropReason, EndpointInfo, Reason, maps};

pub type EndpointsMap = HashMap<MapData, u32, EndpointInfo>;
pub type MetricsMap = PerCpuArray<MapData, u64>;
pub type ConfigMap = Array<MapData, DatapathConfig>;

/// Takes map `name` out of the loaded object, typed: from then on the
/// caller's handle is the only one the agent holds.
pub fn take<T: TryFrom<Map, Error = MapError>>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object (or taken twice)"))?;
    T::try_from(map).with_context(|| format!("map {name} is not of the expected type"))
}

/// Opens the pin of map `name` under `bpffs_dir`, for reading.
pub fn open_pinned<T: TryFrom<Map, Error = MapError>>(
    bpffs_dir: &Path,
    name: &str,
) -> anyhow::Result<T> {
    let path = bpffs_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "no pinned map at {} (is the agent running?)",
            path.display()
        )
    })?;
    let map = Map::from_map_data(data).with_context(|| format!("map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} is not of the expected type"))
}

/// The datapath's counters (METRICS, and POLICY_COUNTS: new connections
/// allowed per policy number): written by the eBPF programs only, read
/// here summed over CPUs. Reading needs no lock.
pub struct Counters {
    metrics: MetricsMap,
    /// POLICY_COUNTS (allowed) and POLICY_DENIALS.
    policies: Option<(MetricsMap, MetricsMap)>,
    /// DROPS; absent while an agent older than flow events runs.
    drops: Option<MetricsMap>,
}

impl Counters {
    pub fn new(
        metrics: MetricsMap,
        allowed: MetricsMap,
        denied: MetricsMap,
        drops: MetricsMap,
    ) -> Self {
        Counters {
            metrics,
            policies: Some((allowed, denied)),
            drops: Some(drops),
        }
    }

    pub fn open_pinned(bpffs_dir: &Path) -> anyhow::Result<Self> {
        Ok(Counters {
            metrics: open_pinned(bpffs_dir, maps::METRICS)?,
            drops: open_pinned(bpffs_dir, maps::DROPS).ok(),
            // Absent while an agent older than NetworkPolicy runs.
            policies: open_pinned(bpffs_dir, maps::POLICY_COUNTS)
                .and_then(|allowed| Ok((allowed, open_pinned(bpffs_dir, maps::POLICY_DENIALS)?)))
                .ok(),
        })
    }

    /// New connections allowed by policy `number` on this node, and
    /// denied at pods it isolates (it first, by number).
    pub fn policy_verdicts(&self, number: u32) -> (u64, u64) {
        let sum = |m: &MetricsMap| {
            m.get(&number, 0)
                .map_or(0, |per_cpu| per_cpu.iter().sum::<u64>())
        };
        self.policies
            .as_ref()
            .map_or((0, 0), |(allowed, denied)| (sum(allowed), sum(denied)))
    }

    /// Packet counters summed over CPUs, by reason.
    pub fn all(&self) -> anyhow::Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|reason| Ok((*reason, self.get(*reason)?)))
            .collect()
    }

    pub fn get(&self, reason: Reason) -> anyhow::Result<u64> {
        Ok(self.metrics.get(&(reason as u32), 0)?.iter().sum())
    }

    /// Drops and refusals summed over CPUs, by reason and direction
    /// (those never seen left out).
    pub fn drops(&self) -> Vec<(DropReason, Direction, u64)> {
        let Some(drops) = &self.drops else {
            return Vec::new();
        };
        let mut all = Vec::new();
        for reason in DropReason::ALL {
            for direction in [Direction::Ingress, Direction::Egress] {
                let index = reason as u32 * 2 + direction as u32;
                let count: u64 = drops
                    .get(&index, 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                if count > 0 {
                    all.push((reason, direction, count));
                }
            }
        }
        all
    }
}

/// Local pods by address (ENDPOINTS): the endpoint manager writes it,
/// the CLI reads its pin while the agent is down.
pub struct Endpoints(EndpointsMap);

impl Endpoints {
    pub fn new(map: EndpointsMap) -> Self {
        Endpoints(map)
    }

    pub fn open_pinned(bpffs_dir: &Path) -> anyhow::Result<Self> {
        Ok(Endpoints(open_pinned(bpffs_dir, maps::ENDPOINTS)?))
    }

    pub fn list(&self) -> anyhow::Result<Vec<(Ipv4Addr, EndpointInfo)>> {
        let mut all = Vec::new();
        for entry in self.0.iter() {
            let (key, info) = entry?;
            all.push((ip_from_key(key), info));
        }
        all.sort_by_key(|(ip, _)| *ip);
        Ok(all)
    }

    pub fn upsert(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> anyhow::Result<()> {
        self.0
            .insert(ip_to_key(ip), info, 0)
            .map_err(|e| MapWriteError::new(maps::ENDPOINTS, e))
            .with_context(|| format!("cannot write endpoint {ip}"))
    }

    /// Removes `ip`; an absent entry is not an error.
    pub fn remove(&mut self, ip: Ipv4Addr) -> anyhow::Result<()> {
        remove_if_present(&mut self.0, &ip_to_key(ip))
            .with_context(|| format!("cannot remove endpoint {ip}"))
    }
}

/// The node's settings (CONFIG): written at start, and again when the
/// node's PodCIDR becomes known later (from its Node object).
pub struct Settings {
    map: ConfigMap,
    value: DatapathConfig,
}

impl Settings {
    pub fn write(mut map: ConfigMap, value: DatapathConfig) -> anyhow::Result<Self> {
        map.set(0, value, 0).context("writing the CONFIG map")?;
        Ok(Settings { map, value })
    }

    /// The PodCIDR whose unused addresses the datapath drops as unknown pods.
    pub fn set_pod_cidr(&mut self, cidr: Ipv4Network) -> anyhow::Result<()> {
        let mut value = self.value;
        value.pod_cidr_addr = ip_to_key(cidr.network());
        value.pod_cidr_mask = ip_to_key(cidr.mask());
        if value != self.value {
            self.map
                .set(0, value, 0)
                .context("writing the CONFIG map")?;
            self.value = value;
        }
        Ok(())
    }
}

/// Removes `key`; a key that is already gone is not an error.
pub fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
) -> Result<(), MapError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A map write the kernel refused, naming the map: the agent reports map
/// fullness by name (log, `tern status`, metric) because a full map is the
/// usual reason and the fix is that map's `--map-size`.
#[derive(Debug, thiserror::Error)]
#[error("the {map} map {}: {source}", if *.full { "is full" } else { "refused a write" })]
pub struct MapWriteError {
    pub map: &'static str,
    /// E2BIG (hash maps) or ENOSPC (LPM tries): no room for a new key.
    pub full: bool,
    #[source]
    pub source: MapError,
}

impl MapWriteError {
    pub fn new(map: &'static str, source: MapError) -> Self {
        let full = matches!(&source, MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)));
        MapWriteError { map, full, source }
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
