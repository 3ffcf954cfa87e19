//! Listeners: where the proxy accepts connections, which filter chain a
//! connection takes, and what ends the chain — HTTP routing or TCP
//! proxying.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::listener::v3::{self as envoy, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::r#type::v3::hash_policy as type_hash_policy;

use super::cluster::socket_address;
use super::rbac::{NETWORK_RBAC_FILTER, RBAC_FILTER, Rbac};
use super::route::{Destinations, HeaderOps, RouteTable};
use crate::envoy::{type_name, unpack};
use crate::error::{Error, Result};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::trace::Tracing;
use crate::tls::DownstreamTls;

const KIND: &str = "Listener";
const HTTP_CONNECTION_MANAGER: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// False for the listeners a captured connection is handed to by its
    /// original destination: they own no socket.
    pub bind: bool,
    /// Hand connections to the listener for their original destination
    /// (15001, 15006).
    pub use_original_dst: bool,
    /// Whether a captured connection's original destination stands for
    /// its local address in chain matching (the `original_dst` listener
    /// filter, as on 15006); implied by `use_original_dst`.
    pub original_dst: bool,
    /// Whether its connections' first bytes are peeked to tell TLS (its
    /// server name and ALPN, `tls_inspector`) and HTTP (`http_inspector`),
    /// for how long at most, and whether a connection that says too little
    /// in time goes on (else it is closed).
    pub sniff: Option<Sniff>,
    /// Whether it takes traffic to this proxy's workload (the sidecar's
    /// inbound side, which reports requests as their destination).
    pub inbound: bool,
    pub chains: Vec<FilterChain>,
    pub default_chain: Option<FilterChain>,
}

#[derive(Clone, Copy, Debug)]
pub struct Sniff {
    pub tls: bool,
    pub http: bool,
    /// How long to wait for the first bytes; no limit when none (Envoy's
    /// `listener_filters_timeout: 0s`).
    pub timeout: Option<std::time::Duration>,
    pub continue_on_timeout: bool,
}

/// Envoy's `listener_filters_timeout` when none is set.
const LISTENER_FILTERS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
const HTTP_INSPECTOR: &str = "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";
const ORIGINAL_DST: &str = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const TLS_INSPECTOR: &str = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";

#[derive(Debug)]
pub struct FilterChain {
    pub name: String,
    matcher: ChainMatch,
    /// The TLS the chain terminates, if any.
    pub tls: Option<Arc<DownstreamTls>>,
    /// Network RBAC filters before the terminal one: each judges the
    /// connection (its peer's identity and address, the port) once.
    pub rbac: Arc<[Rbac]>,
    pub terminal: Terminal,
}

#[derive(Debug, Default)]
struct ChainMatch {
    destination_port: Option<u16>,
    prefix_ranges: Vec<(IpAddr, u8)>,
    transport_protocol: Option<String>,
    server_names: Vec<String>,
    application_protocols: Vec<String>,
}

/// What a filter chain ends in.
#[derive(Debug)]
pub enum Terminal {
    Http(Arc<HttpManager>),
    Tcp(Arc<TcpRoute>),
}

#[derive(Debug)]
pub struct HttpManager {
    pub stat_prefix: String,
    pub routes: RouteSource,
    /// Where each request is logged, if anywhere.
    pub access_logs: Arc<[AccessLog]>,
    /// Whether and where requests are traced.
    pub tracing: Option<Arc<Tracing>>,
    /// The RBAC filters every request passes, in order.
    pub rbac: Arc<[Rbac]>,
    /// How long an HTTP/1.1 connection may wait for its next request's
    /// headers to be complete (none: for ever); see [`header_wait`].
    pub header_wait: Option<std::time::Duration>,
    /// How long an HTTP/2 connection stays open with no stream open on it
    /// before it is told GOAWAY (none: for ever); see [`idle_timeout`].
    pub idle_timeout: Option<std::time::Duration>,
}

/// Envoy's default idle timeout of a downstream connection.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long a connection stays open with no request in flight: the
/// manager's `common_http_protocol_options.idle_timeout`, Envoy's 1 h when
/// unset, none when 0.
fn idle_timeout(manager: &HttpConnectionManager) -> Option<std::time::Duration> {
    match manager
        .common_http_protocol_options
        .as_ref()
        .and_then(|o| o.idle_timeout.as_ref())
    {
        Some(d) => Some(super::duration(d)).filter(|d| !d.is_zero()),
        None => Some(IDLE_TIMEOUT),
    }
}

