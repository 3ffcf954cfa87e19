//! HTTP routes: a VirtualService's `http` rules as Envoy routes, and the
//! route configurations that hold them — one per outbound port for a
//! sidecar (named by the port, as Istio names them), one per server port
//! for a gateway (`http.<port>`).
//!
//! A service without a VirtualService gets one default route to its
//! cluster, with Istio's default retries and no timeout.

use std::collections::HashMap;

use bowline_api::networking::{
    ConsistentHashLb, Destination, DestinationRuleSpec, HeaderOperations, Headers,
    HttpFaultInjection, HttpMatchRequest, HttpRedirect, HttpRetry, HttpRoute, HttpRouteDestination,
    Percent, StringMatch, VirtualServiceSpec,
};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, HeaderValue, HeaderValueOption, RuntimeFractionalPercent, data_source,
    header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::config::route::v3::{
    Decorator, DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction,
    RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
    header_matcher, query_parameter_matcher, redirect_action, retry_policy, route, route_action,
    route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    FaultAbort, HttpFault, fault_abort,
};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use envoy_types::util::pack_any;

use super::{clusters::cluster_name, duration};
use crate::model::{
    Config, HostIndex, Protocol, Service, Snapshot, host_matches, oldest, resolve_host, selects,
};
use bowline_api::duration::parse as parse_duration;

/// The fault filter's name, under which routes carry their faults.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// Istio's retry conditions when a route says nothing of retries.
const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
const DEFAULT_ATTEMPTS: u32 = 2;
/// The virtual host that takes what no service claims.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

/// Where a route configuration is used: which gateway (`mesh` for
/// sidecars, `<namespace>/<name>` for a Gateway) on which port, for which
/// proxy. VirtualServices and their matches apply only where they say.
#[derive(Clone, Debug)]
pub struct RouteContext<'a> {
    pub snapshot: &'a Snapshot,
    /// The VirtualServices bound here, by host, when the caller built the
    /// index (else the snapshot's are searched).
    pub virtual_services: Option<&'a HostIndex<'a, VirtualServiceSpec>>,
    /// The DestinationRules that may apply to the proxy, by host
    /// ([`super::rule_index`]): consistent hashing is a route's too.
    pub rules: &'a HostIndex<'a, DestinationRuleSpec>,
    pub gateways: Vec<String>,
    pub port: u32,
    pub proxy_labels: &'a std::collections::BTreeMap<String, String>,
    pub proxy_namespace: &'a str,
}

/// Where VirtualService hosts without a service are routed.
pub const DEFAULT_HTTP_PORT: u32 = 80;

/// The gateway name sidecars answer to.
pub const MESH_GATEWAY: &str = "mesh";

/// The route configuration a sidecar uses for outbound HTTP on `port`: a
/// virtual host per service that has the port as HTTP (or of unknown
/// protocol, when sniffing finds HTTP), with the VirtualService
/// bound to the mesh for its host when there is one, and a last virtual
/// host for everything else (passed through, or refused with
/// REGISTRY_ONLY).
pub fn outbound_route_configuration(
    ctx: &RouteContext<'_>,
    services: &[&Service],
    name: &str,
    allow_any: bool,
) -> RouteConfiguration {
    let mut virtual_hosts: Vec<VirtualHost> = services
        .iter()
        .filter(|s| {
            s.port(ctx.port)
                .is_some_and(|p| p.protocol.is_http() || p.protocol == Protocol::Unknown)
        })
        .map(|service| {
            let routes = match virtual_service_for(ctx, &service.hostname) {
                Some(vs) => http_routes(ctx, vs),
                None => {
                    // The service's DestinationRule may hash requests.
                    let destination = Destination {
                        host: service.hostname.clone(),
                        port: None,
                        subset: None,
                    };
                    let hash = consistent_hash(ctx, &destination, &service.namespace)
                        .and_then(hash_policy_of);
                    vec![default_route(
                        &cluster_name(ctx.port, "", &service.hostname),
                        hash,
                    )]
                }
            };
            VirtualHost {
                name: format!("{}:{}", service.hostname, ctx.port),
                domains: domains(service, ctx.proxy_namespace),
                routes,
                include_request_attempt_count: true,
                ..Default::default()
            }
        })
        .collect();
    if ctx.port == DEFAULT_HTTP_PORT {
        for (host, vs) in unbacked_hosts(ctx, services) {
            virtual_hosts.push(VirtualHost {
                name: format!("{host}:{}", ctx.port),
                domains: vec![host.clone()],
                routes: http_routes(ctx, vs),
                include_request_attempt_count: true,
                ..Default::default()
            });
        }
    }
    virtual_hosts.push(if allow_any {
        VirtualHost {
            name: "allow_any".into(),
            domains: vec!["*".into()],
            routes: vec![default_route(PASSTHROUGH_CLUSTER, None)],
            ..Default::default()
        }
    } else {
        VirtualHost {
            name: "block_all".into(),
            domains: vec!["*".into()],
            routes: vec![direct_response_route(502, None)],
            ..Default::default()
        }
    });
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        validate_clusters: Some(BoolValue { value: false }),
        // The configuration is per port already: `reviews:9080` and
        // `reviews` are the same virtual host.
        ignore_port_in_host_matching: true,
        ..Default::default()
    }
}

