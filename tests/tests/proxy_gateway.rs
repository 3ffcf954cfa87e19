//! bowline-proxy as an ingress gateway configured by the control plane on
//! the local cluster: a Gateway for `api.myapp.com` terminates HTTPS with
//! the certificate of its `credentialName` Secret — delivered to the proxy
//! over SDS on its ADS stream — and a VirtualService bound to it routes
//! `/v1` to the `reviews` subset v1. curl, trusting only the Secret's CA,
//! gets through; a renewed Secret is served without a restart; a Secret
//! whose certificate is not one is rejected alone (NACK) and the last good
//! certificate keeps serving. An AuthorizationPolicy selecting the gateway,
//! applied while it runs, denies what it names at once (403) and lets the
//! rest through.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use bowline_controlplane::ca::AUDIENCE;
use bowline_proxy::Mode;
use bowline_tests::LocalCluster;
use bowline_tests::cluster::{free_port, service_account_token};
use bowline_tests::controlplane::ControlPlane;
use bowline_tests::proxy::{Running, curl, server_certificate};
use bowline_tests::reviews::{Reviews, apply_istio};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

const HOST: &str = "api.myapp.com";

/// Applies the TLS Secret `api-cert` with `cert` and `key`.
async fn apply_secret(secrets: &Api<Secret>, cert: &str, key: &str) -> anyhow::Result<()> {
    let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    secrets
        .patch(
            "api-cert",
            &PatchParams::apply("bowline-tests").force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "api-cert"},
                "type": "kubernetes.io/tls",
                "data": {"tls.crt": encode(cert), "tls.key": encode(key)},
            })),
        )
        .await?;
    Ok(())
}

/// GET `path` of https://api.myapp.com on the gateway's `port`, trusting
/// only `ca`: the status (0 when TLS fails) and the body.
fn get(port: u16, ca: &std::path::Path, path: &str) -> anyhow::Result<(u16, String)> {
    curl(&[
        "--cacert",
        &ca.display().to_string(),
        "--resolve",
        &format!("{HOST}:{port}:127.0.0.1"),
        &format!("https://{HOST}:{port}{path}"),
    ])
}

