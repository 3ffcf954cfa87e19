//! The addons: Prometheus, Grafana, Jaeger and Kiali, at the upstream images
//! the release pins, configured to find each other and the mesh.

use std::collections::BTreeMap;

use bowline_api::install::{AddonComponent, KubernetesSettings, ServiceType};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, HTTPGetAction, Probe,
    ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::controlplane::{ISTIO_GROUPS, role_ref, rule, subject};
use super::meta::{Managed, Target};
use super::workload::{self, Workload, container_ports, env, port};
use crate::error::{Error, Result};

/// The addons, in the order they are rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addon {
    Prometheus,
    Grafana,
    Jaeger,
    Kiali,
}

impl Addon {
    pub const ALL: [Addon; 4] = [Self::Prometheus, Self::Grafana, Self::Jaeger, Self::Kiali];

    pub fn name(self) -> &'static str {
        match self {
            Self::Prometheus => "prometheus",
            Self::Grafana => "grafana",
            Self::Jaeger => "jaeger",
            Self::Kiali => "kiali",
        }
    }

    /// `addon/<name>`, as status names it.
    pub fn component_name(self) -> String {
        format!("addon/{}", self.name())
    }

    fn settings<'a>(self, target: &Target<'a>) -> Option<&'a AddonComponent> {
        let addons = target.resolved.spec.addons.as_ref()?;
        match self {
            Self::Prometheus => addons.prometheus.as_ref(),
            Self::Grafana => addons.grafana.as_ref(),
            Self::Jaeger => addons.jaeger.as_ref(),
            Self::Kiali => addons.kiali.as_ref(),
        }
    }

    pub fn enabled(self, target: &Target<'_>) -> bool {
        self.settings(target)
            .and_then(|a| a.enabled)
            .unwrap_or(false)
    }
}

/// Every object of the enabled addons.
pub fn render(target: &Target<'_>) -> Result<Vec<Managed>> {
    let mut objects = Vec::new();
    for addon in Addon::ALL {
        let Some(settings) = addon.settings(target).filter(|_| addon.enabled(target)) else {
            continue;
        };
        let k8s = &settings.k8s;
        objects.extend(match addon {
            Addon::Prometheus => prometheus(target, k8s)?,
            Addon::Grafana => grafana(target, k8s)?,
            Addon::Jaeger => jaeger(target, k8s)?,
            Addon::Kiali => kiali(target, k8s)?,
        });
    }
    Ok(objects)
}

/// What every addon's Deployment shares.
struct AddonWorkload<'a> {
    addon: Addon,
    image: &'a str,
    args: Vec<String>,
    ports: &'a [(&'a str, i32)],
    env: Vec<k8s_openapi::api::core::v1::EnvVar>,
    readiness: (&'a str, i32),
    /// ConfigMap (named after the addon) mounted here, when it has one.
    config_mount: Option<&'a str>,
    /// Writable directories (the root filesystem is read-only).
    scratch: &'a [&'a str],
    /// Further volumes and where they are mounted.
    volumes: Vec<(Volume, VolumeMount)>,
    run_as: i64,
    service_account: Option<String>,
}

fn addon_workload<'a>(k8s: &'a KubernetesSettings, w: AddonWorkload<'_>) -> Workload<'a> {
    let name = w.addon.name();
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    if let Some(path) = w.config_mount {
        volumes.push(Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "config".into(),
            mount_path: path.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    for (volume, mount) in w.volumes {
        volumes.push(volume);
        mounts.push(mount);
    }
    for (i, path) in w.scratch.iter().enumerate() {
        let volume = format!("scratch-{i}");
        volumes.push(Volume {
            name: volume.clone(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: volume,
            mount_path: path.to_string(),
            ..Default::default()
        });
    }
    Workload {
        name: name.into(),
        component: name,
        selector_keys: &["app"],
        pod_labels: BTreeMap::from([
            ("app".into(), name.into()),
            ("sidecar.istio.io/inject".into(), "false".into()),
        ]),
        pod_annotations: BTreeMap::new(),
        container: Container {
            name: name.into(),
            image: Some(w.image.into()),
            args: (!w.args.is_empty()).then_some(w.args),
            env: Some(w.env),
            ports: container_ports(w.ports),
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(w.readiness.0.into()),
                    port: IntOrString::Int(w.readiness.1),
                    ..Default::default()
                }),
                period_seconds: Some(5),
                ..Default::default()
            }),
            volume_mounts: Some(mounts),
            ..Default::default()
        },
        volumes,
        service_account: w.service_account.unwrap_or_else(|| "default".into()),
        run_as: w.run_as,
        settings: k8s,
        settings_path: format!("spec.addons.{}", w.addon.name()),
    }
}

