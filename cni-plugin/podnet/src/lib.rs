//! tern-podnet: pod-side wiring. The veth pair between the node and a pod,
//! the pod's address, its routes through the link-local gateway and the
//! static neighbour entry for that gateway.
//!
//! `tern-cni` builds, checks and deletes the wiring; `tern-agent` looks up
//! host veths and deletes the ones GC finds stale, and the `tern` CLI
//! formats MACs the same way.
//!
//! The API is synchronous. Netlink sockets and `setns()` act on the calling
//! *thread*, so every function here does its netlink work on dedicated
//! `std::thread`s it starts itself (each with a current-thread tokio runtime
//! and its own rtnetlink connection):
//!
//! * "host" work runs on a thread spawned from the caller's thread. On Linux
//!   a new thread starts in the network namespace of the thread that created
//!   it (clone() without CLONE_NEWNET copies the creating task's nsproxy), so
//!   "host" means the namespace of the *calling thread*, which is usually the
//!   node's namespace. The test `new_thread_inherits_creator_thread_netns`
//!   checks this.
//! * "pod" work runs on a thread that first does `setns(CLONE_NEWNET)` into
//!   the pod's namespace and only then opens its netlink socket. The caller's
//!   thread never changes namespace.
//!
//! Layout created by [`create`]:
//!
//! ```text
//! node: host_ifname (up, mtu)         route  <address>/32 dev host_ifname scope link
//!   |   veth
//! pod:  ifname (up, mtu, <address>/32) route  169.254.1.1/32 dev ifname scope link
//!                                      route  default via 169.254.1.1 dev ifname
//!                                      neigh  169.254.1.1 lladdr <host mac> PERMANENT
//! ```

use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

mod netlink;
mod shaping;

pub use shaping::{Bucket, Limit, check_shape, shape};

use netlink::{
    delete_link, dump_main_v4_routes, errno, get_link, is_up, link_exists, link_mac, link_mtu,
    link_peer_index, open_netns, route_dst, route_gateway, route_oif, run_netlink, temp_peer_name,
    valid_ifname, validate_ifname,
};

/// Link-local gateway every pod routes through. The pod resolves it to the
/// host veth's MAC through a permanent neighbour entry, or, once that is
/// flushed, through the datapath's ARP answer; the host side needs neither
/// an address nor proxy-ARP.
pub const GATEWAY: Ipv4Addr = {
    let [a, b, c, d] = tern_common::POD_GATEWAY;
    Ipv4Addr::new(a, b, c, d)
};

/// What to build for one pod.
#[derive(Debug, Clone, Copy)]
pub struct PodInterfaceSpec<'a> {
    /// CNI_NETNS, e.g. `/run/netns/x` or `/proc/<pid>/ns/net`.
    pub netns: &'a Path,
    /// CNI_IFNAME: the interface's name inside the pod.
    pub ifname: &'a str,
    /// Name of the host-side veth (at most 15 bytes), chosen by the caller.
    pub host_ifname: &'a str,
    /// The pod's address, configured as a /32.
    pub address: Ipv4Addr,
    pub mtu: u32,
}

/// What [`create`] built (and [`check`] found).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodInterface {
    /// Index of the host-side veth in the host (caller's) namespace.
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
    /// Index of the pod-side veth inside the pod namespace.
    pub pod_ifindex: u32,
    /// The pod namespace's cookie (SO_NETNS_COOKIE), which socket-level
    /// eBPF programs see: the agent names the pod of a socket event by it.
    /// `None` from CHECK, which does not read it.
    pub netns_cookie: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// The netns path does not exist or is not a network namespace.
    #[error("network namespace {} does not exist or is not a network namespace", .0.display())]
    NetnsMissing(PathBuf),
    /// CNI_IFNAME already exists in the pod, or host_ifname on the host.
    #[error("interface {0} already exists")]
    InterfaceExists(String),
    /// The pod netns already has a Tern interface (named): one per pod,
    /// since both would need the same gateway and default route.
    #[error(
        "the pod network namespace already has a Tern interface ({0}); Tern serves one interface per pod, attach further networks with another plugin"
    )]
    SecondInterface(String),
    /// [`check`] found a difference from the expected state.
    #[error("check failed: {0}")]
    Check(String),
    /// Anything else, with the step that failed.
    #[error("{0}")]
    Netlink(String),
}

