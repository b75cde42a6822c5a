//! The overlay device's forwarding database: one entry per remote node,
//! its VTEP MAC (`tern_common::vtep_mac`) -> its underlay address, as
//! `bridge fdb append <mac> dev tern_vxlan dst <node>` would add it. The
//! eBPF programs address each frame to the MAC of the node it is for; the
//! VXLAN driver finds the far end here and keeps the outer route cached
//! with the entry, where a per-packet tunnel key would make it look the
//! route up for every packet.
//!
//! Only entries with a VTEP MAC are Tern's: a sync leaves any other alone.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use tern_common::{VTEP_MAC_PREFIX, vtep_mac};
use tern_podnet::format_mac;

use super::ip_to_key;
use super::routes::RouteStats;

/// The entries a set of remote nodes needs: one per node address.
pub fn wanted(nodes: impl IntoIterator<Item = Ipv4Addr>) -> BTreeMap<[u8; 6], Ipv4Addr> {
    nodes
        .into_iter()
        .map(|node| (vtep_mac(ip_to_key(node)), node))
        .collect()
}

/// Makes Tern's FDB entries on the device `ifindex` exactly `wanted`.
pub async fn sync(
    ifindex: u32,
    wanted: &BTreeMap<[u8; 6], Ipv4Addr>,
) -> anyhow::Result<RouteStats> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let result = sync_with(&handle, ifindex, wanted).await;
    task.abort();
    result
}

async fn sync_with(
    handle: &Handle,
    ifindex: u32,
    wanted: &BTreeMap<[u8; 6], Ipv4Addr>,
) -> anyhow::Result<RouteStats> {
    let mut stats = RouteStats::default();
    let installed = entries(handle, ifindex).await?;
    for ((mac, node), message) in &installed {
        if wanted.get(mac) != Some(node) {
            match handle.neighbours().del(message.clone()).execute().await {
                Ok(()) => stats.removed += 1,
                Err(e) => {
                    tracing::warn!(mac = %format_mac(mac), %node, "removing FDB entry: {e}");
                    stats.errors += 1;
                }
            }
        }
    }
    for (mac, node) in wanted {
        if installed.contains_key(&(*mac, *node)) {
            continue;
        }
        let add = handle
            .neighbours()
            .add_bridge(ifindex, mac)
            .destination(IpAddr::V4(*node))
            .flags(NeighbourFlags::Own)
            .replace();
        match add.execute().await {
            Ok(()) => stats.added += 1,
            Err(e) => {
                tracing::warn!(mac = %format_mac(mac), %node, "adding FDB entry: {e}");
                stats.errors += 1;
            }
        }
    }
    Ok(stats)
}

/// The device's entries with a VTEP MAC, by (MAC, far end).
async fn entries(
    handle: &Handle,
    ifindex: u32,
) -> anyhow::Result<BTreeMap<([u8; 6], Ipv4Addr), NeighbourMessage>> {
    let mut dump = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute();
    let mut found = BTreeMap::new();
    while let Some(entry) = dump.try_next().await? {
        if entry.header.ifindex != ifindex {
            continue;
        }
        let mut mac = None;
        let mut node = None;
        for attribute in &entry.attributes {
            match attribute {
                NeighbourAttribute::LinkLayerAddress(lla) => {
                    mac = <[u8; 6]>::try_from(lla.as_slice()).ok();
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => node = Some(*ip),
                // In a bridge-family message the parser cannot tell the
                // address's family: an IPv4 far end comes as 4 bytes.
                NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
                    node = <[u8; 4]>::try_from(bytes.as_slice())
                        .ok()
                        .map(Ipv4Addr::from);
                }
                _ => {}
            }
        }
        if let (Some(mac), Some(node)) = (mac, node)
            && mac[..2] == VTEP_MAC_PREFIX
        {
            found.insert((mac, node), entry);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entry_per_node_named_by_its_address() {
        let nodes = [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(192, 168, 7, 1)];
        let wanted = wanted(nodes.into_iter().chain([Ipv4Addr::new(10, 0, 0, 2)]));
        assert_eq!(
            wanted.into_iter().collect::<Vec<_>>(),
            [
                ([0x0e, 0x74, 10, 0, 0, 2], nodes[0]),
                ([0x0e, 0x74, 192, 168, 7, 1], nodes[1]),
            ]
        );
    }
}
