//! bowline-proxy as a sidecar on the local cluster, configured only by the
//! control plane over delta ADS (TLS, ServiceAccount token): it is ready
//! once its first configuration is whole and then splits 1,000 requests
//! 90/10 as the VirtualService says; a VirtualService change reaches it
//! while it serves, also on a connection opened before it, and a change of
//! the listener itself closes such a connection with its next answer (as
//! Envoy drains it, HTTP/2 with a GOAWAY); a bound egress port declared TCP
//! carries TCP; the control plane counts no NACK — the proxy takes
//! everything the control plane's translation emits for this workload.
//! With the control plane gone it keeps serving its last configuration
//! and stays ready; when the control plane is back it reconnects and
//! follows changes again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bowline_controlplane::ca::AUDIENCE;
use bowline_proxy::Mode;
use bowline_proxy::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use bowline_tests::LocalCluster;
use bowline_tests::cluster::{create_namespace, free_port, service_account_token};
use bowline_tests::controlplane::ControlPlane;
use bowline_tests::proxy::{KeptConnection, Running, echo, echoes, first_words};
use bowline_tests::reviews::Reviews;
use serde_json::json;

/// `count` requests through the sidecar: how many each version answered.
async fn versions(reviews: &Reviews, count: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    first_words(&reviews.url("/reviews"), &["Host: reviews"], count).await
}

