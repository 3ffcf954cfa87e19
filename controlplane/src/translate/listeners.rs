//! A sidecar's listeners, named and shaped as Istio's so that tools reading
//! a config dump find what they expect:
//!
//! - `virtualOutbound` on 15001 takes captured outbound traffic and hands
//!   each connection to the listener for its original destination, else
//!   passes it through (ALLOW_ANY) or drops it (REGISTRY_ONLY);
//! - `0.0.0.0_<port>` per outbound HTTP port, routed by the route
//!   configuration named `<port>`; `<vip>_<port>` per TCP service port;
//! - listeners a Sidecar resource asks to bind (`captureMode: NONE`);
//! - `virtualInbound` on 15006: one filter chain per port the workload
//!   serves, mutual TLS as its PeerAuthentication says, then the inbound
//!   cluster.

use bowline_api::security::MtlsMode;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress, TrafficDirection,
    TransportSocket, address, config_source, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Decorator, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route,
    route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, common_tls_context,
};
use envoy_types::pb::envoy::r#type::v3::{
    HashPolicy as TypeHashPolicy, hash_policy as type_hash_policy,
};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use envoy_types::util::pack_any;
use prost::Message;

use super::duration;
use super::routes::{BLACKHOLE_CLUSTER, FAULT_FILTER, PASSTHROUGH_CLUSTER};

pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
pub const OUTBOUND_PORT: u32 = 15001;
pub const INBOUND_PORT: u32 = 15006;
pub const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";
/// The SDS names of the workload's certificate and of the mesh's root.
pub const WORKLOAD_SECRET: &str = "default";
pub const ROOT_SECRET: &str = "ROOTCA";
/// ALPN Istio's sidecars offer each other inside mutual TLS.
/// The ALPN a sidecar offers to another over mTLS, by what it carries
/// (Istio's values): HTTP ...
const MESH_HTTP_ALPN: [&str; 3] = ["istio-http/1.0", "istio-http/1.1", "istio-h2"];
/// ... and TCP.
const MESH_TCP_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];

/// An outbound port's listener: HTTP routed by RDS, or TCP to one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// `0.0.0.0_<port>`, routed by the route configuration `<port>`.
    Http { port: u32 },
    /// `<vip>_<port>`, every connection to `cluster`.
    Tcp {
        address: String,
        port: u32,
        cluster: String,
    },
    /// `<vip>_<port>` of a port whose protocol is not declared: HTTP,
    /// found by its first bytes, routed by the route configuration
    /// `<port>`; anything else to `cluster`.
    Sniffed {
        address: String,
        port: u32,
        cluster: String,
    },
}

/// What a sniffed connection's first bytes may show: Envoy's
/// http_inspector names them so.
const HTTP_PROTOCOLS: [&str; 3] = ["http/1.1", "http/1.0", "h2c"];

/// A listener the proxy binds itself (a Sidecar egress listener with
/// `captureMode: NONE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    pub address: String,
    pub port: u32,
    pub carries: Carries,
}

/// What a bound listener carries, by its port's protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Carries {
    /// HTTP, routed by the route configuration `<port>`.
    Http,
    /// Every connection to `cluster`.
    Tcp { cluster: String },
    /// Protocol not declared: HTTP, found by its first bytes, routed by
    /// the route configuration `<port>`; anything else to `cluster`
    /// (dropped when no service has the port).
    Sniffed { cluster: Option<String> },
}

/// An inbound port of the workload, and how its peers must authenticate.
#[derive(Clone, Debug, PartialEq)]
pub struct Inbound {
    pub port: u32,
    pub http: bool,
    /// A service's port of protocol HTTP/2 or gRPC: the app speaks HTTP/2.
    pub h2: bool,
    /// The hosts of the services whose endpoints are this port.
    pub services: Vec<String>,
    pub mtls: MtlsMode,
    /// The inbound RBAC filters (AUDIT, DENY, ALLOW) of the
    /// AuthorizationPolicies that apply: HTTP filters for an HTTP port,
    /// network filters for a TCP one.
    pub rbac: Vec<HttpRbac>,
    pub network_rbac: Vec<NetworkRbac>,
}

