//! The xDS server: Envoy's Aggregated Discovery Service, delta and
//! state-of-the-world, over one gRPC stream per proxy.
//!
//! Each stream authenticates its proxy (a client certificate from the
//! mesh CA, else a ServiceAccount token checked with a TokenReview), takes
//! the namespace from that identity and the labels from its pod, and then
//! follows the pushes: for each new push it generates the proxy's
//! resources and sends, in the order CDS → EDS → LDS → RDS, what changed
//! among what the proxy subscribed to. Versions are content hashes, so a
//! push that changes nothing a proxy sees sends that proxy nothing. A NACK
//! is logged with the proxy and Envoy's message; the proxy keeps its last
//! good config and the next push tries again. Pushes wait for one of a
//! bounded number of permits, and a proxy that falls behind skips to the
//! newest push (the watch channel keeps only the latest).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use kube::Client;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::{Request, Status, Streaming};

use crate::ca::Identity;
use crate::ca_service::{bearer_token, token_identity};
use crate::metrics::{Metrics, TypeLabels, type_label};
use crate::model::{Proxy, ProxyKind, Snapshot};
use crate::push::{Generated, Generator, PUSH_ORDER, Push};
use crate::secrets::Secrets;

mod transport;

/// Pushes generated at once, across all proxies.
pub const PUSH_PERMITS: usize = 100;
/// About how much one delta response carries; more goes in several.
const RESPONSE_BYTES: usize = 64 * 1024;

/// How the server knows who is calling.
#[derive(Clone)]
pub struct Authenticator {
    /// Reviews ServiceAccount tokens; `None` accepts client certificates
    /// only.
    pub client: Option<Client>,
    pub trust_domain: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// What a caller presented: its TLS client certificate, its bearer token.
#[derive(Clone, Debug, Default)]
pub struct Presented {
    certificate: Option<Vec<u8>>,
    token: Option<String>,
}

impl Presented {
    pub fn of<T>(request: &Request<T>) -> Self {
        Self {
            certificate: request
                .peer_certs()
                .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec())),
            token: bearer_token(request.metadata()).map(String::from),
        }
    }
}

impl Authenticator {
    /// The caller's identity: the SPIFFE ID of its client certificate
    /// (verified against the mesh root by the TLS layer), else its
    /// `authorization: Bearer` ServiceAccount token.
    pub async fn identify(&self, presented: Presented) -> Result<Identity, Status> {
        if let Some(leaf) = &presented.certificate {
            return spiffe_identity(leaf, &self.trust_domain);
        }
        let token = presented.token.ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate and no ServiceAccount token: send the token as \
                 `authorization: Bearer <token>`",
            )
        })?;
        let client = self.client.as_ref().ok_or_else(|| {
            Status::unauthenticated("this server accepts client certificates only")
        })?;
        token_identity(client, &token).await
    }
}

/// The identity in a certificate's `spiffe://<td>/ns/<ns>/sa/<sa>` SAN.
fn spiffe_identity(der: &[u8], trust_domain: &str) -> Result<Identity, Status> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
    let uri = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(uri) => Some(uri.to_string()),
                _ => None,
            })
        })
        .ok_or_else(|| Status::unauthenticated("the client certificate has no SPIFFE ID"))?;
    let path = uri
        .strip_prefix(&format!("spiffe://{trust_domain}/"))
        .ok_or_else(|| {
            Status::unauthenticated(format!("{uri} is not of trust domain {trust_domain}"))
        })?;
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["ns", namespace, "sa", service_account] => Ok(Identity {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }),
        _ => Err(Status::unauthenticated(format!(
            "{uri} names no ServiceAccount"
        ))),
    }
}

/// Who is connected, and what each has ACKed: `/debug/syncz`.
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    proxies: Mutex<BTreeMap<u64, Connected>>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connected {
    pub proxy: String,
    pub namespace: String,
    pub identity: String,
    #[serde(skip)]
    pub details: Option<Proxy>,
    pub connected_at: String,
    /// The delta or state-of-the-world protocol.
    pub protocol: &'static str,
    /// By type URL: the version of the last push the proxy ACKed.
    pub acked: BTreeMap<String, u64>,
    /// The last NACK: type URL and Envoy's message.
    pub last_nack: Option<(String, String)>,
}