type Result<T, E = PodNetError> = std::result::Result<T, E>;

/// Builds a [`PodNetError::Netlink`] mapper carrying `what` as context.
fn nl<E: Display>(what: impl Display) -> impl FnOnce(E) -> PodNetError {
    move |e| PodNetError::Netlink(format!("{what}: {e}"))
}

/// The name of the interface Tern's gateway route uses in this netns, if
/// an earlier ADD wired one.
async fn tern_interface(h: &rtnetlink::Handle) -> Result<Option<String>> {
    let routes = dump_main_v4_routes(h).await?;
    let Some(index) = routes
        .iter()
        .filter(|r| r.header.destination_prefix_length == 32 && route_dst(r) == Some(GATEWAY))
        .find_map(route_oif)
    else {
        return Ok(None);
    };
    let link = h
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .ok()
        .flatten();
    let name = link
        .and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                rtnetlink::packet_route::link::LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        })
        .unwrap_or_else(|| format!("ifindex {index}"));
    Ok(Some(name))
}

/// Creates the veth pair and configures both ends as described in the
/// module documentation. The host side lives in the calling thread's netns.
///
/// Fails with `InterfaceExists` (before creating anything) if `ifname`
/// exists in the pod or `host_ifname` on the host, and with `NetnsMissing`
/// if `spec.netns` is not a network namespace. Any failure after the veth
/// was created deletes it again (which removes the pod end too).
pub fn create(spec: &PodInterfaceSpec) -> Result<PodInterface> {
    validate_ifname("ifname", spec.ifname)?;
    validate_ifname("host_ifname", spec.host_ifname)?;
    let ns = open_netns(spec.netns)?
        .ok_or_else(|| PodNetError::NetnsMissing(spec.netns.to_path_buf()))?;
    let tmp = temp_peer_name(spec.host_ifname);
    let tmp = tmp.as_str();

    // 1a. Pod side first: nothing has been created yet.
    let netns_cookie = run_netlink(Some(&ns), "pod", |h| async move {
        if get_link(&h, spec.ifname)
            .await
            .map_err(nl(format_args!("looking up {} in pod netns", spec.ifname)))?
            .is_some()
        {
            return Err(PodNetError::InterfaceExists(spec.ifname.to_string()));
        }
        if let Some(existing) = tern_interface(&h).await? {
            return Err(PodNetError::SecondInterface(existing));
        }
        if get_link(&h, tmp)
            .await
            .map_err(nl(format_args!("looking up {tmp} in pod netns")))?
            .is_some()
        {
            return Err(PodNetError::Netlink(format!(
                "temporary peer name {tmp} is already taken in the pod netns"
            )));
        }
        Ok(current_netns_cookie())
    })?;

    // 1b + 2. Host side: check, then create the veth with its peer directly
    // inside the pod netns (IFLA_NET_NS_FD on the peer message).
    run_netlink(None, "host", |h| {
        let ns_fd = ns.as_raw_fd();
        async move {
            if link_exists(&h, spec.host_ifname).await? {
                return Err(PodNetError::InterfaceExists(spec.host_ifname.to_string()));
            }
            let peer = LinkUnspec::new_with_name(tmp)
                .mtu(spec.mtu)
                .setns_by_fd(ns_fd)
                .build();
            let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(spec.host_ifname)
                .mtu(spec.mtu)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            match h.link().add(veth).execute().await {
                Ok(()) => Ok(()),
                // Lost a race with someone creating the same name.
                Err(e)
                    if errno(&e) == Some(libc::EEXIST)
                        && link_exists(&h, spec.host_ifname).await.unwrap_or(false) =>
                {
                    Err(PodNetError::InterfaceExists(spec.host_ifname.to_string()))
                }
                Err(e) => Err(nl(format_args!(
                    "creating veth {} <-> {tmp} (peer in pod netns)",
                    spec.host_ifname
                ))(e)),
            }
        }
    })?;

    // From here on, any failure (or panic) removes the veth again.
    let mut rollback = Rollback {
        host_ifname: spec.host_ifname,
        armed: true,
    };

    // 3. Host side: up, /32 route to the pod.
    let (host_ifindex, host_mac) = run_netlink(None, "host", |h| async move {
        let link = get_link(&h, spec.host_ifname)
            .await
            .map_err(nl(format_args!("looking up new veth {}", spec.host_ifname)))?
            .ok_or_else(|| {
                PodNetError::Netlink(format!("new veth {} vanished", spec.host_ifname))
            })?;
        let index = link.header.index;
        let mac = link_mac(&link).ok_or_else(|| {
            PodNetError::Netlink(format!("veth {} has no MAC address", spec.host_ifname))
        })?;
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format_args!("setting {} up", spec.host_ifname)))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(spec.address, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        h.route()
            .add(route)
            .execute()
            .await
            .map_err(nl(format_args!(
                "adding host route {}/32 dev {}",
                spec.address, spec.host_ifname
            )))?;
        Ok((index, mac))
    })?;

    // 4. Pod side.
    let (pod_ifindex, pod_mac) = run_netlink(Some(&ns), "pod", |h| async move {
        let ifname = spec.ifname;
        let peer = get_link(&h, tmp)
            .await
            .map_err(nl(format_args!("looking up veth peer {tmp} in pod netns")))?
            .ok_or_else(|| {
                PodNetError::Netlink(format!("veth peer {tmp} not found in pod netns"))
            })?;
        let index = peer.header.index;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(ifname)
                    .mtu(spec.mtu)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format_args!(
                "renaming {tmp} to {ifname} (mtu {}) in pod netns",
                spec.mtu
            )))?;
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format_args!("setting {ifname} up in pod netns")))?;
        let lo = get_link(&h, "lo")
            .await
            .map_err(nl("looking up lo in pod netns"))?
            .ok_or_else(|| PodNetError::Netlink("pod netns has no lo".into()))?;
        h.link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(nl("setting lo up in pod netns"))?;
        h.address()
            .add(index, IpAddr::V4(spec.address), 32)
            .execute()
            .await
            .map_err(nl(format_args!(
                "adding {}/32 to {ifname} in pod netns",
                spec.address
            )))?;
        let gw_route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(GATEWAY, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        h.route()
            .add(gw_route)
            .execute()
            .await
            .map_err(nl(format_args!(
                "adding route {GATEWAY}/32 dev {ifname} in pod netns"
            )))?;
        let default_route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(GATEWAY)
            .output_interface(index)
            .build();
        h.route()
            .add(default_route)
            .execute()
            .await
            .map_err(nl(format_args!(
                "adding default route via {GATEWAY} dev {ifname} in pod netns"
            )))?;
        h.neighbours()
            .add(index, IpAddr::V4(GATEWAY))
            .link_layer_address(&host_mac)
            .state(NeighbourState::Permanent)
            .execute()
            .await
            .map_err(nl(format_args!(
                "adding permanent neighbour {GATEWAY} lladdr {} dev {ifname} in pod netns",
                format_mac(&host_mac)
            )))?;
        let link = get_link(&h, ifname)
            .await
            .map_err(nl(format_args!("looking up {ifname} in pod netns")))?
            .ok_or_else(|| PodNetError::Netlink(format!("{ifname} vanished from pod netns")))?;
        let mac = link_mac(&link).ok_or_else(|| {
            PodNetError::Netlink(format!("{ifname} in pod netns has no MAC address"))
        })?;
        Ok((link.header.index, mac))
    })?;

    rollback.armed = false;
    Ok(PodInterface {
        host_ifindex,
        host_mac,
        pod_mac,
        pod_ifindex,
        netns_cookie,
    })
}

