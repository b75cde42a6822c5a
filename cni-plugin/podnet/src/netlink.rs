//! Low-level rtnetlink helpers for [`super`]: the per-namespace netlink
//! worker thread, netns and interface-name checks, and accessors for link
//! and route messages.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use futures::TryStreamExt;
use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{PodNetError, Result, nl};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub(super) const MAX_IFNAME_LEN: usize = 15;

/// Runs `f` with an rtnetlink handle on a dedicated thread: in the calling
/// thread's netns if `netns` is None (a new thread inherits its creator's
/// netns), otherwise after `setns(CLONE_NEWNET)` into `netns`. The thread
/// owns a current-thread tokio runtime and the netlink connection, and ends
/// with the call, so the namespace switch never leaks anywhere.
pub(super) fn run_netlink<T, F, Fut>(netns: Option<&OwnedFd>, side: &'static str, f: F) -> Result<T>
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
pub(super) fn open_netns(path: &Path) -> Result<Option<OwnedFd>> {
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

pub(super) fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
}

pub(super) fn validate_ifname(what: &str, name: &str) -> Result<()> {
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
pub(super) fn temp_peer_name(host_ifname: &str) -> String {
    let mut start = host_ifname.len().saturating_sub(MAX_IFNAME_LEN - 3);
    while !host_ifname.is_char_boundary(start) {
        start += 1;
    }
    format!("tmp{}", &host_ifname[start..])
}

pub(super) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// The link called `name`, or None if there is none (ENODEV).
pub(super) async fn get_link(
    h: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) async fn link_exists(h: &Handle, name: &str) -> Result<bool> {
    Ok(get_link(h, name)
        .await
        .map_err(nl(format_args!("looking up {name}")))?
        .is_some())
}

/// Deletes a link; Ok(false) if it was already gone.
pub(super) async fn delete_link(h: &Handle, index: u32, name: &str) -> Result<bool> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(nl(format_args!("deleting {name}"))(e)),
    }
}

pub(super) async fn dump_main_v4_routes(h: &Handle) -> Result<Vec<RouteMessage>> {
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

pub(super) fn route_dst(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

pub(super) fn route_gateway(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

pub(super) fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

pub(super) fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

pub(super) fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
        _ => None,
    })
}

pub(super) fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
pub(super) fn link_peer_index(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}
