//! The Bowline proxy: one binary for the sidecar and the gateway.
//!
//! - [`config`]: the settings it starts with, from the environment.
//! - [`envoy`]: Envoy's configuration formats, decoded as Envoy reads them.
//! - [`model`]: listeners, routes, clusters and endpoints, converted once
//!   from Envoy's types into what the data path reads.
//! - [`state`]: the configuration being served, swapped whole.
//! - [`server`]: listeners bound as configured; connections to their
//!   filter chains.
//! - [`sniff`]: HTTP told from other protocols by a connection's first
//!   bytes, for listeners that ask.
//! - [`http`]: one request: route, then forward, redirect or answer.
//! - [`upstream`]: a cluster's circuit breakers, outlier detection and
//!   choice of endpoint.
//! - [`pool`]: an endpoint's HTTP connections, kept alive between
//!   requests.
//! - [`connect`]: a connection to one endpoint, TLS as the cluster says.
//! - [`tls`]: TLS contexts, the secrets they name, peers' SPIFFE IDs.
//! - [`identity`]: the workload's SVID from the CA, renewed at half-life.
//! - [`xds`]: the delta ADS client that keeps the configuration current.
//! - [`telemetry`]: Istio's metrics, labelled with the workloads at both
//!   ends; access logs; spans exported over OTLP.
//! - [`capture`]: the iptables rules `bowline-proxy init` writes.
//! - [`admin`]: readiness (15021), metrics (15020, 15090) and the admin
//!   endpoint (127.0.0.1:15000).

pub mod admin;
pub mod capture;
pub mod config;
pub mod connect;
pub mod envoy;
pub mod error;
pub mod http;
pub mod identity;
pub mod model;
pub mod pool;
pub mod probe;
pub mod server;
pub mod sniff;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod xds;

use std::sync::Arc;

pub use config::{Config, Mode, Source};
pub use error::{Error, Result};

use crate::admin::{Admin, Port};
use crate::model::Snapshot;
use crate::server::Shared;
use crate::state::State;
use crate::telemetry::Telemetry;
use crate::tls::Secrets;
use crate::upstream::Upstreams;

/// Runs the proxy until `stop` turns true (or `/quitquitquit` is posted
/// to the admin endpoint), then drains: listeners close, requests in
/// flight get `config.drain` to finish. `log_filter`, when given, lets the
/// admin endpoint change what is logged.
pub async fn run(
    config: Config,
    mut stop: tokio::sync::watch::Receiver<bool>,
    log_filter: Option<admin::SetLogFilter>,
) -> Result<()> {
    let state = Arc::new(State::default());
    let secrets = Arc::new(Secrets::new(Arc::clone(&state), config.ca.is_some()));
    if let Some(ca) = config.ca.clone() {
        tokio::spawn(identity::keep(ca, Arc::clone(&secrets)));
    }
    let (telemetry, finished) = Telemetry::new(&config);
    let telemetry = Arc::new(telemetry);
    tokio::spawn(telemetry::trace::export(
        finished,
        Arc::clone(&state),
        telemetry.exchange.own.clone(),
        config.node_id.clone(),
    ));
    let (quit, stopping) = tokio::sync::watch::channel(false);
    let quit = Arc::new(quit);
    let admin = Arc::new(Admin {
        state: Arc::clone(&state),
        metrics: Arc::clone(&telemetry.metrics),
        secrets: Arc::clone(&secrets),
        node_id: config.node_id.clone(),
        stop: Arc::clone(&quit),
        log_filter,
        started: std::time::Instant::now(),
        app_probers: config.app_probers.clone(),
    });
    for (address, port) in [
        (config.status, Port::Status),
        (config.stats, Port::Metrics),
        (config.prometheus, Port::Metrics),
        (config.admin, Port::Admin),
    ] {
        admin::bind(address, port, Arc::clone(&admin)).await?;
    }
    tokio::spawn(async move {
        if stop.wait_for(|stop| *stop).await.is_ok() {
            let _ = quit.send(true);
        }
    });
    match &config.source {
        Source::Bootstrap(path) => {
            state.publish(Snapshot::from_bootstrap_file(path)?);
        }
        Source::Discovery(discovery) => {
            let (config, discovery) = (config.clone(), discovery.clone());
            let (state, stop) = (Arc::clone(&state), stopping.clone());
            tokio::spawn(async move { xds::follow(&config, &discovery, state, stop).await });
        }
    }
    let upstreams = Arc::new(Upstreams::new(Arc::clone(&secrets)));
    tokio::spawn(upstream::close_idle(Arc::downgrade(&upstreams)));
    let shared = Shared {
        upstreams,
        secrets,
        state,
        telemetry,
    };
    server::manage(shared, stopping, config.drain).await;
    Ok(())
}

/// What unit tests of several modules build their input with.
#[cfg(test)]
pub(crate) mod testing {
    use http::{HeaderMap, HeaderName, HeaderValue};

    /// A header map of `pairs`, in order.
    pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }
}
