//! The listeners: bound and unbound as the configuration changes, each
//! connection handed to the listener for its original destination when
//! captured, then to the filter chain that matches it — HTTP (HTTP/1.1 and
//! HTTP/2 on one port) or TCP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connect::Stream;
use crate::error::Error;
use crate::http::Connection;
use crate::model::Snapshot;
use crate::model::listener::{ConnectionInfo, FilterChain, Listener, TcpRoute, Terminal};
use crate::model::rbac::{Rbac, Subject, Verdict};
use crate::sniff::Inspected;
use crate::state::State;
use crate::telemetry::Telemetry;
use crate::telemetry::access_log::Entry;
use crate::telemetry::metrics::{Counted, Flags, Peers, Refusal};
use crate::telemetry::peer::Service;
use crate::tls::{Carried, Secrets, Session};
use crate::upstream::{Outcome, Reach, Upstreams};

/// What every connection of the proxy shares.
#[derive(Clone, Debug)]
pub struct Shared {
    pub state: Arc<State>,
    /// The certificates and roots TLS contexts name.
    pub secrets: Arc<Secrets>,
    pub upstreams: Arc<Upstreams>,
    pub telemetry: Arc<Telemetry>,
}

/// How long a TLS client may take to finish its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a request's headers may take, buffered (Envoy's default
/// limit is 60 KiB): a client sending more is refused, not buffered.
const MAX_HEADERS_BYTES: usize = 64 * 1024;

/// Keeps the bound listeners in step with the configuration until `stop`
/// turns true, then drains them all. Marks the proxy ready once a published
/// configuration has all its listeners bound.
pub async fn manage(shared: Shared, mut stop: watch::Receiver<bool>, drain: Duration) {
    let Shared {
        state, upstreams, ..
    } = &shared;
    let ticking = tokio::spawn(keep_the_timer_near());
    let mut bound: HashMap<String, Bound> = HashMap::new();
    let mut changes = state.changes();
    loop {
        let published = *changes.borrow_and_update() > 0;
        let snapshot = state.snapshot();
        bound.retain(|name, listener| {
            let keep = snapshot
                .listeners
                .get(name)
                .is_some_and(|l| l.bind && l.address == listener.address);
            if !keep {
                // It stops accepting; what it accepted drains on its own.
                let _ = listener.stop.send(true);
                tracing::info!(listener = %name, address = %listener.address, "listener removed");
            }
            keep
        });
        let mut failed = false;
        for listener in snapshot.listeners.values().filter(|l| l.bind) {
            if bound.contains_key(&listener.name) {
                continue;
            }
            match bind(listener.address) {
                Ok(socket) => {
                    tracing::info!(listener = %listener.name, address = %listener.address, "listening");
                    let (stop, stopped) = watch::channel(false);
                    let task = tokio::spawn(accept(
                        socket,
                        listener.name.clone(),
                        shared.clone(),
                        stopped,
                        drain,
                    ));
                    bound.insert(
                        listener.name.clone(),
                        Bound {
                            address: listener.address,
                            stop,
                            task,
                        },
                    );
                }
                Err(error) => {
                    failed = true;
                    tracing::error!(listener = %listener.name, %error, "listener not bound; the others serve");
                }
            }
        }
        upstreams.retain(|name| snapshot.clusters.contains_key(name));
        if published && !failed {
            state.set_ready();
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = stopped(&mut stop) => break,
        }
    }
    state.set_draining();
    tracing::info!(?drain, "draining");
    for listener in bound.values() {
        let _ = listener.stop.send(true);
    }
    for (_, listener) in bound {
        let _ = listener.task.await;
    }
    ticking.abort();
}

/// Every request arms a timer for its route timeout (15 s by default).
/// When no timer is due sooner, arming one wakes the runtime's driver
/// through its eventfd — a write and an extra epoll round per request.
/// A timer that is always due within a second keeps that from happening,
/// at the price of one wake-up a second.
async fn keep_the_timer_near() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
    }
}

