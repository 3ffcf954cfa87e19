//! The mesh-wide configuration, with Istio's MeshConfig field names and
//! meanings. The control plane reads it from its ConfigMap.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Mesh-wide settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    /// The trust domain of the mesh's SPIFFE identities
    /// (`spiffe://<trustDomain>/ns/<namespace>/sa/<serviceaccount>`). Defaults to `cluster.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub trust_domain: Option<String>,

    /// Where proxies write access logs: `/dev/stdout`, or empty for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log_file: Option<String>,

    /// TEXT or JSON access log lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log_encoding: Option<AccessLogEncoding>,

    /// Whether proxies trace requests (see `defaultConfig.tracing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_tracing: Option<bool>,

    /// Whether the mesh uses mutual TLS toward workloads that have a sidecar
    /// when no DestinationRule says otherwise. Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_auto_mtls: Option<bool>,

    /// What proxies do with traffic to hosts outside the service registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,

    /// The defaults every proxy starts with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_config: Option<ProxyConfig>,
}

/// How access log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum AccessLogEncoding {
    Text,
    Json,
}

/// Istio's outboundTrafficPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    /// ALLOW_ANY passes unknown hosts through; REGISTRY_ONLY refuses them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<OutboundTrafficMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficMode {
    AllowAny,
    RegistryOnly,
}

/// Istio's ProxyConfig: the defaults of every proxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// Worker threads of each proxy; 0 means one per core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub concurrency: Option<i32>,

    /// Start application containers only after the sidecar is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_application_until_proxy_starts: Option<bool>,

    /// Tracing of every proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,

    /// Environment variables given to every proxy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub proxy_metadata: BTreeMap<String, String>,
}

/// Where spans go and how many.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tracing {
    /// The percentage of requests traced, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub sampling: Option<f64>,

    /// The OTLP/gRPC collector, `host:port`. Defaults to the Jaeger addon's
    /// collector when that addon is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_address: Option<String>,
}
