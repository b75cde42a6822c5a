//! CPU taken by processes outside the benchmark while it measures: a
//! repetition that shared the machine's CPUs with something else (a build,
//! a test run) is told apart from one that ran alone. The benchmark's own
//! process tree (tools, agents, nginx workers) and kernel threads (children
//! of kthreadd, e.g. ksoftirqd working for the measured traffic) are left
//! out; every other process's user + system time is summed from
//! /proc/<pid>/stat, one-second window after window.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one window of the watch lasts.
const WINDOW: Duration = Duration::from_secs(1);
/// A last window shorter than this is not counted (too few ticks).
const SHORTEST: Duration = Duration::from_millis(200);

/// A running watch; [`CpuWatch::finish`] returns its figure.
pub struct CpuWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<f64>>,
}

impl CpuWatch {
    pub fn start() -> CpuWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || watch(&flag));
        CpuWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// The busiest window's CPU of other processes, in % of one CPU
    /// (200 = two CPUs busy); NaN if nothing could be read.
    pub fn finish(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or(f64::NAN)
    }
}

impl Drop for CpuWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn watch(stop: &AtomicBool) -> f64 {
    let tick = clock_ticks_per_second();
    let mut busiest = f64::NAN;
    let mut before = others();
    let mut started = Instant::now();
    loop {
        let done = stop.load(Ordering::Relaxed);
        let elapsed = started.elapsed();
        if elapsed >= WINDOW || (done && elapsed >= SHORTEST) {
            let now = others();
            // A process seen for the first time started in this window.
            let ticks: u64 = now
                .iter()
                .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
                .sum();
            let pct = ticks as f64 / tick / elapsed.as_secs_f64() * 100.0;
            busiest = if busiest.is_nan() {
                pct
            } else {
                busiest.max(pct)
            };
            before = now;
            started = Instant::now();
        }
        if done {
            return busiest;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The CPU time process `pid` has taken so far (user + system), in
/// seconds; `None` when it cannot be read (the process is gone).
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, ticks) = parse_stat(&stat)?;
    Some(ticks as f64 / clock_ticks_per_second())
}

/// How often the threads of process `pid` have blocked and been woken
/// again so far (their `voluntary_ctxt_switches`); `None` when it cannot
/// be read (the process is gone).
pub fn process_wakeups(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
            .filter_map(|status| {
                status.lines().find_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            })
            .sum(),
    )
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// User + system ticks of every process that is neither this one, nor a
/// descendant of it, nor a kernel thread.
fn others() -> HashMap<u32, u64> {
    let me = std::process::id();
    let all = processes();
    let mut parents: HashMap<u32, u32> = HashMap::new();
    for (pid, (ppid, _)) in &all {
        parents.insert(*pid, *ppid);
    }
    let ours = |mut pid: u32| {
        // Up the parent chain to init (or to a process gone meanwhile).
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match parents.get(&pid) {
                Some(&ppid) if ppid != 0 && ppid != pid => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    all.iter()
        .filter(|(pid, (ppid, _))| **pid != 2 && *ppid != 2 && !ours(**pid))
        .map(|(pid, (_, ticks))| (*pid, *ticks))
        .collect()
}

/// pid -> (parent pid, user + system ticks).
fn processes() -> HashMap<u32, (u32, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(fields) = parse_stat(&stat) {
            out.insert(pid, fields);
        }
    }
    out
}

/// (ppid, utime + stime) of a /proc/<pid>/stat line. The command name is
/// in parentheses and may hold spaces and parentheses itself.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields from 3 on (state = 3, ppid = 4, utime = 14, stime = 15).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let stat = "26396 (rustc (x) y) R 26119 26119 17 0 -1 4194560 207146 0 0 0 2868 331 0 0 20 0 3 0 1586340 1519210496 212450 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((26119, 2868 + 331)));
        assert_eq!(parse_stat("garbage"), None);
        // This process is ours, so never among the others.
        assert!(!others().contains_key(&std::process::id()));
        let own = process_cpu_seconds(std::process::id()).unwrap();
        assert!(own.is_finite() && own >= 0.0, "{own}");
        let before = process_wakeups(std::process::id()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(process_wakeups(std::process::id()).unwrap() > before);
    }

    #[test]
    fn watch_returns_a_figure() {
        let w = CpuWatch::start();
        std::thread::sleep(Duration::from_millis(300));
        let pct = w.finish();
        assert!(pct.is_finite() && pct >= 0.0, "{pct}");
    }
}
