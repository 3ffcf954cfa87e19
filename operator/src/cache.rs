//! Watched caches of every kind the operator renders. They feed the
//! controller (a change to an owned object triggers its installation's
//! reconcile) and answer the reconcile's reads, so that a reconcile with
//! nothing to change costs the API server nothing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ApiResource, DynamicObject, PartialObjectMeta};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::apply::managed_kinds;
use crate::render::meta::{
    DEFAULT_REVISION, INSTALLATION_LABEL, MANAGED_BY, MANAGED_BY_LABEL, REVISION_LABEL,
};

/// Istio's namespace label for injection by the default revision.
pub const INJECTION_LABEL: &str = "istio-injection";
/// The annotation sidecar injection puts on every pod it injects.
pub const INJECTION_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// A watch stream that keeps one cache up to date, for the controller to
/// poll.
pub type CacheStream = BoxStream<'static, Result<DynamicObject, watcher::Error>>;

/// One cache per managed kind, holding the objects labelled as Bowline's.
#[derive(Clone, Debug, Default)]
pub struct Caches {
    stores: Vec<(ApiResource, Store<DynamicObject>)>,
    /// Set once every store has listed its kind.
    ready: Arc<tokio::sync::OnceCell<()>>,
}

impl Caches {
    /// The caches, and the streams that fill them: every stream must be
    /// polled (the controller does) for its cache to fill.
    pub fn watch(client: &Client) -> (Self, Vec<(ApiResource, CacheStream)>) {
        let config = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let mut stores = Vec::new();
        let mut streams = Vec::new();
        for (resource, _) in managed_kinds() {
            let writer = Writer::new(resource.clone());
            stores.push((resource.clone(), writer.as_reader()));
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            // Deletions trigger too: a deleted object must come back.
            let stream = watcher(api, config.clone())
                .default_backoff()
                .reflect(writer)
                .touched_objects()
                .boxed();
            streams.push((resource, stream));
        }
        (
            Self {
                stores,
                ready: Arc::default(),
            },
            streams,
        )
    }

    /// Waits until every cache has listed its kind once.
    ///
    /// One task waits on the stores, the others on it: a kube-runtime
    /// store's readiness wakes only the last of several tasks waiting on it
    /// at once (it keeps one waker), and the others would wait for ever.
    pub async fn ready(&self) {
        self.ready
            .get_or_init(|| async {
                for (_, store) in &self.stores {
                    // A dropped writer means the controller is shutting down.
                    let _ = store.wait_until_ready().await;
                }
            })
            .await;
    }

    fn store(&self, resource: &ApiResource) -> Option<&Store<DynamicObject>> {
        self.stores
            .iter()
            .find(|(r, _)| r == resource)
            .map(|(_, s)| s)
    }

    /// The cached object, if there is one.
    pub fn get(
        &self,
        resource: &ApiResource,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Arc<DynamicObject>> {
        let mut key = ObjectRef::<DynamicObject>::new_with(name, resource.clone());
        if let Some(namespace) = namespace {
            key = key.within(namespace);
        }
        self.store(resource)?.get(&key)
    }

    /// Every cached object of `installation`, with its kind.
    pub fn of_installation(&self, installation: &str) -> Vec<(ApiResource, Arc<DynamicObject>)> {
        self.stores
            .iter()
            .flat_map(|(resource, store)| {
                store
                    .state()
                    .into_iter()
                    .filter(|o| {
                        o.labels().get(INSTALLATION_LABEL).map(String::as_str) == Some(installation)
                    })
                    .map(move |o| (resource.clone(), o))
            })
            .collect()
    }
}

/// Who uses the revisions: Namespaces and injected Pods, as metadata only
/// (a Pod's spec and status are not needed), each indexed by the revision or
/// tag it selects, so that a reconcile reads what uses a revision without
/// going over every pod.
#[derive(Clone, Debug)]
pub struct Usage {
    namespaces: Index<Namespace>,
    /// One index per watched namespace, or one for the whole cluster.
    pods: Vec<Index<Pod>>,
}

/// What uses one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevisionUsage {
    /// Namespaces whose labels select the revision, sorted.
    pub namespaces: Vec<String>,
    /// Pods injected by the revision (labelled with it, and carrying the
    /// injection's status annotation).
    pub workloads: i64,
}

