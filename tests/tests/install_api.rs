//! The MeshInstallation CRD on the real API server: what the schema and its
//! CEL rules refuse, with the message a user sees.

use anyhow::ensure;
use bowline_api::install::MeshInstallation;
use bowline_tests::LocalCluster;
use bowline_tests::operator::install_crds;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};

async fn client_with_crds() -> anyhow::Result<Client> {
    let client = LocalCluster::shared()?.client().await?;
    install_crds(&client).await?;
    Ok(client)
}

/// Untyped, so that the test can send what the Rust type would not allow.
fn mesh(name: &str, spec: Value) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "install.bowline.dev/v1alpha1",
        "kind": "MeshInstallation",
        "metadata": {"name": name},
        "spec": spec,
    }))?)
}

fn untyped(client: Client) -> Api<DynamicObject> {
    Api::all_with(client, &ApiResource::erase::<MeshInstallation>(&()))
}

/// Creates the object and returns the API server's refusal message.
async fn refused(api: &Api<DynamicObject>, object: &DynamicObject) -> anyhow::Result<String> {
    match api.create(&PostParams::default(), object).await {
        Err(kube::Error::Api(status)) => {
            ensure!(status.code == 422, "refused as invalid: {status:?}");
            Ok(status.message)
        }
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn schema_refuses_malformed_fields() -> anyhow::Result<()> {
    let api = untyped(client_with_crds().await?);

    let message = refused(&api, &mesh("1st-mesh", json!({"version": "v0.1.0"}))?).await?;
    ensure!(
        message.contains("is its control-plane revision"),
        "the name is checked: {message}"
    );

    let message = refused(&api, &mesh("bad-version", json!({"version": "latest"}))?).await?;
    ensure!(
        message.contains("spec.version"),
        "names the field: {message}"
    );

    let message = refused(
        &api,
        &mesh(
            "bad-profile",
            json!({"version": "v0.1.0", "profile": "huge"}),
        )?,
    )
    .await?;
    ensure!(
        message.contains("spec.profile") && message.contains("\"demo\""),
        "lists the profiles: {message}"
    );

    let message = refused(
        &api,
        &mesh(
            "twin-gateways",
            json!({"version": "v0.1.0", "components": {"ingressGateways": [{"name": "a"}, {"name": "a"}]}}),
        )?,
    )
    .await?;
    ensure!(
        message.contains("spec.components.ingressGateways") && message.contains("Duplicate value"),
        "duplicate gateway names: {message}"
    );
    Ok(())
}

#[tokio::test]
async fn cel_rules_refuse_what_the_schema_cannot_say() -> anyhow::Result<()> {
    let client = client_with_crds().await?;
    let api = untyped(client.clone());

    let message = refused(
        &api,
        &mesh(
            "shared-gateway-name",
            json!({"version": "v0.1.0", "components": {
                "ingressGateways": [{"name": "edge"}],
                "egressGateways": [{"name": "edge"}],
            }}),
        )?,
    )
    .await?;
    ensure!(
        message.contains("spec.components.egressGateways")
            && message.contains("gateway names must be unique across both lists"),
        "{message}"
    );

    let message = refused(
        &api,
        &mesh(
            "negative-grace",
            json!({"version": "v0.1.0", "updateStrategy": {"inactiveRevisionDeletionGracePeriodSeconds": -1}}),
        )?,
    )
    .await?;
    ensure!(message.contains("must be 0 or more"), "{message}");

    // The namespace is chosen at creation, then never changed.
    let api: Api<MeshInstallation> = Api::all(client);
    let created: MeshInstallation = serde_json::from_value(json!({
        "apiVersion": "install.bowline.dev/v1alpha1",
        "kind": "MeshInstallation",
        "metadata": {"name": "moving"},
        "spec": {"version": "v0.1.0", "namespace": "mesh-a"},
    }))?;
    let created = api.create(&PostParams::default(), &created).await?;
    let mut moved = created.clone();
    moved.spec.namespace = Some("mesh-b".into());
    match api.replace("moving", &PostParams::default(), &moved).await {
        Err(kube::Error::Api(status)) => ensure!(
            status
                .message
                .contains("spec.namespace is chosen when the MeshInstallation is created"),
            "{}",
            status.message
        ),
        other => anyhow::bail!("moving the namespace must be refused, got {other:?}"),
    }
    let mut dropped = created.clone();
    dropped.spec.namespace = None;
    match api
        .replace("moving", &PostParams::default(), &dropped)
        .await
    {
        Err(kube::Error::Api(status)) => ensure!(
            status
                .message
                .contains("spec.namespace is chosen when the MeshInstallation is created"),
            "{}",
            status.message
        ),
        other => anyhow::bail!("removing the namespace must be refused, got {other:?}"),
    }
    let mut relabelled = created;
    relabelled.spec.profile = Some(bowline_api::install::Profile::Minimal);
    api.replace("moving", &PostParams::default(), &relabelled)
        .await
        .map_err(|e| anyhow::anyhow!("other changes stay allowed: {e}"))?;
    Ok(())
}

#[tokio::test]
async fn revision_tags_are_checked_by_the_api_server() -> anyhow::Result<()> {
    use bowline_api::install::MeshRevisionTag;
    let client = client_with_crds().await?;
    let tags: Api<DynamicObject> =
        Api::all_with(client, &ApiResource::erase::<MeshRevisionTag>(&()));
    let tag = |name: &str, kind: &str| -> anyhow::Result<DynamicObject> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "install.bowline.dev/v1alpha1",
            "kind": "MeshRevisionTag",
            "metadata": {"name": name},
            "spec": {"targetRef": {"kind": kind, "name": "default"}},
        }))?)
    };
    let message = refused(&tags, &tag("prod-stable", "Deployment")?).await?;
    ensure!(message.contains("spec.targetRef.kind"), "{message}");
    let long = "t".repeat(64);
    let message = refused(&tags, &tag(&long, "MeshInstallation")?).await?;
    ensure!(
        message.contains("value of the istio.io/rev label"),
        "{message}"
    );
    tags.create(
        &PostParams::default(),
        &tag("prod-stable", "MeshInstallation")?,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_revision_cannot_move_to_another_namespace() -> anyhow::Result<()> {
    use bowline_api::install::MeshRevision;
    let client = client_with_crds().await?;
    let revisions: Api<DynamicObject> =
        Api::all_with(client, &ApiResource::erase::<MeshRevision>(&()));
    let revision = |namespace: &str| -> anyhow::Result<DynamicObject> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "install.bowline.dev/v1alpha1",
            "kind": "MeshRevision",
            "metadata": {"name": "mesh-v0-1-0"},
                        "spec": {"installation": "mesh", "version": "v0.1.0", "namespace": namespace,
                     "config": {"version": "v0.1.0", "profile": "minimal"}},
        }))?)
    };
    let created = revisions
        .create(&PostParams::default(), &revision("istio-system")?)
        .await?;
    let mut changed = revision("elsewhere")?;
    changed.metadata.resource_version = created.metadata.resource_version;
    match revisions
        .replace("mesh-v0-1-0", &PostParams::default(), &changed)
        .await
    {
        Err(kube::Error::Api(status)) => {
            ensure!(
                status
                    .message
                    .contains("belongs to one installation and namespace"),
                "{}",
                status.message
            )
        }
        other => anyhow::bail!("changing a revision must be refused, got {other:?}"),
    }
    Ok(())
}
