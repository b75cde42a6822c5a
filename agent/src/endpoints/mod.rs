//! The endpoint manager: the node's pods as the CNI API reports them.
//! It alone owns the PodCIDR and its addresses (IPAM), the endpoint store,
//! the ENDPOINTS map and the per-pod `from_pod` links.
//!
//! Requests for different pods run side by side: each piece of state has
//! its own short lock, taken in the order ipam -> store -> pods, and
//! netlink lookups run outside them. The CNI spec has the runtime never
//! run two operations for the same container at once. Nothing here waits
//! on the Service pipeline or on readers: they get `EndpointsStatus`
//! snapshots.

mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use ipnetwork::Ipv4Network;
use tern_api::{Attachment, Endpoint, EndpointStatus, Response};
use tern_common::{EndpointInfo, endpoint_flags};
use tern_podnet as podnet;
use tokio::sync::watch;
use tracing::{info, warn};

pub use self::store::EndpointStore;
use crate::compiler::policy::LocalEndpoint;
use crate::datapath::maps::Settings;
use crate::datapath::{Datapath, Endpoints};
use crate::ipam::Ipam;
use crate::model::{HostPort, Protocol};

/// What readers see of the endpoint manager, replaced after every change.
#[derive(Debug, Clone, Default)]
pub struct EndpointsStatus {
    pub pod_cidr: Option<Ipv4Network>,
    pub allocated: usize,
    pub capacity: usize,
    pub endpoints: usize,
    /// The pods' addresses on this node.
    pub endpoint_ips: Arc<BTreeSet<Ipv4Addr>>,
    /// The pods' hostPorts, sorted; the Service pipeline serves them.
    pub host_ports: Arc<Vec<HostPort>>,
    /// The pods by address, with the pod each belongs to: what policy
    /// is compiled for.
    pub local_pods: Arc<Vec<LocalEndpoint>>,
    /// (network namespace cookie, pod address) of the endpoints whose
    /// plugin reported the cookie: socket events name their pod by it.
    pub netns_cookies: Arc<Vec<(u64, Ipv4Addr)>>,
}

/// Qdiscs on a pod's host veth (`qdiscs::watch` reports them): tern-cni's
/// bandwidth limit, or a chained plugin's shaping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VethQdiscs {
    /// A root qdisc: it shapes what the pod receives, so traffic into the
    /// pod is delivered through the veth (INGRESS_SHAPED).
    pub root: bool,
    /// An ingress (or clsact) qdisc: it shapes what the pod sends (the
    /// bandwidth plugin redirects to an ifb there), so the pod's traffic
    /// goes on to it (`from_pod_via_qdisc`).
    pub ingress: bool,
}

/// The datapath side of the node's pods: the `from_pod` links (through the
/// loaded programs) and the ENDPOINTS map.
struct PodDatapath {
    programs: Datapath,
    endpoints: Endpoints,
    /// By host veth ifindex: what is published there, with the veth's MAC.
    published: BTreeMap<u32, (Endpoint, [u8; 6])>,
    /// By host veth ifindex, for published veths only.
    qdiscs: BTreeMap<u32, VethQdiscs>,
}

impl PodDatapath {
    /// Attaches the datapath to the endpoint's veth (`ifindex`, `host_mac`)
    /// and publishes it in ENDPOINTS (map last, so traffic is only steered
    /// to a ready pod). The program and the flags follow the veth's qdiscs.
    fn publish(
        &mut self,
        endpoint: &Endpoint,
        (ifindex, host_mac): (u32, [u8; 6]),
    ) -> anyhow::Result<()> {
        let qdiscs = self.qdiscs.get(&ifindex).copied().unwrap_or_default();
        self.programs
            .attach_pod(&endpoint.host_ifname, qdiscs.ingress)?;
        let own_limit = endpoint.bandwidth.is_some_and(|b| b.ingress_rate > 0);
        self.endpoints.upsert(
            endpoint.ip,
            EndpointInfo {
                ifindex,
                flags: if own_limit || qdiscs.root {
                    endpoint_flags::INGRESS_SHAPED
                } else {
                    0
                },
                pod_mac: endpoint.mac,
                host_mac,
            },
        )?;
        self.published.insert(ifindex, (endpoint.clone(), host_mac));
        Ok(())
    }

    /// The reverse of `publish`, in the reverse order.
    fn unpublish(&mut self, endpoint: &Endpoint) -> anyhow::Result<()> {
        self.endpoints.remove(endpoint.ip)?;
        let gone: Vec<u32> = self
            .published
            .iter()
            .filter(|(_, (e, _))| e.attachment == endpoint.attachment)
            .map(|(ifindex, _)| *ifindex)
            .collect();
        for ifindex in gone {
            self.published.remove(&ifindex);
            self.qdiscs.remove(&ifindex);
        }
        self.programs.detach_pod(&endpoint.host_ifname)
    }
}

