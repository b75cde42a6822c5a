//! Map keys and values shared by Tern's eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side reads it with
//! raw loads, the user side (feature "user") writes it through aya maps.
#![no_std]

/// Map names, as the eBPF object defines them and the agent pins them.
pub mod maps {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const METRICS: &str = "METRICS";
}

/// Program names (the Rust function names in tern-ebpf).
pub mod programs {
    /// tc ingress on the host side of each pod veth: traffic leaving a pod.
    pub const FROM_POD: &str = "from_pod";
}

/// Default capacity of the ENDPOINTS map (local pods on one node).
pub const ENDPOINTS_MAX: u32 = 16384;

/// ENDPOINTS value: where a local pod lives. Key: the pod's IPv4 address
/// as a `u32` in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the host-side veth; the packet is redirected to its peer.
    pub ifindex: u32,
    pub flags: u32,
    /// MAC of the pod's interface (destination MAC on delivery).
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth (source MAC on delivery: the pod's gateway).
    pub host_mac: [u8; 6],
}

/// Why a packet took the path it took; index into the per-CPU METRICS array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Delivered straight into a local pod with bpf_redirect_peer.
    RedirectLocalPod = 0,
    /// Not for a local pod: handed to the node's own stack.
    PassToStack = 1,
    /// Not IPv4, or too short to parse: left to the kernel untouched.
    NotIpv4 = 2,
    /// The redirect helper refused (target gone): left to the kernel.
    RedirectFailed = 3,
}

impl Reason {
    pub const COUNT: u32 = 4;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::RedirectLocalPod,
        Reason::PassToStack,
        Reason::NotIpv4,
        Reason::RedirectFailed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::RedirectLocalPod => "redirect_local_pod",
            Reason::PassToStack => "pass_to_stack",
            Reason::NotIpv4 => "not_ipv4",
            Reason::RedirectFailed => "redirect_failed",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: EndpointInfo is #[repr(C)] plain data with no padding holes
    // that matter to the kernel (all fields are integers or byte arrays).
    unsafe impl aya::Pod for super::EndpointInfo {}
}
