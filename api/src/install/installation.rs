//! MeshInstallation: what a platform team writes to install the mesh.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::mesh_config::MeshConfig;
use super::settings::KubernetesSettings;

/// The namespace the mesh's control plane and gateways run in when
/// `spec.namespace` is not set: Istio's, so that tools which look for the
/// control plane there find it.
pub const DEFAULT_NAMESPACE: &str = "istio-system";

const NAMESPACE_IMMUTABLE: &str = "spec.namespace is chosen when the MeshInstallation is created and cannot be added, changed or removed later: to move the mesh, delete the MeshInstallation and create it again";

/// A mesh: which release, which profile, and what to change of it. The
/// operator installs it and keeps it installed; it never writes to spec, so
/// GitOps tools see no drift. Its name is the name of its control-plane
/// revision: the installation named `default` runs Istio's default revision.
// Each printer column repeats `type_ = "string"`, which clippy takes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "install.bowline.dev",
    version = "v1alpha1",
    kind = "MeshInstallation",
    plural = "meshinstallations",
    shortname = "mesh",
    category = "bowline",
    status = "MeshInstallationStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A Bowline service mesh installation: the control plane, gateways and addons the operator deploys and keeps deployed.",
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".spec.version",
        description = "The release installed"
    ),
    printcolumn(
        name = "Revisions",
        type_ = "integer",
        json_path = ".status.revisions.total",
        description = "Control-plane revisions running"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Every enabled component is available"
    ),
    printcolumn(
        name = "InUse",
        type_ = "integer",
        json_path = ".status.revisions.inUse",
        description = "Revisions a tag, namespace or pod uses"
    ),
    printcolumn(
        name = "Active",
        type_ = "string",
        json_path = ".status.activeRevision",
        description = "The control-plane revision workloads are injected with"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.state",
        description = "Healthy, or why not"
    ),
    printcolumn(
                name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = Rule::new("size(self.metadata.name) <= 56 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("a MeshInstallation's name is its control-plane revision (istiod-<name>, istio.io/rev=<name>): at most 56 lowercase letters, digits and dashes, starting with a letter")
)]
// The namespace is chosen at creation: a rule here (it may not be added or
// removed) and one on the field (it may not change). One rule comparing the
// optional field's values here would be estimated far over the CEL budget.
#[x_kube(validation = Rule::new("has(self.namespace) == has(oldSelf.namespace)")
    .message(NAMESPACE_IMMUTABLE)
    .field_path(".namespace")
    .reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct MeshInstallationSpec {
    /// The Bowline release to install, e.g. `v0.1.0`. It must be one the
    /// operator knows (`bowline-operator versions` lists them); changing it
    /// upgrades the mesh.
    #[schemars(regex(pattern = r"^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$"))]
    pub version: String,

    /// The starting point the rest of the spec changes: `default` (control
    /// plane and ingress gateway), `demo` (everything, with access logs and
    /// full tracing, small requests), `minimal` (control plane only) or
    /// `empty` (nothing unless enabled here). Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,

    /// The namespace of the control plane, gateways and addons. Defaults to
    /// `istio-system`; chosen at creation, it cannot be changed later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message(NAMESPACE_IMMUTABLE).reason(Reason::FieldValueForbidden))]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: Option<String>,

    /// The registry and repository prefix of Bowline's images
    /// (`<hub>/controlplane:<tag>`). Defaults to the release's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub hub: Option<String>,

    /// The tag of Bowline's images. Defaults to the release's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub tag: Option<String>,

    /// Mesh-wide settings, with Istio's MeshConfig field names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_config: Option<MeshConfig>,

    /// The control plane and gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<Components>,

    /// Prometheus, Grafana, Jaeger and Kiali.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addons: Option<Addons>,

    /// How a new `version` is rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_strategy: Option<UpdateStrategy>,
}

/// The profiles a spec starts from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Default,
    Demo,
    Minimal,
    Empty,
}

impl Profile {
    pub const ALL: [Profile; 4] = [Self::Default, Self::Demo, Self::Minimal, Self::Empty];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Demo => "demo",
            Self::Minimal => "minimal",
            Self::Empty => "empty",
        }
    }
}

/// The control plane and the gateways.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("!has(self.ingressGateways) || !has(self.egressGateways) || !self.ingressGateways.exists(i, self.egressGateways.exists(e, e.name == i.name))")
    .message("a gateway name is used by both an ingress and an egress gateway: gateway names must be unique across both lists")
    .field_path(".egressGateways"))]
#[serde(rename_all = "camelCase")]
pub struct Components {
    /// The control plane: xDS, certificate authority, webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneComponent>,

    /// Ingress gateways, each a Deployment and a Service labelled
    /// `istio: ingressgateway`. Names are unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub ingress_gateways: Option<Vec<GatewayComponent>>,

    /// Egress gateways, each a Deployment and a Service labelled
    /// `istio: egressgateway`. Names are unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub egress_gateways: Option<Vec<GatewayComponent>>,
}

/// The control plane.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneComponent {
    /// Whether to deploy it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,

    /// How it runs on Kubernetes.
    #[serde(flatten)]
    pub k8s: KubernetesSettings,
}

