//! Distributed tracing as Envoy's OpenTelemetry tracer does it: an HTTP
//! connection manager with `tracing` (provider
//! `envoy.config.trace.v3.OpenTelemetryConfig`) gives each request a span —
//! SERVER on a sidecar's inbound side, CLIENT on its outbound side and at
//! gateways — that continues the caller's trace, and passes its own
//! context on to the upstream.
//!
//! - Context comes in as W3C `traceparent` (with `tracestate`), else as B3
//!   (`b3`, or `x-b3-traceid`/`x-b3-spanid`/`x-b3-sampled`/`x-b3-flags`),
//!   and goes on as both, so applications that forward either format keep
//!   the trace whole.
//! - The caller's sampling decision stands; without one, the request is
//!   traced when `x-envoy-force-trace` is set, or `x-client-trace-id` is
//!   and `client_sampling` hits, or `random_sampling` hits — then only if
//!   `overall_sampling` hits too. Unsampled requests still carry their
//!   context (flag 00), so the services after them do not sample either.
//! - Spans carry Envoy's tags (`http.method`, `http.url`,
//!   `http.status_code`, `upstream_cluster`, `response_flags`,
//!   `guid:x-request-id`, …), Istio's (`istio.canonical_service`,
//!   `istio.namespace`, …) and the configured custom tags, and are named by
//!   the route's decorator (`ingress`/`egress` without one).
//! - Finished spans are batched (up to [`BATCH`] or every second) and sent
//!   with OTLP/gRPC to an endpoint of the collector's cluster; when the
//!   collector is slow or away, spans beyond [`QUEUE`] are dropped, never
//!   the requests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
use envoy_types::pb::envoy::config::trace::v3::OpenTelemetryConfig;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing as EnvoyTracing;
use envoy_types::pb::envoy::r#type::tracing::v3::custom_tag;
use envoy_types::pb::envoy::r#type::v3::Percent;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use prometheus_client::metrics::counter::Counter;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use tokio::sync::mpsc;

use super::metrics::Completed;
use super::peer::{Interned, Workload};
use crate::envoy::{type_name, unpack};
use crate::model::duration;
use crate::model::resilience::PerMillion;
use crate::state::State;

pub const OPEN_TELEMETRY: &str = "envoy.config.trace.v3.OpenTelemetryConfig";

/// Finished spans waiting for the exporter; beyond this they are dropped.
pub const QUEUE: usize = 8192;
/// Spans sent in one export.
pub const BATCH: usize = 512;
/// How long spans wait for a full batch.
const FLUSH: Duration = Duration::from_secs(1);
/// How long one export may take when the gRPC service sets no timeout
/// (a stuck collector must not hold every later batch).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
const FORCE_TRACE: HeaderName = HeaderName::from_static("x-envoy-force-trace");
const CLIENT_TRACE_ID: HeaderName = HeaderName::from_static("x-client-trace-id");

/// An HTTP connection manager's tracing.
#[derive(Debug)]
pub struct Tracing {
    random: PerMillion,
    client: PerMillion,
    overall: PerMillion,
    /// The longest path `http.url` carries (Envoy's default 256).
    max_path: usize,
    tags: Vec<(String, Tag)>,
    collector: Arc<Collector>,
}

#[derive(Debug)]
enum Tag {
    Literal(String),
    /// A request header, or the default when it is absent (no tag without
    /// one).
    Header(HeaderName, Option<String>),
}

/// Where spans go: the OTLP/gRPC service of a cluster.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Collector {
    pub cluster: String,
    /// `:authority` of the exports; the endpoint's address when empty.
    pub authority: Option<String>,
    /// The resource's `service.name`; the proxy's canonical service and
    /// namespace (`reviews.shop`, Istio's default) when empty.
    pub service_name: Option<String>,
    /// How long one export may take.
    pub timeout: Duration,
}

