//! Upgrades on the local cluster: a RevisionBased canary from v0.1.0 to
//! v0.2.0 with both control planes side by side, promotion held while the new
//! one is not Ready, tags following, pruning after the grace period; rollback;
//! InPlace; tags' conflicts and protection; automatic workload restarts in
//! batches, one of which fails.
//!
//! Pods and pod templates made here carry `sidecar.istio.io/inject: "false"`
//! and what injection would have left on them (the revision label and the
//! `sidecar.istio.io/status` annotation): the injection webhooks the operator
//! registers are real, and no process serves them on this machine, so no
//! object a webhook matches may be created (the API server would dial the
//! webhook Service's ClusterIP).

use anyhow::{Context, ensure};
use bowline_api::install::{
    MeshInstallation, MeshInstallationStatus, MeshRevision, MeshRevisionTag,
};
use bowline_tests::cluster::create_namespace;
use bowline_tests::cluster::wait_until;
use bowline_tests::operator::{self, condition, create_mesh, shared, wait_ready};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

async fn status(
    api: &Api<MeshInstallation>,
    name: &str,
) -> Result<MeshInstallationStatus, kube::Error> {
    Ok(api.get(name).await?.status.unwrap_or_default())
}

fn reason<'a>(status: &'a MeshInstallationStatus, type_: &str) -> (&'a str, &'a str) {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.reason.as_str(), c.message.as_str()))
        .unwrap_or_default()
}

async fn set_version(api: &Api<MeshInstallation>, name: &str, patch: Value) -> anyhow::Result<()> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": patch})),
    )
    .await?;
    Ok(())
}

/// The image of a Deployment's first container.
async fn image(deployments: &Api<Deployment>, name: &str) -> anyhow::Result<String> {
    let deployment = deployments.get(name).await?;
    Ok(deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.image)
        .unwrap_or_default())
}

/// The Service an injection webhook sends pods to.
async fn webhook_service(client: &Client, name: &str) -> Result<Option<String>, kube::Error> {
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    Ok(webhooks.get_opt(name).await?.and_then(|w| {
        w.webhooks?
            .first()?
            .client_config
            .service
            .as_ref()
            .map(|s| s.name.clone())
    }))
}

async fn injected_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    revision: &str,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(operator::injected_pod(name, revision))?,
    )
    .await?;
    Ok(())
}

async fn create_tag(client: &Client, name: &str, kind: &str, target: &str) -> anyhow::Result<()> {
    let tags: Api<MeshRevisionTag> = Api::all(client.clone());
    tags.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "install.bowline.dev/v1alpha1",
            "kind": "MeshRevisionTag",
            "metadata": {"name": name},
            "spec": {"targetRef": {"kind": kind, "name": target}},
        }))?,
    )
    .await?;
    Ok(())
}

