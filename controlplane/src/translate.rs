//! Translation from the model and the Istio-compatible config to Envoy v3
//! resources, per proxy. Pure functions; tests assert on the resources
//! they produce.
//!
//! Names follow Istio's, so that dashboards and tools keep working:
//! clusters `outbound|<port>|<subset>|<host>` and `inbound|<port>||`,
//! route configurations named by port, listeners `virtualOutbound`,
//! `virtualInbound` and `0.0.0.0_<port>`.
//!
//! - [`clusters`]: outbound clusters and their endpoints (DestinationRule);
//! - [`routes`]: VirtualService `http` rules as routes;
//! - [`listeners`]: a sidecar's listeners, inbound mutual TLS included;
//! - [`gateway`]: a gateway's listeners and routes from Gateways;
//! - [`authz`]: AuthorizationPolicies as inbound RBAC filters.

pub mod authz;
pub mod clusters;
pub mod gateway;
pub mod listeners;
pub mod routes;

use std::collections::{BTreeMap, BTreeSet};

use bowline_api::install::OutboundTrafficMode;
use bowline_api::networking::{DestinationRuleSpec, SidecarSpec, VirtualServiceSpec};
use bowline_api::security::{MtlsMode, PeerAuthenticationSpec};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::BindConfig;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Duration;
use envoy_types::util::pack_any;

use crate::model::{
    AccessLogSettings, Config, HostIndex, Mesh, Protocol, Proxy, Service, Snapshot,
    TracingSettings, host_matches, oldest, resolve_host, selects,
};
use listeners::{Bound, Carries, Inbound, Outbound};
use routes::RouteContext;

/// What one proxy is sent, by type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteConfiguration>,
}

/// A sidecar's whole configuration: what its scope shares with every
/// sidecar in the same namespace with the same labels, and its inbound.
pub fn sidecar(snapshot: &Snapshot, proxy: &Proxy) -> Resources {
    let scope = Scope::new(snapshot, &proxy.namespace, &proxy.labels);
    let mut resources = Resources {
        clusters: scope.clusters(),
        endpoints: scope.endpoints(),
        listeners: scope.outbound_listeners(),
        routes: scope.routes(),
    };
    let (clusters, listeners) = own(snapshot, proxy);
    resources.clusters.extend(clusters);
    resources.listeners.extend(listeners);
    resources
}

/// Istio's default access log line (`accessLogEncoding: TEXT`).
const ACCESS_LOG_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default access log fields (`accessLogEncoding: JSON`).
const ACCESS_LOG_JSON: [(&str, &str); 24] = [
    ("authority", "%REQ(:AUTHORITY)%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("duration", "%DURATION%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("route_name", "%ROUTE_NAME%"),
    ("start_time", "%START_TIME%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
];

/// Adds what the mesh asks proxies to tell about traffic to every HTTP
/// connection manager and TCP proxy of `listeners`, as Istio does: its
/// access log (`accessLogFile`) on both, and tracing (`enableTracing`,
/// `defaultConfig.tracing`) on HTTP connection managers.
pub fn observe(listeners: &mut [Listener], mesh: &Mesh) {
    use envoy_types::pb::envoy::config::listener::v3::filter;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
    use prost::{Message, Name};

    let log = mesh.access_log.as_ref().map(access_log);
    let tracing = mesh.tracing.as_ref().map(tracing);
    if log.is_none() && tracing.is_none() {
        return;
    }
    let chains = listeners.iter_mut().flat_map(|l| {
        l.filter_chains
            .iter_mut()
            .chain(l.default_filter_chain.as_mut())
    });
    for filter in chains.flat_map(|c| c.filters.iter_mut()) {
        let Some(filter::ConfigType::TypedConfig(any)) = &mut filter.config_type else {
            continue;
        };
        if any.type_url == HttpConnectionManager::type_url() {
            if let Ok(mut manager) = HttpConnectionManager::decode(any.value.as_slice()) {
                manager.access_log.extend(log.clone());
                manager.tracing.clone_from(&tracing);
                *any = pack_any(manager);
            }
        } else if let Some(log) = &log
            && any.type_url == TcpProxy::type_url()
            && let Ok(mut proxy) = TcpProxy::decode(any.value.as_slice())
        {
            proxy.access_log.push(log.clone());
            *any = pack_any(proxy);
        }
    }
}

/// Istio's file access log: its default TEXT line, or its JSON fields.
fn access_log(
    settings: &AccessLogSettings,
) -> envoy_types::pb::envoy::config::accesslog::v3::AccessLog {
    use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
    use envoy_types::pb::envoy::config::core::v3::{
        DataSource, SubstitutionFormatString, data_source, substitution_format_string,
    };
    use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
        FileAccessLog, file_access_log,
    };
    use envoy_types::pb::google::protobuf::{Struct, Value, value};

    let format = if settings.json {
        substitution_format_string::Format::JsonFormat(Struct {
            fields: ACCESS_LOG_JSON
                .iter()
                .map(|(key, command)| {
                    let value = Value {
                        kind: Some(value::Kind::StringValue(command.to_string())),
                    };
                    (key.to_string(), value)
                })
                .collect(),
        })
    } else {
        substitution_format_string::Format::TextFormatSource(DataSource {
            specifier: Some(data_source::Specifier::InlineString(ACCESS_LOG_TEXT.into())),
            ..Default::default()
        })
    };
    AccessLog {
        name: "envoy.access_loggers.file".into(),
        config_type: Some(access_log::ConfigType::TypedConfig(pack_any(
            FileAccessLog {
                path: settings.path.clone(),
                access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(
                    SubstitutionFormatString {
                        format: Some(format),
                        ..Default::default()
                    },
                )),
            },
        ))),
        ..Default::default()
    }
}

