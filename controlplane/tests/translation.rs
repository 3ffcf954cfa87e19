//! Golden translation cases: the Istio examples in config/samples/istio,
//! over a small mesh, turned into the Envoy resources a sidecar or gateway
//! gets — asserting on what Envoy will do with them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bowline_api::networking::{
    DestinationRuleSpec, GatewaySpec, ServiceEntrySpec, SidecarSpec, VirtualServiceSpec,
};
use bowline_api::security::{AuthorizationPolicySpec, PeerAuthenticationSpec};
use bowline_controlplane::discovery::{entry_endpoints, entry_services};
use bowline_controlplane::model::{
    Config, Endpoint, Protocol, Proxy, ProxyKind, Service, ServicePort, Snapshot, TlsSecret,
};
use bowline_controlplane::translate::{self, Resources};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::rbac::v3::{principal, rbac};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteConfiguration, VirtualHost, header_matcher, route, route_action, route_match,
    virtual_host,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{HttpFault, fault_abort};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use prost::Message;
use serde_json::Value;

const NS: &str = "shop";

fn host(name: &str) -> String {
    format!("{name}.{NS}.svc.cluster.local")
}

fn http_service(name: &str, ports: &[u32]) -> Service {
    let mut service = Service::kubernetes(
        name,
        NS,
        ports
            .iter()
            .map(|&port| ServicePort {
                name: "http".into(),
                port,
                protocol: Protocol::Http,
            })
            .collect(),
    );
    service.address = Some(format!("10.96.0.{}", ports[0] % 250));
    service
}

fn endpoint(ip: &str, port: u32, labels: &[(&str, &str)]) -> Endpoint {
    Endpoint {
        address: ip.into(),
        service_port: port,
        port,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ready: true,
        sidecar: true,
        service_account: Some(labels[0].1.to_string()),
    }
}

/// The mesh: bookinfo's services, httpbin, api-service and payments, the
/// given samples applied in namespace `shop`.
fn snapshot(samples: &[&str]) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let mut services: BTreeMap<String, Service> = [
        http_service("reviews", &[9080]),
        http_service("ratings", &[9080]),
        http_service("details", &[9080]),
        http_service("productpage", &[9080]),
        http_service("httpbin", &[8000]),
        http_service("api-service", &[8080]),
        http_service("payments", &[8080, 9090]),
    ]
    .into_iter()
    .map(|s| (s.hostname.clone(), s))
    .collect();
    let mut endpoints: BTreeMap<String, Vec<Endpoint>> = BTreeMap::from([
        (
            host("reviews"),
            vec![
                endpoint("10.244.0.1", 9080, &[("app", "reviews"), ("version", "v1")]),
                endpoint("10.244.0.2", 9080, &[("app", "reviews"), ("version", "v2")]),
            ],
        ),
        (
            host("api-service"),
            vec![
                endpoint(
                    "10.244.0.3",
                    8080,
                    &[("app", "api-service"), ("track", "stable")],
                ),
                endpoint(
                    "10.244.0.4",
                    8080,
                    &[("app", "api-service"), ("track", "canary")],
                ),
            ],
        ),
        (
            host("payments"),
            vec![
                endpoint("10.244.0.20", 8080, &[("app", "payments")]),
                endpoint("10.244.0.20", 9090, &[("app", "payments")]),
            ],
        ),
    ]);
    let (mut vs, mut dr, mut gw, mut se, mut sc, mut pa, mut ap) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples/istio");
    for sample in samples {
        let text = std::fs::read_to_string(dir.join(format!("{sample}.yaml"))).expect("a sample");
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
        for document in documents {
            let name = document["metadata"]["name"].as_str().expect("a name");
            let spec = document["spec"].clone();
            fn config<T: serde::de::DeserializeOwned>(name: &str, spec: Value) -> Config<T> {
                Config::new(name, NS, serde_json::from_value(spec).expect("a spec"))
            }
            match document["kind"].as_str().expect("a kind") {
                "VirtualService" => vs.push(config::<VirtualServiceSpec>(name, spec)),
                "DestinationRule" => dr.push(config::<DestinationRuleSpec>(name, spec)),
                "Gateway" => gw.push(config::<GatewaySpec>(name, spec)),
                "ServiceEntry" => se.push(config::<ServiceEntrySpec>(name, spec)),
                "Sidecar" => sc.push(config::<SidecarSpec>(name, spec)),
                "PeerAuthentication" => pa.push(config::<PeerAuthenticationSpec>(name, spec)),
                "AuthorizationPolicy" => ap.push(config::<AuthorizationPolicySpec>(name, spec)),
                _ => {}
            }
        }
    }
    for entry in &se {
        for service in entry_services(entry) {
            services.entry(service.hostname.clone()).or_insert(service);
        }
        for (host, list) in entry_endpoints(entry) {
            endpoints.entry(host).or_insert(list);
        }
    }
    snapshot.services = Arc::new(services);
    snapshot.endpoints = Arc::new(endpoints);
    snapshot.virtual_services = Arc::new(vs);
    snapshot.destination_rules = Arc::new(dr);
    snapshot.gateways = Arc::new(gw);
    snapshot.service_entries = Arc::new(se);
    snapshot.sidecars = Arc::new(sc);
    snapshot.peer_authentications = Arc::new(pa);
    snapshot.authorization_policies = Arc::new(ap);
    snapshot.secrets = Arc::new(BTreeMap::from([(
        "istio-system/api-myapp-com-cert".to_string(),
        TlsSecret {
            cert: Some("CERT".into()),
            key: Some("KEY".into()),
            ca: None,
        },
    )]));
    snapshot
}

