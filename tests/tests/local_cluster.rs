//! The local cluster is a real Kubernetes: each test here exercises a part of
//! the API server or the controllers that a fake could not imitate, and fails
//! if it is not really there.

use anyhow::{Context, ensure};
use bowline_tests::LocalCluster;
use bowline_tests::cluster::{wait_established, wait_until};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use serde_json::json;

async fn setup(test: &str) -> anyhow::Result<(&'static LocalCluster, Client, String)> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let namespace = cluster.test_namespace(&client, test).await?;
    Ok((cluster, client, namespace))
}

/// The message of an API error, or a failure if the call succeeded.
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> anyhow::Result<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => Ok(*status),
        other => anyhow::bail!("expected the API server to refuse, got {other:?}"),
    }
}

#[tokio::test]
async fn crd_schema_and_cel_rules_are_enforced() -> anyhow::Result<()> {
    let (_, client, namespace) = setup("crd").await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "widgets.tests.bowline.dev"},
        "spec": {
            "group": "tests.bowline.dev",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "required": ["minReplicas", "maxReplicas"],
                        "properties": {
                            "minReplicas": {"type": "integer", "minimum": 1},
                            "maxReplicas": {"type": "integer", "maximum": 10},
                            "size": {"type": "string", "enum": ["small", "large"]},
                        },
                        "x-kubernetes-validations": [{
                            "rule": "self.minReplicas <= self.maxReplicas",
                            "message": "minReplicas must not exceed maxReplicas",
                        }],
                    }},
                }},
            }],
        },
    }))?;
    crds.create(&PostParams::default(), &crd).await?;
    wait_established(&crds, "widgets.tests.bowline.dev").await?;

    let gvk = GroupVersionKind::gvk("tests.bowline.dev", "v1", "Widget");
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client, &namespace, &ApiResource::from_gvk(&gvk));
    let widget = |name: &str, spec: serde_json::Value| -> anyhow::Result<DynamicObject> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "tests.bowline.dev/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": spec,
        }))?)
    };
    let pp = PostParams::default();

    let status = api_error(
        widgets
            .create(
                &pp,
                &widget("too-many", json!({"minReplicas": 1, "maxReplicas": 20}))?,
            )
            .await,
    )?;
    ensure!(status.code == 422, "schema violation: {status:?}");
    ensure!(
        status.message.contains("spec.maxReplicas")
            && status
                .message
                .contains("should be less than or equal to 10"),
        "the schema's bound is named in {:?}",
        status.message
    );

    let status = api_error(
        widgets
            .create(
                &pp,
                &widget(
                    "bad-size",
                    json!({"minReplicas": 1, "maxReplicas": 2, "size": "huge"}),
                )?,
            )
            .await,
    )?;
    ensure!(
        status.message.contains("spec.size") && status.message.contains("supported values"),
        "the schema's enum is named in {:?}",
        status.message
    );

    let status = api_error(
        widgets
            .create(
                &pp,
                &widget("inverted", json!({"minReplicas": 5, "maxReplicas": 2}))?,
            )
            .await,
    )?;
    ensure!(
        status
            .message
            .contains("minReplicas must not exceed maxReplicas"),
        "the CEL rule's message is in {:?}",
        status.message
    );

    widgets
        .create(
            &pp,
            &widget("fine", json!({"minReplicas": 2, "maxReplicas": 5}))?,
        )
        .await
        .context("a valid Widget is accepted")?;
    Ok(())
}