/// Hosts of VirtualServices bound to the mesh that name no service: they
/// are routed on port 80, where plain HTTP to them arrives.
pub fn unbacked_hosts<'s>(
    ctx: &RouteContext<'s>,
    services: &[&Service],
) -> Vec<(String, &'s Config<VirtualServiceSpec>)> {
    let mut hosts: Vec<(String, &'s Config<VirtualServiceSpec>)> = Vec::new();
    let mut bound: Vec<&'s Config<VirtualServiceSpec>> = ctx
        .snapshot
        .virtual_services
        .iter()
        .filter(|vs| bound_to(vs, &ctx.gateways))
        .collect();
    bound.sort_by_key(|vs| (vs.created, vs.namespace.clone(), vs.name.clone()));
    for vs in bound {
        for host in &vs.spec.hosts {
            let host = resolve_host(host, &vs.namespace);
            if host.contains('*')
                || services.iter().any(|s| s.hostname == host)
                || hosts.iter().any(|(h, _)| *h == host)
            {
                continue;
            }
            hosts.push((host, vs));
        }
    }
    hosts
}

/// The names a request may use for `service`: its full name, the shorter
/// names that resolve from the proxy's namespace, and its virtual IP (the
/// route configuration ignores ports in Host headers).
fn domains(service: &Service, proxy_namespace: &str) -> Vec<String> {
    let mut names = vec![service.hostname.clone()];
    if let Some(short) = service
        .hostname
        .strip_suffix(&format!(".{}", crate::model::DOMAIN_SUFFIX))
    {
        names.push(format!("{short}.svc"));
        names.push(short.to_string());
        if service.namespace == proxy_namespace
            && let Some(name) = short.strip_suffix(&format!(".{proxy_namespace}"))
        {
            names.push(name.to_string());
        }
    }
    names.extend(service.address.clone());
    names
}

/// The oldest VirtualService that applies in `ctx` and names `host`.
pub fn virtual_service_for<'s>(
    ctx: &RouteContext<'s>,
    host: &str,
) -> Option<&'s Config<VirtualServiceSpec>> {
    if let Some(index) = ctx.virtual_services {
        return oldest(index.find(host));
    }
    oldest(
        ctx.snapshot
            .virtual_services
            .iter()
            .filter(|vs| bound_to(vs, &ctx.gateways))
            .filter(|vs| {
                vs.spec
                    .hosts
                    .iter()
                    .any(|h| host_matches(&resolve_host(h, &vs.namespace), host))
            }),
    )
}

/// Whether `vs` applies to any of `gateways` (`mesh` when it names none).
pub fn bound_to(vs: &Config<VirtualServiceSpec>, gateways: &[String]) -> bool {
    if vs.spec.gateways.is_empty() {
        return gateways.iter().any(|g| g == MESH_GATEWAY);
    }
    vs.spec
        .gateways
        .iter()
        .map(|g| gateway_name(g, &vs.namespace))
        .any(|g| gateways.contains(&g))
}

/// A gateway as config names it, made `<namespace>/<name>` (or `mesh`).
pub fn gateway_name(name: &str, namespace: &str) -> String {
    if name == MESH_GATEWAY || name.contains('/') {
        name.to_string()
    } else {
        format!("{namespace}/{}", name.split('.').next().unwrap_or(name))
    }
}

