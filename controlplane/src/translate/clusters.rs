//! Outbound clusters and their endpoints: one cluster per service port and
//! per DestinationRule subset, named `outbound|<port>|<subset>|<host>`.

use std::collections::BTreeMap;

use bowline_api::networking::{
    ClientTlsMode, ClientTlsSettings, ConnectionPoolSettings, ConsistentHashLb,
    DestinationRuleSpec, H2UpgradePolicy, LoadBalancerSettings, OutlierDetection,
    PortTrafficPolicy, RetryBudget, SimpleLb, TcpKeepalive, TrafficPolicy,
};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, HttpProtocolOptions as CoreHttpOptions, Metadata, data_source,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, TlsCertificate,
    UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use envoy_types::util::pack_any;

use super::gateway::credential_resource;
use super::listeners::{ROOT_SECRET, mesh_tls_context, sds, transport_socket};
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection as EnvoyOutlierDetection, UpstreamConnectionOptions,
    circuit_breakers, cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, SocketAddress,
    TcpKeepalive as EnvoyTcpKeepalive, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::google::protobuf::{UInt32Value, UInt64Value};

use super::duration;
use crate::model::{Endpoint, Protocol, Resolution, Service, selects};
use bowline_api::duration::parse as parse_duration;

/// Istio's default connect timeout.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The endpoint metadata auto-mTLS matches on, as Istio's.
const TLS_MODE: &str = "tlsMode";
/// Where a proxy finds the system's trusted roots, for SIMPLE TLS without
/// `caCertificates`.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Istio's "no limit" for circuit breakers.
const UNLIMITED: u32 = u32::MAX;

/// `outbound|<port>|<subset>|<host>`.
pub fn cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// The outbound clusters of `service`: one per port, and one per port and
/// subset of its DestinationRule, each with the rule's policy (a subset's
/// own policy laid over the rule's).
/// `identities` are the SPIFFE IDs the service's workloads run as: mesh
/// TLS toward it accepts only those (any mesh identity when empty).
pub fn outbound_clusters(
    service: &Service,
    rule: Option<&DestinationRuleSpec>,
    identities: &[String],
) -> Vec<Cluster> {
    let host = &service.hostname;
    let base = rule.and_then(|r| r.traffic_policy.as_ref());
    let mut clusters = Vec::new();
    for port in &service.ports {
        let mut subsets = vec![("", base.cloned())];
        subsets.extend(
            rule.iter()
                .flat_map(|r| r.subsets.iter())
                .map(|s| (s.name.as_str(), merge(base, s.traffic_policy.as_ref()))),
        );
        for (subset, policy) in subsets {
            let name = cluster_name(port.port, subset, host);
            let mut built = cluster(&name, policy.as_ref(), port.port);
            let tls = port_setting(
                policy.as_ref(),
                port.port,
                |p| p.tls.as_ref(),
                |p| p.tls.as_ref(),
            );
            let sni = format!("outbound_.{}_.{subset}_.{host}", port.port);
            upstream_tls(&mut built, tls, !service.external, &sni, host, identities);
            built.metadata = service_metadata(&[service]);
            if port.protocol.is_http() || port.protocol == Protocol::Unknown {
                http_options(&mut built, policy.as_ref(), port.port, port.protocol);
            }
            clusters.push(built);
        }
    }
    clusters
}

/// Istio's cluster metadata naming the services a cluster sends to
/// (`istio: {services: [{host, name, namespace}]}`), which proxies label
/// their metrics with. A Kubernetes service's name is its host's first
/// label; a ServiceEntry host is its own name.
pub fn service_metadata(services: &[&Service]) -> Option<Metadata> {
    if services.is_empty() {
        return None;
    }
    let text = |s: &str| Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    };
    let entries = services
        .iter()
        .map(|service| {
            let host = &service.hostname;
            let name = host
                .strip_suffix(".svc.cluster.local")
                .and_then(|rest| rest.strip_suffix(&format!(".{}", service.namespace)))
                .filter(|name| !name.contains('.'))
                .unwrap_or(host);
            Value {
                kind: Some(value::Kind::StructValue(Struct {
                    fields: [
                        ("host".to_string(), text(host)),
                        ("name".to_string(), text(name)),
                        ("namespace".to_string(), text(&service.namespace)),
                    ]
                    .into(),
                })),
            }
        })
        .collect();
    Some(Metadata {
        filter_metadata: [(
            "istio".to_string(),
            Struct {
                fields: [(
                    "services".to_string(),
                    Value {
                        kind: Some(value::Kind::ListValue(
                            envoy_types::pb::google::protobuf::ListValue { values: entries },
                        )),
                    },
                )]
                .into(),
            },
        )]
        .into(),
        ..Default::default()
    })
}

