//! Routes: a RouteConfiguration converted once into what a request is
//! matched against — virtual hosts by authority, then the first route whose
//! path, headers and query match — and what the route does.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderValueOption, header_value_option};
use envoy_types::pb::envoy::config::route::v3::{
    self as envoy, header_matcher, query_parameter_matcher, redirect_action, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use regex::Regex;

use crate::error::{Error, Result};
use crate::model::hash::HashPolicy;
use crate::model::resilience::{Fault, Mirror, RetryPolicy};

const KIND: &str = "RouteConfiguration";
/// The fault filter, under whose name routes carry their faults.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// Envoy's route timeout when a route sets none (0 disables it).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    pub hosts: Vec<VirtualHost>,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    domains: Vec<String>,
    pub routes: Vec<Route>,
    pub headers: HeaderOps,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    matcher: RouteMatch,
    pub action: Action,
    pub headers: HeaderOps,
    /// Delays and aborts injected before the action.
    pub fault: Option<Fault>,
    /// What its requests' spans are named (the decorator's operation).
    pub operation: Option<String>,
}

#[derive(Debug)]
struct RouteMatch {
    path: PathMatch,
    ignore_case: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

#[derive(Debug)]
pub(crate) struct HeaderMatch {
    name: String,
    test: ValueTest,
    invert: bool,
}

#[derive(Debug)]
struct QueryMatch {
    name: String,
    test: ValueTest,
}

/// How a header or query value is tested.
#[derive(Debug)]
pub(crate) enum ValueTest {
    Present(bool),
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(Regex),
}

#[derive(Debug)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Respond {
        status: StatusCode,
        body: Option<bytes::Bytes>,
    },
}

#[derive(Debug)]
pub struct Forward {
    pub destinations: Destinations,
    /// None: no timeout.
    pub timeout: Option<Duration>,
    prefix_rewrite: Option<String>,
    regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: Option<HeaderValue>,
    pub retry: Option<RetryPolicy>,
    pub mirrors: Vec<Mirror>,
    /// How a request is hashed for a RING_HASH or MAGLEV cluster.
    pub hash_policy: Vec<HashPolicy>,
}

/// Where a route sends requests: one cluster, or clusters by weight.
#[derive(Debug)]
pub enum Destinations {
    One(String),
    Weighted {
        clusters: Vec<(String, u32, HeaderOps)>,
        total: u32,
    },
}

#[derive(Debug)]
pub struct Redirect {
    status: StatusCode,
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u32>,
    path: Option<String>,
    prefix: Option<String>,
    strip_query: bool,
}

/// Header changes on the way in (to the upstream) and out (to the client).
#[derive(Debug, Default)]
pub struct HeaderOps {
    pub request: HeaderEdits,
    pub response: HeaderEdits,
}

