//! How full the maps that refuse (NAT, POLICY) or evict (the LRU maps)
//! are: users ask for fill levels because full maps are the usual cause of
//! mystery drops. Counted by walking the pinned map's keys, read-only.

use std::path::Path;

use anyhow::Context;
use aya::maps::{HashMap, LpmTrie, Map, MapData};
use tern_common::{
    AffinityKey, AffinityValue, CtKey, CtValue, PolicyFlowKey, PolicyFlowValue, PolicyKey,
    PolicyRuleRef, maps,
};

/// The maps whose fill is reported.
pub const WATCHED: [&str; 5] = [
    maps::CT,
    maps::NAT,
    maps::AFFINITY,
    maps::POLICY,
    maps::POLICY_CT,
];

/// A map's capacity (max entries), from its pin.
pub fn capacity(bpffs_dir: &Path, name: &str) -> anyhow::Result<u32> {
    let data = open(bpffs_dir, name)?;
    Ok(data.info()?.max_entries())
}

/// (entries, capacity) of map `name`.
pub fn fill(bpffs_dir: &Path, name: &str) -> anyhow::Result<(usize, u32)> {
    let data = open(bpffs_dir, name)?;
    let capacity = data.info()?.max_entries();
    let map = Map::from_map_data(data)?;
    let entries = match name {
        maps::CT | maps::NAT => HashMap::<_, CtKey, CtValue>::try_from(map)?.keys().count(),
        maps::AFFINITY => HashMap::<_, AffinityKey, AffinityValue>::try_from(map)?
            .keys()
            .count(),
        maps::POLICY_CT => HashMap::<_, PolicyFlowKey, PolicyFlowValue>::try_from(map)?
            .keys()
            .count(),
        maps::POLICY => LpmTrie::<_, PolicyKey, PolicyRuleRef>::try_from(map)?
            .keys()
            .count(),
        other => anyhow::bail!("no fill count for map {other}"),
    };
    Ok((entries, capacity))
}

fn open(bpffs_dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = bpffs_dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("no pinned map at {}", path.display()))
}