/// The routes of `vs` that apply in `ctx`, in order: one Envoy route per
/// match of each rule (a rule without matches matches everything).
pub fn http_routes(ctx: &RouteContext<'_>, vs: &Config<VirtualServiceSpec>) -> Vec<Route> {
    let mut routes = Vec::new();
    for rule in &vs.spec.http {
        let matches: Vec<Option<&HttpMatchRequest>> = if rule.match_.is_empty() {
            vec![None]
        } else {
            rule.match_
                .iter()
                .filter(|m| applies(ctx, m, &vs.namespace))
                .map(Some)
                .collect()
        };
        for m in matches {
            routes.push(http_route(ctx, vs, rule, m));
        }
        // A rule matching everything hides the rules after it.
        if rule.match_.is_empty() {
            break;
        }
    }
    routes
}

/// Whether a match's port, source labels, source namespace and gateways
/// allow it here; what the request carries is matched by Envoy.
fn applies(ctx: &RouteContext<'_>, m: &HttpMatchRequest, namespace: &str) -> bool {
    m.port.is_none_or(|p| p == ctx.port)
        && selects(&m.source_labels, ctx.proxy_labels)
        && m.source_namespace
            .as_deref()
            .is_none_or(|ns| ns == ctx.proxy_namespace)
        && (m.gateways.is_empty()
            || m.gateways
                .iter()
                .any(|g| ctx.gateways.contains(&gateway_name(g, namespace))))
}

fn http_route(
    ctx: &RouteContext<'_>,
    vs: &Config<VirtualServiceSpec>,
    rule: &HttpRoute,
    m: Option<&HttpMatchRequest>,
) -> Route {
    let action = if let Some(redirect) = &rule.redirect {
        route::Action::Redirect(redirect_action(redirect))
    } else if let Some(direct) = &rule.direct_response {
        let body = direct.body.as_ref().and_then(|b| b.string.clone());
        return Route {
            name: route_name(vs, rule),
            r#match: Some(route_match(m)),
            ..direct_response_route(direct.status, body)
        };
    } else {
        route::Action::Route(route_action(ctx, vs, rule, m))
    };
    let mut typed_per_filter_config = HashMap::new();
    if let Some(fault) = &rule.fault {
        typed_per_filter_config.insert(FAULT_FILTER.to_string(), pack_any(http_fault(fault)));
    }
    let (
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
    ) = header_operations(rule.headers.as_ref());
    let decorator = match &action {
        route::Action::Route(action) => {
            let exact = m.and_then(|m| m.uri.as_ref()?.exact.as_deref());
            decorator(action, exact)
        }
        _ => None,
    };
    Route {
        name: route_name(vs, rule),
        r#match: Some(route_match(m)),
        action: Some(action),
        decorator,
        typed_per_filter_config,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        ..Default::default()
    }
}

/// The rule's name when it has one, else the VirtualService's key.
fn route_name(vs: &Config<VirtualServiceSpec>, rule: &HttpRoute) -> String {
    rule.name
        .clone()
        .unwrap_or_else(|| format!("{}.{}", vs.name, vs.namespace))
}

/// A request's path, headers, method, authority, scheme and query, as
/// Envoy matches them.
fn route_match(m: Option<&HttpMatchRequest>) -> RouteMatch {
    let Some(m) = m else {
        return RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        };
    };
    let path_specifier = match m.uri.as_ref() {
        Some(StringMatch { exact: Some(p), .. }) => route_match::PathSpecifier::Path(p.clone()),
        Some(StringMatch {
            prefix: Some(p), ..
        }) => route_match::PathSpecifier::Prefix(p.clone()),
        Some(StringMatch { regex: Some(r), .. }) => route_match::PathSpecifier::SafeRegex(regex(r)),
        _ => route_match::PathSpecifier::Prefix("/".into()),
    };
    let mut headers: Vec<HeaderMatcher> = Vec::new();
    for (name, value) in [
        (":method", m.method.as_ref()),
        (":authority", m.authority.as_ref()),
        (":scheme", m.scheme.as_ref()),
    ] {
        headers.extend(value.map(|v| header_matcher(name, v, false)));
    }
    headers.extend(m.headers.iter().map(|(n, v)| header_matcher(n, v, false)));
    headers.extend(
        m.without_headers
            .iter()
            .map(|(n, v)| header_matcher(n, v, true)),
    );
    RouteMatch {
        path_specifier: Some(path_specifier),
        case_sensitive: m.ignore_uri_case.map(|ignore| BoolValue { value: !ignore }),
        headers,
        query_parameters: m
            .query_params
            .iter()
            .map(|(name, value)| QueryParameterMatcher {
                name: name.clone(),
                query_parameter_match_specifier: Some(
                    query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                        string_matcher(value),
                    ),
                ),
            })
            .collect(),
        ..Default::default()
    }
}

