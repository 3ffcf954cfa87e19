//! A component's Deployment, Service, HorizontalPodAutoscaler and
//! PodDisruptionBudget, built from its container and its Kubernetes settings.

pub use bowline_api::proxy::{container_ports, env, env_from_field};
use std::collections::BTreeMap;

use bowline_api::install::{KubernetesSettings, ServiceType};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::{Managed, Target};
use crate::error::{Error, Result};

/// One Deployment-backed component.
#[derive(Clone, Debug)]
pub struct Workload<'a> {
    /// Name of the Deployment, Service, HPA and PDB.
    pub name: String,
    /// `app.kubernetes.io/component` value.
    pub component: &'a str,
    /// The Pods' own labels.
    pub pod_labels: BTreeMap<String, String>,
    /// Which of `pod_labels` select the Pods (Deployment, Service, PDB). A
    /// Deployment's selector never changes, so it names only what is fixed
    /// for the component's life.
    pub selector_keys: &'a [&'a str],
    /// Annotations of the Pods beside the user's.
    pub pod_annotations: BTreeMap<String, String>,
    pub container: Container,
    pub volumes: Vec<Volume>,
    pub service_account: String,
    /// The UID and GID the Pod runs as (never root).
    pub run_as: i64,
    pub settings: &'a KubernetesSettings,
    /// Where `settings` sit in the spec, for error messages.
    pub settings_path: String,
}

impl Workload<'_> {
    pub fn selector(&self) -> BTreeMap<String, String> {
        self.pod_labels
            .iter()
            .filter(|(k, _)| self.selector_keys.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// The Deployment, and its HPA and PDB when the settings ask for them.
pub fn deployment_objects(target: &Target<'_>, w: &Workload<'_>) -> Result<Vec<Managed>> {
    let mut objects = vec![Managed::new(&deployment(target, w)?)?];
    if let Some(hpa) = hpa(target, w)? {
        objects.push(Managed::new(&hpa)?);
    }
    if let Some(pdb) = pdb(target, w) {
        objects.push(Managed::new(&pdb)?);
    }
    Ok(objects)
}

fn deployment(target: &Target<'_>, w: &Workload<'_>) -> Result<Deployment> {
    let mut container = w.container.clone();
    container.resources = w.settings.resources.clone().or(container.resources);
    let env = merge_env(container.env.take().unwrap_or_default(), &w.settings.env);
    container.env = (!env.is_empty()).then_some(env);
    container.security_context = Some(SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    });

    let mut labels = target.labels(w.component);
    labels.extend(w.pod_labels.clone());
    let mut annotations = w.pod_annotations.clone();
    annotations.extend(w.settings.pod_annotations.clone());
    let affinity = w
        .settings
        .affinity(&w.settings_path)
        .map_err(Error::InvalidSpec)?;

    Ok(Deployment {
        metadata: target.meta(&w.name, w.component),
        spec: Some(DeploymentSpec {
            // Left to the HPA when there is one.
            replicas: match w.settings.hpa_spec {
                Some(_) => None,
                None => Some(w.settings.replica_count.unwrap_or(1)),
            },
            selector: LabelSelector {
                match_labels: Some(w.selector()),
                ..Default::default()
            },
            // Surge first, so a rollout never drops below the wanted replicas.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("100%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: (!annotations.is_empty()).then_some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(w.service_account.clone()),
                    containers: vec![container],
                    volumes: (!w.volumes.is_empty()).then(|| w.volumes.clone()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(w.run_as),
                        run_as_group: Some(w.run_as),
                        fs_group: Some(w.run_as),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    node_selector: (!w.settings.node_selector.is_empty())
                        .then(|| w.settings.node_selector.clone()),
                    tolerations: (!w.settings.tolerations.is_empty())
                        .then(|| w.settings.tolerations.clone()),
                    affinity,
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The operator's variables, then the user's, a user's variable replacing
/// the operator's of the same name in place.
fn merge_env(mut base: Vec<EnvVar>, user: &[EnvVar]) -> Vec<EnvVar> {
    for var in user {
        match base.iter_mut().find(|b| b.name == var.name) {
            Some(existing) => *existing = var.clone(),
            None => base.push(var.clone()),
        }
    }
    base
}

fn hpa(target: &Target<'_>, w: &Workload<'_>) -> Result<Option<HorizontalPodAutoscaler>> {
    let Some(spec) = &w.settings.hpa_spec else {
        return Ok(None);
    };
    let mut metrics = spec.metrics(&w.settings_path).map_err(Error::InvalidSpec)?;
    if metrics.is_empty() {
        metrics.push(MetricSpec {
            type_: "Resource".into(),
            resource: Some(ResourceMetricSource {
                name: "cpu".into(),
                target: MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(80),
                    ..Default::default()
                },
            }),
            ..Default::default()
        });
    }
    let min = spec.min_replicas.unwrap_or(1);
    if min > spec.max_replicas {
        return Err(Error::InvalidSpec(format!(
            "{}.hpaSpec: minReplicas ({min}) is more than maxReplicas ({}): lower minReplicas or raise maxReplicas",
            w.settings_path, spec.max_replicas
        )));
    }
    Ok(Some(HorizontalPodAutoscaler {
        metadata: target.meta(&w.name, w.component),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: w.name.clone(),
            },
            min_replicas: Some(min),
            max_replicas: spec.max_replicas,
            metrics: Some(metrics),
            ..Default::default()
        }),
        ..Default::default()
    }))
}

fn pdb(target: &Target<'_>, w: &Workload<'_>) -> Option<PodDisruptionBudget> {
    let spec = w.settings.pod_disruption_budget.as_ref()?;
    Some(PodDisruptionBudget {
        metadata: target.meta(&w.name, w.component),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(LabelSelector {
                match_labels: Some(w.selector()),
                ..Default::default()
            }),
            // One of the two; a budget with neither keeps one Pod up.
            min_available: spec.min_available.clone().or_else(|| {
                spec.max_unavailable
                    .is_none()
                    .then_some(IntOrString::Int(1))
            }),
            max_unavailable: spec.max_unavailable.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A component's Service: its default ports unless the settings replace
/// them, of the settings' type or `default_type`.
pub fn service(
    target: &Target<'_>,
    w: &Workload<'_>,
    default_type: ServiceType,
    default_ports: Vec<ServicePort>,
) -> Result<Managed> {
    let settings = w.settings.service.as_ref();
    let ports = match settings.map(|s| &s.ports) {
        Some(ports) if !ports.is_empty() => ports
            .iter()
            .map(|p| ServicePort {
                name: Some(p.name.clone()),
                port: p.port,
                target_port: Some(IntOrString::Int(p.target_port.unwrap_or(p.port))),
                node_port: p.node_port,
                protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                ..Default::default()
            })
            .collect(),
        _ => default_ports,
    };
    let type_ = settings.and_then(|s| s.type_).unwrap_or(default_type);
    let mut metadata = target.meta(&w.name, w.component);
    if !w.settings.service_annotations.is_empty() {
        metadata.annotations = Some(w.settings.service_annotations.clone());
    }
    Managed::new(&Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(type_.as_str().into()),
            selector: Some(w.selector()),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A TCP Service port named for Istio's protocol selection.
pub fn port(name: &str, port: i32, target: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}