/// A setting of the policy, its port-level one for `port` first.
fn port_setting<'p, T>(
    policy: Option<&'p TrafficPolicy>,
    port: u32,
    at_port: impl Fn(&'p PortTrafficPolicy) -> Option<&'p T>,
    at_policy: impl Fn(&'p TrafficPolicy) -> Option<&'p T>,
) -> Option<&'p T> {
    policy
        .and_then(|p| {
            p.port_level_settings
                .iter()
                .find(|s| s.port.as_ref().is_some_and(|sel| sel.number == port))
        })
        .and_then(at_port)
        .or_else(|| policy.and_then(at_policy))
}

/// TLS toward the endpoints. Without a `tls` setting, auto-mTLS: mutual
/// TLS with the mesh certificate to endpoints labelled as having a
/// sidecar, plaintext to the rest. ISTIO_MUTUAL always mesh mTLS; SIMPLE
/// and MUTUAL originate TLS with the rule's CA and client credential
/// (a `credentialName` Secret over SDS, or files on the proxy), checking
/// the server's certificate for the rule's `subjectAltNames` — or, when it
/// names none, for its `sni` or the service's `host` (but a wildcard), so
/// that a certificate for another name is refused; DISABLE plaintext.
fn upstream_tls(
    cluster: &mut Cluster,
    tls: Option<&ClientTlsSettings>,
    mesh: bool,
    sni: &str,
    host: &str,
    identities: &[String],
) {
    let mesh_context = || {
        let mut common = mesh_tls_context(vec!["istio".into()]);
        if !identities.is_empty() {
            // The root over SDS, and only the service's identities.
            common.validation_context_type = Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: identities
                                .iter()
                                .map(|id| SubjectAltNameMatcher {
                                    san_type: subject_alt_name_matcher::SanType::Uri as i32,
                                    matcher: Some(StringMatcher {
                                        match_pattern: Some(string_matcher::MatchPattern::Exact(
                                            id.clone(),
                                        )),
                                        ..Default::default()
                                    }),
                                    ..Default::default()
                                })
                                .collect(),
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                        ..Default::default()
                    },
                ),
            );
        }
        transport_socket(pack_any(UpstreamTlsContext {
            common_tls_context: Some(common),
            sni: sni.to_string(),
            ..Default::default()
        }))
    };
    match tls.map(|t| t.mode) {
        None if mesh => {
            cluster.transport_socket_matches = vec![cluster::TransportSocketMatch {
                name: "tlsMode-istio".into(),
                r#match: Some(Struct {
                    fields: [(
                        TLS_MODE.to_string(),
                        Value {
                            kind: Some(value::Kind::StringValue("istio".into())),
                        },
                    )]
                    .into(),
                }),
                transport_socket: Some(mesh_context()),
            }];
        }
        Some(ClientTlsMode::IstioMutual) => cluster.transport_socket = Some(mesh_context()),
        Some(ClientTlsMode::Simple) | Some(ClientTlsMode::Mutual) => {
            let tls = tls.expect("a mode means settings");
            let credential = tls.credential_name.as_deref().map(credential_resource);
            // A wildcard host names no one server: its chain is checked.
            let names: Vec<String> = match (&tls.sni, tls.subject_alt_names.is_empty()) {
                (_, false) => tls.subject_alt_names.clone(),
                (Some(sni), true) => vec![sni.clone()],
                (None, true) if host.starts_with('*') => Vec::new(),
                (None, true) => vec![host.to_string()],
            };
            let names = CertificateValidationContext {
                match_typed_subject_alt_names: names
                    .iter()
                    .map(|san| SubjectAltNameMatcher {
                        san_type: subject_alt_name_matcher::SanType::Dns as i32,
                        matcher: Some(StringMatcher {
                            match_pattern: Some(string_matcher::MatchPattern::Exact(san.clone())),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            let validation = if tls.insecure_skip_verify == Some(true) {
                None
            } else if let Some(credential) = &credential {
                // The credential's CA over SDS, and the names.
                Some(
                    common_tls_context::ValidationContextType::CombinedValidationContext(
                        common_tls_context::CombinedCertificateValidationContext {
                            default_validation_context: Some(names),
                            validation_context_sds_secret_config: Some(sds(&format!(
                                "{credential}-cacert"
                            ))),
                            ..Default::default()
                        },
                    ),
                )
            } else {
                let trusted_ca = match &tls.ca_certificates {
                    Some(path) => file(path),
                    None => file(SYSTEM_ROOTS),
                };
                Some(
                    common_tls_context::ValidationContextType::ValidationContext(
                        CertificateValidationContext {
                            trusted_ca: Some(trusted_ca),
                            ..names
                        },
                    ),
                )
            };
            let mut common = CommonTlsContext {
                validation_context_type: validation,
                ..Default::default()
            };
            if tls.mode == ClientTlsMode::Mutual {
                match (&credential, &tls.client_certificate, &tls.private_key) {
                    (Some(credential), _, _) => {
                        common.tls_certificate_sds_secret_configs = vec![sds(credential)]
                    }
                    (None, Some(cert), Some(key)) => {
                        common.tls_certificates = vec![TlsCertificate {
                            certificate_chain: Some(file(cert)),
                            private_key: Some(file(key)),
                            ..Default::default()
                        }]
                    }
                    _ => {}
                }
            }
            cluster.transport_socket = Some(transport_socket(pack_any(UpstreamTlsContext {
                common_tls_context: Some(common),
                sni: tls.sni.clone().unwrap_or_default(),
                ..Default::default()
            })));
        }
        _ => {}
    }
}

fn file(path: &str) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::Filename(path.to_string())),
        ..Default::default()
    }
}

