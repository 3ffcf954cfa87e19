//! Clusters and their endpoints: where a route's traffic goes, how an
//! endpoint is chosen and how the proxy talks to it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{self as envoy, cluster};
use envoy_types::pb::envoy::config::core::v3::{Address, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};

use crate::envoy::unpack;
use crate::error::{Error, Result};
use crate::model::hash;
use crate::model::resilience::{Limits, Outlier};
use crate::telemetry::peer::{Interned, Service};
use crate::tls::UpstreamTls;

const KIND: &str = "Cluster";
const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// The endpoint metadata auto-mTLS reads (`tlsMode: istio`).
const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
/// Envoy's connect timeout when a cluster sets none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub discovery: Discovery,
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    pub protocol: Protocol,
    /// Its HTTP connections' life (`common_http_protocol_options`).
    pub connections: Connections,
    pub limits: Limits,
    pub outlier: Option<Outlier>,
    /// The service its traffic goes to, as metrics name it.
    pub service: Option<Interned<Service>>,
    pub transport: Transport,
    /// The local address its connections are made from
    /// (`upstream_bind_config`): 127.0.0.6 for a sidecar's inbound
    /// clusters, which the capture rules let through to the workload.
    pub bind: Option<IpAddr>,
    /// TCP keepalive on its connections, when it asks for it.
    pub keepalive: Option<Keepalive>,
}

/// TCP keepalive (`upstream_connection_options.tcp_keepalive`): seconds
/// idle before the first probe, seconds between probes, unanswered probes
/// before the connection is dropped; unset, the system's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Option<u32>,
    pub interval: Option<u32>,
    pub probes: Option<u32>,
}

/// How long an upstream HTTP connection is kept, and for how many
/// requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connections {
    /// How long a connection may go without a request before it is
    /// closed (and never taken again); none: kept until the server
    /// closes it. Unset in the configuration: [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Option<Duration>,
    /// Requests a connection serves before it is closed; none: no limit.
    pub max_requests: Option<u32>,
}

/// How long a free upstream connection is kept when the cluster does not
/// say: shorter than Envoy's hour, so that the server (nginx keeps 75 s,
/// many servers less) closes first rarely and connections do not pile up
/// toward endpoints seldom used.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

impl Default for Connections {
    fn default() -> Self {
        Self {
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_requests: None,
        }
    }
}

impl Connections {
    /// From the cluster's `HttpProtocolOptions` (or, deprecated, its own
    /// `max_requests_per_connection`): 0 means none for either.
    fn from_envoy(
        common: Option<&envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions>,
        deprecated_max_requests: Option<u32>,
    ) -> Self {
        let idle_timeout = match common.and_then(|c| c.idle_timeout.as_ref()) {
            Some(d) => Some(super::duration(d)).filter(|d| !d.is_zero()),
            None => Some(DEFAULT_IDLE_TIMEOUT),
        };
        let max_requests = common
            .and_then(|c| c.max_requests_per_connection.as_ref())
            .map(|v| v.value)
            .or(deprecated_max_requests)
            .filter(|n| *n > 0);
        Self {
            idle_timeout,
            max_requests,
        }
    }
}

/// How connections to its endpoints are made.
#[derive(Debug, Default)]
pub enum Transport {
    #[default]
    Plain,
    /// TLS to every endpoint (`transport_socket`).
    Tls(std::sync::Arc<UpstreamTls>),
    /// TLS to the endpoints with a mesh proxy (`tlsMode: istio`), plaintext
    /// to the others: auto-mTLS (`transport_socket_matches`).
    Mesh(std::sync::Arc<UpstreamTls>),
}

/// Where a cluster's endpoints come from.
#[derive(Debug)]
pub enum Discovery {
    /// Listed in the cluster (STATIC, STRICT_DNS, LOGICAL_DNS).
    Listed(std::sync::Arc<Endpoints>),
    /// From EDS, under this service name.
    Eds(String),
    /// The connection's original destination (ORIGINAL_DST).
    OriginalDst,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
    Random,
    /// By the request's hash on a ring of at least `minimum` and at most
    /// `maximum` entries ([`super::hash::Ring`]).
    RingHash {
        minimum: u64,
        maximum: u64,
    },
    /// By the request's hash in a table of `size` slots
    /// ([`super::hash::Maglev`]).
    Maglev {
        size: u64,
    },
}

