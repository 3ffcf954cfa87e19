//! The Istio-compatible API on a real API server: the CRDs are accepted,
//! every example under config/samples/istio/ applies with kubectl, each kind
//! is served as every version Istio serves it, and the schema refuses what
//! it can by field.

use anyhow::{Context, ensure};
use bowline_tests::LocalCluster;
use bowline_tests::operator::install_crds;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;

fn samples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples/istio")
}

#[tokio::test]
async fn istio_examples_apply_and_every_version_is_served() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    let namespace = cluster.test_namespace(&client, "istio-api").await?;

    let output = cluster
        .kubectl()
        .args(["apply", "--server-side", "-n", &namespace, "-f"])
        .arg(samples())
        .output()?;
    ensure!(
        output.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let applied = String::from_utf8(output.stdout)?;
    ensure!(
        applied.lines().count() == 18,
        "every example applied:\n{applied}"
    );

    let output = cluster
        .kubectl()
        .args([
            "get",
            "vs,dr,gw,se,sidecar,pa,ap,ra",
            "-n",
            &namespace,
            "--no-headers",
        ])
        .output()?;
    let listed = String::from_utf8(output.stdout)?;
    ensure!(listed.lines().count() == 18, "{listed}");

    // The same object through each served version.
    for (group, versions, kind, name) in [
        (
            "networking.istio.io",
            &["v1", "v1beta1", "v1alpha3"][..],
            "VirtualService",
            "reviews",
        ),
        (
            "networking.istio.io",
            &["v1", "v1beta1", "v1alpha3"][..],
            "DestinationRule",
            "httpbin",
        ),
        (
            "security.istio.io",
            &["v1", "v1beta1"][..],
            "AuthorizationPolicy",
            "payments",
        ),
    ] {
        let mut specs = Vec::new();
        for version in versions {
            let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &namespace, &resource);
            let object = api
                .get(name)
                .await
                .with_context(|| format!("{kind} {name} as {group}/{version}"))?;
            specs.push(object.data["spec"].clone());
        }
        ensure!(
            specs.windows(2).all(|pair| pair[0] == pair[1]),
            "{kind} {name} differs between versions: {specs:#?}"
        );
    }

    // A v1alpha3 manifest, as older Istio docs write them, applies too.
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "networking.istio.io",
        "v1alpha3",
        "DestinationRule",
    ));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let old: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "DestinationRule",
        "metadata": {"name": "ratings"},
        "spec": {"host": "ratings", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
    }))?;
    api.create(&PostParams::default(), &old).await?;

    // What the schema can say, it says by field.
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "DestinationRule",
        "metadata": {"name": "bad"},
        "spec": {"host": "ratings", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL_PLEASE"}}},
    }))?;
    let refused = api
        .create(&PostParams::default(), &bad)
        .await
        .err()
        .context("an unknown TLS mode is refused")?;
    let message = refused.to_string();
    ensure!(
        message.contains("spec.trafficPolicy.tls.mode") && message.contains("ISTIO_MUTUAL"),
        "{message}"
    );
    Ok(())
}
