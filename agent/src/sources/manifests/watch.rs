//! Watching the manifest directory: a reload after every change inotify
//! reports, and a poll for what it cannot see.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::mpsc;

use super::ManifestSource;
use crate::sources::LoadReport;

/// Loads `dir` now and again after every change, handing each report over
/// (the receiver owns it, so nothing here keeps a large set alive);
/// returns when the receiver is gone. inotify wakes it as soon as a file
/// is written, renamed or removed; the `interval` poll catches what inotify
/// cannot see (the directory appearing later, a watch that failed).
pub async fn watch(dir: PathBuf, interval: Duration, tx: mpsc::Sender<LoadReport>) {
    let mut source = ManifestSource::new(dir);
    let mut events = DirEvents::new(source.dir());
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // File I/O blocks: keep it off the async workers.
        let reloaded = tokio::task::spawn_blocking(move || {
            let report = source.reload();
            (source, report)
        })
        .await;
        let Ok((returned, report)) = reloaded else {
            return; // the runtime is shutting down
        };
        source = returned;
        if let Some(report) = report
            && tx.send(report).await.is_err()
        {
            return;
        }
        if events.is_none() {
            events = DirEvents::new(source.dir());
        }
        tokio::select! {
            _ = ticker.tick() => {}
            _ = DirEvents::next(&mut events) => {}
            _ = tx.closed() => return,
        }
    }
}

/// inotify on the manifest directory: file writes finished, renames in and
/// out, removals. A ConfigMap update is a rename of its `..data` link.
struct DirEvents(tokio::io::unix::AsyncFd<InotifyFd>);

/// tokio registers raw descriptors; nix's Inotify only lends a borrowed one.
struct InotifyFd(Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl DirEvents {
    fn new(dir: &Path) -> Option<DirEvents> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        let mask = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB;
        inotify.add_watch(dir, mask).ok()?;
        // SAFETY: InotifyFd owns the descriptor and always returns the same
        // one; it is closed only when the AsyncFd (its owner) is dropped.
        unsafe { tokio::io::unix::AsyncFd::register(InotifyFd(inotify)) }
            .ok()
            .map(DirEvents)
    }

    /// Waits for events and drains them all: one reload covers a burst.
    /// Without a watch (or once it failed) it never returns and leaves the
    /// work to the poll.
    async fn next(events: &mut Option<DirEvents>) {
        let Some(DirEvents(fd)) = events else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut ready) = fd.readable().await else {
                *events = None;
                return std::future::pending().await;
            };
            match fd.get_ref().0.read_events() {
                Ok(read) => {
                    // The directory itself went away: watch it again later.
                    if read.iter().any(|e| {
                        e.mask
                            .intersects(AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF)
                    }) {
                        *events = None;
                    }
                    return;
                }
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(_) => {
                    *events = None;
                    return;
                }
            }
        }
    }
}