impl Registry {
    fn add(&self, connected: Connected) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.proxies.lock().expect("registry").insert(id, connected);
        id
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut Connected)) {
        if let Some(c) = self.proxies.lock().expect("registry").get_mut(&id) {
            change(c);
        }
    }

    fn remove(&self, id: u64) {
        self.proxies.lock().expect("registry").remove(&id);
    }

    pub fn list(&self) -> Vec<Connected> {
        self.proxies
            .lock()
            .expect("registry")
            .values()
            .cloned()
            .collect()
    }

    /// A connected proxy by node id.
    pub fn find(&self, proxy_id: &str) -> Option<Proxy> {
        self.proxies
            .lock()
            .expect("registry")
            .values()
            .find(|c| c.proxy == proxy_id)
            .and_then(|c| c.details.clone())
    }
}

/// The service: clone per server; all clones share state.
#[derive(Clone, Debug)]
pub struct Discovery {
    pushes: watch::Receiver<Arc<Push>>,
    generator: Arc<Generator>,
    pub(crate) auth: Authenticator,
    pub registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    /// SDS: the root, workload certificates, credentials.
    secrets: Option<Arc<Secrets>>,
}

impl Discovery {
    pub fn new(
        pushes: watch::Receiver<Arc<Push>>,
        auth: Authenticator,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pushes,
            generator: Arc::new(Generator::default()),
            auth,
            registry: Arc::new(Registry::default()),
            metrics,
            permits: Arc::new(Semaphore::new(PUSH_PERMITS)),
            secrets: None,
        }
    }

    /// Serves SDS: the CA's root, and workload certificates it issues.
    pub fn with_secrets(self, secrets: Arc<Secrets>) -> Self {
        Self {
            secrets: Some(secrets),
            ..self
        }
    }

    /// The gRPC service, for a tonic server's router.
    pub fn server(self) -> transport::AdsService {
        transport::AdsService(self)
    }

    /// What `proxy` would be sent now: `/debug/config_dump`.
    pub fn config_for(&self, proxy: &Proxy) -> Generated {
        let push = self.pushes.borrow().clone();
        self.generator.generate(&push, proxy)
    }

    /// A connected proxy, by node id.
    pub fn connected(&self, proxy_id: &str) -> Option<Proxy> {
        self.registry.find(proxy_id)
    }

    async fn generate(&self, push: &Push, proxy: &Proxy, identity: &Identity) -> Generated {
        let _permit = self.permits.acquire().await.expect("never closed");
        let mut generated = self.generator.generate(push, proxy);
        if let Some(secrets) = &self.secrets {
            match secrets.for_proxy(&push.snapshot, proxy, identity) {
                Ok(secrets) => {
                    generated.own.insert(crate::push::SECRET, secrets);
                }
                Err(error) => {
                    tracing::warn!(proxy = %proxy.id, %error, "no certificate for the proxy")
                }
            }
        }
        generated
    }
}

/// The proxy a node is: its kind, namespace and pod from its id
/// (`sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`, as
/// Istio's), checked against its authenticated identity; its labels and
/// address from its pod when the pod is known, else from its metadata.
pub fn proxy_for(node: &Node, identity: &Identity, snapshot: &Snapshot) -> Result<Proxy, Status> {
    let parts: Vec<&str> = node.id.split('~').collect();
    let [kind, ip, pod, _domain] = parts.as_slice() else {
        return Err(Status::invalid_argument(format!(
            "node id {:?} is not <sidecar|router>~<ip>~<pod>.<namespace>~<domain>",
            node.id
        )));
    };
    let kind = match *kind {
        "sidecar" => ProxyKind::Sidecar,
        "router" => ProxyKind::Gateway,
        other => {
            return Err(Status::invalid_argument(format!(
                "node id {:?}: unknown proxy type {other:?} (sidecar or router)",
                node.id
            )));
        }
    };
    let (name, namespace) = pod.rsplit_once('.').ok_or_else(|| {
        Status::invalid_argument(format!("node id {:?}: no <pod>.<namespace>", node.id))
    })?;
    if namespace != identity.namespace {
        return Err(Status::permission_denied(format!(
            "node {:?} says namespace {namespace}, but its identity is ServiceAccount {}/{}",
            node.id, identity.namespace, identity.service_account
        )));
    }
    let (labels, ip) = match snapshot.workloads.get(&format!("{namespace}/{name}")) {
        Some(pod) if pod.service_account != identity.service_account => {
            return Err(Status::permission_denied(format!(
                "pod {namespace}/{name} runs as ServiceAccount {}, not {}",
                pod.service_account, identity.service_account
            )));
        }
        Some(pod) => (pod.labels.clone(), pod.ip.clone()),
        None => (metadata_labels(node), ip.to_string()),
    };
    Ok(Proxy {
        id: node.id.clone(),
        kind,
        namespace: namespace.to_string(),
        labels,
        ip,
        captured: metadata_string(node, "INTERCEPTION_MODE").as_deref() != Some("NONE"),
    })
}