/// A header match; Istio's empty match (`{}`) means "present".
fn header_matcher(name: &str, value: &StringMatch, invert: bool) -> HeaderMatcher {
    let specifier = if value.exact.is_none() && value.prefix.is_none() && value.regex.is_none() {
        header_matcher::HeaderMatchSpecifier::PresentMatch(true)
    } else {
        header_matcher::HeaderMatchSpecifier::StringMatch(string_matcher(value))
    };
    HeaderMatcher {
        name: name.to_string(),
        invert_match: invert,
        header_match_specifier: Some(specifier),
        ..Default::default()
    }
}

fn string_matcher(value: &StringMatch) -> StringMatcher {
    let pattern = if let Some(exact) = &value.exact {
        string_matcher::MatchPattern::Exact(exact.clone())
    } else if let Some(prefix) = &value.prefix {
        string_matcher::MatchPattern::Prefix(prefix.clone())
    } else {
        string_matcher::MatchPattern::SafeRegex(regex(value.regex.as_deref().unwrap_or(".*")))
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

fn regex(pattern: &str) -> RegexMatcher {
    RegexMatcher {
        regex: pattern.to_string(),
        ..Default::default()
    }
}

/// Where a rule sends its requests: one cluster or weighted clusters,
/// with its timeout, retries, rewrites and mirrors.
fn route_action(
    ctx: &RouteContext<'_>,
    vs: &Config<VirtualServiceSpec>,
    rule: &HttpRoute,
    m: Option<&HttpMatchRequest>,
) -> RouteAction {
    let cluster_specifier = match rule.route.as_slice() {
        [only] if only.headers.is_none() => route_action::ClusterSpecifier::Cluster(
            destination_cluster(ctx, &only.destination, &vs.namespace),
        ),
        destinations => {
            route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters: destinations
                    .iter()
                    .filter(|d| d.weight.unwrap_or(100) > 0 || destinations.len() == 1)
                    .map(|d| {
                        let (add, remove, response_add, response_remove) =
                            header_operations(d.headers.as_ref());
                        weighted_cluster::ClusterWeight {
                            name: destination_cluster(ctx, &d.destination, &vs.namespace),
                            weight: Some(UInt32Value {
                                // A single destination without a weight takes it all.
                                value: d.weight.map_or(100, |w| w.max(0) as u32),
                            }),
                            request_headers_to_add: add,
                            request_headers_to_remove: remove,
                            response_headers_to_add: response_add,
                            response_headers_to_remove: response_remove,
                            ..Default::default()
                        }
                    })
                    .collect(),
                ..Default::default()
            })
        }
    };
    let hash_policy = hash_policy(ctx, &rule.route, &vs.namespace);
    let mut action = RouteAction {
        cluster_specifier: Some(cluster_specifier),
        // Istio disables Envoy's 15 s default: no timeout unless asked.
        timeout: Some(duration(
            rule.timeout
                .as_deref()
                .and_then(parse_duration)
                .unwrap_or_default(),
        )),
        retry_policy: retry_policy(rule.retries.as_ref(), hash_policy.is_some()),
        request_mirror_policies: mirror_policies(ctx, vs, rule),
        hash_policy: hash_policy.into_iter().collect(),
        ..Default::default()
    };
    if let Some(rewrite) = &rule.rewrite {
        if let Some(uri) = &rewrite.uri {
            // With an exact match the whole path is replaced; with a
            // prefix the prefix is.
            match m.and_then(|m| m.uri.as_ref()) {
                Some(StringMatch { exact: Some(_), .. })
                | Some(StringMatch { regex: Some(_), .. }) => {
                    action.regex_rewrite = Some(RegexMatchAndSubstitute {
                        pattern: Some(regex(".*")),
                        substitution: uri.clone(),
                    });
                }
                _ => action.prefix_rewrite = uri.clone(),
            }
        }
        if let Some(re) = &rewrite.uri_regex_rewrite {
            action.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(regex(&re.match_)),
                substitution: re.rewrite.clone(),
            });
        }
        if let Some(authority) = &rewrite.authority {
            action.host_rewrite_specifier = Some(
                route_action::HostRewriteSpecifier::HostRewriteLiteral(authority.clone()),
            );
        }
    }
    action
}