/// The connection pool's HTTP settings: requests per connection, idle
/// timeout, and HTTP/2 toward the endpoints for HTTP/2 and gRPC ports or
/// when `h2UpgradePolicy: UPGRADE` asks; a port of unknown protocol, whose
/// HTTP is found by sniffing, speaks to its endpoints as the client spoke.
pub(crate) fn http_options(
    cluster: &mut Cluster,
    policy: Option<&TrafficPolicy>,
    port: u32,
    protocol: Protocol,
) {
    let http = port_setting(
        policy,
        port,
        |p| p.connection_pool.as_ref(),
        |p| p.connection_pool.as_ref(),
    )
    .and_then(|pool| pool.http.as_ref());
    let h2 = matches!(protocol, Protocol::Http2 | Protocol::Grpc)
        || http.and_then(|h| h.h2_upgrade_policy) == Some(H2UpgradePolicy::Upgrade);
    let idle = http
        .and_then(|h| h.idle_timeout.as_deref())
        .and_then(parse_duration);
    let per_connection = http
        .and_then(|h| h.max_requests_per_connection)
        .filter(|n| *n > 0);
    let sniffed = protocol == Protocol::Unknown && !h2;
    if !h2 && !sniffed && idle.is_none() && per_connection.is_none() {
        return;
    }
    let explicit = |protocol_config| {
        http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
            http_protocol_options::ExplicitHttpConfig {
                protocol_config: Some(protocol_config),
            },
        )
    };
    let upstream = if h2 {
        explicit(
            http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                Default::default(),
            ),
        )
    } else if sniffed {
        http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
            http_protocol_options::UseDownstreamHttpConfig {
                http_protocol_options: Some(Default::default()),
                http2_protocol_options: Some(Default::default()),
                ..Default::default()
            },
        )
    } else {
        explicit(
            http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                Default::default(),
            ),
        )
    };
    let options = HttpProtocolOptions {
        common_http_protocol_options: Some(CoreHttpOptions {
            idle_timeout: idle.map(duration),
            max_requests_per_connection: per_connection.map(|n| UInt32Value { value: n as u32 }),
            ..Default::default()
        }),
        upstream_protocol_options: Some(upstream),
        ..Default::default()
    };
    cluster.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        pack_any(options),
    );
}