/// `inbound|<port>||`, as Istio names it.
pub fn inbound_cluster_name(port: u32) -> String {
    format!("inbound|{port}||")
}

pub fn virtual_outbound(allow_any: bool) -> Listener {
    Listener {
        name: VIRTUAL_OUTBOUND.into(),
        address: Some(socket("0.0.0.0", OUTBOUND_PORT)),
        use_original_dst: Some(BoolValue { value: true }),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![FilterChain {
            name: if allow_any {
                PASSTHROUGH_CLUSTER
            } else {
                BLACKHOLE_CLUSTER
            }
            .into(),
            filters: vec![tcp_proxy_filter(
                if allow_any {
                    PASSTHROUGH_CLUSTER
                } else {
                    BLACKHOLE_CLUSTER
                },
                &format!("outbound_{OUTBOUND_PORT}"),
            )],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `<address>_<port>`, not bound: captured connections to that address
/// are handed to it.
fn captured(address: &str, port: u32) -> Listener {
    Listener {
        name: format!("{address}_{port}"),
        address: Some(socket(address, port)),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

pub fn outbound(listener: &Outbound) -> Listener {
    match listener {
        Outbound::Http { port } => Listener {
            filter_chains: vec![FilterChain {
                filters: vec![rds_filter(
                    &format!("outbound_0.0.0.0_{port}"),
                    &port.to_string(),
                )],
                ..Default::default()
            }],
            ..captured("0.0.0.0", *port)
        },
        Outbound::Tcp {
            address,
            port,
            cluster,
        } => Listener {
            filter_chains: vec![FilterChain {
                filters: vec![tcp_proxy_filter(cluster, cluster)],
                ..Default::default()
            }],
            ..captured(address, *port)
        },
        Outbound::Sniffed {
            address,
            port,
            cluster,
        } => sniffing(captured(address, *port), *port, Some(cluster)),
    }
}

/// `listener` telling HTTP from anything else by a connection's first
/// bytes: HTTP routed by the route configuration `<port>`, the rest to
/// `cluster` (with none, the listener's default chain decides).
fn sniffing(listener: Listener, port: u32, cluster: Option<&str>) -> Listener {
    let name = &listener.name;
    let http = FilterChain {
        name: format!("{name}_http"),
        filter_chain_match: Some(FilterChainMatch {
            application_protocols: HTTP_PROTOCOLS.map(String::from).to_vec(),
            ..Default::default()
        }),
        filters: vec![rds_filter(&format!("outbound_{name}"), &port.to_string())],
        ..Default::default()
    };
    let tcp = cluster.map(|cluster| FilterChain {
        name: format!("{name}_tcp"),
        filters: vec![tcp_proxy_filter(cluster, cluster)],
        ..Default::default()
    });
    Listener {
        listener_filters: vec![http_inspector()],
        // Istio's protocolDetectionTimeout: wait for the client's first
        // bytes however long they take, so a pooled connection used late
        // is still HTTP (server-first protocols need their port's
        // protocol declared).
        listener_filters_timeout: Some(duration(std::time::Duration::ZERO)),
        continue_on_listener_filters_timeout: true,
        filter_chains: std::iter::once(http).chain(tcp).collect(),
        ..listener
    }
}

/// `0.0.0.0_<port>` for TLS to hosts without an address: each host's
/// connections, told apart by SNI, to its cluster.
pub fn outbound_tls(port: u32, hosts: &[(String, String)]) -> Listener {
    Listener {
        listener_filters: vec![tls_inspector()],
        filter_chains: hosts
            .iter()
            .map(|(host, cluster)| FilterChain {
                name: cluster.clone(),
                filter_chain_match: Some(FilterChainMatch {
                    server_names: vec![host.clone()],
                    ..Default::default()
                }),
                filters: vec![tcp_proxy(cluster)],
                ..Default::default()
            })
            .collect(),
        ..captured("0.0.0.0", port)
    }
}

/// A bound egress listener, carrying what its port's protocol says. With
/// REGISTRY_ONLY, what no route or cluster takes is dropped.
pub fn bound(listener: &Bound, allow_any: bool) -> Listener {
    let Bound {
        address,
        port,
        carries,
    } = listener;
    let tcp = |cluster: &str| FilterChain {
        filters: vec![tcp_proxy_filter(cluster, cluster)],
        ..Default::default()
    };
    let blackhole = || tcp(BLACKHOLE_CLUSTER);
    let listener = Listener {
        name: format!("{address}_{port}"),
        address: Some(socket(address, *port)),
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    };
    match carries {
        Carries::Http => Listener {
            filter_chains: vec![FilterChain {
                filters: vec![rds_filter(
                    &format!("outbound_{address}_{port}"),
                    &port.to_string(),
                )],
                ..Default::default()
            }],
            default_filter_chain: (!allow_any).then(blackhole),
            ..listener
        },
        Carries::Tcp { cluster } => Listener {
            filter_chains: vec![tcp(cluster)],
            ..listener
        },
        Carries::Sniffed { cluster } => Listener {
            // Passing through is no way out for a connection nobody
            // captured: it would only come back here.
            default_filter_chain: cluster.is_none().then(blackhole),
            ..sniffing(listener, *port, cluster.as_deref())
        },
    }
}

/// `virtualInbound`: per inbound port, a plaintext chain (PERMISSIVE,
/// DISABLE) and a mutual-TLS chain (PERMISSIVE, STRICT); anything else
/// passes through to the workload as it came, judged by `passthrough_rbac`
/// (the workload's AuthorizationPolicies as network filters).
pub fn virtual_inbound(ports: &[Inbound], passthrough_rbac: &[NetworkRbac]) -> Listener {
    let mut filter_chains = Vec::new();
    for inbound in ports {
        let tls = matches!(
            inbound.mtls,
            MtlsMode::Strict | MtlsMode::Permissive | MtlsMode::Unset
        );
        let plain = matches!(
            inbound.mtls,
            MtlsMode::Permissive | MtlsMode::Disable | MtlsMode::Unset
        );
        for (secure, wanted) in [(true, tls), (false, plain)] {
            if !wanted {
                continue;
            }
            filter_chains.push(FilterChain {
                name: format!(
                    "{}|{}",
                    inbound_cluster_name(inbound.port),
                    if secure { "tls" } else { "plaintext" }
                ),
                filter_chain_match: Some(FilterChainMatch {
                    destination_port: Some(UInt32Value {
                        value: inbound.port,
                    }),
                    transport_protocol: if secure { "tls" } else { "raw_buffer" }.into(),
                    application_protocols: if !secure {
                        Vec::new()
                    } else if inbound.http {
                        MESH_HTTP_ALPN.iter().map(|s| s.to_string()).collect()
                    } else {
                        MESH_TCP_ALPN.iter().map(|s| s.to_string()).collect()
                    },
                    ..Default::default()
                }),
                filters: inbound_filters(inbound),
                transport_socket: secure.then(|| downstream_mtls(inbound.http)),
                ..Default::default()
            });
        }
    }
    // What no port claims goes to the workload unchanged.
    filter_chains.push(FilterChain {
        name: "inbound-passthrough".into(),
        filter_chain_match: Some(FilterChainMatch {
            transport_protocol: "raw_buffer".into(),
            ..Default::default()
        }),
        filters: network_rbac_filters(passthrough_rbac)
            .chain([tcp_proxy_filter(
                INBOUND_PASSTHROUGH_CLUSTER,
                INBOUND_PASSTHROUGH_CLUSTER,
            )])
            .collect(),
        ..Default::default()
    });
    Listener {
        name: VIRTUAL_INBOUND.into(),
        address: Some(socket("0.0.0.0", INBOUND_PORT)),
        traffic_direction: TrafficDirection::Inbound as i32,
        listener_filters: vec![
            listener_filter(
                "envoy.filters.listener.original_dst",
                pack_any(OriginalDst::default()),
            ),
            tls_inspector(),
            http_inspector(),
        ],
        listener_filters_timeout: Some(duration(std::time::Duration::from_secs(1))),
        continue_on_listener_filters_timeout: true,
        filter_chains,
        ..Default::default()
    }
}

/// Network RBAC filters, to go before a chain's TCP proxy.
pub fn network_rbac_filters(rbac: &[NetworkRbac]) -> impl Iterator<Item = Filter> + '_ {
    rbac.iter().map(|rbac| Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(rbac.clone()))),
    })
}

/// A port's filters: its RBAC and its HTTP connection manager, or its
/// network RBAC and its TCP proxy.
fn inbound_filters(inbound: &Inbound) -> Vec<Filter> {
    let cluster = inbound_cluster_name(inbound.port);
    if !inbound.http {
        return network_rbac_filters(&inbound.network_rbac)
            .chain([tcp_proxy_filter(&cluster, &cluster)])
            .collect();
    }
    let mut filters = Vec::new();
    for rbac in &inbound.rbac {
        filters.push(http_filter(
            "envoy.filters.http.rbac",
            pack_any(rbac.clone()),
        ));
    }
    filters.push(http_filter(
        "envoy.filters.http.router",
        pack_any(Router::default()),
    ));
    vec![http_connection_manager(
        &cluster.clone(),
        http_connection_manager::RouteSpecifier::RouteConfig(RouteConfiguration {
            name: cluster.clone(),
            virtual_hosts: vec![VirtualHost {
                name: format!("inbound|http|{}", inbound.port),
                domains: vec!["*".into()],
                routes: vec![Route {
                    name: "default".into(),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster)),
                        timeout: Some(duration(std::time::Duration::ZERO)),
                        ..Default::default()
                    })),
                    // Spans are named after the service the port serves.
                    decorator: inbound.services.first().map(|host| Decorator {
                        operation: format!("{host}:{}/*", inbound.port),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            validate_clusters: Some(BoolValue { value: false }),
            ..Default::default()
        }),
        filters,
    )]
}

/// The workload's certificate and the mesh root, both over SDS; the peer
/// must present a certificate.
fn downstream_mtls(http: bool) -> TransportSocket {
    let mut alpn: Vec<String> = Vec::new();
    if http {
        alpn.extend(["h2".to_string(), "http/1.1".to_string()]);
    }
    transport_socket(pack_any(DownstreamTlsContext {
        common_tls_context: Some(mesh_tls_context(alpn)),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    }))
}

/// The TLS context of mesh traffic: the workload's certificate and the
/// root it trusts, both over SDS.
pub fn mesh_tls_context(alpn_protocols: Vec<String>) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_SECRET)],
        validation_context_type: Some(
            common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
                ROOT_SECRET,
            )),
        ),
        alpn_protocols,
        ..Default::default()
    }
}

