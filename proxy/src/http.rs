//! One HTTP request through the proxy: the route table of the listener's
//! HTTP connection manager, the virtual host for the authority, the first
//! matching route, then its action — forward to a cluster's endpoint,
//! redirect, or answer directly — with the route's faults injected first,
//! and its retries, per-try timeout and mirrors on the way. Failures
//! answer as Envoy does, with its response flags: 404 NR (no route), 503
//! NC (no cluster), UH (no healthy endpoint), UF (connection failure), UR
//! (reset), UO (circuit breaker), 504 UT (timeout), FI (injected abort).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use backon::{BackoffBuilder, ExponentialBuilder};
use http_body::Body as _;

use crate::model::Snapshot;
use crate::model::hash::{Hashed, request_hash};
use crate::model::listener::{HttpManager, RouteSource};
use crate::model::rbac::{Asked, Subject, Verdict};
use crate::model::resilience::{Abort, Attempt, Fault};
use crate::model::route::{Action, Forward, Route, split_port};
use crate::pool::{Answer, Failure};
use crate::telemetry::Telemetry;
use crate::telemetry::access_log::{Head, Pending};
use crate::telemetry::metrics::{
    Completed, Flags, Peers, Protocol, Recorded, RequestLabels, grpc_status, header_bytes,
};
use crate::telemetry::peer::{Exchange, Interned, Service};
use crate::telemetry::trace::{Kind, Open};
use crate::upstream::{Admission, Body, ClusterState, Host, HostGuard, Outcome, Reach, Upstreams};

/// Why a request did not get an upstream's answer: Envoy's response flags
/// NR, NC, UH, UF, UR, UT, UO and FI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    NoRoute,
    NoCluster,
    NoHealthyUpstream,
    UpstreamConnectionFailure,
    UpstreamReset,
    UpstreamTimeout,
    /// A circuit breaker was full.
    Overflow,
    FaultAbort(Abort),
    /// The client went away before its request was read.
    DownstreamTermination,
    /// An authorization policy said no.
    Denied,
}

impl Flag {
    /// Its response flag in the metrics.
    fn flags(self) -> Flags {
        match self {
            Flag::NoRoute => Flags::NO_ROUTE,
            Flag::NoCluster => Flags::NO_CLUSTER,
            Flag::NoHealthyUpstream => Flags::NO_HEALTHY_UPSTREAM,
            Flag::UpstreamConnectionFailure => Flags::UPSTREAM_CONNECTION_FAILURE,
            Flag::UpstreamReset => Flags::UPSTREAM_RESET,
            Flag::UpstreamTimeout => Flags::UPSTREAM_TIMEOUT,
            Flag::Overflow => Flags::OVERFLOW,
            Flag::FaultAbort(_) => Flags::FAULT_ABORT,
            Flag::DownstreamTermination => Flags::DOWNSTREAM_TERMINATION,
            Flag::Denied => Flags::DENIED,
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Flag::NoRoute => StatusCode::NOT_FOUND,
            Flag::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Flag::FaultAbort(Abort::Http(status)) => status,
            Flag::FaultAbort(Abort::Grpc(_)) => StatusCode::OK,
            Flag::DownstreamTermination => StatusCode::BAD_REQUEST,
            Flag::Denied => StatusCode::FORBIDDEN,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn body(self) -> &'static str {
        match self {
            Flag::NoRoute => "",
            Flag::NoCluster => "no cluster",
            Flag::NoHealthyUpstream => "no healthy upstream",
            Flag::UpstreamConnectionFailure | Flag::UpstreamReset => {
                "upstream connect error or disconnect/reset before headers"
            }
            Flag::UpstreamTimeout => "upstream request timeout",
            Flag::Overflow => {
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            }
            Flag::FaultAbort(Abort::Http(_)) => "fault filter abort",
            Flag::FaultAbort(Abort::Grpc(_)) => "",
            Flag::DownstreamTermination => "downstream disconnected",
            Flag::Denied => "RBAC: access denied",
        }
    }

    /// The answer the proxy makes itself.
    fn reply(self) -> Response<Body> {
        let mut response = local_reply(self.status(), self.body());
        match self {
            Flag::Overflow => {
                response
                    .headers_mut()
                    .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            }
            Flag::FaultAbort(Abort::Grpc(code)) => {
                let headers = response.headers_mut();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                headers.insert("grpc-status", HeaderValue::from(code));
                headers.insert(
                    "grpc-message",
                    HeaderValue::from_static("fault filter abort"),
                );
            }
            _ => {}
        }
        response
    }
}

/// What every request on one HTTP connection shares: its filter chain's
/// HTTP connection manager (chosen when it was accepted) and its ends.
/// The configuration is not: each request is served on the latest when it
/// arrived ([`serve`]).
#[derive(Debug)]
pub struct Connection {
    pub manager: Arc<HttpManager>,
    pub upstreams: Arc<Upstreams>,
    pub telemetry: Arc<Telemetry>,
    /// Whether requests arrive for this proxy's workload: it reports them
    /// as their destination and learns the caller from its headers.
    pub inbound: bool,
    /// The connection's ends, for access logs.
    pub local: std::net::SocketAddr,
    pub peer: std::net::SocketAddr,
    /// Where a captured connection was going: the endpoint of ORIGINAL_DST
    /// clusters (PassthroughCluster). Requests on connections that were
    /// not captured cannot use them (they would come back to the proxy).
    pub original_destination: Option<std::net::SocketAddr>,
    /// Who is at each end when the connection came over TLS.
    pub session: Option<crate::tls::Session>,
}

pub(crate) const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// What the way through the proxy tells the metrics.
#[derive(Default)]
struct Report {
    service: Option<Interned<Service>>,
    flags: Flags,
    /// What only access logs need, gathered when there are any.
    log: Option<Box<Pending>>,
    /// The endpoint the last attempt went to.
    endpoint: Option<Arc<Host>>,
    /// The request's span, when it is sampled.
    span: Option<Box<Open>>,
}

/// Where a request is served: the connection it came on, and the
/// configuration of the moment it arrived — so routes, clusters and
/// endpoints pushed after its connection opened apply to it, as Envoy's
/// route and cluster updates reach open connections, and a request in
/// flight finishes on the configuration it started with.
#[derive(Clone, Copy)]
struct On<'a> {
    connection: &'a Connection,
    snapshot: &'a Snapshot,
}