/// Streams that keep [`Usage`] up to date, for the controller to poll.
pub type NamespaceStream = BoxStream<'static, Result<PartialObjectMeta<Namespace>, watcher::Error>>;
pub type PodStream = BoxStream<'static, Result<PartialObjectMeta<Pod>, watcher::Error>>;

impl Usage {
    /// Watches the workloads in `watched` namespaces, or in every
    /// namespace when `watched` is empty.
    pub fn watch(client: &Client, watched: &[String]) -> (Self, NamespaceStream, PodStream) {
        let only: Arc<[String]> = watched.into();
        let namespaces = Index::new(move |ns: &PartialObjectMeta<Namespace>| {
            let name = ns.name_any();
            (only.is_empty() || only.contains(&name))
                .then(|| namespace_selection(ns.labels()).map(str::to_string))
                .flatten()
        });
        // `Api<PartialObjectMeta<_>>` asks for metadata only; with a list
        // of namespaces, one watch each, so nothing else is listed.
        let namespace_stream = namespaces.follow(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            watcher::Config::default(),
        );
        let apis = if watched.is_empty() {
            vec![Api::<PartialObjectMeta<Pod>>::all(client.clone())]
        } else {
            watched
                .iter()
                .map(|ns| Api::namespaced(client.clone(), ns))
                .collect()
        };
        let (pods, pod_streams): (Vec<_>, Vec<_>) = apis
            .into_iter()
            .map(|api| {
                let index = Index::new(injected_revision);
                let stream = index.follow(api, watcher::Config::default().labels(REVISION_LABEL));
                (index, stream)
            })
            .unzip();
        let pod_stream = futures::stream::select_all(pod_streams).boxed();
        (Self { namespaces, pods }, namespace_stream, pod_stream)
    }

    pub async fn ready(&self) {
        self.namespaces.ready().await;
        for pods in &self.pods {
            pods.ready().await;
        }
    }

    /// What uses `revision`, known also by `tags`: the namespaces that
    /// select it or one of its tags, and the pods it injected.
    pub fn of(&self, revision: &str, tags: &[String]) -> RevisionUsage {
        let mut namespaces: Vec<String> = std::iter::once(revision)
            .chain(tags.iter().map(String::as_str))
            .flat_map(|name| self.namespaces.get(name))
            .map(|ns| ns.name_any())
            .collect();
        namespaces.sort();
        namespaces.dedup();
        RevisionUsage {
            namespaces,
            workloads: self
                .pods
                .iter()
                .map(|pods| pods.count(revision))
                .sum::<usize>() as i64,
        }
    }

    /// The namespaces that select `name` (a revision or a tag), sorted.
    pub fn selecting(&self, name: &str) -> Vec<String> {
        let mut namespaces: Vec<String> = self
            .namespaces
            .get(name)
            .iter()
            .map(|ns| ns.name_any())
            .collect();
        namespaces.sort();
        namespaces
    }

    /// Pods running a proxy `revision` injected.
    pub fn injected_pods(&self, revision: &str) -> Vec<Arc<PartialObjectMeta<Pod>>> {
        self.pods
            .iter()
            .flat_map(|pods| pods.get(revision))
            .collect()
    }
}

/// The revision that injected a pod's proxy. The mesh's own pods (control
/// plane, gateways, addons) carry the revision label too, but not
/// injection's status annotation.
fn injected_revision(pod: &PartialObjectMeta<Pod>) -> Option<String> {
    pod.annotations()
        .contains_key(INJECTION_STATUS_ANNOTATION)
        .then(|| pod.labels().get(REVISION_LABEL).cloned())
        .flatten()
}

/// What an [`Index`] groups an object by; `None` leaves it out.
type KeyOf<K> = dyn Fn(&PartialObjectMeta<K>) -> Option<String> + Send + Sync;

/// Objects grouped by a key computed from each (the revision or tag it
/// selects), kept up to date from a watch: a relist replaces the whole
/// index at once, as a reflector's store does.
#[derive(Clone)]
struct Index<K: kube::Resource + 'static> {
    state: Arc<RwLock<IndexState<K>>>,
    key: Arc<KeyOf<K>>,
    ready: tokio::sync::watch::Receiver<bool>,
    set_ready: Arc<tokio::sync::watch::Sender<bool>>,
}