pub fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ads()),
    }
}

pub fn transport_socket(config: envoy_types::pb::google::protobuf::Any) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(config)),
    }
}

/// Resources come over the same ADS stream.
pub fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// HTTP routed by the route configuration `routes` (over ADS), with
/// faults, then the router.
pub fn rds_filter(stat_prefix: &str, routes: &str) -> Filter {
    rds_filter_judged(stat_prefix, routes, &[])
}

/// [`rds_filter`] with `rbac` (AuthorizationPolicy) filters first, as on
/// a gateway.
pub fn rds_filter_judged(stat_prefix: &str, routes: &str, rbac: &[HttpRbac]) -> Filter {
    let mut filters: Vec<HttpFilter> = rbac
        .iter()
        .map(|rbac| http_filter("envoy.filters.http.rbac", pack_any(rbac.clone())))
        .collect();
    filters.extend(outbound_http_filters());
    http_connection_manager(
        stat_prefix,
        http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: routes.to_string(),
        }),
        filters,
    )
}

/// Every connection to `cluster`.
pub fn tcp_proxy(cluster: &str) -> Filter {
    tcp_proxy_filter(cluster, cluster)
}

/// Tells HTTP/1.x and h2c from other protocols by a connection's first
/// bytes, before a filter chain is chosen.
pub fn http_inspector() -> ListenerFilter {
    listener_filter(
        "envoy.filters.listener.http_inspector",
        pack_any(HttpInspector::default()),
    )
}

