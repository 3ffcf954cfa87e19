//! Discovery: reflectors over the cluster feed the model, and changes
//! become pushes.
//!
//! Services, EndpointSlices, Pods, the mesh ConfigMap and the Istio kinds
//! are watched into reflector stores. A change marks its kind; after 100 ms
//! without another change (or 10 s after the first, under a steady stream)
//! the parts of the snapshot those kinds feed are rebuilt — the others are
//! shared with the last snapshot — and published as a new push. A push
//! that changed only endpoints keeps the last push's `config` number, so
//! proxies get only new endpoints generated (the EDS fast path) — unless
//! the endpoints run as service accounts their service's did not, which
//! changes the identities its clusters accept.
//!
//! Istio config is read per object: one that does not parse or fails
//! validation (applied while the webhook was down, say) is left out alone,
//! reported by an Event on it and the `pilot_total_rejected_configs`
//! metric, and blocks nothing else.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bowline_api::install::{AccessLogEncoding, MeshConfig, OutboundTrafficMode};
use bowline_api::networking::{
    DestinationRule, Gateway, Location, Resolution as SeResolution, ServiceEntry, ServiceEntrySpec,
    Sidecar, VirtualService,
};
use bowline_api::security::{AuthorizationPolicy, PeerAuthentication};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use crate::metrics::{KindLabels, Metrics};
use crate::model::{
    AccessLogSettings, Config, Endpoint, Mesh, Protocol, Resolution, Service, ServicePort,
    Snapshot, TlsSecret, TracingSettings, Workload, resolve_host,
};
use crate::push::Push;
use crate::validate;

/// Quiet time after a change before it is pushed.
pub const DEBOUNCE_QUIET: Duration = Duration::from_millis(100);
/// The longest a change waits under a steady stream of changes.
pub const DEBOUNCE_MAX: Duration = Duration::from_secs(10);

/// What discovery needs to know about the control plane it serves.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Config labelled `istio.io/rev` with another revision is not ours.
    pub revision: String,
    /// Where the mesh ConfigMap lives, and its name (`istio[-<rev>]`).
    pub namespace: String,
    pub mesh_config_map: String,
    pub trust_domain: String,
    /// The pod name, for Events' reporting instance.
    pub instance: String,
}

/// What a change touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Services,
    EndpointSlices,
    Pods,
    Secrets,
    MeshConfig,
    VirtualServices,
    DestinationRules,
    Gateways,
    ServiceEntries,
    Sidecars,
    PeerAuthentications,
    AuthorizationPolicies,
}

impl Kind {
    /// Kinds whose changes reach proxies only as endpoints.
    fn endpoints_only(self) -> bool {
        matches!(self, Kind::EndpointSlices | Kind::Pods)
    }
}

/// The reflector stores.
#[derive(Clone)]
struct Stores {
    services: Store<KubeService>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    secrets: Store<Secret>,
    config_maps: Store<ConfigMap>,
    istio: BTreeMap<Kind, Store<DynamicObject>>,
}

