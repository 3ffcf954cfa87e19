//! What the proxy tells about the traffic it carries: Istio's standard
//! metrics ([`metrics`]), labelled with the workloads at both ends
//! ([`peer`]: the proxy's own node metadata, the peer's from Istio's
//! metadata exchange headers, the service from the cluster), access logs
//! ([`access_log`]) and spans ([`trace`]).

pub mod access_log;
pub mod metrics;
pub mod peer;
pub mod trace;

use std::sync::Arc;

use crate::config::{Config, Mode};
use metrics::Metrics;
use peer::Exchange;
use trace::Spans;

/// One proxy's telemetry, shared by its connections.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub exchange: Exchange,
    /// Finished spans, on their way to the exporter.
    pub spans: Spans,
    /// A gateway reports every request as its source, as Istio's do.
    pub gateway: bool,
}

impl Telemetry {
    /// The telemetry, and the queue of finished spans for
    /// [`trace::export`].
    pub fn new(config: &Config) -> (Self, tokio::sync::mpsc::Receiver<trace::Finished>) {
        let metrics = Arc::<Metrics>::default();
        let (spans, finished) = Spans::new(metrics.spans_dropped.clone());
        let telemetry = Self {
            metrics,
            exchange: Exchange::new(&config.node_id, &config.metadata),
            spans,
            gateway: config.mode == Mode::Gateway,
        };
        (telemetry, finished)
    }
}