#[tokio::test]
async fn deployment_becomes_available_and_is_garbage_collected() -> anyhow::Result<()> {
    let (_, client, namespace) = setup("deploy").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.example/web:1"}]},
            },
        },
    }))?;
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;

    wait_until("Deployment web to be Available with 2 replicas", || async {
        let status = deployments.get("web").await?.status.unwrap_or_default();
        let available = status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True");
        Ok(available && status.available_replicas == Some(2))
    })
    .await?;

    let selector = ListParams::default().labels("app=web");
    let listed = pods.list(&selector).await?;
    ensure!(
        listed.items.len() == 2,
        "two Pods, got {}",
        listed.items.len()
    );
    for pod in &listed.items {
        let spec = pod.spec.as_ref().context("pod spec")?;
        let status = pod.status.as_ref().context("pod status")?;
        let node = spec.node_name.as_deref().unwrap_or_default();
        ensure!(
            node.starts_with("kwok-node-"),
            "scheduled onto a kwok Node, got {node:?}"
        );
        ensure!(
            status.phase.as_deref() == Some("Running"),
            "Running: {status:?}"
        );
        ensure!(
            status.pod_ip.is_some(),
            "kwok gave the Pod an IP: {status:?}"
        );
        let ready = status
            .conditions
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ensure!(ready, "Pod Ready: {status:?}");
    }
    ensure!(
        !replica_sets.list(&selector).await?.items.is_empty(),
        "a ReplicaSet exists"
    );

    deployments
        .delete("web", &DeleteParams::background())
        .await?;
    wait_until(
        "the ReplicaSet and Pods of web to be garbage-collected",
        || async {
            Ok(replica_sets.list(&selector).await?.items.is_empty()
                && pods.list(&selector).await?.items.is_empty())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn service_account_tokens_authenticate_and_rbac_limits_them() -> anyhow::Result<()> {
    let (cluster, client, namespace) = setup("rbac").await?;
    let pp = PostParams::default();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    accounts
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "reader"}}))?,
        )
        .await?;
    Api::<Role>::namespaced(client.clone(), &namespace)
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": {"name": "configmap-reader"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
            }))?,
        )
        .await?;
    Api::<RoleBinding>::namespaced(client.clone(), &namespace)
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": {"name": "reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
            }))?,
        )
        .await?;

    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"], "expirationSeconds": 3600},
    }))?;
    let token = accounts
        .create_token_request("reader", &pp, &request)
        .await?
        .status
        .context("TokenRequest status")?
        .token;
    let username = format!("system:serviceaccount:{namespace}:reader");

    let as_reader = cluster.client_with_token(&token).await?;
    let review = Api::<SelfSubjectReview>::all(as_reader.clone())
        .create(&pp, &SelfSubjectReview::default())
        .await?;
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    ensure!(
        user.username.as_deref() == Some(username.as_str()),
        "the token authenticates as {username}, got {user:?}"
    );

    // RBAC is checked on every request: the bound Role allows this once the
    // binding is seen by the authorizer's cache, which can take a moment.
    let configmaps: Api<ConfigMap> = Api::namespaced(as_reader.clone(), &namespace);
    wait_until("the reader's RoleBinding to take effect", || async {
        Ok(configmaps.list(&ListParams::default()).await.is_ok())
    })
    .await?;
    let status = api_error(
        Api::<Secret>::namespaced(as_reader, &namespace)
            .list(&ListParams::default())
            .await,
    )?;
    ensure!(
        status.is_forbidden(),
        "secrets are outside the reader's Role: {status:?}"
    );
    ensure!(
        status.message.contains(&username),
        "the 403 names the user: {}",
        status.message
    );

    let review: TokenReview = serde_json::from_value(json!({"spec": {"token": token}}))?;
    let review = Api::<TokenReview>::all(client).create(&pp, &review).await?;
    let status = review.status.context("TokenReview status")?;
    ensure!(
        status.authenticated == Some(true),
        "TokenReview authenticates: {status:?}"
    );
    ensure!(
        status.user.and_then(|u| u.username).as_deref() == Some(username.as_str()),
        "TokenReview returns the ServiceAccount's username"
    );
    Ok(())
}

#[tokio::test]
async fn server_side_apply_reports_conflicts_between_managers() -> anyhow::Result<()> {
    let (_, client, namespace) = setup("ssa").await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let desired = |value: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "shared"},
            "data": {"color": value},
        })
    };

    configmaps
        .patch(
            "shared",
            &PatchParams::apply("alice"),
            &Patch::Apply(desired("blue")),
        )
        .await?;
    let status = api_error(
        configmaps
            .patch(
                "shared",
                &PatchParams::apply("bob"),
                &Patch::Apply(desired("green")),
            )
            .await,
    )?;
    ensure!(status.is_conflict(), "a conflict, got {status:?}");
    ensure!(
        status.message.contains("alice") && status.message.contains(".data.color"),
        "the conflict names the other manager and the field: {}",
        status.message
    );
    let current = configmaps.get("shared").await?;
    ensure!(
        current
            .data
            .unwrap_or_default()
            .get("color")
            .map(String::as_str)
            == Some("blue"),
        "the refused apply changed nothing"
    );

    configmaps
        .patch(
            "shared",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(desired("green")),
        )
        .await?;
    let current = configmaps.get("shared").await?;
    ensure!(
        current
            .data
            .unwrap_or_default()
            .get("color")
            .map(String::as_str)
            == Some("green"),
        "a forced apply takes the field over"
    );
    Ok(())
}

#[tokio::test]
async fn the_built_kubectl_lists_the_nodes() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let output = cluster
        .kubectl()
        .args(["get", "nodes", "--no-headers"])
        .output()?;
    ensure!(
        output.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout)?;
    let nodes: Vec<&str> = stdout.lines().collect();
    ensure!(nodes.len() == 3, "three Nodes:\n{stdout}");
    for line in nodes {
        let columns: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            columns.first().is_some_and(|n| n.starts_with("kwok-node-"))
                && columns.get(1) == Some(&"Ready"),
            "a Ready kwok Node: {line}"
        );
    }

    let output = cluster.kubectl().args(["version", "-o", "json"]).output()?;
    ensure!(
        output.status.success(),
        "kubectl version: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let version: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    for side in ["clientVersion", "serverVersion"] {
        ensure!(
            version[side]["gitVersion"] == "v1.33.13",
            "{side} is the pinned release: {version}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn pods_of_a_deleted_namespace_go_away() -> anyhow::Result<()> {
    // The namespace controller and kwok together finish what a kubelet would:
    // a namespace's deletion completes only when its Pods are gone.
    let (_, client, namespace) = setup("nsdel").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "lonely"},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_until("the Pod to run", || async {
        Ok(pods
            .get("lonely")
            .await?
            .status
            .and_then(|s| s.phase)
            .as_deref()
            == Some("Running"))
    })
    .await?;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await?;
    wait_until("the namespace to be deleted", || async {
        Ok(namespaces.get_opt(&namespace).await?.is_none())
    })
    .await?;
    Ok(())
}
