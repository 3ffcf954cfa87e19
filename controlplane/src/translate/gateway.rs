//! A gateway's listeners and routes, from the Gateways whose selector
//! matches its pod and the VirtualServices bound to them (`gateways:`).
//!
//! Per server port one listener `0.0.0.0_<port>`: plaintext HTTP routed by
//! the route configuration `http.<port>`; HTTPS terminated with the
//! server's `credentialName` (over SDS as `kubernetes://<name>`, and
//! `kubernetes://<name>-cacert` for MUTUAL) and routed by
//! `https.<port>.<server>.<gateway>.<namespace>`; TLS PASSTHROUGH chosen by
//! SNI and proxied as TCP as the VirtualService's `tls` routes say.

use bowline_api::networking::{GatewaySpec, Server, ServerTlsMode, VirtualServiceSpec};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch, Listener};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost, virtual_host};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, common_tls_context,
};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;

use super::listeners::{self, sds, socket};
use super::routes::{self, RouteContext};
use crate::model::{Config, Proxy, Snapshot, host_matches, resolve_host, selects};

/// A Gateway server as bound to this proxy.
#[derive(Clone, Debug)]
struct Bound<'s> {
    gateway: &'s Config<GatewaySpec>,
    server: &'s Server,
    index: usize,
}

impl Bound<'_> {
    /// `<namespace>/<name>`, as VirtualServices name it.
    fn gateway_name(&self) -> String {
        format!("{}/{}", self.gateway.namespace, self.gateway.name)
    }

    fn protocol(&self) -> String {
        self.server.port.protocol.to_ascii_uppercase()
    }

    fn tls_mode(&self) -> Option<ServerTlsMode> {
        self.server.tls.as_ref().and_then(|t| t.mode)
    }

    /// The route configuration of an HTTPS server, unique per server.
    fn https_routes_name(&self) -> String {
        format!(
            "https.{}.{}.{}.{}",
            self.server.port.number,
            self.server
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{}", self.server.port.name, self.index)),
            self.gateway.name,
            self.gateway.namespace
        )
    }

    /// The server's hosts without their namespace part.
    fn hosts(&self) -> Vec<String> {
        self.server
            .hosts
            .iter()
            .map(|h| h.split_once('/').map_or(h.as_str(), |(_, h)| h).to_string())
            .collect()
    }
}

/// The Gateway servers whose selector matches the proxy.
fn servers<'s>(snapshot: &'s Snapshot, proxy: &Proxy) -> Vec<Bound<'s>> {
    let mut bound = Vec::new();
    for gateway in snapshot.gateways.iter() {
        if gateway.spec.selector.is_empty() || !selects(&gateway.spec.selector, &proxy.labels) {
            continue;
        }
        for (index, server) in gateway.spec.servers.iter().enumerate() {
            bound.push(Bound {
                gateway,
                server,
                index,
            });
        }
    }
    bound
}

