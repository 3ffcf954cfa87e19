//! The proxy's own endpoints beside the data path, on Istio's and Envoy's
//! ports so that kubelets, Prometheus and Istio's tools find them:
//!
//! - status (15021): `/healthz/ready`, the kubelet's probe;
//! - metrics (15020 merged, 15090 the proxy's): `/stats/prometheus`, and
//!   the app's probes as injection rewrote them (`/app-health/…`, see
//!   [`crate::probe`]);
//! - admin (127.0.0.1:15000): `/ready`, `/stats`, `/stats/prometheus`,
//!   `/server_info`, `/config_dump`, `/certs`, `POST /logging?level=debug`,
//!   `POST /quitquitquit`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::Error;
use crate::state::State;
use crate::telemetry::metrics::Metrics;
use crate::tls::Secrets;

/// Changes the log filter (`tracing_subscriber`'s directives, e.g.
/// `debug` or `bowline_proxy::xds=trace`); given by the binary, which owns
/// the subscriber.
pub type SetLogFilter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the endpoints read and act on.
pub struct Admin {
    pub state: Arc<State>,
    pub metrics: Arc<Metrics>,
    /// The TLS secrets, for `/certs`.
    pub secrets: Arc<Secrets>,
    pub node_id: String,
    /// Set to stop the proxy (`/quitquitquit`).
    pub stop: Arc<watch::Sender<bool>>,
    pub log_filter: Option<SetLogFilter>,
    pub started: Instant,
    /// The app's probes, answered on the metrics port.
    pub app_probers: crate::probe::AppProbers,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("node_id", &self.node_id)
            .field("log_filter", &self.log_filter.is_some())
            .finish_non_exhaustive()
    }
}

/// Which endpoint a port serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    Status,
    Metrics,
    Admin,
}

/// Binds `address` for `port` and serves it until the process ends.
pub async fn bind(address: SocketAddr, port: Port, admin: Arc<Admin>) -> Result<(), Error> {
    let socket = TcpListener::bind(address)
        .await
        .map_err(|source| Error::Bind { address, source })?;
    tokio::spawn(serve(socket, port, admin));
    Ok(())
}

