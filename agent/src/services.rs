//! The service pipeline: model -> lb compiler -> service maps, re-run on
//! every snapshot the source hands over.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{info, warn};

use crate::compiler::lb::{LbCompiler, NodeContext};
use crate::node::Node;
use crate::sources::LoadReport;

/// Map writes and deletes of a sync from which on the heap is trimmed.
const TRIM_AFTER_MAP_CHANGES: usize = 1000;

pub struct ServiceSync {
    /// Kept across syncs: it recompiles only the Services that changed.
    compiler: Arc<Mutex<LbCompiler>>,
    node: Arc<Mutex<Node>>,
}

impl ServiceSync {
    pub fn new(context: NodeContext, node: Arc<Mutex<Node>>) -> Self {
        ServiceSync {
            compiler: Arc::new(Mutex::new(LbCompiler::new(context))),
            node,
        }
    }

    /// Compiles the snapshot and brings the service maps to it. Takes the
    /// report so it is freed (and the heap trimmed) inside the sync.
    pub async fn apply(&self, report: LoadReport) {
        let started = Instant::now();
        let compiler = self.compiler.clone();
        let node = self.node.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut took = StageTimes::default();
            let stage = Instant::now();
            let state = compiler
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .compile(&report.cluster);
            for conflict in &state.conflicts {
                warn!("services: {conflict}");
            }
            let services = report.cluster.services.len();
            let frontends = state.frontends.len();
            took.compile_us = stage.elapsed().as_micros() as u64;
            let stage = Instant::now();
            let stats = node
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .apply_services(state);
            took.apply_us = stage.elapsed().as_micros() as u64;
            let stage = Instant::now();
            let rejected = report.errors.len();
            drop(report);
            // Parsing a large manifest set peaks high; hand the freed memory
            // back to the system instead of keeping it in malloc's lists.
            // Not after small changes: trimming a large heap takes ~10 ms.
            #[cfg(target_env = "gnu")]
            if stats.writes + stats.deletes >= TRIM_AFTER_MAP_CHANGES {
                // SAFETY: malloc_trim only releases free heap memory.
                unsafe { libc::malloc_trim(0) };
            }
            took.release_us = stage.elapsed().as_micros() as u64;
            (services, frontends, stats, rejected, took)
        })
        .await;
        match applied {
            Ok((services, frontends, stats, rejected, took)) => info!(
                services,
                frontends,
                rejected,
                writes = stats.writes,
                deletes = stats.deletes,
                errors = stats.errors,
                took_us = started.elapsed().as_micros() as u64,
                compile_us = took.compile_us,
                apply_us = took.apply_us,
                release_us = took.release_us,
                "services synced"
            ),
            Err(e) => warn!("service sync failed: {e}"),
        }
    }
}

/// Where a sync's time went, for the log.
#[derive(Default)]
struct StageTimes {
    compile_us: u64,
    apply_us: u64,
    release_us: u64,
}
