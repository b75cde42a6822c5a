//! Service lookup and backend selection, shared by socket-LB and (later)
//! the per-packet path.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use tern_common::{
    AffinityKey, AffinityValue, Backend, ServiceKey, ServiceValue, scope, service_flags,
};

use crate::maps::{AFFINITY, BACKENDS, MAGLEV, SERVICES};

/// The master entry of the frontend `addr:port/proto` as pods see it: the
/// Internal scope entry (only present with externalTrafficPolicy=Local)
/// wins over the External one.
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
        scope: scope::INTERNAL,
        pad: 0,
    };
    // SAFETY: values are copied out at once.
    if let Some(v) = unsafe { SERVICES.get(key) } {
        return Some((key, *v));
    }
    key.scope = scope::EXTERNAL;
    unsafe { SERVICES.get(key) }.map(|v| (key, *v))
}

/// A backend of the service: the client's affinity entry if still valid,
/// else by Maglev table or uniformly at random (`hash` picks).
pub fn select_backend(
    master: &ServiceKey,
    service: &ServiceValue,
    hash: u32,
    client: u64,
) -> Option<Backend> {
    if service.count == 0 {
        return None;
    }
    let affinity = service.flags & service_flags::AFFINITY != 0;
    let affinity_key = AffinityKey {
        client,
        rev_nat_id: service.rev_nat_id,
        pad: 0,
    };
    let now = (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32;
    if affinity
        && let Some(seen) = unsafe { AFFINITY.get(affinity_key) }
        && now.wrapping_sub(seen.last_used) <= service.affinity_timeout
        && let Some(backend) = unsafe { BACKENDS.get(seen.backend_id) }
    {
        let backend = *backend;
        let _ = AFFINITY.insert(
            affinity_key,
            AffinityValue {
                backend_id: seen.backend_id,
                last_used: now,
            },
            0,
        );
        return Some(backend);
    }
    let backend_id = if service.flags & service_flags::MAGLEV != 0 && service.maglev_size != 0 {
        let table = unsafe { MAGLEV.get(service.rev_nat_id) }?;
        let index = (hash % service.maglev_size as u32) as usize;
        *table.backend_ids.get(index)?
    } else {
        let slot_key = ServiceKey {
            slot: (hash % service.count as u32) as u16 + 1,
            ..*master
        };
        unsafe { SERVICES.get(slot_key) }?.backend_id
    };
    let backend = *unsafe { BACKENDS.get(backend_id) }?;
    if affinity {
        let _ = AFFINITY.insert(
            affinity_key,
            AffinityValue {
                backend_id,
                last_used: now,
            },
            0,
        );
    }
    Some(backend)
}
