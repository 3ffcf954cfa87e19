//! Istio's standard metrics, with Istio's names, labels and buckets, so
//! that dashboards and Kiali built for Istio read them unchanged:
//! `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`, `istio_tcp_sent_bytes_total`,
//! `istio_tcp_received_bytes_total`, `istio_tcp_connections_opened_total`
//! and `_closed_total`.
//!
//! A request's series are found by one lookup keyed by pointers (the
//! workloads and services are interned) and a few small values; the
//! strings are written only when Prometheus scrapes.

use std::borrow::Cow;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Telemetry;
use super::access_log::Pending;
use super::peer::{Interned, Service, UNKNOWN, Workload};
use super::trace::Open;
use crate::tls::Session;

/// Envoy's default histogram buckets, which Istio's metrics use: 0.5 ms
/// to an hour for durations, the same bounds in bytes for sizes.
const BUCKETS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    30_000.0,
    60_000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];

/// Which end of the request the proxy reporting it stands at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client's sidecar, or a gateway.
    Source,
    /// The server's sidecar.
    Destination,
}

/// `connection_security_policy`: known only to the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Security {
    /// The source's view.
    Unknown,
    /// Plaintext.
    None,
    MutualTls,
}

/// Who a request or connection went between.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peers {
    pub reporter: Reporter,
    pub source: Interned<Workload>,
    pub destination: Interned<Workload>,
    pub service: Interned<Service>,
    pub security: Security,
    /// The SPIFFE IDs of source and destination, when TLS proved them.
    pub principals: (Option<Arc<str>>, Option<Arc<str>>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Grpc,
}

/// Envoy's response flags, as a set (`UF,URX` when several).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u16);

impl Flags {
    // In the order Envoy writes them.
    pub const NO_HEALTHY_UPSTREAM: Self = Self(1);
    pub const UPSTREAM_TIMEOUT: Self = Self(1 << 1);
    pub const UPSTREAM_RESET: Self = Self(1 << 2);
    pub const UPSTREAM_CONNECTION_FAILURE: Self = Self(1 << 3);
    pub const OVERFLOW: Self = Self(1 << 4);
    pub const NO_ROUTE: Self = Self(1 << 5);
    pub const DELAY_INJECTED: Self = Self(1 << 6);
    pub const FAULT_ABORT: Self = Self(1 << 7);
    pub const DOWNSTREAM_TERMINATION: Self = Self(1 << 8);
    pub const NO_CLUSTER: Self = Self(1 << 9);
    /// Denied by an authorization policy (Envoy sets no flag for its RBAC
    /// filter's 403, which then cannot be told from the application's).
    pub const DENIED: Self = Self(1 << 10);
    const NAMES: [&'static str; 11] = [
        "UH", "UT", "UR", "UF", "UO", "NR", "DI", "FI", "DC", "NC", "RBAC",
    ];

    pub fn set(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// `-` when empty, as Envoy writes it.
    pub fn to_label(self) -> Cow<'static, str> {
        if self.0 == 0 {
            return Cow::Borrowed("-");
        }
        let names: Vec<&str> = Self::NAMES
            .iter()
            .enumerate()
            .filter(|(bit, _)| self.0 & (1 << bit) != 0)
            .map(|(_, name)| *name)
            .collect();
        Cow::Owned(names.join(","))
    }
}

/// What a request's series are told apart by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub peers: Peers,
    pub protocol: Protocol,
    pub code: u16,
    pub grpc_status: Option<u16>,
    pub flags: Flags,
}

#[derive(Debug)]
struct RequestSeries {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TcpKey {
    peers: Peers,
    flags: Flags,
}

/// One TCP connection's series.
#[derive(Debug, Default)]
pub struct TcpSeries {
    opened: Counter,
    closed: Counter,
    pub sent: Counter,
    pub received: Counter,
}

impl TcpSeries {
    pub fn close(&self) {
        self.closed.inc();
    }
}

/// A request as it is recorded.
#[derive(Debug)]
pub struct Completed {
    pub labels: RequestLabels,
    pub started: Instant,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// The series of one proxy.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: RwLock<Series<RequestLabels, RequestSeries>>,
    tcp: RwLock<Series<TcpKey, TcpSeries>>,
    /// Finished spans dropped because the exporter's queue was full.
    pub spans_dropped: Counter,
    refused: RwLock<Series<Refused, Counter>>,
}

/// A connection closed before its filter chain served it: where, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Refused {
    listener: String,
    chain: String,
    reason: Refusal,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Refusal {
    /// No filter chain matches (e.g. plaintext on a STRICT port).
    NoFilterChain,
    /// The chain's TLS certificate is not there yet.
    TlsNotReady,
    /// The TLS handshake failed or timed out (e.g. a certificate the
    /// other side does not trust).
    TlsHandshake,
    /// A network RBAC filter (AuthorizationPolicy on a TCP port) denied it.
    Rbac,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::NoFilterChain => "no_filter_chain",
            Refusal::TlsNotReady => "tls_not_ready",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::Rbac => "rbac",
        }
    }
}

