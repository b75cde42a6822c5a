//! Bringing the node's datapath up: load the programs, write CONFIG,
//! attach to the node's devices and the pods' cgroup, and hand every map
//! and the programs to their owners.

use std::net::Ipv4Addr;

use anyhow::Context;
use tern_common::{DatapathConfig, TunnelEndpoint};
use tracing::info;

use crate::config::AgentConfig;
use crate::datapath::conntrack::CtMap;
use crate::datapath::policy::PolicyMaps;
use crate::datapath::prefixes::PrefixMap;
use crate::datapath::services::ServiceMaps;
use crate::datapath::{Counters, Datapath, ip_to_key, maps};
use crate::endpoints::EndpointManager;

/// The overlay's VXLAN device (overlay mode).
pub struct OverlayDevice {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
}

/// What start hands out: each owner with the maps it alone writes.
pub struct Started {
    /// IPAM, endpoints, ENDPOINTS and the per-pod links.
    pub endpoints: EndpointManager,
    /// For the Service pipeline.
    pub service_maps: ServiceMaps,
    /// For the policy pipeline.
    pub policy_maps: PolicyMaps,
    /// For node routing.
    pub tunnel: PrefixMap<TunnelEndpoint>,
    pub non_masquerade: PrefixMap<u8>,
    /// For the flow tables' garbage collection.
    pub ct: CtMap,
    pub nat: CtMap,
    /// Read by `/metrics`.
    pub counters: Counters,
    /// For the flow reader.
    pub events: aya::maps::RingBuf<aya::maps::MapData>,
}

/// Opens the state dir, loads the datapath and reconciles the two.
/// `node_ips` and `devices`: where traffic from outside arrives;
/// `overlay`: where traffic from other nodes' pods arrives (overlay mode).
pub fn start(
    config: &AgentConfig,
    mtu: u32,
    node_ips: &[Ipv4Addr],
    devices: &[String],
    overlay: Option<&OverlayDevice>,
) -> anyhow::Result<Started> {
    crate::ipam::create_private_dir(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let mut map_sizes = config.map_sizes.clone();
    map_sizes.push((tern_common::maps::EVENTS, config.events.ring_bytes));
    let (mut datapath, owned) = Datapath::load(&config.bpffs_dir, &map_sizes)?;
    let settings = maps::Settings::write(
        owned.config,
        DatapathConfig {
            service_cidr_addr: ip_to_key(config.service_cidr.network()),
            service_cidr_mask: ip_to_key(config.service_cidr.mask()),
            node_addr: node_ips.first().map_or(0, |ip| ip_to_key(*ip)),
            tunnel_ifindex: overlay.map_or(0, |o| o.ifindex),
            masquerade: config.masquerade.into(),
            pod_cidr_addr: 0,
            pod_cidr_mask: 0,
            events: config.events.flags,
            drop_events_per_second: config.events.drop_events_per_second,
        },
    )?;
    if let Some(overlay) = overlay {
        datapath
            .attach_overlay(&overlay.name)
            .with_context(|| format!("attaching to overlay device {}", overlay.name))?;
        info!(device = %overlay.name, mtu = overlay.mtu, "from_overlay attached");
    }
    for device in devices {
        datapath
            .attach_netdev(device)
            .with_context(|| format!("attaching to underlay device {device}"))?;
        info!(%device, "from_netdev and to_netdev attached");
    }
    if config.socket_lb {
        crate::datapath::ensure_cgroup2(&config.cgroup_root)?;
        datapath.attach_socket_lb(&config.cgroup_root)?;
        info!(cgroup = %config.cgroup_root.display(), "socket-LB attached");
    } else {
        datapath.detach_socket_lb()?;
    }
    // From here on only pods are attached: the programs go to the
    // endpoint manager.
    let endpoints = EndpointManager::start(
        &config.node_name,
        mtu,
        &config.state_dir,
        config.pod_cidr,
        datapath,
        owned.endpoints,
        settings,
    )?;
    Ok(Started {
        endpoints,
        service_maps: owned.services,
        policy_maps: owned.policy,
        tunnel: owned.tunnel,
        non_masquerade: owned.non_masquerade,
        ct: owned.ct,
        nat: owned.nat,
        counters: owned.counters,
        events: owned.events,
    })
}