/// A bound listener: its accept loop, and how to stop it.
struct Bound {
    address: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Resolves once `stop` is true (the guard `wait_for` returns is not
/// `Send`, so it is dropped here).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

fn bind(address: SocketAddr) -> Result<TcpListener, Error> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .and_then(|socket| {
        socket.set_reuseaddr(true)?;
        socket.bind(address)?;
        socket.listen(1024)
    });
    socket.map_err(|source| Error::Bind { address, source })
}

/// Accepts until `stop`, then drains as Envoy's graceful drain does: for
/// the `drain` period it still accepts (a Service or load balancer may send
/// new connections for a while yet), every HTTP/1 response closing its
/// connection; then it closes the socket and gives what is left
/// [`DRAIN_CLOSE`] to finish — requests in flight complete, HTTP/2 gets a
/// GOAWAY, TCP connections are cut.
async fn accept(
    socket: TcpListener,
    name: String,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    // Its connections, and the signal for them to finish.
    let connections = TaskTracker::new();
    let shutdown = CancellationToken::new();
    // Set at the stop: until when it still accepts. A listener the
    // configuration dropped closes at once; only the proxy's own stop keeps
    // accepting through the drain period.
    let mut until: Option<tokio::time::Instant> = None;
    loop {
        let closing = async {
            match until {
                Some(until) => tokio::time::sleep_until(until).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(connection(
                        stream,
                        peer,
                        name.clone(),
                        shared.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(listener = %name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut stop), if until.is_none() => {
                let period = if shared.state.is_draining() { drain } else { Duration::ZERO };
                until = Some(tokio::time::Instant::now() + period);
            }
            _ = closing => break,
        }
    }
    drop(socket);
    let open = connections.len();
    shutdown.cancel();
    connections.close();
    let finish = if shared.state.is_draining() {
        DRAIN_CLOSE
    } else {
        drain
    };
    if tokio::time::timeout(finish, connections.wait())
        .await
        .is_err()
    {
        tracing::info!(listener = %name, open, "drain period over with connections open");
    }
}

/// How long connections still open when a drain period ends may take to
/// finish what they are doing.
const DRAIN_CLOSE: Duration = Duration::from_secs(1);

/// One accepted connection, on the configuration of the moment it arrived.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    name: String,
    shared: Shared,
    shutdown: CancellationToken,
) {
    let snapshot = shared.state.snapshot();
    let Some(mut listener) = snapshot.listeners.get(&name).cloned() else {
        return;
    };
    let Ok(local) = stream.local_addr() else {
        return;
    };
    // Where a captured connection was going (iptables' REDIRECT keeps it).
    let captured = listener
        .original_dst
        .then(|| original_destination(&stream))
        .flatten()
        .filter(|d| *d != local);
    let destination = captured.unwrap_or(local);
    if listener.use_original_dst
        && let Some(target) = listener_for(&snapshot, destination)
    {
        listener = target;
    }
    let inbound = listener.inbound && !shared.telemetry.gateway;
    let mut inspected = Inspected::default();
    if let Some(sniff) = listener.sniff {
        inspected = crate::sniff::inspect(&stream, sniff.timeout, sniff.tls, sniff.http).await;
        if inspected.timed_out && !sniff.continue_on_timeout {
            tracing::debug!(listener = %listener.name, %peer, "too little said before the listener filters' timeout; closed");
            return;
        }
    }
    let protocols: Vec<String> = match (&inspected.tls, inspected.http) {
        (Some(hello), _) => hello
            .alpn
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect(),
        (None, Some(http)) => vec![http.to_string()],
        (None, None) => Vec::new(),
    };
    let info = ConnectionInfo {
        destination: Some(destination),
        transport_protocol: if inspected.tls.is_some() {
            "tls"
        } else {
            "raw_buffer"
        },
        server_name: inspected
            .tls
            .as_ref()
            .and_then(|h| h.server_name.as_deref()),
        application_protocols: &protocols,
    };
    let Some(chain) = listener.find_chain(&info) else {
        tracing::debug!(listener = %listener.name, %peer, %destination, "no filter chain matches; closed");
        shared
            .telemetry
            .metrics
            .refused(&listener.name, "", Refusal::NoFilterChain);
        return;
    };
    let ends = Ends {
        peer,
        destination,
        captured,
        inbound,
    };
    let Some(tls) = &chain.tls else {
        let chosen = Chosen {
            listener: &listener,
            chain,
        };
        return serve(stream, ends, None, chosen, snapshot, shared, shutdown).await;
    };
    let offered = inspected.tls.map(|h| h.alpn).unwrap_or_default();
    let (config, local) = match tls.server_config(&shared.secrets, &offered) {
        Ok(config) => config,
        Err(error) => {
            tracing::warn!(listener = %listener.name, chain = %chain.name, %error, "TLS is not ready; connection closed");
            shared
                .telemetry
                .metrics
                .refused(&listener.name, &chain.name, Refusal::TlsNotReady);
            return;
        }
    };
    let accepted = tokio::time::timeout(
        TLS_HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config).accept(stream),
    )
    .await;
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(listener = %listener.name, %peer, %error, "TLS handshake failed");
            shared
                .telemetry
                .metrics
                .refused(&listener.name, &chain.name, Refusal::TlsHandshake);
            return;
        }
        Err(_) => {
            tracing::debug!(listener = %listener.name, %peer, "TLS handshake timed out");
            shared
                .telemetry
                .metrics
                .refused(&listener.name, &chain.name, Refusal::TlsHandshake);
            return;
        }
    };
    let session = Session::new(local, stream.get_ref().1.peer_certificates());
    serve(
        stream,
        ends,
        Some(session),
        Chosen {
            listener: &listener,
            chain,
        },
        snapshot,
        shared,
        shutdown,
    )
    .await
}

