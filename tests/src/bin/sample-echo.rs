//! `sample-echo`: the mesh's sample HTTP service, and a client to call it.
//!
//! `sample-echo serve` answers every request with who answered — service,
//! version, pod — and what it was asked, as JSON, with the version also in
//! the `x-version` header. `/status/<code>` answers that status,
//! `/delay/<ms>` waits first, `/healthz` is for readiness probes.
//!
//! `sample-echo call <url>` sends requests one after another and prints how
//! many each version answered and how many failed, as JSON, for the demo
//! and the tests to read from a pod's log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{Path, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bowline_tests::samples::{self, parse_duration};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "The mesh's sample HTTP service")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve HTTP.
    Serve {
        #[arg(long, env = "PORT", default_value_t = 8080)]
        port: u16,
        /// The version reported (a Deployment's `version` label).
        #[arg(long, env = "VERSION", default_value = "v1")]
        version: String,
        #[arg(long, env = "SERVICE_NAME", default_value = "echo")]
        service: String,
        /// The status every answer has (but /healthz's): 503 makes a
        /// broken replica.
        #[arg(long, env = "STATUS_CODE", default_value_t = 200)]
        status: u16,
    },
    /// Call `url` and count the answers by version.
    Call(CallOptions),
}

#[derive(Debug, clap::Args)]
struct CallOptions {
    url: String,
    /// How many requests (at most).
    #[arg(long, default_value_t = 100)]
    requests: u32,
    /// Stop after this long even when requests remain.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Pause between requests.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    interval: Duration,
    /// The Host header, when it is not the URL's.
    #[arg(long)]
    host: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// Also count the requests that took at least this long.
    #[arg(long, value_parser = parse_duration)]
    slow: Option<Duration>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Serve {
            port,
            version,
            service,
            status,
        } => serve(port, version, service, status).await,
        Command::Call(options) => call(options).await,
    }
}

async fn serve(port: u16, version: String, service: String, status: u16) -> anyhow::Result<()> {
    let status = StatusCode::from_u16(status)?;
    let pod = std::env::var("HOSTNAME").unwrap_or_default();
    let answer = move |status: StatusCode, request: &Request| -> Response {
        let headers: BTreeMap<&str, &str> = request
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
            .collect();
        let body = json!({
            "service": service,
            "version": version,
            "pod": pod,
            "method": request.method().as_str(),
            "path": request.uri().to_string(),
            "headers": headers,
        });
        let mut response = (status, axum::Json(body)).into_response();
        if let Ok(value) = version.parse() {
            response.headers_mut().insert("x-version", value);
        }
        response
    };
    let echo = answer.clone();
    let with_status = answer.clone();
    let delayed = answer;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/status/{code}",
            get(move |Path(code): Path<u16>, request: Request| async move {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
                with_status(status, &request)
            }),
        )
        .route(
            "/delay/{ms}",
            get(move |Path(ms): Path<u64>, request: Request| async move {
                tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                delayed(status, &request)
            }),
        )
        .fallback(move |request: Request| async move { echo(status, &request) });
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    eprintln!("sample-echo serving on :{port}");
    axum::serve(listener, app)
        .with_graceful_shutdown(samples::terminated())
        .await?;
    Ok(())
}

/// What a call run saw.
#[derive(Debug, Default)]
struct Seen {
    versions: BTreeMap<String, u32>,
    statuses: BTreeMap<u16, u32>,
    errors: BTreeMap<String, u32>,
    latencies: Vec<Duration>,
}

async fn call(options: CallOptions) -> anyhow::Result<()> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = options.url.parse()?;
    let deadline = Instant::now() + options.duration;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    // Stopped (SIGTERM, as when its pod goes), it reports what it saw.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        term.recv().await;
        let _ = stop.send(true);
    });
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.concurrency.max(1) {
        let (client, uri, host) = (client.clone(), uri.clone(), options.host.clone());
        let (sent, seen, mut stopped) = (sent.clone(), seen.clone(), stopped.clone());
        let (requests, interval) = (options.requests, options.interval);
        workers.spawn(async move {
            while Instant::now() < deadline && !*stopped.borrow() {
                if sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= requests {
                    sent.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
                let mut request = http::Request::get(uri.clone());
                if let Some(host) = &host {
                    request = request.header("host", host);
                }
                let Ok(request) = request.body(http_body_util::Empty::new()) else {
                    break;
                };
                let started = Instant::now();
                let answer =
                    tokio::time::timeout(Duration::from_secs(10), client.request(request)).await;
                {
                    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                    seen.latencies.push(started.elapsed());
                    match answer {
                        Ok(Ok(response)) => {
                            *seen.statuses.entry(response.status().as_u16()).or_default() += 1;
                            let version = response
                                .headers()
                                .get("x-version")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("none")
                                .to_string();
                            if response.status().is_success() {
                                *seen.versions.entry(version).or_default() += 1;
                            }
                        }
                        Ok(Err(e)) => *seen.errors.entry(e.to_string()).or_default() += 1,
                        Err(_) => {
                            *seen.errors.entry("timed out after 10s".into()).or_default() += 1
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stopped.changed() => break,
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let mut seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    seen.latencies.sort();
    let latencies = &seen.latencies;
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or_default()
    };
    let slow = options
        .slow
        .map(|slow| latencies.iter().filter(|l| **l >= slow).count());
    println!(
        "{}",
        json!({
            "url": options.url,
            "requests": latencies.len(),
            "versions": seen.versions,
            "statuses": seen.statuses,
            "errors": seen.errors,
            "p50_ms": percentile(0.5),
            "p99_ms": percentile(0.99),
            "max_ms": latencies.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or_default(),
            "slow": slow,
        })
    );
    Ok(())
}