/// An addon's Deployment (with its HPA and PDB) and its ClusterIP Service.
fn deployment_and_service(
    target: &Target<'_>,
    w: &Workload<'_>,
    ports: Vec<k8s_openapi::api::core::v1::ServicePort>,
) -> Result<Vec<Managed>> {
    let mut objects = workload::deployment_objects(target, w)?;
    objects.push(workload::service(target, w, ServiceType::ClusterIP, ports)?);
    Ok(objects)
}

/// A ConfigMap named after the addon, holding `files` as YAML or JSON.
fn config_map(target: &Target<'_>, addon: Addon, files: &[(&str, Value)]) -> Result<Managed> {
    let mut data = BTreeMap::new();
    for (file, content) in files {
        let text = if file.ends_with(".json") {
            serde_json::to_string_pretty(content).map_err(|source| Error::Encode {
                what: format!("{} {file}", addon.name()),
                source,
            })?
        } else {
            serde_saphyr::to_string(content).map_err(|e| {
                Error::InvalidSpec(format!(
                    "{} {file} cannot be written as YAML: {e}",
                    addon.name()
                ))
            })?
        };
        data.insert(file.to_string(), text);
    }
    Managed::new(&ConfigMap {
        metadata: target.meta(addon.name(), addon.name()),
        data: Some(data),
        ..Default::default()
    })
}

/// A ServiceAccount bound to a ClusterRole of `rules`, named after the addon
/// (and the namespace, for the cluster-scoped pair).
fn cluster_reader(
    target: &Target<'_>,
    addon: Addon,
    rules: Vec<PolicyRule>,
) -> Result<Vec<Managed>> {
    let name = addon.name();
    let cluster_name = format!("{name}-{}", target.namespace());
    Ok(vec![
        Managed::new(&ServiceAccount {
            metadata: target.meta(name, name),
            ..Default::default()
        })?,
        Managed::new(&ClusterRole {
            metadata: target.cluster_meta(&cluster_name, name),
            rules: Some(rules),
            ..Default::default()
        })?,
        Managed::new(&ClusterRoleBinding {
            metadata: target.cluster_meta(&cluster_name, name),
            role_ref: role_ref("ClusterRole", &cluster_name),
            subjects: Some(vec![subject(name, target.namespace())]),
        })?,
    ])
}

/// The Jaeger addon's collector Service, and its OTLP/gRPC port, where
/// proxies send spans.
pub const JAEGER_COLLECTOR: &str = "jaeger-collector";
pub const OTLP_GRPC_PORT: i32 = 4317;

fn url(target: &Target<'_>, service: &str, port: i32) -> String {
    format!("http://{service}.{}:{port}", target.namespace())
}

