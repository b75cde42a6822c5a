//! Service lookup and backend selection, shared by socket-LB and the
//! per-packet path: the frontend's scheduler (`lb_algorithm`, IPVS's
//! meanings) picks a backend for each new connection, and the open
//! connections of the least-connection family are counted per backend.

use core::ffi::c_void;
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::{bpf_ktime_get_ns, generated::bpf_loop};
use tern_common::{
    AffinityKey, AffinityValue, Backend, ServiceKey, ServiceValue, lb_algorithm, scope,
    service_flags,
};

use crate::maps::{AFFINITY, BACKENDS, CONNECTIONS, LB_TABLES, SERVICES};

/// The master entry of the frontend `addr:port/proto` as pods see it. An
/// External scope entry flagged EXTERNAL_LOCAL (externalTrafficPolicy=Local)
/// has an Internal scope entry beside it with every backend, and that one is
/// the pods' (kube-proxy exempts in-cluster clients from the policy); no
/// other frontend has one. So one lookup answers most packets, which are for
/// no Service at all, and a second is made only for those frontends.
pub fn lookup_service_for_pod(
    addr: u32,
    port: u16,
    proto: u8,
) -> Option<(ServiceKey, ServiceValue)> {
    let mut key = ServiceKey {
        addr,
        port,
        slot: 0,
        proto,
        scope: scope::EXTERNAL,
        pad: 0,
    };
    // SAFETY: values are copied out at once.
    let external = unsafe { SERVICES.get(key) }.copied()?;
    if external.flags & service_flags::EXTERNAL_LOCAL != 0 {
        key.scope = scope::INTERNAL;
        // SAFETY: as above.
        if let Some(internal) = unsafe { SERVICES.get(key) } {
            return Some((key, *internal));
        }
        // Not written yet (or just removed): the External entry serves.
        key.scope = scope::EXTERNAL;
    }
    Some((key, external))
}

/// A chosen backend and its id (the CONNECTIONS key).
#[derive(Clone, Copy)]
pub struct Selected {
    pub id: u32,
    pub backend: Backend,
}

/// A backend of the service: the client's affinity entry if still valid,
/// else the frontend's scheduler decides. `hash`: the flow's hash (random
/// on the socket path); `client`: the client's address (per packet) or
/// network-namespace cookie (socket path), for affinity and sh.
pub fn select_backend(
    master: &ServiceKey,
    service: &ServiceValue,
    hash: u32,
    client: u64,
) -> Option<Selected> {
    if service.count == 0 {
        return None;
    }
    let affinity = service.flags & service_flags::AFFINITY != 0;
    let affinity_key = AffinityKey {
        client,
        rev_nat_id: service.rev_nat_id,
        pad: 0,
    };
    // Milliseconds: whole seconds would keep an entry up to a second past
    // its timeout (the agent bounds the timeout to 86 400 s, so the product
    // fits in u32; wrapping_sub spans the counter's 49-day wrap).
    let now = (unsafe { bpf_ktime_get_ns() } / 1_000_000) as u32;
    if affinity
        && let Some(seen) = unsafe { AFFINITY.get(affinity_key) }
        && now.wrapping_sub(seen.last_used_ms) <= service.affinity_timeout.saturating_mul(1000)
        && let Some(backend) = unsafe { BACKENDS.get(seen.backend_id) }
    {
        let chosen = Selected {
            id: seen.backend_id,
            backend: *backend,
        };
        remember(&affinity_key, chosen.id, now);
        return Some(chosen);
    }
    let id = schedule(master, service, hash, client)?;
    let backend = *unsafe { BACKENDS.get(id) }?;
    if affinity {
        remember(&affinity_key, id, now);
    }
    Some(Selected { id, backend })
}

fn remember(key: &AffinityKey, backend_id: u32, now_ms: u32) {
    let _ = AFFINITY.insert(
        key,
        AffinityValue {
            backend_id,
            last_used_ms: now_ms,
        },
        0,
    );
}

/// The backend id the frontend's scheduler picks for a new connection:
/// by a position in its lookup table (maglev, sh, dh, wrr) or by a slot.
#[inline(never)]
fn schedule(master: &ServiceKey, service: &ServiceValue, hash: u32, client: u64) -> Option<u32> {
    let count = u32::from(service.count);
    let slot = match service.algorithm {
        lb_algorithm::MAGLEV => return table_entry(service, hash),
        // The client's address in host order, as IPVS hashes it (a netns
        // cookie on the socket path: folded, any order).
        lb_algorithm::SH => {
            let client = u32::from_be(client as u32 ^ (client >> 32) as u32);
            return table_entry(service, lb_algorithm::hash_bucket(client));
        }
        lb_algorithm::DH => {
            return table_entry(
                service,
                lb_algorithm::hash_bucket(u32::from_be(master.addr)),
            );
        }
        lb_algorithm::WRR => return table_entry(service, next_position(master)?),
        lb_algorithm::RR => next_position(master)?.checked_rem(count)?,
        lb_algorithm::LC | lb_algorithm::WLC | lb_algorithm::SED | lb_algorithm::NQ => {
            least_loaded(master, service.algorithm, count, hash)?
        }
        _ => hash.checked_rem(count)?,
    };
    let key = ServiceKey {
        slot: slot as u16 + 1,
        ..*master
    };
    // SAFETY: read at once.
    unsafe { SERVICES.get(key) }.map(|v| v.backend_id)
}

