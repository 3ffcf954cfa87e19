//! The proxy's side of a cluster: pooled keep-alive connections to its
//! endpoints, circuit breakers, outlier detection and the choice of
//! endpoint. Kept across configuration swaps
//! for as long as the cluster itself does not change, so pools and
//! balancing state outlive a route change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use futures::future::Either;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::model::cluster::Discovery;
use crate::model::cluster::{LbPolicy, Protocol, Target};
use crate::model::hash::{Maglev, Ring};
use crate::model::{Cluster, Endpoints, Snapshot};
use crate::pool::{Answer, Dial, Failure, IDLE_SWEEP, Pool};
use crate::tls::Secrets;

/// The body of requests and responses on the data path.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// How many original destinations a passthrough cluster keeps the
/// connections of.
const ORIGINALS_KEPT: usize = 1024;

/// Where a cluster's requests and connections can go.
#[derive(Debug)]
pub enum Reach {
    /// Its endpoints, one chosen each time by its policy.
    Endpoints(Arc<Endpoints>),
    /// The captured connection's original destination (ORIGINAL_DST).
    Original(std::net::SocketAddr),
}

impl Reach {
    /// `cluster`'s reach for a connection captured on its way to
    /// `captured`: its endpoints, or that destination for ORIGINAL_DST —
    /// none for a connection that was not captured, which would only come
    /// back to the proxy.
    pub fn of(
        snapshot: &Snapshot,
        cluster: &Cluster,
        captured: Option<std::net::SocketAddr>,
    ) -> Option<Self> {
        match cluster.discovery {
            Discovery::OriginalDst => captured.map(Self::Original),
            _ => snapshot.endpoints_of(cluster).map(Self::Endpoints),
        }
    }
}

/// Every cluster's upstream state, by name.
#[derive(Debug)]
pub struct Upstreams {
    clusters: Mutex<crate::model::ByName<Arc<ClusterState>>>,
    pub secrets: Arc<Secrets>,
}

impl Upstreams {
    pub fn new(secrets: Arc<Secrets>) -> Self {
        Self {
            clusters: Mutex::default(),
            secrets,
        }
    }

    /// The state for `cluster`, made anew when its configuration changed.
    pub fn get(&self, cluster: &Arc<Cluster>) -> Arc<ClusterState> {
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = clusters.get(&cluster.name)
            && Arc::ptr_eq(&state.config, cluster)
        {
            return Arc::clone(state);
        }
        let state = Arc::new(ClusterState::new(
            Arc::clone(cluster),
            Arc::clone(&self.secrets),
        ));
        clusters.insert(cluster.name.clone(), Arc::clone(&state));
        state
    }

    /// Closes the connections idle too long, in every cluster.
    fn close_idle(&self) {
        let clusters: Vec<Arc<ClusterState>> = self
            .clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for cluster in clusters {
            let idle_timeout = cluster.config.connections.idle_timeout;
            for host in &cluster.hosts.load().states {
                host.pool.close_idle(idle_timeout);
            }
            cluster
                .originals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, host| {
                    host.pool.close_idle(idle_timeout);
                    host.active.load(Ordering::Relaxed) > 0 || !host.pool.is_empty()
                });
        }
    }

    /// Forgets clusters no longer configured.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| keep(name));
    }
}

/// Closes idle connections that requests have not come to take, looking
/// every [`IDLE_SWEEP`], for as long as `upstreams` are in use.
pub async fn close_idle(upstreams: std::sync::Weak<Upstreams>) {
    let mut every = tokio::time::interval(IDLE_SWEEP);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(upstreams) = upstreams.upgrade() else {
            return;
        };
        upstreams.close_idle();
    }
}

