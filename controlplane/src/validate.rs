//! Validation of the Istio-compatible configuration, with Istio's rules:
//! what the CRD schema cannot say (weights that add up, durations that
//! parse, regexes that compile, TLS settings that go together). Pure; the
//! `/validate` webhook refuses an object with these messages, and the model
//! skips an object that got in anyway, alone.
//!
//! Every error names the field as a path from the object's root
//! (`spec.http[0].route[1].weight`) and says what to do.

use std::time::Duration;

use bowline_api::duration::parse as parse_duration;
use bowline_api::networking::{
    ClientTlsMode, ClientTlsSettings, CookieAttribute, DestinationRuleSpec, GatewaySpec,
    HttpMatchRequest, HttpRoute, LoadBalancerSettings, Location, OutlierDetection, Resolution,
    ServerTlsMode, ServiceEntrySpec, SidecarSpec, StringMatch, TrafficPolicy, VirtualServiceSpec,
};
use bowline_api::security::{
    Action, AuthorizationPolicySpec, PeerAuthenticationSpec, RequestAuthenticationSpec,
};

/// One thing wrong, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Collects errors under a growing field path.
#[derive(Debug, Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, field: &str, value: Option<&str>, minimum: Duration) {
        let Some(text) = value else { return };
        match parse_duration(text) {
            Some(d) if d >= minimum => {}
            Some(_) => self.add(
                field,
                format!("{text:?} is shorter than the minimum of {minimum:?}"),
            ),
            None => self.add(
                field,
                format!("{text:?} is not a duration; write it like 5s, 1.5s, 100ms or 3m"),
            ),
        }
    }

    fn percentage(&mut self, field: &str, value: Option<f64>) {
        if let Some(value) = value
            && !(0.0..=100.0).contains(&value)
        {
            self.add(
                field,
                format!("{value} is not a percentage between 0 and 100"),
            );
        }
    }

    fn string_match(&mut self, field: &str, value: &StringMatch) {
        let set = [&value.exact, &value.prefix, &value.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set != 1 {
            self.add(field, "set exactly one of exact, prefix and regex");
        }
        if let Some(pattern) = &value.regex
            && let Err(e) = regex::Regex::new(pattern)
        {
            self.add(
                &format!("{field}.regex"),
                format!("{pattern:?} is not a valid RE2 regular expression: {e}"),
            );
        }
    }

    fn port(&mut self, field: &str, port: u32) {
        if !(1..=65535).contains(&port) {
            self.add(field, format!("{port} is not a port number (1 to 65535)"));
        }
    }

    fn result(self) -> Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// A host as Istio takes it: a DNS name, optionally starting with `*.`, or
/// `*` alone.
fn host(errors: &mut Errors, field: &str, host: &str) {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if host == "*" {
        return;
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid {
        errors.add(
            field,
            format!("{host:?} is not a host: a DNS name (reviews, reviews.shop.svc.cluster.local), optionally starting with *."),
        );
    }
}

pub fn virtual_service(spec: &VirtualServiceSpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    if spec.hosts.is_empty() {
        errors.add("spec.hosts", "name at least one host the routes apply to");
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        host(&mut errors, &format!("spec.hosts[{i}]"), h);
        if h == "*" && (spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh")) {
            errors.add(
                &format!("spec.hosts[{i}]"),
                "\"*\" may only be used for gateways, not for sidecars (\"mesh\")",
            );
        }
    }
    for (i, route) in spec.http.iter().enumerate() {
        http_route(&mut errors, &format!("spec.http[{i}]"), route);
    }
    for (i, route) in spec.tcp.iter().enumerate() {
        let field = format!("spec.tcp[{i}]");
        if route.route.is_empty() {
            errors.add(&format!("{field}.route"), "name at least one destination");
        }
        weights(
            &mut errors,
            &format!("{field}.route"),
            route.route.iter().map(|r| r.weight),
        );
    }
    for (i, route) in spec.tls.iter().enumerate() {
        let field = format!("spec.tls[{i}]");
        if route.match_.iter().any(|m| m.sni_hosts.is_empty()) {
            errors.add(
                &format!("{field}.match"),
                "every TLS match names its sniHosts",
            );
        }
        weights(
            &mut errors,
            &format!("{field}.route"),
            route.route.iter().map(|r| r.weight),
        );
    }
    errors.result()
}

fn http_route(errors: &mut Errors, field: &str, route: &HttpRoute) {
    let actions = [
        !route.route.is_empty(),
        route.redirect.is_some(),
        route.direct_response.is_some(),
    ]
    .iter()
    .filter(|set| **set)
    .count();
    if actions != 1 {
        errors.add(
            field,
            "set exactly one of route, redirect and directResponse",
        );
    }
    for (i, m) in route.match_.iter().enumerate() {
        http_match(errors, &format!("{field}.match[{i}]"), m);
    }
    for (i, destination) in route.route.iter().enumerate() {
        let at = format!("{field}.route[{i}]");
        if destination.destination.host.is_empty() {
            errors.add(
                &format!("{at}.destination.host"),
                "name the destination host",
            );
        } else {
            host(
                errors,
                &format!("{at}.destination.host"),
                &destination.destination.host,
            );
        }
        if let Some(port) = &destination.destination.port {
            errors.port(&format!("{at}.destination.port.number"), port.number);
        }
        if destination.weight.is_some_and(|w| w < 0) {
            errors.add(&format!("{at}.weight"), "a weight is 0 or more");
        }
    }
    weights(
        errors,
        &format!("{field}.route"),
        route.route.iter().map(|r| r.weight),
    );
    errors.duration(
        &format!("{field}.timeout"),
        route.timeout.as_deref(),
        Duration::ZERO,
    );
    if let Some(retries) = &route.retries {
        if retries.attempts < 0 {
            errors.add(
                &format!("{field}.retries.attempts"),
                "attempts is 0 or more",
            );
        }
        errors.duration(
            &format!("{field}.retries.perTryTimeout"),
            retries.per_try_timeout.as_deref(),
            Duration::from_millis(1),
        );
        if let Some(retry_on) = &retries.retry_on {
            for condition in retry_on.split(',').map(str::trim) {
                if !RETRY_ON.contains(&condition) && condition.parse::<u16>().is_err() {
                    errors.add(
                        &format!("{field}.retries.retryOn"),
                        format!("{condition:?} is not a retry condition; use Envoy's (5xx, gateway-error, reset, connect-failure, retriable-4xx, refused-stream, retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable) or a status code"),
                    );
                }
            }
        }
    }
    if let Some(fault) = &route.fault {
        if fault.delay.is_none() && fault.abort.is_none() {
            errors.add(&format!("{field}.fault"), "set a delay, an abort or both");
        }
        if let Some(delay) = &fault.delay {
            let at = format!("{field}.fault.delay");
            if delay.fixed_delay.is_none() {
                errors.add(&format!("{at}.fixedDelay"), "a delay needs fixedDelay");
            }
            errors.duration(
                &format!("{at}.fixedDelay"),
                delay.fixed_delay.as_deref(),
                Duration::from_millis(1),
            );
            errors.percentage(
                &format!("{at}.percentage.value"),
                delay.percentage.as_ref().map(|p| p.value),
            );
        }
        if let Some(abort) = &fault.abort {
            let at = format!("{field}.fault.abort");
            match (abort.http_status, &abort.grpc_status) {
                (Some(status), None) if (200..=599).contains(&status) => {}
                (Some(status), None) => errors.add(
                    &format!("{at}.httpStatus"),
                    format!("{status} is not an HTTP status (200 to 599)"),
                ),
                (None, Some(_)) => {}
                _ => errors.add(&at, "set exactly one of httpStatus and grpcStatus"),
            }
            errors.percentage(
                &format!("{at}.percentage.value"),
                abort.percentage.as_ref().map(|p| p.value),
            );
        }
    }
    errors.percentage(
        &format!("{field}.mirrorPercentage.value"),
        route.mirror_percentage.as_ref().map(|p| p.value),
    );
    if let Some(redirect) = &route.redirect {
        if let Some(code) = redirect.redirect_code
            && !matches!(code, 301 | 302 | 303 | 307 | 308)
        {
            errors.add(
                &format!("{field}.redirect.redirectCode"),
                format!("{code} is not a redirect status (301, 302, 303, 307 or 308)"),
            );
        }
        if route.rewrite.is_some() {
            errors.add(
                &format!("{field}.rewrite"),
                "a redirect cannot also rewrite",
            );
        }
    }
    if let Some(rewrite) = route
        .rewrite
        .as_ref()
        .and_then(|r| r.uri_regex_rewrite.as_ref())
        && let Err(e) = regex::Regex::new(&rewrite.match_)
    {
        errors.add(
            &format!("{field}.rewrite.uriRegexRewrite.match"),
            format!("not a valid RE2 regular expression: {e}"),
        );
    }
}

/// Envoy's retry conditions.
const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn http_match(errors: &mut Errors, field: &str, m: &HttpMatchRequest) {
    for (name, value) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(value) = value {
            errors.string_match(&format!("{field}.{name}"), value);
        }
    }
    for (name, map) in [
        ("headers", &m.headers),
        ("queryParams", &m.query_params),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (key, value) in map {
            if key.is_empty() {
                errors.add(&format!("{field}.{name}"), "a name may not be empty");
            }
            if name != "queryParams" && key.chars().any(|c| c.is_ascii_uppercase()) {
                errors.add(
                    &format!("{field}.{name}.{key}"),
                    "header names are matched in lowercase; write them so",
                );
            }
            // An empty match (`{}`) means "present", as in Istio.
            if *value != StringMatch::default() {
                errors.string_match(&format!("{field}.{name}.{key}"), value);
            }
        }
    }
    if let Some(port) = m.port {
        errors.port(&format!("{field}.port"), port);
    }
}

/// With more than one destination, the weights must add up to 100 (and a
/// single destination, if weighted, carries 100).
fn weights(errors: &mut Errors, field: &str, weights: impl Iterator<Item = Option<i32>>) {
    let weights: Vec<Option<i32>> = weights.collect();
    if weights.len() < 2 && weights.iter().all(|w| w.is_none()) {
        return;
    }
    let total: i64 = weights.iter().map(|w| i64::from(w.unwrap_or(0))).sum();
    if total != 100 {
        errors.add(
            field,
            format!("the destinations' weights add up to {total}; they must add up to 100"),
        );
    }
}

pub fn destination_rule(spec: &DestinationRuleSpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    if spec.host.is_empty() {
        errors.add("spec.host", "name the host the rule applies to");
    } else {
        host(&mut errors, "spec.host", &spec.host);
    }
    if let Some(policy) = &spec.traffic_policy {
        traffic_policy(&mut errors, "spec.trafficPolicy", policy);
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        if subset.name.is_empty() {
            errors.add(&format!("{field}.name"), "a subset needs a name");
        } else if !names.insert(subset.name.as_str()) {
            errors.add(
                &format!("{field}.name"),
                format!("subset {:?} is defined twice", subset.name),
            );
        }
        if let Some(policy) = &subset.traffic_policy {
            traffic_policy(&mut errors, &format!("{field}.trafficPolicy"), policy);
        }
    }
    errors.result()
}

/// What a DestinationRule sets that is read but not acted on: the rule
/// applies without it, and whoever wrote it is told which fields (rather
/// than finding out from traffic that does not behave).
pub fn destination_rule_unread(spec: &DestinationRuleSpec) -> Vec<FieldError> {
    let mut unread = Errors::default();
    if let Some(policy) = &spec.traffic_policy {
        unread_policy(&mut unread, "spec.trafficPolicy", policy);
    }
    for (i, subset) in spec.subsets.iter().enumerate() {
        if let Some(policy) = &subset.traffic_policy {
            unread_policy(
                &mut unread,
                &format!("spec.subsets[{i}].trafficPolicy"),
                policy,
            );
        }
    }
    unread.0
}

fn unread_policy(unread: &mut Errors, field: &str, policy: &TrafficPolicy) {
    if policy
        .retry_budget
        .as_ref()
        .is_some_and(|b| b.budget_interval.is_some())
    {
        unread.add(
            &format!("{field}.retryBudget.budgetInterval"),
            "not supported; the budget counts the requests in flight",
        );
    }
    let ports = policy.port_level_settings.iter().enumerate().map(|(i, p)| {
        (
            format!("{field}.portLevelSettings[{i}]"),
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
        )
    });
    let all = std::iter::once((
        field.to_string(),
        policy.load_balancer.as_ref(),
        policy.connection_pool.as_ref(),
        policy.outlier_detection.as_ref(),
    ))
    .chain(ports);
    for (at, balancer, pool, outlier) in all {
        let tcp = pool.and_then(|p| p.tcp.as_ref());
        let http = pool.and_then(|p| p.http.as_ref());
        // Each field: whether it is set, where, and what happens instead.
        let fields = [
            (
                balancer.is_some_and(|lb| lb.locality_lb_setting.is_some()),
                "loadBalancer.localityLbSetting",
                "endpoints are chosen regardless of locality",
            ),
            (
                balancer.is_some_and(|lb| lb.warmup_duration_secs.is_some()),
                "loadBalancer.warmupDurationSecs",
                "new endpoints get their full share at once",
            ),
            (
                tcp.is_some_and(|t| t.max_connection_duration.is_some()),
                "connectionPool.tcp.maxConnectionDuration",
                "connections last until idle or closed",
            ),
            (
                tcp.is_some_and(|t| t.idle_timeout.is_some()),
                "connectionPool.tcp.idleTimeout",
                "TCP connections last until either side closes",
            ),
            (
                http.is_some_and(|h| h.use_client_protocol.is_some()),
                "connectionPool.http.useClientProtocol",
                "the protocol follows the port's (h2UpgradePolicy for HTTP/2)",
            ),
            (
                http.is_some_and(|h| h.max_concurrent_streams.is_some()),
                "connectionPool.http.maxConcurrentStreams",
                "the server's own limit applies",
            ),
            (
                outlier.is_some_and(|o| {
                    o.split_external_local_origin_errors.is_some()
                        || o.consecutive_local_origin_failures.is_some()
                }),
                "outlierDetection.consecutiveLocalOriginFailures",
                "connection failures count as 5xx and gateway errors",
            ),
            (
                outlier.is_some_and(|o| o.min_health_percent.is_some()),
                "outlierDetection.minHealthPercent",
                "ejection stops when fewer than half the endpoints would be left",
            ),
        ];
        for (_, path, instead) in fields.into_iter().filter(|(set, ..)| *set) {
            unread.add(&format!("{at}.{path}"), format!("not supported; {instead}"));
        }
    }
}

fn traffic_policy(errors: &mut Errors, field: &str, policy: &TrafficPolicy) {
    if let Some(pool) = &policy.connection_pool {
        if let Some(tcp) = &pool.tcp {
            errors.duration(
                &format!("{field}.connectionPool.tcp.connectTimeout"),
                tcp.connect_timeout.as_deref(),
                Duration::from_millis(1),
            );
            if let Some(keepalive) = &tcp.tcp_keepalive {
                for (name, value) in [("time", &keepalive.time), ("interval", &keepalive.interval)]
                {
                    errors.duration(
                        &format!("{field}.connectionPool.tcp.tcpKeepalive.{name}"),
                        value.as_deref(),
                        Duration::from_secs(1),
                    );
                }
            }
            if tcp.max_connections.is_some_and(|n| n < 0) {
                errors.add(
                    &format!("{field}.connectionPool.tcp.maxConnections"),
                    "0 or more",
                );
            }
        }
        if let Some(http) = &pool.http {
            for (name, value) in [
                ("http1MaxPendingRequests", http.http1_max_pending_requests),
                ("http2MaxRequests", http.http2_max_requests),
                ("maxRequestsPerConnection", http.max_requests_per_connection),
                ("maxRetries", http.max_retries),
            ] {
                if value.is_some_and(|n| n < 0) {
                    errors.add(&format!("{field}.connectionPool.http.{name}"), "0 or more");
                }
            }
            errors.duration(
                &format!("{field}.connectionPool.http.idleTimeout"),
                http.idle_timeout.as_deref(),
                Duration::from_millis(1),
            );
        }
    }
    if let Some(balancer) = &policy.load_balancer {
        load_balancer(errors, &format!("{field}.loadBalancer"), balancer);
    }
    if let Some(outlier) = &policy.outlier_detection {
        outlier_detection(errors, &format!("{field}.outlierDetection"), outlier);
    }
    if let Some(tls) = &policy.tls {
        client_tls(errors, &format!("{field}.tls"), tls);
    }
    if let Some(budget) = &policy.retry_budget {
        errors.percentage(&format!("{field}.retryBudget.percent"), budget.percent);
        errors.duration(
            &format!("{field}.retryBudget.budgetInterval"),
            budget.budget_interval.as_deref(),
            Duration::ZERO,
        );
    }
    for (i, port) in policy.port_level_settings.iter().enumerate() {
        let at = format!("{field}.portLevelSettings[{i}]");
        match &port.port {
            Some(p) => errors.port(&format!("{at}.port.number"), p.number),
            None => errors.add(&format!("{at}.port"), "name the port the settings are for"),
        }
        if let Some(balancer) = &port.load_balancer {
            load_balancer(errors, &format!("{at}.loadBalancer"), balancer);
        }
        if let Some(outlier) = &port.outlier_detection {
            outlier_detection(errors, &format!("{at}.outlierDetection"), outlier);
        }
        if let Some(tls) = &port.tls {
            client_tls(errors, &format!("{at}.tls"), tls);
        }
    }
}

/// `simple` or `consistentHash`, not both; a consistent hash with one key,
/// a cookie with a name and a valid TTL, a ring or a MAGLEV table (of a
/// prime size), not both.
fn load_balancer(errors: &mut Errors, field: &str, balancer: &LoadBalancerSettings) {
    let Some(hash) = &balancer.consistent_hash else {
        return;
    };
    let at = format!("{field}.consistentHash");
    if balancer.simple.is_some() {
        errors.add(
            field,
            "set either simple or consistentHash: consistent hashing is a policy of its own",
        );
    }
    let keys = [
        hash.http_header_name.is_some(),
        hash.http_cookie.is_some(),
        hash.use_source_ip.is_some(),
        hash.http_query_parameter_name.is_some(),
    ];
    if keys.iter().filter(|k| **k).count() != 1 {
        errors.add(
            &at,
            "hash on one key: httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName",
        );
    }
    if let Some(cookie) = &hash.http_cookie {
        if cookie.name.is_empty() {
            errors.add(&format!("{at}.httpCookie.name"), "name the cookie to hash");
        }
        errors.duration(
            &format!("{at}.httpCookie.ttl"),
            cookie.ttl.as_deref(),
            Duration::ZERO,
        );
        for (i, attribute) in cookie.attributes.iter().enumerate() {
            cookie_attribute(
                errors,
                &format!("{at}.httpCookie.attributes[{i}]"),
                attribute,
            );
        }
    }
    if hash.ring_hash.is_some() && hash.maglev.is_some() {
        errors.add(&at, "set either ringHash or maglev, not both");
    }
    let ring = hash
        .ring_hash
        .as_ref()
        .and_then(|r| r.minimum_ring_size)
        .or(hash.minimum_ring_size);
    if ring.is_some_and(|n| n == 0 || n > 8 * 1024 * 1024) {
        errors.add(
            &format!("{at}.ringHash.minimumRingSize"),
            "between 1 and 8388608 entries",
        );
    }
    if let Some(size) = hash.maglev.as_ref().and_then(|m| m.table_size)
        && !(is_prime(size) && size <= 5_000_011)
    {
        errors.add(
            &format!("{at}.maglev.tableSize"),
            format!("{size} is not a prime of at most 5000011 (65537 is the default)"),
        );
    }
}

/// A cookie attribute as RFC 6265 has them: a name, and a value, of
/// visible characters other than `;` (which would end the attribute).
fn cookie_attribute(errors: &mut Errors, field: &str, attribute: &CookieAttribute) {
    let visible = |text: &str| text.chars().all(|c| c != ';' && !c.is_control());
    let name = &attribute.name;
    if name.is_empty() || name.contains(|c: char| c == '=' || c.is_whitespace()) || !visible(name) {
        errors.add(
            &format!("{field}.name"),
            format!(
                "{:?} is not a cookie attribute's name: give one word such as SameSite or Secure",
                attribute.name
            ),
        );
    }
    if let Some(value) = &attribute.value
        && !visible(value)
    {
        errors.add(
            &format!("{field}.value"),
            format!("{value:?} may not hold ';' or control characters"),
        );
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn outlier_detection(errors: &mut Errors, field: &str, outlier: &OutlierDetection) {
    errors.duration(
        &format!("{field}.interval"),
        outlier.interval.as_deref(),
        Duration::from_millis(1),
    );
    errors.duration(
        &format!("{field}.baseEjectionTime"),
        outlier.base_ejection_time.as_deref(),
        Duration::from_millis(1),
    );
    for (name, value) in [
        ("maxEjectionPercent", outlier.max_ejection_percent),
        ("minHealthPercent", outlier.min_health_percent),
    ] {
        if value.is_some_and(|v| !(0..=100).contains(&v)) {
            errors.add(&format!("{field}.{name}"), "a percentage between 0 and 100");
        }
    }
}

fn client_tls(errors: &mut Errors, field: &str, tls: &ClientTlsSettings) {
    let has_files = tls.client_certificate.is_some() || tls.private_key.is_some();
    match tls.mode {
        ClientTlsMode::Mutual => {
            let files = tls.client_certificate.is_some() && tls.private_key.is_some();
            if !files && tls.credential_name.is_none() {
                errors.add(
                    field,
                    "MUTUAL needs the client's certificate: credentialName, or clientCertificate and privateKey",
                );
            }
        }
        ClientTlsMode::IstioMutual => {
            if has_files || tls.credential_name.is_some() || tls.ca_certificates.is_some() {
                errors.add(
                    field,
                    "ISTIO_MUTUAL uses the mesh's certificates: remove clientCertificate, privateKey, caCertificates and credentialName",
                );
            }
        }
        ClientTlsMode::Disable | ClientTlsMode::Simple => {
            if has_files {
                errors.add(
                    field,
                    "clientCertificate and privateKey are used only with mode MUTUAL",
                );
            }
        }
    }
}

pub fn gateway(spec: &GatewaySpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    if spec.servers.is_empty() {
        errors.add("spec.servers", "a gateway needs at least one server");
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, server) in spec.servers.iter().enumerate() {
        let field = format!("spec.servers[{i}]");
        errors.port(&format!("{field}.port.number"), server.port.number);
        let protocol = server.port.protocol.to_ascii_uppercase();
        if !PROTOCOLS.contains(&protocol.as_str()) {
            errors.add(
                &format!("{field}.port.protocol"),
                format!(
                    "{:?} is not a protocol: use one of {}",
                    server.port.protocol,
                    PROTOCOLS.join(", ")
                ),
            );
        }
        if !server.port.name.is_empty() && !names.insert(server.port.name.as_str()) {
            errors.add(
                &format!("{field}.port.name"),
                format!("port name {:?} is used twice", server.port.name),
            );
        }
        if server.hosts.is_empty() {
            errors.add(&format!("{field}.hosts"), "name at least one host");
        }
        for (j, h) in server.hosts.iter().enumerate() {
            // `namespace/host`: the VirtualServices of that namespace.
            let name = h.split_once('/').map_or(h.as_str(), |(_, host)| host);
            host(&mut errors, &format!("{field}.hosts[{j}]"), name);
        }
        let tls_protocol = matches!(protocol.as_str(), "HTTPS" | "TLS");
        match (&server.tls, tls_protocol) {
            (None, true) => errors.add(
                &format!("{field}.tls"),
                format!("a {protocol} server needs tls settings"),
            ),
            (Some(tls), _) => {
                let at = format!("{field}.tls");
                let key_material = tls.credential_name.is_some()
                    || !tls.credential_names.is_empty()
                    || (tls.server_certificate.is_some() && tls.private_key.is_some());
                match tls.mode {
                    Some(ServerTlsMode::Simple) | Some(ServerTlsMode::Mutual) if !key_material => {
                        errors.add(
                            &at,
                            "SIMPLE and MUTUAL need the server's certificate: credentialName, or serverCertificate and privateKey",
                        );
                    }
                    Some(ServerTlsMode::Mutual)
                        if tls.credential_name.is_none() && tls.ca_certificates.is_none() =>
                    {
                        errors.add(
                            &at,
                            "MUTUAL needs the CA that signs client certificates: credentialName (with ca.crt) or caCertificates",
                        );
                    }
                    None if tls_protocol && tls.https_redirect != Some(true) => errors.add(
                        &format!("{at}.mode"),
                        "set the TLS mode (SIMPLE, MUTUAL, PASSTHROUGH, …)",
                    ),
                    _ => {}
                }
            }
            (None, false) => {}
        }
    }
    errors.result()
}

/// The protocols a port may name.
const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "REDIS", "MYSQL", "TCP", "TLS",
];

pub fn service_entry(spec: &ServiceEntrySpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    if spec.hosts.is_empty() {
        errors.add("spec.hosts", "name at least one host");
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        host(&mut errors, &format!("spec.hosts[{i}]"), h);
        if h.starts_with('*')
            && matches!(
                spec.resolution,
                Some(Resolution::Dns) | Some(Resolution::DnsRoundRobin)
            )
        {
            errors.add(
                &format!("spec.hosts[{i}]"),
                "a wildcard host cannot be resolved by DNS: use resolution NONE",
            );
        }
    }
    let mut numbers = std::collections::BTreeSet::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        errors.port(&format!("{field}.number"), port.number);
        if !numbers.insert(port.number) {
            errors.add(
                &format!("{field}.number"),
                format!("port {} is listed twice", port.number),
            );
        }
        if !names.insert(port.name.as_str()) {
            errors.add(
                &format!("{field}.name"),
                format!("port name {:?} is used twice", port.name),
            );
        }
    }
    if spec.resolution == Some(Resolution::Static)
        && spec.endpoints.is_empty()
        && spec.workload_selector.is_none()
    {
        errors.add(
            "spec.endpoints",
            "resolution STATIC needs endpoints with addresses (or a workloadSelector)",
        );
    }
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        match (&endpoint.address, spec.resolution) {
            (None, _) => errors.add(&format!("{field}.address"), "an endpoint needs an address"),
            (Some(address), Some(Resolution::Static))
                if address.parse::<std::net::IpAddr>().is_err()
                    && !address.starts_with("unix://") =>
            {
                errors.add(
                    &format!("{field}.address"),
                    format!("{address:?} is not an IP address, which resolution STATIC needs"),
                );
            }
            _ => {}
        }
        for (name, port) in &endpoint.ports {
            if !spec.ports.iter().any(|p| &p.name == name) {
                errors.add(
                    &format!("{field}.ports.{name}"),
                    format!("no port of the ServiceEntry is named {name:?}"),
                );
            }
            errors.port(&format!("{field}.ports.{name}"), *port);
        }
    }
    if spec.location == Some(Location::MeshExternal) && spec.workload_selector.is_some() {
        errors.add(
            "spec.workloadSelector",
            "workloadSelector selects mesh workloads: use location MESH_INTERNAL",
        );
    }
    errors.result()
}

