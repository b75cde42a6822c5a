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

/// A flow with its place in the stream: followers take the snapshot up
/// to some number and the live feed after it, with nothing twice and
/// nothing missed.
#[derive(Debug)]
pub struct Kept {
    pub seq: u64,
    pub flow: Flow,
}

/// The last flows, oldest first; cloning shares them.
pub type FlowLog = imbl::Vector<Arc<Kept>>;

/// The reader's side: it alone writes the log and the feed.
pub struct FlowWriter {
    log: FlowLog,
    capacity: usize,
    next_seq: u64,
    /// Pushed since the last publish: fed live only after the snapshot
    /// holding them is out.
    pending: Vec<Arc<Kept>>,
    published: watch::Sender<FlowLog>,
    live: broadcast::Sender<Arc<Kept>>,
}

impl FlowWriter {
    pub fn push(&mut self, flow: Flow) {
        self.next_seq += 1;
        let kept = Arc::new(Kept {
            seq: self.next_seq,
            flow,
        });
        self.pending.push(kept.clone());
        self.log.push_back(kept);
        while self.log.len() > self.capacity {
            self.log.pop_front();
        }
    }

    /// Makes what was pushed visible: the snapshot first, then the feed.
    pub fn publish(&mut self) {
        self.published.send_replace(self.log.clone());
        // Nobody following: nothing to feed. One who subscribes after
        // this count finds these flows in the snapshot just published.
        if self.live.receiver_count() == 0 {
            self.pending.clear();
            return;
        }
        for kept in self.pending.drain(..) {
            // Followers gone meanwhile is not an error.
            let _ = self.live.send(kept);
        }
    }
}

/// The readers' side.
#[derive(Clone)]
pub struct FlowHub {
    log: watch::Receiver<FlowLog>,
    live: broadcast::Sender<Arc<Kept>>,
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
            next_seq: 0,
            pending: Vec::new(),
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

    /// Flows from now on (subscribe before taking `recent`: the feed
    /// repeats what the snapshot may already hold, never less).
    pub fn follow(&self) -> broadcast::Receiver<Arc<Kept>> {
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
