//! Facts about the node the agent runs on, read over netlink.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::RouteAttribute;
use tern_common::OVERLAY_VNI;

/// MTU pods get when none is configured.
pub const FALLBACK_MTU: u32 = 1500;

/// MTU of the device that carries the node's IPv4 default route, so pod
/// packets fit the node's own path out. `None` without a default route.
pub async fn default_route_mtu() -> anyhow::Result<Option<u32>> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute();
    let mut oif = None;
    while let Some(route) = routes.try_next().await? {
        if route.header.destination_prefix_length == 0
            && route.header.table == rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN
        {
            oif = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            });
            if oif.is_some() {
                break;
            }
        }
    }
    let mut mtu = None;
    if let Some(index) = oif {
        let mut links = handle.link().get().match_index(index).execute();
        if let Some(link) = links.try_next().await? {
            mtu = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            });
        }
    }
    task.abort();
    Ok(mtu)
}

/// The node's own IPv4 addresses (not loopback, not link-local): where
/// NodePorts listen unless configured.
pub async fn node_ipv4_addresses() -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
    Ok(ipv4_addresses()
        .await?
        .into_iter()
        .map(|(ip, _)| ip)
        .collect())
}

/// Names of the devices holding any of `ips`: the underlay devices where
/// traffic from outside the cluster arrives.
pub async fn devices_with(ips: &[std::net::Ipv4Addr]) -> anyhow::Result<Vec<String>> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut names = Vec::new();
    for (ip, index) in ipv4_addresses().await? {
        if !ips.contains(&ip) {
            continue;
        }
        let mut links = handle.link().get().match_index(index).execute();
        if let Some(link) = links.try_next().await? {
            for attribute in link.attributes {
                if let LinkAttribute::IfName(name) = attribute
                    && !names.contains(&name)
                {
                    names.push(name);
                }
            }
        }
    }
    task.abort();
    Ok(names)
}

/// Every IPv4 address (not loopback, not link-local) with its link index.
async fn ipv4_addresses() -> anyhow::Result<Vec<(std::net::Ipv4Addr, u32)>> {
    use rtnetlink::packet_route::AddressFamily;
    use rtnetlink::packet_route::address::AddressAttribute;
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut addresses = handle.address().get().execute();
    let mut ips = Vec::new();
    while let Some(message) = addresses.try_next().await? {
        if message.header.family != AddressFamily::Inet {
            continue;
        }
        for attribute in &message.attributes {
            if let AddressAttribute::Local(std::net::IpAddr::V4(ip)) = attribute
                && !ip.is_loopback()
                && !ip.is_link_local()
            {
                ips.push((*ip, message.header.index));
            }
        }
    }
    task.abort();
    Ok(ips)
}

/// Name of the overlay's VXLAN device on every node.
pub const OVERLAY_DEVICE: &str = "tern_vxlan";
/// The overlay device's own MAC: the source of the frames the node's own
/// stack sends into it. It must not look like a VTEP MAC, and must differ
/// from every other node's (a receiving VXLAN device drops frames from
/// its own MAC as loops): locally administered, with the node's address.
fn overlay_device_mac(node_ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = node_ip.octets();
    [0x0e, 0x75, a, b, c, d]
}
/// What VXLAN over IPv4 adds to each packet: outer IPv4 20, UDP 8, VXLAN 8
/// and the inner Ethernet header 14.
pub const VXLAN_OVERHEAD: u32 = 50;

/// MTU of the device `name`, if it exists.
pub async fn link_mtu(name: &str) -> anyhow::Result<Option<u32>> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let link = find_link(&handle, name).await;
    task.abort();
    Ok(link?.and_then(|link| {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
    }))
}