/// Watches the cluster and publishes pushes on `pushes` until the watches
/// end. The first push goes out once every store has listed.
pub async fn run(
    client: Client,
    settings: Settings,
    pushes: watch::Sender<Arc<Push>>,
    metrics: Arc<Metrics>,
) {
    let (changes_tx, mut changes) = mpsc::channel::<Kind>(1024);

    let services = watch_kind(
        Api::<KubeService>::all(client.clone()),
        watcher::Config::default(),
        Kind::Services,
        &changes_tx,
    );
    let slices = watch_kind(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        Kind::EndpointSlices,
        &changes_tx,
    );
    let pods = watch_kind(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        Kind::Pods,
        &changes_tx,
    );
    // Credentials; ServiceAccount tokens are never a proxy's business.
    let secrets = watch_kind(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default().fields("type!=kubernetes.io/service-account-token"),
        Kind::Secrets,
        &changes_tx,
    );
    let config_maps = watch_kind(
        Api::<ConfigMap>::namespaced(client.clone(), &settings.namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", settings.mesh_config_map)),
        Kind::MeshConfig,
        &changes_tx,
    );
    let mut istio = BTreeMap::new();
    for (kind, resource) in [
        (
            Kind::VirtualServices,
            ApiResource::erase::<VirtualService>(&()),
        ),
        (
            Kind::DestinationRules,
            ApiResource::erase::<DestinationRule>(&()),
        ),
        (Kind::Gateways, ApiResource::erase::<Gateway>(&())),
        (
            Kind::ServiceEntries,
            ApiResource::erase::<ServiceEntry>(&()),
        ),
        (Kind::Sidecars, ApiResource::erase::<Sidecar>(&())),
        (
            Kind::PeerAuthentications,
            ApiResource::erase::<PeerAuthentication>(&()),
        ),
        (
            Kind::AuthorizationPolicies,
            ApiResource::erase::<AuthorizationPolicy>(&()),
        ),
    ] {
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let writer = reflector::store::Writer::new(resource.clone());
        let store = writer.as_reader();
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()));
        tokio::spawn(forward(stream, kind, changes_tx.clone()));
        istio.insert(kind, store);
    }
    let stores = Stores {
        services,
        slices,
        pods,
        secrets,
        config_maps,
        istio,
    };
    let _ = stores.services.wait_until_ready().await;
    let _ = stores.slices.wait_until_ready().await;
    let _ = stores.pods.wait_until_ready().await;
    let _ = stores.secrets.wait_until_ready().await;
    let _ = stores.config_maps.wait_until_ready().await;
    for store in stores.istio.values() {
        let _ = store.wait_until_ready().await;
    }

    let mut reporter = Reporting::new(client, &settings, metrics);
    let all: BTreeSet<Kind> = [
        Kind::Services,
        Kind::EndpointSlices,
        Kind::Pods,
        Kind::Secrets,
        Kind::MeshConfig,
        Kind::VirtualServices,
        Kind::DestinationRules,
        Kind::Gateways,
        Kind::ServiceEntries,
        Kind::Sidecars,
        Kind::PeerAuthentications,
        Kind::AuthorizationPolicies,
    ]
    .into();
    let mut snapshot = rebuild(
        &Snapshot::default(),
        &stores,
        &all,
        &settings,
        &mut reporter,
    )
    .await;
    // Changes seen while listing are in the first snapshot.
    while changes.try_recv().is_ok() {}
    let mut current = Push::first(snapshot.clone());
    pushes.send_replace(Arc::new(current.clone()));
    tracing::info!(
        services = snapshot.services.len(),
        "discovery ready; first push published"
    );

    let mut changed: BTreeSet<Kind> = BTreeSet::new();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        let deadline = first.map(|first| push_at(first, last));
        tokio::select! {
            kind = changes.recv() => {
                let Some(kind) = kind else { break };
                changed.insert(kind);
                last = Instant::now();
                first.get_or_insert(last);
            }
            _ = sleep_until(deadline) => {
                let before = snapshot;
                snapshot = rebuild(&before, &stores, &changed, &settings, &mut reporter).await;
                // A workload of a new service account changes the identities
                // its service's clusters accept: their callers need new
                // clusters, not only endpoints.
                let endpoints_only = changed.iter().all(|k| k.endpoints_only())
                    && !snapshot.identities_differ(&before);
                current = Push {
                    number: current.number + 1,
                    config: if endpoints_only { current.config } else { current.number + 1 },
                    snapshot: Arc::new(snapshot.clone()),
                    since: first.take().unwrap_or_else(Instant::now),
                };
                tracing::debug!(push = current.number, ?changed, "push");
                changed.clear();
                pushes.send_replace(Arc::new(current.clone()));
            }
        }
    }
}

/// When changes seen since `first` (the latest at `last`) are pushed:
/// after 100 ms without another, or 10 s after the first, whichever comes
/// first — so a steady stream of changes still gets out.
pub fn push_at(first: Instant, last: Instant) -> Instant {
    (last + DEBOUNCE_QUIET).min(first + DEBOUNCE_MAX)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => futures::future::pending().await,
    }
}

fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    changes: &mpsc::Sender<Kind>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config));
    tokio::spawn(forward(stream, kind, changes.clone()));
    store
}

/// Drives a reflector, and marks its kind changed on every change after
/// the first listing.
async fn forward<K, S>(stream: S, kind: Kind, changes: mpsc::Sender<Kind>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let stream = stream.default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                if changes.send(kind).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(?kind, %error, "watch failed; retrying"),
        }
    }
}

/// The snapshot after `changed`: those kinds' parts rebuilt from the
/// stores, the rest shared with `previous`.
async fn rebuild(
    previous: &Snapshot,
    stores: &Stores,
    changed: &BTreeSet<Kind>,
    settings: &Settings,
    reporter: &mut Reporting,
) -> Snapshot {
    let mut next = previous.clone();
    let touched = |kinds: &[Kind]| kinds.iter().any(|k| changed.contains(k));
    let configs = |kind: Kind| {
        stores.istio[&kind]
            .state()
            .into_iter()
            .filter(|o| ours(o, &settings.revision))
            .collect::<Vec<_>>()
    };

    if touched(&[Kind::VirtualServices]) {
        next.virtual_services = Arc::new(
            reporter
                .read(
                    configs(Kind::VirtualServices),
                    "VirtualService",
                    validate::virtual_service,
                )
                .await,
        );
    }
    if touched(&[Kind::DestinationRules]) {
        next.destination_rules = Arc::new(
            reporter
                .read_noting(
                    configs(Kind::DestinationRules),
                    "DestinationRule",
                    validate::destination_rule,
                    validate::destination_rule_unread,
                )
                .await,
        );
    }
    if touched(&[Kind::Gateways]) {
        next.gateways = Arc::new(
            reporter
                .read(configs(Kind::Gateways), "Gateway", validate::gateway)
                .await,
        );
    }
    if touched(&[Kind::ServiceEntries]) {
        next.service_entries = Arc::new(
            reporter
                .read(
                    configs(Kind::ServiceEntries),
                    "ServiceEntry",
                    validate::service_entry,
                )
                .await,
        );
    }
    if touched(&[Kind::Sidecars]) {
        next.sidecars = Arc::new(
            reporter
                .read(configs(Kind::Sidecars), "Sidecar", validate::sidecar)
                .await,
        );
    }
    if touched(&[Kind::PeerAuthentications]) {
        next.peer_authentications = Arc::new(
            reporter
                .read(
                    configs(Kind::PeerAuthentications),
                    "PeerAuthentication",
                    validate::peer_authentication,
                )
                .await,
        );
    }
    if touched(&[Kind::AuthorizationPolicies]) {
        next.authorization_policies = Arc::new(
            reporter
                .read(
                    configs(Kind::AuthorizationPolicies),
                    "AuthorizationPolicy",
                    validate::authorization_policy,
                )
                .await,
        );
    }
    if touched(&[Kind::MeshConfig]) {
        next.mesh = Arc::new(mesh(
            stores.config_maps.state().first().map(|c| c.as_ref()),
            settings,
        ));
    }
    if touched(&[Kind::Pods]) {
        next.workloads = Arc::new(workloads(&stores.pods.state()));
    }
    if touched(&[Kind::Secrets]) {
        next.secrets = Arc::new(tls_secrets(&stores.secrets.state()));
    }
    if touched(&[Kind::Services, Kind::ServiceEntries]) {
        let mut services: BTreeMap<String, Service> = stores
            .services
            .state()
            .iter()
            .filter_map(|s| kubernetes_service(s))
            .map(|s| (s.hostname.clone(), s))
            .collect();
        for entry in next.service_entries.iter() {
            for service in entry_services(entry) {
                // A Kubernetes Service of the same name wins, as in Istio.
                services.entry(service.hostname.clone()).or_insert(service);
            }
        }
        next.services = Arc::new(services);
    }
    if touched(&[
        Kind::Services,
        Kind::EndpointSlices,
        Kind::Pods,
        Kind::ServiceEntries,
    ]) {
        let mut endpoints =
            slice_endpoints(&stores.slices.state(), &stores.pods.state(), &next.services);
        for entry in next.service_entries.iter() {
            for (host, list) in entry_endpoints(entry) {
                if next
                    .services
                    .get(&host)
                    .is_some_and(|s| s.namespace == entry.namespace)
                {
                    endpoints.entry(host).or_insert(list);
                }
            }
        }
        next.endpoints = Arc::new(endpoints);
    }
    next
}