/// Serves one request on `snapshot`; never fails (errors are answers).
/// Its metrics are recorded when the response's body ends.
pub async fn serve(
    connection: Arc<Connection>,
    snapshot: Arc<Snapshot>,
    mut request: Request<Incoming>,
) -> Result<Response<Recorded<Body>>, Infallible> {
    let started = std::time::Instant::now();
    let telemetry = &connection.telemetry;
    let exchange = &telemetry.exchange;
    let caller = if connection.inbound {
        exchange.receive(request.headers_mut())
    } else {
        None
    };
    let protocol = match request.headers().get(http::header::CONTENT_TYPE) {
        Some(t) if t.as_bytes().starts_with(b"application/grpc") => Protocol::Grpc,
        _ => Protocol::Http,
    };
    let request_bytes = header_bytes(request.headers())
        + http_body::Body::size_hint(request.body())
            .exact()
            .unwrap_or(0);
    // Envoy's request id, which access logs and traces join on, and
    // which applications pass along.
    if !request.headers().contains_key(REQUEST_ID) {
        let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        let mut text = uuid::Uuid::encode_buffer();
        if let Ok(value) = HeaderValue::from_str(id.hyphenated().encode_lower(&mut text)) {
            request.headers_mut().insert(REQUEST_ID, value);
        }
    }
    let authority = Authority::of(&request);
    let authority = authority.as_ref().map(Authority::as_str);
    let mut report = Report::default();
    if let Some(tracing) = &connection.manager.tracing {
        let kind = if connection.inbound {
            Kind::Server
        } else {
            Kind::Client
        };
        report.span = tracing.start(&mut request, kind, authority, connection.peer);
    }
    let logs = &connection.manager.access_logs;
    if !logs.is_empty() {
        report.log = Some(Box::new(Pending {
            logs: Arc::clone(logs),
            started: std::time::SystemTime::now(),
            head: Head {
                method: request.method().clone(),
                uri: request.uri().clone(),
                version: request.version(),
                headers: request.headers().clone(),
            },
            response: http::HeaderMap::new(),
            upstream_host: None,
            upstream_cluster: None,
            route_name: None,
            downstream_local: connection.local,
            downstream_remote: connection.peer,
        }));
    }
    let response = match authority {
        _ if !authorized(&connection, &request) => Err(Flag::Denied),
        Some(authority) => {
            let on = On {
                connection: &connection,
                snapshot: &snapshot,
            };
            proxy(on, request, authority, &mut report).await
        }
        None => Err(Flag::NoRoute),
    };
    let response = response.unwrap_or_else(|flag| {
        report.flags.set(flag.flags());
        flag.reply()
    });
    let (mut parts, body) = response.into_parts();
    // The caller is answered with who this proxy is; the callee has said
    // who it is in its answer.
    let peer = if connection.inbound {
        if caller.is_some() {
            exchange.announce(&mut parts.headers);
        }
        caller
    } else {
        exchange.receive(&mut parts.headers)
    };
    // A request whose cluster names no service (no route, no cluster,
    // denied) is labelled by its Host on a sidecar's outbound side only:
    // inbound and on a gateway, where any client picks its Host, it is
    // `unknown` — Istio's `disable_host_header_fallback` there — so that
    // clients cannot add metric series at will.
    let service = report.service.unwrap_or_else(|| match authority {
        Some(authority) if !connection.inbound && !telemetry.gateway => {
            Service::of_authority(authority)
        }
        _ => Service::unknown(),
    });
    // Inbound, the TLS the caller came over; outbound, the TLS of the
    // connection the answer came on (the connector marks its responses).
    let session = if connection.inbound {
        connection.session.as_ref()
    } else {
        parts.extensions.get::<crate::tls::Session>()
    };
    let peers = Peers::seen_by(
        connection.inbound,
        exchange.own.clone(),
        peer,
        service,
        session,
    );
    let completed = Completed {
        labels: RequestLabels {
            peers,
            protocol,
            code: parts.status.as_u16(),
            grpc_status: match protocol {
                Protocol::Grpc => grpc_status(&parts.headers),
                Protocol::Http => None,
            },
            flags: report.flags,
        },
        started,
        request_bytes,
        response_bytes: header_bytes(&parts.headers),
    };
    if report.span.is_some() || report.log.is_some() {
        let endpoint = report.endpoint.map(|host| host.address.to_string());
        if let Some(span) = &mut report.span
            && let Some(endpoint) = &endpoint
        {
            span.endpoint(endpoint);
        }
        if let Some(log) = &mut report.log {
            log.response = parts.headers.clone();
            log.upstream_host = endpoint;
        }
    }
    let body = Recorded::new(
        body,
        Arc::clone(telemetry),
        completed,
        report.log,
        report.span,
    );
    Ok(Response::from_parts(parts, body))
}