struct IndexState<K: kube::Resource + 'static> {
    /// key → (namespace/name → object)
    groups: HashMap<String, HashMap<String, Arc<PartialObjectMeta<K>>>>,
    /// namespace/name → key, to find an object's group when it changes.
    keys: HashMap<String, String>,
    /// What a relist has delivered so far.
    relisting: Option<Vec<PartialObjectMeta<K>>>,
}

impl<K: kube::Resource + 'static> std::fmt::Debug for Index<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").finish_non_exhaustive()
    }
}

impl<K> Index<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
    K::DynamicType: Default,
    PartialObjectMeta<K>: kube::Resource<DynamicType = K::DynamicType>,
{
    fn new(key: impl Fn(&PartialObjectMeta<K>) -> Option<String> + Send + Sync + 'static) -> Self {
        let (set_ready, ready) = tokio::sync::watch::channel(false);
        Self {
            state: Arc::new(RwLock::new(IndexState {
                groups: HashMap::new(),
                keys: HashMap::new(),
                relisting: None,
            })),
            key: Arc::new(key),
            ready,
            set_ready: Arc::new(set_ready),
        }
    }

    /// The watch that keeps the index, as a stream of the objects that
    /// joined, left or moved between groups: only those change what uses a
    /// revision (a pod's status updates do not), so only those should
    /// trigger a reconcile.
    fn follow(
        &self,
        api: Api<PartialObjectMeta<K>>,
        config: watcher::Config,
    ) -> BoxStream<'static, Result<PartialObjectMeta<K>, watcher::Error>> {
        let index = self.clone();
        watcher(api, config)
            .default_backoff()
            .map_ok(move |event| futures::stream::iter(index.apply(&event).into_iter().map(Ok)))
            .try_flatten()
            .boxed()
    }

    /// Applies a watch event; returns the objects whose group changed.
    fn apply(&self, event: &watcher::Event<PartialObjectMeta<K>>) -> Vec<PartialObjectMeta<K>> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Init => {
                state.relisting = Some(Vec::new());
                Vec::new()
            }
            watcher::Event::InitApply(object) => {
                if let Some(relisting) = state.relisting.as_mut() {
                    relisting.push(object.clone());
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                let mut before = std::mem::take(&mut state.groups);
                let keys_before = std::mem::take(&mut state.keys);
                let mut changed = Vec::new();
                for object in state.relisting.take().unwrap_or_default() {
                    let name = name_of(&object);
                    let was = keys_before.get(&name);
                    if let Some(group) = was.and_then(|key| before.get_mut(key)) {
                        group.remove(&name);
                    }
                    if (self.key)(&object).as_ref() != was {
                        changed.push(object.clone());
                    }
                    self.insert(&mut state, object);
                }
                // Members that are gone.
                changed.extend(
                    before
                        .into_values()
                        .flat_map(HashMap::into_values)
                        .map(|object| (*object).clone()),
                );
                let _ = self.set_ready.send(true);
                changed
            }
            watcher::Event::Apply(object) => {
                let name = name_of(object);
                let was = state.keys.get(&name).cloned();
                Self::remove(&mut state, &name);
                self.insert(&mut state, object.clone());
                if state.keys.get(&name) != was.as_ref() {
                    vec![object.clone()]
                } else {
                    Vec::new()
                }
            }
            watcher::Event::Delete(object) => {
                let name = name_of(object);
                let was = state.keys.contains_key(&name);
                Self::remove(&mut state, &name);
                if was {
                    vec![object.clone()]
                } else {
                    Vec::new()
                }
            }
        }
    }

    fn insert(&self, state: &mut IndexState<K>, object: PartialObjectMeta<K>) {
        if let Some(key) = (self.key)(&object) {
            let name = name_of(&object);
            state.keys.insert(name.clone(), key.clone());
            state
                .groups
                .entry(key)
                .or_default()
                .insert(name, Arc::new(object));
        }
    }

    fn remove(state: &mut IndexState<K>, name: &str) {
        if let Some(key) = state.keys.remove(name)
            && let Some(group) = state.groups.get_mut(&key)
        {
            group.remove(name);
            if group.is_empty() {
                state.groups.remove(&key);
            }
        }
    }

    fn get(&self, key: &str) -> Vec<Arc<PartialObjectMeta<K>>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .groups
            .get(key)
            .map(|group| group.values().cloned().collect())
            .unwrap_or_default()
    }

    fn count(&self, key: &str) -> usize {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.groups.get(key).map_or(0, HashMap::len)
    }

    /// Waits until the first list is in.
    async fn ready(&self) {
        let mut ready = self.ready.clone();
        // A dropped sender means the controller is shutting down.
        let _ = ready.wait_for(|ready| *ready).await;
    }
}

