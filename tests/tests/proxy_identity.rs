//! Two sidecars on loopback that get their certificates from the control
//! plane's CA on the local cluster — with their ServiceAccount tokens,
//! as pods do — and speak mutual TLS to each other with them, by the SDS
//! names Istio uses (`default`, `ROOTCA`). The certificates live four
//! seconds: over twelve seconds of steady traffic, each client connection
//! a new TLS connection between the sidecars, both proxies rotate several
//! times and no connection fails;
//! a connection opened before the first rotation still works after its
//! certificates have expired (rotation drops nothing); the admin
//! endpoint's `/certs` shows each proxy's serial numbers change. A proxy is not
//! ready before it has its certificate.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bowline_controlplane::ca::AUDIENCE;
use bowline_tests::LocalCluster;
use bowline_tests::cluster::{create_namespace, free_port, service_account_token};
use bowline_tests::controlplane::ControlPlane;
use bowline_tests::proxy::{Running, ca_env, echo, echoes, static_cluster};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the CA's certificates live here.
const LIFETIME: &str = "4s";
/// The steady traffic: this long, at most this many connections.
const LOAD: Duration = Duration::from_secs(12);
const MOST_CONNECTIONS: usize = 20_000;

/// The common TLS context of a workload: its certificate `default`, and
/// peers checked against the root `ROOTCA` and for the SPIFFE ID `peer`.
fn workload_tls(peer: &str) -> serde_json::Value {
    let sds = json!({"ads": {}, "resource_api_version": "V3"});
    json!({
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds}],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": peer}}]},
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds},
        },
    })
}

/// A listener on 127.0.0.1:`port` passing connections to `cluster`.
fn tcp_listener(port: u16, cluster: &str) -> serde_json::Value {
    json!({"name": "tcp", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "tcp", "cluster": cluster}}]}]})
}

