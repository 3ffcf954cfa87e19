//! The control plane of one revision: identity and RBAC, mesh config,
//! Deployment and Service, and the injection and validation webhooks.
//!
//! Names and labels follow Istio's (`istiod`, `istio-sidecar-injector`,
//! `istio-validator-<namespace>`, `app: istiod`, the `istio` ConfigMap with
//! its `mesh` key) so that tools built for Istio find the control plane.

use std::collections::BTreeMap;

use bowline_api::install::{KubernetesSettings, MeshRevision, MeshRevisionSpec, ServiceType};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, HTTPGetAction, Probe, SecretVolumeSource,
    ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::meta::{DEFAULT_REVISION, Managed, Target};
use super::workload::{self, Workload, container_ports, env, env_from_field, port};
use crate::error::{Error, Result};

pub const COMPONENT: &str = "controlplane";
/// The UID every Bowline container runs as: the proxy's.
pub const MESH_UID: i64 = bowline_api::proxy::UID;
/// The Istio API groups the control plane reads and validates.
pub const ISTIO_GROUPS: [&str; 4] = [
    "networking.istio.io",
    "security.istio.io",
    "telemetry.istio.io",
    "extensions.istio.io",
];

/// Names of one revision's control-plane objects.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlPlaneNames {
    /// Deployment, Service, ServiceAccount, Role: `istiod[-<rev>]`.
    pub istiod: String,
    /// The mesh-config ConfigMap: `istio[-<rev>]`.
    pub mesh_config: String,
    /// ClusterRole and ClusterRoleBinding: `istiod[-<rev>]-<namespace>`.
    pub cluster_role: String,
    pub injector: String,
    pub validator: String,
}

impl ControlPlaneNames {
    pub fn new(target: &Target<'_>) -> Self {
        let suffix = target.revision_suffix();
        let ns = target.namespace();
        Self {
            istiod: istiod_name(target.revision),
            mesh_config: format!("istio{suffix}"),
            cluster_role: format!("istiod{suffix}-{ns}"),
            // Revision names are unique in the cluster, and so is this.
            injector: format!("istio-sidecar-injector{suffix}"),
            validator: format!("istio-validator{suffix}-{ns}"),
        }
    }

    /// The address proxies reach the control plane at.
    pub fn discovery_address(&self, namespace: &str) -> String {
        format!("{}.{namespace}.svc:15012", self.istiod)
    }
}

/// The control plane's Deployment and Service: `istiod`, or
/// `istiod-<revision>` for a named revision.
pub fn istiod_name(revision: &str) -> String {
    if revision == DEFAULT_REVISION {
        "istiod".into()
    } else {
        format!("istiod-{revision}")
    }
}

