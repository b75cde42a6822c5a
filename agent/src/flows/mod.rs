//! Flow observability (`tern observe`). The datapath reports events into
//! the EVENTS ring buffer; the reader (`reader`) drains it, names what it
//! can (`names`), counts, and keeps the last flows (`FlowLog`) for
//! readers, who get snapshots and a live feed (`FlowHub`).

pub mod names;
pub mod observe;
mod reader;
mod resolve;

use std::sync::Arc;

use tern_api::flows::Flow;
use tokio::sync::{broadcast, watch};

use crate::datapath::Counters;

pub use reader::run;

/// Followers a live feed can be behind before they lose flows.
const LIVE_BACKLOG: usize = 4096;

/// The last flows, oldest first; cloning shares them.
pub type FlowLog = imbl::Vector<Arc<Flow>>;

/// The reader's side: it alone writes the log and the feed.
pub struct FlowWriter {
    log: FlowLog,
    capacity: usize,
    published: watch::Sender<FlowLog>,
    live: broadcast::Sender<Arc<Flow>>,
}

impl FlowWriter {
    pub fn push(&mut self, flow: Flow) {
        let flow = Arc::new(flow);
        // Nobody following is not an error.
        let _ = self.live.send(flow.clone());
        self.log.push_back(flow);
        while self.log.len() > self.capacity {
            self.log.pop_front();
        }
    }

    /// Makes what was pushed visible to snapshot readers.
    pub fn publish(&self) {
        self.published.send_replace(self.log.clone());
    }
}

/// The readers' side.
#[derive(Clone)]
pub struct FlowHub {
    log: watch::Receiver<FlowLog>,
    live: broadcast::Sender<Arc<Flow>>,
    /// Where the datapath counts events it could not report.
    counters: Arc<Counters>,
}

/// Events lost so far: (ring buffer full, drop events over budget).
pub type Lost = (u64, u64);

impl FlowHub {
    /// A writer keeping the last `capacity` flows, and its readers' hub.
    pub fn new(capacity: usize, counters: Arc<Counters>) -> (FlowWriter, FlowHub) {
        let (published, log) = watch::channel(FlowLog::new());
        let (live, _) = broadcast::channel(LIVE_BACKLOG);
        let writer = FlowWriter {
            log: FlowLog::new(),
            capacity,
            published,
            live: live.clone(),
        };
        (
            writer,
            FlowHub {
                log,
                live,
                counters,
            },
        )
    }

    /// The flows kept now, oldest first.
    pub fn recent(&self) -> FlowLog {
        self.log.borrow().clone()
    }

    /// Flows from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.live.subscribe()
    }

    pub fn lost(&self) -> Lost {
        use tern_common::Reason;
        (
            self.counters.get(Reason::EventsLost).unwrap_or(0),
            self.counters.get(Reason::EventsRateLimited).unwrap_or(0),
        )
    }
}
