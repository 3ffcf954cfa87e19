//! Sidecar injection: what the `/inject` webhook does to a pod the API
//! server sends it. Pure: the pod in, a JSON Patch out.
//!
//! The webhook configurations the operator registers already select pods
//! with Istio's rules (`istio-injection`, `istio.io/rev`,
//! `sidecar.istio.io/inject`, with their precedence); this adds, as Istio's
//! injector does:
//! - the `istio-init` container, running `bowline-proxy init` with
//!   istio-iptables' flags: outbound to 15001, inbound to 15006, the proxy's
//!   UID excluded, the `traffic.sidecar.istio.io/*` annotations honoured;
//! - the `istio-proxy` container in sidecar mode, with the discovery address
//!   of the injecting revision, its identity volumes and a locked-down
//!   security context;
//! - the labels and annotations injection leaves (`sidecar.istio.io/status`,
//!   `security.istio.io/tlsMode`, `istio.io/rev`, canonical service names,
//!   Prometheus scraping of the merged metrics on 15020).

use std::collections::BTreeMap;

use bowline_api::proxy;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, HTTPGetAction, Pod, ResourceRequirements,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

/// The annotation injection leaves on a pod, and that marks it injected.
pub const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Ports the capture rules never redirect inbound: the proxy's own.
const PROXY_INBOUND_PORTS: &str = "15090,15021,15020";

/// What the injecting revision puts in a sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injection {
    /// The revision injecting (its `istio.io/rev`).
    pub revision: String,
    /// Where the proxy gets configuration and certificates,
    /// `istiod-<revision>.<namespace>.svc:15012`.
    pub discovery_address: String,
    /// The proxy image, `<hub>/proxy:<tag>`.
    pub proxy_image: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the pod cannot be read or written as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The patch that injects `pod`, or `None` when there is nothing to do (it
/// is injected already, or it shares the node's network, where capture
/// would take the node's traffic).
pub fn patch(pod: &Pod, injection: &Injection) -> Result<Option<json_patch::Patch>, Error> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    if annotations.contains_key(STATUS_ANNOTATION) || spec.host_network == Some(true) {
        return Ok(None);
    }
    let mut injected = pod.clone();
    inject(&mut injected, injection)?;
    let before = serde_json::to_value(pod)?;
    let after = serde_json::to_value(&injected)?;
    Ok(Some(json_patch::diff(&before, &after)))
}

fn inject(pod: &mut Pod, injection: &Injection) -> Result<(), Error> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let spec = pod.spec.get_or_insert_with(Default::default);
    let first_app = spec.containers.first().map(|c| c.name.clone());
    let rewrite = annotations
        .get("sidecar.istio.io/rewriteAppHTTPProbers")
        .is_none_or(|v| v != "false");
    let probers = if rewrite {
        rewrite_probes(&mut spec.containers)
    } else {
        serde_json::Map::new()
    };

    spec.init_containers
        .get_or_insert_with(Vec::new)
        .push(init_container(&annotations, injection));
    let mut sidecar = sidecar(injection);
    if !probers.is_empty() {
        sidecar.env.get_or_insert_with(Vec::new).push(proxy::env(
            "ISTIO_KUBE_APP_PROBERS",
            serde_json::Value::Object(probers).to_string(),
        ));
    }
    spec.containers.push(sidecar);
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.extend(proxy::identity_volumes());
    volumes.push(Volume {
        name: "istio-envoy".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            ..Default::default()
        }),
        ..Default::default()
    });

    let status = json!({
        "initContainers": ["istio-init"],
        "containers": [proxy::CONTAINER],
        "volumes": ["istio-token", "istiod-ca-cert", "istio-envoy"],
        "imagePullSecrets": null,
        "revision": injection.revision,
    });
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(STATUS_ANNOTATION.into(), serde_json::to_string(&status)?);
    for (key, value) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "15020"),
        ("prometheus.io/path", "/stats/prometheus"),
    ] {
        annotations
            .entry(key.into())
            .or_insert_with(|| value.into());
    }
    if let Some(app) = first_app {
        annotations
            .entry("kubectl.kubernetes.io/default-container".into())
            .or_insert(app);
    }

    let canonical_name = [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|key| labels.get(*key).cloned())
    .or_else(|| {
        pod.metadata
            .generate_name
            .as_ref()
            .map(|g| g.trim_end_matches('-').to_string())
    })
    .or_else(|| pod.metadata.name.clone())
    .unwrap_or_default();
    let canonical_revision = [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|key| labels.get(*key).cloned())
    .unwrap_or_else(|| "latest".into());
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert("security.istio.io/tlsMode".into(), "istio".into());
    labels.insert("istio.io/rev".into(), injection.revision.clone());
    labels
        .entry("service.istio.io/canonical-name".into())
        .or_insert(canonical_name);
    labels
        .entry("service.istio.io/canonical-revision".into())
        .or_insert(canonical_revision);

    // Who the workload is, for the proxy's metrics and the peers it
    // tells (Istio's node metadata variables).
    let labels = serde_json::to_string(&labels)?;
    let workload = workload_name(&pod.metadata);
    let spec = pod.spec.get_or_insert_with(Default::default);
    if let Some(sidecar) = spec
        .containers
        .iter_mut()
        .find(|c| c.name == proxy::CONTAINER)
    {
        let env = sidecar.env.get_or_insert_with(Vec::new);
        env.push(proxy::env("ISTIO_METAJSON_LABELS", labels));
        if let Some(workload) = workload {
            env.push(proxy::env("ISTIO_META_WORKLOAD_NAME", workload));
        }
    }
    Ok(())
}

