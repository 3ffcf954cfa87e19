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
    /// Set while a proxy that gets its certificate from a CA has none
    /// yet: its TLS listeners and clusters cannot work, so it is not ready
    /// (as Envoy keeps listeners warming until their SDS secrets come).
    awaiting_identity: AtomicBool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            version: watch::channel(0).0,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            awaiting_identity: AtomicBool::new(false),
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

    /// Not ready until [`State::identity_issued`].
    pub fn await_identity(&self) {
        self.awaiting_identity.store(true, Ordering::Release);
    }

    pub fn identity_issued(&self) {
        self.awaiting_identity.store(false, Ordering::Release);
    }

    pub fn is_awaiting_identity(&self) -> bool {
        self.awaiting_identity.load(Ordering::Acquire)
    }

    /// Serving a complete configuration with its certificate (when it has
    /// a CA), and not stopping.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_awaiting_identity() && !self.is_draining()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