async fn proxy(
    on: On<'_>,
    request: Request<Incoming>,
    authority: &str,
    report: &mut Report,
) -> Result<Response<Body>, Flag> {
    let On {
        connection,
        snapshot,
    } = on;
    let table = match &connection.manager.routes {
        RouteSource::Inline(table) => Arc::clone(table),
        RouteSource::Rds(name) => snapshot.routes.get(name).cloned().ok_or(Flag::NoRoute)?,
    };
    let host = table.find_host(authority).ok_or(Flag::NoRoute)?;
    let route = host
        .find_route(request.method(), request.uri(), request.headers())
        .ok_or(Flag::NoRoute)?;
    if let Some(log) = &mut report.log {
        log.route_name = Some(route.name.clone());
    }
    if let Some(span) = &mut report.span
        && let Some(operation) = &route.operation
    {
        span.name(operation);
    }
    match &route.action {
        Action::Respond { status, body } => {
            let mut response = local_reply(*status, "");
            if let Some(body) = body {
                *response.body_mut() = full(body.clone());
            }
            route.headers.response.apply(response.headers_mut());
            host.headers.response.apply(response.headers_mut());
            Ok(response)
        }
        Action::Redirect(redirect) => {
            let (status, location) = redirect.location(route, "http", authority, request.uri());
            let mut response = local_reply(status, "");
            if let Ok(location) = HeaderValue::from_str(&location) {
                response
                    .headers_mut()
                    .insert(http::header::LOCATION, location);
            }
            Ok(response)
        }
        Action::Forward(forward) => {
            if let Some(fault) = &route.fault {
                Box::pin(inject(fault, &mut report.flags)).await?;
            }
            let mut response = send(on, host, route, forward, request, authority, report).await?;
            route.headers.response.apply(response.headers_mut());
            host.headers.response.apply(response.headers_mut());
            Ok(response)
        }
    }
}

