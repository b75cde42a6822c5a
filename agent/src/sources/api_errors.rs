//! The API source's errors in the log. While the API server is down every
//! watcher fails about twice a second: a kube-apiserver restart of ~9 s
//! gave ~170 warnings (refused, 403 while its RBAC cache fills, 410 Gone).
//! The first error of each kind is a warning; the same kind again within
//! `REPEAT` is only counted (the metric counts every one); when events
//! arrive again one line says how many failed and for how long.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// An error of a kind already warned about is warned again after this.
pub const REPEAT: Duration = Duration::from_secs(10);

/// An error spell that ended: what the recovery line reports.
#[derive(Debug, PartialEq, Eq)]
pub struct Spell {
    pub lasted: Duration,
    pub errors: u64,
    pub not_logged: u64,
}

#[derive(Debug, Default)]
pub struct ErrorLog {
    /// Kinds warned about since `warned_at` (message without its digits:
    /// resource versions and ports differ from one error to the next).
    warned: BTreeSet<String>,
    warned_at: Option<Instant>,
    first_error: Option<Instant>,
    errors: u64,
    not_logged: u64,
}

impl ErrorLog {
    /// Counts an error; true if it is to be logged as a warning.
    pub fn error(&mut self, message: &str, now: Instant) -> bool {
        self.first_error.get_or_insert(now);
        self.errors += 1;
        if self
            .warned_at
            .is_some_and(|at| now.duration_since(at) >= REPEAT)
        {
            self.warned.clear();
            self.warned_at = None;
        }
        let kind: String = message.chars().filter(|c| !c.is_ascii_digit()).collect();
        if self.warned.insert(kind) {
            self.warned_at.get_or_insert(now);
            true
        } else {
            self.not_logged += 1;
            false
        }
    }

    /// The source answered: ends an error spell, if one was going on.
    pub fn answered(&mut self, now: Instant) -> Option<Spell> {
        let first = self.first_error.take()?;
        let spell = Spell {
            lasted: now.duration_since(first),
            errors: self.errors,
            not_logged: self.not_logged,
        };
        *self = ErrorLog::default();
        Some(spell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_warns_once_per_kind_and_sums_up_when_it_ends() {
        let mut log = ErrorLog::default();
        let t0 = Instant::now();
        let refused = |port: u16| format!("connect to 127.0.0.1:{port}: connection refused");
        assert!(log.error(&refused(6443), t0));
        // The same kind (other numbers) within REPEAT: counted only.
        for i in 1..50u64 {
            assert!(!log.error(&refused(6443), t0 + Duration::from_millis(100 * i)));
        }
        // Another kind is warned at once.
        assert!(log.error("services is forbidden: 403", t0 + Duration::from_secs(5)));
        assert!(!log.error("services is forbidden: 403", t0 + Duration::from_secs(6)));
        // After REPEAT every kind is warned again, once.
        assert!(log.error(&refused(1), t0 + REPEAT));
        assert!(!log.error(&refused(2), t0 + REPEAT));
        let spell = log.answered(t0 + Duration::from_secs(12));
        assert_eq!(
            spell,
            Some(Spell {
                lasted: Duration::from_secs(12),
                errors: 54,
                not_logged: 51,
            })
        );
        // Nothing to report when nothing failed; a new spell starts afresh.
        assert_eq!(log.answered(t0 + Duration::from_secs(13)), None);
        assert!(log.error(&refused(6443), t0 + Duration::from_secs(14)));
    }
}
