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
use bowline_tests::cluster::service_account_token;
use bowline_tests::cluster::{create_namespace, free_port};
use bowline_tests::controlplane::ControlPlane;
use bowline_tests::envoy::{Envoy, Sidecar};
use bowline_tests::xds::sidecar_node_id;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

/// An HTTP server on `ip:port` answering every request with `body`.
async fn backend(
    ip: [u8; 4],
    port: u16,
    body: &'static str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::from(ip), port)).await?;
    let app = axum::Router::new().fallback(move || async move { body });
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}

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

    // reviews v1 on 127.0.0.2 and v2 on 127.0.0.3. Kubernetes refuses
    // loopback addresses in EndpointSlices, so they are the endpoints of a
    // MESH_INTERNAL ServiceEntry for the service's name, as Istio allows
    // for workloads outside Kubernetes, labelled for the subsets.
    let (service_port, v1_port, v2_port) = (free_port()?, free_port()?, free_port()?);
    let _v1 = backend([127, 0, 0, 2], v1_port, "v1\n").await?;
    let _v2 = backend([127, 0, 0, 3], v2_port, "v2\n").await?;
    let istio = |kind: &str| {
        Api::<DynamicObject>::namespaced_with(
            client.clone(),
            &apps,
            &ApiResource::from_gvk(&GroupVersionKind::gvk("networking.istio.io", "v1", kind)),
        )
    };
    let apply = |kind: &str, object: serde_json::Value| {
        let api = istio(kind);
        async move {
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            api.patch(
                &name,
                &PatchParams::apply("bowline-tests").force(),
                &Patch::Apply(object),
            )
            .await
        }
    };
    apply("ServiceEntry", json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "reviews"},
        "spec": {
            "hosts": [format!("reviews.{apps}.svc.cluster.local")],
            "location": "MESH_INTERNAL", "resolution": "STATIC",
            "ports": [{"number": service_port, "name": "http", "protocol": "HTTP"}],
            "endpoints": [
                {"address": "127.0.0.2", "ports": {"http": v1_port}, "labels": {"version": "v1"}},
                {"address": "127.0.0.3", "ports": {"http": v2_port}, "labels": {"version": "v2"}},
            ],
        },
    })).await?;
    apply("DestinationRule", json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews"},
        "spec": {"host": "reviews", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}},
        ]},
    })).await?;
    apply("VirtualService", json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews"},
        "spec": {"hosts": ["reviews"], "http": [{
            "route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10},
            ],
            "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,connect-failure"},
            "timeout": "10s",
        }]},
    })).await?;
    // Without capture the sidecar binds its outbound port itself.
    apply("Sidecar", json!({
        "apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "default"},
        "spec": {"egress": [{
            "port": {"number": service_port, "protocol": "HTTP", "name": "http"},
            "bind": "127.0.0.1", "captureMode": "NONE", "hosts": ["./*"],
        }]},
    })).await?;

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
    let url = format!("http://127.0.0.1:{service_port}/reviews/[1-1000]");
    let mut counts = (0, 0, 0);
    for _ in 0..100 {
        let output = tokio::process::Command::new("curl")
            .args(["-s", "--max-time", "20", "-H", "Host: reviews", &url])
            .output()
            .await?;
        let body = String::from_utf8_lossy(&output.stdout);
        counts = body
            .lines()
            .fold((0, 0, 0), |(v1, v2, other), line| match line {
                "v1" => (v1 + 1, v2, other),
                "v2" => (v1, v2 + 1, other),
                _ => (v1, v2, other + 1),
            });
        if counts.0 + counts.1 == 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (v1, v2, other) = counts;
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
