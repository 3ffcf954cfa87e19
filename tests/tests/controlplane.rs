//! The control plane as a whole on the local cluster, on loopback ports:
//! it keeps its CA in a Secret, gives its revision's webhook configurations
//! their caBundle (and turns validation to Fail), publishes the root,
//! reports ready, and the API server then injects pods through it.

use anyhow::{Context, ensure};
use bowline_tests::LocalCluster;
use bowline_tests::cluster::{create_namespace, free_port, wait_until};
use bowline_tests::controlplane::ControlPlane;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, PostParams};
use serde_json::json;

#[tokio::test]
async fn the_control_plane_serves_its_revision() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let mesh = cluster.test_namespace(&client, "cp").await?;
    let apps = format!("{mesh}-apps");
    let revision = format!("{mesh}-rev");
    // The webhooks' port is registered before the control plane starts.
    let webhook_port = free_port()?;

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

    let result = async {
        let _control_plane = ControlPlane::start_with_webhook_port(&client, &mesh, &revision, webhook_port).await?;
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
    let _ = mutating_api.delete(&name, &Default::default()).await;
    let _ = validating_api.delete(&validator, &Default::default()).await;
    result
}