/// Istio's tracing of an HTTP connection manager: the OpenTelemetry
/// tracer exporting to the collector's outbound cluster, sampling
/// `sampling` percent of requests that arrive without a decision
/// (`x-client-trace-id` always traced).
fn tracing(
    settings: &TracingSettings,
) -> envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing{
    use envoy_types::pb::envoy::config::core::v3::{GrpcService, grpc_service};
    use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, tracing};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
    use envoy_types::pb::envoy::r#type::v3::Percent;

    let percent = |value| Some(Percent { value });
    let collector = OpenTelemetryConfig {
        grpc_service: Some(GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                grpc_service::EnvoyGrpc {
                    cluster_name: clusters::cluster_name(settings.port.into(), "", &settings.host),
                    authority: settings.host.clone(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    Tracing {
        client_sampling: percent(100.0),
        random_sampling: percent(settings.sampling),
        overall_sampling: percent(100.0),
        provider: Some(tracing::Http {
            name: "envoy.tracers.opentelemetry".into(),
            config_type: Some(tracing::http::ConfigType::TypedConfig(pack_any(collector))),
        }),
        ..Default::default()
    }
}

/// What sidecars of one namespace with the same labels see outbound: the
/// same services, rules and routes. Generated once per push for all of
/// them.
#[derive(Debug)]
pub struct Scope<'s> {
    snapshot: &'s Snapshot,
    namespace: &'s str,
    labels: &'s BTreeMap<String, String>,
    sidecar: Option<&'s Config<SidecarSpec>>,
    services: Vec<&'s Service>,
    allow_any: bool,
    /// DestinationRules that may apply to this scope, by host.
    rules: HostIndex<'s, DestinationRuleSpec>,
    /// VirtualServices bound to the mesh, by host.
    routes: HostIndex<'s, VirtualServiceSpec>,
    /// The Sidecar's egress listeners the proxy binds itself.
    bound: Vec<Bound>,
    /// The outbound ports routed as HTTP (a `0.0.0.0_<port>` listener).
    http_ports: BTreeSet<u32>,
}

impl<'s> Scope<'s> {
    pub fn new(
        snapshot: &'s Snapshot,
        namespace: &'s str,
        labels: &'s BTreeMap<String, String>,
    ) -> Self {
        let sidecar = sidecar_for(snapshot, namespace, labels);
        let services = visible_services(snapshot, namespace, sidecar.map(|s| &s.spec));
        let allow_any = allow_any(snapshot, sidecar.map(|s| &s.spec));
        let rules = rule_index(snapshot, namespace, labels);
        let mesh = [routes::MESH_GATEWAY.to_string()];
        let routes = HostIndex::new(
            snapshot
                .virtual_services
                .iter()
                .filter(|vs| routes::bound_to(vs, &mesh)),
            |vs| vs.spec.hosts.iter().map(String::as_str).collect(),
        );
        let mut scope = Self {
            snapshot,
            namespace,
            labels,
            sidecar,
            services,
            allow_any,
            rules,
            routes,
            bound: Vec::new(),
            http_ports: BTreeSet::new(),
        };
        scope.bound = scope.find_bound();
        scope.http_ports = scope.find_http_ports();
        scope
    }

    fn rule(&self, host: &str) -> Option<&'s DestinationRuleSpec> {
        rule_of(self.snapshot, &self.rules, self.namespace, host)
    }

    /// Every visible service's clusters, and the fixed ones.
    pub fn clusters(&self) -> Vec<Cluster> {
        let mut clusters: Vec<Cluster> = self
            .services
            .iter()
            .flat_map(|s| {
                let rule = self.rule(&s.hostname);
                let identities = self.identities(s);
                let mut clusters = clusters::outbound_clusters(s, rule, &identities);
                clusters::resolve(&mut clusters, s, self.endpoints_of(s), rule);
                clusters
            })
            .collect();
        clusters.extend(fixed_clusters());
        clusters
    }

    pub fn endpoints(&self) -> Vec<ClusterLoadAssignment> {
        self.services
            .iter()
            .flat_map(|s| {
                clusters::load_assignments(s, self.endpoints_of(s), self.rule(&s.hostname))
            })
            .collect()
    }

    /// The SPIFFE IDs of the service's workloads, each once.
    fn identities(&self, service: &Service) -> Vec<String> {
        self.snapshot
            .service_accounts(&service.hostname)
            .into_iter()
            .map(|sa| {
                format!(
                    "spiffe://{}/ns/{}/sa/{sa}",
                    self.snapshot.mesh.trust_domain, service.namespace
                )
            })
            .collect()
    }

    fn endpoints_of(&self, service: &Service) -> &'s [crate::model::Endpoint] {
        self.snapshot
            .endpoints
            .get(&service.hostname)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Service ports that speak HTTP, bound egress ports, and port 80 when
    /// a VirtualService names a host no service has.
    fn find_http_ports(&self) -> BTreeSet<u32> {
        let mut ports: BTreeSet<u32> = self
            .services
            .iter()
            .flat_map(|s| s.ports.iter())
            .filter(|p| p.protocol.is_http())
            .map(|p| p.port)
            .collect();
        ports.extend(
            self.bound
                .iter()
                .filter(|b| b.carries == Carries::Http)
                .map(|b| b.port),
        );
        let ctx = self.context(routes::DEFAULT_HTTP_PORT);
        if !routes::unbacked_hosts(&ctx, &self.services).is_empty() {
            ports.insert(routes::DEFAULT_HTTP_PORT);
        }
        ports
    }

    /// Service ports of unknown protocol (a port name without a protocol
    /// prefix, no appProtocol) that have an address: told HTTP or not by
    /// their first bytes, as Istio does.
    fn sniffed_ports(&self) -> impl Iterator<Item = u32> + '_ {
        self.services
            .iter()
            .filter(|service| service.address.is_some())
            .flat_map(|service| service.ports.iter())
            .filter(|p| p.protocol == Protocol::Unknown)
            .map(|p| p.port)
    }

    /// Sidecar egress listeners the proxy binds itself, carrying what
    /// their port's protocol says: HTTP routed by the port's route
    /// configuration; TCP to the first visible service with that port
    /// (none there: no listener, as in Istio); an undeclared protocol
    /// told apart by its first bytes.
    fn find_bound(&self) -> Vec<Bound> {
        self.sidecar
            .iter()
            .flat_map(|s| s.spec.egress.iter())
            .filter(|e| e.capture_mode == Some(bowline_api::networking::CaptureMode::None))
            .filter_map(|e| {
                let port = e.port.as_ref()?;
                let protocol = Protocol::select("", port.protocol.as_deref());
                let cluster = || {
                    self.services
                        .iter()
                        .find(|s| s.port(port.number).is_some())
                        .map(|s| clusters::cluster_name(port.number, "", &s.hostname))
                };
                let carries = match protocol {
                    p if p.is_http() => Carries::Http,
                    Protocol::Unknown => Carries::Sniffed { cluster: cluster() },
                    _ => Carries::Tcp {
                        cluster: cluster()?,
                    },
                };
                Some(Bound {
                    address: e.bind.clone().unwrap_or_else(|| "127.0.0.1".into()),
                    port: port.number,
                    carries,
                })
            })
            .collect()
    }

    fn context(&self, port: u32) -> RouteContext<'_> {
        RouteContext {
            snapshot: self.snapshot,
            virtual_services: Some(&self.routes),
            rules: &self.rules,
            gateways: vec![routes::MESH_GATEWAY.to_string()],
            port,
            proxy_labels: self.labels,
            proxy_namespace: self.namespace,
        }
    }

    /// One route configuration per outbound HTTP or sniffed port, named
    /// by it.
    pub fn routes(&self) -> Vec<RouteConfiguration> {
        let bound_sniffed = self
            .bound
            .iter()
            .filter(|b| matches!(b.carries, Carries::Sniffed { .. }))
            .map(|b| b.port);
        let ports: BTreeSet<u32> = self
            .http_ports
            .iter()
            .copied()
            .chain(self.sniffed_ports())
            .chain(bound_sniffed)
            .collect();
        ports
            .into_iter()
            .map(|port| {
                routes::outbound_route_configuration(
                    &self.context(port),
                    &self.services,
                    &port.to_string(),
                    self.allow_any,
                )
            })
            .collect()
    }

    /// A listener per HTTP port, one per TCP service port with an
    /// address, and the bound ones.
    pub fn outbound_listeners(&self) -> Vec<Listener> {
        let mut listeners = Vec::new();
        for &port in &self.http_ports {
            if port == routes::DEFAULT_HTTP_PORT
                || self.services.iter().any(|s| s.port(port).is_some())
            {
                listeners.push(listeners::outbound(&Outbound::Http { port }));
            }
        }
        // TLS to hosts without an address is told apart by SNI on a
        // listener per port.
        let mut by_sni: BTreeMap<u32, Vec<(String, String)>> = BTreeMap::new();
        for service in &self.services {
            for port in service.ports.iter().filter(|p| !p.protocol.is_http()) {
                let cluster = clusters::cluster_name(port.port, "", &service.hostname);
                match &service.address {
                    Some(address) if port.protocol == Protocol::Unknown => {
                        listeners.push(listeners::outbound(&Outbound::Sniffed {
                            address: address.clone(),
                            port: port.port,
                            cluster,
                        }));
                    }
                    Some(address) => listeners.push(listeners::outbound(&Outbound::Tcp {
                        address: address.clone(),
                        port: port.port,
                        cluster,
                    })),
                    None if matches!(port.protocol, Protocol::Tls | Protocol::Https) => by_sni
                        .entry(port.port)
                        .or_default()
                        .push((service.hostname.clone(), cluster)),
                    None => {}
                }
            }
        }
        for (port, hosts) in by_sni {
            if !self.http_ports.contains(&port) {
                listeners.push(listeners::outbound_tls(port, &hosts));
            }
        }
        listeners.extend(
            self.bound
                .iter()
                .map(|b| listeners::bound(b, self.allow_any)),
        );
        hash_tcp_by_source_ip(self.snapshot, &self.rules, self.namespace, &mut listeners);
        observe(&mut listeners, &self.snapshot.mesh);
        listeners
    }
}