fn prometheus(target: &Target<'_>, k8s: &KubernetesSettings) -> Result<Vec<Managed>> {
    let addon = Addon::Prometheus;
    let read = ["get", "list", "watch"];
    let mut objects = cluster_reader(
        target,
        addon,
        vec![
            rule(
                &[""],
                &["nodes", "nodes/metrics", "services", "endpoints", "pods"],
                &read,
            ),
            rule(&["discovery.k8s.io"], &["endpointslices"], &read),
            PolicyRule {
                non_resource_urls: Some(vec!["/metrics".into()]),
                verbs: vec!["get".into()],
                ..Default::default()
            },
        ],
    )?;
    objects.push(config_map(
        target,
        addon,
        &[("prometheus.yml", prometheus_config(target))],
    )?);
    let w = addon_workload(
        k8s,
        AddonWorkload {
            addon,
            image: &target.resolved.release.addons.prometheus,
            args: vec![
                "--config.file=/etc/prometheus/prometheus.yml".into(),
                "--storage.tsdb.path=/prometheus".into(),
                "--storage.tsdb.retention.time=6h".into(),
                "--web.enable-lifecycle".into(),
            ],
            ports: &[("http", 9090)],
            env: Vec::new(),
            readiness: ("/-/ready", 9090),
            config_mount: Some("/etc/prometheus"),
            scratch: &["/prometheus"],
            run_as: 65534,
            service_account: Some(addon.name().into()),
            volumes: Vec::new(),
        },
    );
    objects.extend(deployment_and_service(
        target,
        &w,
        vec![port("http", 9090, 9090)],
    )?);
    Ok(objects)
}

/// Scrape jobs for the control plane's monitoring port, every proxy's merged
/// metrics on 15020, and any Pod annotated `prometheus.io/scrape: "true"`.
fn prometheus_config(target: &Target<'_>) -> Value {
    let pod_ip_port = |port: i32| {
        json!({
            "source_labels": ["__meta_kubernetes_pod_ip"],
            "regex": "(.+)",
            "replacement": format!("$1:{port}"),
            "target_label": "__address__",
        })
    };
    let pod_labels = json!([
        {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]);
    let with_pod_labels = |mut relabel: Vec<Value>| {
        relabel.extend(pod_labels.as_array().cloned().unwrap_or_default());
        Value::Array(relabel)
    };
    json!({
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "scrape_configs": [
            {
                "job_name": "controlplane",
                "kubernetes_sd_configs": [{"role": "endpoints", "namespaces": {"names": [target.namespace()]}}],
                "relabel_configs": [{
                    "source_labels": ["__meta_kubernetes_service_label_app", "__meta_kubernetes_endpoint_port_name"],
                    "action": "keep",
                                        "regex": "istiod;http-monitoring",
                },
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                ],
            },
            {
                "job_name": "proxies",
                "metrics_path": "/stats/prometheus",
                "kubernetes_sd_configs": [{"role": "pod"}],
                "relabel_configs": with_pod_labels(vec![
                    json!({
                        "source_labels": ["__meta_kubernetes_pod_container_name", "__meta_kubernetes_pod_container_port_name"],
                        "action": "keep",
                        "regex": "istio-proxy;http-envoy-prom",
                    }),
                    pod_ip_port(15020),
                ]),
            },
            {
                "job_name": "kubernetes-pods",
                "kubernetes_sd_configs": [{"role": "pod"}],
                "relabel_configs": with_pod_labels(vec![
                    json!({"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"], "action": "keep", "regex": "true"}),
                    // 15020 is the job above's: injection and the gateways
                    // point their prometheus.io annotations at it, and a
                    // second target would count each series twice in every
                    // sum. An app's own port is still scraped here.
                    json!({"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_port"], "action": "drop", "regex": "15020"}),
                    json!({"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"], "action": "replace", "regex": "(.+)", "target_label": "__metrics_path__"}),
                    json!({
                        "source_labels": ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"],
                        "action": "replace",
                        "regex": "([^:]+)(?::\\d+)?;(\\d+)",
                        "replacement": "$1:$2",
                        "target_label": "__address__",
                    }),
                ]),
            },
        ],
    })
}

