//! The Bowline proxy: one binary for the sidecar and the gateway.
//!
//! - [`config`]: the settings it starts with, from the environment.
//! - [`envoy`]: Envoy's configuration formats, decoded as Envoy reads them.
//! - [`model`]: listeners, routes, clusters and endpoints, converted once
//!   from Envoy's types into what the data path reads.
//! - [`state`]: the configuration being served, swapped whole.
//! - [`server`]: listeners bound as configured; connections to their
//!   filter chains.
//! - [`http`]: one request: route, then forward, redirect or answer.
//! - [`upstream`]: pooled connections to a cluster's endpoints, and the
//!   choice of endpoint.
//! - [`xds`]: the delta ADS client that keeps the configuration current.
//! - [`admin`]: readiness on the status port.

pub mod admin;
pub mod config;
pub mod envoy;
pub mod error;
pub mod http;
pub mod model;
pub mod server;
pub mod state;
pub mod upstream;
pub mod xds;

use std::sync::Arc;

pub use config::{Config, Mode, Source};
pub use error::{Error, Result};

use crate::model::Snapshot;
use crate::state::State;
use crate::upstream::Upstreams;

/// Runs the proxy until `stop` turns true, then drains: listeners close,
/// requests in flight get `config.drain` to finish.
pub async fn run(config: Config, stop: tokio::sync::watch::Receiver<bool>) -> Result<()> {
    let state = Arc::new(State::default());
    let upstreams = Arc::new(Upstreams::default());
    admin::bind_status(config.status, Arc::clone(&state)).await?;
    match &config.source {
        Source::Bootstrap(path) => {
            state.publish(Snapshot::from_bootstrap_file(path)?);
        }
        Source::Discovery(discovery) => {
            let (config, discovery) = (config.clone(), discovery.clone());
            let (state, stop) = (Arc::clone(&state), stop.clone());
            tokio::spawn(async move { xds::follow(&config, &discovery, state, stop).await });
        }
    }
    server::manage(state, upstreams, stop, config.drain).await;
    Ok(())
}
