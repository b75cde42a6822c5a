//! How long a watcher waits after a failed list or watch call. kube's
//! default (800 ms doubling to 30 s, plus up to as much again in jitter)
//! keeps growing through an API server outage, so after a 7 s outage the
//! next try could come ~10 s after the server was back, and the re-list a
//! `410 Gone` asks for waited behind it. Here the wait doubles from 100 ms
//! but never exceeds 800 ms, so the agent is back within a second of the
//! server; each of the six watchers then tries about 1.7 times a second
//! during an outage (jitter spreads nodes apart). A successful event resets
//! it (kube's `StreamBackoff` asks), but only once the last failure is
//! `QUIET` old: a watcher that has to list again reports a (successful)
//! `Init` before its list fails, which would otherwise reset it every time
//! and retry at once.

use std::time::{Duration, Instant};

use kube::runtime::utils::Backoff;

pub const FIRST: Duration = Duration::from_millis(100);
pub const CAP: Duration = Duration::from_millis(800);
pub const QUIET: Duration = Duration::from_secs(2);

/// Waits of FIRST, 2 FIRST, ... up to CAP, each drawn from its upper half
/// (so never longer than CAP).
#[derive(Debug, Clone)]
pub struct ApiBackoff {
    next: Duration,
    /// When the last wait was handed out (the last failure).
    last_failure: Option<Instant>,
}

impl Default for ApiBackoff {
    fn default() -> Self {
        ApiBackoff {
            next: FIRST,
            last_failure: None,
        }
    }
}

impl Iterator for ApiBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (base * 2).min(CAP);
        self.last_failure = Some(Instant::now());
        Some(base / 2 + base.mul_f64(fastrand::f64() / 2.0))
    }
}

impl Backoff for ApiBackoff {
    fn reset(&mut self) {
        if self.last_failure.is_none_or(|at| at.elapsed() >= QUIET) {
            self.next = FIRST;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_from_first_never_exceed_the_cap_and_reset() {
        let mut backoff = ApiBackoff::default();
        let waits: Vec<Duration> = backoff.by_ref().take(20).collect();
        assert!(waits[0] >= FIRST / 2 && waits[0] <= FIRST, "{waits:?}");
        assert!(waits.iter().all(|w| *w <= CAP), "{waits:?}");
        // From the fourth on the base is the cap: each wait in its upper half.
        assert!(waits[4..].iter().all(|w| *w >= CAP / 2), "{waits:?}");
        // A success right after a failure does not reset it...
        backoff.reset();
        assert!(backoff.next().unwrap() >= CAP / 2);
        // ... one after a quiet spell does.
        backoff.last_failure = Some(Instant::now() - QUIET);
        backoff.reset();
        assert!(backoff.next().unwrap() <= FIRST);
    }
}