fn sidecar(app: &str, ip: &str) -> Proxy {
    Proxy {
        id: format!("sidecar~{ip}~{app}-1.{NS}~{NS}.svc.cluster.local"),
        kind: ProxyKind::Sidecar,
        namespace: NS.into(),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        ip: ip.into(),
        captured: true,
    }
}

/// The ingress gateway's pod (`istio: ingressgateway` in istio-system).
fn ingress_gateway() -> Proxy {
    Proxy {
        id: "router~10.244.0.30~ingress-1.istio-system~istio-system.svc.cluster.local".into(),
        kind: ProxyKind::Gateway,
        namespace: "istio-system".into(),
        labels: BTreeMap::from([("istio".to_string(), "ingressgateway".to_string())]),
        ip: "10.244.0.30".into(),
        captured: false,
    }
}

fn route_config<'r>(resources: &'r Resources, name: &str) -> &'r RouteConfiguration {
    resources
        .routes
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| {
            panic!(
                "route configuration {name}: {:?}",
                resources.routes.iter().map(|r| &r.name).collect::<Vec<_>>()
            )
        })
}

fn vhost<'r>(config: &'r RouteConfiguration, name: &str) -> &'r VirtualHost {
    config
        .virtual_hosts
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| {
            panic!(
                "virtual host {name}: {:?}",
                config
                    .virtual_hosts
                    .iter()
                    .map(|v| &v.name)
                    .collect::<Vec<_>>()
            )
        })
}

fn action(route: &Route) -> &envoy_types::pb::envoy::config::route::v3::RouteAction {
    match route.action.as_ref() {
        Some(route::Action::Route(action)) => action,
        other => panic!("a route action: {other:?}"),
    }
}

fn single_cluster(route: &Route) -> &str {
    match action(route).cluster_specifier.as_ref() {
        Some(route_action::ClusterSpecifier::Cluster(c)) => c,
        other => panic!("one cluster: {other:?}"),
    }
}

fn cluster<'r>(resources: &'r Resources, name: &str) -> &'r Cluster {
    resources
        .clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("cluster {name}"))
}

fn listener<'r>(resources: &'r Resources, name: &str) -> &'r Listener {
    resources
        .listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| {
            panic!(
                "listener {name}: {:?}",
                resources
                    .listeners
                    .iter()
                    .map(|l| &l.name)
                    .collect::<Vec<_>>()
            )
        })
}

fn typed<T: Message + Default>(config: &Option<filter::ConfigType>) -> T {
    match config {
        Some(filter::ConfigType::TypedConfig(any)) => {
            T::decode(any.value.as_slice()).expect("decodes")
        }
        other => panic!("typed config: {other:?}"),
    }
}

/// The route configuration a chain's HTTP connection manager asks RDS for.
fn rds_name(chain: &FilterChain) -> String {
    let hcm: HttpConnectionManager = typed(&chain.filters[0].config_type);
    match hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => rds.route_config_name,
        other => panic!("RDS: {other:?}"),
    }
}

/// The cluster a chain's TCP proxy sends every connection to.
fn tcp_cluster(chain: &FilterChain) -> String {
    let proxy: TcpProxy = typed(&chain.filters[0].config_type);
    match proxy.cluster_specifier {
        Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)) => cluster,
        other => panic!("a cluster: {other:?}"),
    }
}

/// Adds the service `legacy` (address 10.96.0.70) with `ports` (name,
/// number, protocol).
fn add_legacy(snapshot: &mut Snapshot, ports: &[(&str, u32, Protocol)]) {
    let ports = ports
        .iter()
        .map(|&(name, port, protocol)| ServicePort {
            name: name.into(),
            port,
            protocol,
        })
        .collect();
    let mut legacy = Service::kubernetes("legacy", NS, ports);
    legacy.address = Some("10.96.0.70".into());
    let mut services = (*snapshot.services).clone();
    services.insert(legacy.hostname.clone(), legacy);
    snapshot.services = Arc::new(services);
}

fn addresses(assignment: &ClusterLoadAssignment) -> Vec<String> {
    assignment
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|lb| match &lb.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(e)) => match &e.address.as_ref()?.address {
                Some(address::Address::SocketAddress(s)) => match s.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(p)) => {
                        Some(format!("{}:{p}", s.address))
                    }
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn a_90_10_split_between_subsets() {
    let snapshot = snapshot(&["reviews-90-10"]);
    let resources = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    let route = &vhost(
        route_config(&resources, "9080"),
        &format!("{}:9080", host("reviews")),
    )
    .routes[0];
    let Some(route_action::ClusterSpecifier::WeightedClusters(split)) =
        &action(route).cluster_specifier
    else {
        panic!("weighted clusters: {route:?}");
    };
    let weights: Vec<(&str, u32)> = split
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight.as_ref().unwrap().value))
        .collect();
    let (v1, v2) = (
        format!("outbound|9080|v1|{}", host("reviews")),
        format!("outbound|9080|v2|{}", host("reviews")),
    );
    assert_eq!(weights, [(v1.as_str(), 90), (v2.as_str(), 10)]);
    // Each subset's cluster has only its version's endpoint.
    for (name, ip) in [(&v1, "10.244.0.1:9080"), (&v2, "10.244.0.2:9080")] {
        assert_eq!(cluster(&resources, name).name, *name);
        let assignment = resources
            .endpoints
            .iter()
            .find(|e| e.cluster_name == *name)
            .unwrap();
        assert_eq!(addresses(assignment), [ip]);
    }
    // Short names resolve from the proxy's namespace.
    let domains = &vhost(
        route_config(&resources, "9080"),
        &format!("{}:9080", host("reviews")),
    )
    .domains;
    assert!(
        domains.contains(&"reviews".to_string()) && domains.contains(&"reviews.shop".to_string()),
        "{domains:?}"
    );
    // `reviews:9080` is the same virtual host.
    assert!(route_config(&resources, "9080").ignore_port_in_host_matching);
    // The clusters name their service for the proxy's metrics.
    assert_eq!(
        istio_services(cluster(&resources, &v1)),
        [(host("reviews"), "reviews".to_string(), "shop".to_string())]
    );
}