/// How long a connection waits for a request's headers, from the end of
/// the answer before (or from its start) to the headers' end: its idle
/// timeout — a kept-alive connection stays open as long as Envoy's — or
/// its `request_headers_timeout` when that is set and shorter (it then
/// bounds the wait for the next request too, which Envoy's does not).
fn header_wait(manager: &HttpConnectionManager) -> Option<std::time::Duration> {
    let headers = manager
        .request_headers_timeout
        .as_ref()
        .map(super::duration)
        .filter(|d| !d.is_zero());
    [idle_timeout(manager), headers].into_iter().flatten().min()
}

#[derive(Debug)]
pub enum RouteSource {
    /// A RouteConfiguration from RDS, by name.
    Rds(String),
    Inline(Arc<RouteTable>),
}

#[derive(Debug)]
pub struct TcpRoute {
    pub stat_prefix: String,
    pub destinations: Destinations,
    /// A `hash_policy` of the client's address, for a RING_HASH or MAGLEV
    /// cluster.
    pub hash_source_ip: bool,
    /// Where each connection is logged, if anywhere.
    pub access_logs: Arc<[AccessLog]>,
}

/// What a connection is known by when its chain is chosen.
#[derive(Debug, Default)]
pub struct ConnectionInfo<'a> {
    pub destination: Option<SocketAddr>,
    pub transport_protocol: &'a str,
    pub server_name: Option<&'a str>,
    pub application_protocols: &'a [String],
}

impl Listener {
    pub fn from_envoy(listener: &envoy::Listener) -> Result<Self> {
        let name = &listener.name;
        let address = socket_address(listener.address.as_ref())
            .map_err(|e| Error::resource(KIND, name, "address", e))?;
        let chains: Vec<FilterChain> = listener
            .filter_chains
            .iter()
            .enumerate()
            .map(|(i, chain)| FilterChain::from_envoy(name, &format!("filter_chains[{i}]"), chain))
            .collect::<Result<_>>()?;
        let default_chain = listener
            .default_filter_chain
            .as_ref()
            .map(|chain| FilterChain::from_envoy(name, "default_filter_chain", chain))
            .transpose()?;
        let inspects = |name: &str, type_url: &str| {
            listener.listener_filters.iter().any(|f| {
                f.name == name
                    || matches!(&f.config_type,
                        Some(envoy::listener_filter::ConfigType::TypedConfig(any)) if type_name(any) == type_url)
            })
        };
        let http = inspects("envoy.filters.listener.http_inspector", HTTP_INSPECTOR);
        // Chains that terminate TLS need the ClientHello read, as Envoy
        // adds the TLS inspector for them by itself.
        let tls = inspects("envoy.filters.listener.tls_inspector", TLS_INSPECTOR)
            || chains
                .iter()
                .chain(default_chain.as_ref())
                .any(|c: &FilterChain| c.tls.is_some() || c.matcher.needs_tls_inspection());
        let sniff = (http || tls).then(|| Sniff {
            tls,
            http,
            timeout: Some(
                listener
                    .listener_filters_timeout
                    .as_ref()
                    .map_or(LISTENER_FILTERS_TIMEOUT, super::duration),
            )
            .filter(|t| !t.is_zero()),
            continue_on_timeout: listener.continue_on_listener_filters_timeout,
        });
        Ok(Self {
            name: name.clone(),
            address,
            sniff,
            bind: listener.bind_to_port.as_ref().is_none_or(|b| b.value),
            use_original_dst: listener.use_original_dst.as_ref().is_some_and(|b| b.value),
            original_dst: listener.use_original_dst.as_ref().is_some_and(|b| b.value)
                || inspects("envoy.filters.listener.original_dst", ORIGINAL_DST),
            inbound: listener.traffic_direction
                == envoy_types::pb::envoy::config::core::v3::TrafficDirection::Inbound as i32,
            chains,
            default_chain,
        })
    }

