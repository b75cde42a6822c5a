//! The node's state behind the CNI API: IPAM, endpoints and the datapath,
//! kept consistent with each other. Requests are handled one at a time.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context;
use tern_api::{
    AgentStatus, Attachment, Endpoint, EndpointStatus, FrontendStatus, Request, Response,
    SyncCounts,
};
use tern_common::{DatapathConfig, EndpointInfo};
use tern_podnet as podnet;
use tracing::{info, warn};

use crate::compiler::lb::{FrontendKind, LbState, Scope};
use crate::config::AgentConfig;
use crate::datapath::Datapath;
use crate::datapath::services::{LbSync, SyncStats};
use crate::endpoints::EndpointStore;
use crate::ipam::Ipam;

/// The overlay's VXLAN device (overlay mode).
pub struct OverlayDevice {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
}

pub struct Node {
    node_name: String,
    routing_mode: &'static str,
    mtu: u32,
    /// `None` until the node has a PodCIDR.
    ipam: Option<Ipam>,
    /// Where IPAM keeps its state, whichever PodCIDR it serves.
    ipam_path: std::path::PathBuf,
    endpoints: EndpointStore,
    datapath: Datapath,
    requests: u64,
    requests_failed: u64,
    lb: LbSync,
    /// What the datapath was last told to serve, for listing.
    last_sync: SyncCounts,
    last_sync_at: Option<std::time::Instant>,
    source: String,
    source_syncs: bool,
    /// The last snapshot's Services, and this node's pod addresses (the
    /// API source lists pods; the others do not).
    snapshot_services: usize,
    pod_ips: Option<(usize, std::collections::HashSet<std::net::Ipv4Addr>)>,
    socket_lb: bool,
}

impl Node {
    /// Opens the state dir, loads the datapath and reconciles the two.
    /// `node_ips` and `devices`: where traffic from outside arrives;
    /// `overlay`: where traffic from other nodes' pods arrives (overlay mode).
    pub fn start(
        config: &AgentConfig,
        mtu: u32,
        node_ips: &[Ipv4Addr],
        devices: &[String],
        overlay: Option<&OverlayDevice>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
        let ipam = match config.pod_cidr {
            Some(cidr) => Some(Ipam::open(cidr, &config.state_dir.join("ipam.json"))?),
            None => {
                warn!(node = %config.node_name, "no PodCIDR configured: pod ADDs will be refused with 'try again later'");
                None
            }
        };
        let endpoints = EndpointStore::open(&config.state_dir.join("endpoints.json"))?;
        let mut datapath = Datapath::load(&config.bpffs_dir, &config.map_sizes)?;
        let lb = LbSync::adopt(&mut datapath.services)?;
        datapath.maps.set_config(DatapathConfig {
            service_cidr_addr: crate::datapath::ip_to_key(config.service_cidr.network()),
            service_cidr_mask: crate::datapath::ip_to_key(config.service_cidr.mask()),
            node_addr: node_ips
                .first()
                .map_or(0, |ip| crate::datapath::ip_to_key(*ip)),
            tunnel_ifindex: overlay.map_or(0, |o| o.ifindex),
            masquerade: config.masquerade.into(),
        })?;
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
        let mut node = Node {
            node_name: config.node_name.clone(),
            routing_mode: config.routing_mode.name(),
            mtu,
            ipam,
            ipam_path: config.state_dir.join("ipam.json"),
            endpoints,
            datapath,
            requests: 0,
            requests_failed: 0,
            lb,
            last_sync: SyncCounts::default(),
            last_sync_at: None,
            source: config.source.describe(),
            source_syncs: config.source.syncs(),
            snapshot_services: 0,
            pod_ips: None,
            socket_lb: config.socket_lb,
        };
        node.reconcile()?;
        Ok(node)
    }