/// The `istio` metadata's services of a cluster: (host, name, namespace).
fn istio_services(cluster: &Cluster) -> Vec<(String, String, String)> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(Kind::ListValue(list)) = cluster.metadata.as_ref().unwrap().filter_metadata["istio"]
        .fields["services"]
        .kind
        .clone()
    else {
        panic!("a list of services: {cluster:?}");
    };
    list.values
        .iter()
        .map(|v| {
            let Some(Kind::StructValue(service)) = &v.kind else {
                panic!("a service: {v:?}");
            };
            let field = |k: &str| match &service.fields[k].kind {
                Some(Kind::StringValue(s)) => s.clone(),
                other => panic!("{k}: {other:?}"),
            };
            (field("host"), field("name"), field("namespace"))
        })
        .collect()
}

#[test]
fn uri_prefix_routing_with_rewrite_and_headers() {
    let snapshot = snapshot(&["uri-prefix"]);
    let resources = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    // bookinfo.example.com names no service: it is routed on port 80.
    let routes = &vhost(route_config(&resources, "80"), "bookinfo.example.com:80").routes;
    assert_eq!(routes.len(), 3);
    let first = routes[0].r#match.as_ref().unwrap();
    assert_eq!(
        first.path_specifier,
        Some(route_match::PathSpecifier::Prefix("/ratings/v2/".into()))
    );
    let user = first
        .headers
        .iter()
        .find(|h| h.name == "end-user")
        .expect("the end-user header");
    assert!(matches!(&user.header_match_specifier,
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)) if m.match_pattern == Some(string_matcher::MatchPattern::Exact("jason".into()))));
    assert_eq!(action(&routes[0]).prefix_rewrite, "/ratings/");
    assert_eq!(
        single_cluster(&routes[0]),
        format!("outbound|9080||{}", host("ratings"))
    );
    assert_eq!(
        routes[0].response_headers_to_add[0]
            .header
            .as_ref()
            .unwrap()
            .key,
        "x-served-by"
    );
    assert_eq!(routes[0].response_headers_to_remove, ["x-internal"]);
    let second = routes[1].r#match.as_ref().unwrap();
    assert_eq!(
        second.path_specifier,
        Some(route_match::PathSpecifier::Prefix("/ratings".into()))
    );
    assert!(second.headers.iter().any(|h| h.name == ":method"));
    assert_eq!(
        routes[2].r#match.as_ref().unwrap().path_specifier,
        Some(route_match::PathSpecifier::Prefix("/".into()))
    );
    assert_eq!(
        single_cluster(&routes[2]),
        format!("outbound|9080||{}", host("productpage"))
    );
    // The port-80 listener routes by that configuration.
    let hcm: HttpConnectionManager =
        typed(&listener(&resources, "0.0.0.0_80").filter_chains[0].filters[0].config_type);
    assert!(
        matches!(hcm.route_specifier, Some(http_connection_manager::RouteSpecifier::Rds(ref r)) if r.route_config_name == "80")
    );
}

#[test]
fn retries_and_timeouts() {
    let snapshot = snapshot(&["retries-timeouts"]);
    let resources = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    let route = &vhost(
        route_config(&resources, "9080"),
        &format!("{}:9080", host("ratings")),
    )
    .routes[0];
    let action = action(route);
    assert_eq!(action.timeout.as_ref().unwrap().seconds, 10);
    let retry = action.retry_policy.as_ref().unwrap();
    assert_eq!(
        retry.retry_on,
        "gateway-error,connect-failure,refused-stream"
    );
    assert_eq!(retry.num_retries.as_ref().unwrap().value, 3);
    assert_eq!(retry.per_try_timeout.as_ref().unwrap().seconds, 2);
    // A service without a VirtualService: Istio's default retries, no timeout.
    let plain = &vhost(
        route_config(&resources, "9080"),
        &format!("{}:9080", host("details")),
    )
    .routes[0];
    let plain = self::action(plain);
    assert_eq!(plain.timeout.as_ref().unwrap().seconds, 0);
    assert_eq!(
        plain
            .retry_policy
            .as_ref()
            .unwrap()
            .num_retries
            .as_ref()
            .unwrap()
            .value,
        2
    );
}