/// The route's faults: a delay, then perhaps an abort, each for its share
/// of requests.
async fn inject(fault: &Fault, flags: &mut Flags) -> Result<(), Flag> {
    let roll = || rand::random_range(0..1_000_000);
    if let Some((delay, share)) = fault.delay
        && share.hit(roll())
    {
        flags.set(Flags::DELAY_INJECTED);
        tokio::time::sleep(delay).await;
    }
    match fault.abort {
        Some((abort, share)) if share.hit(roll()) => Err(Flag::FaultAbort(abort)),
        _ => Ok(()),
    }
}

/// The largest request body kept for retries and mirrors; larger or
/// unsized bodies stream through once.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// A request body: kept whole (sent again on a retry, copied to mirrors)
/// or streamed once.
enum RequestBody {
    Kept(Bytes),
    Once(Option<Incoming>),
}

impl RequestBody {
    async fn read(body: Incoming, headers: &http::HeaderMap, keep: bool) -> Result<Self, Flag> {
        let small = body.is_end_stream()
            || headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .is_some_and(|n| n <= REPLAY_LIMIT);
        if !(keep && small) {
            return Ok(Self::Once(Some(body)));
        }
        let bytes = body
            .collect()
            .await
            .map_err(|_| Flag::DownstreamTermination)?
            .to_bytes();
        Ok(Self::Kept(bytes))
    }

    fn kept(&self) -> Option<&Bytes> {
        match self {
            Self::Kept(bytes) => Some(bytes),
            Self::Once(_) => None,
        }
    }

    /// The body for the next attempt.
    fn next(&mut self) -> Body {
        match self {
            Self::Kept(bytes) => full(bytes.clone()),
            Self::Once(body) => match body.take() {
                Some(body) => body.boxed(),
                None => full(Bytes::new()),
            },
        }
    }
}

/// The request as it goes upstream, before an endpoint is chosen.
struct Upstream {
    method: http::Method,
    path: PathAndQuery,
    headers: http::HeaderMap,
}

impl Upstream {
    /// The request to `host` with `headers`: origin-form over HTTP/1.1,
    /// absolute over HTTP/2 (`https` when `secure`).
    fn request(
        &self,
        host: &Host,
        h2: bool,
        secure: bool,
        headers: http::HeaderMap,
        body: Body,
    ) -> Result<Request<Body>, Flag> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = if h2 {
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(if secure { Scheme::HTTPS } else { Scheme::HTTP });
            uri.authority = Some(host.authority.clone());
            uri.path_and_query = Some(self.path.clone());
            Uri::from_parts(uri).map_err(|_| Flag::UpstreamConnectionFailure)?
        } else {
            Uri::from(self.path.clone())
        };
        *request.headers_mut() = headers;
        Ok(request)
    }
}

