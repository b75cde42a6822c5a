//! Pinned maps across upgrades: a map pinned by an agent whose programs
//! declared it differently (another key or value size, type or capacity)
//! cannot serve the new programs — the verifier would refuse them, or
//! worse, they would read the wrong bytes. Such pins are removed before
//! loading, so the map is created anew; the agent rewrites its entries
//! (endpoints, Services, routes) from its state and the source. Pins that
//! still fit are kept with their entries, so a restart changes nothing.

use std::path::Path;

use anyhow::Context;
use aya::maps::MapInfo;
use tracing::warn;

/// A map's shape as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B entries {}",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// Removes the pins in `bpffs_dir` of the object's maps whose pinned shape
/// differs from what the object (with the configured `map_sizes`) wants;
/// returns their names.
pub fn retire_incompatible(
    bpffs_dir: &Path,
    object: &[u8],
    map_sizes: &[(&'static str, u32)],
) -> anyhow::Result<Vec<String>> {
    let parsed = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    let mut retired = Vec::new();
    for name in tern_common::maps::RETIRED {
        let pin = bpffs_dir.join(name);
        if pin.exists() {
            warn!(map = %name, "no map is called so any more: removing its pin");
            std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            retired.push(name.to_owned());
        }
    }
    for (name, map) in &parsed.maps {
        let pin = bpffs_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let wanted = Shape {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map_sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(map.max_entries(), |(_, size)| *size),
        };
        let pinned = match MapInfo::from_pin(&pin) {
            Ok(info) => Shape {
                map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
                key_size: info.key_size(),
                value_size: info.value_size(),
                max_entries: info.max_entries(),
            },
            Err(e) => {
                warn!(map = %name, "pin {} is unreadable ({e}): replacing it", pin.display());
                std::fs::remove_file(&pin)
                    .with_context(|| format!("removing {}", pin.display()))?;
                retired.push(name.clone());
                continue;
            }
        };
        if pinned != wanted {
            warn!(
                map = %name,
                "pinned map is {pinned}, this agent's is {wanted}: replacing it (its entries are rebuilt)"
            );
            std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            retired.push(name.clone());
        }
    }
    retired.sort();
    Ok(retired)
}