fn metadata_string(node: &Node, key: &str) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    match node.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// The `LABELS` a proxy sends in its node metadata, as Istio's do.
fn metadata_labels(node: &Node) -> BTreeMap<String, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(Kind::StructValue(labels)) = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("LABELS"))
        .and_then(|v| v.kind.clone())
    else {
        return BTreeMap::new();
    };
    labels
        .fields
        .into_iter()
        .filter_map(|(k, v)| match v.kind {
            Some(Kind::StringValue(s)) => Some((k, s)),
            _ => None,
        })
        .collect()
}

/// Where a stream's framed responses go.
type Responses = mpsc::Sender<Result<Bytes, Status>>;

impl Discovery {
    /// Serves a delta ADS stream for an authenticated proxy.
    fn delta(&self, identity: Identity, requests: Streaming<DeltaDiscoveryRequest>, tx: Responses) {
        let stream = Connection::new(self.clone(), identity, "delta");
        tokio::spawn(stream.run(requests, tx, Delta::default()));
    }

    /// Serves a state-of-the-world ADS stream for an authenticated proxy.
    fn state_of_the_world(
        &self,
        identity: Identity,
        requests: Streaming<DiscoveryRequest>,
        tx: Responses,
    ) {
        let stream = Connection::new(self.clone(), identity, "sotw");
        tokio::spawn(stream.run(requests, tx, StateOfTheWorld::default()));
    }
}

/// A request, whichever protocol it came in.
trait XdsRequest: Send + 'static {
    fn node(&self) -> Option<&Node>;
    fn type_url(&self) -> &str;
    fn nonce(&self) -> &str;
    fn error(&self) -> Option<String>;
}

/// Both request types carry the same fields under the same names.
macro_rules! xds_request {
    ($($request:ty),*) => {$(
        impl XdsRequest for $request {
            fn node(&self) -> Option<&Node> {
                self.node.as_ref()
            }
            fn type_url(&self) -> &str {
                &self.type_url
            }
            fn nonce(&self) -> &str {
                &self.response_nonce
            }
            fn error(&self) -> Option<String> {
                self.error_detail.as_ref().map(|e| e.message.clone())
            }
        }
    )*};
}

xds_request!(DeltaDiscoveryRequest, DiscoveryRequest);

/// What differs between the protocols: per-type subscription state and how
/// a response is made from it.
trait Protocol: Send + 'static {
    type Request: XdsRequest;
    type Response: prost::Message + Send + 'static;

    /// Takes a request's subscription changes; says whether it asks for
    /// an answer now (a new type or new names).
    fn subscribe(&mut self, request: &Self::Request) -> bool;

    /// The responses for `type_url` that bring the proxy up to
    /// `generated`, if anything changed (or `force`); their nonces are set
    /// after.
    fn respond(
        &mut self,
        type_url: &str,
        generated: &Generated,
        force: bool,
    ) -> Vec<Self::Response>;

    fn set_nonce(response: &mut Self::Response, nonce: String);

    /// The types the proxy has asked for.
    fn types(&self) -> Vec<String>;
}

/// One proxy's stream.
struct Connection {
    discovery: Discovery,
    identity: Identity,
    protocol: &'static str,
    nonce: u64,
    /// By type: the nonce sent last and the push it carried.
    pending: HashMap<String, (String, u64)>,
    /// The push whose convergence is being timed, and its start.
    converging: Option<(u64, Instant)>,
}