#[derive(Debug, Default)]
pub struct HeaderEdits {
    set: Vec<(HeaderName, HeaderValue)>,
    append: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.append {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl RouteTable {
    pub fn from_envoy(config: &envoy::RouteConfiguration) -> Result<Self> {
        let name = &config.name;
        let hosts = config
            .virtual_hosts
            .iter()
            .enumerate()
            .map(|(i, host)| VirtualHost::from_envoy(name, i, host))
            .collect::<Result<_>>()?;
        Ok(Self {
            name: name.clone(),
            hosts,
        })
    }

    /// The virtual host for `authority`, in Envoy's order: an exact domain,
    /// then the longest `*.suffix`, then the longest `prefix.*`, then `*`.
    /// Domains are tried with the authority's port and without it.
    pub fn find_host(&self, authority: &str) -> Option<&VirtualHost> {
        // Lowercased only when it is not already (a copy per request).
        let authority = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(authority.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(authority)
        };
        let (host, port) = split_port(&authority);
        let with_port = self.rank(&authority);
        let without = port.and_then(|_| self.rank(host));
        match (with_port, without) {
            (Some(a), Some(b)) => Some(if b.0 > a.0 { b.1 } else { a.1 }),
            (a, b) => a.or(b).map(|(_, host)| host),
        }
    }

    /// The best virtual host for `authority` and how well it matched.
    fn rank(&self, authority: &str) -> Option<((u8, usize), &VirtualHost)> {
        let mut best: Option<((u8, usize), &VirtualHost)> = None;
        for host in &self.hosts {
            for domain in &host.domains {
                let rank = if domain == authority {
                    Some((3, domain.len()))
                } else if let Some(suffix) = domain.strip_prefix('*')
                    && !suffix.is_empty()
                    && authority.len() > suffix.len()
                    && authority.ends_with(suffix)
                {
                    Some((2, suffix.len()))
                } else if let Some(prefix) = domain.strip_suffix('*')
                    && !prefix.is_empty()
                    && authority.len() > prefix.len()
                    && authority.starts_with(prefix)
                {
                    Some((1, prefix.len()))
                } else if domain == "*" {
                    Some((0, 0))
                } else {
                    None
                };
                if let Some(rank) = rank
                    && best.is_none_or(|(r, _)| rank > r)
                {
                    best = Some((rank, host));
                }
            }
        }
        best
    }
}

impl VirtualHost {
    fn from_envoy(table: &str, index: usize, host: &envoy::VirtualHost) -> Result<Self> {
        let field = format!("virtual_hosts[{index}]");
        let routes = host
            .routes
            .iter()
            .enumerate()
            .map(|(i, route)| Route::from_envoy(table, &format!("{field}.routes[{i}]"), route))
            .collect::<Result<_>>()?;
        Ok(Self {
            name: host.name.clone(),
            domains: host
                .domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            routes,
            headers: header_ops(
                table,
                &field,
                &host.request_headers_to_add,
                &host.request_headers_to_remove,
                &host.response_headers_to_add,
                &host.response_headers_to_remove,
            )?,
        })
    }

    /// The first route that matches the request.
    pub fn find_route(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matcher.matches(method, uri, headers))
    }
}

impl Route {
    fn from_envoy(table: &str, field: &str, route: &envoy::Route) -> Result<Self> {
        let invalid = |f: &str, message: String| {
            Error::resource(KIND, table, format!("{field}.{f}"), message)
        };
        let m = route
            .r#match
            .as_ref()
            .ok_or_else(|| invalid("match", "missing".into()))?;
        let path = match &m.path_specifier {
            Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
            Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
            Some(route_match::PathSpecifier::SafeRegex(r)) => {
                PathMatch::Regex(anchored(&r.regex).map_err(|e| invalid("match.safe_regex", e))?)
            }
            Some(_) => {
                return Err(invalid(
                    "match",
                    "only prefix, path and safe_regex are supported".into(),
                ));
            }
            None => return Err(invalid("match", "no path specifier".into())),
        };
        let ignore_case = m.case_sensitive.as_ref().is_some_and(|c| !c.value);
        let headers = m
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                HeaderMatch::from_envoy(h).map_err(|e| invalid(&format!("match.headers[{i}]"), e))
            })
            .collect::<Result<_>>()?;
        let query = m
            .query_parameters
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let test = match &q.query_parameter_match_specifier {
                    Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(s)) => {
                        string_test(s)
                    }
                    Some(query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(
                        p,
                    )) => Ok(ValueTest::Present(*p)),
                    None => Ok(ValueTest::Present(true)),
                }
                .map_err(|e| invalid(&format!("match.query_parameters[{i}]"), e))?;
                Ok(QueryMatch {
                    name: q.name.clone(),
                    test,
                })
            })
            .collect::<Result<_>>()?;
        let action = match &route.action {
            Some(route::Action::Route(action)) => Action::Forward(forward(action).map_err(|(f, e)| invalid(&format!("route.{f}"), e))?),
            Some(route::Action::Redirect(redirect)) => Action::Redirect(Redirect::from_envoy(redirect)),
            Some(route::Action::DirectResponse(direct)) => Action::Respond {
                status: StatusCode::from_u16(direct.status as u16)
                    .map_err(|e| invalid("direct_response.status", e.to_string()))?,
                body: direct.body.as_ref().and_then(|b| match &b.specifier {
                    Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(s)) => {
                        Some(bytes::Bytes::from(s.clone()))
                    }
                    Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => {
                        Some(bytes::Bytes::from(b.clone()))
                    }
                    _ => None,
                }),
            },
            _ => return Err(invalid("action", "only route, redirect and direct_response are supported".into())),
        };
        let fault = match route.typed_per_filter_config.get(FAULT_FILTER) {
            Some(any) => {
                let fault = crate::envoy::unpack(any)
                    .map_err(|e| invalid(&format!("typed_per_filter_config[{FAULT_FILTER}]"), e))?;
                Some(Fault::from_envoy(&fault).map_err(|(f, e)| {
                    invalid(&format!("typed_per_filter_config[{FAULT_FILTER}].{f}"), e)
                })?)
            }
            None => None,
        };
        Ok(Self {
            name: route.name.clone(),
            fault,
            operation: route
                .decorator
                .as_ref()
                .map(|d| d.operation.clone())
                .filter(|o| !o.is_empty()),
            matcher: RouteMatch {
                path,
                ignore_case,
                headers,
                query,
            },
            action,
            headers: header_ops(
                table,
                field,
                &route.request_headers_to_add,
                &route.request_headers_to_remove,
                &route.response_headers_to_add,
                &route.response_headers_to_remove,
            )?,
        })
    }
}

