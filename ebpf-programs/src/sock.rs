//! Socket-LB: Service addresses translated when a pod's socket connects or
//! sends (cgroup v2 connect4/sendmsg4), and shown again when it reads the
//! peer (recvmsg4/getpeername4). No per-packet NAT for these connections.

use aya_ebpf::{
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, generated::bpf_set_retval,
    },
    programs::{SockAddrContext, SockContext},
};
use tern_common::events::{point, service_path};
use tern_common::{DropReason, Reason, RevNat, ServiceKey, SockRevNatKey, scope, service_flags};

use crate::events;
use crate::lb::{count_connection, counts_connections, lookup_service_for_pod, select_backend};
use crate::maps::{LB_SOCKETS, SERVICES, SOCK_REVNAT, config, count};
use crate::packet::Packet;

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EADDRINUSE: i32 = 98;

/// connect4 and sendmsg4: a Service address becomes one of its backends.
/// `at`: which of the two (`point::SOCK_CONNECT` / `SOCK_SENDMSG`).
pub fn translate_to_backend(ctx: &SockAddrContext, at: u8) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context fields are readable in these hooks.
    let (addr, port, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    let Some((master, service)) = lookup_service_for_pod(addr, port, proto) else {
        let cfg = config();
        if cfg.service_cidr_mask != 0 && addr & cfg.service_cidr_mask == cfg.service_cidr_addr {
            // A ClusterIP no Service (or port) uses: refuse rather than let
            // the connection time out somewhere.
            count(Reason::SockLbUnknownService);
            refuse(ctx, DropReason::UnknownService, at);
            return DENY;
        }
        return ALLOW;
    };
    if service.flags & service_flags::SOURCE_RANGES != 0 {
        // The socket's source is not known yet: its packets are judged
        // (and translated) per packet, with their real source.
        return ALLOW;
    }
    let client = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let hash = unsafe { bpf_get_prandom_u32() };
    let Some(chosen) = select_backend(&master, &service, hash, client) else {
        if service.flags & service_flags::NO_LOCAL_BACKEND != 0 {
            // Dropped, not refused (kube-proxy's DROP): sent on as it is,
            // the per-packet path drops (and reports) its packets.
            return ALLOW;
        }
        // No backend: refuse at once, like kube-proxy's REJECT.
        count(Reason::SockLbNoBackend);
        refuse(ctx, DropReason::NoBackend, at);
        return DENY;
    };
    let backend = chosen.backend;
    unsafe {
        (*sa).user_ip4 = backend.addr;
        (*sa).user_port = backend.port as u32;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if at == point::SOCK_CONNECT && counts_connections(&service, proto) {
        count_socket(cookie, chosen.id);
    }
    let key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        pad: 0,
    };
    // A datagram socket sends many times to one backend: one event for
    // each backend it starts sending to, as for a new connection.
    // SAFETY: the value is compared at once.
    let fresh = unsafe { SOCK_REVNAT.get(key) }.is_none_or(|f| f.addr != addr || f.port != port);
    let _ = SOCK_REVNAT.insert(key, RevNat { addr, port, pad: 0 }, 0);
    count(Reason::SockLbTranslated);
    if fresh {
        let p = socket_packet(addr, port, proto);
        events::service(
            &p,
            backend.addr,
            backend.port,
            service_path::SOCKET,
            at,
            client,
        );
    }
    ALLOW
}

/// A connecting socket counts as an open connection of its backend until
/// it is released; a socket that connects again moves its count.
#[inline(never)]
fn count_socket(cookie: u64, backend_id: u32) {
    // SAFETY: read at once.
    if let Some(previous) = unsafe { LB_SOCKETS.get(cookie) }.copied()
        && LB_SOCKETS.remove(cookie).is_ok()
    {
        count_connection(previous, -1);
    }
    if LB_SOCKETS.insert(cookie, backend_id, 0).is_ok() {
        count_connection(backend_id, 1);
    }
}

/// sock_release: a counted socket-LB connection ends. Only the program
/// that removes the socket's entry takes its count back, so two attached
/// at once (an agent replacing its links) count it once.
pub fn release(ctx: &SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    // SAFETY: read at once.
    if let Some(backend_id) = unsafe { LB_SOCKETS.get(cookie) }.copied()
        && LB_SOCKETS.remove(cookie).is_ok()
    {
        count_connection(backend_id, -1);
    }
    ALLOW
}

/// ECONNREFUSED for the caller, counted and reported.
fn refuse(ctx: &SockAddrContext, reason: DropReason, at: u8) {
    // SAFETY: plain helper calls.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    let sa = ctx.sock_addr;
    let (addr, port, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    let p = socket_packet(addr, port, proto);
    events::drop_socket(&p, reason, at, unsafe {
        bpf_get_netns_cookie(ctx.sock_addr.cast())
    });
}

/// What a socket call tells of its flow: the destination it asked for
/// (the agent knows the pod, hence the source, by the netns cookie).
fn socket_packet(addr: u32, port: u16, proto: u8) -> Packet {
    let mut p = Packet::empty();
    p.proto = proto;
    p.daddr = addr;
    p.dport = port;
    p
}

/// recvmsg4 and getpeername4: a backend address becomes its Service again.
pub fn translate_to_service(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockRevNatKey {
        cookie,
        addr,
        port,
        pad: 0,
    };
    if let Some(front) = unsafe { SOCK_REVNAT.get(key) } {
        unsafe {
            (*sa).user_ip4 = front.addr;
            (*sa).user_port = front.port as u32;
        }
        count(Reason::SockLbRevNat);
    }
    ALLOW
}

/// post_bind4: a local bind to a NodePort's port would shadow the Service.
pub fn refuse_node_port_bind(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    let (port_host, proto) = unsafe { ((*sk).src_port, (*sk).protocol as u8) };
    let key = ServiceKey {
        addr: 0,
        port: (port_host as u16).to_be(),
        slot: 0,
        proto,
        scope: scope::EXTERNAL,
        pad: 0,
    };
    match unsafe { SERVICES.get(key) } {
        Some(v) if v.flags & service_flags::NODE_PORT != 0 => {
            count(Reason::SockLbBindRefused);
            let p = socket_packet(0, key.port, proto);
            events::drop(&p, DropReason::NodePortBind, point::SOCK_BIND, 0);
            unsafe { bpf_set_retval(-EADDRINUSE) };
            DENY
        }
        _ => ALLOW,
    }
}