    /// Brings pinned datapath state in line with the endpoint store: every
    /// endpoint whose veth still exists gets the new program and a fresh
    /// map entry; anything else pinned is removed.
    fn reconcile(&mut self) -> anyhow::Result<()> {
        let stored: Vec<Endpoint> = self.endpoints.iter().cloned().collect();
        let mut kept = 0;
        for endpoint in stored {
            match self.publish(&endpoint) {
                Ok(()) => kept += 1,
                Err(e) => {
                    warn!(ip = %endpoint.ip, host_if = %endpoint.host_ifname, "dropping endpoint at start: {e:#}");
                    self.unpublish(&endpoint)?;
                    self.endpoints.remove(&endpoint.attachment)?;
                }
            }
        }
        let wanted_ips: Vec<_> = self.endpoints.iter().map(|e| e.ip).collect();
        for (ip, _) in self.datapath.maps.endpoints()? {
            if !wanted_ips.contains(&ip) {
                info!(%ip, "removing stale ENDPOINTS entry");
                self.datapath.maps.remove_endpoint(ip)?;
            }
        }
        let wanted_ifs: Vec<_> = self
            .endpoints
            .iter()
            .map(|e| e.host_ifname.clone())
            .collect();
        for ifname in self.datapath.attached_pods()? {
            if !wanted_ifs.contains(&ifname) {
                info!(host_if = %ifname, "removing stale pinned link");
                self.datapath.detach_pod(&ifname)?;
            }
        }
        info!(endpoints = kept, "datapath reconciled with the state dir");
        Ok(())
    }

    /// Attaches the datapath to the endpoint's veth and publishes it in the
    /// ENDPOINTS map (map last, so traffic is only steered to a ready pod).
    fn publish(&mut self, endpoint: &Endpoint) -> anyhow::Result<()> {
        let (ifindex, host_mac) = podnet::host_link(&endpoint.host_ifname)?
            .with_context(|| format!("host interface {} does not exist", endpoint.host_ifname))?;
        self.datapath.attach_pod(&endpoint.host_ifname)?;
        self.datapath.maps.upsert_endpoint(
            endpoint.ip,
            EndpointInfo {
                ifindex,
                flags: 0,
                pod_mac: endpoint.mac,
                host_mac,
            },
        )
    }

    /// The reverse of `publish`, in the reverse order.
    fn unpublish(&mut self, endpoint: &Endpoint) -> anyhow::Result<()> {
        self.datapath.maps.remove_endpoint(endpoint.ip)?;
        self.datapath.detach_pod(&endpoint.host_ifname)
    }