/// Gives the tcp_proxy filters in `listeners` to a cluster whose
/// DestinationRule (as a proxy of `namespace` sees it, subsets and ports
/// included) hashes by `useSourceIp` a source IP hash policy, as Istio
/// does for sidecars and gateways alike; other keys are HTTP's.
pub(crate) fn hash_tcp_by_source_ip(
    snapshot: &Snapshot,
    rules: &HostIndex<'_, DestinationRuleSpec>,
    namespace: &str,
    listeners: &mut [Listener],
) {
    // Most meshes ask for none: then no filter is decoded.
    if !snapshot
        .destination_rules
        .iter()
        .any(|r| asks_source_ip_hash(&r.spec))
    {
        return;
    }
    listeners::hash_tcp_by_source_ip(listeners, |cluster| {
        let ["outbound", port, subset, host] = cluster.split('|').collect::<Vec<_>>()[..] else {
            return false;
        };
        let (Ok(port), Some(rule)) = (port.parse(), rule_of(snapshot, rules, namespace, host))
        else {
            return false;
        };
        clusters::consistent_hash_at(rule, Some(subset).filter(|s| !s.is_empty()), port)
            .is_some_and(|h| h.use_source_ip == Some(true))
    });
}

/// Whether any policy of `rule` (its own, a port's, a subset's) hashes by
/// the client's address.
fn asks_source_ip_hash(rule: &DestinationRuleSpec) -> bool {
    rule.traffic_policy
        .iter()
        .chain(
            rule.subsets
                .iter()
                .filter_map(|s| s.traffic_policy.as_ref()),
        )
        .flat_map(|p| {
            p.load_balancer.iter().chain(
                p.port_level_settings
                    .iter()
                    .filter_map(|s| s.load_balancer.as_ref()),
            )
        })
        .any(|lb| {
            lb.consistent_hash
                .as_ref()
                .is_some_and(|h| h.use_source_ip == Some(true))
        })
}