/// One cluster's upstream side: its connection pools, its circuit
/// breakers, and the state of each endpoint (requests in flight for
/// least-request, failures and ejection for outlier detection).
#[derive(Debug)]
pub struct ClusterState {
    pub config: Arc<Cluster>,
    secrets: Arc<Secrets>,
    next: AtomicUsize,
    /// Milliseconds since the epoch until which the last ejection lasts:
    /// before then some endpoint may be ejected.
    ejections_end: AtomicU64,
    requests: AtomicU32,
    pending: AtomicU32,
    retries: AtomicU32,
    /// HTTP/1.1 connections busy: one request each.
    connections: Arc<Semaphore>,
    hosts: ArcSwap<Hosts>,
    /// The original destinations requests went to (ORIGINAL_DST), for
    /// their connections.
    originals: Mutex<HashMap<std::net::SocketAddr, Arc<Host>>>,
    /// Ejection times are kept as milliseconds since this instant.
    epoch: Instant,
}

/// The state of each endpoint of the endpoints last seen, in their order.
#[derive(Debug, Default)]
struct Hosts {
    source: Option<Arc<Endpoints>>,
    states: Vec<Arc<Host>>,
    /// Which of them EDS says are healthy, by index.
    healthy: Vec<usize>,
    /// Whether those all have the same weight.
    equal: bool,
    /// The RING_HASH ring or MAGLEV table of the healthy ones, made when
    /// the first hashed request needs it (none for the other policies).
    consistent: OnceLock<Option<Consistent>>,
}

#[derive(Debug)]
enum Consistent {
    Ring(Ring),
    Maglev(Maglev),
}

impl Consistent {
    /// The ring or table of `endpoints` (their healthy ones) for a cluster
    /// balancing by `policy`, if it balances by hash.
    fn of(policy: LbPolicy, endpoints: &Endpoints) -> Option<Self> {
        let weighted = || -> Vec<(String, u32)> {
            endpoints
                .items
                .iter()
                .map(|e| (e.address.to_string(), if e.healthy { e.weight } else { 0 }))
                .collect()
        };
        match policy {
            LbPolicy::Maglev { size } => Some(Self::Maglev(Maglev::new(&weighted(), size))),
            LbPolicy::RingHash { minimum, maximum } => {
                Some(Self::Ring(Ring::new(&weighted(), minimum, maximum)))
            }
            _ => None,
        }
    }
}

/// One endpoint's state, kept across EDS updates while it stays.
#[derive(Debug)]
pub struct Host {
    pub address: Target,
    /// A mesh proxy runs beside it (see [`Endpoint::mesh`]).
    ///
    /// [`Endpoint::mesh`]: crate::model::cluster::Endpoint::mesh
    pub mesh: bool,
    /// The authority of requests to it over HTTP/2.
    pub authority: http::uri::Authority,
    /// Its connections.
    pub pool: Arc<Pool>,
    active: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Milliseconds since the cluster's epoch until which it is ejected;
    /// 0 when it is not.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
}

impl Host {
    fn new(address: Target, mesh: bool) -> Self {
        Self {
            authority: address
                .to_string()
                .parse()
                .unwrap_or_else(|_| http::uri::Authority::from_static("upstream")),
            address,
            mesh,
            pool: Arc::default(),
            active: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> HostGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        HostGuard(Arc::clone(self))
    }
}

/// A request in flight to a host.
#[derive(Debug)]
pub struct HostGuard(Arc<Host>);

impl Drop for HostGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How an attempt at an endpoint went, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer below 500.
    Success,
    /// A 5xx answer; 502, 503 and 504 are gateway failures.
    ServerError(u16),
    /// Connection failure, reset or timeout: a gateway failure.
    LocalFailure,
}

/// The circuit breakers said no: Envoy's UO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow;

/// A request admitted by the circuit breakers, counted until it drops
/// (with its response body).
#[derive(Debug)]
pub struct Admission {
    cluster: Arc<ClusterState>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.cluster.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry admitted by the `max_retries` breaker or the retry budget.
#[derive(Debug)]
pub struct RetryAdmission(Arc<ClusterState>);

impl Drop for RetryAdmission {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Below this share of endpoints available, ejection is ignored and all
/// healthy endpoints take traffic (Envoy's panic threshold, 50 %).
const PANIC_PERCENT: usize = 50;

impl ClusterState {
    fn new(config: Arc<Cluster>, secrets: Arc<Secrets>) -> Self {
        let connections = (config.limits.max_connections as usize).min(Semaphore::MAX_PERMITS);
        Self {
            secrets,
            next: AtomicUsize::new(0),
            ejections_end: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            connections: Arc::new(Semaphore::new(connections)),
            hosts: ArcSwap::from_pointee(Hosts::default()),
            originals: Mutex::default(),
            epoch: Instant::now(),
            config,
        }
    }

