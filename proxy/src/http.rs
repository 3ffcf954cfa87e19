//! One HTTP request through the proxy: the route table of the listener's
//! HTTP connection manager, the virtual host for the authority, the first
//! matching route, then its action — forward to a cluster's endpoint,
//! redirect, or answer directly. Failures answer as Envoy does, with its
//! response flags: 404 NR (no route), 503 NC (no cluster), UH (no healthy
//! endpoint), UF (connection failure), 504 UT (timeout).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::model::Snapshot;
use crate::model::cluster::Target;
use crate::model::listener::{HttpManager, RouteSource};
use crate::model::route::{Action, Forward, Route};
use crate::upstream::{Body, Upstreams};

/// Why a request did not get an upstream's answer: Envoy's response flags
/// NR, NC, UH, UF and UT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    NoRoute,
    NoCluster,
    NoHealthyUpstream,
    UpstreamConnectionFailure,
    UpstreamTimeout,
}

impl Flag {
    fn status(self) -> StatusCode {
        match self {
            Flag::NoRoute => StatusCode::NOT_FOUND,
            Flag::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn body(self) -> &'static str {
        match self {
            Flag::NoRoute => "",
            Flag::NoCluster => "no cluster",
            Flag::NoHealthyUpstream => "no healthy upstream",
            Flag::UpstreamConnectionFailure => {
                "upstream connect error or disconnect/reset before headers"
            }
            Flag::UpstreamTimeout => "upstream request timeout",
        }
    }
}

/// What every request on one HTTP connection shares.
#[derive(Clone, Debug)]
pub struct Connection {
    pub snapshot: Arc<Snapshot>,
    pub manager: Arc<HttpManager>,
    pub upstreams: Arc<Upstreams>,
}

/// Serves one request; never fails (errors are answers).
pub async fn serve(
    connection: Connection,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match proxy(&connection, request).await {
        Ok(response) => response,
        Err(flag) => local_reply(flag.status(), flag.body()),
    })
}

async fn proxy(
    connection: &Connection,
    request: Request<Incoming>,
) -> Result<Response<Body>, Flag> {
    let snapshot = &connection.snapshot;
    let table = match &connection.manager.routes {
        RouteSource::Inline(table) => Arc::clone(table),
        RouteSource::Rds(name) => snapshot.routes.get(name).cloned().ok_or(Flag::NoRoute)?,
    };
    let authority = authority(&request).ok_or(Flag::NoRoute)?;
    let host = table.find_host(&authority).ok_or(Flag::NoRoute)?;
    let route = host
        .find_route(request.method(), request.uri(), request.headers())
        .ok_or(Flag::NoRoute)?;
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
            let (status, location) = redirect.location(route, "http", &authority, request.uri());
            let mut response = local_reply(status, "");
            if let Ok(location) = HeaderValue::from_str(&location) {
                response
                    .headers_mut()
                    .insert(http::header::LOCATION, location);
            }
            Ok(response)
        }
        Action::Forward(forward) => {
            let mut response = send(connection, host, route, forward, request, &authority).await?;
            route.headers.response.apply(response.headers_mut());
            host.headers.response.apply(response.headers_mut());
            Ok(response)
        }
    }
}

async fn send(
    connection: &Connection,
    host: &crate::model::route::VirtualHost,
    route: &Route,
    forward: &Forward,
    request: Request<Incoming>,
    authority: &str,
) -> Result<Response<Body>, Flag> {
    let (cluster_name, weighted_headers) = forward
        .destinations
        .pick(|total| rand::random_range(0..total))
        .ok_or(Flag::NoCluster)?;
    let snapshot = &connection.snapshot;
    let cluster = snapshot.clusters.get(cluster_name).ok_or(Flag::NoCluster)?;
    let upstream = connection.upstreams.get(cluster);
    let endpoints = snapshot
        .endpoints_of(cluster)
        .ok_or(Flag::NoHealthyUpstream)?;
    let endpoint = upstream.pick(&endpoints).ok_or(Flag::NoHealthyUpstream)?;

    let (mut parts, body) = request.into_parts();
    let downstream_h2 = parts.version == Version::HTTP_2;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let path = forward
        .rewrite_path(route, &path_and_query)
        .unwrap_or(path_and_query);
    parts.uri = upstream_uri(&endpoint.address, &path).ok_or(Flag::UpstreamConnectionFailure)?;
    parts.version = Version::HTTP_11;
    let host_header = match &forward.host_rewrite {
        Some(rewrite) => rewrite.clone(),
        None => HeaderValue::from_str(authority).map_err(|_| Flag::NoRoute)?,
    };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(HOST, host_header);
    if let Some(ops) = weighted_headers {
        ops.request.apply(&mut parts.headers);
    }
    route.headers.request.apply(&mut parts.headers);
    host.headers.request.apply(&mut parts.headers);
    let request = Request::from_parts(parts, body.boxed());

    let call = upstream.client(downstream_h2).request(request);
    let response = match forward.timeout {
        Some(timeout) => tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| Flag::UpstreamTimeout)?,
        None => call.await,
    }
    .map_err(|error| {
        tracing::debug!(%error, endpoint = %endpoint.address, "upstream request failed");
        Flag::UpstreamConnectionFailure
    })?;
    Ok(response.map(|body| body.boxed()))
}

/// The request's authority: `:authority` (HTTP/2, absolute URIs), else
/// `Host`.
fn authority<B>(request: &Request<B>) -> Option<String> {
    request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

/// Headers that describe one connection, not the request (RFC 9110 7.6.1),
/// and the headers the Connection header names.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        http::header::CONNECTION,
        http::header::PROXY_AUTHENTICATE,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
        http::HeaderName::from_static("keep-alive"),
        http::HeaderName::from_static("proxy-connection"),
    ] {
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

fn upstream_uri(target: &Target, path: &str) -> Option<Uri> {
    let authority = match target {
        Target::Ip(addr) => addr.to_string(),
        Target::Dns(host, port) => format!("{host}:{port}"),
    };
    format!("http://{authority}{path}").parse().ok()
}

fn full(bytes: Bytes) -> Body {
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
