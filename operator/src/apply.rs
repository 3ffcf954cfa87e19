//! Server-side apply of rendered objects, pruning of what is no longer
//! rendered, and the mesh namespace.
//!
//! A reconcile that changes nothing sends no write: an object is applied only
//! when it is missing, when what was rendered changed (a hash of it rides
//! along as an annotation), or when the live object no longer holds every
//! rendered field (drift: someone scaled or edited it).

use std::collections::BTreeSet;

use bowline_api::install::MeshRevision;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::NamespaceResourceScope;
use kube::{Client, Resource, ResourceExt};
use serde_json::Value;

use crate::cache::Caches;
use crate::error::{Error, Result};
use crate::render::Managed;
use crate::render::meta::{MANAGED_BY, MANAGED_BY_LABEL};

/// The field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "bowline-operator";
/// The field manager of fields set only at creation (see [`Managed::on_create`]).
pub const ON_CREATE_MANAGER: &str = "bowline-operator-defaults";
/// A hash of the object as last rendered.
pub const APPLIED_HASH_ANNOTATION: &str = "install.bowline.dev/applied-hash";
/// On a namespace the operator created: the installation that created it,
/// and that deletes it when it goes.
pub const CREATED_BY_LABEL: &str = "install.bowline.dev/created-by";

/// What one apply pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Objects written, as `Kind namespace/name`.
    pub changed: Vec<String>,
}

/// Every kind the operator renders; prune and cleanup look through these.
pub fn managed_kinds() -> Vec<(ApiResource, bool)> {
    fn namespaced<K: Resource<DynamicType = (), Scope = NamespaceResourceScope>>()
    -> (ApiResource, bool) {
        (ApiResource::erase::<K>(&()), true)
    }
    fn cluster<K: Resource<DynamicType = ()>>() -> (ApiResource, bool) {
        (ApiResource::erase::<K>(&()), false)
    }
    vec![
        namespaced::<Deployment>(),
        namespaced::<Service>(),
        namespaced::<ConfigMap>(),
        namespaced::<ServiceAccount>(),
        namespaced::<Role>(),
        namespaced::<RoleBinding>(),
        namespaced::<HorizontalPodAutoscaler>(),
        namespaced::<PodDisruptionBudget>(),
        cluster::<ClusterRole>(),
        cluster::<ClusterRoleBinding>(),
        cluster::<MutatingWebhookConfiguration>(),
        cluster::<ValidatingWebhookConfiguration>(),
        cluster::<MeshRevision>(),
    ]
}

fn api_for(client: &Client, resource: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    }
}

/// Applies every object that is not already as rendered.
pub async fn apply_all(client: &Client, caches: &Caches, objects: &[Managed]) -> Result<Applied> {
    let mut applied = Applied::default();
    for managed in objects {
        if apply_one(client, caches, managed).await? {
            applied.changed.push(managed.describe());
        }
    }
    Ok(applied)
}

/// Applies one object if needed; says whether it wrote.
async fn apply_one(client: &Client, caches: &Caches, managed: &Managed) -> Result<bool> {
    let api = api_for(client, &managed.resource, managed.namespace().as_deref());
    let name = managed.name();
    let mut desired = managed.object.clone();
    let hash = content_hash(&desired)?;
    desired
        .annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.into(), hash.clone());

    // The cache may lag behind a write of a moment ago: the worst that does
    // is one apply too many.
    let live = caches.get(&managed.resource, managed.namespace().as_deref(), &name);
    match live.as_deref() {
        Some(live) if live.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&hash) => {
            let desired_value = encode(&desired, managed)?;
            let live_value = encode(live, managed)?;
            let Some(field) = first_difference(&desired_value, &live_value, "") else {
                return Ok(false);
            };
            tracing::info!(object = %managed.describe(), field, "correcting drift");
        }
        Some(_) => {}
        None => {
            if let Some(initial) = &managed.on_create {
                patch(&api, ON_CREATE_MANAGER, &name, initial, managed).await?;
            }
        }
    }
    patch(&api, FIELD_MANAGER, &name, &desired, managed).await?;
    Ok(true)
}

async fn patch(
    api: &Api<DynamicObject>,
    manager: &str,
    name: &str,
    object: &DynamicObject,
    managed: &Managed,
) -> Result<()> {
    // Force: the operator owns what it renders, whoever touched it last.
    let params = PatchParams::apply(manager).force();
    match api.patch(name, &params, &Patch::Apply(object)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 422 => Err(Error::Rejected {
            object: managed.describe(),
            message: status.message,
        }),
        Err(e) => Err(Error::kube(format!("applying {}", managed.describe()))(e)),
    }
}

fn encode(object: &DynamicObject, managed: &Managed) -> Result<Value> {
    serde_json::to_value(object).map_err(|source| Error::Encode {
        what: managed.describe(),
        source,
    })
}