/// Config without `istio.io/rev`, or with ours.
fn ours(object: &DynamicObject, revision: &str) -> bool {
    object
        .labels()
        .get("istio.io/rev")
        .is_none_or(|r| r == revision || (r.is_empty() && revision == "default"))
}

/// The mesh settings from the `mesh` key of the mesh ConfigMap.
fn mesh(config_map: Option<&ConfigMap>, settings: &Settings) -> Mesh {
    let config: MeshConfig = config_map
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get("mesh"))
        .and_then(|text| match serde_saphyr::from_str(text) {
            Ok(config) => Some(config),
            Err(error) => {
                tracing::warn!(%error, "the mesh config does not read; using defaults");
                None
            }
        })
        .unwrap_or_default();
    Mesh {
        tracing: tracing(&config),
        root_namespace: settings.namespace.clone(),
        trust_domain: config
            .trust_domain
            .unwrap_or_else(|| settings.trust_domain.clone()),
        outbound: config
            .outbound_traffic_policy
            .and_then(|p| p.mode)
            .unwrap_or(OutboundTrafficMode::AllowAny),
        access_log: config
            .access_log_file
            .filter(|path| !path.is_empty())
            .map(|path| AccessLogSettings {
                path,
                json: config.access_log_encoding == Some(AccessLogEncoding::Json),
            }),
    }
}

/// Istio's tracing defaults: on unless `enableTracing: false`, 1 % of
/// requests unless `defaultConfig.tracing.sampling` says otherwise; spans
/// go to `otlpAddress` (the operator names the Jaeger addon's collector).
fn tracing(config: &MeshConfig) -> Option<TracingSettings> {
    if config.enable_tracing == Some(false) {
        return None;
    }
    let tracing = config.default_config.as_ref()?.tracing.as_ref()?;
    let address = tracing.otlp_address.as_deref()?;
    let Some((host, port)) = address
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
        .filter(|(host, _)| !host.is_empty())
    else {
        tracing::warn!(
            address,
            "defaultConfig.tracing.otlpAddress is not host:port; proxies will not trace"
        );
        return None;
    };
    Some(TracingSettings {
        host: host.to_string(),
        port,
        sampling: tracing.sampling.unwrap_or(1.0).clamp(0.0, 100.0),
    })
}

/// Secrets with a certificate or a CA under Kubernetes' TLS keys or
/// Istio's generic ones.
fn tls_secrets(secrets: &[Arc<Secret>]) -> BTreeMap<String, TlsSecret> {
    secrets
        .iter()
        .filter_map(|secret| {
            let data = secret.data.as_ref()?;
            let text = |keys: &[&str]| {
                keys.iter()
                    .find_map(|k| data.get(*k))
                    .and_then(|v| String::from_utf8(v.0.clone()).ok())
            };
            let tls = TlsSecret {
                cert: text(&["tls.crt", "cert"]),
                key: text(&["tls.key", "key"]),
                ca: text(&["ca.crt", "cacert"]),
            };
            (tls.cert.is_some() || tls.ca.is_some()).then(|| {
                (
                    format!(
                        "{}/{}",
                        secret.namespace().unwrap_or_default(),
                        secret.name_any()
                    ),
                    tls,
                )
            })
        })
        .collect()
}