/// The gateway's listeners and route configurations.
pub fn gateway(snapshot: &Snapshot, proxy: &Proxy) -> (Vec<Listener>, Vec<RouteConfiguration>) {
    let servers = servers(snapshot, proxy);
    // AuthorizationPolicies selecting the gateway's pod judge what comes
    // in: RBAC HTTP filters before routing, network filters before TLS
    // passthrough.
    let rbac = super::authz::filters(snapshot, proxy);
    let network_rbac = super::authz::network_filters(snapshot, proxy);
    let mut ports: Vec<u32> = servers.iter().map(|s| s.server.port.number).collect();
    ports.sort_unstable();
    ports.dedup();
    let mut listeners = Vec::new();
    let mut routes = Vec::new();
    for port in ports {
        let bind = listener_port(snapshot, proxy, port);
        let on_port: Vec<&Bound<'_>> = servers
            .iter()
            .filter(|s| s.server.port.number == port)
            .collect();
        let mut chains = Vec::new();
        let plain: Vec<&Bound<'_>> = on_port
            .iter()
            .copied()
            .filter(|s| s.protocol() == "HTTP" || s.protocol() == "HTTP2" || s.protocol() == "GRPC")
            .collect();
        if !plain.is_empty() {
            let name = format!("http.{port}");
            routes.push(route_configuration(snapshot, proxy, &name, port, &plain));
            chains.push(FilterChain {
                filters: vec![listeners::rds_filter_judged(
                    &format!("outbound_0.0.0.0_{bind}"),
                    &name,
                    &rbac,
                )],
                ..Default::default()
            });
        }
        for server in on_port
            .iter()
            .filter(|s| s.protocol() == "HTTPS" || s.protocol() == "TLS")
        {
            match server.tls_mode() {
                Some(ServerTlsMode::Passthrough) | Some(ServerTlsMode::AutoPassthrough) => {
                    chains.extend(passthrough_chains(snapshot, server, port).into_iter().map(
                        |mut chain| {
                            chain.filters = listeners::network_rbac_filters(&network_rbac)
                                .chain(chain.filters)
                                .collect();
                            chain
                        },
                    ));
                }
                _ if server.protocol() == "HTTPS" => {
                    let name = server.https_routes_name();
                    routes.push(route_configuration(snapshot, proxy, &name, port, &[server]));
                    chains.push(FilterChain {
                        name: name.clone(),
                        filter_chain_match: Some(FilterChainMatch {
                            server_names: sni_names(&server.hosts()),
                            ..Default::default()
                        }),
                        filters: vec![listeners::rds_filter_judged(
                            &format!("outbound_0.0.0.0_{bind}"),
                            &name,
                            &rbac,
                        )],
                        transport_socket: terminate(server),
                        ..Default::default()
                    });
                }
                _ => {}
            }
        }
        if chains.is_empty() {
            continue;
        }
        let tls = on_port
            .iter()
            .any(|s| s.protocol() == "HTTPS" || s.protocol() == "TLS");
        listeners.push(Listener {
            name: format!("0.0.0.0_{bind}"),
            address: Some(socket("0.0.0.0", bind)),
            listener_filters: if tls {
                vec![listeners::tls_inspector()]
            } else {
                Vec::new()
            },
            filter_chains: chains,
            ..Default::default()
        });
    }
    let rules = super::rule_index(snapshot, &proxy.namespace, &proxy.labels);
    super::hash_tcp_by_source_ip(snapshot, &rules, &proxy.namespace, &mut listeners);
    super::observe(&mut listeners, &snapshot.mesh);
    (listeners, routes)
}

/// Where a server listens in the gateway's pod. A server's port is the
/// gateway Service's port, as in Istio: the listener binds the targetPort
/// that a Service of the gateway's namespace selecting this pod maps it to
/// (gateways run unprivileged, 80 → 8080), the port itself when one maps
/// it to itself or none maps it at all. The Service's endpoints say it: this
/// pod's, or — while this pod is not among them yet, as when it has just
/// started — those of its fellow replicas (the same `app` and `istio`
/// labels), so that the listener does not move when the endpoints churn.
fn listener_port(snapshot: &Snapshot, proxy: &Proxy, server_port: u32) -> u32 {
    let same_gateway = |labels: &std::collections::BTreeMap<String, String>| {
        ["app", "istio"].iter().all(|key| {
            proxy.labels.contains_key(*key) && labels.get(*key) == proxy.labels.get(*key)
        })
    };
    let mut targets: Vec<u32> = snapshot
        .endpoints
        .iter()
        .filter(|(host, _)| {
            snapshot
                .services
                .get(*host)
                .is_some_and(|s| s.namespace == proxy.namespace)
        })
        .flat_map(|(_, endpoints)| endpoints)
        .filter(|e| {
            e.service_port == server_port && (e.address == proxy.ip || same_gateway(&e.labels))
        })
        .map(|e| e.port)
        .collect();
    targets.sort_unstable();
    match targets.first() {
        Some(_) if targets.contains(&server_port) => server_port,
        Some(target) => *target,
        None => server_port,
    }
}

/// SNI to match for a server's hosts; `*` matches any (no names).
fn sni_names(hosts: &[String]) -> Vec<String> {
    if hosts.iter().any(|h| h == "*") {
        Vec::new()
    } else {
        hosts.to_vec()
    }
}