impl Metrics {
    /// Counts a connection `listener`'s `chain` (empty: none matched)
    /// closed before serving it.
    pub fn refused(&self, listener: &str, chain: &str, reason: Refusal) {
        let key = Refused {
            listener: listener.to_string(),
            chain: chain.to_string(),
            reason,
        };
        series(&self.refused, key, Counter::default).inc();
    }

    pub fn record(&self, request: &Completed) {
        let key = request.labels.clone();
        let series = series(&self.requests, key, || RequestSeries {
            requests: Counter::default(),
            duration: Histogram::new(BUCKETS),
            request_bytes: Histogram::new(BUCKETS),
            response_bytes: Histogram::new(BUCKETS),
        });
        series.requests.inc();
        series
            .duration
            .observe(request.started.elapsed().as_secs_f64() * 1_000.0);
        series.request_bytes.observe(request.request_bytes as f64);
        series.response_bytes.observe(request.response_bytes as f64);
    }

    /// A TCP connection opened; count its bytes on the series returned and
    /// [`TcpSeries::close`] it at the end.
    pub fn open(&self, peers: Peers, flags: Flags) -> Arc<TcpSeries> {
        let series = series(&self.tcp, TcpKey { peers, flags }, TcpSeries::default);
        series.opened.inc();
        series
    }

    /// Everything, in the OpenMetrics text format Prometheus scrapes.
    pub fn encode(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Arc::clone(self)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String does not fail");
        text
    }
}

/// Series by their labels (a few words: interned values hash by pointer).
type Series<K, S> = crate::model::FastMap<K, Arc<S>>;

/// The series for `key`, made on first use.
fn series<K: Eq + Hash, S>(map: &RwLock<Series<K, S>>, key: K, make: impl FnOnce() -> S) -> Arc<S> {
    if let Some(series) = map.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Arc::clone(series);
    }
    let mut map = map.write().unwrap_or_else(|e| e.into_inner());
    Arc::clone(map.entry(key).or_insert_with(|| Arc::new(make())))
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let requests = self.requests.read().unwrap_or_else(|e| e.into_inner());
        type Pick = fn(&RequestSeries) -> &dyn EncodeMetric;
        let request_metrics: [(&str, &str, MetricType, Pick); 4] = [
            (
                "istio_requests",
                "Requests, by source, destination and response.",
                MetricType::Counter,
                |s| &s.requests,
            ),
            (
                "istio_request_duration_milliseconds",
                "Time from the request's start to its response's end.",
                MetricType::Histogram,
                |s| &s.duration,
            ),
            (
                "istio_request_bytes",
                "Request sizes, headers and body.",
                MetricType::Histogram,
                |s| &s.request_bytes,
            ),
            (
                "istio_response_bytes",
                "Response sizes, headers and body.",
                MetricType::Histogram,
                |s| &s.response_bytes,
            ),
        ];
        for (name, help, kind, pick) in request_metrics {
            if requests.is_empty() {
                break;
            }
            let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
            for (key, series) in requests.iter() {
                pick(series).encode(metric.encode_family(key)?)?;
            }
        }
        drop(requests);
        let tcp = self.tcp.read().unwrap_or_else(|e| e.into_inner());
        type PickTcp = fn(&TcpSeries) -> &Counter;
        let tcp_metrics: [(&str, &str, PickTcp); 4] = [
            (
                "istio_tcp_sent_bytes",
                "Bytes sent to the client over TCP.",
                |s| &s.sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received from the client over TCP.",
                |s| &s.received,
            ),
            (
                "istio_tcp_connections_opened",
                "TCP connections opened.",
                |s| &s.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed.",
                |s| &s.closed,
            ),
        ];
        for (name, help, pick) in tcp_metrics {
            if tcp.is_empty() {
                break;
            }
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (key, series) in tcp.iter() {
                pick(series).encode(metric.encode_family(key)?)?;
            }
        }
        drop(tcp);
        let metric = encoder.encode_descriptor(
            "bowline_proxy_spans_dropped",
            "Finished spans dropped because the collector did not take them fast enough.",
            None,
            MetricType::Counter,
        )?;
        self.spans_dropped.encode(metric)?;
        let refused = self.refused.read().unwrap_or_else(|e| e.into_inner());
        if !refused.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "bowline_proxy_connections_refused",
                "Connections closed before their filter chain served them, by listener, chain and reason.",
                None,
                MetricType::Counter,
            )?;
            for (key, count) in refused.iter() {
                count.encode(metric.encode_family(key)?)?;
            }
        }
        Ok(())
    }
}

