//! The operator on the local cluster: each profile installs and becomes
//! Ready, drift is put back, a switched-off addon is pruned, an invalid spec
//! stalls without tearing anything down, and deletion leaves nothing behind.
//!
//! One operator runs for the whole test binary; each test installs into its
//! own mesh namespace, so the installations do not meet.

use anyhow::{Context, ensure};
use bowline_api::install::{MeshInstallation, MeshInstallationStatus};
use bowline_tests::cluster::wait_until;
use bowline_tests::operator::{condition, create_mesh, shared, wait_ready};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// A Ready installation of `profile`, named and namespaced `name`.
async fn installed(name: &str, profile: &str) -> anyhow::Result<(Client, Api<MeshInstallation>)> {
    let client = shared()?.client().await?;
    let api = create_mesh(
        &client,
        name,
        json!({"version": "v0.1.0", "profile": profile}),
    )
    .await?;
    wait_ready(&api, name).await?;
    Ok((client, api))
}

fn deployment_names(status: &MeshInstallationStatus) -> Vec<String> {
    status.components.iter().map(|c| c.name.clone()).collect()
}

#[tokio::test]
async fn every_profile_installs_and_becomes_ready() -> anyhow::Result<()> {
    let cluster = shared()?;
    let client = cluster.client().await?;
    let expected: [(&str, &[&str]); 4] = [
        (
            "default",
            &["controlPlane", "ingressGateway/istio-ingressgateway"],
        ),
        ("minimal", &["controlPlane"]),
        ("empty", &[]),
        (
            "demo",
            &[
                "controlPlane",
                "ingressGateway/istio-ingressgateway",
                "egressGateway/istio-egressgateway",
                "addon/prometheus",
                "addon/grafana",
                "addon/jaeger",
                "addon/kiali",
            ],
        ),
    ];
    for (profile, components) in expected {
        let name = format!("profile-{profile}");
        let api = create_mesh(
            &client,
            &name,
            json!({"version": "v0.1.0", "profile": profile}),
        )
        .await?;
        let status = wait_ready(&api, &name).await?;
        ensure!(
            deployment_names(&status) == components,
            "{profile}: {:?}",
            status.components
        );
        ensure!(
            status.state.as_deref() == Some("Healthy"),
            "{profile}: {status:?}"
        );
        ensure!(
            status
                .resolved
                .as_ref()
                .and_then(|r| r.profile)
                .map(|p| p.as_str())
                == Some(profile),
            "the resolved configuration is in status"
        );
        let spec = api.get(&name).await?.spec;
        ensure!(
            spec.components.is_none() && spec.mesh_config.is_none(),
            "the operator never writes to spec"
        );
    }

    // The control plane of the default profile, as a user would look for it.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "profile-default");
    let istiod = deployments.get("istiod-profile-default").await?;
    let image = istiod
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers[0].image.clone());
    ensure!(
        image == Some(Some("ghcr.io/bowline-mesh/controlplane:0.1.0".into())),
        "{image:?}"
    );
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get("istio-sidecar-injector-profile-default")
        .await
        .context("the injection webhook")?;

    let output = cluster
        .kubectl()
        .args(["get", "meshinstallation", "profile-demo"])
        .output()?;
    let stdout = String::from_utf8(output.stdout)?;
    let header: Vec<&str> = stdout
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header
            == [
                "NAME",
                "VERSION",
                "REVISIONS",
                "READY",
                "INUSE",
                "ACTIVE",
                "STATUS",
                "AGE"
            ],
        "{stdout}"
    );
    let row: Vec<&str> = stdout
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        row[..7]
            == [
                "profile-demo",
                "v0.1.0",
                "1",
                "True",
                "0",
                "profile-demo",
                "Healthy"
            ],
        "{stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn drift_is_put_back() -> anyhow::Result<()> {
    let name = "drift";
    let (client, api) = installed(name, "minimal").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), name);
    let istiod = format!("istiod-{name}");

    let before = deployments.get(&istiod).await?.metadata.uid;
    deployments
        .delete(&istiod, &DeleteParams::default())
        .await?;
    wait_until("the deleted control plane to come back", || async {
        Ok(deployments
            .get_opt(&istiod)
            .await?
            .is_some_and(|d| d.metadata.uid != before))
    })
    .await?;

    deployments
        .patch(
            &istiod,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await?;
    wait_until(
        "the scaled control plane to return to 1 replica",
        || async {
            Ok(deployments
                .get(&istiod)
                .await?
                .spec
                .and_then(|s| s.replicas)
                == Some(1))
        },
    )
    .await?;
    wait_ready(&api, name).await?;
    Ok(())
}

