//! Serves `Request::Observe` on the agent's socket: the kept flows the
//! filter selects, then (following) new ones as they come, one JSON
//! response per line, with the counts of lost events whenever they grow.

use std::time::Duration;

use tern_api::Response;
use tern_api::flows::{Flow, FlowFilter};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::broadcast::error::RecvError;

use super::FlowHub;

/// How often a follower hears of new losses when no flow comes.
const LOST_POLL: Duration = Duration::from_secs(1);

/// Ends when the client hangs up (or, not following, after the last line).
/// `input`: the rest of the client's side, read only to see it close.
pub async fn serve(
    mut input: impl AsyncRead + Unpin,
    mut out: OwnedWriteHalf,
    flows: FlowHub,
    filter: FlowFilter,
    last: usize,
    follow: bool,
) {
    // Subscribed first: nothing falls between the snapshot and the feed.
    let mut live = follow.then(|| flows.follow());
    let recent = flows.recent();
    let snapshot_seq = recent.back().map_or(0, |k| k.seq);
    let selected: Vec<_> = recent.iter().filter(|k| filter.matches(&k.flow)).collect();
    let skip = selected.len().saturating_sub(last);
    let mut lost = flows.lost();
    let mut stream_lost = 0;
    let mut lines = vec![lost_line(lost, stream_lost)];
    lines.extend(
        selected[skip..]
            .iter()
            .map(|k| Response::Flow(Box::new(Flow::clone(&k.flow)))),
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
    let mut byte = [0u8; 1];
    loop {
        let line = tokio::select! {
            // The client sends nothing more: end of input is its hang-up.
            _ = input.read(&mut byte) => return,
            received = live.recv() => match received {
                // Already sent with the snapshot.
                Ok(kept) if kept.seq <= snapshot_seq => continue,
                Ok(kept) if filter.matches(&kept.flow) => Response::Flow(Box::new(kept.flow.clone())),
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
