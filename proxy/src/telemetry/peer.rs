//! Who is at each end of a request, by the names Istio's metrics give them:
//! the proxy's own workload from its node metadata, the peer's from Istio's
//! metadata exchange headers (`x-envoy-peer-metadata`, a base64 protobuf
//! `Struct` of the peer's node metadata, and `x-envoy-peer-metadata-id`),
//! and the destination service from the cluster.
//!
//! Workloads and services are interned: equal values share one `Arc`, so
//! the metrics key their series by pointer and a request hashes a few
//! words, not twenty strings.

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value};
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::Message as _;

use crate::model::FastMap;

pub const PEER_METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");
pub const PEER_METADATA_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");

/// How many hosts [`Service::of_authority`] remembers; applications
/// naming more (a sidecar's outbound side labels by the Host they send)
/// only make them slower.
const HOSTS_KEPT: usize = 4096;

/// What Istio's labels say when a value is not known.
pub const UNKNOWN: &str = "unknown";

/// A workload as Istio's metric labels describe it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

/// A destination service: `reviews.shop.svc.cluster.local`, `reviews`,
/// `shop`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

/// An interned value: equal values are the same allocation, so equality
/// and hashing go by pointer.
#[derive(Debug)]
pub struct Interned<T>(Arc<T>);

impl<T> Clone for Interned<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> PartialEq for Interned<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T> Eq for Interned<T> {}

impl<T> Hash for Interned<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state)
    }
}

impl<T> std::ops::Deref for Interned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Interns into `set`. The sets only grow: their members are workloads
/// and services, which a mesh has hundreds of, not millions.
fn intern<T: Eq + Hash>(set: &Mutex<HashSet<Arc<T>>>, value: T) -> Interned<T> {
    let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = set.get(&value) {
        return Interned(Arc::clone(existing));
    }
    let value = Arc::new(value);
    set.insert(Arc::clone(&value));
    Interned(value)
}

static WORKLOADS: LazyLock<Mutex<HashSet<Arc<Workload>>>> = LazyLock::new(Default::default);
static SERVICES: LazyLock<Mutex<HashSet<Arc<Service>>>> = LazyLock::new(Default::default);

impl Workload {
    pub fn unknown() -> Interned<Self> {
        static UNKNOWN_WORKLOAD: LazyLock<Interned<Workload>> = LazyLock::new(|| {
            let unknown = || UNKNOWN.to_string();
            intern(
                &WORKLOADS,
                Workload {
                    name: unknown(),
                    namespace: unknown(),
                    app: unknown(),
                    version: unknown(),
                    canonical_service: unknown(),
                    canonical_revision: unknown(),
                    cluster: unknown(),
                },
            )
        });
        UNKNOWN_WORKLOAD.clone()
    }

    /// From node metadata, with Istio's fallbacks: the canonical service
    /// is the `service.istio.io/canonical-name` label, else the app, else
    /// the workload; the canonical revision is its label, else the
    /// version, else `latest`.
    pub fn from_metadata(metadata: &Struct) -> Interned<Self> {
        let field = |key: &str| match metadata.fields.get(key).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.as_str()),
            _ => None,
        };
        let labels = match metadata.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            Some(Kind::StructValue(labels)) => Some(labels),
            _ => None,
        };
        let label = |keys: &[&str]| {
            keys.iter().find_map(|key| {
                match labels?.fields.get(*key).and_then(|v| v.kind.as_ref()) {
                    Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.as_str()),
                    _ => None,
                }
            })
        };
        let name = field("WORKLOAD_NAME");
        let app = label(&["app", "app.kubernetes.io/name"]);
        let version = label(&["version", "app.kubernetes.io/version"]);
        let or_unknown = |v: Option<&str>| v.unwrap_or(UNKNOWN).to_string();
        intern(
            &WORKLOADS,
            Workload {
                name: or_unknown(name),
                namespace: or_unknown(field("NAMESPACE")),
                app: or_unknown(app),
                version: or_unknown(version),
                canonical_service: or_unknown(
                    label(&["service.istio.io/canonical-name"]).or(app).or(name),
                ),
                canonical_revision: label(&["service.istio.io/canonical-revision"])
                    .or(version)
                    .unwrap_or("latest")
                    .to_string(),
                cluster: or_unknown(field("CLUSTER_ID")),
            },
        )
    }
}

