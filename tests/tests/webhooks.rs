//! The control plane's webhooks, registered with the real API server at
//! their loopback address with the CA's root as caBundle: a pod created in
//! a selected namespace comes back injected, and an invalid VirtualService
//! is refused with a message naming the field.

use std::time::Duration;

use anyhow::{Context, ensure};
use bowline_controlplane::ca::{self, Authority};
use bowline_controlplane::inject::{Injection, STATUS_ANNOTATION};
use bowline_controlplane::webhook::{self, Webhooks};
use bowline_tests::LocalCluster;
use bowline_tests::cluster::wait_until;
use bowline_tests::operator::install_crds;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::json;

#[tokio::test]
async fn pods_are_injected_and_invalid_config_is_refused() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    let namespace = cluster.test_namespace(&client, "webhooks").await?;

    // The webhook server, on loopback, with a certificate from the CA.
    let authority = Authority::self_signed("cluster.local", ca::DEFAULT_TTL)?;
    let (chain, key) = authority.serving_certificate(
        &["istiod.istio-system.svc".into()],
        &["127.0.0.1".parse()?],
        Duration::from_secs(3600),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let router = webhook::router(Webhooks {
        injection: Injection {
            revision: "default".into(),
            discovery_address: "istiod.istio-system.svc:15012".into(),
            proxy_image: "ghcr.io/bowline-mesh/proxy:0.1.0".into(),
        },
    });
    let server =
        tokio::spawn(async move { webhook::serve_tls(listener, &chain, &key, router).await });

    // Registered for this test's namespace only.
    let selector = json!({"matchLabels": {"kubernetes.io/metadata.name": namespace}});
    let client_config = |path: &str| {
        json!({
            "url": format!("https://{address}{path}"),
            "caBundle": ByteString(authority.root_pem().as_bytes().to_vec()),
        })
    };
    let name = format!("bowline-test-{namespace}");
    let mutating: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "sidecar-injector.bowline.test",
            "clientConfig": client_config("/inject"),
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": selector,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
        }],
    }))?;
    let validating: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "validation.bowline.test",
            "clientConfig": client_config("/validate"),
            "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": ["networking.istio.io", "security.istio.io"], "apiVersions": ["*"], "resources": ["*"]}],
            "namespaceSelector": selector,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
        }],
    }))?;
    let mutating_api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating_api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    mutating_api
        .create(&PostParams::default(), &mutating)
        .await?;
    validating_api
        .create(&PostParams::default(), &validating)
        .await?;

    let result = async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "reviews", "labels": {"app": "reviews", "version": "v1"}},
            "spec": {"containers": [{"name": "reviews", "image": "registry.example/reviews:1"}]},
        }))?;
        // The API server may take a moment to use a new configuration.
        let mut created = None;
        for _ in 0..20 {
            let pod = pods.create(&PostParams::default(), &pod).await?;
            if pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(STATUS_ANNOTATION)) {
                created = Some(pod);
                break;
            }
            pods.delete("reviews", &Default::default()).await?;
            wait_until("the uninjected pod to go", || async { Ok(pods.get_opt("reviews").await?.is_none()) }).await?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let pod = created.context("the pod came back injected")?;
        let spec = pod.spec.context("a spec")?;
        let containers: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        ensure!(containers == ["reviews", "istio-proxy"], "{containers:?}");
        ensure!(spec.init_containers.unwrap_or_default().iter().any(|c| c.name == "istio-init"));
        ensure!(pod.metadata.labels.unwrap_or_default().get("security.istio.io/tlsMode").map(String::as_str) == Some("istio"));

        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService"));
        let services: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
        let invalid: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "reviews"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20},
            ]}]},
        }))?;
        let refused = services
            .create(&PostParams::default(), &invalid)
            .await
            .err()
            .context("the invalid VirtualService is refused")?;
        let message = refused.to_string();
        ensure!(
            message.contains("VirtualService reviews is not valid: spec.http[0].route: the destinations' weights add up to 110; they must add up to 100"),
            "{message}"
        );
        let mut valid = invalid.clone();
        valid.data["spec"]["http"][0]["route"][1]["weight"] = json!(10);
        services.create(&PostParams::default(), &valid).await?;
        // An update is checked too.
        let patch = json!({"spec": {"http": [{"route": [{"destination": {"host": "reviews"}, "weight": 50}]}]}});
        let refused = services
            .patch("reviews", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .err()
            .context("the invalid update is refused")?;
        ensure!(refused.to_string().contains("weights add up to 50"), "{refused}");
        Ok::<_, anyhow::Error>(())
    }
    .await;

    mutating_api.delete(&name, &Default::default()).await?;
    validating_api.delete(&name, &Default::default()).await?;
    server.abort();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(&namespace, &Default::default()).await;
    result
}
