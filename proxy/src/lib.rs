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
            return Err(Error::Environment {
                variable: config::ENV_DISCOVERY_ADDRESS.into(),
                message: format!(
                    "{}: configuration over xDS is not available in this build; start with a bootstrap file (--bootstrap)",
                    discovery.address
                ),
            });
        }
    }
    server::manage(state, upstreams, stop, config.drain).await;
    Ok(())
}
