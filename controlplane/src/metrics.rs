//! The control plane's metrics, with istiod's names so that its dashboards
//! read them: pushes by type, push and convergence times, connected
//! proxies, rejected pushes (NACKs), certificates issued, and config that
//! was skipped as invalid.
//!
//! prometheus-client writes counters with the `_total` suffix OpenMetrics
//! asks for (`pilot_xds_pushes_total`); queries with `rate()` over Istio's
//! names work on both.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// `cds`, `eds`, `lds`, `rds` or `sds`.
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The config's kind, `VirtualService`, `DestinationRule`, ….
    pub kind: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub pushes: Family<TypeLabels, Counter>,
    pub push_time: Histogram,
    pub convergence: Histogram,
    pub connected: Gauge,
    pub rejects: Family<TypeLabels, Counter>,
    pub certificates: Counter,
    pub invalid_config: Family<KindLabels, Counter>,
    pub registry: Registry,
}

/// istiod's buckets for push and convergence times, in seconds.
const TIME_BUCKETS: [f64; 9] = [0.01, 0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0];

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Self {
            pushes: Family::default(),
            push_time: Histogram::new(TIME_BUCKETS),
            convergence: Histogram::new(TIME_BUCKETS),
            connected: Gauge::default(),
            rejects: Family::default(),
            certificates: Counter::default(),
            invalid_config: Family::default(),
            registry: Registry::default(),
        };
        let mut registry = Registry::default();
        registry.register(
            "pilot_xds_pushes",
            "Pushes sent to proxies, by type",
            metrics.pushes.clone(),
        );
        registry.register(
            "pilot_xds_push_time",
            "Seconds to generate and send a push to one proxy",
            metrics.push_time.clone(),
        );
        registry.register(
            "pilot_proxy_convergence_time",
            "Seconds from a change to a proxy having ACKed all it was sent for it",
            metrics.convergence.clone(),
        );
        registry.register(
            "pilot_xds",
            "Proxies connected to this control plane",
            metrics.connected.clone(),
        );
        registry.register(
            "pilot_total_xds_rejects",
            "Pushes proxies rejected (NACKs), by type",
            metrics.rejects.clone(),
        );
        registry.register(
            "citadel_server_success_cert_issuance_count",
            "Certificates issued",
            metrics.certificates.clone(),
        );
        registry.register(
            "pilot_total_rejected_configs",
            "Config objects skipped because they are invalid, by kind",
            metrics.invalid_config.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

/// The short name of a type URL, as istiod labels it.
pub fn type_label(type_url: &str) -> &'static str {
    match type_url {
        crate::push::CLUSTER => "cds",
        crate::push::ENDPOINT => "eds",
        crate::push::LISTENER => "lds",
        crate::push::ROUTE => "rds",
        crate::push::SECRET => "sds",
        _ => "other",
    }
}