    /// The route configurations its HTTP chains read from RDS.
    /// The secrets its chains' TLS names over SDS.
    pub fn sds_names(&self) -> impl Iterator<Item = &str> {
        self.chains
            .iter()
            .chain(self.default_chain.as_ref())
            .filter_map(|chain| chain.tls.as_deref())
            .flat_map(|tls| tls.sds_names())
    }

    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.chains
            .iter()
            .chain(self.default_chain.as_ref())
            .filter_map(|chain| match &chain.terminal {
                Terminal::Http(manager) => match &manager.routes {
                    RouteSource::Rds(name) => Some(name.as_str()),
                    RouteSource::Inline(_) => None,
                },
                Terminal::Tcp(_) => None,
            })
    }

    /// The chain for a connection: the most specific match, as Envoy orders
    /// them (destination port, then address range, then server name,
    /// transport protocol and application protocols), else the default.
    pub fn find_chain(&self, connection: &ConnectionInfo<'_>) -> Option<&FilterChain> {
        // Level by level, the most specific match narrows the candidates,
        // and there is no going back: a connection to a port some chain
        // names never falls to a chain for any port, even if none of that
        // port's chains takes it (so STRICT's TLS-only port refuses
        // plaintext rather than passing it through).
        let mut candidates: Vec<(&FilterChain, [Option<u8>; 5])> = self
            .chains
            .iter()
            .map(|chain| (chain, chain.matcher.levels(connection)))
            .collect();
        for level in 0..5 {
            let Some(best) = candidates.iter().filter_map(|(_, l)| l[level]).max() else {
                candidates.clear();
                break;
            };
            candidates.retain(|(_, l)| l[level] == Some(best));
        }
        candidates
            .first()
            .map(|(chain, _)| *chain)
            .or(self.default_chain.as_ref())
    }
}

impl FilterChain {
    fn from_envoy(listener: &str, field: &str, chain: &envoy::FilterChain) -> Result<Self> {
        let invalid = |f: &str, message: String| {
            Error::resource(KIND, listener, format!("{field}.{f}"), message)
        };
        let matcher = match &chain.filter_chain_match {
            None => ChainMatch::default(),
            Some(m) => ChainMatch {
                destination_port: m
                    .destination_port
                    .as_ref()
                    .map(|p| u16::try_from(p.value))
                    .transpose()
                    .map_err(|_| {
                        invalid("filter_chain_match.destination_port", "out of range".into())
                    })?,
                prefix_ranges: m
                    .prefix_ranges
                    .iter()
                    .map(|r| {
                        let ip = r.address_prefix.parse::<IpAddr>().map_err(|e| {
                            invalid(
                                "filter_chain_match.prefix_ranges",
                                format!("{:?}: {e}", r.address_prefix),
                            )
                        })?;
                        Ok((
                            ip,
                            r.prefix_len.as_ref().map_or(0, |l| l.value.min(128) as u8),
                        ))
                    })
                    .collect::<Result<_>>()?,
                transport_protocol: (!m.transport_protocol.is_empty())
                    .then(|| m.transport_protocol.clone()),
                server_names: m
                    .server_names
                    .iter()
                    .map(|s| s.to_ascii_lowercase())
                    .collect(),
                application_protocols: m.application_protocols.clone(),
            },
        };
        let mut terminal = None;
        let mut rbac = Vec::new();
        for (i, f) in chain.filters.iter().enumerate() {
            let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                return Err(invalid(
                    &format!("filters[{i}]"),
                    "a typed_config is needed".into(),
                ));
            };
            let at = |what: &str| format!("filters[{i}].typed_config{what}");
            let logs = |list: &[envoy_types::pb::envoy::config::accesslog::v3::AccessLog]| {
                access_logs(list).map_err(|(j, e)| invalid(&at(&format!(".access_log[{j}]")), e))
            };
            match type_name(any) {
                HTTP_CONNECTION_MANAGER => {
                    let manager: HttpConnectionManager =
                        unpack(any).map_err(|e| invalid(&at(""), e))?;
                    let routes = match &manager.route_specifier {
                        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
                            RouteSource::Rds(rds.route_config_name.clone())
                        }
                        Some(http_connection_manager::RouteSpecifier::RouteConfig(config)) => {
                            RouteSource::Inline(Arc::new(RouteTable::from_envoy(config)?))
                        }
                        _ => {
                            return Err(invalid(
                                &at(".route_specifier"),
                                "rds or route_config is needed".into(),
                            ));
                        }
                    };
                    let tracing = match &manager.tracing {
                        Some(tracing) => Tracing::from_envoy(tracing)
                            .map_err(|e| invalid(&at(".tracing"), e))?
                            .map(Arc::new),
                        None => None,
                    };
                    let mut rbac = Vec::new();
                    for (j, filter) in manager.http_filters.iter().enumerate() {
                        let at_filter = |f: &str| at(&format!(".http_filters[{j}]{f}"));
                        let Some(http_filter::ConfigType::TypedConfig(config)) =
                            &filter.config_type
                        else {
                            continue;
                        };
                        if type_name(config) != RBAC_FILTER {
                            continue;
                        }
                        let config = unpack(config).map_err(|e| invalid(&at_filter(""), e))?;
                        if let Some(filter) = Rbac::from_envoy(&config).map_err(|(f, e)| {
                            invalid(&at_filter(&format!(".typed_config.{f}")), e)
                        })? {
                            rbac.push(filter);
                        }
                    }
                    terminal = Some(Terminal::Http(Arc::new(HttpManager {
                        header_wait: header_wait(&manager),
                        idle_timeout: idle_timeout(&manager),
                        rbac: rbac.into(),
                        access_logs: logs(&manager.access_log)?,
                        tracing,
                        stat_prefix: manager.stat_prefix,
                        routes,
                    })));
                }
                TCP_PROXY => {
                    let proxy: TcpProxy = unpack(any).map_err(|e| invalid(&at(""), e))?;
                    let destinations = match proxy.cluster_specifier {
                        Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => Destinations::One(c),
                        Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                            let clusters: Vec<_> = w
                                .clusters
                                .into_iter()
                                .map(|c| (c.name, c.weight, HeaderOps::default()))
                                .collect();
                            Destinations::weighted(clusters)
                                .map_err(|e| invalid(&at(".weighted_clusters"), e))?
                        }
                        None => {
                            return Err(invalid(
                                &at(".cluster_specifier"),
                                "a cluster is needed".into(),
                            ));
                        }
                    };
                    let hash_source_ip = match proxy.hash_policy.as_slice() {
                        [] => false,
                        [policy]
                            if matches!(
                                policy.policy_specifier,
                                Some(type_hash_policy::PolicySpecifier::SourceIp(_))
                            ) =>
                        {
                            true
                        }
                        _ => {
                            return Err(invalid(
                                &at(".hash_policy"),
                                "only one source_ip hash policy is supported".into(),
                            ));
                        }
                    };
                    terminal = Some(Terminal::Tcp(Arc::new(TcpRoute {
                        hash_source_ip,
                        access_logs: logs(&proxy.access_log)?,
                        stat_prefix: proxy.stat_prefix,
                        destinations,
                    })));
                }
                NETWORK_RBAC_FILTER if terminal.is_none() => {
                    let config = unpack(any).map_err(|e| invalid(&at(""), e))?;
                    if let Some(filter) = Rbac::from_network(&config)
                        .map_err(|(f, e)| invalid(&at(&format!(".{f}")), e))?
                    {
                        rbac.push(filter);
                    }
                }
                NETWORK_RBAC_FILTER => {
                    return Err(invalid(
                        &at(""),
                        "an RBAC filter must come before the chain's terminal filter".into(),
                    ));
                }
                other => {
                    return Err(invalid(
                        &at(""),
                        format!("the network filter {other} is not supported"),
                    ));
                }
            }
        }
        let terminal = terminal.ok_or_else(|| {
            invalid(
                "filters",
                "no http_connection_manager or tcp_proxy ends the chain".into(),
            )
        })?;
        let tls = match &chain.transport_socket {
            Some(socket) => DownstreamTls::from_envoy(socket)
                .map_err(|(f, e)| invalid(&format!("transport_socket.{f}"), e))?
                .map(Arc::new),
            None => None,
        };
        Ok(Self {
            name: chain.name.clone(),
            matcher,
            tls,
            rbac: rbac.into(),
            terminal,
        })
    }
}