/// Clusters of services the proxy resolves itself: DNS names carried in
/// the cluster (STRICT_DNS), or passthrough to the original destination.
pub fn resolve(
    clusters: &mut [Cluster],
    service: &Service,
    endpoints: &[Endpoint],
    rule: Option<&DestinationRuleSpec>,
) {
    let kind = match service.resolution {
        Resolution::Endpoints => return,
        Resolution::Dns => cluster::DiscoveryType::StrictDns,
        Resolution::Passthrough => cluster::DiscoveryType::OriginalDst,
    };
    let mut assignments: BTreeMap<String, ClusterLoadAssignment> = load_assignments(
        &Service {
            resolution: Resolution::Endpoints,
            ..service.clone()
        },
        endpoints,
        rule,
    )
    .into_iter()
    .map(|a| (a.cluster_name.clone(), a))
    .collect();
    for c in clusters {
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(kind as i32));
        c.eds_cluster_config = None;
        if service.resolution == Resolution::Dns {
            c.load_assignment = assignments.remove(&c.name);
        } else {
            c.lb_policy = cluster::LbPolicy::ClusterProvided as i32;
        }
    }
}

/// A subset's policy replaces the rule's field by field, as Istio merges
/// them.
fn merge(base: Option<&TrafficPolicy>, over: Option<&TrafficPolicy>) -> Option<TrafficPolicy> {
    match (base, over) {
        (None, None) => None,
        (Some(b), None) => Some(b.clone()),
        (None, Some(o)) => Some(o.clone()),
        (Some(b), Some(o)) => Some(TrafficPolicy {
            load_balancer: o.load_balancer.clone().or_else(|| b.load_balancer.clone()),
            connection_pool: o
                .connection_pool
                .clone()
                .or_else(|| b.connection_pool.clone()),
            outlier_detection: o
                .outlier_detection
                .clone()
                .or_else(|| b.outlier_detection.clone()),
            tls: o.tls.clone().or_else(|| b.tls.clone()),
            port_level_settings: if o.port_level_settings.is_empty() {
                b.port_level_settings.clone()
            } else {
                o.port_level_settings.clone()
            },
            retry_budget: o.retry_budget.clone().or_else(|| b.retry_budget.clone()),
        }),
    }
}

/// The load balancer settings of `policy` for `port`: its port-level ones
/// for the port, else its own.
pub(crate) fn load_balancer_at(
    policy: Option<&TrafficPolicy>,
    port: u32,
) -> Option<&LoadBalancerSettings> {
    port_setting(
        policy,
        port,
        |p| p.load_balancer.as_ref(),
        |p| p.load_balancer.as_ref(),
    )
}

/// The consistent hash `rule` asks for its host's `port`: the policy of
/// `subset` (when one is named) decides, else the rule's own.
pub(crate) fn consistent_hash_at<'r>(
    rule: &'r DestinationRuleSpec,
    subset: Option<&str>,
    port: u32,
) -> Option<&'r ConsistentHashLb> {
    let subset = subset
        .and_then(|name| rule.subsets.iter().find(|s| s.name == name))
        .and_then(|s| s.traffic_policy.as_ref());
    [subset, rule.traffic_policy.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|policy| load_balancer_at(Some(policy), port))
        .and_then(|lb| lb.consistent_hash.as_ref())
}

/// Istio's smallest ring when a DestinationRule names none.
const MINIMUM_RING_SIZE: u64 = 1024;