    /// Whether requests to it go as HTTP/2, for a request that arrived as
    /// HTTP/2 (`downstream_h2`) or not.
    pub fn speaks_h2(&self, downstream_h2: bool) -> bool {
        match self.config.protocol {
            Protocol::Http1 => false,
            Protocol::Http2 => true,
            Protocol::Downstream => downstream_h2,
        }
    }

    /// Sends `request` to `host` over one of its connections, HTTP/2
    /// when `h2` (the URI absolute then, origin-form over HTTP/1.1), TLS
    /// when the cluster says so for the endpoint.
    pub fn send<'a>(
        &'a self,
        host: &'a Host,
        h2: bool,
        request: Request<Body>,
    ) -> impl Future<Output = Result<Response<Answer>, Failure>> + 'a {
        let dial = Dial {
            cluster: &self.config,
            secrets: &self.secrets,
            target: &host.address,
            tls: self.config.tls_for(host.mesh).map(Arc::as_ref),
        };
        // Not an async fn: its future would hold the pool's, moved in.
        if h2 {
            Either::Left(host.pool.send_http2(dial, request))
        } else {
            Either::Right(host.pool.send_http1(dial, request))
        }
    }

    /// Admits a request past the circuit breakers: at most `max_requests`
    /// in flight; over HTTP/1.1 one per connection and at most
    /// `max_connections` of those, with up to `max_pending_requests`
    /// waiting for one.
    pub async fn admit(self: &Arc<Self>, h2: bool) -> Result<Admission, Overflow> {
        let limits = self.config.limits;
        if self.requests.fetch_add(1, Ordering::Relaxed) >= limits.max_requests {
            self.requests.fetch_sub(1, Ordering::Relaxed);
            return Err(Overflow);
        }
        let mut admission = Admission {
            cluster: Arc::clone(self),
            _connection: None,
        };
        if h2 {
            return Ok(admission);
        }
        let permit = match Arc::clone(&self.connections).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if self.pending.fetch_add(1, Ordering::Relaxed) >= limits.max_pending_requests {
                    self.pending.fetch_sub(1, Ordering::Relaxed);
                    return Err(Overflow);
                }
                let permit = Arc::clone(&self.connections).acquire_owned().await;
                self.pending.fetch_sub(1, Ordering::Relaxed);
                permit.map_err(|_| Overflow)?
            }
        };
        admission._connection = Some(permit);
        Ok(admission)
    }

    /// Admits one more retry, under `max_retries` at once or, with a
    /// retry budget, under its share of the requests in flight (pending
    /// ones included, as Envoy counts them).
    pub fn admit_retry(self: &Arc<Self>) -> Option<RetryAdmission> {
        let allowed = self
            .config
            .limits
            .retries_allowed(self.requests.load(Ordering::Relaxed));
        if self.retries.fetch_add(1, Ordering::Relaxed) >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(RetryAdmission(Arc::clone(self)))
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The state of each of `endpoints`, made when they change: what is
    /// known of an address that stays is kept.
    fn hosts(&self, endpoints: &Arc<Endpoints>) -> Arc<Hosts> {
        let hosts = self.hosts.load_full();
        if hosts
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, endpoints))
        {
            return hosts;
        }
        let known: HashMap<(&Target, bool), &Arc<Host>> = hosts
            .states
            .iter()
            .map(|h| ((&h.address, h.mesh), h))
            .collect();
        let states = endpoints
            .items
            .iter()
            .map(|e| match known.get(&(&e.address, e.mesh)) {
                Some(host) => Arc::clone(host),
                None => Arc::new(Host::new(e.address.clone(), e.mesh)),
            })
            .collect();
        let healthy: Vec<usize> = (0..endpoints.items.len())
            .filter(|i| endpoints.items[*i].healthy)
            .collect();
        let fresh = Arc::new(Hosts {
            source: Some(Arc::clone(endpoints)),
            states,
            equal: equal_weights(endpoints, &healthy),
            healthy,
            consistent: OnceLock::new(),
        });
        self.hosts.store(Arc::clone(&fresh));
        fresh
    }

    /// The endpoint for the next attempt or connection: the one `reach`
    /// names, or one of its endpoints by [`Self::pick`].
    pub fn choose(
        &self,
        reach: &Reach,
        tried: &[Arc<Host>],
        hash: Option<u64>,
    ) -> Option<Arc<Host>> {
        match reach {
            Reach::Endpoints(endpoints) => match hash {
                Some(hash) => self.by_hash(endpoints, tried, hash),
                None => self.pick(endpoints, tried),
            },
            Reach::Original(destination) => Some(self.original(*destination)),
        }
    }

    /// The host of an original destination, kept (with its connections)
    /// for the next request there; when too many are kept, those without
    /// a request in flight go.
    fn original(&self, destination: std::net::SocketAddr) -> Arc<Host> {
        let mut originals = self.originals.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(host) = originals.get(&destination) {
            return Arc::clone(host);
        }
        if originals.len() >= ORIGINALS_KEPT {
            originals.retain(|_, host| host.active.load(Ordering::Relaxed) > 0);
        }
        let host = Arc::new(Host::new(Target::Ip(destination), false));
        originals.insert(destination, Arc::clone(&host));
        host
    }

    /// An endpoint for the next attempt by the cluster's policy, among the
    /// healthy ones not ejected (all healthy ones when too few are left),
    /// avoiding `tried` when another is available.
    pub fn pick(&self, endpoints: &Arc<Endpoints>, tried: &[Arc<Host>]) -> Option<Arc<Host>> {
        let hosts = self.hosts(endpoints);
        let now = self.now();
        // Nothing ejected and nothing to avoid (every first attempt while
        // all is well): the healthy endpoints as EDS last gave them.
        if tried.is_empty() && now >= self.ejections_end.load(Ordering::Relaxed) {
            return self.by_policy(&hosts, endpoints, &hosts.healthy, hosts.equal);
        }
        let available: Vec<usize> = hosts
            .healthy
            .iter()
            .copied()
            .filter(|i| !hosts.states[*i].ejected(now))
            .collect();
        let mut candidates = if available.len() * 100 < hosts.healthy.len() * PANIC_PERCENT {
            hosts.healthy.clone()
        } else {
            available
        };
        if !tried.is_empty() {
            let untried: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|i| !tried.iter().any(|t| Arc::ptr_eq(t, &hosts.states[*i])))
                .collect();
            if !untried.is_empty() {
                candidates = untried;
            }
        }
        let equal = equal_weights(endpoints, &candidates);
        self.by_policy(&hosts, endpoints, &candidates, equal)
    }

    /// The endpoint a request of `hash` goes to on the cluster's ring or
    /// table (of the healthy endpoints): the first on from its place that
    /// is neither ejected nor in `tried` — so a key moves only while its
    /// own endpoint is out — or its own when all are. A cluster that does
    /// not balance by hash picks as it does.
    fn by_hash(
        &self,
        endpoints: &Arc<Endpoints>,
        tried: &[Arc<Host>],
        hash: u64,
    ) -> Option<Arc<Host>> {
        let hosts = self.hosts(endpoints);
        let Some(consistent) = hosts
            .consistent
            .get_or_init(|| Consistent::of(self.config.lb, endpoints))
        else {
            return self.pick(endpoints, tried);
        };
        let now = self.now();
        let usable = |i: &usize| {
            let host = &hosts.states[*i];
            !host.ejected(now) && !tried.iter().any(|t| Arc::ptr_eq(t, host))
        };
        let (own, usable) = match consistent {
            Consistent::Ring(ring) => (ring.walk(hash).next(), ring.walk(hash).find(usable)),
            Consistent::Maglev(table) => (table.walk(hash).next(), table.walk(hash).find(usable)),
        };
        usable.or(own).map(|i| Arc::clone(&hosts.states[i]))
    }

    /// One of `candidates` (indices into `hosts`) by the cluster's policy.
    fn by_policy(
        &self,
        hosts: &Hosts,
        endpoints: &Endpoints,
        candidates: &[usize],
        equal: bool,
    ) -> Option<Arc<Host>> {
        let host = |n: usize| &hosts.states[candidates[n]];
        let weight = |i: usize| endpoints.items[i].weight;
        let chosen = match (self.config.lb, candidates.len()) {
            (_, 0) => return None,
            (_, 1) => host(0),
            (LbPolicy::RoundRobin, n) if equal => {
                host(self.next.fetch_add(1, Ordering::Relaxed) % n)
            }
            // Power of two choices: the less loaded of two at random.
            (LbPolicy::LeastRequest, n) if equal => {
                let first = rand::random_range(0..n);
                let second = (first + rand::random_range(1..n)) % n;
                let (a, b) = (host(first), host(second));
                if b.active.load(Ordering::Relaxed) < a.active.load(Ordering::Relaxed) {
                    b
                } else {
                    a
                }
            }
            // By weight at random (and RANDOM).
            _ => {
                let total: u64 = candidates.iter().map(|i| u64::from(weight(*i))).sum();
                let mut point = rand::random_range(0..total);
                let found = candidates.iter().find(|i| {
                    let hit = point < u64::from(weight(**i));
                    point = point.saturating_sub(u64::from(weight(**i)));
                    hit
                })?;
                &hosts.states[*found]
            }
        };
        Some(Arc::clone(chosen))
    }

    /// Counts an attempt's outcome against its endpoint, and ejects the
    /// endpoint when outlier detection says so: after so many consecutive
    /// 5xx or gateway failures, for the base ejection time times its
    /// ejections so far (at most the maximum; one fewer for each interval
    /// it has served since it came back), while no more than the maximum
    /// share of endpoints is ejected (at least one may be).
    pub fn record(&self, host: &Host, outcome: Outcome) {
        let Some(outlier) = self.config.outlier else {
            return;
        };
        let (server, gateway) = match outcome {
            Outcome::Success => {
                host.consecutive_5xx.store(0, Ordering::Relaxed);
                host.consecutive_gateway.store(0, Ordering::Relaxed);
                return;
            }
            Outcome::ServerError(code) => (true, matches!(code, 502..=504)),
            Outcome::LocalFailure => (true, true),
        };
        let fives = host
            .consecutive_5xx
            .fetch_add(u32::from(server), Ordering::Relaxed)
            + 1;
        let gateways = if gateway {
            host.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            host.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        let tripped = (outlier.consecutive_5xx > 0 && fives >= outlier.consecutive_5xx)
            || (outlier.consecutive_gateway > 0 && gateways >= outlier.consecutive_gateway);
        let now = self.now();
        if !tripped || host.ejected(now) {
            return;
        }
        let hosts = self.hosts.load();
        let total = hosts.states.len();
        let ejected = hosts.states.iter().filter(|h| h.ejected(now)).count();
        let allowed = (total * outlier.max_ejection_percent as usize / 100).max(1);
        if ejected >= allowed {
            return;
        }
        // Envoy takes one off an endpoint's ejections at each interval it
        // spends in service; counted here from when it came back.
        let back_since = host.ejected_until.load(Ordering::Relaxed);
        let served = now.saturating_sub(back_since) / (outlier.interval.as_millis() as u64).max(1);
        let earlier = host.ejections.load(Ordering::Relaxed);
        let ejections = earlier.saturating_sub(served.min(u32::MAX.into()) as u32) + 1;
        host.ejections.store(ejections, Ordering::Relaxed);
        let time = (outlier.base_ejection_time * ejections)
            .min(outlier.max_ejection_time.max(outlier.base_ejection_time));
        let until = now + time.as_millis() as u64;
        host.ejected_until.store(until, Ordering::Relaxed);
        self.ejections_end.fetch_max(until, Ordering::Relaxed);
        host.consecutive_5xx.store(0, Ordering::Relaxed);
        host.consecutive_gateway.store(0, Ordering::Relaxed);
        tracing::info!(cluster = %self.config.name, endpoint = %host.address, ?time, "endpoint ejected");
    }
}

