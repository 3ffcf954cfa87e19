//! A real Envoy as a sidecar of a workload on the local cluster, with all
//! its configuration from the control plane over ADS (delta, and state of
//! the world): it accepts
//! every resource (its `update_success` counters move, no
//! `update_rejected` does, and the control plane counts no NACK), and it
//! routes real requests on loopback as the VirtualService says — 90/10
//! between two subsets, measured over 1,000 requests sent with curl.

use std::time::Duration;

use anyhow::ensure;
use bowline_controlplane::ca::AUDIENCE;
use bowline_tests::LocalCluster;
use bowline_tests::cluster::{create_namespace, service_account_token};
use bowline_tests::controlplane::ControlPlane;
use bowline_tests::envoy::{Envoy, Sidecar};
use bowline_tests::proxy::first_words;
use bowline_tests::reviews::Reviews;
use bowline_tests::xds::sidecar_node_id;
use serde_json::json;

#[tokio::test]
async fn envoy_on_delta_xds_takes_the_config_and_splits_traffic_90_10() -> anyhow::Result<()> {
    split_through_envoy(true).await
}

#[tokio::test]
async fn envoy_on_state_of_the_world_xds_does_the_same() -> anyhow::Result<()> {
    split_through_envoy(false).await
}

async fn split_through_envoy(delta: bool) -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let mesh = cluster
        .test_namespace(&client, if delta { "envoy-delta" } else { "envoy-sotw" })
        .await?;
    let apps = format!("{mesh}-apps");
    create_namespace(&client, &apps, json!({})).await?;
    let revision = if delta { "delta" } else { "sotw" };
    let control_plane = ControlPlane::start(&client, &mesh, revision).await?;

    let reviews = Reviews::deploy(&client, &apps).await?;
    let service_port = reviews.service_port;

    let token = service_account_token(&client, &apps, "productpage", Some(AUDIENCE)).await?;
    let mut envoy = Envoy::start(
        &control_plane.target(&client).await?,
        &Sidecar {
            node_id: sidecar_node_id("127.0.0.1", "productpage-1", &apps),
            labels: json!({"app": "productpage"}),
            token,
            delta,
        },
    )?;
    envoy.wait_live(Duration::from_secs(30)).await?;

    // Wait for the bound listener and the endpoints, then send traffic.
    let mut counts = Default::default();
    for _ in 0..100 {
        counts = first_words(&reviews.url("/reviews"), &["Host: reviews"], 1000).await?;
        if counts.get("v1").unwrap_or(&0) + counts.get("v2").unwrap_or(&0) == 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let count = |word: &str| counts.get(word).copied().unwrap_or(0);
    let (v1, v2) = (count("v1"), count("v2"));
    let other = 1000usize.saturating_sub(v1 + v2);
    println!("1,000 requests through Envoy (delta: {delta}): v1 {v1}, v2 {v2}, other {other}");
    ensure!(
        v1 + v2 == 1000,
        "every request answered by a subset: v1 {v1}, v2 {v2}, other {other}\n{}",
        envoy.log_tail(30)
    );
    // 10 % of 1,000 is 100, with a standard deviation under 10.
    ensure!((60..=140).contains(&v2), "about 10 % to v2: {v2}");

    let stats = envoy.stats().await?;
    let rejected: Vec<(&String, &u64)> = stats
        .iter()
        .filter(|(k, v)| k.ends_with("update_rejected") && **v > 0)
        .collect();
    ensure!(
        rejected.is_empty(),
        "Envoy rejected config: {rejected:?}\n{}",
        envoy.log_tail(40)
    );
    // SDS: the mesh root and the workload certificate issued for the
    // token's ServiceAccount (auto-mTLS clusters refer to both).
    for stat in [
        "cluster_manager.cds.update_success",
        "listener_manager.lds.update_success",
        "sds.ROOTCA.update_success",
        "sds.default.update_success",
    ] {
        ensure!(
            stats.get(stat).is_some_and(|v| *v > 0),
            "{stat}: {:?}",
            stats.get(stat)
        );
    }
    let rds = format!(".rds.{service_port}.update_success");
    ensure!(
        stats.iter().any(|(k, v)| k.ends_with(&rds) && *v > 0),
        "{rds}: {:?}",
        stats
            .keys()
            .filter(|k| k.contains(".rds."))
            .collect::<Vec<_>>()
    );
    let eds = stats
        .iter()
        .filter(|(k, v)| {
            k.starts_with("cluster.outbound|") && k.ends_with(".update_success") && **v > 0
        })
        .count();
    ensure!(eds >= 2, "endpoints accepted for the subsets' clusters");
    let (_, metrics) = control_plane.get("/metrics").await?;
    ensure!(
        !metrics.contains("pilot_total_xds_rejects_total"),
        "no NACK: {metrics}"
    );
    Ok(())
}