fn workloads(pods: &[Arc<Pod>]) -> BTreeMap<String, Workload> {
    pods.iter()
        .map(|pod| {
            (
                format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
                Workload {
                    labels: pod.labels().clone(),
                    ip: pod
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.clone())
                        .unwrap_or_default(),
                    service_account: pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_else(|| "default".into()),
                },
            )
        })
        .collect()
}

/// A Kubernetes Service as the model has it. ExternalName Services are
/// left out.
pub fn kubernetes_service(service: &KubeService) -> Option<Service> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let name = p.name.clone().unwrap_or_default();
            ServicePort {
                protocol: Protocol::select(&name, p.app_protocol.as_deref()),
                name,
                port: p.port as u32,
            }
        })
        .collect();
    let mut model = Service::kubernetes(&service.name_any(), &service.namespace()?, ports);
    model.address = spec
        .cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty() && ip != "None");
    Some(model)
}

/// Endpoints from EndpointSlices: per Service, each address with the
/// ports of its slice, labelled with its pod's labels (subsets select on
/// them) and marked as having a sidecar when the pod says so.
pub fn slice_endpoints(
    slices: &[Arc<EndpointSlice>],
    pods: &[Arc<Pod>],
    services: &BTreeMap<String, Service>,
) -> BTreeMap<String, Vec<Endpoint>> {
    let pods: std::collections::HashMap<(String, String), &Pod> = pods
        .iter()
        .map(|p| {
            (
                (p.namespace().unwrap_or_default(), p.name_any()),
                p.as_ref(),
            )
        })
        .collect();
    let mut endpoints: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
    for slice in slices {
        let (Some(service), Some(namespace)) = (
            slice.labels().get("kubernetes.io/service-name"),
            slice.namespace(),
        ) else {
            continue;
        };
        let host = resolve_host(service, &namespace);
        let Some(model) = services.get(&host) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| pods.get(&(namespace.clone(), r.name.clone().unwrap_or_default())));
            let labels = pod.map(|p| p.labels().clone()).unwrap_or_default();
            let service_account = pod.map(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into())
            });
            let sidecar =
                labels.get("security.istio.io/tlsMode").map(String::as_str) == Some("istio");
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            for port in slice.ports.iter().flatten() {
                let name = port.name.clone().unwrap_or_default();
                let Some(service_port) = model.ports.iter().find(|p| p.name == name) else {
                    continue;
                };
                for address in &endpoint.addresses {
                    endpoints.entry(host.clone()).or_default().push(Endpoint {
                        address: address.clone(),
                        service_port: service_port.port,
                        port: port.port.unwrap_or(service_port.port as i32) as u32,
                        labels: labels.clone(),
                        ready,
                        sidecar,
                        service_account: service_account.clone(),
                    });
                }
            }
        }
    }
    for list in endpoints.values_mut() {
        list.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
        list.dedup();
    }
    endpoints
}

/// A ServiceEntry's hosts as services.
pub fn entry_services(entry: &Config<ServiceEntrySpec>) -> Vec<Service> {
    let spec = &entry.spec;
    let resolution = match spec.resolution {
        Some(SeResolution::Dns) | Some(SeResolution::DnsRoundRobin) => Resolution::Dns,
        Some(SeResolution::Static) => Resolution::Endpoints,
        _ => Resolution::Passthrough,
    };
    spec.hosts
        .iter()
        .map(|host| Service {
            hostname: resolve_host(host, &entry.namespace),
            namespace: entry.namespace.clone(),
            ports: spec
                .ports
                .iter()
                .map(|p| ServicePort {
                    name: p.name.clone(),
                    port: p.number,
                    protocol: Protocol::select(&p.name, p.protocol.as_deref()),
                })
                .collect(),
            // A single address is the service's VIP; wider ranges are
            // not (yet) matched by listeners.
            address: spec
                .addresses
                .first()
                .and_then(|a| match a.split_once('/') {
                    None => Some(a.clone()),
                    Some((ip, "32" | "128")) => Some(ip.to_string()),
                    Some(_) => None,
                }),
            external: spec.location != Some(Location::MeshInternal),
            resolution,
        })
        .collect()
}

