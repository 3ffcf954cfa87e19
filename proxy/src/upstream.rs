//! The proxy's side of a cluster: pooled keep-alive connections to its
//! endpoints and the choice of endpoint. Kept across configuration swaps
//! for as long as the cluster itself does not change, so pools and
//! balancing state outlive a route change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::model::cluster::{Endpoint, LbPolicy, Protocol};
use crate::model::{Cluster, Endpoints};

/// The body of requests and responses on the data path.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long an idle upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Every cluster's upstream state, by name.
#[derive(Debug, Default)]
pub struct Upstreams {
    clusters: Mutex<HashMap<String, Arc<ClusterState>>>,
}

impl Upstreams {
    /// The state for `cluster`, made anew when its configuration changed.
    pub fn get(&self, cluster: &Arc<Cluster>) -> Arc<ClusterState> {
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = clusters.get(&cluster.name)
            && Arc::ptr_eq(&state.config, cluster)
        {
            return Arc::clone(state);
        }
        let state = Arc::new(ClusterState::new(Arc::clone(cluster)));
        clusters.insert(cluster.name.clone(), Arc::clone(&state));
        state
    }

    /// Forgets clusters no longer configured.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| keep(name));
    }
}

#[derive(Debug)]
pub struct ClusterState {
    pub config: Arc<Cluster>,
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
    next: AtomicUsize,
}

impl ClusterState {
    fn new(config: Arc<Cluster>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = |http2: bool| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(IDLE_TIMEOUT)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(http2)
                .build(connector.clone())
        };
        Self {
            http1: client(false),
            http2: client(true),
            next: AtomicUsize::new(0),
            config,
        }
    }

    /// The client for a request that arrived as HTTP/2 (`downstream_h2`)
    /// or not.
    pub fn client(&self, downstream_h2: bool) -> &Client<HttpConnector, Body> {
        let h2 = match self.config.protocol {
            Protocol::Http1 => false,
            Protocol::Http2 => true,
            Protocol::Downstream => downstream_h2,
        };
        if h2 { &self.http2 } else { &self.http1 }
    }

    /// An endpoint for the next request: healthy ones only, by the
    /// cluster's policy.
    pub fn pick<'a>(&self, endpoints: &'a Endpoints) -> Option<&'a Endpoint> {
        let healthy: Vec<&Endpoint> = endpoints.items.iter().filter(|e| e.healthy).collect();
        let equal = healthy.windows(2).all(|w| w[0].weight == w[1].weight);
        match (self.config.lb, healthy.len()) {
            (_, 0) => None,
            (_, 1) => Some(healthy[0]),
            (LbPolicy::RoundRobin, n) if equal => {
                Some(healthy[self.next.fetch_add(1, Ordering::Relaxed) % n])
            }
            // Weighted (or random, or least-request until in-flight counts
            // are kept): by weight at random.
            _ => {
                let total: u64 = healthy.iter().map(|e| u64::from(e.weight)).sum();
                let mut point = rand::random_range(0..total);
                healthy.into_iter().find(|e| {
                    let hit = point < u64::from(e.weight);
                    point = point.saturating_sub(u64::from(e.weight));
                    hit
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cluster::{Discovery, Target};

    fn cluster(lb: LbPolicy) -> Arc<Cluster> {
        Arc::new(Cluster {
            name: "c".into(),
            discovery: Discovery::Eds("c".into()),
            lb,
            connect_timeout: Duration::from_secs(1),
            protocol: Protocol::Http1,
        })
    }

    fn endpoints(weights: &[(u16, u32, bool)]) -> Endpoints {
        Endpoints {
            items: weights
                .iter()
                .map(|(port, weight, healthy)| Endpoint {
                    address: Target::Ip(([127, 0, 0, 1], *port).into()),
                    weight: *weight,
                    healthy: *healthy,
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn round_robin_takes_turns_among_healthy_endpoints() {
        let state = ClusterState::new(cluster(LbPolicy::RoundRobin));
        let endpoints = endpoints(&[(1, 1, true), (2, 1, false), (3, 1, true)]);
        let picked: Vec<String> = (0..4)
            .map(|_| state.pick(&endpoints).unwrap().address.to_string())
            .collect();
        assert_eq!(
            picked,
            ["127.0.0.1:1", "127.0.0.1:3", "127.0.0.1:1", "127.0.0.1:3"]
        );
        assert!(state.pick(&self::endpoints(&[(1, 1, false)])).is_none());
    }

    #[tokio::test]
    async fn weights_bias_the_choice() {
        let state = ClusterState::new(cluster(LbPolicy::RoundRobin));
        let endpoints = endpoints(&[(1, 9, true), (2, 1, true)]);
        let first = (0..2000)
            .filter(|_| state.pick(&endpoints).unwrap().address.to_string() == "127.0.0.1:1")
            .count();
        assert!((1700..1900).contains(&first), "{first} of 2000");
    }

    #[tokio::test]
    async fn a_changed_cluster_gets_new_state() {
        let upstreams = Upstreams::default();
        let first = cluster(LbPolicy::RoundRobin);
        let a = upstreams.get(&first);
        assert!(Arc::ptr_eq(&a, &upstreams.get(&first)));
        let b = upstreams.get(&cluster(LbPolicy::Random));
        assert!(!Arc::ptr_eq(&a, &b));
    }
}