/// Reads SNI and ALPN before a filter chain is chosen.
pub fn tls_inspector() -> ListenerFilter {
    listener_filter(
        "envoy.filters.listener.tls_inspector",
        pack_any(TlsInspector::default()),
    )
}

fn outbound_http_filters() -> Vec<HttpFilter> {
    vec![
        http_filter(FAULT_FILTER, pack_any(HttpFault::default())),
        http_filter("envoy.filters.http.router", pack_any(Router::default())),
    ]
}

fn http_connection_manager(
    stat_prefix: &str,
    routes: http_connection_manager::RouteSpecifier,
    http_filters: Vec<HttpFilter>,
) -> Filter {
    network_filter(
        "envoy.filters.network.http_connection_manager",
        pack_any(HttpConnectionManager {
            stat_prefix: stat_prefix.to_string(),
            codec_type: http_connection_manager::CodecType::Auto as i32,
            route_specifier: Some(routes),
            http_filters,
            // Istio's: no idle stream timeout; requests time out per route.
            stream_idle_timeout: Some(duration(std::time::Duration::ZERO)),
            use_remote_address: Some(BoolValue { value: false }),
            ..Default::default()
        }),
    )
}

/// Gives the tcp_proxy filters to the clusters `hashed` says a source IP
/// hash policy.
pub fn hash_tcp_by_source_ip(listeners: &mut [Listener], hashed: impl Fn(&str) -> bool) {
    let filters = listeners
        .iter_mut()
        .flat_map(|l| l.filter_chains.iter_mut())
        .flat_map(|c| c.filters.iter_mut())
        .filter(|f| f.name == "envoy.filters.network.tcp_proxy");
    for filter in filters {
        let Some(filter::ConfigType::TypedConfig(any)) = &mut filter.config_type else {
            continue;
        };
        let Ok(mut proxy) = TcpProxy::decode(any.value.as_slice()) else {
            continue;
        };
        let to = match &proxy.cluster_specifier {
            Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => c,
            _ => continue,
        };
        if hashed(to) {
            proxy.hash_policy = vec![TypeHashPolicy {
                policy_specifier: Some(type_hash_policy::PolicySpecifier::SourceIp(
                    type_hash_policy::SourceIp {},
                )),
            }];
            *any = pack_any(proxy);
        }
    }
}

fn tcp_proxy_filter(cluster: &str, stat_prefix: &str) -> Filter {
    network_filter(
        "envoy.filters.network.tcp_proxy",
        pack_any(TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
            ..Default::default()
        }),
    )
}

fn network_filter(name: &str, config: envoy_types::pb::google::protobuf::Any) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(config)),
    }
}

fn http_filter(name: &str, config: envoy_types::pb::google::protobuf::Any) -> HttpFilter {
    HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

fn listener_filter(name: &str, config: envoy_types::pb::google::protobuf::Any) -> ListenerFilter {
    ListenerFilter {
        name: name.to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

pub fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}