#[test]
fn a_fault_delay_on_25_percent() {
    let snapshot = snapshot(&["fault-delay"]);
    let resources = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    let route = &vhost(
        route_config(&resources, "9080"),
        &format!("{}:9080", host("details")),
    )
    .routes[0];
    let any = route
        .typed_per_filter_config
        .get("envoy.filters.http.fault")
        .expect("a fault");
    let fault = HttpFault::decode(any.value.as_slice()).unwrap();
    let delay = fault.delay.unwrap();
    assert_eq!(
        delay.percentage.unwrap().numerator,
        250_000,
        "25 % of a million"
    );
    assert!(
        matches!(delay.fault_delay_secifier, Some(fault_delay::FaultDelaySecifier::FixedDelay(d)) if d.seconds == 5)
    );
    let abort = fault.abort.unwrap();
    assert_eq!(abort.percentage.unwrap().numerator, 100_000);
    assert_eq!(
        abort.error_type,
        Some(fault_abort::ErrorType::HttpStatus(500))
    );
    // The listener runs the fault filter before the router.
    let hcm: HttpConnectionManager =
        typed(&listener(&resources, "0.0.0.0_9080").filter_chains[0].filters[0].config_type);
    let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["envoy.filters.http.fault", "envoy.filters.http.router"]
    );
}

#[test]
fn connection_pool_and_outlier_detection() {
    let snapshot = snapshot(&["circuit-breaker"]);
    let resources = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    let httpbin = cluster(&resources, &format!("outbound|8000||{}", host("httpbin")));
    let limits = &httpbin.circuit_breakers.as_ref().unwrap().thresholds[0];
    assert_eq!(limits.max_connections.unwrap().value, 1);
    assert_eq!(limits.max_pending_requests.unwrap().value, 1);
    assert_eq!(limits.max_requests.unwrap().value, 10);
    assert_eq!(limits.max_retries.unwrap().value, 2);
    assert_eq!(httpbin.connect_timeout.as_ref().unwrap().nanos, 30_000_000);
    assert_eq!(httpbin.lb_policy, cluster::LbPolicy::LeastRequest as i32);
    let outlier = httpbin.outlier_detection.as_ref().unwrap();
    assert_eq!(outlier.consecutive_5xx.unwrap().value, 1);
    assert_eq!(outlier.consecutive_gateway_failure.unwrap().value, 1);
    assert_eq!(outlier.base_ejection_time.as_ref().unwrap().seconds, 180);
    assert_eq!(outlier.max_ejection_percent.unwrap().value, 100);
    // ISTIO_MUTUAL: mesh mTLS always; maxRequestsPerConnection: 1.
    assert!(httpbin.transport_socket.is_some());
    assert!(
        httpbin
            .typed_extension_protocol_options
            .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    );
    // Without a tls setting, auto-mTLS: mesh TLS only to sidecar endpoints.
    let reviews = cluster(&resources, &format!("outbound|9080||{}", host("reviews")));
    assert!(reviews.transport_socket.is_none());
    assert_eq!(reviews.transport_socket_matches.len(), 1);
    // ... accepting only the identities the service's workloads run as.
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        tls,
    )) = &reviews.transport_socket_matches[0]
        .transport_socket
        .as_ref()
        .unwrap()
        .config_type
    else {
        panic!("TLS")
    };
    let tls =
        envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext::decode(
            tls.value.as_slice(),
        )
        .unwrap();
    let validation = format!(
        "{:?}",
        tls.common_tls_context.unwrap().validation_context_type
    );
    assert!(
        validation.contains("spiffe://cluster.local/ns/shop/sa/reviews")
            && validation.contains("ROOTCA"),
        "{validation}"
    );
}

/// A Gateway server's port is the gateway Service's: the listener binds
/// the targetPort the Service maps it to, routes keep the server's port.
#[test]
fn gateway_listeners_bind_the_services_target_ports() {
    let mut snapshot = snapshot(&["gateway-api"]);
    let mut service = http_service("istio-ingressgateway", &[80, 443]);
    service.namespace = "istio-system".into();
    service.hostname = "istio-ingressgateway.istio-system.svc.cluster.local".into();
    let mut services = (*snapshot.services).clone();
    services.insert(service.hostname.clone(), service.clone());
    snapshot.services = Arc::new(services);
    let mut endpoints = (*snapshot.endpoints).clone();
    let target = |service_port, port| Endpoint {
        service_port,
        port,
        ..endpoint(
            "10.244.0.30",
            port,
            &[("istio", "ingressgateway"), ("app", "istio-ingressgateway")],
        )
    };
    endpoints.insert(service.hostname, vec![target(80, 8080), target(443, 8443)]);
    snapshot.endpoints = Arc::new(endpoints);
    let gateway = Proxy {
        id: "router~10.244.0.30~ingress-1.istio-system~istio-system.svc.cluster.local".into(),
        kind: ProxyKind::Gateway,
        namespace: "istio-system".into(),
        labels: BTreeMap::from([
            ("istio".to_string(), "ingressgateway".to_string()),
            ("app".to_string(), "istio-ingressgateway".to_string()),
        ]),
        ip: "10.244.0.30".into(),
        captured: false,
    };
    let (listeners, routes) = translate::gateway::gateway(&snapshot, &gateway);
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["0.0.0.0_8080", "0.0.0.0_8443"]);
    assert!(routes.iter().any(|r| r.name == "http.80"));
    // A new replica, not among the endpoints yet: as its fellows.
    let new = Proxy {
        ip: "10.244.0.31".into(),
        ..gateway.clone()
    };
    let (listeners, _) = translate::gateway::gateway(&snapshot, &new);
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["0.0.0.0_8080", "0.0.0.0_8443"]);
    // Another gateway, not behind the Service: the server's own port.
    let other = Proxy {
        ip: "10.244.0.32".into(),
        labels: BTreeMap::from([
            ("istio".to_string(), "ingressgateway".to_string()),
            ("app".to_string(), "another-gateway".to_string()),
        ]),
        ..gateway
    };
    let (listeners, _) = translate::gateway::gateway(&snapshot, &other);
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["0.0.0.0_80", "0.0.0.0_443"]);
}

