//! bowline-proxy carrying more than plain requests: a WebSocket upgraded
//! through it and echoing both ways, and gRPC over HTTP/2 (h2c) whose
//! status travels in trailers — answered in full, and trailers-only — and
//! reaches the metrics as `grpc_response_status`.

use anyhow::{Context, ensure};
use bowline_tests::cluster::free_port;
use bowline_tests::proxy::{Running, curl, http_bootstrap, static_cluster, upstream};
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
    let proxy = Running::bootstrap(
        http_bootstrap(
            port,
            json!([{"match": {"prefix": "/"}, "route": {"cluster": "chat"}}]),
            vec![static_cluster("chat", &[app])],
        ),
        &[],
    )
    .await?;
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
    let proxy = Running::bootstrap(
        http_bootstrap(
            port,
            json!([{"match": {"prefix": "/"}, "route": {"cluster": "grpc"}}]),
            vec![cluster],
        ),
        &[],
    )
    .await?;

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