/// The calling thread's network namespace cookie; `None` where the kernel
/// cannot tell it (before 5.14). Only observability depends on it.
fn current_netns_cookie() -> Option<u64> {
    // SAFETY: plain socket calls on a descriptor owned here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let got = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        libc::close(fd);
        (got == 0).then_some(cookie)
    }
}

/// Deletes the veth pair; idempotent (CNI DEL).
///
/// Deletes `host_ifname` from the calling thread's netns if present, which
/// removes the pod end too. Only if the host end is gone and `netns` is a
/// network namespace holding `ifname` is `ifname` deleted there. A missing
/// netns or missing links count as success.
pub fn delete(netns: Option<&Path>, ifname: &str, host_ifname: &str) -> Result<()> {
    if valid_ifname(host_ifname) {
        let deleted = run_netlink(None, "host", |h| async move {
            match get_link(&h, host_ifname)
                .await
                .map_err(nl(format_args!("looking up {host_ifname}")))?
            {
                Some(link) => delete_link(&h, link.header.index, host_ifname).await,
                None => Ok(false),
            }
        })?;
        if deleted {
            return Ok(());
        }
    }
    let (Some(netns), true) = (netns, valid_ifname(ifname)) else {
        return Ok(());
    };
    let Some(ns) = open_netns(netns)? else {
        return Ok(());
    };
    run_netlink(Some(&ns), "pod", |h| async move {
        if let Some(link) = get_link(&h, ifname)
            .await
            .map_err(nl(format_args!("looking up {ifname} in pod netns")))?
        {
            delete_link(&h, link.header.index, ifname).await?;
        }
        Ok(())
    })
}