/// Waits until 20 requests in a row all reach `version`.
async fn until_all_reach(reviews: &Reviews, version: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let counts = versions(reviews, 20).await?;
        if counts.get(version) == Some(&20) {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("requests did not all reach {version} within 20 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_follows_the_control_plane_and_outlives_it() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let mesh = cluster.test_namespace(&client, "proxy-xds").await?;
    let apps = format!("{mesh}-apps");
    create_namespace(&client, &apps, json!({})).await?;
    let control_plane = ControlPlane::start(&client, &mesh, "pxds").await?;
    let reviews = Reviews::deploy(&client, &apps).await?;

    let token = service_account_token(&client, &apps, "productpage", Some(AUDIENCE)).await?;
    let target = control_plane.target(&client).await?;
    let started = Instant::now();
    let proxy = Running::discovery(
        Mode::Sidecar,
        &target,
        &token,
        &[
            ("POD_NAME", "productpage-1"),
            ("POD_NAMESPACE", &apps),
            ("INSTANCE_IP", "127.0.0.1"),
            ("ISTIO_METAJSON_LABELS", r#"{"app":"productpage"}"#),
            ("ISTIO_META_INTERCEPTION_MODE", "NONE"),
        ],
    )
    .await?;
    println!(
        "ready on its first configuration in {:?}",
        started.elapsed()
    );

    // Ready means whole: the first requests already find the listener,
    // the route and both subsets' endpoints.
    let counts = versions(&reviews, 1000).await?;
    let (v1, v2) = (counts.get("v1").copied(), counts.get("v2").copied());
    println!("1,000 requests through bowline-proxy: {counts:?}");
    ensure!(
        v1.unwrap_or(0) + v2.unwrap_or(0) == 1000,
        "every request answered by a subset: {counts:?}"
    );
    // Binomial(1000, 0.1): the standard deviation is 9.5.
    ensure!(
        (60..=140).contains(&v2.unwrap_or(0)),
        "about 10 % to v2: {counts:?}"
    );

    // The admin endpoint dumps what it was sent, with versions, as
    // Envoy's /config_dump does.
    let (status, dump) = bowline_tests::proxy::curl(&[&format!(
        "http://127.0.0.1:{}/config_dump",
        proxy.ports.admin
    )])?;
    let dump: serde_json::Value = serde_json::from_str(&dump)?;
    let clusters = &dump["configs"][0]["dynamic_active_clusters"];
    ensure!(
        status == 200
            && clusters.as_array().is_some_and(|c| c.iter().any(|c| {
                c["version_info"].is_string()
                    && c["cluster"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("outbound|"))
                    && c["cluster"]["@type"]
                        == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
            })),
        "dynamic clusters in {dump:#}"
    );
    ensure!(
        dump["configs"][1]["dynamic_listeners"][0]["active_state"]["listener"]["name"].is_string(),
        "dynamic listeners in {dump:#}"
    );

    // A client keeping its connection sees the change too: a request is
    // routed on the configuration of its own moment, not its connection's.
    let mut kept = KeptConnection::open(reviews.address()).await?;
    let before = kept.first_word("reviews", "/reviews").await?;
    ensure!(before.starts_with('v'), "answered by a subset: {before:?}");
    reviews.split(0, 100).await?;
    let took = until_all_reach(&reviews, "v2").await?;
    println!("a VirtualService change reached the proxy's traffic in {took:?}");
    for _ in 0..20 {
        let word = kept.first_word("reviews", "/reviews").await?;
        ensure!(
            word == "v2",
            "a connection opened before the change follows it: {word:?}"
        );
    }

    let (_, metrics) = control_plane.get("/metrics").await?;
    ensure!(
        !metrics.contains("pilot_total_xds_rejects_total"),
        "the proxy NACKed nothing: {}",
        metrics
            .lines()
            .filter(|l| l.contains("reject"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The control plane goes away: the last configuration keeps serving.
    let stopped = control_plane.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = versions(&reviews, 100).await?;
    ensure!(
        counts.get("v2") == Some(&100),
        "served without a control plane: {counts:?}"
    );
    ensure!(proxy.ready().await?, "still ready without a control plane");

    // It comes back on the same address; the proxy reconnects and follows.
    let control_plane = stopped.start(&client).await?;
    reviews.split(100, 0).await?;
    let took = until_all_reach(&reviews, "v1").await?;
    println!("after the control plane restarted, a change reached the proxy in {took:?}");
    // The new control plane sees the proxy on a stream of its own, every
    // type ACKed and nothing NACKed.
    let (_, syncz) = control_plane.get("/debug/syncz").await?;
    let syncz: serde_json::Value = serde_json::from_str(&syncz)?;
    let node = format!("sidecar~127.0.0.1~productpage-1.{apps}~{apps}.svc.cluster.local");
    let entry = syncz
        .as_array()
        .and_then(|a| a.iter().find(|p| p["proxy"] == node.as_str()))
        .with_context(|| format!("{node} in syncz: {syncz}"))?;
    for type_url in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        ensure!(
            entry["acked"][type_url].is_u64(),
            "{type_url} ACKed: {entry}"
        );
    }
    ensure!(entry["lastNack"].is_null(), "no NACK: {entry}");

    // The listener itself changes (the Sidecar allows only the registry's
    // hosts, which gives it a default filter chain): a connection it
    // accepted is told to close — over HTTP/1.1 with its next answer, over
    // HTTP/2 by a GOAWAY — and then closes; new connections are served.
    let mut kept = KeptConnection::open(reviews.address()).await?;
    ensure!(kept.first_word("reviews", "/reviews").await? == "v1");
    let mut kept_h2 = KeptConnection::open_http2(reviews.address()).await?;
    ensure!(kept_h2.first_word("reviews", "/reviews").await? == "v1");
    reviews.sidecar(true).await?;
    let started = Instant::now();
    let closing = loop {
        let answer = kept.get("reviews", "/reviews").await?;
        if answer
            .headers()
            .get("connection")
            .is_some_and(|c| c == "close")
        {
            break answer;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the kept connection was not told to close within 20 s of the listener change"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(
        closing.status() == 200 && closing.body().starts_with("v1"),
        "its last answer is served: {closing:?}"
    );
    ensure!(!kept.is_open().await, "the connection closes after it");
    let ended = kept_h2.ended_within(Duration::from_secs(20)).await;
    ensure!(
        ended == Some(Ok(())),
        "the HTTP/2 connection is sent a GOAWAY and closes cleanly: {ended:?}"
    );
    let counts = versions(&reviews, 20).await?;
    ensure!(
        counts.get("v1") == Some(&20),
        "new connections are served by the new listener: {counts:?}"
    );

    // A bound egress port declared TCP carries TCP: bytes to it reach the
    // service with that port (an HTTP listener would answer 400).
    let ledger = echo().await?;
    let ledger_port = free_port()?;
    reviews
        .apply(
            "ServiceEntry",
            json!({"metadata": {"name": "ledger"}, "spec": {
                "hosts": [format!("ledger.{apps}.svc.cluster.local")],
                "location": "MESH_INTERNAL", "resolution": "STATIC",
                "ports": [{"number": ledger_port, "name": "tcp", "protocol": "TCP"}],
                "endpoints": [{"address": "127.0.0.1", "ports": {"tcp": ledger.port()}}],
            }}),
        )
        .await?;
    let mut sidecar = reviews.sidecar_spec(true);
    sidecar["egress"]
        .as_array_mut()
        .context("egress")?
        .push(json!({
            "port": {"number": ledger_port, "protocol": "TCP", "name": "tcp"},
            "bind": "127.0.0.1", "captureMode": "NONE", "hosts": ["./*"],
        }));
    reviews
        .apply(
            "Sidecar",
            json!({"metadata": {"name": "default"}, "spec": sidecar}),
        )
        .await?;
    let started = Instant::now();
    while let Err(error) = echoes(ledger_port, b"ledger entry 1").await {
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the bound TCP port does not echo within 20 s: {error:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(control_plane);
    proxy.stop().await
}
