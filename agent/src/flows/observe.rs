//! Serves `Request::Observe` on the agent's socket: the kept flows the
//! filter selects, then (following) new ones as they come, one JSON
//! response per line, with the counts of lost events whenever they grow.

use std::time::Duration;

use tern_api::Response;
use tern_api::flows::{Flow, FlowFilter};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::broadcast::error::RecvError;

use super::FlowHub;

/// How often a follower hears of new losses when no flow comes.
const LOST_POLL: Duration = Duration::from_secs(1);

/// Ends when the client hangs up (or, not following, after the last line).
pub async fn serve(
    mut out: OwnedWriteHalf,
    flows: FlowHub,
    filter: FlowFilter,
    last: usize,
    follow: bool,
) {
    // Subscribed first: nothing falls between the snapshot and the feed.
    let mut live = follow.then(|| flows.follow());
    let recent = flows.recent();
    let newest = recent.back().map(|f| f.time_ns);
    let selected: Vec<_> = recent.iter().filter(|f| filter.matches(f)).collect();
    let skip = selected.len().saturating_sub(last);
    let mut lost = flows.lost();
    let mut stream_lost = 0;
    let mut lines = vec![lost_line(lost, stream_lost)];
    lines.extend(
        selected[skip..]
            .iter()
            .map(|f| Response::Flow(Box::new(Flow::clone(f)))),
    );
    if !follow {
        lines.push(Response::FlowsEnd);
    }
    if send(&mut out, &lines).await.is_err() {
        return;
    }
    let Some(live) = live.as_mut() else {
        return;
    };
    let mut poll = tokio::time::interval(LOST_POLL);
    loop {
        let line = tokio::select! {
            received = live.recv() => match received {
                // Already sent with the snapshot.
                Ok(flow) if newest.is_some_and(|t| flow.time_ns <= t) && recent.iter().any(|f| std::sync::Arc::ptr_eq(f, &flow)) => continue,
                Ok(flow) if filter.matches(&flow) => Response::Flow(Box::new((*flow).clone())),
                Ok(_) => continue,
                Err(RecvError::Lagged(skipped)) => {
                    stream_lost += skipped;
                    lost_line(flows.lost(), stream_lost)
                }
                Err(RecvError::Closed) => return,
            },
            _ = poll.tick() => {
                let now = flows.lost();
                if now == lost {
                    continue;
                }
                lost = now;
                lost_line(now, stream_lost)
            }
        };
        if send(&mut out, &[line]).await.is_err() {
            return;
        }
    }
}

fn lost_line((ring, rate_limited): super::Lost, stream: u64) -> Response {
    Response::FlowsLost {
        ring,
        rate_limited,
        stream,
    }
}

async fn send(out: &mut OwnedWriteHalf, lines: &[Response]) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut bytes, line).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
    }
    out.write_all(&bytes).await
}