impl Tracing {
    /// The tracing an HTTP connection manager asks for, or none when it
    /// names no provider (Envoy then traces nothing).
    pub fn from_envoy(tracing: &EnvoyTracing) -> Result<Option<Self>, String> {
        use envoy_types::pb::envoy::config::trace::v3::tracing::http::ConfigType;
        let Some(provider) = &tracing.provider else {
            return Ok(None);
        };
        let Some(ConfigType::TypedConfig(any)) = &provider.config_type else {
            return Err("provider: a typed_config is needed".into());
        };
        if type_name(any) != OPEN_TELEMETRY {
            return Err(format!(
                "provider.typed_config: the tracer {} is not supported; use {OPEN_TELEMETRY}",
                type_name(any)
            ));
        }
        let config: OpenTelemetryConfig =
            unpack(any).map_err(|e| format!("provider.typed_config: {e}"))?;
        let grpc = config.grpc_service.as_ref().ok_or_else(|| {
            "provider.typed_config.grpc_service: an OTLP/gRPC collector is needed".to_string()
        })?;
        let Some(TargetSpecifier::EnvoyGrpc(target)) = &grpc.target_specifier else {
            return Err(
                "provider.typed_config.grpc_service: envoy_grpc with a cluster_name is needed"
                    .into(),
            );
        };
        if target.cluster_name.is_empty() {
            return Err(
                "provider.typed_config.grpc_service.envoy_grpc.cluster_name: a cluster is needed"
                    .into(),
            );
        }
        let tags = tracing
            .custom_tags
            .iter()
            .enumerate()
            .filter_map(|(i, tag)| {
                custom(tag)
                    .map_err(|e| format!("custom_tags[{i}]: {e}"))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let percent = |p: Option<&Percent>| {
            PerMillion(p.map_or(1_000_000, |p| (p.value.clamp(0.0, 100.0) * 10_000.0) as u32))
        };
        Ok(Some(Self {
            random: percent(tracing.random_sampling.as_ref()),
            client: percent(tracing.client_sampling.as_ref()),
            overall: percent(tracing.overall_sampling.as_ref()),
            max_path: tracing
                .max_path_tag_length
                .as_ref()
                .map_or(256, |n| n.value as usize),
            tags,
            collector: Arc::new(Collector {
                cluster: target.cluster_name.clone(),
                authority: Some(target.authority.clone()).filter(|a| !a.is_empty()),
                service_name: Some(config.service_name).filter(|s| !s.is_empty()),
                timeout: grpc
                    .timeout
                    .as_ref()
                    .map(duration)
                    .filter(|t| !t.is_zero())
                    .unwrap_or(EXPORT_TIMEOUT),
            }),
        }))
    }

    /// Starts the request's span: continues or starts its trace, decides
    /// whether it is sampled, and rewrites its trace headers for the
    /// upstream. The span is kept only when sampled.
    pub fn start<B>(
        self: &Arc<Self>,
        request: &mut Request<B>,
        kind: Kind,
        authority: Option<&str>,
        peer: SocketAddr,
    ) -> Option<Box<Open>> {
        let incoming = Incoming::extract(request.headers());
        let sampled = incoming
            .sampled
            .unwrap_or_else(|| self.decide(request.headers()));
        let (trace_id, parent) = match incoming.parent {
            Some((trace, span)) => (trace, Some(span)),
            None => (nonzero(rand::random()), None),
        };
        let context = Context {
            trace_id,
            span_id: nonzero(rand::random()),
            parent,
            sampled,
        };
        context.inject(request.headers_mut());
        if !sampled {
            return None;
        }
        let headers = request.headers();
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let path = path.get(..self.max_path).unwrap_or(path);
        let mut attributes = vec![
            string("http.method", request.method().as_str()),
            string(
                "http.url",
                &format!("http://{}{path}", authority.unwrap_or_default()),
            ),
            string("http.protocol", &format!("{:?}", request.version())),
            string("peer.address", &peer.ip().to_string()),
            string("downstream_cluster", "-"),
            string("component", "proxy"),
        ];
        if let Some(agent) = text(&http::header::USER_AGENT) {
            attributes.push(string("user_agent", agent));
        }
        if let Some(id) = text(&crate::http::REQUEST_ID) {
            attributes.push(string("guid:x-request-id", id));
        }
        for (key, tag) in &self.tags {
            let value = match tag {
                Tag::Literal(value) => Some(value.as_str()),
                Tag::Header(name, default) => text(name).or(default.as_deref()),
            };
            if let Some(value) = value {
                attributes.push(string(key, value));
            }
        }
        Some(Box::new(Open {
            collector: Arc::clone(&self.collector),
            context,
            trace_state: text(&TRACESTATE).unwrap_or_default().to_string(),
            kind,
            name: None,
            started: SystemTime::now(),
            attributes,
        }))
    }

    fn decide(&self, headers: &HeaderMap) -> bool {
        let roll = || rand::random_range(0..1_000_000);
        let forced = headers.contains_key(FORCE_TRACE)
            || (headers.contains_key(CLIENT_TRACE_ID) && self.client.hit(roll()));
        (forced || self.random.hit(roll())) && self.overall.hit(roll())
    }
}

fn custom(
    tag: &envoy_types::pb::envoy::r#type::tracing::v3::CustomTag,
) -> Result<Option<(String, Tag)>, String> {
    if tag.tag.is_empty() {
        return Err("tag: a name is needed".into());
    }
    let value = match &tag.r#type {
        Some(custom_tag::Type::Literal(literal)) => Tag::Literal(literal.value.clone()),
        Some(custom_tag::Type::Environment(env)) => {
            match std::env::var(&env.name)
                .ok()
                .or_else(|| Some(env.default_value.clone()).filter(|d| !d.is_empty()))
            {
                Some(value) => Tag::Literal(value),
                None => return Ok(None),
            }
        }
        Some(custom_tag::Type::RequestHeader(header)) => Tag::Header(
            HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| {
                format!(
                    "request_header.name: {:?} is not a header name",
                    header.name
                )
            })?,
            Some(header.default_value.clone()).filter(|d| !d.is_empty()),
        ),
        _ => return Err("only literal, environment and request_header tags are supported".into()),
    };
    Ok(Some((tag.tag.clone(), value)))
}

