//! TLS origination to a server outside the mesh, as Istio's egress TLS
//! origination: the application speaks plain HTTP to its sidecar, a
//! DestinationRule (`tls.mode: SIMPLE`, `credentialName`) has the sidecar
//! speak TLS to the server, trusting only the CA of the named Secret
//! (delivered over SDS) and checking the server's name. A rule naming
//! another name makes the same server refused.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use base64::Engine;
use bowline_controlplane::ca::AUDIENCE;
use bowline_proxy::Mode;
use bowline_tests::LocalCluster;
use bowline_tests::cluster::{free_port, service_account_token};
use bowline_tests::controlplane::ControlPlane;
use bowline_tests::proxy::{
    Running, curl, http_manager, server_certificate, static_cluster, upstream,
};
use bowline_tests::reviews::apply_istio;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;

const HOST: &str = "secure.example.com";

/// The DestinationRule for [`HOST`]: SIMPLE TLS with the CA of the Secret
/// `secure-ca`, and `names` to check (none: the host itself).
fn destination_rule(names: &[&str]) -> serde_json::Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "secure"},
        "spec": {"host": HOST, "trafficPolicy": {"tls": {
            "mode": "SIMPLE", "credentialName": "secure-ca", "sni": HOST,
            "subjectAltNames": names,
        }}},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_originates_tls_with_the_credential_s_ca() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared()?;
    let client = cluster.client().await?;
    let mesh = cluster.test_namespace(&client, "egress-tls").await?;
    let apps = format!("{mesh}-apps");
    bowline_tests::cluster::create_namespace(&client, &apps, json!({})).await?;
    let control_plane = ControlPlane::start(&client, &mesh, "etls").await?;

    // The external server: HTTPS with a certificate for HOST from a CA of
    // its own (a bowline-proxy terminating TLS before a plain upstream).
    let issued = server_certificate(HOST)?;
    let server_port = free_port()?;
    let app = upstream("secure").await?;
    let _server = Running::bootstrap(
        json!({"static_resources": {
            "listeners": [{"name": "https",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": server_port}},
                "filter_chains": [{
                    "filters": [http_manager(json!([{"name": "all", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]}]))],
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "common_tls_context": {"tls_certificates": [{
                            "certificate_chain": {"inline_string": issued.cert},
                            "private_key": {"inline_string": issued.key}}]}}},
                }]}],
            "clusters": [static_cluster("app", &[app])],
        }}),
        &[],
    )
    .await?;

    // The mesh's view of it, and the CA to trust it by.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &apps);
    let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "secure-ca"},
                "data": {"ca.crt": encode(&issued.ca)},
            }))?,
        )
        .await?;
    let egress_port = free_port()?;
    for object in [
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "secure"},
            "spec": {
                "hosts": [HOST], "location": "MESH_EXTERNAL", "resolution": "STATIC",
                "ports": [{"number": egress_port, "name": "http", "protocol": "HTTP"}],
                "endpoints": [{"address": "127.0.0.1", "ports": {"http": server_port}}],
            },
        }),
        destination_rule(&[]),
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
            "metadata": {"name": "default"},
            "spec": {"egress": [{
                "port": {"number": egress_port, "protocol": "HTTP", "name": "http"},
                "bind": "127.0.0.1", "captureMode": "NONE", "hosts": ["./*"],
            }]},
        }),
    ] {
        apply_istio(&client, &apps, object).await?;
    }

    let token = service_account_token(&client, &apps, "client", Some(AUDIENCE)).await?;
    let target = control_plane.target(&client).await?;
    let _sidecar = Running::discovery(
        Mode::Sidecar,
        &target,
        &token,
        &[
            ("POD_NAME", "client-1"),
            ("POD_NAMESPACE", &apps),
            ("INSTANCE_IP", "127.0.0.1"),
            ("ISTIO_METAJSON_LABELS", r#"{"app":"client"}"#),
            ("ISTIO_META_INTERCEPTION_MODE", "NONE"),
        ],
    )
    .await?;
    let get = || {
        curl(&[
            "-H",
            &format!("Host: {HOST}"),
            &format!("http://127.0.0.1:{egress_port}/orders"),
        ])
    };

    let (status, body) = get()?;
    ensure!(
        status == 200 && body.starts_with("secure /orders"),
        "plain HTTP from the app leaves as TLS the Secret's CA vouches for: {status} {body}"
    );

    // The rule now wants another name: the same server is refused.
    apply_istio(&client, &apps, destination_rule(&["other.example.com"])).await?;
    let started = Instant::now();
    loop {
        let (status, body) = get()?;
        if status == 503 {
            println!(
                "a certificate for another name refused {:?} after the rule changed: {body}",
                started.elapsed()
            );
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the server's name is not checked: still {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