#[test]
fn a_gateway_for_api_myapp_com() {
    let snapshot = snapshot(&["gateway-api"]);
    let gateway = ingress_gateway();
    let (listeners, routes) = translate::gateway::gateway(&snapshot, &gateway);
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["0.0.0.0_80", "0.0.0.0_443"]);
    let config = |name: &str| {
        routes
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    // Port 80 redirects to HTTPS (httpsRedirect).
    let http = vhost(config("http.80"), "api.myapp.com:80");
    assert_eq!(
        http.require_tls,
        virtual_host::TlsRequirementType::All as i32
    );
    // Port 443: TLS with the Secret over SDS, /v1 to the stable subset.
    let chain = &listeners[1].filter_chains[0];
    assert_eq!(
        chain.filter_chain_match.as_ref().unwrap().server_names,
        ["api.myapp.com"]
    );
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        tls,
    )) = &chain.transport_socket.as_ref().unwrap().config_type
    else {
        panic!("TLS")
    };
    let tls = DownstreamTlsContext::decode(tls.value.as_slice()).unwrap();
    assert_eq!(
        tls.common_tls_context
            .unwrap()
            .tls_certificate_sds_secret_configs[0]
            .name,
        "kubernetes://api-myapp-com-cert"
    );
    let https = vhost(
        config("https.443.https-1.api-gateway.shop"),
        "api.myapp.com:443",
    );
    let route = &https.routes[0];
    assert_eq!(
        route.r#match.as_ref().unwrap().path_specifier,
        Some(route_match::PathSpecifier::Prefix("/v1".into()))
    );
    assert_eq!(
        single_cluster(route),
        format!("outbound|8080|stable|{}", host("api-service"))
    );
    // The stable subset's endpoints, for the gateway too.
    let shared = translate::Scope::new(&snapshot, &gateway.namespace, &gateway.labels);
    let stable = shared
        .endpoints()
        .into_iter()
        .find(|e| e.cluster_name == format!("outbound|8080|stable|{}", host("api-service")))
        .unwrap();
    assert_eq!(addresses(&stable), ["10.244.0.3:8080"]);
    // Sidecars do not get gateway-bound routes.
    let resources = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    assert!(resources.routes.iter().all(|r| {
        r.virtual_hosts
            .iter()
            .all(|v| !v.name.starts_with("api.myapp.com"))
    }));
}

#[test]
fn a_mesh_external_service_entry() {
    let snapshot = snapshot(&["service-entry"]);
    let resources = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    // DNS: Envoy resolves api.example.com itself; no mesh mTLS outside.
    let api = cluster(&resources, "outbound|443||api.example.com");
    assert_eq!(
        api.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::StrictDns as i32
        ))
    );
    assert_eq!(
        addresses(api.load_assignment.as_ref().unwrap()),
        ["api.example.com:443"]
    );
    assert!(api.transport_socket_matches.is_empty() && api.transport_socket.is_none());
    // TLS to it is told apart by SNI on 0.0.0.0_443.
    let tls = listener(&resources, "0.0.0.0_443");
    let chain = &tls.filter_chains[0];
    assert_eq!(
        chain.filter_chain_match.as_ref().unwrap().server_names,
        ["api.example.com"]
    );
    let proxy: TcpProxy = typed(&chain.filters[0].config_type);
    assert_eq!(
        proxy.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster(
            "outbound|443||api.example.com".into()
        ))
    );
    // STATIC, MESH_INTERNAL: its address gets a TCP listener, its endpoint EDS.
    let db: TcpProxy =
        typed(&listener(&resources, "192.0.2.10_5432").filter_chains[0].filters[0].config_type);
    assert_eq!(
        db.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster(
            "outbound|5432||db.legacy.internal".into()
        ))
    );
    let assignment = resources
        .endpoints
        .iter()
        .find(|e| e.cluster_name == "outbound|5432||db.legacy.internal")
        .unwrap();
    assert_eq!(addresses(assignment), ["192.0.2.10:5432"]);
}

#[test]
fn peer_authentication_strict_with_a_permissive_port() {
    let snapshot = snapshot(&["mtls-strict"]);
    let resources = translate::sidecar(&snapshot, &sidecar("payments", "10.244.0.20"));
    let inbound = listener(&resources, "virtualInbound");
    let chains: Vec<&str> = inbound
        .filter_chains
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    // 8080 takes mTLS only; 9090 (PERMISSIVE at port level) both.
    assert_eq!(
        chains,
        [
            "inbound|8080|||tls",
            "inbound|9090|||tls",
            "inbound|9090|||plaintext",
            "inbound-passthrough",
        ]
    );
    let strict = &inbound.filter_chains[0];
    assert_eq!(
        strict
            .filter_chain_match
            .as_ref()
            .unwrap()
            .transport_protocol,
        "tls"
    );
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        tls,
    )) = &strict.transport_socket.as_ref().unwrap().config_type
    else {
        panic!("TLS")
    };
    let tls = DownstreamTlsContext::decode(tls.value.as_slice()).unwrap();
    assert!(tls.require_client_certificate.unwrap().value);
    // The inbound cluster names the service the port serves.
    assert_eq!(
        istio_services(cluster(&resources, "inbound|8080||")),
        [(host("payments"), "payments".to_string(), "shop".to_string())]
    );
    // Another workload in the namespace: STRICT everywhere.
    assert_eq!(
        translate::mtls_mode(&snapshot, &sidecar("reviews", "10.244.0.1"), 9080),
        bowline_api::security::MtlsMode::Strict
    );
}