async fn send(
    on: On<'_>,
    host: &crate::model::route::VirtualHost,
    route: &Route,
    forward: &Forward,
    mut request: Request<Incoming>,
    authority: &str,
    report: &mut Report,
) -> Result<Response<Body>, Flag> {
    // A WebSocket (or other HTTP/1.1 upgrade): its Upgrade header goes
    // upstream, and a 101 joins the two connections.
    let upgrade = upgrade_of(&request);
    let downstream_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
    let (cluster_name, weighted_headers) = forward
        .destinations
        .pick(|total| rand::random_range(0..total))
        .ok_or(Flag::NoCluster)?;
    let On {
        connection,
        snapshot,
    } = on;
    let cluster = snapshot.clusters.get(cluster_name).ok_or(Flag::NoCluster)?;
    report.service.clone_from(&cluster.service);
    if let Some(log) = &mut report.log {
        log.upstream_cluster = Some(cluster.name.clone());
    }
    if let Some(span) = &mut report.span {
        span.cluster(&cluster.name);
    }
    let upstream = connection.upstreams.get(cluster);
    let reach = Reach::of(snapshot, cluster, connection.original_destination)
        .ok_or(Flag::NoHealthyUpstream)?;

    let (mut parts, body) = request.into_parts();
    // Hashed only for a cluster that chooses by hash (which may make up a
    // cookie to set on the answer).
    let hashed = if forward.hash_policy.is_empty() || !cluster.lb.is_consistent() {
        Hashed::default()
    } else {
        request_hash(
            &forward.hash_policy,
            &parts.headers,
            parts.uri.query(),
            (connection.peer, connection.local),
        )
    };
    let h2 = upgrade.is_none() && upstream.speaks_h2(parts.version == Version::HTTP_2);
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let path = match forward.rewrite_path(route, path_and_query.as_str()) {
        Some(rewritten) => {
            PathAndQuery::try_from(rewritten).map_err(|_| Flag::UpstreamConnectionFailure)?
        }
        None => path_and_query,
    };
    let host_header = match &forward.host_rewrite {
        Some(rewrite) => Some(rewrite.clone()),
        // The one Host the request came with goes on as it is.
        None if only_host_is(&parts.headers, authority) => None,
        None => Some(HeaderValue::from_str(authority).map_err(|_| Flag::NoRoute)?),
    };
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = upgrade {
        parts.headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        parts.headers.insert(http::header::UPGRADE, protocol);
    }
    if let Some(host_header) = host_header {
        parts.headers.insert(HOST, host_header);
    }
    if let Some(ops) = weighted_headers {
        ops.request.apply(&mut parts.headers);
    }
    route.headers.request.apply(&mut parts.headers);
    host.headers.request.apply(&mut parts.headers);
    let head = Upstream {
        method: parts.method,
        path,
        headers: parts.headers,
    };

    let attempts = async {
        let keep = forward.retry.is_some() || !forward.mirrors.is_empty();
        let mut body = RequestBody::read(body, &head.headers, keep).await?;
        if let Some(bytes) = body.kept() {
            for mirror in &forward.mirrors {
                if mirror.share.hit(rand::random_range(0..1_000_000)) {
                    shadow(on, &mirror.cluster, &head, authority, bytes.clone());
                }
            }
        }
        // The caller is announced to mesh endpoints, except by the
        // sidecar's inbound side, whose upstream is its own workload.
        let announce = (!connection.inbound).then_some(&connection.telemetry.exchange);
        let plan = Plan {
            upstream: &upstream,
            reach: &reach,
            forward,
            head,
            h2,
            hash: hashed.hash,
            announce,
        };
        attempt(plan, &mut body, &mut report.endpoint).await
    };
    // Pinned where it is: the timeout takes a reference, not the future
    // (kilobytes, moved on every request otherwise).
    let attempts = std::pin::pin!(attempts);
    let mut response = match forward.timeout {
        Some(timeout) => tokio::time::timeout(timeout, attempts)
            .await
            .unwrap_or(Err(Flag::UpstreamTimeout)),
        None => attempts.await,
    }?;
    if let Some(cookie) = hashed.set_cookie {
        response
            .headers_mut()
            .append(http::header::SET_COOKIE, cookie);
    }
    if let Some(downstream) = downstream_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(tunnel(downstream, upstream));
    }
    Ok(response)
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection:
/// upgrade` with `Upgrade: websocket`), which Istio's sidecars let
/// through.
fn upgrade_of<B>(request: &Request<B>) -> Option<HeaderValue> {
    let asks = request.version() == Version::HTTP_11
        && connection_options(request.headers()).any(|o| o.eq_ignore_ascii_case("upgrade"));
    asks.then(|| request.headers().get(http::header::UPGRADE).cloned())
        .flatten()
}

/// Once both sides have switched protocols, copies bytes between them
/// until either closes.
async fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let mut downstream = hyper_util::rt::TokioIo::new(downstream);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        tracing::debug!(%error, "upgraded connection ended");
    }
}

/// Where a request's attempts go, and how.
struct Plan<'a> {
    upstream: &'a Arc<ClusterState>,
    reach: &'a Reach,
    forward: &'a Forward,
    head: Upstream,
    /// HTTP/2 to the endpoint.
    h2: bool,
    /// The request's hash, for a cluster that chooses by it.
    hash: Option<u64>,
    /// Tells mesh endpoints who calls.
    announce: Option<&'a Exchange>,
}