pub fn sidecar(spec: &SidecarSpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    for (i, egress) in spec.egress.iter().enumerate() {
        let field = format!("spec.egress[{i}]");
        if egress.hosts.is_empty() {
            errors.add(
                &format!("{field}.hosts"),
                "name at least one namespace/host",
            );
        }
        for (j, h) in egress.hosts.iter().enumerate() {
            if h.split_once('/').is_none() {
                errors.add(
                    &format!("{field}.hosts[{j}]"),
                    format!("{h:?} must be namespace/host, e.g. ./* or istio-system/*"),
                );
            }
        }
    }
    for (i, ingress) in spec.ingress.iter().enumerate() {
        errors.port(
            &format!("spec.ingress[{i}].port.number"),
            ingress.port.number,
        );
    }
    errors.result()
}

pub fn peer_authentication(spec: &PeerAuthenticationSpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    if !spec.port_level_mtls.is_empty()
        && spec
            .selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_empty())
    {
        errors.add(
            "spec.portLevelMtls",
            "port-level settings need a selector: ports belong to workloads",
        );
    }
    for key in spec.port_level_mtls.keys() {
        match key.parse::<u32>() {
            Ok(port) => errors.port(&format!("spec.portLevelMtls.{key}"), port),
            Err(_) => errors.add(
                &format!("spec.portLevelMtls.{key}"),
                "the key is a port number",
            ),
        }
    }
    errors.result()
}