#[tokio::test]
async fn switching_an_addon_off_prunes_it() -> anyhow::Result<()> {
    let cluster = shared()?;
    let client = cluster.client().await?;
    let name = "prune";
    let api = create_mesh(
        &client,
        name,
        json!({"version": "v0.1.0", "profile": "minimal", "addons": {"kiali": {"enabled": true}}}),
    )
    .await?;
    wait_ready(&api, name).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), name);
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    ensure!(deployments.get_opt("kiali").await?.is_some());
    ensure!(
        cluster_roles
            .get_opt(&format!("kiali-{name}"))
            .await?
            .is_some()
    );

    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"addons": {"kiali": {"enabled": false}}}})),
    )
    .await?;
    wait_until("kiali to be pruned", || async {
        Ok(deployments.get_opt("kiali").await?.is_none()
            && cluster_roles
                .get_opt(&format!("kiali-{name}"))
                .await?
                .is_none())
    })
    .await?;
    let status = wait_ready(&api, name).await?;
    ensure!(
        deployment_names(&status) == ["controlPlane"],
        "{:?}",
        status.components
    );
    ensure!(
        deployments
            .get_opt(&format!("istiod-{name}"))
            .await?
            .is_some(),
        "the rest stays"
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_spec_stalls_and_keeps_what_runs() -> anyhow::Result<()> {
    let name = "stalled";
    let (client, api) = installed(name, "minimal").await?;

    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"version": "v9.9.9"}})),
    )
    .await?;
    wait_until("the installation to be Stalled", || async {
        let status = api.get(name).await?.status.unwrap_or_default();
        Ok(condition(&status, "Stalled") == Some("True"))
    })
    .await?;
    let status = api.get_status(name).await?.status.unwrap_or_default();
    let stalled = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .context("Stalled")?;
    ensure!(
        stalled
            .message
            .starts_with("spec.version: v9.9.9 is not a release"),
        "names the field: {}",
        stalled.message
    );
    ensure!(status.state.as_deref() == Some("InvalidSpec"), "{status:?}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), name);
    ensure!(
        deployments
            .get_opt(&format!("istiod-{name}"))
            .await?
            .is_some(),
        "the running control plane stays"
    );

    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"version": "v0.1.0"}})),
    )
    .await?;
    let status = wait_ready(&api, name).await?;
    ensure!(condition(&status, "Stalled") == Some("False"), "{status:?}");
    Ok(())
}

