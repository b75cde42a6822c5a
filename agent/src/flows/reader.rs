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
/// The datapath does not wake the reader per event (only on a backlog of
/// 1 024): the ring is drained this often, well inside `tern observe`'s
/// promise of a second.
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

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
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut events = Vec::new();
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut ready = match ready {
                    Ok(ready) => ready,
                    Err(e) => {
                        warn!("polling the flow events ring failed: {e}; tern observe shows nothing");
                        return;
                    }
                };
                drain(ready.get_inner_mut(), &mut events, &metrics);
                if events.len() < BATCH {
                    // Drained: wait for the kernel's next wake-up.
                    ready.clear_ready();
                }
            }
            _ = tick.tick() => drain(ring.get_mut(), &mut events, &metrics),
        }
        if events.is_empty() {
            continue;
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

/// Up to BATCH events from the ring into `events`.
fn drain(ring: &mut RingBuf<MapData>, events: &mut Vec<FlowEvent>, metrics: &Metrics) {
    while events.len() < BATCH {
        let Some(item) = ring.next() else { break };
        match decode(&item) {
            Some(event) => events.push(event),
            None => metrics.record_flow_undecoded(),
        }
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
