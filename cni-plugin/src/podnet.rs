//! Pod-side wiring: the veth pair between the node and a pod, the pod's
//! address, its routes through the link-local gateway and the static
//! neighbour entry for that gateway.
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
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Link-local gateway every pod routes through. It answers with the host
/// veth's MAC through a permanent neighbour entry in the pod, so the host
/// side needs neither an address nor proxy-ARP.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

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
}

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// The netns path does not exist or is not a network namespace.
    #[error("network namespace {} does not exist or is not a network namespace", .0.display())]
    NetnsMissing(PathBuf),
    /// CNI_IFNAME already exists in the pod, or host_ifname on the host.
    #[error("interface {0} already exists")]
    InterfaceExists(String),
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
    run_netlink(Some(&ns), "pod", |h| async move {
        if get_link(&h, spec.ifname)
            .await
            .map_err(nl(format_args!("looking up {} in pod netns", spec.ifname)))?
            .is_some()
        {
            return Err(PodNetError::InterfaceExists(spec.ifname.to_string()));
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
        Ok(())
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
                fmt_mac(&host_mac)
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
    })
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
/// gateway route, the default route via [`GATEWAY`] and the permanent
/// neighbour entry for the gateway with the host veth's MAC.
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
        let Some(neigh) = neigh else {
            return Err(chk(format!(
                "neighbour entry for {GATEWAY} on {ifname} is missing in pod netns"
            )));
        };
        let lladdr = neigh.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(l) => Some(l.as_slice()),
            _ => None,
        });
        if neigh.header.state != NeighbourState::Permanent || lladdr != Some(&host_mac[..]) {
            return Err(chk(format!(
                "neighbour {GATEWAY} on {ifname} in pod netns is {:?} {:?}, expected PERMANENT {}",
                neigh.header.state,
                lladdr.map(fmt_mac),
                fmt_mac(&host_mac)
            )));
        }
        Ok((index, mac))
    })?;

    Ok(PodInterface {
        host_ifindex,
        host_mac,
        pod_mac,
        pod_ifindex,
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

/// Runs `f` with an rtnetlink handle on a dedicated thread: in the calling
/// thread's netns if `netns` is None (a new thread inherits its creator's
/// netns), otherwise after `setns(CLONE_NEWNET)` into `netns`. The thread
/// owns a current-thread tokio runtime and the netlink connection, and ends
/// with the call, so the namespace switch never leaks anywhere.
fn run_netlink<T, F, Fut>(netns: Option<&OwnedFd>, side: &'static str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T>>,
{
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name(format!("tern-netlink-{side}"))
            .spawn_scoped(s, move || {
                if let Some(fd) = netns {
                    setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(nl("entering pod network namespace (setns)"))?;
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(nl(format_args!("building {side} tokio runtime")))?;
                rt.block_on(async move {
                    let (conn, handle, _) = rtnetlink::new_connection()
                        .map_err(nl(format_args!("opening {side} netlink socket")))?;
                    let conn = tokio::spawn(conn);
                    let out = f(handle).await;
                    conn.abort();
                    out
                })
            })
            .map_err(nl(format_args!("spawning {side} netlink thread")))?;
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Opens a netns path. `Ok(None)` if it does not exist or is not a network
/// namespace (e.g. the bind-mount target of a deleted `ip netns`).
fn open_netns(path: &Path) -> Result<Option<OwnedFd>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            return Ok(None);
        }
        Err(e) => return Err(nl(format_args!("opening netns {}", path.display()))(e)),
    };
    let fs = fstatfs(&file).map_err(nl(format_args!("statfs on netns {}", path.display())))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Ok(None);
    }
    // NS_GET_NSTYPE = _IO(0xb7, 0x3): which kind of namespace this nsfs file is.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: the ioctl takes no argument and only reads the open fd.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind < 0 {
        return Err(nl(format_args!("NS_GET_NSTYPE on {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    if kind != libc::CLONE_NEWNET {
        return Ok(None);
    }
    Ok(Some(file.into()))
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
}

fn validate_ifname(what: &str, name: &str) -> Result<()> {
    if valid_ifname(name) {
        Ok(())
    } else {
        Err(PodNetError::Netlink(format!(
            "invalid {what} {name:?}: must be 1-{MAX_IFNAME_LEN} bytes without '/', ':' or whitespace"
        )))
    }
}

/// Name of the veth peer until it is renamed inside the pod: "tmp" followed
/// by the last 12 bytes of the host name (at most 15 bytes).
fn temp_peer_name(host_ifname: &str) -> String {
    let mut start = host_ifname.len().saturating_sub(MAX_IFNAME_LEN - 3);
    while !host_ifname.is_char_boundary(start) {
        start += 1;
    }
    format!("tmp{}", &host_ifname[start..])
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// The link called `name`, or None if there is none (ENODEV).
async fn get_link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn link_exists(h: &Handle, name: &str) -> Result<bool> {
    Ok(get_link(h, name)
        .await
        .map_err(nl(format_args!("looking up {name}")))?
        .is_some())
}

/// Deletes a link; Ok(false) if it was already gone.
async fn delete_link(h: &Handle, index: u32, name: &str) -> Result<bool> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(nl(format_args!("deleting {name}"))(e)),
    }
}

async fn dump_main_v4_routes(h: &Handle) -> Result<Vec<RouteMessage>> {
    let routes: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing IPv4 routes"))?;
    Ok(routes
        .into_iter()
        .filter(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .collect())
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn route_dst(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

fn route_gateway(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
fn link_peer_index(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

fn fmt_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    //! These tests need root. They never touch the machine's own namespace:
    //! both the "pod" and the "host" are fresh `ip netns` namespaces, and the
    //! functions under test are called from a thread that entered the "host"
    //! one (their worker threads inherit it, see
    //! `new_thread_inherits_creator_thread_netns`). Names carry the pid so
    //! concurrent runs do not collide; a Drop guard deletes the namespaces.

    use super::*;

    use std::os::unix::fs::MetadataExt;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn is_root() -> bool {
        if nix::unistd::Uid::effective().is_root() {
            true
        } else {
            eprintln!("skipping podnet test: needs root (CAP_NET_ADMIN, ip netns)");
            false
        }
    }

    /// A named netns (`ip netns add`), deleted on drop (also when unwinding).
    struct Netns {
        name: String,
    }

    impl Netns {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("tern-pn-{}-{n}", std::process::id());
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .expect("running ip netns add");
            assert!(
                out.status.success(),
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Netns { name }
        }

        fn path(&self) -> PathBuf {
            Path::new("/run/netns").join(&self.name)
        }

        /// `ip -n <self> <cmd>` (cmd split on whitespace); panics on failure.
        fn ip(&self, cmd: &str) -> String {
            let (ok, out) = self.try_ip(cmd);
            assert!(ok, "ip -n {} {cmd} failed: {out}", self.name);
            out
        }

        fn try_ip(&self, cmd: &str) -> (bool, String) {
            let out = Command::new("ip")
                .arg("-n")
                .arg(&self.name)
                .args(cmd.split_whitespace())
                .output()
                .expect("running ip");
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            (out.status.success(), text)
        }

        /// Runs `f` on a new thread that has entered this netns. Functions
        /// under test called from there treat this netns as "the host".
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let file = File::open(self.path()).expect("opening test netns");
            std::thread::scope(|s| {
                s.spawn(move || {
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into test netns");
                    f()
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
        }
    }

    fn netns_inode(path: &Path) -> u64 {
        std::fs::metadata(path).expect("stat netns").ino()
    }

    fn thread_netns() -> u64 {
        netns_inode(Path::new("/proc/thread-self/ns/net"))
    }

    fn spec<'a>(pod: &'a Path, ifname: &'a str, host_ifname: &'a str) -> PodInterfaceSpec<'a> {
        PodInterfaceSpec {
            netns: pod,
            ifname,
            host_ifname,
            address: Ipv4Addr::new(10, 77, 3, 4),
            mtu: 1400,
        }
    }

    #[test]
    fn temp_peer_name_fits() {
        assert_eq!(temp_peer_name("tern0123456789a"), "tmpn0123456789a");
        assert_eq!(temp_peer_name("veth1"), "tmpveth1");
        assert!(temp_peer_name("ééééééé").len() <= MAX_IFNAME_LEN);
        assert!(!valid_ifname("abcdefghijklmnop"));
        assert!(!valid_ifname("a/b"));
        assert!(valid_ifname("eth0"));
    }

    /// The whole module relies on this: a std::thread starts in the netns of
    /// the thread that spawned it, not in the process's "main" netns.
    #[test]
    fn new_thread_inherits_creator_thread_netns() {
        if !is_root() {
            return;
        }
        let host = Netns::new();
        let host_ino = netns_inode(&host.path());
        let caller_ino = thread_netns();
        assert_ne!(host_ino, caller_ino);
        let (inside, grandchild) = host.run(|| {
            let grandchild = std::thread::spawn(thread_netns).join().unwrap();
            (thread_netns(), grandchild)
        });
        assert_eq!(inside, host_ino);
        assert_eq!(grandchild, host_ino, "spawned thread did not inherit netns");
        // And the caller's thread was never moved.
        assert_eq!(thread_netns(), caller_ino);
    }

    #[test]
    fn create_check_delete_lifecycle() {
        if !is_root() {
            return;
        }
        let host = Netns::new();
        let pod = Netns::new();
        let pod_path = pod.path();
        let s = spec(&pod_path, "eth0", "ternpn0");
        let caller_ino = thread_netns();

        let pi = host.run(|| create(&s)).expect("create");
        assert_eq!(thread_netns(), caller_ino);
        assert_eq!(host.run(|| check(&s)).expect("check"), pi);
        assert_eq!(
            host.run(|| host_link("ternpn0")).unwrap(),
            Some((pi.host_ifindex, pi.host_mac))
        );
        // The test thread's own netns has no such link (read-only look-up).
        assert!(!host_link_exists("ternpn0").unwrap());

        // Pod side, as `ip` sees it.
        let link = pod.ip("-o link show eth0");
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        assert!(
            link.contains(&format!("link/ether {}", fmt_mac(&pi.pod_mac))),
            "{link}"
        );
        assert!(
            link.contains(&format!("eth0@if{}", pi.host_ifindex)),
            "{link}"
        );
        assert!(link.starts_with(&format!("{}: ", pi.pod_ifindex)), "{link}");
        let lo = pod.ip("-o link show lo");
        assert!(lo.contains(",UP"), "{lo}");
        let addr = pod.ip("-o -4 addr show dev eth0");
        assert!(addr.contains("inet 10.77.3.4/32"), "{addr}");
        let routes = pod.ip("-4 route show");
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{routes}"
        );
        let gw = pod.ip("-4 route show 169.254.1.1/32");
        assert!(
            gw.contains("169.254.1.1 dev eth0") && gw.contains("scope link"),
            "{gw}"
        );
        let neigh = pod.ip("neigh show dev eth0");
        assert!(
            neigh.contains(&format!(
                "169.254.1.1 lladdr {} PERMANENT",
                fmt_mac(&pi.host_mac)
            )),
            "{neigh}"
        );
        // Only lo and eth0 in the pod: the temporary name is gone.
        assert_eq!(pod.ip("-o link show").lines().count(), 2);
        // Host side.
        let hlink = host.ip("-o link show ternpn0");
        assert!(
            hlink.contains("mtu 1400") && hlink.contains(",UP"),
            "{hlink}"
        );
        assert!(
            hlink.contains(&format!("link/ether {}", fmt_mac(&pi.host_mac))),
            "{hlink}"
        );
        let hroute = host.ip("-4 route show 10.77.3.4/32");
        assert!(hroute.contains("10.77.3.4 dev ternpn0"), "{hroute}");
        assert!(hroute.contains("scope link"), "{hroute}");

        // Creating again fails before touching anything.
        let err = host.run(|| create(&s)).unwrap_err();
        assert!(
            matches!(&err, PodNetError::InterfaceExists(n) if n == "eth0"),
            "{err:?}"
        );
        let other_host = spec(&pod_path, "eth0", "ternpn1");
        let err = host.run(|| create(&other_host)).unwrap_err();
        assert!(
            matches!(&err, PodNetError::InterfaceExists(n) if n == "eth0"),
            "{err:?}"
        );
        assert!(!host.run(|| host_link_exists("ternpn1")).unwrap());
        let other_pod_if = spec(&pod_path, "eth1", "ternpn0");
        let err = host.run(|| create(&other_pod_if)).unwrap_err();
        assert!(
            matches!(&err, PodNetError::InterfaceExists(n) if n == "ternpn0"),
            "{err:?}"
        );
        assert!(!pod.try_ip("link show eth1").0);
        assert_eq!(host.run(|| check(&s)).expect("check still ok"), pi);

        // Delete, twice.
        host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
            .expect("delete");
        assert!(!host.run(|| host_link_exists("ternpn0")).unwrap());
        assert!(!pod.try_ip("link show eth0").0);
        assert!(host.ip("-4 route show 10.77.3.4/32").trim().is_empty());
        host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
            .expect("second delete");
        host.run(|| delete(None, "eth0", "ternpn0"))
            .expect("delete without netns");
        let err = host.run(|| check(&s)).unwrap_err();
        assert!(matches!(err, PodNetError::Check(_)), "{err:?}");

        // Recreate, then delete after the pod netns is gone.
        host.run(|| create(&s)).expect("recreate");
        drop(pod);
        host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
            .expect("delete, netns gone");
        assert!(!host.run(|| host_link_exists("ternpn0")).unwrap());
        host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
            .expect("delete again");
        assert_eq!(host.ip("-o link show").lines().count(), 1);
    }

    #[test]
    fn delete_removes_pod_end_when_host_end_is_gone() {
        if !is_root() {
            return;
        }
        let host = Netns::new();
        let pod = Netns::new();
        let pod_path = pod.path();
        // A stray interface called like CNI_IFNAME, with no host veth. (No
        // dummy driver in this kernel: a veth pair inside the pod instead.)
        pod.ip("link add eth0 type veth peer name stray0");
        host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
            .expect("delete");
        assert!(!pod.try_ip("link show eth0").0);
        assert!(!pod.try_ip("link show stray0").0);
    }

    #[test]
    fn check_reports_differences() {
        if !is_root() {
            return;
        }
        let host = Netns::new();
        let pod = Netns::new();
        let pod_path = pod.path();
        let s = spec(&pod_path, "eth0", "ternpn0");
        let pi = host.run(|| create(&s)).expect("create");
        let host_mac = fmt_mac(&pi.host_mac);

        let expect_check = |needle: &str| {
            let err = host.run(|| check(&s)).unwrap_err();
            match &err {
                PodNetError::Check(msg) => assert!(msg.contains(needle), "{msg}"),
                other => panic!("expected Check(..{needle}..), got {other:?}"),
            }
        };
        let expect_ok = |what: &str| {
            if let Err(e) = host.run(|| check(&s)) {
                panic!("check after {what}: {e:?}");
            }
        };

        pod.ip("link set eth0 mtu 1300");
        expect_check("MTU");
        pod.ip("link set eth0 mtu 1400");
        expect_ok("restoring MTU");

        pod.ip("route del default");
        expect_check("default route");
        pod.ip("route add default via 169.254.1.1 dev eth0");
        expect_ok("restoring default route");

        pod.ip("neigh replace 169.254.1.1 lladdr 02:00:00:00:00:01 dev eth0 nud permanent");
        expect_check("expected PERMANENT");
        pod.ip(&format!(
            "neigh replace 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"
        ));
        expect_ok("restoring neighbour");

        pod.ip("addr del 10.77.3.4/32 dev eth0");
        expect_check("10.77.3.4/32");
        // Removing the last IPv4 address of a device flushes its routes and
        // its neighbour entries (permanent ones included) as well.
        pod.ip("addr add 10.77.3.4/32 dev eth0");
        expect_check("route 169.254.1.1/32");
        pod.ip("route add 169.254.1.1/32 dev eth0 scope link");
        pod.ip("route add default via 169.254.1.1 dev eth0");
        expect_check("neighbour entry");
        pod.ip(&format!(
            "neigh add 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"
        ));
        expect_ok("restoring address, routes and neighbour");

        host.ip("route del 10.77.3.4/32");
        expect_check("host route");
        host.ip("route add 10.77.3.4/32 dev ternpn0 scope link");
        expect_ok("restoring host route");

        host.ip("link set ternpn0 down");
        expect_check("not up");
        host.ip("link set ternpn0 up");
        // Setting a device down flushes the routes through it.
        expect_check("host route");
        host.ip("route add 10.77.3.4/32 dev ternpn0 scope link");
        expect_ok("setting host veth up and restoring its route");

        let wrong = spec(&pod_path, "eth0", "ternpnX");
        let err = host.run(|| check(&wrong)).unwrap_err();
        assert!(matches!(err, PodNetError::Check(_)), "{err:?}");

        host.run(|| delete(Some(&pod_path), "eth0", "ternpn0"))
            .expect("delete");
    }

    #[test]
    fn missing_netns_fails_and_leaves_nothing() {
        if !is_root() {
            return;
        }
        let host = Netns::new();
        let missing = PathBuf::from(format!("/run/netns/tern-pn-{}-missing", std::process::id()));
        let s = spec(&missing, "eth0", "ternpn0");
        let err = host.run(|| create(&s)).unwrap_err();
        assert!(
            matches!(&err, PodNetError::NetnsMissing(p) if *p == missing),
            "{err:?}"
        );
        assert!(!host.run(|| host_link_exists("ternpn0")).unwrap());
        let err = host.run(|| check(&s)).unwrap_err();
        assert!(matches!(err, PodNetError::NetnsMissing(_)), "{err:?}");
        host.run(|| delete(Some(&missing), "eth0", "ternpn0"))
            .expect("delete");

        // Paths that exist but are not network namespaces.
        let not_ns = std::env::temp_dir().join(format!("tern-pn-{}-file", std::process::id()));
        std::fs::write(&not_ns, b"").unwrap();
        for path in [not_ns.as_path(), Path::new("/proc/self/ns/mnt")] {
            let s = spec(path, "eth0", "ternpn0");
            let err = host.run(|| create(&s)).unwrap_err();
            assert!(
                matches!(err, PodNetError::NetnsMissing(_)),
                "{path:?}: {err:?}"
            );
            host.run(|| delete(Some(path), "eth0", "ternpn0"))
                .expect("delete");
        }
        let _ = std::fs::remove_file(&not_ns);

        let links = host.ip("-o link show");
        assert_eq!(links.lines().count(), 1, "only lo expected: {links}");
    }

    #[test]
    fn failure_after_veth_creation_rolls_back() {
        if !is_root() {
            return;
        }
        let host = Netns::new();
        let pod = Netns::new();
        let pod_path = pod.path();
        // A default route already in the pod makes step (4) fail late.
        pod.ip("link add d0 type veth peer name d1");
        pod.ip("link set d0 up");
        pod.ip("route add default dev d0");

        let s = spec(&pod_path, "eth0", "ternpn0");
        let err = host.run(|| create(&s)).unwrap_err();
        match &err {
            PodNetError::Netlink(msg) => assert!(msg.contains("default route"), "{msg}"),
            other => panic!("expected Netlink error, got {other:?}"),
        }
        assert!(!host.run(|| host_link_exists("ternpn0")).unwrap());
        let links = host.ip("-o link show");
        assert_eq!(links.lines().count(), 1, "only lo expected: {links}");
        let pod_links = pod.ip("-o link show");
        assert_eq!(
            pod_links.lines().count(),
            3,
            "only lo, d0, d1 expected: {pod_links}"
        );
        assert!(host.ip("-4 route show").trim().is_empty());

        // An MTU the veth driver refuses fails at creation; nothing left.
        pod.ip("route del default");
        let big = PodInterfaceSpec { mtu: 1 << 20, ..s };
        let err = host.run(|| create(&big)).unwrap_err();
        assert!(matches!(err, PodNetError::Netlink(_)), "{err:?}");
        assert!(!host.run(|| host_link_exists("ternpn0")).unwrap());
        assert_eq!(pod.ip("-o link show").lines().count(), 3);

        // With the obstacle gone the same spec works.
        host.run(|| create(&s)).expect("create");
        host.run(|| check(&s)).expect("check");
    }
}
