//! One endpoint's HTTP connections: HTTP/1.1 connections kept alive
//! between requests, the one freed last taken first (so the rest can
//! idle out), and one HTTP/2 connection every request shares. As
//! Envoy's connection pools, they belong to the endpoint: a request
//! reaches its connection without a lookup by key, and an HTTP/1.1
//! connection comes back to the pool when its response has been read,
//! from the response body itself.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::connect::{Stream, connect};
use crate::model::Cluster;
use crate::model::cluster::Target;
use crate::tls::{Carried, Secrets, Session, UpstreamTls};
use crate::upstream::Body;

/// How often free connections are looked at ([`Pool::close_idle`]): a
/// connection idle past its cluster's idle timeout is never taken again,
/// and closed at the next look.
pub const IDLE_SWEEP: Duration = Duration::from_secs(15);

/// An endpoint's connections.
#[derive(Debug, Default)]
pub struct Pool {
    /// Free HTTP/1.1 connections, the one freed last at the end.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection; locked while it is being opened, so
    /// requests arriving meanwhile share it.
    shared: tokio::sync::Mutex<Option<Shared>>,
    /// Looks the HTTP/2 connection has had no request for.
    shared_sweeps: AtomicU32,
    /// Streams the HTTP/2 connection has been given.
    shared_streams: AtomicU32,
}

/// A free HTTP/1.1 connection.
#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<Body>,
    session: Option<Session>,
    /// Since when it has been free.
    freed: Instant,
    /// Requests it has been given.
    served: u32,
}

impl Idle {
    /// Whether it may take another request: open, not idle past
    /// `idle_timeout`.
    fn usable(&self, idle_timeout: Option<Duration>, now: Instant) -> bool {
        !self.sender.is_closed()
            && idle_timeout.is_none_or(|limit| now.saturating_duration_since(self.freed) < limit)
    }
}

#[derive(Clone, Debug)]
struct Shared {
    sender: http2::SendRequest<Body>,
    session: Option<Session>,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be opened.
    Connect(io::Error),
    /// The connection failed before the answer came.
    Reset(hyper::Error),
}

/// How to open a connection to the endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Dial<'a> {
    pub cluster: &'a Cluster,
    pub secrets: &'a Secrets,
    pub target: &'a Target,
    /// TLS to the endpoint, when the cluster says so for it.
    pub tls: Option<&'a UpstreamTls>,
}

impl Dial<'_> {
    async fn open(self, carried: Carried) -> Result<TokioIo<Stream>, Failure> {
        connect(self.cluster, self.secrets, self.target, self.tls, carried)
            .await
            .map(TokioIo::new)
            .map_err(Failure::Connect)
    }
}

