//! Watched caches of every kind the operator renders. They feed the
//! controller (a change to an owned object triggers its installation's
//! reconcile) and answer the reconcile's reads, so that a reconcile with
//! nothing to change costs the API server nothing.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::apply::managed_kinds;
use crate::render::meta::{INSTALLATION_LABEL, MANAGED_BY, MANAGED_BY_LABEL};

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