impl Service {
    /// The service a cluster sends to: its `istio` metadata's first
    /// service (`services: [{host, name, namespace}]`, as the control
    /// plane writes it), else the host in its name
    /// (`outbound|9080||reviews.shop.svc.cluster.local`).
    pub fn of_cluster(name: &str, metadata: Option<&Struct>) -> Option<Interned<Self>> {
        let described = metadata
            .and_then(|m| m.fields.get("services"))
            .and_then(|v| match &v.kind {
                Some(Kind::ListValue(ListValue { values })) => values.first(),
                _ => None,
            })
            .and_then(|v| match &v.kind {
                Some(Kind::StructValue(s)) => Some(s),
                _ => None,
            });
        if let Some(service) = described {
            let field = |key: &str| match service.fields.get(key).and_then(|v| v.kind.as_ref()) {
                Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            };
            if let Some(host) = field("host") {
                let (name, namespace) = split_host(&host);
                return Some(intern(
                    &SERVICES,
                    Service {
                        name: field("name").unwrap_or(name),
                        namespace: field("namespace").unwrap_or(namespace),
                        host,
                    },
                ));
            }
        }
        let mut parts = name.split('|');
        match (parts.next(), parts.nth(2)) {
            (Some("outbound" | "inbound"), Some(host)) if !host.is_empty() => {
                Some(Self::of_host(host))
            }
            // Istio names traffic to no known service by its cluster.
            (Some(n), _)
                if n == "PassthroughCluster"
                    || n == "BlackHoleCluster"
                    || n.starts_with("InboundPassthroughCluster") =>
            {
                Some(intern(
                    &SERVICES,
                    Service {
                        host: UNKNOWN.into(),
                        name: name.to_string(),
                        namespace: UNKNOWN.into(),
                    },
                ))
            }
            _ => None,
        }
    }

    /// The service a request named by its authority (port dropped), when
    /// no cluster says.
    pub fn of_authority(authority: &str) -> Interned<Self> {
        Self::of_host(crate::model::route::split_port(authority).0)
    }

    pub fn unknown() -> Interned<Self> {
        static UNKNOWN_SERVICE: LazyLock<Interned<Service>> = LazyLock::new(|| {
            intern(
                &SERVICES,
                Service {
                    host: UNKNOWN.into(),
                    name: UNKNOWN.into(),
                    namespace: UNKNOWN.into(),
                },
            )
        });
        UNKNOWN_SERVICE.clone()
    }

    /// The service of `host`. Requests of clusters without Istio's
    /// metadata ask on every request: their hosts are remembered (up to
    /// [`HOSTS_KEPT`]), so asking again builds no strings.
    fn of_host(host: &str) -> Interned<Self> {
        static BY_HOST: LazyLock<Mutex<FastMap<Box<str>, Interned<Service>>>> =
            LazyLock::new(Default::default);
        if let Some(known) = BY_HOST.lock().unwrap_or_else(|e| e.into_inner()).get(host) {
            return known.clone();
        }
        let (name, namespace) = split_host(host);
        let service = intern(
            &SERVICES,
            Service {
                host: host.to_string(),
                name,
                namespace,
            },
        );
        let mut by_host = BY_HOST.lock().unwrap_or_else(|e| e.into_inner());
        if by_host.len() < HOSTS_KEPT {
            by_host.insert(host.into(), service.clone());
        }
        service
    }
}

/// A Kubernetes service host's name and namespace
/// (`reviews.shop.svc.cluster.local`); any other host is its own name in
/// no known namespace.
fn split_host(host: &str) -> (String, String) {
    let mut labels = host.split('.');
    match (labels.next(), labels.next(), labels.next()) {
        (Some(name), Some(namespace), Some("svc")) => (name.to_string(), namespace.to_string()),
        _ => (host.to_string(), UNKNOWN.to_string()),
    }
}

/// The proxy's side of the metadata exchange: its own workload, and the
/// headers that tell a peer about it.
#[derive(Debug)]
pub struct Exchange {
    pub own: Interned<Workload>,
    id: HeaderValue,
    metadata: HeaderValue,
    /// Peers' headers already decoded, by their bytes.
    seen: Mutex<FastMap<Box<[u8]>, Interned<Workload>>>,
}

/// How many distinct peer headers are remembered before starting over.
const SEEN_LIMIT: usize = 4096;

impl Exchange {
    pub fn new(node_id: &str, metadata: &BTreeMap<String, serde_json::Value>) -> Self {
        let metadata = to_struct(metadata);
        let encoded = STANDARD.encode(metadata.encode_to_vec());
        Self {
            own: Workload::from_metadata(&metadata),
            id: HeaderValue::from_str(node_id).unwrap_or(HeaderValue::from_static(UNKNOWN)),
            metadata: HeaderValue::from_str(&encoded).expect("base64 is a valid header value"),
            seen: Mutex::default(),
        }
    }

    /// Tells the peer who this proxy is.
    pub fn announce(&self, headers: &mut HeaderMap) {
        headers.insert(PEER_METADATA_ID, self.id.clone());
        headers.insert(PEER_METADATA, self.metadata.clone());
    }