/// The hash policy of a rule's destinations: the consistent hash their
/// DestinationRules ask (a subset's, a port's, or the rule's own), when
/// those that ask one agree — Envoy hashes a request once, whichever
/// cluster it goes to.
fn hash_policy(
    ctx: &RouteContext<'_>,
    destinations: &[HttpRouteDestination],
    namespace: &str,
) -> Option<route_action::HashPolicy> {
    let mut asked = destinations
        .iter()
        .filter_map(|d| consistent_hash(ctx, &d.destination, namespace));
    let first = asked.next()?;
    asked
        .all(|other| other == first)
        .then(|| hash_policy_of(first))?
}

/// The consistent hash a destination's DestinationRule asks for it.
fn consistent_hash<'a>(
    ctx: &RouteContext<'a>,
    destination: &Destination,
    namespace: &str,
) -> Option<&'a ConsistentHashLb> {
    let host = resolve_host(&destination.host, namespace);
    let rule = super::rule_of(ctx.snapshot, ctx.rules, ctx.proxy_namespace, &host)?;
    let port = destination_port(ctx, destination, &host);
    super::clusters::consistent_hash_at(rule, destination.subset.as_deref(), port)
}

/// Istio's translation of a consistent hash's key.
fn hash_policy_of(hash: &ConsistentHashLb) -> Option<route_action::HashPolicy> {
    use route_action::hash_policy::{
        ConnectionProperties, Cookie, CookieAttribute, Header, PolicySpecifier, QueryParameter,
    };
    let specifier = if let Some(name) = &hash.http_header_name {
        PolicySpecifier::Header(Header {
            header_name: name.clone(),
            ..Default::default()
        })
    } else if let Some(cookie) = &hash.http_cookie {
        PolicySpecifier::Cookie(Cookie {
            name: cookie.name.clone(),
            path: cookie.path.clone().unwrap_or_default(),
            ttl: cookie.ttl.as_deref().and_then(parse_duration).map(duration),
            attributes: cookie
                .attributes
                .iter()
                .map(|a| CookieAttribute {
                    name: a.name.clone(),
                    value: a.value.clone().unwrap_or_default(),
                })
                .collect(),
        })
    } else if hash.use_source_ip == Some(true) {
        PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
    } else if let Some(name) = &hash.http_query_parameter_name {
        PolicySpecifier::QueryParameter(QueryParameter { name: name.clone() })
    } else {
        return None;
    };
    Some(route_action::HashPolicy {
        policy_specifier: Some(specifier),
        terminal: false,
    })
}

/// The cluster of a destination: its host resolved in the config's
/// namespace, its port (or the service's only port, or the listener's).
pub fn destination_cluster(
    ctx: &RouteContext<'_>,
    destination: &Destination,
    namespace: &str,
) -> String {
    let host = resolve_host(&destination.host, namespace);
    let port = destination_port(ctx, destination, &host);
    cluster_name(port, destination.subset.as_deref().unwrap_or(""), &host)
}

/// A destination's port: its own, or the service's only port, or the
/// listener's.
fn destination_port(ctx: &RouteContext<'_>, destination: &Destination, host: &str) -> u32 {
    destination
        .port
        .as_ref()
        .map(|p| p.number)
        .unwrap_or_else(
            || match ctx.snapshot.services.get(host).map(|s| s.ports.as_slice()) {
                Some([only]) => only.port,
                _ => ctx.port,
            },
        )
}

