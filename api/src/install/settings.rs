//! The Kubernetes settings every deployed component shares: replicas,
//! resources, autoscaling, disruption budget, scheduling, Service, env and
//! annotations. They mean what the Kubernetes fields of the same name mean.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::MetricSpec;
use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How one component runs on Kubernetes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesSettings {
    /// Pods of the component's Deployment. Ignored while `hpaSpec` is set: the
    /// HorizontalPodAutoscaler owns the replica count then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replica_count: Option<i32>,

    /// CPU and memory requests and limits of the component's main container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Scales the Deployment with a HorizontalPodAutoscaler (autoscaling/v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpa_spec: Option<HpaSpec>,

    /// Protects the component from voluntary disruptions with a PodDisruptionBudget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_disruption_budget: Option<PodDisruptionBudgetSpec>,

    /// Node labels the component's Pods must be scheduled onto.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the component's Pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Node and Pod affinity of the component's Pods (a core/v1 Affinity;
    /// checked by the operator, not the schema, to keep the CRD small).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::any_object")]
    pub affinity: Option<serde_json::Value>,

    /// The component's Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSettings>,

    /// Extra environment variables of the main container; they override the
    /// operator's own of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Annotations added to the component's Pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,

    /// Annotations added to the component's Service (cloud load-balancer
    /// settings, for instance).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_annotations: BTreeMap<String, String>,
}

impl KubernetesSettings {
    /// The affinity as a core/v1 Affinity. The field is kept untyped in the
    /// object (see [`crate::schema`]) so that a malformed one makes only its
    /// own installation invalid; `path` names it in the error.
    pub fn affinity(&self, path: &str) -> Result<Option<Affinity>, String> {
        self.affinity
            .clone()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| format!("{path}.affinity: not a valid core/v1 Affinity: {e}"))
    }
}

impl HpaSpec {
    /// The metrics as autoscaling/v2 MetricSpecs; `path` names the field in
    /// the error.
    pub fn metrics(&self, path: &str) -> Result<Vec<MetricSpec>, String> {
        self.metrics
            .iter()
            .enumerate()
            .map(|(i, m)| {
                serde_json::from_value(m.clone()).map_err(|e| {
                    format!(
                        "{path}.hpaSpec.metrics[{i}]: not a valid autoscaling/v2 MetricSpec: {e}"
                    )
                })
            })
            .collect()
    }
}

/// The bounds and targets of a HorizontalPodAutoscaler; the operator points
/// it at the component's Deployment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HpaSpec {
    /// Fewest replicas. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_replicas: Option<i32>,

    /// Most replicas.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,

    /// What to scale on, as autoscaling/v2 MetricSpecs (checked by the
    /// operator, not the schema). Defaults to 80 % average CPU utilization.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::list_of_any_object")]
    pub metrics: Vec<serde_json::Value>,
}

/// A PodDisruptionBudget: set one of the two.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Pods that must stay available, as a number or a percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,

    /// Pods that may be unavailable, as a number or a percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

/// The component's Service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSettings {
    /// ClusterIP, NodePort or LoadBalancer. Defaults to LoadBalancer for
    /// ingress gateways and ClusterIP for everything else.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<ServiceType>,

    /// The Service's ports, replacing the component's defaults when set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePortSettings>,
}

/// The Kubernetes Service types a component may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// One port of a component's Service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortSettings {
    /// The port's name; its prefix (`http-`, `https-`, `tcp-`, `grpc-`, `tls-`)
    /// tells the mesh its protocol, as in Istio.
    pub name: String,

    /// The port the Service exposes.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// The container port traffic goes to. Defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<i32>,

    /// The node port, for NodePort and LoadBalancer Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub node_port: Option<i32>,

    /// TCP (the default) or UDP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}