/// Waits until a GET of `/v1/` trusting `ca` answers 200.
async fn until_served(port: u16, ca: &std::path::Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if get(port, ca, "/v1/")?.0 == 200 {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the gateway did not serve with the certificate trusted in 20 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_terminates_tls_with_its_credential_secret() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let mesh = cluster.test_namespace(&client, "proxy-gateway").await?;
    let apps = format!("{mesh}-apps");
    bowline_tests::cluster::create_namespace(&client, &apps, json!({})).await?;
    let control_plane = ControlPlane::start(&client, &mesh, "pgw").await?;
    let reviews = Reviews::deploy(&client, &apps).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &apps);
    let files = tempfile::tempdir()?;

    let first = server_certificate(HOST)?;
    let first_ca = files.path().join("first-ca.pem");
    std::fs::write(&first_ca, &first.ca)?;
    apply_secret(&secrets, &first.cert, &first.key).await?;
    let port = free_port()?;
    reviews
        .apply(
            "Gateway",
            json!({
                "metadata": {"name": "api"},
                "spec": {"selector": {"istio": "ingressgateway"}, "servers": [{
                    "port": {"number": port, "name": "https", "protocol": "HTTPS"},
                    "tls": {"mode": "SIMPLE", "credentialName": "api-cert"},
                    "hosts": [HOST],
                }]},
            }),
        )
        .await?;
    reviews
        .apply(
            "VirtualService",
            json!({
                "metadata": {"name": "api"},
                "spec": {"hosts": [HOST], "gateways": ["api"], "http": [{
                    "match": [{"uri": {"prefix": "/v1"}}],
                    "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                }]},
            }),
        )
        .await?;

    let token = service_account_token(&client, &apps, "ingressgateway", Some(AUDIENCE)).await?;
    let target = control_plane.target(&client).await?;
    let gateway = Running::discovery(
        Mode::Gateway,
        &target,
        &token,
        &[
            ("POD_NAME", "ingressgateway-1"),
            ("POD_NAMESPACE", &apps),
            ("INSTANCE_IP", "127.0.0.1"),
            ("SERVICE_ACCOUNT", "ingressgateway"),
            ("ISTIO_METAJSON_LABELS", r#"{"istio":"ingressgateway"}"#),
        ],
    )
    .await?;

    // Ready means the listener has its certificate: served at once.
    let (status, body) = get(port, &first_ca, "/v1/books")?;
    ensure!(
        status == 200 && body.starts_with("v1 /v1/books"),
        "/v1 reaches reviews v1 over TLS the Secret's CA vouches for: {status} {body}"
    );
    let (status, _) = get(port, &first_ca, "/v2/books")?;
    ensure!(status == 404, "/v2 has no route: {status}");
    let (status, body) = curl(&[&format!("http://127.0.0.1:{port}/v1/books")])?;
    ensure!(
        status != 200,
        "plaintext is not served on the HTTPS port: {status} {body}"
    );
    let (_, certs) = curl(&[&format!("http://127.0.0.1:{}/certs", gateway.ports.admin)])?;
    ensure!(
        certs.contains("kubernetes://api-cert") && certs.contains(HOST),
        "the admin /certs shows the credential: {certs}"
    );

    // An AuthorizationPolicy for the gateway, applied while it serves:
    // the next requests are judged by it, no restart.
    apply_istio(
        &client,
        &apps,
        json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "api-private"},
            "spec": {
                "selector": {"matchLabels": {"istio": "ingressgateway"}},
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/v1/private*"]}}]}],
            },
        }),
    )
    .await?;
    let started = Instant::now();
    loop {
        let (status, body) = get(port, &first_ca, "/v1/private/keys")?;
        if status == 403 {
            ensure!(body == "RBAC: access denied", "the denial says why: {body}");
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the policy reaches the running gateway: still {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "a new AuthorizationPolicy denied at the gateway after {:?}",
        started.elapsed()
    );
    let (status, _) = get(port, &first_ca, "/v1/books")?;
    ensure!(
        status == 200,
        "what the policy does not name still passes: {status}"
    );

    // The Secret renewed (another CA): the gateway serves the new
    // certificate without a restart.
    let second = server_certificate(HOST)?;
    let second_ca = files.path().join("second-ca.pem");
    std::fs::write(&second_ca, &second.ca)?;
    apply_secret(&secrets, &second.cert, &second.key).await?;
    let took = until_served(port, &second_ca).await?;
    println!("a renewed credential Secret served in {took:?}");
    ensure!(
        get(port, &first_ca, "/v1/")?.0 == 0,
        "the old certificate is no longer served"
    );
    let (_, metrics) =
        bowline_tests::http::get(gateway.ports.prometheus, "/stats/prometheus").await?;
    ensure!(
        metrics.lines().any(
            |l| l.starts_with("bowline_proxy_connections_refused_total{")
                && l.contains("reason=\"tls_handshake\"")
        ),
        "the handshake the client broke off is counted:\n{metrics}"
    );

    // A Secret whose certificate is not one: rejected alone, the last
    // good certificate keeps serving.
    apply_secret(&secrets, "not a certificate", &second.key).await?;
    let started = Instant::now();
    let rejected = loop {
        let (_, metrics) = control_plane.get("/metrics").await?;
        if let Some(line) = metrics
            .lines()
            .find(|l| l.starts_with("pilot_total_xds_rejects") && l.contains("type=\"sds\""))
        {
            break line.to_string();
        }
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the proxy rejects the broken Secret (a NACK the control plane counts)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("{rejected}");
    let (status, body) = get(port, &second_ca, "/v1/still")?;
    ensure!(
        status == 200 && body.starts_with("v1 /v1/still"),
        "the last good certificate keeps serving: {status} {body}"
    );
    gateway.stop().await.context("the gateway stops")?;
    Ok(())
}