/// Istio's probe rewrite: each app container's HTTP and TCP probes go to
/// the sidecar's `15020/app-health/<container>/{readyz,livez,startupz}`,
/// which runs the original check against the app (past capture, mutual TLS
/// and authorization, which the kubelet's plaintext probe would meet).
/// Returns the original checks by path, for `ISTIO_KUBE_APP_PROBERS`.
fn rewrite_probes(containers: &mut [Container]) -> serde_json::Map<String, serde_json::Value> {
    let mut probers = serde_json::Map::new();
    for container in containers.iter_mut() {
        let ports = container.ports.clone().unwrap_or_default();
        let number = |port: &IntOrString| match port {
            IntOrString::Int(n) => Some(*n),
            IntOrString::String(name) => ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port),
        };
        let name = container.name.clone();
        for (kind, probe) in [
            ("readyz", container.readiness_probe.as_mut()),
            ("livez", container.liveness_probe.as_mut()),
            ("startupz", container.startup_probe.as_mut()),
        ] {
            let Some(probe) = probe else { continue };
            let check = if let Some(get) = &probe.http_get {
                let Some(port) = number(&get.port) else {
                    continue;
                };
                json!({"httpGet": {
                    "path": get.path,
                    "port": port,
                    "scheme": get.scheme.clone().unwrap_or_else(|| "HTTP".into()),
                    "httpHeaders": get.http_headers.iter().flatten()
                        .map(|h| json!({"name": h.name, "value": h.value}))
                        .collect::<Vec<_>>(),
                }})
            } else if let Some(tcp) = &probe.tcp_socket {
                let Some(port) = number(&tcp.port) else {
                    continue;
                };
                json!({"tcpSocket": {"port": port}})
            } else {
                continue;
            };
            let path = format!("/app-health/{name}/{kind}");
            let mut check = check;
            check["timeoutSeconds"] = json!(probe.timeout_seconds.unwrap_or(1));
            probers.insert(path.clone(), check);
            probe.tcp_socket = None;
            probe.http_get = Some(HTTPGetAction {
                path: Some(path),
                port: IntOrString::Int(15020),
                scheme: Some("HTTP".into()),
                ..Default::default()
            });
        }
    }
    probers
}

