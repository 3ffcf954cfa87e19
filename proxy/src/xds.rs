//! The delta ADS client: one gRPC stream over TLS to the control plane,
//! authenticated with the pod's ServiceAccount token.
//!
//! Clusters and listeners are subscribed to whole (wildcard); endpoints,
//! route configurations and TLS secrets by the names the clusters and
//! listeners held name (but `default` and `ROOTCA`: the proxy's own
//! identity, whose key never leaves it, comes from the CA). Each resource is converted as it arrives: one that does not
//! convert is NACKed alone with the field at fault, and its last good
//! version keeps serving while the others are applied. The first snapshot
//! is published once every subscribed name has been answered; after that
//! every applied response publishes a new one. When the stream ends the
//! proxy keeps serving what it holds and reconnects with backoff (10 ms
//! doubling to 15 s, with jitter), telling the control plane the versions
//! it holds so that only what changed is sent again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use envoy_types::pb::envoy::config::cluster::v3::Cluster as EnvoyCluster;
use envoy_types::pb::envoy::config::core::v3::{Node, node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as EnvoyListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret as EnvoySecret;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{Config, Discovery};
use crate::error::{Error, Result};
use crate::model::{Cluster, Endpoints, Listener, Raw, RouteTable, Snapshot};
use crate::state::State;
use crate::tls::{ROOT_SECRET, Secret, WORKLOAD_SECRET};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The types subscribed to by name, as what is held names them.
const NAMED: [&str; 3] = [ENDPOINT, ROUTE, SECRET];

/// Reconnection backoff: Envoy's base interval, capped at 15 s.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response accepted (a whole mesh's clusters).
const MAX_MESSAGE: usize = 256 << 20;
/// gRPC's INVALID_ARGUMENT, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

/// Follows the control plane until `stop` turns true, publishing into
/// `state`. Never returns early: a control plane that is away is retried.
pub async fn follow(
    config: &Config,
    discovery: &Discovery,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let node = node(config);
    let mut held = Held::default();
    let mut backoff = backoff();
    while !*stop.borrow() {
        let (responses, error) = tokio::select! {
            ended = session(discovery, &node, &mut held, &state) => ended,
            _ = stop.wait_for(|s| *s) => return,
        };
        // A stream that worked starts the backoff over.
        if responses > 0 {
            backoff = self::backoff();
        }
        let delay = backoff.next().unwrap_or(BACKOFF_MAX);
        match error {
            None => {
                tracing::warn!(address = %discovery.address, ?delay, "the control plane closed the stream; reconnecting")
            }
            Some(error) => {
                tracing::warn!(address = %discovery.address, error = format!("{error:#}"), ?delay, "no connection to the control plane; serving the last configuration and retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// One stream, from connecting until it ends: the responses it brought,
/// and why it ended unless the control plane closed it.
async fn session(
    discovery: &Discovery,
    node: &Node,
    held: &mut Held,
    state: &State,
) -> (usize, Option<anyhow::Error>) {
    let (requests, mut responses) = match open(discovery, node, held).await {
        Ok(opened) => opened,
        Err(error) => return (0, Some(error)),
    };
    tracing::info!(address = %discovery.address, "connected to the control plane");
    let mut count = 0;
    loop {
        let response = match responses.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return (count, None),
            Err(status) => {
                let error = anyhow::anyhow!("{}: {}", status.code(), status.message());
                return (count, Some(error));
            }
        };
        count += 1;
        let errors = held.apply(&response);
        let error_detail = (!errors.is_empty()).then(|| {
            let message = errors.join("; ");
            tracing::warn!(type_url = %response.type_url, nonce = %response.nonce, %message, "rejected (NACK); the last good version of each keeps serving");
            RpcStatus {
                code: INVALID_ARGUMENT,
                message,
                ..Default::default()
            }
        });
        let mut answers = vec![DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail,
            ..Default::default()
        }];
        // New clusters and listeners may name endpoints and routes not
        // yet subscribed to, or no longer name some.
        answers.extend(held.resubscribe());
        for answer in answers {
            if requests.send(answer).await.is_err() {
                return (count, None);
            }
        }
        if held.complete() {
            if !held.published {
                tracing::info!(
                    clusters = held.clusters.len(),
                    listeners = held.listeners.len(),
                    "first complete configuration received"
                );
            }
            held.published = true;
            state.publish(held.snapshot());
        }
    }
}

/// Connects and opens the stream, asking again for what is held with the
/// versions held, so that only what changed comes again.
async fn open(
    discovery: &Discovery,
    node: &Node,
    held: &mut Held,
) -> anyhow::Result<(
    mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
)> {
    let channel = channel(discovery).await?;
    let bearer = bearer(discovery)?;
    let (requests, outgoing) = mpsc::channel(16);
    for type_url in [CLUSTER, LISTENER, ENDPOINT, ROUTE, SECRET] {
        let subscribe = held.names(type_url);
        if subscribe.is_empty() && NAMED.contains(&type_url) {
            continue;
        }
        let request = DeltaDiscoveryRequest {
            node: (type_url == CLUSTER).then(|| node.clone()),
            type_url: type_url.into(),
            resource_names_subscribe: subscribe,
            initial_resource_versions: held.versions(type_url),
            ..Default::default()
        };
        requests.try_send(request)?;
    }
    held.start_stream();
    let mut request = tonic::Request::new(ReceiverStream::new(outgoing));
    request.metadata_mut().insert("authorization", bearer);
    let responses = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .delta_aggregated_resources(request)
        .await
        .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?
        .into_inner();
    Ok((requests, responses))
}

/// `Bearer <token>`, the ServiceAccount token read afresh (the kubelet
/// rotates it).
pub(crate) fn bearer(
    discovery: &Discovery,
) -> anyhow::Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    let token = std::fs::read_to_string(&discovery.token).map_err(|e| {
        anyhow::anyhow!(
            "reading the ServiceAccount token {}: {e}",
            discovery.token.display()
        )
    })?;
    format!("Bearer {}", token.trim()).parse().map_err(|_| {
        anyhow::anyhow!(
            "the ServiceAccount token in {} is not a header value",
            discovery.token.display()
        )
    })
}

/// A TLS channel to the control plane (or CA), checked against the mesh
/// root.
pub(crate) async fn channel(discovery: &Discovery) -> anyhow::Result<Channel> {
    let root = std::fs::read(&discovery.root_cert).map_err(|e| {
        anyhow::anyhow!(
            "reading the mesh root {}: {e}",
            discovery.root_cert.display()
        )
    })?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root))
        .domain_name(&discovery.server_name);
    let channel = Endpoint::from_shared(format!("https://{}", discovery.address))?
        .tls_config(tls)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(channel)
}

/// The node the control plane knows this proxy by: Istio's node id and
/// metadata.
pub fn node(config: &Config) -> Node {
    let namespace = config
        .metadata
        .get("NAMESPACE")
        .and_then(|n| n.as_str())
        .unwrap_or("default");
    let app = config
        .metadata
        .get("LABELS")
        .and_then(|labels| labels.get("app"))
        .and_then(|app| app.as_str())
        .unwrap_or("istio-proxy");
    Node {
        id: config.node_id.clone(),
        cluster: format!("{app}.{namespace}"),
        metadata: Some(Struct {
            fields: config
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), protobuf_value(v)))
                .collect(),
        }),
        user_agent_name: "bowline-proxy".into(),
        user_agent_version_type: Some(node::UserAgentVersionType::UserAgentVersion(
            env!("CARGO_PKG_VERSION").into(),
        )),
        ..Default::default()
    }
}