async fn serve(socket: TcpListener, port: Port, admin: Arc<Admin>) {
    loop {
        let Ok((stream, _)) = socket.accept().await else {
            continue;
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let admin = Arc::clone(&admin);
                async move {
                    let path = request.uri().path();
                    if port == Port::Metrics && path.starts_with("/app-health/") {
                        let response = match admin.app_probers.probe(path).await {
                            Some(status) => text(status, ""),
                            None => text(StatusCode::NOT_FOUND, "no such probe\n"),
                        };
                        return Ok::<_, Infallible>(response);
                    }
                    Ok(respond(&admin, port, &request))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(admin: &Admin, port: Port, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let method = request.method();
    match (port, method, path) {
        (_, &Method::GET, "/healthz/ready") => match admin.not_ready() {
            None => text(StatusCode::OK, "LIVE\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {why}\n"),
            ),
        },
        (Port::Metrics | Port::Admin, &Method::GET, "/stats/prometheus") => metrics(admin),
        (Port::Admin, &Method::GET, "/stats") => metrics(admin),
        (Port::Admin, &Method::GET, "/ready") => {
            let (status, body) = server_state(admin);
            text(status, &format!("{body}\n"))
        }
        (Port::Admin, &Method::GET, "/server_info") => {
            let (_, state) = server_state(admin);
            let info = serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "state": state,
                "node": {"id": admin.node_id},
                "uptime_current_epoch": format!("{}s", admin.started.elapsed().as_secs()),
            });
            json_body(&info)
        }
        (Port::Admin, &Method::GET, "/config_dump") => config_dump(admin, request.uri().query()),
        (Port::Admin, &Method::GET, "/certs") => certs(&admin.secrets),
        (Port::Admin, &Method::POST, "/logging") => logging(admin, request.uri().query()),
        (Port::Admin, &Method::POST, "/quitquitquit") => {
            let _ = admin.stop.send(true);
            text(StatusCode::OK, "OK\n")
        }
        (Port::Admin, _, "/logging" | "/quitquitquit") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

impl Admin {
    /// Why the proxy is not ready, if it is not: stopping, no complete
    /// configuration yet, or no certificate from its CA yet.
    fn not_ready(&self) -> Option<&'static str> {
        if self.state.is_draining() {
            Some("draining")
        } else if !self.state.is_ready() {
            Some("no complete configuration yet")
        } else if self.secrets.awaiting_identity() {
            Some("no workload certificate from the CA yet")
        } else {
            None
        }
    }
}

/// Envoy's server states, and the readiness answer for each.
fn server_state(admin: &Admin) -> (StatusCode, &'static str) {
    match admin.not_ready() {
        None => (StatusCode::OK, "LIVE"),
        Some(_) if admin.state.is_draining() => (StatusCode::SERVICE_UNAVAILABLE, "DRAINING"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING"),
    }
}

fn metrics(admin: &Admin) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(admin.metrics.encode())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// Envoy's `/certs`: each secret's certificates, serial numbers and
/// expiry — how to see that rotation happens.
fn certs(secrets: &Secrets) -> Response<Full<Bytes>> {
    let mut all = secrets.all();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let certificates: Vec<_> = all
        .iter()
        .map(|(name, secret)| secret.details(name))
        .collect();
    json_body(&serde_json::json!({ "certificates": certificates }))
}

/// The sections of Envoy's `/config_dump` this proxy fills: the resource
/// type, the dump's type, the field each resource goes in, and the lists
/// for static (bootstrap) and dynamic (xDS) ones.
const DUMPS: [(&str, &str, &str, &str, &str); 4] = [
    (
        crate::xds::CLUSTER,
        "ClustersConfigDump",
        "cluster",
        "static_clusters",
        "dynamic_active_clusters",
    ),
    (
        crate::xds::LISTENER,
        "ListenersConfigDump",
        "listener",
        "static_listeners",
        "dynamic_listeners",
    ),
    (
        crate::xds::ROUTE,
        "RoutesConfigDump",
        "route_config",
        "static_route_configs",
        "dynamic_route_configs",
    ),
    (
        crate::xds::ENDPOINT,
        "EndpointsConfigDump",
        "endpoint_config",
        "static_endpoint_configs",
        "dynamic_endpoint_configs",
    ),
];

/// What is served, in the shape of Envoy's `/config_dump`: clusters,
/// listeners and routes, static or dynamic with their versions; endpoints
/// with `?include_eds`. Written apart ([`crate::envoy::apart`]): the
/// descriptors it needs are megabytes.
fn config_dump(admin: &Admin, query: Option<&str>) -> Response<Full<Bytes>> {
    let include_eds = query.is_some_and(|q| q.split('&').any(|p| p.starts_with("include_eds")));
    let snapshot = admin.state.snapshot();
    crate::envoy::apart(|| json_body(&dump(&snapshot, include_eds)))
}

fn dump(snapshot: &crate::model::Snapshot, include_eds: bool) -> serde_json::Value {
    use serde_json::{Value, json};
    let descriptors = crate::envoy::Descriptors::load();
    let configs: Vec<Value> = DUMPS
        .iter()
        .filter(|(type_url, ..)| include_eds || *type_url != crate::xds::ENDPOINT)
        .map(|&(type_url, kind, field, static_key, dynamic_key)| {
            let (mut statics, mut dynamics) = (Vec::new(), Vec::new());
            for raw in snapshot.raw.iter().filter(|r| r.type_url == type_url) {
                let resource = descriptors
                    .json(raw.type_url, &raw.bytes)
                    .unwrap_or_else(|error| json!({"error": error}));
                if raw.version.is_empty() {
                    statics.push(json!({ field: resource }));
                } else if field == "listener" {
                    dynamics.push(json!({"name": raw.name,
                        "active_state": {"version_info": raw.version, "listener": resource}}));
                } else {
                    dynamics.push(json!({"version_info": raw.version, field: resource}));
                }
            }
            json!({
                "@type": format!("type.googleapis.com/envoy.admin.v3.{kind}"),
                static_key: statics,
                dynamic_key: dynamics,
            })
        })
        .collect();
    json!({ "configs": configs })
}

/// `level=debug` sets every target; `bowline_proxy::xds=trace` one.
fn logging(admin: &Admin, query: Option<&str>) -> Response<Full<Bytes>> {
    let Some(set) = &admin.log_filter else {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "this proxy's log level is fixed at start (RUST_LOG)\n",
        );
    };
    let directives: Vec<String> = query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some(("level", level)) => level.to_string(),
            Some((target, level)) => format!("{target}={level}"),
            None => pair.to_string(),
        })
        .collect();
    if directives.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "say what to log: /logging?level=debug or /logging?bowline_proxy::xds=trace\n",
        );
    }
    let filter = directives.join(",");
    match set(&filter) {
        Ok(()) => {
            tracing::info!(%filter, "log filter changed");
            text(StatusCode::OK, &format!("log filter: {filter}\n"))
        }
        Err(error) => text(StatusCode::BAD_REQUEST, &format!("{filter:?}: {error}\n")),
    }
}

fn json_body(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::OK, &format!("{value:#}\n"));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