    pub fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Allocate { attachment } => self.allocate(&attachment),
            Request::Release { attachment } => self.release(&attachment),
            Request::EndpointCreate { endpoint } => self.endpoint_create(endpoint),
            Request::EndpointDelete { attachment } => self.endpoint_delete(&attachment),
            Request::Gc { valid } => self.gc(&valid),
            Request::Status => Ok(Response::Status(Box::new(self.status()))),
            Request::ListEndpoints => self.list_endpoints(),
            Request::ListServices => Ok(self.list_services()),
        };
        let response = result.unwrap_or_else(|e| Response::Error {
            message: format!("{e:#}"),
            try_again: false,
        });
        self.requests += 1;
        if matches!(response, Response::Error { .. }) {
            self.requests_failed += 1;
        }
        response
    }

    fn allocate(&mut self, attachment: &Attachment) -> anyhow::Result<Response> {
        let Some(ipam) = self.ipam.as_mut() else {
            return Ok(Response::Error {
                message: format!(
                    "node {} has no PodCIDR yet; cannot give pods addresses",
                    self.node_name
                ),
                try_again: true,
            });
        };
        let ip = ipam.allocate(attachment)?;
        info!(container = %attachment.container_id, ifname = %attachment.ifname, %ip, "allocated");
        Ok(Response::Allocated {
            ip,
            pod_cidr: ipam.cidr().to_string(),
            mtu: self.mtu,
        })
    }

    fn release(&mut self, attachment: &Attachment) -> anyhow::Result<Response> {
        let ip = match self.ipam.as_mut() {
            Some(ipam) => ipam.release(attachment)?,
            None => None,
        };
        if let Some(ip) = ip {
            info!(container = %attachment.container_id, %ip, "released");
        }
        Ok(Response::Released { ip })
    }

    fn endpoint_create(&mut self, endpoint: Endpoint) -> anyhow::Result<Response> {
        if let Some(old) = self.endpoints.get(&endpoint.attachment).cloned()
            && old != endpoint
        {
            self.unpublish(&old)?;
        }
        if let Err(e) = self.publish(&endpoint) {
            // Leave nothing half-published behind.
            let _ = self.unpublish(&endpoint);
            return Err(e);
        }
        info!(ip = %endpoint.ip, host_if = %endpoint.host_ifname, "endpoint created");
        self.endpoints.insert(endpoint)?;
        Ok(Response::Done)
    }

    fn endpoint_delete(&mut self, attachment: &Attachment) -> anyhow::Result<Response> {
        if let Some(endpoint) = self.endpoints.get(attachment).cloned() {
            self.unpublish(&endpoint)?;
            self.endpoints.remove(attachment)?;
            info!(ip = %endpoint.ip, "endpoint deleted");
        }
        Ok(Response::Done)
    }

    fn gc(&mut self, valid: &[Attachment]) -> anyhow::Result<Response> {
        let stale: Vec<Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| !valid.contains(&e.attachment))
            .cloned()
            .collect();
        for endpoint in &stale {
            self.unpublish(endpoint)?;
            podnet::delete(None, &endpoint.attachment.ifname, &endpoint.host_ifname)?;
            self.endpoints.remove(&endpoint.attachment)?;
        }
        let mut released: Vec<Attachment> = match self.ipam.as_mut() {
            Some(ipam) => ipam
                .release_all_except(|a| valid.contains(a))?
                .into_iter()
                .map(|(a, _)| a)
                .collect(),
            None => Vec::new(),
        };
        released.extend(stale.into_iter().map(|e| e.attachment));
        released.sort();
        released.dedup();
        info!(released = released.len(), "garbage collected");
        Ok(Response::GcDone { released })
    }

    /// The datapath's counters (METRICS), summed over CPUs.
    pub fn datapath_metrics(&self) -> anyhow::Result<Vec<(tern_common::Reason, u64)>> {
        self.datapath.maps.metrics()
    }

    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            node_name: self.node_name.clone(),
            pod_cidr: self.ipam.as_ref().map(|i| i.cidr().to_string()),
            mtu: self.mtu,
            allocated: self.ipam.as_ref().map_or(0, |i| i.allocated()),
            capacity: self.ipam.as_ref().map_or(0, |i| i.capacity()),
            endpoints: self.endpoints.len(),
            ready: self.ipam.is_some(),
            reason: self
                .ipam
                .is_none()
                .then(|| "node has no PodCIDR".to_owned()),
            bpffs_dir: self.datapath.bpffs_dir().display().to_string(),
            requests: self.requests,
            requests_failed: self.requests_failed,
            frontends: self.lb.frontends(),
            backends: self.lb.backends(),
            last_sync: self.last_sync,
            source: self.source.clone(),
            last_sync_age_s: self.last_sync_at.map(|at| at.elapsed().as_secs()),
            synced: !self.source_syncs || self.last_sync_at.is_some(),
            services: self.snapshot_services,
            pods: self.pod_ips.as_ref().map(|(pods, _)| *pods),
            endpoints_without_pod: self.pod_ips.as_ref().map(|(_, ips)| {
                self.endpoints
                    .iter()
                    .filter(|e| !ips.contains(&e.ip))
                    .count()
            }),
            routing_mode: self.routing_mode.into(),
            service_path: if self.socket_lb {
                "socket-lb"
            } else {
                "per-packet"
            }
            .into(),
        }
    }

    fn list_endpoints(&self) -> anyhow::Result<Response> {
        let in_map = self.datapath.maps.endpoints()?;
        let attached = self.datapath.attached_pods()?;
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| EndpointStatus {
                endpoint: e.clone(),
                host_ifindex: in_map
                    .iter()
                    .find(|(ip, _)| *ip == e.ip)
                    .map_or(0, |(_, info)| info.ifindex),
                attached: attached.contains(&e.host_ifname),
            })
            .collect();
        Ok(Response::Endpoints { endpoints })
    }

    /// Serves `cidr` from now on: the PodCIDR this node's Node object
    /// names. Addresses already given out of an earlier PodCIDR stay
    /// allocated (their pods still run) but are never handed out again.
    /// True when it changed.
    pub fn set_pod_cidr(&mut self, cidr: ipnetwork::Ipv4Network) -> anyhow::Result<bool> {
        if self.ipam.as_ref().is_some_and(|ipam| ipam.cidr() == cidr) {
            return Ok(false);
        }
        let before = self.ipam.as_ref().map(|ipam| ipam.cidr().to_string());
        self.ipam = Some(Ipam::open(cidr, &self.ipam_path)?);
        info!(node = %self.node_name, %cidr, ?before, "PodCIDR from the Node object");
        Ok(true)
    }

    /// Notes what a snapshot from the source holds, for status.
    pub fn note_snapshot(&mut self, cluster: &crate::model::Cluster, source_lists_pods: bool) {
        self.snapshot_services = cluster.services.len();
        self.pod_ips = source_lists_pods.then(|| {
            let own: Vec<_> = cluster.pods.values().filter(|p| !p.host_network).collect();
            let ips = own.iter().flat_map(|p| p.ips.iter().copied()).collect();
            (own.len(), ips)
        });
    }

    /// Brings the service maps to `state` (a compiled snapshot).
    pub fn apply_services(&mut self, state: LbState) -> SyncStats {
        let stats = self.lb.apply(&mut self.datapath.services, state);
        self.last_sync_at = Some(std::time::Instant::now());
        self.last_sync = SyncCounts {
            syncs: self.last_sync.syncs + 1,
            writes: stats.writes as u64,
            deletes: stats.deletes as u64,
            errors: stats.errors as u64,
        };
        stats
    }

    fn list_services(&self) -> Response {
        let frontends = self
            .lb
            .state()
            .frontends
            .iter()
            .map(|(frontend, entry)| {
                let mut flags = Vec::new();
                if let Some(t) = entry.affinity_timeout {
                    flags.push(format!("affinity={t}s"));
                }
                if entry.maglev.is_some() {
                    flags.push("maglev".into());
                }
                if entry.external_traffic_local {
                    flags.push("local".into());
                }
                FrontendStatus {
                    frontend: format!("{}:{}/{}", frontend.ip, frontend.port, frontend.protocol),
                    kind: match entry.kind {
                        FrontendKind::ClusterIp => "ClusterIP",
                        FrontendKind::NodePort => "NodePort",
                        FrontendKind::LoadBalancer => "LoadBalancer",
                        FrontendKind::ExternalIp => "ExternalIP",
                    }
                    .into(),
                    scope: match frontend.scope {
                        Scope::External => "external",
                        Scope::Internal => "internal",
                    }
                    .into(),
                    service: entry.service.to_string(),
                    port_name: entry.port_name.clone(),
                    flags,
                    backends: entry
                        .backends
                        .iter()
                        .map(|b| format!("{}:{}", b.ip, b.port))
                        .collect(),
                }
            })
            .collect();
        Response::Services { frontends }
    }

    pub fn bpffs_dir(&self) -> &Path {
        self.datapath.bpffs_dir()
    }
}