/// Which side of the call a span stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A sidecar's inbound side: the request arrives for its workload.
    Server,
    /// A sidecar's outbound side, and gateways.
    Client,
}

/// A span's place in its trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent: Option<u64>,
    pub sampled: bool,
}

impl Context {
    /// Writes this span as the upstream's parent: `traceparent`, and B3
    /// (the single `b3` header only where the request had one).
    fn inject(&self, headers: &mut HeaderMap) {
        let sampled = if self.sampled { "1" } else { "0" };
        let mut put = |name: HeaderName, value: String| {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        };
        let (trace, span) = (self.trace_id, self.span_id);
        put(
            TRACEPARENT,
            format!("00-{trace:032x}-{span:016x}-0{sampled}"),
        );
        put(B3_TRACE_ID, format!("{trace:032x}"));
        put(B3_SPAN_ID, format!("{span:016x}"));
        put(B3_SAMPLED, sampled.to_string());
        match self.parent {
            Some(parent) => put(B3_PARENT_SPAN_ID, format!("{parent:016x}")),
            None => {
                headers.remove(B3_PARENT_SPAN_ID);
            }
        }
        headers.remove(B3_FLAGS);
        if headers.contains_key(B3) {
            let single = match self.parent {
                Some(parent) => format!("{trace:032x}-{span:016x}-{sampled}-{parent:016x}"),
                None => format!("{trace:032x}-{span:016x}-{sampled}"),
            };
            if let Ok(value) = HeaderValue::from_str(&single) {
                headers.insert(B3, value);
            }
        }
    }
}

/// The trace context a request arrived with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Incoming {
    /// Trace id and the caller's span id.
    pub parent: Option<(u128, u64)>,
    /// The caller's decision, when it made one.
    pub sampled: Option<bool>,
}

impl Incoming {
    /// `traceparent` when it is valid, else B3 (single header first).
    pub fn extract(headers: &HeaderMap) -> Self {
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(context) = text(&TRACEPARENT).and_then(traceparent) {
            return context;
        }
        if let Some(context) = text(&B3).and_then(b3_single) {
            return context;
        }
        let sampled = match (text(&B3_FLAGS), text(&B3_SAMPLED)) {
            (Some("1"), _) => Some(true),
            (_, Some("1" | "true")) => Some(true),
            (_, Some("0" | "false")) => Some(false),
            _ => None,
        };
        let parent = text(&B3_TRACE_ID)
            .and_then(b3_trace_id)
            .zip(text(&B3_SPAN_ID).and_then(|s| hex_id::<8>(s).map(|s| s as u64)));
        Self { parent, sampled }
    }
}