fn cluster(name: &str, policy: Option<&TrafficPolicy>, port: u32) -> Cluster {
    // Port-level settings replace the policy's for their port.
    let port_level = policy.and_then(|p| {
        p.port_level_settings
            .iter()
            .find(|s| s.port.as_ref().is_some_and(|sel| sel.number == port))
    });
    let load_balancer = load_balancer_at(policy, port);
    let pool = port_level
        .and_then(|p| p.connection_pool.as_ref())
        .or_else(|| policy.and_then(|p| p.connection_pool.as_ref()));
    let outlier = port_level
        .and_then(|p| p.outlier_detection.as_ref())
        .or_else(|| policy.and_then(|p| p.outlier_detection.as_ref()));

    let passthrough = load_balancer.and_then(|lb| lb.simple) == Some(SimpleLb::Passthrough);
    let lb_policy = match load_balancer.and_then(|lb| lb.simple) {
        Some(SimpleLb::Random) => cluster::LbPolicy::Random,
        Some(SimpleLb::LeastRequest) | Some(SimpleLb::LeastConn) => cluster::LbPolicy::LeastRequest,
        Some(SimpleLb::Passthrough) => cluster::LbPolicy::ClusterProvided,
        _ => cluster::LbPolicy::RoundRobin,
    };
    // Consistent hashing overrides `simple`, as in Istio: MAGLEV when it
    // asks, else RING_HASH (routes to the cluster carry the hash policy).
    let (lb_policy, lb_config) = match load_balancer.and_then(|lb| lb.consistent_hash.as_ref()) {
        Some(hash) if !passthrough => match &hash.maglev {
            Some(maglev) => (
                cluster::LbPolicy::Maglev,
                Some(cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
                    table_size: maglev.table_size.map(|value| UInt64Value { value }),
                })),
            ),
            None => (
                cluster::LbPolicy::RingHash,
                Some(cluster::LbConfig::RingHashLbConfig(
                    cluster::RingHashLbConfig {
                        minimum_ring_size: Some(UInt64Value {
                            value: hash
                                .ring_hash
                                .as_ref()
                                .and_then(|r| r.minimum_ring_size)
                                .or(hash.minimum_ring_size)
                                .unwrap_or(MINIMUM_RING_SIZE),
                        }),
                        ..Default::default()
                    },
                )),
            ),
        },
        _ => (lb_policy, None),
    };
    let connect_timeout = pool
        .and_then(|p| p.tcp.as_ref())
        .and_then(|t| t.connect_timeout.as_deref())
        .and_then(parse_duration)
        .unwrap_or(CONNECT_TIMEOUT);
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(if passthrough {
            cluster::DiscoveryType::OriginalDst as i32
        } else {
            cluster::DiscoveryType::Eds as i32
        })),
        eds_cluster_config: (!passthrough).then(|| cluster::EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                ..Default::default()
            }),
            service_name: name.to_string(),
        }),
        lb_policy: lb_policy as i32,
        lb_config,
        connect_timeout: Some(duration(connect_timeout)),
        circuit_breakers: Some(circuit_breakers(
            pool,
            policy.and_then(|p| p.retry_budget.as_ref()),
        )),
        upstream_connection_options: pool
            .and_then(|p| p.tcp.as_ref())
            .and_then(|t| t.tcp_keepalive.as_ref())
            .map(keepalive),
        outlier_detection: outlier.map(outlier_detection),
        ..Default::default()
    }
}

/// TCP keepalive as Envoy takes it: whole seconds.
fn keepalive(keepalive: &TcpKeepalive) -> UpstreamConnectionOptions {
    let seconds = |text: Option<&str>| {
        text.and_then(parse_duration).map(|d| UInt32Value {
            value: d.as_secs().min(u64::from(u32::MAX)) as u32,
        })
    };
    UpstreamConnectionOptions {
        tcp_keepalive: Some(EnvoyTcpKeepalive {
            keepalive_probes: keepalive.probes.map(|value| UInt32Value { value }),
            keepalive_time: seconds(keepalive.time.as_deref()),
            keepalive_interval: seconds(keepalive.interval.as_deref()),
        }),
        ..Default::default()
    }
}