pub fn authorization_policy(spec: &AuthorizationPolicySpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    match (spec.action, &spec.provider) {
        (Some(Action::Custom), None) => {
            errors.add("spec.provider", "a CUSTOM policy names its provider")
        }
        (action, Some(_)) if action != Some(Action::Custom) => errors.add(
            "spec.provider",
            "a provider is used only with action CUSTOM",
        ),
        _ => {}
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let s = &from.source;
            let lists = [
                &s.principals,
                &s.not_principals,
                &s.request_principals,
                &s.not_request_principals,
                &s.namespaces,
                &s.not_namespaces,
                &s.ip_blocks,
                &s.not_ip_blocks,
                &s.remote_ip_blocks,
                &s.not_remote_ip_blocks,
            ];
            if lists.iter().all(|l| l.is_empty()) {
                errors.add(
                    &format!("{field}.from[{j}].source"),
                    "an empty source matches nothing useful: name principals, namespaces or ipBlocks",
                );
            }
            for (name, blocks) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                for block in blocks {
                    if !is_cidr(block) {
                        errors.add(
                            &format!("{field}.from[{j}].source.{name}"),
                            format!("{block:?} is not an IP address or CIDR range"),
                        );
                    }
                }
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            for (name, ports) in [
                ("ports", &to.operation.ports),
                ("notPorts", &to.operation.not_ports),
            ] {
                for port in ports {
                    match port.parse::<u32>() {
                        Ok(p) => errors.port(&format!("{field}.to[{j}].operation.{name}"), p),
                        Err(_) => errors.add(
                            &format!("{field}.to[{j}].operation.{name}"),
                            format!("{port:?} is not a port number"),
                        ),
                    }
                }
            }
        }
        for (j, condition) in rule.when.iter().enumerate() {
            let at = format!("{field}.when[{j}]");
            if !CONDITION_KEYS
                .iter()
                .any(|k| condition.key == *k || condition.key.starts_with(&format!("{k}[")))
                && !condition.key.starts_with("experimental.")
            {
                errors.add(
                    &format!("{at}.key"),
                    format!("{:?} is not a condition key Istio knows (request.headers[<name>], source.ip, source.namespace, source.principal, request.auth.claims[<claim>], destination.port, connection.sni, …)", condition.key),
                );
            }
            if condition.values.is_empty() && condition.not_values.is_empty() {
                errors.add(&at, "set values or notValues");
            }
        }
    }
    errors.result()
}