/// What is the proxy's own: for a captured proxy, `virtualOutbound`, and
/// `virtualInbound` with a cluster per port its workload serves.
pub fn own(snapshot: &Snapshot, proxy: &Proxy) -> (Vec<Cluster>, Vec<Listener>) {
    if !proxy.captured {
        return (Vec::new(), Vec::new());
    }
    let ports = inbound_ports(snapshot, proxy);
    let sidecar = sidecar_for(snapshot, &proxy.namespace, &proxy.labels);
    let mut own = vec![
        listeners::virtual_outbound(allow_any(snapshot, sidecar.map(|s| &s.spec))),
        listeners::virtual_inbound(&ports, &authz::network_filters(snapshot, proxy)),
    ];
    observe(&mut own, &snapshot.mesh);
    (
        ports.iter().map(|p| inbound_cluster(snapshot, p)).collect(),
        own,
    )
}

/// Whether traffic to hosts the mesh does not know passes (ALLOW_ANY):
/// the Sidecar's policy, else the mesh's.
fn allow_any(snapshot: &Snapshot, sidecar: Option<&SidecarSpec>) -> bool {
    sidecar
        .and_then(|s| s.outbound_traffic_policy.as_ref())
        .and_then(|p| p.mode)
        .map(|m| m == bowline_api::networking::OutboundTrafficMode::AllowAny)
        .unwrap_or(snapshot.mesh.outbound == OutboundTrafficMode::AllowAny)
}