impl Pool {
    /// Sends `request` over a free HTTP/1.1 connection, or a new one when
    /// none is free. Its URI is sent as it is: origin-form.
    pub async fn send_http1(
        self: &Arc<Self>,
        dial: Dial<'_>,
        mut request: Request<Body>,
    ) -> Result<Response<Answer>, Failure> {
        let settings = dial.cluster.connections;
        loop {
            let (mut idle, reused) = match self.take(settings.idle_timeout) {
                Some(idle) => (idle, true),
                // Boxed: opening (TLS included) is rare and large, and
                // would make every request's future as large.
                None => (Box::pin(self.open_http1(dial)).await?, false),
            };
            idle.served += 1;
            match idle.sender.try_send_request(request).await {
                Ok(response) => return Ok(self.answer(response, idle, settings.max_requests)),
                // The server closed the connection as it was taken: the
                // request was not sent, and goes on another.
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(Failure::Reset(error.into_error())),
                },
            }
        }
    }

    /// Sends `request` over the endpoint's HTTP/2 connection, opened when
    /// there is none (or it closed). Its URI must be absolute.
    pub async fn send_http2(
        &self,
        dial: Dial<'_>,
        request: Request<Body>,
    ) -> Result<Response<Answer>, Failure> {
        let Shared {
            mut sender,
            session,
        } = Box::pin(self.http2(dial)).await?;
        self.shared_sweeps.store(0, Ordering::Relaxed);
        let mut response = sender.send_request(request).await.map_err(Failure::Reset)?;
        if let Some(session) = session {
            response.extensions_mut().insert(session);
        }
        Ok(response.map(|body| Answer { body, back: None }))
    }

    /// Closes the connections free for `idle_timeout` or longer and
    /// forgets those the server closed. The HTTP/2 connection goes once no
    /// request has used it for as many looks as cover `idle_timeout`
    /// (streams still open on it finish first).
    pub fn close_idle(&self, idle_timeout: Option<Duration>) {
        if let Some(limit) = idle_timeout {
            let looks = limit.div_duration_f64(IDLE_SWEEP).ceil().max(1.0) as u32;
            if self.shared_sweeps.fetch_add(1, Ordering::Relaxed) + 1 >= looks
                && let Ok(mut shared) = self.shared.try_lock()
            {
                *shared = None;
            }
        }
        let now = Instant::now();
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|i| i.usable(idle_timeout, now));
    }

    /// Whether it holds no connection.
    pub fn is_empty(&self) -> bool {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
            && self.shared.try_lock().is_ok_and(|shared| shared.is_none())
    }

    /// The newest free HTTP/1.1 connection that is ready; those the
    /// server closed or idle past `idle_timeout` are dropped on the way.
    fn take(&self, idle_timeout: Option<Duration>) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.is_empty() {
            return None;
        }
        let now = Instant::now();
        idle.retain(|i| i.usable(idle_timeout, now));
        // A connection whose last answer was just read may not be ready
        // for a moment yet; it stays for the next request.
        let ready = idle.iter().rposition(|i| i.sender.is_ready())?;
        Some(idle.remove(ready))
    }

    fn put(&self, idle: Idle) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(idle);
    }

    async fn open_http1(&self, dial: Dial<'_>) -> Result<Idle, Failure> {
        let io = dial.open(Carried::Http1).await?;
        let session = io.inner().session().cloned();
        let (sender, connection) = http1::Builder::new()
            .writev(false)
            .handshake(io)
            .await
            .map_err(Failure::Reset)?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(Idle {
            sender,
            session,
            freed: Instant::now(),
            served: 0,
        })
    }

    async fn http2(&self, dial: Dial<'_>) -> Result<Shared, Failure> {
        let max_requests = dial.cluster.connections.max_requests;
        let mut shared = self.shared.lock().await;
        if let Some(open) = shared.as_ref().filter(|s| !s.sender.is_closed()) {
            let open = open.clone();
            self.after_stream(&mut shared, max_requests);
            return Ok(open);
        }
        let io = dial.open(Carried::Http2).await?;
        let session = io.inner().session().cloned();
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(Failure::Reset)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream HTTP/2 connection ended");
            }
        });
        let open = Shared { sender, session };
        *shared = Some(open.clone());
        self.shared_streams.store(0, Ordering::Relaxed);
        self.after_stream(&mut shared, max_requests);
        Ok(open)
    }

    /// Counts a stream given to the HTTP/2 connection; at `max_requests`
    /// the connection takes no more (those open on it finish).
    fn after_stream(&self, shared: &mut Option<Shared>, max_requests: Option<u32>) {
        let streams = self.shared_streams.fetch_add(1, Ordering::Relaxed) + 1;
        if max_requests.is_some_and(|max| streams >= max) {
            *shared = None;
        }
    }

    /// The response of an HTTP/1.1 connection, whose body gives the
    /// connection back when read to its end. A connection switched to
    /// another protocol does not come back.
    /// One that has served `max_requests` does not come back either.
    fn answer(
        self: &Arc<Self>,
        mut response: Response<Incoming>,
        idle: Idle,
        max_requests: Option<u32>,
    ) -> Response<Answer> {
        if let Some(session) = &idle.session {
            response.extensions_mut().insert(session.clone());
        }
        let spent = max_requests.is_some_and(|max| idle.served >= max);
        let back = (response.status() != StatusCode::SWITCHING_PROTOCOLS && !spent).then(|| Back {
            pool: Arc::clone(self),
            idle,
        });
        response.map(|body| Answer { body, back })
    }
}

/// An upstream response body; over HTTP/1.1 it holds its connection
/// until the body has been read, then returns it to the pool. A body
/// dropped unread takes its connection with it (hyper closes it once the
/// response is over).
#[derive(Debug)]
pub struct Answer {
    body: Incoming,
    back: Option<Back>,
}

#[derive(Debug)]
struct Back {
    pool: Arc<Pool>,
    idle: Idle,
}

impl Answer {
    fn give_back(&mut self) {
        if let Some(Back { pool, mut idle }) = self.back.take() {
            idle.freed = Instant::now();
            pool.put(idle);
        }
    }
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.give_back(),
            Some(Ok(_)) if this.body.is_end_stream() => this.give_back(),
            Some(Ok(_)) => {}
            Some(Err(_)) => this.back = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answer {
    /// A body with nothing to read (a 204, a HEAD's answer) is never
    /// polled: it is over when it goes.
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}