#[test]
fn an_authorization_policy_allowing_one_principal() {
    let snapshot = snapshot(&["authorization"]);
    let resources = translate::sidecar(&snapshot, &sidecar("payments", "10.244.0.20"));
    let inbound = listener(&resources, "virtualInbound");
    let hcm: HttpConnectionManager = typed(&inbound.filter_chains[0].filters[0].config_type);
    let rbac: Vec<Rbac> = hcm
        .http_filters
        .iter()
        .filter(|f| f.name == "envoy.filters.http.rbac")
        .map(|f| match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(any)) => {
                Rbac::decode(any.value.as_slice()).unwrap()
            }
            _ => panic!("typed"),
        })
        .collect();
    // DENY before ALLOW.
    let actions: Vec<i32> = rbac
        .iter()
        .map(|r| r.rules.as_ref().unwrap().action)
        .collect();
    assert_eq!(
        actions,
        [rbac::Action::Deny as i32, rbac::Action::Allow as i32]
    );
    let allow = rbac[1].rules.as_ref().unwrap();
    let policy = allow.policies.values().next().unwrap();
    let principal = format!("{:?}", policy.principals);
    assert!(
        principal.contains("spiffe://cluster.local/ns/shop/sa/billing"),
        "{principal}"
    );
    let permissions = format!("{:?}", policy.permissions);
    assert!(
        permissions.contains("POST") && permissions.contains("/charge"),
        "{permissions}"
    );
    let deny = rbac[0]
        .rules
        .as_ref()
        .unwrap()
        .policies
        .values()
        .next()
        .unwrap();
    assert!(
        matches!(&deny.principals[0].identifier, Some(principal::Identifier::DirectRemoteIp(c)) if c.address_prefix == "203.0.113.0")
    );
    // A workload the policy does not select gets the DENY only.
    let other = translate::sidecar(&snapshot, &sidecar("reviews", "10.244.0.1"));
    let hcm: HttpConnectionManager =
        typed(&listener(&other, "virtualInbound").filter_chains[0].filters[0].config_type);
    assert_eq!(
        hcm.http_filters
            .iter()
            .filter(|f| f.name == "envoy.filters.http.rbac")
            .count(),
        1
    );
}

#[test]
fn the_mesh_access_log_reaches_every_connection_manager_and_tcp_proxy() {
    use bowline_controlplane::model::{AccessLogSettings, Mesh};
    let mut snapshot = snapshot(&["reviews-90-10", "service-entry"]);
    let quiet = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    snapshot.mesh = Arc::new(Mesh {
        access_log: Some(AccessLogSettings {
            path: "/dev/stdout".into(),
            json: true,
        }),
        ..Mesh::default()
    });
    let logged = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    // (HTTP connection managers, TCP proxies) and their access logs.
    let count = |resources: &Resources| {
        let mut found = (0, 0, 0);
        for listener in &resources.listeners {
            let chains = listener
                .filter_chains
                .iter()
                .chain(listener.default_filter_chain.as_ref());
            for filter in chains.flat_map(|c| &c.filters) {
                let Some(filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
                    continue;
                };
                if any.type_url.ends_with(".HttpConnectionManager") {
                    found.0 += 1;
                    found.2 += typed::<HttpConnectionManager>(&filter.config_type)
                        .access_log
                        .len();
                } else if any.type_url.ends_with(".TcpProxy") {
                    found.1 += 1;
                    found.2 += typed::<TcpProxy>(&filter.config_type).access_log.len();
                }
            }
        }
        found
    };
    let (http, tcp, logs) = count(&quiet);
    assert!(http > 0 && tcp > 0, "{http} managers, {tcp} TCP proxies");
    assert_eq!(logs, 0, "no access log unless the mesh asks");
    // Each once: the outbound, own (virtualInbound/virtualOutbound) and
    // bound listeners alike.
    assert_eq!(count(&logged), (http, tcp, http + tcp));
}