impl LbPolicy {
    /// Whether endpoints are chosen by the request's hash.
    pub fn is_consistent(self) -> bool {
        matches!(self, Self::RingHash { .. } | Self::Maglev { .. })
    }
}

/// The HTTP version spoken to the cluster's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// The version the downstream request came with.
    Downstream,
}

/// A ClusterLoadAssignment, converted.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    pub items: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: Target,
    pub weight: u32,
    pub healthy: bool,
    /// Whether a mesh proxy runs beside it (`tlsMode: istio` in its
    /// metadata, which auto-mTLS also reads): it is told who calls.
    pub mesh: bool,
}

/// An endpoint's address: an IP, or a name resolved when connecting.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Ip(SocketAddr),
    Dns(String, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Ip(addr) => addr.fmt(f),
            Target::Dns(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

impl Cluster {
    // `http2_protocol_options` and `max_requests_per_connection` are
    // deprecated, and still read by Envoy.
    #[allow(deprecated)]
    pub fn from_envoy(cluster: &envoy::Cluster) -> Result<Self> {
        let name = &cluster.name;
        let invalid = |field: &str, message: String| Error::resource(KIND, name, field, message);
        let kind = match &cluster.cluster_discovery_type {
            None => cluster::DiscoveryType::Static,
            Some(cluster::ClusterDiscoveryType::Type(t)) => cluster::DiscoveryType::try_from(*t)
                .map_err(|_| invalid("type", format!("unknown discovery type {t}")))?,
            Some(cluster::ClusterDiscoveryType::ClusterType(t)) => {
                return Err(invalid(
                    "cluster_type",
                    format!("custom cluster type {} is not supported", t.name),
                ));
            }
        };
        let discovery = match kind {
            cluster::DiscoveryType::Static
            | cluster::DiscoveryType::StrictDns
            | cluster::DiscoveryType::LogicalDns => {
                Discovery::Listed(std::sync::Arc::new(match &cluster.load_assignment {
                    Some(assignment) => {
                        Endpoints::from_envoy(assignment).map_err(|(field, message)| {
                            invalid(&format!("load_assignment.{field}"), message)
                        })?
                    }
                    None => Endpoints::default(),
                }))
            }
            cluster::DiscoveryType::Eds => Discovery::Eds(
                cluster
                    .eds_cluster_config
                    .as_ref()
                    .map(|c| c.service_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| name.clone()),
            ),
            cluster::DiscoveryType::OriginalDst => Discovery::OriginalDst,
        };
        let lb = match cluster::LbPolicy::try_from(cluster.lb_policy) {
            Ok(cluster::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
            Ok(cluster::LbPolicy::LeastRequest) => LbPolicy::LeastRequest,
            Ok(cluster::LbPolicy::Random) => LbPolicy::Random,
            Ok(cluster::LbPolicy::RingHash) => {
                let config = match &cluster.lb_config {
                    Some(cluster::LbConfig::RingHashLbConfig(c)) => Some(c),
                    _ => None,
                };
                let minimum = config
                    .and_then(|c| c.minimum_ring_size.as_ref())
                    .map_or(hash::MINIMUM_RING_SIZE, |v| v.value);
                let maximum = config
                    .and_then(|c| c.maximum_ring_size.as_ref())
                    .map_or(hash::MAXIMUM_RING_SIZE, |v| v.value);
                if minimum == 0 || minimum > maximum || maximum > hash::MAXIMUM_RING_SIZE {
                    return Err(invalid(
                        "ring_hash_lb_config",
                        format!(
                            "the ring needs 1 <= minimum_ring_size ({minimum}) <= \
                             maximum_ring_size ({maximum}) <= {}",
                            hash::MAXIMUM_RING_SIZE
                        ),
                    ));
                }
                LbPolicy::RingHash { minimum, maximum }
            }
            Ok(cluster::LbPolicy::Maglev) => {
                let size = match &cluster.lb_config {
                    Some(cluster::LbConfig::MaglevLbConfig(c)) => c.table_size.as_ref(),
                    _ => None,
                }
                .map_or(hash::MAGLEV_TABLE_SIZE, |v| v.value);
                if !hash::is_prime(size) || size > 5_000_011 {
                    return Err(invalid(
                        "maglev_lb_config.table_size",
                        format!("{size} is not a prime of at most 5000011"),
                    ));
                }
                LbPolicy::Maglev { size }
            }
            // ORIGINAL_DST clusters carry CLUSTER_PROVIDED: there is one
            // endpoint to choose.
            Ok(cluster::LbPolicy::ClusterProvided)
                if matches!(discovery, Discovery::OriginalDst) =>
            {
                LbPolicy::RoundRobin
            }
            Ok(other) => {
                return Err(invalid(
                    "lb_policy",
                    format!("{} is not supported", other.as_str_name()),
                ));
            }
            Err(_) => {
                return Err(invalid(
                    "lb_policy",
                    format!("unknown policy {}", cluster.lb_policy),
                ));
            }
        };
        let connect_timeout = cluster
            .connect_timeout
            .as_ref()
            .map(super::duration)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let options: Option<HttpProtocolOptions> = cluster
            .typed_extension_protocol_options
            .get(HTTP_OPTIONS)
            .map(|any| {
                unpack(any).map_err(|e| {
                    invalid(
                        &format!("typed_extension_protocol_options[{HTTP_OPTIONS}]"),
                        e,
                    )
                })
            })
            .transpose()?;
        let connections = Connections::from_envoy(
            options
                .as_ref()
                .and_then(|o| o.common_http_protocol_options.as_ref()),
            cluster
                .max_requests_per_connection
                .as_ref()
                .map(|v| v.value),
        );
        let protocol = match options.and_then(|o| o.upstream_protocol_options) {
            Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(c)) => {
                match c.protocol_config {
                    Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)) => Protocol::Http2,
                    _ => Protocol::Http1,
                }
            }
            Some(http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                _,
            )) => Protocol::Downstream,
            _ if cluster.http2_protocol_options.is_some() => Protocol::Http2,
            _ => Protocol::Http1,
        };
        let transport = transport(cluster).map_err(|(f, e)| invalid(&f, e))?;
        let bind = cluster
            .upstream_bind_config
            .as_ref()
            .and_then(|b| b.source_address.as_ref())
            .map(|a| {
                a.address.parse::<IpAddr>().map_err(|_| {
                    invalid(
                        "upstream_bind_config.source_address.address",
                        format!("{:?} is not an IP address", a.address),
                    )
                })
            })
            .transpose()?;
        Ok(Self {
            bind,
            transport,
            name: name.clone(),
            discovery,
            lb,
            connect_timeout,
            protocol,
            connections,
            keepalive: cluster
                .upstream_connection_options
                .as_ref()
                .and_then(|o| o.tcp_keepalive.as_ref())
                .map(|k| Keepalive {
                    time: k.keepalive_time.as_ref().map(|v| v.value),
                    interval: k.keepalive_interval.as_ref().map(|v| v.value),
                    probes: k.keepalive_probes.as_ref().map(|v| v.value),
                }),
            limits: Limits::from_envoy(cluster.circuit_breakers.as_ref()),
            outlier: cluster.outlier_detection.as_ref().map(Outlier::from_envoy),
            service: Service::of_cluster(
                name,
                cluster
                    .metadata
                    .as_ref()
                    .and_then(|m| m.filter_metadata.get("istio")),
            ),
        })
    }
}