/// The Sidecar resource for a proxy: one selecting its labels in its
/// namespace, else its namespace's without a selector, else the mesh's.
pub fn sidecar_for<'s>(
    snapshot: &'s Snapshot,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Option<&'s Config<SidecarSpec>> {
    let in_namespace = |ns: String| snapshot.sidecars.iter().filter(move |s| s.namespace == ns);
    let unselective = |s: &&Config<SidecarSpec>| s.spec.workload_selector.is_none();
    oldest(in_namespace(namespace.to_string()).filter(|s| {
        s.spec
            .workload_selector
            .as_ref()
            .is_some_and(|w| selects(&w.labels, labels))
    }))
    .or_else(|| oldest(in_namespace(namespace.to_string()).filter(unselective)))
    .or_else(|| oldest(in_namespace(snapshot.mesh.root_namespace.clone()).filter(unselective)))
}

/// The services a proxy sees: all, or those its Sidecar's egress hosts
/// (`<namespace>/<host>`, `.` for its own namespace, `*` for any) name.
fn visible_services<'s>(
    snapshot: &'s Snapshot,
    namespace: &str,
    sidecar: Option<&SidecarSpec>,
) -> Vec<&'s Service> {
    let hosts: Vec<(String, String)> = sidecar
        .iter()
        .flat_map(|s| s.egress.iter())
        .flat_map(|e| e.hosts.iter())
        .filter_map(|h| h.split_once('/'))
        .map(|(ns, host)| {
            let ns = if ns == "." { namespace } else { ns };
            (ns.to_string(), host.to_string())
        })
        .collect();
    snapshot
        .services
        .values()
        .filter(|s| {
            sidecar.is_none()
                || hosts.iter().any(|(ns, host)| {
                    (ns == "*" || *ns == s.namespace)
                        && (host == "*" || host_matches(&resolve_host(host, ns), &s.hostname))
                })
        })
        .collect()
}