/// Tries the request on the cluster's endpoints: once, or again as the
/// route's retry policy says (on another endpoint when it asks, after a
/// jittered backoff, while the retry circuit breaker allows).
async fn attempt(
    plan: Plan<'_>,
    body: &mut RequestBody,
    chosen: &mut Option<Arc<Host>>,
) -> Result<Response<Body>, Flag> {
    let Plan {
        upstream,
        reach,
        forward,
        mut head,
        h2,
        hash,
        announce,
    } = plan;
    // A body that streams once cannot be sent twice.
    let policy = forward.retry.as_ref().filter(|_| body.kept().is_some());
    let mut retries_left = policy.map_or(0, |p| p.retries);
    let mut backoff = policy.map(|p| {
        ExponentialBuilder::default()
            .with_min_delay(p.base_interval)
            .with_max_delay(p.max_interval)
            .with_jitter()
            .without_max_times()
            .build()
    });
    let mut tried: Vec<Arc<Host>> = Vec::new();
    let mut _retry = None;
    loop {
        let avoid = if policy.is_some_and(|p| p.other_hosts) {
            tried.as_slice()
        } else {
            &[]
        };
        let target = upstream
            .choose(reach, avoid, hash)
            .ok_or(Flag::NoHealthyUpstream)?;
        *chosen = Some(Arc::clone(&target));
        let admission = upstream.admit(h2).await.map_err(|_| Flag::Overflow)?;
        let in_flight = target.start();
        let secure = upstream.config.tls_for(target.mesh).is_some();
        // The headers go with the last attempt; earlier ones send copies.
        let headers = if retries_left > 0 {
            head.headers.clone()
        } else {
            std::mem::take(&mut head.headers)
        };
        let mut request = head.request(&target, h2, secure, headers, body.next())?;
        if let Some(exchange) = announce.filter(|_| target.mesh) {
            exchange.announce(request.headers_mut());
        }
        let result = {
            let call = std::pin::pin!(upstream.send(&target, h2, request));
            match policy.and_then(|p| p.per_try_timeout) {
                Some(limit) => match tokio::time::timeout(limit, call).await {
                    Ok(result) => result.map_err(|error| classify(&error, &target)),
                    Err(_) => Err(Attempt::TimedOut),
                },
                None => call.await.map_err(|error| classify(&error, &target)),
            }
        };
        let (outcome, ended) = match &result {
            Ok(response) => {
                let status = response.status();
                // Only a retry policy's gRPC conditions read it.
                let grpc = policy
                    .and_then(|_| grpc_status(response.headers()))
                    .map(u32::from);
                let outcome = if status.is_server_error() {
                    Outcome::ServerError(status.as_u16())
                } else {
                    Outcome::Success
                };
                (outcome, Attempt::Answered(status, grpc))
            }
            Err(attempt) => (Outcome::LocalFailure, *attempt),
        };
        upstream.record(&target, outcome);
        let again = retries_left > 0 && policy.is_some_and(|p| p.retries_on(ended)) && {
            _retry = upstream.admit_retry();
            _retry.is_some()
        };
        if !again {
            return match result {
                Ok(response) => Ok(response.map(|body| {
                    Guarded {
                        body,
                        _guards: (admission, in_flight),
                    }
                    .boxed()
                })),
                Err(Attempt::ConnectFailure) => Err(Flag::UpstreamConnectionFailure),
                Err(Attempt::TimedOut) => Err(Flag::UpstreamTimeout),
                Err(_) => Err(Flag::UpstreamReset),
            };
        }
        retries_left -= 1;
        tried.push(target);
        drop((result, admission, in_flight));
        if let Some(delay) = backoff.as_mut().and_then(Iterator::next) {
            tokio::time::sleep(delay).await;
        }
    }
}

fn classify(failure: &Failure, host: &Host) -> Attempt {
    match failure {
        Failure::Connect(error) => {
            tracing::debug!(%error, endpoint = %host.address, "upstream connection failed");
            Attempt::ConnectFailure
        }
        Failure::Reset(error) => {
            let cause = std::error::Error::source(error).map(ToString::to_string);
            tracing::debug!(%error, ?cause, endpoint = %host.address, "upstream request failed");
            Attempt::Reset
        }
    }
}

