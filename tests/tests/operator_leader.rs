//! Two operator instances with leader election: only the one holding the
//! Lease reconciles and writes.

use anyhow::ensure;
use bowline_api::install::MeshInstallation;
use bowline_tests::LocalCluster;
use bowline_tests::cluster::wait_until;
use bowline_tests::operator::{Leader, OPERATOR_NAMESPACE, Operator, install_crds, operator_token};
use kube::api::{Api, PostParams};
use serde_json::json;

#[tokio::test]
async fn only_the_leader_writes() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    let token = operator_token(cluster, &client).await?;
    let start = |identity: &str| {
        let leader = Leader {
            namespace: OPERATOR_NAMESPACE.into(),
            identity: identity.into(),
        };
        let config = cluster.config_with_token(&token);
        async move { anyhow::Ok(Operator::start(config.await?, Some(leader))?) }
    };
    let first = start("replica-a").await?;
    let second = start("replica-b").await?;

    let api: Api<MeshInstallation> = Api::all(client.clone());
    let mesh: MeshInstallation = serde_json::from_value(json!({
        "apiVersion": "install.bowline.dev/v1alpha1",
        "kind": "MeshInstallation",
        "metadata": {"name": "led"},
        "spec": {"version": "v0.1.0", "profile": "minimal", "namespace": "led"},
    }))?;
    api.create(&PostParams::default(), &mesh).await?;
    wait_until("the installation to be Ready", || async {
        let status = api.get("led").await?.status.unwrap_or_default();
        Ok(status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await?;

    let (leader, follower) = if first.writes() > 0 {
        (&first, &second)
    } else {
        (&second, &first)
    };
    ensure!(
        leader.writes() > 0 && leader.reconciles() > 0,
        "the leader installed the mesh"
    );
    ensure!(
        follower.writes() == 0 && follower.reconciles() == 0,
        "the follower stayed idle: {} writes, {} reconciles",
        follower.writes(),
        follower.reconciles()
    );
    Ok(())
}