impl RouteMatch {
    fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        let path = uri.path();
        let path_matches = match &self.path {
            PathMatch::Prefix(p) if self.ignore_case => path
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) if self.ignore_case => path.eq_ignore_ascii_case(p),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(r) => r.is_match(path),
        };
        path_matches
            && self.headers.iter().all(|h| h.matches(method, uri, headers))
            && self
                .query
                .iter()
                .all(|q| q.matches(uri.query().unwrap_or("")))
    }
}

impl HeaderMatch {
    pub(crate) fn from_envoy(h: &envoy::HeaderMatcher) -> std::result::Result<Self, String> {
        Ok(Self {
            name: h.name.to_ascii_lowercase(),
            test: header_test(h)?,
            invert: h.invert_match,
        })
    }

    pub(crate) fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        // Pseudo-headers are the request line's parts (Istio's method and
        // authority matches arrive as `:method` and `:authority`).
        let value = match self.name.as_str() {
            ":method" => Some(method.as_str().to_string()),
            ":path" => uri.path_and_query().map(|p| p.as_str().to_string()),
            ":scheme" => Some(uri.scheme_str().unwrap_or("http").to_string()),
            ":authority" => uri
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| header_value(headers, "host")),
            name => header_value(headers, name),
        };
        self.test.matches(value.as_deref()) != self.invert
    }
}

/// A header's values, joined with commas as Envoy joins repeated headers.
fn header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

impl QueryMatch {
    fn matches(&self, query: &str) -> bool {
        let value = query.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (name == self.name).then_some(value)
        });
        self.test.matches(value)
    }
}