/// The DestinationRules that may apply to a proxy of `namespace` with
/// `labels`, by host: those without a workload selector, and those of its
/// namespace selecting it.
pub(crate) fn rule_index<'s>(
    snapshot: &'s Snapshot,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> HostIndex<'s, DestinationRuleSpec> {
    HostIndex::new(
        snapshot.destination_rules.iter().filter(|r| {
            r.spec
                .workload_selector
                .as_ref()
                .is_none_or(|w| r.namespace == namespace && selects(&w.match_labels, labels))
        }),
        |r| vec![r.spec.host.as_str()],
    )
}

/// The DestinationRule of `host` for a proxy of `namespace`, among
/// `rules` ([`rule_index`]).
pub(crate) fn rule_of<'s>(
    snapshot: &Snapshot,
    rules: &HostIndex<'s, DestinationRuleSpec>,
    namespace: &str,
    host: &str,
) -> Option<&'s DestinationRuleSpec> {
    pick_rule(snapshot, namespace, host, rules.find(host)).map(|r| &r.spec)
}

/// The DestinationRule for `host` among `candidates` (those naming it):
/// the proxy's own namespace's first, then the host's, then the mesh's —
/// an exact host before a wildcard, the oldest where several match.
fn pick_rule<'s>(
    snapshot: &Snapshot,
    namespace: &str,
    host: &str,
    candidates: Vec<&'s Config<DestinationRuleSpec>>,
) -> Option<&'s Config<DestinationRuleSpec>> {
    let host_namespace = snapshot.services.get(host).map(|s| s.namespace.as_str());
    let rank = |r: &Config<DestinationRuleSpec>| {
        if r.namespace == namespace {
            0
        } else if Some(r.namespace.as_str()) == host_namespace {
            1
        } else if r.namespace == snapshot.mesh.root_namespace {
            2
        } else {
            3
        }
    };
    candidates.into_iter().min_by(|a, b| {
        (rank(a), a.spec.host.starts_with('*'), a.created, &a.name).cmp(&(
            rank(b),
            b.spec.host.starts_with('*'),
            b.created,
            &b.name,
        ))
    })
}

/// The ports the proxy's workload serves (the target ports of the
/// endpoints at its address), with the peer authentication each wants.
fn inbound_ports(snapshot: &Snapshot, proxy: &Proxy) -> Vec<Inbound> {
    let mut ports: BTreeMap<u32, (bool, bool, Vec<String>)> = BTreeMap::new();
    for (host, endpoints) in snapshot.endpoints.iter() {
        for e in endpoints.iter().filter(|e| e.address == proxy.ip) {
            let protocol = snapshot
                .services
                .get(host)
                .and_then(|s| s.port(e.service_port))
                .map(|p| p.protocol);
            let http = protocol.is_some_and(|p| p.is_http());
            let h2 = matches!(protocol, Some(Protocol::Http2 | Protocol::Grpc));
            let (any_http, any_h2, services) = ports.entry(e.port).or_default();
            *any_http |= http;
            *any_h2 |= h2;
            if !services.contains(host) {
                services.push(host.clone());
            }
        }
    }
    let rbac = authz::filters(snapshot, proxy);
    let network_rbac = authz::network_filters(snapshot, proxy);
    ports
        .into_iter()
        .map(|(port, (http, h2, services))| Inbound {
            port,
            http,
            h2,
            services,
            mtls: mtls_mode(snapshot, proxy, port),
            rbac: if http { rbac.clone() } else { Vec::new() },
            network_rbac: if http {
                Vec::new()
            } else {
                network_rbac.clone()
            },
        })
        .collect()
}