impl EncodeLabelSet for Refused {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        [
            ("listener", self.listener.as_str()),
            ("filter_chain", self.chain.as_str()),
            ("reason", self.reason.label()),
        ]
        .encode(encoder)
    }
}

impl Peers {
    /// As the proxy sees a request or connection: a sidecar's inbound side
    /// is its destination, every other side its source (which cannot know
    /// the policy); the other end is `peer` when it said who it is, else
    /// unknown. `session`, when the connection to the other end was TLS,
    /// gives both ends' SPIFFE IDs, and inbound whether it was mutual.
    pub fn seen_by(
        inbound: bool,
        own: Interned<Workload>,
        peer: Option<Interned<Workload>>,
        service: Interned<Service>,
        session: Option<&Session>,
    ) -> Self {
        let peer = peer.unwrap_or_else(Workload::unknown);
        let (local, remote) = session.map_or((None, None), |s| (s.local.clone(), s.peer.clone()));
        if inbound {
            Self {
                reporter: Reporter::Destination,
                source: peer,
                destination: own,
                service,
                security: if session.is_some_and(|s| s.mutual) {
                    Security::MutualTls
                } else {
                    Security::None
                },
                principals: (remote, local),
            }
        } else {
            Self {
                reporter: Reporter::Source,
                source: own,
                destination: peer,
                service,
                security: Security::Unknown,
                principals: (local, remote),
            }
        }
    }

    /// The labels of both ends, in Istio's order.
    fn labels(&self) -> [(&'static str, Cow<'_, str>); 21] {
        let (s, d, service) = (&self.source, &self.destination, &self.service);
        fn principal(id: &Option<Arc<str>>) -> Cow<'_, str> {
            Cow::Borrowed(id.as_deref().unwrap_or(UNKNOWN))
        }
        fn b(s: &str) -> Cow<'_, str> {
            Cow::Borrowed(s)
        }
        [
            (
                "reporter",
                b(match self.reporter {
                    Reporter::Source => "source",
                    Reporter::Destination => "destination",
                }),
            ),
            ("source_workload", b(&s.name)),
            ("source_canonical_service", b(&s.canonical_service)),
            ("source_canonical_revision", b(&s.canonical_revision)),
            ("source_workload_namespace", b(&s.namespace)),
            ("source_principal", principal(&self.principals.0)),
            ("source_app", b(&s.app)),
            ("source_version", b(&s.version)),
            ("source_cluster", b(&s.cluster)),
            ("destination_workload", b(&d.name)),
            ("destination_workload_namespace", b(&d.namespace)),
            ("destination_principal", principal(&self.principals.1)),
            ("destination_app", b(&d.app)),
            ("destination_version", b(&d.version)),
            ("destination_service", b(&service.host)),
            ("destination_canonical_service", b(&d.canonical_service)),
            ("destination_canonical_revision", b(&d.canonical_revision)),
            ("destination_service_name", b(&service.name)),
            ("destination_service_namespace", b(&service.namespace)),
            ("destination_cluster", b(&d.cluster)),
            (
                "connection_security_policy",
                b(match self.security {
                    Security::Unknown => UNKNOWN,
                    Security::None => "none",
                    Security::MutualTls => "mutual_tls",
                }),
            ),
        ]
    }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let own = [
            (
                "request_protocol",
                Cow::Borrowed(match self.protocol {
                    Protocol::Http => "http",
                    Protocol::Grpc => "grpc",
                }),
            ),
            ("response_code", Cow::Owned(self.code.to_string())),
            (
                "grpc_response_status",
                self.grpc_status
                    .map_or(Cow::Borrowed(""), |s| Cow::Owned(s.to_string())),
            ),
            ("response_flags", self.flags.to_label()),
        ];
        (self.peers.labels(), own).encode(encoder)
    }
}

impl EncodeLabelSet for TcpKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let own = [
            ("request_protocol", Cow::Borrowed("tcp")),
            ("response_flags", self.flags.to_label()),
        ];
        (self.peers.labels(), own).encode(encoder)
    }
}

/// A response body that records its request when it ends (or is dropped
/// unfinished): its size, and a gRPC status from its trailers.
#[derive(Debug)]
pub struct Recorded<B> {
    body: B,
    telemetry: Arc<Telemetry>,
    request: Option<Completed>,
    log: Option<Box<Pending>>,
    span: Option<Box<Open>>,
}