/// A cluster's transport socket, or its matches on `tlsMode: istio`.
fn transport(cluster: &envoy::Cluster) -> std::result::Result<Transport, (String, String)> {
    if let Some(socket) = &cluster.transport_socket {
        return Ok(UpstreamTls::from_envoy(socket)
            .map_err(|(f, e)| (format!("transport_socket.{f}"), e))?
            .map_or(Transport::Plain, |tls| {
                Transport::Tls(std::sync::Arc::new(tls))
            }));
    }
    for (i, matched) in cluster.transport_socket_matches.iter().enumerate() {
        let mesh = matched
            .r#match
            .as_ref()
            .and_then(|m| m.fields.get("tlsMode"))
            .is_some_and(|mode| {
                matches!(&mode.kind, Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) if s == "istio")
            });
        let Some(socket) = matched.transport_socket.as_ref().filter(|_| mesh) else {
            continue;
        };
        let field = format!("transport_socket_matches[{i}].transport_socket");
        if let Some(tls) =
            UpstreamTls::from_envoy(socket).map_err(|(f, e)| (format!("{field}.{f}"), e))?
        {
            return Ok(Transport::Mesh(std::sync::Arc::new(tls)));
        }
    }
    Ok(Transport::Plain)
}

impl Cluster {
    /// The TLS to speak to an endpoint, with or without a mesh proxy
    /// beside it; none for plaintext.
    pub fn tls_for(&self, mesh: bool) -> Option<&std::sync::Arc<UpstreamTls>> {
        match &self.transport {
            Transport::Plain => None,
            Transport::Tls(tls) => Some(tls),
            Transport::Mesh(tls) => mesh.then_some(tls),
        }
    }

