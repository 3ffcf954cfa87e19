//! The configuration the data path reads: one [`Snapshot`] behind an
//! `ArcSwap`, replaced whole. A request or connection takes the snapshot
//! once and keeps it to the end, so a swap never changes a request midway.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::model::Snapshot;

#[derive(Debug)]
pub struct State {
    snapshot: ArcSwap<Snapshot>,
    /// Bumped on every publish, for the listener manager.
    version: watch::Sender<u64>,
    /// Set once the first complete configuration is serving.
    ready: AtomicBool,
    /// Set when the proxy is stopping: it is no longer ready.
    draining: AtomicBool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            version: watch::channel(0).0,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }
}

impl State {
    /// The configuration now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Serves `snapshot` from now on.
    pub fn publish(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
        self.version.send_modify(|v| *v += 1);
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Serving a complete configuration, and not stopping.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