impl Connection {
    fn new(discovery: Discovery, identity: Identity, protocol: &'static str) -> Self {
        Self {
            discovery,
            identity,
            protocol,
            nonce: 0,
            pending: HashMap::new(),
            converging: None,
        }
    }

    async fn run<P: Protocol>(
        mut self,
        mut requests: Streaming<P::Request>,
        tx: Responses,
        mut protocol: P,
    ) {
        let first = match requests.message().await {
            Ok(Some(first)) => first,
            _ => return,
        };
        let mut pushes = self.discovery.pushes.clone();
        let mut push = pushes.borrow_and_update().clone();
        let Some(node) = first.node().cloned() else {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "the first request must carry the node",
                )))
                .await;
            return;
        };
        let mut proxy = match proxy_for(&node, &self.identity, &push.snapshot) {
            Ok(proxy) => proxy,
            Err(status) => {
                tracing::warn!(node = %node.id, error = %status.message(), "refused a proxy");
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let discovery = self.discovery.clone();
        let id = discovery.registry.add(Connected {
            proxy: proxy.id.clone(),
            namespace: proxy.namespace.clone(),
            identity: self.identity.spiffe_id(&discovery.auth.trust_domain),
            details: Some(proxy.clone()),
            connected_at: humantime_now(),
            protocol: self.protocol,
            acked: BTreeMap::new(),
            last_nack: None,
        });
        discovery.metrics.connected.inc();
        tracing::info!(proxy = %proxy.id, protocol = self.protocol, "proxy connected");

        let mut generated = discovery.generate(&push, &proxy, &self.identity).await;
        let mut request = Some(first);
        loop {
            if let Some(r) = request.take() {
                self.acknowledge(id, &proxy, &r);
                let asks = protocol.subscribe(&r);
                if asks {
                    let type_url = r.type_url().to_string();
                    if self
                        .send(&mut protocol, &tx, &type_url, &generated, push.number, true)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            tokio::select! {
                next = requests.message() => match next {
                    Ok(Some(r)) => request = Some(r),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(proxy = %proxy.id, %status, "stream ended");
                        break;
                    }
                },
                changed = pushes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    push = pushes.borrow_and_update().clone();
                    let started = Instant::now();
                    // The pod may have changed labels; who it is may not.
                    if let Ok(updated) = proxy_for(&node, &self.identity, &push.snapshot) {
                        proxy = updated;
                    }
                    generated = discovery.generate(&push, &proxy, &self.identity).await;
                    self.converging = Some((push.number, push.since));
                    let mut failed = false;
                    for type_url in ordered(protocol.types()) {
                        if self
                            .send(&mut protocol, &tx, &type_url, &generated, push.number, false)
                            .await
                            .is_err()
                        {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        break;
                    }
                    discovery.metrics.push_time.observe(started.elapsed().as_secs_f64());
                    self.check_converged();
                }
            }
        }
        discovery.registry.remove(id);
        discovery.metrics.connected.dec();
        tracing::info!(proxy = %proxy.id, "proxy disconnected");
    }

    async fn send<P: Protocol>(
        &mut self,
        protocol: &mut P,
        tx: &Responses,
        type_url: &str,
        generated: &Generated,
        push: u64,
        force: bool,
    ) -> Result<(), ()> {
        let responses = protocol.respond(type_url, generated, force);
        if responses.is_empty() {
            return Ok(());
        }
        self.discovery
            .metrics
            .pushes
            .get_or_create(&TypeLabels {
                r#type: type_label(type_url),
            })
            .inc();
        for mut response in responses {
            self.nonce += 1;
            let nonce = self.nonce.to_string();
            P::set_nonce(&mut response, nonce.clone());
            // The last response's ACK stands for them all.
            self.pending.insert(type_url.to_string(), (nonce, push));
            tx.send(Ok(transport::frame(&response)))
                .await
                .map_err(|_| ())?;
        }
        Ok(())
    }

    /// An ACK records the push the proxy now has; a NACK is logged and
    /// counted, and the proxy keeps what it had.
    fn acknowledge<R: XdsRequest>(&mut self, id: u64, proxy: &Proxy, request: &R) {
        if request.nonce().is_empty() {
            return;
        }
        let type_url = request.type_url().to_string();
        let registry = &self.discovery.registry;
        let pending = self.pending.get(&type_url).cloned();
        let current = pending
            .as_ref()
            .is_some_and(|(nonce, _)| nonce == request.nonce());
        match request.error() {
            Some(message) => {
                if current {
                    self.pending.remove(&type_url);
                }
                tracing::warn!(proxy = %proxy.id, r#type = %type_url, error = %message,
                    "proxy rejected config (NACK); it keeps its last good config");
                self.discovery
                    .metrics
                    .rejects
                    .get_or_create(&TypeLabels {
                        r#type: type_label(&type_url),
                    })
                    .inc();
                registry.update(id, |c| c.last_nack = Some((type_url, message)));
            }
            // An ACK of an older response: a newer one is on its way.
            None if !current => return,
            None => {
                let push = pending.map_or(0, |(_, push)| push);
                self.pending.remove(&type_url);
                registry.update(id, |c| {
                    c.acked.insert(type_url, push);
                });
            }
        }
        self.check_converged();
    }

    /// A push has converged on this proxy once nothing sent for it waits
    /// for an answer.
    fn check_converged(&mut self) {
        if let Some((number, since)) = self.converging
            && self.pending.values().all(|(_, push)| *push != number)
        {
            self.discovery
                .metrics
                .convergence
                .observe(since.elapsed().as_secs_f64());
            self.converging = None;
        }
    }
}

/// `types` in push order; unknown types after the known ones.
fn ordered(mut types: Vec<String>) -> Vec<String> {
    types.sort_by_key(|t| {
        PUSH_ORDER
            .iter()
            .position(|p| p == t)
            .unwrap_or(PUSH_ORDER.len())
    });
    types
}

fn humantime_now() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    k8s_openapi::jiff::Timestamp::from_second(now.as_secs() as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Types whose resources a proxy gets all of unless it names some.
fn is_wildcard_type(type_url: &str) -> bool {
    type_url == crate::push::CLUSTER || type_url == crate::push::LISTENER
}

/// Delta: per type, what the proxy subscribed to and the version of each
/// resource it has.
#[derive(Debug, Default)]
struct Delta {
    types: BTreeMap<String, DeltaType>,
}

#[derive(Debug, Default)]
struct DeltaType {
    wildcard: bool,
    names: BTreeSet<Arc<str>>,
    /// Name → hash of the version the proxy has.
    sent: HashMap<Arc<str>, u64>,
    /// Names subscribed since the last response, answered even when absent.
    new_names: BTreeSet<Arc<str>>,
    /// The type's hashes when it was last compared: equal, nothing to do.
    compared: Option<(u64, u64)>,
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn subscribe(&mut self, request: &DeltaDiscoveryRequest) -> bool {
        let first = !self.types.contains_key(&request.type_url);
        let state = self.types.entry(request.type_url.clone()).or_default();
        if first {
            // A first request naming nothing subscribes to everything (the
            // legacy wildcard), as does `*`.
            state.wildcard = (request.resource_names_subscribe.is_empty()
                && is_wildcard_type(&request.type_url))
                || request.resource_names_subscribe.iter().any(|n| n == "*");
            // What a reconnecting proxy already has is not sent again.
            state.sent = request
                .initial_resource_versions
                .iter()
                .filter_map(|(k, v)| {
                    Some((Arc::from(k.as_str()), u64::from_str_radix(v, 16).ok()?))
                })
                .collect();
        }
        for name in &request.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                let name: Arc<str> = Arc::from(name.as_str());
                if state.names.insert(name.clone()) {
                    state.new_names.insert(name);
                }
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            }
            state.names.remove(name.as_str());
            state.sent.remove(name.as_str());
        }
        let asks =
            first || !state.new_names.is_empty() || !request.resource_names_unsubscribe.is_empty();
        if asks {
            state.compared = None;
        }
        asks
    }

    fn respond(
        &mut self,
        type_url: &str,
        generated: &Generated,
        force: bool,
    ) -> Vec<DeltaDiscoveryResponse> {
        let Some(state) = self.types.get_mut(type_url) else {
            return Vec::new();
        };
        let hashes = generated.type_hash(type_url);
        if !force && state.compared == Some(hashes) {
            return Vec::new();
        }
        state.compared = Some(hashes);
        let mut resources = Vec::new();
        let mut present: HashSet<&Arc<str>> = HashSet::new();
        for (name, versioned) in generated.of_type(type_url) {
            if !(state.wildcard || state.names.contains(name)) {
                continue;
            }
            present.insert(name);
            if state.sent.get(name) != Some(&versioned.hash) {
                state.sent.insert(name.clone(), versioned.hash);
                resources.push(Resource {
                    name: name.to_string(),
                    version: versioned.version.clone(),
                    resource: Some(versioned.resource.clone()),
                    ..Default::default()
                });
            }
        }
        // Gone since it was sent, or asked for and not there.
        let mut removed: Vec<String> = Vec::new();
        state.sent.retain(|name, _| {
            let keep = present.contains(name);
            if !keep {
                removed.push(name.to_string());
            }
            keep
        });
        for name in std::mem::take(&mut state.new_names) {
            if !present.contains(&name) && !removed.iter().any(|r| **r == *name) {
                removed.push(name.to_string());
            }
        }
        if resources.is_empty() && removed.is_empty() && !force {
            return Vec::new();
        }
        // Large updates go out in parts, so that no stream buffers a whole
        // mesh's worth at once; the proxy applies each as it comes.
        let mut responses = vec![DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            removed_resources: removed,
            ..Default::default()
        }];
        let mut size = 0;
        for resource in resources {
            let len = resource.resource.as_ref().map_or(0, |r| r.value.len());
            if size > 0 && size + len > RESPONSE_BYTES {
                responses.push(DeltaDiscoveryResponse {
                    type_url: type_url.to_string(),
                    ..Default::default()
                });
                size = 0;
            }
            size += len;
            responses.last_mut().expect("one").resources.push(resource);
        }
        responses
    }

    fn set_nonce(response: &mut DeltaDiscoveryResponse, nonce: String) {
        response.nonce = nonce;
    }

    fn types(&self) -> Vec<String> {
        self.types.keys().cloned().collect()
    }
}