impl ChainMatch {
    fn needs_tls_inspection(&self) -> bool {
        self.transport_protocol.as_deref() == Some("tls") || !self.server_names.is_empty()
    }

    /// None when the connection does not match; otherwise how specific the
    /// match is, criteria in Envoy's order of precedence.
    /// How the chain matches the connection at each of Envoy's levels
    /// (destination port, destination address, server name, transport
    /// protocol, application protocols): None where it does not, else how
    /// specifically (0 when it asks nothing there).
    fn levels(&self, c: &ConnectionInfo<'_>) -> [Option<u8>; 5] {
        let port = match self.destination_port {
            None => Some(0),
            Some(p) if c.destination.map(|d| d.port()) == Some(p) => Some(1),
            Some(_) => None,
        };
        let prefix = if self.prefix_ranges.is_empty() {
            Some(0)
        } else {
            c.destination.and_then(|d| {
                self.prefix_ranges
                    .iter()
                    .filter(|(net, len)| contains(*net, *len, d.ip()))
                    .map(|(_, len)| *len + 1)
                    .max()
            })
        };
        let server = if self.server_names.is_empty() {
            Some(0)
        } else {
            c.server_name.and_then(|name| {
                let name = name.to_ascii_lowercase();
                self.server_names
                    .iter()
                    .filter_map(|s| {
                        if *s == name {
                            Some(u8::MAX)
                        } else {
                            s.strip_prefix('*')
                                .filter(|suffix| name.ends_with(suffix))
                                .map(|suffix| suffix.len().min(254) as u8)
                        }
                    })
                    .max()
            })
        };
        let transport = match &self.transport_protocol {
            None => Some(0),
            Some(t) if t == c.transport_protocol => Some(1),
            Some(_) => None,
        };
        let alpn = if self.application_protocols.is_empty() {
            Some(0)
        } else {
            self.application_protocols
                .iter()
                .any(|p| c.application_protocols.contains(p))
                .then_some(1)
        };
        [port, prefix, server, transport, alpn]
    }
}

