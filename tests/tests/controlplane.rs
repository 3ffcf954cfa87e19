//! The control plane as a whole on the local cluster, on loopback ports:
//! it keeps its CA in a Secret, gives its revision's webhook configurations
//! their caBundle (and turns validation to Fail), publishes the root,
//! reports ready, and the API server then injects pods through it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use bowline_controlplane::server::{self, Settings};
use bowline_tests::LocalCluster;
use bowline_tests::cluster::{create_namespace, free_port, wait_until};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, PostParams};
use serde_json::json;

fn loopback(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Whether `/ready` answers 200: one plain HTTP/1.0 request.
async fn ready(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(loopback(port)).await else {
        return false;
    };
    let mut response = String::new();
    stream
        .write_all(b"GET /ready HTTP/1.0\r\n\r\n")
        .await
        .is_ok()
        && stream.read_to_string(&mut response).await.is_ok()
        && response.split_whitespace().nth(1) == Some("200")
}

#[tokio::test]
async fn the_control_plane_serves_its_revision() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let mesh = cluster.test_namespace(&client, "cp").await?;
    let apps = format!("{mesh}-apps");
    let revision = format!("{mesh}-rev");
    let (webhook_port, ca_port, monitoring_port) = (free_port()?, free_port()?, free_port()?);

    // The revision's webhook configurations as the operator renders them:
    // no caBundle, validation failing open until the control plane serves.
    let labels = json!({"istio.io/rev": revision});
    let selector = json!({"matchLabels": {"kubernetes.io/metadata.name": apps}});
    let rules = json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]);
    let name = format!("istio-sidecar-injector-{revision}");
    let mutating_api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    mutating_api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels},
                "webhooks": [{
                    "name": "rev.namespace.sidecar-injector.istio.io",
                    "clientConfig": {"url": format!("https://127.0.0.1:{webhook_port}/inject")},
                    "rules": rules,
                    "namespaceSelector": selector,
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "failurePolicy": "Fail",
                }],
            }))?,
        )
        .await?;
    let validating_api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let validator = format!("istio-validator-{revision}");
    validating_api
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": {"name": validator, "labels": labels},
            "webhooks": [{
                "name": "rev.validation.istio.io",
                "clientConfig": {"url": format!("https://127.0.0.1:{webhook_port}/validate")},
                "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": ["networking.istio.io"], "apiVersions": ["*"], "resources": ["*"]}],
                "objectSelector": {"matchLabels": {"istio.io/rev": revision}},
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "failurePolicy": "Ignore",
            }],
        }))?)
        .await?;

    let settings = Settings {
        revision: revision.clone(),
        namespace: mesh.clone(),
        service: format!("istiod-{revision}.{mesh}.svc"),
        proxy_image: "ghcr.io/bowline-mesh/proxy:0.1.0".into(),
        trust_domain: "cluster.local".into(),
        max_ttl: Duration::from_secs(24 * 3600),
        ca_address: loopback(ca_port),
        webhook_address: loopback(webhook_port),
        monitoring_address: loopback(monitoring_port),
    };
    let control_plane = tokio::spawn(server::run(client.clone(), settings));

    let result = async {
        wait_until("the control plane to report ready", || async {
            Ok(ready(monitoring_port).await)
        })
        .await?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &mesh);
        let kept = secrets.get("istio-ca-secret").await.context("the CA is kept")?;
        let root = kept.data.unwrap_or_default().get("root-cert.pem").cloned().context("a root")?;

        wait_until("the caBundles and fail-closed validation", || async {
            let mutating = mutating_api.get(&name).await?;
            let validating = validating_api.get(&validator).await?;
            let injector_ok = mutating.webhooks.iter().flatten().all(|w| w.client_config.ca_bundle.as_ref() == Some(&root));
            let validator_ok = validating.webhooks.iter().flatten().all(|w| {
                w.client_config.ca_bundle.as_ref() == Some(&root) && w.failure_policy.as_deref() == Some("Fail")
            });
            Ok(injector_ok && validator_ok)
        })
        .await?;

        create_namespace(&client, &apps, json!({})).await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &apps);
        wait_until("the root in the apps namespace", || async {
            Ok(config_maps.get_opt("istio-ca-root-cert").await?.is_some())
        })
        .await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &apps);
        let pod = pods
            .create(&PostParams::default(), &serde_json::from_value(json!({
                "metadata": {"name": "ratings", "labels": {"app": "ratings"}},
                "spec": {"containers": [{"name": "ratings", "image": "registry.example/ratings:1"}]},
            }))?)
            .await?;
        let containers: Vec<String> = pod.spec.context("a spec")?.containers.into_iter().map(|c| c.name).collect();
        ensure!(containers == ["ratings", "istio-proxy"], "injected through the caBundle: {containers:?}");
        ensure!(
            pod.metadata.labels.unwrap_or_default().get("istio.io/rev") == Some(&revision),
            "labelled with the revision"
        );
        let _ = namespaces.delete(&apps, &Default::default()).await;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    control_plane.abort();
    let _ = mutating_api.delete(&name, &Default::default()).await;
    let _ = validating_api.delete(&validator, &Default::default()).await;
    result
}
