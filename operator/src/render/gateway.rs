//! Ingress and egress gateways: the proxy in gateway mode, its Service, and
//! the right to read the TLS Secrets that Gateway resources name.

use std::collections::BTreeMap;

use bowline_api::install::{GatewayComponent, ServiceType};
use bowline_api::proxy;
use k8s_openapi::api::core::v1::{Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};

use super::controlplane::{ControlPlaneNames, MESH_UID, role_ref, rule, subject};
use super::meta::{Managed, Target};
use super::workload::{self, Workload, port};
use crate::error::{Error, Result};

/// Which way a gateway faces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// The `istio` label Gateway resources select on.
    pub fn istio_label(self) -> &'static str {
        match self {
            Self::Ingress => "ingressgateway",
            Self::Egress => "egressgateway",
        }
    }

    fn field(self) -> &'static str {
        match self {
            Self::Ingress => "ingressGateways",
            Self::Egress => "egressGateways",
        }
    }

    /// `ingressGateway/<name>` or `egressGateway/<name>`, as status names it.
    pub fn component_name(self, gateway: &str) -> String {
        match self {
            Self::Ingress => format!("ingressGateway/{gateway}"),
            Self::Egress => format!("egressGateway/{gateway}"),
        }
    }
}

/// The enabled gateways of the resolved spec, each with its direction and
/// its index in its list (for error messages).
pub fn enabled<'a>(target: &Target<'a>) -> Vec<(Direction, usize, &'a GatewayComponent)> {
    let Some(components) = target.resolved.spec.components.as_ref() else {
        return Vec::new();
    };
    fn list(
        direction: Direction,
        gateways: &Option<Vec<GatewayComponent>>,
    ) -> Vec<(Direction, usize, &GatewayComponent)> {
        gateways
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, g)| g.enabled.unwrap_or(true))
            .map(|(i, g)| (direction, i, g))
            .collect()
    }
    let mut all = list(Direction::Ingress, &components.ingress_gateways);
    all.extend(list(Direction::Egress, &components.egress_gateways));
    all
}

/// Every object of one gateway.
pub fn render(
    target: &Target<'_>,
    direction: Direction,
    index: usize,
    gateway: &GatewayComponent,
) -> Result<Vec<Managed>> {
    let component = match direction {
        Direction::Ingress => "ingressgateway",
        Direction::Egress => "egressgateway",
    };
    let name = gateway.name.as_str();
    let service_account = format!("{name}-service-account");
    let sds_role = format!("{name}-sds");

    let mut pod_labels = gateway.labels.clone();
    pod_labels.extend([
        ("app".to_string(), name.to_string()),
        ("istio".to_string(), direction.istio_label().to_string()),
        ("sidecar.istio.io/inject".to_string(), "false".to_string()),
    ]);

    let mut objects = vec![
        Managed::new(&ServiceAccount {
            metadata: target.meta(&service_account, component),
            ..Default::default()
        })?,
        Managed::new(&Role {
            metadata: target.meta(&sds_role, component),
            rules: Some(vec![rule(&[""], &["secrets"], &["get", "watch", "list"])]),
        })?,
        Managed::new(&RoleBinding {
            metadata: target.meta(&sds_role, component),
            role_ref: role_ref("Role", &sds_role),
            subjects: Some(vec![subject(&service_account, target.namespace())]),
        })?,
    ];

    let workload = Workload {
        name: name.to_string(),
        component,
        pod_labels: pod_labels.clone(),
        selector_keys: &["app", "istio"],
        pod_annotations: BTreeMap::from([
            ("prometheus.io/scrape".into(), "true".into()),
            ("prometheus.io/port".into(), "15020".into()),
            ("prometheus.io/path".into(), "/stats/prometheus".into()),
        ]),
        container: container(target, name, &pod_labels)?,
        volumes: proxy::identity_volumes(),
        service_account,
        run_as: MESH_UID,
        settings: &gateway.k8s,
        settings_path: format!("spec.components.{}[{index}]", direction.field()),
    };
    objects.extend(workload::deployment_objects(target, &workload)?);
    let (service_type, mut ports) = match direction {
        Direction::Ingress => (
            ServiceType::LoadBalancer,
            vec![port("status-port", 15021, 15021)],
        ),
        Direction::Egress => (ServiceType::ClusterIP, Vec::new()),
    };
    // Gateways bind 8080 and 8443: they run as non-root.
    ports.extend([port("http2", 80, 8080), port("https", 443, 8443)]);
    objects.push(workload::service(target, &workload, service_type, ports)?);
    Ok(objects)
}

/// The gateway's proxy, saying who it is as the injector has a sidecar
/// say it (Istio's node metadata variables): the peers it calls report it
/// as their source.
fn container(
    target: &Target<'_>,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Container> {
    let names = ControlPlaneNames::new(target);
    let mut container = proxy::container(
        "gateway",
        target.resolved.image("proxy"),
        &names.discovery_address(target.namespace()),
        &[
            ("http2", 8080),
            ("https", 8443),
            ("status-port", proxy::STATUS_PORT),
            ("http-envoy-prom", proxy::METRICS_PORT),
        ],
    );
    let labels = serde_json::to_string(labels)
        .map_err(|e| Error::InvalidSpec(format!("gateway {name}'s labels: {e}")))?;
    container.env.get_or_insert_with(Vec::new).extend([
        proxy::env("ISTIO_META_WORKLOAD_NAME", name),
        proxy::env("ISTIO_METAJSON_LABELS", labels),
    ]);
    Ok(container)
}
