//! The Bowline operator.
//!
//! - [`profile`]: profiles, and resolving a spec into what gets installed.
//! - [`release`]: the releases the operator can install.
//! - [`render`]: the pure function from a resolved spec to Kubernetes objects.
//! - [`revisions`]: which control-plane revisions run, and which is active.
//! - [`restart`]: moving injected workloads to the active revision in batches.
//! - [`apply`]: server-side apply, drift detection, pruning, the namespace.
//! - [`cache`]: watched caches of the managed objects, which reconciles read.
//! - [`status`]: conditions and component readiness, computed purely.
//! - [`observe`]: what an installation runs, read from the caches.
//! - [`tags`]: MeshRevisionTags, resolved and guarded by their installation.
//! - [`controller`]: the reconciler that puts these together.
//! - [`metrics`]: the operator's own metrics, API requests included.
//! - [`leader`]: leader election, so that one replica of several writes.
//! - [`error`]: the one error type, and whether an error is worth retrying.

pub mod apply;
pub mod cache;
pub mod controller;
pub mod crds;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod profile;
pub mod release;
pub mod render;
pub mod restart;
pub mod revisions;
pub mod status;
pub mod tags;

use std::sync::Arc;

use kube::client::ClientBuilder;
use kube::{Client, Config};
use tower::ServiceBuilder;

/// A client whose every request is counted in `metrics` (by method, and
/// writes apart), so that what a reconcile costs the API server is measured.
pub fn counting_client(
    config: Config,
    metrics: Arc<metrics::Metrics>,
) -> Result<Client, kube::Error> {
    let counter =
        ServiceBuilder::new().map_request(move |request: http::Request<kube::client::Body>| {
            metrics.observe_request(request.method());
            request
        });
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&counter)
        .build())
}