/// Every object of the control plane of `target`'s revision.
pub fn render(target: &Target<'_>) -> Result<Vec<Managed>> {
    let names = ControlPlaneNames::new(target);
    let spec = &target.resolved.spec;
    let settings = spec
        .components
        .as_ref()
        .and_then(|c| c.control_plane.as_ref())
        .map(|c| &c.k8s);
    let default_settings = KubernetesSettings::default();
    let settings = settings.unwrap_or(&default_settings);

    let mut objects = vec![
        Managed::new(&MeshRevision {
            metadata: target.cluster_meta(target.revision, COMPONENT),
            spec: MeshRevisionSpec {
                installation: target.installation.name_any(),
                version: spec.version.clone(),
                namespace: target.namespace().into(),
                config: spec.clone(),
            },
            status: None,
        })?,
        Managed::new(&ServiceAccount {
            metadata: target.meta(&names.istiod, COMPONENT),
            ..Default::default()
        })?,
        Managed::new(&ClusterRole {
            metadata: target.cluster_meta(&names.cluster_role, COMPONENT),
            rules: Some(cluster_rules()),
            ..Default::default()
        })?,
        Managed::new(&ClusterRoleBinding {
            metadata: target.cluster_meta(&names.cluster_role, COMPONENT),
            role_ref: role_ref("ClusterRole", &names.cluster_role),
            subjects: Some(vec![subject(&names.istiod, target.namespace())]),
        })?,
        Managed::new(&Role {
            metadata: target.meta(&names.istiod, COMPONENT),
            rules: Some(namespace_rules()),
        })?,
        Managed::new(&RoleBinding {
            metadata: target.meta(&names.istiod, COMPONENT),
            role_ref: role_ref("Role", &names.istiod),
            subjects: Some(vec![subject(&names.istiod, target.namespace())]),
        })?,
        Managed::new(&mesh_config_map(target, &names)?)?,
    ];

    let pod_labels = BTreeMap::from([
        ("app".to_string(), "istiod".to_string()),
        ("istio".to_string(), "pilot".to_string()),
        ("istio.io/rev".to_string(), target.revision.to_string()),
        ("sidecar.istio.io/inject".to_string(), "false".to_string()),
    ]);
    let workload = Workload {
        name: names.istiod.clone(),
        component: COMPONENT,
        pod_labels,
        selector_keys: &["app", "istio.io/rev"],
        pod_annotations: BTreeMap::from([
            ("prometheus.io/scrape".into(), "true".into()),
            ("prometheus.io/port".into(), "15014".into()),
        ]),
        container: container(target, &names),
        volumes: vec![
            Volume {
                name: "config-volume".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: names.mesh_config.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Volume {
                name: "cacerts".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some("cacerts".into()),
                    optional: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ],
        service_account: names.istiod.clone(),
        run_as: MESH_UID,
        settings,
        settings_path: "spec.components.controlPlane".into(),
    };
    objects.extend(workload::deployment_objects(target, &workload)?);
    objects.push(workload::service(
        target,
        &workload,
        ServiceType::ClusterIP,
        vec![
            port("grpc-xds", 15010, 15010),
            port("https-dns", 15012, 15012),
            port("https-webhook", 443, 15017),
            port("http-monitoring", 15014, 15014),
        ],
    )?);
    objects.push(Managed::new(&injection_webhook(target, &names))?);
    let validator = validation_webhook(target, &names, None);
    let initial = validation_webhook(target, &names, Some("Ignore"));
    objects.push(Managed::new(&validator)?.with_on_create(&initial)?);
    Ok(objects)
}

fn container(target: &Target<'_>, names: &ControlPlaneNames) -> Container {
    let ns = target.namespace();
    Container {
        name: "discovery".into(),
        image: Some(target.resolved.image("controlplane")),
        ports: container_ports(&[
            ("grpc-xds", 15010),
            ("tls-xds", 15012),
            ("http-monitoring", 15014),
            ("https-webhook", 15017),
        ]),
        env: Some(vec![
            env("REVISION", target.revision),
            env_from_field("POD_NAME", "metadata.name"),
            env_from_field("POD_NAMESPACE", "metadata.namespace"),
            env_from_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            env("MESH_CONFIG_FILE", "/etc/istio/config/mesh"),
            env("ISTIOD_SERVICE", format!("{}.{ns}.svc", names.istiod)),
            env("INJECTION_WEBHOOK_CONFIG_NAME", names.injector.clone()),
            env("VALIDATION_WEBHOOK_CONFIG_NAME", names.validator.clone()),
            env("PROXY_IMAGE", target.resolved.image("proxy")),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(15014),
                ..Default::default()
            }),
            initial_delay_seconds: Some(1),
            period_seconds: Some(3),
            timeout_seconds: Some(5),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config-volume".into(),
                mount_path: "/etc/istio/config".into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "cacerts".into(),
                mount_path: "/etc/cacerts".into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

/// Istio's `istio` ConfigMap: the mesh config as YAML under `mesh`. With
/// the Jaeger addon on, proxies send their spans to its collector unless
/// `defaultConfig.tracing.otlpAddress` names another.
fn mesh_config_map(target: &Target<'_>, names: &ControlPlaneNames) -> Result<ConfigMap> {
    let mut mesh = target.resolved.spec.mesh_config.clone().unwrap_or_default();
    if super::addons::Addon::Jaeger.enabled(target) {
        let tracing = mesh
            .default_config
            .get_or_insert_with(Default::default)
            .tracing
            .get_or_insert_with(Default::default);
        tracing.otlp_address.get_or_insert_with(|| {
            format!(
                "{}.{}.svc.cluster.local:{}",
                super::addons::JAEGER_COLLECTOR,
                target.namespace(),
                super::addons::OTLP_GRPC_PORT
            )
        });
    }
    let yaml = serde_saphyr::to_string(&mesh).map_err(|e| {
        Error::InvalidSpec(format!("spec.meshConfig cannot be written as YAML: {e}"))
    })?;
    Ok(ConfigMap {
        metadata: target.meta(&names.mesh_config, COMPONENT),
        data: Some(BTreeMap::from([("mesh".to_string(), yaml)])),
        ..Default::default()
    })
}

fn cluster_rules() -> Vec<PolicyRule> {
    let read = ["get", "list", "watch"];
    let mut rules = vec![
        rule(
            &[""],
            &["pods", "nodes", "services", "namespaces", "endpoints"],
            &read,
        ),
        rule(&["discovery.k8s.io"], &["endpointslices"], &read),
        // Gateway credentials (credentialName) live in any namespace.
        rule(&[""], &["secrets"], &read),
        // The root certificate is published in every namespace (applied
        // server-side, hence patch).
        rule(
            &[""],
            &["configmaps"],
            &["get", "list", "watch", "create", "update", "patch"],
        ),
        // Events on config it skips as invalid (events.k8s.io/v1).
        rule(&["", "events.k8s.io"], &["events"], &["create", "patch"]),
        rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
        rule(
            &["authorization.k8s.io"],
            &["subjectaccessreviews"],
            &["create"],
        ),
        // Its own webhooks' caBundle and failurePolicy.
        rule(
            &["admissionregistration.k8s.io"],
            &[
                "mutatingwebhookconfigurations",
                "validatingwebhookconfigurations",
            ],
            &["get", "list", "watch", "update", "patch"],
        ),
        rule(
            &["apiextensions.k8s.io"],
            &["customresourcedefinitions"],
            &read,
        ),
    ];
    rules.push(rule(&ISTIO_GROUPS, &["*"], &read));
    rules.push(rule(
        &ISTIO_GROUPS,
        &["*/status"],
        &["get", "update", "patch"],
    ));
    rules
}

/// In its own namespace: the CA's Secret and its leader-election Lease.
fn namespace_rules() -> Vec<PolicyRule> {
    vec![
        rule(
            &[""],
            &["secrets"],
            &["get", "list", "watch", "create", "update", "delete"],
        ),
        rule(
            &["coordination.k8s.io"],
            &["leases"],
            &["get", "create", "update"],
        ),
    ]
}

pub fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(strings(groups)),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        ..Default::default()
    }
}

pub fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: name.into(),
    }
}

