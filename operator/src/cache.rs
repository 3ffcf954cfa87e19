//! Watched caches of every kind the operator renders. They feed the
//! controller (a change to an owned object triggers its installation's
//! reconcile) and answer the reconcile's reads, so that a reconcile with
//! nothing to change costs the API server nothing.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
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
        (Self { stores }, streams)
    }

    /// Waits until every cache has listed its kind once.
    pub async fn ready(&self) {
        for (_, store) in &self.stores {
            // A dropped writer means the controller is shutting down.
            let _ = store.wait_until_ready().await;
        }
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

/// Who uses the revisions: every Namespace, and every Pod labelled with a
/// revision, as metadata only (a Pod's spec and status are not needed).
#[derive(Clone, Debug)]
pub struct Usage {
    namespaces: Store<PartialObjectMeta<Namespace>>,
    pods: Store<PartialObjectMeta<Pod>>,
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
    pub fn watch(client: &Client) -> (Self, NamespaceStream, PodStream) {
        let namespace_writer = Writer::default();
        let pod_writer = Writer::default();
        let usage = Self {
            namespaces: namespace_writer.as_reader(),
            pods: pod_writer.as_reader(),
        };
        // `Api<PartialObjectMeta<_>>` asks for metadata only.
        let namespaces = watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(namespace_writer)
        .touched_objects()
        .boxed();
        let pods = watcher(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            watcher::Config::default().labels(REVISION_LABEL),
        )
        .default_backoff()
        .reflect(pod_writer)
        .touched_objects()
        .boxed();
        (usage, namespaces, pods)
    }

    pub async fn ready(&self) {
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
    }

    /// What uses `revision`, known also by `tags`: the namespaces that
    /// select it or one of its tags, and the pods it injected.
    pub fn of(&self, revision: &str, tags: &[String]) -> RevisionUsage {
        let mut namespaces: Vec<String> = self
            .namespaces
            .state()
            .iter()
            .filter(|ns| {
                namespace_selection(ns.labels())
                    .is_some_and(|name| name == revision || tags.iter().any(|t| t == name))
            })
            .map(|ns| ns.name_any())
            .collect();
        namespaces.sort();
        RevisionUsage {
            namespaces,
            workloads: self.injected_pods(revision).len() as i64,
        }
    }

    /// The namespaces that select `name` (a revision or a tag), sorted.
    pub fn selecting(&self, name: &str) -> Vec<String> {
        let mut namespaces: Vec<String> = self
            .namespaces
            .state()
            .iter()
            .filter(|ns| namespace_selection(ns.labels()) == Some(name))
            .map(|ns| ns.name_any())
            .collect();
        namespaces.sort();
        namespaces
    }

    /// Pods running a proxy `revision` injected. The mesh's own pods
    /// (control plane, gateways, addons) carry the revision label too, but
    /// not injection's status annotation.
    pub fn injected_pods(&self, revision: &str) -> Vec<Arc<PartialObjectMeta<Pod>>> {
        self.pods
            .state()
            .into_iter()
            .filter(|pod| {
                pod.labels().get(REVISION_LABEL).map(String::as_str) == Some(revision)
                    && pod.annotations().contains_key(INJECTION_STATUS_ANNOTATION)
            })
            .collect()
    }
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