/// A virtual host per host of each VirtualService bound to one of the
/// servers' gateways, for the hosts the server admits.
fn route_configuration(
    snapshot: &Snapshot,
    proxy: &Proxy,
    name: &str,
    port: u32,
    servers: &[&Bound<'_>],
) -> RouteConfiguration {
    let mut virtual_hosts: Vec<VirtualHost> = Vec::new();
    let rules = super::rule_index(snapshot, &proxy.namespace, &proxy.labels);
    for server in servers {
        let ctx = RouteContext {
            snapshot,
            virtual_services: None,
            rules: &rules,
            gateways: vec![server.gateway_name()],
            port,
            proxy_labels: &proxy.labels,
            proxy_namespace: &proxy.namespace,
        };
        let redirect = server
            .server
            .tls
            .as_ref()
            .and_then(|t| t.https_redirect)
            .unwrap_or(false);
        let mut bound: Vec<&Config<VirtualServiceSpec>> = snapshot
            .virtual_services
            .iter()
            .filter(|vs| routes::bound_to(vs, &ctx.gateways))
            .collect();
        bound.sort_by_key(|vs| (vs.created, vs.namespace.clone(), vs.name.clone()));
        for vs in bound {
            for host in &vs.spec.hosts {
                let host = resolve_host(host, &vs.namespace);
                let admitted = server
                    .hosts()
                    .iter()
                    .any(|h| host_matches(h, &host) || host_matches(&host, h));
                if !admitted
                    || virtual_hosts
                        .iter()
                        .any(|v| v.domains.first() == Some(&host))
                {
                    continue;
                }
                virtual_hosts.push(VirtualHost {
                    name: format!("{host}:{port}"),
                    domains: vec![host.clone(), format!("{host}:*")],
                    routes: routes::http_routes(&ctx, vs),
                    require_tls: if redirect {
                        virtual_host::TlsRequirementType::All as i32
                    } else {
                        virtual_host::TlsRequirementType::None as i32
                    },
                    include_request_attempt_count: true,
                    ..Default::default()
                });
            }
        }
    }
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// TLS terminated with the server's credential, over SDS; MUTUAL also
/// verifies clients against the credential's CA.
fn terminate(
    server: &Bound<'_>,
) -> Option<envoy_types::pb::envoy::config::core::v3::TransportSocket> {
    let tls = server.server.tls.as_ref()?;
    let credential = tls.credential_name.clone()?;
    let mutual = tls.mode == Some(ServerTlsMode::Mutual);
    let context = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(&credential_resource(&credential))],
            validation_context_type: mutual.then(|| {
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
                    &format!("{}-cacert", credential_resource(&credential)),
                ))
            }),
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: mutual }),
        ..Default::default()
    };
    Some(listeners::transport_socket(pack_any(context)))
}

/// The SDS name of a Secret credential, as Istio's gateways ask for it.
pub fn credential_resource(name: &str) -> String {
    format!("kubernetes://{name}")
}

/// TLS passed through by SNI, as the bound VirtualServices' `tls` routes
/// say.
fn passthrough_chains(snapshot: &Snapshot, server: &Bound<'_>, port: u32) -> Vec<FilterChain> {
    let gateways = vec![server.gateway_name()];
    let mut chains = Vec::new();
    for vs in snapshot
        .virtual_services
        .iter()
        .filter(|vs| routes::bound_to(vs, &gateways))
    {
        for rule in &vs.spec.tls {
            let Some(destination) = rule.route.first() else {
                continue;
            };
            let ctx_port = destination
                .destination
                .port
                .as_ref()
                .map_or(port, |p| p.number);
            let host = resolve_host(&destination.destination.host, &vs.namespace);
            let cluster = super::clusters::cluster_name(
                ctx_port,
                destination.destination.subset.as_deref().unwrap_or(""),
                &host,
            );
            for m in &rule.match_ {
                chains.push(FilterChain {
                    name: format!("{}.{}|{}", vs.name, vs.namespace, m.sni_hosts.join(",")),
                    filter_chain_match: Some(FilterChainMatch {
                        server_names: m.sni_hosts.clone(),
                        ..Default::default()
                    }),
                    filters: vec![listeners::tcp_proxy(&cluster)],
                    ..Default::default()
                });
            }
        }
    }
    chains
}
