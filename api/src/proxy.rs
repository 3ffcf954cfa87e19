//! What every Bowline proxy container looks like, in one place for both
//! that make one: the operator (gateways) and the control plane's injector
//! (sidecars). Istio's names, ports and paths, so that tools built for
//! Istio find the proxy.

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Probe, ProjectedVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The proxy container's name, which Kiali and the dashboards look for.
pub const CONTAINER: &str = "istio-proxy";
/// The UID the proxy runs as; capture rules exclude its traffic.
pub const UID: i64 = 1337;
/// The audience of the token a proxy presents to the CA.
pub const TOKEN_AUDIENCE: &str = "istio-ca";
/// Where the token is mounted, and its file.
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
pub const TOKEN_FILE: &str = "istio-token";
/// Where the mesh's root certificate is mounted (from the
/// `istio-ca-root-cert` ConfigMap).
pub const ROOT_CERT_DIR: &str = "/var/run/secrets/istio";
pub const ROOT_CERT_CONFIG_MAP: &str = "istio-ca-root-cert";
/// Health (`/healthz/ready`) and Prometheus ports.
pub const STATUS_PORT: i32 = 15021;
pub const METRICS_PORT: i32 = 15090;

/// An environment variable with a literal value.
pub fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// An environment variable read from the Pod's own fields.
pub fn env_from_field(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Named TCP container ports.
pub fn container_ports(ports: &[(&str, i32)]) -> Option<Vec<ContainerPort>> {
    Some(
        ports
            .iter()
            .map(|(name, port)| ContainerPort {
                name: Some(name.to_string()),
                container_port: *port,
                protocol: Some("TCP".into()),
                ..Default::default()
            })
            .collect(),
    )
}

/// The proxy container in `mode` (`sidecar` or `gateway`), talking to the
/// control plane at `discovery_address` for configuration and certificates.
pub fn container(
    mode: &str,
    image: String,
    discovery_address: &str,
    ports: &[(&str, i32)],
) -> Container {
    Container {
        name: CONTAINER.into(),
        image: Some(image),
        args: Some(vec![mode.into()]),
        ports: container_ports(ports),
        env: Some(vec![
            env("DISCOVERY_ADDRESS", discovery_address),
            env("CA_ADDRESS", discovery_address),
            env_from_field("POD_NAME", "metadata.name"),
            env_from_field("POD_NAMESPACE", "metadata.namespace"),
            env_from_field("INSTANCE_IP", "status.podIP"),
            env_from_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            env("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(STATUS_PORT),
                ..Default::default()
            }),
            initial_delay_seconds: Some(1),
            period_seconds: Some(2),
            failure_threshold: Some(30),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "istio-token".into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "istiod-ca-cert".into(),
                mount_path: ROOT_CERT_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        // As the proxy's UID, which capture rules exclude, with nothing it
        // does not need.
        security_context: Some(SecurityContext {
            run_as_user: Some(UID),
            run_as_group: Some(UID),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a proxy needs to get its identity: a ServiceAccount token for the
/// CA's audience, and the mesh's root certificate.
pub fn identity_volumes() -> Vec<Volume> {
    vec![
        Volume {
            name: "istio-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(43200),
                        path: TOKEN_FILE.into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "istiod-ca-cert".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ROOT_CERT_CONFIG_MAP.into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}
