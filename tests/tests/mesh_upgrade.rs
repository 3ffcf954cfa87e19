//! A canary upgrade of the whole mesh under traffic, on a cluster of its
//! own: the demo installation (RevisionBased, workloads restarted Auto) goes
//! from v0.1.0 to v0.2.0 while a client outside the mesh calls the sample
//! app through the ingress gateway. The new revision takes over, the
//! workloads move to it, the old revision goes — and no request fails.

use std::time::Duration;

use anyhow::ensure;
use bowline_tests::mesh::{
    self, apply, cluster, config_dir, install, kubectl, namespace, pod, wait_available,
};
use serde_json::json;

/// The control-plane revision of each of the sample app's pods.
fn app_revisions(cluster: &bowline_tests::LocalCluster) -> anyhow::Result<String> {
    kubectl(
        cluster,
        &[
            "get",
            "pods",
            "-n",
            "demo",
            "-o",
            "jsonpath={.items[*].metadata.labels.istio\\.io/rev}",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_upgrade_fails_no_request() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    install(&cluster)?;
    let app = config_dir().join("samples/demo-app.yaml");
    kubectl(&cluster, &["apply", "-f", &app.display().to_string()])?;
    wait_available(&cluster, "demo")?;
    let before = app_revisions(&cluster)?;
    ensure!(
        before.split_whitespace().all(|r| r == "default-v0-1-0"),
        "the app starts on the first revision: {before}"
    );

    // A client outside the mesh, through the ingress gateway, every 20 ms
    // until stopped.
    apply(&cluster, &[namespace("callers", false)])?;
    mesh::start_gateway_caller(&cluster, "callers", "caller", "echo.example.com", "300s")?;
    kubectl(
        &cluster,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/caller",
            "-n",
            "callers",
            "--timeout=60s",
        ],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    mesh::upgrade_to(&cluster, "v0.2.0")?;
    // Done when only the new revision is left: every workload moved and the
    // old revision deleted after its grace period.
    mesh::wait_for_only_revision(&cluster, "default-v0-2-0").await?;
    let after = app_revisions(&cluster)?;
    ensure!(
        !after.trim().is_empty() && after.split_whitespace().all(|r| r == "default-v0-2-0"),
        "the app moved to the new revision: {after}"
    );
    let gateway = pod(&cluster, "istio-system", "app=istio-ingressgateway")?;
    ensure!(
        kubectl(
            &cluster,
            &[
                "get",
                "pod",
                &gateway,
                "-n",
                "istio-system",
                "-o",
                "jsonpath={.spec.containers[0].image}"
            ],
        )?
        .ends_with(":0.2.0"),
        "the gateway rolled to the new release"
    );

    // Stopped, the client reports what it saw.
    mesh::stop_caller(&cluster, "callers", "caller")?;
    let result =
        mesh::caller_result(&cluster, ("callers", "caller"), Duration::from_secs(30)).await?;
    let requests = result["requests"].as_u64().unwrap_or(0);
    ensure!(requests > 500, "traffic flowed throughout: {result}");
    ensure!(
        result["errors"] == json!({}) && result["statuses"] == json!({"200": requests}),
        "no request failed during the upgrade: {result}"
    );
    Ok(())
}