/// State of the world: per type, the names asked for (none: all, for
/// clusters and listeners) and the version of the set last sent.
#[derive(Debug, Default)]
struct StateOfTheWorld {
    types: BTreeMap<String, SotwType>,
}

#[derive(Debug, Default)]
struct SotwType {
    names: BTreeSet<String>,
    version: Option<String>,
}

impl Protocol for StateOfTheWorld {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn subscribe(&mut self, request: &DiscoveryRequest) -> bool {
        let names: BTreeSet<String> = request
            .resource_names
            .iter()
            .filter(|n| *n != "*")
            .cloned()
            .collect();
        match self.types.get_mut(&request.type_url) {
            None => {
                self.types.insert(
                    request.type_url.clone(),
                    SotwType {
                        names,
                        version: None,
                    },
                );
                true
            }
            Some(state) if state.names != names => {
                state.names = names;
                state.version = None;
                true
            }
            Some(_) => false,
        }
    }

    fn respond(
        &mut self,
        type_url: &str,
        generated: &Generated,
        force: bool,
    ) -> Vec<DiscoveryResponse> {
        let Some(state) = self.types.get_mut(type_url) else {
            return Vec::new();
        };
        let all = state.names.is_empty() && is_wildcard_type(type_url);
        let chosen: Vec<(&Arc<str>, &Arc<crate::push::Versioned>)> = generated
            .of_type(type_url)
            .filter(|(name, _)| all || state.names.contains(name.as_ref()))
            .collect();
        let mut joined = std::hash::DefaultHasher::new();
        for (name, versioned) in &chosen {
            std::hash::Hasher::write(&mut joined, name.as_bytes());
            std::hash::Hasher::write_u64(&mut joined, versioned.hash);
        }
        let version = format!("{:016x}", std::hash::Hasher::finish(&joined));
        if state.version.as_ref() == Some(&version) && !force {
            return Vec::new();
        }
        state.version = Some(version.clone());
        // The state of the world is one response: the set it names is all
        // there is.
        vec![DiscoveryResponse {
            version_info: version,
            resources: chosen
                .into_iter()
                .map(|(_, v)| v.resource.clone())
                .collect(),
            type_url: type_url.to_string(),
            ..Default::default()
        }]
    }

    fn set_nonce(response: &mut DiscoveryResponse, nonce: String) {
        response.nonce = nonce;
    }

    fn types(&self) -> Vec<String> {
        self.types.keys().cloned().collect()
    }
}