#[test]
fn the_mesh_tracing_reaches_every_connection_manager_and_names_its_spans() {
    use bowline_controlplane::model::{Mesh, TracingSettings};
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, tracing::http};
    let mut snapshot = snapshot(&["reviews-90-10", "service-entry"]);
    let managers = |resources: &Resources| -> Vec<HttpConnectionManager> {
        resources
            .listeners
            .iter()
            .flat_map(|l| {
                l.filter_chains
                    .iter()
                    .chain(l.default_filter_chain.as_ref())
            })
            .flat_map(|c| &c.filters)
            .filter(|f| {
                matches!(&f.config_type, Some(filter::ConfigType::TypedConfig(any))
                    if any.type_url.ends_with(".HttpConnectionManager"))
            })
            .map(|f| typed::<HttpConnectionManager>(&f.config_type))
            .collect()
    };
    let quiet = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    assert!(managers(&quiet).iter().all(|m| m.tracing.is_none()));

    snapshot.mesh = Arc::new(Mesh {
        tracing: Some(TracingSettings {
            host: "jaeger-collector.istio-system.svc.cluster.local".into(),
            port: 4317,
            sampling: 25.0,
        }),
        ..Mesh::default()
    });
    let traced = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    let managers = managers(&traced);
    assert!(!managers.is_empty());
    for manager in &managers {
        let tracing = manager.tracing.as_ref().expect("every manager traces");
        assert_eq!(tracing.random_sampling.as_ref().unwrap().value, 25.0);
        assert_eq!(tracing.client_sampling.as_ref().unwrap().value, 100.0);
        let provider = tracing.provider.as_ref().unwrap();
        assert_eq!(provider.name, "envoy.tracers.opentelemetry");
        let Some(http::ConfigType::TypedConfig(any)) = &provider.config_type else {
            panic!("no typed config");
        };
        let config = OpenTelemetryConfig::decode(any.value.as_slice()).unwrap();
        let Some(TargetSpecifier::EnvoyGrpc(target)) =
            config.grpc_service.unwrap().target_specifier
        else {
            panic!("not envoy_grpc");
        };
        assert_eq!(
            target.cluster_name,
            "outbound|4317||jaeger-collector.istio-system.svc.cluster.local"
        );
        assert_eq!(
            target.authority,
            "jaeger-collector.istio-system.svc.cluster.local"
        );
    }

    // Spans are named as Istio names them: the destination's host:port
    // and `/*`, outbound and inbound alike.
    let routes = traced
        .routes
        .iter()
        .find(|r| r.name == "9080")
        .expect("route configuration 9080");
    let reviews = routes
        .virtual_hosts
        .iter()
        .find(|v| v.name.starts_with("reviews."))
        .expect("the reviews virtual host");
    let operation = &reviews.routes[0].decorator.as_ref().unwrap().operation;
    assert!(
        operation.starts_with("reviews.") && operation.ends_with(":9080/*"),
        "{operation}"
    );
    let reviews_pod = translate::sidecar(&snapshot, &sidecar("reviews", "10.244.0.1"));
    let inbound: HttpConnectionManager = typed(
        &listener(&reviews_pod, "virtualInbound")
            .filter_chains
            .iter()
            .flat_map(|c| &c.filters)
            .find(|f| {
                matches!(&f.config_type, Some(filter::ConfigType::TypedConfig(any))
                    if any.type_url.ends_with(".HttpConnectionManager"))
            })
            .unwrap()
            .config_type,
    );
    let Some(http_connection_manager::RouteSpecifier::RouteConfig(config)) =
        inbound.route_specifier
    else {
        panic!("inbound routes are inline");
    };
    let operation = &config.virtual_hosts[0].routes[0]
        .decorator
        .as_ref()
        .expect("an inbound decorator")
        .operation;
    assert!(
        operation.starts_with("reviews.") && operation.ends_with("/*"),
        "{operation}"
    );
}

#[test]
fn a_port_of_unknown_protocol_is_sniffed_http_routed_and_tcp_otherwise() {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
        HttpProtocolOptions, http_protocol_options,
    };
    let mut snapshot = snapshot(&[]);
    add_legacy(&mut snapshot, &[("tcp-less", 7070, Protocol::Unknown)]);
    let resources = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    let cluster_name = format!("outbound|7070||{}", host("legacy"));

    let sniffing = listener(&resources, "10.96.0.70_7070");
    assert_eq!(
        sniffing.listener_filters[0].name,
        "envoy.filters.listener.http_inspector"
    );
    assert!(sniffing.continue_on_listener_filters_timeout);
    let [http, tcp] = &sniffing.filter_chains[..] else {
        panic!("an HTTP and a TCP chain: {:?}", sniffing.filter_chains);
    };
    assert_eq!(
        http.filter_chain_match
            .as_ref()
            .unwrap()
            .application_protocols,
        ["http/1.1", "http/1.0", "h2c"]
    );
    assert_eq!(rds_name(http), "7070");
    assert!(tcp.filter_chain_match.is_none());
    assert_eq!(tcp_cluster(tcp), cluster_name);
    // No wildcard listener takes every connection to 7070 as HTTP.
    assert!(!resources.listeners.iter().any(|l| l.name == "0.0.0.0_7070"));

    let routes = resources
        .routes
        .iter()
        .find(|r| r.name == "7070")
        .expect("route configuration 7070");
    assert!(
        routes.virtual_hosts[0].domains.contains(&host("legacy")),
        "{:?}",
        routes.virtual_hosts
    );
    // The endpoints hear the protocol the client spoke.
    let cluster = resources
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .expect("the cluster");
    let options = HttpProtocolOptions::decode(
        cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            .value
            .as_slice(),
    )
    .unwrap();
    assert!(matches!(
        options.upstream_protocol_options,
        Some(http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(_))
    ));
}

