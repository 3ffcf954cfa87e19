//! What every rendered object carries: Bowline's labels, an owner reference
//! to the MeshInstallation, and the API type to apply it with.

use std::collections::BTreeMap;

use bowline_api::install::MeshInstallation;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{ApiResource, DynamicObject};
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::profile::Resolved;

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "bowline-operator";
pub const PART_OF_LABEL: &str = "app.kubernetes.io/part-of";
pub const PART_OF: &str = "bowline";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// The MeshInstallation an object belongs to; prune and cleanup select on it.
pub const INSTALLATION_LABEL: &str = "install.bowline.dev/installation";
/// The control-plane revision an object belongs to (Istio's label).
pub const REVISION_LABEL: &str = "istio.io/rev";

/// Istio's default revision: the one `istio-injection=enabled` selects.
pub const DEFAULT_REVISION: &str = "default";

/// One object the operator manages, ready to apply.
#[derive(Clone, Debug, PartialEq)]
pub struct Managed {
    pub resource: ApiResource,
    pub object: DynamicObject,
    /// Fields set when the object is created and then left to others (the
    /// validation webhook's failurePolicy, which the control plane tightens
    /// once it serves). Applied under a field manager of their own, once.
    pub on_create: Option<DynamicObject>,
}

impl Managed {
    pub fn new<K>(object: &K) -> Result<Self>
    where
        K: Resource<DynamicType = ()> + Serialize,
    {
        Ok(Self {
            resource: ApiResource::erase::<K>(&()),
            object: to_dynamic(object)?,
            on_create: None,
        })
    }

    /// With fields that only the object's creation sets (see `on_create`).
    pub fn with_on_create<K>(mut self, initial: &K) -> Result<Self>
    where
        K: Resource<DynamicType = ()> + Serialize,
    {
        self.on_create = Some(to_dynamic(initial)?);
        Ok(self)
    }

    pub fn name(&self) -> String {
        self.object.name_any()
    }

    pub fn namespace(&self) -> Option<String> {
        self.object.namespace()
    }

    /// `Kind namespace/name`, for messages.
    pub fn describe(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {ns}/{}", self.resource.kind, self.name()),
            None => format!("{} {}", self.resource.kind, self.name()),
        }
    }
}

fn to_dynamic<K: Resource<DynamicType = ()> + Serialize>(object: &K) -> Result<DynamicObject> {
    let value = serde_json::to_value(object).map_err(|source| Error::Encode {
        what: object.meta().name.clone().unwrap_or_default(),
        source,
    })?;
    let mut dynamic: DynamicObject =
        serde_json::from_value(value).map_err(|source| Error::Encode {
            what: object.meta().name.clone().unwrap_or_default(),
            source,
        })?;
    dynamic.types = Some(kube::api::TypeMeta {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
    });
    Ok(dynamic)
}

/// The installation being rendered, and the revision of its control plane.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub installation: &'a MeshInstallation,
    pub resolved: &'a Resolved,
    pub revision: &'a str,
}

impl Target<'_> {
    pub fn namespace(&self) -> &str {
        self.resolved.namespace()
    }

    /// `-<revision>` for a named revision, nothing for the default one, as
    /// Istio names revisioned objects (`istiod` / `istiod-canary`).
    pub fn revision_suffix(&self) -> String {
        if self.revision == DEFAULT_REVISION {
            String::new()
        } else {
            format!("-{}", self.revision)
        }
    }

    /// The labels every object of this installation carries.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
            (PART_OF_LABEL.into(), PART_OF.into()),
            (COMPONENT_LABEL.into(), component.into()),
            (INSTALLATION_LABEL.into(), self.installation.name_any()),
            (REVISION_LABEL.into(), self.revision.into()),
        ])
    }

    /// Metadata of a namespaced object in the mesh's namespace.
    pub fn meta(&self, name: &str, component: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(self.namespace().into()),
            ..self.cluster_meta(name, component)
        }
    }

    /// Metadata of a cluster-scoped object.
    pub fn cluster_meta(&self, name: &str, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            labels: Some(self.labels(component)),
            owner_references: Some(vec![self.owner_reference()]),
            ..Default::default()
        }
    }

    /// Garbage collection removes every object when the installation goes.
    fn owner_reference(&self) -> OwnerReference {
        let meta = self.installation.meta();
        OwnerReference {
            api_version: MeshInstallation::api_version(&()).into_owned(),
            kind: MeshInstallation::kind(&()).into_owned(),
            name: self.installation.name_any(),
            uid: meta.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }
}