fn protobuf_value(json: &serde_json::Value) -> Value {
    use serde_json::Value as Json;
    let kind = match json {
        Json::Null => value::Kind::NullValue(0),
        Json::Bool(b) => value::Kind::BoolValue(*b),
        Json::Number(n) => value::Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => value::Kind::StringValue(s.clone()),
        Json::Array(items) => value::Kind::ListValue(ListValue {
            values: items.iter().map(protobuf_value).collect(),
        }),
        Json::Object(fields) => value::Kind::StructValue(Struct {
            fields: fields
                .iter()
                .map(|(k, v)| (k.clone(), protobuf_value(v)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// A resource held: the version the control plane gave it, converted.
/// By name: the version, the converted resource, and the resource as it
/// came (for the admin endpoint's configuration dump).
type Versioned<T> = BTreeMap<String, (String, Arc<T>, bytes::Bytes)>;

/// Everything the client holds, across streams.
#[derive(Debug, Default)]
struct Held {
    clusters: Versioned<Cluster>,
    listeners: Versioned<Listener>,
    endpoints: Versioned<Endpoints>,
    routes: Versioned<RouteTable>,
    secrets: Versioned<Secret>,
    /// Of the types subscribed to by name ([`NAMED`]): the names.
    subscribed: BTreeMap<&'static str, BTreeSet<String>>,
    /// Of this stream: the wildcard types answered, and the names
    /// subscribed to and not answered yet.
    answered: BTreeSet<&'static str>,
    pending: BTreeSet<(&'static str, String)>,
    /// Whether a snapshot has been published.
    published: bool,
}

impl Held {
    /// A new stream: nothing answered yet; what is held is asked for again.
    fn start_stream(&mut self) {
        self.answered.clear();
        self.pending = self
            .subscribed
            .iter()
            .flat_map(|(type_url, names)| names.iter().map(|n| (*type_url, n.clone())))
            .collect();
    }

    /// The names to subscribe to (none for the wildcard types).
    fn names(&self, type_url: &str) -> Vec<String> {
        self.subscribed
            .get(type_url)
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn versions(&self, type_url: &str) -> std::collections::HashMap<String, String> {
        fn of<T>(held: &Versioned<T>) -> std::collections::HashMap<String, String> {
            held.iter()
                .map(|(name, (version, ..))| (name.clone(), version.clone()))
                .collect()
        }
        match type_url {
            CLUSTER => of(&self.clusters),
            LISTENER => of(&self.listeners),
            ENDPOINT => of(&self.endpoints),
            ROUTE => of(&self.routes),
            SECRET => of(&self.secrets),
            _ => Default::default(),
        }
    }

    /// Applies what converts of `response`; the errors of what does not.
    fn apply(&mut self, response: &DeltaDiscoveryResponse) -> Vec<String> {
        let type_url = response.type_url.as_str();
        let errors = match type_url {
            CLUSTER => update(&mut self.clusters, response, |name, bytes| {
                let cluster =
                    EnvoyCluster::decode(bytes).map_err(|e| decode_error("Cluster", name, e))?;
                Cluster::from_envoy(&cluster)
            }),
            LISTENER => update(&mut self.listeners, response, |name, bytes| {
                let listener =
                    EnvoyListener::decode(bytes).map_err(|e| decode_error("Listener", name, e))?;
                Listener::from_envoy(&listener)
            }),
            ENDPOINT => update(&mut self.endpoints, response, |name, bytes| {
                let assignment = ClusterLoadAssignment::decode(bytes)
                    .map_err(|e| decode_error("ClusterLoadAssignment", name, e))?;
                Endpoints::from_envoy(&assignment).map_err(|(field, message)| {
                    Error::resource("ClusterLoadAssignment", name, field, message)
                })
            }),
            ROUTE => update(&mut self.routes, response, |name, bytes| {
                let config = RouteConfiguration::decode(bytes)
                    .map_err(|e| decode_error("RouteConfiguration", name, e))?;
                RouteTable::from_envoy(&config)
            }),
            SECRET => update(&mut self.secrets, response, |name, bytes| {
                let secret =
                    EnvoySecret::decode(bytes).map_err(|e| decode_error("Secret", name, e))?;
                Secret::from_envoy(&secret)
                    .map_err(|(field, message)| Error::resource("Secret", name, field, message))
            }),
            other => return vec![format!("{other}: not a type this proxy subscribes to")],
        };
        let named = match type_url {
            ENDPOINT => ENDPOINT,
            ROUTE => ROUTE,
            SECRET => SECRET,
            CLUSTER => {
                self.answered.insert(CLUSTER);
                return errors;
            }
            _ => {
                self.answered.insert(LISTENER);
                return errors;
            }
        };
        // Answered: sent, or named as absent.
        for name in response
            .resources
            .iter()
            .map(|r| &r.name)
            .chain(&response.removed_resources)
        {
            self.pending.remove(&(named, name.clone()));
        }
        errors
    }

    /// The names of each [`NAMED`] type the clusters and listeners held
    /// need.
    fn wanted(&self, type_url: &str) -> BTreeSet<String> {
        let clusters = self.clusters.values().map(|(_, c, _)| c);
        let listeners = self.listeners.values().map(|(_, l, _)| l);
        match type_url {
            ENDPOINT => clusters
                .filter_map(|c| c.eds_service())
                .map(String::from)
                .collect(),
            ROUTE => listeners
                .flat_map(|l| l.route_names())
                .map(String::from)
                .collect(),
            _ => clusters
                .flat_map(|c| c.sds_names())
                .chain(listeners.flat_map(|l| l.sds_names()))
                .filter(|name| ![WORKLOAD_SECRET, ROOT_SECRET].contains(name))
                .map(String::from)
                .collect(),
        }
    }

    /// Forgets what is held of `type_url` but `keep`.
    fn retain(&mut self, type_url: &str, keep: &BTreeSet<String>) {
        match type_url {
            ENDPOINT => self.endpoints.retain(|n, _| keep.contains(n)),
            ROUTE => self.routes.retain(|n, _| keep.contains(n)),
            _ => self.secrets.retain(|n, _| keep.contains(n)),
        }
    }

    /// Requests that bring the endpoint, route and secret subscriptions in
    /// line with the clusters and listeners held.
    fn resubscribe(&mut self) -> Vec<DeltaDiscoveryRequest> {
        let mut requests = Vec::new();
        for type_url in NAMED {
            let wanted = self.wanted(type_url);
            let subscribed = self.subscribed.entry(type_url).or_default();
            let subscribe: Vec<String> = wanted.difference(subscribed).cloned().collect();
            let unsubscribe: Vec<String> = subscribed.difference(&wanted).cloned().collect();
            if subscribe.is_empty() && unsubscribe.is_empty() {
                continue;
            }
            for name in &subscribe {
                self.pending.insert((type_url, name.clone()));
            }
            for name in &unsubscribe {
                self.pending.remove(&(type_url, name.clone()));
            }
            self.retain(type_url, &wanted);
            self.subscribed.insert(type_url, wanted);
            requests.push(DeltaDiscoveryRequest {
                type_url: type_url.into(),
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                ..Default::default()
            });
        }
        requests
    }

    /// Whether the first configuration is whole: clusters and listeners
    /// answered, and every endpoint and route name they need.
    fn complete(&self) -> bool {
        self.published
            || (self.answered.contains(CLUSTER)
                && self.answered.contains(LISTENER)
                && self.pending.is_empty())
    }

    fn snapshot(&self) -> Snapshot {
        fn of<T>(held: &Versioned<T>) -> impl Iterator<Item = (String, Arc<T>)> + '_ {
            held.iter()
                .map(|(name, (_, item, _))| (name.clone(), Arc::clone(item)))
        }
        fn raw<'h, T>(
            type_url: &'static str,
            held: &'h Versioned<T>,
        ) -> impl Iterator<Item = Raw> + 'h {
            held.iter().map(move |(name, (version, _, bytes))| Raw {
                type_url,
                name: name.clone(),
                version: version.clone(),
                bytes: bytes.clone(),
            })
        }
        Snapshot {
            listeners: of(&self.listeners).collect(),
            routes: of(&self.routes).collect(),
            clusters: of(&self.clusters).collect(),
            endpoints: of(&self.endpoints).collect(),
            secrets: of(&self.secrets).collect(),
            // Secrets stay out of the dump: they hold private keys.
            raw: raw(CLUSTER, &self.clusters)
                .chain(raw(LISTENER, &self.listeners))
                .chain(raw(ROUTE, &self.routes))
                .chain(raw(ENDPOINT, &self.endpoints))
                .collect(),
        }
    }
}

fn decode_error(kind: &'static str, name: &str, error: prost::DecodeError) -> Error {
    Error::resource(kind, name, "(encoding)", error.to_string())
}

/// Applies a response's resources of one type to what is held: each one
/// that converts replaces its last version; one that does not leaves its
/// last version in place and gives an error.
fn update<T>(
    held: &mut Versioned<T>,
    response: &DeltaDiscoveryResponse,
    convert: impl Fn(&str, &[u8]) -> Result<T>,
) -> Vec<String> {
    let mut errors = Vec::new();
    for Resource {
        name,
        version,
        resource,
        ..
    } in &response.resources
    {
        // Sent again unchanged (another resource of its type changed): the
        // one held stays, and with it what the data path keeps for it — a
        // cluster's connections, ejections and balancing state — as Envoy
        // leaves a cluster whose configuration did not change.
        if let (Some(any), Some((held_version, _, raw))) = (resource, held.get_mut(name))
            && any.type_url == response.type_url
            && raw.as_ref() == any.value.as_slice()
        {
            held_version.clone_from(version);
            continue;
        }
        let converted = match resource {
            Some(any) if any.type_url == response.type_url => convert(name, &any.value),
            Some(any) => Err(Error::resource(
                "resource",
                name,
                "type_url",
                format!("{} in a response of {}", any.type_url, response.type_url),
            )),
            None => Err(Error::resource("resource", name, "resource", "empty")),
        };
        match converted {
            Ok(item) => {
                let raw = resource
                    .as_ref()
                    .map(|any| bytes::Bytes::from(any.value.clone()))
                    .unwrap_or_default();
                held.insert(name.clone(), (version.clone(), Arc::new(item), raw));
            }
            Err(error) => errors.push(error.to_string()),
        }
    }
    for name in &response.removed_resources {
        held.remove(name);
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;

    fn resource<M: Message>(type_url: &str, name: &str, version: &str, message: &M) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(Any {
                type_url: type_url.into(),
                value: message.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    fn cluster(name: &str, lb_policy: i32) -> EnvoyCluster {
        crate::envoy::from_json(serde_json::json!({
            "name": name, "type": "EDS", "lb_policy": lb_policy,
            "eds_cluster_config": {"service_name": name},
        }))
        .unwrap()
    }

    fn listener(name: &str, routes: &str) -> EnvoyListener {
        crate::envoy::from_json(serde_json::json!({
            "name": name,
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "rds": {"route_config_name": routes, "config_source": {"ads": {}}},
                },
            }]}],
        }))
        .unwrap()
    }

    fn response(
        type_url: &str,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: "1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_invalid_resource_is_rejected_alone_and_its_last_version_kept() {
        let mut held = Held::default();
        let errors = held.apply(&response(
            CLUSTER,
            vec![
                resource(CLUSTER, "a", "1", &cluster("a", 0)),
                resource(CLUSTER, "b", "1", &cluster("b", 0)),
            ],
            &[],
        ));
        assert!(errors.is_empty(), "{errors:?}");
        // CLUSTER_PROVIDED (6) on an EDS cluster is not served: b stays at
        // version 1, c arrives.
        let errors = held.apply(&response(
            CLUSTER,
            vec![
                resource(CLUSTER, "b", "2", &cluster("b", 6)),
                resource(CLUSTER, "c", "1", &cluster("c", 0)),
            ],
            &["a"],
        ));
        assert_eq!(
            errors,
            ["Cluster b: lb_policy: CLUSTER_PROVIDED is not supported"]
        );
        let versions = held.versions(CLUSTER);
        assert_eq!(
            versions.into_iter().collect::<BTreeMap<_, _>>(),
            BTreeMap::from([("b".into(), "1".into()), ("c".into(), "1".into())])
        );
    }

    #[test]
    fn a_cluster_sent_again_unchanged_is_the_one_held() {
        let mut held = Held::default();
        let send = |held: &mut Held, version: &str, lb_policy: i32| {
            held.apply(&response(
                CLUSTER,
                vec![resource(CLUSTER, "a", version, &cluster("a", lb_policy))],
                &[],
            ));
            Arc::clone(&held.clusters["a"].1)
        };
        let first = send(&mut held, "1", 0);
        let again = send(&mut held, "2", 0);
        assert!(Arc::ptr_eq(&first, &again), "same bytes, same cluster");
        assert_eq!(held.versions(CLUSTER)["a"], "2");
        let changed = send(&mut held, "3", 1);
        assert!(!Arc::ptr_eq(&again, &changed), "changed, converted anew");
    }

    #[test]
    fn endpoints_and_routes_follow_what_clusters_and_listeners_name() {
        let mut held = Held::default();
        held.start_stream();
        held.apply(&response(
            CLUSTER,
            vec![resource(CLUSTER, "a", "1", &cluster("a", 0))],
            &[],
        ));
        held.apply(&response(
            LISTENER,
            vec![resource(LISTENER, "l", "1", &listener("l", "r"))],
            &[],
        ));
        let requests = held.resubscribe();
        let asked: Vec<(&str, &[String])> = requests
            .iter()
            .map(|r| (r.type_url.as_str(), r.resource_names_subscribe.as_slice()))
            .collect();
        assert_eq!(
            asked,
            [
                (ENDPOINT, &["a".to_string()][..]),
                (ROUTE, &["r".to_string()][..])
            ]
        );
        assert!(!held.complete(), "endpoints and routes not answered yet");
        held.apply(&response(ENDPOINT, vec![], &["a"]));
        let table: RouteConfiguration =
            crate::envoy::from_json(serde_json::json!({"name": "r"})).unwrap();
        held.apply(&response(
            ROUTE,
            vec![resource(ROUTE, "r", "1", &table)],
            &[],
        ));
        assert!(held.complete());
        held.published = true;

        // The cluster goes: its endpoints are unsubscribed and dropped.
        held.apply(&response(CLUSTER, vec![], &["a"]));
        let requests = held.resubscribe();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].resource_names_unsubscribe, ["a"]);
        assert!(held.resubscribe().is_empty());

        // A new stream asks again for what is held, with its versions.
        held.start_stream();
        assert_eq!(held.names(ROUTE), ["r"]);
        assert_eq!(held.versions(ROUTE)["r"], "1");
        assert_eq!(held.snapshot().routes.len(), 1);
    }

    #[test]
    fn node_metadata_carries_json_values() {
        let env: BTreeMap<String, String> = [
            ("POD_NAMESPACE", "shop"),
            (
                "ISTIO_METAJSON_LABELS",
                r#"{"app":"reviews","version":"v1"}"#,
            ),
            ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = Config::from_env(crate::Mode::Sidecar, Some("b.yaml".into()), &env).unwrap();
        let node = node(&config);
        assert_eq!(node.cluster, "reviews.shop");
        let fields = node.metadata.unwrap().fields;
        let Some(value::Kind::StructValue(labels)) = &fields["LABELS"].kind else {
            panic!("{:?}", fields["LABELS"]);
        };
        assert_eq!(
            labels.fields["version"].kind,
            Some(value::Kind::StringValue("v1".into()))
        );
    }

    #[test]
    fn secrets_are_asked_for_by_the_names_tls_contexts_give() {
        let sds = |name: &str| serde_json::json!({"name": name, "sds_config": {"ads": {}}});
        let gateway: EnvoyListener = crate::envoy::from_json(serde_json::json!({
            "name": "0.0.0.0_443",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 443}},
            "filter_chains": [{
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": {
                        "tls_certificate_sds_secret_configs": [sds("kubernetes://api-cert")],
                        "validation_context_sds_secret_config": sds("ROOTCA"),
                    }}},
                "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "t", "cluster": "c"}}],
            }],
        }))
        .unwrap();
        let mut held = Held::default();
        held.start_stream();
        held.apply(&response(CLUSTER, vec![], &[]));
        held.apply(&response(
            LISTENER,
            vec![resource(LISTENER, "0.0.0.0_443", "1", &gateway)],
            &[],
        ));
        let requests = held.resubscribe();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].type_url, SECRET);
        // The proxy's own ROOTCA is not asked for.
        assert_eq!(
            requests[0].resource_names_subscribe,
            ["kubernetes://api-cert"]
        );
        assert!(!held.complete(), "the secret is not answered yet");

        let broken: EnvoySecret = crate::envoy::from_json(serde_json::json!({
            "name": "kubernetes://api-cert",
            "tls_certificate": {"certificate_chain": {"inline_string": "not PEM"},
                "private_key": {"inline_string": "not PEM"}},
        }))
        .unwrap();
        let errors = held.apply(&response(
            SECRET,
            vec![resource(SECRET, "kubernetes://api-cert", "1", &broken)],
            &[],
        ));
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("kubernetes://api-cert") && errors[0].contains("tls_certificate"),
            "{errors:?}"
        );
        assert!(held.complete(), "answered, if refused");
        assert!(held.snapshot().secrets.is_empty());
    }
}