#[tokio::test]
async fn a_second_installation_in_the_same_namespace_stalls() -> anyhow::Result<()> {
    let cluster = shared()?;
    let client = cluster.client().await?;
    let first = create_mesh(
        &client,
        "shared-ns",
        json!({"version": "v0.1.0", "profile": "empty"}),
    )
    .await?;
    wait_ready(&first, "shared-ns").await?;
    let second: MeshInstallation = serde_json::from_value(json!({
        "apiVersion": "install.bowline.dev/v1alpha1",
        "kind": "MeshInstallation",
        "metadata": {"name": "shared-ns-too"},
        "spec": {"version": "v0.1.0", "profile": "empty", "namespace": "shared-ns"},
    }))?;
    first.create(&PostParams::default(), &second).await?;
    wait_until("the second installation to be Stalled", || async {
        let status = first.get("shared-ns-too").await?.status.unwrap_or_default();
        Ok(status.conditions.iter().any(|c| {
            c.type_ == "Stalled"
                && c.status == "True"
                && c.message.contains(
                    "spec.namespace: shared-ns is already used by MeshInstallation shared-ns",
                )
        }))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn deletion_removes_everything_it_created() -> anyhow::Result<()> {
    let cluster = shared()?;
    let client = cluster.client().await?;
    let name = "deleted";
    let api = create_mesh(
        &client,
        name,
        json!({"version": "v0.1.0", "profile": "demo"}),
    )
    .await?;
    wait_ready(&api, name).await?;
    let selector = format!("install.bowline.dev/installation={name}");
    let lp = kube::api::ListParams::default().labels(&selector);
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let validators: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    ensure!(!cluster_roles.list(&lp).await?.items.is_empty());

    api.delete(name, &DeleteParams::default()).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    wait_until(
        "the installation and everything it made to be gone",
        || async {
            Ok(api.get_opt(name).await?.is_none()
                && cluster_roles.list(&lp).await?.items.is_empty()
                && validators.list(&lp).await?.items.is_empty()
                && namespaces
                    .get_opt(name)
                    .await?
                    .is_none_or(|ns| ns.metadata.deletion_timestamp.is_some()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn deletion_does_not_hang_when_the_namespace_is_already_going() -> anyhow::Result<()> {
    let name = "ns-gone";
    let (client, api) = installed(name, "minimal").await?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.delete(name, &DeleteParams::default()).await?;
    api.delete(name, &DeleteParams::default()).await?;
    wait_until("the installation to be deleted", || async {
        Ok(api.get_opt(name).await?.is_none())
    })
    .await?;
    let lp = kube::api::ListParams::default()
        .labels(&format!("install.bowline.dev/installation={name}"));
    ensure!(
        Api::<ClusterRole>::all(client)
            .list(&lp)
            .await?
            .items
            .is_empty(),
        "its cluster-scoped objects went too"
    );
    Ok(())
}

#[tokio::test]
async fn fields_the_control_plane_owns_are_left_alone() -> anyhow::Result<()> {
    let name = "webhooks";
    let (client, _) = installed(name, "minimal").await?;
    let validators: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let injectors: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validator_name = format!("istio-validator-{name}-{name}");
    let injector_name = format!("istio-sidecar-injector-{name}");

    let policies = |v: &ValidatingWebhookConfiguration| -> Vec<Option<String>> {
        v.webhooks
            .iter()
            .flatten()
            .map(|w| w.failure_policy.clone())
            .collect()
    };
    let created = validators.get(&validator_name).await?;
    ensure!(
        policies(&created)
            .iter()
            .all(|p| p.as_deref() == Some("Ignore")),
        "created with Ignore, so that config applies before the control plane serves: {:?}",
        policies(&created)
    );

    // What the control plane does once it serves: fill in the caBundle and
    // make validation strict.
    let mut validator = created.clone();
    // Without the operator's hash, the next reconcile applies the object
    // again rather than finding it as rendered.
    validator.metadata.annotations = None;
    for webhook in validator.webhooks.iter_mut().flatten() {
        webhook.failure_policy = Some("Fail".into());
        webhook.client_config.ca_bundle = Some(k8s_openapi::ByteString(b"bundle".to_vec()));
    }
    validators
        .replace(
            &validator_name,
            &PostParams {
                field_manager: Some("bowline-controlplane".into()),
                ..Default::default()
            },
            &validator,
        )
        .await?;
    let mut injector = injectors.get(&injector_name).await?;
    injector.metadata.annotations = None;
    for webhook in injector.webhooks.iter_mut().flatten() {
        webhook.client_config.ca_bundle = Some(k8s_openapi::ByteString(b"bundle".to_vec()));
    }
    injectors
        .replace(
            &injector_name,
            &PostParams {
                field_manager: Some("bowline-controlplane".into()),
                ..Default::default()
            },
            &injector,
        )
        .await?;

    // The change to the webhooks makes the operator apply them again.
    let hash = "install.bowline.dev/applied-hash";
    wait_until("the operator to apply the webhooks again", || async {
        Ok(validators
            .get(&validator_name)
            .await?
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(hash)
            && injectors
                .get(&injector_name)
                .await?
                .metadata
                .annotations
                .unwrap_or_default()
                .contains_key(hash))
    })
    .await?;
    let validator = validators.get(&validator_name).await?;
    ensure!(
        policies(&validator)
            .iter()
            .all(|p| p.as_deref() == Some("Fail")),
        "failurePolicy stays the control plane's: {:?}",
        policies(&validator)
    );
    let bundles = |hooks: Vec<Option<k8s_openapi::ByteString>>| {
        hooks
            .iter()
            .all(|b| b.as_ref().is_some_and(|b| b.0 == b"bundle"))
    };
    ensure!(
        bundles(
            validator
                .webhooks
                .iter()
                .flatten()
                .map(|w| w.client_config.ca_bundle.clone())
                .collect()
        ),
        "the validator's caBundle stays"
    );
    let injector = injectors.get(&injector_name).await?;
    ensure!(
        bundles(
            injector
                .webhooks
                .iter()
                .flatten()
                .map(|w| w.client_config.ca_bundle.clone())
                .collect()
        ),
        "the injector's caBundle stays"
    );
    Ok(())
}

#[tokio::test]
async fn a_revision_reports_what_uses_it() -> anyhow::Result<()> {
    use bowline_api::install::MeshRevision;
    use k8s_openapi::api::core::v1::Pod;

    let name = "used";
    let (client, _) = installed(name, "minimal").await?;
    let revisions: Api<MeshRevision> = Api::all(client.clone());
    let condition_of = |revision: &MeshRevision, type_: &str| {
        revision
            .status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .find(|c| c.type_ == type_)
            .map(|c| c.status.clone())
    };
    let waited = wait_until("the revision to be Ready and unused", || async {
        let revision = revisions.get_opt(name).await?;
        Ok(revision.is_some_and(|r| {
            condition_of(&r, "Ready").as_deref() == Some("True")
                && condition_of(&r, "InUse").as_deref() == Some("False")
        }))
    })
    .await;
    if let Err(e) = waited {
        let revision = revisions.get_opt(name).await;
        anyhow::bail!("{e}; the revision: {revision:#?}");
    }

    // A pod injected by the revision, and its namespace selecting it.
    //
    // The injection webhook is registered for real, and its Service has no
    // process behind it here: the API server would dial its ClusterIP, an
    // address outside this machine's loopback. So the pod is created with
    // what injection leaves on it and opted out of injection, and the
    // namespace is labelled only afterwards (the webhook acts on creation).
    let apps = "used-apps";
    bowline_tests::cluster::create_namespace(&client, apps, json!({})).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), apps);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(bowline_tests::operator::injected_pod("app", name))?,
    )
    .await?;
    namespaces
        .patch(
            apps,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio.io/rev": name}}})),
        )
        .await?;
    wait_until(
        "the revision to count the namespace and the pod",
        || async {
            let status = revisions.get(name).await?.status.unwrap_or_default();
            Ok(status.workloads == 1
                && status.namespaces == [apps]
                && status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "InUse" && c.status == "True"))
        },
    )
    .await?;
    let cluster = shared()?;
    let output = cluster
        .kubectl()
        .args(["get", "meshrevision", name, "--no-headers"])
        .output()?;
    let row = String::from_utf8(output.stdout)?;
    let columns: Vec<&str> = row.split_whitespace().collect();
    ensure!(
        columns[..6] == [name, name, "v0.1.0", "True", "True", "1"],
        "{row}"
    );

    // Nothing uses it any more.
    pods.delete("app", &DeleteParams::default().grace_period(0))
        .await?;
    namespaces
        .patch(
            apps,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio.io/rev": null}}})),
        )
        .await?;
    wait_until("the revision to be unused again", || async {
        let revision = revisions.get(name).await?;
        Ok(condition_of(&revision, "InUse").as_deref() == Some("False")
            && revision
                .status
                .is_some_and(|s| s.workloads == 0 && s.namespaces.is_empty()))
    })
    .await?;
    Ok(())
}