/// W3C Trace Context: `version-traceid-parentid-flags`, lower-case hex;
/// versions after 00 may append fields, version ff is invalid, and
/// all-zero ids are invalid.
fn traceparent(value: &str) -> Option<Incoming> {
    let value = value.trim();
    let mut fields = value.split('-');
    let version = fields.next().filter(|v| v.len() == 2 && *v != "ff")?;
    u8::from_str_radix(version, 16).ok()?;
    let trace = fields.next().and_then(hex_id::<16>)?;
    let span = fields.next().and_then(hex_id::<8>)? as u64;
    let flags = fields.next().filter(|f| f.len() == 2)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if version == "00" && fields.next().is_some() {
        return None;
    }
    Some(Incoming {
        parent: Some((trace, span)),
        sampled: Some(flags & 1 == 1),
    })
}

/// B3's single header: `traceid-spanid[-sampled[-parentspanid]]`, or the
/// decision alone (`0`, `1`, `d` for debug).
fn b3_single(value: &str) -> Option<Incoming> {
    let decision = |d: &str| match d {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    };
    let mut fields = value.trim().split('-');
    let first = fields.next()?;
    let Some(span) = fields.next() else {
        return decision(first).map(|sampled| Incoming {
            parent: None,
            sampled: Some(sampled),
        });
    };
    let trace = b3_trace_id(first)?;
    let span = hex_id::<8>(span)? as u64;
    let sampled = match fields.next() {
        Some(d) => Some(decision(d)?),
        None => None,
    };
    Some(Incoming {
        parent: Some((trace, span)),
        sampled,
    })
}

/// A B3 trace id: 128 or 64 bits.
fn b3_trace_id(value: &str) -> Option<u128> {
    match value.len() {
        16 => hex_id::<8>(value),
        _ => hex_id::<16>(value),
    }
}