/// The connection pool's limits and the retry budget (which replaces
/// `maxRetries` in Envoy when present; its unset fields keep Envoy's
/// defaults, 20 % and 3).
fn circuit_breakers(
    pool: Option<&ConnectionPoolSettings>,
    budget: Option<&RetryBudget>,
) -> CircuitBreakers {
    let limit = |value: Option<i32>| {
        Some(UInt32Value {
            value: value.filter(|v| *v > 0).map_or(UNLIMITED, |v| v as u32),
        })
    };
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            max_connections: limit(tcp.and_then(|t| t.max_connections)),
            max_pending_requests: limit(http.and_then(|h| h.http1_max_pending_requests)),
            max_requests: limit(http.and_then(|h| h.http2_max_requests)),
            max_retries: limit(http.and_then(|h| h.max_retries)),
            retry_budget: budget.map(|b| circuit_breakers::thresholds::RetryBudget {
                budget_percent: b.percent.map(|value| Percent { value }),
                min_retry_concurrency: b.min_retry_concurrency.map(|value| UInt32Value { value }),
                budget_interval: None,
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Istio's mapping: the 5xx and gateway-error counts eject (enforced at
/// 100 %) only when set; success-rate ejection stays off.
fn outlier_detection(outlier: &OutlierDetection) -> EnvoyOutlierDetection {
    let count = |v: Option<u32>| v.map(|value| UInt32Value { value });
    let enforce = |v: Option<u32>| UInt32Value {
        value: if v.is_some_and(|v| v > 0) { 100 } else { 0 },
    };
    let time = |text: Option<&str>| text.and_then(parse_duration).map(duration);
    EnvoyOutlierDetection {
        consecutive_5xx: Some(UInt32Value {
            value: outlier.consecutive_5xx_errors.unwrap_or(0),
        }),
        enforcing_consecutive_5xx: Some(enforce(outlier.consecutive_5xx_errors)),
        consecutive_gateway_failure: count(outlier.consecutive_gateway_errors),
        enforcing_consecutive_gateway_failure: Some(enforce(outlier.consecutive_gateway_errors)),
        enforcing_success_rate: Some(UInt32Value { value: 0 }),
        interval: time(outlier.interval.as_deref()),
        base_ejection_time: time(outlier.base_ejection_time.as_deref()),
        max_ejection_percent: outlier.max_ejection_percent.map(|v| UInt32Value {
            value: v.clamp(0, 100) as u32,
        }),
        ..Default::default()
    }
}

/// The endpoints of each outbound cluster of `service`: every ready
/// endpoint for the port's cluster, those whose labels match a subset for
/// the subset's.
pub fn load_assignments(
    service: &Service,
    endpoints: &[Endpoint],
    rule: Option<&DestinationRuleSpec>,
) -> Vec<ClusterLoadAssignment> {
    if service.resolution != Resolution::Endpoints {
        // Carried in the clusters themselves, or none at all.
        return Vec::new();
    }
    let host = &service.hostname;
    let mut assignments = Vec::new();
    for port in &service.ports {
        let serving: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| e.service_port == port.port)
            .collect();
        assignments.push(assignment(&cluster_name(port.port, "", host), &serving));
        for subset in rule.iter().flat_map(|r| r.subsets.iter()) {
            let selected: Vec<&Endpoint> = serving
                .iter()
                .copied()
                .filter(|e| selects(&subset.labels, &e.labels))
                .collect();
            assignments.push(assignment(
                &cluster_name(port.port, &subset.name, host),
                &selected,
            ));
        }
    }
    assignments
}

fn assignment(name: &str, endpoints: &[&Endpoint]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: endpoints
                .iter()
                .map(|e| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
                        envoy_types::pb::envoy::config::endpoint::v3::Endpoint {
                            address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                                address: Some(address::Address::SocketAddress(SocketAddress {
                                    address: e.address.clone(),
                                    port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                        e.port,
                                    )),
                                    ..Default::default()
                                })),
                            }),
                            ..Default::default()
                        },
                    )),
                    // Auto-mTLS picks its transport socket by this.
                    metadata: e.sidecar.then(|| Metadata {
                        filter_metadata: [(
                            "envoy.transport_socket_match".to_string(),
                            Struct {
                                fields: [(
                                    TLS_MODE.to_string(),
                                    Value {
                                        kind: Some(value::Kind::StringValue("istio".into())),
                                    },
                                )]
                                .into(),
                            },
                        )]
                        .into(),
                        ..Default::default()
                    }),
                    health_status: if e.ready {
                        HealthStatus::Healthy
                    } else {
                        HealthStatus::Unhealthy
                    } as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use envoy_types::pb::google::protobuf::Duration;
    use serde_json::json;

    use super::*;
    use crate::model::{Protocol, ServicePort};

    fn service(name: &str, port: u32) -> Service {
        Service::kubernetes(
            name,
            "shop",
            vec![ServicePort {
                name: "http".into(),
                port,
                protocol: Protocol::Http,
            }],
        )
    }

    fn rule(spec: serde_json::Value) -> DestinationRuleSpec {
        serde_json::from_value(spec).unwrap()
    }

    #[test]
    fn a_service_port_and_its_subsets_become_eds_clusters() {
        let rule = rule(json!({"host": "reviews", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
        ]}));
        let clusters = outbound_clusters(&service("reviews", 9080), Some(&rule), &[]);
        let names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "outbound|9080||reviews.shop.svc.cluster.local",
                "outbound|9080|v1|reviews.shop.svc.cluster.local",
                "outbound|9080|v2|reviews.shop.svc.cluster.local",
            ]
        );
        let eds = clusters[1].eds_cluster_config.as_ref().unwrap();
        assert_eq!(eds.service_name, clusters[1].name);
        assert_eq!(
            clusters[1].cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32
            ))
        );
        assert_eq!(clusters[1].lb_policy, cluster::LbPolicy::RoundRobin as i32);
        assert_eq!(
            clusters[2].lb_policy,
            cluster::LbPolicy::Random as i32,
            "the subset's own policy"
        );
        assert_eq!(clusters[0].connect_timeout, Some(duration(CONNECT_TIMEOUT)));
    }

    #[test]
    fn a_retry_budget_goes_to_the_circuit_breakers_and_subsets_inherit_it() {
        let rule = rule(json!({"host": "httpbin",
            "trafficPolicy": {
                "connectionPool": {"http": {"maxRetries": 2}},
                "retryBudget": {"percent": 25.0, "minRetryConcurrency": 5},
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"},
                 "trafficPolicy": {"retryBudget": {"percent": 50.0}}},
            ],
        }));
        let clusters = outbound_clusters(&service("httpbin", 8000), Some(&rule), &[]);
        let budget = |name: &str| {
            let cluster = clusters.iter().find(|c| c.name.contains(name)).unwrap();
            let thresholds = &cluster.circuit_breakers.as_ref().unwrap().thresholds[0];
            let budget = thresholds.retry_budget.as_ref().expect("a retry budget");
            (
                budget.budget_percent.as_ref().map(|p| p.value),
                budget.min_retry_concurrency.as_ref().map(|v| v.value),
            )
        };
        assert_eq!(budget("||httpbin"), (Some(25.0), Some(5)));
        assert_eq!(budget("|v1|"), (Some(25.0), Some(5)), "inherited");
        assert_eq!(
            budget("|v2|"),
            (Some(50.0), None),
            "the subset's budget replaces the rule's whole; Envoy's default (3) fills in"
        );
        let plain = &outbound_clusters(&service("plain", 80), None, &[])[0];
        assert!(
            plain.circuit_breakers.as_ref().unwrap().thresholds[0]
                .retry_budget
                .is_none()
        );
    }

    #[test]
    fn connection_pool_and_outlier_detection_become_circuit_breakers_and_ejection() {
        // config/samples/istio/circuit-breaker.yaml
        let rule = rule(json!({"host": "httpbin", "trafficPolicy": {
            "loadBalancer": {"simple": "LEAST_REQUEST"},
            "connectionPool": {
                "tcp": {"maxConnections": 1, "connectTimeout": "30ms",
                        "tcpKeepalive": {"time": "7200s", "interval": "75s", "probes": 9}},
                "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1, "http2MaxRequests": 10, "maxRetries": 2},
            },
            "outlierDetection": {"consecutive5xxErrors": 1, "consecutiveGatewayErrors": 1, "interval": "1s", "baseEjectionTime": "3m", "maxEjectionPercent": 100},
        }}));
        let clusters = outbound_clusters(&service("httpbin", 8000), Some(&rule), &[]);
        let cluster = &clusters[0];
        assert_eq!(cluster.lb_policy, cluster::LbPolicy::LeastRequest as i32);
        assert_eq!(
            cluster.connect_timeout,
            Some(Duration {
                seconds: 0,
                nanos: 30_000_000
            })
        );
        let limits = &cluster.circuit_breakers.as_ref().unwrap().thresholds[0];
        let value = |v: &Option<UInt32Value>| v.as_ref().map(|v| v.value);
        assert_eq!(value(&limits.max_connections), Some(1));
        assert_eq!(value(&limits.max_pending_requests), Some(1));
        assert_eq!(value(&limits.max_requests), Some(10));
        assert_eq!(value(&limits.max_retries), Some(2));
        let keepalive = cluster
            .upstream_connection_options
            .as_ref()
            .and_then(|o| o.tcp_keepalive.as_ref())
            .unwrap();
        assert_eq!(
            (
                value(&keepalive.keepalive_time),
                value(&keepalive.keepalive_interval),
                value(&keepalive.keepalive_probes)
            ),
            (Some(7200), Some(75), Some(9))
        );
        let outlier = cluster.outlier_detection.as_ref().unwrap();
        assert_eq!(value(&outlier.consecutive_5xx), Some(1));
        assert_eq!(value(&outlier.enforcing_consecutive_5xx), Some(100));
        assert_eq!(value(&outlier.consecutive_gateway_failure), Some(1));
        assert_eq!(
            value(&outlier.enforcing_consecutive_gateway_failure),
            Some(100)
        );
        assert_eq!(
            outlier.interval,
            Some(Duration {
                seconds: 1,
                nanos: 0
            })
        );
        assert_eq!(
            outlier.base_ejection_time,
            Some(Duration {
                seconds: 180,
                nanos: 0
            })
        );
        assert_eq!(value(&outlier.max_ejection_percent), Some(100));
        // No pool settings: unlimited, as Istio leaves it.
        let plain = &outbound_clusters(&service("plain", 80), None, &[])[0];
        let limits = &plain.circuit_breakers.as_ref().unwrap().thresholds[0];
        assert_eq!(value(&limits.max_requests), Some(u32::MAX));
        assert!(plain.outlier_detection.is_none());
    }

    #[test]
    fn subsets_get_the_endpoints_their_labels_select() {
        let rule = rule(json!({"host": "reviews", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ]}));
        let endpoint = |address: &str, version: &str, ready: bool| Endpoint {
            address: address.into(),
            service_port: 9080,
            port: 9080,
            labels: BTreeMap::from([("version".to_string(), version.to_string())]),
            ready,
            sidecar: true,
            service_account: None,
        };
        let endpoints = [
            endpoint("10.244.0.1", "v1", true),
            endpoint("10.244.0.2", "v2", true),
            endpoint("10.244.0.3", "v2", false),
        ];
        let assignments = load_assignments(&service("reviews", 9080), &endpoints, Some(&rule));
        let addresses = |a: &ClusterLoadAssignment| -> Vec<(String, i32)> {
            a.endpoints[0]
                .lb_endpoints
                .iter()
                .map(|lb| match &lb.host_identifier {
                    Some(lb_endpoint::HostIdentifier::Endpoint(e)) => {
                        match &e.address.as_ref().unwrap().address {
                            Some(address::Address::SocketAddress(s)) => {
                                (s.address.clone(), lb.health_status)
                            }
                            _ => unreachable!(),
                        }
                    }
                    _ => unreachable!(),
                })
                .collect()
        };
        assert_eq!(assignments.len(), 3);
        assert_eq!(
            addresses(&assignments[0]).len(),
            3,
            "the port's cluster has them all"
        );
        assert_eq!(
            addresses(&assignments[1]),
            [("10.244.0.1".to_string(), HealthStatus::Healthy as i32)]
        );
        assert_eq!(
            addresses(&assignments[2]),
            [
                ("10.244.0.2".to_string(), HealthStatus::Healthy as i32),
                ("10.244.0.3".to_string(), HealthStatus::Unhealthy as i32),
            ]
        );
    }

    #[test]
    fn protocols_are_selected_as_istio_does() {
        assert_eq!(Protocol::select("http-web", None), Protocol::Http);
        assert_eq!(Protocol::select("grpc", None), Protocol::Grpc);
        assert_eq!(Protocol::select("web", Some("http2")), Protocol::Http2);
        assert_eq!(Protocol::select("tcp-postgres", None), Protocol::Tcp);
        assert_eq!(Protocol::select("metrics", None), Protocol::Unknown);
    }
}