pub fn subject(service_account: &str, namespace: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: service_account.into(),
        namespace: Some(namespace.into()),
        ..Default::default()
    }
}

fn webhook_client(
    target: &Target<'_>,
    names: &ControlPlaneNames,
    path: &str,
) -> WebhookClientConfig {
    // The caBundle is the control plane's to fill in: it issues the
    // webhook's serving certificate.
    WebhookClientConfig {
        service: Some(ServiceReference {
            name: names.istiod.clone(),
            namespace: target.namespace().into(),
            path: Some(path.into()),
            port: Some(443),
        }),
        ..Default::default()
    }
}

fn selector(requirements: &[(&str, &str, &[&str])]) -> LabelSelector {
    LabelSelector {
        match_expressions: Some(
            requirements
                .iter()
                .map(|(key, operator, values)| LabelSelectorRequirement {
                    key: key.to_string(),
                    operator: operator.to_string(),
                    values: (!values.is_empty())
                        .then(|| values.iter().map(|v| v.to_string()).collect()),
                })
                .collect(),
        ),
        ..Default::default()
    }
}

/// Sidecar injection, with Istio's selection rules: a namespace label
/// `istio.io/rev=<revision>` or a pod label of the same, and for the default
/// revision `istio-injection=enabled` (which wins over `istio.io/rev`) or a pod
/// labelled `sidecar.istio.io/inject=true`; `sidecar.istio.io/inject=false`
/// always opts a pod out.
fn injection_webhook(
    target: &Target<'_>,
    names: &ControlPlaneNames,
) -> MutatingWebhookConfiguration {
    injection_webhook_for(
        target,
        names,
        target.cluster_meta(&names.injector, COMPONENT),
        target.revision,
    )
}

/// Istio's label on a tag's webhook, naming the tag.
pub const TAG_LABEL: &str = "istio.io/tag";

/// The injection webhook of a MeshRevisionTag: pods that select `tag`
/// (`istio.io/rev=<tag>`, and for the tag named `default` also
/// `istio-injection=enabled`) are injected by `target`'s revision. Named
/// `istio-revision-tag-<tag>` and labelled with the revision, as Istio's tags
/// are, so that the revision's control plane fills in its caBundle.
pub fn tag_webhook(target: &Target<'_>, tag: &str) -> Result<Managed> {
    let names = ControlPlaneNames::new(target);
    let mut metadata = target.cluster_meta(&format!("istio-revision-tag-{tag}"), COMPONENT);
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(TAG_LABEL.into(), tag.into());
    Managed::new(&injection_webhook_for(target, &names, metadata, tag))
}