    /// The EDS service name its endpoints come under, if from EDS.
    /// The secrets its TLS names over SDS.
    pub fn sds_names(&self) -> impl Iterator<Item = &str> {
        match &self.transport {
            Transport::Plain => None,
            Transport::Tls(tls) | Transport::Mesh(tls) => Some(tls.sds_names()),
        }
        .into_iter()
        .flatten()
    }

    pub fn eds_service(&self) -> Option<&str> {
        match &self.discovery {
            Discovery::Eds(service) => Some(service),
            _ => None,
        }
    }
}

impl Endpoints {
    /// Converts an assignment; an error names the field within it.
    pub fn from_envoy(
        assignment: &ClusterLoadAssignment,
    ) -> std::result::Result<Self, (String, String)> {
        let mut items = Vec::new();
        for (l, locality) in assignment.endpoints.iter().enumerate() {
            for (e, endpoint) in locality.lb_endpoints.iter().enumerate() {
                let field = format!("endpoints[{l}].lb_endpoints[{e}]");
                let Some(lb_endpoint::HostIdentifier::Endpoint(inner)) = &endpoint.host_identifier
                else {
                    return Err((field, "no endpoint address".into()));
                };
                let address = target(inner.address.as_ref())
                    .map_err(|message| (format!("{field}.endpoint.address"), message))?;
                // UNKNOWN (0) and HEALTHY (1) take traffic, as in Envoy.
                let healthy = matches!(endpoint.health_status, 0 | 1);
                let mesh = endpoint
                    .metadata
                    .as_ref()
                    .and_then(|m| m.filter_metadata.get(TRANSPORT_SOCKET_MATCH))
                    .and_then(|m| m.fields.get("tlsMode"))
                    .is_some_and(|mode| {
                        matches!(&mode.kind, Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) if s == "istio")
                    });
                items.push(Endpoint {
                    mesh,
                    address,
                    weight: endpoint
                        .load_balancing_weight
                        .as_ref()
                        .map_or(1, |w| w.value.max(1)),
                    healthy,
                });
            }
        }
        Ok(Self { items })
    }
}

/// A socket address as an endpoint target.
fn target(address: Option<&Address>) -> std::result::Result<Target, String> {
    let Some(address::Address::SocketAddress(socket)) = address.and_then(|a| a.address.as_ref())
    else {
        return Err("only socket addresses are supported".into());
    };
    let port = match socket.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(p).map_err(|_| format!("port {p} is out of range"))?
        }
        _ => return Err("a port_value is needed".into()),
    };
    Ok(match socket.address.parse::<IpAddr>() {
        Ok(ip) => Target::Ip(SocketAddr::new(ip, port)),
        Err(_) if !socket.address.is_empty() => Target::Dns(socket.address.clone(), port),
        Err(_) => return Err("an empty address".into()),
    })
}