/// A ServiceEntry's endpoints: its `endpoints` (ports by port name, else
/// the service port), or for DNS without endpoints the host itself.
pub fn entry_endpoints(entry: &Config<ServiceEntrySpec>) -> Vec<(String, Vec<Endpoint>)> {
    let spec = &entry.spec;
    entry_services(entry)
        .into_iter()
        .map(|service| {
            let mut list = Vec::new();
            for port in &spec.ports {
                if spec.endpoints.is_empty() && service.resolution == Resolution::Dns {
                    list.push(Endpoint {
                        address: service.hostname.clone(),
                        service_port: port.number,
                        port: port.target_port.unwrap_or(port.number),
                        labels: BTreeMap::new(),
                        ready: true,
                        sidecar: false,
                        service_account: None,
                    });
                }
                for e in &spec.endpoints {
                    let Some(address) = &e.address else { continue };
                    list.push(Endpoint {
                        address: address.clone(),
                        service_port: port.number,
                        port: e
                            .ports
                            .get(&port.name)
                            .copied()
                            .or(port.target_port)
                            .unwrap_or(port.number),
                        labels: e.labels.clone(),
                        service_account: e.service_account.clone(),
                        ready: true,
                        sidecar: !service.external
                            && e.labels
                                .get("security.istio.io/tlsMode")
                                .map(String::as_str)
                                == Some("istio"),
                    });
                }
            }
            (service.hostname, list)
        })
        .collect()
}

/// Reads Istio config objects one by one, leaving out (and reporting)
/// those that do not parse or validate.
struct Reporting {
    recorder: Recorder,
    metrics: Arc<Metrics>,
    /// Objects (uid and resourceVersion) already reported.
    reported: HashSet<(String, String)>,
}

