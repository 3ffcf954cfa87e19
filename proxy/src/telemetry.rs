//! What the proxy tells about the traffic it carries: Istio's standard
//! metrics ([`metrics`]), labelled with the workloads at both ends
//! ([`peer`]: the proxy's own node metadata, the peer's from Istio's
//! metadata exchange headers, the service from the cluster).

pub mod access_log;
pub mod metrics;
pub mod peer;

use std::sync::Arc;

use crate::config::{Config, Mode};
use metrics::Metrics;
use peer::Exchange;

/// One proxy's telemetry, shared by its connections.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub exchange: Exchange,
    /// A gateway reports every request as its source, as Istio's do.
    pub gateway: bool,
}

impl Telemetry {
    pub fn new(config: &Config) -> Self {
        Self {
            metrics: Arc::default(),
            exchange: Exchange::new(&config.node_id, &config.metadata),
            gateway: config.mode == Mode::Gateway,
        }
    }
}