/// One ingress or egress gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayComponent {
    /// The name of its Deployment and Service, e.g. `istio-ingressgateway`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Whether to deploy it. Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,

    /// Extra labels of its Pods, which Gateway resources select on (the
    /// `istio` and `app` labels are always set).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,

    /// How it runs on Kubernetes.
    #[serde(flatten)]
    pub k8s: KubernetesSettings,
}

/// The addons: each off unless the profile or the spec enables it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Addons {
    /// Prometheus, scraping the control plane and every proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<AddonComponent>,
    /// Grafana, with the mesh dashboards and Prometheus as its data source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grafana: Option<AddonComponent>,
    /// Jaeger all-in-one, receiving spans over OTLP and Zipkin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jaeger: Option<AddonComponent>,
    /// Kiali, reading Prometheus, Grafana and Jaeger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kiali: Option<AddonComponent>,
}

/// One addon.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddonComponent {
    /// Whether to deploy it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,

    /// How it runs on Kubernetes.
    #[serde(flatten)]
    pub k8s: KubernetesSettings,
}

/// How a new version is rolled out.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("!has(self.inactiveRevisionDeletionGracePeriodSeconds) || self.inactiveRevisionDeletionGracePeriodSeconds >= 0")
    .message("inactiveRevisionDeletionGracePeriodSeconds must be 0 or more")
    .field_path(".inactiveRevisionDeletionGracePeriodSeconds"))]
#[serde(rename_all = "camelCase")]
pub struct UpdateStrategy {
    /// InPlace updates the one control plane with a rolling update;
    /// RevisionBased runs the new version beside the old one and moves over
    /// only when it is healthy. Defaults to InPlace.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<UpdateStrategyType>,

    /// How long a revision that is no longer active and that nothing uses
    /// is kept before it is deleted, counted from the moment it stopped
    /// being used. Defaults to 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_revision_deletion_grace_period_seconds: Option<i64>,

    /// What happens to injected workloads still running an older revision's
    /// proxy once a new revision is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<WorkloadUpdate>,
}

/// Moving injected workloads to the active revision: their pods get the new
/// proxy only when they are recreated.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadUpdate {
    /// Manual (the default) reports how many workloads still run an older
    /// revision; Auto also restarts their Deployments, StatefulSets and
    /// DaemonSets, a batch at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<WorkloadRestart>,

    /// Workloads restarted together. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub batch_size: Option<i32>,

    /// How long to wait after a batch is Available before the next one, as
    /// a duration such as `30s` or `1m`. Defaults to `0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub pause_between_batches: Option<String>,

    /// How long a batch may take to become Available before restarts stop
    /// and the workload that did not make it is reported, e.g. `5m`.
    /// Defaults to `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub batch_timeout: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum WorkloadRestart {
    #[default]
    Manual,
    Auto,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpdateStrategyType {
    #[default]
    InPlace,
    RevisionBased,
}

/// What the operator observed and did. kstatus-compatible: Argo CD and Flux
/// read health from `observedGeneration` and the Reconciling and Stalled
/// conditions.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshInstallationStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Reconciled, Ready, Reconciling and Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// `Healthy`, or the reason of the first condition that is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,

    /// The control-plane revision workloads are injected with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_revision: Option<String>,

    /// The release every component runs: `spec.version` once every
    /// component is available on it, the previous one while an upgrade is
    /// in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,

    /// The installation's control-plane revisions: counts, and each one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revisions: Option<RevisionsStatus>,

    /// Restarts of workloads that still run an older revision's proxy, when
    /// `spec.updateStrategy.workloads.restart` is Auto.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_restart: Option<WorkloadRestartStatus>,

    /// The readiness of each enabled component.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentStatus>,

    /// The spec with the profile's defaults filled in: what the operator
    /// installs. (Its schema is the spec's; it is not repeated here.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::any_object")]
    pub resolved: Option<MeshInstallationSpec>,
}

/// The revisions of an installation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionsStatus {
    /// How many revisions run.
    pub total: i32,
    /// How many of them are Ready.
    pub ready: i32,
    /// How many of them a tag, namespace or pod uses.
    pub in_use: i32,
    /// Each revision, the active one first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<RevisionSummary>,
}

/// One revision, as the installation sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionSummary {
    /// The MeshRevision's name, the value of `istio.io/rev`.
    pub name: String,
    /// The release it runs.
    pub version: String,
    /// Whether its control plane serves.
    pub ready: bool,
    /// Whether a tag, namespace or pod uses it.
    pub in_use: bool,
    /// Pods that run its proxy.
    #[serde(default)]
    pub workloads: i64,
}

/// Where automatic workload restarts are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRestartStatus {
    /// The revision workloads are being moved to.
    pub revision: String,
    /// The batch restarted last, as `Kind namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batch: Vec<String>,
    /// When that batch was restarted (to the microsecond: pauses are
    /// measured from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_started: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>,
    /// When that batch was Available, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_finished: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>,
    /// Workloads restarted so far for this revision.
    #[serde(default)]
    pub restarted: i32,
    /// Why restarts stopped, naming the workload, if they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// The readiness of one component.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// e.g. `controlPlane`, `ingressGateway/istio-ingressgateway`, `addon/prometheus`.
    pub name: String,
    /// Whether its Deployment is Available with every replica updated.
    pub ready: bool,
    /// Ready replicas of its Deployment.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas its Deployment wants.
    #[serde(default)]
    pub replicas: i32,
    /// Why it is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