/// Injection by `target`'s control plane of the pods that select `rev`, a
/// revision or a tag.
fn injection_webhook_for(
    target: &Target<'_>,
    names: &ControlPlaneNames,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    rev: &str,
) -> MutatingWebhookConfiguration {
    let not_opted_out = ("sidecar.istio.io/inject", "NotIn", &["false"][..]);
    let mut selections = vec![
        (
            "rev.namespace.sidecar-injector.istio.io",
            selector(&[
                ("istio.io/rev", "In", &[rev]),
                ("istio-injection", "DoesNotExist", &[]),
            ]),
            selector(&[not_opted_out]),
        ),
        (
            "rev.object.sidecar-injector.istio.io",
            selector(&[
                ("istio.io/rev", "DoesNotExist", &[]),
                ("istio-injection", "DoesNotExist", &[]),
            ]),
            selector(&[not_opted_out, ("istio.io/rev", "In", &[rev])]),
        ),
    ];
    if rev == DEFAULT_REVISION {
        selections.extend([
            (
                "namespace.sidecar-injector.istio.io",
                selector(&[("istio-injection", "In", &["enabled"])]),
                selector(&[not_opted_out]),
            ),
            (
                "object.sidecar-injector.istio.io",
                selector(&[
                    ("istio-injection", "DoesNotExist", &[]),
                    ("istio.io/rev", "DoesNotExist", &[]),
                ]),
                selector(&[
                    ("sidecar.istio.io/inject", "In", &["true"]),
                    ("istio.io/rev", "DoesNotExist", &[]),
                ]),
            ),
        ]);
    }
    MutatingWebhookConfiguration {
        metadata,
        webhooks: Some(
            selections
                .into_iter()
                .map(|(name, namespaces, objects)| MutatingWebhook {
                    name: name.into(),
                    client_config: webhook_client(target, names, "/inject"),
                    rules: Some(vec![RuleWithOperations {
                        operations: Some(vec!["CREATE".into()]),
                        api_groups: Some(vec!["".into()]),
                        api_versions: Some(vec!["v1".into()]),
                        resources: Some(vec!["pods".into()]),
                        scope: None,
                    }]),
                    namespace_selector: Some(namespaces),
                    object_selector: Some(objects),
                    side_effects: "None".into(),
                    admission_review_versions: vec!["v1".into()],
                    failure_policy: Some("Fail".into()),
                    reinvocation_policy: Some("Never".into()),
                    timeout_seconds: Some(10),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// Validation of the Istio-compatible config this revision serves: objects
/// labelled `istio.io/rev=<revision>`, and for the default revision those
/// without the label. `failure_policy` is set only at creation (Ignore, so
/// that config can be applied before the control plane serves); the control
/// plane switches it to Fail when it is ready, and the operator leaves it so.
fn validation_webhook(
    target: &Target<'_>,
    names: &ControlPlaneNames,
    failure_policy: Option<&str>,
) -> ValidatingWebhookConfiguration {
    let rev = target.revision;
    let mut selections = vec![(
        "rev.validation.istio.io",
        selector(&[("istio.io/rev", "In", &[rev])]),
    )];
    if rev == DEFAULT_REVISION {
        selections.push((
            "validation.istio.io",
            selector(&[("istio.io/rev", "DoesNotExist", &[])]),
        ));
    }
    validation_webhook_for(
        target,
        names,
        target.cluster_meta(&names.validator, COMPONENT),
        selections,
        failure_policy,
    )
}

/// The validation the tag named `default` adds, as Istio's does: Istio
/// config without an `istio.io/rev` label is validated by the tag's
/// revision (with RevisionBased installations no revision is named
/// `default`, so nothing else would). Created failing open, like every
/// validator; the revision's control plane turns it to Fail.
pub fn default_tag_validator(target: &Target<'_>) -> Result<Managed> {
    let names = ControlPlaneNames::new(target);
    let mut metadata = target.cluster_meta("istiod-default-validator", COMPONENT);
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(TAG_LABEL.into(), DEFAULT_REVISION.into());
    let selections = || {
        vec![(
            "validation.istio.io",
            selector(&[("istio.io/rev", "DoesNotExist", &[])]),
        )]
    };
    let validator = validation_webhook_for(target, &names, metadata.clone(), selections(), None);
    let initial = validation_webhook_for(target, &names, metadata, selections(), Some("Ignore"));
    Managed::new(&validator)?.with_on_create(&initial)
}

fn validation_webhook_for(
    target: &Target<'_>,
    names: &ControlPlaneNames,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    selections: Vec<(&str, LabelSelector)>,
    failure_policy: Option<&str>,
) -> ValidatingWebhookConfiguration {
    ValidatingWebhookConfiguration {
        metadata,
        webhooks: Some(
            selections
                .into_iter()
                .map(|(name, objects)| ValidatingWebhook {
                    name: name.into(),
                    client_config: webhook_client(target, names, "/validate"),
                    rules: Some(vec![RuleWithOperations {
                        operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                        api_groups: Some(ISTIO_GROUPS.iter().map(|g| g.to_string()).collect()),
                        api_versions: Some(vec!["*".into()]),
                        resources: Some(vec!["*".into()]),
                        scope: None,
                    }]),
                    object_selector: Some(objects),
                    side_effects: "None".into(),
                    admission_review_versions: vec!["v1".into()],
                    failure_policy: failure_policy.map(str::to_string),
                    timeout_seconds: Some(10),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use bowline_api::install::{MeshInstallation, MeshInstallationSpec, Profile};

    use super::*;
    use crate::profile;

    fn injector(installation: &str) -> MutatingWebhookConfiguration {
        let mut mesh = MeshInstallation::new(
            installation,
            MeshInstallationSpec {
                version: "v0.1.0".into(),
                profile: Some(Profile::Minimal),
                ..Default::default()
            },
        );
        mesh.metadata.uid = Some("uid".into());
        let resolved = profile::resolve(&mesh.spec).unwrap();
        let revision = crate::revisions::asked_for(&mesh, &resolved).unwrap();
        let target = Target {
            installation: &mesh,
            resolved: &resolved,
            revision: &revision,
        };
        injection_webhook(&target, &ControlPlaneNames::new(&target))
    }

    fn selects(hook: &MutatingWebhook, key: &str, operator: &str, value: Option<&str>) -> bool {
        let requirements = hook
            .namespace_selector
            .iter()
            .chain(hook.object_selector.iter())
            .flat_map(|s| s.match_expressions.iter().flatten());
        requirements.into_iter().any(|r| {
            r.key == key
                && r.operator == operator
                && value.is_none_or(|v| r.values.iter().flatten().any(|x| x == v))
        })
    }

    #[test]
    fn the_default_revision_also_answers_istio_injection_enabled() {
        let hook = injector("default");
        assert_eq!(
            hook.metadata.name.as_deref(),
            Some("istio-sidecar-injector")
        );
        let hooks = hook.webhooks.unwrap();
        assert_eq!(hooks.len(), 4);
        assert!(
            hooks
                .iter()
                .any(|h| selects(h, "istio-injection", "In", Some("enabled")))
        );
        assert!(
            hooks
                .iter()
                .any(|h| selects(h, "istio.io/rev", "In", Some("default")))
        );
        for hook in &hooks {
            assert_eq!(hook.client_config.service.as_ref().unwrap().name, "istiod");
            assert!(
                hook.client_config.ca_bundle.is_none(),
                "the control plane fills it"
            );
        }
    }

    #[test]
    fn a_named_revision_answers_only_its_own_label() {
        let hook = injector("canary");
        assert_eq!(
            hook.metadata.name.as_deref(),
            Some("istio-sidecar-injector-canary")
        );
        let hooks = hook.webhooks.unwrap();
        assert_eq!(hooks.len(), 2);
        assert!(
            !hooks
                .iter()
                .any(|h| selects(h, "istio-injection", "In", Some("enabled")))
        );
        for hook in &hooks {
            assert!(
                selects(hook, "istio.io/rev", "In", Some("canary"))
                    || selects(hook, "istio.io/rev", "DoesNotExist", None)
            );
            assert!(
                selects(hook, "sidecar.istio.io/inject", "NotIn", Some("false")),
                "an opted-out pod is never injected"
            );
            assert_eq!(
                hook.client_config.service.as_ref().unwrap().name,
                "istiod-canary"
            );
        }
    }
}