pub struct EndpointManager {
    node_name: String,
    mtu: u32,
    /// Where IPAM keeps its state, whichever PodCIDR it serves.
    ipam_path: PathBuf,
    /// `None` until the node has a PodCIDR: the one place the node's
    /// PodCIDR lives.
    ipam: Mutex<Option<Ipam>>,
    store: Mutex<EndpointStore>,
    pods: Mutex<PodDatapath>,
    status: watch::Sender<EndpointsStatus>,
    /// CONFIG: its PodCIDR follows the one IPAM serves.
    settings: Mutex<Settings>,
}

/// A lock whose holder panicked still guards consistent state: every
/// change here is written through before it is acknowledged.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl EndpointManager {
    /// Opens IPAM (`pod_cidr`, if known yet) and the endpoint store in
    /// `state_dir`, and brings the pinned datapath in line with the store.
    pub fn start(
        node_name: &str,
        mtu: u32,
        state_dir: &std::path::Path,
        pod_cidr: Option<Ipv4Network>,
        programs: Datapath,
        endpoints: Endpoints,
        settings: Settings,
    ) -> anyhow::Result<Self> {
        let ipam_path = state_dir.join("ipam.json");
        let ipam = match pod_cidr {
            Some(cidr) => Some(Ipam::open(cidr, &ipam_path)?),
            None => {
                warn!(node = %node_name, "no PodCIDR configured: pod ADDs will be refused with 'try again later'");
                None
            }
        };
        let store = EndpointStore::open(&state_dir.join("endpoints.json"))?;
        let manager = EndpointManager {
            node_name: node_name.to_owned(),
            mtu,
            ipam_path,
            ipam: Mutex::new(ipam),
            store: Mutex::new(store),
            pods: Mutex::new(PodDatapath {
                programs,
                endpoints,
                published: BTreeMap::new(),
                qdiscs: BTreeMap::new(),
            }),
            status: watch::Sender::new(EndpointsStatus::default()),
            settings: Mutex::new(settings),
        };
        manager.reconcile()?;
        // Only now that every endpoint is in ENDPOINTS: from here on the
        // datapath refuses addresses of the PodCIDR no pod has.
        if let Some(cidr) = pod_cidr {
            lock(&manager.settings).set_pod_cidr(cidr)?;
        }
        manager.publish_status();
        Ok(manager)
    }

    /// Snapshots of what this manager holds, for readers.
    pub fn subscribe(&self) -> watch::Receiver<EndpointsStatus> {
        self.status.subscribe()
    }

    /// The PodCIDR served now.
    pub fn pod_cidr(&self) -> Option<Ipv4Network> {
        self.status.borrow().pod_cidr
    }

    /// Every endpoint whose veth still exists gets the new program and a
    /// fresh map entry; anything else pinned is removed.
    fn reconcile(&self) -> anyhow::Result<()> {
        let stored: Vec<Endpoint> = lock(&self.store).iter().cloned().collect();
        let mut kept = 0;
        for endpoint in stored {
            match self.publish(&endpoint) {
                Ok(()) => kept += 1,
                Err(e) => {
                    warn!(ip = %endpoint.ip, host_if = %endpoint.host_ifname, "dropping endpoint at start: {e:#}");
                    lock(&self.pods).unpublish(&endpoint)?;
                    lock(&self.store).remove(&endpoint.attachment)?;
                }
            }
        }
        let store = lock(&self.store);
        let wanted_ips: BTreeSet<_> = store.iter().map(|e| e.ip).collect();
        let wanted_ifs: BTreeSet<_> = store.iter().map(|e| e.host_ifname.clone()).collect();
        drop(store);
        let mut pods = lock(&self.pods);
        for (ip, _) in pods.endpoints.list()? {
            if !wanted_ips.contains(&ip) {
                info!(%ip, "removing stale ENDPOINTS entry");
                pods.endpoints.remove(ip)?;
            }
        }
        for ifname in pods.programs.attached_pods()? {
            if !wanted_ifs.contains(&ifname) {
                info!(host_if = %ifname, "removing stale pinned link");
                pods.programs.detach_pod(&ifname)?;
            }
        }
        info!(endpoints = kept, "datapath reconciled with the state dir");
        Ok(())
    }

    /// Looks the veth up (netlink, no lock held), then attaches and
    /// publishes it.
    fn publish(&self, endpoint: &Endpoint) -> anyhow::Result<()> {
        let link = podnet::host_link(&endpoint.host_ifname)?
            .with_context(|| format!("host interface {} does not exist", endpoint.host_ifname))?;
        lock(&self.pods).publish(endpoint, link)
    }

    /// Replaces the readers' snapshot. The locks are held while it is
    /// built and sent, so a later change is never overwritten by an
    /// earlier one.
    fn publish_status(&self) {
        let ipam = lock(&self.ipam);
        let store = lock(&self.store);
        self.status.send_replace(EndpointsStatus {
            pod_cidr: ipam.as_ref().map(Ipam::cidr),
            allocated: ipam.as_ref().map_or(0, Ipam::allocated),
            capacity: ipam.as_ref().map_or(0, Ipam::capacity),
            endpoints: store.len(),
            endpoint_ips: Arc::new(store.iter().map(|e| e.ip).collect()),
            host_ports: Arc::new(host_ports(&store)),
            local_pods: Arc::new(local_pods(&store)),
            netns_cookies: Arc::new(
                store
                    .iter()
                    .filter_map(|e| Some((e.netns_cookie?, e.ip)))
                    .collect(),
            ),
        });
    }

    pub fn allocate(&self, attachment: &Attachment) -> anyhow::Result<Response> {
        let mut guard = lock(&self.ipam);
        let Some(ipam) = guard.as_mut() else {
            return Ok(Response::Error {
                message: format!(
                    "node {} has no PodCIDR yet; cannot give pods addresses",
                    self.node_name
                ),
                try_again: true,
            });
        };
        let ip = ipam.allocate(attachment)?;
        let pod_cidr = ipam.cidr().to_string();
        drop(guard);
        info!(container = %attachment.container_id, ifname = %attachment.ifname, %ip, "allocated");
        self.publish_status();
        Ok(Response::Allocated {
            ip,
            pod_cidr,
            mtu: self.mtu,
        })
    }

    pub fn release(&self, attachment: &Attachment) -> anyhow::Result<Response> {
        let ip = match lock(&self.ipam).as_mut() {
            Some(ipam) => ipam.release(attachment)?,
            None => None,
        };
        if let Some(ip) = ip {
            info!(container = %attachment.container_id, %ip, "released");
            self.publish_status();
        }
        Ok(Response::Released { ip })
    }

    pub fn create(&self, endpoint: Endpoint) -> anyhow::Result<Response> {
        if let Some(refused) = host_port_taken(&lock(&self.store), &endpoint) {
            return Ok(refused);
        }
        let old = lock(&self.store).get(&endpoint.attachment).cloned();
        if let Some(old) = old
            && old != endpoint
        {
            lock(&self.pods).unpublish(&old)?;
        }
        if let Err(e) = self.publish(&endpoint) {
            // Leave nothing half-published behind.
            let _ = lock(&self.pods).unpublish(&endpoint);
            return Err(e);
        }
        let mut store = lock(&self.store);
        // Checked again where it is recorded: a concurrent ADD may have
        // taken the port since.
        if let Some(refused) = host_port_taken(&store, &endpoint) {
            drop(store);
            let _ = lock(&self.pods).unpublish(&endpoint);
            return Ok(refused);
        }
        info!(ip = %endpoint.ip, host_if = %endpoint.host_ifname, host_ports = endpoint.host_ports.len(), "endpoint created");
        store.insert(endpoint)?;
        drop(store);
        self.publish_status();
        Ok(Response::Done)
    }

    pub fn delete(&self, attachment: &Attachment) -> anyhow::Result<Response> {
        let endpoint = lock(&self.store).get(attachment).cloned();
        if let Some(endpoint) = endpoint {
            lock(&self.pods).unpublish(&endpoint)?;
            lock(&self.store).remove(attachment)?;
            info!(ip = %endpoint.ip, "endpoint deleted");
            self.publish_status();
        }
        Ok(Response::Done)
    }

    /// Forgets every endpoint and address not in `valid`, and removes the
    /// stale endpoints' host veths.
    pub fn gc(&self, valid: &[Attachment]) -> anyhow::Result<Response> {
        let stale: Vec<Endpoint> = lock(&self.store)
            .iter()
            .filter(|e| !valid.contains(&e.attachment))
            .cloned()
            .collect();
        for endpoint in &stale {
            lock(&self.pods).unpublish(endpoint)?;
            podnet::delete(None, &endpoint.attachment.ifname, &endpoint.host_ifname)?;
            lock(&self.store).remove(&endpoint.attachment)?;
        }
        let mut released: Vec<Attachment> = match lock(&self.ipam).as_mut() {
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
        self.publish_status();
        Ok(Response::GcDone { released })
    }

    /// Every endpoint with what the datapath holds for it now.
    pub fn list(&self) -> anyhow::Result<Response> {
        let stored: Vec<Endpoint> = lock(&self.store).iter().cloned().collect();
        let pods = lock(&self.pods);
        let in_map = pods.endpoints.list()?;
        let attached = pods.programs.attached_pods()?;
        drop(pods);
        let endpoints = stored
            .into_iter()
            .map(|e| EndpointStatus {
                host_ifindex: in_map
                    .iter()
                    .find(|(ip, _)| *ip == e.ip)
                    .map_or(0, |(_, info)| info.ifindex),
                attached: attached.contains(&e.host_ifname),
                endpoint: e,
            })
            .collect();
        Ok(Response::Endpoints { endpoints })
    }

    /// The host veths of the published endpoints.
    pub fn pod_veths(&self) -> Vec<u32> {
        lock(&self.pods).published.keys().copied().collect()
    }

    /// Whether `ifindex` is a published pod's host veth.
    pub fn is_pod_veth(&self, ifindex: u32) -> bool {
        lock(&self.pods).published.contains_key(&ifindex)
    }

    /// The qdiscs on a pod's veth changed (e.g. a chained bandwidth plugin
    /// shapes it): the pod's program and flags follow them.
    pub fn observe_qdiscs(&self, ifindex: u32, qdiscs: VethQdiscs) {
        let mut pods = lock(&self.pods);
        let Some((endpoint, host_mac)) = pods.published.get(&ifindex).cloned() else {
            return;
        };
        if pods.qdiscs.get(&ifindex).copied().unwrap_or_default() == qdiscs {
            return;
        }
        info!(ip = %endpoint.ip, host_if = %endpoint.host_ifname, root = qdiscs.root, ingress = qdiscs.ingress, "qdiscs on the pod's veth: traffic follows them");
        pods.qdiscs.insert(ifindex, qdiscs);
        if let Err(e) = pods.publish(&endpoint, (ifindex, host_mac)) {
            warn!(ip = %endpoint.ip, "following the qdiscs of {}: {e:#}", endpoint.host_ifname);
        }
    }

    /// Serves `cidr` from now on: the PodCIDR this node's Node object
    /// names. Addresses already given out of an earlier PodCIDR stay
    /// allocated (their pods still run) but are never handed out again.
    pub fn serve_pod_cidr(&self, cidr: Ipv4Network) -> anyhow::Result<()> {
        // The datapath first (idempotent, so a failed write is retried
        // with the next snapshot even when IPAM has switched already).
        lock(&self.settings).set_pod_cidr(cidr)?;
        let mut ipam = lock(&self.ipam);
        if ipam.as_ref().is_some_and(|ipam| ipam.cidr() == cidr) {
            return Ok(());
        }
        let before = ipam.as_ref().map(|ipam| ipam.cidr().to_string());
        *ipam = Some(Ipam::open(cidr, &self.ipam_path)?);
        drop(ipam);
        info!(node = %self.node_name, %cidr, ?before, "PodCIDR from the Node object");
        self.publish_status();
        Ok(())
    }
}

