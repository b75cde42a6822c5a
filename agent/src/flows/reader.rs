//! Drains the EVENTS ring buffer as the datapath fills it.

use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tern_api::flows::{FlowType, FlowVerdict, Name};
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
    let node: Name = node_name.into();
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
        let mut tally = Tally::default();
        for event in &events {
            match resolve::flow(event, &mut names, &node, offset) {
                Some(flow) => {
                    tally.add(flow.kind, flow.verdict);
                    writer.push(flow);
                }
                None => metrics.record_flow_undecoded(),
            }
        }
        tally.record(&metrics);
        writer.publish();
        tokio::task::yield_now().await;
    }
}

/// Flows of a batch by type and verdict: counted into the metrics once
/// per batch, not once per event.
#[derive(Default)]
struct Tally([[u64; 3]; 4]);

const TYPES: [FlowType; 4] = [
    FlowType::Drop,
    FlowType::Policy,
    FlowType::Service,
    FlowType::Trace,
];
const VERDICTS: [FlowVerdict; 3] = [
    FlowVerdict::Forwarded,
    FlowVerdict::Dropped,
    FlowVerdict::Translated,
];

impl Tally {
    /// Indices as listed in TYPES and VERDICTS; exhaustive, so a new type
    /// or verdict cannot be counted as another.
    fn add(&mut self, kind: FlowType, verdict: FlowVerdict) {
        let t = match kind {
            FlowType::Drop => 0,
            FlowType::Policy => 1,
            FlowType::Service => 2,
            FlowType::Trace => 3,
        };
        let v = match verdict {
            FlowVerdict::Forwarded => 0,
            FlowVerdict::Dropped => 1,
            FlowVerdict::Translated => 2,
        };
        self.0[t][v] += 1;
    }

    fn record(&self, metrics: &Metrics) {
        for (kind, counts) in TYPES.iter().zip(&self.0) {
            for (verdict, n) in VERDICTS.iter().zip(counts) {
                if *n > 0 {
                    metrics.record_flows(kind.name(), verdict.name(), *n);
                }
            }
        }
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
