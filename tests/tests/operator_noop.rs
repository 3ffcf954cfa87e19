//! A reconcile that has nothing to change sends no write request — not an
//! apply, not a status patch, not an Event — and reads from its caches, not
//! from the API server. Counted at the operator's own client, which sees
//! every request it makes.

use std::time::Duration;

use anyhow::ensure;
use bowline_api::install::MeshInstallation;
use bowline_tests::LocalCluster;
use bowline_tests::cluster::wait_until;
use bowline_tests::operator::{Operator, install_crds};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// Waits until `count` has not moved for `quiet`.
async fn settled(count: impl Fn() -> u64, quiet: Duration) {
    let mut last = count();
    loop {
        tokio::time::sleep(quiet).await;
        let now = count();
        if now == last {
            return;
        }
        last = now;
    }
}

#[tokio::test]
async fn a_no_op_reconcile_writes_nothing_and_reads_its_caches() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    let operator = Operator::start(cluster.config().await?, None)?;

    let api: Api<MeshInstallation> = Api::all(client.clone());
    let mesh: MeshInstallation = serde_json::from_value(json!({
        "apiVersion": "install.bowline.dev/v1alpha1",
        "kind": "MeshInstallation",
        "metadata": {"name": "noop"},
        "spec": {"version": "v0.1.0", "profile": "demo", "namespace": "noop"},
    }))?;
    api.create(&PostParams::default(), &mesh).await?;
    wait_until("the installation to be Ready", || async {
        let status = api.get("noop").await?.status.unwrap_or_default();
        Ok(status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await?;
    settled(
        || operator.writes() + operator.reconciles(),
        Duration::from_secs(2),
    )
    .await;
    ensure!(operator.writes() > 0, "the install itself wrote");

    // Touching the object (not its spec) triggers a reconcile that has
    // nothing to do.
    let (writes, reconciles) = (operator.writes(), operator.reconciles());
    let requests = operator.metrics.api_requests_total();
    api.patch(
        "noop",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"example.com/touched": "yes"}}})),
    )
    .await?;
    wait_until("a reconcile after the touch", || async {
        Ok(operator.reconciles() > reconciles)
    })
    .await?;
    settled(
        || operator.writes() + operator.reconciles(),
        Duration::from_secs(2),
    )
    .await;
    let all = operator.metrics.encode();
    ensure!(
        operator.writes() == writes,
        "{} write requests from a no-op reconcile; requests so far:\n{all}",
        operator.writes() - writes
    );
    let reconciled = operator.reconciles() - reconciles;
    let per_reconcile =
        (operator.metrics.api_requests_total() - requests) as f64 / reconciled as f64;
    // The one read left is the mesh namespace's (it is not cached).
    ensure!(
        per_reconcile <= 1.0,
        "{per_reconcile} requests per no-op reconcile over {reconciled}; requests so far:\n{all}"
    );
    Ok(())
}