/// The refusal of `endpoint` if another pod has one of its hostPorts (on
/// an overlapping address): two pods must not share one, and the pod that
/// has it keeps it. The scheduler avoids this; a runtime may not.
fn host_port_taken(store: &EndpointStore, endpoint: &Endpoint) -> Option<Response> {
    let (other, port) = store
        .iter()
        .filter(|other| other.attachment != endpoint.attachment)
        .find_map(|other| {
            let taken = other
                .host_ports
                .iter()
                .find(|p| endpoint.host_ports.iter().any(|mine| mine.overlaps(p)))?;
            Some((other, taken))
        })?;
    Some(Response::Error {
        message: format!(
            "hostPort {port} is taken by pod {} ({}) on this node",
            other.attachment.container_id, other.ip
        ),
        try_again: false,
    })
}

/// Every endpoint's hostPorts, as the Service pipeline compiles them.
fn local_pods(store: &EndpointStore) -> Vec<LocalEndpoint> {
    let mut pods: Vec<LocalEndpoint> = store
        .iter()
        .map(|e| LocalEndpoint {
            ip: e.ip,
            pod: e
                .pod
                .as_ref()
                .map(|p| (p.namespace.clone(), p.name.clone())),
        })
        .collect();
    pods.sort();
    pods
}

fn host_ports(store: &EndpointStore) -> Vec<HostPort> {
    let mut ports: Vec<HostPort> = store
        .iter()
        .flat_map(|e| {
            e.host_ports.iter().map(|p| HostPort {
                pod: e.attachment.container_id.clone(),
                pod_ip: e.ip,
                host_ip: p.host_ip,
                host_port: p.host_port,
                container_port: p.container_port,
                protocol: match p.protocol {
                    tern_api::HostPortProtocol::Tcp => Protocol::Tcp,
                    tern_api::HostPortProtocol::Udp => Protocol::Udp,
                },
            })
        })
        .collect();
    ports.sort();
    ports
}