async fn find_link(
    handle: &rtnetlink::Handle,
    name: &str,
) -> anyhow::Result<Option<rtnetlink::packet_route::link::LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The overlay's VXLAN device: VNI `OVERLAY_VNI`, no learning, no ARP;
/// the routing pipeline gives it an FDB entry per remote node (see
/// `tern_common::vtep_mac`), through which the driver caches each node's
/// outer route. (An external-mode device would look the route up for
/// every packet: the tunnel key eBPF sets is uncacheable.) An existing
/// device of the same shape is kept (agent restart: traffic keeps
/// flowing); any other (another port or address, or the external mode of
/// earlier versions) is replaced. Returns its ifindex.
pub async fn ensure_vxlan(
    name: &str,
    port: u16,
    mtu: u32,
    node_ip: Ipv4Addr,
) -> anyhow::Result<u32> {
    use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVxlan};
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let result = async {
        if let Some(link) = find_link(&handle, name).await? {
            if is_overlay_device(&link, port, node_ip) {
                let index = link.header.index;
                without_ipv6(name)?;
                let update = LinkMessageBuilder::<LinkUnspec>::new()
                    .index(index)
                    .mtu(mtu)
                    .arp(false)
                    .up()
                    .build();
                handle.link().set(update).execute().await?;
                return Ok(index);
            }
            handle.link().del(link.header.index).execute().await?;
        }
        let device = LinkMessageBuilder::<LinkVxlan>::new(name)
            .id(OVERLAY_VNI)
            .port(port)
            .learning(false)
            .mtu(mtu)
            // Never a VTEP MAC: to_overlay tells by the prefix which frames
            // are addressed already.
            .address(overlay_device_mac(node_ip).to_vec())
            // No outer UDP checksum, as before with the tunnel key and as
            // Cilium does (Linux computes one unless told not to): the
            // inner packet carries its own.
            .udp_csum(false)
            // No ARP across the overlay: the eBPF programs address each
            // frame to its node's VTEP MAC and from_overlay rewrites the
            // MACs on arrival.
            .arp(false)
            .build();
        handle.link().add(device).execute().await?;
        let index = find_link(&handle, name)
            .await?
            .map(|link| link.header.index)
            .ok_or_else(|| anyhow::anyhow!("{name} vanished right after it was created"))?;
        // Down until it has no IPv6, so it never sends any.
        without_ipv6(name)?;
        let up = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .up()
            .build();
        handle.link().set(up).execute().await?;
        Ok(index)
    }
    .await;
    task.abort();
    result
}

/// Whether `link` is the overlay device as `ensure_vxlan` makes it.
fn is_overlay_device(
    link: &rtnetlink::packet_route::link::LinkMessage,
    port: u16,
    node_ip: Ipv4Addr,
) -> bool {
    use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkInfo};
    let mac = overlay_device_mac(node_ip);
    let vxlan = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
            LinkInfo::Data(InfoData::Vxlan(vxlan)) => Some(vxlan),
            _ => None,
        }),
        _ => None,
    });
    let same_mac = link
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Address(address) if address[..] == mac[..]));
    same_mac
        && vxlan.is_some_and(|vxlan| {
            vxlan.contains(&InfoVxlan::Port(port))
                && vxlan.contains(&InfoVxlan::Id(OVERLAY_VNI))
                && vxlan.contains(&InfoVxlan::UDPCsum(false))
                && !vxlan.contains(&InfoVxlan::CollectMetadata(true))
        })
}

/// The overlay carries IPv4 only (Tern is IPv4-only): without this, the
/// kernel's IPv6 neighbour discovery on the device would be dropped by
/// to_overlay (no far end) and reported as drops. A kernel without IPv6
/// has nothing to turn off.
fn without_ipv6(device: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let path = format!("/proc/sys/net/ipv6/conf/{device}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.with_context(|| format!("setting {path}")),
    }
}

/// The node forwards between its devices, as Kubernetes requires of every
/// node (Cilium's and Flannel's agents set it too): native routing and
/// SNATed replies to other nodes go through the node's routing.
pub fn enable_ip_forwarding() -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("setting net.ipv4.ip_forward=1")
}
