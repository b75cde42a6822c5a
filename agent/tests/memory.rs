//! Memory the service pipeline keeps for a large Service set, counted by a
//! global allocator: the manifest source's per-file cache and the compiled
//! state must stay small next to the maps they describe.

// Tests: a failed unwrap or expect is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use tern_agent::compiler::lb::{NodeContext, compile};
use tern_agent::model::LbAlgorithm;
use tern_agent::sources::manifests::ManifestSource;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: ptr came from alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// `services` Services with `backends` endpoints each, as one JSON List.
fn manifest(services: usize, backends: usize) -> String {
    let mut items = Vec::new();
    for i in 0..services {
        let name = format!("s{i}");
        let vip = std::net::Ipv4Addr::from(0x0a64_0000 + i as u32);
        items.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "scale"},
            "spec": {"clusterIP": vip.to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}));
        let endpoints: Vec<_> = (0..backends)
            .map(|j| {
                let ip = std::net::Ipv4Addr::from(0x0a80_0000 + (i * backends + j) as u32);
                json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})
            })
            .collect();
        items.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "scale", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints}));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

#[test]
fn ten_thousand_services_keep_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("scale.json"), manifest(10_000, 10)).unwrap();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut source = ManifestSource::new(dir.path());
    let report = source.reload().unwrap();
    let parse_peak = PEAK.load(Ordering::Relaxed) - base;
    let cached = LIVE.load(Ordering::Relaxed) - base;
    assert!(report.errors.is_empty(), "{:?}", &report.errors[..1]);
    let ctx = NodeContext {
        node_name: "n1".into(),
        node_ips: vec!["192.168.1.10".parse().unwrap()],
        maglev_table_size: 16381,
        default_algorithm: LbAlgorithm::Random,
        service_cidr: None,
    };
    let before = LIVE.load(Ordering::Relaxed);
    let state = compile(&report.cluster, &ctx);
    let compiled = LIVE.load(Ordering::Relaxed) - before;
    let before = LIVE.load(Ordering::Relaxed);
    drop(report);
    let report_size = before - LIVE.load(Ordering::Relaxed);
    eprintln!(
        "10k x 10: parse peak {:.1} MiB, source cache {:.1} MiB (incl. report {:.1} MiB), compiled {:.1} MiB",
        mib(parse_peak),
        mib(cached),
        mib(report_size),
        mib(compiled)
    );
    assert_eq!(state.frontends.len(), 10_000);
    // The 9.8 MiB file once took a 205 MiB tree to read; now its List is
    // read item by item.
    assert!(
        mib(parse_peak) < 48.0,
        "parse peak {:.1} MiB",
        mib(parse_peak)
    );
    assert!(mib(cached) < 40.0, "source cache {:.1} MiB", mib(cached));
    assert!(mib(compiled) < 8.0, "compiled {:.1} MiB", mib(compiled));
}