/// Verifies that what [`create`] builds is in place (CNI CHECK).
///
/// Host (calling thread's netns): `host_ifname` exists, is up, and the
/// `address/32` route points at it. Pod: `ifname` exists, is up, is the peer
/// of `host_ifname`, has MTU `spec.mtu`, carries `address/32`, and has the
/// gateway route and the default route via [`GATEWAY`]; a neighbour entry
/// for the gateway, if the pod has one, names the host veth's MAC.
pub fn check(spec: &PodInterfaceSpec) -> Result<PodInterface> {
    validate_ifname("ifname", spec.ifname)?;
    validate_ifname("host_ifname", spec.host_ifname)?;
    let ns = open_netns(spec.netns)?
        .ok_or_else(|| PodNetError::NetnsMissing(spec.netns.to_path_buf()))?;
    let chk = |s: String| PodNetError::Check(s);

    let (host_ifindex, host_mac) = run_netlink(None, "host", |h| async move {
        let host = spec.host_ifname;
        let link = get_link(&h, host)
            .await
            .map_err(nl(format_args!("looking up {host}")))?
            .ok_or_else(|| chk(format!("host interface {host} does not exist")))?;
        if !is_up(&link) {
            return Err(chk(format!("host interface {host} is not up")));
        }
        let index = link.header.index;
        let mac =
            link_mac(&link).ok_or_else(|| chk(format!("host interface {host} has no MAC")))?;
        let routes = dump_main_v4_routes(&h).await?;
        let found = routes.iter().any(|r| {
            r.header.destination_prefix_length == 32
                && route_dst(r) == Some(spec.address)
                && route_oif(r) == Some(index)
        });
        if !found {
            return Err(chk(format!(
                "host route {}/32 dev {host} is missing",
                spec.address
            )));
        }
        Ok((index, mac))
    })?;

    let (pod_ifindex, pod_mac) = run_netlink(Some(&ns), "pod", |h| async move {
        let ifname = spec.ifname;
        let link = get_link(&h, ifname)
            .await
            .map_err(nl(format_args!("looking up {ifname} in pod netns")))?
            .ok_or_else(|| chk(format!("interface {ifname} does not exist in pod netns")))?;
        let index = link.header.index;
        if !is_up(&link) {
            return Err(chk(format!("interface {ifname} in pod netns is not up")));
        }
        match link_mtu(&link) {
            Some(m) if m == spec.mtu => {}
            m => {
                return Err(chk(format!(
                    "interface {ifname} in pod netns has MTU {m:?}, expected {}",
                    spec.mtu
                )));
            }
        }
        if link_peer_index(&link) != Some(host_ifindex) {
            return Err(chk(format!(
                "interface {ifname} in pod netns is not the veth peer of {}",
                spec.host_ifname
            )));
        }
        let mac = link_mac(&link)
            .ok_or_else(|| chk(format!("interface {ifname} in pod netns has no MAC")))?;

        let addrs: Vec<_> = h
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(spec.address))
            .set_prefix_length_filter(32)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing addresses in pod netns"))?;
        if addrs.is_empty() {
            return Err(chk(format!(
                "address {}/32 is missing on {ifname} in pod netns",
                spec.address
            )));
        }

        let routes = dump_main_v4_routes(&h).await?;
        let gw_route = routes.iter().any(|r| {
            r.header.destination_prefix_length == 32
                && route_dst(r) == Some(GATEWAY)
                && route_oif(r) == Some(index)
        });
        if !gw_route {
            return Err(chk(format!(
                "route {GATEWAY}/32 dev {ifname} is missing in pod netns"
            )));
        }
        let default_route = routes.iter().any(|r| {
            r.header.destination_prefix_length == 0
                && route_gateway(r) == Some(GATEWAY)
                && route_oif(r) == Some(index)
        });
        if !default_route {
            return Err(chk(format!(
                "default route via {GATEWAY} dev {ifname} is missing in pod netns"
            )));
        }

        let neighs: Vec<_> = h
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing neighbours in pod netns"))?;
        let neigh = neighs.iter().find(|n| {
            n.header.ifindex == index
                && n.attributes.iter().any(|a| {
                    matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) if *ip == GATEWAY)
                })
        });
        // ADD made the entry permanent, but a MAC change (the `tuning`
        // plugin) or a neighbour flush legitimately removes it; the
        // datapath then answers the pod's ARP. Whatever the pod has
        // learned must still be the host veth's MAC.
        let lladdr = neigh.and_then(|n| {
            n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => Some(l.as_slice()),
                _ => None,
            })
        });
        if let Some(lladdr) = lladdr.filter(|l| *l != &host_mac[..]) {
            return Err(chk(format!(
                "neighbour {GATEWAY} on {ifname} in pod netns is {}, expected {} (the host veth)",
                format_mac(lladdr),
                format_mac(&host_mac)
            )));
        }
        Ok((index, mac))
    })?;

    Ok(PodInterface {
        host_ifindex,
        host_mac,
        pod_mac,
        pod_ifindex,
        netns_cookie: None,
    })
}

/// Whether `host_ifname` exists in the calling thread's netns.
pub fn host_link_exists(host_ifname: &str) -> Result<bool> {
    Ok(host_link(host_ifname)?.is_some())
}

/// Index and MAC of `host_ifname` in the calling thread's netns, if it exists.
pub fn host_link(host_ifname: &str) -> Result<Option<(u32, [u8; 6])>> {
    if !valid_ifname(host_ifname) {
        return Ok(None);
    }
    run_netlink(None, "host", |h| async move {
        let link = get_link(&h, host_ifname)
            .await
            .map_err(nl(format_args!("looking up {host_ifname}")))?;
        Ok(link.map(|l| (l.header.index, link_mac(&l).unwrap_or_default())))
    })
}

/// Deletes the host veth if create() fails (or panics) after creating it.
struct Rollback<'a> {
    host_ifname: &'a str,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: the original error is what the caller needs.
            let _ = delete(None, "", self.host_ifname);
        }
    }
}

/// Formats a MAC address as lowercase hex bytes separated by colons,
/// e.g. `02:42:ac:11:00:02`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