fn grafana(target: &Target<'_>, k8s: &KubernetesSettings) -> Result<Vec<Managed>> {
    let addon = Addon::Grafana;
    let datasources = json!({
        "apiVersion": 1,
        "datasources": [{
            "name": "Prometheus",
            "type": "prometheus",
            "uid": "prometheus",
            "access": "proxy",
            "url": url(target, "prometheus", 9090),
            "isDefault": true,
            "editable": false,
        }],
    });
    let providers = json!({
        "apiVersion": 1,
        "providers": [{
            "name": "bowline",
            "folder": "Bowline",
            "type": "file",
            "disableDeletion": true,
            "options": {"path": GRAFANA_DASHBOARDS},
        }],
    });
    let mut objects = vec![
        config_map(
            target,
            addon,
            &[
                ("datasources.yaml", datasources),
                ("dashboards.yaml", providers),
            ],
        )?,
        Managed::new(&ConfigMap {
            metadata: target.meta("grafana-dashboards", addon.name()),
            data: Some(dashboards()?),
            ..Default::default()
        })?,
    ];
    let provisioning = Volume {
        name: "provisioning".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: addon.name().into(),
            items: Some(vec![
                key_to_path("datasources.yaml", "datasources/datasources.yaml"),
                key_to_path("dashboards.yaml", "dashboards/dashboards.yaml"),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let dashboard_files = Volume {
        name: "dashboards".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: "grafana-dashboards".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let w = addon_workload(
        k8s,
        AddonWorkload {
            addon,
            image: &target.resolved.release.addons.grafana,
            args: Vec::new(),
            ports: &[("http", 3000)],
            env: vec![
                env("GF_PATHS_DATA", "/var/lib/grafana"),
                env("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning"),
                env("GF_AUTH_ANONYMOUS_ENABLED", "true"),
                env("GF_AUTH_ANONYMOUS_ORG_ROLE", "Admin"),
                env("GF_AUTH_BASIC_ENABLED", "false"),
                env("GF_SECURITY_ADMIN_USER", "-"),
            ],
            readiness: ("/api/health", 3000),
            config_mount: None,
            scratch: &["/var/lib/grafana", "/tmp"],
            run_as: 472,
            service_account: None,
            volumes: vec![
                (
                    provisioning,
                    read_only_mount("provisioning", "/etc/grafana/provisioning"),
                ),
                (
                    dashboard_files,
                    read_only_mount("dashboards", GRAFANA_DASHBOARDS),
                ),
            ],
        },
    );
    objects.extend(deployment_and_service(
        target,
        &w,
        vec![port("http", 3000, 3000)],
    )?);
    Ok(objects)
}

/// Where Grafana finds the dashboard files.
const GRAFANA_DASHBOARDS: &str = "/etc/grafana/dashboards/bowline";

/// The mesh, service, workload and control-plane dashboards, embedded from
/// `config/dashboards/` and completed with what every panel repeats: the
/// Prometheus data source, ids and query refIds. File name -> JSON.
pub fn dashboards() -> Result<BTreeMap<String, String>> {
    const SOURCES: [(&str, &str); 4] = [
        ("mesh", include_str!("../../../config/dashboards/mesh.yaml")),
        (
            "service",
            include_str!("../../../config/dashboards/service.yaml"),
        ),
        (
            "workload",
            include_str!("../../../config/dashboards/workload.yaml"),
        ),
        (
            "controlplane",
            include_str!("../../../config/dashboards/controlplane.yaml"),
        ),
    ];
    let datasource = json!({"type": "prometheus", "uid": "prometheus"});
    let mut files = BTreeMap::new();
    for (name, yaml) in SOURCES {
        let mut dashboard: Value = serde_saphyr::from_str(yaml).map_err(|e| {
            Error::InvalidSpec(format!(
                "config/dashboards/{name}.yaml does not parse (an operator bug): {e}"
            ))
        })?;
        for (id, panel) in dashboard["panels"]
            .as_array_mut()
            .into_iter()
            .flatten()
            .enumerate()
        {
            panel["id"] = json!(id + 1);
            panel["datasource"] = datasource.clone();
            for (i, query) in panel["targets"]
                .as_array_mut()
                .into_iter()
                .flatten()
                .enumerate()
            {
                query["refId"] = json!(char::from(b'A' + i as u8).to_string());
                query["datasource"] = datasource.clone();
            }
        }
        for variable in dashboard["templating"]["list"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            variable["datasource"] = datasource.clone();
        }
        let text = serde_json::to_string_pretty(&dashboard).map_err(|source| Error::Encode {
            what: format!("dashboard {name}"),
            source,
        })?;
        files.insert(format!("{name}.json"), text);
    }
    Ok(files)
}

fn key_to_path(key: &str, path: &str) -> k8s_openapi::api::core::v1::KeyToPath {
    k8s_openapi::api::core::v1::KeyToPath {
        key: key.into(),
        path: path.into(),
        ..Default::default()
    }
}

fn read_only_mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn jaeger(target: &Target<'_>, k8s: &KubernetesSettings) -> Result<Vec<Managed>> {
    let addon = Addon::Jaeger;
    let w = addon_workload(
        k8s,
        AddonWorkload {
            addon,
            image: &target.resolved.release.addons.jaeger,
            args: vec!["--memory.max-traces=50000".into()],
            ports: &[
                ("http-query", 16686),
                ("grpc-otlp", 4317),
                ("http-otlp", 4318),
                ("http-zipkin", 9411),
                ("http-admin", 14269),
            ],
            env: vec![
                env("COLLECTOR_OTLP_ENABLED", "true"),
                env("COLLECTOR_ZIPKIN_HOST_PORT", ":9411"),
                env("QUERY_BASE_PATH", "/jaeger"),
            ],
            readiness: ("/", 14269),
            config_mount: None,
            scratch: &["/tmp"],
            run_as: 10001,
            service_account: None,
            volumes: Vec::new(),
        },
    );
    let mut objects = workload::deployment_objects(target, &w)?;
    // Istio's names: `tracing` for the UI, `zipkin` and `jaeger-collector`
    // for the collectors.
    for (name, ports) in [
        ("tracing", vec![port("http-query", 80, 16686)]),
        ("zipkin", vec![port("http-zipkin", 9411, 9411)]),
        (
            JAEGER_COLLECTOR,
            vec![
                port("grpc-otlp", OTLP_GRPC_PORT, 4317),
                port("http-otlp", 4318, 4318),
            ],
        ),
    ] {
        let renamed = Workload {
            name: name.into(),
            ..w.clone()
        };
        objects.push(workload::service(
            target,
            &renamed,
            ServiceType::ClusterIP,
            ports,
        )?);
    }
    Ok(objects)
}

fn kiali(target: &Target<'_>, k8s: &KubernetesSettings) -> Result<Vec<Managed>> {
    let addon = Addon::Kiali;
    let read = ["get", "list", "watch"];
    let mut objects = cluster_reader(
        target,
        addon,
        vec![
            rule(
                &[""],
                &[
                    "configmaps",
                    "endpoints",
                    "namespaces",
                    "nodes",
                    "pods",
                    "pods/log",
                    "replicationcontrollers",
                    "services",
                ],
                &read,
            ),
            rule(
                &["apps"],
                &["deployments", "replicasets", "statefulsets", "daemonsets"],
                &read,
            ),
            rule(&["batch"], &["jobs", "cronjobs"], &read),
            rule(&["autoscaling"], &["horizontalpodautoscalers"], &read),
            rule(&["discovery.k8s.io"], &["endpointslices"], &read),
            rule(&["gateway.networking.k8s.io"], &["*"], &read),
            rule(&ISTIO_GROUPS, &["*"], &read),
            rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
            rule(
                &["authorization.k8s.io"],
                &["selfsubjectaccessreviews"],
                &["create"],
            ),
        ],
    )?;
    let ns = target.namespace();
    let control_plane = super::controlplane::ControlPlaneNames::new(target);
    let config = json!({
        "auth": {"strategy": "anonymous"},
        "deployment": {"cluster_wide_access": true, "namespace": ns, "view_only_mode": true},
        "istio_namespace": ns,
        "server": {"port": 20001, "web_root": "/kiali", "observability": {"metrics": {"enabled": true, "port": 9090}}},
        "external_services": {
            "prometheus": {"url": url(target, "prometheus", 9090)},
            "grafana": {"enabled": true, "internal_url": url(target, "grafana", 3000), "external_url": "http://localhost:3000"},
            "tracing": {"enabled": true, "provider": "jaeger", "use_grpc": false, "internal_url": format!("{}/jaeger", url(target, "tracing", 80)), "external_url": "http://localhost:16686/jaeger"},
            "istio": {
                "root_namespace": ns,
                                "config_map_name": control_plane.mesh_config,
                "istiod_deployment_name": control_plane.istiod,
                "istio_sidecar_injector_config_map_name": control_plane.mesh_config,
                "component_status": {"enabled": false},
            },
        },
    });
    objects.push(config_map(target, addon, &[("config.yaml", config)])?);
    let w = addon_workload(
        k8s,
        AddonWorkload {
            addon,
            image: &target.resolved.release.addons.kiali,
            args: vec!["-config".into(), "/kiali-configuration/config.yaml".into()],
            ports: &[("http", 20001), ("http-metrics", 9090)],
            env: vec![env("ACTIVE_NAMESPACE", ns)],
            readiness: ("/kiali/healthz", 20001),
            config_mount: Some("/kiali-configuration"),
            scratch: &[],
            run_as: 1000,
            service_account: Some(addon.name().into()),
            volumes: Vec::new(),
        },
    );
    objects.extend(deployment_and_service(
        target,
        &w,
        vec![port("http", 20001, 20001), port("http-metrics", 9090, 9090)],
    )?);
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric names in a PromQL expression: the identifiers left once
    /// label matchers `{..}`, grouping lists `by (..)`, strings, numbers,
    /// durations and PromQL's own functions and keywords are set aside.
    fn metric_names(expr: &str) -> Vec<String> {
        const PROMQL: [&str; 14] = [
            "sum",
            "rate",
            "irate",
            "increase",
            "histogram_quantile",
            "round",
            "or",
            "and",
            "unless",
            "vector",
            "by",
            "without",
            "max",
            "min",
        ];
        let mut names = Vec::new();
        let mut rest = expr;
        let mut grouping = false;
        while let Some(c) = rest.chars().next() {
            if c == '{' || c == '"' || c == '[' || (c == '(' && grouping) {
                let close = match c {
                    '{' => '}',
                    '[' => ']',
                    '(' => ')',
                    _ => '"',
                };
                let end = rest[1..].find(close).map_or(rest.len(), |i| i + 2);
                rest = &rest[end..];
                grouping = false;
            } else if c.is_ascii_alphabetic() || c == '_' {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let word = &rest[..end];
                grouping = word == "by" || word == "without";
                if !PROMQL.contains(&word) {
                    names.push(word.to_string());
                }
                rest = &rest[end..];
            } else {
                if !c.is_whitespace() {
                    grouping = false;
                }
                rest = &rest[c.len_utf8()..];
            }
        }
        names
    }

    /// Every metric the dashboards query is one the mesh exports: Istio's
    /// standard proxy metrics, Istio's control-plane names, or the process
    /// and `up` series Prometheus has for every target.
    #[test]
    fn dashboards_query_only_metrics_the_mesh_exports() {
        let files = dashboards().unwrap();
        assert_eq!(files.len(), 4);
        for (file, text) in files {
            let dashboard: Value = serde_json::from_str(&text).unwrap();
            assert!(
                dashboard["uid"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("bowline-")),
                "{file}"
            );
            let panels = dashboard["panels"].as_array().unwrap();
            assert!(!panels.is_empty(), "{file}");
            for panel in panels {
                assert_eq!(panel["datasource"]["uid"], "prometheus");
                let targets = panel["targets"].as_array().unwrap();
                assert!(!targets.is_empty(), "{file}: {}", panel["title"]);
                for target in targets {
                    let expr = target["expr"].as_str().unwrap();
                    let names = metric_names(expr);
                    assert!(!names.is_empty(), "{file}: no metric in {expr}");
                    for name in names {
                        assert!(
                            ["istio_", "pilot_", "citadel_", "process_", "up"]
                                .iter()
                                .any(|p| name.starts_with(p)),
                            "{file}: {name} in {expr}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn metric_names_are_found_in_promql() {
        assert_eq!(
            metric_names(
                "sum by (le) (rate(istio_requests_total{reporter=\"source\"}[1m])) / sum(up{job=\"x\"})"
            ),
            ["istio_requests_total", "up"]
        );
    }
}
