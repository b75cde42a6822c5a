//! Drains the EVENTS ring buffer as the datapath fills it.

use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tern_common::FlowEvent;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::warn;

use super::FlowWriter;
use super::names::Names;
use super::resolve;
use crate::metrics::Metrics;

/// Events taken per wake-up before the log is published and other tasks
/// get a turn.
const BATCH: usize = 4096;

/// Runs until the ring cannot be polled any more (logged).
pub async fn run(
    ring: RingBuf<MapData>,
    mut names: Names,
    mut writer: FlowWriter,
    metrics: Arc<Metrics>,
    node_name: String,
) {
    // SAFETY: the RingBuf owns its descriptor and moves into the AsyncFd,
    // which deregisters it before dropping it.
    let mut ring = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(ring) => ring,
        Err(e) => {
            warn!("cannot poll the flow events ring: {e}; tern observe shows nothing");
            return;
        }
    };
    loop {
        let mut ready = match ring.readable_mut().await {
            Ok(ready) => ready,
            Err(e) => {
                warn!("polling the flow events ring failed: {e}; tern observe shows nothing");
                return;
            }
        };
        let mut events = Vec::new();
        {
            let ring = ready.get_inner_mut();
            while events.len() < BATCH {
                let Some(item) = ring.next() else { break };
                match decode(&item) {
                    Some(event) => events.push(event),
                    None => metrics.record_flow_undecoded(),
                }
            }
        }
        if events.len() < BATCH {
            // Drained: wait for the kernel's next wake-up.
            ready.clear_ready();
        }
        names.refresh(false);
        let offset = resolve::monotonic_to_wall();
        for event in &events {
            match resolve::flow(event, &mut names, &node_name, offset) {
                Some(flow) => {
                    metrics.record_flow(flow.kind.name(), flow.verdict.name());
                    writer.push(flow);
                }
                None => metrics.record_flow_undecoded(),
            }
        }
        writer.publish();
        tokio::task::yield_now().await;
    }
}

fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: length checked; FlowEvent is plain integers, any bytes are a
    // value; the ring's records are only 8-byte aligned by contract, so
    // read unaligned anyway.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}