impl Reporting {
    fn new(client: Client, settings: &Settings, metrics: Arc<Metrics>) -> Self {
        Self {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "bowline-controlplane".into(),
                    instance: Some(settings.instance.clone()),
                },
            ),
            metrics,
            reported: HashSet::new(),
        }
    }

    async fn read<T: DeserializeOwned>(
        &mut self,
        objects: Vec<Arc<DynamicObject>>,
        kind: &'static str,
        check: fn(&T) -> Result<(), Vec<validate::FieldError>>,
    ) -> Vec<Config<T>> {
        self.read_noting(objects, kind, check, |_| Vec::new()).await
    }

    /// [`Reporting::read`], telling the authors of objects applied what
    /// `unread` finds in them (fields read but not acted on), once per
    /// version of each.
    async fn read_noting<T: DeserializeOwned>(
        &mut self,
        objects: Vec<Arc<DynamicObject>>,
        kind: &'static str,
        check: fn(&T) -> Result<(), Vec<validate::FieldError>>,
        unread: fn(&T) -> Vec<validate::FieldError>,
    ) -> Vec<Config<T>> {
        let mut configs = Vec::new();
        for object in objects {
            let spec = object.data.get("spec").cloned().unwrap_or_default();
            let result = serde_json::from_value::<T>(spec)
                .map_err(|e| format!("spec: does not read as a {kind}: {e}"))
                .and_then(|spec| {
                    check(&spec).map(|()| spec).map_err(|errors| {
                        errors
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                });
            match result {
                Ok(spec) => {
                    let notes = unread(&spec);
                    if !notes.is_empty() {
                        self.note_unread(&object, kind, &notes).await;
                    }
                    configs.push(Config {
                        name: object.name_any(),
                        namespace: object.namespace().unwrap_or_default(),
                        created: object
                            .creation_timestamp()
                            .map(|t| t.0.as_second())
                            .unwrap_or_default(),
                        spec,
                    });
                }
                Err(message) => self.report(&object, kind, message).await,
            }
        }
        configs
    }

    async fn report(&mut self, object: &DynamicObject, kind: &'static str, message: String) {
        if !self.first_report(object) {
            return;
        }
        let name = namespaced_name(object);
        tracing::warn!(%kind, object = %name, error = %message, "invalid config skipped");
        self.metrics
            .invalid_config
            .get_or_create(&KindLabels { kind })
            .inc();
        let note = format!(
            "{kind} {name} is not applied: {message}. Fix it; the rest of the mesh's config is applied without it."
        );
        self.publish(object, kind, "InvalidConfig", note).await;
    }

    /// Tells of fields `object` sets that are read but not acted on.
    async fn note_unread(
        &mut self,
        object: &DynamicObject,
        kind: &'static str,
        notes: &[validate::FieldError],
    ) {
        if !self.first_report(object) {
            return;
        }
        let name = namespaced_name(object);
        let fields = notes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        tracing::info!(%kind, object = %name, %fields, "config applied without fields it sets");
        let note = format!("{kind} {name} is applied without: {fields}.");
        self.publish(object, kind, "UnsupportedFields", note).await;
    }

    /// Whether this version of `object` has not been reported yet.
    fn first_report(&mut self, object: &DynamicObject) -> bool {
        self.reported.insert((
            object.uid().unwrap_or_default(),
            object.resource_version().unwrap_or_default(),
        ))
    }

    /// A Warning event on `object` (its note cut to the 1 KiB an event
    /// holds).
    async fn publish(
        &self,
        object: &DynamicObject,
        kind: &'static str,
        reason: &str,
        mut note: String,
    ) {
        if note.len() > 1024 {
            let mut end = 1021;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        let reference = ObjectReference {
            api_version: object.types.as_ref().map(|t| t.api_version.clone()),
            kind: Some(kind.into()),
            name: Some(object.name_any()),
            namespace: object.namespace(),
            uid: object.uid(),
            resource_version: object.resource_version(),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "Translate".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &reference).await {
            let name = namespaced_name(object);
            tracing::warn!(%error, object = %name, "could not record the event");
        }
    }
}

fn namespaced_name(object: &DynamicObject) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_wait_for_quiet_but_not_for_ever() {
        let first = Instant::now();
        // One change: pushed 100 ms later.
        assert_eq!(push_at(first, first), first + DEBOUNCE_QUIET);
        // Another 50 ms on: the quiet period starts again.
        let later = first + Duration::from_millis(50);
        assert_eq!(push_at(first, later), later + DEBOUNCE_QUIET);
        // A change every 50 ms for ever: out 10 s after the first.
        let steady = first + Duration::from_millis(9_990);
        assert_eq!(push_at(first, steady), first + DEBOUNCE_MAX);
    }

    #[test]
    fn a_service_entry_s_hosts_ports_and_endpoints() {
        let entry = Config::new(
            "legacy-db",
            "shop",
            serde_json::from_value::<ServiceEntrySpec>(serde_json::json!({
                "hosts": ["db.legacy.internal"],
                "addresses": ["192.0.2.10/32"],
                "ports": [{"number": 5432, "name": "tcp-postgres", "protocol": "TCP"}],
                "location": "MESH_INTERNAL",
                "resolution": "STATIC",
                "endpoints": [{"address": "192.0.2.10", "labels": {"app": "legacy-db"}, "serviceAccount": "db"}],
            }))
            .unwrap(),
        );
        let services = entry_services(&entry);
        assert_eq!(services[0].hostname, "db.legacy.internal");
        assert_eq!(services[0].address.as_deref(), Some("192.0.2.10"));
        assert_eq!(services[0].resolution, Resolution::Endpoints);
        assert!(!services[0].external);
        let (host, endpoints) = &entry_endpoints(&entry)[0];
        assert_eq!(host, "db.legacy.internal");
        assert_eq!(endpoints[0].address, "192.0.2.10");
        assert_eq!(endpoints[0].port, 5432);
        assert_eq!(endpoints[0].service_account.as_deref(), Some("db"));
    }
}