#[test]
fn bound_egress_listeners_carry_their_ports_protocol() {
    let mut snapshot = snapshot(&[]);
    add_legacy(
        &mut snapshot,
        &[
            ("tcp-db", 7070, Protocol::Tcp),
            ("other", 7071, Protocol::Unknown),
        ],
    );
    let bind = |number: u32, protocol: Option<&str>| {
        serde_json::json!({
            "port": {"number": number, "protocol": protocol, "name": format!("p{number}")},
            "bind": "127.0.0.1", "captureMode": "NONE", "hosts": ["./*"],
        })
    };
    let spec = serde_json::json!({"egress": [
        bind(9080, Some("HTTP")),
        bind(7070, Some("TCP")),
        bind(7071, None),
        // No service has this port: nothing to bind.
        bind(5432, Some("TCP")),
        {"hosts": ["./*"]},
    ]});
    snapshot.sidecars = Arc::new(vec![Config::new(
        "bound",
        NS,
        serde_json::from_value::<SidecarSpec>(spec).expect("a Sidecar"),
    )]);
    let resources = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));

    // HTTP: routed by the port's route configuration.
    let http = listener(&resources, "127.0.0.1_9080");
    assert_eq!(rds_name(&http.filter_chains[0]), "9080");

    // TCP: every connection to the service with that port, and no HTTP
    // listener anywhere for the port.
    let tcp = listener(&resources, "127.0.0.1_7070");
    let [chain] = &tcp.filter_chains[..] else {
        panic!("one chain: {:?}", tcp.filter_chains);
    };
    assert_eq!(
        tcp_cluster(chain),
        format!("outbound|7070||{}", host("legacy"))
    );
    assert!(!resources.listeners.iter().any(|l| l.name == "0.0.0.0_7070"));
    assert!(!resources.routes.iter().any(|r| r.name == "7070"));

    // Undeclared: HTTP by its first bytes, the rest to the service.
    let sniffed = listener(&resources, "127.0.0.1_7071");
    assert_eq!(
        sniffed.listener_filters[0].name,
        "envoy.filters.listener.http_inspector"
    );
    let [http, rest] = &sniffed.filter_chains[..] else {
        panic!("an HTTP and a TCP chain: {:?}", sniffed.filter_chains);
    };
    assert_eq!(rds_name(http), "7071");
    assert!(resources.routes.iter().any(|r| r.name == "7071"));
    assert_eq!(
        tcp_cluster(rest),
        format!("outbound|7071||{}", host("legacy"))
    );

    assert!(
        !resources
            .listeners
            .iter()
            .any(|l| l.name == "127.0.0.1_5432")
    );
}

/// A DestinationRule hashing by `useSourceIp` — at one port, or for one
/// subset — gives the tcp_proxy filters to just those clusters a source
/// IP hash policy, in a sidecar's listeners and a gateway's TLS
/// passthrough alike.
#[test]
fn tcp_to_a_rule_hashing_by_source_ip_is_hashed_so() {
    use serde_json::json;
    let mut snapshot = snapshot(&[]);
    add_legacy(
        &mut snapshot,
        &[
            ("tcp-db", 5432, Protocol::Tcp),
            ("tls", 8443, Protocol::Tls),
        ],
    );
    fn config<T: serde::de::DeserializeOwned>(name: &str, spec: Value) -> Config<T> {
        Config::new(name, NS, serde_json::from_value(spec).expect("a spec"))
    }
    let by_source_ip = json!({"consistentHash": {"useSourceIp": true}});
    snapshot.destination_rules = Arc::new(vec![config(
        "legacy",
        json!({"host": "legacy",
            "trafficPolicy": {"portLevelSettings": [
                {"port": {"number": 5432}, "loadBalancer": by_source_ip}]},
            "subsets": [{"name": "sticky", "labels": {"version": "v1"},
                "trafficPolicy": {"loadBalancer": by_source_ip}}]}),
    )]);
    snapshot.gateways = Arc::new(vec![config(
        "tls-in",
        json!({"selector": {"istio": "ingressgateway"}, "servers": [{
            "port": {"number": 443, "name": "tls", "protocol": "TLS"},
            "hosts": ["*"], "tls": {"mode": "PASSTHROUGH"}}]}),
    )]);
    let to = |sni: &str, subset: Option<&str>| {
        json!({"match": [{"sniHosts": [sni]}], "route": [{"destination":
            {"host": "legacy", "subset": subset, "port": {"number": 8443}}}]})
    };
    snapshot.virtual_services = Arc::new(vec![config(
        "legacy-tls",
        json!({"hosts": ["*.example.com"], "gateways": ["tls-in"], "tls": [
            to("sticky.example.com", Some("sticky")), to("plain.example.com", None)]}),
    )]);
    let hashed = |chain: &FilterChain| {
        let proxy: TcpProxy = typed(&chain.filters.last().expect("a filter").config_type);
        !proxy.hash_policy.is_empty()
    };

    let resources = translate::sidecar(&snapshot, &sidecar("productpage", "10.244.0.10"));
    let db = listener(&resources, "10.96.0.70_5432");
    assert_eq!(
        tcp_cluster(&db.filter_chains[0]),
        format!("outbound|5432||{}", host("legacy"))
    );
    assert!(hashed(&db.filter_chains[0]), "the port's policy hashes");
    let tls = listener(&resources, "10.96.0.70_8443");
    assert!(!hashed(&tls.filter_chains[0]), "no policy at 8443");

    let gateway = ingress_gateway();
    let (listeners, _) = translate::gateway::gateway(&snapshot, &gateway);
    let chains = &listeners
        .iter()
        .find(|l| l.name == "0.0.0.0_443")
        .expect("the passthrough listener")
        .filter_chains;
    let chain = |sni: &str| {
        chains
            .iter()
            .find(|c| {
                c.filter_chain_match
                    .as_ref()
                    .is_some_and(|m| m.server_names == [sni])
            })
            .unwrap_or_else(|| panic!("a chain for {sni}: {chains:?}"))
    };
    assert!(
        hashed(chain("sticky.example.com")),
        "the subset's policy hashes"
    );
    assert!(
        !hashed(chain("plain.example.com")),
        "the rule's own does not"
    );
}
