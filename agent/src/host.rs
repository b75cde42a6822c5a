//! Facts about the node the agent runs on, read over netlink.

use futures::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::RouteAttribute;

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