/// A stable hash of what was rendered (SHA-256 of its JSON, whose object keys
/// serde_json keeps sorted).
fn content_hash(object: &DynamicObject) -> Result<String> {
    let bytes = serde_json::to_vec(object).map_err(|source| Error::Encode {
        what: object.name_any(),
        source,
    })?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    Ok(digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The path of the first field of `desired` that `live` does not hold with
/// the same value, or None when it holds them all (the no-op case). The API
/// server adds defaults, so `live` may hold more; lists must match element by
/// element; the nulls and empty lists and maps it drops count as held.
pub fn first_difference(desired: &Value, live: &Value, path: &str) -> Option<String> {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().find_map(|(k, dv)| {
            let here = format!("{path}.{k}");
            match l.get(k) {
                Some(lv) => first_difference(dv, lv, &here),
                // The API server drops nulls and empty lists and maps.
                None if is_empty(dv) => None,
                None => Some(here),
            }
        }),
        (Value::Array(d), Value::Array(l)) if d.len() == l.len() => d
            .iter()
            .zip(l)
            .enumerate()
            .find_map(|(i, (dv, lv))| first_difference(dv, lv, &format!("{path}[{i}]"))),
        (Value::Number(d), Value::Number(l)) if d.as_f64() == l.as_f64() => None,
        _ if desired == live => None,
        _ => Some(path.to_string()),
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(fields) => fields.is_empty(),
        _ => false,
    }
}

/// Deletes what the operator made for `installation` and did not render this
/// time, as its caches know it. Returns what it deleted.
pub async fn prune(
    client: &Client,
    caches: &Caches,
    installation: &str,
    kept: &[Managed],
) -> Result<Vec<String>> {
    let kept: BTreeSet<(String, Option<String>, String)> = kept
        .iter()
        .map(|m| (m.resource.kind.clone(), m.namespace(), m.name()))
        .collect();
    let mut deleted = Vec::new();
    for (resource, object) in caches.of_installation(installation) {
        let name = object.name_any();
        let namespace = object.namespace();
        if kept.contains(&(resource.kind.clone(), namespace.clone(), name.clone())) {
            continue;
        }
        let what = match &namespace {
            Some(ns) => format!("{} {ns}/{name}", resource.kind),
            None => format!("{} {name}", resource.kind),
        };
        match api_for(client, &resource, namespace.as_deref())
            .delete(&name, &DeleteParams::background())
            .await
        {
            Ok(_) => deleted.push(what),
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(e) => return Err(Error::kube(format!("deleting {what}"))(e)),
        }
    }
    Ok(deleted)
}

/// Creates the mesh namespace when it does not exist, labelled as created
/// by `installation`. An existing namespace is used as it is, and never
/// deleted by the operator.
pub async fn ensure_namespace(
    client: &Client,
    name: &str,
    installation: &str,
) -> Result<Option<String>> {
    let api: Api<Namespace> = Api::all(client.clone());
    let existing = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("reading namespace {name}")))?;
    match existing {
        Some(ns) if ns.metadata.deletion_timestamp.is_some() => Err(Error::Waiting(format!(
            "namespace {name} is being deleted; it is created again once it is gone"
        ))),
        Some(_) => Ok(None),
        None => {
            let namespace = Namespace {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.into()),
                    labels: Some(
                        [
                            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                            (CREATED_BY_LABEL.to_string(), installation.to_string()),
                        ]
                        .into(),
                    ),
                    ..Default::default()
                },
                ..Default::default()
            };
            match api.create(&PostParams::default(), &namespace).await {
                Ok(_) => Ok(Some(format!("Namespace {name}"))),
                Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(None),
                Err(e) => Err(Error::kube(format!("creating namespace {name}"))(e)),
            }
        }
    }
}

/// Deletes the mesh namespace if `installation` created it. A namespace
/// already gone, or going, is fine.
pub async fn delete_created_namespace(
    client: &Client,
    name: &str,
    installation: &str,
) -> Result<bool> {
    let api: Api<Namespace> = Api::all(client.clone());
    let Some(ns) = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("reading namespace {name}")))?
    else {
        return Ok(false);
    };
    if ns.labels().get(CREATED_BY_LABEL).map(String::as_str) != Some(installation)
        || ns.metadata.deletion_timestamp.is_some()
    {
        return Ok(false);
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(false),
        Err(e) => Err(Error::kube(format!("deleting namespace {name}"))(e)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn is_subset(desired: &Value, live: &Value) -> bool {
        first_difference(desired, live, "").is_none()
    }

    #[test]
    fn a_live_object_with_defaults_added_is_a_subset_match() {
        let desired = json!({"spec": {"replicas": 1, "template": {"containers": [{"name": "a"}]}}});
        let live = json!({"spec": {"replicas": 1, "revisionHistoryLimit": 10,
            "template": {"containers": [{"name": "a", "imagePullPolicy": "IfNotPresent"}]}}});
        assert!(is_subset(&desired, &live));
        assert!(
            is_subset(&json!({"env": [], "labels": {}}), &json!({})),
            "empties are dropped"
        );
    }

    #[test]
    fn drift_is_detected_and_named() {
        assert_eq!(
            first_difference(
                &json!({"spec": {"replicas": 1}}),
                &json!({"spec": {"replicas": 5}}),
                ""
            )
            .as_deref(),
            Some(".spec.replicas")
        );
        let desired = json!({"spec": {"replicas": 1}});
        assert!(
            !is_subset(&desired, &json!({"spec": {"replicas": 5}})),
            "scaled"
        );
        assert!(!is_subset(&desired, &json!({"spec": {}})), "field removed");
        let containers = json!({"c": [{"name": "a"}]});
        assert!(
            !is_subset(&containers, &json!({"c": [{"name": "a"}, {"name": "b"}]})),
            "list grew"
        );
    }
}