const CONDITION_KEYS: &[&str] = &[
    "request.headers",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

fn is_cidr(text: &str) -> bool {
    match text.split_once('/') {
        None => text.parse::<std::net::IpAddr>().is_ok(),
        Some((address, bits)) => match (address.parse::<std::net::IpAddr>(), bits.parse::<u8>()) {
            (Ok(std::net::IpAddr::V4(_)), Ok(bits)) => bits <= 32,
            (Ok(std::net::IpAddr::V6(_)), Ok(bits)) => bits <= 128,
            _ => false,
        },
    }
}

pub fn request_authentication(spec: &RequestAuthenticationSpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        let field = format!("spec.jwtRules[{i}]");
        if rule.issuer.is_empty() {
            errors.add(&format!("{field}.issuer"), "name the issuer");
        }
        if rule.jwks_uri.is_some() && rule.jwks.is_some() {
            errors.add(&field, "set jwksUri or jwks, not both");
        }
        errors.duration(
            &format!("{field}.timeout"),
            rule.timeout.as_deref(),
            Duration::from_millis(1),
        );
    }
    errors.result()
}

/// Decodes an object of one of the Istio-compatible kinds and validates
/// it: what the `/validate` webhook and the model call. A kind it does not
/// know is not its to refuse.
pub fn object(kind: &str, object: &serde_json::Value) -> Result<(), Vec<FieldError>> {
    fn decode<T: serde::de::DeserializeOwned>(
        object: &serde_json::Value,
    ) -> Result<T, Vec<FieldError>> {
        serde_json::from_value(object.get("spec").cloned().unwrap_or_default()).map_err(|e| {
            vec![FieldError {
                field: "spec".into(),
                message: format!("does not read as this kind's spec: {e}"),
            }]
        })
    }
    match kind {
        "VirtualService" => virtual_service(&decode(object)?),
        "DestinationRule" => destination_rule(&decode(object)?),
        "Gateway" => gateway(&decode(object)?),
        "ServiceEntry" => service_entry(&decode(object)?),
        "Sidecar" => sidecar(&decode(object)?),
        "PeerAuthentication" => peer_authentication(&decode(object)?),
        "AuthorizationPolicy" => authorization_policy(&decode(object)?),
        "RequestAuthentication" => request_authentication(&decode(object)?),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn errors(kind: &str, spec: serde_json::Value) -> Vec<String> {
        match object(kind, &json!({"spec": spec})) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_samples_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples/istio");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
            for document in documents {
                let kind = document["kind"].as_str().unwrap().to_string();
                assert_eq!(object(&kind, &document), Ok(()), "{}", path.display());
            }
        }
    }

    #[test]
    fn weights_must_add_up_to_100() {
        let e = errors(
            "VirtualService",
            json!({"hosts": ["reviews"], "http": [{"route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20},
            ]}]}),
        );
        assert_eq!(
            e,
            [
                "spec.http[0].route: the destinations' weights add up to 110; they must add up to 100"
            ]
        );
    }

    #[test]
    fn durations_regexes_and_percentages_are_checked_by_field() {
        let e = errors(
            "VirtualService",
            json!({"hosts": ["ratings"], "http": [{
                "match": [{"uri": {"regex": "(unclosed"}}],
                "route": [{"destination": {"host": "ratings"}}],
                "timeout": "ten seconds",
                "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,sometimes"},
                "fault": {"delay": {"fixedDelay": "5s", "percentage": {"value": 250}}},
            }]}),
        );
        let fields: Vec<&str> = e.iter().map(|m| m.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "spec.http[0].match[0].uri.regex",
                "spec.http[0].timeout",
                "spec.http[0].retries.retryOn",
                "spec.http[0].fault.delay.percentage.value",
            ],
            "{e:#?}"
        );
    }

    #[test]
    fn a_route_has_one_action() {
        let e = errors(
            "VirtualService",
            json!({"hosts": ["a"], "http": [{
                "route": [{"destination": {"host": "a"}}],
                "redirect": {"uri": "/elsewhere"},
            }]}),
        );
        assert_eq!(
            e,
            ["spec.http[0]: set exactly one of route, redirect and directResponse"]
        );
    }

    #[test]
    fn tls_settings_must_go_together() {
        let e = errors(
            "DestinationRule",
            json!({"host": "db", "trafficPolicy": {"tls": {"mode": "MUTUAL"}}}),
        );
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("spec.trafficPolicy.tls: MUTUAL needs"),
            "{e:?}"
        );
        let e = errors(
            "Gateway",
            json!({"servers": [{"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["api.myapp.com"], "tls": {"mode": "SIMPLE"}}]}),
        );
        assert!(
            e[0].starts_with("spec.servers[0].tls: SIMPLE and MUTUAL need"),
            "{e:?}"
        );
    }

    #[test]
    fn a_consistent_hash_has_one_key_and_one_table() {
        let errors = |lb: serde_json::Value| -> Vec<String> {
            let spec: DestinationRuleSpec = serde_json::from_value(
                json!({"host": "reviews", "trafficPolicy": {"loadBalancer": lb}}),
            )
            .unwrap();
            destination_rule(&spec)
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|e| e.to_string())
                .collect()
        };
        assert!(errors(json!({"consistentHash": {"httpHeaderName": "x-user"}})).is_empty());
        assert!(
            errors(
                json!({"consistentHash": {"httpCookie": {"name": "s", "ttl": "0s"},
                "maglev": {"tableSize": 65537}}})
            )
            .is_empty()
        );
        let e = errors(json!({"simple": "RANDOM", "consistentHash": {"useSourceIp": true}}));
        assert!(
            e[0].starts_with("spec.trafficPolicy.loadBalancer: set either"),
            "{e:?}"
        );
        let e = errors(json!({"consistentHash": {"httpHeaderName": "x", "useSourceIp": true}}));
        assert!(
            e[0].starts_with("spec.trafficPolicy.loadBalancer.consistentHash: hash on one key"),
            "{e:?}"
        );
        let e = errors(
            json!({"consistentHash": {"httpHeaderName": "x", "maglev": {"tableSize": 1000}}}),
        );
        assert!(e[0].starts_with("spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: 1000 is not a prime"), "{e:?}");
        let e = errors(json!({"consistentHash": {"httpCookie": {"name": ""}}}));
        assert!(
            e[0].starts_with("spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name"),
            "{e:?}"
        );
        let cookie = |attributes| json!({"consistentHash": {"httpCookie": {"name": "s", "ttl": "0s", "attributes": attributes}}});
        assert!(
            errors(cookie(
                json!([{"name": "SameSite", "value": "None"}, {"name": "Secure"}])
            ))
            .is_empty()
        );
        let e = errors(cookie(
            json!([{"name": "Secure"}, {"name": "SameSite=None"}]),
        ));
        assert!(
            e[0].starts_with("spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[1].name: \"SameSite=None\" is not"),
            "{e:?}"
        );
        let e = errors(cookie(json!([{"name": "Domain", "value": "a; Secure"}])));
        assert!(
            e[0].starts_with(
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[0].value"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn fields_read_but_not_acted_on_are_named() {
        let spec: DestinationRuleSpec = serde_json::from_value(json!({"host": "reviews",
            "trafficPolicy": {
                "loadBalancer": {"localityLbSetting": {"enabled": true}},
                "connectionPool": {"tcp": {"maxConnections": 10, "maxConnectionDuration": "1h"}},
                "retryBudget": {"percent": 25.0, "budgetInterval": "10s"},
                "portLevelSettings": [{"port": {"number": 9080},
                    "loadBalancer": {"simple": "RANDOM", "warmupDurationSecs": "30s"}}],
            },
            "subsets": [{"name": "v1", "labels": {"version": "v1"},
                "trafficPolicy": {"outlierDetection": {"minHealthPercent": 50}}}],
        }))
        .unwrap();
        let fields: Vec<String> = destination_rule_unread(&spec)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.trafficPolicy.retryBudget.budgetInterval",
                "spec.trafficPolicy.loadBalancer.localityLbSetting",
                "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration",
                "spec.trafficPolicy.portLevelSettings[0].loadBalancer.warmupDurationSecs",
                "spec.subsets[0].trafficPolicy.outlierDetection.minHealthPercent",
            ]
        );
        let plain: DestinationRuleSpec = serde_json::from_value(json!({"host": "reviews",
            "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"},
                "connectionPool": {"http": {"idleTimeout": "30s", "maxRetries": 3}}}}))
        .unwrap();
        assert!(destination_rule_unread(&plain).is_empty());
    }

    #[test]
    fn a_retry_budget_is_a_percentage() {
        let e = errors(
            "DestinationRule",
            json!({"host": "db", "trafficPolicy": {"retryBudget": {"percent": 150.0}},
                   "subsets": [{"name": "v1", "trafficPolicy": {"retryBudget": {"percent": 20.0, "minRetryConcurrency": 1}}}]}),
        );
        assert_eq!(
            e,
            ["spec.trafficPolicy.retryBudget.percent: 150 is not a percentage between 0 and 100"]
        );
    }

    #[test]
    fn policies_are_checked_by_field() {
        let e = errors(
            "AuthorizationPolicy",
            json!({"action": "CUSTOM", "rules": [{
                "from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}],
                "to": [{"operation": {"ports": ["http"]}}],
                "when": [{"key": "request.colour", "values": ["red"]}],
            }]}),
        );
        let fields: Vec<&str> = e.iter().map(|m| m.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "spec.provider",
                "spec.rules[0].from[0].source.ipBlocks",
                "spec.rules[0].to[0].operation.ports",
                "spec.rules[0].when[0].key",
            ]
        );
        let e = errors(
            "PeerAuthentication",
            json!({"portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
        );
        assert_eq!(
            e,
            ["spec.portLevelMtls: port-level settings need a selector: ports belong to workloads"]
        );
    }

    #[test]
    fn service_entries_are_checked_by_field() {
        let e = errors(
            "ServiceEntry",
            json!({"hosts": ["*.example.com"], "resolution": "DNS", "ports": [
                {"number": 443, "name": "https"}, {"number": 443, "name": "tls"}]}),
        );
        let fields: Vec<&str> = e.iter().map(|m| m.split(':').next().unwrap()).collect();
        assert_eq!(fields, ["spec.hosts[0]", "spec.ports[1].number"]);
    }
}