/// A listener's or admin's socket address.
pub fn socket_address(address: Option<&Address>) -> std::result::Result<SocketAddr, String> {
    match target(address)? {
        Target::Ip(addr) => Ok(addr),
        Target::Dns(host, _) => Err(format!("{host:?} is not an IP address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::from_json;
    use serde_json::json;

    #[test]
    fn clusters_convert_with_envoys_defaults() {
        let cluster = Cluster::from_envoy(&from_json(json!({
            "name": "outbound|9080||reviews.shop.svc.cluster.local",
            "type": "EDS",
            "eds_cluster_config": {"eds_config": {"ads": {}}, "service_name": "outbound|9080||reviews.shop.svc.cluster.local"},
            "lb_policy": "LEAST_REQUEST",
            "typed_extension_protocol_options": {HTTP_OPTIONS: {
                "@type": format!("type.googleapis.com/{HTTP_OPTIONS}"),
                "explicit_http_config": {"http2_protocol_options": {}},
            }},
        })).unwrap())
        .unwrap();
        assert!(
            matches!(cluster.discovery, Discovery::Eds(ref s) if s.ends_with("reviews.shop.svc.cluster.local"))
        );
        assert_eq!(cluster.lb, LbPolicy::LeastRequest);
        assert_eq!(cluster.protocol, Protocol::Http2);
        assert_eq!(cluster.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(cluster.connections, Connections::default());
    }

    #[test]
    fn connections_live_as_the_http_protocol_options_say() {
        let connections =
            |common: serde_json::Value| {
                Cluster::from_envoy(&from_json(json!({
                "name": "c", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
                "typed_extension_protocol_options": {HTTP_OPTIONS: {
                    "@type": format!("type.googleapis.com/{HTTP_OPTIONS}"),
                    "common_http_protocol_options": common,
                    "explicit_http_config": {"http_protocol_options": {}},
                }},
            })).unwrap())
            .unwrap()
            .connections
            };
        assert_eq!(
            connections(json!({"idle_timeout": "30s", "max_requests_per_connection": 100})),
            Connections {
                idle_timeout: Some(Duration::from_secs(30)),
                max_requests: Some(100)
            }
        );
        assert_eq!(
            connections(json!({"idle_timeout": "0s", "max_requests_per_connection": 0})),
            Connections {
                idle_timeout: None,
                max_requests: None
            },
            "0 means none for both"
        );
        assert_eq!(connections(json!({})), Connections::default());
    }

    #[test]
    fn listed_endpoints_keep_weight_and_health() {
        let cluster = Cluster::from_envoy(&from_json(json!({
            "name": "app", "type": "STRICT_DNS", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8001}}}, "load_balancing_weight": 3},
                {"endpoint": {"address": {"socket_address": {"address": "localhost", "port_value": 8002}}}, "health_status": "UNHEALTHY"},
            ]}]},
        })).unwrap())
        .unwrap();
        let Discovery::Listed(endpoints) = cluster.discovery else {
            panic!()
        };
        assert_eq!(
            endpoints.items[0].address,
            Target::Ip("127.0.0.1:8001".parse().unwrap())
        );
        assert_eq!(endpoints.items[0].weight, 3);
        assert_eq!(
            endpoints.items[1].address,
            Target::Dns("localhost".into(), 8002)
        );
        assert!(!endpoints.items[1].healthy);
        assert_eq!(cluster.connect_timeout, Duration::from_millis(250));
    }

    #[test]
    fn unsupported_policies_name_the_field() {
        let error = Cluster::from_envoy(
            &from_json(json!({"name": "c", "lb_policy": "CLUSTER_PROVIDED"})).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            "Cluster c: lb_policy: CLUSTER_PROVIDED is not supported"
        );
    }
}
