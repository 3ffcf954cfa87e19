//! bowline-proxy carrying more than plain requests: a WebSocket upgraded
//! through it and echoing both ways, and gRPC over HTTP/2 (h2c) whose
//! status travels in trailers — answered in full, and trailers-only — and
//! reaches the metrics as `grpc_response_status`.

use anyhow::{Context, ensure};
use bowline_tests::cluster::free_port;
use bowline_tests::proxy::{
    Running, curl, echoes, http_manager, in_front_of, static_cluster, upstream,
};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Status;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_upgraded_through_the_proxy() -> anyhow::Result<()> {
    let app = upstream("chat").await?;
    let port = free_port()?;
    let proxy = Running::bootstrap(in_front_of(port, static_cluster("chat", &[app])), &[]).await?;
    let (mut socket, response) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws")).await?;
    ensure!(response.status() == 101, "{response:?}");
    for text in ["hello", "again"] {
        socket.send(Message::text(text)).await?;
        let reply = socket.next().await.context("an answer")??;
        ensure!(reply == Message::text(format!("chat {text}")), "{reply:?}");
    }
    socket.close(None).await?;
    // Plain requests on the same route still work.
    ensure!(
        curl(&[&format!("http://127.0.0.1:{port}/plain")])?
            == (
                200,
                "chat /plain 127.0.0.1:".to_string() + &port.to_string()
            )
    );
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_travels_in_trailers() -> anyhow::Result<()> {
    // A gRPC health service that knows one service.
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Reviews", ServingStatus::Serving)
        .await;
    let grpc_port = free_port()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve(([127, 0, 0, 1], grpc_port).into()),
    );
    let port = free_port()?;
    let mut cluster = static_cluster("grpc", &[([127, 0, 0, 1], grpc_port).into()]);
    cluster["http2_protocol_options"] = json!({});
    let proxy = Running::bootstrap(in_front_of(port, cluster), &[]).await?;

    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let mut serving = None;
    for _ in 0..50 {
        // The server may still be starting: UNAVAILABLE until it listens.
        match client
            .check(HealthCheckRequest {
                service: "shop.Reviews".into(),
            })
            .await
        {
            Ok(answer) => {
                serving = Some(answer.into_inner().status);
                break;
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(status) => anyhow::bail!("{status:?}"),
        }
    }
    ensure!(serving == Some(Status::Serving as i32), "{serving:?}");
    let unknown = client
        .check(HealthCheckRequest {
            service: "shop.Nothing".into(),
        })
        .await
        .expect_err("an unknown service is NOT_FOUND");
    ensure!(unknown.code() == tonic::Code::NotFound, "{unknown:?}");

    let (_, metrics) = curl(&[&format!(
        "http://127.0.0.1:{}/stats/prometheus",
        proxy.ports.admin
    )])?;
    let requests: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{") && l.contains("request_protocol=\"grpc\"")
        })
        .collect();
    for status in ["0", "5"] {
        ensure!(
            requests.iter().any(
                |l| l.contains(&format!("grpc_response_status=\"{status}\""))
                    && l.contains("response_code=\"200\"")
                    && l.ends_with(" 1")
            ),
            "one call with gRPC status {status}: {requests:#?}"
        );
    }
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sniffing_listener_tells_http_from_tcp() -> anyhow::Result<()> {
    let (app, echo) = (upstream("app").await?, bowline_tests::proxy::echo().await?);
    let port = free_port()?;
    let manager = http_manager(json!([{"name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]}]));
    let tcp = json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "opaque", "cluster": "echo"}});
    // As Istio writes a port of unknown protocol: HTTP when the first
    // bytes say so, else TCP.
    let proxy = Running::bootstrap(
        json!({"static_resources": {
            "listeners": [{"name": "sniffed", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "listener_filters": [{"name": "envoy.filters.listener.http_inspector", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}],
                "listener_filters_timeout": "1s", "continue_on_listener_filters_timeout": true,
                "filter_chains": [
                    {"filter_chain_match": {"application_protocols": ["http/1.1", "http/1.0", "h2c"]}, "filters": [manager]},
                    {"filters": [tcp]},
                ]}],
            "clusters": [static_cluster("app", &[app]), static_cluster("echo", &[echo])],
        }}),
        &[],
    )
    .await?;
    let url = format!("http://127.0.0.1:{port}/sniffed");
    let (status, body) = curl(&[&url])?;
    ensure!(
        status == 200 && body.starts_with("app /sniffed"),
        "{status} {body}"
    );
    let (status, body) = curl(&["--http2-prior-knowledge", &url])?;
    ensure!(
        status == 200 && body.starts_with("app /sniffed"),
        "h2c: {status} {body}"
    );
    // Not HTTP: the bytes go to the TCP chain's cluster as they are.
    echoes(port, b"\x00\x01hello, not http\r\n").await?;
    proxy.stop().await
}

/// A service whose port names no protocol, as the control plane
/// translates it for a sidecar, served by the proxy: HTTP found by
/// sniffing is routed by the service's VirtualService, anything else goes
/// to the service as TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_planes_sniffing_listener_routes_http_and_passes_the_rest() -> anyhow::Result<()>
{
    use bowline_controlplane::model::{Config, Protocol, Service, ServicePort, Snapshot};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    let (app, echo) = (
        upstream("legacy").await?,
        bowline_tests::proxy::echo().await?,
    );
    let unnamed = |name: &str, vip: &str, port: u32, endpoint: std::net::SocketAddr| {
        let mut service = Service::kubernetes(
            name,
            "shop",
            vec![ServicePort {
                name: "web".into(),
                port,
                protocol: Protocol::Unknown,
            }],
        );
        service.address = Some(vip.into());
        (
            service,
            bowline_tests::proxy::plain_endpoint(endpoint, port),
        )
    };
    let (legacy, legacy_endpoint) = unnamed("legacy", "10.96.0.70", 7070, app);
    let (db, db_endpoint) = unnamed("db", "10.96.0.71", 7071, echo);
    let endpoints = Arc::new(BTreeMap::from([
        (legacy.hostname.clone(), vec![legacy_endpoint]),
        (db.hostname.clone(), vec![db_endpoint]),
    ]));
    let services = Arc::new(BTreeMap::from([
        (legacy.hostname.clone(), legacy),
        (db.hostname.clone(), db),
    ]));
    let virtual_services = Arc::new(vec![Config::new(
        "legacy",
        "shop",
        serde_json::from_value(json!({"hosts": ["legacy"], "http": [
            {"match": [{"uri": {"prefix": "/teapot"}}],
             "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
             "route": [{"destination": {"host": "legacy"}}]},
            {"route": [{"destination": {"host": "legacy"}}]},
        ]}))?,
    )]);
    let snapshot = Snapshot {
        services,
        endpoints,
        virtual_services,
        ..Snapshot::default()
    };
    let (web_port, db_port) = (free_port()?, free_port()?);
    let proxy = Running::bootstrap(
        bowline_tests::proxy::client_sidecar_bootstrap(
            &snapshot,
            &[("10.96.0.70_7070", web_port), ("10.96.0.71_7071", db_port)],
        )?,
        &[],
    )
    .await?;

    let host = "Host: legacy.shop.svc.cluster.local:7070";
    let url = |path: &str| format!("http://127.0.0.1:{web_port}{path}");
    let (status, body) = curl(&["-H", host, &url("/books")])?;
    ensure!(
        status == 200 && body.starts_with("legacy /books"),
        "{status} {body}"
    );
    // The VirtualService's rules apply: it is HTTP, not a byte stream.
    ensure!(curl(&["-H", host, &url("/teapot")])?.0 == 418);
    echoes(db_port, b"*1\r\n$4\r\nPING\r\n").await?;
    proxy.stop().await
}
