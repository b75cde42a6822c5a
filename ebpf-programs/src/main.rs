//! Tern's eBPF datapath: the program entry points; the logic lives in one
//! module per concern (pod routing, socket-LB, service selection, maps).
#![no_std]
#![no_main]
// Atomic adds on map values: core has no atomic types for the BPF target.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod arp;
mod ct;
mod events;
mod lb;
mod maps;
mod masq;
mod overlay;
mod packet;
mod pod;
mod policy;
mod reject;
mod service_nat;
mod sock;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, classifier},
    programs::{SockAddrContext, SockContext, TcContext},
};

/// tc ingress on the host side of each pod veth: every packet a pod sends.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    maps::upgrade_probe();
    pod::from_pod(&ctx)
}

/// In from_pod's place on a pod veth with an ingress qdisc of its own.
#[classifier]
pub fn from_pod_via_qdisc(ctx: TcContext) -> i32 {
    maps::upgrade_probe();
    pod::from_pod_via_qdisc(&ctx)
}

/// tc ingress on the node's underlay devices: traffic from outside.
#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    maps::upgrade_probe();
    pod::from_netdev(&ctx)
}

/// tc egress on the node's underlay devices: masquerade.
#[classifier]
pub fn to_netdev(ctx: TcContext) -> i32 {
    maps::upgrade_probe();
    masq::to_netdev(&ctx)
}

/// tc ingress on the node's VXLAN device: traffic from other nodes' pods.
#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    maps::upgrade_probe();
    overlay::from_overlay(&ctx)
}

/// tc egress on the node's VXLAN device: the node's own traffic to pods
/// on other nodes.
#[classifier]
pub fn to_overlay(ctx: TcContext) -> i32 {
    maps::upgrade_probe();
    overlay::to_overlay(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    maps::upgrade_probe();
    sock::translate_to_backend(&ctx, tern_common::events::point::SOCK_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    maps::upgrade_probe();
    sock::translate_to_backend(&ctx, tern_common::events::point::SOCK_SENDMSG)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    maps::upgrade_probe();
    sock::translate_to_service(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    maps::upgrade_probe();
    sock::translate_to_service(&ctx)
}

#[cgroup_sock(post_bind4)]
pub fn sock_post_bind4(ctx: SockContext) -> i32 {
    maps::upgrade_probe();
    sock::refuse_node_port_bind(&ctx)
}

/// A pod's socket is released: its counted socket-LB connection ends.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    maps::upgrade_probe();
    sock::release(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