/// A filter's access logs; an error says which one is wrong.
fn access_logs(
    logs: &[envoy_types::pb::envoy::config::accesslog::v3::AccessLog],
) -> std::result::Result<Arc<[AccessLog]>, (usize, String)> {
    logs.iter()
        .enumerate()
        .map(|(j, log)| AccessLog::from_envoy(log).map_err(|e| (j, e)))
        .collect()
}

fn contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let len = u32::from(len.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let len = u32::from(len.min(128));
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::from_json;
    use serde_json::json;

    fn hcm(route: &str) -> serde_json::Value {
        json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": format!("type.googleapis.com/{HTTP_CONNECTION_MANAGER}"),
            "stat_prefix": route, "rds": {"route_config_name": route, "config_source": {"ads": {}}},
        }})
    }

    #[test]
    fn a_connection_waits_for_its_next_request_as_long_as_envoy_keeps_it_idle() {
        let wait = |fields: serde_json::Value| {
            let mut manager = json!({"stat_prefix": "http",
                "rds": {"route_config_name": "r", "config_source": {"ads": {}}}});
            manager
                .as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            let manager = from_json(manager).unwrap();
            (header_wait(&manager), idle_timeout(&manager))
        };
        let secs = |s| Some(std::time::Duration::from_secs(s));
        assert_eq!(
            wait(json!({})),
            (secs(3600), secs(3600)),
            "Envoy's idle timeout, 1 h"
        );
        assert_eq!(
            wait(json!({"common_http_protocol_options": {"idle_timeout": "300s"}})),
            (secs(300), secs(300))
        );
        assert_eq!(
            wait(json!({"common_http_protocol_options": {"idle_timeout": "0s"}})),
            (None, None),
            "0 turns it off"
        );
        assert_eq!(
            wait(json!({"request_headers_timeout": "10s"})),
            (secs(10), secs(3600)),
            "the wait for headers is shorter; an HTTP/2 connection with no stream stays"
        );
        assert_eq!(
            wait(
                json!({"common_http_protocol_options": {"idle_timeout": "0s"},
                        "request_headers_timeout": "10s"})
            ),
            (secs(10), None)
        );
    }

    #[test]
    fn chains_are_chosen_by_port_then_range_then_transport() {
        let listener = Listener::from_envoy(&from_json(json!({
            "name": "virtualInbound",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
            "use_original_dst": true,
            "filter_chains": [
                {"name": "any", "filters": [hcm("any")]},
                {"name": "9080", "filter_chain_match": {"destination_port": 9080}, "filters": [hcm("9080")]},
                {"name": "9080-pod", "filter_chain_match": {"destination_port": 9080, "prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]}, "filters": [hcm("pod")]},
                {"name": "9080-tls", "filter_chain_match": {"destination_port": 9080, "transport_protocol": "tls"}, "filters": [hcm("tls")]},
            ],
        })).unwrap())
        .unwrap();
        let chain = |dest: &str, transport: &str| {
            listener
                .find_chain(&ConnectionInfo {
                    destination: Some(dest.parse().unwrap()),
                    transport_protocol: transport,
                    ..Default::default()
                })
                .map(|c| c.name.as_str())
        };
        assert_eq!(chain("192.168.1.1:80", "raw_buffer"), Some("any"));
        assert_eq!(chain("192.168.1.1:9080", "raw_buffer"), Some("9080"));
        assert_eq!(chain("10.1.2.3:9080", "raw_buffer"), Some("9080-pod"));
        assert_eq!(chain("192.168.1.1:9080", "tls"), Some("9080-tls"));
        assert!(listener.use_original_dst && listener.bind);
    }

    #[test]
    fn a_chain_without_a_terminal_filter_is_refused() {
        let error = Listener::from_envoy(&from_json(json!({
            "name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": []}],
        })).unwrap())
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("Listener l: filter_chains[0].filters:"),
            "{error}"
        );
    }
}