/// An id of `N` bytes in exactly `2N` lower-case hex digits, not zero.
fn hex_id<const N: usize>(value: &str) -> Option<u128> {
    let digits = value.as_bytes();
    if digits.len() != 2 * N
        || !digits
            .iter()
            .all(|d| matches!(d, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u128::from_str_radix(value, 16).ok().filter(|id| *id != 0)
}

fn nonzero<T: Default + PartialEq + From<u8>>(id: T) -> T {
    if id == T::default() { T::from(1) } else { id }
}

/// A sampled request's span, until its response ends.
#[derive(Debug)]
pub struct Open {
    collector: Arc<Collector>,
    context: Context,
    trace_state: String,
    kind: Kind,
    /// The route's decorator operation.
    name: Option<String>,
    started: SystemTime,
    attributes: Vec<KeyValue>,
}

impl Open {
    /// Names the span after the route's decorator.
    pub fn name(&mut self, operation: &str) {
        self.name = Some(operation.to_string());
    }

    /// The cluster the request went to.
    pub fn cluster(&mut self, cluster: &str) {
        self.attributes.push(string("upstream_cluster", cluster));
        self.attributes
            .push(string("upstream_cluster.name", cluster));
    }

    /// The endpoint its last attempt reached.
    pub fn endpoint(&mut self, address: &str) {
        self.attributes.push(string("upstream_address", address));
    }

    /// Ends the span with the request's outcome and hands it to the
    /// exporter.
    pub fn end(self, request: &Completed, spans: &Spans) {
        let Open {
            collector,
            context,
            trace_state,
            kind,
            name,
            started,
            mut attributes,
        } = self;
        let labels = &request.labels;
        let error = labels.code >= 500 || labels.grpc_status.is_some_and(|s| s != 0);
        attributes.extend([
            int("http.status_code", labels.code.into()),
            string("response_flags", &labels.flags.to_label()),
            int("request_size", request.request_bytes as i64),
            int("response_size", request.response_bytes as i64),
        ]);
        if let Some(status) = labels.grpc_status {
            attributes.push(int("grpc.status_code", status.into()));
        }
        if error {
            attributes.push(string("error", "true"));
        }
        let nanos = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        };
        let span = Span {
            trace_id: context.trace_id.to_be_bytes().to_vec(),
            span_id: context.span_id.to_be_bytes().to_vec(),
            parent_span_id: context
                .parent
                .map(|p| p.to_be_bytes().to_vec())
                .unwrap_or_default(),
            trace_state,
            flags: 1,
            name: name.unwrap_or_else(|| match kind {
                Kind::Server => "ingress".into(),
                Kind::Client => "egress".into(),
            }),
            kind: match kind {
                Kind::Server => span::SpanKind::Server,
                Kind::Client => span::SpanKind::Client,
            } as i32,
            start_time_unix_nano: nanos(started),
            end_time_unix_nano: nanos(started + request.started.elapsed()),
            attributes,
            status: error.then(|| Status {
                code: status::StatusCode::Error as i32,
                message: String::new(),
            }),
            ..Default::default()
        };
        spans.send(Finished { collector, span });
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// A span ready to export, and where it goes.
#[derive(Debug)]
pub struct Finished {
    collector: Arc<Collector>,
    span: Span,
}

/// The way from requests to the exporter.
#[derive(Debug)]
pub struct Spans {
    queue: mpsc::Sender<Finished>,
    /// Counts spans dropped because the queue was full
    /// (`bowline_proxy_spans_dropped_total`).
    dropped: Counter,
}

impl Spans {
    /// The sending side, counting drops in `dropped`, and the exporter's
    /// queue.
    pub fn new(dropped: Counter) -> (Self, mpsc::Receiver<Finished>) {
        let (queue, finished) = mpsc::channel(QUEUE);
        (Self { queue, dropped }, finished)
    }

    fn send(&self, finished: Finished) {
        if self.queue.try_send(finished).is_err() {
            self.dropped.inc();
        }
    }
}

/// Exports finished spans until every sender is gone: in batches, each
/// to an endpoint of its collector's cluster as the configuration then
/// names it.
pub async fn export(
    mut finished: mpsc::Receiver<Finished>,
    state: Arc<State>,
    own: Interned<Workload>,
    node_id: String,
) {
    let mut exporter = Exporter {
        state,
        own,
        node_id,
        clients: HashMap::new(),
        next: 0,
        warned: None,
    };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(FLUSH);
        tokio::pin!(deadline);
        while batch.len() < BATCH {
            tokio::select! {
                received = finished.recv() => match received {
                    Some(span) => batch.push(span),
                    None => {
                        exporter.send(std::mem::take(&mut batch)).await;
                        return;
                    }
                },
                () = &mut deadline => break,
            }
        }
        if !batch.is_empty() {
            exporter
                .send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
                .await;
        }
    }
}

struct Exporter {
    state: Arc<State>,
    own: Interned<Workload>,
    node_id: String,
    /// A client per endpoint address, dropped when an export through it
    /// fails (an endpoint that left fails once, then is forgotten).
    clients: HashMap<String, TraceServiceClient<tonic::transport::Channel>>,
    /// Round-robin over a collector's endpoints.
    next: usize,
    /// When a failed export was last logged (once a minute at most).
    warned: Option<Instant>,
}

impl Exporter {
    async fn send(&mut self, batch: Vec<Finished>) {
        let mut by_collector: HashMap<Arc<Collector>, Vec<Span>> = HashMap::new();
        for Finished { collector, span } in batch {
            by_collector.entry(collector).or_default().push(span);
        }
        for (collector, spans) in by_collector {
            let count = spans.len();
            if let Err(error) = self.export(&collector, spans).await {
                let now = Instant::now();
                if self
                    .warned
                    .is_none_or(|t| now - t > Duration::from_secs(60))
                {
                    self.warned = Some(now);
                    tracing::warn!(cluster = %collector.cluster, spans = count, %error, "spans not exported");
                }
            }
        }
    }

    async fn export(&mut self, collector: &Collector, spans: Vec<Span>) -> Result<(), String> {
        let snapshot = self.state.snapshot();
        let cluster = snapshot.clusters.get(&collector.cluster).ok_or_else(|| {
            format!(
                "the collector's cluster {} is not configured",
                collector.cluster
            )
        })?;
        let endpoints = snapshot
            .endpoints_of(cluster)
            .ok_or_else(|| "the collector's cluster has no endpoints".to_string())?;
        let healthy: Vec<_> = endpoints.items.iter().filter(|e| e.healthy).collect();
        if healthy.is_empty() {
            return Err("the collector's cluster has no healthy endpoint".into());
        }
        self.next = self.next.wrapping_add(1);
        let address = healthy[self.next % healthy.len()].address.to_string();
        let client = match self.clients.get(&address) {
            Some(client) => client.clone(),
            None => {
                let mut endpoint =
                    tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                        .map_err(|e| e.to_string())?
                        .connect_timeout(Duration::from_secs(1));
                if let Some(authority) = &collector.authority {
                    let origin = format!("http://{authority}")
                        .parse()
                        .map_err(|e| format!("authority: {e}"))?;
                    endpoint = endpoint.origin(origin);
                }
                let client = TraceServiceClient::new(endpoint.connect_lazy());
                self.clients.insert(address.clone(), client.clone());
                client
            }
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource(collector)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "bowline-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let mut client = client;
        let failed = match tokio::time::timeout(collector.timeout, client.export(request)).await {
            Ok(Ok(_)) => None,
            Ok(Err(status)) => Some(status.to_string()),
            Err(_) => Some(format!("no answer within {:?}", collector.timeout)),
        };
        if let Some(failed) = failed {
            self.clients.remove(&address);
            return Err(format!("{address}: {failed}"));
        }
        Ok(())
    }

    fn resource(&self, collector: &Collector) -> Resource {
        let own = &self.own;
        let service = collector
            .service_name
            .clone()
            .unwrap_or_else(|| format!("{}.{}", own.canonical_service, own.namespace));
        let mut attributes = vec![
            string("service.name", &service),
            string("node_id", &self.node_id),
            string("istio.canonical_service", &own.canonical_service),
            string("istio.canonical_revision", &own.canonical_revision),
            string("istio.namespace", &own.namespace),
        ];
        if !own.cluster.is_empty() {
            attributes.push(string("istio.cluster_id", &own.cluster));
        }
        Resource {
            attributes,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::headers;

    #[test]
    fn traceparent_is_read_as_w3c_says() {
        let got = Incoming::extract(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]));
        assert_eq!(
            got,
            Incoming {
                parent: Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7)),
                sampled: Some(true)
            }
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(
                Incoming::extract(&headers(&[("traceparent", bad)])),
                Incoming::default(),
                "{bad}"
            );
        }
        // A later version may add fields.
        let later = Incoming::extract(&headers(&[(
            "traceparent",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more",
        )]));
        assert_eq!(later.sampled, Some(false));
    }

    #[test]
    fn b3_is_read_in_both_forms() {
        let multi = Incoming::extract(&headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(
            multi,
            Incoming {
                parent: Some((0x80f198ee56343ba864fe8b2a57d3eff7, 0xe457b5a2e4d86bd1)),
                sampled: Some(true)
            }
        );
        let short = Incoming::extract(&headers(&[
            ("x-b3-traceid", "64fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ]));
        assert_eq!(short.parent, Some((0x64fe8b2a57d3eff7, 0xe457b5a2e4d86bd1)));
        assert_eq!(short.sampled, None);
        let single = Incoming::extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0-05e3ac9a4f6e3b90",
        )]));
        assert_eq!(single.sampled, Some(false));
        assert_eq!(single.parent.unwrap().1, 0xe457b5a2e4d86bd1);
        assert_eq!(
            Incoming::extract(&headers(&[("b3", "d")])).sampled,
            Some(true)
        );
        assert_eq!(
            Incoming::extract(&headers(&[("x-b3-flags", "1")])).sampled,
            Some(true)
        );
        // traceparent wins when both came.
        let both = Incoming::extract(&headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            ),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(both.sampled, Some(false));
    }

    #[test]
    fn a_span_is_written_as_the_upstreams_parent_in_both_formats() {
        let mut map = headers(&[("b3", "1"), ("x-b3-flags", "1")]);
        let context = Context {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0xa,
            parent: Some(0xb),
            sampled: true,
        };
        context.inject(&mut map);
        assert_eq!(
            map["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-000000000000000a-01"
        );
        assert_eq!(map["x-b3-traceid"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(map["x-b3-spanid"], "000000000000000a");
        assert_eq!(map["x-b3-parentspanid"], "000000000000000b");
        assert_eq!(map["x-b3-sampled"], "1");
        assert!(!map.contains_key("x-b3-flags"));
        assert_eq!(
            map["b3"],
            "4bf92f3577b34da6a3ce929d0e0e4736-000000000000000a-1-000000000000000b"
        );
        // What was written reads back as the same trace, one hop on.
        let read = Incoming::extract(&map);
        assert_eq!(read.parent, Some((context.trace_id, context.span_id)));
        assert_eq!(read.sampled, Some(true));
    }
}