impl ValueTest {
    pub(crate) fn matches(&self, value: Option<&str>) -> bool {
        let fold = |a: &str, b: &str, ignore: bool| {
            if ignore {
                (a.to_ascii_lowercase(), b.to_ascii_lowercase())
            } else {
                (a.to_string(), b.to_string())
            }
        };
        match (self, value) {
            (ValueTest::Present(present), v) => v.is_some() == *present,
            (_, None) => false,
            (ValueTest::Exact(e, i), Some(v)) => {
                let (v, e) = fold(v, e, *i);
                v == e
            }
            (ValueTest::Prefix(p, i), Some(v)) => {
                let (v, p) = fold(v, p, *i);
                v.starts_with(&p)
            }
            (ValueTest::Suffix(s, i), Some(v)) => {
                let (v, s) = fold(v, s, *i);
                v.ends_with(&s)
            }
            (ValueTest::Contains(c, i), Some(v)) => {
                let (v, c) = fold(v, c, *i);
                v.contains(&c)
            }
            (ValueTest::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

impl Forward {
    /// The path sent upstream: the matched prefix or a regex rewritten.
    pub fn rewrite_path(&self, route: &Route, path_and_query: &str) -> Option<String> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let rewritten = if let Some(replacement) = &self.prefix_rewrite {
            let matched = match &route.matcher.path {
                PathMatch::Prefix(p) => p.len(),
                PathMatch::Exact(p) => p.len(),
                PathMatch::Regex(_) => path.len(),
            };
            format!("{replacement}{}", path.get(matched..).unwrap_or(""))
        } else if let Some((regex, substitution)) = &self.regex_rewrite {
            regex.replace_all(path, substitution.as_str()).into_owned()
        } else {
            return None;
        };
        Some(match query {
            Some(q) => format!("{rewritten}?{q}"),
            None => rewritten,
        })
    }
}

impl Destinations {
    /// Clusters by weight; refused when the weights add up to nothing.
    pub fn weighted(clusters: Vec<(String, u32, HeaderOps)>) -> std::result::Result<Self, String> {
        let total: u32 = clusters.iter().map(|(_, w, _)| w).sum();
        if total == 0 {
            return Err("the weights add up to 0: give at least one cluster a weight".into());
        }
        Ok(Destinations::Weighted { clusters, total })
    }

    /// The cluster for one request; `roll` is uniform in `0..total`.
    pub fn pick(&self, roll: impl FnOnce(u32) -> u32) -> Option<(&str, Option<&HeaderOps>)> {
        match self {
            Destinations::One(cluster) => Some((cluster, None)),
            Destinations::Weighted { clusters, total } => {
                let mut point = roll(*total);
                for (cluster, weight, headers) in clusters {
                    if point < *weight {
                        return Some((cluster, Some(headers)));
                    }
                    point -= weight;
                }
                None
            }
        }
    }
}

impl Redirect {
    fn from_envoy(redirect: &envoy::RedirectAction) -> Self {
        let status = match redirect_action::RedirectResponseCode::try_from(redirect.response_code) {
            Ok(redirect_action::RedirectResponseCode::Found) => StatusCode::FOUND,
            Ok(redirect_action::RedirectResponseCode::SeeOther) => StatusCode::SEE_OTHER,
            Ok(redirect_action::RedirectResponseCode::TemporaryRedirect) => {
                StatusCode::TEMPORARY_REDIRECT
            }
            Ok(redirect_action::RedirectResponseCode::PermanentRedirect) => {
                StatusCode::PERMANENT_REDIRECT
            }
            _ => StatusCode::MOVED_PERMANENTLY,
        };
        let scheme = match &redirect.scheme_rewrite_specifier {
            Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => {
                Some("https".to_string())
            }
            Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
            _ => None,
        };
        let (path, prefix) = match &redirect.path_rewrite_specifier {
            Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => (Some(p.clone()), None),
            Some(redirect_action::PathRewriteSpecifier::PrefixRewrite(p)) => {
                (None, Some(p.clone()))
            }
            _ => (None, None),
        };
        Self {
            status,
            scheme,
            host: (!redirect.host_redirect.is_empty()).then(|| redirect.host_redirect.clone()),
            port: (redirect.port_redirect != 0).then_some(redirect.port_redirect),
            path,
            prefix,
            strip_query: redirect.strip_query,
        }
    }

    /// The status and Location for a request to `scheme://authority` `uri`.
    pub fn location(
        &self,
        route: &Route,
        scheme: &str,
        authority: &str,
        uri: &Uri,
    ) -> (StatusCode, String) {
        let scheme = self.scheme.as_deref().unwrap_or(scheme);
        let (host, port) = split_port(authority);
        let host = self.host.as_deref().unwrap_or(host);
        let port = match (self.port, &self.scheme, port) {
            (Some(p), _, _) => Some(p),
            // A scheme change drops the old scheme's port.
            (None, Some(_), _) => None,
            (None, None, p) => p.map(u32::from),
        };
        let path = uri.path();
        let mut target = match (&self.path, &self.prefix) {
            (Some(p), _) => p.clone(),
            (None, Some(prefix)) => {
                let matched = match &route.matcher.path {
                    PathMatch::Prefix(p) | PathMatch::Exact(p) => p.len(),
                    PathMatch::Regex(_) => path.len(),
                };
                format!("{prefix}{}", path.get(matched..).unwrap_or(""))
            }
            (None, None) => path.to_string(),
        };
        if !self.strip_query
            && !target.contains('?')
            && let Some(q) = uri.query()
        {
            target = format!("{target}?{q}");
        }
        let authority = match port {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        (self.status, format!("{scheme}://{authority}{target}"))
    }
}

/// An authority's host and port (`reviews:9080` → `reviews`, 9080); an
/// authority without a numeric port is all host.
pub fn split_port(authority: &str) -> (&str, Option<u16>) {
    // A byte search: `rsplit_once(':')` goes through the general pattern
    // machinery, several times the cost on every request.
    let Some(colon) = authority.bytes().rposition(|b| b == b':') else {
        return (authority, None);
    };
    match authority[colon + 1..].parse() {
        Ok(port) => (&authority[..colon], Some(port)),
        Err(_) => (authority, None),
    }
}

fn forward(action: &envoy::RouteAction) -> std::result::Result<Forward, (String, String)> {
    let destinations = match &action.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => Destinations::One(c.clone()),
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let clusters = w
                .clusters
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let ops = header_ops(
                        KIND,
                        "",
                        &c.request_headers_to_add,
                        &c.request_headers_to_remove,
                        &c.response_headers_to_add,
                        &c.response_headers_to_remove,
                    )
                    .map_err(|e| (format!("weighted_clusters.clusters[{i}]"), e.to_string()))?;
                    Ok::<_, (String, String)>((
                        c.name.clone(),
                        c.weight.as_ref().map_or(0, |w| w.value),
                        ops,
                    ))
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Destinations::weighted(clusters).map_err(|e| ("weighted_clusters".to_string(), e))?
        }
        _ => {
            return Err((
                "cluster_specifier".into(),
                "only cluster and weighted_clusters are supported".into(),
            ));
        }
    };
    let timeout = match &action.timeout {
        None => Some(DEFAULT_TIMEOUT),
        Some(d) if d.seconds == 0 && d.nanos == 0 => None,
        Some(d) => Some(super::duration(d)),
    };
    let regex_rewrite = match &action.regex_rewrite {
        Some(r) => Some((
            Regex::new(
                &r.pattern
                    .as_ref()
                    .map(|p| p.regex.clone())
                    .unwrap_or_default(),
            )
            .map_err(|e| ("regex_rewrite.pattern".to_string(), e.to_string()))?,
            // RE2's \1 is regex's ${1}.
            backreferences(&r.substitution),
        )),
        None => None,
    };
    let host_rewrite = match &action.host_rewrite_specifier {
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(
            HeaderValue::from_str(h)
                .map_err(|e| ("host_rewrite_literal".to_string(), e.to_string()))?,
        ),
        _ => None,
    };
    let retry = action
        .retry_policy
        .as_ref()
        .map(RetryPolicy::from_envoy)
        .transpose()
        .map_err(|(f, e)| (format!("retry_policy.{f}"), e))?;
    let hash_policy = action
        .hash_policy
        .iter()
        .enumerate()
        .map(|(i, p)| {
            HashPolicy::from_envoy(p).map_err(|(f, e)| (format!("hash_policy[{i}].{f}"), e))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Forward {
        destinations,
        timeout,
        retry,
        hash_policy,
        mirrors: action
            .request_mirror_policies
            .iter()
            .map(Mirror::from_envoy)
            .collect(),
        prefix_rewrite: (!action.prefix_rewrite.is_empty()).then(|| action.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
    })
}

/// A regex that must match the whole value, as Envoy's safe_regex does.
fn anchored(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| e.to_string())
}

fn backreferences(substitution: &str) -> String {
    let mut out = String::new();
    let mut chars = substitution.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

// Envoy still reads the deprecated matchers, and so do users' files.
#[allow(deprecated)]
fn header_test(h: &envoy::HeaderMatcher) -> std::result::Result<ValueTest, String> {
    Ok(match &h.header_match_specifier {
        None => ValueTest::Present(true),
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(p)) => ValueTest::Present(*p),
        Some(header_matcher::HeaderMatchSpecifier::ExactMatch(e)) => {
            ValueTest::Exact(e.clone(), false)
        }
        Some(header_matcher::HeaderMatchSpecifier::PrefixMatch(p)) => {
            ValueTest::Prefix(p.clone(), false)
        }
        Some(header_matcher::HeaderMatchSpecifier::SuffixMatch(s)) => {
            ValueTest::Suffix(s.clone(), false)
        }
        Some(header_matcher::HeaderMatchSpecifier::ContainsMatch(c)) => {
            ValueTest::Contains(c.clone(), false)
        }
        Some(header_matcher::HeaderMatchSpecifier::SafeRegexMatch(r)) => {
            ValueTest::Regex(anchored(&r.regex)?)
        }
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(s)) => string_test(s)?,
        Some(_) => return Err("range matches are not supported".into()),
    })
}

pub(crate) fn string_test(s: &StringMatcher) -> std::result::Result<ValueTest, String> {
    let i = s.ignore_case;
    Ok(match &s.match_pattern {
        Some(string_matcher::MatchPattern::Exact(e)) => ValueTest::Exact(e.clone(), i),
        Some(string_matcher::MatchPattern::Prefix(p)) => ValueTest::Prefix(p.clone(), i),
        Some(string_matcher::MatchPattern::Suffix(x)) => ValueTest::Suffix(x.clone(), i),
        Some(string_matcher::MatchPattern::Contains(c)) => ValueTest::Contains(c.clone(), i),
        Some(string_matcher::MatchPattern::SafeRegex(r)) => ValueTest::Regex(anchored(&r.regex)?),
        _ => return Err("an empty or custom string match".into()),
    })
}

fn header_ops(
    table: &str,
    field: &str,
    request_add: &[HeaderValueOption],
    request_remove: &[String],
    response_add: &[HeaderValueOption],
    response_remove: &[String],
) -> Result<HeaderOps> {
    Ok(HeaderOps {
        request: edits(table, field, request_add, request_remove)?,
        response: edits(table, field, response_add, response_remove)?,
    })
}

#[allow(deprecated)] // `append`, which Envoy still honours.
fn edits(
    table: &str,
    field: &str,
    add: &[HeaderValueOption],
    remove: &[String],
) -> Result<HeaderEdits> {
    let invalid =
        |message: String| Error::resource(KIND, table, format!("{field}.headers"), message);
    let mut edits = HeaderEdits::default();
    for option in add {
        let Some(header) = &option.header else {
            continue;
        };
        let name = HeaderName::from_bytes(header.key.as_bytes())
            .map_err(|e| invalid(format!("{:?}: {e}", header.key)))?;
        let value = HeaderValue::from_str(&header.value)
            .map_err(|e| invalid(format!("{:?}: {e}", header.value)))?;
        // Envoy's default action appends.
        let append = matches!(
            header_value_option::HeaderAppendAction::try_from(option.append_action),
            Ok(header_value_option::HeaderAppendAction::AppendIfExistsOrAdd)
        ) && option.append.as_ref().is_none_or(|a| a.value);
        if append {
            edits.append.push((name, value));
        } else {
            edits.set.push((name, value));
        }
    }
    for name in remove {
        edits.remove.push(
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| invalid(format!("{name:?}: {e}")))?,
        );
    }
    Ok(edits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::from_json;
    use serde_json::json;

    fn table(config: serde_json::Value) -> RouteTable {
        RouteTable::from_envoy(&from_json::<envoy::RouteConfiguration>(config).unwrap()).unwrap()
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> (Uri, HeaderMap) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        (uri.parse().unwrap(), map)
    }

    #[test]
    fn hosts_are_found_exact_then_suffix_then_prefix_then_any() {
        let t = table(json!({"name": "80", "virtual_hosts": [
            {"name": "any", "domains": ["*"]},
            {"name": "exact", "domains": ["reviews.shop.svc.cluster.local", "reviews"]},
            {"name": "suffix", "domains": ["*.shop.svc.cluster.local"]},
            {"name": "prefix", "domains": ["reviews.*"]},
        ]}));
        let find = |a: &str| t.find_host(a).map(|h| h.name.as_str());
        assert_eq!(find("reviews"), Some("exact"));
        assert_eq!(find("reviews:9080"), Some("exact"));
        assert_eq!(find("Reviews.Shop.svc.cluster.local"), Some("exact"));
        assert_eq!(find("ratings.shop.svc.cluster.local"), Some("suffix"));
        assert_eq!(find("reviews.other"), Some("prefix"));
        assert_eq!(find("example.com"), Some("any"));
    }

    #[test]
    fn an_authority_splits_at_its_port() {
        assert_eq!(split_port("reviews:9080"), ("reviews", Some(9080)));
        assert_eq!(split_port("reviews"), ("reviews", None));
        assert_eq!(split_port("[::1]:8080"), ("[::1]", Some(8080)));
        assert_eq!(split_port("[::1]"), ("[::1]", None));
        assert_eq!(split_port("reviews:http"), ("reviews:http", None));
        assert_eq!(split_port("reviews:"), ("reviews:", None));
    }

    #[test]
    fn the_first_matching_route_wins() {
        let t = table(
            json!({"name": "80", "virtual_hosts": [{"name": "h", "domains": ["*"], "routes": [
                {"name": "jason", "match": {"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]}, "route": {"cluster": "v2"}},
                {"name": "exact", "match": {"path": "/login"}, "route": {"cluster": "login"}},
                {"name": "regex", "match": {"safe_regex": {"regex": "/api/v[0-9]+/.*"}}, "route": {"cluster": "api"}},
                {"name": "query", "match": {"prefix": "/", "query_parameters": [{"name": "debug", "present_match": true}]}, "route": {"cluster": "debug"}},
                {"name": "rest", "match": {"prefix": "/"}, "route": {"cluster": "v1"}},
            ]}]}),
        );
        let host = t.find_host("reviews").unwrap();
        let route = |uri: &str, headers: &[(&str, &str)]| {
            let (uri, headers) = request(uri, headers);
            host.find_route(&Method::GET, &uri, &headers)
                .map(|r| r.name.as_str())
        };
        assert_eq!(route("/reviews/1", &[("end-user", "jason")]), Some("jason"));
        assert_eq!(route("/reviews/1", &[("end-user", "ann")]), Some("rest"));
        assert_eq!(route("/login", &[]), Some("exact"));
        assert_eq!(route("/login/x", &[]), Some("rest"));
        assert_eq!(route("/api/v2/items", &[]), Some("regex"));
        assert_eq!(route("/xapi/v2/items", &[]), Some("rest"));
        assert_eq!(route("/x?debug=1", &[]), Some("query"));
    }

    #[test]
    fn pseudo_headers_match_the_request_line() {
        let t = table(
            json!({"name": "80", "virtual_hosts": [{"name": "h", "domains": ["*"], "routes": [
                {"name": "post", "match": {"prefix": "/", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]}, "route": {"cluster": "writes"}},
                {"name": "api-host", "match": {"prefix": "/", "headers": [{"name": ":authority", "string_match": {"prefix": "api."}}]}, "route": {"cluster": "api"}},
                {"name": "rest", "match": {"prefix": "/"}, "route": {"cluster": "reads"}},
            ]}]}),
        );
        let host = t.find_host("shop").unwrap();
        let route = |method: Method, authority: &str| {
            let (uri, headers) = request("/cart", &[("host", authority)]);
            host.find_route(&method, &uri, &headers)
                .map(|r| r.name.as_str())
        };
        assert_eq!(route(Method::POST, "shop"), Some("post"));
        assert_eq!(route(Method::GET, "api.shop"), Some("api-host"));
        assert_eq!(route(Method::GET, "shop"), Some("rest"));
    }

    #[test]
    fn weights_split_by_the_roll() {
        let t = table(
            json!({"name": "80", "virtual_hosts": [{"name": "h", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
                    {"name": "v1", "weight": 90}, {"name": "v2", "weight": 10}]}}},
            ]}]}),
        );
        let Action::Forward(forward) = &t.hosts[0].routes[0].action else {
            panic!()
        };
        assert_eq!(forward.destinations.pick(|_| 0).unwrap().0, "v1");
        assert_eq!(forward.destinations.pick(|_| 89).unwrap().0, "v1");
        assert_eq!(forward.destinations.pick(|_| 90).unwrap().0, "v2");
        assert_eq!(forward.timeout, Some(DEFAULT_TIMEOUT), "Envoy's default");
    }

    #[test]
    fn rewrites_and_redirects() {
        let t = table(
            json!({"name": "80", "virtual_hosts": [{"name": "h", "domains": ["*"], "routes": [
                {"match": {"prefix": "/old/"}, "route": {"cluster": "c", "prefix_rewrite": "/new/", "timeout": "0s"}},
                {"match": {"prefix": "/v1"}, "redirect": {"https_redirect": true, "prefix_rewrite": "/v2"}},
            ]}]}),
        );
        let host = &t.hosts[0];
        let Action::Forward(forward) = &host.routes[0].action else {
            panic!()
        };
        assert_eq!(
            forward
                .rewrite_path(&host.routes[0], "/old/a?x=1")
                .as_deref(),
            Some("/new/a?x=1")
        );
        assert_eq!(forward.timeout, None, "0s turns the timeout off");
        let Action::Redirect(redirect) = &host.routes[1].action else {
            panic!()
        };
        let (status, location) = redirect.location(
            &host.routes[1],
            "http",
            "shop.example:8080",
            &"/v1/cart?id=3".parse().unwrap(),
        );
        assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(location, "https://shop.example/v2/cart?id=3");
    }

    #[test]
    fn a_bad_regex_names_its_route() {
        let config = from_json::<envoy::RouteConfiguration>(
            json!({"name": "80", "virtual_hosts": [{"name": "h", "domains": ["*"], "routes": [
                {"match": {"safe_regex": {"regex": "(unclosed"}}, "route": {"cluster": "c"}},
            ]}]}),
        )
        .unwrap();
        let error = RouteTable::from_envoy(&config).unwrap_err().to_string();
        assert!(
            error
                .starts_with("RouteConfiguration 80: virtual_hosts[0].routes[0].match.safe_regex:"),
            "{error}"
        );
    }
}
