//! Kernel routes for the node's own traffic to other nodes' pods: one per
//! remote PodCIDR, via that node's address (native routing) or into the
//! VXLAN device (overlay), and an `unreachable` route for the rest of the
//! cluster CIDR so traffic to a PodCIDR no node has (a removed node's)
//! fails at once instead of leaving by the default route.
//!
//! Every route Tern installs carries its own route protocol number, so a
//! sync changes only Tern's routes and finds them again after a restart.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// The route protocol of Tern's routes (`ip route show proto 0x74`); not
/// one iproute2 or a routing daemon uses.
pub const ROUTE_PROTOCOL: u8 = 0x74;

/// One route as Tern wants it: to `destination`, via a node, into a
/// device (the overlay), or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    Via(Ipv4Addr),
    Device(u32),
    Unreachable,
}

/// What a sync of routes or of a prefix map changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RouteStats {
    pub added: usize,
    pub removed: usize,
    pub errors: usize,
}

impl RouteStats {
    /// Adds the counts of one sync (`what`); a sync that failed as a whole
    /// is logged and counts as one error.
    pub fn add(&mut self, what: &str, sync: anyhow::Result<RouteStats>) {
        match sync {
            Ok(s) => {
                self.added += s.added;
                self.removed += s.removed;
                self.errors += s.errors;
            }
            Err(e) => {
                tracing::warn!("routing: {what} sync failed: {e:#}");
                self.errors += 1;
            }
        }
    }
}

/// Makes Tern's routes in the main table exactly `wanted`.
pub async fn sync(wanted: &BTreeMap<Ipv4Network, NextHop>) -> anyhow::Result<RouteStats> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let result = sync_with(&handle, wanted).await;
    task.abort();
    result
}

async fn sync_with(
    handle: &Handle,
    wanted: &BTreeMap<Ipv4Network, NextHop>,
) -> anyhow::Result<RouteStats> {
    let mut stats = RouteStats::default();
    let installed = tern_routes(handle).await?;
    for (destination, (hop, message)) in &installed {
        if wanted.get(destination) != hop.as_ref() {
            match handle.route().del(message.clone()).execute().await {
                Ok(()) => stats.removed += 1,
                Err(e) => {
                    tracing::warn!(%destination, "removing route: {e}");
                    stats.errors += 1;
                }
            }
        }
    }
    for (destination, hop) in wanted {
        if installed.get(destination).and_then(|(h, _)| h.as_ref()) == Some(hop) {
            continue;
        }
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.network(), destination.prefix())
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        route = match hop {
            NextHop::Via(node_ip) => route.gateway(*node_ip),
            NextHop::Device(ifindex) => route.output_interface(*ifindex).scope(RouteScope::Link),
            NextHop::Unreachable => route.kind(RouteType::Unreachable),
        };
        match handle.route().add(route.build()).replace().execute().await {
            Ok(()) => stats.added += 1,
            Err(e) => {
                tracing::warn!(%destination, ?hop, "installing route: {e}");
                stats.errors += 1;
            }
        }
    }
    Ok(stats)
}

/// Tern's IPv4 routes in the main table, by destination; `None`: a shape
/// Tern never installs (someone else's edit), to be replaced.
async fn tern_routes(
    handle: &Handle,
) -> anyhow::Result<BTreeMap<Ipv4Network, (Option<NextHop>, RouteMessage)>> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut found = BTreeMap::new();
    while let Some(route) = routes.try_next().await? {
        if route.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
            || route.header.table != RouteHeader::RT_TABLE_MAIN
        {
            continue;
        }
        let mut destination = Ipv4Addr::UNSPECIFIED;
        let mut gateway = None;
        let mut device = None;
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                RouteAttribute::Oif(ifindex) => device = Some(*ifindex),
                _ => {}
            }
        }
        let Ok(destination) = Ipv4Network::new(destination, route.header.destination_prefix_length)
        else {
            continue;
        };
        let hop = match (route.header.kind, gateway, device) {
            (RouteType::Unreachable, None, _) => Some(NextHop::Unreachable),
            (RouteType::Unicast, Some(gateway), _) => Some(NextHop::Via(gateway)),
            (RouteType::Unicast, None, Some(device)) => Some(NextHop::Device(device)),
            _ => None,
        };
        found.insert(destination, (hop, route));
    }
    Ok(found)
}