/// Istio's retries: none when attempts is 0; its defaults when unset. A
/// retry goes to another endpoint than those tried (Envoy's previous_hosts
/// predicate) unless the route hashes requests (`hashed`), whose key keeps
/// to its endpoint — or as `retryIgnorePreviousHosts` says.
fn retry_policy(retries: Option<&HttpRetry>, hashed: bool) -> Option<RetryPolicy> {
    let other_hosts = retries
        .and_then(|r| r.retry_ignore_previous_hosts)
        .unwrap_or(!hashed);
    let (attempts, retry_on, per_try) = match retries {
        None => (DEFAULT_ATTEMPTS, DEFAULT_RETRY_ON.to_string(), None),
        Some(r) if r.attempts <= 0 => return None,
        Some(r) => (
            r.attempts as u32,
            r.retry_on
                .clone()
                .unwrap_or_else(|| DEFAULT_RETRY_ON.into()),
            r.per_try_timeout.as_deref().and_then(parse_duration),
        ),
    };
    // Status codes in retryOn become Envoy's retriable status codes.
    let (codes, conditions): (Vec<&str>, Vec<&str>) = retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .partition(|c| c.parse::<u32>().is_ok());
    let mut conditions: Vec<String> = conditions.into_iter().map(String::from).collect();
    if !codes.is_empty() && !conditions.iter().any(|c| c == "retriable-status-codes") {
        conditions.push("retriable-status-codes".into());
    }
    Some(RetryPolicy {
        retry_on: conditions.join(","),
        num_retries: Some(UInt32Value { value: attempts }),
        per_try_timeout: per_try.map(duration),
        retriable_status_codes: codes.iter().filter_map(|c| c.parse().ok()).collect(),
        retry_host_predicate: if other_hosts {
            vec![retry_policy::RetryHostPredicate {
                name: "envoy.retry_host_predicates.previous_hosts".into(),
                config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                    pack_any(PreviousHostsPredicate::default()),
                )),
            }]
        } else {
            Vec::new()
        },
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    })
}

/// Every request to `cluster`, with Istio's default retries (which keep
/// to the key's endpoint when `hash` hashes requests).
fn default_route(cluster: &str, hash: Option<route_action::HashPolicy>) -> Route {
    let action = RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_string())),
        timeout: Some(duration(std::time::Duration::ZERO)),
        retry_policy: retry_policy(None, hash.is_some()),
        hash_policy: hash.into_iter().collect(),
        ..Default::default()
    };
    Route {
        name: "default".into(),
        r#match: Some(route_match(None)),
        decorator: decorator(&action, None),
        action: Some(route::Action::Route(action)),
        ..Default::default()
    }
}

/// What a route's spans are named, as Istio names them: the first
/// destination's `host:port`, then the exact path matched or `/*`
/// (`reviews.shop.svc.cluster.local:9080/*`); other clusters by name.
pub fn decorator(action: &RouteAction, exact_path: Option<&str>) -> Option<Decorator> {
    let cluster = match action.cluster_specifier.as_ref()? {
        route_action::ClusterSpecifier::Cluster(name) => name.as_str(),
        route_action::ClusterSpecifier::WeightedClusters(weighted) => {
            weighted.clusters.first()?.name.as_str()
        }
        _ => return None,
    };
    let operation = match cluster.split('|').collect::<Vec<_>>()[..] {
        ["outbound", port, _, host] => format!("{host}:{port}{}", exact_path.unwrap_or("/*")),
        _ => cluster.to_string(),
    };
    Some(Decorator {
        operation,
        ..Default::default()
    })
}

