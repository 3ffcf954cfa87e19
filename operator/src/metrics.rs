//! The operator's own metrics, served on `/metrics` in the OpenMetrics text
//! format.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The HTTP method: GET (get, list, watch), POST, PUT, PATCH, DELETE.
    pub method: String,
}

/// Requests that change something: every method but GET, HEAD and OPTIONS.
pub fn is_write(method: &http::Method) -> bool {
    !matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    )
}

/// Reconcile counts, errors by reason, how long reconciles take, and the
/// requests the operator sends to the API server.
#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub api_requests: Family<RequestLabels, Counter>,
    pub api_writes: Counter,
    pub registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        // 5 ms to about 40 s.
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let mut registry = Registry::with_prefix("bowline_operator");
        registry.register(
            "reconciles",
            "Reconciles of MeshInstallations",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by reason",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long a reconcile takes",
            duration.clone(),
        );
        let api_requests = Family::<RequestLabels, Counter>::default();
        let api_writes = Counter::default();
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes API server, by method",
            api_requests.clone(),
        );
        registry.register(
            "api_writes",
            "Requests sent to the Kubernetes API server that change something",
            api_writes.clone(),
        );
        Self {
            reconciles,
            errors,
            duration,
            api_requests,
            api_writes,
            registry,
        }
    }
}

impl Metrics {
    pub fn observe(&self, elapsed: Duration, error: Option<&Error>) {
        self.reconciles.inc();
        self.duration.observe(elapsed.as_secs_f64());
        if let Some(error) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    reason: error.metric_label(),
                })
                .inc();
        }
    }

    /// Counts one request to the API server.
    pub fn observe_request(&self, method: &http::Method) {
        self.api_requests
            .get_or_create(&RequestLabels {
                method: method.as_str().into(),
            })
            .inc();
        if is_write(method) {
            self.api_writes.inc();
        }
    }

    /// Requests sent to the API server so far, of every method.
    pub fn api_requests_total(&self) -> u64 {
        ["GET", "POST", "PUT", "PATCH", "DELETE"]
            .into_iter()
            .map(|method| {
                self.api_requests
                    .get_or_create(&RequestLabels {
                        method: method.into(),
                    })
                    .get()
            })
            .sum()
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