/// The workload a pod belongs to, as Istio names it: a Deployment's pod
/// (`reviews-v1-7d9f8c6b5-` with `pod-template-hash: 7d9f8c6b5`) is the
/// Deployment's, any other controller's pod the controller's, a bare pod
/// itself.
fn workload_name(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<String> {
    let Some(generated) = metadata.generate_name.as_deref() else {
        return metadata.name.clone();
    };
    let owner = generated.trim_end_matches('-');
    let hash = metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    Some(match hash {
        Some(hash) => owner
            .strip_suffix(&format!("-{hash}"))
            .unwrap_or(owner)
            .to_string(),
        None => owner.to_string(),
    })
}

/// The arguments of the injected `istio-init` container: `init` and
/// istio-iptables' flags, from the pod's `traffic.sidecar.istio.io/*`
/// annotations.
pub fn init_args(annotations: &BTreeMap<String, String>) -> Vec<String> {
    let annotation = |name: &str, default: &str| {
        annotations
            .get(&format!("traffic.sidecar.istio.io/{name}"))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let mut exclude_inbound = PROXY_INBOUND_PORTS.to_string();
    let user_excluded = annotation("excludeInboundPorts", "");
    if !user_excluded.is_empty() {
        exclude_inbound = format!("{exclude_inbound},{user_excluded}");
    }
    let mut args = vec![
        "init".to_string(),
        "-p".into(),
        "15001".into(),
        "-z".into(),
        "15006".into(),
        "-u".into(),
        proxy::UID.to_string(),
        "-m".into(),
        "REDIRECT".into(),
        "-i".into(),
        annotation("includeOutboundIPRanges", "*"),
        "-x".into(),
        annotation("excludeOutboundIPRanges", ""),
        "-b".into(),
        annotation("includeInboundPorts", "*"),
        "-d".into(),
        exclude_inbound,
    ];
    for (flag, name) in [
        ("-o", "excludeOutboundPorts"),
        ("-q", "includeOutboundPorts"),
    ] {
        let value = annotation(name, "");
        if !value.is_empty() {
            args.push(flag.into());
            args.push(value);
        }
    }
    args
}

/// `bowline-proxy init` with istio-iptables' flags, from the pod's
/// `traffic.sidecar.istio.io/*` annotations.
fn init_container(annotations: &BTreeMap<String, String>, injection: &Injection) -> Container {
    Container {
        name: "istio-init".into(),
        image: Some(injection.proxy_image.clone()),
        args: Some(init_args(annotations)),
        // Writing iptables rules needs these two capabilities and root in
        // the pod's network namespace, nothing more.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        resources: Some(requests("10m", "10Mi")),
        ..Default::default()
    }
}

fn sidecar(injection: &Injection) -> Container {
    let mut container = proxy::container(
        "sidecar",
        injection.proxy_image.clone(),
        &injection.discovery_address,
        &[("http-envoy-prom", proxy::METRICS_PORT)],
    );
    container
        .env
        .get_or_insert_with(Vec::new)
        .push(proxy::env("REVISION", injection.revision.clone()));
    container
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(VolumeMount {
            name: "istio-envoy".into(),
            mount_path: "/etc/istio/proxy".into(),
            ..Default::default()
        });
    container.resources = Some(requests("100m", "128Mi"));
    container
}

fn requests(cpu: &str, memory: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(memory.into())),
        ])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn injection() -> Injection {
        Injection {
            revision: "default-v0-2-0".into(),
            discovery_address: "istiod-default-v0-2-0.istio-system.svc:15012".into(),
            proxy_image: "ghcr.io/bowline-mesh/proxy:0.2.0".into(),
        }
    }

    fn pod(extra: Value) -> Pod {
        let mut value = json!({
            "metadata": {
                "generateName": "reviews-v2-7d9f8-",
                "namespace": "shop",
                "labels": {"app": "reviews", "version": "v2", "pod-template-hash": "7d9f8"},
            },
            "spec": {"containers": [{"name": "reviews", "image": "registry.example/reviews:2", "ports": [{"containerPort": 9080}]}]},
        });
        json_patch::merge(&mut value, &extra);
        serde_json::from_value(value).unwrap()
    }

    /// The patch applied the way the API server applies it.
    fn injected(pod: &Pod) -> Pod {
        let patch = patch(pod, &injection()).unwrap().expect("a patch");
        let mut value = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut value, &patch).unwrap();
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_pod_gets_the_init_container_the_sidecar_and_the_marks() {
        let pod = injected(&pod(json!({})));
        let spec = pod.spec.unwrap();
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["reviews", "istio-proxy"]);
        let init = &spec.init_containers.unwrap()[0];
        assert_eq!(
            init.args.as_ref().unwrap().join(" "),
            "init -p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x  -b * -d 15090,15021,15020"
        );
        let sidecar = &spec.containers[1];
        assert_eq!(sidecar.args.as_deref(), Some(&["sidecar".to_string()][..]));
        let env: BTreeMap<String, Option<String>> = sidecar
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        assert_eq!(
            env["DISCOVERY_ADDRESS"].as_deref(),
            Some("istiod-default-v0-2-0.istio-system.svc:15012")
        );
        assert_eq!(env["REVISION"].as_deref(), Some("default-v0-2-0"));
        // The Deployment's name, without the ReplicaSet's hash.
        assert_eq!(
            env["ISTIO_META_WORKLOAD_NAME"].as_deref(),
            Some("reviews-v2")
        );
        let labels: BTreeMap<String, String> =
            serde_json::from_str(env["ISTIO_METAJSON_LABELS"].as_deref().unwrap()).unwrap();
        assert_eq!(labels["app"], "reviews");
        assert_eq!(labels["service.istio.io/canonical-revision"], "v2");
        assert_eq!(
            sidecar.security_context.as_ref().unwrap().run_as_user,
            Some(1337)
        );
        let volumes: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(volumes, ["istio-token", "istiod-ca-cert", "istio-envoy"]);

        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels["istio.io/rev"], "default-v0-2-0");
        assert_eq!(labels["security.istio.io/tlsMode"], "istio");
        assert_eq!(labels["service.istio.io/canonical-name"], "reviews");
        assert_eq!(labels["service.istio.io/canonical-revision"], "v2");
        let annotations = pod.metadata.annotations.unwrap();
        let status: Value = serde_json::from_str(&annotations[STATUS_ANNOTATION]).unwrap();
        assert_eq!(status["containers"], json!(["istio-proxy"]));
        assert_eq!(status["revision"], "default-v0-2-0");
        assert_eq!(
            annotations["kubectl.kubernetes.io/default-container"],
            "reviews"
        );
    }

    /// The app's probes go to the sidecar, which gets the original checks.
    #[test]
    fn probes_are_rewritten_to_the_sidecar() {
        let containers = json!({"spec": {"containers": [{
            "name": "reviews",
            "image": "registry.example/reviews:2",
            "ports": [{"name": "http", "containerPort": 9080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "timeoutSeconds": 2},
            "livenessProbe": {"tcpSocket": {"port": 9080}},
        }]}});
        let spec = injected(&pod(containers.clone())).spec.unwrap();
        let app = &spec.containers[0];
        let ready = app
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/app-health/reviews/readyz"));
        assert_eq!(ready.port, IntOrString::Int(15020));
        let live = app.liveness_probe.as_ref().unwrap();
        assert!(live.tcp_socket.is_none());
        assert_eq!(
            live.http_get.as_ref().unwrap().path.as_deref(),
            Some("/app-health/reviews/livez")
        );
        let probers = spec.containers[1]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "ISTIO_KUBE_APP_PROBERS")
            .and_then(|e| e.value.clone())
            .unwrap();
        let probers: Value = serde_json::from_str(&probers).unwrap();
        assert_eq!(
            probers["/app-health/reviews/readyz"],
            json!({"httpGet": {"path": "/ready", "port": 9080, "scheme": "HTTP", "httpHeaders": []},
                   "timeoutSeconds": 2})
        );
        assert_eq!(
            probers["/app-health/reviews/livez"],
            json!({"tcpSocket": {"port": 9080}, "timeoutSeconds": 1})
        );

        // Opted out: left alone.
        let mut opted_out = containers;
        opted_out["metadata"] =
            json!({"annotations": {"sidecar.istio.io/rewriteAppHTTPProbers": "false"}});
        let spec = injected(&pod(opted_out)).spec.unwrap();
        let ready = spec.containers[0].readiness_probe.as_ref().unwrap();
        assert_eq!(
            ready.http_get.as_ref().unwrap().path.as_deref(),
            Some("/ready")
        );
    }

    #[test]
    fn capture_follows_the_traffic_annotations() {
        let pod = injected(&pod(json!({"metadata": {"annotations": {
            "traffic.sidecar.istio.io/excludeInboundPorts": "9443",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8",
            "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
        }}})));
        let args = pod.spec.unwrap().init_containers.unwrap()[0]
            .args
            .clone()
            .unwrap()
            .join(" ");
        assert!(args.contains("-x 10.0.0.0/8"), "{args}");
        assert!(args.contains("-d 15090,15021,15020,9443"), "{args}");
        assert!(args.ends_with("-o 5432"), "{args}");
    }

    #[test]
    fn existing_init_containers_and_volumes_stay_first() {
        let pod = injected(&pod(json!({"spec": {
            "initContainers": [{"name": "migrate", "image": "registry.example/migrate:1"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }})));
        let spec = pod.spec.unwrap();
        let init: Vec<String> = spec
            .init_containers
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(init, ["migrate", "istio-init"]);
        assert_eq!(spec.volumes.unwrap()[0].name, "data");
    }

    #[test]
    fn injected_and_host_network_pods_are_left_alone() {
        let already = pod(json!({"metadata": {"annotations": {STATUS_ANNOTATION: "{}"}}}));
        assert!(patch(&already, &injection()).unwrap().is_none());
        let host = pod(json!({"spec": {"hostNetwork": true}}));
        assert!(patch(&host, &injection()).unwrap().is_none());
    }
}