/// The backend id at `position` (wrapped) of the frontend's lookup table.
// Not inlined: where the caller's position is known small (sh, dh), LLVM
// would drop the index's bounds check, and the verifier cannot bound the
// remainder by itself.
#[inline(never)]
fn table_entry(service: &ServiceValue, position: u32) -> Option<u32> {
    let index = position.checked_rem(u32::from(service.table_size))? as usize;
    // SAFETY: read at once.
    let table = unsafe { LB_TABLES.get(service.rev_nat_id) }?;
    table.backend_ids.get(index).copied()
}

/// rr and wrr: the frontend's next position, from one counter per frontend
/// (in its master entry) that every CPU advances. BPF's atomic add returns
/// nothing without cpu v3, which aya-build does not let us choose: the
/// turn is read, then the counter advanced, so two connections opened at
/// the same instant on two CPUs may share a turn.
fn next_position(master: &ServiceKey) -> Option<u32> {
    let value = SERVICES.get_ptr_mut(master)?;
    // SAFETY: a map value, alive while the entry is; only ever changed
    // atomically by the datapath (the agent replaces the whole entry).
    unsafe {
        let position = &raw mut (*value).position;
        let turn = core::ptr::read_volatile(position);
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(position, 1);
        Some(turn)
    }
}

/// The scan state of the least-connection family.
struct Scan {
    master: ServiceKey,
    algorithm: u8,
    count: u32,
    /// Slots are scanned from a random one, so ties do not all go to the
    /// first backend (IPVS takes the first of its list).
    start: u32,
    best_slot: u32,
    best_connections: u32,
    best_weight: u32,
}

/// lc, wlc, sed, nq over every slot (IPVS's definitions, counting open
/// connections): the slot index of the least loaded backend.
#[inline(never)]
fn least_loaded(master: &ServiceKey, algorithm: u8, count: u32, hash: u32) -> Option<u32> {
    let mut scan = Scan {
        master: *master,
        algorithm,
        count,
        start: hash.checked_rem(count)?,
        best_slot: u32::MAX,
        best_connections: 0,
        best_weight: 1,
    };
    // SAFETY: the callback only reads and writes `scan` through its pointer.
    unsafe { bpf_loop(count, scan_slot as *mut c_void, (&raw mut scan).cast(), 0) };
    (scan.best_slot != u32::MAX).then_some(scan.best_slot)
}

extern "C" fn scan_slot(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the `Scan` least_loaded passed it.
    let scan = unsafe { &mut *ctx.cast::<Scan>() };
    let slot = (scan.start + index as u32) % scan.count.max(1);
    let key = ServiceKey {
        slot: slot as u16 + 1,
        ..scan.master
    };
    // SAFETY: read at once.
    let Some(entry) = (unsafe { SERVICES.get(key) }).copied() else {
        return 0;
    };
    let connections = open_connections(entry.backend_id);
    let weight = u64::from(entry.weight.max(1));
    let (have, best_have) = (u64::from(connections), u64::from(scan.best_connections));
    let best_weight = u64::from(scan.best_weight);
    // Never queue: an idle backend is taken at once, whatever it weighs.
    let idle = scan.algorithm == lb_algorithm::NQ && connections == 0;
    let better = idle
        || scan.best_slot == u32::MAX
        || match scan.algorithm {
            // Least overhead; weights only exclude (weight 0 is no slot).
            lb_algorithm::LC => have < best_have,
            // Least connections per weight: have/w < best/bw.
            lb_algorithm::WLC => have * best_weight < best_have * weight,
            // Shortest expected delay: (have+1)/w < (best+1)/bw.
            _ => (have + 1) * best_weight < (best_have + 1) * weight,
        };
    if better {
        scan.best_slot = slot;
        scan.best_connections = connections;
        scan.best_weight = weight as u32;
    }
    // 1 stops the loop.
    i64::from(idle)
}

/// A backend's open connections (0 when not counted).
fn open_connections(backend_id: u32) -> u32 {
    // SAFETY: read at once; a transiently negative count (a close counted
    // before its open) reads as 0.
    let raw = unsafe { CONNECTIONS.get(backend_id) }.copied().unwrap_or(0);
    (raw as i32).max(0) as u32
}

/// Adds `delta` (+1 opened, -1 closed) to a backend's open connections.
pub fn count_connection(backend_id: u32, delta: i32) {
    if let Some(value) = CONNECTIONS.get_ptr_mut(backend_id) {
        // SAFETY: a map value, changed only atomically by the datapath.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(value, delta as u32) };
    }
}

/// Whether new connections to this frontend are counted per backend: the
/// least-connection schedulers, TCP only (a UDP flow has no close).
pub fn counts_connections(service: &ServiceValue, proto: u8) -> bool {
    proto == crate::packet::IPPROTO_TCP && lb_algorithm::counts_connections(service.algorithm)
}