/// An environment as [`Running`] takes it.
fn strs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The serial number of the certificate a proxy serves as `default`, and
/// the SPIFFE ID it names, from its admin `/certs`.
async fn workload_certificate(proxy: &Running) -> anyhow::Result<(String, String)> {
    let (_, body) = bowline_tests::http::get(proxy.ports.admin, "/certs").await?;
    let certs: serde_json::Value = serde_json::from_str(&body)?;
    let leaf = certs["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| &c["cert_chain"][0])
        .find(|c| c["path"] == "default")
        .with_context(|| format!("the workload certificate in {certs:#}"))?;
    let identity = leaf["subject_alt_names"][0]["uri"]
        .as_str()
        .unwrap_or_default();
    Ok((
        leaf["serial_number"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        identity.to_string(),
    ))
}

/// The count `citadel_server_success_cert_issuance_count` shows.
async fn issued(control_plane: &ControlPlane) -> anyhow::Result<u64> {
    let (_, metrics) = control_plane.get("/metrics").await?;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("citadel_server_success_cert_issuance_count"))
        .context("the control plane counts the certificates it issues")?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_the_ca_rotate_under_traffic_without_a_failure() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let mesh = cluster.test_namespace(&client, "proxy-identity").await?;
    let apps = format!("{mesh}-apps");
    create_namespace(&client, &apps, json!({})).await?;
    let control_plane = ControlPlane::start(&client, &mesh, "pid").await?;
    let target = control_plane.target(&client).await?;
    let spiffe = |account: &str| format!("spiffe://cluster.local/ns/{apps}/sa/{account}");
    let files = tempfile::tempdir()?;

    // What each sidecar's pod would give it: namespace, ServiceAccount
    // and its token for the CA, the mesh root.
    let env_of = |account: &str, token: &str| -> anyhow::Result<Vec<(String, String)>> {
        let dir = files.path().join(account);
        std::fs::create_dir_all(&dir)?;
        let mut env = ca_env(&target, token, &dir)?;
        env.extend([
            ("POD_NAMESPACE".into(), apps.clone()),
            ("SERVICE_ACCOUNT".into(), account.into()),
            ("SECRET_TTL".into(), LIFETIME.into()),
        ]);
        Ok(env)
    };

    // payments: mutual TLS in, only billing's identity, to its app.
    let app = echo().await?;
    let payments_port = free_port()?;
    let mut inbound = tcp_listener(payments_port, "app");
    inbound["filter_chains"][0]["transport_socket"] = json!({"name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": workload_tls(&spiffe("billing"))}});
    let token = service_account_token(&client, &apps, "payments", Some(AUDIENCE)).await?;
    let env = env_of("payments", &token)?;
    let payments = Running::bootstrap(
        json!({"static_resources": {
            "listeners": [inbound],
            "clusters": [static_cluster("app", &[app])],
        }}),
        &strs(&env),
    )
    .await?;

    // billing: plaintext in from its app, mutual TLS out to payments,
    // which must prove it is payments.
    let billing_port = free_port()?;
    let mut upstream = static_cluster("payments", &[([127, 0, 0, 1], payments_port).into()]);
    upstream["transport_socket"] = json!({"name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": workload_tls(&spiffe("payments"))}});
    let token = service_account_token(&client, &apps, "billing", Some(AUDIENCE)).await?;
    let env = env_of("billing", &token)?;
    let billing = Running::bootstrap(
        json!({"static_resources": {
            "listeners": [tcp_listener(billing_port, "payments")],
            "clusters": [upstream],
        }}),
        &strs(&env),
    )
    .await?;
    // Ready means both have their certificates: the first connection works.
    let before = issued(&control_plane).await?;
    ensure!(before >= 2, "a certificate for each proxy: {before} issued");
    echoes(billing_port, b"first").await?;

    // A connection opened now, kept through every rotation.
    let mut kept = tokio::net::TcpStream::connect(("127.0.0.1", billing_port)).await?;
    let round_trip = async |stream: &mut tokio::net::TcpStream, bytes: &[u8]| {
        stream.write_all(bytes).await?;
        let mut back = vec![0; bytes.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await??;
        ensure!(back == bytes, "sent {bytes:?}, got back {back:?}");
        anyhow::Ok(())
    };
    round_trip(&mut kept, b"kept").await?;

    // Steady traffic from two clients, each connection a new TLS
    // connection between the sidecars (a resumed session until a rotation
    // rebuilds the TLS contexts, then a full handshake with the new
    // certificates).
    let (connections, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (connections, failures) = (Arc::clone(&connections), Arc::clone(&failures));
        clients.push(tokio::spawn(async move {
            let mut last_failure = None;
            while started.elapsed() < LOAD && connections.load(Ordering::Relaxed) < MOST_CONNECTIONS
            {
                connections.fetch_add(1, Ordering::Relaxed);
                if let Err(error) = echoes(billing_port, b"steady").await {
                    failures.fetch_add(1, Ordering::Relaxed);
                    last_failure = Some(format!("{:?}: {error:#}", started.elapsed()));
                }
            }
            last_failure
        }));
    }
    // Meanwhile, the certificates each proxy shows on its admin `/certs`.
    let mut serials = [BTreeSet::new(), BTreeSet::new()];
    while started.elapsed() < LOAD {
        for (seen, (proxy, account)) in serials
            .iter_mut()
            .zip([(&payments, "payments"), (&billing, "billing")])
        {
            let (leaf, identity) = workload_certificate(proxy).await?;
            ensure!(
                identity == spiffe(account),
                "{account}'s certificate names {identity}"
            );
            seen.insert(leaf);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut last_failure = None;
    for client in clients {
        last_failure = client.await?.or(last_failure);
    }
    let (connections, failures) = (
        connections.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    let after = issued(&control_plane).await?;
    println!(
        "{connections} connections over {:?} with {LIFETIME} certificates: {failures} failed; \
         {} certificates issued meanwhile",
        started.elapsed(),
        after - before
    );
    ensure!(
        failures == 0,
        "no connection fails while certificates rotate: {failures} of {connections}, the last {last_failure:?}"
    );
    ensure!(
        connections >= 100,
        "steady traffic: {connections} connections"
    );
    // Each renews at about half its certificate's life: at least four
    // times each over twelve seconds.
    ensure!(
        after - before >= 8,
        "both proxies renewed every ~2 s: {} certificates issued in {:?}",
        after - before,
        started.elapsed()
    );
    for (seen, account) in serials.iter().zip(["payments", "billing"]) {
        println!("{account} served {} certificates: {seen:?}", seen.len());
        ensure!(
            seen.len() >= 4,
            "{account} served a new certificate every ~2 s: {seen:?}"
        );
    }
    round_trip(&mut kept, b"still kept").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_the_ca_refuses_is_not_ready() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let mesh = cluster.test_namespace(&client, "proxy-no-identity").await?;
    let control_plane = ControlPlane::start(&client, &mesh, "pnoid").await?;
    let target = control_plane.target(&client).await?;
    let files = tempfile::tempdir()?;
    // A token for another audience: the CA refuses it.
    let token = service_account_token(&client, &mesh, "stranger", Some("elsewhere")).await?;
    let env = ca_env(&target, &token, files.path())?;
    let bootstrap = json!({"static_resources": {
        "listeners": [tcp_listener(free_port()?, "app")],
        "clusters": [static_cluster("app", &[echo().await?])],
    }});
    let proxy = Running::bootstrap_unready(bootstrap, &strs(&env))?;
    let mut answers = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(answer) = bowline_tests::http::get(proxy.ports.status, "/healthz/ready").await {
            answers.push(answer);
        }
    }
    proxy.stop().await?;
    // A slow start may first say its bootstrap is not loaded yet; from
    // then on it waits for the certificate the CA keeps refusing.
    let waiting = answers
        .iter()
        .skip_while(|(_, body)| body.contains("no complete configuration yet"));
    ensure!(
        answers.iter().all(|(code, _)| *code == 503)
            && waiting.clone().count() > 0
            && waiting
                .clone()
                .all(|(_, body)| body.contains("no workload certificate from the CA yet")),
        "not ready while the CA refuses it: {answers:?}"
    );
    Ok(())
}