impl<B> Recorded<B> {
    pub fn new(
        body: B,
        telemetry: Arc<Telemetry>,
        request: Completed,
        log: Option<Box<Pending>>,
        span: Option<Box<Open>>,
    ) -> Self {
        Self {
            body,
            telemetry,
            request: Some(request),
            log,
            span,
        }
    }

    fn finish(&mut self) {
        if let Some(request) = self.request.take() {
            self.telemetry.metrics.record(&request);
            if let Some(log) = self.log.take() {
                log.write(&request);
            }
            if let Some(span) = self.span.take() {
                (*span).end(&request, &self.telemetry.spans);
            }
        }
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> Body for Recorded<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(request) = &mut this.request {
                    if let Some(data) = frame.data_ref() {
                        request.response_bytes += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref() {
                        request.response_bytes += header_bytes(trailers);
                        if let Some(status) = grpc_status(trailers) {
                            request.labels.grpc_status = Some(status);
                        }
                    }
                }
                if this.body.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(request) = &mut this.request {
                    request.labels.flags.set(Flags::UPSTREAM_RESET);
                }
                this.finish();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What a header block weighs on the wire, near enough (`name: value\r\n`).
pub fn header_bytes(headers: &http::HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().len() + value.len() + 4) as u64)
        .sum()
}

/// The `grpc-status` of headers (trailers-only responses) or trailers.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

/// A TCP stream whose reads are counted as they happen, into its series
/// (so long connections show their bytes before they close) and for the
/// connection itself (for its access log line, however it ends).
#[derive(Debug)]
pub struct Counted<S> {
    stream: S,
    series: Counter,
    total: u64,
}

impl<S> Counted<S> {
    pub fn new(stream: S, series: Counter) -> Self {
        Self {
            stream,
            series,
            total: 0,
        }
    }

    /// The bytes read from it so far.
    pub fn total(&self) -> u64 {
        self.total
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        this.series.inc_by(read);
        this.total += read;
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::peer::Exchange;
    use serde_json::json;

    fn peers() -> Peers {
        let metadata = serde_json::from_value(json!({
            "WORKLOAD_NAME": "reviews-v1", "NAMESPACE": "shop", "LABELS": {"app": "reviews", "version": "v1"},
        }))
        .unwrap();
        Peers {
            reporter: Reporter::Destination,
            source: Workload::unknown(),
            destination: Exchange::new("sidecar~x", &metadata).own.clone(),
            service: Service::of_authority("reviews.shop.svc.cluster.local:9080"),
            security: Security::None,
            principals: (None, None),
        }
    }

    #[test]
    fn requests_are_written_with_istios_names_and_labels() {
        let metrics = Arc::new(Metrics::default());
        for code in [200, 200, 503] {
            let mut flags = Flags::default();
            if code == 503 {
                flags.set(Flags::UPSTREAM_CONNECTION_FAILURE);
            }
            metrics.record(&Completed {
                labels: RequestLabels {
                    peers: peers(),
                    protocol: Protocol::Http,
                    code,
                    grpc_status: None,
                    flags,
                },
                started: Instant::now(),
                request_bytes: 120,
                response_bytes: 2_000,
            });
        }
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
            .unwrap_or_else(|| panic!("{text}"));
        for label in [
            "reporter=\"destination\"",
            "source_workload=\"unknown\"",
            "destination_workload=\"reviews-v1\"",
            "destination_workload_namespace=\"shop\"",
            "destination_app=\"reviews\"",
            "destination_version=\"v1\"",
            "destination_service=\"reviews.shop.svc.cluster.local\"",
            "destination_service_name=\"reviews\"",
            "destination_service_namespace=\"shop\"",
            "request_protocol=\"http\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"none\"",
        ] {
            assert!(line.contains(label), "{label} missing from {line}");
        }
        assert!(line.ends_with(" 2"), "{line}");
        assert!(text.contains("response_flags=\"UF\""), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_response_bytes_bucket{")
                    && l.contains("le=\"2500.0\"")
                    && l.contains("response_code=\"200\"")
                    && l.ends_with(" 2")),
            "{text}"
        );
    }

    #[test]
    fn flags_join_as_envoy_writes_them() {
        let mut flags = Flags::default();
        assert_eq!(flags.to_label(), "-");
        flags.set(Flags::DELAY_INJECTED);
        flags.set(Flags::FAULT_ABORT);
        assert_eq!(flags.to_label(), "DI,FI");
    }
}
