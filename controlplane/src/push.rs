//! Pushes: versions of the mesh, and the resources each proxy gets from
//! one, encoded once and shared.
//!
//! Sidecars of one namespace with the same labels see the same outbound
//! configuration, so it is generated once per push for all of them; only
//! the inbound side is generated per proxy. When a push changes nothing
//! but endpoints (the EDS fast path), the previous push's clusters,
//! routes and listeners are kept and only the endpoints are generated.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hasher};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use prost::{Message, Name};

use crate::model::{Proxy, ProxyKind, Snapshot};
use crate::translate::{self, Scope};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The order in which a change reaches a proxy, so that nothing refers to
/// what it does not have yet: clusters before their endpoints, listeners
/// before their routes.
pub const PUSH_ORDER: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

/// One version of the mesh.
#[derive(Clone, Debug)]
pub struct Push {
    pub number: u64,
    pub snapshot: Arc<Snapshot>,
    /// The last push that changed more than endpoints: two pushes with the
    /// same `config` differ in endpoints only.
    pub config: u64,
    /// When the first change this push carries was seen: convergence is
    /// measured from here.
    pub since: Instant,
}

impl Push {
    pub fn first(snapshot: Snapshot) -> Self {
        Self {
            number: 1,
            snapshot: Arc::new(snapshot),
            config: 1,
            since: Instant::now(),
        }
    }
}

/// A resource as sent: its version is the hash of its encoding, so a
/// proxy is sent only what really changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned {
    pub hash: u64,
    /// The hash as the protocol carries it.
    pub version: String,
    pub resource: Any,
}

/// The resources of one type, by name, and a hash over all of them: a
/// stream that last sent the same hash has nothing to compare.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Typed {
    pub hash: u64,
    pub items: BTreeMap<Arc<str>, Arc<Versioned>>,
}

/// Resources by type URL.
pub type Encoded = BTreeMap<&'static str, Arc<Typed>>;

/// A proxy's resources for one push.
#[derive(Clone, Debug, Default)]
pub struct Generated {
    /// Shared with every proxy of the same scope.
    pub outbound: Arc<Encoded>,
    /// This proxy's own: a sidecar's virtual listeners and inbound
    /// clusters, a gateway's listeners and routes, its secrets.
    pub own: Encoded,
}

impl Generated {
    /// The resources of `type_url`, both parts.
    pub fn of_type(&self, type_url: &str) -> impl Iterator<Item = (&Arc<str>, &Arc<Versioned>)> {
        self.outbound
            .get(type_url)
            .into_iter()
            .chain(self.own.get(type_url))
            .flat_map(|t| t.items.iter())
    }

    /// Hashes of both parts of `type_url`: equal hashes, equal resources.
    pub fn type_hash(&self, type_url: &str) -> (u64, u64) {
        (
            self.outbound.get(type_url).map_or(0, |t| t.hash),
            self.own.get(type_url).map_or(0, |t| t.hash),
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ScopeKey {
    kind: ProxyKind,
    namespace: String,
    labels: BTreeMap<String, String>,
}

/// Generates the outbound part once per scope and push, for the current
/// push and the one before (which the EDS fast path builds on).
#[derive(Debug, Default)]
pub struct Generator {
    cache: Mutex<Cache>,
}

type Slot = Arc<OnceLock<Arc<Encoded>>>;

#[derive(Debug, Default)]
struct Cache {
    push: u64,
    config: u64,
    current: HashMap<ScopeKey, Slot>,
    previous: HashMap<ScopeKey, Slot>,
    previous_config: u64,
}

impl Generator {
    pub fn generate(&self, push: &Push, proxy: &Proxy) -> Generated {
        let mut generated = Generated {
            outbound: self.shared(push, proxy),
            own: Encoded::new(),
        };
        match proxy.kind {
            ProxyKind::Sidecar => {
                let (clusters, listeners) = translate::own(&push.snapshot, proxy);
                generated.own.insert(CLUSTER, encode(clusters, |c| &c.name));
                generated
                    .own
                    .insert(LISTENER, encode(listeners, |l| &l.name));
            }
            ProxyKind::Gateway => {
                let (listeners, routes) = translate::gateway::gateway(&push.snapshot, proxy);
                generated
                    .own
                    .insert(LISTENER, encode(listeners, |l| &l.name));
                generated.own.insert(ROUTE, encode(routes, |r| &r.name));
            }
        }
        generated
    }

    /// The part shared by every proxy of the same scope: clusters and
    /// endpoints, and for sidecars the outbound listeners and routes.
    /// Generated once: the first proxy of a scope generates, the others
    /// wait for it.
    fn shared(&self, push: &Push, proxy: &Proxy) -> Arc<Encoded> {
        let key = ScopeKey {
            kind: proxy.kind,
            namespace: proxy.namespace.clone(),
            labels: proxy.labels.clone(),
        };
        let (slot, previous) = {
            let mut cache = self.cache.lock().expect("generator cache");
            if push.number > cache.push {
                cache.previous = std::mem::take(&mut cache.current);
                cache.previous_config = cache.config;
                cache.push = push.number;
                cache.config = push.config;
            }
            let previous = (cache.previous_config == push.config)
                .then(|| cache.previous.get(&key).and_then(|s| s.get().cloned()))
                .flatten();
            let slot = cache.current.entry(key).or_default().clone();
            (slot, previous)
        };
        slot.get_or_init(|| {
            let scope = Scope::new(&push.snapshot, &proxy.namespace, &proxy.labels);
            Arc::new(match previous {
                Some(previous) => {
                    let mut encoded = (*previous).clone();
                    encoded.insert(ENDPOINT, encode(scope.endpoints(), |e| &e.cluster_name));
                    encoded
                }
                None => outbound(&scope, proxy.kind),
            })
        })
        .clone()
    }
}

fn outbound(scope: &Scope<'_>, kind: ProxyKind) -> Encoded {
    let mut encoded = Encoded::new();
    encoded.insert(CLUSTER, encode(scope.clusters(), |c| &c.name));
    encoded.insert(ENDPOINT, encode(scope.endpoints(), |e| &e.cluster_name));
    if kind == ProxyKind::Sidecar {
        encoded.insert(LISTENER, encode(scope.outbound_listeners(), |l| &l.name));
        encoded.insert(ROUTE, encode(scope.routes(), |r| &r.name));
    }
    encoded
}

/// Packs each resource once, versioned by the hash of its bytes.
pub fn encode<T: Message + Name>(resources: Vec<T>, name: impl Fn(&T) -> &String) -> Arc<Typed> {
    let mut all = DefaultHasher::new();
    let items: BTreeMap<Arc<str>, Arc<Versioned>> = resources
        .into_iter()
        .map(|r| {
            let name: Arc<str> = Arc::from(name(&r).as_str());
            let resource = pack_any(r);
            let hash = hash(&resource.value);
            (
                name,
                Arc::new(Versioned {
                    hash,
                    version: format!("{hash:016x}"),
                    resource,
                }),
            )
        })
        .collect();
    for (name, v) in &items {
        all.write(name.as_bytes());
        all.write_u64(v.hash);
    }
    Arc::new(Typed {
        hash: all.finish().max(1),
        items,
    })
}

/// A stable hash: the same bytes give the same version in every process.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}
