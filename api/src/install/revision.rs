//! MeshRevision and MeshRevisionTag: the control-plane revisions an
//! installation runs, and the stable names namespaces select them by.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::installation::MeshInstallationSpec;

const FIXED: &str = "a MeshRevision belongs to one installation and namespace for its whole life";

/// One control-plane revision. The operator creates it and deletes it: named
/// after its MeshInstallation with InPlace updates (its version then changes
/// in place), `<installation>-<version with dots as dashes>` with
/// RevisionBased ones, deleted once no workload has used it for the grace
/// period. Read it; do not write it.
// Each printer column repeats `type_ = "string"`, which clippy takes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "install.bowline.dev",
    version = "v1alpha1",
    kind = "MeshRevision",
    plural = "meshrevisions",
    shortname = "meshrev",
    category = "bowline",
    status = "MeshRevisionStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A control-plane revision of a Bowline mesh, created and deleted by the operator.",
    printcolumn(
        name = "Installation",
        type_ = "string",
        json_path = ".spec.installation",
        description = "The MeshInstallation it belongs to"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".spec.version",
        description = "The release it runs"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Its control plane serves"
    ),
    printcolumn(
        name = "InUse",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"InUse\")].status",
        description = "A tag, namespace or pod uses it"
    ),
    printcolumn(
        name = "Workloads",
        type_ = "integer",
        json_path = ".status.workloads",
        description = "Pods injected by it"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshRevisionSpec {
    /// The MeshInstallation this revision belongs to.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message(FIXED))]
    pub installation: String,

    /// The release its control plane runs.
    #[schemars(regex(pattern = r"^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$"))]
    pub version: String,

    /// The namespace its control plane runs in.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message(FIXED))]
    pub namespace: String,

    /// The installation's resolved configuration this revision's control
    /// plane runs with.
    #[schemars(schema_with = "crate::schema::any_object")]
    pub config: MeshInstallationSpec,
}

/// What the operator observed of a revision.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshRevisionStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Reconciled, Ready and InUse.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// `Healthy`, or the reason of the first condition that is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,

    /// Pods that run a proxy injected by this revision.
    #[serde(default)]
    pub workloads: i64,

    /// Namespaces that select this revision, directly or through a tag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,

    /// Tags that point at this revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A stable name for a revision, for namespaces to select with
/// `istio.io/rev=<tag>`: `prod-stable` can move from one revision to the
/// next without relabelling a namespace.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "install.bowline.dev",
    version = "v1alpha1",
    kind = "MeshRevisionTag",
    plural = "meshrevisiontags",
    shortname = "meshtag",
    category = "bowline",
    status = "MeshRevisionTagStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A stable name namespaces select a control-plane revision by, following a MeshInstallation's active revision or naming one MeshRevision.",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name", description = "What the tag follows"),
        printcolumn(name = "Kind", type_ = "string", json_path = ".spec.targetRef.kind", description = "MeshInstallation or MeshRevision"),
    validation = Rule::new("size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
                .message("a tag's name is the value of the istio.io/rev label: at most 63 lowercase letters, digits and dashes"),
    printcolumn(name = "Revision", type_ = "string", json_path = ".status.revision", description = "The revision the tag points at now"),
    printcolumn(name = "InUse", type_ = "string", json_path = ".status.conditions[?(@.type==\"InUse\")].status", description = "A namespace or pod uses the tag"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MeshRevisionTagSpec {
    /// What the tag points at.
    pub target_ref: TargetRef,
}

/// A MeshInstallation (the tag follows its active revision) or a
/// MeshRevision (the tag stays on it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// MeshInstallation or MeshRevision.
    pub kind: TargetKind,

    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TargetKind {
    #[default]
    MeshInstallation,
    MeshRevision,
}

/// What the operator observed of a tag.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshRevisionTagStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Reconciled, InUse and Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// `Healthy`, or the reason of the first condition that is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,

    /// The revision the tag points at now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,

    /// Namespaces that select the tag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}