    /// Who the peer says it is, taking its headers out so that they reach
    /// neither the application nor the next hop.
    pub fn receive(&self, headers: &mut HeaderMap) -> Option<Interned<Workload>> {
        // A look at the few names is cheaper than two lookups that miss.
        if !headers
            .keys()
            .any(|name| name == PEER_METADATA || name == PEER_METADATA_ID)
        {
            return None;
        }
        headers.remove(PEER_METADATA_ID);
        let value = headers.remove(PEER_METADATA)?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(workload) = seen.get(value.as_bytes()) {
            return Some(workload.clone());
        }
        let bytes = STANDARD.decode(value.as_bytes()).ok()?;
        let workload = Workload::from_metadata(&Struct::decode(bytes.as_slice()).ok()?);
        if seen.len() >= SEEN_LIMIT {
            seen.clear();
        }
        seen.insert(value.as_bytes().into(), workload.clone());
        Some(workload)
    }
}

/// Node metadata as a protobuf `Struct`.
pub fn to_struct(metadata: &BTreeMap<String, serde_json::Value>) -> Struct {
    Struct {
        fields: metadata
            .iter()
            .map(|(k, v)| (k.clone(), to_value(v)))
            .collect(),
    }
}

fn to_value(value: &serde_json::Value) -> Value {
    use serde_json::Value as Json;
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        Json::Object(fields) => Kind::StructValue(Struct {
            fields: fields
                .iter()
                .map(|(k, v)| (k.clone(), to_value(v)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metadata(value: serde_json::Value) -> BTreeMap<String, serde_json::Value> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_workload_takes_istios_fallbacks() {
        let exchange = Exchange::new(
            "sidecar~10.0.0.1~reviews-v1-abc.shop~shop.svc.cluster.local",
            &metadata(json!({
                "WORKLOAD_NAME": "reviews-v1", "NAMESPACE": "shop", "CLUSTER_ID": "Kubernetes",
                "LABELS": {"app": "reviews", "version": "v1"},
            })),
        );
        let own = &exchange.own;
        assert_eq!(own.name, "reviews-v1");
        assert_eq!(own.app, "reviews");
        assert_eq!(own.canonical_service, "reviews");
        assert_eq!(own.canonical_revision, "v1");
        assert_eq!(own.cluster, "Kubernetes");

        let bare = Workload::from_metadata(&to_struct(&metadata(json!({"NAMESPACE": "shop"}))));
        assert_eq!(
            (
                bare.name.as_str(),
                bare.app.as_str(),
                bare.canonical_revision.as_str()
            ),
            ("unknown", "unknown", "latest")
        );
    }

    #[test]
    fn the_exchange_round_trips_and_strips_its_headers() {
        let ours = Exchange::new(
            "sidecar~a",
            &metadata(json!({"WORKLOAD_NAME": "productpage-v1", "NAMESPACE": "shop"})),
        );
        let theirs = Exchange::new("sidecar~b", &metadata(json!({"NAMESPACE": "shop"})));
        let mut headers = HeaderMap::new();
        ours.announce(&mut headers);
        let peer = theirs.receive(&mut headers).unwrap();
        assert_eq!(peer, ours.own, "the same interned workload");
        assert!(headers.is_empty());
        // Seen again: from the cache, still the same.
        ours.announce(&mut headers);
        assert_eq!(theirs.receive(&mut headers).unwrap(), ours.own);
        headers.insert(PEER_METADATA, HeaderValue::from_static("not base64!"));
        assert!(theirs.receive(&mut headers).is_none());
    }

    #[test]
    fn services_come_from_metadata_then_the_cluster_name() {
        let described = to_struct(&metadata(json!({"services": [
            {"host": "reviews.shop.svc.cluster.local", "name": "reviews", "namespace": "shop"}]})));
        let service = Service::of_cluster(
            "outbound|9080|v1|reviews.shop.svc.cluster.local",
            Some(&described),
        )
        .unwrap();
        assert_eq!(
            (service.name.as_str(), service.namespace.as_str()),
            ("reviews", "shop")
        );
        let named =
            Service::of_cluster("outbound|9080|v1|reviews.shop.svc.cluster.local", None).unwrap();
        assert_eq!(named, service);
        let external = Service::of_cluster("outbound|443||api.example.com", None).unwrap();
        assert_eq!(
            (external.name.as_str(), external.namespace.as_str()),
            ("api.example.com", "unknown")
        );
        assert!(Service::of_cluster("static-app", None).is_none());
        let passthrough = Service::of_cluster("PassthroughCluster", None).unwrap();
        assert_eq!(
            (passthrough.host.as_str(), passthrough.name.as_str()),
            ("unknown", "PassthroughCluster")
        );
        assert_eq!(
            Service::of_authority("reviews.shop.svc.cluster.local:9080"),
            service
        );
    }
}
