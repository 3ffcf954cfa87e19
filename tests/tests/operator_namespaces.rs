//! An operator told which namespaces to watch (`--watch-namespaces`, the
//! chart's `watchNamespaces`) counts only their namespaces and injected
//! workloads as using a revision.
//!
//! Pods made here carry `sidecar.istio.io/inject: "false"` and what injection
//! would have left on them: the operator's injection webhooks are real and
//! nothing serves them on this machine.

use anyhow::ensure;
use bowline_api::install::MeshRevision;
use bowline_operator::controller::Options;
use bowline_tests::LocalCluster;
use bowline_tests::cluster::{create_namespace, wait_until};
use bowline_tests::operator::{Operator, create_mesh, injected_pod, install_crds, wait_ready};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

#[tokio::test]
async fn only_watched_namespaces_count_as_using_a_revision() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    let options = Options {
        watch_namespaces: vec!["shop".into()],
        ..Options::default()
    };
    let _operator = Operator::start_with(cluster.config().await?, None, options)?;

    let name = "watching";
    let meshes = create_mesh(
        &client,
        name,
        json!({"version": "v0.1.0", "profile": "minimal"}),
    )
    .await?;
    wait_ready(&meshes, name).await?;
    for namespace in ["shop", "elsewhere"] {
        create_namespace(&client, namespace, json!({"istio.io/rev": name})).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        for pod in ["a", "b"] {
            pods.create(
                &PostParams::default(),
                &serde_json::from_value(injected_pod(pod, name))?,
            )
            .await?;
        }
    }

    let revisions: Api<MeshRevision> = Api::all(client.clone());
    wait_until(
        "the revision to count the watched namespace's pods",
        || async {
            let status = revisions.get(name).await?.status.unwrap_or_default();
            Ok(status.workloads == 2)
        },
    )
    .await?;
    // Settled, and nothing from the namespace not watched.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let status = revisions.get(name).await?.status.unwrap_or_default();
    ensure!(status.workloads == 2, "{status:?}");
    ensure!(status.namespaces == ["shop"], "{status:?}");
    Ok(())
}