fn name_of<K: kube::Resource>(object: &PartialObjectMeta<K>) -> String
where
    PartialObjectMeta<K>: kube::Resource,
{
    format!(
        "{}/{}",
        object.metadata.namespace.as_deref().unwrap_or_default(),
        object.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The revision or tag a namespace with `labels` injects its pods from,
/// with Istio's precedence: a namespace labelled `istio-injection` follows
/// that label (`enabled` means the default revision, or the tag named
/// `default`) whatever its `istio.io/rev` says.
pub fn namespace_selection(labels: &std::collections::BTreeMap<String, String>) -> Option<&str> {
    match labels.get(INJECTION_LABEL) {
        Some(injection) => (injection == "enabled").then_some(DEFAULT_REVISION),
        None => labels.get(REVISION_LABEL).map(String::as_str),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(name: &str, revision: &str, injected: bool) -> PartialObjectMeta<Pod> {
        let mut pod = PartialObjectMeta::<Pod>::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("shop".into());
        pod.metadata.labels = Some(labels(&[(REVISION_LABEL, revision)]));
        if injected {
            pod.metadata.annotations = Some(labels(&[(INJECTION_STATUS_ANNOTATION, "{}")]));
        }
        pod
    }

    fn by_revision() -> Index<Pod> {
        Index::new(|pod: &PartialObjectMeta<Pod>| {
            pod.annotations()
                .contains_key(INJECTION_STATUS_ANNOTATION)
                .then(|| pod.labels().get(REVISION_LABEL).cloned())
                .flatten()
        })
    }

    #[test]
    fn the_index_follows_changes_and_relists() {
        let index = by_revision();
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(pod("a", "v1", true)));
        index.apply(&watcher::Event::InitApply(pod("mesh", "v1", false)));
        assert_eq!(index.count("v1"), 0, "nothing before the list is complete");
        index.apply(&watcher::Event::InitDone);
        assert_eq!(index.count("v1"), 1, "the mesh's own pod is not injected");

        let joined = index.apply(&watcher::Event::Apply(pod("b", "v1", true)));
        assert_eq!(joined.len(), 1, "b joined v1");
        let unchanged = index.apply(&watcher::Event::Apply(pod("b", "v1", true)));
        assert!(unchanged.is_empty(), "a status update changes no group");
        index.apply(&watcher::Event::Apply(pod("a", "v2", true)));
        assert_eq!((index.count("v1"), index.count("v2")), (1, 1), "a moved");
        index.apply(&watcher::Event::Delete(pod("b", "v1", true)));
        assert_eq!(index.count("v1"), 0);

        // A relist replaces everything, dropping what was deleted unseen.
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(pod("c", "v3", true)));
        let changed = index.apply(&watcher::Event::InitDone);
        let mut names: Vec<_> = changed
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "c"], "a left unseen, c joined");
        assert_eq!((index.count("v2"), index.count("v3")), (0, 1));
        assert_eq!(index.get("v3")[0].metadata.name.as_deref(), Some("c"));
    }

    #[test]
    fn istio_injection_wins_over_the_revision_label() {
        let enabled = labels(&[("istio-injection", "enabled"), ("istio.io/rev", "canary")]);
        assert_eq!(namespace_selection(&enabled), Some("default"));
        let disabled = labels(&[("istio-injection", "disabled"), ("istio.io/rev", "canary")]);
        assert_eq!(namespace_selection(&disabled), None);
        let revision = labels(&[("istio.io/rev", "canary")]);
        assert_eq!(namespace_selection(&revision), Some("canary"));
        assert_eq!(namespace_selection(&labels(&[])), None);
    }
}
