//! `sample-grpc`: the mesh's sample gRPC service, and a client to call it.
//!
//! `sample-grpc serve` serves the standard health service
//! (`grpc.health.v1.Health`), with the service `SERVICE_NAME` and the server
//! as a whole SERVING; any other service name is answered NOT_FOUND (grpc
//! status 5, in the trailers). Every answer carries the version in its
//! `x-version` header.
//!
//! `sample-grpc call <url>` sends Check calls one after another and prints,
//! as JSON, how many each version answered and the grpc statuses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[derive(Debug, Parser)]
#[command(about = "The mesh's sample gRPC service")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC (h2c).
    Serve {
        #[arg(long, env = "PORT", default_value_t = 9090)]
        port: u16,
        #[arg(long, env = "VERSION", default_value = "v1")]
        version: String,
        #[arg(long, env = "SERVICE_NAME", default_value = "echo")]
        service: String,
    },
    /// Call `url` (`http://host:port`) and count the answers.
    Call {
        url: String,
        #[arg(long, default_value_t = 100)]
        requests: u32,
        /// The service name asked about; another than the server's gets
        /// NOT_FOUND.
        #[arg(long, default_value = "echo")]
        service: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Serve {
            port,
            version,
            service,
        } => serve(port, version, service).await,
        Command::Call {
            url,
            requests,
            service,
        } => call(url, requests, service).await,
    }
}

async fn serve(port: u16, version: String, service: String) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(&service, ServingStatus::Serving)
        .await;
    let version: http::HeaderValue = version.parse()?;
    let stamp = tower::ServiceBuilder::new().map_response(
        move |mut response: http::Response<tonic::body::Body>| {
            response.headers_mut().insert("x-version", version.clone());
            response
        },
    );
    eprintln!("sample-grpc serving on :{port}");
    tonic::transport::Server::builder()
        .layer(stamp)
        .add_service(health)
        .serve_with_shutdown(
            SocketAddr::from(([0, 0, 0, 0], port)),
            bowline_tests::samples::terminated(),
        )
        .await?;
    Ok(())
}

async fn call(url: String, requests: u32, service: String) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url.clone())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let mut client = HealthClient::new(channel);
    let mut versions: BTreeMap<String, u32> = BTreeMap::new();
    let mut statuses: BTreeMap<String, u32> = BTreeMap::new();
    let started = Instant::now();
    for _ in 0..requests {
        let answer = client
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await;
        let (code, version) = match answer {
            Ok(response) => (
                tonic::Code::Ok,
                response
                    .metadata()
                    .get("x-version")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            ),
            Err(status) => (
                status.code(),
                status
                    .metadata()
                    .get("x-version")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            ),
        };
        *statuses.entry(format!("{code:?}")).or_default() += 1;
        if code == tonic::Code::Ok {
            *versions
                .entry(version.unwrap_or_else(|| "none".into()))
                .or_default() += 1;
        }
    }
    println!(
        "{}",
        json!({
            "url": url,
            "requests": requests,
            "versions": versions,
            "grpc_statuses": statuses,
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