/// The effective mutual-TLS mode on `port` of the proxy's workload: the
/// workload's policy (port level first), then its namespace's, then the
/// mesh's, each UNSET deferring to the next; PERMISSIVE when none says.
pub fn mtls_mode(snapshot: &Snapshot, proxy: &Proxy, port: u32) -> MtlsMode {
    let policies = &snapshot.peer_authentications;
    let namespace_wide = |p: &&Config<PeerAuthenticationSpec>| {
        p.spec
            .selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_empty())
    };
    let workload = oldest(policies.iter().filter(|p| {
        p.namespace == proxy.namespace
            && p.spec.selector.as_ref().is_some_and(|s| {
                !s.match_labels.is_empty() && selects(&s.match_labels, &proxy.labels)
            })
    }));
    let namespace = oldest(
        policies
            .iter()
            .filter(|p| p.namespace == proxy.namespace)
            .filter(namespace_wide),
    );
    let mesh = oldest(
        policies
            .iter()
            .filter(|p| p.namespace == snapshot.mesh.root_namespace)
            .filter(namespace_wide),
    );
    let set = |mode: Option<MtlsMode>| mode.filter(|m| *m != MtlsMode::Unset);
    workload
        .and_then(|p| {
            set(p
                .spec
                .port_level_mtls
                .get(&port.to_string())
                .and_then(|m| m.mode))
        })
        .or_else(|| workload.and_then(|p| set(p.spec.mtls.as_ref().and_then(|m| m.mode))))
        .or_else(|| namespace.and_then(|p| set(p.spec.mtls.as_ref().and_then(|m| m.mode))))
        .or_else(|| mesh.and_then(|p| set(p.spec.mtls.as_ref().and_then(|m| m.mode))))
        .unwrap_or(MtlsMode::Permissive)
}

/// Passthrough (to where the connection was going), the black hole
/// (REGISTRY_ONLY's answer), and inbound passthrough.
fn fixed_clusters() -> Vec<Cluster> {
    vec![
        original_destination(routes::PASSTHROUGH_CLUSTER, None),
        Cluster {
            name: routes::BLACKHOLE_CLUSTER.into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32,
            )),
            connect_timeout: Some(duration(std::time::Duration::from_secs(10))),
            ..Default::default()
        },
        original_destination(listeners::INBOUND_PASSTHROUGH_CLUSTER, Some("127.0.0.6")),
    ]
}

/// To the workload on the port a connection came in on, from 127.0.0.6 so
/// that its traffic is not captured again.
/// Its metadata names the services the port serves, for the proxy's
/// metrics.
fn inbound_cluster(snapshot: &Snapshot, inbound: &Inbound) -> Cluster {
    let mut cluster = original_destination(
        &listeners::inbound_cluster_name(inbound.port),
        Some("127.0.0.6"),
    );
    let services: Vec<&Service> = inbound
        .services
        .iter()
        .filter_map(|host| snapshot.services.get(host))
        .collect();
    cluster.metadata = clusters::service_metadata(&services);
    if inbound.h2 {
        // gRPC and HTTP/2 ports reach the app over HTTP/2, which is all a
        // gRPC server speaks.
        clusters::http_options(&mut cluster, None, inbound.port, Protocol::Grpc);
    }
    cluster
}

fn original_destination(name: &str, bind: Option<&str>) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(duration(std::time::Duration::from_secs(10))),
        upstream_bind_config: bind.map(|ip| BindConfig {
            source_address: Some(match listeners::socket(ip, 0).address {
                Some(
                    envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s),
                ) => s,
                _ => unreachable!("socket() makes a socket address"),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}