/// Labels (or, with `None`, unlabels) the first Node.
async fn label_node(client: &Client, key: &str, value: Option<&str>) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .next()
        .context("a Node")?;
    let name = node.metadata.name.unwrap_or_default();
    nodes
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {key: value}}})),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_canary_waits_for_the_new_revision_then_moves_everything() -> anyhow::Result<()> {
    let name = "canary";
    let client = shared()?.client().await?;
    let api = create_mesh(
        &client,
        name,
        json!({
            "version": "v0.1.0",
            "profile": "default",
            "updateStrategy": {"type": "RevisionBased", "inactiveRevisionDeletionGracePeriodSeconds": 3},
        }),
    )
    .await?;
    let ready = wait_ready(&api, name).await?;
    ensure!(
        ready.active_revision.as_deref() == Some("canary-v0-1-0"),
        "{ready:#?}"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), name);
    let revisions: Api<MeshRevision> = Api::all(client.clone());
    ensure!(revisions.get_opt("canary-v0-1-0").await?.is_some());

    // A tag that follows the installation, selected by a namespace; a pod
    // injected by the first revision.
    create_tag(&client, "canary-stable", "MeshInstallation", name).await?;
    create_namespace(
        &client,
        "canary-apps",
        json!({"istio.io/rev": "canary-stable"}),
    )
    .await?;
    injected_pod(&client, "canary-apps", "app", "canary-v0-1-0").await?;
    let tags: Api<MeshRevisionTag> = Api::all(client.clone());
    wait_until("the tag to point at the first revision", || async {
        let tag = tags.get("canary-stable").await?;
        Ok(
            tag.status.and_then(|s| s.revision).as_deref() == Some("canary-v0-1-0")
                && webhook_service(&client, "istio-revision-tag-canary-stable")
                    .await?
                    .as_deref()
                    == Some("istiod-canary-v0-1-0"),
        )
    })
    .await?;

    // v0.2.0, whose control plane cannot be scheduled yet.
    let key = "bowline.dev/canary-test";
    set_version(
        &api,
        name,
        json!({"version": "v0.2.0", "components": {"controlPlane": {"nodeSelector": {key: "ready"}}}}),
    )
    .await?;
    wait_until("the new revision to wait beside the old one", || async {
        let status = status(&api, name).await?;
        Ok(reason(&status, "Reconciling").0 == "WaitingForRevision"
            && deployments.get_opt("istiod-canary-v0-2-0").await?.is_some())
    })
    .await?;
    let waiting = status(&api, name).await?;
    let (_, message) = reason(&waiting, "Reconciling");
    ensure!(
        message.starts_with("revision canary-v0-2-0 is not Ready yet (controlPlane: ")
            && message.ends_with("revision canary-v0-1-0 stays active until it is"),
        "{message}"
    );
    ensure!(waiting.active_revision.as_deref() == Some("canary-v0-1-0"));
    ensure!(waiting.version.as_deref() == Some("v0.1.0"), "{waiting:#?}");
    ensure!(condition(&waiting, "Ready") == Some("False"));
    ensure!(
        deployments.get_opt("istiod-canary-v0-1-0").await?.is_some(),
        "the old control plane runs on"
    );
    ensure!(
        image(&deployments, "istio-ingressgateway").await? == "ghcr.io/bowline-mesh/proxy:0.1.0",
        "gateways stay on the active revision"
    );
    ensure!(
        tags.get("canary-stable")
            .await?
            .status
            .and_then(|s| s.revision)
            .as_deref()
            == Some("canary-v0-1-0"),
        "the tag stays"
    );
    ensure!(
        webhook_service(&client, "istio-sidecar-injector-canary-v0-2-0")
            .await?
            .as_deref()
            == Some("istiod-canary-v0-2-0"),
        "the new revision has its own injection webhook"
    );

    // Its control plane can run now: promotion.
    label_node(&client, key, Some("ready")).await?;
    let promoted = async {
        let promoted = wait_ready(&api, name).await?;
        ensure!(
            promoted.active_revision.as_deref() == Some("canary-v0-2-0"),
            "{promoted:#?}"
        );
        ensure!(promoted.version.as_deref() == Some("v0.2.0"));
        wait_until("the tag to follow", || async {
            let tag = tags.get("canary-stable").await?;
            Ok(
                tag.status.and_then(|s| s.revision).as_deref() == Some("canary-v0-2-0")
                    && webhook_service(&client, "istio-revision-tag-canary-stable")
                        .await?
                        .as_deref()
                        == Some("istiod-canary-v0-2-0"),
            )
        })
        .await?;
        let gateway = deployments.get("istio-ingressgateway").await?;
        ensure!(
            image(&deployments, "istio-ingressgateway").await?
                == "ghcr.io/bowline-mesh/proxy:0.2.0"
        );
        let rolling = gateway
            .spec
            .and_then(|s| s.strategy)
            .and_then(|s| s.rolling_update)
            .context("the gateway rolls")?;
        ensure!(
            rolling.max_unavailable
                == Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0)),
            "never below the wanted replicas: {rolling:?}"
        );

        // The old revision stays: a pod still runs its proxy.
        let status = status(&api, name).await?;
        let revisions_status = status.revisions.clone().context("revisions")?;
        ensure!(
            revisions_status.total == 2 && revisions_status.in_use == 2,
            "{revisions_status:#?}"
        );
        ensure!(
            revisions_status.items[0].name == "canary-v0-2-0",
            "the active one first"
        );
        let (reason_, message) = reason(&status, "WorkloadsUpdated");
        ensure!(reason_ == "WorkloadsOnOldRevision", "{reason_}: {message}");
        ensure!(
            message.starts_with(
                "1 workloads still on older revisions: 1 on v0.1.0 (revision canary-v0-1-0)"
            ),
            "{message}"
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    label_node(&client, key, None).await?;
    promoted?;

    // The pod goes: after the grace period, so does the old revision.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "canary-apps");
    pods.delete("app", &DeleteParams::default().grace_period(0))
        .await?;
    wait_until(
        "the old revision to be deleted after its grace period",
        || async {
            Ok(revisions.get_opt("canary-v0-1-0").await?.is_none()
                && deployments.get_opt("istiod-canary-v0-1-0").await?.is_none()
                && webhook_service(&client, "istio-sidecar-injector-canary-v0-1-0")
                    .await?
                    .is_none())
        },
    )
    .await?;
    // The reconcile that prunes writes its status after the deletions: in
    // between, the status still counts the old revision.
    wait_until("the status to show one revision", || async {
        let settled = status(&api, name).await?;
        Ok(settled.revisions.as_ref().is_some_and(|r| r.total == 1))
    })
    .await?;
    let settled = status(&api, name).await?;
    ensure!(reason(&settled, "WorkloadsUpdated").0 == "WorkloadsOnActiveRevision");

    tags.delete("canary-stable", &DeleteParams::default())
        .await?;
    api.delete(name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn rolling_back_to_a_running_revision_is_immediate() -> anyhow::Result<()> {
    let name = "rollback";
    let client = shared()?.client().await?;
    let api = create_mesh(
        &client,
        name,
        json!({
            "version": "v0.1.0",
            "profile": "minimal",
            "updateStrategy": {"type": "RevisionBased", "inactiveRevisionDeletionGracePeriodSeconds": 600},
        }),
    )
    .await?;
    wait_ready(&api, name).await?;
    set_version(&api, name, json!({"version": "v0.2.0"})).await?;
    wait_until("v0.2.0 to be active", || async {
        Ok(status(&api, name).await?.active_revision.as_deref() == Some("rollback-v0-2-0"))
    })
    .await?;

    set_version(&api, name, json!({"version": "v0.1.0"})).await?;
    let back = wait_ready(&api, name).await?;
    ensure!(
        back.active_revision.as_deref() == Some("rollback-v0-1-0"),
        "{back:#?}"
    );
    ensure!(back.version.as_deref() == Some("v0.1.0"));
    let revisions: Api<MeshRevision> = Api::all(client.clone());
    let mut names: Vec<String> = revisions
        .list(&ListParams::default().labels(&format!("install.bowline.dev/installation={name}")))
        .await?
        .items
        .into_iter()
        .filter_map(|r| r.metadata.name)
        .collect();
    names.sort();
    ensure!(
        names == ["rollback-v0-1-0", "rollback-v0-2-0"],
        "no new revision: {names:?}"
    );

    // A tag pinned to the inactive revision keeps it in use and points at it.
    create_tag(
        &client,
        "rollback-pinned",
        "MeshRevision",
        "rollback-v0-2-0",
    )
    .await?;
    wait_until("the pinned tag to hold its revision", || async {
        let revision = revisions
            .get("rollback-v0-2-0")
            .await?
            .status
            .unwrap_or_default();
        Ok(revision.tags == ["rollback-pinned"]
            && revision
                .conditions
                .iter()
                .any(|c| c.type_ == "InUse" && c.status == "True")
            && webhook_service(&client, "istio-revision-tag-rollback-pinned")
                .await?
                .as_deref()
                == Some("istiod-rollback-v0-2-0"))
    })
    .await?;
    let tags: Api<MeshRevisionTag> = Api::all(client.clone());
    tags.delete("rollback-pinned", &DeleteParams::default())
        .await?;
    api.delete(name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn an_in_place_upgrade_rolls_the_one_revision() -> anyhow::Result<()> {
    let name = "inplace";
    let client = shared()?.client().await?;
    let api = create_mesh(
        &client,
        name,
        json!({"version": "v0.1.0", "profile": "minimal"}),
    )
    .await?;
    wait_ready(&api, name).await?;
    set_version(&api, name, json!({"version": "v0.2.0"})).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), name);
    wait_until("the control plane to run v0.2.0", || async {
        let status = status(&api, name).await?;
        Ok(status.version.as_deref() == Some("v0.2.0")
            && condition(&status, "Ready") == Some("True"))
    })
    .await?;
    ensure!(
        image(&deployments, "istiod-inplace").await? == "ghcr.io/bowline-mesh/controlplane:0.2.0"
    );
    let revisions: Api<MeshRevision> = Api::all(client.clone());
    let revision = revisions.get(name).await?;
    ensure!(revision.spec.version == "v0.2.0");
    let all = revisions
        .list(&ListParams::default().labels(&format!("install.bowline.dev/installation={name}")))
        .await?;
    ensure!(all.items.len() == 1, "one revision, updated in place");
    api.delete(name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn tags_refuse_conflicts_and_are_kept_while_namespaces_use_them() -> anyhow::Result<()> {
    let name = "tagged";
    let client = shared()?.client().await?;
    let api = create_mesh(
        &client,
        name,
        json!({"version": "v0.1.0", "profile": "minimal"}),
    )
    .await?;
    wait_ready(&api, name).await?;
    let tags: Api<MeshRevisionTag> = Api::all(client.clone());

    // A tag named like a revision would fight it for `istio.io/rev=tagged`.
    create_tag(&client, "tagged", "MeshInstallation", name).await?;
    wait_until("the clashing tag to stall", || async {
        let status = tags.get("tagged").await?.status.unwrap_or_default();
        Ok(status
            .conditions
            .iter()
            .any(|c| c.type_ == "Stalled" && c.status == "True" && c.reason == "Conflict"))
    })
    .await?;
    ensure!(
        webhook_service(&client, "istio-revision-tag-tagged")
            .await?
            .is_none()
    );
    tags.delete("tagged", &DeleteParams::default()).await?;

    // The tag named default also takes istio-injection=enabled and the
    // validation of unlabelled Istio config, as Istio's does.
    create_tag(&client, "default", "MeshInstallation", name).await?;
    let validators: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    wait_until("the default tag's webhooks", || async {
        let validator = validators.get_opt("istiod-default-validator").await?;
        let injector = webhook_service(&client, "istio-revision-tag-default").await?;
        Ok(injector.as_deref() == Some("istiod-tagged")
            && validator.is_some_and(|v| {
                v.webhooks.iter().flatten().all(|w| {
                    w.client_config.service.as_ref().map(|s| s.name.as_str())
                        == Some("istiod-tagged")
                        && w.failure_policy.as_deref() == Some("Ignore")
                })
            }))
    })
    .await?;
    let injector: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let selects_injection_enabled = injector
        .get("istio-revision-tag-default")
        .await?
        .webhooks
        .iter()
        .flatten()
        .filter_map(|w| w.namespace_selector.as_ref())
        .flat_map(|s| s.match_expressions.iter().flatten())
        .any(|e| {
            e.key == "istio-injection" && e.values.as_deref() == Some(&["enabled".to_string()][..])
        });
    ensure!(
        selects_injection_enabled,
        "the default tag answers istio-injection=enabled"
    );
    tags.delete("default", &DeleteParams::default()).await?;
    wait_until("the default tag's webhooks to go", || async {
        Ok(validators
            .get_opt("istiod-default-validator")
            .await?
            .is_none()
            && webhook_service(&client, "istio-revision-tag-default")
                .await?
                .is_none())
    })
    .await?;

    // A tag in use by a namespace is kept until the namespace lets go.
    create_tag(&client, "tagged-prod", "MeshInstallation", name).await?;
    create_namespace(
        &client,
        "tagged-apps",
        json!({"istio.io/rev": "tagged-prod"}),
    )
    .await?;
    let revisions: Api<MeshRevision> = Api::all(client.clone());
    wait_until("the tag and its revision to be in use", || async {
        let tag = tags.get("tagged-prod").await?.status.unwrap_or_default();
        let revision = revisions.get(name).await?.status.unwrap_or_default();
        Ok(tag.namespaces == ["tagged-apps"]
            && tag
                .conditions
                .iter()
                .any(|c| c.type_ == "InUse" && c.status == "True")
            && revision.tags == ["tagged-prod"]
            && revision.namespaces == ["tagged-apps"])
    })
    .await?;
    ensure!(
        webhook_service(&client, "istio-revision-tag-tagged-prod")
            .await?
            .as_deref()
            == Some("istiod-tagged")
    );
    tags.delete("tagged-prod", &DeleteParams::default()).await?;
    // Still there a moment later, its webhook too (a short wait for the
    // operator's look at it, not a timing assertion).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let kept = tags.get("tagged-prod").await?;
    ensure!(kept.metadata.deletion_timestamp.is_some(), "being deleted");
    ensure!(
        webhook_service(&client, "istio-revision-tag-tagged-prod")
            .await?
            .is_some(),
        "injection keeps working"
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            "tagged-apps",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio.io/rev": null}}})),
        )
        .await?;
    wait_until("the tag and its webhook to go", || async {
        Ok(tags.get_opt("tagged-prod").await?.is_none()
            && webhook_service(&client, "istio-revision-tag-tagged-prod")
                .await?
                .is_none())
    })
    .await?;

    // Another installation whose revision would have the same name.
    let owner = "owner";
    let first = create_mesh(
        &client,
        owner,
        json!({"version": "v0.1.0", "profile": "minimal", "updateStrategy": {"type": "RevisionBased"}}),
    )
    .await?;
    wait_ready(&first, owner).await?;
    let clash = "owner-v0-1-0";
    create_mesh(
        &client,
        clash,
        json!({"version": "v0.1.0", "profile": "minimal"}),
    )
    .await?;
    wait_until("the second owner of a revision name to stall", || async {
        let status = status(&api, clash).await?;
        Ok(condition(&status, "Stalled") == Some("True"))
    })
    .await?;
    let stalled = status(&api, clash).await?;
    let (_, message) = reason(&stalled, "Stalled");
    ensure!(
        message.starts_with(
            "spec.version: the revision owner-v0-1-0 belongs to MeshInstallation owner"
        ),
        "{message}"
    );
    ensure!(
        revisions.get("owner-v0-1-0").await?.spec.installation == owner,
        "the revision stays its first owner's"
    );
    for mesh in [clash, owner, name] {
        api.delete(mesh, &DeleteParams::default()).await?;
    }
    Ok(())
}

/// A Deployment whose pods look injected by `revision`, placed by
/// `node_selector` if given.
async fn injected_deployment(
    client: &Client,
    namespace: &str,
    name: &str,
    revision: &str,
    node_selector: Option<(&str, &str)>,
) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let mut deployment = operator::injected_deployment(name, revision);
    if let Some((key, value)) = node_selector {
        deployment["spec"]["template"]["spec"]["nodeSelector"] = json!({key: value});
    }
    deployments
        .create(&PostParams::default(), &serde_json::from_value(deployment)?)
        .await?;
    Ok(())
}

fn restarted_at(deployment: &Deployment) -> Option<String> {
    deployment
        .spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get("kubectl.kubernetes.io/restartedAt")
        .cloned()
}

#[tokio::test]
async fn auto_restarts_move_workloads_in_batches_and_stop_at_a_failing_one() -> anyhow::Result<()> {
    let name = "moves";
    let client = shared()?.client().await?;
    let api = create_mesh(
        &client,
        name,
        json!({
            "version": "v0.1.0",
            "profile": "minimal",
            "updateStrategy": {
                "type": "RevisionBased",
                "inactiveRevisionDeletionGracePeriodSeconds": 600,
                "workloads": {"restart": "Auto", "batchSize": 2, "pauseBetweenBatches": "1s", "batchTimeout": "15s"},
            },
        }),
    )
    .await?;
    wait_ready(&api, name).await?;
    let apps = "moves-apps";
    create_namespace(&client, apps, json!({})).await?;
    let key = "bowline.dev/moves-test";
    label_node(&client, key, Some("yes")).await?;
    let result =
        async {
            for app in ["a", "b", "c"] {
                injected_deployment(&client, apps, app, "moves-v0-1-0", None).await?;
            }
            // `d` runs now, but once restarted its new pod has nowhere to go.
            injected_deployment(&client, apps, "d", "moves-v0-1-0", Some((key, "yes"))).await?;
            let deployments: Api<Deployment> = Api::namespaced(client.clone(), apps);
            wait_until("the apps to be available", || async {
                let mut all = true;
                for app in ["a", "b", "c", "d"] {
                    let d = deployments.get(app).await?;
                    all &= bowline_operator::status::rollout(&d).complete;
                }
                Ok(all)
            })
            .await?;
            label_node(&client, key, None).await?;

            set_version(&api, name, json!({"version": "v0.2.0"})).await?;
            let stopped = wait_until("the restarts to stop at d", || async {
                let status = status(&api, name).await?;
                Ok(status.workload_restart.is_some_and(|r| r.failed.is_some()))
            })
            .await;
            if let Err(e) = stopped {
                let status = status(&api, name).await?;
                anyhow::bail!(
                    "{e}: {:#?} {:#?}",
                    status.workload_restart,
                    status.conditions
                );
            }
            let status = status(&api, name).await?;
            let restart = status.workload_restart.clone().context("restart status")?;
            ensure!(
                restart.revision == "moves-v0-2-0" && restart.restarted == 4,
                "{restart:#?}"
            );
            ensure!(
                restart.failed.as_deref().is_some_and(|f| f
                    .starts_with("Deployment moves-apps/d did not become Available within 15s")),
                "{restart:#?}"
            );
            let (reason_, message) = reason(&status, "WorkloadsUpdated");
            ensure!(
                reason_ == "RestartFailed" && message.contains("moves-apps/d"),
                "{message}"
            );

            let mut at = Vec::new();
            for app in ["a", "b", "c", "d"] {
                at.push(
                    restarted_at(&deployments.get(app).await?)
                        .with_context(|| format!("{app} restarted"))?,
                );
            }
            ensure!(
                at[0] == at[1] && at[2] == at[3] && at[0] != at[2],
                "two batches of two: {at:?}"
            );
            let first: k8s_openapi::jiff::Timestamp = at[0].parse()?;
            let second: k8s_openapi::jiff::Timestamp = at[2].parse()?;
            ensure!(
                second.duration_since(first) >= k8s_openapi::jiff::SignedDuration::from_secs(1),
                "the pause between batches: {at:?}"
            );
            Ok::<_, anyhow::Error>(())
        }
        .await;
    label_node(&client, key, None).await?;
    result?;
    api.delete(name, &DeleteParams::default()).await?;
    Ok(())
}