/// Whether the endpoints at `indices` all have the same weight.
fn equal_weights(endpoints: &Endpoints, indices: &[usize]) -> bool {
    indices
        .windows(2)
        .all(|w| endpoints.items[w[0]].weight == endpoints.items[w[1]].weight)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cluster::{Connections, Discovery, Endpoint};
    use crate::model::resilience::{Limits, Outlier};
    use std::time::Duration;

    fn secrets() -> Arc<Secrets> {
        Arc::new(Secrets::new(Arc::default(), false))
    }

    fn cluster(lb: LbPolicy, outlier: Option<Outlier>) -> Arc<Cluster> {
        connecting(lb, outlier, Connections::default())
    }

    fn connecting(
        lb: LbPolicy,
        outlier: Option<Outlier>,
        connections: Connections,
    ) -> Arc<Cluster> {
        Arc::new(Cluster {
            name: "c".into(),
            discovery: Discovery::Eds("c".into()),
            lb,
            connect_timeout: Duration::from_secs(1),
            protocol: Protocol::Http1,
            connections,
            limits: Limits {
                max_connections: 1,
                max_pending_requests: 1,
                ..Limits::default()
            },
            outlier,
            service: None,
            transport: Default::default(),
            bind: None,
            keepalive: None,
        })
    }

    fn endpoints(weights: &[(u16, u32, bool)]) -> Arc<Endpoints> {
        Arc::new(Endpoints {
            items: weights
                .iter()
                .map(|(port, weight, healthy)| Endpoint {
                    address: Target::Ip(([127, 0, 0, 1], *port).into()),
                    weight: *weight,
                    healthy: *healthy,
                    mesh: false,
                })
                .collect(),
        })
    }

    fn port(host: &Host) -> u16 {
        match &host.address {
            Target::Ip(a) => a.port(),
            Target::Dns(_, p) => *p,
        }
    }

    #[tokio::test]
    async fn round_robin_takes_turns_among_healthy_endpoints() {
        let state = ClusterState::new(cluster(LbPolicy::RoundRobin, None), secrets());
        let endpoints = endpoints(&[(1, 1, true), (2, 1, false), (3, 1, true)]);
        let picked: Vec<u16> = (0..4)
            .map(|_| port(&state.pick(&endpoints, &[]).unwrap()))
            .collect();
        assert_eq!(picked, [1, 3, 1, 3]);
        assert!(
            state
                .pick(&self::endpoints(&[(1, 1, false)]), &[])
                .is_none()
        );
    }

    #[tokio::test]
    async fn weights_bias_the_choice() {
        let state = ClusterState::new(cluster(LbPolicy::RoundRobin, None), secrets());
        let endpoints = endpoints(&[(1, 9, true), (2, 1, true)]);
        let first = (0..2000)
            .filter(|_| port(&state.pick(&endpoints, &[]).unwrap()) == 1)
            .count();
        assert!((1700..1900).contains(&first), "{first} of 2000");
    }

    #[tokio::test]
    async fn least_request_prefers_the_less_busy_of_two() {
        let state = ClusterState::new(cluster(LbPolicy::LeastRequest, None), secrets());
        let endpoints = endpoints(&[(1, 1, true), (2, 1, true)]);
        let busy = state.pick(&endpoints, &[]).unwrap();
        let _guards: Vec<HostGuard> = (0..3).map(|_| busy.start()).collect();
        for _ in 0..20 {
            assert_ne!(port(&state.pick(&endpoints, &[]).unwrap()), port(&busy));
        }
    }

    #[tokio::test]
    async fn a_retry_avoids_the_endpoint_tried() {
        let state = ClusterState::new(cluster(LbPolicy::Random, None), secrets());
        let endpoints = endpoints(&[(1, 1, true), (2, 1, true)]);
        for _ in 0..20 {
            let first = state.pick(&endpoints, &[]).unwrap();
            let second = state
                .pick(&endpoints, std::slice::from_ref(&first))
                .unwrap();
            assert_ne!(port(&first), port(&second));
        }
    }

    #[tokio::test]
    async fn consecutive_errors_eject_an_endpoint_until_its_time_is_up() {
        let outlier = Outlier {
            consecutive_5xx: 2,
            consecutive_gateway: 0,
            base_ejection_time: Duration::from_millis(200),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            interval: Duration::from_secs(10),
        };
        let state = ClusterState::new(cluster(LbPolicy::RoundRobin, Some(outlier)), secrets());
        let endpoints = endpoints(&[(1, 1, true), (2, 1, true), (3, 1, true), (4, 1, true)]);
        let hosts = state.hosts(&endpoints);
        let failing = &hosts.states[0];
        state.record(failing, Outcome::ServerError(500));
        state.record(failing, Outcome::Success);
        state.record(failing, Outcome::ServerError(500));
        assert!(!failing.ejected(state.now()), "not consecutive");
        state.record(failing, Outcome::LocalFailure);
        assert!(failing.ejected(state.now()));
        for _ in 0..12 {
            assert_ne!(port(&state.pick(&endpoints, &[]).unwrap()), 1);
        }
        // 50 % of four: a second may go, a third may not.
        for host in &hosts.states[1..] {
            state.record(host, Outcome::ServerError(503));
            state.record(host, Outcome::ServerError(503));
        }
        let ejected = hosts
            .states
            .iter()
            .filter(|h| h.ejected(state.now()))
            .count();
        assert_eq!(ejected, 2);
        // The same endpoints under a new assignment keep their state.
        let again = self::endpoints(&[(1, 1, true), (2, 1, true), (3, 1, true), (4, 1, true)]);
        assert!(Arc::ptr_eq(&state.hosts(&again).states[0], failing));
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            !failing.ejected(state.now()),
            "back after the base ejection time"
        );
    }

    #[tokio::test]
    async fn ejections_grow_while_an_endpoint_keeps_failing_and_shrink_while_it_serves() {
        let outlier = Outlier {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection_time: Duration::from_millis(100),
            max_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 100,
            interval: Duration::from_millis(100),
        };
        let state = ClusterState::new(cluster(LbPolicy::RoundRobin, Some(outlier)), secrets());
        let endpoints = endpoints(&[(1, 1, true), (2, 1, true)]);
        let hosts = state.hosts(&endpoints);
        let host = &hosts.states[0];
        let ejected_for = || {
            host.ejected_until
                .load(Ordering::Relaxed)
                .saturating_sub(state.now())
        };
        state.record(host, Outcome::ServerError(500));
        assert!(
            ejected_for() > 50 && ejected_for() <= 100,
            "{}",
            ejected_for()
        );
        // Failing again at once: twice the base time.
        std::thread::sleep(Duration::from_millis(110));
        state.record(host, Outcome::ServerError(500));
        assert!(ejected_for() > 150, "{}", ejected_for());
        // Back, then two intervals in service: the base time again.
        std::thread::sleep(Duration::from_millis(200 + 250));
        assert!(!host.ejected(state.now()));
        state.record(host, Outcome::ServerError(500));
        assert!(ejected_for() <= 100, "{}", ejected_for());
    }

    #[tokio::test]
    async fn circuit_breakers_overflow_beyond_connections_and_pending() {
        let state = Arc::new(ClusterState::new(
            cluster(LbPolicy::RoundRobin, None),
            secrets(),
        ));
        let first = state.admit(false).await.unwrap();
        // The second waits for the connection; the third overflows.
        let waiting = tokio::spawn({
            let state = Arc::clone(&state);
            async move { state.admit(false).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(state.admit(false).await.err(), Some(Overflow));
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert!(state.admit(false).await.is_ok(), "all released");
    }

    #[tokio::test]
    async fn a_changed_cluster_gets_new_state() {
        let upstreams = Upstreams::new(secrets());
        let first = cluster(LbPolicy::RoundRobin, None);
        let a = upstreams.get(&first);
        assert!(Arc::ptr_eq(&a, &upstreams.get(&first)));
        let b = upstreams.get(&cluster(LbPolicy::Random, None));
        assert!(!Arc::ptr_eq(&a, &b));
    }

    /// An upstream answering `ok` on each connection it accepts, telling
    /// when a connection has been closed by the proxy.
    async fn closing_upstream() -> (u16, tokio::sync::mpsc::UnboundedReceiver<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (closed, closes) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let closed = closed.clone();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    while let Ok(1..) = stream.read(&mut buffer).await {
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            break;
                        }
                    }
                    let _ = closed.send(());
                });
            }
        });
        (port, closes)
    }

    /// Two requests in turn to `host` of `state`; their answers read.
    async fn two_requests(state: &Arc<ClusterState>, host: &Arc<Host>) {
        use http_body_util::BodyExt;
        for _ in 0..2 {
            let mut request = Request::new(crate::http::full(Bytes::new()));
            request
                .headers_mut()
                .insert(http::header::HOST, http::HeaderValue::from_static("c"));
            let response = state.send(host, false, request).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ok");
        }
    }

    #[tokio::test]
    async fn a_free_connection_is_closed_after_its_idle_timeout() {
        let (upstream, mut closes) = closing_upstream().await;
        let upstreams = Upstreams::new(secrets());
        let idle_timeout = Duration::from_millis(300);
        let state = upstreams.get(&connecting(
            LbPolicy::RoundRobin,
            None,
            Connections {
                idle_timeout: Some(idle_timeout),
                max_requests: None,
            },
        ));
        let host = state.pick(&endpoints(&[(upstream, 1, true)]), &[]).unwrap();
        two_requests(&state, &host).await;
        assert!(
            !host.pool.is_empty(),
            "the connection is kept once its answer is read"
        );
        upstreams.close_idle();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            closes.try_recv().is_err(),
            "kept while it has been free for less than its idle timeout"
        );
        tokio::time::sleep(idle_timeout).await;
        upstreams.close_idle();
        tokio::time::timeout(Duration::from_secs(5), closes.recv())
            .await
            .expect("closed at the first look after its idle timeout");
        assert!(host.pool.is_empty());
        // Past its idle timeout a connection is not taken, looked at or not.
        two_requests(&state, &host).await;
        tokio::time::sleep(idle_timeout).await;
        two_requests(&state, &host).await;
        tokio::time::timeout(Duration::from_secs(5), closes.recv())
            .await
            .expect("the connection idle too long was dropped, not used");
    }

    #[tokio::test]
    async fn a_connection_serves_its_cluster_s_max_requests() {
        let (upstream, mut closes) = closing_upstream().await;
        let upstreams = Upstreams::new(secrets());
        let state = upstreams.get(&connecting(
            LbPolicy::RoundRobin,
            None,
            Connections {
                idle_timeout: None,
                max_requests: Some(2),
            },
        ));
        let host = state.pick(&endpoints(&[(upstream, 1, true)]), &[]).unwrap();
        two_requests(&state, &host).await;
        tokio::time::timeout(Duration::from_secs(5), closes.recv())
            .await
            .expect("closed after its second request");
        assert!(host.pool.is_empty());
        // Without a limit, nor an idle timeout, it is kept.
        let kept = upstreams.get(&connecting(
            LbPolicy::RoundRobin,
            None,
            Connections {
                idle_timeout: None,
                max_requests: None,
            },
        ));
        let host = kept.pick(&endpoints(&[(upstream, 1, true)]), &[]).unwrap();
        two_requests(&kept, &host).await;
        upstreams.close_idle();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(closes.try_recv().is_err() && !host.pool.is_empty());
    }
}