/// Sends a copy of the request to `cluster` with the authority suffixed
/// `-shadow`, as Envoy does; its answer is dropped.
fn shadow(on: On<'_>, cluster: &str, head: &Upstream, authority: &str, body: Bytes) {
    let On {
        connection,
        snapshot,
    } = on;
    let Some(cluster) = snapshot.clusters.get(cluster) else {
        return;
    };
    let Some(endpoints) = snapshot.endpoints_of(cluster) else {
        return;
    };
    let upstream = connection.upstreams.get(cluster);
    let Some(target) = upstream.pick(&endpoints, &[]) else {
        return;
    };
    let secure = cluster.tls_for(target.mesh).is_some();
    let h2 = upstream.speaks_h2(false);
    let Ok(mut request) = head.request(&target, h2, secure, head.headers.clone(), full(body))
    else {
        return;
    };
    let host = match split_port(authority) {
        (host, Some(port)) => format!("{host}-shadow:{port}"),
        (host, None) => format!("{host}-shadow"),
    };
    if let Ok(host) = HeaderValue::from_str(&host) {
        request.headers_mut().insert(HOST, host);
    }
    tokio::spawn(async move {
        let _in_flight = target.start();
        if let Ok(Ok(response)) =
            tokio::time::timeout(SHADOW_TIMEOUT, upstream.send(&target, h2, request)).await
        {
            let _ = response.into_body().collect().await;
        }
    });
}

/// How long a mirrored request may take.
const SHADOW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// An upstream response body holding what the request occupies — its
/// circuit-breaker admission and its count at the endpoint — until it is
/// read or dropped.
struct Guarded {
    body: Answer,
    _guards: (Admission, HostGuard),
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether `headers` have one Host, and it is `authority`.
fn only_host_is(headers: &http::HeaderMap, authority: &str) -> bool {
    let mut hosts = headers.get_all(HOST).iter();
    hosts.next().is_some_and(|h| h == authority) && hosts.next().is_none()
}

/// The request's authority: `:authority` (HTTP/2, absolute URIs), else
/// `Host` — held as the request has it, not copied.
enum Authority {
    Uri(http::uri::Authority),
    Host(HeaderValue),
}

impl Authority {
    fn of<B>(request: &Request<B>) -> Option<Self> {
        match request.uri().authority() {
            Some(authority) => Some(Self::Uri(authority.clone())),
            None => request
                .headers()
                .get(HOST)
                .filter(|h| h.to_str().is_ok())
                .cloned()
                .map(Self::Host),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Self::Uri(authority) => authority.as_str(),
            // Only a Host that is text is kept.
            Self::Host(host) => host.to_str().unwrap_or_default(),
        }
    }
}

/// The options the Connection header lists (RFC 9110 7.6.1).
fn connection_options(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Headers that describe one connection, not the request (RFC 9110 7.6.1),
/// and the headers the Connection header names.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    const HOP_BY_HOP: [http::HeaderName; 6] = [
        http::header::CONNECTION,
        http::header::PROXY_AUTHENTICATE,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
        http::HeaderName::from_static("keep-alive"),
        http::HeaderName::from_static("proxy-connection"),
    ];
    // Most requests have none: one look at their few names is cheaper
    // than a lookup of each.
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(name) || name == http::header::TE)
    {
        return;
    }
    let named: Vec<http::HeaderName> = connection_options(headers)
        .filter_map(|name| http::HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // TE survives only as "trailers", which gRPC needs.
    if headers
        .get(http::header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(http::header::TE);
    }
}

/// Whether the connection's RBAC filters (its AuthorizationPolicies) let
/// the request through: each in turn, the first denial final.
fn authorized(connection: &Connection, request: &Request<Incoming>) -> bool {
    let filters = &connection.manager.rbac;
    if filters.is_empty() {
        return true;
    }
    let session = connection.session.as_ref();
    let subject = Subject {
        request: Some(Asked {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
        }),
        principal: session.and_then(|s| s.peer.as_deref()),
        authenticated: session.is_some_and(|s| s.mutual),
        peer: connection.peer,
        local: connection.local,
    };
    for filter in filters.iter() {
        if let Verdict::Denied(policy) = filter.judge(&subject) {
            tracing::debug!(
                policy = policy.as_deref().unwrap_or("none"),
                principal = subject.principal.unwrap_or("-"),
                method = %request.method(),
                path = request.uri().path(),
                "rbac_access_denied_matched_policy"
            );
            return false;
        }
    }
    true
}

pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// An answer the proxy makes itself.
pub fn local_reply(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    if !body.is_empty() {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
    }
    response
}