fn direct_response_route(status: u32, body: Option<String>) -> Route {
    Route {
        name: "direct".into(),
        r#match: Some(route_match(None)),
        action: Some(route::Action::DirectResponse(DirectResponseAction {
            status,
            body: body.map(|b| DataSource {
                specifier: Some(data_source::Specifier::InlineString(b)),
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn redirect_action(redirect: &HttpRedirect) -> RedirectAction {
    use redirect_action::RedirectResponseCode as Code;
    let response_code = match redirect.redirect_code.unwrap_or(301) {
        302 => Code::Found,
        303 => Code::SeeOther,
        307 => Code::TemporaryRedirect,
        308 => Code::PermanentRedirect,
        _ => Code::MovedPermanently,
    };
    RedirectAction {
        host_redirect: redirect.authority.clone().unwrap_or_default(),
        port_redirect: redirect.port.unwrap_or(0),
        response_code: response_code as i32,
        scheme_rewrite_specifier: redirect
            .scheme
            .clone()
            .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
        path_rewrite_specifier: redirect
            .uri
            .clone()
            .map(redirect_action::PathRewriteSpecifier::PathRedirect),
        ..Default::default()
    }
}

/// Percentages as Envoy's fractions per million (Istio's precision).
fn per_million(percent: f64) -> FractionalPercent {
    FractionalPercent {
        numerator: (percent.clamp(0.0, 100.0) * 10_000.0).round() as u32,
        denominator: fractional_percent::DenominatorType::Million as i32,
    }
}

/// A fault's percentage: `percentage.value`, else the older integer
/// `percent`, else every request.
fn fault_percent(percentage: Option<&Percent>, percent: Option<i32>) -> FractionalPercent {
    per_million(
        percentage
            .map(|p| p.value)
            .or(percent.map(f64::from))
            .unwrap_or(100.0),
    )
}

fn http_fault(fault: &HttpFaultInjection) -> HttpFault {
    HttpFault {
        delay: fault.delay.as_ref().map(|d| FaultDelay {
            percentage: Some(fault_percent(d.percentage.as_ref(), d.percent)),
            fault_delay_secifier: d
                .fixed_delay
                .as_deref()
                .and_then(parse_duration)
                .map(|t| fault_delay::FaultDelaySecifier::FixedDelay(duration(t))),
        }),
        abort: fault.abort.as_ref().map(|a| FaultAbort {
            percentage: Some(fault_percent(a.percentage.as_ref(), None)),
            error_type: match (a.http_status, a.grpc_status.as_deref()) {
                (Some(status), _) => Some(fault_abort::ErrorType::HttpStatus(status as u32)),
                (None, Some(grpc)) => Some(fault_abort::ErrorType::GrpcStatus(grpc_code(grpc))),
                _ => None,
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A gRPC status by name (`UNAVAILABLE`) or number.
fn grpc_code(status: &str) -> u32 {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    status
        .parse()
        .ok()
        .or_else(|| NAMES.iter().position(|n| *n == status).map(|i| i as u32))
        .unwrap_or(2)
}

fn mirror_policies(
    ctx: &RouteContext<'_>,
    vs: &Config<VirtualServiceSpec>,
    rule: &HttpRoute,
) -> Vec<route_action::RequestMirrorPolicy> {
    let policy =
        |destination: &Destination, percent: Option<&Percent>| route_action::RequestMirrorPolicy {
            cluster: destination_cluster(ctx, destination, &vs.namespace),
            runtime_fraction: Some(RuntimeFractionalPercent {
                default_value: Some(per_million(percent.map_or(100.0, |p| p.value))),
                ..Default::default()
            }),
            ..Default::default()
        };
    let mut policies: Vec<_> = rule
        .mirror
        .iter()
        .map(|d| policy(d, rule.mirror_percentage.as_ref()))
        .collect();
    policies.extend(
        rule.mirrors
            .iter()
            .map(|m| policy(&m.destination, m.percentage.as_ref())),
    );
    policies
}

type HeaderChanges = (
    Vec<HeaderValueOption>,
    Vec<String>,
    Vec<HeaderValueOption>,
    Vec<String>,
);

/// Request and response header changes: `set` overwrites, `add` appends.
fn header_operations(headers: Option<&Headers>) -> HeaderChanges {
    let options = |ops: Option<&HeaderOperations>| -> (Vec<HeaderValueOption>, Vec<String>) {
        let Some(ops) = ops else {
            return (Vec::new(), Vec::new());
        };
        let option =
            |(name, value): (&String, &String), action: HeaderAppendAction| HeaderValueOption {
                header: Some(HeaderValue {
                    key: name.clone(),
                    value: value.clone(),
                    ..Default::default()
                }),
                append_action: action as i32,
                ..Default::default()
            };
        let mut add: Vec<HeaderValueOption> = ops
            .set
            .iter()
            .map(|h| option(h, HeaderAppendAction::OverwriteIfExistsOrAdd))
            .collect();
        add.extend(
            ops.add
                .iter()
                .map(|h| option(h, HeaderAppendAction::AppendIfExistsOrAdd)),
        );
        (add, ops.remove.clone())
    };
    let (request_add, request_remove) = options(headers.and_then(|h| h.request.as_ref()));
    let (response_add, response_remove) = options(headers.and_then(|h| h.response.as_ref()));
    (request_add, request_remove, response_add, response_remove)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_go_to_other_endpoints_unless_requests_are_hashed() {
        let other_hosts = |retries: Option<HttpRetry>, hashed: bool| {
            !retry_policy(retries.as_ref(), hashed)
                .unwrap()
                .retry_host_predicate
                .is_empty()
        };
        assert!(other_hosts(None, false), "Istio's default");
        assert!(
            !other_hosts(None, true),
            "a hashed key keeps to its endpoint"
        );
        let asked = |ignore: bool| HttpRetry {
            attempts: 2,
            retry_ignore_previous_hosts: Some(ignore),
            ..HttpRetry::default()
        };
        assert!(other_hosts(Some(asked(true)), true));
        assert!(!other_hosts(Some(asked(false)), false));
    }
}