/// The listener that took a connection and the filter chain chosen for it.
#[derive(Clone, Copy, Debug)]
struct Chosen<'a> {
    listener: &'a Arc<Listener>,
    chain: &'a FilterChain,
}

/// Where a connection came from and went to.
#[derive(Clone, Copy, Debug)]
struct Ends {
    peer: SocketAddr,
    /// The address it reached: its original destination when captured.
    destination: SocketAddr,
    captured: Option<SocketAddr>,
    /// It takes traffic to this proxy's workload.
    inbound: bool,
}

/// A connection (plaintext, or once its TLS is terminated) judged by its
/// filter chain's network RBAC filters, then served by the chain's end:
/// HTTP or TCP.
async fn serve<S>(
    stream: S,
    ends: Ends,
    session: Option<Session>,
    Chosen { listener, chain }: Chosen<'_>,
    snapshot: Arc<Snapshot>,
    shared: Shared,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if !connection_authorized(&chain.rbac, &ends, session.as_ref()) {
        shared
            .telemetry
            .metrics
            .refused(&listener.name, &chain.name, Refusal::Rbac);
        return;
    }
    match &chain.terminal {
        Terminal::Http(manager) => {
            let state = Arc::clone(&shared.state);
            let connection = Arc::new(Connection {
                manager: Arc::clone(manager),
                inbound: ends.inbound,
                local: ends.destination,
                original_destination: ends.captured,
                peer: ends.peer,
                session,
                upstreams: shared.upstreams,
                telemetry: shared.telemetry,
            });
            // Which protocol the client speaks and how many HTTP/2 streams
            // are open: an HTTP/2 connection is told GOAWAY as soon as its
            // listener changes, busy or not, and once it has been idle.
            let requests = Arc::new(Requests::new());
            let counted = Arc::clone(&requests);
            let accepted = Arc::clone(listener);
            let service = hyper::service::service_fn(move |request| {
                let stream = counted.arrived(request.version());
                let snapshot = state.snapshot();
                // As in Envoy, a connection stays with the listener (and
                // filter chain) it was accepted on, and once that
                // listener has changed it drains: new connections get the
                // new one. Routes, clusters and endpoints are the
                // request's own snapshot's.
                let replaced = !still_serves(&snapshot, &accepted);
                let closing = replaced || state.is_draining();
                // Boxed: the request's future is large, and hyper moves
                // what this returns.
                let served = Box::into_pin(Box::write(
                    Box::new_uninit(),
                    crate::http::serve(Arc::clone(&connection), snapshot, request),
                ));
                async move {
                    let mut response = served.await?.map(|body| Holding {
                        body,
                        _stream: stream,
                    });
                    // Each HTTP/1 response closes its connection, so
                    // clients reconnect (to wherever the Service sends
                    // them now, when draining); HTTP/2 gets a GOAWAY
                    // (below).
                    if closing
                        && response.version() <= http::Version::HTTP_11
                        && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
                    {
                        response.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(manager.header_wait)
                .writev(false)
                .max_buf_size(MAX_HEADERS_BYTES);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADERS_BYTES as u32);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                () = replaced_for_h2(&shared.state, listener, &requests) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                () = idle_h2(&requests, manager.idle_timeout) => {
                    tracing::debug!(peer = %ends.peer, "HTTP/2 connection idle; GOAWAY");
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(peer = %ends.peer, %error, "HTTP connection ended");
            }
        }
        Terminal::Tcp(route) => {
            // Cut at the drain's end; a drain waits for it until then.
            tcp(stream, ends, session, route, &snapshot, &shared).await
        }
    }
}

/// Whether `listener` is still `snapshot`'s listener of its name (xDS
/// keeps the one held when it is sent again unchanged).
fn still_serves(snapshot: &Snapshot, listener: &Arc<Listener>) -> bool {
    snapshot
        .listeners
        .get(&listener.name)
        .is_some_and(|now| Arc::ptr_eq(now, listener))
}

/// What a connection's timers know of its requests: the protocol they
/// came in, and when its HTTP/2 streams were last all closed.
#[derive(Debug)]
struct Requests {
    started: Instant,
    h1: AtomicBool,
    h2: AtomicBool,
    /// Notified with the first HTTP/2 request (a permit, kept).
    first_h2: Notify,
    /// HTTP/2 streams open now.
    open: AtomicUsize,
    /// When an HTTP/2 stream last closed, in milliseconds from `started`.
    last_closed: AtomicU64,
}

impl Requests {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            h1: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            first_h2: Notify::new(),
            open: AtomicUsize::new(0),
            last_closed: AtomicU64::new(0),
        }
    }

    /// Notes a request; an HTTP/2 one is counted open until the returned
    /// guard is dropped (with its response's body, sent or not).
    fn arrived(self: &Arc<Self>, version: http::Version) -> Option<OpenStream> {
        if version != http::Version::HTTP_2 {
            if !self.h1.load(Ordering::Relaxed) {
                self.h1.store(true, Ordering::Relaxed);
            }
            return None;
        }
        if !self.h2.load(Ordering::Relaxed) {
            self.h2.store(true, Ordering::Relaxed);
            self.first_h2.notify_one();
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(OpenStream(Arc::clone(self)))
    }

    /// Since when no HTTP/2 stream has been open, if none is.
    fn quiet_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let closed = self.last_closed.load(Ordering::Relaxed);
        Some(self.started + Duration::from_millis(closed))
    }
}

/// An HTTP/2 stream counted open.
#[derive(Debug)]
struct OpenStream(Arc<Requests>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let requests = &self.0;
        let closed = requests.started.elapsed().as_millis() as u64;
        requests.last_closed.fetch_max(closed, Ordering::Relaxed);
        requests.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its HTTP/2 stream counted open until it is
/// dropped.
#[derive(Debug)]
struct Holding<B> {
    body: B,
    _stream: Option<OpenStream>,
}

impl<B> http_body::Body for Holding<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Resolves once `accepted` is no longer the configuration's listener of
/// its name and the connection speaks HTTP/2. An HTTP/1.1 connection is
/// not closed for it here, where a request could be on its way to it: it
/// is told to close with its next answer.
async fn replaced_for_h2(state: &State, accepted: &Arc<Listener>, requests: &Requests) {
    let mut changes = state.changes();
    while still_serves(&state.snapshot(), accepted) {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
    // The first HTTP/2 request left a permit: no wait once it came.
    requests.first_h2.notified().await;
}

/// Resolves once a connection that is not HTTP/1.1 has had no stream open
/// for `idle` (Envoy's idle timeout): from its start, or since its last
/// stream closed. An HTTP/1.1 connection's wait for its next request is
/// hyper's header timeout, which is never longer.
async fn idle_h2(requests: &Requests, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let mut check = requests.started + idle;
    loop {
        tokio::time::sleep_until(check.into()).await;
        match requests.quiet_since() {
            // Busy: look again an idle period on.
            None => check = Instant::now() + idle,
            Some(since) if since + idle > Instant::now() => check = since + idle,
            Some(_) if requests.h1.load(Ordering::Relaxed) => {
                return std::future::pending().await;
            }
            Some(_) => return,
        }
    }
}

/// Whether a chain's network RBAC filters let the connection through, on
/// its peer's identity and address and the port it reached; a refused
/// connection is closed before any byte goes upstream.
fn connection_authorized(filters: &[Rbac], ends: &Ends, session: Option<&Session>) -> bool {
    let subject = Subject {
        request: None,
        principal: session.and_then(|s| s.peer.as_deref()),
        authenticated: session.is_some_and(|s| s.mutual),
        peer: ends.peer,
        local: ends.destination,
    };
    for filter in filters {
        if let Verdict::Denied(policy) = filter.judge(&subject) {
            tracing::debug!(
                policy = policy.as_deref().unwrap_or("none"),
                principal = subject.principal.unwrap_or("-"),
                peer = %ends.peer,
                destination = %ends.destination,
                "rbac_access_denied_matched_policy: connection closed"
            );
            return false;
        }
    }
    true
}

/// The listener that owns a captured connection's original destination:
/// one bound to exactly that address, else one on its port on any address.
fn listener_for(snapshot: &Snapshot, destination: SocketAddr) -> Option<Arc<Listener>> {
    let unbound = || snapshot.listeners.values().filter(|l| !l.bind);
    unbound()
        .find(|l| l.address == destination)
        .or_else(|| {
            unbound()
                .find(|l| l.address.ip().is_unspecified() && l.address.port() == destination.port())
        })
        .cloned()
}

/// Opaque TCP: the bytes go to an endpoint of the route's cluster as they
/// are. `destination` is the address the connection reached, `captured`
/// the one it was going to before capture.
async fn tcp<S>(
    stream: S,
    ends: Ends,
    session: Option<Session>,
    route: &TcpRoute,
    snapshot: &Snapshot,
    shared: &Shared,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ends {
        peer,
        destination,
        captured,
        inbound,
    } = ends;
    let upstreams = &shared.upstreams;
    let (started, clock) = (std::time::SystemTime::now(), std::time::Instant::now());
    let Some((name, _)) = route
        .destinations
        .pick(|total| rand::random_range(0..total))
    else {
        return;
    };
    let Some(cluster) = snapshot.clusters.get(name) else {
        tracing::debug!(cluster = %name, "no such cluster; closed");
        return;
    };
    let state = upstreams.get(cluster);
    let hash = route
        .hash_source_ip
        .then(|| crate::model::hash::source_ip(peer.ip()));
    let Ok(_admission) = state.admit(false).await else {
        tracing::debug!(cluster = %name, "circuit breaker open (UO); closed");
        return;
    };
    let Some(host) =
        Reach::of(snapshot, cluster, captured).and_then(|r| state.choose(&r, &[], hash))
    else {
        tracing::debug!(cluster = %name, "no healthy endpoint (or ORIGINAL_DST for a connection that was not captured); closed");
        return;
    };
    let target = &host.address;
    let _in_flight = host.start();
    let connected = crate::connect::connect(
        cluster,
        &shared.secrets,
        target,
        cluster.tls_for(host.mesh).map(Arc::as_ref),
        Carried::Tcp,
    )
    .await;
    let outcome = match &connected {
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::LocalFailure,
    };
    state.record(&host, outcome);
    // Who is at the other end of a TCP connection is known only from
    // mutual TLS: inbound the caller's, outbound the upstream's.
    let session = if inbound {
        session.as_ref()
    } else {
        connected.as_ref().ok().and_then(Stream::session)
    };
    let peers = Peers::seen_by(
        inbound,
        shared.telemetry.exchange.own.clone(),
        None,
        cluster.service.clone().unwrap_or_else(Service::unknown),
        session,
    );
    let metrics = &shared.telemetry.metrics;
    let upstream_host = target.to_string();
    let log = |flags: Flags, received: u64, sent: u64| {
        let entry = Entry {
            started,
            duration: clock.elapsed(),
            request: None,
            response: None,
            code: None,
            flags,
            bytes_received: received,
            bytes_sent: sent,
            upstream_host: Some(&upstream_host),
            upstream_cluster: Some(&cluster.name),
            downstream_local: destination,
            downstream_remote: peer,
            route_name: None,
            grpc_status: None,
        };
        for access_log in route.access_logs.iter() {
            access_log.write(&entry);
        }
    };
    let upstream = match connected {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::debug!(%target, %error, "TCP upstream connect failed");
            metrics
                .open(peers, Flags::UPSTREAM_CONNECTION_FAILURE)
                .close();
            log(Flags::UPSTREAM_CONNECTION_FAILURE, 0, 0);
            return;
        }
    };
    let series = metrics.open(peers, Flags::default());
    let mut downstream = Counted::new(stream, series.received.clone());
    let mut upstream = Counted::new(upstream, series.sent.clone());
    if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        tracing::debug!(%target, %error, "TCP connection ended");
    }
    series.close();
    log(Flags::default(), downstream.total(), upstream.total());
}

/// Where a connection redirected by iptables was going (SO_ORIGINAL_DST).
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    match stream.local_addr().ok()? {
        SocketAddr::V4(_) => {
            let addr = getsockopt(stream, sockopt::OriginalDst).ok()?;
            let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(addr.sin_port))))
        }
        SocketAddr::V6(_) => {
            let addr = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
            let ip = std::net::Ipv6Addr::from(addr.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(addr.sin6_port))))
        }
    }
}
